"""Runs modelservice: `python -m server` (or `modelservice-server`).

With no `MODELSERVICE_*` addresses set, everything runs embedded on this machine: MongoDB
(nx-27017), a local archive directory, a local Ray head. On first start it creates a
development namespace (`dev`, enterprise tier) and an API key, and prints both.
SIGTERM or Ctrl-C: health turns NOT_SERVING, in-flight RPCs drain, then everything stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from server.app import ModelServiceApp
from server.core.models import Tier
from server.embedded.envoy import envoy_proxy, wait_until_routing
from server.errors import NamespaceAlreadyExists, Unauthenticated
from server.settings import Settings

logger = logging.getLogger("server")

DEV_NAMESPACE = "dev"
DEV_KEY_FILE = "dev-api-key"


async def bootstrap_dev_tenant(app: ModelServiceApp) -> str:
    """Ensures the `dev` namespace exists and returns a working API key for it.

    The key is kept in `<data_dir>/dev-api-key` (mode 0600) so restarts reuse it; the
    database holds only its hash.
    """
    try:
        await app.tenancy.create_namespace(DEV_NAMESPACE, Tier.ENTERPRISE)
    except NamespaceAlreadyExists:
        pass
    key_file = app.settings.data_dir / DEV_KEY_FILE
    if key_file.exists():
        key = key_file.read_text().strip()
        try:
            await app.tenancy.authenticate(key)
            return key
        except Unauthenticated:
            logger.info("the saved development key was revoked; issuing a new one")
    issued = await app.tenancy.issue_key([DEV_NAMESPACE], label="development")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(issued.key + "\n")
    return issued.key


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with ModelServiceApp(settings) as app, contextlib.AsyncExitStack() as gateway_stack:
        # Installed after the app started, on purpose: connecting to Ray installs a native
        # SIGTERM handler that aborts the process 3 s after the signal, which would cut the
        # drain short. These handlers replace it.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        key = await bootstrap_dev_tenant(app)
        rest = "disabled (MODELSERVICE_REST_GATEWAY=false)"
        if settings.rest_gateway:
            gateway = gateway_stack.enter_context(
                envoy_proxy(
                    settings.data_dir / "envoy",
                    backend_host="127.0.0.1" if settings.grpc_host in ("0.0.0.0", "::") else settings.grpc_host,
                    backend_port=app.port,
                    listen_port=settings.http_port,
                    listen_host=settings.http_host,
                )
            )
            # "ready" means a request sent now is served: wait for Envoy's first health
            # check of the service to pass.
            await wait_until_routing(gateway)
            rest = f"{gateway.base_url}  (Envoy: REST and gRPC on one port)"
        metrics = (
            f"http://{settings.metrics_host}:{app.metrics_port}/metrics" if settings.metrics_port >= 0 else "disabled"
        )
        print(
            "\nmodelservice is ready\n"
            f"  REST:       {rest}\n"
            f"  gRPC:       {app.address}  (reflection on: grpcurl -plaintext {app.address} list)\n"
            f"  MongoDB:    {app.mongodb_uri}\n"
            f"  metrics:    {metrics}\n"
            f"  namespace:  {DEV_NAMESPACE}\n"
            f"  API key:    {key}\n",
            flush=True,
        )
        await stop.wait()
        logger.info("shutting down: draining in-flight requests")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Settings.from_env()))


if __name__ == "__main__":
    main()
