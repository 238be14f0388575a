"""Command ``python -m kit kernel build|push|estimate`` (the argument parsers and their handlers)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kit.kaggle.bundle import BuildOptions, build, estimate_figures, run_inputs
from kit.kaggle.metadata import DEFAULT_COMPETITION, DEFAULT_LICENSE, DEFAULT_PREFIX, VALID_KERNEL_TYPES
from kit.kaggle.push import push
from kit.kaggle.runtime import DEFAULT_N_TEST, HARDWARE, estimate_runtime


def configure_kernel(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,push,estimate}")
    b = sub.add_parser("build", help="lay out the code and weights datasets and the kernel folder(s)")
    b.add_argument("--run", required=True, type=Path, help="run folder (runs/<id>/ with config.yaml and */fold<k>/best.pt)")
    b.add_argument("--user", required=True, help="your Kaggle user name (owner of the datasets and kernels)")
    b.add_argument("--competition", default=DEFAULT_COMPETITION)
    b.add_argument("--out", type=Path, default=Path("build/kaggle"),
                   help="the build folder; built fresh and moved into place, replacing an earlier build there")
    b.add_argument("--force", action="store_true",
                   help="replace --out even when it holds files the kit did not write (they are deleted)")
    b.add_argument("--prefix", default=DEFAULT_PREFIX, help="slug prefix: <prefix>-code, -weights, -infer, -train")
    b.add_argument("--license", dest="license_name", default=DEFAULT_LICENSE, help="dataset licence name (one)")
    b.add_argument("--wheelhouse", action="append", type=Path, default=[],
                   help="folder of wheels to take the pinned extras from (repeatable; offline: --no-index)")
    b.add_argument("--index", action="store_true", help="also let pip download from its configured index (network)")
    b.add_argument("--python-version", default=None,
                   help="the kernel's Python (e.g. 3.11) when it differs from this one; wheels are then chosen for it")
    b.add_argument("--platform", action="append", default=None, help="wheel platform tags with --python-version")
    b.add_argument("--extra-package", action="append", default=[], help="bundle this installed distribution too")
    b.add_argument("--package", action="append", default=None, dest="packages",
                   help="bundle only these distributions (+ what they require) instead of the kit's run-time set")
    b.add_argument("--hpacellseg-wheel", type=Path, default=None, help="wheel of the HPA Cell Segmentator")
    b.add_argument("--hpacellseg-weights", type=Path, default=None, help="folder with its nuclei/cell model weights")
    b.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True, help="kernel with a GPU (default)")
    b.add_argument("--public", action="store_true", help="make the kernel public (default private)")
    b.add_argument("--kernel-type", choices=VALID_KERNEL_TYPES, default="script",
                   help="script (default) or notebook (a one-cell .ipynb of the same code)")
    b.add_argument("--include-last", action="store_true", help="also bundle last.pt (with optimizer state)")
    b.add_argument("--full-checkpoints", action="store_true",
                   help="copy best.pt as is (default: only the weights and config inference reads, ~1/3 the size)")
    b.add_argument("--train-kernel", action="store_true", help="also lay out kernel-train/ (trains one fold)")
    b.add_argument("--train-fold", type=int, default=0, help="the fold the train kernel trains")
    b.add_argument("--n-splits", type=int, default=5, help="folds the train kernel cuts (same seed = same folds)")
    b.add_argument("--train-arg", action="append", default=[], help="extra `kit train` argument/override (repeatable)")
    b.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="test images for the runtime estimate")
    b.add_argument("--hardware", choices=sorted(HARDWARE), default=None, help="hardware of the runtime estimate")
    b.add_argument("--predict-arg", action="append", default=[], help="extra argument passed to `kit predict`")
    b.set_defaults(func=_cmd_build)

    p = sub.add_parser("push", help="publish a build with the kaggle CLI (or print the commands)")
    p.add_argument("--out", type=Path, default=Path("build/kaggle"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--new", dest="mode", action="store_const", const="new", help="datasets do not exist yet: create")
    g.add_argument("--update", dest="mode", action="store_const", const="update", help="datasets exist: new version")
    p.add_argument("-m", "--message", default="kit kernel build", help="dataset version message")
    p.set_defaults(func=_cmd_push, mode="auto")

    e = sub.add_parser("estimate", help="print the kernel runtime estimate for a run")
    e.add_argument("--run", type=Path, default=None)
    e.add_argument("--n-test", type=int, default=DEFAULT_N_TEST)
    e.add_argument("--hardware", choices=sorted(HARDWARE), default="t4")
    e.add_argument("--folds", type=int, default=None)
    e.set_defaults(func=_cmd_estimate)


def _cmd_build(args: argparse.Namespace) -> int:
    opts = BuildOptions(
        run_dir=args.run, user=args.user, out=args.out, competition=args.competition, prefix=args.prefix,
        license_name=args.license_name, wheelhouses=args.wheelhouse, index=args.index,
        python_version=args.python_version, extra_packages=args.extra_package, packages=args.packages,
        hpacellseg_wheel=args.hpacellseg_wheel, hpacellseg_weights=args.hpacellseg_weights, gpu=args.gpu,
        private=not args.public, kernel_type=args.kernel_type, include_last=args.include_last,
        full_checkpoints=args.full_checkpoints, train_kernel=args.train_kernel, train_fold=args.train_fold,
        n_splits=args.n_splits, train_args=args.train_arg, n_test=args.n_test, hardware=args.hardware,
        predict_args=args.predict_arg, force=args.force,
    )
    if args.platform:
        opts.platforms = args.platform
    build(opts)
    print(f"next: python -m kit kernel push --out {args.out} --dry-run")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    return push(args.out, dry_run=args.dry_run, mode=args.mode, message=args.message)


def _cmd_estimate(args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {}
    if args.run is not None:
        manifest, folds = run_inputs(args.run)
        figures = estimate_figures(args.run, manifest, folds)
    if args.folds:
        figures["n_folds"] = args.folds
    for line in estimate_runtime(args.n_test, hardware=args.hardware, **figures).lines():
        print(line)
    return 0
