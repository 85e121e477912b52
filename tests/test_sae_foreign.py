"""sparsify and SAELens layouts: fixtures written by hand from the packages' documented formats (their own
save code: sparsify `SparseCoder.save_to_disk`, SAELens `SAE.save_model`), checked against each package's
forward maths written out independently here; round trips of diffdissect SAEs through both exports.

The packages themselves are not installed (sparsify pulls in its trainer's dependencies, SAELens pulls in
transformer-lens), so no file here was made by them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffdissect.errors import StoreError
from diffdissect.sae.foreign import (
    export_saelens,
    export_sparsify,
    load_any_sae,
    load_saelens,
    load_sparsify,
)
from diffdissect.sae.model import SAEConfig, TopKSAE

D, N, K = 8, 32, 4


def _x(n: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3


def _sparsify_forward(x, enc_w, enc_b, w_dec, b_dec, k):
    """sparsify: relu(encoder(x - b_dec)) -> top k -> acts @ W_dec + b_dec."""
    pre = torch.relu((x - b_dec) @ enc_w.t() + enc_b)
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(1, indices, values)
    return dense, dense @ w_dec + b_dec


def _saelens_forward(x, w_enc, b_enc, w_dec, b_dec, k, apply_b_dec=True, rescale=False):
    """SAELens TopKSAE: pre = (x - b_dec) @ W_enc + b_enc (x norm rescale), relu(topk), then decode."""
    pre = (x - b_dec * apply_b_dec) @ w_enc + b_enc
    if rescale:
        pre = pre * w_dec.norm(dim=-1)
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(1, indices, values.relu())
    if rescale:
        dense = dense / w_dec.norm(dim=-1)
    return dense, dense @ w_dec + b_dec


def _weights(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, D, generator=g),
        torch.randn(N, generator=g) * 0.1,
        torch.randn(N, D, generator=g),
        torch.randn(D, generator=g) * 0.5,
    )


def _write_sparsify(path: Path, enc_w, enc_b, w_dec, b_dec, **cfg) -> Path:
    path.mkdir(parents=True)
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec}, str(path / "sae.safetensors")
    )
    config = {
        "activation": "topk",
        "expansion_factor": N // D,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
        **cfg,
    }
    (path / "cfg.json").write_text(json.dumps(config))
    return path


def test_sparsify_fixture_loads_and_matches_sparsify_maths(tmp_path: Path) -> None:
    enc_w, enc_b, w_dec, b_dec = _weights()
    root = tmp_path / "saeuron"
    _write_sparsify(root / "unet.up_blocks.1.attentions.1", enc_w, enc_b, w_dec, b_dec)
    loaded = load_any_sae(root, "up_blocks.1.attentions.1")  # SAeUron's hookpoint naming
    assert loaded.format == "sparsify" and loaded.layer == "up_blocks.1.attentions.1"
    x = _x()
    dense, recon = _sparsify_forward(x, enc_w, enc_b, w_dec, b_dec, K)
    codes, _ = loaded.sae.encode(x)
    assert torch.allclose(loaded.sae.dense_codes(codes), dense, atol=1e-4)
    assert torch.allclose(loaded.sae(x), recon, atol=1e-4)


@pytest.mark.parametrize("old_config", [False, True])
@pytest.mark.parametrize(("apply_b_dec", "rescale"), [(True, False), (False, False), (True, True)])
def test_saelens_fixture_loads_and_matches_saelens_maths(
    tmp_path: Path, old_config: bool, apply_b_dec: bool, rescale: bool
) -> None:
    enc_w, b_enc, w_dec, b_dec = _weights(2)
    w_enc = enc_w.t().contiguous()  # SAELens: W_enc is (d_in, d_sae)
    save_file(
        {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors")
    )
    if old_config:  # SAELens < 6: flat config, activation_fn_str + activation_fn_kwargs
        cfg = {
            "d_in": D,
            "d_sae": N,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "apply_b_dec_to_input": apply_b_dec,
            "hook_name": "unet.mid_block",
            "model_name": "tiny",
            "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": rescale,
        }
    else:
        cfg = {
            "architecture": "topk",
            "d_in": D,
            "d_sae": N,
            "k": K,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": rescale,
            "metadata": {"hook_name": "unet.mid_block", "model_name": "tiny", "sae_lens_version": "6.18.0"},
        }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_any_sae(tmp_path)
    assert loaded.format == "saelens" and loaded.layer == "mid_block" and loaded.model == "tiny"
    x = _x(seed=3)
    _, recon = _saelens_forward(x, w_enc, b_enc, w_dec, b_dec, K, apply_b_dec, rescale)
    assert torch.allclose(loaded.sae(x), recon, atol=1e-4)


def _trained_like(seed: int = 0, scale: float = 0.37) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
        sae.input_scale.fill_(scale)  # a normalising SAE: the export folds the scale in
    return sae.eval()


def test_round_trip_through_sparsify_and_saelens(tmp_path: Path) -> None:
    sae = _trained_like()
    x = _x(seed=5)
    expected = sae(x)
    codes, _ = sae.encode(x)
    hook = export_sparsify(sae, tmp_path / "sp", "unet.mid_block")
    sp = load_sparsify(hook)
    assert sp.layer == "mid_block"
    assert torch.allclose(sp.sae(x), expected, atol=1e-5)
    sp_codes, _ = sp.sae.encode(x)
    assert torch.equal(sp_codes.indices.sort(1).values, codes.indices.sort(1).values)  # the same latents fire
    # and what sparsify's own maths computes from the exported files
    from safetensors.torch import load_file

    w = load_file(hook / "sae.safetensors")
    _, recon = _sparsify_forward(x, w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"], K)
    assert torch.allclose(recon, expected, atol=1e-5)
    cfg = json.loads((hook / "cfg.json").read_text())
    assert {
        "activation",
        "expansion_factor",
        "normalize_decoder",
        "num_latents",
        "k",
        "multi_topk",
        "skip_connection",
        "transcode",
        "d_in",
    } == set(cfg)

    out = export_saelens(sae, tmp_path / "sl", hook_name="unet.mid_block", model_name="tiny")
    sl = load_saelens(out)
    assert torch.allclose(sl.sae(x), expected, atol=1e-5)
    w = load_file(out / "sae_weights.safetensors")
    assert tuple(w["W_enc"].shape) == (D, N) and tuple(w["W_dec"].shape) == (N, D)
    _, recon = _saelens_forward(x, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], K)
    assert torch.allclose(recon, expected, atol=1e-5)


def test_missing_keys_and_fields_are_refused(tmp_path: Path) -> None:
    enc_w, enc_b, w_dec, b_dec = _weights()
    path = tmp_path / "sp"
    path.mkdir()
    save_file({"encoder.weight": enc_w, "W_dec": w_dec, "b_dec": b_dec}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "k": K, "num_latents": N, "d_in": D}))
    with pytest.raises(StoreError, match=r"lacks the tensor\(s\) \['encoder.bias'\]"):
        load_any_sae(path)
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": N}))
    with pytest.raises(StoreError, match=r"lacks the field\(s\) \['d_in', 'k'\]"):
        load_sparsify(path)

    sl = tmp_path / "sl"
    sl.mkdir()
    save_file({"W_enc": enc_w.t().contiguous(), "b_enc": enc_b, "b_dec": b_dec}, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": N, "k": K}))
    with pytest.raises(StoreError, match="W_dec"):
        load_any_sae(sl)
    (sl / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D, "d_sae": N}))
    with pytest.raises(StoreError, match="architecture 'jumprelu' is not supported"):
        load_saelens(sl)
    with pytest.raises(StoreError, match="holds no SAE"):
        load_any_sae(tmp_path)
    with pytest.raises(StoreError, match="no SAE for layer 'mid_block'"):
        load_any_sae(tmp_path, "mid_block")


def test_unsupported_variants_are_refused(tmp_path: Path) -> None:
    enc_w, enc_b, w_dec, b_dec = _weights()
    _write_sparsify(tmp_path / "a", enc_w, enc_b, w_dec, b_dec, transcode=True)
    with pytest.raises(StoreError, match="transcode"):
        load_sparsify(tmp_path / "a")
    _write_sparsify(tmp_path / "b", enc_w, enc_b, w_dec[:, :3].contiguous(), b_dec)
    with pytest.raises(StoreError, match="decoder weight has shape"):
        load_sparsify(tmp_path / "b")
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, variant="batchtopk"))
    with pytest.raises(StoreError, match="batchtopk"):
        export_sparsify(sae, tmp_path / "c", "unet.mid_block")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_time(tmp_path: Path, bad: float) -> None:
    """sparsify, SAELens and diffdissect SAEs with a NaN/inf weight: refused by name, before any use."""
    from diffdissect.sae.checkpoint import save_checkpoint

    enc_w, enc_b, w_dec, b_dec = _weights()
    w_dec[3, 2] = bad
    _write_sparsify(tmp_path / "sp", enc_w, enc_b, w_dec, b_dec)
    with pytest.raises(StoreError, match="W_dec holds 1 non-finite"):
        load_any_sae(tmp_path / "sp")
    sae = _trained_like()
    export_saelens(sae, tmp_path / "sl", hook_name="unet.mid_block")
    weights = tmp_path / "sl" / "sae_weights.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    tensors["b_enc"][0] = bad
    save_file(tensors, str(weights))
    with pytest.raises(StoreError, match="b_enc holds 1 non-finite"):
        load_any_sae(tmp_path / "sl")
    with torch.no_grad():
        sae.b_dec[1] = bad
    save_checkpoint(tmp_path / "dd", sae, {"slice": {"layer": "mid_block"}})
    with pytest.raises(StoreError, match="b_dec holds 1 non-finite"):
        load_any_sae(tmp_path / "dd")
