"""Analytic facts about a backbone structure: its convolutions, layers, params, FLOPs, stages.

The search evaluates hundreds of thousands of candidates, so nothing here builds a torch
model. A structure is split once into a static :class:`Blueprint` (block classes, strides,
image channels) and a compact, hashable *genome*: one ``(out, btn, k, L)`` tuple per block
(the stem stores ``btn=0, L=1``). Everything the search needs is computed from the genome by
walking the list of convolutions the backbone performs.

Those convolutions are exactly the ones of the backbone DAMO-YOLO's model builder
(:mod:`damo_plugins.models.backbone`) makes of the structure, so params and FLOPs equal
``sum(p.numel())`` and ``torch.utils.flop_counter`` on it, to the integer (a test checks
T, S, M and random structures of both spaces):

* Focus (space-to-depth) gives the stem 4x the image channels at half the resolution; the
  stem is a k x k conv of stride 1 (the builder's Focus ignores the stem's ``s``). Without
  Focus (``focus=False``, the bare structure) the stem is a k x k conv of stride ``s`` on the
  image.
* A residual unit is conv1 (1x1 for ``k1kx``, k x k for ``kxkx``) into ``btn`` channels, then
  a k x k RepConv into the unit's output (carrying the stride). A stride-1 unit whose
  channels change adds a 1x1 shortcut projection; a stride-2 unit has no shortcut.
* ``res`` layout (no ``kxkx`` block: DAMO-YOLO T, S): block after block, ``L`` units each;
  an SPP (1x1 to half width, max-pools 5/9/13, concat, 1x1 back) follows the first unit of
  the last block.
* ``csp`` layout (any ``kxkx`` block: M): each stride-2 block opens a CSP stage (a stride-1
  block joins the stage before it, except right after the stem). A stage is a 3x3 stride-2
  downsampler to ``2 * (out // 2)`` channels (it replaces one of the opening block's ``L``
  units), SPP in the last stage, then - if any units are left - a 1x1 ``conv_start`` to half
  width, the units at half width (``out // 2`` of their block), a 1x1 ``conv_shortcut`` and
  a 1x1 ``conv_fuse`` of the concatenation.

By default the numbers are those of the *deployed* backbone (``deploy=True``: each RepConv
is one biased conv), what runs at inference and what budgets are about; ``deploy=False``
counts the training-time network (RepConv = k x k and 1x1 branches, each with BatchNorm).
Every other conv has a BatchNorm (2 params per channel), as the builder makes them.

FLOPs follow ``torch.utils.flop_counter``: 2 x multiply-accumulates of the convolutions
(pooling, BN, activations, adds and concatenations count 0; DAMO-YOLO's papers quote
multiply-accumulates as "FLOPs", i.e. half of these numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.models.structure import K1KX, KXKX, STEM, Structure, validate_structure

#: one block of a genome: (out channels, bottleneck channels, kernel, depth L)
Gene = tuple[int, int, int, int]
Genome = tuple[Gene, ...]
#: one convolution: (in ch, out ch, kernel, stride, input size, output size, repeat count,
#: params per output channel besides the weights: 2 with BatchNorm, 1 with a bias)
ConvOp = tuple[int, int, int, int, int, int, int, int]
#: bumped whenever the numbers :class:`Analyzer` gives change (search checkpoints record it)
ANALYSIS_VERSION = 2
BN, BIAS = 2, 1
SPP_POOLS = 3  # SPPBottleneck's max-pools (5, 9, 13): the concat is 4 x the hidden width


@dataclass(frozen=True)
class Blueprint:
    """What a search never changes: image channels, block classes and strides."""

    in_channels: int
    classes: tuple[str, ...]
    strides: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Metrics:
    """Budget-relevant numbers of one candidate."""

    layers: int
    params: int
    flops: int
    max_feature: int

    def as_dict(self) -> dict[str, int]:
        return {
            "layers": self.layers,
            "params": self.params,
            "flops": self.flops,
            "max_feature": self.max_feature,
        }


def split(structure: Structure) -> tuple[Blueprint, Genome]:
    """Separate the static part of a (validated) structure from the searchable genome."""
    structure = validate_structure(structure)
    genes: list[Gene] = []
    for block in structure:
        if block["class"] == STEM:
            genes.append((block["out"], 0, block["k"], 1))
        else:
            genes.append((block["out"], block["btn"], block["k"], block["L"]))
    bp = Blueprint(
        in_channels=structure[0]["in"],
        classes=tuple(b["class"] for b in structure),
        strides=tuple(b["s"] for b in structure),
    )
    return bp, tuple(genes)


def join(bp: Blueprint, genome: Genome) -> Structure:
    """Rebuild a structure (list of dicts in DAMO-YOLO's format) from a genome."""
    out: Structure = []
    cin = bp.in_channels
    for cls, s, (c, btn, k, depth) in zip(bp.classes, bp.strides, genome):
        if cls == STEM:
            out.append({"class": cls, "in": cin, "out": c, "s": s, "k": k})
        else:
            out.append({"class": cls, "in": cin, "out": c, "s": s, "k": k, "L": depth, "btn": btn})
        cin = c
    return out


def conv_out_size(size: int, stride: int) -> int:
    """Output size of a conv with odd kernel k and padding k // 2 (independent of k)."""
    return (size - 1) // stride + 1


def csp_stage_blocks(strides: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Block indices of each CSP stage, as the builder groups them (``csp_groups`` in
    :mod:`damo_plugins.models.backbone`, restated here so that this module needs no torch):
    a stride-1 block joins the stage before it, except right after the stem."""
    stages: list[list[int]] = []
    for i in range(1, len(strides)):
        if strides[i] == 1 and stages:
            stages[-1].append(i)
        else:
            stages.append([i])
    return [tuple(g) for g in stages]


def stem_input_size(resolution: int, focus: bool) -> int:
    if resolution <= 0:
        raise DamoError(f"resolution must be positive, got {resolution}")
    if focus:
        if resolution % 2:
            raise DamoError(
                f"resolution {resolution} is odd: Focus (space-to-depth) needs an even size",
                "use an even --resolution, or --no-focus",
            )
        return resolution // 2
    return resolution


class Analyzer:
    """Computes layers, params, FLOPs, feature-map sizes and stages of genomes of one blueprint.

    Sizes depend only on strides, so they are computed once here; evaluating a genome is a
    short loop over its blocks. ``sizes_in``/``sizes_out`` are per structure block (what the
    search space's kernel rule and the stage report use); the ``csp`` layout runs a stage's
    convolutions at its downsampler's output size, which is the same for the usual strides.
    """

    def __init__(
        self, bp: Blueprint, resolution: int = 640, focus: bool = True, deploy: bool = True
    ) -> None:
        self.bp = bp
        self.resolution = resolution
        self.focus = focus
        self.deploy = deploy
        self.stem_in = bp.in_channels * (4 if focus else 1)
        # the builder's Focus stem is a stride-1 conv whatever the structure's 's' says
        self.stem_stride = 1 if focus else bp.strides[0]
        self.layout = "csp" if KXKX in bp.classes else "res"
        size = stem_input_size(resolution, focus)
        sizes_in: list[int] = []
        sizes_out: list[int] = []
        for i, s in enumerate(bp.strides):
            sizes_in.append(size)
            size = conv_out_size(size, self.stem_stride if i == 0 else s)
            sizes_out.append(size)
        self.sizes_in = tuple(sizes_in)
        self.sizes_out = tuple(sizes_out)
        self.k1 = tuple(None if c == STEM else (c == K1KX) for c in bp.classes)
        # A stage ends before each stride-2 block other than the first block, and at the end
        # (MAE-NAS's get_stage_info): ``stage_ends`` holds the last block index of each stage.
        ends = [i - 1 for i in range(1, len(bp)) if bp.strides[i] == 2]
        ends.append(len(bp) - 1)
        self.stage_ends = tuple(sorted(set(ends)))
        # csp: block indices of each CSP stage (the builder's grouping) and its size in/out
        self.csp_stages: tuple[tuple[tuple[int, ...], int, int], ...] = ()
        if self.layout == "csp":
            stages = []
            size = sizes_out[0]
            for idx in csp_stage_blocks(bp.strides):
                out = conv_out_size(size, 2)  # the downsampler is always 3x3 stride 2
                stages.append((tuple(idx), size, out))
                size = out
            self.csp_stages = tuple(stages)

    # ------------------------------------------------------------------ convolutions
    def ops(self, genome: Genome, deploy: bool | None = None) -> list[ConvOp]:
        """Every convolution of the backbone, identical repeated units merged (``count``).

        ``deploy`` (default: the analyzer's) chooses fused RepConvs or their two branches.
        """
        deploy = self.deploy if deploy is None else deploy
        ops: list[ConvOp] = []
        add = ops.append
        c0, _, k0, _ = genome[0]
        add((self.stem_in, c0, k0, self.stem_stride, self.sizes_in[0], self.sizes_out[0], 1, BN))

        def units(cin: int, c: int, btn: int, k: int, k1: int, s: int, hi: int, n: int) -> None:
            """``n`` residual units ``cin -> c`` (only the first has stride ``s`` and ``cin``)."""
            ho = conv_out_size(hi, s)
            for first in (True, False):
                count = min(n, 1) if first else n - 1
                if count <= 0:
                    continue
                ci, st, h = (cin, s, hi) if first else (c, 1, ho)
                add((ci, btn, k1, 1, h, h, count, BN))
                if deploy:
                    add((btn, c, k, st, h, ho, count, BIAS))
                else:
                    add((btn, c, k, st, h, ho, count, BN))
                    add((btn, c, 1, st, h, ho, count, BN))
                if st == 1 and ci != c:
                    add((ci, c, 1, 1, h, h, count, BN))

        def spp(c: int, h: int) -> None:
            add((c, c // 2, 1, 1, h, h, 1, BN))
            add(((c // 2) * (SPP_POOLS + 1), c, 1, 1, h, h, 1, BN))

        if self.layout == "res":
            last = len(genome) - 1
            cin = c0
            for i in range(1, len(genome)):
                c, btn, k, depth = genome[i]
                k1 = 1 if self.k1[i] else k
                s, hi = self.bp.strides[i], self.sizes_in[i]
                if i == last:  # SPP sits after the first unit of the last block
                    units(cin, c, btn, k, k1, s, hi, 1)
                    spp(c, self.sizes_out[i])
                    units(c, c, btn, k, k1, 1, self.sizes_out[i], depth - 1)
                else:
                    units(cin, c, btn, k, k1, s, hi, depth)
                cin = c
            return ops

        cin = c0
        n_stages = len(self.csp_stages)
        for j, (idx, hi, ho) in enumerate(self.csp_stages):
            hidden = genome[idx[0]][0] // 2
            cout = genome[idx[-1]][0]
            add((cin, 2 * hidden, 3, 2, hi, ho, 1, BN))  # downsampler
            if j == n_stages - 1:
                spp(2 * hidden, ho)
            prev = hidden
            has_units = False
            for i in idx:
                c, btn, k, depth = genome[i]
                n = depth - 1 if self.bp.strides[i] == 2 else depth  # the downsampler took one
                if n > 0:
                    units(prev, c // 2, btn, k, 1 if self.k1[i] else k, 1, ho, n)
                    prev = c // 2
                    has_units = True
            if has_units:
                add((2 * hidden, hidden, 1, 1, ho, ho, 1, BN))  # conv_start
                add((2 * hidden, cout // 2, 1, 1, ho, ho, 1, BN))  # conv_shortcut
                add((prev + cout // 2, cout, 1, 1, ho, ho, 1, BN))  # conv_fuse
            cin = cout
        return ops

    def layers(self, genome: Genome) -> int:
        """Conv layers on the main path: 1 for the stem, 2 per residual unit (as MAE-NAS)."""
        return 1 + 2 * sum(g[3] for g in genome[1:])

    def metrics(self, genome: Genome) -> Metrics:
        params = flops = max_feature = 0
        for cin, cout, k, _s, hi, ho, n, affine in self.ops(genome):
            w = cin * cout * k * k
            params += (w + affine * cout) * n
            flops += 2 * w * ho * ho * n
            feat = cin * hi * hi + cout * ho * ho
            if feat > max_feature:
                max_feature = feat
        return Metrics(self.layers(genome), params, flops, max_feature)

    def stage_channels(self, genome: Genome) -> list[int]:
        return [genome[e][0] for e in self.stage_ends]

    def describe(self, genome: Genome) -> dict[str, Any]:
        m = self.metrics(genome)
        return {
            **m.as_dict(),
            "resolution": self.resolution,
            "focus": self.focus,
            "layout": self.layout,
            "stages": len(self.stage_ends),
            "stage_channels": self.stage_channels(genome),
            "stage_sizes": [self.sizes_out[e] for e in self.stage_ends],
        }


def analyzer_for(
    structure: Structure, resolution: int = 640, focus: bool = True, deploy: bool = True
) -> tuple[Analyzer, Genome]:
    bp, genome = split(structure)
    return Analyzer(bp, resolution, focus, deploy), genome


__all__ = [
    "ANALYSIS_VERSION",
    "K1KX",
    "KXKX",
    "STEM",
    "Analyzer",
    "Blueprint",
    "ConvOp",
    "Gene",
    "Genome",
    "Metrics",
    "analyzer_for",
    "join",
    "split",
]
