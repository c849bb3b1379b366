"""mc_predict / subnet_ensemble_predict on dict batches and ModelOutput-style outputs
(Hugging Face BERT from a tiny config, no downloads)."""

import warnings

import pytest
import torch
from torch import nn

import gyrodrop

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


IDS = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones(4, 6, dtype=torch.long)}


class TestDictBatches:
    def test_mc_predict_takes_keyword_batches_and_reads_logits(self):
        model = bert()
        pred = gyrodrop.mc_predict(model, BATCH, samples=6, seed=1)
        assert pred.mean.shape == (4, 3)
        assert torch.allclose(pred.mean.sum(-1), torch.ones(4))
        assert float(pred.mutual_info.sum()) > 0  # BERT's nn.Dropout is sampled
        again = gyrodrop.mc_predict(model, BATCH, samples=6, seed=1)
        assert torch.equal(pred.mean, again.mean)

    def test_attention_mask_reaches_the_model(self):
        model = bert()
        masked = dict(BATCH, attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]] * 4))
        a = gyrodrop.mc_predict(model, BATCH, samples=2, seed=0)
        b = gyrodrop.mc_predict(model, masked, samples=2, seed=0)
        assert not torch.allclose(a.mean, b.mean)

    def test_subnet_ensemble_on_a_gyro_bert(self):
        model = bert()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_gyro_dropout(
                model, num_subnets=4, subnets_per_step=2, steps_per_set=1, dims=(-1,)
            )
        pred = gyrodrop.subnet_ensemble_predict(model, BATCH)
        assert pred.mean.shape == (4, 3)
        assert torch.equal(pred.mean, gyrodrop.subnet_ensemble_predict(model, BATCH).mean)

    def test_output_fn_picks_the_scores(self):
        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
                self.drop = nn.Dropout(0.5)

            def forward(self, features, scale=1.0):
                return {"scores": self.drop(self.fc(features)) * scale, "extra": None}

        x = {"features": torch.randn(5, 3), "scale": 2.0}
        pred = gyrodrop.mc_predict(Pair(), x, samples=4, output_fn=lambda out: out["scores"])
        assert pred.mean.shape == (5, 2)

    def test_output_without_logits_needs_output_fn(self):
        class Dicty(nn.Module):
            def forward(self, x):
                return {"scores": x}

        with (
            warnings.catch_warnings(),
            pytest.raises(ValueError, match="mc_predict: the model returned a dict"),
        ):
            warnings.simplefilter("ignore")
            gyrodrop.mc_predict(Dicty(), torch.randn(2, 3), samples=2)

    def test_dict_tensors_must_share_their_rows(self):
        bad = {"input_ids": IDS, "attention_mask": torch.ones(3, 6, dtype=torch.long)}
        with pytest.raises(ValueError, match="must hold tensors \\(N, \\*\\) sharing N"):
            gyrodrop.mc_predict(bert(), bad, samples=2)
