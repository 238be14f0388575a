"""External data: the public HPA images as training data.

One module per job, each with its own subcommand of ``python -m kit external``:

- `labels`   (`kit.external.labels`):   map public label lists into the 2021 classes.
- `download` (`kit.external.download`): resumable, parallel download of the HPA website channels.
- `table`    (`kit.external.table`):    Kaggle train + external in one labels file with groups.
- `shard-done`, `merge-shards`, `cluster-script` (`kit.external.cluster`): array jobs over
  ``--shard I/N`` writing to one shared cache, and the merge step that checks every shard finished.

Duplicates have a top-level command, ``python -m kit dedup`` (`kit.external.dedup`).
"""
from __future__ import annotations

import argparse
import importlib

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "labels": ("kit.external.labels", "Map a public label list (2019 scheme or HPA names) into the 2021 classes."),
    "download": ("kit.external.download", "Download the four channels of listed HPA website fields (resumable)."),
    "table": ("kit.external.table", "Merge Kaggle train and external labels into one table with source and group."),
    "shard-done": ("kit.external.cluster", "Record that shard I/N of a stage finished (run at the end of an array job)."),
    "merge-shards": ("kit.external.cluster", "Check that every shard of a stage finished and write the merged index."),
    "cluster-script": ("kit.external.cluster", "Write a SLURM array script or a Kubernetes indexed Job for a stage."),
}


def configure_external(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, (module_name, help_line) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        module = importlib.import_module(module_name)
        getattr(module, "configure_" + name.replace("-", "_"))(p)
