"""Calibration sources: where INT8 quantization gets its representative inputs.

Three built-in sources, registered through the ``calibration`` entry point like any plugin:

``images``
    A folder of ``.jpg``/``.png`` (also ``.jpeg``/``.bmp``) files, preprocessed the way
    DAMO-YOLO evaluates: RGB, float32 in 0–255 (no mean/std — the models divide by nothing
    and normalise inside), resized to the model input either by ``stretch`` or by
    ``letterbox`` (keep the aspect ratio, image at the top-left, pad the bottom/right with
    ``pad_value``, as DAMO-YOLO's evaluation pads its batches). Calibration statistics are
    only as good as this match between calibration and deployment preprocessing.
``numpy``
    A ``.npy`` or ``.npz`` file of arrays already shaped like the model input (one sample
    ``[C, H, W]``/``[1, C, H, W]``, or a stack ``[N, C, H, W]``).
``generated``
    Seeded synthetic images (smooth colour fields plus noise) for smoke runs and tests.
``synthetic``
    Images of the project's synthetic detection data set (what the embedded demo model was
    trained on), rendered in memory: representative calibration data for that model.

Every source returns a :class:`CalibrationSet`: a *lazy*, re-iterable sequence of arrays
shaped ``[1, C, H, W]``. Lazy because a few hundred decoded 640-px images take ~1.5 GB;
re-iterable because backends walk the data more than once (NNCF's statistics collection and
bias correction, ONNX Runtime's calibration and our own verification).

In recipes a source is written ``{images: DIR, size: 300}`` (the source's name maps to its
main argument; ``size`` is the number of samples to use — the image size always comes from
the model input), ``{numpy: FILE}`` or ``{generated: 32}``; on the command line ``--calib``
takes a folder, a ``.npy``/``.npz`` file, ``generated`` or ``generated:N``.
"""

from __future__ import annotations

import inspect
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import check_regular

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.manager import PluginManager

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
RESIZE_MODES = ("letterbox", "stretch")


class CalibrationSet(Sequence[np.ndarray]):
    """Samples produced on demand by ``load(i)``; iterating twice yields the same arrays."""

    def __init__(self, name: str, length: int, load: Callable[[int], np.ndarray]) -> None:
        self.name = name
        self._length = length
        self._load = load

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("use CalibrationSet.subset(start, stop) for ranges")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._load(index)

    def __iter__(self) -> Iterator[np.ndarray]:
        # A full pass reads and pre-processes every image (tens of seconds for a few hundred):
        # a progress bar on a terminal, a start and a done line in a log.
        from damo_plugins.core.progress import track

        for i in track(range(self._length), f"calibration samples {self.name}", unit="samples"):
            yield self._load(i)

    def subset(self, start: int, stop: int | None = None) -> CalibrationSet:
        """Samples ``start..stop`` (clipped), still lazy."""
        stop = self._length if stop is None else min(stop, self._length)
        start = min(max(start, 0), stop)
        return CalibrationSet(
            f"{self.name}[{start}:{stop}]", stop - start, lambda i: self._load(start + i)
        )

    def __repr__(self) -> str:
        return f"CalibrationSet({self.name!r}, {self._length} samples)"


def _chw(input_shape: Sequence[int] | None, source: str) -> tuple[int, int, int]:
    if not input_shape or len(input_shape) != 4:
        raise DamoError(
            f"calibration source '{source}' needs the model input shape [N, C, H, W], got {input_shape}",
            "give input_shape in the recipe or --input-shape",
        )
    c, h, w = (int(d) if isinstance(d, int) and d > 0 else -1 for d in input_shape[1:])
    if min(c, h, w) <= 0:
        raise DamoError(
            f"calibration source '{source}' needs a static input shape, got {list(input_shape)}",
            "give a concrete --input-shape such as 1,3,640,640",
        )
    return c, h, w


def _count(size: Any, name: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DamoError(f"calibration '{name}': size must be a positive integer, got {size!r}")
    return size


# ---------------------------------------------------------------------- images
def read_images(
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    size: int | None = None,
    resize: str = "letterbox",
    pad_value: float = 0.0,
    recursive: bool = False,
) -> CalibrationSet:
    """A folder (or one file) of images, preprocessed like DAMO-YOLO's evaluation."""
    c, h, w = _chw(input_shape, "images")
    if c != 3:
        raise DamoError(
            f"calibration 'images' gives 3-channel RGB input, but the model takes {c} channels",
            "use a .npy/.npz calibration file instead",
        )
    if resize not in RESIZE_MODES:
        raise DamoError(
            f"calibration 'images': unknown resize mode '{resize}'",
            f"one of {', '.join(RESIZE_MODES)}",
        )
    root = Path(path)
    if not root.exists():
        raise DamoError(f"calibration image folder not found: {root}", "check the path")
    if root.is_file():
        files = [root]
    else:
        pattern = "**/*" if recursive else "*"
        files = sorted(
            p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    if not files:
        raise DamoError(
            f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})",
            "put a few hundred representative images there, or use --calib generated for a smoke run",
        )
    limit = _count(size, "images")
    files = files[:limit] if limit else files
    from PIL import Image, UnidentifiedImageError

    # A cheap header check up front, so a stray non-image fails now and not halfway
    # through a backend's calibration loop.
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DamoError(
                f"cannot decode calibration image {f}: {exc}", "remove or replace the file"
            ) from exc

    def load(i: int) -> np.ndarray:
        f = files[i]
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB")
                rgb.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DamoError(
                f"cannot decode calibration image {f}: {exc}", "remove or replace the file"
            ) from exc
        return preprocess(rgb, (h, w), resize=resize, pad_value=pad_value)

    return CalibrationSet(f"images:{root}", len(files), load)


def preprocess(
    image: Any, hw: tuple[int, int], *, resize: str = "letterbox", pad_value: float = 0.0
) -> np.ndarray:
    """PIL RGB image -> float32 ``[1, 3, H, W]`` in 0–255 (stretch or DAMO-style letterbox)."""
    from PIL import Image

    h, w = hw
    if resize == "stretch":
        arr = np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.float32)
    else:
        scale = min(h / image.height, w / image.width)
        nh, nw = max(1, round(image.height * scale)), max(1, round(image.width * scale))
        arr = np.full((h, w, 3), pad_value, dtype=np.float32)
        arr[:nh, :nw] = np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


# ----------------------------------------------------------------------- numpy
def read_numpy(
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    size: int | None = None,
    key: str | None = None,
) -> CalibrationSet:
    """Arrays from a ``.npy`` (memory-mapped) or ``.npz`` file, checked against the input."""
    chw = _chw(input_shape, "numpy")
    p = Path(path)
    if not p.is_file():
        raise DamoError(f"calibration file not found: {p}", "give a .npy or .npz file")
    check_regular(p, "calibration file")
    try:
        if p.suffix.lower() == ".npz":
            with zipfile.ZipFile(p) as zf:
                members = sorted(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
            names = [key] if key else members
            missing = [n for n in names if n not in members]
            if missing:
                raise DamoError(f"{p} has no array '{missing[0]}'", f"it has: {', '.join(members)}")
            arrays: list[Any] = [NpzMember(p, n) for n in names]
        else:
            arrays = [np.load(p, mmap_mode="r", allow_pickle=False)]
    except DamoError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DamoError(
            f"cannot read calibration file {p}: {exc}", "write it with numpy.save / numpy.savez"
        ) from exc
    chunks: list[np.ndarray] = []
    for arr in arrays:
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != chw:
            raise DamoError(
                f"calibration file {p} holds an array of shape {list(arr.shape)}, "
                f"which does not fit the model input [N, {chw[0]}, {chw[1]}, {chw[2]}]",
                "resize the data to the model input (or pass --input-shape to match it)",
            )
        if not np.issubdtype(arr.dtype, np.number):
            raise DamoError(f"calibration file {p} holds non-numeric data ({arr.dtype})")
        chunks.append(arr)
    index = [(ci, j) for ci, arr in enumerate(chunks) for j in range(arr.shape[0])]
    if not index:
        raise DamoError(f"calibration file {p} holds no samples")
    limit = _count(size, "numpy")
    index = index[:limit] if limit else index

    def load(i: int) -> np.ndarray:
        ci, j = index[i]
        return np.ascontiguousarray(chunks[ci][j : j + 1], dtype=np.float32)

    return CalibrationSet(f"numpy:{p}", len(index), load)


#: largest array a .npz member may declare (a few MB of zip can claim terabytes)
MAX_NPZ_BYTES = 1 << 34


class NpzMember:
    """One array of an ``.npz``, read lazily sample by sample.

    ``np.load(...)[name]`` decompresses a whole member: a 5.7 MB file of zeros declared
    5.5 GB, whatever ``--subset`` said. Here only the header is read up front (shape, dtype,
    checked against the member's real uncompressed size), and ``self[j]`` decompresses the
    stream up to sample ``j`` (sequential reads, the calibration loop's pattern, cost O(n)).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }.get(version)
                if read_header is None:
                    raise DamoError(f"{path}: array '{name}' has npy format {version}")
                shape, fortran, dtype = read_header(fh)
                self.offset = fh.tell()
        if dtype.hasobject:
            raise DamoError(f"{path}: array '{name}' holds Python objects", "save plain numbers")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > MAX_NPZ_BYTES or info.file_size != self.offset + nbytes:
            raise DamoError(
                f"{path}: array '{name}' declares {list(shape)} {dtype} ({nbytes} bytes) but "
                f"holds {info.file_size - self.offset} bytes (limit {MAX_NPZ_BYTES})",
                "the file is corrupt or not written by numpy.savez",
            )
        if fortran and len(shape) > 1:
            raise DamoError(f"{path}: array '{name}' is Fortran-ordered", "save it C-ordered")
        if len(shape) == 3:  # one image [C, H, W]: a batch of one, as for .npy
            shape = (1, *shape)
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self._sample = (int(np.prod(shape[1:], dtype=np.int64)) if shape else 1) * dtype.itemsize
        self._zip: zipfile.ZipFile | None = None
        self._fh: Any = None
        self._next = 0

    def __getitem__(self, index: slice) -> np.ndarray:
        j = index.start
        if self._fh is None or j < self._next:
            self._reopen()
        self._fh.read((j - self._next) * self._sample)  # skip forward
        data = self._fh.read(self._sample)
        self._next = j + 1
        return np.frombuffer(data, dtype=self.dtype).reshape((1, *self.shape[1:]))

    def _reopen(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._zip = zipfile.ZipFile(self.path)
        self._fh = self._zip.open(f"{self.name}.npy")
        self._fh.read(self.offset)
        self._next = 0


# ------------------------------------------------------------------- generated
def generated_images(
    count: int = 16,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    size: int | None = None,
) -> CalibrationSet:
    """Seeded synthetic images: smooth colour fields with noise, in 0–255.

    Uniform noise would give activations unlike any photograph; low-frequency colour fields
    at least exercise the ranges a real image does. For smoke runs and tests only.
    """
    c, h, w = _chw(input_shape, "generated")
    n = _count(size if size is not None else count, "generated") or 16

    def load(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        gh, gw = max(2, h // 16), max(2, w // 16)
        grid = rng.uniform(0, 255, (c, gh, gw)).astype(np.float32)
        ys = np.linspace(0, gh - 1, h).astype(np.int64)
        xs = np.linspace(0, gw - 1, w).astype(np.int64)
        img = grid[:, ys][:, :, xs] + rng.normal(0, 12, (c, h, w)).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.float32)[None]

    return CalibrationSet(f"generated:{n}", n, load)


# ------------------------------------------------------------------- synthetic
def synthetic_images(
    count: int = 64,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    size: int | None = None,
    resize: str = "letterbox",
) -> CalibrationSet:
    """Images of the project's synthetic detection set (train split), rendered in memory.

    The embedded demo model was trained on this data, so these are *representative*
    calibration images for it — unlike ``generated``, which only exercises value ranges.
    Preprocessed exactly as training and evaluation do (top-left letterbox, zero padding).
    """
    from PIL import Image

    from damo_plugins.data.synthetic import render_image

    _, h, w = _chw(input_shape, "synthetic")
    n = _count(size if size is not None else count, "synthetic") or 64
    if resize not in RESIZE_MODES:
        raise DamoError(f"unknown resize mode '{resize}'", f"one of {', '.join(RESIZE_MODES)}")

    def load(i: int) -> np.ndarray:
        pixels, _ = render_image(seed, "train", i)
        return preprocess(Image.fromarray(pixels), (h, w), resize=resize)

    return CalibrationSet(f"synthetic:{n}", n, load)


# --------------------------------------------------------------------- resolve
def resolve_calibration(
    spec: Any,
    input_shape: Sequence[int] | None,
    manager: PluginManager | None = None,
    *,
    seed: int = 0,
) -> CalibrationSet:
    """Turn a recipe/CLI calibration spec into a :class:`CalibrationSet`.

    ``spec`` is a folder, a ``.npy``/``.npz`` path, ``generated``/``generated:N``, a
    registered source name, or a mapping ``{source: main_argument, option: value, ...}``.
    """
    from damo_plugins.core.manager import get_manager, suggest

    mgr = manager or get_manager()
    known = mgr.names("calibration")
    name: str
    main: Any = None
    options: dict[str, Any] = {}
    if isinstance(spec, CalibrationSet):
        return spec
    if isinstance(spec, Mapping):
        keys = [k for k in spec if k in known]
        if len(keys) != 1:
            raise DamoError(
                f"calibration {dict(spec)!r} must name exactly one source",
                f"e.g. {{images: DIR}}, {{numpy: FILE}} or {{generated: 32}}; installed: {', '.join(known)}",
            )
        name = str(keys[0])
        main = spec[name]
        options = {str(k): v for k, v in spec.items() if k != name}
    elif isinstance(spec, (str, Path)):
        text = str(spec)
        path = Path(text)
        head, _, tail = text.partition(":")
        if head in known and not path.exists():
            name = head
            if tail:
                main = int(tail) if tail.isdigit() else tail
        elif path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
            name, main = "images", text
        elif path.suffix.lower() in (".npy", ".npz"):
            name, main = "numpy", text
        else:
            raise DamoError(
                f"calibration source '{text}' is neither a folder, a .npy/.npz file nor a known source",
                f"known sources: {', '.join(known)} ({suggest(head, known)})",
            )
    else:
        raise DamoError(
            f"calibration must be a path, a source name or a mapping, not {type(spec).__name__}"
        )
    reader = mgr.get_calibration_source(name)
    if "seed" in inspect.signature(reader).parameters and "seed" not in options:
        options["seed"] = seed
    try:
        data = (
            reader(main, input_shape=input_shape, **options)
            if main is not None
            else reader(input_shape=input_shape, **options)
        )
    except TypeError as exc:
        raise DamoError(
            f"calibration source '{name}' does not accept these options: {exc}"
        ) from exc
    if isinstance(data, CalibrationSet):
        return data
    # A third-party reader may return any iterable: keep it as a list so it can be re-read.
    items = [np.asarray(x, dtype=np.float32) for x in data]
    if not items:
        raise DamoError(f"calibration source '{name}' produced no samples")
    return CalibrationSet(name, len(items), items.__getitem__)
