"""docs/scaling.md's numbers, computed: the project on paper at internet scale.

    python -m bench.scaling            # print every generated block of docs/scaling.md
    python -m bench.scaling --write    # rewrite those blocks in docs/scaling.md

Each block sits in the doc between `<!-- scaling:begin NAME -->` and `<!-- scaling:end NAME -->`;
tests/test_scaling_doc.py fails when the doc's blocks differ from what this script prints. Where the
numbers come from:

- parameter counts and training FLOPs per token: `llm.model.GPTModel` built on the meta device
  (nothing allocated) for every preset, and `llm.model.flops_per_token`;
- bytes per parameter: one real training step (`llm.trainer.make_optimizer`,
  `llm.losses.calc_loss_batch`) of a tiny model on CPU, counting weights, gradients and AdamW state;
- activation memory: `saved_bytes_formula`, which the test checks byte for byte against what autograd
  saves in a real forward pass on CPU (`saved_bytes_measured`);
- the CPU's measured MFU: the table in bench/results/train.md (`make bench`);
- everything about GPUs: `ASSUMPTIONS` below, labelled as assumptions in the doc.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, markdown_table
from llm.data import TOKEN_DTYPE
from llm.losses import calc_loss_batch
from llm.model import PRESETS, GPTModel, flops_per_token
from llm.trainer import make_optimizer

DOC = ROOT / "docs" / "scaling.md"
CPU_RESULTS = ROOT / "bench" / "results" / "train.md"

# --- assumptions: nothing below is measured in this project -------------------------------------
TOKENS = 10_000_000_000  # the pretraining budget: GPT-2 124M on 10B tokens
SECONDS = 86_400  # in one day
GPU = "H100 SXM"
GPU_MEMORY = 80e9  # bytes on one card ("80 GB")
GPU_PEAK = {"bf16": 989e12, "fp32": 67e12}  # dense FLOP/s (fp32 without TF32, which torch leaves off)
MFUS = (0.30, 0.40, 0.50)  # assumed GPU MFU in bf16, until bench/gpu_check.sh measures one
NODE_GPUS = 8  # GPUs in one node (the trainer's DDP runs on one node)
TARGET = "gpt2-small"  # "GPT-2 124M"
ASSUMPTIONS = [
    ["training tokens", f"{TOKENS:,}"],
    ["wall time", f"{SECONDS:,} s (one day)"],
    ["GPU", f"{GPU}, {GPU_MEMORY / 1e9:.0f} GB"],
    ["dense peak, bf16", f"{GPU_PEAK['bf16'] / 1e12:.0f} TFLOP/s"],
    ["dense peak, fp32 (no TF32)", f"{GPU_PEAK['fp32'] / 1e12:.0f} TFLOP/s"],
    ["GPU MFU in bf16 (assumed)", ", ".join(f"{m:.0%}" for m in MFUS)],
    ["GPUs in a node", str(NODE_GPUS)],
]

# A model small enough to train a step of in milliseconds, with every kind of parameter.
TINY = {**PRESETS["mini"], "vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
TINY["drop_rate"] = 0.0
MODES = ("fp32", "bf16-mixed", "bf16")  # the trainer's two precisions, and a bf16 model (not a mode here)
IMPLEMENTED = {
    "fp32": "`train.precision: fp32`",
    "bf16-mixed": "`train.precision: bf16-mixed`",
    "bf16": "not implemented",
}
GB = 1e9


# --- parameters and FLOPs -----------------------------------------------------------------------
def analytic_params(cfg: dict, tied: bool = False) -> int:
    """The parameter count of `GPTModel(cfg)`, by hand: embeddings, blocks, final norm, head.

    `tied`: the head shares the token embedding (GPT-2's count), which `GPTModel` never does.
    """
    v, c, d, n_layers = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    block = 12 * d * d + 10 * d + (3 * d if cfg["qkv_bias"] else 0)  # qkv, out_proj, ff, 2 norms
    return v * d + c * d + n_layers * block + 2 * d + (0 if tied else v * d)


def built(cfg: dict) -> GPTModel:
    """`GPTModel(cfg)` on the meta device: shapes and counts, no memory."""
    with torch.device("meta"):
        return GPTModel(cfg)


def preset_facts(name: str) -> dict:
    cfg = PRESETS[name]
    model = built(cfg)
    n = model.num_params()
    if n != analytic_params(cfg):
        raise AssertionError(f"{name}: GPTModel has {n:,} parameters, the formula says {analytic_params(cfg):,}")
    return {
        "cfg": cfg,
        "params": n,
        "tied": analytic_params(cfg, tied=True),
        "matmul": model.num_params(matmul_only=True),
        "flops": flops_per_token(model, cfg["context_length"]),
    }


# --- bytes per parameter -------------------------------------------------------------------------
def state_bytes_per_param(mode: str) -> dict[str, float]:
    """Weights, gradients and AdamW moments (m + v) in bytes per parameter, after one real step.

    `fp32` and `bf16-mixed` run the trainer's own step (fused AdamW, `calc_loss_batch`); `bf16` is
    the same model cast to bf16, which this project does not do (what it would save).
    """
    torch.manual_seed(0)
    model = GPTModel(TINY)
    precision = mode
    if mode == "bf16":
        model, precision = model.to(torch.bfloat16), "fp32"
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"]))
    y = torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"]))
    calc_loss_batch(x, y, model, "cpu", precision).backward()
    opt.step()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    moments = [t for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "weights": sum(p.numel() * p.element_size() for p in params) / n,
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params) / n,
        "adam": sum(t.numel() * t.element_size() for t in moments) / n,
    }


WEIGHT_COPY_BYTES = {"fp32": 0, "bf16-mixed": 2, "bf16": 0}  # autocast's bf16 copy of each matmul weight


def ddp_bytes(state: dict[str, float]) -> float:
    """Per parameter under the trainer's DistributedDataParallel: the state plus DDP's gradient
    buckets, a second copy of the gradients (`gradient_as_bucket_view` is left at False)."""
    return state["weights"] + 2 * state["grads"] + state["adam"]


# --- activations ---------------------------------------------------------------------------------
# What autograd keeps for backward per token (drop_rate 0, attention on a fused kernel), term by
# term: (what, bytes per unit of d, per head, per vocabulary entry, constant), for fp32 and for bf16
# autocast. a = the bytes of a matmul's input or output: 4 in fp32, 2 under autocast.
def layer_terms(precision: str) -> list[tuple[str, int, int, int, int]]:
    """One transformer block's terms."""
    a = 4 if precision == "fp32" else 2
    qkv_input = 4 if precision == "fp32" else 3 * 2  # autocast casts it once per projection
    return [
        ("the fp32 residual stream into each of the two LayerNorms", 2 * 4, 0, 0, 0),
        ("the q, k, v projections' input (fp32: one tensor; autocast: three bf16 casts, one each)", qkv_input, 0, 0, 0),
        ("q, k, v and the attention output (the out-projection's input)", 4 * a, 0, 0, 0),
        ("the first feed-forward layer's input", a, 0, 0, 0),
        ("GELU's input and output (each as wide as the 4d hidden layer)", 8 * a, 0, 0, 0),
        ("mean and rstd of both LayerNorms; attention's log-sum-exp per head (fp32)", 0, 4, 0, 2 * 2 * 4),
    ]


def head_terms(precision: str) -> list[tuple[str, int, int, int, int]]:
    """The terms outside the blocks."""
    a = 4 if precision == "fp32" else 2
    return [
        ("input and target ids (int64)", 0, 0, 0, 2 * 8),
        ("the final LayerNorm's fp32 input, its mean and rstd", 4, 0, 0, 2 * 4),
        ("the head's input", a, 0, 0, 0),
        ("the cross-entropy's fp32 log-probabilities", 0, 0, 4, 0),
    ]


def _sum(terms, cfg: dict) -> int:
    d, h, v = cfg["emb_dim"], cfg["n_heads"], cfg["vocab_size"]
    return sum(cd * d + ch * h + cv * v + c for _, cd, ch, cv, c in terms)


def layer_bytes_per_token(cfg: dict, precision: str) -> int:
    """Bytes autograd keeps per token in one transformer block (`layer_terms`)."""
    return _sum(layer_terms(precision), cfg)


def head_bytes_per_token(cfg: dict, precision: str) -> int:
    """Bytes autograd keeps per token outside the blocks (`head_terms`)."""
    return _sum(head_terms(precision), cfg)


def expression(cd: int, ch: int, cv: int, c: int) -> str:
    """`64d + 4h + 16`: a term or a sum of terms in d, h and V."""
    parts = [f"{k}{x}" for k, x in ((cd, "d"), (ch, "h"), (cv, "V")) if k] + ([str(c)] if c else [])
    return " + ".join(parts) or "0"


def token_bytes(cfg: dict, precision: str) -> int:
    """Per token of a micro-batch, the whole model: every block and the rest."""
    return cfg["n_layers"] * layer_bytes_per_token(cfg, precision) + head_bytes_per_token(cfg, precision)


def saved_bytes_formula(cfg: dict, batch: int, seq: int, precision: str) -> int:
    """Bytes autograd keeps for backward after the loss of one `batch` x `seq` micro-batch: per token,
    then the positions (int64), the loss's scalar and, under autocast, the bf16 weight copies."""
    copies = WEIGHT_COPY_BYTES[precision] * built(cfg).num_params(matmul_only=True)
    return batch * seq * token_bytes(cfg, precision) + 8 * seq + 4 + copies


def saved_bytes_measured(cfg: dict, batch: int, seq: int, precision: str) -> int:
    """Bytes of the distinct tensors autograd saves for backward in a real forward + loss on CPU,
    parameters excluded (`torch.autograd.graph.saved_tensors_hooks`)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg["vocab_size"], (batch, seq))
    y = torch.randint(0, cfg["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        calc_loss_batch(x, y, model, "cpu", precision)
    return sum(saved.values())


# --- the CPU's measured MFU ----------------------------------------------------------------------
def cpu_measurement(path: Path = CPU_RESULTS) -> dict:
    """The 124M fp32 row of phase 2 in bench/results/train.md: tokens/s, MFU and the matmul peak."""
    text = path.read_text(encoding="utf-8")
    peak = re.search(r"matmul peak[^:]*: fp32 ([\d.]+) GFLOP/s", text)
    row = re.search(r"^\| 124M \| 2: [^|]+\| ours \| fp32 \| ([\d.]+) \|[^\n]*\| ([\d.]+)% \| [\d,]+ \|$", text, re.M)
    flops = re.search(r"^- 124M: .*; ([\d.]+) GFLOP per token$", text, re.M)
    if not (peak and row and flops):
        raise ValueError(f"{path}: no 124M fp32 phase-2 row, matmul peak or FLOPs per token")
    out = {
        "tokens_per_s": float(row.group(1)),
        "mfu": float(row.group(2)) / 100,
        "peak": float(peak.group(1)) * 1e9,
        "flops": float(flops.group(1)) * 1e9,
    }
    if abs(out["tokens_per_s"] * out["flops"] / out["peak"] - out["mfu"]) > 0.002:  # the file's own rounding
        raise ValueError(f"{path}: tokens/s x FLOPs per token / peak is not the MFU it reports")
    return out


# --- the data path -------------------------------------------------------------------------------
def windows(tokens: int, max_length: int, stride: int) -> int:
    """`TokenWindowDataset`'s length for a token file of `tokens` ids."""
    return max(0, -(-(tokens - max_length) // stride))


def permutation_bytes(n: int, world_size: int) -> int:
    """Host memory one rank's `EpochSampler` holds through a pass over `n` windows: the whole
    permutation as a Python list (an int object and a list slot per window), kept by the generator,
    and the list of the rank's share that it iterates. CPython's allocator rounds each int object up
    to a multiple of 16 bytes."""
    int_object = -(-sys.getsizeof(n) // 16) * 16
    return (int_object + 8) * n + 8 * math.ceil(n / world_size)


# --- formatting ----------------------------------------------------------------------------------
def gb(x: float) -> str:
    """Decimal units, as GPU memory is sold: 1 GB = 10^9 bytes."""
    if x < 0.1 * GB:
        return f"{x / 1e6:,.1f} MB"
    return f"{x / GB:,.2f} GB" if x < 10 * GB else f"{x / GB:,.1f} GB"


def sci(x: float) -> str:
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa} × 10^{int(exponent)}"


def block_params(facts: dict[str, dict]) -> str:
    rows = []
    for name, f in facts.items():
        c = f["cfg"]
        shape = f"{c['emb_dim']} / {c['n_layers']} / {c['n_heads']} / {c['context_length']}"
        rows.append(
            [f"`{name}`", shape, f"{f['params']:,}", f"{f['tied']:,}", f"{f['matmul']:,}", f"{f['flops'] / 1e9:.3f}"]
        )
    return markdown_table(
        ["preset", "emb / layers / heads / context", "parameters (GPTModel, own head)",
         "with the head tied (GPT-2's count)", "N_matmul", "training GFLOP per token at its context"],
        rows,
    )  # fmt: skip


def block_bytes(state: dict[str, dict[str, float]]) -> str:
    rows = []
    for mode in MODES:
        s = state[mode]
        total = s["weights"] + s["grads"] + s["adam"]
        ddp = ddp_bytes(s)
        rows.append([
            mode, IMPLEMENTED[mode], f"{s['weights']:g}", f"{s['grads']:g}", f"{s['adam']:g}", f"{total:g}",
            f"{ddp:g}", f"{WEIGHT_COPY_BYTES[mode]:g}",
            f"{GPU_MEMORY / (ddp + WEIGHT_COPY_BYTES[mode]) / 1e9:.2f} billion",
            f"{GPU_MEMORY / (total / NODE_GPUS) / 1e9:.0f} billion",
        ])  # fmt: skip
    return markdown_table(
        ["weights and optimizer", "in this project", "weights", "grads", "AdamW m + v", "bytes / param",
         "under DDP (+ grad buckets)", "+ bf16 weight copies (per matmul param)",
         f"DDP: most params whose states fit {GPU_MEMORY / GB:.0f} GB",
         f"FSDP2 over {NODE_GPUS} GPUs: most params whose states fit"],
        rows, left=2,
    )  # fmt: skip


def block_activations(facts: dict[str, dict]) -> str:
    rows = []
    for name, f in facts.items():
        c = {**f["cfg"], "drop_rate": 0.0}
        t = c["context_length"]
        per_token = {p: token_bytes(c, p) for p in ("fp32", "bf16-mixed")}
        layer = {p: layer_bytes_per_token(c, p) for p in ("fp32", "bf16-mixed")}
        rows.append([
            f"`{name}`", f"{t:,}", f"{layer['fp32']:,}", f"{layer['bf16-mixed']:,}", f"{per_token['fp32']:,}",
            f"{per_token['bf16-mixed']:,}", f"{4 * c['vocab_size'] / per_token['bf16-mixed']:.0%}",
            gb(per_token["bf16-mixed"] * t),
        ])  # fmt: skip
    return markdown_table(
        ["preset (drop_rate 0)", "T", "per token per block, fp32 (B)", "per token per block, bf16-mixed (B)",
         "per token, whole model, fp32 (B)", "per token, whole model, bf16-mixed (B)",
         "share of the fp32 log-probs (4V), bf16-mixed", "per sequence of T, bf16-mixed"],
        rows,
    )  # fmt: skip


def block_formula() -> str:
    """The activation formula, term by term, from `layer_terms` and `head_terms`."""
    rows = []
    for title, terms in (("per block", layer_terms), ("outside the blocks", head_terms)):
        fp32, bf16 = terms("fp32"), terms("bf16-mixed")
        for (what, *k32), (_, *k16) in zip(fp32, bf16, strict=True):
            rows.append([f"{title}: {what}", expression(*k32), expression(*k16)])
        total32 = [sum(t[i] for t in fp32) for i in range(1, 5)]
        total16 = [sum(t[i] for t in bf16) for i in range(1, 5)]
        rows.append([f"**{title}, total**", f"**{expression(*total32)}**", f"**{expression(*total16)}**"])
    rows.append([
        "per micro-batch: autocast's bf16 copy of each matmul weight", "0",
        f"{WEIGHT_COPY_BYTES['bf16-mixed']}·N_matmul",
    ])  # fmt: skip
    return markdown_table(["bytes per token", "fp32", "bf16-mixed"], rows)


def block_fit(facts: dict[str, dict], state: dict[str, dict[str, float]]) -> str:
    s = state["bf16-mixed"]
    rows, fits = [], {}
    for name, f in facts.items():
        c = {**f["cfg"], "drop_rate": 0.0}
        t = c["context_length"]
        seq = t * token_bytes(c, "bf16-mixed")
        ddp_state = ddp_bytes(s) * f["params"] + WEIGHT_COPY_BYTES["bf16-mixed"] * f["matmul"]
        fits[name] = int((GPU_MEMORY - ddp_state) // seq)
        fsdp_state = (s["weights"] + s["grads"] + s["adam"]) * f["params"] / NODE_GPUS
        block = (
            analytic_params({**c, "n_layers": 1, "vocab_size": 0, "context_length": 0}, tied=True) - 2 * c["emb_dim"]
        )
        gathered = 2 * (f["params"] - c["n_layers"] * block + block)  # bf16: the root's own parameters + one block
        rows.append([
            f"`{name}`", f"{f['params']:,}", gb(seq), gb(ddp_state), f"{fits[name]:,}", gb(fsdp_state), gb(gathered),
        ])  # fmt: skip
    table = markdown_table(
        ["preset", "parameters", "activations per sequence of T", "DDP: states + bf16 weight copies per GPU",
         f"DDP: sequences of T per {GPU_MEMORY / GB:.0f} GB GPU (upper bound)",
         f"FSDP2 over {NODE_GPUS}: states per GPU", "FSDP2: gathered in bf16 (root + one block)"],
        rows,
    )  # fmt: skip
    largest = max(facts, key=lambda n: facts[n]["params"])
    verdict = "every preset fits" if all(n > 0 for n in fits.values()) else "not every preset fits"
    return (
        f"{table}\n\nOn paper {verdict} under DDP on one {GPU_MEMORY / GB:.0f} GB GPU; the largest, `{largest}`, "
        f"with at most {fits[largest]} sequences of {facts[largest]['cfg']['context_length']:,} tokens per GPU."
    )


def block_day(target: dict) -> str:
    per_token, context = target["flops"], target["cfg"]["context_length"]
    total = per_token * TOKENS
    return markdown_table(
        ["quantity", "value"],
        [
            ["model", f"`{TARGET}` ({target['params']:,} parameters as trained here, context {context:,})"],
            ["training FLOPs per token (6·N_matmul + 12·L·d·T)", f"{per_token / 1e9:.3f} GFLOP"],
            ["total training FLOPs for the tokens", sci(total)],
            ["tokens/s to finish in a day", f"{TOKENS / SECONDS:,.0f}"],
            ["sustained FLOP/s to finish in a day", f"{total / SECONDS / 1e12:,.1f} TFLOP/s"],
            ["optimizer steps at 2^19 = 524,288 tokens per step (GPT-2's batch)", f"{math.ceil(TOKENS / 2**19):,}"],
        ],
    )  # fmt: skip


def block_gpus(target: dict, cpu: dict) -> str:
    total = target["flops"] * TOKENS
    needed = total / SECONDS
    rows, bf16_hours = [], []
    for precision, mfu in [("bf16", m) for m in MFUS] + [("fp32", MFUS[1])]:
        achieved = mfu * GPU_PEAK[precision]
        hours = total / achieved / 3600
        if precision == "bf16":
            bf16_hours.append((math.ceil(needed / achieved), hours))
        rows.append([
            f"{GPU}, {'bf16-mixed' if precision == 'bf16' else 'fp32'}", f"{mfu:.0%} (assumed)",
            f"{achieved / target['flops']:,.0f}", f"{math.ceil(needed / achieved):,}",
            f"{hours:,.1f} h", f"{hours / NODE_GPUS:,.1f} h",
        ])  # fmt: skip
    achieved = cpu["mfu"] * cpu["peak"]
    rows.append([
        "this 2-core CPU, fp32 (bench/results/train.md)", f"{cpu['mfu']:.1%} (measured)",
        f"{achieved / target['flops']:,.1f}", f"{math.ceil(needed / achieved):,}",
        f"{total / achieved / 86_400:,.0f} days", "",
    ])  # fmt: skip
    table = markdown_table(
        ["device, precision", "MFU", "tokens/s per device", "devices for the tokens in a day", "time on one",
         f"time on {NODE_GPUS}"],
        rows,
    )  # fmt: skip
    most = max(n for n, _ in bf16_hours)
    slow, fast = max(h for _, h in bf16_hours), min(h for _, h in bf16_hours)
    return (
        f"{table}\n\nAt {MFUS[0]:.0%} to {MFUS[-1]:.0%} MFU, {most} {GPU} in bf16-mixed "
        f"{'finishes' if most == 1 else 'finish'} within the day ({fast:.1f} to {slow:.1f} h); "
        f"{NODE_GPUS} under DDP take {fast / NODE_GPUS:.1f} to {slow / NODE_GPUS:.1f} h."
    )


def block_data(target: dict) -> str:
    t = target["cfg"]["context_length"]
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    n = windows(TOKENS, t, t)
    held = permutation_bytes(n, NODE_GPUS)
    tokens_per_s = TOKENS / SECONDS
    return markdown_table(
        ["quantity", "value"],
        [
            [f"token file ({np.dtype(TOKEN_DTYPE).name})", f"{TOKENS * itemsize:,} bytes ({gb(TOKENS * itemsize)})"],
            [f"windows at max_length = stride = {t:,}", f"{n:,}"],
            ["bytes read per window (max_length + 1 ids)", f"{(t + 1) * itemsize:,}"],
            ["windows/s for the tokens in a day (all ranks together)", f"{tokens_per_s / t:,.0f}"],
            ["token bytes/s read for the tokens in a day", f"{tokens_per_s * (t + 1) / t * itemsize / 1e6:,.2f} MB/s"],
            [f"`EpochSampler` permutation held per rank during a pass ({NODE_GPUS} ranks)", gb(held)],
        ],
    )  # fmt: skip


def block_assumptions(cpu: dict) -> str:
    return (
        f"{markdown_table(['assumption', 'value'], ASSUMPTIONS)}\n\n"
        f"Measured (bench/results/train.md): the project's 124M training step in "
        f"fp32 on this 2-core CPU runs at {cpu['tokens_per_s']:,.1f} tokens/s, {cpu['mfu']:.1%} of the measured fp32 "
        f"matmul peak ({cpu['peak'] / 1e9:.1f} GFLOP/s)."
    )


def blocks() -> dict[str, str]:
    """Every generated block of docs/scaling.md, by name."""
    facts = {name: preset_facts(name) for name in PRESETS}
    state = {mode: state_bytes_per_param(mode) for mode in MODES}
    cpu = cpu_measurement()
    target = facts[TARGET]
    return {
        "assumptions": block_assumptions(cpu),
        "params": block_params(facts),
        "bytes": block_bytes(state),
        "formula": block_formula(),
        "activations": block_activations(facts),
        "fit": block_fit(facts, state),
        "day": block_day(target),
        "gpus": block_gpus(target, cpu),
        "data": block_data(target),
    }


# --- the doc -------------------------------------------------------------------------------------
MARKER = re.compile(r"<!-- scaling:begin (\S+) -->\n(.*?)<!-- scaling:end \1 -->", re.S)


def doc_blocks(text: str) -> dict[str, str]:
    """The generated blocks of a doc, by name (without the trailing newline)."""
    return {m.group(1): m.group(2).rstrip("\n") for m in MARKER.finditer(text)}


def render(text: str, new: dict[str, str]) -> str:
    """`text` with each marked block replaced by `new[name]`; every block must be marked once."""
    found = doc_blocks(text)
    missing = sorted(set(new) - set(found))
    unknown = sorted(set(found) - set(new))
    if missing or unknown:
        raise SystemExit(f"{DOC.name}: blocks missing {missing}, unknown {unknown}")
    return MARKER.sub(
        lambda m: f"<!-- scaling:begin {m.group(1)} -->\n{new[m.group(1)]}\n<!-- scaling:end {m.group(1)} -->", text
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the generated blocks of {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    new = blocks()
    if args.write:
        DOC.write_text(render(DOC.read_text(encoding="utf-8"), new), encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
        return
    for name, block in new.items():
        print(f"<!-- scaling:begin {name} -->\n{block}\n<!-- scaling:end {name} -->\n")


if __name__ == "__main__":
    main()
