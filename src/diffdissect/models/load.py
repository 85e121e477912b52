"""Load a target through diffusers' own `from_pretrained`: a local directory, a hub id, or a module.

Accepted sources:
  * a pipeline directory (model_index.json): Stable-Diffusion-like or DiT-like pipelines;
  * a model directory (config.json with `_class_name`): UNet2DModel, UNet2DConditionModel,
    DiTTransformer2DModel, ... ; a scheduler_config.json beside it or in ../scheduler is used;
  * a hub id ("org/name"), resolved offline from the local cache when HF_HUB_OFFLINE=1;
  * "package.module:factory": an importable callable returning an nn.Module with a
    `forward(sample, timestep, ...)` contract (or a diffusers pipeline);
  * in Python, an nn.Module or a DiffusionPipeline object.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffdissect.errors import ModelLoadError
from diffdissect.models.target import Target
from diffdissect.runtime import load_factory

_HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")  # "./x" or "../x" is a path, never a hub id
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_target(
    source: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    random_init: bool = False,
    seed: int = 0,
    resolution: int | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> Target:
    """Load what `source` names and return a :class:`Target` on `device`.

    `random_init=True` re-initialises the denoiser's weights (seeded) with the same architecture:
    the control that shows what training added. The VAE and text encoder stay as loaded.
    """
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    target = _load(source, dtype=dtype, cache_dir=cache_dir, local_files_only=local_files_only)
    if resolution is not None:
        target.resolution = int(resolution)
    if random_init:
        target.denoiser = reinitialise(target.denoiser, seed)
        target.random_init_seed = seed
        if target.pipeline is not None:  # a new pipeline object: the caller's keeps its trained denoiser
            slot = "unet" if "unet" in target.pipeline.components else "transformer"
            target.pipeline = type(target.pipeline)(**{**target.pipeline.components, slot: target.denoiser})
    for module in (target.denoiser, target.vae, target.text_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    return target.to(device)


def _load(source: Any, *, dtype, cache_dir, local_files_only) -> Target:
    from diffusers import DiffusionPipeline

    if isinstance(source, DiffusionPipeline):
        return from_pipeline(source, getattr(source, "name_or_path", None) or type(source).__name__)
    if isinstance(source, nn.Module):
        return from_module(source, type(source).__name__)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ModelLoadError(
            f"cannot load a model from a {type(source).__name__}; pass a directory, "
            "a hub id, 'package.module:factory', an nn.Module or a DiffusionPipeline."
        )
    path = Path(source).expanduser()
    if path.is_dir():
        target = _load_dir(path, dtype=dtype)
        target.model_dir = str(path.resolve())
        return target
    if path.exists():
        raise ModelLoadError(
            f"{source} is a file; pass the directory that holds model_index.json "
            "(a pipeline) or config.json (a single model)."
        )
    if _FACTORY.match(source):
        return _load_factory(source)
    if _looks_local(source):
        raise ModelLoadError(
            f"unknown model {source!r}: no such directory (a local path is never looked "
            "up on the hub); check the spelling, or pass a hub id 'org/name'."
        )
    if _HUB_ID.match(source):
        return _load_hub(source, dtype=dtype, cache_dir=cache_dir, local_files_only=local_files_only)
    raise ModelLoadError(
        f"unknown model {source!r}: no such directory, and it is neither a hub id "
        "('org/name') nor 'package.module:factory'."
    )


def _looks_local(source: str) -> bool:
    """A spelling only a path has (./x, ../x, /x, ~/x, a/b/c), or an 'org/name' whose 'org' is a local folder."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source:
        return True
    parent = Path(source).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not valid JSON ({exc}); restore it from the model's source "
            "(or save the model again with `save_pretrained`)."
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not a diffusers config.")
    return data


def _load_dir(path: Path, *, dtype) -> Target:
    from diffusers import DiffusionPipeline

    if (path / "model_index.json").is_file():
        _check_pipeline_dir(path)
        try:
            pipe = DiffusionPipeline.from_pretrained(path).to(dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"diffusers could not load the pipeline in {path}: {exc}") from exc
        return from_pipeline(pipe, str(path))
    config = path / "config.json"
    if config.is_file():
        class_name = _read_json(config).get("_class_name")
        if not class_name:
            raise ModelLoadError(
                f"{config} has no '_class_name'; it is not a diffusers model directory "
                "(transformers models such as classifiers are not diffusion targets)."
            )
        cls = _model_class(class_name, path)
        try:
            model = cls.from_pretrained(path).to(dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"diffusers could not load the {class_name} in {path}: {exc}") from exc
        return from_module(model, str(path), scheduler=_scheduler_beside(path))
    raise ModelLoadError(
        f"{path} holds neither model_index.json (a diffusers pipeline) nor config.json "
        "(a diffusers model); save models with `save_pretrained`."
    )


def _check_pipeline_dir(path: Path) -> None:
    """Every component model_index.json names must have its folder: name the missing one clearly."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path / 'model_index.json'} is unreadable ({exc}); it is not a diffusers pipeline."
        ) from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path / 'model_index.json'} is not a JSON object; it is not a diffusers pipeline.")
    missing = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and value[0] is not None
        and value[1] is not None
        and not (path / name).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{path}: model_index.json lists {', '.join(missing)}, but the folder"
            f"{'s are' if len(missing) > 1 else ' is'} missing; copy the complete pipeline "
            "(every component folder), or save it again with save_pretrained."
        )


def _load_hub(repo_id: str, *, dtype, cache_dir, local_files_only) -> Target:
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only}
    hint = (
        " Offline: put the model in the Hugging Face cache first (or pass a local directory); "
        "HF_HUB_OFFLINE=1 makes diffdissect read the cache only."
    )
    try:
        hf_hub_download(repo_id, "model_index.json", **kwargs)
        is_pipeline = True
    except Exception:
        is_pipeline = False
    try:
        if is_pipeline:
            target = from_pipeline(DiffusionPipeline.from_pretrained(repo_id, **kwargs).to(dtype=dtype), repo_id)
            target.model_dir = str(Path(hf_hub_download(repo_id, "model_index.json", **kwargs)).parent)
            return target
        config_path = hf_hub_download(repo_id, "config.json", **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {repo_id!r}: there is no such local directory, and it could not be "
            f"loaded from the hub or its cache: {exc}{hint}"
        ) from exc
    class_name = json.loads(Path(config_path).read_text()).get("_class_name", "")
    cls = _model_class(class_name, repo_id)
    try:
        model = cls.from_pretrained(repo_id, **kwargs).to(dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the {class_name} {repo_id!r} from the hub or its cache: {exc}{hint}"
        ) from exc
    target = from_module(model, repo_id, scheduler=_scheduler_beside(Path(config_path).parent))
    target.model_dir = str(Path(config_path).parent)
    return target


def _load_factory(spec: str) -> Target:
    from diffusers import DiffusionPipeline

    made = load_factory(spec, what="model", error=ModelLoadError)
    if isinstance(made, DiffusionPipeline):
        return from_pipeline(made, spec)
    if not isinstance(made, nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(made).__name__}, not an nn.Module or pipeline.")
    # a module may carry its own scheduler (`module.scheduler`): a flow-matching model must
    return from_module(made, spec, scheduler=getattr(made, "scheduler", None))


def _model_class(class_name: str, where: Any) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{where}: model class {class_name!r} is not a diffusers model class.")
    return cls


def _scheduler_beside(path: Path):
    """The scheduler saved beside a model directory, if any (else the caller's default)."""
    from diffusers import SchedulerMixin

    for candidate in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            name = _read_json(candidate).get("_class_name")
            cls = getattr(__import__("diffusers"), str(name), None)
            if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
                raise ModelLoadError(
                    f"{candidate}: {name!r} is not a diffusers scheduler class; name one such as "
                    "DDPMScheduler or DDIMScheduler in its '_class_name'."
                )
            try:
                return cls.from_pretrained(candidate.parent)
            except Exception as exc:
                raise ModelLoadError(f"diffusers could not load the scheduler in {candidate.parent}: {exc}") from exc
    return None


def from_pipeline(pipe: Any, source: str) -> Target:
    """A target from an already-built diffusers pipeline (SD-like or DiT-like)."""
    from diffdissect.models.families import family_of

    components = pipe.components
    vae = components.get("vae")
    scale = _vae_scale(pipe, vae)
    family = family_of(pipe, source)
    if family is not None:
        return _family_target(pipe, source, family, scale)
    if components.get("unet") is not None:
        unet = components["unet"]
        _refuse_added_conditioning(unet, f"{source}: {type(pipe).__name__}")
        kind = "text_unet" if components.get("text_encoder") is not None else "unet2d_condition"
        if type(unet).__name__ == "UNet2DModel":
            kind = "unet2d"
        return Target(
            denoiser=unet,
            scheduler=pipe.scheduler,
            kind=kind,
            source=source,
            resolution=_size(unet) * scale,
            vae=vae,
            text_encoder=components.get("text_encoder"),
            tokenizer=components.get("tokenizer"),
            pipeline=pipe,
        )
    if components.get("transformer") is not None:
        transformer = components["transformer"]
        if components.get("text_encoder") is not None:
            raise ModelLoadError(
                f"{source}: {type(pipe).__name__} is not supported yet; the text-conditioned "
                "transformer families diffdissect models are SD3/SD3.5, FLUX.1, PixArt-alpha/Sigma "
                "and Sana (and the DiT-like class-conditional pipelines)."
            )
        labels = getattr(pipe, "labels", None) or {}  # DiTPipeline keeps name -> id (names may be "a, b")
        id2label = {int(i): name for name, i in labels.items()}
        return Target(
            denoiser=transformer,
            scheduler=pipe.scheduler,
            kind="dit",
            source=source,
            resolution=_size(transformer) * scale,
            vae=vae,
            pipeline=pipe,
            null_class=_null_class(transformer),
            id2label=id2label,
        )
    raise ModelLoadError(f"{source}: the pipeline has neither a 'unet' nor a 'transformer' component.")


def _refuse_added_conditioning(unet: nn.Module, where: str) -> None:
    """A UNet with an added embedding (SDXL's text_time, Kolors, ...) cannot run on plain text states."""
    added = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if added is not None:
        raise ModelLoadError(
            f"{where} has a UNet with an added '{added}' embedding, which needs its pipeline's "
            "extra conditioning (SDXL: pooled text embeddings and time ids). diffdissect supports it "
            "through a StableDiffusionXLPipeline directory; this one is not supported yet."
        )


def _vae_scale(pipe: Any, vae: Any) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor:
        return int(factor)
    if vae is None:
        return 1
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    if not blocks:
        raise ModelLoadError(
            f"cannot tell the compression of the {type(vae).__name__}; its config names no "
            "block_out_channels or encoder_block_out_channels."
        )
    return 2 ** (len(blocks) - 1)


def _family_target(pipe: Any, source: str, family: Any, scale: int) -> Target:
    from diffdissect.models.levels import process_of

    components = pipe.components
    denoiser = components.get("unet") or components.get("transformer")
    if denoiser is None:
        raise ModelLoadError(f"{source}: the {family.name} pipeline has neither a 'unet' nor a 'transformer'.")
    try:
        process_of(pipe.scheduler)
    except Exception as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc
    size = getattr(denoiser.config, "sample_size", None)
    if size is None:  # FLUX's transformer names no size: the pipeline's default one
        size = getattr(pipe, "default_sample_size", 128)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    kind = {"SDXL": "sdxl", "SD3": "sd3", "FLUX": "flux", "PixArt": "pixart", "Sana": "sana"}[family.name]
    return Target(
        denoiser=denoiser,
        scheduler=pipe.scheduler,
        kind=kind,
        source=source,  # type: ignore[arg-type]
        resolution=size * scale,
        vae=components.get("vae"),
        text_encoder=components.get("text_encoder"),
        tokenizer=components.get("tokenizer"),
        pipeline=pipe,
        family=family,
    )


def from_module(model: nn.Module, source: str, scheduler: Any = None) -> Target:
    """A target from a bare denoiser: a diffusers UNet/transformer or any nn.Module(sample, timestep).

    Without a scheduler a plain module is taken to be a DDPM-family model (DDPMScheduler, 1000 steps);
    a module that is a flow-matching denoiser (or a transformer that only runs inside its pipeline) is
    refused rather than silently noised the DDPM way.
    """
    from diffusers import DDPMScheduler

    from diffdissect.models.families import PIPELINE_ONLY_DENOISERS

    name = type(model).__name__
    if name in PIPELINE_ONLY_DENOISERS:
        family = PIPELINE_ONLY_DENOISERS[name]
        flow = (
            " It is a flow-matching model, so it must not be noised with a DDPM default either."
            if family in ("SD3", "FLUX", "Sana")
            else ""
        )
        raise ModelLoadError(
            f"{source}: a bare {name} is the denoiser of a {family} pipeline; it runs only with "
            f"that pipeline's text encoders, conditioning and scheduler. Load the pipeline directory "
            f"(model_index.json) or a factory returning the pipeline.{flow}"
        )
    _refuse_added_conditioning(model, f"{source}: a bare {name}")
    if scheduler is None and getattr(getattr(model, "config", None), "prediction_type", None) == "flow":
        raise ModelLoadError(
            f"{source}: {name} is a flow-matching model but came without a scheduler; give the "
            "module a `scheduler` attribute (e.g. FlowMatchEulerDiscreteScheduler) or return a "
            "pipeline, so it is not noised the DDPM way."
        )
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000)
    kinds = {
        "UNet2DConditionModel": "unet2d_condition",
        "UNet2DModel": "unet2d",
        "DiTTransformer2DModel": "transformer2d",
        "Transformer2DModel": "transformer2d",
    }
    kind = kinds.get(name, "module")
    try:
        size = _size(model)
        channels = int(getattr(getattr(model, "config", None), "in_channels", None) or model.in_channels)
    except (AttributeError, TypeError) as exc:
        raise ModelLoadError(
            f"{source}: cannot tell the input size of {name}; give the module "
            "attributes `in_channels` and `sample_size` (or a diffusers config)."
        ) from exc
    return Target(
        denoiser=model,
        scheduler=scheduler,
        kind=kind,
        source=source,
        resolution=size,
        pixel_channels=channels,
        null_class=_null_class(model) if kind == "transformer2d" else None,
    )


def _size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "sample_size", None) if cfg is not None else None
    size = size if size is not None else model.sample_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _null_class(transformer: nn.Module) -> int | None:
    """DiT's unconditional class id: the extra embedding row after the real classes."""
    n = getattr(transformer.config, "num_embeds_ada_norm", None)
    return int(n) if n is not None else None


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with fresh random weights (seeded): the random-init control."""
    # derive the init seed so that seed 0 never reproduces weights a builder made with manual_seed(0)
    init_seed = int.from_bytes(hashlib.sha256(f"diffdissect-random-init:{seed}".encode()).digest()[:8], "little") >> 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if hasattr(model, "from_config") and hasattr(model, "config"):
            fresh = type(model).from_config(model.config)
            return fresh.to(dtype=next(model.parameters()).dtype)
        model = copy.deepcopy(model)  # never overwrite the caller's (trained) module in place
        covered: set[int] = set()
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                covered.update(id(p) for p in module.parameters(recurse=False))
        with torch.no_grad():  # parameters no reset_parameters() owns: a small normal init, as in ViTs
            for param in model.parameters():
                if id(param) not in covered:
                    param.normal_(0.0, 0.02)
    return model
