"""Building blocks of the DAMO-YOLO family.

Attribute names (``conv``/``bn``, ``conv1``/``bn1``, ``rbr_dense``/``rbr_1x1``/``rbr_reparam``,
...) follow the official DAMO-YOLO modules on purpose: an official checkpoint's state dict
then loads into our models with ``strict=True``. The code itself is ours.

Every BatchNorm uses ``eps=1e-3, momentum=0.03``, the values DAMO-YOLO trains with (upstream
sets them after construction; we set them at construction so fused and unfused models agree
from the start).
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def activation(name: str | None) -> nn.Module:
    """Activation module by name; ``None``/``"identity"`` means none."""
    if name is None or name == "identity":
        return nn.Identity()
    table = {"relu": nn.ReLU, "silu": nn.SiLU}
    if name not in table:
        raise ValueError(f"unsupported activation {name!r} (relu, silu, identity)")
    return table[name](inplace=True)


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BN -> activation; names ``conv``, ``bn``, ``act``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        act: str | None = "relu",
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = batch_norm(cout)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvKXBN(nn.Module):
    """Conv (no bias) -> BN with TinyNAS names ``conv1``, ``bn1``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)
        self.bn1 = batch_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class ConvKXBNRELU(nn.Module):
    """``ConvKXBN`` then an activation (TinyNAS names: ``conv``, ``activation_function``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.conv = ConvKXBN(cin, cout, k, stride)
        self.activation_function = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.conv(x))


class ConvBN(nn.Sequential):
    """Conv -> BN as a ``Sequential`` named ``conv``, ``bn`` (one RepConv branch)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.add_module(
            "conv", nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        )
        self.add_module("bn", batch_norm(cout))


class RepConv(nn.Module):
    """Train-time multi-branch k x k convolution that deploys as one conv.

    Branches: k x k conv+BN (``rbr_dense``), 1x1 conv+BN (``rbr_1x1``) and, in the RepVGG
    variant (``identity=True``, only when shapes allow), a BN on the input (``rbr_identity``).
    DAMO-YOLO uses no identity branch. After :meth:`switch_to_deploy` (or when built with
    ``deploy=True``) a single biased conv ``rbr_reparam`` computes the same function.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        identity: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if k % 2 != 1:
            raise ValueError(f"RepConv needs an odd kernel, got {k}")
        self.in_channels, self.out_channels = cin, cout
        self.kernel_size, self.stride, self.groups = k, stride, groups
        self.nonlinearity = activation(act)
        self.rbr_identity: nn.BatchNorm2d | None = None
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
            return
        self.rbr_dense = ConvBN(cin, cout, k, stride, groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, groups)
        if identity and cin == cout and stride == 1:
            self.rbr_identity = batch_norm(cin)

    @property
    def deployed(self) -> bool:
        return hasattr(self, "rbr_reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.nonlinearity(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.nonlinearity(y)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the branches by one equivalent conv (exact up to float rounding)."""
        if self.deployed:
            return
        from damo_plugins.lib.fusion import fold_bn, identity_kernel, pad_kernel

        k = self.kernel_size
        w, b = fold_bn(self.rbr_dense.conv.weight, None, self.rbr_dense.bn)
        w1, b1 = fold_bn(self.rbr_1x1.conv.weight, None, self.rbr_1x1.bn)
        w = w + pad_kernel(w1, (k, k))
        b = b + b1
        if self.rbr_identity is not None:
            wid = identity_kernel(self.in_channels, self.groups, (k, k), w.dtype, w.device)
            wi, bi = fold_bn(wid, None, self.rbr_identity)
            w, b = w + wi, b + bi
        dense = self.rbr_dense.conv
        fused = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            k,
            self.stride,
            k // 2,
            groups=self.groups,
            bias=True,
            device=w.device,
            dtype=w.dtype,
        )
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        fused.train(dense.training)
        self.rbr_reparam = fused
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None


class Focus(nn.Module):
    """Space-to-depth (C -> 4C at half resolution) followed by ``ConvBNAct`` (``conv``).

    :meth:`fold_space_to_depth` (called by the ``reparam`` pass) turns the pair into one
    2k x 2k convolution of stride 2 on the image, exactly
    (:func:`damo_plugins.lib.fusion.space_to_depth_conv`). Runtimes run the four strided
    slices with generic kernels (0.5 ms of a 2.4 ms INT8 inference in OpenVINO at 256 px);
    the folded stem costs the same multiply-adds and no copies.
    """

    def __init__(self, cin: int, cout: int, k: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.conv = ConvBNAct(cin * 4, cout, k, 1, act=act)
        self.folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.conv(x)
        # Order (top-left, bottom-left, top-right, bottom-right) matches the official weights.
        x = torch.cat(
            (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1
        )
        return self.conv(x)

    def fold_space_to_depth(self) -> bool:
        """Make ``conv.conv`` the equivalent stride-2 convolution on the image (see the class
        docstring); False (nothing changed) if already folded or the conv is not a plain
        stride-1 one."""
        from damo_plugins.lib.fusion import FOCUS_PHASES, space_to_depth_conv

        folded = None if self.folded else space_to_depth_conv(self.conv.conv, FOCUS_PHASES)
        if folded is None:
            return False
        self.conv.conv = folded
        self.folded = True
        return True


class SPPBottleneck(nn.Module):
    """1x1 reduce, max-pool pyramid (5, 9, 13), concat, 1x1 expand (upstream: always SiLU)."""

    def __init__(
        self, cin: int, cout: int, pools: tuple[int, ...] = (5, 9, 13), act: str = "silu"
    ) -> None:
        super().__init__()
        hidden = cin // 2
        self.conv1 = ConvBNAct(cin, hidden, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(p, 1, p // 2) for p in pools)
        self.conv2 = ConvBNAct(hidden * (len(pools) + 1), cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))
