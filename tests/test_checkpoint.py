"""Checkpoints: safetensors + config.json round trip, book .pth files, clear errors."""

import json

import pytest
import torch

from llm.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, save_checkpoint
from llm.errors import CheckpointError
from llm.model import GPTModel
from tests import book_reference as book
from tests.conftest import tiny_cfg


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(qkv_bias=True))
    out = save_checkpoint(model, tmp_path / "ckpt", extra={"tokens_seen": 123})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["model"] == tiny_cfg(qkv_bias=True) and meta["tokens_seen"] == 123  # the book's seven keys
    for path in (out, out / WEIGHTS_NAME):
        loaded = load_checkpoint(path)
        assert not loaded.training
        assert _same_weights(loaded, model)


def test_book_pth_loads_with_weights_only(tmp_path):
    cfg = tiny_cfg(emb_dim=768, n_heads=12, n_layers=1, context_length=8, vocab_size=64)
    torch.manual_seed(1)
    ref = book.GPTModel(cfg).eval()
    torch.save(ref.state_dict(), tmp_path / "model.pth")  # the book's chapter-5 save
    loaded = load_checkpoint(tmp_path / "model.pth")  # config inferred from shapes
    assert loaded.cfg["n_heads"] == 12 and loaded.cfg["qkv_bias"] is False
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(idx), ref(idx), atol=1e-5)
    # the book's training checkpoint: {"model_state_dict": ..., "optimizer_state_dict": ...}
    torch.save({"model_state_dict": ref.state_dict()}, tmp_path / "model_and_optimizer.pth")
    assert _same_weights(load_checkpoint(tmp_path / "model_and_optimizer.pth"), loaded)


def test_pth_with_config_beside_it(tmp_path):
    cfg = tiny_cfg()
    torch.save(book.GPTModel(cfg).state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="cannot tell n_heads"):
        load_checkpoint(tmp_path / "m.pt")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model": cfg}))
    assert load_checkpoint(tmp_path / "m.pt").cfg == GPTModel(cfg).cfg


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": torch.nn.ReLU()}, tmp_path / "evil.pth")  # weights_only refuses modules
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(tmp_path / "evil.pth")


def test_truncated_files_name_the_file(tmp_path):
    ckpt = save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "c")
    data = (ckpt / WEIGHTS_NAME).read_bytes()
    (ckpt / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{WEIGHTS_NAME}"):
        load_checkpoint(ckpt)
    torch.save(book.GPTModel(tiny_cfg()).state_dict(), tmp_path / "m.pth")
    raw = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(raw[:1000])
    with pytest.raises(CheckpointError, match="m.pth"):
        load_checkpoint(tmp_path / "m.pth")


def test_missing_paths_and_mismatches_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_checkpoint(tmp_path / "empty")
    ckpt = save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "c")
    (ckpt / CONFIG_NAME).write_text(json.dumps({"model": tiny_cfg(emb_dim=48)}))
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(ckpt)
    (ckpt / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(ckpt)


def test_save_replaces_atomically(tmp_path, monkeypatch):
    ckpt = save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "c")
    before = (ckpt / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("llm.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(GPTModel(tiny_cfg()), ckpt)
    assert (ckpt / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_reconfigure_keeps_weights_and_cuts_the_context(tmp_path):
    from llm.checkpoint import reconfigure

    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(context_length=24)).eval()
    short = reconfigure(model, {**model.cfg, "context_length": 10, "drop_rate": 0.2})
    assert short.cfg["context_length"] == 10 and short.cfg["drop_rate"] == 0.2
    assert short.trf_blocks[0].drop_shortcut.p == 0.2
    ids = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        assert torch.equal(short.eval()(ids), model(ids))
    assert reconfigure(model, model.cfg) is model


def test_written_files_get_ordinary_permissions(tmp_path):
    """Temp-then-rename must not leave mkstemp's 0600 on the outputs (others could not read them)."""
    import os
    import stat

    from llm.files import write_json

    umask = os.umask(0o022)
    os.umask(umask)
    ckpt = save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "c")
    write_json(tmp_path / "m.json", {"a": 1})
    for file in (ckpt / WEIGHTS_NAME, ckpt / CONFIG_NAME, tmp_path / "m.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_read_checkpoint_and_checkpoint_meta(tmp_path):
    from llm.checkpoint import checkpoint_meta, read_checkpoint

    torch.manual_seed(0)
    model = GPTModel(tiny_cfg())
    ckpt = save_checkpoint(model, tmp_path / "c", extra={"instruct": {"prompt_style": "phi3"}})
    meta = checkpoint_meta(ckpt)
    assert meta == {"format": "llm.GPTModel", "model": tiny_cfg(), "instruct": {"prompt_style": "phi3"}}
    assert checkpoint_meta(ckpt / WEIGHTS_NAME) == meta  # a weights file finds the config beside it
    checkpoint = read_checkpoint(ckpt)
    assert (checkpoint.cfg, checkpoint.meta, checkpoint.source) == (model.cfg, meta, ckpt / WEIGHTS_NAME)
    assert not any(k.endswith(".att.mask") for k in checkpoint.state)
    assert _same_weights(checkpoint.model(), model)
    torch.save(book.GPTModel(tiny_cfg()).state_dict(), tmp_path / "m.pth")
    assert checkpoint_meta(tmp_path / "m.pth") == {}  # no config.json beside it
    assert checkpoint_meta("gpt2-small") == {}  # a GPT-2 name: nothing recorded, nothing fetched
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_meta(tmp_path / "nowhere")


def test_a_classifier_head_loads_only_when_asked(tmp_path):
    from llm.checkpoint import read_checkpoint

    model = GPTModel(tiny_cfg())
    model.out_head = torch.nn.Linear(36, 2)
    ckpt = save_checkpoint(model, tmp_path / "cls")
    with pytest.raises(CheckpointError, match="does not fit the model: .*out_head"):
        load_checkpoint(ckpt)  # a language model is what load_checkpoint builds
    assert _same_weights(read_checkpoint(ckpt).model(num_classes=2), model)


def test_checkpoint_files_keep_their_bytes(tmp_path):
    """The writer's output is pinned: config.json's text (an untied model's: the book's seven keys, as before
    model.tie_embeddings), and safetensors with the masks left out."""
    from safetensors import safe_open

    from llm.model import MASK_SUFFIX

    model = GPTModel(tiny_cfg(n_layers=1))
    ckpt = save_checkpoint(model, tmp_path / "c", extra={"training": {"tokens_seen": 7}})
    cfg = ",\n".join(f'    "{k}": {json.dumps(v)}' for k, v in tiny_cfg(n_layers=1).items())
    expected = f'{{\n  "format": "llm.GPTModel",\n  "model": {{\n{cfg}\n  }},\n  "training": {{\n'
    expected += '    "tokens_seen": 7\n  }\n}\n'
    assert (ckpt / CONFIG_NAME).read_text() == expected
    with safe_open(ckpt / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == {k for k in model.state_dict() if not k.endswith(MASK_SUFFIX)}
    assert MASK_SUFFIX == ".att.mask" and "trf_blocks.0.att.mask" in model.state_dict()


def test_no_module_imports_a_private_name_of_another():
    """Modules talk through public names (the checkpoint API among them)."""
    import ast

    from tests.conftest import ROOT

    offenders = []
    for file in sorted([*(ROOT / "llm").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("llm", "stages")):
                offenders += [f"{file.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle", "module"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_an_unsafe_pickle_is_one_line_that_never_advises_turning_the_protection_off(tmp_path, how, capsys):
    import pickle

    from llm.cli import main

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"tok_emb.weight": torch.zeros(2, 2), "x": _RunsCode(marker)}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    else:
        torch.save({"x": torch.nn.ReLU()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a safe checkpoint")
    assert "only tensors and plain containers" in message and "\n" not in message
    for advice in ("weights_only", "trust", "add_safe_globals", "Re-running"):
        assert advice not in message
    assert not marker.exists()  # nothing ran
    if how == "torch.save":
        assert "(it refers to posix.system)" in message
    if how == "module":
        assert "(it refers to torch.nn.modules.activation.ReLU)" in message
    assert main(["generate", "--model", str(path), "--prompt", "Hi"]) == 2
    assert capsys.readouterr() == ("", f"llm generate: error: {message}\n")


def test_a_config_or_weights_that_are_not_utf8_or_pickles_are_one_line(tmp_path):
    import pickle

    ckpt = save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "c")
    (ckpt / CONFIG_NAME).write_bytes(b'{"model": "\xff"}')
    with pytest.raises(CheckpointError, match=f"cannot read model config {ckpt / CONFIG_NAME}: 'utf-8' codec"):
        load_checkpoint(ckpt)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="junk.pth is not a safe checkpoint, or not a checkpoint at all: "):
        load_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "cut.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "cut.pth")
    assert "\n" not in str(info.value) and "cut.pth" in str(info.value)
