"""Export a trained run to a Hugging Face ``transformers`` Llama (or Qwen3) directory.

    python -m cs336.export --run runs/DIR --out-dir hf/DIR
    python -m cs336.export --checkpoint runs/DIR/checkpoints/step_000600.pt --out-dir hf/DIR

The CS336 model (pre-norm RMSNorm, SwiGLU, RoPE, no biases, untied LM head) is a Llama with as many
key/value heads as query heads; ``qk_norm`` exports as ``Qwen3ForCausalLM``, ``tie_embeddings`` as
``tie_word_embeddings``. Deviation: CS336's RoPE rotates adjacent pairs ``(x[2k], x[2k+1])``, HF's
``rotate_half`` rotates ``(x[k], x[k + d/2])`` by the same angle; reordering each head's q and k rows
as ``[0, 2, ..., d-2, 1, 3, ..., d-1]`` turns one into the other and leaves ``q . k`` unchanged.
What Llama cannot express (post-norm, no RMSNorm, NoPE, the SiLU FFN, ``logit_softcap``) raises
``ExportError`` naming the switch. Sources: HF ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` and
``tokenizers`` byte-level BPE. Files written, parameter names and how the directory is replaced:
README, "Decoding and export to Hugging Face".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cs336.cli import add_deprecated_alias
from cs336.config import ConfigError, ModelConfig
from cs336.fileio import WriteError, atomic_write_text, current_umask, writing
from cs336.inference import add_source_arguments
from cs336.interrupt import deferred_signals

if TYPE_CHECKING:
    import torch

MARKER = "cs336_export.json"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", MARKER)


class ExportError(ValueError):
    """The model or the destination cannot be exported; the message says why and what to do."""


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ``ExportError`` naming every ablation switch that Llama cannot express."""
    problems = []
    if cfg.use_post_norm:
        problems.append("model.use_post_norm=true (Llama blocks are pre-norm)")
    if cfg.remove_rmsnorm:
        problems.append("model.remove_rmsnorm=true (Llama normalizes with RMSNorm)")
    if cfg.remove_rope:
        problems.append("model.remove_rope=true (Llama uses RoPE; NoPE has no equivalent)")
    if cfg.ffn_type != "swiglu":
        problems.append(f"model.ffn_type={cfg.ffn_type} (Llama's MLP is SwiGLU)")
    if cfg.logit_softcap is not None:
        problems.append(f"model.logit_softcap={cfg.logit_softcap:g} (of the transformers classes only "
                        "Gemma 2/3 cap final logits, and their blocks differ from Llama's)")
    if problems:
        raise ExportError("this model cannot be exported as a Llama: " + "; ".join(problems)
                          + ". Only the default architecture (these switches off) exports")


def rope_permutation(d_head: int) -> torch.Tensor:
    """Row order within a head that maps adjacent-pair RoPE to half-split RoPE."""
    import torch

    return torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])


def _permute_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """weight (H * d_head, d_model): reorder each head's rows by ``rope_permutation``."""
    d_head = weight.shape[0] // num_heads
    per_head = weight.view(num_heads, d_head, -1)  # (H, d_head, d_model)
    return per_head[:, rope_permutation(d_head)].reshape(weight.shape)


def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under Llama names (q and k rows permuted per head), contiguous on the CPU."""
    cfg: ModelConfig = model.config
    check_exportable(cfg)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["token_embeddings.weight"], "model.norm.weight": sd["ln_final.weight"]}
    if not cfg.tie_embeddings:  # tied: transformers points lm_head at embed_tokens itself
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "self_attn.q_proj.weight"] = _permute_heads(sd[ours + "attn.q_proj.weight"], cfg.num_heads)
        out[theirs + "self_attn.k_proj.weight"] = _permute_heads(sd[ours + "attn.k_proj.weight"], cfg.num_heads)
        out[theirs + "self_attn.v_proj.weight"] = sd[ours + "attn.v_proj.weight"]
        out[theirs + "self_attn.o_proj.weight"] = sd[ours + "attn.output_proj.weight"]
        out[theirs + "mlp.gate_proj.weight"] = sd[ours + "ffn.w1.weight"]
        out[theirs + "mlp.up_proj.weight"] = sd[ours + "ffn.w3.weight"]
        out[theirs + "mlp.down_proj.weight"] = sd[ours + "ffn.w2.weight"]
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln2.weight"]
        if cfg.qk_norm:  # (d_head,) gains over the permuted head dims
            for qk in ("q", "k"):
                norm = sd[ours + f"attn.{qk}_norm.weight"]
                out[theirs + f"self_attn.{qk}_norm.weight"] = norm[rope_permutation(cfg.d_head)]
    return {k: v.contiguous().clone() for k, v in out.items()}


def llama_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: int | None) -> dict:
    """``config.json`` of the equivalent ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with qk_norm).

    ``rope_theta`` is written both at the top level (transformers 4.x) and in
    ``rope_parameters`` (5.x)."""
    qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
             "layer_types": ["full_attention"] * cfg.num_layers} if cfg.qk_norm else {}
    return {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        **qwen3,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def generation_config(cfg: ModelConfig, eos_id: int | None) -> dict:
    """Sampling defaults of ``python -m cs336.generate`` (T=0.7, top-p 0.9). No ``max_length``:
    transformers warns on every ``generate(max_new_tokens=...)`` when one is set; the context
    length is ``max_position_embeddings`` in config.json."""
    return {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
            "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def tokenizer_json(tokenizer) -> dict:
    """HF ``tokenizers`` file for our byte-level BPE: GPT-2's pre-tokenizer regex and byte
    alphabet, our merges in order, special tokens as added tokens (never split, never merged)."""
    from cs336.tokenizer.gpt2_files import token_to_str

    vocab = {token_to_str(tok): idx for idx, tok in sorted(tokenizer.vocab.items())}
    specials = []
    for text in tokenizer.special_tokens:
        idx = tokenizer.token_id(text.encode("utf-8"))
        specials.append({"id": idx, "content": text, "single_word": False, "lstrip": False,
                         "rstrip": False, "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab,
            "merges": [f"{token_to_str(a)} {token_to_str(b)}" for a, b in tokenizer.merges],
        },
    }


def tokenizer_config(cfg: ModelConfig, eos: str | None) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.context_length}


def _eos(model, tokenizer) -> tuple[str | None, int | None]:
    """The end-of-sequence token: the tokenizer's first special token (the run's
    ``data.special_tokens[0]``, the one ``cs336.generate`` stops at), with its id."""
    if not tokenizer.special_tokens:
        return None, None
    eos = tokenizer.special_tokens[0]
    eos_id = tokenizer.token_id(eos.encode("utf-8"))
    if eos_id is None or eos_id >= model.config.vocab_size:
        raise ExportError(f"the tokenizer gives {eos} id {eos_id}, outside the model's vocab_size "
                          f"{model.config.vocab_size}; export with the tokenizer the run was trained with")
    return eos, eos_id


def _is_previous_export(path: Path) -> bool:
    return (path / MARKER).is_file() and all(p.name in FILES for p in path.iterdir())


def _is_cwd(path: Path) -> bool:
    try:
        return path.is_dir() and path.resolve() == Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        return False


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out-dir {out} is a file; pass a directory path")
    if _is_cwd(out):  # the export is renamed onto the destination: it cannot be the directory we are in
        raise ExportError(f"--out-dir {out} is the current directory, which the export would replace "
                          "by renaming a new one onto it; pass a new directory, e.g. --out-dir hf")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise ExportError(f"--out-dir {out} exists, is not empty and is not an earlier export of "
                          "cs336.export; pass a new directory (or empty this one)")


def export_hf(model, tokenizer, out: str | os.PathLike, *, source: dict | None = None) -> Path:
    """Write the HF directory for ``model`` (a ``TransformerLM``) and ``tokenizer`` to ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.is_symlink():  # write where the link points: renaming onto the link would replace it by a directory
        out = out.resolve()
    cfg: ModelConfig = model.config
    check_exportable(cfg)
    _check_destination(out)
    eos, eos_id = _eos(model, tokenizer)
    tensors = llama_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = _temp_dir(out, ".tmp")
    try:
        def dump(name: str, obj: dict) -> None:
            atomic_write_text(tmp / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

        weights = tmp / "model.safetensors"
        with writing(weights):
            save_file(tensors, str(weights), metadata={"format": "pt"})
            os.chmod(weights, 0o666 & ~current_umask())  # safetensors writes it 0600
        dump("config.json", llama_config(cfg, dtype, eos_id))
        dump("generation_config.json", generation_config(cfg, eos_id))
        dump("tokenizer.json", tokenizer_json(tokenizer))
        dump("tokenizer_config.json", tokenizer_config(cfg, eos))
        dump(MARKER, {"format": "cs336-hf-export", "version": 1, **(source or {})})
        with writing(out):
            _replace_dir(tmp, out)
    except WriteError as exc:  # name the file of the destination, not of the hidden temp dir
        shutil.rmtree(tmp, ignore_errors=True)
        name = Path(os.fsdecode(exc.filename))
        raise WriteError(exc.errno, exc.strerror, str(out / name.name) if name.parent == tmp else str(name)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


TEMP_TAG = "cs336-export"
"""Temporary directories beside ``out`` are ``.{out.name}.cs336-export-{pid}-{random}{.tmp|.old}``."""


def _temp_dir(out: Path, suffix: str) -> Path:
    """A new directory beside ``out`` named for this process, readable per the umask (``mkdtemp``
    makes it 0700)."""
    with deferred_signals():
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{TEMP_TAG}-{os.getpid()}-",
                                    suffix=suffix))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temporary directories an export to ``out`` left when it was killed (SIGKILL,
    power loss): those whose process no longer exists. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{TEMP_TAG}-(\d+)-[^/]*\.(tmp|old)")
    for entry in out.parent.glob(f".{glob.escape(out.name)}.{TEMP_TAG}-*"):
        found = pattern.fullmatch(entry.name)
        if found and entry.is_dir() and not _alive(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an empty or earlier-export ``out`` is removed only once ``new``
    is complete (renamed aside, then deleted)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = _temp_dir(out, ".old")
    os.replace(out, old / "dir")
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / "dir", out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.export", description=__doc__.split("\n\n")[0])
    add_source_arguments(p)
    p.add_argument("--out-dir", metavar="HF_DIR", help="directory to write (required)")
    add_deprecated_alias(p, "--out", "--out-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # before the torch import: --help stays fast
    if args.out_dir is None:  # not argparse's required=: the old spelling --out also counts
        parser.error("the following arguments are required: --out-dir")
    from cs336.checkpoint import CheckpointError
    from cs336.cli import run_cli
    from cs336.inference import load_for_inference
    from cs336.run_dir import RunDirError

    def body() -> None:
        if not args.out_dir.strip():
            raise ExportError("--out-dir is empty; pass the directory to write")
        _check_destination(Path(args.out_dir))
        model, tokenizer = load_for_inference(run_dir=args.run, checkpoint=args.checkpoint,
                                              tokenizer_dir=args.tokenizer_dir)
        source = {"run": args.run, "checkpoint": args.checkpoint, "tokenizer_dir": args.tokenizer_dir}
        out = export_hf(model, tokenizer, args.out_dir,
                        source={k: str(Path(v).resolve()) for k, v in source.items() if v})
        print(f"wrote {out}: {', '.join(FILES)} ({model.num_parameters():,} parameters)")

    run_cli(body, user_errors=(ExportError, ConfigError, CheckpointError, RunDirError),
            on_interrupt=lambda: f"{args.out_dir} was not changed (the export is written aside and renamed "
                                 "into place only when complete)")
    return 0


if __name__ == "__main__":
    main()
