"""Two gloo ranks on the CPU train exactly like one process on the same global batch, the ranks
with two micro-batches each (gradient accumulation under DDP) and every block recomputed in
backward (activation checkpointing)."""

import json
import os

import pytest
import torch.multiprocessing as mp

from cs336.config_io import apply_overrides
from cs336.presets import smoke_config
from cs336.train import run
from run_helpers import free_port

STEPS = 6


def _cfg(out_dir, data_dir, *extra):
    return apply_overrides(smoke_config(), [
        f"train.out_dir={out_dir}", f"train.max_steps={STEPS}", "train.log_interval=1",
        f"train.eval_interval={STEPS}", "train.eval_batches=4", "train.batch_size=8",
        "train.sample_tokens=0", "train.device=cpu", "train.threads=1",
        f"data.train_tokens={data_dir}/data/train.bin", f"data.valid_tokens={data_dir}/data/valid.bin",
        f"data.tokenizer_dir={data_dir}/tokenizer", *extra])


def _rank(rank: int, world: int, port: int, out_dir: str, data_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(_cfg(out_dir, data_dir, "train.grad_accum_steps=2", "train.activation_checkpointing=full"))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("grad_norm")) for r in rows]


def test_two_gloo_ranks_match_one_process(tmp_path):
    data = tmp_path / "data_run"
    run(apply_overrides(smoke_config(), [f"train.out_dir={data}", "train.max_steps=1",
                                         "train.sample_tokens=0", "data.corpus_mb=0.1"]))
    single = tmp_path / "single"
    run(_cfg(single, data))
    ddp = tmp_path / "ddp"
    mp.spawn(_rank, args=(2, free_port(), str(ddp), str(data)), nprocs=2, join=True)
    a, b = _losses(single), _losses(ddp)
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra[1:], rb[1:], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert y == pytest.approx(x, rel=1e-5), (ra, rb)
    assert a[-1][1] < a[1][1]  # it trained
    assert not (ddp / "checkpoints").exists() or (ddp / "checkpoints" / "latest").is_file()


def _rank_cli(rank: int, world: int, port: int, out_dir: str, report: str) -> None:
    """Run the CLI as one torchrun rank; write its exit status and stderr to ``report``.rank."""
    import contextlib
    import io

    from cs336.train import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(["--preset", "smoke", "--out-dir", out_dir, "--train.progress=false", "--train.device=cpu"])
        except SystemExit as exc:
            code = exc.code
    with open(f"{report}.{rank}", "w") as fh:
        json.dump({"code": code, "stderr": err.getvalue()}, fh)


def test_refused_run_dir_under_ddp_is_one_line_from_rank_0(tmp_path):
    """Rank 0 decides; the other rank gets the same error through the broadcast and prints nothing."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine\n")
    report = tmp_path / "report"
    mp.spawn(_rank_cli, args=(2, free_port(), str(docs), str(report)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"report.{r}").read_text()) for r in (0, 1))
    assert r0["code"] == r1["code"] == 2
    assert r0["stderr"].startswith("error: ") and "is not a run directory" in r0["stderr"]
    assert len(r0["stderr"].strip().splitlines()) == 1
    assert r1["stderr"] == ""
    assert sorted(p.name for p in docs.iterdir()) == ["notes.txt"]
