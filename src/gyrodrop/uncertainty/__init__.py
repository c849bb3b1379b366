"""Predictive uncertainty from the dropout family: Monte-Carlo dropout
(:func:`mc_predict`) and the deterministic ensemble of gyro subnetworks
(:func:`subnet_ensemble_predict`), summarized as a :class:`Prediction`.

- :mod:`~gyrodrop.uncertainty.predict`: the two functions and their summary;
- :mod:`~gyrodrop.uncertainty.metrics`: how good an uncertainty is (calibration,
  selective prediction, out-of-distribution detection; regression NLL / RMSE);
- :mod:`~gyrodrop.uncertainty.calibration`: temperature scaling;
- :mod:`~gyrodrop.uncertainty.passes`: batches, chunks of passes, running sums;
- :mod:`~gyrodrop.uncertainty.hooks`: what is switched on in the model during the
  passes (subnetwork masks, per-sample stochastic depth, seeded random state).
"""

from gyrodrop.uncertainty.calibration import fit_temperature
from gyrodrop.uncertainty.metrics import SCORES, Score, uncertainty_metrics
from gyrodrop.uncertainty.predict import (
    OUTPUTS,
    PAIRINGS,
    Output,
    Pairing,
    Prediction,
    mc_predict,
    subnet_ensemble_predict,
)

__all__ = [
    "Prediction",
    "mc_predict",
    "subnet_ensemble_predict",
    "uncertainty_metrics",
    "fit_temperature",
    "SCORES",
    "Score",
    "PAIRINGS",
    "OUTPUTS",
    "Pairing",
    "Output",
]
