"""Exception types for bad input frames; the node and the replay skip and count them by class."""
from __future__ import annotations


class FrameError(ValueError):
    """A frame (or one of its messages) that cannot be used; ``reason`` is the counter key."""

    reason = "bad_frame"


class UnsupportedEncodingError(FrameError):
    reason = "unsupported_encoding"


class ImageSizeError(FrameError):
    """Image dimensions, step and data length disagree."""

    reason = "bad_image_size"


class DecodeError(FrameError):
    """Compressed image bytes that neither cv2 nor PIL can decode."""

    reason = "decode_failed"


class CameraInfoError(FrameError):
    """Invalid intrinsics, or a camera info whose resolution does not match the image."""

    reason = "bad_camera_info"


class MissingCameraInfoError(FrameError):
    reason = "missing_camera_info"


class DepthError(FrameError):
    """Depth image unusable: wrong encoding or size, no valid pixel, or missing when required."""

    reason = "bad_depth"


class TransformError(FrameError):
    """Invalid transform, one tf2 drops (a NaN, a zero or non-finite quaternion), or TF chain of only such ones."""

    reason = "bad_transform"


class PoseError(FrameError):
    """Camera pose that is not a rigid transform (scaled, sheared, reflected, projective, non-finite, far away)."""

    reason = "bad_pose"


class NonFiniteOutputError(FrameError):
    """The network or post-processing produced NaN/inf voxel centres or scores: nothing is published."""

    reason = "non_finite_output"


class FrameIdError(FrameError):
    """An image whose header names no frame: tf2 cannot place the camera."""

    reason = "bad_frame_id"


class StampError(FrameError):
    """A header stamp before the epoch: tf2 (rclpy's Time) cannot look a pose up at it."""

    reason = "bad_stamp"


class MissingTransformError(FrameError):
    """No camera pose in the world frame and no fallback configured."""

    reason = "missing_tf"


class CloudFormatError(FrameError):
    """A PointCloud2 without the fields or layout this package expects."""

    reason = "bad_cloud"
