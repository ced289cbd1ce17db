"""Appendix E, parameter-efficient finetuning with LoRA: the book's three names, the engine's
(`llm.lora`), with the book's shapes, initialisation and scaling (`alpha * (x @ A @ B)`).

`replace_linear_with_lora(model, rank, alpha)` wraps every `nn.Linear`, as the book's; the engine's
also takes `targets` (`llm.choices.LORA_TARGETS`) to pick layers of a GPTModel.
"""

from llm.lora import LinearWithLoRA, LoRALayer, replace_linear_with_lora

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]
