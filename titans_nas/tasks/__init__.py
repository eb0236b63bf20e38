"""Tasks: generated offline and seeded, each with its metric. `TaskSpec` lists every kind."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from titans_nas.tasks.base import IGNORE, Batch, TaskBase
from titans_nas.tasks.copy import CopySpec
from titans_nas.tasks.induction import InductionSpec
from titans_nas.tasks.lm import LMSpec
from titans_nas.tasks.mad import CompressionSpec, MemorizationSpec, RecallSpec
from titans_nas.tasks.mqar import MQARSpec
from titans_nas.tasks.niah import NIAHSpec
from titans_nas.tasks.selective_copy import SelectiveCopySpec

TaskSpec = Annotated[
    MQARSpec
    | NIAHSpec
    | SelectiveCopySpec
    | InductionSpec
    | LMSpec
    | CopySpec
    | RecallSpec
    | MemorizationSpec
    | CompressionSpec,
    Field(discriminator="kind"),
]
"""Every task kind, discriminated by `kind`."""

__all__ = [
    "IGNORE",
    "Batch",
    "CompressionSpec",
    "CopySpec",
    "InductionSpec",
    "LMSpec",
    "MQARSpec",
    "MemorizationSpec",
    "NIAHSpec",
    "RecallSpec",
    "SelectiveCopySpec",
    "TaskBase",
    "TaskSpec",
]
