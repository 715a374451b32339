"""The `lorag` command line: its client commands start without the serving stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from service.engine.launcher import free_port

# What `lorag serve` needs and a client command does not: seconds of imports (`lorag --help` took 3.5 s).
HEAVY = ("torch", "vllm", "chromadb", "sentence_transformers", "transformers")

# Runs each command line given as a JSON argument in this one interpreter and prints, for each,
# the heavy modules loaded so far.
_PROBE = """
import contextlib, io, json, sys
from service.cli import main
loaded = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    loaded[" ".join(argv)] = sorted(m for m in %r if m in sys.modules)
print(json.dumps(loaded))
""" % (HEAVY,)


def test_help_and_client_commands_import_no_torch_vllm_or_chroma(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # the client commands fail to connect, after their imports
    commands = [
        ["--help"], ["docs", "--help"], ["adapters", "--help"], ["keys", "--help"],
        ["keys", "list"],
        ["docs", "--url", closed, "search", "pier", "--collection", "handbook"],
        ["docs", "--url", closed, "push", str(tmp_path), "--collection", "handbook"],
        ["adapters", "--url", closed, "list"],
    ]
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "LORAG_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded == {" ".join(argv): [] for argv in commands}, loaded
