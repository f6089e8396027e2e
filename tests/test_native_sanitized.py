"""The native kernel under the sanitizers (``scripts/sanitize_native.sh``): its helper thread's protocol under
ThreadSanitizer (``tests/native/helper_race.c``), then its own tests against an AddressSanitizer +
UndefinedBehaviorSanitizer build of it. The kernel reads robot input, so a data race, an invalid read or write, a
signed overflow or a misaligned access in it fails the suite, not a robot."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every entry point of the kernel, with valid and hostile arguments: post-processing (closing, several threads, a
# late helper, NaN, empty input, buffer checks), the cloud rows, the resize and normalisation, the frame's geometry;
# not the tests that time, load the shipped model or build pipelines (minutes under the sanitizers, no kernel paths);
# without hypothesis's pytest plugin, which none of them uses (2.5 s of the run's start-up under the sanitizers)
SELECTION = ["tests/test_native_postprocess.py", "tests/test_native_geometry.py", "tests/test_native_arguments.py",
             "-k", "not benchmark and not pipeline and not shipped and not stale", "-p", "no:hypothesispytest"]


def _sanitizer_runtimes_missing() -> str | None:
    """Why the sanitized build cannot be made here, or None."""
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        return "no gcc or nm"
    for lib in ("libasan.so", "libubsan.so"):
        found = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not Path(found).is_absolute():  # gcc echoes the bare name when it has no such runtime
            return f"gcc has no {lib}"
    if not (ROOT / ".git").exists():
        return "not a git checkout (the script copies the tree with git ls-files)"
    return None


@pytest.mark.skipif(_sanitizer_runtimes_missing() is not None, reason=str(_sanitizer_runtimes_missing()))
def test_kernel_is_clean_under_thread_address_and_undefined_behaviour_sanitizers():
    # a clean environment for it (this suite may itself run under the sanitizers, sanitize_native.sh tests/, or
    # with the kernel switched off: the script tests the kernel all the same)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "DISCENE_NATIVE_POSTPROCESS")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_native.sh"), *SELECTION], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "-fsanitize=address,undefined build of the kernel" in output
    tsan = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if Path(tsan).is_absolute():
        assert "ok: helper ran" in output, output[-3000:]
    assert " passed" in output and " failed" not in output, output[-2000:]
