"""The leaderboard-recipe switches of the model and the run: each off by default, equal to its
definition (written out here from torch ops), composable, on every provider, and honoured by
config.json, resume, generate and export.

Muon and the schedules are tests/test_muon.py; the fused-loss parity of soft-cap and z-loss is
tests/parity/test_cross_entropy.py.
"""

import dataclasses
import io
import json
import math
import shutil

import pytest
import torch

from cs336 import ops
from cs336.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cs336.config import ConfigError, ModelConfig, TrainConfig
from cs336.config_io import apply_overrides, config_from_dict, config_to_dict
from cs336.model import TransformerLM
from cs336.nn_utils import cross_entropy
from cs336.presets import leaderboard_config, preset, smoke_config
from run_helpers import assert_same_metrics

CFG = ModelConfig(vocab_size=97, context_length=12, d_model=24, num_layers=2, num_heads=3, d_ff=40,
                  kernels="torch")
ALL = dict(qk_norm=True, tie_embeddings=True, logit_softcap=5.0, zero_init_residual=True)
SWITCHES = [{"qk_norm": True}, {"tie_embeddings": True}, {"logit_softcap": 5.0}, {"zero_init_residual": True}, ALL]
IDS = ["qk_norm", "tie_embeddings", "logit_softcap", "zero_init_residual", "all"]


def build(seed=0, **switches):
    torch.manual_seed(seed)
    return TransformerLM.from_config(dataclasses.replace(CFG, **switches))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (3, CFG.context_length), generator=g)
    return x, torch.randint(0, CFG.vocab_size, (3, CFG.context_length), generator=g)


def test_every_switch_is_off_by_default_and_the_state_dict_is_cs336s():
    cfg, run = ModelConfig(), TrainConfig()
    assert (cfg.qk_norm, cfg.tie_embeddings, cfg.logit_softcap, cfg.zero_init_residual) == (False, False, None, False)
    assert (run.optim.name, run.optim.schedule, run.train.z_loss) == ("adamw", "cosine", 0.0)
    a, b = build(), build()
    names = list(a.state_dict())
    assert not [n for n in names if "norm." in n and "attn" in n]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n  # the switches' code consumes no extra random numbers


@pytest.mark.parametrize("switches", SWITCHES, ids=IDS)
def test_switched_model_draws_the_default_weights(switches):
    # Same seed: every weight both models have is equal unless the switch defines it otherwise.
    base, model = build(), build(**switches)
    sd = model.state_dict()
    for name, p in base.state_dict().items():
        if switches.get("zero_init_residual") and (name.endswith("output_proj.weight") or name.endswith("w2.weight")):
            assert torch.count_nonzero(sd[name]) == 0, name
        elif switches.get("tie_embeddings") and name == "token_embeddings.weight":
            assert sd[name] is not p and torch.equal(sd[name], base.state_dict()["lm_head.weight"])
        else:
            assert torch.equal(sd[name], p), name


def test_qk_norm_is_a_per_head_rmsnorm_of_q_and_k_before_rope():
    model = build(qk_norm=True)
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, CFG.context_length, CFG.d_model)
    H, d = CFG.num_heads, CFG.d_head

    def heads(t):
        return t.view(2, -1, H, d).transpose(1, 2)  # (B, H, T, d)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + CFG.eps) * w

    q = attn.rope(rms(heads(x @ attn.q_proj.weight.T), attn.q_norm.weight))
    k = attn.rope(rms(heads(x @ attn.k_proj.weight.T), attn.k_norm.weight))
    v = heads(x @ attn.v_proj.weight.T)
    mask = torch.ones(CFG.context_length, CFG.context_length, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, CFG.d_model) @ attn.output_proj.weight.T
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_tied_model_shares_one_matrix_and_refuses_untied_weights():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.token_embeddings.weight
    assert model.num_parameters() == build().num_parameters() - CFG.vocab_size * CFG.d_model
    x, y = batch()
    model.loss(x, y).backward()  # both uses add into one gradient
    assert model.lm_head.weight.grad is model.token_embeddings.weight.grad
    buf = io.BytesIO()
    save_checkpoint(model, None, 3, buf)
    buf.seek(0)
    again = build(seed=9, tie_embeddings=True)
    assert load_checkpoint(buf, again, None) == 3
    assert again.lm_head.weight is again.token_embeddings.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    untied = io.BytesIO()
    save_checkpoint(build(), None, 1, untied)
    untied.seek(0)
    with pytest.raises(CheckpointError, match="tie_embeddings"):
        load_checkpoint(untied, build(tie_embeddings=True), None)
    with pytest.raises(RuntimeError, match="untied LM head"):  # also without the saved config
        build(tie_embeddings=True).load_state_dict(build().state_dict())


def test_logit_softcap_bounds_forward_and_decode_logits_and_the_loss_uses_them():
    plain, capped = build(), build(logit_softcap=0.5)
    x, y = batch()
    z = plain(x)
    torch.testing.assert_close(capped(x), 0.5 * torch.tanh(z / 0.5))
    assert capped(x).abs().max() < 0.5
    cache = capped.new_kv_cache(3)
    step = torch.cat([capped(x[:, :5], kv_cache=cache), capped(x[:, 5:6], kv_cache=cache)], dim=1)
    torch.testing.assert_close(step, capped(x[:, :6]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(capped.loss(x, y), cross_entropy(0.5 * torch.tanh(z / 0.5), y))


def test_zero_init_residual_blocks_start_as_the_identity():
    model = build(zero_init_residual=True)
    x, _ = batch()
    emb = model.token_embeddings(x)
    torch.testing.assert_close(model.hidden_states(x), model.ln_final(emb))


def test_z_loss_adds_the_mean_squared_logsumexp():
    model = build()
    x, y = batch()
    y[0, :4] = -100
    logits, keep = model(x), y != -100
    lse = torch.logsumexp(logits, -1)
    expected = cross_entropy(logits, y) + 1e-2 * lse[keep].pow(2).mean()
    torch.testing.assert_close(model.loss(x, y, z_loss=1e-2), expected)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_all_switches_match_the_reference_on_every_provider(backend):
    if not ops.backend_available(backend):
        pytest.skip(f"{backend} cannot run here (triton needs CUDA or TRITON_INTERPRET=1)")
    ref, other = build(**ALL), build(**ALL)
    other.kernels = backend
    with torch.no_grad():  # zero-init blocks would leave q/k-norm gradients at 0: perturb
        for m in (ref, other):
            torch.manual_seed(3)
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x, y = batch()
    loss_r, loss_o = ref.loss(x, y, z_loss=1e-3), other.loss(x, y, z_loss=1e-3)
    loss_r.backward()
    loss_o.backward()
    torch.testing.assert_close(loss_o, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other(x), ref(x), rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(ref.named_parameters(), other.parameters(), strict=True):
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_config_flags_round_trip_and_bad_values_are_refused():
    cfg = apply_overrides(TrainConfig(), ["optim.name=muon", "optim.muon_lr=0.02", "optim.muon_momentum=0.9",
                                          "optim.ns_steps=4", "model.qk_norm=true", "model.tie_embeddings=true",
                                          "model.logit_softcap=30", "train.z_loss=1e-4",
                                          "model.zero_init_residual=true", "optim.schedule=wsd",
                                          "optim.decay_frac=0.3", "optim.decay_shape=1-sqrt"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    for bad, fragment in (("optim.schedule=step", "optim.schedule"), ("optim.decay_frac=0", "optim.decay_frac"),
                          ("model.logit_softcap=-1", "model.logit_softcap"), ("train.z_loss=-1", "train.z_loss"),
                          ("optim.decay_shape=cubic", "optim.decay_shape"), ("optim.ns_steps=0", "optim.ns_steps")):
        with pytest.raises(ConfigError, match=fragment):
            apply_overrides(TrainConfig(), [bad])


def test_checkpoint_of_a_model_without_the_new_fields_still_loads():
    model = build()
    buf = io.BytesIO()
    save_checkpoint(model, None, 1, buf)
    buf.seek(0)
    payload = torch.load(buf, weights_only=True)
    for key in ("qk_norm", "tie_embeddings", "logit_softcap", "zero_init_residual"):
        del payload["model_config"][key]  # as written before these switches existed
    payload.pop("checksum")
    old = io.BytesIO()
    torch.save(payload, old)
    old.seek(0)
    assert load_checkpoint(old, build(seed=4), None) == 1
    old.seek(0)
    with pytest.raises(CheckpointError, match="qk_norm"):
        load_checkpoint(old, build(qk_norm=True), None)


def test_leaderboard_preset_turns_the_recipe_on():
    cfg = preset("leaderboard")
    assert cfg == leaderboard_config()
    assert cfg.data.dataset == "owt" and cfg.model.vocab_size == 32_000
    assert cfg.optim.name == "muon" and cfg.optim.schedule == "wsd" and cfg.train.z_loss > 0
    assert cfg.model.qk_norm and cfg.model.tie_embeddings and cfg.model.logit_softcap
    assert cfg.model.zero_init_residual and cfg.train.autocast == "bf16" and cfg.train.compile


# ------------------------------------------------------------------ the run: resume, generate, export

RECIPE = ["optim.name=muon", "optim.lr=1e-2", "model.qk_norm=true", "model.tie_embeddings=true",
          "train.z_loss=1e-4", "model.zero_init_residual=true", "optim.schedule=wsd", "optim.min_lr=0",
          "optim.warmup_iters=2"]
TINY = ["train.max_steps=16", "train.eval_interval=8", "train.log_interval=4", "train.checkpoint_interval=8",
        "data.corpus_mb=0.1", "train.sample_tokens=0", "model.kernels=torch"]


def tiny(out_dir, *extra):
    return apply_overrides(smoke_config(), TINY + RECIPE + [f"train.out_dir={out_dir}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    from cs336.train import run

    base = tmp_path_factory.mktemp("recipe")
    full = run(tiny(base / "full", "model.logit_softcap=20"))
    # The WSD schedule depends on max_steps, so the split run is the full one stopped after its
    # step-8 checkpoint: the same directory with the later checkpoint and metrics taken away.
    shutil.copytree(base / "full", base / "split")
    (base / "split" / "checkpoints" / "step_000016.pt").unlink()
    (base / "split" / "checkpoints" / "latest").write_text("step_000008.pt\n")
    rows = [line for line in (base / "split" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 8]
    (base / "split" / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    resumed = run(tiny(base / "split", "model.logit_softcap=20"), resume=True)
    nocap = run(tiny(base / "nocap"))
    return base, full, resumed, nocap


def test_recipe_run_learns_saves_its_switches_and_resumes_exactly(recipe_runs):
    base, full, resumed, _ = recipe_runs
    saved = json.loads((base / "full" / "config.json").read_text())
    assert saved["optim"]["name"] == "muon" and saved["model"]["qk_norm"] and saved["train"]["z_loss"] == 1e-4
    a, b = metrics(base / "full"), metrics(base / "split")
    assert a[-1]["val_loss"] < a[0]["val_loss"] - 0.5
    assert_same_metrics(a, b)
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    assert a[1]["lr"] == a[2]["lr"] == 1e-2 and a[-1]["lr"] < 1e-2 / 2  # stable, then the wsd decay


def test_generate_honours_the_switches(recipe_runs, capsys):
    from cs336.generate import main
    from cs336.inference import load_for_inference

    base, *_ = recipe_runs
    model, _ = load_for_inference(run_dir=str(base / "full"))
    assert model.config.logit_softcap == 20 and model.lm_head.weight is model.token_embeddings.weight
    main(["--run", str(base / "full"), "--prompt", "Once", "--max-tokens", "5", "--seed", "1"])
    assert capsys.readouterr().out.strip()


def test_export_round_trips_qwen3_tied_and_refuses_the_softcap(recipe_runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from cs336.export import main
    from cs336.inference import load_for_inference

    base, *_ = recipe_runs
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(base / "full"), "--out", str(tmp_path / "capped")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.logit_softcap=20" in err and "Traceback" not in err
    assert not (tmp_path / "capped").exists()
    main(["--run", str(base / "nocap"), "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.tie_word_embeddings
    model, _ = load_for_inference(run_dir=str(base / "nocap"))
    with torch.no_grad():
        for layer in model.layers:  # trained q/k gains are near 1: make a misplaced one show
            layer.attn.q_norm.weight.mul_(torch.linspace(0.5, 1.5, model.config.d_head))
    from cs336.export import export_hf
    from cs336.tokenizer import Tokenizer

    tok = Tokenizer.from_files(str(base / "nocap" / "tokenizer" / "vocab.json"),
                               str(base / "nocap" / "tokenizer" / "merges.txt"), ["<|endoftext|>"])
    export_hf(model, tok, tmp_path / "hf2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.context_length))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_bench_recipe_refuses_a_missing_corpus(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_recipe.py"
    spec = importlib.util.spec_from_file_location("bench_recipe_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--corpus", str(tmp_path / "absent.txt")]) == 2
    err = capsys.readouterr().err
    assert "absent.txt not found" in err and "--corpus" in err
    assert set(module.SWITCHES["all"]) == {o for k, v in module.SWITCHES.items() if k != "all" for o in v}
