"""The GPU calls' shell scripts, run here with every Python entry point parse-only: each option they pass
exists, each config override they set is a valid key, and the values read from one step's JSON reach
the next. A typo in one of them would cost a device session, which no CPU test would otherwise catch."""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from training.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]

# Stands in for the entry points while a script runs: logs each command line (with its working directory and
# environment) and writes what the scripts read back from a benchmark's --json; Python starts without torch here,
# and the commands are parsed afterwards, in the test's process (``parse_command``).
LOGGER = '''
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["PARSE_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}) + "\\n")
out = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--json"), None)
if out and argv[0].endswith("bench_task_loss.py"):
    json.dump({"choice": "fused"}, open(out, "w"))
if out and argv[0].endswith("bench_train_throughput.py"):
    json.dump({"rows": [{"mode": "teacher", "compile": "none", "samples_per_s": 100.0},
                        {"mode": "teacher", "compile": "inductor", "compiled": True, "samples_per_s": 150.0,
                         "first_steps_s": 60.0}]}, open(out, "w"))
'''

SHIM = '''#!/bin/sh
case "$1" in
    benchmarks/*.py|-m) exec "{python}" "{logger}" "$@" ;;
esac
exec "{python}" "$@"
'''


class _Parsed(Exception):
    """Raised by the patched ``parse_args``: the entry point parsed its command line; nothing else runs."""


def parse_command(entry: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One logged command parsed by its entry point's own parser, as it ran (working directory, environment):
    {"prog": the script's path, "options": the parsed options}. A bad option fails here (argparse exits 2)."""
    seen: dict = {}

    def parse(self, args=None, namespace=None):
        seen.update(prog=sys.argv[0], options=vars(original(self, args, namespace)))
        raise _Parsed

    original = argparse.ArgumentParser.parse_args
    with monkeypatch.context() as m:
        m.chdir(entry["cwd"])
        for key in set(os.environ) - set(entry["env"]):
            m.delenv(key)
        for key, value in entry["env"].items():
            m.setenv(key, value)
        m.setattr(argparse.ArgumentParser, "parse_args", parse)
        m.setattr(sys, "path", list(sys.path))  # the benchmarks put the checkout first on it
        argv = entry["argv"]
        m.setattr(sys, "argv", list(argv[1:] if argv[0] == "-m" else argv))
        with pytest.raises(_Parsed):
            if argv[0] == "-m":
                m.delitem(sys.modules, argv[1], raising=False)  # as a fresh ``python -m`` finds it: not imported
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
    return seen


def checkout(tmp_path: Path) -> Path:
    """The repository's files (links) without its git-ignored runs/: a fresh device machine's working tree, whatever
    this checkout holds under runs/device (a carried teacher changes what the teacher call does)."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", ".git"):
            (tree / entry.name).symlink_to(entry)
    return tree


def run_script(tmp_path: Path, script: str, env: dict[str, str],
               tree: Path | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``script`` in ``tree`` (default: a fresh ``checkout``) with its Python entry points logged, not run; (its
    process, each logged command as ``parse_command`` parses it)."""
    tree = tree or checkout(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "logger.py").write_text(LOGGER)
    shim = bin_dir / "python3"
    shim.write_text(SHIM.format(python=sys.executable, logger=tmp_path / "logger.py"))
    shim.chmod(0o755)
    log = tmp_path / "parsed.jsonl"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PARSE_LOG": str(log),
                "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out"), **env}
    done = subprocess.run(["bash", script], cwd=tree, env=full_env, capture_output=True, text=True, timeout=300)
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    with pytest.MonkeyPatch.context() as m:
        return done, [parse_command(entry, m) for entry in entries]


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh")))
def test_every_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_teacher_call_passes_the_search_choice_and_the_faster_teacher_row_to_the_teacher_run(tmp_path):
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {})
    assert done.returncode == 0, done.stdout + done.stderr
    progs = [Path(p["prog"]).name for p in parsed]
    assert progs == ["check_cuda_providers.py", "bench_task_loss.py", "bench_train_throughput.py",
                     "device_run.py"], progs
    providers, search, bench, teacher = (p["options"] for p in parsed)
    assert providers["out"] == str(tmp_path / "out" / "cuda_providers.json")
    assert search["backends"] == "cdist,fused" and search["batch"] == 32 and search["device"] == "cuda"
    assert bench["set"] == ["loss.nn_backend=fused"] and bench["compile"] == ["none", "inductor"]
    assert "nearest-neighbour search: loss.nn_backend=fused" in done.stdout
    # the compiled row gives more samples once its 60 s of compiling are taken off: it trains the teacher
    assert "compile=inductor" in teacher["overrides"] and "loss.nn_backend=fused" in teacher["overrides"], teacher
    assert teacher["max_files"] == 5 and teacher["config"] == "training/configs/lite_teacher.yaml"
    assert int(teacher["steps"]) > 10 and teacher["batch"] == 32
    load_train_config(teacher["config"], teacher["overrides"])  # every override is a config key


def test_teacher_call_with_a_carried_final_pt_continues_the_teacher_for_the_whole_call(tmp_path):
    """A carried teacher/final.pt: no search and no throughput rows (session 21 measured them), the teacher
    warm-started from it (--init, never --resume) with --steps sized from session 21's teacher rate."""
    tree = checkout(tmp_path)
    carried = tree / "runs" / "device" / "teacher"
    carried.mkdir(parents=True)
    (carried / "final.pt.parts.json").write_text("{}")
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {}, tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [Path(p["prog"]).name for p in parsed] == ["check_cuda_providers.py", "device_run.py"]
    teacher = parsed[1]["options"]
    assert teacher["init"] == "runs/device/teacher" and teacher["resume"] is None
    assert "compile=none" in teacher["overrides"] and "loss.nn_backend=fused" in teacher["overrides"], teacher
    assert teacher["max_files"] == 5 and teacher["config"] == "training/configs/lite_teacher.yaml"
    budget = int(re.search(r"(\d+)s budget", done.stdout).group(1))
    assert budget > 500 and teacher["steps"] == int(0.9 * 296.45 * (budget - 75) / 32) and teacher["batch"] == 32
    load_train_config(teacher["config"], [*teacher["overrides"], "init_checkpoint=t.pt"])
    (carried / "last.pt.parts.json").write_text("{}")  # device_train.sh would resume it: refused, nothing runs
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {}, tree)
    assert done.returncode == 2 and parsed == [] and "holds a last.pt" in done.stderr


def test_teacher_call_continues_from_a_committed_checkpoint_named_by_teacher_from(tmp_path):
    """TEACHER_FROM=FILE (a checkpoint of the tree, no carry) is the continuation's --init; a missing file, or a
    carried final.pt beside it, is refused before anything runs."""
    tree = checkout(tmp_path)  # its folders are links into this checkout: the checkpoint goes under its own runs/
    (tree / "runs").mkdir()
    (tree / "runs" / "t.pt").write_bytes(b"")
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {"TEACHER_FROM": "runs/t.pt"}, tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [Path(p["prog"]).name for p in parsed] == ["check_cuda_providers.py", "device_run.py"]
    assert parsed[1]["options"]["init"] == "runs/t.pt" and parsed[1]["options"]["resume"] is None
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {"TEACHER_FROM": "runs/no.pt"}, tree)
    assert done.returncode == 2 and parsed == [] and "no such checkpoint file" in done.stderr
    carried = tree / "runs" / "device" / "teacher"
    carried.mkdir(parents=True)
    (carried / "final.pt.parts.json").write_text("{}")
    done, parsed = run_script(tmp_path, "scripts/device_teacher_call.sh", {"TEACHER_FROM": "runs/t.pt"}, tree)
    assert done.returncode == 2 and parsed == [] and "give one of the two" in done.stderr


def test_ablation_call_runs_the_rows_side_by_side_within_the_budget(tmp_path):
    done, parsed = run_script(tmp_path, "scripts/device_ablation_call.sh", {"NN": "fused"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert [Path(p["prog"]).name for p in parsed] == ["reproduce_ablation.py"]
    options = parsed[0]["options"]
    assert options["jobs"] == 6  # no GPU here: the H100's share; 11 on an H200
    assert options["depth_rows"] and options["seeds"] == [0, 1]
    assert options["fit_s"] == 500.0 and options["publish"] and options["teacher"] == "runs/device/teacher"
    assert options["train_frames"] == 840 and options["val_frames"] == 120 and options["batch"] == 32
    for base in ("lite_student.yaml", "lite_distill.yaml"):  # the overrides every row gets are config keys
        load_train_config(ROOT / "training" / "configs" / base, [*options["overrides"], "teacher_checkpoint=t.pt"])
    assert "loss.nn_backend=fused" in options["overrides"]
    assert (tmp_path / "out" / "ablation_logs.txt").is_file()
