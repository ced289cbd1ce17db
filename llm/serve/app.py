"""The ASGI app: OpenAI-compatible endpoints over the loaded models, the fair queue, the limits, the page.

Where each piece lives:

- `llm.serve.routes`: the endpoints (on FastAPI routers) and the checks each request gets;
- `llm.serve.streaming`: a request's generation, streamed as server-sent events or collected (`respond`);
- `llm.serve.errors`: every error as OpenAI's JSON body, and the handler of each exception;
- `llm.serve.middleware`: the API key and the body limit, before any route;
- `llm.serve.state`: the limits, and how a route reaches the models, the scheduler and the limits;
- `llm.serve.scheduler`: the fair queue; `llm.serve.registry`: the models; `llm.serve.server`: uvicorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from llm.serve.errors import HANDLERS
from llm.serve.middleware import Gate
from llm.serve.registry import ServedModel
from llm.serve.routes import api, page
from llm.serve.scheduler import Scheduler
from llm.serve.state import Limits

__all__ = ["Limits", "create_app"]  # Limits lives in llm.serve.state; `llm serve` builds it from here


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The scheduler runs while the server does: started in its event loop, stopped after the drain."""
    app.state.scheduler.start()
    yield
    app.state.scheduler.close()


def create_app(models: Mapping[str, ServedModel], api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The app over `models` (by name, `llm.serve.registry.load_models`)."""
    limits = limits or Limits()
    app = FastAPI(
        title="llm serve",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        exception_handlers=HANDLERS,
    )
    app.state.models, app.state.limits = models, limits
    app.state.scheduler = Scheduler(limits.max_active, limits.max_queue, limits.max_batch)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.include_router(page)
    app.include_router(api)
    return app
