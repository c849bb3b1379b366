"""Scratch buffers a :class:`~gyrodrop.BlockGyroLinear` may reuse across steps.

Opt-in (``BlockGyroLinear(..., workspace=True)``): the buffers hold the gathered kept
blocks between steps, a memory cost of about ``tau * (1 - p)`` copies of ``W`` per
layer. They are freed when the layer goes to ``eval()`` and never travel with a copy
(``deepcopy``, pickling).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["Workspace", "scratch", "gather_rows"]


class Workspace:
    """Scratch buffers of one module, reused from step to step.

    The gathered blocks of ``W`` and of the activation, and the per-group GEMM results
    before they are scattered, never escape the layer: nothing returned points into
    them. Allocating them afresh every step costs page faults on first touch (on the
    2-core test VM, about a millisecond per fresh megabyte, comparable to the pruned
    GEMMs themselves), so each module keeps them (per thread) and reuses them. They are
    not state: not in ``state_dict``, rebuilt on another device or dtype. Under
    ``torch.compile`` they are not used (the compiler plans memory itself).

    Every :meth:`take` stamps the buffer, so a backward pass can tell whether the
    buffers its forward filled are still untouched (the usual forward, backward,
    forward, ... order) and reuse their contents, or must gather again (another forward
    came first, a second backward through a retained graph, another thread).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], Tensor] = {}
        self._stamps: dict[tuple[str, int], int] = {}
        self._counter = 0

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        key = (name, threading.get_ident())
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or (buf.device != like.device)
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        self._counter += 1
        self._stamps[key] = self._counter
        return buf[:numel].view(shape)

    def stamp(self, name: str) -> tuple[tuple[str, int], int]:
        """The current stamp of this thread's buffer ``name``."""
        key = (name, threading.get_ident())
        return key, self._stamps.get(key, 0)

    def unchanged(self, stamp: tuple[tuple[str, int], int]) -> bool:
        """Whether the buffer was not taken again since ``stamp`` (same thread only)."""
        key, value = stamp
        return key[1] == threading.get_ident() and self._stamps.get(key, 0) == value

    def clear(self) -> None:
        """Free the buffers (they are rebuilt on the next training step)."""
        self._buffers.clear()
        self._stamps.clear()


def scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A workspace buffer, or a fresh tensor without a workspace."""
    if ws is None:
        return like.new_empty(shape)
    return ws.take(name, shape, like)


def gather_rows(
    src: Tensor, index: Tensor, shape: tuple[int, ...], ws: Workspace | None, name: str
) -> Tensor:
    """``src.index_select(0, index)`` (rows of block slices) into a workspace buffer."""
    out = scratch(ws, name, (index.numel(), src.shape[1]), src)
    torch.index_select(src, 0, index, out=out)
    return out.view(shape)
