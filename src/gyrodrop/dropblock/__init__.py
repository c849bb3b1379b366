"""DropBlock (Ghiasi, Lin, Le, NeurIPS 2018) and gyro DropBlock.

DropBlock zeroes contiguous ``block_size x block_size`` squares of a feature map
instead of independent pixels: neighbouring activations of a conv net are correlated,
so a dropped pixel is recovered from its neighbours, a dropped square is not.

Masks are made without a Python loop over pixels: block *seeds* (top-left corners) are
drawn in the region where a whole block fits, ``(H - bs + 1) x (W - bs + 1)`` (as the
geometric gaps of a Bernoulli process, so the work is proportional to the number of
seeds), then a max-pool of the zero-padded seed map (a dilation by the block, done as
``2 * bs`` shifted ORs) grows every seed into its square. The seed rate is the paper's

    gamma = p / bs**2 * (H * W) / ((H - bs + 1) * (W - bs + 1)),

so the seeded area is ``p`` of the map on average; overlapping squares make the dropped
fraction slightly lower (exactly: :func:`drop_probabilities`). A block larger than the
map is clamped to it.

Scaling (``scale=``):

- ``"inverted"`` (default): a kept pixel is divided by its exact keep probability
  ``(1 - gamma) ** n(i, j)``, where ``n(i, j)`` is the number of block positions that
  cover it, so ``E[output] == input`` pixel by pixel and ``eval()`` needs no rescaling
  (pixels near the border are covered by fewer blocks, dropped less and scaled less).
- ``"realized"``: each mask is scaled by ``numel / kept`` (the paper's count
  normalization), so every mask preserves the sum of a constant input exactly.

Randomness is counter-based (:mod:`gyrodrop.masks`): ``DropBlock2d`` hashes
``(seed, step, global row, channel, position)``, so a data-parallel run draws what one
process with the concatenated batch would, and the ``step``/``seed`` buffers resume the
exact sequence. ``GyroDropBlock2d`` keeps ``num_subnets`` fixed block masks (a pure
function of ``(seed, k)``) and trains them on the gyro schedule: ``subnets_per_step``
contiguous row groups, one mask each, the set kept for ``steps_per_set`` steps.

``DropBlock3d`` and ``GyroDropBlock3d`` do the same over ``(B, C, D, H, W)`` volumes,
dropping ``block_size`` cubes (the seed rate and scaling over three dims).

Layout: :mod:`~gyrodrop.dropblock.layers` (the modules),
:mod:`~gyrodrop.dropblock.functional` (the functional forms and mask builders),
:mod:`gyrodrop.spatial_masks` (the mask arithmetic over 2-d and 3-d maps).
"""

from gyrodrop.dropblock.functional import (
    dropblock2d,
    dropblock3d,
    gyro_dropblock2d,
    gyro_dropblock3d,
    subnet_block_masks,
)
from gyrodrop.dropblock.layers import DropBlock2d, DropBlock3d, GyroDropBlock2d, GyroDropBlock3d
from gyrodrop.spatial_masks import drop_probabilities, seed_rate

__all__ = [
    "DropBlock2d",
    "GyroDropBlock2d",
    "DropBlock3d",
    "GyroDropBlock3d",
    "dropblock2d",
    "gyro_dropblock2d",
    "dropblock3d",
    "gyro_dropblock3d",
    "subnet_block_masks",
    "seed_rate",
    "drop_probabilities",
]
