"""A real PostgreSQL server on a loopback port, in a temp dir, for the tests that need one.

initdb refuses to run as root, so under root the cluster belongs to the `postgres` system user
(Debian's package makes it) and the server runs as that user. `.ci/postgres` installs the
server where it is missing.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.launcher import free_port

DATABASE = "lorag"


def binary(name: str) -> str:
    """A server program: on the PATH, or where Debian's package keeps it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run .ci/postgres (or apt-get install postgresql)")
    return found


@dataclass
class PostgresServer:
    root: Path
    port: int = field(default_factory=free_port)
    user: str | None = None  # the system user the server runs as; None: this process's
    made: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def database(self, key: str) -> str:
        """The URL of a database of `key`'s own, empty when first asked for."""
        import psycopg

        name = "t_" + hashlib.sha256(key.encode()).hexdigest()[:20]
        if name not in self.made:
            with psycopg.connect(self.url, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {name}")
            self.made.add(name)
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def _run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        command = [*(["runuser", "-u", self.user, "--"] if self.user else []), *argv]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)

    def start(self, timeout: float = 60) -> PostgresServer:
        if os.geteuid() == 0:
            self.user = "postgres"
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        if self.user:
            shutil.chown(self.root, self.user)
        # trust on loopback only: the server listens on 127.0.0.1 and a socket inside root.
        self._run(binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(binary("pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", str(int(timeout)), "start")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run(binary("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", DATABASE)
                return self
            except subprocess.CalledProcessError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            self._run(binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
