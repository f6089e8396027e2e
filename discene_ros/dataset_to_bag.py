"""``discene-dataset-to-bag``: an Occ-ScanNet-format dataset (real or synthetic) -> ROS 2 bag.

Writes colour (rgb8 Image, or the dataset's own JPEG bytes as CompressedImage with
``--compressed``), CameraInfo, 16UC1 depth, /tf (world -> camera) and the ground truth (labelled
voxel-centre PointCloud2 + grid pose) per frame; the topics are listed in ``bag_io``. Frames get
stamps ``--start`` + i / ``--rate``. A dev-machine tool: it reads the dataset with ``training``.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.geometry import scale_intrinsic
from models.preprocess import resize_depth, resize_image
from training.occscannet import BadSampleError, OccScanNetDataset, find_image, read_image
from training.scene_format import DEPTH_SCALE, SPLIT_FILES, read_split

from . import bag_io, msg_encode
from .msg_factory import TypestoreFactory


def _sample_ids(root: Path, split: str) -> list[str]:
    if split != "all":
        return read_split(root, split)
    ids: list[str] = []
    for name in SPLIT_FILES:
        if (root / SPLIT_FILES[name]).is_file():
            ids += [s for s in read_split(root, name) if s not in ids]
    if not ids:
        raise FileNotFoundError(f"no split list ({', '.join(SPLIT_FILES.values())}) under {root}")
    return ids


def _read_frame(dataset: Any, sample_id: str, resize_hw: tuple[int, int] | None) -> dict[str, Any]:
    """Raw frame of a sample: rgb, jpeg bytes (None after resizing), depth metres, K, pose, origin, target."""
    data = dataset.read_pickle(sample_id)
    target = dataset.read_target(sample_id, data)
    jpg = find_image(dataset.root, sample_id, data, "img")
    rgb = read_image(sample_id, jpg, "RGB")
    jpeg_bytes = jpg.read_bytes() if jpg.suffix.lower() in (".jpg", ".jpeg") else None
    depth = read_image(sample_id, find_image(dataset.root, sample_id, data, "depth_gt"), "I").astype(np.float32)
    depth /= DEPTH_SCALE
    k = np.asarray(data["intrinsic"], dtype=np.float64)[:3, :3]
    if resize_hw is not None and rgb.shape[:2] != tuple(resize_hw):
        k = scale_intrinsic(k, rgb.shape[:2], resize_hw)
        rgb, jpeg_bytes = resize_image(rgb, resize_hw), None
        depth = resize_depth(depth, resize_hw)
    return {"rgb": rgb, "jpeg": jpeg_bytes, "depth": depth, "k": k,
            "cam_pose": np.asarray(data["cam_pose"], dtype=np.float64),
            "voxel_origin": np.asarray(data["voxel_origin"], dtype=np.float64).reshape(3), "target": target}


def frame_messages(factory: TypestoreFactory, frame: dict[str, Any], stamp_ns: int, compressed: bool,
                   jpeg_quality: int = 90, voxel_size: float = 0.08) -> dict[str, Any]:
    """Topic -> message for one dataset frame (see the topic table in bag_io)."""
    if compressed:
        if frame["jpeg"] is not None:
            image = factory.new("sensor_msgs/msg/CompressedImage",
                                header=msg_encode.make_header(factory, stamp_ns, bag_io.CAMERA_FRAME), format="jpeg",
                                data=factory.uint8_array(frame["jpeg"]))
        else:
            image = msg_encode.rgb_to_compressed(factory, frame["rgb"], bag_io.CAMERA_FRAME, stamp_ns, "jpeg", jpeg_quality)
        image_topic = bag_io.COMPRESSED_TOPIC
    else:
        image = msg_encode.rgb_to_image(factory, frame["rgb"], bag_io.CAMERA_FRAME, stamp_ns, "rgb8")
        image_topic = bag_io.IMAGE_TOPIC
    h, w = frame["rgb"].shape[:2]
    target = frame["target"]
    idx = np.argwhere((target > 0) & (target != 255))  # occupied voxels; the labels topic has the unknown ones
    labels = target[tuple(idx.T)]
    centers = frame["voxel_origin"] + (idx + 0.5) * voxel_size
    gt = msg_encode.points_to_pointcloud2(factory, msg_encode.cloud_points(centers, labels, np.ones(len(idx), np.float32)),
                                    bag_io.WORLD_FRAME, stamp_ns)
    tf = msg_encode.matrix_to_transform_stamped(factory, frame["cam_pose"], bag_io.WORLD_FRAME, bag_io.CAMERA_FRAME, stamp_ns)
    return {
        bag_io.GT_POSE_TOPIC: msg_encode.grid_pose_msg(factory, frame["voxel_origin"], bag_io.WORLD_FRAME, stamp_ns),
        bag_io.GT_TOPIC: gt,
        bag_io.GT_LABELS_TOPIC: msg_encode.label_grid_to_png(factory, target, bag_io.WORLD_FRAME, stamp_ns),
        bag_io.TF_TOPIC: factory.new("tf2_msgs/msg/TFMessage", transforms=[tf]),
        bag_io.CAMERA_INFO_TOPIC: msg_encode.k_to_camera_info(factory, frame["k"], h, w, bag_io.CAMERA_FRAME, stamp_ns),
        bag_io.DEPTH_TOPIC: msg_encode.depth_to_image(factory, frame["depth"], bag_io.CAMERA_FRAME, stamp_ns, "16UC1"),
        image_topic: image,
    }


def dataset_to_bag(dataset_dir: str | Path, out: str | Path, storage: str = "mcap", split: str = "all",
                   compressed: bool = False, rate_hz: float = 5.0, start_s: float = 1_700_000_000.0,
                   max_frames: int | None = None, resize_hw: tuple[int, int] | None = None,
                   jpeg_quality: int = 90, progress: bool = False) -> int:
    """Convert a dataset to a bag; returns the number of frames written (at least 1: a dataset without a
    readable sample is a ValueError). A conversion that fails before writing a frame removes the bag folder
    it made."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} " + ("is a file, not a folder" if root.exists() else
                                                                "does not exist"))
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"--rate must be a positive number of Hz, got {rate_hz}")
    if not math.isfinite(start_s):
        raise ValueError(f"the start stamp must be a number of seconds, got {start_s}")
    if resize_hw is not None and min(resize_hw) < 1:
        raise ValueError(f"--resize must be at least 1x1, got {resize_hw[0]}x{resize_hw[1]}")
    if max_frames is not None and max_frames < 1:  # a negative slice bound would drop frames from the end
        raise ValueError(f"--max-frames must be at least 1, got {max_frames}")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be 0 to 100 (libjpeg's scale), got {jpeg_quality}")
    ids = _sample_ids(root, split)[:max_frames]
    dataset = _all_split_dataset(root) if split == "all" else OccScanNetDataset(root, split=split)
    factory = TypestoreFactory(bag_io.typestore())
    written = 0
    writer = bag_io.BagWriter(out, storage, factory.typestore)  # refuses an existing path: what is there now is ours
    try:
        with writer:
            for i, sample_id in enumerate(tqdm(ids, desc="dataset-to-bag", unit="frame", disable=not progress)):
                stamp = int(round((start_s + i / rate_hz) * 1e9))
                try:
                    frame = _read_frame(dataset, sample_id, resize_hw)
                except (BadSampleError, OSError) as exc:
                    print(f"discene-dataset-to-bag: skipping sample {sample_id}: {exc}", file=sys.stderr)
                    continue
                for topic, msg in frame_messages(factory, frame, stamp, compressed, jpeg_quality).items():
                    writer.write(topic, msg, stamp)
                written += 1
        if not written:
            raise ValueError(f"no readable sample among the {len(ids)} of split '{split}' in {root}: no bag written")
    except BaseException:
        if not written:  # an empty bag would only make the next try fail with "already exists"
            shutil.rmtree(writer.path, ignore_errors=True)
        raise
    return written


def _all_split_dataset(root: Path) -> Any:
    """A loader instance used only for its validated pkl/target readers (any split list works)."""
    split = next(s for s in SPLIT_FILES if (root / SPLIT_FILES[s]).is_file())
    return OccScanNetDataset(root, split=split)


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HxW like 240x320, got '{text}'") from exc
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected a positive HxW like 240x320, got '{text}'")
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discene-dataset-to-bag", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="Occ-ScanNet-format root (gathered_data/, posed_images/)")
    parser.add_argument("--out", required=True, help="output bag directory (must not exist)")
    parser.add_argument("--storage", choices=bag_io.STORAGES, default="mcap", help="rosbag2 storage (default mcap)")
    parser.add_argument("--split", default="all", help="train, val, all (default) or a list file")
    parser.add_argument("--compressed", action="store_true", help="write jpeg CompressedImage instead of rgb8 Image")
    parser.add_argument("--rate", type=float, default=5.0, help="frame rate of the stamps, Hz")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--resize", type=_hw, default=None, metavar="HxW", help="resize images and depth (K scaled)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args(argv)
    try:
        n = dataset_to_bag(args.dataset, args.out, args.storage, args.split, args.compressed, args.rate,
                           max_frames=args.max_frames, resize_hw=args.resize, jpeg_quality=args.jpeg_quality,
                           progress=True)
    except ImportError as exc:
        print(f"discene-dataset-to-bag: error: {bag_io.missing_package_note(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"discene-dataset-to-bag: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} frames to {args.out} ({args.storage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
