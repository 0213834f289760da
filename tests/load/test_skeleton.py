"""Meta-model skeletons: a (class, config) is built once and cloned; every clone is its own model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from modelbus.services.load import skeleton
from modelbus.services.load.loaders import load_module_folder
from modelbus.services.load.safetensors_fast import empty_model
from tests.fixtures.loadable import UNET_CFG, write_pipeline


def _folder(tmp_path: Path) -> tuple[Path, dict[str, torch.nn.Module]]:
    models = write_pipeline(tmp_path / "pipe")
    return tmp_path / "pipe", models


def test_two_loads_are_equal_weight_for_weight_and_share_no_memory(tmp_path: Path) -> None:
    root, models = _folder(tmp_path)
    skeleton.forget_skeletons()
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", type(models["text_encoder"]))):
        a = load_module_folder(cls, root / name, torch.device("cpu"), torch.float32).model
        b = load_module_folder(cls, root / name, torch.device("cpu"), torch.float32).model
        ref = models[name].state_dict()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(sa[key], value) and torch.equal(sb[key], value), key
        ptrs_a = {t.data_ptr() for t in sa.values() if t.numel()}
        ptrs_b = {t.data_ptr() for t in sb.values() if t.numel()}
        assert not ptrs_a & ptrs_b  # no tensor of one load lives in the other's memory
        first = next(iter(a.parameters()))
        before = next(iter(b.parameters())).clone()
        first.data.add_(1.0)  # writing one load's weights leaves the other's alone
        assert torch.equal(next(iter(b.parameters())), before)
        assert not any(p.is_meta for p in a.parameters()) and not a.training


def test_the_skeleton_is_built_once_and_stays_empty(tmp_path: Path) -> None:
    root, _ = _folder(tmp_path)
    skeleton.forget_skeletons()
    builds = []
    original = UNet2DConditionModel.from_config

    def counting(*args: object, **kwargs: object) -> object:
        builds.append(1)
        return original(*args, **kwargs)

    UNet2DConditionModel.from_config = counting  # type: ignore[method-assign,assignment]
    try:
        for _ in range(3):
            load_module_folder(UNet2DConditionModel, root / "unet", torch.device("cpu"), torch.float32)
    finally:
        UNet2DConditionModel.from_config = original  # type: ignore[method-assign]
    assert len(builds) == 1
    kept = list(skeleton._skeletons.values())
    assert len(kept) == 1 and all(p.is_meta for p in kept[0].parameters())


def test_clones_have_their_own_modules_hooks_and_processors() -> None:
    base = empty_model(lambda: UNet2DConditionModel(**UNET_CFG))
    a, b = skeleton.clone_module(base), skeleton.clone_module(base)
    mods_a, mods_b, mods_base = list(a.modules()), list(b.modules()), list(base.modules())
    assert len(mods_a) == len(mods_b) == len(mods_base)
    assert not {id(m) for m in mods_a} & ({id(m) for m in mods_b} | {id(m) for m in mods_base})
    assert [type(m) for m in mods_a] == [type(m) for m in mods_base]
    assert list(a.state_dict()) == list(base.state_dict())
    seen: list[str] = []
    a.conv_in.register_forward_hook(lambda *_: seen.append("a"))
    assert not b.conv_in._forward_hooks and not base.conv_in._forward_hooks
    a.set_attn_processor(AttnProcessor())
    assert all(not isinstance(p, AttnProcessor) for p in b.attn_processors.values())
    a.conv_in.weight = torch.nn.Parameter(torch.zeros(a.conv_in.weight.shape))
    assert b.conv_in.weight.is_meta and base.conv_in.weight.is_meta


def test_a_config_with_no_json_form_is_built_every_time() -> None:
    assert skeleton.config_key(UNet2DConditionModel, {"x": object()}) is None
    assert skeleton.config_key(UNet2DConditionModel, {"b": 1, "a": [1, 2]}) == \
        skeleton.config_key(UNet2DConditionModel, {"a": [1, 2], "b": 1})


def test_builds_and_clones_run_with_gc_paused_and_restore_it() -> None:
    import gc

    skeleton.forget_skeletons()
    seen: list[bool] = []

    def build() -> torch.nn.Module:
        seen.append(gc.isenabled())
        return empty_model(lambda: UNet2DConditionModel(**UNET_CFG))

    assert gc.isenabled()
    skeleton.skeleton_model(UNet2DConditionModel, UNET_CFG, build)
    assert seen == [False] and gc.isenabled()

    def failing() -> torch.nn.Module:
        seen.append(gc.isenabled())
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        skeleton.skeleton_model(UNet2DConditionModel, {"x": object()}, failing)  # (no key: built each time)
    assert seen == [False, False] and gc.isenabled()  # restored on the way out of a failure too
    gc.disable()
    try:
        with skeleton.gc_paused(), skeleton.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
    skeleton.forget_skeletons()
