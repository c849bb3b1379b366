"""apply_gyro_dropout: what it replaces, what it keeps, how it reports."""

import pytest
import torch
from torch import nn

import gyrodrop


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout2d(0.2), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))])
        self.heads = nn.ModuleDict({"a": nn.Dropout1d(0.4), "b": nn.Dropout3d(0.1)})
        self.drop = nn.Dropout(0.5)
        self.alpha = nn.AlphaDropout(0.5)

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))
        return self.drop(self.blocks[0](x))


def gyro_layers(model):
    return [m for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)]


class TestApplyGyroDropout:
    def test_replaces_every_dropout_kind_in_nested_containers(self):
        model = Net()
        assert gyrodrop.apply_gyro_dropout(model, total_steps=100) == 5
        assert not any(
            type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
            for m in model.modules()
        )
        assert isinstance(model.alpha, nn.AlphaDropout)  # not a plain dropout: left alone

    def test_keeps_each_layers_p_unless_p_given(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(model, total_steps=100)
        assert [m.p for m in gyro_layers(model)] == [0.2, 0.3, 0.4, 0.1, 0.5]
        other = Net()
        gyrodrop.apply_gyro_dropout(other, p=0.25, total_steps=100)
        assert {m.p for m in gyro_layers(other)} == {0.25}

    def test_channelwise_dropouts_become_channelwise_masks(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(model, total_steps=100)
        assert model.features[1].dims == (1,)
        assert model.heads["a"].dims == (1,) and model.heads["b"].dims == (1,)
        assert model.drop.dims == (-1,)  # nn.Dropout: SEQUENCE_DIMS

    def test_dropout_default_masks_are_shared_across_positions_of_a_sequence(self):
        model = nn.Sequential(nn.Dropout(0.5))
        gyrodrop.apply_gyro_dropout(model, num_subnets=4, subnets_per_step=1, total_steps=8)
        x = torch.ones(3, 5, 16)  # (B, T, F)
        y = model(x)
        assert torch.equal(y, y[:, :1].expand_as(y))  # every position: the same mask
        assert torch.equal(model(x[:, :2]), y[:, :2])  # independent of the length T

    def test_dropout_default_on_2d_inputs_is_gyrodropouts_own_default_mask(self):
        replaced = nn.Sequential(nn.Dropout(0.5))
        gyrodrop.apply_gyro_dropout(
            replaced, num_subnets=4, subnets_per_step=2, total_steps=8, seed=3, auto_step=False
        )
        own = gyrodrop.GyroDropout(
            0.5,
            num_subnets=4,
            subnets_per_step=2,
            total_steps=8,
            seed=int(replaced[0].seed),
            schedule_seed=3,
            auto_step=False,
        )
        x = torch.ones(6, 16)
        assert torch.equal(replaced(x), own(x))

    def test_every_layer_gets_its_own_seed_fixed_by_the_seed(self):
        a, b, c = Net(), Net(), Net()
        for model, seed in ((a, 0), (b, 0), (c, 1)):
            gyrodrop.apply_gyro_dropout(model, total_steps=100, seed=seed)
        seeds = [int(m.seed) for m in gyro_layers(a)]
        assert len(set(seeds)) == len(seeds)
        assert seeds == [int(m.seed) for m in gyro_layers(b)]
        assert seeds != [int(m.seed) for m in gyro_layers(c)]

    def test_layers_share_the_schedule_so_subnetwork_k_is_one_network(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(
            model, total_steps=100, num_subnets=16, subnets_per_step=4, seed=5
        )
        layers = gyro_layers(model)
        for step in (0, 7, 30):
            ids = [m.active_subnets(step) for m in layers]
            assert all(torch.equal(ids[0], other) for other in ids[1:])

    def test_replacements_keep_the_replaced_layers_mode(self):
        model = Net().eval()
        gyrodrop.apply_gyro_dropout(model, total_steps=100)
        assert not any(m.training for m in gyro_layers(model))

    def test_passes_schedule_options_and_steps(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(
            model,
            num_subnets=64,
            subnets_per_step=8,
            total_steps=800,
            schedule="random",
            auto_step=False,
        )
        layer = model.drop
        assert (layer.num_subnets, layer.subnets_per_step, layer.steps_per_set) == (64, 8, 100)
        assert layer.schedule == "random" and layer.auto_step is False

    def test_second_application_replaces_nothing_and_warns(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(model, total_steps=100)
        with pytest.warns(UserWarning, match="no nn.Dropout"):
            assert gyrodrop.apply_gyro_dropout(model, total_steps=100) == 0

    def test_model_still_runs_and_trains(self):
        model = Net()
        gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=16, subnets_per_step=4)
        model(torch.randn(8, 3, 6, 6)).sum().backward()

    def test_unwraps_compiled_model(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        compiled = torch.compile(model)
        assert gyrodrop.apply_gyro_dropout(compiled, total_steps=10) == 1
        assert isinstance(model[1], gyrodrop.GyroDropout)

    def test_unwraps_data_parallel(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        assert gyrodrop.apply_gyro_dropout(nn.DataParallel(model), total_steps=10) == 1
        assert isinstance(model[1], gyrodrop.GyroDropout)

    def test_replacement_lands_on_the_model_device_and_dtype_is_irrelevant(self):
        model = nn.Sequential(nn.Linear(4, 4).double(), nn.Dropout(0.5))
        gyrodrop.apply_gyro_dropout(model, total_steps=10)
        assert model[1].step.device == model[0].weight.device

    def test_missing_steps_warns_once(self):
        model = Net()
        with pytest.warns(UserWarning) as record:
            gyrodrop.apply_gyro_dropout(model)
        assert len([w for w in record if "steps_per_set=1" in str(w.message)]) == 1

    def test_bad_arguments_are_named(self):
        with pytest.raises(ValueError, match=r"apply_gyro_dropout: p must be in \[0, 1\)"):
            gyrodrop.apply_gyro_dropout(Net(), p=1.5, total_steps=10)
        with pytest.raises(TypeError, match="unexpected keyword arguments.*'sigma'"):
            gyrodrop.apply_gyro_dropout(Net(), sigma=3, total_steps=10)
        with pytest.raises(ValueError, match="subnets_per_step"):
            gyrodrop.apply_gyro_dropout(Net(), num_subnets=2, subnets_per_step=4, total_steps=10)


def test_unwraps_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        ddp = nn.parallel.DistributedDataParallel(model)
        assert gyrodrop.apply_gyro_dropout(ddp, total_steps=10) == 1
        assert isinstance(model[1], gyrodrop.GyroDropout)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# All-or-nothing, unbatched channel dropout, module checks (issue 11, section 4)

import copy  # noqa: E402
import warnings  # noqa: E402


def snapshot(model):
    """Every module's type and identity, by name (what surgery would change)."""
    return [(name, type(m), id(m)) for name, m in model.named_modules()]


class TestAllOrNothing:
    def test_refused_layer_leaves_the_model_exactly_as_it_was(self):
        # a p=1.0 layer after valid ones: nothing may be swapped
        model = nn.Sequential(
            nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 8), nn.Dropout(1.0), nn.Linear(8, 2)
        )
        before = snapshot(model)
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            gyrodrop.apply_gyro_dropout(model, total_steps=10)
        assert snapshot(model) == before
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    @pytest.mark.parametrize("bad", [{"num_subnets": 0}, {"subnets_per_step": 0}])
    def test_every_apply_refuses_whole(self, bad):
        for fn, make in (
            (gyrodrop.apply_gyro_dropout, lambda: Net()),
            (
                gyrodrop.apply_block_gyro,
                lambda: nn.Sequential(
                    nn.Dropout(0.5), nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, 4)
                ),
            ),
        ):
            model = make()
            before = snapshot(model)
            with pytest.raises(ValueError):
                fn(model, total_steps=10, **bad)
            assert snapshot(model) == before, fn.__name__

    def test_block_gyro_refused_second_pair_leaves_the_first_unfused(self, monkeypatch):
        from gyrodrop import surgery

        model = nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 8))
        before = snapshot(model)
        real = surgery.BlockGyroLinear.from_linear
        calls = []

        def flaky(linear, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise ValueError("refused")
            return real(linear, **kw)

        monkeypatch.setattr(surgery.BlockGyroLinear, "from_linear", staticmethod(flaky))
        with pytest.raises(ValueError, match="refused"):
            gyrodrop.apply_block_gyro(model, total_steps=10, block_size=8)
        assert snapshot(model) == before

    def test_replace_modules_policy_error_changes_nothing(self):
        model = Net()
        before = snapshot(model)

        def policy(module, index):
            if index == 2:
                raise RuntimeError("no")
            return nn.Identity()

        with pytest.raises(RuntimeError, match="no"):
            gyrodrop.surgery.replace_modules(
                model, {nn.Dropout: policy, nn.Dropout1d: policy, nn.Dropout2d: policy}
            )
        assert snapshot(model) == before


def whole_channels(y):
    """Every channel (dim 0 of an unbatched input) all-kept or all-zero."""
    flat = y.reshape(y.shape[0], -1)
    return bool(((flat == 0).all(1) | (flat != 0).all(1)).all())


class TestUnbatchedChannelDropout:
    @pytest.mark.parametrize(
        ("drop", "shape"),
        [(nn.Dropout1d, (6, 10)), (nn.Dropout3d, (6, 3, 4, 4)), (nn.Dropout1d, (16, 3))],
    )
    def test_case_unbatched_input_drops_whole_channels(self, drop, shape):
        # shared/cases/case_channel_dropout_unbatched.py
        model = nn.Sequential(drop(0.5))
        gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=8, subnets_per_step=2)
        layer = model[0]
        for _ in range(6):  # several sets
            y = model(torch.ones(shape))
            assert y.shape == shape and whole_channels(y)
            assert 0 < int((y.reshape(shape[0], -1)[:, 0] == 0).sum()) < shape[0]
        assert int(layer.step) == 6  # one step per call

    @pytest.mark.parametrize(
        ("drop", "shape"),
        [(nn.Dropout1d, (4, 6, 10)), (nn.Dropout2d, (4, 6, 5, 5)), (nn.Dropout3d, (4, 6, 3, 4, 4))],
    )
    def test_batched_input_is_unchanged_channel_wise(self, drop, shape):
        model = nn.Sequential(drop(0.5))
        gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=8, subnets_per_step=2)
        y = model(torch.ones(shape))
        assert all(whole_channels(row) for row in y)
        assert torch.equal(y[0], y[1])  # rows 0-1: one group, one mask

    def test_unbatched_input_equals_a_batch_of_one(self):
        a = nn.Sequential(nn.Dropout3d(0.5))
        b = nn.Sequential(nn.Dropout3d(0.5))
        for m in (a, b):
            gyrodrop.apply_gyro_dropout(m, total_steps=100, num_subnets=8, subnets_per_step=2)
        x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a(x), b(x[None])[0])

    def test_dropout2d_3d_input_keeps_torchs_n_c_l_reading(self):
        # torch reads a 3-D input to Dropout2d as (N, C, L) (with a warning); so does gyro
        model = nn.Sequential(nn.Dropout2d(0.5))
        gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=8, subnets_per_step=2)
        assert model[0].unbatched_ndim is None
        y = model(torch.ones(4, 6, 10))
        assert all(whole_channels(row) for row in y)

    def test_unbatched_ndim_is_validated(self):
        with pytest.raises(ValueError, match="unbatched_ndim must be None or an int >= 1"):
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, unbatched_ndim=0)


class TestModuleChecks:
    @pytest.mark.parametrize(
        "fn",
        [
            gyrodrop.apply_gyro_dropout,
            gyrodrop.apply_block_gyro,
            gyrodrop.apply_stochastic_depth,
            lambda m, **kw: gyrodrop.surgery.replace_modules(m, {}),
        ],
    )
    @pytest.mark.parametrize("model", [None, "model", [nn.Linear(2, 2)]])
    def test_every_apply_checks_it_got_a_module(self, fn, model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="model must be a torch.nn.Module, got"):
                fn(model, total_steps=10) if fn is not gyrodrop.apply_stochastic_depth else fn(
                    model
                )


class TestPairing:
    def _mlp(self):
        return nn.Sequential(
            nn.Linear(4, 8),
            nn.Dropout(0.5),
            nn.Linear(8, 8),
            nn.Dropout(0.5),
            nn.Linear(8, 2),
        )

    def test_shared_is_the_default_one_schedule_for_all_layers(self):
        model = self._mlp()
        gyrodrop.apply_gyro_dropout(model, num_subnets=16, subnets_per_step=4, total_steps=40)
        a, b = gyro_layers(model)
        assert a.schedule == b.schedule == "consecutive"
        for step in (0, 10, 25):
            assert torch.equal(a.active_subnets(step), b.active_subnets(step))

    def test_independent_layers_draw_their_own_sets_with_replacement(self):
        model = self._mlp()
        n = gyrodrop.apply_gyro_dropout(
            model, num_subnets=16, subnets_per_step=4, total_steps=400, pairing="independent"
        )
        a, b = gyro_layers(model)
        assert n == 2 and a.schedule == b.schedule == "replacement"
        assert int(a.schedule_seed) != int(b.schedule_seed)
        differ = [
            not torch.equal(a.active_subnets(s), b.active_subnets(s)) for s in range(0, 400, 100)
        ]
        assert any(differ)
        assert a.steps_per_set == 100  # total_steps * tau // sigma, as with shared

    def test_independent_keeps_an_explicit_schedule(self):
        model = self._mlp()
        gyrodrop.apply_gyro_dropout(
            model,
            total_steps=10,
            pairing="independent",
            schedule="consecutive",
            num_subnets=4,
            subnets_per_step=2,
        )
        assert {m.schedule for m in gyro_layers(model)} == {"consecutive"}

    def test_unknown_pairing_is_a_clear_error(self):
        with pytest.raises(ValueError, match="pairing must be one of"):
            gyrodrop.apply_gyro_dropout(self._mlp(), total_steps=10, pairing="paired")

    def test_independent_masks_scale_by_the_realized_keep_fraction(self):
        model = self._mlp()
        gyrodrop.apply_gyro_dropout(
            model,
            num_subnets=4,
            subnets_per_step=2,
            total_steps=10,
            pairing="independent",
            scale="realized",
        )
        layer = gyro_layers(model)[0]
        masks = layer.active_masks(torch.ones(4, 8))
        for m in masks:
            kept = int((m > 0).sum())
            assert kept == 0 or torch.allclose(m[m > 0], torch.full((kept,), 8 / kept))
