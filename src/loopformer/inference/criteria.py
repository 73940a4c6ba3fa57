"""The zero-shot exit criteria and their default thresholds (the table in :mod:`loopformer.inference.exits`).

Plain data, importable without torch, so that command-line help can list them.
"""

from __future__ import annotations

EXIT_CRITERIA: dict[str, float] = {
    "kl": 5e-4,
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "minp-kl": 1e-5,
    "argmax-stability": 5,
    "cosine": 1e-3,
}
ACT_DEFAULT_THRESHOLD = 0.99  # the learned "act" criterion: nn.halting.ACT_THRESHOLD (a test keeps them equal)
DEFAULT_RULES = tuple(f"{name}:{threshold:g}" for name, threshold in EXIT_CRITERIA.items())  # each at its default
