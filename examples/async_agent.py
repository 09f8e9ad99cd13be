#!/usr/bin/env python3
"""Async guarded calls: ``@cycles`` on ``async def``, ``async with client.reserve(...)``
and a streaming reservation, against a local Cycles server started in-process.

Run: ``python3 examples/async_agent.py``. Nothing to install.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cycles_lite import (
    Action,
    Amount,
    AsyncCyclesClient,
    CyclesConfig,
    Unit,
    aflush,
    cycles,
    get_cycles_context,
)
from cycles_lite_server import LocalCyclesServer

SCOPE = "tenant:acme/agent:planner"


async def run(server: LocalCyclesServer) -> None:
    config = CyclesConfig(base_url=server.url, api_key="async-key", tenant="acme",
                          agent="planner", journal_enabled=False)
    async with AsyncCyclesClient(config) as client:

        @cycles(estimate=lambda topic: 100 * len(topic), actual=lambda text: 10 * len(text),
                action_kind="llm.completion", action_name="demo-model", client=client)
        async def summarize(topic: str) -> str:
            ctx = get_cycles_context()
            assert ctx is not None
            await asyncio.sleep(0.01)  # the model call
            return f"summary of {topic} (reservation {ctx.reservation_id[:8]})"

        # Guarded calls run concurrently; each reserves, runs and commits on its own.
        results = await asyncio.gather(*(summarize(t) for t in ("alpha", "beta", "gamma")))
        for line in results:
            print("  ", line)

        async with client.reserve(estimate=500, action_kind="tool.call",
                                  action_name="web-search") as guard:
            await asyncio.sleep(0.01)  # the tool call
            await guard.commit(320)
        print(f"   manual guard committed 320 on {guard.reservation_id[:8]}")

        async with client.stream_reservation(
            action=Action(kind="llm.completion", name="demo-model"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=2_000),
        ) as stream:
            for chunk in ("tokens ", "arrive ", "one by one"):
                stream.usage.add_output_tokens(len(chunk.split()))
            stream.usage.set_actual_cost(150)
        print(f"   stream committed usage cost 150 on {stream.reservation_id[:8]}")

        await aflush(timeout=5)  # nothing pending here; in a handler, settle before returning


def main() -> None:
    with LocalCyclesServer(
        api_keys={"async-key": "acme"},
        budgets=[{"scope": "tenant:acme", "unit": "USD_MICROCENTS", "allocated": 1_000_000},
                 {"scope": SCOPE, "unit": "USD_MICROCENTS", "allocated": 100_000}],
    ) as server:
        asyncio.run(run(server))
        ledger = server.balance(SCOPE)
        print(f"   ledger: spent={ledger['spent']} reserved={ledger['reserved']} "
              f"remaining={ledger['remaining']}")
        server.check_invariants()


if __name__ == "__main__":
    main()
