"""Start-up cost of ``damo-opt``: ``--help``, ``plugins`` and ``info`` against ``import torch``.

Run: ``python benchmarks/bench_cli.py [--rounds 5] [--model damo-yolo-s] [--before DIR]``.
Every command is a fresh process (what a user waits for). Each is timed twice: wall clock from
start to exit, and the CPU time (user + system) the process used, read from the kernel's
accounting of waited-for children — on a machine shared with other jobs the wall clock also
counts the time spent waiting for a core, the CPU time does not. The commands run in
interleaved rounds (the order rotates each round) after one discarded warm-up round (cold page
cache), so a burst of load from another process hits all of them alike. Prints a Markdown
section and writes it to ``docs/benchmarks/cli.md`` (``--doc``).

``--before DIR`` also times the three ``damo-opt`` commands with the ``damo_plugins`` package
found in ``DIR`` (put first on ``PYTHONPATH``; the installed adapters stay as they are), in
the same rounds — e.g. the last commit: ``git archive HEAD damo_plugins | tar -x -C DIR``.

Targets (the architecture issue): ``--help`` and ``plugins`` at most 0.5 s and at most 25 %
of ``import torch``; ``info damo-yolo-s`` at most 1.5 s. ``import torch``, the interpreter's
own start-up (``python -c pass``) and ``import torch, torch._dynamo`` are measured in the same
rounds because they bound what the commands can reach: ``info`` of a PyTorch model must import
torch, and counting FLOPs (``torch.utils.flop_counter``, on meta tensors) imports
``torch._dynamo`` as well.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import DOCS, command, interleave, log, machine, machine_line, md_table, write_section

#: targets of the issue: key -> (max seconds, max fraction of ``import torch``)
TARGETS: dict[str, tuple[float, float | None]] = {
    "help": (0.5, 0.25),
    "plugins": (0.5, 0.25),
    "info": (1.5, None),
}

#: one timed command: argv, and the package tree to put first on PYTHONPATH (None: installed)
Command = tuple[list[str], Path | None]
#: one measurement: (wall seconds, CPU seconds)
Sample = tuple[float, float]


def damo_opt() -> list[str]:
    """The installed console script (what ``pip install`` puts next to this Python).

    Called directly rather than through ``PATH``: a version manager's shim on ``PATH`` (pyenv
    adds a bash script and a second process) would be timed as if it were ``damo-opt``.
    """
    script = Path(sys.executable).with_name("damo-opt")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "damo_plugins.cli"]


def commands(model: str, before: Path | None) -> dict[str, Command]:
    """The timed commands, by key, in table order."""
    exe = damo_opt()
    py = sys.executable
    cmds: dict[str, Command] = {
        "help": ([*exe, "--help"], None),
        "plugins": ([*exe, "plugins"], None),
        "info": ([*exe, "info", model], None),
    }
    if before is not None:
        for key in list(cmds):
            cmds[f"{key} (before)"] = (cmds[key][0], before)
    cmds.update(
        {
            "torch": ([py, "-c", "import torch"], None),
            "python": ([py, "-c", "pass"], None),
            "torch+dynamo": ([py, "-c", "import torch, torch._dynamo"], None),
        }
    )
    return cmds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: Command) -> Sample:
    """(wall, CPU) seconds of one process; a failing command stops the benchmark."""
    argv, tree = cmd
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return wall, cpu


def measure(cmds: dict[str, Command], rounds: int) -> dict[str, list[Sample]]:
    """Interleaved rounds after one discarded warm-up round: ``{key: [sample per round]}``."""

    def slot(key: str) -> Callable[[], Sample]:
        def run() -> Sample:
            wall, cpu = timed(cmds[key])
            log(f"{key}: {wall:.2f} s wall, {cpu:.2f} s CPU")
            return wall, cpu

        return run

    log("warm-up round (discarded)")
    interleave({k: slot(k) for k in cmds}, 1)
    return interleave({k: slot(k) for k in cmds}, rounds)


def per_round_ratio(series: dict[str, list[float]], key: str, base: str) -> float:
    """Median over rounds of ``key / base``, both measured in the same round."""
    return statistics.median(a / b for a, b in zip(series[key], series[base]))


def verdict(key: str, seconds: float, fraction: float) -> str:
    limit_s, limit_frac = TARGETS[key]
    parts = [f"≤ {limit_s:g} s: {'met' if seconds <= limit_s else 'MISSED'}"]
    if limit_frac is not None:
        ok = fraction <= limit_frac
        parts.append(f"≤ {limit_frac:.0%} of torch: {'met' if ok else 'MISSED'}")
    return "; ".join(parts)


def report(cmds: dict[str, Command], samples: dict[str, list[Sample]], argv: Sequence[str]) -> str:
    wall = {k: [s[0] for s in v] for k, v in samples.items()}
    cpu = {k: [s[1] for s in v] for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rounds = len(wall["torch"])
    model = cmds["info"][0][-1]
    labels = {
        "help": "`damo-opt --help`",
        "plugins": "`damo-opt plugins`",
        "info": f"`damo-opt info {model}`",
        "torch": '`python -c "import torch"`',
        "python": '`python -c "pass"` (interpreter start-up)',
        "torch+dynamo": '`python -c "import torch, torch._dynamo"`',
    }
    rows = []
    for key, (_, tree) in cmds.items():
        base = key.removesuffix(" (before)")
        label = labels[base] + (" — **before**" if tree is not None else "")
        frac = per_round_ratio(wall, key, "torch")
        frac_cpu = per_round_ratio(cpu, key, "torch")
        rows.append(
            [
                label,
                f"{med[key]:.2f}",
                f"{min(wall[key]):.2f}–{max(wall[key]):.2f}",
                f"{med_cpu[key]:.2f}",
                f"{frac:.0%}",
                f"{frac_cpu:.0%}",
                verdict(base, med[key], frac) if key in TARGETS else "",
            ]
        )
    head = [
        "command",
        "wall s (median)",
        "wall s (range)",
        "CPU s (median)",
        "wall vs `import torch`",
        "CPU vs `import torch`",
        "target (on wall time)",
    ]
    exe = shlex.join(damo_opt())
    lines = [
        "## damo-opt start-up: `--help`, `plugins`, `info` against `import torch`",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        machine_line(machine(openvino_precision=False)),
        "",
        f"Each command is a fresh process: wall clock from start to exit (stdout to "
        f"/dev/null), and the CPU time (user + system) it used, which leaves out the time "
        f"spent waiting for a core on this shared machine. {rounds} interleaved rounds (the "
        f"order rotates every round) after one discarded warm-up round; medians, and each "
        f"command's time as a fraction of `import torch` in the same round (median over "
        f"rounds). `damo-opt` is the installed console script `{exe}`, called directly so "
        f"that no version-manager shim is timed; `python` is `{sys.executable}`.",
        "",
        *md_table(head, rows),
        "",
    ]
    befores = {tree for _, tree in cmds.values() if tree is not None}
    if befores:
        lines += [
            f"**before**: the `damo_plugins` package in `{befores.pop()}` (first on "
            f"`PYTHONPATH`, same adapters). Speed-ups over it, per round (wall / CPU): "
            + ", ".join(
                f"`{k}` {per_round_ratio(wall, f'{k} (before)', k):.1f}x / "
                f"{per_round_ratio(cpu, f'{k} (before)', k):.1f}x"
                for k in ("help", "plugins", "info")
            )
            + ".",
            "",
        ]
    lines += [
        "What limits each figure:",
        "",
        f"- `--help` and `plugins` load every plugin (entry points of the `damo_plugins` group, "
        f"the four adapter distributions included) and call their hooks, but import none of "
        f"torch, onnx, onnxruntime, openvino, nncf, neural_compressor, torch_pruning or "
        f"matplotlib (`tests/core/test_startup.py` checks it). What they still spend: the "
        f"interpreter ({med_cpu['python']:.2f} s CPU here), numpy (only `plugins`: the "
        f"calibration sources' module imports it when the sources are listed) and "
        f"pydantic (the passes' configuration schemas, built at import), the entry-point scan, "
        f"the plugin and adapter modules themselves, and rich for the `plugins` table.",
        f"- `info {model}` builds the model on the meta device and counts FLOPs and output "
        f"shapes there, instead of initializing its weights and running two forward passes "
        f"at full size. What is left is mostly two imports: torch, and `torch._dynamo`, which "
        f"`torch.utils.flop_counter` and PyTorch's Python meta kernels (`torch.cat`'s, for "
        f"one) import on first use. The last row times those two imports alone: "
        f"{med['torch+dynamo']:.2f} s wall, {med_cpu['torch+dynamo']:.2f} s CPU; `info` took "
        f"{per_round_ratio(cpu, 'info', 'torch+dynamo'):.2f}x that CPU time in the same rounds. "
        f"`import torch` alone takes {med['torch']:.2f} s wall here, so no command that "
        f"imports torch can meet a 1.5 s target on this machine.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--model", default="damo-yolo-s", help="model for damo-opt info")
    parser.add_argument(
        "--doc", type=Path, default=DOCS / "cli.md", help="Markdown file to write (the section)"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only, write no file")
    parser.add_argument(
        "--before",
        type=Path,
        help="also time the damo-opt commands with the damo_plugins package in this folder",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.before is not None and not (args.before / "damo_plugins" / "cli.py").is_file():
        parser.error(f"--before {args.before}: no damo_plugins package there")
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = commands(args.model, args.before.resolve() if args.before else None)
    samples = measure(cmds, args.rounds)
    text = report(cmds, samples, argv)
    print(text)
    if not args.no_doc:
        log(f"wrote {write_section(args.doc, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
