"""`llm serve`: the project's models behind an OpenAI-compatible HTTP API and a web page.

One process holds one copy of each model given with `--model` (loaded by `llm.checkpoint.load_checkpoint`
or, for a spam classifier, `llm.classifier.load_classifier`, the loaders of `llm generate` and
`llm classify`) and serves, with FastAPI on uvicorn:

- `GET /v1/models`, `GET /health`;
- `POST /v1/completions` (language models), `POST /v1/chat/completions` (instruction-finetuned models,
  the prompt style their checkpoint recorded), streamed as server-sent events with `"stream": true`;
- `POST /v1/classify` (an extension) for classifiers;
- `GET /`: a page to try them (`index.html`, plain HTML and JavaScript, nothing fetched from elsewhere).

Concurrency: a fair queue, token by token (`llm.serve.scheduler`). Every generation step (one
token of one request, through its own KV cache) and every classification step (a batch of 32 messages)
runs on one worker thread, whose tasks are taken first in, first out; a request submits its next step
only when the previous one is done, so N requests in flight take turns one step each and all stream at
once, and a long list to classify does not hold back a short completion. This is not
batching: the book's KV cache keeps one position for the whole batch, so prompts of different lengths
would need padding masks the model does not have, and a request in a batch would no longer give the
tokens `llm generate` gives. Round-robin keeps every request's output exactly what `llm generate`
(`llm instruct`) would print, lets a short request finish while a long one runs, and costs one thread
hand-off per token. At most `max_active` requests take turns; up to `max_queue` more wait for a turn;
beyond that a request is answered 503 with `Retry-After`; a classification sends at most
`max_classify_inputs` messages. A client that disconnects stops its generation at the next token (its
classification at the next batch) and frees its turn.

The page and each endpoint are described in the README (section "Serving the models").
"""
