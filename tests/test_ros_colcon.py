"""The package builds with colcon as on a robot (``colcon build``), and installs what ros2 run/launch need.

colcon-core, colcon-ros and colcon-python-setup-py come from PyPI (setup.py ``dev`` extras); the
build runs on a copy of the package in a temporary workspace (no rosdep, no ROS 2 needed for an
ament_python package).
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "discene_ros" / "data"


def _setup_kwargs(monkeypatch) -> dict:
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_package_data_lists_every_data_file_without_recursive_globs(monkeypatch):
    """``data/**/*`` is not recursive on Ubuntu 22.04's setuptools 59.6: list the files themselves."""
    patterns = _setup_kwargs(monkeypatch)["package_data"]["discene_ros"]
    assert not any("*" in p for p in patterns)
    expected = {str(p.relative_to(ROOT / "discene_ros")) for p in DATA.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert set(patterns) == expected and any(p.startswith("data/sample_dataset/posed_images/") for p in patterns)


def _copy_package(dest: Path) -> None:
    """The files a clone has (git ls-files), or the tree without build outputs when git is unavailable."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "build", "install", "log", "__pycache__",
                                                                  "*.egg-info", ".pytest_cache", "*.so"))
        return
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _colcon_build(ws: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """``colcon build [options]`` of a copy of the package in ``ws/src``: the finished process and the environment
    it ran in (no ROS environment, and the kernel switch unset: this tests what the build installs, on a suite run
    with the kernel off as well)."""
    pytest.importorskip("colcon_core", reason="colcon is not installed (pip install -e '.[dev]')")
    pytest.importorskip("colcon_ros", reason="colcon-ros is not installed (pip install -e '.[dev]')")
    pytest.importorskip("colcon_python_setup_py", reason="colcon-python-setup-py is not installed")
    _copy_package(ws / "src" / "discene_ros")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AMENT_", "COLCON_")) and k != "DISCENE_NATIVE_POSTPROCESS"}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from colcon_core.command import main; sys.exit(main())",
         "--log-base", "log", "build", "--base-paths", "src", "--executor", "sequential",
         "--event-handlers", "console_direct-", *options],
        cwd=ws, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, env


def _kernel_probe(path: Path, env: dict[str, str], cwd: Path) -> list[str]:
    """What ``native_postprocess.available()`` says, and the module's file, with ``path`` on PYTHONPATH."""
    probe = subprocess.run([sys.executable, "-c", "from models import native_postprocess as n; "
                            "print(n.available(), n.__file__)"], cwd=cwd, capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(path)}, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return probe.stdout.split()


def test_colcon_build_installs_launch_config_rviz_node_and_data(tmp_path):
    ws = tmp_path / "ws"
    proc, env = _colcon_build(ws)
    prefix = ws / "install" / "discene_ros"
    share = prefix / "share" / "discene_ros"
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "discene_ros").is_file()
    for rel in ("package.xml", "launch/occupancy.launch.py", "config/occupancy.yaml", "rviz/discene.rviz"):
        assert (share / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    node = prefix / "lib" / "discene_ros" / "occupancy_node"
    assert node.is_file() and os.access(node, os.X_OK)
    (site,) = (prefix / "lib").glob("python3*/site-packages")
    installed = {str(p.relative_to(site / "discene_ros" / "data")) for p in (site / "discene_ros" / "data").rglob("*")
                 if p.is_file()}
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert installed == shipped
    assert (site / "discene_ros" / "node.py").is_file() and (site / "models" / "network.py").is_file()
    # the CPU post-processing kernel is compiled by the build (optional: a failure would only log)
    assert list((site / "models").glob("_occupancy_native*.so")), proc.stdout[-3000:]
    assert _kernel_probe(site, env, tmp_path) == ["True", str(site / "models" / "native_postprocess.py")]


def test_colcon_symlink_install_runs_the_sources_with_the_kernel_built(tmp_path):
    """``colcon build --symlink-install``, how many robot workspaces build: the launch file, parameters, RViz
    config and node script are links to the sources (an edit needs no rebuild), the package is imported from the
    build folder that colcon's develop hook puts on PYTHONPATH, and the kernel is built beside the sources."""
    ws = tmp_path / "ws"
    _, env = _colcon_build(ws, "--symlink-install")
    src, share = ws / "src" / "discene_ros", ws / "install" / "discene_ros" / "share" / "discene_ros"
    for rel in ("package.xml", "launch/occupancy.launch.py", "config/occupancy.yaml", "rviz/discene.rviz"):
        assert (share / rel).resolve() == (src / rel).resolve(), rel
    node = ws / "install" / "discene_ros" / "lib" / "discene_ros" / "occupancy_node"
    assert node.resolve() == (src / "scripts" / "occupancy_node").resolve() and os.access(node, os.X_OK)
    hook = ws / "build" / "discene_ros" / "share" / "discene_ros" / "hook" / "pythonpath_develop.dsv"
    kind, variable, path = hook.read_text().strip().split(";")
    assert (kind, variable) == ("prepend-non-duplicate", "PYTHONPATH")
    available, module = _kernel_probe(Path(path), env, tmp_path)
    assert available == "True" and Path(module).resolve() == (src / "models" / "native_postprocess.py").resolve()
    assert list((src / "models").glob("_occupancy_native*.so"))
