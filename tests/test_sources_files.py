"""`trace-source import`: trace files written by the real OpenTelemetry encoders (the JS SDK's OTLP JSON and protobuf
serializers, the Python SDK's OTLP encoder, JSON lines and the Collector's length-prefixed proto stream),
trace-source envelopes and a Langfuse trace export, with a corrupt file and a foreign one among them; then what
reached the traces topic of the embedded log (once per key), re-imports, new versions, preview, and the loop
grading the imported runs."""

from __future__ import annotations

import json
from pathlib import Path

from loop_support import failing_envelope, passing_envelope, phase_events, poll
from serve_proc import ServeProcess
from sources_support import cli, envelope_file, js_otlp_files, keys_on_topic, python_protobuf_runs, topic_envelopes

LANGFUSE_EXPORT = {  # GET /api/public/traces/{traceId} (TraceWithFullDetails), as exported
    "id": "lf-trace-1", "timestamp": "2026-01-02T10:00:00.000Z", "name": "support-bot",
    "input": {"question": "Where is my parcel?"}, "output": None, "sessionId": "s-1", "userId": "u-7",
    "tags": ["prod"], "latency": 2.5, "observations": [
        {"id": "obs-gen-1", "traceId": "lf-trace-1", "type": "GENERATION", "name": "chat", "model": "gpt-4o-mini",
         "startTime": "2026-01-02T10:00:00.100Z", "endTime": "2026-01-02T10:00:01.200Z",
         "input": [{"role": "user", "content": "Where is my parcel?"}],
         "output": {"role": "assistant", "content": "Let me check."}, "level": "DEFAULT",
         "usageDetails": {"input": 12, "output": 5, "total": 17}, "parentObservationId": None},
        {"id": "obs-tool-1", "traceId": "lf-trace-1", "type": "TOOL", "name": "track_parcel",
         "startTime": "2026-01-02T10:00:01.300Z", "endTime": "2026-01-02T10:00:02.000Z",
         "input": {"parcel": "P-9"}, "output": None, "level": "ERROR",
         "statusMessage": "carrier API returned 502", "parentObservationId": None},
    ]}


def make_inputs(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory of every supported format plus two bad files; returns it and trace id -> how it was written."""
    d = tmp_path / "in"
    d.mkdir()
    made: dict[str, str] = {}
    js = js_otlp_files(d / "js-json", [{"fail": True}, {"fail": False}], "json")
    made.update({t: "js-json" for t in js["traces"]})
    js = js_otlp_files(d / "js-jsonl", [{"fail": True}, {"fail": False}, {"fail": False}], "jsonl")
    made.update({t: "js-jsonl" for t in js["traces"]})
    js = js_otlp_files(d / "js-proto", [{"fail": True}], "protobuf")
    made.update({t: "js-protobuf" for t in js["traces"]})
    made.update({t: "py-protobuf" for t in python_protobuf_runs(d / "python.binpb", [True, False])})
    made.update({t: "py-stream" for t in python_protobuf_runs(d / "collector-stream.pb", [False, True],
                                                              length_prefixed=True)})
    (d / "envelopes").mkdir()
    for env in (failing_envelope(1), passing_envelope(2)):
        (d / "envelopes" / f"{env.trace_id}.json").write_bytes(env.to_json_bytes())
        made[env.trace_id] = "envelope"
    (d / "langfuse-export.json").write_text(json.dumps(LANGFUSE_EXPORT))
    good = (d / "js-json" / "run-0.json").read_text()
    (d / "truncated.json").write_text(good[: len(good) // 2])       # a copy cut short: broken
    (d / "notes.json").write_text(json.dumps({"todo": ["call the carrier"]}))   # JSON, but no trace format
    return d, made


def test_import_every_format_with_bad_files_reported_and_nothing_twice(tmp_path: Path) -> None:
    inputs, made = make_inputs(tmp_path)
    state = tmp_path / "state"

    preview = cli("import", str(inputs), "--preview", "--json", "--state-dir", str(state))
    assert preview.returncode == 1, preview.stderr  # bad files are errors, also in a preview
    shown = json.loads(preview.stdout)
    assert {t["status"] for t in shown["traces"]} == {"new"}
    assert not (state / "spans.db").exists() or not topic_envelopes(state), "a preview imported something"
    by_item = {Path(r["item"]).name: r for r in shown["rejected"]}
    assert by_item["truncated.json"]["error"] == "broken file" and "invalid JSON" in by_item["truncated.json"]["reason"]
    assert by_item["notes.json"]["error"] == "adapter mismatch" and "todo" in by_item["notes.json"]["reason"]
    assert len(by_item) == 2

    first = cli("import", str(inputs), "--json", "--state-dir", str(state))
    assert first.returncode == 1
    out = json.loads(first.stdout)
    imported = {t["trace_id"]: t for t in out["traces"]}
    langfuse = [t for t in out["traces"] if t["source"] and t["agent"] == "support-bot"]
    assert len(langfuse) == 1
    expected = set(made) | {langfuse[0]["trace_id"]}
    assert set(imported) == expected
    assert {t["status"] for t in out["traces"]} == {"imported"}
    # Once per key on the topic; the file view holds the same envelopes.
    keys = keys_on_topic(state)
    assert sorted(keys.values()) == [1] * len(expected)
    for trace_id, row in imported.items():
        env = envelope_file(state, trace_id)
        assert env.idempotency_key == row["idempotency_key"] and keys[env.idempotency_key] == 1
        if made.get(trace_id) != "envelope":
            assert env.source.model_dump() == {"id": "files", "kind": "file"}
            assert env.redaction.masking_applied
    # What the files said, as the envelope holds it.
    js_fail = next(t for t, how in made.items() if how == "js-json" and imported[t]["errors"])
    env = envelope_file(state, js_fail)
    assert env.agent_run.agent_name == "support" and env.agent_run.task_input == "Where is order A-1000?"
    assert env.completeness.root_seen and env.completeness.closed_reason == "root-ended-and-quiet"
    assert [c.name for c in env.agent_run.tool_calls] == ["lookup_order"] and env.agent_run.tool_calls[0].error
    stream = [t for t, how in made.items() if how == "py-stream"]
    assert sorted(imported[t]["errors"] > 0 for t in stream) == [False, True]
    lf = envelope_file(state, langfuse[0]["trace_id"])
    assert lf.agent_run.llm_calls[0].model == "gpt-4o-mini"
    assert lf.agent_run.llm_calls[0].input_tokens == 12 and lf.agent_run.llm_calls[0].output_tokens == 5
    assert any("carrier API returned 502" in (e.message or "") for e in lf.agent_run.errors)
    # Envelope files keep their own content and source.
    assert envelope_file(state, failing_envelope(1).trace_id).idempotency_key == failing_envelope(1).idempotency_key

    again = cli("import", str(inputs), "--json", "--state-dir", str(state))
    assert {t["status"] for t in json.loads(again.stdout)["traces"]} == {"unchanged"}
    assert keys_on_topic(state) == keys, "a second import of the same files changed the topic"


def test_a_changed_trace_is_a_new_version_and_the_old_content_is_skipped(tmp_path: Path) -> None:
    d = tmp_path / "in"
    js = js_otlp_files(d, [{"fail": False}], "json")
    trace_id = js["traces"][0]
    state = tmp_path / "state"
    assert cli("import", str(d), "--state-dir", str(state)).returncode == 0
    v1 = envelope_file(state, trace_id)
    # The same run with one more span (a later export of the same trace): new content, version 2.
    doc = json.loads((d / "run-0.json").read_text())
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    extra = dict(spans[0], spanId="00000000000000aa", name="audit_log")
    spans.append(extra)
    (d / "run-0.json").write_text(json.dumps(doc))
    assert cli("import", str(d), "--state-dir", str(state)).returncode == 0
    v2 = envelope_file(state, trace_id)
    assert v2.envelope_version == 2 and v2.idempotency_key != v1.idempotency_key and len(v2.spans) == 3
    assert keys_on_topic(state) == {v1.idempotency_key: 1, v2.idempotency_key: 1}
    out = cli("import", str(d), "--json", "--state-dir", str(state))
    assert [t["status"] for t in json.loads(out.stdout)["traces"]] == ["unchanged"]


def test_imported_runs_are_graded_by_the_loop(tmp_path: Path) -> None:
    d = tmp_path / "in"
    js = js_otlp_files(d, [{"fail": True}, {"fail": False}], "protobuf")
    state = tmp_path / "state"
    assert cli("import", str(d), "--state-dir", str(state)).returncode == 0
    with ServeProcess(state, "--execution-policy", "grade") as serve:
        grades = poll(lambda: g if len(g := phase_events(state, "grade")) == 2 else None, "two grades", serve)
    verdicts = {e.trace_id: e.status for e in grades}
    assert verdicts == {js["traces"][0]: "failed", js["traces"][1]: "passed"}
    imports = phase_events(state, "import")
    assert len(imports) == 2 and {e.run.trigger for e in imports} == {"import"}
    assert {e.run.source.model_dump()["kind"] for e in imports} == {"file"}


def test_registered_files_source_and_a_push_source_that_is_not_watched(tmp_path: Path) -> None:
    d = tmp_path / "in"
    js = js_otlp_files(d, [{"fail": True}], "jsonl")
    state = tmp_path / "state"
    assert cli("connect", "files", "--name", "exports", "--path", str(d), "--settle-s", "0",
               "--state-dir", str(state)).returncode == 0
    assert cli("test", "exports", "--state-dir", str(state)).returncode == 0
    synced = json.loads(cli("sync", "exports", "--json", "--state-dir", str(state)).stdout)
    assert [(t["trace_id"], t["status"], t["source"]["id"]) for t in synced["traces"]] == [
        (js["traces"][0], "imported", "exports")]
    assert json.loads(cli("sync", "exports", "--json", "--state-dir", str(state)).stdout)["traces"] == []

    assert cli("connect", "otlp", "--name", "prod-agents", "--state-dir", str(state)).returncode == 0
    for command in ("watch", "sync"):
        refused = cli(command, "prod-agents", "--state-dir", str(state))
        assert refused.returncode == 1 and "push source" in refused.stderr and "trace-source serve" in refused.stderr
    listed = {s["name"]: s for s in json.loads(cli("status", "--json", "--state-dir", str(state)).stdout)["sources"]}
    assert listed["prod-agents"]["provider"] == "otlp" and listed["exports"]["imported_total"] == 1
    assert listed["exports"]["validation"] == "valid"
