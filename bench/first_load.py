"""The first `load_namespace_model` in a fresh Ray worker, stage by stage.

    python -m bench.first_load [--tensors 100] [--mib 96] [--repeat 15]

A deployed safetensors model of `--tensors` tensors (`--mib` in all, like a small
sentence encoder). Each sample is a Ray task in a worker process of its own (max_calls=1)
that times, from its first line: importing the loader, the whole first call (import
included), and, inside it, finding the cache actor, the lookup round trip and the
`ray.get` of the weights. The
floor, measured the same way in the same run: a fresh worker's first raw `ray.get` of the
same cached object. Writes bench/results/first_load.json (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import safetensors.numpy

from bench.harness import bench_service, median, write_result
from modelservice_sdk.client import ModelServiceClient, UploadFields

MIB = 1024 * 1024


@ray.remote(num_cpus=0, max_calls=1)
def _first_call(model_id: str) -> dict[str, float]:
    started = time.perf_counter()
    from modelservice_sdk import loader

    imported = time.perf_counter()
    model = loader.load_namespace_model(model_id)
    done = time.perf_counter()
    assert model.tensors
    # Importing the loader is part of the first call: it brings numpy, which the floor's
    # raw get also imports (to rebuild the arrays).
    return {"import_ms": (imported - started) * 1000, "first_call_ms": (done - started) * 1000}


@ray.remote(num_cpus=0, max_calls=1)
def _stages(model_id: str) -> dict[str, float]:
    """The first call's parts, in the same order the loader takes them."""
    from modelservice_sdk import loader

    t0 = time.perf_counter()
    cache = loader._cache_actor(loader.cache_name())
    t1 = time.perf_counter()
    refs = ray.get(cache.lookup.remote(model_id, None, ray.get_runtime_context().get_node_id()))
    t2 = time.perf_counter()
    model = ray.get(refs[0])
    t3 = time.perf_counter()
    assert model.tensors
    return {"actor_handle_ms": (t1 - t0) * 1000, "lookup_ms": (t2 - t1) * 1000, "get_ms": (t3 - t2) * 1000}


@ray.remote(num_cpus=0, max_calls=1)
def _raw_first_get(refs: list[Any]) -> float:
    started = time.perf_counter()
    value = ray.get(refs[0])
    seconds = time.perf_counter() - started
    del value
    return seconds * 1000


async def main(tensors: int, mib: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        rng = np.random.default_rng(0)
        per_tensor = mib * MIB // tensors // 4
        weights = {f"layer{i}.weight": rng.standard_normal(per_tensor, dtype=np.float32) for i in range(tensors)}
        (work_dir / "m").mkdir()
        safetensors.numpy.save_file(weights, str(work_dir / "m" / "model.safetensors"))
        archive = work_dir / "model.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(work_dir / "m" / "model.safetensors", arcname="model/model.safetensors")
        async with bench_service(work_dir) as (app, ns, key):
            env = {"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}}
            async with ModelServiceClient(app.address, key) as client:
                uploaded = await client.upload_file(
                    archive, UploadFields(namespace_id=ns, name="encoder", version="1", model_format="safetensors", memory_gb=0.5)
                )
                await client.deploy_model(ns, uploaded.model_id)
            cache = ray.get_actor(app.cluster.actor_name, namespace="modelservice")
            refs: list[Any] = ray.get(cache.lookup.remote(uploaded.model_id))
            first: list[dict[str, float]] = []
            stages: list[dict[str, float]] = []
            floor: list[float] = []
            for _ in range(repeat):
                first.append(ray.get(_first_call.options(runtime_env=env).remote(uploaded.model_id)))
                stages.append(ray.get(_stages.options(runtime_env=env).remote(uploaded.model_id)))
                floor.append(ray.get(_raw_first_get.remote(refs)))
    first_call = median([sample["first_call_ms"] for sample in first])
    raw = median(floor)
    write_result("first_load", {
        "tensors": tensors,
        "model_mib": mib,
        "samples": repeat,
        "import_ms": round(median([sample["import_ms"] for sample in first]), 2),
        "first_call_ms": round(first_call, 2),
        "stages_ms": {key: round(median([sample[key] for sample in stages]), 2) for key in stages[0]},
        "raw_first_get_ms": round(raw, 2),
        "ratio_to_raw_first_get": round(first_call / raw, 2),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--mib", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=15)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.tensors, arguments.mib, arguments.repeat))
