"""Stage finetune_spam: the book's chapter-6 spam classifier, with full-split metrics and a baseline.

Reads params `finetune_spam`, the download `data/raw/sms_spam/` and the starting model; writes
`data/spam/{train,validation,test}.csv`, `models/spam/`, the loss and accuracy curves and the
test set's confusion matrix (`metrics/curves/`, DVC plots), `metrics/finetune_spam.json` and the
wall times in `timings/finetune_spam.json`.
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
from llm.errors import LLMError, run_main
from llm.io import write_csv, write_json
from llm.pipeline.download import source_file
from llm.pipeline.params import init_source, load_params
from llm.runtime import keep_freed_memory, select_device, set_seed
from llm.tokenizer import get_tokenizer
from llm.trainer import Trainer

RAW = Path("data/raw/sms_spam")
SPLITS = Path("data/spam")
MODEL_DIR = Path("models/spam")
CURVE = Path("metrics/curves/finetune_spam.csv")
ACC_CURVE = Path("metrics/curves/finetune_spam_accuracy.csv")
CONFUSION = Path("metrics/curves/finetune_spam_confusion.json")
METRICS = Path("metrics/finetune_spam.json")
TIMINGS = Path("timings/finetune_spam.json")
STATE = Path("models/resume/finetune_spam.pt")  # Ctrl-C/SIGTERM saves here; a rerun resumes


def prepare_splits(params) -> dict:
    f = params.finetune_spam
    df = load_sms_spam(source_file(RAW, "sms_spam"))
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

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    x_train = vec.fit_transform(splits["train"]["Text"])
    clf = LogisticRegression(C=10.0, max_iter=1000, random_state=seed).fit(x_train, splits["train"]["Label"])
    pred = clf.predict(vec.transform(splits["test"]["Text"]))
    m = binary_metrics(splits["test"]["Label"].to_numpy(), pred)
    return {k: v for k, v in m.items() if k in ("accuracy", "precision", "recall", "f1")}


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
        write_csv(ACC_CURVE, accuracy_rows)
        print(f"epoch {epoch}: train accuracy {row['train_accuracy']:.2%}, val accuracy {row['val_accuracy']:.2%}")

    run_id = {"params": f.__dict__, "init": str(init), "examples": len(train_set)}
    trainer = Trainer(
        model,
        train_set,
        val_set,
        f,
        loss_fn=loss_fn,
        on_epoch_end=epoch_accuracy,
        on_record=lambda h: write_csv(CURVE, h.rows()),
        state_path=STATE,
        run_id=run_id,
    )
    started = time.perf_counter()
    history = trainer.fit()
    train_seconds = time.perf_counter() - started

    metrics = {}
    for name, ds in (("train", train_set), ("val", val_set), ("test", test_set)):
        y, pred, _, loss = predict(model, loader(ds), device, f.pooling)
        m = binary_metrics(y, pred)
        metrics[name] = {"accuracy": m["accuracy"], "loss": loss}
        if name == "test":
            metrics["test"].update({k: v for k, v in m.items() if k != "accuracy"})
            names = {v: k for k, v in LABELS.items()}  # DVC's confusion template: one row per example
            confusion = [{"actual": names[int(a)], "predicted": names[int(b)]} for a, b in zip(y, pred, strict=True)]
    metrics.update({"max_length": train_set.max_length, "train_examples": len(train_set), "steps": history.steps})
    started = time.perf_counter()
    metrics["baseline"] = {"test": tfidf_baseline(splits, f.seed)}
    baseline_seconds = time.perf_counter() - started
    save_classifier(model, MODEL_DIR, train_set.max_length, f.pooling, extra={"training": {"init": str(init)}})
    write_csv(CURVE, history.rows())
    write_csv(ACC_CURVE, accuracy_rows)
    write_json(CONFUSION, confusion)
    write_json(METRICS, metrics)
    examples = history.steps * f.batch_size
    timings = {
        "train_seconds": train_seconds,
        "examples_per_sec": examples / history.train_seconds if history.train_seconds else None,
        "baseline_seconds": baseline_seconds,
        "device": str(device),
    }
    write_json(TIMINGS, timings)
    print(
        f"test accuracy {metrics['test']['accuracy']:.2%} "
        f"(TF-IDF baseline {metrics['baseline']['test']['accuracy']:.2%}), "
        f"spam F1 {metrics['test']['f1']:.3f}, {train_seconds:.0f} s"
    )
    return metrics


if __name__ == "__main__":
    run_main("finetune_spam", main, doc=__doc__)
