"""apply_block_gyro / find_block_sites: which Dropout/Linear pairs are fused, and how."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gyrodrop
from gyrodrop import BlockGyroLinear
from gyrodrop.surgery import BlockSite, find_block_sites

KW = {"num_subnets": 8, "block_size": 8, "steps_per_set": 2}


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(32, 4),
    )


def apply(model: nn.Module, **kw: object) -> int:
    return gyrodrop.apply_block_gyro(model, **{**KW, **kw})


class Residual(nn.Module):
    """Not a Sequential: dropout -> linear inside, plus a residual add and a reused Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.drop1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 16)
        self.drop2 = nn.Dropout(0.5)  # feeds a residual add: not fusable as input
        self.shared = nn.Linear(16, 16)
        self.drop3 = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.drop1(F.relu(self.fc1(x))))
        h = x + self.drop2(h)
        h = self.shared(self.drop3(h))
        return self.shared(h)  # the Linear is called twice


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.body(x)
        return self.body(-x)


def fused_reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The fused model's training forward written densely from each layer's masks."""
    for layer in model:
        if isinstance(layer, BlockGyroLinear):
            mask = layer.dense_mask(x.shape[0], dtype=x.dtype)
            if layer.prune == "input":
                x = F.linear(x * mask, layer.weight, layer.bias)
            else:
                x = F.linear(x, layer.weight, layer.bias) * mask
        else:
            x = layer(x)
    return x


class TestApplyBlockGyroOnSequential:
    def test_dropout_then_linear_pairs_become_identity_and_block_linear(self):
        model = mlp()
        weights = [model[i].weight for i in (3, 6)]
        assert apply(model) == 2
        assert [type(m).__name__ for m in model] == [
            "Linear",
            "ReLU",
            "Identity",
            "BlockGyroLinear",
            "ReLU",
            "Identity",
            "BlockGyroLinear",
        ]
        assert (model[3].p, model[6].p) == (0.5, 0.25)
        assert model[3].prune == model[6].prune == "input"
        assert model[3].weight is weights[0] and model[6].weight is weights[1]

    def test_training_forward_equals_the_dense_masked_model(self):
        torch.manual_seed(0)
        model = mlp()
        apply(model, p=0.5)
        x = torch.randn(6, 16)
        expected = fused_reference(model, x)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)

    def test_eval_forward_is_unchanged(self):
        model = mlp().eval()
        x = torch.randn(5, 16)
        before = model(x)
        apply(model)
        assert torch.equal(model(x), before)

    def test_each_layer_gets_its_own_mask_seed_and_all_share_the_schedule(self):
        model = mlp()
        apply(model, seed=3)
        assert int(model[3].seed) != int(model[6].seed)
        assert int(model[3].schedule_seed) == int(model[6].schedule_seed) == 3
        assert torch.equal(model[3].active_subnets(), model[6].active_subnets())

    def test_optimizer_built_before_surgery_still_trains_the_weights(self):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        apply(model)
        before = model[3].weight.detach().clone()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        assert not torch.equal(model[3].weight, before)

    def test_checkpoint_saved_before_surgery_loads_strictly(self):
        original = mlp()
        state = original.state_dict()
        model = mlp()
        apply(model)
        model.load_state_dict(state)
        assert torch.equal(model[3].weight, original[3].weight)

    def test_nested_sequentials_are_searched(self):
        model = nn.Sequential(nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 8)), nn.ReLU())
        assert apply(model) == 1
        assert isinstance(model[0][1], BlockGyroLinear) and isinstance(model[0][0], nn.Identity)

    def test_options_reach_every_layer(self):
        model = mlp()
        apply(
            model,
            schedule="random",
            auto_step=False,
            subnets_per_step=4,
            total_steps=80,
            steps_per_set=None,
        )
        layer = model[3]
        assert (layer.schedule, layer.auto_step, layer.subnets_per_step) == ("random", False, 4)
        assert layer.steps_per_set == 80 * 4 // 8


class TestOutputAndAutoPruning:
    def test_output_prune_fuses_linear_relu_dropout(self):
        torch.manual_seed(0)
        model = mlp()
        assert apply(model, prune="output") == 2
        assert model[0].prune == model[3].prune == "output"
        assert isinstance(model[2], nn.Identity) and isinstance(model[1], nn.ReLU)
        x = torch.randn(6, 16)
        torch.testing.assert_close(model(x), fused_reference(model, x), atol=1e-6, rtol=1e-6)

    def test_dropout_before_a_norm_warns_under_input_and_fuses_under_auto(self):
        def make():
            return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.LayerNorm(16))

        with pytest.warns(UserWarning, match=r"followed by 2, not an nn.Linear.*prune='auto'"):
            assert apply(make()) == 0
        model = make()
        assert apply(model, prune="auto") == 1
        assert model[0].prune == "output"

    def test_auto_prunes_the_two_large_linears_of_an_mlp(self):
        model = nn.Sequential(
            nn.Linear(784, 2048),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(2048, 10),
        )
        sites, _ = find_block_sites(model, "auto")
        assert sites == [BlockSite("2", "0", "output"), BlockSite("5", "3", "output")]
        sites, _ = find_block_sites(model, "input")
        assert sites == [BlockSite("2", "3", "input"), BlockSite("5", "6", "input")]

    def test_auto_prefers_input_fusion_on_ties(self):
        model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 16))
        sites, _ = find_block_sites(model, "auto")
        assert sites == [BlockSite("1", "2", "input")]

    def test_auto_gives_each_dropout_a_linear_where_input_first_would_not(self):
        # Linear0 -> Dropout1 -> Linear2 -> Dropout3 -> LayerNorm: input-first would give
        # Linear2 to Dropout1 and leave Dropout3 alone; auto fuses both as output.
        model = nn.Sequential(
            nn.Linear(16, 16),
            nn.Dropout(0.5),
            nn.Linear(16, 16),
            nn.Dropout(0.5),
            nn.LayerNorm(16),
        )
        sites, problems = find_block_sites(model, "auto")
        assert sites == [BlockSite("1", "0", "output"), BlockSite("3", "2", "output")]
        assert problems == []


class TestApplyBlockGyroThroughFx:
    def test_custom_module_is_fused_in_place_and_problems_are_listed(self):
        model = Residual()
        with pytest.warns(UserWarning) as record:
            count = apply(model)
        assert count == 1
        assert type(model) is Residual  # in place, not a GraphModule
        assert isinstance(model.fc2, BlockGyroLinear) and isinstance(model.drop1, nn.Identity)
        message = " ".join(str(w.message) for w in record)
        assert "drop2: followed by add" in message
        assert "drop3: the Linear after it (shared) is called more than once" in message
        model(torch.randn(4, 16)).sum().backward()

    def test_output_fusion_needs_the_linear_to_feed_only_the_dropout(self):
        model = Residual()
        sites, problems = find_block_sites(model, "output")
        assert sites == [BlockSite("drop1", "fc1", "output"), BlockSite("drop2", "fc2", "output")]
        assert any(p.startswith("drop3:") for p in problems)

    def test_functional_dropout_is_reported(self):
        class Functional(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(8, 8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(F.dropout(x, 0.5, self.training))

        with pytest.warns(UserWarning, match="functional dropout call cannot be swapped"):
            assert apply(Functional()) == 0

    def test_untraceable_model_falls_back_to_sequential_containers(self):
        model = Untraceable()
        with pytest.warns(UserWarning, match="torch.fx could not trace the model"):
            assert apply(model) == 1
        assert isinstance(model.body[1], BlockGyroLinear)

    def test_untraceable_model_fuses_inside_children_that_trace(self):
        class Outer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.block = Residual()  # traces on its own
                self.drop = nn.Dropout(0.5)  # called by Outer itself: not traced
                self.head = nn.Linear(16, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = self.block(x)
                if h.sum() > 0:  # data-dependent control flow
                    h = -h
                return self.head(self.drop(h))

        sites, problems = find_block_sites(Outer(), "output")
        assert sites == [
            BlockSite("block.drop1", "block.fc1", "output"),
            BlockSite("block.drop2", "block.fc2", "output"),
        ]
        assert problems[0].startswith("torch.fx could not trace the model")
        assert any(p.startswith("drop: called by the model (Outer)") for p in problems)
        assert any(p.startswith("block.drop3:") for p in problems)

    def test_submodule_tracing_still_refuses_a_linear_shared_with_another_child(self):
        class Child(nn.Module):
            def __init__(self, fc: nn.Linear) -> None:
                super().__init__()
                self.fc = fc
                self.drop = nn.Dropout(0.5)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.drop(self.fc(x))

        class Outer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                fc = nn.Linear(16, 16)
                self.a, self.b = Child(fc), Child(fc)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.b(self.a(x)) if x.sum() > 0 else x

        sites, problems = find_block_sites(Outer(), "output")
        assert sites == []
        assert any("a.drop: " in p and "used elsewhere" in p for p in problems)

    def test_models_with_gyrodrop_layers_still_trace(self):
        model = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(16, 16),
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1),
            nn.Linear(16, 4),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert apply(model) == 1

    def test_compiled_wrapper_is_unwrapped(self):
        model = mlp()
        compiled = torch.compile(model, backend="eager")
        assert apply(compiled) == 2
        assert isinstance(model[3], BlockGyroLinear)


class TestApplyBlockGyroReports:
    def test_too_few_blocks_for_p_is_reported_not_raised(self):
        model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 4))  # one block of 8
        with pytest.warns(
            UserWarning, match=r"p=0.5 would drop all 1 blocks of 1's 8 input features"
        ):
            assert apply(model) == 0
        assert isinstance(model[0], nn.Dropout)

    @pytest.mark.parametrize(
        ("model", "kw", "name", "reason"),
        [
            # one block of 32 features: round(0.3 * 1) == 0 blocks dropped
            (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)),
             {"block_size": 32}, "2", r"p=0.3 rounds to 0 of the 1 block\(s\) of 3's 32 input"),
            # p given to the surgery overrides the dropout's own
            (mlp, {"p": 0.05}, "2", r"p=0.05 rounds to 0 of the 4 block\(s\) of 3's 32 input"),
            (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3)),
             {"prune": "output", "block_size": 16}, "2",
             r"rounds to 0 of the 2 block\(s\) of 0's 32 output"),
            (Residual, {"block_size": 16, "p": 0.2}, "drop1",
             r"rounds to 0 of the 1 block\(s\) of fc2's 16"),
        ],
    )  # fmt: skip
    def test_a_pair_whose_p_drops_no_block_is_left_alone_and_named(self, model, kw, name, reason):
        """(The right value of shared/cases/round3/case_block_gyro_zero_blocks.py.)"""
        net = model()
        torch.manual_seed(0)
        x = torch.randn(8, 16)
        with pytest.warns(
            UserWarning, match=rf"left \d+ dropout\(s\) as they were:.*{name}: .*{reason}"
        ):
            count = apply(net, **kw)
        dropout = net.get_submodule(name)
        assert type(dropout) is nn.Dropout and count == 0
        assert not any(isinstance(m, BlockGyroLinear) for m in net.modules())
        assert not torch.equal(net.train()(x), net.eval()(x))  # the dropout still drops

    def test_pairs_that_drop_blocks_are_fused_beside_one_that_drops_none(self):
        net = nn.Sequential(nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.05), nn.Linear(32, 4))
        with pytest.warns(UserWarning, match=r"fused 1 pair\(s\); left 1 dropout.*2: p=0.05"):
            assert apply(net) == 1
        assert isinstance(net[1], BlockGyroLinear) and type(net[2]) is nn.Dropout

    def test_no_dropout_warns_and_leaves_the_model(self):
        with pytest.warns(UserWarning, match="no nn.Dropout found"):
            assert apply(nn.Sequential(nn.Linear(4, 4))) == 0

    def test_missing_total_steps_warns_once(self):
        with pytest.warns(UserWarning, match="neither total_steps") as record:
            gyrodrop.apply_block_gyro(mlp(), block_size=8)
        assert len([w for w in record if "total_steps" in str(w.message)]) == 1

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"prune must be one of \('input', 'output', 'auto'\)"):
            apply(mlp(), prune="both")
        with pytest.raises(ValueError, match=r"apply_block_gyro: p must be in \[0, 1\), got 1.5"):
            apply(mlp(), p=1.5)
        with pytest.raises(ValueError, match="at most one of total_steps and steps_per_set"):
            apply(mlp(), total_steps=10)  # KW has steps_per_set too: a user error, raised
        with pytest.raises(TypeError, match="unexpected keyword arguments \\['dims'\\]"):
            apply(mlp(), dims=(1,))


# --------------------------------------------------------------------------------------
# Every dropout left alone is named and counted; block_size first (issue 11, section 4)


def warned(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(i.message) for i in w]


class TestApplyBlockGyroNamesWhatItLeaves:
    def test_case_torch_transformer_layer_dropouts_are_named(self):
        # shared/cases/case_block_gyro_warning.py: "no nn.Dropout found"
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
                self.head = nn.Linear(32, 2)

            def forward(self, x):
                return self.head(self.layer(x).mean(1))

        n, msgs = warned(lambda: gyrodrop.apply_block_gyro(M(), total_steps=10, block_size=4))
        assert n == 0 and len(msgs) == 1
        assert "left 3 dropout(s)" in msgs[0]
        for name in ("layer.dropout:", "layer.dropout1:", "layer.dropout2:"):
            assert name in msgs[0]
        assert "TransformerEncoderLayer" in msgs[0] and "no nn.Dropout found" not in msgs[0]

    def test_case_hf_bert_counts_dropouts_not_problems(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=8,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification(cfg)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
        n, msgs = warned(lambda: gyrodrop.apply_block_gyro(model, total_steps=10, block_size=4))
        assert n == 0 and len(msgs) == 1 and len(names) == 8
        assert "left 8 dropout(s)" in msgs[0]
        assert all(f"{name}:" in msgs[0] for name in names)

    def test_hf_vit_every_dropout_is_fused_or_named(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.2,
            num_labels=3,
        )
        model = transformers.ViTForImageClassification(cfg)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
        n, msgs = warned(lambda: gyrodrop.apply_block_gyro(model, total_steps=10, block_size=4))
        text = " ".join(msgs)
        assert f"left {len(names) - n} dropout(s)" in text
        left = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
        assert all(f"{name}:" in text for name in left)

    def test_decoder_layer_and_mixed_model(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)
                self.mlp = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 16))
                self.chan = nn.Dropout2d(0.5)
                self.head = nn.Linear(16, 2)

            def forward(self, x):
                h = self.dec(x, x)
                h = self.chan(h.unsqueeze(-1)).squeeze(-1)
                return self.head(F.dropout(self.mlp(h), 0.1).mean(1))

        model = M()
        n, msgs = warned(lambda: gyrodrop.apply_block_gyro(model, total_steps=10, block_size=4))
        assert n == 1 and isinstance(model.mlp[1], BlockGyroLinear)
        (msg,) = msgs
        # 4 in the decoder layer, the Dropout2d, the functional call
        assert "left 6 dropout(s)" in msg
        assert "dec.dropout1:" in msg and "TransformerDecoderLayer" in msg
        assert "chan: a Dropout2d is not an element-wise nn.Dropout" in msg
        assert "functional dropout" in msg

    def test_unused_dropout_is_named(self):
        class Spare(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.spare = mlp(), nn.Dropout(0.5)  # spare: never called

            def forward(self, x):
                return self.body(x)

        model = Spare()
        n, msgs = warned(lambda: apply(model))
        assert n == 2 and "left 1 dropout(s)" in msgs[0]
        assert "spare: not called by the model's traced forward" in msgs[0]

    @pytest.mark.parametrize("block_size", [0, -1, 2.5, "8", True])
    def test_case_block_size_is_validated_first(self, block_size):
        # shared/cases/case_apply_block_size.py: -1 warned "drop all -64 blocks", 0 raised
        # ZeroDivisionError
        model = mlp()
        with pytest.raises(ValueError, match="apply_block_gyro: block_size must be"):
            gyrodrop.apply_block_gyro(model, block_size=block_size, total_steps=100)
        with pytest.raises(ValueError, match="apply_block_gyro: block_size must be"):
            gyrodrop.apply_block_gyro(model, block_size=block_size, p=5.0, prune="bad")
