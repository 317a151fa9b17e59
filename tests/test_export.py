"""Export to Hugging Face transformers: the exported directory loads as a ``LlamaForCausalLM``
whose logits equal ours, and ``AutoTokenizer`` gives our ids; ablations Llama cannot express and
unsafe destinations are refused.

The model is tiny and randomly initialized, with its RMSNorm weights perturbed so a misplaced
norm shows; the tokenizer is trained here on a generated corpus (hermetic). transformers is
imported once for the module.
"""

import dataclasses
import json

import pytest
import torch

from cs336.checkpoint import save_checkpoint
from cs336.config import ModelConfig, TrainConfig
from cs336.config_io import config_to_dict
from cs336.export import ExportError, export_hf, main, rope_permutation
from cs336.generate import generate_ids
from cs336.model import TransformerLM
from cs336.run_dir import RunDir
from cs336.tokenizer import Tokenizer, train_bpe
from cs336.tokenizer.gpt2_files import save_vocab_merges

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[hf]' or '.[dev]')")

EOT = "<|endoftext|>"
CORPUS = ("The cat sat on the mat. It's 2024; we'll see 1,234 foxes!\n"
          "Größe, Straße. 狐狸跳过了懒狗。 Emoji 🦊🐕 and tabs\tand  double  spaces.\n")
TEXTS = [
    "The cat sat",
    "the mat" + EOT + "Größe 東京 🦊" + EOT + EOT + "  spaces\n\n and\ttabs",
    EOT + "It's 1,234 foxes! \u00a0nbsp" + EOT,
]
CFG = ModelConfig(vocab_size=320, context_length=24, d_model=48, num_layers=2, num_heads=3, d_ff=80,
                  rope_theta=500.0, eps=1e-6, kernels="torch")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text((CORPUS + EOT) * 30, encoding="utf-8")
    vocab, merges = train_bpe(str(corpus), CFG.vocab_size, [EOT])
    return Tokenizer(vocab, merges, [EOT])


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = TransformerLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    model = _model()
    out = export_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "export")
    return model, out


def test_rope_permutation_turns_adjacent_pairs_into_halves():
    assert rope_permutation(6).tolist() == [0, 2, 4, 1, 3, 5]


def test_directory_holds_the_files_and_config(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "cs336_export.json"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert type(cfg).__name__ == "LlamaConfig"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == \
        (320, 48, 80, 2, 3, 3, 24)
    assert cfg.rms_norm_eps == 1e-6 and not cfg.tie_word_embeddings
    assert not cfg.attention_bias and not cfg.mlp_bias
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    assert theta == 500.0


def test_transformers_logits_equal_ours(exported):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, CFG.vocab_size, (3, CFG.context_length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
    assert rel < 1e-4, f"max |diff| / max |logit| = {rel:.3g}"
    # Greedy decoding through transformers' own generate (its KV cache) gives our ids.
    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        hf_ids = hf.generate(ids[:1, :5], max_new_tokens=15, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=15)
    assert hf_ids[0, 5:].tolist() == generate_ids(model, prompt, 15, temperature=0.0)


def test_auto_tokenizer_gives_our_ids(exported, tokenizer):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    eot_id = tokenizer.token_id(EOT.encode())
    assert hf_tok.eos_token == hf_tok.bos_token == EOT
    assert hf_tok.eos_token_id == eot_id
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eot_id


@pytest.mark.parametrize("switch, fragment", [
    ({"use_post_norm": True}, "model.use_post_norm=true"),
    ({"remove_rmsnorm": True}, "model.remove_rmsnorm=true"),
    ({"remove_rope": True}, "model.remove_rope=true"),
    ({"ffn_type": "silu"}, "model.ffn_type=silu"),
])
def test_ablations_llama_cannot_express_are_refused(tokenizer, tmp_path, switch, fragment):
    cfg = dataclasses.replace(CFG, **switch)
    with pytest.raises(ExportError, match=fragment):
        export_hf(TransformerLM.from_config(cfg), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_destination_rules(tokenizer, tmp_path, monkeypatch):
    model = _model()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not an earlier export"):
        export_hf(model, tokenizer, busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    out = export_hf(model, tokenizer, tmp_path / "hf")
    first = (out / "model.safetensors").read_bytes()
    export_hf(_model(seed=1), tokenizer, out)  # an earlier export is replaced
    assert (out / "model.safetensors").read_bytes() != first

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tokenizer, out)
    assert (out / "config.json").is_file()  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf"]  # no temp dir left


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    rd = RunDir(tmp_path_factory.mktemp("run") / "run")
    rd.create()
    save_vocab_merges(tokenizer.vocab, tokenizer.merges, rd.vocab_path, rd.merges_path)
    cfg = TrainConfig(model=CFG)
    model = _model()
    path = rd.checkpoint_path(5)
    save_checkpoint(model, None, 5, path, config=config_to_dict(cfg))
    rd.mark_latest(path, keep_last=1)
    return rd, model


def test_cli_exports_a_run_and_refuses_bad_input(run_dir, tmp_path, capsys):
    rd, model = run_dir
    main(["--run", str(rd.path), "--out", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    marker = json.loads((tmp_path / "hf" / "cs336_export.json").read_text())
    assert marker["run"] == str(rd.path.resolve())
    main(["--checkpoint", str(rd.checkpoint_path(5)), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    for args, fragment in ((["--run", str(tmp_path / "missing")], "does not exist"),
                           (["--run", str(rd.path), "--out", str(tmp_path / "other")], "is not an earlier export")):
        if "--out" not in args:
            args = args + ["--out", str(tmp_path / "new")]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err
