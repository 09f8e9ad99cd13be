#!/usr/bin/env python3
"""cycles-lite demo: a local Cycles server in-process, and guarded calls against it.

Run it with ``make demo`` (or ``python3 examples/demo.py``). Nothing to install.
It walks the reserve -> execute -> commit lifecycle end to end:

1. a guarded "LLM call" with ``@cycles``: budget reserved, function run, actual committed;
2. a call that raises: the reservation is released and the error re-raised;
3. a call the budget cannot cover: the function never runs;
4. the manual guard ``with client.reserve(...)``, with caps from the server;
5. a lost commit response: the commit is retried with the same idempotency key
   and the server's ledger shows it settled exactly once.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cycles_lite import (
    BudgetExceededError,
    CyclesClient,
    CyclesConfig,
    CyclesMetrics,
    cycles,
    flush,
    get_cycles_context,
)
from cycles_lite_server import LocalCyclesServer

TENANT = "acme"
AGENT_SCOPE = "tenant:acme/agent:support-bot"


def plain(value: object) -> str:
    """An enum's wire value (Decision.ALLOW -> "ALLOW"); other values as they are."""
    return str(getattr(value, "value", value))


def show_balance(server: LocalCyclesServer, label: str) -> None:
    ledger = server.balance(AGENT_SCOPE)
    print(f"   ledger {label}: allocated={ledger['allocated']} spent={ledger['spent']} "
          f"reserved={ledger['reserved']} remaining={ledger['remaining']}")


def main() -> None:
    server = LocalCyclesServer(
        api_keys={"demo-key": TENANT},
        budgets=[
            {"scope": "tenant:acme", "unit": "USD_MICROCENTS", "allocated": 10_000_000},
            {"scope": AGENT_SCOPE, "unit": "USD_MICROCENTS", "allocated": 50_000},
            {"scope": "tenant:acme/agent:researcher", "unit": "USD_MICROCENTS",
             "allocated": 50_000, "caps": {"max_tokens": 256, "tool_allowlist": ["search"]}},
        ],
    )
    with server:
        print(f"local Cycles server at {server.url}\n")
        config = CyclesConfig(base_url=server.url, api_key="demo-key", tenant=TENANT,
                              journal_enabled=False)
        client = CyclesClient(config)

        @cycles(
            estimate=lambda prompt, max_tokens: max_tokens * 10,
            actual=lambda answer: len(answer) * 10,
            action_kind="llm.completion",
            action_name="demo-model",
            agent="support-bot",
            client=client,
        )
        def ask(prompt: str, max_tokens: int) -> str:
            ctx = get_cycles_context()
            assert ctx is not None
            print(f"   inside the guarded call: reservation {ctx.reservation_id}, "
                  f"decision {plain(ctx.decision)}")
            answer = f"An answer to {prompt!r}"
            ctx.metrics = CyclesMetrics(tokens_input=len(prompt), tokens_output=len(answer))
            return answer

        print("1. @cycles: reserve -> execute -> commit")
        show_balance(server, "before")
        print(f"   result: {ask('What is Cycles?', max_tokens=200)}")
        show_balance(server, "after ")

        print("\n2. the guarded function raises: the reservation is released")

        @cycles(estimate=5_000, action_kind="tool.call", action_name="flaky-tool",
                agent="support-bot", client=client)
        def flaky() -> None:
            raise RuntimeError("tool failed")

        try:
            flaky()
        except RuntimeError as error:
            print(f"   re-raised: {error!r}")
        show_balance(server, "after ")

        print("\n3. the budget cannot cover the estimate: the function never runs")
        try:
            ask("Write a novel", max_tokens=1_000_000)
        except BudgetExceededError as error:
            print(f"   {type(error).__name__}: {error.error_code}")

        print("\n4. the manual guard, with caps from the server")
        with client.reserve(estimate=2_000, action_kind="llm.completion",
                            action_name="demo-model", agent="researcher") as guard:
            caps = guard.caps
            assert caps is not None
            print(f"   decision {plain(guard.decision)}, caps max_tokens={caps.max_tokens}, "
                  f"search allowed={caps.is_tool_allowed('search')}, "
                  f"shell allowed={caps.is_tool_allowed('shell')}")
            guard.commit(1_500, metrics=CyclesMetrics(tokens_output=150))
        print(f"   committed 1500 on reservation {guard.reservation_id}")

        print("\n5. a lost commit response: retried with the same idempotency key")
        server.inject("commit", "lost_response")
        ask("Is this settled once?", max_tokens=100)
        flush(timeout=10)
        commits = server.requests_for("commit")[-2:]
        keys = {request.body["idempotency_key"] for request in commits if request.body}
        print(f"   commit attempts: {len(commits)}, distinct keys: {len(keys)}, "
              f"statuses: {[request.status for request in commits]}")
        show_balance(server, "final ")
        server.check_invariants()
        client.close()
        print("\nledger invariant holds: remaining = allocated - spent - reserved - debt")


if __name__ == "__main__":
    main()
