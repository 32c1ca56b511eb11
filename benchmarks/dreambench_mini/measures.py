"""Automatic measures of DreamBooth's three axes in the procedural world (world.py), read off the pixels.

Each generated 16 x 16 image is parsed by hand-written rules, no learned judge:
- background: the median colour of the 1-pixel border -> the nearest context colour ("on the beach", ...);
- object: pixels farther than FOREGROUND from that background colour; the shape whose template (fitted
  to the object's bounding box) overlaps it best (IoU); its median colour -> the nearest world colour, and
  the same for its upper and lower halves (a two-coloured object: "a yellow and purple cone");
- subject: the object has the subject's shape, and at least SUBJECT_SHARE of its pixels are near each of the
  subject's two colours, the top colour above the bottom one (no world object of that shape has the pair).

The three axes of a method on a subject (see score()):
- subject fidelity: share of subject-prompt images (new contexts) in which the subject appears;
- prompt fidelity: share of them whose background is the prompt's context;
- in context: share with both at once (DreamBench's question: the subject, where the prompt put it);
- class accuracy: share of class-prompt images ("a red ball on the grass") that show the class in the
  colour asked; drift = the base model's class accuracy minus the adapted model's.
calibrate() scores a perfect generator (world.render of each prompt) and trivial ones; the benchmark
reports both, so every figure can be read against its ceiling and floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.dreambench_mini import world

FOREGROUND = 60.0  # RGB distance from the background colour that makes a pixel part of the object
SUBJECT_COLOUR = 70.0  # RGB distance within which a pixel counts as one of the subject's colours
SUBJECT_SHARE = 0.2  # each subject colour must cover at least this share of the object
MIN_PIXELS = 10  # fewer object pixels: no object (the smallest world object covers ~30)


@dataclass(frozen=True)
class Parsed:
    context: str
    shape: str | None  # None: no object found
    colour: str | None
    subject: str | None  # the subject whose two colours the object carries, if any
    height: int
    iou: float
    upper: str | None = None  # nearest world colour of the object's upper half
    lower: str | None = None  # ... and of its lower half


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(colour - np.array(palette[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(distances))]


def _template(shape: str, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """The shape fitted to a bounding box (inclusive pixel rows/columns)."""
    height, width = bottom - top + 1, right - left + 1
    cx, cy = (left + right + 1) / 2, (top + bottom + 1) / 2
    half = (height + width) / 4
    extent = {"ball": half, "box": half / 0.9, "cone": height / 2}[shape]
    return world.shape_mask(shape, cx, cy, extent)


def parse(image: np.ndarray) -> Parsed:
    """Read one (16, 16, 3) uint8 image."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:1].reshape(-1, 3), pixels[-1:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :1].reshape(-1, 3), pixels[:, -1:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    context = _nearest(background, world.CONTEXTS)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND  # (16, 16)
    if mask.sum() < MIN_PIXELS:
        return Parsed(context, None, None, None, 0, 0.0)
    rows, cols = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    ious = {}
    for shape in world.SHAPES:
        template = _template(shape, top, bottom, left, right)
        ious[shape] = float((template & mask).sum() / max(1, (template | mask).sum()))
    shape = max(ious, key=ious.__getitem__)
    inside = pixels[mask]  # (K, 3)
    colour = _nearest(np.median(inside, axis=0), world.COLOURS)
    ys = np.where(mask)[0]
    middle = (top + bottom) / 2
    upper = _nearest(np.median(inside[ys < middle], axis=0), world.COLOURS) if (ys < middle).any() else colour
    lower = _nearest(np.median(inside[ys > middle], axis=0), world.COLOURS) if (ys > middle).any() else colour
    subject = None
    for name, candidate in world.SUBJECTS.items():
        near_top = np.linalg.norm(inside - np.array(candidate.top, dtype=np.float32), axis=-1) < SUBJECT_COLOUR
        near_bottom = np.linalg.norm(inside - np.array(candidate.bottom, dtype=np.float32), axis=-1) < SUBJECT_COLOUR
        both = near_top.mean() >= SUBJECT_SHARE and near_bottom.mean() >= SUBJECT_SHARE
        if both and ys[near_top].mean() < ys[near_bottom].mean() and shape == candidate.shape:
            subject = name
    return Parsed(context, shape, colour, subject, int(bottom - top + 1), ious[shape], upper, lower)


@dataclass(frozen=True)
class SubjectPrompt:
    text: str
    context: str


@dataclass(frozen=True)
class ClassPrompt:
    text: str
    shape: str
    colour: str
    context: str


EVAL_CONTEXTS = [name for name in world.CONTEXTS if name != "in a room"]  # the instance photos' context is not new


def subject_prompts(token: str, subject: str) -> list[SubjectPrompt]:
    """New contexts (DreamBench's recontextualization): the subject where its photos never showed it."""
    word = world.SUBJECTS[subject].name
    return [SubjectPrompt(f"a photo of {token} {word} {context}", context) for context in EVAL_CONTEXTS]


def class_prompts(subject: str) -> list[ClassPrompt]:
    """The subject's class word in the world's usual sentences: what the adapter must leave alone."""
    shape = world.SUBJECTS[subject].shape
    picks = [("red", "on the grass"), ("blue", "in the snow"), ("yellow", "at night"), ("purple", "on the beach")]
    return [ClassPrompt(f"a photo of a {colour} {shape} {where}", shape, colour, where) for colour, where in picks]


def score_subject(images: dict[str, list[np.ndarray]], prompts: list[SubjectPrompt], subject: str) -> dict[str, float]:
    """Subject fidelity, prompt fidelity and 'in context' over every image of every subject prompt."""
    present, honoured, both = [], [], []
    for prompt in prompts:
        for image in images[prompt.text]:
            parsed = parse(image)
            has_subject = parsed.subject == subject
            right = parsed.context == prompt.context
            present.append(has_subject)
            honoured.append(right)
            both.append(has_subject and right)
    return {"subject": float(np.mean(present)), "prompt": float(np.mean(honoured)), "in_context": float(np.mean(both))}


def class_accuracy(images: dict[str, list[np.ndarray]], prompts: list[ClassPrompt]) -> float:
    """Share of class-prompt images showing the class in the asked colour (and no subject)."""
    hits = []
    for prompt in prompts:
        for image in images[prompt.text]:
            parsed = parse(image)
            hits.append(parsed.shape == prompt.shape and parsed.colour == prompt.colour and parsed.subject is None)
    return float(np.mean(hits))


def calibrate(subject: str, seeds: int = 4, token: str = "sks") -> dict[str, dict[str, float]]:
    """The measures on generators whose answer is known: a perfect one (renders each prompt), one that
    returns the instance photos (overfit), one that draws the class instead of the subject (no training),
    and uniform noise."""
    rng = np.random.default_rng(123)
    prompts, classes = subject_prompts(token, subject), class_prompts(subject)
    photos = world.subject_images(subject, count=5)
    shape = world.SUBJECTS[subject].shape

    def perfect_subject(prompt: SubjectPrompt) -> np.ndarray:
        return world.render(world.random_scene(rng, subject=subject, context=prompt.context), rng)

    def perfect_class(prompt: ClassPrompt) -> np.ndarray:
        scene = world.random_scene(rng, shape=prompt.shape, colour=prompt.colour, context=prompt.context)
        return world.render(scene, rng)

    def class_instead(prompt: SubjectPrompt) -> np.ndarray:
        return world.render(world.random_scene(rng, shape=shape, context=prompt.context), rng)

    generators = {
        "perfect": (perfect_subject, perfect_class),
        "instance photos": (lambda prompt: photos[rng.integers(len(photos))], perfect_class),
        "class, no subject": (class_instead, perfect_class),
        "noise": (
            lambda prompt: rng.integers(0, 256, (world.SIZE, world.SIZE, 3), dtype=np.uint8),
            lambda prompt: rng.integers(0, 256, (world.SIZE, world.SIZE, 3), dtype=np.uint8),
        ),
    }
    results = {}
    for name, (draw_subject, draw_class) in generators.items():
        subject_images = {prompt.text: [draw_subject(prompt) for _ in range(seeds)] for prompt in prompts}
        class_images = {prompt.text: [draw_class(prompt) for _ in range(seeds)] for prompt in classes}
        figures = score_subject(subject_images, prompts, subject)
        figures["class_accuracy"] = class_accuracy(class_images, classes)
        results[name] = figures
    return results
