"""The package face: the names a user imports from `diffdissect`, and the ground floor's helpers."""

from __future__ import annotations

import importlib
import importlib.metadata
import types

import pytest

import diffdissect
from diffdissect.errors import DiffdissectError, ModelLoadError
from diffdissect.runtime import load_factory, version


def test_capture_images_is_exported_beside_capture_trajectories():
    from diffdissect import capture_images, capture_trajectories
    from diffdissect.capture.engine import capture

    assert capture_images is capture and callable(capture_trajectories)
    assert isinstance(diffdissect.capture, types.ModuleType)  # the subpackage is not hidden


def test_version_comes_from_the_package_metadata():
    assert diffdissect.__version__ == version() == importlib.metadata.version("diffdissect")


def test_the_one_factory_loader_names_what_went_wrong():
    assert load_factory("collections:OrderedDict", what="--x") == {}
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module_xyz:f' \\(model\\)"):
        load_factory("no_such_module_xyz:f", what="model", error=ModelLoadError)
    with pytest.raises(DiffdissectError, match="expected package.module:factory"):
        load_factory("no-colon", what="--classifier")
    with pytest.raises(DiffdissectError, match="failed when called with no arguments"):
        load_factory("os.path:join", what="--classifier")


def test_configs_have_one_word_and_the_old_names_still_import_with_a_warning():
    from diffdissect.capture import CaptureConfig, TrajectoryConfig
    from diffdissect.directions import BiasConfig
    from diffdissect.probe import SplitConfig

    for module, old, new in [
        (diffdissect, "CaptureSpec", CaptureConfig),
        (diffdissect, "TrajectorySpec", TrajectoryConfig),
        (diffdissect.capture, "CaptureSpec", CaptureConfig),
        (importlib.import_module("diffdissect.probe"), "SplitSpec", SplitConfig),
        (importlib.import_module("diffdissect.directions"), "BiasSpec", BiasConfig),
    ]:
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new.__name__}"):
            assert getattr(module, old) is new
    with pytest.raises(AttributeError):
        diffdissect.NoSuchSpec  # noqa: B018
    assert not any(n.endswith(("Spec", "Recipe")) for n in diffdissect.__all__)
