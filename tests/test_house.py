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


def test_the_ray_link_imports_no_torch():
    code = "import sys; import prism.cluster.ray_link; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_single_host_mode_never_imports_ray():
    """A router with a live worker (what `prism serve` without --ray runs) loads no Ray."""
    code = ("import asyncio, sys; from prism.cluster.config import parse_config; from prism.server.router import Router; "
            "r = Router(parse_config({'devices': [{'device': 'cpu', 'memory': '256MiB', 'page_size': '256KiB'}], "
            "'models': [{'name': 'm', 'source': 'tiny-llama:random'}]})); "
            "asyncio.run(r.start()); print(sorted(r.links), [m.name for m in r.links['cpu'].ready.models]); r.close(); "
            "print('ray' in sys.modules, any(k.startswith('ray.') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['cpu'] ['m']", "False False"], out.stdout


def test_the_frontend_loads_a_tokenizer_without_torch():
    # The router loads a tokenizer per model; a GGUF's is exported by a child process.
    code = ("import sys; import prism.server.router; from prism.engine.catalog import resolve_model; "
            "from prism.engine.tokenizer import load_tokenizer; "
            "load_tokenizer(resolve_model('smollm2-135m').tokenizer_path); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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


def _imports(path, module: str, package: str) -> set[str]:
    """The prism modules `module` imports, at any level of its code (lazy imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + [node.module] if node.module else base) if node.level else node.module
            found.update(f"{target}.{a.name}" for a in node.names)
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m and m.startswith("prism")}


def test_no_import_cycle():
    import graphlib
    from pathlib import Path

    import prism

    root = Path(prism.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, name, package) if m in modules and m != name}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert set(order) == set(graph) and len(graph) > 100  # every module was read and ordered
