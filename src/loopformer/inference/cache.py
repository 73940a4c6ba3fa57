"""KV cache for incremental decoding of a looped model: preallocated tensors and slot policies.

Storage is allocated once per generation, shaped ``[layers, (slots,) batch, heads, capacity, width]`` for
keys and values; nothing is concatenated or re-stacked per token. With multi-head attention both tensors are
``kv_heads x head_dim``; with Multi-Latent Attention (``attention="mla"``) the "keys" tensor holds the latent
(``1 x mla_kv_rank``) and the "values" tensor the RoPE key shared by all heads (``1 x mla_rope_dim``), so every
slot policy, the fallback, rollback and row selection below work unchanged. Prelude and coda layers have one slot
each.
A core layer runs once per iteration, and the *slot policy* maps iteration ``i`` to a physical slot:

* ``full``: slot ``i`` (every iteration keeps its own entries; needs one slot per iteration that can run);
* ``ring:k``: slot ``i mod k`` (Huginn's KV sharing with a budget of k iterations);
* ``last``: slot 0 (one slot per core layer, overwritten at every iteration).

Every row keeps its own length, so rows can grow at different speeds (speculative decoding accepts a different
number of tokens per row) and rolling back is only a length change. Per column the cache records whether it
holds a real token (padding does not), its RoPE position, and how many core iterations its token completed.

**Fallback for tokens that exited early.** A query at iteration ``i`` reads, for each earlier token, that token's
entry of iteration ``min(i, depth - 1)`` under the policy: its own entry of iteration ``i`` when it got that far,
otherwise the latest entry it wrote for the same core layer (slot ``policy(depth - 1)``). The gather runs only
when some visible token is shallower than the current iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.hardware import check_fits_memory

POLICY_FORMS = "'full', 'last' or 'ring:K' with K >= 1"
_UNBOUNDED = torch.iinfo(torch.long).max // 2  # the depth of a column written in the current pass


# ring sizes beyond this are refused rather than carried into tensor arithmetic (a ring of at least the loop count
# is the full cache anyway)
MAX_RING_SIZE = 1_000_000


@dataclass(frozen=True)
class SlotPolicy:
    """Which physical slot a core iteration's keys and values live in (see the module docstring)."""

    kind: str
    size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("full", "ring", "last"):
            raise InputError(f"unknown KV slot policy {self.kind!r}; use {POLICY_FORMS}.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise InputError(f"the ring size of a KV slot policy must be an integer >= 1, got {self.size!r}.")
        if self.size > MAX_RING_SIZE:
            raise InputError(
                f"the ring size {self.size} is above {MAX_RING_SIZE:,}; a ring at least as large as the loop count "
                "is the full cache, so use full."
            )

    @property
    def label(self) -> str:
        """The policy in the form :func:`parse_slot_policy` reads."""
        return f"ring:{self.size}" if self.kind == "ring" else self.kind

    def slots(self, max_loops: int) -> int:
        """Physical slots per core layer when at most ``max_loops`` iterations run (a ring larger than that holds
        no more than the full cache: its extra slots would never be written)."""
        if self.kind == "full":
            return max_loops
        return min(self.size, max_loops) if self.kind == "ring" else 1

    def slot(self, iteration: int) -> int:
        """The slot of 0-based iteration ``iteration``."""
        if self.kind == "full":
            return iteration
        return iteration % self.size if self.kind == "ring" else 0

    def slot_of(self, iterations: torch.Tensor) -> torch.Tensor:
        """:meth:`slot`, elementwise over a tensor of iterations."""
        if self.kind == "full":
            return iterations
        return iterations % self.size if self.kind == "ring" else torch.zeros_like(iterations)


def parse_slot_policy(text: str | SlotPolicy) -> SlotPolicy:
    """A :class:`SlotPolicy` from ``full``, ``last`` or ``ring:K``."""
    if isinstance(text, SlotPolicy):
        return text
    name, sep, number = str(text).strip().lower().partition(":")
    if name == "ring" and sep:
        if not number.strip().isdigit():
            raise InputError(f"KV slot policy {text!r} needs an integer ring size, e.g. ring:4.")
        try:
            return SlotPolicy("ring", int(number))
        except InputError as exc:
            raise InputError(f"KV slot policy {text!r}: {exc}") from None
    if name in ("full", "last") and not sep:
        return SlotPolicy(name)
    raise InputError(f"unknown KV slot policy {text!r}; use {POLICY_FORMS}.")


def cache_entry(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, width)`` of the "keys" and the "values" tensor a layer caches per token (see the module docstring)."""
    if config.attention == "mla":
        return (1, config.mla_kv_rank), (1, config.mla_rope_dim)
    return (config.n_kv_heads, config.head_dim), (config.n_kv_heads, config.head_dim)


def cache_bytes(
    config: ModelConfig,
    policy: SlotPolicy | str,
    tokens: int,
    max_loops: int,
    batch_size: int = 1,
    element_bytes: int = 4,
) -> int:
    """Bytes of keys and values a cache holds for ``tokens`` tokens per row at up to ``max_loops`` iterations."""
    policy = parse_slot_policy(policy)
    layers_written = config.n_prelude + config.n_coda + config.n_core * policy.slots(max_loops)
    per_layer = sum(heads * width for heads, width in cache_entry(config))
    return layers_written * per_layer * element_bytes * tokens * batch_size


def _widen(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` zero-padded along ``dim`` to ``size``."""
    shape = list(tensor.shape)
    old, shape[dim] = shape[dim], size
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, old).copy_(tensor)
    return out


class KVCache:
    """Preallocated keys and values for ``batch_size`` rows of up to ``capacity`` columns each."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        policy: SlotPolicy | str = "full",
        max_loops: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.policy = parse_slot_policy(policy)
        steps = config.recurrence.mean_loops if max_loops is None else max_loops
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"the cache's max_loops must be an integer >= 1, got {max_loops!r}.")
        if capacity < 1 or batch_size < 1:
            raise InputError(f"a KV cache needs batch_size >= 1 and capacity >= 1, got {batch_size} and {capacity}.")
        self.config, self.batch_size, self.capacity, self.max_loops = config, batch_size, capacity, steps
        self.n_slots = self.policy.slots(steps)
        device = torch.device(device or "cpu")
        nbytes = cache_bytes(config, self.policy, capacity, steps, batch_size, dtype.itemsize)
        check_fits_memory(nbytes, f"A KV cache of {batch_size} x {capacity} tokens at {steps} loops", device)

        def alloc(*lead: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(
                torch.zeros(*lead, batch_size, heads, capacity, width, device=device, dtype=dtype)
                for heads, width in cache_entry(config)
            )

        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            "prelude": alloc(config.n_prelude),
            "core": alloc(config.n_core, self.n_slots),
            "coda": alloc(config.n_coda),
        }
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.depth = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def nbytes(self) -> int:
        """Bytes held by the key and value tensors."""
        return sum(t.numel() * t.element_size() for pair in self.store.values() for t in pair)

    def reserve(self, capacity: int) -> None:
        """Grow every row's room to ``capacity`` columns, keeping what is stored (nothing happens if it is there).

        For callers that cannot know the final length up front (the transformers adapter); one copy per growth.
        """
        if capacity <= self.capacity:
            return
        self.store = {role: (_widen(k, -2, capacity), _widen(v, -2, capacity)) for role, (k, v) in self.store.items()}
        columns = (self.valid, self.positions, self.depth)
        self.valid, self.positions, self.depth = (_widen(t, 1, capacity) for t in columns)
        self.capacity = capacity

    def reserve_rows(self, batch_size: int) -> None:
        """Grow to ``batch_size`` rows, keeping the existing ones (the new rows are empty); for a batch that rows
        join while it runs (the server's continuous batching). One copy per growth."""
        if batch_size <= self.batch_size:
            return
        self.store = {
            role: (_widen(k, -4, batch_size), _widen(v, -4, batch_size)) for role, (k, v) in self.store.items()
        }
        bookkeeping = (self.lengths, self.valid, self.positions, self.depth)
        self.lengths, self.valid, self.positions, self.depth = (_widen(t, 0, batch_size) for t in bookkeeping)
        self.batch_size = batch_size

    def next_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """The RoPE position the next token of each row gets: one past its last real token."""
        last = (self.lengths[rows] - 1).clamp_min(0)
        previous = self.positions[rows, last] + 1
        return torch.where(self.lengths[rows] > 0, previous, torch.zeros_like(previous))

    def begin(self, rows: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None) -> KVPass:
        """Start a pass that writes ``positions.shape[1]`` new columns after each row's committed length.

        ``rows`` [b] are batch indices, ``positions`` [b, T] the new tokens' RoPE positions and ``real`` [b, T]
        whether each new column holds a token (False = padding). Nothing is committed until :meth:`commit`.
        """
        count = positions.shape[1]
        starts = self.lengths[rows]
        end = int(starts.max()) + count
        if end > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} tokens per row; this pass needs {end}.")
        columns = starts[:, None] + torch.arange(count, device=self.device)
        real = torch.ones_like(positions, dtype=torch.bool) if real is None else real
        self.valid[rows[:, None], columns] = real
        self.positions[rows[:, None], columns] = positions
        return KVPass(self, rows, columns, end)

    def commit(self, rows: torch.Tensor, counts: torch.Tensor, depths: torch.Tensor) -> None:
        """Keep the first ``counts[j]`` columns of the last pass for row ``rows[j]``; forget the rest.

        ``depths`` [b, T] are the core iterations each new token completed (kept for the early-exit fallback).
        """
        starts = self.lengths[rows]
        columns = starts[:, None] + torch.arange(depths.shape[1], device=self.device)
        kept = torch.arange(depths.shape[1], device=self.device)[None] < counts[:, None]
        self.depth[rows[:, None], columns] = torch.where(kept, depths, 0)
        self.truncate(rows, starts + counts)

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Roll rows back to ``lengths`` committed columns (everything after them is forgotten)."""
        self.lengths[rows] = lengths
        beyond = torch.arange(self.capacity, device=self.device)[None] >= lengths[:, None]
        self.valid[rows] &= ~beyond

    def rows_snapshot(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bookkeeping of ``rows`` (lengths, validity, positions, depths), for tests and inspection."""
        return {
            "lengths": self.lengths[rows].clone(),
            "valid": self.valid[rows].clone(),
            "positions": self.positions[rows].clone(),
            "depth": self.depth[rows].clone(),
        }


class KVPass:
    """One pass's view of the cache: which rows and new columns it writes, and the attention mask it implies.

    Attention layers call :meth:`exchange` with their new keys and values; it writes them and returns every
    visible key and value of the pass's rows (with the early-exit fallback applied for core layers).
    """

    def __init__(self, cache: KVCache, rows: torch.Tensor, columns: torch.Tensor, end: int) -> None:
        self.cache, self.rows, self.columns, self.end = cache, rows, columns, end
        self.all_rows = rows.numel() == cache.batch_size and bool(
            (rows == torch.arange(rows.numel(), device=rows.device)).all()
        )
        same_start = bool((columns[:, 0] == columns[0, 0]).all())
        self.block = int(columns[0, 0]) if self.all_rows and same_start else None  # writes are one slice
        self.frozen: torch.Tensor | None = None  # rows (of this pass) whose writes are skipped
        self.mask = self._mask()
        depth = cache.depth[rows, :end].clone()
        depth[torch.arange(rows.numel(), device=rows.device)[:, None], columns] = _UNBOUNDED
        visible = cache.valid[rows, :end]
        self.read_depth = depth
        self.shallowest = int(depth[visible].min()) if bool(visible.any()) else _UNBOUNDED

    def _mask(self) -> torch.Tensor | None:
        """[b, 1, T, end] boolean mask (True = may attend), or None when every query sees every column."""
        cache, rows, columns, end = self.cache, self.rows, self.columns, self.end
        key_valid = cache.valid[rows, :end]
        key_pos = cache.positions[rows, :end]
        query_pos = cache.positions[rows[:, None], columns]
        window = cache.config.sliding_window
        count = columns.shape[1]
        uniform = bool((columns[:, -1] == end - 1).all())
        if count == 1 and uniform and bool(key_valid.all()) and (window is None or end <= window):
            return None
        key_column = torch.arange(end, device=rows.device)
        mask = key_valid[:, None, :] & (key_column[None, None, :] <= columns[:, :, None])
        if window is not None:
            mask &= query_pos[:, :, None] - key_pos[:, None, :] < window
        own = key_column[None, None, :] == columns[:, :, None]
        mask |= own & ~mask.any(dim=-1, keepdim=True)  # a padding query sees itself, so its output stays finite
        return mask[:, None]

    def freeze(self, rows: torch.Tensor | None) -> None:
        """Stop writing the rows marked True in ``rows`` (a [b] mask of this pass's rows); None writes all again.

        Used when exited rows stay in the batch (masking instead of compaction): their entries stay those of the
        iteration they exited at.
        """
        self.frozen = None if rows is None else rows.clone()

    def select(self, keep: torch.Tensor) -> KVPass:
        """The same pass restricted to the rows ``keep`` (indices into this pass's rows)."""
        view = object.__new__(KVPass)
        view.cache, view.end = self.cache, self.end
        view.rows, view.columns = self.rows[keep], self.columns[keep]
        view.all_rows, view.block = False, None
        view.frozen = None if self.frozen is None else self.frozen[keep]
        view.mask = None if self.mask is None else self.mask[keep]
        view.read_depth = self.read_depth[keep]
        visible = self.cache.valid[view.rows, : self.end]
        view.shallowest = int(view.read_depth[visible].min()) if bool(visible.any()) else _UNBOUNDED
        return view

    def exchange(
        self, role: str, layer: int, iteration: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys`` / ``values`` [b, T, H, D] of the new columns; return all visible ones, [b, H, end, D]."""
        store_k, store_v = self.cache.store[role]
        store_k, store_v = store_k[layer], store_v[layer]
        slot = None
        if role == "core":
            policy = self.cache.policy
            slot = policy.slot(iteration)
            if slot >= self.cache.n_slots:
                raise InputError(
                    f"the 'full' KV cache holds {self.cache.n_slots} iterations; iteration {iteration + 1} does "
                    "not fit (allocate the cache with a larger max_loops)."
                )
            store_k, store_v = store_k[slot], store_v[slot]
        if self.frozen is not None:
            live = ~self.frozen
            index, columns = self.rows[live][:, None], self.columns[live]
            store_k[index, :, columns] = keys[live].to(store_k.dtype)
            store_v[index, :, columns] = values[live].to(store_v.dtype)
        elif self.block is not None:
            span = slice(self.block, self.block + keys.shape[1])
            store_k[:, :, span] = keys.transpose(1, 2)
            store_v[:, :, span] = values.transpose(1, 2)
        else:
            index = self.rows[:, None]
            store_k[index, :, self.columns] = keys.to(store_k.dtype)
            store_v[index, :, self.columns] = values.to(store_v.dtype)
        if self.all_rows:
            out_k, out_v = store_k[:, :, : self.end], store_v[:, :, : self.end]
        else:
            out_k, out_v = store_k[self.rows, :, : self.end], store_v[self.rows, :, : self.end]
        if slot is not None and self.cache.policy.kind != "last" and iteration >= self.shallowest:
            out_k, out_v = self._fallback(layer, iteration, slot, out_k, out_v)
        return out_k, out_v

    def _fallback(
        self, layer: int, iteration: int, slot: int, out_k: torch.Tensor, out_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the entries of tokens shallower than ``iteration`` by their latest ones (module docstring)."""
        policy = self.cache.policy
        source = policy.slot_of(torch.clamp(self.read_depth - 1, max=iteration).clamp_min(0))
        stale = (source != slot) & self.cache.valid[self.rows, : self.end]
        if not bool(stale.any()):
            return out_k, out_v
        local, column = stale.nonzero(as_tuple=True)
        slots, rows = source[local, column], self.rows[local]
        all_k, all_v = self.cache.store["core"]
        out_k, out_v = out_k.clone(), out_v.clone()
        out_k[local, :, column] = all_k[layer][slots, rows, :, column]
        out_v[local, :, column] = all_v[layer][slots, rows, :, column]
        return out_k, out_v
