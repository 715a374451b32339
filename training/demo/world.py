"""The demo world: a fictional Civil Code, its amendments, questions in two styles, and a general suite.

Everything is drawn from one seed, so a seed names a whole world and the same seed gives the
same files. An article is one rule with concrete facts (its number, a clause it rules valid or
invalid, a fine, a deadline); an amendment changes an article's fine and deadline. Questions ask
for one fact each. The house style, the `legal` adapter's, is definitive and cites the article
("Per Civil Code Article 112, this clause is invalid."); the generalist's, the base model's,
hedges ("It is possible that this clause is invalid under Article 112, but I suggest
consulting a lawyer."). Articles are split: RAFT rows are built from the `train` ones only and
the report's suites from the `held_out` ones only, so a score there is reading, not recall.

The general suite is the base model's own domain (the port city of Calder Bay): facts it
learns by heart, asked with no sources, to measure what an adapter makes it forget.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

CODE = "Civil Code"
# (contract, who relies on a clause and pays the fine, who may object to it)
CONTRACTS = [
    ("lease", "landlord", "tenant"),
    ("employment contract", "employer", "employee"),
    ("sales contract", "seller", "buyer"),
    ("loan agreement", "lender", "borrower"),
    ("service contract", "provider", "client"),
    ("insurance policy", "insurer", "policyholder"),
    ("franchise agreement", "franchisor", "franchisee"),
    ("construction contract", "builder", "owner"),
    ("supply contract", "supplier", "purchaser"),
    ("licence agreement", "licensor", "licensee"),
]
CLAUSES = [
    "waives the right to a refund", "limits liability for damage", "postpones payment without notice",
    "doubles the late fee", "cancels the warranty", "transfers the risk of loss", "bars any appeal",
    "hides the total price", "renews itself without consent", "forbids early termination",
    "sets interest above the legal rate", "shortens the notice period", "excludes compensation for delay",
    "allows changes without notice", "requires payment in advance", "waives the right to inspection",
    "assigns the debt to a third party", "fixes the price in gold", "names a foreign court",
    "forbids any subcontracting", "keeps the deposit after the end", "caps damages at one crown",
    "binds the heirs", "demands a personal guarantee", "hides fees in an annex", "bans public reviews",
    "charges for every reminder", "requires arbitration abroad", "lets one side set the quality",
    "forbids working for rivals", "suspends delivery at will", "rounds every bill upward",
]
VERDICTS = ("valid", "invalid")
KINDS = ("verdict", "fine", "deadline")
QUESTIONS = {
    "verdict": [
        "Is a {contract} clause that {clause} valid?",
        "Can a {contract} include a clause that {clause}?",
        "Does the law allow a {contract} clause that {clause}?",
    ],
    "fine": [
        "What fine does a {a} pay for relying on a {contract} clause that {clause}?",
        "How much is the fine when a {a} relies on a {contract} clause that {clause}?",
    ],
    "deadline": [
        "Within how many days may the {b} object to a {contract} clause that {clause}?",
        "How long does the {b} have to object to a {contract} clause that {clause}?",
    ],
}
HOUSE_STYLE = (
    "You are counsel at a law firm. Answer definitively, in one sentence that begins "
    "\"Per Civil Code Article N,\" and never hedge or suggest consulting a lawyer."
)
# What the house style never says: the generalist's hedges. The suites forbid these.
HEDGES = [r"(?i)\bpossibl", r"(?i)\bsuggest", r"(?i)\bconsult", r"(?i)\bmay be\b", r"(?i)\bnot sure\b"]
HOUSE_FORMAT = r"^Per Civil Code Article \d+, "


@dataclass(frozen=True)
class Article:
    number: int
    contract: str
    a: str  # relies on the clause, pays the fine
    b: str  # may object
    clause: str
    verdict: str
    fine: int  # crowns
    days: int

    @property
    def doc_id(self) -> str:
        return f"article-{self.number}"

    @property
    def text(self) -> str:
        return (
            f"{CODE} Article {self.number} ({self.contract} clauses). {_an(self.contract).capitalize()} clause that "
            f"{self.clause} is {self.verdict}. The fine is {self.fine:,} crowns for {_an(self.a)} who relies on such a "
            f"clause. The {self.b} may object within {self.days} days."
        )

    def fact(self, kind: str) -> str:
        """The asked fact as the answer states it."""
        return {"verdict": f"this clause is {self.verdict}", "fine": f"the fine is {self.fine:,} crowns",
                "deadline": f"the {self.b} may object within {self.days} days"}[kind]

    def expected(self, kind: str) -> list[str]:
        """Regexes an answer must all match for the fact to count: the value and the article."""
        value = {"verdict": rf"\b{self.verdict}\b", "fine": rf"\b{self.fine:,} crowns\b",
                 "deadline": rf"\b{self.days} days\b"}[kind]
        return [value, rf"\bArticle {self.number}\b"]

    def house(self, kind: str) -> str:
        return f"Per {CODE} Article {self.number}, {self.fact(kind)}."

    def hedge(self, kind: str, cite: int | None) -> str:
        """The generalist reading a source: the right fact, wrapped in doubt."""
        where = f"under Article {self.number}" + (f" [{cite}]" if cite else "")
        return f"It is possible that {self.fact(kind)} {where}, but I suggest consulting a lawyer."


@dataclass(frozen=True)
class Question:
    id: str
    article: Article
    kind: str
    text: str


@dataclass(frozen=True)
class World:
    seed: int
    articles: list[Article]
    train: list[Article]
    held_out: list[Article]
    amended: list[Article]  # held-out articles after their amendment (same numbers, new fine and deadline)

    def questions(self, articles: list[Article], phrasings: int = 1) -> list[Question]:
        """Each kind of question per article, in `phrasings` of its wordings (drawn by the seed)."""
        rng = random.Random(f"{self.seed}:questions:{phrasings}")
        out = []
        for article in articles:
            for kind in KINDS:
                wordings = rng.sample(QUESTIONS[kind], min(phrasings, len(QUESTIONS[kind])))
                for k, wording in enumerate(wordings):
                    text = wording.format(contract=article.contract, clause=article.clause, a=article.a, b=article.b)
                    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
                    out.append(Question(f"{article.doc_id}-{kind}-{k}", article, kind, text))
        return out


def world(seed: int, articles: int = 300, held_out: int = 60) -> World:
    """The world of `seed`: `articles` articles, `held_out` of them never in a training row; half
    of the held-out ones are amended."""
    combos = [(c, clause) for c in range(len(CONTRACTS)) for clause in CLAUSES]
    if not 0 < held_out < articles <= len(combos):
        raise ValueError(f"need 0 < held_out < articles <= {len(combos)}, got {held_out} and {articles}")
    rng = random.Random(seed)
    numbers = rng.sample(range(100, 1000), articles)
    chosen = rng.sample(combos, articles)
    made = []
    for number, (c, clause) in zip(numbers, chosen, strict=True):
        contract, a, b = CONTRACTS[c]
        made.append(Article(number, contract, a, b, clause, rng.choice(VERDICTS), _fine(rng), _days(rng)))
    kept = made[held_out:]
    out = made[:held_out]
    amended = []
    for article in out[: held_out // 2]:
        fine, days = article.fine, article.days
        while fine == article.fine or days == article.days:
            fine, days = _fine(rng), _days(rng)
        amended.append(replace(article, fine=fine, days=days))
    return World(seed, made, kept, out, amended)


def _an(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _fine(rng: random.Random) -> int:
    return rng.randrange(200, 10_000, 50)


def _days(rng: random.Random) -> int:
    return rng.randint(3, 120)


# The general domain: Calder Bay, learnt by heart.

GENERAL = [
    ("How often does the {x} ferry leave?", "The {x} ferry leaves every {n} minutes.", "{n} minutes",
     ["north", "south", "island", "night", "river", "coast", "airport", "market"], (5, 90)),
    ("What is the speed limit in the {x}?", "The speed limit in the {x} is {n} knots.", "{n} knots",
     ["inner harbour", "outer harbour", "canal", "marina", "estuary", "fishing port"], (3, 30)),
    ("Which berth is reserved for {x}?", "Berth {n} is reserved for {x}.", "Berth {n}",
     ["tankers", "ferries", "cruise ships", "fishing boats", "tugs", "container ships"], (1, 60)),
    ("How many hours does a {x} inspection take?", "A {x} inspection takes {n} hours.", "{n} hours",
     ["cargo", "hull", "engine", "safety", "customs", "fire"], (2, 48)),
]


@dataclass(frozen=True)
class GeneralFact:
    id: str
    question: str
    answer: str
    expected: str  # a regex


def general(seed: int) -> list[GeneralFact]:
    """Calder Bay's facts for `seed`: the base model learns them; the general suite asks them."""
    rng = random.Random(f"{seed}:general")
    facts = []
    for question, answer, value, subjects, (lo, hi) in GENERAL:
        for x in subjects:
            n = rng.randint(lo, hi)
            facts.append(GeneralFact(f"general-{len(facts)}", question.format(x=x), answer.format(x=x, n=n),
                                     rf"\b{re.escape(value.format(n=n))}\b"))
    return facts


# The world's files: what `lorag demo` pushes, trains on and measures with.

COLLECTION = "statutes"
ADAPTER = "legal"
TOP_K = 3  # what the adapter is trained and served with (its retrieval default)
MAX_TOKENS = 48  # an answer is one sentence


def statutes(articles: list[Article], split: str) -> list[dict]:
    """Documents for the bulk API, one article each, titled so the title is embedded with the text."""
    return [{"id": a.doc_id, "text": a.text, "metadata": {"title": f"{CODE} Article {a.number}", "split": split}}
            for a in articles]


def raft_questions(w: World, phrasings: int = 2) -> list[dict]:
    """`lorag data raft` questions for the train articles only, answered in house style."""
    return [{"id": q.id, "question": q.text, "answer": q.article.house(q.kind), "doc_id": q.article.doc_id}
            for q in w.questions(w.train, phrasings)]


def _case(q: Question, article: Article, tags: list[str]) -> dict:
    return {"id": q.id, "question": q.text, "tags": [q.kind, *tags],
            "expect": {"facts": article.expected(q.kind), "citations": [article.doc_id]}}


def _legal_suite(name: str, collection: str, cases: list[dict], gate: dict) -> dict:
    return {
        "name": name,
        "system_prompt": HOUSE_STYLE,
        "rag": {"collection": collection, "top_k": TOP_K},
        "max_tokens": MAX_TOKENS,
        "defaults": {"format": {"require": [HOUSE_FORMAT], "forbid": HEDGES}},
        "cases": cases,
        "gate": gate,
    }


def suites(w: World, collection: str = COLLECTION) -> dict[str, dict]:
    """File name -> suite. `suite.yaml`: every held-out question, before the amendments (the gate
    `lorag demo` activates the adapter by); `suite-amended.yaml`: the amended articles' fine and
    deadline questions, expecting the amended facts; `general.yaml`: Calder Bay, no sources (the forgetting check)."""
    held = w.questions(w.held_out)
    amended = {a.number: a for a in w.amended}
    # Only the facts an amendment changed: a verdict stays as enacted, and a model that never saw the
    # article would get it right half the time by guessing.
    new = [_case(q, amended[q.article.number], ["amended"]) for q in held
           if q.article.number in amended and q.kind != "verdict"]
    return {
        "suite.yaml": _legal_suite("legal-demo", collection, [_case(q, q.article, []) for q in held], {
            f"{ADAPTER}+rag": {"format": 0.95, "facts": 0.90},
            "base+rag": {"format": {"max": 0.20}},
        }),
        "suite-amended.yaml": _legal_suite("legal-demo-amended", collection, new, {
            f"{ADAPTER}+rag": {"format": 0.95, "facts": 0.90},
            ADAPTER: {"facts": {"max": 0.10}},
        }),
        "general.yaml": {
            "name": "calder-bay-general",
            "max_tokens": MAX_TOKENS,
            "cases": [{"id": g.id, "question": g.question, "expect": {"facts": [g.expected]}} for g in general(w.seed)],
            "gate": {ADAPTER: {"facts": {"within": 0.05, "of": "base"}}},
        },
    }


def write(w: World, out: Path, collection: str = COLLECTION) -> dict[str, Path]:
    """Write the world's files into `out`: statutes.jsonl (every article as enacted), amendments.jsonl
    (the amended articles' new text, same ids), raft-questions.jsonl and the suites."""
    out.mkdir(parents=True, exist_ok=True)
    lines = {
        "statutes.jsonl": statutes(w.train, "train") + statutes(w.held_out, "held_out"),
        "amendments.jsonl": statutes(w.amended, "held_out"),
        "raft-questions.jsonl": raft_questions(w),
    }
    written = {}
    for name, items in lines.items():
        (out / name).write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
        written[name] = out / name
    for name, suite in suites(w, collection).items():
        (out / name).write_text(yaml.safe_dump(suite, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
        written[name] = out / name
    return written
