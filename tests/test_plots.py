"""cs336.plots: loss.png on a log loss axis, with every resume of the run marked."""

import json

import pytest

from cs336.plots import loss_figure, plot_losses, read_resumes, record_resume


def _metrics(run_dir, steps=200):
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "wallclock_s": 0.0, "val_loss": 7.0}) + "\n")
        for step in range(1, steps + 1):
            row = {"step": step, "wallclock_s": 0.1 * step, "train_loss": 7.0 / step ** 0.5}
            if step % 50 == 0:
                row["val_loss"] = row["train_loss"] + 0.1
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"step": steps + 1, "wallclock_s": 99.0, "train_loss": float("nan")}) + "\n")


def test_loss_axis_is_logarithmic_and_resumes_are_marked(tmp_path):
    import matplotlib.pyplot as plt

    _metrics(tmp_path)
    record_resume(tmp_path, 100, 10.0)
    record_resume(tmp_path, 150, 15.0)
    fig = loss_figure(tmp_path / "metrics.jsonl")
    try:
        by_step, by_time = fig.axes
        assert by_step.get_yscale() == by_time.get_yscale() == "log"
        marks = [line.get_xdata()[0] for line in by_step.get_lines() if line.get_linestyle() == "--"]
        assert marks == [100, 150]
        assert [line.get_xdata()[0] for line in by_time.get_lines() if line.get_linestyle() == "--"] == [10.0, 15.0]
        assert "resumed" in [t.get_text() for t in by_step.get_legend().get_texts()]
    finally:
        plt.close(fig)
    png = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_resume_from_an_earlier_step_drops_the_later_marks(tmp_path):
    record_resume(tmp_path, 100)
    record_resume(tmp_path, 200)
    record_resume(tmp_path, 150)  # resumed from the checkpoint at 150: the resume at 200 is gone
    assert [r["step"] for r in read_resumes(tmp_path)] == [100, 150]
    (tmp_path / "resumes.json").write_text("{not json")
    assert read_resumes(tmp_path) == []


@pytest.mark.parametrize("content", ["", json.dumps({"step": 0, "wallclock_s": 0.0}) + "\n"])
def test_a_run_without_losses_still_plots(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 0


def test_resumed_training_records_its_resume(tmp_path):
    from cs336.config_io import apply_overrides
    from cs336.presets import smoke_config
    from cs336.train import run

    base = ["train.max_steps=4", "train.eval_interval=4", "train.log_interval=2", "train.checkpoint_interval=4",
            "train.sample_tokens=0", "data.corpus_mb=0.1", "train.progress=false", f"train.out_dir={tmp_path / 'r'}"]
    run(apply_overrides(smoke_config(), base))
    assert read_resumes(tmp_path / "r") == []
    run(apply_overrides(smoke_config(), [*base, "train.max_steps=6"]), resume=True)
    assert [r["step"] for r in read_resumes(tmp_path / "r")] == [4]
