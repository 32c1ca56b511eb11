"""Trainable parameters of each survey method on a 7B Llama (Llama-2-7B's config, built on the meta device).

    .venv/bin/python benchmarks/method_params.py

Nothing is allocated: the model and the adapters live on the meta device; the count is what
`adapters.trainable_parameters` would hand an optimizer. The README's method table quotes it.
"""

from __future__ import annotations

import torch

from personalize import adapters

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
# method -> inject options (the README's defaults for each row)
ROWS = {
    "lora (r 16, all-linear)": ("lora", dict(targets="all-linear", rank=16)),
    "adalora (r0 12, all-linear)": ("adalora", dict(targets="all-linear", rank=12, target_rank=8, total_steps=100)),
    "delta-lora (r 16, all-linear)": ("delta-lora", dict(targets="all-linear", rank=16)),
    "increlora (max r 16, all-linear)": ("increlora", dict(targets="all-linear", rank=4, max_rank=16)),
    "mpo (factor 16, all-linear)": ("mpo", dict(targets="all-linear", factor=16)),
    "p-tuning (20 tokens, MLP h 4096)": ("p-tuning", dict(num_virtual_tokens=20)),
    "p-tuning (20 tokens, LSTM h 1024)": (
        "p-tuning",
        dict(num_virtual_tokens=20, encoder="lstm", encoder_hidden_size=1024),
    ),
    "llama-adapter (len 10, top 30 layers)": ("llama-adapter", dict(adapter_len=10, adapter_layers=30)),
    "houlsby (reduction 16)": ("houlsby", dict(reduction=16)),
    "pfeiffer (reduction 16)": ("pfeiffer", dict(reduction=16)),
    "compacter (reduction 16, phm_dim 4)": ("compacter", dict(reduction=16, phm_dim=4)),
    "fusion (over 2 Pfeiffer adapters)": ("fusion", dict(adapters=["task0", "task1"])),
    "unipelt (prefix 10, LoRA r 8 on q/v, adapter reduction 16)": ("unipelt", dict(num_virtual_tokens=10)),
    "ladder (reduction 8)": ("ladder", dict(reduction=8)),
    "pasta (BOS + EOS)": ("pasta", dict(special_ids=[1, 2])),
    "mam (prefix 30, FFN adapter m 512, s 4)": ("mam", dict(num_virtual_tokens=30, reduction=8)),
    "fish-mask (density 0.005, all-linear)": ("fish-mask", dict(targets="all-linear", density=0.005)),
    "child-tuning (density 0.3, all-linear)": ("child-tuning", dict(targets="all-linear", density=0.3)),
    "diff-pruning (density 0.005, all-linear)": ("diff-pruning", dict(targets="all-linear", density=0.005)),
    "vera (r 256, all-linear)": ("vera", dict(targets="all-linear", rank=256)),
    "oft (block 32, all-linear)": ("oft", dict(targets="all-linear", block_size=32)),
    "boft (block 32, 1 stage, attention)": ("boft", dict(targets="attention", block_size=32, stages=1)),
    "dora (r 16, all-linear)": ("dora", dict(targets="all-linear", rank=16)),
    "loha (r 16, all-linear)": ("loha", dict(targets="all-linear", rank=16)),
    "lokr (r 16, all-linear)": ("lokr", dict(targets="all-linear", rank=16)),
    "ia3 (all-linear)": ("ia3", dict(targets="all-linear")),
    "prompt-tuning (20 tokens)": ("prompt-tuning", dict(num_virtual_tokens=20)),
    "prefix-tuning (20 tokens)": ("prefix-tuning", dict(num_virtual_tokens=20)),
}


def count(method: str, options: dict) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
        for task in options.get("adapters", []) if method == "fusion" else []:  # what AdapterFusion fuses
            adapters.inject(model, "pfeiffer", name=task)
        adapters.inject(model, method, name=method, **options)
    return sum(p.numel() for p in adapters.trainable_parameters(model, method))


def main() -> None:
    print("| method | trainable parameters on Llama-2-7B |")
    print("| --- | --- |")
    for row, (method, options) in ROWS.items():
        if "density" in options:  # a dense D (and Diff-Pruning's gates) trains; the density of D is kept
            dense = count(method, options)
            entries = round(options["density"] * (dense if method != "diff-pruning" else dense // 2))
            print(f"| {row} | {dense:,} in training; {entries:,} entries kept |")
        else:
            print(f"| {row} | {count(method, options):,} |")


if __name__ == "__main__":
    main()
