"""What the routes share: the models by name, the scheduler (the fair queue) and the limits. `create_app`
keeps them on `app.state`; a route names them as parameters (`models: ModelsDep`) and FastAPI hands them over."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from llm.bounds import MAX_CLASSIFY_INPUTS, STALL_TIMEOUT
from llm.serve.registry import ServedModel
from llm.serve.scheduler import Scheduler


@dataclass(frozen=True)
class Limits:
    max_active: int = 32  # requests taking turns on the worker
    max_queue: int = 32  # requests waiting for a turn; more are answered 503
    max_tokens: int = 1024  # the most tokens one request may ask for
    max_body_bytes: int = 1_000_000  # a larger request body is answered 413
    max_classify_inputs: int = MAX_CLASSIFY_INPUTS  # the most messages one /v1/classify request may send
    stall_timeout: float = STALL_TIMEOUT  # seconds one model step may run before /health says "stalled" (503)
    max_batch: int = 32  # the most generations of one model that one step decodes together


# async: FastAPI runs a plain `def` dependency on a thread, which reading an attribute does not need
async def _models(request: Request) -> Mapping[str, ServedModel]:
    return request.app.state.models


async def _scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


async def _limits(request: Request) -> Limits:
    return request.app.state.limits


ModelsDep = Annotated[Mapping[str, ServedModel], Depends(_models)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
LimitsDep = Annotated[Limits, Depends(_limits)]
