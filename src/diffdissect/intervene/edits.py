"""The edits: pure maths on a layer's activations, laid out as (batch, locations, width).

Every edit maps h (B, L, D) to h' of the same shape. A layer output of shape (B, C, H, W) has L = H*W
locations of width D = C; a token output (B, N, D) has L = N; a pooled (B, D) output has L = 1
(`to_locations` / `from_locations` convert). A direction is either one vector of width D, used at every
location, or a whole map (L, D) on the layer's grid (what `directions run` stores for a spatial layer).

    add      h + alpha * scale * u           u: a unit vector, or a map whose RMS per-location norm is 1;
                                               scale: the layer's typical per-location norm (calibration)
    erase    h - (h Q) Q^T                     Q: an orthonormal basis of the direction(s) (per location,
                                               or of whole maps)
    sae      h + D(z') - D(z)                  z = the SAE code of each location, z' = z with the chosen
                                               latents set / scaled / zeroed; the error term h - D(z) is
                                               kept. D is affine, so D(z') - D(z) = sum_j (z'_j - z_j) d_j
    mean     m                                 a stored mean (per location, or a whole map)

An edit that changes nothing (alpha = 0, an SAE edit that moves no latent) returns its input object
itself, so sampling with it is bit for bit the unedited sampling. A spatial mask m (L weights) applies
an edit partially: h + m * (edit(h) - h). Edits compose in order: `compose([a, b])` is b after a.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffdissect.errors import SpecError

KINDS = ("add", "erase", "sae", "mean")
SAE_OPS = ("set", "scale", "zero")


def to_locations(h: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(B, C, H, W) | (B, N, D) | (B, D) -> (B, L, D) and the function that puts a (B, L, D) back."""
    if h.ndim == 4:
        b, c, hh, ww = h.shape
        return h.flatten(2).transpose(1, 2), lambda x: x.transpose(1, 2).reshape(b, c, hh, ww)
    if h.ndim == 3:
        return h, lambda x: x
    if h.ndim == 2:
        return h[:, None], lambda x: x[:, 0]
    raise SpecError(
        f"cannot edit a layer output of shape {tuple(h.shape)}; edits take (B, C, H, W), (B, N, D) or (B, D) outputs."
    )


def layer_grid(shape: Sequence[int]) -> tuple[int, int] | None:
    """The (H, W) grid of one sample's output shape (C, H, W) | (N, D) (square token grids only) | (D,)."""
    if len(shape) == 3:
        return int(shape[1]), int(shape[2])
    if len(shape) == 2:
        side = math.isqrt(int(shape[0]))
        return (side, side) if side * side == int(shape[0]) else None
    return None


def locations_and_width(shape: Sequence[int]) -> tuple[int, int]:
    """(L, D) of one sample's output shape."""
    if len(shape) == 3:
        return int(shape[1]) * int(shape[2]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 1:
        return 1, int(shape[0])
    raise SpecError(f"cannot edit a layer output of per-sample shape {tuple(shape)}.")


def map_to_locations(vector: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A flattened whole-layer vector, in the stored order of the layer's per-sample shape
    ((C, H, W) channel-major, or (N, D)), as an (L, D) map."""
    if len(shape) == 3:
        c = int(shape[0])
        return vector.reshape(c, -1).t().contiguous()
    return vector.reshape(locations_and_width(shape))


@dataclass
class Context:
    """What an edit may depend on at one call: the step, its t, alpha and the layer's calibration norm."""

    step: int
    t: int
    alpha: float = 0.0
    scale: float = 1.0


class Edit(Protocol):
    """An edit of one layer's output. `apply` returns `h` itself when it changes nothing."""

    layer: str

    @property
    def uses_alpha(self) -> bool: ...

    def apply(self, h: torch.Tensor, ctx: Context) -> torch.Tensor: ...

    def describe(self) -> str: ...


# ---- the maths, as plain functions -----------------------------------------------------------------------
def unit(direction: torch.Tensor) -> torch.Tensor:
    """A (D,) vector scaled to norm 1, or an (L, D) map scaled to RMS per-location norm 1."""
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SpecError("a direction of zero (or non-finite) norm cannot be used.")
    if direction.ndim == 2:
        return direction * (math.sqrt(direction.shape[0]) / norm)
    return direction / norm


def add(h: torch.Tensor, direction: torch.Tensor, amount: float) -> torch.Tensor:
    """h + amount * direction; direction (D,) at every location or an (L, D) map. amount 0: h itself."""
    if amount == 0:
        return h
    return h + amount * direction.to(h.dtype)


def orthonormal(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (r, n) of the rows of `directions` (r, n): QR, dropping dependent rows."""
    q, r = torch.linalg.qr(directions.double().t())
    keep = r.diagonal().abs() > 1e-8 * r.diagonal().abs().max().clamp_min(1e-30)
    if not keep.any():
        raise SpecError("the directions to erase are all zero.")
    return q[:, keep].t().to(directions.dtype)


def erase(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """h (B, L, D) with the span of `basis` projected out. basis (r, D): per location; basis (r, L*D):
    of whole maps (flattened location-major)."""
    basis = basis.to(h.dtype)
    if basis.shape[1] == h.shape[-1]:
        return h - (h @ basis.t()) @ basis
    flat = h.reshape(h.shape[0], -1)
    return (flat - (flat @ basis.t()) @ basis).reshape(h.shape)


def masked(h: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """h + m * (edited - h) with per-location weights m (L,); no mask: `edited`."""
    if mask is None or edited is h:
        return edited
    return h + mask.to(h.device, h.dtype)[None, :, None] * (edited - h)


def compose(edits: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edits applied in order (the first one first)."""

    def run(h: torch.Tensor) -> torch.Tensor:
        for edit in edits:
            h = edit(h)
        return h

    return run


# ---- edit objects -----------------------------------------------------------------------------------------
@dataclass
class Window:
    """When and where an edit acts: sampler step indices or a t range (inclusive), and a location mask."""

    steps: tuple[int, int] | None = None  # [first, last] step index, 0 = the first (noisiest) step
    t_range: tuple[int, int] | None = None  # [low, high] training timesteps
    mask: torch.Tensor | None = None  # (L,) weights in [0, 1]
    mask_text: str | None = None

    def active(self, step: int, t: int) -> bool:
        if self.steps is not None and not self.steps[0] <= step <= self.steps[1]:
            return False
        return self.t_range is None or self.t_range[0] <= t <= self.t_range[1]

    def describe(self) -> str:
        parts = []
        if self.steps is not None:
            parts.append(f"steps={self.steps[0]}:{self.steps[1]}")
        if self.t_range is not None:
            parts.append(f"t={self.t_range[0]}:{self.t_range[1]}")
        if self.mask_text:
            parts.append(self.mask_text)
        return ";".join(parts)


@dataclass
class Direction:
    """A direction for one layer: a (D,) vector, an (L, D) map, or per-t maps/vectors (word directions)."""

    name: str
    vector: torch.Tensor | None = None
    by_t: dict[int, torch.Tensor] = field(default_factory=dict)

    def at(self, t: int) -> torch.Tensor:
        if self.vector is not None:
            return self.vector
        if t not in self.by_t:
            raise SpecError(
                f"direction {self.name} has no entry for t={t} (it holds t in {sorted(self.by_t)}); "
                "sample with the same steps as the directions run, or pin one step with @t=N."
            )
        return self.by_t[t]

    def shapes(self) -> set[tuple[int, ...]]:
        vectors = [self.vector] if self.vector is not None else list(self.by_t.values())
        return {tuple(v.shape) for v in vectors}

    def timesteps(self) -> list[int] | None:
        return None if self.vector is not None else sorted(self.by_t)


@dataclass
class AddEdit:
    """h + alpha * scale * unit(d). `raw=True` (option `;scale=raw`): h + alpha * d, the direction as stored
    (a mean difference then moves the mean of the images without the word onto the mean of those with it,
    at each step by that step's own difference)."""

    layer: str
    direction: Direction
    window: Window = field(default_factory=Window)
    raw: bool = False
    uses_alpha: bool = True
    _units: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def apply(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if not self.window.active(ctx.step, ctx.t) or ctx.alpha == 0:
            return h
        key = ctx.t if self.direction.vector is None else -1
        if key not in self._units:
            d = self.direction.at(ctx.t).float()
            self._units[key] = (d if self.raw else unit(d)).to(h.device)
        amount = ctx.alpha if self.raw else ctx.alpha * ctx.scale
        return masked(h, add(h, self._units[key], amount), self.window.mask)

    def describe(self) -> str:
        return _describe("add", self.layer, self.direction.name, self.window)


@dataclass
class EraseEdit:
    layer: str
    directions: list[Direction]
    window: Window = field(default_factory=Window)
    uses_alpha: bool = False
    _bases: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def apply(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if not self.window.active(ctx.step, ctx.t):
            return h
        fixed = all(d.vector is not None for d in self.directions)
        key = -1 if fixed else ctx.t
        if key not in self._bases:
            rows = [_flat_location_major(d.at(ctx.t).float()) for d in self.directions]
            widths = {r.numel() for r in rows}
            if len(widths) != 1:
                raise SpecError(
                    f"erase at {self.layer}: the directions mix per-location vectors and whole maps; "
                    "erase one kind at a time."
                )
            self._bases[key] = orthonormal(torch.stack(rows)).to(h.device)
        return masked(h, erase(h, self._bases[key]), self.window.mask)

    def describe(self) -> str:
        return _describe("erase", self.layer, ",".join(d.name for d in self.directions), self.window)


def _flat_location_major(direction: torch.Tensor) -> torch.Tensor:
    return direction.reshape(-1)  # (D,) stays; an (L, D) map flattens location-major, as erase() reads


@dataclass
class SAEEdit:
    """Set, scale or zero SAE latents: h + sum_j (z'_j - z_j) d_j, the error term untouched.

    `op="set"` sets each latent to `value`, or (value None) to alpha x the layer's calibration norm in the
    SAE's input units (so alpha means what it means for `add`); `op="scale"` multiplies by `value`, or by
    alpha when value is None; `op="zero"` sets 0. `sae` is a TopKSAE (any loaded format).
    """

    layer: str
    sae: Any
    latents: list[int]
    op: str
    value: float | None = None
    window: Window = field(default_factory=Window)
    name: str = "sae"

    @property
    def uses_alpha(self) -> bool:
        return self.op != "zero" and self.value is None

    def apply(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if not self.window.active(ctx.step, ctx.t) or not self.latents:
            return h
        if self.op == "scale" and self._amount(ctx) == 1.0:
            return h
        if self.sae.W_dec.device != h.device:
            self.sae.to(h.device)
        return masked(h, sae_edit(h, self.sae, self.latents, self.op, self._amount(ctx)), self.window.mask)

    def _amount(self, ctx: Context) -> float:
        if self.op == "zero":
            return 0.0
        if self.value is not None:
            return float(self.value)
        if self.op == "set":
            return ctx.alpha * ctx.scale * float(self.sae.input_scale)
        return ctx.alpha

    def describe(self) -> str:
        op = self.op if self.value is None else f"{self.op}={self.value:g}"
        return _describe(f"sae-{op}", self.layer, f"{self.name}#{','.join(map(str, self.latents))}", self.window)


def sae_edit(h: torch.Tensor, sae: Any, latents: Sequence[int], op: str, amount: float) -> torch.Tensor:
    """h (B, L, D) + D(z') - D(z) for the SAE code z of every location (see :class:`SAEEdit`).

    Rows whose chosen latents do not change are returned exactly as they were (bit for bit).
    """
    if op not in SAE_OPS:
        raise SpecError(f"unknown SAE operation {op!r}; use one of {SAE_OPS}.")
    rows = h.reshape(-1, h.shape[-1])
    w_dec = sae.W_dec.detach()
    with torch.no_grad():
        codes, _ = sae.encode(rows.to(w_dec.dtype))
    chosen = torch.as_tensor(list(dict.fromkeys(latents)), device=rows.device, dtype=torch.long)  # each once
    match = codes.indices[:, :, None] == chosen[None, None, :]  # (n, k, m)
    current = (codes.values[:, :, None] * match).sum(1)  # (n, m): z_j, 0 if inactive
    if op == "zero":
        new = torch.zeros_like(current)
    elif op == "scale":
        new = current * amount
    else:
        new = torch.full_like(current, amount)
    change = new - current
    moved = (change != 0).any(1)
    if not moved.any():
        return h
    delta = (change @ w_dec[chosen]) / sae.input_scale
    edited = torch.where(moved[:, None], rows + delta.to(rows.dtype), rows)
    return edited.reshape(h.shape)


@dataclass
class MeanEdit:
    """Replace the layer's output with a stored mean: one (D,) vector or (L, D) map, or one per t."""

    layer: str
    mean: Direction
    window: Window = field(default_factory=Window)
    uses_alpha: bool = False

    def apply(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if not self.window.active(ctx.step, ctx.t):
            return h
        m = self.mean.at(ctx.t).to(h.device, h.dtype)
        return masked(h, m.expand(h.shape).clone(), self.window.mask)

    def describe(self) -> str:
        return _describe("mean", self.layer, self.mean.name, self.window)


def _describe(kind: str, layer: str, source: str, window: Window) -> str:
    extra = window.describe()
    return f"{kind}@{layer}={source}" + (f";{extra}" if extra else "")


def fit_to_layer(name: str, vector: torch.Tensor, layer: str, out_shape: Sequence[int]) -> torch.Tensor:
    """A flat vector as a (D,) per-location direction or an (L, D) map of the layer; refuses any other width."""
    n_loc, width = locations_and_width(out_shape)
    flat = vector.reshape(-1)
    if flat.numel() == width:
        return flat
    if flat.numel() == n_loc * width and n_loc > 1:
        return map_to_locations(flat, out_shape)
    raise SpecError(
        f"{name} has {flat.numel()} values, but layer {layer!r} outputs {list(out_shape)} per sample: a "
        f"direction there must have width {width} (one location) or {n_loc * width} (the whole map); "
        "use a direction made at this layer of this model."
    )
