"""Generation: the book's semantics, and a KV cache that changes nothing but the speed."""

import pytest
import torch

from llm.errors import LLMError
from llm.generate import Batch, _filter_logits, generate, generate_batch, generate_stream, new_row
from llm.model import GPTModel
from tests import book_reference as book
from tests.conftest import tiny_cfg


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_cfg(context_length=16, qkv_bias=True)
    torch.manual_seed(10)
    ref = book.GPTModel(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return cfg, ref, ours


@pytest.mark.parametrize("prompt_len, new, context_size", [(1, 10, 16), (5, 30, 16), (16, 8, 16), (4, 20, 6)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_book_token_for_token(pair, prompt_len, new, context_size, use_cache):
    cfg, ref, ours = pair
    torch.manual_seed(prompt_len)
    idx = torch.randint(0, cfg["vocab_size"], (1, prompt_len))
    expected = book.generate(ref, idx, new, context_size)
    got = generate(ours, idx, new, context_size, use_cache=use_cache)
    assert torch.equal(got, expected)  # includes sequences that outgrow the context window


def test_kv_cache_equals_no_cache_for_a_batch_past_the_context(pair):
    cfg, _, ours = pair
    idx = torch.randint(0, cfg["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(5))
    with_cache = generate(ours, idx, 40, cfg["context_length"], use_cache=True)
    without = generate(ours, idx, 40, cfg["context_length"], use_cache=False)
    assert with_cache.shape == (3, 47)
    assert torch.equal(with_cache, without)


def test_batch_rows_equal_separate_runs(pair):
    cfg, _, ours = pair
    idx = torch.randint(0, cfg["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(6))
    batch = generate(ours, idx, 12, cfg["context_length"])
    for row in range(2):
        assert torch.equal(batch[row : row + 1], generate(ours, idx[row : row + 1], 12, cfg["context_length"]))


def test_cached_prefill_then_chunk_matches_full_forward(pair):
    cfg, _, ours = pair
    idx = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = ours(idx)
        cache = ours.new_kv_cache(2)
        first = ours(idx[:, :5], kv_cache=cache)
        second = ours(idx[:, 5:9], kv_cache=cache)  # several tokens after a cached prefix
        third = ours(idx[:, 9:], kv_cache=cache)
    assert cache.pos == 12
    stitched = torch.cat([first, second, third], dim=1)
    assert torch.allclose(stitched, full, atol=1e-5)


def test_sampling_follows_the_books_global_rng(pair):
    cfg, ref, ours = pair
    idx = torch.tensor([[1, 2, 3]])
    torch.manual_seed(123)
    expected = book.generate(ref, idx, 15, cfg["context_length"], temperature=1.5, top_k=50)
    torch.manual_seed(123)
    got = generate(ours, idx, 15, cfg["context_length"], temperature=1.5, top_k=50)
    assert torch.equal(got, expected)
    # seed=123 draws from its own generator seeded the same way: same tokens, global RNG untouched
    torch.manual_seed(999)
    state = torch.get_rng_state()
    seeded = generate(ours, idx, 15, cfg["context_length"], temperature=1.5, top_k=50, seed=123)
    assert torch.equal(seeded, expected)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_makes_sampling_reproducible_and_differs_across_seeds(pair):
    cfg, _, ours = pair
    idx = torch.tensor([[4, 5]])
    a = generate(ours, idx, 30, cfg["context_length"], temperature=2.0, seed=1)
    b = generate(ours, idx, 30, cfg["context_length"], temperature=2.0, seed=1)
    c = generate(ours, idx, 30, cfg["context_length"], temperature=2.0, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_stops_like_the_book(pair):
    cfg, ref, ours = pair
    idx = torch.tensor([[7, 8, 9]])
    greedy = book.generate(ref, idx, 10, cfg["context_length"])
    eos = int(greedy[0, 6])  # the 4th generated token
    expected = book.generate(ref, idx, 10, cfg["context_length"], eos_id=eos)
    got = generate(ours, idx, 10, cfg["context_length"], eos_id=eos)
    assert torch.equal(got, expected)
    assert eos not in got[0, 3:].tolist()


def test_eos_in_a_batch_pads_finished_rows_and_stops_when_all_finish(pair):
    cfg, _, ours = pair
    idx = torch.tensor([[7, 8, 9], [1, 2, 3]])
    free = generate(ours, idx, 10, cfg["context_length"])
    eos = int(free[0, 4])  # row 0 emits it at its 2nd step
    out = generate(ours, idx, 10, cfg["context_length"], eos_id=eos)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    if eos not in free[1, 3:].tolist():
        assert out.shape[1] == 13  # the other row never finished: all 10 steps ran


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.1]])
    k2 = _filter_logits(logits, top_k=2, top_p=None)
    assert torch.isinf(k2).sum(dim=1).tolist() == [2, 2]  # per row (the book's min_val broadcasts wrongly)
    assert torch.isfinite(k2[0, [1, 2]]).all() and torch.isfinite(k2[1, [2, 3]]).all()
    p = _filter_logits(logits, top_k=None, top_p=0.5)
    assert torch.isfinite(p).sum(dim=1).tolist() == [1, 1]  # the top token alone holds > 50%
    assert torch.equal(_filter_logits(logits, None, 1.0), logits)


def test_top_p_tiny_is_greedy(pair):
    cfg, _, ours = pair
    idx = torch.tensor([[11, 12]])
    greedy = generate(ours, idx, 10, cfg["context_length"])
    nucleus = generate(ours, idx, 10, cfg["context_length"], temperature=1.0, top_p=1e-6, seed=0)
    assert torch.equal(greedy, nucleus)


def test_stream_yields_one_token_at_a_time_and_restores_training_mode(pair):
    cfg, _, ours = pair
    ours.train()
    steps = list(generate_stream(ours, torch.tensor([[1]]), 5, cfg["context_length"]))
    assert ours.training
    ours.eval()
    assert [tuple(s.shape) for s in steps] == [(1, 1)] * 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context_size": 17}, "context_size"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature must be >= 0 and finite .*, got nan"),  # was greedy
        ({"temperature": float("inf")}, "temperature must be >= 0 and finite .*, got inf"),  # was a torch error
        ({"temperature": float("-inf")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan"), "temperature": 1.0}, r"top_p must be in \(0, 1\], got nan"),
        ({"top_p": float("inf"), "temperature": 1.0}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": 1e-300}, r"temperature must be 0 \(greedy\) or at least 0.001, got 1e-300"),  # was NaN
    ],
)
def test_bad_arguments_are_clear_errors(pair, kwargs, message):
    cfg, _, ours = pair
    args = {"max_new_tokens": 3, "context_size": cfg["context_length"], **kwargs}
    with pytest.raises(LLMError, match=message):
        generate(ours, torch.tensor([[1]]), **args)
    with pytest.raises(LLMError, match="non-empty"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 3, cfg["context_length"])


def test_cached_head_copy_follows_weight_updates():
    """The decode path's transposed head copy is rebuilt after in-place updates (an optimizer step)."""
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg()).eval()
    idx = torch.randint(0, 50257, (1, 5))
    generate(model, idx, 4, 24)  # builds the copy
    with torch.no_grad():
        model.out_head.weight.mul_(-1.0)
    assert generate(model, idx, 8, 24).tolist() == generate(model, idx, 8, 24, use_cache=False).tolist()
    assert "_head_t" not in str(list(model.state_dict()))


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": float("nan")}, {"top_p": float("nan")}, {"top_k": 0}, {"context_size": 99}],
)
def test_the_stream_checks_its_arguments_before_the_first_step(pair, kwargs):
    """An error comes from the call itself, so `llm generate` prints nothing before it."""
    cfg, _, ours = pair
    with pytest.raises(LLMError):
        generate_stream(ours, torch.tensor([[1]]), **{"max_new_tokens": 3, "context_size": 16, **kwargs})


def test_a_prompt_id_outside_the_models_vocabulary_is_refused(pair):
    cfg, _, ours = pair
    small = GPTModel(tiny_cfg(vocab_size=100)).eval()
    with pytest.raises(LLMError, match=r"^the prompt: token id 100 is outside the vocabulary \[0, 100\) of the model$"):
        generate(small, torch.tensor([[5, 100]]), 2, 24)
    with pytest.raises(LLMError, match="token id -1"):
        generate(ours, torch.tensor([[-1]]), 2, 16)


def _padded_vocab_model(favourite: int):
    """A model with vocab_size 50304 (nanoGPT's padding) whose greedy choice is always `favourite`."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(vocab_size=50304)).eval()
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.weight[favourite] = 1.0
        model.final_norm.scale.fill_(1.0)
        model.final_norm.shift.fill_(100.0)  # every normalized feature positive: the favourite wins
    return model


def test_ids_beyond_the_tokenizers_vocabulary_decode_as_the_replacement_character(tmp_path, capsys):
    from llm.checkpoint import save_checkpoint
    from llm.cli import main
    from llm.generate import decode_stream
    from llm.tokenizer import REPLACEMENT, get_tokenizer

    model = _padded_vocab_model(50300)
    steps = generate_stream(model, torch.tensor([[1, 2]]), 3, 24)
    assert "".join(decode_stream(get_tokenizer(), steps)) == REPLACEMENT * 3 == "\ufffd" * 3
    path = save_checkpoint(model, tmp_path / "padded")
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr() == ("Hi\ufffd\ufffd\n", "")


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_a_tiny_top_p_samples_the_most_likely_token_alone(pair, top_p):
    """The most likely token is always kept: a top_p below float32's range (1e-300 compares as 0)
    samples it alone, the greedy choice, instead of a softmax over nothing (a torch error)."""
    cfg, _, ours = pair
    greedy = generate(ours, torch.tensor([[1, 2]]), 6, cfg["context_length"])
    nucleus = generate(ours, torch.tensor([[1, 2]]), 6, cfg["context_length"], temperature=1.0, top_p=top_p, seed=3)
    assert torch.equal(nucleus, greedy)


# --- many prompts at once: generate_batch and Batch ---------------------------------------------------
def _alone(model, prompt, new, context_size, **settings) -> list[int]:
    """What `generate` adds to `prompt` alone (without the eos it stops at)."""
    out = generate(model, torch.tensor([prompt]), new, context_size, **settings)
    return out[0, len(prompt) :].tolist()


def _prompts(n: int, longest: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 50257, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_a_batch_gives_every_prompt_what_generate_gives_it_alone(pair, batch_size):
    """Prompts of 1 to 16 tokens (the context), 20 new tokens each: most outgrow the window and slide as
    `generate` slides; with fewer places than prompts, finished rows hand their place on between steps."""
    cfg, _, ours = pair
    prompts = _prompts(24, 16)
    expected = [_alone(ours, p, 20, 16) for p in prompts]
    assert generate_batch(ours, prompts, 20, 16, batch_size=batch_size) == expected
    shorter = [_alone(ours, p, 12, 7) for p in prompts]  # a context_size below the model's
    assert generate_batch(ours, prompts, 12, 7, batch_size=batch_size) == shorter


def test_rows_stop_at_eos_alone_and_leave_the_batch(pair):
    cfg, _, ours = pair
    prompts = _prompts(12, 10, seed=1)
    eos = _alone(ours, prompts[0], 5, 16)[2]  # the first prompt's third token
    expected = [_alone(ours, p, 15, 16, eos_id=eos) for p in prompts]
    assert len(expected[0]) == 2 and any(len(e) == 15 for e in expected)
    assert generate_batch(ours, prompts, 15, 16, eos_id=eos, batch_size=4) == expected


def test_sampling_in_a_batch_is_each_prompts_seeded_sampling_alone(pair):
    cfg, _, ours = pair
    prompts = _prompts(10, 12, seed=2)
    settings = {"temperature": 1.4, "top_k": 30, "top_p": 0.95, "seed": 123}
    expected = [_alone(ours, p, 18, 16, **settings) for p in prompts]
    assert generate_batch(ours, prompts, 18, 16, batch_size=4, **settings) == expected
    assert generate_batch(ours, prompts, 18, 16, batch_size=7, **settings) == expected  # whatever the batch


def test_rows_with_their_own_settings_join_and_leave_between_steps(pair):
    """`Batch`: rows added while others run, each with its settings and seed, one cancelled half-way: every
    row that runs to its end is what `generate` gives its prompt alone; the cancelled one stops there."""
    cfg, _, ours = pair
    prompts = _prompts(6, 9, seed=3)
    eos = _alone(ours, prompts[4], 3, 16)[1]
    settings = [{}, {"temperature": 1.0, "seed": 1}, {"top_k": 3}, {"temperature": 2.0, "top_p": 0.5, "seed": 9},
                {"eos_id": eos}, {"temperature": 0.7, "top_k": 5, "seed": 4}]  # fmt: skip
    batch = Batch(ours, 16, max_rows=3)
    rows = [new_row(ours, p, 10, 16, **s) for p, s in zip(prompts, settings, strict=True)]
    events = []
    for step in range(40):
        if step < len(rows):
            batch.add(rows[step])  # one more row at every step
        if step == 4:
            batch.cancel(rows[2])
        events += batch.step()
    assert len(batch) == 0
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        if i != 2:
            assert row.new == _alone(ours, prompt, 10, 16, **settings[i])
            assert [t for r, t in events if r is row] == [*row.new, None]  # each token once, then the end
    assert rows[2].finished and 0 < len(rows[2].new) < 10
    assert None not in [t for r, t in events if r is rows[2]]  # cancelled: no end of its own


def test_a_row_alone_computes_generates_very_logits(pair):
    """One row in the batch runs the forwards `generate` runs (the whole prompt, then a token at a time, no
    mask): its logits are equal bit for bit, so it never differs in a near-tie (a lone request of `llm serve`)."""
    cfg, _, ours = pair
    prompt = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache = ours.new_kv_cache(1, 16)
        expected = [ours(prompt, kv_cache=cache)[:, -1].float()]
        for _ in range(4):
            expected.append(ours(expected[-1].argmax(-1, keepdim=True), kv_cache=cache)[:, -1].float())
    batch = Batch(ours, 16, max_rows=4)
    got = []
    choose = batch._choose
    batch._choose = lambda logits: got.append(logits.clone()) or choose(logits)
    batch.add(new_row(ours, prompt[0].tolist(), 5, 16))
    while len(batch):
        batch.step()
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_generate_batch_checks_its_arguments(pair):
    cfg, _, ours = pair
    assert generate_batch(ours, [[1, 2], [3]], 0, 16) == [[], []]
    assert generate_batch(ours, [], 5, 16) == []
    for kwargs, message in [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"context_size": 17}, "context_size must be in"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ]:
        with pytest.raises(LLMError, match=message):
            generate_batch(ours, [[1, 2]], **{"max_new_tokens": 3, "context_size": 16, **kwargs})
    with pytest.raises(LLMError, match="prompt must hold at least one token id"):
        generate_batch(ours, [[1], []], 3, 16)
    with pytest.raises(LLMError, match="the prompt: token id 50257 is outside"):
        generate_batch(ours, [[1], [50257]], 3, 16)


def test_generate_batch_shows_the_prompts_answered_and_restores_training_mode(pair, capsys, monkeypatch):
    cfg, _, ours = pair
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    ours.train()
    generate_batch(ours, _prompts(10, 5), 3, 16, batch_size=4, progress="responses")
    assert ours.training
    ours.eval()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("responses: 10/10 prompts (100%)")
