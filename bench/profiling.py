"""cProfile of a benchmarked process over the measured window only, shared by the receiver and assembler benches.

The bench starts the process as ``python -m bench.profiling PSTATS CLOCK MODULE ARGS...`` (see :func:`command`):
MODULE runs as ``__main__``; SIGUSR1 starts the profilers, SIGUSR2 stops them and writes PSTATS. Profiled are the
main thread (the event loop) and every task run by a ``concurrent.futures`` thread pool (``asyncio.to_thread`` and
``run_in_executor`` — where the assembler builds envelopes), each thread with its own profiler, merged into one
pstats file. Other threads (e.g. the embedded log's writer thread) are not profiled.

CLOCK ``cpu`` times functions with the thread's own CPU time (``time.thread_time``), so time a thread spent
descheduled on a busy machine is not charged to whatever function it was in; ``wall`` uses cProfile's default
wall clock (waiting shows up too). cProfile adds a fixed cost to every Python call, so Python-heavy code looks more
expensive relative to C code than it is, and throughput under the profiler is lower than without it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, say

#: Top-level packages of the project, listed separately by cumulative time.
PROJECT_PACKAGES = ("receiver", "sinks", "trace_source", "pipeline", "normalizers")


def add_arguments(parser, top: int) -> None:
    """``--profile-clock`` and ``--top`` (the bench adds its own ``--profile``)."""
    parser.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                        help="what --profile measures: 'cpu' = each profiled thread's CPU time (robust on a busy "
                             "machine), 'wall' = wall-clock time (shows waiting too) (default: %(default)s)")
    parser.add_argument("--top", type=int, default=top, help="functions listed by --profile (default: %(default)s)")


def command(pstats: Path, clock: str, module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args...`` under this profiler."""
    return [sys.executable, "-m", "bench.profiling", str(pstats), clock, module, *args]


def main(argv: list[str]) -> int:
    """``PSTATS CLOCK MODULE ARGS...``: see the module docstring."""
    import cProfile
    import pstats
    import runpy
    from concurrent.futures import thread as pool_thread

    pstats_path, clock, module, *rest = argv

    def new_profile() -> cProfile.Profile:
        return cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()

    main_profile = new_profile()
    pool_profiles: dict[int, cProfile.Profile] = {}
    active = threading.Event()
    run_work_item = pool_thread._WorkItem.run

    def profiled_run(self) -> None:  # one pool task, under its thread's profiler while the window is open
        if not active.is_set():
            return run_work_item(self)
        prof = pool_profiles.get(threading.get_ident())
        if prof is None:
            prof = pool_profiles[threading.get_ident()] = new_profile()
        prof.enable()
        try:
            return run_work_item(self)
        finally:
            prof.disable()

    pool_thread._WorkItem.run = profiled_run

    def begin(signum, frame) -> None:
        active.set()
        main_profile.enable()

    def end(signum, frame) -> None:
        main_profile.disable()
        active.clear()
        time.sleep(0.2)  # lets pool tasks that started inside the window finish under their profilers
        stats = pstats.Stats(main_profile)
        for prof in list(pool_profiles.values()):
            with contextlib.suppress(TypeError):  # a profiler that never recorded anything
                stats.add(prof)
        stats.dump_stats(pstats_path)

    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        i = filename.find(marker)
        if i >= 0:
            rest = filename[i + len(marker):]
            return rest if marker == "site-packages/" else "stdlib" + rest[rest.find("/"):]
    with contextlib.suppress(ValueError):
        return str(Path(filename).resolve().relative_to(REPO))
    return filename


def _component(filename: str, name: str) -> str:
    if filename == "~":
        if any(c in name for c in ("lz4", "zstd", "snappy", "zlib", "Compress", "compress")):
            return "compression (C)"
        if "FromString" in name or "SerializeToString" in name or "ParseFromString" in name:
            return "protobuf (upb, C)"
        if "pydantic_core" in name or "SchemaValidator" in name or "SchemaSerializer" in name:
            return "pydantic-core (Rust)"
        if "orjson" in name:
            return "orjson (Rust)"
        if "epoll" in name or "select" in name:
            return "event loop: waiting in epoll (idle)"
        if "socket" in name or "recv" in name or "send" in name:
            return "socket I/O (C)"
        return "other builtins (C)"
    short = _short(filename)
    if short.startswith("stdlib/"):
        mod = short.split("/")[1].removesuffix(".py")
        return f"stdlib {mod}"
    parts = short.split("/")
    if parts[0] in PROJECT_PACKAGES and len(parts) > 1:
        return "/".join(parts[:2]).removesuffix(".py")  # per module: where the project's own time goes
    return parts[0].removesuffix(".py")


def report(pstats_path: Path, top: int, wall_s: float, clock: str, what: str = "the server") -> dict[str, Any]:
    """Print the top functions by own time, own time per component and the project's functions by cumulative
    time; return the same as a JSON-ready dict."""
    import pstats

    stats = pstats.Stats(str(pstats_path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    components: dict[str, float] = {}
    for (filename, line, name), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        comp = _component(filename, name)
        components[comp] = components.get(comp, 0.0) + tt
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append({"function": where, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4), "ncalls": nc,
                     "primitive_calls": cc, "component": comp})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    unit = "CPU s of the profiled threads" if clock == "cpu" else "s wall clock"
    say(f"\nProfile of {what} over the measured window ({wall_s:g} s wall, {total:.2f} {unit}; cProfile adds "
        f"overhead per Python call, so Python-heavy code looks more expensive than it is)")
    say(f"top {top} functions by own time (tottime):")
    say(f"{'tottime s':>9} {'%':>5} {'cumtime s':>9} {'calls':>9}  function")
    for r in rows[:top]:
        say(f"{r['tottime_s']:9.3f} {100 * r['tottime_s'] / total:5.1f} {r['cumtime_s']:9.3f} {r['ncalls']:9d}  "
            f"{r['function']}")
    say("\nown time by component:")
    comps = sorted(components.items(), key=lambda kv: kv[1], reverse=True)
    for comp, tt in comps[:25]:
        say(f"{tt:9.3f} {100 * tt / total:5.1f}%  {comp}")
    by_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)
    project = [r for r in by_cum if r["function"].split("/")[0] in PROJECT_PACKAGES][:20]
    say("\nproject functions by cumulative time (time spent in them and everything they call):")
    for r in project:
        say(f"{r['cumtime_s']:9.3f} {100 * r['cumtime_s'] / total:5.1f}%  {r['function']}  ({r['ncalls']} calls)")
    return {"pstats": str(pstats_path), "clock": clock, "profiled_s": round(total, 3), "top_tottime": rows[:top],
            "components": {k: round(v, 4) for k, v in comps}, "top_cumtime_project": project}


def send(proc, begin: bool) -> None:
    """Open (``begin``) or close the profiled window of a :class:`bench.common.LoggedProcess`."""
    proc.signal(signal.SIGUSR1 if begin else signal.SIGUSR2)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
