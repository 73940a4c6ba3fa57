"""Hugging Face transformers wrapper around the same :class:`LoopLM` (optional extra ``[hf]``).

:class:`LoopformerForCausalLM` holds a ``LoopLM`` as ``self.model``; there is no second implementation. Importing this
module registers ``model_type = "loopformer"`` with ``AutoConfig`` and ``AutoModelForCausalLM``.

**The KV cache stays ours.** transformers has renamed and reshaped its cache API more than once (``past_key_values``
tuples, then ``Cache`` classes, then the ``cache`` argument), and a model that returns its cache through that API
breaks when it changes. This adapter uses none of it: :meth:`LoopformerForCausalLM.generate` puts a fresh
:class:`LoopSession` into the call's model keyword arguments (which ``generate`` has always handed to
``prepare_inputs_for_generation`` unchanged), :meth:`~LoopformerForCausalLM.prepare_inputs_for_generation` passes
the whole sequence so far with it, and the session feeds only the new token to our engine's
:class:`~loopformer.inference.engine.Session` (the preallocated :class:`KVCache`, per-token exits, warm start). A
cache object transformers may allocate on its own stays empty and unused; the forward returns none.

``generate`` takes ``loops`` (core iterations per token; Huginn's ``num_steps`` is a deprecated alias), ``exit``
(``"kl:5e-4"`` or an ``ExitRule``), ``kv`` (``full``, ``last``, ``ring:K``), ``warm_start`` and ``state_seed``, as
our engine does; greedy ``generate`` gives our engine's tokens. One session belongs to one ``generate`` call, which
must feed one new token per row per step
(greedy or sampled decoding; beam search, which reorders rows, is refused).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from loopformer.config import ModelConfig
from loopformer.deprecation import keyword_alias
from loopformer.errors import InputError
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.inference.exits import ExitRule
from loopformer.model import LoopLM

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise InputError("the transformers wrapper needs transformers: pip install 'loopformer[hf]'.") from exc

MODEL_TYPE = "loopformer"
LOOP_OPTIONS = ("loops", "exit", "kv", "warm_start", "state_seed")
FIRST_CAPACITY = 256  # KV columns allocated beyond the prompt; the cache doubles when a generation outgrows it


class LoopformerConfig(PretrainedConfig):
    """Our :class:`ModelConfig` (as a dict under ``loopformer``) plus the standard names tools look for."""

    model_type = MODEL_TYPE

    def __init__(self, loopformer: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = ModelConfig() if loopformer is None else ModelConfig.from_dict(loopformer)
        self.loopformer = config.to_dict()
        kwargs.update(
            vocab_size=config.vocab_size,
            hidden_size=config.dim,
            num_attention_heads=config.n_heads,
            num_hidden_layers=config.n_layers,
            max_position_embeddings=config.max_seq_len,
            tie_word_embeddings=False,  # the LoopLM shares its embedding with the head itself
        )
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.loopformer)


def _generation_config(options: dict[str, Any]) -> GenerationConfig:
    """Our generation settings from the keyword arguments :data:`LOOP_OPTIONS` (None = the default)."""
    exit_rule = options.get("exit")
    if exit_rule is not None and not isinstance(exit_rule, str | ExitRule):
        raise InputError(f"exit must be a string such as 'kl:5e-4' or an ExitRule, got {exit_rule!r}.")
    return GenerationConfig(
        max_new_tokens=FIRST_CAPACITY,
        loops=options.get("loops"),
        exit=exit_rule,
        kv=options.get("kv") or "full",
        warm_start=bool(options.get("warm_start")),
        state_seed=options.get("state_seed") or 0,
    )


class LoopSession:
    """The decoding state of one ``generate`` call: our engine's :class:`Session`, fed the tokens as they come."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.seen: torch.Tensor | None = None

    def advance(
        self, engine: Engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: dict[str, Any]
    ) -> torch.Tensor:
        """Next-token logits [B, 1, V] after ``input_ids`` (the whole sequence so far: the prompt, then one more
        token per row per call)."""
        context = engine.model.config.max_seq_len
        if input_ids.shape[1] > context:
            raise InputError(f"the sequence has {input_ids.shape[1]} tokens, more than the context of {context}.")
        if self.session is None:
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            self.session = Session(engine.passes, input_ids, real, _generation_config(options))
        else:
            if input_ids.shape[1] != self.seen.shape[1] + 1 or not torch.equal(input_ids[:, :-1], self.seen):
                raise InputError(
                    "a loopformer generation feeds one new token per row per step; these inputs rewrite or skip "
                    "earlier ones (beam search and assisted decoding are not supported)."
                )
            cache = self.session.cache
            needed = int(cache.lengths.max()) + 1
            if needed > cache.capacity:
                cache.reserve(max(needed, 2 * cache.capacity))
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            self.session.feed(rows, input_ids[:, -1])
        self.seen = input_ids
        return self.session.logits[:, None]


def _padded_mask(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, T] causal mask over the real tokens of a padded batch (a padding query sees itself)."""
    seq = attention_mask.shape[1]
    i = torch.arange(seq, device=attention_mask.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    mask = allowed[None] & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(seq, dtype=torch.bool, device=mask.device))[:, None]


class LoopformerForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM for transformers whose ``model`` is our :class:`LoopLM` (see the module docstring)."""

    config_class = LoopformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Layer"]

    def __init__(self, config: LoopformerConfig) -> None:
        super().__init__(config)
        self.model = LoopLM(config.model_config)
        self._engine: tuple[Engine, torch.device, torch.dtype] | None = None
        self.post_init()

    @classmethod
    def wrap(cls, model: LoopLM, **config_kwargs: Any) -> LoopformerForCausalLM:
        """A wrapper around an existing ``model`` (its weights are shared, not copied)."""
        config = LoopformerConfig(loopformer=model.config.to_dict(), **config_kwargs)
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper.model = model
        return wrapper

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: the LoopLM initialises its own weights when it is built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, except that missing, unexpected or mismatched tensors are an error, not a warning."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = [f"{kind.replace('_', ' ')} {', '.join(sorted(map(str, names))[:8])}"
                    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if (names := info.get(kind))]  # fmt: skip
        if problems:
            raise InputError(f"The checkpoint does not fit the model: {'; '.join(problems)}.")
        return (model, info) if wants_info else model

    def loop_engine(self) -> Engine:
        """Our engine over ``self.model`` (rebuilt when the model moved to another device or dtype)."""
        weight = self.model.tok_emb.weight
        if self._engine is None or self._engine[1:] != (weight.device, weight.dtype):
            training = self.model.training
            self._engine = (Engine(self.model, dtype="fp32"), weight.device, weight.dtype)  # no autocast: as stored
            self.model.train(training)  # Engine() switches to eval mode; the caller's mode stays
        return self._engine[0]

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        loops: int | None = None,
        exit: str | ExitRule | None = None,
        kv: str | None = None,
        warm_start: bool | None = None,
        state_seed: int | None = None,
        loop_session: LoopSession | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        num_steps: int | None = None,
        **kwargs: Any,  # what transformers adds for every model (return_dict, output_attentions, ...): unused
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss with ``labels``, shifted inside) of ``input_ids`` [B, T] at ``loops`` iterations.

        With a ``loop_session`` (inside :meth:`generate`) only the last position's logits are returned. Without one,
        the whole sequence runs at a fixed depth: in eval mode from our engine's initial states (so that it agrees
        with cached decoding), in training mode from random ones as in our trainer.

        ``output_hidden_states`` (default: the config's) returns ``loops + 1`` tensors [B, T, dim]: the input
        embeddings (``get_input_embeddings()(input_ids)``), then the latent state after each iteration, so that
        ``hidden_states[i]`` (i >= 1) is the state after i iterations and ``hidden_states[-1]`` the one the coda
        decodes (with ACT halting the logits decode the halting mixture instead). ``generate`` refuses them.
        """
        loops = keyword_alias(loops, num_steps, "num_steps", "loops")
        options = {"loops": loops, "exit": exit, "kv": kv, "warm_start": warm_start, "state_seed": state_seed}
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if loop_session is not None and use_cache is not False:
            if output_hidden_states:
                raise InputError("hidden states come from a forward pass; generate() decodes without them.")
            logits = loop_session.advance(self.loop_engine(), input_ids, attention_mask, options)
            return CausalLMOutputWithPast(logits=logits)
        if exit is not None or warm_start:
            raise InputError("exit rules and warm start decode token by token: use generate() with use_cache on.")
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = _padded_mask(attention_mask, self.model.config.sliding_window)
        initial_state = None
        if not self.training:
            real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            positions = (real.cumsum(dim=1) - 1).clamp_min(0)
            initial_state = self.loop_engine().initial_state(positions, state_seed or 0)
        out = self.model(
            input_ids,
            loops,
            labels,
            attention_mask=mask,
            initial_state=initial_state,
            return_states=output_hidden_states,
        )
        hidden = (self.get_input_embeddings()(input_ids), *out.states) if output_hidden_states else None
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, hidden_states=hidden)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        loop_session: LoopSession | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole sequence so far and the session; transformers' own cache argument (whatever this version
        calls it) is not passed on, ``output_hidden_states`` is (transformers 5 hands it over here)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        inputs["loop_session"] = loop_session if use_cache is not False else None
        names = (*LOOP_OPTIONS, "output_hidden_states")
        inputs.update({name: kwargs[name] for name in names if kwargs.get(name) is not None})
        return inputs

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with a fresh :class:`LoopSession` (our KV cache) for this call."""
        kwargs.setdefault("loop_session", LoopSession())
        if "num_steps" in kwargs:  # Huginn's name for the loop count
            kwargs["loops"] = keyword_alias(kwargs.get("loops"), kwargs.pop("num_steps"), "num_steps", "loops")
        return super().generate(*args, **kwargs)


AutoConfig.register(MODEL_TYPE, LoopformerConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopformerConfig, LoopformerForCausalLM, exist_ok=True)
