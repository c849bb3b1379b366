"""Properties of the counter-based subnetwork masks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyrodrop import masks
from statcheck import assert_rate


class TestHashU32:
    def test_values_stay_in_32_bits_for_extreme_inputs(self):
        x = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
        h = masks.hash_u32(x)
        assert bool(((h >= 0) & (h < 2**32)).all())

    def test_is_a_bijection_on_a_sample(self):
        x = torch.arange(1 << 16, dtype=torch.int64)
        assert masks.hash_u32(x).unique().numel() == x.numel()

    def test_mix_keys_is_deterministic_and_order_sensitive(self):
        assert masks.mix_keys(7, 2**40) == masks.mix_keys(7, 2**40)
        assert masks.mix_keys(1, 2) != masks.mix_keys(2, 1)
        assert 0 <= masks.mix_keys(2**63 - 1) < 2**32


class TestSeededPermutation:
    @given(st.integers(1, 300), st.integers(0, 2**63 - 1), st.integers(0, 1000))
    @settings(max_examples=40, deadline=None)
    def test_is_a_permutation(self, n, seed, counter):
        perm = masks.seeded_permutation(seed, masks.TAG_PERM, counter, n)
        assert torch.equal(perm.sort().values, torch.arange(n))

    def test_depends_on_seed_and_counter(self):
        a = masks.seeded_permutation(0, masks.TAG_PERM, 0, 64)
        assert torch.equal(a, masks.seeded_permutation(0, masks.TAG_PERM, 0, 64))
        assert not torch.equal(a, masks.seeded_permutation(1, masks.TAG_PERM, 0, 64))
        assert not torch.equal(a, masks.seeded_permutation(0, masks.TAG_PERM, 1, 64))


class TestElementKeepMask:
    @given(
        p=st.floats(0.05, 0.95),
        numel=st.integers(200, 3000),
        seed=st.integers(0, 2**40),
    )
    @settings(max_examples=30, deadline=None, derandomize=True)  # fixed examples: no flakes
    def test_drop_rate_matches_p_within_binomial_bound(self, p, numel, seed):
        keep = masks.element_keep_mask(seed, torch.arange(8), numel, p)
        assert_rate(keep.numel() - int(keep.sum()), keep.numel(), p, "element drop rate")

    def test_same_seed_same_masks_and_subnets_differ(self):
        a = masks.element_keep_mask(3, torch.tensor([0, 1, 5]), 512, 0.5)
        b = masks.element_keep_mask(3, torch.tensor([5, 0]), 512, 0.5)
        assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
        assert not torch.equal(a[0], a[1])

    def test_different_seeds_give_different_masks(self):
        a = masks.element_keep_mask(0, torch.tensor([0]), 512, 0.5)
        b = masks.element_keep_mask(1, torch.tensor([0]), 512, 0.5)
        assert not torch.equal(a, b)

    def test_elements_are_uncorrelated_between_neighbours(self):
        keep = masks.element_keep_mask(0, torch.arange(64), 1024, 0.5).float()
        same = (keep[:, 1:] == keep[:, :-1]).float().mean().item()
        assert abs(same - 0.5) < 0.02

    def test_p_zero_keeps_everything(self):
        assert bool(masks.element_keep_mask(0, torch.arange(4), 100, 0.0).all())


class TestBlockKeepMask:
    @given(
        n_blocks=st.integers(1, 64),
        frac=st.floats(0, 1),
        k=st.integers(1, 8),
        seed=st.integers(0, 2**32),
    )
    @settings(max_examples=40, deadline=None)
    def test_every_mask_drops_exactly_n_drop_blocks(self, n_blocks, frac, k, seed):
        n_drop = round(frac * n_blocks)
        keep = masks.block_keep_mask(seed, torch.arange(k), n_blocks, n_drop)
        assert keep.shape == (k, n_blocks)
        assert bool((keep.sum(1) == n_blocks - n_drop).all())


class TestBlockBounds:
    def test_last_block_is_shorter(self):
        assert masks.block_bounds(70, 32) == [(0, 32), (32, 64), (64, 70)]


class TestDevice:
    def test_masks_are_built_on_the_requested_device(self):
        # The meta device stands in for an accelerator on a CPU-only machine: masks must
        # be computed where they are asked for, not on the CPU and left there.
        meta = torch.device("meta")
        element = masks.element_keep_mask(0, torch.arange(3), 10, 0.5, device=meta)
        block = masks.block_keep_mask(0, torch.arange(3), 8, 3, device=meta)
        assert (element.device, element.shape, element.dtype) == (meta, (3, 10), torch.bool)
        assert (block.device, block.shape, block.dtype) == (meta, (3, 8), torch.bool)

    def test_any_integer_dtype_of_subnetwork_ids_gives_the_same_masks(self):
        # Ids are widened to int64 before hashing: int32 ids (products overflow) or
        # uint8 ids give the int64 masks.
        ids = torch.tensor([0, 1, 200, 255])
        for dtype in (torch.int32, torch.uint8, torch.int16):
            assert torch.equal(
                masks.element_keep_mask(5, ids.to(dtype), 40, 0.5),
                masks.element_keep_mask(5, ids, 40, 0.5),
            )
            assert torch.equal(
                masks.block_keep_mask(5, ids.to(dtype), 9, 4), masks.block_keep_mask(5, ids, 9, 4)
            )

    def test_block_count_out_of_range_names_the_allowed_range(self):
        for n_drop in (-1, 9):
            with pytest.raises(ValueError, match=rf"n_drop must be in \[0, 8\], got {n_drop}"):
                masks.block_keep_mask(0, torch.arange(2), 8, n_drop)


class TestTensorTwins:
    """The step-tensor forms the compiled path uses give the bits of the int forms."""

    @given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=5), st.integers(0, 4))
    @settings(max_examples=60, deadline=None)
    def test_mix_keys_tensor_equals_mix_keys(self, keys, n_tensors):
        mixed = [torch.tensor(k) if i < n_tensors else k for i, k in enumerate(keys)]
        assert int(masks.mix_keys_tensor(*mixed)) == masks.mix_keys(*keys)

    @given(st.integers(0, 2**62), st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
    @settings(max_examples=30, deadline=None)
    def test_batched_permutations_equal_one_per_counter(self, seed, counters):
        batched = masks.seeded_permutation(
            torch.tensor(seed), masks.TAG_PERM, torch.tensor(counters), 37
        )
        for row, c in zip(batched, counters, strict=True):
            assert torch.equal(row, masks.seeded_permutation(seed, masks.TAG_PERM, c, 37))

    @given(st.floats(0.0, 1.0))
    @settings(max_examples=60, deadline=None)
    def test_drop_threshold_tensor_equals_drop_threshold(self, p):
        t = masks.drop_threshold_tensor(torch.tensor(p, dtype=torch.float64))
        assert int(t) == masks.drop_threshold(p)

    def test_tensor_seed_gives_the_same_element_and_block_masks(self):
        ids = torch.tensor([0, 5, 2**33])
        for seed in (0, 17, 2**40):
            assert torch.equal(
                masks.element_keep_mask(torch.tensor(seed), ids, 50, 0.3),
                masks.element_keep_mask(seed, ids, 50, 0.3),
            )
            assert torch.equal(
                masks.block_keep_mask(torch.tensor(seed), ids, 9, 4),
                masks.block_keep_mask(seed, ids, 9, 4),
            )


class TestStreamTags:
    """One table of hash stream tags (``gyrodrop.masks.STREAM_TAGS``)."""

    def test_the_table_holds_every_tag_at_its_pinned_value(self):
        assert masks.STREAM_TAGS == {
            "TAG_ELEMENT": 0x11,
            "TAG_BLOCK": 0x22,
            "TAG_PERM": 0x33,
            "TAG_RANDOM_SET": 0x44,
            "TAG_DEPTH": 0x55,
            "TAG_REPLACE_SET": 0x66,
            "TAG_DROPBLOCK": 0x66,
            "TAG_MC_MEMBERS": 0x66,
            "TAG_SUBSET": 0x67,
            "TAG_GYRO_DROPBLOCK": 0x77,
            "TAG_LAYER": 0xD5,
        }

    def test_no_module_defines_a_tag_of_its_own(self):
        import re
        from pathlib import Path

        src = Path(masks.__file__).parent
        own = [
            f"{path.relative_to(src)}: {line.strip()}"
            for path in src.rglob("*.py")
            if path.name != "masks.py"
            for line in path.read_text().splitlines()
            if re.match(r"\s*_?TAG_\w+\s*=", line)
        ]
        assert not own, "stream tags belong in gyrodrop.masks: " + "; ".join(own)
