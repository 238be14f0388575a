"""The external set on a cluster: one array job over ``--shard I/N``, one shared cache, one merge.

Every per-image stage takes ``--shard I/N`` (every N-th ID of the sorted list, from I), so N
tasks with I = 0..N-1 cover each image exactly once and can write to one shared folder (files are
written atomically, so tasks never see each other's half-written files and a rerun of a task
skips what it finished). Three subcommands make that a recipe:

    python -m kit external cluster-script --scheduler slurm|k8s --stage segment|download --shards N \\
        --list external.csv --images /shared/external --cache /shared/cache [...] --out job.sh|job.yaml

writes the job: a SLURM array script (``#SBATCH --array=0-<N-1>%<P>``, I from
``$SLURM_ARRAY_TASK_ID``) or a Kubernetes indexed Job (``completionMode: Indexed``, I from
``$JOB_COMPLETION_INDEX``, the shared cache a PersistentVolumeClaim), and the merge job. Each task
runs the stage for its shard and then

    python -m kit external shard-done --list external.csv --shard I/N --stage NAME \\
        --records /shared/cache/shards --outputs '/shared/cache/classical-*/{id}.npz'

which checks that every image of the shard has its outputs (each ``--outputs`` pattern, ``{id}``
replaced by the ID; a ``*`` in the folder part must match one folder) and only then writes the
shard's record ``<records>/<stage>-of-<N>/shard-<I>.json`` (IDs hash, count, host, time). Last,

    python -m kit external merge-shards --list external.csv --shards N --stage NAME \\
        --records /shared/cache/shards --outputs '/shared/cache/classical-*/{id}.npz'

checks that all N records exist, were made for the same list, and that every output exists; it
writes ``<records>/<stage>-of-<N>/index.csv`` (``ID,shard,<output columns>``) and exits 0, or
names the missing shards and images, prints the array indices to resubmit
(``sbatch --array=3,7 job.sh``) and exits 1. The kit's later stages read the shared cache as if one
machine had written it.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Sequence

from kit import __version__
from kit.atomic import atomic_open
from kit.errors import ConfigError, DataError

STAGES = ("segment", "download")
SCHEDULERS = ("slurm", "k8s")


def _ids(list_path: Path) -> list[str]:
    from kit.layout import read_id_list

    return list(dict.fromkeys(read_id_list(list_path)))


def _ids_sha(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()


def record_dir(records: Path, stage: str, n: int) -> Path:
    return Path(records) / f"{stage}-of-{n}"


def resolve_outputs(patterns: Sequence[str]) -> list[str]:
    """Patterns with ``{id}``: a ``*`` in the folder part is resolved once (it must match one folder)."""
    resolved = []
    for pat in patterns:
        if "{id}" not in pat:
            raise ConfigError(f"--outputs {pat!r}: needs an {{id}} placeholder")
        folder, name = os.path.split(pat)
        if "{id}" in folder:
            raise ConfigError(f"--outputs {pat!r}: {{id}} must be in the file name, not the folder")
        if glob.has_magic(folder):
            hits = sorted(p for p in glob.glob(folder) if os.path.isdir(p))
            if len(hits) != 1:
                raise DataError(f"--outputs {pat!r}: the folder pattern matches {len(hits)} folders"
                                + (f" ({', '.join(hits[:4])})" if hits else "") + "; make it match exactly one")
            folder = hits[0]
        resolved.append(os.path.join(folder, name))
    return resolved


def missing_outputs(ids: Sequence[str], patterns: Sequence[str]) -> list[tuple[str, str]]:
    """(ID, path) of every expected output file that does not exist."""
    return [(i, p.replace("{id}", i)) for i in ids for p in patterns if not os.path.isfile(p.replace("{id}", i))]


def _failed_ids(path: Path | None) -> list[str]:
    """IDs of a stage's failure list (a CSV with an ID column; absent file = none failed)."""
    if path is None or not Path(path).is_file():
        return []
    return _ids(Path(path))


def shard_done(list_path: Path, shard: str, stage: str, records: Path, outputs: Sequence[str],
               failures: Path | None = None) -> tuple[Path | None, list]:
    """Check one shard's outputs; write its record when complete. Returns (record or None, missing).

    IDs in `failures` (the stage's own list of images it gave up on, e.g. HTTP 404) count as
    accounted for: they are recorded as failed, not waited for.
    """
    from kit.segment.cache import parse_shard, shard_ids

    i, n = parse_shard(shard)
    all_ids = _ids(list_path)
    mine = shard_ids(all_ids, (i, n))
    failed = sorted(set(_failed_ids(failures)) & set(mine))
    missing = missing_outputs(sorted(set(mine) - set(failed)), resolve_outputs(outputs))
    if missing:
        return None, missing
    path = record_dir(records, stage, n) / f"shard-{i}.json"
    record = {"stage": stage, "shard": i, "n_shards": n, "list": str(list_path), "list_ids_sha256": _ids_sha(all_ids),
              "n_ids": len(mine), "failed_ids": failed, "outputs": list(outputs), "host": socket.gethostname(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kit": __version__}
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    return path, []


def merge_shards(list_path: Path, n: int, stage: str, records: Path, outputs: Sequence[str]) -> dict:
    """Check all N shards of a stage; write the index when complete. Returns a report dict."""
    import pandas as pd

    from kit.segment.cache import shard_ids

    all_ids = _ids(list_path)
    sha = _ids_sha(all_ids)
    rdir = record_dir(records, stage, n)
    absent, stale, failed = [], [], set()
    for i in range(n):
        path = rdir / f"shard-{i}.json"
        if not path.is_file():
            absent.append(i)
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            rec = {}
        if rec.get("list_ids_sha256") != sha or rec.get("n_shards") != n or rec.get("stage") != stage:
            stale.append(i)
        failed |= set(rec.get("failed_ids", []))
    patterns = resolve_outputs(outputs)
    missing = missing_outputs(sorted(set(all_ids) - failed), patterns)
    report = {"stage": stage, "n_shards": n, "n_ids": len(all_ids), "absent_shards": absent, "stale_shards": stale,
              "missing_outputs": len(missing), "missing_examples": missing[:10], "failed": sorted(failed), "index": None}
    shard_of = {}
    for i in range(n):
        for image_id in shard_ids(all_ids, (i, n)):
            shard_of[image_id] = i
    bad_shards = sorted(set(absent) | set(stale) | {shard_of[m[0]] for m in missing})
    report["rerun_shards"] = bad_shards
    if bad_shards:
        return report
    index = pd.DataFrame({"ID": sorted(set(all_ids) - failed)})
    index["shard"] = index["ID"].map(shard_of)
    for k, p in enumerate(patterns):
        index[f"output{k}"] = [p.replace("{id}", i) for i in index["ID"]]
    out = rdir / "index.csv"
    with atomic_open(out, "w", newline="", encoding="utf-8") as f:
        index.to_csv(f, index=False, lineterminator="\n")
    report["index"] = str(out)
    return report


def format_merge(report: dict, job_hint: str = "job.sh") -> str:
    n = report["n_shards"]
    if not report["rerun_shards"]:
        failed = report["failed"]
        return (f"{report['stage']}: all {n} shards finished; {report['n_ids'] - len(failed)} of {report['n_ids']} images "
                f"with every output" + (f", {len(failed)} failed in the stage (its failure lists; e.g. {failed[0]})"
                                        if failed else "") + f"; index {report['index']}\n")
    lines = [f"{report['stage']}: NOT complete: {len(report['rerun_shards'])} of {n} shards must be rerun"]
    if report["absent_shards"]:
        lines.append(f"  no record (never finished): shards {', '.join(map(str, report['absent_shards']))}")
    if report["stale_shards"]:
        lines.append(f"  record made for another list or shard count: shards {', '.join(map(str, report['stale_shards']))}")
    if report["missing_outputs"]:
        lines.append(f"  {report['missing_outputs']} output files missing, e.g. "
                     + "; ".join(f"{i}: {p}" for i, p in report["missing_examples"][:3]))
    idx = ",".join(map(str, report["rerun_shards"]))
    lines.append(f"  resubmit: sbatch --array={idx} {job_hint}   (Kubernetes: rerun the indexed Job, or a Job for these indices)")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- job scripts


def stage_command(stage: str, shard_expr: str, n: int, args: argparse.Namespace) -> tuple[str, list[str]]:
    """(shell command of one task, --outputs patterns) for a stage; `shard_expr` is the shell I."""
    py = "${KIT_PYTHON:-python}"
    q = shlex.quote
    shard = f"{shard_expr}/{n}"
    failures = ""
    if stage == "segment":
        from kit.segment.cache import MaskCache

        masks = MaskCache(args.cache, args.backend)  # the exact folder the task will write
        cmd = (f"{py} -m kit segment --images {q(str(args.images))} --out {q(str(args.cache))} --ids {q(str(args.list))} "
               f"--workers {args.cpus} --shard {shard} --backend {q(args.backend)} --quiet"
               + (f" --tiles {args.tiles}" if args.tiles else ""))
        outputs = [f"{masks.dir}/{{id}}.npz"]
        if args.tiles:
            from kit.cells import tile_cache_dir

            outputs.append(f"{tile_cache_dir(args.cache, args.tiles, masks)}/{{id}}.npy")
        glue = "&&"  # a failed segmentation task must not be recorded as finished
    elif stage == "download":
        from kit.external.download import SHARD_FAILURES_FILE

        cmd = (f"{py} -m kit external download --list {q(str(args.list))} --out {q(str(args.images))} "
               f"--workers {max(4, 4 * args.cpus)} --shard {shard} --quiet"
               + (f" --size {args.size}" if args.size else ""))
        ext = "png" if args.size else "jpg"
        outputs = [f"{args.images}/{{id}}_{c}.{ext}" for c in ("red", "green", "blue", "yellow")]
        # images the download gave up on (its per-shard failure list) are accounted for, not waited for
        failures = f" --failures {args.images}/{SHARD_FAILURES_FILE.format(i=shard_expr, n=n)}"
        glue = ";"
    else:
        raise ConfigError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    done = (f"{py} -m kit external shard-done --list {q(str(args.list))} --shard {shard} --stage {stage} "
            f"--records {q(str(args.records))} " + " ".join(f"--outputs {q(o)}" for o in outputs) + failures)
    return f"{cmd} {glue} {done}", outputs


def merge_command(stage: str, n: int, args: argparse.Namespace, outputs: Sequence[str]) -> str:
    q = shlex.quote
    return (f"${{KIT_PYTHON:-python}} -m kit external merge-shards --list {q(str(args.list))} --shards {n} --stage {stage} "
            f"--records {q(str(args.records))} " + " ".join(f"--outputs {q(o)}" for o in outputs))


def slurm_script(args: argparse.Namespace) -> str:
    n = args.shards
    task, outputs = stage_command(args.stage, "${SLURM_ARRAY_TASK_ID}", n, args)
    limit = f"%{args.parallel}" if args.parallel else ""
    return f"""#!/bin/bash
# {args.stage} of {args.list} in {n} shards (written by `kit external cluster-script`).
# Submit:  JOB=$(sbatch --parsable {args.out.name})
#          sbatch --dependency=afterany:$JOB --wrap "{merge_command(args.stage, n, args, outputs)}"
# The merge exits 1 and names the shards to resubmit (sbatch --array=I,J {args.out.name}) if any failed.
#SBATCH --job-name=kit-{args.stage}
#SBATCH --array=0-{n - 1}{limit}
#SBATCH --cpus-per-task={args.cpus}
#SBATCH --mem={args.mem}
#SBATCH --time={args.time}
#SBATCH --output=kit-{args.stage}-%A_%a.log
set -euo pipefail
: "${{SLURM_ARRAY_TASK_ID:?run this as an array job (sbatch), or set SLURM_ARRAY_TASK_ID}}"
export OMP_NUM_THREADS=1
{task}
"""


def k8s_manifest(args: argparse.Namespace) -> tuple[str, str]:
    """(the indexed Job, the merge Job) as YAML texts."""
    import yaml

    n = args.shards
    task, outputs = stage_command(args.stage, "${JOB_COMPLETION_INDEX}", n, args)

    def job(name: str, command: str, indexed: bool) -> dict:
        spec = {
            "backoffLimit": 1,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": name, "image": args.container_image,
                    "command": ["bash", "-c", "set -euo pipefail; export OMP_NUM_THREADS=1; " + command],
                    "resources": {"requests": {"cpu": str(args.cpus), "memory": args.mem.replace("G", "Gi")}},
                    "volumeMounts": [{"name": "shared", "mountPath": args.mount}],
                }],
                "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": args.pvc}}],
            }},
        }
        if indexed:
            spec.update({"completionMode": "Indexed", "completions": n, "parallelism": args.parallel or n})
            spec["backoffLimitPerIndex"] = 3
            spec.pop("backoffLimit")
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}

    merge_file = merge_path(args.out)
    head = (f"# {args.stage} of {args.list} in {n} shards (written by `kit external cluster-script`).\n"
            f"# Kubernetes sets JOB_COMPLETION_INDEX to I. Run:\n"
            f"#   kubectl apply -f {args.out.name}\n"
            f"#   until kubectl get job kit-{args.stage} -o jsonpath='{{.status.conditions[*].type}}' | grep -qE 'Complete|Failed';"
            f" do sleep 60; done\n"
            f"#   kubectl apply -f {merge_file.name}   # fails and names the indices to rerun unless all finished\n")
    merge = (f"# the merge step of {args.out.name}\n"
             + yaml.safe_dump(job(f"kit-{args.stage}-merge", merge_command(args.stage, n, args, outputs), False),
                              sort_keys=False, width=10_000))
    return head + yaml.safe_dump(job(f"kit-{args.stage}", task, True), sort_keys=False, width=10_000), merge


def merge_path(out: Path) -> Path:
    """``job.yaml`` -> ``job.merge.yaml`` (the Kubernetes merge Job)."""
    return out.with_name(out.stem + ".merge" + out.suffix)


# ------------------------------------------------------------------------------------ commands


def configure_shard_done(parser: argparse.ArgumentParser) -> None:
    """Record that shard I/N of a stage finished, once every image of it has its outputs."""
    parser.add_argument("--list", required=True, type=Path, help="the ID list the stage ran over")
    parser.add_argument("--shard", required=True, help="I/N of this task")
    parser.add_argument("--stage", required=True, help="a name for the stage (segment, download, ...)")
    parser.add_argument("--records", required=True, type=Path, help="shared folder for the shard records")
    parser.add_argument("--outputs", action="append", required=True,
                        help="output file pattern with {id} (repeatable); a * in the folder part matches one folder")
    parser.add_argument("--failures", type=Path,
                        help="the stage's failure list (CSV with ID): those images are recorded as failed, not missing")
    parser.set_defaults(func=_run_shard_done)


def _run_shard_done(args: argparse.Namespace) -> int:
    path, missing = shard_done(args.list, args.shard, args.stage, args.records, args.outputs, args.failures)
    if missing:
        print(f"shard {args.shard} of {args.stage} is NOT complete: {len(missing)} output files missing, e.g. "
              + "; ".join(f"{i}: {p}" for i, p in missing[:3]) + "; no record written (rerun this task)")
        return 1
    print(f"shard {args.shard} of {args.stage} complete: {path}")
    return 0


def configure_merge_shards(parser: argparse.ArgumentParser) -> None:
    """Check that every shard of a stage finished and write the merged index."""
    parser.add_argument("--list", required=True, type=Path, help="the ID list the stage ran over")
    parser.add_argument("--shards", required=True, type=int, help="N, the number of shards")
    parser.add_argument("--stage", required=True, help="the stage name given to shard-done")
    parser.add_argument("--records", required=True, type=Path, help="the shared folder of the shard records")
    parser.add_argument("--outputs", action="append", required=True, help="the output patterns given to shard-done")
    parser.set_defaults(func=_run_merge_shards)


def _run_merge_shards(args: argparse.Namespace) -> int:
    if args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: must be >= 1")
    report = merge_shards(args.list, args.shards, args.stage, args.records, args.outputs)
    print(format_merge(report), end="")
    return 0 if not report["rerun_shards"] else 1


def configure_cluster_script(parser: argparse.ArgumentParser) -> None:
    """Write a SLURM array script or a Kubernetes indexed Job (and its merge step) for a stage."""
    parser.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--shards", required=True, type=int, help="N array tasks")
    parser.add_argument("--list", required=True, type=Path, help="ID list (external.csv), on the shared file system")
    parser.add_argument("--images", required=True, type=Path, help="image folder (download writes it, segment reads it)")
    parser.add_argument("--cache", required=True, type=Path, help="shared cache root (masks, tiles)")
    parser.add_argument("--records", type=Path, help="shard records folder (default CACHE/shards)")
    parser.add_argument("--backend", default="classical", help="segmentation backend (segment stage)")
    parser.add_argument("--tiles", type=int, default=0, help="also write tiles of SIZE px (segment stage)")
    parser.add_argument("--size", type=int, default=None, help="download: store PNGs of at most SIZE px")
    parser.add_argument("--cpus", type=int, default=4, help="CPUs per task (default 4)")
    parser.add_argument("--mem", default="8G", help="memory per task (default 8G)")
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit per task")
    parser.add_argument("--parallel", type=int, default=0, help="at most this many tasks at once (0: no limit)")
    parser.add_argument("--container-image", default="kit:latest", help="k8s: container image with the kit installed")
    parser.add_argument("--pvc", default="kit-shared", help="k8s: PersistentVolumeClaim of the shared folder")
    parser.add_argument("--mount", default="/shared", help="k8s: where the claim is mounted (paths must be under it)")
    parser.add_argument("--out", required=True, type=Path, help="job.sh (slurm) or job.yaml (k8s) to write")
    parser.set_defaults(func=_run_cluster_script)


def _run_cluster_script(args: argparse.Namespace) -> int:
    if args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: must be >= 1")
    args.records = args.records or args.cache / "shards"
    if args.scheduler == "slurm":
        files = {args.out: slurm_script(args)}
    else:
        job, merge = k8s_manifest(args)
        files = {args.out: job, merge_path(args.out): merge}
    for path, text in files.items():
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if args.scheduler == "slurm":
        os.chmod(args.out, 0o755)
    print(f"wrote {', '.join(map(str, files))} ({args.scheduler}, {args.shards} shards of {args.stage})")
    return 0
