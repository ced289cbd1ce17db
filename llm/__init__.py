"""The book\x27s LLM, chapters 2-7."""
