"""The model cache under a skewed load: models adding up to 3x its budget, Zipf accesses.

    python -m bench.cache_eviction [--models 24] [--mib 64] [--accesses 300]

A Ray head of its own with a 1 GiB object store, models get half of it (512 MiB). Uploads
`--models` safetensors models of `--mib` each (24 x 64 MiB = 3x the budget), then a plugin
(one Ray task) calls `load_namespace_model` on a Zipf-distributed sequence of them (s=1.2,
model 0 the most popular) and times each call: a hit is a zero-copy get, a miss a load on
demand (download, verify, decode, put) that may evict the least recently used model.
Reports the hit ratio, evictions, and p50/p99 of hits, misses and all calls, with the
floor of a hit measured in the same run (raw `ray.get` of a cached model's arrays). Writes
bench/results/cache_eviction.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from bench.harness import bench_service, median, time_raw_gets, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient, UploadFields
from modelservice_sdk.loader import load_namespace_model
from server.settings import GIB

MIB = 1024 * 1024


@ray.remote(num_cpus=0)
def _plugin(model_ids: list[str]) -> list[float]:
    samples = []
    for model_id in model_ids:
        started = time.perf_counter()
        load_namespace_model(model_id)
        samples.append(time.perf_counter() - started)
    return samples



def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else 0.0


async def main(models: int, mib: int, accesses: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        async with bench_service(work_dir, object_store_bytes=GIB, object_store_budget_fraction=0.5) as (app, ns, key):
            env = {"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}}
            async with ModelServiceClient(app.address, key) as client:
                weights = write_weights(work_dir / "m" / "model.safetensors", mib * MIB)
                archive = work_dir / "model.tar"
                with tarfile.open(archive, "w") as tar:
                    tar.add(weights, arcname="model/model.safetensors")
                model_ids = []
                for index in range(models):
                    uploaded = await client.upload_file(
                        archive,
                        UploadFields(namespace_id=ns, name=f"m{index}", version="1", model_format="safetensors", memory_gb=0.5),
                    )
                    model_ids.append(uploaded.model_id)
                budget = int(GIB * 0.5)
                rng = np.random.default_rng(0)
                ranks = np.minimum(rng.zipf(1.2, size=accesses) - 1, models - 1)
                sequence = [model_ids[int(rank)] for rank in ranks]
                before = await app.cluster.metrics_snapshot()
                samples = await _plugin.options(runtime_env=env).remote(sequence)
                after = await app.cluster.metrics_snapshot()
                arrays = [np.ones(mib * MIB // 4, dtype=np.float32)]
                floor = median(await time_raw_gets.remote([ray.put(arrays)], 50))

    lookups = {k: after.counters.lookups.get(k, 0) - before.counters.lookups.get(k, 0) for k in ("hit", "miss")}
    evictions = after.counters.evictions.get("lru", 0) - before.counters.evictions.get("lru", 0)
    threshold = 0.05  # a call over 50 ms loaded the model (a hit takes milliseconds)
    hits = [s for s in samples if s < threshold]
    misses = [s for s in samples if s >= threshold]
    write_result("cache_eviction", {
        "models": models, "model_mib": mib, "budget_mib": budget // MIB,
        "total_over_budget": round(models * mib * MIB / budget, 2), "accesses": accesses, "zipf_s": 1.2,
        "hit_ratio": round(lookups["hit"] / max(1, lookups["hit"] + lookups["miss"]), 3),
        "hits": lookups["hit"], "misses": lookups["miss"], "evictions": evictions,
        "p50_ms": round(median(samples) * 1000, 2), "p99_ms": round(_percentile(samples, 99) * 1000, 2),
        "hit_p50_ms": round(_percentile(hits, 50) * 1000, 2), "hit_p99_ms": round(_percentile(hits, 99) * 1000, 2),
        "miss_p50_ms": round(_percentile(misses, 50) * 1000, 2), "miss_p99_ms": round(_percentile(misses, 99) * 1000, 2),
        "floor_raw_get_ms": round(floor * 1000, 3),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=24)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--accesses", type=int, default=300)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.models, arguments.mib, arguments.accesses))
