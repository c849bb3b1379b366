"""Tests for gyrodrop.experiments.store: resumable, concurrent, never overwrites."""

from __future__ import annotations

import multiprocessing
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gyrodrop.experiments.store import APPLICATION_ID, Store, StoreError
from gyrodrop.experiments.train import RunConfig


def _cfg(seed: int = 0, method: str = "dropout") -> RunConfig:
    return RunConfig("compare", "digits", "mlp", method, seed=seed, epochs=1)


class TestStore:
    def test_saved_run_is_found_with_config_metrics_and_epochs(self, tmp_path: Path) -> None:
        with Store(tmp_path / "r.db") as db:
            assert db.save(
                _cfg(), {"test_acc": 0.9, "train_acc": 1.0}, [{"epoch": 1, "test_acc": 0.9}]
            )
            assert db.has(_cfg()) and not db.has(_cfg(seed=1))
            (rec,) = db.records()
            assert (rec["method"], rec["seed"], rec["test_acc"], rec["train_acc"]) == (
                "dropout",
                0,
                0.9,
                1.0,
            )
            assert db.epochs(rec["key"]) == [{"epoch": 1, "test_acc": 0.9}]

    def test_second_save_of_the_same_config_is_ignored(self, tmp_path: Path) -> None:
        with Store(tmp_path / "r.db") as db:
            assert db.save(_cfg(), {"test_acc": 0.5}, [{"epoch": 1}])
            assert not db.save(_cfg(), {"test_acc": 0.7}, [{"epoch": 1}])
            assert [r["test_acc"] for r in db.records()] == [0.5]

    def test_reopening_keeps_runs_and_marks_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "r.db"
        with Store(path) as db:
            db.save(_cfg(), {"test_acc": 0.5})
        with Store(path) as db:
            assert db.has(_cfg())
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()

    def test_foreign_file_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        path = tmp_path / "notes.db"
        path.write_bytes(b"my precious notes\n" * 10)
        before = path.read_bytes()
        with pytest.raises(StoreError, match="not an SQLite file"):
            Store(path)
        assert path.read_bytes() == before

    def test_other_applications_sqlite_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        path = tmp_path / "app.db"
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE users (name TEXT)")
        con.execute("INSERT INTO users VALUES ('ada')")
        con.commit()
        con.close()
        before = path.read_bytes()
        with pytest.raises(StoreError, match="another application"):
            Store(path)
        assert path.read_bytes() == before

    def test_corrupt_database_is_a_clear_error(self, tmp_path: Path) -> None:
        path = tmp_path / "r.db"
        with Store(path) as db:
            db.save(_cfg(), {"test_acc": 0.5})
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        data = bytearray(path.read_bytes())
        data[100:] = b"\xff" * (len(data) - 100)
        path.write_bytes(bytes(data))
        with pytest.raises(StoreError, match="corrupt"):
            Store(path)

    def test_readonly_open_of_missing_file_says_run_a_command_first(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="no such file"):
            Store(tmp_path / "missing.db", readonly=True)
        assert not (tmp_path / "missing.db").exists()

    def test_records_filter_by_experiment_and_keys(self, tmp_path: Path) -> None:
        with Store(tmp_path / "r.db") as db:
            db.save(_cfg(0), {"test_acc": 0.1})
            db.save(_cfg(1), {"test_acc": 0.2})
            db.save(
                RunConfig("sweep", "digits", "mlp", "gyro", seed=0, epochs=1), {"test_acc": 0.3}
            )
            assert len(db.records(experiment="compare")) == 2
            assert [r["seed"] for r in db.records(keys=[_cfg(1).key()])] == [1]
            assert db.experiments() == ["compare", "sweep"]

    def test_bench_measurements_replace_earlier_ones(self, tmp_path: Path) -> None:
        with Store(tmp_path / "r.db") as db:
            db.save_bench("train_step", {"method": "gyro"}, {"ms_per_step": 2.0})
            db.save_bench("train_step", {"method": "gyro"}, {"ms_per_step": 1.0})
            assert [r["ms_per_step"] for r in db.bench_records()] == [1.0]


def _writer(path: str, start: int) -> None:
    with Store(path) as db:
        for seed in range(start, start + 15):
            for method in ("none", "dropout"):
                db.save(_cfg(seed, method), {"test_acc": 0.5}, [{"epoch": 1}, {"epoch": 2}])


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method (fast: no re-import)")
class TestConcurrentWriters:
    def test_a_run_saved_during_the_checksum_check_is_not_a_false_alarm(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Another process commits a run (and its epochs) between the check's read of
        # the epochs and its read of the runs: the check reads one snapshot.
        path = tmp_path / "shared.db"
        _writer(str(path), 0)
        writer = Store(path)
        connect = sqlite3.connect
        saved = []

        def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
            con = connect(*args, **kwargs)  # type: ignore[arg-type]

            def between(sql: str) -> None:
                if sql.startswith("SELECT key, config, experiment") and not saved:
                    saved.append(writer.save(_cfg(99), {"test_acc": 0.5}, [{"epoch": 1}]))

            con.set_trace_callback(between)
            return con

        monkeypatch.setattr(sqlite3, "connect", traced)
        try:
            with Store(path, readonly=True) as db:
                assert saved == [True] and len(db.records()) == 31
        finally:
            writer.close()

    def test_parallel_processes_lose_and_corrupt_nothing(self, tmp_path: Path) -> None:
        path = tmp_path / "shared.db"
        ctx = multiprocessing.get_context("fork")
        # overlapping seed ranges: the same run written by two processes is kept once
        procs = [ctx.Process(target=_writer, args=(str(path), start)) for start in (0, 10, 20)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        with Store(path) as db:
            assert len(db.records()) == 2 * 35
            assert all(len(db.epochs(r["key"])) == 2 for r in db.records())
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()


class TestDamagedFiles:
    def _db(self, tmp_path: Path) -> Path:
        path = tmp_path / "r.db"
        with Store(path) as db:
            for seed in range(20):
                db.save(_cfg(seed), {"test_acc": 0.5}, [{"epoch": 1, "pad": "x" * 500}])
        return path

    def test_a_file_cut_inside_a_page_is_refused_and_untouched(self, tmp_path: Path) -> None:
        path = self._db(tmp_path)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - 100)
        before = path.read_bytes()
        for readonly in (False, True):
            with pytest.raises(StoreError, match="cut short"):
                Store(path, readonly=readonly)
        assert path.read_bytes() == before

    def test_a_damaged_page_fails_quick_check_before_any_write(self, tmp_path: Path) -> None:
        path = self._db(tmp_path)
        with open(path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\x00\x13" * 2048)
        before = path.read_bytes()
        with pytest.raises(StoreError, match="damaged .*(quick_check|malformed)"):
            Store(path)
        assert path.read_bytes() == before

    def test_a_record_that_is_not_a_json_object_is_a_store_error(self, tmp_path: Path) -> None:
        path = self._db(tmp_path)
        con = sqlite3.connect(path)
        con.execute("UPDATE epochs SET metrics = '[1, 2]'")
        con.commit()
        con.close()
        # refused on open (every record is checked before anything is written or read)
        with pytest.raises(StoreError, match="not valid JSON"):
            Store(path, readonly=True)


def _run_on_read_only(folder: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m gyrodrop *argv`` with ``folder`` read-only: a read-only bind mount
    when root (who writes through permissions), else permissions; skips where neither
    can be set up."""
    cmd = [sys.executable, "-m", "gyrodrop", *argv]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only folder")
    script = (
        f"mount --bind {shlex.quote(str(folder))} {shlex.quote(str(folder))} && "
        f"mount -o remount,ro,bind {shlex.quote(str(folder))} && "
        f"! touch {shlex.quote(str(folder / 'probe'))} 2>/dev/null && exec {shlex.join(cmd)}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0 and "gyrodrop" not in proc.stderr:
        pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()[:200]}")
    return proc


class TestReadOnlyPlaces:
    """A results file on a read-only file system (an archive, a shared mount) reads."""

    def test_report_reads_a_database_on_a_read_only_file_system(self, tmp_path: Path) -> None:
        folder = tmp_path / "archive"
        folder.mkdir()
        with Store(folder / "r.db") as db:
            for seed in range(3):
                db.save(_cfg(seed), {"test_acc": 0.25 + seed / 10, "train_acc": 0.5})
        proc = _run_on_read_only(
            folder, ["report", "--db", str(folder / "r.db"), "--format", "csv"]
        )
        assert proc.returncode == 0, proc.stderr
        assert "damaged" not in proc.stderr
        rows = proc.stdout.strip().splitlines()
        assert len(rows) == 4 and rows[0].startswith("experiment,")
        assert sorted(round(float(r.split(",")[rows[0].split(",").index("test_acc")]), 2)
                      for r in rows[1:]) == [0.25, 0.35, 0.45]  # fmt: skip

    def test_unmerged_write_ahead_log_on_a_read_only_file_system_is_named(
        self, tmp_path: Path
    ) -> None:
        folder = tmp_path / "archive"
        folder.mkdir()
        source = tmp_path / "live.db"
        db = Store(source)  # kept open: its runs are still in the write-ahead log
        try:
            db.save(_cfg(0), {"test_acc": 0.5, "train_acc": 0.5})
            wal = source.with_name("live.db-wal")
            assert wal.stat().st_size > 0
            shutil.copy(source, folder / "r.db")
            shutil.copy(wal, folder / "r.db-wal")
        finally:
            db.close()
        proc = _run_on_read_only(folder, ["report", "--db", str(folder / "r.db")])
        assert proc.returncode == 2
        assert "write-ahead log r.db-wal holds unmerged runs" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


class TestRecordChecksums:
    """Each run (with its epoch rows) and each timing is saved with a SHA-256 of its
    stored values: a number changed inside a valid SQLite file is refused on open,
    naming the record and how to drop it. An integrity check against damage and stray
    edits, not a signature: a deliberate edit can recompute it."""

    def _db(self, tmp_path: Path) -> Path:
        path = tmp_path / "r.db"
        with Store(path) as db:
            for seed in range(3):
                db.save(
                    _cfg(seed),
                    {"test_acc": 0.123456 + seed, "train_acc": 1, "nll": float("nan")},
                    [{"epoch": e, "test_acc": 0.25 * e} for e in (1, 2)],
                )
            db.save_bench("step", {"model": "mlp"}, {"ms": 1.5})
        return path

    def test_records_reopen_without_a_false_alarm(self, tmp_path: Path) -> None:
        path = self._db(tmp_path)
        for readonly in (True, False, True):
            with Store(path, readonly=readonly) as db:
                assert len(db.records()) == 3 and len(db.bench_records()) == 1

    @pytest.mark.parametrize(
        ("sql", "what"),
        [
            ("UPDATE runs SET metrics = replace(metrics, '0.123456', '0.923456')",
             "run dropout seed 0"),
            ("UPDATE runs SET test_acc = 0.99 WHERE seed = 1", "run dropout seed 1"),
            ("UPDATE runs SET seed = 7 WHERE seed = 2", "run dropout seed 7"),
            ("UPDATE epochs SET metrics = '{\"epoch\": 2, \"test_acc\": 0.9}' WHERE epoch = 2",
             "run dropout seed"),
            ("DELETE FROM epochs WHERE epoch = 1", "run dropout seed"),
            ("UPDATE bench SET metrics = '{\"ms\": 0.5}'", "step measurement"),
        ],
    )  # fmt: skip
    def test_a_changed_value_is_refused_naming_the_record(
        self, tmp_path: Path, sql: str, what: str
    ) -> None:
        path = self._db(tmp_path)
        con = sqlite3.connect(path)
        con.execute(sql)
        con.commit()
        con.close()
        for readonly in (True, False):
            with pytest.raises(StoreError, match=rf"the {what}.* does not match the checksum"):
                Store(path, readonly=readonly)

    def test_a_byte_edited_in_the_file_is_refused(self, tmp_path: Path) -> None:
        """(Issue 21, item 7: report printed a metric a byte edit changed.)"""
        path = self._db(tmp_path)
        data = path.read_bytes()
        assert data.count(b"0.123456") == 1
        path.write_bytes(data.replace(b"0.123456", b"0.923456"))
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"  # still valid SQLite
        con.close()
        with pytest.raises(StoreError, match=r"run dropout seed 0 on digits/mlp .*checksum"):
            Store(path, readonly=True)

    def test_dropping_the_record_as_the_hint_says_makes_the_file_usable(
        self, tmp_path: Path
    ) -> None:
        path = self._db(tmp_path)
        con = sqlite3.connect(path)
        con.execute("UPDATE runs SET test_acc = 0.99 WHERE seed = 1")
        con.commit()
        con.close()
        with pytest.raises(StoreError) as e:
            Store(path, readonly=True)
        drop = str(e.value).split(f"sqlite3 {path} ")[1].split('"')[1]
        con = sqlite3.connect(path)
        con.executescript(drop)
        con.close()
        with Store(path) as db:
            assert sorted(r["seed"] for r in db.records()) == [0, 2]
            assert db.save(_cfg(1), {"test_acc": 0.5}, [{"epoch": 1}])  # redone

    def test_a_file_from_before_checksums_opens_and_new_records_are_sealed(
        self, tmp_path: Path
    ) -> None:
        path = self._db(tmp_path)
        con = sqlite3.connect(path)
        for table in ("runs", "bench"):  # as 0.1 wrote them: no digest column
            con.execute(f"ALTER TABLE {table} DROP COLUMN digest")
        con.commit()
        con.close()
        with Store(path, readonly=True) as db:
            assert len(db.records()) == 3
        with Store(path) as db:  # adds the column; old records stay unchecked
            db.save(_cfg(5), {"test_acc": 0.5})
        con = sqlite3.connect(path)
        digests = dict(con.execute("SELECT seed, digest FROM runs").fetchall())
        con.execute("UPDATE runs SET test_acc = 0.1 WHERE seed = 0")  # unchecked: NULL digest
        con.commit()
        con.close()
        assert digests[5] is not None and digests[0] is None
        with Store(path, readonly=True) as db:
            assert len(db.records()) == 4
