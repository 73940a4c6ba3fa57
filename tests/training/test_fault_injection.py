"""SIGKILL inside checkpoint saves: ``latest`` always loads, and ``--resume`` ends bit-identical to a straight run.

Every ``loopformer train`` run here is a child process forked by :data:`FORK_SERVER`, a Python process started from
this file with ``-c`` that imports the trainer once (a fresh interpreter spends seconds importing torch) and holds
the test's hook (no hook lives in library code). A run checkpoints every step; in the save the test picks, a profile
hook counts the filesystem calls of ``save_checkpoint`` (opens, writes, fsyncs, chmods, renames, unlinks, ...) and
the child SIGKILLs itself just before the call picked at random (seeded), so no ``except`` or ``finally`` clause runs.
The child writes a marker file (``enter`` / ``exit`` around every save, ``kill`` before dying) that says where each
kill fell.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loopformer.checkpoint import TrainingState, load_checkpoint, optimizer_to_flat, save_checkpoint
from support import FAST, TINY, small_config

KEEP_LAST = 2
CHILD_TIMEOUT_S = 300

FORK_SERVER = r"""
import json, math, os, signal, sys, time, traceback

import loopformer.checkpoint as checkpoint
import loopformer.training.trainer  # noqa: F401 (imported first, so that its name for save_checkpoint is replaced)
from loopformer.cli import main

FS_CALLS = {
    "open", "close", "fsync", "mkdir", "chmod", "fchmod", "rename", "replace", "unlink", "rmdir", "serialize_file",
    "TextIOWrapper.write", "TextIOWrapper.flush", "TextIOWrapper.__exit__",
}
real = checkpoint.save_checkpoint
spec, marks, saves = {}, None, 0  # the forked child's


def mark(text):
    os.write(marks, (text + "\n").encode())


def last_save_calls():
    with open(spec["markers"]) as handle:
        done = [line.split() for line in handle if line.startswith("exit ")]
    return int(done[-1][2])


def save(run_dir, state, *args, **kwargs):
    global saves
    saves += 1
    target = None
    if saves == spec.get("save"):  # die before this call of the save (scaled by the last complete save's count)
        target = max(1, math.ceil(spec["fraction"] * last_save_calls()))
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "c_call" and getattr(arg, "__qualname__", "") in FS_CALLS:
            calls += 1
            if calls == target:
                mark(f"kill {state.step} {calls} {arg.__qualname__}")
                os.kill(os.getpid(), signal.SIGKILL)

    mark(f"enter {state.step}")
    sys.setprofile(profile)
    try:
        path = real(run_dir, state, *args, **kwargs)
    finally:
        sys.setprofile(None)
    mark(f"exit {state.step} {calls}")
    if target is not None:  # the save made fewer calls than the target: die just after it
        mark(f"kill-after {state.step}")
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def child(job):
    global spec, marks
    spec = job["spec"]
    marks = os.open(spec["markers"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.environ.update(job["env"])
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT), 2)
    code = 1
    try:
        code = main(["train", *job["args"]])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


for module in list(sys.modules.values()):
    if getattr(module, "save_checkpoint", None) is real:
        module.save_checkpoint = save
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    status, deadline = None, time.monotonic() + job["timeout"]
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        if time.monotonic() > deadline:  # status None: it ran past the timeout
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    print(json.dumps(status), flush=True)
"""


@dataclass(frozen=True)
class Kill:
    """Where one child died: the step of the save, inside it or just after, before which filesystem call."""

    step: int
    inside: bool
    call: str | None


class ForkServer:
    """Client of :data:`FORK_SERVER`: :meth:`train` runs ``loopformer train ARGS`` in a forked child."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # before torch is imported: no thread pool to fork
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def train(self, args: list[str], spec: dict, log: Path) -> int:
        """The child's exit status (negative: the signal that ended it); ``spec`` names the marker file and, with
        ``save`` and ``fraction``, the save to die in and where."""
        job = {"args": args, "spec": spec, "log": str(log), "timeout": CHILD_TIMEOUT_S}
        job["env"] = {"LOOPFORMER_CACHE": os.environ["LOOPFORMER_CACHE"]}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, f"the fork server died (status {self.process.poll()})"
        status = json.loads(reply)
        assert status is not None, f"the child ran past {CHILD_TIMEOUT_S} s\n{tail(log)}"
        return status

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"


def marker_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_training_state(got: TrainingState, want: TrainingState) -> None:
    """Bit-identical step, weights, EMA, optimizer state, RNG states, data position and token count."""
    assert got.step == want.step
    got_optimizer, got_layout = optimizer_to_flat(got.optimizer)
    want_optimizer, want_layout = optimizer_to_flat(want.optimizer)
    assert got_layout == want_layout, f"step {got.step}: optimizer settings differ"
    parts = {
        "model": (got.model, want.model),
        "ema": (got.ema, want.ema),
        "optimizer": (got_optimizer, want_optimizer),
        "rng": (got.rng, want.rng),
    }
    for part, (mine, theirs) in parts.items():
        assert mine is not None and theirs is not None and mine.keys() == theirs.keys(), part
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"step {got.step}: {part} {name} differs"
    for key in ("sampler", "tokens"):
        assert got.meta[key] == want.meta[key], f"step {got.step}: {key} differs"


def saves_left(steps: int, latest: int) -> int:
    """Saves a run resumed at ``latest`` makes: one per step up to ``steps``, or the end's again when it is done."""
    return max(steps - latest, 1)


@pytest.mark.parametrize(
    ("kills", "steps"), [pytest.param(3, 7, id="3-kills"), pytest.param(20, 20, id="20-kills", marks=pytest.mark.slow)]
)
def test_sigkill_inside_checkpoint_saves_loses_nothing(
    forks: ForkServer, corpus: Path, tmp_path: Path, kills: int, steps: int
) -> None:
    """After each kill the child died of SIGKILL and ``latest`` loads: the straight run's checkpoint of the last
    complete save (or of the killed one). At the end, --resume gives the straight run's state bit for bit and the
    checkpoint folder holds no debris."""
    rng = random.Random(kills)
    log, markers, run, straight = tmp_path / "child.log", tmp_path / "markers.txt", tmp_path / "run", tmp_path / "st"
    flags = ["--data", str(corpus), *TINY, *FAST, "--steps", str(steps), "--save-every", "1", "--eval-every", "0"]
    flags += ["--ema-decay", "0.9", "--no-progress"]
    # the uninterrupted run, every checkpoint kept
    code = forks.train([*flags, "--keep-last", "1000", "--out", str(straight)], {"markers": str(tmp_path / "m")}, log)
    assert code == 0, tail(log)
    first = [*flags, "--keep-last", str(KEEP_LAST), "--out", str(run)]
    resume = ["--out", str(run), "--resume", "--no-progress"]
    latest, record = 0, []
    for index in range(kills):
        lowest = 2 if index == 0 else 1  # a fresh run has no checkpoint to fall back on before its first save ends
        save = rng.randint(lowest, max(lowest, min(3, saves_left(steps, latest))))
        spec = {"markers": str(markers), "save": save, "fraction": rng.random()}
        seen = len(marker_lines(markers))
        code = forks.train(first if index == 0 else resume, spec, log)
        assert code == -signal.SIGKILL, f"kill {index}: exit status {code}\n{tail(log)}"
        lines = marker_lines(markers)
        assert len(lines) > seen and lines[-1][0] in ("kill", "kill-after"), lines[seen:]
        killed = lines[-1]
        record.append(Kill(int(killed[1]), killed[0] == "kill", killed[3] if killed[0] == "kill" else None))
        state = load_checkpoint(run)  # through `latest` (or the newest complete step when it names a moved dir)
        # the checkpoint before the killed save: this child's last complete save, or the one it resumed from
        completed = [int(line[1]) for line in lines[seen:] if line[0] == "exit"]
        before = completed[-1] if completed else latest
        assert state.step in {before, record[-1].step}, (state.step, before, record[-1])
        assert_same_training_state(state, load_checkpoint(straight / "checkpoints" / f"step-{state.step:08d}"))
        latest = state.step
    assert forks.train(resume, {"markers": str(markers)}, log) == 0, tail(log)

    final = load_checkpoint(run)
    assert final.step == steps
    assert_same_training_state(final, load_checkpoint(straight / "checkpoints" / f"step-{steps:08d}"))
    left = sorted(path.name for path in (run / "checkpoints").iterdir())
    kept = [f"step-{step:08d}" for step in range(steps - KEEP_LAST + 1, steps + 1)]
    assert left == ["latest", *kept], "the killed saves left debris in the checkpoint folder"
    inside = sum(kill.inside for kill in record)
    assert inside >= math.ceil(kills / 2), record
    calls = Counter(kill.call for kill in record if kill.inside)
    again = sum(kill.step == steps for kill in record)  # in a save that replaces the last step's checkpoint
    print(f"{inside} of {kills} kills inside a save ({again} re-saving the last step), at steps")
    print(f"{[kill.step for kill in record]}, before {dict(calls)}")


def test_save_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    """Regression: a kill inside the write of ``latest`` left its temp file (``.latest.*``) for good."""
    save_checkpoint(tmp_path, TrainingState(step=1, model={"w": torch.zeros(2)}, config=small_config()))
    root = tmp_path / "checkpoints"
    (root / ".latest.abc123").write_text("step-00000001")  # what atomic_write_text leaves when killed mid-way
    (root / ".tmp-dead").mkdir()
    save_checkpoint(tmp_path, TrainingState(step=2, model={"w": torch.ones(2)}, config=small_config()))
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert load_checkpoint(tmp_path).step == 2
