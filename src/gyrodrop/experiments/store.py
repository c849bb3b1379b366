"""Results database: one SQLite file (stdlib), safe to share between processes.

Tables:

- ``meta(key, value)``: ``format = gyrodrop-results``, ``schema = 1``;
- ``runs``: one row per *finished* run, keyed by the SHA-256 of the canonical JSON of its
  full configuration (:meth:`RunConfig.key`), with the configuration, the final
  metrics (JSON) and the common columns (dataset, model, method, seed, test_acc, ...);
- ``epochs(run_key, epoch, metrics)``: the per-epoch rows of each run;
- ``claims(key, pid, host, expires)``: runs being trained now; a process claims a run
  before training it, so two processes with the same configuration do not both train
  it (a claim of a dead process or past its lease is taken over);
- ``bench``: timing measurements (machine-dependent, replaced on re-measure).

A run is written in one transaction after it finishes, so an interrupted command leaves
every finished run saved and nothing half-written; running the command again skips
them. The file is marked with SQLite's ``application_id`` and the ``meta`` table: a file
that is not SQLite, belongs to another application, is cut short or fails SQLite's
``quick_check`` (run on every open, before anything is written) raises
:class:`StoreError` and is never written to; so does a damaged page or a malformed JSON
record met while reading. WAL journaling and a busy timeout let
several processes write at once.

Per-record checksums: each run (with its epoch rows) and each timing is saved with the
SHA-256 of its values as stored (``digest``), checked on every open. SQLite's own
checks see the file's structure, not its content: a flipped bit or a stray edit inside
a record is a valid file with a plausible wrong number, which a report would print and a
paper would cite. The digest costs one hash per record on save and on open and a
nullable column (files written before it open as they are; their records are not
checked, new ones are; older gyrodrop versions still read and write such files). It
guards against damage and accidents, not against someone who recomputes it (it is no
signature). A file on a read-only file system is read as immutable (SQLite could not
create the shared memory a WAL reader needs there).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gyrodrop.experiments.train import RunConfig

__all__ = ["Store", "StoreError", "APPLICATION_ID", "SCHEMA_VERSION"]

#: SQLite header application id: ASCII "GYRD".
APPLICATION_ID = 0x47595244
SCHEMA_VERSION = 1
_FORMAT = "gyrodrop-results"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    experiment TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    test_acc REAL,
    train_acc REAL,
    epoch_time REAL,
    metrics TEXT NOT NULL,
    device TEXT,
    version TEXT,
    finished REAL NOT NULL,
    digest TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs (experiment, dataset, model);
CREATE TABLE IF NOT EXISTS epochs (
    run_key TEXT NOT NULL REFERENCES runs (key) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (run_key, epoch)
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bench (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    finished REAL NOT NULL,
    digest TEXT
);
"""


_CLAIMS = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS claims") :].split(";")[0]

#: The stored values a record's ``digest`` covers, per table (a run's epoch rows too).
_DIGESTED = {
    "runs": "key, config, experiment, dataset, model, method, seed, test_acc, train_acc, "
    "epoch_time, metrics, device, version, finished",
    "bench": "key, kind, config, metrics, finished",
}


def _digest(values: Sequence[Any], epochs: Sequence[Any] = ()) -> str:
    """SHA-256 (hex) of a record's values as SQLite returns them, and of its epoch rows
    ``(epoch, metrics)``: what the ``digest`` column holds."""
    text = json.dumps([list(values), [list(e) for e in epochs]], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class StoreError(RuntimeError):
    """The results file is not a usable gyrodrop database (message says why)."""


def _object(text: str) -> dict[str, Any]:
    """A stored JSON object; :class:`json.JSONDecodeError` or :class:`TypeError` when the
    text is not one."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        raise StoreError(f"results database {path}: cannot read it: {e}") from e
    if len(head) == 0:
        return  # an empty file is a fresh database
    if not head.startswith(_SQLITE_MAGIC):
        raise StoreError(
            f"results database {path}: not an SQLite file (foreign or corrupt); refusing to "
            "use it. Pass another --db path"
        )
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    size = path.stat().st_size
    if len(head) < 100 or page < 512 or page & (page - 1) or size % page:
        raise StoreError(
            f"results database {path}: damaged (its size {size} is not a whole number of "
            f"{page}-byte pages: cut short?); refusing to use it and leaving it untouched. "
            "Pass another --db path"
        )
    app_id = int.from_bytes(head[68:72], "big")
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(
            f"results database {path}: belongs to another application "
            f"(application_id {app_id:#x}); refusing to use it. Pass another --db path"
        )


class Store:
    """The results database at ``path``.

    Args:
        path: the SQLite file; created with the schema when missing (unless
            ``readonly``).
        readonly: open for reading only (``report``); a missing file is an error.
        timeout: seconds to wait for another writer's lock.

    Raises:
        StoreError: the file is not SQLite, is corrupt, or is another application's.

    Example:
        >>> import tempfile, os
        >>> from gyrodrop.experiments.train import RunConfig
        >>> db = Store(os.path.join(tempfile.mkdtemp(), "r.db"))
        >>> cfg = RunConfig("compare", "digits", "mlp", "dropout", seed=0, epochs=1)
        >>> db.has(cfg)
        False
        >>> db.save(cfg, {"test_acc": 0.9, "train_acc": 0.95}, [{"epoch": 1}])
        True
        >>> db.has(cfg), len(db.records())
        (True, 1)
        >>> db.close()
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        exists = self.path.exists()
        if readonly and not exists:
            raise StoreError(
                f"results database {self.path}: no such file; run a command (e.g. "
                f"gyrodrop compare --db {self.path}) first"
            )
        if exists:
            if self.path.is_dir():
                raise StoreError(f"results database {self.path}: is a directory; pass a file path")
            _check_header(self.path)
        elif not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = self._connect("ro" if readonly else "rwc", timeout)
        if readonly and exists and not self._readable():
            # A WAL database on a read-only file system (or in a folder this user cannot
            # write): SQLite cannot create the shared-memory file a WAL reader needs.
            # Nothing can change the file there, so read it as immutable.
            self._con.close()
            self._refuse_unmerged_log()
            self._con = self._connect("ro&immutable=1", timeout)
        try:
            self._con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if exists:
                self._quick_check()
            self._open(readonly)
            if exists:
                self._check_records()
        except sqlite3.DatabaseError as e:
            self._con.close()
            raise StoreError(
                f"results database {self.path}: damaged or not a gyrodrop database ({e}); "
                "refusing to use it and leaving it untouched. Pass another --db path"
            ) from e
        except StoreError:
            self._con.close()
            raise

    # ---------------------------------------------------------------- setup

    def _connect(self, mode: str, timeout: float) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode={mode}"
        try:
            return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"results database {self.path}: cannot open: {e}") from e

    def _readable(self) -> bool:
        """Can the connection read the file? False when SQLite cannot open it for a
        reason that is not damage (a WAL file it cannot set up shared memory for)."""
        try:
            self._con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as e:
            folder = self.path.resolve().parent
            return os.access(folder, os.W_OK) or "unable to open" not in str(e)
        return True

    def _refuse_unmerged_log(self) -> None:
        """A write-ahead log beside the file holds runs not yet merged into it, which a
        reader that cannot write cannot merge: refused, saying how to read it."""
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"results database {self.path}: cannot read it where it is (read-only file "
                f"system or folder) while its write-ahead log {wal.name} holds unmerged runs; "
                "copy both files to a writable folder and pass that --db path"
            )

    def _quick_check(self) -> None:
        """SQLite's ``quick_check`` before anything is written: a damaged file is refused
        (and left as it is)."""
        rows = self._con.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
        if problems:
            raise StoreError(
                f"results database {self.path}: damaged (SQLite quick_check: {problems[0]}"
                f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); refusing "
                "to use it and leaving it untouched. Pass another --db path"
            )

    def _check_records(self) -> None:
        """Every stored record is a JSON object, checked once on open, before anything is
        written: a record changed outside gyrodrop refuses the whole file (and leaves it
        as it is) instead of surfacing halfway through a command."""
        columns = {"runs": ("config", "metrics"), "epochs": ("metrics",)}
        columns["bench"] = ("config", "metrics")
        tables = self._tables()
        with self._reading():
            # one read transaction: one snapshot of runs and epochs while others write
            self._con.execute("BEGIN")
            try:
                for table, cols in columns.items():
                    for col in cols if table in tables else ():
                        for (text,) in self._con.execute(f"SELECT {col} FROM {table}"):
                            _object(text)
                for table in _DIGESTED:
                    if table in tables and "digest" in self._columns(table):
                        self._check_digests(table)
            finally:
                self._con.execute("COMMIT")

    def _check_digests(self, table: str) -> None:
        """Every record with a ``digest`` still has the values it was saved with: a
        number changed inside a valid file (a flipped bit, an edit) refuses the file,
        naming the record and how to drop it. Records saved before digests existed
        (``NULL``) are not checked."""
        epochs: dict[str, list[Any]] = {}
        if table == "runs":
            for key, epoch, metrics in self._con.execute(
                "SELECT run_key, epoch, metrics FROM epochs ORDER BY run_key, epoch"
            ):
                epochs.setdefault(key, []).append((epoch, metrics))
        sql = f"SELECT {_DIGESTED[table]}, digest FROM {table} WHERE digest IS NOT NULL"
        for *values, digest in self._con.execute(sql):
            key = values[0]
            if _digest(values, epochs.get(key, ())) == digest:
                continue
            what = (
                f"run {values[5]} seed {values[6]} on {values[3]}/{values[4]}"
                if table == "runs"
                else f"{values[1]} measurement"
            )
            drop = (
                f"DELETE FROM epochs WHERE run_key = '{key}'; DELETE FROM runs WHERE key = '{key}'"
                if table == "runs"
                else f"DELETE FROM bench WHERE key = '{key}'"
            )
            raise StoreError(
                f"results database {self.path}: the {what} (key {key[:12]}) does not match "
                "the checksum it was saved with: a stored number was changed outside gyrodrop "
                "or the file is damaged; refusing to use it. Hint: drop that record "
                f'(sqlite3 {self.path} "{drop}") and run the command again to redo it'
            )

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Turns SQLite errors and malformed JSON met while reading into :class:`StoreError`."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"results database {self.path}: damaged or unreadable ({e}); refusing to use "
                "it. Pass another --db path"
            ) from e
        except (json.JSONDecodeError, TypeError) as e:
            raise StoreError(
                f"results database {self.path}: a stored record is not valid JSON ({e}); "
                "the file was changed outside gyrodrop. Pass another --db path"
            ) from e

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self._con.execute(f"PRAGMA table_info({table})")}

    def _tables(self) -> set[str]:
        rows = self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {r[0] for r in rows}

    def _verify(self) -> bool:
        """True when ours and initialised; False when empty; raises when foreign."""
        app_id = self._con.execute("PRAGMA application_id").fetchone()[0]
        tables = self._tables()
        if app_id == 0 and not tables:
            return False
        if app_id != APPLICATION_ID or "meta" not in tables:
            raise StoreError(
                f"results database {self.path}: an SQLite file of another application "
                f"(tables: {', '.join(sorted(tables)) or 'none'}); refusing to use it. "
                "Pass another --db path"
            )
        meta = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != _FORMAT:
            raise StoreError(f"results database {self.path}: meta format is {meta.get('format')!r}")
        schema = int(meta.get("schema", "0"))
        if schema > SCHEMA_VERSION:
            raise StoreError(
                f"results database {self.path}: schema {schema} is newer than this gyrodrop "
                f"understands ({SCHEMA_VERSION}); upgrade gyrodrop"
            )
        return True

    def _open(self, readonly: bool) -> None:
        if readonly:
            if not self._verify():
                raise StoreError(f"results database {self.path}: empty (no gyrodrop tables)")
            return
        if not self._verify():
            with self._write():
                if not self._verify():  # another process may have won the race
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._con.execute(statement)
                    self._con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self._con.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [("format", _FORMAT), ("schema", str(SCHEMA_VERSION))],
                    )
        if "claims" not in self._tables():  # files written before claims existed
            with self._write():
                self._con.execute(_CLAIMS)
        for table in _DIGESTED:  # files written before records had a digest
            if "digest" not in self._columns(table):
                with self._write():
                    if "digest" not in self._columns(table):  # another process may have won
                        self._con.execute(f"ALTER TABLE {table} ADD COLUMN digest TEXT")
        mode = self._con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # pragma: no cover - e.g. some network filesystems
            self._con.execute("PRAGMA journal_mode = DELETE")
        self._con.execute(
            "PRAGMA synchronous = NORMAL"
        )  # WAL: durable at checkpoints, never corrupt
        self._con.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"results database {self.path}: opened read-only")
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"results database {self.path}: cannot write ({e})") from e
        try:
            yield self._con
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        else:
            self._con.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- runs

    def has(self, cfg: RunConfig) -> bool:
        """Whether the run ``cfg`` has finished and is saved."""
        with self._reading():
            row = self._con.execute("SELECT 1 FROM runs WHERE key = ?", (cfg.key(),)).fetchone()
        return row is not None

    def finished_keys(self) -> set[str]:
        """Keys of every finished run."""
        with self._reading():
            return {r[0] for r in self._con.execute("SELECT key FROM runs")}

    def save(
        self,
        cfg: RunConfig,
        metrics: dict[str, Any],
        epochs: Sequence[dict[str, Any]] = (),
        *,
        device: str = "cpu",
        version: str = "",
    ) -> bool:
        """Save a finished run (one transaction). Returns False when a run with the same
        configuration was already saved (by another process, say): the first one wins."""
        norm = cfg.normalized()
        key = norm.key()
        with self._write() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO runs (key, config, experiment, dataset, model, method, "
                "seed, test_acc, train_acc, epoch_time, metrics, device, version, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    norm.canonical_json(),
                    norm.experiment,
                    norm.dataset,
                    norm.model,
                    norm.method,
                    norm.seed,
                    metrics.get("test_acc"),
                    metrics.get("train_acc"),
                    metrics.get("epoch_time"),
                    json.dumps(metrics, sort_keys=True),
                    device,
                    version,
                    time.time(),
                ),
            )
            if cur.rowcount == 0:
                return False
            con.executemany(
                "INSERT INTO epochs (run_key, epoch, metrics) VALUES (?, ?, ?)",
                [
                    (key, int(e.get("epoch", i + 1)), json.dumps(e, sort_keys=True))
                    for i, e in enumerate(epochs)
                ],
            )
            self._seal(con, "runs", key)
        return True

    def _seal(self, con: sqlite3.Connection, table: str, key: str) -> None:
        """Write the ``digest`` of record ``key`` from its values as stored."""
        row = con.execute(f"SELECT {_DIGESTED[table]} FROM {table} WHERE key = ?", (key,))
        epochs = con.execute(
            "SELECT epoch, metrics FROM epochs WHERE run_key = ? ORDER BY epoch", (key,)
        ).fetchall()
        digest = _digest(row.fetchone(), epochs if table == "runs" else ())
        con.execute(f"UPDATE {table} SET digest = ? WHERE key = ?", (digest, key))

    def records(
        self, *, experiment: str | None = None, keys: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Finished runs as flat dicts: the configuration's fields, then the metrics
        (``test_acc``, ``train_acc``, ...), plus ``key``, ``device``, ``finished``;
        ordered by experiment, dataset, model, method, seed."""
        sql = "SELECT key, config, metrics, device, version, finished FROM runs"
        args: list[Any] = []
        where = []
        if experiment is not None:
            where.append("experiment = ?")
            args.append(experiment)
        if keys is not None:
            keys = list(keys)
            if not keys:
                return []
            where.append(f"key IN ({', '.join('?' * len(keys))})")
            args += keys
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY experiment, dataset, model, method, seed, finished"
        out = []
        with self._reading():
            for key, config, metrics, device, version, finished in self._con.execute(sql, args):
                rec: dict[str, Any] = {"key": key}
                rec.update(_object(config))
                rec.update(_object(metrics))
                rec.update(device=device, version=version, finished=finished)
                out.append(rec)
        return out

    def epochs(self, key: str) -> list[dict[str, Any]]:
        """Per-epoch rows of run ``key``, in order."""
        with self._reading():
            rows = self._con.execute(
                "SELECT metrics FROM epochs WHERE run_key = ? ORDER BY epoch", (key,)
            ).fetchall()
            return [_object(r[0]) for r in rows]

    def experiments(self) -> list[str]:
        """Experiment names present (``compare``, ``sweep``, ...)."""
        with self._reading():
            rows = self._con.execute("SELECT DISTINCT experiment FROM runs ORDER BY 1")
            return [r[0] for r in rows]

    # ---------------------------------------------------------------- claims

    def claim(self, cfg: RunConfig, lease: float) -> bool:
        """Claim run ``cfg`` for this process for ``lease`` seconds before training it.

        Returns False when the run is finished or another live process holds an
        unexpired claim on it; a claim whose owner has died (same host, pid gone) or
        whose lease ran out is taken over. Renew it with :meth:`renew` while training.
        """
        key = cfg.normalized().key()
        me = (os.getpid(), _HOST)
        now = time.time()
        with self._write() as con:
            if con.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                return False
            row = con.execute("SELECT pid, host, expires FROM claims WHERE key = ?", (key,))
            held = row.fetchone()
            if (
                held is not None
                and (held[0], held[1]) != me
                and held[2] > now
                and (held[1] != _HOST or _alive(int(held[0])))
            ):
                return False
            con.execute(
                "INSERT OR REPLACE INTO claims (key, pid, host, expires) VALUES (?, ?, ?, ?)",
                (key, me[0], me[1], now + lease),
            )
        return True

    def renew(self, cfg: RunConfig, lease: float) -> None:
        """Extend this process's claim on ``cfg`` to ``lease`` seconds from now."""
        with self._write() as con:
            con.execute(
                "UPDATE claims SET expires = ? WHERE key = ? AND pid = ? AND host = ?",
                (time.time() + lease, cfg.normalized().key(), os.getpid(), _HOST),
            )

    def release(self, cfg: RunConfig) -> None:
        """Drop this process's claim on ``cfg`` (finished or given up)."""
        with self._write() as con:
            con.execute(
                "DELETE FROM claims WHERE key = ? AND pid = ? AND host = ?",
                (cfg.normalized().key(), os.getpid(), _HOST),
            )

    # ---------------------------------------------------------------- bench

    def save_bench(self, kind: str, config: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Save (or replace) one timing measurement."""
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
        import hashlib

        key = hashlib.sha256(f"{kind}:{text}".encode()).hexdigest()[:16]
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO bench (key, kind, config, metrics, finished) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, kind, text, json.dumps(metrics, sort_keys=True), time.time()),
            )
            self._seal(con, "bench", key)

    def bench_records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Timing measurements as flat dicts (configuration, then metrics, plus kind)."""
        sql = "SELECT kind, config, metrics FROM bench"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        out = []
        with self._reading():
            for k, config, metrics in self._con.execute(sql + " ORDER BY finished", args):
                rec: dict[str, Any] = {"kind": k}
                rec.update(_object(config))
                rec.update(_object(metrics))
                out.append(rec)
        return out
