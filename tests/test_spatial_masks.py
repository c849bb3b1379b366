"""The DropBlock mask arithmetic over 2-d and 3-d maps: seed rate, cover counts,
growth of seeds into blocks, exact drop probabilities."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyrodrop import spatial_masks as sm


class TestSeedRate:
    def test_three_dims_follow_the_paper_formula_over_the_volume(self):
        assert sm.seed_rate(0.1, 3, 8, 10, 12) == pytest.approx(
            0.1 / 27 * (8 * 10 * 12) / (6 * 8 * 10)
        )

    def test_a_block_larger_than_the_volume_is_clamped(self):
        assert sm.seed_rate(0.2, 9, 2, 3, 4) == pytest.approx(0.2)


class TestGrow:
    @given(
        sizes=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
        block_size=st.integers(1, 4),
        data=st.data(),
    )
    @settings(max_examples=40, deadline=None)
    def test_one_seed_grows_into_one_block_at_its_corner(self, sizes, block_size, data):
        b = [min(block_size, n) for n in sizes]
        valid = [n - k + 1 for n, k in zip(sizes, b, strict=True)]
        corner = [data.draw(st.integers(0, v - 1)) for v in valid]
        seeds = torch.zeros(1, *valid, dtype=torch.bool)
        seeds[(0, *corner)] = True
        out = sm.grow(seeds, block_size, sizes)
        ref = torch.zeros(1, *sizes, dtype=torch.bool)
        ref[(0, *(slice(c, c + k) for c, k in zip(corner, b, strict=True)))] = True
        assert torch.equal(out, ref)

    def test_cover_counts_are_the_blocks_covering_each_position(self):
        n = sm.cover_counts(2, 3, 3, 3)
        assert n[0, 0, 0] == 1 and n[1, 1, 1] == 8 and n.sum() == 8 * 8  # 8 blocks of 8


class TestDropProbabilities:
    @pytest.mark.parametrize("sizes", [(12, 12), (6, 12, 12)])
    def test_mean_is_a_little_under_p_for_small_blocks(self, sizes):
        q = sm.drop_probabilities(0.1, 3, *sizes)
        assert q.shape == sizes
        assert 0.08 < q.mean().item() <= 0.1

    def test_the_empirical_rate_matches_over_many_streams(self):
        sizes = (4, 8, 8)
        drop = sm.drop_maps(torch.arange(4000), 11, 0.2, 3, sizes)
        q = sm.drop_probabilities(0.2, 3, *sizes)
        se = math.sqrt(0.25 / 4000)
        assert (drop.float().mean(0) - q).abs().max().item() < 6 * se
