"""The pipeline's stages as objects (docs/design.md §4): `stage_for(spec)` gives the pretrain, inflate or
finetune stage of a run spec, which knows its model config, what trains, how its model is built and what
it publishes. Nothing outside this package asks which stage a spec is.

May import: `cosctl.artefacts`, `checkpoint`, `data`, `spec`, `storage`, `common`, and `cos_model`.
"""

from __future__ import annotations

from .base import Stage, TrainingStage
from .finetune import FinetuneStage
from .inflate import InflateStage
from .pretrain import PretrainStage

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (PretrainStage, InflateStage, FinetuneStage)}


def stage_for(spec) -> Stage:
    """The stage object of a run spec (`spec.stage` names it)."""
    return STAGES[spec.stage](spec)


__all__ = ["STAGES", "FinetuneStage", "InflateStage", "PretrainStage", "Stage", "TrainingStage", "stage_for"]
