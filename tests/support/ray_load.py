"""Keeps part of the test Ray cluster busy, to hold a deployment in its queue on purpose."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import ray


@ray.remote(num_cpus=1)
def _occupy_one_cpu(seconds: float, started_marker: str) -> None:
    Path(started_marker).touch()
    time.sleep(seconds)


async def hold_one_cpu(seconds: float, marker_dir: Path) -> Any:
    """Occupies one CPU for `seconds`; returns (awaitable) once the task really runs."""
    marker = marker_dir / f"cpu-held-{time.monotonic_ns()}"
    ref = _occupy_one_cpu.remote(seconds, str(marker))
    for _ in range(600):
        if marker.exists():
            return ref
        await asyncio.sleep(0.05)
    raise TimeoutError("the CPU-holding task never started")
