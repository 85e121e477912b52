"""Capture: stored activations equal what a plain torch forward hook sees on the same noised input.

The reference path in these tests is written out by hand: images are resized/cropped and encoded
(`target.encode_images`), noised with `noise_for` + `scheduler.add_noise` at the training index t, the
denoiser is called directly (kind-specific conditioning built here, SD prompts via the pipeline's own
`encode_prompt`), and a forward hook registered by the test reads the module output.
"""

from __future__ import annotations

import csv
import filecmp
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    IMAGE_CAPTIONS,
    IMAGE_LABELS,
    TINY_FACTORY,
    folder_images,
    hook_outputs,
    noised_inputs,
    random_image,
)
from diffdissect import load_target, open_store
from diffdissect.capture import CaptureConfig, TrajectoryConfig, capture, capture_trajectories
from diffdissect.cli import main
from diffdissect.data import ArraySource, FolderSource, HFDatasetSource
from diffdissect.data.transforms import to_model_pixels
from diffdissect.errors import SpecError
from diffdissect.models.noising import denoiser_target, noise_for, x0_error_weights

N = 4  # images per capture (the first four of the image folder)


# ---- helpers -----------------------------------------------------------------------------------------------
def model_path(kind, sd_dir, dit_dir, unet2d_dir):
    return {"sd": sd_dir, "dit": dit_dir, "unet2d": unet2d_dir, "module": TINY_FACTORY}[kind]


def denoiser_call(target, x_t, steps, prompts=None, classes=None):
    """A direct call of the denoiser with the conditioning a capture should use, built independently."""
    model, n = target.denoiser, x_t.shape[0]
    if target.kind == "text_unet":
        emb = target.pipeline.encode_prompt(prompts or [""] * n, "cpu", 1, False)[0]
        return lambda: model(x_t, steps, encoder_hidden_states=emb)
    if target.kind == "dit":
        labels = torch.tensor(classes if classes is not None else [1000] * n)
        return lambda: model(x_t, timestep=steps, class_labels=labels)
    return lambda: model(x_t, steps)


def reference(
    target, images, ids, layers, t, seed, prompts=None, classes=None, batch_size: int | None = None
) -> dict[str, torch.Tensor]:
    """{layer: float32 output} from plain forward hooks, one denoiser call per batch of `batch_size`
    (the capture's batching, so that float rounding matches bit for bit)."""
    x_t, steps = noised_inputs(target, images, ids, seed, t, batch_size)
    step = batch_size or len(images)
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in range(0, len(images), step):
        sl = slice(b, b + step)
        call = denoiser_call(
            target, x_t[sl], steps[sl], prompts[sl] if prompts else None, classes[sl] if classes else None
        )
        for layer, value in hook_outputs(target.denoiser, layers, call).items():
            if isinstance(value, tuple):  # down blocks: (hidden_states, residuals)
                value = value[0]
            assert isinstance(value, torch.Tensor) and value.abs().sum() > 0
            parts[layer].append(value.float())
    return {layer: torch.cat(values) for layer, values in parts.items()}


def stored(out, layer, t, n_seeds=1) -> torch.Tensor:
    """(inputs, seeds, *shape) view of a (layer, t) slice (rows are (input, seed) pairs, seeds inner)."""
    data = open_store(out).load(layer, t, format="torch")
    return data.reshape(data.shape[0] // n_seeds, n_seeds, *data.shape[1:])


def run(target, source, out, **spec) -> Path:
    spec.setdefault("batch_size", 8)
    capture(target, source, CaptureConfig(**spec), out, progress=False)
    return out


def shard_files(store: Path) -> list[Path]:
    return sorted((store / "shards").glob("*.safetensors"))


# ---- the core check: store == plain forward hook, for every kind of target ----------------------------------
CASES = {
    "sd": ["down_blocks.0", "mid_block", "up_blocks.1"],
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
    "unet2d": ["down_blocks.0", "mid_block", "up_blocks.0"],
    "module": ["blocks.0", "mid"],
}


@pytest.mark.parametrize("kind", list(CASES))
def test_stored_tensor_equals_plain_forward_hook(kind, tmp_path, sd_dir, dit_dir, unet2d_dir, image_folder, image_csv):
    target = load_target(model_path(kind, sd_dir, dit_dir, unet2d_dir))
    layers, timesteps, seeds = CASES[kind], [25, 600], [0, 1]
    out = run(
        target,
        FolderSource(image_folder, image_csv),
        tmp_path / "store",
        layers=layers,
        timesteps=timesteps,
        seeds=seeds,
        pooling="none",
        batch_size=N,
        limit=N,
    )
    ids, images = folder_images(image_folder, N)
    reader = open_store(out)
    assert reader.num_rows == N * len(seeds) and reader.layers == layers and reader.timesteps == timesteps
    for t in timesteps:
        for s, seed in enumerate(seeds):
            ref = reference(target, images, ids, layers, t, seed)
            for layer in layers:
                got = stored(out, layer, t, len(seeds))[:, s]
                assert got.dtype == torch.float16
                assert got.shape == ref[layer].shape, layer
                assert reader.shape(layer) == tuple(ref[layer].shape[1:])
                assert torch.equal(got, ref[layer].to(torch.float16)), f"{kind} {layer} t={t} seed={seed}"
    rows = reader.rows()
    assert [r["input_id"] for r in rows] == [i for i in ids for _ in seeds]
    assert [r["seed"] for r in rows] == seeds * N
    assert [r["label"] for r in rows] == [lab for lab in IMAGE_LABELS[:N] for _ in seeds]
    assert [r["caption"] for r in rows] == [c for c in IMAGE_CAPTIONS[:N] for _ in seeds]


def test_tuple_output_stores_the_hidden_states(tmp_path, sd_dir, image_folder):
    target = load_target(sd_dir)
    ids, images = folder_images(image_folder, 2)
    x_t, steps = noised_inputs(target, images, ids, 0, 300)
    raw = hook_outputs(target.denoiser, ["down_blocks.0"], denoiser_call(target, x_t, steps))["down_blocks.0"]
    assert isinstance(raw, tuple) and isinstance(raw[1], tuple)  # (hidden_states, residuals)
    out = run(
        target,
        FolderSource(image_folder),
        tmp_path / "s",
        layers=["down_blocks.0"],
        timesteps=[300],
        pooling="none",
        dtype="float32",
        limit=2,
    )
    got = stored(out, "down_blocks.0", 300)[:, 0]
    assert got.shape == (2, 16, 4, 4)
    assert torch.equal(got, raw[0])
    assert not torch.equal(got, raw[1][0])  # not the first residual (same shape family, other values)


# ---- one forward pass per batch, early exit ------------------------------------------------------------------
def _count_calls(target):
    """Batch sizes of every denoiser call (a pre-hook fires even when the pass is cut short)."""
    sizes: list[int] = []
    handle = target.denoiser.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def _count_fires(target, paths):
    counts = {p: 0 for p in paths}
    modules = dict(target.denoiser.named_modules())

    def hook(path):
        def fire(module, args, output):
            if output_batch(output) == 2:
                counts[path] += 1

        return fire

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    return counts, handles


def output_batch(output) -> int:
    return (output[0] if isinstance(output, tuple) else output).shape[0]


def test_all_layers_in_one_forward_pass_per_batch(tmp_path, unet2d_dir, image_folder):
    target = load_target(unet2d_dir)
    layers = ["up_blocks.0", "conv_in", "mid_block"]
    sizes, handle = _count_calls(target)
    fires, handles = _count_fires(target, layers)
    try:
        out = run(
            target,
            FolderSource(image_folder),
            tmp_path / "s",
            layers=layers,
            timesteps=[10, 500],
            seeds=[0],
            batch_size=2,
            limit=4,
        )
    finally:
        for h in [handle, *handles]:
            h.remove()
    # 4 images in batches of 2, at 2 timesteps, 1 seed: 4 forward passes; at most one extra single-sample
    # dry pass (shape probe) besides
    assert sizes.count(2) == 4
    assert len(sizes) - sizes.count(2) <= 1 and all(s in (1, 2) for s in sizes)
    assert fires == {p: 4 for p in layers}
    assert open_store(out).num_rows == 4


@pytest.mark.parametrize("layers", [["down_blocks.0"], ["down_blocks.1", "conv_in"]])
def test_early_exit_skips_the_rest_of_the_network(layers, tmp_path, unet2d_dir, image_folder):
    target = load_target(unet2d_dir)
    later = ["mid_block", "up_blocks.0", "up_blocks.1", "conv_out"]
    fires_on, handles = _count_fires(target, later)
    try:
        early = run(
            target,
            FolderSource(image_folder),
            tmp_path / "early",
            layers=layers,
            timesteps=[100],
            batch_size=2,
            limit=4,
        )
    finally:
        for h in handles:
            h.remove()
    assert fires_on == {p: 0 for p in later}

    # the same capture without early exit runs the whole network and stores the same bytes
    fires_off, handles = _count_fires(target, later)
    try:
        full = run(
            target,
            FolderSource(image_folder),
            tmp_path / "full",
            layers=layers,
            timesteps=[100],
            batch_size=2,
            limit=4,
            early_exit=False,
        )
    finally:
        for h in handles:
            h.remove()
    assert fires_off == {p: 2 for p in later}
    assert [p.name for p in shard_files(early)] == [p.name for p in shard_files(full)]
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(shard_files(early), shard_files(full)))


# ---- transformer tokens, pooling, dtypes ----------------------------------------------------------------------
def test_dit_tokens_to_grid_and_pooling(tmp_path, dit_dir, image_folder):
    target = load_target(dit_dir)
    layer, t = "transformer_blocks.1", 250
    ids, images = folder_images(image_folder, 3)
    tokens = reference(target, images, ids, [layer], t, 0)[layer]  # (B, N=16, D=16)
    assert tokens.shape == (3, 16, 16)
    grid = tokens.transpose(1, 2).reshape(3, 16, 4, 4)  # (B, D, h, w)
    source = FolderSource(image_folder)
    common = dict(layers=[layer], timesteps=[t], limit=3, dtype="float32")
    cases = {
        ("none", True): grid,
        ("none", False): tokens,
        ("mean", True): grid.mean(dim=(2, 3)),
        ("mean", False): tokens.mean(dim=1),
    }
    for (pooling, to_grid), expected in cases.items():
        out = run(target, source, tmp_path / f"{pooling}-{to_grid}", pooling=pooling, tokens_to_grid=to_grid, **common)
        got = stored(out, layer, t)[:, 0]
        assert tuple(open_store(out).manifest.layers[layer]["shape"]) == tuple(expected.shape[1:])
        assert torch.equal(got, expected), (pooling, to_grid)
    # the grid is (D, h, w): channel d of the grid is token feature d laid out row-major over the patches
    got = stored(tmp_path / "none-True", layer, t)[:, 0]
    assert torch.equal(got[1, 5].flatten(), tokens[1, :, 5])


def test_pooling_mean_vs_none(tmp_path, unet2d_dir, image_folder):
    target = load_target(unet2d_dir)
    ids, images = folder_images(image_folder, N)
    ref = reference(target, images, ids, ["mid_block"], 400, 0)["mid_block"]
    source = FolderSource(image_folder)
    none = run(target, source, tmp_path / "none", layers=["mid_block"], timesteps=[400], pooling="none", limit=N)
    mean = run(target, source, tmp_path / "mean", layers=["mid_block"], timesteps=[400], pooling="mean", limit=N)
    assert open_store(none).shape("mid_block") == (32, 8, 8)
    assert open_store(mean).shape("mid_block") == (32,)
    assert torch.equal(stored(none, "mid_block", 400)[:, 0], ref.half())
    assert torch.equal(stored(mean, "mid_block", 400)[:, 0], ref.mean(dim=(2, 3)).half())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_stored_dtypes(dtype, tmp_path, image_folder):
    target = load_target(TINY_FACTORY)
    ids, images = folder_images(image_folder, N)
    ref = reference(target, images, ids, ["blocks.1"], 700, 3)["blocks.1"]
    out = run(
        target,
        FolderSource(image_folder),
        tmp_path / "s",
        layers=["blocks.1"],
        timesteps=[700],
        seeds=[3],
        pooling="none",
        dtype=dtype,
        limit=N,
    )
    reader = open_store(out)
    assert reader.manifest.dtype == dtype and reader.manifest.layers["blocks.1"]["dtype"] == dtype
    got = stored(out, "blocks.1", 700)[:, 0]
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got, ref.to(getattr(torch, dtype)))
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    assert shard_files(out)[0].stat().st_size >= N * 16 * 16 * 16 * itemsize
    numpy_batch = reader.load("blocks.1", 700, format="numpy")
    assert numpy_batch.shape == (N, 16, 16, 16)
    np.testing.assert_array_equal(numpy_batch, got.float().numpy())


# ---- conditioning -----------------------------------------------------------------------------------------------
def test_sd_fixed_prompt_vs_empty_prompt(tmp_path, sd_dir, image_folder):
    target = load_target(sd_dir)
    ids, images = folder_images(image_folder, N)
    source = FolderSource(image_folder)
    empty = run(target, source, tmp_path / "empty", layers=["mid_block"], timesteps=[300], pooling="none", limit=N)
    fixed = run(
        target,
        source,
        tmp_path / "fixed",
        layers=["mid_block"],
        timesteps=[300],
        pooling="none",
        limit=N,
        prompt="a red cat",
    )
    a, b = stored(empty, "mid_block", 300)[:, 0], stored(fixed, "mid_block", 300)[:, 0]
    assert all(not torch.equal(a[i], b[i]) for i in range(N))
    ref = reference(target, images, ids, ["mid_block"], 300, 0, prompts=["a red cat"] * N)["mid_block"]
    assert torch.equal(b, ref.half())
    ref_empty = reference(target, images, ids, ["mid_block"], 300, 0, prompts=[""] * N)["mid_block"]
    assert torch.equal(a, ref_empty.half())


def test_sd_per_image_captions(tmp_path, sd_dir, image_folder, image_csv):
    target = load_target(sd_dir)
    ids, images = folder_images(image_folder, N)
    source = FolderSource(image_folder, image_csv)
    captions = run(
        target,
        source,
        tmp_path / "captions",
        layers=["mid_block"],
        timesteps=[300],
        pooling="none",
        limit=N,
        use_captions=True,
    )
    first = run(
        target,
        source,
        tmp_path / "first",
        layers=["mid_block"],
        timesteps=[300],
        pooling="none",
        limit=N,
        prompt=IMAGE_CAPTIONS[0],
    )
    a, b = stored(captions, "mid_block", 300)[:, 0], stored(first, "mid_block", 300)[:, 0]
    # image 0's caption is the fixed prompt: same activations; the others have other captions
    assert torch.equal(a[0], b[0])
    assert all(not torch.equal(a[i], b[i]) for i in range(1, N))
    ref = reference(target, images, ids, ["mid_block"], 300, 0, prompts=IMAGE_CAPTIONS[:N])["mid_block"]
    assert torch.equal(a, ref.half())
    assert open_store(captions).column("caption") == IMAGE_CAPTIONS[:N]


def test_dit_class_label_vs_null_class(tmp_path, dit_dir, image_folder, image_csv):
    target = load_target(dit_dir)
    layer = "transformer_blocks.0"
    ids, images = folder_images(image_folder, N)
    source = FolderSource(image_folder, image_csv)
    common = dict(layers=[layer], timesteps=[200], pooling="none", limit=N)
    null = stored(run(target, source, tmp_path / "null", **common), layer, 200)[:, 0]
    three = stored(run(target, source, tmp_path / "three", class_label=3, **common), layer, 200)[:, 0]
    labels = stored(run(target, source, tmp_path / "labels", labels_as_classes=True, **common), layer, 200)[:, 0]
    assert all(not torch.equal(null[i], three[i]) for i in range(N))
    assert torch.equal(null, reference(target, images, ids, [layer], 200, 0, classes=[1000] * N)[layer].half())
    assert torch.equal(three, reference(target, images, ids, [layer], 200, 0, classes=[3] * N)[layer].half())
    # labels are class names: cat -> 3, dog -> 5
    classes = [{"cat": 3, "dog": 5}[lab] for lab in IMAGE_LABELS[:N]]
    assert torch.equal(labels, reference(target, images, ids, [layer], 200, 0, classes=classes)[layer].half())
    assert torch.equal(labels[0], three[0]) and not torch.equal(labels[1], three[1])


# ---- seeds, timesteps, determinism ------------------------------------------------------------------------------
def test_noise_for_is_seeded_per_input():
    a = noise_for(["x", "y"], 0, (3, 4, 4))
    assert torch.equal(a, noise_for(["x", "y"], 0, (3, 4, 4)))  # reproducible
    assert not torch.equal(a, noise_for(["x", "y"], 1, (3, 4, 4)))  # another seed: other noise
    assert not torch.equal(a[0], a[1])  # other input: other noise
    assert torch.equal(a[1], noise_for(["y"], 0, (3, 4, 4))[0])  # independent of the batch
    assert abs(float(a.std()) - 1.0) < 0.35


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoiser_target_matches_diffusers(kind):
    from diffusers import DDPMScheduler

    from diffdissect.world.pipeline import sd_scheduler_config

    scheduler = DDPMScheduler(**sd_scheduler_config(kind))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    expected = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[kind]
    assert torch.allclose(denoiser_target(scheduler, x0, noise, t), expected, atol=1e-6)
    if kind == "v_prediction":  # at t=999 v is almost -x0, at t=0 almost the noise
        v = denoiser_target(scheduler, x0, noise, t)
        cos = torch.nn.functional.cosine_similarity
        assert cos(v[2].flatten(), -x0[2].flatten(), dim=0) > 0.99
        assert cos(v[0].flatten(), noise[0].flatten(), dim=0) > 0.99


@pytest.mark.parametrize("x0_weight", [0.0, 0.1, 1.0])
def test_x0_error_weights_price_an_x0_error_the_same_under_every_prediction_type(x0_weight):
    from diffusers import DDPMScheduler

    from diffdissect.world.pipeline import sd_scheduler_config

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    x0_hat = x0 + 0.3 * torch.randn(4, 4, 8, 8, generator=g)  # a denoiser's (wrong) guess of x0
    t = torch.tensor([3, 300, 700, 990])
    costs = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(**sd_scheduler_config(kind))
        a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        noise_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()  # the same guess in this output type
        pred = {"epsilon": noise_hat, "sample": x0_hat, "v_prediction": a.sqrt() * noise_hat - (1 - a).sqrt() * x0_hat}[
            kind
        ]
        mse = (pred - denoiser_target(scheduler, x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        costs[kind] = x0_error_weights(scheduler, t, x0_weight) * mse
        if (kind, x0_weight) in (("epsilon", 0.0), ("v_prediction", 1.0)):  # the plain losses: weight 1
            assert torch.allclose(x0_error_weights(scheduler, t, x0_weight), torch.ones(4), atol=1e-5)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    expected = (snr + x0_weight) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    for kind, cost in costs.items():
        assert torch.allclose(cost, expected, rtol=1e-3), kind


def test_x0_error_weights_refuse_a_negative_weight():
    from diffusers import DDPMScheduler

    with pytest.raises(SpecError, match="x0_weight must be >= 0"):
        x0_error_weights(DDPMScheduler(num_train_timesteps=10), torch.tensor([3]), -0.5)


def test_denoiser_target_refuses_an_unknown_prediction_type():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=10)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(SpecError, match="prediction_type 'flow' is not supported"):
        denoiser_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([3]))


def test_seeds_differ_and_reproduce(tmp_path, image_folder):
    target = load_target(TINY_FACTORY)
    source = FolderSource(image_folder)
    both = run(
        target, source, tmp_path / "both", layers=["blocks.0"], timesteps=[500], seeds=[0, 1], pooling="none", limit=N
    )
    only1 = run(
        target, source, tmp_path / "only1", layers=["blocks.0"], timesteps=[500], seeds=[1], pooling="none", limit=N
    )
    again = run(
        target, source, tmp_path / "again", layers=["blocks.0"], timesteps=[500], seeds=[0, 1], pooling="none", limit=N
    )
    x = stored(both, "blocks.0", 500, 2)
    assert all(not torch.equal(x[i, 0], x[i, 1]) for i in range(N))
    assert torch.equal(x[:, 1], stored(only1, "blocks.0", 500)[:, 0])  # seed 1 is seed 1, whatever else runs
    assert torch.equal(x, stored(again, "blocks.0", 500, 2))


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler"])
def test_noise_follows_the_training_schedule_whatever_the_sampler(scheduler, tmp_path, sd_dir, image_folder, image_csv):
    """Sampling schedulers' add_noise index sigmas by inference step (DPMSolver at t=1 gives almost pure
    noise; Euler returns x0 + sigma * noise): capture must feed sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    import diffusers

    target = load_target(sd_dir)
    target.scheduler = getattr(diffusers, scheduler).from_config(target.scheduler.config)
    out = run(
        target,
        FolderSource(image_folder, image_csv),
        tmp_path / "s",
        layers=["conv_in"],
        timesteps=[1, 900],
        limit=2,
        pooling="none",
        dtype="float32",
    )
    ids, images = folder_images(image_folder, 2)
    for t in (1, 900):
        expected = reference(target, images, ids, ["conv_in"], t, 0)["conv_in"]
        torch.testing.assert_close(stored(out, "conv_in", t)[:, 0], expected, atol=1e-5, rtol=1e-5)
    clean = reference(target, images, ids, ["conv_in"], 0, 0)["conv_in"]
    assert float((stored(out, "conv_in", 1)[:, 0] - clean).norm()) < 0.1 * float(clean.norm())


def test_timestep_table_and_noise_level(tmp_path, unet2d_dir, image_folder):
    target = load_target(unet2d_dir)
    out = run(
        target,
        FolderSource(image_folder),
        tmp_path / "s",
        layers=["conv_in"],
        timesteps=[0, 25, 999, 200],
        limit=2,
        pooling="none",
        dtype="float32",
    )
    table = open_store(out).manifest.timesteps
    alphas = target.scheduler.alphas_cumprod
    assert [e["t"] for e in table] == [0, 25, 999, 200]
    for e in table:
        assert e["alpha_bar"] == pytest.approx(float(alphas[e["t"]]), rel=1e-6)
        assert e["noise_std"] == pytest.approx(math.sqrt(1 - float(alphas[e["t"]])), rel=1e-6)
        assert e["signal_scale"] == pytest.approx(math.sqrt(float(alphas[e["t"]])), rel=1e-6)
    by_t = {e["t"]: e["alpha_bar"] for e in table}
    assert by_t[0] > by_t[25] > by_t[200] > by_t[999]  # larger t = noisier
    # conv_in is linear in its input: the activation's distance from the clean image's grows with t
    ids, images = folder_images(image_folder, 2)
    clean = reference(target, images, ids, ["conv_in"], 0, 0)["conv_in"]
    dist = {t: float((stored(out, "conv_in", t)[:, 0] - clean).norm()) for t in (25, 200, 999)}
    assert dist[25] < dist[200] < dist[999]


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_same_spec_gives_byte_identical_shards(kind, tmp_path, sd_dir, dit_dir, unet2d_dir, image_folder, image_csv):
    path = model_path(kind, sd_dir, dit_dir, unet2d_dir)
    layers = ["mid_block", "up_blocks.1"] if kind == "sd" else ["transformer_blocks.0", "transformer_blocks.1"]
    spec = dict(layers=layers, timesteps=[25, 500], seeds=[0, 1], batch_size=3, shard_size=4, pooling="none")
    first = run(load_target(path), FolderSource(image_folder, image_csv), tmp_path / "a", **spec)
    second = run(load_target(path), FolderSource(image_folder, image_csv), tmp_path / "b", **spec)
    files = shard_files(first)
    assert [p.name for p in files] == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert [p.name for p in shard_files(second)] == [p.name for p in files]
    for a, b in zip(files, shard_files(second)):
        assert a.read_bytes() == b.read_bytes()
    assert (first / "index.csv").read_bytes() == (second / "index.csv").read_bytes()
    assert open_store(first).manifest.spec_hash == open_store(second).manifest.spec_hash
    assert open_store(first).num_rows == 12


# ---- the CLI ----------------------------------------------------------------------------------------------------
def test_cli_capture_exact_user_form(tmp_path, sd_dir, image_folder, capsys):
    out = tmp_path / "runs" / "acts"
    code = main(
        [
            "capture",
            "--model",
            str(sd_dir),
            "--images",
            str(image_folder),
            "--layers",
            "mid_block",
            "up_blocks.1",
            "--timesteps",
            "25",
            "200",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "wrote 12 rows x 2 layers x 2 timesteps" in capsys.readouterr().out
    reader = open_store(out)
    assert reader.manifest.complete
    assert reader.layers == ["mid_block", "up_blocks.1"] and reader.timesteps == [25, 200]
    assert reader.shape("mid_block") == (32,) and reader.shape("up_blocks.1") == (16,)  # pooled by default
    assert reader.manifest.dtype == "float16"
    assert reader.column("seed") == [0, 1] * 6
    assert reader.column("input_id") == [f"img{i:03d}.png" for i in range(6) for _ in range(2)]
    # the command writes exactly what the Python API writes for the same spec
    api = run(
        load_target(sd_dir),
        FolderSource(image_folder),
        tmp_path / "api",
        layers=["mid_block", "up_blocks.1"],
        timesteps=[25, 200],
        seeds=[0, 1],
    )
    assert [a.read_bytes() for a in shard_files(out)] == [b.read_bytes() for b in shard_files(api)]
    # and the values are the plain-hook reference, mean-pooled
    ids, images = folder_images(image_folder)
    ref = reference(load_target(sd_dir), images, ids, ["mid_block"], 200, 1)["mid_block"]
    assert torch.equal(stored(out, "mid_block", 200, 2)[:, 1], ref.mean(dim=(2, 3)).half())


def test_cli_capture_with_labels_csv_and_captions(tmp_path, sd_dir, image_folder, image_csv, capsys):
    out = tmp_path / "acts"
    code = main(
        [
            "capture",
            "--model",
            str(sd_dir),
            "--images",
            str(image_folder),
            "--labels-csv",
            str(image_csv),
            "--use-captions",
            "--layers",
            "down_blocks.1",
            "--timesteps",
            "50",
            "--pooling",
            "none",
            "--dtype",
            "float32",
            "--batch-size",
            "2",
            "--limit",
            "3",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    reader = open_store(out)
    assert reader.column("label") == IMAGE_LABELS[:3] and reader.column("caption") == IMAGE_CAPTIONS[:3]
    with open(out / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    assert [r["caption"] for r in index] == IMAGE_CAPTIONS[:3]
    ids, images = folder_images(image_folder, 3)
    got = stored(out, "down_blocks.1", 50)[:, 0]
    assert got.dtype == torch.float32 and got.shape == (3, 32, 4, 4)
    ref = reference(
        load_target(sd_dir), images, ids, ["down_blocks.1"], 50, 0, prompts=IMAGE_CAPTIONS[:3], batch_size=2
    )["down_blocks.1"]
    assert torch.equal(got, ref)


def test_cli_capture_dit_class_label_and_tokens_to_grid(tmp_path, dit_dir, image_folder, capsys):
    out = tmp_path / "acts"
    assert (
        main(
            [
                "capture",
                "--model",
                str(dit_dir),
                "--images",
                str(image_folder),
                "--layers",
                "transformer_blocks.1",
                "--timesteps",
                "100",
                "--class-label",
                "7",
                "--tokens-to-grid",
                "--pooling",
                "none",
                "--limit",
                "2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ids, images = folder_images(image_folder, 2)
    tokens = reference(load_target(dit_dir), images, ids, ["transformer_blocks.1"], 100, 0, classes=[7, 7])[
        "transformer_blocks.1"
    ]
    assert torch.equal(
        stored(out, "transformer_blocks.1", 100)[:, 0], tokens.transpose(1, 2).reshape(2, 16, 4, 4).half()
    )


# ---- other inputs: Hugging Face datasets, arrays -------------------------------------------------------------------
def _pil_images(n: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [random_image(w, h, rng) for w, h in [(20, 24), (30, 18), (16, 16), (40, 40)][:n]]


def test_hf_dataset_input_via_cli(tmp_path, unet2d_dir, capsys):
    import datasets

    images = _pil_images(4)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "text": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 1, 0], "text": ["w", "x", "y", "z"]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "acts"
    assert (
        main(
            [
                "capture",
                "--model",
                str(unet2d_dir),
                "--dataset",
                str(tmp_path / "ds"),
                "--label-column",
                "label",
                "--caption-column",
                "text",
                "--layers",
                "mid_block",
                "--timesteps",
                "300",
                "--pooling",
                "none",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    reader = open_store(out)
    assert reader.column("label") == ["cat", "dog", "dog", "cat"]  # ClassLabel ids -> names
    assert reader.column("caption") == ["w", "x", "y", "z"]
    ids = reader.column("input_id")
    assert ids == [f"row{i:08d}" for i in range(4)]
    target = load_target(unet2d_dir)
    ref = reference(target, images, ids, ["mid_block"], 300, 0)["mid_block"]
    assert torch.equal(stored(out, "mid_block", 300)[:, 0], ref.half())
    # a DatasetDict needs --split
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    source = HFDatasetSource(str(tmp_path / "dd"), split="train", label_column="label")
    assert len(source) == 4 and source.load(1).label == "dog"


def test_array_source_inputs(tmp_path, image_folder):
    target = load_target(TINY_FACTORY)
    rng = np.random.default_rng(5)
    arrays = rng.integers(0, 256, size=(3, 20, 28, 3), dtype=np.uint8)  # not 16x16: resized + cropped
    ids = ["a", "b", "c"]
    spec = dict(layers=["blocks.1"], timesteps=[150], pooling="none")
    uint8 = run(target, ArraySource(arrays, labels=np.array([0, 1, 2]), ids=ids), tmp_path / "u8", **spec)
    floats = run(target, ArraySource(arrays.astype(np.float32) / 255.0, ids=ids), tmp_path / "f", **spec)
    pils = run(target, ArraySource([Image.fromarray(a) for a in arrays], ids=ids), tmp_path / "pil", **spec)
    ref = reference(target, [Image.fromarray(a) for a in arrays], ids, ["blocks.1"], 150, 0)["blocks.1"]
    got = stored(uint8, "blocks.1", 150)[:, 0]
    assert torch.equal(got, ref.half())
    assert torch.equal(stored(floats, "blocks.1", 150)[:, 0], got)
    assert torch.equal(stored(pils, "blocks.1", 150)[:, 0], got)
    reader = open_store(uint8)
    assert reader.column("label") == [0, 1, 2] and reader.column("input_id") == ids


def test_resize_and_centre_crop():
    # left third red, middle third green, right third blue; 48x16 -> scaled to 48x16 -> centre 16x16 = green
    image = np.zeros((16, 48, 3), np.uint8)
    image[:, :16, 0] = 255
    image[:, 16:32, 1] = 255
    image[:, 32:, 2] = 255
    pixels = to_model_pixels(image, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.equal(pixels[1], torch.ones(16, 16)) and torch.equal(pixels[0], -torch.ones(16, 16))
    # upscaling a small portrait image: shorter side to the resolution, then the centre
    portrait = to_model_pixels(np.full((20, 10, 3), 255, np.uint8), 32)
    assert portrait.shape == (3, 32, 32) and torch.allclose(portrait, torch.ones(3, 32, 32), atol=1e-2)
    # an image already at the resolution is only rescaled to [-1, 1]
    exact = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = torch.from_numpy(exact.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(to_model_pixels(exact, 16), expected)


# ---- trajectory mode ---------------------------------------------------------------------------------------------
def _sampler_timesteps(scheduler, steps: int) -> tuple[list[int], int]:
    """Unique timesteps of the sampler's schedule in call order, and how many calls repeat one."""
    import copy

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    calls = [int(t) for t in sched.timesteps]
    unique = list(dict.fromkeys(calls))
    return unique, len(calls) - len(unique)


def _check_trajectory_store(out, target, spec, prompts, seeds):
    reader = open_store(out)
    m = reader.manifest
    assert m.mode == "trajectory" and m.complete
    assert reader.num_rows == len(prompts) * len(seeds)
    assert reader.column("caption") == [p for p in prompts for _ in seeds]
    assert reader.column("seed") == seeds * len(prompts)
    expected_t, dropped = _sampler_timesteps(target.scheduler, spec.steps)
    assert reader.timesteps == expected_t
    assert reader.timesteps == sorted(reader.timesteps, reverse=True)  # sampling runs noisy -> clean
    assert all(0 <= t < target.num_train_timesteps for t in reader.timesteps)
    for entry in m.timesteps:
        assert entry["alpha_bar"] == pytest.approx(float(target.scheduler.alphas_cumprod[entry["t"]]), rel=1e-6)
    assert m.notes["dropped_duplicate_calls"] == dropped
    for row in reader.rows():
        path = out / row["image"]
        with Image.open(path) as img:
            assert img.size == (target.resolution, target.resolution) and img.mode == "RGB"
    names = sorted(p.name for p in (out / "images").glob("*.png"))
    assert names == sorted(f"p{i:06d}-s{s}.png" for i in range(len(prompts)) for s in seeds)
    return reader


def test_trajectories_sd(tmp_path, sd_dir):
    target = load_target(sd_dir)
    prompts, seeds = ["a red cat", "a blue dog"], [0, 1]
    spec = TrajectoryConfig(
        prompts=prompts,
        seeds=seeds,
        layers=["mid_block", "up_blocks.1"],
        steps=3,
        guidance_scale=7.5,
        pooling="mean",
        dtype="float32",
    )
    cond = tmp_path / "cond"
    capture_trajectories(target, spec, cond, progress=False)
    reader = _check_trajectory_store(cond, target, spec, prompts, seeds)
    assert reader.timesteps == [667, 334, 1] and reader.manifest.notes["dropped_duplicate_calls"] == 1  # PNDM
    assert reader.shape("mid_block") == (32,) and reader.shape("up_blocks.1") == (16,)

    uncond = tmp_path / "uncond"
    spec.branch = "uncond"
    capture_trajectories(target, spec, uncond, progress=False)
    t0 = reader.timesteps[0]
    c = open_store(cond).load("mid_block", t0, format="torch")  # rows: (p0,s0) (p0,s1) (p1,s0) (p1,s1)
    u = open_store(uncond).load("mid_block", t0, format="torch")
    assert all(not torch.allclose(c[r], u[r], atol=1e-4) for r in range(4))
    # first step: same seed -> same latents; the unconditional branch sees the empty prompt for both prompts,
    # the conditional branch each its own prompt
    assert torch.allclose(u[0], u[2], atol=1e-5) and torch.allclose(u[1], u[3], atol=1e-5)
    assert not torch.allclose(c[0], c[2], atol=1e-3)

    # the first step's conditional branch is the plain forward hook on the pipeline's first denoiser input
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    latents = latents * target.scheduler.init_noise_sigma
    emb = target.pipeline.encode_prompt(["a red cat"], "cpu", 1, False)[0]
    raw = hook_outputs(
        target.denoiser, ["mid_block"], lambda: target.denoiser(latents, torch.tensor(t0), encoder_hidden_states=emb)
    )
    assert torch.allclose(c[0], raw["mid_block"].mean(dim=(2, 3))[0], atol=1e-5)

    # the saved image is what the pipeline itself generates for that prompt and seed
    image = target.pipeline(
        "a red cat",
        num_inference_steps=3,
        guidance_scale=7.5,
        output_type="np",
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    saved = np.asarray(Image.open(cond / "images" / "p000000-s1.png"), dtype=np.int16)
    assert np.abs(saved - (np.clip(image, 0, 1) * 255).round().astype(np.int16)).max() <= 1


def test_trajectories_dit(tmp_path, dit_dir):
    target = load_target(dit_dir)
    prompts, seeds = ["cat", "7"], [3]
    spec = TrajectoryConfig(
        prompts=prompts,
        seeds=seeds,
        layers=["transformer_blocks.1"],
        steps=3,
        guidance_scale=4.0,
        pooling="none",
        tokens_to_grid=True,
    )
    cond = tmp_path / "cond"
    capture_trajectories(target, spec, cond, progress=False)
    reader = _check_trajectory_store(cond, target, spec, prompts, seeds)
    assert reader.timesteps == [666, 333, 0]
    assert reader.shape("transformer_blocks.1") == (16, 4, 4)
    assert reader.manifest.dtype == "float16"

    spec.branch = "uncond"
    uncond = tmp_path / "uncond"
    capture_trajectories(target, spec, uncond, progress=False)
    t0 = 666
    c = open_store(cond).load("transformer_blocks.1", t0, format="torch").float()
    u = open_store(uncond).load("transformer_blocks.1", t0, format="torch").float()
    assert not torch.allclose(c, u, atol=1e-2)
    assert torch.allclose(u[0], u[1], atol=1e-2)  # both the null class on the same latents
    assert not torch.allclose(c[0], c[1], atol=1e-2)  # class 3 (cat) vs class 7

    # the conditional branch at the first step = a plain hook on the transformer with class 3
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    raw = hook_outputs(
        target.denoiser,
        ["transformer_blocks.1"],
        lambda: target.denoiser(latents, timestep=torch.tensor([t0]), class_labels=torch.tensor([3])),
    )
    tokens = raw["transformer_blocks.1"].float()
    grid = tokens.transpose(1, 2).reshape(1, 16, 4, 4)
    assert torch.allclose(c[0], grid[0].half().float(), atol=2e-3)


# ---- the shape probe runs on the meta device, with a real-forward fallback ------------------------------
class _DataDependent(torch.nn.Module):
    """Branches on a tensor's value (.item()): impossible on the meta device."""

    in_channels, sample_size = 3, 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def forward(self, sample, timestep):
        h = self.conv(sample)
        return h * 2 if float(h.abs().sum().item()) >= 0 else h


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_shape_probe_matches_a_real_forward_without_running_one(sd_dir, pooling, monkeypatch):
    from diffdissect.capture import CaptureConfig
    from diffdissect.capture.engine import probe_row_shapes
    from diffdissect.capture.rows import to_rows

    target = load_target(sd_dir)
    layers = ["down_blocks.0", "mid_block", "up_blocks.1"]
    spec = CaptureConfig(layers=layers, pooling=pooling)
    sample, t, cond = target.dry_inputs(100)
    raw = hook_outputs(target.denoiser, layers, lambda: target.forward(sample, t, cond))
    real = {l: out[0] if isinstance(out, tuple) else out for l, out in raw.items()}  # down blocks: (h, skips)
    real_calls = []
    monkeypatch.setattr(target, "forward", lambda *a: real_calls.append(a))
    assert probe_row_shapes(target, layers, spec) == {l: tuple(to_rows(real[l], spec).shape[1:]) for l in layers}
    assert real_calls == []  # shapes came from the meta device


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_shape_probe_falls_back_to_a_real_forward_off_meta(pooling):
    from diffdissect.capture import CaptureConfig
    from diffdissect.capture.engine import probe_row_shapes

    target = load_target(_DataDependent())
    want = {"conv": (5,)} if pooling == "mean" else {"conv": (5, 8, 8)}
    assert probe_row_shapes(target, ["conv"], CaptureConfig(layers=["conv"], pooling=pooling)) == want
