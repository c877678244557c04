"""Slow and vanishing clients against ``trace-source serve`` (the measurement behind the receiver's read timeout
and its ``499`` outcome): ``python -m bench.slow_clients [--read-timeout-s 60] [--vanishing 3000]``.

* ``--slow`` clients announce a 60 MiB OTLP/HTTP body and send 10 bytes: how long each connection stays open and
  what it is answered (``408`` after ``--read-timeout-s``).
* ``--vanishing`` clients send headers and part of the body, then reset the connection: how ``serve`` counts them in
  ``trace_source_requests_total`` (``status="499"``, never ``500``) and how many error-level log lines and tracebacks
  they cost (none expected).

Prints a summary and writes JSON to ``bench/results/slow-clients-<time>.json``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import ServerProcess, environment, results_path, say, timestamp, write_results

BIN = str(Path(sys.executable).with_name("trace-source"))
HEADERS = "POST /v1/traces HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-protobuf\r\nContent-Length: {n}\r\n\r\n"


async def slow_client(port: int, wait_s: float) -> tuple[str, float]:
    """(first answer line or 'closed' / 'still open', seconds the connection stayed open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEADERS.format(n=60 * 1024 * 1024).encode() + b"0123456789")
    await writer.drain()
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(200), wait_s)
        answer = data.split(b"\r\n")[0].decode() if data else "closed"
    except TimeoutError:
        answer = "still open"
    writer.close()
    return answer, time.monotonic() - started


async def vanishing_client(port: int) -> None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEADERS.format(n=100_000).encode() + b"\x0a" * 500)
        await writer.drain()
        writer.transport.abort()  # RST mid-body, as an exporter that timed out does
    except OSError:
        pass


async def measure(port: int, args: argparse.Namespace) -> dict:
    slow = await asyncio.gather(*[slow_client(port, args.read_timeout_s + 30) for _ in range(args.slow)])
    started = time.monotonic()
    for first in range(0, args.vanishing, 100):
        await asyncio.gather(*[vanishing_client(port) for _ in range(min(100, args.vanishing - first))])
    vanish_s = time.monotonic() - started
    await asyncio.sleep(3)  # let serve finish counting
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
    counted = {}
    for line in metrics.decode().splitlines():
        if line.startswith("trace_source_requests_total{") and 'protocol="http"' in line:
            status = line.split('status="')[1].split('"')[0]
            counted[status] = counted.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return {"slow": [{"answer": a, "open_s": round(t, 2)} for a, t in slow], "vanishing_s": round(vanish_s, 2),
            "requests_total_by_status": counted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read-timeout-s", type=float, default=60.0, help="serve's --read-timeout-s (its default)")
    parser.add_argument("--slow", type=int, default=4, help="slow-body clients")
    parser.add_argument("--vanishing", type=int, default=3000, help="clients that reset mid-body")
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="trace-source-slow-"))
    server = ServerProcess("serve", [BIN, "serve", "--port", "0", "--grpc-port", "0", "--workers", "1",
                                     "--state-dir", str(state), "--execution-policy", "observe",
                                     "--read-timeout-s", str(args.read_timeout_s)], state / "serve.log")
    server.start()
    try:
        result = asyncio.run(measure(server.serving["http_port"], args))
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    result["error_log_lines"] = sum('"level": "error"' in line for line in log.splitlines())
    result["tracebacks"] = log.count("Traceback")
    say(f"{args.slow} slow-body clients, --read-timeout-s {args.read_timeout_s:g}: "
        + ", ".join(f"{s['answer']} after {s['open_s']} s" for s in result["slow"]))
    say(f"{args.vanishing} clients gone mid-body in {result['vanishing_s']} s; requests by status: "
        f"{result['requests_total_by_status']}; error-level log lines: {result['error_log_lines']}; "
        f"tracebacks: {result['tracebacks']}")
    stamp = timestamp()
    write_results(results_path(args.output, f"slow-clients-{stamp}.json"),
                  {"benchmark": "slow-clients", "at": stamp, "environment": environment(),
                   "settings": vars(args) | {"output": str(args.output)}, "results": result})


if __name__ == "__main__":
    main()
