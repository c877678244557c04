"""Helpers for the ledger and journal contract tests (tests/test_ledger.py, tests/test_journal.py): run the same
coroutine in several processes at once, and read the Postgres server's clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent

# A child process: reads its arguments (one JSON line) from stdin, opens and starts the store ``args["store"]``
# (``module:Class``) on ``args["target"]``, prints ``ready`` and runs ``work`` only after the parent says "go" on
# stdin, so every child has imported, connected and started before any begins to work; then prints the result as
# one JSON line.
_PRELUDE = """\
import asyncio, importlib, json, sys

{body}

async def _main():
    args = json.loads(sys.stdin.readline())
    module, name = args["store"].split(":")
    store = getattr(importlib.import_module(module), name)(args["target"])
    await store.start()
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print(json.dumps(await work(store, args)), flush=True)
    finally:
        await store.close()

asyncio.run(_main())
"""


def run_in_processes(body: str, args_per_process: list[dict], timeout_s: float = 120.0) -> list:
    """Start one Python process per ``args_per_process`` item (each with ``store``, ``module:Class`` of a ledger or
    journal, and its ``target``) running ``body`` — source defining ``async def work(store, args) -> JSON-able``
    —, release them together once all have started their store, and return their results in order. Raises
    ``AssertionError`` with a child's stderr when one fails."""
    script = _PRELUDE.format(body=textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in args_per_process]
    try:
        for proc, args in zip(procs, args_per_process):
            proc.stdin.write(json.dumps(args) + "\n")
            proc.stdin.flush()
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                proc.kill()
                raise AssertionError(f"a child did not get ready: {line!r}\n{proc.stderr.read()}")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, f"a child failed ({proc.returncode}):\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def server_now(database_url: str) -> float:
    """The Postgres server's ``now()`` as unix seconds (the clock its leases use)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT extract(epoch FROM now())::float8")
        return (await cur.fetchone())[0]


def set_schema_version(database_url: str, component: str, version: int) -> None:
    """Record ``component`` at schema ``version`` in ``schema_migrations`` (as a newer trace-source would)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, %s)", (component, version))
