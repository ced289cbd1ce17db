"""Streaming tokenization equals the book's whole-text encoding, split for split, on any number of
threads, holding a bounded window of the text."""

import os
import threading
import time
import tracemalloc

import pytest

from llm import corpus
from llm.corpus import _safe_cut, require_utf8, text_chunks, tokenize_corpus, tokenize_threads, utf8_error
from llm.data import read_tokens
from llm.errors import LLMError
from llm.tokenizer import encode, get_tokenizer


def book_split(text, ratio):
    split = int(ratio * len(text))
    return encode(text[:split]), encode(text[split:])


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("chunk_chars", [64, 1000, 1 << 22])
def test_chunked_equals_whole_text(tmp_path, verdict_text, chunk_chars, threads):
    src = tmp_path / "v.txt"
    src.write_text(verdict_text, encoding="utf-8")
    stats = tokenize_corpus([src], 0.9, tmp_path / "tok", chunk_chars=chunk_chars, progress=False, threads=threads)
    train, val = book_split(verdict_text, 0.9)
    assert read_tokens(tmp_path / "tok" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "tok" / "val.bin").tolist() == val
    assert stats == {"train_chars": 18431, "val_chars": 2048, "train_tokens": len(train), "val_tokens": len(val)}


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_tricky_whitespace_and_several_files(tmp_path, threads):
    a = "Hello  \n\nworld \n x\n" * 50 + "end"
    b = "second\r\nfile  with   spaces\n\n\n" * 30
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_bytes(b.encode())
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    tokenize_corpus(files, 0.7, tmp_path / "t", chunk_chars=37, progress=False, threads=threads)
    whole = a + "<|endoftext|>" + b.replace("\r\n", "\n")  # universal newlines, as the book's open()
    train, val = book_split(whole, 0.7)
    assert read_tokens(tmp_path / "t" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "t" / "val.bin").tolist() == val


def test_safe_cut_only_between_non_space_characters():
    assert _safe_cut("ab\ncd") == 3 and _safe_cut("ab cd") == 2 and _safe_cut("a b\nc") == 1
    assert _safe_cut("ab \ncd") == 0 and _safe_cut("ab\n cd") == 0 and _safe_cut("ab\n\ncd") == 0
    assert _safe_cut("ab  cd") == 0 and _safe_cut("ab\t cd") == 0


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_random_texts_at_small_chunks(tmp_path, threads):
    import random

    rng = random.Random(threads)
    atoms = [
        "word",
        "Ünïcode",
        "42",
        "3.14",
        "'s",
        "'ll",
        "!!",
        "--",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "é",
        "<|endoftext|>",
    ]
    for trial in range(20):
        text = "".join(rng.choice(atoms) for _ in range(400))
        src = tmp_path / f"r{trial}.txt"
        src.write_text(text, encoding="utf-8")
        out = tmp_path / f"t{trial}"
        tokenize_corpus([src], 0.6, out, chunk_chars=rng.choice([5, 17, 64]), progress=False, threads=threads)
        train, val = book_split(text, 0.6)
        assert read_tokens(out / "train.bin").tolist() == train, trial
        assert read_tokens(out / "val.bin").tolist() == val, trial


def test_text_chunks_encode_piece_by_piece_as_the_whole(tmp_path):
    a = "Ünïcode  words\n\n and   runs of   spaces\t\n" * 40
    b = "x" * 300 + " tail"  # no place to cut in the first 300 characters: one longer piece
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(b, encoding="utf-8")
    pieces = list(text_chunks([tmp_path / "a.txt", tmp_path / "b.txt"], chunk_chars=16))
    whole = a + "<|endoftext|>" + b
    assert len(pieces) > 20 and "".join(pieces) == whole
    assert [i for p in pieces for i in encode(p)] == encode(whole)


# --- threads ---------------------------------------------------------------------------------------
def test_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("LLM_TOKENIZE_THREADS", raising=False)
    assert tokenize_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cap, expected", [("1", 1), (" 1 ", 1), ("100000", None)])
def test_llm_tokenize_threads_caps_the_default(monkeypatch, cap, expected):
    monkeypatch.setenv("LLM_TOKENIZE_THREADS", cap)
    assert tokenize_threads() == (expected or len(os.sched_getaffinity(0)))  # a cap, never more than the CPUs


@pytest.mark.parametrize("cap", ["0", "-2", "two", "1.5", "²"])
def test_a_bad_llm_tokenize_threads_is_one_line(monkeypatch, tmp_path, cap):
    monkeypatch.setenv("LLM_TOKENIZE_THREADS", cap)
    (tmp_path / "c.txt").write_text("alpha beta")
    with pytest.raises(LLMError) as err:
        tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "tok", progress=False)
    assert str(err.value) == (
        f"LLM_TOKENIZE_THREADS={cap!r}: must be a whole number >= 1, the most threads tokenization uses"
    )
    assert not (tmp_path / "tok").exists()


def test_threads_below_one_are_refused(tmp_path):
    (tmp_path / "c.txt").write_text("alpha beta")
    with pytest.raises(LLMError, match=r"^tokenize_corpus: threads must be >= 1, got 0$"):
        tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "tok", progress=False, threads=0)


def test_a_forked_child_tokenizes_on_threads_of_its_own(tmp_path):
    (tmp_path / "c.txt").write_text("alpha beta gamma " * 100)
    tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "parent", progress=False, threads=2)  # the pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it tokenizes (a pool without threads would hang)
        try:
            tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "child", progress=False, threads=2)
        finally:
            os._exit(0 if (tmp_path / "child" / "val.bin").exists() else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    assert (tmp_path / "child" / "train.bin").read_bytes() == (tmp_path / "parent" / "train.bin").read_bytes()


def test_the_cap_is_what_tokenize_corpus_uses(monkeypatch, tmp_path):
    seen = []
    real = corpus._workers
    monkeypatch.setattr(corpus, "_workers", lambda n: seen.append(n) or real(n))
    monkeypatch.setenv("LLM_TOKENIZE_THREADS", "1")
    (tmp_path / "c.txt").write_text("alpha beta " * 10)
    tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "tok", progress=False)
    tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "tok", progress=False, threads=3)  # an argument wins
    assert seen == [1, 1, 3, 3]  # once per split


def test_each_thread_encodes_with_its_own_copy_of_the_encoding():
    text = "Ünïcode  words<|endoftext|>and\n\n runs"
    seen, together = [], threading.Barrier(3, timeout=30)  # all three alive at once: no thread reuses another's

    def use():
        first = corpus._own_encoding()
        seen.append((first, first is corpus._own_encoding(), corpus._encode_chunk(text).tolist()))
        together.wait()

    workers = [threading.Thread(target=use) for _ in range(3)]
    [t.start() for t in workers]
    [t.join() for t in workers]
    copies = [enc for enc, _, _ in seen]  # held here, so no two can share an id()
    assert len({id(enc) for enc in copies}) == 3 and get_tokenizer() not in copies
    assert all(same and ids == encode(text) for _, same, ids in seen)


@pytest.mark.parametrize("threads", [2, 4])
def test_chunks_are_encoded_on_several_threads_at_once(monkeypatch, tmp_path, threads):
    """The first `threads` encodings wait for each other: they only all return if `threads` of
    them run at the same time."""
    barrier, calls, lock = threading.Barrier(threads, timeout=30), [0], threading.Lock()
    real = corpus._encode_chunk

    def encode_chunk(text):
        with lock:
            calls[0] += 1
            first = calls[0] <= threads
        if first:
            barrier.wait()  # BrokenBarrierError after 30 s if fewer run at once
        return real(text)

    monkeypatch.setattr(corpus, "_encode_chunk", encode_chunk)
    text = "Every effort moves you.  Ünïcode\n\n  runs\t of spaces " * 50
    (tmp_path / "c.txt").write_text(text)
    tokenize_corpus([tmp_path / "c.txt"], 0.9, tmp_path / "tok", chunk_chars=40, progress=False, threads=threads)
    train, val = book_split(text, 0.9)
    assert read_tokens(tmp_path / "tok" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "tok" / "val.bin").tolist() == val


@pytest.mark.parametrize("threads", [1, 3])
def test_at_most_two_chunks_per_thread_are_in_flight(monkeypatch, tmp_path, threads):
    """Every encoding starts while at most 2 × threads pieces are submitted and not yet written."""
    collected, started, worst = [0], [0], [0]
    lock = threading.Lock()
    real_encode, real_collect = corpus._encode_chunk, corpus._collect

    def encode_chunk(text):
        with lock:
            started[0] += 1
            worst[0] = max(worst[0], started[0] - collected[0])
        return real_encode(text)

    def collect(task, bar):
        ids = real_collect(task, bar)
        with lock:
            collected[0] += 1
        return ids

    monkeypatch.setattr(corpus, "_encode_chunk", encode_chunk)
    monkeypatch.setattr(corpus, "_collect", collect)
    (tmp_path / "c.txt").write_text("alpha beta gamma delta " * 2000)
    tokenize_corpus([tmp_path / "c.txt"], 0.5, tmp_path / "tok", chunk_chars=100, progress=False, threads=threads)
    assert collected[0] > 200 and 1 <= worst[0] <= 2 * threads


def test_progress_counts_utf8_bytes(monkeypatch, tmp_path):
    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(corpus, "progress_bar", Recorder)
    a, b = "naïve café ✓ " * 30, "plain ascii text " * 20
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(b, encoding="utf-8")
    tokenize_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], 0.5, tmp_path / "tok", chunk_chars=50, threads=2)
    size = len((a + "<|endoftext|>" + b).encode())
    assert bars[0].kwargs["unit"] == "B" and bars[0].kwargs["total"] == size == bars[0].n


# --- bounded memory --------------------------------------------------------------------------------
def test_a_corpus_larger_than_the_memory_cap_streams(tmp_path):
    """tracemalloc traces Python objects and numpy buffers (the text read, cut and in flight, the
    ids being written), not tiktoken's own Rust buffers, which live one chunk at a time."""
    words = "Every effort moves you toward the picture, said Gisburn: Ünïcode  \n\n  and\ttabs. "
    text = "".join(f"{words}{i}\n" for i in range(50_000))  # about 4.3 MB of text
    src = tmp_path / "big.txt"
    src.write_text(text, encoding="utf-8")
    cap = 1_000_000  # a quarter of the corpus
    get_tokenizer()  # loaded (once per process) before the measurement
    tracemalloc.start()
    try:
        tokenize_corpus([src], 0.5, tmp_path / "tok", chunk_chars=16_384, progress=False, threads=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(text.encode()) > 4 * cap and peak < cap, peak
    train, val = book_split(text, 0.5)
    assert read_tokens(tmp_path / "tok" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "tok" / "val.bin").tolist() == val


# --- every run writes both splits, together --------------------------------------------------------
def test_every_run_writes_both_split_files_whatever_their_size(tmp_path):
    """A split that gets no text is an empty file, never the previous run's tokens (data.train_ratio 1e-9
    used to leave the last run's train.bin in place and pretraining trained on it)."""
    src = tmp_path / "c.txt"
    text = "one two three four five six seven eight nine ten " * 20
    src.write_text(text)
    out = tmp_path / "tok"
    first = tokenize_corpus([src], 0.5, out, progress=False)
    assert first["train_tokens"] > 0 and first["val_tokens"] > 0

    stats = tokenize_corpus([src], 1e-9, out, progress=False)
    assert stats == {"train_chars": 0, "val_chars": len(text), "train_tokens": 0, "val_tokens": len(encode(text))}
    assert read_tokens(out / "train.bin").tolist() == [] and read_tokens(out / "val.bin").tolist() == encode(text)

    src.write_text("")  # nothing at all: both files empty
    assert tokenize_corpus([src], 0.5, out, progress=False) == dict.fromkeys(stats, 0)
    assert (out / "train.bin").stat().st_size == 0 and (out / "val.bin").stat().st_size == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # no temporary files left


def test_check_runs_per_split_and_a_refusal_keeps_the_previous_pair(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("alpha beta gamma delta " * 50)
    out = tmp_path / "tok"
    tokenize_corpus([src], 0.5, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def check(split, stats):
        calls.append((split, dict(stats)))
        if split == "train" and stats["train_tokens"] < 100:
            raise LLMError("too small")

    with pytest.raises(LLMError, match="too small"):
        tokenize_corpus([src], 0.05, out, progress=False, check=check)
    assert [c[0] for c in calls] == ["train"] and calls[0][1]["val_tokens"] == 0  # stopped before val was tokenized
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pair, no temporary files

    calls.clear()
    stats = tokenize_corpus([src], 0.5, out, progress=False, check=check)
    assert [c[0] for c in calls] == ["train", "val"] and calls[-1][1] == stats


def test_check_sees_a_split_without_text(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("alpha beta")
    seen = []
    tokenize_corpus([src], 1e-9, tmp_path / "tok", progress=False, check=lambda split, s: seen.append((split, s)))
    assert [(split, s["train_tokens"]) for split, s in seen] == [("train", 0), ("val", 0)]
    assert seen[-1][1]["val_tokens"] == len(encode("alpha beta"))


# --- a corpus that is not UTF-8 ------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 1 << 20])
def test_utf8_error_names_the_exact_byte_whatever_the_chunks(tmp_path, chunk_bytes):
    good = "naïve café\nline two ✓\n".encode()
    cases = [
        (good + b"bad \xe9 here", len(good) + 4, 3, b"\xe9"),
        (good[:7] + b"\xff" + good[7:], 7, 1, b"\xff"),
        (good + "✓".encode()[:2], len(good), 3, b"\xe2"),  # cut inside a character at the end
        (b"\x80", 0, 1, b"\x80"),
    ]
    for i, (data, offset, line, byte) in enumerate(cases):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(data)
        assert utf8_error(path, chunk_bytes) == f"byte {byte!r} at offset {offset} (line {line})", i
    (tmp_path / "ok.txt").write_bytes(good)
    assert utf8_error(tmp_path / "ok.txt", chunk_bytes) is None
    (tmp_path / "empty.txt").write_bytes(b"")
    assert utf8_error(tmp_path / "empty.txt", chunk_bytes) is None


def test_a_corpus_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "a.txt").write_text("fine text " * 10)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait\n" * 3)
    out = tmp_path / "tok"
    with pytest.raises(LLMError) as err:
        tokenize_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], 0.5, out, progress=False, names=["A", "B"])
    assert (
        str(err.value)
        == f"B ({tmp_path / 'b.txt'}) is not UTF-8 text: byte b'\\xe9' at offset 3 (line 1); save it as UTF-8"
    )
    with pytest.raises(LLMError, match=r"^the corpus file \(.*b.txt\) is not UTF-8 text"):
        tokenize_corpus([tmp_path / "b.txt"], 0.5, out, progress=False)
    assert not out.exists()
    with pytest.raises(LLMError, match=r"^cannot read X \(.*nope.txt\): No such file"):
        require_utf8(tmp_path / "nope.txt", "X")
