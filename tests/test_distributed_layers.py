"""Every gyrodrop layer under two data-parallel processes (CPU, gloo, file store):

- FSDP2 (``fully_shard``) on a model built on the ``meta`` device, materialized with
  ``to_empty()`` and ``reset_parameters()`` (deferred initialization): every gyrodrop
  buffer (stochastic-depth wrappers included) holds what a CPU construction holds, and
  training equals one process on the whole batch;
- ``DropBlock2d`` / ``GyroDropBlock2d`` honour the rank's row offset: the ranks' outputs,
  stitched together, equal one process on the whole batch;
- ``StochasticDepth(per_rank=True)``: ranks 0 and 1 get different decision seeds and
  different decisions (``per_rank=False``: the same).

The two ranks run once, in a module-scoped fixture; each saves what it saw and the
tests compare it with single-process references computed here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gyrodrop
from gyrodrop import distributed as gd
from gyrodrop.dropblock import dropblock2d, gyro_dropblock2d
from gyrodrop.stepping import SteppedModule
from twoproc import run_ranks, save_rank

WORLD = 2
LOCAL = 4
STEPS = 4


class Block(nn.Module):
    """A residual block stochastic-depth surgery wraps (``branch`` / ``shortcut``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


class Net(nn.Module):
    """Every gyrodrop layer: GyroDropBlock2d and DropBlock2d on a conv map, GyroDropout
    (element-wise and by surgery), BlockGyroLinear (fused by surgery), stochastic-depth
    blocks in sample and block mode, a StochasticDepth module on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gdb = gyrodrop.GyroDropBlock2d(0.3, 3, 8, 3, steps_per_set=1, seed=21)
        self.db = gyrodrop.DropBlock2d(0.2, 3, seed=22)
        self.fc1 = nn.Linear(4 * 6 * 6, 32)
        self.drop1 = nn.Dropout(0.5)  # -> BlockGyroLinear with fc2 (apply_block_gyro)
        self.fc2 = nn.Linear(32, 16)
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16))
        self.drop2 = gyrodrop.GyroDropout(0.4, 10, 3, steps_per_set=1, seed=7, schedule_seed=8)
        self.sd = gyrodrop.StochasticDepth(0.3, "sample", seed=9)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.db(self.gdb(torch.relu(self.conv(x))))  # (B, 4, 6, 6)
        h = torch.relu(self.fc2(self.drop1(torch.relu(self.fc1(h.flatten(1))))))
        h = self.drop2(self.blocks(h))
        return self.head(h + self.sd(h))


def build() -> nn.Module:
    """The model with surgery, on the current default device (``meta`` in a
    ``torch.device("meta")`` block)."""
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gyrodrop.apply_block_gyro(
            model, num_subnets=8, subnets_per_step=3, block_size=4, steps_per_set=1, seed=3
        )
        gyrodrop.apply_stochastic_depth(
            model, drop_rate=0.5, drop_distribution="uniform", mode="sample", seed=4
        )
    return model


#: The DropBlock layers whose masks depend on the row of the global batch.
DROPBLOCKS = {
    "dropblock": lambda: gyrodrop.DropBlock2d(0.3, 3, seed=1),
    "dropblock_shared": lambda: gyrodrop.DropBlock2d(0.3, 3, seed=1, shared_channels=True),
    "gyro_dropblock": lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 8, 3, steps_per_set=1, seed=2),
    "gyro_dropblock_realized": lambda: gyrodrop.GyroDropBlock2d(
        0.3, 5, 8, 5, steps_per_set=2, seed=2, scale="realized"
    ),
    "dropblock3d": lambda: gyrodrop.DropBlock3d(0.3, 3, seed=1),
    "gyro_dropblock3d": lambda: gyrodrop.GyroDropBlock3d(0.3, 3, 8, 3, steps_per_set=1, seed=2),
}


def maps(name: str, rows: int = WORLD * LOCAL) -> torch.Tensor:
    """An input of ``rows`` feature maps for the layer ``name`` (2-d or 3-d)."""
    return torch.ones(rows, 3, *((4, 7, 7) if name.endswith("3d") else (9, 9)))


def counters(model: nn.Module) -> dict[str, int]:
    """Every gyrodrop buffer (``step``, ``seed``, ``schedule_seed``) as an int."""
    return {
        f"{name}.{b}": int(getattr(m, b))
        for name, m in model.named_modules()
        if isinstance(m, SteppedModule)
        for b in ("step", "seed", "schedule_seed")
        if hasattr(m, b)
    }


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (
            torch.randn(WORLD * LOCAL, 1, 6, 6, generator=g),
            torch.randint(0, 3, (WORLD * LOCAL,), generator=g),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, rows: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in global_batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().clone()
    return out


def _worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        res: dict = {}
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)

        # 1. FSDP2 with deferred initialization.
        with torch.device("meta"):
            model = build()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        res["counters_after_init"] = counters(model)
        reference = build()  # the same initial weights on every rank (seed 0)
        weights = {
            k: v
            for k, v in reference.state_dict().items()
            if k in dict(reference.named_parameters())
        }
        for name, param in model.named_parameters():
            with torch.no_grad():
                param.copy_(
                    torch.distributed.tensor.distribute_tensor(
                        weights[name], param.device_mesh, param.placements
                    )
                )
        train(model, rows)
        res["fsdp_params"] = full_params(model)
        res["counters_after_training"] = counters(model)

        # 2. DropBlock under data parallelism: each rank draws the masks of its rows.
        x = torch.ones(WORLD * LOCAL, 3, 9, 9)
        for name, make in DROPBLOCKS.items():
            layer = make()
            res[name] = [layer(maps(name)[rows]) for _ in range(3)]
        res["functional"] = [
            dropblock2d(x[rows], 0.3, 3, step=5, seed=1),
            gyro_dropblock2d(x[rows], 0.3, 3, step=5, seed=1, num_subnets=8, subnets_per_step=3),
        ]
        uneven = 5 if rank == 0 else 2
        with gd.batch_layout(uneven):
            start = 0 if rank == 0 else 5
            res["uneven"] = DROPBLOCKS["gyro_dropblock"]()(x[start : start + uneven])

        # 3. Block-mode stochastic depth, per rank or the same on every rank.
        for per_rank in (True, False):
            sd = gyrodrop.StochasticDepth(0.5, "block", seed=3, per_rank=per_rank)
            res[f"per_rank={per_rank}"] = (
                sd.decision_seed(),
                [bool(sd(torch.ones(LOCAL, 2)).any()) for _ in range(32)],
            )
        wrapped = nn.Sequential(Block(4), Block(4))
        gyrodrop.apply_stochastic_depth(
            wrapped, drop_rate=0.5, drop_distribution="uniform", per_rank=True, seed=6
        )
        res["wrapped_seeds"] = [
            m.decision_seed() for m in wrapped.modules() if isinstance(m, gyrodrop.StochasticDepth)
        ]

        save_rank(out, rank, res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("ranks"), WORLD, timeout_s=240)


class TestFullyShardOnMeta:
    def test_every_gyrodrop_buffer_holds_what_a_cpu_construction_holds(self, ranks):
        """(The right value of shared/cases/round3/case_meta_init.py, under FSDP2.)"""
        want = counters(build())
        assert len(want) >= 10
        for res in ranks:
            assert res["counters_after_init"] == want

    def test_training_equals_one_process_on_the_whole_batch(self, ranks):
        reference = build()
        train(reference, slice(None))
        want = full_params(reference)
        for res in ranks:
            for name, value in want.items():
                torch.testing.assert_close(
                    res["fsdp_params"][name], value, atol=1e-5, rtol=0, msg=name
                )
            assert res["counters_after_training"] == counters(reference)


class TestDropBlockRowOffsets:
    """Each rank draws the masks of its own rows of the global batch (not rank 0's)."""

    @pytest.mark.parametrize("name", sorted(DROPBLOCKS))
    def test_stitched_rank_outputs_equal_one_process_on_the_whole_batch(self, ranks, name):
        layer = DROPBLOCKS[name]()
        x = maps(name)
        for step in range(3):
            want = layer(x)
            got = torch.cat([res[name][step] for res in ranks])
            assert torch.equal(got, want), step
        assert not torch.equal(ranks[0][name][0], ranks[1][name][0])

    def test_functionals_honour_the_row_offset_too(self, ranks):
        x = torch.ones(WORLD * LOCAL, 3, 9, 9)
        want = [
            dropblock2d(x, 0.3, 3, step=5, seed=1),
            gyro_dropblock2d(x, 0.3, 3, step=5, seed=1, num_subnets=8, subnets_per_step=3),
        ]
        for i, expected in enumerate(want):
            assert torch.equal(torch.cat([res["functional"][i] for res in ranks]), expected)

    def test_uneven_local_batches_with_batch_layout(self, ranks):
        want = DROPBLOCKS["gyro_dropblock"]()(torch.ones(7, 3, 9, 9))
        assert torch.equal(torch.cat([res["uneven"] for res in ranks]), want)


class TestPerRankStochasticDepth:
    def test_per_rank_gives_each_rank_its_own_decision_seed_and_decisions(self, ranks):
        (seed0, decisions0), (seed1, decisions1) = [res["per_rank=True"] for res in ranks]
        assert seed0 != seed1
        assert decisions0 != decisions1

    def test_the_default_gives_every_rank_the_same_decisions(self, ranks):
        assert ranks[0]["per_rank=False"] == ranks[1]["per_rank=False"]
        assert ranks[0]["per_rank=False"][0] == 3  # the seed itself

    def test_surgery_with_per_rank_gives_each_rank_its_own_seeds(self, ranks):
        seeds0, seeds1 = [res["wrapped_seeds"] for res in ranks]
        assert len(seeds0) == 2 and all(a != b for a, b in zip(seeds0, seeds1, strict=True))
