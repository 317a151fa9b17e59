"""Export to Hugging Face transformers: the exported directory loads as a ``LlamaForCausalLM``
whose logits equal ours, and ``AutoTokenizer`` gives our ids; ablations Llama cannot express and
unsafe destinations are refused.

The model is tiny and randomly initialized, with its RMSNorm weights perturbed so a misplaced
norm shows; the tokenizer is trained here on a generated corpus (hermetic). transformers is
imported once for the module.
"""

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("spelling", [".", "", "../dest"])
def test_the_current_directory_is_refused_and_left_as_it_was(tokenizer, tmp_path, monkeypatch, spelling):
    # "." had no name and was its own parent: the temp dir was made inside it, renaming it failed
    # (EBUSY, "another process holds it") and the ".old" dir stayed inside, so every later export
    # to it was refused; and replacing the directory one stands in pulls it from under the shell.
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.chdir(dest)
    with pytest.raises(ExportError, match="is the current directory"):
        export_hf(_model(), tokenizer, spelling)
    assert list(dest.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_a_symlinked_destination_is_written_through_and_kept(tokenizer, tmp_path):
    # the link was renamed aside and deleted: the user's symlink became a directory, its target stale
    real = export_hf(_model(seed=0), tokenizer, tmp_path / "real")
    before = (real / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(real)
    export_hf(_model(seed=1), tokenizer, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == real.resolve()
    assert (real / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_cli_refuses_an_empty_out_dir(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir[0].path), "--out-dir", ""])
    assert exc.value.code == 2
    assert "--out-dir is empty" in capsys.readouterr().err


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
    main(["--run", str(rd.path), "--out-dir", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    marker = json.loads((tmp_path / "hf" / "cs336_export.json").read_text())
    assert marker["run"] == str(rd.path.resolve())
    main(["--checkpoint", str(rd.checkpoint_path(5)), "--out-dir", str(tmp_path / "hf")])
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    for args, fragment in ((["--run", str(tmp_path / "missing")], "does not exist"),
                           (["--run", str(rd.path), "--out-dir", str(tmp_path / "other")], "is not an earlier export")):
        if "--out-dir" not in args:
            args = args + ["--out-dir", str(tmp_path / "new")]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err


def test_disk_full_in_export_is_one_line_and_keeps_the_earlier_export(run_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError (its text as safetensors writes it)."""
    import safetensors
    import safetensors.torch

    rd, _ = run_dir
    out = tmp_path / "hf"
    main(["--run", str(rd.path), "--out-dir", str(out)])
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(rd.path), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write {out / 'model.safetensors'}: No space left on device; free space" in err
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_export_is_readable_per_umask(tokenizer, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = export_hf(_model(), tokenizer, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_stale_temp_dirs_of_a_killed_export_are_removed(tokenizer, tmp_path):
    """An export killed by SIGKILL leaves its hidden temp dir; the next export to the same place
    removes it (its process is gone) and leaves a live export's and unrelated ones alone."""
    code = ("import os, sys, tempfile; from pathlib import Path; from cs336.export import _temp_dir;"
            "d = _temp_dir(Path(sys.argv[1]), '.tmp'); (d / 'model.safetensors').write_bytes(b'x' * 100);"
            "os.kill(os.getpid(), 9)")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".hf.cs336-export-")
    live = tmp_path / f".hf.cs336-export-{os.getppid()}-abc.tmp"  # a live process (pytest's parent)
    live.mkdir()
    (tmp_path / ".hf.mine.tmp").mkdir()  # not ours by name
    export_hf(_model(), tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hf.mine.tmp", live.name, "hf"])


def test_generate_of_an_export_does_not_warn(exported, recwarn, caplog, capfd):
    """generation_config.json holds no max_length, so generate(max_new_tokens=...) has no conflict."""
    _, out = exported
    gen = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in gen
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    with caplog.at_level("WARNING"):
        hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    messages += capfd.readouterr().err.splitlines()  # transformers' own logger prints to stderr
    assert not [m for m in messages if "max_length" in m or "max_new_tokens" in m], messages


def test_out_is_a_deprecated_alias_of_out_dir(run_dir, tmp_path, capsys):
    rd, _ = run_dir
    main(["--run", str(rd.path), "--out", str(tmp_path / "hf")])
    assert capsys.readouterr().err == "note: --out is deprecated; use --out-dir\n"
    assert (tmp_path / "hf" / "config.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(rd.path)])
    assert exc.value.code == 2 and "required: --out-dir" in capsys.readouterr().err
