"""Zero-shot early-exit criteria: decide per position when further loop iterations stop paying off.

A looped model refines its latent state s_t at every iteration t. Without any training for it, a position can
stop iterating once two successive iterations barely differ (the criteria of Huginn-0125, Geiping et al. 2025):

================  ===========================================================  =========  =======
criterion         quantity between iterations t-1 and t                        exit when  default
================  ===========================================================  =========  =======
kl                KL(p_{t-1} || p_t) of the softmax distributions              < thr      5e-4
entropy-diff      abs(H(p_t) - H(p_{t-1}))                                     < thr      1e-3
latent-diff       ||s_t - s_{t-1}|| / ||s_t||  (no decoding needed)            < thr      0.03
minp-kl           KL(p'_{t-1} || p'_t), p' = p with probs below 0.1 * max set  < thr      1e-5
                  to 1/V, renormalised
argmax-stability  consecutive iterations whose argmax equals the previous one  >= thr     5
cosine            1 - cos(s_t, s_{t-1})  (no decoding needed)                  < thr      1e-3
act               p_1 + ... + p_t, the learned halting head's cumulative       >= thr     0.99
                  halting probability (models trained with ``halting="act"``)
================  ===========================================================  =========  =======

The ``act`` criterion is not zero-shot: it follows the halting head of :mod:`loopformer.nn.halting` and takes
its halting distribution as it is (``min_loops`` and ``check_every`` must stay 1). Given a model's halting head,
a tracker of any criterion accumulates the ACT mixture, so a position that exits at iteration t is decoded from
the mixture capped at t (the halting iteration or t takes the remainder), as the model was trained.

:class:`ExitTracker` applies one :class:`ExitRule` to any number of positions at once (a leading shape such
as [B] or [B, T]); feed it every iteration's state (and logits, for the distribution criteria) in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopformer.errors import InputError
from loopformer.inference.criteria import EXIT_CRITERIA
from loopformer.model import LoopLM
from loopformer.nn.attention import AttentionContext
from loopformer.nn.halting import ACT, ACT_THRESHOLD, HaltingHead

LEARNED_CRITERIA: dict[str, float] = {"act": ACT_THRESHOLD}
CRITERIA = {**EXIT_CRITERIA, **LEARNED_CRITERIA}
LATENT_CRITERIA = frozenset({"latent-diff", "cosine", "act"})  # computed from the state alone
RISING_CRITERIA = frozenset({"argmax-stability", "act"})  # exit when the quantity reaches the threshold
MINP_FRACTION = 0.1  # minp-kl: probabilities below this fraction of the maximum are flattened to 1/V
_EPS = 1e-12


def _known() -> str:
    return ", ".join(CRITERIA)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ExitRule:
    """When a position stops iterating: ``criterion`` against ``threshold``, within [min_loops, max_loops].

    A position can exit at iteration t (1-based) only when t >= ``min_loops`` and t is a multiple of
    ``check_every``; at t >= ``max_loops`` every position exits, whatever the criterion says.
    """

    criterion: str
    threshold: float
    min_loops: int = 1
    max_loops: int | None = None
    check_every: int = 1

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise InputError(f"unknown exit criterion {self.criterion!r}; known criteria: {_known()}.")
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InputError(f"exit threshold of {self.criterion} must be a finite number >= 0, got {value!r}.")
        if self.criterion == "argmax-stability" and value < 1:
            raise InputError(f"the argmax-stability threshold counts iterations and must be >= 1, got {value!r}.")
        if not _is_int(self.min_loops) or self.min_loops < 1:
            raise InputError(f"exit min_loops must be an integer >= 1, got {self.min_loops!r}.")
        if self.max_loops is not None and (not _is_int(self.max_loops) or self.max_loops < self.min_loops):
            raise InputError(
                f"exit max_loops must be an integer >= min_loops ({self.min_loops}), got {self.max_loops!r}."
            )
        if not _is_int(self.check_every) or self.check_every < 1:
            raise InputError(f"exit check_every must be an integer >= 1, got {self.check_every!r}.")
        if self.criterion == "act":
            if not 0 < value <= 1:
                raise InputError(f"the act threshold is a cumulative probability in (0, 1], got {value!r}.")
            if self.min_loops != 1 or self.check_every != 1:
                raise InputError(
                    "the act exit follows the learned halting distribution; min_loops and check_every must be 1."
                )

    @property
    def needs_logits(self) -> bool:
        """Whether the criterion reads the decoded distribution (False for latent-diff and cosine)."""
        return self.criterion not in LATENT_CRITERIA

    @property
    def label(self) -> str:
        """``criterion:threshold``, the form :func:`parse_exit_rule` reads."""
        return f"{self.criterion}:{self.threshold:g}"


def parse_exit_rule(text: str, *, min_loops: int = 1, max_loops: int | None = None, check_every: int = 1) -> ExitRule:
    """An :class:`ExitRule` from ``CRITERION`` or ``CRITERION:THRESHOLD`` (e.g. ``kl:5e-4``, ``argmax-stability:5``).

    Without a threshold the criterion's default from :data:`EXIT_CRITERIA` (or :data:`LEARNED_CRITERIA`) applies.
    """
    name, _, number = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in CRITERIA:
        raise InputError(f"unknown exit criterion {name!r} in {text!r}; known criteria: {_known()}.")
    threshold: float = CRITERIA[name]
    if number.strip():
        try:
            threshold = float(number)
        except ValueError:
            raise InputError(
                f"exit rule {text!r} has the threshold {number.strip()!r}, which is not a number; write CRITERION or "
                f"CRITERION:THRESHOLD with a criterion among {_known()}."
            ) from None
        if name == "argmax-stability" and threshold.is_integer():
            threshold = int(threshold)
    return ExitRule(name, threshold, min_loops=min_loops, max_loops=max_loops, check_every=check_every)


def check_halting(rule: ExitRule | None, halting: HaltingHead | None) -> None:
    """Refuse the ``act`` rule for a model without a halting head."""
    if rule is not None and rule.criterion == "act" and halting is None:
        raise InputError("the act exit needs a model trained with a halting head (halting='act').")


def _minp_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Log of the min-p flattened distribution: probabilities below 0.1 * max become 1/V, then renormalised."""
    vocab = log_probs.shape[-1]
    cutoff = log_probs.max(dim=-1, keepdim=True).values + math.log(MINP_FRACTION)
    flat = torch.where(log_probs < cutoff, torch.full_like(log_probs, -math.log(vocab)), log_probs)
    return flat - torch.logsumexp(flat, dim=-1, keepdim=True)


def _kl(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities ``previous`` = log p and ``current`` = log q over the last dim."""
    p = previous.exp()
    terms = torch.where(p > 0, p * (previous - current), torch.zeros_like(p))  # 0 * log 0 = 0
    return terms.sum(dim=-1).clamp_min(0.0)


class ExitTracker:
    """Applies one :class:`ExitRule` to a set of positions across iterations.

    Call :meth:`update` once per iteration, in order, with that iteration's state [..., D] and, when
    :attr:`needs_logits`, logits [..., V] (the same leading shape). It returns a boolean tensor of that leading
    shape: the positions that satisfy the rule at this iteration. The tracker only remembers the previous
    iteration, so the quantities are always between successive calls. ``first_exit`` holds, per position, the
    first iteration at which the rule fired (0 while it has not). Computation runs in ``dtype`` (float32 by
    default; float64 for exact comparisons), with ``log_softmax`` for the distributions. With the model's
    ``halting`` head (required by ``act``) every update also needs the state, and :meth:`exit_state` gives the ACT
    mixture to decode for an exiting position.
    """

    def __init__(
        self, rule: ExitRule | str, dtype: torch.dtype = torch.float32, halting: HaltingHead | None = None
    ) -> None:
        self.rule = parse_exit_rule(rule) if isinstance(rule, str) else rule
        if not dtype.is_floating_point:
            raise InputError(f"ExitTracker needs a floating-point dtype, got {dtype}.")
        check_halting(self.rule, halting)
        self.dtype = dtype
        self.halting = halting
        self.reset()

    @property
    def needs_logits(self) -> bool:
        return self.rule.needs_logits

    def reset(self) -> None:
        """Forget every position (a new sequence or batch starts)."""
        self._previous: torch.Tensor | None = None  # previous log-probs, state or argmax
        self._stable: torch.Tensor | None = None  # argmax-stability: consecutive unchanged iterations
        self._shape: torch.Size | None = None
        self.last_step = 0
        self.last_value: torch.Tensor | None = None  # the latest quantity (NaN without a previous)
        self.first_exit: torch.Tensor | None = None
        self._act: ACT | None = None
        if self.halting is not None:
            threshold = self.rule.threshold if self.rule.criterion == "act" else ACT_THRESHOLD
            self._act = ACT(self.halting, self.rule.max_loops, threshold)

    def select(self, keep: torch.Tensor) -> None:
        """Track only the positions ``keep`` (indices along the first leading dimension) from now on.

        The inference engine calls this when rows exit, so the remaining rows are tracked without recomputing.
        """
        for name in ("_previous", "_stable", "last_value", "first_exit"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])
        if self._shape is not None:
            self._shape = torch.Size((keep.numel(), *self._shape[1:]))
        if self._act is not None:
            self._act.select(keep)

    def exit_state(self, step: int, state: torch.Tensor) -> torch.Tensor:
        """The states to decode for positions that stop after iteration ``step`` with ``state``: ``state`` itself,
        or with a halting head the ACT mixture capped there. ``step`` is the latest update's (the positions it
        fired for) or the next one, not passed to :meth:`update` (positions cut off by the loop budget)."""
        if self._act is None:
            return state
        if step == self.last_step:
            return self._act.latest
        if step == self.last_step + 1:
            return self._act.output(state)
        raise InputError(f"exit_state needs iteration {self.last_step} or {self.last_step + 1}, got {step}.")

    def _input(self, state: torch.Tensor | None, logits: torch.Tensor | None) -> torch.Tensor:
        source = logits if self.needs_logits else state
        if source is None:
            need = "logits" if self.needs_logits else "the state"
            raise InputError(f"exit criterion {self.rule.criterion} needs {need} at every iteration.")
        if source.dim() < 1:
            raise InputError("exit criteria need tensors with a feature dimension, got a scalar.")
        if self._shape is not None and source.shape != self._shape:
            raise InputError(
                f"exit tracker saw shape {tuple(self._shape)} before and {tuple(source.shape)} now; call reset() "
                "before tracking other positions."
            )
        return source.detach().to(self.dtype, copy=True)  # the caller may update its tensor in place

    def update(self, step: int, state: torch.Tensor | None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Which positions satisfy the rule after iteration ``step`` (1-based); see the class docstring."""
        if not _is_int(step) or step < 1:
            raise InputError(f"exit tracker step must be an integer >= 1, got {step!r}.")
        if step <= self.last_step:
            raise InputError(f"exit tracker steps must increase; got {step} after {self.last_step}.")
        source = self._input(state, logits)
        self._shape = source.shape
        if self._act is not None:
            if state is None:
                raise InputError("an exit tracker with a halting head needs the state at every iteration.")
            self._act(step, state.detach())
            if self.rule.criterion == "act":  # exited once the cumulative halting probability reached the threshold
                self._record(step, self._act.total.to(self.dtype), ~self._act.running)
                return ~self._act.running
        value = self._measure(source)
        rule = self.rule
        # a count reaches its threshold; a difference falls below it (NaN: no previous iteration, never fires)
        fired = value >= rule.threshold if rule.criterion in RISING_CRITERIA else value < rule.threshold
        if step < rule.min_loops or step % rule.check_every != 0:
            fired = torch.zeros_like(fired)
        if rule.max_loops is not None and step >= rule.max_loops:
            fired = torch.ones_like(fired)
        self._record(step, value, fired)
        return fired

    def _record(self, step: int, value: torch.Tensor, fired: torch.Tensor) -> None:
        if self.first_exit is None:
            self.first_exit = torch.zeros(fired.shape, dtype=torch.long, device=fired.device)
        self.first_exit = torch.where((self.first_exit == 0) & fired, step, self.first_exit)
        self.last_step = step
        self.last_value = value

    def _measure(self, source: torch.Tensor) -> torch.Tensor:
        """The criterion's quantity between the remembered iteration and ``source``; updates the memory."""
        criterion = self.rule.criterion
        previous = self._previous
        nan = torch.full(source.shape[:-1], math.nan, dtype=self.dtype, device=source.device)
        if criterion == "argmax-stability":
            current = source.argmax(dim=-1)
            if previous is None:
                self._stable = torch.zeros(current.shape, dtype=torch.long, device=current.device)
            else:
                self._stable = torch.where(current == previous, self._stable + 1, 0)
            self._previous = current
            return self._stable.to(self.dtype)
        if criterion in LATENT_CRITERIA:
            self._previous = source
            if previous is None:
                return nan
            if criterion == "latent-diff":
                norm = torch.linalg.vector_norm(source, dim=-1).clamp_min(_EPS)
                return torch.linalg.vector_norm(source - previous, dim=-1) / norm
            return 1.0 - F.cosine_similarity(source, previous, dim=-1, eps=_EPS)
        current = F.log_softmax(source, dim=-1)
        if criterion == "minp-kl":
            current = _minp_log_probs(current)
        self._previous = current
        if previous is None:
            return nan
        if criterion == "entropy-diff":
            return (_entropy(current) - _entropy(previous)).abs()
        return _kl(previous, current)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(dim=-1)


class RowExitRule:
    """The :class:`~loopformer.model.RowExits` of a decoding pass: an exit rule, per-row loop budgets, or both.

    After iteration t a row leaves when its ``budget`` (a [b] tensor of loop counts, continuous batching) is t, or
    when ``rule`` fires for it (checked from ``min_loops - 1`` on, the iteration before the first allowed exit giving
    the rule its previous value; every iteration with an ACT head, whose mixture accumulates). Rules on the logits
    decode the state at each checked iteration.
    """

    def __init__(self, model: LoopLM, rule: ExitRule | None, budget: torch.Tensor | None = None) -> None:
        self.model, self.rule, self.budget = model, rule, budget
        self.tracker = None if rule is None else ExitTracker(rule, halting=model.halting)

    def fired(self, step: int, state: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        fired = None if self.budget is None else self.budget == step
        tracker = self.tracker
        if tracker is not None and (step + 1 >= self.rule.min_loops or self.model.halting is not None):
            logits = self.model.decode(state, ctx) if tracker.needs_logits else None  # (ACT mixes every iteration)
            ruled = tracker.update(step, state, logits)[:, 0]
            fired = ruled if fired is None else fired | ruled
        return fired

    def exit_state(self, step: int, state: torch.Tensor) -> torch.Tensor:
        return state if self.tracker is None else self.tracker.exit_state(step, state)

    def select(self, keep: torch.Tensor) -> None:
        if self.budget is not None:
            self.budget = self.budget[keep]
        if self.tracker is not None:
            self.tracker.select(keep)
