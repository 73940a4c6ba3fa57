"""A real model whose greedy output is chosen in advance: the reply to a prompt of length L is fixed by L.

Attention outputs and the injection's input term are zeroed, so the final state at position p depends only on p's
initial state (the engine's seeded per-position table), never on the tokens. The LM head is then fitted (least
squares) so that the argmax at position p is the scripted token. The server runs this model like any other; only
its weights are arranged, so the tests exercise real generation, batching, detokenisation and parsing.
"""

from __future__ import annotations

import torch

from loopformer.inference.engine import Engine
from loopformer.model import LoopLM, build_model
from loopformer.nn.attention import Attention
from loopformer.tokenizer import TextTokenizer
from support import small_config

MARGIN = 10.0  # logit of the scripted token; every other token gets about 0


def scripted_model(tokenizer: TextTokenizer, replies: dict[int, str], max_seq_len: int = 640) -> LoopLM:
    """A model that answers a prompt of ``L`` tokens with ``replies[L]`` (encoded; end it with a stop token)."""
    targets: dict[int, int] = {}
    for length, text in replies.items():
        for offset, token in enumerate(tokenizer.encode(text)):
            position = length - 1 + offset  # the logits at position p choose the token placed at p + 1
            if position in targets:
                raise ValueError(f"scripted replies overlap at position {position}")
            targets[position] = token
    config = small_config(
        vocab_size=tokenizer.vocab_size, dim=256, mlp_hidden=128, max_seq_len=max_seq_len, tie_embeddings=False
    )
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.out.weight.zero_()
        model.injection.input_proj.weight.zero_()
        positions = torch.arange(max_seq_len)[None]
        features: list[torch.Tensor] = []
        hook = model.final_norm.register_forward_hook(lambda _m, _i, out: features.append(out))
        model(torch.zeros_like(positions), initial_state=Engine(model).initial_state(positions))
        hook.remove()
        hidden = features[-1][0]  # the head's input at every position
        rows = sorted(targets)
        goal = torch.zeros(len(rows), config.vocab_size)
        goal[torch.arange(len(rows)), torch.tensor([targets[p] for p in rows])] = MARGIN
        head = torch.linalg.lstsq(hidden[rows].double(), goal.double()).solution.T.float()
        model.head.weight.copy_(head)
    return model
