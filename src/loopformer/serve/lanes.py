"""A lane: rows that share one preallocated KV cache and run their decoding passes together.

Rows join a lane (their prompt is prefilled into a free cache row, see
:class:`~loopformer.inference.session.Session`) and leave it between passes. One pass feeds every live row its next
token at once, whatever its loop count: the pass runs the deepest row's count and every other row leaves it after its
own (``budget`` in :meth:`PassRunner.run <loopformer.inference.passes.PassRunner.run>`), through the same compaction
that early exits use, so each row computes exactly what it would compute alone. What must be equal within a lane is
what a pass or a cache takes once: the KV slot policy, the exit rule, the initial-state seed, compaction, and (ACT
models without an exit rule, whose fixed-depth passes decode the halting mixture) the loop count; :func:`lane_key`
collects them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from loopformer.inference.cache import KVCache
from loopformer.inference.engine import Engine
from loopformer.inference.generation import GenerationConfig
from loopformer.inference.passes import PassResult
from loopformer.inference.session import Session
from loopformer.nn.memory import Memory

FIRST_ROWS = 2  # cache rows of a new lane


def lane_key(engine: Engine, config: GenerationConfig) -> Hashable:
    """What rows of one lane have in common (see the module docstring)."""
    fixed_loops = engine.resolve_loops(config) if config.exit is None and engine.model.halting is not None else None
    return (config.kv, config.exit, config.state_seed, config.compaction, fixed_loops)


def stack_memory(memories: Sequence[Memory | None], memory_dim: int) -> Memory | None:
    """One :class:`Memory` for rows with their own vectors (or none): padded to the longest, masked."""
    if all(memory is None for memory in memories):
        return None
    width = max(1 if memory is None else memory.vectors.shape[1] for memory in memories)
    device = next(memory.vectors.device for memory in memories if memory is not None)
    vectors = torch.zeros(len(memories), width, memory_dim, device=device)
    mask = torch.zeros(len(memories), width, dtype=torch.bool, device=device)
    for row, memory in enumerate(memories):
        if memory is not None:
            count = memory.vectors.shape[1]
            vectors[row, :count] = memory.vectors[0]
            mask[row, :count] = True if memory.mask is None else memory.mask[0]
    return Memory(vectors, mask)


class Lane:
    """Cache rows of ``capacity`` tokens, up to ``max_loops`` iterations, for sessions with one :func:`lane_key`.

    The cache starts with :data:`FIRST_ROWS` rows and doubles when a row joins a full lane, so its memory follows
    the load (the caller keeps the number of rows at most its batch size).
    """

    def __init__(self, engine: Engine, config: GenerationConfig, capacity: int, max_loops: int) -> None:
        self.engine, self.config = engine, config
        self.cache = KVCache(
            engine.model.config,
            FIRST_ROWS,
            capacity,
            config.kv,
            max_loops=max_loops,
            device=engine.device,
            dtype=engine.passes.state_dtype,
        )
        self.free = list(range(FIRST_ROWS))

    @property
    def empty(self) -> bool:
        return len(self.free) == self.cache.batch_size

    def join(
        self, prompt: list[int], config: GenerationConfig, memory: Memory | None, keep_prompt_logits: bool = False
    ) -> Session:
        """Prefill ``prompt`` into a free row; the returned one-row session decodes through :meth:`decode` (and keeps
        the prefill's logits with ``keep_prompt_logits``, see :class:`Session`)."""
        if not self.free:
            rows = self.cache.batch_size
            self.cache.reserve_rows(2 * rows)
            self.free = list(range(rows, 2 * rows))
        slot = self.free.pop(0)
        slots = torch.tensor([slot], device=self.cache.device)
        try:
            self.cache.truncate(slots, torch.zeros_like(slots))
            ids = torch.tensor([prompt], device=self.cache.device)
            real = torch.ones_like(ids, dtype=torch.bool)
            return Session(
                self.engine.passes, ids, real, config, memory, self.cache, slots, keep_prompt_logits=keep_prompt_logits
            )
        except BaseException:
            self.free.insert(0, slot)
            raise

    def leave(self, session: Session) -> None:
        """Give the session's row back (its cache entries are forgotten when the row is next used)."""
        self.free.append(int(session.slots[0]))
        self.free.sort()

    def decode(self, sessions: Sequence[Session], tokens: torch.Tensor) -> None:
        """One single-token pass for ``sessions`` (each fed its token from ``tokens`` [b]); stores their results."""
        slots = torch.cat([session.slots for session in sessions])
        loops = [session.loops for session in sessions]
        deepest = max(loops)
        budget = None if min(loops) == deepest else torch.tensor(loops, device=slots.device)
        memory = stack_memory([session.memory for session in sessions], self.engine.model.config.memory_dim)
        result = self.engine.passes.run(
            self.cache,
            slots,
            tokens[:, None],
            self.cache.next_positions(slots)[:, None],
            config=self.config,
            loops=deepest,
            rule=self.config.exit,
            memory=memory,
            budget=budget,
        )
        self.cache.commit(slots, torch.ones_like(slots), result.loops)
        first = torch.zeros(1, dtype=torch.long, device=slots.device)
        for row, session in enumerate(sessions):
            part = slice(row, row + 1)
            session.store(first, PassResult(result.logits[part], result.state[part], result.loops[part]))
