"""Grouping finished runs into tables: sections (one table each) and variants (rows).

A *section* is everything that is the same across the rows of one table (dataset,
model, epochs, optimizer, recipe, ...); a *variant* is one row (method and its
hyperparameters); seeds and folds are the replicates averaged over (and paired by).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REPLICATE", "VARIANT", "Section", "sections", "section_label", "slug"]

#: Replicate fields: averaged over, never a row.
REPLICATE = ("seed", "fold")
#: Variant fields: one table row per distinct value.
VARIANT = ("method", "p", "input_p", "num_subnets", "subnets_per_step", "block_size")
#: Bookkeeping fields of a record that are not configuration.
_NOT_CONFIG = {"key", "device", "version", "finished"}
_CONFIG_FIELDS = (
    "experiment",
    "dataset",
    "model",
    "method",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "max_norm",
    "p",
    "input_p",
    "num_subnets",
    "subnets_per_step",
    "block_size",
    "widths",
    "limit",
    "split_seed",
    "folds",
    "fold",
    "mc_samples",
    "recipe",
    "width_mult",
    "train_size",
    "val_size",
    "steps_per_epoch",
    "lr_schedule",
    "ood_classes",
    "train_limit",
    "ensemble_size",
)
_METHOD_ORDER = {
    "none": 0,
    "dropout": 1,
    "gyro": 2,
    "gyro-independent": 3,
    "gyro-random": 4,
    "blockwise": 5,
}


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _sort_key(v: Any) -> tuple[int, Any]:
    return (1, "") if v is None else (0, v)


@dataclass
class Section:
    """Runs sharing every configuration field but the variant and replicate ones."""

    setting: dict[str, Any]
    variants: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """All runs of the section."""
        return [r for runs in self.variants.values() for r in runs]

    def ordered(self) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
        """Variants sorted by method (none, dropout, gyro, ...) then hyperparameters."""
        return sorted(
            self.variants.items(),
            key=lambda kv: (_METHOD_ORDER.get(kv[0][0], 9), [_sort_key(v) for v in kv[0][1:]]),
        )


def sections(records: Iterable[dict[str, Any]]) -> list[Section]:
    """Group records into :class:`Section` s, in order of first appearance."""
    out: dict[tuple[Any, ...], Section] = {}
    for rec in records:
        setting = {k: rec.get(k) for k in _CONFIG_FIELDS if k not in VARIANT and k not in REPLICATE}
        skey = tuple(_freeze(setting[k]) for k in sorted(setting))
        sec = out.setdefault(skey, Section(setting))
        vkey = tuple(_freeze(rec.get(k)) for k in VARIANT)
        sec.variants.setdefault(vkey, []).append(rec)
    return list(out.values())


def section_label(sec: Section) -> str:
    """``digits / mlp: 20 epochs, batch 256, rmsprop lr 0.001`` and the non-defaults."""
    s = sec.setting
    parts = [
        f"{s['epochs']} epochs",
        f"batch {s['batch_size']}",
        f"{s['optimizer']} lr {s['lr']:g}",
    ]
    if s.get("momentum"):
        parts.append(f"momentum {s['momentum']:g}")
    if s.get("max_norm") is not None:
        parts.append(f"max-norm {s['max_norm']:g}")
    if s.get("widths"):
        parts.append("widths " + "-".join(str(w) for w in s["widths"]))
    if s.get("limit") is not None:
        parts.append(f"limit {s['limit']}")
    if s.get("folds"):
        parts.append(f"{s['folds']}-fold CV")
    if s.get("recipe") not in (None, "default"):
        parts.append(f"{s['recipe']} recipe")
    if s.get("width_mult") is not None:
        parts.append(f"conv width x{s['width_mult']:g}")
    if s.get("train_size") is not None:
        parts.append(f"{s['train_size']} training images (study)")
    if s.get("train_limit") is not None:
        parts.append(f"{s['train_limit']} training examples")
    if s.get("ood_classes"):
        parts.append("OOD classes " + ",".join(str(c) for c in s["ood_classes"]))
    if s.get("ensemble_size") not in (None, 1):
        parts.append(f"deep ensemble of {s['ensemble_size']}")
    return f"{s['dataset']} / {s['model']}: " + ", ".join(parts)


def slug(sec: Section) -> str:
    """File-name stem of a section, e.g. ``compare_digits_mlp``."""
    s = sec.setting
    raw = f"{s['experiment']}_{s['dataset']}_{s['model']}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)


def _values(runs: Sequence[dict[str, Any]], name: str) -> list[float]:
    out = []
    for r in runs:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _mean(runs: Sequence[dict[str, Any]], name: str) -> float | None:
    v = _values(runs, name)
    return statistics.fmean(v) if v else None


def _sd(runs: Sequence[dict[str, Any]], name: str) -> float | None:
    v = _values(runs, name)
    return statistics.stdev(v) if len(v) > 1 else None


def _pct(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}"


def _pct_sd(runs: Sequence[dict[str, Any]], name: str) -> str:
    m, s = _mean(runs, name), _sd(runs, name)
    if m is None:
        return ""
    return f"{100 * m:.2f} ± {100 * s:.2f}" if s is not None else f"{100 * m:.2f}"


def _num(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _opt(v: Any) -> str:
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _variant_label(vkey: tuple[Any, ...]) -> str:
    method, p, input_p, sigma, tau, block = vkey
    extra = []
    if sigma is not None:
        extra.append(f"σ={sigma}, τ={tau}")
    if block:
        extra.append(f"block {block}")
    return method + (f" ({', '.join(extra)})" if extra else "")
