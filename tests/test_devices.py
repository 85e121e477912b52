"""Every analysis on any device, checked without a GPU.

- A TorchFunctionMode guard fails any tensor factory (torch.zeros, arange, tensor, ...) that diffdissect's
  own code calls without `device=`: on a GPU such a tensor would land on the CPU and the step would fail.
  It runs an SAE training run, a feature pass and probe fits on the CPU.
- The SAE maths (initialisation, loss, sparse backward, update) and the store stream also run on `meta`.
- Tests marked `gpu` run the same work on CUDA and compare it with the CPU; they skip without CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffdissect.cli import main
from diffdissect.errors import SpecError
from diffdissect.probe.linear import fit_probe_tasks
from diffdissect.sae import TrainConfig, train_sae
from diffdissect.sae.checkpoint import load_sae
from diffdissect.sae.features import FeaturesConfig, analyse_features
from diffdissect.sae.model import SAEConfig, TopKSAE
from diffdissect.sae.train import NonFiniteTrainingError, apply_update, sae_loss
from diffdissect.store import open_store
from diffdissect.store.from_arrays import write_array_store
from diffdissect.store.stream import MixingStream

SOURCE = str(Path(__import__("diffdissect").__file__).parent)
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.tensor,
    torch.empty_strided,
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class DeviceGuard(TorchFunctionMode):
    """Records every tensor factory called from diffdissect's source without `device=`."""

    def __init__(self) -> None:
        super().__init__()
        self.offences: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and ("/torch/" in frame.f_code.co_filename):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(SOURCE):
                self.offences.append(f"{func.__name__} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return func(*args, **kwargs)


def token_store(path: Path, n: int = 48, d: int = 8, hw: int = 3, seed: int = 0, shard_rows: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(16, d)).astype(np.float32)
    codes = rng.random((n, hw * hw, 16)) * (rng.random((n, hw * hw, 16)) < 0.2)
    maps = (codes @ atoms).transpose(0, 2, 1).reshape(n, d, hw, hw).astype(np.float32)
    rows = [{"input_id": f"img{i}", "label": ["a", "b", "c"][i % 3]} for i in range(n)]
    write_array_store(path, {("blk", 10): maps}, rows, shard_rows=shard_rows, dtype="float16")
    return path


@pytest.fixture(scope="module")
def tokens_store(tmp_path_factory) -> Path:
    return token_store(tmp_path_factory.mktemp("devices") / "store")


def small_config(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "layer": "blk",
            "t": 10,
            "tokens": True,
            "n_latents": 32,
            "k": 4,
            "batch_size": 64,
            "steps": 3,
            "checkpoint_every": 2,
            **overrides,
        }
    )


# ---- the guard ----------------------------------------------------------------------------------------
def test_the_guard_catches_a_factory_without_device():
    """The check can fail: the sparse backward as it was (torch.arange(n) with no device) is caught."""
    guard = DeviceGuard()
    with guard:
        exec(
            compile("import torch\nx = torch.arange(4)\ny = torch.zeros(2, device='cpu')", f"{SOURCE}/fake.py", "exec")
        )  # noqa: S102
    assert guard.offences == ["arange at fake.py:2"]


def test_sae_training_features_and_probes_create_every_tensor_on_a_device(tokens_store, tmp_path):
    guard = DeviceGuard()
    with guard:
        train_sae(tokens_store, small_config(variant="batchtopk"), tmp_path / "sae", progress=False)
        analyse_features(tmp_path / "sae", config=FeaturesConfig(max_map_values=0))  # the top-maps pass
        analyse_features(tmp_path / "sae")  # every map kept
        x = torch.randn(2, 60, 5, device="cpu")
        y = torch.randint(0, 3, (1, 60), device="cpu")
        for solver in ("batched", "lbfgsb"):
            fit_probe_tasks(
                x[:, :30],
                y[:, :30],
                x[:, 30:45],
                y[:, 30:45],
                x[:, 45:],
                [3],
                solver=solver,
                l2_grid=(0.1, 1.0),
                max_iter=20,
            )
    assert guard.offences == []


# ---- meta: the SAE maths and the stream on a device that is not the CPU --------------------------------------
@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_sae_step_runs_on_meta(variant):
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=32, k=4, variant=variant), device="meta")
    x = torch.randn(64, 8, device="meta")
    sae.initialise_from(x, median_iters=2)
    loss, *_ = sae_loss(sae, x, None, 1 / 32)
    apply_update(sae, torch.optim.Adam(sae.parameters(), lr=1e-3), loss)
    assert {p.device.type for p in sae.parameters()} == {"meta"}
    assert {p.grad.device.type for p in sae.parameters()} == {"meta"}


def test_the_store_stream_runs_on_meta(tokens_store):
    """The accelerator branch (staging in the stored dtype, the move, layout change and gathers on the device)."""
    reader = open_store(tokens_store)
    stream = MixingStream(reader, "blk", 10, 40, tokens=True, dtype=torch.float32, device="meta", epochs=1)
    batches = list(stream)
    assert len(batches) == 48 * 9 // 40 and all(b.device.type == "meta" and b.shape == (40, 8) for b in batches)


# ---- bad input and other devices --------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tokens_store, tmp_path, capsys):
    with pytest.raises(SpecError, match="no CUDA device"):
        train_sae(tokens_store, small_config(device="cuda"), tmp_path / "sae", progress=False)
    code = main(
        [
            "sae",
            "train",
            str(tokens_store),
            "--layers",
            "blk",
            "--timesteps",
            "10",
            "--tokens",
            "--k",
            "4",
            "--n-latents",
            "32",
            "--train-steps",
            "2",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 2 and "diffdissect: error:" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_checkpoint_loads_on_another_device(tokens_store, tmp_path):
    train_sae(tokens_store, small_config(), tmp_path / "sae", progress=False)
    cpu, _ = load_sae(tmp_path / "sae")
    meta, _ = load_sae(tmp_path / "sae", device="meta")
    assert {p.device.type for p in meta.state_dict().values()} == {"meta"}
    assert {p.device.type for p in cpu.state_dict().values()} == {"cpu"}


def test_float16_overflow_stops_like_nan(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    x[::4] *= 1e6  # rows beyond float16's range (65504)
    write_array_store(tmp_path / "store", {("blk", 10): x}, [{"input_id": f"i{i}"} for i in range(64)])
    config = TrainConfig(
        layer="blk", t=10, n_latents=16, k=2, batch_size=32, steps=4, dtype="float16", normalise="none"
    )
    with pytest.raises(NonFiniteTrainingError, match="float16"):
        train_sae(tmp_path / "store", config, tmp_path / "sae", progress=False)


def test_compute_dtype_bfloat16_trains_close_to_float32(tokens_store, tmp_path):
    full = train_sae(tokens_store, small_config(steps=6), tmp_path / "f32", progress=False)
    half = train_sae(tokens_store, small_config(steps=6, dtype="bfloat16"), tmp_path / "bf16", progress=False)
    assert abs(full["metrics"]["fvu"] - half["metrics"]["fvu"]) < 0.05


def test_a_run_resumes_on_another_device_name(tokens_store, tmp_path):
    """The device is not part of what is learnt: a run started with one device name resumes under another."""
    train_sae(tokens_store, small_config(steps=2), tmp_path / "sae", progress=False)
    again = train_sae(tokens_store, small_config(steps=2, device="cpu:0"), tmp_path / "sae", progress=False)
    assert again["step"] == 2


# ---- CUDA (skipped here; run where a GPU is present: pytest -m gpu) ------------------------------------------
@pytest.mark.gpu
@cuda
def test_sae_on_cuda_matches_the_cpu(tokens_store, tmp_path):
    cpu = train_sae(tokens_store, small_config(steps=4), tmp_path / "cpu", progress=False)
    gpu = train_sae(tokens_store, small_config(steps=4, device="cuda"), tmp_path / "gpu", progress=False)
    assert abs(cpu["metrics"]["fvu"] - gpu["metrics"]["fvu"]) < 1e-3
    sae, _ = load_sae(tmp_path / "gpu")  # trained on CUDA, loaded on the CPU
    assert sae.W_dec.device.type == "cpu"


@pytest.mark.gpu
@cuda
def test_stream_on_cuda_gives_the_cpu_batches(tokens_store):
    reader = open_store(tokens_store)
    on_cpu = list(MixingStream(reader, "blk", 10, 40, tokens=True, dtype=torch.float32, seed=5))
    on_gpu = list(MixingStream(reader, "blk", 10, 40, tokens=True, dtype=torch.float32, seed=5, device="cuda"))
    assert all(g.is_cuda and torch.equal(c, g.cpu()) for c, g in zip(on_cpu, on_gpu, strict=True))


@pytest.mark.gpu
@cuda
def test_probes_and_features_on_cuda(tokens_store, tmp_path):
    x = torch.randn(3, 90, 6, device="cpu")
    y = torch.randint(0, 3, (1, 90), device="cpu")
    args = (x[:, :50], y[:, :50], x[:, 50:70], y[:, 50:70], x[:, 70:], [3])
    cpu = fit_probe_tasks(*args, solver="batched")
    gpu = fit_probe_tasks(*(a.cuda() if torch.is_tensor(a) else a for a in args))
    assert gpu.solver == "batched" and (cpu.test_pred == gpu.test_pred).mean() > 0.95
    train_sae(tokens_store, small_config(), tmp_path / "sae", progress=False)
    on_cpu, _, _ = analyse_features(tmp_path / "sae")
    on_gpu, _, _ = analyse_features(tmp_path / "sae", config=FeaturesConfig(device="cuda"))
    assert [l["top"] for l in on_cpu["latents"]] == [l["top"] for l in on_gpu["latents"]]


# ---- the streaming feature pass against a dense reference -------------------------------------------------------
@pytest.mark.parametrize("cap", [0, 10**9])
def test_streaming_features_equal_the_dense_codes(tokens_store, tmp_path, cap):
    """Per-image values, top images and their maps from the streaming pass (scatter-max; with cap 0 a second
    pass over the top images only) equal those of the dense (tokens x latents) code matrix."""
    from diffdissect.sae.data import SliceData
    from diffdissect.sae.features import image_activations

    train_sae(tokens_store, small_config(), tmp_path / "sae", progress=False)
    sae, info = load_sae(tmp_path / "sae")
    reader = open_store(tokens_store)
    data = SliceData(reader, "blk", 10, True, info["train"]["heldout_fraction"])
    acts = image_activations(sae, data, FeaturesConfig(top_n=3, max_map_values=cap, batch_tokens=20))
    x = torch.from_numpy(reader.load("blk", 10)).float()[torch.from_numpy(data.heldout_rows)]
    with torch.no_grad():
        dense = sae.dense_codes(sae.encode(x.flatten(2).transpose(1, 2).reshape(-1, 8))[0])
    dense = dense.view(len(x), 9, -1)  # (images, locations, latents)
    np.testing.assert_allclose(acts.values, dense.amax(1).numpy(), rtol=1e-6)
    assert (acts.maps is None) == (cap == 0)
    for j in range(sae.config.n_latents):
        for r, position in enumerate(acts.top[j]):
            expected = dense[position, :, j].view(3, 3).half().numpy()
            np.testing.assert_array_equal(acts.top_maps[j, r], expected)
            np.testing.assert_array_equal(acts.map_of(int(position), j), expected)
