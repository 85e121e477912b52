"""Held-out latent attribution (issue 18): selection on one half, a null for the max, per-location AUROC and
localisation against object masks, caption-word enrichment with BH q-values; checked against scikit-learn and
exact combinatorics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffdissect.sae.attribution import (
    auroc_per_value,
    best_latents,
    coverage,
    grid_masks,
    labels_named,
    localisation,
    split_halves,
    word_enrichment,
)
from diffdissect.stats import benjamini_hochberg


def test_auroc_per_image_and_per_location_match_scikit_learn():
    rng = np.random.default_rng(0)
    values = np.where(rng.random((40, 6)) < 0.5, 0.0, rng.random((40, 6)))  # sparse, with ties at 0
    labels = rng.choice(["red", "blue", "green"], 40)
    table = auroc_per_value(values, labels)
    for v in ("red", "blue"):
        for j in range(6):
            assert table[v][j] == pytest.approx(roc_auc_score(labels == v, values[:, j]))
    maps = np.where(rng.random((40, 6, 3, 3)) < 0.6, 0.0, rng.random((40, 6, 3, 3)))
    cells = rng.random((40, 3, 3)) < 0.3
    per_location = auroc_per_value(maps, labels, cells)
    truth = (cells & (labels == "red")[:, None, None]).ravel()  # inside a red image's object
    for j in range(6):
        assert per_location["red"][j] == pytest.approx(roc_auc_score(truth, maps[:, j].ravel()))


def test_best_latent_is_chosen_on_one_half_and_the_max_gets_a_null():
    """Defect 4: with latents of pure noise, the max over 300 latents on the same images looks like a feature
    (AUROC well above 0.5) but sits inside its permutation null; the latent chosen on half A scores about 0.5
    on half B. A planted latent is found either way."""
    rng = np.random.default_rng(1)
    n, n_latents = 80, 300
    labels = rng.choice(["a", "b"], n)
    values = rng.random((n, n_latents))
    values[:, 7] = (labels == "a") + 0.3 * rng.random(n)  # the one real feature of "a"
    halves = split_halves(n, seed=0)
    assert halves.sum() == n // 2 and np.array_equal(halves, split_halves(n, seed=0))
    out = best_latents(values, labels, halves, permutations=200, seed=0)
    assert out["a"]["latent"] == 7 and out["a"]["auroc"] == pytest.approx(1.0) and out["a"]["p_value"] < 0.01
    assert out["a"]["max_over_latents"]["p_value"] < 0.01

    noise = rng.random((n, n_latents))
    out = best_latents(noise, labels, halves, permutations=200, seed=0)
    old = out["a"]["max_over_latents"]
    assert old["auroc"] > 0.65  # what the old table would have reported
    assert old["null_q95"] > old["auroc"] - 0.05 and old["p_value"] > 0.05
    assert abs(out["a"]["auroc"] - 0.5) < 0.2 and out["a"]["auroc"] < old["auroc"]
    assert coverage({"f": out}, 0.65)["heldout"] <= coverage({"f": out}, 0.65)["max_over_latents"]


def test_per_location_scores_and_localisation_see_where_the_object_is():
    rng = np.random.default_rng(2)
    n, grid = 30, (4, 4)
    masks = np.zeros((n, 16, 16), np.float32)
    colours = rng.choice(["red", "blue"], n)
    for i in range(n):
        y, x = rng.integers(0, 3, 2) * 4
        masks[i, y : y + 8, x : x + 8] = 1.0  # a 2x2-cell object
    cells = grid_masks(masks, grid)
    assert cells.shape == (n, 4, 4) and (cells.sum((1, 2)) == 4).all()
    maps = np.zeros((n, 5, 4, 4), np.float32)
    maps[:, 0] = cells * (colours == "red")[:, None, None]  # fires on red objects, exactly there
    maps[:, 1] = cells  # fires on every object
    maps[:, 2] = rng.random((n, 4, 4)) * (rng.random((n, 4, 4)) < 0.2)  # fires anywhere
    halves = split_halves(n, 3)
    out = best_latents(maps, colours, halves, cells=cells, permutations=50)
    assert out["red"]["latent"] == 0 and out["red"]["auroc"] == pytest.approx(1.0)
    places = localisation(maps, cells)
    assert places["iou"][0] == pytest.approx(1.0) and places["iou"][1] == pytest.approx(1.0)
    assert places["iou"][2] < 0.5 and places["inside_share"][0] == pytest.approx(1.0)
    tiny = np.zeros((1, 16, 16), np.float32)
    tiny[0, 3:5, 3:6] = 1.0  # under half of any cell: keeps its best cell
    assert grid_masks(tiny, grid).sum() == 1 and grid_masks(tiny, grid)[0, 0, 1]
    with pytest.raises(ValueError, match="do not tile"):
        grid_masks(np.zeros((1, 10, 10)), grid)


def _hypergeom_sf_exact(k: int, population: int, successes: int, draws: int) -> float:
    total = math.comb(population, draws)
    return (
        sum(
            math.comb(successes, i) * math.comb(population - successes, draws - i)
            for i in range(k, min(successes, draws) + 1)
        )
        / total
    )


def test_caption_words_enriched_in_top_images_with_exact_p_and_bh_q():
    rng = np.random.default_rng(3)
    colours = rng.choice(["red", "blue", "green", "yellow"], 60)
    shapes = rng.choice(["square", "circle"], 60)
    captions = [f"a {c} {s}" if rng.random() < 0.8 else f"a {s}" for c, s in zip(colours, shapes)]
    captions[5] = None  # a failed caption is left out
    values = np.zeros((60, 3))
    values[:, 0] = (colours == "red") * rng.uniform(1, 2, 60)  # a red latent
    values[:, 1] = rng.random(60)  # noise
    out = word_enrichment(values, captions, top_n=10, fdr=0.05)
    red = out["latents"][0]
    assert red and red[0]["word"] == "red" and red[0]["q"] < 0.01
    kept = [c for c in captions if c is not None]
    n_red = sum("red" in c for c in kept)
    assert red[0]["in_all"] == n_red and out["images"] == 59
    assert red[0]["p"] == pytest.approx(_hypergeom_sf_exact(red[0]["in_top"], 59, n_red, red[0]["top"]), rel=1e-9)
    assert all(w["word"] not in ("a",) for ws in out["latents"] for w in ws)  # stop words left out
    assert out["latents"][2] == []  # never fires: no label
    best = {"colour": {"red": {"latent": 0}, "blue": {"latent": 1}}}
    named = labels_named(best, out["latents"])
    assert named["values"]["colour=red"]["top_word_names_it"] and named["top_word_names_it"] >= 1


def test_benjamini_hochberg_known_answer():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    # sorted: .005 .01 .03 .04 .2 -> x5/rank: .025 .025 .05 .05 .2 -> running min from the top
    assert benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    assert benjamini_hochberg(p.reshape(1, 5)).shape == (1, 5)


def test_features_report_heldout_choice_null_places_and_words(tmp_path, capsys):
    """`analyse_features` adds the held-out best latents (with the old max beside them), per-location scores and
    localisation against masks, and each latent's caption words."""
    from diffdissect.sae import TrainConfig, train_sae
    from diffdissect.sae.features import analyse_features
    from diffdissect.store import write_array_store

    rng = np.random.default_rng(4)
    n, names = 240, ["red", "blue", "green"]
    colour = rng.integers(0, 3, n)
    masks = np.zeros((n, 8, 8), np.float32)
    maps = 0.05 * rng.normal(size=(n, 6, 4, 4)).astype(np.float32)
    for i in range(n):
        y, x = rng.integers(0, 3, 2)
        masks[i, 2 * y : 2 * y + 4, 2 * x : 2 * x + 4] = 1.0
        maps[i, colour[i], y : y + 2, x : x + 2] += 2.0
        maps[i, 5, y : y + 2, x : x + 2] += 1.0
    rows = [{"input_id": f"im{i}", "colour": names[c], "caption": f"a {names[c]} blob"} for i, c in enumerate(colour)]
    write_array_store(tmp_path / "store", {("maps", 10): maps}, rows)
    train_sae(
        tmp_path / "store",
        TrainConfig(
            layer="maps", t=10, tokens=True, k=2, n_latents=12, batch_size=256, steps=150, heldout_fraction=0.4
        ),
        tmp_path / "sae",
        progress=False,
    )
    results, acts, held = analyse_features(tmp_path / "sae", masks=masks)
    heldout = results["heldout"]["best_latent_per_value"]["colour"]
    assert set(heldout) == set(names) and results["heldout"]["values_total"] == 3
    for value in names:
        assert {"latent", "auroc", "p_value", "max_over_latents"} <= set(heldout[value])
    per_location = results["per_location"]
    assert per_location["grid"] == [4, 4] and per_location["values_total"] == 3
    assert per_location["heldout"] >= 2  # colours sit on the object: found there
    red = per_location["best_latent_per_value"]["colour"]["red"]["latent"]
    assert results["latents"][red]["iou"] > 0.5
    labels = results["caption_labels"]
    assert labels["values_total"] == 3 and labels["top_word_names_it"] >= 2
    assert "selection" in results["attribution"] and results["words"]["tests"] > 0
    from diffdissect.cli import main

    assert (
        main(
            [
                "sae",
                "features",
                str(tmp_path / "sae"),
                "--top",
                "8",
                "--out",
                str(tmp_path / "feats"),
                "--permutations",
                "20",
                "--split-seed",
                "3",
                "--word-top-n",
                "10",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    import json

    written = json.loads((tmp_path / "feats" / "features.json").read_text())["attribution"]
    assert (written["permutations"], written["split_seed"], written["word_top_n"]) == (20, 3, 10)
    assert "chosen on half A of the held-out images, scored on half B" in printed and "per location" not in printed
    assert "caption words:" in printed and "q " in printed


def test_per_location_scoring_is_skipped_with_a_note_beyond_the_memory_bound():
    """Every held-out map is kept only under FeaturesConfig.max_map_values; without them, a note, not a crash."""
    from diffdissect.sae import features

    rng = np.random.default_rng(0)
    acts = features.ImageActivations(np.arange(8), rng.random((8, 3)), np.zeros((3, 2), int), None, None, (2, 2))
    out = features._attribution(
        acts,
        {"c": np.array(["a", "b"] * 4, dtype=object)},
        [{}] * 8,
        list(range(8)),
        np.ones((8, 4, 4)),
        features.AttributionConfig(permutations=10),
        [],
    )
    assert "max_map_values" in out["per_location"]["skipped"] and out["heldout"]["values_total"] == 2


def test_a_captioner_labels_latents_of_a_store_without_captions(tmp_path, capsys):
    """Unlabelled, uncaptioned data: captions come from a captioner run on the held-out images."""
    from diffdissect.cli import main
    from diffdissect.sae import TrainConfig, train_sae
    from diffdissect.sae.features import analyse_features
    from diffdissect.store import write_array_store

    rng = np.random.default_rng(5)
    n, names = 200, ["red", "blue"]
    colour = rng.integers(0, 2, n)
    x = rng.normal(0, 0.1, (n, 6)).astype(np.float32)
    x[np.arange(n), colour] += 3.0
    write_array_store(tmp_path / "store", {("pooled", 10): x}, [{"input_id": f"im{i}"} for i in range(n)])
    train_sae(
        tmp_path / "store",
        TrainConfig(layer="pooled", t=10, k=1, n_latents=4, batch_size=100, steps=100, heldout_fraction=0.5),
        tmp_path / "sae",
        progress=False,
    )
    asked = []

    def captioner(indices):
        asked.extend(indices)
        return [f"a {names[colour[i]]} thing" for i in indices]

    results, _, held = analyse_features(tmp_path / "sae", caption_fn=captioner)
    assert len(asked) == len(held) and results["words"]["tests"] > 0
    labelled = {w[0]["word"] for w in (l.get("words") for l in results["latents"]) if w}
    assert labelled == {"red", "blue"}
    assert main(["sae", "features", str(tmp_path / "sae"), "--captioner", "world"]) == 2
    assert "--captioner needs the capture's images" in capsys.readouterr().err


def test_sae_features_flags_come_from_the_attribution_config():
    from dataclasses import fields

    from diffdissect.cli import build_parser
    from diffdissect.sae.attribution import AttributionConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["sae"]
    features = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices["features"]
    flags = {a.dest: a.default for a in features._actions}
    config = AttributionConfig()
    for f in fields(AttributionConfig):
        if f.name != "mask_threshold":
            assert flags[f.name] == getattr(config, f.name), f.name
