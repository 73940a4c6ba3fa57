"""The memory pathway at inference: cached decoding, batching and speculative decoding stay exact with memory;
``--memory`` files on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.memory_file import load_memory_file
from loopformer.model import LoopLM, build_model
from loopformer.tokenizer import TextTokenizer
from support import small_config

MEMORY_DIM = 6
PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2], [33, 7, 21, 60]]


def memory_model(**changes: object) -> LoopLM:
    """A tiny model whose memory pathway is switched on (non-zero output projection)."""
    model = build_model(small_config(memory_dim=MEMORY_DIM, tie_embeddings=False, **changes), seed=0)
    with torch.no_grad():
        model.memory.out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_cached_scoring_with_memory_matches_the_full_forward() -> None:
    model = memory_model()
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    memory = torch.randn(2, 3, MEMORY_DIM)
    log_probs, _, _ = engine.score(ids, GenerationConfig(loops=4), memory=memory)
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    with torch.no_grad():
        logits = model(ids, loops=4, initial_state=engine.initial_state(positions), memory=memory).logits
    expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs, expected, atol=1e-4, rtol=1e-4)
    unconditioned, _, _ = engine.score(ids, GenerationConfig(loops=4))
    assert not torch.allclose(log_probs, unconditioned, atol=1e-3)


def test_batched_generation_with_per_row_memory_equals_each_row_alone() -> None:
    engine = Engine(memory_model())
    memory = torch.randn(len(PROMPTS), 2, MEMORY_DIM, generator=torch.Generator().manual_seed(3))
    config = GenerationConfig(max_new_tokens=5, loops=3)
    batched = engine.generate(PROMPTS, config, memory=memory)
    for row, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], config, memory=memory[row])
        assert batched.outputs[row].tokens == alone.outputs[0].tokens
    padded_memory = torch.cat((memory, torch.randn(len(PROMPTS), 1, MEMORY_DIM)), dim=1)
    mask = torch.tensor([[True, True, False]] * len(PROMPTS))
    masked = engine.generate(PROMPTS, config, memory=padded_memory, memory_mask=mask)
    assert [o.tokens for o in masked.outputs] == [o.tokens for o in batched.outputs]


def test_memory_with_exits_and_speculative_decoding() -> None:
    engine = Engine(memory_model())
    memory = torch.randn(4, MEMORY_DIM, generator=torch.Generator().manual_seed(4))
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=6, loops=4), memory=memory)
    fast = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=6, loops=4, speculative=(1, 3)), memory=memory)
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in plain.outputs]
    exits = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=6, loops=4, exit="latent-diff:0.5"), memory=memory)
    assert all(len(o.tokens) == 6 for o in exits.outputs)


def test_engine_memory_errors() -> None:
    with pytest.raises(InputError, match="no memory pathway"):
        Engine(build_model(small_config(), seed=0)).generate([[1, 2]], memory=torch.randn(2, MEMORY_DIM))
    with pytest.raises(InputError, match=r"\[3, vectors, 6\]"):
        Engine(memory_model()).generate(PROMPTS, memory=torch.randn(2, 2, MEMORY_DIM))


# ----- files and the CLI ------------------------------------------------------------------------------
def test_memory_files(tmp_path: Path) -> None:
    vectors = torch.randn(3, MEMORY_DIM)
    save_file({"anything": vectors}, tmp_path / "one.safetensors")
    save_file({"memory": vectors, "ids": torch.zeros(3)}, tmp_path / "named.safetensors")
    save_file({"a": vectors, "b": vectors.clone()}, tmp_path / "two.safetensors")
    np.save(tmp_path / "vectors.npy", vectors.numpy().astype(np.float16))
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "notes.txt").write_text("1 2 3")
    torch.testing.assert_close(load_memory_file(tmp_path / "one.safetensors"), vectors)
    torch.testing.assert_close(load_memory_file(tmp_path / "named.safetensors"), vectors)
    torch.testing.assert_close(load_memory_file(tmp_path / "vectors.npy"), vectors, atol=1e-2, rtol=1e-2)
    for name, message in [
        ("two.safetensors", "name the vectors 'memory'"),
        ("objects.npy", "not a numeric .npy array"),
        ("notes.txt", r"must end in .safetensors or .npy"),
        ("missing.npy", "does not exist"),
    ]:
        with pytest.raises(InputError, match=message):
            load_memory_file(tmp_path / name)


@pytest.fixture(scope="module")
def memory_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    tokenizer = TextTokenizer.byte_level()
    run = tmp_path_factory.mktemp("memory-run")
    model = build_model(
        small_config(vocab_size=tokenizer.vocab_size, max_seq_len=64, memory_dim=MEMORY_DIM, tie_embeddings=False),
        seed=0,
    )
    with torch.no_grad():
        model.memory.out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    state = TrainingState(step=0, model=model.state_dict(), config=model.config, tokenizer_json=tokenizer.to_json())
    save_checkpoint(run, state)
    return str(run)


def test_generate_cli_takes_a_memory_file(memory_ckpt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for seed in (0, 1):
        path = tmp_path / f"memory{seed}.npy"
        np.save(path, torch.randn(4, MEMORY_DIM, generator=torch.Generator().manual_seed(seed)).numpy())
        argv = ["generate", "--ckpt", memory_ckpt, "--prompt", "loop", "--max-new-tokens", "8", "--loops", "2"]
        assert main([*argv, "--json", "--memory", str(path)]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["outputs"][0]["tokens"])
    assert outputs[0] != outputs[1]  # the answer depends on the memory


def test_generate_cli_memory_errors(memory_ckpt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, MEMORY_DIM + 1), dtype=np.float32))
    argv = ["generate", "--ckpt", memory_ckpt, "--prompt", "loop", "--max-new-tokens", "2"]
    assert main([*argv, "--memory", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"width {MEMORY_DIM + 1}; this model takes {MEMORY_DIM}" in err and "Traceback" not in err
    assert main([*argv, "--memory", str(tmp_path / "absent.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
