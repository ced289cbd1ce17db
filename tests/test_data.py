"""Token files and sliding windows: the book's windows, without one tensor per window."""

import tracemalloc

import numpy as np
import pytest
import torch

from llm.data import (
    GPTDatasetV1,
    TokenWindowDataset,
    create_dataloader_v1,
    min_split_tokens,
    read_tokens,
    split_windows,
    write_tokens,
)
from llm.errors import LLMError
from llm.tokenizer import get_tokenizer
from tests import book_reference as book


def plain_windows(ids, max_length, stride):
    return [(ids[i : i + max_length], ids[i + 1 : i + max_length + 1]) for i in range(0, len(ids) - max_length, stride)]


@pytest.mark.parametrize("length", [0, 1, 2, 5, 17, 64, 101])
@pytest.mark.parametrize("max_length", [1, 2, 4, 16, 64, 200])
@pytest.mark.parametrize("stride", [1, 3, 4, 16, 70])
def test_windows_equal_a_plain_list_implementation(length, max_length, stride):
    ids = list(range(1000, 1000 + length))
    ds = TokenWindowDataset(np.asarray(ids, dtype=np.uint16), max_length, stride)
    expected = plain_windows(ids, max_length, stride)
    assert len(ds) == len(expected)
    for i, (x, y) in enumerate(expected):
        got_x, got_y = ds[i]
        assert got_x.tolist() == x and got_y.tolist() == y
        assert got_x.dtype == torch.long
    with pytest.raises(IndexError):
        ds[len(expected)]


def test_dataset_equals_the_books_on_real_text(verdict_text):
    tok = get_tokenizer()
    for max_length, stride in [(4, 1), (256, 128), (32, 50)]:
        ref = book.GPTDatasetV1(verdict_text, tok, max_length, stride)
        ours = GPTDatasetV1(verdict_text, tok, max_length, stride)
        assert len(ours) == len(ref)
        for i in [0, 1, len(ref) // 2, len(ref) - 1]:
            assert torch.equal(ours[i][0], ref[i][0]) and torch.equal(ours[i][1], ref[i][1])


def test_dataloader_keeps_the_books_signature_and_batches(verdict_text):
    torch.manual_seed(123)
    ref = next(iter(book.create_dataloader_v1(verdict_text, get_tokenizer(), 8, 4, 4, shuffle=False)))
    got = next(iter(create_dataloader_v1(verdict_text, batch_size=8, max_length=4, stride=4, shuffle=False)))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    loader = create_dataloader_v1(
        verdict_text, batch_size=2, max_length=256, stride=256, shuffle=True, drop_last=True, num_workers=0
    )
    assert len(loader) == len(range(0, 5145 - 256, 256)) // 2  # 5,145 tokens in the-verdict.txt


def test_endoftext_is_allowed_in_pretraining_text():
    ds = GPTDatasetV1("Hello<|endoftext|> world", get_tokenizer(), max_length=2, stride=1)
    assert 50256 in ds[0][0].tolist() + ds[0][1].tolist()


def test_token_file_roundtrip_is_uint16_memmap(tmp_path):
    ids = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "sub" / "train.bin"
    assert write_tokens(path, [ids[:2], ids[2:]]) == 5
    assert path.stat().st_size == 10
    loaded = read_tokens(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert loaded.tolist() == ids.tolist()
    assert not list(tmp_path.glob("sub/.*tmp"))


def test_failed_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, [[1, 2, 3]])

    def chunks():
        yield [4, 5]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError):
        write_tokens(path, chunks())
    assert read_tokens(path).tolist() == [1, 2, 3]  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]
    with pytest.raises(LLMError, match="uint16"):
        write_tokens(tmp_path / "big.bin", [[70000]])
    assert not (tmp_path / "big.bin").exists()


def test_truncated_or_missing_token_file_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(LLMError, match="truncated"):
        read_tokens(path)
    with pytest.raises(LLMError, match="does not exist"):
        read_tokens(tmp_path / "nope.bin")


def _construction_bytes(ids, **kwargs):
    tracemalloc.start()
    ds = TokenWindowDataset(ids, **kwargs)
    len(ds), ds[len(ds) - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return len(ds), peak


def test_memory_does_not_grow_with_the_number_of_windows(tmp_path):
    path = tmp_path / "big.bin"
    write_tokens(path, [np.arange(2_000_000) % 50257])
    ids = read_tokens(path)
    few, few_bytes = _construction_bytes(ids[:20_000], max_length=8, stride=8)
    many, many_bytes = _construction_bytes(ids, max_length=8, stride=1)
    assert many > 1000 * few / 10  # two million windows against 2,500
    # The book's dataset would allocate ~4 million tensor objects here (hundreds of MB).
    assert many_bytes < 64 * 1024 and few_bytes < 64 * 1024


def test_seeded_loader_shuffles_reproducibly():
    text = " ".join(f"w{i}" for i in range(300))

    def first_tokens(seed):
        g = torch.Generator().manual_seed(seed)
        loader = create_dataloader_v1(text, batch_size=4, max_length=8, stride=8, generator=g)
        return [x[:, 0].tolist() for x, _ in loader]

    a, b, c = first_tokens(1), first_tokens(1), first_tokens(2)
    assert a == b and a != c


@pytest.mark.parametrize("max_length, stride", [(4, 4), (4, 1), (16, 5)])
def test_split_windows_need_max_length_plus_one_tokens_in_each_split(tmp_path, max_length, stride):
    need = min_split_tokens(max_length)
    assert need == max_length + 1
    write_tokens(tmp_path / "train.bin", [range(need)])
    write_tokens(tmp_path / "val.bin", [range(need)])
    train, val = split_windows(tmp_path, max_length, stride)
    assert len(train) == len(val) == 1  # exactly one window: the smallest split that works
    for split in ("train", "val"):
        write_tokens(tmp_path / f"{split}.bin", [range(need - 1)])
        with pytest.raises(LLMError) as err:
            split_windows(tmp_path, max_length, stride)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / f'{split}.bin'} holds {need - 1} tokens, too few for one window of ")
        assert f"train.max_length + 1 = {need} tokens; data.corpus, data.train_ratio and train.max_length" in message
        write_tokens(tmp_path / f"{split}.bin", [range(need)])
    write_tokens(tmp_path / "val.bin", [])
    with pytest.raises(LLMError, match=r"val.bin holds 0 tokens, too few for one window"):
        split_windows(tmp_path, max_length, stride)


def test_token_files_are_checked_against_the_models_vocabulary_once_at_load(tmp_path):
    write_tokens(tmp_path / "train.bin", [[3, 96, 5, 1, 2]])
    write_tokens(tmp_path / "val.bin", [[0, 1, 2, 97, 4]])
    assert read_tokens(tmp_path / "train.bin", 97).tolist() == [3, 96, 5, 1, 2]
    assert read_tokens(tmp_path / "val.bin").tolist() == [0, 1, 2, 97, 4]  # no vocab_size: not checked
    read_tokens(tmp_path / "val.bin", 98)
    with pytest.raises(LLMError) as err:
        read_tokens(tmp_path / "val.bin", 97)
    path = tmp_path / "val.bin"
    assert str(err.value) == f"token file {path}: token id 97 is outside the vocabulary [0, 97) of the model"
    with pytest.raises(LLMError, match=r"val.bin: token id 97 is outside the vocabulary \[0, 97\)"):
        split_windows(tmp_path, 2, 2, vocab_size=97)
    train, val = split_windows(tmp_path, 2, 2, vocab_size=98)
    assert len(train) == len(val) == 2
