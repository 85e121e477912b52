"""Decoding Diffusion (issue 6): prompt sets, term indicators, direction maths, bias statistics, clustering,
captioners (the shapes-world one and a tiny transformers BLIP built here), resume, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffdissect.cli import main
from diffdissect.data.prompts import read_prompt_file
from diffdissect.directions import (
    BiasConfig,
    DirectionsConfig,
    build_prompt_set,
    caption_images,
    mean_difference_directions,
    ridge_directions,
    run_directions,
)
from diffdissect.directions.bias import find_references, holm, image_rates, latent_bias, make_questions
from diffdissect.directions.captioners import TransformersCaptioner
from diffdissect.directions.cluster import ari_with_null, cluster_prompts, project_out
from diffdissect.directions.compute import cosine_to_directions
from diffdissect.directions.prompts import expand_template, parse_slot_args
from diffdissect.directions.text import term_indicators, terms_of
from diffdissect.errors import DataError, DiffdissectError, ModelLoadError, SpecError
from diffdissect.models import load_target
from diffdissect.result import to_json_value


# ---- prompt sets ---------------------------------------------------------------------------------------------------
def test_templates_expand_into_a_grid_with_their_slot_values():
    prompts = build_prompt_set(
        ["a dog"],
        ["a {colour} {shape}", "a {shape}"],
        {"colour": ["red", "blue"], "shape": ["square", "circle", "cross"]},
    )
    texts = [p.text for p in prompts]
    assert texts[0] == "a dog" and len(texts) == 1 + 6 + 3
    assert "a blue circle" in texts and texts.count("a square") == 1
    red_cross = next(p for p in prompts if p.text == "a red cross")
    assert red_cross.slots == {"colour": "red", "shape": "cross"} and red_cross.template == "a {colour} {shape}"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_prompt_set(["a cat", "  "]), "prompt 2 is empty"),
        (lambda: build_prompt_set(["a cat", "a dog", "a cat"]), "duplicate prompt"),
        (lambda: build_prompt_set(["a square"], ["a {shape}"], {"shape": ["square"]}), "duplicate prompt"),
        (lambda: expand_template("a {colour} {shape}", {"shape": ["square"]}), "slot(s) ['colour'] without values"),
        (lambda: build_prompt_set(templates=["a {0}"], slot_values={}), "not names"),
        (lambda: build_prompt_set(templates=["a {shape"], slot_values={"shape": ["x"]}), "malformed"),
        (lambda: parse_slot_args(["colour"]), "NAME=value1,value2"),
        (lambda: parse_slot_args(["colour=red,,blue"]), "empty value"),
        (lambda: build_prompt_set([]), "no prompts"),
    ],
)
def test_bad_prompt_sets_are_refused_with_a_fix(call, message):
    with pytest.raises(
        SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        call()


def test_prompt_file_blank_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n\n")
    assert read_prompt_file(path) == ["a cat", "a dog"]  # trailing blank lines are not prompts
    path.write_text("a cat\n\na dog\n")
    with pytest.raises(SpecError, match=r"prompts.txt:2 is an empty prompt"):
        read_prompt_file(path)


# ---- terms ---------------------------------------------------------------------------------------------------------
def test_term_indicators_words_phrases_and_skips():
    texts = ["a red square", "a blue square", "a red circle", None, "a red square"]
    ind = term_indicators(texts, max_words=2, min_count=1)
    assert terms_of("A Red square!", 2) == {"a", "red", "square", "a red", "red square"}
    assert "a" not in ind.terms and "occurs in every sample" in ind.skipped["a"]
    assert list(ind.column("red")) == [1, 0, 1, 0, 1] and list(ind.column("red square")) == [1, 0, 0, 0, 1]
    assert list(ind.valid) == [True, True, True, False, True]
    with pytest.raises(DataError, match="'purple' never occurs in the captions"):
        ind.require(["red", "purple"], "captions")
    strict = term_indicators(texts, min_count=2)
    assert "circle" not in strict.terms and "fewer than 2" in strict.skipped["circle"]
    with pytest.raises(DataError, match="every caption failed"):
        term_indicators([None, None])


# ---- direction maths on latents with a known answer ----------------------------------------------------------------
def _planted_latents(n=4000, d=12, correlated=False, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.5
    b = np.where(a, rng.random(n) < 0.8, rng.random(n) < 0.2) if correlated else rng.random(n) < 0.5
    x = np.stack([a, b], 1).astype(np.float32)
    effects = rng.normal(size=(2, d))
    h = 3.0 + x @ effects + 0.05 * rng.normal(size=(n, d))
    return h, x, effects


def test_mean_difference_recovers_independent_effects_and_ridge_disentangles_correlated_words():
    h, x, effects = _planted_latents()
    np.testing.assert_allclose(mean_difference_directions(h, x), effects, atol=0.05)
    np.testing.assert_allclose(ridge_directions(h, x), effects, atol=0.02)

    h, x, effects = _planted_latents(correlated=True)
    md = mean_difference_directions(h, x)
    ridge = ridge_directions(h, x, alpha=1e-3)
    # mean difference of word a also carries b's effect (b co-occurs with a 80% of the time): 0.6 * effects[1]
    np.testing.assert_allclose(md[0], effects[0] + 0.6 * effects[1], atol=0.1)
    np.testing.assert_allclose(ridge, effects, atol=0.02)


def test_directions_leave_out_rows_without_text_and_work_per_step_shape():
    h, x, effects = _planted_latents(n=2000)
    h3 = h.reshape(2000, 3, 4)  # maps are flattened
    valid = np.ones(2000, bool)
    valid[:500] = False
    h3[:500] = 1e6  # would ruin the estimate if used
    np.testing.assert_allclose(mean_difference_directions(h3, x, valid), effects, atol=0.05)


def test_cosine_to_directions():
    dirs = np.array([[1.0, 0, 0], [0, 2.0, 0]])
    latents = np.array([[2.0, 0, 0], [1.0, 1.0, 0]]) + 1.0
    cos = cosine_to_directions(latents, dirs, centre=np.ones(3))
    np.testing.assert_allclose(cos, [[1, 0], [np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-12)


# ---- bias statistics -----------------------------------------------------------------------------------------------
def _profiles(n_subject, k, shift, n_ref=0, seed=0, noise=1.0):
    """Rows: subject samples (descriptor 0 raised by `shift`), then n_ref reference samples per descriptor."""
    rng = np.random.default_rng(seed)
    subject = rng.normal(scale=noise, size=(n_subject, k))
    subject[:, 0] += shift
    refs = [rng.normal(scale=noise, size=(n_ref, k)) for _ in range(k)]
    profile = np.concatenate([subject, *refs]) if n_ref else subject
    profile = profile - profile.mean(1, keepdims=True)
    groups = [np.arange(n_subject + i * n_ref, n_subject + (i + 1) * n_ref) for i in range(k)] if n_ref else None
    return profile, np.arange(n_subject), groups


@pytest.mark.parametrize("n_ref", [0, 60])
def test_latent_bias_finds_a_planted_default_with_a_ci_covering_it(n_ref):
    profile, subject, refs = _profiles(200, 4, shift=0.8, n_ref=n_ref)
    out = latent_bias(profile, subject, refs, resamples=1000, permutations=500)
    true_excess = 0.8 * (1 - 1 / 4)  # raised by 0.8, then centred across 4 descriptors
    assert out["top"] == 0 and out["p_value"] < 0.01
    assert out["score_ci"][0] < true_excess < out["score_ci"][1]
    assert out["ci_low"][0] > 0 and out["ci_low"][1] < -0.8 / 4 < out["ci_high"][1]


@pytest.mark.parametrize("n_ref", [0, 40])
def test_latent_bias_null_is_calibrated(n_ref):
    """Without a default, p < 0.05 in about 5% of repeats (here at most 12% of 80; binomial 99.9% bound)."""
    p = [
        latent_bias(*_profiles(60, 4, shift=0.0, n_ref=n_ref, seed=s), resamples=50, permutations=199, seed=s)[
            "p_value"
        ]
        for s in range(80)
    ]
    assert np.mean(np.array(p) < 0.05) <= 0.12
    assert 0.35 < np.mean(p) < 0.65  # roughly uniform


def _no_bias_world(rng, n_seeds=16, d=48, k=4):
    """Latents of pure noise for k references ("a <c> square"), the subject ("a square") and k other references;
    term indicators from the prompts (the subject names no colour). Nothing distinguishes the subject's samples."""
    prompts = [c for c in range(k)] + [None] + [c for c in range(k)]
    latents = rng.normal(size=(len(prompts) * n_seeds, d))
    indicators = np.zeros((len(latents), k))
    prompt = np.repeat(np.arange(len(prompts)), n_seeds)
    for i, c in enumerate(prompts):
        if c is not None:
            indicators[prompt == i, c] = 1
    return latents, indicators, prompt, np.tile(np.arange(n_seeds), len(prompts))


def test_cross_fitted_bias_p_values_are_uniform_without_bias():
    """Defect 2: directions estimated on the samples they score make in-sample p-values non-uniform (KS rejects);
    cross-fitted (directions from the other seed half, membership permuted within halves) they are uniform."""
    from scipy.stats import kstest

    from diffdissect.directions.bias import cross_fitted_profile, family_profile, seed_halves
    from diffdissect.directions.compute import directions

    in_sample, crossed = [], []
    for r in range(200):
        latents, x, prompt, seeds = _no_bias_world(np.random.default_rng(r))
        subject, refs = np.nonzero(prompt == 4)[0], [np.nonzero(prompt == c)[0] for c in range(4)]
        whole = family_profile(cosine_to_directions(latents, directions(latents, x), latents.mean(0)))
        in_sample.append(latent_bias(whole, subject, refs, resamples=10, permutations=199, seed=r)["p_value"])
        halves = seed_halves(seeds, r)
        profile = cross_fitted_profile(latents, x, None, [0, 1, 2, 3], halves)
        out = latent_bias(profile, subject, refs, halves=halves, resamples=10, permutations=199, seed=r)
        assert out["cross_fitted"] and "within each cross-fitting half" in out["null"]
        crossed.append(out["p_value"])
    assert kstest(in_sample, "uniform").pvalue < 1e-3  # the defect: today's statistic is miscalibrated
    assert kstest(crossed, "uniform").pvalue > 0.05
    assert np.mean(np.array(crossed) < 0.05) <= 0.10


def test_cross_fitted_bias_still_finds_a_planted_default():
    from diffdissect.directions.bias import cross_fitted_profile, seed_halves

    rng = np.random.default_rng(0)
    latents, x, prompt, seeds = _no_bias_world(rng, n_seeds=32)
    colours = rng.normal(size=(4, latents.shape[1])) * 2
    for c in range(4):
        latents[(prompt == c) | (prompt == 5 + c)] += colours[c]
    subject = np.nonzero(prompt == 4)[0]
    latents[subject] += colours[np.where(rng.random(len(subject)) < 0.85, 2, rng.integers(0, 4, len(subject)))]
    halves = seed_halves(seeds)
    out = latent_bias(
        cross_fitted_profile(latents, x, None, [0, 1, 2, 3], halves),
        subject,
        [np.nonzero(prompt == c)[0] for c in range(4)],
        halves=halves,
        resamples=200,
        permutations=200,
    )
    assert out["top"] == 2 and out["p_value"] < 0.01 and out["score_ci"][0] > 0
    with pytest.raises(DataError, match="at least two noise seeds"):
        seed_halves(np.zeros(5))


def test_references_and_questions():
    prompts = ["a square", "a red square", "a square red", "a blue square", "a circle"]
    assert find_references("a square", ["red", "blue"], prompts) == {"red": "a red square", "blue": "a blue square"}
    qs = make_questions(["a square", "a circle"], ["red", "blue"], "colour", prompts)
    assert qs[0].references and qs[1].references == {}  # no "a red circle": no references
    with pytest.raises(DataError, match="not in the prompt set"):
        make_questions(["a cube"], ["red", "blue"], "colour", prompts)
    with pytest.raises(DataError, match="at least two distinct descriptors"):
        make_questions(["a square"], ["red"], "colour", prompts)


def test_holm_adjustment():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])


def test_image_rates_skip_failed_captions_and_match_phrases():
    captions = ["a dark red car", "a red car", None, "a blue car", "a dark blue car"]
    out = image_rates(captions, np.arange(5), ["red", "dark blue"])
    assert out["n"] == 4 and out["rates"] == [0.5, 0.25]
    assert out["ci95"][0][0] < 0.5 < out["ci95"][0][1]


# ---- clustering ----------------------------------------------------------------------------------------------------
def test_clustering_recovers_groups_once_a_dominant_nuisance_family_is_projected_out():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 8)  # 3 shapes x 8 prompts
    nuisance = np.tile(np.arange(4), 6)  # 4 colours cycling through them
    shape_dirs, colour_dirs = rng.normal(size=(3, 30)), rng.normal(size=(4, 30))
    means = shape_dirs[groups] + 6.0 * colour_dirs[nuisance] + 0.05 * rng.normal(size=(24, 30))
    labels = [str(g) for g in groups]
    raw = ari_with_null(labels, cluster_prompts(means, 3), permutations=200)
    removed = ari_with_null(
        labels, cluster_prompts(project_out(means - means.mean(0), colour_dirs), 3), permutations=200
    )
    assert removed.ari == pytest.approx(1.0) and removed.p_value < 0.01
    assert raw.ari < 0.5


def test_cluster_remove_takes_several_families_and_pooling_frees_position():
    """Clustering by shape with colour *and* size held out (both dominate), on maps where the shape sits at a
    random place per seed: the position-pooled summary with both families projected out recovers the shapes."""
    from diffdissect.directions.run import _cluster_step

    rng = np.random.default_rng(0)
    slots = {"colour": ["red", "blue", "green"], "size": ["small", "large"], "shape": ["square", "circle", "cross"]}
    prompts = build_prompt_set(templates=["a {size} {colour} {shape}"], slot_values=slots)
    c, hw, seeds = 12, 3, 6
    shape_dirs = rng.normal(size=(3, c))
    colour_dirs, size_dirs = rng.normal(size=(3, c * hw * hw)), rng.normal(size=(2, c * hw * hw))
    latents, prompt_index = [], []
    for i, p in enumerate(prompts):
        for _ in range(seeds):
            m = np.zeros((c, hw, hw))
            m[:, rng.integers(hw), rng.integers(hw)] = shape_dirs[slots["shape"].index(p.slots["shape"])]
            latents.append(
                m.ravel()
                + 5 * colour_dirs[slots["colour"].index(p.slots["colour"])]
                + 5 * size_dirs[slots["size"].index(p.slots["size"])]
                + 0.01 * rng.normal(size=c * hw * hw)
            )
            prompt_index.append(i)
    latents, prompt_index = np.array(latents), np.array(prompt_index)
    config = DirectionsConfig(
        prompts=prompts,
        seeds=list(range(seeds)),
        cluster_by="shape",
        permutations=100,
        bias=[BiasConfig("colour", slots["colour"], []), BiasConfig("size", slots["size"], [])],
        cluster_remove=["colour", "size"],
        cluster_pooling="mean",
    )
    config.validate()
    both = np.concatenate([colour_dirs, size_dirs])
    pooled = _cluster_step(latents, prompt_index, config, both, (c, hw, hw))
    assert pooled.removed is not None and pooled.removed.ari == pytest.approx(1.0)
    assert pooled.removed.family == ["colour", "size"]
    assert _cluster_step(latents, prompt_index, config, colour_dirs, (c, hw, hw)).fits()["removed"].ari < 0.5
    assert pooled.raw.ari < 0.5 and pooled.pooling == "mean"
    data = pooled.to_json()  # the keys results.json has always had, and back
    assert list(data) == ["k", "prompts", "groups", "pooling", "raw", "removed"]
    assert list(data["removed"]) == ["ari", "p_value", "null_q95", "clusters", "family"] and "family" not in data["raw"]
    assert type(pooled).from_json(json.loads(json.dumps(data))) == pooled
    with pytest.raises(SpecError, match="cluster_pooling"):
        DirectionsConfig(prompts=prompts, cluster_pooling="max").validate()


# ---- captioners ----------------------------------------------------------------------------------------------------
class _Flaky:
    """Captions by mean brightness; raises on images whose first pixel is pure white."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def caption(self, images):
        self.calls += 1
        if any(im[0, 0, 0] == 255 for im in images):
            raise RuntimeError("cannot read a white corner")
        return ["a bright image" if im.mean() > 100 else "a dark image" for im in images]


def test_a_captioner_failing_on_some_images_loses_only_those():
    images = np.zeros((6, 8, 8, 3), np.uint8)
    images[3:] = 200
    images[4, 0, 0] = 255
    out = caption_images(_Flaky(), images, batch=4)
    assert out.captions == ["a dark image"] * 3 + ["a bright image", None, "a bright image"]
    assert out.failed == 1 and "white corner" in out.errors[4]


def test_world_captioner_reads_world_images():
    from diffdissect.world import ShapesWorld
    from diffdissect.world.generator import sample_world

    captioner = ShapesWorld.load().captioner()
    batch = sample_world(16, seed=3, config=captioner.world)
    from diffdissect.world.generator import full_caption

    expected = [full_caption(captioner.world, {f: int(v[i]) for f, v in batch.factors.items()}) for i in range(16)]
    assert captioner.caption(batch.images) == expected
    with pytest.raises(DiffdissectError, match="reads 32x32 images"):
        captioner.caption(np.zeros((1, 16, 16, 3), np.uint8))


def _tiny_blip(directory, favourite: str = "red"):
    """A randomly initialised BLIP captioner, its LM head biased so it always writes `favourite`."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "square", "circle"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            bos_token_id=5,
            pad_token_id=0,
            sep_token_id=3,
            max_position_embeddings=32,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[words.index(favourite)] += 50.0
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_transformers_captioner_from_a_local_directory(tmp_path):
    path = _tiny_blip(tmp_path / "blip")
    captioner = TransformersCaptioner(path, max_new_tokens=3)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(c.split() == ["red"] * 3 for c in captions)
    with pytest.raises(ModelLoadError, match="config.json missing"):
        TransformersCaptioner(tmp_path / "nothing-here")


# ---- end to end on the tiny SD pipeline: resume, cost, failures, CLI -----------------------------------------------
def _config(**overrides):
    prompts = build_prompt_set(
        templates=["a {colour} {shape}", "a {shape}"],
        slot_values={"colour": ["red", "blue"], "shape": ["square", "circle"]},
    )
    options = dict(
        seeds=[0, 1, 2],
        layers=["mid_block", "up_blocks.1"],
        steps=2,
        guidance_scale=1.0,
        batch_size=4,
        shard_size=4,
        text_source="prompts",
        resamples=100,
        permutations=100,
        cluster_by="shape",
        bias=[BiasConfig("colour", ["red", "blue"], ["a square", "a circle"])],
        cluster_remove="colour",
    )
    options.update(overrides)
    return DirectionsConfig(prompts=prompts, **options)


class _Interrupt(Exception):
    pass


def test_run_end_to_end_and_resume_after_an_interruption(tmp_path, sd_dir, monkeypatch):
    target = load_target(sd_dir)
    full = run_directions(target, _config(), tmp_path / "full", None, progress=False)
    assert full["samples"] == 18 and full["cost"]["sampled_this_run"] == 18
    import copy

    sampler = copy.deepcopy(target.scheduler)
    sampler.set_timesteps(2)
    calls = len(sampler.timesteps)  # PNDM calls the denoiser twice at one t
    assert full["cost"]["denoiser_rows_per_trajectory_step"] == pytest.approx(calls / len(full["timesteps"]))
    q = full["bias"]["mid_block"]["colour"]["a square"]
    assert set(q) == {str(t) for t in full["timesteps"]} and q[str(full["timesteps"][0])]["references"]
    assert (tmp_path / "full" / "directions" / "mid_block.safetensors").is_file()
    step = full["clusters"]["up_blocks.1"][str(full["timesteps"][-1])]
    assert step.removed is not None and step.k == len(set(step.groups))
    on_disk = json.loads((tmp_path / "full" / "results.json").read_text())["clusters"]["up_blocks.1"]
    assert type(step).from_json(on_disk[str(full["timesteps"][-1])]) == step

    # interrupt after the first committed shard, then resume: the first shard is not sampled again
    from diffdissect.store import writer as store_writer

    original = store_writer.StoreWriter.write_shard
    written = []

    def write_then_stop(self, chunk, *args, **kwargs):
        if written:
            raise _Interrupt()
        written.append(chunk)
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(store_writer.StoreWriter, "write_shard", write_then_stop)
    with pytest.raises(_Interrupt):
        run_directions(target, _config(), tmp_path / "resumed", None, progress=False)
    monkeypatch.setattr(store_writer.StoreWriter, "write_shard", original)
    resumed = run_directions(target, _config(), tmp_path / "resumed", None, progress=False)
    assert resumed["cost"]["sampled_this_run"] == 18 - 4
    for key in ("bias", "clusters", "prompt_profiles"):
        assert json.dumps(to_json_value(resumed[key]), sort_keys=True) == json.dumps(
            to_json_value(full[key]), sort_keys=True
        )


def test_captions_resume_and_failures_are_recorded(tmp_path, sd_dir):
    class Counting(_Flaky):
        def caption(self, images):
            self.calls += len(images)
            return ["a red square" if im.mean() > 120 else "a blue circle" for im in images]

    class Failing(Counting):
        threshold = 120.0

        def caption(self, images):
            if len(images) > 1:
                raise ValueError("batch failed")
            if images[0].mean() > self.threshold:
                raise ValueError("too bright")
            return super().caption(images)

    target = load_target(sd_dir)
    out = tmp_path / "run"
    first = Counting()
    run_directions(
        target,
        _config(text_source="captions", cluster_by=None, cluster_remove=None, bias=[]),
        out,
        first,
        progress=False,
    )
    assert first.calls == 18
    again = Counting()
    run_directions(
        target,
        _config(text_source="captions", cluster_by=None, cluster_remove=None, bias=[]),
        out,
        again,
        progress=False,
    )
    assert again.calls == 0  # every caption came from captions.json
    other = Failing()
    other.name = "another"
    with pytest.raises(DataError, match="holds captions by 'flaky'"):
        run_directions(
            target,
            _config(text_source="captions", bias=[], cluster_by=None, cluster_remove=None),
            out,
            other,
            progress=False,
        )
    fresh = tmp_path / "failing"
    shutil.copytree(out / "trajectories", fresh / "trajectories")
    from PIL import Image

    means = sorted(np.asarray(Image.open(p)).mean() for p in (fresh / "trajectories" / "images").glob("*.png"))
    failing = Failing()
    failing.threshold = float(np.median(means))  # the brighter half fails
    res = run_directions(
        target,
        _config(text_source="captions", bias=[], cluster_by=None, cluster_remove=None),
        fresh,
        failing,
        progress=False,
    )
    captions = json.loads((fresh / "captions.json").read_text())["items"]
    failed = [v for v in captions.values() if v["error"]]
    assert res["caption_failures"]["count"] == len(failed) == sum(m > failing.threshold for m in means) > 0
    assert all("too bright" in v["error"] and v["caption"] is None for v in failed)
    assert len(captions) - len(failed) > 0
    failing.threshold = -1.0  # every image fails: a clear error
    (fresh / "captions.json").unlink(missing_ok=True)
    with pytest.raises(DataError, match="failed on every image"):
        run_directions(
            target,
            _config(text_source="captions", bias=[], cluster_by=None, cluster_remove=None),
            fresh,
            failing,
            progress=False,
        )


def test_run_refuses_a_family_word_that_never_occurs(tmp_path, sd_dir):
    config = _config(bias=[BiasConfig("colour", ["red", "purple"], ["a square"])], cluster_remove=None)
    with pytest.raises(DataError, match="'purple' never occurs in the prompts"):
        run_directions(load_target(sd_dir), config, tmp_path / "run", None, progress=False)
    with pytest.raises(SpecError, match="names no bias family"):
        _config(cluster_remove="size").validate()
    with pytest.raises(SpecError, match="fewer than two groups"):
        _config(cluster_by="mood").validate()


def test_cli_directions_run(tmp_path, sd_dir, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "directions",
            "run",
            "--model",
            str(sd_dir),
            "--template",
            "a {colour} square",
            "a square",
            "--slot",
            "colour=red,blue",
            "--n-seeds",
            "3",
            "--steps",
            "2",
            "--guidance",
            "1",
            "--family",
            "colour=red,blue",
            "--subjects",
            "a square",
            "--permutations",
            "50",
            "--resamples",
            "50",
            "--method",
            "ridge",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "colour: 'a square' ->" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["text_source"] == "prompts" and (out / "report.html").stat().st_size > 10_000
    report = (out / "report.html").read_text()
    assert "cross-fitted" in report and "in-sample score (old" in report and "fixed in advance" in report
    row = results["summary"]["families"]["colour"]["subjects"][0]
    assert row["cross_fitted"] and set(row["in_sample"]) == {"score", "score_ci", "top", "p_value"}
    from safetensors.torch import load_file

    saved = load_file(out / "directions" / "mid_block.safetensors")
    terms = json.loads((out / "directions" / "terms.json").read_text())["terms"]
    assert set(saved) == {f"t={t}" for t in results["timesteps"]} and saved[f"t={results['timesteps'][0]}"].shape[
        0
    ] == len(terms)
    code = main(
        [
            "directions",
            "run",
            "--model",
            str(sd_dir),
            "--template",
            "a {colour} square",
            "--n-seeds",
            "2",
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
        ]
    )
    assert code == 2 and "without values" in capsys.readouterr().err


# ---- the shapes world: a small run recovers the strongest planted default -----------------------------------------
def test_world_run_recovers_the_strong_default(tmp_path):
    from diffdissect.world import ShapesWorld
    from diffdissect.world.directions import check_against_world, world_directions_config

    shapes_world = ShapesWorld.load()
    world = shapes_world.config
    config = world_directions_config(world, seeds=24, resamples=200, permutations=200, layers=["mid_block"])
    results = run_directions(
        shapes_world.target(), config, tmp_path / "world", shapes_world.captioner(), progress=False
    )
    rows = {r["subject"]: r for r in results["summary"]["families"]["colour"]["subjects"]}
    assert rows["a square"]["top"] == "red" and rows["a square"]["image_top"] == "red"
    assert rows["a square"]["significant"]
    check = check_against_world(results, world)
    assert set(check) >= {"latent_order_correct", "image_rate_max_error", "cluster_ari", "order_correct_by_t"}
    assert results["cost"]["denoiser_rows_per_trajectory_step"] == pytest.approx(1.0)
