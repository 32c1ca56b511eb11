"""Prompt-family PEFT for causal LMs: prompt tuning and prefix tuning, attached by a forward hook.

- Prompt tuning (Lester et al., arXiv 2104.08691): n trainable "virtual token" embeddings P (n, D)
  are prepended to the input embeddings, [P; E(x)]; the logits keep the n extra positions at the
  front (as peft's). Initialized from the embeddings of n random vocabulary tokens (the paper's
  "sampled vocabulary" init) or of a given text.
- Prefix tuning (Li & Liang, arXiv 2101.00190): per layer l, trainable key/value prefixes
  K_l, V_l (kv_heads, n, head_dim) are put in the model's cache before the first real token, so every
  attention layer attends to [K_l; K(x)]. Stored flat as (n, L * 2 * kv_heads * head_dim), peft's
  layout without the reparameterization MLP. Initialized with the keys/values the frozen model
  computes for n random vocabulary tokens (the paper's "real word activations" init).

The module keeps the parameter under the name peft writes ("prompt_embeddings"); the canonical state
dict key is that name alone. Attention masks get n leading ones; position ids and cache positions
are recomputed by the model (so training and `generate` see the same positions).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import nn

from personalize.adapters.ladder import Ladder
from personalize.adapters.llama_adapter import LlamaAdapter
from personalize.adapters.mam import MAM
from personalize.adapters.pasta import Pasta
from personalize.adapters.ptuning import PTuning
from personalize.adapters.unipelt import UniPELT
from personalize.errors import UserError

PROMPT_METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "llama-adapter", "pasta", "mam", "ladder", "unipelt")
REGISTRY_ATTRIBUTE = "personalize_prompts"
STATE_KEY = "prompt_embeddings"
IGNORE_INDEX = -100


@lru_cache(maxsize=32)
def _cache_argument(model_class: type) -> str:
    """transformers >= 5.x calls the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _random_token_ids(model: nn.Module, n: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (n,))


class PromptTuning(nn.Module):
    method: ClassVar[str] = "prompt-tuning"

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20, init_text: str = "", tokenizer: Any = None):
        super().__init__()
        if num_virtual_tokens < 1:
            raise UserError(f"prompt-tuning: num_virtual_tokens must be at least 1 (got {num_virtual_tokens})")
        embedding = model.get_input_embeddings()
        if init_text:
            if tokenizer is None:
                raise UserError("prompt-tuning: init_text needs the tokenizer (pass tokenizer=...)")
            text_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor((text_ids * num_virtual_tokens)[:num_virtual_tokens])  # repeated to length n
        else:
            ids = _random_token_ids(model, num_virtual_tokens)
        with torch.no_grad():
            init = embedding.weight[ids.to(embedding.weight.device)].detach().float().clone()  # (n, D)
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_embeddings = nn.Parameter(init)

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.num_virtual_tokens
        cache = kwargs.get(_cache_argument(type(model)))
        if cache is None or cache.get_seq_length() == 0:  # the first forward: prepend the virtual tokens
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (B, T, D)
            kwargs["input_ids"] = None
            prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, D)
            labels = kwargs.get("labels")
            if labels is not None:
                ignore = torch.full((labels.shape[0], n), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
                kwargs["labels"] = torch.cat([ignore, labels], dim=1)
        return _extend_mask(kwargs, n)


class PrefixTuning(nn.Module):
    method: ClassVar[str] = "prefix-tuning"

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20):
        super().__init__()
        if num_virtual_tokens < 1:
            raise UserError(f"prefix-tuning: num_virtual_tokens must be at least 1 (got {num_virtual_tokens})")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_embeddings = nn.Parameter(self._activations(model))  # (n, L * 2 * kv_heads * head_dim)

    def _activations(self, model: nn.Module) -> torch.Tensor:
        """Keys/values of n random tokens through the frozen model, flattened to peft's layout."""
        ids = _random_token_ids(model, self.num_virtual_tokens).unsqueeze(0)  # (1, n)
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            output = model(input_ids=ids.to(device), use_cache=True)
        cache = getattr(output, "cache", None)
        cache = cache if cache is not None else output.past_key_values
        layers = [torch.stack(_layer_kv(cache, index)) for index in range(self.num_layers)]  # each (2, 1, H, n, d)
        stacked = torch.stack(layers)[:, :, 0]  # (L, 2, H, n, d)
        return stacked.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1).float().clone()

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V), each (B, kv_heads, n, head_dim)."""
        n = self.num_virtual_tokens
        flat = self.prompt_embeddings.to(dtype).view(n, self.num_layers, 2, self.kv_heads, self.head_dim)
        per_layer = flat.permute(1, 2, 3, 0, 4)  # (L, 2, H, n, d)
        return [
            (layer[0].unsqueeze(0).expand(batch, -1, -1, -1), layer[1].unsqueeze(0).expand(batch, -1, -1, -1))
            for layer in per_layer
        ]

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        from transformers import DynamicCache

        argument = _cache_argument(type(model))
        cache = kwargs.get(argument)
        if cache is None:
            cache = DynamicCache()
            kwargs[argument] = cache
        if cache.get_seq_length() == 0:  # first forward: the prefixes go in before any real token
            reference = kwargs.get("inputs_embeds")
            reference = reference if reference is not None else kwargs["input_ids"]
            dtype = model.get_input_embeddings().weight.dtype
            for index, (key, value) in enumerate(self.key_values(reference.shape[0], dtype)):
                cache.update(key, value, index)
        return _extend_mask(kwargs, self.num_virtual_tokens)


def _layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[index] if hasattr(cache, "layers") else None
    if layer is not None:
        return layer.keys, layer.values
    return cache[index][0], cache[index][1]


def _extend_mask(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """n leading ones on the attention mask; positions recomputed from the cache length."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = None
    return kwargs


BUILDERS = {"prompt-tuning": PromptTuning, "prefix-tuning": PrefixTuning, "p-tuning": PTuning}
BUILDERS["llama-adapter"] = LlamaAdapter  # hooks on attention layers, not on the input
BUILDERS["pasta"] = Pasta  # hooks on decoder layers
BUILDERS["mam"] = MAM  # prefix tuning + hooks on the feed-forward blocks
BUILDERS["ladder"] = Ladder  # a side network on hooks of the decoder layers
BUILDERS["unipelt"] = UniPELT  # gated prefix + LoRA + adapter, on hooks


def registry(model: nn.Module) -> nn.ModuleDict:
    """The model's prompt adapters (a submodule, so they move with `model.to(...)`)."""
    if REGISTRY_ATTRIBUTE not in model._modules:
        model.add_module(REGISTRY_ATTRIBUTE, nn.ModuleDict())
    return model._modules[REGISTRY_ATTRIBUTE]  # type: ignore[return-value]


def _forward_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    active = [a for name, a in registry(model).items() if model.__dict__["_personalize_prompt_scales"][name] != 0]
    if not active:
        return None
    if args:  # HF models take input_ids as the only positional argument
        kwargs = {"input_ids": args[0], **kwargs}
    return (), active[0].hook(model, dict(kwargs))


def _missing_input(model: nn.Module, method: str) -> str | None:
    """What `model` lacks to read virtual tokens (None: nothing): token input embeddings, a text-only
    input (a VLM merges image tokens into it), and for a prefix, a decoder that generates with a cache."""
    if "ForConditionalGeneration" in type(model).__name__:
        return "its input merges image tokens"
    try:
        embedding = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        return "it has no token input embeddings"
    generates = getattr(model, "can_generate", None)
    if method in ("prefix-tuning", "mam", "unipelt") and not (callable(generates) and generates()):
        return "it is no decoder that generates with a key/value cache"
    return None


def attach(model: nn.Module, method: str, name: str, scale: float = 1.0, **hyper: Any) -> nn.Module:
    takes_input = not getattr(BUILDERS[method], "any_model", False)  # LLaMA-Adapter checks its own layers
    missing = _missing_input(model, method) if takes_input else None
    if missing:
        raise UserError(
            f"{method} works on causal language models (…ForCausalLM), not {type(model).__name__} ({missing}); use lora"
        )
    if len(registry(model)):
        raise UserError(f"{method}: this model already has a prompt adapter ({', '.join(registry(model))})")
    try:
        adapter = BUILDERS[method](model, **hyper)
    except TypeError as error:
        options = inspect.signature(BUILDERS[method]).parameters
        raise UserError(f"{method}: {error}; options: {', '.join(p for p in options if p != 'model')}") from None
    registry(model)[name] = adapter
    model.__dict__.setdefault("_personalize_prompt_scales", {})[name] = float(scale)
    handle = model.register_forward_pre_hook(_forward_hook, with_kwargs=True)
    model.__dict__.setdefault("_personalize_prompt_hooks", {})[name] = handle
    return adapter


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    if scale not in (0.0, 1.0):
        raise UserError(f"prompt adapter '{name}' can only be switched on (scale 1) or off (scale 0)")
    model.__dict__["_personalize_prompt_scales"][name] = float(scale)


def detach(model: nn.Module, name: str) -> None:
    getattr(registry(model)[name], "release", lambda: None)()  # adapters with hooks of their own
    del registry(model)[name]
    model.__dict__["_personalize_prompt_scales"].pop(name)
    model.__dict__["_personalize_prompt_hooks"].pop(name).remove()
    if not len(registry(model)):
        del model._modules[REGISTRY_ATTRIBUTE]


def names(model: nn.Module) -> list[str]:
    modules = model._modules.get(REGISTRY_ATTRIBUTE)
    return list(modules) if modules is not None else []
