"""Block-wise gyro dropout: :class:`BlockGyroLinear`, a Linear layer with gyro-scheduled
block dropout fused into pruned GEMMs (Lee et al., MLSys 2022, section 4).

One concept per module:

- :mod:`~gyrodrop.blockwise.layer`: the layer (hyperparameters, masks, stepping);
- :mod:`~gyrodrop.blockwise.plan`: the indices of one step (kept blocks per row group);
- :mod:`~gyrodrop.blockwise.kernels`: the torch autograd Functions, called with one plan;
- :mod:`~gyrodrop.blockwise.workspace`: opt-in scratch buffers reused across steps;
- :mod:`~gyrodrop.blockwise.triton_backend`: the Triton kernels (``backend="triton"``).

Finding the ``Dropout -> Linear`` pairs of a model to fuse is surgery
(:func:`gyrodrop.surgery.find_block_sites`; its old path here keeps working).
"""

from typing import Any

from gyrodrop.blockwise.layer import (
    AUTO_PICKS_TRITON,
    BACKENDS,
    PRUNE_MODES,
    Backend,
    BlockGyroLinear,
    Prune,
)
from gyrodrop.blockwise.plan import n_dropped_blocks

__all__ = [
    "AUTO_PICKS_TRITON",
    "BACKENDS",
    "Backend",
    "BlockGyroLinear",
    "BlockSite",
    "PRUNE_MODES",
    "Prune",
    "SURGERY_PRUNE",
    "find_block_sites",
    "n_dropped_blocks",
]

# Old import paths of names that moved up to gyrodrop.surgery (site finding is model
# analysis). Resolved on first use: a lazy alias, not a dependency of this layer.
_MOVED_TO_SURGERY = (
    "BlockSite",
    "find_block_sites",
    "SURGERY_PRUNE",
    "SurgeryPrune",
    "CONV1D_NOT_FUSED",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SURGERY:
        from gyrodrop.surgery import blockwise_sites

        return getattr(blockwise_sites, name)
    raise AttributeError(f"module 'gyrodrop.blockwise' has no attribute {name!r}")
