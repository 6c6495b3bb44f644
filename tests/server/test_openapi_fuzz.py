"""A bounded schemathesis run against a real server's /openapi.json: whatever a schema-driven
fuzzer sends (valid bodies, wrong types, missing fields, odd methods), no answer is a 5xx."""
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import running_server

API_KEY = "fuzz-key"
CONFIG = f"""
devices:
  - device: cpu
    memory: 512MiB
    page_size: 256KiB
models:
  - name: tiny
    source: tiny-llama:random
    max_model_len: 64  # a body without max_tokens generates up to the context: keep it short
server:
  api_key: {API_KEY}
  request_timeout_s: 30
"""


def _schemathesis() -> list[str]:
    found = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(found).exists():
        pytest.skip("schemathesis is not installed (it is in the test extra)")
    return [found]


def test_no_server_error_under_fuzzing(tmp_path):
    with running_server(tmp_path, CONFIG) as (proc, base):
        schema = httpx.get(f"{base}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["tiny"]
        run = subprocess.run(
            [*_schemathesis(), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
             "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "7",
             "--request-timeout", "60", "--generation-database", "none", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        summary = run.stdout[-3000:]
        assert run.returncode == 0, summary + run.stderr[-2000:]
        assert " passed" in summary and "failed" not in summary.lower().split("summary")[-1], summary
        assert proc.poll() is None  # still serving after it
        assert httpx.get(f"{base}/health").status_code == 200
