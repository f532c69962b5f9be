"""Detectron2's ``heatmaps_to_keypoints``, rewritten so that it exports to ONNX and runs fast.

Semantics (Detectron2's current function): for ROI ``r`` with box size ``w, h`` (clamped to
>= 1), resize its ``K x H x W`` logit maps bicubically (PyTorch: ``align_corners=False``,
coefficient -0.75, no antialias) to ``ceil(h) x ceil(w)``; per keypoint the first maximum in
row-major order gives ``x_int, y_int``; ``x = (x_int + 0.5) * w / ceil(w) + x0`` (same for y);
the logit is that maximum and the score ``1 / sum(exp(maps - max))`` over the *un-resized* map.

Three exportable forms live here (measurements and the choice: ``docs/keypoints.md``).
:func:`heatmaps_to_keypoints_vectorized` (the default of the pass, CLI and head) bounds every
source cell, evaluates the 20 best-bounded cells of each keypoint exactly, certifies the
maximum against the bounds of all other cells, and recomputes only uncertified ROIs in a
``Loop`` (zero iterations on peaked maps): exact, bounded memory, the fastest in OpenVINO, and
free of MatMul/Resize/Conv so that OpenVINO keeps it in f32 under a bf16 default.
:func:`heatmaps_to_keypoints_loop` is one ONNX ``Loop`` whose body interpolates with two small
MatMuls instead of ``Resize``: exact, memory of one ROI, cost independent of the content.
:func:`heatmaps_to_keypoints` is loop-free and prunes: resizing
every ROI onto a grid padded to the largest box costs hundreds of MB at R = 100, and we need
not evaluate every output pixel: the value of a bicubic surface inside one source cell is a convex-like combination
of its 4 x 4 neighbours with inner weights >= 0 and outer ones <= 0 (see ``_cell_bounds``),
which bounds every resized pixel in that cell. We evaluate a few promising cells exactly to get a lower bound
on the maximum, keep every cell whose bound reaches it, and evaluate exactly only the pixels
of those cells. The result is the exact argmax (ties: smallest row-major index), computed
without loops, with static rank and dynamic sizes, for any ``R`` including 0. Its cost and
memory grow with how many cells survive: small for peaked heatmaps, large for noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from damo_plugins.core.errors import DamoError

#: PyTorch's bicubic coefficient (``upsample_bicubic2d``); ONNX ``Resize`` uses the same.
CUBIC_A = -0.75
#: largest total negative weight of the 1-D cubic kernel (reached at offset 0.5)
NEG_WEIGHT_1D = 0.1875
#: cells evaluated to obtain the lower bound of each keypoint's maximum
PROBE_CELLS = 4


def check_inputs(maps: Tensor, rois: Tensor) -> None:
    """Raise :class:`DamoError` for inputs the graph cannot give a meaningful answer for."""
    if not isinstance(maps, Tensor) or not isinstance(rois, Tensor):
        raise DamoError("heatmaps_to_keypoints takes two tensors: maps [R,K,H,W] and rois [R,4]")
    if maps.dim() != 4:
        raise DamoError(
            f"maps must have 4 dimensions [R, K, H, W], got shape {list(maps.shape)}",
            "pass the keypoint head's logits, one K x H x W block per ROI",
        )
    if rois.dim() != 2 or rois.shape[1] != 4:
        raise DamoError(
            f"rois must have shape [R, 4] (x0, y0, x1, y1), got {list(rois.shape)}",
            "pass the boxes as an R x 4 tensor",
        )
    if maps.shape[0] != rois.shape[0]:
        raise DamoError(
            f"maps has {maps.shape[0]} ROIs but rois has {rois.shape[0]}",
            "give one box per heatmap block",
        )
    if maps.shape[1] < 1 or maps.shape[2] < 1 or maps.shape[3] < 1:
        raise DamoError(f"maps has an empty keypoint or spatial axis: {list(maps.shape)}")
    if not maps.is_floating_point() or not rois.is_floating_point():
        raise DamoError("maps and rois must be floating-point tensors")
    if not bool(torch.isfinite(maps).all()) or not bool(torch.isfinite(rois).all()):
        raise DamoError(
            "maps or rois contain NaN or infinite values",
            "check the detector's outputs before post-processing",
        )


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> Tensor:
    """Keypoints ``[R, K, 4]`` = (x, y, logit, score) from logit maps and boxes.

    Drop-in for ``detectron2.structures.heatmaps_to_keypoints``; traceable and exportable with
    a dynamic ``R`` (inputs are validated only when not tracing).
    """
    if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        check_inputs(maps, rois)
    maps = maps.float()
    rois = rois.float()
    # A dummy first ROI keeps every reduction non-empty for R = 0 (ONNX Runtime returns an
    # empty input unreduced, and Reshape(-1) fails on it); its row is dropped at the end.
    maps = torch.cat([maps.new_zeros((1, *maps.shape[1:])), maps], 0)
    rois = torch.cat([rois.new_tensor([[0.0, 0.0, 1.0, 1.0]]), rois], 0)
    return _keypoints(maps, rois)[1:]


# ----------------------------------------------------------------------------- internals
def _cubic_coefficients(t: Tensor) -> Tensor:
    """The four tap weights (taps at -1, 0, +1, +2) for fractional offsets ``t``."""
    a = -0.75  # CUBIC_A, spelled out: TorchScript (Loop form) cannot read module globals
    t1, t2, t3 = t + 1.0, 1.0 - t, 2.0 - t
    c0 = ((a * t1 - 5.0 * a) * t1 + 8.0 * a) * t1 - 4.0 * a
    c1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    c2 = ((a + 2.0) * t2 - (a + 3.0)) * t2 * t2 + 1.0
    c3 = ((a * t3 - 5.0 * a) * t3 + 8.0 * a) * t3 - 4.0 * a
    return torch.stack([c0, c1, c2, c3], -1)


def _box_sizes(rois: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box widths and heights (clamped to >= 1, as Detectron2 does) and their ceilings, the
    resized map's size; for ``[R, 4]`` boxes or a single ``[4]`` box."""
    widths = (rois[..., 2] - rois[..., 0]).clamp(min=1.0)
    heights = (rois[..., 3] - rois[..., 1]).clamp(min=1.0)
    return widths, heights, widths.ceil(), heights.ceil()


def _to_keypoints(
    maps: Tensor,
    rois: Tensor,
    logit: Tensor,
    index: Tensor,
    sizes: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """``[..., K, 4]`` = (x, y, logit, score) from each keypoint's maximum and its row-major
    index in the resized map; one formula for all ROIs at once (``[R, ...]``) and for the
    single ROI of the Loop forms (``[K, ...]``), so every form places keypoints identically."""
    widths, heights, widths_ceil, heights_ceil = sizes
    wc = widths_ceil.long()[..., None]
    x_int = index % wc
    y_int = torch.div(index, wc, rounding_mode="floor")
    x = (x_int.float() + 0.5) * (widths / widths_ceil)[..., None] + rois[..., 0:1]
    y = (y_int.float() + 0.5) * (heights / heights_ceil)[..., None] + rois[..., 1:2]
    score = 1.0 / (maps - logit[..., None, None]).exp().sum((-2, -1))
    return torch.stack([x, y, logit, score], -1)


def _source_cells(size: Tensor, n_max: Tensor, n_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """For output pixels ``0 .. n_max - 1`` of each ROI along one axis: ``scale`` [R], the
    source cell ``floor(src)`` [R, N] (-1 .. n_in - 1) and whether the pixel lies inside the
    ROI's ``size`` [R, N]. The evaluation recomputes ``src`` with this same float expression,
    so layout and evaluation agree on every pixel."""
    pos = torch.arange(n_max, dtype=torch.float32, device=size.device)
    scale = float(n_in) / size
    cell = ((pos[None, :] + 0.5) * scale[:, None] - 0.5).floor()
    inside = pos[None, :] < size[:, None]
    return scale, cell, inside


def _axis_layout(size: Tensor, n_in: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where the output pixels of each ROI fall along one axis.

    ``size`` [R] holds the ceiled output lengths. Returns ``scale`` [R] (input/output, as
    PyTorch computes it), ``start`` [R, n_in + 1] (first output index of each source cell
    -1 .. n_in - 1), ``count`` [R, n_in + 1] (pixels in that cell) and ``span``, the largest
    count (a 0-d int64 tensor).
    """
    scale, cell, inside = _source_cells(size, size.max().to(torch.int64), n_in)
    cells = torch.arange(-1, n_in, dtype=torch.float32, device=size.device)  # [n_in + 1]
    before = ((cell[:, :, None] < cells) & inside[:, :, None]).sum(1)  # [R, n_in + 1]
    count = ((cell[:, :, None] == cells) & inside[:, :, None]).sum(1)
    return scale, before, count, count.max()


def _taps(cell: Tensor, n_in: int) -> Tensor:
    """Clamped source indices of the four taps of ``cell`` (the edge value repeats)."""
    offsets = torch.arange(-1, 3, dtype=cell.dtype, device=cell.device)
    return (cell[..., None] + offsets).clamp(0, n_in - 1)


def _separable_bounds(maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The bound of every source cell before any rounding margin, ``[R, K, H + 1, W + 1]``,
    with the inner upper and outer lower row bounds it was made from (each caller adds its
    own margin; see :func:`_cell_bounds` for the inequalities)."""
    r_n, k_n, h_in, w_in = maps.shape
    n = NEG_WEIGHT_1D
    flat = maps.reshape(r_n * k_n, 1, h_in, w_in)
    p = torch.nn.functional.pad(flat, (2, 2, 2, 2), "replicate").reshape(
        r_n, k_n, h_in + 4, w_in + 4
    )
    # along x: taps of cell b are padded columns b+1 .. b+4 (b = -1 .. W-1)
    t0, t1 = p[:, :, :, 0 : w_in + 1], p[:, :, :, 1 : w_in + 2]
    t2, t3 = p[:, :, :, 2 : w_in + 3], p[:, :, :, 3 : w_in + 4]
    in_hi, in_lo = torch.maximum(t1, t2), torch.minimum(t1, t2)
    upper = in_hi + n * (in_hi - torch.minimum(t0, t3)).clamp(min=0)  # [R, K, H + 4, W + 1]
    lower = in_lo - n * (torch.maximum(t0, t3) - in_lo).clamp(min=0)
    # along y, over the row bounds
    u_in = torch.maximum(upper[:, :, 1 : h_in + 2], upper[:, :, 2 : h_in + 3])
    l_out = torch.minimum(lower[:, :, 0 : h_in + 1], lower[:, :, 3 : h_in + 4])
    return u_in + n * (u_in - l_out).clamp(min=0), u_in, l_out


def _cell_bounds(maps: Tensor) -> Tensor:
    """Upper bound of the bicubic surface over each source cell, ``[R, K, (H+1) * (W+1)]``.

    Along one axis the inner two taps have weights >= 0 summing to ``1 + n`` and the outer
    two weights <= 0 summing to ``-n``, with ``0 <= n <= 0.1875``; so a 1-D interpolated
    value lies in ``[min_in - n * relu(max_out - min_in), max_in + n * relu(max_in - min_out)]``.
    Applying this along x and then along y bounds every resized pixel of the cell far more
    tightly than a bound over all 16 neighbours.
    """
    r_n, k_n, h_in, w_in = maps.shape
    bound, u_in, l_out = _separable_bounds(maps)
    # margin for float rounding of the exactly evaluated pixels
    bound = bound + 1e-5 * (u_in.abs() + l_out.abs()) + 1e-6
    return bound.reshape(r_n, k_n, (h_in + 1) * (w_in + 1))


_Layout = tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _cell_pixels(
    maps: Tensor, cells: Tensor, rois_layout: _Layout, width: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Everything the exact evaluation of the resized pixels of the given cells needs.

    ``cells`` [R, K, C] holds flat cell ids ``(a + 1) * (W + 1) + (b + 1)``. Returns the
    row and column tap weights ``cy`` [R, K, C, Py, 4] and ``cx`` [R, K, C, Px, 4], the 4 x 4
    source neighbourhood ``hood`` [R, K, C, 4, 4], which of the ``span_y x span_x`` pixel
    slots of each cell are real pixels ``valid`` [R, K, C, Py, Px], and each pixel's output
    index ``y * ceil(w) + x`` [R, K, C, Py, Px]. The two evaluations differ only in how they
    sum the 16 taps.
    """
    r_n, k_n, h_in, w_in = maps.shape
    (sy, start_y, count_y, span_y), (sx, start_x, count_x, span_x) = rois_layout
    dev = maps.device
    a = torch.div(cells, w_in + 1, rounding_mode="floor") - 1  # [R, K, C] source cell row
    b = cells - (a + 1) * (w_in + 1) - 1
    r_idx = torch.arange(r_n, device=dev)[:, None, None]
    at_a = (r_idx * (h_in + 1) + a + 1).reshape(-1)  # flat positions in the [R, H+1] tables
    at_b = (r_idx * (w_in + 1) + b + 1).reshape(-1)
    row0 = start_y.reshape(-1).index_select(0, at_a).reshape(a.shape)  # first row in the cell
    rows_in = count_y.reshape(-1).index_select(0, at_a).reshape(a.shape)
    col0 = start_x.reshape(-1).index_select(0, at_b).reshape(a.shape)
    cols_in = count_x.reshape(-1).index_select(0, at_b).reshape(a.shape)
    py = torch.arange(span_y, device=dev)
    px = torch.arange(span_x, device=dev)
    y = row0[..., None] + py  # [R, K, C, Py]
    x = col0[..., None] + px  # [R, K, C, Px]
    src_y = (y.float() + 0.5) * sy[:, None, None, None] - 0.5
    src_x = (x.float() + 0.5) * sx[:, None, None, None] - 0.5
    cy = _cubic_coefficients(src_y - a[..., None].float())  # [R, K, C, Py, 4]
    cx = _cubic_coefficients(src_x - b[..., None].float())  # [R, K, C, Px, 4]
    # the 4 x 4 source neighbourhood of every cell, gathered from the flattened maps
    ty = _taps(a.float(), h_in).long()  # [R, K, C, 4]
    tx = _taps(b.float(), w_in).long()
    base = (r_idx * k_n + torch.arange(k_n, device=dev)[None, :, None]) * (h_in * w_in)
    flat_idx = (base[..., None, None] + ty[..., :, None] * w_in + tx[..., None, :]).reshape(-1)
    hood = maps.reshape(-1).index_select(0, flat_idx).reshape((*ty.shape, 4))  # [R,K,C,4,4]
    valid = (py < rows_in[..., None])[..., :, None] & (px < cols_in[..., None])[..., None, :]
    index = y[..., :, None] * width[:, None, None, None, None] + x[..., None, :]
    return cy, cx, hood, valid, index


def _evaluate_cells(
    maps: Tensor, cells: Tensor, rois_layout: _Layout, width: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact maximum and its row-major index over the resized pixels of the given cells.

    ``cells`` as in :func:`_cell_pixels`. Returns the maximum [R, K] and the output index
    ``y * ceil(w) + x`` of its first occurrence [R, K].
    """
    cy, cx, hood, valid, index = _cell_pixels(maps, cells, rois_layout, width)
    # separable 16-tap evaluation; broadcast products instead of millions of 4 x 4 matmuls
    rows = (hood[:, :, :, :, None, :] * cx[:, :, :, None, :, :]).sum(5)  # [R, K, C, 4, Px]
    vals = (cy[:, :, :, :, :, None] * rows[:, :, :, None, :, :]).sum(4)  # [R, K, C, Py, Px]
    vals = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    best = vals.amax((2, 3, 4))
    hit = vals == best[:, :, None, None, None]
    big = torch.full_like(index, 2**30)  # OpenVINO runs int64 as int32 on CPU
    first = torch.where(hit, index, big).amin((2, 3, 4))
    return best, first


def _occupied_only(
    bound: Tensor,
    layout_y: tuple[Tensor, Tensor, Tensor, Tensor],
    layout_x: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """``bound`` [R, K, cells] with the cells no output pixel of the ROI falls in set to
    ``-inf``: they can neither hold the maximum nor be chosen for evaluation."""
    r_n = bound.shape[0]
    occupied = (layout_y[2] > 0)[:, :, None] & (layout_x[2] > 0)[:, None, :]  # [R, H+1, W+1]
    occupied = occupied.reshape(r_n, 1, bound.shape[2])
    return torch.where(occupied, bound, torch.full_like(bound, float("-inf")))


def _keypoints(maps: Tensor, rois: Tensor) -> Tensor:
    """The loop-free core; ``R`` >= 1 here (the caller adds a dummy ROI)."""
    r_n, k_n, h_in, w_in = maps.shape
    sizes = _box_sizes(rois)
    widths_ceil = sizes[2]
    layout_y = _axis_layout(sizes[3], h_in)
    layout_x = _axis_layout(widths_ceil, w_in)
    bound = _occupied_only(_cell_bounds(maps), layout_y, layout_x)  # [R, K, (H+1) * (W+1)]

    # Lower bound: the exact maximum over a few probe cells, the four around the largest
    # source sample plus the best-bounded ones (which are always occupied).
    peak = maps.reshape(r_n, k_n, h_in * w_in).argmax(2)
    pa = torch.div(peak, w_in, rounding_mode="floor")
    pb = peak - pa * w_in
    corners = torch.stack([pa * (w_in + 1) + pb, pa * (w_in + 1) + pb + 1], 2)
    corners = torch.cat([corners, corners + (w_in + 1)], 2)  # cells (a-1..a, b-1..b), shifted
    top = bound.topk(min(PROBE_CELLS, (h_in + 1) * (w_in + 1)), dim=2).indices
    probe = torch.cat([top, corners], 2)
    lower, _ = _evaluate_cells(maps, probe, (layout_y, layout_x), widths_ceil.long())

    # Every cell that may hold the maximum, compacted to the front of a [R, K, C] table.
    keep = bound >= lower[:, :, None]
    n_keep = keep.sum(2)
    c_max = n_keep.max()
    slot = keep.long().cumsum(2) - 1
    slot = torch.where(keep, slot, c_max.expand_as(slot))  # dropped cells go to a spare slot
    fill = top[:, :, :1]  # unused slots repeat a kept cell (evaluating it twice is harmless)
    spare = torch.zeros((1, 1, 1), dtype=fill.dtype, device=fill.device)
    table = fill + spare * torch.arange(c_max + 1, device=maps.device)[None, None, :]
    cell_ids = torch.arange(bound.shape[2], device=maps.device).expand(r_n, k_n, -1)
    table = table.scatter(2, slot, cell_ids)[:, :, :-1]
    logit, index = _evaluate_cells(maps, table, (layout_y, layout_x), widths_ceil.long())
    return _to_keypoints(maps, rois, logit, index, sizes)


# ------------------------------------------------------------------ Loop-based alternative
def _interp_matrix(size: Tensor, n_in: int) -> Tensor:
    """Dense ``[ceil size, n_in]`` bicubic weights for one ROI axis (taps clamped)."""
    pos = torch.arange(size.to(torch.int64), dtype=torch.float32, device=size.device)
    src = (pos + 0.5) * (float(n_in) / size) - 0.5
    cell = src.floor()
    coef = _cubic_coefficients(src - cell)  # [N, 4]
    taps = _taps(cell, n_in)  # [N, 4]
    grid = torch.arange(n_in, dtype=torch.float32, device=size.device)
    onehot = (taps[:, :, None] == grid).to(torch.float32)  # [N, 4, n_in]
    return (coef[:, :, None] * onehot).sum(1)


@torch.jit.script_if_tracing
def _keypoints_loop(maps: Tensor, rois: Tensor) -> Tensor:
    r_n, k_n, h_in, w_in = maps.shape
    out = maps.new_zeros((r_n, k_n, 4))
    for i in range(r_n):
        sizes = _box_sizes(rois[i])
        wy = _interp_matrix(sizes[3], h_in)
        wx = _interp_matrix(sizes[2], w_in)
        resized = torch.matmul(torch.matmul(wy, maps[i]), wx.t())  # [K, h, w]
        logit, pos = resized.reshape(k_n, -1).max(1)
        out[i] = _to_keypoints(maps[i], rois[i], logit, pos, sizes)
    return out


def heatmaps_to_keypoints_loop(maps: Tensor, rois: Tensor) -> Tensor:
    """Same result as :func:`heatmaps_to_keypoints`, exported as one ONNX ``Loop`` over ROIs.

    Its cost does not depend on the heatmaps' content (the pruned form's does) and its
    memory is that of one ROI; it is slower for peaked heatmaps. Zero ROIs run zero
    iterations and return the empty preallocated output.
    """
    if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        check_inputs(maps, rois)
    return _keypoints_loop(maps.float(), rois.float())


# ------------------------------------------------- vectorized form with a certified fast path
#: cells per keypoint evaluated exactly on the fast path: with the bounds below, 16-20 cells
#: were needed to certify 96-98 % of the keypoints of peaked or head-like (smooth) maps
FAST_CELLS = 20


def _axis_cells(size: Tensor, n_in: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Like :func:`_axis_layout`, in ``O(R * N)``: each output pixel's source cell is computed
    once (the same float expression the evaluation uses, so both agree on every pixel) and
    counted per cell with a scatter-add; the cell index never decreases along the axis, so
    the first pixel of a cell is the number of pixels in the cells before it."""
    r_n = size.shape[0]
    # full reductions get one extra element: ONNX Runtime returns an empty tensor unreduced
    n_max = torch.cat([size, size.new_ones(1)]).max().to(torch.int64)
    scale, cell, inside = _source_cells(size, n_max, n_in)
    slot = torch.where(inside, cell + 1.0, torch.full_like(cell, float(n_in + 1))).long()
    ones = inside.to(torch.int64)
    count = torch.zeros((r_n, n_in + 2), dtype=torch.int64, device=size.device)
    count = count.scatter_add(1, slot, ones)[:, : n_in + 1]  # [R, n_in + 1]
    before = count.cumsum(1) - count
    span = torch.cat([count.reshape(-1), count.new_ones(1)]).max()
    return scale, before, count, span


def _cell_bounds_fast(maps: Tensor) -> Tensor:
    """The bound of :func:`_cell_bounds` (same inequalities) with one rounding margin per
    keypoint instead of one per cell; ``[R, K, (H+1) * (W+1)]``.

    The margin covers float rounding of the exactly evaluated pixels: each is a sum of 16
    products whose weights have total magnitude < 1.9, so its error is a few ulps of the
    map's largest magnitude. (Max-pools with dilation would avoid the sliced copies, but
    PyTorch and OpenVINO run dilated pooling on slow paths: ~10x slower, measured.)
    """
    r_n, k_n, h_in, w_in = maps.shape
    bound, _, _ = _separable_bounds(maps)
    # largest magnitude from two read-only reductions (an Abs pass costs a full write)
    magnitude = torch.maximum(maps.amax((2, 3)), -maps.amin((2, 3)))[:, :, None, None]
    margin = 1e-5 * magnitude + 1e-6
    return (bound + margin).reshape(r_n, k_n, (h_in + 1) * (w_in + 1))


def _evaluate_cells_fast(
    maps: Tensor, cells: Tensor, rois_layout: _Layout, width: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_evaluate_cells` with the 4-tap sums unrolled (elementwise only: no ReduceSum
    over a middle axis, which dominated its cost, and no MatMul, which OpenVINO would run in
    bf16 on bf16-capable CPUs)."""
    r_n, k_n = maps.shape[0], maps.shape[1]
    cy, cx, hood, valid, index = _cell_pixels(maps, cells, rois_layout, width)
    # along x first, as PyTorch's kernel does: rows[..., p, x] = sum_q hood[p, q] * cx[x, q]
    rows = hood[..., 0:1] * cx[..., None, :, 0]
    for q in range(1, 4):
        rows = rows + hood[..., q : q + 1] * cx[..., None, :, q]  # [R, K, C, 4, Px]
    vals = cy[..., :, 0:1] * rows[..., 0:1, :]
    for q in range(1, 4):
        vals = vals + cy[..., :, q : q + 1] * rows[..., q : q + 1, :]  # [R, K, C, Py, Px]
    vals = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    # explicit sizes, not -1: a Reshape with -1 is ambiguous when R = 0
    n_flat = cells.shape[2] * vals.shape[3] * vals.shape[4]
    flat_vals = vals.reshape(r_n, k_n, n_flat)
    big = torch.full_like(index, 2**30).reshape(r_n, k_n, n_flat)  # OpenVINO: int64 is int32
    best = flat_vals.amax(2)
    first = torch.where(flat_vals == best[:, :, None], index.reshape(r_n, k_n, n_flat), big)
    return best, first.amin(2)


def _exact_roi(maps: Tensor, box: Tensor) -> Tensor:
    """Exact ``[K, 4]`` = (x, y, logit, score) of one ROI: every output pixel, 4-tap gathers,
    x first as PyTorch's kernel. Used only for ROIs the fast path could not certify; memory
    ``K * ceil(h) * ceil(w) * 4`` floats. No MatMul (see :func:`_evaluate_cells_fast`)."""
    k_n, h_in, w_in = maps.shape
    sizes = _box_sizes(box)
    wc, hc = sizes[2], sizes[3]
    px = torch.arange(wc.to(torch.int64), dtype=torch.float32, device=maps.device)
    py = torch.arange(hc.to(torch.int64), dtype=torch.float32, device=maps.device)
    sx = (px + 0.5) * (float(w_in) / wc) - 0.5
    sy = (py + 0.5) * (float(h_in) / hc) - 0.5
    bx = sx.floor()
    by = sy.floor()
    cx = _cubic_coefficients(sx - bx)  # [w, 4]
    cy = _cubic_coefficients(sy - by)  # [h, 4]
    tx = _taps(bx, w_in).long()
    ty = _taps(by, h_in).long()
    n_w = tx.shape[0]
    cols = maps.index_select(2, tx.reshape(-1)).reshape(k_n, h_in, n_w, 4)
    along_x = cols[:, :, :, 0] * cx[:, 0]
    for q in range(1, 4):
        along_x = along_x + cols[:, :, :, q] * cx[:, q]  # [K, H, w]
    rows = along_x.index_select(1, ty.reshape(-1)).reshape(k_n, ty.shape[0], 4, n_w)
    vals = rows[:, :, 0] * cy[:, 0:1]
    for q in range(1, 4):
        vals = vals + rows[:, :, q] * cy[:, q : q + 1]  # [K, h, w]
    logit, pos = vals.reshape(k_n, -1).max(1)
    return _to_keypoints(maps, box, logit, pos, sizes)


@torch.jit.script_if_tracing
def _refine(maps: Tensor, rois: Tensor, out: Tensor, todo: Tensor) -> Tensor:
    """Recompute the ROIs listed in ``todo`` exactly; zero iterations when the fast path
    certified every keypoint. Whole ROIs, not single keypoints: on maps where little is
    certified (noise) one iteration per ROI costs far less than one per keypoint."""
    for j in range(todo.size(0)):
        i = int(todo[j])
        out[i] = _exact_roi(maps[i], rois[i])
    return out


def _keypoints_vectorized(maps: Tensor, rois: Tensor) -> Tensor:
    """Certified top-cells evaluation for all ROIs at once (any ``R``, 0 included)."""
    h_in, w_in = maps.shape[2], maps.shape[3]
    sizes = _box_sizes(rois)
    widths_ceil = sizes[2]
    layout_y = _axis_cells(sizes[3], h_in)
    layout_x = _axis_cells(widths_ceil, w_in)
    n_cells = (h_in + 1) * (w_in + 1)
    bound = _occupied_only(_cell_bounds_fast(maps), layout_y, layout_x)  # [R, K, cells]
    best = bound.topk(min(FAST_CELLS + 1, n_cells), dim=2)
    cells = best.indices[:, :, :FAST_CELLS]
    logit, index = _evaluate_cells_fast(maps, cells, (layout_y, layout_x), widths_ceil.long())
    # exact iff no cell left out could hold a value >= the maximum found (bounds carry a
    # rounding margin); otherwise the keypoint's ROI is recomputed below
    runner_up = best.values[:, :, FAST_CELLS:].amax(2) if n_cells > FAST_CELLS else logit - 1
    certified = logit > runner_up
    out = _to_keypoints(maps, rois, logit, index, sizes)
    todo = (~certified.all(1)).nonzero()[:, 0]
    return _refine(maps, rois, out, todo)


def heatmaps_to_keypoints_vectorized(maps: Tensor, rois: Tensor) -> Tensor:
    """Same result as :func:`heatmaps_to_keypoints`; fast, memory bounded, OpenVINO-friendly.

    All ROIs at once: bound every source cell (:func:`_cell_bounds_fast`), evaluate exactly the
    pixels of the ``FAST_CELLS`` best-bounded cells per keypoint, and accept the maximum when
    it beats the bound of every other cell: then it is the exact maximum. An ROI with a
    keypoint that is not certified that way (flat or noisy maps) is recomputed exactly, one
    ROI at a time, by a ``Loop`` that runs zero iterations when all are certified. Memory is
    bounded by ``R * K * FAST_CELLS * span^2`` plus one ROI's full resize. There is no MatMul, Resize or
    convolution in the graph, so OpenVINO's CPU plugin keeps all of it in f32 even when its
    default inference precision is bf16 (its "graph tail" rule).
    """
    if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        check_inputs(maps, rois)
    # no dummy ROI (the pruned form's way to survive R = 0 copies all maps): the only
    # reductions over R are made non-empty where they happen (_axis_cells)
    return _keypoints_vectorized(maps.float(), rois.float())


METHODS = {
    "vectorized": heatmaps_to_keypoints_vectorized,
    "pruned": heatmaps_to_keypoints,
    "loop": heatmaps_to_keypoints_loop,
}
