"""discene-train on bad input and unsafe requests: one clear line, the documented exit code, no run lost."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_trainer import tiny_config

from models.checkpoint import load_checkpoint
from training import train
from training.data import build_dataset
from training.interrupt import training_worker_init
from training.trainer import Trainer


def config_file(root: Path, tmp_path: Path, **kw) -> str:
    """A tiny run's YAML (out_dir ``tmp_path/run``) for the CLI."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "run", max_steps=2, **kw).to_dict()))
    return str(path)


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_writes_a_checkpoint(data_root, tmp_path, capsys):
    cfg = config_file(data_root, tmp_path)
    run = tmp_path / "run"
    assert train.main(["--config", cfg]) == 0
    old = stamps(run)
    assert {"best.pt", "final.pt", "last.pt", "train_config.yaml"} <= set(old)
    assert train.main(["--config", cfg, "--data", str(tmp_path / "nowhere"), "--overwrite"]) == 2
    assert "does not exist" in capsys.readouterr().err and stamps(run) == old
    # the new run writes no best.pt (no val split): the old one goes with the rest of the old run
    assert train.main(["--config", cfg, "--overwrite", "--set", "data.val_split=none"]) == 0
    assert sorted(stamps(run)) == ["final.pt", "last.pt", "train_config.yaml"]
    assert all(stamps(run)[name] > old[name] for name in stamps(run))


def test_no_readable_training_frame_is_one_error_line(data_root, tmp_path, capsys):
    cfg = config_file(data_root, tmp_path)
    lists_only = tmp_path / "lists_only"
    lists_only.mkdir()
    for split in data_root.glob("*_subscenes.txt"):
        shutil.copy(split, lists_only)
    assert train.main(["--config", cfg, "--data", str(lists_only), "--set", "data.workers=1"]) == 2
    err = capsys.readouterr().err
    assert "error: no training frame is readable: all 4 samples" in err and "Traceback" not in err
    # a depth model on a dataset without depth images
    no_depth = tmp_path / "no_depth"
    shutil.copytree(data_root, no_depth)
    for png in no_depth.glob("posed_images/*/*.png"):
        png.unlink()
    assert train.main(["--config", cfg, "--data", str(no_depth), "--set", "model_overrides.use_depth=true"]) == 2
    assert "no training frame is readable" in capsys.readouterr().err


def test_an_unreadable_val_split_is_found_before_training_not_after(data_root, tmp_path, capsys):
    """Every val frame unreadable: the run trained all its steps, then ended at its final evaluation (exit 2)
    without final.pt. It is now said at the start, as for a missing split, and the run ends with final.pt."""
    damaged = tmp_path / "damaged"
    shutil.copytree(data_root, damaged)
    for pkl in (damaged / "val_subscenes.txt").read_text().split():  # the split lists its frames' pickles
        (damaged / pkl).write_bytes(b"not a pickle")
    assert train.main(["--config", config_file(data_root, tmp_path), "--data", str(damaged)]) == 0
    err = capsys.readouterr().err
    assert "discene-train: no evaluation (no validation frame can be scored: all 2 frames are bad; first: " in err
    assert "cannot read" in err
    assert {"final.pt", "last.pt"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_a_failing_run_stops_its_loader_workers_at_once(data_root, tmp_path):
    """Not when the loader is collected: the exception's traceback holds it, and at exit multiprocessing would
    wait forever for workers that ignore its SIGTERM."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    cfg = tiny_config(root, tmp_path / "run")
    cfg.data.workers = 1
    trainer = Trainer(cfg, build_dataset(str(root), "train", cfg.model_config()))
    shutil.rmtree(root / "gathered_data")  # every frame goes missing under the workers
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="training stopped before step 1: .*BadSampleError: all 4 samples .* are "
                                         "bad; .*; no checkpoint of this run") as failed:
        trainer.fit()
    assert "Traceback" not in str(failed.value) and set(multiprocessing.active_children()) <= before


def _damage(root: Path, sample_id: str) -> None:
    pkl = root / "gathered_data" / f"{sample_id}.pkl"
    pkl.write_bytes(pkl.read_bytes()[:100])


def test_a_bad_training_frame_is_one_log_line_the_trainers(data_root, tmp_path, caplog):
    """One process (workers 0): a frame skipped by the trainer's start-up read and one skipped at a step are each
    counted and named once, by the trainer (the dataset named each too; and the first one, which stays skipped in
    the dataset so that no batch names it, was not counted)."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    cfg = tiny_config(root, tmp_path / "run", max_steps=2)
    train_set = build_dataset(str(root), "train", cfg.model_config())
    first, later = train_set.ids[0], train_set.ids[2]
    _damage(root, first)
    trainer = Trainer(cfg, train_set)
    _damage(root, later)
    batches = iter(trainer._loader())
    for _ in range(2 * trainer.steps_per_epoch):
        trainer._next_batch(batches)
    assert sorted(trainer.skipped_frames) == sorted([first, later])
    for frame, count, when in ((first, 1, "before training"), (later, 2, "step ")):
        lines = [r.getMessage() for r in caplog.records if frame in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(when), lines
        assert f"bad training frame skipped ({count} so far on rank 0): sample {frame}: cannot read" in lines[0]


WORKERS_RUN = """
import json, sys
from pathlib import Path
from test_trainer import tiny_config
from training.data import build_dataset
from training.trainer import Trainer

root = Path(sys.argv[1])
cfg = tiny_config(root, sys.argv[2], max_steps=2)
cfg.data.workers = 2
train_set = build_dataset(str(root), "train", cfg.model_config())
trainer = Trainer(cfg, train_set)
bad = train_set.ids[1]
pkl = root / "gathered_data" / f"{bad}.pkl"
pkl.write_bytes(pkl.read_bytes()[:100])
batches = iter(trainer._loader())
try:
    seen = [trainer._next_batch(batches) for _ in range(trainer.steps_per_epoch + 1)]
finally:
    batches._shutdown_workers()
print(json.dumps({"bad": bad, "skipped_frames": trainer.skipped_frames, "left": [b for b in seen if "skipped" in b]}))
"""


def test_bad_training_frames_skipped_by_loader_workers_are_counted_and_logged_once_by_the_trainer(data_root, tmp_path):
    """Each worker skips a bad frame in its own copy of the dataset: the batch tells the trainer, which counts
    each bad frame once, logs it and writes the count to TensorBoard (before, only the workers knew). Its line
    is the only one: each worker that met the frame logged one more. In a process of its own, whose stderr
    holds the workers' lines too (two epochs, so that both workers may meet the frame)."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    run = subprocess.run([sys.executable, "-c", WORKERS_RUN, str(root), str(tmp_path / "run")], cwd=tests.parent,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    bad = result["bad"]
    assert list(result["skipped_frames"]) == [bad] and "cannot read" in result["skipped_frames"][bad]
    assert result["left"] == []
    lines = [line for line in run.stderr.splitlines() if bad in line]
    assert len(lines) == 1 and lines[0].startswith("step ") and "bad training frame skipped (1 so far" in lines[0], lines


def test_a_diverging_run_stops_with_the_documented_exit_code(data_root, tmp_path, capsys):
    cfg = config_file(data_root, tmp_path)
    assert train.main(["--config", cfg, "--steps", "4", "--set", "optim.lr=1e12", "--set", "optim.warmup_iters=0",
                       "--set", "ckpt_every=1", "--set", "loss.nn_backend=kdtree"]) == 3
    err = capsys.readouterr().err
    assert "stopped: non-finite" in err and "last good checkpoint" in err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] >= 1


def test_resume_writes_beside_its_checkpoint_and_asks_before_replacing_another_run(data_root, tmp_path, capsys):
    assert train.main(["--config", config_file(data_root, tmp_path)]) == 0
    run, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(run, copy)
    original = stamps(run)
    assert train.main(["--resume", str(copy / "last.pt"), "--steps", "3"]) == 0
    assert stamps(run) == original and load_checkpoint(copy / "last.pt")["step"] == 3
    copied = stamps(copy)
    assert train.main(["--resume", str(run / "last.pt"), "--steps", "3", "--out", str(copy)]) == 2
    assert "--overwrite" in capsys.readouterr().err and stamps(copy) == copied
    assert train.main(["--resume", str(run / "last.pt"), "--steps", "3", "--out", str(copy), "--overwrite"]) == 0
    assert stamps(run) == original and stamps(copy)["last.pt"] > copied["last.pt"]


def test_an_unusable_device_is_one_error_line(data_root, tmp_path, capsys, monkeypatch):
    cfg = config_file(data_root, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(["--config", cfg, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' requested but CUDA is not available" in err and "Traceback" not in err
    assert train.main(["--config", cfg, "--device", "foo"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
    ("batch_size=abc", "batch_size must be an integer, got 'abc'"),
    ("data.max_train_frames=2.5", "data.max_train_frames must be an integer or null, got 2.5"),
    ("tgi=maybe", "tgi must be true or false, got 'maybe'"),
])
def test_a_mistyped_setting_names_the_key_and_the_type(data_root, tmp_path, capsys, setting, message):
    assert train.main(["--config", config_file(data_root, tmp_path), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_float_yaml_reads_as_text_is_taken_as_a_number(data_root, tmp_path):
    """PyYAML (YAML 1.1) reads ``lr: 2e-4`` as the string '2e-4'."""
    path = Path(config_file(data_root, tmp_path))
    data = yaml.safe_load(path.read_text())
    data["optim"]["lr"] = "2e-4"
    path.write_text(yaml.safe_dump(data))
    assert "  lr: 2e-4\n" in path.read_text()  # unquoted, as a user writes it
    assert train.config_from_args(train.build_parser().parse_args(["--config", str(path)])).validate().optim.lr == 2e-4


def test_teacher_outside_distill_mode_is_refused(data_root, tmp_path, capsys):
    assert train.main(["--config", config_file(data_root, tmp_path), "--teacher", str(tmp_path / "t.pt")]) == 2
    assert "--teacher is only used by mode 'distill', and this run's mode is 'student'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stop_at_step_must_lie_ahead(data_root, tmp_path, capsys):
    cfg = config_file(data_root, tmp_path)
    for step in ("0", "-3"):
        assert train.main(["--config", cfg, "--stop-at-step", step]) == 2
        assert f"--stop-at-step must be a positive step, got {step}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert train.main(["--config", cfg]) == 0
    last = tmp_path / "run" / "last.pt"
    before = stamps(last.parent)
    assert train.main(["--resume", str(last), "--steps", "4", "--stop-at-step", "1"]) == 2
    assert "--stop-at-step 1 is not after the step 2" in capsys.readouterr().err and stamps(last.parent) == before


def test_a_file_as_out_and_a_folder_as_checkpoint_are_named_as_such(data_root, tmp_path, capsys):
    cfg = config_file(data_root, tmp_path)
    (tmp_path / "file").write_text("x")
    for out in ("file", "file/sub"):
        assert train.main(["--config", cfg, "--out", str(tmp_path / out)]) == 2
        assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    for flag in ("--init", "--resume"):
        assert train.main(["--config", cfg, flag, str(tmp_path)]) == 2
        assert f"{flag} {tmp_path} is a directory; give the checkpoint file in it" in capsys.readouterr().err
    assert train.main(["--config", cfg, "--set", "mode=distill", "--teacher", str(tmp_path)]) == 2
    assert f"--teacher {tmp_path} is a directory" in capsys.readouterr().err


def _outlive(pid: int, watching: Any) -> None:
    training_worker_init(pid, 0)
    watching.set()
    time.sleep(60)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux only")
def test_loader_workers_end_with_a_killed_training_process():
    """A worker is no child of the trainer (it starts from the fork server), and an OOM-killed trainer cleans
    nothing up: the worker watches the trainer itself."""
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    context = multiprocessing.get_context("fork")
    watching = context.Event()
    worker = context.Process(target=_outlive, args=(trainer.pid, watching))
    worker.start()
    assert watching.wait(timeout=30)
    trainer.kill()
    trainer.wait()
    worker.join(timeout=30)
    alive = worker.is_alive()
    if alive:
        worker.kill()
    assert not alive and worker.exitcode == 1
