"""params.yaml validation: one line naming the key and what is allowed."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from pydantic import BaseModel

from llm.bounds import MAX_MASK_BYTES, MAX_PARAMS, MAX_SEED
from llm.choices import POOLINGS, PROMPT_STYLES
from llm.config import config_for_weights, estimate_params, mask_bytes
from llm.errors import ConfigError
from llm.model import PRESETS, GPTModel
from llm.pipeline import params as params_module
from llm.pipeline.params import Params, load_params, parse_params, schema_text
from llm.pipeline.sources import load_sources, parse_sources
from llm.pipeline.validate import missing_keys
from llm.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer
from tests.conftest import ROOT, committed, committed_yaml

RAW = committed_yaml("params.yaml")  # the committed defaults, whatever `dvc exp apply` left in the workspace


def with_change(path, value):
    raw = copy.deepcopy(RAW)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


def test_committed_params_are_valid_and_typed(tmp_path):
    (tmp_path / "params.yaml").write_text(committed("params.yaml"))
    p = load_params(tmp_path / "params.yaml")
    assert p.train.lr == 0.0004 and isinstance(p.train.lr, float)
    assert p.model.config()["emb_dim"] == 256
    assert p.data.corpus == ["the-verdict"]


@pytest.mark.parametrize(
    "change, message",
    [
        ("", "params.yaml is empty: it must hold every setting"),
        ("# truncated\n", "params.yaml is empty"),
        ("drop train.lr", "params.yaml: train.lr is missing: write every key, as the committed params.yaml does"),
        ("drop finetune_spam.lora.alpha", "finetune_spam.lora.alpha is missing"),
        ("drop eval", "params.yaml: eval is missing: write every key"),
        ("drop runtime.replicate runtime.threads", "runtime.replicate is missing (and 1 more)"),
    ],
)
def test_the_file_a_stage_runs_with_writes_every_key(tmp_path, change, message):
    """DVC records params.yaml, not the defaults: an empty (e.g. truncated) file, or one without a
    section or key, stops the stage with one line naming the first key missing (it ran on the defaults
    without a word). Code that builds settings (`parse_params`) may still leave keys to their defaults."""
    if change.startswith("drop "):
        raw = copy.deepcopy(RAW)
        for key in change.split()[1:]:
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            del node[last]
        text = json.dumps(raw)
    else:
        text = change
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    parse_params(json.loads(text) if text.startswith("{") else None)  # the lenient parser takes it


@pytest.mark.parametrize("section", ["train", "finetune_spam", "finetune_instruct"])
def test_nproc_per_node_is_bounded(section):
    from llm.bounds import MAX_NPROC_PER_NODE

    assert getattr(parse_params(with_change(f"{section}.nproc_per_node", MAX_NPROC_PER_NODE)), section)
    with pytest.raises(ConfigError) as err:  # was accepted: torchrun would try to start a billion processes
        parse_params(with_change(f"{section}.nproc_per_node", 10**9))
    assert str(err.value) == f"{section}.nproc_per_node must be <= {MAX_NPROC_PER_NODE}, got 1000000000"


def test_the_committed_params_write_every_key():
    assert missing_keys(Params, RAW) == []


def test_sources_are_their_own_file_not_params(tmp_path):
    (tmp_path / "sources.yaml").write_text(committed("sources.yaml"))
    sources = load_sources(tmp_path / "sources.yaml")
    assert sources["the-verdict"].sha256.startswith("b41e41a6") and sources["sms_spam"].member == "SMSSpamCollection"
    with pytest.raises(ConfigError, match="the-verdict.sha256 must be 64 hex"):
        parse_sources({"the-verdict": {"url": "x.txt", "sha256": "abc"}})
    with pytest.raises(ConfigError, match="unknown key the-verdict.sha; allowed: url, sha256, member"):
        parse_sources({"the-verdict": {"url": "x.txt", "sha": "abc"}})
    with pytest.raises(ConfigError, match="sources belong in sources.yaml"):
        parse_params({**RAW, "sources": {}})


def test_preset_and_overrides():
    raw = with_change("model.preset", "gpt-config-124m")
    raw["model"]["context_length"] = 256
    cfg = parse_params(raw).model.config()
    assert (cfg["emb_dim"], cfg["n_layers"], cfg["context_length"]) == (768, 12, 256)
    assert parse_params(with_change("model.preset", "gpt2-medium")).model.config()["n_heads"] == 16


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("train.lr", "fast", "train.lr must be a number, got the string 'fast'"),
        ("train.lr", -0.1, "train.lr must be > 0, got -0.1"),
        ("train.lr", float("nan"), "train.lr must be a finite number, got nan"),
        ("train.weight_decay", float("inf"), "train.weight_decay must be a finite number, got inf"),
        ("train.min_lr", 0.1, "train.min_lr (0.1) must be <= lr (0.0004)"),
        ("train.lr", True, "train.lr must be a number, got True"),
        ("train.lrr", 0.1, "unknown key train.lrr; allowed: seed, num_epochs"),
        ("train.num_epochs", 2.5, "train.num_epochs must be an integer"),
        ("train.num_epochs", "3", "train.num_epochs must be an integer, got the string '3'"),
        ("data.train_ratio", 1.0, "data.train_ratio must be < 1, got 1.0"),
        ("data.train_ratio", 0, "data.train_ratio must be > 0, got 0"),
        ("data.corpus", [], "data.corpus must not be empty"),
        ("train", 3, "train must be a mapping, got 3"),
        ("train.max_length", 512, "train.max_length (512) must be <= the model's context_length (256)"),
        ("model.preset", "gpt5", "model.preset must be one of mini, gpt-config-124m, gpt2-small"),
        ("model.n_heads", 5, "divisible"),
        ("model.tie_embeddings", "maybe", "model.tie_embeddings must be"),
        ("model.tie_embeddings", None, "model.tie_embeddings must be"),
        ("train.precision", "fp16", "train.precision must be one of fp32, bf16-mixed; got 'fp16'"),
        ("train.lr_schedule", "linear", "train.lr_schedule must be one of constant, cosine; got 'linear'"),
        ("finetune_dpo.optimizer", "sgd", "finetune_dpo.optimizer must be one of adamw, muon; got 'sgd'"),
        ("eval.top_k", 0, "eval.top_k must be > 0"),
        (
            "finetune_spam.train_frac",
            0.95,
            "finetune_spam.train_frac and finetune_spam.validation_frac must be in (0, 1)",
        ),
        ("finetune_spam.pooling", "max", "finetune_spam.pooling must be one of last, last_nonpad, mean; got 'max'"),
        ("finetune_spam.trainable_blocks", -2, "finetune_spam.trainable_blocks must be >= -1"),
        ("finetune_spam.lr", 0, "finetune_spam.lr must be > 0"),
        ("finetune_spam.min_lr", 0.1, "finetune_spam.min_lr (0.1) must be <= lr (0.0002)"),
        ("finetune_instruct.test_frac", 0.2, "finetune_instruct.train_frac and finetune_instruct.test_frac must be in"),
        ("finetune_instruct.prompt_style", "chatml", "finetune_instruct.prompt_style must be one of alpaca, phi3"),
        ("finetune_instruct.judge", "gpt4", "finetune_instruct.judge must be one of none, ollama"),
        ("finetune_instruct.num_epochs", 0, "finetune_instruct.num_epochs must be > 0"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ConfigError) as err:
        parse_params(with_change(path, value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_starting_from_weights_takes_their_shape_and_reports_conflicts():
    weights = {**parse_params(RAW).model.config(), "emb_dim": 768, "n_heads": 12, "context_length": 1024}
    raw = with_change("model.init", "gpt2-small")
    cfg, notes = config_for_weights(weights, parse_params(raw).model.overrides(), "gpt2-small")
    assert cfg == weights and "model.preset is not used" in notes[0]

    raw["model"].update(drop_rate=0.1, context_length=256)
    cfg, notes = config_for_weights(weights, parse_params(raw).model.overrides(), "gpt2-small")
    assert (cfg["drop_rate"], cfg["context_length"], cfg["emb_dim"]) == (0.1, 256, 768)
    assert "model.context_length: 1024 -> 256" in notes

    for key, value, message in [
        ("emb_dim", 512, "model.emb_dim = 512 conflicts with gpt2-small, which has 768"),
        ("qkv_bias", True, "model.qkv_bias = True conflicts"),
        ("context_length", 2048, "model.context_length = 2048 is longer than gpt2-small's 1024"),
    ]:
        bad = with_change("model.init", "gpt2-small")
        bad["model"][key] = value
        with pytest.raises(ConfigError, match=message):
            config_for_weights(weights, parse_params(bad).model.overrides(), "gpt2-small")


def test_init_values():
    with pytest.raises(ConfigError, match="model.init 'pretrain'"):
        parse_params(with_change("model.init", "pretrain"))
    # from weights, train.max_length is checked against their context once they are loaded
    raw = with_change("model.init", "gpt2-small")
    raw["train"]["max_length"] = 1024
    assert parse_params(raw).train.max_length == 1024
    assert parse_params(with_change("train.num_epochs", 0)).train.num_epochs == 0
    with pytest.raises(ConfigError, match="train.num_epochs must be >= 0"):
        parse_params(with_change("train.num_epochs", -1))


def test_scientific_notation_is_a_number_as_dvc_writes_it(tmp_path):
    """Read as YAML 1.2, like DVC: `4e-4`, and `5e-05` as `dvc exp run -S finetune_spam.lr=5.0e-5` writes it."""
    text = committed("params.yaml").replace("lr: 0.0004", "lr: 4e-4").replace("lr: 2.0e-4", "lr: 5e-05")
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "4e-4"  # what YAML 1.1 (PyYAML) would have made of it
    p = load_params(tmp_path / "params.yaml")
    assert p.train.lr == 0.0004 and p.finetune_spam.lr == 5e-05


def test_a_missing_key_takes_the_committed_value():
    """One set of defaults: the schema's default of every key is the committed params.yaml's value."""
    assert Params() == parse_params(RAW) == parse_params({})
    defaults = Params().model_dump()
    for section, values in RAW.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}: the schema's default differs from params.yaml"
    assert (
        parse_params(with_change("finetune_spam.pooling", KeyError)).finetune_spam.pooling
        == RAW["finetune_spam"]["pooling"]
    )


def test_allowed_values_come_from_the_registries():
    schema = json.loads(schema_text())["$defs"]
    assert schema["SpamParams"]["properties"]["pooling"]["enum"] == list(POOLINGS)
    assert schema["InstructParams"]["properties"]["prompt_style"]["enum"] == list(PROMPT_STYLES)
    assert "the book" in schema["SpamParams"]["properties"]["pooling"]["description"]  # what an editor shows


def test_the_registries_implement_exactly_the_allowed_names():
    """llm.choices holds the names without the code; each registry of functions has one per name."""
    from llm.choices import LORA_GROUPS, LORA_LEAVES, LORA_TARGETS
    from llm.lora import LEAF_PATHS, TARGETS
    from llm.pooling import POOL
    from llm.prompts import STYLES

    assert tuple(POOL) == POOLINGS and tuple(STYLES) == PROMPT_STYLES
    assert tuple(LEAF_PATHS) == LORA_LEAVES and TARGETS == LORA_TARGETS
    assert all(leaf in LORA_LEAVES for group in LORA_GROUPS.values() for leaf in group)
    from types import SimpleNamespace

    from llm.choices import LR_SCHEDULES
    from llm.schedule import lr_at

    for name in LR_SCHEDULES:  # every name has a rate; any other is refused, not taken for cosine
        assert lr_at(5, 10, SimpleNamespace(lr=0.1, min_lr=0.0, warmup_steps=0, lr_schedule=name)) > 0
    with pytest.raises(ConfigError, match="unknown lr_schedule 'linear'; allowed: constant, cosine"):
        lr_at(5, 10, SimpleNamespace(lr=0.1, min_lr=0.0, warmup_steps=0, lr_schedule="linear"))


# The modules a stage may need only for what it runs: parsing params.yaml imports none of them.
IMPLEMENTATIONS = (
    "torch", "tiktoken", "llm.model", "llm.lora", "llm.judge", "llm.pooling", "llm.prompts", "llm.runtime",
    "llm.schedule", "llm.trainer", "llm.tokenizer", "llm.serve",
)  # fmt: skip


def test_parsing_params_imports_no_torch_and_no_implementation():
    code = (
        "import sys; from llm.pipeline.params import load_params; load_params('params.yaml'); "
        f"print(sorted(m for m in {IMPLEMENTATIONS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_committed_json_schema_is_current_and_accepts_params_yaml():
    jsonschema = pytest.importorskip("jsonschema")
    assert committed("params.schema.json") == schema_text(), (
        "regenerate: python -m llm.pipeline.params > params.schema.json"
    )
    schema = json.loads(schema_text())
    jsonschema.validate(RAW, schema)
    assert committed("params.yaml").startswith("# yaml-language-server: $schema=params.schema.json\n")
    for path, value in [("finetune_spam.pooling", "max"), ("train.lrr", 1), ("train.lr", -1)]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(with_change(path, value), schema)


# --- fuzzing: every key of every section, every kind of bad value ---------------------------------
SECTIONS = {name: field.annotation for name, field in Params.model_fields.items()}
FIELDS = [(section, key) for section, model in SECTIONS.items() for key in model.model_fields]
FUZZ = [
    None, True, False, 0, 1, -1, 2, 2**31, MAX_SEED + 1, 2**64, -(2**63), 10**400,
    0.0, 0.5, -0.5, 1.0, 1.5, 1e-320, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf,
    "", " ", "x", "1", "0.1", "null", "auto", "cuda:0", "scratch", "gpt2-small", "\n",
    [], [""], ["x"], [1], [None], {}, {"a": 1},
]  # fmt: skip


def assert_usable(p: Params):
    """What the code does first with settings that validated, on the cheap: none of it may fail."""
    tokenizer = get_tokenizer()
    for seed in (p.train.seed, p.eval.seed, p.finetune_spam.seed, p.finetune_instruct.seed, p.finetune_dpo.seed):
        np.random.RandomState(seed)  # numpy and pandas' random_state
        torch.Generator().manual_seed(seed)
    for loop in (p.train, p.finetune_spam, p.finetune_instruct, p.finetune_dpo):
        assert 0 < 1 - loop.lr * loop.weight_decay <= 1  # AdamW's decay factor per step
        assert 0 <= loop.min_lr <= loop.lr and math.isfinite(loop.grad_clip)
        if loop.device != "auto":
            torch.device(loop.device)
    if p.eval.temperature > 0:  # generate's sampling, with a top_k-masked logit
        logits = torch.tensor([[40.0, -40.0, float("-inf")]])
        assert torch.softmax(logits / p.eval.temperature, dim=-1)[:, :2].isfinite().all()
    for eos_id in (p.finetune_instruct.eos_id, p.finetune_dpo.eos_id):
        if eos_id is not None:
            tokenizer.decode([eos_id])
    assert math.isfinite(-torch.nn.functional.logsigmoid(torch.tensor(p.finetune_dpo.beta * -40.0)).item())
    cfg = p.model.config()
    tokenizer.decode([cfg["vocab_size"] - 1])  # the largest id the model can sample
    if p.model.init == "scratch":  # a model that can be built, and saved with the book's masks
        assert estimate_params(cfg) <= MAX_PARAMS and mask_bytes(cfg) <= MAX_MASK_BYTES
        with torch.device("meta"):  # the shapes, nothing allocated
            assert GPTModel(cfg).num_params() == estimate_params(cfg)


def assert_one_line_naming(raw, key):
    """`raw` validates into usable settings, or is refused by a ConfigError of one line that names `key`."""
    try:
        params = parse_params(raw)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert key in message, f"{key!r} not named in: {message}"
    else:
        assert_usable(params)
    # any other exception type fails the test as it is


def test_fuzz_covers_every_section_and_key():
    assert set(SECTIONS) == {
        "data", "model", "train", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo", "runtime"
    }  # fmt: skip
    assert all(isinstance(m, type) and issubclass(m, BaseModel) for m in SECTIONS.values())
    assert len(FIELDS) > 80


@pytest.mark.parametrize("section, key", FIELDS, ids=[f"{s}.{k}" for s, k in FIELDS])
def test_fuzz_every_value_validates_or_names_the_key(section, key):
    for value in FUZZ:
        assert_one_line_naming(with_change(f"{section}.{key}", value), f"{section}.{key}")
    # missing: the committed default
    raw = with_change(f"{section}.{key}", KeyError) if key in RAW.get(section, {}) else copy.deepcopy(RAW)
    assert getattr(getattr(parse_params(raw), section), key) == getattr(getattr(Params(), section), key)
    # unknown and misspelled keys
    fields = SECTIONS[section].model_fields
    for typo in {key + "s", key[:-1], key.upper(), key.replace("_", "-"), key.replace("_", ""), f" {key}"}:
        if typo in fields:
            continue
        raw = copy.deepcopy(RAW)
        raw[section][typo] = raw[section].get(key, 1)
        with pytest.raises(ConfigError) as err:
            parse_params(raw)
        assert str(err.value).startswith(f"unknown key {section}.{typo}; allowed: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_fuzz_sections(section):
    raw = copy.deepcopy(RAW)
    del raw[section]  # a missing section takes the committed defaults
    assert getattr(parse_params(raw), section) == getattr(Params(), section)
    for value in (None, [], [1], "x", "", 0, 1.5, math.nan, True):
        raw = copy.deepcopy(RAW)
        raw[section] = value
        with pytest.raises(ConfigError) as err:
            parse_params(raw)
        assert str(err.value).startswith(f"{section} must be a mapping") and "\n" not in str(err.value)
    for typo in {section + "s", section[:-1], section.upper(), section.replace("_", "-"), "x" + section} - {section}:
        raw = copy.deepcopy(RAW)
        raw[typo] = raw[section]
        with pytest.raises(ConfigError) as err:
            parse_params(raw)
        assert str(err.value).startswith(f"unknown key {typo}; allowed: data, model, train") and "\n" not in str(
            err.value
        )


def test_fuzz_the_whole_file():
    assert parse_params(None) == Params()  # an empty file: every default
    for value in ([], "x", 3, 1.5, True, [RAW]):
        with pytest.raises(ConfigError) as err:
            parse_params(value)
        assert "must be a mapping" in str(err.value) and "\n" not in str(err.value)
    for key in (1, None, "", "bogus", "eval ", "Eval"):
        raw = {**copy.deepcopy(RAW), key: {}}
        with pytest.raises(ConfigError) as err:
            parse_params(raw)
        assert str(err.value).startswith(f"unknown key {key}") and "\n" not in str(err.value)
    del RAW["eval"]  # a file without an eval section (restored below)
    try:
        assert parse_params(RAW).eval == Params().eval
    finally:
        RAW["eval"] = committed_yaml("params.yaml")["eval"]


# --- the bounds that keep a run possible -----------------------------------------------------------
@pytest.mark.parametrize(
    "path, good, bad, message",
    [
        ("train.seed", [0, MAX_SEED], [-1, MAX_SEED + 1], "train.seed must be"),
        ("eval.seed", [0, MAX_SEED], [-1, 2**64], "eval.seed must be"),
        ("finetune_spam.seed", [MAX_SEED], [MAX_SEED + 1], "finetune_spam.seed must be <= 4294967295"),
        ("finetune_instruct.seed", [0], [-5], "finetune_instruct.seed must be >= 0, got -5"),
        ("train.lr", [1e-9, 1.0], [1.0001, 10.0, 1e308], "train.lr must be <= 1"),
        ("finetune_spam.lr", [1.0], [2.0], "finetune_spam.lr must be <= 1"),
        ("finetune_instruct.lr", [0.5], [3.0], "finetune_instruct.lr must be <= 1"),
        ("train.weight_decay", [0, 0.01, 1.0], [1.5, 1e308], "train.weight_decay must be <= 1"),
        ("train.grad_clip", [0.0, 1.0, 1e308], [-1.0, math.inf, math.nan], "train.grad_clip must be"),
        ("train.min_lr", [0.0, 0.0004], [math.inf, -1e-9], "train.min_lr must be"),
        ("finetune_instruct.eos_id", [0, 50256, None], [50257, -1], "finetune_instruct.eos_id must be"),
        ("model.vocab_size", [50257, 1000], [50258, 10**9], "model.vocab_size must be <= 50257"),
        ("train.device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"], ["gpu", "", "cuda:", "CPU", "cuda:x"],
         "train.device must be one of auto, cpu, cuda, cuda:N, mps; got"),
        ("finetune_spam.device", ["cuda:1"], ["tpu"], "finetune_spam.device must be one of"),
        ("eval.temperature", [0, 0.001, 1.4, 100], [1e-4, 1e-300, 100.5, 1e308], "eval.temperature must be"),
        ("eval.prompts", [["a", "b"]], [[""], ["a", ""]], "eval.prompts."),
        ("data.corpus", ["x.txt", ["a", "b"]], ["", ["a", ""]], "data.corpus.0" if False else "data.corpus."),
        ("finetune_instruct.data", ["my.json"], [""], "finetune_instruct.data must not be empty"),
    ],
)  # fmt: skip
def test_bounds(path, good, bad, message):
    for value in good:
        parse_params(with_change(path, value))
    for value in bad:
        with pytest.raises(ConfigError) as err:
            parse_params(with_change(path, value))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_lr_times_weight_decay_stays_below_one():
    raw = with_change("train.lr", 1.0)
    raw["train"]["weight_decay"] = 1.0
    with pytest.raises(ConfigError, match=r"^train.weight_decay \(1.0\) times lr \(1.0\) must be < 1"):
        parse_params(raw)
    raw["train"]["weight_decay"] = 0.99
    assert parse_params(raw).train.weight_decay == 0.99


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_parameter_estimate_is_exact(preset):
    with torch.device("meta"):  # shapes only: nothing allocated
        for cfg in (PRESETS[preset], {**PRESETS[preset], "qkv_bias": not PRESETS[preset]["qkv_bias"]}):
            assert estimate_params(cfg) == GPTModel(cfg).num_params()
    assert estimate_params(PRESETS[preset]) <= MAX_PARAMS and mask_bytes(PRESETS[preset]) <= MAX_MASK_BYTES


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"emb_dim": 10**6}, "model: model.emb_dim give 48,100,812,000,000 parameters, more than the limit of "
         "2,000,000,000 (preset gpt2-xl: 1,638,022,400); choose smaller sizes"),
        ({"n_layers": 10**5, "emb_dim": 512, "n_heads": 8}, "model: model.emb_dim, model.n_heads, model.n_layers give"),
        ({"preset": "gpt2-xl", "n_layers": 60}, "model: model.n_layers give 2,"),
        ({"context_length": 10**8}, "model: model.context_length give"),
        ({"context_length": 20_000}, "model: model.context_length: preset mini's n_layers (4) attention masks of "
         "model.context_length (20000) squared floats take 6.0 GiB in every checkpoint, more than the limit of 4 GiB"),
        ({"n_heads": 3}, "model: preset mini's emb_dim (256) must be divisible by model.n_heads (3)"),
        ({"emb_dim": 102}, "model: model.emb_dim (102) must be divisible by preset mini's n_heads (4)"),
        ({"context_length": 128}, "train.max_length (256) must be <= model.context_length (128)"),
    ],
)  # fmt: skip
def test_absurd_shapes_are_refused_before_allocation(changes, message):
    raw = copy.deepcopy(RAW)
    raw["model"].update(changes)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # from weights the shape is theirs: only the divisibility of an explicit override is checked here
    raw["model"]["init"] = "gpt2-small"
    if "n_heads" not in changes and "emb_dim" not in changes or "n_layers" in changes:
        parse_params(raw)


def test_the_largest_allowed_context_fits_the_mask_limit():
    raw = with_change("model.context_length", 16384)  # 4 layers x 16384^2 x 4 bytes = 4 GiB exactly
    assert parse_params(raw).model.config()["context_length"] == 16384


# --- sources.yaml: every download verified ----------------------------------------------------------
SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


@pytest.mark.parametrize(
    "source, message",
    [
        ({"url": "https://h/x.txt", "sha256": None}, "x.sha256 is missing for https://h/x.txt: a download must be "
         "verified; set it to the file's sha256 (of the member, for a zip). Only a local path or file:// URL may go "
         "without one"),
        ({"url": "http://h/x.txt"}, "x.sha256 is missing for http://h/x.txt"),
        ({"url": "ftp://h/x.txt"}, "x.sha256 is missing for ftp://h/x.txt"),
        ({"url": "https://h/a.zip", "sha256": SHA}, "x.member is missing for https://h/a.zip: a .zip URL needs the "
         "name of the file inside it"),
        ({"url": "https://h/A.ZIP?dl=1", "sha256": SHA, "member": None}, "x.member is missing"),
        ({"url": "file:///d/a.zip"}, "x.member is missing for file:///d/a.zip"),
        ({"url": "https://h/a.zip", "sha256": SHA, "member": ""}, "x.member must not be empty"),
        ({"url": "", "sha256": SHA}, "x.url must not be empty"),
        ({"sha256": SHA}, "missing key x.url"),
        ({"url": "https://h/x.txt", "sha256": SHA.upper()[:63]}, "x.sha256 must be 64 hex digits"),
        ({"url": 3}, "x.url must be a string, got 3"),
        (None, "x must be a mapping, got None"),
    ],
)  # fmt: skip
def test_sources_must_be_verifiable(source, message):
    with pytest.raises(ConfigError) as err:
        parse_sources({"x": source})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_unverified_sources_only_for_a_users_own_files(tmp_path):
    for url in ("my/corpus.txt", "corpus.txt", "file:///home/me/corpus.txt", "file:corpus.txt", "/abs/c.zip"):
        source = {"url": url, "member": "c.txt"} if url.endswith(".zip") else {"url": url}
        assert parse_sources({"x": source})["x"].sha256 is None
    assert parse_sources({"x": {"url": "https://h/x", "sha256": SHA}})["x"].member is None
    text = committed("sources.yaml").replace("  sha256: b41e41a6", "  # sha256: b41e41a6")
    (tmp_path / "sources.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"^.*sources.yaml: the-verdict.sha256 is missing for https://raw\."):
        load_sources(tmp_path / "sources.yaml")


def test_the_vocabulary_bounds_are_the_tokenizers():
    assert (params_module.VOCAB_SIZE, params_module.EOT_ID) == (VOCAB_SIZE, EOT_ID) == (get_tokenizer().n_vocab, 50256)


def grid_values(value: str) -> list[str]:
    """A `-S` value as DVC's sweep syntax expands it: `0,1,2` and `range(0, 3)` are three runs."""
    import re

    found = re.fullmatch(r"range\((\d+),\s*(\d+)(?:,\s*(\d+))?\)", value.strip())
    if found:
        start, stop, step = (int(g) if g else 1 for g in found.groups())
        return [str(v) for v in range(start, stop, step)]
    if "," in value and not value.lstrip().startswith("["):
        return [v.strip() for v in value.split(",")]
    return [value]


def readme_overrides() -> list[list[tuple[str, str]]]:
    """The `-S key=value` settings of every `dvc exp run` command in README.md and docs/*.md, one list
    per command and per value of a sweep (`-S 'runtime.replicate=0,1,2'` is three)."""
    import itertools
    import re
    import shlex

    from tests.conftest import ROOT

    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        commands = [line.strip() for line in text.splitlines() if line.strip().startswith("dvc exp run")]
        for command in commands:
            words = shlex.split(command, comments=True)
            settings = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
            pairs = [re.fullmatch(r"([\w.]+)=(.*)", s).groups() for s in settings]
            grids = [[(key, v) for v in grid_values(value)] for key, value in pairs]
            found.extend(list(combo) for combo in itertools.product(*grids))
    return found


def test_every_dvc_exp_run_of_the_readme_sets_valid_params():
    """Each documented command's -S settings (values read as DVC reads them, YAML 1.2) applied to
    params.yaml validate: a renamed or misspelt key, or a value out of bounds, in README.md or a docs/
    page fails here."""
    from llm.pipeline.validate import parse_yaml

    commands = readme_overrides()
    assert len(commands) >= 8 and any(("finetune_spam.lora.rank", "16") in c for c in commands)
    for settings in commands:
        raw = copy.deepcopy(RAW)
        for key, value in settings:
            *path, last = key.split(".")
            node = raw
            for part in path:
                node = node.setdefault(part, {})
            # a shell variable (the sweep's `$lr`): the key must exist, the value is the committed one
            node[last] = parse_yaml(value) if "$" not in value else node.get(last, parse_yaml(value))
        params = parse_params(raw)
        for key, _ in settings:
            *path, last = key.split(".")
            node = params
            for part in path:
                node = getattr(node, part)
            assert last in type(node).model_fields, key
