"""AdamW parameter groups, stateless learning-rate schedules and an fp32 weight EMA.

Weight decay applies to weight matrices only: linear layers, LoRA factors and an untied LM head.
Norm weights, biases (including the 2-D ``q_bias`` / ``k_bias``), every injection parameter (LTI
``log_a`` / ``dt_bias`` / ``B``, the concat adapter), loop-embedding tables and, unless
``decay_embeddings``, the token embedding are not decayed.

The schedule is a pure function of the step, so a resumed run sees exactly the learning rates an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from loopformer.errors import InputError

SCHEDULES = ("constant", "cosine", "wsd")

# Leading wrappers added by DDP / DataParallel and torch.compile, and inner ones added by FSDP1 and
# activation-checkpoint wrappers; none of them is part of the model's own parameter names.
_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_NO_DECAY_PREFIXES = ("injection.", "loop_embedding.")


def unwrap_name(name: str) -> str:
    """A parameter name without DDP (``module.``), torch.compile (``_orig_mod.``) or FSDP1 wrapper segments."""
    for inner in _INNER_WRAPPERS:
        name = name.replace(inner, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel and torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_no_decay(name: str, param: torch.Tensor, decay_embeddings: bool = False) -> bool:
    """True when the (unwrapped) parameter ``name`` must not be weight-decayed."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim < 2 or leaf == "bias" or leaf.endswith("_bias"):
        return True
    if name.startswith(_NO_DECAY_PREFIXES):
        return True
    return name == "tok_emb.weight" and not decay_embeddings


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups, ``[decay, no_decay]``, each ``{"params", "weight_decay", "names"}``.

    Only parameters with ``requires_grad`` are included; a parameter shared by several modules (a tied
    embedding) appears once. ``names`` are unwrapped names (see :func:`unwrap_name`).
    """
    decay: dict = {"params": [], "weight_decay": weight_decay, "names": []}
    no_decay: dict = {"params": [], "weight_decay": 0.0, "names": []}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = unwrap_name(raw_name)
        group = no_decay if is_no_decay(name, param, decay_embeddings) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [decay, no_decay]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (empty groups dropped); ``fused=None`` lets torch choose."""
    groups = [g for g in parameter_groups(model, weight_decay, decay_embeddings) if g["params"]]
    if not groups:
        raise InputError("The model has no trainable parameters to optimise.")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of 0-based ``step`` in a run of ``total_steps`` steps (a pure function).

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the last warmup
    step is at ``base_lr``). Afterwards:

    * ``constant``: ``base_lr``;
    * ``cosine``: from ``base_lr`` at the first post-warmup step to ``min_lr`` at the last step
      ``total_steps - 1``, following half a cosine;
    * ``wsd`` (warmup-stable-decay): ``base_lr`` until the last ``D = round(decay_fraction *
      total_steps)`` steps, which decrease linearly and reach ``min_lr`` at the last step.

    Steps past the end keep the final value.
    """
    if schedule not in SCHEDULES:
        raise InputError(f"Unknown schedule {schedule!r}: allowed values are {', '.join(map(repr, SCHEDULES))}.")
    if total_steps < 1 or warmup_steps < 0 or step < 0:
        raise InputError(
            f"Need step >= 0, total_steps >= 1, warmup_steps >= 0; got {step}, {total_steps}, {warmup_steps}."
        )
    if not 0.0 <= decay_fraction <= 1.0:
        raise InputError(f"decay_fraction must lie in [0, 1], got {decay_fraction}.")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    last = total_steps - 1
    if schedule == "cosine":
        span = last - warmup_steps
        progress = 1.0 if span <= 0 else min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = min(round(decay_fraction * total_steps), total_steps - warmup_steps)
        if decay_steps <= 0:
            return base_lr
        start = total_steps - decay_steps
        if step < start:
            return base_lr
        progress = min((step - start + 1) / decay_steps, 1.0)
        return base_lr + (min_lr - base_lr) * progress
    return base_lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (in place for tensor learning rates)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class EMA:
    """Exponential moving average of the weights in fp32: ema = decay*ema + (1-decay)*param after each optimizer step.

    Tracks the parameters of the unwrapped model (DDP / torch.compile wrappers are looked through),
    keyed by their names in its ``state_dict()``; the averages live on the parameters' devices.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise InputError(f"EMA decay must lie in [0, 1), got {decay}.")
        self.decay = decay
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in self._params(model)
            }

    @staticmethod
    def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(unwrap_model(model).named_parameters())

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
        params = self._params(model)
        if [name for name, _ in params] != list(self.shadow):
            raise InputError("The model's parameters do not match the ones this EMA was created for.")
        return [self.shadow[name] for name, _ in params], [p for _, p in params]

    def decay_at(self, updates: int | None) -> float:
        """The decay of update number ``updates`` (1-based): ``min(decay, (1 + n) / (10 + n))``, so the first
        updates forget the initial weights quickly; ``None`` means the plain ``decay``."""
        return self.decay if updates is None else min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int | None = None) -> None:
        """Move every average towards the current weights: ``ema += (1 - d) * (param - ema)``, with
        ``d = decay_at(updates)`` (the trainer passes its step count, so short runs are not dominated by the
        random initial weights)."""
        shadows, params = self._pairs(model)
        sources = [p.detach().float() for p in params]
        torch._foreach_lerp_(shadows, sources, 1.0 - self.decay_at(updates))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> fp32 average (the live tensors; clone them to keep a snapshot)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved averages in; the names and shapes must match exactly."""
        if set(state) != set(self.shadow):
            diff = sorted(set(state) ^ set(self.shadow))
            raise InputError(f"EMA state does not match the model (differing names: {', '.join(diff[:5])}).")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(self.shadow[name].shape):
                want = tuple(self.shadow[name].shape)
                raise InputError(f"EMA state for {name} has shape {tuple(tensor.shape)}, the model has {want}.")
            self.shadow[name].copy_(tensor)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the averaged weights into ``model`` for the ``with`` block, then restore the originals."""
        shadows, params = self._pairs(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, shadows, strict=True):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)
