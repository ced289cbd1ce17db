"""Stage finetune_spam: the book's chapter-6 spam classifier, with full-split metrics and a baseline.

Reads params `sources.sms_spam` and `finetune_spam`; writes `data/spam_raw/` (the verified
download), `data/spam/{train,validation,test}.csv`, `models/spam/`, `metrics/curves/`
(loss and accuracy curves) and `metrics/finetune_spam.json`.
"""

import time
from pathlib import Path

from torch.utils.data import DataLoader

from llm.checkpoint import load_checkpoint
from llm.classifier import (
    LABELS,
    SpamDataset,
    add_classification_head,
    binary_metrics,
    classification_loss,
    create_balanced_dataset,
    load_sms_spam,
    predict,
    random_split,
    read_split_csv,
    save_classifier,
)
from llm.download import fetch_zip_member
from llm.errors import LLMError, run_main
from llm.io import write_csv, write_json
from llm.params import init_source, load_params
from llm.runtime import keep_freed_memory, select_device, set_seed
from llm.tokenizer import get_tokenizer
from llm.trainer import Trainer

RAW = Path("data/spam_raw")
SPLITS = Path("data/spam")
MODEL_DIR = Path("models/spam")
CURVE = Path("metrics/curves/finetune_spam.csv")
ACC_CURVE = Path("metrics/curves/finetune_spam_accuracy.csv")
METRICS = Path("metrics/finetune_spam.json")
STATE = Path("models/resume/finetune_spam.pt")  # Ctrl-C/SIGTERM saves here; a rerun resumes


def prepare_splits(params) -> dict:
    src, f = params.sources["sms_spam"], params.finetune_spam
    raw = fetch_zip_member(src.url, src.member, src.sha256, RAW / src.member)
    df = load_sms_spam(raw)
    if f.balance:
        df = create_balanced_dataset(df, random_state=f.seed)
    df = df.assign(Label=df["Label"].map(LABELS))
    parts = random_split(df, f.train_frac, f.validation_frac, random_state=f.seed)
    for name, part in zip(("train", "validation", "test"), parts, strict=True):
        write_csv(SPLITS / f"{name}.csv", part.to_dict("records"))
    return {name: read_split_csv(SPLITS / f"{name}.csv") for name in ("train", "validation", "test")}


def tfidf_baseline(splits, seed: int) -> dict:
    """TF-IDF + logistic regression on the same train split, scored on the same test split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    x_train = vec.fit_transform(splits["train"]["Text"])
    clf = LogisticRegression(C=10.0, max_iter=1000, random_state=seed).fit(x_train, splits["train"]["Label"])
    pred = clf.predict(vec.transform(splits["test"]["Text"]))
    m = binary_metrics(splits["test"]["Label"].to_numpy(), pred)
    out = {f"baseline_test_{k}": v for k, v in m.items() if k in ("accuracy", "precision", "recall", "f1")}
    out["baseline_seconds"] = time.perf_counter() - started
    return out


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    f = params.finetune_spam
    if f is None:
        raise LLMError(f"{params_path} has no finetune_spam section")
    splits = prepare_splits(params)
    device = select_device(f.device)
    keep_freed_memory()  # ~20% faster steps on CPU: see llm/runtime.py
    init = init_source(f.init)
    model = load_checkpoint(init)
    if f.max_length is not None and f.max_length > model.cfg["context_length"]:
        raise LLMError(
            f"finetune_spam.max_length ({f.max_length}) exceeds the model's context_length "
            f"({model.cfg['context_length']})"
        )
    tokenizer = get_tokenizer()
    train_set = SpamDataset(splits["train"], tokenizer, f.max_length)
    if train_set.max_length > model.cfg["context_length"]:  # the longest message does not fit
        train_set = SpamDataset(splits["train"], tokenizer, model.cfg["context_length"])
    val_set = SpamDataset(splits["validation"], tokenizer, train_set.max_length)
    test_set = SpamDataset(splits["test"], tokenizer, train_set.max_length)

    set_seed(f.seed)  # the book: torch.manual_seed(123) before the new head
    model = add_classification_head(model, num_classes=2, trainable_blocks=f.trainable_blocks)
    model.train()
    loss_fn = classification_loss(f.pooling)

    def loader(ds):
        return DataLoader(ds, batch_size=f.batch_size, shuffle=False)

    accuracy_rows = []

    def epoch_accuracy(model, epoch):  # the book: accuracy on eval_iter batches after each epoch
        row = {"epoch": epoch}
        for name, ds in (("train", train_set), ("val", val_set)):
            y, pred, _, _ = predict(model, loader(ds), device, f.pooling, f.eval_iter)
            row[f"{name}_accuracy"] = float((y == pred).mean())
        accuracy_rows.append(row)
        print(f"epoch {epoch}: train accuracy {row['train_accuracy']:.2%}, val accuracy {row['val_accuracy']:.2%}")

    run_id = {"params": f.__dict__, "init": str(init), "examples": len(train_set)}
    trainer = Trainer(
        model, train_set, val_set, f, loss_fn=loss_fn, on_epoch_end=epoch_accuracy, state_path=STATE, run_id=run_id
    )
    started = time.perf_counter()
    history = trainer.fit()
    train_seconds = time.perf_counter() - started

    metrics = {}
    for name, ds in (("train", train_set), ("val", val_set), ("test", test_set)):
        y, pred, _, loss = predict(model, loader(ds), device, f.pooling)
        m = binary_metrics(y, pred)
        metrics[f"{name}_accuracy"] = m["accuracy"]
        metrics[f"{name}_loss"] = loss
        if name == "test":
            metrics.update({f"test_{k}": v for k, v in m.items() if k != "accuracy"})
    examples = history.steps * f.batch_size
    metrics.update(
        {
            "max_length": train_set.max_length,
            "train_examples": len(train_set),
            "steps": history.steps,
            "train_seconds": train_seconds,
            "examples_per_sec": examples / history.train_seconds,
        }
    )
    metrics.update(tfidf_baseline(splits, f.seed))
    save_classifier(model, MODEL_DIR, train_set.max_length, f.pooling, extra={"training": {"init": str(init)}})
    write_csv(CURVE, history.rows())
    write_csv(ACC_CURVE, accuracy_rows)
    write_json(METRICS, metrics)
    print(
        f"test accuracy {metrics['test_accuracy']:.2%} (TF-IDF baseline {metrics['baseline_test_accuracy']:.2%}), "
        f"spam F1 {metrics['test_f1']:.3f}, {train_seconds:.0f} s"
    )
    return metrics


if __name__ == "__main__":
    run_main("finetune_spam", main)
