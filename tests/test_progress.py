"""Progress bars only on a terminal; plain log lines everywhere; no extra draws from torch's RNG."""

import io
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llm import judge
from llm.corpus import tokenize_corpus
from llm.data import TokenWindowDataset
from llm.generate import generate
from llm.loaders import make_loaders
from llm.model import GPTModel
from llm.progress import progress_bar, shown, write
from llm.settings import LoopSettings
from llm.trainer import Trainer
from tests.conftest import ROOT, tiny_cfg


class Terminal(io.StringIO):
    def isatty(self):
        return True


def on_terminal(monkeypatch) -> Terminal:
    """stderr as a TTY that records what is drawn on it (set in the test: pytest's capture resets sys.stderr)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    return term


def test_a_bar_draws_on_a_terminal(monkeypatch):
    terminal = on_terminal(monkeypatch)
    assert shown()
    for _ in progress_bar(range(3), desc="work"):
        pass
    assert "\r" in terminal.getvalue() and "work" in terminal.getvalue()


def test_no_bar_when_disabled_by_argument_or_environment(monkeypatch):
    terminal = on_terminal(monkeypatch)
    for _ in progress_bar(range(3), disable=True):
        pass
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not shown()
    with progress_bar(total=3) as bar:
        bar.update(3)
    assert terminal.getvalue() == ""


def test_no_bar_off_a_terminal_and_log_lines_stay_plain(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with progress_bar(total=3) as bar:  # pytest's captured stderr is not a TTY
        bar.update(3)
        write("Ep 1 (Step 000000): Train loss 1.000, Val loss 2.000")
    out, err = capsys.readouterr()
    assert err == "" and out == "Ep 1 (Step 000000): Train loss 1.000, Val loss 2.000\n"


@pytest.mark.parametrize("tty", [False, True])
def test_wrapping_a_shuffled_loader_draws_no_extra_random_numbers(tty, monkeypatch):
    if tty:
        on_terminal(monkeypatch)
    loader = DataLoader(torch.arange(20), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    plain = [b.tolist() for b in loader]
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    wrapped = [b.tolist() for b in progress_bar(loader)]
    assert wrapped == plain and torch.equal(torch.rand(1), after_plain)


def test_no_module_but_progress_imports_tqdm():
    users = [p.name for p in (ROOT / "llm").glob("*.py") if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert users == []


def _tiny_lm():
    torch.manual_seed(0)
    return GPTModel(tiny_cfg(context_length=16)).eval()


def test_call_sites_draw_nothing_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    generate(_tiny_lm(), torch.tensor([[1, 2]]), 3, 16, progress=True)
    (tmp_path / "c.txt").write_text("Hello there. " * 20)
    tokenize_corpus([tmp_path / "c.txt"], 0.9, tmp_path / "tok", progress=True)
    monkeypatch.setattr(judge, "query_model", lambda *a: "80")
    judge.judge_responses([{"instruction": "i", "input": "", "output": "o", "model_response": "o"}], "m", "u")
    assert capsys.readouterr().err == ""


def test_call_sites_keep_their_progress_argument(monkeypatch):
    terminal = on_terminal(monkeypatch)
    generate(_tiny_lm(), torch.tensor([[1, 2]]), 3, 16, progress=False)
    assert terminal.getvalue() == ""
    generate(_tiny_lm(), torch.tensor([[1, 2]]), 3, 16, progress=True)
    assert "generate" in terminal.getvalue()


def test_trainer_logs_plain_lines_without_a_bar(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    ids = np.random.default_rng(0).integers(0, 97, 200).astype(np.uint16)
    s = LoopSettings(
        seed=1, num_epochs=1, batch_size=2, lr=1e-3, weight_decay=0.1,
        eval_freq=2, eval_iter=1, warmup_steps=0, lr_schedule="constant", min_lr=0.0, grad_clip=0.0,
        grad_accum_steps=1, precision="fp32", device="cpu", checkpoint_every=0,
    )  # fmt: skip
    model = GPTModel(tiny_cfg(vocab_size=97, context_length=8))
    train, val = TokenWindowDataset(ids[:150], 8, 8), TokenWindowDataset(ids[150:], 8, 8)
    Trainer(model, make_loaders(train, val, s), s, progress=True).fit()
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert "Ep 1 (Step 000000): Train loss" in out and "Ep 1 (Step 000002): Train loss" in out


def test_long_loops_print_a_plain_line_every_tenth_off_a_terminal(capsys, monkeypatch):
    """`lines=True` (the instruction stage answering its test set, the judge): off a terminal the log
    shows the loop moving, one plain line per tenth and one at the end; on a terminal it is a bar."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert list(progress_bar(list(range(20)), desc="responses", unit="entry", lines=True)) == list(range(20))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and len(lines) == 10 and "\r" not in out
    assert lines[0].startswith("responses: 2/20 entries (10%), ") and lines[0].endswith(" left")
    assert lines[-1].startswith("responses: 20/20 entries (100%), ") and "left" not in lines[-1]
    list(progress_bar(list(range(3)), desc="judge", unit="entry", lines=True))
    assert [ln.split(",")[0] for ln in capsys.readouterr().out.splitlines()] == [
        "judge: 1/3 entries (33%)", "judge: 2/3 entries (67%)", "judge: 3/3 entries (100%)"
    ]  # fmt: skip
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(progress_bar(list(range(20)), desc="responses", lines=True))
    assert capsys.readouterr() == ("", "")
    monkeypatch.delenv("TQDM_DISABLE")
    terminal = on_terminal(monkeypatch)
    list(progress_bar(list(range(20)), desc="responses", unit="entry", lines=True))
    assert "\r" in terminal.getvalue() and capsys.readouterr().out == ""
