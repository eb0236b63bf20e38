"""Tasks: generated offline and seeded, each with its metric. `TaskSpec` lists every kind."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from titans_nas.tasks.base import IGNORE, Batch, TaskBase
from titans_nas.tasks.copy import CopySpec

TaskSpec = Annotated[CopySpec, Field(discriminator="kind")]

__all__ = ["IGNORE", "Batch", "CopySpec", "TaskBase", "TaskSpec"]
