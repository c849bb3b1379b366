"""Tests for gyrodrop.experiments.train: configuration keys, seeding, methods."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.experiments.data import Dataset
from gyrodrop.experiments.train import RunConfig, make_model, train_run


def _data(n: int = 96, features: int = 10, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=g) * 2
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, features, generator=g)
    return Dataset(
        "toy", x[: n // 2 * 1], y[: n // 2], x[n // 2 :], y[n // 2 :], classes, ("a", "b", "c")
    )


def _cfg(method: str = "gyro", **kw: object) -> RunConfig:
    base = {
        "experiment": "compare",
        "dataset": "toy",
        "model": "mlp",
        "method": method,
        "seed": 0,
        "epochs": 2,
        "batch_size": 16,
        "num_subnets": 8,
        "subnets_per_step": 2,
        "widths": (16, 16),
    }
    return RunConfig(**(base | kw))  # type: ignore[arg-type]


class TestRunConfig:
    def test_fields_irrelevant_to_the_method_do_not_change_the_key(self) -> None:
        assert _cfg("none", p=0.5, num_subnets=8).key() == _cfg("none", p=0.2, num_subnets=64).key()
        assert _cfg("dropout", num_subnets=8).key() == _cfg("dropout", num_subnets=64).key()
        assert _cfg("gyro", block_size=16).key() == _cfg("gyro", block_size=64).key()

    def test_every_relevant_field_changes_the_key(self) -> None:
        base = _cfg()
        for change in (
            {"seed": 1},
            {"epochs": 3},
            {"lr": 0.1},
            {"num_subnets": 16},
            {"subnets_per_step": 4},
            {"p": 0.3},
            {"method": "gyro-random"},
        ):
            assert dataclasses.replace(base, **change).key() != base.key()

    def test_round_trips_through_a_dict(self) -> None:
        cfg = _cfg().normalized()
        assert RunConfig.from_dict(cfg.to_dict()) == cfg

    @pytest.mark.parametrize(
        ("kw", "match"),
        [
            ({"method": "magic"}, "method must be one of"),
            ({"subnets_per_step": 16}, "subnets_per_step must be in"),
            ({"p": 1.2}, r"p must be in \[0, 1\)"),
            ({"epochs": 0}, "epochs must be >= 1"),
        ],
    )
    def test_invalid_configurations_raise(self, kw: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            _cfg(**kw).normalized()


class TestMakeModel:
    def test_gyro_gets_total_steps_of_the_run(self) -> None:
        model = make_model(_cfg(epochs=3), _data(), steps_per_epoch=5)
        layers = [m for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)]
        assert len(layers) == 2 and all(m.total_steps == 15 for m in layers)
        assert all(m.schedule == "consecutive" for m in layers)

    def test_gyro_random_uses_the_random_schedule(self) -> None:
        model = make_model(_cfg("gyro-random"), _data(), steps_per_epoch=5)
        assert {m.schedule for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)} == {
            "random"
        }

    def test_none_has_no_dropout(self) -> None:
        model = make_model(_cfg("none"), _data(), steps_per_epoch=5)
        assert not any(isinstance(m, (nn.Dropout, gyrodrop.GyroDropout)) for m in model.modules())

    def test_blockwise_without_apply_block_gyro_is_a_clear_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(gyrodrop, "apply_block_gyro", raising=False)
        with pytest.raises(RuntimeError, match="apply_block_gyro"):
            make_model(_cfg("blockwise"), _data(), steps_per_epoch=5)

    def test_input_dropout_goes_after_the_flatten(self) -> None:
        model = make_model(_cfg("dropout", input_p=0.2), _data(), steps_per_epoch=5)
        assert isinstance(model.features[1], nn.Dropout) and model.features[1].p == 0.2


class TestTrainRun:
    def test_same_config_gives_identical_results_and_leaves_global_rng_alone(self) -> None:
        state = torch.random.get_rng_state()
        a = train_run(_cfg("dropout"), _data())
        assert torch.equal(torch.random.get_rng_state(), state)
        b = train_run(_cfg("dropout"), _data())
        assert a.metrics["test_acc"] == b.metrics["test_acc"]
        assert [r["train_loss"] for r in a.epochs] == [r["train_loss"] for r in b.epochs]

    def test_metrics_are_fractions_and_epochs_are_recorded(self) -> None:
        res = train_run(_cfg(epochs=3), _data())
        m = res.metrics
        assert 0 <= m["test_acc"] <= 1 and 0 <= m["train_acc"] <= 1
        assert m["gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
        assert {"test_nll", "test_ece", "test_brier", "epoch_time"} <= set(m)
        assert [r["epoch"] for r in res.epochs] == [1, 2, 3]

    def test_learns_a_separable_problem(self) -> None:
        assert train_run(_cfg(epochs=15, lr=3e-3), _data()).metrics["test_acc"] > 0.8

    def test_max_norm_bounds_every_unit(self) -> None:
        res = train_run(
            _cfg("dropout", optimizer="sgd", lr=0.5, momentum=0.9, max_norm=0.5),
            _data(),
            keep_model=True,
        )
        for m in res.model.modules():
            if isinstance(m, nn.Linear):
                assert float(m.weight.detach().norm(dim=1).max()) <= 0.5 + 1e-5

    def test_uncertainty_adds_mc_and_ensemble_metrics(self) -> None:
        m = train_run(_cfg(mc_samples=4), _data()).metrics
        assert {"mc_acc", "mc_nll", "mc_ece", "mc_brier", "reliability"} <= set(m)
        assert 0 <= m["ens_acc"] <= 1

    def test_blockwise_uncertainty_includes_the_subnetwork_ensemble(self) -> None:
        cfg = _cfg("blockwise", mc_samples=4, widths=(64, 64))
        m = train_run(cfg, _data()).metrics
        assert 0 <= m["ens_acc"] <= 1 and 0 <= m["mc_acc"] <= 1

    def test_extra_metrics_are_merged(self) -> None:
        m = train_run(_cfg(), _data(), extra=lambda model, data: {"custom": 1.0}).metrics
        assert m["custom"] == 1.0


def _images(n: int = 64, classes: int = 2, side: int = 10) -> Dataset:
    """Raw-pixel images (0..255): class 1 has a bright horizontal band (which survives
    horizontal flips and small crops)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.rand(n, 1, side, side, generator=g) * 100
    x[y == 1, :, side // 2 - 2 : side // 2 + 2, :] += 120
    h = n // 2
    return Dataset("img", x[:h], y[:h], x[h:], y[h:], classes, ("a", "b"))


def _paper(method: str = "dropout", **kw: object) -> RunConfig:
    base = {
        "model": "paper-mlp",
        "optimizer": "rmsprop-tf1",
        "lr": 0.007,
        "momentum": 0.9,
        "recipe": "paper",
        "batch_size": 8,
        "num_subnets": 8,
        "subnets_per_step": 2,
        "widths": (16, 16, 16),
        "epochs": 5,
    }
    return _cfg(method, **(base | kw))


class TestPaperRecipe:
    def test_recipe_and_width_mult_are_left_out_of_old_keys(self) -> None:
        cfg = _cfg()
        assert "recipe" not in cfg.canonical_json() and "width_mult" not in cfg.canonical_json()
        assert dataclasses.replace(cfg, recipe="paper").key() != cfg.key()

    def test_width_mult_only_for_paper_conv_nets(self) -> None:
        with pytest.raises(ValueError, match="width_mult applies to"):
            _cfg(width_mult=0.5).normalized()
        with pytest.raises(ValueError, match="recipe must be one of"):
            _cfg(recipe="fast").normalized()

    def test_learning_rate_drops_at_40_and_80_percent(self) -> None:
        res = train_run(_paper(epochs=5), _images())
        assert [r["lr"] for r in res.epochs] == pytest.approx(
            [0.007, 0.007, 0.0007, 0.0007, 0.00007]
        )

    def test_model_sees_center_crops_and_last_partial_batch_is_dropped(self) -> None:
        res = train_run(_paper(batch_size=12, epochs=1), _images(), keep_model=True)
        assert res.model is not None
        first = next(m for m in res.model.modules() if isinstance(m, nn.Linear))
        assert first.in_features == 7 * 7  # crop_size(10, 10) = 7
        assert res.metrics["steps"] == 32 // 12  # 2 full batches of 12 out of 32

    def test_too_few_examples_for_one_batch_is_a_clear_error(self) -> None:
        with pytest.raises(ValueError, match="no full batch of 64"):
            train_run(_paper(batch_size=64), _images())

    def test_records_best_epoch_and_final_accuracy(self) -> None:
        res = train_run(_paper(epochs=4), _images())
        m = res.metrics
        accs = [r["test_acc"] for r in res.epochs]
        assert m["best_test_acc"] == max(accs)
        assert accs[m["best_epoch"] - 1] == max(accs)
        assert m["test_acc"] == accs[-1] and m["recipe"] == "paper"

    def test_is_reproducible_and_methods_share_initial_weights(self) -> None:
        a = train_run(_paper("gyro-independent"), _images())
        b = train_run(_paper("gyro-independent"), _images())
        assert [r["train_loss"] for r in a.epochs] == [r["train_loss"] for r in b.epochs]
        weights = []
        for method in ("none", "gyro"):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = make_model(_paper(method), _images(), 4, in_shape=(1, 7, 7))
            weights.append(next(m for m in model.modules() if isinstance(m, nn.Linear)).weight)
        assert torch.equal(weights[0], weights[1])

    def test_learns_the_image_problem(self) -> None:
        res = train_run(_paper("none", epochs=10), _images(n=128))
        assert res.metrics["best_test_acc"] > 0.8

    def test_gyro_independent_gives_each_layer_its_own_replacement_schedule(self) -> None:
        model = make_model(_paper("gyro-independent"), _images(), 4, in_shape=(1, 7, 7))
        layers = [m for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)]
        assert len(layers) == 3
        assert {m.schedule for m in layers} == {"replacement"}
        assert {m.scale for m in layers} == {"realized"}
        assert len({int(m.schedule_seed) for m in layers}) == 3

    def test_gyro_shared_keeps_one_schedule(self) -> None:
        model = make_model(_paper("gyro"), _images(), 4, in_shape=(1, 7, 7))
        layers = [m for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)]
        assert {m.schedule for m in layers} == {"consecutive"}
        assert len({int(m.schedule_seed) for m in layers}) == 1

    def test_tf1_rmsprop_is_the_optimizer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from gyrodrop.experiments import optim

        made: list[optim.TF1RMSprop] = []
        real = optim.TF1RMSprop.__init__

        def spy(self: optim.TF1RMSprop, *a: object, **k: object) -> None:
            real(self, *a, **k)  # type: ignore[arg-type]
            made.append(self)

        monkeypatch.setattr(optim.TF1RMSprop, "__init__", spy)
        train_run(_paper(epochs=1), _images())
        assert len(made) == 1 and made[0].defaults["eps"] == 1.0

    def test_extra_sees_the_images_as_the_model_does(self) -> None:
        shapes: list[tuple[int, ...]] = []

        def extra(model: nn.Module, data: Dataset) -> dict[str, float]:
            shapes.append(tuple(data.x_test.shape[1:]))
            model(data.x_test[:2])
            return {}

        train_run(_paper(epochs=1), _images(), extra=extra)
        assert shapes == [(1, 7, 7)]


# --------------------------------------------------------------------------- study runs


def test_study_fields_leave_older_run_keys_unchanged() -> None:
    cfg = RunConfig("compare", "digits", "mlp", "gyro", seed=0, epochs=1)
    text = cfg.canonical_json()
    for name in ("train_size", "val_size", "steps_per_epoch", "lr_schedule", "ens_subnets"):
        assert name not in text


def test_a_step_budget_trains_full_batches_with_cosine_decay() -> None:
    pytest.importorskip("sklearn")
    from gyrodrop.experiments.study.subsets import load_study_dataset

    ds = load_study_dataset("digits", train_size=50, val_size=100, seed=0)
    cfg = RunConfig(
        "study",
        "digits",
        "mlp",
        "dropout",
        seed=0,
        epochs=3,
        batch_size=32,
        lr=0.01,
        steps_per_epoch=4,
        train_size=50,
        val_size=100,
        lr_schedule="cosine",
    )
    result = train_run(cfg, ds)
    assert result.metrics["steps"] == 12  # whatever the size: 3 epochs x 4 steps
    lrs = [r["lr"] for r in result.epochs]
    assert lrs[0] == 0.01 and lrs[0] > lrs[1] > lrs[2] > 0
    row = result.epochs[-1]
    assert {"val_acc", "val_loss", "test_ece", "train_eval_acc"} <= set(row)
    assert result.metrics["n_val"] == 100 and result.metrics["n_test"] == len(ds.y_test)


def test_study_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="train_size and val_size go together"):
        RunConfig("study", "digits", "mlp", "none", seed=0, epochs=1, train_size=10).normalized()
    with pytest.raises(ValueError, match="lr_schedule must be None or one of cosine"):
        RunConfig("s", "digits", "mlp", "none", seed=0, epochs=1, lr_schedule="step").normalized()
