"""Analytic facts about a backbone structure: its convolutions, layers, params, FLOPs, stages.

The search evaluates hundreds of thousands of candidates, so nothing here builds a torch
model. A structure is split once into a static :class:`Blueprint` (block classes, strides,
image channels) and a compact, hashable *genome*: one ``(out, btn, k, L)`` tuple per block
(the stem stores ``btn=0, L=1``). Everything the search needs is computed from the genome by
walking the list of convolutions the backbone performs.

The convolutions are those of DAMO-YOLO's plain ``TinyNAS_res`` layout (what
:class:`damo_plugins.nas.backbone.PlainBackbone` builds and the FLOPs test checks against
``torch.utils.flop_counter``):

* an optional Focus (space-to-depth) halves the resolution and gives the stem 4x the
  image channels;
* the stem is a k x k convolution;
* a block is ``L`` residual units; a unit is conv1 (1x1 for ``k1kx``, k x k for ``kxkx``)
  into ``btn`` channels, then a k x k conv2 into ``out`` channels (the block's stride sits on
  the first unit's conv2). A stride-1 first unit whose channels change adds a 1x1 shortcut
  projection; a stride-2 first unit has no shortcut (as in DAMO-YOLO).

FLOPs follow ``torch.utils.flop_counter``: 2 x multiply-accumulates of the convolutions
(DAMO-YOLO's papers quote multiply-accumulates as "FLOPs", i.e. half of these numbers).
Params count conv weights plus BatchNorm's weight and bias. SPP, which DAMO-YOLO appends to
the last stage, is not part of the searched structure and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from damo_plugins.errors import DamoError
from damo_plugins.models.structure import K1KX, KXKX, STEM, Structure, validate_structure

#: one block of a genome: (out channels, bottleneck channels, kernel, depth L)
Gene = tuple[int, int, int, int]
Genome = tuple[Gene, ...]
#: one convolution: (in ch, out ch, kernel, stride, input size, output size, repeat count)
ConvOp = tuple[int, int, int, int, int, int, int]


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
    short loop over its blocks.
    """

    def __init__(self, bp: Blueprint, resolution: int = 640, focus: bool = True) -> None:
        self.bp = bp
        self.resolution = resolution
        self.focus = focus
        self.stem_in = bp.in_channels * (4 if focus else 1)
        size = stem_input_size(resolution, focus)
        sizes_in: list[int] = []
        sizes_out: list[int] = []
        for s in bp.strides:
            sizes_in.append(size)
            size = conv_out_size(size, s)
            sizes_out.append(size)
        self.sizes_in = tuple(sizes_in)
        self.sizes_out = tuple(sizes_out)
        self.k1 = tuple(None if c == STEM else (c == K1KX) for c in bp.classes)
        # A stage ends before each stride-2 block other than the first block, and at the end
        # (MAE-NAS's get_stage_info): ``stage_ends`` holds the last block index of each stage.
        ends = [i - 1 for i in range(1, len(bp)) if bp.strides[i] == 2]
        ends.append(len(bp) - 1)
        self.stage_ends = tuple(sorted(set(ends)))

    # ------------------------------------------------------------------ convolutions
    def ops(self, genome: Genome) -> list[ConvOp]:
        """Every convolution of the backbone, identical repeated units merged (``count``)."""
        ops: list[ConvOp] = []
        cin = self.stem_in
        for i, (c, btn, k, depth) in enumerate(genome):
            s = self.bp.strides[i]
            hi, ho = self.sizes_in[i], self.sizes_out[i]
            k1flag = self.k1[i]
            if k1flag is None:  # stem
                ops.append((cin, c, k, s, hi, ho, 1))
            else:
                k1 = 1 if k1flag else k
                ops.append((cin, btn, k1, 1, hi, hi, 1))
                ops.append((btn, c, k, s, hi, ho, 1))
                if s == 1 and cin != c:
                    ops.append((cin, c, 1, 1, hi, hi, 1))
                if depth > 1:
                    ops.append((c, btn, k1, 1, ho, ho, depth - 1))
                    ops.append((btn, c, k, 1, ho, ho, depth - 1))
            cin = c
        return ops

    def layers(self, genome: Genome) -> int:
        """Conv layers on the main path: 1 for the stem, 2 per residual unit (as MAE-NAS)."""
        return 1 + 2 * sum(g[3] for g in genome[1:])

    def metrics(self, genome: Genome) -> Metrics:
        params = flops = max_feature = 0
        for cin, cout, k, _s, hi, ho, n in self.ops(genome):
            w = cin * cout * k * k
            params += (w + 2 * cout) * n
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
            "stages": len(self.stage_ends),
            "stage_channels": self.stage_channels(genome),
            "stage_sizes": [self.sizes_out[e] for e in self.stage_ends],
        }


def analyzer_for(
    structure: Structure, resolution: int = 640, focus: bool = True
) -> tuple[Analyzer, Genome]:
    bp, genome = split(structure)
    return Analyzer(bp, resolution, focus), genome


__all__ = [
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
