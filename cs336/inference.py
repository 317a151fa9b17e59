"""Loading a trained model back for inference (decoding, export) from a run directory or a
checkpoint file written by ``python -m cs336.train``.

The model configuration comes from the checkpoint itself (``extra["config"]``, the resolved
``TrainConfig``); the tokenizer from the run directory (``DIR/tokenizer``) unless a tokenizer
directory is given; a tokenizer with ids beyond the model's embedding rows is refused (it
belongs to another model). Checkpoints load with ``weights_only=True`` (``cs336.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

from cs336.config import ConfigError, TrainConfig
from cs336.config_io import config_from_dict
from cs336.hardware import resolve_device
from cs336.run_dir import RunDir, RunDirError
from cs336.run_guard import check_tokenizer_fits_model


def load_for_inference(*, run_dir: str | None = None, checkpoint: str | None = None,
                       tokenizer_dir: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a run directory or a checkpoint file."""
    from cs336.checkpoint import CheckpointError, load_checkpoint_full
    from cs336.model import TransformerLM
    from cs336.tokenizer import Tokenizer

    if (run_dir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of a run directory (--run) or a checkpoint (--checkpoint)")
    if run_dir is not None:
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise RunDirError(f"run directory {rd.path} does not exist; pass the --out-dir of a training run")
        ckpt = rd.latest_checkpoint()
        if ckpt is None:
            raise RunDirError(f"{rd.checkpoints} has no 'latest' checkpoint; train first or pass --checkpoint")
    else:
        assert checkpoint is not None  # exactly one of the two, checked above
        ckpt = Path(checkpoint)
        rd = RunDir(ckpt.resolve().parent.parent)
    state = load_checkpoint_full(ckpt)
    cfg_dict = state.get("extra", {}).get("config")
    if cfg_dict is None:
        raise CheckpointError(f"{ckpt} carries no training config (it was not written by "
                              "python -m cs336.train); load it with cs336.checkpoint.load_checkpoint "
                              "into a model you build yourself")
    try:
        cfg: TrainConfig = config_from_dict(cfg_dict)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}: its stored config is invalid ({exc})") from None
    model = TransformerLM.from_config(cfg.model, device=resolve_device(device, "--device"))
    load_checkpoint_full(ckpt, model)
    model.eval()
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else rd.tokenizer
    vocab, merges = tok_dir / "vocab.json", tok_dir / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise RunDirError(f"no tokenizer at {tok_dir} (vocab.json + merges.txt); pass --tokenizer-dir")
    tokenizer = Tokenizer.from_files(str(vocab), str(merges), list(cfg.data.special_tokens))
    try:
        check_tokenizer_fits_model(max(tokenizer.vocab) + 1, cfg.model.vocab_size,
                                   tokenizer=f"the tokenizer in {tok_dir}", model=f"the model of {ckpt}",
                                   fix="it belongs to another model; pass the --tokenizer-dir the model "
                                       "was trained with")
    except ValueError as exc:
        raise RunDirError(str(exc)) from None
    return model, tokenizer


def add_source_arguments(parser) -> None:
    """The flags that name a trained model: ``--run DIR`` or ``--checkpoint FILE`` (one of them,
    required) and ``--tokenizer-dir`` (default: the run's), as ``load_for_inference`` takes them."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="run directory (uses checkpoints/latest)")
    src.add_argument("--checkpoint", metavar="FILE", help="checkpoint written by cs336.train")
    parser.add_argument("--tokenizer-dir", metavar="DIR", help="vocab.json + merges.txt (default: the run's)")
