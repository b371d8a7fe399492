"""Control-plane steps the tests of several services share."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from schemas.control import Grant
from shared.control import MODEL_TRAINING, ControlRegistry, ControlWriter, new_id


async def consent_to_training(
    control: ControlRegistry, writer: ControlWriter, firms: list[str]
) -> None:
    """Each of ``firms`` grants the network model training; returns once ``control`` has them."""
    for firm in firms:
        await writer.put_grant(
            Grant(
                grant_id=new_id(),
                owner=firm,
                grantee="network",
                insight_types=[MODEL_TRAINING],
                purpose="train the network's models",
                created_at=datetime.now(UTC) - timedelta(minutes=1),
            )
        )
    async with asyncio.timeout(30):
        while not all(any(g.owner == f for g in control.grants.values()) for f in firms):
            await control.wait_changed(control.version, 1)
