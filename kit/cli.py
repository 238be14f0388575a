"""`python -m kit <command> ...`: the command registry and error handling.

Each command lives in the module that does its job. That module defines
``configure_<command>(parser)`` (``-`` in the name becomes ``_``), which adds the command's
arguments and sets ``func`` via ``parser.set_defaults(func=...)``; ``func(args)`` returns an exit
code (None means 0). Modules are imported only when their command runs, so ``--help`` is instant
and torch is never imported by commands that do not need it.

Errors: a `kit.errors.KitError` (the user's mistake) and an OSError (the system refused a file
operation on a path the user chose: not a folder, no permission, disk full, name too long) print
one line, ``error: <message>``, and exit 2; so do argparse's errors (`KitParser`). Anything else is
a bug and keeps its traceback. ``KIT_TRACEBACK=1`` shows the traceback of every error.
Option types shared by the commands: every ``type=float`` option is finite (`finite_float`, nan
and inf are never a setting), ``type=int`` quotes a bad value cut short, `folder_arg` is a
folder to create or use (refused when it, or a parent, is a file) and `file_arg` a file to write
(refused when it is a folder or a parent is a file), checked before any work starts.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

from kit import __version__
from kit.errors import ConfigError, KitError, clip, one_line

# command -> (module, one-line help). Order is the order of a typical project.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kit.pipeline", "The whole job on a synthetic dataset: synth, then run; prints the score table."),
    "run": ("kit.pipeline", "The whole pipeline on a dataset in the Kaggle layout (folds .. submission .. leaderboard)."),
    "synth": ("kit.synth", "Generate a synthetic HPA-like dataset with per-cell ground truth."),
    "check-data": ("kit.check_data", "Check a dataset in the Kaggle layout and report every problem at once."),
    "analyze": ("kit.analyze", "Label statistics and channel plots for a dataset or a train.csv."),
    "folds": ("kit.folds", "Multi-label stratified (optionally grouped) folds over image labels."),
    "external": ("kit.external", "External data: map public HPA label lists, download, merge tables, cluster shards."),
    "dedup": ("kit.external.dedup", "Find duplicate fields across folders (green thumbnails); groups, pairs, leaks."),
    "segment": ("kit.segment.cache", "Segment nuclei and cells into a resumable mask cache."),
    "train": ("kit.train", "Train per-fold cell and image classifiers from a YAML config."),
    "lr-find": ("kit.lr_find", "Learning-rate range test: plots loss vs learning rate, suggests a rate."),
    "predict": ("kit.predict", "Predict a folder of images with a run's fold models into submission.csv."),
    "tune-combine": ("kit.combine", "Choose the cell/image score combination on out-of-fold predictions."),
    "ceiling": ("kit.ceilings", "Segmentation and classification ceilings of a run (needs true masks)."),
    "evaluate": ("kit.metric", "Score a submission against a solution file (competition mAP, IoU 0.6)."),
    "validate-submission": ("kit.submission", "Check a submission file and report every problem at once."),
    "report": ("kit.report", "Write a run's report: one static HTML page with scores, per-class AP, fields and cells."),
    "leaderboard": ("kit.leaderboard", "Show, record or export the local cross-validation leaderboard."),
    "kernel": ("kit.kaggle", "Build or push offline Kaggle kernels and their datasets."),
    "bench": ("kit.bench", "Throughput of every inference/training path vs the plain baseline, and the FLOP bound."),
}


def _print_overview() -> None:
    width = max(len(c) for c in COMMANDS)
    print(f"usage: python -m kit <command> [options]   (kit {__version__})\n")
    print("Label single cells of HPA images from image-level labels.\n\ncommands:")
    for name, (_, help_line) in COMMANDS.items():
        print(f"  {name:<{width}}  {help_line}")
    print("\nRun `python -m kit <command> --help` for a command's options.")


def finite_float(text: str) -> float:
    """A float option's value: a finite number (argparse reports the error on one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {clip(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {clip(text)}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {clip(text)}") from None


def folder_arg(text: str) -> Path:
    """A folder the command creates or fills: refused when it, or one of its parents, is a file."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{clip(text, 200)} is not a folder" if p == path else f"{clip(str(p), 200)} is a file, not a folder")
            break
    return path


def file_arg(text: str) -> Path:
    """A file the command writes: refused when it is a folder, or when one of its parents is a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{clip(text, 200)} is a folder: give a file name, e.g. "
                                         f"{clip(str(path / 'submission.csv'), 200)}")
    for p in path.parents:
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{clip(str(p), 200)} is a file, not a folder")
            break
    return path


class KitParser(argparse.ArgumentParser):
    """argparse with the kit's option types and one-line errors (a ConfigError naming the command)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Looked up for every argument, in groups and sub-commands too.
        self.register("type", float, finite_float)
        self.register("type", int, _int)

    def error(self, message: str):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one command (imports that command's module)."""
    module_name, help_line = COMMANDS[command]
    parser = KitParser(prog=f"python -m kit {command}", description=help_line)
    module = importlib.import_module(module_name)
    getattr(module, "configure_" + command.replace("-", "_"))(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_overview()
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"error: unknown command {clip(command)}; run `python -m kit --help` for the list", file=sys.stderr)
        return 2
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv[1:])
        result = args.func(args)
        return int(result or 0)
    except KitError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_message(exc) + " (KIT_TRACEBACK=1 shows where)")
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    if os.environ.get("KIT_TRACEBACK"):
        raise  # called inside the `except` block: re-raises the error being handled
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def _os_message(exc: OSError) -> str:
    if not exc.strerror:
        return str(exc)
    names = [clip(str(n), 200) for n in (exc.filename, exc.filename2) if n is not None]
    return exc.strerror + (f": {' -> '.join(names)}" if names else "")
