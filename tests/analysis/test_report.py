"""The analysis pipeline, its HTML / JSON report and ``loopformer analyze`` on tiny checkpoints."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from loopformer.analysis import layout_check
from loopformer.analysis.layout_check import find_chromium, measure
from loopformer.analysis.plots import describe_iterations, lens_iterations, plot_path_independence
from loopformer.analysis.report import COLLAPSE_ROWS, Figure, Section, Table, render_html
from loopformer.analysis.run import AnalysisOptions, InputGroup, analyze
from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.model import build_model
from loopformer.tasks.encoding import task_tokenizer
from loopformer.tokenizer import TextTokenizer
from support import small_config

FIGURES = ("convergence.png", "pca.png", "path_independence.png", "logit_lens.png", "exits.png")
VOID = {"meta", "img", "br", "hr", "link", "input"}


class TagChecker(HTMLParser):
    """Records unbalanced tags and every image source."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def check_html(text: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(text)
    assert text.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)  # self-contained
    return checker


def save(tmp: Path, tokenizer: TextTokenizer, **changes: object) -> str:
    config = small_config(**{"vocab_size": tokenizer.vocab_size, "max_seq_len": 64, **changes})
    model = build_model(config, seed=0)
    state = TrainingState(step=0, model=model.state_dict(), config=config, tokenizer_json=tokenizer.to_json())
    save_checkpoint(tmp, state)
    return str(tmp)


def test_render_html_escapes_and_balances_tags(tmp_path: Path) -> None:
    section = Section("A <b> title", "text & more", [], [Table(["x", "y"], [["<script>", 1.5]], "a & b")])
    checker = check_html(render_html("T", "intro", [section], [("key <i>", "value & more")]))
    assert checker.images == []
    assert "<script>" not in render_html("T", "intro", [section])
    assert "<b>" not in render_html("T", "intro", [section]) and "a &amp; b" in render_html("T", "intro", [section])


def test_report_layout_fits_the_window() -> None:
    """The CSS and markup that keep the page inside the window: viewport, a centred max-width column with margins,
    images that scale down, tables that scroll in their own box, the summary first and long tables collapsed."""
    short = Table(["a", "b"], [[i, i] for i in range(COLLAPSE_ROWS)], "short")
    long = Table(["a", "b"], [[i, i] for i in range(COLLAPSE_ROWS + 1)], "long")
    text = render_html("T", "intro", [Section("S", "", [], [short, long])], [("Convergence", "by iteration 3")])
    check_html(text)
    style = re.sub(r"\s+", " ", text[text.index("<style>") : text.index("</style>")])
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert re.search(r"main \{[^}]*max-width: [^;]+;[^}]*margin: 0 auto;[^}]*padding: [^;]*\d", style)
    assert re.search(r"img \{[^}]*max-width: 100%; height: auto;", style)
    assert re.search(r"\.table-wrap \{[^}]*overflow-x: auto;", style)
    assert "box-sizing: border-box" in style  # borders and padding stay inside max-width: 100%
    assert text.index('class="summary"') < text.index("<h2>S</h2>") and "<dt>Convergence</dt>" in text
    assert text.count('<div class="table-wrap"><table>') == 2
    assert text.count("<details>") == 1 and f"long ({COLLAPSE_ROWS + 1} rows)</summary>" in text
    assert "<caption>short</caption>" in text


def test_figures_carry_their_size_and_caption(tmp_path: Path) -> None:
    image = plot_path_independence(torch.full((5,), 1e-7), 3.8e-6, "float32", list("abcde"), tmp_path / "p.png")
    text = render_html("T", "", [Section("S", "", [Figure(image, "identical within float noise")])])
    assert re.search(r'<img alt="p" width="600" height="400" src="data:image/png;base64,', text)
    assert "<figcaption>identical within float noise</figcaption>" in text


@pytest.mark.parametrize(
    ("loops", "rows", "note"),
    [
        (6, list(range(6)), ""),
        (32, list(range(32)), ""),
        (48, [*range(0, 48, 2), 47], "every 2nd iteration (1, 3, 5, ..., 48; 25 of 48 shown)"),
        (100, [*range(0, 100, 4), 99], "every 4th iteration (1, 5, 9, ..., 100; 26 of 100 shown)"),
    ],
)
def test_logit_lens_rows_are_all_or_evenly_spaced(loops: int, rows: list[int], note: str) -> None:
    assert lens_iterations(loops) == rows
    assert describe_iterations(rows, loops) == note


def test_analyze_writes_every_figure_and_a_consistent_report(tmp_path: Path) -> None:
    model = build_model(small_config(), seed=0).eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    scored = torch.ones_like(ids, dtype=torch.bool)
    groups = [InputGroup("easy", ids, scored, [f"t{i}" for i in range(10)]), InputGroup("hard", ids[:2], scored[:2])]
    options = AnalysisOptions(loops=6, reference_loops=24, exit_rules=("kl:1e-3", "latent-diff:0.05"), row=1)
    numbers = analyze(model, groups, options, tmp_path, lambda t: f"<{t}>")
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 1000
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(numbers))
    assert set(report["groups"]) == {"easy", "hard"}
    for group, rows in (("easy", 3), ("hard", 2)):
        for stats in report["groups"][group]["exits"].values():
            assert sum(stats["histogram"].values()) == rows * 10 and 1 <= stats["mean"] <= 6
    assert -1.0 <= report["path_independence"]["overall"] <= 1.0
    assert sum(report["convergence"]["status"].values()) == 30
    assert 0 < sum(report["pca"]["explained"]) <= 1 + 1e-6
    html = (tmp_path / "report.html").read_text()
    checker = check_html(html)
    assert len(checker.images) == len(FIGURES)
    assert report["path_independence"]["noise_floor"] == pytest.approx(3.8147e-6)
    assert report["path_independence"]["within_noise"] == (
        report["path_independence"]["spread_max"] <= report["path_independence"]["noise_floor"]
    )
    for name in ("Model", "Loops analysed", "Convergence", "Path independence", "Logit lens", "Exit savings"):
        assert f"<dt>{name}</dt>" in html
    assert "noise floor 3.8e-06 = 32 x float32 eps" in html


def test_analyze_on_disk_and_zero_state_models(tmp_path: Path) -> None:
    model = build_model(small_config(state_init="zero"), seed=0).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    group = InputGroup("x", ids, torch.ones_like(ids, dtype=torch.bool), [str(i) for i in range(6)])
    options = AnalysisOptions(loops=4, reference_loops=8, on_disk=True, normed=True)
    numbers = analyze(model, [group], options, tmp_path, str)
    assert numbers["path_independence"] is None  # every start is the same zero state
    assert (tmp_path / "trajectory.npy").exists() and not (tmp_path / "path_independence.png").exists()
    html = (tmp_path / "report.html").read_text()
    assert "top 5" in html and html.count("<tr>") > 4 + 4  # the top-k table has one row per iteration


def test_analysis_options_are_validated() -> None:
    with pytest.raises(InputError, match="at least 2 loops"):
        AnalysisOptions(loops=1)
    with pytest.raises(InputError, match="reference loops"):
        AnalysisOptions(loops=8, reference_loops=4)


def test_cli_analyze_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save(tmp_path / "run", TextTokenizer.byte_level())
    out = tmp_path / "report"
    argv = ["analyze", "--ckpt", ckpt, "--text", "loop state", "--out", str(out), "--loops", "4"]
    assert main([*argv, "--curve-loops", "1,2,4", "--compare", ckpt, "--exit", "kl,cosine"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["loops"] for c in report["curves"]] == [[1, 2, 4], [1, 2, 4]]
    assert set(report["groups"]["text"]["exits"]) == {"kl:0.0005", "cosine:0.001"}
    assert (out / "curves.png").exists() and "report.html" in capsys.readouterr().err
    check_html((out / "report.html").read_text())
    assert main(argv) == 0  # an earlier report may be overwritten
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert main([*argv[:-4], "--out", str(tmp_path / "run"), "--loops", "4"]) == 2  # a training run may not
    assert "exists and is not empty" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_cli_analyze_task(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "run", task_tokenizer(["0", "1"]), vocab_size=64)  # padded past the 16 tokenizer ids
    out = tmp_path / "report"
    argv = ["analyze", "--ckpt", ckpt, "--task", "prefix-parity", "--difficulty", "4,8", "--count", "3"]
    assert main([*argv, "--out", str(out), "--loops", "4", "--curve-loops", "1,4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["groups"]) == {"length 4", "length 8"}
    for group, length in (("length 4", 4), ("length 8", 8)):
        for stats in report["groups"][group]["exits"].values():  # only the target positions count
            assert sum(stats["histogram"].values()) == 3 * length
    assert all(0 <= v <= 1 for curve in report["curves"] for v in curve["values"])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--text", "x", "--task", "prefix-parity", "--difficulty", "4"],
        ["--task", "prefix-parity"],
        ["--text", "x", "--loops", "1"],
        ["--text", "x", "--row", "3"],
        ["--text", "x" * 200],
        ["--text", "x", "--exit", "nope"],
        ["--task", "nope", "--difficulty", "4"],
    ],
)
def test_cli_analyze_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    ckpt = save(tmp_path / "run", TextTokenizer.byte_level())
    assert main(["analyze", "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--loops", "4", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loopformer: error:") and "Traceback" not in err


@pytest.mark.skipif(find_chromium() is None, reason="needs a headless Chromium")
def test_report_has_no_horizontal_scroll_in_chromium(tmp_path: Path) -> None:
    model = build_model(small_config(), seed=0).eval()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    labels = [f"token_{i}_with_a_long_text" for i in range(40)]
    group = InputGroup("a group with a long name", ids, torch.ones_like(ids, dtype=torch.bool), labels)
    options = AnalysisOptions(loops=40, reference_loops=40, exit_rules=("kl:1e-3",))
    analyze(model, [group], options, tmp_path, lambda t: f"prediction-{t}", title="Inside the loop: " + "x" * 300)
    browser = find_chromium()
    for width in (1200, 800):
        result = measure(tmp_path / "report.html", width, browser=browser)
        assert result.window == width and result.fits, result
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><html><body><div style="width: 1500px">x</div></body></html>')
    result = measure(wide, 1200, browser=browser)  # the measurement does see an overflow
    assert not result.fits and result.scroll >= 1500 and "div" in result.wide


def test_layout_check_skips_without_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(layout_check, "find_chromium", lambda: None)
    assert layout_check.main([str(tmp_path / "report.html"), "--width", "1200"]) == 0
    assert capsys.readouterr().err.startswith("skipped: none of chromium")
