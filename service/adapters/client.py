"""`lorag adapters ...`: the adapter API from the command line, against a running service."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx

from service.adapters.archive import ALLOWED_FILES


class AdapterCommandFailed(Exception):
    """The service refused a command; the message is its error message."""


def pack_folder(folder: Path) -> bytes:
    """A tar.gz of the adapter files in `folder` (other files, like peft's README.md, are left out)."""
    if not folder.is_dir():
        raise AdapterCommandFailed(f"{folder} is not a folder")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            if path.name in ALLOWED_FILES and path.is_file():
                archive.add(path, path.name)
    return buf.getvalue()


class AdaptersClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)

    def push(self, folder: Path, name: str, activate: bool, rag: dict | None = None) -> dict:
        """Upload a version; with `activate`, activate it, and with `rag` also set the adapter's retrieval
        defaults. Then activation is a second call: the upload is multipart, and the activation sets the
        version and the defaults in one change (an unknown collection leaves the version registered and
        inactive, nothing served changed)."""
        if rag is not None and not activate:
            raise AdapterCommandFailed("retrieval defaults are set at activation: add --activate")
        response = self._http.post(
            f"/v1/adapters/{name}/versions",
            params={"activate": "true"} if activate and rag is None else None,
            files={"file": (f"{name}.tar.gz", pack_folder(folder), "application/gzip")},
        )
        result = self._body(response)
        if rag is not None:
            result["activation"] = self.activate(name, result["version"]["version"], rag)
        return result

    def list(self) -> list[dict]:
        return self._body(self._http.get("/v1/adapters"))["data"]

    def activate(self, name: str, version: str, rag: dict | None = None) -> dict:
        body = {"version": version, **({"rag": rag} if rag is not None else {})}
        return self._body(self._http.post(f"/v1/adapters/{name}/activate", json=body))

    def rollback(self, name: str) -> dict:
        return self._body(self._http.post(f"/v1/adapters/{name}/rollback"))

    def delete(self, name: str, version: str | None) -> dict:
        path = f"/v1/adapters/{name}" + (f"/versions/{version}" if version else "")
        return self._body(self._http.delete(path))

    @staticmethod
    def _body(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error") or {}
            code = f" ({error['code']})" if error.get("code") else ""
            raise AdapterCommandFailed(f"{response.status_code}{code}: {error.get('message') or response.text[:300]}")
        return body


def describe(adapters: list[dict]) -> str:
    """One line per version: name@version, active mark, rank, where it is loaded, its stored evals."""
    lines = []
    for adapter in adapters:
        for v in adapter["versions"]:
            mark = "*" if v["active"] else " "
            engines = ",".join(name for name, loaded in v["engines"].items() if loaded) or "-"
            evals = " ".join(f"{e['suite']}:{'passed' if e['passed'] else 'FAILED'}" for e in v.get("evals") or [])
            line = f"{mark} {v['served_name']:40} rank {v['rank']:<3} loaded on {engines}"
            lines.append(f"{line}  evals {evals}" if evals else line)
    return "\n".join(lines) or "no adapters"
