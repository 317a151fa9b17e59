"""Decode text from a trained model: temperature, nucleus (top-p) sampling, greedy at T=0.

    python -m cs336.generate --run runs/DIR --prompt "Once upon a time" --max-tokens 256 \
        --temperature 0.7 --top-p 0.9 --seed 0
    python -m cs336.generate --checkpoint runs/DIR/checkpoints/step_000600.pt --prompt "..."

``--run DIR`` loads the checkpoint named by ``DIR/checkpoints/latest``; ``--checkpoint FILE``
loads that file (its run directory, two levels up, supplies the tokenizer unless
``--tokenizer-dir`` is given). The model configuration comes from the checkpoint itself.
Generation stops after ``--max-tokens`` new tokens or at the first ``<|endoftext|>``, which is
not printed. Prompts longer than the model's context are cut to their last ``context_length``
tokens, and so is the running sequence (no KV cache: each step reruns the window).

Nucleus sampling follows Holtzman et al. (2020): keep the smallest set of most probable tokens
whose total probability reaches ``top_p``, renormalize, sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cs336 import nn_utils
from cs336.config import ConfigError

EOT = "<|endoftext|>"


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the nucleus of ``probs`` (..., V) and renormalize over the last dim.

    A token is kept when the probability mass of the tokens ranked above it is below ``top_p``;
    the most probable token is always kept. Ties are ranked by ``torch.sort`` (stable, by id).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return probs / probs.sum(dim=-1, keepdim=True)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> int:
    """Pick the next id from a (V,) logit vector; temperature 0 is argmax (greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = top_p_filter(nn_utils.softmax(logits / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, *,
                 temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop token, if reached, is not included)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    device = next(model.parameters()).device
    ctx = model.context_length
    seq = list(prompt_ids)
    out: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor(seq[-ctx:], dtype=torch.long, device=device)[None]  # (1, T)
            logits = model(window)[0, -1]  # (V,)
            tok = next_token(logits, temperature, top_p, generator)
            if eos_id is not None and tok == eos_id:
                break
            out.append(tok)
            seq.append(tok)
    finally:
        model.train(was_training)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int | None = None) -> str:
    """Prompt plus continuation as text, sampling with a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos_id = tokenizer.token_id(EOT.encode("utf-8")) if hasattr(tokenizer, "token_id") else None
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature=temperature,
                       top_p=top_p, eos_id=eos_id, generator=generator)
    return prompt + tokenizer.decode(ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="run directory (uses checkpoints/latest)")
    src.add_argument("--checkpoint", metavar="FILE", help="checkpoint file")
    p.add_argument("--tokenizer-dir", metavar="DIR", help="vocab.json + merges.txt (default: the run's)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return p


def main(argv: list[str] | None = None) -> int:
    from cs336.checkpoint import CheckpointError
    from cs336.run_dir import RunDirError, load_for_inference

    args = build_parser().parse_args(argv)
    try:
        if args.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
        if args.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
        if not 0.0 < args.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
        model, tokenizer = load_for_inference(run_dir=args.run, checkpoint=args.checkpoint,
                                              tokenizer_dir=args.tokenizer_dir, device=args.device)
        text = generate_text(model, tokenizer, args.prompt, args.max_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except (ConfigError, CheckpointError, RunDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
    return 0


if __name__ == "__main__":
    main()
