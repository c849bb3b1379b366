"""The regularizer options of the training commands (``--p``, ``--block-size``,
``--num-subnets``) checked by the config the layers are built from, so the command line
refuses what the library refuses, with the library's message naming the option."""

from __future__ import annotations

from typing import Any

from gyrodrop.config import BlockGyroConfig

__all__ = ["LAYER_OPTIONS", "layer_option_error"]


#: The option that sets each field of the layers' configs.
LAYER_OPTIONS = {
    "p": "--p",
    "num_subnets": "--num-subnets",
    "subnets_per_step": "--subnets-per-step",
    "block_size": "--block-size",
}


def layer_option_error(v: dict[str, Any]) -> str | None:
    """Why ``--p``, ``--block-size`` or a ``--num-subnets`` is refused by the config the
    layers are built from (:class:`gyrodrop.config.BlockGyroConfig`), in the library's
    words naming the option, or ``None``."""
    settings = {k: v[k] for k in ("p", "block_size") if v.get(k) is not None}
    sigmas = v.get("num_subnets") or [1]
    try:
        for sigma in sigmas:
            BlockGyroConfig(
                **settings,
                num_subnets=sigma,
                subnets_per_step=1,  # tau against sigma: checked per command below
                steps_per_set=1,
                owner="gyrodrop",
                names=LAYER_OPTIONS,
            )
    except ValueError as e:
        return str(e).removeprefix("gyrodrop: ")
    return None
