"""Golden mask bits of gyrodrop 0.1.0: a checkpoint must resume into the same masks.

Every random choice in gyrodrop is a pure function of integers (seed, step, subnetwork
id, row): these tests pin the bits that version 0.1.0 produces for chosen inputs, as
literals. A refactor that changes any of them changes what a saved checkpoint resumes
into (or what a rerun of a published experiment trains), so it fails here.

The literals were generated once from the 0.1.0 code with ``python tests/test_golden.py``
(which prints the observed values in the layout of ``EXPECTED``). Do not regenerate them
to make a failure go away: a change of mask bits is a breaking change that needs a
version bump and a changelog entry.

Packed bits are ``numpy.packbits`` of the flattened bool tensor (row-major, first
element in the most significant bit), written as hex.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import gyrodrop
from gyrodrop import masks
from gyrodrop.schedule import SubnetSchedule
from gyrodrop.stochastic_depth import stochastic_depth


def _hex(bits: torch.Tensor) -> str:
    """Packed bits of a bool tensor (flattened row-major) as a hex string."""
    return np.packbits(bits.flatten().to(torch.uint8).numpy()).tobytes().hex()


def _values(t: torch.Tensor) -> list[float]:
    """The distinct values of ``t``, rounded to 6 decimals (scales)."""
    return sorted({round(float(v), 6) for v in t.flatten().tolist()})


# --------------------------------------------------------------------------------------
# What is pinned: each case is a function returning a JSON-like value.


def _hash_cases() -> dict[str, Any]:
    x = torch.tensor([0, 1, 2, 0x12345678, 2**31, 2**32 - 1], dtype=torch.int64)
    grid_base = torch.tensor([[0], [7], [2**32 - 1]], dtype=torch.int64)
    return {
        "hash_u32": masks.hash_u32(x).tolist(),
        "mix_keys": [
            masks.mix_keys(0),
            masks.mix_keys(1),
            masks.mix_keys(0, 0x11),
            masks.mix_keys(12345, 0x33, 7),
            masks.mix_keys(2**63 - 1, 0x55, 1, 10**6),
            masks.mix_keys(2**40 + 3, 2),
        ],
        "drop_threshold": [masks.drop_threshold(p) for p in (0.0, 0.1, 0.25, 0.5, 1 / 3, 0.9, 1.0)],
        "hash_grid_int": masks.hash_grid(99, torch.arange(5, dtype=torch.int64)).tolist(),
        "hash_grid_rows": masks.hash_grid(grid_base, torch.arange(4, dtype=torch.int64)).tolist(),
        "perm": [
            masks.seeded_permutation(0, masks.TAG_PERM, 0, 16).tolist(),
            masks.seeded_permutation(5, masks.TAG_PERM, 3, 16).tolist(),
            masks.seeded_permutation(5, masks.TAG_RANDOM_SET, 3, 10).tolist(),
        ],
        "element_keep": [
            _hex(masks.element_keep_mask(0, torch.arange(4), 40, 0.5)),
            _hex(masks.element_keep_mask(17, torch.tensor([3, 255, 0]), 64, 0.1)),
            _hex(masks.element_keep_mask(2**40, torch.tensor([1, 2]), 37, 0.75)),
        ],
        "block_keep": [
            _hex(masks.block_keep_mask(0, torch.arange(4), 8, 4)),
            _hex(masks.block_keep_mask(3, torch.tensor([9, 1, 100]), 32, 5)),
            _hex(masks.block_keep_mask(11, torch.arange(3), 5, 0)),
        ],
    }


def _schedule_cases() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sched, seed, steps in [
        (
            "consecutive_16_4_3_s0",
            SubnetSchedule(16, 4, 3, "consecutive"),
            0,
            [0, 2, 3, 11, 12, 40],
        ),
        ("consecutive_10_3_1_s7", SubnetSchedule(10, 3, 1, "consecutive"), 7, [0, 1, 3, 4, 9, 33]),
        ("random_16_4_s0", SubnetSchedule(16, 4, 5, "random"), 0, [0, 1, 2, 7, 1000]),
        ("random_256_16_s42", SubnetSchedule(256, 16, 1, "random"), 42, [0, 99999]),
    ]:
        out[name] = [sched.at_step(seed, s).tolist() for s in steps]
    drop = gyrodrop.GyroDropout(0.5, 32, 4, steps_per_set=2, seed=3, schedule_seed=9)
    out["module_active_subnets"] = [drop.active_subnets(s).tolist() for s in (0, 1, 2, 17)]
    return out


def _gyro_forward(seed_steps: int, **kw: Any) -> torch.Tensor:
    """A GyroDropout's output on ones at step ``seed_steps``."""
    shape = kw.pop("shape")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drop = gyrodrop.GyroDropout(**kw)
    gyrodrop.step(drop, seed_steps)
    return drop(torch.ones(shape))


def _gyro_cases() -> dict[str, Any]:
    configs: dict[str, tuple[int, dict[str, Any]]] = {
        "default_p05": (
            0,
            {
                "p": 0.5,
                "num_subnets": 16,
                "subnets_per_step": 4,
                "steps_per_set": 1,
                "shape": (8, 12),
            },
        ),
        "p02_seed5_step7": (
            7,
            {
                "p": 0.2,
                "num_subnets": 8,
                "subnets_per_step": 2,
                "steps_per_set": 3,
                "seed": 5,
                "shape": (6, 20),
            },
        ),
        "p07_uneven_batch": (
            3,
            {
                "p": 0.7,
                "num_subnets": 12,
                "subnets_per_step": 3,
                "steps_per_set": 2,
                "seed": 1,
                "shape": (7, 10),
            },
        ),
        "dims_last_seq": (
            2,
            {
                "p": 0.5,
                "num_subnets": 8,
                "subnets_per_step": 2,
                "steps_per_set": 1,
                "seed": 2,
                "dims": (-1,),
                "shape": (4, 3, 8),
            },
        ),
        "dims_channel": (
            5,
            {
                "p": 0.3,
                "num_subnets": 8,
                "subnets_per_step": 2,
                "steps_per_set": 1,
                "seed": 4,
                "dims": (1,),
                "shape": (4, 6, 2, 2),
            },
        ),
        "random_schedule": (
            11,
            {
                "p": 0.5,
                "num_subnets": 16,
                "subnets_per_step": 4,
                "steps_per_set": 1,
                "seed": 8,
                "schedule": "random",
                "shape": (4, 16),
            },
        ),
        "realized_scale": (
            1,
            {
                "p": 0.4,
                "num_subnets": 8,
                "subnets_per_step": 2,
                "steps_per_set": 1,
                "seed": 6,
                "scale": "realized",
                "shape": (2, 15),
            },
        ),
        "schedule_seed": (
            4,
            {
                "p": 0.5,
                "num_subnets": 8,
                "subnets_per_step": 2,
                "steps_per_set": 2,
                "seed": 6,
                "schedule_seed": 77,
                "shape": (4, 9),
            },
        ),
        "total_steps": (
            250,
            {
                "p": 0.5,
                "num_subnets": 64,
                "subnets_per_step": 4,
                "total_steps": 1000,
                "seed": 123,
                "shape": (4, 10),
            },
        ),
    }
    out: dict[str, Any] = {}
    for name, (at, kw) in configs.items():
        y = _gyro_forward(at, **kw)
        out[name] = [_hex(y != 0), _values(y)]
    m = gyrodrop.GyroDropout(0.25, 64, 4, steps_per_set=1, seed=31)
    out["subnet_mask"] = [_hex(m.subnet_mask(k, torch.ones(1, 24)) != 0) for k in (0, 1, 63)]
    return out


def _block_layer(prune: str, **kw: Any) -> gyrodrop.BlockGyroLinear:
    layer = gyrodrop.BlockGyroLinear(48, 48, bias=False, prune=prune, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(48))
    return layer


def _block_cases() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prune in ("input", "output"):
        kw = {
            "p": 0.5,
            "num_subnets": 16,
            "subnets_per_step": 2,
            "block_size": 8,
            "steps_per_set": 2,
            "seed": 3,
        }
        layer = _block_layer(prune, **kw)
        out[f"{prune}_subnet_mask"] = [_hex(layer.subnet_mask(k) != 0) for k in (0, 5, 15)]
        out[f"{prune}_block_masks"] = [_hex(layer.block_masks(s)) for s in (0, 2, 9)]
        gyrodrop.step(layer, 4)
        y = layer(torch.ones(4, 48))  # identity weight: the output is the dense mask
        out[f"{prune}_forward"] = [_hex(y != 0), _values(y)]
    layer = _block_layer(
        "input", p=0.25, num_subnets=8, subnets_per_step=4, block_size=5, steps_per_set=1, seed=9
    )
    out["uneven_blocks_p025"] = [_hex(layer.subnet_mask(k) != 0) for k in range(3)]
    y = layer(torch.ones(6, 48))
    out["uneven_blocks_forward"] = [_hex(y != 0), _values(y)]
    layer = _block_layer(
        "input",
        p=0.5,
        num_subnets=8,
        subnets_per_step=2,
        block_size=4,
        steps_per_set=1,
        seed=2,
        schedule="random",
    )
    out["random_block_masks"] = [_hex(layer.block_masks(s)) for s in (0, 1, 50)]
    return out


def _depth_cases() -> dict[str, Any]:
    out: dict[str, Any] = {}
    ones = torch.ones(1, 1)
    for p, seed in [(0.5, 0), (0.2, 7), (0.8, 123)]:
        sd = gyrodrop.StochasticDepth(p, "block", seed=seed)
        kept = torch.stack([sd(ones).flatten()[0] != 0 for _ in range(64)])
        out[f"block_p{p}_s{seed}"] = _hex(kept)
    sd = gyrodrop.StochasticDepth(0.5, "block", seed=4, warmup_steps=8)
    ys = [float(sd(ones)) for _ in range(12)]
    out["block_warmup"] = [round(y, 6) for y in ys]
    sd = gyrodrop.StochasticDepth(0.5, "block", seed=4, warmup_steps=8)
    out["block_warmup_draw_scale"] = [round(sd.draw_scale(), 6) for _ in range(12)]
    for p, seed in [(0.5, 0), (0.3, 9)]:
        sd = gyrodrop.StochasticDepth(p, "sample", seed=seed)
        out[f"sample_p{p}_s{seed}"] = [_hex(sd(torch.ones(24, 2))[:, 0] != 0) for _ in range(3)]
    sd = gyrodrop.StochasticDepth(0.6, "sample", seed=1, warmup_steps=4)
    out["sample_warmup"] = [_values(sd(torch.ones(16, 1))) for _ in range(5)]
    sd = gyrodrop.StochasticDepth(0.6, "sample", seed=1, warmup_steps=4)
    out["sample_warmup_bits"] = [_hex(sd(torch.ones(16, 1)) != 0) for _ in range(5)]
    out["functional"] = [
        _hex(stochastic_depth(torch.ones(10, 1), 0.5, "sample", seed=3, step=s) != 0)
        for s in (0, 1, 1000)
    ] + [
        round(float(stochastic_depth(torch.ones(1), 0.25, "block", seed=5, step=s)), 6)
        for s in range(8)
    ]
    return out


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "hash": _hash_cases,
    "schedule": _schedule_cases,
    "gyro": _gyro_cases,
    "block": _block_cases,
    "depth": _depth_cases,
}

# Generated once from gyrodrop 0.1.0 (see the module docstring).
EXPECTED: dict[str, dict[str, Any]] = {
    "hash": {
        "hash_u32": [0, 1753845952, 3507691905, 4125564054, 3427483940, 1734902346],
        "mix_keys": [33350994, 2672842292, 481300376, 3041991680, 3709186267, 2981051363],
        "drop_threshold": [
            0,
            429496730,
            1073741824,
            2147483648,
            1431655765,
            3865470566,
            4294967296,
        ],
        "hash_grid_int": [4069095417, 3006016897, 2334732362, 1471783349, 852228750],
        "hash_grid_rows": [
            [33350994, 2988215890, 3756008032, 1806320667],
            [1004661882, 3678268668, 1180732264, 3455162173],
            [1259046617, 289053420, 1799689297, 2964374252],
        ],
        "perm": [
            [10, 12, 4, 9, 13, 7, 11, 1, 6, 14, 8, 2, 3, 5, 0, 15],
            [7, 15, 9, 13, 4, 10, 11, 5, 2, 0, 8, 6, 1, 12, 14, 3],
            [7, 8, 6, 1, 0, 4, 2, 3, 9, 5],
        ],
        "element_keep": [
            "ab748c96f756f6ac5f86319d78b348658d0712f1",
            "dffefb7ffdffd7fffffffff51fdfbffffef3fbfdffff7dff",
            "0800a099500018401880",
        ],
        "block_keep": ["8d3ca3aa", "7ffdffe9ffbdfdeeffb6effd", "fffe"],
    },
    "schedule": {
        "consecutive_16_4_3_s0": [
            [10, 12, 4, 9],
            [10, 12, 4, 9],
            [13, 7, 11, 1],
            [3, 5, 0, 15],
            [5, 9, 6, 1],
            [13, 10, 6, 1],
        ],
        "consecutive_10_3_1_s7": [[2, 7, 1], [6, 8, 5], [3, 5, 3], [4, 6, 9], [6, 1, 4], [2, 2, 0]],
        "random_16_4_s0": [
            [6, 10, 4, 1],
            [5, 6, 10, 1],
            [0, 15, 13, 11],
            [0, 5, 4, 1],
            [3, 1, 7, 5],
        ],
        "random_256_16_s42": [
            [95, 173, 147, 80, 17, 71, 226, 182, 121, 57, 81, 75, 129, 209, 253, 56],
            [133, 34, 32, 16, 236, 121, 246, 130, 209, 100, 77, 119, 53, 42, 132, 237],
        ],
        "module_active_subnets": [
            [16, 14, 26, 17],
            [16, 14, 26, 17],
            [25, 28, 4, 1],
            [9, 17, 26, 5],
        ],
    },
    "gyro": {
        "default_p05": ["7df7df0140144a14a1bf8bf8", [0.0, 2.0]],
        "p02_seed5_step7": ["ffdffffdffffdff7ffed7ffed7ffed", [0.0, 1.25]],
        "p07_uneven_batch": ["50d4350c1004222888", [0.0, 3.333333]],
        "dims_last_seq": ["2b2b2b2b2b2bbebebebebebe", [0.0, 2.0]],
        "dims_channel": ["0f0f0f0f0f0ff0fffff0ffff", [0.0, 1.428571]],
        "random_schedule": ["807082cf7590f166", [0.0, 2.0]],
        "realized_scale": ["effd6ebc", [0.0, 1.153846, 1.363636]],
        "schedule_seed": ["edf6f0f870", [0.0, 2.0]],
        "total_steps": ["57bd6a12ec", [0.0, 2.0]],
        "subnet_mask": ["ff11a6", "a9f7ff", "ffaf9d"],
    },
    "block": {
        "input_subnet_mask": ["0000ffff00ff", "ff00ff0000ff", "00ffffff0000"],
        "input_block_masks": ["1e90", "aa90", "4cb0"],
        "input_forward": ["ff0000ffff00ff0000ffff000000ffff00ff0000ffff00ff", [0.0, 2.0]],
        "output_subnet_mask": ["0000ffff00ff", "ff00ff0000ff", "00ffffff0000"],
        "output_block_masks": ["1e90", "aa90", "4cb0"],
        "output_forward": ["ff0000ffff00ff0000ffff000000ffff00ff0000ffff00ff", [0.0, 2.0]],
        "uneven_blocks_p025": ["ffc1ff83ff07", "07ffff83ff07", "ffffff801f07"],
        "uneven_blocks_forward": [
            "ffc1ff83fff8ffc1ff83fff807ffff83ff0707ffff83ff07ffc00f83ffffffc00fffe0ff",
            [0.0, 1.428571],
        ],
        "random_block_masks": ["1d5656", "ae16d2", "6e8e49"],
    },
    "depth": {
        "block_p0.5_s0": "42fab3422009c0fa",
        "block_p0.2_s7": "d895fb9dfbdf5e7e",
        "block_p0.8_s123": "044a08260184a8c0",
        "block_warmup": [
            1.0,
            1.066667,
            1.142857,
            1.230769,
            1.333333,
            1.454545,
            1.6,
            0.0,
            2.0,
            2.0,
            0.0,
            2.0,
        ],
        "block_warmup_draw_scale": [
            1.0,
            1.066667,
            1.142857,
            1.230769,
            1.333333,
            1.454545,
            1.6,
            0.0,
            2.0,
            2.0,
            0.0,
            2.0,
        ],
        "sample_p0.5_s0": ["f05b1a", "5476dc", "796ad9"],
        "sample_p0.3_s9": ["6fb4e8", "767dfd", "eebbf7"],
        "sample_warmup": [[1.0], [0.0, 1.176471], [0.0, 1.428571], [0.0, 1.818182], [0.0, 2.5]],
        "sample_warmup_bits": ["ffff", "ffbf", "edbd", "4bf3", "6681"],
        "functional": [
            "c580",
            "be80",
            "9cc0",
            0.0,
            0.0,
            1.333333,
            1.333333,
            1.333333,
            1.333333,
            1.333333,
            1.333333,
        ],
    },
}


@pytest.mark.parametrize("group", sorted(CASES))
def test_mask_bits_match_version_0_1_0(group: str) -> None:
    observed = CASES[group]()
    expected = EXPECTED[group]
    assert observed.keys() == expected.keys()
    for name, value in expected.items():
        assert observed[name] == value, f"{group}/{name} changed"


if __name__ == "__main__":
    import pprint

    pprint.pprint({g: f() for g, f in CASES.items()}, width=96, compact=True, sort_dicts=False)
