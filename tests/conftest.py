"""Shared fixtures: tiny randomly initialised models saved with `save_pretrained`, image folders, HF caches.

Every model fixture is session-scoped and builds its model once (deterministically, seed 0) into a
directory under pytest's temporary root; tests load it back through `diffdissect.load_target`, the code a
user runs. Treat the session fixtures' directories as read-only: copy them (`shutil.copytree`) before
changing anything inside.

Models (see `diffdissect.models.tiny`):
  sd_dir          StableDiffusionPipeline: 3x32x32 images -> 4x8x8 latents, PNDM scheduler, 16-dim text
  dit_dir         DiTPipeline: 3x32x32 images -> 4x8x8 latents, 16 tokens, classes 0..9, null class 1000
  unet2d_dir      bare UNet2DModel, pixel space 3x16x16 (no scheduler saved: DDPM default)
  unet2d_cond_dir bare UNet2DConditionModel, 4x8x8 inputs, cross_attention_dim 16
  TINY_FACTORY    "diffdissect.models.tiny:tiny_denoiser": a plain nn.Module, 3x16x16
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Before any Hugging Face library is imported (they read these once, at import): never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and OpenMP threads spin badly when the CPU is shared
# (2 cores, other jobs): one thread keeps the suite fast everywhere. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from _store_helpers import write_labels_csv

torch.set_num_threads(1)

TINY_FACTORY = "diffdissect.models.tiny:tiny_denoiser"

# The image folder fixture: sizes differ from every model's resolution (16 and 32 px), so that every
# capture exercises resize + centre crop; labels are DiT class names (cat = 3, dog = 5) and captions use
# words the tiny CLIP tokenizer knows, each one different.
IMAGE_SIZES = [(40, 36), (24, 50), (64, 64), (33, 20), (50, 40), (20, 20)]  # (width, height)
IMAGE_LABELS = ["cat", "dog", "cat", "dog", "cat", "dog"]
IMAGE_CAPTIONS = ["a red cat", "a blue dog", "a green cat", "the photo of a dog", "a red square", "a blue circle"]


@pytest.fixture(autouse=True)
def _hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs offline: load_target reads HF_HUB_OFFLINE to default to local_files_only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _quiet_libraries() -> None:
    """diffusers/transformers progress bars and advisory logging only clutter test output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# ---- models saved with save_pretrained ---------------------------------------------------------------
@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _saved(models_root: Path, name: str, builder: str) -> Path:
    """Build `diffdissect.models.tiny.<builder>(0)` and `save_pretrained` it under `models_root/name`."""
    from diffdissect.models import tiny

    path = models_root / name
    getattr(tiny, builder)(0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd_dir(models_root: Path) -> Path:
    """A tiny Stable-Diffusion pipeline directory (model_index.json, unet/, vae/, text_encoder/, ...)."""
    return _saved(models_root, "tiny-sd", "tiny_sd_pipeline")


@pytest.fixture(scope="session")
def dit_dir(models_root: Path) -> Path:
    """A tiny class-conditional DiT pipeline directory (model_index.json, transformer/, vae/, scheduler/)."""
    return _saved(models_root, "tiny-dit", "tiny_dit_pipeline")


@pytest.fixture(scope="session")
def unet2d_dir(models_root: Path) -> Path:
    """A bare UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors)."""
    return _saved(models_root, "tiny-unet2d", "tiny_unet2d")


@pytest.fixture(scope="session")
def unet2d_cond_dir(models_root: Path) -> Path:
    """A bare UNet2DConditionModel directory (config.json + weights), no text encoder."""
    return _saved(models_root, "tiny-unet2d-cond", "tiny_unet2d_condition")


# ---- images ------------------------------------------------------------------------------------------
def random_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random RGB image with some structure (a smooth gradient plus noise), as PIL."""
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / max(width + height - 2, 1)], -1)
    pixels = np.clip(base * 160 + rng.integers(0, 96, size=(height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_image_folder(
    folder: Path,
    sizes=IMAGE_SIZES,
    labels=IMAGE_LABELS,
    captions=IMAGE_CAPTIONS,
    seed: int = 0,
    csv_name: str = "labels.csv",
) -> Path:
    """Write PNGs img000.png, img001.png, ... of the given (width, height) sizes and a CSV
    (file, label, caption) named `csv_name` into `folder`. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h) in enumerate(sizes):
        name = f"img{i:03d}.png"
        random_image(w, h, rng).save(folder / name)
        rows.append({"file": name, "label": labels[i % len(labels)], "caption": captions[i % len(captions)]})
    if csv_name:
        write_labels_csv(folder / csv_name, rows)
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six random PNGs (sizes in IMAGE_SIZES, none equal to a model resolution) + labels.csv
    (file,label,caption). Read-only: copy it before corrupting or adding files."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def image_csv(image_folder: Path) -> Path:
    return image_folder / "labels.csv"


# ---- a hand-built Hugging Face hub cache -------------------------------------------------------------
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hf_cache(cache_dir: Path, repo_id: str, model_dir: Path, commit: str = FAKE_COMMIT) -> Path:
    """Lay `model_dir` out as the huggingface_hub cache does for `repo_id`:
    <cache>/models--org--name/snapshots/<commit>/<files> and refs/main holding the commit hash."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---- small helpers -----------------------------------------------------------------------------------
def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def folder_images(folder: Path, limit: int | None = None) -> tuple[list[str], list[Image.Image]]:
    """(file names, RGB PIL images) of a `make_image_folder` folder, in FolderSource's order."""
    names = sorted(p.name for p in Path(folder).glob("*.png"))[:limit]
    return names, [Image.open(Path(folder) / n).convert("RGB") for n in names]


def encode_pixels(target, pixels: torch.Tensor) -> torch.Tensor:
    """x0 for pixels in [-1, 1]: the VAE latent mode scaled by the VAE's scaling factor, or the pixels."""
    if target.vae is None:
        return pixels
    with torch.no_grad():
        return target.vae.encode(pixels).latent_dist.mode() * target.vae.config.scaling_factor


def noised_inputs(
    target, images, ids: list[str], seed: int, t: int, batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser input a capture feeds for `images` at training timestep t and noise seed `seed`,
    rebuilt from the parts: resize/crop -> VAE encode (per batch of `batch_size`, then concatenated, as
    capture does: the memory layout of x0 changes float rounding in the last bit) -> noise_for ->
    scheduler.add_noise."""
    from diffdissect.data.transforms import to_model_pixels
    from diffdissect.models.noising import noise_for

    pixels = torch.stack([to_model_pixels(image, target.resolution) for image in images])
    step = batch_size or len(images)
    x0 = torch.cat([encode_pixels(target, pixels[b : b + step]) for b in range(0, len(images), step)])
    noise = noise_for(ids, seed, tuple(x0.shape[1:]))
    steps = torch.full((len(ids),), t, dtype=torch.long)
    alpha_bar = float(target.scheduler.alphas_cumprod[t])
    return alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise, steps


def hook_outputs(model: torch.nn.Module, paths: list[str], call) -> dict[str, object]:
    """Run `call()` with a plain torch forward hook on each module in `paths`; return each module's raw
    output (first call), exactly as the module returned it (tensor, tuple, ...)."""
    modules = dict(model.named_modules())
    outputs: dict[str, object] = {}

    def keeper(path: str):
        def hook(module, args, out) -> None:  # returns None: a hook's return value would replace the output
            outputs.setdefault(path, out)

        return hook

    handles = [modules[p].register_forward_hook(keeper(p)) for p in paths]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return outputs
