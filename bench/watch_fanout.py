"""Many watchers of one deployment: how late do events reach them, and what does it cost?

    python -m bench.watch_fanout [--watchers 1000] [--mib 1024]

One service replica (embedded MongoDB, a Ray head of its own, 2 CPUs). For each watcher
count (1, the baseline, then `--watchers`): upload a `--mib` safetensors model that needs
both CPUs, start its deploy without waiting while a gate actor holds the CPUs (the deploy
stays queued), and open that many gRPC WatchDeployment streams from a separate process
(so the watchers' own work does not share the service's event loop). Once every stream
is open, the gate goes and the load runs.
Each watcher notes when each event arrives; the delay of an event is its arrival minus the
time the cache recorded it. Reports, per count: whether every watcher got every event, the
terminal event's delay p50/p99 over the watchers, the MongoDB reads made to open the
streams (authorization and the task, once per stream) and the reads per second while
they all followed the deployment (counted with pymongo's command monitoring). Writes
bench/results/watch_fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from pymongo import monitoring

from bench.harness import bench_service, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient, UploadFields
from server.settings import GIB

MIB = 1024 * 1024


@ray.remote
class _Gate:
    """Holds the cluster's CPUs while it lives: a deploy queued behind it waits."""

    def ready(self) -> bool:
        return True


class ReadCounter(monitoring.CommandListener):
    """Counts the service's MongoDB reads (find commands) from the moment it is reset."""

    def __init__(self) -> None:
        self.reads = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("find", "aggregate", "getMore"):
            self.reads += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _watch_in_a_process(address: str, key: str, ns: str, model_id: str, task_id: str, watchers: int, results: Any) -> None:
    """Runs in a child process: `watchers` streams; sends back (events seen, terminal delay) each."""

    joined = 0

    async def one(client: ModelServiceClient) -> tuple[list[int], float]:
        nonlocal joined
        sequences: list[int] = []
        delay = float("nan")
        async for event in client.watch_deployment(ns, model_id, task_id=task_id):
            if event.state == "heartbeat":
                continue
            if not sequences:
                joined += 1
                if joined == watchers:
                    results.put("joined")  # every stream is open and has the current state
            sequences.append(event.sequence)
            if event.terminal:
                delay = time.time() - event.time.ToDatetime(tzinfo=datetime.timezone.utc).timestamp()
        return sequences, delay

    async def main() -> list[tuple[list[int], float]]:
        async with ModelServiceClient(address, key) as client:
            return list(await asyncio.gather(*(one(client) for _ in range(watchers))))

    results.put(asyncio.run(main()))


async def _one_round(app: Any, ns: str, key: str, archive: Path, watchers: int, counter: ReadCounter, name: str) -> dict[str, Any]:
    async with ModelServiceClient(app.address, key) as client:
        uploaded = await client.upload_file(
            archive,
            UploadFields(namespace_id=ns, name=name, version="1", model_format="safetensors", memory_gb=0.5, num_cpus=2),
        )
        gate: Any = _Gate.options(num_cpus=2).remote()  # type: ignore[attr-defined]
        await gate.ready.remote()
        deploy = await client.deploy_model(ns, uploaded.model_id, wait=False)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        watcher = context.Process(
            target=_watch_in_a_process,
            args=(app.address, key, ns, uploaded.model_id, deploy.task_id, watchers, results),
        )
        counter.reads = 0
        watcher.start()
        first = await asyncio.to_thread(results.get)
        joining_reads = counter.reads  # authorization and the task, once per stream
        ray.kill(gate)  # the load starts now
        counter.reads = 0
        started = time.monotonic()
        seen: list[tuple[list[int], float]] = first if first != "joined" else await asyncio.to_thread(results.get)
        seconds = time.monotonic() - started
        watcher.join()
        reads = counter.reads
        await client.undeploy_model(ns, uploaded.model_id)
    last = max(sequences[-1] for sequences, _ in seen)
    delays = np.asarray([delay for _, delay in seen])
    return {
        "watchers": watchers,
        # A watcher starts at the state current when it joined, then gets every later event.
        "every_watcher_got_every_later_event": all(
            sequences == list(range(sequences[0], last + 1)) for sequences, _ in seen
        ),
        "terminal_delay_p50_ms": round(float(np.percentile(delays, 50)) * 1000, 1),
        "terminal_delay_p99_ms": round(float(np.percentile(delays, 99)) * 1000, 1),
        "mongodb_reads_to_open_the_streams": joining_reads,
        "seconds_followed_after_all_joined": round(seconds, 2),
        "mongodb_reads_while_following": reads,
        "mongodb_reads_per_second_while_following": round(reads / seconds, 1) if seconds else 0.0,
    }


async def main(watchers: int, mib: int) -> None:
    counter = ReadCounter()
    monitoring.register(counter)  # before the service creates its MongoDB client
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        weights = write_weights(work_dir / "m" / "model.safetensors", mib * MIB)
        archive = work_dir / "model.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(weights, arcname="model/model.safetensors")
        weights.unlink()
        async with bench_service(work_dir, object_store_bytes=max(GIB, 3 * mib * MIB)) as (app, ns, key):
            baseline = await _one_round(app, ns, key, archive, 1, counter, "baseline")
            fanout = await _one_round(app, ns, key, archive, watchers, counter, "fanout")
    write_result("watch_fanout", {
        "model_mib": mib,
        "baseline": baseline,
        "fanout": fanout,
        "reads_per_second_ratio_to_one_watcher": round(
            fanout["mongodb_reads_per_second_while_following"]
            / max(baseline["mongodb_reads_per_second_while_following"], 0.1), 2
        ),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=1024)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.watchers, arguments.mib))
