"""`llm serve`'s API through FastAPI's test client (no socket): every endpoint, streamed and not, every
error path, the API key, the queue bound, the fair turns, the page. Real processes: test_serve_client.py."""

import asyncio
import json
import socket

import pytest
import torch
from fastapi.testclient import TestClient

from llm.classifier import classify, load_classifier
from llm.cli import main
from llm.generate import generate
from llm.instruct import respond
from llm.serve.app import Limits, create_app
from llm.serve.registry import load_models, split_spec
from llm.serve.scheduler import Scheduler
from llm.serve.schemas import CompletionRequest
from llm.serve.streaming import Generation, StopText
from llm.tokenizer import EOT_ID, encode, get_tokenizer, token_ids_to_text


@pytest.fixture(scope="module")
def models(ckpt, instruct_ckpt, classifier_ckpt):
    return load_models([f"tiny={ckpt[0]}", f"ins={instruct_ckpt}", f"spam={classifier_ckpt[0]}"])


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models)) as c:
        yield c


def _greedy(model, prompt: str, n: int, **sampling) -> str:
    ids = torch.tensor([encode(prompt)])
    out = generate(model, ids, n, model.cfg["context_length"], eos_id=EOT_ID, **sampling)
    return token_ids_to_text(out[:, ids.shape[1] :], get_tokenizer())


def _events(response) -> list:
    """The data of each server-sent event, the final "[DONE]" as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


def _error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


# --- models, health, page --------------------------------------------------------------------------------
def test_models_lists_each_model_with_its_kind(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    cards = {m["id"]: m for m in data["data"]}
    assert {k: (v["kind"], v["context_length"]) for k, v in cards.items()} == {
        "tiny": ("language", 32),
        "ins": ("instruct", 64),
        "spam": ("classifier", 16),
    }
    assert cards["ins"]["prompt_style"] == "alpaca" and cards["spam"]["max_length"] == 8
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in data["data"])
    assert client.get("/v1/models/spam").json() == cards["spam"]
    _error(client.get("/v1/models/nope"), 404, "'nope' is not loaded")
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny", "ins", "spam"]
    assert health["active"] == health["queued"] == 0


def test_the_page_is_served_and_needs_nothing_from_elsewhere(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "<script>" in html and 'id="prompt"' in html and 'id="classify"' in html
    # offline: no script, style, font or image from another site, no link out at all
    assert "http://" not in html and "https://" not in html and "//" + "cdn" not in html
    assert "<script src" not in html and "@import" not in html
    assert html.count("<link") == 1 and '<link rel="icon" href="data:,">' in html  # an empty icon, inline


def test_a_book_pth_file_is_served_as_llm_generate_reads_it(ckpt, tmp_path):
    path, model = ckpt
    torch.save(model.state_dict(), tmp_path / "book.pth")  # its config in a config.json beside it
    (tmp_path / "config.json").write_text(json.dumps({"model": model.cfg}))
    (served,) = load_models([str(tmp_path / "book.pth")]).values()
    assert (served.id, served.kind, served.context_length) == ("book", "language", 32)
    with TestClient(create_app({"book": served})) as c:
        body = {"prompt": "Every effort", "max_tokens": 5, "temperature": 0}
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == _greedy(model, "Every effort", 5)


def test_model_names_come_from_the_folder_or_name_equals_path(tmp_path):
    assert split_spec("models/spam") == ("spam", "models/spam")
    assert split_spec("models/spam/") == ("spam", "models/spam/")
    assert split_spec("models/pretrain/model.safetensors") == ("pretrain", "models/pretrain/model.safetensors")
    assert split_spec("weights/gpt2_small.pth") == ("gpt2_small", "weights/gpt2_small.pth")
    assert split_spec("gpt2-small") == ("gpt2-small", "gpt2-small")
    assert split_spec("chat=models/instruct") == ("chat", "models/instruct")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert split_spec(str(odd)) == ("a=b", str(odd))  # a path that exists stays a path


# --- completions -----------------------------------------------------------------------------------------
def test_a_greedy_completion_is_what_generate_gives(client, ckpt):
    body = {"model": "tiny", "prompt": "Every effort", "max_tokens": 12, "temperature": 0}
    data = client.post("/v1/completions", json=body).json()
    assert data["object"] == "text_completion" and data["model"] == "tiny" and data["id"].startswith("cmpl-")
    (choice,) = data["choices"]
    assert choice["text"] == _greedy(ckpt[1], "Every effort", 12)
    assert choice["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}


def test_a_streamed_completion_sends_the_same_text_in_chunks_then_done(client, ckpt):
    body = {"model": "tiny", "prompt": "Every effort", "max_tokens": 12, "temperature": 0, "stream": True}
    events = _events(client.post("/v1/completions", json=body))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 13  # one per token, then the finish
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == _greedy(ckpt[1], "Every effort", 12)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 12 + ["length"]
    assert "usage" not in chunks[-1]
    with_usage = _events(client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}}))
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 12


def test_sampling_with_a_seed_is_what_generate_gives_with_that_seed(client, ckpt):
    sampling = {"temperature": 1.3, "top_k": 40, "top_p": 0.9, "seed": 7}
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 20, **sampling}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
    assert first == _greedy(ckpt[1], "Once", 20, **sampling)
    other = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert other != first


def test_a_tiny_top_p_is_the_greedy_completion_not_a_500(client, ckpt):
    body = {"model": "tiny", "prompt": "Every effort", "max_tokens": 12, "temperature": 1.0, "top_p": 1e-300}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == _greedy(ckpt[1], "Every effort", 12)


def test_the_default_max_tokens_is_openais_16_or_what_fits(client):
    data = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "temperature": 0}).json()
    assert data["usage"]["completion_tokens"] == 16
    long = "word" + " word" * 24  # 25 tokens of a context of 32
    data = client.post("/v1/completions", json={"model": "tiny", "prompt": long, "temperature": 0}).json()
    assert data["usage"]["completion_tokens"] == 7 and data["choices"][0]["finish_reason"] == "length"


def test_a_stop_sequence_ends_the_text_before_it(client, ckpt):
    full = _greedy(ckpt[1], "Every effort", 12)
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle, maybe across tokens
    expected = full[: full.index(stop)]
    body = {"model": "tiny", "prompt": "Every effort", "max_tokens": 12, "temperature": 0, "stop": [stop, "zzqx"]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (expected, "stop")
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True}))[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_text_holds_back_what_may_begin_a_stop_sequence():
    stop = StopText(["###", "END"])
    assert stop.feed("abc #") == ("abc ", False)
    assert stop.feed("#") == ("", False)
    assert stop.feed("x E") == ("##x ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("D more") == ("", True)
    assert StopText([]).feed("a###") == ("a###", False)


def test_end_of_text_finishes_with_stop(models):
    """A model whose every step ends the text: finish_reason "stop", no tokens; with `ignore_eos`, max_tokens."""
    served = models["tiny"]
    head = served.model.out_head
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.weight[EOT_ID] = 1.0
        with TestClient(create_app({"tiny": served})) as c:
            data = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0}).json()
            past = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}).json()
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert data["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert data["usage"]["completion_tokens"] == 0
    assert past["choices"][0]["finish_reason"] == "length" and past["usage"]["completion_tokens"] == 5  # ignore_eos


def test_unknown_fields_are_ignored(client):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "user": "me", "logit_bias": {}, "frequency_penalty": 0}
    assert client.post("/v1/completions", json=body).status_code == 200


# --- chat ------------------------------------------------------------------------------------------------
def _respond(path, entry, n, style="alpaca"):
    from llm.checkpoint import load_checkpoint

    return "".join(respond(load_checkpoint(path), entry, style, n))


def test_chat_uses_the_prompt_style_the_checkpoint_recorded(instruct_ckpt, tmp_path):
    import shutil

    phi3 = tmp_path / "phi3"
    shutil.copytree(instruct_ckpt, phi3)
    config = json.loads((phi3 / "config.json").read_text())
    config["instruct"]["prompt_style"] = "phi3"
    (phi3 / "config.json").write_text(json.dumps(config))
    models = load_models([str(phi3)])
    assert models["phi3"].card()["prompt_style"] == "phi3"
    messages = [{"role": "system", "content": "red, green"}, {"role": "user", "content": "Pick one."}]
    with TestClient(create_app(models)) as c:
        body = {"messages": messages, "max_tokens": 8, "temperature": 0}
        got = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    expected = _respond(instruct_ckpt, {"instruction": "Pick one.", "input": "red, green"}, 8, "phi3")
    assert got == expected != _respond(instruct_ckpt, {"instruction": "Pick one.", "input": "red, green"}, 8)


def test_a_greedy_chat_answer_is_what_llm_instruct_gives(client, instruct_ckpt):
    body = {"model": "ins", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 9}
    data = client.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    expected = _respond(instruct_ckpt, {"instruction": "Name a color."}, 9)
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 9
    events = _events(client.post("/v1/chat/completions", json={**body, "temperature": 0, "stream": True}))
    chunks = events[:-1]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_a_system_message_is_the_instructions_input_and_earlier_turns_follow_it(client, instruct_ckpt):
    messages = [
        {"role": "system", "content": "The cake was baked by Sam."},
        {"role": "user", "content": [{"type": "text", "text": "Rewrite the sentence."}]},
    ]
    body = {"model": "ins", "messages": messages, "max_tokens": 6, "temperature": 0}
    got = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    entry = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by Sam."}
    assert got == _respond(instruct_ckpt, entry, 6)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    turns += [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    got = client.post("/v1/chat/completions", json={**body, "messages": turns}).json()["choices"][0]["message"]
    entry = {"instruction": "Why?", "input": "Be brief.\n\nUser: Hi.\n\nAssistant: Hello."}
    assert got["content"] == _respond(instruct_ckpt, entry, 6)


def test_the_dpo_stages_checkpoint_is_served_as_the_instruction_model_dpo(dpo_ckpt):
    """`llm serve --model models/dpo`: named `dpo` after its folder, an instruction model (finetune_dpo
    records the Alpaca prompt style) whose chat answers are `llm instruct`'s."""
    from llm.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", str(dpo_ckpt)])
    models = load_models(args.models)
    with TestClient(create_app(models)) as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert (card["id"], card["kind"], card["prompt_style"]) == ("dpo", "instruct", "alpaca")
        body = {"model": "dpo", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 7}
        data = c.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    assert data["choices"][0]["message"]["content"] == _respond(dpo_ckpt, {"instruction": "Name a color."}, 7)


def test_chat_takes_max_completion_tokens_and_defaults_to_what_fits(client):
    messages = [{"role": "user", "content": "Name a color."}]
    body = {"model": "ins", "messages": messages, "max_completion_tokens": 3, "temperature": 0}
    assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3
    data = client.post("/v1/chat/completions", json={"model": "ins", "messages": messages, "temperature": 0}).json()
    usage = data["usage"]
    assert usage["total_tokens"] == 64 or data["choices"][0]["finish_reason"] == "stop"  # the context is 64


# --- classify --------------------------------------------------------------------------------------------
def test_classify_gives_each_text_its_label_and_probability(client, classifier_ckpt):
    texts = ["WINNER!! Claim your free prize now", "see you at 5", "a much longer message than eight tokens, cut"]
    model, info = load_classifier(classifier_ckpt[0])
    scores = classify(model, info, texts)
    data = client.post("/v1/classify", json={"model": "spam", "input": texts}).json()
    assert data["object"] == "list" and data["model"] == "spam" and data["truncated"] == scores.truncated == 1
    for i, (row, label, p) in enumerate(zip(data["data"], scores.labels, scores.spam_probability, strict=True)):
        assert row["index"] == i and row["label"] == label
        assert row["spam_probability"] == pytest.approx(p, abs=1e-6)
        assert row["probability"] == pytest.approx(p if label == "spam" else 1 - p, abs=1e-6)
    one = client.post("/v1/classify", json={"input": texts[0]}).json()  # the only classifier: no model needed
    assert one["data"] == data["data"][:1]


def _concurrently(app, *calls) -> list[str]:
    """Run `calls` (name, async fn of an httpx client) together against `app`; the names in the order
    they finished. Each call starts once the ones before it hold a turn."""
    import httpx

    finished = []

    async def run():
        scheduler = app.state.scheduler
        scheduler.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as c:

            async def one(i, name, call):
                while scheduler.active < i:  # the calls before this one hold their turns
                    await asyncio.sleep(0)
                await call(c)
                finished.append(name)

            await asyncio.gather(*(one(i, name, call) for i, (name, call) in enumerate(calls)))
        scheduler.close()

    asyncio.run(run())
    return finished


def test_a_long_classification_takes_turns_with_a_completion_sent_meanwhile(models, classifier_ckpt):
    """2048 messages (the most a request may send) are 64 steps of 32 on the worker: a 2-token completion
    sent while they run takes turns with them and ends first (before: the whole list was one step, and the
    completion waited for all of it). The scores are `classify`'s on the whole list in one call, bit for bit."""
    texts = [f"message {i}: WIN a prize, call now to claim it" if i % 3 else f"see you at {i}" for i in range(2048)]
    answers = {}

    async def classification(c):
        answers["classify"] = (await c.post("/v1/classify", json={"model": "spam", "input": texts})).json()

    async def completion(c):
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
        answers["completion"] = (await c.post("/v1/completions", json=body)).json()

    app = create_app(models)
    assert _concurrently(app, ("classify", classification), ("completion", completion)) == ["completion", "classify"]
    assert answers["completion"]["usage"]["completion_tokens"] == 2
    model, info = load_classifier(classifier_ckpt[0])
    scores = classify(model, info, texts)
    data = answers["classify"]["data"]
    assert [row["spam_probability"] for row in data] == scores.spam_probability  # equal, not approximately
    assert [row["label"] for row in data] == scores.labels and [row["index"] for row in data] == list(range(2048))
    assert answers["classify"]["truncated"] == scores.truncated > 0
    health = app.state.scheduler.stats()
    assert (health["completed"], health["cancelled"]) == (2, 0)


def _rows_per_step(monkeypatch) -> list[int]:
    """The rows of every batch step from now on (`llm.generate.Batch.step`, wrapped)."""
    from llm.generate import Batch

    rows, step = [], Batch.step

    def counted(self):
        events = step(self)
        rows.append(len({id(row) for row, _ in events}))
        return events

    monkeypatch.setattr(Batch, "step", counted)
    return rows


def _completions_at_once(app, bodies: list[dict]) -> list[dict]:
    """POST every body to /v1/completions at once; the answers in order (streamed ones as their joined text)."""
    import httpx

    async def run():
        app.state.scheduler.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as c:
            responses = await asyncio.gather(*(c.post("/v1/completions", json=body) for body in bodies))
        app.state.scheduler.close()
        return responses

    answers = []
    for body, response in zip(bodies, asyncio.run(run()), strict=True):
        assert response.status_code == 200, response.text
        if body.get("stream"):
            chunks = _events(response)[:-1]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            answers.append({"text": text, "finish_reason": chunks[-1]["choices"][0]["finish_reason"]})
        else:
            answers.append(response.json()["choices"][0])
    return answers


def test_requests_at_once_are_decoded_together_each_as_it_is_alone(models, ckpt, monkeypatch):
    """Twelve completions sent together, prompts of 1 to 25 tokens, greedy or seeded, streamed or not, one with a
    stop sequence: they share steps (rows join as they come, leave as they finish) and every answer is the
    text the request gets alone, `llm generate`'s."""
    rows = _rows_per_step(monkeypatch)
    prompts = ["Hi", "Every effort moves you", "word " * 24, "The cat", "Once upon a time", "a, b, c, d, e, f"] * 2
    bodies = []
    for i, prompt in enumerate(prompts):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": min(12, 32 - len(encode(prompt))), "temperature": 0}
        if i % 3 == 1:
            body |= {"temperature": 1.2, "top_k": 20, "seed": i}
        bodies.append(body | {"stream": i % 2 == 0})
    bodies[0]["stop"] = _greedy(ckpt[1], "Hi", 12)[5:8]  # greedy and streamed
    answers = _completions_at_once(create_app(models), bodies)
    for body, answer in zip(bodies, answers, strict=True):
        sampling = {k: body[k] for k in ("temperature", "top_k", "seed") if k in body and body["temperature"]}
        expected = _greedy(ckpt[1], body["prompt"], body["max_tokens"], **sampling)
        if "stop" in body:
            expected = expected[: expected.index(body["stop"])]
        assert answer["text"] == expected
    assert answers[0]["finish_reason"] == "stop"
    assert max(rows) == 12 and len(rows) < sum(b["max_tokens"] for b in bodies)  # together, not in turn


def test_by_default_32_requests_decode_together_and_32_wait():
    """A class of twenty fits in one batch: the command's defaults are the app's (`Limits`)."""
    from llm.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.max_active, args.max_batch, args.max_queue) == (32, 32, 32)
    assert (Limits().max_active, Limits().max_batch, Limits().max_queue) == (32, 32, 32)
    scheduler = create_app({}).state.scheduler
    assert (scheduler.max_active, scheduler.max_batch, scheduler.max_queue) == (32, 32, 32)


def test_max_batch_bounds_the_rows_of_a_step(models, ckpt, monkeypatch):
    """`--max-batch 2`: five requests at once take turns two rows at a time, each still its text alone."""
    rows = _rows_per_step(monkeypatch)
    bodies = [
        {"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0} for p in ["A", "B c", "D e f", "G", "H"]
    ]
    answers = _completions_at_once(create_app(models, limits=Limits(max_batch=2)), bodies)
    assert [a["text"] for a in answers] == [_greedy(ckpt[1], b["prompt"], 6) for b in bodies]
    assert max(rows) == 2 and len(rows) >= 15  # 5 x 6 tokens, 2 rows a step


def test_a_step_that_fails_answers_its_rows_500_and_the_next_request_starts_a_new_batch(models, ckpt, monkeypatch):
    from llm.generate import Batch

    step, failures = Batch.step, [RuntimeError("out of memory")]

    def failing_once(self):
        if failures:
            raise failures.pop()
        return step(self)

    monkeypatch.setattr(Batch, "step", failing_once)
    body = {"model": "tiny", "prompt": "Every effort", "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(models), raise_server_exceptions=False) as c:
        _error(c.post("/v1/completions", json=body), 500, "internal error: RuntimeError: out of memory")
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == _greedy(ckpt[1], "Every effort", 4)
        health = c.get("/health").json()
    assert (health["completed"], health["cancelled"], health["active"]) == (1, 1, 0)


def test_the_messages_per_classification_are_bounded_by_the_servers_limit(models):
    with TestClient(create_app(models, limits=Limits(max_classify_inputs=3))) as c:
        error = _error(c.post("/v1/classify", json={"input": ["a", "b", "c", "d"]}), 400)
        assert error["message"] == "input takes at most 3 messages (this server's limit), got 4"
        assert (error["param"], error["type"]) == ("input", "invalid_request_error")
        assert len(c.post("/v1/classify", json={"input": ["a", "b", "c"]}).json()["data"]) == 3


def test_a_classification_whose_client_left_stops_before_its_next_batch(models, monkeypatch):
    """The client goes away once the first batch has run: the other 63 do not run."""
    import llm.serve.routes as routes

    batches = []

    def counted(model, info, texts, batch_size=32):
        batches.append(len(texts))
        return classify(model, info, texts, batch_size)

    monkeypatch.setattr(routes, "classify", counted)
    app = create_app(models)
    body = json.dumps({"model": "spam", "input": ["hello"] * 2048}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        if batches:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # still there (Starlette's check cancels this wait at once)

    async def send(message):
        sent.append(message)

    async def run():
        app.state.scheduler.start()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
        await app(scope, receive, send)
        app.state.scheduler.close()

    asyncio.run(run())
    assert batches == [32]
    health = app.state.scheduler.stats()
    assert (health["completed"], health["cancelled"], health["active"]) == (0, 1, 0)


# --- every request that cannot be served: one clear 4xx, never a 500 --------------------------------------
MSG = [{"role": "user", "content": "Name a color."}]
CANNOT = [
    ("/v1/completions", {"model": "spam", "prompt": "x"}, "'spam' is a classifier"),
    ("/v1/chat/completions", {"model": "spam", "messages": MSG}, "'spam' is a classifier"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG}, "'tiny' is not instruction-finetuned"),
    ("/v1/classify", {"model": "tiny", "input": "x"}, "'tiny' is not a classifier"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}, "model 'gpt-4o' is not loaded here; loaded: tiny, ins"),
    ("/v1/completions", {"prompt": "x"}, "'model' is required: this server holds tiny, ins, spam"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "the prompt is empty"),
    ("/v1/completions", {"model": "tiny", "prompt": " \n "}, "the prompt is empty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 40}, "(1 tokens) + max_tokens (40) is 41"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 40}, "the prompt is 41 tokens; model 'tiny' has a"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, "max_tokens must be <= 1024"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens: Input should be greater"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, "give one prompt per request, got 2"),
    ("/v1/completions", {"model": "tiny", "prompt": 3}, "prompt: Input should be a valid string"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "0.5"}, "temperature: Input should be a"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, "temperature: Input should be less"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, "top_p: Input should be greater than 0"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 1e-300}, "temperature: Value error, must be 0"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 0}, "top_k: Input should be greater"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, "seed: Input should be greater"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream: Input should be a valid boolean"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, "n: Input should be less than or equal to 1"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, "stop takes at most 4"),
    ("/v1/chat/completions", {"model": "ins", "messages": []}, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"model": "ins", "messages": "hi"}, "messages: Input should be a valid list"),
    ("/v1/chat/completions", {"model": "ins", "messages": [{"role": "robot", "content": "x"}]}, "role: Input should"),
    (
        "/v1/chat/completions",
        {"model": "ins", "messages": [*MSG, {"role": "assistant", "content": "Red."}]},
        "the last message must be the user's",
    ),
    ("/v1/chat/completions", {"model": "ins", "messages": [{"role": "user", "content": " "}]}, "last user message is"),
    (
        "/v1/chat/completions",
        {"model": "ins", "messages": [{"role": "user", "content": "word " * 70}]},
        "has a context of 64 tokens, which leaves no room",
    ),
    ("/v1/classify", {"model": "spam", "input": ""}, "the message is empty"),
    ("/v1/classify", {"model": "spam", "input": ["ok", " "]}, "the message is empty (input[1])"),
    ("/v1/classify", {"model": "spam", "input": []}, "input is an empty list"),
    ("/v1/classify", {"model": "spam"}, "input: Field required"),
    ("/v1/classify", {"model": "spam", "input": ["x"] * 2049}, "input takes at most 2048 messages (this server's"),
]


@pytest.mark.parametrize(("path", "body", "message"), CANNOT)
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_cannot_be_served_is_a_400_naming_why(client, path, body, message, stream):
    if stream and path != "/v1/classify":
        body = {**body, "stream": body.get("stream", True)}
    _error(client.post(path, json=body), 400, message)


def test_a_body_that_is_not_a_json_object_is_a_400(client):
    headers = {"content-type": "application/json"}
    _error(client.post("/v1/completions", content=b"{bad", headers=headers), 400, "the request body is not valid JSON")
    _error(client.post("/v1/completions", content=b"[1]", headers=headers), 400, "must be a JSON object")


def test_a_body_over_the_limit_is_a_413_declared_or_not(models):
    with TestClient(create_app(models, limits=Limits(max_body_bytes=1000))) as c:
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 2000}), 413, "limit of 1000 bytes")

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(5):
                yield b"x" * 500
            yield b'"}'

        _error(c.post("/v1/completions", content=chunked()), 413, "limit of 1000 bytes")
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_unknown_paths_and_methods_answer_in_json(client):
    assert _error(client.get("/v1/nothing"), 404, "no such endpoint: GET /v1/nothing")["code"] == "not_found"
    _error(client.get("/v1/completions"), 405, "/v1/completions does not take GET")


# --- the API key -----------------------------------------------------------------------------------------
def test_with_an_api_key_every_request_but_the_page_needs_it(models):
    with TestClient(create_app(models, api_key="s3cret")) as c:
        for method, path in [("get", "/v1/models"), ("get", "/health"), ("post", "/v1/completions")]:
            response = getattr(c, method)(path)
            assert _error(response, 401, "no API key given")["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "wrong API key")
        _error(c.get("/v1/models", headers={"Authorization": "s3cret"}), 401, "wrong API key")
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/").status_code == 200  # the page asks for the key itself


def test_without_an_api_key_no_header_is_needed(client):
    assert client.get("/v1/models").status_code == 200


# --- load: the bounded queue, the turns -------------------------------------------------------------------
def test_a_full_queue_is_a_503_with_retry_after(models):
    app = create_app(models, limits=Limits(max_active=1, max_queue=1))
    with TestClient(app) as c:
        scheduler = app.state.scheduler
        held = [scheduler.reserve(), scheduler.reserve()]  # one turn and one place in the line, taken
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        for path, payload in [("/v1/completions", body), ("/v1/completions", {**body, "stream": True}),
                              ("/v1/classify", {"model": "spam", "input": "hi"})]:  # fmt: skip
            response = c.post(path, json=payload)
            error = _error(response, 503, "the server is busy: 1 requests are running and 1 are waiting")
            assert error["code"] == "queue_full" and response.headers["retry-after"] == "1"
        assert c.get("/health").json()["rejected"] == 3
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": ""}), 400, "empty")  # 400 before 503
        for ticket in held:
            ticket.release()
        assert c.post("/v1/completions", json=body).status_code == 200
        health = c.get("/health").json()
        assert (health["active"], health["queued"]) == (0, 0)


def _interleaving(models, max_active: int) -> str:
    """Which request each streamed piece came from, for two requests started together."""
    served = models["tiny"]
    order = []

    async def run():
        scheduler = Scheduler(max_active=max_active, max_queue=4)
        scheduler.start()

        async def one(name: str):
            req = CompletionRequest(prompt="Hi", temperature=0)
            gen = Generation(scheduler, served, encode("Hi"), req, 6, [])
            ticket = scheduler.reserve()
            await ticket.turn()
            try:
                async for _ in gen.pieces():
                    order.append(name)
            finally:
                ticket.release()

        await asyncio.gather(one("a"), one("b"))
        scheduler.close()

    asyncio.run(run())
    return "".join(order)


def test_a_closed_worker_is_not_waited_for_past_a_timeout(models):
    """What bounds a stop (`llm.serve.server.serve`): `close` does not wait for the step running on the
    worker, `join(timeout)` says whether it ended in time, and a cleanup asked for meanwhile is not run
    beside that step (it would run the same generator on two threads)."""
    import threading

    release, started, cleaned = threading.Event(), threading.Event(), []

    async def run():
        scheduler = Scheduler()
        scheduler.start()
        loop = asyncio.get_running_loop()
        step = loop.create_task(scheduler.run(lambda: started.set() or release.wait(60)))
        await loop.run_in_executor(None, started.wait, 60)
        scheduler.close()  # returns while the step runs
        assert scheduler.join(0.05) is False
        scheduler.later(cleaned.append, "now")
        assert cleaned == []
        release.set()
        assert await step is True and scheduler.join() is True
        scheduler.later(cleaned.append, "after")  # the worker is gone: here, at once
        assert cleaned == ["after"]

    asyncio.run(run())


def test_health_says_stalled_while_one_step_runs_past_the_stall_timeout_and_ok_once_it_ends(models, monkeypatch):
    """A classification step that does not return (it waits on an Event) holds the worker: /health says
    "ok" with the step and its age until the age passes --stall-timeout, then 503 "stalled" (before: "ok"
    while every request waited behind it); once the step ends, "ok" again, idle. The scheduler's clock
    is the test's, so no step's real time matters."""
    import threading

    import llm.serve.routes as routes

    started, release, now = threading.Event(), threading.Event(), [100.0]

    def stuck(model, info, texts, batch_size=32):
        started.set()
        release.wait(60)
        return classify(model, info, texts, batch_size)

    monkeypatch.setattr(routes, "classify", stuck)
    app = create_app(models, limits=Limits(stall_timeout=5.0))
    app.state.scheduler.clock = lambda: now[0]
    with TestClient(app) as c:
        idle = c.get("/health")
        assert idle.status_code == 200 and idle.json()["status"] == "ok"
        assert (idle.json()["step"], idle.json()["last_step_seconds"], idle.json()["steps"]) == (None, None, 0)
        answers = []
        request = threading.Thread(target=lambda: answers.append(c.post("/v1/classify", json={"input": "hi"})))
        request.start()
        try:
            assert started.wait(60)
            now[0] += 5.0  # at the stall timeout: not past it
            health = c.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert (health.json()["step"], health.json()["step_seconds"]) == ("spam: classify messages 1-1 of 1", 5.0)
            now[0] += 0.5
            stalled = c.get("/health")
            assert stalled.status_code == 503, stalled.text
            body = stalled.json()
            assert (body["status"], body["step_seconds"], body["stall_timeout"]) == ("stalled", 5.5, 5.0)
            assert body["active"] == 1
            assert body["models"] == ["tiny", "ins", "spam"]
        finally:
            release.set()
            request.join(60)
        assert answers[0].status_code == 200 and answers[0].json()["data"][0]["label"] in ("spam", "not spam")
        now[0] += 2.0
        after = c.get("/health")
        assert after.status_code == 200, after.text
        assert (after.json()["status"], after.json()["step"], after.json()["step_seconds"]) == ("ok", None, 0.0)
        assert (after.json()["last_step_seconds"], after.json()["steps"], after.json()["completed"]) == (2.0, 1, 1)


def test_health_names_every_step_of_a_generation(models):
    """What /health shows as the running step: each step of the model's batch, its rows and those that join
    it in that step (a generation is a row of its model's batch; it finished with its last token, so it
    leaves without a step of its own)."""
    app = create_app(models)
    scheduler, steps = app.state.scheduler, []
    step_of = scheduler._step_of
    scheduler._step_of = lambda what, fn, *args: steps.append(what) or step_of(what, fn, *args)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 2
        scheduler.close()
        assert scheduler.join(60)
    assert steps == ["tiny: a batch step of 1 row, 1 joining", "tiny: a batch step of 1 row"]
    assert scheduler.steps == 2


def test_health_names_a_batch_step_by_its_rows(models):
    """Two generations of one model started together are one step's two rows, in every step /health names."""
    served, steps = models["tiny"], []

    async def run():
        scheduler = Scheduler(max_active=2, max_queue=4)
        step_of = scheduler._step_of
        scheduler._step_of = lambda what, fn, *args: steps.append(what) or step_of(what, fn, *args)
        scheduler.start()

        async def one():
            req = CompletionRequest(prompt="Hi", temperature=0, ignore_eos=True)
            async for _ in Generation(scheduler, served, encode("Hi"), req, 3, []).pieces():
                pass

        await asyncio.gather(one(), one())
        scheduler.close()

    asyncio.run(run())
    assert steps == ["tiny: a batch step of 2 rows, 2 joining"] + ["tiny: a batch step of 2 rows"] * 2


def test_requests_in_flight_get_a_token_each_per_step(models):
    """Two requests in one batch: every step gives each its next token; with one turn, the second waits."""
    assert _interleaving(models, max_active=2) == "ab" * 6
    assert _interleaving(models, max_active=1) == "a" * 6 + "b" * 6  # the second waited for a turn


# --- the command's startup errors: one line, exit 2 -------------------------------------------------------
def _one_line(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("llm serve: error: ") and message in err, err


def test_a_bad_model_is_one_line_and_exit_2(capsys, ckpt, tmp_path):
    _one_line(capsys, ["serve", "--model", "/no/such/ckpt"], "checkpoint /no/such/ckpt does not exist")
    (tmp_path / "tiny").mkdir()
    twice = ["serve", "--model", str(ckpt[0]), "--model", str(tmp_path / "tiny")]
    _one_line(capsys, twice, "two models are named 'tiny'")
    _one_line(capsys, ["serve", "--model", str(ckpt[0]), "--port", "70000"], "--port must be in [0, 65535]")


@pytest.mark.parametrize(
    "option, message",
    [
        (["--api-key", ""], "--api-key is empty: give the key clients must send"),  # was: no authentication
        (["--api-key", "  "], "--api-key is empty"),
        (["--drain-timeout", "nan"], "--drain-timeout: must be a number of seconds >= 0, got nan"),  # was accepted
        (["--drain-timeout", "-1"], "--drain-timeout: must be a number of seconds >= 0, got -1"),
        (["--drain-timeout", "inf"], "got inf"),
        (["--drain-timeout", "soon"], "--drain-timeout: must be a number of seconds, got 'soon'"),  # was "_seconds"
        (["--stall-timeout", "0.5"], "--stall-timeout: must be a number of seconds >= 1, got 0.5"),  # a typo for ms
        (["--stall-timeout", "nan"], "--stall-timeout: must be a number of seconds >= 1, got nan"),
        (["--stall-timeout", "inf"], "got inf"),
        (["--stall-timeout", "-1"], "got -1"),
        (["--stall-timeout", "1m"], "--stall-timeout: must be a number of seconds, got '1m'"),
        (["--max-batch", "0"], "--max-batch: must be in [1, 256], got 0"),
        (["--max-batch", "257"], "--max-batch: must be in [1, 256], got 257"),  # bounds.MAX_BATCH
    ],
)
def test_an_empty_api_key_a_timeout_that_is_no_duration_or_a_batch_out_of_bounds_is_one_line(
    capsys, ckpt, option, message
):
    argv = ["serve", "--model", str(ckpt[0]), *option]
    if option[0] == "--api-key":
        return _one_line(capsys, argv, message)
    with pytest.raises(SystemExit) as exited:  # the parser's own error: exit 2 before any work
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_a_port_in_use_is_one_line_and_exit_2(capsys, ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(ckpt[0]), "--port", str(port)]
        _one_line(capsys, argv, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_the_port_is_checked_before_any_model_is_read(capsys):
    # the model does not exist: had it been read first, its error would be the one printed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", "/no/such/ckpt", "--port", str(port)]
        _one_line(capsys, argv, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    # an address that is not this machine's (TEST-NET-1) cannot be listened on either
    argv = ["serve", "--model", "/no/such/ckpt", "--host", "192.0.2.1", "--port", "0"]
    _one_line(capsys, argv, "cannot listen on 192.0.2.1:0: ")


@pytest.mark.filterwarnings("error")  # a socket left to the garbage collector warns (ResourceWarning)
def test_a_model_that_fails_to_load_closes_its_socket(capsys):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _one_line(capsys, ["serve", "--model", "/no/such/ckpt", "--port", str(port)], "checkpoint /no/such/ckpt")
    with socket.socket() as again:  # the failed server holds it no more
        again.bind(("127.0.0.1", port))
