"""The run loop: run keys cover every option that changes a number, runs are claimed
before training (two processes never train the same run), damaged results files are
refused untouched, and every record keeps the data's shape."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gyrodrop.experiments.cli import main, runner
from gyrodrop.experiments.store import Store
from gyrodrop.experiments.train import RunConfig

from .conftest import TINY, paths, refused


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(db: Path) -> list[dict]:
    with Store(db, readonly=True) as store:
        return store.records()


class TestRunKeys:
    def test_diversity_with_other_subnetworks_or_eval_size_trains_new_runs(
        self, tmp_path: Path, trained: list[str]
    ) -> None:
        base = ["diversity", *TINY, *paths(tmp_path), "--methods", "gyro", "--widths", "32,32"]
        base += ["--num-subnets", "16", "--subnets-per-step", "4"]
        assert main([*base, "--subnetworks", "3"]) == 0
        assert main([*base, "--subnetworks", "3"]) == 0
        assert trained == ["gyro"]
        assert main([*base, "--subnetworks", "4"]) == 0
        assert main([*base, "--subnetworks", "4", "--eval-size", "50"]) == 0
        assert trained == ["gyro"] * 3
        recs = _records(tmp_path / "r.db")
        assert sorted((r["subnetworks"], r["eval_size"]) for r in recs) == [
            (3, 100),
            (4, 50),
            (4, 100),
        ]
        for r in recs:
            n = r["subnetworks"]
            assert len(r["diversity_matrix"]) == n
            off = [r["diversity_matrix"][i][j] for i in range(n) for j in range(n) if i != j]
            assert all(d > 0 for d in off)  # never a subnetwork against itself
            assert r["diversity_eval_size"] == r["eval_size"]

    def test_changed_csv_content_trains_a_new_run(self, tmp_path: Path, trained: list[str]) -> None:
        csv = tmp_path / "d.csv"
        csv.write_text("".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(60)))
        argv = ["compare", *TINY, *paths(tmp_path), "--methods", "none", "--dataset", f"csv:{csv}"]
        assert main(argv) == 0 and main(argv) == 0
        assert trained == ["none"]
        csv.write_text("".join(f"{i % 5},{(i * 2) % 7},{i % 2}\n" for i in range(60)))
        assert main(argv) == 0
        assert trained == ["none", "none"]
        ids = {r["data_id"] for r in _records(tmp_path / "r.db")}
        assert len(ids) == 2

    def test_records_keep_num_classes_and_n_features(self, tmp_path: Path) -> None:
        csv = tmp_path / "d.csv"
        rows = [f"{i % 7},{(i * 3) % 5},{i % 4},{['a', 'b', 'c'][i % 3]}" for i in range(60)]
        csv.write_text("x,y,z,label\n" + "\n".join(rows))
        argv = ["compare", *TINY, *paths(tmp_path), "--methods", "none", "--dataset", f"csv:{csv}"]
        assert main(argv) == 0
        (rec,) = _records(tmp_path / "r.db")
        assert (rec["num_classes"], rec["n_features"]) == (3, 3)

    def test_bundled_dataset_keys_are_unchanged(self) -> None:
        """Fields added later stay out of the key while unset: older results still match."""
        cfg = RunConfig("compare", "digits", "mlp", "dropout", seed=0, epochs=1)
        assert "data_id" not in cfg.canonical_json() and "subnetworks" not in cfg.canonical_json()
        assert (
            cfg.key()
            != RunConfig("compare", "digits", "mlp", "dropout", seed=0, epochs=1, data_id="x").key()
        )


class TestDamagedResultsFile:
    @pytest.fixture
    def db(self, tmp_path: Path) -> Path:
        db = tmp_path / "r.db"
        assert main(["compare", *TINY, "--db", str(db), "--out", str(tmp_path / "o")]) == 0
        return db

    def test_cut_inside_its_last_page_is_refused_by_every_command(
        self,
        db: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(runner, "train_run", None)  # training would fail the test
        os.truncate(db, db.stat().st_size - 1000)
        before = _digest(db)
        out = ["--out", str(tmp_path / "o2")]
        refused(
            ["compare", *TINY, "--db", str(db), *out, "--methods", "gyro-random"], capsys, "damaged"
        )
        refused(["report", "--db", str(db), *out], capsys, "damaged")
        refused(["report", "--db", str(db), "--format", "json"], capsys, "damaged")
        refused(
            ["bench", *TINY, "--db", str(db), *out, "--no-layer", "--steps", "1"], capsys, "damaged"
        )
        assert _digest(db) == before and not Path(f"{db}-wal").exists()

    def test_a_damaged_page_fails_quick_check(
        self, db: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with open(db, "r+b") as f:
            f.seek(4096 * 2)
            f.write(b"\xff" * 4096)
        before = _digest(db)
        refused(["report", "--db", str(db), "--format", "csv"], capsys, "quick_check")
        assert _digest(db) == before

    def test_malformed_json_in_a_record_is_one_line(
        self, db: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        con = sqlite3.connect(db)
        con.execute("UPDATE runs SET metrics = '{not json'")
        con.commit()
        con.close()
        before = _digest(db)
        refused(["report", "--db", str(db), "--format", "json"], capsys, "not valid JSON")
        assert _digest(db) == before


class TestClaims:
    def test_a_run_claimed_by_a_live_process_is_waited_for_not_trained(
        self, tmp_path: Path, trained: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another live process holds a claim with a short lease: this one trains the
        other run, waits, and takes the claimed one over only when the lease runs out."""
        monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)
        # Long enough that the other run (one tiny epoch) ends before the lease does,
        # even on a loaded machine.
        LEASE = 4.0
        argv = ["compare", *TINY, *paths(tmp_path), "--methods", "none,dropout"]
        with Store(tmp_path / "r.db") as store:
            cfg = RunConfig(
                "compare", "digits", "mlp", "none", seed=0, epochs=1, batch_size=32, limit=100
            )
            key = cfg.normalized().key()
            other = os.getppid()  # alive, not us
            store._con.execute(
                "INSERT INTO claims (key, pid, host, expires) VALUES (?, ?, ?, ?)",
                (key, other, __import__("socket").gethostname(), time.time() + LEASE),
            )
        t0 = time.monotonic()
        assert main(argv) == 0
        assert trained == ["dropout", "none"] and time.monotonic() - t0 >= LEASE - 0.5
        with Store(tmp_path / "r.db") as store:
            assert store._con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0

    def test_store_claims(self, tmp_path: Path) -> None:
        cfg = RunConfig("compare", "digits", "mlp", "dropout", seed=0, epochs=1)
        with Store(tmp_path / "r.db") as store:
            key = cfg.normalized().key()
            host = __import__("socket").gethostname()
            put = "INSERT OR REPLACE INTO claims (key, pid, host, expires) VALUES (?, ?, ?, ?)"
            store._con.execute(put, (key, os.getppid(), host, time.time() + 60))
            assert not store.claim(cfg, 60)  # a live owner
            store._con.execute(put, (key, os.getppid(), "elsewhere", time.time() + 60))
            assert not store.claim(cfg, 60)  # another host, lease not over
            store._con.execute(put, (key, os.getppid(), "elsewhere", time.time() - 1))
            assert store.claim(cfg, 60)  # lease over: taken over
            store._con.execute(put, (key, 2**22 + 12345, host, time.time() + 60))
            assert store.claim(cfg, 60)  # owner died on this host
            assert store.claim(cfg, 60)  # our own claim
            store.release(cfg)
            assert store.save(cfg, {"test_acc": 1.0})
            assert not store.claim(cfg, 60)  # finished

    def test_two_processes_with_the_same_configuration_train_each_run_once(
        self, tmp_path: Path
    ) -> None:
        argv = [a for a in TINY if a != "--quiet"] + paths(tmp_path)
        argv += ["--methods", "none,dropout", "--seeds", "2", "--no-plots"]
        code = "import sys; from gyrodrop.experiments.cli import main; sys.exit(main(sys.argv[1:]))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, "compare", *argv],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        trained = [line for err in errs for line in err.splitlines() if ": test acc" in line]
        assert len(trained) == 4, errs
        assert len(_records(tmp_path / "r.db")) == 4
