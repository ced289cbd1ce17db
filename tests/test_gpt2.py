"""GPT-2 checkpoints in Hugging Face's layout: tiny random `GPT2LMHeadModel`s made here are the oracle."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm.checkpoint import export_hf, load_checkpoint, read_checkpoint
from llm.errors import CheckpointError
from llm.generate import generate
from llm.gpt2 import from_hf, gpt2_name, is_hf_gpt2
from llm.model import GPTModel
from tests.conftest import ROOT, tiny_cfg

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

# (vocab, context, width, heads, layers): odd head counts, 1-3 layers, small vocab and context.
SHAPES = [(101, 24, 30, 3, 1), (97, 40, 28, 7, 3), (120, 32, 12, 1, 2)]


def hf_model(vocab, context, width, heads, layers, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_head=heads, n_layer=layers)
    cfg.bos_token_id = cfg.eos_token_id = None  # the tiny vocabularies have no token 50256
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms too, so a swapped or untransposed tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def save_as(model, path, layout):
    """Write a GPT-2 checkpoint the way it is found in the wild; returns the path to load."""
    path.mkdir(parents=True)
    model.config.to_json_file(path / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if layout == "save_pretrained":  # transformers' own writer: `transformer.` prefix, safetensors
        model.save_pretrained(path)
        return path
    if layout == "hub":  # the Hub's openai-community files: no prefix, legacy attn.bias buffers
        hub = {k.removeprefix("transformer."): v for k, v in sd.items()}
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        save_file(hub, path / "model.safetensors")
        return path
    if layout == "bin":  # pytorch_model.bin of older uploads, read with weights_only=True
        torch.save(sd, path / "pytorch_model.bin")
        return path
    if layout == "file":  # a bare .safetensors file with the config beside it
        save_file(sd, path / "weights.safetensors")
        return path / "weights.safetensors"
    raise ValueError(layout)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "v{}-c{}-d{}-h{}-l{}".format(*s))
@pytest.mark.parametrize("layout", ["save_pretrained", "hub", "bin", "file"])
def test_logits_and_greedy_text_equal_transformers(tmp_path, shape, layout):
    ref = hf_model(*shape)
    model = load_checkpoint(save_as(ref, tmp_path / "ckpt", layout))
    vocab, context, width, heads, layers = shape
    assert model.cfg == {
        "vocab_size": vocab,
        "context_length": context,
        "emb_dim": width,
        "n_heads": heads,
        "n_layers": layers,
        "drop_rate": 0.0,
        "qkv_bias": True,
        "tie_embeddings": False,  # GPT-2's head is its wte; read in the book's layout: a copy of its own
    }
    ids = torch.randint(0, vocab, (2, context))
    assert (our_logits(model, ids) - hf_logits(ref, ids)).abs().max() <= 1e-4

    prompt = torch.randint(0, vocab, (1, 4))
    ours = generate(model, prompt, max_new_tokens=20, context_size=context)
    theirs = ref.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_bare_state_dict_without_config_uses_gpt2_widths(tmp_path):
    ref = hf_model(50, 16, 768, 12, 1)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_checkpoint(tmp_path / "pytorch_model.bin")
    assert model.cfg["n_heads"] == 12 and model.cfg["n_layers"] == 1
    ids = torch.randint(0, 50, (1, 16))
    assert (our_logits(model, ids) - hf_logits(ref, ids)).abs().max() <= 1e-4


def test_from_hf_converts_a_state_dict_and_its_config(tmp_path):
    """`llm.checkpoint` asks `llm.gpt2` whether weights are GPT-2's and to convert them."""
    ref = hf_model(*SHAPES[2])
    path = save_as(ref, tmp_path / "ckpt", "hub")
    checkpoint = read_checkpoint(path)
    assert checkpoint.meta["model_type"] == "gpt2" and checkpoint.source == path / "model.safetensors"
    hf_state = load_file(path / "model.safetensors")
    assert is_hf_gpt2(hf_state) and not is_hf_gpt2(checkpoint.state)
    state, cfg = from_hf(hf_state, "weights", checkpoint.meta, "config")
    assert cfg == checkpoint.cfg and state.keys() == checkpoint.state.keys()
    assert all(torch.equal(state[k], checkpoint.state[k]) for k in state)
    for meta in (None, {"model": checkpoint.cfg}):  # no GPT2Config: the shapes, but width 12 is not GPT-2's
        with pytest.raises(CheckpointError, match=r"cannot tell n_heads of weights .*emb_dim 12"):
            from_hf(hf_state, "weights", meta)
    bad = {**checkpoint.meta, "layer_norm_epsilon": 1e-6}
    with pytest.raises(CheckpointError, match="^config: layer_norm_epsilon"):
        from_hf(hf_state, "weights", bad, "config")


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, qkv_bias, tied):
    torch.manual_seed(1)
    model = GPTModel(tiny_cfg(vocab_size=211, qkv_bias=qkv_bias, n_heads=3, emb_dim=27, tie_embeddings=tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    ref = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 211, (2, 24))
    assert (hf_logits(ref, ids) - our_logits(model, ids)).abs().max() <= 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    saved = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in saved) is not tied  # tied: the matrix once, as wte, as GPT-2's files hold it
    again = load_checkpoint(out)  # and back: our loader reads what it wrote
    assert (our_logits(again, ids) - our_logits(model, ids)).abs().max() == 0


def test_export_refuses_a_classifier(tmp_path):
    model = GPTModel(tiny_cfg())
    model.out_head = torch.nn.Linear(36, 2)
    with pytest.raises(CheckpointError, match="only language models"):
        export_hf(model, tmp_path / "hf")


def test_wrong_shapes_and_missing_keys_name_the_key(tmp_path):
    ref = hf_model(*SHAPES[1])
    path = save_as(ref, tmp_path / "ok", "hub")
    sd = load_file(path / "model.safetensors")

    bad = dict(sd, **{"h.1.attn.c_attn.weight": torch.zeros(28, 80)})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((path / "config.json").read_text())
    save_file(bad, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.weight has shape \[28, 80\], expected \[28, 84\]"):
        load_checkpoint(tmp_path / "bad")

    missing = {k: v for k, v in sd.items() if k != "h.2.mlp.c_fc.bias"}
    save_file(missing, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 'h\.2\.mlp\.c_fc\.bias'"):
        load_checkpoint(tmp_path / "bad")

    extra = dict(sd, **{"h.3.ln_1.weight": torch.ones(28)})
    save_file(extra, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'h\.3\.ln_1\.weight'"):
        load_checkpoint(tmp_path / "bad")


def test_unsupported_gpt2_variants_are_refused(tmp_path):
    ref = hf_model(*SHAPES[0])
    path = save_as(ref, tmp_path / "ckpt", "hub")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function = 'relu' is not supported"):
        load_checkpoint(path)


def test_gpt2_names():
    assert gpt2_name("gpt2-small") == gpt2_name("gpt2") == gpt2_name("openai-community/gpt2") == "gpt2-small"
    assert gpt2_name("gpt2-medium") == gpt2_name("openai-community/gpt2-medium") == "gpt2-medium"
    assert gpt2_name("gpt3") is None


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_hub_names_read_the_huggingface_cache_offline(tmp_path):
    """`gpt2-small` resolves through huggingface_hub's cache, as a download would have left it."""
    ref = hf_model(50257, 16, 12, 3, 1)
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("a" * 40)
    save_as(ref, snapshot, "hub")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    torch.save(hf_logits(ref, torch.arange(16)[None]), tmp_path / "expected.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import torch; from llm.checkpoint import load_checkpoint\n"
        "m = load_checkpoint('gpt2-small')\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "print((m(torch.arange(16)[None]) - e).abs().max().item())"
    )
    result = _run(code, env)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) <= 1e-4


def test_offline_without_a_copy_says_what_to_place_where(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    args = ["-m", "llm", "generate", "--model", "gpt2-medium", "--prompt", "Hi"]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "config.json and model.safetensors" in lines[0]
    assert "https://huggingface.co/openai-community/gpt2-medium" in lines[0]


def test_cli_generates_from_a_gpt2_directory_and_exports(tmp_path):
    ref = hf_model(50257, 32, 12, 3, 1)
    path = save_as(ref, tmp_path / "gpt2", "save_pretrained")
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "llm", "generate", "--model", str(path), "--prompt", "Every effort moves you"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Every effort moves you") and len(result.stdout) > len("Every effort moves you\n")

    result = subprocess.run(
        [sys.executable, "-m", "llm", "export", "--model", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50257, (1, 32))
    assert (hf_logits(back, ids) - hf_logits(ref, ids)).abs().max() <= 1e-4
