"""Generates the workbroker gRPC stubs from proto/ at run time and imports them.

The stubs are written to examples/python/generated/ (git-ignored) or to the
directory named by WORKBROKER_PY_GENERATED_DIR, and regenerated whenever the
.proto files or the installed grpcio-tools / protobuf versions change.
WORKBROKER_PROTO_DIR overrides where the .proto files are read from (default:
the repository's proto/ directory).

    python wbproto.py          # generate only (the worker and producer do it themselves)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
PROTO_DIR = Path(os.environ.get("WORKBROKER_PROTO_DIR", HERE.parent.parent / "proto")).resolve()
GENERATED_DIR = Path(os.environ.get("WORKBROKER_PY_GENERATED_DIR", HERE / "generated")).resolve()
PROTO_FILES = ["workbroker/v1/job.proto", "workbroker/v1/broker.proto", "workbroker/v1/admin.proto"]
STAMP = ".stamp"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("grpcio-tools", "protobuf"):
        digest.update(f"{name}={importlib.metadata.version(name)}\n".encode())
    for relative in PROTO_FILES:
        digest.update(relative.encode() + b"\n")
        digest.update((PROTO_DIR / relative).read_bytes())
    return digest.hexdigest()


def generate() -> Path:
    """Makes sure GENERATED_DIR holds stubs for the current .proto files."""
    missing = [relative for relative in PROTO_FILES if not (PROTO_DIR / relative).is_file()]
    if missing:
        raise SystemExit(f"cannot find {', '.join(missing)} under {PROTO_DIR} (set WORKBROKER_PROTO_DIR)")
    fingerprint = _fingerprint()
    stamp = GENERATED_DIR / STAMP
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return GENERATED_DIR

    from grpc_tools import protoc  # imported late: only needed when (re)generating

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    GENERATED_DIR.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".generating-", dir=GENERATED_DIR.parent))
    try:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                *PROTO_FILES,
            ]
        )
        if status != 0:
            raise SystemExit(f"grpc_tools.protoc failed with status {status}")
        (scratch / STAMP).write_text(fingerprint)
        # Swap the new directory in; another process may be doing the same.
        if GENERATED_DIR.exists():
            retired = GENERATED_DIR.with_name(f".retired-{os.getpid()}-{GENERATED_DIR.name}")
            try:
                GENERATED_DIR.rename(retired)
            except FileNotFoundError:
                retired = None
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
        try:
            scratch.rename(GENERATED_DIR)
        except OSError:
            # Someone else put a fresh copy in place first; use theirs.
            if not (GENERATED_DIR / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return GENERATED_DIR


def load() -> SimpleNamespace:
    """Generates the stubs if needed and returns the modules:
    pb (broker_pb2), grpc (broker_pb2_grpc), job (job_pb2), admin (admin_pb2),
    admin_grpc (admin_pb2_grpc)."""
    directory = str(generate())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    from workbroker.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc, job_pb2

    return SimpleNamespace(
        pb=broker_pb2, grpc=broker_pb2_grpc, job=job_pb2, admin=admin_pb2, admin_grpc=admin_pb2_grpc
    )


def grpc_target(endpoint: str) -> str:
    """`host:port` for grpc from `host:port` or `http://host:port`."""
    for scheme in ("http://", "grpc://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/")
    if endpoint.startswith("https://"):
        raise SystemExit("TLS endpoints are not supported by this example; use host:port")
    return endpoint


if __name__ == "__main__":
    print(generate())
