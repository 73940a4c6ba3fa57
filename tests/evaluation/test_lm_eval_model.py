"""The lm-eval adapter on a tiny random model: the example tasks end to end, and each request type checked against
a direct forward pass of the model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.evaluation.lm_eval_model import LoopformerLM, find_tasks
from loopformer.evaluation.lm_eval_tasks import TASKS_DIR
from loopformer.model import build_model
from loopformer.tokenizer import TextTokenizer
from support import small_config

TASKS = ["lf_python_choice", "lf_python_line", "lf_python_ppl"]
TOKENIZER = TextTokenizer.byte_level()
# zero initial state: the engine's token-by-token scoring and a plain forward start from the same state
CONFIG = small_config(vocab_size=TOKENIZER.vocab_size, max_seq_len=48, state_init="zero")
LOOPS = 2


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model(CONFIG, seed=0)
    state = TrainingState(step=0, model=model.state_dict(), config=CONFIG, tokenizer_json=TOKENIZER.to_json())
    return save_checkpoint(tmp_path_factory.mktemp("lm-eval"), state)


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> LoopformerLM:
    return LoopformerLM(ckpt=str(ckpt), loops=LOOPS, batch_size=3)


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return find_tasks(TASKS)


def request(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def direct_log_probs(lm: LoopformerLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[t] | ids[:t]) for t >= 1 and the argmax predictions, from one forward pass over ``ids[:-1]``."""
    with torch.no_grad():
        logits = lm.engine.model(torch.tensor([ids[:-1]]), loops=LOOPS).logits[0].float()
    logits[:, TOKENIZER.vocab_size :] = -math.inf
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:])
    return log_probs.gather(1, targets[:, None])[:, 0], log_probs.argmax(dim=-1)


def test_loglikelihood_equals_a_direct_forward(lm: LoopformerLM) -> None:
    pairs = [("def add(a, b", "):"), ("import", " os"), ("", "x = 1"), ("while ", "True:")]
    results = lm.loglikelihood([request(c, x) for c, x in pairs])
    for (context, continuation), (log_prob, greedy) in zip(pairs, results, strict=True):
        if context.endswith(" "):  # lm-eval's convention: the space belongs to the continuation
            context, continuation = context[:-1], " " + continuation
        prefix = [TOKENIZER.bos_id, *TOKENIZER.encode(context)]
        target = TOKENIZER.encode(continuation)
        expected, predictions = direct_log_probs(lm, prefix + target)
        n = len(target)
        assert log_prob == pytest.approx(float(expected[-n:].sum()), abs=1e-4)
        assert greedy == bool((predictions[-n:] == torch.tensor(target)).all())


def test_greedy_is_detected(lm: LoopformerLM) -> None:
    """Tokens that are the model's own argmax count as greedy; one changed token does not."""
    ids = [TOKENIZER.bos_id, *TOKENIZER.encode("loop")]
    for _ in range(3):
        ids.append(int(direct_log_probs(lm, [*ids, 0])[1][-1]))
    changed = [*ids[:-1], (ids[-1] + 1) % TOKENIZER.vocab_size]
    (_, greedy), (_, other) = lm._score([ids, changed], [3, 3], "loglikelihood", disable_tqdm=True)
    assert greedy and not other


def test_loglikelihood_rolling_sums_every_token_once(lm: LoopformerLM) -> None:
    short = "def f():\n    return 1\n"
    long = "x = 1\n" * 20  # 120 tokens: three windows of the 48-token context
    totals = lm.loglikelihood_rolling([request(short), request(long)])
    expected, _ = direct_log_probs(lm, [TOKENIZER.bos_id, *TOKENIZER.encode(short)])
    assert totals[0] == pytest.approx(float(expected.sum()), abs=1e-4)
    # lm-eval's windows: the first predicts the first L tokens after BOS; each later one the next L (the last one
    # what is left), every token from the L tokens before it
    window = CONFIG.max_seq_len
    sequence = [TOKENIZER.bos_id, *TOKENIZER.encode(long)]
    count = len(sequence) - 1
    by_hand, predicted = 0.0, 0
    while predicted < count:
        end = min(predicted + window, count)
        log_probs, _ = direct_log_probs(lm, sequence[max(end - window, 0) : end + 1])
        by_hand += float(log_probs[-(end - predicted) :].sum())
        predicted = end
    assert count == 120 and totals[1] == pytest.approx(by_hand, abs=1e-3)


def test_generate_until_matches_greedy_decoding_and_stops(lm: LoopformerLM) -> None:
    prompt = "for i in"
    ids = [TOKENIZER.bos_id, *TOKENIZER.encode(prompt)]
    for _ in range(8):
        ids.append(int(direct_log_probs(lm, [*ids, 0])[1][-1]))
    reference = TOKENIZER.decode(ids[-8:])
    (free,) = lm.generate_until([request(prompt, {"until": [], "max_gen_toks": 8})])
    assert free == reference
    stop = reference[2:4]
    (stopped,) = lm.generate_until([request(prompt, {"until": [stop], "max_gen_toks": 8})])
    assert stopped == reference[: reference.index(stop)]


def test_simple_evaluate_runs_the_example_tasks(ckpt: Path, manager: TaskManager) -> None:
    output = simple_evaluate(
        model="loopformer",
        model_args=f"ckpt={ckpt},loops={LOOPS},batch_size=4",
        tasks=TASKS,
        task_manager=manager,
        limit=3,
        bootstrap_iters=0,
    )
    results = output["results"]
    assert set(results) == set(TASKS)
    assert 0.0 <= results["lf_python_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["lf_python_line"]["exact_match,none"] <= 1.0
    assert results["lf_python_ppl"]["word_perplexity,none"] > 1.0
    assert results["lf_python_ppl"]["bits_per_byte,none"] > 0.0
    assert output["n-samples"]["lf_python_choice"] == {"original": 24, "effective": 3}
    assert len(output["samples"]["lf_python_choice"][0]["resps"]) == 4  # one log-likelihood per choice


def test_model_arguments_are_checked(ckpt: Path) -> None:
    with pytest.raises(InputError, match="loops must be an integer >= 1"):
        LoopformerLM(ckpt=str(ckpt), loops="zero")
    with pytest.raises(InputError, match="either ckpt"):
        LoopformerLM()
    with pytest.raises(InputError, match="ring"):
        LoopformerLM(ckpt=str(ckpt), kv="ring")


def test_the_example_tasks_ship_in_the_package_and_are_found_without_lm_evals_index() -> None:
    """The wheel carries every task file (package-data patterns), and naming only them indexes nothing else."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["loopformer.evaluation.lm_eval_tasks"]
    files = {p for p in TASKS_DIR.rglob("*") if p.suffix in (".yaml", ".jsonl")}
    assert len(files) == 6 and files == {p for pattern in patterns for p in TASKS_DIR.glob(pattern)}
    manager = find_tasks(["loopformer_examples", *TASKS])
    assert set(TASKS) <= set(manager.all_tasks) and "loopformer_examples" in manager.all_tags
    assert len(manager.all_tasks) < 10  # lm-eval's own ~15,000 task files were not indexed
    assert "hellaswag" not in find_tasks(["hellaswag"], builtin=False).all_tasks


def test_cli_sweep_shows_progress_without_lm_evals_noise(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bar per request type and depth; lm-eval's per-run notices and git's "not a git repository" are gone."""
    monkeypatch.chdir(tmp_path)  # outside any git checkout, where lm-eval's `git describe` complained
    argv = ["eval", "--ckpt", str(ckpt), "--tasks", "loopformer_examples", "--loops", "1,2", "--limit", "2"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    for bar in ("loglikelihood (loops=1)", "generate_until (loops=2)", "loglikelihood_rolling (loops=2)"):
        assert bar in err
    assert "Custom kwargs" not in err and "fatal:" not in err


def test_cli_sweeps_depths_into_one_table(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--ckpt", str(ckpt), "--tasks", "lf_python_choice,lf_python_ppl", "--loops", "1,3"]
    argv += ["--include-path", str(TASKS_DIR), "--no-builtin-tasks", "--limit", "2"]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    cells = {(r["task"], r["metric"], r["loops"]) for r in record["results"]}
    assert ("lf_python_choice", "acc,none", 3) in cells and ("lf_python_ppl", "word_perplexity,none", 1) in cells
    assert {r["loops"] for r in record["results"]} == {1, 3}
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "r=1", "r=3"] and len(table) == 2 + 4
    argv[argv.index("--tasks") + 1] = "nope"
    assert main(argv) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
