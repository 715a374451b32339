"""A real `lorag serve` process for tests: start it, wait for readiness, stop it, find its engine."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from service.engine.guard import KEY_VARIABLE
from service.engine.launcher import free_port


def engine_children(pid: int) -> list[psutil.Process]:
    """The vLLM API-server processes lorag started (direct children running vLLM's entrypoint)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def live_group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


@dataclass
class Gateway:
    model: Path
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / f"gateway-{self.port}.log"

    def start(self) -> Gateway:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "LORAG_HOME": str(self.home),
            "LORAG_MODEL": str(self.model),
            "LORAG_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until /readyz answered 200; fails with the log tail if it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"lorag exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"lorag not ready within {timeout} s:\n{self.log_tail()}")

    def wait_up(self, timeout: float = 120) -> None:
        """Until /healthz answers (the process serves; its engine may not be ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError(self.log_tail())

    def engine(self) -> psutil.Process:
        children = engine_children(self.proc.pid)
        assert len(children) == 1, f"expected one engine process, found {children}"
        return children[0]

    def engine_url(self) -> str:
        port = re.search(r"--port (\d+)", " ".join(self.engine().cmdline())).group(1)
        return f"http://127.0.0.1:{port}"

    def engine_key(self) -> str:
        """The key lorag made for its engine at start: in the engine's environment, which only its
        own user can read (argv is everyone's)."""
        return self.engine().environ()[KEY_VARIABLE]

    def engine_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.engine_key()}"}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, list[psutil.Process]]:
        """Signal lorag, wait for it to exit; returns its exit code and any engine process left behind."""
        groups = [child.pid for child in engine_children(self.proc.pid)]
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"lorag did not exit within {timeout} s of signal {sig}:\n{self.log_tail()}")
        left = [p for pgid in groups for p in live_group_members(pgid)]
        return code, left

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def knowledge_gateway(home: Path, chroma_url: str | None = None, env: dict[str, str] | None = None) -> Gateway:
    """A gateway for the knowledge API alone: external mode at a closed port, so no vLLM starts
    and the process is up in seconds."""
    env = {"LORAG_ENGINE_URLS": f"http://127.0.0.1:{free_port()}", **(env or {})}
    if chroma_url:
        env["LORAG_CHROMA_URL"] = chroma_url
    return Gateway(home.parent / "no-model", home, env=env)


@dataclass
class Replica:
    """A bare vLLM server, started the way the gateway starts its own: an engine for external mode."""

    model: Path
    name: str
    key: str = field(default_factory=secrets.token_urlsafe)  # the gateway's LORAG_ENGINE_API_KEY
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def start(self, log_dir: Path) -> Replica:
        from service.engine.launcher import launch_spec
        from service.settings import Settings

        settings = Settings(model=self.model, model_name=self.name, engine_max_model_len=1024)
        spec = launch_spec(settings, self.key, self.port)
        log = (log_dir / f"replica-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica on port {self.port} exited with {self.proc.returncode}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"replica on port {self.port} not ready within {timeout} s")

    def adapters(self) -> set[str]:
        models = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10).json()["data"]
        return {m["id"] for m in models if m.get("parent")}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the replica's whole process group (its EngineCore too) and wait for it."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for member in live_group_members(self.proc.pid):
            member.kill()
