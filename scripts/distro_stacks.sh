#!/usr/bin/env bash
# The test suite on the ROS 2 distros' own Python stacks (docs/results/distro_stacks.md). A robot runs the node
# with its Ubuntu release's apt packages (package.xml's rosdep keys) and a pip-installed torch; this machine has
# much newer ones. Per stack: a throwaway venv pinned to that release's packages, a clone of this repository's
# HEAD (../shared linked beside it), the native kernel built for that interpreter, then pytest.
#
#   bash scripts/distro_stacks.sh                          # humble, jazzy and jetpack6, the whole suite each
#   bash scripts/distro_stacks.sh humble -- tests/test_ros_node.py -x   # some stacks, any pytest arguments
#
# Stacks: humble (Ubuntu 22.04: Python 3.10, numpy 1.21.5, Pillow 9.0.1, PyYAML 5.4.1, OpenCV 4.5.4, tqdm 4.57.0),
# jazzy (Ubuntu 24.04: Python 3.12, numpy 1.26.4, Pillow 10.2.0, PyYAML 6.0.1, OpenCV 4.6.0, tqdm 4.66.2), both
# with torch 2.13.0; jetpack6 (humble's packages with torch 2.3.1, JetPack 6.0's release). PyPI's x86 torch
# builds for 3.10 and 3.12 are CUDA builds (about 3 GB with their libraries) that run on the CPU. OpenCV is
# PyPI's headless wheel of the distro's release, not apt's own build. STACKS_DIR (default /tmp/discene-stacks)
# holds the venvs and clones; an existing venv is reused. PYTHON310 / PYTHON312 name the interpreters where
# python3.10 / python3.12 are not on PATH (pyenv installs are found by themselves).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${STACKS_DIR:-/tmp/discene-stacks}"
stacks=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do stacks+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ "${#stacks[@]}" -eq 0 ] && stacks=(humble jazzy jetpack6)
[ "$#" -eq 0 ] && set -- tests -rs

# the rest of the dev extra (setup.py), which the distros do not ship
dev_tools=("pytest>=8.0" "ruff>=0.5" "tensorboard>=2.14" "rosbags>=0.11" "colcon-core>=0.15" "colcon-ros>=0.4"
           "colcon-python-setup-py>=0.2.8" "colcon-recursive-crawl>=0.2.1" "catkin-pkg>=1.0" "lark>=1.1"
           "osrf-pycommon>=2.0" "cuda-bindings>=12.8")
humble_pins=(numpy==1.21.5 pillow==9.0.1 pyyaml==5.4.1 opencv-python-headless==4.5.4.60 tqdm==4.57.0 scipy==1.10.1
             onnx==1.16.2 onnxruntime==1.12.1)  # onnxruntime 1.12: the newest that accepts numpy 1.21
jazzy_pins=(numpy==1.26.4 pillow==10.2.0 pyyaml==6.0.1 opencv-python-headless==4.6.0.66 tqdm==4.66.2 scipy==1.11.4
            onnx==1.16.2 onnxruntime==1.19.2)

interpreter() {  # interpreter MAJOR.MINOR: a python of that version
    local version=$1 named
    named="PYTHON${version/./}"
    if [ -n "${!named:-}" ]; then echo "${!named}"; return; fi
    if "python$version" -c "" 2>/dev/null; then command -v "python$version"; return; fi
    if command -v pyenv > /dev/null; then
        local found
        found="$(pyenv versions --bare | grep -E "^${version//./\\.}\.[0-9]+$" | tail -1)"
        if [ -n "$found" ]; then echo "$(pyenv root)/versions/$found/bin/python"; return; fi
    fi
    echo "distro_stacks: no Python $version (set $named)" >&2
    return 1
}

prepare() {  # prepare STACK: venv and clone, once
    local stack=$1 version torch pins
    case $stack in
        humble) version=3.10 torch=2.13.0 pins=("${humble_pins[@]}") ;;
        jetpack6) version=3.10 torch=2.3.1 pins=("${humble_pins[@]}") ;;
        jazzy) version=3.12 torch=2.13.0 pins=("${jazzy_pins[@]}") ;;
        *) echo "distro_stacks: unknown stack $stack (humble, jazzy, jetpack6)" >&2; return 2 ;;
    esac
    local venv="$work/$stack/venv" pip="$work/$stack/venv/bin/pip"
    if [ ! -x "$venv/bin/python" ]; then
        "$(interpreter "$version")" -m venv "$venv"
        printf '%s\n' "${pins[@]}" > "$work/$stack/constraints.txt"
        if printf '%s\n' "${pins[@]}" | grep -qx "pyyaml==5.4.1"; then
            # PyYAML 5.4.1 has no wheel for 3.10 and its sdist does not build with Cython 3 or build isolation
            "$pip" install -q "cython<3" wheel "setuptools<70"
            "$pip" install -q --no-build-isolation pyyaml==5.4.1
        fi
        "$pip" install -q "setuptools>=77.0.3" "torch==$torch" "${pins[@]}" "${dev_tools[@]}" \
            -c "$work/$stack/constraints.txt"
        "$pip" check
    fi
    local tree="$work/$stack/main"
    rm -rf "$tree"
    git clone -q "$repo" "$tree"
    [ -e "$repo/../shared" ] && ln -sfn "$(cd "$repo/../shared" && pwd)" "$work/$stack/shared"
    (cd "$tree" && "$pip" install -q -e . --no-deps && "$venv/bin/python" setup.py -q build_ext --inplace)
}

mkdir -p "$work"
status=0
for stack in "${stacks[@]}"; do
    mkdir -p "$work/$stack"
    prepare "$stack"
    venv="$work/$stack/venv"
    echo "=== $stack: $("$venv/bin/python" -c 'import sys, numpy, PIL, yaml, cv2, torch, onnxruntime
print("Python", sys.version.split()[0], "numpy", numpy.__version__, "Pillow", PIL.__version__, "PyYAML", yaml.__version__,
      "OpenCV", cv2.__version__, "torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'), $(git -C "$repo" rev-parse --short HEAD)"
    (cd "$work/$stack/main" && PATH="$venv/bin:$PATH" python -m pytest -q -p no:cacheprovider "$@") \
        2>&1 | tee "$work/$stack/pytest.log" | tail -n 25 || status=1  # pipefail: pytest's exit code
done
exit $status
