"""Pure functions, no I/O: OTLP -> canonical spans, agent-framework dialect readers, redaction, the envelope model.

Filled in by the assembler work (issue "Assemble traces and normalize agent runs into upload envelopes").
"""
