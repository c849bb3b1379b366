"""Old import path of :mod:`gyrodrop.blockwise.triton_backend`: every name of that
module is reachable here too (``gyrodrop.blockwise_triton.TileConfig``, ...)."""

from typing import Any

from gyrodrop.blockwise import triton_backend
from gyrodrop.blockwise.triton_backend import (
    INTERPRETER_TILES,
    TileConfig,
    TritonPlan,
    build_plan,
    interpreting,
    is_available,
    kernels,
    pruned_linear,
)

__all__ = [
    "INTERPRETER_TILES",
    "TileConfig",
    "TritonPlan",
    "build_plan",
    "interpreting",
    "is_available",
    "kernels",
    "pruned_linear",
]


def __getattr__(name: str) -> Any:
    return getattr(triton_backend, name)
