"""The book's API, chapter by chapter, over the engine the pipeline runs.

A reader of *Build a Large Language Model (From Scratch)* finds each chapter's names in its module,
with the book's signatures and semantics; everything is the engine's code (`llm.model`,
`llm.data`, `llm.trainer`, ...) underneath, so the book's functions and the pipeline's stages run
the same model and the same training loop.

- chapter 2, working with text data: `llm.book.ch02`: `GPTDatasetV1`, `create_dataloader_v1`
- chapter 3, coding attention mechanisms: `llm.book.ch03`: `SelfAttention_v2`, `MultiHeadAttention`
- chapter 4, implementing a GPT model: `llm.book.ch04`: `GPT_CONFIG_124M`, `LayerNorm`, `GELU`,
  `FeedForward`, `TransformerBlock`, `GPTModel`, `generate_text_simple`
- chapter 5, pretraining on unlabeled data: `llm.book.ch05`: `text_to_token_ids`, `token_ids_to_text`,
  `calc_loss_batch`, `calc_loss_loader`, `evaluate_model`, `generate_and_print_sample`,
  `train_model_simple`, `generate`
- chapter 6, finetuning for classification: `llm.book.ch06`: `create_balanced_dataset`, `random_split`,
  `SpamDataset`, `calc_accuracy_loader`, `calc_loss_batch`, `calc_loss_loader`, `evaluate_model`,
  `train_classifier_simple`, `classify_review`
- chapter 7, finetuning to follow instructions: `llm.book.ch07`: `format_input`, `InstructionDataset`,
  `custom_collate_fn`
- chapter 7's bonus, preference tuning with DPO: `llm.book.ch07_dpo`: `PreferenceDataset`,
  `custom_collate_fn`, `compute_dpo_loss`, `compute_logprobs`, `compute_dpo_loss_batch`,
  `compute_dpo_loss_loader`, `evaluate_dpo_loss_loader`, `train_model_dpo_simple`
- appendix E, parameter-efficient finetuning with LoRA: `llm.book.appendix_e`: `LoRALayer`,
  `LinearWithLoRA`, `replace_linear_with_lora`

`from llm.book import ...` gives every name above except the three that chapters 5 and 6 define
differently (next-token loss there, last-token classification loss here): import
`calc_loss_batch`, `calc_loss_loader` and `evaluate_model` from their chapter,
e.g. `from llm.book.ch06 import evaluate_model`. Its `custom_collate_fn` is chapter 7's; the DPO
notebook's, for preference pairs, is `llm.book.ch07_dpo.custom_collate_fn`.

The engine's modules never import this package: it sits on top of them.
"""

from llm.book.appendix_e import LinearWithLoRA, LoRALayer, replace_linear_with_lora
from llm.book.ch02 import GPTDatasetV1, create_dataloader_v1
from llm.book.ch03 import MultiHeadAttention, SelfAttention_v2
from llm.book.ch04 import (
    GELU,
    GPT_CONFIG_124M,
    FeedForward,
    GPTModel,
    LayerNorm,
    TransformerBlock,
    generate_text_simple,
)
from llm.book.ch05 import generate, generate_and_print_sample, text_to_token_ids, token_ids_to_text, train_model_simple
from llm.book.ch06 import (
    SpamDataset,
    calc_accuracy_loader,
    classify_review,
    create_balanced_dataset,
    random_split,
    train_classifier_simple,
)
from llm.book.ch07 import InstructionDataset, custom_collate_fn, format_input
from llm.book.ch07_dpo import (
    PreferenceDataset,
    compute_dpo_loss,
    compute_dpo_loss_batch,
    compute_dpo_loss_loader,
    compute_logprobs,
    evaluate_dpo_loss_loader,
    train_model_dpo_simple,
)

# Defined differently in chapters 5 and 6: import them from their chapter module.
CHAPTER_TWINS = ("calc_loss_batch", "calc_loss_loader", "evaluate_model")

__all__ = [
    # chapter 2
    "GPTDatasetV1",
    "create_dataloader_v1",
    # chapter 3
    "SelfAttention_v2",
    "MultiHeadAttention",
    # chapter 4
    "GPT_CONFIG_124M",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "GPTModel",
    "generate_text_simple",
    # chapter 5
    "text_to_token_ids",
    "token_ids_to_text",
    "generate_and_print_sample",
    "train_model_simple",
    "generate",
    # chapter 6
    "create_balanced_dataset",
    "random_split",
    "SpamDataset",
    "calc_accuracy_loader",
    "train_classifier_simple",
    "classify_review",
    # chapter 7
    "format_input",
    "InstructionDataset",
    "custom_collate_fn",
    # chapter 7's bonus, DPO (its custom_collate_fn: llm.book.ch07_dpo)
    "PreferenceDataset",
    "compute_dpo_loss",
    "compute_logprobs",
    "compute_dpo_loss_batch",
    "compute_dpo_loss_loader",
    "evaluate_dpo_loss_loader",
    "train_model_dpo_simple",
    # appendix E
    "LoRALayer",
    "LinearWithLoRA",
    "replace_linear_with_lora",
]
