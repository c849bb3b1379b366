"""One training run: a :class:`RunConfig` in, metrics out.

A run is fully determined by its configuration: the initial weights and ``nn.Dropout``
draws come from torch's generator inside :func:`torch.random.fork_rng` seeded with
``seed`` (the caller's global RNG state is restored afterwards), the data order from a
local ``torch.Generator`` seeded with ``seed``, and gyro masks from ``seed`` through
:func:`gyrodrop.apply_gyro_dropout`. Runs that differ only in ``method`` share the
initial weights and the data order, so method comparisons are paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gyrodrop
from gyrodrop.experiments import metrics as M
from gyrodrop.experiments.data import Dataset
from gyrodrop.experiments.models import MLP, build_model

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "RunConfig",
    "RunResult",
    "EpochCallback",
    "make_model",
    "predict_proba",
    "train_run",
    "resolve_device",
]

#: Regularizers ``--methods`` accepts.
METHODS: tuple[str, ...] = ("none", "dropout", "gyro", "gyro-random", "blockwise")
OPTIMIZERS: tuple[str, ...] = ("rmsprop", "sgd")
_GYRO = ("gyro", "gyro-random")
_SUBNET_METHODS = (*_GYRO, "blockwise")  # trained a fixed set of subnetworks
_LATE_FIELDS = ("data_id", "subnetworks", "eval_size")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result (the results database key).

    Fields that do not apply to ``method`` are set to ``None`` by :meth:`normalized`,
    so e.g. ``none`` runs do not differ by ``num_subnets``.
    """

    # what
    experiment: str
    dataset: str
    model: str
    method: str
    seed: int
    # training
    epochs: int
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "rmsprop"
    momentum: float = 0.0
    max_norm: float | None = None
    # regularizer
    p: float | None = 0.5
    input_p: float | None = None
    num_subnets: int | None = 256
    subnets_per_step: int | None = 16
    block_size: int | None = None
    # model and data
    widths: tuple[int, ...] | None = None
    limit: int | None = None
    split_seed: int = 0
    folds: int | None = None
    fold: int | None = None
    # evaluation
    mc_samples: int | None = None
    # added after schema 1: left out of the key while None, so older keys still match
    data_id: str | None = None  # content hash of the data files (csv, fashion-mnist, ...)
    subnetworks: int | None = None  # diversity: subnetworks compared
    eval_size: int | None = None  # diversity: test examples used

    def normalized(self) -> RunConfig:
        """A copy with fields irrelevant to ``method`` set to ``None``; validates."""
        owner = "RunConfig"
        if self.method not in METHODS:
            raise ValueError(
                f"{owner}: method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{owner}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{owner}: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"{owner}: lr must be > 0, got {self.lr}")
        for name in ("p", "input_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{owner}: {name} must be in [0, 1), got {v}")
        changes: dict[str, Any] = {}
        if self.method == "none":
            changes.update(
                p=None, input_p=None, num_subnets=None, subnets_per_step=None, block_size=None
            )
        elif self.method == "dropout":
            changes.update(num_subnets=None, subnets_per_step=None, block_size=None)
        else:
            if self.num_subnets is None or self.subnets_per_step is None:
                raise ValueError(f"{owner}: {self.method} needs num_subnets and subnets_per_step")
            if not 1 <= self.subnets_per_step <= self.num_subnets:
                raise ValueError(
                    f"{owner}: subnets_per_step must be in [1, num_subnets={self.num_subnets}], "
                    f"got {self.subnets_per_step}"
                )
            if self.method != "blockwise":
                changes["block_size"] = None
            elif self.block_size is None:
                changes["block_size"] = 32
        if self.method != "none" and not self.p and not self.input_p:
            raise ValueError(f"{owner}: method {self.method} needs p > 0 or input_p > 0")
        if self.input_p == 0.0:
            changes["input_p"] = None
        if self.widths is not None:
            changes["widths"] = tuple(int(w) for w in self.widths)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), for JSON."""
        d = dataclasses.asdict(self)
        if d["widths"] is not None:
            d["widths"] = list(d["widths"])
        return d

    def canonical_json(self) -> str:
        """Canonical JSON of the normalized configuration: sorted keys, no spaces (the
        fields added after schema 1 only when set)."""
        d = self.normalized().to_dict()
        for name in _LATE_FIELDS:
            if d[name] is None:
                del d[name]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """SHA-256 (hex, 16 chars) of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, missing ones default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("widths") is not None:
            kw["widths"] = tuple(kw["widths"])
        return cls(**kw)


@dataclass
class RunResult:
    """Final metrics (``test_acc``, ``train_acc``, ... fractions) and per-epoch rows."""

    metrics: dict[str, Any]
    epochs: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None


#: ``callback(epoch_index, epoch_row)`` after each epoch.
EpochCallback = Callable[[int, dict[str, float]], None]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when present else cpu; anything else as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use cpu")
    return dev


def _insert_input_dropout(model: nn.Module, p: float) -> None:
    if not isinstance(model, MLP):
        raise ValueError("input_p: input dropout is supported for the mlp models only")
    feats = model.features
    assert isinstance(feats, nn.Sequential)
    model.features = nn.Sequential(feats[0], nn.Dropout(p), *list(feats)[1:])


def make_model(cfg: RunConfig, data: Dataset, steps_per_epoch: int) -> nn.Module:
    """Build ``cfg.model`` and apply ``cfg.method`` (uses torch's global RNG for init:
    call inside a seeded ``fork_rng``)."""
    cfg = cfg.normalized()
    p = cfg.p or 0.0
    model = build_model(cfg.model, data.in_shape, data.num_classes, p, widths=cfg.widths)
    if cfg.input_p:
        _insert_input_dropout(model, cfg.input_p)
    total = cfg.epochs * steps_per_epoch
    if cfg.method in _GYRO:
        assert cfg.num_subnets is not None and cfg.subnets_per_step is not None
        gyrodrop.apply_gyro_dropout(
            model,
            p=None,
            num_subnets=cfg.num_subnets,
            subnets_per_step=cfg.subnets_per_step,
            total_steps=total,
            seed=cfg.seed,
            schedule="random" if cfg.method == "gyro-random" else "consecutive",
        )
    elif cfg.method == "blockwise":
        apply_block = getattr(gyrodrop, "apply_block_gyro", None)
        if apply_block is None:
            raise RuntimeError(
                "method blockwise needs gyrodrop.apply_block_gyro, which this version of "
                "gyrodrop does not have; use --methods none,dropout,gyro,gyro-random"
            )
        count = apply_block(
            model,
            num_subnets=cfg.num_subnets,
            subnets_per_step=cfg.subnets_per_step,
            block_size=cfg.block_size,
            total_steps=total,
            seed=cfg.seed,
        )
        if count == 0:
            raise RuntimeError(f"method blockwise: no Dropout -> Linear pair in {cfg.model}")
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """Class probabilities ``(N, C)`` in eval mode, in chunks of ``batch`` rows."""
    was = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x[i : i + batch]).float(), 1) for i in range(0, len(x), batch)]
    finally:
        model.train(was)
    return torch.cat(out)


def _chunked_prediction(fn: Callable[[Tensor], Any], x: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat([fn(x[i : i + batch]).mean.float() for i in range(0, len(x), batch)])


def _uncertainty(model: nn.Module, cfg: RunConfig, data: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    x, y = data.x_test, data.y_test
    samples = int(cfg.mc_samples or 30)
    mc = getattr(gyrodrop, "mc_predict", None)
    if mc is not None and cfg.method != "none":
        probs = _chunked_prediction(lambda xb: mc(model, xb, samples=samples), x)
        out.update(M.summary(probs, y, "mc_"))
        out["reliability_mc"] = M.reliability_bins(probs, y)
    ens = getattr(gyrodrop, "subnet_ensemble_predict", None)
    if ens is not None and cfg.method in _SUBNET_METHODS:
        probs = _chunked_prediction(lambda xb: ens(model, xb), x)
        out.update(M.summary(probs, y, "ens_"))
        out["reliability_ens"] = M.reliability_bins(probs, y)
    return out


def _apply_max_norm(model: nn.Module, c: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) or (
                isinstance(w, Tensor) and w.dim() == 2 and "Linear" in type(m).__name__
            ):
                assert isinstance(w, Tensor)
                w.copy_(torch.renorm(w, 2, 0, c))


def train_run(
    cfg: RunConfig,
    data: Dataset,
    *,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
    extra: Callable[[nn.Module, Dataset], dict[str, Any]] | None = None,
    keep_model: bool = False,
) -> RunResult:
    """Train ``cfg`` on ``data`` and evaluate it.

    Args:
        cfg: the run's configuration.
        data: train/test tensors (on the CPU; moved to ``device`` here).
        device: where to train.
        on_epoch: called after each epoch with its index and row.
        extra: ``extra(model, data) -> dict`` merged into the final metrics (e.g. the
            diversity analysis), called in eval mode after training.
        keep_model: return the trained model in the result.

    Returns:
        :class:`RunResult`: ``metrics`` has ``test_acc, train_acc, gap`` (train minus
        test accuracy), ``test_nll, test_ece, test_brier``, ``epoch_time`` (median
        training seconds per epoch, robust to a busy machine), ``params`` and, with
        ``mc_samples``, ``mc_*`` and ``ens_*``; ``epochs`` has one row per epoch
        (``train_loss, train_acc`` in training mode, ``test_loss, test_acc``,
        ``seconds``).
    """
    cfg = cfg.normalized()
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    data_gen = torch.Generator().manual_seed(cfg.seed)
    xtr, ytr = data.x_train.to(dev), data.y_train.to(dev)
    xte, yte = data.x_test.to(dev), data.y_test.to(dev)
    rows: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, data, steps_per_epoch).to(dev)
        if cfg.optimizer == "rmsprop":
            opt: torch.optim.Optimizer = torch.optim.RMSprop(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum
            )
        else:
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.int64)
            for idx in torch.randperm(n, generator=data_gen).to(dev).split(cfg.batch_size):
                xb, yb = xtr[idx], ytr[idx]
                opt.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                if cfg.max_norm is not None:
                    _apply_max_norm(model, cfg.max_norm)
                loss_sum += loss.detach() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            probs = predict_proba(model, xte)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / n,
                "train_acc": int(correct) / n,
                "test_loss": M.nll(probs, yte),
                "test_acc": M.accuracy(probs, yte),
                "seconds": seconds,
            }
            if not math.isfinite(row["train_loss"]):
                raise FloatingPointError(
                    f"run {cfg.method} seed {cfg.seed}: training loss is {row['train_loss']} "
                    f"at epoch {epoch + 1}; lower --lr (now {cfg.lr})"
                )
            rows.append(row)
            if on_epoch is not None:
                on_epoch(epoch, row)
        model.eval()
        test = predict_proba(model, xte)
        train = predict_proba(model, xtr)
        result: dict[str, Any] = {
            "test_acc": M.accuracy(test, yte),
            "train_acc": M.accuracy(train, ytr),
            "test_nll": M.nll(test, yte),
            "test_ece": M.ece(test, yte),
            "test_brier": M.brier(test, yte),
            "train_nll": M.nll(train, ytr),
            "epoch_time": statistics.median(r["seconds"] for r in rows),
            "steps": cfg.epochs * steps_per_epoch,
            "params": sum(p.numel() for p in model.parameters()),
            "n_train": n,
            "n_test": len(data.y_test),
        }
        result["gap"] = result["train_acc"] - result["test_acc"]
        if cfg.mc_samples:
            result["reliability"] = M.reliability_bins(test, yte)
            result.update(_uncertainty(model, cfg, data))
        if extra is not None:
            model.eval()
            result.update(extra(model, data))
    return RunResult(metrics=result, epochs=rows, model=model if keep_model else None)
