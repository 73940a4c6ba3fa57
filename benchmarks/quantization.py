"""Quantization benchmark: file size, decode speed and quality of int8 / int4 weight-only quantization against fp32,
at several depths (quantization error may compound over loop iterations), and ANIMA's size claim.

Every quantized model is written with :func:`loopformer.quant.save_quantized` and read back with
``load_trained_model``, so what is measured is what ``loopformer quantize`` produces and every command loads.

1. **Size**: ``model.safetensors`` bytes of the text LM per scheme.
2. **Perplexity vs depth**: the existing perplexity evaluation (``evaluate_loops``: one pass to the deepest depth,
   the shallower ones decoded on the way, seed 0) over held-out rows of the corpus the checkpoint was trained on (the
   same held-out text as ``benchmarks/inference.py``), at r = 1, 8, 32, 128.
3. **Decode speed**: greedy tokens/s at batch 1 for r = 8 and 32 through the inference engine (a 32-token prompt of
   held-out text, 64 new tokens, no stop token, one warm-up, median of 5 with the schemes taking turns; the prefill
   is included), and how many of the 64 tokens equal the fp32 model's (leading tokens in common).
4. **Task accuracy** (``--task-ckpt``): exact match through the task evaluation path (``evaluate_task``) at the
   trained difficulty and 4x it, r = 1, 8, 32, 128.
5. **ANIMA**: the ``anima-micro`` preset (random weights, seed 0; the sizes do not depend on the values) saved in
   fp32 and quantized; ANIMA claims about 5 MB for 10.8M parameters.

    python benchmarks/quantization.py --ckpt runs/bench-lm --task-ckpt runs/parity-looped \
        --json benchmarks/results/quantization.json

``--quick`` runs every section at tiny sizes (the smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from inference import held_out_stream, machine, progress, rounded, run_report, take
from loopformer.checkpoint import TrainingState, write_checkpoint_dir
from loopformer.errors import LoopformerError
from loopformer.evaluation.perplexity import evaluate_loops
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.loading import load_trained_model
from loopformer.model import LoopLM, build_model
from loopformer.presets import get_preset
from loopformer.quant import QuantScheme, save_quantized
from loopformer.table import format_table
from loopformer.tasks.builtin import get_task
from loopformer.tasks.data import parse_difficulty_range
from loopformer.tasks.evaluate import evaluate_task
from loopformer.tokenizer import TextTokenizer

SCHEMES: dict[str, QuantScheme | None] = {"fp32": None, "int8": QuantScheme(8), "int4-g64": QuantScheme(4, 64)}
ANIMA_SCHEMES: dict[str, QuantScheme | None] = {
    **SCHEMES,
    "int4-g128": QuantScheme(4, 128),
    "int4-g64, fp32 embedding": QuantScheme(4, 64, embedding=False),
    "int4-g64 + adapters": QuantScheme(4, 64, adapters=True),
    "int4-g32 + adapters": QuantScheme(4, 32, adapters=True),
}
ANIMA_CLAIM = {"parameters": 10.8e6, "bytes": 5e6}
MB, MIB = 1e6, 2**20


@dataclass(frozen=True)
class Sizes:
    depths: tuple[int, ...]
    ppl_rows: int
    ppl_tokens: int
    ppl_batch: int
    decode_loops: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    task_count: int
    anima_preset: str  # the preset of the ANIMA section (quick: a small one)


FULL = Sizes((1, 8, 32, 128), 8, 256, 4, (8, 32), 32, 64, 5, 128, "anima-micro")
QUICK = Sizes((1, 2), 2, 16, 2, (2,), 8, 4, 1, 4, "tiny")


def write_variants(path: Path, workdir: Path, schemes: dict[str, QuantScheme | None]) -> dict[str, Path]:
    """The checkpoint directory of each scheme: the source for fp32, a quantized copy under ``workdir`` otherwise."""
    found = {}
    for label, scheme in schemes.items():
        model, state, directory = load_trained_model(path)
        if scheme is None:
            found[label] = directory
        else:
            found[label], _ = save_quantized(workdir / label, model, state, scheme, str(directory))
    return found


def file_bytes(directory: Path) -> int:
    return (directory / "model.safetensors").stat().st_size


# ----- sections ------------------------------------------------------------------------------------------------
def measure_sizes(paths: dict[str, Path], parameters: int) -> list[dict[str, Any]]:
    base = file_bytes(paths["fp32"])
    rows = []
    for label, directory in paths.items():
        size = file_bytes(directory)
        rows.append(
            {
                "scheme": label,
                "bytes": size,
                "mib": round(size / MIB, 3),
                "ratio_fp32_over_scheme": round(base / size, 2),
                "bits_per_parameter": round(8 * size / parameters, 2),
            }
        )
        progress("size", f"{label}: {size / MIB:.2f} MiB")
    return rows


def measure_perplexity(model: LoopLM, ids: torch.Tensor, sizes: Sizes) -> list[dict[str, Any]]:
    batches = [SimpleNamespace(input_ids=chunk, labels=chunk) for chunk in ids.split(sizes.ppl_batch)]
    with torch.inference_mode():
        results = evaluate_loops(model, batches, sizes.depths, seed=0)
    return [{"loops": r.loops, "loss": round(r.loss, 5), "perplexity": rounded(r.perplexity)} for r in results]


def measure_decode(models: dict[str, LoopLM], prompt: list[int], sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    """Decode speed per scheme and depth. The schemes take turns within each repeat, so a slowdown of the shared
    machine hits all of them rather than whichever ran at the time."""
    engines = {label: Engine(model) for label, model in models.items()}
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in models}
    for loops in sizes.decode_loops:
        config = GenerationConfig(max_new_tokens=sizes.new_tokens, loops=loops, stop_tokens=())
        results = {label: engine.generate([prompt], config) for label, engine in engines.items()}  # warm-up
        seconds: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(sizes.repeats):
            for label, engine in engines.items():
                start = time.perf_counter()
                results[label] = engine.generate([prompt], config)
                seconds[label].append(time.perf_counter() - start)
        for label, result in results.items():
            speed = result.new_tokens / statistics.median(seconds[label])
            rows[label].append(
                {
                    "loops": loops,
                    "tokens_per_s": round(speed, 2),
                    "seconds": [round(s, 4) for s in seconds[label]],
                    "tokens": result.outputs[0].tokens,
                    "same_tokens_as_fp32": same_prefix(result.outputs[0].tokens, results["fp32"].outputs[0].tokens),
                }
            )
            progress("decode", f"{label}, r={loops}: {speed:.1f} tok/s")
    return rows


def measure_task(paths: dict[str, Path], sizes: Sizes, seed: int) -> dict[str, Any]:
    _, state, directory = load_trained_model(paths["fp32"])
    tokenizer = TextTokenizer.from_json(state.tokenizer_json or "")
    train = state.meta.get("train_config") or {}
    name = train.get("task") or "prefix-parity"
    task = get_task(name)
    spec = train.get("task_difficulty")
    trained = parse_difficulty_range(spec)[1] if spec else task.train_difficulty[1]
    difficulties = [trained] if sizes is QUICK else [trained, 4 * trained]
    rows = []
    for label, path in paths.items():
        model, _, _ = load_trained_model(path)
        for difficulty in difficulties:
            examples = task.generate(difficulty, sizes.task_count, seed=seed)
            results = evaluate_task(model, tokenizer, examples, sizes.depths, batch_size=64, seed=seed)
            accuracy = [rounded(r.exact_match) for r in results]  # one per depth of sizes.depths
            rows.append({"scheme": label, "difficulty": difficulty, "accuracy": accuracy})
            progress("task", f"{label}, {task.difficulty_name} {difficulty}: {accuracy}")
    return {
        "checkpoint": str(directory),
        "task": name,
        "difficulty_name": task.difficulty_name,
        "examples": sizes.task_count,
        "rows": rows,
    }


def measure_anima(workdir: Path, preset: str) -> dict[str, Any]:
    config = get_preset(preset)
    model = build_model(config, seed=0)
    parameters = model.num_parameters()
    fp32 = write_checkpoint_dir(workdir / "anima-fp32", TrainingState(step=0, model=model.state_dict(), config=config))
    rows = []
    for label, scheme in ANIMA_SCHEMES.items():
        path = fp32
        if scheme is not None:
            state = TrainingState(step=0, model={}, config=config)
            path, _ = save_quantized(workdir / f"anima-{label}", build_model(config, seed=0), state, scheme, str(fp32))
        size = file_bytes(path)
        rows.append(
            {
                "scheme": label,
                "bytes": size,
                "mb": round(size / MB, 3),
                "mib": round(size / MIB, 3),
                "bits_per_parameter": round(8 * size / parameters, 2),
            }
        )
        progress("anima", f"{label}: {size / MB:.2f} MB")
    return {
        "preset": preset,
        "parameters": parameters,
        "embedding_parameters": config.vocab_size * config.dim,
        "claim": ANIMA_CLAIM,
        "pure_4bit_bytes": parameters // 2,
        "rows": rows,
    }


# ----- report --------------------------------------------------------------------------------------------------
def show(report: dict[str, Any]) -> None:
    lm = report["text_lm"]
    print(f"## Quantization benchmark: {lm['checkpoint']} ({lm['parameters']:,} params)\n")
    print("### File size (model.safetensors)\n")
    rows = [[r["scheme"], r["mib"], r["ratio_fp32_over_scheme"], r["bits_per_parameter"]] for r in lm["sizes"]]
    print(format_table(["scheme", "MiB", "fp32 / scheme", "bits / param"], rows))
    depths = report["sizes"]["depths"]
    print(f"\n### Perplexity vs depth ({lm['perplexity_tokens']:,} held-out tokens)\n")
    base = {r["loops"]: r["perplexity"] for r in lm["schemes"]["fp32"]["perplexity"]}
    rows = []
    for label, entry in lm["schemes"].items():
        cells = []
        for r in entry["perplexity"]:
            change = "" if label == "fp32" else f" ({r['perplexity'] / base[r['loops']] - 1:+.2%})"
            cells.append(f"{r['perplexity']:.3f}{change}")
        rows.append([label, *cells])
    print(format_table(["scheme", *(f"r={d}" for d in depths)], rows))
    print("\n### Decode speed (batch 1, greedy; the machine is shared: timings are noisy)\n")
    rows = []
    for label, entry in lm["schemes"].items():
        for r in entry["decode"]:
            rows.append([label, r["loops"], r["tokens_per_s"], r["same_tokens_as_fp32"]])
    print(format_table(["scheme", "loops", "tok/s", "tokens equal to fp32"], rows))
    task = report.get("task")
    if task:
        print(f"\n### {task['task']} exact match ({task['examples']} examples)\n")
        rows = [[r["scheme"], r["difficulty"], *(f"{100 * a:.1f}%" for a in r["accuracy"])] for r in task["rows"]]
        print(format_table(["scheme", task["difficulty_name"], *(f"r={d}" for d in depths)], rows))
    anima = report["anima"]
    print(f"\n### {anima['preset']} ({anima['parameters']:,} params; ANIMA claims about 5 MB for 10.8M)\n")
    rows = [[r["scheme"], r["mb"], r["mib"], r["bits_per_parameter"]] for r in anima["rows"]]
    print(format_table(["scheme", "MB", "MiB", "bits / param"], rows))


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads or torch.get_num_threads())
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/quantization.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(torch.get_num_threads()),
        "sizes": asdict(sizes),
        "schemes": {label: None if s is None else s.to_dict() for label, s in SCHEMES.items()},
    }
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        workdir = Path(tmp)
        model, state, directory = load_trained_model(Path(args.ckpt))
        if state.tokenizer_json is None:
            raise LoopformerError(f"{directory} has no tokenizer.json; the benchmark needs the checkpoint's tokenizer.")
        tokenizer = TextTokenizer.from_json(state.tokenizer_json)
        stream, source = held_out_stream(state, tokenizer)
        progress("data", f"held-out text: {source}")
        ids = take(stream, sizes.ppl_rows, min(sizes.ppl_tokens, model.config.max_seq_len))
        prompt = take(stream[ids.numel() :], 1, sizes.prompt_tokens)[0].tolist()
        paths = write_variants(Path(args.ckpt), workdir / "lm", SCHEMES)
        lm: dict[str, Any] = {
            "checkpoint": str(directory),
            "parameters": model.num_parameters(),
            "held_out": source,
            "perplexity_tokens": ids.numel(),
            "sizes": measure_sizes(paths, model.num_parameters()),
            "schemes": {},
        }
        models = {label: load_trained_model(path)[0] for label, path in paths.items()}
        for label, quantized in models.items():
            ppl = measure_perplexity(quantized, ids, sizes)
            progress("perplexity", f"{label}: " + ", ".join(f"r={r['loops']} {r['perplexity']}" for r in ppl))
            lm["schemes"][label] = {"perplexity": ppl}
        for label, decode in measure_decode(models, prompt, sizes).items():
            lm["schemes"][label]["decode"] = decode
        report["text_lm"] = lm
        if args.task_ckpt:
            report["task"] = measure_task(write_variants(Path(args.task_ckpt), workdir / "task", SCHEMES), sizes, 0)
        report["anima"] = measure_anima(workdir, sizes.anima_preset)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="text LM checkpoint (a checkpoint or run directory)")
    parser.add_argument("--task-ckpt", help="a reasoning-task checkpoint: exact match per scheme and depth")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    return run_report(args, argv, measure, show, "quantization.py")


if __name__ == "__main__":
    sys.exit(main())
