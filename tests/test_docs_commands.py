"""Every shell block in README.md and docs/*.md is marked, and the runnable ones run as written.

A ```` ```bash ```` block is preceded by ``<!-- commands: run -->`` or ``<!-- commands: skip: REASON -->``.
Runnable blocks run in one bash each (as a reader types them; each command is echoed as it starts), one temporary
folder per document, in the order of :data:`DOCS` (README's quickstart makes ``runs/lm``, which the later ones
use), with small settings (:func:`small`: a few training steps, a short demo, few tokens and examples) and ``/bye``
on stdin for ``chat``. The full walk is in the slow suite; the default suite walks README's quickstart.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "docs/training.md",
    "docs/tasks.md",
    "docs/inference.md",
    "docs/quantization.md",
    "docs/evaluation.md",
    "docs/analysis.md",
    "docs/architecture.md",
    "docs/interop.md",
    "docs/serving.md",
    "docs/benchmarks.md",
    "docs/evidence.md",
]
MARK = re.compile(r"<!-- commands: (run|skip: .+?) -->")
FENCE = re.compile(r"^```bash\s*$")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    mark: str  # "run" or "skip: REASON"
    commands: tuple[str, ...]


def without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a shell comment (outside quotes, after whitespace)."""
    quote = ""
    for at, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (at == 0 or line[at - 1].isspace()):
            return line[:at].rstrip()
    return line.rstrip()


def logical_lines(text: str) -> list[str]:
    """The block's commands: backslash continuations joined, comments and blank lines dropped; a quoted argument
    over several lines stays in its command."""
    commands: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        if line.count('"') % 2:  # inside a quoted multi-line argument
            pending = line + "\n"
            continue
        pending = ""
        if without_comment(line).strip():
            commands.append(without_comment(line).strip())
    return commands


def blocks_of(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    found = []
    for index, line in enumerate(lines):
        if not FENCE.match(line):
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.fullmatch(before.strip())
        body = "\n".join(lines[index + 1 : end])
        found.append(Block(doc, index + 1, mark.group(1) if mark else "", tuple(logical_lines(body))))
    return found


def _set_flag(command: str, flag: str, value: str) -> str:
    """``command`` with ``flag value``, replacing an earlier plain value; the rest of the text is left as written."""
    pattern = re.compile(rf"(?<=\s){re.escape(flag)}\s+[^\s'\"]+")
    if pattern.search(command):
        return pattern.sub(f"{flag} {value}", command, count=1)
    return f"{command} {flag} {value}"


def small(command: str) -> str:
    """``command`` with settings small enough for a test; the command itself (flags, paths) is the documented one."""
    words = command.split()
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    if len(words) < 2 or words[0] != "loopformer" or "--help" in words or ">" in words:
        return command
    sub = words[1]
    if sub == "train":
        command = _set_flag(command, "--steps", "6" if "--resume" in words else "4")
    elif sub == "demo":
        command = _set_flag(_set_flag(command, "--budget-minutes", "0.2"), "--eval-count", "8")
        command = _set_flag(command, "--loops", "1,4")
    elif sub in ("generate", "chat"):
        command = _set_flag(command, "--max-new-tokens", "4")
    elif sub == "eval":
        command = _set_flag(command, "--limit", "2")
    elif sub in ("eval-task", "analyze"):
        command = _set_flag(command, "--count", "8")
    return command


SHARED_RUNS = ("lm", "demo")  # made by README (quickstart, `loopformer demo`), named by the docs after it


def run_blocks(blocks: list[Block], folder: Path) -> None:
    """Each command of each runnable block in order; the first failure fails the test. Each document runs in its
    own folder under ``folder`` (as a reader following it would), README's first, the others seeing its
    :data:`SHARED_RUNS`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", LOOPFORMER_CACHE=str(folder / ".cache"))
    first = folder / Path(DOCS[0]).stem
    for block in blocks:
        place = folder / Path(block.doc).stem
        if not place.exists():
            shutil.copytree(ROOT / "docs" / "examples", place / "docs" / "examples")  # run files the docs name
            for name in SHARED_RUNS if place != first else ():
                if (first / "runs" / name).exists():
                    (place / "runs").mkdir(exist_ok=True)
                    (place / "runs" / name).symlink_to(first / "runs" / name)
        # one shell per block, as a reader types it (a variable set by one command is seen by the next); each
        # command is echoed to stderr first, so a failure shows which one it was
        lines = [small(command) for command in block.commands]
        script = "\n".join(f"printf '%s\\n' {shlex.quote('$ ' + line)} >&2\n{line}" for line in lines)
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=place,
            env=env,
            input="def f(x):\n/bye\n",
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S * len(lines),
            check=False,
        )
        where = f"{block.doc}:{block.line}: exited {done.returncode}"
        assert done.returncode == 0, f"{where}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_every_doc_is_walked_and_every_shell_block_is_marked() -> None:
    assert set(DOCS) == {"README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))}
    unmarked = [f"{b.doc}:{b.line}" for doc in DOCS for b in blocks_of(doc) if not b.mark]
    assert not unmarked, f"shell blocks without <!-- commands: run --> or <!-- commands: skip: REASON -->: {unmarked}"
    runnable = [b for doc in DOCS for b in blocks_of(doc) if b.mark == "run"]
    assert sum(len(b.commands) for b in runnable) >= 40


def test_small_settings_keep_the_documented_command() -> None:
    assert small("loopformer train --out runs/lm --steps 300") == "loopformer train --out runs/lm --steps 4"
    assert small("loopformer train --out runs/micro --resume") == "loopformer train --out runs/micro --resume --steps 6"
    assert small('loopformer generate --ckpt runs/lm --prompt "def main(" --max-new-tokens 64') == (
        'loopformer generate --ckpt runs/lm --prompt "def main(" --max-new-tokens 4'
    )
    assert small("HF_HUB_OFFLINE=1 loopformer eval --ckpt x --tasks t").endswith("--tasks t --limit 2")
    assert small("loopformer presets --show tiny > my.json") == "loopformer presets --show tiny > my.json"
    text = 'loopformer a \\\n    --b 1   # note\n# only a comment\n\nx "#not" y\nz --text "one\ntwo"'
    assert logical_lines(text) == ["loopformer a     --b 1", 'x "#not" y', 'z --text "one\ntwo"']


def test_the_readme_quickstart_runs(tmp_path: Path) -> None:
    """The default suite's walk: README's quickstart (it makes runs/lm and uses it)."""
    quickstart = [b for b in blocks_of("README.md") if b.mark == "run"][:1]
    assert quickstart and any("--out runs/lm" in c for c in quickstart[0].commands)
    run_blocks(quickstart, tmp_path)
    assert (tmp_path / "README" / "runs" / "lm" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_every_runnable_documented_command_runs(tmp_path: Path) -> None:
    run_blocks([b for doc in DOCS for b in blocks_of(doc) if b.mark == "run"], tmp_path)
