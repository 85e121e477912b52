"""What a model *is*, for refusing to mix two models' data: the full content of every component that shapes
stored numbers, independent of where the files live or how their path is spelled.

`model_identity` hashes, in a fixed order, every tensor (name, dtype, shape, bytes) of the denoiser, the VAE and
the text encoder(s), the tokenizer's vocabulary and length limit, each component's config and the scheduler's
config, all without the keys that only say where a file was loaded from (`_name_or_path`, `_diffusers_version`,
...). Hashing runs at about 1 GB/s; a resume does not pay it again when the model directory's files still have
the sizes and modification times recorded beside the digest (`files`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# config keys that record where or with what a file was saved, not what the model computes
LOCATION_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_diffusers_version",
        "transformers_version",
        "_commit_hash",
        "_use_default_values",
    }
)
# identity keys that describe where the model lives: recorded, but never compared
WHERE_KEYS = frozenset({"source", "files"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model")


def clean_config(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able data without the keys that only say where it came from."""
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in sorted(data.items()) if k not in LOCATION_KEYS}


def config_digest(config: Any) -> str:
    return hashlib.sha256(json.dumps(clean_config(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def update_with_module(h: hashlib._Hash, name: str, module: nn.Module | None) -> None:
    """Feed a module's class, config and every tensor's name, dtype, shape and bytes into `h`."""
    h.update(f"<{name}:{type(module).__name__ if module is not None else None}>".encode())
    if module is None:
        return
    h.update(json.dumps(clean_config(getattr(module, "config", None)), sort_keys=True, default=str).encode())
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tokenizer_digest(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), default=str).encode())
    h.update(str(getattr(tokenizer, "model_max_length", None)).encode())
    merges = getattr(tokenizer, "bpe_ranks", None)  # CLIP's BPE merges shape the token ids too
    if merges:
        h.update(json.dumps(sorted((" ".join(k), v) for k, v in merges.items())).encode())
    return h.hexdigest()[:16]


def scheduler_identity(scheduler: Any) -> dict[str, Any]:
    config = clean_config(getattr(scheduler, "config", None))
    return {"class": type(scheduler).__name__, "config_sha256": config_digest(config)}


def file_stats(directory: str | Path | None) -> dict[str, list[int]] | None:
    """{relative path: [size, mtime_ns]} of the files a model directory holds (the cache key of its digest)."""
    if directory is None or not Path(directory).is_dir():
        return None
    root = Path(directory)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            st = path.stat()
            out[path.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def content_digest(components: list[tuple[str, nn.Module | None]], tokenizers: list[Any], scheduler: Any) -> str:
    h = hashlib.sha256(b"diffdissect-model-content-v2")
    for name, module in components:
        update_with_module(h, name, module)
    for tokenizer in tokenizers:
        h.update(f"tokenizer:{tokenizer_digest(tokenizer)}".encode())
    h.update(json.dumps(scheduler_identity(scheduler), sort_keys=True).encode())
    return h.hexdigest()


# Target kinds renamed for one meaning each (old -> new): "sd" meant any conditional UNet with a text encoder.
KIND_RENAMES = {"sd": "text_unet"}
_KIND_AS_HASHED = {new: old for old, new in KIND_RENAMES.items()}


def current_kind(identity: dict[str, Any]) -> dict[str, Any]:
    """A recorded identity with its kind under today's name (old manifests and run records say "sd")."""
    kind = identity.get("kind")
    return {**identity, "kind": KIND_RENAMES[kind]} if kind in KIND_RENAMES else identity


def comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """The parts of an identity that must agree (not where the model lives). The kind is compared under its
    name from before the renames, so stores and runs recorded before them keep their spec hashes and resume."""
    out = {k: v for k, v in identity.items() if k not in WHERE_KEYS}
    if out.get("kind") in _KIND_AS_HASHED:
        out["kind"] = _KIND_AS_HASHED[out["kind"]]
    return out


# identity keys that do not change when the same weights are loaded in another dtype
DTYPE_FREE_KEYS = ("class", "config_sha256", "num_parameters")


def model_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str | None, bool]:
    """(the first key on which two model identities disagree, or None; whether the content was compared exactly).

    The content digest hashes every tensor's bytes in the dtype it was loaded in, so the same weights loaded in
    float16 and float32 digest differently: when the recorded dtype differs from the current one, only what does
    not depend on the dtype is compared (class, denoiser config, parameter count) and the answer is not exact.
    Identities without a content digest (older records) compare class, parameter count and weights fingerprint.
    """
    same_dtype = recorded.get("dtype") is None or current.get("dtype") is None or recorded["dtype"] == current["dtype"]
    if not same_dtype:
        keys: tuple[str, ...] = DTYPE_FREE_KEYS
    elif recorded.get("content_sha256") and current.get("content_sha256"):
        keys = ("content_sha256",)
    else:
        keys = ("class", "num_parameters", "weights_fingerprint")
    for key in keys:
        if key in recorded and key in current and recorded[key] != current[key]:
            return key, same_dtype
    return None, same_dtype


def check_same_model(
    recorded: dict[str, Any],
    current: dict[str, Any],
    what: str,
    fix: str,
    error: type[Exception] | None = None,
    noun: str = "model",
) -> None:
    """Raise `error` (DiffdissectError by default) when `recorded` is another model than `current`; warn when
    the dtypes differ, so that the weights could be compared only by class, config and parameter count.
    `what` names the thing recorded (e.g. "the SAE at DIR was trained on activations of"); `fix` says what to do."""
    import warnings

    from diffdissect.errors import DiffdissectError

    key, exact = model_mismatch(recorded, current)
    if key is not None:
        raise (error or DiffdissectError)(
            f"{what} another {noun} ({key} {recorded[key]}, this model has {current[key]}); {fix}"
        )
    if not exact:
        warnings.warn(
            f"{what} a model loaded as {recorded.get('dtype')}, this one is {current.get('dtype')}: its "
            "class, config and parameter count agree, but its weights could not be compared exactly.",
            stacklevel=3,
        )
