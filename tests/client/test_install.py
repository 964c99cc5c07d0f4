"""`pip install ./client` in a fresh virtual environment pulls only httpx and pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"torch", "transformers", "fastapi", "uvicorn", "stepcredit", "numpy", "math-verify", "trl", "verl"}


def test_client_installs_alone_without_torch_or_any_server_dependency(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(ROOT / "client")], check=True)
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "stepcredit-client" in installed and {"httpx", "pydantic"} <= installed
    assert not installed & FORBIDDEN, installed & FORBIDDEN
    # The client and the trainer-free adapters import with nothing else present.
    code = (
        "import stepcredit_client, stepcredit_client.adapters.trl, stepcredit_client.adapters.verl, "
        "stepcredit_client.adapters.openrlhf, stepcredit_client.adapters.slime; print(len(stepcredit_client.__all__))"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert int(out.stdout) > 20
