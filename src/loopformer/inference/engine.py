"""The generation engine: the public facade over passes and sessions (prepare prompts, generate, stream, score).

A pass (:mod:`loopformer.inference.passes`) feeds new tokens for a set of cache rows; a session
(:mod:`loopformer.inference.session`) is one batched generation; :class:`Engine` pads prompts, runs a session's
decoding loop (plain, or self-speculative: :mod:`loopformer.inference.speculative`) and scores given text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from loopformer.errors import InputError
from loopformer.hardware import DtypeChoice
from loopformer.inference.compiled import CompileNotice, compile_blocker
from loopformer.inference.exits import check_halting
from loopformer.inference.generation import GenerationConfig, GenerationResult, Scores, TokenEvent
from loopformer.inference.passes import PassRunner
from loopformer.inference.session import Session
from loopformer.inference.speculative import speculative_events
from loopformer.model import LoopLM, check_token_ids
from loopformer.nn.memory import Memory, as_memory
from loopformer.tokenizer import TextTokenizer


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
        session = Session(self.engine.passes, ids, real, self.config, self.memory)
        yield from self.engine.events(session)
        self.result = session.result(time.perf_counter() - started, session.acceptance_rate)


class Engine:
    """Batched generation, streaming and scoring for a :class:`LoopLM` (optionally with its tokenizer)."""

    def __init__(
        self,
        model: LoopLM,
        tokenizer: TextTokenizer | None = None,
        dtype: str = "auto",
        compile_notice: CompileNotice | None = None,
    ) -> None:
        """``dtype``: ``auto`` (bf16 autocast where this machine runs it faster, see :mod:`loopformer.hardware`),
        ``fp32`` or ``bf16``; :attr:`dtype_choice` says what it resolved to and why. :attr:`passes` runs the
        passes (:mod:`loopformer.inference.passes`). ``compile_notice(shape, seconds)`` hears of every first
        compiled call at a new shape, before (``seconds`` None) and after it compiled
        (:class:`~loopformer.inference.compiled.CompileNotice`)."""
        if not isinstance(model, LoopLM):
            raise InputError("Engine needs a LoopLM.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.passes = PassRunner(self.model, tokenizer, dtype, compile_notice)

    @property
    def device(self) -> torch.device:
        return self.passes.device

    @property
    def dtype_choice(self) -> DtypeChoice:
        return self.passes.dtype_choice

    def resolve_loops(self, config: GenerationConfig) -> int:
        """Core iterations per token (see :meth:`PassRunner.resolve_loops`)."""
        return self.passes.resolve_loops(config)

    def initial_state(self, positions: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Initial latent states for tokens at ``positions`` (see :meth:`PassRunner.initial_state`)."""
        return self.passes.initial_state(positions, seed)

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
        self._check_compile(config)
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

    def _check_compile(self, config: GenerationConfig) -> None:
        """Refuse ``compile=True`` where compiled decoding cannot run (before anything is generated)."""
        if not config.compile:
            return
        blocker = compile_blocker(self.model)
        if blocker is not None:
            raise InputError(blocker)

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
        self._check_compile(config)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise InputError("score needs ids of shape [batch, seq] with seq >= 2.")
        check_token_ids(ids, self.model.config.vocab_size)
        prefix = ids[:, :1]
        session = Session(
            self.passes,
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
