"""RVL, the lossless depth codec of compressed_depth_image_transport's ``rvl`` format (Iron, Jazzy).

Wilson's "Fast Lossless Depth Image Compression" as that package's ``rvl_codec.cpp`` writes it: the
uint16 pixels in row order as alternating runs, each run a count of zero pixels, a count of non-zero
pixels, then those pixels as differences to the previous non-zero pixel (zig-zag signed, the previous
value carried across runs, starting at 0). Every number is a variable-length code of 3-bit groups,
least significant first, one per 4-bit nibble whose high bit says "more follows"; the nibbles fill
32-bit little-endian words from their most significant end, the last word padded with zero nibbles.
The codec's own payload starts with the image's width and height (uint32 each).

Both directions are vectorised with numpy except the walk from one run header to the next (one
Python step per run, each an index into a flat list of numbers).
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import DepthError

SIZE = struct.Struct("<II")  # cols, rows: the start of the codec's payload
_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)  # a word's nibbles, first one in its top bits
_MAX_NIBBLES = 11  # a 32-bit number in 3-bit groups


def decode(payload: bytes | np.ndarray, max_pixels: int) -> np.ndarray:
    """The codec's payload (width, height, RVL words) -> (H, W) uint16; DepthError for a size above
    ``max_pixels``, a payload that ends before the image does, or runs that overrun it."""
    buf = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload.view(np.uint8)
    if buf.size < SIZE.size:
        raise DepthError(f"rvl depth image has only {buf.size} bytes, less than its size header")
    cols, rows = SIZE.unpack(buf[:SIZE.size].tobytes())
    pixels = cols * rows
    # No pixels-per-byte limit: compressed_depth_image_transport applies its 5 px/byte check to 32FC1 only, and
    # RVL codes a run of zeros in one number, so sparse depth legitimately exceeds any ratio. A corrupt size is
    # caught below: the runs must cover exactly the claimed pixels before the output is allocated.
    if pixels == 0 or pixels > max_pixels:
        raise DepthError(f"rvl depth image claims {cols}x{rows} pixels in {buf.size} bytes (this reader refuses an "
                         f"empty image and more than {max_pixels} pixels): the data is corrupt or the image too large")
    words = np.frombuffer(buf[SIZE.size:].tobytes(), "<u4", count=(buf.size - SIZE.size) // 4)
    numbers = _numbers(words)
    heads = _run_heads(memoryview(numbers), pixels)
    zeros, nonzeros = numbers[heads], numbers[heads + 1]
    inside = np.zeros(numbers.size + 1, np.int64)  # +1 where a run's differences start, -1 one past them
    np.add.at(inside, heads + 2, 1)
    np.add.at(inside, heads + 2 + nonzeros, -1)
    zigzag = numbers[np.cumsum(inside[:-1]) > 0]
    deltas = (zigzag >> 1) ^ -(zigzag & 1)
    values = np.cumsum(deltas) & 0xFFFF  # unsigned short arithmetic, as the decoder's
    # pixel index of each value: its run's first non-zero pixel plus its place in the run. Every array but
    # ``out`` is as long as the payload's numbers, and np.zeros maps zero pages lazily, so a few bytes claiming
    # a large, almost empty image cost little until its pixels are read.
    first = np.cumsum(zeros + nonzeros) - nonzeros
    before = np.cumsum(nonzeros) - nonzeros  # values of the runs before each
    out = np.zeros(pixels, np.uint16)
    out[np.repeat(first - before, nonzeros) + np.arange(values.size)] = values
    return out.reshape(rows, cols)


def _numbers(words: np.ndarray) -> np.ndarray:
    """The variable-length numbers of a word stream (int64; a last unfinished one is dropped)."""
    nibbles = ((words[:, None] >> _SHIFTS) & 0xF).astype(np.int64).ravel()
    ends = np.flatnonzero((nibbles & 8) == 0)
    if ends.size == 0:
        return np.zeros(0, np.int64)
    nibbles = nibbles[: ends[-1] + 1]
    starts = np.r_[0, ends[:-1] + 1]
    place = np.arange(nibbles.size) - np.repeat(starts, ends - starts + 1)  # 3-bit group of each nibble
    if place.max() >= _MAX_NIBBLES:
        raise DepthError("rvl depth data holds a number longer than 32 bits: the data is corrupt")
    return np.add.reduceat((nibbles & 7) << (3 * place), starts)


def _run_heads(numbers: memoryview, pixels: int) -> np.ndarray:
    """Index of each run's zero count in ``numbers``: a walk of one step per run."""
    heads, index, filled, count = [], 0, 0, len(numbers)
    while filled < pixels:
        if index + 1 >= count:
            raise DepthError(f"rvl depth data ends after {filled} of {pixels} pixels")
        heads.append(index)
        filled += numbers[index] + numbers[index + 1]
        index += 2 + numbers[index + 1]
    if filled != pixels:
        raise DepthError(f"rvl depth runs cover {filled} pixels of a {pixels}-pixel image: the data is corrupt")
    if index > count:
        raise DepthError(f"rvl depth data ends inside its last run ({count} of {index} numbers): it is truncated")
    return np.asarray(heads, np.int64)


def encode(image: np.ndarray) -> bytes:
    """(H, W) uint16 -> the codec's payload: width, height, then the RVL words (as CompressRVL writes them)."""
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint16:
        raise ValueError(f"rvl encodes (H, W) uint16 images, got {image.shape} {image.dtype}")
    flat = image.ravel()
    nonzero = flat != 0
    edges = np.r_[0, np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1, flat.size]
    runs = np.diff(edges)
    if flat.size and nonzero[0]:
        runs = np.r_[0, runs]  # every run starts with its zero count
    if runs.size % 2:
        runs = np.r_[runs, 0]  # trailing zeros: a last run without non-zero pixels
    zeros, nonzeros = runs[0::2], runs[1::2]
    values = flat[nonzero].astype(np.int64)
    deltas = values - np.r_[0, values[:-1]]
    zigzag = (deltas << 1) ^ (deltas >> 63)
    numbers = np.empty(2 * zeros.size + zigzag.size, np.int64)
    heads = 2 * np.arange(zeros.size) + np.r_[0, np.cumsum(nonzeros)[:-1]]
    numbers[heads], numbers[heads + 1] = zeros, nonzeros
    is_delta = np.ones(numbers.size, bool)
    is_delta[heads], is_delta[heads + 1] = False, False
    numbers[is_delta] = zigzag
    groups = (numbers[:, None] >> (3 * np.arange(_MAX_NIBBLES))) & 7
    more = (numbers[:, None] >> (3 * np.arange(1, _MAX_NIBBLES + 1))) != 0
    used = np.c_[np.ones((numbers.size, 1), bool), more[:, :-1]]
    nibbles = (groups | (more << 3))[used]
    nibbles = np.r_[nibbles, np.zeros(-nibbles.size % 8, np.int64)].reshape(-1, 8)
    words = (nibbles << _SHIFTS.astype(np.int64)).sum(axis=1).astype("<u4")
    return SIZE.pack(image.shape[1], image.shape[0]) + words.tobytes()
