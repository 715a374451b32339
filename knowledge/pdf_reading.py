"""PDF text, read in a child process that has a memory limit and a deadline.

An uploaded PDF is a program for the parser: a few kilobytes can nest objects past Python's
recursion limit, inflate to gigabytes (pypdf's limits are per stream, not per file), or keep
a core busy for minutes. So pypdf never runs in the gateway: a fresh interpreter reads the
bytes from stdin under RLIMIT_AS (address space) and RLIMIT_CPU, answers one JSON object on
stdout, and is killed if it has not answered within the wall-clock timeout. Whatever happens
in there, the caller gets `PdfFailed` (or `PdfTooLarge` for a limit it can meet).

Run as `python -m knowledge.pdf_reading` only by `PdfExtractor`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The folder that holds the `knowledge` package: the child imports this module from there,
# whatever the gateway's working directory is.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class PdfLimits:
    timeout_s: float  # wall clock, from spawn to answer
    memory_bytes: int  # the child's address space (RLIMIT_AS)
    max_pages: int
    max_chars: int  # text past this is refused, so extraction stops there


class PdfFailed(Exception):
    """The PDF could not be read; the message says why, without the file name."""


class PdfTooLarge(Exception):
    """A readable PDF past a limit the caller can meet by splitting the file."""


class PdfExtractor:
    """Reads PDFs in child processes, at most `workers` at a time (each may take limits.memory_bytes)."""

    def __init__(self, limits: PdfLimits, workers: int):
        self.limits = limits
        self._slots = threading.BoundedSemaphore(workers)

    def text(self, data: bytes) -> str:
        """The text of every page, pages separated by a blank line; PdfFailed or PdfTooLarge otherwise."""
        with self._slots:  # a burst of uploads waits here rather than taking the machine's memory
            return _read(data, self.limits)


def _read(data: bytes, limits: PdfLimits) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "knowledge.pdf_reading", json.dumps(asdict(limits))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        out, err = proc.communicate(data, timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise PdfFailed(f"reading it took longer than {limits.timeout_s:g} s (LORAG_PDF_TIMEOUT_S)") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        answer = json.loads(out)
    except ValueError:
        # Killed by the memory or CPU limit, or a crash inside a C extension: no answer at all.
        log.warning("PDF reader exited with %s without answering: %s", proc.returncode, err[-2000:].decode(errors="replace"))
        raise PdfFailed(
            f"the parser stopped (exit status {proc.returncode}) within its limits of "
            f"{limits.memory_bytes >> 20} MiB (LORAG_PDF_MEMORY_MB) and {limits.timeout_s:g} s"
        ) from None
    if "text" in answer:
        return answer["text"]
    if answer.get("too_large"):
        raise PdfTooLarge(answer["too_large"])
    raise PdfFailed(answer["error"])


def _extract(data: bytes, limits: PdfLimits) -> dict:
    """Runs in the child: the answer object ({"text"}, {"error"} or {"too_large"})."""
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    pages, chars = [], 0
    for number, page in enumerate(reader.pages, 1):
        if number > limits.max_pages:
            return {"too_large": f"more than {limits.max_pages} pages (LORAG_PDF_MAX_PAGES); split the file"}
        text = (page.extract_text() or "").strip()
        chars += len(text) + 2
        if chars > limits.max_chars + 2:
            return {"too_large": f"its text passes {limits.max_chars} characters by page {number} "
                                 "(LORAG_MAX_DOCUMENT_CHARS); split the file"}
        if text:
            pages.append(text)
    # Lone surrogates from a broken font map are the file's, not the caller's: made visible, not refused.
    return {"text": "\n\n".join(pages).encode("utf-8", "replace").decode("utf-8")}


def _child(argv: list[str]) -> int:
    import resource

    limits = PdfLimits(**json.loads(argv[0]))
    data = sys.stdin.buffer.read()
    # Limits go on after start-up, so they bound the parsing alone; the interpreter is already mapped.
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    cpu = math.ceil(limits.timeout_s) + 1  # a backstop: the parent's deadline normally comes first
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    # pypdf logs every repair it attempts on a damaged file; the caller gets one clear error instead.
    logging.disable(logging.CRITICAL)
    try:
        answer = _extract(data, limits)
    except MemoryError:
        answer = {"error": f"it needs more than {limits.memory_bytes >> 20} MiB to parse (LORAG_PDF_MEMORY_MB)"}
    except RecursionError:
        answer = {"error": "its objects are nested too deeply"}
    except Exception as exc:  # anything pypdf raises on a malformed file; the child ends here anyway
        answer = {"error": f"{exc.__class__.__name__}: {exc}"[:500]}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
