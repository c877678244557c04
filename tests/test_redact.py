"""Redaction: each default rule on realistic text, JSON-string attributes, nested values, secret-named keys, no false
positives on ids / token counts / prose, allow and deny lists, counts, and the envelope pass."""

from __future__ import annotations

import inspect
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import normalizers.redact as redact_module

from normalizers.agent_run import AgentRun, ToolCall
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan, Scope, SpanEvent, SpanLink
from normalizers.envelope import Completeness, Envelope, Source, envelope_idempotency_key
from normalizers.redact import (
    RULE_NAMES, SECRET_ATTRIBUTE_RULE, TEXT_RULES, RedactionConfig, Redactor, is_secret_key)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
REDACTOR = Redactor()

# Shaped like real credentials, but not real ones.
OPENAI = "sk-proj-" + "Ab3dEf7hIj" * 5 + "T3BlbkFJ" + "x9Y8z7W6v5"
OPENAI_LEGACY = "sk-" + "a1B2c3D4e5" * 4 + "F6g7H8i9"
ANTHROPIC = "sk-ant-api03-" + "Zx9_Yw8-Vu7" * 8 + "-AbCdEfAA"
AWS = "AKIAIOSFODNN7EXAMPLE"
GITHUB = "ghp_" + "16C7e42F292c6912E7710c838347Ae178B4a"
GITHUB_PAT = "github_pat_11ABCDEFG0" + "abcdefghij_ABCDEFGHIJ0123456789" * 2
SLACK = "xoxb-" + "2631598403-" + "5412368790123-" + "aBcDeFgHiJkLmNoPqRsTuVwX"
GOOGLE = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
STRIPE = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
       "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----")
BEARER = "mF_9.B5f-4.1JqM" + "abcdefghij0123"


def masked(text: str) -> tuple[str, dict[str, int]]:
    return REDACTOR.mask_text(text)


# -- each default text rule ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, text, secret", [
    ("openai-api-key", f"client = OpenAI(api_key_from_env) # fallback {OPENAI} used", OPENAI),
    ("openai-api-key", f"export OPENAI_KEY_VALUE {OPENAI_LEGACY}", OPENAI_LEGACY),
    ("anthropic-api-key", f"Using key {ANTHROPIC} for claude", ANTHROPIC),
    ("aws-access-key-id", f"aws configure set aws_access_key_id {AWS}", AWS),
    ("github-token", f"git clone https://github.com/acme/x.git with {GITHUB}", GITHUB),
    ("github-token", f"token {GITHUB_PAT} expires tomorrow", GITHUB_PAT),
    ("slack-token", f"slack client init {SLACK}", SLACK),
    ("google-api-key", f"https://maps.googleapis.com/maps/api/geocode/json?address=x&key={GOOGLE}", GOOGLE),
    ("stripe-api-key", f"stripe.api_base; stripe key {STRIPE}", STRIPE),
    ("huggingface-token", f"huggingface-cli login --token-value {HF}", HF),
    ("authorization-header", "curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA==' https://x", "dXNlcjpwYXNzd29yZA=="),
    ("authorization-header", '{"headers": {"Authorization": "Bearer ' + BEARER + '"}}', BEARER),
    ("bearer-token", f"send it with bearer {BEARER} to the API", BEARER),
    ("jwt", f"id token was {JWT}", JWT),
    ("private-key", f"here is the key:\n{PEM}\nkeep it safe", "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeL"),
    ("url-password", "DATABASE_URL=postgres://app:s3cr3t-P4ss@db.internal:5432/app", "s3cr3t-P4ss"),
    ("url-password", "redis://:hunter2hunter2@cache:6379/0", "hunter2hunter2"),
    ("url-query-secret", "https://b.s3.amazonaws.com/o?X-Amz-Date=20240101&X-Amz-Signature=9f86d081884c7d65", "9f86d"),
    ("password", "login with user=bob password=Tr0ub4dor&3 then continue", "Tr0ub4dor"),
    ("password", "DB_PASSWORD=hunter2", "hunter2"),
    ("password", 'connect(host="db", passwd="correct horse battery staple")', "correct horse"),
    ("password", "dbPassword: 'p@ss w0rd'", "p@ss w0rd"),
    ("generic-api-key", "OPENAI_API_KEY=abcd1234efgh5678", "abcd1234efgh5678"),
    ("generic-api-key", 'curl -H "x-api-key: 0123456789abcdef" https://api.example.com', "0123456789abcdef"),
    ("secret-assignment", "client_secret=Zm9vYmFyYmF6cXV4", "Zm9vYmFyYmF6cXV4"),
    ("secret-assignment", '{"refresh_token": "1//0gABCDEFGHIJ"}', "1//0gABCDEFGHIJ"),
    ("secret-assignment", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
])
def test_each_default_rule_masks_its_secret(rule, text, secret):
    out, counts = masked(text)
    assert secret not in out
    assert f"[REDACTED:{rule}]" in out
    assert counts == {rule: 1}


def test_every_rule_has_a_case_above():
    # keeps the parametrized cases in step with TEXT_RULES
    cases = inspect.getsource(test_each_default_rule_masks_its_secret)
    for name in {r.name for r in TEXT_RULES}:
        assert f'("{name}",' in cases, f"no test case for rule {name}"
    assert set(RULE_NAMES) == {r.name for r in TEXT_RULES} | {SECRET_ATTRIBUTE_RULE}


def test_masking_keeps_the_surrounding_text():
    out, _ = masked(f"DATABASE_URL=postgres://app:s3cr3t@db:5432/app and Bearer {BEARER}.")
    assert out == ("DATABASE_URL=postgres://app:[REDACTED:url-password]@db:5432/app and "
                   "Bearer [REDACTED:bearer-token].")


def test_several_secrets_in_one_string_are_counted_each():
    out, counts = masked(f"{OPENAI} and {OPENAI_LEGACY} and {AWS}")
    assert counts == {"openai-api-key": 2, "aws-access-key-id": 1}
    assert out == "[REDACTED:openai-api-key] and [REDACTED:openai-api-key] and [REDACTED:aws-access-key-id]"


def test_anthropic_keys_are_not_reported_as_openai_keys():
    assert masked(ANTHROPIC) == ("[REDACTED:anthropic-api-key]", {"anthropic-api-key": 1})


def test_a_truncated_private_key_is_still_masked():
    clipped = PEM[:120]  # attribute length limits cut the END line off
    out, counts = masked("key: " + clipped)
    assert "MIIEowIBAAKCAQEA" not in out and counts == {"private-key": 1}


# -- JSON-string attributes ------------------------------------------------------------------------------------------

def test_secrets_inside_a_json_string_attribute_are_masked_and_the_json_stays_valid():
    messages = [
        {"role": "system", "parts": [{"type": "text", "content": f"Use key {OPENAI}. Password: hunter2!"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "login",
                                         "arguments": {"user": "bob", "password": "p4ss \"quoted\" word"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1",
                                    "response": json.dumps({"api_key": "abcdef0123456789", "ok": True})}]},
        {"role": "user", "parts": [{"type": "text", "content": (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----")}]},
    ]
    raw = json.dumps(messages)
    out, counts = masked(raw)
    decoded = json.loads(out)  # still JSON
    assert decoded[0]["parts"][0]["content"] == "Use key [REDACTED:openai-api-key]. Password: [REDACTED:password]"
    assert decoded[1]["parts"][0]["arguments"] == {"user": "bob", "password": "[REDACTED:password]"}
    # JSON inside a JSON string (escaped quotes) keeps its own quoting too
    assert json.loads(decoded[2]["parts"][0]["response"]) == {"api_key": "[REDACTED:generic-api-key]", "ok": True}
    assert decoded[3]["parts"][0]["content"] == "[REDACTED:private-key]"
    assert counts == {"openai-api-key": 1, "password": 2, "generic-api-key": 1, "private-key": 1}


def test_a_tool_schema_that_mentions_password_is_left_alone():
    schema = json.dumps({"type": "object", "properties": {"password": {"type": "string", "minLength": 8},
                                                           "api_key": {"type": "string"}}})
    assert masked(schema) == (schema, {})


# -- no false positives ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    TRACE, "00f067aa0ba902b7", "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
    "gpt-4o-mini-2024-07-18", "claude-3-5-sonnet-20241022", "anthropic.claude-3-haiku-20240307-v1:0",
    "The bearer of this letter is trusted.", "Reset your password from the settings page.",
    "The API key rotation policy is described in the runbook.", "tokens used: 1234, max_tokens=4096",
    '{"token": "Hello", "logprob": -0.25, "top_logprobs": []}', "the task-list-for-the-weekend-is-long",
    "https://api.openai.com/v1/chat/completions?stream=true", "https://example.com:8443/path?a=b@c",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "The secret: be kind", "",
])
def test_no_false_positives(text):
    assert masked(text) == (text, {})


@pytest.mark.parametrize("key", [
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
    "llm.token_count.prompt", "llm.token_count.completion_details.reasoning", "llm.usage.total_tokens",
    "gen_ai.token.type", "ai.usage.promptTokens", "ai.usage.outputTokenDetails.reasoningTokens",
    "gen_ai.request.max_tokens", "tokenizer", "session.id", "gen_ai.request.model", "http.request.header.accept",
    "keyboard", "gen_ai.tool.call.id",
])
def test_keys_that_are_not_secrets(key):
    assert not is_secret_key(key)


@pytest.mark.parametrize("key", [
    "password", "db.password", "PASSWORD_HASH", "client_secret", "http.request.header.authorization",
    "http.request.header.x-api-key", "http.request.header.cookie", "apiKey", "OPENAI_API_KEY", "access_token",
    "x-auth-token", "token", "private_key", "aws.secret_access_key", "accessKey", "credentials",
])
def test_keys_that_name_secrets(key):
    assert is_secret_key(key)


# -- attribute maps, nested values and models -------------------------------------------------------------------------

def span(attributes=None, **kw) -> CanonicalSpan:
    fields = dict(trace_id=TRACE, span_id="00f067aa0ba902b7", name="chat", end_time_unix_nano=10,
                  attributes=attributes or {})
    fields.update(kw)
    return CanonicalSpan(**fields)


def test_secret_named_keys_mask_whole_strings_but_keep_numbers():
    s = span({
        "http.request.header.authorization": ["Bearer abc", "Basic xyz"],
        "db.password": "hunter2",
        "gen_ai.usage.input_tokens": 812, "llm.token_count.prompt": 10, "max_token": 5,
        "empty.password": "",
        "config": {"region": "eu", "credentials": {"user": "bob", "pin": 1234}, "nested": [{"apiKey": "zzz"}]},
    })
    out = REDACTOR.redact([s])
    attrs = out.spans[0].attributes
    mask = "[REDACTED:secret-attribute]"
    assert attrs["http.request.header.authorization"] == [mask, mask]
    assert attrs["db.password"] == mask
    assert attrs["gen_ai.usage.input_tokens"] == 812 and attrs["llm.token_count.prompt"] == 10
    assert attrs["max_token"] == 5
    assert attrs["empty.password"] == ""  # nothing to hide, nothing counted
    assert attrs["config"] == {"region": "eu", "credentials": {"user": mask, "pin": 1234}, "nested": [{"apiKey": mask}]}
    assert out.report.masked == {SECRET_ATTRIBUTE_RULE: 5}
    assert out.report.masking_applied


def test_text_rules_reach_nested_lists_and_maps():
    s = span({"tool.args": {"env": [f"KEY={OPENAI}", "DEBUG=1"], "url": "https://u:pw123456@h/x"}})
    attrs = REDACTOR.redact([s]).spans[0].attributes
    assert attrs["tool.args"] == {"env": ["KEY=[REDACTED:openai-api-key]", "DEBUG=1"],
                                  "url": "https://u:[REDACTED:url-password]@h/x"}


def test_every_text_field_of_spans_and_log_events_is_covered():
    s = span({}, name=f"GET /v1?token={GITHUB}", status_message=f"401 for {OPENAI}",
             events=[SpanEvent(name="exception", time_unix_nano=1, attributes={"exception.message": f"bad {AWS}"})],
             links=[SpanLink(trace_id=TRACE, span_id="b7ad6b7169203331", attributes={"note": f"jwt {JWT}"})],
             resource={"env.DB_URL": "mysql://root:toor1234@db/x"},
             scope=Scope(name="x", attributes={"client_secret_ref": "vault:kv/secret"}))
    log = CanonicalLogEvent(trace_id=TRACE, event_name="gen_ai.user.message",
                            body={"content": f"my key is {ANTHROPIC}", "role": "user"},
                            attributes={"user.password": "pw"}, resource={"k": f"Bearer {BEARER}"})
    out = REDACTOR.redact([s], [log])
    rs, rl = out.spans[0], out.log_events[0]
    dumped = json.dumps([rs.model_dump(), rl.model_dump()])
    for secret in (GITHUB, OPENAI, AWS, JWT, "toor1234", "vault:kv", ANTHROPIC, BEARER, '"pw"'):
        assert secret not in dumped
    assert rs.name == "GET /v1?token=[REDACTED:url-query-secret]"
    assert rl.body == {"content": "my key is [REDACTED:anthropic-api-key]", "role": "user"}
    assert out.report.masked == {"url-query-secret": 1, "openai-api-key": 1, "aws-access-key-id": 1, "jwt": 1,
                                 "url-password": 1, SECRET_ATTRIBUTE_RULE: 2, "anthropic-api-key": 1,
                                 "bearer-token": 1}


def test_ids_times_and_status_are_never_touched():
    s = span({"k": OPENAI}, status_code="ERROR", parent_span_id="b7ad6b7169203331")
    r = REDACTOR.redact([s]).spans[0]
    assert (r.trace_id, r.span_id, r.parent_span_id, r.end_time_unix_nano, r.status_code) == (
        s.trace_id, s.span_id, s.parent_span_id, s.end_time_unix_nano, s.status_code)


def test_inputs_are_not_modified_and_unchanged_items_are_returned_as_is():
    secret_span = span({"k": f"use {OPENAI}", "list": [f"x {AWS}"]})
    before = secret_span.model_dump()
    clean = span({"k": "nothing to see"}, span_id="b7ad6b7169203331")
    log = CanonicalLogEvent(trace_id=TRACE, body="plain text body")
    out = REDACTOR.redact([secret_span, clean], [log])
    assert secret_span.model_dump() == before
    assert out.spans[1] is clean and out.log_events[0] is log
    assert out.spans[0] is not secret_span


def test_redacting_twice_changes_nothing_and_counts_nothing():
    s = span({"a": f"{OPENAI} password=hunter2 {PEM}", "db.password": "x", "j": json.dumps({"password": "pw"})})
    once = REDACTOR.redact([s])
    twice = REDACTOR.redact(once.spans)
    assert twice.spans[0] is once.spans[0]
    assert twice.report.masked == {}
    assert once.report.masked == {"openai-api-key": 1, "password": 2, "private-key": 1, SECRET_ATTRIBUTE_RULE: 1}


def test_repeated_resource_values_are_counted_per_occurrence():
    resource = {"db.url": "postgres://u:pw12345678@db/x"}
    spans = [span({}, span_id=f"{i:016x}", resource=resource) for i in range(3)]
    out = REDACTOR.redact(spans)
    assert out.report.masked == {"url-password": 3}
    assert all(s.resource == {"db.url": "postgres://u:[REDACTED:url-password]@db/x"} for s in out.spans)


# -- configuration: allow / deny lists, disabled rules ----------------------------------------------------------------

def test_deny_list_drops_matching_keys_everywhere_and_counts_them():
    r = Redactor(RedactionConfig(deny_attributes=("gen_ai.input.*", "user.email")))
    s = span({"gen_ai.input.messages": "[]", "gen_ai.request.model": "gpt-4o", "user.email": "a@b.c"},
             events=[SpanEvent(name="e", time_unix_nano=1, attributes={"user.email": "a@b.c", "ok": 1})],
             resource={"user.email": "a@b.c", "service.name": "s"})
    out = r.redact([s], [CanonicalLogEvent(attributes={"gen_ai.input.messages": "[]", "x": 1})])
    rs = out.spans[0]
    assert rs.attributes == {"gen_ai.request.model": "gpt-4o"}
    assert rs.events[0].attributes == {"ok": 1}
    assert rs.resource == {"service.name": "s"}
    assert out.log_events[0].attributes == {"x": 1}
    assert (out.report.dropped_by_deny_list, out.report.dropped_by_allow_list) == (5, 0)


def test_allow_list_keeps_only_matching_keys_and_deny_wins():
    r = Redactor(RedactionConfig(allow_attributes=("gen_ai.*", "service.name"), deny_attributes=("gen_ai.prompt",)))
    s = span({"gen_ai.request.model": "gpt-4o", "gen_ai.prompt": "hi", "http.url": "https://x", "db.statement": "q"},
             resource={"service.name": "s", "host.name": "h"})
    out = r.redact([s])
    assert out.spans[0].attributes == {"gen_ai.request.model": "gpt-4o"}
    assert out.spans[0].resource == {"service.name": "s"}
    assert (out.report.dropped_by_deny_list, out.report.dropped_by_allow_list) == (1, 3)


def test_an_empty_allow_list_drops_every_attribute():
    out = Redactor(RedactionConfig(allow_attributes=())).redact([span({"a": 1, "b": 2})])
    assert out.spans[0].attributes == {} and out.report.dropped_by_allow_list == 2


def test_globs_are_case_sensitive_and_match_whole_keys():
    out = Redactor(RedactionConfig(deny_attributes=("user.*",))).redact(
        [span({"user.id": "1", "User.id": "2", "enduser.id": "3"})])
    assert out.spans[0].attributes == {"User.id": "2", "enduser.id": "3"}


def test_disabled_rules_are_not_applied():
    r = Redactor(RedactionConfig(disabled_rules=frozenset({"openai-api-key", SECRET_ATTRIBUTE_RULE})))
    out = r.redact([span({"a": f"{OPENAI} {AWS}", "db.password": "hunter2"})])
    assert out.spans[0].attributes == {"a": f"{OPENAI} [REDACTED:aws-access-key-id]", "db.password": "hunter2"}


def test_masking_off_leaves_content_but_still_applies_the_lists():
    r = Redactor(RedactionConfig(mask_secrets=False, deny_attributes=("drop.me",)))
    out = r.redact([span({"a": OPENAI, "db.password": "x", "drop.me": 1})])
    assert out.spans[0].attributes == {"a": OPENAI, "db.password": "x"}
    assert out.report.masking_applied is False and out.report.masked == {} and out.report.dropped_by_deny_list == 1


def test_unknown_rule_names_are_rejected():
    with pytest.raises(ValidationError, match="unknown redaction rule"):
        RedactionConfig(disabled_rules=frozenset({"openai-key"}))


# -- the envelope pass -----------------------------------------------------------------------------------------------

def _envelope(spans, **kw) -> Envelope:
    return Envelope(idempotency_key=envelope_idempotency_key(TRACE, spans), trace_id=TRACE,
                    source=Source(id="default", kind="otlp-grpc"), received_at_unix_nano=1,
                    assembled_at_unix_nano=2, completeness=Completeness(root_seen=True, closed_reason="max-wait"),
                    spans=spans, **kw)


def test_redact_envelope_covers_the_agent_run_and_keeps_the_key():
    s = span({"gen_ai.input.messages": json.dumps([{"role": "user", "content": f"key {OPENAI}"}])})
    run = AgentRun(task_input=f"key {OPENAI}",
                   tool_calls=[ToolCall(name="login", arguments={"user": "bob", "password": "hunter2"})])
    env = _envelope([s], agent_run=run, resource={"auth.token": "abc"})
    out = REDACTOR.redact_envelope(env)
    assert out.idempotency_key == env.idempotency_key
    assert out.agent_run.task_input == "key [REDACTED:openai-api-key]"
    assert out.agent_run.tool_calls[0].arguments == {"user": "bob", "password": "[REDACTED:secret-attribute]"}
    assert out.resource == {"auth.token": "[REDACTED:secret-attribute]"}
    assert out.redaction.masking_applied
    assert out.redaction.masked == {"openai-api-key": 2, SECRET_ATTRIBUTE_RULE: 2}
    assert OPENAI not in out.to_json_bytes().decode()
    assert Envelope.from_json_bytes(out.to_json_bytes()) == out  # still a valid envelope (key re-checked)
    assert env.agent_run.task_input == f"key {OPENAI}"  # the input envelope is untouched


def test_redacting_spans_first_then_the_envelope_counts_each_secret_once():
    s = span({"a": OPENAI}, resource={"k": AWS})
    first = REDACTOR.redact([s])
    env = _envelope(first.spans, redaction=first.report, agent_run=AgentRun(final_output="done, " + OPENAI))
    out = REDACTOR.redact_envelope(env)
    # the span's key was counted by the first pass; the agent run's copy is new in the second
    assert out.redaction.masked == {"openai-api-key": 2, "aws-access-key-id": 1}
    assert REDACTOR.redact_envelope(out).redaction == out.redaction


# -- the prefilter (TextRule gate/needles) and the memo never change a result -----------------------------------------

def _unfiltered(config: RedactionConfig | None = None) -> Redactor:
    """A redactor whose rules have no prefilter: it scans every text with the full alternation."""
    saved = redact_module.TEXT_RULES
    redact_module.TEXT_RULES = tuple(r._replace(gate="", needles=()) for r in saved)
    try:
        return Redactor(config)
    finally:
        redact_module.TEXT_RULES = saved


UNFILTERED = _unfiltered()
# Pieces of secrets, key words in several cases, separators, quoting, and the four non-ASCII characters that
# Python's re folds onto ASCII letters (U+0130, U+0131, U+017F, U+212A).
_FRAGMENTS = [
    OPENAI, OPENAI_LEGACY, ANTHROPIC, AWS, GITHUB, GITHUB_PAT, SLACK, GOOGLE, STRIPE, HF, JWT, PEM, BEARER,
    "sk-", "sk-ant-", "sk-proj-", "AKIA", "ASIA", "ABIA", "ACCA", "AIza", "ghp_", "gho_", "github_pat_", "xoxb-",
    "xoxp-", "rk_live_", "sk_test_", "hf_", "eyJ", ".eyJ", "eyJhbGciOiJIUzI1NiJ9", "-----BEGIN ",
    "RSA PRIVATE KEY-----",
    "-----END PRIVATE KEY-----", "password", "PassWord", "PWD", "pwd", "passwd", "passphrase", "api_key", "API-KEY",
    "apikey", "ApiKey", "secret", "clientSecret", "Session_Token", "private_key", "PrivateKey", "access_token",
    "auth-token", "api_token", "refresh_token", "id_token", "IdToken", "Authorization", "authorization", "Basic ",
    "Bearer ", "bearer\t", "token", "sig", "signature", "X-Amz-Signature", "x-goog-signature", "https://", "://",
    "user:", "@host", "@", ":", "=", " = ", ": ", "?", "&", '"', "'", "\\", '\\"', " ", "\n", "\t", ",", ";", "{", "[",
    "abcdefgh12345678", "Zm9vYmFyYmF6cXV4", "hunter2", "[REDACTED:jwt]", "[REDACTED:secret-attribute]",
    "\u0130", "\u0131", "\u017f", "\u212a", "é", "✓", "\ufb05", "ß",
]
_TEXTS = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=4)), max_size=14).map("".join)


@settings(max_examples=1500, deadline=None)
@given(_TEXTS)
def test_the_prefilter_finds_what_the_full_scan_finds(text):
    out, counts = REDACTOR.mask_text(text)
    expected, expected_counts = UNFILTERED.mask_text(text)
    assert out == expected
    assert list(counts.items()) == list(expected_counts.items())


@pytest.mark.parametrize("text", [
    "pa\u017fsword=hunter2", "\u017fecret=abcdefgh1234", "pr\u0130vate_key=abcdefgh12345",
    "\u0131d_token=ABCDEFGH12345678", "Authorization: \u212aey abcdefgh12345",
    "hello wörld token=Zm9vYmFyYmF6cXV4 ✓",
    '{"messages": [{"role": "user", "content": "my password: hunter2, key sk-' + "a" * 30 + '"}]}',
    "?token=abc&sig=def", "Bearer of bad news", "bearer abcdefghijklmnop1234",
])
def test_the_prefilter_on_folded_and_mixed_text(text):
    assert REDACTOR.mask_text(text) == UNFILTERED.mask_text(text)


@pytest.mark.parametrize("config", [
    RedactionConfig(disabled_rules=frozenset({"jwt", "password", "secret-assignment"})),
    RedactionConfig(disabled_rules=frozenset(RULE_NAMES) - {"bearer-token"}),
])
@settings(max_examples=200, deadline=None)
@given(text=_TEXTS)
def test_the_prefilter_with_disabled_rules(config, text):
    assert Redactor(config).mask_text(text) == _unfiltered(config).mask_text(text)


def test_remembered_texts_are_counted_every_time():
    r = Redactor()
    short = f"k {AWS}"  # remembered across passes
    long = f"{OPENAI} " + "x" * 200  # remembered within a pass
    for _ in range(3):
        assert r.mask_text(short) == ("k [REDACTED:aws-access-key-id]", {"aws-access-key-id": 1})
        assert r.mask_text(long)[1] == {"openai-api-key": 1}
    spans = [span({"a": short, "b": long, "c": short}), span({"a": short, "b": long})]
    assert r.redact(spans).report.masked == {"aws-access-key-id": 3, "openai-api-key": 2}
    assert r.redact(spans).report == REDACTOR.redact(spans).report == UNFILTERED.redact(spans).report


def test_an_unchanged_string_comes_back_as_the_same_object():
    a, b = "gpt-4o-mini-2024-07-18", "".join(["gpt-4o-mini", "-2024-07-18"])  # equal, distinct objects
    assert a == b and a is not b
    s1, s2 = span({"model": a}), span({"model": b})
    out = Redactor().redact([s1, s2])
    assert out.spans[0] is s1 and out.spans[1] is s2
