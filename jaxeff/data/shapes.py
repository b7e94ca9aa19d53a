"""Generated image-caption data: families of near-twin shape scenes.

Each image shows two coloured shapes on a dark background, for example a small red
circle to the left of a large blue square, and comes with five template captions that
describe it completely (size, colour and shape of both objects and their relation).
Images come in *families*: a base scene plus siblings that each differ from it by a
single edit (the two objects swap places, swap colours or swap shapes, one object
changes colour, shape or size, or the pair turns from side by side to stacked).

Why this makes hard negatives matter (VSE++, Faghri et al. 2018): with random
negatives, a contrastive model can score well by matching bags of words ("red",
"circle", "blue", "square") to bags of visual features. The siblings of an image share
every one of those words except the edited one, and a binding or relation swap changes
no word at all, only the order. When a family shares a batch, the hardest negative
caption of an image is almost always a sibling's. The sum-of-hinges loss (SH) averages
that one informative violation with many easy ones that are already satisfied, while
the max-of-hinges loss (MH) puts the whole gradient on it, so MH is the loss that
teaches binding and relations, and the gap in R@1 shows here where it would vanish on
an easy set. MH trained from scratch can collapse (all similarities equal); a short
warm-up with SH avoids it.

Everything is numpy and deterministic: the same ``seed`` gives identical arrays, and
family ``f`` is drawn from its own stream ``SeedSequence(seed, spawn_key=(f,))``, so
``generate_shapes(n)`` is a prefix of ``generate_shapes(m)`` for ``n <= m``. Splits come
from disjoint seed streams (``split_seed``). Images never repeat across splits, but the
space of scene meanings is small (``NUM_SCENES`` = 8960 canonical scenes), so the
same meaning, rendered differently, can occur in several splits (and in several
families of one split; ``ShapesData.scene`` identifies it, for a mask of extra
positives).

Example:
  >>> data = generate_shapes(2, seed=0)
  >>> data.images.shape, len(data.captions), len(data.captions[0])
  ((16, 32, 32, 3), 16, 5)
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from jaxeff.retrieval import CAPTIONS_PER_IMAGE

COLOURS = ("red", "green", "blue", "yellow", "purple", "white", "orange", "cyan")
COLOUR_RGB = np.array(
    [
        (225, 45, 40),
        (45, 195, 65),
        (55, 95, 235),
        (230, 215, 50),
        (165, 65, 205),
        (235, 235, 235),
        (245, 140, 30),
        (45, 210, 220),
    ],
    dtype=np.float32,
)
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
# Relation of object 0 to object 1 ("object 0 is left of object 1", ...).
RELATIONS = ("left", "right", "above", "below")
# EDITS[0] is the base scene of a family; the others are single edits of it.
EDITS = (
    "base",
    "swap_positions",
    "swap_colours",
    "swap_shapes",
    "recolour_0",
    "recolour_1",
    "reshape_0",
    "reshape_1",
    "turn",
    "resize_0",
    "resize_1",
)
# Always part of a family (in this order) when it has room: their captions use the same
# words as the base scene's, only in another order or pairing.
_CORE_EDITS = (1, 2, 3)
MAX_FAMILY_SIZE = len(EDITS)
_NUM_OBJECTS = len(SIZES) * len(COLOURS) * len(SHAPES)
# Canonical scene = (axis, object on the left/top, object on the right/bottom), the two
# objects differing in colour and in shape.
NUM_SCENES = 2 * _NUM_OBJECTS * (len(SIZES) * (len(COLOURS) - 1) * (len(SHAPES) - 1))

_SIZE_RADIUS = (0.12, 0.18)  # object radius as a fraction of the image side
_NOISE_STD = 4.0


class ShapesData(NamedTuple):
    """Generated images, captions and the scene behind each image.

    Object 0 and object 1 are the two shapes of a scene; ``relation`` says where object 0
    is relative to object 1. All arrays have the image axis first (N images).
    """

    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[list[str]]  # N lists of CAPTIONS_PER_IMAGE strings
    family: np.ndarray  # (N,) int64, family id, 0..num_families-1
    edit: np.ndarray  # (N,) int64, index into EDITS (0 = base scene of the family)
    shapes: np.ndarray  # (N, 2) int64, index into SHAPES
    colours: np.ndarray  # (N, 2) int64, index into COLOURS
    sizes: np.ndarray  # (N, 2) int64, index into SIZES
    relation: np.ndarray  # (N,) int64, index into RELATIONS
    scene: np.ndarray  # (N,) int64, canonical scene id in [0, NUM_SCENES)
    centres: np.ndarray  # (N, 2, 2) float32, (x, y) of each object in pixels
    radii: np.ndarray  # (N, 2) float32, object radius in pixels

    def flat_captions(self) -> list[str]:
        """All captions in one list; caption ``i`` belongs to image ``i // 5``."""
        return [c for caps in self.captions for c in caps]


def split_seed(seed: int, split: str) -> int:
    """Seed of ``split`` ("train", "dev" or "test"): disjoint streams for one ``seed``."""
    index = ("train", "dev", "test").index(split)
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def scene_ids(
    shapes: npt.ArrayLike, colours: npt.ArrayLike, sizes: npt.ArrayLike, relation: npt.ArrayLike
) -> np.ndarray:
    """Canonical id of each scene's meaning, the same for "A left of B" and "B right of A".

    Args:
      shapes, colours, sizes: (N, 2) indices of the two objects.
      relation: (N,) index into RELATIONS (object 0 relative to object 1).

    Returns:
      (N,) int64 ids in [0, NUM_SCENES) for scenes whose objects differ in colour and
      shape (the only scenes ``generate_shapes`` makes); equal ids mean equal meaning.
    """
    shapes, colours, sizes = (np.asarray(a, np.int64) for a in (shapes, colours, sizes))
    relation = np.asarray(relation, np.int64)
    first_is_0 = (relation == 0) | (relation == 2)
    first = np.where(first_is_0, 0, 1)
    second = 1 - first
    rows = np.arange(len(relation))
    axis = relation // 2
    s1, c1, z1 = shapes[rows, first], colours[rows, first], sizes[rows, first]
    s2, c2, z2 = shapes[rows, second], colours[rows, second], sizes[rows, second]
    first_code = (z1 * len(COLOURS) + c1) * len(SHAPES) + s1
    # The second object's colour and shape differ from the first's: rank among the rest.
    c2r = c2 - (c2 > c1)
    s2r = s2 - (s2 > s1)
    second_code = (z2 * (len(COLOURS) - 1) + c2r) * (len(SHAPES) - 1) + s2r
    num_second = len(SIZES) * (len(COLOURS) - 1) * (len(SHAPES) - 1)
    return (axis * _NUM_OBJECTS + first_code) * num_second + second_code


# ----------------------------------------------------------------------------- scenes


def _other(rng, exclude, n):
    return int(rng.choice([i for i in range(n) if i not in exclude]))


def _apply_edit(edit, shapes, colours, sizes, relation, rng):
    shapes, colours, sizes = list(shapes), list(colours), list(sizes)
    name = EDITS[edit]
    if name == "swap_positions":
        relation = relation ^ 1  # left <-> right, above <-> below
    elif name == "swap_colours":
        colours.reverse()
    elif name == "swap_shapes":
        shapes.reverse()
    elif name.startswith("recolour_"):
        colours[int(name[-1])] = _other(rng, colours, len(COLOURS))
    elif name.startswith("reshape_"):
        shapes[int(name[-1])] = _other(rng, shapes, len(SHAPES))
    elif name == "turn":
        relation = relation ^ 2  # left <-> above, right <-> below
    elif name.startswith("resize_"):
        sizes[int(name[-1])] ^= 1
    return shapes, colours, sizes, relation


def _family_scenes(rng, family_size):
    """Base scene plus ``family_size - 1`` single edits, as per-image attribute lists."""
    colours = [int(c) for c in rng.choice(len(COLOURS), 2, replace=False)]
    shapes = [int(s) for s in rng.choice(len(SHAPES), 2, replace=False)]
    sizes = [int(z) for z in rng.integers(0, len(SIZES), 2)]
    relation = int(rng.integers(0, len(RELATIONS)))
    num_edits = family_size - 1
    core = list(_CORE_EDITS[:num_edits])
    rest = [e for e in range(1, len(EDITS)) if e not in _CORE_EDITS]
    extra = rng.choice(rest, num_edits - len(core), replace=False) if num_edits > len(core) else []
    edits = [0, *core, *sorted(int(e) for e in extra)]
    return edits, [_apply_edit(e, shapes, colours, sizes, relation, rng) for e in edits]


def _family_layout(rng, image_size):
    """Slot centres for both axes and per-object radius factors, shared by a family."""
    s = image_size
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03, 2) * s
    h_half, v_half = rng.uniform(0.23, 0.26, 2) * s
    h_off = rng.uniform(-0.05, 0.05, 2) * s
    v_off = rng.uniform(-0.05, 0.05, 2) * s
    slots = np.array(
        [
            [(cx - h_half, cy + h_off[0]), (cx + h_half, cy + h_off[1])],  # left, right
            [(cx + v_off[0], cy - v_half), (cx + v_off[1], cy + v_half)],  # top, bottom
        ],
        dtype=np.float32,
    )
    return slots, rng.uniform(0.95, 1.05, 2)


# ---------------------------------------------------------------------------- captions

_SIZE_WORDS = (("small", "little"), ("large", "big"))
_SHAPE_WORDS = (("circle", "disk"), ("square", "box"), ("triangle",), ("cross",), ("diamond",))
_RELATION_PHRASES = (
    ("to the left of", "left of", "on the left of"),
    ("to the right of", "right of", "on the right of"),
    ("above", "over", "on top of"),
    ("below", "under", "beneath"),
)
_ITS_PHRASES = (
    ("on its left", "to its left"),
    ("on its right", "to its right"),
    ("above it", "over it"),
    ("below it", "under it"),
)
_SIDE_PHRASES = (
    ("on the left",),
    ("on the right",),
    ("on top", "at the top"),
    ("at the bottom", "on the bottom"),
)
_LEAD_PHRASES = (("on the left",), ("on the right",), ("at the top",), ("at the bottom",))
_ARRANGEMENTS = (("side by side", "in a row"), ("stacked", "in a column"))


def _pick(rng, options):
    return options[rng.randrange(len(options))]


def _caption(template, rng, objects, relation):
    """One caption; ``objects`` are (size, colour, shape) of object 0 and object 1.

    ``rng`` is a ``random.Random`` (much faster than numpy for single draws).
    """
    # Mention object x first; rel is where x is relative to y.
    if rng.random() < 0.5:
        x, y, rel = objects[0], objects[1], relation
    else:
        x, y, rel = objects[1], objects[0], relation ^ 1
    words = [
        (_pick(rng, _SIZE_WORDS[z]), COLOURS[c], _pick(rng, _SHAPE_WORDS[s])) for z, c, s in (x, y)
    ]
    xw, yw = words
    xs, ys = f"a {' '.join(xw)}", f"a {' '.join(yw)}"
    rel_phrase = _pick(rng, _RELATION_PHRASES[rel])
    if template == 0:
        return f"{xs} {rel_phrase} {ys}"
    if template == 1:
        return f"there is {xs} {rel_phrase} {ys}"
    if template == 2:
        return f"{xs} is {rel_phrase} {ys}"
    if template == 3:
        return f"{ys} with {xs} {_pick(rng, _ITS_PHRASES[rel])}"
    # The remaining templates refer back to one object by its shape or colour.
    ref, ref_rel = (xw, rel) if rng.random() < 0.5 else (yw, rel ^ 1)
    side = _pick(rng, _SIDE_PHRASES[ref_rel])
    if template == 4:
        return f"{xs} and {ys}, the {ref[2]} {side}"
    if template == 5:
        return f"{xs} and {ys}, the {ref[1]} one {side}"
    if template == 6:
        return f"{_LEAD_PHRASES[rel][0]} {xs}, {_LEAD_PHRASES[rel ^ 1][0]} {ys}"
    if template == 7:
        return f"{_pick(rng, ('a picture of', 'an image of'))} {xs} {rel_phrase} {ys}"
    if template == 8:
        arrangement = _pick(rng, _ARRANGEMENTS[rel // 2])
        return f"{xs} and {ys} {arrangement} with the {ref[2]} {side}"
    return f"two shapes, {xs} {rel_phrase} {ys}"


_NUM_TEMPLATES = 10


def _captions(rng, shapes, colours, sizes, relation):
    objects = [(sizes[k], colours[k], shapes[k]) for k in range(2)]
    templates = rng.sample(range(_NUM_TEMPLATES), CAPTIONS_PER_IMAGE)
    return [_caption(t, rng, objects, relation) for t in templates]


# ---------------------------------------------------------------------------- drawing


def _signed_distance(shape, dx, dy, r):
    """Approximate signed distance in pixels to the outline of a shape of radius ``r``."""
    ax, ay = np.abs(dx), np.abs(dy)
    name = SHAPES[shape]
    if name == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if name == "square":
        return np.maximum(ax, ay) - 0.82 * r
    if name == "diamond":
        return (ax + ay - 1.1 * r) * np.float32(np.sqrt(0.5))
    if name == "triangle":  # equilateral, pointing up, circumradius 1.1 r
        inner = 0.55 * r
        return np.maximum(
            dy - inner, np.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy) - inner
        )
    # cross: union of two bars
    t = 0.3 * r
    return np.minimum(np.maximum(ax - t, ay - r), np.maximum(ax - r, ay - t))


def _render(background, noise, centres, radii, shapes, rgb):
    """Draws the objects with anti-aliased edges over the background, then adds noise.

    Works in place on float32 buffers: at 64x64 the full-image temporaries dominate.
    """
    image_size = noise.shape[1]
    grid = np.arange(image_size, dtype=np.float32) + 0.5
    images = np.empty(noise.shape, np.float32)
    images[:] = background[:, None, None, :]
    for k in range(2):
        dx = grid[None, None, :] - centres[:, k, 0, None, None]
        dy = grid[None, :, None] - centres[:, k, 1, None, None]
        coverage = np.zeros(noise.shape[:3], np.float32)
        for s in range(len(SHAPES)):
            rows = np.flatnonzero(shapes[:, k] == s)
            if rows.size:
                dist = _signed_distance(s, dx[rows], dy[rows], radii[rows, k, None, None])
                coverage[rows] = np.clip(0.5 - dist, 0.0, 1.0)
        towards = rgb[:, k, None, None, :] - images
        towards *= coverage[..., None]
        images += towards
    images += noise
    np.rint(images, out=images)
    np.clip(images, 0, 255, out=images)
    return images.astype(np.uint8)


# -------------------------------------------------------------------------- generator


def generate_shapes(
    num_families: int, *, family_size: int = 8, image_size: int = 32, seed: int = 0
) -> ShapesData:
    """Generates ``num_families * family_size`` images of near-twin two-shape scenes.

    Images of a family are consecutive, the base scene first; each sibling applies one
    edit from ``EDITS`` to the base (always the three swaps, whose captions use the
    same words as the base's, then a random choice of the others), and all scenes of a
    family differ in meaning. The family shares its layout and background, so siblings
    differ only where an object changed; each image has its own pixel noise and object
    shading.

    Args:
      num_families: number of families.
      family_size: images per family, 1 to ``MAX_FAMILY_SIZE`` (11).
      image_size: side of the square images in pixels (e.g. 32, 48, 64).
      seed: non-negative integer; the same seed gives identical data.

    Returns:
      ShapesData with N = num_families * family_size images.
    """
    if num_families < 0:
        raise ValueError(f"num_families must be >= 0, got {num_families}")
    if not 1 <= family_size <= MAX_FAMILY_SIZE:
        raise ValueError(f"family_size must be in [1, {MAX_FAMILY_SIZE}], got {family_size}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    n = num_families * family_size
    edit, relation = np.zeros(n, np.int64), np.zeros(n, np.int64)
    shapes, colours, sizes = (np.zeros((n, 2), np.int64) for _ in range(3))
    centres = np.zeros((n, 2, 2), np.float32)
    radii = np.zeros((n, 2), np.float32)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    captions: list[list[str]] = []
    chunk = max(1, 1024 // family_size)  # families drawn and rendered together
    for start in range(0, num_families, chunk):
        families = range(start, min(start + chunk, num_families))
        m = len(families) * family_size
        slots = np.zeros((m, 2, 2, 2), np.float32)  # image, axis, slot, (x, y)
        radius_factor = np.zeros((m, 2), np.float32)
        background = np.zeros((m, 3), np.float32)
        rgb_jitter = np.zeros((m, 2, 3), np.float32)
        noise = np.zeros((m, image_size, image_size, 3), np.float32)
        for i, f in enumerate(families):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(f,)))
            edits, scenes = _family_scenes(rng, family_size)
            rows = slice(f * family_size, (f + 1) * family_size)
            edit[rows] = edits
            shapes[rows], colours[rows], sizes[rows], relation[rows] = zip(*scenes, strict=True)
            local = slice(i * family_size, (i + 1) * family_size)
            slots[local], radius_factor[local] = _family_layout(rng, image_size)
            background[local] = rng.uniform(12, 30) + rng.uniform(-6, 6, 3)
            rgb_jitter[local] = rng.uniform(-8, 8, (family_size, 2, 3))
            rng.standard_normal(dtype=np.float32, out=noise[local])
            caption_rng = random.Random(int(rng.integers(0, 2**63)))
            captions.extend(_captions(caption_rng, *scene) for scene in scenes)
        noise *= _NOISE_STD
        rows = slice(start * family_size, start * family_size + m)
        # Object 0 takes the left/top slot of the relation's axis for "left"/"above".
        index = np.arange(m)
        first = relation[rows] % 2
        axis_slots = slots[index, relation[rows] // 2]  # (m, 2 slots, 2 coordinates)
        centres[rows] = np.stack([axis_slots[index, first], axis_slots[index, 1 - first]], 1)
        radii[rows] = np.take(_SIZE_RADIUS, sizes[rows]) * radius_factor * image_size
        rgb = COLOUR_RGB[colours[rows]] + rgb_jitter
        images[rows] = _render(background, noise, centres[rows], radii[rows], shapes[rows], rgb)
    return ShapesData(
        images=images,
        captions=captions,
        family=np.repeat(np.arange(num_families, dtype=np.int64), family_size),
        edit=edit,
        shapes=shapes,
        colours=colours,
        sizes=sizes,
        relation=relation,
        scene=scene_ids(shapes, colours, sizes, relation),
        centres=centres,
        radii=radii,
    )
