"""Training-depth samplers: how many core iterations a training step runs.

Every draw takes an explicit ``torch.Generator`` so a resumed run draws the same depths. Depths are
sampled on the CPU (they are a handful of integers) whatever device the model lives on.

* ``lognormal-poisson`` (Huginn): lambda ~ LogNormal(ln m - sigma^2/2, sigma), r = Poisson(lambda) + 1.
* ``fixed``: r = m.
* ``uniform``: r uniform on {1, ..., 2m - 1} (mean m).
* ``poisson`` (Parcae): r = max(1, Poisson(m)).
* ``geometric``: r ~ Geometric(1/m) on {1, 2, ...} (mean m).

``max_loops`` (if set) caps every draw.
"""

from __future__ import annotations

import math

import torch

from loopformer.config import RecurrenceConfig


def sample_depths(config: RecurrenceConfig, count: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` independent depth draws as a CPU LongTensor, each >= 1."""
    m = float(config.mean_loops)
    if config.sampler == "fixed":
        steps = torch.full((count,), config.mean_loops, dtype=torch.long)
    elif config.sampler == "lognormal-poisson":
        mu = math.log(m) - config.sigma**2 / 2
        rate = torch.exp(torch.normal(mu, config.sigma, (count,), generator=generator, dtype=torch.float64))
        steps = torch.poisson(rate, generator=generator).long() + 1
    elif config.sampler == "uniform":
        steps = torch.randint(1, 2 * config.mean_loops, (count,), generator=generator)
    elif config.sampler == "poisson":
        rate = torch.full((count,), m, dtype=torch.float64)
        steps = torch.poisson(rate, generator=generator).long().clamp(min=1)
    else:  # geometric
        if config.mean_loops == 1:
            steps = torch.ones(count, dtype=torch.long)
        else:
            u = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # in (0, 1]
            steps = torch.floor(torch.log(u) / math.log(1.0 - 1.0 / m)).long() + 1
    if config.max_loops is not None:
        steps = steps.clamp(max=config.max_loops)
    return steps


def sample_depth(
    config: RecurrenceConfig, batch_size: int, generator: torch.Generator | None = None
) -> int | torch.Tensor:
    """One depth for the batch (an int), or one per row ([batch_size] tensor) if ``per_sequence``."""
    if config.per_sequence:
        return sample_depths(config, batch_size, generator)
    return int(sample_depths(config, 1, generator)[0])
