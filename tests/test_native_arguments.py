"""The native kernel's entry points against hostile arguments: for a valid call of each, every buffer one item
short or long, at an unaligned address or read-only where it is written, every integer and float replaced by
extreme values. Each such call raises ``ValueError``/``TypeError``/``OverflowError`` or returns normally; none
reads or writes outside its buffers (``tests/test_native_sanitized.py`` runs this file under AddressSanitizer)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest

from models import native_postprocess

kernel = native_postprocess._kernel  # the extension itself, where it is built and on
pytestmark = pytest.mark.usefixtures("native_kernel")  # failed where it is not built (conftest)
REFUSED = (ValueError, TypeError, OverflowError, BufferError)
INTS = (0, -1, 1, 3, 2**31 - 1, 2**31, 2**62, -(2**62), 2**64)
FLOATS = (0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324)


class Call(NamedTuple):
    name: str
    args: tuple
    outputs: frozenset[int]  # positions of the buffers the kernel writes


def _valid_calls() -> list[Call]:
    rng = np.random.default_rng(0)
    f32, u8 = np.float32, np.uint8
    labels = np.zeros((2, 2, 2), u8)
    labels[0, 1, 1] = labels[1, 0, 0] = 3
    m = int(np.count_nonzero(labels))
    pose = np.eye(4)
    pose[:3, 3] = [0.5, -0.2, 1.2]
    k = np.array([[300.0, 0, 320], [0, 300, 240], [0, 0, 1]])
    return [
        Call("occupied_labels", (rng.random((1, 2, 3, 3), f32), rng.random((1, 2, 3), f32),
                                 rng.random((1, 2, 3, 4), f32), np.empty(8, np.int64), np.empty(8, u8),
                                 np.empty(8, f32), np.empty((8, 3), np.int32), np.zeros(8, u8),
                                 1, 2, 3, 4, 2, 2, 2, True, 1.0, 1.0, 1.0, 1.0, 0.5, 1), frozenset(range(3, 8))),
        Call("normalise_image", (rng.integers(0, 255, (3, 4, 5), u8), np.empty((3, 4, 5), f32), 20, (2, 1, 0),
                                 (0.5, 0.25, 2.0), (-1.0, 0.0, 1.0)), frozenset({1})),
        Call("resize_normalise", (rng.integers(0, 255, (8, 10, 3), u8), np.empty((3, 4, 5), f32), 8, 10, 4, 5,
                                  (2, 1, 0), (0.5, 0.25, 2.0), (-1.0, 0.0, 1.0), 2), frozenset({1})),
        Call("cloud_words", (np.zeros((1, 3), np.int32), np.ones(1, u8), np.ones(1, f32), np.zeros(256, np.uint32),
                             np.empty((1, 6), np.uint32), 1, 0.0, 0.0, 0.0, 0.08), frozenset({4})),
        Call("dense_cloud", (labels, rng.random((2, 2, 2), f32), np.zeros(256, np.uint32), np.empty(m, np.int32),
                             np.empty((m, 6), f32), 2, 2, 2, m, 0.5, -1.0, 2.0, 0.08), frozenset({3, 4})),
        Call("rigid_pose", (pose, 1e-3, 1e4), frozenset()),
        Call("grid_geometry", (k, pose, np.zeros(3), np.empty(3), np.empty((4, 4)), True, 480, 640, 240, 320,
                               (60, 60, 36), 0.08, 0.0, 1.0), frozenset({3, 4})),
    ]


def _resized(array: np.ndarray, items: int) -> np.ndarray:
    """``array``'s bytes as a flat array of ``items`` more (or fewer) items of its dtype."""
    flat = array.reshape(-1)
    if items < 0:
        return flat[:items].copy()
    return np.concatenate([flat, np.zeros(items, array.dtype)])


def _unaligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` one byte past an aligned address."""
    raw = np.zeros(array.nbytes + 1, np.uint8)
    view = np.frombuffer(raw.data, array.dtype, array.size, 1)
    view[...] = array.reshape(-1)
    return view.reshape(array.shape)


def _call(call: Call, position: int, value: Any) -> Any:
    args = list(call.args)
    args[position] = value
    return getattr(kernel, call.name)(*args)


CALLS = _valid_calls()


@pytest.mark.parametrize("call", CALLS, ids=[c.name for c in CALLS])
def test_each_buffer_is_checked(call: Call):
    getattr(kernel, call.name)(*call.args)  # the valid call itself runs
    for i, arg in enumerate(call.args):
        if not isinstance(arg, np.ndarray):
            continue
        for items in (-1, 1):
            with pytest.raises(ValueError, match="expected"):
                _call(call, i, _resized(arg, items))
        if arg.dtype.itemsize > 1:
            unaligned = _unaligned(arg)
            assert not unaligned.flags.aligned and unaligned.flags.c_contiguous
            with pytest.raises(ValueError, match="not aligned"):
                _call(call, i, unaligned)
        frozen = arg.copy()
        frozen.flags.writeable = False
        if i in call.outputs:
            with pytest.raises(REFUSED):
                _call(call, i, frozen)
        else:
            _call(call, i, frozen)
        with pytest.raises(REFUSED):  # not a buffer at all
            _call(call, i, arg.tolist())


@pytest.mark.parametrize("call", CALLS, ids=[c.name for c in CALLS])
def test_extreme_numbers_are_refused_or_taken(call: Call):
    """Every number (and each member of a tuple of them) replaced by extremes: refused, or a normal return.
    Refusal is not asserted here, since many are valid (a NaN origin, a zero threshold); what this asserts
    is that the call returns, and under the sanitizers that it stays inside its buffers."""
    for i, arg in enumerate(call.args):
        slots = ([(i, None)] if isinstance(arg, (int, float)) and not isinstance(arg, bool)
                 else [(i, j) for j in range(len(arg))] if isinstance(arg, tuple) else [])
        for pos, member in slots:
            current = arg if member is None else arg[member]
            for value in (INTS if isinstance(current, int) else FLOATS):
                new = value if member is None else tuple(value if j == member else v for j, v in enumerate(arg))
                try:
                    _call(call, pos, new)
                except REFUSED:
                    pass


@pytest.mark.parametrize("sizes", [(2**62, 2, 3, 4), (1, 2**62, 2**62, 4), (1, 2, 3, 255)])
def test_occupied_labels_size_products_that_overflow_are_refused(sizes):
    """Batch, query and point counts whose products overflow 64 bits (or exceed what a buffer can hold) are refused
    before any loop runs: a product that wrapped around could otherwise match a buffer's length."""
    call = next(c for c in CALLS if c.name == "occupied_labels")
    with pytest.raises(ValueError):
        kernel.occupied_labels(*call.args[:8], *sizes, *call.args[12:])
    grid = (2**31 - 1,) * 3  # the grid's cells overflow 64 bits too
    with pytest.raises(ValueError, match="bad sizes"):
        kernel.occupied_labels(*call.args[:12], *grid, *call.args[15:])


def test_wrappers_copy_unaligned_arrays_instead_of_refusing_them():
    """The Python side hands the kernel aligned arrays: an unaligned one is copied (or, for the geometry, left to
    the Python floats), so the frame path never meets the kernel's alignment error."""
    rng = np.random.default_rng(1)
    labels = np.where(rng.random((6, 5, 4)) < 0.3, 2, 0).astype(np.uint8)
    best = rng.random((6, 5, 4), dtype=np.float32)
    origin, rgb = np.array([0.1, 0.2, -0.3]), np.arange(256, dtype=np.uint32)
    ids, words, finite = native_postprocess.dense_cloud(labels, _unaligned(best), origin, 0.08, rgb)
    want = native_postprocess.dense_cloud(labels, best, origin, 0.08, rgb)
    assert np.array_equal(ids, want[0]) and words.tobytes() == want[1].tobytes() and finite == want[2]
    pose, k = np.eye(4), np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]])
    assert native_postprocess.rigid_pose(_unaligned(pose), 1e-3, 1e4) is False  # left to check_pose
    assert native_postprocess.rigid_pose(pose, 1e-3, 1e4) is True
    assert native_postprocess.grid_geometry(_unaligned(k), pose, (240, 320), (192, 256), 0.08, (60, 60, 36), None,
                                            0.0, 1.0) is None
