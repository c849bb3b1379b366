"""Block-wise gyro dropout: :class:`BlockGyroLinear`, a Linear layer with gyro-scheduled
block dropout fused into pruned GEMMs (Lee et al., MLSys 2022, section 4).

One concept per module:

- :mod:`~gyrodrop.blockwise.layer`: the layer (hyperparameters, masks, stepping);
- :mod:`~gyrodrop.blockwise.plan`: the indices of one step (kept blocks per row group);
- :mod:`~gyrodrop.blockwise.kernels`: the torch autograd Functions, called with one plan;
- :mod:`~gyrodrop.blockwise.workspace`: opt-in scratch buffers reused across steps;
- :mod:`~gyrodrop.blockwise.triton_backend`: the Triton kernels (``backend="triton"``).

Finding the ``Dropout -> Linear`` pairs of a model to fuse is surgery
(:func:`gyrodrop.surgery.find_block_sites`).
"""

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
    "PRUNE_MODES",
    "Prune",
    "n_dropped_blocks",
]
