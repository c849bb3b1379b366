"""Tests for gyrodrop.experiments.store: resumable, concurrent, never overwrites."""

from __future__ import annotations

import multiprocessing
import sqlite3
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
