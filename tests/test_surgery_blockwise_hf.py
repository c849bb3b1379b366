"""apply_block_gyro on Hugging Face models that torch.fx cannot trace whole (BERT,
GPT-2), built from tiny configs (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gyrodrop
from gyrodrop import BlockGyroLinear
from gyrodrop.surgery import BlockSite, find_block_sites

transformers = pytest.importorskip("transformers")

KW = {"num_subnets": 8, "subnets_per_step": 2, "block_size": 8, "steps_per_set": 2}
B, T = 4, 6


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.25,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def ids() -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))


def fuse(model: nn.Module, prune: str = "output") -> tuple[int, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = gyrodrop.apply_block_gyro(model, prune=prune, p=0.25, **KW)
    text = " ".join(str(w.message) for w in caught if "apply_block_gyro" in str(w.message))
    return count, text


BERT_SITES = [
    BlockSite(
        f"bert.encoder.layer.{i}.{part}.dropout", f"bert.encoder.layer.{i}.{part}.dense", "output"
    )
    for i in range(2)
    for part in ("attention.output", "output")
]


class TestBert:
    @pytest.mark.parametrize("prune", ["output", "auto"])
    def test_attention_and_ffn_output_projections_are_found_submodule_by_submodule(self, prune):
        sites, problems = find_block_sites(tiny_bert(), prune)
        assert sites == BERT_SITES
        assert problems[0].startswith("torch.fx could not trace the model")

    def test_input_pruning_finds_nothing_and_points_to_output(self):
        sites, problems = find_block_sites(tiny_bert(), "input")
        assert sites == []
        assert any("would fuse it into the Linear before it" in p for p in problems)

    def test_fuses_four_pairs_and_names_the_dropouts_left_alone(self):
        model = tiny_bert()
        count, text = fuse(model)
        assert count == 4
        for site in BERT_SITES:
            assert isinstance(model.get_submodule(site.linear), BlockGyroLinear)
            assert isinstance(model.get_submodule(site.dropout), nn.Identity)
        assert "left 4 dropout(s)" in text
        assert "bert.embeddings.dropout: " in text
        assert "bert.encoder.layer.0.attention.self.dropout: called by" in text
        assert "dropout: called by the model (BertForSequenceClassification)" in text

    def test_eval_outputs_are_unchanged_by_the_surgery(self):
        model, x = tiny_bert().eval(), ids()
        with torch.no_grad():
            before = model(input_ids=x).logits
        fuse(model)
        model.eval()
        with torch.no_grad():
            after = model(input_ids=x).logits
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    def test_training_forward_equals_the_dense_reference_with_the_layers_mask(self):
        model = tiny_bert()
        fuse(model)
        model.train()
        layer = model.get_submodule(BERT_SITES[1].linear)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        layer.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
        mask = layer.dense_mask(B)
        model(input_ids=ids())
        ((x, y),) = seen
        reference = F.linear(x, layer.weight, layer.bias) * mask[:, None, :]
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
        assert bool((mask == 0).any()) and bool((mask != 0).any())

    def test_gradients_flow_to_every_fused_layer(self):
        model = tiny_bert()
        fuse(model)
        model.train()
        out = model(input_ids=ids(), labels=torch.tensor([0, 1, 2, 0]))
        out.loss.backward()
        for site in BERT_SITES:
            layer = model.get_submodule(site.linear)
            assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
            assert torch.isfinite(layer.weight.grad).all()


class TestGpt2:
    def test_conv1d_is_not_fused_and_the_warning_says_why(self):
        model = tiny_gpt2()
        state = {k: v.shape for k, v in model.state_dict().items()}
        count, text = fuse(model, "auto")
        assert count == 0
        assert "transformer.h.0.mlp.dropout:" in text
        assert "transformer.h.0.mlp.c_proj) is a Hugging Face Conv1D" in text
        assert "transformer.h.0.attn.resid_dropout: called by transformer.h.0.attn" in text
        assert {k: v.shape for k, v in model.state_dict().items()} == state
        assert not any(isinstance(m, BlockGyroLinear) for m in model.modules())
