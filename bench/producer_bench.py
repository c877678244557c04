"""Kafka produce path, client against client: what the receiver's sink costs per span with aiokafka (the
``sinks.kafka.KafkaSink`` that ``serve`` uses) and with librdkafka (confluent-kafka), per compression codec.

The question it answers: how much of the receiver's CPU per span would a librdkafka-based sink save? Both clients
produce the same records — the receiver's own output for ``bench.payloads`` GenAI requests (``--spans-per-request``
spans, ``--spans-per-trace`` per trace, split per trace by ``receiver.split``, one ``sinks.base.Batch`` per request
with the receiver's headers) — to a fresh topic with ``--partitions`` partitions, from ``--concurrency`` concurrent
writers (as concurrent HTTP requests would), each write awaited until every record of the batch is acknowledged
(``acks=all``, idempotent producer, linger 5 ms, 256 KiB batches): the promise ``serve`` makes before a 2xx.

* ``aiokafka``: ``KafkaSink.write`` (what ``serve`` runs today).
* ``librdkafka``: ``confluent_kafka.Producer`` with the same settings; delivery reports are polled on a thread
  and resolve asyncio futures — the least a librdkafka sink would need. Skipped, with the reason, when
  confluent-kafka is not installed (``make bench-producer`` installs it; it is not a dependency of the product).

Each (client, codec) runs in its own process, ``--rounds`` times, interleaved; the CPU counted is the process's
(every thread: librdkafka's I/O and compression threads included) from the first write to the last
acknowledgement, after one warm-up batch. Reported: spans/s, spans per CPU-second, and the ratio against aiokafka
with zstd (the sink's default). This measures the produce path only — parsing and splitting are the same for both
and are left out. No timing is an assertion anywhere.

Kafka: a single-node broker from ``tests/kafka_harness.py`` unless ``--kafka-bootstrap`` names one.
Results: ``bench/results/producer-<timestamp>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.common import (environment, fmt_k, median, process_cpu_s, quiet_library_logs, results_path, say,
                          start_harness_broker, timestamp, write_results)

CLIENTS = ("aiokafka", "librdkafka")
LINGER_MS = 5
BATCH_BYTES = 262144
MAX_REQUEST_BYTES = 1048576


def _batches(requests: int, spans_per_request: int, spans_per_trace: int) -> list:
    from bench.payloads import make_genai_request
    from receiver.split import split_traces
    from sinks.base import Batch

    distinct = min(requests, 20)  # the workload repeats after 20 distinct requests: generation is not measured
    out = []
    for seed in range(distinct):
        req = make_genai_request(spans_per_request, spans_per_trace, seed)
        out.append(Batch(split_traces(req, MAX_REQUEST_BYTES - 64 * 1024).records, "bench", time.time_ns()))
    return [out[i % distinct] for i in range(requests)]


async def _drive(write, batches: list, concurrency: int) -> tuple[float, float]:
    """Write every batch from ``concurrency`` writers; (CPU s, wall s) from the first write to the last ack."""
    await write(batches[0])  # warm-up: connections, producer id, metadata
    queue: asyncio.Queue = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def writer() -> None:
        while not queue.empty():
            await write(queue.get_nowait())

    me = psutil.Process()  # its CPU times cover every thread of this process (librdkafka's included)
    cpu0, t0 = process_cpu_s(me.cpu_times()), time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(concurrency)))
    return process_cpu_s(me.cpu_times()) - cpu0, time.perf_counter() - t0


async def _run_aiokafka(bootstrap: str, topic: str, codec: str, batches: list, concurrency: int):
    from sinks.kafka import KafkaSink

    sink = KafkaSink(bootstrap, topic=topic, compression_type=None if codec == "none" else codec,
                     linger_ms=LINGER_MS, max_batch_size=BATCH_BYTES, max_request_size=MAX_REQUEST_BYTES)
    await sink.start()
    try:
        return await _drive(sink.write, batches, concurrency)
    finally:
        await sink.stop()


async def _run_librdkafka(bootstrap: str, topic: str, codec: str, batches: list, concurrency: int):
    from confluent_kafka import KafkaException, Producer

    loop = asyncio.get_running_loop()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": codec, "linger.ms": LINGER_MS, "batch.size": BATCH_BYTES,
                         "message.max.bytes": MAX_REQUEST_BYTES})
    stop = threading.Event()

    def poll() -> None:  # delivery reports run their callbacks here
        while not stop.is_set():
            producer.poll(0.05)

    poller = threading.Thread(target=poll, name="librdkafka-poll", daemon=True)
    poller.start()

    def settle(fut: asyncio.Future, err) -> None:
        if fut.done():
            return
        if err is not None:
            fut.set_exception(KafkaException(err))
        else:
            fut.set_result(None)

    async def write(batch) -> None:
        futures = []
        for record in batch.records:
            fut = loop.create_future()
            producer.produce(topic, value=record.value, key=record.key, headers=batch.headers(record),
                             on_delivery=lambda err, _msg, f=fut: loop.call_soon_threadsafe(settle, f, err))
            futures.append(fut)
        await asyncio.gather(*futures)

    try:
        return await _drive(write, batches, concurrency)
    finally:
        stop.set()
        poller.join()
        producer.flush(10)


def child(args: argparse.Namespace) -> int:
    """One measurement in this process; prints one JSON line."""
    quiet_library_logs()
    batches = _batches(args.requests, args.spans_per_request, args.spans_per_trace)
    run = _run_aiokafka if args.child_client == "aiokafka" else _run_librdkafka
    cpu_s, wall_s = asyncio.run(run(args.kafka_bootstrap, args.topic, args.child_codec, batches, args.concurrency))
    spans = args.requests * args.spans_per_request
    print(json.dumps({"client": args.child_client, "codec": args.child_codec, "spans": spans,
                      "cpu_s": round(cpu_s, 4), "wall_s": round(wall_s, 4),
                      "spans_per_s": round(spans / wall_s), "spans_per_cpu_s": round(spans / cpu_s)}))
    return 0


def _librdkafka_missing() -> str | None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "confluent-kafka is not installed (make bench-producer installs it)"
    return None


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from sinks.kafka_admin import create_topic

    await create_topic(bootstrap, topic, partitions, max_request_size=MAX_REQUEST_BYTES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.producer_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kafka-bootstrap", metavar="HOST:PORT", default=None,
                        help="use this Kafka cluster instead of starting a single-node broker")
    parser.add_argument("--codecs", default="zstd,lz4", help="comma-separated: zstd, lz4, gzip, snappy, none")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--requests", type=int, default=300, help="export requests per measurement")
    parser.add_argument("--spans-per-request", type=int, default=512)
    parser.add_argument("--spans-per-trace", type=int, default=24)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent writers (as concurrent requests)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default bench/results/)")
    parser.add_argument("--child-client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-codec", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_client:
        return child(args)

    clients = list(CLIENTS)
    skipped = {}
    if (why := _librdkafka_missing()) is not None:
        say(f"[librdkafka] skipped: {why}")
        skipped["librdkafka"] = why
        clients.remove("librdkafka")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    broker = None
    bootstrap = args.kafka_bootstrap
    if bootstrap is None:
        broker, _ = start_harness_broker("harness")
        bootstrap = broker.bootstrap_servers
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for codec in codecs:
                for client in clients:
                    topic = f"trace-source.bench-producer-{uuid.uuid4().hex[:8]}"
                    asyncio.run(_create_topic(bootstrap, topic, args.partitions))
                    cmd = [sys.executable, "-m", "bench.producer_bench", "--kafka-bootstrap", bootstrap,
                           "--topic", topic, "--child-client", client, "--child-codec", codec,
                           "--requests", str(args.requests), "--spans-per-request", str(args.spans_per_request),
                           "--spans-per-trace", str(args.spans_per_trace), "--concurrency", str(args.concurrency)]
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                    if done.returncode != 0:
                        say(f"[{client} {codec}] failed:\n{done.stderr[-2000:]}")
                        return 1
                    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": rnd}
                    runs.append(result)
                    say(f"[round {rnd}] {client:10} {codec:6} {result['spans_per_s']:>9,} spans/s "
                        f"{result['spans_per_cpu_s']:>9,} spans per CPU-s")
    finally:
        if broker is not None:
            broker.stop()

    def med(client: str, codec: str, field: str) -> float | None:
        return median([r[field] for r in runs if r["client"] == client and r["codec"] == codec])

    reference = med("aiokafka", "zstd", "spans_per_cpu_s")
    summary = []
    for codec in codecs:
        for client in clients:
            per_cpu = med(client, codec, "spans_per_cpu_s")
            summary.append({"client": client, "codec": codec, "spans_per_s": med(client, codec, "spans_per_s"),
                            "spans_per_cpu_s": per_cpu,
                            "x_aiokafka_zstd": round(per_cpu / reference, 2) if per_cpu and reference else None})
    print(f"\nproduce path only, {args.requests} requests x {args.spans_per_request} spans per measurement, "
          f"{args.concurrency} writers, acks=all; medians of {args.rounds} interleaved rounds")
    print(f"{'client':12} {'codec':6} {'spans/s':>10} {'spans/CPU-s':>12} {'x aiokafka+zstd':>16}")
    for s in summary:
        ratio = f"{s['x_aiokafka_zstd']:.2f}" if s["x_aiokafka_zstd"] is not None else "-"
        print(f"{s['client']:12} {s['codec']:6} {fmt_k(s['spans_per_s']):>10} {fmt_k(s['spans_per_cpu_s']):>12} "
              f"{ratio:>16}")
    for client, why in skipped.items():
        print(f"{client}: skipped: {why}")
    path = results_path(args.output, f"producer-{timestamp()}.json")
    write_results(path, {"environment": environment(), "args": {k: v for k, v in vars(args).items()
                                                                 if not k.startswith("child")},
                         "runs": runs, "summary": summary, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
