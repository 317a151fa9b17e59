"""Tests for cs336.sweep: grid parsing, planning (batch-size scaling, per-point run dirs), and a
sweep that survives diverging and failing points and writes its summaries and plot.

Most tests replace ``cs336.train.run`` with a fake that writes a metrics.jsonl whose shape depends
on the learning rate; one test runs real training on a tiny config.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from cs336 import config as cfglib
from cs336 import config_io, presets, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config() -> cfglib.TrainConfig:
    cfg = presets.smoke_config()
    return config_io.apply_overrides(cfg, ["model.d_model=32", "model.num_layers=2", "train.max_steps=40",
                                        "train.batch_size=8", "train.eval_interval=20",
                                        "train.log_interval=5", "optim.warmup_iters=4"])


def points(*grids: str) -> list[dict[str, str]]:
    return sweep.grid_points([sweep.parse_grid(g) for g in grids])


# ---- grid parsing ---------------------------------------------------------------------------

def test_parse_grid_splits_key_and_values():
    axis = sweep.parse_grid("optim.lr=1e-4, 3e-4,1e-3")
    assert axis == sweep.Axis("optim.lr", ("1e-4", "3e-4", "1e-3"))


@pytest.mark.parametrize("text, fragment", [
    ("optim.lr", "KEY=V1,V2"),
    ("=1,2", "KEY=V1,V2"),
    ("optim.lr=", "empty value"),
    ("optim.lr=1e-3,,3e-3", "empty value"),
    ("optim.lr=1e-3,1e-3", "listed twice"),
    ("optim lr=1", "KEY=V1,V2"),
])
def test_parse_grid_rejects_bad_syntax(text, fragment):
    with pytest.raises(sweep.SweepError, match=fragment):
        sweep.parse_grid(text)


def test_grid_points_is_cartesian_product_first_axis_slowest():
    axes = [sweep.parse_grid("optim.lr=1,2"), sweep.parse_grid("model.ffn_type=swiglu,silu,swiglu2")]
    pts = sweep.grid_points(axes)
    assert len(pts) == 6
    assert pts[0] == {"optim.lr": "1", "model.ffn_type": "swiglu"}
    assert pts[2] == {"optim.lr": "1", "model.ffn_type": "swiglu2"}
    assert pts[3] == {"optim.lr": "2", "model.ffn_type": "swiglu"}
    assert len({tuple(p.values()) for p in pts}) == 6


def test_grid_points_rejects_repeated_key():
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.grid_points([sweep.parse_grid("optim.lr=1"), sweep.parse_grid("optim.lr=2")])


def test_point_name_is_filesystem_safe():
    name = sweep.point_name({"optim.lr": "3e-4", "data.train_text": "a b/c"})
    assert name == "optim.lr=3e-4__data.train_text=a_b_c"
    assert "/" not in name and " " not in name


def test_a_long_point_name_fits_a_file_name_and_stays_distinct():
    # a 300-character value gave a 330-byte directory name: ENAMETOOLONG after the data was prepared
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    a, b = sweep.point_name({"train.sample_prompt": long_a}), sweep.point_name({"train.sample_prompt": long_b})
    assert len(a) <= sweep.MAX_NAME and len(b) <= sweep.MAX_NAME and a != b
    assert a.startswith("train.sample_prompt=xxx") and a == sweep.point_name({"train.sample_prompt": long_a})


# ---- planning -------------------------------------------------------------------------------

def test_plan_applies_sets_then_grid_and_places_runs(tmp_path):
    plan = sweep.plan_sweep(tiny_config(), points("optim.lr=1e-4,3e-3", "model.use_post_norm=false,true"),
                            ["train.seed=7", "optim.lr=9.0"], tmp_path / "sw")
    assert [p.config.optim.lr for p in plan] == [1e-4, 1e-4, 3e-3, 3e-3]
    assert [p.config.model.use_post_norm for p in plan] == [False, True, False, True]
    assert all(p.config.train.seed == 7 for p in plan)
    dirs = {p.config.train.out_dir for p in plan}
    assert len(dirs) == 4 and all(Path(d).parent == tmp_path / "sw" for d in dirs)
    assert all(p.config.train.wandb_group == "sw" for p in plan)


def test_plan_keeps_a_given_wandb_group(tmp_path):
    plan = sweep.plan_sweep(tiny_config(), points("optim.lr=1e-3"),
                            ["train.wandb_group=mine"], tmp_path / "sw")
    assert plan[0].config.train.wandb_group == "mine"


@pytest.mark.parametrize("grid, fragment", [
    ("optim.learning_rate=1e-3", "learning_rate"),
    ("nosection.lr=1", "nosection"),
    ("train.max_steps=ten", "integer"),
    ("model.ffn_type=gelu", "ffn_type"),
])
def test_plan_rejects_unknown_keys_and_bad_values(tmp_path, grid, fragment):
    with pytest.raises(sweep.SweepError, match=fragment):
        sweep.plan_sweep(tiny_config(), points(grid), [], tmp_path)


@pytest.mark.parametrize("grids, fragment", [
    # both named train.sample_prompt=a_b: they shared one run directory (the second resumed the first)
    (["train.sample_prompt=a b,a_b"], "would share the run directory"),
    (["optim.lr=1e-3,0.001"], "give the same config"),  # two runs of one config
    (["train.seed=1,01", "optim.lr=1e-3"], "give the same config"),
])
def test_plan_rejects_points_that_are_not_distinct(tmp_path, grids, fragment):
    with pytest.raises(sweep.SweepError, match=fragment):
        sweep.plan_sweep(tiny_config(), points(*grids), [], tmp_path)


@pytest.mark.parametrize("grids, sets", [
    (["train.out_dir=a,b"], []),  # every point ran in DIR/<point> whatever the value said
    (["optim.lr=1e-3"], ["train.out_dir=elsewhere"]),
])
def test_plan_refuses_train_out_dir_that_it_would_ignore(tmp_path, grids, sets):
    with pytest.raises(sweep.SweepError, match="train.out_dir would be ignored"):
        sweep.plan_sweep(tiny_config(), points(*grids), sets, tmp_path)


def test_plan_rejects_bad_set(tmp_path):
    with pytest.raises(sweep.SweepError, match="--set"):
        sweep.plan_sweep(tiny_config(), points("optim.lr=1e-3"), ["optim.nope=1"], tmp_path)


def test_batch_size_grid_keeps_tokens_fixed(tmp_path):
    # batch 8, 40 steps, eval every 20, log every 5, warmup 4, 8 eval batches
    base = config_io.apply_overrides(tiny_config(), ["train.eval_batches=8"])
    plan = sweep.plan_sweep(base, points("train.batch_size=4,8,16,32"), [], tmp_path)
    steps = [p.config.train.max_steps for p in plan]
    assert steps == [80, 40, 20, 10]
    assert {p.config.train.max_steps * p.config.train.batch_size for p in plan} == {320}
    assert [p.config.train.eval_interval for p in plan] == [40, 20, 10, 5]
    assert [p.config.optim.warmup_iters for p in plan] == [8, 4, 2, 1]
    assert [p.config.train.eval_batches * p.config.train.batch_size for p in plan] == [64] * 4


def test_batch_size_grid_leaves_an_explicit_max_steps(tmp_path):
    axes = [sweep.parse_grid("train.batch_size=4,16"), sweep.parse_grid("train.max_steps=12")]
    plan = sweep.plan_sweep(tiny_config(), sweep.grid_points(axes), [], tmp_path)
    assert [p.config.train.max_steps for p in plan] == [12, 12]


def test_other_grids_do_not_scale_steps(tmp_path):
    plan = sweep.plan_sweep(tiny_config(), points("optim.lr=1e-3,1e-2"), [], tmp_path)
    assert [p.config.train.max_steps for p in plan] == [40, 40]


# ---- running with a fake trainer -------------------------------------------------------------

def _write_metrics(run_dir: Path, losses: list[float], eval_every: int = 2) -> None:
    """metrics.jsonl as cs336.train writes it: a step-0 eval row, then train rows (every
    ``eval_every``-th with val_loss)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "wallclock_s": 0.0, "val_loss": losses[0] + 0.2}) + "\n")
        for step, loss in enumerate(losses, start=1):
            row = {"step": step, "train_loss": loss, "lr": 1e-3, "grad_norm": 1.0,
                   "tokens_per_s": 1000.0, "wallclock_s": 0.5 * step}
            if step % eval_every == 0:
                row.update(val_loss=loss + 0.1, perplexity=math.exp(min(loss + 0.1, 50)))
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def fake_train(monkeypatch):
    """cs336.train.run replaced: lr < 0.2 learns, 0.25 crashes, 0.5 rises, >= 1 raises diverged."""
    from cs336 import train

    calls = []

    def fake_run(cfg, *, resume=False):
        calls.append(cfg)
        run_dir = Path(cfg.train.out_dir)
        lr = cfg.optim.lr
        if lr == 0.25:
            raise RuntimeError("out of memory (fake)")
        if lr >= 1.0:
            _write_metrics(run_dir, [5.0, 9.0, 40.0])
            raise train.TrainingDiverged("loss is nan at step 4", {
                "run_dir": str(run_dir), "steps": 3, "final_train_loss": math.nan, "final_val_loss": 9.1,
                "best_val_loss": 5.1, "tokens_per_s": 900.0, "wallclock_s": 2.0})
        losses = [5.0, 5.5, 6.0, 6.5] if lr == 0.5 else [5.0 - 10 * lr * i for i in range(6)]
        _write_metrics(run_dir, losses)
        return {"run_dir": str(run_dir), "steps": len(losses), "final_train_loss": losses[-1],
                "final_val_loss": losses[-1] + 0.1, "best_val_loss": min(losses) + 0.1,
                "tokens_per_s": 1000.0, "wallclock_s": 0.5 * len(losses)}

    monkeypatch.setattr(train, "run", fake_run)
    return calls


def test_sweep_survives_diverging_and_failing_points(tmp_path, fake_train):
    out = tmp_path / "lr-sweep"
    axes = [sweep.parse_grid("optim.lr=1e-2,5e-2,0.25,0.5,2.0")]
    plan = sweep.plan_sweep(tiny_config(), sweep.grid_points(axes), [], out)
    rows = sweep.run_sweep(plan, out)
    assert len(fake_train) == 5
    status = {r["point"]["optim.lr"]: r["status"] for r in rows}
    assert status == {"1e-2": "ok", "5e-2": "ok", "0.25": "error", "0.5": "diverged", "2.0": "diverged"}
    by_lr = {r["point"]["optim.lr"]: r for r in rows}
    assert "above the starting loss" in by_lr["0.5"]["reason"]
    assert "nan" in by_lr["2.0"]["reason"]
    assert by_lr["2.0"]["final_train_loss"] is None  # NaN is not kept as a number
    assert "out of memory" in by_lr["0.25"]["reason"]
    assert by_lr["5e-2"]["final_val_loss"] == pytest.approx(5.0 - 0.5 * 5 + 0.1)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"] == ["optim.lr"]
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok", "error", "diverged", "diverged"]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["optim.lr"] for r in table] == ["1e-2", "5e-2", "0.25", "0.5", "2.0"]
    assert table[3]["status"] == "diverged"
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| optim.lr |") and len(md) == 2 + 5
    assert "diverged" in md[-1]
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) < 100_000


def test_classify_flags_rising_and_nonfinite_loss(tmp_path):
    _write_metrics(tmp_path, [5.0, 4.0, 3.0])  # starting (step-0 val) loss 5.2
    assert sweep.classify({"final_train_loss": 3.0, "final_val_loss": 3.1}, tmp_path) == ("ok", "")
    assert sweep.classify({"final_train_loss": 5.1, "final_val_loss": 5.15}, tmp_path) == ("ok", "")
    assert sweep.classify({"final_train_loss": 5.5, "final_val_loss": 3.1}, tmp_path)[0] == "diverged"
    assert sweep.classify({"final_train_loss": 3.0, "final_val_loss": 5.3}, tmp_path)[0] == "diverged"
    assert sweep.classify({"final_train_loss": math.inf, "final_val_loss": 3.1}, tmp_path)[0] == "diverged"
    assert sweep.classify({"final_train_loss": 3.0, "final_val_loss": math.nan}, tmp_path)[0] == "diverged"
    assert sweep.classify({"final_train_loss": 3.0, "final_val_loss": 3.1, "interrupted": True},
                          tmp_path)[0] == "interrupted"


def test_sweep_stops_after_an_interrupted_run(tmp_path, monkeypatch):
    from cs336 import train

    calls = []

    def interrupted_run(cfg, *, resume=False):
        calls.append(cfg)
        _write_metrics(Path(cfg.train.out_dir), [5.0, 4.0])
        return {"run_dir": cfg.train.out_dir, "steps": 2, "final_train_loss": 4.0, "final_val_loss": 4.1,
                "best_val_loss": 4.1, "tokens_per_s": 1.0, "wallclock_s": 1.0, "interrupted": True}

    monkeypatch.setattr(train, "run", interrupted_run)
    out = tmp_path / "sw"
    from cs336.interrupt import Interrupted

    with pytest.raises(Interrupted):
        sweep.run_sweep(sweep.plan_sweep(tiny_config(), points("optim.lr=1e-3,1e-2"), [], out), out)
    assert len(calls) == 1
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 1


def test_worker_round_trips_the_config(tmp_path, fake_train):
    plan = sweep.plan_sweep(tiny_config(), points("model.ffn_type=silu"), [], tmp_path / "sw")
    spec = tmp_path / "spec.json"
    result = tmp_path / "result.json"
    spec.write_text(json.dumps({"name": plan[0].name, "point": plan[0].point,
                                "run_dir": str(plan[0].run_dir), "result": str(result),
                                "config": config_io.config_to_dict(plan[0].config)}))
    sweep.main(["--worker", str(spec)])
    assert fake_train[0] == plan[0].config
    assert json.loads(result.read_text())["status"] == "ok"


# ---- command line ---------------------------------------------------------------------------

def _base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(config_io.config_to_dict(tiny_config())))
    return path


def test_cli_runs_the_grid_and_prints_a_summary(tmp_path, fake_train, capsys):
    out = tmp_path / "cli"
    sweep.main(["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=1e-2,2.0",
                "--grid", "train.batch_size=4,8", "--set", "train.seed=3", "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert "4 runs, 2 diverged, 0 failed" in text
    assert "best optim.lr=1e-2__train.batch_size=" in text
    assert sorted(c.train.max_steps for c in fake_train) == [40, 40, 80, 80]
    assert all(c.train.seed == 3 and c.model.d_model == 32 for c in fake_train)
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 4


def test_cli_exits_1_when_a_point_fails(tmp_path, fake_train):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=0.25", "--out-dir",
                    str(tmp_path / "o")])
    assert exc.value.code == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--grid", "optim.lr"], "KEY=V1,V2"),
    (["--grid", "optim.bogus=1"], "bogus"),
    ([], "no --grid"),
    (["--grid", "optim.lr=1e-3", "--base", "missing.toml"], "missing.toml"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, fake_train, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        sweep.main([*argv, "--out-dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not fake_train


def test_cli_refuses_a_nonempty_out_dir(tmp_path, fake_train, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--grid", "optim.lr=1e-3", "--out-dir", str(tmp_path / "o")])
    assert exc.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert (tmp_path / "o" / "x").read_text() == "keep"


def _interrupt_at(monkeypatch, fake_train, lr, where="training", stop_signal="SIGINT"):
    """cs336.train.run stops at point ``lr``: inside training (it saves a checkpoint and returns
    an interrupted summary) or ``before`` training starts (a raw KeyboardInterrupt)."""
    from cs336 import train
    from cs336.run_dir import RunDir

    real = train.run
    resumed = []

    def run(cfg, *, resume=False):
        if resume:
            resumed.append(cfg.optim.lr)
        if cfg.optim.lr == lr and not resume:
            if where == "before":
                raise KeyboardInterrupt
            rd = RunDir(cfg.train.out_dir)
            rd.create()
            (rd.checkpoints / "step_000002.pt").write_bytes(b"ck")
            (rd.checkpoints / "latest").write_text("step_000002.pt\n")
            _write_metrics(Path(cfg.train.out_dir), [5.0, 4.0])
            return {"run_dir": cfg.train.out_dir, "steps": 2, "final_train_loss": 4.0, "final_val_loss": 4.1,
                    "best_val_loss": 4.1, "tokens_per_s": 1.0, "wallclock_s": 1.0, "interrupted": True,
                    "stop_signal": stop_signal}
        return real(cfg, resume=resume)

    monkeypatch.setattr(train, "run", run)
    return resumed


@pytest.mark.parametrize("where", ["training", "before"])
def test_interrupted_sweep_exits_130_without_best_and_the_same_command_continues(
        tmp_path, fake_train, capsys, monkeypatch, where):
    from cs336 import train

    argv = ["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=1e-2,2e-2,3e-2", "--out-dir",
            str(tmp_path / "sw")]
    real = train.run
    resumed = _interrupt_at(monkeypatch, fake_train, 2e-2, where)
    with pytest.raises(SystemExit) as exc:
        sweep.main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 130 and "best" not in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("interrupted by SIGINT: finished points")
    assert [c.optim.lr for c in fake_train] == [1e-2]
    monkeypatch.setattr(train, "run", real)
    fake_train.clear()
    resumed = _interrupt_at(monkeypatch, fake_train, None)
    sweep.main(argv)  # the same command: 1e-2 kept, 2e-2 resumed (if it saved a checkpoint), 3e-2 run
    out = capsys.readouterr().out
    assert [c.optim.lr for c in fake_train] == [2e-2, 3e-2]
    assert resumed == ([2e-2] if where == "training" else [])
    assert "1 finished point(s) kept, 2 to run" in out and "3 runs, 0 diverged, 0 failed; best" in out
    assert [r["status"] for r in json.loads((tmp_path / "sw" / "summary.json").read_text())["runs"]] == ["ok"] * 3


def test_a_point_stopped_by_sigterm_makes_the_sweep_exit_143(tmp_path, fake_train, capsys, monkeypatch):
    argv = ["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=1e-2,2e-2", "--out-dir", str(tmp_path / "sw")]
    _interrupt_at(monkeypatch, fake_train, 2e-2, stop_signal="SIGTERM")
    with pytest.raises(SystemExit) as exc:
        sweep.main(argv)
    assert exc.value.code == 143
    assert capsys.readouterr().err.startswith("interrupted by SIGTERM: finished points")
    runs = json.loads((tmp_path / "sw" / "summary.json").read_text())["runs"]
    assert [(r["status"], r["reason"], r["stop_signal"]) for r in runs] == [
        ("ok", "", None), ("interrupted", "stopped by SIGTERM", "SIGTERM")]


def test_a_different_sweep_in_the_same_directory_is_refused(tmp_path, fake_train, capsys):
    base = str(_base_file(tmp_path))
    sweep.main(["--base", base, "--grid", "optim.lr=1e-2", "--out-dir", str(tmp_path / "sw")])
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "sw").rglob("*"))
    for extra, fragment in ((["--grid", "optim.lr=1e-2,2e-2"], "only in this command: optim.lr=2e-2"),
                            (["--grid", "optim.lr=1e-2", "--train.seed=9"], "train.seed is 0 there, 9 here")):
        with pytest.raises(SystemExit) as exc:
            sweep.main(["--base", base, *extra, "--out-dir", str(tmp_path / "sw")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "holds another sweep" in err and fragment in err, err
    assert sorted(p.name for p in (tmp_path / "sw").rglob("*")) == before


def test_out_is_a_deprecated_alias_of_out_dir(tmp_path, fake_train, capsys):
    sweep.main(["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=1e-2", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err == "note: --out is deprecated; use --out-dir\n"
    assert (tmp_path / "o" / "summary.json").is_file()


# ---- shared data and a real run ---------------------------------------------------------------

def test_share_data_prepares_once_and_points_runs_at_it(tmp_path, fake_train):
    out = tmp_path / "sw"
    base = config_io.apply_overrides(tiny_config(), ["data.corpus_mb=0.05", "model.vocab_size=300"])
    plan = sweep.share_data(sweep.plan_sweep(base, points("optim.lr=1e-3,1e-2"), [], out), out)
    for run in plan:
        assert run.config.data.source == "tokens"
        assert Path(run.config.data.train_tokens) == out / "_data" / "data" / "train.bin"
        assert Path(run.config.data.tokenizer_dir) == out / "_data" / "tokenizer"
    assert (out / "_data" / "data" / "valid.bin").stat().st_size > 0
    assert (out / "_data" / "tokenizer" / "merges.txt").is_file()
    varied = sweep.plan_sweep(base, points("model.vocab_size=300,320"), [], tmp_path / "v")
    assert sweep.share_data(varied, tmp_path / "v") == varied  # each run trains its own tokenizer
    assert not (tmp_path / "v" / "_data").exists()


@pytest.mark.slow
def test_real_sweep_marks_a_huge_learning_rate_as_diverged(tmp_path, capsys):
    """Real training (no fake) of a tiny model: lr 1e4 blows up, lr 3e-3 trains, the sweep ends.

    Slow: corpus generation, tokenizer training and numba compilation take 30-50 s on 2 cores.
    """
    out = tmp_path / "real"
    sweep.main(["--base", str(_base_file(tmp_path)), "--grid", "optim.lr=3e-3,1e4", "--out-dir", str(out),
                "--set", "data.corpus_mb=0.05", "--set", "model.vocab_size=300",
                "--set", "model.context_length=16", "--set", "train.batch_size=4",
                "--set", "train.max_steps=6", "--set", "train.eval_interval=3",
                "--set", "train.log_interval=1", "--set", "train.eval_batches=1",
                "--set", "train.sample_tokens=0", "--set", "optim.warmup_iters=0"])
    assert "2 runs, 1 diverged, 0 failed" in capsys.readouterr().out
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "diverged"]
    assert runs[0]["steps"] == 6 and runs[0]["final_val_loss"] < runs[0]["best_val_loss"] + 1e-9
    assert sweep.read_metrics(out / "optim.lr=3e-3")[-1]["step"] == 6
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)


FAKE_WORKER = """
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
start = time.time()
time.sleep(0.4)
if spec["point"]["optim.lr"] == "0.25":
    sys.exit(3)
device = os.environ["CUDA_VISIBLE_DEVICES"]
with open(sys.argv[0] + ".events", "a") as f:
    f.write(json.dumps([device, start, time.time()]) + "\\n")
row = {"name": spec["name"], "point": spec["point"], "run_dir": spec["run_dir"], "status": "ok",
       "diverged": False, "reason": "", "steps": spec["config"]["train"]["max_steps"],
       "final_train_loss": 3.0, "final_val_loss": float(spec["point"]["optim.lr"]),
       "best_val_loss": 3.0, "tokens_per_s": 1.0, "wallclock_s": 0.4}
with open(spec["result"], "w") as f:
    json.dump(row, f)
"""


def test_parallel_runs_one_point_per_device_at_a_time(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    out = tmp_path / "par"
    plan = sweep.plan_sweep(tiny_config(), points("optim.lr=1e-3,2e-3,0.25,4e-3,5e-3"), [], out)
    rows = sweep.run_sweep(plan, out, ["0", "1"], worker_cmd=[sys.executable, str(script)])
    assert [r["name"] for r in rows] == [p.name for p in plan]  # plan order, not finishing order
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok"]
    assert "status 3" in rows[2]["reason"]
    assert [r["final_val_loss"] for r in rows if r["status"] == "ok"] == [1e-3, 2e-3, 4e-3, 5e-3]
    events = [json.loads(line) for line in Path(str(script) + ".events").read_text().splitlines()]
    assert {e[0] for e in events} == {"0", "1"}
    for device in ("0", "1"):
        spans = sorted((s, e) for d, s, e in events if d == device)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))  # never two at once
    spans = sorted((s, e) for _, s, e in events)
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False))  # the two devices overlapped
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 5
