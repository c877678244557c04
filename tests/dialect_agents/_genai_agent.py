"""The ``invoke_agent`` span of ``opentelemetry-util-genai``'s ``TelemetryHandler`` across its API versions, for the
OTel GenAI agent scripts (``otel_genai.py``, ``corpus_otel_genai.py``)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

AGENT_NAME = "weather-agent"


@contextlib.contextmanager
def agent_span(handler: Any, model: str) -> Iterator[Any]:
    """``handler.invoke_local_agent`` for agent ``weather-agent``: opentelemetry-util-genai 0.4b0 takes the provider
    positionally and the agent name as an attribute; 1.x takes ``agent_name=`` (and no provider for local agents)."""
    if "agent_name" in inspect.signature(handler.invoke_local_agent).parameters:
        with handler.invoke_local_agent(agent_name=AGENT_NAME, request_model=model) as agent:
            yield agent
    else:
        with handler.invoke_local_agent("openai", request_model=model) as agent:
            agent.agent_name = AGENT_NAME
            yield agent
