# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0.
"""Settlement where the client really runs: forked workers, warm Lambda sandboxes,
deadlines and releases that fail, over real HTTP against a LocalCyclesServer.

Run with ``python3 -W error -m unittest test_cycles_lite_deployment``.  Only time is
mocked (the slow retry interval of kept settlements, where waiting minutes is the
point); every fault comes from the server's fault injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import unittest
import warnings
from typing import Any, Callable, Dict, Iterator, List
from unittest import mock

import cycles_lite as cl
from cycles_lite_server import LocalCyclesServer
from test_cycles_lite import VIRTUAL_CLOCK, wait_for as _wait_for

UNIT = "USD_MICROCENTS"
KEY = "deploy-key"
CHILD_KEY = "deploy-child-key"
LOGGER = "cycles_lite"
BIG = 10**12



@contextlib.contextmanager
def _quiet_fork_warning() -> Iterator[None]:
    """Python 3.12+ warns when a process with threads forks (the server runs in one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class DeploymentCase(unittest.TestCase):
    """One server per class; per test a fresh agent scope, journal directory and request log."""

    srv: LocalCyclesServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = LocalCyclesServer(
            api_keys={KEY: "acme", CHILD_KEY: "kid"},
            budgets=[
                {"scope": "tenant:acme", "unit": UNIT, "allocated": BIG},
                {"scope": "tenant:kid", "unit": UNIT, "allocated": BIG},
            ],
        )
        cls.srv.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()
        self.agent = "dep" + os.urandom(4).hex()
        self.scope = f"tenant:acme/agent:{self.agent}"
        self.srv.add_budget(self.scope, UNIT, BIG)
        self.journal_dir = tempfile.mkdtemp(prefix="cycles-deploy-")
        self.addCleanup(shutil.rmtree, self.journal_dir, True)
        self.addCleanup(self._settle_everything)

    def _settle_everything(self) -> None:
        self.srv.clear_faults()
        self.assertTrue(cl.flush(10), "settlements still open after the test")
        self.srv.check_invariants()

    def config(self, **overrides: Any) -> cl.CyclesConfig:
        options: Dict[str, Any] = dict(
            base_url=self.srv.url,
            api_key=KEY,
            tenant="acme",
            agent=self.agent,
            journal_dir=self.journal_dir,
            retry_initial_delay=0.01,
            retry_max_delay=0.05,
            retry_max_attempts=2,
            request_timeout=1.0,
        )
        options.update(overrides)
        return cl.CyclesConfig(**options)

    def client(self, **overrides: Any) -> cl.CyclesClient:
        client = cl.CyclesClient(self.config(**overrides))
        self.addCleanup(client.close)
        return client

    def guarded(self, client: Any, actual: int, estimate: int = 1_000) -> Callable[[], Any]:
        return cl.cycles(estimate=estimate, actual=actual, action_kind="llm.completion",
                         action_name="m", client=client)(lambda: "done")

    def queue_with_room_for_one_kept(self) -> cl._SettlementQueue:
        queue = cl._SettlementQueue(capacity=2)  # room for 1 kept
        self.addCleanup(setattr, cl, "_settlements", cl._settlements)
        cl._settlements = queue
        return queue

    def two_kept_commits_one_turned_away(self, client: cl.CyclesClient) -> str:
        """Two guarded calls whose commits got 503s, kept at once; the second finds the kept
        half full and is lost, logged at ERROR and never as "left to the journal"."""
        self.srv.inject("commit", "status", status=503, times=2)
        with self.assertLogs(LOGGER, "WARNING") as logs:
            self.guarded(client, 1)()
            self.guarded(client, 2)()  # kept too, but the kept half is full
        output = "\n".join(logs.output)
        self.assertNotIn("left to the journal", output)
        lost = [line for line in logs.output if "LOST" in line]
        self.assertEqual(len(lost), 1, output)
        self.assertTrue(lost[0].startswith("ERROR:"), lost[0])
        return output

    def client_with_three_kept_commits(self) -> cl.CyclesClient:
        """A client whose three guarded calls' commits (actuals 1, 2, 3) got 503s and were
        kept at once: three records in the journal."""
        client = self.client(retry_max_attempts=0, request_timeout=5.0)
        self.srv.inject("commit", "status", status=503, times=3)
        with self.assertLogs(LOGGER, "ERROR"):
            for actual in (1, 2, 3):
                self.guarded(client, actual)()
        self.assertEqual(len(self.journal_records()), 3)
        return client

    def balance(self, scope: str | None = None) -> Dict[str, Any]:
        return self.srv.balance(scope or self.scope, UNIT)

    def journal_records(self) -> List[str]:
        return [name for _, _, names in os.walk(self.journal_dir) for name in names
                if name.endswith(".json")]

    def keys(self, operation: str) -> List[str]:
        return [r.body["idempotency_key"] for r in self.srv.requests_for(operation)
                if isinstance(r.body, dict)]

    def statuses(self) -> List[str]:
        return [self.srv.reservation(r.response_body["reservation_id"])["status"]
                for r in self.srv.requests_for("create")
                if r.status == 200 and isinstance(r.response_body, dict)
                and "reservation_id" in r.response_body]


# ---------------------------------------------------------------------------
# 1. Fork
# ---------------------------------------------------------------------------


def _exercise(client: cl.CyclesClient, tag: int, rounds: int) -> Dict[str, Any]:
    """Guarded calls and low-level create/commit pairs; every answer checked against
    its own request (amounts unique to this process and call)."""
    report: Dict[str, Any] = {"spent": 0, "mismatches": 0, "errors": [], "calls": 0}
    for n in range(rounds):
        actual = 1_000 * tag + 2 * n + 1
        try:
            guarded = cl.cycles(estimate=actual + 1, actual=actual, action_kind="llm.completion",
                                action_name=f"p{tag}", client=client)(lambda: "ok")
            guarded()
            report["spent"] += actual
            estimate = actual + 2
            created = client.create_reservation({
                "idempotency_key": cl._new_key(),
                "subject": {"tenant": "acme", "agent": client._config.agent},
                "action": {"kind": "llm.completion", "name": f"p{tag}"},
                "estimate": {"unit": UNIT, "amount": estimate},
            })
            reserved = (created.body or {}).get("reserved") or {}
            if not created.is_success or reserved.get("amount") != estimate:
                report["mismatches"] += 1
                continue
            committed = client.commit_reservation(created.body["reservation_id"], {
                "idempotency_key": cl._new_key(), "actual": {"unit": UNIT, "amount": actual},
            })
            charged = (committed.body or {}).get("charged") or {}
            if not committed.is_success or charged.get("amount") != actual:
                report["mismatches"] += 1
                continue
            report["spent"] += actual
            report["calls"] += 2
        except Exception as exc:  # reported to the parent, never swallowed
            report["errors"].append(f"{type(exc).__name__}: {exc}")
    cl.flush(10)  # (its truth may count another process's record in flight)
    report["queued"] = cl._settlements.pending()
    return report


def _child_main(write_fd: int, work: Callable[[], Dict[str, Any]]) -> None:
    """In a forked child: run ``work``, send its report, exit without the parent's atexit."""
    code = 0
    warnings.simplefilter("ignore", ResourceWarning)  # the parent's sockets, collected here
    try:
        data = json.dumps(work()).encode()
    except BaseException as exc:
        data, code = json.dumps({"crash": repr(exc)}).encode(), 1
    with os.fdopen(write_fd, "wb") as out:
        out.write(data)
    os._exit(code)


def _fork(work: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
    """os.fork() a child running ``work``; returns a function waiting for its report."""
    read_fd, write_fd = os.pipe()
    with _quiet_fork_warning():
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        _child_main(write_fd, work)
    os.close(write_fd)

    def result() -> Dict[str, Any]:
        with os.fdopen(read_fd, "rb") as pipe:
            raw = pipe.read()
        _, status = os.waitpid(pid, 0)
        report: Dict[str, Any] = json.loads(raw or b'{"crash": "no report"}')
        report["exit"] = status
        return report

    return result


@unittest.skipUnless(hasattr(os, "fork"), "os.fork does not exist here")
class TestFork(DeploymentCase):
    def warmed_client(self) -> cl.CyclesClient:
        client = self.client(pool_maxsize=8, request_timeout=5.0)  # no timeouts under load
        for _ in range(3):  # idle keep-alive connections in the pool at fork time
            self.assertTrue(client.get_balances(tenant="acme").is_success)
        self.guarded(client, 5)()
        self.assertTrue(client._transport._idle)
        return client

    def assert_ledger_exact(self, reports: List[Dict[str, Any]], parent_spent: int) -> None:
        for report in reports:
            self.assertNotIn("crash", report)
            self.assertEqual(report["exit"], 0)
            self.assertEqual((report["mismatches"], report["errors"]), (0, []), report)
            self.assertEqual(report["queued"], 0, report)
        spent = parent_spent + sum(report["spent"] for report in reports)
        balance = self.balance()
        self.assertEqual((balance["spent"], balance["reserved"]), (spent, 0))
        self.assertNotIn("ACTIVE", self.statuses())

    def test_os_fork_parent_and_children_at_the_same_time(self) -> None:
        client = self.warmed_client()
        children = [_fork(lambda tag=tag: _exercise(client, tag, 10)) for tag in (2, 3, 4)]
        parent = _exercise(client, 1, 10)
        reports = [child() for child in children]
        self.assertEqual((parent["mismatches"], parent["errors"]), (0, []), parent)
        self.assert_ledger_exact(reports, parent["spent"] + 5)
        self.assertTrue(client.get_balances(tenant="acme").is_success)  # the parent's pool works

    def test_multiprocessing_fork_context(self) -> None:
        client = self.warmed_client()
        context = multiprocessing.get_context("fork")
        receivers = []
        processes = []
        for tag in (5, 6):
            receiver, sender = context.Pipe(duplex=False)

            def work(tag: int = tag, sender: Any = sender) -> None:
                sender.send(_exercise(client, tag, 8))

            with _quiet_fork_warning():
                process = context.Process(target=work)
                process.start()
            receivers.append(receiver)
            processes.append(process)
        parent = _exercise(client, 1, 8)
        reports = []
        for receiver, process in zip(receivers, processes):
            report = receiver.recv()
            process.join(30)
            report["exit"] = process.exitcode
            reports.append(report)
        self.assertEqual((parent["mismatches"], parent["errors"]), (0, []), parent)
        self.assert_ledger_exact(reports, parent["spent"] + 5)

    def test_child_settles_its_first_503_commit_with_its_own_worker_and_flush(self) -> None:
        parent_client = self.client(retry_initial_delay=2.0, retry_max_delay=2.0)
        self.srv.inject("commit", "status", status=503)
        self.guarded(parent_client, 7)()  # the parent's retry waits on its worker
        self.assertEqual(cl._settlements.pending(), 1)
        self.assertIsNotNone(cl._settlements._worker)
        parent_job = cl._settlements.busy()
        child_journal = tempfile.mkdtemp(prefix="cycles-deploy-child-")
        self.addCleanup(shutil.rmtree, child_journal, True)

        def child() -> Dict[str, Any]:
            inherited = sorted(cl._settlements.busy())
            client = cl.CyclesClient(self.config(api_key=CHILD_KEY, tenant="kid",
                                                 journal_dir=child_journal, request_timeout=5.0))
            self.guarded(client, 11)()
            queued = cl._settlements.pending()
            by_its_worker = _wait_for(lambda: cl._settlements.pending() == 0)  # no flush yet
            result = cl.flush(10)
            return {"inherited": inherited, "queued": queued, "by_its_worker": by_its_worker,
                    "flush": [result.settled, result.pending, result.given_up]}

        self.srv.inject("commit", "status", status=503)  # the child's first commit
        report = _fork(child)()
        self.assertEqual(report.get("exit"), 0, report)
        self.assertEqual(report["inherited"], [])  # none of the parent's jobs
        self.assertEqual(report["queued"], 1)  # its own retry, on its own worker
        self.assertTrue(report["by_its_worker"])
        self.assertEqual(report["flush"], [0, 0, 0])
        kid = self.srv.balance("tenant:kid", UNIT)
        self.assertEqual((kid["spent"], kid["reserved"]), (11, 0))
        self.assertEqual(cl._settlements.busy(), parent_job)  # the parent is unaffected
        (parent_rid,) = parent_job
        parent_commits = [r for r in self.srv.requests_for("commit") if parent_rid in r.path]
        self.assertEqual(len(parent_commits), 1)  # the child never ran the parent's retry
        self.assertTrue(cl.flush(10))
        self.assertEqual(self.balance()["spent"], 7)

    def test_a_guard_open_across_the_fork_keeps_its_heartbeat_in_the_parent_only(self) -> None:
        client = self.client(request_timeout=0.2)
        with client.reserve(1_000, action_kind="llm.completion", action_name="m",
                            ttl_ms=3_500) as guard:  # a beat every ~0.5 s
            self.assertTrue(_wait_for(lambda: len(self.srv.requests_for("extend")) >= 1))

            def child() -> Dict[str, Any]:
                started = time.monotonic()
                guard._heartbeat.stop()  # inherited: nothing to wait for, nothing to beat
                return {"stop_s": time.monotonic() - started}

            report = _fork(child)()
            beats = len(self.srv.requests_for("extend"))
            self.assertTrue(_wait_for(lambda: len(self.srv.requests_for("extend")) > beats))
            guard.commit(4)
        self.assertEqual(report.get("exit"), 0, report)
        self.assertLess(report["stop_s"], 1.0)
        self.assertEqual(self.srv.reservation(guard.reservation_id)["status"], "COMMITTED")

    def test_a_fork_without_the_hooks_is_caught_by_the_pid_check(self) -> None:
        client = self.warmed_client()
        stale = list(client._transport._idle)
        client._transport._pid = -1  # as if forked from C code, which skips the at-fork hooks
        self.assertTrue(client.get_balances(tenant="acme").is_success)
        self.assertEqual(client._transport._pid, os.getpid())
        self.assertTrue(all(conn.sock.fileno() == -1 for conn in stale))  # never reused: closed
        self.assertNotIn(stale[0], client._transport._idle)

    def test_the_reset_runs_for_every_registered_reset(self) -> None:
        calls: List[str] = []
        reset = cl._after_fork_in_child(lambda: calls.append("reset"))
        self.addCleanup(cl._fork_resets.remove, reset)
        report = _fork(lambda: {"calls": calls})()
        self.assertEqual(report["calls"], ["reset"])
        self.assertEqual(calls, [])  # not in the parent


# ---------------------------------------------------------------------------
# 2. Warm sandboxes: kept settlements are retried by the same process
# ---------------------------------------------------------------------------


class TestKeptSettlements(DeploymentCase):
    def test_kept_commit_is_retried_by_flush_and_flush_tells_the_truth(self) -> None:
        client = self.client()
        self.srv.inject("commit", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 40)()
            result = cl.flush(5)
        self.assertFalse(result)
        self.assertEqual((result.settled, result.pending, result.given_up), (0, 1, 0))
        self.assertEqual(len(self.journal_records()), 1)
        self.srv.clear_faults()  # the server is back
        result = cl.flush(5)
        self.assertTrue(result)
        self.assertEqual((result.settled, result.pending, result.given_up), (1, 0, 0))
        self.assertEqual(self.journal_records(), [])
        self.assertEqual(len(set(self.keys("commit"))), 1)
        self.assertEqual((self.balance()["spent"], self.balance()["reserved"]), (40, 0))

    def test_the_next_guarded_call_wakes_a_kept_commit(self) -> None:
        client = self.client()
        self.srv.inject("commit", "status", status=503, times=3)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 30)()
            self.assertFalse(cl.flush(5))
        commits = len(self.srv.requests_for("commit"))
        self.assertEqual(commits, 3)
        with mock.patch.object(cl, "_KEPT_RETRY_ACTIVITY_GAP_S", 0.0):
            self.guarded(client, 20)()  # activity: the worker tries the kept commit again
        self.assertTrue(_wait_for(lambda: self.balance()["spent"] == 50))
        self.assertTrue(cl.flush(5))
        self.assertEqual(self.balance()["reserved"], 0)

    def test_no_tight_loop_while_the_server_is_down(self) -> None:
        client = self.client()
        self.srv.inject("commit", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 10)()
            self.assertFalse(cl.flush(5))
        attempts = len(self.srv.requests_for("commit"))
        started = time.monotonic()
        for _ in range(20):  # busy traffic (guarded calls that release) right after
            with self.assertRaises(KeyError), client.reserve(1, action_kind="llm.completion"):
                raise KeyError("released")
        time.sleep(0.3)
        wakes = 1 + int((time.monotonic() - started) // cl._KEPT_RETRY_ACTIVITY_GAP_S)
        self.assertLessEqual(len(self.srv.requests_for("commit")), attempts + wakes - 1)
        self.assertEqual(len(self.srv.requests_for("release")), 20)

    def test_the_worker_retries_kept_commits_at_a_slow_capped_interval(self) -> None:
        job = cl._Settlement.for_record(self.client(), cl._PendingSettlement("r", "u"))
        intervals = []
        for _ in range(7):
            job.keep()
            intervals.append(round(job.due - job.kept_at))
        self.assertEqual(intervals, [30, 60, 120, 240, 300, 300, 300])
        job.last_step = cl._SettlementStep(cl._Disposition.STOP_KEEP, 900_000, None,
                                           "retries_exhausted", cause="rate_limited")
        job.keep()  # a 429 floor beyond the interval is honoured
        self.assertEqual(round(job.due - job.kept_at), 900)
        self.assertEqual(round(job.not_before - job.kept_at), 900)

    def test_the_worker_alone_settles_a_kept_commit_when_the_server_is_back(self) -> None:
        client = self.client()
        self.srv.inject("commit", "status", status=503, times=None)
        with mock.patch.object(cl, "_KEPT_RETRY_FIRST_MS", 300):
            with self.assertLogs(LOGGER, "ERROR"):
                self.guarded(client, 25)()
                self.assertTrue(_wait_for(lambda: cl._settlements.kept == 1))
            self.srv.clear_faults()
            self.assertTrue(_wait_for(lambda: self.balance()["spent"] == 25))  # no flush, no call
            self.assertTrue(_wait_for(lambda: cl._settlements.pending() == 0))

    def test_flush_counts_journal_records_and_given_up_settlements(self) -> None:
        client = self.client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.guarded(client, 3)()  # the journal of this identity is in use
        journal = cl._journal_for(client._config)
        assert journal is not None
        stray = cl._PendingSettlement("rsv_from_an_earlier_process", self.srv.url,
                                      commit_body={"idempotency_key": "k", "actual": {}})
        self.assertTrue(journal.write(stray))
        result = cl.flush(1)
        self.assertEqual((bool(result), result.pending), (False, 1))
        journal.remove(stray.reservation_id)
        self.srv.inject("commit", "status", status=503)
        self.srv.inject("commit", "status", status=400, error="INVALID_REQUEST")
        with self.assertLogs(LOGGER, "WARNING"):
            self.guarded(client, 4)()
            result = cl.flush(5)
        self.assertEqual((result.settled, result.pending, result.given_up), (0, 0, 1))
        self.assertTrue(result)
        self.assertEqual(self.balance()["reserved"], 1_000)  # rejected: never released
        self.srv.clock.advance(120_000)

    def test_kept_settlements_never_crowd_live_retries_out(self) -> None:
        queue = cl._SettlementQueue(capacity=4)  # room for 2 kept, 4 live
        self.addCleanup(setattr, cl, "_settlements", cl._settlements)
        cl._settlements = queue
        keeper = self.client(retry_max_attempts=0)  # kept at the first failure
        self.srv.inject("commit", "status", status=503, times=4)
        with self.assertLogs(LOGGER, "WARNING") as logs:
            for actual in (1, 2, 3):
                self.guarded(keeper, actual)()
        self.assertEqual((queue.kept, len(self.journal_records())), (2, 3))
        self.assertIn("left to the journal", "\n".join(logs.output))
        live = self.client(retry_initial_delay=0.2, retry_max_delay=0.2)
        self.guarded(live, 4)()  # its retry is queued, not run on the caller
        self.assertEqual(queue.pending(), 3)
        self.assertEqual(len(self.srv.requests_for("commit")), 4)
        result = cl.flush(5)
        self.assertEqual((result.settled, result.pending), (3, 1))  # the third: journal only
        self.assertEqual(keeper.recover(timeout=5).settled, 1)
        self.assertTrue(cl.flush(5))
        self.assertEqual(self.balance()["spent"], 10)

    def test_flush_result_reads_as_a_bool(self) -> None:
        self.assertTrue(cl.FlushResult())
        self.assertFalse(cl.FlushResult(settled=3, pending=1))
        self.assertEqual(repr(cl.FlushResult(1, 0, 2)),
                         "FlushResult(settled=1, pending=0, given_up=2)")

    def test_aflush_returns_the_same_result(self) -> None:
        client = self.client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.srv.inject("commit", "status", status=503)
        self.guarded(client, 6)()
        result = asyncio.run(cl.aflush(5))
        self.assertEqual((result.settled, result.pending, bool(result)), (1, 0, True))


def _lambda_handler(client: cl.CyclesClient, spent: List[int]) -> Callable[[int], Any]:
    """A warm sandbox's handler: one guarded call, then a flush, under a 3 s deadline."""
    def handler(actual: int) -> cl.FlushResult:
        with cl.deadline(2.7):
            try:
                cl.cycles(estimate=5_000, actual=actual, action_kind="llm.completion",
                          action_name="m", client=client)(lambda: "ok")()
                spent.append(actual)
            finally:
                result = cl.flush()
        return result
    return handler


class TestWarmSandbox(DeploymentCase):
    def test_a_warm_invocation_after_an_outage_settles_what_was_kept(self) -> None:
        client = self.client(retry_max_attempts=1, request_timeout=0.5)
        spent: List[int] = []
        handler = _lambda_handler(client, spent)
        self.assertTrue(handler(100))
        self.srv.inject("commit", "status", status=503, times=None)  # commits fail for long
        with self.assertLogs(LOGGER, "ERROR"):
            outage = [handler(amount) for amount in (200, 300, 400)]
        self.assertEqual([r.pending for r in outage], [1, 2, 3])
        self.assertEqual(len(self.journal_records()), 3)
        self.assertEqual(self.balance()["spent"], 100)
        self.srv.clear_faults()  # the server is back; the same process, no cold start
        result = handler(500)
        self.assertEqual((result.settled, result.pending, bool(result)), (3, 0, True))
        balance = self.balance()
        self.assertEqual((balance["spent"], balance["reserved"]), (sum(spent), 0))
        self.assertEqual(sum(spent), 1_500)
        self.assertEqual(self.journal_records(), [])
        self.assertNotIn("ACTIVE", self.statuses())


# ---------------------------------------------------------------------------
# 3. Deadlines
# ---------------------------------------------------------------------------


class TestDeadline(DeploymentCase):
    def test_create_against_a_silent_server_ends_by_the_deadline(self) -> None:
        client = self.client(request_timeout=None, read_timeout=5.0)
        self.srv.inject("create", "delay", delay_ms=3_000, times=2)
        started = time.monotonic()
        with cl.deadline(0.4), self.assertRaises(cl.CyclesTransportError):
            self.guarded(client, 1)()
        self.assertLess(time.monotonic() - started, 1.5)  # not two 5 s read timeouts
        self.srv.clock.advance(120_000)  # the late create expires

    def test_inline_retries_stop_at_the_deadline_and_the_worker_carries_on(self) -> None:
        client = self.client(commit_retry="inline", retry_initial_delay=0.3,
                             retry_max_delay=0.3, retry_max_attempts=10)
        self.srv.inject("commit", "status", status=503, times=None)
        started = time.monotonic()
        with cl.deadline(0.5):
            self.guarded(client, 8)()
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(len(self.journal_records()), 1)  # kept for later, never dropped
        self.assertEqual(cl._settlements.pending(), 1)
        self.srv.clear_faults()
        self.assertTrue(cl.flush(5))
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (8, 1))

    def test_nothing_fits_after_the_deadline_so_everything_is_journaled(self) -> None:
        client = self.client()
        with cl.deadline(1.0):
            guard = client.reserve(1_000, action_kind="llm.completion", action_name="m")
            with guard:
                with cl.deadline(0):
                    guard.commit(9)
        self.assertIsNone(guard.settlement_error)  # no attempt failed: none was made here
        self.assertTrue(cl.flush(5))  # the worker settles it, outside the deadline
        self.assertEqual((self.balance()["spent"], len(self.keys("commit"))), (9, 1))

    def test_flush_and_recover_honour_the_deadline(self) -> None:
        client = self.client(retry_initial_delay=2.0, retry_max_delay=2.0)
        self.srv.inject("commit", "status", status=503)
        self.guarded(client, 12)()
        started = time.monotonic()
        with cl.deadline(0.2):
            result = cl.flush()  # no timeout: the deadline bounds it
            summary = client.recover()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((result.pending, summary.kept), (1, 1))
        self.assertTrue(cl.flush(10))

    def test_no_heartbeat_beat_starts_after_the_deadline(self) -> None:
        client = self.client(request_timeout=0.2)
        for bound, beats in ((None, 1), (0.3, 0)):  # the first beat is due ~0.5 s in
            with self.subTest(deadline=bound):
                self.srv.clear_requests()
                with cl.deadline(bound) if bound else contextlib.nullcontext():
                    with client.reserve(1_000, action_kind="llm.completion", action_name="m",
                                        ttl_ms=3_500) as guard:
                        VIRTUAL_CLOCK.pass_time(1.0, self.srv)
                        guard.commit(2)
                self.assertTrue(cl.flush(5))
                self.assertEqual(len(self.srv.requests_for("extend")), beats)
                self.assertEqual(self.srv.reservation(guard.reservation_id)["status"],
                                 "COMMITTED")

    def test_no_async_heartbeat_beat_starts_after_the_deadline(self) -> None:
        client = cl.AsyncCyclesClient(self.config(request_timeout=0.2))

        async def run() -> None:
            with cl.deadline(0.3):  # the first beat would be due ~0.5 s in
                async with client.reserve(1_000, action_kind="llm.completion",
                                          ttl_ms=3_500) as guard:
                    await asyncio.sleep(1.0)
                    await guard.commit(2)
            await cl.aflush(5)
            await client.aclose()

        asyncio.run(run())
        self.assertEqual(self.srv.requests_for("extend"), [])
        self.assertEqual(self.balance()["spent"], 2)

    def test_async_code_uses_the_same_with_statement(self) -> None:
        client = cl.AsyncCyclesClient(self.config(request_timeout=None, read_timeout=5.0))
        self.srv.inject("create", "delay", delay_ms=3_000, times=2)

        async def run() -> float:
            started = time.monotonic()
            with cl.deadline(0.4):
                with self.assertRaises(cl.CyclesTransportError):
                    async with client.reserve(1_000, action_kind="llm.completion"):
                        pass  # pragma: no cover
                await cl.aflush()
            elapsed = time.monotonic() - started
            await client.aclose()
            return elapsed

        self.assertLess(asyncio.run(run()), 1.5)
        self.srv.clock.advance(120_000)

    def test_bad_seconds_are_refused_and_negative_means_none_left(self) -> None:
        for bad in ("1", None, True, float("nan")):
            with self.assertRaisesRegex(ValueError, "^seconds: "):
                with cl.deadline(bad):  # type: ignore[arg-type]
                    pass  # pragma: no cover
        with cl.deadline(-3):
            self.assertTrue(cl._out_of_time())
        with cl.deadline(60), cl.deadline(120):  # nested: only shortens
            bound = cl._deadline.get()
            assert bound is not None
            self.assertLess(bound - cl._clock.monotonic(), 61)
        self.assertIsNone(cl._deadline.get())
        self.assertEqual(cl._effective_deadline(5.0), 5.0)


# ---------------------------------------------------------------------------
# 5. A release whose first attempt fails
# ---------------------------------------------------------------------------


class TestReleaseRetry(DeploymentCase):
    def release_after_failure(self, client: Any) -> str:
        with self.assertRaises(RuntimeError):
            with client.reserve(1_000, action_kind="llm.completion", action_name="m"):
                raise RuntimeError("the work failed: release")
        return str(self.srv.requests_for("create")[-1].response_body["reservation_id"])

    def test_transient_failures_are_retried_in_the_background_with_the_same_key(self) -> None:
        faults = [
            ("status", {"status": 429, "headers": {"Retry-After": "1"}}),
            ("status", {"status": 429}),
            ("status", {"status": 503}),
            ("drop", {}),
            ("delay", {"delay_ms": 1_500}),
        ]
        client = self.client(request_timeout=0.5, pool_maxsize=0)  # no stale-connection resend
        for fault, params in faults:
            with self.subTest(fault=fault, **params):
                self.srv.clear_requests()
                self.srv.inject("release", fault, **params)
                started = time.monotonic()
                with self.assertLogs(LOGGER, "WARNING"):
                    rid = self.release_after_failure(client)
                self.assertLess(time.monotonic() - started, 1.5)  # the caller is not held
                self.assertTrue(VIRTUAL_CLOCK.run(lambda: cl.flush(10), self.srv))
                self.assertEqual(self.srv.reservation(rid)["status"], "RELEASED")
                self.assertTrue(_wait_for(lambda: len(self.srv.requests_for("release")) == 2))
                keys = self.keys("release")
                self.assertEqual((len(keys), len(set(keys))), (2, 1))
                if params.get("headers"):
                    first, second = self.srv.requests_for("release")
                    self.assertGreaterEqual(second.time_ms - first.time_ms, 950)
        self.assertEqual(self.balance()["reserved"], 0)

    def test_a_recognised_rejection_is_not_retried(self) -> None:
        client = self.client()
        self.srv.inject("release", "status", status=409, error="RESERVATION_FINALIZED")
        with self.assertLogs(LOGGER, "WARNING"):
            self.release_after_failure(client)
        self.assertTrue(cl.flush(5))
        self.assertEqual(len(self.srv.requests_for("release")), 1)
        self.srv.clock.advance(120_000)

    def test_retries_end_with_the_policy_and_leave_the_reservation_to_expire(self) -> None:
        client = self.client(retry_max_attempts=2, retry_initial_delay=0.2,
                             retry_max_delay=0.2)
        self.srv.inject("release", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "WARNING"):
            self.release_after_failure(client)
            result = cl.flush(5)
        self.assertEqual((result.pending, result.given_up), (0, 1))
        self.assertEqual(len(self.srv.requests_for("release")), 3)
        self.srv.clock.advance(120_000)


if __name__ == "__main__":
    unittest.main()


class TestFlushTimeoutBoundsItsOwnAttempts(DeploymentCase):
    """Review: ``flush(timeout)`` cut its own HTTP attempts only under ``deadline()``."""

    def test_an_attempt_started_by_flush_ends_by_its_timeout(self) -> None:
        client = self.client(request_timeout=5.0)
        self.srv.inject("commit", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 7)()
            self.assertTrue(_wait_for(lambda: cl._settlements.kept == 1))
        self.srv.clear_faults()
        self.srv.inject("commit", "delay", delay_ms=3_000, times=None)  # a silent server
        started = time.monotonic()
        result = cl.flush(0.3)  # its one attempt at the kept commit runs on this thread
        self.assertLess(time.monotonic() - started, 2.0)  # not the 5 s attempt timeout
        self.assertFalse(result)
        self.assertEqual((result.pending, len(self.journal_records())), (1, 1))
        self.srv.clear_faults()
        self.assertTrue(cl.flush(10))
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (7, 1))


class TestFlushTimeoutIsChecked(DeploymentCase):
    """Review: ``flush("3")`` raised a bare TypeError from inside the arithmetic."""

    def test_a_bad_timeout_is_a_value_error_naming_it(self) -> None:
        for bad in ("3", True, float("nan"), [1]):
            with self.subTest(timeout=bad):
                with self.assertRaisesRegex(ValueError, r"^timeout: must be a number"):
                    cl.flush(bad)  # type: ignore[arg-type]
                with self.assertRaisesRegex(ValueError, r"^timeout: must be a number"):
                    asyncio.run(cl.aflush(bad))  # type: ignore[arg-type]

    def test_a_negative_timeout_still_counts_as_zero(self) -> None:
        self.assertTrue(cl.flush(-1.0))
        self.assertTrue(asyncio.run(cl.aflush(-1)))


class TestHeartbeatStopHonoursTheDeadline(DeploymentCase):
    """Review: stopping a sync heartbeat waited for its extend in flight until the
    attempt timeout, past the ``deadline()`` of the commit that stopped it."""

    def test_a_commit_under_a_deadline_does_not_wait_for_an_extend_in_flight(self) -> None:
        client = self.client(request_timeout=3.0)
        self.srv.inject("extend", "delay", delay_ms=2_500)
        with client.reserve(1_000, action_kind="llm.completion", action_name="m",
                            ttl_ms=3_500) as guard:  # the first beat is due ~0.5 s in
            self.assertTrue(_wait_for(lambda: bool(self.srv.requests_for("extend"))
                                      or bool(cl._heartbeats._running)))
            time.sleep(0.2)  # the extend is on the wire, its answer 2.5 s away
            started = time.monotonic()
            with cl.deadline(0.3):
                guard.commit(6)
            self.assertLess(time.monotonic() - started, 1.5)
        self.assertTrue(cl.flush(10))  # the worker commits it, with the same key
        self.assertEqual(self.srv.reservation(guard.reservation_id)["status"], "COMMITTED")
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (6, 1))

    def test_an_async_commit_under_a_deadline_does_not_wait_for_an_extend_either(self) -> None:
        client = cl.AsyncCyclesClient(self.config(request_timeout=3.0))
        self.srv.inject("extend", "delay", delay_ms=2_500)

        async def run() -> float:
            async with client.reserve(1_000, action_kind="llm.completion",
                                      ttl_ms=3_500) as guard:
                await asyncio.sleep(0.8)  # the first beat went out ~0.5 s in; 2.5 s to answer
                self.assertEqual(self.srv.requests_for("extend"), [])  # not answered yet
                started = time.monotonic()
                with cl.deadline(0.3):
                    await guard.commit(4)
                elapsed = time.monotonic() - started
            self.assertTrue(await cl.aflush(10))
            await client.aclose()
            return elapsed

        self.assertLess(asyncio.run(run()), 1.2)  # not the 1.7 s left of the extend
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (4, 1))


class TestRecoverTimeoutBoundsItsOwnAttempts(DeploymentCase):
    """Review: ``recover(timeout)`` waited out an attempt it started until the attempt
    timeout, past its own timeout."""

    def test_an_attempt_started_by_recover_ends_by_its_timeout(self) -> None:
        client = self.client(request_timeout=5.0)
        self.srv.inject("commit", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 11)()
            self.assertTrue(_wait_for(lambda: cl._settlements.kept == 1))
        self.srv.clear_faults()
        self.srv.inject("commit", "delay", delay_ms=3_000, times=None)
        for recover in (client.recover, self.async_recover(client)):
            with self.subTest(recover=recover):
                started = time.monotonic()
                summary = recover(0.3)
                self.assertLess(time.monotonic() - started, 2.0)  # not the 5 s attempt timeout
                self.assertEqual((summary.found, summary.kept), (1, 1))
                self.assertEqual(len(self.journal_records()), 1)
        self.srv.clear_faults()
        self.assertTrue(cl.flush(10))
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (11, 1))

    def async_recover(self, client: cl.CyclesClient) -> Callable[[float], cl.RecoverySummary]:
        async_client = cl.AsyncCyclesClient(client._config)

        async def recover(timeout: float) -> cl.RecoverySummary:
            try:
                return await async_client.recover(timeout)
            finally:
                await async_client.aclose()

        return lambda timeout: asyncio.run(recover(timeout))


class TestCancelledRecoverHandsItsJobsOver(DeploymentCase):
    """Review: a cancelled ``await client.recover()`` (``asyncio.wait_for``) dropped the
    kept settlements it had taken over from memory: journaled, but never retried by
    this warm process again."""

    def test_the_worker_settles_what_a_cancelled_recover_was_settling(self) -> None:
        client = self.client(request_timeout=5.0)
        self.srv.inject("commit", "status", status=503, times=None)
        with self.assertLogs(LOGGER, "ERROR"):
            self.guarded(client, 13)()
            self.assertTrue(_wait_for(lambda: cl._settlements.kept == 1))
        self.srv.clear_faults()
        self.srv.inject("commit", "status", status=503, times=1)  # recover's attempt fails...
        self.srv.inject("commit", "delay", delay_ms=2_000, times=1)  # ...then it waits here
        async_client = cl.AsyncCyclesClient(self.config(retry_initial_delay=0.5,
                                                        retry_max_delay=0.5))

        async def cancelled_recover() -> None:
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(async_client.recover(30), 0.2)
            await async_client.aclose()

        with self.assertLogs(LOGGER, "WARNING"):
            asyncio.run(cancelled_recover())
        self.assertEqual(cl._settlements.pending(), 1)  # handed to the worker, not dropped
        self.srv.clear_faults()
        self.assertTrue(cl.flush(10))
        self.assertEqual((self.balance()["spent"], len(set(self.keys("commit")))), (13, 1))
        self.assertEqual(self.journal_records(), [])


class TestFullQueueWithoutJournalSaysTheSettlementIsLost(DeploymentCase):
    """Review: with the journal disabled, a settlement the full queue turned away was
    logged as "left to the journal" and ``flush()`` reported nothing given up."""

    def test_the_log_and_flush_say_it_is_lost(self) -> None:
        queue = self.queue_with_room_for_one_kept()
        client = self.client(retry_max_attempts=0, journal_enabled=False)  # kept at once
        self.two_kept_commits_one_turned_away(client)
        self.assertEqual(queue.kept, 1)
        result = cl.flush(5)  # the kept one settles; the other one is counted, not hidden
        self.assertEqual((result.settled, result.pending, result.given_up), (1, 0, 1))
        self.assertEqual(cl.flush(5).given_up, 0)  # counted once
        self.assertEqual(self.balance()["spent"], 1)
        self.srv.clock.advance(120_000)  # the lost commit's reservation expires


class TestConnectionErrorCauseIsPublic(DeploymentCase):
    """Review: ``CyclesConnectionError.cause`` could be the private
    ``_AttemptDeadlineExceeded``; users see a plain TimeoutError with its message."""

    def test_a_passed_attempt_deadline_is_a_plain_timeout_error(self) -> None:
        client = self.client(request_timeout=5.0)
        self.srv.inject("create", "delay", delay_ms=1_500, times=None)
        with self.assertRaises(cl.CyclesConnectionError) as caught, cl.deadline(0.3):
            with client.reserve(10, action_kind="llm.completion"):
                pass
        cause = caught.exception.cause
        self.assertIs(type(cause), TimeoutError)
        self.assertIn("deadline", str(cause))
        self.srv.clear_faults()
        self.srv.clock.advance(120_000)  # the reservation the cut-off create made expires


class TestConcurrentRecoversSettleEachRecordOnce(DeploymentCase):
    """Review: two ``recover()`` calls at once sent the same keys together and both
    counted the same records as settled."""

    def test_the_second_recover_skips_what_the_first_took_over(self) -> None:
        client = self.client_with_three_kept_commits()
        self.srv.inject("commit", "delay", delay_ms=300, times=None)  # recover takes ~0.9 s
        summaries: List[cl.RecoverySummary] = []
        first = threading.Thread(target=lambda: summaries.append(client.recover(10)))
        first.start()
        time.sleep(0.15)  # the first recover is settling its first record
        summaries.append(client.recover(10))
        first.join()
        self.assertEqual(sum(s.settled for s in summaries), 3, summaries)
        self.assertEqual([s.found for s in summaries], [3, 3])
        for summary in summaries:  # each record counted once per summary
            self.assertEqual(summary.settled + summary.kept + summary.discarded
                             + summary.not_yet_due, 3, summary)
        self.assertEqual(len([r for r in self.srv.requests_for("commit") if r.status == 200]), 3)
        self.assertEqual(self.balance()["spent"], 6)
        self.assertEqual(self.journal_records(), [])


class TestRecoverSkipsWhatWasSettledAfterItsScan(DeploymentCase):
    """Review (issue 12): a ``recover()`` whose scan read a record that another recover of
    this process then settled and gave back claimed it anyway: it sent the commit again and
    both summaries counted it as settled."""

    def test_a_record_settled_between_scan_and_claim_is_not_sent_again(self) -> None:
        client = self.client_with_three_kept_commits()
        self.srv.inject("commit", "delay", delay_ms=300, times=None)
        real_load = cl._CommitJournal.load_pending
        scans: List[int] = []

        def second_scan_waits(journal: Any, *args: Any) -> Any:
            records = real_load(journal, *args)
            scans.append(len(records))
            if len(scans) == 2:  # the second recover's scan: the first one settles a record
                directory = journal.directory

                def one_settled_and_given_back() -> bool:
                    busy = cl._settlements.busy()
                    return any(
                        r.reservation_id not in busy and not os.path.exists(
                            os.path.join(directory, cl._journal_filename(r.reservation_id)))
                        for r in records
                    )

                self.assertTrue(_wait_for(one_settled_and_given_back, 10.0))
            return records

        summaries: List[cl.RecoverySummary] = []
        with mock.patch.object(cl._CommitJournal, "load_pending", second_scan_waits):
            first = threading.Thread(target=lambda: summaries.append(client.recover(10)))
            first.start()
            self.assertTrue(_wait_for(lambda: len(scans) == 1, 5.0))
            summaries.append(client.recover(10))
            first.join()
        self.assertEqual(sum(s.settled for s in summaries), 3, summaries)
        for summary in summaries:
            self.assertEqual(summary.settled + summary.kept + summary.discarded
                             + summary.not_yet_due, summary.found, summary)
        self.assertEqual(len([r for r in self.srv.requests_for("commit") if r.status == 200]), 3)
        self.assertEqual(self.balance()["spent"], 6)
        self.assertEqual(self.journal_records(), [])


class TestRecoverHandOverToAFullQueueSaysSo(DeploymentCase):
    """Review (issue 12): ``recover()`` handed its unfinished jobs to the settlement queue
    without looking at the answer: those a full queue refused vanished from memory with
    no log line (their records stay journaled)."""

    def test_a_refused_hand_over_is_logged_and_stays_journaled(self) -> None:
        queue = cl._SettlementQueue(capacity=2)
        self.addCleanup(setattr, cl, "_settlements", cl._settlements)
        cl._settlements = queue
        client = self.client()
        journal = cl._journal_for(client._config)
        assert journal is not None
        now_ms = int(time.time() * 1000)
        for i in range(3):  # a 429 floor an hour away: recover(0.2) attempts none of them
            journal.write(cl._PendingSettlement(
                reservation_id=f"res-floor-{i}", base_url=self.srv.url,
                commit_body={"idempotency_key": f"floor-{i}", "actual": {"unit": UNIT,
                                                                           "amount": 1}},
                recorded_at_ms=now_ms - 1_000, not_before_ms=now_ms + 3_600_000,
            ))
        with self.assertLogs(LOGGER, "WARNING") as logs:
            summary = client.recover(0.2)
        self.assertEqual((summary.found, summary.not_yet_due), (3, 3), summary)
        self.assertEqual(queue.pending(), 2)
        left = [line for line in logs.output if "left to the journal" in line]
        self.assertEqual(len(left), 1, logs.output)
        self.assertEqual(len(self.journal_records()), 3)
        self.assertEqual(self.srv.requests_for("commit"), [])
        with queue._cond:  # drop the parked jobs (never sent) so the worker exits
            queue._heap.clear()
            queue._cond.notify_all()
        for name in os.listdir(journal.directory or ""):
            os.unlink(os.path.join(journal.directory or "", name))


class TestFullQueueAfterAFailedJournalWriteSaysTheSettlementIsLost(DeploymentCase):
    """Review (issue 12): a settlement whose journal write failed was marked journaled all
    the same, so a full queue turning it away logged "left to the journal" (a record that
    is not on disk) and ``flush()`` did not count it as given up."""

    def test_the_log_and_flush_say_it_is_lost(self) -> None:
        self.queue_with_room_for_one_kept()
        client = self.client(retry_max_attempts=0)  # kept at once
        journal = cl._journal_for(client._config)
        assert journal is not None and journal.directory is not None
        shutil.rmtree(journal.directory)
        with open(journal.directory, "w"):  # a file where the directory was: writes fail
            pass
        self.addCleanup(os.unlink, journal.directory)
        output = self.two_kept_commits_one_turned_away(client)
        self.assertIn("commit journal write failed", output)
        with self.assertLogs(LOGGER, "WARNING"):  # the kept one's record still cannot be written
            result = cl.flush(5)  # the kept one settles; the other one is counted, not hidden
        self.assertEqual((result.settled, result.pending, result.given_up), (1, 0, 1))
        self.assertEqual(self.balance()["spent"], 1)
        self.srv.clock.advance(120_000)  # the lost commit's reservation expires


class TestReplaySkipsWhatRecoverSettledAfterItsScan(DeploymentCase):
    """Review (issue 12): the first-use replay adopted a record that a ``recover()`` of this
    process had settled after the replay's scan read it, and sent its commit again."""

    def test_the_replay_does_not_resend_a_record_recover_settled(self) -> None:
        client = self.client(request_timeout=5.0)
        created = client.create_reservation({
            "idempotency_key": cl._new_key(),
            "subject": {"tenant": "acme", "agent": self.agent},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": UNIT, "amount": 10},
        })
        rid = created.body["reservation_id"]
        journal = cl._journal_for(client._config)
        assert journal is not None
        key = "left-by-a-crash-" + rid
        journal.write(cl._PendingSettlement(
            rid, self.srv.url, commit_body={"idempotency_key": key,
                                            "actual": {"unit": UNIT, "amount": 7}},
            recorded_at_ms=int(time.time() * 1000) - 1_000,
        ))
        real_load = cl._CommitJournal.load_pending
        scans: List[int] = []
        recovered = threading.Event()
        self.addCleanup(recovered.set)

        def replay_scan_waits(journal: Any, *args: Any) -> Any:
            records = real_load(journal, *args)
            scans.append(len(records))
            if len(scans) == 1:  # the first-use replay: recover() settles meanwhile
                recovered.wait(10)
            return records

        with mock.patch.object(cl._CommitJournal, "load_pending", replay_scan_waits):
            self.guarded(client, 1)()  # first use: the replay scan starts (and waits)
            self.assertTrue(_wait_for(lambda: len(scans) == 1, 5.0))
            summary = client.recover(5)
            recovered.set()
            self.assertTrue(cl.flush(10))
        self.assertEqual((summary.found, summary.settled), (1, 1), summary)
        self.assertEqual(self.keys("commit").count(key), 1, self.keys("commit"))
        self.assertEqual(self.srv.reservation(rid)["status"], "COMMITTED")
        self.assertEqual(self.balance()["spent"], 8)
        self.assertEqual(self.journal_records(), [])
