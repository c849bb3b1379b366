"""Model surgery: swap gyrodrop regularizers into an existing model, in place.

Surgery is a policy: a mapping from module type to a function that receives the
module and its index among the matches (so settings can depend on depth) and returns
the replacement. Wrappers (DistributedDataParallel, DataParallel, ``torch.compile``)
are unwrapped first; the replacement goes on the replaced module's device.

Surgery is all-or-nothing: every replacement is built (and validated) before the
first one is swapped in, so a refused model (one layer with ``p=1.0``, say) is left
exactly as it was. Its notices are :class:`SurgeryWarning` (filter them by category).

One module per method, and the model analysis each needs:

- :mod:`~gyrodrop.surgery.gyro`: :func:`apply_gyro_dropout`, :func:`remove_gyro_dropout`;
- :mod:`~gyrodrop.surgery.blockwise` and :mod:`~gyrodrop.surgery.blockwise_sites`:
  :func:`apply_block_gyro` and the ``Dropout``/``Linear`` pairs it fuses;
- :mod:`~gyrodrop.surgery.stochastic_depth` and :mod:`~gyrodrop.surgery.residual`:
  :func:`apply_stochastic_depth` and the residual blocks / layers it wraps;
- :mod:`~gyrodrop.surgery.dropblock`: :func:`apply_dropblock`;
- :mod:`~gyrodrop.surgery.prune`: :func:`prune_layers`, the shallower plain model
  kept after training a layer stack with stochastic depth.
"""

from gyrodrop._modules import Policy, replace_modules, unwrap_model
from gyrodrop.blockwise import BlockGyroLinear
from gyrodrop.masks import layer_seed
from gyrodrop.surgery.blockwise import apply_block_gyro
from gyrodrop.surgery.blockwise_sites import SURGERY_PRUNE, BlockSite, find_block_sites
from gyrodrop.surgery.common import SurgeryWarning
from gyrodrop.surgery.dropblock import apply_dropblock
from gyrodrop.surgery.gyro import (
    SEQUENCE_DIMS,
    apply_gyro_dropout,
    builtin_dropouts,
    remove_gyro_dropout,
)
from gyrodrop.surgery.prune import prune_layers
from gyrodrop.surgery.residual import find_residual_blocks, layer_list_candidates
from gyrodrop.surgery.stochastic_depth import (
    DROP_DISTRIBUTIONS,
    apply_stochastic_depth,
    remove_stochastic_depth,
    replace_drop_paths,
)

__all__ = [
    "apply_gyro_dropout",
    "apply_stochastic_depth",
    "apply_block_gyro",
    "apply_dropblock",
    "remove_gyro_dropout",
    "remove_stochastic_depth",
    "replace_drop_paths",
    "prune_layers",
    "find_block_sites",
    "find_residual_blocks",
    "layer_list_candidates",
    "builtin_dropouts",
    "unwrap_model",
    "replace_modules",
    "layer_seed",
    "Policy",
    "BlockSite",
    "BlockGyroLinear",
    "SurgeryWarning",
    "SURGERY_PRUNE",
    "DROP_DISTRIBUTIONS",
    "SEQUENCE_DIMS",
]
