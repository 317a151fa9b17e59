"""Decode text from a trained model: temperature, top-p, greedy at T=0, a KV cache, prompts batched.

    python -m cs336.generate --run runs/DIR --prompt "Once upon a time" --max-tokens 256 \
        --temperature 0.7 --top-p 0.9 --seed 0
    python -m cs336.generate --checkpoint runs/DIR/checkpoints/step_000600.pt --prompt "..."
    python -m cs336.generate --run runs/DIR --prompt-file prompts.txt --temperature 0
    python -m cs336.generate --run runs/DIR --prompt "Once" --num-samples 4 --seed 0 --jsonl

The reference (``kv_cache=False``) reruns the model over the last ``context_length`` tokens for every
new token; the KV cache path (default) prefills once and decodes one token per step, refilling the
cache from the window at every step past the context length so that it equals the reference.
``generate_batch`` left-pads rows, masks the padding and gives each row its own positions, so greedy
ids equal those of each row decoded alone (unless two logits tie within rounding), and seeded
per-row generators draw what the reference draws. Nucleus sampling follows Holtzman et al. (2020).
Flags, stop token, output order and batching: README, "Decoding and export to Hugging Face".
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cs336.config import ConfigError
from cs336.inference import add_source_arguments

if TYPE_CHECKING:
    import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the nucleus of ``probs`` (..., V) and renormalize over the last dim.

    A token is kept when the probability mass of the tokens ranked above it is below ``top_p``;
    the most probable token is always kept. Ties are ranked by ``torch.sort`` (stable, by id).
    """
    import torch

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


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generators: Sequence[torch.Generator | None] | None = None) -> list[int]:
    """Next ids of a (B, V) batch of logits: argmax at temperature 0, else a nucleus sample per
    row from ``generators[i]`` (None: the global RNG). One device-to-host copy for all rows: the
    ids (greedy) or the filtered probabilities, which are then sampled on the CPU."""
    import torch

    from cs336 import nn_utils

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return torch.argmax(logits, dim=-1).tolist()
    # Shift before dividing: the top logit becomes 0 and the others <= 0, so a tiny temperature
    # sends them to -inf (greedy in the limit), never to +inf - inf = nan; a temperature below
    # float32's smallest normal (which would round to 0, and 0 / 0 = nan) divides as that one.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    scaled = shifted / max(temperature, torch.finfo(torch.float32).tiny)
    probs = top_p_filter(nn_utils.softmax(scaled, dim=-1), top_p).cpu()  # (B, V)
    gens = generators if generators is not None else [None] * len(probs)
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, gens, strict=True)]


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> int:
    """Pick the next id from a (V,) logit vector; temperature 0 is argmax (greedy)."""
    return next_tokens(logits[None], temperature, top_p, [generator])[0]


Picker = Callable[[Sequence[int], "torch.Tensor"], list[int]]  # (rows, logits (B, V)) -> next ids


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _recompute(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, pick: Picker,
               row: int, eos_id: int | None) -> list[int]:
    """The reference: one full forward over the last ``context_length`` tokens per new token."""
    import torch

    ctx, device = cast(int, model.context_length), _device(model)
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        window = torch.tensor(seq[-ctx:], dtype=torch.long, device=device)[None]  # (1, T)
        tok = pick([row], model(window)[:, -1])[0]
        if eos_id is not None and tok == eos_id:
            break
        out.append(tok)
        seq.append(tok)
    return out


def _prefill(model: torch.nn.Module, cache, seqs: list[list[int]]) -> torch.Tensor:
    """Reset ``cache`` and run each row's window (last ``max_len`` tokens), left-padded to a
    common width; returns the last position's logits (B, V)."""
    import torch

    windows = [s[-cache.max_len:] for s in seqs]
    width = max(len(w) for w in windows)
    pads = [width - len(w) for w in windows]
    # Padding columns hold id 0: any id does, they are masked out as keys.
    tokens = torch.tensor([[0] * p + w for p, w in zip(pads, windows, strict=True)], dtype=torch.long,
                          device=_device(model))  # (B, width)
    cache.reset(pads)
    return model(tokens, kv_cache=cache)[:, -1]


def _decode_cached(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                   pick: Picker, eos_id: int | None) -> list[list[int]]:
    """All rows in one KV cache: prefill, then one token per step (module docstring)."""
    import torch

    if not hasattr(model, "new_kv_cache"):
        raise TypeError(f"{type(model).__name__} has no KV cache (new_kv_cache); pass kv_cache=False")
    outs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return outs
    seqs = [list(p) for p in prompts]
    rows = list(range(len(prompts)))  # original index of each cache row
    cache = cast(Any, model).new_kv_cache(len(rows))  # duck-typed: hasattr checked above
    logits = _prefill(model, cache, seqs)  # (B, V)
    for step in range(max_new_tokens):
        kept, new_ids = [], []
        for i, (row, tok) in enumerate(zip(rows, pick(rows, logits), strict=True)):
            if eos_id is not None and tok == eos_id:
                continue
            outs[row].append(tok)
            seqs[row].append(tok)
            kept.append(i)
            new_ids.append(tok)
        if not kept or step == max_new_tokens - 1:
            break
        if len(kept) < len(rows):
            cache.keep_rows(kept)
            rows = [rows[i] for i in kept]
        if cache.length < cache.max_len:
            tokens = torch.tensor(new_ids, dtype=torch.long, device=_device(model))[:, None]  # (B, 1)
            logits = model(tokens, kv_cache=cache)[:, -1]
        else:
            logits = _prefill(model, cache, [seqs[row] for row in rows])
    return outs


def generate_batch(model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, *,
                   temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
                   generators: Sequence[torch.Generator | None] | None = None,
                   kv_cache: bool = True) -> list[list[int]]:
    """New token ids after each prompt, in input order (a row's stop token is not included).

    ``generators[i]`` draws row i's samples (None: the global RNG). ``kv_cache=False`` decodes
    each row alone with the recompute reference.
    """
    import torch

    prompts = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ValueError(f"{which} encodes to no tokens; give a non-empty prompt")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts; give one per prompt")

    def pick(rows: Sequence[int], logits: torch.Tensor) -> list[int]:
        return next_tokens(logits, temperature, top_p, [generators[r] for r in rows] if generators else None)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if kv_cache:
                return _decode_cached(model, prompts, max_new_tokens, pick, eos_id)
            return [_recompute(model, p, max_new_tokens, pick, i, eos_id) for i, p in enumerate(prompts)]
    finally:
        model.train(was_training)


def generate_ids(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, *,
                 temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None, kv_cache: bool = True) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop token, if reached, is not included)."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature,
                          top_p=top_p, eos_id=eos_id, generators=[generator],
                          kv_cache=kv_cache)[0]


def stop_id(tokenizer) -> int | None:
    """The id decoding stops at: the tokenizer's first special token (the run's
    ``data.special_tokens[0]``, which separates its documents), None without one."""
    specials = getattr(tokenizer, "special_tokens", None)
    if not specials or not hasattr(tokenizer, "token_id"):
        return None
    return tokenizer.token_id(specials[0].encode("utf-8"))


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                   kv_cache: bool = True) -> list[str]:
    """Each prompt plus its continuation as text; row i samples with a generator seeded
    ``seed + i`` (the global RNG when ``seed`` is None)."""
    import torch

    generators = None
    if seed is not None:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    ids = generate_batch(model, [tokenizer.encode(p) for p in prompts], max_new_tokens,
                         temperature=temperature, top_p=top_p, eos_id=stop_id(tokenizer),
                         generators=generators, kv_cache=kv_cache)
    return [p + tokenizer.decode(out) for p, out in zip(prompts, ids, strict=True)]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int | None = None, kv_cache: bool = True) -> str:
    """Prompt plus continuation as text, sampling with a generator seeded by ``seed``."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, kv_cache=kv_cache)[0]


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line (``\\n`` or ``\\r\\n``); an empty line or file is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--prompt-file {path} does not exist; pass a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--prompt-file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({exc.strerror})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    prompts = [line.removesuffix("\r") for line in lines]
    if not prompts:
        raise ConfigError(f"--prompt-file {path} is empty; write one prompt per line")
    for lineno, prompt in enumerate(prompts, start=1):
        if not prompt:
            raise ConfigError(f"{path}:{lineno}: empty line; every line is one prompt, so remove it")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_arguments(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Once upon a time", help="text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="one prompt per line, decoded together")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=16,
                   help="most rows decoded together; each batch's results print when it is done")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (reproducible output; result i uses seed + i)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="rerun the whole window for every token (the reference; slow)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per result")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the torch import: --help stays fast
    from cs336.checkpoint import CheckpointError
    from cs336.cli import run_cli
    from cs336.run_dir import RunDirError

    printed = [0]
    run_cli(lambda: _generate(args, printed),
            user_errors=(ConfigError, CheckpointError, RunDirError, ValueError),
            on_interrupt=lambda: f"{printed[0]} result(s) were printed before it")
    return 0


def result_batches(num_prompts: int, num_samples: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """(prompt index, sample index) of every result, in output order, ``batch_size`` at a time;
    built lazily, so memory does not grow with ``num_prompts * num_samples``."""
    rows = ((i, j) for i in range(num_prompts) for j in range(num_samples))
    while batch := list(itertools.islice(rows, batch_size)):
        yield batch


GENERATOR_BYTES = 5_200
"""Host memory of one seeded ``torch.Generator`` (its Mersenne Twister state), one per row."""


def decode_bytes(model, rows: int) -> int:
    """About how much memory decoding ``rows`` rows together takes: per row the KV cache
    (keys and values of every layer over the context), the prefill's logits and widest activations
    over the window, and its generator."""
    cfg = model.config
    item = next(model.parameters()).element_size()
    ctx = cfg.context_length
    per_row = (2 * cfg.num_layers * ctx * cfg.d_model * item  # KV cache
               + ctx * (cfg.vocab_size + 3 * cfg.d_ff) * item  # prefill logits, FFN activations
               + GENERATOR_BYTES)
    return rows * per_row


def check_decode_memory(model, rows: int, device) -> None:
    """Refuse a batch whose decoding memory (``decode_bytes``) exceeds the device's total."""
    from cs336 import hardware

    total = hardware.device_memory(device)
    need = decode_bytes(model, rows)
    if total is not None and need > total:
        raise ConfigError(f"--batch-size {rows} decodes {rows} rows at once, which needs about {need / 1e9:.3g} GB "
                          f"(KV cache, prefill logits, generators) but {device} has {total / 1e9:.3g} GB; "
                          f"lower --batch-size (at most about {max(1, rows * total // need):,})")


def _generate(args: argparse.Namespace, printed: list[int]) -> None:
    from cs336.inference import load_for_inference

    _check_args(args)
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else [args.prompt]
    model, tokenizer = load_for_inference(run_dir=args.run, checkpoint=args.checkpoint,
                                          tokenizer_dir=args.tokenizer_dir, device=args.device)
    check_decode_memory(model, min(args.batch_size, len(prompts) * args.num_samples), _device(model))
    single = len(prompts) * args.num_samples == 1
    start = 0
    for chunk in result_batches(len(prompts), args.num_samples, args.batch_size):
        seed = None if args.seed is None else args.seed + start
        texts = generate_texts(model, tokenizer, [prompts[i] for i, _ in chunk], args.max_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=seed,
                               kv_cache=not args.no_kv_cache)
        for (i, j), text in zip(chunk, texts, strict=True):
            if args.jsonl:
                print(json.dumps({"prompt_index": i, "sample": j, "text": text}, ensure_ascii=False))
            elif single:
                print(text)
            else:
                print(f"=== prompt {i}" + (f", sample {j}" if args.num_samples > 1 else "") + " ===")
                print(text)
        sys.stdout.flush()
        start += len(chunk)
        printed[0] = start


if __name__ == "__main__":
    main()
