"""LoRA (appendix E): the book's layers and semantics, peft as an oracle, merging, adapter checkpoints."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from llm.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    checkpoint_meta,
    load_checkpoint,
    read_checkpoint,
    save_adapter,
    save_checkpoint,
    weights_sha256,
)
from llm.classifier import add_classification_head, load_classifier, save_classifier
from llm.errors import CheckpointError, LLMError
from llm.generate import generate
from llm.lora import (
    LinearWithLoRA,
    LoRALayer,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    lora_layers,
    merge_lora,
    replace_linear_with_lora,
    target_paths,
)
from llm.model import GPT_CONFIG_124M, PRESETS, GPTModel
from tests import book_reference as book
from tests.conftest import tiny_cfg

IDS = torch.tensor([[3, 14, 15, 92, 65, 35], [8, 97, 93, 2, 38, 46]])


def base_model(seed=0, **cfg) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny_cfg(**cfg)).eval()


def randomize_b(model, seed=1, scale=0.05):
    """Adapters as after some training: B no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * scale)
    return model


# --- the book's layers ---------------------------------------------------------------------------------
def test_layers_and_replacement_equal_the_books_draw_for_draw():
    """Same seed, same model: the same A in the same order (the book's init and visiting order), and
    with the same B the same logits as the book's own appendix-E code."""
    ours, ref = base_model(), book.GPTModel(tiny_cfg())
    ref.load_state_dict(ours.state_dict())
    torch.manual_seed(7)
    replace_linear_with_lora(ours, rank=4, alpha=2.0)
    torch.manual_seed(7)
    book.replace_linear_with_lora(ref, rank=4, alpha=2.0)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()  # the book's names: W_query.linear.weight, W_query.lora.A…
    for key in ours_sd:
        assert torch.equal(ours_sd[key], ref_sd[key]), key
    randomize_b(ours)
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    torch.testing.assert_close(ours(IDS), ref(IDS), rtol=0, atol=1e-5)


def test_a_freshly_wrapped_model_gives_exactly_the_base_logits():
    model = base_model()
    before = model(IDS)
    apply_lora(model, rank=8, alpha=16)
    assert len(lora_layers(model)) == 2 * 6 + 1  # every nn.Linear: 4 attention + 2 feed-forward per block, head
    assert torch.equal(model(IDS), before)  # B = 0


def test_the_book_count_of_trainable_lora_parameters():
    """Appendix E: GPT-2 small with a 2-class head, rank 16: 2,666,528 trainable LoRA parameters."""
    with torch.device("meta"):
        model = GPTModel(PRESETS["gpt2-small"])
        model.out_head = nn.Linear(GPT_CONFIG_124M["emb_dim"], 2)
        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert count_parameters(model)["trainable"] == 2_666_528
    # the stages: the new head trains in full and gets no adapter (docs/lora.md)
    with torch.device("meta"):
        model = add_classification_head(GPTModel(PRESETS["gpt2-small"]), num_classes=2, trainable_blocks=-1)
        apply_lora(model, rank=16, alpha=16, modules_to_save=("out_head",))
    assert count_parameters(model)["trainable"] == 2_666_528 - (768 * 16 + 16 * 2) + (768 * 2 + 2) == 2_655_746


def test_gradients_reach_only_the_adapters_and_the_new_head():
    model = add_classification_head(base_model(), num_classes=2, trainable_blocks=-1)
    apply_lora(model, rank=4, alpha=8, modules_to_save=("out_head",))
    assert not isinstance(model.out_head, LinearWithLoRA)  # the new head trains in full, without an adapter
    model.train()
    model(IDS)[:, -1].sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {n for n, _ in model.named_parameters() if n.endswith((".lora.A", ".lora.B"))}
    assert len(adapters) == 2 * 12  # every linear layer of the 2 blocks; not the head
    assert trained == adapters | {"out_head.weight", "out_head.bias"}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("targets", "wrapped"),
    [
        (["attention"], {"att.W_query", "att.W_key", "att.W_value", "att.out_proj"}),
        (["query", "value"], {"att.W_query", "att.W_value"}),
        (["feed_forward"], {"ff.layers.0", "ff.layers.2"}),
        (["head"], set()),
    ],
)
def test_targets_choose_the_layers(targets, wrapped):
    model = replace_linear_with_lora(base_model(), 2, 1.0, targets)
    names = set(lora_layers(model))
    assert names == {f"trf_blocks.{i}.{w}" for i in range(2) for w in wrapped} | (
        {"out_head"} if "head" in targets else set()
    )
    assert names == target_paths(2, targets)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0, "alpha": 1.0}, "LoRA rank must be a whole number >= 1, got 0"),
        ({"rank": 2, "alpha": 0.0}, "LoRA alpha must be a number > 0, got 0.0"),
        ({"rank": 2, "alpha": float("inf")}, "LoRA alpha must be a number > 0, got inf; allowed: 0 < alpha <= 10000"),
        ({"rank": 2, "alpha": 2e4}, "LoRA alpha must be a number > 0, got 20000.0; allowed: 0 < alpha <= 10000"),
        ({"rank": 2, "alpha": 1.0, "targets": ["ff"]}, "unknown LoRA target 'ff'; allowed: attention, query"),
        ({"rank": 2, "alpha": 1.0, "targets": []}, "LoRA targets are empty"),
    ],
)
def test_bad_lora_settings_are_one_line(kwargs, message):
    with pytest.raises(LLMError, match=message.replace("(", r"\(")):
        replace_linear_with_lora(base_model(), **kwargs)


# --- merging -------------------------------------------------------------------------------------------------
def test_merge_and_unmerge_round_trip():
    model = randomize_b(apply_lora(base_model(), rank=4, alpha=8))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = model(IDS)
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)


def test_merge_lora_leaves_a_plain_gpt_model_with_the_same_logits_and_generations():
    model = randomize_b(apply_lora(base_model(), rank=4, alpha=8))
    adapted = model(IDS)
    greedy = generate(model, IDS[:1], max_new_tokens=6, context_size=24)  # KV cache, head under an adapter
    merge_lora(model)
    assert not lora_layers(model) and isinstance(model.out_head, nn.Linear)
    assert set(model.state_dict()) == set(base_model().state_dict())  # the book's keys again
    torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)
    assert torch.equal(generate(model, IDS[:1], max_new_tokens=6, context_size=24), greedy)


def test_plain_checkpoints_and_exports_refuse_unmerged_adapters(tmp_path):
    from llm.checkpoint import export_hf

    model = apply_lora(base_model(), rank=2, alpha=1.0)
    for write in (lambda: save_checkpoint(model, tmp_path / "m"), lambda: export_hf(model, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="holds LoRA adapters .save them with save_adapter"):
            write()
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf").exists()


# --- peft as the oracle ----------------------------------------------------------------------------------------
def test_the_same_adapters_as_peft_give_the_same_logits():
    """peft on the same GPTModel, with lora_alpha = alpha * rank (peft scales by lora_alpha / r): the same
    layers adapted, the same shapes (peft stores A and B transposed, as nn.Linear weights), the same
    trainable count, and with our A and B copied in, the same logits, merged and not."""
    peft = pytest.importorskip("peft")
    rank, alpha = 4, 2.0
    ours = randomize_b(apply_lora(base_model(), rank=rank, alpha=alpha, targets=["attention", "feed_forward"]))
    names = sorted(lora_layers(ours))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=names, lora_dropout=0.0, bias="none")
    theirs = peft.get_peft_model(base_model(), config)
    adapted = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert sorted(adapted) == names
    with torch.no_grad():
        for name in names:
            mine, peft_layer = lora_layers(ours)[name].lora, adapted[name]
            assert tuple(peft_layer.lora_A["default"].weight.shape) == tuple(mine.A.T.shape)
            assert tuple(peft_layer.lora_B["default"].weight.shape) == tuple(mine.B.T.shape)
            assert peft_layer.scaling["default"] == alpha
            peft_layer.lora_A["default"].weight.copy_(mine.A.T)
            peft_layer.lora_B["default"].weight.copy_(mine.B.T)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert trainable == count_parameters(ours)["trainable"]
    theirs.eval()
    torch.testing.assert_close(theirs(IDS), ours(IDS), rtol=0, atol=1e-5)
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    for key, value in merged_theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6)


# --- adapter checkpoints ----------------------------------------------------------------------------------------
def trained_adapter(tmp_path, classifier=False, targets=None):
    """A base checkpoint on disk and an adapter checkpoint beside it (B random, as after training)."""
    base_dir = tmp_path / "base"
    save_checkpoint(base_model(), base_dir)
    start = read_checkpoint(base_dir)
    model = start.model()
    modules = ()
    if classifier:
        torch.manual_seed(3)
        model = add_classification_head(model, 2, -1)
        modules = ("out_head",)
    randomize_b(apply_lora(model, rank=4, alpha=8, targets=targets, modules_to_save=modules))
    extra = {"classifier": {"num_classes": 2, "max_length": 8, "pooling": "mean"}} if classifier else {}
    lora = {"rank": 4, "alpha": 8.0, "targets": targets or ["attention", "feed_forward", "head"]}
    out = save_adapter(adapter_state_dict(model, modules), tmp_path / "adapter", lora=lora, base=str(base_dir),
                       base_sha256=weights_sha256(start.state), base_config=start.cfg, extra=extra)  # fmt: skip
    return model.eval(), out, base_dir


def test_an_adapter_checkpoint_holds_only_the_adapters_and_loads_merged(tmp_path):
    model, adapter, base_dir = trained_adapter(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(adapter / ADAPTER_WEIGHTS)
    assert len(saved) == 2 * 13 and all(k.endswith((".lora.A", ".lora.B")) for k in saved)
    assert (adapter / ADAPTER_WEIGHTS).stat().st_size < (base_dir / "model.safetensors").stat().st_size / 10
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert meta["base"]["path"] == "../base" and meta["base"]["model"] == str(base_dir)
    for path in (adapter, adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_CONFIG):  # the directory or either file
        loaded = load_checkpoint(path)
        assert not lora_layers(loaded)
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=1e-5)
    assert checkpoint_meta(adapter)["lora"]["rank"] == 4


def test_a_classifier_adapter_carries_its_new_head_and_settings(tmp_path):
    model, adapter, _ = trained_adapter(tmp_path, classifier=True)
    loaded, info = load_classifier(adapter)
    assert info == {"num_classes": 2, "max_length": 8, "pooling": "mean"}
    torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=1e-5)


def test_an_adapter_on_the_wrong_base_is_refused_naming_both(tmp_path):
    _, adapter, base_dir = trained_adapter(tmp_path)
    other = base_model(seed=5)  # same shape, other weights
    save_checkpoint(other, base_dir)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(adapter)
    message = str(err.value)
    assert "\n" not in message and str(adapter) in message and str(base_dir) in message
    assert "holds other weights (sha256" in message

    save_checkpoint(base_model(n_layers=3), base_dir)  # another shape
    with pytest.raises(CheckpointError, match=r"was trained on .*\(2 layers x 36.*is another model \(3 layers x 36"):
        load_checkpoint(adapter)

    import shutil

    shutil.rmtree(base_dir)
    with pytest.raises(CheckpointError, match="cannot read its base model .*does not exist"):
        load_checkpoint(adapter)


def test_a_malformed_adapter_config_names_the_file(tmp_path):
    _, adapter, _ = trained_adapter(tmp_path)
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
    meta["lora"]["alpha"] = "big"
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lora.json: lora.alpha must be a number > 0, got 'big'"):
        load_checkpoint(adapter)


def _relabel(file, dtype: bytes) -> None:
    """Every tensor of a safetensors file relabelled `dtype` in its header: the same bytes, read as another type."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"dtype":"F32"', b'"dtype":"' + dtype + b'"')
    assert len(header) == n
    file.write_bytes(data[:8] + header + data[8 + n :])


def _damage_tensor(file, key_end: str, value: float, whole: bool = False) -> None:
    """`value` written into the first element (or the whole) of the first tensor whose name ends with `key_end`."""
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    key = next(k for k in sorted(state) if k.endswith(key_end))
    state[key] = state[key].clone()
    (state[key] if whole else state[key].view(-1)[:1]).fill_(value)
    save_file(state, file)


ALLOWED = "allowed: 0 < alpha <= 10000"
# Each damage the issue found (and its kin), as (what it does to the adapter, the file and the line it gives):
# each answered "not spam (spam probability nan)" with exit 0 before lora.json and the tensors were checked.
DAMAGES = {
    "alpha Infinity": ({"alpha": float("inf")}, f"lora.json: lora.alpha must be a number > 0, got inf; {ALLOWED}"),
    "alpha 1e308": ({"alpha": 1e308}, f"lora.json: lora.alpha must be a number > 0, got 1e+308; {ALLOWED}"),
    "alpha NaN": ({"alpha": float("nan")}, f"lora.json: lora.alpha must be a number > 0, got nan; {ALLOWED}"),
    "alpha over the bound": ({"alpha": 2e4}, f"lora.json: lora.alpha must be a number > 0, got 20000.0; {ALLOWED}"),
    "rank 0": ({"rank": 0}, "lora.json: lora.rank must be a whole number >= 1, got 0"),
    "rank missing": ({"rank": ...}, "lora.json: lora.rank must be a whole number >= 1, got None"),
    "rank a fraction": ({"rank": 4.5}, "lora.json: lora.rank must be a whole number >= 1, got 4.5"),
    "rank not the tensors'": (
        {"rank": 8},
        "lora.safetensors: the adapter of trf_blocks.0.att.W_key (A (36, 4), B (4, 36)) does not fit its weight "
        "(36, 36) of rank 8",
    ),
    "tensors relabelled int32": (
        b"I32",
        "lora.safetensors: {key} is torch.int32; an adapter's tensors are floating point",
    ),
    "a NaN in A": (
        (".lora.A", float("nan")),
        "lora.safetensors: trf_blocks.0.att.W_key.lora.A holds NaN or infinite values",
    ),
    "an inf in the saved head": (
        ("out_head.weight", float("inf")),
        "lora.safetensors: out_head.weight holds NaN or infinite values",
    ),
    "a merge that overflows": (
        ("W_query.lora.B", 3e38, True),  # finite, but alpha 8 x A @ B is not
        "lora.safetensors: merging the adapter of trf_blocks.0.att.W_query gives trf_blocks.0.att.W_query.weight NaN "
        "or infinite values (alpha 8 x A @ B overflows torch.float32, or the base weight is not finite)",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_adapter_is_refused_in_one_line_naming_the_file_and_key(tmp_path, capsys, damage):
    """`alpha` Infinity or 1e308 in lora.json, tensors relabelled int32, a NaN in a tensor: the loader and
    `llm classify` refuse with one line naming the file and the key, never a NaN probability read as a label."""
    from safetensors import safe_open

    from llm.cli import main

    _, adapter, _ = trained_adapter(tmp_path, classifier=True)
    how, message = DAMAGES[damage]
    if isinstance(how, dict):  # lora.json (json writes inf and nan as Infinity and NaN, as in the file)
        meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
        meta["lora"] = {k: v for k, v in {**meta["lora"], **how}.items() if v is not ...}
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(meta))
    elif isinstance(how, bytes):
        _relabel(adapter / ADAPTER_WEIGHTS, how)
        with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:  # the file's first tensor is the one named
            message = message.format(key=next(iter(f.keys())))
    else:
        _damage_tensor(adapter / ADAPTER_WEIGHTS, *how)
    with pytest.raises(CheckpointError) as err:
        load_classifier(adapter)
    assert str(err.value) == f"{adapter / message}"
    assert main(["classify", "--model", str(adapter), "You won a prize, call now"]) == 2
    assert capsys.readouterr() == ("", f"llm classify: error: {adapter / message}\n")


def test_an_adapter_at_the_alpha_bound_still_loads(tmp_path):
    """The bound is params.yaml's (`llm.bounds.MAX_LORA_ALPHA`): an adapter a stage may write loads."""
    from llm.bounds import MAX_LORA_ALPHA

    model, adapter, _ = trained_adapter(tmp_path)
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
    meta["lora"]["alpha"] = MAX_LORA_ALPHA
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(meta))
    for layer in lora_layers(model).values():
        layer.lora.alpha = MAX_LORA_ALPHA
    expected = model(IDS).detach()
    scale = float(expected.abs().max())  # alpha 10,000 makes large logits: compare to their scale
    torch.testing.assert_close(load_checkpoint(adapter)(IDS), expected, rtol=0, atol=1e-5 * scale)


def test_the_cli_takes_an_adapter_wherever_it_takes_a_model(tmp_path, capsys):
    from llm.cli import main

    model, adapter, _ = trained_adapter(tmp_path)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    save_checkpoint(merged, tmp_path / "merged")
    outputs = []
    for path in (adapter, tmp_path / "merged"):
        assert main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]

    assert main(["export", "--model", str(adapter), "--out", str(tmp_path / "hf")]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), rtol=0, atol=1e-4)


def test_the_cli_classifies_with_a_classifier_adapter(tmp_path, capsys):
    from llm.cli import main

    model, adapter, _ = trained_adapter(tmp_path, classifier=True)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    save_classifier(merged, tmp_path / "merged", max_length=8, pooling="mean")
    answers = []
    for path in (adapter, tmp_path / "merged"):
        assert main(["classify", "--model", str(path), "You won a prize, call now"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and "spam probability" in answers[0]


def test_lora_layer_repr_names_its_shape():
    assert "rank=4, alpha=8" in repr(LoRALayer(6, 5, 4, 8.0))


# --- both finetuning stages --------------------------------------------------------------------------------------
def lora_project(folder, **lora):
    from tests.test_distributed import finetune_project

    project = finetune_project(folder, nproc=1, batch_size=4)
    raw = json.loads((project / "params.yaml").read_text())
    for section in ("finetune_spam", "finetune_instruct", "finetune_dpo"):
        raw[section]["lora"].update(lora)
    (project / "params.yaml").write_text(json.dumps(raw))
    return project


@pytest.mark.parametrize("stage", ["finetune_spam", "finetune_instruct", "finetune_dpo"])
def test_every_finetuning_stage_finetunes_with_lora_and_writes_both_checkpoints(tmp_path, stage):
    """LoRA on in the stage: only adapters (and the spam head) train; the metrics count them; the merged
    model and the adapter checkpoint load to the same logits; the timings hold the peak memory, the threads
    and the CPU capability (docs/reliability.md)."""
    from tests.test_distributed import run_module

    project = lora_project(tmp_path / "p", rank=2, alpha=4.0, targets=["attention", "head"])
    out = run_module(f"stages.{stage}", project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRA rank 2, alpha 4 on attention, head: " in out.stdout
    metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
    emb, layers, vocab = 16, 1, 50257
    attention = layers * 4 * (emb * 2 + 2 * emb)
    head = emb * 2 + 2 if stage == "finetune_spam" else emb * 2 + 2 * vocab  # new head in full / its adapter
    assert metrics["parameters"]["trainable"] == attention + head
    assert metrics["parameters"]["total"] > 10 * metrics["parameters"]["trainable"]
    timings = json.loads((project / "timings" / f"{stage}.json").read_text())
    assert timings["peak_rss_mib"] > 50
    threads = json.loads((project / "params.yaml").read_text())["runtime"]["threads"]
    assert (timings["threads"], timings["cpu_capability"]) == (threads, torch.backends.cpu.get_cpu_capability())

    model_dir = project / "models" / stage.removeprefix("finetune_")
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["lora"] == {"rank": 2, "alpha": 4.0, "targets": ["attention", "head"],
                            "modules_to_save": ["out_head"] if stage == "finetune_spam" else []}  # fmt: skip
    adapter = json.loads((model_dir / "adapter" / ADAPTER_CONFIG).read_text())
    assert adapter["base"]["path"] == "../../pretrain" and adapter["base"]["model"] == "models/pretrain"
    assert adapter["base"]["sha256"] == weights_sha256(read_checkpoint(project / "models" / "pretrain").state)
    if stage == "finetune_spam":
        merged, info = load_classifier(model_dir)
        from_adapter, info_adapter = load_classifier(model_dir / "adapter")
        assert info == info_adapter
    else:
        merged, from_adapter = load_checkpoint(model_dir), load_checkpoint(model_dir / "adapter")
        assert checkpoint_meta(model_dir / "adapter")["instruct"]["prompt_style"] == "alpaca"
        answers = [  # `llm instruct` takes either, with the prompt style the stage recorded
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llm",
                    "instruct",
                    "--model",
                    str(path),
                    "Name a color.",
                    "--max-new-tokens",
                    "4",
                ],
                cwd=project,
                capture_output=True,
                text=True,
            )  # fmt: skip
            for path in (model_dir, model_dir / "adapter")
        ]
        assert answers[0].returncode == answers[1].returncode == 0, answers[1].stderr
        assert answers[0].stdout == answers[1].stdout
        if stage == "finetune_instruct":
            # a stage's init takes an adapter: the spam classifier starts from the merged instruction model
            raw = json.loads((project / "params.yaml").read_text())
            raw["finetune_spam"].update(init="models/instruct/adapter", num_epochs=1)
            raw["finetune_spam"]["lora"]["rank"] = 0
            (project / "params.yaml").write_text(json.dumps(raw))
            out = run_module("stages.finetune_spam", project)
            assert out.returncode == 0, out.stderr[-3000:]
            spam = json.loads((project / "models" / "spam" / "config.json").read_text())
            assert spam["training"]["init"] == "models/instruct/adapter"
    torch.testing.assert_close(from_adapter(IDS), merged(IDS), rtol=0, atol=1e-5)

    # LoRA off again: full finetuning, and the adapter of the earlier run is gone with it
    raw = json.loads((project / "params.yaml").read_text())
    raw[stage]["lora"]["rank"] = 0
    (project / "params.yaml").write_text(json.dumps(raw))
    out = run_module(f"stages.{stage}", project)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]
    assert not (model_dir / "adapter").exists() and "lora" not in json.loads((model_dir / "config.json").read_text())


def test_lora_under_two_processes_trains_like_one_at_twice_the_batch(tmp_path):
    """DDP with frozen weights: only the adapters' and the head's gradients are all-reduced; dropout 0,
    2 processes at batch 2 give the curve and metrics of 1 process at batch 4."""
    from tests.test_distributed import finetune_project, run_module

    runs = {}
    for nproc, batch in ((2, 2), (1, 4)):
        project = finetune_project(tmp_path / f"n{nproc}", nproc, batch)
        raw = json.loads((project / "params.yaml").read_text())
        raw["finetune_spam"]["lora"].update(rank=2, alpha=4.0)
        (project / "params.yaml").write_text(json.dumps(raw))
        out = run_module("stages.finetune_spam", project)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[nproc] = json.loads((project / "metrics" / "finetune_spam.json").read_text())
        assert (project / "models" / "spam" / "adapter" / ADAPTER_WEIGHTS).is_file()
    two, one = runs[2], runs[1]
    assert two["parameters"] == one["parameters"] and two["steps"] == one["steps"]
    for split in ("train", "val", "test"):
        assert two[split]["accuracy"] == one[split]["accuracy"]
        assert two[split]["loss"] == pytest.approx(one[split]["loss"], abs=1e-4)


def test_an_interrupted_lora_run_resumes_bit_for_bit(tmp_path):
    """The resume state holds the adapters (and only they and the optimizer's moments for them change):
    stopped after step 2 and resumed, the run ends with the weights of an uninterrupted one."""
    from llm.loaders import make_loaders
    from llm.trainer import Trainer, TrainingInterrupted
    from tests.test_distributed import CFG, datasets, settings

    def run(folder, stop_after=None):
        torch.manual_seed(7)
        model = apply_lora(GPTModel({**CFG, "drop_rate": 0.1}), rank=2, alpha=4.0)
        trainer = None

        def on_record(h):
            if h.step[-1] == stop_after:
                trainer.request_stop()

        s = settings(4)
        trainer = Trainer(model, make_loaders(*datasets(), s), s, state_path=folder / "state.pt", run_id="lora",
                          on_record=on_record, progress=False, log=lambda m: None)  # fmt: skip
        try:
            trainer.fit()
        except TrainingInterrupted:
            return None
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = run(tmp_path / "plain")
    assert run(tmp_path / "cut", stop_after=2) is None and (tmp_path / "cut" / "state.pt").is_file()
    resumed = run(tmp_path / "cut")
    assert resumed.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(resumed[key], value), key
    torch.manual_seed(7)
    frozen = GPTModel({**CFG, "drop_rate": 0.1})
    assert torch.equal(resumed["trf_blocks.0.att.W_query.linear.weight"], frozen.trf_blocks[0].att.W_query.weight)


def test_llm_serve_takes_an_adapter_like_any_model(tmp_path):
    from llm.serve.registry import CLASSIFIER, LANGUAGE, load_models

    classifier, spam_adapter, _ = trained_adapter(tmp_path / "spam", classifier=True)
    language, lm_adapter, _ = trained_adapter(tmp_path / "lm")
    served = load_models([f"spam={spam_adapter}", f"lm={lm_adapter}"])
    assert (served["spam"].kind, served["lm"].kind) == (CLASSIFIER, LANGUAGE)
    assert served["spam"].classifier == {"num_classes": 2, "max_length": 8, "pooling": "mean"}
    torch.testing.assert_close(served["spam"].model(IDS), classifier(IDS), rtol=0, atol=1e-5)
    torch.testing.assert_close(served["lm"].model(IDS), language(IDS), rtol=0, atol=1e-5)


def test_flops_count_the_adapters_matrices_without_the_model_knowing_lora():
    """`GPTModel.num_params(matmul_only=True)` (6·N FLOPs per token) counts every matrix but the
    embeddings: the linear weights, and once wrapped, each adapter's A and B."""
    model = base_model()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert model.num_params(matmul_only=True) == linear
    apply_lora(model, rank=4, alpha=8)
    adapters = sum(m.lora.A.numel() + m.lora.B.numel() for m in lora_layers(model).values())
    assert adapters > 0 and model.num_params(matmul_only=True) == linear + adapters
