"""The training loop: sampled depth per step, truncated backprop, accumulation, clipping, EMA, checkpoints.

One optimizer step draws one depth (the same on every rank: every rank seeds the depth generator alike),
runs ``grad_accum`` micro-batches of ``batch_size`` rows per rank through ``model(..., loops=depth,
backprop_loops=k)`` and updates the weights. The random initial state of each micro-batch is seeded from
(seed, step, global micro-batch index), so N ranks x 1 micro-batch equals 1 rank x N micro-batches.
Everything a resumed run needs (weights, EMA, optimizer, depth generator, data position) is in the
checkpoint, so ``resume`` continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from loopformer.checkpoint import (
    TrainingState,
    adds_halting_head,
    capture_rng,
    check_compatible,
    check_layer_count,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from loopformer.config import ModelConfig
from loopformer.errors import InputError, TrainingError
from loopformer.evaluation.perplexity import DepthResult, evaluate_loops
from loopformer.flops import training_flops_per_token
from loopformer.hardware import DtypeChoice, resolve_dtype
from loopformer.model import LoopLM, build_model
from loopformer.nn.halting import penalty_scale
from loopformer.recurrence import sample_depth, sample_depths
from loopformer.tasks.data import TaskData, prepare_task_data
from loopformer.tokenizer import TextTokenizer
from loopformer.training.config import TrainConfig
from loopformer.training.data import Batch, document_mask
from loopformer.training.distributed import init_distributed, shutdown, wrap_model
from loopformer.training.metrics import MetricsLogger, ProgressBar, format_eta, measure_matmul_peak
from loopformer.training.optim import EMA, build_optimizer, learning_rate, set_learning_rate
from loopformer.training.pipeline import PreparedData, prepare_data

VOCAB_MULTIPLE = 64  # the embedding / head rows are padded to a multiple of this for matmul efficiency


@dataclass
class TrainResult:
    step: int
    reason: str  # completed | interrupted | time-limit | stop-at
    checkpoint: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step -> mean loss
    evaluation: list[DepthResult] | None = None


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into "checkpoint and stop after this step"; a second one aborts. Both say
    which steps an abort loses (``unsaved()``: e.g. "the 12 steps since the checkpoint at step 6")."""

    def __init__(self, say: Callable[[str], None], unsaved: Callable[[], str]) -> None:
        self.requested = False
        self._say = say
        self._unsaved = unsaved
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self._say(f"aborted without a checkpoint, losing {self._unsaved()}")
            raise KeyboardInterrupt
        self.requested = True
        self._say(
            "stop requested: saving a checkpoint after this step "
            f"(press Ctrl-C again to abort and lose {self._unsaved()})"
        )

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the initial latent state of one micro-batch (global micro-batch index ``micro``)."""
    return (seed * 1_000_003 + step) * 1_009 + micro


def read_source(path: Path, load_optimizer: bool) -> TrainingState:
    """The checkpoint a run resumes or fine-tunes from (any path :func:`resolve_checkpoint` takes), refused before
    any model is built when its config cannot fit its tensors."""
    directory = resolve_checkpoint(path)
    state = load_checkpoint(directory, load_optimizer=load_optimizer)
    check_layer_count(state, directory)
    return state


class Trainer:
    """Train ``model_config`` under ``train_config``, writing checkpoints and metrics to ``out_dir``.

    ``resume=True`` continues the run in ``out_dir`` from its latest checkpoint (the model config must
    match it in shape); ``stop_at`` ends this invocation at that step without shortening the schedule.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        stop_at: int | None = None,
        stream: TextIO | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = train_config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.stop_at = stop_at
        self.stream = stream if stream is not None else sys.stderr
        self.progress_enabled = progress
        self.progress: ProgressBar | None = None  # exists while the loop runs
        self.step_shape = (0, 0)  # (tokens in the global batch, row width) of the latest step
        self.moe_metrics: dict[str, Any] = {}  # expert-load statistics of the latest step (MoE models)
        self.halting_metrics: dict[str, float] = {}  # mean ponder cost and loops of the latest step (ACT models)

    # ----- setup --------------------------------------------------------------------------
    def _restore_source(self) -> TrainingState | None:
        """The checkpoint this run starts from (resume, or init_from for fine-tuning), if any."""
        latest = self.out_dir / "checkpoints" / "latest"
        if self.resume:
            state = read_source(self.out_dir, load_optimizer=True)
            self._check_shape(state.config)
            return state
        if latest.exists():
            raise InputError(
                f"{self.out_dir} already holds a training run; pass --resume to continue it or choose another --out."
            )
        if self.config.init_from:
            return self._fine_tuning_source(Path(self.config.init_from))
        return None

    def _fine_tuning_source(self, path: Path) -> TrainingState:
        """The init_from checkpoint, its EMA weights in place of its raw ones with ``init_from_ema``. The requested
        model may add a halting head (:func:`adds_halting_head`); everything else must have the saved shape."""
        state = read_source(path, load_optimizer=False)
        saved = state.config
        if adds_halting_head(saved, self.model_config):
            saved = saved.replace(halting="act", halting_input=self.model_config.halting_input)
        self._check_shape(saved)
        if self.config.init_from_ema:
            if state.ema is None:
                raise InputError(f"init_from_ema: {path} holds no EMA weights (its run had ema_decay 0).")
            state.model = state.ema
        return state

    def _check_shape(self, saved: ModelConfig) -> None:
        """The requested model must have the checkpoint's shape (its vocabulary comes from the tokenizer)."""
        check_compatible(saved, self.model_config.replace(vocab_size=saved.vocab_size))

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            if self.progress is not None:
                self.progress.write(line)
            else:
                print(line, file=self.stream, flush=True)

    def _setup(self) -> None:
        cfg = self.config
        self.dist = init_distributed(cfg.resolved_device())
        if self.dist.enabled and cfg.strategy == "fsdp" and cfg.ema_decay > 0:
            raise InputError("ema_decay > 0 is not supported with strategy fsdp yet; use strategy ddp for EMA.")
        if self.model_config.max_seq_len < cfg.seq_len:
            limit = self.model_config.max_seq_len
            raise InputError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len ({limit}); raise --max-seq-len.")
        source = self._restore_source()
        tokenizer = None
        if source and source.tokenizer_json:
            tokenizer = TextTokenizer.from_json(source.tokenizer_json, roles=source.token_roles)
        self.data: PreparedData | TaskData
        if cfg.is_task:
            self.data = prepare_task_data(cfg, tokenizer)
        else:
            self.data = prepare_data(cfg, tokenizer, self._say, self.dist.is_main, self.dist.barrier)
        model_config = self.model_config
        if source is not None:
            model_config = model_config.replace(vocab_size=source.config.vocab_size)
        else:
            padded = math.ceil(self.data.tokenizer.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
            model_config = model_config.replace(vocab_size=padded)
        self.model_config = model_config
        self.model: LoopLM = build_model(model_config, seed=cfg.seed, device=self.dist.device)
        if source is not None:
            self._load_weights(source)
        self._freeze_all_but(cfg.trainable)
        self.wrapped = wrap_model(self.model, self.dist, cfg.strategy)  # before the optimizer: FSDP swaps params
        if cfg.compile:
            for layer in self.model.layers():
                layer.compile()
        self.optimizer = build_optimizer(
            self.model, cfg.lr, weight_decay=cfg.weight_decay, decay_embeddings=cfg.decay_embeddings
        )
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.depth_generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = self.data.sampler(
            cfg.batch_size * cfg.grad_accum, cfg.seed, self.dist.rank, self.dist.world_size
        )
        self.step = 0
        self.saved_step: int | None = None  # the step of this run's newest checkpoint
        self.tokens_seen = 0
        if self.resume and source is not None:
            self._load_training_state(source)
        self.val_batches = self.data.eval_batches(cfg.batch_size, cfg.eval_batches)
        self.dtype_choice = self._resolve_dtype(cfg, model_config)
        self.logger = MetricsLogger(
            self.out_dir / "metrics.jsonl",
            self.out_dir / "tensorboard" if cfg.tensorboard else None,
            enabled=self.dist.is_main,
        )

    def _resolve_dtype(self, cfg: TrainConfig, model: ModelConfig) -> DtypeChoice:
        """``cfg.dtype`` on this device, probed at the run's batch and widths; every rank takes rank 0's choice (a
        timed probe may land on either side of the threshold on different ranks)."""
        choice = resolve_dtype(cfg.dtype, self.dist.device, (cfg.batch_size * cfg.seq_len, model.dim, model.mlp_hidden))
        if not self.dist.enabled:
            return choice
        main_bf16 = torch.tensor([float(self.dist.is_main and choice.name == "bf16")], device=self.dist.device)
        name = "bf16" if float(self.dist.all_reduce_sum(main_bf16)) > 0 else "fp32"
        return choice if name == choice.name else DtypeChoice(name, choice.requested, "rank 0's choice")

    def _load_weights(self, source: TrainingState) -> None:
        """The source's weights; only a fine-tune that adds a halting head may leave tensors (that head's) fresh."""
        missing, unexpected = self.model.load_state_dict(source.model, strict=False)
        fresh_ok = not self.resume and adds_halting_head(source.config, self.model_config)
        if unexpected or any(not (fresh_ok and name.startswith("halting.")) for name in missing):
            raise InputError(
                f"The checkpoint's tensors do not fit the model: missing {missing}, unexpected {unexpected}."
            )
        if missing:
            self._say(f"init_from: the halting head ({', '.join(missing)}) starts fresh")

    def _freeze_all_but(self, prefixes: tuple[str, ...]) -> None:
        """Train only the parameters whose names start with one of ``prefixes`` (all of them when empty)."""
        if not prefixes:
            return
        names = [name for name, _ in self.model.named_parameters()]
        for prefix in prefixes:
            if not any(name.startswith(prefix) for name in names):
                tops = sorted({name.split(".")[0] for name in names})
                raise InputError(f"trainable prefix {prefix!r} names no parameter; the model has {', '.join(tops)}.")
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith(prefixes))
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._say(f"training {count:,} of {self.model.num_parameters():,} parameters ({', '.join(prefixes)})")

    def _load_training_state(self, state: TrainingState) -> None:
        if state.optimizer is not None:
            sharded = self.dist.enabled and self.config.strategy == "fsdp"
            options = StateDictOptions(full_state_dict=True, cpu_offload=True) if sharded else None
            set_optimizer_state_dict(self.model, self.optimizer, state.optimizer, options=options)
        if self.ema is not None and state.ema is not None:
            self.ema.load_state_dict(state.ema)
        if state.rng is not None:
            restore_rng(state.rng, {"depth": self.depth_generator})
        self.sampler.load_state_dict(state.meta["sampler"])
        self.step = self.saved_step = state.step
        self.tokens_seen = int(state.meta.get("tokens", 0))

    # ----- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part in gathering)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        path = None
        if self.dist.is_main:
            meta = {
                "tokens": self.tokens_seen,
                "sampler": self.sampler.state_dict(),
                "train_config": self.config.to_dict(),
                "world_size": self.dist.world_size,
                "data": self.data.stats,
            }
            state = TrainingState(
                step=self.step,
                model=weights,
                config=self.model_config,
                optimizer=optimizer,
                ema=self.ema.state_dict() if self.ema is not None else None,
                rng=capture_rng({"depth": self.depth_generator}),
                tokenizer_json=self.data.tokenizer.to_json(),
                token_roles=self.data.tokenizer.roles_dict(),
                meta=meta,
            )
            path = save_checkpoint(self.out_dir, state, keep_last=self.config.keep_last)
            self.logger.log("checkpoint", self.step, path=str(path))
        self.saved_step = self.step
        self.dist.barrier()
        return path

    # ----- one step -------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[int, Batch]]:
        """This rank's micro-batches of the next step, with their global micro-batch index."""
        cfg = self.config
        rows = self.sampler.next_batch()
        self.step_shape = (rows.input_ids.numel() * self.dist.world_size, rows.input_ids.shape[1])
        for micro in range(cfg.grad_accum):
            part = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
            batch = Batch(rows.input_ids[part], rows.labels[part], rows.doc_ids[part])
            yield self.dist.rank * cfg.grad_accum + micro, batch

    def _depth(self) -> int | torch.Tensor:
        """This step's depth: one int for all ranks, or one per row of the global batch (sliced later)."""
        rec = self.model_config.recurrence
        cfg = self.config
        if rec.per_sequence:
            return sample_depths(rec, cfg.batch_size * cfg.grad_accum * self.dist.world_size, self.depth_generator)
        return sample_depth(rec, 1, self.depth_generator)

    def forward_kwargs(self, batch: Batch) -> dict[str, Any]:
        """Per-batch model arguments beyond the tokens (the document-boundary mask when enabled)."""
        if not self.config.doc_mask:
            return {}
        return {"attention_mask": document_mask(batch.doc_ids, self.model_config.sliding_window).to(self.dist.device)}

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if enabled or not self.dist.enabled:
            yield
        elif isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            with self.wrapped.no_sync():
                yield
        else:  # FSDP2
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)

    def train_step(self, stop: StopRequest) -> tuple[float, float, int | torch.Tensor, bool, bool]:
        """One optimizer step. Returns (mean loss, grad norm, depth, skipped, stop requested on any rank)."""
        cfg = self.config
        device = self.dist.device
        set_learning_rate(self.optimizer, self._lr(self.step))
        depth = self._depth()
        loss_sum = torch.zeros((), dtype=torch.float64)
        moe_loads: list[torch.Tensor] = []
        halting: list[dict[str, float]] = []
        for micro, batch in self._micro_batches():
            steps = depth
            if isinstance(depth, torch.Tensor):
                steps = depth[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            generator = torch.Generator(device=device).manual_seed(micro_seed(cfg.seed, self.step, micro))
            last = micro % cfg.grad_accum == cfg.grad_accum - 1
            autocast = self.dtype_choice.autocast(device)
            with self._gradient_sync(last):
                with autocast:
                    out = self.wrapped(
                        batch.input_ids.to(device),
                        loops=steps,
                        labels=batch.labels.to(device),
                        backprop_loops=self.model_config.recurrence.backprop_loops,
                        generator=generator,
                        checkpoint_steps=cfg.activation_checkpointing,
                        halting_scale=penalty_scale(self.step, self.model_config.halting_warmup_steps),
                        **self.forward_kwargs(batch),
                    )
                loads = self.model.moe_loads()  # before backward, which may re-run checkpointed iterations
                if loads is not None:
                    moe_loads.append(loads)
                if out.halting is not None:
                    halting.append(out.halting.summary())
                if out.loss.requires_grad:  # not when no trainable parameter reaches it (a lone head at depth 1)
                    (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach().double().cpu()
        if halting:
            self.halting_metrics = {key: sum(h[key] for h in halting) / len(halting) for key in halting[0]}
        flags = torch.tensor([float(loss_sum), float(stop.requested)], dtype=torch.float64, device=device)
        flags = self.dist.all_reduce_sum(flags).cpu()
        loss = float(flags[0]) / (cfg.grad_accum * self.dist.world_size)
        stop_requested = bool(flags[1] > 0)
        grad_norm = math.nan
        skipped = not math.isfinite(loss)
        if not skipped:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf))
            skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            if moe_loads:
                self._balance_experts(moe_loads)
            if self.ema is not None:
                self.ema.update(self.model, updates=self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.step_shape[0]
        return loss, grad_norm, depth, skipped, stop_requested

    def _balance_experts(self, loads: list[torch.Tensor]) -> None:
        """Update the routers' balance biases from this step's expert loads; keep the load statistics to log."""
        iterations = min(load.shape[0] for load in loads)
        per_loop = torch.stack([load[:iterations] for load in loads]).mean(dim=0)  # [iterations, layers, experts]
        self.model.update_moe_balance(per_loop.mean(dim=0))
        imbalance = per_loop.amax(dim=-1) / per_loop.mean(dim=-1).clamp_min(1e-12)  # [iterations, layers]
        self.moe_metrics = {
            "moe_imbalance": float(imbalance.mean()),
            "moe_imbalance_by_loop": [round(float(v), 4) for v in imbalance.mean(dim=1)],
        }

    def _lr(self, step: int) -> float:
        cfg = self.config
        return learning_rate(
            step,
            base_lr=cfg.lr,
            total_steps=cfg.steps,
            warmup_steps=min(cfg.warmup_steps, cfg.steps),
            schedule=cfg.schedule,
            min_lr=cfg.min_lr,
            decay_fraction=cfg.decay_fraction,
        )

    # ----- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> list[DepthResult]:
        """Validation loss, perplexity, last-iteration state change and token correlation per depth."""
        ema = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
        with ema:
            results = evaluate_loops(
                self.model,
                self.val_batches,
                self.config.eval_loops,
                seed=self.config.seed,
                forward_kwargs=self.forward_kwargs,
                autocast_dtype=self.dtype_choice.autocast_dtype,
            )
        for r in results:
            task_only = {"exact_match": r.exact_match} if self.config.is_task else {}  # text has no exact answers
            self.logger.log(
                "eval",
                self.step,
                series="loops",
                loops=r.loops,
                loss=r.loss,
                perplexity=r.perplexity,
                state_change=r.state_change,
                token_correlation=r.token_correlation,
                weights="ema" if self.ema is not None else "model",
                **task_only,
            )
        if self.config.is_task:
            summary = ", ".join(f"r={r.loops}: {100 * r.exact_match:.1f}%" for r in results)
            self._say(f"step {self.step}: validation exact match {summary}")
        else:
            summary = ", ".join(f"r={r.loops}: {r.perplexity:.2f}" for r in results)
            self._say(f"step {self.step}: validation perplexity {summary}")
        return results

    # ----- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            self._setup()
            return self._loop()
        finally:
            if hasattr(self, "logger"):
                self.logger.close()
            shutdown()

    def _loop(self) -> TrainResult:
        cfg = self.config
        peak = measure_matmul_peak(self.dtype_choice.autocast_dtype or torch.float32, self.dist.device)
        n_params = self.model.num_parameters()
        self._say(
            f"{n_params:,} parameters, vocab {self.model_config.vocab_size}, "
            f"{self.data.summary}, {self.dist.world_size} process(es), "
            f"{self.dtype_choice.name} ({self.dtype_choice.reason}), matmul peak {peak / 1e9:.0f} GFLOP/s; "
            f"{'resuming at' if self.step else 'starting at'} step {self.step}"
        )
        self.logger.log(
            "start",
            self.step,
            parameters=n_params,
            peak_flops=peak,
            dtype=self.dtype_choice.name,
            dtype_reason=self.dtype_choice.reason,
            **self.data.stats,
        )
        enabled = self.progress_enabled if self.dist.is_main else False
        self.progress = ProgressBar(cfg.steps, initial=self.step, stream=self.stream, enabled=enabled)
        result = TrainResult(step=self.step, reason="completed", checkpoint=None)
        self.model.train()
        started = time.perf_counter()
        window = {"start": time.perf_counter(), "loss": 0.0, "count": 0, "flops": 0.0, "tokens": 0}
        bad_in_a_row = 0
        with StopRequest(self._say, self.unsaved_steps) as stop:
            while self.step < cfg.steps:
                loss, grad_norm, depth, skipped, stop_requested = self.train_step(stop)
                steps_run = int(depth.max()) if isinstance(depth, torch.Tensor) else depth
                result.losses[self.step] = loss
                tokens, width = self.step_shape
                flops = tokens * training_flops_per_token(
                    self.model_config, steps_run, self.model_config.recurrence.backprop_loops, width
                )
                if skipped:
                    bad_in_a_row += 1
                    self.logger.log("skipped", self.step, loss=loss, grad_norm=grad_norm, in_a_row=bad_in_a_row)
                    self._say(
                        f"step {self.step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)"
                    )
                    if cfg.max_bad_steps and bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"Training stopped after {bad_in_a_row} consecutive non-finite steps at step {self.step}; "
                            f"the last good checkpoint in {self.out_dir} is untouched."
                        )
                else:
                    bad_in_a_row = 0
                    window["loss"] += loss
                    window["count"] += 1
                window["flops"] += flops
                window["tokens"] += tokens
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log_window(window, grad_norm, steps_run, peak, started)
                self.progress.update(self.step, {"loss": loss, "loops": steps_run})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    result.evaluation = self.evaluate()
                    self.model.train()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    result.checkpoint = self.save()
                reason = self._stop_reason(stop_requested, started)
                if reason:
                    result.reason = reason
                    break
        self.progress.close()
        if result.reason != "interrupted":
            result.evaluation = self.evaluate()
        result.checkpoint = self.save()
        result.step = self.step
        self._say(f"stopped at step {self.step} ({result.reason}); checkpoint {result.checkpoint or '(rank 0)'}")
        return result

    def unsaved_steps(self) -> str:
        """The steps an abort now would lose, in words."""
        if self.saved_step is None:
            return f"all {self.step} steps of this run (no checkpoint yet)"
        lost = self.step - self.saved_step
        return f"the {lost} step{'s' if lost != 1 else ''} since the checkpoint at step {self.saved_step}"

    def _stop_reason(self, stop_requested: bool, started: float) -> str | None:
        if stop_requested:
            return "interrupted"
        if self.stop_at is not None and self.step >= self.stop_at:
            return "stop-at"
        limit = self.config.time_limit_minutes
        if limit is not None and time.perf_counter() - started >= 60 * limit:
            return "time-limit"
        return None

    def _log_window(self, window: dict[str, float], grad_norm: float, depth: int, peak: float, started: float) -> None:
        """Record the window's train metrics; without a progress bar (output not a terminal, and no explicit
        ``progress=False``), also print them as one line with the ETA."""
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        loss = window["loss"] / window["count"] if window["count"] else math.nan
        achieved = window["flops"] / elapsed
        if self.progress_enabled is None and self.progress is not None and not self.progress.enabled:
            done = self.step - self.progress.initial
            eta = (time.perf_counter() - started) / max(done, 1) * (self.config.steps - self.step)
            self._say(
                f"step {self.step}/{self.config.steps}  loss {loss:.4f}  loops {depth}  "
                f"{window['tokens'] / elapsed:,.0f} tok/s  ETA {format_eta(eta)}"
            )
        self.logger.log(
            "train",
            self.step,
            loss=loss,
            lr=self._lr(self.step - 1),
            grad_norm=grad_norm,
            loops=depth,
            tokens=self.tokens_seen,
            tokens_per_s=window["tokens"] / elapsed,
            flops_per_s=achieved,
            mfu=achieved / peak if peak > 0 else math.nan,
            **self.moe_metrics,
            **self.halting_metrics,
        )
        window.update(start=time.perf_counter(), loss=0.0, count=0, flops=0.0, tokens=0)
