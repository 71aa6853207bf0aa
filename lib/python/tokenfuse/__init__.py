"""tokenfuse: a drop-in for the awooop_token_budget module, over the tokenfuse agent on this host.

Swap the import and keep the code:

    from tokenfuse import (BudgetExhaustedError, check_budget_before_llm_call, record_token_usage,
                           estimate_cost, activate_emergency_kill, deactivate_emergency_kill,
                           is_emergency_kill_active)

    await check_budget_before_llm_call(project_id, model, estimated_prompt_tokens=4000)
    cost = await record_token_usage(project_id=..., model=..., provider=..., prompt_tokens=...,
                                    completion_tokens=...)

The async functions here are the reference's; tokenfuse.sync has the same names as plain
functions. Beyond the reference, reserve() makes a limit exact under concurrency and lets a
stream stop when its budget is spent:

    async with tokenfuse.reserve("acme", "gpt-4o", 2000, estimated_completion_tokens=1000) as r:
        r.charge(prompt_tokens=2000, completion_tokens=0)
        for chunk in stream:
            r.charge(completion_tokens=chunk.tokens)     # raises BudgetExhaustedError to stop
        cost = r.commit("openai", prompt_tokens, completion_tokens)
    # leaving the block commits what was charged if commit() was not reached

Decisions read and update the shared-memory region in nanoseconds without blocking the event
loop, so the async forms call them directly; the kill-switch changes go over the agent's HTTP
API and run in a worker thread.
"""
from __future__ import annotations

import asyncio
from decimal import Decimal

from . import sync
from .sync import (
    BUDGET_ALERT_THRESHOLDS,
    BudgetExhaustedError,
    RateLimitedError,
    Reservation,
    TokenfuseError,
    TokenfuseUnavailableError,
    configure,
    estimate_cost,
    platform_usage,
    reserve,
    tenant_usage,
    wait_durable,
)

__all__ = [
    "BUDGET_ALERT_THRESHOLDS",
    "BudgetExhaustedError",
    "RateLimitedError",
    "Reservation",
    "TokenfuseError",
    "TokenfuseUnavailableError",
    "activate_emergency_kill",
    "check_budget_before_llm_call",
    "check_emergency_kill",
    "configure",
    "deactivate_emergency_kill",
    "estimate_cost",
    "is_emergency_kill_active",
    "platform_usage",
    "record_token_usage",
    "reserve",
    "sync",
    "tenant_usage",
    "wait_durable",
]


async def check_budget_before_llm_call(
    project_id: str,
    model: str,
    estimated_prompt_tokens: int = 4000,
    *,
    agent_id: str | None = None,
    run_id: str | None = None,
    tags=None,
) -> None:
    sync.check_budget_before_llm_call(project_id, model, estimated_prompt_tokens, agent_id=agent_id, run_id=run_id,
                                      tags=tags)


async def check_emergency_kill() -> None:
    sync.check_emergency_kill()


async def record_token_usage(
    *,
    project_id: str,
    model: str,
    provider: str,
    prompt_tokens: int,
    completion_tokens: int,
    agent_id: str | None = None,
    run_id: str | None = None,
    tags=None,
) -> Decimal:
    return await sync._record_token_usage_async(project_id=project_id, model=model, provider=provider,
                                                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                agent_id=agent_id, run_id=run_id, tags=tags)


async def activate_emergency_kill(reason: str = "") -> None:
    await asyncio.to_thread(sync.activate_emergency_kill, reason)


async def deactivate_emergency_kill() -> None:
    await asyncio.to_thread(sync.deactivate_emergency_kill)


async def is_emergency_kill_active() -> bool:
    return sync.is_emergency_kill_active()
