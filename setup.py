"""Install as a ROS 2 ament_python package (colcon build) or a plain pip package (pip install -e .)."""
import os
from glob import glob

from setuptools import Extension, find_packages, setup

PACKAGE = "discene_ros"


def files_under(folder: str) -> list[str]:
    """Every file below ``folder``, relative to it. Listed explicitly: ``data/**/*`` in package_data is
    not recursive on Ubuntu 22.04's setuptools 59.6, which then leaves the sample dataset out."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names if not name.endswith(".pyc"))


setup(
    name=PACKAGE,
    version="0.1.0",
    description="DiScene: real-time sparse semantic occupancy with multi-level distillation, for ROS 2",
    packages=find_packages(include=["models", "models.*", "training", "training.*", "export", "export.*",
                                    "discene_ros", "discene_ros.*"]),
    package_data={"discene_ros": [os.path.join("data", f) for f in files_under("discene_ros/data")],
                  "training": ["configs/*.yaml"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        # ros2 run / launch look for executables in lib/<package>; pip users get console scripts on PATH.
        (f"lib/{PACKAGE}", ["scripts/occupancy_node"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    # The CPU post-processing kernel (models/native_postprocess.py). Optional: without a C compiler the
    # install still succeeds and post-processing runs as torch ops. -ffp-contract=off: no fused
    # multiply-adds, so that its float32 results are the torch path's bit for bit.
    ext_modules=[Extension("models._occupancy_native", ["models/_occupancy_native.c"], libraries=["m"],
                           extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"], optional=True)],
    python_requires=">=3.10",
    # torch is deliberately not listed: install the CPU wheel (pip install torch==2.13.0) or the
    # robot's own CUDA/Jetson build first, so that pip never pulls a multi-GB CUDA build by itself.
    # Floors = Ubuntu 22.04's apt packages, which a Humble robot runs with (the suite passes with them and with
    # Jazzy's: docs/results/distro_stacks.md); higher floors would make pip shadow apt's numpy in a venv.
    install_requires=["numpy>=1.21", "pyyaml>=5.4", "pillow>=9.0", "tqdm>=4.57"],
    extras_require={
        "train": ["scipy>=1.10", "tensorboard>=2.14"],
        # onnxruntime 1.18.0 allows numpy 2 but does not import with it; 1.18.1 asks for numpy < 2, 1.19 runs on 2
        "export": ["onnx>=1.16", "onnxruntime>=1.18.1"],
        # rosbags 0.10.9: Writer's storage_plugin (mcap writing); 0.11: AnyReader on a lone .mcap / .db3 file,
        # which replay reads a bag folder without usable metadata.yaml from (docs/results/distro_stacks.md)
        "ros": ["rosbags>=0.11"],
        # colcon-* / catkin-pkg: tests build the package with colcon as on a robot; lark / osrf-pycommon:
        # what the real launch packages in ../shared/ros2-python import (tests load the launch file with them)
        "dev": ["pytest>=8.0", "ruff>=0.5", "scipy>=1.10", "tensorboard>=2.14", "onnx>=1.16",
                "onnxruntime>=1.18.1", "rosbags>=0.11", "colcon-core>=0.15", "colcon-ros>=0.4",
                "colcon-python-setup-py>=0.2.8", "colcon-recursive-crawl>=0.2.1", "catkin-pkg>=1.0",
                "lark>=1.1", "osrf-pycommon>=2.0",
                "cuda-bindings>=12.8",  # cuda-python runtime (8 MB wheel): tests probe its call conventions
                # the node's JPEG/PNG decoder on a robot (package.xml: python3-opencv); tests run it and PIL's
                "opencv-python-headless>=4.8"],
    },
    zip_safe=False,  # a compiled extension
    entry_points={
        "console_scripts": [
            "occupancy_node = discene_ros.entry:occupancy_node",
            "discene-replay = discene_ros.replay:main",
            "discene-dataset-to-bag = discene_ros.dataset_to_bag:main",
            "discene-export = export.cli:main",
            "discene-synth = training.synth:main",
            "discene-train = training.train:main",
            "discene-eval = training.evaluate:main",
        ],
    },
)
