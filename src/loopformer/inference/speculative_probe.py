"""Self-speculative settings by measurement: time plain decoding and a few ``(draft loops, lookahead)`` pairs on a
short continuation of the caller's own prompts, and keep the fastest (``--speculative auto``).

Whether drafting pays depends on the model, the prompt and the machine: a draft that is rarely accepted costs its
draft passes and a wide verify pass for nothing, and on a small model the per-pass overhead dominates. Speculative
decoding reproduces plain decoding exactly (greedy or sampled), so the choice changes only the speed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loopformer.inference.engine import Engine
    from loopformer.inference.generation import GenerationConfig, GenerationResult
    from loopformer.nn.memory import Memory

PROBE_TOKENS = 16
LOOKAHEADS = (4, 8)
ROUNDS = 2


@dataclass(frozen=True)
class ProbeRun:
    """One timed probe: ``speculative`` None is plain decoding."""

    speculative: tuple[int, int] | None
    tokens_per_s: float
    acceptance_rate: float | None

    @property
    def label(self) -> str:
        return "plain" if self.speculative is None else "{}:{}".format(*self.speculative)


@dataclass(frozen=True)
class ProbeResult:
    """Every probe run, plain first; :attr:`best` is the fastest."""

    runs: tuple[ProbeRun, ...]
    tokens: int
    reason: str = ""  # why only plain decoding was tried

    @property
    def best(self) -> ProbeRun:
        return max(self.runs, key=lambda run: run.tokens_per_s)

    @property
    def plain(self) -> ProbeRun:
        return self.runs[0]

    def describe(self) -> str:
        """One line: the choice and what it was measured against."""
        if self.reason:
            return f"speculative auto: plain decoding ({self.reason})"
        best = self.best
        choice = "plain decoding" if best.speculative is None else f"--speculative {best.label}"
        times = ", ".join(f"{run.label} {run.tokens_per_s:.1f}" for run in self.runs)
        return f"speculative auto: {choice} (tok/s on a {self.tokens}-token probe: {times})"


def draft_candidates(loops: int) -> list[tuple[int, int]]:
    """``(draft loops, lookahead)`` pairs worth timing at ``loops``: drafts of 1, loops/8 and loops/4 iterations."""
    drafts = sorted({d for d in (1, loops // 8, loops // 4) if 1 <= d < loops})
    return [(draft, ahead) for draft in drafts for ahead in LOOKAHEADS]


def _speed(result: GenerationResult) -> float:
    return result.new_tokens / result.seconds if result.seconds > 0 else 0.0


def probe_speculative(
    engine: Engine,
    prompts,
    config: GenerationConfig,
    memory: Memory | None = None,
    tokens: int = PROBE_TOKENS,
    candidates: list[tuple[int, int]] | None = None,
) -> ProbeResult:
    """Time plain decoding and each candidate on ``tokens`` new tokens of ``prompts``: one untimed warm-up run,
    then :data:`ROUNDS` alternating rounds, the fastest run of each setting kept. ``candidates`` defaults to
    :func:`draft_candidates` at the resolved loop count. When speculative decoding cannot be exact with ``config``
    (an exit rule, warm start, a KV policy that shares slots, 1 loop), only plain is timed."""
    loops = engine.resolve_loops(config)
    probe = dataclasses.replace(config, max_new_tokens=min(tokens, config.max_new_tokens), speculative=None)
    reason = ""
    if config.exit is not None:
        reason = "an exit rule decides the depth per token; drafts are verified at a fixed depth"
    elif config.warm_start:
        reason = "warm start carries each token's state into the next, which a verify pass cannot"
    elif config.kv.slots(loops) < loops:
        reason = f"{config.kv.label} shares KV slots at {loops} loops, where a verify pass is not exact"
    elif loops < 2:
        reason = f"at {loops} loop a draft cannot be shallower than the verify pass"
    settings: list[tuple[int, int] | None] = [None]
    if not reason:
        settings += candidates if candidates is not None else draft_candidates(loops)
    engine.generate(prompts, probe, memory=memory)  # warm-up: first-call allocations are not timed
    best: dict[int, ProbeRun] = {}
    for _ in range(ROUNDS):  # alternating rounds, the faster of each setting's runs: less exposed to load spikes
        for index, setting in enumerate(settings):
            result = engine.generate(prompts, dataclasses.replace(probe, speculative=setting), memory=memory)
            run = ProbeRun(setting, _speed(result), result.acceptance_rate)
            if index not in best or run.tokens_per_s > best[index].tokens_per_s:
                best[index] = run
    return ProbeResult(tuple(best[index] for index in range(len(settings))), probe.max_new_tokens, reason)


def slower_than_plain(
    engine: Engine, prompts, config: GenerationConfig, result: GenerationResult, memory: Memory | None = None
) -> str | None:
    """After a speculative run: a notice when a short plain probe of the same prompts is faster, else None."""
    probe = probe_speculative(engine, prompts, config, memory, candidates=[])
    speculative_speed = _speed(result)
    if probe.plain.tokens_per_s <= speculative_speed:
        return None
    return (
        f"note: speculative decoding ran at {speculative_speed:.1f} tok/s with {result.acceptance_rate:.0%} of the "
        f"drafts accepted; plain decoding runs at {probe.plain.tokens_per_s:.1f} tok/s on a {probe.tokens}-token "
        f"probe of the same prompts: leave --speculative off or try --speculative auto"
    )
