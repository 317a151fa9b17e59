"""Train-step time and memory per rank: one process, 2-rank DDP and 2-rank FSDP2 on gloo (CPU).

    PYTHONPATH=. python bench/fsdp_step.py [--steps 10] [--d-model 256] [--layers 4]

Each mode trains the same model on the same global batch (one torch thread per rank) with the
project's AdamW; it prints the median step time, its ratio to the one-process step measured in
the same run, each rank's bytes of parameters + gradients + AdamW state (local shards under FSDP)
next to ``cs336.memory.per_rank_memory``, and the ranks' peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _cfg(args):
    from cs336.config import ModelConfig

    return ModelConfig(vocab_size=2048, context_length=args.seq, d_model=args.d_model, num_layers=args.layers,
                       num_heads=4, d_ff=args.d_model * 8 // 3 // 16 * 16, kernels="native")


def _worker(rank, world, port, mode, args, report):
    from torch.nn.parallel import DistributedDataParallel

    from cs336.model import TransformerLM
    from cs336.nn_utils import clip_gradients
    from cs336.optim import AdamW
    from cs336.parallel import clip_global, local, shard_model

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TransformerLM.from_config(_cfg(args))
    step_model = model
    if mode == "fsdp":
        shard_model(model, torch.device("cpu"), "none")
    elif mode == "ddp":
        step_model = DistributedDataParallel(model)
    opt = AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2048, (args.batch, args.seq), generator=g)
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        loss = (step_model.loss if mode != "ddp" else (lambda a, b: step_model.module.loss(a, b)))(x[rows], x[rows])
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        clip_global(params, 1.0) if mode == "fsdp" else clip_gradients(params, 1.0)
        opt.step()
        if i == args.steps + 1:
            break
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    owned = sum(4 * local(p).numel() for p in model.parameters())
    grads = sum(4 * local(p.grad).numel() for p in model.parameters())
    state = sum(4 * local(s[k]).numel() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    with open(f"{report}.{mode}.{rank}", "w") as fh:
        json.dump({"step_s": statistics.median(times), "param_grad_state_bytes": owned + grads + state,
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, fh)
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    from cs336.memory import per_rank_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    cfg = _cfg(args)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "r")
        rows = {}
        for mode, world in (("single", 1), ("ddp", 2), ("fsdp", 2)):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(world, port, mode, args, report), nprocs=world, join=True)
            rows[mode] = [json.load(open(f"{report}.{mode}.{r}")) for r in range(world)]
    base = rows["single"][0]["step_s"]
    print(f"model d_model={cfg.d_model} layers={cfg.num_layers} d_ff={cfg.d_ff} vocab={cfg.vocab_size}; "
          f"global batch {args.batch} x {args.seq} tokens; {torch.__version__}")
    print("| mode | ranks | step ms (median) | vs one process | params+grads+AdamW per rank | accounting "
          "| peak RSS per rank |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, res in rows.items():
        world = len(res)
        mem = per_rank_memory(cfg, 1, args.seq, provider="native", parallel="fsdp" if mode == "fsdp" else "ddp",
                              world_size=world)
        counted = mem["parameters"] + mem["gradients"] + mem["adamw.m"] + mem["adamw.v"]
        step = max(r["step_s"] for r in res)
        print(f"| {mode} | {world} | {1e3 * step:.1f} | {step / base:.2f} | "
              f"{res[0]['param_grad_state_bytes'] / 2**20:.1f} MiB | {counted / 2**20:.1f} MiB | "
              f"{max(r['peak_rss_bytes'] for r in res) / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
