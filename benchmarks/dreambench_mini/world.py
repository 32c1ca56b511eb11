"""A procedural image world with captions: coloured shapes ("ball", "box", "cone") in named contexts.

Every image is 16 x 16 RGB: one big object (a shape in one colour, or in two: an upper and a lower half,
at a jittered position) on a background that names a context ("on the grass", "in the snow", ...), with a
little pixel noise. The world
is kept this small on purpose: a base pretrained from scratch on a shared CPU core in under an hour must
learn to follow its prompts (see pretrain.py). Captions say what is there, with parts left out at random
so that the model also learns short prompts: "a photo of a red ball on the beach", "a yellow and purple
cone", "a box at night".

Novel subjects (`SUBJECTS`) are objects the world never contains: a shape in a two-colour pairing that the
world shows only on other shapes (a yellow-over-purple ball: the world has yellow-over-purple cones and boxes,
never balls). The base can draw both colours, two-coloured objects and the shape, as a real base has seen
many two-tone objects but not this one; what it has never drawn is this object, and nothing in a prompt
names it. A personalization method is judged on whether it can put the subject into the world's contexts
(see measures.py). (An earlier world with single-colour objects and subjects in colours the world never
had gave every method 0.00: its base had not learned to draw a two-coloured object at all.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 16
SUPERSAMPLE = 4  # draw at 4x and box-filter down: soft edges like a photo, not aliased pixels

# Background colour of each context phrase. "in a room" (plain gray) is where subjects are photographed.
CONTEXTS: dict[str, tuple[int, int, int]] = {
    "on the grass": (70, 150, 60),
    "in the snow": (236, 240, 245),
    "on the beach": (226, 200, 140),
    "at night": (22, 26, 64),
    "in the sky": (130, 188, 236),
    "in a room": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 35),
    "purple": (140, 55, 190),
}
SHAPES = ("ball", "box", "cone")  # circle, square, upward triangle
TWO_TONE = 0.35  # share of world objects in two colours
EXTENT = (4.5, 6.5)  # half-extent in pixels: objects fill a third to four fifths of the image


@dataclass(frozen=True)
class Subject:
    """A novel object: a world shape whose upper and lower halves carry a pairing of world colours that the
    world shows on other shapes only."""

    name: str  # the class word it belongs to, e.g. "ball"
    shape: str
    top_colour: str
    bottom_colour: str

    @property
    def top(self) -> tuple[int, int, int]:
        return COLOURS[self.top_colour]

    @property
    def bottom(self) -> tuple[int, int, int]:
        return COLOURS[self.bottom_colour]


SUBJECTS: dict[str, Subject] = {
    "ball": Subject("ball", "ball", "yellow", "purple"),
    "box": Subject("box", "box", "red", "blue"),
}


# (shape, upper colour, lower colour) that world objects never have: the subjects
HELD_OUT = {(subject.shape, subject.top_colour, subject.bottom_colour) for subject in SUBJECTS.values()}


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image."""

    shape: str
    context: str
    colour: str | None = None  # None: the object is a subject; else the colour of the object (its upper half)
    subject: str | None = None
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    extent: float = 5.5
    lower: str | None = None  # a two-coloured world object: the colour of its lower half


def shape_mask(shape: str, cx: float, cy: float, extent: float, size: int = SIZE, supersample: int = 1) -> np.ndarray:
    """Boolean (size*s, size*s) mask of a shape centred at (cx, cy) with half-extent `extent` pixels."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # pixel centres in image units
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if shape == "ball":
        return (x - cx) ** 2 + (y - cy) ** 2 <= extent**2
    if shape == "box":
        return (np.abs(x - cx) <= extent * 0.9) & (np.abs(y - cy) <= extent * 0.9)
    if shape == "cone":  # apex at the top, base at the bottom; width grows linearly downwards
        top, bottom = cy - extent, cy + extent
        frac = (y - top) / (bottom - top)
        return (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * extent)
    raise ValueError(f"unknown shape {shape}")


def draw(
    mask: np.ndarray,
    background: tuple[float, float, float],
    top: tuple[float, float, float],
    bottom: tuple[float, float, float],
    cy: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint a supersampled mask: rows above `cy` in `top`, below in `bottom`; (16, 16, 3) uint8 with noise."""
    n = SIZE * SUPERSAMPLE
    shade = np.linspace(1.06, 0.94, n, dtype=np.float32)[:, None, None]  # light from above
    canvas = np.broadcast_to(np.array(background, dtype=np.float32) * shade, (n, n, 3)).copy()
    upper = np.arange(n)[:, None] / SUPERSAMPLE < cy  # (n, 1)
    canvas[mask & upper] = top
    canvas[mask & ~upper] = bottom
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))  # (16, 16, 3)
    small += rng.normal(0.0, 3.0, small.shape)
    return np.clip(small, 0, 255).round().astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One (16, 16, 3) uint8 image of a scene, with fixed-seed noise from `rng`."""
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.extent, supersample=SUPERSAMPLE)
    if scene.subject is None:
        top, bottom = COLOURS[scene.colour], COLOURS[scene.lower or scene.colour]
    else:
        top, bottom = SUBJECTS[scene.subject].top, SUBJECTS[scene.subject].bottom
    return draw(mask, CONTEXTS[scene.context], top, bottom, scene.cy, rng)


def any_colour_sample(rng: np.random.Generator) -> np.ndarray:
    """A shape in random colours (one or two) on a random background: what the VAE learns beyond the world."""
    scene = random_scene(rng)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.extent, supersample=SUPERSAMPLE)
    background, top, bottom = (tuple(rng.uniform(0, 255, 3)) for _ in range(3))
    if rng.random() < 0.5:
        bottom = top
    return draw(mask, background, top, bottom, scene.cy, rng)


def random_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    context: str | None = None,
    colour: str | None = None,
    subject: str | None = None,
    two_tone: float = 0.0,
) -> Scene:
    """A scene with the given parts fixed and the rest drawn at random; with probability `two_tone` a world
    object gets a second colour (its lower half), never a subject's pairing on that subject's shape."""
    shape = shape or (SUBJECTS[subject].shape if subject else SHAPES[rng.integers(len(SHAPES))])
    context = context or list(CONTEXTS)[rng.integers(len(CONTEXTS))]
    lower = None
    if subject is None:
        colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
        if rng.random() < two_tone:
            lower = str(
                rng.choice([name for name in COLOURS if name != colour and (shape, colour, name) not in HELD_OUT])
            )
    extent = float(rng.uniform(*EXTENT))
    margin = extent + 0.5
    cx, cy = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    return Scene(shape, context, colour, subject, cx, cy, extent, lower)


def caption(scene: Scene, rng: np.random.Generator, drop: float = 0.3) -> str:
    """A caption naming the scene; the colour and the context are each left out with probability `drop`."""
    words = ["a photo of a"] if rng.random() < 0.5 else ["a"]
    if scene.colour and rng.random() >= drop:
        words.append(f"{scene.colour} and {scene.lower}" if scene.lower else scene.colour)
    words.append(scene.shape)
    if rng.random() >= drop:
        words.append(scene.context)
    return " ".join(words)


def world_sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One (image, caption) pair of the world: a random object in a random context."""
    scene = random_scene(rng, two_tone=TWO_TONE)
    return render(scene, rng), caption(scene, rng)


def subject_images(subject: str, count: int = 5, seed: int = 0) -> list[np.ndarray]:
    """The instance photos of a subject: always in the plain room, varied position and size."""
    rng = np.random.default_rng(seed)
    return [render(random_scene(rng, subject=subject, context="in a room"), rng) for _ in range(count)]
