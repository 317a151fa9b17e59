"""The leaderboard recipe measured on real English text: baseline, each switch alone, all together.

    python bench/bench_recipe.py [--corpus ../shared/corpora/shakespeare.txt] [--seeds 0,1]
                                 [--steps 100] [--json bench/recipe.json]

Every run is ``cs336.train.run`` (so the switches go through the real config, trainer, builder and
loss) of one model size (the demo model: d_model 128, 4 layers, 4 heads, d_ff 384, context 128,
vocab 1024) for the same steps and batch (8 x 128 tokens), hence the same tokens, on one CPU
thread (100 steps = 102,400 tokens by default: about a minute on an idle core). The corpus is
split 90/10 into train and validation text; the first run trains the BPE tokenizer and encodes
both (the other runs reuse its files). Validation loss is the plain cross-entropy (no z-loss)
over the first 32 batches (32,768 tokens) of the validation text. "Equal wall-clock": the full recipe again, for the
steps the baseline's time buys at the recipe's speed (schedule sized to it), the speed ratio
measured interleaved in one process (``throughput``): the machine's load changes between runs.

Each switch alone uses the recipe's value: ``optim.name=muon`` (lr = AdamW's: update RMS
matched), ``model.qk_norm``, ``model.tie_embeddings``, ``model.logit_softcap=30``,
``train.z_loss=1e-4``, ``model.zero_init_residual``, ``optim.schedule=wsd`` (decay over the last
20%, to min_lr). The corpus is not generated text: a missing corpus is refused (exit 2).
Prints one table (mean and per-seed figures) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"

BASE = ["model.vocab_size=1024", "model.context_length=128", "model.d_model=128", "model.num_layers=4",
        "model.num_heads=4", "model.d_ff=384", "model.kernels=native", "optim.lr=3e-3", "optim.warmup_iters=20",
        "train.batch_size=8", "train.eval_batches=32", "train.log_interval=20", "train.sample_tokens=0",
        "train.progress=false", "train.threads=1", "train.device=cpu", "train.keep_last=1",
        "train.diverge_loss_factor=none"]
SWITCHES = {
    "baseline": [],
    "muon": ["optim.name=muon"],
    "qk_norm": ["model.qk_norm=true"],
    "tie_embeddings": ["model.tie_embeddings=true"],
    "logit_softcap": ["model.logit_softcap=30"],
    "z_loss": ["train.z_loss=1e-4"],
    "zero_init_residual": ["model.zero_init_residual=true"],
    "wsd": ["optim.schedule=wsd"],
}
SWITCHES["all"] = [o for name, opts in SWITCHES.items() for o in opts]


def split_corpus(corpus: Path, work: Path) -> tuple[Path, Path]:
    """90/10 train/valid split of ``corpus`` at a line boundary."""
    text = corpus.read_text(encoding="utf-8")
    cut = text.index("\n", int(0.9 * len(text))) + 1
    train, valid = work / "train.txt", work / "valid.txt"
    train.write_text(text[:cut], encoding="utf-8")
    valid.write_text(text[cut:], encoding="utf-8")
    return train, valid


def one_run(out: Path, overrides: list[str]) -> dict:
    """Train one configuration; (final val loss, tokens/s, seconds, eval curve)."""
    from cs336.config import TrainConfig
    from cs336.config_io import apply_overrides
    from cs336.train import run

    cfg = apply_overrides(TrainConfig(), [*overrides, f"train.out_dir={out}"])
    start = time.perf_counter()
    summary = run(cfg)
    if summary.get("interrupted") or summary["steps"] != cfg.train.max_steps:
        raise SystemExit(f"bench_recipe: the run in {out} stopped after {summary['steps']} of "
                         f"{cfg.train.max_steps} steps; its figures would not be comparable")
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"val_loss": summary["final_val_loss"], "tokens_per_s": summary["tokens_per_s"],
            "train_seconds": summary["wallclock_s"], "run_seconds": seconds, "curve": curve}


def throughput(overrides_by_name: dict[str, list[str]], rounds: int = 3, steps: int = 10) -> dict[str, float]:
    """Training tokens/s of each configuration, measured interleaved (round-robin, ``rounds`` x
    ``steps`` timed steps each after one warm-up step) in this process, so that the machine's
    load, which changes from minute to minute, falls on all of them alike."""
    import torch

    from cs336 import ops
    from cs336.config import TrainConfig
    from cs336.config_io import apply_overrides
    from cs336.model import TransformerLM
    from cs336.nn_utils import clip_gradients
    from cs336.optim import build_optimizer

    torch.set_num_threads(1)
    setups = {}
    for name, overrides in overrides_by_name.items():
        cfg = apply_overrides(TrainConfig(), overrides)
        torch.manual_seed(0)
        model = TransformerLM.from_config(cfg.model)
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.context_length + 1))
        setups[name] = (cfg, model, build_optimizer(model, cfg.optim), tokens[:, :-1], tokens[:, 1:])
    seconds = dict.fromkeys(setups, 0.0)

    def step(cfg, model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        model.loss(x, y, z_loss=cfg.train.z_loss).backward()
        clip_gradients(model.parameters(), cfg.optim.grad_clip)
        with ops.use_backend(cfg.model.kernels):
            opt.step()

    for setup in setups.values():
        step(*setup)
    for _ in range(rounds):
        for name, setup in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(*setup)
            seconds[name] += time.perf_counter() - start
    return {name: rounds * steps * setups[name][0].train.batch_size * setups[name][0].context_length / sec
            for name, sec in seconds.items()}


def compare(corpus: Path, seeds: list[int], steps: int, work: Path, only: tuple[str, ...] = (), say=print) -> dict:
    train_txt, valid_txt = split_corpus(corpus, work)
    common = [*BASE, f"train.max_steps={steps}", f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}"]
    data: list[str] = [f"data.train_text={train_txt}", f"data.valid_text={valid_txt}",
                       "data.tokenizer_sample_mb=none"]
    results: dict[str, dict[int, dict]] = {}
    for name, opts in SWITCHES.items():
        if only and name not in only and name != "baseline":
            continue
        for seed in seeds:
            out = work / f"{name}-seed{seed}"
            r = one_run(out, [*common, *data, *opts, f"train.seed={seed}"])
            if data[0].startswith("data.train_text"):  # later runs reuse the first run's tokens
                data = [f"data.train_tokens={out / 'data' / 'train.bin'}",
                        f"data.valid_tokens={out / 'data' / 'valid.bin'}", f"data.tokenizer_dir={out / 'tokenizer'}"]
            results.setdefault(name, {})[seed] = r
            say(f"{name:>20} seed {seed}: val loss {r['val_loss']:.4f}  {r['tokens_per_s']:,.0f} tokens/s  "
                f"{r['train_seconds']:.1f} s")
    rates = throughput({name: [*BASE, *SWITCHES[name]] for name in ("baseline", "all")}) if "all" in results else {}
    if rates:
        say(f"interleaved tokens/s: baseline {rates['baseline']:,.0f}, all {rates['all']:,.0f}")
        results["interleaved_tokens_per_s"] = rates
    for seed in seeds if rates else ():  # the recipe at the baseline's wall-clock
        wall_steps = max(1, round(steps * rates["all"] / rates["baseline"]))
        out = work / f"all-wallclock-seed{seed}"
        r = one_run(out, [*BASE, *data, *SWITCHES["all"], f"train.max_steps={wall_steps}",
                          f"train.eval_interval={wall_steps}", f"train.checkpoint_interval={wall_steps}",
                          f"train.seed={seed}"])
        r["steps"] = wall_steps
        results.setdefault("all (equal wall-clock)", {})[seed] = r
        say(f"{'all (equal wall-clock)':>20} seed {seed}: {wall_steps} steps, val loss {r['val_loss']:.4f}")
    return results


def table(results: dict, steps: int) -> str:
    base = statistics.mean(r["val_loss"] for r in results["baseline"].values())
    lines = ["| run | val loss (mean) | per seed | vs baseline | tokens/s (mean) | train s (mean) |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for name, by_seed in results.items():
        if name == "interleaved_tokens_per_s":
            continue
        losses = [r["val_loss"] for r in by_seed.values()]
        mean = statistics.mean(losses)
        lines.append(f"| {name} | {mean:.4f} | {', '.join(f'{v:.4f}' for v in losses)} | "
                     f"{100 * (mean - base) / base:+.2f}% | "
                     f"{statistics.mean(r['tokens_per_s'] for r in by_seed.values()):,.0f} | "
                     f"{statistics.mean(r['train_seconds'] for r in by_seed.values()):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_recipe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"UTF-8 English text (default {DEFAULT_CORPUS})")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--only", default="", help="comma list of runs to make (default: all of them)")
    p.add_argument("--json", type=Path, help="write the per-seed results here")
    p.add_argument("--work-dir", type=Path, help="keep the run directories here (default: a temp dir)")
    args = p.parse_args(argv)
    if not args.corpus.is_file():
        print(f"bench_recipe: corpus {args.corpus} not found; pass --corpus PATH to a real English text "
              "(the comparison refuses generated text)", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if len(seeds) < 1 or args.steps < 4:
        print("bench_recipe: need at least one seed and --steps >= 4", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_recipe.") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = compare(args.corpus, seeds, args.steps, work, tuple(o for o in args.only.split(",") if o))
    text = table(results, args.steps)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": seeds, "corpus": str(args.corpus),
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
