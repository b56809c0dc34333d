"""The durable task queue: tasks and their states in SQLite (WAL journal) under the server's data folder.

Every state change is one committed transaction (``synchronous=FULL``), so what a client was told survives a crash of
the process (kill -9) and of the machine. A task moves

    pending -> processing -> completed | failed | cancelled
    pending -> cancelled                       (cancelled before it ran)
    processing -> pending                      (a graceful shutdown hands it back; the next start runs it again)

and, at start-up, :meth:`TaskQueue.recover` settles what a crash left: a task still ``processing`` was interrupted;
it is failed with the reason :data:`RESTART_REASON` (or put back in the queue with ``rerun=True``), unless its result
file is already whole in the results folder (the crash came between the rename and the commit).

Pending tasks run in submission order (``seq``); :meth:`claim` may take, together with the first, later pending tasks
of the same ``batch_key`` (requests that can share a batch through the DiT).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

STATES = ("pending", "processing", "completed", "failed", "cancelled")
ACTIVE = ("pending", "processing")
FINAL = ("completed", "failed", "cancelled")
RESTART_REASON = "server restarted during generation"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    id           TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,                      -- video | image
    state        TEXT NOT NULL,
    params       TEXT NOT NULL,                      -- JSON: what the worker gives make_request
    batch_key    TEXT NOT NULL,                      -- equal keys may share a batch
    info         TEXT NOT NULL DEFAULT '{}',         -- JSON: what the routes report (size, seconds, api, ...)
    idem_key     TEXT UNIQUE,                        -- the client's Idempotency-Key
    idem_hash    TEXT,                               -- SHA-256 of the request that first used it
    created_at   REAL NOT NULL,
    started_at   REAL,
    completed_at REAL,
    step         INTEGER NOT NULL DEFAULT 0,
    steps        INTEGER NOT NULL DEFAULT 0,
    batch        INTEGER NOT NULL DEFAULT 0,         -- how many tasks it ran with (1: alone)
    error        TEXT,
    error_code   TEXT,
    result       TEXT                                -- file name in the results folder
);
CREATE INDEX IF NOT EXISTS tasks_state_seq ON tasks (state, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class QueueFull(Exception):
    """The queue holds ``max_active`` pending + processing tasks."""

    def __init__(self, active: int):
        super().__init__(f"the task queue is full ({active} tasks pending or processing)")
        self.active = active


class IdempotencyConflict(Exception):
    """An Idempotency-Key came back with a different request."""


class DuplicateTaskId(Exception):
    """A client-chosen task id that exists already."""


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TaskQueue:
    """SQLite-backed tasks. Thread-safe: one connection, used under a lock (each call is short)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite at {self.path} did not switch to WAL (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"task database {self.path} has schema {row[0]}; this server reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing ---------------------------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def submit(self, task_id: str, kind: str, params: dict, batch_key: str, info: dict, *, max_active: int,
               idem_key: str | None = None, idem_payload: Any = None) -> tuple[dict, bool]:
        """Add a pending task. Returns ``(task, created)``; with an Idempotency-Key already used for the same
        request, the existing task and ``created=False``. Raises :class:`QueueFull`, :class:`IdempotencyConflict`
        or :class:`DuplicateTaskId`."""
        digest = request_hash(idem_payload) if idem_key is not None else None
        with self._tx() as db:
            if idem_key is not None:
                row = db.execute("SELECT * FROM tasks WHERE idem_key=?", (idem_key,)).fetchone()
                if row is not None:
                    if row["idem_hash"] != digest:
                        raise IdempotencyConflict(f"Idempotency-Key {idem_key!r} was used for a different request "
                                                  f"(task {row['id']})")
                    return _task(row), False
            if db.execute("SELECT 1 FROM tasks WHERE id=?", (task_id,)).fetchone() is not None:
                raise DuplicateTaskId(f"task_id {task_id!r} exists already")
            active = db.execute(f"SELECT COUNT(*) FROM tasks WHERE state IN {ACTIVE}").fetchone()[0]
            if active >= max_active:
                raise QueueFull(active)
            db.execute("INSERT INTO tasks (id, kind, state, params, batch_key, info, idem_key, idem_hash, created_at)"
                       " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                       (task_id, kind, json.dumps(params), batch_key, json.dumps(info), idem_key, digest, time.time()))
            row = db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return _task(row), True

    def claim(self, max_n: int = 1) -> list[dict]:
        """Mark the oldest pending task, and up to ``max_n - 1`` later pending tasks of its batch key, processing;
        return them in submission order (none: [])."""
        with self._tx() as db:
            first = db.execute("SELECT * FROM tasks WHERE state='pending' ORDER BY seq LIMIT 1").fetchone()
            if first is None:
                return []
            rows = [first]
            if max_n > 1:
                rows += db.execute("SELECT * FROM tasks WHERE state='pending' AND batch_key=? AND seq>? ORDER BY seq "
                                   "LIMIT ?", (first["batch_key"], first["seq"], max_n - 1)).fetchall()
            now = time.time()
            db.executemany("UPDATE tasks SET state='processing', started_at=?, batch=? WHERE id=?",
                           [(now, len(rows), r["id"]) for r in rows])
            ids = [r["id"] for r in rows]
            rows = db.execute(f"SELECT * FROM tasks WHERE id IN ({','.join('?' * len(ids))}) ORDER BY seq",
                              ids).fetchall()
        return [_task(r) for r in rows]

    def finish(self, task_id: str, state: str, *, result: str | None = None, error: str | None = None,
               error_code: str | None = None, step: int | None = None, steps: int | None = None) -> bool:
        """processing -> completed | failed | cancelled. False if the task was not processing."""
        if state not in FINAL:
            raise ValueError(f"finish() to {state!r}")
        with self._tx() as db:
            cur = db.execute("UPDATE tasks SET state=?, result=?, error=?, error_code=?, completed_at=?, "
                             "step=COALESCE(?, step), steps=COALESCE(?, steps) WHERE id=? AND state='processing'",
                             (state, result, error, error_code, time.time(), step, steps, task_id))
            return cur.rowcount == 1

    def requeue(self, task_id: str) -> bool:
        """processing -> pending (a graceful shutdown interrupted it; it keeps its place in the order)."""
        with self._tx() as db:
            cur = db.execute("UPDATE tasks SET state='pending', started_at=NULL, step=0 WHERE id=? AND "
                             "state='processing'", (task_id,))
            return cur.rowcount == 1

    def cancel_pending(self, task_id: str, reason: str = "cancelled by user") -> bool:
        """pending -> cancelled (it leaves the queue). False if it was not pending."""
        with self._tx() as db:
            cur = db.execute("UPDATE tasks SET state='cancelled', error=?, error_code='cancelled', completed_at=? "
                             "WHERE id=? AND state='pending'", (reason, time.time(), task_id))
            return cur.rowcount == 1

    def cancel_all_pending(self, reason: str = "cancelled by user") -> list[str]:
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM tasks WHERE state='pending' ORDER BY seq")]
            db.execute("UPDATE tasks SET state='cancelled', error=?, error_code='cancelled', completed_at=? "
                       "WHERE state='pending'", (reason, time.time()))
        return ids

    def delete(self, task_id: str) -> bool:
        """Forget a task that is not processing."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM tasks WHERE id=? AND state!='processing'", (task_id,))
            return cur.rowcount == 1

    def recover(self, results_dir: Path, *, rerun: bool = False) -> dict[str, list[str]]:
        """Settle what a crash left (call before the worker starts). Returns {"failed"|"requeued"|"completed": ids}."""
        out: dict[str, list[str]] = {"failed": [], "requeued": [], "completed": []}
        with self._tx() as db:
            for row in db.execute("SELECT * FROM tasks WHERE state='processing' ORDER BY seq").fetchall():
                whole = _whole_result(results_dir, row["id"])
                if whole is not None:
                    db.execute("UPDATE tasks SET state='completed', result=?, completed_at=?, step=steps WHERE id=?",
                               (whole, time.time(), row["id"]))
                    out["completed"].append(row["id"])
                elif rerun:
                    db.execute("UPDATE tasks SET state='pending', started_at=NULL, step=0 WHERE id=?", (row["id"],))
                    out["requeued"].append(row["id"])
                else:
                    db.execute("UPDATE tasks SET state='failed', error=?, error_code='server_restarted', "
                               "completed_at=? WHERE id=?", (RESTART_REASON, time.time(), row["id"]))
                    out["failed"].append(row["id"])
        return out

    # --- reading ---------------------------------------------------------------------------------------------

    def get(self, task_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return None if row is None else _task(row)

    def list(self, *, limit: int | None = None, after: str | None = None, order: str = "asc",
             kind: str | None = None, states: Iterable[str] | None = None) -> list[dict]:
        """Tasks in submission order (``order="desc"``: newest first), after the task ``after`` (a cursor)."""
        if order not in ("asc", "desc"):
            raise ValueError(order)
        where, args = [], []
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if states is not None:
            states = tuple(states)
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if after is not None:
            where.append(f"seq {'>' if order == 'asc' else '<'} (SELECT seq FROM tasks WHERE id=?)")
            args.append(after)
        sql = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY seq {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_task(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

    def position(self, task_id: str) -> int | None:
        """How many pending tasks are ahead of this pending one (None if it is not pending)."""
        with self._lock:
            row = self._db.execute("SELECT seq, state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row["state"] != "pending":
                return None
            return self._db.execute("SELECT COUNT(*) FROM tasks WHERE state='pending' AND seq<?",
                                    (row["seq"],)).fetchone()[0]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) under the queue's lock."""

    def __init__(self, db: sqlite3.Connection, lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False


def _task(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["info"] = json.loads(d["info"])
    d.pop("idem_hash", None)
    return d


def partial_name(task_id: str, suffix: str) -> str:
    """The temporary name a result is written under before the rename (never served)."""
    return f".{task_id}.partial{suffix}"


def _whole_result(results_dir: Path, task_id: str) -> str | None:
    for suffix in (".mp4", ".png"):
        if (Path(results_dir) / f"{task_id}{suffix}").is_file():
            return f"{task_id}{suffix}"
    return None
