"""Upload throughput of the streaming pipeline, against a baseline measured in the same run.

    python bench/upload_throughput.py [--mib 512]

Uploads one .tar archive of float32 safetensors weights over gRPC (1 MiB chunks) into the
local archive store. Baseline: sha256 of the same file read from disk (the unavoidable
work per byte). Reports MiB/s for both and their ratio; writes bench/results/upload_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tarfile
import tempfile
import time
from pathlib import Path

from bench.harness import bench_service, median, timed, write_result, write_weights
from modelservice_sdk.client import ModelServiceClient, UploadFields

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
        async with bench_service(work) as (app, namespace, key):
            async with ModelServiceClient(app.address, key) as client:
                samples = []
                for attempt in range(repeat):
                    fields = UploadFields(namespace, "bench", f"v{attempt}", "safetensors")
                    started = time.perf_counter()
                    await client.upload_file(archive, fields)
                    samples.append(time.perf_counter() - started)
                peak = max(s.peak_buffered_bytes for s in app.uploads.recent_uploads)
        upload = median(samples)
        write_result(
            "upload_throughput",
            {
                "archive_bytes": size,
                "repeat": repeat,
                "upload_seconds_median": upload,
                "upload_mib_per_s": size / MIB / upload,
                "baseline_sha256_seconds_median": baseline,
                "baseline_sha256_mib_per_s": size / MIB / baseline,
                "upload_vs_sha256_ratio": upload / baseline,
                "peak_buffered_bytes": peak,
                "store": "local directory",
            },
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.mib, options.repeat))
