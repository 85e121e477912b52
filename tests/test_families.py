"""Today's families (SDXL, SD3, FLUX.1, PixArt, Sana): tiny random pipelines built with stock diffusers and
transformers (tokenizers made locally), saved with save_pretrained and loaded as a user does.

The numerics are checked against a plain forward hook on the same module, fed by hand: the image
through the pipeline's own VAE, the noise diffdissect drew, the family's forward process written out
from the scheduler (DDPM: alphas_cumprod; flow: the scheduler's own sigmas and shift), the pipeline's
own encode_prompt, and the denoiser called as the pipeline's denoising loop calls it.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import folder_images
from diffdissect.capture import CaptureConfig, capture
from diffdissect.cli import main
from diffdissect.data import FolderSource
from diffdissect.data.transforms import to_model_pixels
from diffdissect.models import load_target
from diffdissect.models.noising import noise_for
from diffdissect.store import open_store

FAMILIES = ["sdxl", "sd3", "flux", "pixart", "sana"]
PROMPT = "a red cat"
N_IMAGES = 2


@pytest.fixture(scope="session")
def family_dirs(models_root: Path) -> dict[str, Path]:
    """Every family's tiny pipeline, built once per session and saved with save_pretrained."""
    from diffdissect.models.tiny_families import FAMILY_BUILDERS

    dirs = {}
    for name, build in FAMILY_BUILDERS.items():
        dirs[name] = models_root / f"family-{name}"
        build(0).save_pretrained(dirs[name])
    return dirs


def model_args(name: str, family_dirs: dict[str, Path]) -> list[str]:
    # FLUX's transformer names no sample size (its pipeline defaults to 1024 px): the tiny one is 32 px
    return ["--model", str(family_dirs[name]), *(["--resolution", "32"] if name == "flux" else [])]


def load(name: str, family_dirs: dict[str, Path]):
    return load_target(family_dirs[name], resolution=32 if name == "flux" else None)


def pipeline(name: str, family_dirs: dict[str, Path]):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(family_dirs[name])


# ---- the reference: each family's forward process and denoiser call, written out by hand --------------------
def hand_x0(pipe, images) -> torch.Tensor:
    pixels = torch.stack([to_model_pixels(image, 32) for image in images])
    with torch.no_grad():
        encoded = pipe.vae.encode(pixels)
    latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    shift = pipe.vae.config.get("shift_factor") or 0.0
    return (latents - shift) * pipe.vae.config.scaling_factor


def hand_sigma(name: str, pipe, t: int) -> float:
    """The training sigma of index t, read from the scheduler itself (float32, as diffusers keeps it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = pipe.scheduler
    if name == "sd3":  # static shift: the init sigmas are the shifted training grid
        return float(scheduler.sigmas[scheduler.config.num_train_timesteps - 1 - t])
    if name == "flux":  # dynamic shift: FLUX's mu for 16 packed tokens
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
        base = float(scheduler.sigmas[scheduler.config.num_train_timesteps - 1 - t])
        return float(scheduler.time_shift(mu, 1.0, torch.tensor(base)))
    # Sana's DPMSolver with flow sigmas: the same grid as FlowMatchEuler with shift = flow_shift
    grid = FlowMatchEulerDiscreteScheduler(shift=scheduler.config.flow_shift)
    return float(grid.sigmas[grid.config.num_train_timesteps - 1 - t])


def hand_x_t(name: str, pipe, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    if name in ("sdxl", "pixart"):
        a = float(pipe.scheduler.alphas_cumprod[t])
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise
    s = hand_sigma(name, pipe, t)
    return (1 - s) * x0 + s * noise


def hand_call(name: str, pipe, x_t: torch.Tensor, t: int, prompt: str) -> None:
    """One denoiser call as the family's pipeline makes it (guidance off)."""
    b = x_t.shape[0]
    prompts = [prompt] * b
    with torch.no_grad():
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
            time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(b, 1)
            pipe.unet(
                x_t,
                torch.full((b,), t),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            )
        elif name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
            timestep = torch.full((b,), hand_sigma(name, pipe, t) * 1000)
            pipe.transformer(
                hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled
            )
        elif name == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompts)
            packed = pipe._pack_latents(x_t, b, 4, 8, 8)
            image_ids = pipe._prepare_latent_image_ids(b, 4, 4, x_t.device, x_t.dtype)
            pipe.transformer(
                hidden_states=packed,
                timestep=torch.full((b,), hand_sigma(name, pipe, t)),
                guidance=torch.full((b,), 3.5),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
            )
        elif name == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False)
            pipe.transformer(
                x_t,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=torch.full((b,), t),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )
        else:
            instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
            embeds, mask, _, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, clean_caption=False, complex_human_instruction=instruction
            )
            # the scheduler's timesteps are int64 (sigma * 1000 truncated), times the transformer's timestep_scale
            step = torch.tensor(hand_sigma(name, pipe, t) * 1000).to(torch.int64)
            timestep = step.expand(b) * pipe.transformer.config.timestep_scale
            pipe.transformer(x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep)


def hooked(module: torch.nn.Module, call) -> tuple[tuple, dict, object]:
    """(args, kwargs, output) of the module's first call, from a plain forward hook."""
    seen: list = []
    handle = module.register_forward_hook(
        lambda m, a, k, o: seen.append((a, k, o)) if not seen else None, with_kwargs=True
    )
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


# (layer spec, how to take it from the plain hook's (args, kwargs, output))
def _image_out(a, k, o):
    return (
        o[1]
        if isinstance(o, tuple) and len(o) == 2 and "encoder_hidden_states" in k
        else (o[0] if isinstance(o, tuple) else getattr(o, "sample", o))
    )


def _image_in(a, k, o):
    return k["hidden_states"] if "hidden_states" in k else a[0]


NUMERIC_LAYERS = {
    "sdxl": [
        "up_blocks.0.attentions.1",
        "up_blocks.0.attentions.1@update",
        "up_blocks.0.attentions.1@input",
        "mid_block",
    ],
    "sd3": [
        "transformer_blocks.0",
        "transformer_blocks.0@text",
        "transformer_blocks.0@update",
        "transformer_blocks.0@text@update",
    ],
    "flux": [
        "transformer_blocks.0",
        "transformer_blocks.0@text",
        "single_transformer_blocks.0",
        "single_transformer_blocks.0@update",
        "single_transformer_blocks.0@text",
    ],
    "pixart": ["transformer_blocks.1", "transformer_blocks.1@update"],
    "sana": ["transformer_blocks.1", "transformer_blocks.1@update"],
}


def reference(spec: str, args, kwargs, output) -> torch.Tensor:
    path, _, suffix = spec.partition("@")
    if suffix.startswith("text"):
        out, inp = output[0], kwargs["encoder_hidden_states"]
    else:
        out = output[0] if isinstance(output, tuple) and path == "mid_block" else _image_out(args, kwargs, output)
        inp = _image_in(args, kwargs, output)
    if suffix.endswith("update"):
        return out - inp
    if suffix.endswith("input"):
        return inp
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_stored_tensor_equals_a_plain_hook_fed_by_hand(name, family_dirs, image_folder, image_csv, tmp_path):
    target = load(name, family_dirs)
    layers, timesteps = NUMERIC_LAYERS[name], [100, 700]
    out = tmp_path / "store"
    capture(
        target,
        FolderSource(image_folder, image_csv),
        CaptureConfig(
            layers=layers,
            timesteps=timesteps,
            seeds=[0],
            prompt=PROMPT,
            pooling="none",
            dtype="float32",
            limit=N_IMAGES,
        ),
        out,
        progress=False,
    )
    store = open_store(out)
    pipe = pipeline(name, family_dirs)
    ids, images = folder_images(image_folder, N_IMAGES)
    x0 = hand_x0(pipe, images)
    noise = noise_for(ids, 0, tuple(x0.shape[1:]))
    denoiser = pipe.unet if name == "sdxl" else pipe.transformer
    modules = dict(denoiser.named_modules())
    for t in timesteps:
        x_t = hand_x_t(name, pipe, x0, noise, t)
        for spec in layers:
            args, kwargs, output = hooked(
                modules[spec.partition("@")[0]], lambda x_t=x_t, t=t: hand_call(name, pipe, x_t, t, PROMPT)
            )
            expected = reference(spec, args, kwargs, output).float()
            got = store.load(spec, t, format="torch")
            assert got.shape == expected.shape, (spec, t)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (spec, t, (got - expected).abs().max())
    if name in ("sd3", "flux"):
        # the image stream is what a joint block stores by default, not the text stream
        assert store.manifest.layers["transformer_blocks.0"]["shape"][0] == 16
        assert store.manifest.layers["transformer_blocks.0@text"]["shape"][0] > 16


def test_store_table_records_every_level_on_one_axis(family_dirs, image_folder, image_csv, tmp_path):
    """t, the exact denoiser argument, alpha_bar or sigma, signal scale, noise std, log-SNR and the shift."""
    tables = {}
    for name in ("sdxl", "sd3", "flux", "sana"):
        out = tmp_path / name
        capture(
            load(name, family_dirs),
            FolderSource(image_folder, image_csv),
            CaptureConfig(layers=["mid_block" if name == "sdxl" else "transformer_blocks.0"], timesteps=[499], limit=1),
            out,
            progress=False,
        )
        tables[name] = open_store(out).manifest.timesteps[0]
    sd3, flux, sana, sdxl = tables["sd3"], tables["flux"], tables["sana"], tables["sdxl"]
    assert sdxl["process"] == "ddpm" and sdxl["sigma"] is None and sdxl["denoiser_t"] == 499
    assert sd3["process"] == "flow" and sd3["alpha_bar"] is None and sd3["shift"] == 3.0
    s = 0.5  # (t + 1) / N
    assert sd3["sigma"] == pytest.approx(3 * s / (1 + 2 * s)) and sd3["denoiser_t"] == pytest.approx(
        sd3["sigma"] * 1000
    )
    assert sd3["signal_scale"] == pytest.approx(1 - sd3["sigma"]) and sd3["noise_std"] == pytest.approx(sd3["sigma"])
    assert sd3["log_snr"] == pytest.approx(2 * math.log((1 - sd3["sigma"]) / sd3["sigma"]))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # calculate_shift for 16 packed tokens
    assert flux["mu"] == pytest.approx(mu) and flux["shift"] is None
    assert flux["sigma"] == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / s - 1))
    assert flux["denoiser_t"] == pytest.approx(flux["sigma"])  # FLUX is handed sigma, not sigma * 1000
    assert sana["denoiser_t"] == math.floor(sana["sigma"] * 1000)  # Sana's scheduler truncates to int64


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_round_trip_matches_the_schedulers_scale_noise(name, family_dirs, image_folder, image_csv, tmp_path):
    """x_t from the store's table == the scheduler's own scale_noise at the same sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = tmp_path / "store"
    capture(
        load(name, family_dirs),
        FolderSource(image_folder, image_csv),
        CaptureConfig(layers=["transformer_blocks.0"], timesteps=[10, 400, 999], limit=1),
        out,
        progress=False,
    )
    pipe = pipeline(name, family_dirs)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for entry in open_store(out).manifest.timesteps:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        base = (entry["t"] + 1) / 1000
        kwargs = {"mu": entry["mu"]} if name == "flux" else {}
        scheduler.set_timesteps(sigmas=[base], **kwargs)
        theirs = scheduler.scale_noise(x0, scheduler.timesteps[:1], noise)
        ours = entry["signal_scale"] * x0 + entry["noise_std"] * noise
        assert float(scheduler.sigmas[0]) == pytest.approx(entry["sigma"], rel=1e-6)
        assert torch.allclose(ours, theirs, atol=1e-6), entry


def test_sigmas_name_flow_levels_directly(family_dirs, image_folder, image_csv, tmp_path, capsys):
    out = tmp_path / "store"
    capture(
        load("sd3", family_dirs),
        FolderSource(image_folder, image_csv),
        CaptureConfig(layers=["transformer_blocks.0"], sigmas=[0.25, 1.0], limit=1),
        out,
        progress=False,
    )
    entries = open_store(out).manifest.timesteps
    assert [e["sigma"] for e in entries] == [0.25, 1.0] and entries[1]["t"] == 999
    assert 0 <= entries[0]["t"] < 999 and entries[0]["denoiser_t"] == pytest.approx(250.0)
    assert main(["store", "info", str(out)]) == 0
    assert "sigma 0.2500" in capsys.readouterr().out


def test_flux_output_is_unpacked_to_the_latent_grid(family_dirs, image_folder, image_csv, tmp_path):
    out = tmp_path / "store"
    target = load("flux", family_dirs)
    capture(
        target,
        FolderSource(image_folder, image_csv),
        CaptureConfig(
            layers=["proj_out", "transformer_blocks.0"],
            timesteps=[300],
            pooling="none",
            tokens_to_grid=True,
            dtype="float32",
            limit=1,
        ),
        out,
        progress=False,
    )
    store = open_store(out)
    assert store.manifest.layers["proj_out"]["shape"] == [4, 8, 8]  # the latent grid
    assert store.manifest.layers["transformer_blocks.0"]["shape"] == [16, 4, 4]  # image tokens, 2x2 patches
    flat = open_store(out).load("proj_out", 300, format="torch")
    packed = target.pipeline._pack_latents(flat, 1, 4, 8, 8)
    assert torch.equal(target.pipeline._unpack_latents(packed, 32, 32, 4), flat)


# ---- the workflow a user runs, on every family --------------------------------------------------------------
WORKFLOW_LAYER = {
    "sdxl": "mid_block",
    "sd3": "transformer_blocks.0",
    "flux": "single_transformer_blocks.0",
    "pixart": "transformer_blocks.1",
    "sana": "transformer_blocks.1",
}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_whole_workflow_runs_on_every_family(name, family_dirs, image_folder, image_csv, tmp_path, capsys):
    model = model_args(name, family_dirs)
    layer = WORKFLOW_LAYER[name]
    assert main(["layers", *model, "--json", "-"]) == 0
    listed = {entry["path"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert layer.split(".")[0] in listed or layer in listed
    if name in ("sd3", "flux"):
        assert listed["transformer_blocks.0@text"]["shape"][1] == 16  # (text tokens, width)
    assert main(["layers", *model, "--random-init", "--depth", "1"]) == 0
    capsys.readouterr()
    pooled, spatial = tmp_path / "pooled", tmp_path / "spatial"
    common = ["--images", str(image_folder), "--labels-csv", str(image_csv), "--prompt", PROMPT, "--quiet"]
    assert (
        main(
            [
                "capture",
                *model,
                *common,
                "--layers",
                layer,
                f"{layer}@update",
                "--timesteps",
                "100",
                "600",
                "--seeds",
                "0",
                "1",
                "2",
                "--out",
                str(pooled),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "capture",
                *model,
                *common,
                "--layers",
                layer,
                "--timesteps",
                "600",
                "--pooling",
                "none",
                "--limit",
                "2",
                "--out",
                str(spatial),
            ]
        )
        == 0
    )
    assert main(["store", "verify", str(pooled)]) == 0 and main(["store", "verify", str(spatial)]) == 0
    assert (
        main(
            [
                "probe",
                str(pooled),
                "--labels",
                "label",
                "--bootstrap",
                "50",
                "--split-fractions",
                "0.34",
                "0.33",
                "0.33",
                "--out",
                str(tmp_path / "probe"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sae",
                "train",
                str(pooled),
                "--layers",
                f"{layer}@update",
                "--timesteps",
                "600",
                "--k",
                "2",
                "--expansion",
                "2",
                "--train-steps",
                "5",
                "--batch-size",
                "8",
                "--out",
                str(tmp_path / "sae"),
                "--quiet",
            ]
        )
        == 0
    )
    trajectories = tmp_path / "trajectories"
    assert (
        main(
            [
                "capture",
                *model,
                "--prompts",
                "a red cat",
                "a blue dog",
                "--layers",
                layer,
                "--steps",
                "2",
                "--guidance",
                "2",
                "--out",
                str(trajectories),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["store", "verify", str(trajectories)]) == 0
    assert (
        main(
            [
                "directions",
                "run",
                *model,
                "--template",
                "a {colour} square",
                "--slot",
                "colour=red,blue",
                "--n-seeds",
                "2",
                "--steps",
                "2",
                "--guidance",
                "1",
                "--layers",
                layer,
                "--permutations",
                "20",
                "--resamples",
                "20",
                "--out",
                str(tmp_path / "directions"),
                "--quiet",
            ]
        )
        == 0
    )


def test_flow_trajectories_are_keyed_by_the_training_index_of_sigma(family_dirs, tmp_path):
    """FLUX is handed sigma in [0, 1]: rounding that argument collapsed every step to t=0 or 1."""
    from diffdissect.capture import TrajectoryConfig, capture_trajectories

    target = load("flux", family_dirs)
    manifest = capture_trajectories(
        target,
        TrajectoryConfig(
            prompts=[PROMPT], layers=["transformer_blocks.0"], steps=2, guidance_scale=3.5, save_images=False
        ),
        tmp_path / "store",
        progress=False,
    )
    # FLUX samples sigma_base = 1, 1/2 (then shifts by mu): training indices 999 and 499
    assert [e["t"] for e in manifest.timesteps] == [999, 499]
    assert manifest.timesteps[0]["sigma"] == pytest.approx(1.0)
    assert 0 < manifest.timesteps[1]["denoiser_t"] < 1  # the argument really handed over


def test_sd3_guided_trajectory_keeps_the_conditional_half(family_dirs, tmp_path):
    """SD3 batches [unconditional, conditional]: the stored rows are the second half."""
    from diffdissect.capture import TrajectoryConfig, capture_trajectories

    target = load("sd3", family_dirs)
    calls: list[torch.Tensor] = []
    module = dict(target.denoiser.named_modules())["transformer_blocks.1"]
    handle = module.register_forward_hook(lambda m, a, k, o: calls.append(o[1].detach().clone()), with_kwargs=True)
    try:
        manifest = capture_trajectories(
            target,
            TrajectoryConfig(
                prompts=[PROMPT],
                layers=["transformer_blocks.1"],
                steps=2,
                guidance_scale=3.0,
                pooling="none",
                dtype="float32",
                save_images=False,
            ),
            tmp_path / "store",
            progress=False,
        )
    finally:
        handle.remove()
    first = manifest.timesteps[0]["t"]
    stored = open_store(tmp_path / "store").load("transformer_blocks.1", first, format="torch")
    call = calls[2]  # calls 0-1: the schedule probe; 2: the first real step
    assert call.shape[0] == 2 and torch.allclose(stored, call[1:]) and not torch.allclose(stored, call[:1])


# ---- bad input: a clear error (exit 2), never a traceback -----------------------------------------------------
def test_timesteps_out_of_range_and_sigmas_outside_0_1(family_dirs, image_folder, capsys, tmp_path):
    model = model_args("sd3", family_dirs)
    base = ["capture", *model, "--images", str(image_folder), "--layers", "transformer_blocks.0", "--quiet"]
    assert main([*base, "--timesteps", "1000", "--out", str(tmp_path / "a")]) == 2
    assert "out of range" in capsys.readouterr().err
    for bad in ("0", "1.5", "-0.1"):
        assert main([*base, "--sigmas", bad, "--out", str(tmp_path / "b")]) == 2
        assert "outside (0, 1]" in capsys.readouterr().err
    sdxl = ["capture", *model_args("sdxl", family_dirs), "--images", str(image_folder), "--layers", "mid_block"]
    assert main([*sdxl, "--sigmas", "0.5", "--out", str(tmp_path / "c")]) == 2
    assert "DDPM-family" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_update_of_a_shape_changing_module_is_refused(family_dirs, image_folder, capsys, tmp_path):
    assert (
        main(
            [
                "capture",
                *model_args("sdxl", family_dirs),
                "--images",
                str(image_folder),
                "--layers",
                "down_blocks.0@update",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "needs a module whose output has its input's shape" in err and "Traceback" not in err


def test_text_stream_of_a_block_without_one_is_refused(family_dirs, image_folder, capsys, tmp_path):
    assert (
        main(
            [
                "capture",
                *model_args("pixart", family_dirs),
                "--images",
                str(image_folder),
                "--layers",
                "transformer_blocks.0@text",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "has no text stream" in capsys.readouterr().err
    # SD3's last joint block updates only the image tokens
    assert (
        main(
            [
                "capture",
                *model_args("sd3", family_dirs),
                "--images",
                str(image_folder),
                "--layers",
                "transformer_blocks.1@text",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "returns no text stream" in capsys.readouterr().err
    assert (
        main(
            [
                "capture",
                *model_args("sd3", family_dirs),
                "--images",
                str(image_folder),
                "--layers",
                "transformer_blocks.0@texts",
                "--out",
                str(tmp_path / "u"),
            ]
        )
        == 2
    )
    assert "unknown suffix" in capsys.readouterr().err


def test_sdxl_directory_missing_its_second_encoder(family_dirs, capsys, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(family_dirs["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    assert main(["layers", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "text_encoder_2" in err and "missing" in err and "Traceback" not in err


def test_sdxl_pipeline_without_its_second_encoder(family_dirs):
    from diffusers import StableDiffusionXLPipeline

    from diffdissect.errors import ModelLoadError

    pipe = StableDiffusionXLPipeline.from_pretrained(family_dirs["sdxl"], text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ModelLoadError, match="text_encoder_2, tokenizer_2"):
        load_target(pipe)


def test_a_flow_model_from_a_factory_without_a_scheduler_is_refused(family_dirs, capsys, tmp_path, monkeypatch):
    (tmp_path / "flowfactory.py").write_text(
        "from diffusers import FluxTransformer2DModel\n"
        f"def make():\n    return FluxTransformer2DModel.from_pretrained({str(family_dirs['flux'] / 'transformer')!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["layers", "--model", "flowfactory:make"]) == 2
    err = capsys.readouterr().err
    assert "flow-matching" in err and "DDPM" in err


def test_the_scheduler_guard_asks_what_the_scheduler_is(family_dirs):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from diffdissect.errors import SpecError
    from diffdissect.models.levels import process_of
    from diffdissect.models.noising import alphas_cumprod

    sana = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert hasattr(sana, "alphas_cumprod") and process_of(sana) == "flow"  # the attribute is there, and wrong
    with pytest.raises(SpecError, match="flow-matching"):
        alphas_cumprod(sana)
    assert process_of(DPMSolverMultistepScheduler()) == "ddpm" and process_of(DDPMScheduler()) == "ddpm"

    class Custom:  # a scheduler diffdissect does not know, with an alphas_cumprod
        def __init__(self) -> None:
            self.config = {"num_train_timesteps": 1000}
            self.alphas_cumprod = torch.ones(1000)

    with pytest.raises(SpecError, match="cannot tell"):
        process_of(Custom())


def test_guidance_embedding_only_for_guidance_distilled_flux(family_dirs, image_folder, capsys, tmp_path):
    from diffdissect.models.tiny_families import tiny_flux_pipeline

    schnell = tmp_path / "schnell"
    tiny_flux_pipeline(0, guidance=False).save_pretrained(schnell)
    base = [
        "capture",
        "--images",
        str(image_folder),
        "--layers",
        "transformer_blocks.0",
        "--resolution",
        "32",
        "--limit",
        "1",
        "--quiet",
    ]
    assert main([*base, "--model", str(schnell), "--guidance-embedding", "3", "--out", str(tmp_path / "a")]) == 2
    assert "no guidance embedding" in capsys.readouterr().err
    assert main([*base, "--model", str(schnell), "--out", str(tmp_path / "b")]) == 0  # schnell: none used
    assert (
        main(
            [
                "capture",
                *model_args("sd3", family_dirs),
                "--images",
                str(image_folder),
                "--layers",
                "transformer_blocks.0",
                "--guidance-embedding",
                "3",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "FLUX" in capsys.readouterr().err
    dev = load("flux", family_dirs)
    seen = []
    handle = dev.denoiser.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"]), with_kwargs=True)
    capture(
        dev,
        FolderSource(image_folder),
        CaptureConfig(layers=["transformer_blocks.0"], guidance_embedding=5.0, limit=1),
        tmp_path / "d",
        progress=False,
    )
    handle.remove()
    real = [g for g in seen if g.device.type != "meta"]  # the shape probe runs on meta
    assert real and all(float(g[0]) == 5.0 for g in real)


def test_an_unsupported_family_is_named_never_a_traceback(family_dirs, capsys):
    from diffusers import DiffusionPipeline

    from diffdissect.errors import ModelLoadError

    sd3 = pipeline("sd3", family_dirs)

    class MyTextToImagePipeline(DiffusionPipeline):  # a transformer pipeline diffdissect does not model
        def __init__(self, transformer, text_encoder, tokenizer, vae, scheduler):
            super().__init__()
            self.register_modules(
                transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler
            )

    mine = MyTextToImagePipeline(sd3.transformer, sd3.text_encoder, sd3.tokenizer, sd3.vae, sd3.scheduler)
    with pytest.raises(ModelLoadError, match="MyTextToImagePipeline is not supported yet"):
        load_target(mine)
    # SDXL's UNet alone (no pooled embeddings, no time ids): refused by name, not a TypeError in get_aug_embed
    assert main(["layers", "--model", str(family_dirs["sdxl"] / "unet")]) == 2
    err = capsys.readouterr().err
    assert "text_time" in err and "Traceback" not in err


@pytest.mark.parametrize("name", FAMILIES)
def test_the_shape_probe_runs_on_meta(name, family_dirs):
    """No real forward to learn row shapes: SDXL's nested added_cond_kwargs once forced one (seconds at full size)."""
    from diffdissect.capture.engine import probe_row_shapes

    target = load(name, family_dirs)
    devices: list[str] = []
    handle = target.denoiser.register_forward_pre_hook(
        lambda m, a, k: devices.append((a[0] if a else k["hidden_states"]).device.type), with_kwargs=True
    )
    try:
        probe_row_shapes(target, [WORKFLOW_LAYER[name]], CaptureConfig(layers=[WORKFLOW_LAYER[name]]))
    finally:
        handle.remove()
    assert devices == ["meta"]


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_per_image_captions_condition_each_image(name, family_dirs, image_folder, image_csv, tmp_path):
    """--use-captions: each row is conditioned on its own caption (one encode_prompt per batch of captions)."""
    target = load(name, family_dirs)
    layer = WORKFLOW_LAYER[name]
    source = FolderSource(image_folder, image_csv)
    common = {"layers": [layer], "timesteps": [300], "dtype": "float32", "limit": 2, "batch_size": 2}
    capture(target, source, CaptureConfig(use_captions=True, **common), tmp_path / "captions", progress=False)
    rows = open_store(tmp_path / "captions").rows()
    mixed = open_store(tmp_path / "captions").load(layer, 300, format="torch")
    for i, row in enumerate(rows):
        out = tmp_path / f"fixed{i}"
        capture(target, source, CaptureConfig(prompt=row["caption"], **common), out, progress=False)
        fixed = open_store(out).load(layer, 300, format="torch")
        assert torch.allclose(mixed[i], fixed[i], atol=1e-5), (i, row["caption"])
        assert not torch.allclose(mixed[1 - i], fixed[1 - i], atol=1e-5)  # the other image's caption differs
