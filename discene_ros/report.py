"""Replay report: ``report.md`` with the summary table, per-class IoU and PNG renders of a few frames."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def render_frames(out_dir: Path, renders: list[dict[str, Any]]) -> tuple[list[Path], str | None]:
    """PNG per kept frame (image | ground truth | prediction) with training.render; (paths, note if none)."""
    if not renders:
        return [], None
    try:
        from training import render
    except ImportError as exc:
        return [], f"renders skipped: training.render is not importable ({exc})"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(renders):
        path = out_dir / f"frame_{i:02d}_{item['stamp_ns']}.png"
        render.render_panel(item["rgb"], None, item["gt"], item["pred"], cam_pose=item["cam_pose"],
                            voxel_origin=item["voxel_origin"], tile=(320, 240),
                            title=f"stamp {item['stamp_ns'] * 1e-9:.3f} s", out_path=path)
        paths.append(path)
    return paths, None


def invalid_transforms_note(invalid: dict[str, dict[str, Any]]) -> str:
    """One line on the invalid TF transforms the replay dropped (as tf2 drops them), by link."""
    links = "; ".join(f"{link}: {seen['count']}, first {seen['first']}" for link, seen in invalid.items())
    return (f"{sum(seen['count'] for seen in invalid.values())} invalid TF transforms were dropped, as tf2 drops "
            f"them (a frame is skipped only when its camera's chain has a link with no valid transform): {links}")


def ground_truth_line(truth: dict[str, Any] | None, error_where: str) -> str:
    """Why IoU/mIoU were not computed, in a line (``truth``: the summary's ``ground_truth``); where the error
    already says it at length (ground truth no frame matched), a short line pointing ``error_where``."""
    if not truth:
        return "No ground truth: IoU/mIoU not computed"
    if truth["status"] == "unmatched":
        return f"IoU/mIoU not computed: no processed frame has ground truth at its stamp (see {error_where})"
    return truth["note"][0].upper() + truth["note"][1:]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def write_report(out_dir: str | Path, summary: dict[str, Any], renders: list[dict[str, Any]]) -> Path:
    """Write ``report.md`` (+ ``renders/*.png``) under ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs, note = render_frames(out_dir / "renders", renders)
    lat = summary.get("latency_ms") or {}
    topic = f"`{summary['image_topic']}`" if summary.get("image_topic") else "not chosen: the bag was not read"
    model = (f"`{summary['model_config']}` on {summary.get('backend')}" if summary.get("model_config")
             else "not loaded")
    lines = [
        "# DiScene replay report", "",
        f"- bag: `{summary.get('bag')}` (image topic {topic}"
        + (f", camera info `{summary['info_topic']}`" if summary.get("info_topic") else "") + ")",
        *([f"- other image topics in the bag, not read: {', '.join(f'`{t}`' for t in summary['other_image_topics'])}"]
          if summary.get("other_image_topics") else []),
        *([f"- note: {summary['bag_note']}"] if summary.get("bag_note") else []),
        f"- model: {model}",
        *([f"- frame path: {summary['pipeline']}"] if summary.get("pipeline") else []),
        f"- mode: {'recorded rate (--realtime, newest frame wins)' if summary.get('realtime') else 'full speed'}",
        *([f"- frame loop: {summary['frame_loop']}"] if summary.get("frame_loop") else []),
        *([f"- images: {summary['images_note']}"] if summary.get("images_note") else []),
        f"- output bag: `{summary.get('output_bag') or 'none'}`", "",
    ]
    if summary.get("error"):
        lines += [f"**The run is incomplete:** {summary['error']}", "",
                  "The figures below cover the frames processed; the output bag, the frames written to it.", ""]
    lines += [
        "| frames processed | images read | skipped | dropped | FPS | latency p50 / p90 / p99 / mean (ms) |",
        "|---|---|---|---|---|---|",
        f"| {summary.get('frames', 0)} | {summary.get('images', 0)} | {summary.get('skipped', 0)} | "
        f"{summary.get('dropped', 0)} | {summary.get('fps', 0.0):.2f} | "
        f"{lat.get('p50', 0):.1f} / {lat.get('p90', 0):.1f} / {lat.get('p99', 0):.1f} / {lat.get('mean', 0):.1f} |", "",
    ]
    if summary.get("unfinished"):
        lines += [f"{summary['unfinished']} frames were in flight when the run was interrupted and were not finished "
                  "(not counted as dropped: dropped frames are the ones a newer frame replaced).", ""]
    processed = summary.get("frames", 0) > 0
    full_speed = processed and not summary.get("realtime")
    if full_speed and summary.get("pipelined", True):
        lines += ["Latency runs from the frame loop taking a frame to its output. At full speed the pipelined "
                  "loop takes a frame as soon as its first stage may take one, so the frame then waits for the "
                  "frames ahead of it: two or three frame times where the inference is the slowest stage; one "
                  "frame's own processing is the `total` stage below.", ""]
    elif full_speed:
        lines += ["Latency runs from the frame loop taking a frame to its output. The network runs alone, and a "
                  "frame is decoded and prepared while the previous one is post-processed and written, so it is "
                  "the frame's own decoding, processing and output plus at most the rest of the previous frame's.",
                  ""]
    if summary.get("fps_after_first_frame"):
        lines += [f"The first frame took {summary['first_frame_ms']:.0f} ms (one-off warm-up); the frames after it "
                  f"ran at {summary['fps_after_first_frame']:.2f} FPS.", ""]
    if summary.get("skipped_by_reason"):
        firsts = {k: v for k, v in (summary.get("first_skip_by_reason") or {}).items()
                  if k != "internal_error"}  # the error above has those
        lines += ["Skipped frames by reason: " + ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items()),
                  *(["", "The first of each:", ""] if firsts else []), *(f"- {k}: {v}" for k, v in firsts.items()), ""]
    if summary.get("fallback_pose_frames"):
        lines += [f"{summary['fallback_pose_frames']} frames had no camera pose in TF and used the fallback pose "
                  "(IoU/mIoU leave them out: their score is of that guessed pose, not of the model).", ""]
    if summary.get("camera_orientation_note"):
        lines += [f"**Camera orientation:** {summary['camera_orientation_note']}", ""]
    if summary.get("invalid_transforms"):
        lines += [f"**TF:** {invalid_transforms_note(summary['invalid_transforms'])}", ""]
    stages = summary.get("stage_ms") or {}
    if stages:
        lines += ["| stage | p50 ms | mean ms |", "|---|---|---|"]
        lines += [f"| {name.removesuffix('_ms')} | {v['p50']:.1f} | {v['mean']:.1f} |" for name, v in stages.items()]
        lines.append("")
    if not processed:
        lines += ["No frame was processed: no latency or occupancy metrics.", ""]
    elif summary.get("iou") is None:
        lines += [f"{ground_truth_line(summary.get('ground_truth'), 'above')}.", ""]
    else:
        on_tf = " with a TF pose" if summary.get("all_frames") else ""
        lines += [f"## Occupancy metrics ({summary.get('evaluated_frames', 0)} frames{on_tf}, SSCMetrics protocol)", "",
                  f"IoU **{_pct(summary['iou'])}**, mIoU **{_pct(summary['miou'])}**", ""]
        if not summary.get("unknown_voxels_known", True):
            lines += ["Note: the bag has no dense label topic, so unknown voxels counted as empty.", ""]
        if (summary.get("ground_truth") or {}).get("note"):
            lines += [f"Note: {summary['ground_truth']['note']}.", ""]
        per_class = summary.get("per_class_iou") or {}
        lines += ["| " + " | ".join(per_class) + " |", "|" + "---|" * len(per_class),
                  "| " + " | ".join(_pct(v) for v in per_class.values()) + " |", ""]
    if pngs:
        lines += ["## Renders (image | ground truth | prediction)", ""]
        lines += [f"![{p.stem}](renders/{p.name})" for p in pngs]
        lines.append("")
    elif note:
        lines += [note, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
