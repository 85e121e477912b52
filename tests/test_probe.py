"""Probes: the batched fit against scikit-learn, splits, statistics, controls and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdissect.cli import main
from diffdissect.errors import DataError, StoreError
from diffdissect.probe import ProbeConfig, SplitConfig, fit_linear_probes, fit_sklearn_probe, run_probes, split_images
from diffdissect.probe.head import fit_attentive_head
from diffdissect.probe.results import LabelInfo, ProbeCell, ProbeResults, SplitInfo
from diffdissect.stats import bootstrap_mean_ci
from diffdissect.store import write_array_store

CLASSES = 4


def synthetic(
    n_images: int = 240, d: int = 12, seeds: int = 1, signal: float = 3.0, rng_seed: int = 0, informative: bool = True
):
    """A store-shaped dataset: cell ("enc", 10) encodes the label linearly, ("enc", 90) is pure noise."""
    rng = np.random.default_rng(rng_seed)
    labels = rng.integers(0, CLASSES, n_images)
    rows, good, noise = [], [], []
    directions = rng.normal(size=(CLASSES, d))
    for i in range(n_images):
        for s in range(seeds):
            rows.append(
                {
                    "input_id": f"img{i:04d}",
                    "seed": s,
                    "label": f"class{labels[i]}",
                    "colour": ["red", "blue"][i % 2],
                    "constant": "same",
                }
            )
            good.append(directions[labels[i]] * (signal if informative else 0) + rng.normal(size=d))
            noise.append(rng.normal(size=d))
    features = {("enc", 10): np.array(good, np.float32), ("enc", 90): np.array(noise, np.float32)}
    return features, rows


@pytest.fixture
def store(tmp_path):
    features, rows = synthetic(seeds=2)
    write_array_store(tmp_path / "store", features, rows, shard_rows=100)
    return tmp_path / "store"


# ---- the maths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["batched", "lbfgsb"])
def test_batched_fit_matches_sklearn_per_cell(solver):
    rng = np.random.default_rng(1)
    cells, n, d = 4, 300, 10
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(cells, n, d)).astype(np.float32)
    for c in range(cells):  # cells from hopeless to easy
        x[c, :, :3] += c * 0.8 * np.eye(3)[y]
    tr, va, te = slice(0, 180), slice(180, 240), slice(240, 300)
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    fit = fit_linear_probes(
        torch.from_numpy(x[:, tr]),
        torch.from_numpy(y[tr]),
        torch.from_numpy(x[:, va]),
        torch.from_numpy(y[va]),
        torch.from_numpy(x[:, te]),
        3,
        l2_grid=grid,
        solver=solver,
    )
    assert fit.converged and fit.solver == solver
    for c in range(cells):
        ref = fit_sklearn_probe(x[c, tr], y[tr], x[c, va], y[va], x[c, te], l2_grid=grid)
        assert fit.chosen[c] == ref["chosen"]
        ours, theirs = (fit.test_pred[c] == y[te]).mean(), (ref["test_pred"] == y[te]).mean()
        assert abs(ours - theirs) <= 0.01, (c, ours, theirs)
    accuracy = (fit.test_pred == y[te]).mean(1)
    assert accuracy[0] < 0.5 < 0.9 < accuracy[-1]  # the planted signal is what is found


def test_l2_selection_prefers_strong_penalty_on_noise():
    rng = np.random.default_rng(2)
    x, y = torch.from_numpy(rng.normal(size=(1, 200, 40)).astype(np.float32)), torch.from_numpy(rng.integers(0, 2, 200))
    fit = fit_linear_probes(x[:, :120], y[:120], x[:, 120:160], y[120:160], x[:, 160:], 2, l2_grid=(1e-4, 1e-2, 10.0))
    assert fit.chosen_l2[0] == 10.0  # fitting noise only raises validation loss


def test_bootstrap_ci_known_answers():
    assert bootstrap_mean_ci(np.ones(50)) == (1.0, 1.0)
    values = np.random.default_rng(0).random(2000) < 0.3
    low, high = bootstrap_mean_ci(values)
    assert low < 0.3 < high and high - low < 0.05
    small_low, small_high = bootstrap_mean_ci(values[:100])
    assert small_high - small_low > high - low  # fewer images, wider interval


def test_split_is_by_image_deterministic_and_order_free():
    ids = [f"im{i}" for i in range(100) for _ in range(3)]  # 3 seeds per image
    split = split_images(ids, SplitConfig(0.6, 0.2, 0.2))
    assert split.counts() == {"train": 60, "val": 20, "test": 20}
    for i in range(100):
        assert len(set(split.row_split[3 * i : 3 * i + 3])) == 1  # seeds of an image stay together
    reordered = split_images(list(reversed(ids)))
    assert reordered.by_image == split.by_image
    other_salt = split_images(ids, SplitConfig(salt="other"))
    assert other_salt.by_image != split.by_image


def test_attentive_head_reads_where_pooling_cannot():
    """The label is where a blob sits: mean pooling erases it, the attentive head finds it."""
    rng = np.random.default_rng(3)
    n = 360
    y = rng.integers(0, 2, n)
    maps = rng.normal(size=(n, 4, 6, 6)).astype(np.float32) * 0.3
    maps[y == 0, :, 1, 1] += 3.0
    maps[y == 1, :, 4, 4] += 3.0
    x, yt = torch.from_numpy(maps), torch.from_numpy(y)
    fit = fit_attentive_head(x[:240], yt[:240], x[240:300], yt[240:300], x[300:], 2, width=16)
    assert (fit.test_pred == y[300:]).mean() >= 0.95
    pooled = x.flatten(2).mean(-1)[None]
    linear = fit_linear_probes(pooled[:, :240], yt[:240], pooled[:, 240:300], yt[240:300], pooled[:, 300:], 2)
    assert (linear.test_pred[0] == y[300:]).mean() < 0.75


# ---- the whole run, with controls ------------------------------------------------------------------
def test_run_finds_the_planted_cell_and_controls_fall_to_chance(store, tmp_path):
    features, rows = synthetic(seeds=2, informative=False)  # same images, a model that learnt nothing
    write_array_store(tmp_path / "random", features, rows, shard_rows=100)
    config = ProbeConfig(
        labels=["label"], shuffled_control=True, random_init_store=str(tmp_path / "random"), bootstrap=500
    )
    results = run_probes(str(store), config, progress=False)
    by = {(r.condition, r.t): r for r in results.results}
    trained, noise = by[("trained", 10)], by[("trained", 90)]
    assert trained.accuracy > 0.9 and trained.ci_low <= trained.accuracy <= trained.ci_high
    assert noise.accuracy < 0.45  # chance is 0.25
    assert by[("shuffled", 10)].accuracy < 0.45
    assert by[("random_init", 10)].accuracy < 0.45
    assert set(trained.seed_accuracy) == {0, 1} and trained.seed_std is not None
    assert results.split.images == {"train": 144, "val": 48, "test": 48}
    assert trained.n_test_images == 48


def test_probe_cli_writes_tables_heatmaps_and_report(store, tmp_path, capsys):
    out = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                str(store),
                "--labels",
                "label",
                "colour",
                "--timesteps",
                "10",
                "--bootstrap",
                "200",
                "--shuffled-control",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "label: cell chosen on validation enc @ t=10" in printed
    data = json.loads((out / "probes.json").read_text())
    assert {r["condition"] for r in data["results"]} == {"trained", "shuffled"}
    assert (out / "probes.csv").read_text().count("\n") == 1 + 2 * 2  # header + labels x conditions x 1 cell
    assert (out / "heatmap_label_trained.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert "shuffled" in report and "cell chosen on validation" in report and "biased upwards" in report
    assert data["summary"][0]["selected_on"] == "validation" and "test_max_accuracy" in data["summary"][0]
    assert len((out / "splits.csv").read_text().splitlines()) == 1 + 240
    typed = ProbeResults.from_json(data)  # the file reads back into the typed results, unchanged
    assert isinstance(typed.results[0], ProbeCell) and typed.results[0].seed_accuracy.keys() == {0, 1}
    assert json.loads(json.dumps(typed.to_json())) == {k: v for k, v in data.items() if k != "summary"}


def test_split_column_is_used_when_given(tmp_path):
    features, rows = synthetic(n_images=80)
    for k, r in enumerate(rows):
        r["fold"] = ["train", "train", "validation", "test"][k % 4]
    write_array_store(tmp_path / "s", features, rows)
    results = run_probes(
        str(tmp_path / "s"), ProbeConfig(labels=["label"], split_column="fold", bootstrap=100), progress=False
    )
    assert results.split.images == {"train": 40, "val": 20, "test": 20}


# ---- bad input -------------------------------------------------------------------------------------
def test_label_column_with_one_class_is_refused(store):
    with pytest.raises(DataError, match="'constant' has 1 class"):
        run_probes(str(store), ProbeConfig(labels=["constant"]), progress=False)


def test_unknown_label_column_names_the_columns(store):
    with pytest.raises(DataError, match="no label column 'shape'.*'label'"):
        run_probes(str(store), ProbeConfig(labels=["shape"]), progress=False)


def test_missing_label_values_are_refused_or_dropped(tmp_path):
    features, rows = synthetic()
    for r in rows[:7]:
        r["label"] = None
    rows[7]["label"] = ""
    write_array_store(tmp_path / "s", features, rows)
    with pytest.raises(DataError, match="missing a value in 8 of 240 rows.*--drop-missing"):
        run_probes(str(tmp_path / "s"), ProbeConfig(labels=["label"]), progress=False)
    results = run_probes(
        str(tmp_path / "s"), ProbeConfig(labels=["label"], drop_missing=True, bootstrap=100), progress=False
    )
    assert results.labels["label"].missing_rows == 8
    r = results.results[0]
    assert r.n_train_images + r.n_val_images + r.n_test_images == 232


def test_split_smaller_than_the_class_count_is_refused(tmp_path):
    features, rows = synthetic(n_images=12)
    write_array_store(tmp_path / "s", features, rows)
    with pytest.raises(DataError, match=r"the val split has \d images .* 4 classes"):
        run_probes(str(tmp_path / "s"), ProbeConfig(labels=["label"], split=SplitConfig(0.8, 0.1, 0.1)), progress=False)


def test_missing_cell_is_an_error_naming_what_is_stored(store):
    with pytest.raises(StoreError, match="timestep t=50 is not in this store; stored timesteps: \\[10, 90\\]"):
        run_probes(str(store), ProbeConfig(labels=["label"], timesteps=[50]), progress=False)
    with pytest.raises(StoreError, match="layer 'dec' is not in this store"):
        run_probes(str(store), ProbeConfig(labels=["label"], layers=["dec"]), progress=False)


def test_control_store_missing_a_cell_is_a_recorded_skip(store, tmp_path):
    features, rows = synthetic(seeds=2, informative=False)
    del features[("enc", 90)]
    write_array_store(tmp_path / "random", features, rows)
    results = run_probes(
        str(store),
        ProbeConfig(labels=["label"], random_init_store=str(tmp_path / "random"), bootstrap=100),
        progress=False,
    )
    assert [s.to_json() for s in results.skipped] == [
        {"condition": "random_init", "layer": "enc", "t": 90, "reason": "cell not in the control store"}
    ]
    assert {(r.condition, r.t) for r in results.results} == {("trained", 10), ("trained", 90), ("random_init", 10)}


def test_control_store_of_other_inputs_is_refused(store, tmp_path):
    features, rows = synthetic(n_images=100, seeds=2)
    write_array_store(tmp_path / "other", features, rows)
    with pytest.raises(DataError, match="lacks .* rows .*capture the same inputs"):
        run_probes(str(store), ProbeConfig(labels=["label"], random_init_store=str(tmp_path / "other")), progress=False)


def test_bad_split_fractions_are_refused(store):
    with pytest.raises(DataError, match="sum to 1"):
        run_probes(str(store), ProbeConfig(labels=["label"], split=SplitConfig(0.5, 0.2, 0.2)), progress=False)


def _fake_cells(cells: list[tuple[str, int, float, float]], condition: str = "trained") -> list[ProbeCell]:
    return [
        ProbeCell(
            label="shape",
            layer=layer,
            t=t,
            condition=condition,
            head="linear",
            accuracy=test,
            ci_low=test - 0.05,
            ci_high=test + 0.05,
            seed_accuracy={0: test},
            seed_std=None,
            chance_uniform=0.25,
            chance_majority=0.25,
            chance_constant=0.25,
            n_train_images=1,
            n_val_images=1,
            n_test_images=1,
            l2=1.0,
            val_accuracy=val,
            train_accuracy=1.0,
        )
        for layer, t, val, test in cells
    ]


def _fake_results(cells: list[tuple[str, int, float, float]], controls: list[ProbeCell] = ()) -> ProbeResults:
    return ProbeResults(
        store="s",
        model={},
        config={},
        cells=[(layer, t) for layer, t, _, _ in cells],
        labels={"shape": LabelInfo(["a", "b", "c", "d"], 0)},
        split=SplitInfo("hash", "salt", {}),
        split_by_image={},
        results=_fake_cells(cells) + list(controls),
    )


def test_headline_cell_is_chosen_on_validation_and_reported_on_test():
    """Defect 1: the headline cell is the validation winner; the test winner is shown apart, marked biased."""
    from diffdissect.probe.output import best_cell, summary_rows

    controls = _fake_cells([("a", 1, 0.40, 0.30), ("b", 1, 0.20, 0.45), ("c", 1, 0.50, 0.25)], "random_init")
    results = _fake_results([("a", 1, 0.90, 0.80), ("b", 1, 0.70, 0.95), ("c", 1, 0.60, 0.60)], controls)
    assert best_cell(results, "shape").layer == "a"
    row = summary_rows(results)[0]
    assert (row.best_layer, row.best_accuracy, row.selected_on) == ("a", 0.80, "validation")
    assert (row.test_max_accuracy, row.test_max_cell) == (0.95, "b @ t=1")
    control = row.control("random_init")
    assert control.best_cell == "c @ t=1" and control.best_accuracy == 0.25
    assert control.test_max_accuracy == 0.45 and control.at_best_cell == 0.30
    data = row.to_json()  # the JSON keeps the flat, prefixed keys of probes.json
    assert data["random_init_best_cell"] == "c @ t=1" and data["random_init_at_best_cell"] == 0.30
    assert "controls" not in data and type(row).from_json(data) == row


def test_validation_chosen_headline_is_unbiased_where_the_test_max_is_not():
    """Over many equal cells the test max overstates the true accuracy; the validation choice does not."""
    from diffdissect.probe.output import summary_rows

    rng = np.random.default_rng(0)
    chosen, maxed = [], []
    for _ in range(200):
        val, test = rng.binomial(200, 0.7, (2, 16)) / 200  # 16 cells, all of true accuracy 0.7
        row = summary_rows(
            _fake_results([(f"l{i}", 0, float(v), float(t)) for i, (v, t) in enumerate(zip(val, test))])
        )[0]
        chosen.append(row.best_accuracy)
        maxed.append(row.test_max_accuracy)
    assert abs(np.mean(chosen) - 0.7) < 0.01
    assert np.mean(maxed) > 0.73


@pytest.mark.parametrize("solver", ["batched", "lbfgsb"])
def test_raw_space_weights_reproduce_the_chosen_probe(solver):
    """coef / intercept on the raw (unstandardised) features give the chosen model's own predictions."""
    rng = np.random.default_rng(2)
    cells, n, d = 2, 240, 6
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(cells, n, d)) * rng.uniform(0.5, 4, size=d) + rng.normal(size=d) * 3).astype(np.float32)
    x[:, :, :3] += 1.5 * np.eye(3)[y]
    tr, va, te = slice(0, 150), slice(150, 190), slice(190, 240)
    fit = fit_linear_probes(
        torch.from_numpy(x[:, tr]),
        torch.from_numpy(y[tr]),
        torch.from_numpy(x[:, va]),
        torch.from_numpy(y[va]),
        torch.from_numpy(x[:, te]),
        3,
        solver=solver,
    )
    for c in range(cells):
        logits = x[c, te] @ fit.coef[c].T + fit.intercept[c]  # fit_linear_probes: one task
        assert (logits.argmax(1) == fit.test_pred[c]).mean() >= 0.98


def test_probe_cli_writes_weights_that_steer_reads(store, tmp_path):
    from diffdissect.intervene.sources import load_direction

    out = tmp_path / "probe"
    assert (
        main(["probe", str(store), "--labels", "colour", "--timesteps", "10", "--bootstrap", "50", "--out", str(out)])
        == 0
    )
    index = json.loads((out / "probe_weights.json").read_text())
    cell = index["cells"][0]
    assert cell["label"] == "colour" and cell["t"] == 10
    width = 1
    for s in json.loads((store / "manifest.json").read_text())["layers"][cell["layer"]]["shape"]:
        width *= s
    direction = load_direction(f"probe:{out}#colour={cell['classes'][0]}", cell["layer"], (width,))
    assert direction.at(10).shape == (width,) and torch.isfinite(direction.at(10)).all()


def test_probe_labels_with_a_slash_round_trip_through_the_weights(tmp_path):
    """A label such as size/cm is written and read back by the index, never parsed out of a tensor key."""
    from diffdissect.intervene.sources import load_direction

    features, rows = synthetic(seeds=1)
    for row in rows:
        row["size/cm"] = row.pop("colour")
    write_array_store(tmp_path / "store", features, rows, shard_rows=100)
    out = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                str(tmp_path / "store"),
                "--labels",
                "size/cm",
                "--timesteps",
                "10",
                "--bootstrap",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cell = json.loads((out / "probe_weights.json").read_text())["cells"][0]
    assert (cell["label"], cell["layer"], cell["t"]) == ("size/cm", "enc", 10)
    direction = load_direction(f"probe:{out}#size/cm=red", "enc", (12,))
    assert direction.at(10).shape == (12,) and torch.isfinite(direction.at(10)).all() and direction.at(10).any()


def test_a_probe_rerun_without_linear_weights_leaves_no_stale_weights(store, tmp_path):
    from diffdissect.errors import DiffdissectError
    from diffdissect.intervene.sources import load_direction

    out = tmp_path / "probe"
    assert (
        main(["probe", str(store), "--labels", "colour", "--timesteps", "10", "--bootstrap", "20", "--out", str(out)])
        == 0
    )
    assert load_direction(f"probe:{out}#colour=red", "enc", (12,)).at(10).any()
    from diffdissect.probe import write_probe_outputs

    results = run_probes(str(store), ProbeConfig(labels=["colour"], timesteps=[10], bootstrap=20), progress=False)
    write_probe_outputs(results, out)  # a rerun that saves no linear weights (as the attentive head)
    assert not (out / "probe_weights.json").exists() and not (out / "probe_weights.safetensors").exists()
    with pytest.raises(DiffdissectError, match="holds no probe weights"):
        load_direction(f"probe:{out}#colour=red", "enc", (12,))


def test_attentive_head_on_a_pooled_store_is_a_clear_error_before_any_work(store, tmp_path, capsys, monkeypatch):
    import diffdissect.probe.run as probe_run

    fitted = []
    monkeypatch.setattr(probe_run, "fit_attentive_head", lambda *a, **k: fitted.append(1))
    out = tmp_path / "probe"
    code = main(["probe", str(store), "--labels", "label", "--head", "attentive", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not fitted and not out.exists()
    assert err.startswith("diffdissect: error:") and "Traceback" not in err
    assert "spatial" in err and "--pooling none" in err and "--head linear" in err
