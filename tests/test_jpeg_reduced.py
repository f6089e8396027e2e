"""Reduced JPEG decoding (libjpeg DCT scaling) on the frame path: size rule, tolerance, intrinsics."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rosbags.typesys import Stores, get_typestore
from test_ros_support import BlockBackend, pipeline_for

from discene_ros import msg_decode, msg_encode
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import FrameInput, FrameProcessor, ProcessorSettings
from export.onnx_export import example_camera
from models.config import lite
from models.geometry import scale_intrinsic
from models.preprocess import IMAGENET_STD, TensorPreprocessor

F = TypestoreFactory(get_typestore(Stores.ROS2_JAZZY))
# a train-split frame of the sample dataset (640x480, the camera size the lite model is used with)
SAMPLE_JPEG = Path(__file__).resolve().parents[1] / "discene_ros/data/sample_dataset/posed_images/scene0000_00/00000.jpg"


def _compressed(data: bytes, fmt: str = "jpeg"):
    msg = msg_encode.rgb_to_compressed(F, np.zeros((8, 8, 3), np.uint8), "cam", 0, fmt)
    msg.data = np.frombuffer(data, np.uint8)
    return msg


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_reduction_keeps_the_image_at_least_the_margin_times_the_network_input_and_divides_exactly():
    need = msg_decode.reduced_decode_size((192, 256))
    assert need == (240, 320)
    assert msg_decode.jpeg_reduction(640, 480, need) == 2
    assert msg_decode.jpeg_reduction(1280, 960, need) == 4
    assert msg_decode.jpeg_reduction(2560, 1920, need) == 8
    assert msg_decode.jpeg_reduction(512, 384, need) == 1       # 256x192 would be below 1.25x the input
    assert msg_decode.jpeg_reduction(641, 480, need) == 1       # not a whole number of half pixels
    assert msg_decode.jpeg_reduction(1282, 960, need) == 2      # 1282 / 4 is not whole; / 2 is
    assert msg_decode.jpeg_reduction(640, 480, None) == 1


def test_reduced_jpeg_matches_full_decode_and_resize_within_the_stated_tolerance(image_decoder):
    # The network input (TensorPreprocessor, the torch frame path) from a 320x240 DCT-scaled decode
    # against the one from the full 640x480 decode, in grey levels: mean <= 0.6, max <= 20
    # (measured 0.53 / 16 on this frame; msg_decode.JPEG_REDUCE_MARGIN).
    msg = _compressed(SAMPLE_JPEG.read_bytes())
    cfg = lite()
    full = msg_decode.compressed_to_rgb(msg)
    small = msg_decode.compressed_to_rgb(msg, msg_decode.reduced_decode_size(cfg.image_size))
    assert full.shape == (480, 640, 3) and small.shape == (240, 320, 3)
    k, pose = example_camera(cfg)
    pre = TensorPreprocessor(cfg, "cpu", slots=2)
    a = pre(full, scale_intrinsic(k, (480, 640), full.shape[:2]), pose, slot=0).image
    b = pre(small, scale_intrinsic(k, (480, 640), small.shape[:2]), pose, slot=1).image
    grey = (a - b).abs() * 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert 0.05 < float(grey.mean()) <= 0.6 and float(grey.max()) <= 20.0


def test_png_and_raw_images_are_never_reduced(image_decoder):
    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    png = msg_encode.rgb_to_compressed(F, rgb, "cam", 0, "png")
    np.testing.assert_array_equal(msg_decode.any_image_to_rgb(png, (240, 320)), rgb)
    raw = msg_encode.rgb_to_image(F, rgb, "cam", 0, "bgr8")
    assert msg_decode.any_image_to_rgb(raw, (240, 320)).shape == (480, 640, 3)
    odd = _compressed(_jpeg(rgb[:479]))
    assert msg_decode.any_image_to_rgb(odd, (240, 320)).shape == (479, 640, 3)


@pytest.mark.parametrize("reduced", [True, False])
def test_the_node_path_scales_k_by_the_decoded_size(reduced):
    # CameraInfo K refers to the full 640x480 image; the processor decodes at 320x240 (default on) and
    # camera_info_to_k scales K to that size, so the network's grid-to-image matrix is the full decode's.
    cfg = lite()
    k, pose = example_camera(cfg)
    info = msg_encode.k_to_camera_info(F, k, 480, 640, "cam", 0)
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    frame = FrameInput(image=_compressed(_jpeg(rgb)), camera_info=info, cam_pose=pose)
    proc = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(reduced_jpeg_decode=reduced))
    assert ProcessorSettings().reduced_jpeg_decode
    got_rgb, got_k, _, _, _ = proc.decode(frame)
    scale = 0.5 if reduced else 1.0
    assert got_rgb.shape == (int(480 * scale), int(640 * scale), 3)
    np.testing.assert_allclose(got_k[:2], k[:2] * scale, rtol=1e-12)
    full = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(reduced_jpeg_decode=False))
    g2i = proc.prepare(frame).prepared.inputs.grid2img
    np.testing.assert_allclose(g2i, full.prepare(frame).prepared.inputs.grid2img, rtol=1e-6, atol=1e-6)


def _noise_jpeg(h: int = 480, w: int = 640, **options) -> bytes:
    rgb = np.clip(np.random.default_rng(2).normal(128, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("size_hw", [None, (240, 320), (120, 160), (60, 80)])  # reduce 1, 2, 4, 8 of 640x480
def test_cv2_and_pil_decode_the_same_pixels(size_hw, monkeypatch):
    # libjpeg(-turbo) DCT scaling in both (cv2's IMREAD_REDUCED_COLOR_r, PIL's draft): measured identical on
    # these images with opencv-python-headless 5.0 and Pillow 13; allowed: 1 grey level (other builds)
    pytest.importorskip("cv2", reason="opencv-python-headless is in the dev extras")
    sources = [SAMPLE_JPEG.read_bytes(), _noise_jpeg(quality=90), _noise_jpeg(quality=75, subsampling=0)]
    for data in sources:
        with_cv2 = msg_decode.compressed_to_rgb(_compressed(data), size_hw)
        with monkeypatch.context() as m:
            m.setattr(msg_decode, "opencv", lambda: None)
            with_pil = msg_decode.compressed_to_rgb(_compressed(data), size_hw)
        assert with_cv2.shape == with_pil.shape == (*(size_hw or (480, 640)), 3)
        assert np.abs(with_cv2.astype(int) - with_pil.astype(int)).max() <= 1


def test_exif_orientation_is_ignored(image_decoder):
    # CameraInfo (and K) describe the sensor's pixel layout: a rotate-90 EXIF tag must not turn the image
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    plain, tagged = _noise_jpeg(96, 128, quality=90), _noise_jpeg(96, 128, quality=90, exif=exif.tobytes())
    assert plain != tagged  # the same pixels, one with the tag
    decoded = msg_decode.compressed_to_rgb(_compressed(tagged))
    assert decoded.shape == (96, 128, 3)
    np.testing.assert_array_equal(decoded, msg_decode.compressed_to_rgb(_compressed(plain)))


def _encodings() -> dict[str, bytes]:
    """JPEGs and PNGs as encoders write them: baseline and progressive, grey and CMYK, EXIF and ICC
    segments before the frame header (the EXIF one holding a thumbnail JPEG of another size), OpenCV's,
    odd sizes, fill bytes before a marker."""
    import cv2

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out: dict[str, bytes] = {}

    def pil(name: str, image: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    im = Image.fromarray(rgb)
    pil("baseline", im, "JPEG")
    pil("progressive", im, "JPEG", progressive=True, optimize=True)
    pil("grey", im.convert("L"), "JPEG")
    pil("cmyk", im.convert("CMYK"), "JPEG")
    pil("1x1", im.resize((1, 1)), "JPEG")
    pil("wide", Image.new("RGB", (4000, 3)), "JPEG")
    thumb = io.BytesIO()
    Image.new("RGB", (8, 6)).save(thumb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    pil("exif, icc", im, "JPEG", exif=exif.tobytes() + thumb.getvalue(), icc_profile=b"\0" * 3000)
    out["opencv jpeg"] = cv2.imencode(".jpg", rgb)[1].tobytes()
    data = bytearray(out["baseline"])
    sof = data.index(b"\xff\xc0")
    out["fill bytes"] = bytes(data[:sof] + b"\xff\xff\xff" + data[sof:])
    pil("png", im, "PNG")
    pil("png, palette", im.convert("P"), "PNG")
    pil("png, 16 bit grey", Image.fromarray(rng.integers(0, 65535, (5, 7), dtype=np.uint16)), "PNG")
    out["opencv png"] = cv2.imencode(".png", rgb)[1].tobytes()
    return out


def _pil_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return tuple(img.size)
    except Exception:  # noqa: BLE001 - what PIL cannot open
        return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on the EXIF segments with a byte changed
def test_header_sizes_are_pils():
    """The sizes ``compressed_to_rgb`` reads from the JPEG frame header or the PNG IHDR are the ones PIL's
    ``open`` gives, on what encoders write and on headers with a byte changed (where the walk gives up,
    PIL parses, as before)."""
    rng = np.random.default_rng(6)
    read = 0
    for name, data in _encodings().items():
        buf = np.frombuffer(data, np.uint8)
        expected = _pil_size(data)
        assert expected is not None, name
        assert msg_decode._compressed_size(_compressed(data), buf) == expected, name
        fast = msg_decode._jpeg_header_size if data[0] == 0xFF else msg_decode._png_header_size
        assert fast(memoryview(buf)) == expected, name  # read by the walk, not by PIL
        for _ in range(40):  # a byte of the header changed: the walk reads PIL's size or leaves it to PIL
            bad = bytearray(data)
            bad[int(rng.integers(2, min(len(bad), 200)))] = int(rng.integers(256))
            got = fast(memoryview(np.frombuffer(bytes(bad), np.uint8)))
            pil_size = _pil_size(bytes(bad))
            if got is not None and pil_size is not None:
                assert got == pil_size, name
                read += 1
    assert read > 300


def test_decode_benchmark_decodes_at_the_scales_it_names(tmp_path):
    """bench_jpeg_decode: every variant decodes the image at the scale in its name (the 1/8 rows are
    the entropy-decoding bound of the docs), and the JSON holds every image and variant."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_jpeg_decode.py"
    spec = importlib.util.spec_from_file_location("bench_jpeg_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    variants = bench.decoders(bench.encode(bench.bench.camera_rgb()))
    assert {f"pil 1/{s}" for s in bench.SCALES} <= set(variants)
    for name, run in variants.items():
        scale = int(name.rsplit("/", 1)[1])
        decoded = np.asarray(run())
        assert decoded.shape[:2] == (480 // scale, 640 // scale), name
        assert decoded.ndim == (2 if "grey" in name else 3), name
    assert bench.main(["--calls", "1", "--json", str(tmp_path / "decode.json")]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert len(rows) == 1 + len(bench.SAMPLE_FRAMES) == 5
    assert all(set(row["decode_ms"]) == set(variants) and row["bytes"] > 0 for row in rows)
