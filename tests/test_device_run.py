"""Training plumbing for the device runs: endless resumable batch order, split checkpoints, resume across calls."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch.utils.data import DistributedSampler

from models.checkpoint import load_checkpoint, load_model, trained_steps
from training import device_run
from training.data import EpochBatchSampler, build_train_loader
from training.distributed import autocast_dtype
from training.trainer import Trainer

TINY = '{"decoder": {"num_queries": 32, "num_refines": [2, 4]}, "image_size": [96, 128]}'


@pytest.mark.parametrize("world", [1, 2])
def test_batch_order_matches_distributed_sampler_across_epochs(world):
    size, batch, seed = 11, 2, 5
    for rank in range(world):
        sampler = EpochBatchSampler(size, batch, world, rank, seed)
        endless = iter(sampler)
        for epoch in range(3):
            reference = DistributedSampler(range(size), num_replicas=world, rank=rank, seed=seed, drop_last=True)
            reference.set_epoch(epoch)
            order = list(reference)
            expected = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
            assert [next(endless) for _ in range(sampler.steps_per_epoch)] == expected


@pytest.mark.parametrize(("old", "new", "steps"), [((1, 2), (3, 1), 2), ((3, 1), (2, 2), 2), ((2, 2), (1, 3), 2),
                                                  ((1, 1), (4, 1), 12)])
def test_a_position_in_another_batch_geometry_skips_no_frame_of_the_epoch(old, new, steps):
    """(batch, processes) old -> new after ``steps`` steps: the ranks read each epoch's order from its front,
    and the new geometry reads on from that frame, again reading fewer frames than one step takes."""
    size, seed = 13, 4
    read: list[int] = []
    for rank in range(old[1]):
        batches = iter(EpochBatchSampler(size, old[0], old[1], rank, seed))
        read += [i for _ in range(steps) for i in next(batches)]
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    assert sorted(read) == sorted(order[:len(read)])
    samplers = [EpochBatchSampler(size, new[0], new[1], rank, seed) for rank in range(new[1])]
    epoch, step = samplers[0].position_after(0, len(read))
    rest = [i for s in samplers for i in s.epoch_indices(0)[step * new[0]:]] if epoch == 0 else []
    covered = order[:samplers[0].steps_per_epoch * new[0] * new[1]]
    assert set(covered) <= set(read) | set(rest) and len(set(read) & set(rest)) < new[0] * new[1]
    assert (epoch, step) == ((1, 0) if len(read) >= len(covered) else (0, len(read) // (new[0] * new[1])))


def test_batch_order_started_mid_run_continues_the_full_order():
    full = iter(EpochBatchSampler(10, 3, seed=1))
    batches = [next(full) for _ in range(8)]  # 3 steps per epoch: epochs 0, 1 and part of 2
    resumed = iter(EpochBatchSampler(10, 3, seed=1, start_epoch=1, start_step=2))
    assert [next(resumed) for _ in range(3)] == batches[5:8]
    with pytest.raises(ValueError, match="outside an epoch"):
        EpochBatchSampler(10, 3, start_step=3)
    with pytest.raises(ValueError, match="no full batch"):
        EpochBatchSampler(3, 2, num_replicas=2)


class PidFrames(torch.utils.data.Dataset):
    """Frame i carries its index and the id of the process that loaded it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.tensor([index]), "grid2img": torch.tensor([os.getpid()]), "target": torch.zeros(1)}


def test_loader_forks_its_worker_once_for_all_epochs():
    sampler = EpochBatchSampler(6, 2, seed=0)
    loader = build_train_loader(PidFrames(), sampler, workers=1, pin_memory=False, prefetch_factor=2, seed=0)
    batches = iter(loader)
    got = [next(batches) for _ in range(3 * sampler.steps_per_epoch)]  # three epochs from one iterator
    order = iter(sampler)
    assert [b["image"].flatten().tolist() for b in got] == [next(order) for _ in got]
    pids = {int(p) for b in got for p in b["grid2img"].flatten()}
    assert len(pids) == 1 and os.getpid() not in pids
    del batches


def test_split_and_join_checkpoint_parts(tmp_path):
    blob = bytes(range(256)) * 41  # 10,496 bytes -> 3 parts of <= 4 KiB
    (tmp_path / "last.pt").write_bytes(blob)
    files = device_run.split_file(tmp_path / "last.pt", tmp_path / "out", 4096)
    assert [f.name for f in files] == ["last.pt.part000", "last.pt.part001", "last.pt.part002", "last.pt.parts.json"]
    assert max(f.stat().st_size for f in files[:-1]) <= 4096
    joined = device_run.find_checkpoint(tmp_path / "out", "last.pt", tmp_path / "scratch")
    assert joined.read_bytes() == blob
    part = tmp_path / "out" / "last.pt.part001"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ValueError, match="does not match"):
        device_run.join_file(tmp_path / "out" / "last.pt.parts.json", tmp_path / "again.pt")
    assert device_run.find_checkpoint(tmp_path / "nothing", "last.pt", tmp_path / "scratch") is None


def test_cpu_autocast_only_when_asked():
    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) is None
    assert autocast_dtype("bf16", cpu, on_cpu=True) == torch.bfloat16
    assert autocast_dtype("none", cpu, on_cpu=True) is None
    with pytest.raises(ValueError, match="bf16 only"):
        autocast_dtype("fp16", cpu, on_cpu=True)


def call(tmp_path, data, out: str, *extra: str) -> dict:
    argv = ["--config", "lite_student", "--name", "tiny", "--out", str(tmp_path / out), "--work", str(tmp_path / "work"),
            "--data", str(data), "--scenes", "3", "--frames-per-scene", "2", "--width", "128", "--height", "96",
            "--val-fraction", "0.34", "--synth-workers", "1", "--synth-seed", "3", "--device", "cpu",
            "--steps", "5", "--batch", "2", "--workers", "1", "--part-mib", "8",
            "--set", f"model_overrides={TINY}", "--set", "data.frequency_frames=4", "--set", "optim.warmup_iters=1",
            "--set", "deterministic=true", "--set", "ckpt_every=2", *extra]
    assert device_run.main(argv) == 0
    return json.loads((tmp_path / out / "tiny" / "runs.jsonl").read_text().splitlines()[-1])


def test_budgeted_and_interrupted_calls_end_with_the_weights_of_one_run(tmp_path, deterministic, monkeypatch):
    data = tmp_path / "synth"
    full = call(tmp_path, data, "full")
    assert full["finished"] and full["end_step"] == 5 and full["metrics"]["val_frames"] == 2
    first = call(tmp_path, data, "o1", "--budget-s", "0", "--reserve-s", "0")  # stops after its first step
    assert (first["start_step"], first["end_step"], first["finished"], first["metrics"]) == (0, 1, False, None)
    second = call(tmp_path, data, "o2", "--resume", str(tmp_path / "o1" / "tiny"), "--stop-at-step", "3")
    assert (second["call"], second["start_step"], second["end_step"]) == (2, 1, 3)
    third = call(tmp_path, data, "o3", "--resume", str(tmp_path / "o2" / "tiny"))
    assert (third["call"], third["start_step"], third["end_step"], third["finished"]) == (3, 3, 5, True)
    assert third["metrics"] == full["metrics"]
    out = tmp_path / "o3" / "tiny"
    assert max(f.stat().st_size for f in out.iterdir()) <= 8 * 2**20 and len(list(out.iterdir())) <= 8
    assert "last.pt.parts.json" in first["handed_back"] and third["left_out"] == []
    assert [r["end_step"] for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())] == [1, 3, 5]
    a, _ = load_model(device_run.find_checkpoint(tmp_path / "full" / "tiny", "final.pt", tmp_path / "ja"))
    b, _ = load_model(device_run.find_checkpoint(out, "final.pt", tmp_path / "jb"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    sa = a.state_dict()

    def interrupt_at_step_3(self, batch, original=Trainer.train_step):  # the wrapper's timeout, mid-run
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_3)
    cut = call(tmp_path, data, "i1")  # ckpt_every=2: last.pt of step 2 is what comes back
    assert (cut["end_step"], cut["interrupted"], cut["handed_back"][-1]) == (2, True, "last.pt.parts.json")

    monkeypatch.undo()

    def signal_in_step_3(self, batch, original=Trainer.train_step):  # the timeout's SIGINT as a signal
        values = original(self, batch)
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)  # on this thread, handled before the next step
        return values

    monkeypatch.setattr(Trainer, "train_step", signal_in_step_3)
    cut = call(tmp_path, data, "s1")  # the step ends and last.pt is saved at it
    assert (cut["end_step"], cut["interrupted"], cut["handed_back"][-1]) == (3, True, "last.pt.parts.json")
    monkeypatch.undo()
    call(tmp_path, data, "i2", "--resume", str(tmp_path / "i1" / "tiny"))
    c, _ = load_model(device_run.find_checkpoint(tmp_path / "i2" / "tiny", "final.pt", tmp_path / "jc"))
    assert all(torch.equal(sa[k], v) for k, v in c.state_dict().items())
    assert device_run.main(["--config", "lite_student", "--name", "x", "--out", str(tmp_path / "e"), "--data", str(data),
                            "--scenes", "4", "--work", str(tmp_path / "work")]) == 2  # another synthetic set: clear error


def test_init_from_a_handed_back_folder_warm_starts_a_new_run(tmp_path, monkeypatch, capsys):
    """A finished run's folder (final.pt in parts) starts a new run from its weights at step 0; the record and the
    checkpoints count the steps behind them. With a --resume that holds a last.pt, --init is refused."""
    data = tmp_path / "synth"
    first = call(tmp_path, data, "g1", "--steps", "2", "--part-mib", "1")
    parts = tmp_path / "g1" / "tiny"
    assert first["finished"] and "final.pt.part001" in first["handed_back"]
    weights = load_checkpoint(device_run.find_checkpoint(parts, "final.pt", tmp_path / "j1"))["model"]
    original = Trainer.__init__

    def check_start(self, *args, **kwargs):  # the warm-started network, before its first step
        original(self, *args, **kwargs)
        assert all(torch.equal(v, weights[k]) for k, v in self.student.state_dict().items())

    monkeypatch.setattr(Trainer, "__init__", check_start)
    second = call(tmp_path, data, "g2", "--init", str(parts), "--steps", "3")
    monkeypatch.undo()
    assert (second["call"], second["start_step"], second["end_step"]) == (1, 0, 3)
    assert (second["init_checkpoint"], second["steps_before"], second["config"]["init_checkpoint"]) == \
        (str(parts), 2, str(tmp_path / "work" / "tiny" / "init" / "final.pt"))
    final = load_checkpoint(device_run.find_checkpoint(tmp_path / "g2" / "tiny", "final.pt", tmp_path / "j2"))
    assert trained_steps(final) == 5
    argv = ["--config", "lite_student", "--name", "tiny", "--out", str(tmp_path / "g3"), "--work", str(tmp_path / "w3"),
            "--data", str(data), "--init", str(parts), "--resume", str(tmp_path / "g2" / "tiny")]
    assert device_run.main(argv) == 2 and not (tmp_path / "w3").exists()  # refused before any work
    assert "which holds a last.pt: the resume continues from its weights; drop --init" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a folder holding final.pt"):
        device_run.checkpoint_file(tmp_path / "w3", tmp_path / "scratch", "--init")


def test_hand_back_keeps_within_the_return_limits(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "last.pt").write_bytes(b"l" * 3000)   # 3 parts of 1 KiB + manifest
    (work / "final.pt").write_bytes(b"f" * 1000)  # 1 part + manifest
    written, notes = device_run.hand_back(work, tmp_path / "out", False, 1024 / 2**20, max_files=5, max_total_mib=1)
    assert written == ["last.pt.part000", "last.pt.part001", "last.pt.part002", "last.pt.parts.json"]
    assert len(notes) == 1 and notes[0].startswith("final.pt")
    written, notes = device_run.hand_back(work, tmp_path / "out", True, 1024 / 2**20, max_files=5, max_total_mib=1)
    assert written == ["final.pt.part000", "final.pt.parts.json"] and notes[0].startswith("last.pt")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)


def test_a_half_written_synthetic_set_is_named_not_written_over(tmp_path):
    """A folder without synth_meta.json (a stopped generation, or another dataset) is refused by --data."""
    from training.device_run import ensure_synth

    (tmp_path / "gathered_data").mkdir()
    with pytest.raises(ValueError, match="--data .* holds no finished synthetic set"):
        ensure_synth(tmp_path, scenes=1, frames_per_scene=1, seed=0, width=64, height=64, val_fraction=0.0, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["gathered_data"]
