"""``loopformer generate`` and ``loopformer chat`` on a tiny random checkpoint; the chat prompt format."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

import loopformer.cli.chat as chat_cli
from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.cli import build_parser, main
from loopformer.cli.generation_args import generation_config, load_engine, print_compile_notice
from loopformer.errors import InputError
from loopformer.inference.chat import Message, encode_chat, encode_prompt, reply_stop_tokens
from loopformer.model import build_model
from loopformer.tokenizer import TextTokenizer
from support import needs_compiler, small_config

PROMPT = "loop state"
MAX_NEW = 6


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.byte_level()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: TextTokenizer) -> str:
    """A randomly initialised 270-token model (byte-level tokenizer) saved as a run directory."""
    run = tmp_path_factory.mktemp("generate-run")
    config = small_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    model = build_model(config, seed=0)
    save_checkpoint(
        run, TrainingState(step=0, model=model.state_dict(), config=config, tokenizer_json=tokenizer.to_json())
    )
    return str(run)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``loopformer ARGV``; returns the exit status, stdout and stderr."""
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def generate_json(
    capsys: pytest.CaptureFixture[str], ckpt: str, *extra: str, prompts: Iterable[str] = (PROMPT,)
) -> dict:
    argv = ["generate", "--ckpt", ckpt, "--max-new-tokens", str(MAX_NEW), "--json"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    rc, out, err = cli(capsys, *argv, *extra)
    assert rc == 0, err
    return json.loads(out)


def check_output(output: dict, max_new: int = MAX_NEW) -> None:
    """Robust to a random model emitting EOS: at most ``max_new`` tokens, all of them when it ran to length."""
    assert output["finish_reason"] in {"stop", "length"}
    assert len(output["tokens"]) <= max_new
    assert len(output["loops"]) == len(output["tokens"])
    if output["finish_reason"] == "length":
        assert len(output["tokens"]) == max_new


# ----- generate ------------------------------------------------------------------------------------


def test_generate_streams_the_prompt_then_the_completion(capsys, ckpt: str) -> None:
    rc, out, err = cli(capsys, "generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW))
    assert rc == 0, err
    assert out.startswith(PROMPT) and out.endswith("\n")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "tok/s" in lines[0] and "loops/token" in lines[0]
    record = generate_json(capsys, ckpt)
    assert out == PROMPT + record["outputs"][0]["text"] + "\n"  # the stream is the JSON text, delta by delta


def test_generate_quiet_prints_no_summary(capsys, ckpt: str) -> None:
    rc, out, err = cli(capsys, "generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2", "--quiet")
    assert rc == 0 and out.startswith(PROMPT) and err == ""


def test_generate_json_record(capsys, ckpt: str) -> None:
    record = generate_json(capsys, ckpt, "--loops", "2")
    assert record["loops"] == 2 and record["exit"] is None and record["kv"] == "full"
    assert record["speculative"] is None and record["acceptance_rate"] is None
    assert len(record["outputs"]) == 1
    output = record["outputs"][0]
    assert output["prompt"] == PROMPT and isinstance(output["text"], str)
    check_output(output)
    assert output["loops"] == [2] * len(output["tokens"])
    if output["tokens"]:
        assert record["mean_loops_per_token"] == pytest.approx(2.0)
    assert record["cache_bytes"] > 0 and record["seconds"] > 0
    assert record["dtype"] == "fp32" and record["dtype_reason"]  # the suite pins auto to fp32 (conftest)


def test_generate_json_default_loops_are_the_models_mean(capsys, ckpt: str) -> None:
    record = generate_json(capsys, ckpt)
    assert record["loops"] == 3  # small_config: mean_loops=3
    assert set(record["outputs"][0]["loops"]) <= {3}


def test_generate_with_early_exit_takes_at_most_loops_steps(capsys, ckpt: str) -> None:
    record = generate_json(capsys, ckpt, "--exit", "latent-diff:0.5", "--loops", "8")
    assert record["loops"] == 8 and record["exit"] == "latent-diff:0.5"
    output = record["outputs"][0]
    check_output(output)
    assert all(1 <= s <= 8 for s in output["loops"])


@pytest.mark.parametrize("policy", ["ring:2", "last"])
def test_generate_with_kv_policies(capsys, ckpt: str, policy: str) -> None:
    record = generate_json(capsys, ckpt, "--kv", policy, "--loops", "4")
    assert record["kv"] == policy
    check_output(record["outputs"][0])
    assert set(record["outputs"][0]["loops"]) <= {4}


def test_kv_sharing_shrinks_the_cache(capsys, ckpt: str) -> None:
    full = generate_json(capsys, ckpt, "--loops", "4")["cache_bytes"]
    last = generate_json(capsys, ckpt, "--loops", "4", "--kv", "last")["cache_bytes"]
    assert last < full


def test_speculative_matches_plain_greedy(capsys, ckpt: str) -> None:
    """Batched, with rows that reject drafts: the tokens are exactly those of plain greedy decoding."""
    plain = generate_json(capsys, ckpt, "--loops", "4", "--max-new-tokens", "10", prompts=PROMPTS)
    fast = generate_json(
        capsys, ckpt, "--loops", "4", "--max-new-tokens", "10", "--speculative", "2:3", prompts=PROMPTS
    )
    assert fast["speculative"] == "2:3" and fast["loops"] == 4
    for got, want in zip(fast["outputs"], plain["outputs"], strict=True):
        check_output(got, 10)
        assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
        assert got["finish_reason"] == want["finish_reason"]
        assert got["loops"] == [4] * len(got["tokens"])
    assert len({t for o in plain["outputs"] for t in o["tokens"]}) > 5  # not one token repeated: a real check
    assert 0.0 <= fast["acceptance_rate"] <= 1.0


def test_speculative_summary_reports_acceptance(capsys, ckpt: str) -> None:
    argv = ["generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4", "--loops", "4"]
    rc, _, err = cli(capsys, *argv, "--speculative", "2:3")
    assert rc == 0 and "draft acceptance" in err


def test_speculative_auto_says_what_it_chose_and_keeps_the_tokens(capsys, ckpt: str) -> None:
    argv = ["generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4", "--loops", "4"]
    rc, _, err = cli(capsys, *argv, "--speculative", "auto")
    assert rc == 0 and "speculative auto: " in err and "plain " in err  # the probe's speeds, plain among them
    plain = generate_json(capsys, ckpt, "--loops", "4", "--max-new-tokens", "4")
    auto = generate_json(capsys, ckpt, "--loops", "4", "--max-new-tokens", "4", "--speculative", "auto")
    assert [run["speculative"] for run in auto["speculative_probe"]] == [None, [1, 4], [1, 8]]
    best = max(auto["speculative_probe"], key=lambda run: run["tokens_per_s"])["speculative"]
    assert auto["speculative"] == (None if best is None else "{}:{}".format(*best))
    assert auto["outputs"][0]["tokens"] == plain["outputs"][0]["tokens"]
    chat = ["chat", "--ckpt", ckpt, "--speculative", "auto"]
    rc, _, err = cli(capsys, *chat)
    assert rc == 2 and "--speculative auto times the prompts of one generate call" in err


PROMPTS = ("loop state", "a much longer prompt than the first one", "x")


def test_generate_batch_prints_every_prompt(capsys, ckpt: str) -> None:
    argv = ["generate", "--ckpt", ckpt, "--max-new-tokens", "3"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert "tok/s" in err and "loops/token" in err
    record = generate_json(capsys, ckpt, "--max-new-tokens", "3", prompts=PROMPTS)
    assert out == "".join(f"{o['prompt']}{o['text']}\n\n" for o in record["outputs"])  # in order, one block each
    assert out.startswith(PROMPTS[0])


def test_generate_batch_equals_each_prompt_alone(capsys, ckpt: str) -> None:
    batch = generate_json(capsys, ckpt, prompts=PROMPTS)
    assert [o["prompt"] for o in batch["outputs"]] == list(PROMPTS)
    for prompt, output in zip(PROMPTS, batch["outputs"], strict=True):
        check_output(output)
        alone = generate_json(capsys, ckpt, prompts=[prompt])["outputs"][0]
        assert output["text"] == alone["text"]
        assert output["tokens"] == alone["tokens"]


@needs_compiler
def test_generate_compile_matches_plain_greedy(capsys, ckpt: str) -> None:
    plain = generate_json(capsys, ckpt, "--loops", "3")["outputs"][0]
    argv = ["generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW), "--loops", "3"]
    rc, out, err = cli(capsys, *argv, "--compile", "--json")
    assert rc == 0, err
    compiled = json.loads(out)["outputs"][0]
    assert compiled["tokens"] == plain["tokens"] and compiled["loops"] == plain["loops"]
    notices = [line for line in err.splitlines() if "compiling" in line]
    # one line per new shape (batch 1, loops 3, full cache; the history widths it reached), each with its time
    assert notices and all(
        re.fullmatch(
            r"loopformer: compiling the decoding graph \(loops 3, history \d+, "
            r"batch 1, kv full\), once per shape \.\.\. done in \d+\.\d s",
            line,
        )
        for line in notices
    )
    assert len(notices) == len(set(notices))


# ----- generate: user errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--prompt", ""], "prompt is empty"),
        ([], "--prompt"),
        (["--prompt", PROMPT, "--exit", "foo"], "unknown exit criterion"),
        (["--prompt", PROMPT, "--kv", "ring:0"], "ring size"),
        (["--prompt", PROMPT, "--kv", "foo"], "KV slot policy"),
        (["--prompt", PROMPT, "--loops", "0"], "loops"),
        (["--prompt", PROMPT, "--loops", "-1"], "loops"),
        (["--prompt", PROMPT, "--speculative", "4"], "--speculative"),
        (["--prompt", PROMPT, "--speculative", "4:8", "--exit", "kl"], "exit rule"),
        (["--prompt", PROMPT, "--speculative", "8:4", "--loops", "4"], "draft"),
        (["--prompt", PROMPT, "--speculative", "2:3", "--loops", "4", "--kv", "last"], "KV cache"),
        (["--prompt", PROMPT, "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", PROMPT, "--temperature", "-1"], "temperature"),
        (["--prompt", PROMPT, "--top-p", "2"], "top_p"),
        (["--prompt", PROMPT, "--compile", "--exit", "kl"], "compiled decoding"),
    ],
    ids=[
        "empty-prompt",
        "no-prompt",
        "exit-foo",
        "kv-ring-0",
        "kv-foo",
        "loops-0",
        "loops-negative",
        "speculative-no-lookahead",
        "speculative-with-exit",
        "speculative-draft-deeper",
        "speculative-shared-kv",
        "max-new-tokens-0",
        "temperature-negative",
        "top-p-2",
        "compile-with-exit",
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["stream", "json"])
def test_generate_user_errors_exit_2_with_one_line(
    capsys, ckpt: str, extra: list[str], fragment: str, json_flag: list[str]
) -> None:
    rc, _, err = cli(capsys, "generate", "--ckpt", ckpt, "--max-new-tokens", "2", *extra, *json_flag)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loopformer: error:") and fragment in lines[0]
    assert "Traceback" not in err


def test_generate_missing_checkpoint_exits_2(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    rc, out, err = cli(capsys, "generate", "--ckpt", str(missing), "--prompt", PROMPT)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopformer: error:") and str(missing) in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--prompt", PROMPT, "--speculative", "8:4", "--loops", "4"], "draft"),
        (["--prompt", "a" * 200], "context"),
    ],
    ids=["speculative-draft-deeper", "prompt-longer-than-context"],
)
def test_refused_generation_prints_nothing_on_stdout(capsys, ckpt: str, extra: list[str], fragment: str) -> None:
    """A setting or prompt refused when decoding starts must not leave a half-printed completion behind."""
    rc, out, err = cli(capsys, "generate", "--ckpt", ckpt, *extra)
    assert rc == 2 and err.startswith("loopformer: error:") and fragment in err
    assert out == ""


# ----- chat ----------------------------------------------------------------------------------------


def scripted(lines: Iterable[str]) -> Callable[[str], str]:
    """A ``read`` that returns ``lines`` one by one, then raises EOFError (end of input)."""
    queue = list(lines)

    def read(prompt: str) -> str:
        assert prompt == "> "
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def chat(capsys, ckpt: str, lines: Iterable[str], *extra: str) -> tuple[int, str, list[str]]:
    args = build_parser().parse_args(["chat", "--ckpt", ckpt, "--max-new-tokens", "4", *extra])
    rc = chat_cli.run(args, read=scripted(lines))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.splitlines()


def recorded_conversations(monkeypatch: pytest.MonkeyPatch) -> list[list[Message]]:
    """The messages of every chat prompt encoded from now on (one list per reply)."""
    seen: list[list[Message]] = []

    def recording(tokenizer: TextTokenizer, messages: list[Message]) -> list[int]:
        seen.append(list(messages))
        return encode_chat(tokenizer, messages)

    monkeypatch.setattr(chat_cli, "encode_chat", recording)
    return seen


def summaries(err: list[str]) -> list[str]:
    return [line for line in err if "tok/s" in line]


def test_chat_user_line_streams_a_reply(capsys, ckpt: str) -> None:
    rc, out, err = chat(capsys, ckpt, ["hello"])
    assert rc == 0
    assert err[0].startswith("chatting with ") and "3 loops" in err[0] and "/loops N" in err[0]
    assert out.endswith("\n")  # the reply (raw bytes of a random model: may hold control characters), newline
    (line,) = summaries(err)
    assert "loops/token" in line and not line.startswith("0 tokens")
    assert len(out) > 1


def test_chat_reply_is_the_greedy_completion_of_the_chat_prompt(capsys, ckpt: str, tokenizer) -> None:
    args = build_parser().parse_args(["chat", "--ckpt", ckpt, "--max-new-tokens", "4"])
    engine, _ = load_engine(args)
    assert engine.passes.compile_notice is print_compile_notice  # chat (with --compile) says when it compiles too
    config = generation_config(args, stop_tokens=reply_stop_tokens(engine.tokenizer))
    expected = engine.generate([encode_chat(tokenizer, [Message("user", "hello")])], config).outputs[0].text
    _, out, _ = chat(capsys, ckpt, ["hello"])
    assert out == expected + "\n"


def test_chat_loops_command_changes_the_depth(capsys, ckpt: str) -> None:
    rc, _, err = chat(capsys, ckpt, ["hi", "/loops 3", "again"], "--loops", "2")
    assert rc == 0
    assert "loops 3, exit off, kv full" in err
    first, second = summaries(err)
    assert "2.00 loops/token" in first or first.startswith("0 tokens")
    assert "3.00 loops/token" in second or second.startswith("0 tokens")
    assert not second.startswith("0 tokens"), "the tiny model ended the reply at once; pick another user line"


def test_chat_exit_and_kv_commands(capsys, ckpt: str) -> None:
    lines = ["/exit latent-diff:0.5", "hi", "/exit off", "/kv last", "hi", "/kv ring:2", "/exit none"]
    rc, _, err = chat(capsys, ckpt, lines)
    assert rc == 0
    assert "loops 3, exit latent-diff:0.5, kv full" in err
    assert "loops 3, exit off, kv full" in err
    assert "loops 3, exit off, kv last" in err
    assert "loops 3, exit off, kv ring:2" in err
    assert len(summaries(err)) == 2
    assert not any(line.startswith("error:") for line in err)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("/nope", "unknown command '/nope'"),
        ("/loops x", "/loops takes an integer"),
        ("/loops 0", "/loops takes an integer"),
        ("/exit foo", "unknown exit criterion"),
        ("/kv ring:0", "ring size"),
    ],
)
def test_chat_bad_commands_print_an_error_and_go_on(capsys, ckpt: str, bad: str, fragment: str) -> None:
    rc, out, err = chat(capsys, ckpt, [bad, "hi"])
    assert rc == 0
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert len(summaries(err)) == 1 and out.endswith("\n")  # the next line still got its reply
    assert not any("Traceback" in line for line in err)


def test_chat_bad_command_keeps_the_settings(capsys, ckpt: str) -> None:
    _, _, err = chat(capsys, ckpt, ["/loops 2", "/loops x", "hi"])
    assert "2.00 loops/token" in summaries(err)[0]


def test_chat_reset_forgets_the_conversation(capsys, ckpt: str, monkeypatch) -> None:
    seen = recorded_conversations(monkeypatch)
    rc, _, err = chat(capsys, ckpt, ["one", "two", "/reset", "three"])
    assert rc == 0 and len(summaries(err)) == 3
    assert [m.role for m in seen[0]] == ["user"]
    assert [(m.role, m.content) for m in seen[1]][::2] == [("user", "one"), ("user", "two")]
    assert [m.role for m in seen[1]] == ["user", "assistant", "user"]
    assert [(m.role, m.content) for m in seen[2]] == [("user", "three")]


def test_chat_system_message(capsys, ckpt: str, monkeypatch) -> None:
    seen = recorded_conversations(monkeypatch)
    rc, _, _ = chat(capsys, ckpt, ["a", "/system be brief", "b", "/system", "c"], "--system", "hello")
    assert rc == 0
    assert seen[0][0] == Message("system", "hello")
    assert seen[1][0] == Message("system", "be brief")
    assert all(m.role != "system" for m in seen[2])


@pytest.mark.parametrize(
    ("lines", "extra", "fragment"),
    [
        (["/loops 1", "refused", "/loops 4", "accepted"], ["--speculative", "2:2", "--loops", "4"], "draft"),
        (["z" * 200, "accepted"], [], "context"),
    ],
    ids=["speculative-draft-deeper", "message-longer-than-context"],
)
def test_chat_refused_reply_leaves_no_orphan_user_message(
    capsys, ckpt: str, monkeypatch, lines: list[str], extra: list[str], fragment: str
) -> None:
    """A user line whose reply is refused must not stay in the conversation (it would poison every later turn)."""
    seen = recorded_conversations(monkeypatch)
    rc, _, err = chat(capsys, ckpt, lines, *extra)
    assert rc == 0
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert len(summaries(err)) == 1  # the later line got its reply
    assert [(m.role, m.content) for m in seen[-1]] == [("user", "accepted")]


def test_chat_help_system_and_reset_say_what_they_did(capsys, ckpt: str) -> None:
    rc, out, err = chat(capsys, ckpt, ["/help", "/system be brief", "/system", "/reset", "/system x", "/reset"])
    assert rc == 0 and out == ""
    assert err[1] == chat_cli.HELP
    assert err[2:] == [
        "system message set (8 characters)",
        "system message cleared",
        "conversation cleared",
        "system message set (1 character)",
        "conversation cleared (the system message stays)",
    ]


def test_chat_bare_exit_is_an_error_and_bye_leaves(capsys, ckpt: str) -> None:
    rc, out, err = chat(capsys, ckpt, ["/exit", "/bye", "never answered"])
    assert rc == 0 and out == "" and summaries(err) == []
    errors = [line for line in err if line.startswith("error:")]
    assert errors == ["error: /exit takes CRITERION[:THR] (e.g. /exit kl:5e-4) or off; /bye leaves the chat."]


def test_chat_ctrl_c_stops_the_reply_not_the_session(capsys, ckpt: str, monkeypatch) -> None:
    """Ctrl-C while a reply streams drops that turn and the chat goes on; Ctrl-C at the prompt says how to leave."""
    from loopformer.inference.engine import Engine

    seen = recorded_conversations(monkeypatch)
    original = Engine.stream
    calls = []

    def stream(self: Engine, *args: object, **kwargs: object) -> object:
        calls.append(1)
        events = original(self, *args, **kwargs)
        if len(calls) > 1:
            return events

        class Interrupted:  # the first reply: one token, then Ctrl-C
            result = None

            def __iter__(self) -> object:
                yield next(iter(events))
                raise KeyboardInterrupt

        return Interrupted()

    monkeypatch.setattr(Engine, "stream", stream)
    lines = iter(["stopped", KeyboardInterrupt, "answered"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    args = build_parser().parse_args(["chat", "--ckpt", ckpt, "--max-new-tokens", "4"])
    assert chat_cli.run(args, read=read) == 0
    err = capsys.readouterr().err.splitlines()
    assert "(reply stopped; it is not part of the conversation)" in err
    assert "(Ctrl-D or /bye leaves the chat)" in err
    assert len(summaries(err)) == 1  # the second line got a whole reply
    assert [(m.role, m.content) for m in seen[-1]] == [("user", "answered")]


def test_chat_blank_lines_are_skipped(capsys, ckpt: str) -> None:
    rc, out, err = chat(capsys, ckpt, ["", "   "])
    assert rc == 0 and out == "" and summaries(err) == []


def test_chat_quit_returns_0_before_reading_on(capsys, ckpt: str) -> None:
    rc, out, err = chat(capsys, ckpt, ["/quit", "never answered"])
    assert rc == 0 and out == "" and summaries(err) == []


def test_chat_end_of_input_returns_0(capsys, ckpt: str) -> None:
    rc, out, _ = chat(capsys, ckpt, [])
    assert rc == 0 and out == ""


def test_chat_bad_flags_exit_2(capsys, ckpt: str) -> None:
    rc, _, err = cli(capsys, "chat", "--ckpt", ckpt, "--kv", "ring:0")
    assert rc == 2 and err.startswith("loopformer: error:") and len(err.strip().splitlines()) == 1


# ----- chat format ---------------------------------------------------------------------------------


def test_encode_chat_renders_one_user_turn_exactly(tokenizer: TextTokenizer) -> None:
    text = "Hello, loops!"
    ids = encode_chat(tokenizer, [Message("user", text)])
    special = tokenizer.token_id
    assert ids == [
        special("<|bos|>"),
        special("<|user|>"),
        *tokenizer.encode(text),
        special("<|end|>"),
        special("<|assistant|>"),
    ]
    assert tokenizer.decode(ids) == f"<|bos|><|user|>{text}<|end|><|assistant|>"


def test_encode_chat_renders_a_conversation(tokenizer: TextTokenizer) -> None:
    messages = [Message("system", "sys"), Message("user", "u"), Message("assistant", "a"), Message("user", "v")]
    rendered = tokenizer.decode(encode_chat(tokenizer, messages))
    assert rendered == "<|bos|><|system|>sys<|end|><|user|>u<|end|><|assistant|>a<|end|><|user|>v<|end|><|assistant|>"


def test_encode_chat_rejects_bad_input(tokenizer: TextTokenizer) -> None:
    with pytest.raises(InputError, match="unknown chat role"):
        Message("robot", "hi")
    with pytest.raises(InputError, match="at least one message"):
        encode_chat(tokenizer, [])


def test_encode_prompt(tokenizer: TextTokenizer) -> None:
    assert encode_prompt(tokenizer, "ab") == [tokenizer.bos_id, *tokenizer.encode("ab")]
    with pytest.raises(InputError, match="empty"):
        encode_prompt(tokenizer, "")


# ----- kv-size -------------------------------------------------------------------------------------------
def test_kv_size_reports_cache_bytes_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    from loopformer.inference.cache import cache_bytes
    from loopformer.presets import get_preset

    argv = ["kv-size", "--preset", "huginn-3.5b", "--kv", "full,ring:4,last", "--tokens", "100,200", "--loops", "32"]
    assert main([*argv, "--batch", "2", "--dtype", "bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = get_preset("huginn-3.5b")
    assert len(report["rows"]) == 6
    for row in report["rows"]:
        expected = cache_bytes(config, row["policy"], row["tokens"], 32, batch_size=2, element_bytes=2)
        assert row["bytes"] == expected
    ratios = {row["policy"]: row["full_over_policy"] for row in report["rows"]}
    assert ratios["full"] == 1.0 and ratios["ring:4"] == pytest.approx(132 / 20) and ratios["last"] == 132 / 8
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "ring:4" in table and "16.5x" in table


@pytest.mark.parametrize(
    "argv",
    [
        ["kv-size"],
        ["kv-size", "--preset", "nope"],
        ["kv-size", "--preset", "tiny", "--kv", "ring:x"],
        ["kv-size", "--preset", "tiny", "--loops", "0"],
        ["kv-size", "--preset", "tiny", "--batch", "0"],
    ],
)
def test_kv_size_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loopformer: error:") and "Traceback" not in err


def test_loops_above_the_limit_need_force(capsys, ckpt: str) -> None:
    from loopformer.inference.generation import MAX_LOOPS, GenerationConfig

    with pytest.raises(InputError, match="above the limit of 4,096"):
        GenerationConfig(loops=MAX_LOOPS + 1)
    assert GenerationConfig(loops=MAX_LOOPS + 1, force=True).loops == MAX_LOOPS + 1
    assert main(["generate", "--ckpt", ckpt, "--prompt", PROMPT, "--loops", "100000"]) == 2
    assert "--force" in capsys.readouterr().err
