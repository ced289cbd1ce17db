"""params.yaml validation: one line naming the key and what is allowed."""

import copy
import json

import pytest
import yaml

from llm.errors import ConfigError
from llm.pipeline.params import Params, load_params, parse_params, schema_text
from llm.pipeline.sources import load_sources, parse_sources
from llm.pooling import POOLINGS
from llm.prompts import PROMPT_STYLES
from tests.conftest import committed, committed_yaml

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
        ("train.precision", "fp16", "train.precision must be one of fp32, bf16-mixed; got 'fp16'"),
        ("train.lr_schedule", "linear", "train.lr_schedule must be one of constant, cosine; got 'linear'"),
        ("eval.top_k", 0, "eval.top_k must be > 0"),
        ("finetune_spam.train_frac", 0.95, "finetune_spam.train_frac and validation_frac must be in (0, 1)"),
        ("finetune_spam.pooling", "max", "finetune_spam.pooling must be one of last, last_nonpad, mean; got 'max'"),
        ("finetune_spam.trainable_blocks", -2, "finetune_spam.trainable_blocks must be >= -1"),
        ("finetune_spam.lr", 0, "finetune_spam.lr must be > 0"),
        ("finetune_spam.min_lr", 0.1, "finetune_spam.min_lr (0.1) must be <= lr (0.0002)"),
        ("finetune_instruct.test_frac", 0.2, "finetune_instruct.train_frac and test_frac must be in (0, 1)"),
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
    cfg, notes = parse_params(raw).model.config_for_weights(weights, "gpt2-small")
    assert cfg == weights and "model.preset is not used" in notes[0]

    raw["model"].update(drop_rate=0.1, context_length=256)
    cfg, notes = parse_params(raw).model.config_for_weights(weights, "gpt2-small")
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
            parse_params(bad).model.config_for_weights(weights, "gpt2-small")


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
