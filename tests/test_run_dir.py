"""cs336.run_dir: layout, marker and ownership, the exclusive lock (two real processes), unique
run names, ``runs/latest``, the one checkpoint listing and the one metrics reader."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cs336.config import TrainConfig
from cs336.config_io import config_to_dict
from cs336.run_dir import (
    LOCK,
    MARKER,
    RunDir,
    RunDirBusy,
    RunDirError,
    RunDirRefused,
    RunLock,
    checkpoint_files,
    claim_run_dir,
    is_run_dir,
    link_latest,
    new_run_dir,
    read_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def test_new_and_empty_directories_are_claimed(tmp_path):
    fresh = claim_run_dir(tmp_path / "a" / "b")
    assert (fresh / MARKER).is_file() and is_run_dir(fresh)
    (tmp_path / "empty").mkdir()
    assert (claim_run_dir(tmp_path / "empty") / MARKER).is_file()
    assert json.loads((fresh / MARKER).read_text())["pid"] == os.getpid()


def test_ordinary_non_empty_directory_is_refused_and_left_alone(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "config.json").write_text("my own file")
    with pytest.raises(RunDirRefused, match=r"holds files \(config\.json\) and is not a run directory"):
        claim_run_dir(docs)
    assert sorted(p.name for p in docs.iterdir()) == ["config.json"]
    assert (docs / "config.json").read_text() == "my own file"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirRefused, match="is a file"):
        claim_run_dir(tmp_path / "file")


def test_a_directory_inside_another_run_is_refused(tmp_path):
    """--out-dir RUN/checkpoints/step_000100.pt made a directory the outer run's keep-last pruning
    would delete (and its resume would take for a checkpoint); any directory inside a run is refused."""
    outer = claim_run_dir(tmp_path / "outer")
    (outer / "checkpoints").mkdir()
    for inner in (outer / "checkpoints" / "step_000100.pt", outer / "sub", outer / "data" / "x" / "y"):
        with pytest.raises(RunDirRefused, match=f"is inside the run directory {outer}"):
            claim_run_dir(inner)
        assert not inner.exists()
    assert claim_run_dir(outer) == outer  # the run directory itself is still accepted
    assert claim_run_dir(tmp_path / "beside") == tmp_path / "beside"


def test_a_dangling_link_is_named_as_such(tmp_path):
    """runs/latest after its run was deleted: a new run said 'runs/latest: File exists; remove it',
    --resume said 'config.json not found'."""
    link = tmp_path / "latest"
    link.symlink_to("gone")
    with pytest.raises(RunDirRefused, match="is a symbolic link to gone, which does not exist"):
        claim_run_dir(link)
    with pytest.raises(RunDirRefused, match="is a symbolic link to gone, which does not exist"):
        RunDir(link).read_config()
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_existing_run_directories_are_accepted(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{}\n")
    assert claim_run_dir(run) == run
    legacy = tmp_path / "legacy"  # written before the marker existed: the exact layout
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "checkpoints" / "step_000010.pt").write_bytes(b"x")
    (legacy / "checkpoints" / "latest").write_text("step_000010.pt\n")
    (legacy / "config.json").write_text(json.dumps(config_to_dict(TrainConfig())))
    (legacy / "metrics.jsonl").write_text("")
    assert claim_run_dir(legacy) == legacy and (legacy / MARKER).is_file()


@pytest.mark.parametrize("extra", ["notes.md", "checkpoints/model.safetensors", "config:other"])
def test_a_project_with_config_json_and_checkpoints_is_not_a_run_directory(tmp_path, extra):
    """A user's project holding config.json beside checkpoints/ (issue 18's data loss): refused,
    every file untouched, unless it is exactly a run directory's layout."""
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    config = '{"model_name": "mine", "lr": 0.1}'
    if extra == "config:other":  # the exact layout, but a config.json that is not cs336's
        (project / "checkpoints" / "step_000001.pt").write_bytes(b"x")
    else:
        config = json.dumps(config_to_dict(TrainConfig()))
        (project / extra).write_text("mine")
    (project / "config.json").write_text(config)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    assert not is_run_dir(project)
    with pytest.raises(RunDirRefused, match="is not a run directory"):
        claim_run_dir(project)
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before


def test_run_names_never_collide(tmp_path):
    made = {new_run_dir(tmp_path) for _ in range(50)}
    assert len(made) == 50 and all((p / MARKER).is_file() for p in made)


# ------------------------------------------------------------------ lock, two real processes

HOLDER = textwrap.dedent("""
    import sys, time
    from cs336.run_dir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()   # hold until the test says so
    print("released", flush=True)
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_second_process_fails_at_once_while_the_first_holds_the_lock(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom cs336.run_dir import RunLock, RunDirBusy\n"
             "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunDirBusy as e:\n    print(e); sys.exit(3)",
             str(run)], capture_output=True, text=True, env=_env(), timeout=120)
        assert second.returncode == 3
        assert "in use by another training run" in second.stdout and f"pid {holder.pid}" in second.stdout
        with pytest.raises(RunDirBusy):
            RunLock(run).acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait(timeout=60)
    with RunLock(run):  # free again
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    lock = RunLock(run).acquire()
    assert f"pid {os.getpid()}" in (run / LOCK).read_text()
    lock.release()


def test_latest_link_follows_the_newest_run(tmp_path):
    first = new_run_dir(tmp_path)
    assert link_latest(first) == tmp_path / "latest"
    second = new_run_dir(tmp_path)
    link_latest(second)
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert os.readlink(tmp_path / "latest") == second.name  # relative: the tree can move
    link_latest(tmp_path / "latest")  # a resume through the link keeps it pointing at the run
    assert os.readlink(tmp_path / "latest") == second.name
    (tmp_path / "other").mkdir()
    real = tmp_path / "other" / "latest"
    real.mkdir()  # a real directory named latest is never replaced
    assert link_latest(tmp_path / "other" / "run") is None and real.is_dir() and not real.is_symlink()


def test_checkpoint_listing_orders_by_step_and_ignores_other_files(tmp_path):
    for name in ("step_000100.pt", "step_000020.pt", "step_1000000.pt", "latest", "step_5.pt.tmp", "x.pt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step_000020.pt", "step_000100.pt", "step_1000000.pt"]
    assert checkpoint_files(tmp_path / "missing") == []
    assert RunDir(tmp_path.parent / tmp_path.name).checkpoint_files() == []  # DIR/checkpoints, not DIR


def test_latest_checkpoint_without_its_pointer_is_the_newest_file(tmp_path):
    """A run killed between writing its first checkpoint and ``latest`` (or a deleted pointer):
    --resume said 'no checkpoint to resume from; drop --resume' while a new run said 'already holds
    checkpoints; pass --resume'. The newest checkpoint is the one to continue from."""
    rd = RunDir(tmp_path)
    rd.checkpoints.mkdir()
    assert rd.latest_checkpoint() is None
    for step in (4, 12, 8):
        rd.checkpoint_path(step).write_bytes(b"x")
    assert rd.latest_checkpoint() == rd.checkpoint_path(12)
    (rd.checkpoints / "latest").write_text("step_000008.pt\n")  # the pointer, when there, decides
    assert rd.latest_checkpoint() == rd.checkpoint_path(8)


def test_pruning_after_a_rollback_keeps_this_runs_checkpoints_not_the_abandoned_later_ones(tmp_path):
    """Resumed from step 4 (latest pointed back at it) with step 8 of the rolled-back continuation
    still there: keep-last-2 deleted 4, then 5, then 6, keeping 7 and the stale 8. Later steps are
    not counted now; the run replaces them when it reaches them."""
    rd = RunDir(tmp_path)
    rd.checkpoints.mkdir()
    for step in (4, 8):
        rd.checkpoint_path(step).write_bytes(b"x")
    for step in (5, 6, 7):
        rd.checkpoint_path(step).write_bytes(b"x")
        rd.mark_latest(rd.checkpoint_path(step), keep_last=2)
    assert [p.name for p in rd.checkpoint_files()] == ["step_000006.pt", "step_000007.pt", "step_000008.pt"]
    assert rd.latest_checkpoint() == rd.checkpoint_path(7)
    rd.checkpoint_path(8).write_bytes(b"y")  # the run reaches step 8: its own file, counted again
    rd.mark_latest(rd.checkpoint_path(8), keep_last=2)
    assert [p.name for p in rd.checkpoint_files()] == ["step_000007.pt", "step_000008.pt"]


def test_metrics_reader_skips_a_torn_last_line_and_truncate_keeps_earlier_steps(tmp_path):
    rd = RunDir(tmp_path)
    for step in (0, 5, 10):
        rd.append_metrics({"step": step, "train_loss": 1.0 / (step + 1)})
    with open(rd.metrics_file, "a") as fh:
        fh.write('{"step": 15, "train_lo')  # killed while writing
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 5, 10]
    assert read_metrics(rd.metrics_file) == read_metrics(tmp_path)
    rd.truncate_metrics(5)
    assert [r["step"] for r in rd.read_metrics()] == [0, 5]
    assert read_metrics(tmp_path / "nothing") == []


def test_a_latest_pointer_that_is_not_text_names_itself(tmp_path):
    # was a bare "'utf-8' codec can't decode byte 0xff" (generate printed it as the whole error)
    rd = RunDir(tmp_path / "run")
    rd.create()
    (rd.checkpoints / "latest").write_bytes(b"\xff\xfe")
    with pytest.raises(RunDirError, match=r"checkpoints/latest is not text \(damaged\); write the file name"):
        rd.latest_checkpoint()
