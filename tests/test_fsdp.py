"""FSDP2 on two gloo ranks (CPU) trains like one process; sharded checkpoints resume at 1 and 2 ranks,
and generate/export read them; the bad launches and shapes get one clear error."""

import json
import os

import pytest
import torch.multiprocessing as mp

from cs336.config import ConfigError
from cs336.config_io import apply_overrides
from cs336.presets import smoke_config
from cs336.train import run
from run_helpers import free_port

STEPS = 8


def _cfg(out_dir, data_dir, *extra):
    return apply_overrides(smoke_config(), _overrides(out_dir, data_dir, *extra))


def _overrides(out_dir, data_dir, *extra):
    return [
        f"train.out_dir={out_dir}", f"train.max_steps={STEPS}", "train.log_interval=1",
        f"train.eval_interval={STEPS}", "train.eval_batches=3", "train.batch_size=8",
        "train.checkpoint_interval=4", "train.keep_last=5", f"optim.cosine_cycle_iters={STEPS}",
        "train.sample_tokens=0", "train.device=cpu", "train.threads=1", "model.num_layers=3",
        "model.kernels=native",
        f"data.train_tokens={data_dir}/data/train.bin", f"data.valid_tokens={data_dir}/data/valid.bin",
        f"data.tokenizer_dir={data_dir}/tokenizer", *extra]


def _rank(rank: int, world: int, port: int, out_dir: str, data_dir: str, extra: tuple, resume: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(_cfg(out_dir, data_dir, "train.parallel=fsdp", *extra), resume=resume)


def _fsdp(out_dir, data_dir, *extra, resume=False):
    mp.spawn(_rank, args=(2, free_port(), str(out_dir), str(data_dir), extra, resume), nprocs=2, join=True)


def _losses(run_dir, stopped_at=None):
    """(step, train loss, val loss, grad norm) per metrics row; ``stopped_at``: the step where a
    first run ended, whose extra final evaluation is left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), None if r["step"] == stopped_at else r.get("val_loss"),
             r.get("grad_norm")) for r in rows]


def _same(a, b, rel=1e-4, grad_rel=1e-4):
    """Same steps, train/val losses within ``rel``, gradient norms within ``grad_rel``."""
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        for x, y, tol in zip(ra[1:], rb[1:], (rel, rel, grad_rel), strict=True):
            assert (x is None) == (y is None), (ra, rb)
            if x is not None:
                assert y == pytest.approx(x, rel=tol), (ra, rb)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_data")
    run(apply_overrides(smoke_config(), [f"train.out_dir={d}", "train.max_steps=1", "train.sample_tokens=0",
                                         "data.corpus_mb=0.1"]))
    return d


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run(_cfg(out, data))
    return out


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """2 ranks, 2 micro-batches each, every other block recomputed; sharded checkpoints at steps 4, 8."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _fsdp(out, data, "train.grad_accum_steps=2", "train.activation_checkpointing=selective", "train.sample_tokens=5")
    return out


def test_fsdp_with_accumulation_matches_one_process(single, fsdp_run):
    out = fsdp_run
    _same(_losses(single), _losses(out))
    shards = sorted(p.name for p in (out / "checkpoints" / "step_000008.dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000008.dcp"
    assert "=== step 8" in (out / "samples.txt").read_text()  # rank 0 sampled from the gathered model


@pytest.mark.slow
def test_fsdp_bf16_with_checkpointing_matches_one_process_bf16(data, tmp_path):
    ref = tmp_path / "single_bf16"
    run(_cfg(ref, data, "train.autocast=bf16"))
    out = tmp_path / "fsdp_bf16"
    _fsdp(out, data, "train.autocast=bf16", "train.activation_checkpointing=full")
    # Each rank's weight gradient leaves its bf16 matmul rounded to bf16 before the fp32 reduction,
    # where one process rounds the sum of all rows once: the norms differ by ~1e-4, the losses less.
    _same(_losses(ref), _losses(out), grad_rel=1e-3)


def test_resume_two_ranks_to_one_and_one_to_two(data, single, tmp_path):
    """A sharded checkpoint of step 4 resumes in one process; a single file of step 4 under fsdp."""
    a = tmp_path / "two_then_one"
    _fsdp(a, data, f"train.max_steps={STEPS // 2}")
    run(_cfg(a, data), resume=True)
    _same(_losses(single), _losses(a, STEPS // 2))
    assert (a / "checkpoints" / "step_000008.pt").is_file()

    b = tmp_path / "one_then_two"
    run(_cfg(b, data, f"train.max_steps={STEPS // 2}"))
    _fsdp(b, data, resume=True)
    _same(_losses(single), _losses(b, STEPS // 2))
    assert (b / "checkpoints" / "step_000008.dcp").is_dir()


def test_fsdp_on_one_rank_is_refused_before_writing(data, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="two or more ranks"):
        run(_cfg(out, data, "train.parallel=fsdp"))
    assert not out.exists()


def test_generate_and_export_read_a_sharded_checkpoint(single, fsdp_run, tmp_path):
    """The sharded step-4 checkpoint consolidates to the weights one process trained."""
    import torch

    from cs336.checkpoint import read_checkpoint
    from cs336.export import main as export_main
    from cs336.generate import main as generate_main
    from cs336.inference import load_for_inference

    out = fsdp_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000004.dcp",
                                                                      "step_000008.dcp"]
    dcp_dir = out / "checkpoints" / "step_000004.dcp"
    whole = read_checkpoint(single / "checkpoints" / "step_000004.pt")["model"]
    model, _ = load_for_inference(checkpoint=str(dcp_dir))
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert generate_main(["--run", str(out), "--prompt", "Once", "--max-tokens", "5", "--seed", "0"]) in (0, None)
    assert export_main(["--checkpoint", str(dcp_dir), "--out", str(tmp_path / "hf")]) in (0, None)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_sharded_checkpoint_integrity_and_other_shape(fsdp_run, tmp_path):
    """A changed shard file and a model of another shape are refused with one CheckpointError."""
    import shutil

    from cs336.checkpoint import CheckpointError, read_checkpoint
    from cs336.config import ModelConfig
    from cs336.model import TransformerLM
    from cs336.sharded_checkpoint import load_sharded_into

    src = fsdp_run / "checkpoints" / "step_000008.dcp"
    other = TransformerLM.from_config(ModelConfig(vocab_size=320, context_length=32, d_model=48, num_layers=3,
                                                  num_heads=2, d_ff=64))
    with pytest.raises(CheckpointError, match="other settings.*d_model: checkpoint 32, model 48"):
        load_sharded_into(src, other, None)
    bad = tmp_path / "bad.dcp"
    shutil.copytree(src, bad)
    with open(bad / "__1_0.distcp", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="__1_0.distcp is missing or changed"):
        read_checkpoint(bad)
    beside = fsdp_run / "checkpoints" / "step_000008.dcp" / "__0_0.distcp"
    backup = beside.read_bytes()
    beside.write_bytes(backup[:-1])
    try:  # in the run directory the error names the previous valid checkpoint
        with pytest.raises(CheckpointError, match="previous valid checkpoint is .*step_000004.dcp"):
            read_checkpoint(src)
    finally:
        beside.write_bytes(backup)
    (bad / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        read_checkpoint(bad)


def test_rank_count_not_dividing_the_batch_is_refused_before_writing(data, tmp_path):
    import torch

    from cs336.distributed import DistInfo
    from cs336.interrupt import Stage
    from cs336.trainer import train

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="batch_size=9 is not divisible by the 2 data-parallel ranks"):
        train(_cfg(out, data, "train.parallel=fsdp", "train.batch_size=9"), False, torch.device("cpu"),
              DistInfo(rank=0, world_size=2), Stage())
    assert not out.exists()


@pytest.mark.slow
def test_two_nodes_of_one_rank_each_on_loopback(data, single, tmp_path):
    """torchrun --nnodes=2 with a c10d rendezvous on 127.0.0.1: the README's multi-node command."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "two_nodes"
    port = free_port()
    flags = ["--preset", "smoke", *(f"--{o}" for o in _overrides(out, data, "train.parallel=fsdp"))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=cs336-test", "-m", "cs336.train", *flags],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert "ranks: 2" in "".join(logs)
    _same(_losses(single), _losses(out))
