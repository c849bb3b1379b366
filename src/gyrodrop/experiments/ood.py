"""``gyrodrop compare --uncertainty --ood-classes LIST``: how good are the uncertainties?

A run of a configuration with ``ood_classes`` (:func:`uncertainty_run`):

1. **Data** (:func:`split_ood`): the classes in ``ood_classes`` are held out of
   training; the other classes are relabelled ``0..K-1``, at most ``train_limit`` of
   their training examples are kept (a seeded subset, ``split_seed``), and the features
   are standardized again with the statistics of that training set (not under the
   paper recipe on images, which standardizes each image on its own). The test examples
   of the kept classes are the in-distribution test set, those of the held-out classes
   the out-of-distribution (OOD) set.
2. **Networks**: member 0 trains exactly as the run without ``ood_classes`` would (same
   seed: same initial weights, data order, masks); with ``ensemble_size = N > 1``,
   members ``j = 1..N-1`` train independently with seed ``10000 * j + seed``.
3. **Evaluators** (:data:`EVALUATORS`), each scored on the in-distribution test set
   and against the OOD set with :func:`gyrodrop.uncertainty_metrics`:
   the single network (eval mode, ``max_prob``), MC dropout (``--mc-samples`` passes;
   methods with dropout), the gyro subnetwork ensemble (all ``num_subnets`` members, or
   a seeded subset of ``ens_subnets``; gyro, gyro-random, blockwise) and the deep
   ensemble of the ``N`` networks in eval mode (``N > 1``), the last three by
   ``entropy`` and ``mutual_info``.

Stored per run (flat, so ``report --format json`` carries them):
``unc_{evaluator}_{score}_{metric}`` for every metric of ``uncertainty_metrics``,
``reliability_unc_{evaluator}`` (15 bins: confidence, accuracy, count) and
``rc_{evaluator}_{score}`` (the risk-coverage curve at :data:`RC_POINTS` coverages).
The report (:mod:`gyrodrop.experiments.report.uncertainty`) pairs every row with
dropout's MC dropout by the same score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import gyrodrop
from gyrodrop import Prediction
from gyrodrop.experiments import metrics as M
from gyrodrop.experiments.data import (
    Dataset,
    center_crop,
    crop_size,
    per_image_standardize,
    standardize,
)
from gyrodrop.experiments.train import RunConfig, RunResult, train_run
from gyrodrop.uncertainty.metrics import risk_coverage, uncertainty_score

__all__ = [
    "EVALUATORS",
    "METRICS",
    "RC_POINTS",
    "member_seed",
    "split_ood",
    "uncertainty_run",
]

#: ``(key, label, scores)`` of each evaluator, in table order.
EVALUATORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("single", "single network", ("max_prob",)),
    ("mc", "MC dropout", ("entropy", "mutual_info")),
    ("ens", "gyro subnetwork ensemble", ("entropy", "mutual_info")),
    ("deep", "deep ensemble", ("entropy", "mutual_info")),
)
#: The metrics of :func:`gyrodrop.uncertainty_metrics` with an OOD set, in table order.
METRICS: tuple[str, ...] = (
    "accuracy",
    "nll",
    "brier",
    "ece",
    "aurc",
    "ood_auroc",
    "ood_aupr",
    "ood_fpr95",
)
#: Points of each stored risk-coverage curve.
RC_POINTS = 50
_ENSEMBLE_METHODS = ("gyro", "gyro-random", "blockwise")  # trained fixed subnetworks
_ROWS = 1024  # test rows per prediction call


def member_seed(seed: int, j: int) -> int:
    """The seed of deep-ensemble member ``j`` of run ``seed`` (member 0 is the run)."""
    return seed if j == 0 else 10_000 * j + seed


def split_ood(
    data: Dataset,
    ood_classes: tuple[int, ...],
    train_limit: int | None,
    split_seed: int,
    *,
    restandardize: bool = True,
) -> tuple[Dataset, Tensor]:
    """The in-distribution :class:`Dataset` (classes relabelled, at most ``train_limit``
    training examples, with ``restandardize`` standardized again on them) and the OOD
    test inputs.

    Raises:
        ValueError: a class out of range, every class held out, or no test example of
            the held-out classes (an empty OOD set).
    """
    k = data.num_classes
    bad = [c for c in ood_classes if not 0 <= c < k]
    if bad:
        raise ValueError(
            f"--ood-classes must be class indices in [0, {k}) of {data.name}, got {bad}"
        )
    keep = [c for c in range(k) if c not in ood_classes]
    if len(keep) < 2:
        raise ValueError(
            f"--ood-classes leaves {len(keep)} of the {k} classes of {data.name} to train "
            "on; hold out fewer (at least 2 must remain)"
        )
    remap = torch.full((k,), -1, dtype=torch.int64)
    remap[keep] = torch.arange(len(keep))
    tr = remap[data.y_train] >= 0
    te = remap[data.y_test] >= 0
    x_train, y_train = data.x_train[tr], remap[data.y_train[tr]]
    if train_limit is not None and train_limit < len(y_train):
        gen = torch.Generator().manual_seed(split_seed)
        idx = torch.randperm(len(y_train), generator=gen)[:train_limit].sort().values
        x_train, y_train = x_train[idx], y_train[idx]
    x_test, y_test, x_ood = data.x_test[te], remap[data.y_test[te]], data.x_test[~te]
    if len(x_ood) == 0:
        raise ValueError(
            f"--ood-classes {','.join(map(str, ood_classes))}: the test set of {data.name} "
            "has no example of these classes, so the OOD set is empty; raise --limit or "
            "choose other classes"
        )
    if len(x_test) == 0:
        raise ValueError(f"--ood-classes: no in-distribution test example is left in {data.name}")
    if restandardize:
        x_train, rest = standardize(x_train.numpy(), torch.cat([x_test, x_ood]).numpy())
        x_test, x_ood = rest[: len(x_test)], rest[len(x_test) :]
    ind = Dataset(
        name=data.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(keep),
        classes=tuple(data.classes[c] for c in keep),
    )
    return ind, x_ood


def _as_seen(cfg: RunConfig, x: Tensor) -> Tensor:
    """Test inputs as the model sees them (the paper recipe's center crop of images,
    each standardized on its own; see :class:`~gyrodrop.experiments.train.train_run`)."""
    if cfg.recipe != "paper" or x.dim() != 4:
        return x
    return per_image_standardize(center_crop(x, crop_size(x.shape[2], x.shape[3])))


def _concat(preds: list[Prediction]) -> Prediction:
    mean, variance, entropy, mutual = (torch.cat(parts) for parts in zip(*preds, strict=True))
    return Prediction(mean, variance, entropy, mutual)


def _chunked(fn: Callable[[Tensor], Prediction], x: Tensor) -> Prediction:
    return _concat([fn(x[i : i + _ROWS]) for i in range(0, len(x), _ROWS)])


@torch.no_grad()
def _eval_probs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat(
        [torch.softmax(model(x[i : i + _ROWS]).double(), 1) for i in range(0, len(x), _ROWS)]
    )


def _predictions(cfg: RunConfig, models: list[nn.Module], x: Tensor) -> dict[str, Prediction]:
    """Each applicable evaluator's prediction on ``x``."""
    first = models[0]
    probs = [_eval_probs(m, x) for m in models]
    out = {"single": Prediction.from_passes(probs[0][None])}
    if cfg.method != "none":
        samples = int(cfg.mc_samples or 30)
        out["mc"] = _chunked(lambda xb: gyrodrop.mc_predict(first, xb, samples=samples), x)
    if cfg.method in _ENSEMBLE_METHODS:
        members = cfg.ens_subnets
        if members is not None and cfg.num_subnets is not None:
            members = min(members, cfg.num_subnets)  # a seeded subset (None: all)
        out["ens"] = _chunked(
            lambda xb: gyrodrop.subnet_ensemble_predict(first, xb, subnets=members), x
        )
    if len(models) > 1:
        out["deep"] = Prediction.from_passes(torch.stack(probs))
    return out


def _curve(pred: Prediction, y: Tensor, score: str) -> list[list[float]]:
    wrong = pred.mean.argmax(1) != y
    cov, risk = risk_coverage(uncertainty_score(pred, score), wrong)  # type: ignore[arg-type]
    idx = np.unique(np.linspace(0, len(cov) - 1, RC_POINTS).round().astype(int))
    return [[float(cov[i]), float(risk[i])] for i in idx]


def evaluate(
    cfg: RunConfig, models: list[nn.Module], data: Dataset, x_ood: Tensor
) -> dict[str, Any]:
    """The stored uncertainty metrics of trained ``models`` (member 0 first)."""
    dev = next(models[0].parameters()).device
    y = data.y_test.to(dev)
    ind = _predictions(cfg, models, _as_seen(cfg, data.x_test).to(dev))
    ood = _predictions(cfg, models, _as_seen(cfg, x_ood).to(dev))
    out: dict[str, Any] = {}
    for key, _label, scores in EVALUATORS:
        if key not in ind:
            continue
        for score in scores:
            m = gyrodrop.uncertainty_metrics(ind[key], y, ood=ood[key], score=score)  # type: ignore[arg-type]
            out.update({f"unc_{key}_{score}_{name}": value for name, value in m.items()})
            out[f"rc_{key}_{score}"] = _curve(ind[key], y, score)
        out[f"reliability_unc_{key}"] = M.reliability_bins(ind[key].mean, y)
    for key, prefix in (("mc", "mc_"), ("ens", "ens_")):  # the compare table's columns
        if key in ind:
            out.update(M.summary(ind[key].mean, y, prefix))
    return out


def uncertainty_run(
    cfg: RunConfig,
    data: Dataset,
    *,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    extra: Callable[[nn.Module, Dataset], dict[str, Any]] | None = None,
    keep_model: bool = False,
) -> RunResult:
    """Train member 0 (and the deep ensemble's other members) on the in-distribution
    split of ``data`` and evaluate every evaluator (module docstring). Metrics as
    :func:`~gyrodrop.experiments.train.train_run`'s (on the in-distribution test set)
    plus the ``unc_*``, ``rc_*`` and ``reliability_unc_*`` entries."""
    cfg = cfg.normalized()
    if cfg.ood_classes is None:
        raise ValueError("uncertainty_run: the configuration has no ood_classes")
    raw = cfg.recipe == "paper" and data.x_train.dim() == 4  # standardized per image later
    ind, x_ood = split_ood(
        data, cfg.ood_classes, cfg.train_limit, cfg.split_seed, restandardize=not raw
    )
    plain = dataclasses.replace(cfg, mc_samples=None)
    models: list[nn.Module] = []
    first: RunResult | None = None
    for j in range(cfg.ensemble_size or 1):
        member = dataclasses.replace(plain, seed=member_seed(cfg.seed, j))
        result = train_run(
            member,
            ind,
            device=device,
            on_epoch=on_epoch if j == 0 else None,
            extra=extra if j == 0 else None,
            keep_model=True,
        )
        assert result.model is not None
        models.append(result.model)
        first = first or result
    assert first is not None
    metrics = dict(first.metrics)
    metrics.update(evaluate(cfg, models, ind, x_ood))
    metrics.update(n_ood=len(x_ood), ensemble_size=len(models))
    return RunResult(metrics=metrics, epochs=first.epochs, model=models[0] if keep_model else None)
