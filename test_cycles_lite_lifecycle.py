# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0.
"""The lifecycle's wire and its ways out (issue 9 item 1, issue 8 item 4).

Run with ``python3 -W error -m unittest test_cycles_lite_lifecycle`` (or pytest).

* The decorator, the guards and the streams send every protocol operation through
  the client's public methods: ``MagicMock(spec=CyclesClient)`` with canned
  ``CyclesResponse`` objects drives them (no server: that is the point of a mock),
  and a subclass's overrides see every operation over real HTTP.
* Every way out of enter and exit (KeyboardInterrupt, cancellation, internal
  errors) stops the heartbeat, restores the context and releases or settles,
  against a real LocalCyclesServer.  Test doubles appear only for an interrupt at
  an exact instant and for a server that repeats a list cursor.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import threading
import time
import unittest
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import cycles_lite as cl
from cycles_lite import (
    Action,
    Amount,
    AsyncCyclesClient,
    AsyncReservationGuard,
    AsyncStreamReservation,
    CyclesClient,
    CyclesConfig,
    CyclesResponse,
    ReservationGuard,
    StreamReservation,
    cycles,
)
from cycles_lite_server import LocalCyclesServer
from test_cycles_lite import wait_for as _wait_for

_KEY = "key-life-acme-0123456789"
_UNIT = "USD_MICROCENTS"
_LOGGER = "cycles_lite"
_ACTION = Action(kind="llm.completion", name="gpt-4o")



# ---------------------------------------------------------------------------
# Canned answers, as a user's test suite would write them
# ---------------------------------------------------------------------------


def created(reservation_id: str = "res-1", amount: int = 100) -> CyclesResponse:
    now = int(time.time() * 1000)
    return CyclesResponse.success(200, {
        "decision": "ALLOW",
        "reservation_id": reservation_id,
        "affected_scopes": ["tenant:acme"],
        "expires_at_ms": now + 60_000,
        "remaining_ttl_ms": 60_000,
        "reserved": {"unit": _UNIT, "amount": amount},
    })


def committed(amount: int) -> CyclesResponse:
    return CyclesResponse.success(200, {
        "status": "COMMITTED", "charged": {"unit": _UNIT, "amount": amount},
    })


def released(amount: int = 100) -> CyclesResponse:
    return CyclesResponse.success(200, {
        "status": "RELEASED", "released": {"unit": _UNIT, "amount": amount},
    })


def event_applied() -> CyclesResponse:
    return CyclesResponse.success(201, {"status": "APPLIED", "event_id": "evt-1"})


def error(status: int, code: str) -> CyclesResponse:
    return CyclesResponse.http_error(
        status, code, body={"error": code, "message": code, "request_id": "req-1"}
    )


def mock_config(**overrides: Any) -> CyclesConfig:
    options: Dict[str, Any] = dict(
        base_url="http://cycles.test", api_key="test-key", tenant="acme",
        journal_enabled=False, retry_initial_delay=0.01, retry_max_delay=0.02,
    )
    options.update(overrides)
    return CyclesConfig(**options)


class _MockCases:
    """One set of scenarios for MagicMock(spec=CyclesClient) and (spec=AsyncCyclesClient)."""

    is_async = False
    client: Any

    def setUp(self) -> None:
        spec = AsyncCyclesClient if self.is_async else CyclesClient
        self.client = mock.MagicMock(spec=spec)
        self.client._config = mock_config()
        self.client.create_reservation.return_value = created()
        self.client.commit_reservation.side_effect = lambda rid, body: committed(
            body["actual"]["amount"]
        )
        self.client.release_reservation.return_value = released()
        self.client.create_event.return_value = event_applied()

    def tearDown(self) -> None:
        self.assertTrue(cl.flush(5))

    # -- drivers: each face, sync or async -------------------------------------

    def decorated(self, result: Any = "done", fail: Optional[BaseException] = None, **kw: Any
                  ) -> Any:
        kw.setdefault("estimate", 100)
        kw.setdefault("actual", 40)
        if self.is_async:
            @cycles(client=self.client, **kw)
            async def work_async() -> Any:
                if fail is not None:
                    raise fail
                return result
            return asyncio.run(work_async())

        @cycles(client=self.client, **kw)
        def work() -> Any:
            if fail is not None:
                raise fail
            return result
        return work()

    def guarded(self, commit: Optional[int] = 40) -> Any:
        if self.is_async:
            async def scenario() -> Any:
                async with AsyncReservationGuard(self.client, 100, action_kind="llm") as r:
                    if commit is not None:
                        await r.commit(commit)
                return r
            return asyncio.run(scenario())
        with ReservationGuard(self.client, 100, action_kind="llm") as r:
            if commit is not None:
                r.commit(commit)
        return r

    def streamed(self, cost: int = 40) -> Any:
        estimate = Amount(unit=_UNIT, amount=100)
        if self.is_async:
            async def scenario() -> Any:
                async with AsyncStreamReservation(self.client, action=_ACTION,
                                                  estimate=estimate) as s:
                    s.usage.set_actual_cost(cost)
                return s
            return asyncio.run(scenario())
        with StreamReservation(self.client, action=_ACTION, estimate=estimate) as s:
            s.usage.set_actual_cost(cost)
        return s

    def commit_keys(self) -> List[str]:
        return [c.args[1]["idempotency_key"] for c in self.client.commit_reservation.call_args_list]

    # -- scenarios ---------------------------------------------------------------

    def test_success_through_every_face(self) -> None:
        self.assertEqual(self.decorated(), "done")
        self.guarded()
        self.streamed(cost=40)
        self.assertEqual(self.client.create_reservation.call_count, 3)
        self.assertEqual(self.client.commit_reservation.call_count, 3)
        for call in self.client.commit_reservation.call_args_list:
            self.assertEqual(call.args[0], "res-1")
            self.assertEqual(call.args[1]["actual"], {"unit": _UNIT, "amount": 40})
        body = self.client.create_reservation.call_args.args[0]
        self.assertEqual(body["subject"], {"tenant": "acme"})
        self.client.release_reservation.assert_not_called()

    def test_the_heartbeat_extends_through_the_mock(self) -> None:
        short = created()
        assert short.body is not None
        short.body.update(remaining_ttl_ms=3000, expires_at_ms=int(time.time() * 1000) + 3000)
        self.client.create_reservation.return_value = short
        self.client.extend_reservation.return_value = CyclesResponse.success(200, {
            "status": "ACTIVE", "expires_at_ms": int(time.time() * 1000) + 60_000,
            "remaining_ttl_ms": 60_000,
        })
        extend = self.client.extend_reservation
        if self.is_async:
            async def work_async() -> None:
                for _ in range(300):
                    if extend.call_count:
                        break
                    await asyncio.sleep(0.01)
            asyncio.run(cycles(estimate=100, ttl_ms=3000, client=self.client)(work_async)())
        else:
            cycles(estimate=100, ttl_ms=3000, client=self.client)(
                lambda: _wait_for(lambda: extend.call_count, 3.0))()
        rid, body = extend.call_args.args
        self.assertEqual(rid, "res-1")
        self.assertEqual(body["extend_by_ms"], 3000)
        self.client.commit_reservation.assert_called_once()

    def test_budget_exceeded_raises_before_the_work(self) -> None:
        self.client.create_reservation.return_value = error(409, "BUDGET_EXCEEDED")
        with self.assertRaises(cl.BudgetExceededError):
            self.decorated()
        with self.assertRaises(cl.BudgetExceededError):
            self.guarded()
        with self.assertRaises(cl.BudgetExceededError):
            self.streamed()
        self.client.commit_reservation.assert_not_called()
        self.client.release_reservation.assert_not_called()

    def test_expired_on_commit_records_the_spend_as_an_event(self) -> None:
        self.client.commit_reservation.side_effect = None
        self.client.commit_reservation.return_value = error(410, "RESERVATION_EXPIRED")
        with self.assertLogs(_LOGGER, "WARNING"):
            self.decorated(actual=40)
        self.client.create_event.assert_called_once()
        event = self.client.create_event.call_args.args[0]
        self.assertEqual(event["actual"], {"unit": _UNIT, "amount": 40})
        self.assertEqual(event["idempotency_key"], self.commit_keys()[0])
        self.assertEqual(event["metadata"]["recovered_reservation_id"], "res-1")

    def test_server_error_then_success_reuses_the_key(self) -> None:
        self.client.create_reservation.side_effect = [error(503, "INTERNAL_ERROR"), created()]
        answers = iter([error(503, "INTERNAL_ERROR"), committed(40)])
        self.client.commit_reservation.side_effect = lambda rid, body: next(answers)
        with self.assertLogs(_LOGGER, "WARNING"):
            self.decorated()
            self.assertTrue(cl.flush(5))  # the commit retry ran on the worker
        creates = [c.args[0]["idempotency_key"]
                   for c in self.client.create_reservation.call_args_list]
        self.assertEqual(len(creates), 2)
        self.assertEqual(len(set(creates)), 1)
        self.assertEqual(len(self.commit_keys()), 2)
        self.assertEqual(len(set(self.commit_keys())), 1)

    def test_a_failure_in_the_function_releases(self) -> None:
        with self.assertRaises(ZeroDivisionError):
            self.decorated(fail=ZeroDivisionError())
        self.client.release_reservation.assert_called_once()
        rid, body = self.client.release_reservation.call_args.args
        self.assertEqual(rid, "res-1")
        self.assertEqual(body["reason"], "guarded_method_failed")

    def test_an_answer_that_is_not_a_response_is_a_transport_failure(self) -> None:
        answers = iter([object(), committed(40)])
        self.client.commit_reservation.side_effect = lambda rid, body: next(answers)
        with self.assertLogs(_LOGGER, "ERROR") as logs:
            self.decorated()
            self.assertTrue(cl.flush(5))
        self.assertIn("commit_reservation() returned object, not a CyclesResponse",
                      "\n".join(logs.output))
        self.assertEqual(len(set(self.commit_keys())), 1)
        self.assertEqual(len(self.commit_keys()), 2)

    def test_a_method_that_raises_is_logged_with_its_traceback_and_retried(self) -> None:
        answers: List[Any] = [RuntimeError("mock exploded"), committed(40)]

        def commit(rid: str, body: Dict[str, Any]) -> Any:
            answer = answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        self.client.commit_reservation.side_effect = commit
        with self.assertLogs(_LOGGER, "ERROR") as logs:
            self.decorated()
            self.assertTrue(cl.flush(5))
        record = next(r for r in logs.records if "raised RuntimeError" in r.getMessage())
        self.assertIsNotNone(record.exc_info)
        self.assertEqual(len(self.commit_keys()), 2)
        self.assertEqual(len(set(self.commit_keys())), 1)

    def test_a_create_that_raises_surfaces_as_a_public_error(self) -> None:
        self.client.create_reservation.side_effect = ConnectionError("mock refused")
        with self.assertLogs(_LOGGER, "ERROR"), self.assertRaises(cl.CyclesTransportError):
            self.decorated()
        self.assertEqual(self.client.create_reservation.call_count, 2)  # resent once
        self.client.commit_reservation.assert_not_called()

    def test_a_mock_without_a_config_runs_on_defaults(self) -> None:
        del self.client._config
        self.assertEqual(self.decorated(tenant="acme"), "done")
        self.client.commit_reservation.assert_called_once()


class TestSyncClientMock(_MockCases, unittest.TestCase):
    def test_a_mock_never_adopts_journal_records_of_other_processes(self) -> None:
        import shutil
        import tempfile

        journal_dir = tempfile.mkdtemp(prefix="life-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        config = mock_config(journal_enabled=True, journal_dir=journal_dir)
        journal = cl._journal_for(config)
        assert journal is not None
        left = cl._PendingSettlement(
            reservation_id="res-left-by-a-crash", base_url=config.base_url,
            commit_body={"idempotency_key": "commit-left", "actual": {"unit": _UNIT,
                                                                      "amount": 9}},
            event_fallback_body=None, recorded_at_ms=0,
        )
        self.assertTrue(journal.write(left))
        self.client._config = config
        self.decorated()
        self.assertEqual(cl.flush(5).pending, 1)  # left for a real client, and reported
        self.assertEqual([c.args[0] for c in self.client.commit_reservation.call_args_list],
                         ["res-1"])
        self.assertEqual(len(journal.load_pending()), 1)  # still there for a real client
        journal.remove(left.reservation_id)


class TestAsyncClientMock(_MockCases, unittest.TestCase):
    is_async = True

    def test_the_methods_are_awaited(self) -> None:
        self.decorated()
        self.client.create_reservation.assert_awaited_once()
        self.client.commit_reservation.assert_awaited_once()


class TestClientKinds(unittest.TestCase):
    def test_none_and_the_wrong_kind_are_clear_type_errors(self) -> None:
        sync_mock = mock.MagicMock(spec=CyclesClient)
        async_mock = mock.MagicMock(spec=AsyncCyclesClient)
        with self.assertRaisesRegex(TypeError, "expected a CyclesClient, got NoneType"):
            ReservationGuard(None, 10)  # type: ignore[arg-type]
        with self.assertRaisesRegex(TypeError, "expected an AsyncCyclesClient, got NoneType"):
            AsyncReservationGuard(None, 10)  # type: ignore[arg-type]
        with self.assertRaisesRegex(TypeError, "expected a CyclesClient"):
            ReservationGuard(async_mock, 10)
        with self.assertRaisesRegex(TypeError, "expected an AsyncCyclesClient"):
            AsyncStreamReservation(sync_mock, action=_ACTION,
                                   estimate=Amount(unit=_UNIT, amount=1))

        @cycles(estimate=1, client=sync_mock)
        async def async_fn() -> None:
            pass

        @cycles(estimate=1, client=async_mock)
        def sync_fn() -> None:
            pass

        with self.assertRaisesRegex(TypeError, "Async function requires an AsyncCyclesClient"):
            asyncio.run(async_fn())
        with self.assertRaisesRegex(TypeError, "Sync function requires a CyclesClient"):
            sync_fn()
        sync_mock.create_reservation.assert_not_called()

    def test_an_unspecced_sync_mock_is_refused_by_an_async_function(self) -> None:
        client = mock.MagicMock()
        client.create_reservation.return_value = created()

        @cycles(estimate=1, tenant="acme", client=client)
        async def work() -> None:
            pass

        with self.assertRaisesRegex(TypeError, "an async reservation needs an async client"):
            asyncio.run(work())
        client.commit_reservation.assert_not_called()

    def test_a_duck_typed_client_is_accepted(self) -> None:
        calls: List[str] = []

        class Duck:
            __hash__ = None  # type: ignore[assignment]  # unhashable, like a dataclass

            def create_reservation(self, body: Any) -> CyclesResponse:
                calls.append("create")
                return created()

            def commit_reservation(self, rid: str, body: Any) -> CyclesResponse:
                calls.append("commit")
                return committed(body["actual"]["amount"])

            def release_reservation(self, rid: str, body: Any) -> CyclesResponse:
                calls.append("release")
                return released()

            def extend_reservation(self, rid: str, body: Any) -> CyclesResponse:
                calls.append("extend")
                return error(500, "INTERNAL_ERROR")

            def create_event(self, body: Any) -> CyclesResponse:
                calls.append("event")
                return event_applied()

        @cycles(estimate=10, actual=7, tenant="acme", client=Duck())  # type: ignore[arg-type]
        def work() -> str:
            return "ok"

        self.assertEqual(work(), "ok")
        with ReservationGuard(Duck(), 10, tenant="acme") as guard:  # type: ignore[arg-type]
            guard.release("not needed")
        self.assertEqual(calls, ["create", "commit", "create", "release"])
        with self.assertRaisesRegex(TypeError, r"missing .*create_event"):
            ReservationGuard(object(), 10)  # type: ignore[arg-type]

    def test_a_duck_whose_methods_are_async_is_refused_by_a_sync_guard(self) -> None:
        class AsyncDuck:
            async def create_reservation(self, body: Any) -> CyclesResponse:
                return created()

            commit_reservation = release_reservation = extend_reservation = create_event = (
                create_reservation
            )

        with self.assertRaisesRegex(TypeError, "a sync reservation needs a sync client"):
            with ReservationGuard(AsyncDuck(), 10, tenant="acme"):  # type: ignore[arg-type]
                self.fail("the block must not run")


# ---------------------------------------------------------------------------
# Against the real server
# ---------------------------------------------------------------------------


class _ServerCase(unittest.TestCase):
    srv: LocalCyclesServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = LocalCyclesServer(
            api_keys={_KEY: "acme"},
            tenants={"acme": "ACTIVE"},
            budgets=[{"scope": "tenant:acme", "unit": _UNIT, "allocated": 10**12}],
        ).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()
        # What the guarded calls must put back (None, unless an earlier test left a
        # context behind, e.g. by leaving nested guards out of order).
        self.outer_context = cl.get_cycles_context()
        self.agent = "life" + os.urandom(4).hex()
        self.scope = f"tenant:acme/agent:{self.agent}"
        self.srv.add_budget(self.scope, _UNIT, 1_000_000)
        self.addCleanup(self._finish)

    def _finish(self) -> None:
        self.assertTrue(cl.flush(10), "settlements still pending after the test")
        self.srv.check_invariants()

    def config(self, **overrides: Any) -> CyclesConfig:
        options: Dict[str, Any] = dict(
            base_url=self.srv.url, api_key=_KEY, tenant="acme", agent=self.agent,
            journal_enabled=False, retry_initial_delay=0.01, retry_max_delay=0.05,
            request_timeout=1.0,
        )
        options.update(overrides)
        return CyclesConfig(**options)

    def ops(self) -> List[str]:
        return [r.operation for r in self.srv.requests]

    def last_reservation(self) -> Dict[str, Any]:
        rid = self.srv.requests_for("create")[-1].response_body["reservation_id"]
        state = self.srv.reservation(rid)
        assert state is not None
        return state

    def balance(self) -> Dict[str, Any]:
        return self.srv.balance(self.scope, _UNIT)


class RecordingClient(CyclesClient):
    """What users write: a subclass that adds a header-like marker and counts operations."""

    def __init__(self, config: CyclesConfig) -> None:
        super().__init__(config)
        self.seen: List[str] = []

    def _note(self, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
        self.seen.append(name)
        return body

    def create_reservation(self, request: Any) -> CyclesResponse:
        return super().create_reservation(self._note("create", request))

    def commit_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return super().commit_reservation(reservation_id, self._note("commit", request))

    def release_reservation(self, reservation_id: str, request: Any, **kw: Any
                            ) -> CyclesResponse:
        return super().release_reservation(reservation_id, self._note("release", request), **kw)

    def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return super().extend_reservation(reservation_id, self._note("extend", request))

    def create_event(self, request: Any) -> CyclesResponse:
        return super().create_event(self._note("event", request))


class AsyncRecordingClient(AsyncCyclesClient):
    def __init__(self, config: CyclesConfig) -> None:
        super().__init__(config)
        self.seen: List[str] = []

    async def create_reservation(self, request: Any) -> CyclesResponse:
        self.seen.append("create")
        return await super().create_reservation(request)

    async def commit_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        self.seen.append("commit")
        return await super().commit_reservation(reservation_id, request)

    async def release_reservation(self, reservation_id: str, request: Any, **kw: Any
                                  ) -> CyclesResponse:
        self.seen.append("release")
        return await super().release_reservation(reservation_id, request, **kw)

    async def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        self.seen.append("extend")
        return await super().extend_reservation(reservation_id, request)

    async def create_event(self, request: Any) -> CyclesResponse:
        self.seen.append("event")
        return await super().create_event(request)


class TestSubclassOverrides(_ServerCase):
    """Every operation the server receives went through the subclass's override."""

    def assert_every_request_seen(self, client: Any) -> None:
        protocol = [op for op in self.ops() if op in ("create", "commit", "release", "extend",
                                                       "event")]
        self.assertEqual(client.seen, protocol)

    def test_sync_decorator_guard_stream_heartbeat_retry_and_event(self) -> None:
        client = RecordingClient(self.config())
        self.addCleanup(client.close)

        @cycles(estimate=10, actual=4, ttl_ms=3000, client=client)
        def work() -> None:  # ttl 3000: one immediate extend
            _wait_for(lambda: "extend" in client.seen, 3.0)

        self.srv.inject("commit", "status", status=503, error="INTERNAL_ERROR")
        with self.assertLogs(_LOGGER, "WARNING"):
            work()
            self.assertTrue(cl.flush(5))  # the retry (worker thread) went through the override
        with client.reserve(10) as guard:
            guard.release("changed my mind")
        with client.stream_reservation(action=_ACTION, estimate=Amount(unit=_UNIT, amount=10)
                                       ) as stream:
            stream.usage.set_actual_cost(3)
        with self.assertLogs(_LOGGER, "WARNING"), client.reserve(10) as guard:
            self.srv.clock.advance(70_000)  # expired: the commit falls back to an event
            guard.commit(5)
        self.assertEqual(
            client.seen,
            ["create", "extend", "commit", "commit", "create", "release", "create", "commit",
             "create", "commit", "event"],
        )
        self.assert_every_request_seen(client)
        self.assertEqual(self.balance()["spent"], 4 + 3 + 5)

    def test_async_faces_and_the_background_retry(self) -> None:
        async def scenario() -> List[str]:
            client = AsyncRecordingClient(self.config())
            try:
                @cycles(estimate=10, actual=4, client=client)
                async def work() -> None:
                    pass

                self.srv.inject("commit", "status", status=503, error="INTERNAL_ERROR")
                with self.assertLogs(_LOGGER, "WARNING"):
                    await work()
                    self.assertTrue(await cl.aflush(5))
                async with client.reserve(10) as guard:
                    await guard.release("changed my mind")
                async with client.stream_reservation(
                        action=_ACTION, estimate=Amount(unit=_UNIT, amount=10)) as stream:
                    stream.usage.set_actual_cost(3)
                return client.seen
            finally:
                await client.aclose()

        seen = asyncio.run(scenario())
        self.assertEqual(seen, ["create", "commit", "commit", "create", "release", "create",
                                "commit"])
        self.assertEqual(self.balance()["spent"], 7)

    def test_journal_replay_goes_through_the_override(self) -> None:
        import shutil
        import tempfile

        journal_dir = tempfile.mkdtemp(prefix="life-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        config = self.config(journal_enabled=True, journal_dir=journal_dir,
                             retry_enabled=False)
        first = RecordingClient(config)
        self.addCleanup(first.close)
        self.srv.inject("commit", "status", status=503, error="INTERNAL_ERROR")
        with self.assertLogs(_LOGGER, "WARNING"), first.reserve(10) as guard:
            guard.commit(6)
        self.assertEqual(self.balance()["spent"], 0)  # kept in the journal
        second = RecordingClient(config)
        self.addCleanup(second.close)
        summary = second.recover(timeout=5)
        self.assertEqual(summary.settled, 1)
        self.assertEqual(second.seen, ["commit"])
        self.assertEqual(self.balance()["spent"], 6)


# ---------------------------------------------------------------------------
# Interrupts, cancellation and internal errors
# ---------------------------------------------------------------------------


def _interrupt_when_logged(message: str, interrupt: BaseException) -> Any:
    """Patch the lifecycle's debug log to raise ``interrupt`` at ``message``: an interrupt
    at that exact instant (after the heartbeat started and the context was set)."""
    real_debug = cl._log.debug

    def debug(msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith(message):
            raise interrupt
        real_debug(msg, *args, **kwargs)

    return mock.patch.object(cl._log, "debug", debug)


async def _arrived(fault: Any) -> None:
    """Until the server received a request ``fault`` applies to (it counts on arrival)."""
    for _ in range(500):
        if fault.hits:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the request never reached the server")


class TestInterrupts(_ServerCase):
    def test_keyboard_interrupt_late_in_enter_releases_and_cleans_up(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        guard = client.reserve(10)
        with _interrupt_when_logged("reservation created", KeyboardInterrupt()):
            with self.assertRaises(KeyboardInterrupt):
                guard.__enter__()
        self.assertIsNotNone(guard._heartbeat)  # it had started ...
        self.assertTrue(guard._heartbeat.stopped)  # ... and is stopped for good
        self.assertIs(cl.get_cycles_context(), self.outer_context)
        self.assertEqual(self.last_reservation()["status"], "RELEASED")
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.balance()["reserved"], 0)

    def test_keyboard_interrupt_late_in_enter_of_the_decorator(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        ran: List[bool] = []

        @cycles(estimate=10, client=client)
        def work() -> None:
            ran.append(True)

        with _interrupt_when_logged("reservation created", KeyboardInterrupt()):
            with self.assertRaises(KeyboardInterrupt):
                work()
        self.assertEqual(ran, [])
        self.assertIs(cl.get_cycles_context(), self.outer_context)
        self.assertEqual(self.ops(), ["create", "release"])

    def test_cancellation_late_in_async_enter_releases(self) -> None:
        async def scenario() -> None:
            client = AsyncCyclesClient(self.config())
            try:
                guard = client.reserve(10)
                with _interrupt_when_logged("reservation created", asyncio.CancelledError()):
                    with self.assertRaises(asyncio.CancelledError):
                        await guard.__aenter__()
                self.assertTrue(guard._heartbeat.stopped)
                self.assertIs(cl.get_cycles_context(), self.outer_context)
            finally:
                await client.aclose()

        asyncio.run(scenario())
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.last_reservation()["status"], "RELEASED")

    def test_keyboard_interrupt_while_the_sync_heartbeat_starts_is_the_callers(self) -> None:
        # The beats run up to their first sleep on the caller's thread: Ctrl-C there was
        # logged as the heartbeat's internal error and lost (the block ran, unbeaten).
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        ran: List[bool] = []
        with mock.patch.object(cl._HeartbeatPlan, "after_success", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                with client.reserve(10):
                    ran.append(True)
        self.assertEqual(ran, [])
        self.assertIs(cl.get_cycles_context(), self.outer_context)
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.last_reservation()["status"], "RELEASED")

    def test_keyboard_interrupt_in_the_block_releases_and_restores_the_context(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        with self.assertRaises(KeyboardInterrupt):
            with client.reserve(10):
                raise KeyboardInterrupt
        self.assertIs(cl.get_cycles_context(), self.outer_context)
        self.assertEqual(self.ops(), ["create", "release"])

    def test_cancelling_an_async_call_while_its_create_is_in_flight_releases_it(self) -> None:
        held = self.srv.inject("create", "delay", delay_ms=600)
        ran: List[bool] = []

        async def scenario() -> None:
            client = AsyncCyclesClient(self.config())
            try:
                @cycles(estimate=10, client=client)
                async def work() -> None:
                    ran.append(True)

                task = asyncio.ensure_future(work())
                await _arrived(held)  # the create is on the wire, the server holds it
                task.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await task
                for _ in range(400):  # the loop runs on: the release goes out on arrival
                    if self.srv.requests_for("release"):
                        break
                    await asyncio.sleep(0.01)
                while cl._shielded_tasks:
                    await asyncio.sleep(0.01)
            finally:
                await client.aclose()

        asyncio.run(scenario())
        self.assertEqual(ran, [])
        # A loaded machine may time out the release's first attempt: its retry reuses the key.
        ops = self.ops()
        self.assertEqual(ops[:2], ["create", "release"])
        self.assertEqual(set(ops[1:]), {"release"})
        releases = [r.body for r in self.srv.requests_for("release")]
        self.assertEqual(len({r["idempotency_key"] for r in releases}), 1)
        self.assertEqual(self.last_reservation()["status"], "RELEASED")
        release = releases[0]
        self.assertEqual(release["reason"], "cancelled_before_use")
        self.assertEqual(self.balance()["reserved"], 0)

    def test_cancelling_an_async_release_in_flight_still_releases(self) -> None:
        held = self.srv.inject("release", "delay", delay_ms=600)

        async def scenario() -> None:
            client = AsyncCyclesClient(self.config())
            try:
                async def work() -> None:
                    async with client.reserve(10) as guard:
                        await guard.release("not needed")

                task = asyncio.ensure_future(work())
                await _arrived(held)  # the release is on the wire, the server holds it
                task.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await task
                self.assertIs(cl.get_cycles_context(), self.outer_context)
                while cl._shielded_tasks:  # the release runs on
                    await asyncio.sleep(0.01)
            finally:
                await client.aclose()

        asyncio.run(scenario())
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.last_reservation()["status"], "RELEASED")

    def test_a_bug_inside_the_transport_is_logged_at_error_and_settled_later(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        real_send = cl._Transport.send
        broken: List[bool] = []

        def send(transport: Any, call: Any, request: bytes, deadline: float) -> Any:
            if call.path.endswith("/commit") and not broken:
                broken.append(True)
                raise AttributeError("a bug in the transport")
            return real_send(transport, call, request, deadline)

        with mock.patch.object(cl._Transport, "send", send), \
                self.assertLogs(_LOGGER, "WARNING") as logs:
            with client.reserve(10) as guard:
                guard.commit(8)
            self.assertTrue(cl.flush(5))
        bug = [r for r in logs.records if r.levelno == logging.ERROR and r.exc_info]
        self.assertEqual(len(bug), 1)
        self.assertIn("internal error", bug[0].getMessage())
        self.assertEqual(self.balance()["spent"], 8)
        self.assertEqual(self.ops(), ["create", "commit"])  # the bug sent nothing


class TestHeartbeatInternalError(_ServerCase):
    def _break_the_plan(self) -> Any:
        return mock.patch.object(cl._HeartbeatPlan, "after_success",
                                 side_effect=ArithmeticError("a bug in the schedule"))

    def test_sync(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        with self._break_the_plan(), self.assertLogs(_LOGGER, "ERROR") as logs:
            with client.reserve(10) as guard:
                context = guard.context
                self.assertTrue(_wait_for(lambda: context.lease_lost, 2.0))
        self.assertEqual(context.heartbeat_stopped, "internal_error")
        self.assertIn("heartbeat stopped by an internal error", "\n".join(logs.output))
        self.assertEqual(self.ops(), ["create", "commit"])

    def test_async(self) -> None:
        async def scenario() -> Any:
            client = AsyncCyclesClient(self.config())
            try:
                async with client.reserve(10) as guard:
                    for _ in range(200):
                        if guard.context.lease_lost:
                            break
                        await asyncio.sleep(0.01)
                    return guard.context
            finally:
                await client.aclose()

        with self._break_the_plan(), self.assertLogs(_LOGGER, "ERROR"):
            context = asyncio.run(scenario())
        self.assertEqual(context.heartbeat_stopped, "internal_error")
        self.assertTrue(context.lease_lost)
        self.assertEqual(self.ops(), ["create", "commit"])


# ---------------------------------------------------------------------------
# A server whose list cursor repeats (A -> B -> A): the local server never does
# ---------------------------------------------------------------------------


class _LoopingPages(http.server.BaseHTTPRequestHandler):
    pages = {"": ("A", "r1"), "A": ("B", "r2"), "B": ("A", "r3")}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        from urllib.parse import parse_qs, urlsplit

        cursor = parse_qs(urlsplit(self.path).query).get("cursor", [""])[0]
        next_cursor, item = self.pages[cursor]
        body = json.dumps({"reservations": [{"reservation_id": item}], "has_more": True,
                           "next_cursor": next_cursor}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class TestRepeatingCursor(unittest.TestCase):
    def setUp(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoopingPages)
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(self.httpd.server_close)
        self.addCleanup(self.httpd.shutdown)
        self.config = CyclesConfig(base_url=f"http://127.0.0.1:{self.httpd.server_address[1]}",
                                   api_key=_KEY, journal_enabled=False)

    def test_sync_iterator_ends_with_a_clear_error(self) -> None:
        with CyclesClient(self.config) as client:
            seen: List[str] = []
            with self.assertRaisesRegex(cl.CyclesProtocolError, "cursor it had returned before"):
                for item in client.iter_reservations(tenant="acme"):
                    seen.append(item["reservation_id"])
        self.assertEqual(seen, ["r1", "r2", "r3"])

    def test_async_iterator_ends_with_a_clear_error(self) -> None:
        async def scenario() -> Tuple[List[str], Optional[BaseException]]:
            seen: List[str] = []
            async with AsyncCyclesClient(self.config) as client:
                try:
                    async for item in client.iter_reservations(tenant="acme"):
                        seen.append(item["reservation_id"])
                except cl.CyclesProtocolError as exc:
                    return seen, exc
            return seen, None

        seen, failure = asyncio.run(scenario())
        self.assertEqual(seen, ["r1", "r2", "r3"])
        self.assertIsInstance(failure, cl.CyclesProtocolError)


class TestReviewFindings(_ServerCase):
    """Two holes a review found in the lifecycle's bookkeeping."""

    def test_a_client_subclass_with_eq_is_accepted(self) -> None:
        class ComparableClient(CyclesClient):
            def __eq__(self, other: object) -> bool:  # makes instances unhashable
                return self is other

        client = ComparableClient(self.config(journal_enabled=True,
                                              journal_dir=self.journal_dir()))
        self.addCleanup(client.close)
        for _ in range(2):
            with client.reserve(10) as guard:
                guard.commit(7)
        self.assertEqual(self.balance()["spent"], 14)

    def test_a_commit_interrupted_inside_its_journal_write_is_journaled_by_the_worker(
        self,
    ) -> None:
        directory = self.journal_dir()
        client = CyclesClient(self.config(journal_enabled=True, journal_dir=directory,
                                          retry_initial_delay=0.05))
        self.addCleanup(client.close)
        self.srv.inject("commit", "status", times=1, status=503)
        real_write = cl._CommitJournal.write
        writes: List[str] = []

        def write_interrupted_once(journal: Any, record: Any) -> bool:
            writes.append(record.reservation_id)
            if len(writes) == 1:
                raise KeyboardInterrupt  # Ctrl-C lands inside the journal write
            return real_write(journal, record)

        with mock.patch.object(cl._CommitJournal, "write", write_interrupted_once):
            with self.assertRaises(KeyboardInterrupt):
                with client.reserve(10):
                    pass
            self.assertTrue(cl.flush(10))
        self.assertEqual(len(writes), 2, "the worker writes the record the caller could not")
        self.assertEqual(self.balance()["spent"], 10)
        self.assertEqual(self.balance()["reserved"], 0)

    def journal_dir(self) -> str:
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="cycles-lite-life-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory


class TestConstantBodyIsPerCall(_ServerCase):
    """A constant @cycles body is checked once, but every call still sends a body of its
    own, as runcycles builds one per call: what a client does to the body it receives,
    or the caller to a dimensions dict or tags list it passed, shows in later calls
    exactly as it would there."""

    def tagged_creates(self) -> List[Any]:
        return [r.body["action"].get("tags") for r in self.srv.requests_for("create")]

    def test_a_client_that_edits_the_create_body_does_not_edit_the_next_call(self) -> None:
        class TaggingClient(CyclesClient):
            def create_reservation(self, request: Any) -> CyclesResponse:
                request["action"].setdefault("tags", []).append("proxied")
                request["estimate"]["amount"] += 1  # e.g. a margin of its own
                return super().create_reservation(request)

        client = TaggingClient(self.config())
        self.addCleanup(client.close)

        @cycles(estimate=10, actual=4, action_kind="llm", client=client)
        def work() -> None:
            pass

        for _ in range(3):
            work()
        self.assertEqual(self.tagged_creates(), [["proxied"]] * 3)
        sent = [r.body["estimate"]["amount"] for r in self.srv.requests_for("create")]
        self.assertEqual(sent, [11, 11, 11])
        self.assertEqual(self.balance()["spent"], 12)

    def test_an_async_client_that_edits_the_create_body_does_not_edit_the_next_call(
        self,
    ) -> None:
        class TaggingClient(AsyncCyclesClient):
            async def create_reservation(self, request: Any) -> CyclesResponse:
                request["action"].setdefault("tags", []).append("proxied")
                return await super().create_reservation(request)

        async def scenario() -> None:
            client = TaggingClient(self.config())

            @cycles(estimate=10, actual=4, client=client)
            async def work() -> None:
                pass

            try:
                for _ in range(3):
                    await work()
            finally:
                await client.aclose()

        asyncio.run(scenario())
        self.assertEqual(self.tagged_creates(), [["proxied"]] * 3)

    def test_dimensions_and_tags_changed_between_calls_are_sent_as_they_are_now(self) -> None:
        client = CyclesClient(self.config())
        self.addCleanup(client.close)
        dimensions, tags = {"run": "1"}, ["a"]

        @cycles(estimate=10, actual=4, dimensions=dimensions, action_tags=tags, client=client)
        def work() -> None:
            pass

        work()
        dimensions["run"] = "2"
        tags.append("b")
        work()
        sent = [r.body for r in self.srv.requests_for("create")]
        self.assertEqual([b["subject"]["dimensions"] for b in sent], [{"run": "1"}, {"run": "2"}])
        self.assertEqual([b["action"]["tags"] for b in sent], [["a"], ["a", "b"]])


if __name__ == "__main__":
    unittest.main()
