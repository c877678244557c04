"""Assembler CPU cost per span, in-process, next to a reference measured in the same run.

Input: the receiver's own output — ``bench/payloads.py`` export requests split per trace by ``receiver.split`` —
each span written twice (once more as an exporter retry would). Stages, each timed on the same records:

* ``reference``   — parse every record value as ``TracesData`` (upb): the least any consumer must do;
* ``buffer``      — ``pipeline.buffers``: decode ids/times, dedupe, buffer, close (no envelope);
* ``envelope``    — ``buffer`` plus ``pipeline.envelope_builder`` (canonical spans, redaction, agent-run view,
                    idempotency key, validation) and ``Envelope.to_json_bytes``: everything the assembler does
                    except I/O.

Prints spans/s per stage (unique spans; duplicates come on top) and the ratio to ``reference``.
``python -m bench.assembler_bench --help``.
"""

from __future__ import annotations

import argparse
import json
import time

from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from bench.payloads import make_genai_request
from normalizers.redact import Redactor
from pipeline.buffers import AssemblerCore, decode_record
from pipeline.bus import BusRecord
from pipeline.envelope_builder import build_envelope
from receiver.split import split_traces


def make_records(n_requests: int, spans_per_request: int, spans_per_trace: int) -> tuple[list[BusRecord], int]:
    out: list[BusRecord] = []
    spans = 0
    for seed in range(n_requests):
        req = make_genai_request(spans_per_request, spans_per_trace, seed)
        for rec in split_traces(req, 1_000_000).records:
            out.append(BusRecord("trace-source.spans", 0, len(out) + 1, rec.key, rec.value,
                                 (("signal", b"traces"), ("source-id", b"bench"), ("received-at", b"1"))))
        spans += spans_per_request
    # Exporter retries: every record once more, after the originals.
    out += [BusRecord(r.topic, 0, len(out) + i + 1, r.key, r.value, r.headers) for i, r in enumerate(out)]
    return out, spans


def run_reference(records: list[BusRecord]) -> None:
    for r in records:
        TracesData.FromString(r.value)


def run_assembler(records: list[BusRecord], build: bool) -> int:
    clock = [0.0]
    core = AssemblerCore(quiet_period_s=1.0, max_wait_s=300.0, clock=lambda: clock[0], remembered=10**6,
                         retained_bytes=0)
    core.assign([0])
    redactor = Redactor()
    for r in records:
        core.ingest(r, decode_record(r).traces)
    clock[0] = 10.0
    closed = core.due()
    if build:
        for c in closed:
            build_envelope(c, assembled_at_ns=1, redactor=redactor).to_json_bytes()
    return len(closed)


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="export requests (default 8)")
    parser.add_argument("--spans-per-request", type=int, default=512, help="default 512")
    parser.add_argument("--spans-per-trace", type=int, default=24, help="default 24")
    parser.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    records, spans = make_records(args.requests, args.spans_per_request, args.spans_per_trace)
    results = {}
    for name, fn in (("reference", lambda: run_reference(records)),
                     ("buffer", lambda: run_assembler(records, build=False)),
                     ("envelope", lambda: run_assembler(records, build=True))):
        seconds = best_of(args.rounds, fn)
        results[name] = {"seconds": round(seconds, 4), "spans_per_s": round(spans / seconds)}
    for r in results.values():
        r["x_of_reference"] = round(results["reference"]["seconds"] / r["seconds"], 4)
    summary = {"records": len(records), "unique_spans": spans, "traces": run_assembler(records, False),
               "results": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{len(records)} records (half of them retries), {spans} unique spans, {summary['traces']} traces")
    for name, r in results.items():
        print(f"  {name:10} {r['spans_per_s']:>10,} spans/s   {r['x_of_reference'] * 100:6.1f}% of reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
