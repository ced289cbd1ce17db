"""Chapter 7, finetuning to follow instructions: the Alpaca prompt, the dataset and the collate
function, all the engine's (`llm.instruct`).

`format_input(entry)` is the book's Alpaca prompt (`style="phi3"` is the exercise's variant);
`InstructionDataset(data, tokenizer)` tokenizes each prompt and response once;
`custom_collate_fn` pads, shifts the targets and masks padding with -100 as the book does.
"""

from llm.instruct import InstructionDataset, custom_collate_fn
from llm.prompts import format_input

__all__ = ["format_input", "InstructionDataset", "custom_collate_fn"]
