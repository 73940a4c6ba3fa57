"""One batched generation in progress: its cache rows, histories, stop conditions and text streams."""

from __future__ import annotations

import torch

from loopformer.errors import InputError
from loopformer.inference.cache import KVCache
from loopformer.inference.generation import Generation, GenerationConfig, GenerationResult, TokenEvent
from loopformer.inference.passes import PassResult, PassRunner
from loopformer.inference.sampling import choose_tokens
from loopformer.inference.text import TextStream
from loopformer.nn.memory import Memory


class Session:
    """The state of one batched generation: cache, histories, each row's next-token logits and final state.

    By default the session allocates its own cache. ``cache`` and ``slots`` instead place its rows in rows
    ``slots`` of a cache shared with other sessions (continuous batching: rows join and leave a running batch,
    and the caller runs the decoding passes of all of them together, see :meth:`store`). With ``keep_prompt_logits``,
    :attr:`prompt_logits` holds the prefill's logits [B, T - 1, V] at every prompt position but the last (they score
    prompt tokens 1 .. T - 1; padding positions included) until the caller drops them; otherwise it is None.
    """

    def __init__(
        self,
        passes: PassRunner,
        ids: torch.Tensor,
        real: torch.Tensor,
        config: GenerationConfig,
        memory: Memory | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        keep_prompt_logits: bool = False,
    ) -> None:
        self.passes, self.config, self.memory = passes, config, memory
        self.loops = passes.resolve_loops(config)
        batch, width = ids.shape
        if cache is None:
            extra = min(config.speculative[1], config.max_new_tokens) + 1 if config.speculative else 0
            cache = KVCache(
                passes.model.config,
                batch,
                width + config.max_new_tokens + extra,
                config.kv,
                max_loops=self.loops,
                device=ids.device,
                dtype=passes.state_dtype,
            )
            slots = torch.arange(batch, device=ids.device)
        elif slots is None or slots.shape != (batch,) or config.speculative is not None:
            raise InputError("a session in a shared cache needs one slot per row and no speculative decoding.")
        self.cache, self.slots = cache, slots
        # prompt (padding = -1) followed by room for every generated token: what the repetition penalty sees
        self.history = torch.cat((torch.where(real, ids, -1), ids.new_full((batch, config.max_new_tokens), -1)), 1)
        self.width = width
        self.prompt_lengths = real.sum(dim=1)
        self.alive = torch.ones(batch, dtype=torch.bool, device=ids.device)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.row_loops: list[list[int]] = [[] for _ in range(batch)]
        self.finish: list[str] = ["length"] * batch
        tokenizer = passes.tokenizer
        self.streams: list[TextStream] | None = None
        if tokenizer is not None:
            self.streams = [
                TextStream(tokenizer.decode, config.stop_strings, prefix_ids=[int(t) for t in ids[b][real[b]]])
                for b in range(batch)
            ]
        elif config.stop_strings:
            raise InputError("stop strings need a tokenizer (load the checkpoint with its tokenizer).")
        stop = config.stop_tokens
        self.stop_tokens = set(stop if stop is not None else ([tokenizer.eos_id] if tokenizer else []))
        seed = config.sampling.seed
        self.generator = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
        rows = torch.arange(batch, device=ids.device)
        positions = (real.long().cumsum(dim=1) - 1).clamp_min(0)
        result = passes.run(
            self.cache,
            self.slots,
            ids,
            positions,
            config=config,
            loops=self.loops,
            real=real,
            memory=self.memory_of(rows),
        )
        self.cache.commit(self.slots, torch.full_like(rows, width), result.loops)
        self.logits = result.logits[:, -1].to(torch.float32, copy=True)  # not a view holding every prefill position
        self.prompt_logits = result.logits[:, :-1] if keep_prompt_logits else None
        self.last_state = result.state[:, -1]
        self.pending_steps = result.loops[:, -1].clone()  # iterations behind each row's pending logits
        self.acceptance_rate: float | None = None

    def memory_of(self, rows: torch.Tensor) -> Memory | None:
        """The memory vectors of ``rows`` (None without memory)."""
        return None if self.memory is None else self.memory.select(rows)

    @property
    def alive_rows(self) -> torch.Tensor:
        return self.alive.nonzero().squeeze(1)

    def choose(self, rows: torch.Tensor) -> torch.Tensor:
        """Next token of each row in ``rows`` from its pending logits."""
        return choose_tokens(self.logits[rows], self.config.sampling, self.history[rows], self.generator)

    def accept(self, row: int, token: int, steps: int) -> list[TokenEvent]:
        """Append a generated token to ``row``; returns its events (none when a stop token swallowed it, and a
        last text event when the row finished with text still held back)."""
        if token in self.stop_tokens:
            self._end(row, "stop")
            return self._flush(row, [])
        self.tokens[row].append(token)
        self.row_loops[row].append(steps)
        self.history[row, self.width + len(self.tokens[row]) - 1] = token
        events = [TokenEvent(row, token, steps, self.streams[row].push(token) if self.streams else "")]
        position = int(self.prompt_lengths[row]) + len(self.tokens[row])
        if self.streams is not None and self.streams[row].stopped:
            self._end(row, "stop")
        elif len(self.tokens[row]) >= self.config.max_new_tokens or position >= self.passes.model.config.max_seq_len:
            self._end(row, "length")
        return self._flush(row, events)

    def _flush(self, row: int, events: list[TokenEvent]) -> list[TokenEvent]:
        if self.streams is not None and not self.alive[row]:
            tail = self.streams[row].finish()
            if tail:
                events.append(TokenEvent(row, None, 0, tail))
        return events

    def _end(self, row: int, reason: str) -> None:
        self.alive[row] = False
        self.finish[row] = reason

    def feed(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Run one single-token pass for ``rows`` and store their next-token logits and final states."""
        slots = self.slots[rows]
        positions = self.cache.next_positions(slots)[:, None]
        start = self.last_state[rows][:, None] if self.config.warm_start else None
        result = self.passes.run(
            self.cache,
            slots,
            tokens[:, None],
            positions,
            config=self.config,
            loops=self.loops,
            rule=self.config.exit,
            start=start,
            memory=self.memory_of(rows),
        )
        self.cache.commit(slots, torch.ones_like(rows), result.loops)
        self.store(rows, result)

    def store(self, rows: torch.Tensor, result: PassResult) -> None:
        """Keep what a single-token pass computed for ``rows``: next-token logits, final states, iterations."""
        self.logits[rows] = result.logits[:, 0].float()
        self.last_state[rows] = result.state[:, 0]
        self.pending_steps[rows] = result.loops[:, 0]

    def result(self, seconds: float, acceptance_rate: float | None = None) -> GenerationResult:
        outputs = []
        for b in range(len(self.tokens)):
            text = self.streams[b].text if self.streams is not None else None
            outputs.append(Generation(self.tokens[b], self.row_loops[b], text, self.finish[b]))
        return GenerationResult(outputs, seconds, self.cache.nbytes(), acceptance_rate)
