"""Config dataclasses, presets, TOML/JSON loading, typed overrides and the generated CLI flags."""

import argparse
import json

import pytest
import torch

from cs336.cli import add_config_arguments, config_from_args, field_docs
from cs336.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainLoopConfig,
)
from cs336.config_io import apply_overrides, config_from_dict, config_to_dict, load_config, read_text_file
from cs336.presets import TINYSTORIES_TOKENS, preset, tinystories_config


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_dict_round_trip_is_json_and_exact():
    cfg = apply_overrides(TrainConfig(), ["optim.betas=0.8,0.99", "data.special_tokens=<|a|>,<|b|>",
                                          "train.context_length=64", "optim.min_lr=1e-5"])
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    back = config_from_dict(d)
    assert back == cfg
    assert back.optim.betas == (0.8, 0.99) and isinstance(back.optim.betas, tuple)
    assert back.data.special_tokens == ("<|a|>", "<|b|>")


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(TrainConfig(), ["optim.lr=1e-4", "model.d_model=1_024", "model.num_heads=8",
                                          "train.compile=yes", "data.tokenizer_sample_mb=none",
                                          "optim.warmup_iters=1e2", "train.wandb_group=null"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.d_model == 1024 and isinstance(cfg.model.d_model, int)
    assert cfg.train.compile is True
    assert cfg.data.tokenizer_sample_mb is None
    assert cfg.optim.warmup_iters == 100 and isinstance(cfg.optim.warmup_iters, int)
    assert cfg.train.wandb_group is None


@pytest.mark.parametrize("item, fragment", [
    ("optim.lrr=1", "valid optim keys: lr, min_lr"),
    ("nosuch.x=1", "valid sections: model, optim, data, train"),
    ("model.d_model=abc", "model.d_model expects an integer"),
    ("model.d_model=1.5", "model.d_model expects an integer"),
    ("train.compile=maybe", "expects true or false"),
    ("optim.betas=0.9", "expects 2 values"),
    ("lr=3", "section.field=value"),
])
def test_bad_overrides_name_the_key_and_the_choices(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("build, fragment", [
    (lambda: ModelConfig(d_model=100, num_heads=3), "not divisible"),
    (lambda: TrainConfig(train=TrainLoopConfig(context_length=4096)), "exceeds model.context_length"),
    (lambda: DataConfig(train_text="a.txt"), "go together"),
    (lambda: DataConfig(train_tokens="a.bin", valid_tokens="b.bin"), "tokenizer_dir"),
    (lambda: DataConfig(dataset="tinystories", train_text="a", valid_text="b"), "conflicts"),
    (lambda: OptimConfig(lr=1e-4, min_lr=1e-3), "exceeds optim.lr"),
    (lambda: TrainLoopConfig(device="gpu"), "valid choices: auto, cpu"),
    (lambda: TrainLoopConfig(batch_size=0), "train.batch_size must be a positive integer"),
    (lambda: TrainConfig(model=ModelConfig(vocab_size=200)), "below 256 bytes"),
])
def test_validation_rejects_inconsistent_values(build, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build()


def test_floor_lr_defaults_to_a_tenth_of_lr():
    assert OptimConfig(lr=2e-3).floor_lr == pytest.approx(2e-4)
    assert OptimConfig(lr=2e-3, min_lr=0.0).floor_lr == 0.0


def test_tinystories_preset_matches_the_handout():
    cfg = tinystories_config()
    m = cfg.model
    assert (m.vocab_size, m.context_length, m.d_model, m.d_ff, m.num_layers, m.num_heads, m.rope_theta) == \
        (10_000, 256, 512, 1344, 4, 16, 10_000.0)
    assert (cfg.train.max_steps, cfg.train.batch_size, TINYSTORIES_TOKENS) == (10_000, 128, 327_680_000)
    assert tinystories_config(batch_size=64).train.max_steps == 20_000
    with pytest.raises(ConfigError, match="valid choices: default, tinystories, smoke"):
        preset("nano")


def test_load_toml_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 5e-4\nbetas = [0.85, 0.9]\n[model]\nd_model = 64\nnum_heads = 2\n')
    cfg = load_config(toml)
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.85, 0.9) and cfg.model.d_model == 64
    assert cfg.model.num_layers == TrainConfig().model.num_layers  # untouched keys keep the base
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"train": {"max_steps": 7, "out_dir": "x"}}))
    assert load_config(js).train.max_steps == 7


@pytest.mark.parametrize("name, text, fragment", [
    ("bad.toml", "[optim\nlr=1", "does not parse"),
    ("bad.json", '{"optim": {"lr": "fast"}}', "optim.lr expects a number"),
    ("unk.toml", "[optim]\nlearning_rate = 1.0\n", "unknown optim key 'learning_rate'"),
    ("flat.json", '{"lr": 1.0}', "unknown section 'lr'"),
    ("c.yaml", "optim: {}", "use a .toml or .json file"),
])
def test_bad_config_files_name_the_file(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory; pass a TOML or JSON file"):
        load_config(tmp_path)


def test_cli_flags_are_generated_and_layered(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[optim]\nlr = 1e-3\nweight_decay = 0.5\n")
    cfg = parse(["--preset", "smoke", "--config", str(file), "--optim.lr=3e-4", "--max-steps", "9",
                 "--train.compile", "--kernels", "torch", "--model.d_model", "64"])
    assert cfg.optim.lr == 3e-4            # flag over file
    assert cfg.optim.weight_decay == 0.5   # file over preset
    assert cfg.model.num_layers == 1       # preset over defaults
    assert cfg.train.max_steps == 9 and cfg.train.compile is True
    assert cfg.model.kernels == "torch" and cfg.model.d_model == 64


def test_cli_conflicting_spellings_are_an_error():
    with pytest.raises(ConfigError, match="conflicts"):
        parse(["--max-steps", "5", "--train.max_steps=6"])
    assert parse(["--max-steps", "5", "--train.max_steps=5"]).train.max_steps == 5


def test_cli_unknown_flag_exits(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--optim.learning_rate=1"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_lists_fields_with_their_docs(capsys):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--optim.weight_decay" in out and "Decoupled weight decay" in out
    assert "--model.rope_theta" in out
    assert field_docs(TrainLoopConfig)["keep_last"].startswith("Checkpoints kept")


def _command_parsers():
    from cs336 import accounting, experiments, profile, sweep, train

    run_parser = experiments.build_parser()._subparsers._group_actions[0].choices["run"]
    return {"train": (train.build_parser(), []), "profile": (profile.build_parser(), []),
            "accounting": (accounting.build_parser(), []), "sweep": (sweep.build_parser(), []),
            "experiments run": (run_parser, ["lr"])}


@pytest.mark.parametrize("command", ["train", "profile", "accounting", "sweep", "experiments run"])
def test_every_command_reads_the_same_flags(command):
    """One config path: each CLI parses the same preset, model preset, file and field flags into
    the same TrainConfig (the command's default preset aside)."""
    from cs336.cli import parse_args

    parser, positional = _command_parsers()[command]
    argv = [*positional, "--preset", "smoke", "--model", "gpt2-small", "--model.num_layers=2",
            "--optim.lr=1e-3", "--batch-size", "4", "--context-length", "64", "--kernels", "torch",
            "--train.grad_accum_steps=2", "--device", "cpu"]
    cfg = config_from_args(parse_args(parser, argv))
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.context_length) == (768, 2, 64)
    assert cfg.model.kernels == "torch" and cfg.optim.lr == 1e-3
    assert (cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.device) == (4, 2, "cpu")
    assert cfg.train.max_steps == preset("smoke").train.max_steps


def test_kernel_choices_are_the_seams():
    """The config accepts exactly the backends cs336.ops can resolve."""
    from cs336 import ops

    for name in ops.BACKENDS:
        assert ModelConfig(kernels=name).kernels == name
        try:
            ops.resolve_backend(name)
        except ops.BackendError as exc:  # known but not runnable here (triton without CUDA)
            assert "unknown" not in str(exc)
    with pytest.raises(ConfigError, match="valid choices: " + ", ".join(ops.BACKENDS)):
        ModelConfig(kernels="fastest")


def test_one_device_resolver(monkeypatch):
    import torch

    from cs336.hardware import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ConfigError, match="--train.device='cuda:1' but no CUDA device is visible"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="--device='tpu'; valid choices: auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_config_file_that_is_not_text(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"a": torch.zeros(3)}, ckpt)
    with pytest.raises(ConfigError, match=r"--config .* is a zip archive \(a checkpoint\?\)"):
        read_text_file("--config", ckpt)
    (tmp_path / "latin1.json").write_bytes('{"x": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_text_file("--config", tmp_path / "latin1.json")
    (tmp_path / "ok.json").write_text('{"x": 1}')
    assert read_text_file("--config", tmp_path / "ok.json") == '{"x": 1}'


@pytest.mark.parametrize("value, fragment", [
    (",", "holds an empty token"),
    ("<|endoftext|>,", "holds an empty token"),
    (",<|endoftext|>", "holds an empty token"),
    ("<|endoftext|>,<|endoftext|>", "lists a token twice"),
    ("<|endoftext|>,a", "'a' is a single byte"),
    ("<|endoftext|>,<\udcff>", "holds a lone surrogate"),  # the command-line byte 0xff
])
def test_bad_special_tokens_are_refused_when_the_config_is_built(value, fragment):
    """Special tokens the tokenizer trainer refuses fail with the config, before the corpus is
    written and a tokenizer trained (they failed in train_bpe, after both)."""
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(TrainConfig(), [f"data.special_tokens={value}"])


def test_one_byte_special_token_is_allowed_with_a_tokenizer_dir():
    """With data.tokenizer_dir no tokenizer is trained; a one-byte special token maps to its
    byte's id."""
    cfg = apply_overrides(TrainConfig(), ["data.tokenizer_dir=tok", "data.special_tokens=<|endoftext|>,\n"])
    assert cfg.data.special_tokens == ("<|endoftext|>", "\n")


@pytest.mark.parametrize("item", ["train.out_dir=", "train.out_dir= ", "data.data_dir=", "data.tokenizer_dir="])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(item):
    """``--out-dir=`` (an unset shell variable) trained into the current directory when it was empty."""
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} is empty, which would mean the current directory; pass a path"):
        apply_overrides(TrainConfig(), [item])
    assert apply_overrides(TrainConfig(), ["train.out_dir=none"]).train.out_dir is None


def test_a_config_that_is_a_device_or_pipe_is_not_called_missing(tmp_path):
    import os

    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_config(path)
        with pytest.raises(ConfigError, match="is not a regular file"):
            read_text_file("--config", path)
