"""Self-speculative decoding: the same model drafts with few iterations and verifies at the full depth.

One round, for every live row at once (each row's pending token ``x`` is already chosen):

1. **Draft** ``n`` tokens one by one at ``draft_loops`` iterations, feeding ``x, d_1, ..., d_{n-1}``;
2. roll the cache back to before ``x`` and **verify** ``x, d_1, ..., d_n`` in ONE pass at the full depth, which
   gives the target distribution after each of them;
3. **accept** a prefix of the drafts: greedy keeps the longest prefix equal to the target argmax, sampling uses the
   standard accept / reject rule (which leaves the output distribution exactly the target's); the first rejected
   position (or the bonus position after n accepted drafts) supplies the next pending token;
4. **commit** ``x, d_1 .. d_a`` (computed at the full depth by the verify pass); the rest of the pass is forgotten
   by a length change, so the cache is exactly what plain decoding would have built.

Rows accept different numbers of tokens; each row keeps its own cache length, so batches stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from loopformer.inference.sampling import next_token_probs, speculative_accept

if TYPE_CHECKING:
    from loopformer.inference.generation import TokenEvent
    from loopformer.inference.session import Session


def _emit(session: Session, rows: torch.Tensor, tokens: list[list[int]]) -> Iterator[TokenEvent]:
    """Hand ``tokens[j]`` to row ``rows[j]`` in order until the row ends; yields the events."""
    for j, row in enumerate(rows.tolist()):
        for token in tokens[j]:
            if not bool(session.alive[row]):
                break
            yield from session.accept(row, token, session.loops)


def speculative_events(session: Session) -> Iterator[TokenEvent]:
    """Run speculative rounds until every row has finished; sets ``session.acceptance_rate``."""
    passes, cache, config = session.passes, session.cache, session.config
    draft_loops, lookahead = config.speculative
    sampling = config.sampling
    drafted = accepted_total = 0
    session.acceptance_rate = 0.0
    rows = session.alive_rows
    pending = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)
    pending[rows] = session.choose(rows)
    yield from _emit(session, rows, [[token] for token in pending[rows].tolist()])
    while bool(session.alive.any()):
        rows = session.alive_rows
        start = cache.lengths[rows].clone()
        first_position = cache.next_positions(rows)
        history = session.history[rows]
        token = pending[rows]
        drafts, draft_probs = [], []
        # a round emits its accepted drafts and one more token: drafts past what the rows still need are wasted work
        ahead = max(1, min(lookahead, max(config.max_new_tokens - len(session.tokens[r]) for r in rows.tolist()) - 1))
        for j in range(ahead):
            positions = (first_position + j)[:, None]
            result = passes.run(
                cache, rows, token[:, None], positions, config=config, loops=draft_loops, memory=session.memory_of(rows)
            )
            cache.commit(rows, torch.ones_like(rows), result.loops)
            probs = next_token_probs(result.logits[:, 0].float(), sampling, torch.cat((history, *drafts), dim=1))
            token = (
                probs.argmax(dim=-1)
                if sampling.greedy
                else torch.multinomial(probs, 1, generator=session.generator)[:, 0]
            )
            drafts.append(token[:, None])
            draft_probs.append(probs)
        cache.truncate(rows, start)
        draft = torch.cat(drafts, dim=1)
        inputs = torch.cat((pending[rows][:, None], draft), dim=1)
        positions = first_position[:, None] + torch.arange(ahead + 1, device=cache.device)
        result = passes.run(
            cache, rows, inputs, positions, config=config, loops=session.loops, memory=session.memory_of(rows)
        )
        target_probs = torch.stack(
            [
                next_token_probs(result.logits[:, j].float(), sampling, torch.cat((history, draft[:, :j]), dim=1))
                for j in range(ahead + 1)
            ],
            dim=1,
        )
        accepted, following = speculative_accept(
            draft, torch.stack(draft_probs, dim=1), target_probs, session.generator
        )
        cache.commit(rows, accepted + 1, result.loops)
        drafted += draft.numel()
        accepted_total += int(accepted.sum())
        session.acceptance_rate = accepted_total / drafted
        pending[rows] = following
        emitted = [[*draft[j, :count].tolist(), int(following[j])] for j, count in enumerate(accepted.tolist())]
        yield from _emit(session, rows, emitted)
