"""SAEs in other packages' layouts: EleutherAI sparsify and SAELens, loaded as a TopKSAE, and exported to both.

sparsify (a directory per hookpoint, as `SparseCoder.save_to_disk` writes it):
    <root>/<hookpoint>/cfg.json          {"activation": "topk", "k", "num_latents", "expansion_factor",
                                            "normalize_decoder", "multi_topk", "skip_connection",
                                            "transcode", "d_in"}
    <root>/<hookpoint>/sae.safetensors   encoder.weight (n, d), encoder.bias (n), W_dec (n, d), b_dec (d)
    codes = TopK(ReLU(encoder(x - b_dec))), x_hat = codes @ W_dec + b_dec. SAeUron publishes its SD 1.5
    SAEs this way, with hookpoints named after the pipeline's module path: `unet.up_blocks.1.attentions.1`.

SAELens (`SAE.save_model`):
    cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "apply_b_dec_to_input",
                               "normalize_activations", "rescale_acts_by_decoder_norm", "metadata":
                               {"hook_name", "model_name", ...}, ...}; before 6.0: "activation_fn_str",
                               "activation_fn_kwargs": {"k"}, "hook_name"/"hook_point", "model_name" at the top
    sae_weights.safetensors   W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d)
    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc; codes = ReLU(TopK(pre)); x_hat = codes @ W_dec + b_dec

The formats were written from the packages' own source (sparsify `sparse_coder.py` / `config.py`, SAELens
`saes/sae.py`, `saes/topk_sae.py`, `loading/pretrained_sae_loaders.py`); the tests check them on fixtures
written in those layouts, not on files made by the installed packages.

Both map exactly onto :class:`TopKSAE` (input_scale 1, variant topk): the encoder bias absorbs b_dec.
A diffdissect SAE exports with its input scale folded in: codes divided by the scale (TopK picks the same
latents), b_enc and b_dec divided by it, decoder rows kept; the exported SAE reconstructs the same x_hat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from diffdissect.atomic import atomic_write_bytes, atomic_write_json
from diffdissect.errors import StoreError
from diffdissect.sae.model import SAEConfig, TopKSAE

SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
HOOK_PREFIXES = ("unet.", "transformer.", "model.")


@dataclass
class LoadedSAE:
    """An SAE from any supported layout, with what it says about where it was trained."""

    sae: TopKSAE
    format: str  # "diffdissect", "sparsify" or "saelens"
    path: Path
    layer: str | None  # the module path it reads (hookpoint prefix "unet." etc. removed)
    model: str | None  # the model it names, if it names one
    info: dict[str, Any]


def layer_of_hookpoint(name: str | None) -> str | None:
    """`unet.up_blocks.1.attentions.1` -> `up_blocks.1.attentions.1` (SAeUron's names are pipeline paths)."""
    if not name:
        return None
    for prefix in HOOK_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def detect_format(path: Path) -> str:
    if (path / "checkpoint.safetensors").is_file() or (
        (path / "config.json").is_file() and (path / "sae.safetensors").is_file()
    ):
        return "diffdissect"  # format 2 (one checkpoint unit), or format 1
    if (path / SPARSIFY_CONFIG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    raise StoreError(
        f"{path} holds no SAE: expected checkpoint.safetensors (diffdissect), cfg.json + "
        "sae.safetensors (sparsify) or cfg.json + sae_weights.safetensors (SAELens)."
    )


def load_any_sae(path: str | Path, layer: str | None = None) -> LoadedSAE:
    """The SAE at `path` in any supported layout. A sparsify root holding one directory per hookpoint is
    searched for `layer` (as `<layer>` or `unet.<layer>` / `transformer.<layer>`)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no SAE directory at {path}.")
    if layer is not None and not any(
        (path / n).is_file() for n in ("config.json", "cfg.json", "checkpoint.safetensors")
    ):
        for name in (layer, *(p + layer for p in HOOK_PREFIXES)):
            if (path / name).is_dir():
                return load_any_sae(path / name)
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise StoreError(
            f"{path} has no SAE for layer {layer!r} (looked for {layer} and unet.{layer}); "
            f"hookpoints there: {found[:10]}."
        )
    kind = detect_format(path)
    if kind == "sparsify":
        return load_sparsify(path)
    if kind == "saelens":
        return load_saelens(path)
    from diffdissect.sae.checkpoint import load_sae

    sae, info = load_sae(path)
    for key, tensor in sae.state_dict().items():
        _check_finite(path, key, tensor)
    return LoadedSAE(sae, "diffdissect", path, info.get("slice", {}).get("layer"), None, info)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path} is not a JSON object.")
    return value


def _read_tensors(path: Path, needed: dict[str, int]) -> dict[str, torch.Tensor]:
    """The tensors of `path`; a missing key or a wrong number of dimensions is refused by name."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise StoreError(f"cannot read {path}: {err}") from None
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise StoreError(
            f"{path} lacks the tensor(s) {missing} (it holds {sorted(tensors)}); it is not a complete "
            "SAE in this layout."
        )
    for key, ndim in needed.items():
        if tensors[key].ndim != ndim:
            raise StoreError(f"{path}: {key} has shape {list(tensors[key].shape)}, expected {ndim} dimensions.")
        _check_finite(path, key, tensors[key])
    return {k: v.float() for k, v in tensors.items()}


def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise StoreError(
            f"{path}: {key} holds {bad} non-finite value(s) (NaN or inf); the SAE's weights are "
            "corrupt or diverged in training: use another SAE."
        )


def _need(cfg: dict[str, Any], keys: list[str], path: Path) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise StoreError(f"{path} lacks the field(s) {missing}; it is not a complete config in this layout.")


def _build(
    d_in: int,
    n: int,
    k: int,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor,
    path: Path,
) -> TopKSAE:
    for name, tensor, shape in (
        ("encoder weight", w_enc, (n, d_in)),
        ("encoder bias", b_enc, (n,)),
        ("decoder weight", w_dec, (n, d_in)),
        ("decoder bias", b_dec, (d_in,)),
    ):
        if tuple(tensor.shape) != shape:
            raise StoreError(
                f"{path}: the {name} has shape {list(tensor.shape)}, but the config (d_in={d_in}, "
                f"{n} latents) needs {list(shape)}."
            )
    if not 1 <= k <= n:
        raise StoreError(f"{path}: k={k} is not between 1 and the {n} latents.")
    sae = TopKSAE(SAEConfig(d_in=d_in, n_latents=n, k=k, variant="topk", normalise="none"))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
    return sae.eval().requires_grad_(False)


# ---- sparsify ---------------------------------------------------------------------------------------------
def load_sparsify(path: str | Path) -> LoadedSAE:
    path = Path(path)
    cfg = _read_json(path / SPARSIFY_CONFIG)
    _need(cfg, ["d_in", "k"], path / SPARSIFY_CONFIG)
    if cfg.get("activation", "topk") != "topk":
        raise StoreError(f"{path}: activation {cfg['activation']!r} is not supported (only topk SAEs load).")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise StoreError(
                f"{path}: a sparsify coder with {flag}=true is not an SAE of one layer; it cannot be loaded for edits."
            )
    tensors = _read_tensors(path / SPARSIFY_WEIGHTS, {"encoder.weight": 2, "encoder.bias": 1, "W_dec": 2, "b_dec": 1})
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    w_enc, w_dec, b_dec = tensors["encoder.weight"], tensors["W_dec"], tensors["b_dec"]
    # sparsify: encoder(x - b_dec); TopKSAE: (x - b_dec) W^T + b_enc (input_scale 1): the same map
    sae = _build(d_in, n, int(cfg["k"]), w_enc, tensors["encoder.bias"], w_dec, b_dec, path / SPARSIFY_WEIGHTS)
    return LoadedSAE(sae, "sparsify", path, layer_of_hookpoint(path.name), cfg.get("model"), cfg)


def export_sparsify(sae: TopKSAE, root: str | Path, hookpoint: str) -> Path:
    """Write `sae` as sparsify's `<root>/<hookpoint>/{cfg.json, sae.safetensors}` (a hookpoint such as
    `unet.up_blocks.1.attentions.1`). Returns the hookpoint directory."""
    w_enc, b_enc, w_dec, b_dec = _folded(sae)
    out = Path(root) / hookpoint
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        out / SPARSIFY_WEIGHTS, save({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec})
    )
    c = sae.config
    atomic_write_json(
        out / SPARSIFY_CONFIG,
        {
            "activation": "topk",
            "expansion_factor": max(1, c.n_latents // c.d_in),
            "normalize_decoder": True,
            "num_latents": c.n_latents,
            "k": c.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": c.d_in,
        },
    )
    return out


# ---- SAELens ----------------------------------------------------------------------------------------------
def load_saelens(path: str | Path) -> LoadedSAE:
    path = Path(path)
    cfg = _read_json(path / SAELENS_CONFIG)
    _need(cfg, ["d_in", "d_sae"], path / SAELENS_CONFIG)
    architecture = cfg.get("architecture")
    if architecture is None:  # before SAELens 6.0
        architecture = "topk" if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" else "standard"
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if architecture != "topk" or k is None:
        raise StoreError(
            f"{path}: SAELens architecture {architecture!r} is not supported; only topk SAEs (with k "
            "in cfg.json) load for edits."
        )
    normalise = cfg.get("normalize_activations", "none")
    if normalise not in ("none", None, False):
        raise StoreError(
            f"{path}: normalize_activations={normalise!r} rescales inputs at run time; only 'none' "
            "is supported (fold the scaling factor into the weights first)."
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise StoreError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported.")
    tensors = _read_tensors(path / SAELENS_WEIGHTS, {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1})
    w_enc, b_enc, w_dec, b_dec = (tensors[k_] for k_ in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    if tuple(w_enc.shape) != (d_in, n):
        raise StoreError(f"{path}: W_enc has shape {list(w_enc.shape)}, but d_in={d_in}, d_sae={n} needs {[d_in, n]}.")
    w_enc = w_enc.t()
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = w_dec.norm(dim=-1)
        w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + w_enc @ b_dec  # TopKSAE always subtracts b_dec before encoding
    sae = _build(d_in, n, int(k), w_enc, b_enc, w_dec, b_dec, path / SAELENS_WEIGHTS)
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    model = meta.get("model_name") or cfg.get("model_name")
    return LoadedSAE(sae, "saelens", path, layer_of_hookpoint(hook), model, cfg)


def export_saelens(sae: TopKSAE, out: str | Path, *, hook_name: str, model_name: str | None = None) -> Path:
    """Write `sae` as SAELens's `cfg.json` + `sae_weights.safetensors` (architecture topk, 6.x config)."""
    w_enc, b_enc, w_dec, b_dec = _folded(sae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        out / SAELENS_WEIGHTS, save({"W_enc": w_enc.t().contiguous(), "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec})
    )
    c = sae.config
    atomic_write_json(
        out / SAELENS_CONFIG,
        {
            "architecture": "topk",
            "d_in": c.d_in,
            "d_sae": c.n_latents,
            "k": c.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {
                "hook_name": hook_name,
                "model_name": model_name,
                "sae_lens_version": "6.18.0",
                "sae_lens_training_version": "6.18.0",
                "exported_by": "diffdissect",
            },
        },
    )
    return out


def _folded(sae: TopKSAE) -> tuple[torch.Tensor, ...]:
    """(W_enc (n, d), b_enc, W_dec (n, d), b_dec) of an input-scale-1 SAE with the same reconstructions."""
    if sae.config.variant != "topk":
        raise StoreError(
            f"a {sae.config.variant} SAE has no exact topk form in these layouts (its inference "
            "threshold has no field there); export a topk SAE."
        )
    s = float(sae.input_scale)
    w_enc = sae.W_enc.detach().float().contiguous()
    return (
        w_enc,
        (sae.b_enc.detach().float() / s).contiguous(),
        sae.W_dec.detach().float().contiguous(),
        (sae.b_dec.detach().float() / s).contiguous(),
    )
