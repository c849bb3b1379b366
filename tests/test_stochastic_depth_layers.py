"""Stochastic depth on whole transformer layers: nn.TransformerEncoder/Decoder and
Hugging Face BERT, ViT, Llama and Swin built from tiny configs (no downloads)."""

import warnings

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.stochastic_depth import StochasticDepthBlock, StochasticDepthLayer, block_keep
from gyrodrop.surgery import remove_stochastic_depth

transformers = pytest.importorskip("transformers")


def wrapped(model):
    return [n for n, m in model.named_modules() if isinstance(m, StochasticDepthLayer)]


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(config)


def vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)


def swin():
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        embed_dim=8,
        depths=[2, 2],
        num_heads=[1, 1],
        image_size=16,
        patch_size=2,
        window_size=2,
        drop_path_rate=0.0,  # its own DropPath off: wrapped, it would drop twice
    )
    return transformers.SwinForImageClassification(config)


IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
TEXT = {"input_ids": IDS, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
PIXELS8 = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
PIXELS16 = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))}

CASES = {
    "bert": (bert, TEXT, ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]),
    "vit": (vit, PIXELS8, ["vit.layers.0", "vit.layers.1"]),  # also vit.encoder.layer
    "llama": (llama, {"input_ids": IDS}, ["model.layers.0", "model.layers.1"]),
    "swin": (
        swin,
        PIXELS16,
        [f"swin.encoder.layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
class TestHuggingFaceModels:
    def test_finds_the_layer_stack(self, case):
        make, _, names = CASES[case]
        model = make()
        assert gyrodrop.apply_stochastic_depth(model, drop_rate=0.5) == len(names)
        assert wrapped(model) == names

    def test_eval_outputs_are_bitwise_the_original(self, case):
        make, inputs, _ = CASES[case]
        model = make().eval()
        before = model(**inputs).logits
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5)
        assert torch.equal(model(**inputs).logits, before)

    def test_trains_with_dropped_layers_skipped(self, case):
        make, inputs, _ = CASES[case]
        model = make().train()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.9, drop_distribution="uniform")
        for _ in range(4):  # several steps: some layers dropped, some kept
            model.zero_grad()
            model(**inputs).logits.float().sum().backward()
        layers = [m for m in model.modules() if isinstance(m, StochasticDepthLayer)]
        assert all(int(m.stochastic_depth.step) == 4 for m in layers)

    def test_remove_puts_the_layers_back(self, case):
        make, _, names = CASES[case]
        model = make()
        keys = list(model.state_dict())
        gyrodrop.apply_stochastic_depth(model)
        assert remove_stochastic_depth(model) == len(names)
        assert list(model.state_dict()) == keys


class TestLayerSemantics:
    def encoder(self):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def test_torch_encoder_and_decoder_layers_are_found(self):
        enc = self.encoder()
        assert gyrodrop.apply_stochastic_depth(enc) == 2
        assert wrapped(enc) == ["layers.0", "layers.1"]
        dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16), 2)
        assert gyrodrop.apply_stochastic_depth(dec) == 2
        out = dec(torch.randn(5, 2, 8), torch.randn(3, 2, 8))
        assert out.shape == (5, 2, 8)

    def test_dropped_layer_is_not_computed_and_passes_hidden_states(self):
        enc = self.encoder()
        calls = []
        enc.layers[1].register_forward_hook(lambda *a: calls.append(1))
        gyrodrop.apply_stochastic_depth(enc, drop_rate=0.5, drop_distribution="uniform", seed=3)
        wrapper = enc.layers[1]
        sd = wrapper.stochastic_depth
        for step in range(12):
            calls.clear()
            keep = block_keep(sd.decision_seed(), step, sd.p)
            hidden = torch.randn(2, 4, 8)
            out = wrapper(hidden)
            if keep:
                f = wrapper.layer(hidden)
                assert torch.allclose(out, hidden + (f - hidden) / (1 - sd.p), atol=1e-6)
            else:
                assert out is hidden
        assert int(sd.step) == 12

    def test_other_arguments_reach_the_layer(self):
        enc = self.encoder().train()
        gyrodrop.apply_stochastic_depth(enc, drop_rate=0.0)
        x = torch.randn(2, 4, 8)
        mask = torch.tensor([[False, False, True, True]] * 2)
        with_mask = enc(x, src_key_padding_mask=mask)
        without = enc(x)
        assert not torch.allclose(with_mask, without)

    def test_sample_mode_mixes_kept_and_dropped_rows(self):
        enc = self.encoder()
        gyrodrop.apply_stochastic_depth(
            enc, drop_rate=0.5, mode="sample", drop_distribution="uniform"
        )
        wrapper = enc.layers[0]
        x = torch.randn(64, 3, 8)
        y = wrapper(x)
        same = (y == x).flatten(1).all(dim=1)
        assert 0 < int(same.sum()) < 64

    def test_tuple_outputs_keep_their_structure_when_dropped(self):
        class TupleLayer(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, hidden_states, mask=None):
                return hidden_states + self.fc(hidden_states), "attn"

        model = nn.Sequential(TupleLayer())
        gyrodrop.apply_stochastic_depth(model, target=TupleLayer, drop_rate=0.9)
        wrapper = model[0]
        x = torch.randn(2, 4)
        outs = [wrapper(hidden_states=x, mask=None) for _ in range(20)]
        dropped = [o for o in outs if o[1] is None]
        kept = [o for o in outs if o[1] == "attn"]
        assert dropped and all(o[0] is x for o in dropped)
        assert all(isinstance(o, tuple) and len(o) == 2 for o in outs)
        assert all(torch.allclose(o[0], x + (wrapper.layer(x)[0] - x) / 0.1) for o in kept)
        assert len(dropped) + len(kept) == 20  # the structure was known from the probe

    def test_per_rank_mixes_the_rank_into_block_decisions_only_when_asked(self):
        enc, other = self.encoder(), self.encoder()
        gyrodrop.apply_stochastic_depth(enc, seed=1)
        gyrodrop.apply_stochastic_depth(other, seed=1, per_rank=True)
        a, b = enc.layers[0].stochastic_depth, other.layers[0].stochastic_depth
        assert a.decision_seed() == a.current_seed()
        assert b.per_rank and b.decision_seed() != b.current_seed()  # rank 0, mixed
        assert "per_rank=True" in repr(b)

    def test_shape_changing_target_is_refused_at_surgery_with_example_inputs(self):
        class Pool(nn.Module):
            def forward(self, hidden_states, size):
                return hidden_states[:, :size]

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.pool = Pool()

            def forward(self, x):
                return self.pool(x, 2)

        with pytest.raises(ValueError, match=r"layer 'pool' returns hidden states of shape"):
            gyrodrop.apply_stochastic_depth(Net(), target=Pool, example_inputs=torch.ones(3, 5))

    def test_unprobed_shape_change_is_refused_at_the_first_forward(self):
        class Pool(nn.Module):
            def forward(self, hidden_states, size):
                return hidden_states[:, :size]

        model = nn.Sequential(Pool())
        gyrodrop.apply_stochastic_depth(model, target=Pool, drop_rate=0.0)
        with pytest.raises(ValueError, match="StochasticDepthLayer: layer '0' returns"):
            model[0](torch.ones(3, 5), 2)

    def test_mc_predict_samples_the_layers(self):
        torch.manual_seed(0)
        model = nn.Sequential(self.encoder(), nn.Flatten(), nn.Linear(32, 3))
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, drop_distribution="uniform")
        pred = gyrodrop.mc_predict(model, torch.randn(4, 4, 8), samples=8)
        assert float(pred.mutual_info.sum()) > 0


class TestUserBranchCheck:
    def test_branch_shortcut_that_disagree_with_forward_are_refused_once(self):
        class Liar(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 3)

            def branch(self, x):
                return self.fc(x)

            def shortcut(self, x):
                return x

            def forward(self, x):
                return 2 * x + self.fc(x)

        model = nn.Sequential(Liar())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_stochastic_depth(model)
        assert isinstance(model[0], StochasticDepthBlock)
        with pytest.raises(ValueError, match=r"Liar.forward\(x\) differs from"):
            model(torch.randn(2, 3))


class TestReplaceDropPaths:
    def test_convnext_drop_paths_become_seeded_stochastic_depth(self):
        from gyrodrop.stochastic_depth import StochasticDepth
        from gyrodrop.surgery import replace_drop_paths

        torch.manual_seed(0)
        config = transformers.ConvNextConfig(
            num_channels=3,
            hidden_sizes=[8, 16, 16, 16],
            depths=[1, 1, 1, 1],
            drop_path_rate=0.2,
            image_size=32,
            num_labels=3,
        )
        model = transformers.ConvNextForImageClassification(config)
        expected = [m.drop_prob for m in model.modules() if type(m).__name__ == "ConvNextDropPath"]
        x = torch.randn(2, 3, 32, 32)
        before = model.eval()(pixel_values=x).logits
        assert replace_drop_paths(model) == len(expected) > 0
        got = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
        assert got == pytest.approx(expected)
        assert torch.equal(model(pixel_values=x).logits, before)
        model.train()(pixel_values=x).logits.sum().backward()


class TestWrappingBlocksThatDropTheirPath:
    """A block that already drops its own path (HF ConvNeXt/Swin with drop_path_rate > 0)
    would be dropped twice once wrapped: apply_stochastic_depth says so."""

    @staticmethod
    def convnext(drop_path_rate: float) -> nn.Module:
        config = transformers.ConvNextConfig(
            num_channels=3,
            hidden_sizes=[8, 16, 16, 16],
            depths=[1, 1, 1, 1],
            drop_path_rate=drop_path_rate,
            image_size=32,
            num_labels=3,
        )
        return transformers.ConvNextForImageClassification(config)

    def test_hf_convnext_with_its_own_drop_path_warns_naming_the_module(self):
        model = self.convnext(0.2)
        x = {"pixel_values": torch.randn(2, 3, 32, 32)}
        with pytest.warns(
            gyrodrop.SurgeryWarning,
            match=r"convnext\.encoder\.stages\.3\.layers\.0\.drop_path: ConvNextDropPath "
            r"drop_prob=0\.2\), so they are dropped twice; .*drop_path_rate=0\.0",
        ):
            assert gyrodrop.apply_stochastic_depth(model, 0.2, example_inputs=x) == 4

    def test_without_its_own_drop_path_it_is_quiet(self):
        model = self.convnext(0.0)
        x = {"pixel_values": torch.randn(2, 3, 32, 32)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert gyrodrop.apply_stochastic_depth(model, 0.2, example_inputs=x) == 4

    def test_a_timm_drop_path_inside_a_user_block_warns(self):
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc, self.drop_path = nn.Linear(4, 4), TimmDropPath(0.1)

            def branch(self, x):
                return self.drop_path(self.fc(x))

            def shortcut(self, x):
                return x

            def forward(self, x):
                return self.shortcut(x) + self.branch(x)

        with pytest.warns(gyrodrop.SurgeryWarning, match=r"0\.drop_path: TimmDropPath drop_p"):
            gyrodrop.apply_stochastic_depth(nn.Sequential(Block(), Block()), 0.5)


class TimmDropPath(nn.Module):
    """Same attributes and rule as ``timm.layers.drop.DropPath`` (timm is not a
    dependency): per-sample drop, kept rows scaled by ``1/(1-p)`` only when
    ``scale_by_keep``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


class TestReplaceDropPathsKeepsTheMeaning:
    """A DropPath is replaced only where StochasticDepth computes the same thing; the
    others are left alone and named (shared/cases/round3/case_droppath_scale_by_keep.py)."""

    @staticmethod
    def train_mean(model: nn.Module) -> float:
        torch.manual_seed(0)
        return float(model.train()(torch.ones(20000, 4)).mean())

    def test_scale_by_keep_false_is_left_alone_and_named(self):
        from gyrodrop.surgery import replace_drop_paths

        model = nn.Sequential(TimmDropPath(0.4, scale_by_keep=False))
        with pytest.warns(gyrodrop.SurgeryWarning, match=r"left 1 .*0 \(TimmDropPath, drop_prob"
                          r"=0.4, scale_by_keep=False: .*training mean is 0.6 x"):  # fmt: skip
            assert replace_drop_paths(model) == 0
        assert type(model[0]) is TimmDropPath
        assert self.train_mean(model) == pytest.approx(0.6, abs=0.02)  # still (1 - p) x

    def test_scale_by_keep_true_is_replaced_and_keeps_the_expectation(self):
        from gyrodrop.stochastic_depth import StochasticDepth
        from gyrodrop.surgery import replace_drop_paths

        model = nn.Sequential(TimmDropPath(0.4, scale_by_keep=True))
        before = self.train_mean(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to name
            assert replace_drop_paths(model) == 1
        assert isinstance(model[0], StochasticDepth) and model[0].p == 0.4
        assert (
            self.train_mean(model)
            == pytest.approx(before, abs=0.03)
            == pytest.approx(1.0, abs=0.03)
        )

    def test_in_a_mixed_model_only_the_faithful_ones_are_replaced(self):
        from gyrodrop.stochastic_depth import StochasticDepth
        from gyrodrop.surgery import replace_drop_paths

        blocks = nn.ModuleDict(
            {
                "a": TimmDropPath(0.1),
                "b": TimmDropPath(0.2, scale_by_keep=False),
                "c": TimmDropPath(0.3),
                "d": TimmDropPath(1.0),  # drops every row: StochasticDepth refuses p = 1
                "e": TimmDropPath(0.0, scale_by_keep=False),  # p = 0: the identity either way
            }
        )
        model = nn.Sequential(blocks)
        with pytest.warns(gyrodrop.SurgeryWarning) as record:
            assert replace_drop_paths(model) == 3
        (message,) = [str(w.message) for w in record]
        assert "left 2 as they were" in message
        assert "0.b (TimmDropPath, drop_prob=0.2, scale_by_keep=False" in message
        assert "0.d (TimmDropPath, drop_prob=1.0 is outside [0, 1))" in message
        assert [type(blocks[k]).__name__ for k in "abcde"] == [
            "StochasticDepth", "TimmDropPath", "StochasticDepth", "TimmDropPath", "StochasticDepth"
        ]  # fmt: skip
        assert isinstance(blocks["a"], StochasticDepth) and blocks["c"].p == 0.3
