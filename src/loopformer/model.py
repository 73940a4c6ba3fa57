"""LoopLM: a recurrent-depth transformer LM behind a step-level interface.

    e   = model.embed(ids, ctx)            prelude, then the input side of the injection (once)
    s   = model.init_state(e, generator)   truncated normal (seeded) or zero
    s   = model.step(s, e, i, ctx)         one core iteration i: injection -> loop signals -> core layers
    out = model.decode(s, ctx)             final norm -> coda -> final norm -> head

``forward`` composes them through :meth:`LoopLM.recur`, the only loop over core iterations.
Training (depth sampling, truncated backprop), inference and analysis reuse these same functions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from loopformer.config import ModelConfig
from loopformer.deprecation import keyword_alias, warn_renamed
from loopformer.errors import InputError
from loopformer.hardware import check_fits_memory
from loopformer.nn.attention import AttentionContext
from loopformer.nn.depth import LoopEmbedding, LoopIndex, loop_slot
from loopformer.nn.halting import ACT, HaltingHead, HaltingStats
from loopformer.nn.injection import INJECTIONS, LTI_DT_INIT, LTIInjection
from loopformer.nn.layer import Layer
from loopformer.nn.linear import LoopLinear
from loopformer.nn.loss import cross_entropy
from loopformer.nn.memory import NO_PATHWAY, Memory, MemoryMixer, as_memory
from loopformer.nn.moe import MoE
from loopformer.nn.norm import RMSNorm
from loopformer.recurrence import sample_depth

Steps = int | torch.Tensor
StateVisitor = Callable[[int, torch.Tensor], None]


@dataclass
class LoopOutput:
    """Result of :meth:`LoopLM.forward`.

    ``loops`` is the depth that ran (an int, or a [B] tensor for per-sequence depth); ``states`` holds
    the latent state after every iteration when requested (``states[i]`` is s_{i+1}). With ACT halting the
    logits decode the halting mixture (``state`` stays the last latent state) and ``halting`` holds its
    per-position statistics, counted over the positions with a target when ``labels`` were given.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    state: torch.Tensor
    loops: Steps
    states: list[torch.Tensor] | None = None
    halting: HaltingStats | None = None

    @property
    def steps(self) -> Steps:
        """Deprecated old name of :attr:`loops`."""
        warn_renamed("LoopOutput.steps", "LoopOutput.loops")
        return self.loops


class RowExits(Protocol):
    """Per-row early exit for :meth:`LoopLM.recur` (inference): after an iteration, which rows leave the loop.

    Implemented by :class:`loopformer.inference.exits.RowExitRule` (exit rules and per-row loop budgets).
    """

    def fired(self, step: int, state: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """[rows] bool over the rows still in the loop after iteration ``step`` (1-based): True leaves now (None:
        no row leaves at this iteration). Not called after the last iteration."""
        ...

    def exit_state(self, step: int, state: torch.Tensor) -> torch.Tensor:
        """What rows that stop after iteration ``step`` decode: ``state`` itself, or e.g. an ACT mixture."""
        ...

    def select(self, keep: torch.Tensor) -> None:
        """Track only the rows ``keep`` (indices into the rows still in the loop) from now on."""
        ...


class Recurrence(NamedTuple):
    """What :meth:`LoopLM.recur` returns: the final state [B, T, D], every iteration's state when requested, and
    with ``exits`` the iterations each row ran ([B] long; otherwise None)."""

    state: torch.Tensor
    states: list[torch.Tensor] | None = None
    loops: torch.Tensor | None = None


class _Retirement:
    """The bookkeeping of rows leaving a recurrence early: their final states and iteration counts; with
    ``compact`` the leavers are removed from the batch, otherwise they stay (their cache writes frozen)."""

    def __init__(self, exits: RowExits, state: torch.Tensor, total: int, compact: bool) -> None:
        self.exits, self.compact = exits, compact
        rows, device = state.shape[0], state.device
        self.final = state.clone()
        self.loops = torch.full((rows,), total, dtype=torch.long, device=device)
        self.active = torch.arange(rows, device=device)  # compact: original rows still in the batch
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)  # masked: rows that have left

    def after(
        self, step: int, state: torch.Tensor, e: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext] | None:
        """The (state, e, ctx) of the rows that go on after iteration ``step``; None when no row does."""
        fired = self.exits.fired(step, state, ctx)
        if fired is None or not bool(fired.any()):
            return state, e, ctx
        if not self.compact:
            newly = fired & ~self.done
            self.final[newly], self.loops[newly] = self.exits.exit_state(step, state)[newly], step
            self.done |= fired
            ctx.cache.freeze(self.done)  # exited rows keep computing but no longer write the cache
            return None if bool(self.done.all()) else (state, e, ctx)
        exited = self.active[fired]
        self.final[exited], self.loops[exited] = self.exits.exit_state(step, state)[fired], step
        keep = (~fired).nonzero().squeeze(1)
        if keep.numel() == 0:
            return None
        self.active = self.active[keep]
        self.exits.select(keep)
        return state[keep], e[keep], ctx.select(keep)

    def finish(self, step: int, state: torch.Tensor) -> Recurrence:
        """The result once the rows still running stopped after iteration ``step`` with ``state``."""
        if self.compact:
            self.final[self.active] = self.exits.exit_state(step, state)
        else:
            self.final[~self.done] = self.exits.exit_state(step, state)[~self.done]
        return Recurrence(self.final, None, self.loops)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """One sentence for ``ids`` [batch, seq] that are not integer ids of a ``vocab_size`` vocabulary, naming the first
    offender (the value check is skipped while compiling: it reads values)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"token ids must be an integer tensor, got {ids.dtype}.")
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        row, position = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"token id {int(ids[row, position])} at position {position} of row {row} is outside the vocabulary "
            f"0..{vocab_size - 1}."
        )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy in fp32; ``labels`` aligned with the inputs (shifted here).

    The labels are shifted rather than the logits, so no slice of the large logits tensor is taken
    (its backward would zero-fill and copy the whole tensor).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index)


class LoopLM(nn.Module):
    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.prelude = nn.ModuleList(Layer(config) for _ in range(config.n_prelude))
        self.memory = MemoryMixer(config) if config.memory_dim else None
        self.halting = (
            HaltingHead(config.dim, config.halting_bias_init, use_change=config.halting_input == "state+change")
            if config.halting == "act"
            else None
        )
        self.injection = INJECTIONS[config.injection](config)
        self.loop_embedding = LoopEmbedding(config) if config.loop_embedding != "none" else None
        moe = config.moe_routed > 0
        self.core = nn.ModuleList(
            Layer(config, config.lora_rank, config.per_loop_slots, moe=moe) for _ in range(config.n_core)
        )
        self.coda = nn.ModuleList(Layer(config) for _ in range(config.n_coda))
        self.final_norm = RMSNorm(config.dim, config.norm_eps)
        self.head = None if config.tie_embeddings else LoopLinear(config.dim, config.vocab_size)
        for part in ("prelude", "core", "coda"):
            for index, layer in enumerate(getattr(self, part)):
                layer.attn.cache_role = (part, index)
        self._uses_slots = config.lora_rank > 0 or config.loop_embedding == "learned" or moe
        # (iteration, core layer, expert load, auxiliary loss) of every MoE call in the current training forward
        self.moe_records: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None
        self.reset_parameters(generator)

    # ----- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Takase init: std sqrt(2/(5h)), output projections divided by sqrt(2L), L = effective depth."""
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.effective_depth())

        def normal(tensor: torch.Tensor, sd: float) -> None:
            nn.init.trunc_normal_(tensor, 0.0, sd, -3 * sd, 3 * sd, generator=generator)

        normal(self.tok_emb.weight, std)
        for name, module in self.named_modules():
            if isinstance(module, LoopLinear):
                is_out = name.endswith(("attn.out", "mlp.proj", "shared.proj"))
                normal(module.weight, out_std if is_out else std)
                if module.lora_a is not None:
                    normal(module.lora_a, std)
                    module.lora_b.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, LoopEmbedding) and module.table is not None:
                normal(module.table, std)
            elif isinstance(module, MoE):
                normal(module.fc, std)
                normal(module.proj, out_std)
                module.loop_bias.zero_()
                module.balance_bias.zero_()
        for layer in self.layers():
            if getattr(layer.attn, "q_bias", None) is not None:  # MLA has no query / key biases
                layer.attn.q_bias.zero_()
                layer.attn.k_bias.zero_()
        if self.memory is not None:
            self.memory.out.weight.zero_()  # a fresh pathway leaves the model's function unchanged
            self.memory.null_key.zero_()
        if isinstance(self.injection, LTIInjection):
            self.injection.log_a.zero_()
            self.injection.dt_bias.fill_(LTI_DT_INIT)
            nn.init.eye_(self.injection.input_proj.weight)
        if self.halting is not None:
            self.halting.reset_parameters()

    def layers(self) -> list[Layer]:
        return [*self.prelude, *self.core, *self.coda]

    def num_parameters(self) -> int:
        """Trainable parameter count; a tied embedding counts once."""
        return sum(p.numel() for p in self.parameters())

    # ----- the step interface -------------------------------------------------------------
    def context(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> AttentionContext:
        """The attention context (RoPE angles, mask) of a pass over ``input_ids`` [B, T].

        ``attention_mask`` (bool, broadcastable to [B, H, T, T], True = may attend) replaces the default
        causal / sliding-window mask, e.g. to keep packed documents from attending to each other.
        """
        ctx = AttentionContext.for_sequence(self.config, input_ids.shape[1], input_ids.device, positions)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
                raise InputError("attention_mask must be a boolean tensor of shape [batch, 1, seq, seq].")
            ctx.mask = attention_mask
        return ctx

    def embed(self, input_ids: torch.Tensor, ctx: AttentionContext, memory: Memory | None = None) -> torch.Tensor:
        """Token embedding -> prelude (-> memory read) -> the injection's input-side term (once, reused r times).

        ``memory`` (see :func:`loopformer.nn.memory.as_memory`) needs a model with ``memory_dim > 0``.
        """
        x = self.tok_emb(input_ids)
        if self.config.embed_scale:
            x = x * math.sqrt(self.config.dim)
        for layer in self.prelude:
            x = layer(x, ctx)
        if memory is not None:
            if self.memory is None:
                raise InputError(NO_PATHWAY)
            x = self.memory(x, memory)
        return self.injection.prepare(x)

    def init_state(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial latent state shaped like ``e``: zero, or truncated normal (3 sigma) from ``generator``.

        The state has the parameters' dtype (fp32 under bf16 autocast): it accumulates over many
        iterations, so it is not left in the autocast dtype of ``e``.
        """
        dtype = self.tok_emb.weight.dtype
        if not self.random_init:
            return torch.zeros(e.shape, device=e.device, dtype=dtype)
        device = generator.device if generator is not None else e.device
        return self.draw_states(e.shape, device, generator).to(device=e.device, dtype=dtype)

    @property
    def random_init(self) -> bool:
        """Whether initial states are random (``state_init`` normal with a positive std) rather than zero."""
        return self.config.state_init != "zero" and self.config.state_init_std > 0

    def draw_states(
        self, shape: tuple[int, ...] | torch.Size, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """fp32 initial states of ``shape``: truncated normal (3 sigma) with the configured std, from ``generator``
        (whose device ``device`` must be). The inference engine draws a per-position table with it."""
        state = torch.empty(shape, device=device, dtype=torch.float32)
        sd = self.config.state_init_std
        nn.init.trunc_normal_(state, 0.0, sd, -3 * sd, 3 * sd, generator=generator)
        return state

    def step(self, state: torch.Tensor, e: torch.Tensor, index: LoopIndex, ctx: AttentionContext) -> torch.Tensor:
        """Core iteration ``index`` (0-based; an int, or a 0-d tensor in a compiled graph): inject e, add the loop
        signal, run the core layers."""
        cfg = self.config
        slot = loop_slot(index, cfg.per_loop_slots, cfg.loop_overflow) if self._uses_slots else None
        x = self.injection(state, e).to(state.dtype)  # the residual stream keeps the state's dtype
        ctx = ctx.at_iteration(index)
        if self.loop_embedding is not None:
            x = self.loop_embedding(x, index, slot)
        for layer in self.core:
            x = layer(x, ctx, slot)
        if self.moe_records is not None:
            self.moe_records += [
                (index, j, layer.mlp.last_load, layer.mlp.last_aux) for j, layer in enumerate(self.core)
            ]
        return x

    def decode(self, state: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Final norm -> coda -> the same final norm -> LM head (as in Huginn). Returns logits."""
        x = self.final_norm(state)
        for layer in self.coda:
            x = layer(x, ctx)
        x = self.final_norm(x)
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        return F.linear(x, weight)

    # ----- composition --------------------------------------------------------------------
    def recur(
        self,
        state: torch.Tensor,
        e: torch.Tensor,
        ctx: AttentionContext,
        loops: Steps,
        backprop_loops: int | None = None,
        return_states: bool = False,
        checkpoint_steps: bool = False,
        on_state: StateVisitor | None = None,
        *,
        exits: RowExits | None = None,
        compact: bool = True,
    ) -> Recurrence:
        """Run the core ``loops`` times (an int, or a [B] tensor of per-row depths): the only loop over core
        iterations, used by training, evaluation, analysis and the inference engine.

        With ``backprop_loops = k`` only each row's last k iterations carry gradient; earlier ones
        run under ``no_grad`` (or are detached per row when rows differ in depth). A row whose depth
        is reached keeps its state while the others continue. ``checkpoint_steps`` recomputes each
        gradient-carrying iteration in the backward pass instead of storing its activations.
        ``on_state(i, state)`` is called after iteration i (1-based), e.g. to decode intermediate depths
        without keeping every state.

        ``exits`` (inference, an int ``loops``): after each iteration the rows it names leave the loop, keeping
        their :meth:`RowExits.exit_state`; with ``compact`` later iterations compute only the remaining rows (the
        visitors then see those rows only), otherwise leavers stay in the batch with their cache writes frozen. The
        result's ``loops`` holds each row's iteration count.
        """
        per_row = isinstance(loops, torch.Tensor)
        if exits is not None and per_row:
            raise InputError("per-row exits take an int loop count (a row's own budget belongs to its exits).")
        total = int(loops.max()) if per_row else int(loops)
        if per_row:
            loops = loops.to(state.device)
            first_grad = 0 if backprop_loops is None else max(int(loops.min()) - backprop_loops, 0)
        else:
            first_grad = 0 if backprop_loops is None else max(total - backprop_loops, 0)
        grad_enabled = torch.is_grad_enabled()
        states: list[torch.Tensor] | None = [] if return_states else None
        retirement = None if exits is None else _Retirement(exits, state, total, compact)
        for index in range(total):
            with torch.set_grad_enabled(grad_enabled and index >= first_grad):
                if checkpoint_steps and torch.is_grad_enabled():
                    new = checkpoint(self.step, state, e, index, ctx, use_reentrant=False)
                else:
                    new = self.step(state, e, index, ctx)
                if per_row:
                    if backprop_loops is not None and torch.is_grad_enabled():
                        in_grad_window = (index >= loops - backprop_loops).view(-1, 1, 1)
                        new = torch.where(in_grad_window, new, new.detach())
                    state = torch.where((index < loops).view(-1, 1, 1), new, state)
                else:
                    state = new
            if states is not None:
                states.append(state)
            if on_state is not None:
                on_state(index + 1, state)
            if retirement is not None and index + 1 < total:
                going_on = retirement.after(index + 1, state, e, ctx)
                if going_on is None:
                    return Recurrence(retirement.final, states, retirement.loops)
                state, e, ctx = going_on
        if retirement is not None:
            return retirement.finish(total, state)._replace(states=states)
        return Recurrence(state, states)

    def forward(
        self,
        input_ids: torch.Tensor,
        loops: Steps | None = None,
        labels: torch.Tensor | None = None,
        *,
        backprop_loops: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        depth_generator: torch.Generator | None = None,
        return_states: bool = False,
        attention_mask: torch.Tensor | None = None,
        checkpoint_steps: bool = False,
        on_state: StateVisitor | None = None,
        on_output: StateVisitor | None = None,
        initial_state: torch.Tensor | None = None,
        halting_scale: float = 1.0,
        memory: Memory | torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        num_steps: Steps | None = None,
        backprop_depth: int | None = None,
    ) -> LoopOutput:
        """Logits (and loss if ``labels``) for ``input_ids`` [B, T].

        ``loops``: core iterations, an int >= 1 or a [B] tensor. If None, training mode draws it
        from the configured sampler (with ``depth_generator``) and eval mode uses ``mean_loops``.
        ``backprop_loops``: iterations with gradient; in training mode it defaults to the config's.
        ``generator`` / ``seed``: the random initial state's source; ``initial_state`` [B, T, D] replaces it.
        ``attention_mask``: see :meth:`context`; ``checkpoint_steps`` and ``on_state``: see :meth:`recur`.
        ``on_output(i, output)``: after iteration i, the state the model would decode if it stopped there (the
        latent state, or with ACT halting the halting mixture capped at i). ``halting_scale`` multiplies the ponder
        cost and KL added to the loss (the trainer's warm-up, :func:`loopformer.nn.halting.penalty_scale`).
        ``memory`` [M, memory_dim] or [B, M, memory_dim] (+ ``memory_mask`` [B, M]): conditioning vectors for the
        memory pathway (models with ``memory_dim > 0``). ``num_steps`` and ``backprop_depth`` are the deprecated
        old names of ``loops`` and ``backprop_loops``.
        """
        loops = keyword_alias(loops, num_steps, "num_steps", "loops")
        backprop_loops = keyword_alias(backprop_loops, backprop_depth, "backprop_depth", "backprop_loops")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}.")
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.shape[1] > self.config.max_seq_len:
            raise InputError(f"Sequence length {input_ids.shape[1]} exceeds max_seq_len ({self.config.max_seq_len}).")
        steps, backprop_loops = self._resolve_loops(loops, backprop_loops, input_ids.shape[0], depth_generator)
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        ctx = self.context(input_ids, attention_mask=attention_mask)
        memory = as_memory(memory, input_ids.shape[0], self.config.memory_dim, memory_mask)
        e = self.embed(input_ids, ctx, memory)
        if initial_state is None:
            state = self.init_state(e, generator)
        elif initial_state.shape != e.shape:
            raise InputError(f"initial_state must have shape {tuple(e.shape)}, got {tuple(initial_state.shape)}.")
        else:
            state = initial_state.to(self.tok_emb.weight.dtype)
        self.moe_records = [] if self.training and self.config.moe_routed else None
        act = self.act(steps)
        visit = _visitor(act, on_state, on_output)
        state, states, _ = self.recur(state, e, ctx, steps, backprop_loops, return_states, checkpoint_steps, visit)
        logits = self.decode(state if act is None else act.latest, ctx)
        loss = lm_loss(logits, labels) if labels is not None else None
        halting = None
        if act is not None:
            halting = act.stats(F.pad(labels[:, 1:] != -100, (0, 1)) if labels is not None else None)
            if loss is not None:
                cfg = self.config
                loss = loss + halting_scale * halting.penalty(cfg.ponder_cost, cfg.halting_kl_weight)
        if loss is not None and self.moe_records and self.config.moe_aux_weight > 0:
            aux = torch.stack([record[3] for record in self.moe_records]).mean()
            loss = loss + self.config.moe_aux_weight * aux
        return LoopOutput(logits=logits, loss=loss, state=state, loops=steps, states=states, halting=halting)

    def act(self, cap: Steps) -> ACT | None:
        """A fresh ACT accumulator over the halting head, capped at ``cap`` iterations (None without a head).

        Pass it to :meth:`recur` as ``on_state``; its ``latest`` is then the state to decode.
        """
        if self.halting is None:
            return None
        return ACT(self.halting, cap, prior=self.config.halting_prior)

    # ----- mixture of experts -------------------------------------------------------------
    def moe_loads(self) -> torch.Tensor | None:
        """Expert loads of the last training forward, [iterations, core layers, experts] (None without MoE).

        Read it before ``backward``: activation checkpointing re-runs iterations during the backward pass.
        """
        if not self.moe_records:
            return None
        iterations = max(record[0] for record in self.moe_records) + 1
        loads = torch.zeros(iterations, self.config.n_core, self.config.moe_routed)
        for index, layer, load, _ in self.moe_records:
            loads[index, layer] = load.detach().float().cpu()
        return loads

    @torch.no_grad()
    def update_moe_balance(self, loads: torch.Tensor) -> None:
        """Aux-loss-free balancing of every MoE layer from its loads ``[core layers, experts]``."""
        for layer, load in zip(self.core, loads, strict=True):
            layer.mlp.update_balance(load.to(layer.mlp.balance_bias.device))

    def _resolve_loops(
        self,
        loops: Steps | None,
        backprop_loops: int | None,
        batch_size: int,
        depth_generator: torch.Generator | None,
    ) -> tuple[Steps, int | None]:
        rec = self.config.recurrence
        if loops is None:
            loops = sample_depth(rec, batch_size, depth_generator) if self.training else rec.mean_loops
        if isinstance(loops, torch.Tensor):
            if loops.shape != (batch_size,) or loops.dtype.is_floating_point:
                raise InputError(f"Per-row loops must be an integer tensor of shape [{batch_size}].")
            if int(loops.min()) < 1:
                raise InputError("loops must be >= 1 for every row.")
        elif int(loops) != loops or loops < 1:
            raise InputError(f"loops must be an integer >= 1, got {loops!r}.")
        else:
            loops = int(loops)
        if backprop_loops is None and self.training:
            backprop_loops = rec.backprop_loops
        if backprop_loops is not None and backprop_loops < 1:
            raise InputError(f"backprop_loops must be >= 1, got {backprop_loops}.")
        return loops, backprop_loops


def _visitor(act: ACT | None, on_state: StateVisitor | None, on_output: StateVisitor | None) -> StateVisitor | None:
    """One state visitor for :meth:`LoopLM.recur` that feeds the ACT accumulator, then the caller's visitors."""
    if act is None and on_output is None:
        return on_state

    def visit(step: int, state: torch.Tensor) -> None:
        if act is not None:
            act(step, state)
        if on_state is not None:
            on_state(step, state)
        if on_output is not None:
            on_output(step, state if act is None else act.latest)

    return visit


def build_model(
    config: ModelConfig,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoopLM:
    """Construct and initialise a model; ``seed`` makes the weights reproducible and leaves the global RNG as it
    was (without it the weights come from the global RNG).

    On the ``meta`` device nothing is materialised (for counting parameters of large presets).
    """
    device = torch.device(device or "cpu")
    if device.type != "meta":
        skeleton = meta_model(config)
        tensors = [*skeleton.parameters(), *skeleton.buffers()]
        nbytes = sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in tensors)
        check_fits_memory(nbytes, f"This model ({skeleton.num_parameters():,} parameters)", device)
    generator, isolated = None, contextlib.nullcontext()
    if seed is not None and device.type != "meta":
        generator = torch.Generator(device=device).manual_seed(seed)
        # torch.nn's own initialisers draw from the global RNG before LoopLM re-initialises from ``generator``
        isolated = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with isolated, device:
        model = LoopLM(config, generator)
    if dtype is not None:
        model = model.to(dtype)
    return model


class _SkipInit(TorchFunctionMode):
    """Skips in-place operations (initialisers: ``normal_``, ``zero_``, ...) on meta tensors: they have no values,
    and the meta kernels of some initialisers import several seconds of torch internals on first use."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor) and out.is_meta:  # e.g. torch.eye(n, out=weight) in torch.nn.init.eye_
            return out
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        name = getattr(func, "__name__", "")
        if isinstance(target, torch.Tensor) and target.is_meta and name.endswith("_") and not name.startswith("_"):
            return target
        return func(*args, **kwargs)


def meta_model(config: ModelConfig) -> LoopLM:
    """``config``'s model on the ``meta`` device: every shape, no memory (refuses shapes too large to address)."""
    try:
        with torch.device("meta"), _SkipInit():
            return LoopLM(config)
    except RuntimeError as exc:
        raise InputError(
            f"The model config asks for tensors too large to allocate ({str(exc).splitlines()[0]})."
        ) from None
