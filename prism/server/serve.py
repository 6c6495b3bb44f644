"""`prism serve`: workers up, then the HTTP server on the same event loop as the router."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from prism import env
from prism.cluster.config import load_config
from prism.errors import UserError
from prism.server.app import create_app
from prism.server.router import Router


def _ray_launcher(config, address: str):
    try:
        from prism.cluster.ray_link import RayLauncher
    except ImportError as e:
        raise UserError(f"--ray needs Ray: pip install 'prism[ray]' ({e})") from None
    return RayLauncher(config, address or None)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its own shutdown, which would kill the process
    before the workers are stopped; we handle the signals ourselves instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def request_exit(self) -> None:
        self.should_exit = True


def serve(config_path: str, host: str | None = None, port: int | None = None,
          api_key: str | None = None, ray_address: str | None = None) -> int:
    """`ray_address`: None for single-host mode (Ray is never imported); "" or an address to
    run the device workers on a Ray cluster."""
    config = load_config(config_path)
    host = host or config.host
    port = config.port if port is None else port
    api_key = api_key or env.api_key() or config.api_key
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    launcher = None if ray_address is None else _ray_launcher(config, ray_address)
    where = "" if launcher is None else f" on the Ray cluster's nodes {sorted(launcher.nodes())}"
    print(f"prism: starting {len(launcher.devices()) if launcher else len(config.devices)} worker(s){where} "
          f"for {len(config.models)} model(s)...", file=sys.stderr, flush=True)
    router = Router(config, launcher)
    app = create_app(router, api_key=api_key, max_body_bytes=config.max_body_size)

    async def main() -> None:
        await router.start()
        server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_exit)
        print(f"prism: serving {', '.join(router.specs)} on http://{host}:{port}/v1"
              + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
        try:
            await server.serve()  # returns on SIGINT / SIGTERM
        finally:
            router.close()

    try:
        asyncio.run(main())
    finally:
        router.close()  # idempotent: also when the loop died before its own cleanup
    print("prism: stopped", file=sys.stderr, flush=True)
    return 0
