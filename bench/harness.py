"""Shared set-up for the benchmarks: a real service on embedded parts, results as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import safetensors.numpy

from server.app import ModelServiceApp
from server.core.models import Tier
from server.embedded.processes import embedded_mongodb, executable, free_port, ray_head, running_process
from server.settings import GIB, Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def s3_store_settings(work_dir: Path, use_s3: bool) -> Iterator[dict[str, Any]]:
    """With `use_s3`, moto's S3 server as its own process, and the settings that point the
    service's archive store at it; otherwise no settings (the local store)."""
    if not use_s3:
        yield {}
        return
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = free_port()
    command = [executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with running_process(command, port=port, log_path=work_dir / "moto.log"):
        yield {"s3_bucket": "bench-archives", "s3_endpoint_url": f"http://127.0.0.1:{port}"}


@contextlib.asynccontextmanager
async def bench_service(
    work_dir: Path, *, object_store_bytes: int = 3 * GIB, **overrides: Any
) -> AsyncIterator[tuple[ModelServiceApp, str, str]]:
    """The service with embedded MongoDB, a Ray head of its own; yields (app, namespace, key)."""
    with ray_head(work_dir / "ray", object_store_bytes=object_store_bytes, num_cpus=2, env=dict(os.environ)) as ray_address:
        async with embedded_mongodb(work_dir / "mongodb") as mongodb_uri:
            settings = Settings(
                grpc_port=0, mongodb_uri=mongodb_uri, ray_address=ray_address,
                data_dir=work_dir / "service", mongodb_database=f"bench_{uuid.uuid4().hex[:6]}", **overrides,
            )
            async with ModelServiceApp(settings) as app:
                await app.tenancy.create_namespace("bench", Tier.ENTERPRISE)
                key = (await app.tenancy.issue_key(["bench"], label="bench")).key
                yield app, "bench", key


def write_weights(path: Path, total_bytes: int) -> Path:
    """A safetensors file of float32 tensors (64 MiB each) adding up to total_bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    remaining = total_bytes
    index = 0
    while remaining > 0:
        size = min(remaining, 64 * 1024 * 1024)
        tensors[f"layer{index}.weight"] = rng.standard_normal(size // 4, dtype=np.float32)
        remaining -= size
        index += 1
    safetensors.numpy.save_file(tensors, str(path))
    return path


def timed(action: Callable[[], Any], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


@ray.remote(num_cpus=0)
def time_raw_gets(refs: list[Any], repeat: int) -> list[float]:
    """In a Ray worker: the time of a plain `ray.get` of `refs[0]`, `repeat` times (a floor)."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        value = ray.get(refs[0])
        samples.append(time.perf_counter() - started)
        del value
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, **result}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
