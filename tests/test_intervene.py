"""Interventions: each edit's maths against a known answer, the hooks against a plain forward hook, steer on the
tiny SD and DiT pipelines, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffdissect.errors import DiffdissectError, SpecError
from diffdissect.intervene import (
    Intervention,
    SteerConfig,
    layer_shapes,
    parse_edits,
    run_steer,
)
from diffdissect.intervene.edits import (
    AddEdit,
    Context,
    Direction,
    EraseEdit,
    MeanEdit,
    SAEEdit,
    Window,
    add,
    erase,
    fit_to_layer,
    map_to_locations,
    masked,
    orthonormal,
    sae_edit,
    to_locations,
    unit,
)
from diffdissect.intervene.sources import bind_edit
from diffdissect.sae.model import SAEConfig, TopKSAE


def _sae(d: int = 6, n: int = 12, k: int = 3, seed: int = 0, scale: float = 1.7) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d, n_latents=n, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(scale)
    return sae.eval()


# ---- maths on synthetic tensors --------------------------------------------------------------------------------
def test_locations_round_trip_and_map_order() -> None:
    h = torch.randn(2, 3, 4, 5)
    rows, back = to_locations(h)
    assert rows.shape == (2, 20, 3)
    assert torch.equal(back(rows), h)
    assert torch.equal(rows[1, 7], h[1, :, 1, 2])  # location 7 = row 1, column 2
    flat = h[0].reshape(-1)  # a stored (C, H, W) map, flattened channel-major
    assert torch.equal(map_to_locations(flat, (3, 4, 5)), rows[0])


def test_add_adds_alpha_times_scale_along_a_unit_direction() -> None:
    h = torch.randn(2, 5, 4)
    u = torch.tensor([3.0, 0.0, 4.0, 0.0])
    edit = AddEdit("x", Direction("d", vector=u))
    out = edit.apply(h, Context(step=0, t=10, alpha=2.0, scale=3.0))
    expected = h + 6.0 * torch.tensor([0.6, 0.0, 0.8, 0.0])
    assert torch.allclose(out, expected, atol=1e-6)
    assert edit.apply(h, Context(0, 10, alpha=0.0, scale=3.0)) is h  # alpha 0: the input object itself


def test_a_map_direction_is_scaled_to_unit_rms_per_location() -> None:
    m = torch.randn(6, 4)
    u = unit(m)
    assert torch.isclose(u.norm(dim=-1).pow(2).mean().sqrt(), torch.tensor(1.0), atol=1e-6)
    h = torch.zeros(1, 6, 4)
    out = AddEdit("x", Direction("d", vector=m)).apply(h, Context(0, 0, alpha=1.0, scale=2.0))
    assert torch.allclose(out[0], 2.0 * u, atol=1e-6)


def test_erase_leaves_no_component_along_the_direction_or_subspace() -> None:
    torch.manual_seed(1)
    h = torch.randn(3, 7, 5)
    d = torch.randn(5)
    out = erase(h, orthonormal(d[None]))
    assert (out @ (d / d.norm())).abs().max() < 1e-5
    basis = torch.randn(2, 5)
    out2 = EraseEdit("x", [Direction("a", vector=basis[0]), Direction("b", vector=basis[1])]).apply(h, Context(0, 0))
    assert (out2 @ basis.t()).abs().max() < 1e-5
    # what is orthogonal to the subspace is untouched
    q = orthonormal(basis)
    assert torch.allclose(out2, h - (h @ q.t()) @ q, atol=1e-6)
    # a whole-map direction: no component of the flattened map along it
    m = torch.randn(7, 5)
    out3 = EraseEdit("x", [Direction("m", vector=m)]).apply(h, Context(0, 0))
    assert (out3.reshape(3, -1) @ (m.reshape(-1) / m.norm())).abs().max() < 1e-5


def test_sae_edit_is_h_plus_decoded_change_against_a_dense_reference() -> None:
    sae = _sae()
    torch.manual_seed(2)
    h = torch.randn(2, 9, 6) * 2
    rows = h.reshape(-1, 6)
    codes, _ = sae.encode(rows)
    dense = sae.dense_codes(codes)
    latents = [int(codes.indices[0, 0]), int(codes.indices[3, 1]), 11]
    for op, amount in (("zero", 0.0), ("scale", 3.0), ("set", 2.5)):
        edited = dense.clone()
        if op == "zero":
            edited[:, latents] = 0
        elif op == "scale":
            edited[:, latents] *= amount
        else:
            edited[:, latents] = amount
        expected = rows + sae.decode_dense(edited) - sae.decode_dense(dense)
        out = sae_edit(h, sae, latents, op, amount)
        assert torch.allclose(out.reshape(-1, 6), expected, atol=1e-5), op


def test_sae_edit_that_moves_no_latent_is_the_identity_bit_for_bit() -> None:
    sae = _sae(n=64, k=2)
    h = torch.randn(2, 9, 6)
    assert SAEEdit("x", sae, [], "zero").apply(h, Context(0, 0)) is h
    assert SAEEdit("x", sae, [1, 2], "scale", value=1.0).apply(h, Context(0, 0)) is h
    # zeroing latents that are active nowhere changes nothing, bit for bit
    codes, _ = sae.encode(h.reshape(-1, 6))
    inactive = sorted(set(range(12)) - set(codes.indices.flatten().tolist()))
    assert inactive
    out = SAEEdit("x", sae, inactive, "zero").apply(h, Context(0, 0))
    assert out is h or torch.equal(out, h)
    # rows where the chosen latent is inactive keep their exact bits when it is zeroed elsewhere
    j = int(codes.indices[0, 0])
    active = (codes.indices == j).any(1) & (codes.values * (codes.indices == j)).sum(1).ne(0)
    out = sae_edit(h, sae, [j], "zero", 0.0).reshape(-1, 6)
    rows = h.reshape(-1, 6)
    assert torch.equal(out[~active], rows[~active])
    assert not torch.equal(out[active], rows[active])


def test_sae_set_in_alpha_units_adds_alpha_times_scale_along_the_decoder_row() -> None:
    sae = _sae(n=64, k=2)
    h = torch.randn(1, 4, 6)
    codes, _ = sae.encode(h.reshape(-1, 6))
    inactive = next(j for j in range(64) if j not in codes.indices.flatten().tolist())
    out = SAEEdit("x", sae, [inactive], "set").apply(h, Context(0, 0, alpha=2.0, scale=0.5))
    row = sae.W_dec.detach()[inactive]
    assert torch.allclose(out - h, (1.0 * row)[None, None].expand_as(h), atol=1e-5)  # ||row|| = 1 in raw units


def test_composition_applies_edits_in_order() -> None:
    h = torch.randn(2, 3, 4)
    d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a, e = AddEdit("x", Direction("d", vector=d)), EraseEdit("x", [Direction("d", vector=d)])
    ctx = Context(0, 0, alpha=1.0, scale=5.0)
    add_then_erase = e.apply(a.apply(h, ctx), ctx)
    erase_then_add = a.apply(e.apply(h, ctx), ctx)
    assert torch.allclose(add_then_erase[..., 0], torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(erase_then_add[..., 0], torch.full((2, 3), 5.0), atol=1e-6)
    assert torch.equal(add_then_erase[..., 1:], erase_then_add[..., 1:])


def test_mask_window_and_mean() -> None:
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([1.0, 0.0, 0.5, 0.0])
    out = masked(h, add(h, torch.ones(3), 2.0), mask)
    assert torch.equal(out[:, 1], h[:, 1]) and torch.equal(out[:, 3], h[:, 3])
    assert torch.allclose(out[:, 0], h[:, 0] + 2.0) and torch.allclose(out[:, 2], h[:, 2] + 1.0)
    window = Window(steps=(2, 3))
    edit = AddEdit("x", Direction("d", vector=torch.ones(3)), window)
    assert edit.apply(h, Context(step=1, t=0, alpha=1.0)) is h
    assert edit.apply(h, Context(step=2, t=0, alpha=1.0)) is not h
    t_window = AddEdit("x", Direction("d", vector=torch.ones(3)), Window(t_range=(100, 200)))
    assert t_window.apply(h, Context(step=0, t=99, alpha=1.0)) is h
    m = torch.randn(4, 3)
    mean = MeanEdit("x", Direction("m", by_t={5: m}))
    assert torch.equal(mean.apply(h, Context(0, 5)), m.expand(2, 4, 3))
    with pytest.raises(SpecError, match="no entry for t=6"):
        mean.apply(h, Context(0, 6))


# ---- the hooks in the pipelines ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_target(sd_dir: Path):
    from diffdissect.models import load_target

    return load_target(str(sd_dir))


@pytest.fixture(scope="module")
def dit_target(dit_dir: Path):
    from diffdissect.models import load_target

    return load_target(str(dit_dir))


def _sample(target, seeds, steps=4, guidance=2.0, prompt="a red cat"):
    kwargs = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_type": "np",
        "generator": [torch.Generator().manual_seed(s) for s in seeds],
    }
    if target.kind == "dit":
        kwargs["class_labels"] = [3] * len(seeds)
    else:
        kwargs["prompt"] = [prompt] * len(seeds)
    target.pipeline.set_progress_bar_config(disable=True)
    return np.asarray(target.pipeline(**kwargs).images)


def test_intervention_matches_a_plain_forward_hook(sd_target) -> None:
    """The edited sampling equals sampling with a hand-written hook that adds the same vector."""
    shapes = layer_shapes(sd_target, ["mid_block"])
    c = shapes["mid_block"][0]
    v = torch.randn(c, generator=torch.Generator().manual_seed(3))
    u = v / v.norm()
    edit = AddEdit("mid_block", Direction("v", vector=v))
    with Intervention(sd_target, [edit], scales={"mid_block": 2.0}, alpha=1.5) as iv:
        iv.samples = 2
        ours = _sample(sd_target, [0, 1])
    module = dict(sd_target.denoiser.named_modules())["mid_block"]
    handle = module.register_forward_hook(lambda m, a, out: out + 3.0 * u[None, :, None, None])
    try:
        reference = _sample(sd_target, [0, 1])
    finally:
        handle.remove()
    assert np.array_equal(ours, reference)
    assert not np.array_equal(ours, _sample(sd_target, [0, 1]))


def test_branch_edits_only_the_chosen_half(sd_target) -> None:
    seen = []
    edit = AddEdit(
        "mid_block", Direction("v", vector=torch.ones(layer_shapes(sd_target, ["mid_block"])["mid_block"][0]))
    )

    class Spy:
        layer, uses_alpha = "mid_block", False

        def apply(self, h, ctx):
            seen.append(h.shape[0])
            return h

    with Intervention(sd_target, [Spy(), edit], scales={"mid_block": 1.0}, alpha=1.0, branch="cond") as iv:
        iv.samples = 2
        _sample(sd_target, [0, 1])
    assert seen and set(seen) == {2}  # the guided batch is 4: the spy saw one half
    assert not sd_target.cfg_cond_first  # SD: unconditional first, so the conditional half is rows 2..3


def test_steer_on_tiny_sd_alpha_zero_and_noop_sae_reproduce_the_unedited_image(sd_target, tmp_path: Path) -> None:
    from diffdissect.sae.foreign import export_sparsify

    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    sae = _sae(d=c, n=2 * c, k=4)
    export_sparsify(sae, tmp_path / "saes", "unet.mid_block")
    vec = tmp_path / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=c).astype(np.float32))
    config = SteerConfig(
        prompts=["a red cat"],
        seeds=[0, 1],
        alphas=[0.0, 3.0],
        steps=4,
        guidance=2.0,
        edits=[
            f"add@mid_block=file:{vec}",
            f"sae-scale@mid_block={tmp_path / 'saes'}#0;value=1",
            f"add@mid_block={vec};steps=0:1 | erase@mid_block=random:1",
            f"sae-zero@mid_block=sae:{tmp_path / 'saes' / 'unet.mid_block'}#0,1,2",
        ],
    )
    result = run_steer(sd_target, config, tmp_path / "out")
    by = {(e.edit, e.alpha): e for e in result.effects}
    assert by[(config.edits[0], 0.0)].identical == 2
    assert by[(config.edits[0], 3.0)].identical == 0 and by[(config.edits[0], 3.0)].pixel_distance > 0
    assert by[(config.edits[1], None)].identical == 2  # scale by 1: no latent moves
    assert by[(config.edits[2], 3.0)].identical == 0
    assert set(result.calibration) == {"mid_block"} and result.calibration["mid_block"] > 0
    assert (tmp_path / "out" / "grids" / "e0.png").is_file()
    assert (tmp_path / "out" / "images" / "e0" / "a3" / "p0-s1.png").is_file()
    saved = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert saved["schedule"] == result.schedule and len(result.schedule) == 4
    assert "Interventions" in (tmp_path / "out" / "report.html").read_text()


def test_steer_on_tiny_dit_edits_transformer_tokens(dit_target, tmp_path: Path) -> None:
    shapes = layer_shapes(dit_target, ["transformer_blocks.0"])
    assert len(shapes["transformer_blocks.0"]) == 2  # (tokens, width)
    config = SteerConfig(
        prompts=["3"],
        seeds=[0, 1],
        alphas=[0.0, 2.0],
        steps=3,
        guidance=1.5,
        edits=["add@transformer_blocks.0=random:0", "add@transformer_blocks.0=random:0#map;box=0:2,0:2"],
    )
    result = run_steer(dit_target, config, tmp_path / "out")
    by = {(e.edit, e.alpha): e for e in result.effects}
    assert by[(config.edits[0], 0.0)].identical == 2
    assert by[(config.edits[0], 2.0)].identical == 0
    assert by[(config.edits[1], 2.0)].pixel_distance > 0


def test_judge_readings_and_effect_table(sd_target, tmp_path: Path) -> None:
    from diffdissect.intervene import Judge

    class Fake:
        """'red' when the mean pixel is bright, else 'blue'; always 'cat'."""

        name = "fake"

        def caption(self, images):
            return [("a red cat" if im.mean() > threshold else "a blue cat") for im in images]

    base = _sample(sd_target, [0, 1, 2, 3], guidance=1.0)
    threshold = float((base * 255).mean()) + 0.5
    config = SteerConfig(
        prompts=["a red cat"],
        seeds=[0, 1, 2, 3],
        alphas=[0.0],
        steps=4,
        guidance=1.0,
        edits=["add@mid_block=random:0"],
        expect=["colour=red"],
        attributes={"colour": ["red", "blue"], "animal": ["cat", "dog"]},
    )
    result = run_steer(sd_target, config, tmp_path / "out", Judge(Fake(), config.attributes))
    effect = result.effects[0]
    assert effect.target_rate == effect.baseline_target_rate  # alpha 0: nothing changes
    assert effect.keep["animal"]["rate"] == 1.0 and effect.keep["animal"]["n"] == 4
    assert effect.target_ci[0] <= effect.target_rate <= effect.target_ci[1]
    readings = json.loads((tmp_path / "out" / "readings.json").read_text())
    assert len(readings["images"]) == 8 and readings["judge"] == "fake"


# ---- bad input ------------------------------------------------------------------------------------------------------
def _bind(target, text: str, steps: int = 4):
    from diffdissect.intervene.apply import sampling_schedule

    (spec,) = parse_edits(text)
    shapes = layer_shapes(target, [spec.layer])
    return bind_edit(
        spec, shapes[spec.layer], sampling_schedule(target, steps), target.num_train_timesteps, target.identity()
    )


def test_bad_width_mask_steps_and_kind(sd_target, tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones(5, np.float32))
    with pytest.raises(SpecError, match="must have width"):
        _bind(sd_target, f"add@mid_block=file:{tmp_path / 'v.npy'}")
    with pytest.raises(SpecError, match="does not fit the layer's"):
        _bind(sd_target, "add@mid_block=random:0;box=0:9,0:1")
    np.save(tmp_path / "m.npy", np.ones((3, 3), np.float32))
    with pytest.raises(SpecError, match="the mask has shape"):
        _bind(sd_target, f"add@mid_block=random:0;mask={tmp_path / 'm.npy'}")
    with pytest.raises(SpecError, match="outside the schedule"):
        _bind(sd_target, "add@mid_block=random:0;steps=2:4")
    with pytest.raises(SpecError, match="outside the training schedule"):
        _bind(sd_target, "add@mid_block=random:0;t=0:1000")
    with pytest.raises(SpecError, match="no sampler step has t"):
        _bind(sd_target, "add@mid_block=random:0;t=2:3")
    with pytest.raises(SpecError, match="unknown edit kind 'amplify'"):
        parse_edits("amplify@mid_block=random:0")
    with pytest.raises(SpecError, match="unknown direction source"):
        _bind(sd_target, "add@mid_block=nowhere:0")
    with pytest.raises(SpecError, match="unknown edit option"):
        parse_edits("add@mid_block=random:0;when=3")
    from diffdissect.errors import LayerNotFoundError

    with pytest.raises(LayerNotFoundError):
        _bind(sd_target, "add@mid_blok=random:0")


def test_an_sae_of_another_layer_or_width_is_refused(sd_target, tmp_path: Path) -> None:
    from diffdissect.sae.foreign import export_saelens, export_sparsify

    shapes = layer_shapes(sd_target, ["mid_block", "up_blocks.0"])
    c = shapes["mid_block"][0]
    export_sparsify(_sae(d=c, n=2 * c, k=2), tmp_path / "sp", "unet.up_blocks.0")
    with pytest.raises(SpecError, match="trained on layer 'up_blocks.0'"):
        _bind(sd_target, f"sae-zero@mid_block={tmp_path / 'sp' / 'unet.up_blocks.0'}#1")
    export_saelens(_sae(d=c + 1, n=8, k=2), tmp_path / "sl", hook_name="unet.mid_block")
    with pytest.raises(SpecError, match="width"):
        _bind(sd_target, f"sae-zero@mid_block={tmp_path / 'sl'}#1")
    export_saelens(_sae(d=c, n=8, k=2), tmp_path / "ok", hook_name="unet.mid_block")
    with pytest.raises(SpecError, match="out of range"):
        _bind(sd_target, f"sae-zero@mid_block={tmp_path / 'ok'}#8")


@pytest.fixture(scope="module")
def sd_store_and_sae(sd_target, image_folder: Path, tmp_path_factory):
    """A store captured from the tiny SD pipeline (mid_block, pooled) and a small SAE trained on it."""
    from diffdissect.capture import capture
    from diffdissect.capture.spec import CaptureConfig
    from diffdissect.data import FolderSource
    from diffdissect.sae.train import TrainConfig, train_sae

    root = tmp_path_factory.mktemp("sae17")
    capture(
        sd_target,
        FolderSource(image_folder),
        CaptureConfig(layers=["mid_block"], timesteps=[100], batch_size=8),
        root / "store",
        progress=False,
    )
    train_sae(
        root / "store",
        TrainConfig(layer="mid_block", t=100, k=2, n_latents=8, batch_size=4, steps=2, heldout_fraction=0.25),
        root / "sae",
        progress=False,
    )
    return root / "store", root / "sae"


def _bind_with(target, text: str, identity, steps: int = 4):
    from diffdissect.intervene.apply import sampling_schedule

    (spec,) = parse_edits(text)
    shapes = layer_shapes(target, [spec.layer])
    return bind_edit(spec, shapes[spec.layer], sampling_schedule(target, steps), target.num_train_timesteps, identity)


def test_an_sae_is_checked_against_the_model_dtype_aware(sd_target, sd_dir: Path, sd_store_and_sae, recwarn) -> None:
    """The same weights loaded in float16 are accepted (with a warning: content not comparable exactly);
    another model is refused, in the same dtype by content and across dtypes by config."""
    import warnings

    from diffdissect.models import load_target

    store, sae = sd_store_and_sae
    text = f"sae-zero@mid_block={sae}#1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bind_with(sd_target, text, sd_target.identity())  # same model, same dtype: silent
    half = load_target(str(sd_dir), dtype=torch.float16).identity()
    assert half["content_sha256"] != sd_target.identity()["content_sha256"]  # the digest depends on the dtype
    with pytest.warns(UserWarning, match="could not be compared exactly"):
        _bind_with(sd_target, text, half)
    other = load_target(str(sd_dir), random_init=True, seed=1).identity()
    with pytest.raises(SpecError, match="another model"):
        _bind_with(sd_target, text, other)
    with pytest.raises(SpecError, match="another model"):  # across dtypes: the config differs
        _bind_with(sd_target, text, dict(half, config_sha256="0" * 16))


def test_an_sae_without_a_recorded_model_is_checked_through_its_store(
    sd_target, sd_dir: Path, sd_store_and_sae, tmp_path: Path
) -> None:
    """Older SAEs: the store path is found relative to the SAE, trusted only if it holds the SAE's store."""
    import shutil

    from diffdissect.models import load_target
    from diffdissect.sae.checkpoint import load_sae, save_checkpoint

    store, sae_dir = sd_store_and_sae
    shutil.copytree(store, tmp_path / "store")
    sae, info = load_sae(sae_dir)
    info = dict(info, slice={k: v for k, v in info["slice"].items() if k != "model"} | {"store": "store"})
    save_checkpoint(tmp_path / "old", sae, info)  # "store": relative to the SAE's parent
    text = f"sae-zero@mid_block={tmp_path / 'old'}#1"
    other = load_target(str(sd_dir), random_init=True, seed=1).identity()
    with pytest.raises(SpecError, match="another model"):
        _bind_with(sd_target, text, other)
    _bind_with(sd_target, text, sd_target.identity())
    info["slice"]["store_identity"] = dict(info["slice"]["store_identity"], rows=-1)  # another capture there now
    save_checkpoint(tmp_path / "moved", sae, info)
    with pytest.warns(UserWarning, match="could not be checked"):
        _bind_with(sd_target, f"sae-zero@mid_block={tmp_path / 'moved'}#1", other)
    (tmp_path / "store" / "manifest.json").write_text("{")  # a corrupt manifest is not skipped
    with pytest.raises(DiffdissectError, match="corrupt|unreadable"):
        _bind_with(sd_target, text, other)


def test_mean_directions_and_probe_sources_are_checked_against_the_model(
    sd_target, sd_dir: Path, sd_store_and_sae, tmp_path: Path
) -> None:
    import shutil

    from diffdissect.models import load_target

    store, _ = sd_store_and_sae
    other = load_target(str(sd_dir), random_init=True, seed=1).identity()
    half = load_target(str(sd_dir), dtype=torch.float16).identity()
    _bind_with(sd_target, f"mean@mid_block=mean:{store}", sd_target.identity())
    with pytest.warns(UserWarning, match="could not be compared exactly"):
        _bind_with(sd_target, f"mean@mid_block=mean:{store}", half)
    with pytest.raises(SpecError, match="store was captured from another model"):
        _bind_with(sd_target, f"mean@mid_block=mean:{store}", other)

    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    shutil.copytree(store, run / "trajectories")  # the run's own store
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["red"]}))
    save_file({"t=100": torch.ones(1, c)}, str(run / "directions" / "mid_block.safetensors"))
    _bind_with(sd_target, f"add@mid_block=directions:{run}#red@t=100", sd_target.identity())
    with pytest.raises(SpecError, match="directions were computed from another model"):
        _bind_with(sd_target, f"add@mid_block=directions:{run}#red@t=100", other)

    probe = tmp_path / "probe"
    probe.mkdir()
    save_file({"cell0": torch.eye(c)[:2].contiguous()}, str(probe / "probe_weights.safetensors"))
    (probe / "probe_weights.json").write_text(
        json.dumps(
            {
                "model": sd_target.identity(),
                "cells": [
                    {"label": "colour", "layer": "mid_block", "t": 100, "key": "cell0", "classes": ["blue", "red"]}
                ],
            }
        )
    )
    _bind_with(sd_target, f"add@mid_block=probe:{probe}#colour=red", sd_target.identity())
    with pytest.raises(SpecError, match="probes were trained on activations of another model"):
        _bind_with(sd_target, f"add@mid_block=probe:{probe}#colour=red", other)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_non_finite_or_zero_directions_are_refused_at_bind_time(sd_target, tmp_path: Path, bad: float) -> None:
    """Every source kind that reads numbers from a file: refused before any sampling."""
    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    vector = np.ones(c, np.float32)
    vector[:] = 0.0 if bad == 0.0 else 1.0
    vector[0] = bad
    np.save(tmp_path / "v.npy", vector)
    save_file({"v": torch.from_numpy(vector)}, str(tmp_path / "v.safetensors"))
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["red"]}))
    save_file({"t=100": torch.from_numpy(vector)[None]}, str(run / "directions" / "mid_block.safetensors"))
    probe = tmp_path / "probe"
    probe.mkdir()
    rows = torch.zeros(2, c)
    rows[1] = torch.from_numpy(vector)
    save_file({"cell0": rows}, str(probe / "probe_weights.safetensors"))
    (probe / "probe_weights.json").write_text(
        json.dumps(
            {"cells": [{"label": "colour", "layer": "mid_block", "t": 100, "key": "cell0", "classes": ["blue", "red"]}]}
        )
    )
    what = "non-finite" if bad != 0.0 else "is zero"
    for source in (
        f"file:{tmp_path / 'v.npy'}",
        f"file:{tmp_path / 'v.safetensors'}",
        f"directions:{run}#red@t=100",
        f"probe:{probe}#colour=red",
    ):
        for kind in ("add", "erase") + (("mean",) if bad != 0.0 else ()):
            for scale in (";scale=raw", "") if kind == "add" else ("",):
                with pytest.raises(SpecError, match=what):
                    _bind(sd_target, f"{kind}@mid_block={source}{scale}")


def test_a_per_t_direction_must_cover_the_schedule_at_bind_time(sd_target, tmp_path: Path) -> None:
    """A word direction made with other steps is refused before sampling, naming the fix; @t=N or a window
    that only visits its steps is accepted."""
    from diffdissect.intervene.apply import sampling_schedule

    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    schedule = sampling_schedule(sd_target, 4)
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["red"]}))
    held = schedule[:2]  # the directions run saw 2 of 4 steps
    save_file({f"t={t}": torch.ones(1, c) for t in held}, str(run / "directions" / "mid_block.safetensors"))
    with pytest.raises(SpecError, match=r"same --steps.*@t=N"):
        _bind(sd_target, f"add@mid_block=directions:{run}#red")
    with pytest.raises(SpecError, match="same --steps"):
        _bind(sd_target, f"add@mid_block=directions:{run}#red@pool")
    _bind(sd_target, f"add@mid_block=directions:{run}#red@t={held[0]}")
    _bind(sd_target, f"add@mid_block=directions:{run}#red;steps=0:1")


def test_steer_refuses_an_uncovered_direction_before_sampling(
    sd_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from diffdissect.cli import main
    from diffdissect.intervene import steer

    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["red"]}))
    from diffdissect.models import load_target

    c = layer_shapes(load_target(str(sd_dir)), ["mid_block"])["mid_block"][0]
    save_file({"t=1": torch.ones(1, c)}, str(run / "directions" / "mid_block.safetensors"))
    sampled = []
    monkeypatch.setattr(steer, "_sample_all", lambda *a, **k: sampled.append(1))
    code = main(
        [
            "steer",
            "--model",
            str(sd_dir),
            "--prompts",
            "a red cat",
            "--edits",
            f"add@mid_block=directions:{run}#red",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and not sampled
    err = capsys.readouterr().err
    assert err.startswith("diffdissect: error:") and "same --steps" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_input_is_a_clear_error(sd_dir: Path, tmp_path: Path, capsys) -> None:
    from diffdissect.cli import main

    np.save(tmp_path / "v.npy", np.ones(5, np.float32))
    code = main(
        [
            "steer",
            "--model",
            str(sd_dir),
            "--prompts",
            "a red cat",
            "--edits",
            f"add@mid_block=file:{tmp_path / 'v.npy'}",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffdissect: error:") and "must have width" in err
    assert not (tmp_path / "o").exists()  # nothing written before every check passed
    code = main(
        [
            "steer",
            "--model",
            str(sd_dir),
            "--prompts",
            "a red cat",
            "--edits",
            "boost@mid_block=random:0",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "unknown edit kind" in capsys.readouterr().err


def test_fit_to_layer_accepts_a_vector_or_a_whole_map() -> None:
    assert fit_to_layer("d", torch.ones(4), "x", (4, 2, 3)).shape == (4,)
    assert fit_to_layer("d", torch.ones(24), "x", (4, 2, 3)).shape == (6, 4)
    with pytest.raises(DiffdissectError):
        fit_to_layer("d", torch.ones(7), "x", (4, 2, 3))


def test_direction_sources_read_their_layouts(tmp_path: Path) -> None:
    """directions:, probe:, sae:, file: and random: give the vector the files hold, fitted to the layer."""
    from diffdissect.intervene.sources import load_direction

    shape = (4, 2, 3)  # (C, H, W): width 4, 6 locations
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["blue", "red"]}))
    maps = {f"t={t}": torch.arange(2 * 24, dtype=torch.float32).reshape(2, 24) + t for t in (100, 900)}
    save_file(maps, str(run / "directions" / "mid_block.safetensors"))
    d = load_direction(f"directions:{run}#red", "mid_block", shape)
    assert d.timesteps() == [100, 900]
    assert torch.equal(d.at(900), map_to_locations(maps["t=900"][1], shape))
    pinned = load_direction(f"directions:{run}#red@t=100", "mid_block", shape)
    assert torch.equal(pinned.at(5), map_to_locations(maps["t=100"][1], shape))
    pooled = load_direction(f"directions:{run}#red@pool", "mid_block", shape)
    assert torch.allclose(pooled.at(100), map_to_locations(maps["t=100"][1], shape).mean(0))
    with pytest.raises(SpecError, match="not among the run's terms"):
        load_direction(f"directions:{run}#green", "mid_block", shape)
    with pytest.raises(SpecError, match="no directions for layer"):
        load_direction(f"directions:{run}#red", "up_blocks.0", shape)

    probe = tmp_path / "probe"
    probe.mkdir()
    save_file({"colour/mid_block/t=100": torch.eye(4)[:3].contiguous()}, str(probe / "probe_weights.safetensors"))
    (probe / "probe_weights.json").write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "label": "colour",
                        "layer": "mid_block",
                        "t": 100,
                        "key": "colour/mid_block/t=100",
                        "classes": ["blue", "green", "red"],
                    }
                ]
            }
        )
    )
    p = load_direction(f"probe:{probe}#colour=red", "mid_block", shape)
    assert torch.allclose(p.at(0), torch.eye(4)[2] - torch.eye(4)[:3].mean(0))
    with pytest.raises(SpecError, match="not a class"):
        load_direction(f"probe:{probe}#colour=pink", "mid_block", shape)

    save_file({"a": torch.ones(4), "b": torch.zeros(24)}, str(tmp_path / "v.safetensors"))
    assert load_direction(f"file:{tmp_path / 'v.safetensors'}#a", "mid_block", shape).at(0).shape == (4,)
    assert load_direction(f"{tmp_path / 'v.safetensors'}#b", "mid_block", shape).at(0).shape == (6, 4)
    with pytest.raises(SpecError, match="pick one with #KEY"):
        load_direction(f"file:{tmp_path / 'v.safetensors'}", "mid_block", shape)
    r1 = load_direction("random:3", "mid_block", shape).at(0)
    assert torch.equal(r1, load_direction("random:3", "mid_block", shape).at(0)) and r1.shape == (4,)
    assert load_direction("random:3#map", "mid_block", shape).at(0).shape == (6, 4)

    from diffdissect.sae.foreign import export_saelens

    sae = _sae(d=4, n=8, k=2)
    export_saelens(sae, tmp_path / "sl", hook_name="unet.mid_block")
    row = load_direction(f"sae:{tmp_path / 'sl'}#5", "mid_block", shape).at(0)
    assert torch.allclose(row, sae.W_dec.detach()[5], atol=1e-6)


def test_causal_columns_measure_turning_a_latent_up_and_ablating_it(sd_target, tmp_path: Path) -> None:
    from diffdissect.intervene import Judge
    from diffdissect.intervene.causal import CausalConfig, causal_effects, top_latents
    from diffdissect.sae.browser import _causal_cells
    from diffdissect.sae.foreign import export_sparsify

    class Bright:
        name = "bright"

        def caption(self, images):
            return ["a red cat" if im.mean() > 127 else "a blue cat" for im in images]

    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    sae = _sae(d=c, n=4 * c, k=2)
    with torch.no_grad():
        sae.b_enc[5] = -1e6  # latent 5 never fires: ablating it changes nothing
    export_sparsify(sae, tmp_path / "s", "unet.mid_block")
    features = {
        "best_latent_per_value": {"colour": {"red": {"latent": 5, "auroc": 0.9}, "blue": {"latent": 7, "auroc": 0.95}}}
    }
    assert top_latents(features, 8) == [7, 5] and top_latents(features, 1) == [7]
    judge = Judge(Bright(), {"colour": ["red", "blue"], "animal": ["cat"]})
    config = CausalConfig(prompts=["a red cat"], seeds=[0, 1], alpha=50.0, steps=3, guidance=1.0)
    table = causal_effects(
        sd_target, tmp_path / "s" / "unet.mid_block", "mid_block", [5], judge, config, tmp_path / "c"
    )
    assert table[5]["ablate"]["colour"]["changed"] == 0.0 and table[5]["ablate"]["colour"]["n"] == 2
    assert set(table[5]["up"]) == {"colour", "animal"}
    cells = _causal_cells(table[5])
    assert cells["ablate"] == "no change"


def test_add_with_raw_scale_adds_alpha_times_the_stored_direction() -> None:
    h = torch.randn(1, 3, 2)
    d = torch.tensor([3.0, 4.0])
    raw = AddEdit("x", Direction("d", vector=d), raw=True).apply(h, Context(0, 0, alpha=0.5, scale=100.0))
    assert torch.allclose(raw, h + 0.5 * d)
    spec = parse_edits("add@mid_block=random:0;scale=raw")[0]
    assert spec.options == {"scale": "raw"}
    with pytest.raises(SpecError, match="scale=raw"):
        bind_edit(parse_edits("erase@m=random:0;scale=raw")[0], (2, 2, 2), None, 1000)


def test_the_edits_create_no_tensor_off_the_activations_device() -> None:
    """The hot path of every edit (what runs inside the denoiser) under the device guard of test_devices."""
    from test_devices import DeviceGuard

    sae = _sae(d=4, n=16, k=2)
    h = torch.randn(2, 6, 4)
    edits = [
        AddEdit("x", Direction("d", vector=torch.ones(4)), Window(mask=torch.ones(6))),
        EraseEdit("x", [Direction("d", vector=torch.ones(6, 4))]),
        SAEEdit("x", sae, [1, 2], "scale", value=2.0),
        SAEEdit("x", sae, [3], "set"),
        MeanEdit("x", Direction("m", by_t={7: torch.zeros(4)})),
    ]
    with DeviceGuard() as guard:
        for edit in edits:
            edit.apply(h, Context(step=0, t=7, alpha=1.0, scale=2.0))
    assert guard.offences == []


# ---- the families of issue 16: joint blocks (image / @text stream), flow matching ----------------------------------
@pytest.fixture(scope="module")
def family_targets(tmp_path_factory):
    from diffdissect.models import load_target
    from diffdissect.models.tiny_families import FAMILY_BUILDERS

    root = tmp_path_factory.mktemp("families17")
    out = {}
    for name in FAMILY_BUILDERS:
        FAMILY_BUILDERS[name](0).save_pretrained(root / name)
        out[name] = load_target(root / name, resolution=32 if name == "flux" else None)
    return out


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_steer_on_joint_block_families(family_targets, name, tmp_path: Path) -> None:
    target = family_targets[name]
    block = "transformer_blocks.0"
    shapes = layer_shapes(target, [block, f"{block}@text"])
    assert shapes[block] != shapes[f"{block}@text"]  # image tokens vs text tokens
    config = SteerConfig(
        prompts=["a red cat"],
        seeds=[0, 1],
        alphas=[0.0, 3.0],
        steps=3,
        guidance=2.0,
        edits=[f"add@{block}=random:0", f"add@{block}@text=random:1", f"add@{block}=random:0;steps=2:2"],
    )
    result = run_steer(target, config, tmp_path / "out")
    by = {(e.edit, e.alpha): e for e in result.effects}
    for edit in config.edits:
        assert by[(edit, 0.0)].identical == 2
        assert by[(edit, 3.0)].identical == 0, edit
    assert len(result.schedule) == 3 and all(isinstance(t, int) and 0 <= t < 1000 for t in result.schedule)
    assert set(result.calibration) == {block, f"{block}@text"}


def test_flow_steps_outside_the_schedule_and_input_edits_are_refused(family_targets, tmp_path: Path) -> None:
    target = family_targets["sd3"]
    config = SteerConfig(
        prompts=["a red cat"],
        seeds=[0],
        alphas=[1.0],
        steps=3,
        guidance=1.0,
        edits=["add@transformer_blocks.0=random:0;steps=0:3"],
    )
    with pytest.raises(SpecError, match="outside the schedule of 3 steps"):
        run_steer(target, config, tmp_path / "a")
    config.edits = ["add@transformer_blocks.0@update=random:0"]
    with pytest.raises(SpecError, match="edits act on a module's output"):
        run_steer(target, config, tmp_path / "b")


@pytest.mark.parametrize(
    ("name", "layer"), [("sdxl", "mid_block"), ("pixart", "transformer_blocks.0"), ("sana", "transformer_blocks.0")]
)
def test_steer_on_the_other_families(family_targets, name, layer, tmp_path: Path) -> None:
    target = family_targets[name]
    config = SteerConfig(
        prompts=["a red cat"], seeds=[0, 1], alphas=[0.0, 3.0], steps=3, guidance=2.0, edits=[f"add@{layer}=random:0"]
    )
    result = run_steer(target, config, tmp_path / "out")
    assert [e.identical for e in result.effects] == [2, 0]
    config.edits = [f"add@{layer}@text=random:0"]
    with pytest.raises(SpecError, match="no text stream"):
        run_steer(target, config, tmp_path / "text")


def test_a_steer_rerun_with_fewer_edits_leaves_only_its_own_outputs(sd_target, tmp_path: Path) -> None:
    c = layer_shapes(sd_target, ["mid_block"])["mid_block"][0]
    vec = tmp_path / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=c).astype(np.float32))
    out = tmp_path / "out"
    edits = [f"add@mid_block=file:{vec}", f"erase@mid_block=file:{vec}"]
    config = SteerConfig(prompts=["a red cat"], seeds=[0], alphas=[1.0, 2.0], steps=2, guidance=2.0, edits=edits)
    run_steer(sd_target, config, out)
    assert (out / "grids" / "e1.png").is_file() and (out / "images" / "e1" / "a-" / "p0-s0.png").is_file()
    (out / "notes.txt").write_text("mine")  # not steer's: kept
    (out / "images" / "e1" / "mine.txt").write_text("mine")
    config = SteerConfig(prompts=["a red cat"], seeds=[0], alphas=[1.0], steps=2, guidance=2.0, edits=edits[:1])
    run_steer(sd_target, config, out)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["e0.png"]
    assert sorted(p.name for p in (out / "images" / "e0").iterdir()) == ["a1"]
    assert sorted(p.name for p in (out / "images" / "e1").iterdir()) == ["mine.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "e1" / "mine.txt").read_text() == "mine"


def test_the_default_workflow_directions_then_steer_per_t_is_accepted(
    sd_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A directions run at its default --steps, then steer with its per-t direction and no --steps."""
    from diffdissect.cli import main
    from diffdissect.directions.run import DirectionsConfig
    from diffdissect.intervene import steer
    from diffdissect.intervene.apply import sampling_schedule
    from diffdissect.models import load_target

    assert SteerConfig().steps == DirectionsConfig.steps
    target = load_target(str(sd_dir))
    c = layer_shapes(target, ["mid_block"])["mid_block"][0]
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    (run / "directions" / "terms.json").write_text(json.dumps({"terms": ["red"]}))
    held = sampling_schedule(target, DirectionsConfig.steps)  # every step of a default directions run
    save_file({f"t={t}": torch.ones(1, c) for t in held}, str(run / "directions" / "mid_block.safetensors"))

    class Reached(Exception):
        pass

    def sample_all(*a, **k):
        raise Reached

    monkeypatch.setattr(steer, "_sample_all", sample_all)
    args = ["steer", "--model", str(sd_dir), "--prompts", "a red cat", "--edits", f"add@mid_block=directions:{run}#red"]
    with pytest.raises(Reached):
        main([*args, "--out", str(tmp_path / "o")])
