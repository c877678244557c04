"""When two failures are "the same failure": the rule the reproduce stage uses to decide whether a reproduction
attempt shows the original failure (docs/grading.md "Failure signature"). Pure."""

from __future__ import annotations

from pipeline.grading.model import FailureSignature


def same_failure(a: FailureSignature, b: FailureSignature) -> bool:
    """True when ``a`` and ``b`` name the same failure: the same category, and the same tool and the same error type
    wherever *both* signatures know it (a field ``None`` on either side does not count against a match).

    Tool names compare exactly. Error types compare by their last dotted component, so one exception recorded as
    ``openai.InternalServerError`` by one instrumentation and ``InternalServerError`` by another still matches, while
    ``ConnectionError`` and ``TimeoutError`` do not.
    """
    if a.category != b.category:
        return False
    if a.tool is not None and b.tool is not None and a.tool != b.tool:
        return False
    if a.error_type is not None and b.error_type is not None and _short_type(a.error_type) != _short_type(b.error_type):
        return False
    return True


def _short_type(name: str) -> str:
    return name.strip().rsplit(".", 1)[-1]
