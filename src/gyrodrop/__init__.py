"""gyrodrop: gyro dropout and its family of structured-dropout regularizers for PyTorch."""

from gyrodrop.gyro import GyroDropout
from gyrodrop.schedule import step
from gyrodrop.surgery import apply_gyro_dropout

__version__ = "0.1.0"

__all__ = ["GyroDropout", "step", "apply_gyro_dropout", "__version__"]
