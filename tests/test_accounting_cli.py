"""python -m cs336.accounting: JSON figures, the human table, and errors (exit 2, no traceback)."""

import json
import subprocess
import sys

import pytest

from cs336 import accounting, flops, hardware
from cs336.presets import model_preset


def _run_json(capsys, *args):
    accounting.main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_json_fields_match_library(capsys):
    out = _run_json(capsys, "--model", "gpt2-xl", "--batch-size", "2")
    cfg = model_preset("gpt2-xl")
    assert out["params"] == flops.num_params(cfg) == sum(out["params_by_component"].values())
    assert out["forward_flops"] == flops.total_forward_flops(cfg, 2)
    assert out["forward_flops"] == sum(out["forward_flops_by_component"].values())
    assert out["memory_bytes"] == sum(out["memory_by_component"].values())
    assert "max_batch_size" not in out and "training_time_s" not in out


def test_context_length_memory_and_time(capsys):
    out = _run_json(capsys, "--model", "gpt2-xl", "--context-length", "16384", "--hardware", "h100",
                    "--steps", "1000", "--mfu", "0.4")
    cfg = model_preset("gpt2-xl")
    cfg.context_length = 16384
    default = _run_json(capsys, "--model", "gpt2-xl")
    # 16x the tokens of the 1,024 default, and attention's T^2 terms grow faster still.
    assert out["forward_flops"] > 16 * default["forward_flops"]
    assert out["forward_flops"] == flops.total_forward_flops(cfg, 1)
    spec = hardware.DEVICES["h100-sxm"]
    assert out["device_memory_bytes"] == spec.memory
    assert out["max_batch_size"] == flops.max_batch_size(cfg, spec.memory)
    slower = _run_json(capsys, "--model", "gpt2-xl", "--context-length", "16384", "--hardware", "h100",
                       "--steps", "2000", "--mfu", "0.2")
    assert slower["training_time_s"] == pytest.approx(4 * out["training_time_s"])  # twice the steps at half the MFU
    # gpt2-xl at 16k tokens, by hand: 2 x 16384 x 2.05e9 matmul weights = 6.7e13 FLOPs, plus
    # attention 48 layers x 4 x 16384^2 x 1600 = 8.2e13; x3 with the backward = 4.5e14 per step;
    # 1000 steps at 40% of 989 TFLOP/s: about 1,140 s.
    assert 1050 < out["training_time_s"] < 1250


def test_device_memory_parsing(capsys):
    out = _run_json(capsys, "--model", "gpt2-small", "--device-memory", "80GiB")
    assert out["device_memory_bytes"] == 80 * 2**30
    assert out["max_batch_size"] == flops.max_batch_size(model_preset("gpt2-small"), 80 * 2**30)
    assert accounting.parse_bytes("1.5GB") == 1_500_000_000
    assert accounting.parse_bytes("4096") == 4096
    assert accounting.parse_bytes("8e10") == accounting.parse_bytes("8E10") == 8 * 10**10
    assert accounting.parse_bytes(".5GiB") == 2**29


def test_overrides_apply(capsys):
    out = _run_json(capsys, "--model", "tinystories", "--model.d_model=256", "--model.num_heads", "8",
                    "--model.ffn_type=silu")
    assert out["params_by_component"]["layers.*.attn.q_proj.weight"] == 4 * 256 * 256  # 4 layers of 256 x 256
    assert "layers.*.ffn.w3.weight" not in out["params_by_component"]


def test_tied_head_is_counted_once(capsys):
    untied = _run_json(capsys, "--model", "tinystories")
    tied = _run_json(capsys, "--model", "tinystories", "--model.tie_embeddings=true")
    assert "lm_head.weight" not in tied["params_by_component"]
    assert untied["params"] - tied["params"] == 10_000 * 512
    assert tied["forward_flops"] == untied["forward_flops"]  # the head's matmul still runs
    accounting.main(["--model", "tinystories", "--model.tie_embeddings=true"])
    assert "the LM head is the embedding, counted once" in capsys.readouterr().out


def test_human_table_lists_components_and_total(capsys):
    accounting.main(["--model", "tinystories", "--hardware", "a100", "--steps", "5000", "--batch-size", "32"])
    text = capsys.readouterr().out
    for needle in ("layers.*.attn.q_proj.weight", "lm_head", "attn.qk", "ffn.w3",
                   "activations.layers.*.attn.softmax", "largest batch", "5,000 steps on a100"):
        assert needle in text
    assert f"({flops.num_params(model_preset('tinystories')):,})" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt3"], "invalid choice: 'gpt3' (choose from 'tinystories', 'gpt2-small'"),
    (["--model.num_heads=7"], "not divisible by model.num_heads=7"),
    (["--model.d_model=48", "--model.num_heads=16"], "head dim d_model/num_heads = 3 is odd"),
    (["--batch-size", "0"], "train.batch_size must be a positive integer"),
    (["--model.num_layers=-1"], "model.num_layers must be a positive integer"),
    (["--device-memory", "lots"], "--device-memory 'lots' is not a size"),
    (["--device-memory", "1.5.5GB"], "--device-memory '1.5.5GB' is not a size"),  # these three: a traceback
    (["--device-memory", "."], "--device-memory '.' is not a size"),
    (["--device-memory", "1e999"], "--device-memory '1e999' is too large"),
    (["--mfu", "0"], "--mfu must lie in (0, 1], got 0.0"),  # was accepted while unused (no --steps)
    (["--mfu", "nan"], "--mfu must lie in (0, 1], got nan"),
    (["--hardware", "tpu"], "valid choices: h100-sxm"),
    (["--steps", "10"], "--steps needs --hardware"),
    (["--model.ffn_type=relu"], "valid choices: swiglu, silu"),
    (["--d-model", "64"], "unknown arguments: --d-model (did you mean --model.d_model"),
])
def test_bad_input_exits_2(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        accounting.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "cs336.accounting", "--model", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice: 'nope'" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "cs336.accounting", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--context-length" in done.stdout and "--model.d_model" in done.stdout
