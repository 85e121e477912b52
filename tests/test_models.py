"""Loading targets through `diffdissect.load_target`: the same code a user runs, on tiny saved models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_FACTORY, build_hf_cache, state_dicts_equal
from diffdissect import load_target
from diffdissect.errors import DiffdissectError, ModelLoadError
from diffdissect.models.tiny import (
    TinyDenoiser,
    tiny_denoiser,
    tiny_dit_pipeline,
    tiny_sd_pipeline,
    tiny_unet2d,
    tiny_unet2d_condition,
)

# diffusers passes a deprecated argument to huggingface_hub when it reads the hub cache
pytestmark = pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")


# ---- each kind from its saved directory ----------------------------------------------------------------
def test_load_sd_pipeline_dir(sd_dir):
    target = load_target(sd_dir)
    assert target.kind == "text_unet"
    assert type(target.denoiser).__name__ == "UNet2DConditionModel"
    assert target.resolution == 32 and target.vae_scale_factor == 4
    assert target.sample_shape() == (4, 8, 8)
    assert target.is_latent and target.takes_text and not target.takes_class
    assert target.text_encoder is not None and target.tokenizer is not None and target.pipeline is not None
    assert type(target.scheduler).__name__ == "PNDMScheduler"
    assert target.num_train_timesteps == 1000
    assert target.source == str(sd_dir)
    # the weights are the saved ones, not a fresh initialisation
    assert state_dicts_equal(target.denoiser, tiny_sd_pipeline(0).unet)
    assert not target.denoiser.training and not any(p.requires_grad for p in target.denoiser.parameters())


def test_load_dit_pipeline_dir(dit_dir):
    target = load_target(dit_dir)
    assert target.kind == "dit"
    assert type(target.denoiser).__name__ == "DiTTransformer2DModel"
    assert target.resolution == 32
    assert target.sample_shape() == (4, 8, 8)
    assert target.takes_class and not target.takes_text
    assert target.null_class == 1000
    assert target.id2label[3] == "cat" and target.id2label[5] == "dog" and len(target.id2label) == 10
    assert type(target.scheduler).__name__ == "DDIMScheduler"
    assert state_dicts_equal(target.denoiser, tiny_dit_pipeline(0).transformer)


def test_load_bare_unet2d_dir(unet2d_dir):
    target = load_target(unet2d_dir)
    assert target.kind == "unet2d"
    assert target.resolution == 16
    assert target.sample_shape() == (3, 16, 16)
    assert target.vae is None and target.pipeline is None and not target.is_latent
    assert not target.takes_text and not target.takes_class
    assert type(target.scheduler).__name__ == "DDPMScheduler"  # nothing saved beside it: the default
    assert state_dicts_equal(target.denoiser, tiny_unet2d(0))


def test_load_bare_unet2d_condition_dir(unet2d_cond_dir):
    target = load_target(Path(unet2d_cond_dir))  # a Path works as well as a str
    assert target.kind == "unet2d_condition"
    assert target.resolution == 8
    assert target.sample_shape() == (4, 8, 8)
    assert target.takes_text and target.text_encoder is None
    assert state_dicts_equal(target.denoiser, tiny_unet2d_condition(0))
    # no text encoder: the empty prompt is a zero context of the cross-attention width
    emb = target.conditioning(None, None, 2)["encoder_hidden_states"]
    assert emb.shape == (2, 1, 16) and not emb.any()


def test_scheduler_saved_beside_a_bare_model_is_used(tmp_path, unet2d_dir):
    import diffusers

    model_dir = tmp_path / "with-scheduler"
    shutil.copytree(unet2d_dir, model_dir)
    diffusers.DDIMScheduler(num_train_timesteps=500).save_pretrained(model_dir)
    target = load_target(model_dir)
    assert type(target.scheduler).__name__ == "DDIMScheduler"
    assert target.num_train_timesteps == 500


def test_resolution_and_dtype_overrides(sd_dir):
    target = load_target(sd_dir, resolution=64, dtype=torch.bfloat16)
    assert target.resolution == 64
    assert target.sample_shape() == (4, 16, 16)
    assert target.dtype == torch.bfloat16
    assert next(target.vae.parameters()).dtype == torch.bfloat16


# ---- plain nn.Module: factory string and object ----------------------------------------------------------
def test_load_factory_string():
    target = load_target(TINY_FACTORY)
    assert target.kind == "module"
    assert isinstance(target.denoiser, TinyDenoiser)
    assert target.source == TINY_FACTORY
    assert target.resolution == 16 and target.sample_shape() == (3, 16, 16)
    assert target.pixel_channels == 3 and target.vae is None
    assert type(target.scheduler).__name__ == "DDPMScheduler"
    assert state_dicts_equal(target.denoiser, tiny_denoiser(0))


def test_load_module_object():
    model = tiny_denoiser(7)
    target = load_target(model)
    assert target.kind == "module"
    assert target.denoiser is model
    assert target.source == "TinyDenoiser"
    assert target.sample_shape() == (3, 16, 16)


def test_load_pipeline_object():
    pipe = tiny_dit_pipeline(0)
    target = load_target(pipe)
    assert target.kind == "dit"
    assert target.denoiser is pipe.transformer
    assert target.null_class == 1000


def test_load_diffusers_model_object():
    target = load_target(tiny_unet2d(1))
    assert target.kind == "unet2d" and target.sample_shape() == (3, 16, 16)


# ---- hub ids, offline, from a hand-built Hugging Face cache ---------------------------------------------
@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, sd_dir, dit_dir, unet2d_dir):
    cache = tmp_path_factory.mktemp("hf-cache")
    build_hf_cache(cache, "tiny-org/tiny-sd", sd_dir)
    build_hf_cache(cache, "tiny-org/tiny-dit", dit_dir)
    build_hf_cache(cache, "tiny-org/tiny-unet", unet2d_dir)
    return cache


def test_load_hub_pipeline_from_cache(hf_cache):
    target = load_target("tiny-org/tiny-sd", cache_dir=str(hf_cache), local_files_only=True)
    assert target.kind == "text_unet"
    assert target.source == "tiny-org/tiny-sd"
    assert target.sample_shape() == (4, 8, 8)
    assert state_dicts_equal(target.denoiser, tiny_sd_pipeline(0).unet)


def test_load_hub_dit_from_cache(hf_cache):
    target = load_target("tiny-org/tiny-dit", cache_dir=str(hf_cache), local_files_only=True)
    assert target.kind == "dit" and target.null_class == 1000 and target.id2label[3] == "cat"


def test_load_hub_bare_model_from_cache_offline_by_env(hf_cache):
    # local_files_only defaults to HF_HUB_OFFLINE (set to 1 by the autouse fixture)
    target = load_target("tiny-org/tiny-unet", cache_dir=str(hf_cache))
    assert target.kind == "unet2d"
    assert target.sample_shape() == (3, 16, 16)
    assert state_dicts_equal(target.denoiser, tiny_unet2d(0))


def test_load_hub_id_missing_from_cache(hf_cache):
    with pytest.raises(ModelLoadError) as err:
        load_target("tiny-org/not-there", cache_dir=str(hf_cache), local_files_only=True)
    message = str(err.value)
    assert "tiny-org/not-there" in message
    assert "cache" in message and "HF_HUB_OFFLINE" in message


def test_load_hub_id_with_missing_weights(tmp_path, unet2d_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    shutil.copy(unet2d_dir / "config.json", broken / "config.json")
    build_hf_cache(tmp_path / "cache", "tiny-org/broken", broken)
    with pytest.raises(ModelLoadError, match="tiny-org/broken"):
        load_target("tiny-org/broken", cache_dir=str(tmp_path / "cache"), local_files_only=True)


# ---- bad sources: each a ModelLoadError that says what to do ---------------------------------------------
def test_unknown_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        load_target(str(missing))
    assert str(missing) in str(err.value)
    assert "no such directory" in str(err.value)
    assert isinstance(err.value, DiffdissectError)


@pytest.mark.parametrize("typo", ["./my-sd", "../my-sd", "my-sd"])
def test_relative_path_typo_is_not_taken_for_a_hub_id(typo, tmp_path, monkeypatch):
    # the issue's own example is `--model ./my-sd`: a typo there must say "no such directory"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_target(typo)


def test_hub_like_name_that_is_no_directory_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such local directory.*hub or its cache"):
        load_target("runs/my-sd", cache_dir=str(tmp_path / "empty-cache"), local_files_only=True)


def test_file_instead_of_directory(sd_dir):
    with pytest.raises(ModelLoadError, match="is a file.*model_index.json"):
        load_target(sd_dir / "model_index.json")


def test_directory_without_model_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="neither model_index.json.*nor config.json.*save_pretrained"):
        load_target(tmp_path)


def test_config_without_class_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="_class_name"):
        load_target(tmp_path)


def test_config_with_unknown_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NotADiffusersModel"}))
    with pytest.raises(ModelLoadError, match="NotADiffusersModel.*not a diffusers model class"):
        load_target(tmp_path)


def test_model_dir_without_weights(tmp_path, unet2d_dir):
    shutil.copy(unet2d_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="could not load the UNet2DModel"):
        load_target(tmp_path)


def test_broken_pipeline_dir(tmp_path, dit_dir):
    broken = tmp_path / "dit"
    shutil.copytree(dit_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="could not load the pipeline"):
        load_target(broken)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("diffdissect.models.tiny:no_such_factory", "cannot import.*no_such_factory"),
        ("no_such_package_xyz.models:build", "cannot import.*no_such_package_xyz"),
        ("os.path:join", "failed when called with no arguments"),  # needs arguments
        ("diffdissect:__version__", "returned a str, not an nn.Module"),  # not a module
        ("torch.nn:Identity", "in_channels.*sample_size"),  # no input size to go by
    ],
)
def test_bad_factory(spec, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load_target(spec)


def test_unsupported_source_type():
    with pytest.raises(ModelLoadError, match="cannot load a model from a int"):
        load_target(42)


# ---- random_init: the same architecture with other weights, deterministic per seed -----------------------
def _first_differing(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("source", ["sd", "dit", "unet2d", "module"])
def test_random_init(source, sd_dir, dit_dir, unet2d_dir):
    where = {"sd": sd_dir, "dit": dit_dir, "unet2d": unet2d_dir, "module": TINY_FACTORY}[source]
    trained = load_target(where)
    control = load_target(where, random_init=True, seed=5)
    again = load_target(where, random_init=True, seed=5)
    other = load_target(where, random_init=True, seed=6)

    # same architecture: class, config, parameter names and shapes
    assert type(control.denoiser) is type(trained.denoiser)
    assert control.kind == trained.kind and control.sample_shape() == trained.sample_shape()
    s_trained, s_control = trained.denoiser.state_dict(), control.denoiser.state_dict()
    assert {k: v.shape for k, v in s_trained.items()} == {k: v.shape for k, v in s_control.items()}
    assert control.identity()["config_sha256"] == trained.identity()["config_sha256"]
    # other weights: most weight matrices differ
    differing = _first_differing(trained.denoiser, control.denoiser)
    weights = [k for k, v in s_trained.items() if v.ndim >= 2]
    assert len([k for k in differing if k in weights]) >= 0.9 * len(weights)
    # deterministic per seed, different across seeds
    assert state_dicts_equal(control.denoiser, again.denoiser)
    assert _first_differing(control.denoiser, other.denoiser)
    # the identity records the control
    ident_trained, ident_control = trained.identity(), control.identity()
    assert ident_control["weights_fingerprint"] != ident_trained["weights_fingerprint"]
    assert ident_control["weights_fingerprint"] == again.identity()["weights_fingerprint"]
    assert ident_control["weights_fingerprint"] != other.identity()["weights_fingerprint"]
    assert ident_control["random_init_seed"] == 5 and ident_trained["random_init_seed"] is None
    # eval mode, frozen
    assert not control.denoiser.training
    assert not any(p.requires_grad for p in control.denoiser.parameters())
    # a pipeline samples with the re-initialised denoiser
    if control.pipeline is not None:
        name = "transformer" if control.kind == "dit" else "unet"
        assert getattr(control.pipeline, name) is control.denoiser


def test_random_init_leaves_the_callers_module_alone():
    model = tiny_denoiser(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    control = load_target(model, random_init=True, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _first_differing(model, control.denoiser)


def test_random_init_keeps_vae_and_text_encoder(sd_dir):
    trained, control = load_target(sd_dir), load_target(sd_dir, random_init=True, seed=0)
    assert state_dicts_equal(trained.vae, control.vae)
    assert state_dicts_equal(trained.text_encoder, control.text_encoder)


def test_random_init_leaves_the_callers_pipeline_alone():
    pipe = tiny_sd_pipeline(0)
    trained_unet = pipe.unet
    control = load_target(pipe, random_init=True, seed=1)
    assert pipe.unet is trained_unet  # the caller's pipeline still has its trained UNet
    assert control.pipeline is not pipe and control.pipeline.unet is control.denoiser
    assert _first_differing(trained_unet, control.denoiser)


class _WithBareParameter(torch.nn.Module):
    """A module whose own parameter has no reset_parameters() (like a ViT's position embedding)."""

    in_channels, sample_size = 3, 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.offset = torch.nn.Parameter(torch.full((1, 3, 1, 1), 5.0))

    def forward(self, sample, timestep):
        return self.conv(sample) + self.offset


def test_random_init_reinitialises_parameters_without_reset_parameters():
    control = load_target(_WithBareParameter(), random_init=True, seed=0)
    offset = control.denoiser.offset.detach()
    assert not torch.all(offset == 5.0) and offset.abs().max() < 0.2


def test_target_kinds_have_one_meaning_and_old_records_read_under_the_new_names(sd_dir, tmp_path):
    import json

    from diffdissect.models.identity import comparable
    from diffdissect.store.manifest import MANIFEST, Manifest

    target = load_target(sd_dir)
    assert target.kind == "text_unet"  # a conditional UNet with a text encoder, not "SD"
    identity = target.identity()
    assert identity["kind"] == "text_unet" and comparable(identity)["kind"] == "sd"  # spec hashes stay as before
    old = Manifest(
        mode="images",
        spec={},
        spec_hash="x",
        model={**identity, "kind": "sd"},
        timesteps=[],
        layers={},
        dtype="float16",
    )
    (tmp_path / MANIFEST).write_text(json.dumps(old.to_json()))
    assert Manifest.load(tmp_path).model["kind"] == "text_unet"
