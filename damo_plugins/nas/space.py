"""Search spaces and the mutation operator of the evolutionary search.

A space fixes the blueprint (block classes from its kind, ``k1kx`` or ``kxkx``; strides and
block count from the initial structure) and says how a genome may change. One mutation picks
a random block and changes one of its properties, with MAE-NAS's rules (upstream
``tinynas/spaces``):

* **out** channels: scale by one of 2.0/1.5/1.25/0.8/0.6/0.5, round to a multiple of 8
  (at least 8), clamp to the block's declared range; never below the block's input channels
  nor above the next block's output (channels do not shrink with depth). The stem's width is
  capped at 32.
* **btn** (bottleneck) channels: same scales, at most the block's ``out``.
* **L** (depth): +-1 or +-2, at least 1; at most 2 in the first block, and at most
  ``layers // 2 // (blocks - 2)`` in the others when a layer budget is given.
* **k** (kernel): another of the allowed kernels (only when more than one is allowed).

After any change a block's bottleneck is raised to at least ``out / 10`` and kernels larger
than 2/3 of the feature map shrink, as upstream does. Mutations only ever produce
structures that pass :func:`damo_plugins.models.structure.validate_structure`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from damo_plugins.core.errors import DamoError
from damo_plugins.models.structure import K1KX, KXKX, STEM, Structure
from damo_plugins.nas.analysis import Analyzer, Blueprint, Gene, Genome, split

KINDS = {"k1kx": K1KX, "kxkx": KXKX}
SCALES: tuple[float, ...] = (2.0, 1.5, 1.25, 0.8, 0.6, 0.5)
DEPTH_STEPS: tuple[int, ...] = (-2, -1, 1, 2)
#: DAMO-YOLO's per-block output-channel ranges (upstream configs/damoyolo, S and M)
DAMO_CHANNEL_RANGES: tuple[tuple[int, int] | None, ...] = (
    None,
    None,
    (64, 128),
    None,
    (128, 256),
    (256, 512),
)


def round8(x: float) -> int:
    """Nearest multiple of 8, at least 8 (upstream ``smart_round``)."""
    return max(8, round(x / 8.0) * 8)


@dataclass
class SearchSpace:
    """Where the search may go. ``channel_ranges[i]`` bounds block ``i``'s output channels."""

    kind: str = "k1kx"
    kernels: tuple[int, ...] = (3, 5)
    channel_ranges: tuple[tuple[int, int] | None, ...] = DAMO_CHANNEL_RANGES
    scales: tuple[float, ...] = SCALES
    depth_steps: tuple[int, ...] = DEPTH_STEPS
    max_channels: int = 2048
    max_stem_channels: int = 32
    min_btn_ratio: int = 10
    max_depth_first: int = 2
    max_depth: int | None = None
    mutations: int = 1
    #: filled by :meth:`bind`
    blueprint: Blueprint | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DamoError(f"unknown search space {self.kind!r}", f"one of {', '.join(KINDS)}")
        if not self.kernels or any(k <= 0 or k % 2 == 0 for k in self.kernels):
            raise DamoError(f"kernels must be positive odd integers, got {list(self.kernels)}")
        if self.mutations < 1:
            raise DamoError(f"mutations per child must be at least 1, got {self.mutations}")
        for r in self.channel_ranges:
            if r is not None and not (0 < r[0] <= r[1]):
                raise DamoError(
                    f"bad channel range {list(r)}: expected [min, max] with 0 < min <= max"
                )

    # ------------------------------------------------------------------ blueprint
    def bind(
        self,
        init: Structure,
        analyzer_resolution: int = 640,
        focus: bool = True,
        budget_layers: int | None = None,
    ) -> tuple[Analyzer, Genome]:
        """Adopt the initial structure's blocks and strides, converted to this space's class."""
        bp, genome = split(init)
        cls = KINDS[self.kind]
        classes = tuple(STEM if c == STEM else cls for c in bp.classes)
        self.blueprint = Blueprint(bp.in_channels, classes, bp.strides)
        if len(self.channel_ranges) > len(classes):
            self.channel_ranges = tuple(self.channel_ranges[: len(classes)])
        if budget_layers is not None and self.max_depth is None and len(classes) > 2:
            self.max_depth = max(1, budget_layers // 2 // (len(classes) - 2))
        an = Analyzer(self.blueprint, analyzer_resolution, focus)
        self._sizes_in = an.sizes_in
        return an, genome

    def _range(self, i: int) -> tuple[int, int] | None:
        return self.channel_ranges[i] if i < len(self.channel_ranges) else None

    # ------------------------------------------------------------------ mutation
    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        genes = list(genome)
        for _ in range(self.mutations):
            i = rng.randrange(len(genes))
            genes[i] = self._mutate_block(genes, i, rng)
        return tuple(genes)

    def _mutate_block(self, genes: Sequence[Gene], i: int, rng: random.Random) -> Gene:
        out, btn, k, depth = genes[i]
        n = len(genes)
        cin = genes[i - 1][0] if i > 0 else 0
        next_out = genes[i + 1][0] if i + 1 < n else None
        if i == 0:  # stem: width only (upstream stem_mutate_method_list = ['out'])
            new = min(
                round8(out * rng.choice(self.scales)), self.max_stem_channels, self.max_channels
            )
            if next_out is not None:
                new = min(new, next_out)
            return (new, btn, k, depth)
        methods = ("out", "btn", "L", "k") if len(self.kernels) > 1 else ("out", "btn", "L")
        method = rng.choice(methods)
        if method == "out":
            new = min(round8(out * rng.choice(self.scales)), self.max_channels)
            r = self._range(i)
            if r is not None:
                new = max(r[0], min(r[1], new))
            new = max(cin, new)
            if next_out is not None:
                new = min(next_out, new)
            out = new
        elif method == "btn":
            btn = min(out, round8(btn * rng.choice(self.scales)))
        elif method == "L":
            new = max(1, depth + rng.choice(self.depth_steps))
            if new == depth:  # only a decrease below 1 can land here: go up instead
                new = depth + 1
            if i == 1:
                new = min(self.max_depth_first, new)
            elif self.max_depth is not None:
                new = min(self.max_depth, new)
            depth = new
        else:
            k = rng.choice([c for c in self.kernels if c != k] or [k])
        if btn < out / self.min_btn_ratio:
            btn = round8(out / self.min_btn_ratio)
        # kernels must fit the feature map (upstream: k * 1.5 <= size)
        size = self._sizes_in[i]
        while k > 1 and k * 1.5 > size:
            k -= 2
        return (out, btn, k, depth)
