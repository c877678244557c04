"""Execution policy: how far the loop takes a trace (seed-system.md "Execution policy").

=========== ==================================================================================================
policy      phases that run after import
=========== ==================================================================================================
observe     none: the run is imported (journaled) and stops
grade       grade
reproduce   grade, seed, reproduce
fix         grade, seed, reproduce, fix (the default, as in the seed system; fixing still needs
            ``--allow-external-execution``)
=========== ==================================================================================================

A run carries the policy it was launched with (the journal's ``run.policy``); a stage works on a run only when
both the run's policy and its own worker's policy include its phase, so a worker started with a narrower policy
never goes further than asked.

**Which steps run code.** Grading runs none (rules over the trace; the optional judge is an HTTP call or the
operator's own ``--judge-command``). Reproduction runs the repository's own harness command
(``harness.json``) in an isolated working copy — code the repository owner wrote for exactly this. Fixing runs a
coding agent (``--fix-command``), the repository's validation command and a pull-request command, which change
code and reach other systems; those run only with ``--allow-external-execution``, otherwise the trace ends
*blocked* with that reason.
"""

from __future__ import annotations

from typing import Literal

Policy = Literal["observe", "grade", "reproduce", "fix"]
POLICIES: tuple[str, ...] = ("observe", "grade", "reproduce", "fix")
DEFAULT_POLICY: Policy = "fix"

#: The phase after import each policy reaches last.
_REACH = {"observe": 0, "grade": 1, "reproduce": 3, "fix": 4}
_PHASE_RANK = {"import": 0, "grade": 1, "seed": 2, "reproduce": 3, "fix": 4}


def allows(policy: str, phase: str) -> bool:
    """Whether ``policy`` takes a run as far as ``phase`` (``import``, ``grade``, ``seed``, ``reproduce``, ``fix``).
    Raises ``ValueError`` for an unknown policy or phase."""
    if policy not in _REACH:
        raise ValueError(f"unknown execution policy {policy!r}; one of {', '.join(POLICIES)}")
    if phase not in _PHASE_RANK:
        raise ValueError(f"unknown phase {phase!r}")
    return _PHASE_RANK[phase] <= _REACH[policy]


def narrower(a: str, b: str) -> str:
    """The policy of the two that reaches less far."""
    return a if _REACH[a] <= _REACH[b] else b


def stop_phase(policy: str) -> str:
    """The last phase ``policy`` runs (``import`` for observe)."""
    return next(p for p, r in _PHASE_RANK.items() if r == _REACH[policy])
