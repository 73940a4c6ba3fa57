"""Next-token choice: greedy or sampled decoding, and the acceptance rule of speculative decoding.

:func:`next_token_probs` turns logits [B, V] into the distribution a token is drawn from, in this order:

1. repetition penalty on every id already in the history (CTRL, Keskar et al. 2019): a logit x becomes x / r
   when x > 0 and x * r otherwise, once per id however often it occurs;
2. temperature: softmax(logits / T); T = 0 means greedy, the one-hot of the argmax;
3. top-k: the k most likely ids; 4. top-p: the smallest set of most likely ids whose probabilities sum to at
   least p (always the most likely id); 5. min-p: the ids with probability >= min_p * the largest.

Each filter renormalises what it keeps before the next one looks at it. :func:`speculative_accept` is the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) that keeps the target's distribution
exactly; with one-hot distributions it reduces to :func:`greedy_accept`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loopformer.errors import InputError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; ``temperature == 0`` is greedy and ignores the filters and the seed.

    ``top_k`` (None or 0 = off), ``top_p`` (None or 1 = off) and ``min_p`` (None or 0 = off) restrict the
    candidates as the module docstring describes; ``repetition_penalty`` 1 is off. ``seed`` is for the caller
    that builds the ``torch.Generator``.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InputError(
                f"sampling temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}."
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise InputError(f"sampling top_k must be None or an integer >= 0 (0 = off), got {self.top_k!r}.")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise InputError(f"sampling top_p must be None or a number in (0, 1], got {self.top_p!r}.")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise InputError(f"sampling min_p must be None or a number in [0, 1], got {self.min_p!r}.")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(
                f"sampling repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}."
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise InputError(f"sampling seed must be None or an integer in [0, 2**64), got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        """Whether the token is the argmax (temperature 0) rather than a draw."""
        return self.temperature == 0


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise InputError(f"logits must be a floating-point [B, V] tensor, got {logits.dtype} {tuple(logits.shape)}.")


def apply_repetition_penalty(logits: Tensor, history: Tensor | None, penalty: float) -> Tensor:
    """A new tensor with the CTRL penalty on every id in ``history`` [B, L] (-1 = no token): x / r if x > 0, else x * r.

    Each id is penalised once, however often it occurs in its row.
    """
    _check_logits(logits)
    if not _is_number(penalty) or penalty <= 0:
        raise InputError(f"repetition penalty must be a finite number > 0 (1 = off), got {penalty!r}.")
    if history is None or penalty == 1 or history.numel() == 0:
        return logits.clone()
    batch, vocab = logits.shape
    integer = not (history.is_floating_point() or history.is_complex() or history.dtype == torch.bool)
    if history.dim() != 2 or history.shape[0] != batch or not integer:
        raise InputError(
            f"history must be an integer [B={batch}, L] tensor of ids, got {history.dtype} {tuple(history.shape)}."
        )
    history = history.to(device=logits.device, dtype=torch.long)
    if bool(((history < -1) | (history >= vocab)).any()):
        raise InputError(f"history holds ids outside 0..{vocab - 1} (and -1 for no token).")
    # padding (-1) writes into an extra column that is dropped; repeated ids just set True again
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(history < 0, vocab, history), True)
    penalty = _representable(penalty, logits.dtype)
    penalised = _finite(torch.where(logits > 0, logits / penalty, logits * penalty))
    return torch.where(seen[:, :vocab], penalised, logits)


def _representable(value: float, dtype: torch.dtype) -> float:
    """A positive ``value`` held within ``dtype``'s normal range, so that it is neither 0 nor inf in that dtype (a
    logit divided by 0 or multiplied by inf can be nan)."""
    info = torch.finfo(dtype)
    return min(max(value, info.tiny), info.max)


def _finite(scores: Tensor) -> Tensor:
    """``scores`` with overflows (a penalty or temperature near 0 divides a logit to inf) held at the dtype's largest
    finite values: softmax of an inf is nan, which no draw can take."""
    info = torch.finfo(scores.dtype)
    return scores.clamp(info.min, info.max)


def _keep(probs: Tensor, keep: Tensor) -> Tensor:
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def next_token_probs(logits: Tensor, config: SamplingConfig, history: Tensor | None = None) -> Tensor:
    """The float32 [B, V] distribution of the next token under ``config`` (one-hot of the argmax when greedy)."""
    scores = apply_repetition_penalty(logits.float(), history, config.repetition_penalty)
    vocab = scores.shape[-1]
    if config.greedy:
        return F.one_hot(scores.argmax(dim=-1), vocab).float()
    probs = torch.softmax(_finite(scores / _representable(config.temperature, scores.dtype)), dim=-1)
    if config.top_k and config.top_k < vocab:
        top = probs.topk(config.top_k, dim=-1).indices
        probs = _keep(probs, torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True))
    if config.top_p is not None and config.top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(dim=-1) - ordered  # the mass of the more likely ids
        keep_sorted = before < config.top_p
        keep_sorted[:, 0] = True
        probs = _keep(probs, torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted))
    if config.min_p:
        probs = _keep(probs, probs >= config.min_p * probs.max(dim=-1, keepdim=True).values)
    return probs


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One id per row of ``probs`` [B, V]; a row with all its mass on one id gives that id without randomness."""
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    top, argmax = probs.max(dim=-1)
    return torch.where(top >= 1, argmax, drawn)


def choose_tokens(
    logits: Tensor, config: SamplingConfig, history: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """The next token of every row, int64 [B]: the argmax in float32 when greedy (lowest id on ties), else a draw."""
    if config.greedy:
        return apply_repetition_penalty(logits.float(), history, config.repetition_penalty).argmax(dim=-1)
    return _draw(next_token_probs(logits, config, history), generator)


def speculative_accept(
    draft: Tensor, draft_probs: Tensor, target_probs: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """How many draft tokens to keep per row, and the token that follows them: (accepted [B], next_token [B]).

    ``draft`` [B, n] was drawn from ``draft_probs`` q [B, n, V]; ``target_probs`` p [B, n + 1, V] holds the
    target's distribution at the n draft positions and the bonus position after them. Draft token j is kept with
    probability min(1, p_j(d_j) / q_j(d_j)), left to right; at the first rejection j the next token is drawn
    from max(p_j - q_j, 0) renormalised (p_j when that is all zero); when all n are kept it is drawn from p_n.
    The emitted tokens then follow p exactly, whatever q is.
    """
    if draft.dim() != 2 or draft.is_floating_point():
        raise InputError(f"draft must be an integer [B, n] tensor, got {draft.dtype} {tuple(draft.shape)}.")
    batch, n = draft.shape
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (batch, n + 1):
        raise InputError(f"target_probs must be [B={batch}, n+1={n + 1}, V], got {tuple(target_probs.shape)}.")
    vocab = target_probs.shape[-1]
    if tuple(draft_probs.shape) != (batch, n, vocab):
        raise InputError(f"draft_probs must be [B={batch}, n={n}, V={vocab}], got {tuple(draft_probs.shape)}.")
    p = target_probs.float()
    q = draft_probs.float().to(p.device)
    draft = draft.to(device=p.device, dtype=torch.long)
    p_draft = p[:, :n].gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp_min(1e-30), (p_draft > 0).float()).clamp_max(1.0)
    uniform = torch.rand((batch, n), generator=generator, device=p.device)
    kept = uniform < ratio  # one-hot p and q: ratio is exactly 0 or 1, so this is deterministic
    accepted = kept.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch, device=p.device)
    p_next = p[rows, accepted]
    q_next = F.pad(q, (0, 0, 0, 1))[rows, accepted]  # q = 0 at the bonus position: the residual is p_n itself
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    next_dist = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return accepted, _draw(next_dist, generator)


def greedy_accept(draft: Tensor, target_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(accepted [B], next_token [B]): the longest prefix of ``draft`` [B, n] equal to ``target_tokens`` [B, n + 1],
    and the target token right after it (at the first mismatch, or the bonus position).
    """
    if (
        draft.dim() != 2
        or target_tokens.dim() != 2
        or tuple(target_tokens.shape) != (draft.shape[0], draft.shape[1] + 1)
    ):
        raise InputError(
            f"greedy_accept needs draft [B, n] and target_tokens [B, n+1], got {tuple(draft.shape)} and "
            f"{tuple(target_tokens.shape)}."
        )
    target_tokens = target_tokens.long()
    n = draft.shape[1]
    accepted = (draft.long() == target_tokens[:, :n]).long().cumprod(dim=1).sum(dim=1)
    return accepted, target_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)
