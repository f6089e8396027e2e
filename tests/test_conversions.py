"""Conversions against the real ROS 2 message definitions of the rosbags typestore (Humble and Jazzy)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_decode, msg_encode, rvl
from discene_ros.errors import (
    CameraInfoError,
    CloudFormatError,
    DecodeError,
    DepthError,
    FrameError,
    ImageSizeError,
    TransformError,
    UnsupportedEncodingError,
)
from discene_ros.msg_factory import TypestoreFactory
from models.classes import CLASS_COLORS

STAMP = 1_700_000_000_123_456_789


@pytest.fixture(params=[Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY], ids=["humble", "jazzy"], scope="module")
def factory(request):
    return TypestoreFactory(get_typestore(request.param))


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _raw_image(factory, pixels, encoding, step_pad=0, bigendian=False):
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8)
    padded = np.zeros((h, row.shape[1] + step_pad), np.uint8)
    padded[:, : row.shape[1]] = row
    return factory.new("sensor_msgs/msg/Image", header=msg_encode.make_header(factory, STAMP, "cam"), height=h, width=w,
                       encoding=encoding, is_bigendian=bigendian, step=padded.shape[1],
                       data=factory.uint8_array(padded))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
@pytest.mark.parametrize("pad", [0, 3])
def test_image_encodings_round_trip(factory, encoding, pad):
    rgb = _rgb()
    msg = msg_encode.rgb_to_image(factory, rgb, "cam", STAMP, encoding)
    if pad:  # same pixels with padded rows: step must be honoured
        h, w = rgb.shape[:2]
        channels = msg.step // w
        msg = _raw_image(factory, np.asarray(msg.data).reshape(h, w, channels), encoding, step_pad=pad)
    out = msg_decode.image_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    expected = np.repeat(rgb.mean(-1).round().astype(np.uint8)[..., None], 3, -1) if encoding == "mono8" else rgb
    np.testing.assert_array_equal(out, expected)
    assert np.shares_memory(out, msg.data), "common encodings must be decoded without copying"


def test_image_bad_inputs(factory):
    rgb = _rgb()
    msg = msg_encode.rgb_to_image(factory, rgb, "cam", STAMP)
    msg.step = 5  # smaller than width*3
    with pytest.raises(ImageSizeError, match="step"):
        msg_decode.image_to_rgb(msg)
    msg = msg_encode.rgb_to_image(factory, rgb, "cam", STAMP)
    msg.data = msg.data[:-1]
    with pytest.raises(ImageSizeError, match="bytes"):
        msg_decode.image_to_rgb(msg)
    msg = msg_encode.rgb_to_image(factory, rgb, "cam", STAMP)
    msg.encoding = "8UC3"  # no cv_bridge on this machine
    with pytest.raises(UnsupportedEncodingError, match="cv_bridge"):
        msg_decode.image_to_rgb(msg)
    msg.width = 0
    msg.encoding = "rgb8"
    with pytest.raises(ImageSizeError):
        msg_decode.image_to_rgb(msg)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_images(factory, fmt, image_decoder):
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = (200, 30, 40)
    rgb[:, 16:] = (10, 220, 90)
    msg = msg_encode.rgb_to_compressed(factory, rgb, "cam", STAMP, fmt)
    out = msg_decode.any_image_to_rgb(msg)
    assert out.shape == rgb.shape
    err = np.abs(out.astype(int) - rgb.astype(int)).max(-1)
    if fmt == "png":
        assert err.max() == 0
    else:  # lossy: exact colours away from the edge, where chroma upsampling blends the two halves
        assert err[:, :14].max() <= 4 and err[:, 18:].max() <= 4


def test_compressed_bad_inputs(factory, image_decoder):
    good = msg_encode.rgb_to_compressed(factory, _rgb(8, 8), "cam", STAMP, "jpeg")
    truncated = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format="jpeg",
                            data=good.data[: len(good.data) // 3])
    with pytest.raises(DecodeError, match="truncated"):
        msg_decode.compressed_to_rgb(truncated)
    no_end = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format="jpeg", data=good.data[:-2])
    with pytest.raises(DecodeError, match="end-of-image"):
        msg_decode.compressed_to_rgb(no_end)
    padded = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format="jpeg",
                         data=factory.uint8_array(bytes(good.data) + bytes(16)))  # zero padding after the marker
    assert msg_decode.compressed_to_rgb(padded).shape == (8, 8, 3)
    cut_body = bytes(good.data)[: len(good.data) // 2] + b"\xff\xd9"  # cut, with an end marker after the cut
    with pytest.raises(DecodeError):
        msg_decode.compressed_to_rgb(factory.new("sensor_msgs/msg/CompressedImage", header=good.header,
                                                 format="jpeg", data=factory.uint8_array(cut_body)))
    png = bytes(msg_encode.rgb_to_compressed(factory, _rgb(8, 8), "cam", STAMP, "png").data)
    for cut in (png[:-1], png[: len(png) // 2]):  # the IEND chunk cut off: refused before any decoder sees it
        with pytest.raises(DecodeError, match="no PNG IEND chunk"):
            msg_decode.compressed_to_rgb(factory.new("sensor_msgs/msg/CompressedImage", header=good.header,
                                                     format="png", data=factory.uint8_array(cut)))
    trailing = png + bytes(16)  # bytes after IEND, which decoders ignore
    assert msg_decode.compressed_to_rgb(factory.new("sensor_msgs/msg/CompressedImage", header=good.header,
                                                    format="png", data=factory.uint8_array(trailing))).shape == (8, 8, 3)
    garbage = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format="jpeg",
                          data=factory.uint8_array(b"not an image at all"))
    with pytest.raises(UnsupportedEncodingError, match="neither JPEG nor PNG"):
        msg_decode.compressed_to_rgb(garbage)
    depth = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format="16UC1; compressedDepth png",
                        data=good.data)
    with pytest.raises(UnsupportedEncodingError, match="depth"):
        msg_decode.compressed_to_rgb(depth)


def _png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of (H, W) or (H, W, C) uint16 ``samples`` written chunk by chunk (PIL writes no 16-bit
    colour): colour type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[r].astype(">u2").tobytes() for r in range(h))
    return (msg_decode.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("color_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)], ids=["grey", "rgb", "la", "rgba"])
def test_16bit_png_keeps_the_high_byte_with_either_decoder(factory, image_decoder, color_type, channels):
    """compressed_image_transport's "mono16; png compressed": cv2's IMREAD_COLOR keeps each sample's high byte
    (v >> 8) and drops alpha; the PIL fallback gives the same pixels (it clipped 16-bit grey at 255)."""
    samples = np.random.default_rng(4).integers(0, 65536, (16, 16, channels)).astype(np.uint16)
    samples[0, :4, 0] = [1000, 20000, 40000, 65535]
    msg = factory.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(factory, STAMP, "cam"),
                      format="mono16; png compressed ",
                      data=factory.uint8_array(_png16(samples.squeeze(-1) if channels == 1 else samples, color_type)))
    colour = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=-1)
    out = msg_decode.compressed_to_rgb(msg)
    np.testing.assert_array_equal(out, (colour >> 8).astype(np.uint8))
    assert out[0, :4, 0].tolist() == [3, 78, 156, 255]


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_jpeg_padding_after_its_end_marker_is_ignored(factory, image_decoder, fill):
    """Hardware encoders pad a frame to their DMA block after EOI; cv::imdecode (compressed_image_transport)
    stops at EOI. A JPEG cut mid-scan is still refused, padded or not."""
    good = bytes(msg_encode.rgb_to_compressed(factory, _rgb(48, 64, seed=2), "cam", STAMP, "jpeg").data)

    def decode(data: bytes) -> np.ndarray:
        return msg_decode.compressed_to_rgb(factory.new(
            "sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(factory, STAMP, "cam"),
            format="rgb8; jpeg compressed bgr8", data=factory.uint8_array(data)))

    expected = decode(good)
    for pad in (100, 512, 5000):  # also more than one block of the padding search
        np.testing.assert_array_equal(decode(good + fill * pad), expected)
    cut = good[: len(good) // 2]  # mid-scan
    for data in (cut, cut + fill * 512, cut + b"\x00" * 300 + b"\xff" * 300):
        with pytest.raises(DecodeError, match="no JPEG end-of-image marker"):
            decode(data)


@pytest.mark.parametrize("bigendian", [False, True])
def test_depth_16uc1_and_32fc1(factory, bigendian):
    mm = np.array([[0, 1000, 2500], [65535, 1, 3000]], dtype=np.uint16)
    msg = _raw_image(factory, mm.astype(">u2" if bigendian else "<u2")[..., None], "16UC1", bigendian=bigendian)
    np.testing.assert_allclose(msg_decode.depth_to_metres(msg), mm.astype(np.float32) / 1000.0, rtol=1e-6)
    metres = np.array([[np.nan, 1.5, np.inf], [-1.0, 0.0, 2.25]], dtype=np.float32)
    msg = _raw_image(factory, metres.astype(">f4" if bigendian else "<f4")[..., None], "32FC1", step_pad=4,
                     bigendian=bigendian)
    out = msg_decode.depth_to_metres(msg)
    np.testing.assert_array_equal(out, [[0, 1.5, 0], [0, 0, 2.25]])


def test_depth_bad_inputs(factory):
    msg = msg_encode.depth_to_image(factory, np.full((2, 3), np.nan), "cam", STAMP, "32FC1")
    with pytest.raises(DepthError, match="no valid pixel"):
        msg_decode.depth_to_metres(msg)
    msg = msg_encode.rgb_to_image(factory, _rgb(2, 3), "cam", STAMP)
    with pytest.raises(DepthError, match="rgb8"):
        msg_decode.depth_to_metres(msg)
    # builders round trip
    depth = np.array([[0.5, 0.0], [1.234, 3.0]])
    np.testing.assert_allclose(msg_decode.depth_to_metres(msg_encode.depth_to_image(factory, depth, "c", STAMP)), depth, atol=5e-4)
    np.testing.assert_allclose(msg_decode.depth_to_metres(msg_encode.depth_to_image(factory, depth, "c", STAMP, "32FC1")), depth,
                               rtol=1e-6)


def _compressed_depth(factory, pixels: np.ndarray, fmt: str, quant_a: float = 0.0, quant_b: float = 0.0) -> object:
    """A compressedDepth message built by hand: the 12-byte ConfigHeader, then a 16-bit PNG of ``pixels``."""
    out = io.BytesIO()
    PILImage.fromarray(pixels.astype(np.uint16)).save(out, format="PNG")
    data = struct.pack("<iff", 0, quant_a, quant_b) + out.getvalue()
    return factory.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(factory, STAMP, "cam"),
                       format=fmt, data=factory.uint8_array(data))


@pytest.mark.parametrize("fmt", ["{}; compressedDepth", "{}; compressedDepth png"])  # Humble's, then Jazzy's
def test_compressed_depth_is_decoded_as_compressed_depth_image_transport_does(factory, image_decoder, fmt):
    mm = np.array([[0, 1000, 2500], [65535, 1, 3000]], dtype=np.uint16)
    out = msg_decode.depth_to_metres(_compressed_depth(factory, mm, fmt.format("16UC1")))
    np.testing.assert_allclose(out, mm.astype(np.float32) / 1000.0, rtol=1e-6)
    # 32FC1: quantised inverse depth, codec.cpp's depthQuantA / (v - depthQuantB), 0 invalid; its defaults
    # depth_quantization 100 and depth_max 10 m give depthQuantA = 100 * 101 and depthQuantB = 1 - 10100 / 10
    inv = np.array([[0, 300, 1000], [65535, 1, 2]], dtype=np.uint16)
    out = msg_decode.depth_to_metres(_compressed_depth(factory, inv, fmt.format("32FC1"), 10100.0, -1009.0))
    expected = [[0.0, 10100 / 1309, 10100 / 2009], [10100 / 66544, 10100 / 1010, 10100 / 1011]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # the encoder here (as compressed_depth_image_transport's, for bags and tests) round-trips within its
    # quantisation: 1 mm for 16UC1, d^2 / 10100 for 32FC1; beyond depth_max (10 m) is invalid
    depth = np.array([[0.3, 1.0, 4.0], [7.5, np.nan, 12.0]])
    back16 = msg_decode.depth_to_metres(msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, "16UC1"))
    back32 = msg_decode.depth_to_metres(msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, "32FC1"))
    valid = np.isfinite(depth) & (depth < 10.0)
    assert np.abs(back16 - np.nan_to_num(depth))[valid].max() <= 5e-4 and (back16[~valid] == 0).all()
    assert (np.abs(back32 - np.nan_to_num(depth)) <= depth**2 / 10100 + 1e-6)[valid].all() and (back32[~valid] == 0).all()


def test_compressed_depth_bad_inputs(factory):
    mm = np.full((2, 3), 1500, np.uint16)
    for fmt in ("png", "16UC1; compressedDepth zstd", "16UC1; compressedDepthpng"):
        with pytest.raises(DepthError, match="not image_transport's compressedDepth with png or rvl"):
            msg_decode.depth_to_metres(_compressed_depth(factory, mm, fmt))
    with pytest.raises(DepthError, match="claims"):  # a PNG where the format says rvl: its bytes as a size
        msg_decode.depth_to_metres(_compressed_depth(factory, mm, "16UC1; compressedDepth rvl"))
    with pytest.raises(DepthError, match="encoding 'mono8' is not supported"):
        msg_decode.depth_to_metres(_compressed_depth(factory, mm, "mono8; compressedDepth"))
    good = _compressed_depth(factory, mm, "16UC1; compressedDepth")
    cut = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format=good.format,
                      data=factory.uint8_array(bytes(good.data)[:-20]))
    with pytest.raises(DepthError, match="truncated"):
        msg_decode.depth_to_metres(cut)
    headless = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format=good.format,
                           data=factory.uint8_array(bytes(good.data)[12:]))  # the PNG without its ConfigHeader
    with pytest.raises(DepthError, match="no PNG after its 12-byte header"):
        msg_decode.depth_to_metres(headless)
    colour = msg_encode.rgb_to_compressed(factory, _rgb(2, 3), "cam", STAMP, "png")
    eight_bit = factory.new("sensor_msgs/msg/CompressedImage", header=good.header, format=good.format,
                            data=factory.uint8_array(bytes(12) + bytes(colour.data)))
    with pytest.raises(DepthError, match="not a single-channel 16-bit"):
        msg_decode.depth_to_metres(eight_bit)
    with pytest.raises(DepthError, match="no valid pixel"):
        msg_decode.depth_to_metres(_compressed_depth(factory, np.zeros((2, 3)), "16UC1; compressedDepth"))


# Words of rvl_codec.cpp's CompressRVL worked out by hand: [0, 0, 5, 5, 0] is zeros 2, non-zeros 2, the
# differences 5 (zig-zag 10: nibbles 0xA, 0x1) and 0 (0x0), then zeros 1, non-zeros 0: nibbles 2 2 A 1 0 1 0,
# padded to 0x22A10100, a little-endian int32. [5, 3]: zeros 0, non-zeros 2, 5 (A 1), -2 (zig-zag 3): 0x02A13000.
RVL_BY_HAND = [([[0, 0, 5, 5, 0]], "0001a122"), ([[5, 3]], "0030a102")]


@pytest.mark.parametrize("pixels, words", RVL_BY_HAND)
def test_rvl_words_match_the_codec_worked_by_hand(pixels, words):
    image = np.array(pixels, np.uint16)
    payload = rvl.encode(image)
    assert payload[:8] == struct.pack("<II", image.shape[1], image.shape[0]) and payload[8:].hex() == words
    np.testing.assert_array_equal(rvl.decode(payload, 100), image)


def test_rvl_round_trips_and_refuses_damage():
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        image = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        image[rng.random((h, w)) < rng.uniform(0.0, 0.8)] = 0
        np.testing.assert_array_equal(rvl.decode(rvl.encode(image), 10**6), image)
    yy, xx = np.mgrid[0:48, 0:64]
    depth = (1500 + 800 * np.sin(xx / 5.0)).astype(np.uint16)
    depth[10:20, 30:40] = 0
    payload = rvl.encode(depth)
    for cut in (1, 5, 40):
        with pytest.raises(DepthError, match="ends (after|inside)"):
            rvl.decode(payload[:-cut], 10**6)
    with pytest.raises(DepthError, match="claims 64x48 pixels"):
        rvl.decode(payload, 1000)  # over the reader's pixel limit
    overrun = struct.pack("<II", 32, 48) + payload[8:]  # the same runs for an image of half the size
    with pytest.raises(DepthError, match="runs cover"):
        rvl.decode(overrun, 10**6)


def _rvl_words(numbers: list[int]) -> bytes:
    """RVL words of a list of numbers, coded by hand (3-bit groups, high nibble bit "more follows")."""
    nibbles = []
    for n in numbers:
        while True:
            nibbles.append((n & 7) | (8 if n >> 3 else 0))
            n >>= 3
            if not n:
                break
    nibbles += [0] * (-len(nibbles) % 8)
    return b"".join(struct.pack("<I", sum(v << (28 - 4 * j) for j, v in enumerate(nibbles[i:i + 8])))
                    for i in range(0, len(nibbles), 8))


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_rvl_sparse_depth_decodes(factory, encoding):
    """Mostly invalid depth (10 % valid, far above the 5 pixels per byte the codec checks for 32FC1 only):
    RVL codes each zero run in one number, and compressed_depth_image_transport decodes 16UC1 of any ratio."""
    rng = np.random.default_rng(3)
    depth = 1.2 + 0.002 * np.mgrid[0:120, 0:160][0] + 0.0005 * rng.normal(size=(120, 160))
    depth[:108] = 0.0  # the upper 90 %: no return
    coded = msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, encoding, codec="rvl")
    assert depth.size > 8 * (len(coded.data) - 12)  # well above the codec's 32FC1 limit
    png = msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, encoding)
    back = msg_decode.depth_to_metres(coded)
    np.testing.assert_array_equal(back, msg_decode.depth_to_metres(png))
    assert (back[:108] == 0).all() and (back[108:] > 0).all()


def test_rvl_tiny_payload_claiming_a_large_image_is_refused(factory):
    """A few bytes claiming 4000x4000 pixels: refused when the runs do not cover them, before the output is
    allocated; runs that do (one run of zeros) make an image without a valid pixel, refused before a float copy."""
    size = struct.pack("<II", 4000, 4000)
    with pytest.raises(DepthError, match="ends after 1000 of 16000000 pixels"):
        rvl.decode(size + _rvl_words([1000, 0]), msg_decode.MAX_IMAGE_PIXELS)
    with pytest.raises(DepthError, match="runs cover 17000000 pixels of a 16000000-pixel image"):
        rvl.decode(size + _rvl_words([17_000_000, 0]), msg_decode.MAX_IMAGE_PIXELS)
    empty = factory.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(factory, STAMP, "cam"),
                        format="16UC1; compressedDepth rvl",
                        data=factory.uint8_array(bytes(12) + size + _rvl_words([16_000_000, 0])))
    with pytest.raises(DepthError, match="4000x4000 has no valid pixel"):
        msg_decode.depth_to_metres(empty)
    with pytest.raises(DepthError, match="claims 0x4000 pixels"):
        rvl.decode(struct.pack("<II", 0, 4000) + _rvl_words([0, 0]), msg_decode.MAX_IMAGE_PIXELS)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_rvl_compressed_depth_decodes_as_its_png_twin(factory, encoding):
    """Jazzy's "...; compressedDepth rvl": the same 12-byte ConfigHeader and pixels as the png codec."""
    depth = np.array([[0.3, 1.0, 4.0, 2.0], [7.5, np.nan, 12.0, 0.0], [1.1, 1.2, 1.3, 1.4]])
    png = msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, encoding)
    coded = msg_encode.depth_to_compressed_depth(factory, depth, "cam", STAMP, encoding, codec="rvl")
    assert coded.format == f"{encoding}; compressedDepth rvl" and bytes(coded.data[:12]) == bytes(png.data[:12])
    np.testing.assert_array_equal(msg_decode.depth_to_metres(coded), msg_decode.depth_to_metres(png))


def test_camera_info_k_rescaling(factory):
    k = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    info = msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", STAMP)
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info), k)
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640)), k)
    half = msg_decode.camera_info_to_k(info, (240, 320))
    np.testing.assert_allclose(half, [[250, 0, 160], [0, 255, 120], [0, 0, 1]])
    with pytest.raises(CameraInfoError, match="aspect"):
        msg_decode.camera_info_to_k(info, (480, 480))
    info.binning_x = info.binning_y = 2  # binned image of a 640x480 calibration
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (240, 320)), half)
    bad = msg_encode.k_to_camera_info(factory, np.zeros((3, 3)), 480, 640, "cam", STAMP)
    with pytest.raises(CameraInfoError, match="all zero: the camera is uncalibrated. Calibrate it"):
        msg_decode.camera_info_to_k(bad)
    bad.k = np.array([0.0, 0, 320, 0, 0, 240, 0, 0, 1])
    with pytest.raises(CameraInfoError, match="uncalibrated or invalid: fx=0.0"):
        msg_decode.camera_info_to_k(bad)
    nores = msg_encode.k_to_camera_info(factory, k, 0, 0, "cam", STAMP)
    with pytest.raises(CameraInfoError, match="resolution"):
        msg_decode.camera_info_to_k(nores, (480, 640))


def test_camera_info_roi_moves_the_principal_point_instead_of_scaling(factory):
    """A region of interest is a crop of the sensor: same focal lengths, principal point moved by the
    offset (image_geometry's rule). Scaling K to the crop's size, as for a resized image, would be wrong
    wherever the crop has the full image's aspect ratio."""
    k = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    info = msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", STAMP)
    full_key = msg_decode.camera_info_key(info)
    info.roi.x_offset, info.roi.y_offset, info.roi.width, info.roi.height = 160, 100, 320, 240
    assert msg_decode.camera_info_key(info) != full_key  # a cached K of the full image is not reused
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (240, 320)), [[500, 0, 160], [0, 510, 140], [0, 0, 1]])
    # the ROI decoded at half size (a reduced JPEG decode) scales from the ROI's own size
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (120, 160)), [[250, 0, 80], [0, 255, 70], [0, 0, 1]])
    info.binning_x = info.binning_y = 2  # the ROI is given in unbinned pixels; the image is 160x120
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (120, 160)), [[250, 0, 80], [0, 255, 70], [0, 0, 1]])
    info.binning_x = info.binning_y = 0
    info.roi.width = 0  # a zero size is the full image, whatever the offset says
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640)), k)
    info.roi.x_offset, info.roi.width = 400, 320  # 400 + 320 > 640
    with pytest.raises(CameraInfoError, match="does not lie in"):
        msg_decode.camera_info_to_k(info, (240, 320))


def test_rectified_images_take_their_intrinsics_from_p(factory):
    """sensor_msgs/CameraInfo: a rectified image's intrinsics are P[:3,:3], which may differ from K (the raw image's);
    the region of interest, binning and rescaling apply to P as to K (image_geometry), with the same checks."""
    k = np.array([[420.0, 0, 320], [0, 420, 240], [0, 0, 1]])
    info = msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", STAMP)
    info.d = np.array([-0.28, 0.07, 0.0, 0.0, 0.0])
    info.p = np.array([300.0, 0, 318, -30.0, 0, 330, 236, 0, 0, 0, 1, 0])  # Tx: a stereo pair's right camera
    p3 = np.array([[300.0, 0, 318], [0, 330, 236], [0, 0, 1]])
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640)), k)
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640), rectified=True), p3)
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (240, 320), rectified=True),
                               [[150, 0, 159], [0, 165, 118], [0, 0, 1]])
    key = msg_decode.camera_info_key(info)
    info.p = np.array([310.0, 0, 318, 0, 0, 330, 236, 0, 0, 0, 1, 0])
    assert msg_decode.camera_info_key(info) != key  # a cached K of another P is not reused
    info.p = np.array([300.0, 0, 318, 0, 0, 330, 236, 0, 0, 0, 1, 0])
    info.roi.x_offset, info.roi.y_offset, info.roi.width, info.roi.height = 160, 100, 320, 240
    info.binning_x = info.binning_y = 2  # the image is 160x120 of the ROI
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (120, 160), rectified=True),
                               [[150, 0, 79], [0, 165, 68], [0, 0, 1]])
    info.roi.x_offset = info.roi.y_offset = info.roi.width = info.roi.height = 0
    info.binning_x = info.binning_y = 0
    info.p = np.zeros(12)  # what a driver without P publishes
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640)), k)  # raw: K, P unused
    with pytest.raises(CameraInfoError, match="P is all zero, but the image is taken as rectified.*rectified:=false"):
        msg_decode.camera_info_to_k(info, (480, 640), rectified=True)
    info.p = np.array([300.0, 0, 318, 0, 0, 330, 236, 0, 0, 0, 0, 0])  # P[2,2] = 0
    with pytest.raises(CameraInfoError, match=r"P\[:3,:3\] is not a pinhole camera matrix"):
        msg_decode.camera_info_to_k(info, (480, 640), rectified=True)
    info.p = np.array([3.0, 0, 318, 0, 0, 3.3, 236, 0, 0, 0, 1, 0])
    with pytest.raises(CameraInfoError, match="focal lengths fx=3, fy=3.3 are outside"):
        msg_decode.camera_info_to_k(info, (480, 640), rectified=True)
    info.p = np.array([np.nan] * 12)
    with pytest.raises(CameraInfoError, match="P must hold 12 finite numbers"):
        msg_decode.camera_info_to_k(info, (480, 640), rectified=True)


def test_transform_round_trip(factory):
    rng = np.random.default_rng(3)
    for _ in range(5):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pose = np.eye(4)
        pose[:3, :3] = q * np.sign(np.linalg.det(q))
        pose[:3, 3] = rng.normal(size=3)
        msg = msg_encode.matrix_to_transform_stamped(factory, pose, "world", "camera", STAMP)
        np.testing.assert_allclose(msg_decode.transform_to_matrix(msg), pose, atol=1e-9)
        np.testing.assert_allclose(msg_decode.transform_to_matrix(msg.transform), pose, atol=1e-9)
    msg.transform.rotation.w = msg.transform.rotation.x = msg.transform.rotation.y = msg.transform.rotation.z = 0.0
    with pytest.raises(TransformError, match="zero"):
        msg_decode.transform_to_matrix(msg)
    assert issubclass(TransformError, FrameError)


def test_rgb_packing_matches_pcl_convention():
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], np.uint8)
    packed = msg_encode.pack_rgb(colors)
    assert packed.dtype == np.float32
    np.testing.assert_array_equal(packed.view(np.uint32), [0xFF0000, 0x00FF00, 0x0000FF, 0x010203])
    np.testing.assert_array_equal(msg_decode.unpack_rgb(packed), colors)


def test_pointcloud_layout_and_parse(factory):
    centers = np.array([[0.1, 0.2, 0.3], [1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    labels = np.array([2, 5, 11], np.uint8)
    scores = np.array([0.9, 0.6, 0.75], np.float32)
    msg = msg_encode.points_to_pointcloud2(factory, msg_encode.cloud_points(centers, labels, scores), "world", STAMP)
    layout = [(f.name, f.offset, f.datatype, f.count) for f in msg.fields]
    assert layout == [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("rgb", 12, 7, 1), ("label", 16, 2, 1),
                      ("score", 20, 7, 1)]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 3, 24, 72)
    assert msg.is_dense and not msg.is_bigendian and len(msg.data) == 72
    assert msg.header.frame_id == "world" and msg_decode.stamp_to_ns(msg.header.stamp) == STAMP
    raw = np.asarray(msg.data)
    np.testing.assert_array_equal(raw[12:16].view("<u4"), [(43 << 16) | (160 << 8) | 4])  # floor colour
    back = msg_decode.pointcloud2_to_array(msg)
    np.testing.assert_allclose(np.stack([back["x"], back["y"], back["z"]], -1), centers, rtol=1e-6)
    np.testing.assert_array_equal(back["label"], labels)
    np.testing.assert_array_equal(msg_decode.unpack_rgb(back["rgb"]), CLASS_COLORS[labels])
    msg.data = msg.data[:-5]
    with pytest.raises(CloudFormatError, match="too few"):
        msg_decode.pointcloud2_to_array(msg)


def test_cloud_to_label_grid(factory):
    origin = np.array([-1.0, 2.0, 0.0])
    grid = np.zeros((6, 5, 4), np.uint8)
    grid[1, 2, 3], grid[5, 4, 0], grid[0, 0, 0] = 3, 255, 7
    idx = np.argwhere(grid > 0)
    centers = origin + (idx + 0.5) * 0.08
    msg = msg_encode.points_to_pointcloud2(factory, msg_encode.cloud_points(centers, grid[tuple(idx.T)], np.ones(len(idx))),
                                     "world", STAMP)
    np.testing.assert_array_equal(msg_decode.cloud_to_label_grid(msg, origin, 0.08, grid.shape), grid)
    with pytest.raises(CloudFormatError, match="outside"):
        msg_decode.cloud_to_label_grid(msg, origin + 1.0, 0.08, grid.shape)


def test_pil_decoder_handles_grey_png(factory):
    out = io.BytesIO()
    PILImage.fromarray(np.full((4, 4), 77, np.uint8)).save(out, format="PNG")
    msg = factory.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(factory, STAMP, "c"), format="png",
                      data=factory.uint8_array(out.getvalue()))
    assert (msg_decode.compressed_to_rgb(msg) == 77).all()
