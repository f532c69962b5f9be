"""The arithmetic of re-parameterization, shared by RepConv and the ``reparam`` pass.

In eval mode a BatchNorm is the affine map ``y = γ (x − μ) / σ + β`` with
``σ = sqrt(var + eps)``, so after a convolution it folds into the convolution's weight and
bias: ``W' = W · γ/σ`` (per output channel) and ``b' = (b − μ) · γ/σ + β``. Parallel branches
that read the same input and are summed become one convolution whose kernel and bias are the
sums, once every kernel is zero-padded (centred) to the largest size; an identity branch is
the kernel with a 1 at the centre of its own channel (within its group).

A space-to-depth (Focus) stem — the image's four phases ``x[..., dy::2, dx::2]`` stacked on
the channels, then a k x k convolution of stride 1 — is pure re-indexing followed by a linear
map, so it is one 2k x 2k convolution of stride 2 on the image (padding doubled), each
phase's weights on every other row and column (:func:`space_to_depth_conv`).
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


@torch.no_grad()
def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv (``weight`` is ``[out, in/g, *k]``)."""
    scale, shift = bn_scale_shift(bn)
    scale, shift = scale.to(weight.dtype), shift.to(weight.dtype)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias * scale + shift
    return w.detach(), b.detach()  # fresh tensors: products of the inputs


def pad_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a ``[out, in, kh, kw]`` kernel symmetrically to ``size`` (centred)."""
    kh, kw = weight.shape[-2:]
    th, tw = size
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}")
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    if ph == 0 and pw == 0:
        return weight
    return torch.nn.functional.pad(weight, [pw, pw, ph, ph])


def identity_kernel(
    channels: int,
    groups: int,
    size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[C, C/groups, kh, kw]`` kernel of a conv that returns its input unchanged."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, *size, dtype=dtype, device=device)
    idx = torch.arange(channels)
    w[idx, idx % per_group, size[0] // 2, size[1] // 2] = 1
    return w


#: the phase order of DAMO-YOLO's (and YOLOX's) Focus: top-left, bottom-left, top-right,
#: bottom-right, as ``(dy, dx)``
FOCUS_PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))


@torch.no_grad()
def space_to_depth_conv(
    conv: nn.Conv2d, phases: tuple[tuple[int, int], ...] = FOCUS_PHASES
) -> nn.Conv2d | None:
    """The stride-2 conv on the image equal to ``conv`` applied to the image's four phases
    stacked in ``phases`` order (``(dy, dx)`` of each channel group); ``None`` if ``conv``
    is not a plain stride-1 convolution (grouped, dilated, padded other than with zeros)."""
    if (
        conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or conv.in_channels % 4
        or sorted(phases) != [(0, 0), (0, 1), (1, 0), (1, 1)]
    ):
        return None
    cout, cin4, kh, kw = conv.weight.shape
    c = cin4 // 4
    folded = nn.Conv2d(
        c,
        cout,
        (2 * kh, 2 * kw),
        stride=2,
        padding=(2 * conv.padding[0], 2 * conv.padding[1]),
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    for g, (dy, dx) in enumerate(phases):
        folded.weight[:, :, dy::2, dx::2] = conv.weight[:, g * c : (g + 1) * c]
    if conv.bias is not None:
        folded.bias.copy_(conv.bias)
    return folded
