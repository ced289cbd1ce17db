"""`llm` command line: `llm generate …` (also `python -m llm`). Errors print as one line."""

from __future__ import annotations

import argparse
import codecs
import sys

from llm.errors import LLMError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm", description="The book's GPT: generate text from a checkpoint.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", help="stream text from a checkpoint, token by token")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory, .safetensors or .pth")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    gen.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from llm.checkpoint import load_checkpoint
    from llm.generate import generate_stream
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
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    # BPE tokens can split a UTF-8 character: decode bytes incrementally.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    steps = generate_stream(
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
    for token in steps:
        out.write(decoder.decode(tokenizer.decode_single_token_bytes(int(token[0, 0]))))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LLMError as exc:
        print(f"llm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
