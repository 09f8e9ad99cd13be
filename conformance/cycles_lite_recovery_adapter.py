#!/usr/bin/env python3
"""cycles-lite adapter for the official SDK recovery-conformance runner.

    python3 conformance/cycles_lite_recovery_adapter.py CR-CORE-001 < scenario.json

The runner (``run_client_recovery_conformance.py --claim durable --adapter ...``)
appends the scenario id and writes the scenario inputs (id, level, name,
precondition, faults) as JSON on stdin.  This adapter checks that the input is
the scenario our native tests were written for, runs exactly the native tests
bound to it with ``python -m unittest`` from the repository root (their output
goes to stderr), and prints one JSON result on stdout.  It never reads or
returns the catalog's expected requests or assertions: those are the runner's
review oracle, and input that carries them is refused.

Standard library only; the tests it runs need nothing installed either.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_MODULE = "test_cycles_lite"
ALLOWED_INPUT_FIELDS = frozenset({"id", "level", "name", "precondition", "faults"})
ORACLE_FIELDS = frozenset({"expected_requests", "assertions"})
# The runner allows 120 s per scenario by default; stay inside it.
DEFAULT_TIMEOUT_S = 100.0


class Binding(NamedTuple):
    """The scenario inputs our native tests implement, and those tests."""

    level: str
    precondition: str
    faults: Tuple[str, ...]
    tests: Tuple[str, ...]


def _core(name: str) -> str:
    return f"{TEST_MODULE}.TestRecoveryCore.{name}"


def _durable(name: str) -> str:
    return f"{TEST_MODULE}.TestRecoveryDurable.{name}"


BINDINGS: Dict[str, Binding] = {
    "CR-CORE-001": Binding(
        "core",
        "actual_known",
        ("commit_response_lost",),
        (_core("test_cr_core_001_lost_commit_response_reuses_key"),),
    ),
    "CR-CORE-002": Binding(
        "core",
        "actual_known",
        ("commit_reservation_expired",),
        (_core("test_cr_core_002_expired_commit_falls_back_to_event"),),
    ),
    "CR-CORE-003": Binding(
        "core",
        "action_running",
        ("extend_transport_error",),
        (_core("test_cr_core_003_heartbeat_transport_failure_is_observable"),),
    ),
    "CR-CORE-004": Binding(
        "core",
        "actual_known",
        ("commit_nonconformant_2xx_or_body",),
        (_core("test_cr_core_004_nonconformant_success_stays_ambiguous"),),
    ),
    "CR-DURABLE-001": Binding(
        "durable",
        "actual_known",
        ("process_terminated_while_first_commit_is_in_flight", "process_restarted"),
        (_durable("test_cr_durable_001_journal_written_before_first_commit"),),
    ),
    "CR-DURABLE-002": Binding(
        "durable",
        "journal_contains_commit",
        (
            "process_restarted",
            "commit_reservation_expired",
            "process_terminated_after_mode_switch",
            "process_restarted",
        ),
        (_durable("test_cr_durable_002_expired_replay_switches_durably_to_event"),),
    ),
    "CR-DURABLE-003": Binding(
        "durable",
        "actual_known",
        (
            "commit_429_with_retry_after",
            "process_terminated_after_journal_write",
            "process_restarted_before_retry_after",
        ),
        (_durable("test_cr_durable_003_rate_limit_floor_survives_restart"),),
    ),
    "CR-DURABLE-004": Binding(
        "durable",
        "journal_contains_commit_with_tenant_identity",
        ("api_key_rotated", "process_restarted"),
        (_durable("test_cr_durable_004_tenant_journal_survives_key_rotation"),),
    ),
    "CR-DURABLE-005": Binding(
        "durable",
        "journal_contains_corrupt_or_unsupported_record",
        ("process_restarted",),
        (_durable("test_cr_durable_005_corrupt_and_unsupported_records_quarantined"),),
    ),
    "CR-DURABLE-006": Binding(
        "durable",
        "journal_contains_commit",
        ("two_independent_workers_replay_same_record",),
        (_durable("test_cr_durable_006_concurrent_replay_settles_once"),),
    ),
    "CR-DURABLE-007": Binding(
        "durable",
        "journal_contains_records_with_colliding_legacy_identifiers",
        ("legacy_record_encountered",),
        (_durable("test_cr_durable_007_filenames_and_legacy_migration"),),
    ),
    "CR-BOUNDARY-001": Binding(
        "boundary",
        "actual_unknown",
        ("guarded_action_does_not_return_actual",),
        (_core("test_cr_boundary_001_missing_actual_is_surfaced_without_settlement"),),
    ),
}


def log(message: str) -> None:
    print(f"cycles-lite recovery adapter: {message}", file=sys.stderr, flush=True)


def check_input(scenario_id: str, raw: str, binding: Binding) -> Optional[str]:
    """None when stdin is the scenario ``binding`` implements, else why not."""
    try:
        scenario = json.loads(raw)
    except ValueError as exc:
        return f"stdin is not JSON: {exc}"
    if not isinstance(scenario, dict):
        return "stdin must be one JSON object"
    oracle = sorted(ORACLE_FIELDS & set(scenario))
    if oracle:
        return "refusing runner oracle data on stdin: " + ", ".join(oracle)
    unknown = sorted(set(scenario) - ALLOWED_INPUT_FIELDS)
    if unknown:
        return "unexpected scenario fields on stdin: " + ", ".join(unknown)
    if scenario.get("id") != scenario_id:
        return f"stdin scenario id {scenario.get('id')!r} does not match argument {scenario_id!r}"
    expected = {
        "level": binding.level,
        "precondition": binding.precondition,
        "faults": list(binding.faults),
    }
    for field, value in expected.items():
        if scenario.get(field) != value:
            return (
                f"scenario {field} {scenario.get(field)!r} differs from the one the native "
                f"tests implement ({value!r}): the binding is stale, review it"
            )
    return None


_RAN = re.compile(r"^Ran (\d+) tests? in ", re.MULTILINE)
_VERDICT = re.compile(r"^(OK|FAILED)\b(.*)$", re.MULTILINE)


def verdict(output: str, returncode: int, expected_count: int) -> Optional[str]:
    """None when every listed test ran and passed (a skip is not a pass)."""
    ran: List[str] = _RAN.findall(output)
    verdicts: List[Tuple[str, str]] = _VERDICT.findall(output)
    if returncode != 0 or not verdicts or verdicts[-1][0] != "OK":
        return f"native tests failed (exit {returncode}); see stderr"
    if not ran or int(ran[-1]) != expected_count:
        count = ran[-1] if ran else "none"
        return f"expected {expected_count} native tests to run, unittest ran {count}"
    detail = verdicts[-1][1]
    if "skipped" in detail or "expected failures" in detail:
        return "a native test was skipped or expected to fail: " + detail.strip()
    return None


def run_tests(tests: Sequence[str], timeout_s: float) -> Optional[str]:
    """Run exactly ``tests``; their output goes to our stderr.  None on success."""
    command = [sys.executable, "-m", "unittest", "-v", *tests]
    log("running " + " ".join(command) + f" (cwd {REPO_ROOT})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"native tests did not finish within {timeout_s:g} s"
    except OSError as exc:
        return f"could not start the native tests: {exc}"
    sys.stderr.write(completed.stdout)
    sys.stderr.flush()
    return verdict(completed.stdout, completed.returncode, len(tests))


def result(scenario_id: str, tests: Sequence[str], failure: Optional[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "scenario_id": scenario_id,
        "passed": failure is None,
        "native_tests": list(tests),
    }
    if failure is not None:
        out["diagnostic"] = failure
    return out


def timeout_from_env() -> float:
    raw = os.environ.get("CYCLES_RECOVERY_ADAPTER_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        log("usage: cycles_lite_recovery_adapter.py SCENARIO_ID  (scenario JSON on stdin)")
        return 2
    scenario_id = argv[1]
    binding = BINDINGS.get(scenario_id)
    if binding is None:
        failure: Optional[str] = f"no native tests are bound to {scenario_id!r}"
        tests: Sequence[str] = ()
    else:
        tests = binding.tests
        failure = check_input(scenario_id, sys.stdin.read(), binding)
        if failure is None:
            failure = run_tests(tests, timeout_from_env())
    if failure is not None:
        log(f"{scenario_id}: FAILED: {failure}")
    print(json.dumps(result(scenario_id, tests, failure)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
