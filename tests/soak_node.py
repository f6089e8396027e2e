"""Soak of the occupancy node: the shipped lite on this machine behind the fake rclpy, fed by a 30 Hz camera
with hostile frames mixed in, for a given time. Not collected by pytest (it takes minutes); run it after a
change to the node, the frame loop or the decoders:

    python tests/soak_node.py [--seconds 120] [--seed 0] [--launch-ahead]

``--launch-ahead`` runs the GPU path's frame loop on this CPU instead: the fused pipeline (its launch holds the
network here) in a pipelined loop, so no prepare thread, raw images located on a thread of their own and
decoded by the finish stage, every hostile frame refused there.

About 14 % of the frames are hostile: TF to the world frame disappearing and coming back, image stamps
jumping back (a bag loop), NaN in K, half-size images with their own camera info, rgba8, camera info of
another resolution, image data cut short, an empty or ROS 1 style ("/cam") frame id. Exits 1 unless the frame loop is alive at the end, every
received frame is counted once (processed, skipped by reason or dropped), every published cloud is
finite, and the resident memory of the second half stays within 10 % of the first reading.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_ros_support import FakeRos, install_fake_rclpy  # noqa: E402

import discene_ros.node  # noqa: E402
from discene_ros import msg_decode, msg_encode  # noqa: E402
from discene_ros import params as P  # noqa: E402
from discene_ros.msg_factory import TypestoreFactory  # noqa: E402

STORE = get_typestore(Stores.ROS2_HUMBLE)
F = TypestoreFactory(STORE)
K = np.array([[525.0, 0, 320], [0, 525, 240], [0, 0, 1]])


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def scene() -> np.ndarray:
    """A 640x480 frame with edges at several scales (any picture will do: the network only has to run)."""
    yy, xx = np.mgrid[0:480, 0:640]
    return np.stack([(xx // 3) % 256, (yy // 2) % 256, ((xx + yy) // 4) % 256], -1).astype(np.uint8)


def camera_pose() -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # optical frame looking along world +x
    pose[:3, 3] = [0, 0, 1.2]
    return pose


def launch_ahead_pipeline() -> object:
    """The shipped lite as the fused launch-ahead pipeline, on the CPU."""
    from export.backends.torch_backend import TorchBackend
    from export.pipeline import OccupancyPipeline
    from models.checkpoint import load_model

    model, cfg = load_model(str(Path(__file__).resolve().parents[1] / "discene_ros" / "data" / "lite_distilled.pt"))
    return OccupancyPipeline(TorchBackend(model.eval(), cfg, device="cpu", cuda_graph=True), fuse=True)


def hostile_frame(rng: np.random.Generator, fake: FakeRos, tf_ok: object, stamp: int, base: np.ndarray,
                  events: dict[str, int]) -> tuple[object, object, int]:
    """(image, camera info, stamp) of one frame, about 14 % of them hostile; TF is changed in ``fake``."""
    r = rng.random()
    rgb, k, info_hw, encoding, event = base, K, (480, 640), "bgr8", None
    if r < 0.03:
        event = "tf_gone"
        fake.transforms.pop(("map", "cam"), None)
    elif r < 0.06:
        event = "tf_back"
        fake.transforms[("map", "cam")] = tf_ok
    elif r < 0.07:
        event, stamp = "stamps_jump_back", stamp - 30 * 10**9
    elif r < 0.09:
        event, rgb, info_hw = "half_size", base[::2, ::2].copy(), (240, 320)
        k = K / 2
        k[2, 2] = 1.0
    elif r < 0.10:
        event, k = "nan_k", K.copy()
        k[0, 0] = np.nan
    elif r < 0.11:
        event, encoding = "rgba8", "rgba8"
    elif r < 0.12:
        event, info_hw = "info_of_another_resolution", (600, 800)
        k = K * 1.25
        k[2, 2] = 1.0
    image = msg_encode.rgb_to_image(F, rgb, "cam", stamp, encoding)
    if 0.12 <= r < 0.13:
        event, image.data = "data_cut_short", image.data[: image.data.size // 2]
    elif 0.13 <= r < 0.135:
        event, image.header.frame_id = "no_frame_id", ""
    elif 0.135 <= r < 0.14:
        event, image.header.frame_id = "ros1_frame_id", "/cam"
    if event is not None:
        events[event] = events.get(event, 0) + 1
    return image, msg_encode.k_to_camera_info(F, k, info_hw[0], info_hw[1], "cam", stamp), stamp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launch-ahead", action="store_true",
                        help="the GPU path's frame loop (fused pipeline, pipelined) on this CPU")
    args = parser.parse_args(argv)
    patch = pytest.MonkeyPatch()
    fake = FakeRos(STORE)
    install_fake_rclpy(patch, fake)
    module = importlib.reload(discene_ros.node)
    fake.overrides.update(world_frame="map", warn_throttle_s=5.0)
    if args.launch_ahead:
        fake.overrides.update(pipelining="on")
        node = module.OccupancyNode(pipeline=launch_ahead_pipeline())
        assert {t.name for t in node.frames.runner._threads} == {"frame_decode", "frame_infer"}
    else:
        node = module.OccupancyNode()  # the shipped lite, torch on this machine's CPU
    cloud_pub = next(p for p in node.publishers if p.topic == P.TOPIC_CLOUD)
    tf_ok = msg_encode.matrix_to_transform_stamped(F, camera_pose(), "map", "cam", 0)
    fake.transforms[("map", "cam")] = tf_ok
    rng, base, events = np.random.default_rng(args.seed), scene(), {}
    rss, bad_clouds, stamp, sent = [], 0, 1_000 * 10**9, 0
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        sent += 1
        image, info, stamp = hostile_frame(rng, fake, tf_ok, stamp + 33_333_333, base, events)
        node.camera_info_callback(info)
        node.image_callback(image)
        if sent % 300 == 0:  # every 10 s: check and drop what the fake publishers kept
            node.diagnostics_timer_callback()
            for pub in node.publishers:
                if pub is cloud_pub:
                    for cloud in pub.published:
                        xyz = msg_decode.pointcloud2_to_array(cloud)
                        bad_clouds += not (cloud.is_dense and all(np.isfinite(xyz[c]).all() for c in "xyz"))
                pub.published.clear()
            rss.append(rss_mb())
            s = node.stats.snapshot()
            print(f"{time.monotonic() - start:6.1f} s  sent {sent}  processed {s['processed']}  dropped "
                  f"{s['dropped']}  skipped {dict(s['skipped'])}  rss {rss[-1]:.0f} MB", flush=True)
        time.sleep(max(0.0, start + sent / 30.0 - time.monotonic()))
    time.sleep(1.0)
    s = node.stats.snapshot()
    alive = node.frames.alive()
    node.destroy_node()
    patch.undo()
    counted = s["processed"] + sum(s["skipped"].values()) + s["dropped"]
    growth = (max(rss[len(rss) // 2:]) / rss[0] - 1.0) if len(rss) >= 2 else 0.0
    print(f"hostile events {events}")
    print(f"received {s['received']} = processed {s['processed']} + skipped {sum(s['skipped'].values())} + dropped "
          f"{s['dropped']}: {counted == s['received'] == sent}; loop alive {alive}; non-finite clouds {bad_clouds}; "
          f"memory growth {100 * growth:.1f} %")
    return 0 if alive and counted == s["received"] == sent and bad_clouds == 0 and growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
