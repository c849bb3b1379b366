"""Rows to subnetworks across processes: two gloo ranks train exactly like one process.

The multi-process scenarios run once, in two processes spawned by a module-scoped
fixture (CPU, gloo, file store); each rank saves what it saw and the tests compare it
with single-process references computed here.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gyrodrop
from gyrodrop import BlockGyroLinear, StochasticDepth
from gyrodrop import distributed as gd
from twoproc import run_ranks, save_rank

WORLD = 2
LOCAL = 4
STEPS = 5
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- models
class ConvGyroNet(nn.Module):
    """Channel-wise gyro dropout after a conv, element-wise after two Linears; tau 3 and 5
    on an 8-row batch give uneven groups ([3, 3, 2] and [2, 2, 2, 1, 1]) that straddle
    the rank boundary; one layer uses the random schedule and realized scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop_c = gyrodrop.GyroDropout(0.3, 8, 3, dims=(1,), steps_per_set=2, seed=11)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.drop1 = gyrodrop.GyroDropout(0.5, 16, 3, steps_per_set=1, seed=5)
        self.fc2 = nn.Linear(16, 12)
        self.drop2 = gyrodrop.GyroDropout(
            0.4, 10, 5, steps_per_set=1, schedule="random", scale="realized", seed=7
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop_c(torch.relu(self.conv(x)))  # (B, 4, 6, 6)
        h = self.drop1(torch.relu(self.fc1(h.flatten(1))))
        h = self.drop2(torch.relu(self.fc2(h)))
        return self.head(h)


class BlockNet(nn.Module):
    """Two BlockGyroLinear layers with uneven groups (tau 3 on 8 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = BlockGyroLinear(
            36,
            32,
            p=0.5,
            num_subnets=8,
            subnets_per_step=3,
            block_size=4,
            steps_per_set=1,
            seed=3,
        )
        self.fc2 = BlockGyroLinear(
            32,
            3,
            p=0.25,
            num_subnets=8,
            subnets_per_step=3,
            block_size=8,
            steps_per_set=2,
            seed=4,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return ConvGyroNet() if kind == "conv" else BlockNet()


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (
            torch.randn(WORLD * LOCAL, 1, 6, 6, generator=g),
            torch.randint(0, 3, (WORLD * LOCAL,), generator=g),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, batches, rows: slice) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])  # mean over local rows
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in gyrodrop.surgery.unwrap_model(model).state_dict().items()
    }


# ----------------------------------------------------------------------------- workers
def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        res: dict = {}
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        batches = global_batches()

        # 1. DDP training of models this file defines.
        for kind in ("conv", "block"):
            ddp = DDP(build(kind))
            train(ddp, batches, rows)
            res[f"ddp_{kind}"] = params(ddp)
            gd.check_lockstep(ddp)  # raises if steps or seeds diverged
            del ddp  # free the reducer while the group lives (gloo teardown deadlock)
        gc.collect()

        # 2. Row windows: equal sizes, uneven sizes (default rule and exact layout), local mode.
        uneven = 4 if rank == 0 else 3
        res["window_equal"] = gd.row_window(LOCAL)
        res["window_uneven_default"] = gd.row_window(uneven)
        with gd.batch_layout(uneven) as sizes:
            res["sizes"] = sizes
            res["window_uneven_exact"] = gd.row_window(uneven)
            drop = gyrodrop.GyroDropout(0.5, 16, 3, steps_per_set=1, seed=9)
            res["uneven_out"] = drop(torch.ones(uneven, 10))
            res["uneven_seq_out"] = gyrodrop.GyroDropout(
                0.5, 16, 3, steps_per_set=1, dims=(-1,), seed=9
            )(torch.ones(uneven * 2, 10))  # (B*T, F) rows: scaled layout
        with gd.independent_ranks():
            res["window_local"] = gd.row_window(LOCAL)
        res["window_after"] = gd.row_window(LOCAL)

        # 3. Step counters: ranks that ran different numbers of steps are re-aligned.
        model = build("conv")
        gyrodrop.step(model, 3 + rank)
        res["synced_to"] = gd.sync_steps(model)
        res["synced_steps"] = [
            int(m.step) for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)
        ]
        gd.check_lockstep(model)
        gyrodrop.step(model, rank)
        try:
            gd.check_lockstep(model)
            res["lockstep_error"] = None
        except RuntimeError as e:
            res["lockstep_error"] = str(e)

        # 4. Stochastic depth: block decisions agree across ranks by construction.
        if StochasticDepth is not None:
            sd = StochasticDepth(0.5, mode="block")
            sd.train()
            decisions = []
            for _ in range(16):
                decisions.append(bool(sd(torch.ones(LOCAL, 3)).abs().sum() > 0))
            res["depth_decisions"] = decisions
            sd = StochasticDepth(0.5, mode="sample", seed=2)
            res["depth_sample"] = [sd(torch.ones(LOCAL, 3)) for _ in range(4)]

        save_rank(out, rank, res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD, timeout_s=180)


# ----------------------------------------------------------------------------- pure rules
class TestWindowFor:
    def test_equal_sizes_place_rank_r_at_r_times_b(self):
        assert [gd.window_for(r, 3, 5) for r in range(3)] == [(0, 15), (5, 15), (10, 15)]

    def test_declared_sizes_give_the_exact_uneven_layout(self):
        sizes = [4, 4, 1]
        assert [gd.window_for(r, 3, s, sizes) for r, s in enumerate(sizes)] == [
            (0, 9),
            (4, 9),
            (8, 9),
        ]

    def test_multiple_of_declared_size_scales_the_layout(self):
        assert gd.window_for(1, 2, 3 * 5, [4, 5]) == (12, 27)

    def test_rows_that_match_no_declared_size_are_rejected(self):
        with pytest.raises(ValueError, match="declared local batch is 4"):
            gd.window_for(0, 2, 5, [4, 4])

    @pytest.mark.parametrize("bad", [[4], [4, -1], [4, 1.5], "44"])
    def test_malformed_sizes_are_rejected(self, bad):
        with pytest.raises(ValueError, match="window_for: sizes"):
            gd.window_for(0, 2, 4, bad)

    def test_rank_outside_world_is_rejected(self):
        with pytest.raises(ValueError, match="rank=2, world=2"):
            gd.window_for(2, 2, 4)


class TestLocalGroupCounts:
    @given(
        sizes=st.lists(st.integers(0, 9), min_size=1, max_size=4),
        groups=st.integers(1, 12),
    )
    @settings(max_examples=150, deadline=None)
    def test_rank_windows_partition_the_single_process_groups(self, sizes, groups):
        world = len(sizes)
        total = [0] * groups
        for r, s in enumerate(sizes):
            start, global_batch = gd.window_for(r, world, s, sizes)
            counts = gd.local_group_counts(start, s, global_batch, groups)
            assert sum(counts) == s
            total = [a + b for a, b in zip(total, counts, strict=True)]
        assert total == gd.group_sizes(sum(sizes), groups)


class TestRowWindowOneProcess:
    def test_without_process_group_the_window_is_the_whole_batch(self):
        assert gd.row_window(7) == (0, 7)

    def test_batch_layout_without_process_group_changes_nothing(self):
        with gd.batch_layout(5) as sizes:
            assert sizes is None and gd.row_window(5) == (0, 5)
        with gd.batch_layout(sizes=[3, 2]):
            assert gd.row_window(3) == (0, 3)

    def test_batch_layout_needs_exactly_one_source(self):
        with pytest.raises(ValueError, match="exactly one"), gd.batch_layout():
            pass
        with pytest.raises(ValueError, match="exactly one"), gd.batch_layout(3, sizes=[3]):
            pass

    def test_row_mode_is_validated_and_scoped(self):
        with pytest.raises(ValueError, match="set_row_mode: mode must be one of"):
            gd.set_row_mode("none")
        assert gd.get_row_mode() == "global"
        with gd.independent_ranks():
            assert gd.get_row_mode() == "local"
        assert gd.get_row_mode() == "global"
        gd.set_row_mode("local")
        try:
            assert gd.get_row_mode() == "local"
        finally:
            gd.set_row_mode("global")

    def test_sync_and_check_are_no_ops_in_one_process(self):
        model = build("conv")
        gyrodrop.step(model, 2)
        gd.check_lockstep(model)
        assert gd.sync_steps(model) == 2


# ----------------------------------------------------------------------------- two ranks
class TestTwoRanksMatchOneProcess:
    def test_ddp_parameters_equal_single_process_on_global_batch(self, ranks):
        reference = build("conv")
        train(reference, global_batches(), slice(None))  # mean over the 8 global rows
        want = params(reference)
        for res in ranks:
            got = res["ddp_conv"]
            for name, value in want.items():
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=name)
        # the schedules really moved: every layer ran STEPS steps
        assert int(want["drop1.step"]) == STEPS

    def test_ddp_block_gyro_linear_equals_single_process(self, ranks):
        reference = build("block")
        train(reference, global_batches(), slice(None))
        for res in ranks:
            for name, value in params(reference).items():
                torch.testing.assert_close(res["ddp_block"][name], value, atol=1e-5, rtol=0)


class TestTwoRankRowWindows:
    def test_equal_local_batches_tile_the_global_batch(self, ranks):
        assert [r["window_equal"] for r in ranks] == [(0, 8), (4, 8)]

    def test_uneven_default_rule_assumes_equal_sizes(self, ranks):
        assert [r["window_uneven_default"] for r in ranks] == [(0, 8), (3, 6)]

    def test_batch_layout_gathers_sizes_and_places_rows_exactly(self, ranks):
        assert [r["sizes"] for r in ranks] == [(4, 3), (4, 3)]
        assert [r["window_uneven_exact"] for r in ranks] == [(0, 7), (4, 7)]

    def test_uneven_exact_masks_equal_single_process_masks(self, ranks):
        drop = gyrodrop.GyroDropout(0.5, 16, 3, steps_per_set=1, seed=9)
        want = drop(torch.ones(7, 10))
        assert torch.equal(torch.cat([r["uneven_out"] for r in ranks]), want)
        seq = gyrodrop.GyroDropout(0.5, 16, 3, steps_per_set=1, dims=(-1,), seed=9)
        assert torch.equal(torch.cat([r["uneven_seq_out"] for r in ranks]), seq(torch.ones(14, 10)))

    def test_independent_ranks_group_only_their_own_rows_in_scope(self, ranks):
        assert [r["window_local"] for r in ranks] == [(0, 4), (0, 4)]
        assert [r["window_after"] for r in ranks] == [(0, 8), (4, 8)]


class TestTwoRankStepCounters:
    def test_sync_steps_takes_the_maximum_over_ranks(self, ranks):
        for res in ranks:
            assert res["synced_to"] == 4
            assert set(res["synced_steps"]) == {4}

    def test_check_lockstep_reports_diverged_counters(self, ranks):
        for res in ranks:
            assert (
                res["lockstep_error"] is not None and "differs from rank 0" in res["lockstep_error"]
            )


class TestTwoRankStochasticDepth:
    def test_block_decisions_agree_across_ranks(self, ranks):
        decisions = [r["depth_decisions"] for r in ranks]
        assert decisions[0] == decisions[1]
        assert 0 < sum(decisions[0]) < len(decisions[0])  # both outcomes occurred

    def test_sample_mode_equals_single_process_rows(self, ranks):
        sd = StochasticDepth(0.5, mode="sample", seed=2)
        for step in range(4):
            want = sd(torch.ones(WORLD * LOCAL, 3))
            assert torch.equal(torch.cat([r["depth_sample"][step] for r in ranks]), want)


# ----------------------------------------------------------------------------- example
class TestDDPExample:
    def test_torchrun_example_runs_on_two_cpu_ranks(self, tmp_path):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "ddp_train.py"),
            "--quick",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "rank 1/2" in proc.stdout and "rank 0/2" in proc.stdout
        assert "test accuracy" in proc.stdout
