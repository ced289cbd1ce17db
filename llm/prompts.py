"""Prompt styles (chapter 7): how an {instruction, input} entry becomes the text the model reads.

`STYLES` is the registry, one style for each name of `llm.choices.PROMPT_STYLES` (a test keeps
them equal): `finetune_instruct.prompt_style` allows exactly those names, and a checkpoint of the
finetune_instruct stage records the name it was trained with. `alpaca` is the book's format,
character for character; `phi3` is the variant of the book's exercise 7.1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _alpaca(entry: Mapping[str, Any]) -> str:
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def _phi3(entry: Mapping[str, Any]) -> str:
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get("input") else "")


@dataclass(frozen=True)
class PromptStyle:
    format_input: Callable[[Mapping[str, Any]], str]  # the prompt
    response_header: str  # what follows the prompt, before the response


STYLES: dict[str, PromptStyle] = {
    "alpaca": PromptStyle(_alpaca, "\n\n### Response:\n"),
    "phi3": PromptStyle(_phi3, "\n<|assistant|>:\n"),
}


def format_input(entry: Mapping[str, Any], style: str = "alpaca") -> str:
    """The book's `format_input`: the prompt for an entry (the Alpaca format by default)."""
    return STYLES[style].format_input(entry)


def response_header(style: str = "alpaca") -> str:
    return STYLES[style].response_header


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The book's extraction: drop the prompt and the response marker, strip whitespace."""
    marker = response_header(style).strip()
    return generated_text[len(prompt) :].replace(marker, "").strip()


def recorded_prompt_style(meta: Mapping[str, Any]) -> str:
    """The prompt style an instruction model's checkpoint recorded (finetune_instruct's, finetune_dpo's:
    `checkpoint_meta(path)`'s `instruct.prompt_style`); the book's "alpaca" for any other model."""
    return meta.get("instruct", {}).get("prompt_style", "alpaca")
