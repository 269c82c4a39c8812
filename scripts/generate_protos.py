"""Regenerates everything in `generated/` from `protos/`.

Outputs, all committed and never edited by hand:
- `generated/modelservice/v1/*_pb2.py`, `*_pb2_grpc.py`: Python modules (protoc's absolute
  imports work because `generated/` is an import root of the package);
- `*_pb2.pyi`, `*_pb2_grpc.pyi`: typed stubs (mypy-protobuf);
- `generated/modelservice.descriptor.pb`: the descriptor set Envoy's transcoder reads
  (`--include_imports`, so google/api and google/rpc types are inside).

Only our own protos get Python output; `google/*` comes from googleapis-common-protos.
Run `python scripts/generate_protos.py --check` to fail when the committed output is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import google.api  # googleapis-common-protos: ships google/api/*.proto and google/rpc/*.proto
import grpc_tools
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_ROOT = REPO_ROOT / "generated"
DESCRIPTOR_NAME = "modelservice.descriptor.pb"


def _include_paths() -> list[Path]:
    googleapis_root = Path(next(iter(google.api.__path__))).parent.parent
    well_known_root = Path(grpc_tools.__file__).parent / "_proto"
    return [PROTO_ROOT, googleapis_root, well_known_root]


def generate(out_dir: Path) -> None:
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    includes = [f"-I{path}" for path in _include_paths()]
    extra_for_envoy = ["google/rpc/error_details.proto", "google/rpc/status.proto"]
    args = [
        "grpc_tools.protoc",
        *includes,
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed generating Python modules")
    # Envoy needs error_details in the descriptor, or convert_grpc_status silently
    # degrades to an empty body.
    descriptor_args = [
        "grpc_tools.protoc",
        *includes,
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_NAME}",
        *protos,
        *extra_for_envoy,
    ]
    if protoc.main(descriptor_args) != 0:
        raise SystemExit("protoc failed generating the descriptor set")
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        (package_dir / "__init__.py").touch()
        for parent in package_dir.relative_to(out_dir).parents:
            if parent != Path("."):
                (out_dir / parent / "__init__.py").touch()
    (out_dir / "modelservice" / "py.typed").touch()


def _differences(expected: Path, actual: Path) -> list[str]:
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {
        p.relative_to(actual)
        for p in actual.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(p) for p in expected_files ^ actual_files)
    stale += sorted(
        str(p)
        for p in expected_files & actual_files
        if not filecmp.cmp(expected / p, actual / p, shallow=False)
    )
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        if options.check:
            stale = _differences(fresh, GENERATED_ROOT)
            if stale:
                print("generated/ is stale; run scripts/generate_protos.py:", *stale, sep="\n  ")
                return 1
            print("generated/ is up to date")
            return 0
        shutil.rmtree(GENERATED_ROOT, ignore_errors=True)
        shutil.copytree(fresh, GENERATED_ROOT)
    print(f"regenerated {GENERATED_ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
