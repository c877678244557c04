"""Headless harness: run the support agent once and print its answer as JSON (the repository contract's command,
``trace-source/harness.json``: ``python -m support_agent.harness``).

Environment:

* ``AGENT_TASK`` (required): the customer message;
* ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``: the model endpoint, read by the OpenAI client itself (the key may be
  left out for a local OpenAI-compatible server such as ``fake_model.py``);
* ``SUPPORT_AGENT_MODEL`` (default ``gpt-4o-mini``), ``SUPPORT_AGENT_TEMPERATURE`` (default ``0``),
  ``SUPPORT_AGENT_SEED`` (sampling seed; default: ``TRACE_SOURCE_ATTEMPT``, the attempt number trace-source gives
  each reproduction attempt, so attempt *n* always samples the same way; else no seed);
* ``TRACE_SOURCE_SEED_PATH`` (optional): a trace-source ``seed.json``; orders that the recorded run looked up but
  the data file lacks are added to the store first, so the run starts from the recorded state;
* the OpenTelemetry variables of :mod:`support_agent.telemetry` (``OTEL_EXPORTER_OTLP_ENDPOINT``, ...).

Output (stdout, one JSON object): ``{"task", "answer", "tool_calls": [{"name", "call_id", "arguments", "result",
"error"}], "trace_id", "model"}``. Exit 0 when the agent answered (whether or not the customer was helped: judging
that is the grader's job), 1 when the run raised (e.g. the model endpoint failed), 2 without ``AGENT_TASK``. Spans
are flushed before exit in every case.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from support_agent.orders import OrderStore

DEFAULT_MODEL = "gpt-4o-mini"


def apply_seed(store: OrderStore, seed_path: str | Path) -> list[str]:
    """Add to ``store`` every order a successful ``lookup_order`` call of the recorded run returned and the store
    lacks; returns their ids. The recorded result may be the order object or its JSON text."""
    seed = json.loads(Path(seed_path).read_text(encoding="utf-8"))
    added = []
    for call in seed.get("tool_calls") or []:
        result = call.get("result")
        if isinstance(result, str):
            try:
                result = json.loads(result)
            except ValueError:
                continue
        if (call.get("name") == "lookup_order" and not call.get("error") and isinstance(result, dict)
                and "order_id" in result and "error" not in result and store.add(result)):
            added.append(result["order_id"])
    return added


def _seed_from_env(env: dict[str, str] | os._Environ) -> int | None:
    value = env.get("SUPPORT_AGENT_SEED") or env.get("TRACE_SOURCE_ATTEMPT")
    return int(value) if value else None


def main() -> int:
    task = os.environ.get("AGENT_TASK", "").strip()
    if not task:
        print("AGENT_TASK is not set: give the customer message to answer in it", file=sys.stderr)
        return 2
    from support_agent import telemetry

    tel = telemetry.setup()  # before the OpenAI client is created, so its requests are traced
    try:
        import openai

        from support_agent.agent import SupportAgent

        store = OrderStore.load()
        if os.environ.get("TRACE_SOURCE_SEED_PATH"):
            apply_seed(store, os.environ["TRACE_SOURCE_SEED_PATH"])
        client = openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "not-needed-by-a-local-model")
        model = os.environ.get("SUPPORT_AGENT_MODEL") or DEFAULT_MODEL
        agent = SupportAgent(client, store, model=model, handler=tel.handler,
                             temperature=float(os.environ.get("SUPPORT_AGENT_TEMPERATURE") or 0),
                             seed=_seed_from_env(os.environ))
        try:
            result = agent.run(task)
        except Exception as exc:  # noqa: BLE001 - the run's span already recorded it; say it and exit 1
            print(f"the agent run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        out: dict[str, Any] = {"task": task, "answer": result.answer,
                               "tool_calls": [asdict(s) for s in result.steps], "trace_id": result.trace_id,
                               "model": model}
        print(json.dumps(out))
        return 0
    finally:
        tel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
