"""The study store: one SQLite file (WAL mode) holding studies and their trials.

A trial row is ``pending`` when added, ``running`` while its process runs, and ``done`` or
``failed`` once the process returns; the final row (status, config, result, per-epoch metrics,
losses, wall time, peak memory, error) is written in one transaction, so killing the runner at
any moment loses only the trials that were running. Every structured value is JSON text.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import StudyError
from .grid import trial_id

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
HEARTBEAT_STALE_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,              -- the normalized study config, JSON
    created REAL NOT NULL,
    updated REAL NOT NULL,
    runner_pid INTEGER,                -- the process running it now, if any
    runner_host TEXT,
    runner_heartbeat REAL
);
CREATE TABLE IF NOT EXISTS trials (
    study TEXT NOT NULL REFERENCES studies(name) ON DELETE CASCADE,
    id TEXT NOT NULL,                  -- stable hash of config
    seq INTEGER NOT NULL,              -- grid order
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    config TEXT NOT NULL,              -- the trial config, JSON
    task TEXT, variant TEXT, lr REAL, seed INTEGER,
    spec TEXT,                         -- the resolved AdapterSpec, JSON
    metric_name TEXT, metric REAL, metric_before REAL,
    metrics_per_epoch TEXT,            -- JSON list of dicts
    losses TEXT,                       -- JSON list of per-step losses
    result TEXT,                       -- the rest of the trial function's dict, JSON
    wall_seconds REAL, train_seconds REAL, peak_rss_mb REAL, trainable_params INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    started REAL, finished REAL,
    PRIMARY KEY (study, id)
);
CREATE INDEX IF NOT EXISTS trials_status ON trials (study, status);
"""


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def adapter_dir(db: str | os.PathLike, tid: str) -> Path:
    """Where trial ``tid`` of the study file ``db`` keeps its saved adapter (``keep_adapter: true``)."""
    return Path(f"{os.fspath(db)}.adapters") / tid


class Store:
    """A study file. Use as a context manager; every write is its own transaction."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StudyError(f"no study file at {str(self.path)!r}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StudyError(f"{self.path} was written by a newer lorazoo (schema {version}); upgrade")
            if not create and version == 0:
                raise StudyError(f"{self.path} is not a lorazoo study file")
            if version < SCHEMA_VERSION:
                with self.tx():
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StudyError(f"{self.path} is not a readable SQLite study file ({e})") from None

    # --- plumbing -------------------------------------------------------------------------------
    def tx(self, immediate: bool = True):
        """A transaction: ``with store.tx(): ...`` commits at the end or rolls back on error."""
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

            def __exit__(self, exc_type, *_):
                store.db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # --- studies --------------------------------------------------------------------------------
    def save_study(self, name: str, config: dict) -> None:
        """Create the study or replace its config (a grid may grow between runs)."""
        now = time.time()
        with self.tx():
            self.db.execute(
                "INSERT INTO studies (name, config, created, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET config=excluded.config, updated=excluded.updated",
                (name, json.dumps(config), now, now))

    def studies(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM studies ORDER BY created")]

    def study(self, name: str | None = None) -> dict:
        """A study's row (config parsed); with no name, the file's only study."""
        if name is None:
            names = self.studies()
            if len(names) != 1:
                raise StudyError(f"{self.path} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                                 f"name one with --study")
            name = names[0]
        row = self.db.execute("SELECT * FROM studies WHERE name=?", (name,)).fetchone()
        if row is None:
            raise StudyError(f"{self.path} has no study {name!r}; it has: {', '.join(self.studies()) or 'none'}")
        d = dict(row)
        d["config"] = json.loads(d["config"])
        return d

    def claim(self, name: str, *, force: bool = False) -> None:
        """Mark this process as the study's runner; refuse if another live runner holds it."""
        me, host = os.getpid(), socket.gethostname()
        with self.tx():
            row = self.db.execute("SELECT runner_pid, runner_host, runner_heartbeat FROM studies WHERE name=?",
                                  (name,)).fetchone()
            if row is None:
                raise StudyError(f"no study {name!r} to claim")
            pid, rhost, beat = row
            if pid and not force and pid != me and _alive(pid, rhost, beat, host):
                raise StudyError(f"study {name!r} in {self.path} is being run by pid {pid} on {rhost}; "
                                 f"wait for it, stop it, or pass --force if it is gone")
            self.db.execute("UPDATE studies SET runner_pid=?, runner_host=?, runner_heartbeat=? WHERE name=?",
                            (me, host, time.time(), name))

    def heartbeat(self, name: str) -> None:
        self.db.execute("UPDATE studies SET runner_heartbeat=? WHERE name=? AND runner_pid=?",
                        (time.time(), name, os.getpid()))

    def release(self, name: str) -> None:
        self.db.execute("UPDATE studies SET runner_pid=NULL, runner_host=NULL, runner_heartbeat=NULL "
                        "WHERE name=? AND runner_pid=?", (name, os.getpid()))

    # --- trials ---------------------------------------------------------------------------------
    def add_trials(self, study: str, configs: Iterable[dict]) -> int:
        """Add the configs not stored yet as pending trials; returns how many were new."""
        configs = list(configs)
        with self.tx():
            start = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM trials WHERE study=?",
                                    (study,)).fetchone()[0]
            before = self.db.total_changes
            for i, cfg in enumerate(configs):
                self.db.execute(
                    "INSERT OR IGNORE INTO trials (study, id, seq, status, config, task, variant, lr, seed) "
                    "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                    (study, trial_id(cfg), start + i, json.dumps(cfg), cfg.get("task"), cfg.get("variant"),
                     _float(cfg.get("lr")), cfg.get("seed")))
            return self.db.total_changes - before

    def requeue_running(self, study: str, ids: Iterable[str] | None = None) -> int:
        """Running trials (of a killed run, or ``ids``) back to pending; returns how many."""
        with self.tx():
            if ids is None:
                cur = self.db.execute("UPDATE trials SET status='pending' WHERE study=? AND status='running'",
                                      (study,))
            else:
                cur = self.db.executemany(
                    "UPDATE trials SET status='pending' WHERE study=? AND id=? AND status='running'",
                    [(study, i) for i in ids])
            return cur.rowcount

    def mark_running(self, study: str, tid: str, worker: str = "") -> None:
        with self.tx():
            self.db.execute("UPDATE trials SET status='running', attempts=attempts+1, worker=?, started=?, "
                            "finished=NULL WHERE study=? AND id=?", (worker, time.time(), study, tid))

    def finish(self, study: str, tid: str, outcome: dict) -> None:
        """Record a trial's outcome in one transaction.

        ``outcome``: ``status`` ("done" or "failed"), ``result`` (the trial function's dict, or
        None), ``error`` (text or None), ``wall_seconds``, ``peak_rss_mb``, optional ``spec``.
        """
        status = outcome["status"]
        if status not in ("done", "failed"):
            raise StudyError(f"a finished trial is 'done' or 'failed', not {status!r}")
        result = dict(outcome.get("result") or {})
        metrics = result.pop("metrics_per_epoch", None)
        losses = result.pop("losses", None)
        peak = outcome.get("peak_rss_mb")
        if peak is None:
            peak = result.get("peak_rss_mb")
        with self.tx():
            cur = self.db.execute(
                "UPDATE trials SET status=?, spec=?, metric_name=?, metric=?, metric_before=?, "
                "metrics_per_epoch=?, losses=?, result=?, wall_seconds=?, train_seconds=?, peak_rss_mb=?, "
                "trainable_params=?, error=?, finished=? WHERE study=? AND id=?",
                (status, _dumps(outcome.get("spec") or result.get("spec")), result.get("metric_name"),
                 _float(result.get("metric")), _float(result.get("metric_before")), _dumps(metrics),
                 _dumps(losses), _dumps(result) if outcome.get("result") is not None else None,
                 _float(outcome.get("wall_seconds")), _float(result.get("train_seconds")), _float(peak),
                 result.get("trainable_params"), outcome.get("error"), time.time(), study, tid))
            if cur.rowcount != 1:
                raise StudyError(f"study {study!r} has no trial {tid}")

    def trials(self, study: str, status: str | Iterable[str] | None = None) -> list[dict]:
        """Trial rows in grid order, JSON parsed; ``result`` holds the trial function's full dict."""
        sql, args = "SELECT * FROM trials WHERE study=?", [study]
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            bad = sorted(set(wanted) - set(STATUSES))
            if bad:
                raise StudyError(f"unknown trial status {', '.join(bad)}; statuses: {', '.join(STATUSES)}")
            sql += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        return [self._row(r) for r in self.db.execute(sql + " ORDER BY seq", args)]

    def trial(self, study: str, tid: str) -> dict:
        row = self.db.execute("SELECT * FROM trials WHERE study=? AND id=?", (study, tid)).fetchone()
        if row is None:
            raise StudyError(f"study {study!r} has no trial {tid}")
        return self._row(row)

    def counts(self, study: str) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM trials WHERE study=? GROUP BY status",
                                         (study,)):
            out[status] = n
        return out

    def _row(self, row: sqlite3.Row) -> dict:
        d = dict(row)
        for key in ("config", "spec", "metrics_per_epoch", "losses", "result"):
            d[key] = _loads(d[key])
        if d["result"] is not None:
            d["result"] = {**d["result"], "metrics_per_epoch": d["metrics_per_epoch"], "losses": d["losses"]}
            kept = d["result"].get("adapter_dir")
            beside = adapter_dir(self.path, d["id"])  # a study file moved with its adapters
            if kept and not Path(kept).is_dir() and beside.is_dir():
                d["result"]["adapter_dir"] = str(beside)
        return d


def _alive(pid: int, rhost: str | None, beat: float | None, host: str) -> bool:
    """Whether a recorded runner still runs: its pid on this host, else a fresh heartbeat."""
    if rhost == host:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return beat is not None and time.time() - beat < HEARTBEAT_STALE_S
