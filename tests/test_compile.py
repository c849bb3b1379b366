"""The compiled training path: every gyrodrop layer under ``torch.compile(fullgraph=True)``
computes what eager mode computes, step by step across changes of the active set, with
the step as a tensor in one graph (no graph break, no recompile per step)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import gyrodrop
from gyrodrop.schedule import SteppedModule
from gyrodrop.stepping import attach_stepper
from gyrodrop.stochastic_depth import StochasticDepthLayer


class Residual(nn.Module):
    """A pre-norm residual MLP layer (rows independent)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(self.norm(x)).tanh()


def _every_layer() -> nn.Module:
    """Conv -> DropBlock2d -> GyroDropBlock2d -> BlockGyroLinear (input) -> GyroDropout
    -> BlockGyroLinear (output) -> StochasticDepth (sample, warm-up) -> two residual
    layers with sample-mode stochastic depth (fixed kept rows) -> head."""
    kw = {"num_subnets": 8, "steps_per_set": 2}
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        gyrodrop.DropBlock2d(0.3, 3, seed=2),
        gyrodrop.GyroDropBlock2d(0.2, 3, subnets_per_step=3, seed=5, **kw),
        nn.Flatten(),
        gyrodrop.BlockGyroLinear(3 * 7 * 7, 24, p=0.5, block_size=8, subnets_per_step=3, **kw),
        gyrodrop.GyroDropout(0.5, subnets_per_step=2, seed=3, **kw),
        gyrodrop.BlockGyroLinear(24, 20, p=0.5, block_size=8, prune="output", seed=4, **kw),
        gyrodrop.StochasticDepth(0.4, "sample", seed=6, warmup_steps=5),
        Residual(20),
        Residual(20),
        nn.Linear(20, 3),
    )
    gyrodrop.apply_stochastic_depth(net, 0.5, "uniform", "sample", target=Residual, seed=7)
    for m in net.modules():
        if isinstance(m, StochasticDepthLayer):
            m.stochastic_depth.kept_rows = "fixed"
    attach_stepper(net)
    return net


def _steps(net: nn.Module) -> list[int]:
    return [int(m.step) for m in net.modules() if isinstance(m, SteppedModule)]


def _train_and_compare(
    make: Callable[[], nn.Module], inputs: list[Tensor], backend: str = "aot_eager"
) -> tuple[nn.Module, nn.Module]:
    """Run ``inputs`` through an eager model and its compiled twin; assert equal outputs
    and gradients (input and parameters) at every step."""
    torch.manual_seed(0)
    eager = make()
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(twin, backend=backend, fullgraph=True)
    for x in inputs:
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
        ge = torch.autograd.grad(ye.square().sum(), [xe, *eager.parameters()])
        gc = torch.autograd.grad(yc.square().sum(), [xc, *twin.parameters()])
        for a, b in zip(gc, ge, strict=True):
            # the compiled BlockGyroLinear derives its backward (the same pruned GEMMs
            # summed in another order): float rounding, compounded over the layers
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return eager, twin


def test_every_layer_compiles_fullgraph_equal_to_eager_in_one_graph() -> None:
    inputs = [torch.randn(6, 2, 7, 7) for _ in range(12)]  # 12 steps, 6 set changes
    eager, twin = _train_and_compare(_every_layer, inputs)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 2
    assert _steps(twin) == _steps(eager) == [12] * len(_steps(eager))


def test_compiled_steps_resume_into_eager_and_back() -> None:
    """A checkpoint of the compiled model resumes the eager sequence exactly."""

    def make() -> nn.Module:
        kw = {"num_subnets": 8, "steps_per_set": 2}
        net = nn.Sequential(
            gyrodrop.BlockGyroLinear(16, 16, p=0.5, block_size=4, subnets_per_step=2, **kw),
            gyrodrop.GyroDropout(0.5, subnets_per_step=2, seed=3, **kw),
        )
        attach_stepper(net)
        return net

    inputs = [torch.randn(5, 16) for _ in range(8)]
    eager, twin = _train_and_compare(make, inputs[:4])
    resumed = make()
    resumed.load_state_dict(twin.state_dict())
    for x in inputs[4:]:
        torch.testing.assert_close(resumed(x), eager(x), atol=1e-6, rtol=1e-6)
    assert _steps(resumed) == _steps(eager)


def test_checkpoint_recompute_inside_the_compiled_model_replays_the_step() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=2)
            self.fc2 = nn.Linear(16, 2)

        def inner(self, x: Tensor) -> Tensor:
            return self.drop(self.fc1(x)).relu()

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(checkpoint(self.inner, x, use_reentrant=False))

    def make() -> nn.Module:
        net = Net()
        attach_stepper(net)
        return net

    eager, twin = _train_and_compare(make, [torch.randn(6, 8) for _ in range(6)])
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 2  # the root's pre-hook, the forward
    assert int(twin.drop.step) == int(eager.drop.step) == 6


def test_layer_stepping_on_its_own_calls_advances_inside_the_graph() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), gyrodrop.GyroDropout(0.5, 4, 2, steps_per_set=1))

    eager, twin = _train_and_compare(make, [torch.randn(4, 4) for _ in range(5)])
    assert counters["stats"]["unique_graphs"] == 1
    assert int(twin[1].step) == int(eager[1].step) == 5


def test_block_mode_stochastic_depth_compiles_with_a_graph_break_per_layer() -> None:
    """Block mode decides on the host and skips a dropped layer: a graph break (stated
    in the README), the same outputs as eager."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Residual(8), Residual(8), nn.Linear(8, 2))
    gyrodrop.apply_stochastic_depth(net, 0.5, "uniform", "block", target=Residual, seed=3)
    eager = copy.deepcopy(net)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    for _ in range(6):
        x = torch.randn(5, 8)
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="disable"):
        torch._dynamo.reset()
        torch.compile(copy.deepcopy(eager), backend="eager", fullgraph=True)(x)


# --------------------------------------------------------------------------------------
# Sample mode computes the branch on the kept rows only.


def _skip_and_multiply(
    kept_rows: str, make: Callable[[], nn.Module]
) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    skip = StochasticDepthLayer(make(), 0.5, "sample", seed=3)
    skip.stochastic_depth.kept_rows = kept_rows
    multiply = copy.deepcopy(skip)
    multiply._skippable = lambda *args: False  # type: ignore[method-assign]
    return skip, multiply


@pytest.mark.parametrize("kept_rows", ["random", "fixed"])
def test_skip_equals_the_multiply_form_on_kept_and_dropped_rows(kept_rows: str) -> None:
    skip, multiply = _skip_and_multiply(kept_rows, lambda: Residual(8))
    calls = []
    skip.layer.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    for step in range(6):
        x = torch.randn(10, 3, 8)
        xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, ym = skip(xs), multiply(xm)
        torch.testing.assert_close(ys, ym, atol=1e-6, rtol=1e-6)
        keep = (ym - x).flatten(1).abs().amax(1) > 0
        assert torch.equal(ys[~keep], x[~keep])  # dropped rows: the shortcut, exactly
        gs = torch.autograd.grad(ys.square().sum(), [xs, *skip.parameters()])
        gm = torch.autograd.grad(ym.square().sum(), [xm, *multiply.parameters()])
        for a, b in zip(gs, gm, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        if step and kept_rows == "fixed":
            assert calls[-1] == 5  # a fixed count: 10 - round(0.5 * 10)
    assert calls[0] == 10  # the first call learns the output structure on every row
    assert max(calls[1:]) < 10


def test_fixed_kept_rows_scale_by_the_exact_count() -> None:
    sd = gyrodrop.StochasticDepth(0.3, "sample", seed=1, kept_rows="fixed")
    for _ in range(5):
        y = sd(torch.ones(10, 2))
        kept = int((y[:, 0] != 0).sum())
        assert kept == 10 - 3
        assert torch.allclose(y[y != 0], torch.tensor(10 / 7))


def test_branch_with_batchnorm_keeps_the_multiply_form_and_says_so_once() -> None:
    class BNBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def branch(self, x: Tensor) -> Tensor:
            return self.bn(self.fc(x))

        def shortcut(self, x: Tensor) -> Tensor:
            return x

        def forward(self, x: Tensor) -> Tensor:
            return x + self.branch(x)

    net = nn.Sequential(BNBlock())
    gyrodrop.apply_stochastic_depth(net, 0.5, mode="sample")
    calls = []
    net[0].block.fc.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            net(torch.randn(8, 4))
    said = [w for w in caught if "no saving" in str(w.message)]
    assert len(said) == 1 and "BatchNorm1d 'bn'" in str(said[0].message)
    assert set(calls) == {8}  # every row, every step (and the one-time check)


def test_early_and_late_dropout_switch_inside_the_graph() -> None:
    """drop_mode's cutoff is a comparison with the step tensor: one graph, eager's
    outputs on both sides of the cutoff."""

    def make() -> nn.Module:
        kw = {"num_subnets": 8, "subnets_per_step": 2, "steps_per_set": 1}
        net = nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1),
            gyrodrop.DropBlock2d(0.3, 3, drop_mode="late", cutoff_step=2),
            gyrodrop.GyroDropBlock2d(0.3, 3, drop_mode="early", cutoff_step=3, **kw),
            nn.Flatten(),
            gyrodrop.BlockGyroLinear(
                2 * 25, 16, p=0.5, block_size=5, drop_mode="early", cutoff_step=2, **kw
            ),
            gyrodrop.GyroDropout(0.5, drop_mode="late", cutoff_step=3, **kw),
            gyrodrop.StochasticDepth(0.5, "sample", drop_mode="early", cutoff_step=2),
        )
        attach_stepper(net)
        return net

    _train_and_compare(make, [torch.randn(4, 2, 5, 5) for _ in range(5)])
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
