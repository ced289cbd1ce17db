"""Stage finetune_spam: the book's chapter-6 spam classifier, with full-split metrics and a baseline.

Reads params `finetune_spam`, `runtime`, the download `data/raw/sms_spam/` and the starting model; writes
`data/spam/{train,validation,test}.csv`, `models/spam/`, the loss and accuracy curves and the
test set's confusion matrix (`metrics/curves/`, DVC plots), `metrics/finetune_spam.json` and the
wall times in `timings/finetune_spam.json`.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from llm import distributed
from llm.bounds import check_split_sizes
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
from llm.files import write_csv, write_json
from llm.pipeline.download import source_file
from llm.pipeline.finetune import Evaluation, FinetuneStage, Outputs, TaskData
from llm.tokenizer import check_token_ids

RAW = Path("data/raw/sms_spam")
SPLITS = Path("data/spam")
ACC_CURVE = Path("metrics/curves/finetune_spam_accuracy.csv")
CONFUSION = Path("metrics/curves/finetune_spam_confusion.json")
OUTPUTS = Outputs(
    model_dir=Path("models/spam"),
    curve=Path("metrics/curves/finetune_spam.csv"),
    metrics=Path("metrics/finetune_spam.json"),
    timings=Path("timings/finetune_spam.json"),
    state=Path("models/resume/finetune_spam.pt"),  # Ctrl-C/SIGTERM saves here; a rerun resumes
)


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


@dataclass(kw_only=True)
class SpamData(TaskData):
    """The datasets ("train", "val", "test") and the splits they were read from (for the baseline)."""

    splits: dict[str, pd.DataFrame]


class SpamStage(FinetuneStage):
    section = "finetune_spam"
    outputs = OUTPUTS
    modules_to_save = ("out_head",)  # the new head: with LoRA it trains in full, without an adapter

    def load_data(self, f) -> dict[str, pd.DataFrame]:
        """The book's balancing and split, written to data/spam/ and read back as the stage keeps them."""
        path = source_file(RAW, "sms_spam")
        df = load_sms_spam(path)
        if f.balance:
            df = create_balanced_dataset(df, random_state=f.seed)
        df = df.assign(Label=df["Label"].map(LABELS))
        parts = random_split(df, f.train_frac, f.validation_frac, random_state=f.seed)
        sizes = {name: len(part) for name, part in zip(("train", "validation", "test"), parts, strict=True)}
        of = f"{len(df):,} messages of {path}" + (" (after finetune_spam.balance)" if f.balance else "")
        fractions = {"train_frac": f.train_frac, "validation_frac": f.validation_frac}
        check_split_sizes(self.section, fractions, sizes, of, f.batch_size)  # before anything is written
        if distributed.is_main():  # with several processes, rank 0 writes and every rank reads
            for name, part in zip(("train", "validation", "test"), parts, strict=True):
                write_csv(SPLITS / f"{name}.csv", part.to_dict("records"))
        distributed.barrier()
        return {name: read_split_csv(SPLITS / f"{name}.csv") for name in ("train", "validation", "test")}

    def datasets(self, f, splits, model, tokenizer) -> SpamData:
        context = model.cfg["context_length"]
        if f.max_length is not None and f.max_length > context:
            raise LLMError(f"finetune_spam.max_length ({f.max_length}) exceeds the model's context_length ({context})")
        train_set = SpamDataset(splits["train"], tokenizer, f.max_length)
        if train_set.max_length > context:  # the longest message does not fit
            train_set = SpamDataset(splits["train"], tokenizer, context)
        sets = {
            "train": train_set,
            "val": SpamDataset(splits["validation"], tokenizer, train_set.max_length),
            "test": SpamDataset(splits["test"], tokenizer, train_set.max_length),
        }
        for name, ds in sets.items():  # GPT-2 ids and the pad 50256: a model with a smaller vocab_size stops here
            check_token_ids(ds.tokens, model.cfg["vocab_size"], f"finetune_spam: the {name} split")
        return SpamData(sets=sets, splits=splits)

    def adapt(self, f, model):
        return add_classification_head(model, num_classes=2, trainable_blocks=f.trainable_blocks)

    def trainer_options(self, f, task) -> dict:
        return {"loss_fn": classification_loss(f.pooling)}

    def epoch_end(self, f, task, model, epoch, history, device) -> dict:
        """The book: accuracy on eval_iter batches after each epoch; the curve holds every epoch so far."""
        row = {"epoch": epoch}
        for name in ("train", "val"):
            y, pred, _, _ = predict(model, loader(f, task, name), device, f.pooling, f.eval_iter)
            row[f"{name}_accuracy"] = float((y == pred).mean())
        write_csv(ACC_CURVE, [*history.epoch_metrics, row])  # the rows of epochs before a resume are restored
        print(f"epoch {epoch}: train accuracy {row['train_accuracy']:.2%}, val accuracy {row['val_accuracy']:.2%}")
        return row  # kept in history.epoch_metrics, and in the resume state

    def evaluate(self, f, task, model, history, device) -> Evaluation:
        metrics = {}
        for name in ("train", "val", "test"):
            y, pred, _, loss = predict(model, loader(f, task, name), device, f.pooling)
            m = binary_metrics(y, pred)
            metrics[name] = {"accuracy": m["accuracy"], "loss": loss}
            if name == "test":
                metrics["test"].update({k: v for k, v in m.items() if k != "accuracy"})
                names = {v: k for k, v in LABELS.items()}  # DVC's confusion template: one row per example
                confusion = [
                    {"actual": names[int(a)], "predicted": names[int(b)]} for a, b in zip(y, pred, strict=True)
                ]
        train_set = task.sets["train"]
        metrics.update({"max_length": train_set.max_length, "train_examples": len(train_set)})
        metrics["steps"] = history.steps
        started = time.perf_counter()
        metrics["baseline"] = {"test": tfidf_baseline(task.splits, f.seed)}
        timings = {
            "examples_per_sec": history.total_examples / history.train_seconds if history.train_seconds else None,
            "baseline_seconds": time.perf_counter() - started,
        }
        # the accuracy curve: every epoch, also those before a resume
        return Evaluation(metrics, timings, {"accuracy": list(history.epoch_metrics), "confusion": confusion})

    def save(self, f, task, model, init, evaluation):
        extra = {"training": {"init": init}, **self.lora_meta(f)}
        save_classifier(model, self.outputs.model_dir, task.sets["train"].max_length, f.pooling, extra=extra)
        write_csv(ACC_CURVE, evaluation.outputs["accuracy"])
        write_json(CONFUSION, evaluation.outputs["confusion"])

    def summary(self, evaluation, train_seconds):
        metrics = evaluation.metrics
        return (
            f"test accuracy {metrics['test']['accuracy']:.2%} "
            f"(TF-IDF baseline {metrics['baseline']['test']['accuracy']:.2%}), "
            f"spam F1 {metrics['test']['f1']:.3f}, {train_seconds:.0f} s"
        )


def loader(f, task: SpamData, name: str) -> DataLoader:
    return DataLoader(task.sets[name], batch_size=f.batch_size, shuffle=False)


def main(params_path: str = "params.yaml") -> dict:
    return SpamStage().run(params_path)


if __name__ == "__main__":
    run_main("finetune_spam", main, doc=__doc__)
