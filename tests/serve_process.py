"""A real `python -m llm serve` process on 127.0.0.1 and a free port (`--port 0`: the port the server
announces on stderr), for test_serve_client.py and test_serve_browser.py."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.conftest import ROOT

STARTUP_S = 120  # importing torch and loading tiny models: seconds on a quiet machine, more on a busy one


@dataclass
class Served:
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)  # stderr, as it comes
    _queue: queue.Queue = field(default_factory=queue.Queue)

    def wait_line(self, pattern: str, timeout: float = STARTUP_S) -> str:
        """The first stderr line (already read or to come) that matches `pattern`."""
        for line in self.lines:
            if re.search(pattern, line):
                return line
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"server exited ({self.proc.wait()}) without {pattern!r}: {self.lines}")
            if re.search(pattern, line):
                return line

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def llm_serve(*args: str, env: dict | None = None) -> Iterator[Served]:
    """`llm serve ARGS --port 0` running until the block ends (then SIGTERM; killed if it hangs)."""
    cmd = [sys.executable, "-m", "llm", "serve", *args]
    if "--port" not in args:
        cmd += ["--port", "0"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    served = Served(proc)

    def read():
        for line in proc.stderr:
            served.lines.append(line.rstrip("\n"))
            served._queue.put(line)
        served._queue.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = served.wait_line(r"listening on http://")
        served.url = re.search(r"(http://\S+) with", line).group(1)
        yield served
    finally:
        try:
            served.stop(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
