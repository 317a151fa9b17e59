"""Loading a trained model back for inference (decoding, export) from a run directory or a
checkpoint file written by ``python -m cs336.train``.

The model configuration comes from the checkpoint itself (``extra["config"]``, the resolved
``TrainConfig``); the tokenizer from the run directory (``DIR/tokenizer``) unless a tokenizer
directory is given; a tokenizer with ids beyond the model's embedding rows is refused (it
belongs to another model). Checkpoints load with ``weights_only=True`` (``cs336.checkpoint``),
read and SHA-256-checked once.

Kernels: the run's ``model.kernels`` is a training choice (the weights do not depend on it). The
model decodes with it when it runs here, on ``device``; otherwise (a run trained with ``triton``
on a GPU, loaded on a machine without CUDA) with ``auto``, which picks what runs here
(``inference_kernels``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cs336.config import ConfigError, TrainConfig
from cs336.config_io import config_from_dict
from cs336.run_dir import RunDir, RunDirError


def load_for_inference(*, run_dir: str | None = None, checkpoint: str | None = None,
                       tokenizer_dir: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a run directory or a checkpoint file."""
    from cs336.checkpoint import CheckpointError, load_checkpoint_full, read_checkpoint
    from cs336.checkpoint_integrity import SHARDED_META
    from cs336.hardware import resolve_device
    from cs336.model import TransformerLM
    from cs336.preflight import check_tokenizer_fits
    from cs336.tokenizer import Tokenizer

    if (run_dir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of a run directory (--run) or a checkpoint (--checkpoint)")
    if run_dir is not None:
        rd = RunDir(run_dir)
        if rd.path.exists() and not rd.path.is_dir():
            raise RunDirError(f"--run {rd.path} is a file; pass a run directory (a training run's --out-dir), "
                              "or the file as --checkpoint")
        if not rd.path.is_dir():
            raise RunDirError(f"run directory {rd.path} does not exist; pass the --out-dir of a training run")
        if not rd.checkpoints.is_dir():
            raise RunDirError(f"--run {rd.path} has no checkpoints/ directory, so it is not a run directory "
                              "of python -m cs336.train; pass a training run's --out-dir, or --checkpoint FILE")
        ckpt = rd.latest_checkpoint()
        if ckpt is None:
            raise RunDirError(f"{rd.checkpoints} has no 'latest' checkpoint; train first or pass --checkpoint")
    else:
        assert checkpoint is not None  # exactly one of run_dir and checkpoint, checked above
        ckpt = Path(checkpoint)
        rd = RunDir(ckpt.resolve().parent.parent)
    if ckpt.is_dir() and not (ckpt / SHARDED_META).is_file():  # a sharded (fsdp) checkpoint is a directory
        raise CheckpointError(f"--checkpoint {ckpt} is a directory; pass a checkpoint file (e.g. "
                              f"{ckpt}/checkpoints/step_*.pt) or use --run {ckpt}")
    state = read_checkpoint(ckpt)
    cfg_dict = state.get("extra", {}).get("config")
    if cfg_dict is None:
        raise CheckpointError(f"{ckpt} carries no training config (it was not written by "
                              "python -m cs336.train); load it with cs336.checkpoint.load_checkpoint "
                              "into a model you build yourself")
    try:
        cfg: TrainConfig = config_from_dict(cfg_dict)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}: its stored config is invalid ({exc})") from None
    torch_device = resolve_device(device, "--device")
    model_cfg = dataclasses.replace(cfg.model, kernels=inference_kernels(cfg.model.kernels, torch_device))
    model = TransformerLM.from_config(model_cfg, device=torch_device)
    load_checkpoint_full(ckpt, model, payload=state)
    model.eval()
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else rd.tokenizer
    vocab, merges = tok_dir / "vocab.json", tok_dir / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        fix = ("pass a --tokenizer-dir that holds them" if tokenizer_dir else
               "pass --tokenizer-dir DIR, the tokenizer the model was trained with")
        raise RunDirError(f"no tokenizer at {tok_dir} (vocab.json + merges.txt); {fix}")
    tokenizer = Tokenizer.from_files(str(vocab), str(merges), list(cfg.data.special_tokens))
    try:
        check_tokenizer_fits(max(tokenizer.vocab) + 1, cfg.model.vocab_size,
                             tokenizer=f"the tokenizer in {tok_dir}", model=f"the model of {ckpt}",
                             fix="it belongs to another model; pass the --tokenizer-dir the model "
                                 "was trained with")
    except ValueError as exc:
        raise RunDirError(str(exc)) from None
    return model, tokenizer


def inference_kernels(trained_with: str, device) -> str:
    """The kernel provider to decode with on ``device``: the run's own when it runs there, else
    ``auto`` (triton on CUDA, native elsewhere)."""
    from cs336 import ops

    if trained_with == "triton" and device.type != "cuda" and not ops.triton_interpreted():
        return "auto"
    return trained_with if ops.backend_available(trained_with) else "auto"


def add_source_arguments(parser) -> None:
    """The flags that name a trained model: ``--run DIR`` or ``--checkpoint FILE`` (one of them,
    required) and ``--tokenizer-dir`` (default: the run's), as ``load_for_inference`` takes them."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="run directory (uses checkpoints/latest)")
    src.add_argument("--checkpoint", metavar="FILE", help="checkpoint written by cs336.train")
    parser.add_argument("--tokenizer-dir", metavar="DIR", help="vocab.json + merges.txt (default: the run's)")
