"""`llm serve` as a real process on 127.0.0.1, talked to by the official `openai` client and by httpx:
greedy output equal to `llm generate`'s and `llm instruct`'s, a client that goes away, the full queue,
the API key, the drain on SIGTERM and Ctrl-C."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.serve_process import llm_serve

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def server(ckpt, instruct_ckpt, classifier_ckpt):
    args = ["--model", f"tiny={ckpt[0]}", "--model", f"ins={instruct_ckpt}", "--model", f"spam={classifier_ckpt[0]}"]
    with llm_serve(*args, "--stall-timeout", "90") as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _llm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "llm", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_completions_create_is_what_llm_generate_prints(client, server, ckpt):
    assert server.url.startswith("http://127.0.0.1:")  # the default address: this machine only
    printed = _llm("generate", "--model", str(ckpt[0]), "--prompt", PROMPT, "--max-new-tokens", "12", "--eos")
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert printed == PROMPT + completion.choices[0].text + "\n"
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert PROMPT + "".join(c.choices[0].text for c in chunks) + "\n" == printed
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completions_create_is_what_llm_instruct_prints(client, instruct_ckpt):
    printed = _llm("instruct", "--model", str(instruct_ckpt), "Name a color.", "--max-new-tokens", "10")
    messages = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="ins", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content + "\n" == printed
    stream = client.chat.completions.create(model="ins", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) + "\n" == printed
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_classify_and_errors_through_the_client(client, server):
    assert [m.id for m in client.models.list()] == ["tiny", "ins", "spam"]
    with pytest.raises(openai.BadRequestError, match="'spam' is a classifier"):
        client.completions.create(model="spam", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="has a context of 32 tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="'tiny' is not instruction-finetuned"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
    result = httpx.post(server.url + "/v1/classify", json={"model": "spam", "input": ["WIN a prize", "see you"]})
    assert [row["label"] in ("spam", "not spam") for row in result.json()["data"]] == [True, True]


def _first_event(lines) -> dict:
    """The first event of a response's `iter_lines()` (keep that iterator: dropping it closes the connection)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("no event")


def _health(url: str, until=lambda h: True, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        if until(health) or time.monotonic() > end:
            return health
        time.sleep(0.05)


def test_health_is_ok_with_the_stall_timeout_given(server, client):
    """--stall-timeout reaches /health (a stalled worker: tests/test_serve.py); once a request is answered,
    the worker is idle, its steps counted."""
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    health = _health(server.url, until=lambda h: h["step"] is None)  # the generation's close may still run
    assert (health["status"], health["stall_timeout"], health["step_seconds"]) == ("ok", 90.0, 0.0)
    assert health["steps"] >= 5  # 3 tokens, the end and the close of the generation


def test_a_client_that_goes_away_frees_its_turn_and_a_full_queue_is_a_503(long_ckpt):
    body = {"model": "long", "prompt": "Hi", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with llm_serve("--model", str(long_ckpt), "--max-active", "1", "--max-queue", "0") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        with (
            httpx.Client(base_url=served.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            assert _first_event(lines)["choices"][0]["text"]
            # its one turn is taken, no place to wait: the next request is turned away
            with pytest.raises(openai.InternalServerError) as refused:
                client.completions.create(model="long", prompt="Hi", max_tokens=2)
            assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
        # the response closed before its end: the server stops generating and frees the turn
        health = _health(served.url, until=lambda h: h["active"] == 0 and h["cancelled"] == 1)
        assert (health["active"], health["cancelled"], health["rejected"]) == (0, 1, 1)
        assert health["tokens"] < 1000  # stopped, not run to the end
        assert client.completions.create(model="long", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_health_counts_every_request_once_even_one_whose_client_left_while_queued(long_ckpt):
    """completed + cancelled + rejected = every request: a stream whose client leaves while it waits for
    a turn is cancelled (before: counted nowhere, its count lived in a generator that never started), a
    classification and a collected completion are completed."""
    body = {"model": "long", "prompt": "Hi", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with llm_serve("--model", str(long_ckpt), "--max-active", "1") as served:
        with (
            httpx.Client(base_url=served.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            assert _first_event(lines)["choices"][0]["text"]  # it holds the one turn
            with httpx.Client(base_url=served.url, timeout=60) as other:
                with other.stream("POST", "/v1/completions", json=body) as queued:
                    _health(served.url, until=lambda h: h["queued"] == 1)
                    queued.close()  # leaves while waiting
                _health(served.url, until=lambda h: h["queued"] == 0)
        health = _health(served.url, until=lambda h: h["active"] == 0 and h["cancelled"] == 2)
        assert (health["completed"], health["cancelled"], health["rejected"]) == (0, 2, 0), health
        short = {"model": "long", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(served.url + "/v1/completions", json=short, timeout=60).status_code == 200
        health = _health(served.url, until=lambda h: h["completed"] == 1)
        assert (health["completed"], health["cancelled"], health["active"], health["queued"]) == (1, 2, 0, 0), health


def test_a_client_that_leaves_a_batch_stops_its_row_and_the_others_get_their_whole_text(long_ckpt):
    """Three streams decoded together; one client goes away after its first event: its row leaves the batch
    (its tokens stop, it is counted cancelled) and the two others finish, each the text it gets alone."""
    body = {"model": "long", "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    prompts = ["Hi", "Every effort moves you", "The verdict"]
    with llm_serve("--model", str(long_ckpt)) as served:
        alone = {}
        for prompt in prompts[1:]:
            plain = {**body, "prompt": prompt, "stream": False}
            alone[prompt] = httpx.post(served.url + "/v1/completions", json=plain, timeout=60).json()
        texts = {}

        def stream(prompt: str):
            sent = {**body, "prompt": prompt} | ({"max_tokens": 1000} if prompt == "Hi" else {})
            with httpx.Client(base_url=served.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                                   json=sent) as r:  # fmt: skip
                lines = r.iter_lines()
                first = _first_event(lines)["choices"][0]["text"]
                if prompt == "Hi":
                    return  # gone after one token: the block closes the response
                rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                texts[prompt] = first + "".join(e["choices"][0]["text"] for e in rest)

        threads = [threading.Thread(target=stream, args=(p,), daemon=True) for p in prompts[1:]]
        for thread in threads:
            thread.start()
        stream("Hi")
        for thread in threads:
            thread.join(timeout=120)
        assert texts == {p: alone[p]["choices"][0]["text"] for p in prompts[1:]}
        health = _health(served.url, until=lambda h: h["active"] == 0 and h["cancelled"] == 1)
        assert (health["completed"], health["cancelled"]) == (4, 1), health
        assert health["tokens"] < 4 * 40 + 1000  # the row that left stopped early


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_finish_the_requests_in_flight_and_exit_0(long_ckpt, sig):
    body = {"model": "long", "prompt": "Hi", "max_tokens": 600, "temperature": 0, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    with llm_serve("--model", str(long_ckpt)) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            events = [_first_event(lines)]
            served.proc.send_signal(sig)
            served.wait_line(r"stopping: finishing 1 request\(s\) in flight")
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert served.proc.wait(timeout=60) == 0
        assert events[-1] == "[DONE]"
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 600  # every token
        assert served.lines[-1] == "llm serve: stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(served.url + "/health")


def test_a_public_address_without_a_key_warns_and_with_a_key_every_request_needs_it(ckpt):
    with llm_serve("--model", str(ckpt[0]), "--host", "0.0.0.0", env={"LLM_API_KEY": ""}) as served:
        warning = served.wait_line("warning")
        assert warning == (
            "llm serve: warning: listening on 0.0.0.0 without an API key: anyone who can reach this port can use "
            "the models (set --api-key or LLM_API_KEY)"
        )
        port = served.url.rsplit(":", 1)[1]
    with llm_serve("--model", str(ckpt[0]), "--host", "0.0.0.0", env={"LLM_API_KEY": "s3cret"}) as served:
        assert not any("warning" in line for line in served.lines)
        url = f"http://127.0.0.1:{served.url.rsplit(':', 1)[1]}/v1"
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            openai.OpenAI(base_url=url, api_key="guess", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    assert port.isdigit()


def test_a_port_in_use_is_one_line_and_exit_2_before_the_models_load(ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "llm", "serve", "--model", str(ckpt[0]), "--port", str(port)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"llm serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    ("args", "signals", "code"),
    [(["--drain-timeout", "0.2"], [signal.SIGTERM], 0), ([], [signal.SIGINT, signal.SIGINT], 130)],
    ids=["drain-timeout", "second-ctrl-c"],
)
def test_the_drain_timeout_or_a_second_ctrl_c_cuts_the_requests_short(long_ckpt, args, signals, code):
    body = {"model": "long", "prompt": "Hi", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with llm_serve("--model", str(long_ckpt), *args) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            _first_event(lines)
            for sig in signals:
                served.proc.send_signal(sig)
                served.wait_line("stopping")
            rest = []
            with contextlib.suppress(httpx.HTTPError):  # the connection cut mid-response
                rest = list(lines)
            assert "data: [DONE]" not in rest  # not finished
        assert served.proc.wait(timeout=60) == code
        assert not any("Traceback" in line for line in served.lines), served.lines  # the stop is no bug


@pytest.fixture(scope="module")
def long_classifier_ckpt(tmp_path_factory):
    """A tiny classifier that reads 1024 tokens a message (every message is padded to them), so that
    classifying a long list lasts long enough to be interrupted."""
    import torch

    from llm.classifier import add_classification_head, save_classifier
    from llm.model import GPTModel
    from tests.conftest import tiny_cfg

    torch.manual_seed(5)
    model = add_classification_head(GPTModel(tiny_cfg(context_length=1024)), 2)
    return save_classifier(model, tmp_path_factory.mktemp("cls") / "slow", max_length=1024, pooling="mean")


def test_a_long_classification_shares_the_worker_and_sigterm_stops_within_the_drain_timeout(ckpt, long_classifier_ckpt):
    """--max-classify-inputs bounds the messages of a request (a 400 naming `input`); a long classification
    runs a batch per step, so a completion sent meanwhile is answered while it runs (before: after it);
    SIGTERM with --drain-timeout 1 while it runs stops the server at the end of the drain, exit 0 (before:
    the server waited for the whole classification, one step on the worker)."""
    args = ["--model", f"tiny={ckpt[0]}", "--model", f"spam={long_classifier_ckpt}"]
    with llm_serve(*args, "--max-classify-inputs", "3000", "--drain-timeout", "1") as served:
        too_many = httpx.post(served.url + "/v1/classify", json={"input": ["hi"] * 3001}, timeout=60)
        assert too_many.status_code == 400, too_many.text
        error = too_many.json()["error"]
        assert error["param"] == "input" and "at most 3000 messages (this server's limit), got 3001" in error["message"]
        done = threading.Event()

        def classification():
            with contextlib.suppress(httpx.HTTPError):  # cut by the stop
                httpx.post(served.url + "/v1/classify", json={"input": ["hi"] * 3000}, timeout=600)
            done.set()

        thread = threading.Thread(target=classification, daemon=True)
        thread.start()
        assert _health(served.url, until=lambda h: h["active"] == 1)["active"] == 1
        short = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
        answer = httpx.post(served.url + "/v1/completions", json=short, timeout=600)
        assert answer.json()["usage"]["completion_tokens"] == 2
        assert not done.is_set()  # answered while the classification runs
        served.proc.send_signal(signal.SIGTERM)
        served.wait_line(r"stopping: finishing 1 request\(s\) in flight")
        assert served.proc.wait(timeout=1 + 60) == 0  # a guard: it stops at the end of the drain
        assert served.lines[-1] == "llm serve: stopped"
        assert not any("Traceback" in line for line in served.lines), served.lines  # the stop is no bug
        thread.join(timeout=60)
        assert done.is_set()
