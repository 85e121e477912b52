"""Layer listing (shapes from one dry forward), layer-name checking, and `diffdissect layers`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_FACTORY
from diffdissect import list_layers, load_target
from diffdissect.capture import CaptureConfig, capture, resolve_layers
from diffdissect.cli import main
from diffdissect.data import ArraySource
from diffdissect.errors import LayerNotFoundError


def _model(kind, sd_dir, dit_dir, unet2d_dir):
    return {"sd": sd_dir, "dit": dit_dir, "unet2d": unet2d_dir, "module": TINY_FACTORY}[kind]


def _plain_forward(target, batch: int):
    """A forward of the denoiser written out here: kind-specific call, batch of `batch` random inputs."""
    c, h, w = target.sample_shape()
    sample = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 300, dtype=torch.long)
    model = target.denoiser
    if target.kind == "text_unet":
        emb = target.pipeline.encode_prompt([""] * batch, "cpu", 1, False)[0]
        return lambda: model(sample, t, encoder_hidden_states=emb)
    if target.kind == "dit":
        return lambda: model(sample, timestep=t, class_labels=torch.full((batch,), 1000))
    return lambda: model(sample, t)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    raise AssertionError(f"unexpected output {type(output)}")


@pytest.mark.parametrize("kind", ["sd", "dit", "unet2d", "module"])
def test_list_layers_shapes_match_a_real_forward(kind, sd_dir, dit_dir, unet2d_dir):
    target = load_target(_model(kind, sd_dir, dit_dir, unet2d_dir))
    infos = list_layers(target)
    assert infos, "no layers listed"
    modules = dict(target.denoiser.named_modules())
    seen: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    handles = []
    for info in infos:

        def hook(module, args, output, path=info.path):
            if path not in seen:
                seen[path] = tuple(_first_tensor(output).shape)
                order.append(path)

        handles.append(modules[info.path].register_forward_hook(hook))
    try:
        with torch.no_grad():
            _plain_forward(target, batch=3)()
    finally:
        for handle in handles:
            handle.remove()
    for info in infos:
        assert info.module_class == type(modules[info.path]).__name__
        assert seen[info.path][0] == 3
        assert info.shape == seen[info.path][1:], info.path
    # listed in execution order; paths have at most two dotted parts by default
    assert [i.path for i in infos] == order
    assert all(i.path.count(".") <= 1 for i in infos)


def test_list_layers_known_shapes(sd_dir, dit_dir):
    sd = {i.path: i.shape for i in list_layers(load_target(sd_dir))}
    assert sd["conv_in"] == (16, 8, 8)
    assert sd["down_blocks.0"] == (16, 4, 4)  # a tuple output: its hidden states
    assert sd["mid_block"] == (32, 4, 4)
    assert sd["up_blocks.1"] == (16, 8, 8)
    assert "down_blocks" not in sd  # a ModuleList never runs itself: not hookable
    dit = {i.path: i.shape for i in list_layers(load_target(dit_dir))}
    assert dit["transformer_blocks.0"] == (16, 16)  # (tokens, dim)
    assert dit["transformer_blocks.1"] == (16, 16)


def test_list_layers_depth_and_filter(unet2d_dir):
    target = load_target(unet2d_dir)
    shallow = [i.path for i in list_layers(target, max_depth=1)]
    assert "mid_block" in shallow and all("." not in p for p in shallow)
    deep = {i.path: i.shape for i in list_layers(target, max_depth=None)}
    assert "down_blocks.0.resnets.0" in deep and deep["down_blocks.0.resnets.0"] == (16, 16, 16)
    assert "mid_block.attentions.0" in deep
    filtered = [i.path for i in list_layers(target, max_depth=None, contains="mid_block")]
    assert filtered and all("mid_block" in p for p in filtered) and "mid_block" in filtered


@pytest.mark.parametrize(
    "wrong, close",
    [
        ("mid_blok", "mid_block"),
        ("up_block.1", "up_blocks.1"),
        ("down_blocks.0.resnet.0", "down_blocks.0.resnets.0"),
    ],
)
def test_misspelt_layer_lists_close_names(wrong, close, unet2d_dir):
    target = load_target(unet2d_dir)
    with pytest.raises(LayerNotFoundError) as err:
        resolve_layers(target, ["conv_in", wrong])
    message = str(err.value)
    assert repr(wrong) in message
    assert "Closest valid names" in message and close in message
    assert "diffdissect layers" in message


def test_prefix_of_a_layer_suggests_its_children(dit_dir):
    with pytest.raises(LayerNotFoundError, match="transformer_blocks.0"):
        resolve_layers(load_target(dit_dir), ["transformer_block"])


def test_no_layers_and_duplicates_are_refused(unet2d_dir):
    target = load_target(unet2d_dir)
    with pytest.raises(LayerNotFoundError, match="no layers"):
        resolve_layers(target, [])
    with pytest.raises(LayerNotFoundError, match="more than once"):
        resolve_layers(target, ["mid_block", "mid_block"])
    assert resolve_layers(target, ["mid_block", "conv_in"]) == ["mid_block", "conv_in"]


def test_capture_with_a_misspelt_layer_writes_nothing(tmp_path):
    target = load_target(TINY_FACTORY)
    images = ArraySource(torch.zeros(2, 16, 16, 3, dtype=torch.uint8).numpy())
    with pytest.raises(LayerNotFoundError, match="blocks.1"):
        capture(target, images, CaptureConfig(layers=["blocks.1", "blocks.7"]), tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_layers_table(sd_dir, capsys):
    assert main(["layers", "--model", str(sd_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert str(sd_dir) in lines[0] and "UNet2DConditionModel" in lines[0]
    table = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert table["mid_block"][1] == "UNetMidBlock2DCrossAttn" and table["mid_block"][2] == "32x4x4"
    assert table["down_blocks.0"][2] == "16x4x4"
    assert table["up_blocks.1"][2] == "16x8x8"
    assert set(table) == {i.path for i in list_layers(load_target(sd_dir))}


def test_cli_layers_json_and_filter(dit_dir, capsys):
    assert main(["layers", "--model", str(dit_dir), "--json", "-", "--filter", "transformer_blocks"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["path"] for d in data] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(d["shape"] == [16, 16] and d["class"] == "BasicTransformerBlock" for d in data)


def test_cli_layers_factory_all_depths(capsys):
    assert main(["layers", "--model", TINY_FACTORY, "--depth", "0", "--json", "-"]) == 0
    paths = {d["path"]: d["shape"] for d in json.loads(capsys.readouterr().out)}
    assert paths["blocks.0.conv"] == [16, 16, 16] and paths["out.2"] == [3, 16, 16]


def test_cli_layers_bad_model(tmp_path, capsys):
    assert main(["layers", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "diffdissect: error:" in err and "no such directory" in err and "Traceback" not in err


def test_cli_capture_misspelt_layer(tmp_path, image_folder, capsys):
    code = main(
        [
            "capture",
            "--model",
            TINY_FACTORY,
            "--images",
            str(image_folder),
            "--layers",
            "mid",
            "blocks.O",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'blocks.O'" in err and "blocks.0" in err
