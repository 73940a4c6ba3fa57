"""What ``dtype: auto`` resolves to, from the CPU's flags and a timed probe, and where the choice is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loopformer.hardware as hardware
from loopformer.cli import main
from loopformer.errors import ConfigError, InputError
from loopformer.hardware import AUTO_DTYPE_ENV, CpuInfo, resolve_dtype
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.model import build_model
from loopformer.training.config import TrainConfig
from loopformer.training.trainer import Trainer
from support import small_config, write_corpus

AVX2 = CpuInfo("AVX2 machine", ("avx2",), "AVX2")
AMX = CpuInfo("AMX machine", ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), "AVX512")


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Lets a test pose as a CPU with given flags and a given bf16 probe result (the suite pins auto otherwise)."""
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)

    def pose(info: CpuInfo, speedup: float | None = None) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: info)
        if speedup is not None:
            monkeypatch.setattr(hardware, "_bf16_speedup", lambda probe: speedup)

    return pose


def test_explicit_dtypes_are_taken_as_asked() -> None:
    assert resolve_dtype("fp32").to_dict() == {"dtype": "fp32", "requested": "fp32", "reason": "asked for"}
    choice = resolve_dtype("bf16")
    assert choice.name == "bf16" and choice.autocast_dtype is torch.bfloat16
    with choice.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu")
    with resolve_dtype("fp32").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_auto_is_fp32_on_a_cpu_without_bf16_instructions(machine) -> None:
    machine(AVX2, speedup=5.0)  # the probe is not even consulted
    choice = resolve_dtype("auto")
    assert choice.name == "fp32" and choice.requested == "auto" and "neither AMX nor AVX512-BF16" in choice.reason


def test_auto_takes_bf16_only_where_it_measures_faster(machine) -> None:
    machine(AMX, speedup=3.2)
    faster = resolve_dtype("auto", "cpu", (64, 32, 32))
    assert faster.name == "bf16" and "avx512_bf16, amx_bf16" in faster.reason and "3.20x" in faster.reason
    machine(AMX, speedup=1.02)
    slower = resolve_dtype("auto")
    assert slower.name == "fp32" and "only 1.02x" in slower.reason


def test_the_probe_times_both_dtypes(machine) -> None:
    speedup = hardware._bf16_speedup((16, 64, 64))
    assert speedup > 0 and speedup == hardware._bf16_speedup((16, 64, 64))  # measured once per shape


def test_the_environment_overrides_auto_and_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bf16")
    assert resolve_dtype("auto").to_dict() == {
        "dtype": "bf16",
        "requested": "auto",
        "reason": f"set by {AUTO_DTYPE_ENV}",
    }
    monkeypatch.setenv(AUTO_DTYPE_ENV, "fp16")
    with pytest.raises(InputError, match=AUTO_DTYPE_ENV):
        resolve_dtype("auto")
    with pytest.raises(InputError, match="auto, fp32, bf16"):
        resolve_dtype("float32")
    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(dtype="half")


def test_training_at_auto_records_the_choice_and_runs_it(machine, tmp_path: Path) -> None:
    machine(AMX, speedup=2.0)
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=60)
    config = TrainConfig(
        data=str(corpus), tokenizer="byte", seq_len=32, batch_size=2, steps=2, eval_every=0, eval_loops=(1,)
    )
    trainer = Trainer(small_config(), config, tmp_path / "run", progress=False)
    trainer._setup()
    assert config.dtype == "auto" and trainer.dtype_choice.name == "bf16"
    seen = []
    forward = trainer.wrapped.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(*args, **kwargs)

    trainer.wrapped.forward = spy
    trainer._loop()
    trainer.logger.close()
    start = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert start["kind"] == "start" and start["dtype"] == "bf16" and "2.00x" in start["dtype_reason"]
    assert seen and all(seen)  # every training forward ran under bf16 autocast


def test_engine_decodes_in_its_dtype_choice(machine) -> None:
    machine(AVX2)
    model = build_model(small_config(), seed=0)
    assert Engine(model).dtype_choice.name == "fp32"
    engine = Engine(model, dtype="bf16")
    seen = []
    step = model.step

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    model.step = spy
    config = GenerationConfig(max_new_tokens=3, loops=2, stop_tokens=())
    bf16 = engine.score(torch.tensor([[1, 2, 3, 4, 5]]), config)
    assert seen and all(seen)
    model.step = step
    fp32 = Engine(model, dtype="fp32").score(torch.tensor([[1, 2, 3, 4, 5]]), config)
    assert float((bf16.log_probs - fp32.log_probs).abs().max()) < 0.1  # bf16 matmuls, fp32 state and norms


def test_doctor_reports_the_machine(capsys, machine) -> None:
    machine(AMX, speedup=1.5)
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"]["flags"] == list(AMX.flags) and info["cpu"]["torch_capability"] == "AVX512"
    assert info["dtype_auto"]["training"]["dtype"] == "bf16"
    assert set(info) >= {"loopformer", "torch", "compiled_decoding", "quantized_kernels", "extras"}
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "AMX machine" in text and "dtype auto   training: bf16" in text
