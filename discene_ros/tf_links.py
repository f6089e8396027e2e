"""Which TF links join two frames, and whether only invalid transforms do: shared by the replay's ``TfTree``
and the node's ``TransformWatch``.

tf2's Buffer drops a transform with a NaN translation or a quaternion it cannot normalise: zero or with a NaN or
infinite component (BufferCore::setTransformImpl, TF_NAN_INPUT: a log line, nothing stored); any other quaternion
it normalises and keeps. A world frame that a broken localizer publishes only as NaN therefore looks absent from TF, and
absent is when the camera pose falls back to the mount. Seen here, such a frame is in TF but unusable: its frames
are skipped as ``bad_transform`` instead, as the replay does for a bag.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from .msg_decode import transform_problem

Link = tuple[str, str]  # (parent, child), frame ids without a leading "/"


def link_path(links: Iterable[Link], target: str, source: str) -> list[tuple[Link, bool]] | None:
    """Links from ``source`` to ``target`` as ((parent, child), inverted), fewest first; None when not joined."""
    graph: dict[str, list[tuple[str, Link, bool]]] = {}
    for parent, child in links:
        graph.setdefault(child, []).append((parent, (parent, child), False))
        graph.setdefault(parent, []).append((child, (parent, child), True))
    prev: dict[str, tuple[str, Link, bool]] = {}
    queue, seen = deque([source]), {source}
    while queue:
        frame = queue.popleft()
        if frame == target:
            path = []
            while frame != source:
                frame, key, inverted = prev[frame]
                path.append((key, inverted))
            return path[::-1]
        for nxt, key, inverted in graph.get(frame, []):
            if nxt not in seen:
                seen.add(nxt)
                prev[nxt] = (frame, key, inverted)
                queue.append(nxt)
    return None


def only_invalid_link(valid: Iterable[Link], invalid: dict[Link, str], target: str,
                      source: str) -> tuple[Link, str] | None:
    """The first link of the chain joining ``target`` and ``source`` that has had only invalid transforms
    (``invalid``: link -> what was wrong with its last one), with that problem; None when no such chain joins
    them (joined by valid links alone, or not at all)."""
    if not invalid:
        return None
    valid = set(valid)
    path = link_path([*valid, *invalid], target, source)
    bad = [key for key, _ in path or [] if key not in valid]
    return (bad[0], invalid[bad[0]]) if bad else None


class TransformWatch:
    """The TF links that /tf and /tf_static delivered, each with whether any of its transforms was valid:
    fed the TFMessages the node's TransformListener gets (before tf2 drops the invalid ones)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the executor's TF callbacks against the frame loop's lookups
        self._valid: set[Link] = set()
        self._invalid: dict[Link, str] = {}  # links with no valid transform yet -> their last transform's problem

    def seen(self, transforms: Iterable[Any]) -> None:
        """Note each TransformStamped's link as valid, or as invalid until a valid transform of it comes."""
        found = []  # (link, problem), worked out before taking the lock once for the whole message
        for tf in transforms:
            link = (str(tf.header.frame_id).lstrip("/"), str(tf.child_frame_id).lstrip("/"))
            if link[0] and link[1] and link[0] != link[1]:  # tf2 drops the others too; no chain runs through them
                found.append((link, transform_problem(tf)))
        with self._lock:
            for link, problem in found:
                if problem is None:
                    self._valid.add(link)
                    self._invalid.pop(link, None)
                elif link not in self._valid:
                    self._invalid[link] = problem

    def invalid_chain(self, target: str, source: str) -> str | None:
        """Why ``target`` -> ``source`` is not in tf2 although TF has it: the chain joining them runs through a
        link with only invalid transforms so far. None when that is not so (the frames are really not joined)."""
        with self._lock:
            found = only_invalid_link(self._valid, self._invalid, target, source)
        if found is None:
            return None
        (parent, child), problem = found
        return (f"TF {target} -> {source} is published but unusable: every transform {parent} -> {child} so far "
                f"was invalid ({problem}), and tf2 drops such transforms")
