"""Compiled decoding: one single-token pass (prelude, every core iteration, coda, head) as one compiled graph.

Eager PyTorch spends most of a batch-1 decoding step on dispatching ~50 small operations per layer; at r = 32 that
is several thousand per token. :class:`CompiledDecoder` instead compiles the model's own ``embed`` / ``step`` /
``decode`` with ``torch.compile`` (Inductor, C++ wrapper), the core loop expressed as a ``scan`` over the
iterations, so the whole token is one call whose elementwise work is fused into a few kernels per layer:

* the compiled function only *reads* the cache: attention layers see a :class:`TracedExchange` that returns the
  cached keys / values followed by the new token's own, and records the new ones;
* the new entries come back as outputs and are written into the :class:`~loopformer.inference.cache.KVCache`
  afterwards with one indexed write per role (for core layers: every slot at once, the last iteration that maps
  to each slot under the policy winning, as in eager decoding);
* the history is read padded to a power-of-two length (masked) and the batch size is a dynamic dimension, so a
  graph is compiled once per loop count, history length bucket, slot count and batch of one or more. Static shapes
  matter: with a dynamic sequence length the compiled kernels ran slower in an (unrecorded) exploratory check.

* the iteration index is data the ``scan`` carries (a 0-d tensor per iteration), so the per-loop parameters (LoRA
  adapters, a learned or sinusoidal loop embedding, MoE router biases) are selected inside the graph; MoE layers run
  every expert on the pass's few tokens with zero gates for the unselected ones (static shapes).

It applies to passes the eager engine would run at a fixed depth over one new token per row (memory vectors
included), for models without an ACT halting head. :func:`compile_blocker` names what rules a model out.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch

from loopformer.errors import InputError
from loopformer.hardware import has_cxx_compiler
from loopformer.inference.cache import KVCache, KVPass, SlotPolicy
from loopformer.model import LoopLM
from loopformer.nn.attention import AttentionContext
from loopformer.nn.memory import Memory
from loopformer.quant.tensor import QuantizedWeight

# graphs one decoder may hold: loop counts x history widths (powers of two) x batch of 1 or more x slot policies
RECOMPILE_LIMIT = 64
Entries = tuple[torch.Tensor, torch.Tensor]  # (keys, values) of every layer of a role, stacked


def compile_blocker(model: LoopLM) -> str | None:
    """Why ``model`` cannot use compiled decoding (None when it can)."""
    if model.halting is not None:
        return "compiled decoding does not run ACT halting (its mixture over iterations); decode without compile."
    if any(isinstance(b, QuantizedWeight) and b.data_.bits == 4 for b in model.buffers()):
        return (
            "compiled decoding does not support int4 weights (Inductor cannot build their kernel); decode them "
            "without compile, or quantize to int8."
        )
    if not has_cxx_compiler():
        return "compiled decoding needs a C++ compiler (g++ or clang++) on the PATH; none was found."
    return None


class TracedExchange:
    """The KV exchange attention sees inside the compiled pass: read-only history plus the new token.

    ``history[role]`` holds the role's cached (keys, values), [layers, b, H, S, D] ([layers, slots, b, H, S, D] for
    the core, where :attr:`slot`, a [1] tensor, picks the iteration's slot; whole tensors rather than per-layer
    views, because the inputs of a compiled ``scan`` may not alias each other). Every exchanged key / value is
    recorded in :attr:`written` under (role, layer).
    """

    def __init__(self, history: dict[str, Entries], slot: torch.Tensor | None = None) -> None:
        self.history, self.slot = history, slot
        self.written: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def exchange(
        self, role: str, layer: int, iteration: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = (t[layer] for t in self.history[role])
        if role == "core":
            old_k, old_v = old_k.index_select(0, self.slot)[0], old_v.index_select(0, self.slot)[0]
        self.written[(role, layer)] = (keys, values)
        return (
            torch.cat((old_k, keys.transpose(1, 2).to(old_k.dtype)), dim=2),
            torch.cat((old_v, values.transpose(1, 2).to(old_v.dtype)), dim=2),
        )


def _written(exchange: TracedExchange, role: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (keys, values) of the role's ``count`` layers, stacked: [layers, b, H, D] each."""
    pairs = [exchange.written[(role, layer)] for layer in range(count)]
    return torch.stack([k[:, 0] for k, _ in pairs]), torch.stack([v[:, 0] for _, v in pairs])


class CompileNotice(Protocol):
    """Told about each new graph: ``(shape, None)`` before it compiles, ``(shape, seconds)`` once the call that
    compiled it returned (``shape`` describes it, e.g. ``"loops 32, history 64, batch 1"``)."""

    def __call__(self, shape: str, seconds: float | None) -> None: ...


class CompiledDecoder:
    """Compiled single-token passes for one model (see the module docstring); build once, reuse for every token.

    ``notice`` hears of every first call at a new graph shape (which compiles for tens of seconds on a CPU)."""

    def __init__(self, model: LoopLM, notice: CompileNotice | None = None) -> None:
        blocker = compile_blocker(model)
        if blocker is not None:
            raise InputError(blocker)
        self.model, self.notice = model, notice
        self._fn = torch.compile(_own_code(self._token), dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        self._shapes: set[tuple] = set()

    def _token(
        self,
        ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        state: torch.Tensor,
        mask: torch.Tensor,
        history: dict[str, Entries],
        slots: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Entries]]:
        """logits, final state and the new entries of every role ([layers, b, H, D]; core: [loops, layers, ...]);
        ``memory``: the rows' (vectors, mask)."""
        from torch._higher_order_ops.scan import scan

        model, cfg = self.model, self.model.config
        exchange = TracedExchange(history)
        ctx = AttentionContext(*rope, mask, exchange, tables=rope)  # only the tables are read
        e = model.embed(ids, ctx, None if memory is None else Memory(*memory))

        def iteration(state: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Entries]:
            slot, index = xs
            own = TracedExchange(history, slot.view(1))  # a scan body may not mutate objects from outside it
            state = model.step(state, e, index, replace(ctx, cache=own))
            return state, _written(own, "core", cfg.n_core)

        state, core = scan(iteration, state, (slots, torch.arange(len(slots), device=slots.device)))
        logits = model.decode(state, ctx)
        written = {"prelude": _written(exchange, "prelude", cfg.n_prelude), "core": core}
        written["coda"] = _written(exchange, "coda", cfg.n_coda)
        return logits, state, written

    def run(
        self, kv: KVPass, ids: torch.Tensor, state: torch.Tensor, loops: int, memory: Memory | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of ``ids`` [b, 1] at ``loops`` iterations through an open cache pass (``memory``: the rows' memory
        vectors); returns (logits, state).

        The pass's rows must not read entries of tokens that ran fewer than ``loops`` iterations (no early-exit
        fallback is compiled); the caller checks :func:`reads_full_depth`. The history is read padded to a
        power-of-two length (masked), so the compiled shapes stay static while the cache grows.
        """
        cache, rows, column = kv.cache, kv.rows, kv.columns[:, 0]
        width = history_width(kv.end - 1)
        cache.reserve(width)
        history = {role: _history(cache, role, rows, width) for role in cache.store}
        mask = _history_mask(kv, column, width)
        positions = cache.positions[rows[:, None], kv.columns]
        rope = AttentionContext.for_positions(self.model.config, positions).tables  # outside: no inlined cos / sin
        slots, written_slots, last_iterations = _slot_plan(cache.policy, loops, ids.device)
        vectors = None if memory is None else (memory.vectors, memory.mask)
        for tensor in (ids, *rope, state, mask, *(t for t in vectors or () if t is not None)):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        for keys, values in history.values():
            torch._dynamo.maybe_mark_dynamic(keys, keys.dim() - 4)
            torch._dynamo.maybe_mark_dynamic(values, values.dim() - 4)
        new_shape = False
        if self.notice is not None:  # a graph is compiled once per this key (see the module docstring)
            autocast = torch.is_autocast_enabled(ids.device.type) and torch.get_autocast_dtype(ids.device.type)
            shape = (loops, width, len(rows) > 1, cache.policy, memory is None, autocast)
            new_shape = shape not in self._shapes
        if new_shape:
            self._shapes.add(shape)
            described = f"loops {loops}, history {width}, batch {'2+' if len(rows) > 1 else 1}, kv {cache.policy.label}"
            self.notice(described, None)
            started = time.perf_counter()
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=RECOMPILE_LIMIT):
            logits, state, written = self._fn(ids, rope, state, mask, history, slots, vectors)
        if new_shape:
            self.notice(described, time.perf_counter() - started)
        _store(cache, rows, column, written, written_slots, last_iterations)
        return logits, state


def history_width(length: int, smallest: int = 64) -> int:
    """The padded history length compiled passes read: the next power of two >= ``length`` (at least ``smallest``)."""
    return max(smallest, 1 << max(length - 1, 0).bit_length())


def _history_mask(kv: KVPass, column: torch.Tensor, width: int) -> torch.Tensor:
    """[b, 1, 1, width + 1]: which history columns each row's new token sees, then True for the token itself."""
    end = kv.end
    rows = len(column)
    seen = torch.zeros(rows, width + 1, dtype=torch.bool, device=column.device)
    if kv.mask is None:
        seen[:, : end - 1] = True
    else:
        seen[:, :end] = kv.mask[:, 0, 0]
        seen[torch.arange(rows, device=column.device), column] = False  # its own column: appended at the end
    seen[:, width] = True
    return seen[:, None, None]


def _own_code(method: Callable) -> Callable:
    """``method`` rebound to a private copy of its code: compiled graphs are cached per code object, so each decoder
    (one model) gets its own cache and its own recompile limit instead of sharing them with every other decoder."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


@functools.lru_cache(maxsize=64)
def _slot_plan(policy: SlotPolicy, loops: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The slot of every iteration, and for each slot written the last iteration that writes it (its final entry)."""
    last = {policy.slot(i): i for i in range(loops)}
    slots = torch.tensor([policy.slot(i) for i in range(loops)], device=device)
    return slots, torch.tensor(list(last), device=device), torch.tensor(list(last.values()), device=device)


def reads_full_depth(kv: KVPass, loops: int) -> bool:
    """Whether every token the pass can see completed at least ``loops`` iterations (no fallback reads)."""
    return kv.shallowest >= loops


def _history(cache: KVCache, role: str, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (keys, values) of ``role`` for ``rows``, first ``length`` columns: [layers, (slots,) b, H, S, D]."""
    keys, values = cache.store[role]
    if rows.numel() != cache.batch_size:
        batch_dim = keys.dim() - 4
        keys, values = keys.index_select(batch_dim, rows), values.index_select(batch_dim, rows)
    return keys[..., :length, :], values[..., :length, :]


def _store(
    cache: KVCache,
    rows: torch.Tensor,
    column: torch.Tensor,
    written: dict[str, tuple[torch.Tensor, torch.Tensor]],
    slots: torch.Tensor,
    iterations: torch.Tensor,
) -> None:
    """Write the pass's new entries at ``column`` [b] of ``rows``; core slot ``slots[j]`` gets the entry of iteration
    ``iterations[j]`` (see :func:`_slot_plan`)."""
    for role, new in written.items():
        for store, entries in zip(cache.store[role], new, strict=True):
            if role == "core":  # store [L, slots, B, H, C, D]; entries [loops, L, b, H, D]
                index = (slice(None), slots[:, None], rows[None, :], slice(None), column[None, :])
                store[index] = entries[iterations].permute(0, 2, 1, 3, 4).to(store.dtype)
            else:  # store [L, B, H, C, D]; entries [L, b, H, D]
                store[:, rows, :, column] = entries.transpose(0, 1).to(store.dtype)
