"""Study plans: built-in plans parse, runs are ordered seed-major and paired, bad plans
are refused in one line naming the field, and the data-ladder's run keys stay fixed."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from gyrodrop.experiments.study.plan import (
    BUILTIN,
    PlanError,
    check_sizes,
    expand,
    load_plan,
    parse_plan,
    with_seeds,
)

GOOD: dict[str, Any] = {
    "name": "t",
    "dataset": "digits",
    "seeds": 3,
    "val_size": 50,
    "methods": ["none", "dropout", "gyro"],
    "budget": {"steps": 20, "evaluations": 4},
    "recipe": {"batch_size": 16, "num_subnets": 8, "subnets_per_step": 2},
    "cells": [{"model": "mlp", "sizes": [40, 80]}],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = d
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[last] = value
    return d


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_plans_parse_and_expand(name: str) -> None:
    plan = load_plan(name)
    assert plan.name == name
    assert expand(plan)


def test_data_ladder_has_the_issue_grid() -> None:
    plan = load_plan("data-ladder")
    runs = expand(plan)
    mlp = {(r.train_size, r.method) for r in runs if r.model == "mlp2"}
    assert {s for s, _ in mlp} == {1000, 2000, 5000, 10000}
    assert {m for _, m in mlp} == {"none", "dropout", "gyro", "gyro-independent", "blockwise"}
    assert len({r.train_size for r in runs if r.model == "lenet"}) >= 2
    assert {r.seed for r in runs} == set(range(10))
    assert len(runs) == (4 + 2) * 5 * 10


def test_data_ladder_run_keys_are_pinned() -> None:
    """The long study resumes by key: a change here would retrain every run."""
    runs = expand(load_plan("data-ladder"))
    assert runs[0].key() == "820ca8c7b026bc98"
    assert (runs[0].model, runs[0].train_size, runs[0].method, runs[0].seed) == (
        "mlp2",
        1000,
        "none",
        0,
    )


def test_full_data_is_the_data_ladder_recipe_on_every_training_image() -> None:
    """full-data is data-ladder's top rung: the same runs but for the size, so the two
    reports compare like with like."""
    top = expand(load_plan("full-data"))
    ladder = {r.key(): r for r in expand(load_plan("data-ladder")) if r.model == "mlp2"}
    assert {r.train_size for r in top} == {60000 - 5000} and len(top) == 5 * 3
    for r in top:
        assert dataclasses.replace(r, train_size=1000).key() in ladder


def test_runs_are_seed_major_with_every_method_of_a_cell_together() -> None:
    runs = expand(parse_plan(GOOD))
    seeds = [r.seed for r in runs]
    assert seeds == sorted(seeds)
    first = [(r.train_size, r.method) for r in runs if r.seed == 0]
    assert first == [(s, m) for s in (40, 80) for m in ("none", "dropout", "gyro")]


def test_methods_of_one_seed_share_everything_but_the_method() -> None:
    runs = [r for r in expand(parse_plan(GOOD)) if r.seed == 1 and r.train_size == 40]
    shared = {(r.train_size, r.val_size, r.split_seed, r.seed, r.epochs, r.lr) for r in runs}
    assert len(shared) == 1


def test_seeds_option_keeps_a_prefix_of_the_same_runs() -> None:
    plan = parse_plan(GOOD)
    full = [r.key() for r in expand(plan)]
    two = [r.key() for r in expand(with_seeds(plan, 2))]
    assert two == full[: len(two)] and len(two) == 2 * 2 * 3


def test_sigma_grid_and_shared_runs_are_kept_once() -> None:
    d = copy.deepcopy(GOOD)
    d["cells"].append(
        {"model": "mlp", "sizes": [40], "methods": ["gyro"], "num_subnets": [2, 8, 16]}
    )
    runs = expand(parse_plan(d))
    gyro40 = sorted(
        r.num_subnets for r in runs if r.seed == 0 and r.method == "gyro" and r.train_size == 40
    )
    assert gyro40 == [2, 8, 16]  # sigma 8 (the recipe's) is shared with the first cell


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("methods", ["none", "dropconnect"], "unknown method 'dropconnect'"),
        ("cells.0.model", "vgg", "unknown model 'vgg'"),
        ("seeds", 0, "seeds: must be a positive integer, got 0"),
        ("budget", {"steps": 0, "evaluations": 1}, "budget.steps: must be a positive integer"),
        ("budget", {"steps": 2.5}, "budget.steps: must be a positive integer, got 2.5"),
        ("budget", {"steps": 10, "evaluations": 3}, "must be a multiple of evaluations"),
        ("budget", {"epochs": 5, "steps": 10}, "needs exactly one of steps, epochs"),
        ("cells.0.sizes", [0], "sizes: must be a positive integer"),
        ("cells", [], "cells: must be a non-empty list"),
        ("recipe", {"lr": 0.1, "learning_rate": 1}, "unknown field(s) learning_rate"),
        ("recipe", {"p": 1.5}, "recipe.p must be in [0, 1), got 1.5"),
        ("cells.0.recipe", {"lr": -1.0}, "cells[0].recipe.lr must be > 0"),
        ("methods", ["none", "gyro", "none"], "methods: lists 'none' more than once"),
        ("cells.0.sizes", [40, 80, 40], "sizes: lists 40 more than once"),
        ("cells.0.methods", ["gyro", "gyro"], "cells[0].methods: lists 'gyro' more than once"),
        ("dataset", "imagenet", "dataset: must be one of"),
    ],
)
def test_bad_plans_are_refused_naming_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(_with(path, value), source="p.toml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_size_above_the_data_is_refused_with_the_largest_allowed() -> None:
    plan = parse_plan(_with("cells.0.sizes", [40, 5000]))
    with pytest.raises(PlanError, match="largest size allowed is 1300"):
        check_sizes(plan, 1350)


def test_a_validation_split_as_large_as_the_data_is_blamed_on_val_size() -> None:
    plan = parse_plan(_with("val_size", 1350))
    with pytest.raises(PlanError, match="val_size: 1350 validation examples leave no"):
        check_sizes(plan, 1350)


def test_unknown_plan_and_bad_file(tmp_path: Any) -> None:
    with pytest.raises(PlanError, match="not a built-in plan"):
        load_plan("no-such-plan")
    bad = tmp_path / "b.toml"
    bad.write_text("seeds = [")
    with pytest.raises(PlanError, match="cannot parse it"):
        load_plan(str(bad))
