#!/usr/bin/env python3
"""Enqueues jobs into a workbroker queue.

    python producer.py --queue emails --kind send --count 100 --payload 'hello {i}'

Jobs go out in batches of up to 1000 per Enqueue call (each batch is all or
nothing). Every job carries a W3C `traceparent` attribute (a new trace per job
unless --traceparent is given), so the broker's and the worker's spans join
the producer's trace. With --print-ids the job ids are printed, one per line,
in enqueue order.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

import wbproto

log = logging.getLogger("producer")
MAX_BATCH = 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="127.0.0.1:50051", help="broker address (default %(default)s)")
    parser.add_argument("--queue", default="default", help="queue to enqueue into (default %(default)s)")
    parser.add_argument("--kind", default="example", help="job kind (default %(default)s)")
    parser.add_argument("--count", type=int, default=1, help="number of jobs (default %(default)s)")
    payload = parser.add_mutually_exclusive_group()
    payload.add_argument(
        "--payload", default="job {i}", help="payload text; {i} becomes the job's index (default %(default)r)"
    )
    payload.add_argument("--payload-file", type=Path, help="payload bytes from this file (same for every job)")
    parser.add_argument("--ordering-key", default="", help="ordering key; {i} becomes the job's index")
    parser.add_argument("--dedup-key", default="", help="dedup key; {i} becomes the job's index")
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--max-attempts", type=int, default=0, help="0: the queue's default")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the jobs may run")
    parser.add_argument("--lease-duration", type=float, default=0.0, help="the jobs' lease duration in seconds")
    parser.add_argument(
        "--attribute", action="append", default=[], metavar="KEY=VALUE", help="an attribute (repeatable)"
    )
    parser.add_argument("--traceparent", default="", help="use this traceparent for every job (default: one per job)")
    parser.add_argument("--batch-size", type=int, default=MAX_BATCH, help="jobs per Enqueue call (1 to 1000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each Enqueue call in seconds")
    parser.add_argument("--print-ids", action="store_true", help="print the job ids, one per line")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    if not 1 <= args.batch_size <= MAX_BATCH:
        parser.error(f"--batch-size must be 1 to {MAX_BATCH}")
    for item in args.attribute:
        if "=" not in item:
            parser.error(f"--attribute {item!r}: expected KEY=VALUE")
    return args


def new_traceparent() -> str:
    """A W3C traceparent for a new, sampled trace."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def build_job(pb, args: argparse.Namespace, index: int, file_payload: bytes | None):
    payload = file_payload if file_payload is not None else args.payload.replace("{i}", str(index)).encode()
    attributes = dict(item.split("=", 1) for item in args.attribute)
    attributes["traceparent"] = args.traceparent or new_traceparent()
    job = pb.job.NewJob(
        queue=args.queue,
        kind=args.kind,
        payload=payload,
        attributes=attributes,
        priority=args.priority,
        max_attempts=args.max_attempts,
        ordering_key=args.ordering_key.replace("{i}", str(index)),
        dedup_key=args.dedup_key.replace("{i}", str(index)),
    )
    if args.delay > 0:
        job.delay.CopyFrom(duration(args.delay))
    if args.lease_duration > 0:
        job.lease_duration.CopyFrom(duration(args.lease_duration))
    return job


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    pb = wbproto.load()
    file_payload = args.payload_file.read_bytes() if args.payload_file else None
    enqueued = deduplicated = 0
    with grpc.insecure_channel(wbproto.grpc_target(args.endpoint)) as channel:
        stub = pb.grpc.BrokerStub(channel)
        for start in range(0, args.count, args.batch_size):
            jobs = [build_job(pb, args, index, file_payload) for index in range(start, min(args.count, start + args.batch_size))]
            try:
                # Not retried: Enqueue is all or nothing, but a retry after a lost
                # answer would enqueue twice unless the jobs carry dedup keys.
                response = stub.Enqueue(pb.pb.EnqueueRequest(jobs=jobs), timeout=args.timeout)
            except grpc.RpcError as error:
                log.error("Enqueue failed after %d jobs: %s: %s", enqueued, error.code().name, error.details())
                return 1
            for enqueued_job in response.jobs:
                deduplicated += enqueued_job.deduplicated
                if args.print_ids:
                    print(enqueued_job.job_id, flush=True)
            enqueued += len(response.jobs)
            log.debug("enqueued a batch of %d (sequences %d..%d)", len(response.jobs),
                      response.jobs[0].sequence, response.jobs[-1].sequence)
    log.info("enqueued %d jobs into %s (kind %s, %d deduplicated)", enqueued, args.queue, args.kind, deduplicated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
