"""How good is an uncertainty? Calibration, selective prediction and out-of-distribution
detection for a :class:`~gyrodrop.Prediction` (MC dropout, the gyro subnetwork ensemble,
or any summary of class probabilities), and Gaussian NLL / RMSE for regression.

Definitions (``p`` the predictive probabilities ``(N, C)``, ``y`` the labels, ``u`` the
uncertainty score chosen by ``score``):

- ``accuracy``: the fraction of rows whose arg-max is ``y``.
- ``nll``: ``-(1/N) sum_i log p_i[y_i]`` in nats, ``p`` floored at ``1e-12`` (Quinonero-
  Candela et al., "Evaluating Predictive Uncertainty Challenge", 2006).
- ``brier``: ``(1/N) sum_i sum_c (p_ic - [c == y_i])**2``, in ``[0, 2]`` (Brier, "Verification
  of forecasts expressed in terms of probability", 1950: summed over classes, as
  torch-uncertainty and scikit-learn's binary ``brier_score_loss`` times 2).
- ``ece``: ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over ``bins`` equal-width bins
  ``[b/bins, (b+1)/bins)`` of the confidence ``max_c p_ic`` (1.0 in the last bin) (Naeini
  et al., AAAI 2015; Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
  eq. 3); torchmetrics' ``MulticlassCalibrationError(norm="l1")`` bins the same way.
- ``aurc``: the area under the risk-coverage curve: keep the ``k`` least uncertain rows
  (by ``u``), risk = their error rate, averaged over ``k = 1..N`` (Geifman, Uziel and
  El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019).
  Rows with equal ``u`` have no order, so the risk at each ``k`` is its expectation over
  the orders of the tied rows (the value does not depend on the input order). Lower is
  better; the error rate of the whole set times ~1/2 is a random ranking's.
- ``ood_auroc``, ``ood_aupr``, ``ood_fpr95``: out-of-distribution detection with ``u`` as
  the detector and the OOD inputs as the positive class (Hendrycks and Gimpel, "A
  Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017):
  scikit-learn's ``roc_auc_score`` and ``average_precision_score`` (AUPR as average
  precision), and the false positive rate (in-distribution inputs flagged) at the
  smallest threshold that flags 95% of the OOD inputs, from ``roc_curve`` (Liang et al.,
  "Enhancing the Reliability of Out-of-distribution Image Detection", ICLR 2018).

Scores ``u`` (higher = more uncertain): ``"entropy"`` (``Prediction.entropy``),
``"mutual_info"`` (``Prediction.mutual_info``), ``"max_prob"`` (``1 - max_c p_c``),
``"variance"`` (``Prediction.variance``; regression: averaged over outputs).

Regression (``Prediction.kind == "regression"``, targets shaped like ``mean``):
``rmse`` = ``sqrt(mean (y - mean)**2)`` and ``nll`` = the Gaussian negative
log-likelihood ``mean 0.5 * (log(2 pi var) + (y - mean)**2 / var)`` averaged over all
outputs, as ``torch.nn.functional.gaussian_nll_loss(full=True, eps=1e-6)`` (variance
floored at ``1e-6``; Nix and Weigend 1994; Lakshminarayanan et al., "Simple and Scalable
Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017). The OOD metrics
apply with ``score="variance"`` or ``"entropy"`` (``"mutual_info"`` when the model
predicts its variance).

scikit-learn is imported only when ``ood`` is given (``pip install
'gyrodrop[uncertainty]'``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from gyrodrop._validation import check_choice, check_int
from gyrodrop.uncertainty.passes import Prediction

__all__ = ["SCORES", "Score", "uncertainty_metrics", "uncertainty_score", "risk_coverage"]

#: The uncertainty scores ``uncertainty_metrics(score=...)`` accepts.
Score = Literal["entropy", "mutual_info", "max_prob", "variance"]
SCORES: tuple[Score, ...] = ("entropy", "mutual_info", "max_prob", "variance")

_OWNER = "uncertainty_metrics"
_PROB_FLOOR = 1e-12
_VAR_EPS = 1e-6  # gaussian_nll_loss's default clamp


def uncertainty_metrics(
    prediction: Prediction,
    labels: Any,
    *,
    ood: Prediction | None = None,
    score: Score = "entropy",
    bins: int = 15,
) -> dict[str, float]:
    """Scores a :class:`~gyrodrop.Prediction` against the true labels (definitions and
    sources: :mod:`gyrodrop.uncertainty.metrics`).

    Args:
        prediction: from :func:`~gyrodrop.mc_predict` or
            :func:`~gyrodrop.subnet_ensemble_predict` on in-distribution inputs (or a
            ``Prediction`` built from any ``(N, C)`` probabilities).
        labels: classification: class indices ``(N,)``, integers in ``[0, C)``;
            regression: targets shaped like ``prediction.mean``.
        ood: a ``Prediction`` of the same model on out-of-distribution inputs (at least
            one row); adds ``ood_auroc``, ``ood_aupr`` and ``ood_fpr95``.
        score: the uncertainty that ranks rows for ``aurc`` and detects OOD inputs:
            ``"entropy"``, ``"mutual_info"``, ``"max_prob"`` (as ``1 - max prob``) or
            ``"variance"``.
        bins: equal-width confidence bins of ``ece`` (>= 1).

    Returns:
        Classification: ``accuracy``, ``nll``, ``brier``, ``ece``, ``aurc`` (floats).
        Regression: ``rmse``, ``nll``. With ``ood``: ``ood_auroc``, ``ood_aupr``,
        ``ood_fpr95`` too.

    Raises:
        ValueError: labels out of range or not integers, labels or ``ood`` that do not
            match ``prediction``, an empty ``ood``, a ``score`` not in the list (or not
            defined for the prediction), ``bins < 1``.
        ImportError: ``ood`` given and scikit-learn not installed.

    Example:
        >>> import torch, gyrodrop
        >>> p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> pred = gyrodrop.Prediction(p, torch.zeros(3), torch.zeros(3), torch.zeros(3))
        >>> m = gyrodrop.uncertainty_metrics(pred, torch.tensor([0, 1, 1]), score="max_prob")
        >>> round(m["accuracy"], 4), round(m["brier"], 4), round(m["aurc"], 4)
        (0.6667, 0.2733, 0.1111)
    """
    pred = _check_prediction("prediction", prediction)
    score = check_choice(_OWNER, "score", score, SCORES)
    bins = check_int(_OWNER, "bins", bins, 1)
    u = uncertainty_score(pred, score)
    if pred.kind == "regression":
        y = _regression_targets(pred, labels)
        mean, var = pred.mean.double(), pred.variance.double()
        out = {
            "rmse": float(((y - mean) ** 2).mean().sqrt()),
            "nll": float(
                torch.nn.functional.gaussian_nll_loss(mean, y, var, full=True, eps=_VAR_EPS)
            ),
        }
    else:
        y = _class_labels(pred, labels)
        p = pred.mean.double()
        conf, guess = p.max(1)
        correct = guess == y
        onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
        out = {
            "accuracy": float(correct.double().mean()),
            "nll": float(-p.gather(1, y[:, None]).clamp_min(_PROB_FLOOR).log().mean()),
            "brier": float(((p - onehot) ** 2).sum(1).mean()),
            "ece": _ece(conf, correct, bins),
            "aurc": float(risk_coverage(u, ~correct)[1].mean()),
        }
    if ood is not None:
        out.update(_ood_metrics(pred, _check_prediction("ood", ood), u, score))
    return out


def uncertainty_score(prediction: Prediction, score: Score) -> Tensor:
    """The per-row uncertainty ``score`` of a prediction, float64 ``(N,)``, higher =
    more uncertain (see :mod:`gyrodrop.uncertainty.metrics`)."""
    score = check_choice(_OWNER, "score", score, SCORES)
    pred = prediction
    if pred.kind == "regression":
        if score == "max_prob":
            raise ValueError(
                f"{_OWNER}: score='max_prob' needs class probabilities, got a regression "
                "prediction; hint: score='variance' or 'entropy'"
            )
        if score == "variance":
            v = pred.variance.double()
            return v.reshape(v.shape[0], -1).mean(1)
        if score == "mutual_info" and bool(pred.mutual_info.isnan().any()):
            raise ValueError(
                f"{_OWNER}: score='mutual_info' needs a model that predicts its own "
                "variance (output (mean, variance)); this one gives means only; "
                "hint: score='variance'"
            )
    if score == "max_prob":
        return 1.0 - pred.mean.double().max(1).values
    return getattr(pred, score).double()  # entropy, mutual_info, variance (N,)


def risk_coverage(uncertainty: Tensor, errors: Tensor) -> tuple[Tensor, Tensor]:
    """The risk-coverage curve: keeping the ``k`` least uncertain rows, the coverage
    ``k / N`` and the risk (mean of ``errors`` over them; expected over the orders of
    tied rows), for ``k = 1..N``; float64 ``(N,)`` each. Its mean risk is the AURC.

    Args:
        uncertainty: ``(N,)``, higher = rejected first.
        errors: ``(N,)``, the loss of each row (``True``/1 for a mistake).

    Example:
        >>> cov, risk = risk_coverage(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 0]))
        >>> cov.tolist(), [round(r, 3) for r in risk.tolist()]
        ([0.3333333333333333, 0.6666666666666666, 1.0], [0.0, 0.5, 0.333])
    """
    order = torch.argsort(uncertainty.double(), stable=True)
    u, e = uncertainty.double()[order], errors.double()[order]
    n = u.numel()
    _, group, counts = torch.unique_consecutive(u, return_inverse=True, return_counts=True)
    group_err = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, e)
    starts = counts.cumsum(0) - counts
    before = group_err.cumsum(0) - group_err  # errors in the groups kept before
    k = torch.arange(1, n + 1, dtype=torch.float64)
    kept_err = before[group] + (k - starts[group]) * (group_err / counts)[group]
    return k / n, kept_err / k


# --------------------------------------------------------------------------------------
# Checks and the pieces.


def _check_prediction(name: str, pred: Any) -> Prediction:
    if not isinstance(pred, Prediction):
        raise ValueError(
            f"{_OWNER}: {name} must be a gyrodrop.Prediction (from mc_predict or "
            f"subnet_ensemble_predict), got {type(pred).__name__}"
        )
    rows = pred.mean.shape[0] if pred.mean.dim() > 0 else 0
    if rows == 0:
        what = "the OOD set is empty" if name == "ood" else "it has no rows"
        raise ValueError(f"{_OWNER}: {name} must have at least one row, but {what}")
    if pred.kind == "classification" and pred.mean.dim() != 2:
        raise ValueError(
            f"{_OWNER}: {name}.mean must be class probabilities (N, C), "
            f"got shape {tuple(pred.mean.shape)}"
        )
    return pred


def _labels_tensor(owner: str, labels: Any, what: str, device: torch.device | None) -> Tensor:
    """``labels`` as a tensor, or a ``ValueError`` naming ``labels`` (not torch's own
    error for ``None``, strings or ragged lists)."""
    try:
        return torch.as_tensor(labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{owner}: labels must be {what} (a tensor, array or list), got "
            f"{type(labels).__name__} {labels!r:.60}"
        ) from None


def _class_labels(pred: Prediction, labels: Any) -> Tensor:
    y = _labels_tensor(_OWNER, labels, "integer class indices", pred.mean.device)
    n, c = pred.mean.shape
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(
            f"{_OWNER}: labels must be integer class indices, got dtype {y.dtype}; "
            "hint: labels.long()"
        )
    if tuple(y.shape) != (n,):
        raise ValueError(
            f"{_OWNER}: labels must have shape ({n},) (one per row of the prediction), "
            f"got {tuple(y.shape)}"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= c:
        bad = low if low < 0 else high
        raise ValueError(
            f"{_OWNER}: labels must be in [0, {c}) (the prediction's {c} classes), got {bad}"
        )
    return y.long()


def _regression_targets(pred: Prediction, labels: Any) -> Tensor:
    y = _labels_tensor(_OWNER, labels, "regression targets", pred.mean.device).double()
    shape = tuple(pred.mean.shape)
    if tuple(y.shape) != shape:
        if y.numel() == pred.mean.numel() and y.dim() >= 1 and y.shape[0] == shape[0]:
            y = y.reshape(shape)  # (N,) targets of a (N, 1) mean, or the other way
        else:
            raise ValueError(
                f"{_OWNER}: labels must be regression targets shaped like the prediction's "
                f"mean {shape}, got {tuple(y.shape)}"
            )
    if not bool(y.isfinite().all()):
        raise ValueError(f"{_OWNER}: labels (regression targets) must be finite")
    return y


def _ece(conf: Tensor, correct: Tensor, bins: int) -> float:
    index = (conf * bins).long().clamp(0, bins - 1)  # [b/bins, (b+1)/bins), 1.0 in the last
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct.double())
    return float((acc_sum - conf_sum).abs().sum() / conf.numel())


def _ood_metrics(pred: Prediction, ood: Prediction, u_in: Tensor, score: Score) -> dict[str, float]:
    if ood.kind != pred.kind or ood.mean.shape[1:] != pred.mean.shape[1:]:
        raise ValueError(
            f"{_OWNER}: ood must be a prediction of the same model: got a {ood.kind} with "
            f"mean {tuple(ood.mean.shape)} for a {pred.kind} with mean "
            f"{tuple(pred.mean.shape)} (rows may differ, nothing else)"
        )
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    except ImportError as e:  # pragma: no cover - scikit-learn is in the test environment
        raise ImportError(
            f"{_OWNER}: the OOD metrics (ood=...) use scikit-learn, which is not installed; "
            "hint: pip install 'gyrodrop[uncertainty]' (or scikit-learn)"
        ) from e
    u_out = uncertainty_score(ood, score)
    s = torch.cat([u_in, u_out.to(u_in.device)]).cpu().numpy()
    if not all(math.isfinite(v) for v in s.tolist()):
        raise ValueError(f"{_OWNER}: the {score} scores must be finite for the OOD metrics")
    is_ood = [0] * u_in.numel() + [1] * u_out.numel()
    fpr, tpr, _ = roc_curve(is_ood, s, drop_intermediate=False)
    first = int((tpr >= 0.95).nonzero()[0][0])  # tpr reaches 1.0 at the last threshold
    return {
        "ood_auroc": float(roc_auc_score(is_ood, s)),
        "ood_aupr": float(average_precision_score(is_ood, s)),
        "ood_fpr95": float(fpr[first]),
    }
