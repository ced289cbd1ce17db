"""The models a server holds: each `--model [NAME=]PATH` loaded once, with its kind and name."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.errors import LLMError

LANGUAGE, INSTRUCT, CLASSIFIER = "language", "instruct", "classifier"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # named after the folder that holds them


@dataclass
class ServedModel:
    """One loaded model: `kind` is "language" (completions), "instruct" (chat and completions: its
    checkpoint recorded a prompt style) or "classifier" (classify only)."""

    id: str
    path: str
    kind: str
    model: Any  # llm.model.GPTModel
    prompt_style: str | None = None
    classifier: dict | None = None  # the classifier settings (num_classes, max_length, pooling)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.model.cfg["context_length"]

    def card(self) -> dict[str, Any]:
        """The model's entry in GET /v1/models: OpenAI's fields, then this project's."""
        card = {"id": self.id, "object": "model", "created": self.created, "owned_by": "llm-from-scratch"}
        card |= {"kind": self.kind, "context_length": self.context_length}
        if self.prompt_style is not None:
            card["prompt_style"] = self.prompt_style
        if self.classifier is not None:
            card["max_length"] = self.classifier["max_length"]
        return card


def split_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` → (NAME, PATH); a bare PATH is named after its folder or file (`models/spam` →
    `spam`, `models/spam/model.safetensors` → `spam`, `gpt2-small` → `gpt2-small`). A path that
    exists is a path even when it holds a "="."""
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, path
    p = Path(spec)
    if p.name in _WEIGHT_FILES and p.parent.name:
        return p.parent.name, spec
    if p.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        return p.stem, spec
    return p.name or spec, spec


def load_model(spec: str, device="cpu") -> ServedModel:
    """Load one `--model` the way `llm generate`, `llm instruct` and `llm classify` do: a checkpoint
    whose config.json records classifier settings with `load_classifier`, anything else with
    `load_checkpoint`; a recorded prompt style (finetune_instruct's, finetune_dpo's) makes it an instruction
    model."""
    from llm.checkpoint import checkpoint_meta, load_checkpoint
    from llm.classifier import load_classifier
    from llm.prompts import recorded_prompt_style

    name, path = split_spec(spec)
    meta = checkpoint_meta(path)
    if "classifier" in meta:
        model, info = load_classifier(path, map_location=device)
        return ServedModel(name, path, CLASSIFIER, model, classifier=info)
    model = load_checkpoint(path, map_location=device)
    if "instruct" in meta:
        return ServedModel(name, path, INSTRUCT, model, prompt_style=recorded_prompt_style(meta))
    return ServedModel(name, path, LANGUAGE, model)


def load_models(specs: list[str], device="cpu") -> dict[str, ServedModel]:
    """Every `--model`, by name; two models of the same name are an LLMError (give NAME=PATH)."""
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, _ = split_spec(spec)
        if name in models:
            first = models[name].path
            raise LLMError(f"two models are named {name!r} ({first}, {spec}): name one with --model NAME=PATH")
        models[name] = load_model(spec, device)
    return models
