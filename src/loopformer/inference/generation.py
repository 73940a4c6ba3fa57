"""What a generation call asks for and what it returns: :class:`GenerationConfig` and the result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from loopformer.deprecation import warn_renamed
from loopformer.errors import InputError
from loopformer.inference.cache import SlotPolicy, parse_slot_policy
from loopformer.inference.exits import ExitRule, parse_exit_rule
from loopformer.inference.sampling import SamplingConfig

# loops per token beyond which a config is refused unless forced: states stay finite far past it (tested to 4096),
# but the time grows linearly, so a typo (100000) would run for minutes per token
MAX_LOOPS = 4096


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """What one generation call does. ``loops`` is the core iteration count per token (the ceiling when an
    ``exit`` rule is set); None means the model's ``mean_loops``.

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
    loops: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or the context limit)

    @property
    def mean_loops(self) -> float:
        return sum(self.loops) / len(self.loops) if self.loops else 0.0

    @property
    def steps(self) -> list[int]:
        """Deprecated old name of :attr:`loops`."""
        warn_renamed("Generation.steps", "Generation.loops")
        return self.loops


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
    def mean_loops(self) -> float:
        steps = [s for o in self.outputs for s in o.loops]
        return sum(steps) / len(steps) if steps else 0.0


@dataclass
class TokenEvent:
    """One generated token of one row, as :meth:`Engine.stream` yields it; ``text`` is the printable delta."""

    row: int
    token: int | None  # None: the row's held-back text released when it finished
    loops: int
    text: str = ""


class Scores(NamedTuple):
    """What :meth:`Engine.score` returns: per position, the next token's log-probability, the argmax, and the
    iterations behind that prediction."""

    log_probs: torch.Tensor
    loops: torch.Tensor
    predictions: torch.Tensor
