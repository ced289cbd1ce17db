"""Chapter 7: data, prompt format, collate, response metrics, the Ollama judge client, `llm instruct`."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llm.checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint
from llm.cli import main
from llm.errors import LLMError
from llm.generate import generate
from llm.instruct import (
    InstructionDataset,
    answer_test_set,
    custom_collate_fn,
    exact_match,
    extract_response,
    format_input,
    load_instructions,
    recorded_prompt_style,
    respond,
    response_header,
    response_metrics,
    rouge_l,
    split_instructions,
)
from llm.judge import judge_prompt, judge_responses, parse_score
from llm.model import GPTModel
from llm.tokenizer import EOT_ID, encode, get_tokenizer
from tests.conftest import tiny_cfg

ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by Sam.", "output": "Sam baked the cake."}


def test_collate_matches_the_books_example():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]] and targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_prompt_masking_option():
    _, targets = custom_collate_fn([([10, 11, 12, 13], 3), [5, 6]])
    assert targets.tolist() == [[-100, -100, 13, 50256], [6, 50256, -100, -100]]


def test_prompt_format_is_the_books_character_for_character():
    assert format_input(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was baked by Sam."
    )
    no_input = {**ENTRY, "input": ""}
    assert format_input(no_input).endswith("### Instruction:\nRewrite the sentence.")
    assert format_input({"instruction": "x", "output": "y"}).endswith("### Instruction:\nx")
    assert format_input(ENTRY, "phi3") == "<|user|>\nRewrite the sentence.\nThe cake was baked by Sam."
    prompt = format_input(ENTRY)
    assert extract_response(prompt + "\n\n### Response:\nSam baked the cake.", prompt) == "Sam baked the cake."
    ds = InstructionDataset([ENTRY], get_tokenizer())
    assert get_tokenizer().decode(ds[0]) == prompt + "\n\n### Response:\nSam baked the cake."
    masked = InstructionDataset([ENTRY], get_tokenizer(), mask_prompt=True)
    ids, prompt_length = masked[0]
    assert get_tokenizer().decode(ids[prompt_length:]) == "Sam baked the cake."


def test_real_data_splits_as_the_book(public_input, tmp_path):
    data = load_instructions(public_input("instructions"))
    train, test, val = split_instructions(data, 0.85, 0.1)
    assert (len(data), len(train), len(test), len(val)) == (1100, 935, 110, 55)
    assert train[0] == data[0] and val[-1] == data[-1]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in data[:3]))
    assert load_instructions(jsonl) == data[:3]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "non-empty list"),
        ("{bad", "not valid JSON"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "entry 1 needs a string 'output'"),
        ('[{"instruction": 3, "output": "b"}]', "entry 0 needs a string 'instruction'"),
        ('[{"instruction": "a", "output": "b", "input": 5}]', "entry 0: 'input' must be a string"),
        ('["text"]', "entry 0 is not an object"),
    ],
)
def test_bad_data_is_reported_by_index_and_key(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(LLMError, match=message):
        load_instructions(path)


def test_rouge_l_and_exact_match_on_known_pairs():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    # LCS "the cat the mat" = 4 of 6 candidate and 4 of 7 reference words
    assert rouge_l("the cat sat on the mat", "the cat was under the red mat") == pytest.approx(
        2 * (4 / 6) * (4 / 7) / (4 / 6 + 4 / 7)
    )
    assert exact_match("Sam baked the cake.", "sam baked the cake") and not exact_match("Sam baked", "Sam baked it")
    m = response_metrics([{"model_response": "Sam baked the cake.", "output": "Sam baked the cake."},
                          {"model_response": "no", "output": "yes sir"}])  # fmt: skip
    assert m["exact_match"] == 0.5 and m["rouge_l"] == 0.5 and m["avg_response_words"] == 2.5


class _Judge(BaseHTTPRequestHandler):
    replies: list = []
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        reply = type(self).replies.pop(0)
        data = json.dumps({"message": {"role": "assistant", "content": reply}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _SlowJudge(BaseHTTPRequestHandler):
    """Scores a response by its length, after 0.2 s; counts the requests in flight."""

    lock = threading.Lock()
    in_flight = most = 0

    def do_POST(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most = max(cls.most, cls.in_flight)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        response = body["messages"][0]["content"].split("score the model response `")[1].split("`")[0]
        time.sleep(0.2)
        with cls.lock:
            cls.in_flight -= 1
        data = json.dumps({"message": {"content": str(len(response)) if response != "?" else "no idea"}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_judge_keeps_four_requests_in_flight_and_scores_every_entry():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        responses = ["a" * n for n in range(1, 12)] + ["?"]
        entries = [{**ENTRY, "model_response": r} for r in responses]
        result = judge_responses(entries, "llama3", f"http://127.0.0.1:{server.server_address[1]}")
        assert result == {"judge_score": 6.0, "judge_scored": 11, "judge_invalid": 1}  # the mean of 1..11
        assert _SlowJudge.most == 4
    finally:
        server.shutdown()
        server.server_close()


def test_judge_against_a_local_ollama_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Judge.replies[:] = ["85", "I would say 40", " 60\n"]
        _Judge.seen.clear()
        entries = [{**ENTRY, "model_response": r} for r in ("Sam baked the cake.", "cake", "Sam baked it.")]
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = judge_responses(entries, "llama3", url)
        assert result == {"judge_score": 72.5, "judge_scored": 2, "judge_invalid": 1}
        path, body = _Judge.seen[0]
        assert path == "/api/chat" and body["model"] == "llama3" and body["stream"] is False
        assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
        assert body["messages"][0]["content"] == judge_prompt(entries[0])
        assert judge_prompt(entries[0]).endswith("Respond with the integer number only.")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(LLMError, match="cannot reach the Ollama judge at http://127.0.0.1:9") as err:
        judge_responses(entries[:1], "llama3", "http://127.0.0.1:9")
    assert "\n" not in str(err.value)
    assert parse_score("101") is None and parse_score("7.") == 7 and parse_score("abc") is None


def test_cli_instruct_streams_and_runs_files(instruct_ckpt, tmp_path, capsys):
    assert main(["instruct", "--checkpoint", str(instruct_ckpt), "Name a color.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    data = tmp_path / "q.jsonl"
    data.write_text('{"instruction": "Name a color."}\n{"instruction": "Add", "input": "1 and 2"}\n')
    out = tmp_path / "r.json"
    assert main(["instruct", "--checkpoint", str(instruct_ckpt), "--file", str(data), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["instruction"] for r in results] == ["Name a color.", "Add"]
    assert all(isinstance(r["model_response"], str) for r in results)
    capsys.readouterr()
    assert main(["instruct", "--checkpoint", str(instruct_ckpt), " "]) == 2
    assert "the instruction is empty" in capsys.readouterr().err


def test_cli_instruct_answers_a_file_in_batches_each_entry_as_alone(instruct_ckpt, tmp_path, capsys):
    """`--file` generates `--batch-size` entries at once (prompts of different lengths, one longer than the
    context): every answer is what `respond` (the command without --file) gives that entry alone."""
    entries = [{"instruction": "Name a color."}, {"instruction": "Add", "input": "1 and 2"}, {"instruction": "Hi"},
               {"instruction": "Rewrite the sentence. " * 9, "input": "The cake was baked by Sam."},
               {"instruction": "Why?", "input": "Be brief."}]  # fmt: skip
    data = tmp_path / "q.json"
    data.write_text(json.dumps(entries))
    model = load_checkpoint(instruct_ckpt)
    expected = ["".join(respond(model, entry, "alpaca", 20)).strip() for entry in entries]
    for batch in (["--batch-size", "2"], []):
        capsys.readouterr()
        assert main(["instruct", "--checkpoint", str(instruct_ckpt), "--file", str(data), "--max-new-tokens", "20",
                     *batch]) == 0  # fmt: skip
        assert [r["model_response"] for r in json.loads(capsys.readouterr().out)] == expected
    assert main(["instruct", "--checkpoint", str(instruct_ckpt), "Hi", "--batch-size", "2"]) == 2
    assert "--batch-size is for --file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["instruct", "--checkpoint", str(instruct_ckpt), "--file", str(data), "--batch-size", "0"])
    assert "--batch-size: must be in [1, 256], got 0" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_respond_streams_the_greedy_answer_after_the_response_header(style):
    torch.manual_seed(4)
    model = GPTModel(tiny_cfg(context_length=40)).eval()
    tok = get_tokenizer()
    entry = {"instruction": "Name a color. " * 12, "input": "é"}  # longer than the context: cut on the left
    prompt_ids = encode(format_input(entry, style) + response_header(style), tok)
    assert len(prompt_ids) > 40
    full = generate(model, torch.tensor([prompt_ids[-40:]]), 9, 40, eos_id=EOT_ID)[0, 40:].tolist()
    pieces = list(respond(model, entry, style, max_new_tokens=9))
    assert "".join(pieces) == tok.decode(full) and len(pieces) == len(full) + 1  # + the decoder's flush


def test_the_prompt_style_a_checkpoint_recorded(instruct_ckpt, tmp_path):
    assert recorded_prompt_style(checkpoint_meta(instruct_ckpt)) == "alpaca"
    phi = save_checkpoint(
        load_checkpoint(instruct_ckpt), tmp_path / "phi", extra={"instruct": {"prompt_style": "phi3"}}
    )
    assert recorded_prompt_style(checkpoint_meta(phi)) == "phi3"
    assert recorded_prompt_style(checkpoint_meta("gpt2-small")) == "alpaca"  # a GPT-2 name records nothing
    assert recorded_prompt_style({}) == "alpaca"


# --- instruction files: UTF-8, errors that say where ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data", "offset", "line"),
    [
        ("d.json", b'[{"instruction": "caf\xe9", "output": "b"}]', 21, 1),
        ("d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n', 53, 2),
    ],
)
def test_an_instructions_file_that_is_not_utf8_names_the_byte(tmp_path, name, data, offset, line):
    """What `llm instruct --file` and the finetune_instruct stage (`finetune_instruct.data`) read."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(LLMError) as info:
        load_instructions(path)
    assert str(info.value).startswith(f"{path} is not UTF-8 text: byte ")
    assert f"at offset {offset} (line {line})" in str(info.value) and "\n" not in str(info.value)


def test_an_instructions_file_with_a_bom_or_crlf_reads_as_without(tmp_path):
    entries = [{"instruction": "Name a color.", "input": "", "output": "Blue."}]
    text = json.dumps(entries, indent=2)
    (tmp_path / "a.json").write_text(text)
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_instructions(tmp_path / "a.json") == load_instructions(tmp_path / "b.json") == entries


def test_a_bad_jsonl_line_is_named_by_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": \n')
    with pytest.raises(LLMError, match=f"^{path} is not valid JSON Lines: Expecting value at line 3$"):
        load_instructions(path)


def test_cli_instruct_file_errors_are_one_line_naming_the_flag(instruct_ckpt, tmp_path, capsys):
    bad = tmp_path / "q.json"
    bad.write_bytes(b'[{"instruction": "\xe9"}]')
    for file, message in [
        (bad, f"--file {bad} is not UTF-8 text: byte b'\\xe9' at offset 18 (line 1)"),
        (tmp_path / "none.json", f"cannot read --file {tmp_path / 'none.json'}: No such file or directory"),
    ]:
        assert main(["instruct", "--checkpoint", str(instruct_ckpt), "--file", str(file)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"llm instruct: error: {message}") and err.count("\n") == 1


def test_llm_instruct_answers_with_the_dpo_stages_checkpoint(dpo_ckpt, tmp_path, capsys):
    """`llm instruct --model models/dpo`: the checkpoint finetune_dpo saves is an instruction model in the
    Alpaca style it recorded, answered as `respond` answers, one instruction or a file of them."""
    meta = checkpoint_meta(dpo_ckpt)
    assert dpo_ckpt.name == "dpo" and meta["dpo"] == {"init": "models/instruct", "beta": 0.1}
    assert recorded_prompt_style(meta) == "alpaca"
    model = load_checkpoint(dpo_ckpt)
    entry = {"instruction": "Rewrite the sentence politely.", "input": "Give me the salt."}
    expected = "".join(respond(model, entry, "alpaca", 7))
    argv = ["instruct", "--model", str(dpo_ckpt), entry["instruction"], "--input", entry["input"]]
    assert main([*argv, "--max-new-tokens", "7"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    data, out = tmp_path / "q.jsonl", tmp_path / "r.json"
    data.write_text(json.dumps(entry) + "\n")
    assert main(["instruct", "--model", str(dpo_ckpt), "--file", str(data), "--output", str(out),
                 "--max-new-tokens", "7"]) == 0  # fmt: skip
    assert json.loads(out.read_text()) == [{**entry, "model_response": expected.strip()}]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_the_stages_answers_are_the_books_loop_entry_by_entry(style):
    """`answer_test_set` (finetune_instruct's responses.json) answers in batches what the book's loop answered one
    entry at a time: `generate` on the prompt's last context tokens, the response extracted from the text."""
    from llm.tokenizer import text_to_token_ids, token_ids_to_text

    torch.manual_seed(8)
    model = GPTModel(tiny_cfg(context_length=40)).eval()
    entries = [{"instruction": "Name a color."}, {"instruction": "Add", "input": "1 and 2"},
               {"instruction": "Rewrite the sentence. " * 9, "input": "é"}, {"instruction": "Why?", "input": "x"},
               {"instruction": "Translate to French", "input": "Good morning, how are you?"}]  # fmt: skip
    expected = []
    for entry in entries:
        prompt = format_input(entry, style)
        ids = text_to_token_ids(prompt)[:, -40:]
        out = generate(model, ids, 12, 40, eos_id=EOT_ID)
        expected.append(extract_response(prompt + token_ids_to_text(out[:, ids.shape[1] :]), prompt, style))
    assert answer_test_set(model, entries, style, 12, EOT_ID, batch_size=3) == expected
