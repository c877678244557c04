"""Pure functions, no I/O: OTLP -> canonical spans (``canonical``), agent-framework dialect readers (``dialects``)
-> the agent-run view (``agent_run``), redaction (``redact``), and the upload envelope model with its published
JSON Schema (``envelope``, ``schema/``).
"""
