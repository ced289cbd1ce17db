"""docs/scaling.md: its tables are what bench/scaling.py prints, and the script's numbers hold up
against independent facts (the book's and Hugging Face's parameter counts, the bytes a real training
step allocates, the tensors autograd really saves)."""

import inspect
import tracemalloc

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel

import llm.distributed
import llm.trainer
from bench import scaling
from llm.data import TokenWindowDataset
from llm.loaders import EpochSampler
from llm.model import PRESETS, GPTModel, flops_per_token


@pytest.fixture(scope="module")
def generated():
    return scaling.blocks()


def test_the_docs_tables_are_the_scripts_output(generated):
    in_doc = scaling.doc_blocks(scaling.DOC.read_text(encoding="utf-8"))
    assert sorted(in_doc) == sorted(generated), "blocks in docs/scaling.md vs bench/scaling.py"
    for name, block in generated.items():
        assert in_doc[name] == block, f"docs/scaling.md block {name!r} is stale: run python -m bench.scaling --write"


def test_the_readme_links_the_doc():
    # a link to the page (test_docs.py checks that every link resolves)
    assert "](docs/scaling.md)" in (scaling.ROOT / "README.md").read_text(encoding="utf-8")


def test_write_replaces_only_the_marked_blocks():
    text = (
        "intro\n<!-- scaling:begin a -->\nold\n<!-- scaling:end a -->\n"
        "middle\n<!-- scaling:begin b -->\n<!-- scaling:end b -->\n"
    )
    out = scaling.render(text, {"a": "| new |", "b": "two\nlines"})
    assert out == (
        "intro\n<!-- scaling:begin a -->\n| new |\n<!-- scaling:end a -->\nmiddle\n"
        "<!-- scaling:begin b -->\ntwo\nlines\n<!-- scaling:end b -->\n"
    )
    assert scaling.doc_blocks(out) == {"a": "| new |", "b": "two\nlines"}
    with pytest.raises(SystemExit, match="missing"):
        scaling.render(text, {"a": "x", "b": "y", "c": "z"})


def test_parameter_counts_match_the_book_and_hugging_face():
    book = PRESETS["gpt-config-124m"]
    # The book, chapter 4: "Total number of parameters: 163,009,536" and, considering weight tying, 124,412,160.
    assert scaling.preset_facts("gpt-config-124m")["params"] == 163_009_536
    assert scaling.analytic_params(book, tied=True) == 124_412_160
    assert GPTModel({**book, "n_layers": 1, "vocab_size": 50, "emb_dim": 24, "n_heads": 2}).num_params() == (
        scaling.analytic_params({**book, "n_layers": 1, "vocab_size": 50, "emb_dim": 24, "n_heads": 2})
    )
    assert scaling.preset_facts("gpt2-small")["tied"] == 124_439_808  # GPT-2 "124M"
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = PRESETS[name]
        hf = GPT2Config(n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
        with torch.device("meta"):
            count = GPT2LMHeadModel(hf).num_parameters()
        facts = scaling.preset_facts(name)
        assert facts["tied"] == count, name
        assert facts["params"] == count + cfg["vocab_size"] * cfg["emb_dim"], name  # GPTModel's own head


def test_flops_per_token_is_6n_plus_attention():
    d, n_layers, v, t = 768, 12, 50257, 1024
    by_hand = 6 * (n_layers * 12 * d * d + v * d) + 12 * n_layers * d * t
    assert scaling.preset_facts("gpt2-small")["flops"] == by_hand
    assert flops_per_token(scaling.built(PRESETS["gpt2-small"]), t) == by_hand


def test_bytes_per_parameter_of_a_real_training_step():
    fp32 = scaling.state_bytes_per_param("fp32")
    assert fp32 == {"weights": 4, "grads": 4, "adam": 8}  # AdamW in fp32: 16 bytes per parameter
    assert scaling.state_bytes_per_param("bf16-mixed") == fp32  # autocast keeps fp32 weights, grads, moments
    assert scaling.state_bytes_per_param("bf16") == {"weights": 2, "grads": 2, "adam": 4}
    assert scaling.ddp_bytes(fp32) == 20


def test_the_trainers_ddp_keeps_its_gradient_buckets_apart():
    """The doc counts DDP's buckets as a second copy of the gradients: that is DDP's default, which
    the trainer does not change."""
    assert inspect.signature(DistributedDataParallel).parameters["gradient_as_bucket_view"].default is False
    assert "gradient_as_bucket_view" not in inspect.getsource(llm.trainer) + inspect.getsource(llm.distributed)


SHAPES = [
    scaling.TINY,
    {
        **scaling.TINY,
        "emb_dim": 48,
        "n_heads": 3,
        "n_layers": 3,
        "vocab_size": 211,
        "context_length": 24,
        "qkv_bias": True,
    },
]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("cfg", SHAPES, ids=["tiny", "odd-heads-qkv-bias"])
def test_the_activation_formula_is_what_autograd_saves(cfg, precision):
    for batch, seq in ((1, 16), (3, 11)):
        measured = scaling.saved_bytes_measured(cfg, batch, seq, precision)
        assert measured == scaling.saved_bytes_formula(cfg, batch, seq, precision), (batch, seq)


def test_the_formula_table_sums_to_the_formula():
    cfg = {"emb_dim": 7, "n_heads": 3, "vocab_size": 11}
    for precision in ("fp32", "bf16-mixed"):
        for terms, total in (
            (scaling.layer_terms, scaling.layer_bytes_per_token),
            (scaling.head_terms, scaling.head_bytes_per_token),
        ):
            k = [sum(t[i] for t in terms(precision)) for i in range(1, 5)]
            assert k[0] * 7 + k[1] * 3 + k[2] * 11 + k[3] == total(cfg, precision)


def test_the_cpu_figure_is_the_performance_pages():
    cpu = scaling.cpu_measurement()
    page = (scaling.ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    prefix = f"| 124M | 2: keep_freed_memory() | ours | fp32 | {cpu['tokens_per_s']:.1f} |"
    rows = [line for line in page.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1 and f"| {cpu['mfu']:.1%} |" in rows[0]


def test_the_fsdp2_names_the_doc_uses_exist():
    from torch.distributed.checkpoint.state_dict import (  # noqa: F401
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    assert {"mesh", "mp_policy", "reshard_after_forward"} <= set(inspect.signature(fully_shard).parameters)
    assert {"param_dtype", "reduce_dtype"} <= set(inspect.signature(MixedPrecisionPolicy).parameters)
    assert callable(FSDPModule.set_requires_gradient_sync)
    assert {"full_state_dict", "cpu_offload", "broadcast_from_rank0"} <= set(
        inspect.signature(StateDictOptions).parameters
    )
    assert callable(DistributedDataParallel.no_sync)


def test_windows_counts_the_datasets_windows():
    for n, length, stride in ((10, 4, 4), (4, 4, 4), (1000, 7, 3), (5000, 1024, 1024)):
        assert scaling.windows(n, length, stride) == len(TokenWindowDataset(np.zeros(n, np.uint16), length, stride))


def test_the_samplers_permutation_holds_what_the_doc_says():
    """`permutation_bytes` against the Python memory one rank's `EpochSampler` pass really holds."""
    n, world = 300_000, 8
    sampler = EpochSampler(n, True, rank=1, world_size=world, even=True)
    with torch.random.fork_rng(devices=[]):  # the pass draws its seed from torch's global RNG
        tracemalloc.start()
        try:
            passes = iter(sampler)
            next(passes)
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert held == pytest.approx(scaling.permutation_bytes(n, world), rel=0.02)
