"""Chapter 2, working with text data: the sliding-window dataset and its DataLoader.

`GPTDatasetV1(txt, tokenizer, max_length, stride)` has the book's windows but keeps one array of
token ids instead of two tensors per window; `create_dataloader_v1` builds the GPT-2 tokenizer
itself, as the book's does.
"""

from llm.data import GPTDatasetV1, create_dataloader_v1

__all__ = ["GPTDatasetV1", "create_dataloader_v1"]
