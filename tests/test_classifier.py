"""Chapter 6: the book's data preparation, dataset, frozen layers, metrics, and `llm classify`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from llm.checkpoint import save_checkpoint
from llm.classifier import (
    LABELS,
    SpamDataset,
    add_classification_head,
    binary_metrics,
    class_logits,
    classification_loss,
    classify,
    create_balanced_dataset,
    encode_texts,
    load_classifier,
    load_sms_spam,
    predict,
    random_split,
    read_split_csv,
    save_classifier,
)
from llm.cli import main
from llm.errors import CheckpointError, LLMError
from llm.model import GPTModel
from llm.tokenizer import EOT_ID, get_tokenizer
from llm.trainer import make_optimizer
from tests.conftest import committed, tiny_cfg

SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SPAM_SHA = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


@pytest.fixture(scope="module")
def sms(public_input):
    return load_sms_spam(public_input("sms_spam"))


def test_data_preparation_matches_the_book(sms):
    assert len(sms) == 5574
    assert sms["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    balanced = create_balanced_dataset(sms, 123)
    assert balanced["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    train, val, test = random_split(balanced, 0.7, 0.1, 123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    rebalanced = create_balanced_dataset(sms, 123)
    again = random_split(rebalanced.assign(Label=rebalanced["Label"].map({"ham": 0, "spam": 1})), 0.7, 0.1, 123)
    assert train.equals(again[0]) and test.equals(again[2])
    other = random_split(balanced, 0.7, 0.1, 7)[0]
    assert not train.equals(other)
    # the book's max_length: the longest training message is 120 tokens
    assert SpamDataset(train, get_tokenizer()).max_length == 120


def test_dataset_pads_and_truncates():
    df = pd.DataFrame({"Label": [0, 1], "Text": ["hi", "one two three four five"]})
    tok = get_tokenizer()
    ds = SpamDataset(df, tok)
    assert ds.max_length == 5
    assert ds[0][0].tolist() == tok.encode("hi") + [50256] * 4 and ds[1][1].item() == 1
    short = SpamDataset(df, tok, max_length=3)
    assert short[1][0].tolist() == tok.encode("one two three four five")[:3]
    assert (ds.truncated, short.truncated) == (0, 1)
    assert SpamDataset(pd.DataFrame({"Label": [0], "Text": ["a <|endoftext|> b"]}), tok).max_length > 1


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(tiny_cfg(n_layers=3)), 2, trainable_blocks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, 1e-2, 0.1)
    x, y = torch.randint(0, 50257, (4, 6)), torch.tensor([0, 1, 1, 0])
    classification_loss("last")(model, (x, y), torch.device("cpu"), "fp32").backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith(("trf_blocks.2.", "final_norm.", "out_head."))
    }
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name
        if name not in trainable:
            assert p.grad is None, name
    assert model.out_head.weight.shape == (2, 36)
    everything = add_classification_head(GPTModel(tiny_cfg()), 2, trainable_blocks=-1)
    assert all(p.requires_grad for p in everything.parameters())
    head_only = add_classification_head(GPTModel(tiny_cfg()), 2, trainable_blocks=0)
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {
        "final_norm.scale", "final_norm.shift", "out_head.weight", "out_head.bias"
    }  # fmt: skip


def test_pooling_reads_the_right_positions():
    torch.manual_seed(1)
    model = add_classification_head(GPTModel(tiny_cfg()), 2).eval()
    x = torch.tensor([[5, 6, 50256, 50256], [7, 8, 9, 10]])
    full = model(x)
    assert torch.equal(class_logits(model, x, "last"), full[:, -1])
    assert torch.equal(class_logits(model, x, "last_nonpad")[0], full[0, 1])
    assert torch.allclose(class_logits(model, x, "mean")[0], full[0, :2].mean(0))
    assert torch.allclose(class_logits(model, x, "mean")[1], full[1].mean(0))


def test_accuracy_and_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 0, 0, 1])
    m = binary_metrics(y, pred)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"] == 6 / 8 and m["precision"] == 3 / 4 and m["recall"] == 3 / 4 and m["f1"] == 0.75

    class Fixed(torch.nn.Module):  # logits that favour class 1 for even first tokens
        def forward(self, x):
            out = torch.zeros(*x.shape, 2)
            out[..., 1] = (x[:, :1] % 2 == 0).float()
            return out

    xs = torch.tensor([[2, 0], [3, 0], [4, 0], [5, 0]])
    loader = DataLoader(list(zip(xs, torch.tensor([1, 0, 0, 0]), strict=True)), batch_size=2)
    y, pred, probs, _ = predict(Fixed(), loader, "cpu")
    assert (y.tolist(), pred.tolist()) == ([1, 0, 0, 0], [1, 0, 1, 0])  # the [4, 0] row is wrong
    assert np.allclose(probs, [np.e / (1 + np.e), 0.5, np.e / (1 + np.e), 0.5])
    y, pred, _, _ = predict(Fixed(), loader, "cpu", num_batches=1)
    assert (y == pred).mean() == 1.0 and len(y) == 2
    empty = binary_metrics(np.zeros(0, int), np.zeros(0, int))
    assert np.isnan(empty.pop("accuracy")) and set(empty.values()) == {0}
    nothing_predicted = binary_metrics(np.array([1, 0]), np.array([0, 0]))
    assert (nothing_predicted["precision"], nothing_predicted["f1"]) == (0.0, 0.0)


def _as_arrays(tp, tn, fp, fn):
    return np.array([1] * tp + [0] * tn + [0] * fp + [1] * fn), np.array([1] * tp + [0] * tn + [1] * fp + [0] * fn)


def test_binary_metrics_reproduce_the_committed_numbers_digit_for_digit():
    """scikit-learn computes them; the committed test predictions give the committed metrics."""
    rows = json.loads(committed("metrics/curves/finetune_spam_confusion.json"))
    y = np.array([LABELS[r["actual"]] for r in rows])
    pred = np.array([LABELS[r["predicted"]] for r in rows])
    metrics = json.loads(committed("metrics/finetune_spam.json"))
    m = binary_metrics(y, pred)
    assert {k: metrics["test"][k] for k in m} == m
    assert all(type(m[k]) is int for k in ("tn", "fp", "fn", "tp"))
    # CI's baseline keeps only the counts; the TF-IDF baseline's counts follow from its rates
    # (tp 144, fp 3, fn 7 of 300). F1 is the harmonic mean of precision and recall: scikit-learn's
    # f1_score (2tp / (2tp + fp + fn)) gives 0.9664429530201343 here, one ulp from the committed value.
    ci = json.loads(committed("ci/baseline/replicate-0/finetune_spam.json"))["test"]
    m = binary_metrics(*_as_arrays(ci["tp"], ci["tn"], ci["fp"], ci["fn"]))
    assert {k: ci[k] for k in m} == m
    m = binary_metrics(*_as_arrays(144, 146, 3, 7))
    assert {k: m[k] for k in metrics["baseline"]["test"]} == metrics["baseline"]["test"]
    assert m["f1"] == 0.9664429530201342


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no messages"),
        ("ham\tfine\nmaybe\tspam?\n", "line 2: label 'maybe' is not ham or spam"),
    ],
)
def test_malformed_raw_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "SMSSpamCollection"
    path.write_text(content)
    with pytest.raises(LLMError, match=message):
        load_sms_spam(path)


def test_a_raw_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes("ham\tfine\nspam\tCaf\u00e9 \u00e0 1\u20ac\n".encode("cp1252"))
    with pytest.raises(LLMError, match="cannot read .*SMSSpamCollection: .*utf-8") as err:
        load_sms_spam(path)
    assert "\n" not in str(err.value)


def test_quotes_survive_and_split_csv_is_checked(tmp_path):
    raw = tmp_path / "s.txt"
    raw.write_text('ham\t"Hi" she said\nspam\tWIN "now\n')
    assert load_sms_spam(raw)["Text"].tolist() == ['"Hi" she said', 'WIN "now']
    (tmp_path / "a.csv").write_text("Label,Message\n0,hi\n")
    with pytest.raises(LLMError, match="has no 'Text' column"):
        read_split_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("Label,Text\n3,hi\n")
    with pytest.raises(LLMError, match="0 \\(ham\\) or 1 \\(spam\\)"):
        read_split_csv(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("")
    with pytest.raises(LLMError, match="cannot read"):
        read_split_csv(tmp_path / "c.csv")


def test_classifier_checkpoint_roundtrip(classifier_ckpt, tmp_path):
    path, model = classifier_ckpt
    loaded, info = load_classifier(path)
    assert info == {"num_classes": 2, "max_length": 8, "pooling": "mean"}
    assert not loaded.training and loaded.out_head.out_features == 2
    x = torch.randint(0, 50257, (2, 8))
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="is not a classifier config: no 'classifier' settings"):
        load_classifier(save_checkpoint(GPTModel(tiny_cfg()), tmp_path / "lm"))
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_classifier(path / "model.safetensors")


def _classify_as_before(model, info, texts, batch_size):
    """`llm classify`'s own batching before `classify` (the reference)."""
    max_length = info["max_length"]
    encoded = encode_texts([m or " " for m in texts], get_tokenizer())
    probs = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = torch.full((len(chunk), max_length), EOT_ID, dtype=torch.long)
            for i, ids in enumerate(chunk):
                ids = ids[:max_length] or [EOT_ID]
                batch[i, : len(ids)] = torch.tensor(ids)
            logits = class_logits(model, batch, info["pooling"]).float()
            probs += torch.softmax(logits, dim=-1)[:, 1].tolist()
    return probs


@pytest.mark.parametrize("pooling", ["last", "last_nonpad", "mean"])
def test_classify_pads_and_truncates_as_training_did(classifier_ckpt, pooling):
    path, _ = classifier_ckpt
    model, info = load_classifier(path)
    info = {**info, "pooling": pooling}
    texts = ["WIN a prize now", "", "hi", "long " * 30, "a <|endoftext|> b", "ok then"]
    scores = classify(model, info, texts, batch_size=4)
    assert scores.spam_probability == _classify_as_before(model, info, texts, 4)  # empty text included
    assert scores.truncated == 2 and len(scores.labels) == len(texts)  # "long …" and "<|endoftext|>" as text
    assert set(scores.labels) <= {"spam", "not spam"}
    assert classify(model, info, [], batch_size=4).spam_probability == []


def test_classify_refuses_messages_a_smaller_vocabulary_cannot_embed_in_one_line(tmp_path, capsys):
    """GPT-2's ids, padded with 50256: a classifier with a smaller vocab_size is refused before it runs."""
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(tiny_cfg(vocab_size=1000, context_length=16)), 2)
    path = save_classifier(model, tmp_path / "small", max_length=8, pooling="mean")
    with pytest.raises(LLMError, match=r"^the messages: token id 50256 is outside the vocabulary \[0, 1000\)"):
        classify(model.eval(), {"max_length": 8, "pooling": "mean"}, ["hi"])
    assert main(["classify", "--checkpoint", str(path), "WIN a prize"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token id 50256 is outside the vocabulary [0, 1000)" in err


def test_cli_classify_text_file_and_errors(classifier_ckpt, tmp_path, capsys):
    path, _ = classifier_ckpt
    assert main(["classify", "--checkpoint", str(path), "WIN a prize now"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("spam (spam probability", "not spam (spam probability"))
    messages = tmp_path / "m.csv"
    messages.write_text('text,id\nhello there,1\n"long ' + "word " * 40 + '",2\n')
    assert (
        main(["classify", "--checkpoint", str(path), "--file", str(messages), "--output", str(tmp_path / "p.csv")]) == 0
    )
    assert "1 message(s) truncated to 8 tokens" in capsys.readouterr().err
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns) == ["text", "label", "spam_probability"] and len(preds) == 2
    assert set(preds["label"]) <= {"spam", "not spam"}
    for args, message in [
        (["   "], "the message is empty"),
        (["--file", str(tmp_path / "none.txt")], "does not exist"),
        ([], "give a message to classify or --file"),
    ]:
        assert main(["classify", "--checkpoint", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("message\nhi\n")
    assert main(["classify", "--checkpoint", str(path), "--file", str(bad)]) == 2
    assert "needs a 'text' column" in capsys.readouterr().err


# --- classify --file: UTF-8 text or a CSV read as CSV -------------------------------------------------
def _classify_file(path, tmp_path, capsys, content: bytes):
    messages = tmp_path / content[0]
    messages.write_bytes(content[1])
    out = tmp_path / "p.csv"
    code = main(["classify", "--checkpoint", str(path), "--file", str(messages), "--output", str(out)])
    _, err = capsys.readouterr()
    return code, err, (pd.read_csv(out, keep_default_na=False) if code == 0 else None), messages


@pytest.mark.parametrize(
    ("name", "data", "offset"),
    [
        ("m.txt", b"hello\ncaf\xe9 ouvert\n", 9),  # Latin-1
        ("m.csv", b"text\nhello\n\xff\xfeh\x00", 11),  # UTF-16 pasted in
    ],
)
def test_cli_classify_a_file_that_is_not_utf8_is_one_line_with_the_offset(
    classifier_ckpt, tmp_path, capsys, name, data, offset
):
    code, err, _, file = _classify_file(classifier_ckpt[0], tmp_path, capsys, (name, data))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--file {file} is not UTF-8 text: byte " in err and f"at offset {offset} (line " in err
    assert not (tmp_path / "p.csv").exists()


def test_cli_classify_csv_is_read_as_csv(classifier_ckpt, tmp_path, capsys):
    """A quoted field may span lines (one message), Excel's BOM is dropped, other columns ignored."""
    data = '\ufefftext,id\n"first line\nsecond line, still the first message",1\n"say ""hi""",2\nplain,3\n'
    code, err, preds, _ = _classify_file(classifier_ckpt[0], tmp_path, capsys, ("m.csv", data.encode()))
    assert code == 0, err
    assert preds["text"].tolist() == ["first line\nsecond line, still the first message", 'say "hi"', "plain"]
    crlf = data.replace("\n", "\r\n").encode()  # Windows line ends: the same messages
    code, err, again, _ = _classify_file(classifier_ckpt[0], tmp_path, capsys, ("m.csv", crlf))
    assert code == 0 and again.equals(preds)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("text\n", "has a header but no rows: give one message per row"),
        ("text,id\n\n", "has a header but no rows"),
        ("", "a CSV needs a 'text' column (its header has none)"),
        ("message,id\nhi,1\n", "a CSV needs a 'text' column (its header has 'message', 'id')"),
        ('text\n"never closed\n', None),  # csv reads it to the end: one message, not an error
    ],
)
def test_cli_classify_csv_without_messages_says_which_is_missing(classifier_ckpt, tmp_path, capsys, data, message):
    code, err, preds, file = _classify_file(classifier_ckpt[0], tmp_path, capsys, ("m.csv", data.encode()))
    if message is None:
        assert code == 0 and preds["text"].tolist() == ["never closed\n"]
        return
    assert code == 2 and err.startswith(f"llm classify: error: --file {file}") and err.count("\n") == 1
    assert message in err


def test_cli_classify_a_text_file_without_messages_or_a_directory(classifier_ckpt, tmp_path, capsys):
    code, err, _, file = _classify_file(classifier_ckpt[0], tmp_path, capsys, ("m.txt", b"\n  \n"))
    assert code == 2 and err == f"llm classify: error: --file {file} holds no messages: give one message per line\n"
    assert main(["classify", "--checkpoint", str(classifier_ckpt[0]), "--file", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == f"llm classify: error: --file {tmp_path} is a directory: give a text or CSV file\n"
    )


# --- a classifier's recorded settings are checked, never guessed -------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pooling": "max"}, "classifier.pooling must be one of last, last_nonpad, mean, got 'max'"),
        ({"pooling": None}, "classifier.pooling must be one of last, last_nonpad, mean, got None"),
        ({"pooling": ...}, "classifier.pooling is missing (one of last, last_nonpad, mean)"),
        ({"max_length": ...}, "classifier.max_length is missing"),
        ({"num_classes": ...}, "classifier.num_classes is missing"),
        ({"max_length": 0}, "classifier.max_length must be a whole number in [1, 16] (the model's context_length)"),
        ({"max_length": 17}, "classifier.max_length must be a whole number in [1, 16]"),
        ({"max_length": "8"}, "classifier.max_length must be a whole number in [1, 16]"),
        ({"num_classes": True}, "classifier.num_classes must be a whole number >= 2, got True"),
        ({"num_classes": 1}, "classifier.num_classes must be a whole number >= 2, got 1"),
        ("mean", "'classifier' must be an object with num_classes, max_length and pooling"),
    ],
)
def test_a_bad_classifier_config_names_the_file_and_the_key(classifier_ckpt, tmp_path, capsys, settings, message):
    import shutil

    path = tmp_path / "spam"
    shutil.copytree(classifier_ckpt[0], path)
    config = json.loads((path / "config.json").read_text())
    if isinstance(settings, dict):
        config["classifier"].update(settings)
        config["classifier"] = {k: v for k, v in config["classifier"].items() if v is not ...}
    else:
        config["classifier"] = settings
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_classifier(path)
    assert str(info.value).startswith(f"{path / 'config.json'}: ") and message in str(info.value)
    assert main(["classify", "--checkpoint", str(path), "hello"]) == 2
    assert capsys.readouterr() == ("", f"llm classify: error: {info.value}\n")


# --- scores that are not finite are an error, never a label ---------------------------------------------
def _damaged_classifier(classifier_ckpt, tmp_path, damage: str):
    """A copy of the tiny classifier whose weights hold NaN in one token's embedding (only the messages with
    that token score NaN) or +inf in the head's bias (every message's logits hold inf)."""
    import copy

    model = copy.deepcopy(classifier_ckpt[1])
    with torch.no_grad():
        if damage == "nan":
            model.tok_emb.weight[get_tokenizer().encode("WIN")[0]] = float("nan")
        else:
            model.out_head.bias[1] = float("inf")
    return model, save_classifier(model, tmp_path / damage, max_length=8, pooling="mean")


@pytest.mark.parametrize(("damage", "scores"), [("nan", "message 3 of 3 are [nan, nan]"), ("inf", "message 1 of 3")])
def test_scores_that_are_not_finite_are_one_line_never_a_label(classifier_ckpt, tmp_path, capsys, damage, scores):
    """NaN >= 0.5 is False: a classifier with NaN or infinite weights answered "not spam (spam probability nan)"
    with exit 0. `classify` refuses, naming the message, so `llm classify` (exit 2) and /v1/classify (an error in
    OpenAI's shape) do too."""
    from fastapi.testclient import TestClient

    from llm.serve.app import create_app
    from llm.serve.registry import load_models

    model, path = _damaged_classifier(classifier_ckpt, tmp_path, damage)
    texts = ["hello there", "see you soon", "WIN a prize"]  # batches of 2: the third is the second batch's first
    with pytest.raises(LLMError) as err:
        classify(model.eval(), {"max_length": 8, "pooling": "mean"}, texts, batch_size=2)
    message = str(err.value)
    assert message.startswith(f"the classifier's scores for {scores}") and "\n" not in message
    assert message.endswith("not finite numbers: its weights are damaged (NaN, infinite or overflowing values); "
                            "nothing was classified")  # fmt: skip

    file, out = tmp_path / "m.txt", tmp_path / "p.csv"
    file.write_text("\n".join(texts) + "\n")
    assert (
        main(["classify", "--checkpoint", str(path), "--file", str(file), "--output", str(out), "--batch-size", "2"])
        == 2
    )
    assert capsys.readouterr() == ("", f"llm classify: error: {message}\n") and not out.exists()
    assert main(["classify", "--checkpoint", str(path), texts[-1]]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and stderr.startswith("llm classify: error: the classifier's scores for message 1 of 1 are [")
    assert stderr.count("\n") == 1

    with TestClient(create_app(load_models([f"spam={path}"]))) as client:
        response = client.post("/v1/classify", json={"input": texts})
    assert response.status_code == 400, response.text
    error = response.json()["error"]["message"]
    assert error.startswith("the classifier's scores for message ") and "not finite numbers" in error
