"""One pass of the generation engine: new tokens for a set of cache rows, through prelude, core and coda.

Everything runs on the model's step interface (``embed`` / ``step`` / ``decode``) with a :class:`KVCache`
attached to the attention context. A pass feeds new tokens for a set of rows:

* embed them (the prelude writes its cache entries), start their states, run the core (:meth:`LoopLM.recur`);
* with an exit rule or per-row loop budgets (single-token passes), rows leave after the iteration their rule fires
  or their budget ends (their state is kept) and the remaining rows are **compacted**: later iterations compute only
  active rows (:class:`~loopformer.inference.exits.RowExitRule`);
* decode every row's final state once (the coda writes its entries); the caller commits the new columns.

Initial states are a fixed function of the token's position (a table drawn once from ``state_seed``), so a row's
result does not depend on its batch, on padding or on how tokens are grouped into passes (speculative decoding).
Warm start ("continuous compute") instead starts each new token from the final state of the row's previous token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopformer.errors import InputError
from loopformer.hardware import resolve_dtype
from loopformer.inference.cache import KVCache
from loopformer.inference.compiled import CompiledDecoder, CompileNotice, reads_full_depth
from loopformer.inference.exits import ExitRule, RowExitRule
from loopformer.inference.generation import GenerationConfig
from loopformer.model import LoopLM
from loopformer.nn.attention import AttentionContext
from loopformer.nn.memory import Memory
from loopformer.tokenizer import TextTokenizer

# rows of the product that decides whether ``auto`` takes bf16 autocast: decoding feeds a few tokens per pass
DTYPE_PROBE_ROWS = 8


@dataclass
class PassResult:
    """What a pass computed for its rows: logits [b, T, V], final states [b, T, D], iterations [b, T]."""

    logits: torch.Tensor
    state: torch.Tensor
    loops: torch.Tensor


class PassRunner:
    """Runs passes for one model (optionally with its tokenizer, whose unknown ids get no probability) in one
    compute dtype: ``auto`` (bf16 autocast where this machine runs it faster, see :mod:`loopformer.hardware`),
    ``fp32`` or ``bf16``; :attr:`dtype_choice` says what it resolved to and why. ``compile_notice`` hears of each
    new compiled graph (:class:`~loopformer.inference.compiled.CompileNotice`)."""

    def __init__(
        self,
        model: LoopLM,
        tokenizer: TextTokenizer | None = None,
        dtype: str = "auto",
        compile_notice: CompileNotice | None = None,
    ) -> None:
        self.model, self.tokenizer, self.compile_notice = model, tokenizer, compile_notice
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
        """Core iterations per token: ``config.loops``, else the exit rule's ``max_loops``, else ``mean_loops``."""
        if config.loops is not None:
            return config.loops
        if isinstance(config.exit, ExitRule) and config.exit.max_loops is not None:
            return config.exit.max_loops
        return self.model.config.recurrence.mean_loops

    def initial_state(self, positions: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Initial latent states [b, T, D] for tokens at ``positions`` [b, T]: zero, or rows of a per-position table
        drawn once from ``seed`` (:meth:`LoopLM.draw_states`)."""
        model, cfg = self.model, self.model.config
        if not model.random_init:
            return torch.zeros((*positions.shape, cfg.dim), device=self.device, dtype=self.state_dtype)
        if seed not in self._noise:
            table = model.draw_states(
                (cfg.max_seq_len, cfg.dim), torch.device("cpu"), torch.Generator().manual_seed(seed)
            )
            self._noise[seed] = table.to(device=self.device, dtype=self.state_dtype)
        return self._noise[seed][positions.clamp(max=cfg.max_seq_len - 1)]

    def run(
        self,
        cache: KVCache,
        rows: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        config: GenerationConfig,
        loops: int,
        real: torch.Tensor | None = None,
        rule: ExitRule | None = None,
        start: torch.Tensor | None = None,
        memory: Memory | None = None,
        budget: torch.Tensor | None = None,
    ) -> PassResult:
        """Feed ``ids`` [b, T] at ``positions`` [b, T] for cache rows ``rows`` at ``loops`` iterations; ``real`` marks
        the real (non-padding) tokens of a prefill, ``start`` replaces the initial states (warm start), ``rule`` is
        the exit rule (T = 1 only), with compaction as in the module docstring.

        ``memory``: the memory vectors of these rows (memory-pathway models). ``budget``: per-row loop counts [b]
        (each <= ``loops``; T = 1 only): a row leaves the pass after its own count, the way an exit leaves it, so
        rows at different depths share one pass (continuous batching). With ``config.compile``, single-token passes at
        a fixed depth run as one compiled graph (:class:`~loopformer.inference.compiled.CompiledDecoder`). The pass
        runs in :attr:`dtype_choice`."""
        with self.dtype_choice.autocast(self.device):
            model = self.model
            kv = cache.begin(rows, positions, real)
            state = self.initial_state(positions, config.state_seed) if start is None else start
            fixed_depth = rule is None and budget is None
            if config.compile and fixed_depth and ids.shape[1] == 1 and reads_full_depth(kv, loops):
                logits, state = self.compiled().run(kv, ids, state, loops, memory)
                return self._result(logits, state, _fixed_steps(ids, loops))
            ctx = AttentionContext.for_positions(model.config, positions, kv.mask, kv)
            e = model.embed(ids, ctx, memory)
            if fixed_depth:
                act = model.act(loops)
                state = model.recur(state, e, ctx, loops, on_state=act).state
                if act is not None:  # an ACT model decodes its halting mixture, capped at the loop budget
                    state = act.latest
                steps = _fixed_steps(ids, loops)
            else:
                if ids.shape[1] != 1:
                    raise InputError("early exit runs on single-token passes (decoding); prefill uses a fixed depth.")
                if rule is None and model.halting is not None:
                    raise InputError(
                        "per-row loop counts on an ACT model need an exit rule (fixed depths mix halting)."
                    )
                exits = RowExitRule(model, rule, budget)
                state, _, steps = model.recur(state, e, ctx, loops, exits=exits, compact=config.compaction)
                steps = steps[:, None]
                kv.freeze(None)  # the final decode writes the coda entries of every row
            return self._result(model.decode(state, ctx), state, steps)

    def _result(self, logits: torch.Tensor, state: torch.Tensor, steps: torch.Tensor) -> PassResult:
        if self.tokenizer is not None and self.tokenizer.vocab_size < logits.shape[-1]:
            logits[..., self.tokenizer.vocab_size :] = float("-inf")  # ids the tokenizer cannot decode
        return PassResult(logits, state, steps)

    def compiled(self) -> CompiledDecoder:
        """The engine's compiled decoder (built on first use; see :mod:`loopformer.inference.compiled`)."""
        if self._compiled is None:
            self._compiled = CompiledDecoder(self.model, self.compile_notice)
        return self._compiled


def _fixed_steps(ids: torch.Tensor, loops: int) -> torch.Tensor:
    """The iterations of every token of a fixed-depth pass: ``loops`` each, shaped like ``ids``."""
    return torch.full(ids.shape, loops, dtype=torch.long, device=ids.device)
