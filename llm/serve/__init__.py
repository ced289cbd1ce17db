"""`llm serve`: the project's models behind an OpenAI-compatible HTTP API and a web page.

One process holds one copy of each model given with `--model` (loaded by `llm.checkpoint.load_checkpoint`
or, for a spam classifier, `llm.classifier.load_classifier`, the loaders of `llm generate` and
`llm classify`) and serves, with FastAPI on uvicorn:

- `GET /v1/models`, `GET /health`;
- `POST /v1/completions` (language models), `POST /v1/chat/completions` (instruction-finetuned models,
  the prompt style their checkpoint recorded), streamed as server-sent events with `"stream": true`;
- `POST /v1/classify` (an extension) for classifiers;
- `GET /`: a page to try them (`index.html`, plain HTML and JavaScript, nothing fetched from elsewhere).

Concurrency: a fair queue and continuous batching (`llm.serve.scheduler`). Every model step runs on one
worker thread, first in, first out. The requests generating with one model are the rows of that model's
batch (`llm.generate.Batch`): one step gives every row its next token in one forward, new requests join
between steps (their prompts prefilled together) and finished ones leave, so N requests stream at once
and share the cost of each step (16 clients get 3.8x the tokens/s of one: docs/serving.md, Under load).
A classification step (a batch of 32 messages) and other models' steps queue between a batch's steps,
so a long list to classify does not hold back a short completion.
Each row follows `llm generate`'s steps for its prompt alone, with its own settings and seed: a lone request
gets `llm generate`'s very logits; among others, its logits are equal to rounding, so a greedy answer can
differ from `llm generate`'s where two tokens tie to within that rounding (measured: docs/performance.md).
At most `max_active` requests take turns, and a model's batch holds at most `max_batch` of them (the others
wait for a row); up to `max_queue` more wait for a turn; beyond that a request is answered 503 with
`Retry-After`; a classification sends at most `max_classify_inputs` messages. A client that disconnects
stops its generation at the next step (its classification at the next batch) and frees its turn.

The page and each endpoint are described in the README (section "Serving the models").
"""
