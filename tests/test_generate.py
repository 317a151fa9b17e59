"""Decoding: top-p math, greedy determinism, the stop token, seeded sampling, the KV cache against
the recompute reference (past the context length too), batched prompts, and the CLI."""

import dataclasses
import json

import pytest
import torch

from cs336 import ops
from cs336.checkpoint import save_checkpoint
from cs336.config import ModelConfig, TrainConfig
from cs336.config_io import config_to_dict
from cs336.generate import generate_batch, generate_ids, main, next_token, next_tokens, top_p_filter
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


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 5e-324])
def test_a_tiny_temperature_samples_the_top_logit_instead_of_failing(temperature):
    # logits / T overflowed to inf for T below ~1e-38 (inf - inf = nan: multinomial raised).
    logits = torch.tensor([[0.1, 2.0, 1.9, -3.0], [4.0, 4.0, -1.0, 0.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for _ in range(20):
        first, second = next_tokens(logits, temperature, 1.0, gens)
        assert first == 1 and second in (0, 1)  # a tie at the top stays a draw between the tied ids


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


KV_CONFIGS = {
    "base": dict(num_layers=2, num_heads=2),
    "post-norm": dict(num_layers=2, num_heads=4, use_post_norm=True),
    "nope": dict(num_layers=1, num_heads=2, remove_rope=True),
    "silu-ffn": dict(num_layers=3, num_heads=1, ffn_type="silu"),
}


def _lm(seed=0, context_length=16, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, context_length=context_length, d_model=32, num_layers=2, num_heads=2,
               d_ff=64, rope_theta=10000.0, kernels="torch")
    return TransformerLM(**{**cfg, **overrides})


@pytest.mark.parametrize("name", list(KV_CONFIGS))
@pytest.mark.parametrize("prompt_len", [3, 20])  # 20 > context 16: the prompt is cut first
def test_kv_cache_greedy_equals_recompute_past_the_context(name, prompt_len):
    model = _lm(**KV_CONFIGS[name])
    prompt = torch.randint(0, 50, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = generate_ids(model, prompt, 30, temperature=0.0)  # 3 + 30 > 16: the window slides
    reference = generate_ids(model, prompt, 30, temperature=0.0, kv_cache=False)
    assert len(cached) == 30 and cached == reference
    assert len(set(cached)) > 3  # not a degenerate constant output


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_kv_cache_samples_equal_recompute_under_a_seed(top_p):
    model = _lm()

    def run(kv_cache):
        return generate_ids(model, [4, 9], 25, temperature=1.2, top_p=top_p, kv_cache=kv_cache,
                            generator=torch.Generator().manual_seed(5))

    assert run(True) == run(False)


def test_kv_decoding_runs_under_the_model_backend(monkeypatch):
    seen = []
    original = ops.attention

    def spy(q, k, v, causal=True):
        seen.append((ops.get_backend(), q.shape[-2], k.shape[-2], causal))
        return original(q, k, v, causal)

    monkeypatch.setattr(ops, "attention", spy)
    model = _lm(num_layers=1)
    generate_ids(model, [1, 2, 3], 3, temperature=0.0)
    # prefill (3 queries, causal), then one query over 4 and 5 cached keys (not causal)
    assert seen == [("torch", 3, 3, True), ("torch", 1, 4, False), ("torch", 1, 5, False)]


def test_batched_greedy_equals_each_prompt_alone_with_per_row_stops():
    model = _lm(num_layers=2, num_heads=4)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (5, 1, 12, 20)]
    unstopped = [generate_ids(model, p, 20, temperature=0.0) for p in prompts]
    eos = unstopped[1][6]  # every row stops where this id first appears in its output
    alone = [generate_ids(model, p, 20, temperature=0.0, eos_id=eos) for p in prompts]
    batched = generate_batch(model, prompts, 20, temperature=0.0, eos_id=eos)
    assert batched == alone
    for full, stopped in zip(unstopped, alone, strict=True):
        assert stopped == full[:full.index(eos)] if eos in full else stopped == full
    assert len({len(a) for a in alone}) > 1  # the rows really stopped at different steps


def test_batched_samples_equal_alone_with_per_row_generators():
    model = _lm()
    prompts = [[1, 2, 3], [7], [5, 5, 5, 5, 5, 5, 5, 5]]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]

    batched = generate_batch(model, prompts, 20, temperature=1.0, top_p=0.9, generators=gens())
    alone = [generate_ids(model, p, 20, temperature=1.0, top_p=0.9, generator=g)
             for p, g in zip(prompts, gens(), strict=True)]
    assert batched == alone
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        generate_batch(model, [[1], []], 3)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(model, prompts, 3, generators=gens()[:1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as cs336.train writes it: config, tokenizer, checkpoint, latest pointer."""
    root = tmp_path_factory.mktemp("run")
    text = root / "t.txt"
    text.write_text("the cat sat on the mat. the dog ran.<|endoftext|>" * 50)
    vocab, merges = train_bpe(str(text), 280, ["<|endoftext|>"])
    rd = RunDir(root / "run")
    rd.create()
    save_vocab_merges(vocab, merges, rd.vocab_path, rd.merges_path)
    cfg = TrainConfig(model=ModelConfig(vocab_size=len(vocab), context_length=16, d_model=32, num_layers=1,
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
    (["--temperature", "nan"], "--temperature must be >= 0 and finite"),
    (["--temperature", "inf"], "--temperature must be >= 0 and finite"),
    (["--top-p", "nan"], "--top-p must be in"),
    (["--seed", "-1"], "--seed must be in"),
    (["--run", "RUN/config.json"], "is a file; pass a run directory"),
    (["--run", "RUN/tokenizer"], "has no checkpoints/ directory"),
    (["--checkpoint", "RUN"], "is a directory; pass a checkpoint file"),
    # the advice was "pass --tokenizer-dir" to someone who just had
    (["--tokenizer-dir", "RUN/checkpoints"], "(vocab.json + merges.txt); pass a --tokenizer-dir that holds them"),
])
def test_cli_errors_are_one_line_and_exit_2(run_dir, capsys, args, fragment):
    args = [a.replace("RUN", str(run_dir.path)) for a in args]
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


def test_cli_prompt_file_decodes_in_input_order(run_dir, tmp_path, capsys):
    prompts = ["the cat", "a dog ran on the mat and the cat sat", "the"]
    path = tmp_path / "prompts.txt"
    path.write_text("\r\n".join(prompts) + "\r\n", encoding="utf-8")
    common = ["--run", str(run_dir.path), "--max-tokens", "20", "--temperature", "0"]
    singles = []
    for prompt in prompts:
        main(common + ["--prompt", prompt, "--jsonl"])
        singles.append(json.loads(capsys.readouterr().out)["text"])
    main(common + ["--prompt-file", str(path), "--jsonl", "--batch-size", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2]
    assert [r["text"] for r in rows] == singles
    main(common + ["--prompt-file", str(path)])
    out = capsys.readouterr().out
    assert out.index("=== prompt 0 ===") < out.index("=== prompt 1 ===") < out.index("=== prompt 2 ===")


def test_cli_num_samples_seeds_each_sample(run_dir, capsys):
    common = ["--run", str(run_dir.path), "--prompt", "the cat", "--max-tokens", "15",
              "--temperature", "1.0", "--top-p", "0.95", "--jsonl"]
    main(common + ["--num-samples", "3", "--seed", "7"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2)]
    for j, row in enumerate(rows):
        main(common + ["--seed", str(7 + j), "--no-kv-cache"])
        assert json.loads(capsys.readouterr().out)["text"] == row["text"]
    assert len({r["text"] for r in rows}) > 1


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("", "is empty"),
    ("the cat\n\nthe dog\n", "prompts.txt:2: empty line"),
])
def test_cli_prompt_file_errors(run_dir, tmp_path, capsys, content, fragment):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir.path), "--prompt-file", str(path)])
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_tokenizer_of_another_model_is_refused(run_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("a quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 80)
    vocab, merges = train_bpe(str(text), 400, ["<|endoftext|>"])
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir.path), "--tokenizer-dir", str(tmp_path), "--prompt", "the"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "belongs to another model" in err and str(tmp_path) in err and "Traceback" not in err


# ------------------------------------------------ streaming, host syncs, stop token, providers

def test_result_rows_are_built_lazily_per_batch():
    """A billion results: the first batches come at once, and nothing holds all rows."""
    import itertools
    import tracemalloc

    from cs336.generate import result_batches

    tracemalloc.start()
    batches = list(itertools.islice(result_batches(2, 10**9, 16), 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert batches[0] == [(0, j) for j in range(16)] and batches[2][-1] == (0, 47)
    assert peak < 1 << 20
    assert list(result_batches(2, 3, 4)) == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2)]]


def test_cli_prints_each_batch_when_done(run_dir, capsys, monkeypatch):
    """--num-samples 1e9 --max-tokens 1: results appear batch by batch; SIGINT after the third
    batch is one line, exit 130, with the 12 results already printed."""
    import cs336.generate as gen

    real, calls = gen.generate_texts, []

    def counted(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 4:
            assert capsys.readouterr().out.count("=== prompt 0, sample") == 12  # already printed
            raise KeyboardInterrupt
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_texts", counted)
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir.path), "--num-samples", "1000000000", "--max-tokens", "1",
              "--batch-size", "4", "--seed", "0"])
    assert exc.value.code == 130 and calls == [4, 4, 4, 4]
    assert capsys.readouterr().err == "interrupted by SIGINT: 12 result(s) were printed before it\n"


def test_one_host_sync_per_decode_step_for_all_rows(tiny_model, monkeypatch):
    """The picker gets the whole batch per step (one copy to the host), not one row at a time,
    and picks what per-row sampling picks."""
    import cs336.generate as gen
    from cs336.generate import next_tokens

    model = tiny_model
    real, widths = gen.next_tokens, []
    monkeypatch.setattr(gen, "next_tokens", lambda logits, *a, **k: widths.append(len(logits)) or real(logits, *a, **k))
    prompts = [[1, 2, 3], [4, 5], [6]]
    generate_batch(model, prompts, 5, temperature=0.0)
    assert widths == [3] * 5
    logits = torch.randn(4, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    alone = [next_token(logits[i], 0.8, 0.9, torch.Generator().manual_seed(i)) for i in range(4)]
    assert next_tokens(logits, 0.8, 0.9, gens) == alone
    assert next_tokens(logits, 0.0, 0.9) == torch.argmax(logits, -1).tolist()


def test_stop_token_is_the_runs_first_special_token():
    from cs336.generate import stop_id
    from cs336.tokenizer import Tokenizer

    vocab = {i: bytes([i]) for i in range(256)}
    tok = Tokenizer(vocab, [], ["<|stop|>", "<|endoftext|>"])
    assert stop_id(tok) == tok.token_id(b"<|stop|>") != tok.token_id(b"<|endoftext|>")
    assert stop_id(Tokenizer(vocab, [])) is None


def test_checkpoint_is_read_and_hashed_once(run_dir, monkeypatch):
    import cs336.checkpoint_integrity as ck
    from cs336.inference import load_for_inference

    reads, digests = [], []
    real_load, real_digest = ck.torch.load, ck.payload_digest
    monkeypatch.setattr(ck.torch, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(ck, "payload_digest", lambda p: digests.append(1) or real_digest(p))
    load_for_inference(run_dir=str(run_dir.path))
    assert (len(reads), len(digests)) == (1, 1)


def test_run_trained_with_triton_decodes_without_cuda(run_dir, tmp_path, capsys, monkeypatch):
    """The run's kernels is a training choice: without CUDA (and no interpreter) it decodes
    with auto (native here), and the output equals a run saved with kernels=native."""
    import shutil

    from cs336.inference import load_for_inference

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    triton_run = tmp_path / "run"
    shutil.copytree(run_dir.path, triton_run)
    rd = RunDir(triton_run)
    payload = torch.load(rd.checkpoint_path(3), weights_only=True)
    cfg = TrainConfig(model=ModelConfig(**{**payload["extra"]["config"]["model"], "kernels": "triton"}))
    model = TransformerLM.from_config(dataclasses.replace(cfg.model, kernels="native"))
    model.load_state_dict(payload["model"])
    save_checkpoint(model, None, 3, rd.checkpoint_path(3), config=config_to_dict(cfg))
    loaded, _ = load_for_inference(run_dir=str(triton_run))
    assert loaded.kernels == "auto" and ops.resolve_backend(loaded.kernels) == "native"
    args = ["--prompt", "the cat", "--max-tokens", "6", "--temperature", "0"]
    main(["--run", str(triton_run), *args])
    out = capsys.readouterr()
    main(["--run", str(run_dir.path), *args])
    assert out.err == "" and out.out == capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 256)", "(default: 0.7)", "(default: 0.9)", "(default: 16)", "(default: cpu)"):
        assert default in text


def test_a_batch_beyond_the_device_memory_is_refused_and_a_large_one_is_capped(run_dir, capsys, monkeypatch):
    # --num-samples 3000000 --batch-size 3000000 ended in a std::bad_alloc traceback (the generators,
    # then the KV cache, of 3M rows); a --batch-size beyond the results counts only the results.
    from cs336 import generate, hardware

    common = ["--run", str(run_dir.path), "--prompt", "the cat", "--max-tokens", "2", "--seed", "0", "--jsonl"]
    main(common + ["--batch-size", str(10**12)])  # one result: one row, whatever the cap
    assert len(capsys.readouterr().out.splitlines()) == 1
    rows = 1000
    monkeypatch.setattr(hardware, "device_memory", lambda device: 999 * generate.GENERATOR_BYTES)
    with pytest.raises(SystemExit) as exc:
        main(common + ["--num-samples", str(rows), "--batch-size", str(rows)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--batch-size {rows} decodes {rows} rows at once" in err and "lower --batch-size" in err
    assert "Traceback" not in err
