"""`llm` command line: `llm generate …` (also `llm-from-scratch …` and `python -m llm`); `llm serve`
runs the models behind an OpenAI-compatible HTTP API (`llm.serve`).

Each command parses its arguments, calls the library, and prints; errors print as one line
(`llm.errors.report_error`): bad arguments and input, unreadable or unwritable files (a full disk,
a directory given as --output…) exit 2, Ctrl-C 130; when the reader of standard output goes away
(`llm generate … | head -c 10`) the command stops quietly with status 141, as a Unix tool killed
by SIGPIPE does. --output, --out and --markdown are written whole or not at all.

Wherever a command takes a model (`--model`, alias `--checkpoint`) it accepts a checkpoint
directory or weights file of this project, the book's `.pth`, a Hugging Face GPT-2 directory or
file, or a GPT-2 name (`gpt2-small`…, fetched once from the Hub).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llm.bounds import BATCH_SIZE, MAX_BATCH, MAX_CLASSIFY_INPUTS, MAX_SEED, STALL_TIMEOUT, stall_timeout_problem
from llm.errors import LLMError, OneLineParser, report_error, reportable
from llm.files import flush_stdout, read_text, write_stdout, writing

DISTRIBUTION = "llm-from-scratch-dvc"
PROGRAMS = ("llm", "llm-from-scratch")  # the console scripts; the first is the default name


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number_of_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # argparse would say "invalid _seconds value"
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_BATCH}], got {value}")
    return value


def _seconds(text: str) -> float:
    value = _number_of_seconds(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _stall_timeout(text: str) -> float:
    value = _number_of_seconds(text)
    problem = stall_timeout_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}] (2**32 - 1), got {value}")
    return value


def _check_output(flag: str, path: str, directory: bool = False, append: bool = False) -> None:
    """Refuse an output path that cannot be written before any work is done: a directory where
    a file belongs (or the reverse), a path under a regular file, or, for a file replaced whole
    (not `append`ed to), a device or pipe, which the replacement would not write but remove."""
    file = Path(path)
    if directory and file.exists() and not file.is_dir():
        what = "the checkpoint" if flag == "--out" else "its files"
        raise LLMError(f"{flag} {file} is a file: give a directory (new or existing) for {what}")
    if not directory and file.is_dir():
        raise LLMError(f"{flag} {file} is a directory: give a file name")
    if not directory and not append and file.exists() and not file.is_file():
        hint = " (without --output the results go to standard output)" if flag == "--output" else ""
        raise LLMError(f"{flag} {file} is not a regular file (a device or pipe): give a file name{hint}")
    for parent in file.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise LLMError(f"{flag} {file}: {parent} is not a directory")
            break


def version() -> str:
    """The installed distribution's version, or pyproject.toml's in a checkout that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        import re

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return match.group(1) if match else "unknown"


MODEL_HELP = "checkpoint directory, .safetensors, .pth or .bin file, or a GPT-2 name (gpt2-small...)"


def program_name(argv0: str | None = None) -> str:
    """The command the user typed (`sys.argv[0]`'s name) when it is one of ours, else "llm"
    (e.g. for `python -m llm`)."""
    name = Path(sys.argv[0] if argv0 is None else argv0).name.removesuffix(".exe")
    return name if name in PROGRAMS else PROGRAMS[0]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or program_name()
    parser = OneLineParser(prog=prog, description="The book's GPT: generate, classify, answer, export.")
    parser.add_argument("--version", action="version", version=f"{prog} {version()}")
    parser.set_defaults(prog=prog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", help="stream text from a checkpoint, token by token")
    gen.add_argument("--model", "--checkpoint", dest="checkpoint", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=_seed, default=None, help=f"seed for reproducible sampling, 0 to {MAX_SEED}")
    gen.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    gen.set_defaults(func=cmd_generate)

    cls = sub.add_parser("classify", help="spam or not spam, with a checkpoint of the finetune_spam stage")
    cls.add_argument(
        "--model", "--checkpoint", dest="checkpoint", required=True, help="classifier directory (models/spam)"
    )
    cls.add_argument("text", nargs="?", help="a message to classify")
    cls.add_argument("--file", help="one message per line, or a CSV with a 'text' column")
    cls.add_argument("--output", default="-", help="CSV of predictions for --file (default: stdout)")
    cls.add_argument("--batch-size", type=_positive_int, default=32)
    cls.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    cls.set_defaults(func=cmd_classify)

    ins = sub.add_parser(
        "instruct",
        help="answer an instruction with an instruction model (finetune_instruct's, finetune_dpo's), streaming",
    )
    ins.add_argument("--model", "--checkpoint", dest="checkpoint", required=True,
                     help="models/instruct, models/dpo, or " + MODEL_HELP)  # fmt: skip
    ins.add_argument("instruction", nargs="?", help="the instruction")
    ins.add_argument("--input", default="", help="optional input for the instruction")
    ins.add_argument("--file", help="a JSON list or JSONL file of {instruction, input} entries")
    ins.add_argument("--output", help="JSON file for --file results (default: stdout)")
    ins.add_argument("--max-new-tokens", type=_positive_int, default=256)
    ins.add_argument(
        "--batch-size", type=_batch_size, default=None,
        help=f"--file: entries answered at once (default {BATCH_SIZE}; at most {MAX_BATCH})",
    )  # fmt: skip
    ins.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    ins.set_defaults(func=cmd_instruct)

    exp = sub.add_parser("export", help="write a language model as a Hugging Face GPT-2 checkpoint directory")
    exp.add_argument("--model", "--checkpoint", dest="checkpoint", required=True, help=MODEL_HELP)
    exp.add_argument("--out", required=True, help="directory for config.json and model.safetensors")
    exp.set_defaults(func=cmd_export)

    srv = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API, with a web page to try them",
        description="Serve models over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
        "/v1/chat/completions, /v1/classify, /health) and a web page at /. Ctrl-C or SIGTERM finishes the "
        "requests in flight and exits 0.",
    )
    srv.add_argument(
        "--model", "--checkpoint", dest="models", action="append", required=True, metavar="[NAME=]PATH",
        help="a language, instruction or classifier model (repeat for several); named after its folder "
        "unless NAME= is given. " + MODEL_HELP,
    )  # fmt: skip
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    srv.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on every API request (default: $LLM_API_KEY; none when unset)",
    )  # fmt: skip
    srv.add_argument("--max-active", type=_positive_int, default=32, help="requests generating at once (32)")
    srv.add_argument("--max-queue", type=int, default=32, help="requests waiting for a turn; more get 503 (32)")
    srv.add_argument(
        "--max-batch", type=_batch_size, default=32,
        help=f"most generations of one model decoded together in one step (32; at most {MAX_BATCH})",
    )  # fmt: skip
    srv.add_argument("--max-tokens", type=_positive_int, default=1024, help="most tokens one request may ask (1024)")
    srv.add_argument("--max-body-bytes", type=_positive_int, default=1_000_000, help="largest request body (1 MB)")
    srv.add_argument(
        "--max-classify-inputs", type=_positive_int, default=MAX_CLASSIFY_INPUTS,
        help=f"most messages one /v1/classify request may send ({MAX_CLASSIFY_INPUTS}, as OpenAI's embeddings)",
    )  # fmt: skip
    srv.add_argument("--drain-timeout", type=_seconds, default=60.0, help="seconds to finish requests on stop (60)")
    srv.add_argument(
        "--stall-timeout", type=_stall_timeout, default=STALL_TIMEOUT,
        help=f"seconds one model step may run before /health answers 503 'stalled' ({STALL_TIMEOUT:g})",
    )  # fmt: skip
    srv.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    srv.set_defaults(func=cmd_serve)

    cmp = sub.add_parser(
        "compare",
        help="metrics of two revisions or experiments side by side; exit 1 when a gated metric regresses",
        description="Wraps `dvc metrics diff --json --all BASELINE [TARGET]` (or compares two metrics "
        "directories) and applies the thresholds file. Each side may be several runs (replicates: "
        "runtime.replicate): then each metric shows mean ± sd, the change with its 95%% interval and a p-value, "
        "and a gated metric fails only when worse by more than its allowance and by more than the seeds explain "
        "(Student's t-test, Holm across the gates). Exit 0: no gated metric regressed; 1: one did; 2: bad input.",
    )
    cmp.add_argument(
        "--baseline", nargs="+", action="extend", metavar="REV",
        help="git revision or experiment name (default HEAD); several: the replicates of one experiment",
    )  # fmt: skip
    cmp.add_argument(
        "--target", nargs="+", action="extend", metavar="REV",
        help="revision or experiment to check (default: the workspace); several: its replicates",
    )  # fmt: skip
    cmp.add_argument(
        "--old", nargs="+", action="extend", metavar="DIR",
        help="a metrics directory to compare instead of --baseline (no DVC needed); several: one per replicate",
    )  # fmt: skip
    cmp.add_argument(
        "--new", nargs="+", action="extend", metavar="DIR",
        help="with --old: the metrics directory to check (default: metrics); several: one per replicate",
    )  # fmt: skip
    cmp.add_argument(
        "--group-by", nargs="+", action="extend", metavar="KEY",
        help="compare the experiments of `dvc exp show` grouped by these params (e.g. train.lr), each group one "
        "experiment under its replicates (runtime.replicate), every group against HEAD's",
    )  # fmt: skip
    cmp.add_argument("--thresholds", default="thresholds.yaml", help="gates file (default thresholds.yaml)")
    cmp.add_argument("--all", action="store_true", help="also list unchanged metrics")
    cmp.add_argument("--markdown", metavar="FILE", help="also append the table as Markdown (e.g. $GITHUB_STEP_SUMMARY)")
    cmp.add_argument(
        "--comment",
        metavar="DIR",
        help="with --old/--new: write the pull-request comment (verdict, tables, loss curves of both) to DIR",
    )
    cmp.add_argument("--params-diff", metavar="FILE", help="with --comment: `dvc params diff --md` output to include")
    cmp.set_defaults(func=cmd_compare)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from llm.checkpoint import load_checkpoint
    from llm.generate import decode_stream, generate_stream
    from llm.runtime import select_device
    from llm.tokenizer import EOT_ID, encode, get_tokenizer

    if not args.prompt.strip():
        raise LLMError("--prompt is empty: give some text to continue")
    device = select_device(args.device)
    model = load_checkpoint(args.checkpoint, map_location=device)
    tokenizer = get_tokenizer()
    ids = encode(args.prompt, tokenizer)
    context = model.cfg["context_length"]
    if len(ids) > context:
        raise LLMError(f"--prompt is {len(ids)} tokens; this model's context_length is {context}")
    idx = torch.tensor([ids], device=device)
    steps = generate_stream(  # checks the sampling settings before anything is printed
        model,
        idx,
        max_new_tokens=args.max_new_tokens,
        context_size=context,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=EOT_ID if args.eos else None,
        seed=args.seed,
    )
    write_stdout(args.prompt, flush=True)
    for piece in decode_stream(tokenizer, steps):
        write_stdout(piece, flush=True)
    write_stdout("\n")


def _read_messages(path: str) -> list[str]:
    """The messages of `--file`: a CSV's 'text' column (read as a whole with the csv module, so a
    quoted field may span lines), or else one message per non-blank line. UTF-8, a BOM dropped."""
    import csv
    import io

    file = Path(path)
    if not file.exists():
        raise LLMError(f"--file {file} does not exist")
    if file.is_dir():
        raise LLMError(f"--file {file} is a directory: give a text or CSV file")
    text = read_text(file, "--file")
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise LLMError(f"--file {file} line {reader.line_num}: not a valid CSV ({exc})") from None
        columns = reader.fieldnames or []
        if "text" not in columns:
            found = ", ".join(repr(c) for c in columns) if columns else "none"
            raise LLMError(f"--file {file}: a CSV needs a 'text' column (its header has {found})")
        if not rows:
            raise LLMError(f"--file {file} has a header but no rows: give one message per row")
        return [row["text"] or "" for row in rows]
    messages = [line for line in text.splitlines() if line.strip()]
    if not messages:
        raise LLMError(f"--file {file} holds no messages: give one message per line")
    return messages


def cmd_classify(args: argparse.Namespace) -> None:
    import csv
    import io

    from llm.classifier import classify, load_classifier
    from llm.files import atomic_write_bytes
    from llm.runtime import select_device

    if (args.text is None) == (args.file is None):
        raise LLMError("give a message to classify or --file, not both")
    if args.output != "-":
        _check_output("--output", args.output)
    messages = [args.text] if args.file is None else _read_messages(args.file)
    if args.file is None and not args.text.strip():
        raise LLMError("the message is empty: give some text to classify")
    device = select_device(args.device)
    model, info = load_classifier(args.checkpoint, map_location=device)
    scores = classify(model, info, messages, args.batch_size, device)
    if scores.truncated:
        n, max_length = scores.truncated, info["max_length"]
        print(f"{args.prog} classify: {n} message(s) truncated to {max_length} tokens", file=sys.stderr)
    probs, labels = scores.spam_probability, scores.labels
    if args.file is None:
        write_stdout(f"{labels[0]} (spam probability {probs[0]:.3f})\n")
        return
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label", "spam_probability"])
    for message, label, p in zip(messages, labels, probs, strict=True):
        writer.writerow([message, label, f"{p:.4f}"])
    if args.output == "-":
        write_stdout(buf.getvalue())
    else:
        with writing(f"--output {args.output}"):
            atomic_write_bytes(args.output, buf.getvalue().encode())
        print(f"wrote {len(messages)} predictions to {args.output}", file=sys.stderr)


def cmd_instruct(args: argparse.Namespace) -> None:
    import json

    from llm.checkpoint import checkpoint_meta, load_checkpoint
    from llm.files import write_json
    from llm.instruct import load_instructions, respond, respond_batch
    from llm.prompts import recorded_prompt_style
    from llm.runtime import select_device

    if (args.instruction is None) == (args.file is None):
        raise LLMError("give an instruction or --file, not both")
    if args.file is None and not args.instruction.strip():
        raise LLMError("the instruction is empty")
    if args.output:
        _check_output("--output", args.output)
    if args.file is not None:
        entries = [dict(e) for e in load_instructions(Path(args.file), require_output=False, what="--file")]
    else:
        entries = [{"instruction": args.instruction, "input": args.input}]
    if args.batch_size is not None and args.file is None:
        raise LLMError("--batch-size is for --file: one instruction streams its answer alone")
    model = load_checkpoint(args.checkpoint, map_location=select_device(args.device))
    style = recorded_prompt_style(checkpoint_meta(args.checkpoint))
    if args.file is None:
        (entry,) = entries
        for piece in respond(model, entry, style, args.max_new_tokens):
            write_stdout(piece, flush=True)
        write_stdout("\n")
    else:  # answered in batches, each entry as it is alone (llm.generate's docstring)
        answers = respond_batch(model, entries, style, args.max_new_tokens, args.batch_size or BATCH_SIZE)
        for entry, answer in zip(entries, answers, strict=True):
            entry["model_response"] = answer.strip()
    if args.file is not None:
        if args.output:
            with writing(f"--output {args.output}"):
                write_json(args.output, entries)
            print(f"wrote {len(entries)} responses to {args.output}", file=sys.stderr)
        else:
            write_stdout(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def cmd_export(args: argparse.Namespace) -> None:
    from llm.checkpoint import export_hf, read_checkpoint

    _check_output("--out", args.out, directory=True)
    checkpoint = read_checkpoint(args.checkpoint)
    if "classifier" in checkpoint.meta:  # its head scores classes, not tokens: GPT2LMHeadModel cannot hold it
        raise LLMError(
            f"--model {args.checkpoint} is a classifier (its head has {checkpoint.state['out_head.weight'].shape[0]} "
            f"class outputs, not tokens): only a language model exports to GPT-2; `llm classify` and `llm serve` use it"
        )
    model = checkpoint.model()
    with writing(f"--out {args.out}"):
        out = export_hf(model, args.out)
    usage = "transformers.GPT2LMHeadModel.from_pretrained"
    write_stdout(f"wrote {out}/config.json and {out}/model.safetensors ({usage})\n")


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from llm.runtime import select_device
    from llm.serve.app import Limits, create_app
    from llm.serve.registry import load_models
    from llm.serve.server import bind, is_loopback, serve, url_of

    if not 0 <= args.port <= 65535:
        raise LLMError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise LLMError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():  # '' would turn authentication off unseen
        raise LLMError("--api-key is empty: give the key clients must send, or leave the option out")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLM_API_KEY") or None
    sock = bind(args.host, args.port)  # before the (slow) model load: a port in use fails at once
    try:
        models = load_models(args.models, select_device(args.device))
    except BaseException:
        sock.close()
        raise
    limits = Limits(
        args.max_active,
        args.max_queue,
        args.max_tokens,
        args.max_body_bytes,
        args.max_classify_inputs,
        stall_timeout=args.stall_timeout,
        max_batch=args.max_batch,
    )
    app = create_app(models, api_key=api_key, limits=limits)
    prog = f"{args.prog} serve"
    if not is_loopback(args.host) and not api_key:
        print(f"{prog}: warning: listening on {args.host} without an API key: anyone who can reach this port "
              "can use the models (set --api-key or LLM_API_KEY)", file=sys.stderr, flush=True)  # fmt: skip
    names = ", ".join(f"{m.id} ({m.kind})" for m in models.values())
    print(f"{prog}: listening on {url_of(sock)} with {names}; Ctrl-C to stop", file=sys.stderr, flush=True)
    return serve(app, sock, prog, args.drain_timeout)


def _append(path: Path, data: bytes) -> None:
    """Append to a file (a job summary collects several tables) all at once: a regular file is
    replaced by its old bytes and `data` (`atomic_write_bytes`), a device or pipe written to."""
    from llm.files import atomic_write_bytes

    if path.exists() and not path.is_file():
        with open(path, "ab") as f:
            f.write(data)
    else:
        atomic_write_bytes(path, (path.read_bytes() if path.exists() else b"") + data)


def cmd_compare(args: argparse.Namespace) -> int:
    from llm.pipeline.compare import (
        compare,
        dvc_exp_show,
        experiment_members,
        group_experiments,
        load_gates,
        method,
        read_metrics_dir,
        revision_runs,
        table,
        verdict,
    )

    if args.markdown:
        _check_output("--markdown", args.markdown, append=True)
    if (args.comment or args.params_diff) and not args.old:
        raise LLMError("--comment needs --old and --new: two metrics directories, with their curves/")
    if args.params_diff and not args.comment:
        raise LLMError("--params-diff needs --comment DIR")
    if args.group_by and (args.old or args.new or args.baseline or args.target):
        raise LLMError("--group-by reads every experiment of `dvc exp show`: give no --old/--new/--baseline/--target")
    if args.old and (args.baseline or args.target):
        raise LLMError("--old/--new compare directories, --baseline/--target revisions: give one pair")
    if args.comment:
        _check_output("--comment", args.comment, directory=True)
    params_diff = read_text(args.params_diff, "--params-diff") if args.params_diff else ""
    gates = (
        load_gates(args.thresholds) if Path(args.thresholds).is_file() or args.thresholds != "thresholds.yaml" else {}
    )
    if args.group_by:
        reference, groups = group_experiments(experiment_members(dvc_exp_show()), args.group_by)
        if not groups:
            raise LLMError(
                f"--group-by {' '.join(args.group_by)}: every finished experiment has "
                f"{reference.label(args.group_by)}: nothing to compare it with"
            )
        pairs = [
            (
                f"{reference.label(args.group_by)} ({len(reference.members)} runs) -> "
                f"{g.label(args.group_by)} ({len(g.members)} runs)",
                [m.metrics for m in reference.members],
                [m.metrics for m in g.members],
            )
            for g in groups
        ]
    elif args.old:
        news = args.new or ["metrics"]
        label = f"{' '.join(args.old)} -> {' '.join(news)}"
        pairs = [(label, [read_metrics_dir(d) for d in args.old], [read_metrics_dir(d) for d in news])]
    else:
        if args.new:
            raise LLMError("--new needs --old (two metrics directories)")
        baselines, targets = args.baseline or ["HEAD"], args.target or []
        olds, news = revision_runs(baselines, targets)
        pairs = [(f"{' '.join(baselines)} -> {' '.join(targets) or 'workspace'}", olds, news)]
    failed = False
    for label, olds, news in pairs:
        rows = compare(olds, news, gates)
        failed = failed or any(r.failed for r in rows)
        result, how = verdict(rows), method(rows)
        if args.markdown:  # first: when it cannot be written, the command fails before printing
            md = f"### Metrics: {label}\n\n{table(rows, markdown=True, changed_only=not args.all)}\n\n"
            md += f"**{result}**\n\n{how}\n"
            with writing(f"--markdown {args.markdown}"):
                _append(Path(args.markdown), md.encode())
        write_stdout(f"metrics {label}\n{table(rows, changed_only=not args.all)}\n{how}\n{result}\n")
    if args.comment:
        from llm.pipeline.prcomment import write_comment

        news = args.new or ["metrics"]
        with writing(f"--comment {args.comment}"):
            write_comment(
                args.comment, args.old, news, gates, params_diff,
                base_label=" ".join(args.old), head_label=" ".join(news),
            )  # fmt: skip
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reportable error (`llm.errors.reportable`) is one line and its status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help or --version printed (or a bad command line was reported)
        try:
            flush_stdout()
        except OSError as exc:
            return report_error(parser.prog, exc)
        raise
    try:
        code = args.func(args)
        flush_stdout()  # a full disk or a closed pipe shows here, not at the interpreter's exit
    except BaseException as exc:
        if not reportable(exc):
            raise
        return report_error(f"{args.prog} {args.command}", exc)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
