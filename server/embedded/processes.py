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

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port free right now (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
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


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 10.0) -> None:
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
) -> Iterator[RunningProcess]:
    """Starts `command` in its own process group and waits until it listens on `port`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
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
    port = free_port()
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
