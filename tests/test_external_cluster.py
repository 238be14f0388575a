"""The cluster recipe: a generated SLURM array script / Kubernetes indexed Job, run here task by task
(the scheduler's index variable set by hand), into one shared cache; the merge step checks every shard."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from kit.cli import main as kit_main
from kit.external import cluster


def _env(**extra):
    env = dict(os.environ, KIT_PYTHON=sys.executable, PYTHONPATH=str(REPO), **extra)
    return env


@pytest.fixture
def job(tiny_dataset, tmp_path):
    shared = tmp_path / "shared"
    images = shared / "images"
    shutil.copytree(tiny_dataset / "train", images)
    ids = sorted({p.name.rsplit("_", 1)[0] for p in images.glob("*_blue.png")})
    lst = shared / "external.csv"
    pd.DataFrame({"ID": ids, "Label": "0"}).to_csv(lst, index=False)
    return shared, images, lst, ids


def _merge_args(shared, lst, outputs, n=3):
    args = ["external", "merge-shards", "--list", str(lst), "--shards", str(n), "--stage", "segment",
            "--records", str(shared / "cache" / "shards")]
    for o in outputs:
        args += ["--outputs", o]
    return args


def test_slurm_array_then_merge(job, tmp_path, capsys):
    shared, images, lst, ids = job
    script = shared / "job.sh"
    assert kit_main(["external", "cluster-script", "--scheduler", "slurm", "--stage", "segment", "--shards", "3",
                     "--list", str(lst), "--images", str(images), "--cache", str(shared / "cache"), "--tiles", "32",
                     "--cpus", "1", "--parallel", "2", "--out", str(script)]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-2%2" in text and "--shard ${SLURM_ARRAY_TASK_ID}/3" in text
    outputs = [tok.strip("'") for tok in text.strip().splitlines()[-1].split() if "{id}" in tok]
    assert len(outputs) == 2  # masks and tiles, in their exact cache folders
    # without the scheduler's index the script refuses to run
    bad = subprocess.run(["bash", str(script)], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "SLURM_ARRAY_TASK_ID" in bad.stderr
    # tasks 0 and 2 run; the merge names shard 1 and the resubmit line
    for i in (0, 2):
        r = subprocess.run(["bash", str(script)], cwd=REPO, env=_env(SLURM_ARRAY_TASK_ID=str(i)),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"shard {i}/3 of segment complete" in r.stdout
    capsys.readouterr()
    assert kit_main(_merge_args(shared, lst, outputs)) == 1
    out = capsys.readouterr().out
    assert "NOT complete" in out and "no record (never finished): shards 1" in out and "sbatch --array=1 " in out
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=_env(SLURM_ARRAY_TASK_ID="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert kit_main(_merge_args(shared, lst, outputs)) == 0
    assert f"all 3 shards finished; {len(ids)} of {len(ids)} images with every output" in capsys.readouterr().out
    index = pd.read_csv(shared / "cache" / "shards" / "segment-of-3" / "index.csv")
    assert sorted(index.ID) == ids and set(index["shard"]) == {0, 1, 2}
    assert all(Path(p).is_file() for p in index.output0) and all(Path(p).is_file() for p in index.output1)
    # an output lost after its shard finished: the merge finds it and names the shard again
    victim = Path(index.output0.iloc[4])
    victim.unlink()
    assert kit_main(_merge_args(shared, lst, outputs)) == 1
    out = capsys.readouterr().out
    assert "1 output files missing" in out and index.ID.iloc[4] in out
    assert f"sbatch --array={index['shard'].iloc[4]} " in out
    # a record made for another list is stale
    other = shared / "other.csv"
    pd.DataFrame({"ID": ids[:5], "Label": "0"}).to_csv(other, index=False)
    rec = shared / "cache" / "shards" / "segment-of-3" / "shard-0.json"
    data = json.loads(rec.read_text())
    data["list_ids_sha256"] = "0" * 64
    rec.write_text(json.dumps(data))
    assert kit_main(_merge_args(shared, lst, outputs)) == 1
    assert "record made for another list or shard count: shards 0" in capsys.readouterr().out


def test_shard_done_refuses_an_incomplete_shard(job, capsys):
    shared, images, lst, ids = job
    code = kit_main(["external", "shard-done", "--list", str(lst), "--shard", "1/2", "--stage", "segment",
                     "--records", str(shared / "rec"), "--outputs", str(shared / "nowhere" / "{id}.npz")])
    assert code == 1 and "NOT complete" in capsys.readouterr().out
    assert not (shared / "rec").exists()
    # a failure list accounts for images the stage gave up on
    fail = shared / "failures.csv"
    mine = ids[1::2]
    pd.DataFrame({"ID": mine}).to_csv(fail, index=False)
    path, missing = cluster.shard_done(lst, "1/2", "x", shared / "rec", [str(shared / "nowhere" / "{id}.npz")], fail)
    assert missing == [] and json.loads(path.read_text())["failed_ids"] == sorted(mine)


def test_kubernetes_indexed_job_command_runs(job, capsys):
    shared, images, lst, ids = job
    out = shared / "job.yaml"
    assert kit_main(["external", "cluster-script", "--scheduler", "k8s", "--stage", "segment", "--shards", "2",
                     "--list", str(lst), "--images", str(images), "--cache", str(shared / "cache"), "--cpus", "1",
                     "--mount", str(shared), "--pvc", "hpa-cache", "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    spec = manifest["spec"]
    assert manifest["kind"] == "Job" and spec["completionMode"] == "Indexed" and spec["completions"] == 2
    pod = spec["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "hpa-cache"
    command = pod["containers"][0]["command"]
    assert command[:2] == ["bash", "-c"] and "${JOB_COMPLETION_INDEX}/2" in command[2]
    merge = yaml.safe_load(cluster.merge_path(out).read_text())
    assert "merge-shards" in merge["spec"]["template"]["spec"]["containers"][0]["command"][2]
    for i in range(2):  # what each pod runs, with the index Kubernetes would set
        r = subprocess.run(command, cwd=REPO, env=_env(JOB_COMPLETION_INDEX=str(i)), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(merge["spec"]["template"]["spec"]["containers"][0]["command"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "all 2 shards finished" in r.stdout, r.stdout + r.stderr
