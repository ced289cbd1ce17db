"""The fair queue: one worker thread runs every model step, first in, first out; a bounded number of
requests take turns on it and a bounded number wait for a turn (see `llm.serve`'s docstring). The
requests generating with one model are rows of that model's `Batcher`: one step gives each its next token.
The scheduler also records what the worker runs and since when (a batch step too), so that /health tells a
stalled worker (one step running past the stall timeout) from a healthy one (`Scheduler.health`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from llm.generate import Batch, Row

T = TypeVar("T")


class QueueFull(Exception):
    """Every turn is taken and the waiting line is full: the request is answered 503."""


class Scheduler:
    """`reserve()` admits a request (QueueFull when `max_active` run and `max_queue` wait);
    `run(fn)` runs one step on the worker thread and returns its result; `batcher(model, context_size)` is
    the batch of that model's generations, at most `max_batch` rows."""

    def __init__(
        self,
        max_active: int = 32,
        max_queue: int = 32,
        max_batch: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_active < 1 or max_queue < 0 or max_batch < 1:
            raise ValueError("max_active and max_batch must be >= 1 and max_queue >= 0")
        self.max_active, self.max_queue, self.max_batch = max_active, max_queue, max_batch
        self._batchers: dict[int, Batcher] = {}
        self.active = 0  # requests holding a turn
        self.waiting = 0  # requests waiting for one
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "tokens": 0}
        self.clock = clock  # seconds, for the steps' ages
        self.steps = 0  # steps the worker finished
        # Written by the worker thread, read by /health (one assignment each: no lock needed).
        self._step: tuple[str, float] | None = None  # what the worker runs now, and when it began
        self._last_end: float | None = None  # when it last finished a step
        self._turns: asyncio.Semaphore | None = None  # made in the server's event loop
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-serve")
        self._closed = False

    def reserve(self) -> Ticket:
        """Admit a request to the waiting line (QueueFull when it is full); `Ticket.turn()` then waits for a
        turn and `Ticket.release()` gives back whatever the ticket holds."""
        if self.active + self.waiting >= self.max_active + self.max_queue:
            self.counts["rejected"] += 1
            raise QueueFull
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.max_active)
        self.waiting += 1
        return Ticket(self)

    async def run(self, fn: Callable[..., T], *args: Any, what: str = "a step") -> T:
        """`fn(*args)` on the worker thread; `what` names the step in /health while it runs. Steps of
        different requests take turns there."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._step_of, what, fn, *args)

    def batcher(self, model, context_size: int, name: str = "a model") -> Batcher:
        """The batch of the generations of `model` (one per model, made at its first request); `name`
        names its steps in /health."""
        batcher = self._batchers.get(id(model))
        if batcher is None:
            batcher = self._batchers[id(model)] = Batcher(self, model, context_size, name)
        return batcher

    def later(self, fn: Callable[..., Any], *args: Any, what: str = "a cleanup") -> None:
        """Run `fn(*args)` on the worker thread after what is queued there, without waiting (closing
        a generator whose step may still be running); here at once when the worker has stopped, and
        not at all while a closed worker still runs a step (the server exits without it, see `join`)."""
        try:
            self._worker.submit(self._step_of, what, fn, *args)
        except RuntimeError:  # closed: nothing more runs there
            if self.join(0):
                fn(*args)

    def _step_of(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, recorded as the worker's current step while it runs (on the worker thread)."""
        self._step = (what, self.clock())
        try:
            return fn(*args)
        finally:
            self._step, self._last_end = None, self.clock()
            self.steps += 1

    def stats(self) -> dict[str, int]:
        return {"active": self.active, "queued": self.waiting, **self.counts}

    def health(self, stall_timeout: float) -> dict[str, Any]:
        """The worker's state for /health: "status" "stalled" while one step has run longer than
        `stall_timeout` seconds (a model call that does not return: nothing else can run), else "ok";
        the step running now (`step`, null when idle) and its age (`step_seconds`), the seconds since
        the worker last finished a step (`last_step_seconds`, null before the first) and the steps done."""
        step, last, now = self._step, self._last_end, self.clock()
        age = now - step[1] if step is not None else 0.0
        return {
            "status": "stalled" if age > stall_timeout else "ok",
            "step": step[0] if step is not None else None,
            "step_seconds": round(age, 3),
            "stall_timeout": stall_timeout,
            "last_step_seconds": round(now - last, 3) if last is not None else None,
            "steps": self.steps,
        }

    def start(self) -> None:
        """Ready to serve in the running event loop (the app's startup; a test client may start it again)."""
        self._turns = asyncio.Semaphore(self.max_active - self.active)
        if self._closed:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-serve")
            self._closed = False

    def close(self) -> None:
        """Stop the worker once the steps queued there are done, without waiting for them (the app's
        shutdown, after the drain): `join` waits, as long as the stop allows."""
        self._worker.shutdown(wait=False)
        self._closed = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: as long as it takes) for the closed worker to finish its
        steps; False when one still runs. A thread cannot be stopped from outside: the server exits
        without it (`llm.serve.server.serve`)."""
        threads = list(self._worker._threads)  # the executor's one thread, once it ran a step
        for thread in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in threads)


class Ticket:
    """A request's place: waiting, then holding a turn (`turn()`), then done (`release()`, idempotent).
    The ticket counts the request in /health once it is released: "completed" when `complete()` was
    called, else "cancelled" (its client left, waiting or answered in part, or the server stopped)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.state = scheduler, "waiting"
        self.completed = False

    def complete(self) -> None:
        """The request got its whole answer."""
        self.completed = True

    async def turn(self) -> None:
        await self.scheduler._turns.acquire()  # cancelled while waiting: still "waiting", released below
        self.scheduler.waiting -= 1
        self.scheduler.active += 1
        self.state = "active"

    def release(self) -> None:
        if self.state == "done":
            return
        if self.state == "waiting":
            self.scheduler.waiting -= 1
        else:
            self.scheduler.active -= 1
            self.scheduler._turns.release()
        self.scheduler.counts["completed" if self.completed else "cancelled"] += 1
        self.state = "done"


class Batcher:
    """The requests generating with one model, as rows of one `llm.generate.Batch`: a step on the worker
    gives every row its next token, and rows join (`join`) and leave (`leave`) between steps. The steps run
    while a row is in flight, one at a time, so a classification's batches and other models' steps queue
    between them on the worker, first in, first out."""

    def __init__(self, scheduler: Scheduler, model, context_size: int, name: str = "a model"):
        self.scheduler, self.model, self.context_size, self.name = scheduler, model, context_size, name
        self.batch = Batch(model, context_size, scheduler.max_batch)
        self._inbox: dict[Row, asyncio.Queue] = {}  # each row in flight: where its tokens go
        self._joining: list[Row] = []
        self._leaving: list[Row] = []
        self._task: asyncio.Task | None = None

    def join(self, row: Row) -> asyncio.Queue:
        """Add `row` at the next step. Its tokens arrive in the queue returned, then None when it finished
        (at `eos_id` or its `max_new_tokens`); the exception instead where a step failed."""
        queue: asyncio.Queue = asyncio.Queue()
        self._inbox[row] = queue
        self._joining.append(row)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:  # (a test's new loop)
            self._task = loop.create_task(self._steps())
        return queue

    def leave(self, row: Row) -> None:
        """Stop `row` at the next step (its client went away, or a stop sequence ended its text); nothing
        for a row that finished."""
        if self._inbox.pop(row, None) is not None:
            self._leaving.append(row)

    async def _steps(self) -> None:
        while self._inbox:
            joining, self._joining = self._joining, []
            leaving, self._leaving = self._leaving, []
            try:
                events = await self.scheduler.run(self._step, joining, leaving, what=self._what(joining))
            except Exception as exc:  # every row in flight gets it; the next rows start a new batch
                for queue in self._inbox.values():
                    queue.put_nowait(exc)
                self._inbox.clear()
                self._joining, self._leaving = [], []
                self.batch = Batch(self.model, self.context_size, self.scheduler.max_batch)
                return
            for row, token in events:
                queue = self._inbox.get(row)
                if queue is not None:
                    queue.put_nowait(token)
                    if token is None:
                        del self._inbox[row]

    def _what(self, joining: list[Row]) -> str:
        """The next step, as /health names it while it runs: how many rows it steps (those in flight, at
        most the batch's places) and how many of them join the batch in it (prefilled first)."""
        rows = min(len(self._inbox), self.batch.max_rows)
        text = f"{self.name}: a batch step of {rows} row{'' if rows == 1 else 's'}"
        return text + (f", {len(joining)} joining" if joining else "")

    def _step(self, joining: list[Row], leaving: list[Row]) -> list[tuple[Row, int | None]]:
        """On the worker: the rows that came and went since the last step, then one step."""
        for row in joining:
            self.batch.add(row)
        for row in leaving:
            self.batch.cancel(row)
        return self.batch.step()
