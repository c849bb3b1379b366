"""The configs (:mod:`gyrodrop.config`): every field of every method's config is checked
once, with one message, wherever the user passes it (the config, the module, the
functional form), is shown, saved and compared on load, and reads through the module.

The tests walk ``dataclasses.fields`` of each config, so a field added later is covered
as soon as it has a bad and another good value in ``BAD`` / ``OTHER`` (a test fails
until it has).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.config import (
    BlockGyroConfig,
    DropBlockConfig,
    GyroDropBlockConfig,
    GyroDropoutConfig,
    LayerConfig,
    ScheduleConfig,
    StochasticDepthConfig,
)
from gyrodrop.dropblock import dropblock2d, gyro_dropblock2d
from gyrodrop.gyro import gyro_dropout
from gyrodrop.stepping import SteppedModule
from gyrodrop.stochastic_depth import stochastic_depth

#: A value each field refuses.
BAD: dict[str, Any] = {
    "p": 1.5,
    "num_subnets": 0,
    "subnets_per_step": 0,
    "steps_per_set": 0,
    "schedule": "cyclic",
    "scale": "paper",
    "dims": 0,
    "unbatched_ndim": 0,
    "block_size": 0,
    "prune": "both",
    "shared_channels": 1,
    "warmup_steps": -1,
    "mode": "row",
    "per_rank": "yes",
    "kept_rows": "some",
}
#: Another value each field accepts (different from the base settings below).
OTHER: dict[str, Any] = {
    "p": 0.25,
    "num_subnets": 12,
    "subnets_per_step": 3,
    "steps_per_set": 7,
    "schedule": "random",
    "scale": "realized",
    "dims": (-1,),
    "unbatched_ndim": 3,
    "block_size": 2,
    "prune": "output",
    "shared_channels": True,
    "warmup_steps": 5,
    "mode": "sample",
    "per_rank": True,
    "kept_rows": "fixed",
}


@dataclass(frozen=True)
class Method:
    config: type[LayerConfig]
    module: Callable[..., SteppedModule]  # keyword arguments: config fields
    base: dict[str, Any]  # settings the tests start from
    functional: Callable[..., torch.Tensor] | None = None
    call: Callable[..., torch.Tensor] | None = None  # functional on a fitting input

    def __repr__(self) -> str:
        return self.config.__name__


x2 = torch.ones(8, 16)
x4 = torch.ones(4, 2, 8, 8)

METHODS = [
    Method(
        GyroDropoutConfig,
        lambda **kw: gyrodrop.GyroDropout(**kw),
        {"p": 0.5, "num_subnets": 8, "subnets_per_step": 2, "steps_per_set": 1},
        gyro_dropout,
        lambda **kw: gyro_dropout(x2, step=0, **kw),
    ),
    Method(
        BlockGyroConfig,
        lambda **kw: gyrodrop.BlockGyroLinear(16, 16, **kw),
        {"p": 0.5, "num_subnets": 8, "subnets_per_step": 2, "block_size": 4, "steps_per_set": 1},
    ),
    Method(
        DropBlockConfig,
        lambda **kw: gyrodrop.DropBlock2d(**kw),
        {"p": 0.2, "block_size": 3},
        dropblock2d,
        lambda **kw: dropblock2d(x4, step=0, **kw),
    ),
    Method(
        GyroDropBlockConfig,
        lambda **kw: gyrodrop.GyroDropBlock2d(**kw),
        {"p": 0.2, "block_size": 3, "num_subnets": 8, "subnets_per_step": 2, "steps_per_set": 1},
        gyro_dropblock2d,
        lambda **kw: gyro_dropblock2d(x4, step=0, **kw),
    ),
    Method(
        StochasticDepthConfig,
        lambda **kw: gyrodrop.StochasticDepth(**kw),
        {"p": 0.5},
        stochastic_depth,
        lambda **kw: stochastic_depth(x2, **kw),
    ),
]
#: The fields of early/late dropout go together (a mode needs a cutoff): checked over
#: every layer in tests/test_contract.py (TestEarlyAndLateDropout) and tests/test_drop_mode.py.
TIMING = {"drop_mode", "drop_cutoff", "cutoff_step"}
FIELDS = [
    (m, f.name) for m in METHODS for f in dataclasses.fields(m.config) if f.name not in TIMING
]


def _message(call: Callable[[], Any]) -> str:
    """The ValueError's message after its owner (``"Owner: "``)."""
    with pytest.raises(ValueError) as info:
        call()
    owner, _, rest = str(info.value).partition(": ")
    assert rest, f"message without an owner: {info.value}"
    return rest


def _subclasses(cls: type) -> set[type]:
    return {s for c in cls.__subclasses__() for s in {c} | _subclasses(c)}


def test_every_config_of_the_package_is_listed_here():
    found = {
        c
        for c in _subclasses(LayerConfig) - {ScheduleConfig}
        if c.__module__.startswith("gyrodrop")
    }
    assert found == {m.config for m in METHODS}, "add a Method for each new config"


@pytest.mark.parametrize(("method", "name"), FIELDS, ids=lambda v: str(v))
class TestEveryField:
    def test_has_a_bad_and_another_good_value_for_these_tests(self, method, name):
        assert name in BAD and name in OTHER, f"add {name!r} to BAD and OTHER"

    def test_bad_value_gives_one_message_from_config_module_and_functional(self, method, name):
        settings = {**method.base, name: BAD[name]}
        text = _message(lambda: method.config(**settings))
        assert text.startswith(name), text  # names the argument
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _message(lambda: method.module(**settings)) == text
            assert _message(lambda: method.config(**settings, owner="Who")) == text
            params = inspect.signature(method.functional).parameters if method.functional else {}
            if name in params:
                assert method.call is not None
                assert _message(lambda: method.call(**settings)) == text

    def test_message_names_the_argument_the_user_passed(self, method, name):
        settings = {**method.base, name: BAD[name]}
        with pytest.raises(ValueError, match=rf"^apply_x: my_{name} must"):
            method.config(**settings, owner="apply_x", names={name: f"my_{name}"})

    def test_module_reads_saves_and_shows_the_field(self, method, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = method.module(**{**method.base, name: OTHER[name]})
        value = getattr(module.config, name)
        assert getattr(module, name) == value
        expected = list(value) if isinstance(value, tuple) else value
        assert module.hparams()[name] == expected
        assert f"{name}=" in repr(module)

    def test_assigning_the_field_on_the_module_is_checked(self, method, name):
        module = method.module(**method.base)
        owner = type(module).__name__
        with pytest.raises(ValueError, match=rf"^{owner}: {name} must"):
            setattr(module, name, BAD[name])
        setattr(module, name, OTHER[name])
        assert getattr(module.config, name) == method.config(
            **{**method.base, name: OTHER[name]}
        ).__getattribute__(name)

    def test_checkpoint_with_another_value_warns_naming_it(self, method, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = method.module(**{**method.base, name: OTHER[name]})
            module = method.module(**method.base)
        with pytest.warns(UserWarning, match=rf"saved with .*\b{name}=") as record:
            module.load_state_dict(saved.state_dict())
        differing = [w for w in record if "saved with" in str(w.message)]
        assert len(differing) == 1

    def test_checkpoint_with_the_same_value_loads_silently(self, method, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = method.module(**{**method.base, name: OTHER[name]})
            module = method.module(**{**method.base, name: OTHER[name]})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module.load_state_dict(saved.state_dict())


@pytest.mark.parametrize("method", METHODS, ids=repr)
class TestEveryConfig:
    def test_is_frozen_and_hashable(self, method):
        config = method.config(**method.base)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.p = 0.1  # type: ignore[misc]
        assert hash(config) == hash(method.config(**method.base))

    def test_module_config_equals_the_config_of_its_arguments(self, method):
        assert method.module(**method.base).config == method.config(**method.base)

    def test_from_config_builds_the_same_module(self, method):
        config = method.config(**{**method.base, "p": 0.3})
        module = method.module(**method.base)
        args = (16, 16) if isinstance(module, gyrodrop.BlockGyroLinear) else ()
        built = type(module).from_config(config, *args, seed=3)
        assert built.config == config and int(built.seed) == 3

    def test_from_config_refuses_another_methods_config(self, method):
        module = method.module(**method.base)
        other = next(m for m in METHODS if m.config is not method.config)
        with pytest.raises(TypeError, match="from_config: config must be"):
            type(module).from_config(other.config(**other.base))

    def test_hparams_are_the_config_fields_in_json_types(self, method):
        module = method.module(**method.base)
        assert set(module.hparams()) == {f.name for f in dataclasses.fields(method.config)}

    def test_values_come_back_normalized(self, method):
        config = method.config(**{**method.base, "p": 0})  # an int p
        assert isinstance(config.p, float)

    def test_a_module_pickled_before_configs_loads_its_settings(self, method):
        module = method.module(**method.base)
        state = module.__getstate__()
        del state["config"]
        state.update(module.hparams())  # settings as plain attributes, as 0.1.0 kept them
        old = type(module).__new__(type(module))
        old.__setstate__(state)
        assert old.config == module.config

    def test_replace_checks_the_change(self, method):
        config = method.config(**method.base)
        assert config.replace(p=0.25).p == 0.25
        with pytest.raises(ValueError, match="^Who: p must be in"):
            config.replace(owner="Who", p=1.0)


class TestScheduleConfig:
    def test_total_steps_sets_steps_per_set_as_the_paper(self):
        config = GyroDropoutConfig(num_subnets=32, subnets_per_step=8, total_steps=100)
        assert config.steps_per_set == 100 * 8 // 32

    def test_at_most_one_of_total_steps_and_steps_per_set(self):
        with pytest.raises(ValueError, match="at most one of total_steps and steps_per_set"):
            ScheduleConfig(total_steps=10, steps_per_set=2)

    def test_neither_warns_at_the_users_line(self):
        with pytest.warns(UserWarning, match="neither total_steps") as record:
            GyroDropoutConfig()
        assert record[0].filename == __file__

    def test_subnets_per_step_above_num_subnets_is_refused(self):
        with pytest.raises(ValueError, match=r"subnets_per_step must be in \[1, 4\], got 5"):
            BlockGyroConfig(num_subnets=4, subnets_per_step=5, steps_per_set=1)

    def test_replace_keeps_the_resolved_steps_per_set_without_warning(self):
        config = GyroDropoutConfig(num_subnets=32, subnets_per_step=8, total_steps=100)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert config.replace(p=0.1).steps_per_set == 25


class TestFunctionalsRefuseWhatTheirModulesRefuse:
    """The case of round 3 (``case_functional_validation.py``) and its kind."""

    @pytest.mark.parametrize(
        "call",
        [
            lambda: stochastic_depth(x2, 0.5, "sample", seed=1.5),
            lambda: stochastic_depth(x2, 0.5, "sample", step=2.7),
            lambda: stochastic_depth(x2, 0.5, "sample", training="no"),
            lambda: dropblock2d(x4, 0.2, 3, step=2.7),
            lambda: dropblock2d(x4, 0.2, 3, step=0, seed=-1),
            lambda: dropblock2d(x4, 0.2, 3, step=0, training="no"),
            lambda: gyro_dropblock2d(x4, 0.2, 3, step=1.5, num_subnets=8, subnets_per_step=2),
            lambda: gyro_dropblock2d(x4, 0.2, 3, step=0, seed=0.5),
            lambda: gyro_dropblock2d(x4, 0.2, 3, step=0, training=1),
            lambda: gyro_dropout(x2, 0.5, step=0, training="no"),
        ],
    )
    def test_bad_seed_step_or_training_is_refused(self, call):
        with pytest.raises(ValueError, match=r"(seed|step|training) must be"):
            call()

    @pytest.mark.parametrize(
        "call",
        [
            lambda x: stochastic_depth(x, 0.5, "sample"),
            lambda x: stochastic_depth(x, 0.5, "block"),
            lambda x: dropblock2d(x.reshape(4, 2, 2, 2), 0.2, 3, step=0),
            lambda x: gyro_dropblock2d(x.reshape(4, 2, 2, 2), 0.2, 1, step=0),
            lambda x: gyro_dropout(x, 0.5, step=0, num_subnets=8, subnets_per_step=2),
        ],
    )
    def test_integer_input_is_refused_in_training(self, call):
        with pytest.raises(TypeError, match="floating-point"):
            call(torch.ones(8, 4, dtype=torch.int64))

    def test_same_message_as_the_module_for_a_bad_seed(self):
        module = _message(lambda: gyrodrop.StochasticDepth(0.5, seed=1.5))
        function = _message(lambda: stochastic_depth(x2, 0.5, seed=1.5))
        assert module == function == "seed must be an int, got 1.5"

    def test_the_function_equals_the_module_at_the_same_step(self):
        for mode in ("block", "sample"):
            sd = gyrodrop.StochasticDepth(0.5, mode, seed=4)
            for step in range(5):
                assert torch.equal(sd(x2), stochastic_depth(x2, 0.5, mode, seed=4, step=step))
        drop = gyrodrop.DropBlock2d(0.3, 3, seed=2)
        for step in range(3):
            assert torch.equal(drop(x4), dropblock2d(x4, 0.3, 3, seed=2, step=step))


class TestMessagesNameTheUsersArgument:
    """The case of round 3 (``case_wrong_argument_name.py``) and its kind."""

    def test_apply_stochastic_depth_names_drop_rate(self):
        with pytest.raises(ValueError, match="apply_stochastic_depth: drop_rate must be"):
            gyrodrop.apply_stochastic_depth(nn.Sequential(nn.Linear(2, 2)), drop_rate=1.0)

    def test_subnet_ensemble_predict_names_batch_subnets(self):
        net = nn.Sequential(
            nn.Linear(4, 4), gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1), nn.Linear(4, 3)
        )
        with pytest.raises(ValueError, match="batch_subnets must be"):
            gyrodrop.subnet_ensemble_predict(net, torch.ones(2, 4), batch_subnets=-1)

    def test_mc_predict_names_batch_samples(self):
        net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3))
        with pytest.raises(ValueError, match="batch_samples must be"):
            gyrodrop.mc_predict(net, torch.ones(2, 4), batch_samples=0)


class TestStochasticDepthPerRank:
    def test_per_rank_is_saved_and_a_mismatch_warns(self):
        saved = gyrodrop.StochasticDepth(0.2, per_rank=True)
        module = gyrodrop.StochasticDepth(0.2)
        assert saved.hparams()["per_rank"] is True
        with pytest.warns(UserWarning, match=r"per_rank=True \(this layer: False\)"):
            module.load_state_dict(saved.state_dict())

    def test_wrapped_blocks_warn_too(self):
        block = nn.Sequential(nn.Linear(2, 2))
        saved = gyrodrop.stochastic_depth.StochasticDepthBlock(
            block, 0.2, split=_Split(), per_rank=True
        )
        module = gyrodrop.stochastic_depth.StochasticDepthBlock(block, 0.2, split=_Split())
        with pytest.warns(UserWarning, match="per_rank=True"):
            module.load_state_dict(saved.state_dict())


class _Split:
    def branch(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x)

    def shortcut(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y

    def has_post(self, block: nn.Module) -> bool:
        return False


def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 16))


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Dropout2d(0.2))


def _residual_net() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def branch(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

        def shortcut(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(x)

    return nn.Sequential(Block(), Block())


@dataclass(frozen=True)
class Surgery:
    config: type[LayerConfig]
    apply: Callable[..., int]  # (model, **settings)
    model: Callable[[], nn.Module]
    base: dict[str, Any]
    fields: tuple[str, ...]  # the config fields it takes
    names: dict[str, str]  # its argument name of a field, where it differs

    def __repr__(self) -> str:
        return f"{self.apply.__name__}->{self.config.__name__}"


SURGERIES = [
    Surgery(
        GyroDropoutConfig,
        gyrodrop.apply_gyro_dropout,
        _dropout_net,
        {"num_subnets": 8, "subnets_per_step": 2, "total_steps": 40},
        ("p", "num_subnets", "subnets_per_step", "schedule", "scale", "dims"),
        {},
    ),
    Surgery(
        BlockGyroConfig,
        gyrodrop.apply_block_gyro,
        _dropout_net,
        {"num_subnets": 8, "subnets_per_step": 2, "block_size": 4, "total_steps": 40},
        ("p", "num_subnets", "subnets_per_step", "block_size", "schedule"),
        {},
    ),
    Surgery(
        DropBlockConfig,
        gyrodrop.apply_dropblock,
        _conv_net,
        {"block_size": 3},
        ("p", "block_size", "shared_channels", "scale", "warmup_steps"),
        {},
    ),
    Surgery(
        GyroDropBlockConfig,
        lambda model, **kw: gyrodrop.apply_dropblock(model, gyro=True, **kw),
        _conv_net,
        {"block_size": 3, "num_subnets": 8, "subnets_per_step": 2, "total_steps": 40},
        ("p", "block_size", "num_subnets", "subnets_per_step", "schedule", "scale"),
        {},
    ),
    Surgery(
        StochasticDepthConfig,
        gyrodrop.apply_stochastic_depth,
        _residual_net,
        {"drop_rate": 0.2},
        ("p", "mode", "per_rank"),
        {"p": "drop_rate"},
    ),
]
SURGERY_FIELDS = [(s, name) for s in SURGERIES for name in s.fields]


@pytest.mark.parametrize(("surgery", "name"), SURGERY_FIELDS, ids=lambda v: str(v))
def test_surgery_refuses_a_bad_value_with_the_configs_message(surgery, name):
    arg = surgery.names.get(name, name)
    field_of = {v: k for k, v in surgery.names.items()}
    config_settings = {field_of.get(k, k): v for k, v in surgery.base.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _message(
            lambda: surgery.config(**{**config_settings, name: BAD[name]}, names=surgery.names)
        )
        model = surgery.model()
        got = _message(lambda: surgery.apply(model, **{**surgery.base, arg: BAD[name]}))
    assert got == expected and got.startswith(arg)


@pytest.mark.parametrize("surgery", SURGERIES, ids=repr)
def test_surgery_builds_layers_whose_config_holds_the_settings(surgery):
    model = surgery.model()
    settings = {name: OTHER[name] for name in surgery.fields if name not in ("dims",)}
    if surgery.config is BlockGyroConfig:
        settings["p"] = 0.5  # the blocks of 16 features must keep one
    args = {**surgery.base, **{surgery.names.get(k, k): v for k, v in settings.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert surgery.apply(model, **args) >= 1
    layers = [m for m in model.modules() if isinstance(getattr(m, "config", None), surgery.config)]
    assert layers
    for layer in layers:
        for name, value in settings.items():
            if name != "p" or surgery.config is not StochasticDepthConfig:  # rates grow
                assert getattr(layer.config, name) == value, name
        if "total_steps" in surgery.base:
            assert layer.total_steps == surgery.base["total_steps"]
