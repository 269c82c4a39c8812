"""Upload throughput of the streaming pipeline, against a baseline measured in the same run.

    python -m bench.upload_throughput [--mib 512] [--repeat 3] [--s3]

Uploads one .tar archive of float32 safetensors weights into the local archive store (or,
with --s3, into moto's S3 server run as its own process, through multipart uploads), from
a client in its own process: over gRPC straight to the service (1 MiB chunks), and over
REST as the public multipart form through Envoy. Baselines: sha256 of the same file read
from disk, and sha256 plus one copy of it to disk (the unavoidable work per byte of a
stored upload; measured between the uploads, also with the fsync the local store does).
Each model is deleted once timed, as the floor deletes its copy. Reports MiB/s and the
ratios; writes bench/results/upload_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import bench_service, median, s3_store_settings, timed, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient
from server.embedded.envoy import envoy_proxy

MIB = 1024 * 1024


def _sha256_file(path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)


def _sha256_and_copy(path: Path, destination: Path, *, durable: bool = False) -> None:
    """What storing an archive cannot avoid: hash every byte and write it once (`durable`:
    and fsync it, as the local store does before it calls an upload done)."""
    digest = hashlib.sha256()
    with path.open("rb") as source, destination.open("wb") as target:
        while block := source.read(MIB):
            digest.update(block)
            target.write(block)
        if durable:
            target.flush()
            os.fsync(target.fileno())
    destination.unlink()


async def main(size_mib: int, repeat: int, use_s3: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="modelservice-bench-") as scratch:
        work = Path(scratch)
        weights = write_weights(work / "model" / "model.safetensors", size_mib * MIB)
        archive = work / "model.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(weights, arcname="model/model.safetensors")
        size = archive.stat().st_size
        baseline = median(timed(lambda: _sha256_file(archive), repeat))
        with s3_store_settings(work, use_s3) as store_settings:
            samples, peak = await _measure(work, archive, repeat, store_settings)
    grpc_seconds, rest_seconds = median(samples["grpc"]), median(samples["rest"])
    copy_baseline, durable_baseline = median(samples["copy"]), median(samples["durable_copy"])
    write_result(
        "upload_throughput_s3" if use_s3 else "upload_throughput",
        {
            "archive_bytes": size,
            "repeat": repeat,
            "store": "moto S3 server (multipart)" if use_s3 else "local directory",
            "grpc_seconds_median": grpc_seconds,
            "grpc_mib_per_s": size / MIB / grpc_seconds,
            "rest_multipart_via_envoy_seconds_median": rest_seconds,
            "rest_multipart_via_envoy_mib_per_s": size / MIB / rest_seconds,
            "baseline_sha256_seconds_median": baseline,
            "baseline_sha256_mib_per_s": size / MIB / baseline,
            "grpc_vs_sha256_ratio": grpc_seconds / baseline,
            "baseline_sha256_and_copy_mib_per_s": size / MIB / copy_baseline,
            "baseline_sha256_copy_and_fsync_mib_per_s": size / MIB / durable_baseline,
            "grpc_throughput_vs_sha256_and_copy": copy_baseline / grpc_seconds,
            "rest_throughput_vs_sha256_and_copy": copy_baseline / rest_seconds,
            "rest_vs_grpc_ratio": rest_seconds / grpc_seconds,
            "peak_buffered_bytes": peak,
        },
    )


async def _measure(
    work: Path, archive: Path, repeat: int, store_settings: dict[str, Any]
) -> tuple[dict[str, list[float]], int]:
    samples: dict[str, list[float]] = {"grpc": [], "rest": [], "copy": [], "durable_copy": []}
    async with bench_service(work, **store_settings) as (app, namespace, key):
        with envoy_proxy(work / "envoy", backend_host="127.0.0.1", backend_port=app.port) as gateway:
            await asyncio.sleep(3)  # Envoy's first health check
            async with ModelServiceClient(app.address, key) as deleter:
                for attempt in range(repeat):
                    # The floors between the uploads: the machine's memory and disk are in
                    # the same state for both (they drift over a run on a VM).
                    samples["copy"] += timed(lambda: _sha256_and_copy(archive, work / "copy.tar"), 1)
                    samples["durable_copy"] += timed(
                        lambda: _sha256_and_copy(archive, work / "copy.tar", durable=True), 1
                    )
                    for transport, address in (("grpc", app.address), ("rest", gateway.grpc_address)):
                        seconds, model_id = await _client([transport, address, key, namespace, str(archive), f"{transport}{attempt}"])
                        samples[transport].append(seconds)
                        # As the floor deletes its copy: every upload writes into recycled page
                        # cache, not into memory the machine touches for the first time.
                        await deleter.delete_model(namespace, model_id)
        peak = max(s.peak_buffered_bytes for s in app.uploads.recent_uploads)
    return samples, peak


async def _client(arguments: list[str]) -> tuple[float, str]:
    """One upload from a client process of its own: (seconds, model id)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.upload_client", *arguments, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"upload client failed ({process.returncode})")
    result = json.loads(out)
    return float(result["seconds"]), str(result["model_id"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="store into moto's S3 server instead of a directory")
    options = parser.parse_args()
    asyncio.run(main(options.mib, options.repeat, options.s3))
