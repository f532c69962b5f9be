"""Train a DAMO-YOLO model on a COCO-format folder or the generated set.

Data layout (what :func:`damo_plugins.data.synthetic.generate` writes, and what users give):
``DATA/train/`` + ``DATA/train.json`` and ``DATA/val/`` + ``DATA/val.json`` (COCO JSON, bbox
annotations). ``--generate`` first writes the seeded synthetic set into ``DATA`` (default
``OUTPUT/data``).

The run folder gets ``last.pt`` (resumable, and loadable by every ``damo-opt`` verb),
``best.pt`` (best validation mAP, EMA weights) and ``history.json``. ``--resume`` continues
from ``OUTPUT/last.pt`` with the configuration stored in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError

DEFAULT_MODEL = "damo-yolo-t"
#: the small model of the benchmarks: DAMO-YOLO-T at a quarter of its width, for 256-320 px
DEFAULT_MODEL_ARGS: dict[str, Any] = {"width": 0.25}


@dataclass
class TrainResult:
    output: Path
    best_map: float
    history: list[dict[str, Any]]
    seconds: float
    model: Any


def data_splits(data: str | Path, img_size: int, seed: int = 0) -> tuple[Any, Any]:
    """(augmenting train set, plain val set) of any ``--data`` with train and val splits.

    Our layout is read directly; any other (a COCO folder, a dataset YAML, ``synthetic``)
    through :func:`damo_plugins.data.sources.resolve`, so training, pruning and ``optimize``
    accept the same data.
    """
    from damo_plugins.data.coco import CocoDetection

    root = Path(data)
    if not (root / "train.json").is_file():
        from damo_plugins.data.sources import resolve

        src = resolve(str(data), seed=seed)
        if src.train is None or src.val is None:
            raise DamoError(f"{data} has no train and val splits", "training needs both (labelled)")
        train = CocoDetection(
            src.train.images, src.train.annotations, img_size, augment=True, seed=seed
        )
        return train, CocoDetection(src.val.images, src.val.annotations, img_size, augment=False)
    for split in ("train", "val"):
        if not (root / f"{split}.json").is_file() or not (root / split).is_dir():
            raise DamoError(
                f"{root} is not a detection data folder: {split}.json or {split}/ is missing",
                "expected DATA/train/ + DATA/train.json and DATA/val/ + DATA/val.json, or use --generate",
            )
    train = CocoDetection(root / "train", root / "train.json", img_size, augment=True, seed=seed)
    val = CocoDetection(root / "val", root / "val.json", img_size, augment=False)
    if len(train) == 0:
        raise DamoError(f"{root / 'train.json'} lists no images")
    return train, val


def train(
    data: str | Path | None = None,
    *,
    output: str | Path = "runs/train",
    model: str = DEFAULT_MODEL,
    model_args: Mapping[str, Any] | None = None,
    generate: bool = False,
    generate_counts: tuple[int, int] = (3000, 300),
    img_size: int = 256,
    resume: bool = False,
    log: Callable[[str], None] = print,
    **config: Any,
) -> TrainResult:
    """Train ``model`` (a registered builder or a checkpoint) and write the run folder.

    ``config`` holds :class:`~damo_plugins.train.loop.TrainConfig` fields (``epochs``,
    ``batch_size``, ``lr``, ...). ``num_classes`` is taken from the data unless given.
    """
    from damo_plugins.core.artifact import load_model
    from damo_plugins.train.loop import TrainConfig, fit, load_train_state

    out = Path(output)
    if img_size % 32:
        raise DamoError(f"image size must be a multiple of 32, got {img_size}")
    state = None
    previous: dict[str, Any] = {}
    if not resume and (out / "last.pt").exists():
        raise DamoError(
            f"{out} already holds a training run", "use --resume to continue it, or another -o"
        )
    if resume:
        state = load_train_state(out / "last.pt")
        stored = dict(state.get("config") or {})
        keep = ("epochs", "progress", "max_minutes", "log_every")
        stored.update({k: v for k, v in config.items() if k in keep})
        config = stored
        # the architecture (with its arguments) comes from the checkpoint, the data from run.json
        model = str(out / "last.pt")
        previous = _read_run_info(out)
        if data is None and previous.get("data"):
            data = previous["data"]
        img_size = int(previous.get("img_size", img_size))
    data = Path(data) if data is not None else out / "data"
    seed = int(config.get("seed", 0))
    if generate and not (data / "train.json").exists():
        from damo_plugins.data.synthetic import generate as gen

        log(f"generating the synthetic data set in {data} ...")
        gen(data, train=generate_counts[0], val=generate_counts[1], seed=seed)
    train_set, val_set = data_splits(data, img_size, seed=seed)
    try:
        cfg = TrainConfig(**config)
    except TypeError as exc:
        raise DamoError(f"unknown training option: {exc}") from None
    default = model_args is None and model == DEFAULT_MODEL
    kwargs = dict(DEFAULT_MODEL_ARGS if default else (model_args or {}))
    if Path(model).suffix not in (".pt", ".pth"):
        kwargs.setdefault("num_classes", train_set.num_classes)
    art = load_model(model, input_shape=[1, 3, img_size, img_size], model_args=kwargs)
    net = art.model
    head = getattr(net, "head", None)
    if head is None or getattr(head, "num_classes", None) != train_set.num_classes:
        raise DamoError(
            f"the model predicts {getattr(head, 'num_classes', '?')} classes but the data has "
            f"{train_set.num_classes}",
            "build it with --model-arg num_classes=N",
        )
    if state is not None:
        log(f"resuming from {out / 'last.pt'} at epoch {state['epoch']}")
    out.mkdir(parents=True, exist_ok=True)
    arch = dict(art.arch) if art.arch else None
    info = {"model": model, "model_args": kwargs, "img_size": img_size, "data": str(data)}
    if state is not None:
        info.update({k: previous[k] for k in ("model", "model_args") if k in previous})
    write_run_info(out, info)
    res = fit(net, train_set, cfg, val_set=val_set, output=out, arch=arch, resume=state, log=log)
    info.update({"config": asdict(cfg), "best_mAP": res.best_map, "seconds": round(res.seconds, 1)})
    write_run_info(out, info)
    return TrainResult(out, res.best_map, res.history, res.seconds, res.model)


def _read_run_info(out: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((out / "run.json").read_text()))
    except (OSError, ValueError):
        return {}


def write_run_info(out: Path, info: Mapping[str, Any]) -> None:
    from damo_plugins.core.io import write_text

    write_text(out / "run.json", json.dumps(dict(info), indent=1, default=str))
