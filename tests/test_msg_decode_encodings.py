"""Raw Image encodings that cv_bridge converts (YUV, Bayer, 16-bit colour/grey), decoded without it: each must give
the bytes cv_bridge's ``imgmsg_to_cv2(msg, "rgb8")`` gives, i.e. cv2.cvtColor with the code of cv_bridge's
conversion table, then 16 -> 8 bits rounded as its convertTo(255/65535) rounds; the numpy fallback (cv2 hidden)
the same bytes. Messages are built from the real Humble and Jazzy definitions."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_decode, msg_encode
from discene_ros.errors import ImageSizeError, UnsupportedEncodingError
from discene_ros.msg_factory import TypestoreFactory

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is a dependency; the references are cv2's")

STAMP = 1_700_000_000_123_456_789
# cv_bridge's getConversionCodes (src/cv_bridge.cpp), written out here independently of msg_decode's table
BRIDGE_CODES = {
    "yuv422": cv2.COLOR_YUV2RGB_UYVY, "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2,
    "bayer_rggb": cv2.COLOR_BayerBG2RGB, "bayer_bggr": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg": cv2.COLOR_BayerGR2RGB, "bayer_grbg": cv2.COLOR_BayerGB2RGB,
}
WIDE = {"rgb16": [0, 1, 2], "bgr16": [2, 1, 0], "rgba16": [0, 1, 2], "bgra16": [2, 1, 0], "mono16": [0, 0, 0]}
CHANNELS = {"rgb16": 3, "bgr16": 3, "rgba16": 4, "bgra16": 4, "mono16": 1}


@pytest.fixture(params=[Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY], ids=["humble", "jazzy"], scope="module")
def factory(request):
    return TypestoreFactory(get_typestore(request.param))


@pytest.fixture(params=["cv2", "numpy"])
def decoder(request, monkeypatch) -> str:
    """Each decoder of the converted encodings: cv2, and numpy with cv2 hidden (a replay without OpenCV)."""
    if request.param == "numpy":
        monkeypatch.setattr(msg_decode, "opencv", lambda: None)
    return request.param


def _image(factory, rows: np.ndarray, encoding: str, height: int, width: int, pad: int = 0, bigendian=False):
    """An Image whose data is ``rows`` (R, row_bytes) uint8, each row followed by ``pad`` bytes of 0xEE."""
    padded = np.full((rows.shape[0], rows.shape[1] + pad), 0xEE, np.uint8)
    padded[:, : rows.shape[1]] = rows
    return factory.new("sensor_msgs/msg/Image", header=msg_encode.make_header(factory, STAMP, "cam"), height=height,
                       width=width, encoding=encoding, is_bigendian=bigendian, step=padded.shape[1],
                       data=factory.uint8_array(padded))


def _bytes(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _to_8bit(wide: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) in exact integers (no ties exist: v * 255 / 65535 = v / 257)."""
    return ((wide.astype(np.int64) * 510 + 65535) // 131070).astype(np.uint8)


def _all_yuv_pairs() -> np.ndarray:
    """(256, 256, 4) pixel pairs holding every (U, V) combination with every Y value among them, both orders of
    the bytes laid out as YUYV; with the random rows this reaches the clipping at 0 and 255 in every channel."""
    u, v = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    return np.stack([(u + v) % 256, u, (3 * u + 5 * v + 7) % 256, v], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("encoding", ["yuv422", "yuv422_yuy2", "uyvy", "yuyv", "YUV422_YUY2"])
@pytest.mark.parametrize("pad", [0, 3])
def test_yuv422_matches_cv2(factory, decoder, encoding, pad):
    pairs = np.concatenate([_all_yuv_pairs(), _bytes((8, 256, 4))])  # 264 rows of 512 pixels
    if encoding.lower() in ("yuv422", "uyvy"):
        pairs = pairs[..., [1, 0, 3, 2]]  # U Y0 V Y1
    h, w = pairs.shape[0], pairs.shape[1] * 2
    code = BRIDGE_CODES["yuv422" if encoding.lower() in ("yuv422", "uyvy") else "yuv422_yuy2"]
    expected = cv2.cvtColor(np.ascontiguousarray(pairs).reshape(h, w, 2), code)
    out = msg_decode.image_to_rgb(_image(factory, pairs.reshape(h, -1), encoding, h, w, pad))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("pad", [0, 5])
def test_nv21_matches_cv2(factory, decoder, pad):
    h, w = 64, 96
    planes = _bytes((h * 3 // 2, w), seed=1)  # Y rows, then h/2 rows of V,U pairs
    planes[:16] = np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(6, axis=1)  # every Y value
    planes[h:h + 16, 0::2] = np.arange(256).reshape(16, 16).repeat(3, axis=1)  # every V and U value
    planes[h:h + 16, 1::2] = (np.arange(256).reshape(16, 16).repeat(3, axis=1) * 7) % 256
    expected = cv2.cvtColor(planes, cv2.COLOR_YUV2RGB_NV21)
    out = msg_decode.image_to_rgb(_image(factory, planes, "nv21", h, w, pad))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("pad", [0, 2])
def test_nv24_matches_cv2s_yuv_rule(factory, decoder, pad):
    """nv24 (4:4:4: a Y plane, then a U,V plane of rows twice as long) by the rule OpenCV applies to the other YUV
    encodings (it has no nv24 code): each pixel as cv2 converts a YUYV pair (Y, U, Y, V) whose chroma is its own."""
    h, w = 32, 40
    luma, chroma = _bytes((h, w), seed=2), _bytes((h, 2 * w), seed=3)
    luma[:, :8] = np.arange(256, dtype=np.uint8).reshape(32, 8)  # every Y value
    pairs = np.stack([luma, chroma[:, 0::2], luma, chroma[:, 1::2]], axis=-1)  # (h, w, 4): one pair per pixel
    expected = cv2.cvtColor(pairs.reshape(h, 2 * w, 2), cv2.COLOR_YUV2RGB_YUY2)[:, 0::2]
    msg = _image(factory, np.zeros((h, w), np.uint8), "nv24", h, w)  # size fields; data laid out below
    step = w + pad
    data = np.full(3 * step * h, 0xEE, np.uint8)
    data[: step * h].reshape(h, step)[:, :w] = luma
    data[step * h:].reshape(h, 2 * step)[:, : 2 * w] = chroma
    msg.step, msg.data = step, factory.uint8_array(data)
    np.testing.assert_array_equal(msg_decode.image_to_rgb(msg), expected)


@pytest.mark.parametrize("encoding", list(WIDE))
@pytest.mark.parametrize(("pad", "bigendian"), [(0, False), (3, False), (0, True)])
def test_16bit_colour_and_grey_scaled_as_cv_bridge(factory, decoder, encoding, pad, bigendian):
    channels = CHANNELS[encoding]
    wide = (np.arange(65536 * channels) % 65536).astype(np.uint16).reshape(128, 512, channels)  # every value
    rows = wide.astype(">u2" if bigendian else "<u2").reshape(128, -1).view(np.uint8)
    out = msg_decode.image_to_rgb(_image(factory, rows, encoding, 128, 512, pad, bigendian))
    assert out.shape == (128, 512, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _to_8bit(wide[..., WIDE[encoding]]))
    if encoding == "mono16":  # against cv_bridge's convertTo(CV_8U, 255/65535) itself: NORM_MINMAX over 0..65535
        np.testing.assert_array_equal(out[..., 0], cv2.normalize(wide[..., 0], None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U))


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_matches_cv_bridge_codes(factory, pattern, bits):
    h, w = 31, 46  # odd height: cv2 demosaics any size
    raw = np.random.default_rng(4).integers(0, 1 << bits, (h, w)).astype(np.uint8 if bits == 8 else np.uint16)
    expected = cv2.cvtColor(raw, BRIDGE_CODES[f"bayer_{pattern}"])
    if bits == 16:
        expected = _to_8bit(expected)
    msg = _image(factory, raw.astype("<u2" if bits == 16 else np.uint8).view(np.uint8), f"bayer_{pattern}{bits}",
                 h, w, pad=1)
    np.testing.assert_array_equal(msg_decode.image_to_rgb(msg), expected)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_pattern_names_give_the_right_colours(factory, pattern):
    """A flat colour sampled through the named mosaic comes back as that colour (away from the border): the
    pattern letters are the top-left 2x2 block row by row, which OpenCV names by the second row's 2nd and 3rd pixels."""
    colour = {"r": 200, "g": 120, "b": 40}
    h, w = 8, 10
    raw = np.zeros((h, w), np.uint8)
    for i, letter in enumerate(pattern):
        raw[i // 2::2, i % 2::2] = colour[letter]
    out = msg_decode.image_to_rgb(_image(factory, raw, f"bayer_{pattern}8", h, w))
    np.testing.assert_array_equal(out[2:-2, 2:-2].reshape(-1, 3), np.tile([200, 120, 40], ((h - 4) * (w - 4), 1)))


def test_bayer_without_cv2_is_refused_clearly(factory, monkeypatch):
    monkeypatch.setattr(msg_decode, "opencv", lambda: None)
    with pytest.raises(UnsupportedEncodingError, match="needs cv2.*demosaic"):
        msg_decode.image_to_rgb(_image(factory, _bytes((4, 6)), "bayer_rggb8", 4, 6))


@pytest.mark.parametrize(("encoding", "height", "width", "row_bytes", "rows", "message"), [
    ("yuv422_yuy2", 4, 5, 10, 4, "width 5 is odd"),
    ("yuv422", 4, 7, 14, 4, "width 7 is odd"),
    ("nv21", 4, 5, 5, 6, "width 5 is odd"),
    ("nv21", 5, 6, 6, 8, "height 5 is odd"),
    ("nv21", 4, 6, 6, 5, "expected step\\*height \\+ the chroma plane = 6\\*4 \\+ 6\\*2 = 36"),
    ("nv24", 4, 6, 6, 11, "6\\*4 \\+ 12\\*4 = 72"),
    ("yuv422_yuy2", 4, 6, 12, 3, "expected step\\*height"),
    ("rgb16", 2, 3, 18, 1, "expected step\\*height"),
    ("bayer_grbg16", 2, 3, 6, 1, "expected step\\*height"),
])
def test_bad_sizes_are_refused(factory, decoder, encoding, height, width, row_bytes, rows, message):
    with pytest.raises(ImageSizeError, match=message):
        msg_decode.image_to_rgb(_image(factory, np.zeros((rows, row_bytes), np.uint8), encoding, height, width))


@pytest.mark.parametrize("encoding", ["yuv422_yuy2", "nv21", "nv24", "mono16"])
def test_step_shorter_than_a_row_is_refused(factory, encoding):
    msg = _image(factory, np.zeros((12, 8), np.uint8), encoding, 4, 8)
    msg.step = 7
    with pytest.raises(ImageSizeError, match="step 7 is smaller"):
        msg_decode.image_to_rgb(msg)


class _RefusingBridge:
    def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
        raise TypeError(f"fake cv_bridge asked for {msg.encoding}")


def test_converted_encodings_do_not_use_cv_bridge_but_others_still_do(factory, monkeypatch):
    """With cv_bridge installed (a robot), the encodings decoded here still are (no CvBridge per frame, the same
    bytes as a replay without ROS); anything else still goes to cv_bridge."""
    monkeypatch.setitem(sys.modules, "cv_bridge", types.SimpleNamespace(CvBridge=_RefusingBridge))
    pairs = _bytes((4, 3, 4))
    assert msg_decode.image_to_rgb(_image(factory, pairs.reshape(4, -1), "yuv422_yuy2", 4, 6)).shape == (4, 6, 3)
    with pytest.raises(UnsupportedEncodingError, match="fake cv_bridge asked for 8UC3"):
        msg_decode.image_to_rgb(_image(factory, _bytes((4, 18)), "8UC3", 4, 6))


def test_unknown_encoding_without_cv_bridge_lists_what_is_supported(factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv_bridge", None)  # import fails as where it is not installed
    with pytest.raises(UnsupportedEncodingError, match="needs cv_bridge.*mono16.*yuv422_yuy2.*nv21.*bayer_rggb8.*with cv2"):
        msg_decode.image_to_rgb(_image(factory, _bytes((4, 18)), "8UC3", 4, 6))
