"""A TopK sparse autoencoder (Gao et al. 2024) with BatchTopK as an option, for diffusion activations.

    pre   = (x_n - b_dec) W_enc^T + b_enc          x_n: the input after the recorded normalisation
    codes = ReLU(TopK(pre))                         k largest per row (BatchTopK: k * rows per batch)
    x_hat = sum of the active decoder rows * codes + b_dec, then un-normalised

BatchTopK (Bussmann et al. 2024) trains with the k * rows largest pre-activations of the batch (each row
may use up to 4k). Its inference model is not "top k per row": it is the JumpReLU form that SAELens saves,
codes = pre * (pre > threshold) over *all* latents, with one threshold learned for the dictionary and
kept in the checkpoint (the `threshold` buffer; `calibrate_threshold` sets it on the final weights so the
expected L0 is k). A row may then use more or fewer than k latents, as in training.

Decoder rows have unit norm. The encoder is an autograd Function whose backward touches only the
k active latents per row (a sparse matmul for the weight gradient, an embedding_bag for the input
gradient), and the decoder is an embedding_bag gather of the active rows, never a dense scatter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffdissect.errors import SpecError


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int
    variant: str = "topk"  # "topk" or "batchtopk"
    normalise: str = "scale"  # "scale": E||x||^2 = d_in; "none"
    k_aux: int | None = None  # AuxK latents per row [d_in // 2]

    def validate(self) -> None:
        if self.d_in < 1 or self.n_latents < 1:
            raise SpecError(f"d_in and n_latents must be positive; got d_in={self.d_in}, n_latents={self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise SpecError(
                f"k={self.k} must be between 1 and n_latents={self.n_latents}; lower k or raise the "
                "expansion (n_latents = expansion x d_in)"
            )
        if self.variant not in ("topk", "batchtopk"):
            raise SpecError(f"variant must be 'topk' or 'batchtopk', not {self.variant!r}")
        if self.normalise not in ("scale", "none"):
            raise SpecError(f"normalise must be 'scale' or 'none', not {self.normalise!r}")

    @property
    def aux_k(self) -> int:
        return min(self.n_latents, self.k_aux or max(1, self.d_in // 2))

    def to_json(self) -> dict:
        return asdict(self)


class Codes(NamedTuple):
    """Sparse codes: `values[i, j]` is latent `indices[i, j]` of row i (zeros where a slot is unused)."""

    values: torch.Tensor  # (n, k) float
    indices: torch.Tensor  # (n, k) int64


class _SparseEncode(torch.autograd.Function):
    """pre = x W^T + b (dense), keep the top k per row; the backward is sparse in the kept entries."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, aux_mask, aux_k: int, compute_dtype):
        # the bias rides in the matmul as an extra input column: addmm would first copy it into all n x n_latents.
        # The dense matmul (the cost) runs in `compute_dtype`; the sparse backward stays in the weights' dtype.
        ones = torch.ones(len(x), 1, dtype=compute_dtype, device=x.device)
        pre = torch.mm(
            torch.cat([x.to(compute_dtype), ones], 1), torch.cat([weight, bias[:, None]], 1).to(compute_dtype).t()
        )
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.to(weight.dtype)
        aux = None
        if aux_mask is not None:
            aux_values, aux_indices = pre.masked_fill_(~aux_mask, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            aux = (aux_values.to(weight.dtype), aux_indices)
        ctx.save_for_backward(x, weight, indices, *(aux[1:] if aux else ()))
        ctx.has_aux = aux is not None
        if aux is None:
            return values, indices, None, None
        return values, indices, aux[0], aux[1]

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _ga):
        x, weight, indices, *aux = ctx.saved_tensors
        grads = [(grad_values, indices)]
        if ctx.has_aux and grad_aux is not None:
            grads.append((torch.nan_to_num(grad_aux, posinf=0.0, neginf=0.0), aux[0]))
        n_latents = weight.shape[0]
        grad_x = grad_w = grad_b = None
        for g, idx in grads:
            # rows: latents, columns: inputs -> grad_w = G^T x without materialising (n*k, d)
            gw = _weight_grad(g, idx, x, n_latents)
            gb = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, idx.flatten(), g.flatten())
            grad_w = gw if grad_w is None else grad_w + gw
            grad_b = gb if grad_b is None else grad_b + gb
            if ctx.needs_input_grad[0]:
                gx = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
                grad_x = gx if grad_x is None else grad_x + gx
        return grad_x, grad_w, grad_b, None, None, None, None


def _weight_grad(g: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, n_latents: int) -> torch.Tensor:
    """G^T x for the (n, k) code gradients g at latents idx, without materialising (n*k, d): a sparse matmul
    where the device has sparse kernels (CPU, CUDA), else (meta, MPS) a dense scatter of G and one matmul."""
    n = len(x)
    if x.device.type in ("cpu", "cuda"):
        rows = torch.arange(n, device=x.device).repeat_interleave(idx.shape[1])
        sparse = torch.sparse_coo_tensor(
            torch.stack([idx.flatten(), rows]), g.flatten(), (n_latents, n), check_invariants=False
        ).coalesce()
        return torch.sparse.mm(sparse, x)
    dense = torch.zeros(n, n_latents, dtype=g.dtype, device=g.device).scatter_add_(1, idx, g)
    return dense.t() @ x


class TopKSAE(nn.Module):
    input_scale: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, config: SAEConfig, device: str | torch.device | None = None):
        super().__init__()
        config.validate()
        self.config = config
        d, n = config.d_in, config.n_latents
        self.W_dec = nn.Parameter(F.normalize(torch.randn(n, d, device=device), dim=-1))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())  # rows: latents (W_enc = W_dec^T)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device))  # x_n = x * input_scale
        self.register_buffer("threshold", torch.zeros((), device=device))  # BatchTopK's inference threshold
        self.compute_dtype: torch.dtype | None = None  # the encoder matmul's dtype [the weights']

    # ---- set-up from data ------------------------------------------------------------------------
    @torch.no_grad()
    def initialise_from(self, sample: torch.Tensor, *, median_iters: int = 30) -> None:
        """From data: the input scale (if normalising), b_dec = the geometric median (Weiszfeld), and the
        encoder's scale, so that initial reconstructions have the centred inputs' mean norm (W_enc stays
        parallel to W_dec^T; codes are linear in that scale because b_enc = 0 and ReLU is homogeneous)."""
        sample = sample.float()
        if self.config.normalise == "scale":
            self.input_scale.copy_((self.config.d_in / sample.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt())
        x = sample * self.input_scale
        median = x.mean(0)
        for _ in range(median_iters):
            weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-8)
            median = (weights[:, None] * x).sum(0) / weights.sum()
        self.b_dec.copy_(median)
        was_training, self.training = self.training, False
        codes, _ = self.encode(sample, per_row_topk=True)  # no threshold is learned yet
        self.training = was_training
        reconstruction = (self.decode(codes, bias=False) * self.input_scale).norm(dim=-1).mean()
        target = (x - median).norm(dim=-1).mean()
        self.W_enc.mul_(torch.where(reconstruction > 0, target / reconstruction.clamp_min(1e-30), 1.0))

    # ---- the maps ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, aux_mask: torch.Tensor | None = None, per_row_topk: bool = False):
        """Codes of raw inputs x (n, d_in). With `aux_mask` (dead latents) also the AuxK codes. BatchTopK in eval
        mode is JumpReLU at the learned threshold; `per_row_topk` asks for the plain k per row instead."""
        xn = x.to(self.W_enc.dtype) * self.input_scale
        bias = self.b_enc - self.W_enc @ self.b_dec  # (x - b_dec) W^T + b = x W^T + (b - W b_dec)
        k = self.config.k
        aux_k = min(self.config.aux_k, int(aux_mask.sum())) if aux_mask is not None else 0
        mask = aux_mask[None] if aux_k else None
        dtype = self.compute_dtype or self.W_enc.dtype
        if self.config.variant == "batchtopk" and self.training:
            values, indices, aux_v, aux_i = _SparseEncode.apply(
                xn, self.W_enc, bias, min(self.config.n_latents, 4 * k), mask, aux_k, dtype
            )
            values = _batch_topk(values, k * len(x))
        elif self.config.variant == "batchtopk" and not per_row_topk:  # inference: JumpReLU at one threshold
            width = min(self.config.n_latents, 4 * k)
            while True:
                values, indices, aux_v, aux_i = _SparseEncode.apply(xn, self.W_enc, bias, width, mask, aux_k, dtype)
                if width == self.config.n_latents or values.device.type == "meta":  # meta: shapes only
                    break
                if not bool((values > self.threshold).all(1).any()):  # no row may have more above it
                    break
                width = min(self.config.n_latents, 2 * width)
            values = values * (values > self.threshold)
        else:
            values, indices, aux_v, aux_i = _SparseEncode.apply(xn, self.W_enc, bias, k, mask, aux_k, dtype)
        codes = Codes(F.relu(values), indices)
        aux = Codes(F.relu(aux_v), aux_i) if aux_k else None
        return codes, aux

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor, *, batch_size: int = 8192) -> float:
        """BatchTopK's inference threshold from raw inputs `x` on the current weights: BatchTopK's rule applied to
        all of `x` as one batch (each row's top 4k candidates, the k * rows largest kept), so JumpReLU at this
        threshold has mean L0 k on `x`. Sets the `threshold` buffer and returns it."""
        k, width = self.config.k, min(self.config.n_latents, 4 * self.config.k)
        bias = self.b_enc - self.W_enc @ self.b_dec
        candidates = []
        for start in range(0, len(x), batch_size):
            xn = x[start : start + batch_size].to(device=self.W_enc.device, dtype=torch.float32) * self.input_scale
            pre = torch.mm(xn, self.W_enc.t()) + bias
            candidates.append(pre.topk(width, dim=-1, sorted=False).values.flatten())
        flat = torch.cat(candidates)
        keep = min(k * len(x), flat.numel())
        cutoff = flat.topk(keep, sorted=False).values.min().clamp_min(0.0)
        self.threshold.fill_(float(cutoff))
        return float(cutoff)

    def decode(self, codes: Codes, *, bias: bool = True) -> torch.Tensor:
        """Sparse decode (embedding_bag over the active rows), back in the raw input space."""
        out = F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values, mode="sum")
        if bias:
            out = out + self.b_dec
        return out / self.input_scale

    def decode_dense(self, dense_codes: torch.Tensor) -> torch.Tensor:
        """Reference decoder from (n, n_latents) dense codes (for checks; slow for wide dictionaries)."""
        return (dense_codes @ self.W_dec + self.b_dec) / self.input_scale

    def dense_codes(self, codes: Codes) -> torch.Tensor:
        out = torch.zeros(
            codes.values.shape[0], self.config.n_latents, dtype=codes.values.dtype, device=codes.values.device
        )
        return out.scatter_add_(1, codes.indices, codes.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    # ---- decoder geometry ----------------------------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row (it would only change its norm)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(along * self.W_dec)


def _batch_topk(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Zero all but the `keep` largest entries of the batch (each row's candidates are its top 4k)."""
    flat = values.flatten()
    if keep >= flat.numel():
        return values
    cutoff = flat.topk(keep, sorted=False).values.min()
    return values * (values >= cutoff)
