"""The contract every stepped gyrodrop module keeps, checked once over all of them.

Each layer's own file tests what is particular to it (its masks, its rates, its
shapes); this file runs the same checks over every module that follows a step counter
(:class:`gyrodrop.stepping.SteppedModule`):

- a saved ``state_dict`` resumes the exact same outputs (bitwise);
- ``torch.compile`` computes what eager mode computes, at the same step;
- autocast (bfloat16 on the CPU) and float64 inputs keep working, in the input's dtype
  (or autocast's);
- shapes-only (meta) inputs give meta outputs of the right shape and consume no step;
- integer inputs and bad seeds are refused with an error naming the layer;
- eval mode is the identity of the layer's deterministic part and never steps;

and the gyro layers (:class:`gyrodrop.scheduled.SubnetLayer`) give one subnetwork's
mask the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gyrodrop
from gyrodrop.scheduled import ScheduledModule, SubnetLayer
from gyrodrop.stepping import SteppedModule


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., nn.Module]  # keyword arguments: seed, auto_step
    shape: tuple[int, ...]  # a training input

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case(
        "GyroDropout",
        lambda **kw: gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, **kw),
        (8, 12),
    ),
    Case(
        "BlockGyroLinear",
        lambda **kw: gyrodrop.BlockGyroLinear(
            12,
            12,
            p=0.5,
            num_subnets=8,
            subnets_per_step=2,
            block_size=3,
            steps_per_set=1,
            backend="torch",
            **kw,
        ),
        (8, 12),
    ),
    Case(
        "BlockGyroLinear(prune=output)",
        lambda **kw: gyrodrop.BlockGyroLinear(
            12,
            12,
            p=0.5,
            num_subnets=8,
            subnets_per_step=2,
            block_size=3,
            steps_per_set=1,
            prune="output",
            backend="torch",
            **kw,
        ),
        (8, 12),
    ),
    Case(
        "StochasticDepth(sample)",
        lambda **kw: gyrodrop.StochasticDepth(0.5, "sample", **kw),
        (8, 5),
    ),
    Case(
        "StochasticDepth(block)", lambda **kw: gyrodrop.StochasticDepth(0.5, "block", **kw), (8, 5)
    ),
    Case("DropBlock2d", lambda **kw: gyrodrop.DropBlock2d(0.3, 3, **kw), (4, 2, 8, 8)),
    Case(
        "GyroDropBlock2d",
        lambda **kw: gyrodrop.GyroDropBlock2d(0.3, 3, 8, 2, steps_per_set=1, **kw),
        (4, 2, 8, 8),
    ),
    Case("DropBlock3d", lambda **kw: gyrodrop.DropBlock3d(0.3, 3, **kw), (4, 2, 4, 6, 6)),
    Case(
        "GyroDropBlock3d",
        lambda **kw: gyrodrop.GyroDropBlock3d(0.3, 3, 8, 2, steps_per_set=1, **kw),
        (4, 2, 4, 6, 6),
    ),
]

GYRO_LAYERS = [c for c in CASES if isinstance(c.make(), ScheduledModule)]


def _input(case: Case, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(case.shape, generator=g).to(dtype)


def _steps(module: nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    outs = []
    for _ in range(n):
        with torch.no_grad():
            outs.append(module(x))
    return outs


@pytest.mark.parametrize("case", CASES, ids=repr)
class TestSteppedModuleContract:
    def test_is_a_stepped_module_with_step_and_seed_buffers(self, case: Case) -> None:
        module = case.make(seed=3)
        assert isinstance(module, SteppedModule)
        names = dict(module.named_buffers())
        assert int(names["step"]) == 0 and int(names["seed"]) == 3

    def test_training_call_advances_one_step_and_eval_none(self, case: Case) -> None:
        module = case.make(seed=1)
        _steps(module.train(), _input(case), 2)
        assert module.current_step() == 2
        _steps(module.eval(), _input(case), 2)
        assert module.current_step() == 2

    def test_state_dict_resumes_bitwise(self, case: Case) -> None:
        x = _input(case)
        a = case.make(seed=5).train()
        _steps(a, x, 3)
        b = case.make(seed=0).train()
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        for out_a, out_b in zip(_steps(a, x, 3), _steps(b, x, 3), strict=True):
            assert torch.equal(out_a, out_b)

    def test_deepcopy_and_pickle_continue_the_same_masks(self, case: Case) -> None:
        x = _input(case)
        a = case.make(seed=7).train()
        _steps(a, x, 2)
        b = copy.deepcopy(a)
        assert all(torch.equal(p, q) for p, q in zip(_steps(a, x, 2), _steps(b, x, 2), strict=True))

    def test_compiled_forward_equals_eager_at_the_same_step(self, case: Case) -> None:
        x = _input(case)
        eager = case.make(seed=2).train()
        compiled_module = copy.deepcopy(eager)
        compiled = torch.compile(compiled_module, backend="eager", fullgraph=False)
        for _ in range(2):
            with torch.no_grad():
                assert torch.equal(eager(x), compiled(x))
        assert compiled_module.current_step() == eager.current_step() == 2

    def test_autocast_bfloat16_runs_and_steps(self, case: Case) -> None:
        module = case.make(seed=4).train()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = module(_input(case))
        assert out.dtype in (torch.float32, torch.bfloat16)
        assert bool(torch.isfinite(out.float()).all())
        assert module.current_step() == 1

    def test_float64_input_gives_float64_output(self, case: Case) -> None:
        module = case.make(seed=4).double().train()
        with torch.no_grad():
            assert module(_input(case, torch.float64)).dtype == torch.float64

    def test_meta_input_gives_meta_output_and_takes_no_step(self, case: Case) -> None:
        with torch.device("meta"):
            module = case.make(seed=0).train()
        out = module(torch.empty(case.shape, device="meta"))
        assert out.is_meta and out.shape[0] == case.shape[0]

    def test_integer_input_is_refused_naming_the_layer(self, case: Case) -> None:
        module = case.make(seed=0).train()
        owner = type(module).__name__
        with pytest.raises(TypeError, match=owner):
            module(torch.ones(case.shape, dtype=torch.int64))

    @pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
    def test_bad_seed_is_refused_naming_the_layer(self, case: Case, seed: object) -> None:
        owner = type(case.make()).__name__
        with pytest.raises(ValueError, match=f"{owner}: seed must be"):
            case.make(seed=seed)

    def test_auto_step_must_be_a_bool(self, case: Case) -> None:
        owner = type(case.make()).__name__
        with pytest.raises(ValueError, match=f"{owner}: auto_step must be a bool"):
            case.make(auto_step=1)

    def test_manual_stepping_leaves_the_step_to_gyrodrop_step(self, case: Case) -> None:
        module = case.make(seed=0, auto_step=False).train()
        _steps(module, _input(case), 2)
        assert module.current_step() == 0
        gyrodrop.step(module, 3)
        assert module.current_step() == 3

    def test_model_stepper_advances_once_per_forward_however_often_it_is_called(
        self, case: Case
    ) -> None:
        layer = case.make(seed=0)

        class Twice(nn.Module):  # one layer called twice per forward (weight sharing)
            def __init__(self) -> None:
                super().__init__()
                self.layer = layer

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.layer(self.layer(x))

        model = Twice()
        gyrodrop.schedule.attach_stepper(model)
        with torch.no_grad():
            model.train()(_input(case))
        assert layer.current_step() == 1

    def test_checkpoint_recompute_replays_the_forward_step(self, case: Case) -> None:
        layer = case.make(seed=0).train()
        reference = copy.deepcopy(layer)
        x = _input(case).requires_grad_(True)
        out = checkpoint(layer, x, use_reentrant=False)
        expected = reference(x)
        out.sum().backward()  # recomputes the forward during the backward
        assert layer.current_step() == 1
        assert torch.equal(out, expected)

    def test_set_step_writes_the_buffer_in_place(self, case: Case) -> None:
        module = case.make(seed=0)
        buffer = module.step
        module.set_step(9)
        assert module.step is buffer and module.current_step() == 9
        with pytest.raises(ValueError, match="set_step: value must be >= 0"):
            module.set_step(-1)


@pytest.mark.parametrize("case", GYRO_LAYERS, ids=repr)
class TestSubnetLayerContract:
    def test_is_a_subnet_layer(self, case: Case) -> None:
        assert isinstance(case.make(), SubnetLayer)

    def test_subnet_mask_takes_like_dtype_and_broadcasts_over_one_row(self, case: Case) -> None:
        module = case.make(seed=1)
        like = _input(case, torch.float64)
        if module.mask_side == "output":
            like = torch.zeros(case.shape[0], module.out_features, dtype=torch.float64)
        mask = module.subnet_mask(3, like)
        assert mask.dtype == torch.float64
        assert torch.broadcast_shapes(mask.shape, like.shape[1:]) == like.shape[1:]

    def test_subnet_mask_refuses_k_out_of_range(self, case: Case) -> None:
        module = case.make()
        with pytest.raises(ValueError, match="k must be in"):
            module.subnet_mask(module.num_subnets, _input(case))

    def test_active_set_cache_follows_the_seed(self, case: Case) -> None:
        x = _input(case)
        module = case.make(seed=1).train()
        with torch.no_grad():
            first = module(x)
            module.seed.fill_(2)
            module.set_step(0)
            second = module(x)
        assert not torch.equal(first, second)

    def test_group_counts_split_the_batch_in_subnets_per_step_groups(self, case: Case) -> None:
        module = case.make()
        assert module.group_counts(8) == [4, 4]
        assert module.group_counts(1) == [1, 0]


def _empty_shapes(case: Case) -> list[tuple[int, ...]]:
    """The case's input shape with one dimension at a time set to 0 (not the feature
    dimension of a Linear, which must equal ``in_features``)."""
    dims = len(case.shape) - 1 if case.name.startswith("BlockGyroLinear") else len(case.shape)
    return [case.shape[:d] + (0,) + case.shape[d + 1 :] for d in range(dims)]


@pytest.mark.parametrize("case", CASES, ids=repr)
class TestEdgesOfInputAndState:
    def test_an_empty_input_gives_the_empty_output_like_eval_and_steps(self, case: Case) -> None:
        # nn.Dropout / nn.Dropout2d return an empty tensor for an empty input (no
        # error, e.g. a (B, C, 0, W) feature map); a training call still is one step.
        for shape in _empty_shapes(case):
            module = case.make(seed=1).train()
            x = torch.zeros(shape, requires_grad=True)
            out = module(x)
            out.sum().backward()
            assert out.shape == module.eval()(x).shape and out.numel() == 0, shape
            assert module.current_step() == 1, shape

    @pytest.mark.parametrize("name", ["step", "seed"])
    @pytest.mark.parametrize("value", [-3, 2.5])
    def test_a_checkpoint_with_a_negative_or_fractional_counter_is_refused(
        self, case: Case, name: str, value: float
    ) -> None:
        saved = case.make(seed=4).state_dict()
        saved[name] = torch.tensor(value)
        module = case.make(seed=4)
        with pytest.raises(RuntimeError, match=rf"the checkpoint's {name} must be an int >= 0"):
            module.load_state_dict(saved)
        assert module.current_step() == 0 and module.current_seed() == 4  # not loaded

    def test_a_refused_counter_is_named_with_its_module_in_a_model(self, case: Case) -> None:
        model = nn.Sequential(nn.Identity(), case.make(seed=4))
        saved = model.state_dict()
        saved["1.step"] = torch.tensor(-1)
        with pytest.raises(RuntimeError, match=r"'1': the checkpoint's step must be an int >= 0"):
            model.load_state_dict(saved, strict=False)


@pytest.mark.parametrize("case", GYRO_LAYERS, ids=repr)
@pytest.mark.parametrize("step", [1.5, -1, True, "2"])
def test_methods_taking_a_step_refuse_what_is_not_a_step(case: Case, step: object) -> None:
    module = case.make()
    owner = type(module).__name__
    calls = {"active_subnets": lambda: module.active_subnets(step)}
    if hasattr(module, "active_masks"):
        calls["active_masks"] = lambda: module.active_masks(_input(case), step=step)
    if hasattr(module, "block_masks"):
        calls["block_masks"] = lambda: module.block_masks(step)
        calls["group_masks"] = lambda: module.group_masks(step)
    for method, call in calls.items():
        with pytest.raises(ValueError, match=rf"{owner}\.{method}: step must be"):
            call()


@pytest.mark.parametrize("case", CASES, ids=repr)
class TestExportOfALayer:
    """A layer used on its own: scripting is refused (TorchScript cannot run it), tracing
    and ``torch.export`` in training mode are refused (the graph would freeze one
    step's masks), each saying what to do; in eval mode both record the eval output."""

    def test_script_trace_and_export_in_training_mode_say_what_to_do(self, case: Case) -> None:
        module = case.make(seed=0).train()
        x = _input(case)
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile") as e:
            torch.jit.script(module)
        assert "remove_gyro_dropout" in str(e.value)
        for record, name in [
            (lambda: torch.jit.trace(module, x, check_trace=False), "torch.jit.trace"),
            (lambda: torch.export.export(module, (x,)), "torch.export"),
        ]:
            with pytest.raises(RuntimeError, match=rf"{name} in training mode") as e:
                record()
            assert "model.eval()" in str(e.value) and "remove_gyro_dropout" in str(e.value)
        assert module.current_step() == 0  # nothing recorded, nothing stepped

    def test_trace_and_export_in_eval_mode_record_the_eval_output(self, case: Case) -> None:
        module = case.make(seed=0).eval()
        x = _input(case)
        expected = module(x)
        traced = torch.jit.trace(module, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), expected)


@pytest.mark.parametrize("case", CASES, ids=repr)
class TestEarlyAndLateDropout:
    """``drop_mode`` (Liu et al., ICML 2023): "early" drops like the standard layer
    before the cutoff step and is the layer's eval computation after it; "late" is the
    reverse. The step advances through both phases and the draws are those of the
    standard layer at the same steps."""

    def _outputs(self, module: nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        return _steps(module.train(), x, n)

    def _make(self, case: Case, **kw: object) -> nn.Module:
        torch.manual_seed(0)  # the same weights for layers that have some
        return case.make(**kw)

    @pytest.mark.parametrize("mode", ["early", "late"])
    def test_drops_on_its_side_of_the_cutoff_and_is_eval_on_the_other(
        self, case: Case, mode: str
    ) -> None:
        x = _input(case)
        standard = self._outputs(self._make(case, seed=3), x, 4)
        module = self._make(case, seed=3, drop_mode=mode, cutoff_step=2)
        timed = self._outputs(module, x, 4)
        with torch.no_grad():
            plain = module.eval()(x)
        dropping = [s < 2 for s in range(4)] if mode == "early" else [s >= 2 for s in range(4)]
        for step, (out, ref, drops) in enumerate(zip(timed, standard, dropping, strict=True)):
            assert torch.equal(out, ref if drops else plain), (mode, step)
        assert module.current_step() == 4

    @pytest.mark.parametrize("mode", ["early", "late"])
    def test_compiled_forward_follows_the_mode_as_eager_does(self, case: Case, mode: str) -> None:
        x = _input(case)
        eager = self._make(case, seed=2, drop_mode=mode, cutoff_step=2).train()
        compiled_module = copy.deepcopy(eager)
        compiled = torch.compile(compiled_module, backend="eager", fullgraph=False)
        for step in range(4):
            with torch.no_grad():
                assert torch.equal(eager(x), compiled(x)), step
        assert compiled_module.current_step() == eager.current_step() == 4

    def test_the_cutoff_is_a_fraction_of_total_steps(self, case: Case) -> None:
        module = case.make(seed=0, drop_mode="early", drop_cutoff=0.25, cutoff_step=2)
        assert module.cutoff_step == 2 and module.drop_cutoff == 0.25
        assert "drop_mode=early" in repr(module) and "cutoff_step=2" in repr(module)
        assert "drop_mode" not in repr(case.make(seed=0))  # the standard mode says nothing

    def test_the_mode_and_cutoff_resume_from_a_checkpoint(self, case: Case) -> None:
        x = _input(case)
        a = self._make(case, seed=5, drop_mode="late", cutoff_step=2)
        _steps(a.train(), x, 1)
        b = self._make(case, seed=5, drop_mode="late", cutoff_step=2)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        for out_a, out_b in zip(_steps(a, x, 3), _steps(b.train(), x, 3), strict=True):
            assert torch.equal(out_a, out_b)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"drop_mode": "middle"}, r"drop_mode must be one of \('standard', 'early', 'late'\)"),
            ({"drop_mode": "early"}, r"drop_mode='early' needs drop_cutoff"),
            ({"drop_mode": "early", "drop_cutoff": 1.0}, r"drop_cutoff must be in \(0, 1\)"),
            ({"drop_mode": "early", "drop_cutoff": 0}, r"drop_cutoff must be in \(0, 1\)"),
            ({"drop_mode": "late", "cutoff_step": 0}, r"cutoff_step must be >= 1"),
            ({"drop_cutoff": 0.5}, r"drop_cutoff applies to drop_mode='early' or 'late'"),
            ({"drop_mode": "early", "drop_cutoff": 0.5}, r"drop_cutoff=0.5 is a fraction of"),
        ],
    )
    def test_bad_timing_is_refused_in_one_line_naming_the_layer(
        self, case: Case, kwargs: dict[str, object], message: str
    ) -> None:
        owner = type(case.make()).__name__
        with pytest.raises(ValueError, match=f"{owner}: .*{message}") as err:
            case.make(**kwargs)
        assert "\n" not in str(err.value)


def _counters(module: nn.Module) -> dict[str, int]:
    return {k: int(v) for k, v in module.named_buffers() if k.split(".")[-1] in _COUNTERS}


_COUNTERS = ("step", "seed", "schedule_seed")


@pytest.mark.parametrize("case", CASES, ids=repr)
class TestDeferredInitialization:
    """A layer built on ``meta`` and materialized with ``to_empty()`` (and
    ``reset_parameters()``, as FSDP and large-model code do) holds what a CPU
    construction holds, and draws the same masks."""

    @pytest.mark.parametrize("reset", [True, False])
    def test_to_empty_gives_the_buffers_and_masks_of_a_cpu_construction(
        self, case: Case, reset: bool
    ) -> None:
        cpu = case.make(seed=5)
        with torch.device("meta"):
            deferred = case.make(seed=5)
        deferred.to_empty(device="cpu")
        if reset:
            deferred.reset_parameters()
        assert _counters(deferred) == _counters(cpu) and _counters(cpu)
        deferred.load_state_dict(  # the same weights; the counters must not need loading
            {k: v for k, v in cpu.state_dict().items() if k.split(".")[-1] not in _COUNTERS},
            strict=False,
        )
        x = _input(case)
        for out_cpu, out_deferred in zip(_steps(cpu, x, 3), _steps(deferred, x, 3), strict=True):
            assert torch.equal(out_cpu, out_deferred)

    def test_reset_parameters_puts_back_step_zero_and_the_seeds_in_place(self, case: Case) -> None:
        module = case.make(seed=6).train()
        _steps(module, _input(case), 2)
        before = dict(module.named_buffers())
        module.seed.fill_(99)
        module.reset_parameters()
        assert _counters(module) == _counters(case.make(seed=6))
        assert all(v is before[k] for k, v in module.named_buffers())  # written in place


def test_block_gyro_linear_built_with_device_meta_materializes_its_counters() -> None:
    # BlockGyroLinear(device="meta") puts its counters on meta too, so to_empty() gives
    # them their construction values (not leftover memory) with or without reset
    cpu = gyrodrop.BlockGyroLinear(16, 8, p=0.5, block_size=4, steps_per_set=1, seed=3)
    meta = gyrodrop.BlockGyroLinear(
        16, 8, p=0.5, block_size=4, steps_per_set=1, seed=3, device="meta"
    )
    assert all(b.is_meta for b in meta.buffers())
    meta.to_empty(device="cpu")
    assert _counters(meta) == _counters(cpu)
    linear = gyrodrop.BlockGyroLinear.from_linear(
        nn.Linear(16, 8), p=0.5, block_size=4, steps_per_set=1, seed=3
    )
    assert _counters(linear) == {"step": 0, "seed": 3, "schedule_seed": 3}
