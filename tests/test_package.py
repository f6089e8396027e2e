"""The package metadata is what colcon and pip need: package.xml, setup.py entry points, data files."""
from __future__ import annotations

import ast
import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return node
    raise AssertionError("setup.py has no setup() call")


def test_package_xml_is_format3_ament_python_with_ros_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.attrib["format"] == "3"
    assert root.findtext("name") == "discene_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    for needed in ("rclpy", "sensor_msgs", "visualization_msgs", "diagnostic_msgs", "tf2_ros_py", "cv_bridge",
                   "launch_ros"):
        assert needed in deps, needed
    assert (ROOT / "resource" / "discene_ros").is_file()


def test_console_scripts_point_at_existing_functions():
    call = _setup_call()
    entry_points = next(k.value for k in call.keywords if k.arg == "entry_points")
    scripts = ast.literal_eval(entry_points)["console_scripts"]
    assert scripts, "no console scripts declared"
    for spec in scripts:
        name, target = (s.strip() for s in spec.split("="))
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, func)), f"{name} -> {target} is not callable"


def test_data_files_exist_and_cover_launch_config_rviz():
    launch = list((ROOT / "launch").glob("*.launch.py"))
    assert [p.name for p in launch] == ["occupancy.launch.py"]
    assert list((ROOT / "config").glob("*.yaml")), "config/*.yaml missing"
    assert list((ROOT / "rviz").glob("*.rviz")), "rviz/*.rviz missing"
    assert (ROOT / "scripts" / "occupancy_node").stat().st_mode & 0o111, "node wrapper must be executable"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    command = ci[-1].strip()
    assert command in readme, f"README does not contain the CI test command: {command}"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ ]", req, maxsplit=1)[0].lower() for req in requirements}


def _shell_array(script: str, name: str) -> list[str]:
    body = re.search(rf"^{name}=\((.*?)\)", script, re.S | re.M)
    assert body, f"no array {name} in the script"
    return [item.strip('"') for item in body.group(1).split()]


def test_distro_stacks_installs_setup_pys_dev_extra_on_every_stack():
    """``scripts/distro_stacks.sh`` lists the dev tools apart from the stacks' pins (the dev extra's floors are above
    the distros' releases); together they must stay setup.py's dev extra, and the pins must cover install_requires."""
    kwargs = {k.arg: k.value for k in _setup_call().keywords}
    dev = _requirement_names(ast.literal_eval(kwargs["extras_require"])["dev"])
    required = _requirement_names(ast.literal_eval(kwargs["install_requires"]))
    script = (ROOT / "scripts" / "distro_stacks.sh").read_text()
    tools = _requirement_names(_shell_array(script, "dev_tools"))
    for stack in ("humble", "jazzy"):
        pins = _requirement_names(_shell_array(script, f"{stack}_pins"))
        assert required <= pins, (stack, required - pins)
        assert tools | (pins - required) == dev, (stack, dev ^ (tools | (pins - required)))
