"""Pairing colour, depth and camera info by header stamp (node and replay).

Drivers publish aligned depth and camera info *after* the colour image they belong to, so "the
newest depth" is usually the previous frame's. Like message_filters' ApproximateTimeSynchronizer,
a colour frame takes the partner whose stamp is nearest its own within a tolerance, waiting a
bounded time for it to arrive; a partner newer than the window means none will come. Camera info is waited
for only until its calibration has been the same twice in a row: from then on the newest is used at once,
as it gives the same intrinsics, so a camera publishing CameraInfo less often than images does not hold
every frame up for the whole wait.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .errors import DepthError, MissingCameraInfoError
from .msg_decode import camera_info_key, stamp_to_ns


class DepthSyncError(DepthError):
    """No depth image within the stamp tolerance of the colour image (after the bounded wait)."""

    reason = "depth_not_synchronised"


# a stamp this much older than the one before it on the same topic: the time line restarted (a bag played
# with --loop, a simulator reset), as tf2's 1 s jump threshold
STAMP_JUMP_BACK_NS = 1_000_000_000
# camera infos in a row with the same calibration after which an image no longer waits for its own
STEADY_CALIBRATION_INFOS = 2


class StampedBuffer:
    """The last ``maxlen`` messages of one topic, searchable by header stamp; thread-safe."""

    def __init__(self, maxlen: int = 30) -> None:
        self._cond = threading.Condition()
        self._items: deque[tuple[int, Any]] = deque(maxlen=maxlen)
        self._closed = False

    def add(self, msg: Any) -> None:
        stamp = stamp_to_ns(msg.header.stamp)
        with self._cond:
            if self._items and stamp < self._items[-1][0] - STAMP_JUMP_BACK_NS:
                self._items.clear()  # the old time line's messages would never match, and look "newer" for good
            self._items.append((stamp, msg))
            self._cond.notify_all()

    def close(self) -> None:
        """Wake waiting callers (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def newest(self) -> Any:
        with self._cond:
            return self._items[-1][1] if self._items else None

    def _nearest(self, stamp_ns: int, tolerance_ns: int) -> tuple[Any, bool]:
        """(message nearest ``stamp_ns`` within the tolerance or None, whether a matching one may still come)."""
        best, best_offset, newest = None, None, None
        for stamp, msg in self._items:
            offset = abs(stamp - stamp_ns)
            newest = stamp if newest is None else max(newest, stamp)
            if offset <= tolerance_ns and (best_offset is None or offset < best_offset):
                best, best_offset = msg, offset
        return best, newest is None or newest <= stamp_ns + tolerance_ns

    def settled(self, stamp_ns: int, tolerance_ns: int) -> bool:
        """True when the match for ``stamp_ns`` is known: found, or a message past the window arrived."""
        with self._cond:
            best, may_come = self._nearest(stamp_ns, tolerance_ns)
            return best is not None or not may_come

    def wait_nearest(self, stamp_ns: int, tolerance_ns: int, timeout_s: float) -> Any:
        """The message nearest ``stamp_ns`` within ``tolerance_ns``; without one, wait up to ``timeout_s``
        while one may still come (nothing newer than the window seen yet). None when none matched."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while True:
                best, may_come = self._nearest(stamp_ns, tolerance_ns)
                remaining = deadline - time.monotonic()
                if best is not None or not may_come or remaining <= 0 or self._closed:
                    return best
                self._cond.wait(remaining)


class FramePartners:
    """Camera info and depth buffers of one colour stream and the pairing rule shared by node and replay."""

    def __init__(self, tolerance_s: float, wait_s: float, use_depth: bool, maxlen: int = 30,
                 info_topic: str | None = "the camera info topic", depth_topic: str = "the depth topic") -> None:
        self.tolerance_ns = int(round(tolerance_s * 1e9))
        self.wait_s = float(wait_s)
        self.use_depth = use_depth
        self.info_topic, self.depth_topic = info_topic, depth_topic  # named in the skip messages
        self.info = StampedBuffer(maxlen)
        self.depth = StampedBuffer(maxlen)
        self._calibration: tuple | None = None  # camera_info_key of the newest camera info
        self._same_calibration = 0  # camera infos in a row with that calibration

    def add_info(self, msg: Any) -> None:
        """A camera info message, its calibration compared with the previous one's (once per message, here
        rather than per frame)."""
        key = camera_info_key(msg)
        self._same_calibration = self._same_calibration + 1 if key == self._calibration else 1
        self._calibration = key
        self.info.add(msg)

    def calibration_steady(self) -> bool:
        """True once the last STEADY_CALIBRATION_INFOS camera infos had the same calibration."""
        return self._same_calibration >= STEADY_CALIBRATION_INFOS

    def close(self) -> None:
        self.info.close()
        self.depth.close()

    def match(self, stamp_ns: int, wait: bool = True) -> tuple[Any, Any]:
        """(camera info, depth or None) for a colour image stamped ``stamp_ns``.

        Camera info: nearest within the tolerance; when none is (drivers that stamp it on their own
        clock), the newest one, since intrinsics do not change per frame. It is waited for only while the
        calibration is not steady (``calibration_steady``): a steady one gives the same intrinsics at once.
        Depth: nearest within the tolerance or DepthSyncError. Raises MissingCameraInfoError when no camera
        info came at all.
        """
        timeout = self.wait_s if wait else 0.0
        info_timeout = 0.0 if self.calibration_steady() else timeout
        info = self.info.wait_nearest(stamp_ns, self.tolerance_ns, info_timeout) or self.info.newest()
        if info is None:
            raise MissingCameraInfoError(f"no CameraInfo received yet on {self.info_topic}" if self.info_topic else
                                         "no CameraInfo topic to pair the image with")
        if not self.use_depth:
            return info, None
        depth = self.depth.wait_nearest(stamp_ns, self.tolerance_ns, timeout)
        if depth is None:
            newest = self.depth.newest()
            seen = (f"no depth image received yet on {self.depth_topic}" if newest is None else
                    f"the newest depth image is {abs(stamp_to_ns(newest.header.stamp) - stamp_ns) / 1e6:.1f} ms away")
            raise DepthSyncError(f"no depth image within {self.tolerance_ns / 1e6:.1f} ms of the colour image "
                                 f"after waiting {timeout * 1e3:.0f} ms ({seen})")
        return info, depth
