"""The local cross-validation leaderboard: every run's fold, OOF, test and public scores in SQLite.

Database: ``leaderboard.sqlite`` in the current directory (the project root), or ``--db PATH``, or
the environment variable ``KIT_LEADERBOARD``. WAL journal, every write one ``BEGIN IMMEDIATE``
transaction with a 60 s busy timeout, so trainings that finish at the same moment (several
processes, several machines on one local disk) all land; readers never block writers.

Table ``runs`` (schema version 1 in ``PRAGMA user_version``), one row per run and fold::

    run_id        TEXT     run name (runs/<run_id>)            } primary key
    fold          INTEGER  0..K-1, or -1 for the run's overall } (run_id, fold)
                           out-of-fold row (scores on the concatenated OOF predictions)
    created       TEXT     first time the run was added, ISO 8601 UTC ("2026-11-25T17:44:31Z")
    git_commit    TEXT     commit of the kit's source tree, "+dirty" when modified; NULL outside git
    config_hash   TEXT     kit.config.config_hash of the resolved run config
    dataset       TEXT     what the scores were measured on (data folder name), "" if not given
    backbone      TEXT
    combine       TEXT     cell/image combination strategy (e.g. "geometric:0.6")
    metric        TEXT     "cell_mAP" where per-cell truth exists (synthetic data), else
                           "image_macro_AP" (real data: cell mAP is unavailable)
    fold_score    REAL     this fold's score (the overall OOF score on the fold -1 row)
    oof_score     REAL     overall OOF score of the run (same on every row of the run)
    test_score    REAL     score on a held-out test set with truth, else NULL
    public_score  REAL     Kaggle public LB score recorded by the user, else NULL
    notes         TEXT
    extra         TEXT     JSON object of anything else (timings, options)

``export --html lb.html`` (`to_html`) shows the runs of each (dataset, metric) side by side: the
scores, then the settings of each run's ``config.yaml`` that differ between the runs
(highlighted), and a link to each run's report (``RUN/report/index.html``, `kit.report`).

Ranking (`Leaderboard.ranked`): within each (dataset, metric), runs with a ``test_score`` first,
best test score first, then runs without one, best ``oof_score`` first (a test score is only
compared with test scores); ties by creation time. Runs on different data or metrics are never
ranked against each other.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import difflib
import json
import math
import os
import sqlite3
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from kit.atomic import atomic_open
from kit.errors import ConfigError, DataError, clip

DEFAULT_DB = "leaderboard.sqlite"
ENV_VAR = "KIT_LEADERBOARD"
OVERALL = -1  # the fold number of a run's overall out-of-fold row
METRICS = ("cell_mAP", "image_macro_AP")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

_COLUMNS = (
    "run_id", "fold", "created", "git_commit", "config_hash", "dataset", "backbone", "combine",
    "metric", "fold_score", "oof_score", "test_score", "public_score", "notes", "extra",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT    NOT NULL,
    fold         INTEGER NOT NULL,
    created      TEXT    NOT NULL,
    git_commit   TEXT,
    config_hash  TEXT,
    dataset      TEXT    NOT NULL DEFAULT '',
    backbone     TEXT,
    combine      TEXT,
    metric       TEXT    NOT NULL,
    fold_score   REAL,
    oof_score    REAL,
    test_score   REAL,
    public_score REAL,
    notes        TEXT    NOT NULL DEFAULT '',
    extra        TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, fold)
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""


def default_path() -> Path:
    """``$KIT_LEADERBOARD`` if set, else ``leaderboard.sqlite`` in the current directory."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DB)


def git_commit(path: str | Path | None = None) -> str | None:
    """Commit of the git tree holding `path` (default: the kit's source), ``+dirty`` if modified.

    Best effort: None outside a git tree, without git, or on any error.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_detect_commit = git_commit  # add_run's `git_commit` argument shadows the function


def _score(value: Any, name: str, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {clip(value)}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {clip(value)}")
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Leaderboard:
    """A leaderboard database. Cheap to create: each call opens and closes its own connection,
    so one object may be used from several threads and several processes may share the file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        if self.path.is_dir():  # else "no runs recorded" would be the answer, read from no file
            raise ConfigError(f"leaderboard database {self.path} is a folder: give a file, e.g. {self.path / 'leaderboard.sqlite'}")

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the leaderboard database {self.path}: {exc}") from exc
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return con

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front: no upgrade deadlock)."""
        con = self._connect()
        try:
            self._ensure_schema(con)
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise DataError(f"leaderboard database {self.path}: {exc}") from exc
        finally:
            con.close()

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        # Switching to WAL needs a moment of exclusive access; a concurrent first use can see
        # "database is locked" even with the busy timeout, so retry for a while.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("PRAGMA journal_mode = WAL")
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version == SCHEMA_VERSION:
                    return
                if version > SCHEMA_VERSION:
                    raise DataError(f"leaderboard database {self.path} has schema version {version}, "
                                    f"newer than this kit's {SCHEMA_VERSION}: update the kit")
                con.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(statement)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- writing ------------------------------------------------------------------------------

    def add_run(
        self,
        run_id: str,
        *,
        fold_scores: Mapping[int, float],
        oof_score: float,
        metric: str,
        test_score: float | None = None,
        backbone: str,
        combine: str,
        config_hash: str,
        notes: str = "",
        extra: dict | None = None,
        dataset: str = "",
        git_commit: str | None = None,
    ) -> None:
        """Record a run: one row per fold plus the overall OOF row (fold -1), in one transaction.

        Idempotent: adding a run id again replaces its rows; the public score and the creation
        time recorded earlier are kept. `git_commit` None means "detect it" (best effort).
        """
        run_id = str(run_id).strip()
        if not run_id:
            raise ConfigError("run_id must not be empty")
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {clip(metric)}")
        folds: dict[int, float | None] = {}
        for k, v in dict(fold_scores).items():
            if isinstance(k, bool) or int(k) != k or int(k) < 0:
                raise ConfigError(f"fold numbers must be integers >= 0, got {clip(k)}")
            folds[int(k)] = _score(v, f"fold {k} score")
        oof = _score(oof_score, "oof_score")
        test = _score(test_score, "test_score")
        try:
            extra_json = json.dumps(extra or {}, sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra must be JSON-serialisable: {exc}") from exc
        commit = git_commit if git_commit is not None else _detect_commit()
        with self._write() as con:
            old = con.execute(
                "SELECT MIN(created) AS created, MAX(public_score) AS public FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            created = old["created"] or _now()
            public = old["public"]
            con.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            rows = [(k, s) for k, s in sorted(folds.items())] + [(OVERALL, oof)]
            con.executemany(
                f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [
                    (run_id, k, created, commit, config_hash, dataset, backbone, combine, metric, s, oof,
                     test, public, notes or "", extra_json)
                    for k, s in rows
                ],
            )

    def _resolve(self, con: sqlite3.Connection, run_id: str) -> str:
        """An exact run id, or a unique prefix of one; ConfigError naming close ids otherwise."""
        ids = [r[0] for r in con.execute("SELECT DISTINCT run_id FROM runs")]
        if run_id in ids:
            return run_id
        prefixed = [i for i in ids if i.startswith(run_id)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise ConfigError(f"run {clip(run_id)} is ambiguous in {self.path}: {', '.join(sorted(prefixed)[:5])}")
        close = difflib.get_close_matches(run_id, ids, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(ids)} runs recorded)"
        raise ConfigError(f"unknown run {clip(run_id)} in the leaderboard {self.path}{hint}")

    def record_public(self, run_id: str, score: float, notes: str | None = None) -> str:
        """Record the Kaggle public LB score of a run (an exact id or a unique prefix).

        `notes`, when given, replaces the run's notes. Returns the full run id.
        """
        score = _score(score, "public score", allow_none=False)
        if not 0.0 <= score <= 1.0:
            raise ConfigError(f"public score must be in [0, 1] (an mAP), got {score}")
        if not self.path.is_file():
            raise ConfigError(f"unknown run {clip(run_id)}: no leaderboard at {self.path}")
        with self._write() as con:
            full = self._resolve(con, str(run_id))
            con.execute("UPDATE runs SET public_score = ? WHERE run_id = ?", (score, full))
            if notes is not None:
                con.execute("UPDATE runs SET notes = ? WHERE run_id = ?", (notes, full))
        return full

    def remove(self, run_id: str) -> str:
        """Delete a run's rows (an exact id or a unique prefix); returns the full run id."""
        if not self.path.is_file():
            raise ConfigError(f"unknown run {clip(run_id)}: no leaderboard at {self.path}")
        with self._write() as con:
            full = self._resolve(con, str(run_id))
            con.execute("DELETE FROM runs WHERE run_id = ?", (full,))
        return full

    # -- reading ------------------------------------------------------------------------------

    def rows(self):
        """Every row (DataFrame with the table's columns; ``extra`` parsed), oldest run first,
        folds in order and the overall row (-1) last. Empty when the database does not exist."""
        import pandas as pd

        if not self.path.is_file():
            return pd.DataFrame(columns=list(_COLUMNS))
        con = self._connect()
        try:
            self._ensure_schema(con)
            cur = con.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY created, run_id, fold < 0, fold"
            )
            records = [dict(r) for r in cur.fetchall()]
        except sqlite3.DatabaseError as exc:
            raise DataError(f"leaderboard database {self.path}: {exc}") from exc
        finally:
            con.close()
        df = pd.DataFrame.from_records(records, columns=list(_COLUMNS))
        df["extra"] = [json.loads(e) if e else {} for e in df["extra"]]
        return df

    def ranked(self):
        """One row per run, ranked (see the module docstring): ``rank, run_id, created, dataset,
        metric, score, test_score, oof_score, public_score, fold0..foldK-1, fold_mean, fold_std,
        backbone, combine, config_hash, git_commit, notes``; ``score`` is the ranking key."""
        import numpy as np
        import pandas as pd

        rows = self.rows()
        base = ["rank", "run_id", "created", "dataset", "metric", "score", "test_score", "oof_score",
                "public_score"]
        tail = ["fold_mean", "fold_std", "backbone", "combine", "config_hash", "git_commit", "notes"]
        if rows.empty:
            return pd.DataFrame(columns=base + tail)
        overall = rows[rows["fold"] == OVERALL].set_index("run_id")
        per_fold = rows[rows["fold"] >= 0].pivot(index="run_id", columns="fold", values="fold_score")
        per_fold = per_fold.reindex(overall.index)
        fold_cols = [f"fold{int(k)}" for k in per_fold.columns]
        per_fold.columns = fold_cols
        out = overall[["created", "dataset", "metric", "test_score", "oof_score", "public_score",
                       "backbone", "combine", "config_hash", "git_commit", "notes"]].copy()
        out["score"] = out["test_score"].where(out["test_score"].notna(), out["oof_score"])
        vals = per_fold.to_numpy(dtype=float) if fold_cols else np.empty((len(out), 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a run without fold rows: mean of nothing
            out["fold_mean"] = np.nanmean(vals, axis=1) if fold_cols else np.nan
            out["fold_std"] = np.nanstd(vals, axis=1) if fold_cols else np.nan
        out = out.join(per_fold).reset_index()
        out["fold_mean"] = out["fold_mean"].round(6)
        out["fold_std"] = out["fold_std"].round(6)
        # A test score is only comparable to other test scores: runs that have one come first.
        out["_has_test"] = out["test_score"].notna()
        out = out.sort_values(["dataset", "metric", "_has_test", "score", "created", "run_id"],
                              ascending=[True, True, False, False, True, True], na_position="last", kind="stable")
        out["rank"] = out.groupby(["dataset", "metric"]).cumcount() + 1
        return out[base + fold_cols + tail].reset_index(drop=True)

    # -- output -------------------------------------------------------------------------------

    def export(self, path: str | os.PathLike, *, all_rows: bool = False) -> Path:
        """Write the ranked table (or every row, `all_rows`) to ``.csv`` or ``.md``, or the runs
        side by side to ``.html`` (`to_html`), atomically."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".html", ".htm"):
            text = to_html(self, path.resolve().parent)
            with atomic_open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        if suffix not in (".csv", ".md", ".markdown"):
            raise ConfigError(f"export {path}: the file must end in .csv or .md (or .html)")
        table = self.rows() if all_rows else self.ranked()
        if all_rows:
            table = table.assign(extra=[json.dumps(e, sort_keys=True) for e in table["extra"]])
        if suffix == ".csv":
            with atomic_open(path, "w", newline="", encoding="utf-8") as f:
                table.to_csv(f, index=False, lineterminator="\n")
        else:
            with atomic_open(path, "w", encoding="utf-8") as f:
                f.write(to_markdown(table))
        return path


# --------------------------------------------------------------------------------------------
# HTML: runs side by side

_SCORE_ROWS = (("score", "score (ranking key)"), ("test_score", "test"), ("oof_score", "OOF"),
               ("public_score", "public LB"), ("fold_mean", "fold mean"), ("fold_std", "fold sd"))
_EXTRA_SCORES = (("image_only", "test: image-only"), ("cell_only", "test: cell-only"),
                 ("seg_ceiling", "test: segmentation ceiling"), ("cls_ceiling", "test: classification ceiling"))


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix.rstrip("."): values}
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _run_settings(run_dir: str | None) -> dict[str, Any]:
    """The run's resolved config.yaml, flattened (``train.lr``: 0.002); {} when it is not found."""
    import yaml

    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        return {}
    try:
        return _flat(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return {}


def _side_by_side(group, extras: dict, out_dir: Path) -> str:
    """Runs of one (dataset, metric) as columns: links, scores, then the settings that differ
    (highlighted where they differ from the best run's), the rest folded away."""
    from kit.htmlpage import esc, fmt, table

    runs = list(group.itertuples(index=False))
    heads = ["", *[f"{r.rank}. {r.run_id}" for r in runs]]
    links = ["report"]
    for r in runs:
        run_dir = extras[r.run_id].get("run_dir")
        page = Path(run_dir) / "report" / "index.html" if run_dir else None
        links.append(f'<a href="{esc(Path(os.path.relpath(page, out_dir)).as_posix())}">report</a>'
                     if page is not None and page.is_file() else '<span class="note">no report</span>')
    rows = [links]
    fold_cols = [c for c in group.columns if c.startswith("fold") and c[4:].isdigit()]
    for key, label in (*_SCORE_ROWS, *[(c, c.replace("fold", "fold ")) for c in fold_cols]):
        if key in group.columns and group[key].notna().any():
            rows.append([esc(label)] + [fmt(getattr(r, key)) for r in runs])
    for key, label in _EXTRA_SCORES:
        values = [extras[r.run_id].get(key) for r in runs]
        if any(v is not None for v in values):
            rows.append([esc(label)] + [fmt(v) for v in values])
    totals = [(extras[r.run_id].get("timings") or {}) for r in runs]
    if any(totals):
        rows.append(["seconds (all stages)"] + [fmt(float(sum(v for k, v in t.items() if k != "total")) if t else None, 0)
                                              for t in totals])
    for key in ("backbone", "combine", "git_commit", "config_hash", "created", "notes"):
        rows.append([esc(key)] + [esc(getattr(r, key)) for r in runs])
    settings = [_run_settings(extras[r.run_id].get("run_dir")) for r in runs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    differ, same = [], []
    for key in keys:
        values = [s.get(key, "(absent)") if s else "(no config.yaml)" for s in settings]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differ.append((key, values))
        else:
            same.append((key, values[0]))
    classes = [[""] * (len(runs) + 1) for _ in rows]
    # what was chosen first, where things are (paths differ between any two runs) last
    differ.sort(key=lambda kv: any(isinstance(v, str) and "/" in v for v in kv[1]))
    for key, values in differ:
        rows.append([f"<b>{esc(key)}</b>"] + [esc(v) for v in values])
        classes.append([""] + ["diff" if i and values[i] != values[0] else "" for i in range(len(values))])
    html = ('<div style="overflow-x:auto">' + table(heads, rows, raw=True, cell_class=classes, cls="sidebyside")
            + "</div>")
    html += (f'<p class="note">{len(differ)} setting(s) differ between these runs (highlighted where they differ '
             f"from the best run's, the first column).</p>")
    if same:
        html += (f"<details><summary>{len(same)} setting(s) the same in every run</summary>"
                 + table(["setting", "value"], [(esc(k), esc(v)) for k, v in same], raw=True) + "</details>")
    return html


def to_html(board: "Leaderboard", out_dir: Path) -> str:
    """The leaderboard as one static page (links relative to `out_dir`)."""
    from kit.htmlpage import esc, page

    ranked = board.ranked()
    if ranked.empty:
        return page("kit leaderboard", f'<p>no runs recorded in {esc(board.path)}</p>')
    rows = board.rows()
    extras = {r.run_id: r.extra for r in rows[rows["fold"] == OVERALL].itertuples(index=False)}
    body, nav = [], []
    for n, ((dataset, metric), group) in enumerate(ranked.groupby(["dataset", "metric"], sort=False)):
        anchor = f"g{n}"
        title = f"{metric}" + (f" on {dataset}" if dataset else "")
        nav.append((anchor, title))
        body.append(f'<section id="{anchor}"><h2>{esc(title)}</h2><p class="note">ranked by test score where '
                    f"present, then by OOF score; {len(group)} run(s)</p>{_side_by_side(group, extras, out_dir)}"
                    "</section>")
    return page("kit leaderboard", "".join(body), subtitle=f"{esc(board.path)} &middot; written {_now()}", nav=nav)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def to_markdown(table) -> str:
    """A DataFrame as a GitHub markdown table (scores with 4 decimals, empty cells for missing)."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if table[c].dtype.kind in "fi" else "---" for c in table.columns) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |")
    return "\n".join(lines) + "\n"


def format_table(table, *, width: int = 40) -> str:
    """The ranked table for a terminal: one block per (dataset, metric), short commit and time."""
    if table.empty:
        return ""
    cols = ["rank", "run_id", "created", "score", "test_score", "oof_score", "public_score"]
    cols += [c for c in table.columns if c.startswith("fold") and c[4:].isdigit()]
    cols += ["fold_std", "backbone", "combine", "git_commit", "notes"]
    blocks = []
    for (dataset, metric), group in table.groupby(["dataset", "metric"], sort=False):
        g = group[cols].copy()
        g["created"] = g["created"].str.replace("T", " ").str[:16]
        g["git_commit"] = [c[:8] + ("+" if c.endswith("+dirty") else "") if isinstance(c, str) else ""
                           for c in g["git_commit"]]
        g["notes"] = [n if len(n) <= width else n[: width - 3] + "..." for n in g["notes"].fillna("")]
        g = g.rename(columns={"test_score": "test", "oof_score": "oof", "public_score": "public",
                              "git_commit": "commit", "fold_std": "fold_sd"})
        g = g.dropna(axis=1, how="all")  # e.g. no test or public scores at all
        title = f"{metric}" + (f" on {dataset}" if dataset else "") + (
            " (ranked by test score where present, then by OOF score)")
        body = g.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")
        blocks.append(title + "\n" + body)
    return "\n\n".join(blocks) + "\n"


# --------------------------------------------------------------------------------------------
# command


def configure_leaderboard(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show the local cross-validation leaderboard (default), record a public LB score, or export it. "
        f"Database: --db, else ${ENV_VAR}, else ./{DEFAULT_DB}."
    )
    parser.add_argument("--db", type=Path, default=None, help=f"database file (default ${ENV_VAR} or ./{DEFAULT_DB})")
    parser.add_argument("--top", type=int, default=None, help="show only the best N runs of each metric")
    parser.add_argument("--dataset", default=None, help="show only runs on this dataset")
    sub = parser.add_subparsers(dest="action", metavar="{show,record,export,remove}")
    db_kw = dict(type=Path, default=argparse.SUPPRESS, help="database file")
    p = sub.add_parser("show", help="print the ranked table (the default)")
    p.add_argument("--db", **db_kw)
    p = sub.add_parser("record", help="record a run's Kaggle public LB score: record RUN --public 0.52")
    p.add_argument("run", help="run id (or a unique prefix)")
    p.add_argument("--public", type=float, required=True, help="public leaderboard score")
    p.add_argument("--notes", default=None, help="replace the run's notes")
    p.add_argument("--db", **db_kw)
    p = sub.add_parser("export", help="write the ranked table to FILE.csv or FILE.md, or runs side by side "
                       "to --html FILE.html")
    p.add_argument("file", type=Path, nargs="?", help="FILE.csv or FILE.md")
    p.add_argument("--html", type=Path, help="also (or only) write the runs side by side as one HTML page: "
                   "scores, the settings that differ highlighted, links to each run's report")
    p.add_argument("--all", action="store_true", help="every row (one per run and fold), not the ranked table")
    p.add_argument("--db", **db_kw)
    p = sub.add_parser("remove", help="delete a run's rows")
    p.add_argument("run", help="run id (or a unique prefix)")
    p.add_argument("--db", **db_kw)
    parser.set_defaults(func=_run_leaderboard, action=None)


def _run_leaderboard(args: argparse.Namespace) -> int:
    board = Leaderboard(args.db)
    if args.action == "record":
        full = board.record_public(args.run, args.public, notes=args.notes)
        print(f"recorded public score {args.public:.4f} for run {full} in {board.path}")
        return 0
    if args.action == "remove":
        print(f"removed run {board.remove(args.run)} from {board.path}")
        return 0
    if args.action == "export":
        if args.file is None and args.html is None:
            raise ConfigError("leaderboard export: give FILE.csv / FILE.md and/or --html FILE.html")
        for target in (args.file, args.html):
            if target is not None:
                if target is args.html and target.suffix.lower() not in (".html", ".htm"):
                    raise ConfigError(f"--html {target}: the file must end in .html")
                print(f"wrote {board.export(target, all_rows=args.all)}")
        return 0
    table = board.ranked()
    if getattr(args, "dataset", None) is not None:
        table = table[table["dataset"] == args.dataset]
    if getattr(args, "top", None) is not None:
        table = table[table["rank"] <= args.top]
    if table.empty:
        print(f"no runs recorded in {board.path}" + ("" if board.path.is_file() else " (the file does not exist yet)"))
        return 0
    print(format_table(table), end="")
    return 0
