"""FeatInv (issue 7): feature grids, the hint block and adapter for CNN and ViT inputs, guidance, metrics on
known answers, the applications' building blocks, a short training run with resume, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffdissect.cli import main
from diffdissect.errors import DiffdissectError, LayerNotFoundError
from diffdissect.invert import (
    FeatureError,
    FeatureExtractor,
    HintBlock,
    Inverter,
    InvertTrainConfig,
    build_controlnet,
    invert,
    load_inverter,
    pool,
    to_grid,
)
from diffdissect.invert.applications import (
    concept_direction,
    gaussian_blur,
    occlude,
    pgd,
    region_colour,
    splice,
    steer,
    steering_outcome,
)
from diffdissect.invert.evaluate import (
    evaluate_reconstructions,
    feature_cosines,
    frechet_distance,
    judge_joint_logits,
    topk_agreement,
)
from diffdissect.invert.model import controlled_prediction
from diffdissect.invert.run import train_from_images, train_per_sample
from diffdissect.models import load_target


class TinyCNN(nn.Module):
    """3x32x32 -> conv map 8x8x8 -> 4 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU()
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """4x4 patches of 16x16 images -> 16 tokens + CLS, width 12."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 12))
        self.block = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = self.block(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))
        return self.head(tokens[:, 0])


def tiny_cnn() -> nn.Module:  # a package.module:factory for the CLI
    return TinyCNN()


# ---- feature grids -------------------------------------------------------------------------------------------------
def test_token_maps_become_grids_with_the_cls_token_dropped():
    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).reshape(2, 17, 5)
    grid = to_grid(tokens, "blocks.3")
    assert grid.shape == (2, 5, 4, 4)
    assert torch.equal(grid[1, :, 0, 1], tokens[1, 2])  # token 1 of the grid = row 0, column 1
    assert to_grid(tokens[:, 1:], "x").shape == (2, 5, 4, 4)  # no CLS token: a square as it is
    with pytest.raises(FeatureError, match="neither a square grid nor a grid plus a CLS"):
        to_grid(torch.zeros(2, 7, 5), "x")
    with pytest.raises(FeatureError, match="not a spatial map.*--mode pooled"):
        to_grid(torch.zeros(2, 5), "head")


def test_feature_extractor_for_cnn_and_vit_and_the_pooled_baseline():
    cnn, vit = TinyCNN(), TinyViT()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    spatial = FeatureExtractor(cnn, "body")(x)
    assert spatial.shape == (3, 8, 8, 8)
    pooled = FeatureExtractor(cnn, "body", mode="pooled")(x)
    assert pooled.shape == spatial.shape and torch.allclose(pooled[:, :, 5, 2], spatial.mean(dim=(2, 3)))
    assert torch.equal(pool(spatial), pooled)
    assert FeatureExtractor(vit, "block")(torch.rand(2, 3, 16, 16)).shape == (2, 12, 4, 4)
    assert FeatureExtractor(cnn, "head", mode="pooled")(x).shape == (3, 4, 1, 1)
    with pytest.raises(FeatureError, match="pooled"):
        FeatureExtractor(cnn, "head")(x)
    with pytest.raises(LayerNotFoundError, match="no module 'blocks.9'"):
        FeatureExtractor(cnn, "blocks.9")


# ---- hint block and the ControlNet adapter -------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (16, 16)])
def test_hint_block_maps_any_grid_to_the_latent_grid_and_starts_at_zero(grid):
    block = HintBlock(12, 32, (8, 8))
    out = block(torch.randn(2, 12, *grid))
    assert out.shape == (2, 32, 8, 8) and torch.count_nonzero(out) == 0  # zero-initialised last conv
    nn.init.normal_(block.zero.weight)
    assert torch.count_nonzero(block(torch.randn(2, 12, *grid))) > 0


@pytest.fixture(scope="module")
def sd_target(sd_dir):
    return load_target(sd_dir)


@pytest.mark.parametrize("model, layer, size", [(TinyCNN, "body", 32), (TinyViT, "block", 16)])
def test_controlnet_adapter_shapes_for_cnn_and_vit_features(sd_target, model, layer, size):
    unet = sd_target.denoiser
    features = FeatureExtractor(model(), layer)(torch.rand(2, 3, size, size))
    controlnet = build_controlnet(unet, features.shape[1], (8, 8))
    inverter = Inverter(controlnet, {"feature_shape": list(features.shape[1:])})
    noisy = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    text = sd_target.text_embeddings(["", ""])
    down, mid = inverter.residuals(noisy, t, text, features)
    assert len(down) >= len(unet.down_blocks) and all(r.shape[0] == 2 and r.ndim == 4 for r in down)
    assert mid.shape[1] == unet.config.block_out_channels[-1]
    # at initialisation every residual is zero: the frozen UNet's prediction is unchanged
    plain = unet(noisy, t, encoder_hidden_states=text).sample
    assert torch.allclose(controlled_prediction(unet, inverter, noisy, t, text, features), plain, atol=1e-6)


# ---- guidance ------------------------------------------------------------------------------------------------------
def _inverter_for(sd_target, channels=8, perturb=False):
    controlnet = build_controlnet(sd_target.denoiser, channels, (8, 8))
    if perturb:
        torch.manual_seed(1)
        zero_convs = [
            controlnet.controlnet_cond_embedding.zero,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        for conv in zero_convs:  # as if trained: every zero-initialised conv made non-zero
            nn.init.normal_(conv.weight, std=0.2)
    return Inverter(
        controlnet, {"feature_shape": [channels, 8, 8], "classifier": "tiny", "layer": "body", "mode": "spatial"}
    )


def test_guidance_is_on_the_features(sd_target):
    features = torch.randn(2, 8, 8, 8)
    untrained = _inverter_for(sd_target)
    a = invert(sd_target, untrained, features, guidance=1.0, steps=2)
    b = invert(sd_target, untrained, features, guidance=5.0, steps=2)
    np.testing.assert_array_equal(a, b)  # zero residuals: features change nothing, so guidance neither
    trained = _inverter_for(sd_target, perturb=True)
    c = invert(sd_target, trained, features, guidance=1.0, steps=2)
    d = invert(sd_target, trained, features, guidance=5.0, steps=2)
    zero = invert(sd_target, trained, torch.zeros_like(features), guidance=5.0, steps=2)
    assert not np.array_equal(c, d)
    # zero features: the guided and unguided predictions are the same (up to float rounding across batch shapes)
    assert _max_diff(zero, invert(sd_target, trained, torch.zeros_like(features), guidance=1.0, steps=2)) <= 1
    # seeds: several reconstructions per input, each reproducible and independent of the batch
    many = invert(sd_target, trained, features, seeds=(0, 1), guidance=2.0, steps=2, batch=1)
    assert many.shape == (2, 2, 32, 32, 3) and not np.array_equal(many[:, 0], many[:, 1])
    assert _max_diff(many, invert(sd_target, trained, features, seeds=(0, 1), guidance=2.0, steps=2, batch=4)) <= 1
    assert _max_diff(c, d) > 10


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ---- metrics with known answers ------------------------------------------------------------------------------------
def test_metrics_on_cases_with_a_known_answer():
    cnn = TinyCNN()
    extractor = FeatureExtractor(cnn, "body")
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    same = feature_cosines(extractor, images, images)
    assert same["pooled"] == pytest.approx(1.0, abs=1e-5) and same["per_location"] == pytest.approx(1.0, abs=1e-5)
    logits_o = torch.tensor([[5.0, 1, 0, 0], [0, 5.0, 1, 0]])
    logits_r = torch.tensor([[0.0, 5, 4, 1], [0, 5.0, 1, 0]])
    assert topk_agreement(logits_o, logits_r, 1).tolist() == [False, True]
    assert topk_agreement(logits_o, logits_r, 3).tolist() == [False, True]
    assert topk_agreement(logits_o, logits_r, 4).tolist() == [True, True]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + np.array([3.0, 0, 4.0])) == pytest.approx(25.0, rel=1e-6)
    joint = judge_joint_logits({"shape": torch.tensor([[0.0, 9.0, 0.0]]), "colour": torch.tensor([[9.0, 0.0]])})
    assert joint.shape == (1, 6) and int(joint.argmax()) == 1 * 2 + 0  # shape-major, like class_labels
    metrics = evaluate_reconstructions(images, images, classifier=cnn, extractor=extractor)
    assert metrics["classifier_top1"]["rate"] == 1.0 and metrics["feature_cosine_pooled"] == pytest.approx(
        1.0, abs=1e-5
    )


def test_world_judge_metrics_and_frechet_floor():
    from diffdissect.world import ShapesWorld
    from diffdissect.world.invert import world_extractor, world_images

    world = ShapesWorld.load()
    batch = world_images(world, 96, seed=5)
    judge = world.classifier("captioner")
    extractor = world_extractor(world, "cnn")
    same = evaluate_reconstructions(
        batch.images, batch.images, classifier=extractor.model, extractor=extractor, judge=judge
    )
    assert all(v["rate"] == 1.0 for v in same["factors"].values()) and same["judge_top1"]["rate"] == 1.0
    assert same["frechet"]["originals_vs_reconstructions"] == pytest.approx(0.0, abs=1e-3)
    shuffled = batch.images[np.roll(np.arange(96), 1)]
    other = evaluate_reconstructions(
        batch.images, shuffled, classifier=extractor.model, extractor=extractor, judge=judge
    )
    assert other["factors"]["shape"]["rate"] < 0.6 and other["feature_cosine_per_location"] < 0.95


# ---- applications' building blocks ---------------------------------------------------------------------------------
def test_steering_splicing_and_region_colours():
    features = torch.zeros(4, 3, 2, 2)
    features[2:, 0] = 1.0  # class 1 has channel 0 on
    direction = concept_direction(features, np.array([0, 0, 1, 1]), source=0, target=1)
    assert direction.tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(steer(features[:2], direction, 1.0), features[2:])
    out = steering_outcome(
        {"colour": np.array([0, 0, 0, 0]), "shape": np.array([1, 2, 3, 1])},
        {"colour": np.array([2, 2, 0, 2]), "shape": np.array([1, 2, 3, 0])},
        "colour",
        2,
    )
    assert (
        out["flipped"]["rate"] == 0.75 and out["others_kept"]["rate"] == 0.75 and out["flipped_and_kept"]["rate"] == 0.5
    )
    a, b = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4)
    assert splice(a, b)[0, 0].tolist() == [[0, 0, 1, 1]] * 4
    palette = np.array([[215, 45, 40], [45, 80, 215]], np.float32)
    background = np.array([120, 120, 120], np.float32)
    images = np.full((2, 8, 8, 3), 120, np.uint8)
    images[0, 2:5, 1:3] = (210, 50, 45)  # red on the left
    images[0, 2:5, 5:7] = (50, 80, 210)  # blue on the right
    assert region_colour(images, palette, background, "left").tolist() == [0, -1]
    assert region_colour(images, palette, background, "right").tolist() == [1, -1]


def test_corruptions_and_pgd():
    x = torch.zeros(2, 3, 16, 16)
    assert torch.allclose(gaussian_blur(x + 0.3), x + 0.3, atol=1e-6)  # a constant image is unchanged
    occluded = occlude(torch.ones(2, 3, 16, 16), size=4)
    assert int((occluded == 0).sum()) == 2 * 3 * 16
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    pixels = torch.rand(32, 3, 16, 16) * 2 - 1
    labels = linear(pixels).argmax(1)
    adv = pgd(linear, pixels, labels, eps=0.1, steps=10)
    assert (adv - pixels).abs().max() <= 0.1 + 1e-6
    assert (linear(adv).argmax(1) == labels).float().mean() < 0.5


# ---- training: a short run, resume, checkpoints, bad input ---------------------------------------------------------
def _images(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_short_training_run_resumes_to_the_same_weights(tmp_path, sd_target):
    extractor = FeatureExtractor(TinyCNN(), "body")
    config = InvertTrainConfig(steps=4, batch_size=4, checkpoint_every=2, warmup=1)
    straight = train_from_images(sd_target, extractor, "tiny", _images(), tmp_path / "straight", config, progress=False)
    assert straight["steps"] == 4 and straight["feature_shape"] == [8, 8, 8] and np.isfinite(straight["final_loss"])
    assert (tmp_path / "straight" / "data" / "manifest.json").is_file()  # features precomputed into a store

    first = InvertTrainConfig(steps=2, batch_size=4, checkpoint_every=2, warmup=1)
    train_from_images(sd_target, extractor, "tiny", _images(), tmp_path / "resumed", first, progress=False)
    resumed = train_from_images(sd_target, extractor, "tiny", _images(), tmp_path / "resumed", config, progress=False)
    assert resumed["trained_now"] == 2
    a = load_inverter(tmp_path / "straight").controlnet.state_dict()
    b = load_inverter(tmp_path / "resumed").controlnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # FeatInv's way (features per batch) trains the same model on the same draws
    per_sample = train_per_sample(sd_target, extractor, "tiny", _images(), tmp_path / "per-sample", config)
    assert per_sample["steps"] == 4
    c = load_inverter(tmp_path / "per-sample").controlnet.state_dict()
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-3

    with pytest.raises(DiffdissectError, match="other settings"):
        train_from_images(
            sd_target,
            FeatureExtractor(TinyCNN(), "body", mode="pooled"),
            "tiny",
            _images(),
            tmp_path / "straight",
            config,
            data_dir=tmp_path / "other-data",
            progress=False,
        )
    with pytest.raises(DiffdissectError, match="other images, another pipeline or another classifier layer"):
        train_from_images(sd_target, extractor, "tiny", _images(n=8), tmp_path / "straight", config, progress=False)
    with pytest.raises(DiffdissectError, match="other images"):  # same count, other pixels
        train_from_images(sd_target, extractor, "tiny", _images(seed=1), tmp_path / "straight", config, progress=False)
    # a checkpoint whose files disagree (an interrupted write) is refused, not silently replayed
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    saved["state"]["step"] = 2
    (tmp_path / "straight" / "config.json").write_text(json.dumps(saved))
    __import__("shutil").rmtree(tmp_path / "straight" / "previous")  # with it, the run resumes from there
    with pytest.raises(DiffdissectError, match="inconsistent"):
        train_from_images(
            sd_target,
            extractor,
            "tiny",
            _images(),
            tmp_path / "straight",
            InvertTrainConfig(steps=6, batch_size=4, checkpoint_every=2, warmup=1),
            progress=False,
        )


def test_bad_features_and_checkpoints_from_another_pipeline_are_refused(tmp_path, sd_target, sd_dir):
    from diffdissect.models import load_target
    from diffdissect.world import ShapesWorld

    extractor = FeatureExtractor(TinyCNN(), "body")
    config = InvertTrainConfig(steps=1, batch_size=2, checkpoint_every=1, warmup=1)
    train_from_images(sd_target, extractor, "tiny", _images(4), tmp_path / "inv", config, progress=False)
    inverter = load_inverter(tmp_path / "inv", pipeline_identity=sd_target.identity())
    with pytest.raises(FeatureError, match=r"do not fit this inverter, trained on 8 channels on a 8x8 grid"):
        invert(sd_target, inverter, torch.zeros(1, 6, 8, 8))
    with pytest.raises(FeatureError, match=r"shape \(8, 4, 4\) do not fit"):
        invert(sd_target, inverter, torch.zeros(1, 8, 4, 4))
    with pytest.raises(DiffdissectError, match="trained on another diffusion pipeline"):
        load_inverter(tmp_path / "inv", pipeline_identity=ShapesWorld.load().target().identity())
    half = load_target(str(sd_dir), dtype=torch.float16).identity()  # the same weights in float16: accepted
    with pytest.warns(UserWarning, match="could not be compared exactly"):
        load_inverter(tmp_path / "inv", pipeline_identity=half)
    with pytest.raises(DiffdissectError, match="trained on another diffusion pipeline"):
        load_inverter(tmp_path / "inv", pipeline_identity=dict(half, num_parameters=1))
    with pytest.raises(DiffdissectError, match="no inverter at"):
        load_inverter(tmp_path / "nothing")


def test_cli_invert_train_and_sample(tmp_path, sd_dir, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_images(6)):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "inv"
    factory = "test_invert:tiny_cnn"
    assert (
        main(
            [
                "invert",
                "train",
                "--model",
                str(sd_dir),
                "--classifier",
                factory,
                "--layer",
                "body",
                "--images",
                str(folder),
                "--train-steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["layer"] == "body"
    assert (
        main(
            [
                "invert",
                "sample",
                "--model",
                str(sd_dir),
                "--inverter",
                str(out),
                "--classifier",
                factory,
                "--images",
                str(folder),
                "--seeds",
                "0",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "rec"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "rec").glob("input*-seed*.png"))) == 12 and (tmp_path / "rec" / "grid.png").is_file()
    capsys.readouterr()
    code = main(
        [
            "invert",
            "train",
            "--model",
            str(sd_dir),
            "--classifier",
            factory,
            "--layer",
            "head",
            "--images",
            str(folder),
            "--train-steps",
            "2",
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
        ]
    )
    assert code == 2 and "pooled" in capsys.readouterr().err and not (tmp_path / "bad" / "data").exists()
