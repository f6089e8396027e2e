"""Synthetic generator, Occ-ScanNet loader, axis convention and bad samples (tiny images, 2 cores)."""
from __future__ import annotations

import logging
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from models.config import lite
from models.geometry import grid_to_image_matrix, place_grid, scale_intrinsic
from training.check_axes import depth_agreement, layout_scores
from training.check_axes import main as check_axes_main
from training.occscannet import BadSampleError, OccScanNetDataset, collate_occscannet
from training.scene_format import downsample_labels, from_stored, read_split, sample_paths, to_stored
from training.synth import generate
from training.synth import main as synth_main

W, H = 160, 120


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, scenes=3, frames_per_scene=2, seed=7, width=W, height=H, progress=False)
    return root


def test_a_split_list_that_is_binary_or_has_a_bad_line_is_named(tmp_path):
    """A binary --split gave a decoding error naming no file; a bad line did not say which list it is in; a
    folder was said not to be found."""
    binary, bad = tmp_path / "binary.txt", tmp_path / "bad.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    bad.write_text("gathered_data/scene0000_00/00000.pkl\nnotes.txt\n")
    with pytest.raises(ValueError, match=f"split list '{binary}' cannot be read as text: 'utf-8' codec"):
        read_split(tmp_path, str(binary))
    with pytest.raises(ValueError, match=f"split list '{bad}': split line 'notes.txt' is not a"):
        read_split(tmp_path, str(bad))
    with pytest.raises(ValueError, match=f"split list '{tmp_path}' is a folder; give the list file"):
        read_split(tmp_path, str(tmp_path))


def test_format_matches_occscannet(dataset_root):
    train, val = read_split(dataset_root, "train"), read_split(dataset_root, "val")
    assert len(train) == 4 and len(val) == 2 and not set(train) & set(val)
    assert (dataset_root / "train_subscenes.txt").read_text().splitlines()[0] == "gathered_data/scene0000_00/00000.pkl"
    for sample_id in train + val:
        pkl, jpg, png = sample_paths(dataset_root, sample_id)
        with open(pkl, "rb") as f:
            data = pickle.load(f)
        assert data["cam_pose"].shape == (4, 4) and data["intrinsic"].shape == (4, 4)
        np.testing.assert_allclose(data["cam_pose"][3], [0, 0, 0, 1])
        assert data["target_1_4"].shape == (60, 60, 36) and data["target_1_4"].dtype == np.uint8
        assert data["target_1_16"].shape == (15, 15, 9) and data["target_1_16"].dtype == np.uint8
        np.testing.assert_allclose(data["voxel_origin"], place_grid(data["cam_pose"], floor_z=0.0))
        labels = set(np.unique(data["target_1_4"]).tolist())
        assert {0, 2, 3, 255} <= labels <= set(range(12)) | {255}
        assert png.read_bytes()[24:26] == b"\x10\x00"  # IHDR: 16-bit greyscale (Pillow < 10 reads it as int32)
        depth = np.asarray(Image.open(png))
        assert depth.shape == (H, W) and depth.max() > 500  # millimetres
        assert Image.open(jpg).size == (W, H)
        # cameras at robot / human height, small pitch (optical z axis close to horizontal)
        assert 0.35 <= data["cam_pose"][2, 3] <= 1.75 and abs(data["cam_pose"][2, 2]) < 0.7


def test_generator_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 3), (b, 3), (c, 4)):
        generate(root, scenes=1, frames_per_scene=2, seed=seed, width=64, height=48, progress=False)
    for rel in ["posed_images/scene0000_00/00001.jpg", "posed_images/scene0000_00/00001.png"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    with open(a / "gathered_data/scene0000_00/00001.pkl", "rb") as f1, \
            open(b / "gathered_data/scene0000_00/00001.pkl", "rb") as f2:
        da, db = pickle.load(f1), pickle.load(f2)
    for key in ("cam_pose", "intrinsic", "voxel_origin", "target_1_4", "target_1_16"):
        assert np.array_equal(da[key], db[key]), key


def test_output_does_not_depend_on_worker_count(tmp_path, forks_of_this_process):
    """Also: the workers start from the fork server, never as forks of the generating process, whose other
    threads (tqdm's monitor, torch's pools; a device run's CUDA threads) may hold a lock at that moment
    (Python 3.12 warns that such a fork may deadlock the child)."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    generate(serial, scenes=2, frames_per_scene=1, seed=5, width=48, height=32, workers=1, progress=False)
    generate(parallel, scenes=2, frames_per_scene=1, seed=5, width=48, height=32, workers=2, progress=False)
    assert forks_of_this_process == []
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert len(files) == 9  # 2 x (pkl, jpg, png) + 2 split lists + meta
    for rel in files:
        assert (serial / rel).read_bytes() == (parallel / rel).read_bytes(), rel


def test_cli_writes_dataset(tmp_path):
    rc = synth_main(["--out", str(tmp_path / "d"), "--scenes", "1", "--frames-per-scene", "1", "--seed", "1",
                     "--width", "64", "--height", "48"])
    assert rc == 0 and (tmp_path / "d/gathered_data/scene0000_00/00000.pkl").is_file()
    assert synth_main(["--out", str(tmp_path / "e"), "--scenes", "0"]) == 2
    assert synth_main(["--out", str(tmp_path / "e"), "--val-fraction", "1.5"]) == 2
    assert synth_main(["--out", str(tmp_path / "e"), "--workers", "0"]) == 2



def test_cli_refuses_existing_dataset_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "d")
    small = ["--width", "48", "--height", "32", "--seed", "1"]
    assert synth_main(["--out", out, "--scenes", "2", "--frames-per-scene", "2", *small]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert synth_main(["--out", out, "--scenes", "1", "--frames-per-scene", "1", *small]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()} == before  # untouched
    # --overwrite replaces it whole: no frame of the old dataset is left on disk, listed or not
    assert synth_main(["--out", out, "--scenes", "1", "--frames-per-scene", "1", "--overwrite", *small]) == 0
    assert sorted(p.name for p in (tmp_path / "d/gathered_data").rglob("*.pkl")) == ["00000.pkl"]
    assert not (tmp_path / "d/posed_images/scene0001_00").exists()
    # a folder that holds something else is never emptied, --overwrite or not
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("keep")
    assert synth_main(["--out", str(tmp_path / "other"), "--overwrite", *small]) == 2
    assert "no discene-synth dataset" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_cli_size_and_seed_errors_name_the_flag(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "e"), "--width", "100000"]) == 2
    assert "--width" in capsys.readouterr().err
    assert synth_main(["--out", str(tmp_path / "e"), "--seed", "-5"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()

def test_loader_outputs(dataset_root):
    cfg = lite()
    ds = OccScanNetDataset(dataset_root, "train", config=cfg, return_rgb=True)
    sample = ds[1]
    h, w = cfg.image_size
    assert sample["image"].shape == (3, h, w) and sample["image"].dtype == torch.float32
    assert sample["depth"].shape == (1, h, w) and float(sample["depth"].max()) > 0.5
    assert sample["target"].shape == (60, 60, 36) and sample["target"].dtype == torch.int64
    assert sample["rgb"].shape == (h, w, 3)
    with open(sample_paths(dataset_root, ds.ids[1])[0], "rb") as f:
        raw = pickle.load(f)
    np.testing.assert_array_equal(sample["target"].numpy(), np.swapaxes(raw["target_1_4"], 0, 1))
    k = scale_intrinsic(raw["intrinsic"], (H, W), (h, w))
    np.testing.assert_allclose(sample["intrinsic"].numpy(), k, rtol=1e-5)
    g2i = grid_to_image_matrix(k, raw["cam_pose"], raw["voxel_origin"])
    np.testing.assert_allclose(sample["grid2img"].numpy(), g2i, rtol=1e-4, atol=1e-3)
    # ImageNet normalisation: roughly zero-centred values, not raw [0, 1]
    assert float(sample["image"].min()) < -0.5
    batch = collate_occscannet([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, h, w) and batch["target"].shape == (2, 60, 60, 36)
    assert batch["sample_id"] == ds.ids[:2]
    remapped = OccScanNetDataset(dataset_root, "train", config=cfg, unknown_as_empty=True)[1]["target"]
    assert not (remapped == 255).any() and (sample["target"] == 255).any()


def test_axis_convention_on_synthetic_samples(dataset_root):
    """Occupied voxels agree with the depth image in the loader's (x,y,z) order; the transpose does not."""
    ds = OccScanNetDataset(dataset_root, "val", config=lite())
    for i in range(len(ds)):
        s = ds[i]
        right = depth_agreement(s["target"].numpy(), s["depth"][0].numpy(), s["intrinsic"].numpy(),
                                s["cam_pose"].numpy().astype(np.float64), s["voxel_origin"].numpy())
        wrong = depth_agreement(s["target"].numpy().transpose(1, 0, 2), s["depth"][0].numpy(),
                                s["intrinsic"].numpy(), s["cam_pose"].numpy().astype(np.float64),
                                s["voxel_origin"].numpy())
        assert right[1] > 100 and right[0] > 0.95, (s["sample_id"], right)
        assert wrong[0] < 0.85 and wrong[0] < right[0] - 0.15, (s["sample_id"], right, wrong)


def test_check_axes_command(dataset_root, capsys, tmp_path):
    assert check_axes_main(["--root", str(dataset_root), "--split", "train", "--n", "3",
                            "--render", str(tmp_path / "r")]) == 0
    assert "OK" in capsys.readouterr().out
    pngs = sorted((tmp_path / "r").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (3 * 320, 240)
    assert check_axes_main(["--root", str(dataset_root / "nowhere")]) == 2


def test_layout_scores_detect_transposed_files(dataset_root):
    with open(sample_paths(dataset_root, "scene0000_00/00000")[0], "rb") as f:
        raw = pickle.load(f)
    depth = np.asarray(Image.open(sample_paths(dataset_root, "scene0000_00/00000")[2])).astype(np.float32) / 1000
    xyz_file = from_stored(raw["target_1_4"])  # a file written in (x, y, z) order
    scores = layout_scores(xyz_file, depth, raw["intrinsic"], raw["cam_pose"], raw["voxel_origin"])
    assert scores["xyz"][0] > scores["yxz"][0] + 0.15


def test_stored_layout_roundtrip_and_downsample():
    grid = np.random.default_rng(0).integers(0, 12, (60, 60, 36)).astype(np.uint8)
    assert np.array_equal(from_stored(to_stored(grid)), grid)
    assert to_stored(grid).shape == (60, 60, 36) and to_stored(grid)[3, 5, 0] == grid[5, 3, 0]
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[:4, :4, :4] = 255            # block 0: all unknown -> 255
    labels[4:, :4, :] = 3               # block 1: wall -> 3
    labels[:4, 4:, :] = 0
    labels[0, 4, 0] = 5                 # block 2: one chair voxel among 63 empty -> empty (0.95 rule)
    labels[4:, 4:, :2] = 7              # block 3: half sofa, half empty -> sofa
    out = downsample_labels(labels, 4)
    assert out.shape == (2, 2, 1)
    tie = np.zeros((4, 4, 4), np.uint8)
    tie[:2] = 255                       # 32 unknown, 32 empty -> unknown
    assert downsample_labels(tie, 4)[0, 0, 0] == 255
    assert out[0, 0, 0] == 255 and out[1, 0, 0] == 3 and out[0, 1, 0] == 0 and out[1, 1, 0] == 7


@pytest.fixture()
def damaged_root(dataset_root, tmp_path):
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(dataset_root, root)
    ids = read_split(root, "train")
    sample_paths(root, ids[0])[1].unlink()                                   # missing image
    pkl = sample_paths(root, ids[1])[0]
    pkl.write_bytes(pkl.read_bytes()[:200])                                  # truncated pickle
    with open(sample_paths(root, ids[2])[0], "rb") as f:
        data = pickle.load(f)
    data["target_1_4"][:] = 255                                              # all unknown
    with open(sample_paths(root, ids[2])[0], "wb") as f:
        pickle.dump(data, f)
    return root, ids


def test_bad_samples_raise_with_id(damaged_root):
    root, ids = damaged_root
    ds = OccScanNetDataset(root, "train", config=lite())
    for i, needle in enumerate(["missing file", "cannot read", "all unknown"]):
        with pytest.raises(BadSampleError, match=needle) as info:
            ds[i]
        assert ids[i] in str(info.value)
    assert ds[3]["sample_id"] == ids[3]
    with pytest.raises(FileNotFoundError, match="split list"):
        OccScanNetDataset(root, "test", config=lite())


def test_skip_bad_returns_next_good_sample(damaged_root):
    root, ids = damaged_root
    ds = OccScanNetDataset(root, "train", config=lite(), skip_bad=True)
    assert [ds[i]["sample_id"] for i in range(4)] == [ids[3]] * 4
    assert sorted(ds.skipped) == sorted(ids[:3])
    sample_paths(root, ids[3])[2].unlink()  # now all bad -> a clear error, not an endless loop
    ds2 = OccScanNetDataset(root, "train", config=lite(), skip_bad=True)
    with pytest.raises(BadSampleError, match="all 4 samples"):
        ds2[0]


def test_skipped_samples_are_logged_here_unless_the_consumer_logs_them(damaged_root, caplog):
    """Alone, the dataset logs each bad sample it skips. With ``log_skipped`` off (the Trainer, which logs the
    ``skipped`` its batches carry) it logs none of those, but still the ones no item can carry: all bad."""
    root, ids = damaged_root
    caplog.set_level(logging.WARNING, logger="training.occscannet")
    ds = OccScanNetDataset(root, "train", config=lite(), skip_bad=True)
    assert sorted(ds[0]["skipped"]) == sorted(ids[:3])
    assert [r.getMessage() for r in caplog.records] == [f"skipping bad sample ({n + 1} skipped so far in this "
                                                        f"process): {ds.skipped[i]}" for n, i in enumerate(ids[:3])]
    caplog.clear()
    quiet = OccScanNetDataset(root, "train", config=lite(), skip_bad=True)
    quiet.log_skipped = False
    assert sorted(quiet[0]["skipped"]) == sorted(ids[:3]) and not caplog.records
    sample_paths(root, ids[3])[2].unlink()  # the last good sample goes: the error item carries nothing
    with pytest.raises(BadSampleError, match="all 4 samples"):
        quiet[1]
    assert [r.getMessage() for r in caplog.records] == [f"skipping bad sample (4 skipped so far in this process): "
                                                        f"{quiet.skipped[ids[3]]}"]


def test_wrong_shapes_and_empty_targets_are_named(damaged_root):
    root, ids = damaged_root
    ds = OccScanNetDataset(root, "train", config=lite())
    pkl = sample_paths(root, ids[3])[0]
    with open(pkl, "rb") as f:
        good = pickle.load(f)
    cases = [({"target_1_4": good["target_1_4"][:, :, :30]}, "target_1_4 must be"),
             ({"target_1_4": np.where(good["target_1_4"] == 255, 255, 0).astype(np.uint8)}, "no occupied voxel"),
             ({"target_1_4": np.full((60, 60, 36), 40, np.uint8)}, "outside 0..11"),
             ({"cam_pose": np.eye(3)}, "cam_pose must be 4x4")]
    for change, needle in cases:
        with open(pkl, "wb") as f:
            pickle.dump({**good, **change}, f)
        with pytest.raises(BadSampleError, match=needle) as info:
            ds[3]
        assert ids[3] in str(info.value)


def _edited_pose(pose, change):
    pose = np.array(pose, dtype=np.float64)
    change(pose)
    return pose


def test_bad_geometry_and_depth_files_are_named_not_trained_on(damaged_root):
    """Poses that are not rigid (scaled, projective, 1e39 m away), a grid the camera cannot see, a grid whose
    projection overflows float32, an image that does not fit its K, and depth that is not 16-bit millimetres:
    each was loaded before (silent garbage, or NaN losses that stopped training) and is now a named bad sample."""
    root, ids = damaged_root
    ds = OccScanNetDataset(root, "train", config=lite())
    sample_id = ids[3]
    pkl, jpg, png = sample_paths(root, sample_id)
    with open(pkl, "rb") as f:
        good = pickle.load(f)
    pose = good["cam_pose"]
    cases = [({"cam_pose": _edited_pose(pose, lambda p: p.__setitem__((slice(0, 3), slice(0, 3)), 3 * p[:3, :3]))},
              "cam_pose is not a rotation"),
             ({"cam_pose": _edited_pose(pose, lambda p: p.__setitem__((3, 0), 5.0))}, "cam_pose is projective"),
             ({"cam_pose": _edited_pose(pose, lambda p: p.__setitem__((0, 3), 1e39))}, "cam_pose translation"),
             ({"voxel_origin": np.array([1000.0, 1000.0, 1000.0])}, "the camera sees no voxel"),
             ({"voxel_origin": np.array([1e39, 0.0, 0.0])}, "the grid-to-image matrix overflows float32")]
    for change, needle in cases:
        with open(pkl, "wb") as f:
            pickle.dump({**good, **change}, f)
        with pytest.raises(BadSampleError, match=f"sample {sample_id}: {needle}"), warnings.catch_warnings():
            warnings.simplefilter("error")  # the message says it: no numpy overflow warning before it
            ds.load(sample_id, allow_empty=True)  # evaluation reads it so too
    with open(pkl, "wb") as f:
        pickle.dump(good, f)
    assert ds.load(sample_id)["sample_id"] == sample_id
    rgb = jpg.read_bytes()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(jpg, format="JPEG")
    with pytest.raises(BadSampleError, match="image size 1x1"):
        ds.load(sample_id)
    jpg.write_bytes(rgb)
    for depth in (Image.fromarray(np.full((H, W, 3), 200, np.uint8)), Image.fromarray(np.full((H, W), np.nan, np.float32))):
        depth.save(png, format="TIFF" if depth.mode == "F" else "PNG")
        with pytest.raises(BadSampleError, match=f"depth image {png} has PIL mode {depth.mode}"):
            ds.load(sample_id)


def test_rooms_cover_all_classes_and_yaws():
    from training.scene_layout import build_room

    labels, yaws = set(), []
    for i in range(20):
        room = build_room(np.random.default_rng([11, i]))
        labels |= set(room.arrays()["label"].tolist())
        yaws.append(room.yaw)
    assert labels == set(range(1, 12))
    assert np.ptp(yaws) > 3.0  # room axes are not aligned with the world axes


def test_shipped_sample_loads_and_passes_axis_check():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "discene_ros" / "data" / "sample_dataset"
    ids = []
    for split in ("train", "val"):
        ds = OccScanNetDataset(root, split, config=lite())
        ids += ds.ids
        sample = ds[0]
        assert sample["target"].shape == (60, 60, 36) and sample["image"].shape == (3, 192, 256)
    assert len(ids) == 4
    assert check_axes_main(["--root", str(root), "--split", "val", "--n", "2"]) == 0
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 2_000_000


def test_public_style_absolute_image_paths_are_re_rooted(dataset_root, tmp_path):
    """Public pkl files hold absolute paths of another machine; the loader finds the files under root."""
    import shutil

    root = tmp_path / "public"
    shutil.copytree(dataset_root, root)
    sample_id = read_split(root, "train")[0]
    pkl, jpg, png = sample_paths(root, sample_id)
    scene = sample_id.split("/")[0]
    jpg.rename(jpg.parent / "000120.jpg")  # image numbering differs from the pkl numbering
    png.rename(png.parent / "000120.png")
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    data["img"] = f"/home/someone/data/scannet/posed_images/{scene}/000120.jpg"
    data["depth_gt"] = f"/home/someone/data/scannet/posed_images/{scene}/000120.png"
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    sample = OccScanNetDataset(root, "train", config=lite())[0]
    assert sample["sample_id"] == sample_id and float(sample["depth"].max()) > 0


def test_depth_at_another_resolution_than_rgb(dataset_root, tmp_path):
    """ScanNet ships 1296x968 colour with 640x480 depth: loader and axis check rescale K for the depth."""
    import shutil

    root = tmp_path / "halfdepth"
    shutil.copytree(dataset_root, root)
    for png in (root / "posed_images").rglob("*.png"):
        d = np.asarray(Image.open(png))
        Image.fromarray(np.ascontiguousarray(d[::2, ::2])).save(png)
    assert check_axes_main(["--root", str(root), "--split", "val", "--n", "2"]) == 0
    sample = OccScanNetDataset(root, "val", config=lite())[0]
    assert sample["depth"].shape == (1, 192, 256) and float(sample["depth"].max()) > 0.5


def test_teacher_inputs_are_resized_as_inference_resizes_them():
    """resize_inputs (the teacher's input when its size differs) gives the depth resize_depth gives the node,
    and the image PIL's antialiased resize gives it, up to float rounding."""
    from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_depth, resize_image
    from training.data import resize_inputs

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 4.0, size=(48, 64)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.3] = 0.0  # invalid pixels
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    image = torch.from_numpy(((rgb / 255.0 - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    inputs = {"image": image, "grid2img": torch.eye(4)[None], "depth": torch.from_numpy(depth)[None, None]}
    for size in ([24, 32], [20, 26], [36, 48]):
        out = resize_inputs(inputs, size)
        np.testing.assert_array_equal(out["depth"][0, 0].numpy(), resize_depth(depth, tuple(size)))
        pixels = (out["image"][0].permute(1, 2, 0).numpy() * std + mean) * 255.0
        assert np.abs(pixels - resize_image(rgb, tuple(size)).astype(np.float32)).max() <= 1.5
