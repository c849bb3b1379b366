"""Statistics of a study: per-run metrics derived from the stored epochs, and paired
comparisons with a Holm correction.

- **Final** test accuracy (after the last step): the primary metric.
- **Validation-selected**: the test accuracy at the epoch with the highest validation
  accuracy (the first such epoch): what a user who picks the checkpoint on held-out data
  gets. Secondary metric.
- **Best over epochs**: the highest test accuracy of any epoch, as the authors' code
  reports it: chosen on the test set, so it is optimistic.
- Paired differences (method minus baseline, per seed) with the 95% Student-t interval
  and the two-sided Wilcoxon signed-rank p (:func:`~gyrodrop.experiments.report.paired.
  paired_summary`), and Holm's step-down correction over the comparisons of one table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gyrodrop.experiments.report.paired import paired_summary

__all__ = ["holm", "selected_epoch", "derive", "paired", "seed_differences", "DERIVED"]

#: Per-run metrics :func:`derive` adds (fractions; ``sel_epoch`` is 1-based).
DERIVED: tuple[str, ...] = ("final_acc", "sel_acc", "sel_epoch", "sel_gap", "best_acc")


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order.

    Sort the ``m`` p-values ascending, ``p_(1) <= ... <= p_(m)``; the adjusted value of
    ``p_(i)`` is ``max_{j <= i} min(1, (m - j + 1) * p_(j))``. ``None`` entries (no test)
    are kept as ``None`` and do not count in ``m``. Holm (1979), Scand. J. Statist. 6.

    Example:
        >>> holm([0.01, 0.04, 0.03, None])
        [0.03, 0.06, 0.06, None]
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def selected_epoch(rows: Sequence[dict[str, Any]], key: str = "val_acc") -> int | None:
    """Index of the first row with the highest finite ``key`` (None when no row has it).

    Example:
        >>> selected_epoch([{"val_acc": 0.5}, {"val_acc": 0.7}, {"val_acc": 0.7}])
        1
    """
    best: int | None = None
    for i, r in enumerate(rows):
        v = r.get(key)
        finite = isinstance(v, (int, float)) and math.isfinite(v)
        if finite and (best is None or v > rows[best][key]):
            best = i
    return best


def derive(rec: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``rec`` (a stored run) with :data:`DERIVED` added from its epoch ``rows``:
    ``final_acc`` (= ``test_acc``), ``sel_acc`` / ``sel_epoch`` / ``sel_gap`` at the
    validation-selected epoch (the gap there uses the eval-mode accuracy on the sample of
    training examples each study epoch records), ``best_acc`` (best over epochs)."""
    out = dict(rec)
    out["final_acc"] = rec.get("test_acc")
    out["best_acc"] = max((r["test_acc"] for r in rows), default=rec.get("best_test_acc"))
    i = selected_epoch(rows)
    if i is not None:
        out["sel_acc"] = rows[i]["test_acc"]
        out["sel_epoch"] = i + 1
        train = rows[i].get("train_eval_acc")
        out["sel_gap"] = None if train is None else train - rows[i]["test_acc"]
    return out


def seed_differences(
    runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], metric: str
) -> dict[int, float]:
    """``{seed: run minus base}`` on ``metric`` for the seeds both sides have with a
    finite value, in seed order."""
    b = {r["seed"]: r.get(metric) for r in base}
    out: dict[int, float] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        x, y = r.get(metric), b.get(r["seed"])
        if not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out[r["seed"]] = float(x) - float(y)
    return out


def paired(
    runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], metric: str
) -> dict[str, Any]:
    """Paired comparison of ``runs`` with ``base`` on ``metric``, matched by seed:
    ``n, mean_diff, ci_low, ci_high, p_value`` (runs minus base; seeds missing from
    either side or without a finite value are left out)."""
    return paired_summary(list(seed_differences(runs, base, metric).values()))
