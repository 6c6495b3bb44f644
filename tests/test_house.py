"""The house's rules that no linter sees: the frontend process never imports torch, and the
CLI tells a user's error (one line, exit 2) from a bug (a crash report, exit 1)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from prism.cli import run_parsed
from prism.config import ConfigError
from prism.errors import PrismError, UserError
from prism.types import RequestError

FRONTEND = ["prism.server.app", "prism.server.router", "prism.server.serve", "prism.cluster.config",
            "prism.cluster.control", "prism.cluster.worker_link", "prism.cluster.systems"]


def test_the_frontend_and_cluster_layer_import_no_torch():
    code = "import sys; " + "; ".join(f"import {m}" for m in FRONTEND) + "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_user_errors_share_one_root():
    for cls in (ConfigError, RequestError):
        assert issubclass(cls, UserError) and issubclass(cls, PrismError)


def _raise(exc: BaseException):
    def run(_args):
        raise exc
    return argparse.Namespace(func=run)


def test_cli_user_error_is_one_line(capsys):
    assert run_parsed(_raise(ConfigError("models.0.source: no such model\nmore detail"))) == 2
    err = capsys.readouterr().err
    assert err == "prism: error: models.0.source: no such model\n"


def test_cli_bug_is_a_crash_report(capsys):
    assert run_parsed(_raise(KeyError("oops"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "internal error" in err
