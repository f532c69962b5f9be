"""``reparam``: RepConv/RepGFPN re-parameterization and Conv+BN folding, as a step and a verb.

The algorithm (module level, then torch.fx graph level) is :mod:`damo_plugins.lib.reparam`;
this plugin wraps it in a pass that records the rewrite so checkpoints rebuild, and in
``damo-opt fuse``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext


# ============================================================================= pass
class ReparamConfig(PassConfig):
    mode: Literal["auto", "module", "graph"] = Field(
        "auto",
        description="auto: module level, then fx for the rest; module or graph: one level only",
    )
    fold_bn: bool = Field(True, description="also fold every Conv→BN pair")
    space_to_depth: bool = Field(
        True, description="fold Focus stems (space-to-depth + conv) into one stride-2 conv"
    )
    tolerance: float = Field(1e-5, gt=0, description="max error relative to output scale")


class ReparamPass(Pass):
    """Fuse RepConv-style branches and Conv+BN into single convolutions."""

    name = "reparam"
    accepts = ("torch",)
    Config = ReparamConfig
    tolerance = 1e-5
    description = "RepConv/RepVGG branch fusion and Conv+BN folding (module and torch.fx level)"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        # lib.reparam imports torch (and torch.fx): loaded only when a step runs
        from damo_plugins.lib.reparam import reparameterize

        cfg: ReparamConfig = self.config  # type: ignore[assignment]
        fused, rep = reparameterize(
            artifact.model, cfg.mode, cfg.fold_bn, space_to_depth=cfg.space_to_depth
        )
        out = artifact.derive(model=fused)
        if out.arch is not None:
            record = {
                "mode": cfg.mode,
                "fold_bn": cfg.fold_bn,
                "space_to_depth": cfg.space_to_depth,
            }
            out.arch.setdefault("transforms", []).append({"pass": self.name, "record": record})
        ctx.extra.update(rep.as_dict())
        log: Callable[[str], Any] = ctx.log
        log(
            f"reparam: {rep.repconv_deployed} RepConv(s) deployed, "
            f"{rep.space_to_depth_folded} Focus stem(s) folded, {rep.branch_sums_fused} branch "
            f"sum(s) merged, {rep.conv_bn_folded} Conv+BN folded, {rep.bn_after} BN left"
        )
        for note in rep.notes:
            log(f"reparam: note: {note}")
        return out

    @classmethod
    def replay(cls, module: Any, record: dict[str, Any]) -> Any:
        from damo_plugins.lib.reparam import reparameterize

        mode = record.get("mode", "auto")
        # records written before the Focus fold existed have no key: those stems stay as
        # they were saved
        fused, _ = reparameterize(
            module,
            str(mode),
            bool(record.get("fold_bn", True)),
            inplace=True,
            space_to_depth=bool(record.get("space_to_depth", False)),
        )
        return fused


# ============================================================================ hooks
@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [ReparamPass]


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser(
        "fuse", help="fuse RepConv branches and Conv+BN (reparam), verify, save a checkpoint"
    )
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (or a .pt file)")
    p.add_argument("--mode", choices=("auto", "module", "graph"), default="auto")
    p.add_argument("--no-fold-bn", action="store_true", help="keep Conv->BN pairs unfolded")
    p.add_argument(
        "--no-space-to-depth", action="store_true", help="keep Focus stems as slicing + conv"
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-5, help="max error relative to output scale"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fuse)


def cmd_fuse(args: argparse.Namespace) -> int:
    """``damo-opt fuse MODEL -o DIR``: fuse, check outputs, write ``DIR/model.pt`` and the
    report beside it (``-o FILE.pt``: that one checkpoint, no report).

    The step is applied by the step runner, as a recipe's ``reparam`` step is — for a
    folder through the pipeline as a one-step recipe with flat output, so the folder gets
    the same ownership rules (manifest, lock, ``--force`` replaces only the tool's files)
    as every other verb's — and the verb and the recipe cannot drift apart.
    """
    from pathlib import Path

    from damo_plugins.core.verbs import model_from_args, pass_from_options

    options = {
        "mode": args.mode,
        "fold_bn": not args.no_fold_bn,
        "space_to_depth": not args.no_space_to_depth,
        "tolerance": args.tolerance,
    }
    step = pass_from_options(ReparamPass, options, FUSE_FLAGS)
    out = Path(args.output)
    if out.suffix in (".pt", ".pth"):
        target = out
        if target.exists() and not args.force:
            raise DamoError(f"{target} already exists", "use --force to overwrite it")
    art = model_from_args(args)
    if art.format != "torch":
        raise DamoError(
            f"fuse takes a PyTorch model, not {art.format}", "give a model name or a .pt checkpoint"
        )
    if out.suffix in (".pt", ".pth"):
        return _fuse_to_file(args, step, art, out)
    return _fuse_to_folder(args, options, art, out)


def _fuse_to_folder(
    args: argparse.Namespace, options: dict[str, Any], art: ModelArtifact, out: Any
) -> int:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.pipeline import run
    from damo_plugins.core.verbs import errors_as_flags, log, print_json, run_result_json

    if not art.inputs:
        log("input shape unknown: outputs not compared (give --input-shape to check them)")
    recipe = {"model": str(args.model), "steps": [{"reparam": options}]}
    with errors_as_flags(FUSE_FLAGS):
        res = run(
            recipe,
            manager=get_manager(),
            output=out,
            model=art,
            force=args.force,
            # without an input shape there is nothing to run the check on: fuse, and say so
            verify=bool(art.inputs),
            log=log,
            flat=True,
        )
    before, after = art.param_count() or 0, res.artifact.param_count() or 0
    log(f"parameters: {before / 1e6:.3f}M -> {after / 1e6:.3f}M")
    if args.json:
        print_json(run_result_json(res))
        return 0
    print(res.artifact.path)
    return 0


def _fuse_to_file(args: argparse.Namespace, step: Pass, art: ModelArtifact, target: Any) -> int:
    """``-o FILE.pt``: one checkpoint where the user said, written only when it matches."""
    from pathlib import Path

    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.runner import run_step
    from damo_plugins.core.verbs import log, print_json

    if art.path is not None and Path(art.path).resolve() == Path(target).resolve():
        raise DamoError(f"refusing to overwrite the input model {target}", "choose another -o")
    mgr = get_manager()
    # without an input shape there is nothing to run the check on: fuse, and say so
    ctx = PassContext(manager=mgr, workdir=Path(target).parent, log=log, verify=bool(art.inputs))
    res = run_step(step, art, ctx)
    fused = res.artifact
    if res.verification is not None:
        log(f"fused vs original: {res.verification.message}")
        if not res.passed:
            raise DamoError(
                f"fused model does not match the original: {res.verification.message}",
                "nothing was written",
            )
    else:
        log("input shape unknown: outputs not compared (give --input-shape to check them)")
    before, after = art.param_count() or 0, fused.param_count() or 0
    log(f"parameters: {before / 1e6:.3f}M -> {after / 1e6:.3f}M")
    saved = fused.save(Path(target).parent, stem=Path(target).stem, manager=mgr)
    if args.json:
        print_json(
            {
                "model": str(args.model),
                "files": {"model": str(saved)},
                "params_before": before,
                "params_after": after,
                "seconds": round(res.seconds, 3),
                "verification": res.verification.to_dict() if res.verification else None,
            }
        )
        return 0
    print(saved)
    return 0


#: reparam option -> the ``damo-opt fuse`` flag that sets it
FUSE_FLAGS = {
    "mode": "--mode",
    "fold_bn": "--no-fold-bn",
    "space_to_depth": "--no-space-to-depth",
    "tolerance": "--tolerance",
}
