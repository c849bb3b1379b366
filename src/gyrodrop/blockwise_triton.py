"""Old import path of :mod:`gyrodrop.blockwise.triton_backend` (the same module object,
so ``gyrodrop.blockwise_triton.X`` keeps working, monkeypatching included)."""

import sys

from gyrodrop.blockwise import triton_backend

sys.modules[__name__] = triton_backend
