"""Reasoning tasks end to end: exact-match scoring against naive references, greedy decoding, task training runs
(built-in generator and JSONL files, bit-exact resume), configuration checks and ``loopformer eval-task``."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loopformer.checkpoint import load_checkpoint, resolve_checkpoint
from loopformer.cli import main
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import ConfigError, InputError
from loopformer.loading import load_trained_model
from loopformer.model import LoopLM, build_model
from loopformer.tasks.base import Example
from loopformer.tasks.builtin import TASKS, VectorParity
from loopformer.tasks.data import prepare_task_data
from loopformer.tasks.encoding import IGNORE_INDEX, TaskEncoder, task_tokenizer
from loopformer.tasks.evaluate import evaluate_task
from loopformer.tasks.jsonl import write_task_file
from loopformer.tokenizer import TextTokenizer
from loopformer.training.config import TrainConfig
from loopformer.training.data import Batch
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer, TrainResult
from support import small_config, write_corpus

TINY = ModelConfig(
    dim=32,
    n_heads=2,
    sliding_window=2,
    n_prelude=1,
    n_core=1,
    n_coda=1,
    recurrence=RecurrenceConfig(mean_loops=4, backprop_loops=2),
)


def task_config(**changes: object) -> TrainConfig:
    base: dict[str, object] = {
        "task": "prefix-parity",
        "task_difficulty": "4",
        "eval_difficulty": 8,
        "steps": 30,
        "batch_size": 32,
        "lr": 3e-3,
        "eval_loops": (1, 4),
        "eval_every": 0,
        "save_every": 0,
        "log_every": 10,
        "seed": 0,
        "device": "cpu",
    }
    base.update(changes)
    return TrainConfig(**base)


def fit(config: TrainConfig, out: Path, model_config: ModelConfig = TINY, **kwargs: object) -> TrainResult:
    """One quiet training invocation, single-threaded (module fixtures run before conftest's thread fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(model_config, config, out, progress=False, stream=io.StringIO(), **kwargs).fit()
    finally:
        torch.set_num_threads(threads)


@dataclass
class Run:
    out: Path
    config: TrainConfig
    result: TrainResult


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """30 steps of prefix-parity at length 4, evaluated at length 8."""
    out = tmp_path_factory.mktemp("task") / "run"
    config = task_config()
    return Run(out, config, fit(config, out))


@pytest.fixture(scope="module")
def file_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A few steps on JSONL examples: prefix parity (per position) and two-bit continuations."""
    folder = tmp_path_factory.mktemp("files")
    parity = TASKS["prefix-parity"]
    train = [*parity.generate_mixed(2, 5, 48, seed=2), *continuations(16, seed=2)]
    held_out = [*parity.generate(6, 12, seed=3), *continuations(4, seed=3)]
    write_task_file(folder / "train.jsonl", train)
    write_task_file(folder / "eval.jsonl", held_out)
    config = TrainConfig(
        task_data=str(folder / "train.jsonl"),
        eval_data=str(folder / "eval.jsonl"),
        steps=6,
        batch_size=16,
        lr=3e-3,
        eval_loops=(1, 2),
        eval_every=3,
        save_every=0,
        log_every=3,
        device="cpu",
    )
    out = folder / "run"
    return Run(out, config, fit(config, out))


def continuations(count: int, seed: int) -> list[Example]:
    """Bit strings followed by their first and last bit reversed: a two-symbol continuation."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(3, 6, (1,), generator=generator))
        bits = tuple(str(b) for b in torch.randint(0, 2, (length,), generator=generator).tolist())
        examples.append(Example(bits, (bits[-1], bits[0])))
    return examples


# ----- exact-match scoring ------------------------------------------------------------------------------------


def restrict_head(model: LoopLM, keep: list[int]) -> LoopLM:
    """Set every untied head row outside ``keep`` to the mean of the ``keep`` rows: its logit is then the mean of
    theirs, so the argmax of an untrained model always lies in ``keep`` (barring an exact tie)."""
    assert model.head is not None
    with torch.no_grad():
        weight = model.head.weight
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[keep] = False
        weight[others] = weight[keep].mean(dim=0)
    return model.eval()


def naive_exact_match(model: LoopLM, batches: list[Batch], steps: int, seed: int) -> tuple[float, int]:
    """Solved fraction and scored-row count from a separate forward call, checking each labelled position."""
    solved = scored = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch.input_ids, loops=steps, seed=seed).logits
            for row, labels in enumerate(batch.labels.tolist()):
                checks = [
                    int(logits[row, t].argmax()) == labels[t + 1]
                    for t in range(len(labels) - 1)
                    if labels[t + 1] != IGNORE_INDEX
                ]
                if checks:
                    scored += 1
                    solved += all(checks)
    return solved / scored, scored


def mixed_examples() -> tuple[list[Example], TextTokenizer]:
    """Per-position and continuation examples (with one- and multi-token targets) of varied lengths."""
    vector = VectorParity(size=3)
    examples = [
        *TASKS["prefix-parity"].generate_mixed(1, 3, 18, seed=0),
        *vector.generate_mixed(1, 3, 10, seed=0),
        *continuations(8, seed=0),
    ]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return [examples[i] for i in order], task_tokenizer(["0", "1", *vector.alphabet])


def test_exact_match_equals_a_naive_argmax_reference() -> None:
    examples, tokenizer = mixed_examples()
    bits = [tokenizer.symbol_ids()[s] for s in ("0", "1")]
    model = restrict_head(build_model(small_config(tie_embeddings=False), seed=0), bits)
    seed, batch_size = 5, 8
    results = evaluate_task(model, tokenizer, examples, [3, 1], batch_size=batch_size, seed=seed)
    assert [r.loops for r in results] == [3, 1]
    batches = TaskEncoder(tokenizer).batches(examples, batch_size)
    assert len({b.input_ids.shape[1] for b in batches}) > 1  # several widths, so rows are padded
    for result in results:
        expected, scored = naive_exact_match(model, batches, result.loops, seed)
        assert scored == len(examples)
        assert result.exact_match == expected
        assert 0 < result.exact_match < 1, "the reference should see solved and unsolved examples"
        assert result.tokens == sum(len(e.target) for e in examples)
    # the initial state depends on the seed, so another seed scores (here) differently but still like the reference
    other = evaluate_task(model, tokenizer, examples, [1], batch_size=batch_size, seed=6)[0]
    assert other.exact_match == naive_exact_match(model, batches, 1, 6)[0]


def test_streaming_evaluation_equals_separate_forward_calls() -> None:
    examples, tokenizer = mixed_examples()
    model = build_model(small_config(), seed=1).eval()
    batches = TaskEncoder(tokenizer).batches(examples, 16)
    depths = [4, 1, 2]
    results = evaluate_task(model, tokenizer, examples, depths, batch_size=16, seed=3)
    for result in results:
        nll = count = 0.0
        squares = elements = 0.0
        with torch.no_grad():
            for batch in batches:
                out = model(batch.input_ids, loops=result.loops, seed=3)
                targets = batch.labels[:, 1:]
                nll += float(
                    F.cross_entropy(
                        out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                    )
                )
                count += int((targets != IGNORE_INDEX).sum())
                squares += float(out.state.double().pow(2).sum())
                elements += out.state.numel()
        assert result.tokens == count
        assert result.loss == pytest.approx(nll / count, abs=1e-5)
        assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert result.state_rms == pytest.approx(math.sqrt(squares / elements), rel=1e-5)
        assert result.exact_match == naive_exact_match(model, batches, result.loops, 3)[0]


def greedy(model: LoopLM, encoder: TaskEncoder, example: Example, steps: int) -> tuple[str, ...]:
    """Token-by-token greedy generation of ``len(example.target)`` tokens, one full forward call per token."""
    names = {i: s for s, i in encoder.symbols.items()}
    ids = [encoder.start_id] + [encoder.symbols[s] for s in example.input] + [encoder.end_id]
    generated = []
    with torch.no_grad():
        for _ in example.target:
            logits = model(torch.tensor([ids]), loops=steps).logits
            token = int(logits[0, -1].argmax())
            ids.append(token)
            generated.append(names.get(token, f"<id {token}>"))
    return tuple(generated)


def first_wrong_teacher_forced(model: LoopLM, encoder: TaskEncoder, example: Example, steps: int) -> int | None:
    """The first target position whose teacher-forced argmax is wrong (None: all right)."""
    ids, labels = encoder.encode(example)
    with torch.no_grad():
        predictions = model(torch.tensor([ids]), loops=steps).logits[0].argmax(-1).tolist()
    scored = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
    wrong = [k for k, t in enumerate(scored) if predictions[t] != labels[t + 1]]
    return wrong[0] if wrong else None


def first_difference(a: tuple[str, ...], b: tuple[str, ...]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def test_teacher_forced_exact_match_is_greedy_decoding_for_continuations() -> None:
    symbols = ["a", "b", "c", "d"]
    tokenizer = task_tokenizer(symbols)
    encoder = TaskEncoder(tokenizer)
    config = small_config(tie_embeddings=False, state_init="zero")  # states do not depend on the row width
    model = restrict_head(build_model(config, seed=2), list(encoder.symbols.values()))
    generator = torch.Generator().manual_seed(4)
    inputs = []
    for length in (1, 2, 4, 5, 2, 4, 1, 5):  # never 3: a three-token target must stay a continuation
        picks = torch.randint(0, len(symbols), (length,), generator=generator).tolist()
        inputs.append(tuple(symbols[i] for i in picks))
    # targets: the model's own greedy output at 3 loops (solved there), that output with one token changed, and
    # the greedy output at 1 loop (solved there)
    examples = []
    for n, source in enumerate(inputs):
        own = greedy(model, encoder, Example(source, ("a", "a", "a")), 3)
        shallow = greedy(model, encoder, Example(source, ("a", "a", "a")), 1)
        assert set(own) | set(shallow) <= set(symbols)
        position = n % 3
        changed = symbols[(symbols.index(own[position]) + 1 + n % 3) % len(symbols)]
        examples += [
            Example(source, own),
            Example(source, (*own[:position], changed, *own[position + 1 :])),
            Example(source, shallow),
        ]
    assert not any(e.per_position for e in examples)
    outcomes: dict[int, list[bool]] = {1: [], 3: []}
    for example in examples:
        teacher = evaluate_task(model, tokenizer, [example], [1, 3])
        for result in teacher:
            generated = greedy(model, encoder, example, result.loops)
            solved = generated == example.target
            assert result.exact_match == float(solved), (example, result.loops, generated)
            assert first_wrong_teacher_forced(model, encoder, example, result.loops) == first_difference(
                generated, example.target
            )
            outcomes[result.loops].append(solved)
    assert all(outcomes[3][0::3]) and not any(outcomes[3][1::3]) and all(outcomes[1][2::3])
    assert not all(outcomes[1]) and not all(outcomes[3][2::3]), "some outcomes should differ between the depths"
    # all examples in padded batches: with a zero initial state the mean is the per-example outcome's mean
    batched = evaluate_task(model, tokenizer, examples, [1, 3], batch_size=5)
    for result in batched:
        assert result.exact_match == pytest.approx(sum(outcomes[result.loops]) / len(examples))


# ----- training on a built-in task ----------------------------------------------------------------------------


def test_builtin_task_run_saves_a_symbolic_checkpoint_and_exact_match(task_run: Run) -> None:
    assert task_run.result.step == 30 and task_run.result.reason == "completed"
    state = load_checkpoint(resolve_checkpoint(task_run.out))
    assert state.step == 30
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    assert tokenizer.is_symbolic and set(tokenizer.symbol_ids()) == {"0", "1"}
    assert state.config.vocab_size == 64  # 16 ids padded to a multiple of 64
    assert state.meta["data"] == {"task": "prefix-parity", "train_difficulty": [4, 4], "eval_examples": 128}
    assert state.meta["train_config"]["task"] == "prefix-parity"
    assert state.meta["sampler"] == {"draws": 30}

    metrics = task_run.out / "metrics.jsonl"
    train = read_metrics(metrics, "train")
    assert [r["step"] for r in train] == [10, 20, 30]
    assert train[-1]["tokens"] == 30 * 32 * 6  # rows of BOS + 4 bits + end marker, not seq_len
    evals = read_metrics(metrics, "eval")
    assert {(r["step"], r["loops"]) for r in evals} == {(30, 1), (30, 4)}
    for record in evals:
        assert 0 <= record["exact_match"] <= 1
        assert math.isfinite(record["loss"])
    by_depth = {r["loops"]: r for r in evals}
    assert [r.exact_match for r in task_run.result.evaluation] == [
        by_depth[1]["exact_match"],
        by_depth[4]["exact_match"],
    ]

    # the evaluation set is batch_size * eval_batches examples at eval_difficulty, generated with seed + 1
    model, _, _ = load_trained_model(task_run.out)
    examples = TASKS["prefix-parity"].generate(8, 128, seed=1)
    again = evaluate_task(model, tokenizer, examples, [1, 4], batch_size=32, seed=0)
    for result in again:
        assert result.exact_match == by_depth[result.loops]["exact_match"]
        assert result.loss == pytest.approx(by_depth[result.loops]["loss"], rel=1e-5)


def test_builtin_task_run_resumes_bit_exactly(task_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "split"
    first = fit(task_run.config, out, stop_at=15)
    assert (first.reason, first.step) == ("stop-at", 15)
    second = fit(task_run.config, out, resume=True)
    assert second.step == 30
    assert {**first.losses, **second.losses} == task_run.result.losses
    want = load_file(resolve_checkpoint(task_run.out) / "model.safetensors")
    got = load_file(resolve_checkpoint(out) / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


# ----- training on JSONL files ----------------------------------------------------------------------------------


def test_jsonl_task_run_trains_and_evaluates(file_run: Run) -> None:
    assert file_run.result.step == 6
    state = load_checkpoint(resolve_checkpoint(file_run.out))
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    assert tokenizer.is_symbolic and set(tokenizer.symbol_ids()) == {"0", "1"}
    assert state.meta["data"] == {"task_data": file_run.config.task_data, "train_examples": 64, "eval_examples": 16}
    assert "task" not in state.meta["data"] and state.meta["train_config"]["task"] is None
    evals = read_metrics(file_run.out / "metrics.jsonl", "eval")
    assert {(r["step"], r["loops"]) for r in evals} == {(3, 1), (3, 2), (6, 1), (6, 2)}
    assert all(0 <= r["exact_match"] <= 1 for r in evals)
    assert all(math.isfinite(loss) for loss in file_run.result.losses.values())


def test_eval_file_with_a_symbol_absent_from_training_is_named(file_run: Run, tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    write_task_file(eval_file, [Example(("0", "1"), ("0", "1")), Example(("1", "2", "1"), ("1",))])
    config = file_run.config.replace(eval_data=str(eval_file))
    with pytest.raises(InputError) as info:
        fit(config, tmp_path / "run")
    message = str(info.value)
    assert "'2'" in message and str(eval_file) in message and "example 2" in message
    # a built-in task with an eval file is checked against the task's alphabet the same way
    with pytest.raises(InputError, match=r"'2'") as info:
        prepare_task_data(task_config(eval_data=str(eval_file)))
    assert str(eval_file) in str(info.value)


def test_task_files_without_eval_data_hold_out_val_fraction(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    examples = TASKS["prefix-parity"].generate(3, 10, seed=0)
    write_task_file(path, examples)
    data = prepare_task_data(TrainConfig(task_data=str(path), val_fraction=0.2, seed=4))
    assert len(data.train_examples) == 8 and len(data.eval_examples) == 2
    assert sorted(map(repr, data.train_examples + data.eval_examples)) == sorted(
        repr(Example(e.input, e.target)) for e in examples
    )
    write_task_file(path, examples[:1])
    single = prepare_task_data(TrainConfig(task_data=str(path)))
    assert len(single.train_examples) == len(single.eval_examples) == 1  # too few to hold one out: reuse it


def test_a_text_tokenizer_cannot_carry_task_data() -> None:
    with pytest.raises(InputError, match="text tokenizer"):
        prepare_task_data(task_config(), TextTokenizer.byte_level())


# ----- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "prefix-parity", "task_data": "x.jsonl"}, "either a built-in task or task_data"),
        ({"eval_data": "x.jsonl"}, "needs a task"),
        ({"task_data": "x.jsonl", "task_difficulty": "4"}, "built-in task only"),
        ({"task_data": "x.jsonl", "eval_difficulty": 8}, "built-in task only"),
        ({"task_curriculum_steps": 10}, "built-in task only"),
        ({"task": "prefix-parity", "task_curriculum_steps": -1}, "task_curriculum_steps"),
        ({"task": "prefix-parity", "eval_difficulty": 0}, "eval_difficulty"),
    ],
)
def test_train_config_rejects_inconsistent_task_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


def test_task_fields_round_trip_and_mark_a_task_run() -> None:
    config = TrainConfig(task="addition", task_difficulty="1-10", eval_difficulty=20)
    assert config.is_task and TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig(task_data="x.jsonl", eval_data="y.jsonl").is_task
    assert not TrainConfig().is_task


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task_difficulty": "abc"}, "task_difficulty 'abc' is invalid: expected N or LOW-HIGH"),
        ({"task_difficulty": "2-x"}, "task_difficulty '2-x' is invalid: expected N or LOW-HIGH"),
        ({"task_difficulty": "8-4"}, "task_difficulty '8-4' is invalid: expected 1 <= LOW <= HIGH"),
        ({"task_difficulty": "0"}, "task_difficulty '0' is invalid: expected 1 <= LOW <= HIGH"),
        ({"task": "vector-parity", "task_difficulty": "40"}, r"must be an integer in \[1, 32\], got 40"),
        ({"task": "vector-parity", "task_difficulty": "4", "eval_difficulty": 33}, r"in \[1, 32\], got 33"),
        ({"task": "sorting"}, "unknown task 'sorting'"),
    ],
)
def test_bad_task_difficulty_is_an_input_error_when_the_data_is_prepared(
    fields: dict[str, object], message: str
) -> None:
    config = task_config(**fields)  # accepted by TrainConfig: the task decides what a difficulty means
    with pytest.raises(InputError, match=message):
        prepare_task_data(config)


def test_a_curriculum_widens_the_difficulty_range_step_by_step() -> None:
    """With task_curriculum_steps = 4 the upper end grows 1 -> 8 over four steps; the draws stay reproducible."""
    config = TrainConfig(task="vector-parity", task_difficulty="2-8", task_curriculum_steps=4, batch_size=64)
    data = prepare_task_data(config)
    assert "reached over 4 steps" in data.summary
    sampler = data.sampler(64, seed=0, rank=0, world_size=1)
    highest = []
    for _ in range(6):
        bounds = sampler.current_bounds()
        batch = sampler.next_batch()
        nonzero = (batch.input_ids[:, 1:33] != data.encoder.symbols["0"]).sum(dim=1)
        assert bounds[0] <= int(nonzero.min()) and int(nonzero.max()) <= bounds[1]
        highest.append(bounds[1])
    assert highest == [4, 5, 7, 8, 8, 8]  # 2 + ceil(6 * (i + 1) / 4)
    again = data.sampler(64, seed=0, rank=0, world_size=1)
    again.load_state_dict({"draws": 2})
    sampler.load_state_dict({"draws": 2})
    assert torch.equal(again.next_batch().input_ids, sampler.next_batch().input_ids)
    flat = prepare_task_data(config.replace(task_curriculum_steps=0)).sampler(64, seed=0, rank=0, world_size=1)
    assert flat.current_bounds() == (2, 8)


def test_default_difficulties_come_from_the_task() -> None:
    data = prepare_task_data(TrainConfig(task="pointer-chasing", batch_size=4, eval_batches=2))
    assert data.bounds == TASKS["pointer-chasing"].train_difficulty == (1, 4)
    assert len(data.eval_examples) == 8
    assert {e.difficulty for e in data.eval_examples} == {8}  # twice the hardest training difficulty


# ----- loopformer eval-task ----------------------------------------------------------------------------------


def test_eval_task_cli_reports_exact_match_per_loop_count(task_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval-task", "--ckpt", str(task_run.out), "--difficulty", "8", "--loops", "1,2", "--count", "24"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 30 and report["examples"] == 24
    assert len(report["results"]) == 2 and [r["loops"] for r in report["results"]] == [1, 2]
    assert all(0 <= r["exact_match"] <= 1 for r in report["results"])
    model, state, _ = load_trained_model(task_run.out)
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    direct = evaluate_task(model, tokenizer, TASKS["prefix-parity"].generate(8, 24, seed=0), [1, 2])
    assert [r["exact_match"] for r in report["results"]] == [r.exact_match for r in direct]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "exact match %" in table and "24 examples" in table


def test_eval_task_cli_scores_a_data_file(
    task_run: Run, file_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "eval.jsonl"
    write_task_file(data, [*TASKS["prefix-parity"].generate(5, 6, seed=9), *continuations(3, seed=9)])
    for run in (task_run, file_run):
        assert main(["eval-task", "--ckpt", str(run.out), "--data", str(data), "--loops", "2,1", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["examples"] == 9 and report["source"] == str(data)
        assert [r["loops"] for r in report["results"]] == [2, 1]
        assert all(0 <= r["exact_match"] <= 1 for r in report["results"])


@pytest.fixture
def bad_symbol_file(tmp_path: Path) -> Path:
    path = tmp_path / "odd.jsonl"
    write_task_file(path, [Example(("0", "1"), ("0", "1")), Example(("0", "x", "1"), ("1",))])
    return path


@pytest.mark.parametrize(
    ("run_name", "extra", "message"),
    [
        ("task_run", ["--data", "{data}", "--difficulty", "8"], "either --data or --task/--difficulty"),
        ("task_run", ["--data", "{data}", "--task", "prefix-parity"], "either --data or --task/--difficulty"),
        ("task_run", [], "pass --difficulty"),
        ("task_run", ["--difficulty", "0"], "must be an integer >= 1, got 0"),
        ("task_run", ["--task", "vector-parity", "--difficulty", "3"], "which the training data never contained"),
        ("task_run", ["--task", "sorting", "--difficulty", "3"], "unknown task 'sorting'"),
        ("task_run", ["--difficulty", "4", "--loops", "1,x"], "--loops '1,x' is invalid"),
        ("task_run", ["--data", "{data}"], "example 2 uses the symbol 'x'"),
        ("file_run", ["--data", "{data}"], "example 2 uses the symbol 'x'"),
        ("file_run", ["--difficulty", "4"], "was trained on task files, so pass --data"),
        ("file_run", [], "was trained on task files, so pass --data"),
    ],
)
def test_eval_task_cli_errors_are_one_line_and_exit_2(
    request: pytest.FixtureRequest,
    bad_symbol_file: Path,
    capsys: pytest.CaptureFixture[str],
    run_name: str,
    extra: list[str],
    message: str,
) -> None:
    run: Run = request.getfixturevalue(run_name)
    extra = [str(bad_symbol_file) if a == "{data}" else a for a in extra]
    assert main(["eval-task", "--ckpt", str(run.out), "--loops", "1", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopformer: error:") and message in lines[0], lines
    assert captured.out == ""
    if "'x'" in message:
        assert str(bad_symbol_file) in lines[0]


@pytest.fixture
def text_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOPFORMER_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=40)
    config = TrainConfig(
        data=str(corpus),
        tokenizer="byte",
        seq_len=16,
        batch_size=2,
        steps=1,
        eval_every=0,
        eval_loops=(1,),
        eval_batches=1,
        save_every=0,
        val_fraction=0.2,
        device="cpu",
    )
    out = tmp_path / "text"
    fit(config, out, model_config=small_config(n_core=1, max_seq_len=32))
    return out


def test_eval_task_cli_refuses_a_text_checkpoint(text_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval-task", "--ckpt", str(text_run), "--task", "prefix-parity", "--difficulty", "4"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not a task checkpoint" in lines[0] and "eval-ppl" in lines[0], lines
