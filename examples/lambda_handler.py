#!/usr/bin/env python3
"""An AWS Lambda handler guarded by cycles-lite, runnable locally.

On Lambda, configure with environment variables (``CYCLES_BASE_URL``,
``CYCLES_API_KEY``, ``CYCLES_TENANT``, ``CYCLES_JOURNAL_DIR=/tmp/cycles-journal``)
and deploy this file next to ``cycles_lite.py``: no layer, nothing to install.

Run locally: ``python3 examples/lambda_handler.py`` starts a local server, then
invokes the handler twice with a fake Lambda context; the server answers the
first invocation's commit with a 503, and ``flush()`` settles it (retried with
the same idempotency key) before the handler returns.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cycles_lite
from cycles_lite import CyclesClient, CyclesConfig, cycles

_client: CyclesClient | None = None


def client() -> CyclesClient:
    """One client per sandbox, created in the init phase and reused by warm starts."""
    global _client
    if _client is None:
        _client = CyclesClient(CyclesConfig.from_env())
    return _client


@cycles(estimate=2_000, actual=lambda answer: 10 * len(answer),
        action_kind="llm.completion", action_name="demo-model")
def ask(prompt: str) -> str:
    return f"an answer to {prompt!r}"


def handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
    cycles_lite.set_default_client(client())
    try:
        return {"answer": ask(event["prompt"])}
    finally:
        # Lambda freezes the sandbox once the handler returns: settle pending
        # commit retries now, bounded by the time left (minus a margin).
        left = context.get_remaining_time_in_millis() / 1000.0
        settled = cycles_lite.flush(timeout=max(0.0, left - 1.5))
        print(f"   flush before returning: {'all settled' if settled else 'left in the journal'}")


class FakeLambdaContext:
    def get_remaining_time_in_millis(self) -> int:
        return 10_000


def main() -> None:
    from cycles_lite_server import LocalCyclesServer

    with LocalCyclesServer(
        api_keys={"lambda-key": "acme"},
        budgets=[{"scope": "tenant:acme", "unit": "USD_MICROCENTS", "allocated": 1_000_000}],
    ) as server, tempfile.TemporaryDirectory() as journal:
        os.environ.update(CYCLES_BASE_URL=server.url, CYCLES_API_KEY="lambda-key",
                          CYCLES_TENANT="acme", CYCLES_JOURNAL_DIR=journal,
                          CYCLES_RETRY_INITIAL_DELAY="0.05")
        server.inject("commit", "status", status=503)  # the first commit attempt fails
        for prompt in ("first invocation", "warm start"):
            print(f"invoke: {handler({'prompt': prompt}, FakeLambdaContext())}")
        commits = server.requests_for("commit")
        keys = [request.body["idempotency_key"][:8] for request in commits if request.body]
        print(f"   commit statuses {[request.status for request in commits]}, keys {keys}")
        print(f"   ledger spent: {server.balance('tenant:acme')['spent']} (each call settled once)")
        server.check_invariants()
        client().close()


if __name__ == "__main__":
    main()
