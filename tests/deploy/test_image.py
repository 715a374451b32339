"""The container image, read from deploy/Dockerfile (no image is built here): what it runs as."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def test_the_image_runs_as_an_unprivileged_user_that_owns_only_the_data_directory():
    steps = instructions((DEPLOY / "Dockerfile").read_text())
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    final = steps[last_from:]
    users = [args for op, args in final if op == "USER"]
    assert users, "the final stage has no USER: the gateway and vLLM would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that Kubernetes can check runAsNonRoot; 0 and "root" are root.
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0)), users[-1]
    made = next(args for op, args in final if op == "RUN" and "useradd" in args)
    assert f"--uid {uid}" in made
    home = dict(re.findall(r"(\w+)=(\S+)", next(args for op, args in final if op == "ENV" and "LORAG_HOME" in args)))
    assert "LORAG_HOME" in home
    # The data directory is the user's; the code and installed packages (written before) stay root's.
    assert re.search(r"install -d -o \w+ -g \w+ \"?\$\{LORAG_HOME\}", made), made
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert all("user" not in service for service in compose["services"].values())  # no override back to root
