"""No config can make the tool allocate what the machine does not have: shapes are checked on the meta device,
against the checkpoint's tensors and the memory available, before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loopformer
import loopformer.hardware as hardware
import loopformer.loading as loading
from loopformer.checkpoint import TrainingState, resolve_checkpoint, save_checkpoint
from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.inference.cache import KVCache
from loopformer.model import build_model, meta_model
from loopformer.presets import get_preset
from support import small_config

CONFIG = small_config()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    save_checkpoint(
        tmp_path / "run", TrainingState(step=1, model=build_model(CONFIG, seed=0).state_dict(), config=CONFIG)
    )
    return tmp_path / "run"


def _edit_config(run: Path, **changes: object) -> None:
    path = resolve_checkpoint(run) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_config_too_large_to_address_is_one_sentence(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_config(run, dim=1_000_000_000, n_heads=4)
    with pytest.raises(InputError, match=r"does not fit the model: wrong shapes .*\(expected \[1000000000"):
        loopformer.load(run)  # the header's shapes disagree: refused before anything is built
    assert main(["generate", "--ckpt", str(run), "--prompt", "x"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("loopformer: error: ")


def test_a_config_that_disagrees_with_the_tensors_is_refused_before_building(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _edit_config(run, mlp_hidden=400_000)
    built: list[object] = []
    monkeypatch.setattr(loading, "build_model", lambda *a, **k: built.append(a) or build_model(*a, **k))
    with pytest.raises(InputError, match=r"wrong shapes .*mlp.proj.weight \[32, 64\] \(expected \[32, 400000\]\)"):
        loopformer.load(run)
    assert built == []  # refused on the header shapes: the 400,000-wide model was never allocated


@pytest.mark.parametrize("start", ["resume", "init-from"])
def test_training_from_a_checkpoint_asking_for_a_million_layers_is_refused_at_once(
    run: Path, start: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The layer-count check runs where the checkpoint is read, so training from it never builds the model."""
    _edit_config(run, n_core=1_000_000)
    out = run if start == "resume" else tmp_path / "tuned"
    flags = ["--resume"] if start == "resume" else ["--init-from", str(run)]
    assert main(["train", *flags, "--out", str(out), "--steps", "4", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "asks for 1000002 layers" in line and line.startswith("loopformer: error: ")


def test_parameters_or_cache_beyond_the_available_memory_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "available_memory", lambda: 1 << 20)  # 1 MiB left
    wide = small_config(dim=256, mlp_hidden=1024)
    with pytest.raises(InputError, match=r"This model \([\d,]+ parameters\) needs [\d.]+ GiB, more than the 0\.0 GiB"):
        build_model(wide)
    with pytest.raises(InputError, match=r"A KV cache of 8 x 4096 tokens at 32 loops needs [\d.]+ GiB"):
        KVCache(CONFIG, batch_size=8, capacity=4096, max_loops=32)
    with pytest.raises(InputError, match="too large to allocate"):
        build_model(small_config(dim=1 << 40, n_heads=4, head_dim=None, mlp_hidden=1 << 40))
    monkeypatch.setattr(hardware, "available_memory", lambda: None)  # unknown: no refusal
    assert KVCache(CONFIG, batch_size=1, capacity=4, max_loops=2).capacity == 4


def test_train_refuses_a_huge_dim_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--preset", "tiny", "--dim", "1000000000", "--tokenizer", "byte", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("loopformer: error: ")
    assert torch.get_default_device().type == "cpu"  # the meta build left the default device alone


@pytest.mark.parametrize("preset", ["tiny", "mythos-tiny", "anima-micro"])
def test_the_meta_skeleton_has_the_real_models_shapes(preset: str) -> None:
    config = get_preset(preset)
    real = {name: tuple(t.shape) for name, t in build_model(config, seed=0).state_dict().items()}
    assert {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()} == real
