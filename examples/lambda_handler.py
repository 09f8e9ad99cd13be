#!/usr/bin/env python3
"""An AWS Lambda handler guarded by cycles-lite, runnable locally.

On Lambda, deploy this file next to ``cycles_lite.py`` (no layer, nothing to
install) and configure it with environment variables sized for a 3 s function::

    CYCLES_BASE_URL=...  CYCLES_API_KEY=...  CYCLES_TENANT=...
    CYCLES_JOURNAL_DIR=/tmp/cycles-journal
    CYCLES_CONNECT_TIMEOUT=0.5  CYCLES_READ_TIMEOUT=1.0      # one attempt <= 1.5 s
    CYCLES_RETRY_INITIAL_DELAY=0.1  CYCLES_RETRY_MAX_DELAY=1.0  CYCLES_RETRY_MAX_ATTEMPTS=3

The handler runs every Cycles step under ``cycles_lite.deadline(...)``: the
invocation's remaining time minus a margin for the response.  Whatever does not
settle in time stays in the journal, and this warm process settles it later
(its worker, the next invocation's ``flush()``), without waiting for a cold start.

Run locally: ``python3 examples/lambda_handler.py`` starts a local server and
invokes the handler with a fake 3 s Lambda context: a commit answered 503, then a
server that stops answering commits, then one that answers nothing at all, then
the server back.  It prints each invocation's duration against its deadline and,
at the end, the spend the handler reported against the spend the server recorded.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cycles_lite
from cycles_lite import CyclesClient, CyclesConfig, CyclesError, CyclesTransportError, cycles

RESPONSE_MARGIN_S = 0.3  # left for Lambda to send the response
_client: CyclesClient | None = None
reported_spend: List[int] = []  # what the handler believes it spent


def client() -> CyclesClient:
    """One client per sandbox, created in the init phase and reused by warm starts."""
    global _client
    if _client is None:
        _client = CyclesClient(CyclesConfig.from_env())
    return _client


@cycles(estimate=2_000, actual=lambda answer: 10 * len(answer),
        action_kind="llm.completion", action_name="demo-model")
def ask(prompt: str) -> str:
    answer = f"an answer to {prompt!r}"
    reported_spend.append(10 * len(answer))
    return answer


def handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
    cycles_lite.set_default_client(client())
    # Every Cycles step in here (create, heartbeat, commit, retries, flush) ends by the
    # deadline; a commit that does not fit is journaled in /tmp and settled later.
    with cycles_lite.deadline(context.get_remaining_time_in_millis() / 1000 - RESPONSE_MARGIN_S):
        try:
            return {"answer": ask(event["prompt"])}
        except CyclesError as exc:  # no reservation: fail closed, the model was not called
            why = "unreachable" if isinstance(exc, CyclesTransportError) else "denied"
            return {"error": f"no budget decision: {why}"}
        finally:
            # Lambda freezes the sandbox once the handler returns: settle what is
            # pending now (kept commits of earlier invocations included).
            result = cycles_lite.flush()
            print(f"   flush: settled={result.settled} pending={result.pending}"
                  f" given_up={result.given_up}")


class FakeLambdaContext:
    """The one method the handler uses, for a function with a 3 s timeout."""

    def __init__(self, timeout_ms: int = 3_000) -> None:
        self._ends = time.monotonic() + timeout_ms / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


def main() -> None:
    from cycles_lite_server import LocalCyclesServer

    with LocalCyclesServer(
        api_keys={"lambda-key": "acme"},
        budgets=[{"scope": "tenant:acme", "unit": "USD_MICROCENTS", "allocated": 1_000_000}],
    ) as server, tempfile.TemporaryDirectory() as journal:
        os.environ.update(CYCLES_BASE_URL=server.url, CYCLES_API_KEY="lambda-key",
                          CYCLES_TENANT="acme", CYCLES_JOURNAL_DIR=journal,
                          CYCLES_CONNECT_TIMEOUT="0.5", CYCLES_READ_TIMEOUT="1.0",
                          CYCLES_RETRY_INITIAL_DELAY="0.1", CYCLES_RETRY_MAX_DELAY="1.0",
                          CYCLES_RETRY_MAX_ATTEMPTS="3")
        deadline_s = 3.0 - RESPONSE_MARGIN_S
        longest = 0.0
        phases = [
            ("a commit answered 503 once", lambda: server.inject("commit", "status", status=503)),
            ("the server stops answering commits",
             lambda: server.inject("commit", "delay", delay_ms=4_000, times=None)),
            ("the server answers nothing",
             lambda: server.inject("*", "delay", delay_ms=4_000, times=None)),
            ("the server is back (warm sandbox)", server.clear_faults),
        ]
        for number, (what, fault) in enumerate(phases, 1):
            fault()
            started = time.monotonic()
            print(f"invoke {number}: {what}")
            response = handler({"prompt": f"invocation {number}"}, FakeLambdaContext())
            took = time.monotonic() - started
            longest = max(longest, took)
            print(f"   -> {response} in {took:.3f} s (deadline {deadline_s:.1f} s)")
        server.clear_faults()
        balance = server.balance("tenant:acme")
        print(f"longest invocation: {longest:.3f} s against a {deadline_s:.1f} s deadline")
        print(f"spend reported by the handler: {sum(reported_spend)};"
              f" recorded by the server: {balance['spent']} (reserved {balance['reserved']})")
        client().close()
        assert longest < 3.0, "an invocation ran past the function timeout"
        assert balance["spent"] == sum(reported_spend) and balance["reserved"] == 0
        server.check_invariants()


if __name__ == "__main__":
    main()
