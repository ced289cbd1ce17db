"""The book's LLM-as-judge (chapter 7) through Ollama's HTTP API (`POST /api/chat`).

`judge_responses` keeps up to PARALLEL requests in flight. How many of them an Ollama server decodes at once
is its own setting (`OLLAMA_NUM_PARALLEL`): one at a time, the replies are those of one request after
another and the time saved is only the requests' round trips; several at once, a reply may differ where two
tokens' scores tie to within rounding, as a row of `llm.generate.Batch` may.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from llm.errors import LLMError
from llm.progress import progress_bar
from llm.prompts import format_input

PARALLEL = 4  # requests in flight at once (the module's docstring)


def judge_prompt(entry: dict) -> str:
    """The book's scoring prompt, word for word."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def query_model(prompt: str, model: str, url: str, seed: int = 123, timeout: float = 300.0) -> str:
    """One non-streaming chat request with the book's deterministic options; the reply's text."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": seed, "temperature": 0, "num_ctx": 2048},
        "stream": False,
    }
    request = urllib.request.Request(
        url.rstrip("/") + "/api/chat",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise LLMError(f"judge at {url} answered HTTP {exc.code} for model {model!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LLMError(f"cannot reach the Ollama judge at {url} ({reason}): start it with `ollama serve`") from None
    except json.JSONDecodeError:
        raise LLMError(f"judge at {url} did not answer JSON") from None
    try:
        return reply["message"]["content"]
    except (KeyError, TypeError):
        raise LLMError(f"judge at {url} answered without message.content") from None


def parse_score(reply: str) -> int | None:
    """The integer the judge was asked for, or None when the reply is not one (0-100)."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*\.?\s*", reply)
    if not match or int(match.group(1)) > 100:
        return None
    return int(match.group(1))


def judge_responses(
    entries: Sequence[dict], model: str, url: str, seed: int = 123, parallel: int = PARALLEL
) -> dict[str, float]:
    """Score every entry's `model_response`, `parallel` requests in flight; replies that are not an integer
    are counted, not fatal. The first request that fails stops the others (its LLMError)."""
    scores, invalid = [], 0
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="judge") as pool:
        replies = pool.map(lambda entry: query_model(judge_prompt(entry), model, url, seed), entries)
        try:
            for _, reply in zip(progress_bar(entries, desc="judge", unit="entry", lines=True), replies, strict=True):
                score = parse_score(reply)
                if score is None:
                    invalid += 1
                else:
                    scores.append(score)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {
        "judge_score": sum(scores) / len(scores) if scores else float("nan"),
        "judge_scored": len(scores),
        "judge_invalid": invalid,
    }
