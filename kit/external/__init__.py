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

# subcommand -> module; the help line is the docstring of the module's configure_<subcommand>
SUBCOMMANDS: dict[str, str] = {
    "labels": "kit.external.labels", "download": "kit.external.download", "table": "kit.external.table",
    "shard-done": "kit.external.cluster", "merge-shards": "kit.external.cluster", "cluster-script": "kit.external.cluster",
}


def configure_external(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        configure = getattr(importlib.import_module(module_name), "configure_" + name.replace("-", "_"))
        help_line = (configure.__doc__ or "").strip().splitlines()[0]
        configure(sub.add_parser(name, help=help_line, description=help_line))
