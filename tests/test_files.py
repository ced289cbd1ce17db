"""JSON outputs are strict JSON; a killed writer's temporaries are removed; a lock has one holder."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llm.files
from llm.errors import LLMError
from llm.files import LockHeld, atomic_path, exclusive_lock, finite_or_none, sanitize, write_json
from tests.conftest import ROOT


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), None),
        (float("inf"), None),
        (-math.inf, None),
        (1.5, 1.5),
        (3, 3),
        ("NaN", "NaN"),
        (None, None),
        (True, True),
        (np.float32("nan"), None),
        (np.float64(0.25), 0.25),
        (np.int64(7), 7),
        (torch.tensor(float("inf")), None),
        (torch.tensor(2.5), 2.5),
    ],
)
def test_finite_or_none(value, expected):
    out = finite_or_none(value)
    assert out == expected and type(out) is type(expected)


def test_sanitize_reaches_nested_dicts_lists_and_tuples():
    obj = {"a": math.nan, "b": {"c": [1.0, math.inf, (np.float32(-np.inf), 2)]}, "d": "text"}
    assert sanitize(obj) == {"a": None, "b": {"c": [1.0, None, [None, 2]]}, "d": "text"}


def test_write_json_writes_null_for_non_finite_floats(tmp_path):
    metrics = {
        "test_response_loss": math.nan,
        "test_response_perplexity": math.inf,
        "curve": [1.0, -math.inf],
        "nested": {"judge_score": np.float64("nan"), "steps": np.int64(3)},
    }
    text = write_json(tmp_path / "m.json", metrics).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _strict(text) == {
        "test_response_loss": None,
        "test_response_perplexity": None,
        "curve": [1.0, None],
        "nested": {"judge_score": None, "steps": 3},
    }
    assert metrics["test_response_loss"] != metrics["test_response_loss"]  # the caller's object is not changed


# --- temporaries of a killed writer ------------------------------------------------------------------
def test_a_write_removes_the_temporaries_a_killed_writer_left_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    out = tmp_path / "out.json"
    stale = [
        f".out.json.{dead_pid}-0123abcd-x1y2z3_4.tmp",  # its process is gone
        f".out.json.{os.getpid()}-0123abcd-x1y2z3_4.tmp",  # an earlier process with this pid (a container's)
        ".out.json.k3j4h5g6.tmp",  # written before temporaries named their process
    ]
    kept = [
        f".out.json.{os.getppid()}-0123abcd-x1y2z3_4.tmp",  # a live process may still be writing it
        f".out.json.{os.getpid()}-{llm.files._TOKEN}-x1y2z3_4.tmp",  # so may another thread of this one
        ".out.json.x.k3j4h5g6.tmp",  # the temporary of out.json.x
        ".other.json.k3j4h5g6.tmp",
        "out.json.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text("partial")
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "out.json"])


def test_sigkill_while_writing_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "state.pt"
    code = (
        "import sys, time; from llm.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        " tmp.write_bytes(b'x' * 1000); print(tmp, flush=True); time.sleep(60)"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(writer.stdout.readline().strip())
    finally:
        writer.kill()  # SIGKILL: atomic_path cannot clean up
        writer.wait()
    assert tmp.is_file() and tmp.name.startswith(".state.pt.") and tmp.name.endswith(".tmp")
    with atomic_path(target) as new:
        new.write_bytes(b"whole")
        assert not tmp.exists() and new.is_file()  # gone before the new one is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"] and target.read_bytes() == b"whole"


# --- one holder of a lock ----------------------------------------------------------------------------
def test_exclusive_lock_refuses_a_second_holder_and_is_released(tmp_path):
    lock = tmp_path / "resume" / "state.pt.lock"
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        # a second open of the file, as another process would: refused at once, naming the holder
        held = rf"^another run holds {re.escape(str(lock))} \(pid {os.getpid()}\)$"
        with pytest.raises(LockHeld, match=held), exclusive_lock(lock):
            pass
        assert isinstance(LockHeld("x"), LLMError)
    assert not lock.exists()
    with exclusive_lock(lock):  # free again
        pass


def test_exclusive_lock_where_no_lock_file_can_be_made_runs_unlocked(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with exclusive_lock(tmp_path / "file" / "state.pt.lock") as path:
        assert path == tmp_path / "file" / "state.pt.lock"


def test_atomic_writes_name_the_users_file_when_they_cannot_happen(tmp_path, monkeypatch):
    """A directory or device is never replaced; errors name the destination, not a temporary."""
    import errno

    import pytest

    from llm.errors import LLMError
    from llm.files import atomic_write_bytes

    (tmp_path / "dir").mkdir()
    with pytest.raises(LLMError, match="dir is not a regular file"):
        atomic_write_bytes(tmp_path / "dir", b"x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as err:
        atomic_write_bytes(tmp_path / "file" / "sub" / "out.json", b"x")
    assert err.value.filename == str(tmp_path / "file")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".out.json.123.tmp"))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(tmp_path / "out.json", b"x")
    assert err.value.filename == str(tmp_path / "out.json") and err.value.errno == errno.EROFS
    assert not (tmp_path / "out.json").exists()
