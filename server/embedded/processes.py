"""Child processes with an owner: started on a free loopback port, always stopped.

Each helper returns an async context manager; leaving it terminates the process group
(SIGTERM, then SIGKILL after a grace period), so no server outlives its owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port free right now (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_if_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on `port` now (SO_REUSEADDR, as servers bind: the
    connections of a previous run lingering in TIME_WAIT do not make it busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def sticky_port(port_file: Path, host: str = LOOPBACK) -> int:
    """The port recorded in `port_file` if it is free again, else a new free one (recorded).

    Embedded servers come back on the same port across restarts, so their addresses stay
    valid for everything that outlives the service (the Ray model cache, admin tools).
    """
    with contextlib.suppress(OSError, ValueError):
        previous = int(port_file.read_text().strip())
        if 0 < previous < 65536 and port_if_free(previous, host):
            return previous
    port = free_port(host)
    port_file.write_text(f"{port}\n")
    return port


def executable(name: str) -> str:
    """A console script of this environment (beside the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install -e '.[dev]')")
    return found


@dataclass(frozen=True)
class RunningProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path


def _wait_for_port(process: subprocess.Popen[bytes], host: str, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{process.args!r} did not listen on {host}:{port} within {timeout}s; see {log}")


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM if its parent dies, so
    an owned server never outlives an owner that was SIGKILLed (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_process(process: subprocess.Popen[Any], grace_seconds: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_process(
    command: Sequence[str],
    *,
    port: int,
    log_path: Path,
    host: str = LOOPBACK,
    env: dict[str, str] | None = None,
    startup_timeout: float = 30.0,
    cwd: Path | None = None,
) -> Iterator[RunningProcess]:
    """Starts `command` in its own process group and waits until it listens on `port`.

    The process belongs to the caller: it is stopped when the context ends, and the kernel
    stops it if the caller dies without cleaning up.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        _wait_for_port(process, host, port, startup_timeout, log_path)
        logger.info("started %s on %s:%d (log %s)", Path(command[0]).name, host, port, log_path)
        yield RunningProcess(process=process, host=host, port=port, log_path=log_path)
    finally:
        stop_process(process)


@contextlib.asynccontextmanager
async def embedded_mongodb(data_dir: Path) -> AsyncIterator[str]:
    """Runs nx-27017 (MongoDB wire protocol over SQLite) and yields its mongodb:// URI.

    Its data stays in `data_dir`, so models and keys survive a restart of the service.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = sticky_port(data_dir / "port")
    command = [
        executable("nx-27017"),
        "--host", LOOPBACK,
        "--port", str(port),
        "--data-dir", str(data_dir),
        "--log-file", str(data_dir / "nx-27017.log"),
        "--pid-file", str(data_dir / "nx-27017.pid"),
    ]
    uri_file = data_dir / "uri"  # how `server.admin` finds the running embedded server
    with running_process(command, port=port, log_path=data_dir / "nx-27017.out") as running:
        # directConnection: a single server, no replica-set discovery.
        uri = f"mongodb://{running.host}:{running.port}/?directConnection=true"
        uri_file.write_text(uri + "\n")
        try:
            yield uri
        finally:
            uri_file.unlink(missing_ok=True)


def ray_head_command(port: int, *, object_store_bytes: int, num_cpus: int) -> list[str]:
    """`ray start --head` on loopback, every port chosen free so several heads can coexist."""
    command = [
        executable("ray"), "start", "--head", "--block",
        "--node-ip-address", LOOPBACK,
        f"--port={port}",
        f"--object-store-memory={object_store_bytes}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    for option in (
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
    ):
        command.append(f"{option}={free_port()}")
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    return command


@contextlib.contextmanager
def ray_head(
    log_dir: Path, *, object_store_bytes: int, num_cpus: int = 0, env: dict[str, str] | None = None, port: int = 0
) -> Iterator[str]:
    """A local Ray head owned by the caller (tests): stopped when the context ends."""
    port = port or free_port()
    command = ray_head_command(port, object_store_bytes=object_store_bytes, num_cpus=num_cpus)
    with running_process(
        command, port=port, log_path=log_dir / "ray-head.log", env=env, startup_timeout=90,
        cwd=empty_working_directory(log_dir),
    ):
        yield f"{LOOPBACK}:{port}"


@contextlib.contextmanager
def ray_worker_node(
    head_address: str, log_dir: Path, *, object_store_bytes: int, num_cpus: int, resources: dict[str, float],
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """One more Ray node on this machine, joined to the head at `head_address` (tests of
    placement): its own raylet and object store, stopped when the context ends.

    Yields the port of its node manager; `resources` lets callers schedule onto it.
    """
    import json

    node_manager_port = free_port()
    command = [
        executable("ray"), "start", "--block", f"--address={head_address}",
        "--node-ip-address", LOOPBACK,
        f"--object-store-memory={object_store_bytes}", f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources)}", "--disable-usage-stats",
        f"--node-manager-port={node_manager_port}",
    ]
    for option in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port", "--object-manager-port",
    ):
        command.append(f"{option}={free_port()}")
    with running_process(
        command, port=node_manager_port, log_path=log_dir / "ray-worker-node.log", env=env, startup_timeout=90,
        cwd=empty_working_directory(log_dir),
    ):
        yield str(node_manager_port)


def empty_working_directory(parent: Path) -> Path:
    """Where Ray processes start: Ray workers inherit it, and it must hold nothing (a
    relative path resolved by a library in a load task finds no file of the service)."""
    directory = parent / "workers-cwd"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def ensure_ray_head(data_dir: Path, *, object_store_bytes: int, num_cpus: int = 0) -> str:
    """The embedded default's Ray head: reused if running, else started and left running.

    The head is deliberately NOT a child the service stops: the cached weights live in it,
    and they must survive a restart of the service. `ray stop` ends it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    address_file = data_dir / "address"
    if address_file.exists():
        address = address_file.read_text().strip()
        host, _, port_text = address.rpartition(":")
        with contextlib.suppress(OSError, ValueError), socket.create_connection((host, int(port_text)), timeout=1):
            logger.info("reusing the local Ray head at %s", address)
            return address
    port = free_port()
    command = ray_head_command(port, object_store_bytes=object_store_bytes, num_cpus=num_cpus)
    log_path = data_dir / "ray-head.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=empty_working_directory(data_dir),
        )
    _wait_for_port(process, LOOPBACK, port, 90, log_path)
    address = f"{LOOPBACK}:{port}"
    address_file.write_text(address + "\n")
    logger.info("started a local Ray head at %s (it outlives the service; `ray stop` ends it)", address)
    return address
