"""The logit lens: decode every intermediate latent state with the coda and head to see when a prediction forms.

One forward pass of ``loops`` iterations streams each state s_i to a callback that decodes it with the same
attention context as the final state (final norm -> coda -> final norm -> head) and keeps only the top-k
tokens, their probabilities and the entropy of the distribution; no full logits tensor is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopformer.analysis.common import check_ids, check_loops, stream_iterations
from loopformer.errors import InputError


@dataclass
class LogitLens:
    """What each iteration's state would predict.

    ``top_ids`` / ``top_probs`` [R, B, T, k]: the k most likely next tokens of decode(s_i) (most likely first)
    and their probabilities (softmax in fp32). ``final_ids`` [B, T]: the argmax at the last iteration, the same
    as the argmax of ``model(ids, loops=R, seed=seed).logits``. ``first_hit`` [B, T]: the first iteration
    (1-based, always in 1..R) from which the argmax equals ``final_ids`` and stays equal until iteration R.
    ``entropy`` [R, B, T]: entropy (nats) of each iteration's distribution.
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    final_ids: torch.Tensor
    first_hit: torch.Tensor
    entropy: torch.Tensor

    @property
    def loops(self) -> int:
        return self.top_ids.shape[0]


def first_stable_hit(predictions: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """First iteration (1-based) from which ``predictions`` [R, ...] equal ``final`` [...] until the end.

    This is one plus the last iteration that differs (0 if none does), so a position that never matches before
    the last iteration gets R, and one that matches throughout gets 1.
    """
    loops = predictions.shape[0]
    iteration = torch.arange(1, loops + 1, device=predictions.device).view(-1, *([1] * final.dim()))
    differs = predictions != final.unsqueeze(0)
    return (differs * iteration).amax(dim=0) + 1


def logit_lens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    loops: int,
    *,
    k: int = 5,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> LogitLens:
    """Decode the state after each of ``loops`` iterations of ``model`` on ``ids`` [B, T]; keep the top ``k``.

    The pass is ``model(ids, loops=loops, seed=seed, attention_mask=attention_mask)``; its own final logits
    serve as the last iteration's, so the lens ends exactly where the forward does. The model runs in eval mode
    (its previous mode is restored).
    """
    ids = check_ids(ids)
    loops = check_loops(loops)
    vocab = model.config.vocab_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise InputError(f"k must be an integer between 1 and the vocabulary size {vocab}, got {k!r}.")
    batch, length = ids.shape
    device = ids.device
    top_ids = torch.empty((loops, batch, length, k), dtype=torch.long, device=device)
    top_probs = torch.empty((loops, batch, length, k), dtype=torch.float32, device=device)
    entropy = torch.empty((loops, batch, length), dtype=torch.float32, device=device)

    def record(iteration: int, logits: torch.Tensor) -> None:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        values, indices = log_probs.topk(k, dim=-1)
        top_ids[iteration - 1] = indices
        top_probs[iteration - 1] = values.exp()
        probs = log_probs.exp()
        entropy[iteration - 1] = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)

    stream_iterations(
        model, ids, loops, lambda i, _, logits: record(i, logits), decode=True, seed=seed, attention_mask=attention_mask
    )
    final_ids = top_ids[-1, ..., 0].clone()
    first_hit = first_stable_hit(top_ids[..., 0], final_ids)
    return LogitLens(top_ids, top_probs, final_ids, first_hit, entropy)
