"""Migration phases and the migration state record that wallet workflows and reads follow."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Phase(StrEnum):
    LEGACY = "legacy"
    DUAL_WRITE = "dual_write"
    SHADOW_READ = "shadow_read"
    READ_CUTOVER = "read_cutover"
    TB_PRIMARY = "tb_primary"
    COMPLETE = "complete"


PHASE_ORDER: tuple[Phase, ...] = tuple(Phase)

# Phases whose write path answers from MongoDB and then applies TigerBeetle from the backlog.
MONGO_PRIMARY_DUAL_WRITE = frozenset({Phase.DUAL_WRITE, Phase.SHADOW_READ, Phase.READ_CUTOVER})


class MigrationState(BaseModel):
    """The record the migration workflow publishes (one per ledger pair, or `*` for all).

    `epoch` increases with every change so readers can tell a stale cached copy.
    """

    model_config = ConfigDict(frozen=True)

    scope: str = Field(default="*", description="`currency:country` or `*`")
    phase: Phase = Phase.LEGACY
    rollout_percent: int = Field(default=0, ge=0, le=100)
    epoch: int = Field(default=0, ge=0)
    migration_id: str | None = None
    updated_at: datetime | None = None

    @property
    def writes_tigerbeetle(self) -> bool:
        return self.phase != Phase.LEGACY

    @property
    def mongo_answers_writes(self) -> bool:
        return self.phase in (Phase.LEGACY, *MONGO_PRIMARY_DUAL_WRITE)
