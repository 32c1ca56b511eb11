"""`evaluate(run_dir)`: generate with fixed seeds, with and without the adapter, and score the images.

    from personalize.eval import EvalSettings, evaluate
    result = evaluate("out/cat", EvalSettings(prompts="dreambench", seeds=4))
    result.figures["dino"], result.files

What it generates (image s of a prompt uses seed `seed + s`, with and without the adapter alike):
- the instance prompt and the subject prompts (DreamBench's or a file's), with the adapter;
- the class prompts ("a photo of a cat", ...) once on the base, once with the adapter (drift).
The run's config.yaml says which base, token, class word and photos; the adapter loads through
`personalize.pipelines.load_adapter`, as a user would load it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.eval import metrics
from personalize.eval import prompts as prompt_sets


@dataclass
class EvalSettings:
    prompts: str = "dreambench"  # "dreambench" or a text file (one prompt a line, {token} and {class} filled in)
    seeds: int = 4  # images per prompt (DreamBench: 4)
    seed: int = 0
    steps: int = 25
    guidance: float | None = None  # None: the pipeline's default
    class_prompts: int = prompt_sets.CLASS_PROMPTS
    class_prompt_list: list[str] | None = None  # explicit class prompts (default: built from the class word)
    metric_models: dict[str, str] = field(default_factory=dict)  # {"dino": id, "clip": id}; missing: defaults
    model: str = ""  # base model; "": the run's
    device: str = "auto"


@dataclass
class EvalImages:
    """Everything generated for one run, prompt -> images (seed order)."""

    token: str
    class_word: str
    instance_prompt: str
    references: list[Any]  # the training photos (PIL)
    subject: dict[str, list[Any]]  # instance prompt first, then the subject prompts
    base_class: dict[str, list[Any]]
    adapted_class: dict[str, list[Any]]


@dataclass
class EvalResult:
    figures: dict[str, Any]
    per_prompt: list[dict[str, Any]]
    files: list[Path]
    images: EvalImages


def read_run(run_dir: Path) -> dict[str, Any]:
    from personalize.config import read_yaml_file

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass the --output folder of a finished `personalize train` run")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} holds no config.yaml, so it is not a `personalize train` output folder")
    return read_yaml_file(config_file)


def reference_images(data: dict[str, Any]) -> list[Any]:
    """The run's training photos (not its class images), decoded as the trainer decoded them."""
    from personalize.config import from_dict
    from personalize.data import DataConfig
    from personalize.data.dataset import scan
    from personalize.data.decode import decode, read_bytes

    config = from_dict(DataConfig, {**data, "class_dir": "", "num_class_images": 0}, prefix="data.")
    try:
        records, _ = scan(config)
    except UserError as error:
        raise UserError(f"the run's training images cannot be read any more: {error}") from None
    photos = [decode(read_bytes(record.path)).image for record in records if not record.is_class]
    if not photos:
        raise UserError(f"the run's training images ({data.get('images')}) hold no readable photo")
    return photos


def generate_images(run_dir: str | Path, settings: EvalSettings, *, pipe: Any = None) -> EvalImages:
    """Generate every image of an evaluation; `pipe` (a loaded base) is left as it was."""
    from personalize.pipelines import load_adapter, unload_adapter

    run_dir = Path(run_dir)
    config = read_run(run_dir)
    data = config.get("data", {})
    token, class_word = str(data.get("token", "")), str(data.get("class_word", ""))
    from personalize.config import from_dict
    from personalize.data import DataConfig
    from personalize.data.sources import instance_prompt

    instance = instance_prompt(from_dict(DataConfig, data, prefix="data."))
    subject_prompts = [
        instance,
        *[p for p in prompt_sets.subject_prompts(settings.prompts, token, class_word) if p != instance],
    ]
    class_prompts = settings.class_prompt_list
    if class_prompts is None:
        class_prompts = prompt_sets.class_prompts(class_word, settings.class_prompts)
    references = reference_images(data)
    if pipe is None:
        pipe = _load_base(settings.model or str(config.get("model", "")), settings.device)
    size = data.get("resolution")

    def draw(prompt_list: list[str]) -> dict[str, list[Any]]:
        return {prompt: generate_prompt(pipe, prompt, settings, size) for prompt in prompt_list}

    base_class = draw(class_prompts)
    name = load_adapter(pipe, run_dir, name="personalize-eval")
    try:
        subject = draw(subject_prompts)
        adapted_class = draw(class_prompts)
    finally:
        unload_adapter(pipe, name)
    return EvalImages(token, class_word, instance, references, subject, base_class, adapted_class)


def _load_base(model: str, device: str) -> Any:
    from personalize.models import load_pipeline
    from personalize.pipelines.cli import resolve_device, resolve_dtype

    device = resolve_device(device)
    pipe = load_pipeline(model, torch_dtype=resolve_dtype("auto", device))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_prompt(pipe: Any, prompt: str, settings: EvalSettings, size: int | None) -> list[Any]:
    """settings.seeds images of one prompt, image s from seed settings.seed + s."""
    import torch

    from personalize.pipelines.generate import GenerationSettings, generate

    request = GenerationSettings(
        prompt=prompt,
        steps=settings.steps,
        guidance=settings.guidance,
        seed=settings.seed,
        num_images=settings.seeds,
        width=size,
        height=size,
    )
    with torch.no_grad():
        return generate(pipe, request)


def score(images: EvalImages, dino: Any, clip: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(overall figures, one row per prompt) from the DINO and CLIP embedders (see metrics.py)."""
    dino_refs, clip_refs = dino.images(images.references), clip.images(images.references)
    rows = []
    all_dino, all_clip_i, all_clip_t = [], [], []
    for prompt, generated in images.subject.items():
        dino_scores = metrics.similarity_to_references(dino.images(generated), dino_refs)
        clip_embeddings = clip.images(generated)
        clip_i = metrics.similarity_to_references(clip_embeddings, clip_refs)
        text = clip.texts([prompt_sets.without_token(prompt, images.token)] * len(generated))
        clip_t = metrics.paired_similarity(clip_embeddings, text)
        all_dino.append(dino_scores)
        all_clip_i.append(clip_i)
        all_clip_t.append(clip_t)
        rows.append(
            {
                "prompt": prompt,
                "dino": metrics.mean(dino_scores),
                "clip_i": metrics.mean(clip_i),
                "clip_t": metrics.mean(clip_t),
            }
        )
    import torch

    figures: dict[str, Any] = {
        "dino": metrics.mean(torch.cat(all_dino)),
        "clip_i": metrics.mean(torch.cat(all_clip_i)),
        "clip_t": metrics.mean(torch.cat(all_clip_t)),
    }
    if images.base_class:
        base = [image for prompt in images.base_class for image in images.base_class[prompt]]
        adapted = [image for prompt in images.adapted_class for image in images.adapted_class[prompt]]
        figures["class_dino"] = metrics.mean(metrics.paired_similarity(dino.images(base), dino.images(adapted)))
        figures["class_clip"] = metrics.mean(metrics.paired_similarity(clip.images(base), clip.images(adapted)))
        figures["drift"] = 1.0 - figures["class_dino"]
    return figures, rows


def evaluate(
    run_dir: str | Path, settings: EvalSettings | None = None, *, pipe: Any = None, say: Any = print
) -> EvalResult:
    """Generate, score and write OUT/eval/: eval.json, eval.md (tables) and contact_sheet.png."""
    from personalize.eval.embedders import TINY_MODELS, load_embedder
    from personalize.eval.report import write_report
    from personalize.models.tiny import is_tiny

    settings = settings or EvalSettings()
    if settings.seeds < 1 or settings.steps < 1:
        raise UserError(f"--seeds and --steps must be at least 1 (got {settings.seeds} and {settings.steps})")
    run_dir = Path(run_dir)
    config = read_run(run_dir)
    model = settings.model or str(config.get("model", ""))
    chosen = dict(settings.metric_models)
    if is_tiny(model):  # a random-weight base: random-weight metric models too, so that it runs offline
        chosen = {**TINY_MODELS, **chosen}
    # Load the metric models first: a missing one fails in a second, not after all the generation.
    dino = load_embedder("dino", chosen.get("dino"))
    clip = load_embedder("clip", chosen.get("clip"))
    say(f"eval: generating {settings.seeds} image(s) per prompt with {model}")
    images = generate_images(run_dir, dataclasses.replace(settings, model=model), pipe=pipe)
    figures, rows = score(images, dino, clip)
    figures.update(
        prompts=settings.prompts,
        seeds=settings.seeds,
        steps=settings.steps,
        guidance=settings.guidance,
        metric_models={"dino": dino.source, "clip": clip.source},
        model=model,
    )
    files = write_report(run_dir / "eval", figures, rows, images, settings.seeds)
    say(
        f"eval: DINO {figures['dino']:.3f}  CLIP-I {figures['clip_i']:.3f}  CLIP-T {figures['clip_t']:.3f}"
        + (f"  class similarity (DINO) {figures['class_dino']:.3f}" if "class_dino" in figures else "")
    )
    for path in files:
        say(f"  {path}")
    return EvalResult(figures, rows, files, images)
