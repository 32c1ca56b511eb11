"""OFT (orthogonal fine-tuning, arXiv 2306.07280) and BOFT (butterfly OFT, arXiv 2311.06243).

Both multiply a frozen layer by a learned orthogonal matrix instead of adding to it, which keeps the
angles between neurons (the paper's "hyperspherical energy") and so the base model's knowledge:

    OFT   W' = R W            R = diag(R_1, ..., R_k), each block b x b
    BOFT  W' = B_m ... B_1 W  B_i = P_i^T diag(R_i1, ...) P_i, butterfly permutations P_i (BOFT's m factors)

Every block is a Cayley transform of a skew-symmetric matrix, so it stays exactly orthogonal while
training an unconstrained parameter A (zeros at start: R = I, the base model unchanged):

    Q = A - A^T,   R = (I + Q)(I - Q)^-1

Parameters use LyCORIS's names (`oft_blocks` (k, b, b) for diag-OFT, (m, k, b, b) for BOFT, `alpha` = the
COFT constraint: |Q| is clipped to alpha * dim when alpha > 0, `rescale` (dim, 1[, 1, 1]) an optional
per-channel scale). As in LyCORIS the rotation acts on the *output* channels (that is what A1111/ComfyUI
read): y' = R (y - bias) + bias, and training rotates the output activations blockwise (cost
O(tokens * dim * b)); on a plain Linear with more tokens than channels it multiplies by the frozen weight
with R folded in instead (MergedRotation: cheaper there, one activation pass backward). `on_input=True`
rotates the *input*
channels instead, which is peft's OFT/BOFT (x' = x R, y = W x'); the `on_input` buffer then marks it.
A scale s interpolates every block towards I (s R + (1 - s) I), as LyCORIS's multiplier does.

Block orientation: OFT applies v' = v R to each block vector (LyCORIS diag-oft: W'_blk = R^T W_blk);
each BOFT stage applies v' = R v (LyCORIS boft). BOFT stage i pairs channels 2^i * b / 2 apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, base_weight_shape, check_positive, layer_kind
from personalize.errors import UserError


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """(..., b, b) free parameters -> orthogonal (I + Q)(I - Q)^-1 with Q = A - A^T (|Q| <= constraint)."""
    q = blocks - blocks.transpose(-1, -2)  # skew-symmetric
    if constraint > 0:
        norm = q.norm() + 1e-8
        q = torch.where(norm > constraint, q * (constraint / norm), q)
    return _Cayley.apply(q)


def newton_schulz_inverse(m: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """M^-1 of symmetric positive definite (..., n, n) M with eigenvalues in [1, largest] (per matrix, (...)):
    X <- X (2I - M X) from X_0 = 2 / (1 + largest) I. Its error contracts as e -> e^2 from e_0 =
    (largest - 1) / (largest + 1), so the number of steps to reach float precision is known in advance."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    e0 = float(((largest - 1) / (largest + 1)).max()) if largest.numel() else 0.0
    steps = 1 if e0 < 1e-12 else max(1, math.ceil(math.log2(math.log(1e-8) / math.log(e0))))
    x = (2 / (1 + largest))[..., None, None] * eye  # (..., n, n)
    for _ in range(steps):
        x = x @ (2 * eye - m @ x)
    return x


class _Cayley(torch.autograd.Function):
    """R = (I + Q)(I - Q)^-1 for skew-symmetric Q (..., b, b), exactly (to float precision) with batched
    matrix products only: (I - Q)^-1 = (I + Q)(I - Q^2)^-1, and I - Q^2 = I + Q^T Q is symmetric positive
    definite with eigenvalues in [1, 1 + |Q|^2], inverted by Newton-Schulz. LAPACK's batched LU on a CPU
    costs 5-10 ms per step for 40 blocks of 32 (SD1.5's 1280 channels); these products ~1 ms.
    Backward: dR = (I + R) dQ (I - Q)^-1, so grad_Q = (I + R)^T G (I - Q)^-T."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        plus = eye + q
        # (...,) bounds the eigenvalues of I - Q^2 = I + Q^T Q: 1 + min(|Q|_F^2, |Q|_1 |Q|_inf), |Q|_1 = |Q|_inf
        columns = q.abs().sum(dim=-2).amax(dim=-1)
        largest = 1 + torch.minimum(q.square().sum(dim=(-2, -1)), columns.square())
        inverse = plus @ newton_schulz_inverse(eye - q @ q, largest)  # (I - Q)^-1
        rotation = plus @ inverse
        ctx.save_for_backward(rotation, inverse)
        return rotation

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rotation, inverse = ctx.saved_tensors
        eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
        return (eye + rotation).transpose(-1, -2) @ grad @ inverse.transpose(-1, -2)


def toward_identity(rotation: torch.Tensor, scale: float) -> torch.Tensor:
    """s R + (1 - s) I (LyCORIS's multiplier): scale 1 -> R, 0 -> I."""
    if scale == 1.0:
        return rotation
    eye = torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
    return scale * rotation + (1.0 - scale) * eye


def block_size_for(dimension: int, block_size: int) -> int:
    """The largest divisor of `dimension` not above `block_size` (LyCORIS/peft adjust likewise)."""
    for size in range(min(block_size, dimension), 0, -1):
        if dimension % size == 0:
            return size
    return 1


def butterfly_size_for(dimension: int, block_size: int) -> int:
    """BOFT needs dimension = b * 2^p with b even: the largest such b not above `block_size`."""
    for size in range(min(block_size, dimension), 1, -1):
        blocks = dimension // size
        if size % 2 == 0 and dimension % size == 0 and blocks & (blocks - 1) == 0:
            return size
    raise UserError(f"boft: {dimension} channels cannot split into an even block size times a power of two")


def rotate_blocks(x: torch.Tensor, mats: torch.Tensor, dim: int) -> torch.Tensor:
    """v' = v M for each block of `dim` (block j of size b uses mats[j], (k, b, b))."""
    k, b, _ = mats.shape
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        blocks = x.unflatten(-1, (k, b))  # (..., k, b)
        return torch.einsum("...kn,knm->...km", blocks, mats).flatten(-2)
    blocks = x.unflatten(dim, (k, b)).flatten(dim + 2)  # (B, k, b, HW)
    out = mats.transpose(-1, -2) @ blocks  # (M^T v)_m = sum_n M[n, m] v_n
    return out.unflatten(-1, x.shape[dim + 1 :]).flatten(dim, dim + 1)


def butterfly(x: torch.Tensor, rotations: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply the BOFT stages (m, k, b, b) along `dim`: stage i gathers channel pairs 2^i * b/2 apart
    into blocks of b, applies v' = R v per block, and puts the channels back (LyCORIS's order)."""
    x = x.movedim(dim, -1)
    half = rotations.shape[-1] // 2
    for i, stage in enumerate(rotations):
        span = 2**i * half
        shape = x.shape
        gathered = x.unflatten(-1, (-1, 2, span)).transpose(-1, -2).reshape(shape)
        mixed = rotate_blocks(gathered, stage.transpose(-1, -2), gathered.dim() - 1)  # v R^T = (R v)^T
        x = mixed.unflatten(-1, (-1, span, 2)).transpose(-1, -2).reshape(shape)
    return x.movedim(-1, dim)


class MergedRotation(torch.autograd.Function):
    """A frozen Linear y = x W^T + b with an orthogonal block-diagonal R = diag(R_1..R_k) (row form: each
    block v' = v R_j) on its input (y = (x R) W^T + b, peft's form) or its output (y = (x W^T) R + b',
    LyCORIS's, bias kept: y = (x W^T) R + b), computed through the merged weight and R's orthogonality:

        input:  W'^T = R W^T            y = x W'^T + b   grad_x = g W'     grad_R_j = (x_j^T grad_x_j) R_j^-T
        output: W'^T = W^T R            y = x W'^T + b   grad_x = g W'     grad_R_j = R_j^-T ((y - b)_j^T g_j)

    (g = dL/dy; for orthogonal R, R^-T = R). Against rotating the activations (one pass forward, two
    backward, each reading and writing tokens x channels), this costs one (in x out x b) product for W'
    and one read-only reduction over the activations: faster when tokens >= the rotated side's partner
    dimension (out for the input side, in for the output side). BOFT passes its dense product as one block.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        mats: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        on_input: bool,
        orthogonal: bool,
    ) -> torch.Tensor:
        k, b, _ = mats.shape
        out_f, in_f = weight.shape
        wt = weight.t()  # (in, out)
        if on_input:
            merged_t = torch.bmm(mats, wt.reshape(k, b, out_f)).reshape(in_f, out_f)  # rows of W^T by R_j
        else:
            blocks_t = weight.reshape(k, b, in_f).transpose(1, 2)  # (k, in, b): W_j^T, BLAS reads it as is
            merged_t = torch.bmm(blocks_t, mats).transpose(0, 1).reshape(in_f, out_f)  # columns of W^T by R_j
        flat = x.reshape(-1, in_f)  # (T, in)
        y = flat @ merged_t if bias is None else torch.addmm(bias, flat, merged_t)  # (T, out)
        ctx.save_for_backward(x if on_input else y, mats, merged_t, bias)
        ctx.on_input, ctx.orthogonal = on_input, orthogonal
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved, mats, merged_t, bias = ctx.saved_tensors
        k, b, _ = mats.shape
        in_f, out_f = merged_t.shape
        g = grad_y.reshape(-1, out_f)  # (T, out)
        grad_x = g @ merged_t.t()  # (T, in): what the frozen layer's backward costs anyway
        inverse_t = mats if ctx.orthogonal else torch.linalg.inv(mats).transpose(-1, -2)  # R^-T
        if ctx.on_input:  # x' = x R: grad_x = grad_x' R^T, so grad_x' = grad_x R^-T
            xs = saved.reshape(-1, k, b).transpose(0, 1).contiguous()  # (k, T, b); see RowRotation
            gs = grad_x.reshape(-1, k, b).transpose(0, 1).contiguous()
            grad_mats = torch.bmm(xs.transpose(1, 2), gs) @ inverse_t  # (k, b, b)
        else:  # y = y0 R + b: y0 = (y - b) R^-1
            ys = saved.reshape(-1, k, b).transpose(0, 1).contiguous()
            gs = g.reshape(-1, k, b).transpose(0, 1).contiguous()
            products = torch.bmm(ys.transpose(1, 2), gs)  # (k, b, b) = y_j^T g_j
            if bias is not None:
                products = products - bias.reshape(k, b, 1) * g.sum(0).reshape(k, 1, b)
            grad_mats = inverse_t @ products
        grad_x = grad_x.reshape(*grad_y.shape[:-1], in_f) if ctx.needs_input_grad[0] else None
        return grad_x, grad_mats, None, None, None, None


class RowRotation(torch.autograd.Function):
    """z = (v - shift) R + shift per block of the last dim (v (T, k b), R (k, b, b), shift (k b,) or None):
    OFT on the activations with the bias taken out and put back in the same batched product, so that a
    frozen layer's output is rotated without the delta's extra passes (y + ((y - b) (R - I)) ...).
    Backward: grad_v = g R^T, grad_R_j = (v - shift)_j^T g_j. The block-major copies are made explicitly:
    torch's bmm copies strided (T, k, b) views element by element, several times slower."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, mats: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        k, b, _ = mats.shape
        vs = v.reshape(-1, k, b).transpose(0, 1).contiguous()  # (k, T, b): bmm copies strided views slowly
        if shift is None:
            out = torch.bmm(vs, mats)
        else:  # (v - s) R + s = v R + (s - s R): the constant joins the product (baddbmm)
            blocks = shift.reshape(k, 1, b)
            out = torch.baddbmm(blocks - torch.bmm(blocks, mats), vs, mats)
        ctx.save_for_backward(vs, mats, shift)
        return out.transpose(0, 1).reshape(v.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        vs, mats, shift = ctx.saved_tensors
        k, b, _ = mats.shape
        gs = grad.reshape(-1, k, b).transpose(0, 1).contiguous()  # (k, T, b)
        grad_mats = torch.bmm(vs.transpose(1, 2), gs)  # (k, b, b)
        if shift is not None:
            grad_mats = grad_mats - shift.reshape(k, b, 1) * gs.sum(1).reshape(k, 1, b)
        grad_v = (
            torch.bmm(gs, mats.transpose(1, 2)).transpose(0, 1).reshape(grad.shape) if ctx.needs_input_grad[0] else None
        )
        return grad_v, grad_mats, None


def merged_rotation(
    x: torch.Tensor, mats: torch.Tensor, layer: nn.Linear, on_input: bool, orthogonal: bool
) -> torch.Tensor:
    """`layer` with the block-diagonal rotation `mats` (k, b, b) on its input or output (MergedRotation)."""
    return MergedRotation.apply(x, mats, layer.weight, layer.bias, on_input, orthogonal)


def plain_linear(x: torch.Tensor, layer: nn.Module, has_rescale: bool) -> bool:
    """The fused paths apply: a frozen float nn.Linear in x's dtype, no rescale, no autocast."""
    if type(layer) is not nn.Linear or has_rescale or x.dim() < 2 or torch.is_autocast_enabled():
        return False
    return x.dtype == layer.weight.dtype and not layer.weight.requires_grad


def merged_pays(x: torch.Tensor, layer: nn.Module, on_input: bool) -> bool:
    """MergedRotation costs less than rotating the activations: tokens >= the other side's width."""
    rows = x.numel() // x.shape[-1]
    return rows >= (layer.out_features if on_input else layer.in_features)


class OrthogonalBase(AdapterModule):
    """What OFT and BOFT share: the side, the constraint, the rescale and merging through the full
    channel matrix (merge, export and BOFT's dense paths)."""

    def _setup(
        self, base_layer: nn.Module, on_input: bool, constraint: float, rescaled: bool, shape: tuple[int, ...]
    ) -> None:
        self.kind = layer_kind(base_layer)
        if self.kind == "embedding":
            raise UserError(f"{self.method} wraps Linear and Conv2d layers, not Embedding")
        weight_shape = base_weight_shape(base_layer)
        if self.kind == "conv2d" and getattr(base_layer, "groups", 1) != 1 and on_input:
            raise UserError(f"{self.method}: grouped convolutions cannot rotate their input channels")
        self.dim = weight_shape[1] if on_input else weight_shape[0]
        device = base_layer.weight.device
        self.oft_blocks = nn.Parameter(torch.zeros(*shape, device=device))
        self.register_buffer("alpha", torch.tensor(float(constraint)))
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(weight_shape[0], *([1] * (len(weight_shape) - 1)), device=device))
        if on_input:
            self.register_buffer("on_input", torch.tensor(True))
        self.acts_on_input = bool(on_input)  # type: ignore[misc]
        self.output_delta = bool(on_input and rescaled)  # peft's BOFT: rotate the input, scale the output
        self.channel_dim = 1 if self.kind == "conv2d" else -1

    @property
    def constraint(self) -> float:
        return float(self.alpha) * self.dim

    def transform(self, x: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.transform(x, scale, self.channel_dim if x.dim() == 4 else -1).to(x.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        dim = 1 if base_out.dim() == 4 else -1
        bias = base_layer.bias
        y = base_out if bias is None else base_out - _channel_view(bias, base_out)
        if self.acts_on_input:  # the input is already rotated: only the rescale is left
            return y * (_channel_view(self.rescale, base_out) - 1)
        rotated = self.transform(y, scale, dim)
        if "rescale" in self._parameters:
            rotated = rotated * _channel_view(self.rescale, base_out)
        return rotated - y

    def channel_matrix(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """M (dim, dim) with transform(v) = M v: the transform of the identity's rows is M^T."""
        eye = torch.eye(self.dim, device=self.oft_blocks.device, dtype=torch.float32)
        return self.transform(eye, scale, -1).T.to(dtype)

    def merged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.channel_matrix(scale, torch.float32)
        w = weight.float()
        if self.acts_on_input:  # y = W (M x): W' = W M over the input channels
            out = torch.einsum("oj...,jc->oc...", w, m)
        else:
            out = (m @ w.flatten(1)).reshape(w.shape)
        if "rescale" in self._parameters:
            out = out * self.rescale.float()
        return out.to(weight.dtype)

    def unmerged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        inverse = torch.linalg.inv(self.channel_matrix(scale, torch.float32))
        w = weight.float()
        if "rescale" in self._parameters:
            w = w / self.rescale.float()
        if self.acts_on_input:
            return torch.einsum("oj...,jc->oc...", w, inverse).to(weight.dtype)
        return (inverse @ w.flatten(1)).reshape(w.shape).to(weight.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged(base_weight.float(), 1.0) - base_weight.float()


def _channel_view(vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    flat = vector.reshape(-1)
    return flat.reshape(1, -1, 1, 1) if out.dim() == 4 else flat


class OFT(OrthogonalBase):
    method = "oft"

    def __init__(
        self,
        base_layer: nn.Module,
        block_size: int = 32,
        constraint: float = 0.0,
        rescaled: bool = False,
        on_input: bool = False,
    ) -> None:
        super().__init__()
        check_positive("oft", block_size=block_size)
        if on_input and rescaled:
            raise UserError("oft: rescaled applies to output channels; it cannot be used with on_input")
        shape = base_weight_shape(base_layer)
        dim = shape[1] if on_input else shape[0]
        size = block_size_for(dim, block_size)
        self._setup(base_layer, on_input, constraint, rescaled, (dim // size, size, size))

    def rotations(self, scale: float) -> torch.Tensor:
        return toward_identity(cayley(self.oft_blocks, self.constraint), scale)  # (k, b, b)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor | None:
        """A plain Linear: through the merged weight with many tokens, else the activations rotated by one
        batched product each way (RowRotation); None (convs, rescale, autocast): the delta path."""
        if not plain_linear(x, base_layer, "rescale" in self._parameters):
            return None
        mats = self.rotations(scale).to(x.dtype)  # (k, b, b), v' = v R per block
        if merged_pays(x, base_layer, self.acts_on_input):
            return merged_rotation(x, mats, base_layer, self.acts_on_input, orthogonal=scale == 1.0)
        if self.acts_on_input:
            return base_layer(RowRotation.apply(x, mats, None))
        return RowRotation.apply(base_layer(x), mats, base_layer.bias)

    def transform(self, x: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
        mats = self.rotations(scale).to(x.dtype)
        return rotate_blocks(x, mats, dim)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        # One blockwise product with (R diag(rescale) - I): the bias term is done on the small vector.
        mats = self.rotations(scale)
        if "rescale" in self._parameters:
            mats = mats * self.rescale.reshape(mats.shape[0], 1, mats.shape[-1])
        mats = (mats - torch.eye(mats.shape[-1], device=mats.device, dtype=mats.dtype)).to(base_out.dtype)
        dim = 1 if base_out.dim() == 4 else -1
        out = rotate_blocks(base_out, mats, dim)
        if base_layer.bias is not None:
            out = out - _channel_view(rotate_blocks(base_layer.bias.to(mats.dtype), mats, -1), out)
        return out

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor], weight_shape: torch.Size) -> dict[str, Any]:
        on_input = bool(tensors.get("on_input", torch.tensor(False)))
        return {
            "block_size": int(tensors["oft_blocks"].shape[-1]),
            "constraint": float(tensors.get("alpha", torch.tensor(0.0))),
            "rescaled": "rescale" in tensors,
            "on_input": on_input,
        }


class BOFT(OrthogonalBase):
    method = "boft"

    def __init__(
        self,
        base_layer: nn.Module,
        block_size: int = 32,
        stages: int = 0,
        constraint: float = 0.0,
        rescaled: bool | None = None,
        on_input: bool = False,
    ) -> None:
        super().__init__()
        check_positive("boft", block_size=block_size)
        rescaled = on_input if rescaled is None else rescaled  # each peer's default: peft trains boft_s
        shape = base_weight_shape(base_layer)
        dim = shape[1] if on_input else shape[0]
        size = butterfly_size_for(dim, block_size)
        blocks = dim // size
        most = int(math.log2(blocks)) + 1  # the full butterfly: every channel can reach every other
        if stages < 0 or stages > most:
            raise UserError(f"boft: stages must be 1..{most} for {dim} channels in blocks of {size} (got {stages})")
        self._setup(base_layer, on_input, constraint, rescaled, (stages or most, blocks, size, size))

    def transform(self, x: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
        rotations = toward_identity(cayley(self.oft_blocks, self.constraint), scale).to(x.dtype)  # (m, k, b, b)
        return butterfly(x, rotations, dim)

    # With more positions than channels, training multiplies by the product of the stages, built once per
    # step from the identity (dim x dim x b per stage): one dense matmul beats m gather/rotate/scatter passes
    # over the activations, each of which copies them; with fewer, the stages run on the activations.

    def _few_rows(self, x: torch.Tensor) -> bool:
        """Fewer positions than channels: the stages on the activations cost less than building M."""
        return x.numel() // self.dim < self.dim

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor | None:
        if not plain_linear(x, base_layer, False) or self._few_rows(x):
            return None
        if not merged_pays(x, base_layer, self.acts_on_input):
            return None
        if "rescale" in self._parameters:
            # peft's BOFT (boft_s): y = s * (W M x) + b = (diag(s) W M) x + b, one product with the merged
            # weight: 3 GEMM-sized passes (forward, input gradient, weight gradient) against the rotated
            # activations' 5 (x M, W x', and the three gradients)
            return nn.functional.linear(x, self.merged(base_layer.weight, scale), base_layer.bias)
        mats = self.channel_matrix(scale, x.dtype).T[None]  # (1, dim, dim): v' = v M^T, one dense block
        return merged_rotation(x, mats, base_layer, self.acts_on_input, orthogonal=scale == 1.0)

    def scale_input(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self._few_rows(x):
            return super().scale_input(x, scale)
        m = self.channel_matrix(scale, x.dtype)
        return _channel_matmul(x, m.T, 1 if x.dim() == 4 else -1)  # x' = M x per position

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        if self.acts_on_input or self._few_rows(base_out):
            return super().delta(x, base_out, base_layer, scale)
        m = self.channel_matrix(scale, torch.float32).T  # row form: y' = y M^T
        if "rescale" in self._parameters:
            m = m * self.rescale.reshape(1, -1)
        m = (m - torch.eye(m.shape[0], device=m.device, dtype=m.dtype)).to(base_out.dtype)
        out = _channel_matmul(base_out, m, 1 if base_out.dim() == 4 else -1)
        if base_layer.bias is not None:
            out = out - _channel_view(base_layer.bias.to(m.dtype) @ m, out)
        return out

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor], weight_shape: torch.Size) -> dict[str, Any]:
        on_input = bool(tensors.get("on_input", torch.tensor(False)))
        return {
            "block_size": int(tensors["oft_blocks"].shape[-1]),
            "stages": int(tensors["oft_blocks"].shape[0]),
            "constraint": float(tensors.get("alpha", torch.tensor(0.0))),
            "rescaled": "rescale" in tensors,
            "on_input": on_input,
        }


def _channel_matmul(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Row vectors of channels times `matrix` (c, d): a matmul on the last dim, a 1x1 conv on (B, C, H, W)."""
    if dim == -1 or dim == x.dim() - 1:
        return x @ matrix
    return torch.nn.functional.conv2d(x, matrix.T[:, :, None, None])
