"""The generation engine: prefill, batched decoding with per-row early exit, warm start, streaming, scoring.

Everything runs on the model's step interface (``embed`` / ``step`` / ``decode``) with a :class:`KVCache`
attached to the attention context. One *pass* feeds new tokens for a set of rows:

* embed them (the prelude writes its cache entries), start their states, run the core;
* with an exit rule (single-token passes), check the rule after every iteration; rows that exit leave the batch
  (their state is kept) and the remaining rows are **compacted**: later iterations compute only active rows;
* decode every row's final state once (the coda writes its entries), commit the new columns.

Initial states are a fixed function of the token's position (a table drawn once from ``state_seed``), so a row's
result does not depend on its batch, on padding or on how tokens are grouped into passes (speculative decoding).
Warm start ("continuous compute") instead starts each new token from the final state of the row's previous token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from loopformer.errors import InputError
from loopformer.hardware import resolve_dtype
from loopformer.inference.cache import KVCache, SlotPolicy, parse_slot_policy
from loopformer.inference.compiled import CompiledDecoder, compile_blocker, reads_full_depth
from loopformer.inference.exits import ExitRule, ExitTracker, check_halting, parse_exit_rule
from loopformer.inference.sampling import SamplingConfig, choose_tokens
from loopformer.inference.text import TextStream
from loopformer.model import LoopLM, check_token_ids
from loopformer.nn.attention import AttentionContext
from loopformer.nn.memory import Memory, as_memory
from loopformer.training.tokenizer import TextTokenizer

# loops per token beyond which a config is refused unless forced: states stay finite far past it (tested to 4096),
# but the time grows linearly, so a typo (100000) would run for minutes per token
MAX_LOOPS = 4096
# rows of the product that decides whether ``auto`` takes bf16 autocast: decoding feeds a few tokens per pass
DTYPE_PROBE_ROWS = 8


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """What one generation call does. ``loops`` is the core iteration count per token (the ceiling when an
    ``exit`` rule is set); None means the model's ``mean_steps``.

    ``exit``: a rule or ``"criterion[:threshold]"`` (see :mod:`loopformer.inference.exits`); ``kv``: ``full``,
    ``last`` or ``ring:K``; ``warm_start``: continuous compute; ``speculative``: ``(draft_loops, lookahead)``;
    ``stop_tokens``: None means the tokenizer's end-of-sequence token; ``compaction=False`` keeps exited rows in
    the batch (masked) and exists to measure what compaction saves. ``compile``: run single-token passes at a fixed
    depth as one compiled graph (:mod:`loopformer.inference.compiled`; the first pass at each loop count compiles).
    ``force``: allow ``loops`` above :data:`MAX_LOOPS`.
    """

    max_new_tokens: int = 64
    loops: int | None = None
    exit: ExitRule | str | None = None
    kv: SlotPolicy | str = "full"
    warm_start: bool = False
    speculative: tuple[int, int] | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_tokens: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    state_seed: int = 0
    compaction: bool = True
    compile: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.max_new_tokens, "max_new_tokens")
        if self.loops is not None:
            _positive_int(self.loops, "loops")
            if self.loops > MAX_LOOPS and not self.force:
                raise InputError(
                    f"loops {self.loops} is above the limit of {MAX_LOOPS:,} per token (each loop runs the whole "
                    "core); set force=True (--force on generate and chat) to run it anyway."
                )
        if isinstance(self.exit, str):
            object.__setattr__(self, "exit", parse_exit_rule(self.exit))
        object.__setattr__(self, "kv", parse_slot_policy(self.kv))
        if self.speculative is not None:
            if len(self.speculative) != 2:
                raise InputError(f"speculative takes (draft_loops, lookahead), got {self.speculative!r}.")
            _positive_int(self.speculative[0], "the speculative draft loops")
            _positive_int(self.speculative[1], "the speculative lookahead")
            if self.exit is not None:
                raise InputError(
                    "speculative decoding verifies at a fixed depth and cannot be combined with an exit rule."
                )
            if self.warm_start:
                raise InputError("speculative decoding verifies several tokens in one pass and cannot use warm start.")
        if self.compile and self.exit is not None:
            raise InputError("compiled decoding runs a fixed depth and cannot be combined with an exit rule.")
        if not isinstance(self.sampling, SamplingConfig):
            raise InputError("sampling must be a SamplingConfig.")


@dataclass
class Generation:
    """One row's output: the new tokens, the core iterations each took, its text and why it stopped."""

    tokens: list[int]
    steps: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or the context limit)

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / len(self.steps) if self.steps else 0.0


@dataclass
class GenerationResult:
    """All rows of a generation call, with the cache size and (speculative decoding) the acceptance rate."""

    outputs: list[Generation]
    seconds: float
    cache_bytes: int
    acceptance_rate: float | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(o.tokens) for o in self.outputs)

    @property
    def mean_steps(self) -> float:
        steps = [s for o in self.outputs for s in o.steps]
        return sum(steps) / len(steps) if steps else 0.0


@dataclass
class TokenEvent:
    """One generated token of one row, as :meth:`Engine.stream` yields it; ``text`` is the printable delta."""

    row: int
    token: int | None  # None: the row's held-back text released when it finished
    steps: int
    text: str = ""


class Scores(NamedTuple):
    """What :meth:`Engine.score` returns: per position, the next token's log-probability, the argmax, and the
    iterations behind that prediction."""

    log_probs: torch.Tensor
    steps: torch.Tensor
    predictions: torch.Tensor


@dataclass
class PassResult:
    """What a pass computed for its rows: logits [b, T, V], final states [b, T, D], iterations [b, T]."""

    logits: torch.Tensor
    state: torch.Tensor
    steps: torch.Tensor


class Session:
    """The state of one batched generation: cache, histories, each row's next-token logits and final state.

    By default the session allocates its own cache. ``cache`` and ``slots`` instead place its rows in rows
    ``slots`` of a cache shared with other sessions (continuous batching: rows join and leave a running batch,
    and the caller runs the decoding passes of all of them together, see :meth:`store`).
    """

    def __init__(
        self,
        engine: Engine,
        ids: torch.Tensor,
        real: torch.Tensor,
        config: GenerationConfig,
        memory: Memory | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> None:
        self.engine, self.config, self.memory = engine, config, memory
        self.loops = engine.resolve_loops(config)
        batch, width = ids.shape
        if cache is None:
            extra = config.speculative[1] + 1 if config.speculative else 0
            cache = KVCache(
                engine.model.config,
                batch,
                width + config.max_new_tokens + extra,
                config.kv,
                max_steps=self.loops,
                device=ids.device,
                dtype=engine.state_dtype,
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
        self.steps: list[list[int]] = [[] for _ in range(batch)]
        self.finish: list[str] = ["length"] * batch
        tokenizer = engine.tokenizer
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
        result = engine.run_pass(
            self.cache, self.slots, ids, positions, real, self.loops, None, None, config, self.memory_of(rows)
        )
        self.cache.commit(self.slots, torch.full_like(rows, width), result.steps)
        self.logits = result.logits[:, -1].float()
        self.last_state = result.state[:, -1]
        self.pending_steps = result.steps[:, -1].clone()  # iterations behind each row's pending logits
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
        self.steps[row].append(steps)
        self.history[row, self.width + len(self.tokens[row]) - 1] = token
        events = [TokenEvent(row, token, steps, self.streams[row].push(token) if self.streams else "")]
        position = int(self.prompt_lengths[row]) + len(self.tokens[row])
        if self.streams is not None and self.streams[row].stopped:
            self._end(row, "stop")
        elif len(self.tokens[row]) >= self.config.max_new_tokens or position >= self.engine.model.config.max_seq_len:
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
        result = self.engine.run_pass(
            self.cache,
            slots,
            tokens[:, None],
            positions,
            None,
            self.loops,
            self.config.exit,
            start,
            self.config,
            self.memory_of(rows),
        )
        self.cache.commit(slots, torch.ones_like(rows), result.steps)
        self.store(rows, result)

    def store(self, rows: torch.Tensor, result: PassResult) -> None:
        """Keep what a single-token pass computed for ``rows``: next-token logits, final states, iterations."""
        self.logits[rows] = result.logits[:, 0].float()
        self.last_state[rows] = result.state[:, 0]
        self.pending_steps[rows] = result.steps[:, 0]

    def result(self, seconds: float, acceptance_rate: float | None = None) -> GenerationResult:
        outputs = []
        for b in range(len(self.tokens)):
            text = self.streams[b].text if self.streams is not None else None
            outputs.append(Generation(self.tokens[b], self.steps[b], text, self.finish[b]))
        return GenerationResult(outputs, seconds, self.cache.nbytes(), acceptance_rate)


def _check_speculative(config: GenerationConfig, loops: int) -> None:
    """Refuse speculative settings that cannot reproduce plain decoding exactly."""
    draft = config.speculative[0]
    if draft > loops:
        raise InputError(f"the speculative draft runs {draft} loops, more than the {loops} it is verified at.")
    if config.kv.slots(loops) < loops:
        raise InputError(
            f"speculative decoding verifies several tokens in one pass, which is exact only when the KV cache keeps "
            f"every iteration; {config.kv.label} shares slots at {loops} loops (use full or ring:K with K >= {loops})."
        )


class GenerationStream:
    """The events of one generation call; after iterating to the end, :attr:`result` holds the summary."""

    def __init__(
        self,
        engine: Engine,
        prompt: tuple[torch.Tensor, torch.Tensor],
        config: GenerationConfig,
        memory: Memory | None = None,
    ) -> None:
        self.engine, self.prompt, self.config, self.memory = engine, prompt, config, memory
        self.result: GenerationResult | None = None

    @torch.inference_mode()
    def __iter__(self) -> Iterator[TokenEvent]:
        started = time.perf_counter()
        ids, real = self.prompt
        session = Session(self.engine, ids, real, self.config, self.memory)
        yield from self.engine.events(session)
        self.result = session.result(time.perf_counter() - started, session.acceptance_rate)


class Engine:
    """Batched generation, streaming and scoring for a :class:`LoopLM` (optionally with its tokenizer)."""

    def __init__(self, model: LoopLM, tokenizer: TextTokenizer | None = None, dtype: str = "auto") -> None:
        """``dtype``: ``auto`` (bf16 autocast where this machine runs it faster, see :mod:`loopformer.hardware`),
        ``fp32`` or ``bf16``; :attr:`dtype_choice` says what it resolved to and why."""
        if not isinstance(model, LoopLM):
            raise InputError("Engine needs a LoopLM.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.dtype_choice = resolve_dtype(dtype, self.device, (DTYPE_PROBE_ROWS, cfg.dim, cfg.mlp_hidden))
        self._noise: dict[int, torch.Tensor] = {}
        self._compiled: CompiledDecoder | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def state_dtype(self) -> torch.dtype:
        return self.model.tok_emb.weight.dtype

    def resolve_loops(self, config: GenerationConfig) -> int:
        """Core iterations per token: ``config.loops``, else the exit rule's ``max_steps``, else ``mean_steps``."""
        if config.loops is not None:
            return config.loops
        if isinstance(config.exit, ExitRule) and config.exit.max_steps is not None:
            return config.exit.max_steps
        return self.model.config.recurrence.mean_steps

    # ----- states -------------------------------------------------------------------------
    def initial_state(self, positions: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Initial latent states [b, T, D] for tokens at ``positions`` [b, T]: zero, or the seeded position table."""
        cfg = self.model.config
        shape = (*positions.shape, cfg.dim)
        if cfg.state_init == "zero" or cfg.state_init_std == 0:
            return torch.zeros(shape, device=self.device, dtype=self.state_dtype)
        if seed not in self._noise:
            generator = torch.Generator().manual_seed(seed)
            table = torch.empty(cfg.max_seq_len, cfg.dim)
            sd = cfg.state_init_std
            nn.init.trunc_normal_(table, 0.0, sd, -3 * sd, 3 * sd, generator=generator)
            self._noise[seed] = table.to(device=self.device, dtype=self.state_dtype)
        return self._noise[seed][positions.clamp(max=cfg.max_seq_len - 1)]

    # ----- one pass -----------------------------------------------------------------------
    def run_pass(
        self,
        cache: KVCache,
        rows: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor,
        real: torch.Tensor | None,
        loops: int,
        rule: ExitRule | None,
        start: torch.Tensor | None,
        config: GenerationConfig,
        memory: Memory | None = None,
        budget: torch.Tensor | None = None,
    ) -> PassResult:
        """Feed ``ids`` [b, T] for cache rows ``rows``; exits (T = 1 only) and compaction as in the module docstring.

        ``memory``: the memory vectors of these rows (memory-pathway models). ``budget``: per-row loop counts [b]
        (each <= ``loops``; T = 1 only): a row leaves the pass after its own count, the way an exit leaves it, so
        rows at different depths share one pass (continuous batching). With ``config.compile``, single-token passes at
        a fixed depth run as one compiled graph (:class:`~loopformer.inference.compiled.CompiledDecoder`). The pass
        runs in the engine's :attr:`dtype_choice`."""
        with self.dtype_choice.autocast(self.device):
            model = self.model
            kv = cache.begin(rows, positions, real)
            state = self.initial_state(positions, config.state_seed) if start is None else start
            fixed_depth = rule is None and budget is None and memory is None
            if config.compile and fixed_depth and ids.shape[1] == 1 and reads_full_depth(kv, loops):
                logits, state = self.compiled().run(kv, ids, state, loops)
                return self._result(logits, state, torch.full(ids.shape, loops, dtype=torch.long, device=ids.device))
            ctx = AttentionContext.for_positions(model.config, positions, kv.mask, kv)
            e = model.embed(ids, ctx, memory)
            if rule is None and budget is None:
                act = model.act(loops)
                state, _ = model.recur(state, e, ctx, loops, on_state=act)
                if act is not None:  # an ACT model decodes its halting mixture, capped at the loop budget
                    state = act.latest
                steps = torch.full(ids.shape, loops, dtype=torch.long, device=ids.device)
            else:
                if ids.shape[1] != 1:
                    raise InputError("early exit runs on single-token passes (decoding); prefill uses a fixed depth.")
                if rule is None and model.halting is not None:
                    raise InputError(
                        "per-row loop counts on an ACT model need an exit rule (fixed depths mix halting)."
                    )
                state, steps = self._recur_with_exit(state, e, ctx, loops, rule, config.compaction, budget)
                kv.freeze(None)  # the final decode writes the coda entries of every row
            return self._result(model.decode(state, ctx), state, steps)

    def _result(self, logits: torch.Tensor, state: torch.Tensor, steps: torch.Tensor) -> PassResult:
        if self.tokenizer is not None and self.tokenizer.vocab_size < logits.shape[-1]:
            logits[..., self.tokenizer.vocab_size :] = float("-inf")  # ids the tokenizer cannot decode
        return PassResult(logits, state, steps)

    def compiled(self) -> CompiledDecoder:
        """The engine's compiled decoder (built on first use; see :mod:`loopformer.inference.compiled`)."""
        if self._compiled is None:
            self._compiled = CompiledDecoder(self.model)
        return self._compiled

    def _recur_with_exit(
        self,
        state: torch.Tensor,
        e: torch.Tensor,
        ctx: AttentionContext,
        loops: int,
        rule: ExitRule | None,
        compact: bool,
        budget: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterate until each row's rule fires or it reaches its ``budget`` (or ``loops``); exited rows leave the
        batch when ``compact``."""
        model = self.model
        rows = state.shape[0]
        final = state.clone()
        steps = torch.full((rows, 1), loops, dtype=torch.long, device=state.device)
        active = torch.arange(rows, device=state.device)
        done = torch.zeros(rows, dtype=torch.bool, device=state.device)
        tracker = None if rule is None else ExitTracker(rule, halting=model.halting)

        def exit_state(step: int, state: torch.Tensor) -> torch.Tensor:
            return state if tracker is None else tracker.exit_state(step, state)

        for index in range(loops):
            state = model.step(state, e, index, ctx)
            step = index + 1
            if step == loops:
                break
            fired = torch.zeros(len(state), dtype=torch.bool, device=state.device) if budget is None else budget == step
            if tracker is not None and (step + 1 >= rule.min_steps or model.halting is not None):
                logits = model.decode(state, ctx) if tracker.needs_logits else None  # (ACT mixes every iteration)
                fired = fired | tracker.update(step, state, logits)[:, 0]
            elif budget is None:
                continue
            if not compact:
                newly = fired & ~done
                final[newly], steps[newly] = exit_state(step, state)[newly], step
                done |= fired
                ctx.cache.freeze(done)  # exited rows keep computing but no longer write the cache
                if bool(done.all()):
                    return final, steps
                continue
            if not bool(fired.any()):
                continue
            exited = active[fired]
            final[exited], steps[exited] = exit_state(step, state)[fired], step
            keep = (~fired).nonzero().squeeze(1)
            if keep.numel() == 0:
                return final, steps
            active, state, e = active[keep], state[keep], e[keep]
            budget = None if budget is None else budget[keep]
            ctx = ctx.select(keep)
            if tracker is not None:
                tracker.select(keep)
        if compact:
            final[active] = exit_state(loops, state)
        else:
            final[~done] = exit_state(loops, state)[~done]
        return final, steps

    # ----- public API ---------------------------------------------------------------------
    def prepare(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor | str | Sequence[str],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, T] and the real-token mask for prompts given as texts, id lists or a [B, T] tensor.

        With a tensor, ``attention_mask`` [B, T] (1 / True = real token) marks padding, on either side; without
        one every id is a prompt token.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if attention_mask is not None and not isinstance(prompts, torch.Tensor):
            raise InputError("attention_mask goes with a [batch, seq] tensor of prompt ids.")
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise InputError(f"prompt ids must have shape [batch, seq], got {tuple(prompts.shape)}.")
            if attention_mask is not None and attention_mask.shape != prompts.shape:
                raise InputError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; the prompts have {tuple(prompts.shape)}."
                )
            real = torch.ones_like(prompts, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            rows = [[int(t) for t in row[keep]] for row, keep in zip(prompts.cpu(), real.cpu(), strict=True)]
        else:
            rows = []
            for prompt in prompts:
                if isinstance(prompt, str):
                    if self.tokenizer is None:
                        raise InputError(
                            "text prompts need a tokenizer; pass token ids or give the engine a tokenizer."
                        )
                    rows.append(self.tokenizer.encode(prompt))
                else:
                    rows.append([int(t) for t in prompt])
        return self._pad(rows)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        if not rows:
            raise InputError("no prompts were given.")
        for i, row in enumerate(rows):
            where = f"prompt {i}" if len(rows) > 1 else "the prompt"
            if not row:
                raise InputError(f"{where} is empty; give at least one token.")
            if len(row) > cfg.max_seq_len:
                raise InputError(f"{where} has {len(row)} tokens, more than the context of {cfg.max_seq_len}.")
            bad = [t for t in row if not 0 <= t < cfg.vocab_size]
            if bad:
                raise InputError(f"{where} holds token id {bad[0]}, outside the vocabulary 0..{cfg.vocab_size - 1}.")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            real[i, width - len(row) :] = True
        return ids.to(self.device), real.to(self.device)

    def stream(
        self,
        prompts,
        config: GenerationConfig | None = None,
        attention_mask: torch.Tensor | None = None,
        memory: Memory | torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> GenerationStream:
        """Generate for a batch of prompts; iterate the result to get each new token as soon as it is chosen.

        ``memory`` [M, memory_dim] (every prompt) or [B, M, memory_dim] (+ ``memory_mask`` [B, M]) conditions a
        memory-pathway model.
        """
        config = config or GenerationConfig()
        if config.speculative is not None:
            _check_speculative(config, self.resolve_loops(config))  # refused before the caller prints anything
        check_halting(config.exit, self.model.halting)
        self._check_compile(config, memory)
        ids, real = self.prepare(prompts, attention_mask)
        return GenerationStream(self, (ids, real), config, self._memory(memory, memory_mask, ids.shape[0]))

    def generate(
        self,
        prompts,
        config: GenerationConfig | None = None,
        attention_mask: torch.Tensor | None = None,
        memory: Memory | torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts: texts, id lists, or a [B, T] tensor with its ``attention_mask``;
        ``memory`` as in :meth:`stream`."""
        stream = self.stream(prompts, config, attention_mask, memory, memory_mask)
        for _ in stream:
            pass
        return stream.result

    def events(self, session: Session) -> Iterator[TokenEvent]:
        """Decode ``session`` to the end, one event per generated token."""
        from loopformer.inference.speculative import speculative_events

        if session.config.speculative is not None:
            yield from speculative_events(session)
            return
        while bool(session.alive.any()):
            rows = session.alive_rows
            tokens = session.choose(rows)
            steps = session.pending_steps[rows].tolist()
            for j, row in enumerate(rows.tolist()):
                yield from session.accept(row, int(tokens[j]), steps[j])
            keep = session.alive[rows]
            if bool(keep.any()):
                session.feed(rows[keep], tokens[keep])

    def _check_compile(self, config: GenerationConfig, memory: object) -> None:
        """Refuse ``compile=True`` where compiled decoding cannot run (before anything is generated)."""
        if not config.compile:
            return
        blocker = compile_blocker(self.model)
        if blocker is not None:
            raise InputError(blocker)
        if memory is not None:
            raise InputError("compiled decoding does not read memory vectors; generate without compile.")

    def _memory(self, memory: Memory | torch.Tensor | None, mask: torch.Tensor | None, batch: int) -> Memory | None:
        checked = as_memory(memory, batch, self.model.config.memory_dim, mask)
        return None if checked is None else checked.to(self.device)

    @torch.inference_mode()
    def score(
        self,
        ids: torch.Tensor,
        config: GenerationConfig | None = None,
        memory: Memory | torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> Scores:
        """Teacher-forced scoring token by token, with the config's exits, warm start and KV policy.

        ``ids`` [B, T] (rows of equal length). Returns the log-probability of each next token and the model's
        argmax there ([B, T - 1] each), and the core iterations spent on each fed token ([B, T - 1]; the first
        token is prefilled at the full depth, the last one is not fed).
        """
        config = config or GenerationConfig()
        self._check_compile(config, memory)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise InputError("score needs ids of shape [batch, seq] with seq >= 2.")
        check_token_ids(ids, self.model.config.vocab_size)
        prefix = ids[:, :1]
        session = Session(
            self,
            prefix,
            torch.ones_like(prefix, dtype=torch.bool),
            _scoring(config, ids.shape[1]),
            self._memory(memory, memory_mask, ids.shape[0]),
        )
        rows = torch.arange(ids.shape[0], device=ids.device)
        log_probs, predictions = [], []
        steps = [torch.full((ids.shape[0],), session.loops, dtype=torch.long, device=ids.device)]
        for t in range(1, ids.shape[1]):
            log_probs.append(torch.log_softmax(session.logits, dim=-1).gather(1, ids[:, t : t + 1])[:, 0])
            predictions.append(session.logits.argmax(dim=-1))
            if t + 1 < ids.shape[1]:
                session.feed(rows, ids[:, t])
                steps.append(session.pending_steps.clone())
        return Scores(torch.stack(log_probs, dim=1), torch.stack(steps, dim=1), torch.stack(predictions, dim=1))


def _scoring(config: GenerationConfig, length: int) -> GenerationConfig:
    """The config with room for ``length`` tokens and no stop conditions (scoring feeds given tokens)."""
    if config.speculative is not None:
        raise InputError("scoring feeds given tokens; speculative decoding does not apply.")
    return replace(config, max_new_tokens=max(length, 1), stop_tokens=(), stop_strings=())


def perplexity(log_probs: torch.Tensor) -> float:
    """exp of the mean negative log-probability."""
    return math.exp(-float(log_probs.float().mean()))
