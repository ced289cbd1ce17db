"""The project's GPTModel against the book's code: same state_dict, same logits."""

import io

import numpy as np
import pytest
import torch

from llm.errors import ConfigError, LLMError
from llm.model import GPT_CONFIG_124M, PRESETS, GPTModel, MultiHeadAttention, model_config
from llm.tokenizer import check_token_ids
from tests import book_reference as book
from tests.conftest import tiny_cfg

CASES = [
    tiny_cfg(),
    tiny_cfg(qkv_bias=True),
    tiny_cfg(emb_dim=40, n_heads=5, n_layers=3, context_length=17, vocab_size=101, qkv_bias=True),
    tiny_cfg(emb_dim=7, n_heads=7, n_layers=1, context_length=5, vocab_size=13),
]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"d{c['emb_dim']}h{c['n_heads']}b{int(c['qkv_bias'])}")
def test_book_checkpoint_loads_strictly_and_logits_match(cfg):
    torch.manual_seed(0)
    ref = book.GPTModel(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(_roundtrip(ref.state_dict()))  # strict, including the book's mask buffers
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    with torch.no_grad():
        for t in (1, cfg["context_length"] // 2 + 1, cfg["context_length"]):
            diff = (ours(idx[:, :t]) - ref(idx[:, :t])).abs().max().item()
            assert diff <= 1e-5, f"max abs logit diff {diff} at length {t}"


@pytest.mark.parametrize("cfg", CASES[:3], ids=["plain", "qkv_bias", "odd"])
def test_project_state_dict_loads_into_book_model(cfg):
    torch.manual_seed(1)
    ours = GPTModel(cfg).eval()
    ref = book.GPTModel(cfg).eval()
    ref.load_state_dict(_roundtrip(ours.state_dict()))  # strict
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert value.shape == ours.state_dict()[key].shape, key
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        assert torch.allclose(ours(idx), ref(idx), atol=1e-5, rtol=0)


def test_state_dict_names_match_the_book():
    keys = set(GPTModel(tiny_cfg(qkv_bias=True)).state_dict())
    for key in [
        "tok_emb.weight",
        "pos_emb.weight",
        "trf_blocks.0.att.mask",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.0.att.W_query.bias",
        "trf_blocks.1.att.out_proj.bias",
        "trf_blocks.0.ff.layers.0.weight",
        "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale",
        "trf_blocks.0.norm2.shift",
        "final_norm.scale",
        "final_norm.shift",
        "out_head.weight",
    ]:
        assert key in keys, key
    assert "out_head.bias" not in keys


def test_full_124m_config_matches_book_shapes_and_param_count():
    with torch.device("meta"):
        ours = GPTModel(GPT_CONFIG_124M)
        ref = book.GPTModel(GPT_CONFIG_124M)
    assert sum(p.numel() for p in ours.parameters()) == 163_009_536  # the book's figure
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.endswith("mask")}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("mask")}
    assert ours_shapes == ref_shapes


def test_training_mode_matches_book_gradients_without_dropout():
    cfg = tiny_cfg(qkv_bias=True)
    torch.manual_seed(2)
    ref = book.GPTModel(cfg)
    ours = GPTModel(cfg)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    tgt = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    for m in (ref, ours):
        torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), tgt.flatten()).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_dropout_is_active_in_training_and_off_in_eval():
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg(drop_rate=0.5))
    idx = torch.randint(0, 50257, (1, 10))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_attention_module_matches_book_attention():
    torch.manual_seed(4)
    ref = book.MultiHeadAttention(12, 12, 9, 0.0, 4, qkv_bias=True).eval()
    ours = MultiHeadAttention(12, 12, 9, 0.0, 4, qkv_bias=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 12)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_mask_of_other_context_length_is_rejected():
    ref = book.GPTModel(tiny_cfg(context_length=8))
    ours = GPTModel(tiny_cfg(context_length=9))
    with pytest.raises(RuntimeError, match="mask"):
        ours.load_state_dict(ref.state_dict())


@pytest.mark.parametrize(
    "override, message",
    [
        ({"emb_dim": 10, "n_heads": 3}, "divisible"),
        ({"n_layers": 0}, "n_layers"),
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
        ({"emb_size": 8}, "unknown model config key 'emb_size'"),
    ],
)
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        GPTModel(tiny_cfg(**override))


def test_missing_config_key_is_named():
    cfg = tiny_cfg()
    del cfg["n_heads"]
    with pytest.raises(ConfigError, match="missing model config key 'n_heads'"):
        model_config(cfg)


def test_presets_and_overrides():
    assert model_config(PRESETS["gpt2-medium"])["emb_dim"] == 1024
    assert model_config({**PRESETS["gpt2-xl"], "context_length": 256})["context_length"] == 256


def test_too_long_input_is_a_clear_error():
    model = GPTModel(tiny_cfg(vocab_size=50, context_length=8)).eval()
    with pytest.raises(LLMError, match="exceeds context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kind", ["tensor", "uint16 array", "int array", "list"])
def test_token_ids_are_checked_where_they_enter_with_one_line_naming_the_source(kind):
    def as_kind(ids):
        if kind == "tensor":
            return torch.tensor(ids)
        if kind == "list":
            return ids
        return np.asarray(ids, dtype=np.uint16 if kind == "uint16 array" else np.int64)

    check_token_ids(as_kind([0, 3, 49]), 50, "x")
    check_token_ids(as_kind([]), 50, "x")
    with pytest.raises(LLMError, match=r"^f.bin: token id 50 is outside the vocabulary \[0, 50\) of the model$"):
        check_token_ids(as_kind([1, 50, 7]), 50, "f.bin")
    if kind != "uint16 array":
        with pytest.raises(LLMError, match=r"^x: token id -1 is outside the vocabulary \[0, 50\)"):
            check_token_ids(as_kind([-1, 2]), 50, "x")


def test_an_id_outside_the_vocabulary_that_reaches_the_model_on_cpu_is_an_index_error():
    model = GPTModel(tiny_cfg(vocab_size=50, context_length=8)).eval()
    with pytest.raises(IndexError):
        model(torch.tensor([[1, 50]]))


def test_forward_reads_nothing_back_to_the_host():
    """The training forward compiles to one graph: no `.item()`, `int(tensor)` or data-dependent branch,
    each of which would stop a CUDA device until the value arrives (a sync on every step)."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1))
    ids = torch.randint(0, 97, (2, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    torch.manual_seed(1)
    out = compiled(ids)
    torch.manual_seed(1)
    assert torch.equal(out, model(ids))  # the same dropout masks: the same function
    out.sum().backward()


# --- BatchKVCache: rows of different lengths decoded together ------------------------------------------
def test_rows_of_different_lengths_decode_together_as_each_alone():
    """Prefilled right-padded, then a token per row per forward: each row's logits are its own full
    forward's (to rounding), at its own position, whatever the other rows' lengths; rows leave and the
    last ones move into their places; the storage grows as rows and positions need it."""
    torch.manual_seed(5)
    model = GPTModel(tiny_cfg(context_length=24)).eval()
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    with torch.inference_mode():
        cache = model.new_batch_kv_cache()
        padded = torch.tensor([s + [0] * (9 - len(s)) for s in seqs])
        lengths = [len(s) for s in seqs]
        first = model(padded, kv_cache=cache.add(lengths), last=torch.tensor(lengths) - 1)
        assert first.shape == (4, 1, 50257) and cache.lengths == lengths
        for row, s in enumerate(seqs):
            assert torch.allclose(first[row, 0], model(torch.tensor([s]))[0, -1], atol=1e-4)
        for step in range(4):
            nxt = torch.randint(0, 50257, (len(seqs), 1), generator=g)
            logits = model(nxt, kv_cache=cache)
            for row, s in enumerate(seqs):
                s.append(int(nxt[row, 0]))
                assert torch.allclose(logits[row, 0], model(torch.tensor([s]))[0, -1], atol=1e-4)
            if step == 1:  # rows 0 and 2 leave: row 3 moves into place 0, row 1 stays
                assert cache.drop({0, 2}) == [3, 1]
                seqs = [seqs[3], seqs[1]]
        assert cache.lengths == [len(s) for s in seqs] == [10, 13]
        assert cache.k.shape[1] >= 4 and 10 <= cache.k.shape[3] <= 24
        assert cache.drop({0, 1}) == [] and cache.k.numel() == 0  # the last rows left: the memory is given back


def test_a_batch_cache_refuses_what_it_cannot_hold():
    model = GPTModel(tiny_cfg(context_length=24)).eval()
    with torch.inference_mode():
        cache = model.new_batch_kv_cache(max_len=8)
        with pytest.raises(LLMError, match="KV cache rows hold at most 8 positions, got 9"):
            cache.add([2, 9])
        model(torch.ones(2, 5, dtype=torch.long), kv_cache=cache.add([5, 2]), last=torch.tensor([4, 1]))
        with pytest.raises(LLMError, match="a BatchKVCache decodes one token per row, got 2"):
            model(torch.ones(2, 2, dtype=torch.long), kv_cache=cache)
        with pytest.raises(LLMError, match="a forward of 3 rows, the cache holds 2"):
            model(torch.ones(3, 1, dtype=torch.long), kv_cache=cache)
        for _ in range(3):
            model(torch.ones(2, 1, dtype=torch.long), kv_cache=cache)
        assert cache.lengths == [8, 5]
        with pytest.raises(LLMError, match="KV cache has room for 0 tokens, got 1"):
            model(torch.ones(2, 1, dtype=torch.long), kv_cache=cache)  # the first row is full
