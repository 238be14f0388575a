"""DistributedDataParallel on the CPU: 2 processes with gloo train one fold; both ranks must end
with identical weights (and different from the initial ones), and only rank 0 writes the run folder."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_train import _cfg, _write_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, *extra: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kit.train import train_fold

    root = Path(root)
    res = train_fold(_cfg(root, "train.epochs=1", "train.device=cpu", *extra), "cell", 0, progress=False)
    (root / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def test_two_ranks_keep_equal_weights(tmp_path):
    _write_dataset(tmp_path, n=12)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["weights_sha256"] == r1["weights_sha256"]

    from kit.models import build_from_config
    from kit.train import _seed_everything, _weights_digest

    cfg = _cfg(tmp_path)
    _seed_everything(cfg.train.seed)
    initial = _weights_digest(build_from_config(cfg.cell_model))
    assert r0["weights_sha256"] != initial  # they trained
    # rank 0 wrote the fold folder; rank 1 returned no history
    assert (tmp_path / "run/cell/fold0/best.pt").is_file()
    assert r0["epochs_done"] == 1 and r1["epochs_done"] is None


def test_two_ranks_train_a_mil_model(tmp_path):
    _write_dataset(tmp_path, n=12)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "train.cell_mode=mil", "train.bag_size=2",
                            "train.bag_pool=attention"), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["weights_sha256"] == r1["weights_sha256"]
    assert (tmp_path / "run/cell/fold0/oof_bag.csv").is_file() and r1["epochs_done"] is None
