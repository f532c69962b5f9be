"""``damo-opt train``: the verb over :func:`damo_plugins.train.trainer.train`."""

from __future__ import annotations

import argparse
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl

#: shown in ``--help`` only; the value used is :data:`damo_plugins.train.trainer.DEFAULT_MODEL`,
#: read when the verb runs (importing ``damo_plugins.train`` at load would import torch, and
#: every ``damo-opt`` command loads this module)
_DEFAULT_MODEL_HELP = "damo-yolo-t, width 0.25"


def _cmd_train(args: argparse.Namespace) -> int:
    from damo_plugins.core.verbs import parse_model_args
    from damo_plugins.train.trainer import DEFAULT_MODEL, train

    model_args = parse_model_args(args.model_arg)
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    if args.data is None and not args.generate and not args.resume:
        raise DamoError("no training data given", "pass --data DIR (COCO layout) or --generate")
    res = train(
        args.data,
        output=args.output,
        model=args.model or DEFAULT_MODEL,
        model_args=model_args or None,
        generate=args.generate,
        generate_counts=(args.train_images, args.val_images),
        img_size=args.img_size,
        resume=args.resume,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
    )
    if args.json:
        from damo_plugins.core.verbs import print_json

        print_json(
            {
                "best_map": res.best_map,
                "seconds": round(res.seconds, 3),
                "output": str(res.output),
                "checkpoints": sorted(str(f) for f in res.output.glob("*.pt")),
                "history": res.history,
            }
        )
        return 0
    print(
        f"best mAP@[.5:.95] {res.best_map:.4f} in {res.seconds / 60:.1f} min; checkpoints in {res.output}"
    )
    return 0


@hookimpl
def damo_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a DAMO-YOLO model (COCO folder or generated data)"
    )
    p.add_argument("--data", help="data folder: train/ + train.json, val/ + val.json")
    p.add_argument(
        "--generate", action="store_true", help="generate the synthetic set into --data first"
    )
    p.add_argument("--train-images", type=int, default=3000, help="generated training images")
    p.add_argument("--val-images", type=int, default=300, help="generated validation images")
    p.add_argument(
        "--model",
        help=f"a registered builder or a .pt checkpoint (default: {_DEFAULT_MODEL_HELP})",
    )
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder argument (the default model gets width=0.25)",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop after this much training time")
    p.add_argument("-o", "--output", default="runs/train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (1 is fastest on a busy, shared machine)",
    )
    p.set_defaults(func=_cmd_train)
