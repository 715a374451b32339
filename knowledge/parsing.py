"""Text out of uploaded files: .txt, .md, .html and .pdf."""

from __future__ import annotations

import re
from pathlib import PurePath

from knowledge.errors import InvalidDocument
from knowledge.pdf_reading import PdfExtractor, PdfFailed, PdfTooLarge

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")

# A text file with more control characters than this share is binary, whatever its name says.
_MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class UnsupportedFile(InvalidDocument):
    """The file's type is not one lorag can read."""


class UnreadableFile(InvalidDocument):
    """The file's bytes are not what its name says (binary garbage, a broken PDF, no text)."""


def extract_text(filename: str, data: bytes, pdfs: PdfExtractor) -> str:
    suffix = PurePath(filename).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFile(
            f"{filename}: unsupported file type {suffix or '(none)'}; send one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if suffix == ".pdf":
        text = _pdf_text(filename, data, pdfs)
    else:
        text = _decode(filename, data)
        if suffix in (".html", ".htm"):
            text = _html_text(text)
    if not text.strip():
        raise UnreadableFile(f"{filename}: no text found in the file")
    return text


def _decode(filename: str, data: bytes) -> str:
    # Judge binary-ness on the bytes first: garbage is rarely valid UTF-8 either, and
    # "binary" is the more useful of the two messages for it.
    if data and len(_CONTROL.findall(data.decode("latin-1"))) > _MAX_CONTROL_SHARE * len(data):
        raise UnreadableFile(f"{filename}: looks like binary data, not text")
    # No text format holds NUL; a file that does is not what its name says.
    if b"\x00" in data:
        raise UnreadableFile(f"{filename}: contains NUL bytes (offset {data.index(0)}), so it is not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(
            f"{filename}: not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8"
        ) from None


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _pdf_text(filename: str, data: bytes, pdfs: PdfExtractor) -> str:
    try:
        text = pdfs.text(data)
    except PdfFailed as exc:
        raise UnreadableFile(f"{filename}: not a readable PDF ({exc})") from None
    except PdfTooLarge as exc:
        raise InvalidDocument(f"{filename}: {exc}") from None
    if not text:
        raise UnreadableFile(f"{filename}: the PDF has no extractable text (a scan needs OCR first)")
    return text
