"""Study plans: a grid of single runs (dataset x model x training-set size x method x
seed) under one recipe and one budget rule, read from TOML or JSON or built in.

A plan file (``plans/data-ladder.toml`` in the repository is the reference)::

    name = "data-ladder"
    dataset = "fashion-mnist"
    seeds = 10  # seeds 0..9; every method of a seed is paired
    val_size = 5000  # validation split held out of the training split
    methods = ["none", "dropout", "gyro", "gyro-independent", "blockwise"]

    [budget]  # exactly one of steps / epochs
    steps = 2000  # optimizer steps per run, whatever the size
    evaluations = 20  # evaluations per run (steps / evaluations per "epoch")

    [recipe]  # RunConfig fields shared by every run
    optimizer = "rmsprop"
    lr = 0.001
    lr_schedule = "cosine"
    batch_size = 128

    [[cells]]  # one or more: a model at some sizes
    model = "mlp2"
    sizes = [1000, 2000, 5000, 10000]

A cell may also set ``methods``, ``seeds``, a ``recipe`` table (overrides), lists
``num_subnets`` / ``subnets_per_step`` (a sigma x tau grid for the gyro family),
``diversity = {subnetworks = 10, eval_size = 1000}`` (Figure 5's analysis after
training) and a ``label``. Runs are ordered seed-major: every run of seed 0 (all cells,
sizes and methods), then seed 1, ...; so a study cut short has complete pairs for its
first seeds. Every run is an ordinary :class:`~gyrodrop.experiments.train.RunConfig`
of experiment ``"study"``: plans that share a run share its result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gyrodrop.experiments.data import DATASETS
from gyrodrop.experiments.models import MODELS
from gyrodrop.experiments.train import METHODS, RunConfig

__all__ = [
    "BUILTIN",
    "Cell",
    "Plan",
    "PlanError",
    "PLANS_DIR",
    "load_plan",
    "parse_plan",
    "expand",
    "check_sizes",
]

#: Where the built-in plans live (``<package>/plans``).
PLANS_DIR = Path(__file__).resolve().parent / "plans"
#: Built-in plan names -> file.
BUILTIN: dict[str, Path] = {
    "data-ladder": PLANS_DIR / "data-ladder.toml",
    "overfit-ablations": PLANS_DIR / "overfit-ablations.toml",
    "full-data": PLANS_DIR / "full-data.toml",
    "tiny": PLANS_DIR / "tiny.toml",
}
#: RunConfig fields a plan's ``recipe`` may set.
RECIPE_FIELDS: tuple[str, ...] = (
    "optimizer",
    "lr",
    "momentum",
    "batch_size",
    "lr_schedule",
    "max_norm",
    "p",
    "input_p",
    "num_subnets",
    "subnets_per_step",
    "block_size",
    "widths",
    "width_mult",
    "mc_samples",
    "ens_subnets",
)
_GRID = ("gyro", "gyro-random", "gyro-independent", "blockwise")
_TOP = {"name", "description", "dataset", "seeds", "val_size", "split_seed", "methods"}
_TOP |= {"budget", "recipe", "cells"}
_CELL = {"model", "sizes", "methods", "seeds", "recipe", "num_subnets", "subnets_per_step"}
_CELL |= {"diversity", "label"}


class PlanError(ValueError):
    """A plan that cannot run (the message names the field and what is allowed)."""


@dataclass(frozen=True)
class Cell:
    """A model at some training-set sizes, with its methods and variants."""

    model: str
    sizes: tuple[int, ...]
    methods: tuple[str, ...]
    seeds: int
    recipe: dict[str, Any] = field(default_factory=dict)
    num_subnets: tuple[int, ...] | None = None
    subnets_per_step: tuple[int, ...] | None = None
    diversity: dict[str, int] | None = None
    label: str = ""


@dataclass(frozen=True)
class Plan:
    """A parsed, checked plan (see the module docstring for the fields)."""

    name: str
    dataset: str
    seeds: int
    val_size: int
    budget: dict[str, int]
    recipe: dict[str, Any]
    cells: tuple[Cell, ...]
    split_seed: int = 0
    description: str = ""
    source: str = ""

    def summary(self) -> str:
        """A few lines describing the plan (``--dry-run``)."""
        b = self.budget
        rule = (
            f"{b['steps']} optimizer steps per run whatever the size, "
            f"{b['evaluations']} evaluations"
            if "steps" in b
            else f"{b['epochs']} epochs per run"
        )
        recipe = ", ".join(f"{k}={v}" for k, v in sorted(self.recipe.items()))
        lines = [
            f"plan {self.name} ({self.source}): {self.description}".rstrip(": "),
            f"  dataset {self.dataset}; validation {self.val_size} examples held out of the "
            f"training split (split_seed {self.split_seed}); test: the whole test split",
            f"  budget: {rule}",
            f"  recipe: {recipe}",
        ]
        for c in self.cells:
            extra = f" [{c.label}]" if c.label else ""
            grid = ""
            if c.num_subnets or c.subnets_per_step:
                grid = f", sigma {list(c.num_subnets or ())} tau {list(c.subnets_per_step or ())}"
            if c.recipe:
                grid += ", " + ", ".join(f"{k}={v}" for k, v in sorted(c.recipe.items()))
            lines.append(
                f"  {c.model}{extra}: sizes {list(c.sizes)}, methods {', '.join(c.methods)}, "
                f"{c.seeds} seeds{grid}"
            )
        return "\n".join(lines)


def _fail(where: str, what: str) -> PlanError:
    return PlanError(f"{where}: {what}")


def _posint(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, f"must be a positive integer, got {value!r}")
    return value


def _int_list(where: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(where, f"must be a non-empty list of positive integers, got {value!r}")
    return _no_repeats(where, tuple(_posint(where, v) for v in value))


def _no_repeats(where: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuses a list that names one value twice: a repeated size or method would be
    run once, so the plan would not mean what it says."""
    twice = sorted({v for v in values if values.count(v) > 1}, key=str)
    if twice:
        raise _fail(where, f"lists {', '.join(map(repr, twice))} more than once")
    return values


def _methods(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"must be a non-empty list of methods, got {value!r}")
    for m in value:
        if m not in METHODS:
            raise _fail(where, f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    return _no_repeats(where, tuple(value))


def _unknown(where: str, d: dict[str, Any], allowed: set[str] | tuple[str, ...]) -> None:
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise _fail(
            where, f"unknown field(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}"
        )


def _recipe(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be a table of RunConfig fields, got {value!r}")
    _unknown(where, value, RECIPE_FIELDS)
    return dict(value)


def parse_plan(data: dict[str, Any], source: str = "") -> Plan:
    """A :class:`Plan` from a parsed TOML/JSON document; :class:`PlanError` (one line,
    naming the field) for anything it cannot run: an unknown field, method, model or
    dataset, no seeds, a size or budget that is not a positive integer, an empty grid."""
    where = f"plan {source}" if source else "plan"
    if not isinstance(data, dict):
        raise _fail(where, "must be a table (TOML) or an object (JSON)")
    _unknown(where, data, _TOP)
    name = data.get("name") or Path(source).stem or "study"
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or not (dataset in DATASETS or dataset.startswith("csv:")):
        raise _fail(
            f"{where}: dataset",
            f"must be one of {', '.join(DATASETS)} or csv:PATH, got {dataset!r}",
        )
    seeds = _posint(f"{where}: seeds", data.get("seeds"))
    val_size = _posint(f"{where}: val_size", data.get("val_size"))
    split_seed = data.get("split_seed", 0)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise _fail(f"{where}: split_seed", f"must be an integer >= 0, got {split_seed!r}")
    budget = data.get("budget")
    if not isinstance(budget, dict):
        raise _fail(f"{where}: budget", "must be a table with steps (and evaluations) or epochs")
    _unknown(f"{where}: budget", budget, ("steps", "evaluations", "epochs"))
    if ("steps" in budget) == ("epochs" in budget):
        raise _fail(f"{where}: budget", f"needs exactly one of steps, epochs; got {sorted(budget)}")
    checked = {k: _posint(f"{where}: budget.{k}", v) for k, v in budget.items()}
    if "steps" in checked:
        checked.setdefault("evaluations", 1)
        if checked["steps"] % checked["evaluations"]:
            raise _fail(
                f"{where}: budget",
                f"steps ({checked['steps']}) must be a multiple of evaluations "
                f"({checked['evaluations']})",
            )
    elif "evaluations" in checked:
        raise _fail(
            f"{where}: budget",
            "evaluations goes with steps (an epochs budget evaluates every epoch)",
        )
    recipe = _recipe(f"{where}: recipe", data.get("recipe", {}))
    methods = _methods(f"{where}: methods", data.get("methods", ["none", "dropout", "gyro"]))
    raw_cells = data.get("cells")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise _fail(f"{where}: cells", "must be a non-empty list of tables (model, sizes)")
    cells = []
    for i, c in enumerate(raw_cells):
        cw = f"{where}: cells[{i}]"
        if not isinstance(c, dict):
            raise _fail(cw, f"must be a table, got {c!r}")
        _unknown(cw, c, _CELL)
        model = c.get("model")
        if model not in MODELS:
            raise _fail(f"{cw}.model", f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
        div = c.get("diversity")
        if div is not None:
            if not isinstance(div, dict):
                raise _fail(f"{cw}.diversity", "must be a table {subnetworks, eval_size}")
            _unknown(f"{cw}.diversity", div, ("subnetworks", "eval_size"))
            div = {k: _posint(f"{cw}.diversity.{k}", v) for k, v in div.items()}
            div.setdefault("subnetworks", 10)
            div.setdefault("eval_size", 1000)
        cells.append(
            Cell(
                model=model,
                sizes=_int_list(f"{cw}.sizes", c.get("sizes")),
                methods=_methods(f"{cw}.methods", c.get("methods", list(methods))),
                seeds=_posint(f"{cw}.seeds", c.get("seeds", seeds)),
                recipe=_recipe(f"{cw}.recipe", c.get("recipe", {})),
                num_subnets=_int_list(f"{cw}.num_subnets", c["num_subnets"])
                if "num_subnets" in c
                else None,
                subnets_per_step=(
                    _int_list(f"{cw}.subnets_per_step", c["subnets_per_step"])
                    if "subnets_per_step" in c
                    else None
                ),
                diversity=div,
                label=str(c.get("label", "")),
            )
        )
    plan = Plan(
        name=str(name),
        dataset=dataset,
        seeds=seeds,
        val_size=val_size,
        budget=checked,
        recipe=recipe,
        cells=tuple(cells),
        split_seed=split_seed,
        description=str(data.get("description", "")),
        source=source,
    )
    configs = expand(plan)  # every run's configuration must be valid
    if not configs:
        raise _fail(where, "selects no run (every sigma x tau cell has tau > sigma?)")
    return plan


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # pragma: no cover - Python 3.10 without the experiments extra
        raise PlanError(
            'TOML plans need Python 3.11+ or tomli (pip install "gyrodrop[experiments]"); '
            "or write the plan as JSON"
        ) from None
    return tomli


def load_plan(spec: str) -> Plan:
    """A built-in plan's name (:data:`BUILTIN`) or the path of a ``.toml`` / ``.json``
    plan file; :class:`PlanError` when it is neither or does not parse."""
    path = BUILTIN.get(spec) or Path(spec)
    if not path.is_file():
        raise PlanError(
            f"plan {spec!r}: not a built-in plan ({', '.join(BUILTIN)}) nor a plan file"
        )
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else _toml().loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PlanError(f"plan {spec}: cannot parse it: {' '.join(str(e).split())}") from None
    return parse_plan(data, source=spec if spec not in BUILTIN else f"built-in {spec}")


def expand(plan: Plan, seeds: int | None = None) -> list[RunConfig]:
    """Every run of ``plan`` (normalized), seed-major: all of seed 0 (cells, sizes,
    methods and variants in plan order), then seed 1, ...; ``seeds`` keeps only the
    first ``seeds`` seeds. Duplicates (the same run twice) are kept once.

    Raises:
        PlanError: a run's configuration is invalid (e.g. p out of range).
    """
    b = plan.budget
    top = max(c.seeds for c in plan.cells) if seeds is None else seeds
    out: dict[str, RunConfig] = {}
    for seed in range(top):
        for ci, cell in enumerate(plan.cells):
            if seed >= cell.seeds:
                continue
            recipe = {**plan.recipe, **cell.recipe}
            for size, method in itertools.product(cell.sizes, cell.methods):
                grid: list[tuple[int | None, int | None]] = [(None, None)]
                if method in _GRID and (cell.num_subnets or cell.subnets_per_step):
                    sigmas = cell.num_subnets or (int(recipe.get("num_subnets", 256)),)
                    taus = cell.subnets_per_step or (int(recipe.get("subnets_per_step", 16)),)
                    grid = [(s, t) for s, t in itertools.product(sigmas, taus) if t <= s]
                for sigma, tau in grid:
                    kw = dict(recipe)
                    if sigma is not None:
                        kw.update(num_subnets=sigma, subnets_per_step=tau)
                    if cell.diversity:
                        kw.update(cell.diversity)
                    if "widths" in kw and kw["widths"] is not None:
                        kw["widths"] = tuple(kw["widths"])
                    try:
                        cfg = RunConfig(
                            experiment="study",
                            dataset=plan.dataset,
                            model=cell.model,
                            method=method,
                            seed=seed,
                            epochs=b.get("evaluations", b.get("epochs", 1)),
                            steps_per_epoch=b["steps"] // b["evaluations"]
                            if "steps" in b
                            else None,
                            train_size=size,
                            val_size=plan.val_size,
                            split_seed=plan.split_seed,
                            **kw,
                        ).normalized()
                    except (TypeError, ValueError) as e:
                        raise PlanError(
                            f"plan {plan.name}: cells[{ci}] {method}: "
                            + _name_recipe_field(str(e), plan.recipe, cell.recipe, ci)
                        ) from None
                    out.setdefault(cfg.key(), cfg)
    return list(out.values())


def _name_recipe_field(
    message: str, recipe: dict[str, Any], cell_recipe: dict[str, Any], ci: int
) -> str:
    """``"RunConfig: p must be ..."`` as ``"recipe.p must be ..."`` (or
    ``cells[i].recipe.p``): the plan's own name of the value that was refused."""
    m = re.match(r"RunConfig: (\w+)", message)
    if m is None:
        return message
    field = m.group(1)
    if field in cell_recipe:
        where = f"cells[{ci}].recipe.{field}"
    elif field in recipe:
        where = f"recipe.{field}"
    else:
        return message
    return where + message[m.end() :]


def check_sizes(plan: Plan, n_train_split: int) -> None:
    """Refuses a size that does not fit: ``size + val_size`` must be at most the
    training split's ``n_train_split`` examples (and ``val_size`` must leave some)."""
    if plan.val_size >= n_train_split:
        raise PlanError(
            f"plan {plan.name}: val_size: {plan.val_size} validation examples leave no "
            f"training example of the {n_train_split} in the {plan.dataset} training split; "
            f"val_size must be at most {n_train_split - 1}"
        )
    for i, c in enumerate(plan.cells):
        for s in c.sizes:
            if s + plan.val_size > n_train_split:
                raise PlanError(
                    f"plan {plan.name}: cells[{i}].sizes: {s} training examples + val_size "
                    f"{plan.val_size} is more than the {n_train_split} examples of the "
                    f"{plan.dataset} training split; the largest size allowed is "
                    f"{n_train_split - plan.val_size}"
                )


def with_seeds(plan: Plan, seeds: int) -> Plan:
    """``plan`` with every cell cut to at most ``seeds`` seeds (``--seeds``)."""
    cells = tuple(dataclasses.replace(c, seeds=min(c.seeds, seeds)) for c in plan.cells)
    return dataclasses.replace(plan, seeds=min(plan.seeds, seeds), cells=cells)
