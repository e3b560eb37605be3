"""Procedural indoor scenes: geometry, scene sampling and vectorised numpy ray casting.

Shading, labels and edges are computed from the hits in :func:`atrc_exp.data.synthetic.render`.

Frames and conventions
----------------------
* **World**: metres, ``x`` right, ``y`` up, ``z`` into the room. The room is the box
  ``[-W/2, W/2] × [0, H] × [0, D]``; the floor is ``y = 0``.
* **Camera**: OpenCV pinhole frame, ``x`` right, ``y`` down, ``z`` forward (optical axis).
  ``R_wc`` (3×3) maps camera-frame vectors to the world (``v_w = R_wc @ v_c``).
  Intrinsics are NYUD's (fx = fy = 518.8, cx = 325.6, cy = 253.7 at 640×480) scaled to the
  requested size; pixel ``(row i, col j)`` looks along ``((j - cx) / fx, (i - cy) / fy, 1)``.
* **depth** is z-depth (distance along the optical axis, as NYUD depth), not ray length.
* **normals** are unit vectors in the camera frame, oriented toward the camera (``n · ray < 0``);
  a floor pixel therefore has ``n ≈ (0, -cos(pitch), -sin(pitch))`` (negative y = up).

Everything is deterministic given the seed: :func:`sample_scene` draws the geometry, materials and
light from ``np.random.default_rng(seed)``; rendering only adds sensor noise from a second stream,
so the same seed gives the same scene at every resolution.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

#: Semantic classes; the index is the ``semseg`` label.
SEMSEG_CLASSES: tuple[str, ...] = ("wall", "floor", "ceiling", "sphere", "box", "cylinder", "person")
#: Human-part labels (index = ``human_parts`` value; 0 = not a person).
HUMAN_PART_NAMES: tuple[str, ...] = (
    "background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg"
)  # fmt: skip
WALL, FLOOR, CEILING, SPHERE, BOX, CYLINDER, PERSON = range(7)
#: First semseg label counted as salient (objects and people; the room is background).
FIRST_OBJECT_CLASS = SPHERE

NYUD_FX, NYUD_FY, NYUD_CX, NYUD_CY, NYUD_W, NYUD_H = 518.8, 518.8, 325.6, 253.7, 640, 480
_EPS = 1e-6


def intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
    """NYUD intrinsics ``(fx, fy, cx, cy)`` scaled from 640×480 to ``height``×``width``."""
    sx, sy = width / NYUD_W, height / NYUD_H
    return NYUD_FX * sx, NYUD_FY * sy, NYUD_CX * sx, NYUD_CY * sy


@dataclass
class Texture:
    """Procedural solid texture: ``mix(local) ∈ [0, 1]`` blends ``color1`` (0) → ``color2`` (1)."""

    kind: str  # "plain" | "checker" | "stripes" | "noise"
    color1: np.ndarray  # (3,) linear RGB albedo
    color2: np.ndarray  # (3,)
    period: float
    axis: np.ndarray
    phase: np.ndarray
    freqs: np.ndarray

    def albedo(self, local: np.ndarray) -> np.ndarray:
        """Per-point albedo (N×3) for points in the primitive's local frame (N×3)."""
        if self.kind == "plain":
            return np.broadcast_to(self.color1, local.shape).copy()
        if self.kind == "checker":
            cells = np.floor((local + self.phase[:3]) / self.period) * self.axis
            m = np.mod(cells.sum(1), 2.0)
        elif self.kind == "stripes":
            m = (np.sin(2 * np.pi * (local @ self.axis) / self.period + self.phase[0]) > 0).astype(float)
        else:  # noise
            m = 0.5 + 0.5 * np.sin(local @ self.freqs.T + self.phase[: len(self.freqs)]).mean(1) * 1.5
            m = np.clip(m, 0.0, 1.0)
        return self.color1 + (self.color2 - self.color1) * m[:, None]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))
    return rgb**2.2  # sRGB-ish → linear


def _texture(rng, kinds, base, contrast, axis, period) -> Texture:
    """A texture of a kind drawn from ``kinds``: ``base`` blended with a tint darker by ``contrast``."""
    kind = kinds[rng.integers(len(kinds))]
    tint = np.clip(base * (1 - contrast) * rng.uniform(0.9, 1.1, 3), 0, 1)
    return Texture(
        kind=kind,
        color1=base,
        color2=tint,
        period=float(rng.uniform(*period)),
        axis=np.asarray(axis, float),
        phase=rng.uniform(0, 2 * np.pi, 4),
        freqs=rng.normal(0, 2 * np.pi / period[1], (4, 3)) * np.where(axis > 0, 1.0, 0.3),
    )


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _sphere_t(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    oc = o - c
    a = _dot(d, d)
    b = _dot(d, oc)
    cc = _dot(oc, oc) - r * r
    disc = b * b - a * cc
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _rot(axis: int, angle: float) -> np.ndarray:
    """Rotation by ``angle`` (radians, right-handed) about world axis ``axis`` (0 x, 1 y, 2 z)."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = (axis + 1) % 3, (axis + 2) % 3
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@dataclass
class Prim:
    """An object primitive: labels, material and geometry. Subclasses define ``bound()`` (centre,
    radius of a bounding ball, for culling), ``intersect(o, d)`` (the hit distance t (N,), inf on a
    miss, for origins ``o`` (3,) or (N, 3) and directions ``d`` (N, 3), not normalised: t is in units
    of d) and ``surface(p)``: outward unit normal (N×3, world), face id (N,) int and local texture
    coordinates (N×3) of hit points ``p`` (N×3)."""

    instance: int
    semseg: int
    part: int
    texture: Texture


@dataclass
class Sphere(Prim):
    center: np.ndarray
    radius: float

    def bound(self):
        return self.center, self.radius

    def intersect(self, o, d):
        return _sphere_t(o, d, self.center, self.radius)

    def surface(self, p):
        local = p - self.center
        n = local / np.linalg.norm(local, axis=1, keepdims=True)
        return n, np.zeros(len(p), np.int64), local


@dataclass
class Capsule(Prim):
    """Segment ``a``→``b`` swept by a ball of ``radius`` (one smooth surface, face 0)."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def bound(self):
        return (self.a + self.b) / 2, float(np.linalg.norm(self.b - self.a)) / 2 + self.radius

    def _axis(self) -> tuple[float, np.ndarray]:
        length = float(np.linalg.norm(self.b - self.a))
        return length, (self.b - self.a) / length

    def intersect(self, o, d):
        length, u = self._axis()
        oa = o - self.a
        du, ou = d @ u, oa @ u
        dp = d - du[:, None] * u
        wp = oa - np.multiply.outer(ou, u) if np.ndim(ou) else oa - ou * u
        qa, qb, qc = _dot(dp, dp), _dot(dp, wp), _dot(wp, wp) - self.radius**2
        disc = qb * qb - qa * qc
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (-qb - np.sqrt(disc)) / qa
        s = ou + t * du
        t = np.where((disc >= 0) & (qa > 1e-12) & (t > _EPS) & (s >= 0) & (s <= length), t, np.inf)
        t = np.minimum(t, _sphere_t(o, d, self.a, self.radius))
        return np.minimum(t, _sphere_t(o, d, self.b, self.radius))

    def surface(self, p):
        length, u = self._axis()
        s = np.clip((p - self.a) @ u, 0, length)
        n = p - (self.a + s[:, None] * u)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        return n, np.zeros(len(p), np.int64), p - self.a


@dataclass
class Box(Prim):
    """Box of half sizes ``half`` centred at ``center``, rotated by ``yaw`` about the vertical."""

    center: np.ndarray
    half: np.ndarray
    yaw: float

    def bound(self):
        return self.center, float(np.linalg.norm(self.half))

    def intersect(self, o, d):
        rot = _rot(1, self.yaw)  # local → world
        ol, dl = (o - self.center) @ rot, d @ rot
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-self.half - ol) / dl, (self.half - ol) / dl
        tmin = np.minimum(t1, t2).max(1)
        tmax = np.maximum(t1, t2).min(1)
        return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf)

    def surface(self, p):
        rot = _rot(1, self.yaw)
        local = (p - self.center) @ rot
        f = np.argmax(np.abs(local) / self.half, axis=1)
        sign = np.sign(local[np.arange(len(p)), f])
        nl = np.zeros_like(local)
        nl[np.arange(len(p)), f] = sign
        return nl @ rot.T, 2 * f + (sign > 0), local + self.half


@dataclass
class Cylinder(Prim):
    """Vertical cylinder: base centre ``base`` (its bottom cap), ``radius``, ``height``.

    Faces: 0 side, 1 top cap, 2 bottom cap.
    """

    base: np.ndarray
    radius: float
    height: float

    def bound(self):
        return self.base + [0, self.height / 2, 0], float(np.hypot(self.radius, self.height / 2))

    def intersect(self, o, d):
        ob = o - self.base
        if ob.ndim == 1:
            ob = np.broadcast_to(ob, d.shape)
        qa = d[:, 0] ** 2 + d[:, 2] ** 2
        qb = d[:, 0] * ob[:, 0] + d[:, 2] * ob[:, 2]
        qc = ob[:, 0] ** 2 + ob[:, 2] ** 2 - self.radius**2
        disc = qb * qb - qa * qc
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (-qb - np.sqrt(disc)) / qa
            y = ob[:, 1] + t * d[:, 1]
            t = np.where((disc >= 0) & (t > _EPS) & (y >= 0) & (y <= self.height), t, np.inf)
            for cap in (self.height, 0.0):
                tc = (cap - ob[:, 1]) / d[:, 1]
                x, z = ob[:, 0] + tc * d[:, 0], ob[:, 2] + tc * d[:, 2]
                ok = (tc > _EPS) & (x * x + z * z <= self.radius**2)
                t = np.where(ok & (tc < t), tc, t)
        return t

    def surface(self, p):
        local = p - self.base
        rho = np.hypot(local[:, 0], local[:, 2])
        d_side = np.abs(rho - self.radius)
        d_top, d_bot = np.abs(local[:, 1] - self.height), np.abs(local[:, 1])
        face = np.where((d_top < d_side) & (d_top <= d_bot), 1, np.where(d_bot < d_side, 2, 0))
        n = np.zeros_like(p)
        safe = np.maximum(rho, 1e-12)
        n[:, 0], n[:, 2] = local[:, 0] / safe, local[:, 2] / safe
        n[face == 1] = (0, 1, 0)
        n[face == 2] = (0, -1, 0)
        return n, face, local


@dataclass
class Room:
    """Axis-aligned room seen from inside. Faces: 0 x-, 1 x+ (side walls), 2 floor, 3 ceiling,
    4 z- (front wall, behind the camera), 5 z+ (back wall). ``instances[f]`` is face f's instance."""

    lo: np.ndarray
    hi: np.ndarray
    textures: list[Texture]
    instances: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

    #: inward normals and semseg class per face
    NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    CLASSES = np.array([WALL, WALL, FLOOR, CEILING, WALL, WALL])

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exit distance (N,) and face (N,) for origins inside the room."""
        bound = np.where(d > 0, self.hi, self.lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = (bound - o) / d
        ts[~np.isfinite(ts) | (ts < 0)] = np.inf
        axis = np.argmin(ts, axis=1)
        t = ts[np.arange(len(d)), axis]
        face = 2 * axis + (d[np.arange(len(d)), axis] > 0)
        return t, face


@dataclass
class Scene:
    """Everything the renderer needs: camera pose, room, objects, light."""

    cam_pos: np.ndarray  # (3,) world
    R_wc: np.ndarray  # (3, 3) camera → world rotation
    room: Room
    prims: list[Prim]
    light_pos: np.ndarray | None  # point light (world) or None for a directional light
    light_dir: np.ndarray  # (3,) unit vector toward a directional light (used when light_pos is None)
    light_color: np.ndarray  # (3,)
    ambient: float
    noise_sigma: float  # sensor noise std in 0..255 units


def _limb(start, flex, abd, bend, upper, lower):
    """Two capsules (local frame) from ``start``, ``upper`` and ``lower`` each (length, radius, part,
    texture): the upper one swung forward by ``flex`` and out by ``abd``, the lower one swung forward
    by a further ``bend`` (radians; negative bends backward)."""
    down = np.array([0.0, -1.0, 0.0])
    joint = start + upper[0] * (_rot(2, abd) @ _rot(0, -flex) @ down)
    end = joint + lower[0] * (_rot(2, abd) @ _rot(0, -(flex + bend)) @ down)
    return [(start, joint, *upper[1:]), (joint, end, *lower[1:])]


def _make_figure(rng, pos, facing, instance, skin, shirt, trousers) -> list[Prim]:
    """A jointed figure (head, torso, upper/lower arms and legs) standing on the floor at ``pos``
    (x, z), facing ``facing`` (radians), dressed in the three textures."""
    s = rng.uniform(1.5, 1.9) / 1.75
    torso_half = np.array([0.17, 0.26, 0.10]) * s
    hip_y = 0.97 * s
    torso_c = np.array([0.0, hip_y + torso_half[1] - 0.04 * s, 0.0])
    head_r = 0.11 * s
    head_c = torso_c + [0, torso_half[1] + 0.85 * head_r, 0]
    capsules = []  # (a, b, radius, part, texture) in the figure frame
    for side in (-1.0, 1.0):
        flex, abd, knee = np.radians([rng.uniform(-30, 35), rng.uniform(0, 12), rng.uniform(0, 60)])
        hip = np.array([side * 0.09 * s, hip_y, 0.0])
        leg = (0.45 * s, 0.075 * s, 5, trousers), (0.45 * s, 0.06 * s, 6, trousers)
        capsules += _limb(hip, flex, side * abd, -knee, *leg)
        flex, abd, elbow = np.radians([rng.uniform(-40, 140), rng.uniform(3, 85), rng.uniform(0, 110)])
        shoulder = torso_c + [side * (torso_half[0] + 0.05 * s), torso_half[1] - 0.06 * s, 0]
        arm = (0.30 * s, 0.055 * s, 3, shirt), (0.28 * s, 0.045 * s, 4, skin)
        capsules += _limb(shoulder, flex, side * abd, elbow, *arm)
    # figure frame → world, lifted so that the lowest point touches the floor
    lowest = min(min(a[1], b[1]) - r for a, b, r, _, _ in capsules)
    rot, origin = _rot(1, facing), np.array([pos[0], -lowest, pos[1]])
    prims: list[Prim] = [
        Sphere(instance, PERSON, 1, skin, center=rot @ head_c + origin, radius=head_r),
        Box(instance, PERSON, 2, shirt, center=rot @ torso_c + origin, half=torso_half, yaw=facing),
    ]
    for a, b, r, part, tex in capsules:
        prims.append(Capsule(instance, PERSON, part, tex, a=rot @ a + origin, b=rot @ b + origin, radius=r))
    return prims


#: Per object kind: the range of its footprint radius ...
_FOOTPRINTS = {"sphere": (0.2, 0.6), "box": (0.25, 0.75), "cylinder": (0.15, 0.5)}
#: ... and its look: hue, saturation and value ranges, texture kinds, contrast, axis, period range.
_LOOKS = {
    "sphere": (0.0, (0.5, 0.9), (0.5, 0.9), ("plain", "stripes", "noise"), 0.5, (0, 1, 0), (0.1, 0.3)),
    "box": (0.6, (0.3, 0.8), (0.4, 0.85), ("checker", "noise", "plain"), 0.35, (1, 1, 1), (0.1, 0.35)),
    "cylinder": (0.33, (0.4, 0.9), (0.4, 0.85), ("stripes", "noise", "plain"), 0.4, (0, 1, 0), (0.08, 0.3)),
}


def _object_texture(rng: np.random.Generator, kind: str) -> Texture:
    hue, sat, val, kinds, contrast, axis, period = _LOOKS[kind]
    col = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(*sat), rng.uniform(*val))
    return _texture(rng, kinds, col, contrast, np.array(axis, float), period)


def sample_scene(seed: int) -> Scene:
    """Draw a random room, camera, 2–6 objects (at most one figure) and a light from ``seed``."""
    rng = np.random.default_rng(seed)
    rw, rd, rh = rng.uniform(4.0, 8.0), rng.uniform(5.5, 9.5), rng.uniform(2.5, 3.2)
    lo, hi = np.array([-rw / 2, 0.0, 0.0]), np.array([rw / 2, rh, rd])
    cam = np.array([rng.uniform(-0.2, 0.2) * rw, rng.uniform(1.1, 1.7), rng.uniform(0.3, 0.8)])
    yaw, pitch = np.radians(rng.uniform(-15, 15)), np.radians(rng.uniform(3, 20))
    # room materials: the four walls share a base colour, each wall jittered
    wall_h, wall_s, wall_v = (
        rng.choice([0.08, 0.12, 0.55, 0.3]),
        rng.uniform(0.05, 0.3),
        rng.uniform(0.7, 0.9),
    )
    wall_kind = ("noise", "stripes", "plain")[rng.integers(3)]
    walls = []
    for _ in range(4):
        col = _hsv(wall_h + rng.uniform(-0.02, 0.02), wall_s, wall_v + rng.uniform(-0.06, 0.06))
        walls.append(_texture(rng, (wall_kind,), col, 0.15, np.array([1.0, 0.0, 1.0]), (0.15, 0.5)))
    wood = rng.random() < 0.5
    floor_col = _hsv(0.08, 0.5, 0.55) if wood else _hsv(rng.uniform(0, 1), 0.08, 0.6)
    floor_col = floor_col * rng.uniform(0.8, 1.2, 3)
    floor_tex = _texture(
        rng, ("checker",), np.clip(floor_col, 0, 1), 0.35, np.array([1.0, 0.0, 1.0]), (0.3, 0.8)
    )
    ceil_tex = _texture(rng, ("noise", "plain"), _hsv(0.1, 0.04, 0.92), 0.06, np.ones(3), (0.5, 1.0))
    room = Room(lo, hi, walls[:2] + [floor_tex, ceil_tex] + walls[2:])

    # objects, placed on the floor inside the view, without overlapping footprints
    n_obj = int(rng.integers(2, 7))
    kinds = [("sphere", "box", "cylinder")[k] for k in rng.integers(0, 3, n_obj)]
    if rng.random() < 0.6:
        kinds[0] = "person"
    half_fov = np.arctan(NYUD_CX / NYUD_FX)
    placed: list[tuple[np.ndarray, float]] = []
    prims: list[Prim] = []
    instance = 7
    for kind in kinds:
        feet = {k: rng.uniform(*r) for k, r in _FOOTPRINTS.items()}  # all drawn, one used
        foot = 0.55 if kind == "person" else feet[kind]
        min_dist = 2.4 if kind == "person" else 1.8
        pos = None
        for _ in range(50):
            ang = yaw + rng.uniform(-0.85, 0.85) * half_fov
            far = rd - cam[2] - foot - 0.1
            if far <= min_dist:
                break
            u = rng.random()
            dist = min_dist + (far - min_dist) * (u * u if kind == "person" else u)  # people nearer
            cand = cam[[0, 2]] + dist * np.array([np.sin(ang), np.cos(ang)])
            inside = np.all(cand - foot > lo[[0, 2]] + 0.05) and np.all(cand + foot < hi[[0, 2]] - 0.05)
            free = all(np.linalg.norm(cand - q) > foot + r + 0.05 for q, r in placed)
            if inside and free:
                pos = cand
                break
        if pos is None:
            continue
        placed.append((pos, foot))
        if kind == "person":
            skin_col = _hsv(rng.uniform(0.03, 0.09), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95))
            shirt_col = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9))
            trousers_col = _hsv(rng.choice([0.6, 0.08, 0.0]), rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.5))
            skin = _texture(rng, ("plain",), skin_col, 0.1, np.ones(3), (0.1, 0.2))
            shirt = _texture(
                rng, ("plain", "stripes", "noise"), shirt_col, 0.4, np.array([0.0, 1, 0]), (0.06, 0.15)
            )
            trousers = _texture(rng, ("plain", "noise"), trousers_col, 0.2, np.ones(3), (0.1, 0.3))
            prims += _make_figure(rng, pos, rng.uniform(0, 2 * np.pi), instance, skin, shirt, trousers)
        elif kind == "sphere":
            tex, center = _object_texture(rng, kind), np.array([pos[0], foot, pos[1]])
            prims.append(Sphere(instance, SPHERE, 0, tex, center=center, radius=foot))
        elif kind == "box":
            half = np.array([rng.uniform(0.15, 1.0), rng.uniform(0.15, 0.75), rng.uniform(0.15, 1.0)])
            half[[0, 2]] *= foot / np.hypot(half[0], half[2])
            box_yaw = 0.0 if rng.random() < 0.5 else rng.uniform(0, np.pi)
            tex = _object_texture(rng, kind)
            center = np.array([pos[0], half[1], pos[1]])
            prims.append(Box(instance, BOX, 0, tex, center=center, half=half, yaw=box_yaw))
        else:
            tex = _object_texture(rng, kind)
            base, height = np.array([pos[0], 0.0, pos[1]]), rng.uniform(0.4, 1.9)
            prims.append(Cylinder(instance, CYLINDER, 0, tex, base=base, radius=foot, height=height))
        instance += 1

    point = rng.random() < 0.7
    light_pos = np.array([rng.uniform(lo[0] + 0.3, hi[0] - 0.3), rh - 0.25, rng.uniform(0.5, rd - 0.5)])
    light_dir = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.8, 0.4)])
    light_dir /= np.linalg.norm(light_dir)
    warm = rng.uniform(-0.08, 0.08)
    return Scene(
        cam_pos=cam,
        R_wc=_rot(1, yaw) @ _rot(0, pitch) @ np.diag([1.0, -1.0, 1.0]),  # turned right, looking down
        room=room,
        prims=prims,
        light_pos=light_pos if point else None,
        light_dir=light_dir,
        light_color=np.array([1 + warm, 1.0, 1 - warm]) * rng.uniform(0.9, 1.2),
        ambient=float(rng.uniform(0.2, 0.4)),
        noise_sigma=float(rng.uniform(1.0, 3.0)),
    )


def _hits_sphere(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    """Indices of rays that meet the ball (c, r) somewhere ahead of their origin."""
    oc = o - c
    b = _dot(d, oc)
    disc = b * b - _dot(d, d) * (_dot(oc, oc) - r * r)
    return np.flatnonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0)) > 0))


def _groups(prims: list[Prim]) -> list[tuple[np.ndarray, float, list[int]]]:
    """Prims grouped by instance with a bounding ball per group: (centre, radius, prim indices)."""
    by_inst: dict[int, list[int]] = {}
    for k, p in enumerate(prims):
        by_inst.setdefault(p.instance, []).append(k)
    out = []
    for ks in by_inst.values():
        bounds = [prims[k].bound() for k in ks]
        c = np.mean([b[0] for b in bounds], axis=0)
        r = max(float(np.linalg.norm(bc - c)) + br for bc, br in bounds)
        out.append((c, r, ks))
    return out


def cast(prims: list[Prim], o: np.ndarray, d: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit among ``prims`` closer than ``t`` (N,). Returns (t, owner) with owner = prim
    index, or -1 where nothing is closer than the given ``t``."""
    t = t.copy()
    owner = np.full(len(d), -1, np.int64)
    per_ray_o = o.ndim == 2
    for gc, gr, ks in _groups(prims):
        gi = _hits_sphere(o, d, gc, gr)
        if gi.size == 0:
            continue
        og, dg = (o[gi] if per_ray_o else o), d[gi]
        for k in ks:
            prim = prims[k]
            if len(ks) > 1:
                c, r = prim.bound()
                sub = _hits_sphere(og, dg, c, r)
                if sub.size == 0:
                    continue
                idx = gi[sub]
                tk = prim.intersect(og[sub] if per_ray_o else og, dg[sub])
            else:
                idx, tk = gi, prim.intersect(og, dg)
            closer = tk < t[idx]
            t[idx[closer]] = tk[closer]
            owner[idx[closer]] = k
    return t, owner
