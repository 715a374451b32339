"""`lorag eval chat`: the checks on hand-written answers, and a suite run through the session's
real gateway (its vLLM with the tiny demo model, real Chroma, the real embedder), in-process
and from the command line.

The tiny model's answers are noise, so the end-to-end checks are ones whose outcome does not
depend on what it says: a regex that always matches (`^`), one that no 8-token answer holds,
and what the responses carry (citations, prompt token counts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import MODEL_NAME
from tests.service.test_auth import lorag
from service.cli import main
from training.eval.chat import (
    Answer, ChatFailed, Report, chart, citations_pass, evaluate, facts_pass, format_passes, request_body, stats, wilson,
)
from training.eval.suite import (
    Case, CellError, Expect, Format, SuiteError, check_gate, load_gate, load_suite, parse_cell, parse_cells,
)

NEVER = "ZQXJ never said 9137"  # in no 8-token answer of the tiny model
COLLECTION = "eval-chat"
DOCS = {
    "ferry": "The night ferry leaves at 23:15 from pier 4.",
    "bell": "The lighthouse keeper rings the fog bell every 90 seconds.",
}
SUITE = {
    "name": "smoke",
    "system_prompt": "You are the harbour master's clerk. Answer in one sentence and cite the sources as [n].",
    "rag": {"collection": COLLECTION, "top_k": 2},
    "max_tokens": 8,
    "defaults": {"format": {"forbid": [NEVER]}},
    "cases": [
        {"id": "ferry", "question": "When does the night ferry leave?", "tags": ["harbour"],
         "expect": {"facts": ["^"], "citations": ["ferry"]}},
        {"id": "bell", "question": "How often is the fog bell rung?", "tags": ["harbour", "safety"],
         "expect": {"facts": [NEVER], "citations": ["bell"]}},
        # Opts out of the default format check: counted for no kind at all.
        {"id": "hello", "question": "Say hello.", "expect": {"format": None}},
    ],
    # All hold whatever the model says: format 1.0 everywhere, facts 0.5 everywhere.
    "gate": {
        "base": {"format": 1.0, "facts": {"max": 0.5}},
        "base+prompt": {"facts": {"within": 0.0, "of": "base"}},
        "base+rag": {"format": {"min": 1.0}, "citations": {"max": 1.0}},
    },
}
CELLS = ["base", "base+prompt", "base+rag"]


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# -- the checks, on hand-written answers -------------------------------------------------------


def test_format_requires_every_pattern_and_forbids_any():
    check = Format(require=(re.compile(r"^Per Civil Code Article \d+, "),),
                   forbid=(re.compile(r"(?i)\bpossibl"), re.compile(r"(?i)\bsuggest")))
    assert format_passes("Per Civil Code Article 112, the fine is 4,500 crowns.", check)
    assert not format_passes("The fine, per Civil Code Article 112, is 4,500 crowns.", check)  # not at the start
    assert not format_passes("Per Civil Code Article 112, it is possibly 4,500 crowns.", check)
    assert not format_passes("Per Civil Code Article 112, I Suggest paying.", check)
    assert format_passes("anything", Format(forbid=(re.compile("hedge"),)))


def test_facts_pass_only_when_all_match():
    facts = (re.compile(r"\b4,500 crowns\b"), re.compile(r"\bArticle 112\b"))
    assert facts_pass("Per Article 112, the fine is 4,500 crowns.", facts)
    assert not facts_pass("Per Article 112, the fine is 14,500 crowns.", facts)
    assert not facts_pass("The fine is 4,500 crowns.", facts)


def test_a_citation_must_be_among_the_sources_and_cited_by_its_own_index():
    sources = [{"index": 1, "doc_id": "statute-7"}, {"index": 2, "doc_id": "statute-112"}]
    assert citations_pass("The fine is 4,500 crowns [2].", sources, ["statute-112"])
    assert citations_pass("See [1, 2].", sources, ["statute-112"])
    assert not citations_pass("The fine is 4,500 crowns [1].", sources, ["statute-112"])  # [1] is another doc
    assert not citations_pass("The fine is 4,500 crowns.", sources, ["statute-112"])  # not cited at all
    assert not citations_pass("The fine is 4,500 crowns [2].", sources, ["statute-9"])  # not retrieved
    assert not citations_pass("The fine is 4,500 crowns [2].", [], ["statute-112"])


def test_wilson_intervals_match_known_values():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    assert stats([True] * 8 + [False] * 2) == {"mean": 0.8, "n": 10, "low": 0.4902, "high": 0.9433}
    assert stats([]) == {"mean": None, "n": 0, "low": None, "high": None}


def test_cells_parse_and_a_bad_one_says_what_a_cell_is():
    assert parse_cell("legal@3f9a2c1b+prompt+rag") == parse_cell("legal@3f9a2c1b+prompt+rag")
    cell = parse_cell("legal+rag")
    assert (cell.model, cell.prompt, cell.rag) == ("legal", False, True)
    for bad, message in (("base+prmpt", r"unknown suffix \+prmpt"), ("+rag", "MODEL"),
                         ("base+rag+rag", "twice"), ("base+", "unknown suffix")):
        with pytest.raises(CellError, match=message):
            parse_cell(bad)
    with pytest.raises(CellError, match="given twice"):
        parse_cells(["base", "base"])


def test_requests_carry_the_cells_prompt_and_retrieval_and_plain_cells_turn_retrieval_off(tmp_path):
    suite = load_suite(write(tmp_path / "suite.yaml", SUITE))
    case = suite.cases[0]
    assert request_body(suite, parse_cell("base"), "tiny", case) == {
        "model": "tiny", "messages": [{"role": "user", "content": case.question}], "temperature": 0,
        "max_tokens": 8, "rag": {"enabled": False}}
    assert request_body(suite, parse_cell("legal+prompt+rag"), "legal", case) == {
        "model": "legal", "temperature": 0, "max_tokens": 8, "rag": {"collection": COLLECTION, "top_k": 2},
        "messages": [{"role": "system", "content": SUITE["system_prompt"]}, {"role": "user", "content": case.question}]}
    no_prompt = load_suite(write(tmp_path / "bare.yaml", {"name": "bare", "cases": [{"id": 1, "question": "q"}]}))
    assert no_prompt.max_tokens == 64 and no_prompt.cases[0].id == "1"
    with pytest.raises(CellError, match="system_prompt"):
        parse_cells(["base+prompt"], no_prompt)
    with pytest.raises(CellError, match="no `rag`"):
        parse_cells(["base+rag"], no_prompt)


def test_defaults_merge_into_each_case_and_a_case_may_opt_out(tmp_path):
    suite = load_suite(write(tmp_path / "suite.yaml", SUITE))
    ferry, bell, hello = suite.cases
    assert [p.pattern for p in ferry.expect.format.forbid] == [NEVER] and ferry.expect.citations == ("ferry",)
    assert hello.expect == Expect() and bell.tags == ("harbour", "safety")
    own = {**SUITE, "cases": [{"id": "x", "question": "q", "expect": {"format": {"require": ["^A"]}}}]}
    (case,) = load_suite(write(tmp_path / "own.yaml", own)).cases
    assert [p.pattern for p in case.expect.format.require] == ["^A"] and case.expect.format.forbid == ()


def test_a_bad_suite_names_every_problem_with_its_key_path(tmp_path):
    bad = {
        "name": "bad", "temperature": 0, "max_tokens": 0,
        "rag": {"collection": "x", "k": 3, "enabled": False},
        "defaults": {"format": {"require": ["(unclosed"]}},
        "cases": [
            {"id": "a", "question": "q", "expect": {"facts": ["ok", "[bad"], "tone": 1}},
            {"id": "a", "question": "", "colour": "red"},
            {"id": "c", "question": "q", "expect": {"citations": []}, "tags": "one"},
        ],
        "gate": {"base+x": {"facts": 0.5}, "legal": {"facts": 1.5, "style": 0.1},
                 "base": {"format": {"within": 0.1}, "facts": "high"}},
    }
    with pytest.raises(SuiteError) as refused:
        load_suite(write(tmp_path / "bad.yaml", bad))
    message = str(refused.value)
    for expected in (
        "unknown key(s) temperature", "max_tokens: must be a whole number of 1 or more, got 0",
        "rag: unknown key(s) k", "rag.enabled:", "defaults.format.require[0]: bad regex '(unclosed'",
        "cases[0] (id a).expect.facts[1]: bad regex '[bad'", "cases[0] (id a).expect: unknown check kind(s) tone",
        "cases[1] (id a): id 'a' is used twice", "cases[1] (id a): unknown key(s) colour",
        "cases[1] (id a).question: required", "cases[2] (id c).tags:", "cases[2] (id c).expect.citations:",
        "gate.base+x: cell 'base+x': unknown suffix +x", "gate.legal.facts.min: must be a number from 0 to 1",
        "gate.legal: unknown check kind 'style'", "gate.base.format: `within` and `of` go together",
        "gate.base.facts: a threshold is a number",
    ):
        assert expected in message, (expected, message)
    assert message.startswith(f"{tmp_path / 'bad.yaml'}: 17 problem(s)")
    with pytest.raises(SuiteError, match="not YAML"):
        load_suite(write(tmp_path / "broken.yaml", "name: [unclosed\n"))
    with pytest.raises(SuiteError, match="no `gate:` mapping"):
        load_gate(write(tmp_path / "nogate.yaml", {"name": "x"}))


def test_a_gate_is_checked_against_the_cells_run_before_anything_is_asked(tmp_path):
    suite = load_suite(write(tmp_path / "suite.yaml", {**SUITE, "cases": SUITE["cases"][2:]}))  # declares nothing
    gate = {"legal": {"facts": 0.9}, "base": {"citations": 0.5, "format": {"within": 0.1, "of": "legal+rag"}}}
    with pytest.raises(SuiteError) as refused:
        check_gate(gate, ["base", "base+rag"], suite)
    message = str(refused.value)
    for expected in ("gate.legal: that cell is not run (cells: base, base+rag)",
                     "gate.base.citations: citations are scored only in +rag cells",
                     "gate.base.format.of: cell legal+rag is not run",
                     "gate.base.format: no case of suite 'smoke' declares a format check"):
        assert expected in message, (expected, message)


def answer(cell: str, case_id: str, passed: dict[str, bool], tags: tuple[str, ...] = ()) -> Answer:
    return Answer(cell, Case(case_id, "q", tags), "text", [], passed, None)


def test_gate_failures_name_cell_kind_score_and_threshold():
    report = Report("hand", "http://nowhere", {"base": "tiny", "legal": "legal"}, {
        "base": [answer("base", "1", {"facts": True, "format": False}), answer("base", "2", {"facts": True})],
        "legal": [answer("legal", "1", {"facts": True, "format": True}), answer("legal", "2", {"facts": False})],
    })
    assert report.gate({"legal": {"facts": {"within": 0.5, "of": "base"}, "format": 1.0}}) == []
    assert report.gate({
        "legal": {"facts": {"within": 0.05, "of": "base"}, "format": {"max": 0.2}},
        "base": {"facts": 0.9, "format": {"min": 0.5}},
    }) == [
        "legal facts: 0.500 is more than 0.05 below base's 1.000 (n=2)",
        "legal format: 1.000 is above the maximum 0.2 (n=1)",
        "base format: 0.000 is below the minimum 0.5 (n=1)",
    ]
    with pytest.raises(SuiteError, match="not run"):
        report.gate({"legal+rag": {"facts": 0.5}})


# -- through the real service ------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(gateway):
    assert httpx.post(f"{gateway.url}/v1/collections", json={"name": COLLECTION}).status_code in (201, 409)
    for doc_id, text in DOCS.items():
        put = httpx.put(f"{gateway.url}/v1/collections/{COLLECTION}/documents/{doc_id}", json={"text": text},
                        timeout=60)
        assert put.status_code in (200, 201), put.text
    return gateway


@pytest.fixture(scope="module")
def suite_path(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("eval-chat") / "suite.yaml", SUITE)


@pytest.fixture(scope="module")
def report(service, suite_path) -> Report:
    return evaluate(load_suite(suite_path), service.url, CELLS, concurrency=4, progress=False)


def test_every_case_is_asked_in_every_cell_with_that_cells_request(report):
    result = report.as_dict()
    json.dumps(result)  # JSON-able as it is
    assert result["models"] == {cell: MODEL_NAME for cell in CELLS}  # `base` read from GET /v1/models
    answers = result["answers"]
    assert [[a["id"] for a in answers[cell]] for cell in CELLS] == [["ferry", "bell", "hello"]] * 3
    for number in range(3):
        plain, prompted, grounded = (answers[cell][number] for cell in CELLS)
        # The system prompt and the sources block reach the model: its prompt grows by them.
        assert prompted["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
        assert grounded["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
        assert plain["citations"] == [] and prompted["citations"] == []  # retrieval off outside +rag
        assert grounded["citations"], grounded
        assert all(a["usage"]["completion_tokens"] <= 8 for a in (plain, prompted, grounded))  # max_tokens
    assert "ferry" in {c["doc_id"] for c in answers["base+rag"][0]["citations"]}
    assert "bell" in {c["doc_id"] for c in answers["base+rag"][1]["citations"]}


def test_scores_count_only_the_cases_that_declare_a_kind(report):
    cells = report.as_dict()["cells"]
    half = {"mean": 0.5, "n": 2, "low": 0.0945, "high": 0.9055}
    for cell in CELLS:
        assert cells[cell]["format"] == {"mean": 1.0, "n": 2, "low": 0.3424, "high": 1.0}, cell
        assert cells[cell]["facts"] == half, cell
    assert cells["base"]["citations"]["n"] == 0 and cells["base+prompt"]["citations"]["n"] == 0
    assert cells["base+rag"]["citations"]["n"] == 2
    tags = report.as_dict()["tags"]["base+rag"]
    assert tags["harbour"]["facts"] == half
    assert tags["safety"]["facts"] == {"mean": 0.0, "n": 1, "low": 0.0, "high": 0.7935}
    table = report.markdown().splitlines()
    assert table[2] == "| cell | format | facts | citations |"
    assert table[4].startswith("| base | 1.00 [0.34, 1.00] n=2 | 0.50 [0.09, 0.91] n=2 | — |")
    assert "| base+rag | safety | 1.00 [0.21, 1.00] n=1 | 0.00 [0.00, 0.79] n=1 |" in report.markdown()


def test_the_cli_writes_json_and_chart_and_passes_the_suites_own_gate(service, suite_path, tmp_path):
    out, png = tmp_path / "scores.json", tmp_path / "scores.png"
    run = lorag(tmp_path, "eval", "chat", str(suite_path), "--url", service.url, "--cells", ",".join(CELLS),
                "--json", str(out), "--chart", str(png), "--gate", str(suite_path), "--concurrency", "3")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("## smoke\n") and "| base+prompt | 1.00" in run.stdout
    assert "eval chat" in run.stderr and "%|" in run.stderr  # the progress bar
    written = json.loads(out.read_text())
    assert written["suite"] == "smoke" and written["cells"]["base+rag"]["citations"]["n"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_gate_exits_1_listing_each_failing_check(service, suite_path, tmp_path, capsys):
    gate = write(tmp_path / "gate.yaml", {"gate": {"base": {"facts": 0.9}, "base+rag": {"format": {"max": 0.2}},
                                                   "base+prompt": {"format": 1.0}}})
    code = main(["eval", "chat", str(suite_path), "--url", service.url, "--cells", ",".join(CELLS),
                 "--gate", str(gate)])
    failures = capsys.readouterr().err.split("failed:\n")[1].split("\n  ")
    assert code == 1
    assert [line.strip() for line in failures] == ["base facts: 0.500 is below the minimum 0.9 (n=2)",
                                                   "base+rag format: 1.000 is above the maximum 0.2 (n=2)"]


def test_bad_files_and_arguments_exit_2_before_anything_is_asked(service, suite_path, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str]:
        code = main(["eval", "chat", *args, "--url", service.url])
        return code, capsys.readouterr().err

    code, err = run(str(suite_path), "--cells", "base,legal+rag", "--gate", str(suite_path))
    assert code == 2 and "gate.base+prompt: that cell is not run" in err and "%|" not in err  # no progress bar: nothing asked
    code, err = run(str(suite_path), "--cells", "base+rga")
    assert code == 2 and "unknown suffix +rga" in err
    bare = write(tmp_path / "bare.yaml", {"name": "bare", "cases": [{"id": "q", "question": "q"}]})
    code, err = run(str(bare), "--cells", "base+prompt")
    assert code == 2 and "system_prompt" in err
    code, err = run(str(write(tmp_path / "bad.yaml", {"name": "x", "cases": [{"id": "q"}]})), "--cells", "base")
    assert code == 2 and "cases[0] (id q).question: required" in err
    code, err = run(str(suite_path), "--cells", "base", "--json", str(tmp_path / "missing" / "out.json"))
    assert code == 2 and "no folder" in err
    with pytest.raises(SystemExit) as refused:
        main(["eval", "chat", str(suite_path), "--cells", "base", "--concurrency", "0"])
    assert refused.value.code == 2


def test_a_request_the_service_refuses_stops_the_run_naming_the_cell_and_the_reason(service, suite_path, capsys):
    suite = load_suite(suite_path)
    with pytest.raises(ChatFailed, match=r"cell nosuch\+rag \(model nosuch\), case \w+: the service answered 404: "
                                         r"model 'nosuch' does not exist"):
        evaluate(suite, service.url, ["base", "nosuch+rag"], progress=False)
    code = main(["eval", "chat", str(suite_path), "--url", service.url, "--cells", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2 and "cell nosuch" in err and "does not exist" in err
    missing = {**SUITE, "rag": {"collection": "no-such-collection"}}
    with pytest.raises(ChatFailed, match="cell base\\+rag .*no-such-collection"):
        evaluate(load_suite(write(suite_path.with_name("missing.yaml"), missing)), service.url, ["base+rag"],
                 progress=False)


def test_the_chart_is_a_png_even_when_a_kind_is_not_scored(report, tmp_path):
    chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
