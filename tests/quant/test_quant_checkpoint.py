"""Quantized checkpoints: exact round trips through load_trained_model, sizes, bad files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loopformer.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.loading import load_trained_model
from loopformer.model import build_model
from loopformer.quant import QuantizedWeight, QuantScheme, quantization_note, save_quantized
from loopformer.quant.model import quantized_state
from loopformer.tokenizer import TextTokenizer
from support import small_config

TOKENIZER = TextTokenizer.byte_level()
CONFIG = small_config(vocab_size=TOKENIZER.vocab_size, injection="lti", lora_rank=2, per_loop_slots=2, dim=64)
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("quant-source")
    model = build_model(CONFIG, seed=0)
    state = TrainingState(
        step=7, model=model.state_dict(), config=CONFIG, tokenizer_json=TOKENIZER.to_json(), meta={"note": 1}
    )
    return save_checkpoint(run, state)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, loops=2, seed=0).logits


@pytest.mark.parametrize(
    "scheme", [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64, embedding=False), QuantScheme(8, adapters=True)]
)
def test_save_load_round_trip_is_exact(tmp_path: Path, source: Path, scheme: QuantScheme) -> None:
    model, state, _ = load_trained_model(source)
    out, names = save_quantized(tmp_path / "q", model, state, scheme, str(source))
    loaded, loaded_state, directory = load_trained_model(out)
    assert directory == out and loaded_state.step == 7 and loaded_state.tokenizer_json == TOKENIZER.to_json()
    assert loaded_state.config == CONFIG and loaded_state.meta["note"] == 1
    assert quantization_note(loaded_state) == {"scheme": scheme.to_dict(), "tensors": names, "source": str(source)}
    assert ("tok_emb.weight" in names) == scheme.embedding
    assert ("core.0.attn.qkv.lora_a" in names) == scheme.adapters
    stored, rebuilt = quantized_state(model), quantized_state(loaded)
    assert stored.keys() == rebuilt.keys()
    for name, tensor in stored.items():
        assert tensor.dtype == rebuilt[name].dtype and torch.equal(tensor, rebuilt[name]), name
    assert isinstance(loaded.get_buffer(names[0]), QuantizedWeight)
    assert torch.equal(logits(loaded), logits(model))
    assert not loaded.training


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the length prefix and the JSON header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32)])
def test_the_file_holds_the_integers_and_scales_only(tmp_path: Path, source: Path, scheme: QuantScheme) -> None:
    model, state, _ = load_trained_model(source)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    out, names = save_quantized(tmp_path / "q", model, state, scheme, str(source))
    expected = sum(4 * w.numel() for name, w in weights.items() if name not in names)
    for name in names:
        rows, columns = weights[name].shape
        if scheme.bits == 8:
            expected += rows * columns + 4 * rows  # one byte a weight, one fp32 scale a row
        else:
            padded = -(-columns // 32) * 32
            expected += rows * padded // 2 + 2 * 2 * rows * padded // 32  # half a byte a weight, bf16 scale + zero
    assert data_bytes(out / "model.safetensors") == expected
    fp32 = data_bytes(source / "model.safetensors")
    assert expected < fp32 / (3 if scheme.bits == 8 else 5)


def quantized_copy(tmp_path: Path, source: Path) -> Path:
    model, state, _ = load_trained_model(source)
    out, _ = save_quantized(tmp_path / "q", model, state, QuantScheme(4, 32), str(source))
    return out


def test_a_missing_or_mistyped_tensor_is_named(tmp_path: Path, source: Path) -> None:
    out = quantized_copy(tmp_path, source)
    tensors = load_file(out / "model.safetensors")
    name = "core.0.mlp.fc.weight"
    without = {k: v for k, v in tensors.items() if k != f"{name}.zero"}
    save_file(without, out / "model.safetensors")
    with pytest.raises(InputError, match=rf"missing tensors {name}\.zero"):
        load_trained_model(out)
    save_file({**tensors, f"{name}.scale": tensors[f"{name}.scale"].float()}, out / "model.safetensors")
    with pytest.raises(InputError, match=rf"{name}\.scale is torch\.float32"):
        load_trained_model(out)


def test_a_bad_quantization_note_is_refused(tmp_path: Path, source: Path) -> None:
    out = quantized_copy(tmp_path, source)
    trainer = json.loads((out / "trainer.json").read_text())
    trainer["meta"]["quantization"]["scheme"]["bits"] = 3
    (out / "trainer.json").write_text(json.dumps(trainer))
    with pytest.raises(InputError, match="bits must be 8 or 4"):
        load_trained_model(out)
    trainer["meta"]["quantization"] = {"scheme": QuantScheme(8).to_dict(), "tensors": ["tok_emb.weight"]}
    (out / "trainer.json").write_text(json.dumps(trainer))
    with pytest.raises(InputError, match="do not match the int8 scheme"):
        load_trained_model(out)


def test_load_checkpoint_still_reads_the_raw_tensors(tmp_path: Path, source: Path) -> None:
    out = quantized_copy(tmp_path, source)
    raw = load_checkpoint(out).model
    assert raw["core.0.attn.qkv.weight.qweight"].dtype == torch.uint8
    assert raw["final_norm.weight"].dtype == torch.float32


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_quantizes_and_other_commands_load_the_result(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    rc, stdout, err = cli(capsys, "quantize", "--ckpt", str(source), "--out", str(out), "--bits", "8", "--json")
    assert rc == 0, err
    record = json.loads(stdout)
    assert record["scheme"] == "int8" and record["model_bytes_after"] < record["model_bytes_before"] / 3
    kept = ("norm", "lora_", "injection.log_a", "injection.dt_bias")
    named = dict(build_model(CONFIG).named_parameters())
    assert record["parameters"] == sum(p.numel() for p in named.values())
    assert record["quantized_parameters"] == sum(p.numel() for n, p in named.items() if not any(k in n for k in kept))
    rc, stdout, err = cli(capsys, "quantize", "--ckpt", str(source), "--out", str(tmp_path / "t"), "--bits", "4")
    assert rc == 0 and "int4-g64" in stdout and "smaller" in stdout, err
    rc, stdout, err = cli(capsys, "generate", "--ckpt", str(out), "--prompt", "loop", "--max-new-tokens", "3", "--json")
    assert rc == 0, err
    assert len(json.loads(stdout)["outputs"][0]["tokens"]) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "8", "--group-size", "64"], "takes no group size"),
        (["--bits", "4", "--group-size", "48"], "one of 32, 64, 128, 256"),
    ],
)
def test_cli_errors_are_one_sentence(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc, _, err = cli(capsys, "quantize", "--ckpt", str(source), "--out", str(tmp_path / "x"), *extra)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_cli_refuses_an_existing_directory_and_a_quantized_source(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    rc, _, err = cli(capsys, "quantize", "--ckpt", str(source), "--out", str(taken), "--bits", "8")
    assert rc == 2 and "already exists" in err
    quantized = quantized_copy(tmp_path, source)
    rc, _, err = cli(capsys, "quantize", "--ckpt", str(quantized), "--out", str(tmp_path / "y"), "--bits", "8")
    assert rc == 2 and "already quantized" in err
