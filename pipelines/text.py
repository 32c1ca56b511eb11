"""Text generation with a language model (or a LLaVA-style VLM) and an optional trained adapter.

    model, processor = load_text_model("tiny-llama", adapter="personalize-out/chat")
    answer = generate_text(model, processor, "what is two", max_new_tokens=32)   # greedy

The prompt becomes one user turn formatted with the tokenizer's chat template (plain text when the
tokenizer has none); `temperature` > 0 samples (seeded), otherwise decoding is greedy. `stream=True`
prints tokens to the terminal as they are generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError

IMAGE_PLACEHOLDER = "<image>"


def language_family(model: str) -> str | None:
    """'llm' / 'vlm' for a tiny language model or a local transformers folder; None otherwise."""
    from personalize.models import TINY_LANGUAGE

    if model in TINY_LANGUAGE:
        return "vlm" if "llava" in model else "llm"
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        from personalize.models import detect_family

        family = detect_family(folder)
        return family if family in ("llm", "vlm") else None
    return None


def attach_adapter(model: Any, folder: str | Path, name: str = "default") -> str:
    """Inject the adapter a run wrote to `folder` into `model` with the core; returns its method.

    personalize_adapter.safetensors (methods peft lacks) -> adapters.load_native; peft PROMPT_TUNING,
    PREFIX_TUNING and P_TUNING -> the prompt methods with the saved prompt; ADAPTION_PROMPT -> llama-adapter;
    every other peft type -> personalize.formats' reader (LoRA family, IA3, AdaLoRA, OFT, BOFT, VeRA)."""
    from personalize import adapters
    from personalize.adapters.native import NATIVE_FILE
    from personalize.pipelines.peft_layout import adaption_prompt, prompt_method, read_prompt

    path = Path(folder).expanduser()
    if (path / NATIVE_FILE).is_file() or path.name == NATIVE_FILE:
        return adapters.load_native(model, path, name)
    prompt = prompt_method(path)
    if prompt is not None:
        method, tokens = prompt
        adapters.inject(model, method, name=name, num_virtual_tokens=tokens)
        adapters.load_state_dict(model, read_prompt(path), name)
        return method
    gated = adaption_prompt(path)
    if gated is not None:
        options, tensors = gated
        adapters.inject(model, "llama-adapter", name=name, **options)
        adapters.load_state_dict(model, tensors, name)
        return "llama-adapter"
    from personalize.formats import read_adapter

    found = read_adapter(path, model)
    adapters.inject_from_state_dict(model, found.components["model"], name)
    return found.metadata.get("personalize_method") or adapters.describe(model).split()[1]


def load_text_model(model: str, adapter: str | None = None, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    from personalize.models import load_language_model

    loaded, processor = load_language_model(model, torch_dtype=dtype)
    if adapter:
        attach_adapter(loaded, adapter)
    return loaded.to(device).eval(), processor


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def prompt_text(processor: Any, prompt: str, images: int = 0) -> str:
    """The prompt as the model saw user turns in training: chat template + generation prompt."""
    tokenizer = _tokenizer(processor)
    if images and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * images + prompt
    if getattr(tokenizer, "chat_template", None) is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def model_inputs(processor: Any, prompt: str, image: Any = None) -> dict[str, torch.Tensor]:
    text = prompt_text(processor, prompt, images=1 if image is not None else 0)
    if image is not None:
        if not hasattr(processor, "image_processor"):
            raise UserError("--image needs a vision-language model (e.g. tiny-llava); this one reads text only")
        return dict(processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False))
    tokenizer = _tokenizer(processor)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=not has_template))


def read_image(path: str | Path) -> Any:
    from personalize.data.decode import BadImage, decode, read_bytes

    try:
        return decode(read_bytes(Path(path).expanduser())).image
    except BadImage as error:
        raise UserError(f"--image {path}: {error}") from None


def generate_text(
    model: Any,
    processor: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    seed: int = 0,
    image: Any = None,
    stream: bool = False,
) -> str:
    """The model's answer to `prompt` (greedy unless temperature > 0)."""
    from transformers import TextStreamer

    tokenizer = _tokenizer(processor)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in model_inputs(processor, prompt, image).items()}
    sample = temperature is not None and temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
    if sample:
        options["temperature"] = temperature
        torch.manual_seed(seed)
    else:  # a model's generation_config may ask for sampling; greedy means greedy
        options.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is not None:
        options["pad_token_id"] = tokenizer.pad_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, **options)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
