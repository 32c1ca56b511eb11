"""The figures of `personalize eval`, as pure functions on embeddings.

DreamBooth (arXiv 2208.12242, section 4.1) judges subject fidelity by DINO and CLIP-I, prompt fidelity
by CLIP-T; we add language drift as the paired similarity of class-prompt images with and without the
adapter (same prompt, same seed). With unit vectors u, v: cos(u, v) = u . v.

- DINO / CLIP-I = mean over generated images g and reference photos r of cos(e(g), e(r))
  (e = the ViT-S/16 DINO CLS token / the CLIP image embedding).
- CLIP-T = mean over generated images g of cos(clip_image(g), clip_text(prompt of g)).
- class similarity (drift) = mean over class prompts p and seeds s of cos(e(base(p, s)), e(adapted(p, s)));
  1.0 means the class prompts draw exactly what the base drew; drift = 1 - similarity.
"""

from __future__ import annotations

import torch


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> rows scaled to unit length."""
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def similarity_to_references(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N,): each generated image's mean cosine similarity to the M reference photos."""
    return (normalize(generated) @ normalize(references).T).mean(dim=1)


def paired_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,): cosine similarity of row i with row i."""
    if first.shape != second.shape:
        raise ValueError(
            f"paired embeddings must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    return (normalize(first) * normalize(second)).sum(dim=-1)


def mean(values: torch.Tensor) -> float:
    return float(values.float().mean()) if values.numel() else float("nan")
