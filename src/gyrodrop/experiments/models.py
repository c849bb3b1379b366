"""The paper's models, written here (torchvision is not a dependency).

Every model has the same three parts, so the experiments can treat them alike:

- ``features``: input -> last hidden activation, shape ``(B, F)``;
- ``dropout``: the dropout on that activation (``nn.Dropout(p)``, or ``nn.Identity``
  when ``p == 0``);
- ``classifier``: the last ``nn.Linear``, ``(B, F) -> (B, num_classes)``.

Dropout sits where the paper puts it: on the hidden activations that feed the
fully-connected layers (Figure 3, right: dropout on the outputs of layers 1 and 2 of a
three-layer MLP), never on the input and never inside the convolutions. Each dropout is
an ``nn.Dropout`` immediately followed by an ``nn.Linear``, so
:func:`gyrodrop.apply_gyro_dropout` and :func:`gyrodrop.apply_block_gyro` find them all.

The paper does not state layer widths; ours are listed in :data:`DEFAULT_WIDTHS` and are
multiples of 32 so block-wise dropout's default 32-wide blocks tile every FC input.

Inputs: ``in_shape`` is the shape of one example without the batch dim. MLPs flatten
any shape. Convolutional nets take ``(C, H, W)``; a flat input whose size is a perfect
square (e.g. scikit-learn digits, 64 = 8 x 8) is viewed as ``(1, s, s)``. An adaptive
average pool before the FC layers makes LeNet and AlexNet work on 8x8, 28x28 and 32x32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = [
    "MODELS",
    "DEFAULT_WIDTHS",
    "MLP",
    "LeNet",
    "AlexNet",
    "BasicBlock",
    "ResNet18",
    "PaperMLP",
    "PaperConvNet",
    "PAPER_CONV",
    "build_model",
    "image_shape",
]

#: Model names accepted by :func:`build_model` and ``--model``.
MODELS: tuple[str, ...] = (
    "mlp",
    "mlp1",
    "mlp2",
    "lenet",
    "alexnet",
    "resnet18",
    "paper-mlp",
    "paper-lenet",
    "paper-alexnet",
)

#: Hidden FC widths per model (the input of every FC layer but the first).
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "mlp": (256, 256),  # small default: 3 FC, seconds on digits
    "mlp1": (1024, 1024),  # paper's MLP1: 3 x FC
    "mlp2": (512, 512, 512),  # paper's MLP2: 4 x FC
    "lenet": (128, 96),  # 2 x conv + 3 x FC (classic 120/84 rounded up to 32s)
    "alexnet": (1024, 512),  # 3 x conv + 3 x FC
    "resnet18": (512,),  # 17 x conv + 2 x FC
    # the authors' TensorFlow models (mlsys-seo/gyro-dropout): FC width 1024
    "paper-mlp": (1024, 1024, 1024),  # 4 x FC
    "paper-lenet": (1024, 1024),  # 2 x conv + 3 x FC
    "paper-alexnet": (1024, 1024),  # 3 x conv + 3 x FC
}

#: Conv layers of the authors' models: ``(out_channels, max-pool 2x2 after it)``, all
#: 5x5, stride 1, 'SAME' padding, ReLU, no bias.
PAPER_CONV: dict[str, tuple[tuple[int, bool], ...]] = {
    "paper-lenet": ((96, True), (256, False)),
    "paper-alexnet": ((96, True), (256, True), (384, False)),
}


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _fc_stack(
    in_features: int, widths: Sequence[int], p: float, bias: bool = True
) -> list[nn.Module]:
    """Linear+ReLU layers through ``widths``, dropout before every Linear but the first."""
    layers: list[nn.Module] = []
    dims = [in_features, *widths]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        if i > 0:
            layers.append(_dropout(p))
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return layers


def image_shape(owner: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` for a convolutional net, from an example's shape.

    A 1-d shape whose size is a perfect square is read as one channel, ``(1, s, s)``.

    Example:
        >>> image_shape("lenet", (64,))
        (1, 8, 8)
        >>> image_shape("lenet", (3, 32, 32))
        (3, 32, 32)
    """
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0] and side >= 4:
            return (1, side, side)
    raise ValueError(
        f"{owner}: needs image inputs (C, H, W), (H, W) or a flat square image, got an "
        f"example shape of {shape}; hint: use --model mlp, mlp1 or mlp2 for tabular data"
    )


class _Classifier(nn.Module):
    """``classifier(dropout(features(x)))``; subclasses build ``features`` first, then
    call :meth:`_head`, so module order is input to output (each dropout is followed by
    the Linear it feeds in ``named_modules()``)."""

    features: nn.Module

    def _head(self, width: int, num_classes: int, p: float, bias: bool = True) -> None:
        self.dropout = _dropout(p)
        self.classifier = nn.Linear(width, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, ``(B, num_classes)``."""
        return self.classifier(self.dropout(self.features(x)))


class MLP(_Classifier):
    """Fully-connected net: ``len(widths) + 1`` Linear layers, dropout before all but
    the first.

    Args:
        in_shape: shape of one example (flattened).
        widths: hidden widths.
        num_classes: output size.
        p: dropout rate (0 -> no dropout layers).

    Example:
        >>> import torch
        >>> net = MLP((64,), (32, 32), 10, 0.5)
        >>> net(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self, in_shape: Sequence[int], widths: Sequence[int], num_classes: int, p: float
    ) -> None:
        if not widths:
            raise ValueError("MLP: widths must name at least one hidden layer, got ()")
        super().__init__()
        in_features = math.prod(int(s) for s in in_shape)
        self.features = nn.Sequential(nn.Flatten(), *_fc_stack(in_features, widths, p))
        self._head(widths[-1], num_classes, p)


class _ConvNet(_Classifier):
    """Conv body -> adaptive pool -> flatten -> FC stack (dropout between FCs)."""

    def __init__(
        self,
        body: nn.Sequential,
        body_channels: int,
        pool: int,
        in_shape: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        p: float,
    ) -> None:
        super().__init__()
        chw = image_shape(type(self).__name__, in_shape)
        self.features = nn.Sequential(
            nn.Unflatten(1, chw) if len(tuple(in_shape)) != 3 else nn.Identity(),
            *body,
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            *_fc_stack(body_channels * pool * pool, widths, p),
        )
        self._head(widths[-1], num_classes, p)


class LeNet(_ConvNet):
    """LeNet-5 style: 2 conv (6 and 16 channels, 5x5) + 3 FC.

    Example:
        >>> import torch
        >>> LeNet((1, 28, 28), (128, 96), 10, 0.5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_shape: Sequence[int], widths: Sequence[int], num_classes: int, p: float
    ) -> None:
        c = image_shape("LeNet", in_shape)[0]
        body = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        super().__init__(body, 16, 5, in_shape, widths, num_classes, p)


class AlexNet(_ConvNet):
    """AlexNet-style net for 32x32 inputs: 3 conv (64, 128, 256 channels) + 3 FC.

    Example:
        >>> import torch
        >>> AlexNet((3, 32, 32), (64, 32), 10, 0.5)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_shape: Sequence[int], widths: Sequence[int], num_classes: int, p: float
    ) -> None:
        c = image_shape("AlexNet", in_shape)[0]
        body = nn.Sequential(
            nn.Conv2d(c, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 128, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        super().__init__(body, 256, 4, in_shape, widths, num_classes, p)


class BasicBlock(nn.Module):
    """ResNet basic block, torchvision-shaped attribute names.

    ``forward(x) = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the
    shortcut is ``downsample(x)`` (1x1 conv + BN) when the shape changes, else ``x``.

    Example:
        >>> import torch
        >>> BasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(_Classifier):
    """CIFAR-style ResNet-18: 3x3 stem (no max-pool), 4 stages of 2 :class:`BasicBlock`
    (64, 128, 256, 512 channels), global average pool, 2 FC with dropout between.

    Attributes follow torchvision: ``conv1, bn1, relu, layer1..layer4, avgpool``; the FC
    part is ``features``' tail, ``dropout`` and ``classifier``.

    Example:
        >>> import torch
        >>> net = ResNet18((3, 32, 32), (32,), 10, 0.5, base=8)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        p: float,
        *,
        base: int = 64,
    ) -> None:
        super().__init__()
        chw = image_shape("ResNet18", in_shape)
        self.unflatten = nn.Unflatten(1, chw) if len(tuple(in_shape)) != 3 else nn.Identity()
        self.conv1 = nn.Conv2d(chw[0], base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        planes = [base, base * 2, base * 4, base * 8]
        stages = []
        in_planes = base
        for i, width in enumerate(planes):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(in_planes, width, stride), BasicBlock(width, width))
            )
            in_planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), *_fc_stack(in_planes, widths, p))
        self._head(widths[-1], num_classes, p)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Last hidden activation, ``(B, widths[-1])``."""
        x = self.relu(self.bn1(self.conv1(self.unflatten(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))


def _xavier_no_bias(model: nn.Module) -> None:
    """Xavier-uniform (Glorot) init of every conv and linear weight, like TensorFlow's
    ``xavier_initializer`` (fans include the kernel area)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            assert m.bias is None


class PaperMLP(_Classifier):
    """The authors' MLP: ``len(widths) + 1`` bias-free Linear layers, ReLU, dropout after
    every hidden ReLU, Xavier-uniform init (4 FC of width 1024 by default).

    Example:
        >>> import torch
        >>> net = PaperMLP((1, 24, 24), (1024, 1024, 1024), 10, 0.5)
        >>> sum(p.numel() for p in net.parameters()) == 576 * 1024 + 2 * 1024**2 + 10240
        True
    """

    def __init__(
        self, in_shape: Sequence[int], widths: Sequence[int], num_classes: int, p: float
    ) -> None:
        if not widths:
            raise ValueError("PaperMLP: widths must name at least one hidden layer, got ()")
        super().__init__()
        in_features = math.prod(int(s) for s in in_shape)
        self.features = nn.Sequential(nn.Flatten(), *_fc_stack(in_features, widths, p, bias=False))
        self._head(widths[-1], num_classes, p, bias=False)
        _xavier_no_bias(self)


class PaperConvNet(_Classifier):
    """The authors' LeNet or AlexNet: 5x5 'SAME' convs with ReLU (and 2x2 'SAME' max
    pools) from :data:`PAPER_CONV`, flatten, bias-free FC layers with dropout after
    every hidden ReLU, Xavier-uniform init.

    Args:
        kind: ``"paper-lenet"`` or ``"paper-alexnet"``.
        in_shape: one example's shape (``(C, H, W)`` or a flat square image).
        widths: hidden FC widths (default 1024, 1024).
        num_classes: output size.
        p: dropout rate.
        width_mult: multiplies every conv's channel count (rounded, at least 1) to make
            the net affordable on a CPU; 1.0 is the authors' net.

    Example:
        >>> import torch
        >>> net = PaperConvNet("paper-lenet", (1, 24, 24), (1024, 1024), 10, 0.5)
        >>> [tuple(m.weight.shape) for m in net.modules() if isinstance(m, nn.Conv2d)]
        [(96, 1, 5, 5), (256, 96, 5, 5)]
        >>> net(torch.zeros(2, 1, 24, 24)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        kind: str,
        in_shape: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        p: float,
        *,
        width_mult: float = 1.0,
    ) -> None:
        if kind not in PAPER_CONV:
            raise ValueError(f"PaperConvNet: kind must be one of {list(PAPER_CONV)}, got {kind!r}")
        if not width_mult > 0:
            raise ValueError(f"PaperConvNet: width_mult must be > 0, got {width_mult}")
        super().__init__()
        c, h, w = image_shape(kind, in_shape)
        layers: list[nn.Module] = []
        if len(tuple(in_shape)) != 3:
            layers.append(nn.Unflatten(1, (c, h, w)))
        for channels, pool in PAPER_CONV[kind]:
            out = max(1, int(round(channels * width_mult)))
            layers += [nn.Conv2d(c, out, 5, padding=2, bias=False), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                h, w = -(-h // 2), -(-w // 2)
            c = out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers, *_fc_stack(c * h * w, widths, p, bias=False))
        self._head(widths[-1], num_classes, p, bias=False)
        _xavier_no_bias(self)


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    p: float,
    *,
    widths: Sequence[int] | None = None,
    width_mult: float | None = None,
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for examples of shape ``in_shape``.

    Args:
        name: ``mlp`` (small default), ``mlp1`` (3 FC), ``mlp2`` (4 FC), ``lenet``,
            ``alexnet``, ``resnet18``; or the authors' bias-free, Xavier-initialized
            models ``paper-mlp`` (4 FC of 1024), ``paper-lenet`` (conv 5x5/96, pool,
            conv 5x5/256, FC 1024, FC 1024, FC) and ``paper-alexnet`` (conv 5x5/96,
            pool, conv 5x5/256, pool, conv 5x5/384, FC 1024, FC 1024, FC).
        in_shape: one example's shape, without the batch dim, e.g. ``(64,)``,
            ``(1, 28, 28)``, ``(3, 32, 32)``.
        num_classes: number of classes (>= 2).
        p: dropout rate in ``[0, 1)``; 0 builds no dropout layers at all.
        widths: hidden FC widths; default :data:`DEFAULT_WIDTHS` ``[name]``.
        width_mult: conv channel multiplier of ``paper-lenet`` and ``paper-alexnet``
            (default 1.0, the authors' width); not allowed for other models.

    Parameters are initialised from torch's global generator: wrap the call in
    ``torch.random.fork_rng()`` with a seed for a reproducible init (the trainer does).

    Example:
        >>> import torch
        >>> net = build_model("mlp2", (1, 28, 28), 10, 0.5)
        >>> sum(isinstance(m, nn.Dropout) for m in net.modules())
        3
        >>> net(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    if name not in MODELS:
        raise ValueError(f"build_model: name must be one of {', '.join(MODELS)}, got {name!r}")
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"build_model: p must be in [0, 1), got {p!r}")
    if int(num_classes) < 2:
        raise ValueError(f"build_model: num_classes must be >= 2, got {num_classes}")
    shape = tuple(int(s) for s in in_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"build_model: in_shape must be non-empty and positive, got {shape}")
    w = tuple(int(v) for v in (widths if widths is not None else DEFAULT_WIDTHS[name]))
    if not w or any(v < 1 for v in w):
        raise ValueError(f"build_model: widths must be positive ints, got {w}")
    p = float(p)
    if width_mult is not None and name not in PAPER_CONV:
        raise ValueError(
            f"build_model: width_mult applies to {', '.join(PAPER_CONV)} only, got it for {name!r}"
        )
    if name == "paper-mlp":
        return PaperMLP(shape, w, num_classes, p)
    if name in PAPER_CONV:
        return PaperConvNet(
            name, shape, w, num_classes, p, width_mult=1.0 if width_mult is None else width_mult
        )
    if name.startswith("mlp"):
        return MLP(shape, w, num_classes, p)
    if name == "lenet":
        return LeNet(shape, w, num_classes, p)
    if name == "alexnet":
        return AlexNet(shape, w, num_classes, p)
    return ResNet18(shape, w, num_classes, p)
