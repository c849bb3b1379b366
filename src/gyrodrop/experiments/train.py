"""One training run: a :class:`RunConfig` in, metrics out.

A run is fully determined by its configuration: the initial weights and ``nn.Dropout``
draws come from torch's generator inside :func:`torch.random.fork_rng` seeded with
``seed`` (the caller's global RNG state is restored afterwards), the data order from a
local ``torch.Generator`` seeded with ``seed``, and gyro masks from ``seed`` through
:func:`gyrodrop.apply_gyro_dropout`. Runs that differ only in ``method`` share the
initial weights, the data order and (paper recipe) the augmentations, so method
comparisons are paired.

Two training recipes (``RunConfig.recipe``):

- ``"default"``: features standardized with training statistics, every example every
  epoch (a last partial batch too), constant learning rate.
- ``"paper"``: the authors' TensorFlow recipe (mlsys-seo/gyro-dropout ``main.py``).
  Image data (``(N, C, H, W)``, best loaded raw: ``load_dataset(..., raw=True)``) is
  augmented per batch with a random ``crop_size`` crop and horizontal flip, tested on
  the center crop, and every image is standardized on its own; the learning rate drops
  x0.1 at 40% and 80% of the epochs (epochs 40 and 80 of 100); the last partial batch
  of an epoch is dropped; gyro masks are scaled by ``scale="realized"``. The optimizer
  (``rmsprop-tf1``: :class:`~gyrodrop.experiments.optim.TF1RMSprop`), learning rate
  0.007, momentum 0.9, batch 256 and the ``paper-*`` models are ordinary fields that
  the command line's ``--recipe paper`` presets.
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
from gyrodrop._validation import check_p
from gyrodrop.config import BlockGyroConfig
from gyrodrop.experiments import metrics as M
from gyrodrop.experiments.data import (
    Dataset,
    center_crop,
    crop_size,
    per_image_standardize,
    random_crop_flip,
)
from gyrodrop.experiments.models import MLP, PAPER_CONV, build_model
from gyrodrop.experiments.optim import TF1RMSprop, step_lr_factor, step_milestones

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "RECIPES",
    "RunConfig",
    "RunResult",
    "EpochCallback",
    "make_model",
    "input_shape",
    "predict_proba",
    "train_run",
    "resolve_device",
]

#: Regularizers ``--methods`` accepts.
METHODS: tuple[str, ...] = (
    "none",
    "dropout",
    "gyro",
    "gyro-random",
    "gyro-independent",
    "blockwise",
)
OPTIMIZERS: tuple[str, ...] = ("rmsprop", "sgd", "rmsprop-tf1")
RECIPES: tuple[str, ...] = ("default", "paper")
_GYRO = ("gyro", "gyro-random", "gyro-independent")
_SUBNET_METHODS = (*_GYRO, "blockwise")  # trained a fixed set of subnetworks
#: Fields added after schema 1 and their defaults (left out of the key at them).
_LATE_FIELDS: dict[str, Any] = {
    "data_id": None,
    "subnetworks": None,
    "eval_size": None,
    "recipe": "default",
    "width_mult": None,
    "ood_classes": None,
    "train_limit": None,
    "ensemble_size": None,
    "train_size": None,
    "val_size": None,
    "steps_per_epoch": None,
    "lr_schedule": None,
    "ens_subnets": None,
}
#: Learning-rate schedules of ``RunConfig.lr_schedule`` (``None``: constant, or the
#: paper recipe's steps).
LR_SCHEDULES: tuple[str, ...] = ("cosine",)


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
    # added after schema 1: left out of the key at their defaults (None, "default"), so
    # older keys still match
    data_id: str | None = None  # content hash of the data files (csv, fashion-mnist, ...)
    subnetworks: int | None = None  # diversity: subnetworks compared
    eval_size: int | None = None  # diversity: test examples used
    recipe: str = "default"  # training recipe: "default" or "paper"
    width_mult: float | None = None  # conv channel multiplier of the paper-* conv nets
    # compare --uncertainty --ood-classes (experiments/ood.py): these classes are held out
    # of training and their test examples are the out-of-distribution set; at most
    # ``train_limit`` training examples of the other classes; a deep ensemble of
    # ``ensemble_size`` networks (1: none)
    ood_classes: tuple[int, ...] | None = None
    train_limit: int | None = None
    ensemble_size: int | None = None
    # gyrodrop study (experiments/study): a nested training subset of ``train_size``
    # examples drawn with ``seed`` and a validation split of ``val_size`` held out of the
    # training split; ``steps_per_epoch`` optimizer steps between evaluations (a fixed
    # step budget whatever the size); ``lr_schedule="cosine"`` anneals the learning rate
    # per step to 0; ``ens_subnets`` members in the subnetwork ensemble (None: all)
    train_size: int | None = None
    val_size: int | None = None
    steps_per_epoch: int | None = None
    lr_schedule: str | None = None
    ens_subnets: int | None = None

    def normalized(self) -> RunConfig:
        """A copy with fields irrelevant to ``method`` set to ``None``; validates."""
        owner = "RunConfig"
        if self.method not in METHODS:
            raise ValueError(
                f"{owner}: method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(
                f"{owner}: recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}"
            )
        if self.width_mult is not None:
            if self.model not in PAPER_CONV:
                raise ValueError(
                    f"{owner}: width_mult applies to {', '.join(PAPER_CONV)} only, "
                    f"got it for model {self.model!r}"
                )
            if not self.width_mult > 0:
                raise ValueError(f"{owner}: width_mult must be > 0, got {self.width_mult}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{owner}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{owner}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_size", "val_size", "steps_per_epoch", "ens_subnets"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{owner}: {name} must be >= 1 or None, got {value}")
        if (self.train_size is None) != (self.val_size is None):
            raise ValueError(
                f"{owner}: train_size and val_size go together (a study run), got "
                f"train_size={self.train_size}, val_size={self.val_size}"
            )
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"{owner}: lr_schedule must be None or one of {', '.join(LR_SCHEDULES)}, "
                f"got {self.lr_schedule!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"{owner}: lr must be > 0, got {self.lr}")
        if self.ood_classes is not None:
            ood = tuple(int(c) for c in self.ood_classes)
            if not ood or min(ood) < 0 or len(set(ood)) != len(ood):
                raise ValueError(
                    f"{owner}: ood_classes must be distinct class indices >= 0, got {ood}"
                )
        elif self.train_limit is not None or self.ensemble_size is not None:
            raise ValueError(f"{owner}: train_limit and ensemble_size need ood_classes")
        if self.train_limit is not None and self.train_limit < 2:
            raise ValueError(f"{owner}: train_limit must be >= 2, got {self.train_limit}")
        if self.ensemble_size is not None and self.ensemble_size < 1:
            raise ValueError(f"{owner}: ensemble_size must be >= 1, got {self.ensemble_size}")
        for name in ("p", "input_p"):
            if getattr(self, name) is not None:  # the layers' own check and message
                check_p(owner, getattr(self, name), name)
        changes: dict[str, Any] = {}
        if self.method == "none":
            changes.update(
                p=None,
                input_p=None,
                num_subnets=None,
                subnets_per_step=None,
                block_size=None,
                ens_subnets=None,
            )
        elif self.method == "dropout":
            changes.update(
                num_subnets=None, subnets_per_step=None, block_size=None, ens_subnets=None
            )
        else:
            if self.num_subnets is None or self.subnets_per_step is None:
                raise ValueError(f"{owner}: {self.method} needs num_subnets and subnets_per_step")
            # sigma, tau (and the block size) as the layers check them
            BlockGyroConfig(
                num_subnets=self.num_subnets,
                subnets_per_step=self.subnets_per_step,
                block_size=32 if self.block_size is None else self.block_size,
                steps_per_set=1,
                owner=owner,
            )
            if self.method == "gyro-independent":
                changes["ens_subnets"] = None  # no subnetwork ensemble (no trained members)
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
        if self.ood_classes is not None:
            changes["ood_classes"] = tuple(sorted(int(c) for c in self.ood_classes))
        if self.width_mult is not None:
            changes["width_mult"] = float(self.width_mult)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), for JSON."""
        d = dataclasses.asdict(self)
        for name in ("widths", "ood_classes"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def canonical_json(self) -> str:
        """Canonical JSON of the normalized configuration: sorted keys, no spaces (the
        fields added after schema 1 only when not at their defaults)."""
        d = self.normalized().to_dict()
        for name, default in _LATE_FIELDS.items():
            if d[name] == default:
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
        for name in ("widths", "ood_classes"):
            if kw.get(name) is not None:
                kw[name] = tuple(kw[name])
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


def make_model(
    cfg: RunConfig,
    data: Dataset,
    steps_per_epoch: int,
    in_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build ``cfg.model`` and apply ``cfg.method`` (uses torch's global RNG for init:
    call inside a seeded ``fork_rng``). ``in_shape`` overrides ``data.in_shape`` (the
    paper recipe's crops are smaller than the images)."""
    cfg = cfg.normalized()
    p = cfg.p or 0.0
    model = build_model(
        cfg.model,
        data.in_shape if in_shape is None else in_shape,
        data.num_classes,
        p,
        widths=cfg.widths,
        width_mult=cfg.width_mult,
    )
    if cfg.input_p:
        _insert_input_dropout(model, cfg.input_p)
    total = cfg.epochs * steps_per_epoch
    if cfg.method in _GYRO:
        assert cfg.num_subnets is not None and cfg.subnets_per_step is not None
        options: dict[str, Any] = {}
        if cfg.method == "gyro-independent":
            options["pairing"] = "independent"  # schedule "replacement", as the authors
        else:
            options["schedule"] = "random" if cfg.method == "gyro-random" else "consecutive"
        if cfg.recipe == "paper":
            options["scale"] = "realized"
        gyrodrop.apply_gyro_dropout(
            model,
            p=None,
            num_subnets=cfg.num_subnets,
            subnets_per_step=cfg.subnets_per_step,
            total_steps=total,
            seed=cfg.seed,
            **options,
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
    if ens is not None and cfg.method in _SUBNET_METHODS and cfg.method != "gyro-independent":
        members = cfg.ens_subnets
        if members is not None and cfg.num_subnets is not None:
            members = min(members, cfg.num_subnets)
        probs = _chunked_prediction(lambda xb: ens(model, xb, subnets=members), x)
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


def input_shape(cfg: RunConfig, data: Dataset) -> tuple[int, ...]:
    """The shape of one example as the model sees it: ``data.in_shape``, or the crop
    ``(C, s, s)`` of image data under the paper recipe (``s = crop_size(H, W)``)."""
    shape = tuple(data.x_train.shape[1:])
    if cfg.recipe == "paper" and len(shape) == 3:
        side = crop_size(shape[1], shape[2])
        return (shape[0], side, side)
    return shape


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop-tf1":
        return TF1RMSprop(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


class _View:
    """What the model sees: training batches and evaluation inputs under ``cfg.recipe``.

    Default recipe, or paper recipe on non-image data: the dataset's tensors as they
    are. Paper recipe on images ``(N, C, H, W)``: a random crop + flip of each training
    image, the center crop at evaluation, each image standardized on its own.
    """

    def __init__(
        self, cfg: RunConfig, data: Dataset, dev: torch.device, gen: torch.Generator
    ) -> None:
        self.augment = cfg.recipe == "paper" and data.x_train.dim() == 4
        self.gen = gen
        self.data = data
        self.x_train = data.x_train.to(dev)
        self.in_shape = input_shape(cfg, data)
        if self.augment:
            self.size = self.in_shape[-1]
            self.x_test = per_image_standardize(center_crop(data.x_test, self.size)).to(dev)
        else:
            self.x_test = data.x_test.to(dev)

    def train_batch(self, idx: Tensor) -> Tensor:
        """The (augmented) training inputs of rows ``idx``."""
        if not self.augment:
            return self.x_train[idx]
        return per_image_standardize(random_crop_flip(self.x_train[idx], self.size, self.gen))

    def eval_data(self) -> Dataset:
        """``data`` as the model sees it at evaluation (for ``extra`` analyses)."""
        if not self.augment:
            return self.data
        return dataclasses.replace(self.data, x_train=self.x_train_eval(), x_test=self.x_test)

    def x_train_eval(self) -> Tensor:
        """The training inputs as evaluated (center crop under the paper recipe)."""
        if not self.augment:
            return self.x_train
        return per_image_standardize(center_crop(self.x_train, self.size))


def _cosine(lr: float, step: int, total: int) -> float:
    """Cosine annealing from ``lr`` at step 0 towards 0 at step ``total``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


#: Training examples (at most) whose eval-mode accuracy a study records per epoch.
STUDY_TRAIN_EVAL = 2000


class _BatchStream:
    """Full batches of ``batch`` row indices from consecutive seeded permutations of
    ``range(n)`` (a batch may span two passes): a step budget independent of ``n``."""

    def __init__(self, n: int, batch: int, data_gen_seed: int) -> None:
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(data_gen_seed)
        self.buffer = torch.empty(0, dtype=torch.int64)

    def next(self) -> Tensor:
        while len(self.buffer) < self.batch:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.gen)])
        idx, self.buffer = self.buffer[: self.batch], self.buffer[self.batch :]
        return idx


def _study_row(
    model: nn.Module,
    view: _View,
    test: Tensor,
    yte: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    ytr: Tensor,
    dev: torch.device,
) -> dict[str, float]:
    """The per-epoch metrics a study needs beyond the usual row: validation accuracy and
    NLL, test ECE, and the training accuracy in eval mode on the first
    :data:`STUDY_TRAIN_EVAL` training examples (a random sample: the subset is drawn at
    random), for the generalization gap at any epoch."""
    val = predict_proba(model, x_val.to(dev))
    train = predict_proba(model, view.x_train_eval()[:STUDY_TRAIN_EVAL])
    return {
        "val_acc": M.accuracy(val, y_val.to(dev)),
        "val_loss": M.nll(val, y_val.to(dev)),
        "test_ece": M.ece(test, yte),
        "train_eval_acc": M.accuracy(train, ytr[:STUDY_TRAIN_EVAL]),
    }


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
            diversity analysis), called in eval mode after training; under the paper
            recipe ``data`` holds the center-cropped, standardized images.
        keep_model: return the trained model in the result.

    Returns:
        :class:`RunResult`: ``metrics`` has ``test_acc, train_acc, gap`` (train minus
        test accuracy) after the last epoch, ``best_test_acc`` and ``best_epoch`` (the
        best epoch's test accuracy: the number the authors' code reports),
        ``recipe``, ``test_nll, test_ece, test_brier``, ``epoch_time`` (median
        training seconds per epoch, robust to a busy machine), ``params`` and, with
        ``mc_samples``, ``mc_*`` and ``ens_*``; ``epochs`` has one row per epoch
        (``train_loss, train_acc`` in training mode, ``test_loss, test_acc``, ``lr``,
        ``seconds``).
    """
    cfg = cfg.normalized()
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    n = len(data.y_train)
    paper = cfg.recipe == "paper"
    if paper and n < cfg.batch_size:
        raise ValueError(
            f"run {cfg.method} seed {cfg.seed}: the paper recipe drops the last partial "
            f"batch, and {n} training examples make no full batch of {cfg.batch_size}; "
            "lower --batch-size or raise --limit"
        )
    steps_per_epoch = n // cfg.batch_size if paper else math.ceil(n / cfg.batch_size)
    stream = None
    if cfg.steps_per_epoch is not None:  # a fixed step budget: full batches, any n
        steps_per_epoch = cfg.steps_per_epoch
        stream = _BatchStream(n, min(cfg.batch_size, n), data_gen_seed=cfg.seed)
    total_steps = cfg.epochs * steps_per_epoch
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    data_gen = torch.Generator().manual_seed(cfg.seed)
    view = _View(cfg, data, dev, data_gen)
    ytr = data.y_train.to(dev)
    xte, yte = view.x_test, data.y_test.to(dev)
    milestones = step_milestones(cfg.epochs) if paper else []
    rows: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, data, steps_per_epoch, in_shape=view.in_shape).to(dev)
        opt = _optimizer(cfg, model)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(cfg.epochs):
            model.train()
            lr = cfg.lr * step_lr_factor(epoch, milestones)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.int64)
            seen = 0
            if stream is not None:
                batches = [stream.next().to(dev) for _ in range(steps_per_epoch)]
            else:
                batches = list(torch.randperm(n, generator=data_gen).to(dev).split(cfg.batch_size))
            for i, idx in enumerate(batches):
                if paper and len(idx) < cfg.batch_size:
                    continue  # the authors' loop runs n // batch steps per epoch
                if cfg.lr_schedule == "cosine":
                    step = epoch * steps_per_epoch + i
                    for group in opt.param_groups:
                        group["lr"] = _cosine(lr, step, total_steps)
                xb, yb = view.train_batch(idx), ytr[idx]
                opt.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                if cfg.max_norm is not None:
                    _apply_max_norm(model, cfg.max_norm)
                loss_sum += loss.detach() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += len(yb)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            probs = predict_proba(model, xte)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / seen,
                "train_acc": int(correct) / seen,
                "test_loss": M.nll(probs, yte),
                "test_acc": M.accuracy(probs, yte),
                "lr": _cosine(lr, epoch * steps_per_epoch, total_steps) if cfg.lr_schedule else lr,
                "seconds": seconds,
            }
            if data.x_val is not None and data.y_val is not None:
                row.update(_study_row(model, view, probs, yte, data.x_val, data.y_val, ytr, dev))
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
        train = predict_proba(model, view.x_train_eval())
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
        best = max(range(len(rows)), key=lambda i: rows[i]["test_acc"])  # first maximum
        result["best_test_acc"] = rows[best]["test_acc"]
        result["best_epoch"] = best + 1
        result["recipe"] = cfg.recipe
        if data.x_val is not None and data.y_val is not None:
            val = predict_proba(model, data.x_val.to(dev))
            result["val_acc"] = M.accuracy(val, data.y_val.to(dev))
            result["val_nll"] = M.nll(val, data.y_val.to(dev))
            result["n_val"] = len(data.y_val)
        if cfg.mc_samples:
            result["reliability"] = M.reliability_bins(test, yte)
            result.update(_uncertainty(model, cfg, data))
        if extra is not None:
            model.eval()
            result.update(extra(model, view.eval_data()))
    return RunResult(metrics=result, epochs=rows, model=model if keep_model else None)
