#!/usr/bin/env python3
"""Generates Python gRPC stubs from the platform's contracts in ../../proto.

The stubs go to ./generated (not committed). Needs `grpcio-tools`:

    pip install grpcio grpcio-tools grpcio-health-checking
    python3 clients/python/generate.py
"""

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "generated"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    # grpcio-tools ships the well-known types (google/protobuf/*.proto) next to its module.
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    # Make every generated package importable (crm/v1/..., inventory/v1/...).
    for folder in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    print(f"generated {len(protos)} contracts into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
