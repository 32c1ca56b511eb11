"""Memory planner for flow-matching DiT training (SD3, Flux, Wan, ...): peak device memory before anything is loaded.

Reads no weights: the transformer is built on PyTorch's meta device from its config (a published config
by hub id, or the folder's config.json), so every shape is exact and no memory is taken; the adapter is
injected there too, so its parameter count is exact for every method. The rest is arithmetic:

    frozen weights   each parameter x bytes of its storage: compute dtype (fp32 4, bf16 2), NF4 0.5 + 4/64
                     (one fp32 absmax per 64 weights), int8 1 + 4/out-row; layers `--quantize` skips stay
    trained          n x 4 (fp32 weights) + n x 4 (gradients) + optimizer states: AdamW 8n, 8-bit AdamW 2n,
                     Prodigy 16n
    activations      what autograd keeps for backward: one forward of the full model on the meta device under
                     saved-tensor hooks, summed without the parameters themselves and without the (N x N)
                     attention matrices of the math kernel (the fused kernels PyTorch uses keep none);
                     with gradient checkpointing: every block's inputs + the largest block's activations
    workspace        the largest saved tensor twice (its gradient and one temporary during backward) + the fp32
                     loss terms
    caches           the text encoders + VAE while latents and embeddings are cached, before the transformer
                     arrives (a separate phase: the peak is the largest of the phases)
    runtime          CPU only: the resident size of Python + torch + diffusers (measured: about 0.55 GB)
    loading          CPU only, a phase of its own: the transformer is loaded in fp32 and then cast to the
                     compute dtype. From a folder of fp32 files the recipe casts one tensor at a time, read
                     into its own buffer (personalize.models.mapped.cast_from_files: 2n + the largest tensor;
                     `module.to` would keep every mapped page resident beside the copy, 4n + 2n). Files in
                     another dtype (a hub cache) are cast to fp32 while mapped (file + 4n). (SD3's position table is
                     not computed while loading: personalize.models.position_tables.) On a GPU only the cast
                     copy reaches the device, so this phase does not exist there.
    buffers          counted with the frozen weights (SD3's position table: 0.9 GB fp32 for SD3.5 medium)
    idle encoders    CPU only: the text encoders (and VAE) stay resident after caching unless they can be
                     pointed back at their untouched files (personalize.models.mapped.remap: files of the same
                     dtype); a bf16 run keeps bf16 copies of its fp32 encoder files, a model built in code all

`plan(...)` returns the parts and the peak; `fit(...)` walks settings from the cheapest change to the
most expensive until the peak fits `--vram`. Checked against measured peaks on CPU (tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.meta_trace import ConcreteIndices
from personalize.models.families import FamilyDescription, described_family, family_of_config, transformer_config

GB = 1024**3
CPU_RUNTIME = 0.55 * GB
DTYPE_BYTES = {"no": 4, "fp32": 4, "bf16": 2, "fp16": 2}
PLANNED_METHODS = ("lora", "dora", "loha", "lokr", "krona", "ia3", "full")  # the flow-matching recipe's methods
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
# what a published family's text encoders and VAE hold (parameters of the released files)
PUBLISHED_VAE_PARAMETERS = 0.13e9  # Flux's VAE 84M, Qwen-Image's and Wan's 127M: an upper bound by hub id
ENCODER_PARAMETERS = {"flux": 123e6 + 4762e6 + 84e6, "sd3": 124e6 + 695e6 + 4762e6 + 84e6}


@dataclass(frozen=True)
class Settings:
    """What changes the peak: the run's memory-relevant options (TrainConfig keys of the same names)."""

    method: str = "lora"
    rank: int = 4
    targets: str = ""
    resolution: int = 512
    batch_size: int = 1
    quantize: str = ""
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    method_options: tuple[tuple[str, Any], ...] = ()
    frames: int = 1  # video families: frames per training clip
    edit: bool = False  # --task edit: the source's tokens join the sequence; encoders stay on the device


@dataclass
class Estimate:
    family: str
    settings: Settings
    parts: dict[str, float] = field(default_factory=dict)  # bytes of the training phase
    caching: float = 0.0  # bytes of the caching phase
    loading: float = 0.0  # bytes while the transformer is cast after loading (CPU)
    device: str = "cuda"

    @property
    def training(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return max(self.training, self.caching, self.loading)

    def lines(self) -> list[str]:
        rows = [f"{name:<34}{value / GB:8.2f} GB" for name, value in self.parts.items()]
        rows.append(f"{'training phase':<34}{self.training / GB:8.2f} GB")
        rows.append(f"{'caching phase (encoders + VAE)':<34}{self.caching / GB:8.2f} GB")
        if self.loading:
            rows.append(f"{'loading phase (build, file + cast)':<34}{self.loading / GB:8.2f} GB")
        rows.append(f"{'peak':<34}{self.peak / GB:8.2f} GB")
        return rows


def parse_size(text: str) -> float:
    """'16GB', '12 GiB', '24g', '8000MB' -> bytes (GB means GiB, as GPU specs are read)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([gGmM])?(i?[bB])?\s*", str(text))
    if not match:
        raise UserError(f"--vram {text!r} is not a size; write it like 16GB or 12GB")
    value = float(match.group(1))
    return value * (1024**2 if (match.group(2) or "g").lower() == "m" else GB)


@functools.lru_cache(maxsize=4)
def _tiny(model: str) -> Any:
    from personalize.models import build_tiny

    return build_tiny(model)


def vae_factors(model: str, family: FamilyDescription | None = None) -> tuple[int, int]:
    """(spatial, temporal) downsampling of the VAE, from its config (personalize.models.encode.vae_factors); a
    hub id without a local config: the family's released VAE (8x for SD3/Flux/Qwen-Image/Wan, Wan's also 4x in
    time; 16x for Qwen-Image 2.1)."""
    from personalize.models.encode import vae_factors as of_config

    if model.startswith("tiny-"):
        return of_config(dict(_tiny(model).vae.config))
    file = Path(model).expanduser() / "vae" / "config.json"
    if file.is_file():
        return of_config(json.loads(file.read_text()))
    return 2 ** (family.vae_stages if family is not None else 3), 1


def model_config(model: str) -> tuple[FamilyDescription, dict[str, Any]]:
    """(family, transformer config) of what --model names, read without weights."""
    transformer = getattr(_tiny(model), "transformer", None) if model.startswith("tiny-") else None
    if model.startswith("tiny-") and transformer is None:
        raise UserError(
            f"cannot plan for {model}: the planner sizes SD3 and Flux transformers (try tiny-flux or tiny-sd3); "
            "UNet models (SD1.x, SDXL) are not described yet"
        )
    config = dict(transformer.config) if transformer is not None else transformer_config(model)
    # by name, published id or folder first: families sharing a config (Flux, Flux Kontext) differ by pipeline
    family = (described_family(model) or family_of_config(config)) if config is not None else None
    if family is None or config is None:
        raise UserError(
            f"cannot plan for {model}: its transformer config is not readable here (the planner knows SD3 and Flux "
            "models by hub id, a local diffusers folder, or a tiny model)"
        )
    return family, dict(config)


@dataclass(frozen=True)
class Trace:
    """What one meta-device forward tells: parameter counts by storage, trainable count, saved activations."""

    quantizable: float  # elements of the Linear weights --quantize stores in 4/8 bits
    quantizable_rows: float  # their output rows (int8 keeps one fp32 scale per row)
    other: float  # elements of every other frozen parameter and of the floating-point buffers
    trainable: float
    activations: float  # saved for backward, no checkpointing
    checkpointed: float  # block inputs + the largest block's activations
    workspace: float
    table: float = 0.0  # elements of position tables (SD3's pos_embed), of which a step reads only a crop
    tensors: tuple[float, ...] = ()  # elements of each floating tensor, in the order the files are cast


@functools.lru_cache(maxsize=16)
def _trace(
    family_name: str,
    config_json: str,
    method: str,
    hyper: tuple,
    targets: str,
    resolution: int,
    batch: int,
    half: bool,
    downsample: int,
    frames: int = 1,
    edit: bool = False,
) -> Trace:
    """One training forward of the transformer on the meta device (no memory, no weights)."""
    from diffusers import models as diffusers_models
    from diffusers.utils import logging as diffusers_logging

    from personalize import adapters
    from personalize.models.families import describe

    family = describe(family_name)
    assert family is not None
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(bfloat16) on a model warns about float32 modules it has none of
    try:
        with torch.device("meta"):
            transformer = getattr(diffusers_models, family.transformer_class).from_config(config)
        if half and method != "full":
            transformer.to(torch.bfloat16)  # the frozen base in the compute dtype, as the recipe places it
    finally:
        diffusers_logging.set_verbosity(verbosity)
    skip = [re.compile(pattern) for pattern in family.full_precision]
    quantizable = rows = 0.0
    for path, module in transformer.named_modules():
        if type(module) is torch.nn.Linear and not any(p.fullmatch(path) for p in skip):
            quantizable += module.weight.numel()
            rows += module.weight.shape[0]
    other = sum(p.numel() for p in transformer.parameters()) - quantizable
    state_dict = transformer.state_dict()  # before the adapter: the files' tensors, in cast order
    # buffers are weights too: SD3's position table (pos_embed_max_size^2 x width, 0.9 GB in fp32 for SD3.5 medium)
    other += sum(b.numel() for b in transformer.buffers() if b.is_floating_point())
    transformer.requires_grad_(method == "full")
    if method != "full":
        adapters.inject(transformer, method, targets=targets or family.default_targets, **dict(hyper))
    trainable = 0.0
    for param in transformer.parameters():
        if param.requires_grad:  # what trains is fp32, as in the recipe
            param.data = param.data.float()
            trainable += param.numel()
    latent = resolution // downsample
    dtype = torch.bfloat16 if half else torch.float32
    saved = _activations(transformer, family, config, latent, batch, dtype, frames, edit)
    table = sum(m.pos_embed.numel() for m in transformer.modules() if _position_table(m))
    tensors = tuple(float(t.numel()) for t in state_dict.values() if t.is_floating_point())
    return Trace(quantizable, rows, other, trainable, *saved, table=table, tensors=tensors)


def _position_table(module: torch.nn.Module) -> bool:
    """SD3's PatchEmbed with pos_embed_max_size: a stored (pos_embed_max_size^2, width) table cropped per input."""
    return type(module).__name__ == "PatchEmbed" and bool(getattr(module, "pos_embed_max_size", None))


def _example_input(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One input of `predict` for the trace: floats on meta; masks (`*_mask`: every planned token valid) and
    image slots (`*_slots`: none, a text-to-image prompt) with real values on the CPU (personalize.meta_trace)."""
    if key.endswith("_mask"):
        return torch.ones(shape, dtype=torch.long)
    if key.endswith("_slots"):
        return torch.zeros(shape, dtype=torch.long)
    return torch.zeros(shape, device="meta", dtype=dtype)


def _activations(
    transformer: torch.nn.Module,
    family: FamilyDescription,
    config: Mapping[str, Any],
    size: int,
    batch: int,
    dtype: torch.dtype,
    frames: int = 1,
    edit: bool = False,
) -> tuple[float, float, float]:
    """Saved-for-backward bytes of one forward on meta tensors for latents of side `size` (video families:
    `frames` latent frames; edit runs: with the source's latents of the same size as extra tokens): (in total,
    with checkpointing, workspace)."""
    channels, height, width = family.latent_shape(config, size, size)
    shape = (batch, channels, *((frames,) if family.clip else ()), height, width)
    latents = torch.zeros(shape, device="meta", dtype=dtype)  # (B, C, [F,] h, w)
    embeds = {key: _example_input(key, (batch, *shape), dtype) for key, shape in family.example_shapes(config).items()}
    image, text = family.image_tokens(config, size, size) * frames, family.text_tokens(config)
    # attention over the joint sequence, the image or text tokens alone (Z-Image's refiners, Wan's self-attention
    # over every frame), or image queries on text keys (Wan's cross-attention); edit runs: target + source tokens
    tokens = {image, text, image + text, 2 * image, 2 * image + text}
    parameters = {id(p) for p in transformer.parameters()} | {id(t) for t in transformer.buffers()}
    per_block: dict[str, float] = {}
    largest = [0.0]
    block_inputs = [0.0]
    current = ["outside"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) in parameters or id(base) in parameters:
            return tensor
        # the math kernel's (B, H, Q, K) or (B * H, Q, K) attention matrices; not a (B, T, D) hidden state whose
        # width happens to equal a token count (Qwen-Image 2.1: 4096 wide, 4096 image tokens at 1024 px)
        shape = tensor.shape
        if tensor.dim() >= 3 and shape[-3] != batch and shape[-1] in tokens and shape[-2] in tokens:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        per_block[current[0]] = per_block.get(current[0], 0.0) + nbytes
        largest[0] = max(largest[0], nbytes)
        return tensor

    def enter(name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            current[0] = name
            block_inputs[0] += sum(
                t.numel() * t.element_size() for t in (*args, *kwargs.values()) if torch.is_tensor(t)
            )

        return hook

    handles = []
    for name, module in transformer.named_modules():
        if re.fullmatch(family.block_pattern, name):
            handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda *_: current.__setitem__(0, "outside")))
    # data-dependent shapes (HiDream's MoE routing: boolean indexing) cannot be known on meta tensors: count
    # every token at every expert, an upper bound on the routed experts' activations (see README)
    from torch.fx.experimental import _config as fx_config

    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            fx_config.patch(meta_nonzero_assume_all_nonzero=True),
            ConcreteIndices(),  # masks that decide shapes (Qwen-Image 2.1's image slots) keep their values
        ):
            timesteps = torch.full((batch,), 500.0, device="meta")
            if edit and family.predict_edit is not None:  # the source crop is the target's size
                output = family.predict_edit(transformer, latents, timesteps, embeds, family.guidance_scale, latents)
            else:
                output = family.predict(transformer, latents, timesteps, embeds, family.guidance_scale)
    finally:
        for handle in handles:
            handle.remove()
    outside = per_block.pop("outside", 0.0)
    blocks = list(per_block.values()) or [0.0]
    loss_terms = output.numel() * 4 * 4  # fp32 prediction, target, difference, square
    return outside + sum(blocks), outside + block_inputs[0] + max(blocks), 2 * largest[0] + loss_terms


def plan(model: str, settings: Settings, device: str = "cuda") -> Estimate:
    """The peak memory of training `model` with `settings` on `device` ('cuda' or 'cpu'), by parts."""
    if settings.method not in PLANNED_METHODS:
        raise UserError(f"the planner covers --method {', '.join(PLANNED_METHODS)}; got '{settings.method}'")
    family, config = model_config(model)
    if settings.edit and family.predict_edit is None:
        from personalize.models.families import FLOW_FAMILIES

        edit_families = ", ".join(name for name, f in FLOW_FAMILIES.items() if f.predict_edit is not None)
        raise UserError(f"{model} is a {family.name} model, not an edit model; --task edit plans {edit_families}")
    half = DTYPE_BYTES[settings.mixed_precision] == 2
    spatial, temporal = vae_factors(model, family)
    latent_frames = 1 + (max(settings.frames, 1) - 1) // temporal  # the VAE keeps the first frame, then 1 in `temporal`
    hyper = {**dict(settings.method_options)}
    if settings.method in ("lora", "dora", "loha", "lokr"):
        hyper.update(rank=settings.rank, alpha=settings.rank)
    try:
        trace = _trace(
            family.name,
            json.dumps(config, sort_keys=True),
            settings.method,
            tuple(sorted(hyper.items())),
            settings.targets,
            settings.resolution,
            settings.batch_size,
            half,
            spatial,
            latent_frames if family.clip else 1,
            settings.edit,
        )
    except ValueError as error:  # the model's own check of what it can take (e.g. SD3's pos_embed_max_size)
        raise UserError(f"cannot plan {model} at --resolution {settings.resolution}: {error}") from None
    estimate = Estimate(family.name, settings, device=device)
    compute = 2 if half and settings.method != "full" else 4
    if settings.method == "full":
        estimate.parts["trained weights (fp32, all)"] = (trace.quantizable + trace.other) * 4
    elif settings.quantize == "int8":
        estimate.parts["frozen weights (int8)"] = trace.quantizable + 4 * trace.quantizable_rows + trace.other * compute
    elif settings.quantize:
        quantized = trace.quantizable * (0.5 + 4 / 64)  # 4 bits + one fp32 absmax per block of 64
        estimate.parts[f"frozen weights ({settings.quantize})"] = quantized + trace.other * compute
    else:
        estimate.parts[f"frozen weights ({'bf16' if half else 'fp32'})"] = (trace.quantizable + trace.other) * compute
    if settings.method != "full":
        estimate.parts["trained weights (fp32)"] = trace.trainable * 4
    estimate.parts["gradients (fp32)"] = trace.trainable * 4
    states = OPTIMIZER_STATE_BYTES[settings.optimizer]
    estimate.parts[f"optimizer states ({settings.optimizer})"] = trace.trainable * states
    if settings.gradient_checkpointing:
        estimate.parts["activations (with checkpointing)"] = trace.checkpointed
    else:
        estimate.parts["activations (without checkpointing)"] = trace.activations
    estimate.parts["workspace"] = trace.workspace
    if settings.edit:  # the VAE encodes each source crop on first use; a prompt that reads the source, every step
        resident = ("vae", *(family.text_encoders if family.encode_edit_prompt else ()))
        kept = sum(_component_bytes(model, family, settings, name) for name in resident)
        estimate.parts["encoders kept for edit pairs"] = kept
    encoders = _encoder_bytes(model, family, settings)
    if device == "cpu":
        estimate.parts["runtime (Python, torch)"] = CPU_RUNTIME
        idle = _idle_encoder_bytes(model, family, settings)
        if idle:
            estimate.parts["idle encoders (resident copies)"] = idle
        estimate.caching = CPU_RUNTIME + encoders  # the transformer's pages are not read yet
        cast = _cast_bytes(model, settings, trace.quantizable + trace.other, trace.tensors)
        estimate.loading = CPU_RUNTIME + idle + cast
        if _file_bytes_per_parameter(model, "transformer") == compute:  # mapped, never cast: pages read = crop
            for name in estimate.parts:
                if name.startswith("frozen weights"):
                    estimate.parts[name] -= trace.table * compute
    else:
        estimate.caching = encoders
    return estimate


def _file_bytes_per_parameter(model: str, component: str) -> float | None:
    """Bytes per parameter of `component`'s weight files: a folder's safetensors headers, 2 for a published
    model (bf16 / fp16 releases), None for a model built in code (no files)."""
    if model.startswith("tiny-"):
        return None
    folder = Path(model).expanduser() / component
    if folder.is_dir():
        count, nbytes = _folder_parameters(folder)
        return nbytes / count if count else None
    return 2.0


def _cast_bytes(model: str, settings: Settings, parameters: float, tensors: tuple[float, ...]) -> float:
    """CPU: resident transformer bytes while it is loaded in fp32 and cast to the compute dtype (see the
    module doc). A quantized base is read one weight at a time; a full fine-tune keeps fp32 (no cast)."""
    if settings.quantize:
        return 0.0
    source = _file_bytes_per_parameter(model, "transformer")
    compute = 4 if settings.method == "full" else DTYPE_BYTES[settings.mixed_precision]
    if source is None:  # built in code: fp32 tensors, each freed as soon as its cast copy exists
        return 4 * parameters
    if source == 4:  # a folder of fp32 files: cast_from_files reads one tensor at a time; no cast: mapped pages
        if compute == 4:
            return 0.0
        peak = done = 0.0
        for numel in tensors:  # the copies so far + this tensor read in fp32 + its copy
            peak = max(peak, done + (4 + compute) * numel)
            done += compute * numel
        return max(peak, compute * parameters)
    return (source + 4) * parameters  # from a hub cache: cast to fp32 while the files are mapped


def _idle_encoder_bytes(model: str, family: FamilyDescription, settings: Settings) -> float:
    """CPU: encoder / VAE bytes that stay resident after caching (those `remap` cannot return to their files)."""
    total = 0.0
    for name in (*family.text_encoders, "vae"):
        folder = Path(model).expanduser() / name
        count, nbytes = _folder_parameters(folder) if folder.is_dir() else (0.0, 0.0)
        source = nbytes / count if count else 2.0  # a hub cache holds bf16 files
        if model.startswith("tiny-") or source != _component_dtype_bytes(name, settings):  # a cast copy stays
            total += _component_bytes(model, family, settings, name)
    return total


def _encoder_bytes(model: str, family: FamilyDescription, settings: Settings) -> float:
    """Text encoders in the compute dtype + the fp32 VAE, from the folder's file headers or the published sizes."""
    parts = [_component_bytes(model, family, settings, name) for name in (*family.text_encoders, "vae")]
    if model.startswith("tiny-") or Path(model).expanduser().is_dir():
        return sum(parts)
    return ENCODER_PARAMETERS.get(family.name, family.encoder_parameters) * DTYPE_BYTES[settings.mixed_precision]


def _component_bytes(model: str, family: FamilyDescription, settings: Settings, name: str) -> float:
    """One text encoder (compute dtype) or the VAE (fp32); by hub id from the published totals (the VAE taken
    as PUBLISHED_VAE_PARAMETERS, the text encoders sharing the rest)."""
    dtype = _component_dtype_bytes(name, settings)
    if model.startswith("tiny-"):
        return sum(p.numel() for p in getattr(_tiny(model), name).parameters()) * dtype
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _folder_parameters(folder / name)[0] * dtype
    if name == "vae":
        return PUBLISHED_VAE_PARAMETERS * dtype
    total = ENCODER_PARAMETERS.get(family.name, family.encoder_parameters) - PUBLISHED_VAE_PARAMETERS
    return total / len(family.text_encoders) * dtype


def _component_dtype_bytes(name: str, settings: Settings) -> int:
    """The VAE runs in fp32, the text encoders in the compute dtype (as the recipe places them)."""
    return 4 if name == "vae" else DTYPE_BYTES[settings.mixed_precision]


def _folder_parameters(folder: Path) -> tuple[float, float]:
    """(parameter count, bytes) from the safetensors headers: nothing else is read."""
    from personalize.models.mapped import _header

    count = nbytes = 0.0
    for file in folder.glob("*.safetensors"):
        for entry in _header(file)[0].values():
            count += math.prod(entry["shape"])
            start, end = entry["data_offsets"]
            nbytes += end - start
    return count, nbytes


# --- fitting a stated memory -------------------------------------------------------------------

# memory savings and what each costs (precision, speed): a fit takes the cheapest combination that fits
SAVINGS: tuple[tuple[dict[str, Any], str, int], ...] = (
    ({"mixed_precision": "bf16"}, "bf16 frozen base", 1),
    ({"optimizer": "adamw8bit"}, "8-bit AdamW", 1),
    ({"gradient_checkpointing": True}, "gradient checkpointing", 2),
    ({"quantize": "nf4"}, "NF4 frozen transformer", 3),
)


def candidates(settings: Settings) -> list[tuple[Settings, list[str]]]:
    """Every combination of the savings the settings do not have yet, cheapest first."""
    open_savings = [
        saving
        for saving in SAVINGS
        if not all(getattr(settings, key) == value for key, value in saving[0].items())
        and not (settings.method == "full" and "quantize" in saving[0])
    ]
    options = []
    for mask in range(2 ** len(open_savings)):
        chosen = [saving for index, saving in enumerate(open_savings) if mask >> index & 1]
        changes = {key: value for change, _, _ in chosen for key, value in change.items()}
        cost = (sum(c for _, _, c in chosen), len(chosen))
        options.append((cost, dataclasses.replace(settings, **changes), [label for _, label, _ in chosen]))
    return [(option, labels) for _, option, labels in sorted(options, key=lambda item: item[0])]


def fit(model: str, settings: Settings, vram: float, device: str = "cuda") -> tuple[Estimate, list[str]]:
    """The cheapest settings whose peak fits `vram` bytes, and what was turned on; UserError when none fits."""
    closest = None
    for option, applied in candidates(settings):
        estimate = plan(model, option, device)
        if estimate.peak <= vram:
            return estimate, applied
        closest = (estimate, applied)
    assert closest is not None
    estimate, applied = closest
    raise UserError(
        f"nothing fits {vram / GB:.0f} GB: the closest ({', '.join(applied) or 'as given'}) needs "
        f"{estimate.peak / GB:.1f} GB; lower --resolution or --batch-size, or use a larger GPU"
    )


def settings_of(config: Any) -> Settings:
    """Planner settings from a TrainConfig."""
    return Settings(
        method=config.method,
        rank=config.rank or 4,
        targets=config.targets,
        resolution=config.data.resolution,
        batch_size=config.batch_size,
        quantize=config.quantize,
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        method_options=tuple(sorted(config.method_options.items())),
        frames=config.data.frames or 1,
        edit=bool(config.edit.sources),
    )


def apply_vram(config: Any, family: FamilyDescription) -> tuple[Any, str]:
    """`personalize train --vram`: the config with the cheapest settings that fit, and a note saying which."""
    from personalize.trainers.common.run import cpu_only

    vram = parse_size(config.vram)
    estimate, applied = fit(config.model, settings_of(config), vram, "cpu" if cpu_only() else "cuda")
    chosen = estimate.settings
    config = dataclasses.replace(
        config,
        mixed_precision=chosen.mixed_precision,
        gradient_checkpointing=chosen.gradient_checkpointing,
        optimizer=chosen.optimizer,
        quantize=chosen.quantize,
    )
    what = ", ".join(applied) if applied else "the settings as given"
    return config, f"{what} (planned peak {estimate.peak / GB:.1f} GB)"
