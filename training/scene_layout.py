"""Procedural indoor rooms made of axis-aligned boxes (room frame), for the synthetic generator.

Room frame: x, y along the walls, z up, floor top surface at ``FLOOR_TOP`` (inside the lowest voxel
layer, so the floor lands in layer 0 of a grid placed with ``floor_z = 0``), interior
``[0, Lx] x [0, Ly] x [FLOOR_TOP, H]``. The world frame is the room frame rotated by ``yaw`` about z
and shifted by ``offset``. Every primitive is one box with a class label and an appearance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.classes import CLASS_NAMES

LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}
FLOOR_TOP = 0.05
SLAB = 0.12  # wall / floor / ceiling thickness: thick enough to be watertight in a 0.08 m grid

# Texture kinds used by the renderer.
TEX_PLAIN, TEX_WOOD, TEX_TILES, TEX_FABRIC, TEX_SCREEN, TEX_WINDOW = range(6)


@dataclass
class Room:
    """A room: its boxes (room frame) with labels, colours (RGB 0..1), textures, and its placement."""

    size: np.ndarray                      # (3,) Lx, Ly, H
    yaw: float                            # room frame -> world rotation about z (radians)
    offset: np.ndarray                    # (3,) room origin in world (z = 0)
    lo: list = field(default_factory=list)
    hi: list = field(default_factory=list)
    label: list = field(default_factory=list)
    color: list = field(default_factory=list)
    texture: list = field(default_factory=list)
    footprints: list = field(default_factory=list)  # (x0, y0, x1, y1, top) of floor-standing items

    def add(self, lo, hi, label: str, color, texture: int = TEX_PLAIN) -> None:
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        if np.any(hi <= lo):
            raise ValueError(f"degenerate box {lo} {hi} for {label}")
        self.lo.append(lo)
        self.hi.append(hi)
        self.label.append(LABEL[label])
        self.color.append(np.clip(np.asarray(color, float), 0.0, 1.0))
        self.texture.append(texture)

    def arrays(self) -> dict[str, np.ndarray]:
        """Boxes as arrays: lo, hi (N,3) float32, label (N,) uint8, color (N,3) float32, texture (N,) int."""
        return {"lo": np.array(self.lo, np.float32), "hi": np.array(self.hi, np.float32),
                "label": np.array(self.label, np.uint8), "color": np.array(self.color, np.float32),
                "texture": np.array(self.texture, np.int64)}

    def room_to_world(self) -> np.ndarray:
        """4x4 transform from the room frame to the world frame."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        t = np.eye(4)
        t[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
        t[:3, 3] = self.offset
        return t


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.08) -> np.ndarray:
    return np.clip(np.asarray(rgb, float) + rng.normal(0.0, amount, 3), 0.0, 1.0)


# Appearance palettes (real-world-like colours; the class colours of renders are separate).
WALL_COLORS = [(0.86, 0.84, 0.80), (0.80, 0.82, 0.78), (0.88, 0.80, 0.70), (0.70, 0.76, 0.82), (0.92, 0.92, 0.90)]
FLOOR_COLORS = [(0.55, 0.38, 0.22), (0.62, 0.50, 0.36), (0.45, 0.45, 0.47), (0.72, 0.70, 0.66), (0.36, 0.26, 0.18)]
WOOD_COLORS = [(0.58, 0.40, 0.24), (0.70, 0.55, 0.38), (0.35, 0.24, 0.16), (0.85, 0.82, 0.76), (0.25, 0.25, 0.27)]
FABRIC_COLORS = [(0.35, 0.40, 0.55), (0.55, 0.30, 0.28), (0.45, 0.50, 0.40), (0.60, 0.58, 0.55), (0.25, 0.25, 0.30)]
BEDDING_COLORS = [(0.92, 0.92, 0.90), (0.70, 0.78, 0.88), (0.88, 0.80, 0.70), (0.80, 0.70, 0.80)]


def _pick(rng: np.random.Generator, palette) -> np.ndarray:
    return _jitter(rng, palette[rng.integers(len(palette))], 0.05)


def build_structure(rng: np.random.Generator) -> Room:
    """Floor, ceiling, four walls and 1-3 windows of a random room with a random world yaw and offset."""
    size = np.array([rng.uniform(3.0, 7.0), rng.uniform(3.0, 7.0), rng.uniform(2.4, 3.1)])
    room = Room(size=size, yaw=float(rng.uniform(-np.pi, np.pi)),
                offset=np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 0.0]))
    lx, ly, h = size
    t = SLAB
    floor_tex = TEX_WOOD if rng.random() < 0.6 else TEX_TILES
    room.add([-t, -t, -0.1], [lx + t, ly + t, FLOOR_TOP], "floor", _pick(rng, FLOOR_COLORS), floor_tex)
    room.add([-t, -t, h], [lx + t, ly + t, h + t], "ceiling", _jitter(rng, (0.93, 0.93, 0.92), 0.03))
    wall = _pick(rng, WALL_COLORS)
    room.add([-t, -t, -0.1], [0, ly + t, h + t], "wall", wall)
    room.add([lx, -t, -0.1], [lx + t, ly + t, h + t], "wall", wall)
    room.add([-t, -t, -0.1], [lx + t, 0, h + t], "wall", wall)
    room.add([-t, ly, -0.1], [lx + t, ly + t, h + t], "wall", wall)
    for wall_id in rng.choice(4, size=int(rng.integers(1, 4)), replace=False):
        _add_window(room, rng, int(wall_id))
    return room


def _add_window(room: Room, rng: np.random.Generator, wall_id: int) -> None:
    lx, ly, h = room.size
    length = lx if wall_id in (0, 1) else ly  # walls 0/1 run along x (y = 0 / y = Ly), 2/3 along y
    width = min(rng.uniform(0.8, 1.8), length - 0.6)
    start = rng.uniform(0.3, length - width - 0.3)
    sill = rng.uniform(0.7, 1.0)
    top = min(sill + rng.uniform(1.0, 1.5), h - 0.15)
    color = _jitter(rng, (0.75, 0.85, 0.95), 0.05)
    inset, depth = 0.03, SLAB + 0.03  # pane protrudes a little so rays hit it before the wall
    if wall_id == 0:
        room.add([start, -SLAB, sill], [start + width, inset, top], "window", color, TEX_WINDOW)
    elif wall_id == 1:
        room.add([start, ly - inset, sill], [start + width, ly - inset + depth, top], "window", color, TEX_WINDOW)
    elif wall_id == 2:
        room.add([-SLAB, start, sill], [inset, start + width, top], "window", color, TEX_WINDOW)
    else:
        room.add([lx - inset, start, sill], [lx - inset + depth, start + width, top], "window", color, TEX_WINDOW)


# ---------------------------------------------------------------- furniture in a local item frame
# Item frame: x along the item's width, y from its back (y = 0) to its front (y = depth), z up from
# the floor top. Parts are (lo, hi, label, colour, texture).

def _legs(w: float, d: float, h: float, s: float, label: str, color) -> list:
    return [((x, y, 0), (x + s, y + s, h), label, color, TEX_WOOD)
            for x in (0.02, w - s - 0.02) for y in (0.02, d - s - 0.02)]


def make_bed(rng):
    w, d = rng.uniform(1.0, 1.9), rng.uniform(1.9, 2.15)
    hb = rng.uniform(0.4, 0.6)
    frame, bedding = _pick(rng, WOOD_COLORS), _pick(rng, BEDDING_COLORS)
    parts = [((0, 0, 0), (w, d, hb - 0.15), "bed", frame, TEX_WOOD),
             ((0.03, 0.03, hb - 0.15), (w - 0.03, d - 0.03, hb), "bed", bedding, TEX_FABRIC),
             ((0, 0, 0), (w, 0.08, hb + rng.uniform(0.4, 0.7)), "bed", frame, TEX_WOOD)]
    n_pillows = 1 if w < 1.3 else 2
    pw = (w - 0.2) / n_pillows
    for i in range(n_pillows):
        x0 = 0.1 + i * pw
        parts.append(((x0 + 0.03, 0.12, hb), (x0 + pw - 0.03, 0.5, hb + 0.14), "objects",
                      _pick(rng, BEDDING_COLORS), TEX_FABRIC))
    return parts, (w, d)


def make_sofa(rng):
    w, d = rng.uniform(1.4, 2.4), rng.uniform(0.8, 1.0)
    c = _pick(rng, FABRIC_COLORS)
    seat, back, arm = rng.uniform(0.38, 0.48), rng.uniform(0.75, 0.95), 0.18
    return [((0, 0, 0), (w, d, seat), "sofa", c, TEX_FABRIC),
            ((0, 0, seat), (w, 0.22, back), "sofa", c, TEX_FABRIC),
            ((0, 0.22, seat), (arm, d, seat + 0.2), "sofa", c, TEX_FABRIC),
            ((w - arm, 0.22, seat), (w, d, seat + 0.2), "sofa", c, TEX_FABRIC)], (w, d)


def make_table(rng):
    w, d = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0)
    h, top = rng.uniform(0.70, 0.78), rng.uniform(0.05, 0.07)
    c = _pick(rng, WOOD_COLORS)
    return [((0, 0, h - top), (w, d, h), "table", c, TEX_WOOD)] + _legs(w, d, h - top, 0.06, "table", c), (w, d)


def make_chair(rng):
    w = rng.uniform(0.42, 0.52)
    seat = rng.uniform(0.42, 0.48)
    c = _pick(rng, WOOD_COLORS if rng.random() < 0.6 else FABRIC_COLORS)
    return [((0, 0, seat - 0.06), (w, w, seat), "chair", c, TEX_PLAIN),
            ((0, 0, seat), (w, 0.06, seat + rng.uniform(0.35, 0.5)), "chair", c, TEX_PLAIN)] + \
        _legs(w, w, seat - 0.06, 0.05, "chair", c), (w, w)


def make_cabinet(rng):
    w, d, h = rng.uniform(0.5, 1.6), rng.uniform(0.35, 0.6), rng.uniform(0.5, 2.0)
    return [((0, 0, 0), (w, d, h), "furniture", _pick(rng, WOOD_COLORS), TEX_WOOD)], (w, d)


def make_shelf(rng):
    w, d, h = rng.uniform(0.6, 1.4), rng.uniform(0.28, 0.4), rng.uniform(1.2, 2.1)
    c = _pick(rng, WOOD_COLORS)
    parts = [((0, 0, 0), (w, 0.03, h), "furniture", c, TEX_WOOD),
             ((0, 0, 0), (0.05, d, h), "furniture", c, TEX_WOOD),
             ((w - 0.05, 0, 0), (w, d, h), "furniture", c, TEX_WOOD)]
    n = int(rng.integers(3, 6))
    for i in range(n + 1):
        z = i * (h - 0.05) / n
        parts.append(((0.05, 0, z), (w - 0.05, d, z + 0.05), "furniture", c, TEX_WOOD))
        if i < n and rng.random() < 0.7:  # books / boxes on the shelf
            bw = rng.uniform(0.2, w - 0.2)
            x0 = rng.uniform(0.05, w - 0.05 - bw)
            parts.append(((x0, 0.04, z + 0.05), (x0 + bw, d - 0.04, z + 0.05 + rng.uniform(0.15, 0.28)),
                          "objects", _jitter(rng, rng.uniform(0.2, 0.9, 3), 0.05), TEX_PLAIN))
    return parts, (w, d)


def make_tv_stand(rng):
    w, d, h = rng.uniform(1.0, 1.8), rng.uniform(0.35, 0.5), rng.uniform(0.4, 0.6)
    tw = rng.uniform(0.8, min(1.5, w))
    th = tw * 0.58
    x0 = (w - tw) / 2
    return [((0, 0, 0), (w, d, h), "furniture", _pick(rng, WOOD_COLORS), TEX_WOOD),
            ((x0, 0.1, h), (x0 + tw, 0.18, h + th), "tv", _jitter(rng, (0.08, 0.08, 0.1), 0.02), TEX_SCREEN),
            ((w / 2 - 0.15, 0.05, h), (w / 2 + 0.15, 0.25, h + 0.04), "tv", (0.1, 0.1, 0.1), TEX_PLAIN)], (w, d)


def make_wall_tv(rng):
    tw = rng.uniform(0.8, 1.6)
    z0 = rng.uniform(0.9, 1.3)
    return [((0, 0, z0), (tw, 0.09, z0 + tw * 0.58), "tv", _jitter(rng, (0.08, 0.08, 0.1), 0.02), TEX_SCREEN)], \
        (tw, 0.09)


def make_floor_object(rng):
    w, d, h = rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.7)
    return [((0, 0, 0), (w, d, h), "objects", _jitter(rng, rng.uniform(0.15, 0.9, 3), 0.05), TEX_PLAIN)], (w, d)


AGAINST_WALL = {"bed": make_bed, "sofa": make_sofa, "cabinet": make_cabinet, "shelf": make_shelf,
                "tv_stand": make_tv_stand, "wall_tv": make_wall_tv}


def _rotate_parts(parts, k: int, size) -> list:
    """Rotate item-frame parts by k * 90 degrees about z, keeping them in the positive quadrant.

    One step maps (x, y) -> (d - y, x) for an item of size (w, d): the back (y = 0) goes to x = max.
    """
    out = []
    for lo, hi, label, color, tex in parts:
        x0, y0, x1, y1 = lo[0], lo[1], hi[0], hi[1]
        w, d = size
        for _ in range(k % 4):
            x0, y0, x1, y1 = d - y1, x0, d - y0, x1
            w, d = d, w
        out.append(((x0, y0, lo[2]), (x1, y1, hi[2]), label, color, tex))
    return out


def _footprint_free(room: Room, x0: float, y0: float, x1: float, y1: float, gap: float = 0.1) -> bool:
    lx, ly, _ = room.size
    if x0 < -1e-6 or y0 < -1e-6 or x1 > lx + 1e-6 or y1 > ly + 1e-6:
        return False
    return all(x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
               for a0, b0, a1, b1, _ in room.footprints)


def _place(room: Room, parts, size, k: int, x: float, y: float) -> bool:
    """Put rotated parts with their footprint corner at (x, y) on the floor if the spot is free."""
    w, d = size if k % 2 == 0 else size[::-1]
    if not _footprint_free(room, x, y, x + w, y + d):
        return False
    top = 0.0
    for lo, hi, label, color, tex in _rotate_parts(parts, k, size):
        room.add([x + lo[0], y + lo[1], FLOOR_TOP + lo[2]], [x + hi[0], y + hi[1], FLOOR_TOP + hi[2]],
                 label, color, tex)
        top = max(top, hi[2])
    room.footprints.append((x, y, x + w, y + d, FLOOR_TOP + top))
    return True


def place_against_wall(room: Room, rng: np.random.Generator, parts, size) -> bool:
    """Place an item with its back to a random wall (rotation chosen so the back touches the wall)."""
    lx, ly, _ = room.size
    w, d = size
    for _ in range(10):
        wall = int(rng.integers(4))
        # k: 0 back at y=0, 2 back at y=Ly, 1 back at x=Lx, 3 back at x=0 (see _rotate_parts).
        if wall == 0:
            k, x, y = 0, rng.uniform(0, max(lx - w, 0)), 0.0
        elif wall == 1:
            k, x, y = 2, rng.uniform(0, max(lx - w, 0)), ly - d
        elif wall == 2:
            k, x, y = 3, 0.0, rng.uniform(0, max(ly - w, 0))
        else:
            k, x, y = 1, lx - d, rng.uniform(0, max(ly - w, 0))
        if _place(room, parts, size, k, x, y):
            return True
    return False


def place_free(room: Room, rng: np.random.Generator, parts, size, margin: float = 0.3) -> tuple | None:
    """Place an item at a random free spot and rotation; returns its footprint or None."""
    lx, ly, _ = room.size
    for _ in range(15):
        k = int(rng.integers(4))
        w, d = size if k % 2 == 0 else size[::-1]
        if lx - w - 2 * margin <= 0 or ly - d - 2 * margin <= 0:
            return None
        x, y = rng.uniform(margin, lx - w - margin), rng.uniform(margin, ly - d - margin)
        if _place(room, parts, size, k, x, y):
            return room.footprints[-1]
    return None


def _objects_on_top(room: Room, rng: np.random.Generator, footprint, n: int) -> None:
    x0, y0, x1, y1, top = footprint
    for _ in range(n):
        w, d, h = rng.uniform(0.08, 0.35), rng.uniform(0.08, 0.3), rng.uniform(0.06, 0.35)
        if x1 - x0 < w + 0.1 or y1 - y0 < d + 0.1:
            continue
        x, y = rng.uniform(x0 + 0.05, x1 - w - 0.05), rng.uniform(y0 + 0.05, y1 - d - 0.05)
        room.add([x, y, top], [x + w, y + d, top + h], "objects", _jitter(rng, rng.uniform(0.1, 0.95, 3), 0.05))


def furnish(room: Room, rng: np.random.Generator) -> None:
    """Add furniture of all 11 classes with random counts: wall items, table groups, small objects."""
    kinds = ["bed"] * int(rng.random() < 0.5) + ["sofa"] * int(rng.random() < 0.6) + \
        ["tv_stand"] * int(rng.random() < 0.6) + ["wall_tv"] * int(rng.random() < 0.4) + \
        ["cabinet"] * int(rng.integers(0, 3)) + \
        ["shelf"] * int(rng.integers(0, 3))
    rng.shuffle(kinds)
    for kind in kinds:
        parts, size = AGAINST_WALL[kind](rng)
        if place_against_wall(room, rng, parts, size) and kind == "cabinet" and room.footprints[-1][4] < 1.3:
            _objects_on_top(room, rng, room.footprints[-1], int(rng.integers(0, 3)))
    for _ in range(int(rng.integers(1, 3))):
        parts, size = make_table(rng)
        fp = place_free(room, rng, parts, size)
        if fp is None:
            continue
        _objects_on_top(room, rng, fp, int(rng.integers(0, 4)))
        _chairs_around(room, rng, fp, int(rng.integers(0, 5)))
    for _ in range(int(rng.integers(0, 3))):
        parts, size = make_chair(rng)
        place_free(room, rng, parts, size)
    for _ in range(int(rng.integers(0, 4))):
        parts, size = make_floor_object(rng)
        place_free(room, rng, parts, size, margin=0.05)


def _chairs_around(room: Room, rng: np.random.Generator, table_fp, n: int) -> None:
    x0, y0, x1, y1, _ = table_fp
    for side in rng.permutation(4)[:n]:
        parts, size = make_chair(rng)
        w = size[0]
        # The chair's front faces the table: k rotates the back away from it.
        if side == 0:
            k, x, y = 0, rng.uniform(x0, max(x0, x1 - w)), y0 - w - 0.12
        elif side == 1:
            k, x, y = 2, rng.uniform(x0, max(x0, x1 - w)), y1 + 0.12
        elif side == 2:
            k, x, y = 3, x0 - w - 0.12, rng.uniform(y0, max(y0, y1 - w))
        else:
            k, x, y = 1, x1 + 0.12, rng.uniform(y0, max(y0, y1 - w))
        _place(room, parts, size, k, x, y)


def build_room(rng: np.random.Generator) -> Room:
    """A furnished random room."""
    room = build_structure(rng)
    furnish(room, rng)
    return room
