"""The paper recipe's image transforms (Lee et al., MLSys 2022, following the authors'
code): per-image standardization, the crop side, the test-time center crop and the
training random crop with horizontal flip.

Re-exported by :mod:`gyrodrop.experiments.data`, where they were defined first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["per_image_standardize", "crop_size", "center_crop", "random_crop_flip"]


def per_image_standardize(x: Tensor) -> Tensor:
    """Standardize each example on its own, like TensorFlow's
    ``tf.image.per_image_standardization``: ``(x - mean) / max(std, 1 / sqrt(n))``
    with the mean and (population) standard deviation over the example's ``n``
    values (all channels and pixels).

    Args:
        x: ``(N, ...)``, any float dtype.

    Returns:
        A tensor of ``x``'s shape and dtype; a constant example becomes all zeros.

    Example:
        >>> per_image_standardize(torch.tensor([[0.0, 2.0], [5.0, 5.0]])).tolist()
        [[-1.0, 1.0], [0.0, 0.0]]
    """
    if x.dim() < 2:
        raise ValueError(f"per_image_standardize: x must be (N, ...), got shape {tuple(x.shape)}")
    flat = x.reshape(len(x), -1)
    n = flat.shape[1]
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, correction=0, keepdim=True).clamp_min(1.0 / math.sqrt(n))
    return ((flat - mean) / std).reshape(x.shape)


def crop_size(height: int, width: int) -> int:
    """Side of the square crop of the paper recipe's augmentation: 24 (the authors'
    crop of 32x32 CIFAR; on 28x28 Fashion-MNIST too), or ``3/4`` of the shorter side
    for images of 24 pixels or fewer (e.g. 6 for 8x8 digits).

    Example:
        >>> crop_size(32, 32), crop_size(28, 28), crop_size(8, 8)
        (24, 24, 6)
    """
    side = min(int(height), int(width))
    if side < 1:
        raise ValueError(f"crop_size: image sides must be >= 1, got {height}x{width}")
    return 24 if side > 24 else max(1, 3 * side // 4)


def _check_images(owner: str, x: Tensor, size: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{owner}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not 1 <= size <= min(x.shape[2], x.shape[3]):
        raise ValueError(
            f"{owner}: size must be in [1, {min(x.shape[2], x.shape[3])}] for images of "
            f"{x.shape[2]}x{x.shape[3]}, got {size}"
        )


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of every image (the paper recipe's test-time
    view; when the margin is odd the extra pixel is cut on the bottom/right, as
    TensorFlow's ``resize_image_with_crop_or_pad`` does).

    Args:
        x: ``(N, C, H, W)``.
        size: crop side, ``1 <= size <= min(H, W)``.

    Returns:
        ``(N, C, size, size)``.

    Example:
        >>> center_crop(torch.arange(16.0).reshape(1, 1, 4, 4), 2).flatten().tolist()
        [5.0, 6.0, 9.0, 10.0]
    """
    _check_images("center_crop", x, size)
    top = (x.shape[2] - size) // 2
    left = (x.shape[3] - size) // 2
    return x[:, :, top : top + size, left : left + size]


def random_crop_flip(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Training augmentation of the authors' code: a uniformly placed ``size x size``
    crop of every image, then a horizontal flip with probability 1/2.

    Args:
        x: ``(N, C, H, W)`` on any device.
        size: crop side, ``1 <= size <= min(H, W)``.
        generator: a CPU generator for the offsets and flips (seeded by the caller, so
            runs that share a seed share their augmentations).

    Returns:
        ``(N, C, size, size)`` on ``x``'s device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop_flip(torch.zeros(3, 1, 28, 28), 24, g).shape
        torch.Size([3, 1, 24, 24])
    """
    _check_images("random_crop_flip", x, size)
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    ar = torch.arange(size)
    rows = (top[:, None] + ar).to(x.device)  # (N, size)
    cols = left[:, None] + ar  # (N, size)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices first: (N, size, size, C) -> (N, C, size, size)
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
