"""Upload throughput of the streaming pipeline, against a baseline measured in the same run.

    python -m bench.upload_throughput [--mib 512] [--repeat 3]

Uploads one .tar archive of float32 safetensors weights into the local archive store, from
a client in its own process: over gRPC straight to the service (1 MiB chunks), and over
REST as the public multipart form through Envoy. Baseline: sha256 of the same file read
from disk (the unavoidable work per byte). Reports MiB/s and the ratios; writes
bench/results/upload_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.harness import bench_service, median, timed, write_result, write_weights
from server.embedded.envoy import envoy_proxy

MIB = 1024 * 1024


def _sha256_file(path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)


async def main(size_mib: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="modelservice-bench-") as scratch:
        work = Path(scratch)
        weights = write_weights(work / "model" / "model.safetensors", size_mib * MIB)
        archive = work / "model.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(weights, arcname="model/model.safetensors")
        size = archive.stat().st_size
        baseline = median(timed(lambda: _sha256_file(archive), repeat))
        samples: dict[str, list[float]] = {"grpc": [], "rest": []}
        async with bench_service(work) as (app, namespace, key):
            with envoy_proxy(work / "envoy", backend_host="127.0.0.1", backend_port=app.port) as gateway:
                await asyncio.sleep(3)  # Envoy's first health check
                for attempt in range(repeat):
                    samples["grpc"].append(await _client(["grpc", app.address, key, namespace, str(archive), f"g{attempt}"]))
                    samples["rest"].append(
                        await _client(["rest", gateway.grpc_address, key, namespace, str(archive), f"r{attempt}"])
                    )
            peak = max(s.peak_buffered_bytes for s in app.uploads.recent_uploads)
        grpc_seconds, rest_seconds = median(samples["grpc"]), median(samples["rest"])
        write_result(
            "upload_throughput",
            {
                "archive_bytes": size,
                "repeat": repeat,
                "store": "local directory",
                "grpc_seconds_median": grpc_seconds,
                "grpc_mib_per_s": size / MIB / grpc_seconds,
                "rest_multipart_via_envoy_seconds_median": rest_seconds,
                "rest_multipart_via_envoy_mib_per_s": size / MIB / rest_seconds,
                "baseline_sha256_seconds_median": baseline,
                "baseline_sha256_mib_per_s": size / MIB / baseline,
                "grpc_vs_sha256_ratio": grpc_seconds / baseline,
                "rest_vs_grpc_ratio": rest_seconds / grpc_seconds,
                "peak_buffered_bytes": peak,
            },
        )


async def _client(arguments: list[str]) -> float:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.upload_client", *arguments, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"upload client failed ({process.returncode})")
    seconds: float = json.loads(out)["seconds"]
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.mib, options.repeat))
