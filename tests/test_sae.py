"""The k-SAE: its maths, training (AuxK, resume, NaN), metrics with known answers, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffdissect.errors import SpecError, StoreError
from diffdissect.sae import NonFiniteTrainingError, SAEConfig, TopKSAE, TrainConfig, evaluate, load_sae, train_sae
from diffdissect.sae.train import sae_loss
from diffdissect.store import write_array_store


def planted_features(n: int = 600, d: int = 16, atoms: int = 24, active: int = 3, seed: int = 0) -> np.ndarray:
    """Sparse combinations of fixed unit atoms: what a TopK SAE should take apart."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for i in range(n):
        codes[i, rng.choice(atoms, active, replace=False)] = rng.uniform(1, 3, active)
    return (codes @ dictionary + 0.5).astype(np.float32)


@pytest.fixture
def sae_store(tmp_path):
    x = planted_features()
    rows = [{"input_id": f"im{i}"} for i in range(len(x))]
    spatial = np.repeat(x[:, :, None, None], 4, axis=2).reshape(len(x), 16, 2, 2)
    write_array_store(tmp_path / "store", {("pooled", 10): x, ("pooled", 90): x * 2}, rows)
    write_array_store(tmp_path / "maps", {("maps", 10): spatial}, rows)
    return tmp_path


def small_sae(**overrides) -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(**{"d_in": 16, "n_latents": 64, "k": 4, **overrides}))


# ---- maths --------------------------------------------------------------------------------------
def test_sparse_and_dense_decoders_agree():
    sae = small_sae()
    sae.initialise_from(torch.from_numpy(planted_features()))
    x = torch.from_numpy(planted_features(seed=1))
    codes, _ = sae.encode(x)
    assert codes.indices.shape == (len(x), 4)
    torch.testing.assert_close(sae.decode(codes), sae.decode_dense(sae.dense_codes(codes)), atol=1e-5, rtol=1e-5)


def test_sparse_encoder_gradients_equal_dense_autograd():
    sae = small_sae()
    x = torch.from_numpy(planted_features())[:50]
    codes, _ = sae.encode(x)
    sae.decode(codes).pow(2).sum().backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x * sae.input_scale - sae.b_dec) @ sae.W_enc.t() + sae.b_enc  # the textbook encoder
    values, indices = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(1, indices, torch.relu(values))
    ((dense @ sae.W_dec + sae.b_dec) / sae.input_scale).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_decoder_rows_stay_unit_norm_and_lose_parallel_gradient(sae_store):
    sae = small_sae()
    x = torch.from_numpy(planted_features())
    loss, *_ = sae_loss(sae, x, None, 0.0)
    loss.backward()
    sae.remove_parallel_gradient()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-6
    summary = train_sae(
        sae_store / "store",
        TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=128, steps=40, checkpoint_every=20),
        sae_store / "run",
        progress=False,
    )
    trained, _ = load_sae(sae_store / "run")
    torch.testing.assert_close(trained.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    assert summary["metrics"]["fvu"] < 0.5


def test_auxk_revives_planted_dead_latents():
    x = torch.from_numpy(planted_features())
    results = {}
    for alpha in (0.0, 1 / 32):
        sae = small_sae()
        sae.initialise_from(x)
        with torch.no_grad():  # latents 0..15: weak encoders that never win the top-k
            sae.W_enc[:16] *= 0.01
        optimiser = torch.optim.Adam(sae.parameters(), lr=3e-3)
        dead = torch.zeros(64, dtype=torch.bool)
        dead[:16] = True
        for _ in range(150):
            loss, *_ = sae_loss(sae, x, dead, alpha)
            optimiser.zero_grad()
            loss.backward()
            sae.remove_parallel_gradient()
            optimiser.step()
            sae.normalise_decoder()
        codes, _ = sae.encode(x)
        fired = torch.zeros(64, dtype=torch.bool)
        fired[codes.indices[codes.values > 0]] = True
        results[alpha] = int(fired[:16].sum())
    assert results[0.0] == 0  # without AuxK they get no gradient at all
    assert results[1 / 32] >= 8  # AuxK pulls most of them back into use


def test_batchtopk_keeps_k_per_row_on_average():
    sae = small_sae(variant="batchtopk")
    x = torch.from_numpy(planted_features())
    sae.train()
    codes, _ = sae.encode(x)
    assert (codes.values > 0).sum().item() == pytest.approx(4 * len(x), abs=4)
    assert (codes.values > 0).sum(1).float().std() > 0  # not a fixed k per row


def test_batchtopk_inference_is_jumprelu_at_one_threshold_over_all_latents():
    """Defect 3: at inference a BatchTopK SAE is pre * (pre > threshold) over every latent (dense reference),
    so a row may use more than k latents, as in training; not 'top k per row, then threshold'."""
    sae = small_sae(variant="batchtopk")
    x = torch.from_numpy(planted_features())
    sae.initialise_from(x)
    threshold = sae.calibrate_threshold(x)
    assert float(sae.threshold) == threshold > 0
    sae.eval()
    codes, _ = sae.encode(x)
    pre = (x * sae.input_scale - sae.b_dec) @ sae.W_enc.t() + sae.b_enc  # the textbook encoder
    reference = torch.relu(pre) * (pre > threshold)
    torch.testing.assert_close(sae.dense_codes(codes), reference)
    per_row = (reference > 0).sum(1)
    assert per_row.max() > 4  # some rows use more than k, as training allows
    assert per_row.float().mean().item() == pytest.approx(4, abs=0.05)  # calibrated: mean L0 = k
    sae.threshold.fill_(0.0)  # a row above the 4k cap: the width grows to fit
    codes, _ = sae.encode(x[:5])
    torch.testing.assert_close(sae.dense_codes(codes), torch.relu(pre[:5]))


def test_batchtopk_checkpoint_holds_the_calibrated_threshold_and_reports_that_model(sae_store):
    config = TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=100, steps=40, variant="batchtopk")
    summary = train_sae(sae_store / "store", config, sae_store / "btk", progress=False)
    sae, info = load_sae(sae_store / "btk")
    assert info["inference"]["form"] == "jumprelu"
    assert float(sae.threshold) == pytest.approx(info["inference"]["threshold"]) and float(sae.threshold) > 0
    from diffdissect.sae.data import SliceData
    from diffdissect.store import open_store

    heldout = SliceData(open_store(sae_store / "store"), "pooled", 10, False, 0.1).heldout()
    again = evaluate(sae, heldout)
    assert summary["metrics"]["l0"] == pytest.approx(again["l0"]) and summary["metrics"]["fvu"] == pytest.approx(
        again["fvu"]
    )


def test_resumed_training_equals_uninterrupted(sae_store, monkeypatch):
    config = TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=100, steps=60, checkpoint_every=20)
    train_sae(sae_store / "store", config, sae_store / "whole", progress=False)

    from diffdissect.sae import data as sae_data

    original = sae_data.SliceData.batches

    def interrupted(self, *args, **kwargs):
        for i, batch in enumerate(original(self, *args, **kwargs)):
            if i == 45:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(sae_data.SliceData, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(sae_store / "store", config, sae_store / "resumed", progress=False)
    assert load_sae(sae_store / "resumed")[1]["step"] == 40
    monkeypatch.setattr(sae_data.SliceData, "batches", original)
    summary = train_sae(sae_store / "store", config, sae_store / "resumed", progress=False)
    whole, _ = load_sae(sae_store / "whole")
    resumed, _ = load_sae(sae_store / "resumed")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert summary["step"] == 60


# ---- metrics with known answers --------------------------------------------------------------------
def test_metrics_of_an_identity_sae():
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=4, k=4, normalise="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0, 0, 2], [0, 3, 0, 1], [1, 1, 0, 0], [2, 0, 0, 0]])
    m = evaluate(sae, x)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert m["l0"] == pytest.approx(7 / 4)
    assert m["frequency"] == pytest.approx([3 / 4, 2 / 4, 0, 2 / 4])
    assert m["dead_fraction"] == pytest.approx(1 / 4)


def test_fvu_is_centred():
    """An SAE that only outputs the data mean scores FVU = 1 (uncentred variance would flatter it)."""
    sae = TopKSAE(SAEConfig(d_in=3, n_latents=3, k=1, normalise="none"))
    x = torch.tensor([[10.0, 10, 10], [12, 10, 8], [8, 10, 12], [10, 12, 8]])
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # nothing fires
        sae.b_dec.copy_(x.mean(0))
    assert evaluate(sae, x)["fvu"] == pytest.approx(1.0)


def test_per_location_tokens(sae_store):
    summary = train_sae(
        sae_store / "maps",
        TrainConfig(layer="maps", t=10, tokens=True, k=4, n_latents=64, batch_size=256, steps=10),
        sae_store / "tok",
        progress=False,
    )
    assert summary["slice"]["train_tokens"] == 540 * 4 and summary["metrics"]["tokens"] == 60 * 4


# ---- bad input -------------------------------------------------------------------------------------
def test_missing_slice_is_refused(sae_store):
    with pytest.raises(StoreError, match="no slice pooled @ t=50.*timesteps: \\[10, 90\\]"):
        train_sae(sae_store / "store", TrainConfig(layer="pooled", t=50), sae_store / "x", progress=False)


def test_k_larger_than_the_dictionary_is_refused(sae_store):
    with pytest.raises(SpecError, match="k=80 must be between 1 and n_latents=64"):
        train_sae(
            sae_store / "store", TrainConfig(layer="pooled", t=10, k=80, n_latents=64), sae_store / "x", progress=False
        )


def test_nan_in_the_store_is_refused_before_training(tmp_path):
    x = planted_features()
    x[::7] = np.nan
    write_array_store(tmp_path / "store", {("pooled", 10): x}, [{"input_id": f"im{i}"} for i in range(len(x))])
    # the store's reader refuses the slice and names the shard, before any training (issue 21)
    with pytest.raises(StoreError, match=r"shard shard-000000.safetensors: slice pooled@t=10 holds NaN"):
        train_sae(
            tmp_path / "store", TrainConfig(layer="pooled", t=10, k=4, n_latents=64), tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("poison", ["input", "loss"])
def test_nan_mid_training_stops_and_keeps_the_last_good_checkpoint(sae_store, monkeypatch, poison):
    from diffdissect.sae import data as sae_data
    from diffdissect.sae import train as sae_train

    original_batches, original_loss = sae_data.SliceData.batches, sae_train.sae_loss

    def batches(self, *args, **kwargs):
        for i, batch in enumerate(original_batches(self, *args, **kwargs)):
            yield batch * float("nan") if (poison == "input" and i == 7) else batch

    calls = []

    def loss(*args):
        calls.append(1)
        value, *rest = original_loss(*args)
        return (value * float("nan") if len(calls) == 8 else value, *rest)

    if poison == "input":
        monkeypatch.setattr(sae_data.SliceData, "batches", batches)
    else:
        monkeypatch.setattr(sae_train, "sae_loss", loss)
    config = TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=50, steps=30, checkpoint_every=5)
    why = "input batch holds NaN" if poison == "input" else "loss became nan"
    with pytest.raises(NonFiniteTrainingError, match=rf"stopped at step 7: the {why}.*checkpoint \(step 5\) is kept"):
        train_sae(sae_store / "store", config, sae_store / "run", progress=False)
    sae, info = load_sae(sae_store / "run")
    assert info["step"] == 5 and all(torch.isfinite(p).all() for p in sae.parameters())


def test_checkpoint_with_another_d_in_is_refused(sae_store):
    train_sae(
        sae_store / "store",
        TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=100, steps=5),
        sae_store / "run",
        progress=False,
    )
    with pytest.raises(StoreError, match="takes d_in=16 inputs but these features have d_in=32"):
        load_sae(sae_store / "run", d_in=32)


def test_resuming_with_other_settings_is_refused(sae_store):
    train_sae(
        sae_store / "store",
        TrainConfig(layer="pooled", t=10, k=4, n_latents=64, batch_size=100, steps=5),
        sae_store / "run",
        progress=False,
    )
    with pytest.raises(SpecError, match="other settings \\(k differ"):
        train_sae(
            sae_store / "store",
            TrainConfig(layer="pooled", t=10, k=8, n_latents=64, batch_size=100, steps=5),
            sae_store / "run",
            progress=False,
        )


# ---- the command line ---------------------------------------------------------------------------------
def test_cli_sweep_trains_every_combination_and_writes_features(sae_store, tmp_path, capsys):
    import json

    from diffdissect.cli import main

    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"layers": ["pooled"], "timesteps": [10, 90], "n_latents": 32, "batch_size": 100}))
    assert (
        main(
            [
                "sae",
                "train",
                str(sae_store / "store"),
                "--config",
                str(config),
                "--k",
                "2",
                "4",
                "--train-steps",
                "20",
                "--out",
                str(tmp_path / "runs"),
                "--quiet",
            ]
        )
        == 0
    )
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [
        "pooled@t=10-pool-topk-k2-n32",
        "pooled@t=10-pool-topk-k4-n32",
        "pooled@t=90-pool-topk-k2-n32",
        "pooled@t=90-pool-topk-k4-n32",
    ]
    assert "held-out FVU" in capsys.readouterr().out
    assert main(["sae", "features", str(tmp_path / "runs" / runs[0]), "--top", "5"]) == 0
    features = json.loads((tmp_path / "runs" / runs[0] / "features.json").read_text())
    assert len(features["latents"]) == 32 and features["top_n"] == 5
    assert (tmp_path / "runs" / runs[0] / "browser.html").read_text().startswith("<!DOCTYPE html>")


def test_cli_sweep_without_layers_is_refused(sae_store, tmp_path, capsys):
    from diffdissect.cli import main

    assert main(["sae", "train", str(sae_store / "store"), "--timesteps", "10", "--out", str(tmp_path / "r")]) == 2
    assert "no layers given" in capsys.readouterr().err


def test_purity_and_auroc_known_answers():
    from diffdissect.sae.features import auroc_table, purity, random_purity, revelio_sigma

    assert purity(["a", "a", "a", "a"]) == {"entropy": 0.0, "majority": 1.0, "majority_label": "a"}
    mixed = purity(["a", "b", "c", "d"])
    assert mixed["entropy"] == pytest.approx(2.0) and mixed["majority"] == 0.25
    assert revelio_sigma(np.array([0, 0, 2, 2])) == pytest.approx(1.0)
    labels = np.array(["x"] * 50 + ["y"] * 50)
    baseline = random_purity(labels, 10, draws=300)
    assert 0.5 <= baseline["majority_mean"] < 0.8 and baseline["entropy_mean"] > 0.7
    scores = np.stack([np.r_[np.ones(50), np.zeros(50)], np.r_[np.zeros(50), np.ones(50)], np.zeros(100)], 1)
    table = auroc_table(scores, labels)
    assert table["x"].tolist() == [1.0, 0.0, 0.5] and table["y"].tolist() == [0.0, 1.0, 0.5]
