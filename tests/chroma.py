"""A real `chroma run` server on a loopback port, for tests that need one they can stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import chromadb
from chromadb.config import Settings as ChromaSettings

from service.engine.launcher import free_port


@dataclass
class ChromaServer:
    root: Path  # data and log live here, so a restart on the same root finds the same data
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ChromaServer:
        self.root.mkdir(parents=True, exist_ok=True)
        chroma = Path(sys.executable).with_name("chroma")
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(chroma), "run", "--path", str(self.root / "data"), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = chromadb.HttpClient(
                    host="127.0.0.1", port=self.port, settings=ChromaSettings(anonymized_telemetry=False)
                )
                client.heartbeat()
                client.close()
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"chroma run did not start:\n{(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
