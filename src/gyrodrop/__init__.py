"""gyrodrop: gyro dropout and its family of structured-dropout regularizers for PyTorch."""

from gyrodrop.blockwise import BlockGyroLinear
from gyrodrop.dropblock import DropBlock2d, DropBlock3d, GyroDropBlock2d, GyroDropBlock3d
from gyrodrop.gyro import GyroDropout
from gyrodrop.schedule import bind_to_optimizer, set_stepping, step
from gyrodrop.stochastic_depth import StochasticDepth, depth_rates
from gyrodrop.surgery import (
    SurgeryWarning,
    apply_block_gyro,
    apply_dropblock,
    apply_gyro_dropout,
    apply_stochastic_depth,
    prune_layers,
    remove_gyro_dropout,
)
from gyrodrop.uncertainty import (
    Prediction,
    fit_temperature,
    mc_predict,
    subnet_ensemble_predict,
    uncertainty_metrics,
)

__version__ = "0.1.0"

__all__ = [
    "GyroDropout",
    "BlockGyroLinear",
    "apply_block_gyro",
    "step",
    "bind_to_optimizer",
    "set_stepping",
    "apply_gyro_dropout",
    "StochasticDepth",
    "apply_stochastic_depth",
    "depth_rates",
    "prune_layers",
    "Prediction",
    "mc_predict",
    "subnet_ensemble_predict",
    "uncertainty_metrics",
    "fit_temperature",
    "DropBlock2d",
    "GyroDropBlock2d",
    "DropBlock3d",
    "GyroDropBlock3d",
    "apply_dropblock",
    "remove_gyro_dropout",
    "SurgeryWarning",
    "__version__",
]
