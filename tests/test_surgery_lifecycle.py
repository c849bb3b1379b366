"""A rewritten model's life cycle: built on ``meta`` and materialized (deferred
initialization), undone, exported.

- Surgery on a model built on the ``meta`` device, then ``to_empty()`` and
  ``reset_parameters()``: every gyrodrop buffer holds what a CPU build holds.
- Undoing surgery (``remove_gyro_dropout``, ``remove_stochastic_depth``) gives back the
  model as it was: the same hooks (the model-level stepper's go once nothing is
  stepped), so it scripts, traces and compiles as before.
- A model that still holds gyrodrop layers refuses to be scripted, traced or exported
  in training mode, saying what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.surgery import remove_stochastic_depth


class Block(nn.Module):
    """A residual block gyrodrop finds through its ``branch`` / ``shortcut`` methods."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.3),
        nn.Linear(32, 3),
    )  # fmt: skip


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.2), nn.Conv3d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def residual() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Dropout(0.2), nn.Linear(16, 3))


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
    return nn.Sequential(
        nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )


KW = {"total_steps": 100, "num_subnets": 8, "subnets_per_step": 2}
Surgery = Callable[[nn.Module], object]


def gyro(m: nn.Module) -> object:
    return gyrodrop.apply_gyro_dropout(m, **KW)


def block_gyro(m: nn.Module) -> object:
    return gyrodrop.apply_block_gyro(m, block_size=8, **KW)


def dropblock(m: nn.Module) -> object:
    return gyrodrop.apply_dropblock(m, block_size=3)


def gyro_dropblock(m: nn.Module) -> object:
    return gyrodrop.apply_dropblock(m, block_size=3, gyro=True, **KW)


def depth(m: nn.Module) -> object:
    return gyrodrop.apply_stochastic_depth(m, drop_rate=0.3)


undo_gyro, undo_depth = gyrodrop.remove_gyro_dropout, remove_stochastic_depth

#: (name, model, input shape, surgeries in order, undos in order)
CASES = [
    ("gyro", mlp, (4, 8), [gyro], [undo_gyro]),
    ("block_gyro", mlp, (4, 8), [block_gyro], [undo_gyro]),
    ("dropblock", conv, (2, 3, 8, 8), [dropblock], [undo_gyro]),
    ("gyro_dropblock", conv, (2, 3, 8, 8), [gyro_dropblock], [undo_gyro]),
    ("dropblock3d", conv3d, (2, 2, 4, 4, 4), [dropblock], [undo_gyro]),
    ("gyro_dropblock3d", conv3d, (2, 2, 4, 4, 4), [gyro_dropblock], [undo_gyro]),
    ("stochastic_depth", residual, (4, 8), [depth], [undo_depth]),
    ("transformer_layers", transformer, (2, 5, 8), [depth], [undo_depth]),
    ("gyro_and_depth", residual, (4, 8), [depth, gyro], [undo_gyro, undo_depth]),
    ("depth_and_gyro", residual, (4, 8), [gyro, depth], [undo_depth, undo_gyro]),
]


def hooks(model: nn.Module) -> dict[str, dict[str, dict[int, object]]]:
    """Every hook registry of every module of ``model``, by module name (copies)."""
    names = [
        "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
        "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    ]  # fmt: skip
    return {
        module_name: {name: dict(getattr(module, name)) for name in names}
        for module_name, module in model.named_modules()
    }


def rewritten(case, *, user_hook: bool = True, train_steps: int = 2) -> tuple[nn.Module, dict]:
    _, make, shape, surgeries, _ = case
    torch.manual_seed(0)
    model = make()
    if user_hook:  # the user's own hooks must survive surgery and undo
        model.register_forward_pre_hook(lambda _m, _a: None)
        model.register_forward_hook(lambda _m, _a, out: out)
    before = hooks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for surgery in surgeries:
            surgery(model)
    x = torch.randn(shape)
    for _ in range(train_steps):
        model.train()(x)
    return model, before


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
class TestUndoLeavesTheModelsHooks:
    def test_undo_leaves_exactly_the_hooks_the_model_had_before_surgery(self, case):
        """(The right value of shared/cases/round3/case_remove_leaves_hooks.py.)"""
        model, before = rewritten(case)
        for undo in case[4]:
            assert undo(model) > 0
        assert hooks(model) == before
        assert "_gyrodrop_stepper" not in model.__dict__
        assert not any(isinstance(m, gyrodrop.stepping.SteppedModule) for m in model.modules())

    def test_the_plain_model_scripts_and_compiles_whole_again(self, case):
        model, _ = rewritten(case, user_hook=False)
        for undo in case[4]:
            undo(model)
        x = torch.randn(case[2])
        expected = model.eval()(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected)


TWO_SURGERIES = [c for c in CASES if len(c[4]) == 2]


@pytest.mark.parametrize("case", TWO_SURGERIES, ids=[c[0] for c in TWO_SURGERIES])
def test_a_partial_undo_keeps_the_stepper_for_the_layers_left(case):
    model, before = rewritten(case)
    case[4][0](model)
    left = [m for m in model.modules() if isinstance(m, gyrodrop.stepping.SteppedModule)]
    assert left and hooks(model) != before
    steps = [m.current_step() for m in left]
    model.train()(torch.randn(case[2]))
    assert [m.current_step() for m in left] == [s + 1 for s in steps]  # one per forward
    case[4][1](model)
    assert hooks(model) == before


class TestUndoAfterOtherStepping:
    def test_undo_removes_the_optimizer_binding(self):
        model = mlp()
        gyrodrop.apply_gyro_dropout(model, **KW)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gyrodrop.bind_to_optimizer(model, opt)
        gyrodrop.remove_gyro_dropout(model)
        assert not opt._optimizer_step_post_hooks  # noqa: SLF001 - no hook left behind
        model(torch.randn(4, 8)).sum().backward()
        opt.step()

    @pytest.mark.parametrize("when", ["manual", "forward"])
    def test_undo_after_set_stepping_leaves_no_hook(self, when):
        model = mlp()
        before = hooks(model)
        gyrodrop.apply_gyro_dropout(model, **KW)
        gyrodrop.set_stepping(model, when)
        gyrodrop.remove_gyro_dropout(model)
        assert hooks(model) == before

    def test_undo_on_a_deep_copy_leaves_the_original_stepping(self):
        import copy

        model = mlp()
        before = hooks(model)
        gyrodrop.apply_gyro_dropout(model, **KW)
        twin = copy.deepcopy(model)
        gyrodrop.remove_gyro_dropout(twin)
        assert hooks(twin) == before
        model.train()(torch.randn(4, 8))
        assert model[2].current_step() == 1

    def test_undo_through_a_ddp_or_compile_wrapper(self):
        model = mlp()
        before = hooks(model)
        gyrodrop.apply_gyro_dropout(model, **KW)
        gyrodrop.remove_gyro_dropout(torch.compile(model, backend="eager"))
        assert hooks(model) == before

    def test_applying_again_after_undo_steps_once_per_forward(self):
        model = mlp()
        gyrodrop.apply_gyro_dropout(model, **KW)
        gyrodrop.remove_gyro_dropout(model)
        gyrodrop.apply_gyro_dropout(model, **KW)
        model.train()(torch.randn(4, 8))
        assert model[2].current_step() == model[4].current_step() == 1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
class TestExportOfAModelThatStillHoldsGyrodropLayers:
    def test_scripting_is_refused_with_what_to_do(self, case):
        model, _ = rewritten(case, train_steps=0)
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile gyrodrop"):
            torch.jit.script(model)
        with pytest.raises(RuntimeError, match=r"Hint: undo the surgery") as e:
            torch.jit.script(model.eval())  # TorchScript cannot run the layers at all
        assert "remove_gyro_dropout(model)" in str(e.value)

    def test_tracing_in_training_mode_is_refused_with_what_to_do(self, case):
        model, _ = rewritten(case, train_steps=0)
        with pytest.raises(RuntimeError, match=r"torch\.jit\.trace in training mode") as e:
            torch.jit.trace(model.train(), torch.randn(case[2]))
        assert "model.eval()" in str(e.value) and "remove_gyro_dropout" in str(e.value)

    def test_export_in_training_mode_is_refused_with_what_to_do(self, case):
        model, _ = rewritten(case, train_steps=0)
        with pytest.raises(RuntimeError, match=r"torch\.export in training mode") as e:
            torch.export.export(model.train(), (torch.randn(case[2]),))
        assert "model.eval()" in str(e.value) and "remove_gyro_dropout" in str(e.value)

    def test_tracing_and_export_in_eval_mode_give_the_eval_outputs(self, case):
        model, _ = rewritten(case, train_steps=1)
        x = torch.randn(case[2])
        expected = model.eval()(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning of torch's own layers
            traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("reset", [True, False])
def test_surgery_built_on_meta_holds_the_buffers_of_a_cpu_build(case, reset):
    """(The right value of shared/cases/round3/case_meta_init.py, on every surgery.)"""
    _, make, shape, surgeries, _ = case

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for surgery in surgeries:
                surgery(model)
        return model

    cpu = build()
    with torch.device("meta"):
        deferred = build()
    deferred.to_empty(device="cpu")
    if reset:
        for module in deferred.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    buffers = dict(deferred.named_buffers())
    want = {
        k: v
        for k, v in cpu.named_buffers()
        if k.split(".")[-1] in ("step", "seed", "schedule_seed")
    }
    assert want and all(torch.equal(buffers[k], v) for k, v in want.items())
    # the same weights: then the same training outputs, step after step
    deferred.load_state_dict(cpu.state_dict())
    x = torch.randn(shape)
    for _ in range(3):
        torch.manual_seed(1)  # torch's own dropouts (in the transformer) alike
        a = cpu.train()(x)
        torch.manual_seed(1)
        assert torch.equal(a, deferred.train()(x))


@pytest.mark.parametrize("case", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_prediction_passes_leave_the_hooks_as_they_were(case):
    model, _ = rewritten(case, train_steps=1)
    during = hooks(model)
    x = torch.randn(case[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gyrodrop.mc_predict(model, x, samples=3)
        if not case[0].startswith("dropblock"):  # no subnetworks to average
            gyrodrop.subnet_ensemble_predict(model, x)
    assert hooks(model) == during
