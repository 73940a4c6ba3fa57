"""Checkpoint directories: exact round trips, atomic replacement, pruning, resolution and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loopformer.checkpoint as ckpt_module
from loopformer.checkpoint import (
    SHAPE_FIELDS,
    TrainingState,
    capture_rng,
    check_compatible,
    load_checkpoint,
    load_model_config,
    optimizer_from_flat,
    optimizer_to_flat,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from loopformer.errors import InputError
from loopformer.model import build_model
from loopformer.training.optim import EMA, build_optimizer
from support import small_config

CONFIG = small_config(injection="lti", qk_bias=True)
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(IDS, loops=2, labels=IDS, seed=0).loss.backward()
    optimizer.step()


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, lr=1e-2)
    ema = EMA(model, 0.9)
    for _ in range(2):
        train_step(model, optimizer)
        ema.update(model)
    return model, optimizer, ema


def simple_state(step: int, value: float = 0.0) -> TrainingState:
    return TrainingState(step=step, model={"w": torch.full((2, 2), value)}, config=CONFIG, meta={"v": value})


def test_full_round_trip_resumes_identically(tmp_path: Path) -> None:
    model, optimizer, ema = trained()
    generator = torch.Generator().manual_seed(7)
    torch.randn(3, generator=generator)
    meta = {"tokens": 1234, "sampler": {"epoch": 1, "order": [3, 1, 2]}, "train_config": {"lr": 0.01}}
    state = TrainingState(
        step=2,
        model=model.state_dict(),
        config=CONFIG,
        optimizer=optimizer.state_dict(),
        ema=ema.state_dict(),
        rng=capture_rng({"depth": generator}),
        tokenizer_json='{"model": "bpe", "text": "é"}',
        meta=meta,
    )
    expected = torch.randn(4, generator=generator), torch.randn(4)  # drawn right after the capture
    path = save_checkpoint(tmp_path / "run", state)
    assert path.name == "step-00000002"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == path.name
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json"} <= {
        p.name for p in path.iterdir()
    }
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.step == 2 and loaded.meta == meta and loaded.config == CONFIG
    assert loaded.tokenizer_json == state.tokenizer_json
    assert set(loaded.model) == set(state.model) and "head.weight" not in loaded.model  # tied: stored once
    assert all(torch.equal(loaded.model[k], v) for k, v in state.model.items())
    assert all(torch.equal(loaded.ema[k], v) for k, v in state.ema.items())
    restore_rng(loaded.rng, {"depth": generator})
    assert torch.equal(torch.randn(4, generator=generator), expected[0])
    assert torch.equal(torch.randn(4), expected[1])

    fresh = build_model(CONFIG, seed=1)
    fresh.load_state_dict(loaded.model)
    fresh_opt = build_optimizer(fresh, lr=1e-2)
    fresh_opt.load_state_dict(loaded.optimizer)
    train_step(model, optimizer)
    train_step(fresh, fresh_opt)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_optimizer_flat_form_is_exact() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "count": 5}, "a.b": {"x": torch.zeros(1)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "fused": None, "names": ["a.b"], "params": [0, "a.b"]}],
    }
    tensors, meta = optimizer_to_flat(state)
    json.dumps(meta)
    back = optimizer_from_flat(tensors, json.loads(json.dumps(meta)))
    assert list(back["state"]) == [0, "a.b"]
    assert back["state"][0]["step"].dim() == 0 and back["state"][0]["count"] == 5
    assert back["param_groups"] == state["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    with pytest.raises(InputError, match="missing"):
        optimizer_from_flat({}, meta)


def test_tied_and_shared_tensors_are_saved_once(tmp_path: Path) -> None:
    shared = torch.arange(6.0).view(2, 3)
    model = {"a": shared, "b": shared, "row": shared[1]}
    save_checkpoint(tmp_path, TrainingState(step=1, model=model, config=CONFIG))
    loaded = load_checkpoint(tmp_path).model
    assert loaded["a"] is loaded["b"] and torch.equal(loaded["row"], shared[1])


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, simple_state(step, float(step)), keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000030", "step-00000040"]
    save_checkpoint(tmp_path, simple_state(40, 99.0), keep_last=2)
    assert load_checkpoint(tmp_path).meta == {"v": 99.0}
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000030", "step-00000040"]
    save_checkpoint(tmp_path, simple_state(20), keep_last=1)  # an older step: kept, the newest go
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000020"]


def test_crash_midway_leaves_latest_on_a_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, simple_state(1, 1.0))
    real = ckpt_module.save_file
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", failing)
    state = simple_state(2, 2.0)
    state.ema = {"w": torch.zeros(2, 2)}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert not (root / "step-00000002").exists()
    assert load_checkpoint(tmp_path).meta == {"v": 1.0}

    # A crash while replacing the same step, just after the old directory moved aside.
    monkeypatch.setattr(ckpt_module, "save_file", real)
    renames = []

    def crash_second_rename(src: object, dst: object) -> None:
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    real_rename = ckpt_module.os.rename
    monkeypatch.setattr(ckpt_module.os, "rename", crash_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, simple_state(1, 5.0))
    monkeypatch.setattr(ckpt_module.os, "rename", real_rename)
    assert load_checkpoint(tmp_path).meta == {"v": 5.0}  # `latest` names the complete new temp dir
    save_checkpoint(tmp_path, simple_state(3, 3.0))
    assert not list(root.glob(".tmp-*"))


def test_latest_naming_a_missing_dir_falls_back_to_newest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, simple_state(5, 5.0))
    save_checkpoint(tmp_path, simple_state(6, 6.0))
    (tmp_path / "checkpoints" / "latest").write_text(".tmp-gone\n")
    assert resolve_checkpoint(tmp_path).name == "step-00000006"


def test_resolve_accepts_run_checkpoints_and_step_dirs(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "run", simple_state(3))
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints") == path
    assert resolve_checkpoint(path) == path
    assert load_model_config(tmp_path / "run") == CONFIG
    assert load_model_config(path / "config.json") == CONFIG
    for bad in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(InputError, match="No checkpoint found in"):
            resolve_checkpoint(bad)


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "trainer.json", "optimizer.json"])
def test_corrupt_files_raise_one_sentence(tmp_path: Path, target: str) -> None:
    state = simple_state(1)
    state.optimizer = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = save_checkpoint(tmp_path, state)
    (path / target).write_bytes(b"\x00garbage{")
    with pytest.raises(InputError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert target in message and message.endswith(".") and "\n" not in message


def test_invalid_config_and_missing_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, simple_state(1))
    (path / "config.json").write_text(json.dumps({"dim": -1}))
    with pytest.raises(InputError, match="dim"):
        load_checkpoint(tmp_path)
    (path / "config.json").write_text(CONFIG.to_json())
    (path / "trainer.json").unlink()
    with pytest.raises(InputError, match=r"trainer\.json"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="JSON"):
        save_checkpoint(tmp_path, TrainingState(step=2, model={}, config=CONFIG, meta={"x": object()}))
    assert resolve_checkpoint(tmp_path) == path


def test_check_compatible_names_the_field() -> None:
    check_compatible(CONFIG, CONFIG.replace(recurrence={"mean_loops": 9}, rope_base=500.0, loop_embedding="sinusoidal"))
    with pytest.raises(InputError, match=r"The checkpoint has dim=32, the requested config has dim=64\."):
        check_compatible(CONFIG, CONFIG.replace(dim=64, head_dim=8, mlp_hidden=64))
    with pytest.raises(InputError, match=r"injection='lti'.*injection='concat'"):
        check_compatible(CONFIG, CONFIG.replace(injection="concat"))


def shapes(config: object) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}


def test_shape_fields_are_exactly_the_ones_that_change_parameters() -> None:
    base = small_config(lora_rank=2)
    changed: dict[str, object] = {
        "vocab_size": 32,
        "dim": 48,
        "n_heads": {"n_heads": 2, "head_dim": 8},
        "n_kv_heads": 2,
        "head_dim": 16,
        "n_prelude": 2,
        "n_core": 1,
        "n_coda": 2,
        "mlp_hidden": 32,
        "norm_layout": "pre",
        "qk_bias": True,
        "qk_norm": True,
        "tie_embeddings": False,
        "injection": "add",
        "loop_embedding": "learned",
        "lora_rank": 4,
        "per_loop_slots": 3,
        "halting": "act",
        "attention": "mla",
        "moe_routed": 4,
        "memory_dim": 8,
    }
    # fields that matter only with a feature switched on: changed against a base that has it
    mla_base, moe_base = base.replace(attention="mla"), base.replace(moe_routed=4)
    conditional = {
        "halting_input": (base.replace(halting="act"), "state+change"),
        "mla_kv_rank": (mla_base, 4),
        "mla_q_rank": (mla_base, 8),
        "mla_rope_dim": (mla_base, 6),
        "moe_shared": (moe_base, 2),
        "moe_hidden": (moe_base, 24),
    }
    assert set(changed) | set(conditional) == set(SHAPE_FIELDS)
    cases = [(name, base, value) for name, value in changed.items()]
    cases += [(name, start, value) for name, (start, value) in conditional.items()]
    for name, start, value in cases:
        changes = value if isinstance(value, dict) else {name: value}
        assert shapes(start) != shapes(start.replace(**changes)), name
        with pytest.raises(InputError, match=name):
            check_compatible(start, start.replace(**changes))
    for name, (_, value) in conditional.items():  # without the feature they change nothing
        assert shapes(base) == shapes(base.replace(**{name: value})), name
        check_compatible(base, base.replace(**{name: value}))
    for name, value in {"rope_base": 100.0, "norm_eps": 1e-5, "sliding_window": 4, "max_seq_len": 64}.items():
        assert shapes(base) == shapes(base.replace(**{name: value})), name
        check_compatible(base, base.replace(**{name: value}))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_checkpoints_and_staged_folders_get_the_umask_mode(tmp_path: Path, mask: int) -> None:
    """Atomic writes go through 0700 / 0600 temp folders and files; what lands must have the umask's modes."""
    import os
    import stat

    from loopformer.checkpoint import staged_directory
    from loopformer.config import atomic_write_text

    previous = os.umask(mask)
    try:
        path = save_checkpoint(tmp_path / "run", simple_state(1))
        with staged_directory(tmp_path / "export") as staged:
            (staged / "weights.bin").write_bytes(b"x")
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    folders = [path, tmp_path / "export"]
    files = [*path.iterdir(), path.parent / "latest", tmp_path / "export" / "weights.bin", tmp_path / "report.json"]
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, folder
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file
