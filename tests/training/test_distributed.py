"""Two CPU processes (gloo, launched by torchrun) train like one process with gradient accumulation.

DDP ranks hold identical replicas; under FSDP2 each rank holds a shard, so the script saves the full state dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import write_corpus

SCRIPT = """
import json, os, sys, torch
from safetensors.torch import save_file
from loopformer.training.config import TrainConfig
from loopformer.training.trainer import Trainer
sys.path.insert(0, {tests!r})
from support import small_config

torch.set_num_threads(1)
config = TrainConfig(**json.loads({train!r}))
trainer = Trainer(small_config(), config, {out!r}, progress=False)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
captured = {{}}
real_save = trainer.save
def save_and_capture():
    captured.update(get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True)))
    return real_save()
trainer.save = save_and_capture
result = trainer.fit()
full_weights = captured
rank = int(os.environ["RANK"])
weights = {{k: v.detach().contiguous() for k, v in full_weights.items()}}
save_file(weights, {out!r} + f"/rank{{rank}}.safetensors")
json.dump({{str(k): v for k, v in result.losses.items()}}, open({out!r} + f"/losses{{rank}}.json", "w"))
"""


def launch(tmp_path: Path, name: str, nproc: int, train: dict) -> Path:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / f"{name}.py"
    tests = str(Path(__file__).resolve().parents[1])
    script.write_text(SCRIPT.format(tests=tests, train=json.dumps(train), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOPFORMER_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0"]
    command += ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_ranks_match_one_rank_with_gradient_accumulation(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    train = {
        "data": str(corpus),
        "val_fraction": 0.2,
        "tokenizer": "byte",
        "seq_len": 32,
        "batch_size": 2,
        "steps": 4,
        "lr": 3e-3,
        "warmup_steps": 1,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
    }
    single = launch(tmp_path, "single", 1, {**train, "grad_accum": 2})
    alone = load_file(single / "rank0.safetensors")
    losses_single = json.loads((single / "losses0.json").read_text())
    assert losses_single.keys() == {"1", "2", "3", "4"}
    for strategy in ("ddp", "fsdp"):
        pair = launch(tmp_path, strategy, 2, {**train, "grad_accum": 1, "strategy": strategy})
        rank0, rank1 = load_file(pair / "rank0.safetensors"), load_file(pair / "rank1.safetensors")
        for name in rank0:
            if strategy == "ddp":
                assert torch.equal(rank0[name], rank1[name]), f"{name} diverged between ranks"
            torch.testing.assert_close(rank0[name], alone[name], rtol=1e-4, atol=1e-5)
        losses_pair = json.loads((pair / "losses0.json").read_text())
        assert losses_pair.keys() == losses_single.keys()
        for step, loss in losses_single.items():
            assert losses_pair[step] == pytest.approx(loss, rel=1e-5), (strategy, step)
