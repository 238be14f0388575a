"""`kit run` before and after "one decode per image": channel-file opens and wall time, in one run.

The same fixed synthetic dataset (`kit synth`, --seed) is run through `python -m kit run` twice, from
scratch each time (its own --work folder):

- BEFORE: the kit at --base (default 971207d, the commit before the change), checked out by this
  script into a temporary `git worktree` (removed at the end);
- AFTER: the working tree this script belongs to.

Both runs use the same interpreter, settings and --workers. Every opening of a channel file
(``<data>/{train,test}/<ID>_<channel>.png``) by any process of the run (spawn workers included) is
counted by an audit hook (`sys.addaudithook`, installed through a ``sitecustomize`` on PYTHONPATH:
it sees Python's ``open`` and numpy's ``fromfile``, how both versions read channel files and their
headers). Prints per version the opens per channel file (train and test apart) and the wall time
of the whole `kit run`, and the ratios BEFORE / AFTER, measured in the same run of this script.

    .venv/bin/python benchmarks/bench_pipeline.py                  # 16 train + 6 test 2048 px 16-bit fields
    .venv/bin/python benchmarks/bench_pipeline.py --train 8 --test 3 --size 512 --bit-depth 8   # quick

The model part is kept small (ResNet-18, 1 epoch, 32 px tiles, 64 px fields, 2 folds) so that the
decode, segmentation and caching work the change is about is a visible share of the time. On a
machine shared with other jobs, compare the ratios, and see the load printed at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOOK = '''
import os, sys
_dir = os.environ.get("KIT_BENCH_OPEN_LOG")
_data = os.environ.get("KIT_BENCH_DATA")
if _dir and _data:
    _log = open(os.path.join(_dir, "opens-%d.txt" % os.getpid()), "a", buffering=1)
    _roots = (os.path.join(_data, "train") + os.sep, os.path.join(_data, "test") + os.sep)

    def _count(event, args, _log=_log, _roots=_roots):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_roots):
                _log.write(path + "\\n")

    sys.addaudithook(_count)
'''

SETTINGS = ["model.backbone=resnet18", "train.epochs=1", "data.tile_size=32", "data.field_size=64",
            "train.batch_size=32", "train.workers=0", "predict.tta=1", "predict.batch_size=128", "train.device=cpu"]


def run_kit(label: str, tree: Path, data: Path, root: Path, workers: int, folds: int) -> dict:
    """One `kit run` from scratch with the kit in `tree`; returns its opens, wall time and stage timings."""
    hook_dir = root / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    log_dir = root / f"opens-{label}"
    log_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook_dir), str(tree)]),
               KIT_BENCH_OPEN_LOG=str(log_dir), KIT_BENCH_DATA=str(data.resolve()))
    cmd = [sys.executable, "-m", "kit", "run", "--data", str(data), "--work", str(root / f"work-{label}"),
           "--submission", str(root / f"submission-{label}.csv"), "--folds", str(folds), "--workers", str(workers),
           "--leaderboard", str(root / f"lb-{label}.sqlite"), "--json", *SETTINGS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{label}: kit run failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    opens: Counter = Counter()
    for f in log_dir.glob("opens-*.txt"):
        opens.update(line for line in f.read_text().splitlines() if line)
    return {"wall": wall, "opens": opens, "timings": result.get("timings", {}), "combined": result.get("combined")}


def summarise(opens: Counter, files: list[str], split: str) -> tuple[int, float, int, int]:
    counts = [opens.get(f, 0) for f in files if f"{os.sep}{split}{os.sep}" in f]
    return len(counts), sum(counts) / max(len(counts), 1), min(counts, default=0), max(counts, default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="971207d", help="the commit before the change (default 971207d)")
    ap.add_argument("--train", type=int, default=16, help="train images (default 16)")
    ap.add_argument("--test", type=int, default=6, help="test images (default 6)")
    ap.add_argument("--size", type=int, default=2048, help="image side in px (default 2048, as Kaggle's)")
    ap.add_argument("--bit-depth", type=int, default=16, choices=(8, 16), help="8 or 16 (default 16)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="--workers of both runs (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    from kit.synth import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    before_tree = root / "before"
    try:
        print(f"load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} on "
              f"{os.cpu_count()} CPUs (1, 5, 15 min)")
        t = time.perf_counter()
        data = generate_dataset(root / "data", n_train=args.train, n_test=args.test, size=args.size, seed=args.seed,
                                bit_depth=args.bit_depth, workers=args.workers)
        print(f"dataset: {args.train} train + {args.test} test {args.size} px {args.bit_depth}-bit fields, seed "
              f"{args.seed} ({time.perf_counter() - t:.0f} s to generate); kit run --folds {args.folds} "
              f"--workers {args.workers} {' '.join(SETTINGS)}")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), args.base],
                       check=True, capture_output=True)
        files = sorted(str(p.resolve()) for split in ("train", "test") for p in (data / split).glob("*.png"))
        runs = {}
        for label, tree in (("before", before_tree), ("after", REPO)):
            print(f"running {label} ...", flush=True)
            runs[label] = run_kit(label, tree, data, root, args.workers, args.folds)
        b, a = runs["before"], runs["after"]
        print()
        print(f"{'':38}{'BEFORE ' + args.base:>18}{'AFTER (working tree)':>22}{'before/after':>14}")
        for split in ("train", "test"):
            nb, mb, lob, hib = summarise(b["opens"], files, split)
            _, ma, loa, hia = summarise(a["opens"], files, split)
            print(f"{f'opens per {split} channel file ({nb} files)':38}{f'{mb:.2f} ({lob}-{hib})':>18}"
                  f"{f'{ma:.2f} ({loa}-{hia})':>22}{mb / ma if ma else float('nan'):>13.2f}x")
        tb, ta = sum(b["opens"][f] for f in files), sum(a["opens"][f] for f in files)
        print(f"{'channel-file opens, whole run':38}{tb:>18}{ta:>22}{tb / ta if ta else float('nan'):>13.2f}x")
        print(f"{'wall time of kit run (s)':38}{b['wall']:>18.1f}{a['wall']:>22.1f}{b['wall'] / a['wall']:>13.2f}x")
        print(f"{'test mAP of the submission':38}{b['combined'] or float('nan'):>18.4f}{a['combined'] or float('nan'):>22.4f}")
        print()
        for label, r in runs.items():
            print(f"{label} stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)], capture_output=True)
        print(f"kept {root}") if args.keep else shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
