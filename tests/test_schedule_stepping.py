"""Who owns the step: one step per training step for every gyrodrop module of a model,
however often each is called and whether or not its forward is recomputed
(activation checkpointing), with gradient accumulation and on standalone layers."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import gyrodrop
from gyrodrop.schedule import SteppedModule, in_backward
from gyrodrop.stochastic_depth import StochasticDepthBlock

F64 = torch.float64


def steps(model: nn.Module) -> list[int]:
    return [m.current_step() for m in model.modules() if isinstance(m, SteppedModule)]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------
# Models


class Reuse(nn.Module):
    """One dropout called twice per forward (as ViT, Swin, T5 do), one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.dead = nn.Dropout(0.5)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc1(x))
        h = self.drop(self.fc2(h))
        return self.head(h)


def reuse_model() -> Reuse:
    torch.manual_seed(0)
    model = Reuse()
    gyrodrop.apply_gyro_dropout(model, num_subnets=8, subnets_per_step=2, steps_per_set=1)
    return model


class Checkpointed(nn.Module):
    """``pre -> [body] -> post`` where ``body`` runs under activation checkpointing."""

    def __init__(self, body: nn.Module, reentrant: bool | None) -> None:
        super().__init__()
        self.pre, self.body, self.post = nn.Linear(16, 16), body, nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pre(x))
        if self.reentrant is None:
            h = self.body(h)
        else:
            h = checkpoint(self.body, h, use_reentrant=self.reentrant)
        return self.post(h)


class Res(nn.Module):
    """A residual block with branch/shortcut (stochastic depth finds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


def gyro_body() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.3))


def block_body() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16))


def depth_body() -> nn.Module:
    return nn.Sequential(Res(), Res(), Res())


def rewrite(kind: str) -> Callable[[nn.Module], int]:
    def apply(model: nn.Module) -> int:
        with quiet():
            if kind == "gyro":
                return gyrodrop.apply_gyro_dropout(
                    model, num_subnets=8, subnets_per_step=2, steps_per_set=1
                )
            if kind in ("block-input", "block-output"):
                return gyrodrop.apply_block_gyro(
                    model,
                    num_subnets=8,
                    subnets_per_step=2,
                    block_size=4,
                    steps_per_set=1,
                    prune=kind.split("-")[1],
                )
            mode = kind.split("-")[1]
            return gyrodrop.apply_stochastic_depth(
                model, drop_rate=0.5, drop_distribution="uniform", mode=mode
            )

    return apply


BODIES = {
    "gyro": gyro_body,
    "block-input": block_body,
    "block-output": block_body,
    "depth-block": depth_body,
    "depth-sample": depth_body,
}


def grads_over_steps(kind: str, reentrant: bool | None, n_steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Checkpointed(BODIES[kind](), reentrant).to(F64)
    assert rewrite(kind)(model) > 0
    x = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(n_steps):
        model.zero_grad()
        model(x.clone().requires_grad_(reentrant is True)).pow(2).sum().backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert set(steps(model)) == {n_steps}
    return out


# --------------------------------------------------------------------------------------


class TestOneStepPerTrainingStep:
    def test_reused_module_steps_once_and_dead_module_steps_with_the_model(self):
        model = reuse_model()
        x = torch.randn(8, 8)
        for n in range(1, 4):
            model(x)
            assert steps(model) == [n, n]

    def test_all_calls_of_one_forward_use_the_same_masks(self):
        model = reuse_model()
        seen: list[torch.Tensor] = []
        model.drop.register_forward_hook(lambda m, a, out: seen.append(out / a[0].clamp_min(1)))
        x = torch.ones(8, 8)
        model.fc1.weight.data.fill_(0.1)
        model.fc2.weight.data.fill_(0.1)
        model(x)
        masks = [(s != 0) for s in seen]
        assert len(masks) == 2 and torch.equal(masks[0], masks[1])
        expected = model.drop.active_masks(torch.ones(8, 16), step=0) != 0
        assert torch.equal(masks[0][::4], expected)

    def test_eval_forward_and_no_grad_eval_do_not_step(self):
        model = reuse_model()
        model.eval()
        model(torch.randn(4, 8))
        assert steps(model) == [0, 0]

    def test_several_apply_calls_share_one_stepper(self):
        torch.manual_seed(0)
        model = nn.Sequential(Res(), nn.Dropout(0.2), Res(), nn.Linear(16, 16))
        with quiet():
            gyrodrop.apply_stochastic_depth(model, drop_rate=0.5)
            gyrodrop.apply_gyro_dropout(model, num_subnets=4, subnets_per_step=2, steps_per_set=1)
        assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
        for n in range(1, 3):
            model(torch.randn(4, 16))
            assert set(steps(model)) == {n}

    def test_model_in_eval_with_its_dropouts_switched_on_steps_per_forward(self):
        model = reuse_model().eval()
        model.drop.train()  # MC dropout by hand: new masks each pass
        x = torch.ones(8, 8)
        first, second = model(x), model(x)
        assert steps(model) == [2, 2] and not torch.equal(first, second)

    def test_a_failed_forward_does_not_step(self):
        model = reuse_model()
        with pytest.raises(RuntimeError):
            model(torch.randn(4, 3))  # wrong width
        assert steps(model) == [0, 0]
        model(torch.randn(4, 8))
        assert steps(model) == [1, 1]

    def test_ddp_style_wrapper_is_looked_through(self):
        class Wrapper(nn.Module):
            def __init__(self, module: nn.Module) -> None:
                super().__init__()
                self._orig_mod = module

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self._orig_mod(x)

        torch.manual_seed(0)
        inner = Reuse()
        with quiet():
            gyrodrop.apply_gyro_dropout(
                Wrapper(inner), num_subnets=8, subnets_per_step=2, steps_per_set=1
            )
        inner(torch.randn(4, 8))
        assert steps(inner) == [1, 1]

    def test_compiled_model_steps_once_per_forward(self):
        model = reuse_model()
        compiled = torch.compile(model, backend="eager")
        eager = copy.deepcopy(model)
        x = torch.randn(8, 8)
        for n in range(1, 4):
            assert torch.allclose(compiled(x), eager(x))
            assert steps(model) == [n, n] == steps(eager)

    def test_deepcopy_steps_its_own_modules(self):
        model = reuse_model()
        twin = copy.deepcopy(model)
        twin(torch.randn(4, 8))
        assert steps(twin) == [1, 1] and steps(model) == [0, 0]

    def test_submodule_called_alone_warns_and_steps_per_call(self):
        model = reuse_model()
        with pytest.warns(UserWarning, match="outside the forward of the model"):
            model.drop(torch.randn(4, 16))
        assert model.drop.current_step() == 1

    def test_trained_pairing_works_with_reused_and_dead_modules(self):
        model = reuse_model()
        x = torch.randn(8, 8)
        for _ in range(5):
            model(x)
        pred = gyrodrop.subnet_ensemble_predict(model, x, pairing="trained")
        assert pred.mean.shape == (8, 2)


class TestActivationCheckpoint:
    @pytest.mark.parametrize("kind", sorted(BODIES))
    @pytest.mark.parametrize("reentrant", [False, True])
    def test_gradients_equal_those_without_checkpointing(self, kind: str, reentrant: bool):
        plain = grads_over_steps(kind, None)
        ckpt = grads_over_steps(kind, reentrant)
        for a, b in zip(plain, ckpt, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("reentrant", [False, True])
    def test_checkpointing_the_whole_model_steps_once(self, reentrant: bool):
        torch.manual_seed(0)
        model = nn.Sequential(Res(), Res(), Res(), Res())
        with quiet():
            gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, drop_distribution="uniform")
        for n in range(1, 9):  # block mode: a dropped branch must be dropped on recompute too
            x = torch.randn(4, 16, requires_grad=True)
            checkpoint(model, x, use_reentrant=reentrant).sum().backward()
            assert set(steps(model)) == {n}

    @pytest.mark.parametrize("reentrant", [False, True])
    @pytest.mark.parametrize(
        "make",
        [
            lambda: gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1),
            lambda: gyrodrop.BlockGyroLinear(
                16, 16, p=0.5, num_subnets=8, block_size=4, steps_per_set=1, dtype=F64
            ),
            lambda: gyrodrop.StochasticDepth(0.5, "sample"),
        ],
    )
    def test_standalone_layer_replays_its_step_on_recompute(self, make, reentrant: bool):
        def run(use: bool) -> tuple[torch.Tensor, int]:
            torch.manual_seed(0)
            lin, layer = nn.Linear(16, 16).to(F64), make()
            x = torch.randn(8, 16, dtype=F64, requires_grad=True)
            for _ in range(3):
                lin.zero_grad()
                fn = lambda t: layer(lin(t)).pow(2)  # noqa: E731
                out = checkpoint(fn, x, use_reentrant=reentrant) if use else fn(x)
                out.sum().backward()
            return lin.weight.grad, layer.current_step()

        (g0, s0), (g1, s1) = run(False), run(True)
        assert s0 == s1 == 3
        assert torch.allclose(g0, g1, rtol=0, atol=1e-12)

    def test_hugging_face_gradient_checkpointing(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=2,
        )
        ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))

        def grads(gc: dict[str, bool] | None) -> torch.Tensor:
            torch.manual_seed(0)
            model = transformers.BertForSequenceClassification(cfg).to(F64)
            with quiet():
                gyrodrop.apply_gyro_dropout(
                    model, num_subnets=8, subnets_per_step=2, steps_per_set=1, dims=(-1,)
                )
            model.train()
            if gc is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc)
            for _ in range(2):
                model.zero_grad()
                model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
            assert set(steps(model)) == {2}
            return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

        plain = grads(None)
        for reentrant in (False, True):
            assert torch.allclose(grads({"use_reentrant": reentrant}), plain, rtol=0, atol=1e-12)

    def test_in_backward_is_false_outside_the_engine(self):
        assert not in_backward()
        seen = []
        x = torch.ones(2, requires_grad=True)
        x.register_hook(lambda g: seen.append(in_backward()))
        (x * 2).sum().backward()
        assert seen == [True]


class TestGradientAccumulation:
    def test_bind_to_optimizer_steps_once_per_optimizer_step(self):
        model = reuse_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gyrodrop.bind_to_optimizer(model, opt)
        outs = []
        for _ in range(3):  # three micro-batches: the same masks
            out = model(torch.ones(8, 8))
            out.sum().backward()
            outs.append(model.drop.active_masks(torch.ones(8, 16)))
        assert steps(model) == [0, 0] and all(torch.equal(outs[0], o) for o in outs)
        opt.step()
        assert steps(model) == [1, 1]

    def test_bind_again_replaces_the_binding_and_set_stepping_undoes_it(self):
        model = reuse_model()
        a = torch.optim.SGD(model.parameters(), lr=0.1)
        b = torch.optim.SGD(model.parameters(), lr=0.1)
        gyrodrop.bind_to_optimizer(model, a)
        gyrodrop.bind_to_optimizer(model, b)
        a.step()
        assert steps(model) == [0, 0]
        b.step()
        assert steps(model) == [1, 1]
        gyrodrop.set_stepping(model, "forward")
        b.step()
        model(torch.randn(2, 8))
        assert steps(model) == [2, 2]
        gyrodrop.set_stepping(model, "manual")
        model(torch.randn(2, 8))
        assert steps(model) == [2, 2]
        gyrodrop.step(model)
        assert steps(model) == [3, 3]

    def test_bound_model_survives_pickling_unbound(self):
        model = reuse_model()
        gyrodrop.bind_to_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        twin = copy.deepcopy(model)
        twin(torch.randn(2, 8))
        assert steps(twin) == [0, 0]
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        gyrodrop.set_stepping(loaded, "forward")
        loaded(torch.randn(2, 8))
        assert steps(loaded) == [1, 1]

    @pytest.mark.parametrize("bad", [None, "sgd", nn.Linear(2, 2)])
    def test_bind_to_optimizer_refuses_a_non_optimizer(self, bad):
        with pytest.raises(TypeError, match="bind_to_optimizer: optimizer must be"):
            gyrodrop.bind_to_optimizer(reuse_model(), bad)

    def test_set_stepping_validates(self):
        with pytest.raises(ValueError, match="set_stepping: when must be one of"):
            gyrodrop.set_stepping(reuse_model(), "optimizer")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="expected an nn.Module"):
            gyrodrop.set_stepping("model", "forward")  # type: ignore[arg-type]

    def test_auto_step_false_surgery_leaves_stepping_to_the_user(self):
        torch.manual_seed(0)
        model = Reuse()
        gyrodrop.apply_gyro_dropout(
            model, num_subnets=8, subnets_per_step=2, steps_per_set=1, auto_step=False
        )
        model(torch.randn(2, 8))
        assert steps(model) == [0, 0] and not model._forward_hooks


class TestStandaloneLayer:
    @given(st.integers(1, 5))
    @settings(max_examples=5, deadline=None)
    def test_standalone_layer_steps_per_training_call(self, calls: int):
        drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
        for _ in range(calls):
            drop(torch.ones(4, 4))
        assert drop.current_step() == calls

    def test_user_module_with_standalone_layers_keeps_working(self):
        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(4, 4)
                self.drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
                self.sd = gyrodrop.StochasticDepth(0.5, "sample")

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x + self.sd(self.drop(self.fc(x)))

        net = Net()
        for _ in range(3):
            net(torch.randn(4, 4))
        assert steps(net) == [3, 3]


class TestStepValidation:
    @pytest.mark.parametrize(
        ("n", "match"),
        [
            (-5, r"gyrodrop.step: n must be >= 0, got -5"),
            (1.5, r"n must be an int, got 1.5"),
            (True, r"n must be an int, got True"),
        ],
    )
    def test_step_n_is_validated(self, n, match):
        drop = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)
        with pytest.raises(ValueError, match=match):
            gyrodrop.step(drop, n)
        assert drop.current_step() == 0

    def test_step_refuses_a_non_module(self):
        with pytest.raises(TypeError, match="gyrodrop.step: model must be an nn.Module"):
            gyrodrop.step([gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)])  # type: ignore[arg-type]

    def test_step_zero_is_allowed_and_changes_nothing(self):
        drop = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)
        gyrodrop.step(drop, 0)
        assert drop.current_step() == 0


def test_stochastic_depth_block_is_a_model_member():
    torch.manual_seed(0)
    model = nn.Sequential(Res(), Res())
    with quiet():
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5)
    assert all(isinstance(m, StochasticDepthBlock) for m in model)
    model(torch.randn(2, 16))
    assert steps(model) == [1, 1]


# --------------------------------------------------------------------------------------
# A module registered under two names (``self.b = self.a``) is one module: it advances
# once per training step, whoever steps it.

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "GyroDropout": lambda: gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1),
    "BlockGyroLinear": lambda: gyrodrop.BlockGyroLinear(
        8, 8, p=0.5, num_subnets=8, subnets_per_step=2, block_size=2, steps_per_set=1
    ),
    "DropBlock2d": lambda: gyrodrop.DropBlock2d(0.3, 3),
    "GyroDropBlock2d": lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 8, 2, steps_per_set=1),
    "StochasticDepth": lambda: gyrodrop.StochasticDepth(0.5, "sample"),
}


class TwoNames(nn.Module):
    """One layer registered as ``a`` and ``b`` (and once more inside a child), called
    through one name or through all of them."""

    def __init__(self, layer: nn.Module, calls: str) -> None:
        super().__init__()
        self.a = layer
        self.b = self.a
        self.inner = nn.Sequential(self.a)
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        return self.a(x) if self.calls == "one" else self.inner(self.b(self.a(x)))


def two_names(kind: str, calls: str) -> tuple[TwoNames, torch.Tensor]:
    layer = LAYERS[kind]()
    model = TwoNames(layer, calls)
    gyrodrop.schedule.attach_stepper(model)
    shape = (4, 2, 6, 6) if "Block2d" in kind else (4, 8)
    return model, torch.ones(shape)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("calls", ["one", "all"])
class TestAModuleUnderTwoNames:
    def test_one_training_forward_advances_it_once(self, kind: str, calls: str) -> None:
        model, x = two_names(kind, calls)
        for expected in (1, 2, 3):
            model.train()(x)
            assert model.a.current_step() == expected

    def test_one_bound_optimizer_step_advances_it_once(self, kind: str, calls: str) -> None:
        model, x = two_names(kind, calls)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gyrodrop.bind_to_optimizer(model, opt)
        for expected in (1, 2):
            for _ in range(3):  # accumulated micro-batches
                model.train()(x).sum().backward()
            assert model.a.current_step() == expected - 1
            opt.step()
            assert model.a.current_step() == expected

    def test_one_gyrodrop_step_advances_it_once(self, kind: str, calls: str) -> None:
        model, x = two_names(kind, calls)
        gyrodrop.set_stepping(model, "manual")
        model.train()(x)
        gyrodrop.step(model)
        assert model.a.current_step() == 1
        gyrodrop.step(model, 3)
        assert model.a.current_step() == 4


@pytest.mark.parametrize("calls", ["one", "all"])
def test_surgery_on_a_model_with_a_shared_dropout_steps_it_once(calls: str) -> None:
    model = TwoNames(nn.Dropout(0.5), calls)
    gyrodrop.apply_gyro_dropout(model, num_subnets=8, subnets_per_step=2, steps_per_set=1)
    assert model.a is model.b is model.inner[0]  # replaced in every parent
    for expected in (1, 2):
        model.train()(torch.ones(4, 8))
        assert model.a.current_step() == expected


class TestStepArgumentsTooLargeForTheCounter:
    """A step or advance beyond the int64 counter is refused naming the argument (it
    raised torch's bare OverflowError)."""

    @pytest.mark.parametrize(
        ("call", "name"),
        [
            (lambda m: gyrodrop.step(m, 10**30), "gyrodrop.step: n"),
            (lambda m: m[0].advance(10**30), "GyroDropout.advance: n"),
            (lambda m: m[0].set_step(10**30), "GyroDropout.set_step: value"),
            (lambda m: m[0].active_subnets(step=10**30), "GyroDropout.active_subnets: step"),
        ],
    )
    def test_refused_in_one_line_naming_the_argument(self, call, name) -> None:
        model = torch.nn.Sequential(
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, auto_step=False)
        )
        with pytest.raises(
            ValueError,
            match=rf"^{name} must be <= 2\*\*62 \(the step counter is int64\), got {10**30}",
        ):
            call(model)
        assert model[0].current_step() == 0
