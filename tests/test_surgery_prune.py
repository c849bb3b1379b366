"""prune_layers: the shallower plain model that keeps only the listed layers of a
stack trained with stochastic depth (nn.TransformerEncoder, Hugging Face BERT and
Llama), checked against running only the kept layers and against the model class
built at the smaller depth."""

import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop.stepping import SteppedModule
from gyrodrop.surgery import replace_drop_paths


def encoder(layers=4, d=8):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def train_a_little(net, x, steps=3):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def gyrodrop_leftovers(model):
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gyrodrop")]


class TestTransformerEncoder:
    def test_eval_output_equals_running_only_the_kept_layers(self):
        net = encoder(4)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        train_a_little(net, X)
        small = gyrodrop.prune_layers(net, [0, 3]).eval()
        net.eval()
        h = X
        for i in (0, 3):
            h = net.layers[i].layer(h)
        torch.testing.assert_close(small(X), h, rtol=0, atol=0)

    @given(keep=st.sets(st.integers(0, 4), min_size=1).map(sorted))
    @settings(max_examples=15, deadline=None)
    def test_any_kept_subset_runs_exactly_those_layers(self, keep):
        net = encoder(5)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.4, mode="sample")
        small = gyrodrop.prune_layers(net, keep).eval()
        net.eval()
        h = X
        for i in keep:
            h = net.layers[i].layer(h)
        assert torch.equal(small(X), h)
        assert small.num_layers == len(keep)

    @pytest.mark.filterwarnings("ignore::gyrodrop.SurgeryWarning")  # attention's own dropout
    def test_the_copy_is_plain_with_renumbered_keys_and_the_new_count(self):
        net = encoder(4)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        gyrodrop.apply_gyro_dropout(net, total_steps=10, num_subnets=4, subnets_per_step=2)
        small = gyrodrop.prune_layers(net, range(0, 4, 2))
        assert gyrodrop_leftovers(small) == []
        assert small.num_layers == 2 and len(small.layers) == 2
        assert "_gyrodrop_stepper" not in small.__dict__
        assert not small._forward_hooks and not small._forward_pre_hooks
        assert list(small.state_dict()) == list(encoder(2).state_dict())
        assert type(small.layers[0].dropout) is nn.Dropout  # gyro dropout undone

    def test_the_model_given_is_left_unchanged(self):
        net = encoder(3)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        keys = list(net.state_dict())
        net.eval()
        before = net(X)
        gyrodrop.prune_layers(net, [1])
        assert list(net.state_dict()) == keys and len(net.layers) == 3
        torch.testing.assert_close(net(X), before, rtol=0, atol=0)

    def test_a_model_without_stochastic_depth_prunes_too(self):
        net = encoder(3).eval()
        small = gyrodrop.prune_layers(net, [2]).eval()
        torch.testing.assert_close(small(X), net.layers[2](X), rtol=0, atol=0)

    def test_standalone_stochastic_depth_modules_become_identity(self):
        class DropPath(nn.Module):
            def __init__(self, drop_prob):
                super().__init__()
                self.drop_prob = drop_prob

            def forward(self, x):
                return x

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = encoder(2)
                self.drop_path = DropPath(0.1)

            def forward(self, x):
                return self.drop_path(self.enc(x))

        net = Net()
        assert replace_drop_paths(net) == 1
        small = gyrodrop.prune_layers(net, [1])
        assert isinstance(small.drop_path, nn.Identity) and gyrodrop_leftovers(small) == []

    def test_two_stacks_take_a_mapping_and_others_stay_whole(self):
        torch.manual_seed(0)
        net = nn.Transformer(8, 2, 3, 2, 16, dropout=0.0, batch_first=True)
        with pytest.raises(ValueError, match=r"prune_layers: model has 2 layer stacks"):
            gyrodrop.prune_layers(net, [0])
        small = gyrodrop.prune_layers(net, {"encoder.layers": [0, 2]})
        assert small.encoder.num_layers == 2 and len(small.decoder.layers) == 2


transformers = pytest.importorskip("transformers")


def bert(layers):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(config)


def llama(layers):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))


def renumbered(state, stack, keep):
    """The state dict of ``keep``'s layers under the keys of a model of that depth."""
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.")
    out = {}
    for key, value in state.items():
        m = pattern.match(key) if key.startswith(stack) else None
        if m is None:
            out[key] = value
        elif int(m.group(1)) in keep:
            out[f"{stack}.{keep.index(int(m.group(1)))}.{key[m.end() :]}"] = value
    return out


@pytest.mark.parametrize(
    ("build", "stack"), [(bert, "bert.encoder.layer"), (llama, "model.layers")]
)
class TestHuggingFace:
    def test_matches_the_class_built_at_the_smaller_depth(self, build, stack):
        net = build(4)
        original = {k: v.clone() for k, v in net.state_dict().items()}
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.3)
        keep = [0, 2, 3]
        small = gyrodrop.prune_layers(net, keep).eval()
        assert small.config.num_hidden_layers == 3 and gyrodrop_leftovers(small) == []
        reference = build(3).eval()
        reference.load_state_dict(renumbered(original, stack, keep))
        assert list(small.state_dict()) == list(reference.state_dict())
        torch.testing.assert_close(small(IDS).logits, reference(IDS).logits, rtol=0, atol=0)

    def test_save_and_load_pretrained_round_trip(self, build, stack, tmp_path):
        net = build(3)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.3)
        small = gyrodrop.prune_layers(net, [1, 2]).eval()
        small.save_pretrained(tmp_path)
        loaded = type(small).from_pretrained(tmp_path).eval()
        assert loaded.config.num_hidden_layers == 2
        torch.testing.assert_close(loaded(IDS).logits, small(IDS).logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # past_key_values renamed upstream
def test_llama_layer_indices_are_renumbered_so_the_kv_cache_decodes_correctly():
    small = gyrodrop.prune_layers(llama(4), [1, 3]).eval()
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    with torch.no_grad():
        full = small(IDS).logits
        first = small(IDS[:, :5], use_cache=True)
        last = small(IDS[:, 5:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


class TestRefusals:
    @pytest.mark.parametrize(
        ("keep", "message"),
        [
            ([2, 1], r"prune_layers: keep must be distinct layer indices in increasing order"),
            ([1, 1], r"prune_layers: keep must be distinct layer indices in increasing order"),
            ([0, 4], r"prune_layers: keep\[1\] must be in \[0, 3\], got 4"),
            ([-1], r"prune_layers: keep\[0\] must be in \[0, 3\], got -1"),
            ([], r"prune_layers: keep must keep at least one layer"),
            (2, r"prune_layers: keep must be a sequence of layer indices, got 2"),
            ([0.0], r"prune_layers: keep\[0\] must be an int"),
            ({"nope": [0]}, r"prune_layers: keep names 'nope', which is not a layer stack"),
            ({}, r"prune_layers: keep must name at least one stack"),
        ],
    )
    def test_bad_keep_is_refused_in_one_line_naming_it(self, keep, message):
        with pytest.raises(ValueError, match=message) as err:
            gyrodrop.prune_layers(encoder(4), keep)
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize(
        "keep",
        [torch.tensor([0, 3]), np.array([0, 3]), np.arange(0, 4, 3), torch.tensor([0, 3]).int()],
    )
    def test_a_1d_tensor_or_array_of_indices_is_taken_as_its_list(self, keep):
        # keep=np.where(mask)[0] or torch.nonzero(...): the indices, not "not a sequence".
        net = encoder(4)
        gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        small = gyrodrop.prune_layers(net, keep)
        assert len(small.layers) == 2
        want = gyrodrop.prune_layers(net, [0, 3]).eval()
        torch.testing.assert_close(small.eval()(X), want(X), rtol=0, atol=0)

    @pytest.mark.parametrize(
        "keep", [torch.tensor(1), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0])]
    )
    def test_a_tensor_that_is_not_1d_integer_indices_is_refused_naming_keep(self, keep):
        with pytest.raises(ValueError, match=r"prune_layers: keep"):
            gyrodrop.prune_layers(encoder(4), keep)

    def test_a_model_without_a_stack_is_refused(self):
        with pytest.raises(ValueError, match=r"prune_layers: model has no layer stack"):
            gyrodrop.prune_layers(nn.Sequential(nn.Linear(2, 2)), [0])

    def test_a_non_module_is_refused(self):
        with pytest.raises(ValueError, match=r"prune_layers: model must be a torch.nn.Module"):
            gyrodrop.prune_layers("model", [0])


def test_a_pruned_copy_trains_with_no_gyrodrop_step_or_warning():
    net = encoder(2)
    gyrodrop.apply_stochastic_depth(net, drop_rate=0.2)
    small = gyrodrop.prune_layers(net, [0])
    assert not any(isinstance(m, SteppedModule) for m in small.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small.train()(X).sum().backward()
