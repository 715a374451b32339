"""The retrieval benchmark's corpus: GNU manuals, one document per Info node.

    .venv/bin/python -m bench.retrieval_corpus [--info /usr/share/info] [--out bench/data/gnu_manuals.jsonl.gz]

Real English prose that nobody on the team wrote: the Info manuals of coreutils, grep, sed,
gzip and diffutils as Debian ships them (GNU Free Documentation License; each document keeps
its manual's name, and the licence is in the manuals themselves). The benchmark reads the
shipped file, not /usr/share/info, so that its questions' answer texts stay exact wherever
it runs; this module is how that file was made, and how to make it again.

A document is one node: its heading as the title, its prose as the text, with the node
header, menus and heading underlines left out. Index, licence and menu-only nodes are skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

MANUALS = ("coreutils", "grep", "sed", "gzip", "diffutils")
CORPUS = Path(__file__).parent / "data" / "gnu_manuals.jsonl.gz"
MIN_CHARS = 300  # shorter nodes are signposts (a sentence and a menu), not passages

_SKIPPED = re.compile(r"(index|copying|gnu free documentation license|top)$", re.IGNORECASE)
_UNDERLINE = re.compile(r"^[*=\-.]{3,}$")
_NUMBERING = re.compile(r"^(\d+(\.\d+)*|[A-Z](\.\d+)*|Appendix [A-Z])\s+")


def nodes(path: Path) -> Iterator[tuple[str, str]]:
    """(node name, body) for each node of one Info file."""
    text = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text("utf-8")
    for part in text.split("\x1f")[1:]:
        header, _, body = part.lstrip("\n").partition("\n")
        match = re.search(r"Node: ([^,\n]+)", header)
        if match:
            yield match.group(1).strip(), body


def document(manual: str, node: str, body: str) -> dict | None:
    lines, title, in_menu = [], None, False
    for line in body.splitlines():
        stripped = line.strip()
        if stripped == "* Menu:":
            in_menu = True
            continue
        if in_menu:
            if stripped.startswith("* ") or not stripped or line.startswith(" "):
                continue  # menu entries and their wrapped descriptions
            in_menu = False
        if _UNDERLINE.match(stripped):
            if lines and title is None:
                title = _NUMBERING.sub("", lines[-1].strip())
            continue
        lines.append(line.rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text) < MIN_CHARS or _SKIPPED.search(node):
        return None
    slug = re.sub(r"[^a-z0-9]+", "-", node.lower()).strip("-")
    return {"doc_id": f"{manual}/{slug}", "title": title or node, "manual": manual, "node": node, "text": text}


def build(info: Path) -> list[dict]:
    documents, seen = [], set()
    for manual in MANUALS:
        files = sorted(info.glob(f"{manual}.info*.gz")) or sorted(info.glob(f"{manual}.info*"))
        if not files:
            raise SystemExit(f"no {manual}.info under {info}")
        for path in files:
            for node, body in nodes(path):
                doc = document(manual, node, body)
                if doc is not None and doc["doc_id"] not in seen:
                    seen.add(doc["doc_id"])
                    documents.append(doc)
    return documents


def load(path: Path = CORPUS) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--info", type=Path, default=Path("/usr/share/info"))
    parser.add_argument("--out", type=Path, default=CORPUS)
    args = parser.parse_args()
    documents = build(args.info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same manuals give the same bytes, so a rebuild shows in git only if the text changed.
    with gzip.GzipFile(args.out, "wb", mtime=0) as out:
        for doc in documents:
            out.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
    chars = sum(len(d["text"]) for d in documents)
    print(f"{len(documents)} documents, {chars:,} characters → {args.out}")


if __name__ == "__main__":
    main()
