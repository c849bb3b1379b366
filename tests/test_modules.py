"""gyrodrop._modules: unwrapping, placing modules by dotted name, the surgery policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop._modules import device_of, replace_modules, set_submodule, swap_all, unwrap_model


class TestUnwrapModel:
    def test_looks_through_nested_wrappers(self) -> None:
        net = nn.Linear(2, 2)
        assert unwrap_model(nn.DataParallel(torch.compile(net))) is net

    def test_leaves_a_plain_module_alone(self) -> None:
        net = nn.Linear(2, 2)
        assert unwrap_model(net) is net


class TestSwapAll:
    def test_a_shared_module_is_replaced_in_every_parent(self) -> None:
        drop = nn.Dropout(0.5)
        net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), drop), nn.Sequential(drop))
        new = nn.Identity()
        set_submodule(net, "0.1", new)
        assert net[0][1] is new and net[1][0] is new

    def test_a_bad_name_leaves_the_model_unchanged(self) -> None:
        net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        before = list(net)
        with pytest.raises(AttributeError):
            swap_all(net, [("1", nn.Identity()), ("7", nn.Identity())])
        assert list(net) == before

    def test_the_root_cannot_replace_itself(self) -> None:
        with pytest.raises(ValueError, match="cannot replace the root"):
            swap_all(nn.Linear(2, 2), [("", nn.Identity())])


class TestReplaceModules:
    def test_surgery_replaces_a_dropout_shared_by_two_parents_everywhere(self) -> None:
        drop = nn.Dropout(0.5)
        net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), drop), nn.Sequential(drop))
        assert gyrodrop.apply_gyro_dropout(net, total_steps=10) == 1
        assert isinstance(net[0][1], gyrodrop.GyroDropout)
        assert net[1][0] is net[0][1]

    def test_policy_error_leaves_the_model_unchanged(self) -> None:
        net = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.2))

        def make(module: nn.Module, index: int) -> nn.Module:
            if index == 1:
                raise RuntimeError("refused")
            return nn.Identity()

        with pytest.raises(RuntimeError, match="refused"):
            replace_modules(net, {nn.Dropout: make})
        assert all(isinstance(m, nn.Dropout) for m in net)

    def test_replacement_takes_the_device_and_mode_of_the_replaced_module(self) -> None:
        net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval()
        replace_modules(net, {nn.Dropout: lambda m, i: nn.Linear(2, 2)})
        assert not net[1].training
        assert device_of(net[1]) == torch.device("cpu")
