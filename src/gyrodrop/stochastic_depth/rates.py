"""Per-block drop rates of a model built of stages (:func:`depth_rates`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from gyrodrop._validation import check_bool, check_choice, check_int, check_p

__all__ = ["depth_rates", "RateDistribution", "RATE_DISTRIBUTIONS"]

#: How a drop rate spreads over depth in :func:`depth_rates`.
RateDistribution = Literal["linear", "uniform"]
RATE_DISTRIBUTIONS: tuple[RateDistribution, ...] = ("linear", "uniform")


def depth_rates(
    drop_rate: float,
    depths: int | Sequence[int],
    distribution: RateDistribution = "linear",
    stagewise: bool = False,
) -> list[list[float]]:
    """The stochastic-depth rate of every block of a model made of stages, per stage.

    timm's ``calculate_drop_path_rates`` convention (what ViT, Swin, ConvNeXt and the
    other timm models build their ``DropPath`` rates with):

    - ``distribution="linear"``, ``stagewise=False``: the rate grows linearly from 0 at
      the first block to ``drop_rate`` at the last, over all ``N`` blocks of all stages:
      block ``j`` (0-based, counted across stages) gets ``drop_rate * j / (N - 1)``;
    - ``distribution="linear"``, ``stagewise=True``: one rate per stage, growing
      linearly from 0 at the first stage to ``drop_rate`` at the last (stage ``s`` of
      ``S``: ``drop_rate * s / (S - 1)``), the same for every block of the stage;
    - ``distribution="uniform"``: every block ``drop_rate``.

    A single block (or a single stage with ``stagewise=True``) gets 0 under
    ``"linear"``, as in timm. This differs from ``apply_stochastic_depth``'s own
    ``drop_distribution="linear"`` (Huang et al.: block ``i`` of ``L`` gets
    ``drop_rate * (i + 1) / L``, so the first block is dropped too); pass the result of
    this function as its ``drop_rate`` to use timm's rule there.

    Args:
        drop_rate: rate of the last block, in ``[0, 1)``.
        depths: the number of blocks of each stage (``[3, 3, 9, 3]`` for ConvNeXt-T;
            a 1-d tensor or NumPy array of ints is taken as its list),
            or one ``int`` for a model of a single stage; each at least 1.
        distribution: ``"linear"`` or ``"uniform"``.
        stagewise: one rate per stage (``"linear"`` only changes).

    Returns:
        ``rates[s][i]``: the rate of block ``i`` of stage ``s`` (a list per stage, one
        list for an ``int`` ``depths``). ``sum(rates, [])`` is the flat per-block list,
        which :func:`gyrodrop.apply_stochastic_depth` also accepts as is.

    Raises:
        ValueError: a bad argument, named, e.g.
            ``"depth_rates: depths[1] must be >= 1, got 0"``.

    Example:
        >>> import gyrodrop
        >>> gyrodrop.depth_rates(0.3, [2, 2])
        [[0.0, 0.1], [0.2, 0.3]]
        >>> gyrodrop.depth_rates(0.3, [2, 2], stagewise=True)
        [[0.0, 0.0], [0.3, 0.3]]
        >>> gyrodrop.depth_rates(0.1, 3, distribution="uniform")
        [[0.1, 0.1, 0.1]]
    """
    owner = "depth_rates"
    rate = check_p(owner, drop_rate, "drop_rate")
    stages = _check_depths(owner, depths)
    check_choice(owner, "distribution", distribution, RATE_DISTRIBUTIONS)
    check_bool(owner, "stagewise", stagewise)
    if distribution == "uniform":
        return [[rate] * depth for depth in stages]
    if stagewise:
        last = len(stages) - 1
        return [[_ramp(rate, s, last)] * depth for s, depth in enumerate(stages)]
    last = sum(stages) - 1
    out: list[list[float]] = []
    start = 0
    for depth in stages:
        out.append([_ramp(rate, j, last) for j in range(start, start + depth)])
        start += depth
    return out


def _ramp(rate: float, index: int, last: int) -> float:
    """``rate * index / last`` (0 when there is one item), rounded so that the
    endpoints are exact and equal steps print as short decimals."""
    return 0.0 if last == 0 else round(rate * index / last, 12)


def _check_depths(owner: str, depths: Any) -> list[int]:
    if getattr(depths, "ndim", None) == 1 and callable(getattr(depths, "tolist", None)):
        depths = depths.tolist()  # a 1-d tensor or NumPy array: its Python values
    if isinstance(depths, int) and not isinstance(depths, bool):
        return [check_int(owner, "depths", depths, 1)]
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths:
        raise ValueError(
            f"{owner}: depths must be an int or a non-empty sequence of ints (blocks per "
            f"stage), got {depths!r}"
        )
    return [check_int(owner, f"depths[{i}]", d, 1) for i, d in enumerate(depths)]
