"""apply_dropblock and remove_gyro_dropout on small conv and MLP models."""

import warnings

import pytest
import torch
from torch import nn

import gyrodrop


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Dropout2d(0.1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 8 * 8, 3),
    )


class TestApplyDropBlock:
    def test_replaces_every_dropout2d_keeping_its_p(self):
        net = conv_net()
        assert gyrodrop.apply_dropblock(net, block_size=3) == 2
        assert isinstance(net[2], gyrodrop.DropBlock2d) and net[2].p == 0.2
        assert isinstance(net[4], gyrodrop.DropBlock2d) and net[4].p == 0.1
        assert isinstance(net[6], nn.Dropout)  # plain dropout is not a feature-map dropout
        assert net[2].current_seed() != net[4].current_seed()

    def test_gyro_layers_share_the_schedule(self):
        net = conv_net()
        gyrodrop.apply_dropblock(
            net, p=0.3, block_size=3, gyro=True, num_subnets=8, subnets_per_step=2, total_steps=40
        )
        a, b = net[2], net[4]
        assert isinstance(a, gyrodrop.GyroDropBlock2d) and a.p == b.p == 0.3
        assert a.steps_per_set == 10
        assert torch.equal(a.active_subnets(), b.active_subnets())

    def test_eval_outputs_are_unchanged(self):
        net = conv_net().eval()
        x = torch.randn(2, 1, 8, 8)
        before = net(x)
        gyrodrop.apply_dropblock(net, block_size=3)
        assert torch.equal(net(x), before)
        assert not net[2].training

    def test_options_reach_the_layers(self):
        net = conv_net()
        gyrodrop.apply_dropblock(net, block_size=3, shared_channels=True, warmup_steps=5)
        assert net[2].shared_channels and net[2].warmup_steps == 5

    def test_gyro_options_are_refused_without_gyro(self):
        with pytest.raises(ValueError, match="apply_dropblock: total_steps"):
            gyrodrop.apply_dropblock(conv_net(), total_steps=10)
        with pytest.raises(TypeError, match="unexpected keyword arguments \\['schedule'\\]"):
            gyrodrop.apply_dropblock(conv_net(), schedule="random")

    def test_warns_when_nothing_matches(self):
        with pytest.warns(UserWarning, match="no nn.Dropout2d or nn.Dropout3d found"):
            assert gyrodrop.apply_dropblock(nn.Sequential(nn.Linear(2, 2))) == 0

    def test_trains_one_step(self):
        net = conv_net()
        gyrodrop.apply_dropblock(
            net, block_size=3, gyro=True, num_subnets=4, subnets_per_step=2, steps_per_set=2
        )
        loss = net(torch.randn(4, 1, 8, 8)).sum()
        loss.backward()
        assert net[0].weight.grad is not None
        assert int(net[2].step) == 1


class TestRemoveGyroDropout:
    def test_puts_back_the_types_p_and_state_dict_keys(self):
        net = nn.Sequential(
            nn.Linear(4, 4), nn.Dropout(0.3), nn.Dropout1d(0.2), nn.Linear(4, 2), nn.Dropout2d(0.1)
        )
        keys = list(net.state_dict())
        types = [type(m) for m in net]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_gyro_dropout(net, num_subnets=4, subnets_per_step=2)
        assert gyrodrop.remove_gyro_dropout(net) == 3
        assert [type(m) for m in net] == types
        assert [net[1].p, net[2].p, net[4].p] == [0.3, 0.2, 0.1]
        assert list(net.state_dict()) == keys

    def test_undoes_dropblock(self):
        net = conv_net()
        keys = list(net.state_dict())
        gyrodrop.apply_dropblock(
            net, block_size=3, gyro=True, steps_per_set=1, num_subnets=4, subnets_per_step=2
        )
        assert gyrodrop.remove_gyro_dropout(net) == 2
        assert type(net[2]) is nn.Dropout2d and net[2].p == 0.2
        assert list(net.state_dict()) == keys

    def test_block_gyro_linear_becomes_a_linear_with_the_same_parameters(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3))
        keys = list(net.state_dict())
        assert gyrodrop.apply_block_gyro(net, total_steps=10, block_size=8) == 1
        weight = net[3].weight
        x = torch.randn(2, 8)
        before = net.eval()(x)
        assert gyrodrop.remove_gyro_dropout(net) == 1
        assert type(net[3]) is nn.Linear and net[3].weight is weight
        assert list(net.state_dict()) == keys
        assert torch.equal(net(x), before)

    def test_a_model_without_gyrodrop_layers_is_left_alone(self):
        net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        assert gyrodrop.remove_gyro_dropout(net) == 0
        assert type(net[1]) is nn.Dropout


class TestBuiltinDropoutsAreNamed:
    def test_lstm_and_attention_dropout_are_reported_as_left_alone(self):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(4, 4, num_layers=2, dropout=0.3)
                self.attn = nn.MultiheadAttention(4, 2, dropout=0.1)
                self.quiet = nn.MultiheadAttention(4, 2)  # dropout 0: nothing to report
                self.drop = nn.Dropout(0.5)

        with pytest.warns(UserWarning, match="left alone") as record:
            assert gyrodrop.apply_gyro_dropout(Net(), total_steps=10) == 1
        message = next(str(w.message) for w in record if "left alone" in str(w.message))
        assert "rnn (LSTM, dropout=0.3)" in message
        assert "attn (MultiheadAttention, dropout=0.1)" in message
        assert "quiet" not in message

    def test_no_report_without_builtin_dropout(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gyrodrop.apply_gyro_dropout(
                nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), total_steps=10
            )
