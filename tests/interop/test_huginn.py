"""Huginn-0125 import / export against a small random checkpoint written here in Huginn's own layout.

The logits check uses a forward pass written in this file from ../shared/REFERENCE.md section 2 (complex-number
interleaved RoPE, explicit attention, float64), not the library's model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from loopformer.checkpoint import TrainingState, load_checkpoint, write_checkpoint_dir
from loopformer.cli import main
from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.inference.chat import Message, encode_chat, reply_stop_tokens
from loopformer.interop.huginn import config_from_huginn, config_to_huginn, export_huginn, import_huginn, rope_table
from loopformer.loading import load_trained_model
from loopformer.model import build_model
from loopformer.nn.attention import AttentionContext
from loopformer.nn.rope import rope_angles
from loopformer.tokenizer import TextTokenizer, TokenRoles

H, HEADS, INNER, VOCAB, CONTEXT = 32, 4, 48, 272, 64
LAYERS = {"prelude": 1, "core_block": 2, "coda": 1}
SPECIALS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|begin_header|>{{ m['role'] }}<|end_header|>\n\n"
    "{{ m['content'] }}<|end_turn|>{% endfor %}"
)


def huginn_config(**changes: object) -> dict:
    """config.json as Huginn's RavenConfig writes it (its own fields, the derived ones and the HF ones)."""
    depth = LAYERS["prelude"] + LAYERS["coda"] + LAYERS["core_block"] * 4
    std = math.sqrt(2 / (5 * H))
    config = {
        "activation_checkpoint_impl": "per-iteration",
        "architecture_class_name": "RecurrentGPT",
        "architectures": ["RavenForCausalLM"],
        "auto_map": {
            "AutoConfig": "raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM",
        },
        "bias": False,
        "block_class_name": "SandwichBlock",
        "block_size": CONTEXT,
        "bos_token_id": 256,
        "effective_expected_depth": depth,
        "eos_token_id": 257,
        "head_dim": H // HEADS,
        "init_orthogonal": False,
        "init_strategy": "takase",
        "init_values": {
            "embed_scale": math.sqrt(H),
            "embedding": std,
            "out_proj": std / math.sqrt(2 * depth),
            "std": std,
        },
        "injection_type": "linear",
        "intermediate_size": INNER,
        "mean_backprop_depth": 2,
        "mean_recurrence": 4,
        "mlp_class_name": "GatedMLP",
        "model_type": "huginn_raven",
        "n_embd": H,
        "n_heads": HEADS,
        "n_layers": sum(LAYERS.values()),
        "n_layers_in_coda": LAYERS["coda"],
        "n_layers_in_prelude": LAYERS["prelude"],
        "n_layers_in_recurrent_block": LAYERS["core_block"],
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": 1e-6,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "pad_token_id": 261,
        "padded_vocab_size": VOCAB,
        "padding_multiple": 4096,
        "qk_bias": True,
        "rope_base": 50000,
        "sampling_scheme": "poisson-lognormal-filling",
        "state_init": "like-init",
        "tie_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.44.2",
        "vocab_size": VOCAB,
    }
    config.update(changes)
    return config


def huginn_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Huginn's names and shapes; norms and q/k biases away from their init values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    hd = H // HEADS
    tensors = {"transformer.wte.weight": rand(VOCAB, H, scale=0.5)}
    for part, count in LAYERS.items():
        for i in range(count):
            p = f"transformer.{part}.{i}."
            for k in (1, 2, 3, 4):
                tensors[p + f"norm_{k}.weight"] = 1 + rand(H, scale=0.1)
            tensors[p + "attn.Wqkv.weight"] = rand(3 * H, H)
            tensors[p + "attn.qk_bias"] = rand(2, 1, HEADS, hd)
            tensors[p + "attn.proj.weight"] = rand(H, H)
            tensors[p + "mlp.fc.weight"] = rand(2 * INNER, H)
            tensors[p + "mlp.proj.weight"] = rand(H, INNER)
    tensors["transformer.adapter.weight"] = rand(H, 2 * H)
    tensors["transformer.ln_f.weight"] = 1 + rand(H, scale=0.1)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # stored twice, as on the hub
    tensors["freqs_cis"] = huginn_rope_table(CONTEXT, hd, 50000.0)
    return tensors


def huginn_rope_table(length: int, head_dim: int, theta: float) -> torch.Tensor:
    """``freqs_cis`` [1, T, 1, head_dim / 2, 2] as Huginn's code builds it: all in float32 on the CPU, the inverse
    frequencies as 1 / theta^(2i / head_dim), the angles as their products with the float32 positions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inverse = 1.0 / theta**exponents
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inverse)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[None, :, None]


def huginn_tokenizer() -> Tokenizer:
    """A byte-level tokenizer (ids 0..255) with Huginn's special tokens after it (ids 256..261)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    inner = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(SPECIALS)
    return inner


def write_huginn(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    shards: int = 1,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """A Huginn checkpoint directory: config, one file or ``shards`` files + index, tokenizer and its config."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or huginn_config()))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for n in range(shards):
            file = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[n::shards]}
            save_file(part, str(directory / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (tokenizer or huginn_tokenizer()).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<|begin_text|>",
        "eos_token": {"content": "<|end_text|>", "special": True},
        "pad_token": "<|pad|>",
        "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


# ----- the independent reference forward pass ---------------------------------------------------------------------
def reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Huginn's forward at ``steps`` iterations from a zero state, in float64, straight from the REFERENCE text."""
    t = {name: tensor.double() for name, tensor in t.items()}
    batch, seq = ids.shape
    hd = H // HEADS

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    inv_freq = 1.0 / 50000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq
    turn = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # rotation of pair (x[2i], x[2i+1])

    def rope(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.reshape(batch, seq, HEADS, hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * turn).reshape(batch, seq, HEADS, hd)

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    def block(x: torch.Tensor, p: str) -> torch.Tensor:
        q, k, v = (rms(x, t[p + "norm_1.weight"]) @ t[p + "attn.Wqkv.weight"].T).split(H, dim=-1)
        bias = t[p + "attn.qk_bias"]
        q = rope(q.reshape(batch, seq, HEADS, hd) + bias[0])
        k = rope(k.reshape(batch, seq, HEADS, hd) + bias[1])
        v = v.reshape(batch, seq, HEADS, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, H)
        x = rms(x + attended @ t[p + "attn.proj.weight"].T, t[p + "norm_2.weight"])
        gate, up = (rms(x, t[p + "norm_3.weight"]) @ t[p + "mlp.fc.weight"].T).chunk(2, dim=-1)
        mlp = (F.silu(gate) * up) @ t[p + "mlp.proj.weight"].T
        return rms(x + mlp, t[p + "norm_4.weight"])

    e = t["transformer.wte.weight"][ids] * math.sqrt(H)
    for i in range(LAYERS["prelude"]):
        e = block(e, f"transformer.prelude.{i}.")
    state = torch.zeros_like(e)
    for _ in range(steps):
        state = torch.cat((state, e), dim=-1) @ t["transformer.adapter.weight"].T
        for i in range(LAYERS["core_block"]):
            state = block(state, f"transformer.core_block.{i}.")
    x = rms(state, t["transformer.ln_f.weight"])
    for i in range(LAYERS["coda"]):
        x = block(x, f"transformer.coda.{i}.")
    return rms(x, t["transformer.ln_f.weight"]) @ t["lm_head.weight"].T


# ----- tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = huginn_tensors()
    return write_huginn(tmp_path_factory.mktemp("huginn") / "src", tensors, shards=3), tensors


@pytest.fixture(scope="module")
def imported(source: tuple[Path, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_huginn(source[0], tmp_path_factory.mktemp("ours") / "ckpt")


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_imported_logits_match_an_independent_huginn_forward(source, imported: Path, steps: int) -> None:
    model, _, _ = load_trained_model(imported)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(steps))
    with torch.no_grad():
        ours = model(ids, loops=steps, initial_state=torch.zeros(2, 11, H)).logits
    reference = reference_logits(source[1], ids, steps)
    # fp32 rounding grows with depth (3e-4 at 8 iterations on logits of ~10); a wrong mapping is off by > 1
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=2e-3)
    if steps > 1:  # the depth matters, so the comparison above tests the recurrence
        assert (reference - reference_logits(source[1], ids, 1)).abs().max() > 1e-2


def test_imported_config_and_layout(imported: Path) -> None:
    state = load_checkpoint(imported)
    cfg = state.config
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size) == (H, HEADS, H // HEADS, INNER, VOCAB)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.max_seq_len) == (1, 2, 1, CONTEXT)
    assert (cfg.rope_style, cfg.rope_base, cfg.qk_bias, cfg.embed_scale) == ("interleaved", 50000.0, True, True)
    assert cfg.rope_precision == "fp32"  # a real Huginn config.json has no loopformer_rope_precision
    assert (cfg.norm_layout, cfg.injection, cfg.tie_embeddings) == ("sandwich", "concat", True)
    assert (cfg.recurrence.mean_loops, cfg.recurrence.backprop_loops) == (4, 2)
    assert set(state.model) == set(build_model(cfg, device="meta").state_dict())  # the embedding once, no head


def test_single_file_and_sharded_sources_import_identically(source, imported: Path, tmp_path: Path) -> None:
    single = import_huginn(write_huginn(tmp_path / "single", source[1]), tmp_path / "ours")
    a, b = load_checkpoint(single).model, load_checkpoint(imported).model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_option_casts(source, tmp_path: Path) -> None:
    assert main(["convert", "huginn", str(source[0]), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    model = load_checkpoint(tmp_path / "bf16").model
    assert {t.dtype for t in model.values()} == {torch.bfloat16}
    assert torch.equal(model["tok_emb.weight"], source[1]["transformer.wte.weight"].bfloat16())


def test_tokenizer_specials_and_chat_template_come_across(imported: Path) -> None:
    state = load_checkpoint(imported)
    tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.end_of_turn_id) == (256, 257, 261, 260)
    assert tokenizer.roles.chat_template == TEMPLATE
    ids = encode_chat(tokenizer, [Message("system", "Be brief."), Message("user", "Hi")])
    text = (
        "<|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
        "<|begin_header|>user<|end_header|>\n\nHi<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n"
    )
    assert ids == [256, *huginn_tokenizer().encode(text).ids]  # bos, then the REFERENCE chat format
    assert reply_stop_tokens(tokenizer) == (260, 257)
    with pytest.raises(InputError, match="lacks the special tokens"):
        TextTokenizer.from_json(state.tokenizer_json)  # without the roles it is not one of our tokenizers


def test_round_trip_huginn_to_ours_to_huginn_is_exact(source, imported: Path, tmp_path: Path) -> None:
    out = export_huginn(imported, tmp_path / "back", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # written as shards
    written = {}
    for file in set(index["weight_map"].values()):
        with safe_open(str(out / file), framework="pt") as handle:
            written.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    original = source[1]
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)  # freqs_cis too: Huginn's fp32 table
    config = json.loads((out / "config.json").read_text())
    expected = huginn_config()
    assert {k: config[k] for k in expected if k in config and k != "torch_dtype"} == {
        k: expected[k] for k in config if k in expected and k != "torch_dtype"
    }
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["chat_template"]) == ("<|begin_text|>", TEMPLATE)


def test_the_export_loads_in_a_config_class_that_sets_tie_word_embeddings_itself(imported: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")

    class RavenLike(transformers.PretrainedConfig):
        """As Huginn's RavenConfig does: tie_embeddings is its own field and it passes tie_word_embeddings on."""

        model_type = "huginn_raven"

        def __init__(self, tie_embeddings: bool = True, **kwargs: object) -> None:
            self.tie_embeddings = tie_embeddings
            super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)

    out = export_huginn(imported, tmp_path / "huginn")
    assert "tie_word_embeddings" not in json.loads((out / "config.json").read_text())
    config = RavenLike.from_pretrained(str(out))
    assert config.tie_embeddings is True and config.tie_word_embeddings is True


def test_imported_rope_is_huginns_fp32_table_at_huginn_0125_geometry() -> None:
    """head_dim 96, theta 50000, 4096 positions: the imported model rotates with Huginn's own float32 table (and
    exports it), which the fp64-rounded angles of our own models miss by about 2e-4 near the end."""
    data = huginn_config(
        n_embd=96, n_heads=1, head_dim=96, num_attention_heads=1, num_key_value_heads=1, block_size=4096
    )
    del data["init_values"]  # its embed_scale is sqrt(n_embd) of the small model; the default fits n_embd=96
    config = config_from_huginn(data)
    reference = huginn_rope_table(4096, 96, 50000.0)
    ctx = AttentionContext.for_sequence(config, 4096, torch.device("cpu"))
    torch.testing.assert_close(torch.stack((ctx.cos, ctx.sin), dim=-1), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(rope_table(config), reference, rtol=0, atol=1e-6)
    fp64 = torch.stack(rope_angles(torch.arange(4096), 96, 50000.0, "fp64"), dim=-1)
    assert (fp64 - reference)[:, 4080:].abs().max() > 1e-4  # the precision this test pins down matters there


def test_round_trip_ours_to_huginn_to_ours_is_exact(tmp_path: Path) -> None:
    config = ModelConfig(
        vocab_size=280, dim=32, n_heads=4, n_prelude=1, n_core=2, n_coda=1, mlp_hidden=48, rope_style="interleaved",
        rope_base=50000.0, qk_bias=True, embed_scale=True, max_seq_len=64,
        recurrence={"mean_loops": 4, "backprop_loops": 2},
    )  # fmt: skip
    model = build_model(config, seed=3)
    with torch.no_grad():
        for layer in model.layers():  # biases away from their zero init, so a swap would show
            layer.attn.q_bias.normal_()
            layer.attn.k_bias.normal_()
    ours = TrainingState(
        step=0, model=model.state_dict(), config=config, tokenizer_json=TextTokenizer.byte_level().to_json()
    )
    src = write_checkpoint_dir(tmp_path / "ours", ours)
    export_huginn(src, tmp_path / "huginn")
    back = load_checkpoint(import_huginn(tmp_path / "huginn", tmp_path / "again"))
    assert back.config == config
    assert back.model.keys() == ours.model.keys()
    assert all(torch.equal(back.model[k], ours.model[k]) for k in ours.model)
    assert back.tokenizer_json == ours.tokenizer_json and back.token_roles is None  # our specials stay ours


def _broken(tmp_path: Path, change: str) -> Path:
    tensors, config = huginn_tensors(), huginn_config()
    if change == "missing":
        del tensors["transformer.core_block.1.attn.proj.weight"]
    elif change == "extra":
        tensors["transformer.core_block.2.attn.proj.weight"] = torch.zeros(H, H)
    elif change == "shape":
        tensors["transformer.prelude.0.mlp.fc.weight"] = torch.zeros(INNER, H)
    elif change == "model_type":
        config["model_type"] = "llama"
    elif change == "head":
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    return write_huginn(tmp_path / change, tensors, config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"missing tensors transformer\.core_block\.1\.attn\.proj\.weight"),
        ("extra", r"unexpected tensors transformer\.core_block\.2\.attn\.proj\.weight"),
        ("shape", r"wrong shapes transformer\.prelude\.0\.mlp\.fc\.weight \[48, 32\] \(expected \[96, 32\]\)"),
        ("model_type", r"model_type 'llama'; the Huginn importer reads 'huginn_raven'"),
        ("head", r"lm_head\.weight differs from transformer\.wte\.weight"),
    ],
)
def test_bad_checkpoints_are_refused_with_one_clear_error(tmp_path: Path, change: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        import_huginn(_broken(tmp_path, change), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_problems_are_listed_together(tmp_path: Path) -> None:
    tensors = huginn_tensors()
    del tensors["transformer.adapter.weight"]
    tensors["transformer.coda.0.attn.proj.weight"] = torch.zeros(2, 2)
    tensors["something.else"] = torch.zeros(1)
    with pytest.raises(InputError) as info:
        import_huginn(write_huginn(tmp_path / "src", tensors), tmp_path / "out")
    message = str(info.value)
    assert "missing tensors transformer.adapter.weight" in message
    assert "unexpected tensors something.else" in message and "wrong shapes transformer.coda.0" in message


def test_unsupported_config_values_and_missing_roles(tmp_path: Path) -> None:
    config = huginn_config(bias=True, injection_type="add")
    del config["n_embd"]
    with pytest.raises(InputError, match=r"n_embd is missing; bias=True is not supported.*injection_type='add'"):
        import_huginn(write_huginn(tmp_path / "a", huginn_tensors(), config), tmp_path / "out")
    no_pad = huginn_tokenizer()
    data = json.loads(no_pad.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|pad|>"]
    with pytest.raises(InputError, match=r"no token for the role\(s\) pad \(<\|pad\|>\)"):
        import_huginn(
            write_huginn(tmp_path / "b", huginn_tensors(), tokenizer=Tokenizer.from_str(json.dumps(data))),
            tmp_path / "out",
        )


def test_export_refuses_what_huginn_cannot_express() -> None:
    with pytest.raises(InputError, match=r"cannot express this model: norm_layout='pre' .*injection='lti'"):
        config_to_huginn(ModelConfig(norm_layout="pre", injection="lti", rope_style="interleaved", embed_scale=True))


def test_cli_exit_codes(source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "huginn", str(_broken(tmp_path, "extra")), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loopformer: error: The Huginn checkpoint") and len(err.strip().splitlines()) == 1
    assert main(["convert", "huginn", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert main(["convert", "huginn", str(source[0]), str(tmp_path / "ok")]) == 0
    assert main(["convert", "huginn", str(source[0]), str(tmp_path / "ok")]) == 2  # the target exists
    assert main(["convert", "to-huginn", str(tmp_path / "ok"), str(tmp_path / "hg")]) == 0
    assert (tmp_path / "hg" / "model.safetensors").is_file()


def test_an_imported_checkpoint_generates_from_the_cli(imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--ckpt", str(imported), "--prompt", "Hello", "--loops", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--json"]) == 0
    output = json.loads(capsys.readouterr().out)["outputs"][0]
    assert output["loops"] == [2] * len(output["tokens"]) and output["finish_reason"] in ("length", "stop")


def test_our_own_checkpoints_are_checked_the_same_way(imported: Path, tmp_path: Path) -> None:
    state = load_checkpoint(imported)
    del state.model["core.1.mlp.fc.weight"]
    state.model["core.1.mlp.extra"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"missing tensors core\.1\.mlp\.fc\.weight; unexpected tensors core\.1"):
        load_trained_model(write_checkpoint_dir(tmp_path / "broken", state))


def test_token_roles_files_are_validated() -> None:
    roles = TokenRoles(bos="<|begin_text|>")
    assert TokenRoles.from_dict(roles.to_dict()) == roles
    with pytest.raises(InputError, match=r"unknown key\(s\) bos_token and no pad"):
        TokenRoles.from_dict({**{k: v for k, v in roles.to_dict().items() if k != "pad"}, "bos_token": "x"})
    with pytest.raises(InputError, match="must map exactly the chat roles"):
        TokenRoles(openings={"user": "u"})
