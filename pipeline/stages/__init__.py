"""The loop's stages, one module each, registered here by name (``trace-source worker <name>``).

A stage module implements :class:`pipeline.stage.Stage` and exposes ``build(settings, artifacts) -> Stage``;
adding a stage is that module plus one line in :data:`STAGES`. :data:`ORDER` is the loop's order, which the
embedded ``serve`` follows when it starts the stages the execution policy enables.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.artifacts import ArtifactStore
    from pipeline.loop_settings import LoopSettings
    from pipeline.stage import Stage

#: Stage name -> module implementing it.
STAGES: dict[str, str] = {
    "grade": "pipeline.stages.grade",
    "seed": "pipeline.stages.seed",
    "reproduce": "pipeline.stages.reproduce",
    "fix": "pipeline.stages.fix",
}

#: The order of the loop.
ORDER: tuple[str, ...] = ("grade", "seed", "reproduce", "fix")


def build_stage(name: str, settings: "LoopSettings", artifacts: "ArtifactStore") -> "Stage":
    """Instantiate the stage registered as ``name``. Raises ``KeyError`` for an unknown name."""
    module = importlib.import_module(STAGES[name])
    return module.build(settings, artifacts)
