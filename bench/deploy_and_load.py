"""Deploy time and plugin load time for models of several sizes, with a baseline.

    python bench/deploy_and_load.py [--mib 100 1024]

For each size: upload a safetensors .tar, time DeployModel (download, verify, decode, put
into the object store), then time `load_namespace_model` inside a Ray task (median of
several calls). Baselines in the same run: `ray.put` of the same numpy arrays from the
driver (the floor of caching them), and a `ray.get` of that put from a Ray task. Writes
bench/results/deploy_and_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import safetensors.numpy

from bench.harness import bench_service, time_raw_gets, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient, UploadFields
from modelservice_sdk.loader import load_namespace_model

MIB = 1024 * 1024


@ray.remote(num_cpus=0)
def _time_plugin_loads(model_id: str, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        model = load_namespace_model(model_id)
        assert all(not a.flags.writeable for a in model.tensors.values())
        samples.append(time.perf_counter() - started)
        del model
    return samples



async def main(sizes: list[int], repeat: int) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="modelservice-bench-") as scratch:
        work = Path(scratch)
        async with bench_service(work) as (app, namespace, key):
            environment = {"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}}
            async with ModelServiceClient(app.address, key) as client:
                for size_mib in sizes:
                    weights = write_weights(work / f"m{size_mib}" / "model.safetensors", size_mib * MIB)
                    archive = work / f"m{size_mib}.tar"
                    with tarfile.open(archive, "w") as tar:
                        tar.add(weights, arcname="model/model.safetensors")
                    uploaded = await client.upload_file(
                        archive, UploadFields(namespace, f"m{size_mib}", "1", "safetensors", memory_gb=0.5)
                    )
                    started = time.perf_counter()
                    deployed = await client.deploy_model(namespace, uploaded.model_id)
                    deploy_seconds = time.perf_counter() - started
                    assert deployed.deployment_status == "deployed", deployed.message
                    loads = await _time_plugin_loads.options(runtime_env=environment).remote(uploaded.model_id, repeat)
                    arrays = safetensors.numpy.load_file(str(weights))
                    started = time.perf_counter()
                    baseline_ref = ray.put(arrays)
                    put_seconds = time.perf_counter() - started
                    raw_gets = await time_raw_gets.remote([baseline_ref], repeat)
                    del baseline_ref, arrays
                    load_median = statistics.median(loads[1:] or loads)
                    results.append(
                        {
                            "model_mib": size_mib,
                            "deploy_seconds": deploy_seconds,
                            "first_load_seconds": loads[0],
                            "warm_load_seconds_median": load_median,
                            "baseline_ray_put_seconds": put_seconds,
                            "baseline_ray_get_seconds_median": statistics.median(raw_gets[1:] or raw_gets),
                            "deploy_vs_put_ratio": deploy_seconds / put_seconds,
                            "load_vs_raw_get_ratio": load_median / statistics.median(raw_gets[1:] or raw_gets),
                        }
                    )
                    archive.unlink()
                    weights.unlink()
    write_result("deploy_and_load", {"repeat": repeat, "runs": results, "np_version": np.__version__})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    asyncio.run(main(options.mib, options.repeat))
