"""peft layout (`adapter_config.json` + `adapter_model.safetensors`) <-> one canonical state dict.

Keys are "base_model.model.<module path>.<peft name>" (the adapter name is not in the file):

    LoRA  lora_A.weight = lora_down, lora_B.weight = lora_up, lora_magnitude_vector = DoRA m,
          lora_embedding_A / lora_embedding_B on nn.Embedding; scale lora_alpha / r (rsLoRA: / sqrt(r))
    LoHa  hada_w1_a ... hada_t2 unchanged;  scale alpha / r
    LoKr  lokr_w1 ... lokr_w2_b unchanged;  scale alpha / r ALWAYS (also with two full factors, where
          LyCORIS/ComfyUI/we use 1), and peft rebuilds the factor shapes from (r, decompose_factor,
          decompose_both), so every module gets an r that makes peft pick the same shapes
    IA3   ia3_l = 1 + weight (peft multiplies by the vector itself), (out, 1) or (1, in) on feed-forward inputs
    OFT   oft_R.weight (k, b(b-1)/2) = the upper triangle of -Q (peft's exact Cayley is (I - Q)(I + Q)^-1:
          written with use_cayley_neumann = false, the approximation peft uses by default)
    BOFT  boft_R (1, k, b, b) = Q with each block's channels in peft's order (ours pairs them as LyCORIS's
          butterfly stage 0 does), boft_s (out, 1) = rescale; one butterfly stage (what peft builds on CPU)
    OFT/BOFT only in their input-side form (`on_input`), which is peft's.
    VeRA  vera_lambda_b / vera_lambda_d per module; the shared frozen matrices once, as `base_model.vera_A`
          (r, max in) and `base_model.vera_B` (max out, r) (save_projection = true): each module's slices

Per-module ranks and alphas go in rank_pattern / alpha_pattern with exact-path regexes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from personalize.adapters import group_by_module
from personalize.adapters.lokr import factorization
from personalize.errors import UserError
from personalize.formats.canonical import alpha_of, method_of, rank_of
from personalize.formats.diffusers import canonical_magnitude, lora_config, pattern_value, peft_magnitude

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # model-level tensors shared by every layer (VeRA's projections)
SHARED_KEYS = ("vera_A", "vera_B")
PEFT_TYPES = {
    "lora": "LORA",
    "dora": "LORA",
    "loha": "LOHA",
    "lokr": "LOKR",
    "ia3": "IA3",
    "oft": "OFT",
    "boft": "BOFT",
    "vera": "VERA",
}


def _exact(path: str) -> str:
    return "^" + re.escape(path)


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    return {_exact(p): v for p, v in sorted(values.items()) if v != default}


def _common(values: Mapping[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def to_peft(
    sd: Mapping[str, torch.Tensor],
    *,
    base_model: str = "",
    task_type: str | None = None,
    embedding_paths: frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Canonical state dict of one model -> (peft tensors, adapter_config.json dict)."""
    groups = group_by_module(sd)
    if not groups:
        raise UserError("the adapter is empty: no module has weights")
    kinds = {method_of(group) for group in groups.values()}
    if not kinds <= {"lora", "dora"} and len(kinds) > 1:
        raise UserError(f"one peft adapter holds one method, but this one mixes {', '.join(sorted(kinds))}")
    method = "lora" if kinds <= {"lora", "dora"} else next(iter(kinds))
    writers = {"lora": _lora, "loha": _loha, "lokr": _lokr, "ia3": _ia3, "oft": _oft, "boft": _boft, "vera": _vera}
    writer = writers[method]
    tensors, config = writer(groups, embedding_paths) if method == "lora" else writer(groups)
    config.update(
        {
            "peft_type": PEFT_TYPES[method],
            "base_model_name_or_path": base_model or None,
            "task_type": task_type,
            "inference_mode": True,
            "target_modules": sorted(groups),
        }
    )
    prefixed = {(SHARED_PREFIX if k in SHARED_KEYS else PREFIX) + k: v.contiguous() for k, v in tensors.items()}
    return prefixed, config


def _lora(groups: Mapping[str, Mapping[str, torch.Tensor]], embedding_paths: frozenset[str]) -> tuple[dict, dict]:
    tensors, ranks, alphas = {}, {}, {}
    for path, group in groups.items():
        down, up = group["lora_down.weight"], group["lora_up.weight"]
        if path in embedding_paths:
            tensors[f"{path}.lora_embedding_A"], tensors[f"{path}.lora_embedding_B"] = down, up
        else:
            tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = down, up
        if "dora_scale" in group:
            tensors[f"{path}.lora_magnitude_vector"] = peft_magnitude(group["dora_scale"])
        ranks[path], alphas[path] = rank_of(group), alpha_of(group)
    dora = [("dora_scale" in group) for group in groups.values()]
    if any(dora) and not all(dora):
        raise UserError("peft applies DoRA to every module of an adapter or none; this one mixes LoRA and DoRA")
    config = lora_config(ranks, alphas, any(dora))
    config.update({"lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True})
    return tensors, config


def _loha(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    tensors = {f"{path}.{param}": v for path, group in groups.items() for param, v in group.items() if param != "alpha"}
    ranks = {path: rank_of(group) for path, group in groups.items()}
    alphas = {path: alpha_of(group) for path, group in groups.items()}
    r, alpha = _common(ranks), _common(alphas)
    config = {
        "r": r,
        "alpha": alpha,
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": _patterns(alphas, alpha),
        "use_effective_conv2d": any("hada_t1" in group for group in groups.values()),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
    }
    return tensors, config


def lokr_peft_rank(group: Mapping[str, torch.Tensor]) -> int:
    """The peft r that makes peft build this module's factor shapes (full w2 needs r >= max(k, n) / 2)."""
    rank = rank_of(group)
    if "lokr_w2" in group:
        w2 = group["lokr_w2"]
        needed = math.ceil(max(w2.shape[0], w2.shape[1]) / 2)
        return max(rank or 0, needed)
    return int(rank)  # type: ignore[arg-type]


def _lokr(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    if any("lokr_t2" in group for group in groups.values()):
        raise UserError("LoKr with a Tucker core (lokr_t2) has no peft equivalent here; write the kohya layout")
    tensors = {f"{path}.{param}": v for path, group in groups.items() for param, v in group.items() if param != "alpha"}
    ranks = {path: lokr_peft_rank(group) for path, group in groups.items()}
    # peft's scale is alpha / r everywhere: with two full factors ours is 1, so alpha = r there.
    alphas = {path: (alpha_of(group) if rank_of(group) else float(ranks[path])) for path, group in groups.items()}
    decompose_both = any("lokr_w1_a" in group for group in groups.values())
    factor = _decompose_factor(groups, ranks, decompose_both)
    r, alpha = _common(ranks), _common(alphas)
    config = {
        "r": r,
        "alpha": alpha,
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": _patterns(alphas, alpha),
        "decompose_both": decompose_both,
        "decompose_factor": factor,
        "use_effective_conv2d": False,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
    }
    return tensors, config


def _lokr_shapes(group: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int] | None:
    """(l, m, k, n) of a module, or None where n is hidden in a flattened low-rank conv factor."""
    w1 = group.get("lokr_w1")
    l, m = w1.shape if w1 is not None else (group["lokr_w1_a"].shape[0], group["lokr_w1_b"].shape[1])  # noqa: E741
    if "lokr_w2" in group:
        k, n = group["lokr_w2"].shape[:2]
    else:
        k, n = group["lokr_w2_a"].shape[0], group["lokr_w2_b"].shape[1]
        if any(v.dim() == 4 for v in group.values()):
            return None
    return int(l), int(m), int(k), int(n)


def _peft_builds(shapes: tuple[int, int, int, int], r: int, factor: int, decompose_both: bool, group: Mapping) -> bool:
    l, m, k, n = shapes  # noqa: E741
    if factorization(l * k, factor) != (l, k) or factorization(m * n, factor) != (m, n):
        return False
    w1_low = decompose_both and r < max(l, m) / 2
    w2_low = r < max(k, n) / 2
    return w1_low == ("lokr_w1_a" in group) and w2_low == ("lokr_w2_a" in group)


def _decompose_factor(groups: Mapping[str, Mapping], ranks: Mapping[str, int], decompose_both: bool) -> int:
    shapes = {path: _lokr_shapes(group) for path, group in groups.items()}
    candidates = [-1] + sorted({s[0] for s in shapes.values() if s} | {s[1] for s in shapes.values() if s})
    for factor in candidates:
        if all(s is None or _peft_builds(s, ranks[p], factor, decompose_both, groups[p]) for p, s in shapes.items()):
            return factor
    path = next(iter(groups))
    raise UserError(
        f"peft cannot rebuild these LoKr factor shapes (e.g. {path}: {_lokr_shapes(groups[path])}) from one "
        "decompose_factor; write the kohya layout, or convert to a LoRA (--to lora-svd)"
    )


def _ia3(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    tensors, feedforward = {}, []
    for path, group in groups.items():
        vector = 1 + group["weight"].float()
        if bool(group.get("on_input", torch.tensor(False))):
            feedforward.append(path)
            tensors[f"{path}.ia3_l"] = vector.reshape(1, -1)
        else:
            tensors[f"{path}.ia3_l"] = vector.reshape(-1, 1)
    return tensors, {"feedforward_modules": sorted(feedforward), "init_ia3_weights": True, "fan_in_fan_out": False}


def from_peft(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """peft tensors + adapter_config.json -> canonical state dict (effective alphas)."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "ADALORA"):
        raise UserError(
            f"peft adapter type '{peft_type}' is not one this toolkit reads (LORA, LOHA, LOKR, IA3, OFT, BOFT, "
            "VERA, ADALORA; PROMPT_TUNING, PREFIX_TUNING, P_TUNING, ADAPTION_PROMPT through `personalize generate`); "
            "stock peft loads it: "
            "PeftModel.from_pretrained(base, FOLDER)"
        )
    if peft_type == "VERA":
        return _read_vera(tensors, config)
    stripped = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"peft key '{key}' does not start with '{PREFIX}'; is this a peft adapter file?")
        stripped[key[len(PREFIX) :]] = value
    if peft_type == "LORA":
        return _read_lora(stripped, config)
    if peft_type == "IA3":
        return _read_ia3(stripped, config)
    if peft_type == "OFT":
        return _read_oft(stripped, config)
    if peft_type == "BOFT":
        return _read_boft(stripped, config)
    if peft_type == "ADALORA":
        return _read_adalora(stripped, config)
    return _read_lycoris(stripped, config, peft_type)


_LORA_NAMES = (
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora_embedding_A", "lora_down.weight"),
    (".lora_embedding_B", "lora_up.weight"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
)


def _config_alpha(config: Mapping[str, Any], path: str, default_key: str) -> float:
    return float(pattern_value(config.get("alpha_pattern") or {}, path, config.get(default_key, config.get("r", 8))))


def _read_lora(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        suffix, param = next(((s, p) for s, p in _LORA_NAMES if key.endswith(s)), (None, None))
        if suffix is None:
            raise UserError(f"peft LoRA key '{PREFIX}{key}' is not one this toolkit reads (lora_A/lora_B/magnitude)")
        out[f"{key[: -len(suffix)]}.{param}"] = value
    for path, group in group_by_module(out).items():
        rank = int(group["lora_down.weight"].shape[0])
        alpha = _config_alpha(config, path, "lora_alpha")
        if config.get("use_rslora"):
            alpha *= math.sqrt(rank)
        out[f"{path}.alpha"] = torch.tensor(alpha)
        if "dora_scale" in group:
            out[f"{path}.dora_scale"] = canonical_magnitude(group["dora_scale"], group["lora_down.weight"].dim() == 4)
    return out


def _read_lycoris(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], kind: str) -> dict:
    out = dict(tensors)
    for path, group in group_by_module(out).items():
        alpha = _config_alpha(config, path, "alpha")
        peft_rank = int(pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8)))
        rank = rank_of(group)
        if rank is None:  # LoKr with two full factors: fold peft's alpha / r into w1, keep scale 1
            out[f"{path}.lokr_w1"] = group["lokr_w1"] * (alpha / peft_rank)
            out[f"{path}.alpha"] = torch.tensor(1.0)
        else:
            out[f"{path}.alpha"] = torch.tensor(alpha * rank / peft_rank)
    return out


def _read_ia3(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    feedforward = config.get("feedforward_modules") or []
    out = {}
    for key, value in tensors.items():
        if not key.endswith(".ia3_l"):
            raise UserError(f"peft IA3 key '{PREFIX}{key}' is not one this toolkit reads (ia3_l)")
        path = key[: -len(".ia3_l")]
        on_input = value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] != 1
        if isinstance(feedforward, list) and path in feedforward:
            on_input = True
        out[f"{path}.weight"] = value.reshape(-1).float() - 1
        out[f"{path}.on_input"] = torch.tensor(on_input)
    return out


def _peft_order(size: int) -> torch.Tensor:
    """Channel j of a block in our (LyCORIS) butterfly stage 0 is channel order[j] of the block in peft."""
    return torch.arange(size).unflatten(0, (2, size // 2)).transpose(0, 1).reshape(-1)


def _skew(blocks: torch.Tensor) -> torch.Tensor:
    return blocks - blocks.transpose(-1, -2)


def _orthogonal_groups(groups: Mapping[str, Mapping[str, torch.Tensor]], method: str) -> int:
    """Check every module is in peft's form; returns the one block size peft's config can hold."""
    sizes = set()
    for path, group in groups.items():
        if "on_input" not in group:
            raise UserError(
                f"{path}: {method.upper()} on output channels (LyCORIS's form) has no peft equivalent; "
                "train with on_input=True for peft, or save the kohya/LyCORIS layout"
            )
        if float(group.get("alpha", torch.tensor(0.0))) != 0.0:
            raise UserError(f"{path}: {method.upper()} with a norm constraint (alpha > 0) has no peft equivalent")
        sizes.add(int(group["oft_blocks"].shape[-1]))
    if len(sizes) > 1:
        raise UserError(f"peft's {method.upper()} config holds one block size, this adapter has {sorted(sizes)}")
    return sizes.pop()


def _oft(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    size = _orthogonal_groups(groups, "oft")
    rows, cols = torch.triu_indices(size, size, 1)
    tensors = {}
    for path, group in groups.items():
        if "rescale" in group:
            raise UserError(f"{path}: peft's OFT has no rescale vector")
        tensors[f"{path}.oft_R.weight"] = -_skew(group["oft_blocks"].float())[:, rows, cols]  # (k, b(b-1)/2)
    config = {
        "r": 0,
        "oft_block_size": size,
        "module_dropout": 0.0,
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "use_cayley_neumann": False,
        "num_cayley_neumann_terms": 5,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
    }
    return tensors, config


def _boft(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    size = _orthogonal_groups(groups, "boft")
    order = torch.argsort(_peft_order(size))
    tensors = {}
    for path, group in groups.items():
        blocks = group["oft_blocks"]
        if blocks.shape[0] != 1 or "rescale" not in group:
            raise UserError(
                f"{path}: peft reads BOFT with one butterfly stage and a rescale vector (stages=1, rescaled=True); "
                f"this one has {blocks.shape[0]} stages"
            )
        tensors[f"{path}.boft_R"] = _skew(blocks.float())[..., order, :][..., :, order]  # (1, k, b, b)
        tensors[f"{path}.boft_s"] = group["rescale"].reshape(-1, 1)
    config = {
        "boft_block_size": size,
        "boft_block_num": 0,
        "boft_n_butterfly_factor": 1,
        "boft_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
    }
    return tensors, config


def _read_oft(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if config.get("use_cayley_neumann", True) or config.get("coft") or config.get("block_share"):
        raise UserError(
            "this peft OFT adapter uses the Cayley-Neumann approximation, COFT or block sharing; this toolkit reads "
            "OFT with the exact Cayley transform only (use_cayley_neumann=false, coft=false, block_share=false)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.endswith(".oft_R.weight"):
            raise UserError(f"peft OFT key '{PREFIX}{key}' is not one this toolkit reads (oft_R.weight)")
        path = key[: -len(".oft_R.weight")]
        size = int(round((1 + math.sqrt(1 + 8 * value.shape[-1])) / 2))
        rows, cols = torch.triu_indices(size, size, 1)
        upper = torch.zeros(value.shape[0], size, size, dtype=torch.float32)
        upper[:, rows, cols] = value.float()
        out[f"{path}.oft_blocks"] = -_skew(upper) / 2  # A with A - A^T = Q = -Q_peft
        out[f"{path}.alpha"] = torch.tensor(0.0)
        out[f"{path}.on_input"] = torch.tensor(True)
    return out


def _read_boft(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path, _, param = key.rpartition(".")
        if param == "boft_s":
            out[f"{path}.rescale"] = value.reshape(-1, 1).float()
            continue
        if param != "boft_R":
            raise UserError(f"peft BOFT key '{PREFIX}{key}' is not one this toolkit reads (boft_R, boft_s)")
        if value.shape[0] != 1:
            raise UserError(
                f"{path}: peft BOFT with {value.shape[0]} butterfly factors; this toolkit reads one (what peft builds "
                "without its CUDA kernel)"
            )
        order = _peft_order(value.shape[-1])
        skew = 0.5 * _skew(value.float())  # peft's Q
        out[f"{path}.oft_blocks"] = skew[..., order, :][..., :, order] / 2
        out[f"{path}.alpha"] = torch.tensor(0.0)
        out[f"{path}.on_input"] = torch.tensor(True)
    return out


def _vera(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict]:
    a = max((group["vera_A"] for group in groups.values()), key=lambda t: t.shape[1])  # (r, in max)
    b = max((group["vera_B"] for group in groups.values()), key=lambda t: t.shape[0])  # (out max, r)
    tensors: dict[str, torch.Tensor] = {"vera_A": a, "vera_B": b}
    for path, group in groups.items():
        in_features, out_features = group["vera_A"].shape[1], group["vera_B"].shape[0]
        if not (torch.equal(group["vera_A"], a[:, :in_features]) and torch.equal(group["vera_B"], b[:out_features])):
            raise UserError(f"{path}: VeRA modules of one peft adapter share one pair of matrices; this one differs")
        tensors[f"{path}.vera_lambda_b"] = group["vera_lambda_b"]
        tensors[f"{path}.vera_lambda_d"] = group["vera_lambda_d"]
    config = {
        "r": int(a.shape[0]),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
    }
    return tensors, config


def _read_vera(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Each module gets the shared matrices (B cut to its outputs; A is cut to its inputs when attached)."""
    shared = {key: tensors.get(SHARED_PREFIX + key) for key in SHARED_KEYS}
    if any(value is None for value in shared.values()):
        raise UserError(
            "this peft VeRA file holds no projection matrices (saved with save_projection=false); they would have "
            "to be redrawn from projection_prng_key, which this toolkit does not do: save with save_projection=true"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            param = key.rpartition(".")[2]
            if param not in ("vera_lambda_b", "vera_lambda_d"):
                raise UserError(f"peft VeRA key '{key}' is not one this toolkit reads (vera_lambda_b/_d)")
            out[key[len(PREFIX) :]] = value
        elif key[len(SHARED_PREFIX) :] not in SHARED_KEYS:
            raise UserError(f"peft key '{key}' does not start with '{PREFIX}'; is this a peft adapter file?")
    for path in {k.rpartition(".")[0] for k in list(out)}:
        out[f"{path}.vera_A"] = shared["vera_A"]
        out[f"{path}.vera_B"] = shared["vera_B"][: out[f"{path}.vera_lambda_b"].shape[0]]
    return out


# --- methods with their own peft type (written from the canonical state dict + the method's options) ----


def adalora_to_peft(
    sd: Mapping[str, torch.Tensor], hyper: Mapping[str, Any], *, base_model: str = "", task_type: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdaLoRA -> peft's ADALORA layout: lora_A / lora_E / lora_B cut to the kept triplets, whose
    positions go in rank_pattern ("<path>.lora_E": [bool] * r0); peft's scale is lora_alpha / r0."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        path, _, param = key.rpartition(".")
        groups.setdefault(path, {})[param] = value
    tensors, pattern = {}, {}
    for path, group in sorted(groups.items()):
        kept = group["lora_E"].reshape(-1) != 0  # (r0,)
        tensors[f"{PREFIX}{path}.lora_A"] = group["lora_A"][kept].contiguous()
        tensors[f"{PREFIX}{path}.lora_E"] = group["lora_E"][kept].contiguous()
        tensors[f"{PREFIX}{path}.lora_B"] = group["lora_B"][:, kept].contiguous()
        pattern[f"{path}.lora_E"] = kept.tolist()
    first = groups[next(iter(groups))]
    init_r = int(first["lora_A"].shape[0])
    steps = int(hyper.get("total_steps") or 1)
    config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model or None,
        "inference_mode": True,
        "target_modules": sorted(groups),
        "init_r": init_r,
        "target_r": int(hyper.get("target_rank", 8)),
        "lora_alpha": float(first["alpha"]),
        "lora_dropout": 0.0,
        "tinit": int(hyper.get("init_warmup", 0)),
        "tfinal": int(hyper.get("final_warmup", 0)),
        "deltaT": int(hyper.get("interval", 1)),
        "beta1": float(hyper.get("beta1", 0.85)),
        "beta2": float(hyper.get("beta2", 0.85)),
        "orth_reg_weight": float(hyper.get("orth_reg_weight", 0.5)),
        "total_step": max(steps, int(hyper.get("init_warmup", 0)) + int(hyper.get("final_warmup", 0)) + 1),
        "rank_pattern": pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return tensors, config


def adaption_prompt_to_peft(
    sd: Mapping[str, torch.Tensor], *, base_model: str = "", task_type: str | None = "CAUSAL_LM"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LLaMA-Adapter -> peft's ADAPTION_PROMPT layout (the keys are already peft's; peft puts the adapters in
    the top `adapter_layers` self_attn modules, which is where ours are)."""
    prompts = [value for key, value in sd.items() if key.endswith(".adaption_prompt")]
    config = {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": task_type,
        "base_model_name_or_path": base_model or None,
        "inference_mode": True,
        "target_modules": "self_attn",
        "adapter_len": int(prompts[0].shape[1]),
        "adapter_layers": len(prompts),
    }
    return {PREFIX + key: value for key, value in sd.items()}, config


def p_tuning_config(prompt_part: Mapping[str, Any], hyper: Mapping[str, Any]) -> dict[str, Any]:
    """peft's P_TUNING adapter_config.json from the prompt-tuning one of the same model and n. In inference
    mode peft reads the saved prompt_embeddings as the prompt itself (no encoder)."""
    config = {key: value for key, value in prompt_part.items() if key != "prompt_tuning_init"}
    config.update(
        peft_type="P_TUNING",
        encoder_reparameterization_type=str(hyper.get("encoder", "mlp")).upper(),
        encoder_hidden_size=int(hyper.get("encoder_hidden_size") or prompt_part["token_dim"]),
        encoder_num_layers=int(hyper.get("encoder_num_layers", 2)),
        encoder_dropout=float(hyper.get("encoder_dropout", 0.0)),
    )
    return config


def _read_adalora(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """peft ADALORA -> the canonical LoRA of the same function: down = lambda Q over the kept triplets, up = P,
    alpha = lora_alpha * r_kept / init_r (peft's scale lora_alpha / init_r stays after pruning)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, _, param = key.rpartition(".")
        if param not in ("lora_A", "lora_E", "lora_B"):
            raise UserError(f"peft AdaLoRA key '{PREFIX}{key}' is not one this toolkit reads (lora_A/lora_E/lora_B)")
        groups.setdefault(path, {})[param] = value
    init_r = int(config.get("init_r", 12))
    alpha = float(config.get("lora_alpha") or init_r)
    out = {}
    for path, group in groups.items():
        kept = int(group["lora_A"].shape[0])
        if kept == 0:  # every triplet pruned: the module adds nothing
            continue
        out[f"{path}.lora_down.weight"] = group["lora_A"] * group["lora_E"]  # (r, in)
        out[f"{path}.lora_up.weight"] = group["lora_B"]  # (out, r)
        out[f"{path}.alpha"] = torch.tensor(alpha * kept / init_r)
    return out
