# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0.
"""The sync heartbeat scheduler under trouble, and the wire's bad answers.

Run with ``python3 -W error -m unittest test_cycles_lite_heartbeat`` (or pytest).

* A slow extend (one server holding it) never delays another reservation's beat;
  fast beats on a warm process start no thread.
* A beat that raises anything (SystemExit from a test double) ends that heartbeat
  only, with the ``internal_error`` status; the others keep beating.
* ``stop()`` waits for a beat in flight only until that attempt's deadline.
* A fork while a heartbeat logs leaves the child able to stop it.
* A stopped heartbeat's heap entry is dropped lazily.
* A malformed ``CyclesResponse`` is a transport failure (the commit is queued, same
  key); an internal error during a settlement hands it to the worker.
* A client of the wrong kind is a plain TypeError.

Real HTTP to ``LocalCyclesServer`` (its faults hold or fail requests); test
doubles only for what a server cannot produce (an override raising SystemExit or
blocking past its deadline, a malformed response object, a bug in the client).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import select
import signal
import threading
import time
import unittest
import warnings
from typing import Any, Callable, Dict, List
from unittest import mock

import cycles_lite as cl
from cycles_lite import CyclesClient, CyclesConfig, CyclesResponse, ReservationGuard
from cycles_lite_server import LocalCyclesServer
from test_cycles_lite import VIRTUAL_CLOCK, wait_for as _wait_for

_KEY = "key-heartbeat-acme-0123456789"
_UNIT = "USD_MICROCENTS"
_LOGGER = "cycles_lite"
# Leases this short get an immediate first beat, then one about every second.
_SHORT_TTL_MS = 5000



def _new_server() -> LocalCyclesServer:
    return LocalCyclesServer(
        api_keys={_KEY: "acme"},
        tenants={"acme": "ACTIVE"},
        budgets=[{"scope": "tenant:acme", "unit": _UNIT, "allocated": 10**12}],
        default_grace_ms=0,
    ).start()


class _ServerCase(unittest.TestCase):
    srv: LocalCyclesServer

    def run(self, result: Any = None) -> Any:
        # open_guard enters guards it never exits: their context stays in this test's copy.
        return contextvars.copy_context().run(super().run, result)

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = _new_server()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()
        self.addCleanup(self._finish)

    def _finish(self) -> None:
        self.assertTrue(cl.flush(10), "settlements still pending after the test")
        self.srv.check_invariants()

    def client(self, server: LocalCyclesServer | None = None, cls: type = CyclesClient,
               **overrides: Any) -> Any:
        options: Dict[str, Any] = dict(
            base_url=(server or self.srv).url, api_key=_KEY, tenant="acme",
            journal_enabled=False, retry_initial_delay=0.01, retry_max_delay=0.05,
            request_timeout=2.0,
        )
        options.update(overrides)
        client = cls(CyclesConfig(**options))
        self.addCleanup(client.close)
        return client

    def open_guard(self, client: Any, ttl_ms: int = _SHORT_TTL_MS) -> Any:
        guard = client.reserve(10, ttl_ms=ttl_ms, grace_period_ms=0)
        guard.__enter__()
        return guard

    def extends_of(self, guard: Any, server: LocalCyclesServer | None = None) -> int:
        requests = (server or self.srv).requests_for("extend")
        return sum(guard.reservation_id in r.path for r in requests)


# ---------------------------------------------------------------------------
# 1. No head-of-line blocking
# ---------------------------------------------------------------------------


class TestNoHeadOfLineBlocking(_ServerCase):
    def test_an_extend_held_by_one_server_delays_no_beat_of_another(self) -> None:
        slow_server = _new_server()
        self.addCleanup(slow_server.stop)
        held = slow_server.inject("extend", "delay", times=None, delay_ms=10_000)
        slow = self.open_guard(self.client(slow_server))
        self.assertTrue(_wait_for(lambda: held.hits >= 1))  # on the wire, cut at 2 s
        fast = self.open_guard(self.client())
        self.assertTrue(_wait_for(lambda: self.extends_of(fast) >= 1))
        # The fast lease was extended while the slow extend still had no answer.
        self.assertIsNone(slow.context.heartbeat_error)
        self.assertIn(slow._heartbeat, cl._heartbeats._running)
        fast.commit(5)
        slow.commit(5)
        self.assertIsNone(fast.settlement_error)
        self.assertIsNone(fast.context.heartbeat_stopped)

    def test_warm_fast_beats_start_no_thread(self) -> None:
        client = self.client()

        def beating_call() -> None:
            guard = self.open_guard(client)
            self.assertTrue(_wait_for(lambda: self.extends_of(guard) >= 1))
            guard.commit(5)

        beating_call()  # warm: a heartbeat thread and the connection pool
        started: List[str] = []
        real_start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            started.append(thread.name)
            real_start(thread)

        with mock.patch.object(threading.Thread, "start", counting_start):
            for _ in range(3):
                beating_call()
        self.assertNotIn("cycles-lite-heartbeat", started)


# ---------------------------------------------------------------------------
# 2. A beat that raises anything ends that heartbeat only
# ---------------------------------------------------------------------------


class _ExitingExtend(CyclesClient):
    """An override (a test double) whose extend raises SystemExit."""

    def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        raise SystemExit("mocked exit")


class TestBeatFailure(_ServerCase):
    def test_system_exit_from_an_extend_stops_that_heartbeat_only(self) -> None:
        # This lease beats now, then about 2 s later.
        healthy = self.open_guard(self.client(request_timeout=1.0), ttl_ms=2500)
        self.assertTrue(_wait_for(lambda: self.extends_of(healthy) >= 1))
        with self.assertLogs(_LOGGER, "ERROR") as logs:
            broken = self.open_guard(self.client(cls=_ExitingExtend))
            self.assertTrue(_wait_for(lambda: broken.context.heartbeat_stopped is not None))
        self.assertEqual(broken.context.heartbeat_stopped, "internal_error")
        record = next(r for r in logs.records if r.exc_info)
        self.assertIn("heartbeat stopped by an internal error", record.getMessage())
        self.assertIsInstance(record.exc_info[1].__cause__, SystemExit)
        # The thread that ran the failed beat lives on: the other lease keeps beating.
        self.assertTrue(VIRTUAL_CLOCK.advance_until(lambda: self.extends_of(healthy) >= 2,
                                                    self.srv))
        self.assertIsNone(healthy.context.heartbeat_stopped)
        broken.commit(1)
        healthy.commit(1)
        self.assertIsNone(healthy.settlement_error)


# ---------------------------------------------------------------------------
# 3. stop() waits for a beat in flight until its attempt deadline only
# ---------------------------------------------------------------------------


class _BlockedExtend(CyclesClient):
    """An override that blocks past its attempt deadline until the test lets it go."""

    entered = threading.Event()
    gate = threading.Event()
    done = threading.Event()

    def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        self.entered.set()
        self.gate.wait(30)
        try:
            return super().extend_reservation(reservation_id, request)
        finally:
            self.done.set()


class TestBoundedStop(_ServerCase):
    def test_commit_waits_for_a_stuck_extend_only_until_its_deadline(self) -> None:
        for event in (_BlockedExtend.entered, _BlockedExtend.gate, _BlockedExtend.done):
            event.clear()
        self.addCleanup(_BlockedExtend.gate.set)
        guard = self.open_guard(self.client(cls=_BlockedExtend, request_timeout=0.5))
        self.assertTrue(_BlockedExtend.entered.wait(10))
        guard.commit(5)  # returns once the extend's attempt deadline passed
        self.assertFalse(_BlockedExtend.done.is_set())  # the extend is still stuck
        self.assertIsNone(guard.settlement_error)
        _BlockedExtend.gate.set()
        self.assertTrue(_BlockedExtend.done.wait(10))
        self.assertTrue(_wait_for(lambda: guard._heartbeat not in cl._heartbeats._running))
        self.assertIsNone(guard.context.heartbeat_error)  # the late answer was dropped
        self.assertIsNone(guard.context.heartbeat_stopped)


# ---------------------------------------------------------------------------
# 4. A fork while a heartbeat logs
# ---------------------------------------------------------------------------


class _ForkOnHeartbeatLog(logging.Handler):
    """Forks once, on the heartbeat thread, while its steps log; the child stops the
    heartbeat it inherited and reports through a pipe."""

    def __init__(self, guard_ref: List[Any]) -> None:
        super().__init__(logging.WARNING)
        self.guard_ref = guard_ref
        self.pid = 0
        self.read_end, self.write_end = os.pipe()

    def emit(self, record: logging.LogRecord) -> None:
        if self.pid or not record.getMessage().startswith("heartbeat:"):
            return
        with warnings.catch_warnings():  # 3.12+: fork() of a multi-threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                self.guard_ref[0]._heartbeat.stop()
                ok = cl._heartbeats._threads == 0 and not cl._heartbeats._running
                os.write(self.write_end, b"1" if ok else b"0")
            finally:
                os._exit(0)
        self.pid = pid


@unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
class TestForkWhileLogging(_ServerCase):
    def test_the_child_stops_a_heartbeat_that_was_logging_at_the_fork(self) -> None:
        guards: List[Any] = []
        handler = _ForkOnHeartbeatLog(guards)
        logger = logging.getLogger(_LOGGER)
        self.srv.inject("extend", "status", status=503, error="INTERNAL_ERROR")
        with self.assertLogs(_LOGGER, "WARNING"):
            logger.addHandler(handler)  # after assertLogs, which replaces the handlers
            guards.append(self.open_guard(self.client()))
            self.assertTrue(_wait_for(lambda: handler.pid != 0))
        os.close(handler.write_end)
        ready, _, _ = select.select([handler.read_end], [], [], 10)
        answer = os.read(handler.read_end, 1) if ready else b""
        os.close(handler.read_end)
        if not answer:
            os.kill(handler.pid, signal.SIGKILL)  # deadlocked
        os.waitpid(handler.pid, 0)
        self.assertEqual(answer, b"1")
        guards[0].commit(5)


# ---------------------------------------------------------------------------
# 5. Lazy deletion
# ---------------------------------------------------------------------------


class TestLazyDeletion(_ServerCase):
    def test_a_stopped_heartbeat_is_skipped_and_the_heap_compacted(self) -> None:
        scheduler = cl._heartbeats
        self.assertTrue(_wait_for(lambda: not scheduler._heap), "a heartbeat left running")
        client = self.client()
        guards = [self.open_guard(client, ttl_ms=60_000) for _ in range(6)]
        self.assertEqual(len(scheduler._heap), 6)
        guards[0].commit(1)
        self.assertEqual(len(scheduler._heap), 6)  # left in place: skipped when due
        self.assertEqual(scheduler._stale, 1)
        for guard in guards[1:4]:
            guard.commit(1)  # 4 of 6 stale: compacted
        self.assertEqual(sorted(id(e[2]) for e in scheduler._heap),
                         sorted(id(g._heartbeat) for g in guards[4:]))
        for guard in guards[4:]:
            guard.commit(1)
        self.assertEqual(scheduler._heap, [])
        self.assertTrue(VIRTUAL_CLOCK.advance_until(lambda: scheduler._threads == 0, within=5.0))


# ---------------------------------------------------------------------------
# 6. Malformed responses and internal errors during a settlement
# ---------------------------------------------------------------------------


def _created() -> CyclesResponse:
    now = int(time.time() * 1000)
    return CyclesResponse.success(200, {
        "decision": "ALLOW", "reservation_id": "res-1", "affected_scopes": ["tenant:acme"],
        "expires_at_ms": now + 60_000, "remaining_ttl_ms": 60_000,
    })


def _committed() -> CyclesResponse:
    return CyclesResponse.success(200, {
        "status": "COMMITTED", "charged": {"unit": _UNIT, "amount": 5},
    })


class TestMalformedResponse(unittest.TestCase):
    def setUp(self) -> None:
        self.client = mock.MagicMock(spec=CyclesClient)
        self.client._config = CyclesConfig(
            base_url="http://cycles.test", api_key="test-key", tenant="acme",
            journal_enabled=False, retry_initial_delay=0.01, retry_max_delay=0.02,
        )
        self.client.create_reservation.return_value = _created()

    def call(self) -> Any:
        @cl.cycles(10, actual=5, client=self.client)
        def work() -> str:
            return "done"

        return work()

    def check_queued_then_settled(self, malformed: Any) -> None:
        self.client.commit_reservation.return_value = malformed
        with self.assertLogs(_LOGGER, "ERROR") as logs:
            self.assertEqual(self.call(), "done")
            self.assertGreaterEqual(cl._settlements.pending(), 1)
        self.assertIn("counted as a transport failure", "\n".join(logs.output))
        self.client.commit_reservation.return_value = _committed()
        self.assertTrue(cl.flush(10))
        keys = {c.args[1]["idempotency_key"] for c in self.client.commit_reservation.call_args_list}
        self.assertEqual(len(keys), 1)  # every retry with the same key
        self.assertGreaterEqual(self.client.commit_reservation.call_count, 2)

    def test_headers_none(self) -> None:
        self.check_queued_then_settled(CyclesResponse(status=500, body=None, headers=None))  # type: ignore[arg-type]

    def test_a_response_mock(self) -> None:
        self.check_queued_then_settled(mock.MagicMock(spec=CyclesResponse))

    def test_a_bool_status_and_a_list_body(self) -> None:
        self.check_queued_then_settled(CyclesResponse(status=True, body=[]))  # type: ignore[arg-type]


class TestInternalErrorInSettlement(_ServerCase):
    def test_the_commit_is_retried_in_the_background_with_the_same_key(self) -> None:
        real = cl._decide_settlement
        calls: List[int] = []

        def buggy_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise ArithmeticError("a bug in the outcome table")
            return real(*args, **kwargs)

        client = self.client()
        with mock.patch.object(cl, "_decide_settlement", buggy_once), \
                self.assertLogs(_LOGGER, "ERROR") as logs:
            guard = self.open_guard(client, ttl_ms=60_000)
            guard.commit(7)  # the caller is not the one to see the bug
            self.assertTrue(cl.flush(10))
        self.assertTrue(any(r.exc_info for r in logs.records))
        commits = self.srv.requests_for("commit")
        self.assertEqual(len(commits), 2)
        self.assertEqual(commits[0].body["idempotency_key"], commits[1].body["idempotency_key"])
        self.assertEqual(client.get_reservation(guard.reservation_id).body["status"],
                         "COMMITTED")


# ---------------------------------------------------------------------------
# 7. A client of the wrong kind: a plain TypeError
# ---------------------------------------------------------------------------


class _AsyncDuck:
    """Duck-typed: every public method is a coroutine function."""

    async def create_reservation(self, request: Any) -> None: ...
    async def commit_reservation(self, reservation_id: str, request: Any) -> None: ...
    async def release_reservation(self, reservation_id: str, request: Any) -> None: ...
    async def extend_reservation(self, reservation_id: str, request: Any) -> None: ...
    async def create_event(self, request: Any) -> None: ...


class TestClientKind(unittest.TestCase):
    def assert_plain_type_error(self, run: Callable[[], Any], words: str) -> None:
        with self.assertRaises(TypeError) as caught:
            run()
        self.assertIs(type(caught.exception), TypeError)
        self.assertIn(words, str(caught.exception))

    def test_a_sync_client_on_an_async_function(self) -> None:
        client = CyclesClient(CyclesConfig(base_url="http://cycles.test", api_key="k",
                                           journal_enabled=False))
        self.addCleanup(client.close)

        @cl.cycles(10, client=client, tenant="acme")
        async def work() -> None:
            pass

        self.assert_plain_type_error(lambda: asyncio.run(work()), "AsyncCyclesClient")

    def test_no_client(self) -> None:
        self.assert_plain_type_error(lambda: ReservationGuard(None, 10), "CyclesClient")

    def test_an_async_duck_on_a_sync_function(self) -> None:
        @cl.cycles(10, client=_AsyncDuck(), tenant="acme")
        def work() -> None:
            pass

        self.assert_plain_type_error(work, "needs a sync client")


if __name__ == "__main__":
    unittest.main()
