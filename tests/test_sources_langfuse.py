"""The Langfuse source against a local server in the documented shape of Langfuse's public API (tests/langfuse_fake.py
— a fake only because Langfuse cloud cannot run here): pagination with equal timestamps across pages, the timestamp
cursor, generations with usage, errors from levels; every trace imported once; an updated trace is a new version;
a 401 blocks the source with the auth failure named; `watch` killed with SIGKILL mid-page and restarted loses and
repeats nothing (envelopes counted per key)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from langfuse_fake import FakeLangfuse, make_trace, many_traces, wait
from normalizers.foreign import trace_id_of
from serve_proc import CliProcess
from sources_support import cli, envelope_file, keys_on_topic

KEYS = {"LANGFUSE_PUBLIC_KEY": "pk-lf-test", "LANGFUSE_SECRET_KEY": "sk-lf-test"}


def connect(state: Path, base_url: str, *extra: str, name: str = "lf") -> None:
    out = cli("connect", "langfuse", "--name", name, "--base-url", base_url, "--page-size", "10",
              "--state-dir", str(state), *extra)
    assert out.returncode == 0, out.stderr


def test_sync_imports_every_trace_once_with_the_run_view(tmp_path: Path) -> None:
    traces = many_traces(25)
    state = tmp_path / "state"
    with FakeLangfuse(traces) as lf:
        connect(state, lf.base_url, "--lookback-s", "3600")
        tested = cli("test", "lf", "--json", "--state-dir", str(state), env=KEYS)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert {c["check"] for c in json.loads(tested.stdout)["checks"]} >= {"reachable and authenticated",
                                                                             "one page read and normalized"}
        listed = sum(u.startswith("/api/public/traces?") for u in lf.requests)
        first = cli("sync", "lf", "--json", "--state-dir", str(state), env=KEYS)
        assert first.returncode == 0, first.stderr
        rows = json.loads(first.stdout)["traces"]
        expected = {trace_id_of(t["id"], "langfuse-trace") for t in traces}
        assert {r["trace_id"] for r in rows} == expected and {r["status"] for r in rows} == {"imported"}
        assert sum(u.startswith("/api/public/traces?") for u in lf.requests) - listed == 3  # 25 traces, 10 a page
        keys = keys_on_topic(state)
        assert len(keys) == 25 and set(keys.values()) == {1}

        env = envelope_file(state, trace_id_of("lf-00003", "langfuse-trace"))
        assert env.source.model_dump() == {"id": "lf", "kind": "langfuse"}
        assert env.agent_run.agent_name == "support-bot" and env.agent_run.task_input == "Where is parcel P-3?"
        call = env.agent_run.llm_calls[0]
        assert (call.model, call.input_tokens, call.output_tokens) == ("gpt-4o-mini", 23, 7)
        assert [t.name for t in env.agent_run.tool_calls] == ["track_parcel"]
        assert any("carrier API returned 502" in (e.message or "") for e in env.agent_run.errors)
        assert next(s for s in env.spans if s.name == "track_parcel").status_code == "ERROR"
        passing = envelope_file(state, trace_id_of("lf-00001", "langfuse-trace"))
        assert not passing.agent_run.errors and passing.agent_run.final_output == "It is in transit."

        # Nothing new: nothing imported, and nothing fetched again (the listing entries are unchanged). A new trace
        # and an updated one (a late observation): imported, the updated one as version 2.
        fetched = sum("/api/public/traces/" in u for u in lf.requests)
        assert json.loads(cli("sync", "lf", "--json", "--state-dir", str(state), env=KEYS).stdout)["traces"] == []
        assert sum("/api/public/traces/" in u for u in lf.requests) == fetched
        last = traces[-1]
        late = make_trace(99, datetime.fromisoformat(last["timestamp"].replace("Z", "+00:00")) + timedelta(seconds=5),
                          fail=False)
        traces.append(late)
        updated = traces[24]
        updated["observations"].append({**updated["observations"][2], "id": "lf-00024-late", "name": "follow_up",
                                        "startTime": updated["observations"][2]["startTime"]})
        out = json.loads(cli("sync", "lf", "--json", "--state-dir", str(state), env=KEYS).stdout)
        changed = {r["trace_id"]: (r["status"], r["envelope_version"]) for r in out["traces"]
                   if r["status"] != "unchanged"}
        assert changed == {trace_id_of("lf-00099", "langfuse-trace"): ("imported", 1),
                           trace_id_of("lf-00024", "langfuse-trace"): ("imported", 2)}
        assert len(keys_on_topic(state)) == 27 and set(keys_on_topic(state).values()) == {1}
        status = json.loads(cli("status", "lf", "--json", "--state-dir", str(state)).stdout)
        assert status["validation"] == "valid" and status["status"] == "ok" and status["imported_total"] == 27
        assert status["cursor"]["timestamp"].startswith(late["timestamp"][:19])


def test_a_refused_key_blocks_the_source_with_the_auth_failure(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with FakeLangfuse(many_traces(3)) as lf:
        connect(state, lf.base_url)
        bad = {**KEYS, "LANGFUSE_SECRET_KEY": "sk-lf-wrong"}
        tested = cli("test", "lf", "--state-dir", str(state), env=bad)
        assert tested.returncode == 1 and "auth" in tested.stdout and "HTTP 401" in tested.stdout
        synced = cli("sync", "lf", "--state-dir", str(state), env=bad)
        assert synced.returncode == 1 and "blocked — auth:" in synced.stderr
        missing = cli("sync", "lf", "--state-dir", str(state), env={"LANGFUSE_PUBLIC_KEY": "pk-lf-test"})
        assert missing.returncode == 1 and "missing auth" in missing.stderr and "LANGFUSE_SECRET_KEY" in missing.stderr
        summary = cli("status", "--state-dir", str(state))
        assert "blocked" in summary.stdout and "missing auth" in summary.stdout
        source = json.loads(cli("status", "lf", "--json", "--state-dir", str(state)).stdout)
        assert source["status"] == "blocked" and source["validation"] == "invalid" and source["cursor"] is None
        assert not (state / "spans.db").exists() or not keys_on_topic(state)


def test_watch_killed_mid_page_loses_and_repeats_nothing(tmp_path: Path) -> None:
    traces = many_traces(40)
    state = tmp_path / "state"
    with FakeLangfuse(traces) as lf:
        connect(state, lf.base_url)
        # The reader stops inside the second page (10 a page): trace lf-00014 is not answered until released.
        lf.hold = {"lf-00014"}
        watch = CliProcess(tmp_path / "watch.log", ["watch", "lf", "--interval-s", "0.5", "--state-dir", str(state)],
                           env=KEYS)
        watch.launch("watching", 30)
        wait(lambda: "/api/public/traces/lf-00014" in lf.requests or None)
        watch.kill()  # SIGKILL, no shutdown at all, with lf-00010..13 of the page read and not yet imported
        assert len(keys_on_topic(state)) == 10
        cursor = json.loads(cli("status", "lf", "--json", "--state-dir", str(state)).stdout)["cursor"]
        assert sorted(cursor["seen"]) == [f"lf-{n:05d}" for n in range(10)]
        lf.release()
        restarted = CliProcess(tmp_path / "watch.log", ["watch", "lf", "--interval-s", "0.5", "--state-dir",
                                                        str(state)], env=KEYS)
        restarted.launch("watching", 30)
        try:
            wait(lambda: len(keys_on_topic(state)) == 40 or None, 120)
            listed = sum(u.startswith("/api/public/traces?") for u in lf.requests)
            wait(lambda: sum(u.startswith("/api/public/traces?") for u in lf.requests) > listed + 4 or None, 60)
        finally:
            restarted.stop()
    counts = keys_on_topic(state)
    assert len(counts) == 40 and set(counts.values()) == {1}, counts
    assert {envelope_file(state, trace_id_of(t["id"], "langfuse-trace")).trace_id for t in traces} == \
        {trace_id_of(t["id"], "langfuse-trace") for t in traces}


def test_a_sync_dying_after_part_of_a_page_was_delivered_repeats_nothing(tmp_path: Path) -> None:
    """The other crash points: envelopes of a page on the topic, the page's cursor not stored yet, and the last one
    delivered but not remembered by the source's state. (In-process: the destination raises right after its 15th
    delivery, as a process killed there would stop.)"""
    from normalizers.envelope import Envelope
    from pipeline.sources.importer import SinkDestination
    from pipeline.sources.store import SourceStore
    from pipeline.sources.sync import sync_once
    from sinks.envelopes import LocalEnvelopeSink

    class Died(BaseException):
        pass

    class DyingDestination(SinkDestination):
        def __init__(self, sink, after: int) -> None:
            super().__init__(sink)
            self.left = after

        async def deliver(self, envelope: Envelope, trigger: str):
            delivered = await super().deliver(envelope, trigger)
            self.left -= 1
            if self.left == 0:
                raise Died()  # on the topic, not yet remembered by the source's state
            return delivered

    traces = many_traces(24)
    state = tmp_path / "state"
    with FakeLangfuse(traces) as lf:
        connect(state, lf.base_url)

        async def run(after: int | None):
            sink = LocalEnvelopeSink(state)
            await sink.start()
            store = SourceStore(state)
            try:
                dest = SinkDestination(sink) if after is None else DyingDestination(sink, after)
                return await sync_once(store, "lf", dest)
            finally:
                store.close()
                await sink.stop()

        import os

        os.environ.update(KEYS)
        try:
            with pytest.raises(Died):
                asyncio.run(run(15))  # page 1 (10) done, 5 of page 2 delivered, its cursor not stored
            assert len(keys_on_topic(state)) == 15
            result = asyncio.run(run(None))
        finally:
            for k in KEYS:
                os.environ.pop(k, None)
    # lf-00015..23 new; of the re-read page lf-00010..13 remembered, lf-00014 found on the topic by its key.
    assert {k: v for k, v in result.counts().items() if v} == {"imported": 9, "unchanged": 4, "duplicate": 1}
    counts = keys_on_topic(state)
    assert len(counts) == 24 and set(counts.values()) == {1}
