#!/usr/bin/env python3
"""A workbroker worker in Python (grpc.aio), speaking the wire protocol directly.

    python worker.py --queue emails --max-in-flight 8

What it shows (see docs/writing-a-worker.md for the protocol):
- one Lease stream: `open` first, then jobs are pushed, never more than the
  window (max_in_flight plus credits) unacknowledged at once;
- one long-lived Ack stream and one long-lived Nack stream, fed from a queue,
  whose answers come back one per request, in request order; unanswered
  requests are sent again after a reconnect (same token: idempotent);
- ExtendLease for jobs still running about a third of their lease before it
  expires (batched across jobs);
- CancelNotice: the job's work is stopped and it is not acked;
- OUTCOME_STALE_LEASE: someone else owns the job now, the result is dropped;
- SIGTERM / SIGINT: send `drain` (no more jobs; leftovers go back without using
  an attempt), finish and settle the running jobs, then close the Lease
  stream's request side, flush acks and nacks, exit 0.
  A second signal exits at once.

The demo handler (`handle` below) understands these payloads:
  fail-once        nack (retry now) on the first attempt, succeed after
  fail-always      nack permanently: the job goes DEAD
  sleep:<seconds>  work that long (cancellable), then succeed
  anything else    succeed after --work-ms, result = sha256 of the payload
Replace it with your own work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import hashlib
import logging
import os
import random
import signal
import socket
import sys
import time
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import duration_pb2

import wbproto

log = logging.getLogger("worker")

# Stream errors worth reconnecting for (with backoff). Anything else is a bug
# in the worker or a misconfiguration: give up and exit non-zero.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
MAX_EXTENSIONS_PER_CALL = 1000


class Retry(Exception):
    """Raise from a handler to nack the job for a retry (after `retry_after` seconds, or the queue's backoff)."""

    def __init__(self, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.retry_after = retry_after


class Reject(Exception):
    """Raise from a handler to nack the job permanently (it goes DEAD)."""


class Fatal(Exception):
    """A stream failed with a status that retrying will not fix."""


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


class Backoff:
    """Exponential backoff with full jitter, 100 ms up to 5 s."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0):
        self.initial, self.maximum, self.current = initial, maximum, initial

    def reset(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        delay = random.uniform(self.current / 2, self.current)
        self.current = min(self.maximum, self.current * 2)
        return delay


class SettleStream:
    """One long-lived Ack (or Nack) stream.

    Requests go through a queue that feeds the call's request iterator; the
    broker answers each request once, in request order, so answers are matched
    to a FIFO of pending requests. When the stream fails with a retryable
    status it is reopened and every unanswered request is sent again: acking
    (or nacking) again with the same lease token is safe, it answers OK if the
    first one took effect.
    """

    def __init__(self, name: str, method: Callable[..., Any]):
        self.name = name
        self.method = method
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self.closing = False

    async def settle(self, request: Any) -> Any:
        """Sends `request` and waits for its answer."""
        if self.closing:
            raise RuntimeError(f"{self.name} stream is closed")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((request, future))
        self.queue.put_nowait(request)
        return await asyncio.shield(future)

    def close(self) -> None:
        """Ends the request side once everything queued was sent."""
        self.closing = True
        self.queue.put_nowait(None)

    @staticmethod
    async def _requests(queue: asyncio.Queue):
        while True:
            request = await queue.get()
            if request is None:
                return
            yield request

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            call = self.method(self._requests(self.queue))
            try:
                async for response in call:
                    backoff.reset()
                    if not self.pending:
                        raise Fatal(f"{self.name}: an answer for {response.job_id} without a request")
                    request, future = self.pending.popleft()
                    if response.job_id != request.job_id:
                        raise Fatal(f"{self.name}: answer for {response.job_id}, expected {request.job_id}")
                    if not future.done():
                        future.set_result(response)
                if self.closing and not self.pending:
                    return
                error_text = "the broker ended the stream"
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    self._fail_pending(Fatal(f"{self.name} stream: {error.code().name}: {error.details()}"))
                    raise Fatal(f"{self.name} stream: {error.code().name}: {error.details()}") from error
                error_text = f"{error.code().name}: {error.details()}"
            finally:
                call.cancel()
            delay = backoff.next()
            log.warning("%s stream lost (%s); %d unanswered, reconnecting in %.2fs",
                        self.name, error_text, len(self.pending), delay)
            await asyncio.sleep(delay)
            # The old iterator may still hold a queued request: start a fresh
            # queue with every unanswered request, in order, and stop the old one.
            old, self.queue = self.queue, asyncio.Queue()
            for request, _ in self.pending:
                self.queue.put_nowait(request)
            if self.closing:
                self.queue.put_nowait(None)
            old.put_nowait(None)

    def _fail_pending(self, error: Exception) -> None:
        while self.pending:
            _, future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


@dataclasses.dataclass(eq=False)
class Running:
    """A job this worker holds under a lease."""

    job: Any
    lease_token: str
    attempt: int
    lease_seconds: float
    extend_at: float  # time.monotonic() when to extend next
    task: asyncio.Task | None = None
    settling: bool = False  # the handler finished; the ack/nack is on its way
    stopped: str = ""  # why the work was stopped (cancel notice, lost lease, shutdown)

    @property
    def job_id(self) -> str:
        return self.job.job_id


Handler = Callable[[Any, int], Awaitable[bytes]]


async def handle(job: Any, attempt: int, work_ms: float = 10.0) -> bytes:
    """The demo handler: returns the result to ack with, or raises Retry / Reject."""
    payload = bytes(job.payload)
    if payload == b"fail-once" and attempt == 1:
        raise Retry("failing once on purpose", retry_after=0.0)
    if payload == b"fail-always":
        raise Reject("this job always fails")
    if payload.startswith(b"sleep:"):
        await asyncio.sleep(float(payload[len(b"sleep:"):]))
        return b"slept"
    await asyncio.sleep(work_ms / 1000)
    # CPU-bound work belongs in a thread (or a process pool) so the event loop
    # keeps answering the streams and extending leases meanwhile.
    return (await asyncio.to_thread(hashlib.sha256, payload)).hexdigest().encode()


class Worker:
    def __init__(self, modules: Any, stub: Any, args: argparse.Namespace, handler: Handler):
        self.m = modules
        self.stub = stub
        self.args = args
        self.handler = handler
        self.jobs: dict[str, Running] = {}
        self.stopping = asyncio.Event()
        self.closing_lease = False
        self.lease_queue: asyncio.Queue | None = None
        self.acks = SettleStream("ack", stub.Ack)
        self.nacks = SettleStream("nack", stub.Nack)
        self.extend_wakeup = asyncio.Event()
        self.counts: collections.Counter[str] = collections.Counter()

    # ----- the lease stream -------------------------------------------------

    def _open_request(self) -> Any:
        open_lease = self.m.pb.OpenLease(
            worker_id=self.args.worker_id,
            queues=self.args.queue,
            kinds=self.args.kind,
            max_in_flight=self.args.max_in_flight,
        )
        if self.args.lease_duration > 0:
            open_lease.lease_duration.CopyFrom(duration(self.args.lease_duration))
        return self.m.pb.LeaseRequest(open=open_lease)

    async def lease_loop(self) -> None:
        backoff = Backoff()
        while not self.closing_lease:
            queue: asyncio.Queue = asyncio.Queue()
            queue.put_nowait(self._open_request())  # open must be the first message
            self.lease_queue = queue
            call = self.stub.Lease(SettleStream._requests(queue))
            try:
                async for response in call:
                    backoff.reset()
                    which = response.WhichOneof("response")
                    if which == "jobs":
                        for leased in response.jobs.jobs:
                            self.on_leased(leased)
                    elif which == "cancelled":
                        self.on_cancel_notice(response.cancelled)
                if self.closing_lease:
                    return
                reason = "the broker ended the stream"
            except grpc.aio.AioRpcError as error:
                if self.closing_lease and error.code() == grpc.StatusCode.CANCELLED:
                    return
                if error.code() not in RETRYABLE:
                    raise Fatal(f"lease stream: {error.code().name}: {error.details()}") from error
                reason = f"{error.code().name}: {error.details()}"
            finally:
                call.cancel()
            # The broker releases a stream's leases when the stream ends: the
            # jobs still running are someone else's now.
            for running in list(self.jobs.values()):
                self.stop_job(running, "lease stream lost")
            delay = backoff.next()
            log.warning("lease stream lost (%s); reconnecting in %.2fs", reason, delay)
            await asyncio.sleep(delay)

    def on_leased(self, leased: Any) -> None:
        job = leased.job
        if self.stopping.is_set():
            # Shutting down: do not start it; closing the lease stream hands it back.
            log.info("job %s arrived while shutting down: not started, released on close", job.job_id)
            self.counts["released"] += 1
            return
        if self.args.lease_duration > 0:
            lease_seconds = self.args.lease_duration
        else:
            # The stream's lease_duration was not set: the job's own, else the
            # queue's default applies. Derive it from the expiry (database
            # clock; assumes clocks roughly in sync).
            expires = leased.lease_expires_at.ToDatetime(tzinfo=datetime.timezone.utc)
            lease_seconds = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        lease_seconds = min(86400.0, max(1.0, lease_seconds))
        running = Running(
            job=job,
            lease_token=leased.lease_token,
            attempt=leased.attempt,
            lease_seconds=lease_seconds,
            extend_at=time.monotonic() + lease_seconds * 2 / 3,
        )
        self.jobs[job.job_id] = running
        running.task = asyncio.create_task(self.work(running), name=f"job-{job.job_id}")
        self.extend_wakeup.set()
        log.debug("leased job %s (attempt %d, lease %.1fs, traceparent %s)", job.job_id, leased.attempt,
                  lease_seconds, job.attributes.get("traceparent", "-"))

    def on_cancel_notice(self, notice: Any) -> None:
        running = self.jobs.get(notice.job_id)
        if running is None or running.lease_token != notice.lease_token:
            return  # already finished (its ack will answer STALE_LEASE) or an older lease
        self.counts["cancelled"] += 1
        self.stop_job(running, "cancelled by the broker")

    def stop_job(self, running: Running, why: str) -> None:
        """Stops the job's work; it will not be acked or nacked."""
        if running.settling or running.stopped:
            return  # the ack or nack is already on its way; its outcome will tell
        running.stopped = why
        log.info("job %s: %s: stopping its work, not acking it", running.job_id, why)
        if running.task is not None:
            running.task.cancel()

    # ----- the jobs ---------------------------------------------------------

    async def work(self, running: Running) -> None:
        try:
            try:
                result = await self.handler(running.job, running.attempt)
            except asyncio.CancelledError:
                if running.stopped:
                    return  # cancel notice, lost lease or shutdown: no ack
                raise
            except Retry as retry:
                await self.nack(running, str(retry), retry.retry_after, permanent=False)
            except Reject as reject:
                await self.nack(running, str(reject), None, permanent=True)
            except Exception as error:  # a failing handler: retry with the queue's backoff
                log.exception("job %s failed", running.job_id)
                await self.nack(running, f"{type(error).__name__}: {error}", None, permanent=False)
            else:
                await self.ack(running, result)
        finally:
            if self.jobs.get(running.job_id) is running:
                del self.jobs[running.job_id]

    async def ack(self, running: Running, result: bytes) -> None:
        running.settling = True
        request = self.m.pb.AckRequest(job_id=running.job_id, lease_token=running.lease_token, result=result)
        response = await self.acks.settle(request)
        self.on_outcome("ack", running, response.outcome, response.message)

    async def nack(self, running: Running, error: str, retry_after: float | None, permanent: bool) -> None:
        running.settling = True
        request = self.m.pb.NackRequest(
            job_id=running.job_id, lease_token=running.lease_token, error=error, permanent=permanent
        )
        if retry_after is not None:
            request.retry_after.CopyFrom(duration(retry_after))
        response = await self.nacks.settle(request)
        self.on_outcome("nack", running, response.outcome, response.message)
        if response.outcome == self.m.job.OUTCOME_OK:
            log.info("job %s nacked (attempt %d: %s): now %s", running.job_id, running.attempt, error,
                     self.m.job.JobState.Name(response.next_state))

    def on_outcome(self, what: str, running: Running, outcome: int, message: str) -> None:
        job = self.m.job
        if outcome == job.OUTCOME_OK:
            self.counts[f"{what}ed"] += 1
            log.debug("job %s %sed", running.job_id, what)
        elif outcome == job.OUTCOME_STALE_LEASE:
            # The lease expired or was released and the job is someone else's
            # now (or it was cancelled): drop the result, do nothing else.
            self.counts["stale"] += 1
            log.warning("job %s: %s is stale (lease lost; someone else owns it now): result dropped",
                        running.job_id, what)
        elif outcome == job.OUTCOME_NOT_FOUND:
            self.counts["not_found"] += 1
            log.warning("job %s: %s found no such job (pruned?): dropped", running.job_id, what)
        else:  # OUTCOME_INVALID, or a value this worker does not know
            self.counts["invalid"] += 1
            log.error("job %s: %s rejected as invalid (%s): a bug in the worker; the lease will expire",
                      running.job_id, what, message)

    # ----- lease extension --------------------------------------------------

    async def extend_loop(self) -> None:
        """Extends, in one call, the leases of running jobs whose extension is due."""
        while True:
            now = time.monotonic()
            due = [r for r in self.jobs.values() if not r.settling and not r.stopped and r.extend_at <= now]
            for start in range(0, len(due), MAX_EXTENSIONS_PER_CALL):
                await self.extend(due[start:start + MAX_EXTENSIONS_PER_CALL])
            upcoming = [r.extend_at for r in self.jobs.values() if not r.settling and not r.stopped]
            wait = min([1.0] + [at - time.monotonic() for at in upcoming])
            self.extend_wakeup.clear()
            try:
                await asyncio.wait_for(self.extend_wakeup.wait(), timeout=max(0.02, wait))
            except asyncio.TimeoutError:
                pass

    async def extend(self, batch: list[Running]) -> None:
        request = self.m.pb.ExtendLeaseRequest(
            leases=[
                self.m.pb.LeaseExtension(
                    job_id=r.job_id, lease_token=r.lease_token, extend_by=duration(r.lease_seconds)
                )
                for r in batch
            ]
        )
        try:
            response = await self.stub.ExtendLease(request, timeout=5.0)
        except grpc.aio.AioRpcError as error:
            # Try again soon; the lease still has about a third left.
            log.warning("ExtendLease failed (%s: %s); retrying in 1s", error.code().name, error.details())
            for r in batch:
                r.extend_at = time.monotonic() + 1.0
            return
        for r, extended in zip(batch, response.leases):
            if extended.outcome == self.m.job.OUTCOME_OK:
                r.extend_at = time.monotonic() + r.lease_seconds * 2 / 3
                self.counts["extended"] += 1
                log.info("extended the lease of job %s by %.1fs", r.job_id, r.lease_seconds)
            else:
                self.stop_job(r, f"lease extension answered {self.m.job.Outcome.Name(extended.outcome)}")

    # ----- running and stopping --------------------------------------------

    async def run(self) -> int:
        log.info("worker %s: queues %s, kinds %s, max_in_flight %d, endpoint %s", self.args.worker_id,
                 ",".join(self.args.queue), ",".join(self.args.kind) or "*", self.args.max_in_flight,
                 self.args.endpoint)
        background = [
            asyncio.create_task(self.acks.run(), name="ack-stream"),
            asyncio.create_task(self.nacks.run(), name="nack-stream"),
            asyncio.create_task(self.extend_loop(), name="extender"),
        ]
        lease_task = asyncio.create_task(self.lease_loop(), name="lease-stream")
        stop_task = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([lease_task, stop_task, *background[:2]], return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in done if task is not stop_task]
        if failed:
            for task in [lease_task, stop_task, *background]:
                task.cancel()
            for task in failed:
                if task.exception() is not None:
                    log.error("%s failed: %s", task.get_name(), task.exception())
            return 1

        # Graceful shutdown: ask for no more work (drain: what we still hold
        # when the stream ends goes back without using an attempt), then
        # finish, and settle, what is running.
        if self.lease_queue is not None:
            self.lease_queue.put_nowait(self.m.pb.LeaseRequest(drain=self.m.pb.Drain()))
        running = [r.task for r in self.jobs.values() if r.task is not None]
        log.info("shutting down: waiting up to %.0fs for %d running jobs", self.args.shutdown_grace, len(running))
        if running:
            _, late = await asyncio.wait(running, timeout=self.args.shutdown_grace)
            if late:
                log.warning("%d jobs did not finish within the grace period: stopped, released on close", len(late))
                for r in list(self.jobs.values()):
                    self.stop_job(r, "shutdown grace period over")
                await asyncio.wait(late, timeout=5.0)
        # Now close the lease stream's request side; the broker ends the
        # stream and hands back whatever arrived meanwhile (not started).
        self.closing_lease = True
        if self.lease_queue is not None:
            self.lease_queue.put_nowait(None)
        try:
            await asyncio.wait_for(lease_task, timeout=10.0)
        except (asyncio.TimeoutError, Fatal) as error:
            log.warning("the lease stream did not close cleanly: %s", error or "timeout")
            lease_task.cancel()
        # Flush: the ack and nack streams end once every request is answered.
        self.acks.close()
        self.nacks.close()
        _, unflushed = await asyncio.wait(background[:2], timeout=10.0)
        for task in [*background, *unflushed]:
            task.cancel()
        log.info("stopped: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no jobs")
        return 0 if not unflushed else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="127.0.0.1:50051", help="broker address (default %(default)s)")
    parser.add_argument("--queue", action="append", default=[], help="queue to lease from (repeatable; default 'default')")
    parser.add_argument("--kind", action="append", default=[], help="kind to lease (repeatable; default: every kind)")
    parser.add_argument("--worker-id", default=f"py-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--max-in-flight", type=int, default=16, help="jobs held and worked on at once")
    parser.add_argument("--lease-duration", type=float, default=0.0,
                        help="lease duration in seconds (default: the job's, else the queue's)")
    parser.add_argument("--work-ms", type=float, default=10.0, help="simulated work per ordinary job")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds to let running jobs finish on SIGTERM before stopping them")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.queue = args.queue or ["default"]
    if not 1 <= args.max_in_flight <= 10000:
        parser.error("--max-in-flight must be 1 to 10000")
    return args


async def amain(args: argparse.Namespace) -> int:
    modules = wbproto.load()
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(
        wbproto.grpc_target(args.endpoint),
        options=[("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)],
    ) as channel:
        worker = Worker(modules, modules.grpc.BrokerStub(channel), args,
                        lambda job, attempt: handle(job, attempt, args.work_ms))

        def on_signal(signum: int) -> None:
            if worker.stopping.is_set():
                log.warning("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(130)
            log.info("%s: shutting down gracefully", signal.Signals(signum).name)
            worker.stopping.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        return await worker.run()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
