"""Decoding: top-p math, greedy determinism, the stop token, seeded sampling, and the CLI."""

import json

import pytest
import torch

from cs336.checkpoint import save_checkpoint
from cs336.config import ModelConfig, TrainConfig, config_to_dict
from cs336.generate import generate_ids, main, next_token, top_p_filter
from cs336.model import TransformerLM
from cs336.run_dir import RunDir
from cs336.tokenizer.gpt2_files import save_vocab_merges
from cs336.tokenizer.train_bpe import train_bpe


def test_top_p_keeps_the_smallest_nucleus_and_renormalizes():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])
    out = top_p_filter(p, 0.8)  # 0.5 + 0.3 reaches 0.8: keep ids 1 and 3
    torch.testing.assert_close(out, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    out = top_p_filter(p, 0.81)  # needs the third token too
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    torch.testing.assert_close(top_p_filter(p, 1.0), p)
    torch.testing.assert_close(top_p_filter(p, 1e-6), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_top_p_works_on_batches_rowwise():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    out = top_p_filter(p, 0.75)
    torch.testing.assert_close(out, torch.tensor([[0.7 / 0.9, 0.2 / 0.9, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(p, 0.0)


def test_temperature_zero_is_argmax_and_low_temperature_concentrates():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    assert next_token(logits, 0.0, 1.0) == 1
    g = torch.Generator().manual_seed(0)
    draws = [next_token(logits, 0.01, 1.0, g) for _ in range(50)]
    assert draws == [1] * 50
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, 1.0, 1.0, g) for _ in range(200)}
    assert {1, 2} <= draws  # at T=1 the two close logits are both drawn


class ScriptedLM(torch.nn.Module):
    """Logits that put all mass on script[len(seen) - prompt_len]: a model with known output."""

    def __init__(self, script, vocab=16, context_length=8):
        super().__init__()
        self.script, self.vocab, self.context_length = script, vocab, context_length
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[-1])
        logits = torch.full((1, x.shape[-1], self.vocab), -1e9)
        logits[0, -1, self.script[len(self.calls) - 1]] = 0.0
        return logits


def test_generation_stops_at_the_end_token_and_windows_long_prompts():
    model = ScriptedLM([5, 7, 3, 9])
    out = generate_ids(model, list(range(12)), 10, temperature=0.0, eos_id=3, kv_cache=False)
    assert out == [5, 7]
    assert model.calls == [8, 8, 8]  # a 12-token prompt is cut to the 8-token context
    model = ScriptedLM([5, 7, 3, 9])
    assert generate_ids(model, [1], 4, temperature=0.0, eos_id=None, kv_cache=False) == [5, 7, 3, 9]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TransformerLM(vocab_size=50, context_length=16, d_model=32, num_layers=1, num_heads=2,
                         d_ff=64, rope_theta=10000.0)


def test_greedy_is_deterministic_and_equals_an_argmax_loop(tiny_model):
    prompt = [1, 2, 3]
    a = generate_ids(tiny_model, prompt, 20, temperature=0.0)
    b = generate_ids(tiny_model, prompt, 20, temperature=0.0)
    assert a == b and len(a) == 20
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(tiny_model(torch.tensor([seq[-16:]]))[0, -1].argmax()))
    assert a == seq[3:]


def test_seed_reproduces_samples_and_different_seeds_differ(tiny_model):
    def sample(seed):
        return generate_ids(tiny_model, [4], 30, temperature=1.5, top_p=1.0,
                            generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as cs336.train writes it: config, tokenizer, checkpoint, latest pointer."""
    root = tmp_path_factory.mktemp("run")
    text = root / "t.txt"
    text.write_text(("the cat sat on the mat. the dog ran.<|endoftext|>" * 50))
    vocab, merges = train_bpe(str(text), 280, ["<|endoftext|>"])
    rd = RunDir(root / "run")
    rd.create()
    save_vocab_merges(vocab, merges, rd.vocab_path, rd.merges_path)
    cfg = TrainConfig(model=ModelConfig(vocab_size=280, context_length=16, d_model=32, num_layers=1,
                                        num_heads=2, d_ff=64))
    rd.write_config(cfg)
    torch.manual_seed(0)
    model = TransformerLM.from_config(cfg.model)
    path = rd.checkpoint_path(3)
    save_checkpoint(model, None, 3, path, config=config_to_dict(cfg))
    rd.mark_latest(path, keep_last=2)
    return rd


def test_cli_generates_from_a_run_dir_reproducibly(run_dir, capsys):
    args = ["--run", str(run_dir.path), "--prompt", "the cat", "--max-tokens", "12", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    assert first.startswith("the cat")
    main(["--checkpoint", str(run_dir.checkpoint_path(3)), "--prompt", "the cat", "--max-tokens", "12",
          "--temperature", "0"])
    assert capsys.readouterr().out.startswith("the cat")


@pytest.mark.parametrize("args, fragment", [
    (["--run", "/nonexistent/run"], "does not exist"),
    (["--checkpoint", "/nonexistent/x.pt"], "does not exist"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_cli_errors_are_one_line_and_exit_2(run_dir, capsys, args, fragment):
    if "--run" not in args and "--checkpoint" not in args:
        args = ["--run", str(run_dir.path)] + args
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_checkpoint_without_config_is_refused(run_dir, tmp_path, capsys):
    model = TransformerLM.from_config(TrainConfig().model)
    bare = tmp_path / "ckpt" / "bare.pt"
    save_checkpoint(model, None, 0, bare)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(bare), "--tokenizer-dir", str(run_dir.tokenizer)])
    assert "carries no training config" in capsys.readouterr().err
