"""The transformers wrapper: generate == our engine, save / load, Auto classes, an offline remote-code export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loopformer.checkpoint import TrainingState, write_checkpoint_dir
from loopformer.cli import main
from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.inference.chat import Message, encode_chat, encode_prompt
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.interop import hf
from loopformer.interop.hf import LoopformerForCausalLM, LoopSession
from loopformer.model import build_model
from loopformer.tokenizer import TextTokenizer

# init_std well above the default so that a random model's greedy tokens depend on the prompt and the depth
CONFIG = ModelConfig(
    vocab_size=272, dim=32, n_heads=4, max_seq_len=128, init_std=0.3, recurrence={"mean_loops": 3, "backprop_loops": 2}
)
NEW = 12


@pytest.fixture(scope="module")
def model() -> LoopformerForCausalLM:
    return LoopformerForCausalLM.wrap(build_model(CONFIG, seed=0)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, left-padded with id 0, and their attention mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(14, 270, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def engine_tokens(model: LoopformerForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **config: object) -> list:
    config = GenerationConfig(max_new_tokens=NEW, stop_tokens=(), **config)
    return [o.tokens for o in Engine(model.model).generate(ids, config, attention_mask=mask).outputs]


def hf_tokens(model: LoopformerForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> list:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("steps", [1, 4])
def test_greedy_generate_equals_our_engine(model: LoopformerForCausalLM, steps: int) -> None:
    ids, mask = padded_batch()
    ours = engine_tokens(model, ids, mask, loops=steps)
    assert hf_tokens(model, ids, mask, loops=steps) == ours
    assert ours[0] != ours[1]  # the rows differ, so padding and per-row positions are exercised
    assert hf_tokens(model, ids, mask, loops=steps, use_cache=False) == ours  # full recompute agrees


def test_depth_reaches_the_model(model: LoopformerForCausalLM) -> None:
    ids, mask = padded_batch()
    assert hf_tokens(model, ids, mask, loops=1) != hf_tokens(model, ids, mask, loops=4)


def test_exit_kv_and_warm_start_pass_through(model: LoopformerForCausalLM) -> None:
    ids, mask = padded_batch()
    options = {"exit": "latent-diff:0.5", "kv": "ring:2", "warm_start": True, "state_seed": 3}
    ours = engine_tokens(model, ids, mask, loops=6, **options)
    assert hf_tokens(model, ids, mask, loops=6, **options) == ours
    assert ours != engine_tokens(model, ids, mask, loops=6)  # the options changed something
    with pytest.raises(InputError, match="decode token by token"):
        hf_tokens(model, ids, mask, loops=6, exit="kl:1e-3", use_cache=False)


def test_a_session_refuses_rewritten_inputs(model: LoopformerForCausalLM) -> None:
    session, ids = LoopSession(), torch.tensor([[20, 21, 22]])
    session.advance(model.loop_engine(), ids, None, {})
    session.advance(model.loop_engine(), torch.tensor([[20, 21, 22, 30]]), None, {})
    with pytest.raises(InputError, match="one new token per row"):
        session.advance(model.loop_engine(), torch.tensor([[20, 21, 23, 30, 31]]), None, {})


def test_the_cache_grows_past_its_first_allocation(model: LoopformerForCausalLM, monkeypatch) -> None:
    monkeypatch.setattr(hf, "FIRST_CAPACITY", 3)
    ids, mask = padded_batch()
    session = LoopSession()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        loops=2,
        loop_session=session,
    )
    assert session.session.cache.capacity > ids.shape[1] + 3  # it grew from the first allocation
    config = GenerationConfig(max_new_tokens=40, loops=2, stop_tokens=())
    ours = [o.tokens for o in Engine(model.model).generate(ids, config, attention_mask=mask).outputs]
    assert out[:, ids.shape[1] :].tolist() == ours


def test_hidden_states_are_the_embeddings_then_the_state_after_each_loop(model: LoopformerForCausalLM) -> None:
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, loops=3, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 4 and all(h.shape == (*ids.shape, CONFIG.dim) for h in hidden)
    assert torch.equal(hidden[0], model.model.tok_emb(ids))
    with torch.no_grad():
        ctx = model.model.context(ids, attention_mask=hf._padded_mask(mask, None))
        for loops in (1, 2, 3):  # decoding the state after i loops gives the logits of a forward at depth i
            logits = model(ids, attention_mask=mask, loops=loops).logits
            torch.testing.assert_close(model.model.decode(hidden[loops], ctx), logits)
    assert model(ids, attention_mask=mask, loops=3).hidden_states is None  # only on request
    with pytest.raises(InputError, match="hidden states come from a forward pass"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=2, output_hidden_states=True, return_dict_in_generate=True
        )


def test_training_forward_has_a_loss_with_gradients(model: LoopformerForCausalLM) -> None:
    trainable = LoopformerForCausalLM.wrap(build_model(CONFIG, seed=1)).train()
    ids, _ = padded_batch()
    out = trainable(ids, labels=ids, loops=2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and trainable.model.tok_emb.weight.grad is not None


def test_save_and_load_through_the_auto_classes(model: LoopformerForCausalLM, tmp_path: Path) -> None:
    model.save_pretrained(str(tmp_path / "hf"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(back, LoopformerForCausalLM) and back.config.model_config == CONFIG
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["model.coda.0.mlp.proj.weight"]
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"missing keys model\.coda\.0\.mlp\.proj\.weight.*unexpected keys"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))


FRESH = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "loopformer" not in sys.modules
path, ids, mask, new = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
import torch
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
ids, mask = torch.tensor(ids), torch.tensor(mask)
out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, loops=4, pad_token_id=0)
chat = chat["input_ids"] if hasattr(chat, "keys") else chat  # transformers 5 returns an encoding, 4 a list
prompt = tokenizer(sys.argv[5], return_tensors="pt")
reply = model.generate(**prompt, max_new_tokens=new, do_sample=False, loops=4)
print(json.dumps({
    "tokens": out[:, ids.shape[1]:].tolist(), "chat": chat, "prompt": prompt["input_ids"][0].tolist(),
    "reply": reply[0, prompt["input_ids"].shape[1]:].tolist(),
}))
"""


def test_export_loads_offline_in_a_fresh_process(model: LoopformerForCausalLM, tmp_path: Path) -> None:
    tokenizer = TextTokenizer.byte_level()
    state = TrainingState(step=0, model=model.model.state_dict(), config=CONFIG, tokenizer_json=tokenizer.to_json())
    write_checkpoint_dir(tmp_path / "ckpt", state)
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    ids, mask = padded_batch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    text = "The capital of France is"
    args = [str(tmp_path / "hf"), json.dumps(ids.tolist()), json.dumps(mask.tolist()), str(NEW), text]
    run = subprocess.run([sys.executable, "-c", FRESH, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == engine_tokens(model, ids, mask, loops=4)
    assert result["chat"] == encode_chat(tokenizer, [Message("user", "Hi there")])
    prompt = encode_prompt(tokenizer, text)  # what `loopformer generate --prompt` feeds the engine: bos first
    assert result["prompt"] == prompt and prompt[0] == tokenizer.bos_id
    assert result["reply"] == engine_tokens(model, torch.tensor([prompt]), torch.ones(1, len(prompt)), loops=4)[0]
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2  # the target exists
