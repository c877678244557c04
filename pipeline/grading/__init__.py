"""Grading: does an assembled agent run hold a real task failure worth reproducing?

* :mod:`pipeline.grading.model` — the :class:`~pipeline.grading.model.Grade` document and the failure taxonomy.
* :mod:`pipeline.grading.rules` — the default grader: deterministic rules over the envelope's agent-run view and
  spans, no network (``grade_envelope(envelope, criteria=...) -> Grade``). Pure.
* :mod:`pipeline.grading.criteria` — the deterministic success criteria of a repository's ``scenario.md``. Pure.
* :mod:`pipeline.grading.judge` — the optional LLM judge (an OpenAI-compatible chat endpoint, or a command) for
  what the rules cannot decide; never blocks a grade.
* :mod:`pipeline.grading.signature` — the failure signature two runs are compared by. Pure.

The grade *stage* (consume envelopes, claim, grade, publish) is :mod:`pipeline.stages.grade`.
"""
