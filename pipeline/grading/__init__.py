"""Grading: does an assembled agent run hold a real task failure worth reproducing?

* :mod:`pipeline.grading.model` — the :class:`~pipeline.grading.model.Grade` document and the failure taxonomy.
* :mod:`pipeline.grading.rules` — the default grader: deterministic rules over the envelope's agent-run view and
  spans, no network (``grade_envelope(envelope, criteria=...) -> Grade``). Pure.
* :mod:`pipeline.grading.criteria` — the deterministic success criteria of a repository's ``scenario.md``. Pure.
* :mod:`pipeline.grading.judge` — the optional LLM judge (an OpenAI-compatible chat endpoint, or a command) for
  what the rules cannot decide; never blocks a grade.
* :mod:`pipeline.grading.signature` — the failure signature two runs are compared by. Pure.
* :mod:`pipeline.grading.facts` — what the rules read from an envelope: root, completeness, tool failures and their
  recovery, the failed LLM call, loops. Pure.
* :mod:`pipeline.grading.signals` — failure signals in single values (a tool result that reports a failure, a
  provider error, a turn limit, a refusal). Pure.

Reference: ``docs/grading.md``.

The grade *stage* (consume envelopes, claim, grade, publish) is :mod:`pipeline.stages.grade`.
"""
