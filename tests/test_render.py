"""Grid renders and comparison panels: sizes, class colours, hidden classes, PNG output."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.classes import CLASS_COLORS
from training.render import colorize_depth, render_grid, render_panel


def _has_colour(image: Image.Image, rgb, tol: int = 6) -> bool:
    a = np.asarray(image).astype(int)
    return bool((np.abs(a - np.asarray(rgb, int)).max(axis=-1) <= tol).any())


def _grid() -> np.ndarray:
    g = np.full((60, 60, 36), 255, np.uint8)
    g[5:55, 5:55, 1:] = 0
    g[5:55, 5:55, 0] = 2          # floor
    g[20:30, 20:30, 1:6] = 5      # a chair block
    g[5:55, 5:55, 30] = 1         # ceiling (hidden by default)
    return g


def test_render_grid_size_and_colours():
    im = render_grid(_grid(), size=(200, 150))
    assert im.size == (200, 150) and im.mode == "RGB"
    assert _has_colour(im, CLASS_COLORS[2])        # floor tops drawn unshaded
    assert _has_colour(im, CLASS_COLORS[5])        # chair tops
    assert not _has_colour(im, CLASS_COLORS[1])    # ceiling hidden
    shown = render_grid(_grid(), size=(200, 150), hide=())
    assert _has_colour(shown, CLASS_COLORS[1])
    empty = render_grid(np.zeros((60, 60, 36), np.uint8), size=(64, 48))
    assert np.asarray(empty).min() == 255          # nothing drawn on an empty grid
    with pytest.raises(ValueError, match="label grid"):
        render_grid(np.zeros((60, 60)))


def test_render_panel_writes_png(tmp_path):
    rgb = np.full((120, 160, 3), 100, np.uint8)
    depth = np.linspace(0.5, 4.0, 120 * 160, dtype=np.float32).reshape(120, 160)
    depth[:10] = 0
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # looking along +x
    pose[:3, 3] = [0.0, 2.4, 1.2]
    out = tmp_path / "panel" / "p.png"
    panel = render_panel(rgb, depth, _grid(), _grid(), cam_pose=pose, voxel_origin=np.array([0.0, 0.0, 0.0]),
                         tile=(160, 120), title="test", out_path=out)
    saved = Image.open(out)
    assert saved.format == "PNG" and saved.size == panel.size
    assert panel.size[0] == 4 * 160 and panel.size[1] > 120


def test_colorize_depth_marks_invalid_black():
    depth = np.array([[0.0, 1.0], [2.0, 3.0]])
    rgb = colorize_depth(depth)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 0).all() and (rgb[1, 1] != rgb[0, 1]).any()


def test_project_labels_puts_a_block_ahead_at_the_image_center():
    from training.render import project_labels

    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # OpenCV camera looking along world +x
    pose[:3, 3] = [0.0, 2.4, 1.2]
    g = np.zeros((60, 60, 36), np.uint8)
    g[35:38, 28:32, 13:17] = 7  # around x = 2.9 m, y = 2.4 m, z = 1.2 m: straight ahead
    g[35:38, 50:54, 13:17] = 9  # y = 4.2 m: to the camera's left
    k = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    img = project_labels(g, k, pose, np.zeros(3), (120, 160))
    assert img[60, 80] == 7
    ys, xs = np.nonzero(img == 9)
    assert len(xs) and xs.max() < 80  # left half of the image
    assert (img == 0).mean() > 0.5
