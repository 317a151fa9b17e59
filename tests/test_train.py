"""The main job end to end at a tiny size, and exact resume."""

import json

import pytest

from cs336.config import smoke_config
from cs336.config_io import apply_overrides
from cs336.train import main, run

TINY = ["train.max_steps=24", "train.eval_interval=12", "train.log_interval=4", "train.checkpoint_interval=8",
        "train.keep_last=2", "data.corpus_mb=0.1", "train.sample_tokens=16"]


def tiny(out_dir, *extra):
    return apply_overrides(smoke_config(), TINY + [f"train.out_dir={out_dir}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_main_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--preset", "smoke", "--out-dir", str(out)] + [f"--{o}" for o in TINY] + ["--optim.lr=1e-2"])
    printed = capsys.readouterr().out
    assert printed.startswith("config: {")
    assert "done: 24 steps" in printed and "sample:" in printed
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.txt", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "data/train.bin", "data/valid.bin.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_000016.pt", "step_000024.pt"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000024.pt"
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 24
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 4, 8, 12, 16, 20, 24]
    assert set(rows[-1]) == {"step", "train_loss", "val_loss", "perplexity", "lr", "grad_norm",
                             "tokens_per_s", "wallclock_s"}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5, "validation loss did not drop"
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert rows[-1]["perplexity"] == pytest.approx(2.718281828 ** rows[-1]["val_loss"], rel=1e-6)
    assert "Once upon a time" in (out / "samples.txt").read_text()


def test_run_returns_the_summary(tmp_path):
    summary = run(tiny(tmp_path / "r", "train.max_steps=8", "train.sample_tokens=0"))
    assert summary["steps"] == 8 and summary["run_dir"] == str(tmp_path / "r")
    assert summary["final_val_loss"] is not None and summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["tokens_per_s"] > 0 and summary["wallclock_s"] > 0 and summary["interrupted"] is False
    assert set(summary) >= {"run_dir", "steps", "final_train_loss", "final_val_loss", "best_val_loss",
                            "tokens_per_s", "wallclock_s"}


def test_resume_continues_exactly(tmp_path):
    fixed = ["optim.cosine_cycle_iters=24", "train.sample_tokens=0"]
    full = run(tiny(tmp_path / "full", *fixed))
    run(tiny(tmp_path / "split", *fixed, "train.max_steps=12"))
    resumed = run(tiny(tmp_path / "split", *fixed), resume=True)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "grad_norm", "lr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    assert resumed["steps"] == 24


def test_profile_records_the_first_steps(tmp_path):
    summary = run(tiny(tmp_path / "p", "train.max_steps=6", "train.profile=true", "train.sample_tokens=0"))
    assert summary["steps"] == 6
    prof = tmp_path / "p" / "profile"
    assert (prof / "key_averages.txt").read_text().count("\n") > 5
    assert list(prof.glob("step*.json"))
    assert [r["step"] for r in metrics(tmp_path / "p")] == [0, 4, 6]


def test_embedded_corpus_is_seeded_and_split_into_documents(tmp_path):
    from cs336.corpus import EOT, corpus_text, write_corpus

    text = corpus_text(50_000, seed=3)
    assert text == corpus_text(50_000, seed=3) and text != corpus_text(50_000, seed=4)
    docs = [d.strip() for d in text.split(EOT) if d.strip()]
    assert len(docs) > 50 and len(set(docs)) > 0.9 * len(docs)
    assert all(d[0].isupper() and d.rstrip()[-1] in '.!"' for d in docs)
    train, valid = write_corpus(tmp_path, 0.2, seed=1)
    t, v = train.read_text(), valid.read_text()
    assert 150_000 < len(t) < 200_000 and len(v) >= 10_000
    assert not t.startswith(v[:200])


def test_help_shows_the_commands_and_generated_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--resume", "--out-dir", "--max-steps", "--kernels", "--optim.lr", "--model.d_model",
                 "--train-text", "--dataset", "--wandb", "--compile"):
        assert flag in out, flag


@pytest.mark.slow
def test_wandb_offline_logs_into_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    run(tiny(tmp_path / "w", "train.max_steps=4", "train.wandb=true", "train.sample_tokens=0"))
    offline = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
