"""The service as a separate process (`python -m server`), for restart and kill tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.embedded.processes import free_port, stop_process
from server.settings import Settings


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    address: str
    api_key: str
    namespace_id: str = "dev"

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as when a machine dies."""
        self.process.kill()
        self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: the graceful path. Returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        stop_process(self.process)


def service_environment(settings: Settings, data_dir: Path, ray_address: str) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        MODELSERVICE_GRPC_PORT=str(free_port()),
        MODELSERVICE_MONGODB_URI=settings.mongodb_uri,
        MODELSERVICE_MONGODB_DATABASE=settings.mongodb_database,
        MODELSERVICE_S3_BUCKET=settings.s3_bucket,
        MODELSERVICE_S3_ENDPOINT_URL=settings.s3_endpoint_url,
        MODELSERVICE_RAY_ADDRESS=ray_address,
        MODELSERVICE_DATA_DIR=str(data_dir),
        MODELSERVICE_WATCH_POLL_SECONDS="0.05",
        MODELSERVICE_SHUTDOWN_GRACE_SECONDS="8",
        MODELSERVICE_REST_GATEWAY="false",  # gRPC is all these tests use
        MODELSERVICE_METRICS_PORT="0",
        # Off unless a test is about it: loads nobody asked for would race other tests' checks.
        MODELSERVICE_AUTO_REDEPLOY="false",
    )
    return environment


def start_service(environment: dict[str, str], log_path: Path, timeout: float = 90) -> ServiceProcess:
    """Starts `python -m server` and waits until its health check answers SERVING."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server"], env=environment, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    address = f"127.0.0.1:{environment['MODELSERVICE_GRPC_PORT']}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack the generated methods
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode}; see {log_path}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        else:
            stop_process(process)
            raise TimeoutError(f"the service did not become healthy in {timeout}s; see {log_path}")
    key = (Path(environment["MODELSERVICE_DATA_DIR"]) / "dev-api-key").read_text().strip()
    return ServiceProcess(process=process, address=address, api_key=key)
