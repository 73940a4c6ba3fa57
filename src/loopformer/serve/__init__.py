"""An OpenAI-compatible HTTP server for looped models, with per-request thinking depth and continuous batching.

Modules: :mod:`~loopformer.serve.settings` (server limits), :mod:`~loopformer.serve.schemas` (request bodies),
:mod:`~loopformer.serve.plans` (a request -> prompts and generation settings), :mod:`~loopformer.serve.prompts`
(chat messages and tools -> the model's chat format), :mod:`~loopformer.serve.parsing` (``<think>`` and
``<tool_call>`` in replies), :mod:`~loopformer.serve.scheduler` and :mod:`~loopformer.serve.lanes` (continuous
batching), :mod:`~loopformer.serve.runs` (one request's rows as asyncio events), :mod:`~loopformer.serve.responses`
(OpenAI response and chunk bodies), :mod:`~loopformer.serve.metrics` (Prometheus text), :mod:`~loopformer.serve.guard`
(API key and body size), :mod:`~loopformer.serve.errors` and :mod:`~loopformer.serve.app` (the FastAPI routes).
FastAPI and uvicorn come with the ``serve`` extra; nothing else in the library imports this package.
"""
