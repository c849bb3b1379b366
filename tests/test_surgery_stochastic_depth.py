"""apply_stochastic_depth and StochasticDepthBlock on torchvision-shaped residual nets
written here, on gyrodrop's ResNet-18 and on user blocks."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import nn

import gyrodrop
from gyrodrop import distributed
from gyrodrop.stochastic_depth import ResidualBlock, StochasticDepthBlock, block_keep
from gyrodrop.surgery import find_residual_blocks, remove_stochastic_depth
from statcheck import ALPHA

# -- a torchvision-shaped ResNet (same attribute names and forward as torchvision's) -----


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """Stem, one stage of basic blocks, one stage of bottlenecks, head."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width)
        )
        self.layer1 = nn.Sequential(
            TVBasicBlock(width, width), TVBasicBlock(width, 2 * width, 2, down)
        )
        down2 = nn.Sequential(
            nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        )
        self.layer2 = nn.Sequential(
            TVBottleneck(2 * width, width, 1, down2), TVBottleneck(4 * width, width)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def trained_bn(model, steps=3):
    """Give BatchNorm non-trivial running statistics (so eval differs from train)."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)))
    return model


def wrapped(model):
    return [m for m in model.modules() if isinstance(m, StochasticDepthBlock)]


def x16(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- user blocks --------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """A user block following the ResidualBlock protocol (no post)."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def branch(self, x):
        return self.fc(torch.relu(self.norm(x)))

    def shortcut(self, x):
        return x

    def forward(self, x):
        return self.shortcut(x) + self.branch(x)


class PostBlock(PreActBlock):
    """The protocol with ``post``, working in place on its input."""

    def post(self, y):
        return y.relu_()

    def forward(self, x):
        return self.post(self.shortcut(x) + self.branch(x))


class KuangliuBlock(nn.Module):
    """The popular CIFAR ResNet block: a ``shortcut`` Sequential and functional ReLUs."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class NoFinalReluBlock(TVBasicBlock):
    """torchvision names, but a different forward: the probe must reject it."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + x


class ExtraChildBlock(TVBasicBlock):
    """torchvision names plus a dropout inside: we could not replay it, so not found."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.drop = nn.Dropout(0.1)


class TestApplyStochasticDepth:
    def test_wraps_every_basic_and_bottleneck_block(self):
        model = TVResNet()
        assert gyrodrop.apply_stochastic_depth(model, drop_rate=0.3) == 4
        assert all(isinstance(b, StochasticDepthBlock) for b in [*model.layer1, *model.layer2])
        assert isinstance(model.layer2[0].block, TVBottleneck)

    def test_eval_output_is_exactly_unchanged(self):
        model = trained_bn(TVResNet()).eval()
        x = x16()
        before = model(x)
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, mode="sample")
        assert torch.equal(model(x), before)
        model.train()
        model(x)  # training steps do not change eval either
        model.eval()
        assert torch.equal(model(x), model(x))

    def test_surgery_keeps_the_models_mode(self):
        model = TVResNet().eval()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5)
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())

    def test_the_probe_leaves_batchnorm_and_modes_alone(self):
        model = trained_bn(TVResNet())
        stats = copy.deepcopy(model.state_dict())
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5)
        inner = {
            k.replace("block.", ""): v
            for k, v in model.state_dict().items()
            if "stochastic_depth" not in k
        }
        assert inner.keys() == stats.keys()
        assert all(torch.equal(inner[k], stats[k]) for k in stats)
        assert all(m.training for m in model.modules())

    def test_gyrodrop_resnet18_is_found(self):
        from gyrodrop.experiments.models import ResNet18

        net = ResNet18((3, 16, 16), (16,), 4, 0.0, base=4).eval()
        x = x16(2)
        before = net(x)
        assert gyrodrop.apply_stochastic_depth(net) == 8
        assert torch.equal(net(x), before)

    def test_linear_distribution_grows_with_depth(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.4, drop_distribution="linear")
        rates = [b.stochastic_depth.p for b in wrapped(model)]
        assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4])

    def test_uniform_distribution_gives_every_block_the_rate(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.4, drop_distribution="uniform")
        assert [b.stochastic_depth.p for b in wrapped(model)] == [0.4] * 4

    def test_blocks_get_distinct_seeds_fixed_by_the_seed(self):
        seeds = []
        for seed in (0, 0, 1):
            model = TVResNet()
            gyrodrop.apply_stochastic_depth(model, seed=seed)
            seeds.append([int(b.stochastic_depth.seed) for b in wrapped(model)])
        assert len(set(seeds[0])) == 4 and seeds[0] == seeds[1] and seeds[0] != seeds[2]

    def test_warmup_reaches_the_full_rate_at_the_end_of_warmup(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(
            model, drop_rate=0.4, drop_distribution="uniform", drop_warmup=0.25, total_steps=40
        )
        sd = wrapped(model)[0].stochastic_depth
        assert sd.warmup_steps == 10
        assert [sd.rate(s) for s in (0, 5, 10, 39)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
        x = x16(2)
        for _ in range(10):
            model(x)
        assert sd.rate() == pytest.approx(0.4)

    def test_warmup_needs_total_steps(self):
        with pytest.raises(ValueError, match="drop_warmup=0.1 needs total_steps"):
            gyrodrop.apply_stochastic_depth(TVResNet(), drop_warmup=0.1)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"drop_rate": 1.0}, r"apply_stochastic_depth: drop_rate must be in \[0, 1\), got 1.0"),
            ({"drop_distribution": "log"}, r"drop_distribution must be one of"),
            ({"mode": "batch"}, r"mode must be one of \('block', 'sample'\)"),
            ({"drop_warmup": 1.5, "total_steps": 10}, r"drop_warmup must be in \[0, 1\]"),
            ({"total_steps": 0}, r"total_steps must be >= 1"),
            ({"seed": -3}, r"seed must be in"),
            ({"target": 3}, r"target must be None, a module type"),
        ],
    )
    def test_invalid_arguments_are_rejected(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            gyrodrop.apply_stochastic_depth(TVResNet(), **kwargs)

    def test_a_model_without_blocks_warns_and_returns_zero(self):
        model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        with pytest.warns(UserWarning, match="no residual block found"):
            assert gyrodrop.apply_stochastic_depth(model) == 0

    def test_applying_twice_wraps_nothing_more(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(model)
        with pytest.warns(UserWarning, match="no residual block found"):
            assert gyrodrop.apply_stochastic_depth(model) == 0
        assert len(wrapped(model)) == 4

    def test_kuangliu_style_blocks_are_found(self):
        model = nn.Sequential(KuangliuBlock(3, 4), KuangliuBlock(4, 8, 2)).eval()
        x = x16()
        before = model(x)
        assert gyrodrop.apply_stochastic_depth(model) == 2
        assert torch.equal(model(x), before)

    def test_lookalike_blocks_with_another_forward_or_extra_children_are_not_wrapped(self):
        model = nn.Sequential(NoFinalReluBlock(3, 3), ExtraChildBlock(3, 3))
        with pytest.warns(UserWarning, match="no residual block found"):
            assert gyrodrop.apply_stochastic_depth(model) == 0

    def test_protocol_blocks_are_found_without_target(self):
        model = nn.Sequential(PreActBlock(6), nn.Linear(6, 6), PostBlock(6)).eval()
        assert isinstance(model[0], ResidualBlock)
        x = torch.randn(5, 6)
        before = model(x)
        assert gyrodrop.apply_stochastic_depth(model) == 2
        assert torch.equal(model(x), before)

    def test_target_type_and_predicate_select_blocks(self):
        model = TVResNet()
        assert gyrodrop.apply_stochastic_depth(model, target=TVBottleneck) == 2
        other = TVResNet()
        only_layer1 = {id(m) for m in other.layer1}
        n = gyrodrop.apply_stochastic_depth(other, target=lambda m: id(m) in only_layer1)
        assert n == 2 and isinstance(other.layer1[0], StochasticDepthBlock)
        assert not isinstance(other.layer2[0], StochasticDepthBlock)

    def test_target_naming_a_shape_changing_module_is_refused_at_surgery(self):
        model = nn.Sequential(nn.Linear(2, 3))
        message = r"layer '0' returns hidden states of shape \(2, 3, 3\)"
        with pytest.raises(ValueError, match=message):
            gyrodrop.apply_stochastic_depth(model, target=nn.Linear)
        assert isinstance(model[0], nn.Linear)

    def test_blocks_nested_in_a_found_block_are_skipped(self):
        class Outer(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = TVBasicBlock(3, 3)

            def branch(self, x):
                return self.inner(x)

            def shortcut(self, x):
                return x

            def forward(self, x):
                return x + self.inner(x)

        model = nn.Sequential(Outer(), TVBasicBlock(3, 3))
        found = find_residual_blocks(model)
        assert [name for name, _, _ in found] == ["0", "1"]

    def test_remove_puts_the_original_blocks_back(self):
        model = trained_bn(TVResNet()).eval()
        blocks = [*model.layer1, *model.layer2]
        keys = list(model.state_dict())
        gyrodrop.apply_stochastic_depth(model)
        assert remove_stochastic_depth(model) == 4
        assert [*model.layer1, *model.layer2] == blocks
        assert list(model.state_dict()) == keys


class TestStochasticDepthBlock:
    def test_a_dropped_branch_is_not_computed_and_gets_no_gradient(self):
        model = trained_bn(TVResNet())
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, drop_distribution="uniform")
        calls = []
        for b in wrapped(model):
            b.block.conv1.register_forward_hook(lambda m, i, o, b=b: calls.append(b))
        seeds = [int(b.stochastic_depth.seed) for b in wrapped(model)]
        model.zero_grad(set_to_none=True)
        model(x16()).sum().backward()
        for b, seed in zip(wrapped(model), seeds, strict=True):
            kept = block_keep(seed, 0, 0.5)
            assert (b in calls) == kept
            assert (b.block.conv1.weight.grad is not None) == kept

    def test_training_output_is_shortcut_plus_scaled_branch_or_shortcut_alone(self):
        block = trained_bn(nn.Sequential(TVBasicBlock(3, 3)))[0]
        sd_block = StochasticDepthBlock(copy.deepcopy(block), 0.5, seed=5)
        x = x16()
        for step in range(6):
            y = sd_block(x)
            with torch.no_grad():  # train-mode BN: batch statistics, as in sd_block
                out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
            expected = F.relu(x + 2 * out) if block_keep(5, step, 0.5) else F.relu(x)
            assert torch.allclose(y, expected, atol=1e-5)

    def test_inplace_relu_after_a_dropped_identity_branch_keeps_autograd_intact(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.9, drop_distribution="uniform")
        for step in range(8):  # most steps drop blocks with an identity shortcut
            inp = x16(4, seed=step).requires_grad_(True)
            model(inp).sum().backward()
            assert inp.grad is not None

    def test_block_drop_rate_over_steps_passes_a_binomial_test(self):
        sd_block = StochasticDepthBlock(PreActBlock(4), 0.3, seed=17)
        calls = []
        sd_block.block.fc.register_forward_hook(lambda *a: calls.append(1))
        n = 1000
        for _ in range(n):
            sd_block(torch.ones(2, 4))
        assert binomtest(n - len(calls), n, 0.3).pvalue > ALPHA

    def test_sample_mode_drops_rows(self):
        sd_block = StochasticDepthBlock(PostBlock(4), 0.5, "sample", seed=1)
        x = torch.randn(64, 4)
        y = sd_block(x)
        relu_x = x.relu()
        dropped = (y == relu_x).all(dim=1)
        assert 0 < int(dropped.sum()) < 64

    def test_post_that_works_in_place_never_touches_the_callers_input(self):
        sd_block = StochasticDepthBlock(PostBlock(4), 0.9, seed=0)
        x = torch.randn(3, 4)
        before = x.clone()
        for _ in range(20):
            sd_block(x)
        assert torch.equal(x, before)

    def test_block_decisions_are_the_same_on_every_rank(self, monkeypatch):
        computed = {}
        for rank in range(3):
            monkeypatch.setattr(distributed, "row_window", lambda b, r=rank: (r * b, 3 * b))
            model = TVResNet()
            gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, seed=4)
            seen: list = []
            for i, b in enumerate(wrapped(model)):
                b.block.conv1.register_forward_hook(lambda *a, i=i, seen=seen: seen.append(i))
            for _ in range(5):
                model(x16(2, seed=rank))
                seen.append("|")
            computed[rank] = seen
        assert computed[0] == computed[1] == computed[2]

    def test_gradient_accumulation_with_auto_step_off(self):
        model = TVResNet()
        gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, auto_step=False)
        for _ in range(3):
            model(x16(2))
        assert {int(b.stochastic_depth.step) for b in wrapped(model)} == {0}
        gyrodrop.step(model)
        assert {int(b.stochastic_depth.step) for b in wrapped(model)} == {1}

    def test_state_dict_resumes_the_decisions(self):
        a = TVResNet()
        gyrodrop.apply_stochastic_depth(a, drop_rate=0.5, seed=2)
        for _ in range(3):
            a(x16(2))
        b = TVResNet()
        gyrodrop.apply_stochastic_depth(b, drop_rate=0.5, seed=9)
        b.load_state_dict(a.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = x16(2)
            assert torch.allclose(a(x), b(x))
        assert [int(m.stochastic_depth.step) for m in wrapped(b)] == [4] * 4

    @pytest.mark.parametrize("mode", ["block", "sample"])
    def test_compiled_model_matches_eager_step_by_step(self, mode):
        eager = nn.Sequential(PreActBlock(4), PostBlock(4))
        gyrodrop.apply_stochastic_depth(eager, drop_rate=0.5, mode=mode, seed=3)
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, backend="aot_eager")
        for step in range(4):
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
            assert torch.allclose(compiled(x), eager(x), atol=1e-6)
        assert [int(b.stochastic_depth.step) for b in wrapped(model)] == [4, 4]
