"""Deploy time (by stage) and plugin load time for models of several sizes, with floors.

    python -m bench.deploy_and_load [--mib 100 1024] [--compression "" gz] [--s3]

For each size and archive compression (a safetensors `.tar`, and the seed's `.tar.gz`):
upload, time DeployModel (download, verify, decode, put into the object store) and each of
its stages (from the deployment's events), then time `load_namespace_model` inside a Ray
task (median of several repeat calls). Floors in the same run: sha256 of the `.tar` plus
`ray.put` of the same numpy arrays from the driver (what a deploy cannot avoid), and a raw
`ray.get` of that put from a Ray task. Each archive is deployed `--deploys` times
(undeployed between) and the medians are reported. With --s3 the archives live in moto's
S3 server (its own process) and deploys stream them; otherwise in the local store, which
deploys map. Writes bench/results/deploy_and_load.json (or deploy_and_load_s3.json).
"""

from __future__ import annotations

import argparse
import gc
import asyncio
import hashlib
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import safetensors.numpy

from pymongo import AsyncMongoClient

from bench.harness import bench_service, s3_store_settings, time_raw_gets, timed, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient, UploadFields
from modelservice_sdk.loader import load_namespace_model
from server.persistence.deployments import DeploymentRepository
from server.persistence.mongo import database

MIB = 1024 * 1024


@ray.remote(num_cpus=0)
def _time_plugin_loads(model_id: str, repeat: int) -> dict[str, list[float]]:
    """Repeat calls in one Ray worker: while the plugin holds the model (the usual case),
    and after letting go of it each time (then each call asks the cache again)."""
    held, released = [], []
    model = load_namespace_model(model_id)  # the first call of this worker: not counted
    for _ in range(repeat):
        started = time.perf_counter()
        model = load_namespace_model(model_id)
        held.append(time.perf_counter() - started)
    assert all(not a.flags.writeable for a in model.tensors.values())
    del model
    for _ in range(repeat):
        gc.collect()  # the model may sit in a reference cycle: really let go of it
        started = time.perf_counter()
        model = load_namespace_model(model_id)
        released.append(time.perf_counter() - started)
        del model
    return {"held": held, "released": released}



def _read_stored(app: Any, namespace: str, model_id: str) -> None:
    """Reads the stored archive the way a load task does (the archive store's own speed)."""
    from server.deploy.extraction import read_archive
    from server.deploy.specs import StoreConfig

    for _ in read_archive(StoreConfig.from_settings(app.settings), f"{namespace}/{model_id}/archive"):
        pass


def _stage_seconds(events: list[Any]) -> dict[str, float]:
    """Seconds spent in each state, from its first event to the next state's first."""
    starts: dict[str, float] = {}
    for event in events:
        starts.setdefault(event.state, event.time.timestamp())
    ordered = list(starts.items())
    return {state: round(following - at, 3) for (state, at), (_, following) in zip(ordered, ordered[1:])}


async def main(sizes: list[int], compressions: list[str], repeat: int, deploys: int, use_s3: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="modelservice-bench-") as scratch:
        work = Path(scratch)
        with s3_store_settings(work, use_s3) as store_settings:
            async with bench_service(work, **store_settings) as (app, namespace, key):
                results = await _measure(app, namespace, key, work, sizes, compressions, repeat, deploys)
    write_result(
        "deploy_and_load_s3" if use_s3 else "deploy_and_load",
        {"store": "moto S3 server" if use_s3 else "local directory", "repeat": repeat, "runs": results, "np_version": np.__version__},
    )


async def _measure(
    app: Any, namespace: str, key: str, work: Path, sizes: list[int], compressions: list[str], repeat: int, deploys: int
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    mongo: Any = AsyncMongoClient(app.mongodb_uri, tz_aware=True)
    deployments = DeploymentRepository(database(mongo, app.settings.mongodb_database))
    environment = {"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}}
    async with ModelServiceClient(app.address, key) as client:
        for size_mib in sizes:
            weights = write_weights(work / f"m{size_mib}" / "model.safetensors", size_mib * MIB)
            arrays = safetensors.numpy.load_file(str(weights))
            # Floors first: the puts also touch the object store's pages once, which
            # every deploy after the first would otherwise get for free.
            put_seconds = statistics.median(timed(lambda: ray.put(arrays), 3))
            tar_seconds = 0.0
            for compression in compressions:
                archive = work / f"m{size_mib}.tar{'.' + compression if compression else ''}"
                with tarfile.open(archive, "w:gz" if compression == "gz" else "w") as tar:
                    tar.add(weights, arcname="model/model.safetensors")
                name = f"m{size_mib}{compression}"
                uploaded = await client.upload_file(archive, UploadFields(namespace, name, "1", "safetensors", memory_gb=0.5))
                deploy_times: list[float] = []
                stage_times: list[dict[str, float]] = []
                for attempt in range(deploys):
                    if attempt:
                        await client.undeploy_model(namespace, uploaded.model_id)
                    started = time.perf_counter()
                    deployed = await client.deploy_model(namespace, uploaded.model_id)
                    deploy_times.append(time.perf_counter() - started)
                    assert deployed.deployment_status == "deployed", deployed.message
                    stage_times.append(_stage_seconds(await deployments.events_after(deployed.task_id, 0)))
                deploy_seconds = statistics.median(deploy_times)
                loads = await _time_plugin_loads.options(runtime_env=environment).remote(uploaded.model_id, repeat)
                hash_seconds = statistics.median(timed(lambda: hashlib.file_digest(archive.open("rb"), "sha256"), 3))
                read_seconds = statistics.median(timed(lambda: _read_stored(app, namespace, uploaded.model_id), 2))
                baseline_ref = ray.put(arrays)
                raw_gets = await time_raw_gets.remote([baseline_ref], repeat)
                del baseline_ref
                await client.undeploy_model(namespace, uploaded.model_id)
                tar_seconds = tar_seconds or deploy_seconds
                load_median = statistics.median(loads["held"])
                released_median = statistics.median(loads["released"])
                raw_get = statistics.median(raw_gets[1:] or raw_gets)
                results.append({
                    "model_mib": size_mib,
                    "archive": archive.name.split(".", 1)[1],
                    "deploy_seconds": round(deploy_seconds, 3),
                    "deploys": deploys,
                    "deploy_seconds_all": [round(t, 3) for t in deploy_times],
                    "stage_seconds_median": {
                        stage: round(statistics.median(times[stage] for times in stage_times), 3)
                        for stage in stage_times[0]
                    },
                    "floor_sha256_seconds": round(hash_seconds, 3),
                    "floor_ray_put_seconds": round(put_seconds, 3),
                    "deploy_vs_floor_ratio": round(deploy_seconds / (hash_seconds + put_seconds), 2),
                    "store_read_seconds": round(read_seconds, 3),
                    "deploy_vs_floor_with_store_read_ratio": round(
                        deploy_seconds / (max(hash_seconds, read_seconds) + put_seconds), 2
                    ),
                    "deploy_vs_tar_ratio": round(deploy_seconds / tar_seconds, 2),
                    "repeat_load_held_seconds_median": round(load_median, 6),
                    "repeat_load_released_seconds_median": round(released_median, 6),
                    "raw_get_seconds_median": round(raw_get, 6),
                    "held_load_vs_raw_get_ratio": round(load_median / raw_get, 3),
                    "released_load_vs_raw_get_ratio": round(released_median / raw_get, 2),
                })
                archive.unlink()
            del arrays
            weights.unlink()
    await mongo.close()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--compression", nargs="+", default=["", "gz"], help='"" for .tar, gz for .tar.gz')
    parser.add_argument("--repeat", type=int, default=7, help="plugin loads timed per model")
    parser.add_argument("--deploys", type=int, default=3, help="deploys timed per archive (median)")
    parser.add_argument("--s3", action="store_true", help="archives in moto's S3 server instead of a directory")
    options = parser.parse_args()
    asyncio.run(main(options.mib, options.compression, options.repeat, options.deploys, options.s3))
