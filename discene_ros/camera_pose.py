"""Where the camera pose comes from: TF at the image stamp, or a fallback pose from the camera mount.

The fallback is for robots without odometry: the world frame is absent from TF, but the static
mount (``base_link`` -> optical frame on /tf_static) gives the camera's real height and pitch. It is
used only when the transform does not exist at all; a TF that merely lags the image is waited for
(bounded) and the frame skipped if it stays behind, so clouds never land at a made-up pose.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import FrameError
from .processing import fallback_camera_pose

# The network expects an upright camera. Poses from TF beyond these limits most often mean a frame_id that is
# not the optical frame (REP 103: z forward, x right, y down), e.g. a camera_link (x forward, z up).
MAX_ELEVATION_DEG = 45.0   # the optical axis this far above the horizon
MAX_DOWN_AXIS_UP = 0.3     # z component (up) of the image's down axis (y) in the world: about 110 deg of roll


def orientation_problem(camera_to_world: np.ndarray, camera_frame: str) -> str | None:
    """What looks wrong with a camera pose from TF for this network (looking far up, or upside down), else
    None. A warning, not a skip: an unusual mount may be meant."""
    rotation = np.asarray(camera_to_world, dtype=np.float64)[:3, :3]
    forward_up, down_up = rotation[2, 2], rotation[2, 1]  # world z of the optical axis and of the image's down axis
    elevation = math.degrees(math.asin(min(max(forward_up, -1.0), 1.0)))
    if elevation > MAX_ELEVATION_DEG:
        return (f"camera '{camera_frame}' looks {elevation:.0f} deg above the horizon in TF. Is '{camera_frame}' its "
                "optical frame (REP 103: z forward, x right, y down)? A body-style frame such as camera_link "
                "(x forward, z up) gives this; the model expects a camera looking ahead or down")
    if down_up > MAX_DOWN_AXIS_UP:
        return (f"camera '{camera_frame}' is upside down in TF (its image's down axis points {down_up:.2f} up): the "
                "model was trained on upright images; mount it upright or rotate the image (image_rotate), or fix "
                "the optical frame's orientation in TF")
    return None


class TransformNotReadyError(FrameError):
    """The transform exists but not at the image stamp (TF lags or the stamp is too old): skipped."""

    reason = "tf_not_ready"


def mount_height_pitch(camera_to_base: np.ndarray) -> tuple[float, float]:
    """(camera height above the base frame origin in m, pitch below the horizon in degrees) of a mount
    (4x4 camera optical frame -> base frame; optical z is the viewing direction)."""
    forward = np.asarray(camera_to_base, dtype=np.float64)[:3, 2]
    pitch = math.degrees(math.atan2(-forward[2], math.hypot(forward[0], forward[1])))
    return float(camera_to_base[2, 3]), pitch


def mount_fallback_pose(camera_to_base: np.ndarray, floor_z: float = 0.0) -> np.ndarray:
    """Fallback camera->world pose with the mount's height and pitch (base frame origin on the floor,
    looking along world +x, no roll)."""
    height, pitch = mount_height_pitch(camera_to_base)
    return fallback_camera_pose(height, pitch, floor_z)


NODE_SKIP_HINT = "set use_fallback_pose:=false"  # how the node's user turns the fallback off


def use_fallback(processor: Any, mount: np.ndarray | None, world_frame: str, camera_frame: str,
                 base_frame: str, skip_hint: str = NODE_SKIP_HINT) -> str:
    """The fallback pose of ``processor`` (a ``processing.FrameProcessor``) from the camera ``mount``
    when TF has it (else it keeps the one from its height/pitch settings); returns :func:`describe_fallback`'s
    line. Node and replay both call it when the world frame is absent from TF, each with its own
    ``skip_hint`` (a parameter for the node, an option for the replay)."""
    settings = processor.settings
    if mount is not None:
        processor.fallback_pose = mount_fallback_pose(mount, settings.floor_z)
    return describe_fallback(world_frame, camera_frame, base_frame, mount, settings.fallback_camera_height,
                             settings.fallback_camera_pitch_deg, skip_hint)


def describe_fallback(world_frame: str, camera_frame: str, base_frame: str, mount: np.ndarray | None,
                      height: float, pitch_deg: float, skip_hint: str = NODE_SKIP_HINT) -> str:
    """One loud line for the console and diagnostics: why and with what pose the fallback is used."""
    if mount is not None:
        height, pitch_deg = mount_height_pitch(mount)
        source = f"the camera mount {base_frame} -> {camera_frame} from TF"
    else:
        source = f"the fixed parameters (no TF from {base_frame} to {camera_frame} either)"
    return (f"world frame '{world_frame}' is not in TF: clouds use a FALLBACK camera pose {height:.2f} m above "
            f"the floor, pitched {pitch_deg:.1f} deg down, from {source}; they do not follow the robot's motion. "
            f"Publish {world_frame} -> {camera_frame} in TF (odometry) for real poses, or {skip_hint} to skip "
            "such frames")
