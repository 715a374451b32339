"""The demo world: deterministic per seed, held-out articles in no training question, amendments
that change facts, and suites the eval harness loads and whose checks tell the two styles apart."""

from __future__ import annotations

import json
import re

import pytest

from training.demo.world import HEDGES, HOUSE_FORMAT, KINDS, general, suites, world, write
from training.eval.chat import format_passes
from training.eval.suite import load_suite


def test_a_seed_names_one_world_and_another_seed_another():
    assert world(3) == world(3)
    assert world(3).articles != world(4).articles
    assert general(3) == general(3) and general(3) != general(4)


def test_held_out_articles_appear_in_no_training_question_and_half_are_amended():
    w = world(0)
    held = {a.doc_id for a in w.held_out}
    assert len(held) == 60 and len(w.train) == 240 and not held & {a.doc_id for a in w.train}
    numbers = [a.number for a in w.articles]
    assert len(set(numbers)) == len(numbers)
    # Each (contract, clause) is one article: a question names its article unambiguously.
    assert len({(a.contract, a.clause) for a in w.articles}) == len(w.articles)
    before = {a.number: a for a in w.held_out}
    for new in w.amended:
        old = before[new.number]
        assert (new.fine, new.days) != (old.fine, old.days) and new.fine != old.fine and new.days != old.days
        assert new.verdict == old.verdict and new.clause == old.clause


def test_the_files_hold_what_each_stage_needs(tmp_path):
    w = world(0)
    files = write(w, tmp_path)
    statutes = [json.loads(line) for line in files["statutes.jsonl"].read_text().splitlines()]
    assert len(statutes) == 300 and {s["metadata"]["split"] for s in statutes} == {"train", "held_out"}
    amendments = [json.loads(line) for line in files["amendments.jsonl"].read_text().splitlines()]
    assert {a["id"] for a in amendments} <= {s["id"] for s in statutes} and len(amendments) == 30
    questions = [json.loads(line) for line in files["raft-questions.jsonl"].read_text().splitlines()]
    trained = {a.doc_id for a in w.train}
    assert {q["doc_id"] for q in questions} == trained  # RAFT rows come from train articles only
    assert all(re.match(HOUSE_FORMAT, q["answer"]) for q in questions)

    suite = load_suite(files["suite.yaml"])
    assert len(suite.cases) == 60 * len(KINDS)
    assert {c.expect.citations[0] for c in suite.cases} == {a.doc_id for a in w.held_out}
    amended = load_suite(files["suite-amended.yaml"])
    assert len(amended.cases) == 30 * 2 and all("amended" in c.tags for c in amended.cases)
    # Only changed facts: each case's value is in its amendment's text and not in the enacted one.
    enacted = {s["id"]: s["text"] for s in statutes}
    new = {a["id"]: a["text"] for a in amendments}
    for case in amended.cases:
        value, doc = case.expect.facts[0], case.expect.citations[0]
        assert value.search(new[doc]) and not value.search(enacted[doc]), case.id
    assert len(load_suite(files["general.yaml"]).cases) == len(general(0))


@pytest.mark.parametrize("kind", KINDS)
def test_the_suites_format_check_passes_the_house_style_and_fails_the_hedge(kind, tmp_path):
    w = world(0)
    check = load_suite(write(w, tmp_path)["suite.yaml"]).cases[0].expect.format
    article = w.held_out[0]
    assert format_passes(article.house(kind), check)
    assert not format_passes(article.hedge(kind, 1), check)
    assert any(re.search(h, article.hedge(kind, 1)) for h in HEDGES)
    # And the facts regexes accept both styles' statement of the fact: only the format tells them apart.
    for answer in (article.house(kind), article.hedge(kind, 2)):
        assert all(re.search(p, answer) for p in article.expected(kind)), answer


def test_suites_gate_the_cells_the_story_is_about():
    gates = {name: suite["gate"] for name, suite in suites(world(0)).items()}
    assert gates["suite.yaml"] == {"legal+rag": {"format": 0.95, "facts": 0.90}, "base+rag": {"format": {"max": 0.20}}}
    assert gates["suite-amended.yaml"]["legal"] == {"facts": {"max": 0.10}}
    assert gates["general.yaml"] == {"legal": {"facts": {"within": 0.05, "of": "base"}}}
