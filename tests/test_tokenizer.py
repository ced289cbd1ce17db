"""tiktoken gpt2, offline from TIKTOKEN_CACHE_DIR, and a one-line error without it."""

import os
import subprocess
import sys

import torch

from llm.tokenizer import EOT_ID, REPLACEMENT, get_tokenizer, text_to_token_ids, token_bytes, token_ids_to_text
from tests.conftest import ROOT


def test_gpt2_encoding_and_book_helpers():
    tok = get_tokenizer()
    assert tok.n_vocab == 50257 and tok.eot_token == EOT_ID == 50256
    ids = text_to_token_ids("Every effort moves you", tok)
    assert ids.tolist() == [[6109, 3626, 6100, 345]]  # the book's chapter-5 ids
    assert token_ids_to_text(ids, tok) == "Every effort moves you"
    assert text_to_token_ids("a<|endoftext|>b", tok).tolist() == [[64, 50256, 65]]
    assert token_ids_to_text(torch.tensor([64, 50256]), tok) == "a<|endoftext|>"


def test_ids_the_tokenizer_lacks_decode_as_the_replacement_character():
    """A model's vocabulary may be padded past GPT-2's 50257 (nanoGPT: 50304): such ids decode as
    U+FFFD, which already stands for bytes that are not UTF-8, instead of a KeyError."""
    tok = get_tokenizer()
    assert REPLACEMENT == "\ufffd"
    assert token_bytes(64, tok) == b"a" and token_bytes(50300, tok) == token_bytes(-1, tok) == "\ufffd".encode()
    assert token_ids_to_text(torch.tensor([[64, 50257, 65, 50303]]), tok) == "a\ufffdb\ufffd"
    assert token_ids_to_text(torch.tensor([[30325, 50300]]), tok) == tok.decode([30325]) + "\ufffd"


def _run_offline(cache_dir):
    # A fresh interpreter, with tiktoken's downloader replaced by a network failure, so the
    # result does not depend on whether this machine happens to be online.
    code = (
        "import tiktoken.load as L\n"
        "def fail(url): raise ConnectionError('network is unreachable')\n"
        "L.read_file = fail\n"
        "from llm.cli import main\n"
        "import sys\n"
        "from llm.tokenizer import get_tokenizer\n"
        "from llm.errors import LLMError\n"
        "try:\n"
        "    print(get_tokenizer().n_vocab)\n"
        "except LLMError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)


def test_offline_with_the_cache_dir():
    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    out = _run_offline(cache)
    assert out.stdout.strip() == "50257", out.stderr


def test_offline_without_cache_is_one_line_naming_the_variable(tmp_path):
    out = _run_offline(tmp_path)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR"), out
    assert "TIKTOKEN_CACHE_DIR" in lines[0]
