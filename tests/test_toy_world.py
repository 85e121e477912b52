"""The shapes world generator: planted rates, determinism, captions, rendering, config validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffdissect.world.generator import (
    FACTORS,
    WorldConfig,
    WorldConfigError,
    caption,
    captions_for,
    full_caption,
    sample_world,
)

WORLD = WorldConfig()


@pytest.fixture(scope="module")
def big():
    return sample_world(40_000, seed=11)


def test_planted_colour_rates_are_recovered(big):
    colours = list(WORLD.colours)
    for s, shape in enumerate(WORLD.shapes):
        mask = big.factors["shape"] == s
        rates = np.bincount(big.factors["colour"][mask], minlength=len(colours)) / mask.sum()
        planted = np.array([WORLD.colour_given_shape[shape][c] for c in colours])
        assert np.abs(rates - planted).max() < 0.025, (shape, rates, planted)


def test_the_four_bias_strengths_are_ordered():
    top = {s: max(r.values()) for s, r in WORLD.colour_given_shape.items()}
    by = {v: k for k, v in WORLD.bias_strength.items()}
    assert top[by["strong"]] > top[by["medium"]] > top[by["weak"]] > top[by["unbiased"]] == pytest.approx(0.25)


def test_captions_that_omit_colour_still_follow_the_skewed_joint(big):
    no_colour = ~big.kept["colour"]
    assert 0.2 < no_colour.mean() < 0.4
    for word in WORLD.colours:
        assert not any(word in c.split() for c, k in zip(big.captions, no_colour) if k)
    s = WORLD.shapes.index("square")
    mask = no_colour & (big.factors["shape"] == s)
    red = list(WORLD.colours).index("red")
    assert abs((big.factors["colour"][mask] == red).mean() - 0.85) < 0.03


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = sample_world(64, seed=3), sample_world(64, seed=3), sample_world(64, seed=4)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert all(np.array_equal(a.factors[f], b.factors[f]) for f in FACTORS)
    assert a.images.tobytes() != c.images.tobytes()


def test_caption_templates():
    factors = {"shape": 0, "colour": 0, "size": 0, "xpos": 0, "ypos": 0}
    assert full_caption(WORLD, factors) == "a small red circle at the top left"
    keep = {"shape": True, "colour": False, "size": False, "position": False}
    assert caption(WORLD, factors, keep) == "a circle"
    keep = {"shape": False, "colour": True, "size": False, "position": False}
    assert caption(WORLD, factors, keep) == "a red shape"
    batch = sample_world(500, seed=5)
    assert captions_for(WORLD, batch.factors, batch.kept) == [
        caption(WORLD, {k: int(v[i]) for k, v in batch.factors.items()}, {k: bool(v[i]) for k, v in batch.kept.items()})
        for i in range(500)
    ]


def test_rendering_puts_the_right_colour_at_the_right_place():
    batch = sample_world(400, seed=7)
    assert batch.images.shape == (400, 32, 32, 3) and batch.images.dtype == np.uint8
    bg = np.median(batch.images.reshape(400, -1, 3), axis=1)
    for i in range(400):
        img = batch.images[i].astype(float)
        mask = np.abs(img - bg[i]).sum(-1) > 60  # the shape's pixels
        ys, xs = np.nonzero(mask)
        assert len(ys) > 20
        assert (xs.mean() > 16) == bool(batch.factors["xpos"][i]), i  # right half <=> xpos 'right'
        assert (ys.mean() > 16) == bool(batch.factors["ypos"][i]), i  # bottom half <=> ypos 'bottom'
        want = np.array(list(WORLD.colours.values())[batch.factors["colour"][i]], float)
        diff = np.abs(img - bg[i]).sum(-1)
        core = diff >= 0.95 * diff.max()  # fully covered pixels, not blended edges
        assert np.abs(np.median(img[core], axis=0) - want).max() <= WORLD.colour_jitter + 1
    small = batch.factors["size"] == 0
    areas = np.array([(np.abs(batch.images[i].astype(float) - bg[i]).sum(-1) > 60).sum() for i in range(400)])
    assert areas[small].max() < areas[~small].min()


def test_config_round_trips_through_json(tmp_path):
    path = tmp_path / "world.json"
    path.write_text(json.dumps(WORLD.to_json()))
    again = WorldConfig.load(path)
    assert again == WORLD
    assert sample_world(16, seed=1, config=again).images.tobytes() == sample_world(16, seed=1).images.tobytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "colour_given_shape": {
                    **WORLD.colour_given_shape,
                    "hexagon": {"red": 1.0, "green": 0, "blue": 0, "yellow": 0},
                }
            },
            "unknown shape(s) ['hexagon']",
        ),
        (
            {
                "colour_given_shape": {
                    **WORLD.colour_given_shape,
                    "cross": {"red": 0.5, "green": 0.5, "purple": 0.0, "blue": 0.0},
                }
            },
            "unknown value(s) ['purple']",
        ),
        (
            {
                "colour_given_shape": {
                    **WORLD.colour_given_shape,
                    "cross": {"red": 1.5, "green": -0.5, "blue": 0.0, "yellow": 0.0},
                }
            },
            "rates must lie in [0, 1]",
        ),
        (
            {
                "colour_given_shape": {
                    **WORLD.colour_given_shape,
                    "cross": {"red": 0.5, "green": 0.2, "blue": 0.2, "yellow": 0.2},
                }
            },
            "rates must sum to 1; they sum to 1.1",
        ),
        ({"shape_rates": {"circle": 0.5, "square": 0.5, "triangle": 0.0}}, "missing rates for ['cross']"),
        ({"keep": {"shape": 0.9, "texture": 0.5}}, "keep: unknown factor(s) ['texture']"),
        ({"keep": {"shape": 1.2}}, "not a probability"),
        ({"shapes": ["circle", "hexagon"]}, "unknown shape(s) ['hexagon']"),
        ({"texture": "wood"}, "unknown world config field(s) ['texture']"),
    ],
)
def test_invalid_world_configs_get_clear_errors(change, message):
    with pytest.raises(WorldConfigError) as err:
        WorldConfig.from_json({**WORLD.to_json(), **change})
    assert message in str(err.value)


def test_invalid_world_config_from_the_cli(tmp_path, capsys):
    from diffdissect.cli import main

    bad = tmp_path / "world.json"
    bad.write_text(json.dumps({**WORLD.to_json(), "size_rates": {"small": 0.7, "large": 0.7}}))
    out = tmp_path / "weights"
    assert main(["toy", "build", "--world", str(bad), "--out", str(out), "--scale", "0.001", "--quiet"]) == 2
    assert "size_rates: rates must sum to 1" in capsys.readouterr().err
    assert not out.exists()
