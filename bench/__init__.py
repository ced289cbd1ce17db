"""CPU benchmarks against the book's code and transformers.

Run from the repository root: `python -m bench.bench_train`, `python -m bench.bench_generate`.
"""
