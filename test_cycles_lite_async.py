"""The asyncio transport of AsyncCyclesClient, over real HTTP and HTTPS to the local server.

Deadline, trickle, stale connection, redirect refused, proxy and CONNECT tunnel, two
event loops in turn, the connection cap, settlement retries as loop tasks, no threads.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import tempfile
import threading
import time
import unittest
import warnings
from typing import Any, Awaitable, Callable, List, TypeVar
from unittest import mock

import cycles_lite as cl
from cycles_lite import AsyncCyclesClient, CyclesConfig, CyclesResponse, cycles
from test_cycles_lite import (
    API_KEY,
    TENANT,
    ServerTestCase,
    TinyProxy,
    TunnelProxy,
    create_body,
    make_certificate,
    make_server,
)

_T = TypeVar("_T")


def run(scenario: Callable[[], Awaitable[_T]]) -> _T:
    """One fresh event loop per scenario, as ``asyncio.run`` gives scripts."""
    async def main() -> _T:
        return await scenario()

    return asyncio.run(main())


def balances_call() -> Any:
    return cl._Call("balances", "GET", "/v1/balances", query={"tenant": TENANT})


def client_threads(threads: Any) -> List[str]:
    """Names of the threads the client started (the in-process server has its own)."""
    return [t.name for t in threads if not t.name.startswith("cycles-lite-conn")]


def resource_warnings(caught: List[warnings.WarningMessage]) -> List[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


class AsyncServerCase(ServerTestCase):
    def new_client(self, **kwargs: Any) -> AsyncCyclesClient:
        kwargs.setdefault("journal_enabled", False)
        kwargs.setdefault("tenant", TENANT)
        return AsyncCyclesClient(self.config(**kwargs))


class TestAsyncTransport(AsyncServerCase):
    def test_keep_alive_one_connection_with_nodelay(self) -> None:
        client = self.new_client()
        before = self.srv.connections_accepted

        async def scenario() -> None:
            for _ in range(10):
                self.assertTrue((await client.get_balances(tenant=TENANT)).is_success)
                self.assertTrue((await client.create_reservation(create_body())).is_success)
            (conn,) = client._transport._pool().idle
            sock = conn.writer.get_extra_info("socket")
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            await client.aclose()

        run(scenario)
        self.assertEqual(self.srv.connections_accepted - before, 1)

    def test_explicit_deadline_is_honoured(self) -> None:
        client = self.new_client()
        delayed = self.srv.inject("balances", "delay", delay_ms=500)

        async def scenario() -> List[CyclesResponse]:
            try:
                started = time.monotonic()
                late = await client._call(balances_call(), deadline=cl._clock.monotonic() + 0.1)
                self.assertLess(time.monotonic() - started, 0.4)
                past = await client._call(balances_call(), deadline=cl._clock.monotonic() - 1)
                return [late, past]
            finally:
                await client.aclose()

        late, past = run(scenario)
        self.assertTrue(late.is_transport_error)
        self.assertIsInstance(late.transport_exception, TimeoutError)
        self.assertIn("deadline", past.error_message or "")
        self.wait_for_late_answers("balances", delayed)

    def test_whole_attempt_deadline_beats_a_trickling_server(self) -> None:
        client = self.new_client(read_timeout=5.0, request_timeout=0.4)
        self.srv.inject("balances", "trickle", interval_ms=50)

        async def scenario() -> None:
            started = time.monotonic()
            response = await client.get_balances(tenant=TENANT)
            elapsed = time.monotonic() - started
            self.assertTrue(response.is_transport_error)
            self.assertIsInstance(response.transport_exception, TimeoutError)
            self.assertIn("deadline", response.error_message or "")
            self.assertGreaterEqual(elapsed, 0.35)
            self.assertLess(elapsed, 1.5)
            self.assertTrue((await client.get_balances(tenant=TENANT)).is_success)
            await client.aclose()

        run(scenario)

    def test_read_timeout_bounds_a_silent_server(self) -> None:
        client = self.new_client(read_timeout=0.2)
        delayed = self.srv.inject("balances", "delay", delay_ms=1_000)

        async def scenario() -> None:
            started = time.monotonic()
            response = await client.get_balances(tenant=TENANT)
            self.assertTrue(response.is_transport_error)
            self.assertIsInstance(response.transport_exception, TimeoutError)
            self.assertLess(time.monotonic() - started, 0.8)
            await client.aclose()

        run(scenario)
        self.wait_for_late_answers("balances", delayed)

    def test_stale_connection_gets_one_reconnect_and_resend_with_the_same_key(self) -> None:
        # The server closes the idle connection between our check and our send:
        # simulated by skipping the check.
        client = self.new_client()
        body = create_body()

        async def scenario() -> CyclesResponse:
            await client.get_balances(tenant=TENANT)
            self.srv.close_idle_connections()
            self.srv.clear_requests()
            await asyncio.sleep(0.05)  # the loop sees the close
            with mock.patch.object(cl._AsyncConnection, "dropped", return_value=False):
                response = await client.create_reservation(body)
            await client.aclose()
            return response

        before = self.srv.connections_accepted
        response = run(scenario)
        self.assertTrue(response.is_success, response.error_message)
        self.assertEqual(self.srv.connections_accepted - before, 2)
        self.assertEqual(  # the create reached the server once, with its own key
            [r.body["idempotency_key"] for r in self.srv.requests_for("create")],
            [body["idempotency_key"]],
        )

    def test_no_resend_without_an_idempotency_key(self) -> None:
        client = self.new_client()
        body = create_body()
        del body["idempotency_key"]

        async def scenario() -> CyclesResponse:
            await client.get_balances(tenant=TENANT)
            self.srv.close_idle_connections()
            await asyncio.sleep(0.05)
            with mock.patch.object(cl._AsyncConnection, "dropped", return_value=False):
                response = await client.create_reservation(body)
            await client.aclose()
            return response

        self.assertTrue(run(scenario).is_transport_error)

    def test_lost_response_on_a_reused_connection_is_resent_with_the_same_key(self) -> None:
        client = self.new_client()
        body = create_body()

        async def scenario() -> CyclesResponse:
            await client.get_balances(tenant=TENANT)
            self.srv.inject("create", "lost_response")
            response = await client.create_reservation(body)
            await client.aclose()
            return response

        self.assertTrue(run(scenario).is_success)
        sent = self.srv.requests_for("create")
        self.assertEqual(
            [r.headers["x-idempotency-key"] for r in sent], [body["idempotency_key"]] * 2
        )
        self.srv.check_invariants()

    def test_redirects_are_refused(self) -> None:
        client = self.new_client()
        self.srv.inject("balances", "redirect")

        async def scenario() -> CyclesResponse:
            response = await client.get_balances(tenant=TENANT)
            await client.aclose()
            return response

        response = run(scenario)
        self.assertTrue(300 <= response.status < 400, response.status)
        self.assertIn("redirect not followed", response.error_message or "")
        self.assertEqual(len(self.srv.requests), 1)

    def test_ids_are_percent_encoded(self) -> None:
        client = self.new_client()

        async def scenario() -> None:
            await client.get_reservation("../balances")
            await client.aclose()

        run(scenario)
        self.assertEqual(self.last_request().path, "/v1/reservations/..%2Fbalances")

    def test_malformed_and_dropped_answers_become_transport_errors(self) -> None:
        client = self.new_client(request_timeout=1.0)

        async def scenario() -> List[CyclesResponse]:
            answers = []
            for fault in ("drop", "malformed", "html", "close_after"):
                self.srv.inject("balances", fault)
                answers.append(await client.get_balances(tenant=TENANT))
            answers.append(await client.get_balances(tenant=TENANT))
            await client.aclose()
            return answers

        drop, malformed, html, close_after, fine = run(scenario)
        self.assertTrue(drop.is_transport_error)
        self.assertFalse(malformed.is_transport_error)
        self.assertFalse(html.is_transport_error)
        self.assertTrue(close_after.is_success)
        self.assertTrue(fine.is_success)

    def test_http_proxy_absolute_form(self) -> None:
        with TinyProxy() as proxy:
            client = self.new_client(proxy=f"http://user:pw@127.0.0.1:{proxy.port}", pool_maxsize=0)

            async def scenario() -> CyclesResponse:
                response = await client.get_balances(tenant=TENANT)
                await client.aclose()
                return response

            response = run(scenario)
            self.assertTrue(response.is_success, response.error_message)
            head = proxy.heads[-1]
            self.assertTrue(head.startswith(f"GET {self.srv.url}/v1/balances?tenant=acme HTTP/1.1"))
            self.assertIn("Proxy-Authorization: Basic dXNlcjpwdw==", head)
            self.assertIn("Connection: close", head)
        self.assertEqual(self.last_request().path, "/v1/balances")

    def test_response_size_cap(self) -> None:
        client = self.new_client()

        async def scenario() -> CyclesResponse:
            with mock.patch.object(cl, "MAX_RESPONSE_BYTES", 100):
                response = await client.get_balances(tenant=TENANT)
            await client.aclose()
            return response

        response = run(scenario)
        self.assertTrue(response.is_transport_error)
        self.assertIn("larger than 100 bytes", response.error_message or "")

    def test_aclose_closes_everything_and_the_client_refuses_new_calls(self) -> None:
        client = self.new_client()

        async def scenario() -> None:
            await asyncio.gather(*(client.get_balances(tenant=TENANT) for _ in range(5)))
            pool = client._transport._pool()
            self.assertTrue(pool.idle)
            await client.aclose()
            self.assertEqual(pool.idle, [])
            self.assertTrue(pool.closed)
            with self.assertRaises(RuntimeError):
                await client.get_balances(tenant=TENANT)

        run(scenario)


class TestResponseFraming(unittest.TestCase):
    """Answers the local server never sends (it always sends Content-Length), from a stub."""

    ANSWERS = {
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4;x=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: t\r\n\r\n",
        "continue": b"HTTP/1.1 100 Continue\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"c\":3}",
        "eof": b"HTTP/1.0 200 OK\r\n\r\n{\"b\":2}",
        "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-4\r\nxxxx\r\n",
        "not-http": b"SSH-2.0-OpenSSH\r\n\r\n",
        "keep-alive": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"k\":1}",
        "close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 7\r\n\r\n{\"k\":1}",
        "http10": b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{\"k\":1}",
        "http10-keep-alive": b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n"
                             b"Content-Length: 7\r\n\r\n{\"k\":1}",
        "no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length (a smuggling sign: the
        # connection is not reused); a coding other than a final chunked runs to EOF.
        "chunked-and-length": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n7\r\n{\"k\":1}\r\n0\r\n\r\n",
        "not-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n"
                       b"Content-Length: 2\r\n\r\n{\"k\":1}",
        "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 20\r\n\r\n"
                       b"{\"k\":1}{\"smuggled\":1}",
        "huge-length": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        "short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\n{\"k\":1}",
        "short-head": b"HTTP/1.1 200 OK\r\nContent-Len",
    }
    pooled = -1  # the idle connections the client kept after the last answer

    def answer(self, kind: str, blocking: bool = False) -> CyclesResponse:
        if blocking:  # the blocking client reads with the same parser: the same answers
            return self.blocking_answer(kind)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.ANSWERS[kind])
            writer.close()

        async def scenario() -> CyclesResponse:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = AsyncCyclesClient(CyclesConfig(
                base_url=f"http://127.0.0.1:{port}", api_key=API_KEY, journal_enabled=False))
            try:
                response = await client.get_balances(tenant=TENANT)
                self.pooled = len(client._transport._pool().idle)
                return response
            finally:
                await client.aclose()
                server.close()
                await server.wait_closed()

        return run(scenario)

    def blocking_answer(self, kind: str) -> CyclesResponse:
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += conn.recv(65536)
                conn.sendall(self.ANSWERS[kind])

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with cl.CyclesClient(CyclesConfig(base_url=url, api_key=API_KEY,
                                          journal_enabled=False)) as client:
            response = client.get_balances(tenant=TENANT)
            self.pooled = len(client._transport._idle)
        server.join(5)
        return response

    def test_chunked_interim_and_eof_framed_bodies(self) -> None:
        for blocking in (False, True):
            with self.subTest(blocking=blocking):
                self.assertEqual(self.answer("chunked", blocking).body, {"a": 1})
                self.assertEqual(self.answer("continue", blocking).body, {"c": 3})
                self.assertEqual(self.answer("eof", blocking).body, {"b": 2})

    def test_malformed_framing_is_a_transport_error(self) -> None:
        for blocking in (False, True):
            with self.subTest(blocking=blocking):
                bad = self.answer("bad-chunk", blocking)
                self.assertTrue(bad.is_transport_error)
                self.assertIn("chunk size", bad.error_message or "")
                self.assertTrue(self.answer("not-http", blocking).is_transport_error)
                self.assertTrue(bad.error_message.startswith("not a valid HTTP answer"))

    def test_a_connection_is_kept_only_when_the_answer_allows_it(self) -> None:
        kept = {"keep-alive": 1, "http10-keep-alive": 1, "no-content": 1,
                "close": 0, "http10": 0, "chunked-and-length": 0, "not-chunked": 0}
        for blocking in (False, True):
            for kind, pooled in kept.items():
                with self.subTest(blocking=blocking, kind=kind):
                    response = self.answer(kind, blocking)
                    self.assertEqual(response.status, 204 if kind == "no-content" else 200)
                    if kind != "no-content":
                        self.assertEqual(response.body, {"k": 1})
                    self.assertEqual(self.pooled, pooled)

    def test_bad_content_length_is_a_malformed_response_not_an_internal_error(self) -> None:
        for blocking in (False, True):
            with self.subTest(blocking=blocking):
                two = self.answer("two-lengths", blocking)
                self.assertTrue(two.is_transport_error)  # never the first value silently
                self.assertIn("Content-Length", two.error_message or "")
                with self.assertLogs("cycles_lite", "DEBUG") as logs:
                    huge = self.answer("huge-length", blocking)
                self.assertIsInstance(huge.transport_exception, OSError)
                self.assertIn("larger than", huge.error_message or "")
                self.assertNotIn("internal error", "\n".join(logs.output))

    def test_an_answer_cut_short_says_so(self) -> None:
        for blocking in (False, True):
            for kind in ("short-body", "short-head"):
                with self.subTest(blocking=blocking, kind=kind):
                    cut = self.answer(kind, blocking)
                    self.assertTrue(cut.is_transport_error)
                    self.assertTrue(
                        (cut.error_message or "").startswith(
                            "the connection closed before a complete answer"
                        ), cut.error_message)
                    self.assertEqual(self.pooled, 0)


class TestLoops(AsyncServerCase):
    def test_two_event_loops_in_turn_each_get_their_own_connections(self) -> None:
        client = self.new_client()
        before = self.srv.connections_accepted
        pools: List[Any] = []

        async def scenario() -> bool:
            ok = all(r.is_success for r in await asyncio.gather(
                *(client.get_balances(tenant=TENANT) for _ in range(3))))
            pools.append(client._transport._pool())
            return ok

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertTrue(run(scenario))
            self.assertTrue(run(scenario))  # a new loop: the first one's pool is not used
            first, second = pools
            self.assertIsNot(first, second)
            self.assertTrue(first.closed)  # closed with its loop
            self.assertEqual(first.idle, [])
            run(client.aclose)
            self.assertTrue(second.closed)
            pools.clear()
            del first, second
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])
        self.assertGreaterEqual(self.srv.connections_accepted - before, 2)

    def test_a_loop_closed_by_hand_has_its_connections_released_silently(self) -> None:
        client = self.new_client()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop = asyncio.new_event_loop()
            self.assertTrue(loop.run_until_complete(client.get_balances(tenant=TENANT)).is_success)
            loop.close()  # without shutdown_asyncgens(): its idle connection is left behind
            self.assertTrue(run(lambda: client.get_balances(tenant=TENANT)).is_success)
            run(client.aclose)
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])

    def test_a_request_from_an_async_generator_finalized_at_loop_shutdown(self) -> None:
        client = self.new_client()
        statuses: List[int] = []

        async def stream() -> Any:
            try:
                yield 1
            finally:  # runs in the loop's shutdown_asyncgens()
                statuses.append((await client.get_balances(tenant=TENANT)).status)

        async def scenario() -> Any:
            generator = stream()
            await generator.__anext__()
            return generator  # left suspended: asyncio.run finalizes it

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = run(scenario)
            run(client.aclose)
            del kept
            gc.collect()
        self.assertEqual(statuses, [200])
        self.assertEqual(resource_warnings(caught), [])

    def test_a_client_used_from_two_threads_keeps_a_pool_per_loop(self) -> None:
        client = self.new_client()
        results: List[bool] = []

        def in_thread() -> None:
            async def scenario() -> bool:
                answers = await asyncio.gather(
                    *(client.get_balances(tenant=TENANT) for _ in range(5)))
                return all(a.is_success for a in answers)

            results.append(run(scenario))

        threads = [threading.Thread(target=in_thread) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(results, [True, True, True])
        run(client.aclose)

    def test_a_forked_child_forgets_the_parents_connections(self) -> None:
        client = self.new_client()

        async def scenario() -> None:
            await client.get_balances(tenant=TENANT)
            parent_pool = client._transport._pool()
            client._transport._after_fork()  # what the at-fork registry runs in a child
            self.assertIsNot(client._transport._pool(), parent_pool)
            self.assertTrue((await client.get_balances(tenant=TENANT)).is_success)
            await client.aclose()

        run(scenario)


class TestConnectionCap(AsyncServerCase):
    def test_requests_beyond_the_cap_wait_in_order(self) -> None:
        client = self.new_client(max_connections=1)
        self.srv.inject("create", "delay", delay_ms=30, times=None)
        bodies = [create_body() for _ in range(5)]
        before = self.srv.connections_accepted

        async def scenario() -> List[CyclesResponse]:
            calls = []
            for body in bodies:
                calls.append(asyncio.ensure_future(client.create_reservation(body)))
                await asyncio.sleep(0)  # each call reaches the gate in this order
            answers = list(await asyncio.gather(*calls))
            await client.aclose()
            return answers

        self.assertTrue(all(r.is_success for r in run(scenario)))
        self.assertEqual(self.srv.connections_accepted - before, 1)
        sent = [r.body["idempotency_key"] for r in self.srv.requests_for("create")]
        self.assertEqual(sent, [b["idempotency_key"] for b in bodies])
        self.srv.clear_faults()

    def test_no_more_connections_than_the_cap(self) -> None:
        client = self.new_client(max_connections=3, pool_maxsize=3)
        self.srv.inject("balances", "delay", delay_ms=50, times=None)
        before = self.srv.connections_accepted

        async def scenario() -> bool:
            answers = await asyncio.gather(*(client.get_balances(tenant=TENANT) for _ in range(12)))
            await client.aclose()
            return all(a.is_success for a in answers)

        self.assertTrue(run(scenario))
        self.assertEqual(self.srv.connections_accepted - before, 3)
        self.srv.clear_faults()

    def test_the_deadline_runs_while_waiting_for_a_connection(self) -> None:
        client = self.new_client(max_connections=1, request_timeout=0.3)
        self.srv.inject("balances", "delay", delay_ms=200, times=None)

        async def scenario() -> List[CyclesResponse]:
            answers = list(await asyncio.gather(
                *(client.get_balances(tenant=TENANT) for _ in range(3))))
            await client.aclose()
            return answers

        first, second, third = run(scenario)
        self.assertTrue(first.is_success)
        self.assertTrue(second.is_transport_error)
        self.assertTrue(third.is_transport_error)
        self.assertIn("waiting for a connection", third.error_message or "")
        self.srv.clear_faults()

    def test_a_cancelled_waiter_gives_its_turn_away(self) -> None:
        client = self.new_client(max_connections=1)
        self.srv.inject("balances", "delay", delay_ms=100)

        async def scenario() -> CyclesResponse:
            first = asyncio.ensure_future(client.get_balances(tenant=TENANT))
            await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(client.get_balances(tenant=TENANT))
            await asyncio.sleep(0.01)
            waiting.cancel()
            await first
            response = await asyncio.wait_for(client.get_balances(tenant=TENANT), 2)
            await client.aclose()
            return response

        self.assertTrue(run(scenario).is_success)

    def test_a_burst_keeps_its_connections_then_the_pool_shrinks_to_pool_maxsize(self) -> None:
        client = self.new_client(max_connections=6, pool_maxsize=2)
        self.srv.inject("balances", "delay", delay_ms=30, times=6)
        before = self.srv.connections_accepted

        async def scenario() -> List[int]:
            sizes = []
            with mock.patch.object(cl, "_IDLE_EXPIRY", 0.05):
                await asyncio.gather(*(client.get_balances(tenant=TENANT) for _ in range(6)))
                pool = client._transport._pool()
                sizes.append(len(pool.idle))  # all kept for the burst's next requests
                await asyncio.gather(*(client.get_balances(tenant=TENANT) for _ in range(6)))
                await asyncio.sleep(0.2)
                sizes.append(len(pool.idle))  # idle beyond pool_maxsize expired
            await client.aclose()
            return sizes

        self.assertEqual(run(scenario), [6, 2])
        self.assertEqual(self.srv.connections_accepted - before, 6)

    def test_max_connections_is_validated_and_read_from_the_environment(self) -> None:
        with self.assertRaisesRegex(ValueError, "max_connections"):
            self.config(max_connections=0)
        env = {"CYCLES_BASE_URL": self.srv.url, "CYCLES_API_KEY": API_KEY,
               "CYCLES_MAX_CONNECTIONS": "7"}
        self.assertEqual(CyclesConfig.from_env(environ=env).max_connections, 7)
        self.assertEqual(self.config().max_connections, 100)


class TestNoThreads(AsyncServerCase):
    def test_concurrent_guarded_calls_start_no_thread_and_retries_run_on_the_loop(self) -> None:
        client = self.new_client(retry_initial_delay=0.05, retry_max_delay=0.05)
        self.srv.inject("commit", "status", status=503, times=2)

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            await asyncio.sleep(0.01)
            return "ok"

        started: List[str] = []
        real_start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            started.extend(client_threads([thread]))
            real_start(thread)

        async def scenario() -> bool:
            results = await asyncio.gather(*(guarded() for _ in range(30)))
            self.assertEqual(set(results), {"ok"})
            settled = await cl.aflush(5)
            await client.aclose()
            return settled

        with mock.patch.object(threading.Thread, "start", counting_start):
            self.assertTrue(run(scenario))
        self.assertEqual(started, [])
        self.assertEqual(len(self.srv.requests_for("commit")), 32)
        self.srv.check_invariants()

    def test_journal_writes_run_on_the_loops_default_executor_only(self) -> None:
        with tempfile.TemporaryDirectory() as journal_dir:
            client = self.new_client(journal_enabled=True, journal_dir=journal_dir)

            @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                    client=client)
            async def guarded() -> str:
                return "ok"

            before = set(threading.enumerate())

            async def scenario() -> List[str]:
                await asyncio.gather(*(guarded() for _ in range(40)))
                grown = client_threads(set(threading.enumerate()) - before)
                await client.aclose()
                return grown

            grown = run(scenario)
        self.assertFalse([name for name in grown if name.startswith("cycles-lite")])
        self.assertLessEqual(len(grown), min(32, (os.cpu_count() or 1) + 4))  # asyncio's cap

    def test_a_retry_pending_when_its_loop_ends_moves_to_the_worker(self) -> None:
        client = self.new_client(retry_initial_delay=0.2, retry_max_delay=0.2)
        self.srv.inject("commit", "status", status=503)

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            return "ok"

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(run(guarded), "ok")  # the loop ends with the retry still waiting
            self.assertTrue(cl.flush(5))  # sent from a private loop on this thread
            run(client.aclose)
            gc.collect()
        self.assertEqual(len(self.srv.requests_for("commit")), 2)
        self.assertEqual(resource_warnings(caught), [])
        self.srv.check_invariants()


class TestAflushAndRecover(AsyncServerCase):
    def test_aflush_waits_for_the_loops_retry_tasks_and_times_out(self) -> None:
        client = self.new_client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.srv.inject("commit", "status", status=503)

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            return "ok"

        async def scenario() -> List[bool]:
            self.assertTrue(await cl.aflush(0))  # nothing pending (and no thread for it)
            await guarded()
            loop = asyncio.get_running_loop()
            pending = [t for t in cl._settlement_tasks if t.get_loop() is loop]
            self.assertEqual(len(pending), 1)  # the retry is a task on this loop
            answers = [bool(await cl.aflush(0.05)), bool(await cl.aflush(5))]
            await client.aclose()
            return answers

        self.assertEqual(run(scenario), [False, True])
        self.assertEqual(len(self.srv.requests_for("commit")), 2)
        self.assertIsNone(cl._settlements._worker)

    def test_async_recover_sends_on_the_loop(self) -> None:
        with tempfile.TemporaryDirectory() as journal_dir:
            client = self.new_client(journal_enabled=True, journal_dir=journal_dir,
                                     retry_enabled=False)
            self.srv.inject("commit", "status", status=503)

            @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                    client=client)
            async def guarded() -> str:
                return "ok"

            async def scenario() -> Any:
                await guarded()  # the commit fails once: its record stays journaled
                no_thread = mock.patch.object(cl._Transport, "send",
                                              side_effect=AssertionError("a thread"))
                with no_thread:
                    summary = await client.recover(timeout=5)
                await client.aclose()
                return summary

            summary = run(scenario)
        self.assertEqual((summary.found, summary.settled), (1, 1))
        self.assertEqual(len(self.srv.requests_for("commit")), 2)
        self.srv.check_invariants()


class TestAsyncHttps(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        import ssl

        cls.tmp = tempfile.TemporaryDirectory()
        files = make_certificate(cls.tmp.name)
        if files is None:
            cls.tmp.cleanup()
            raise unittest.SkipTest("the openssl command line tool is not available")
        cls.cert = files["cert"]
        context = cls.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files["cert"], files["key"])
        cls.srv = make_server(ssl_context=context).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()
        cls.tmp.cleanup()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()

    def client(self, **kwargs: Any) -> AsyncCyclesClient:
        kwargs.setdefault("ca_bundle", self.cert)
        return AsyncCyclesClient(CyclesConfig(
            base_url=self.srv.url, api_key=API_KEY, journal_enabled=False, **kwargs))

    def test_https_keep_alive_on_one_connection(self) -> None:
        client = self.client()
        before = self.srv.connections_accepted

        async def scenario() -> bool:
            answers = [await client.get_balances(tenant=TENANT) for _ in range(5)]
            answers.append(await client.create_reservation(create_body()))
            await client.aclose()
            return all(a.is_success for a in answers)

        self.assertTrue(run(scenario))
        self.assertEqual(self.srv.connections_accepted - before, 1)

    def test_verification_is_on_by_default(self) -> None:
        client = AsyncCyclesClient(CyclesConfig(base_url=self.srv.url, api_key=API_KEY))

        async def scenario() -> CyclesResponse:
            response = await client.get_balances(tenant=TENANT)
            await client.aclose()
            return response

        response = run(scenario)
        self.assertTrue(response.is_transport_error)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", response.error_message or "")

    def test_https_trickle_hits_the_deadline(self) -> None:
        client = self.client(request_timeout=0.4)
        self.srv.inject("balances", "trickle", interval_ms=50)

        async def scenario() -> CyclesResponse:
            response = await client.get_balances(tenant=TENANT)
            await client.aclose()
            return response

        started = time.monotonic()
        response = run(scenario)
        self.assertTrue(response.is_transport_error)
        self.assertIsInstance(response.transport_exception, TimeoutError)
        self.assertLess(time.monotonic() - started, 1.5)

    def test_https_stale_connection_is_resent_once(self) -> None:
        client = self.client()
        body = create_body()

        async def scenario() -> CyclesResponse:
            await client.get_balances(tenant=TENANT)
            self.srv.close_idle_connections()
            self.srv.clear_requests()
            await asyncio.sleep(0.05)
            with mock.patch.object(cl._AsyncConnection, "dropped", return_value=False):
                response = await client.create_reservation(body)
            await client.aclose()
            return response

        self.assertTrue(run(scenario).is_success)
        self.assertEqual(len(self.srv.requests_for("create")), 1)

    def test_https_tunnel_through_a_proxy(self) -> None:
        with TunnelProxy() as proxy:
            client = self.client(proxy=f"http://127.0.0.1:{proxy.port}")

            async def scenario() -> bool:
                answers = [await client.get_balances(tenant=TENANT) for _ in range(2)]
                await client.aclose()
                return all(a.is_success for a in answers)

            self.assertTrue(run(scenario))
        self.assertEqual(len(proxy.heads), 1)
        self.assertTrue(proxy.heads[0].startswith(f"CONNECT 127.0.0.1:{self.srv.port} HTTP/1."))

    def test_tunnel_tries_every_proxy_address_names_the_origin_and_keeps_credentials(
        self,
    ) -> None:
        """Through CONNECT, for both clients: every address of the proxy's name is tried
        (as socket.create_connection does), the TLS handshake names the origin (SNI) and
        verifies it, and Proxy-Authorization goes to the proxy only, never to the origin."""
        nothing_listens = socket.create_server(("127.0.0.1", 0))
        refused_port = nothing_listens.getsockname()[1]
        nothing_listens.close()
        resolve = socket.getaddrinfo
        names: List[str] = []
        self.context.sni_callback = lambda _sock, name, _context: names.append(name)
        self.addCleanup(setattr, self.context, "sni_callback", None)
        for blocking in (True, False):
            with self.subTest(blocking=blocking), TunnelProxy() as proxy:

                def proxy_addresses(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
                    if host != "proxy.test":
                        return resolve(host, port, *args, **kwargs)
                    return (resolve("127.0.0.1", refused_port, *args, **kwargs)
                            + resolve("127.0.0.1", proxy.port, *args, **kwargs))

                config = CyclesConfig(
                    base_url=f"https://localhost:{self.srv.port}", api_key=API_KEY,
                    ca_bundle=self.cert, journal_enabled=False,
                    proxy=f"http://user:pw@proxy.test:{proxy.port}")
                with mock.patch.object(socket, "getaddrinfo", proxy_addresses):
                    if blocking:
                        with cl.CyclesClient(config) as client:
                            response = client.get_balances(tenant=TENANT)
                    else:
                        async def scenario() -> CyclesResponse:
                            async with AsyncCyclesClient(config) as client:
                                return await client.get_balances(tenant=TENANT)

                        response = run(scenario)
                self.assertTrue(response.is_success, response.error_message)
                (connect,) = proxy.heads
                self.assertTrue(connect.startswith(f"CONNECT localhost:{self.srv.port} HTTP/1.1"))
                self.assertIn("\r\nProxy-Authorization: Basic dXNlcjpwdw==", connect)
                self.assertNotIn("proxy-authorization", self.srv.requests[-1].headers)
                self.assertEqual(names[-1], "localhost")

    def test_a_loop_closed_by_hand_then_aclose_over_https(self) -> None:
        client = self.client()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop = asyncio.new_event_loop()
            self.assertTrue(loop.run_until_complete(client.get_balances(tenant=TENANT)).is_success)
            loop.close()
            run(client.aclose)
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])

    def test_two_loops_in_turn_over_https_without_warnings(self) -> None:
        client = self.client()

        async def scenario() -> bool:
            return (await client.get_balances(tenant=TENANT)).is_success

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertTrue(run(scenario))
            self.assertTrue(run(scenario))
            run(client.aclose)
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])



class TestReviewFixes(AsyncServerCase):
    """Found in review: a cut-short body, a late pool's idle connection, stranded retries."""

    def test_eof_framed_body_cut_short_by_the_deadline_is_a_transport_error(self) -> None:
        cut_short = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"b\":"
        response = self.stub_answer(cut_short, within=0.3)  # then the stub stalls
        self.assertTrue(response.is_transport_error)  # not a 200 with a truncated body
        self.assertIn("deadline", response.error_message or "")

    def test_a_detached_retry_after_aclose_keeps_no_connection_open(self) -> None:
        client = self.new_client()
        run(client.aclose)
        token = cl._attempt.set(cl._Attempt(cl._clock.monotonic() + 5, True))
        try:  # a settlement retry on the worker's private loop, outliving the client
            response = cl._run_to_completion(client._call(balances_call()))
        finally:
            cl._attempt.reset(token)
        self.assertTrue(response.is_success)
        self.assertEqual([pool.idle for pool in client._transport._pools.values()], [[]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del client
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])

    def stranded_retry(self) -> AsyncCyclesClient:
        """A commit retry task left pending on a loop that ``run_until_complete`` ran."""
        client = self.new_client(retry_initial_delay=0.2, retry_max_delay=0.2)
        self.srv.inject("commit", "status", status=503)

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            return "ok"

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        self.assertEqual(loop.run_until_complete(guarded()), "ok")
        self.assertEqual([t.get_loop() for t in cl._settlement_tasks], [loop])
        return client

    def test_a_retry_task_of_a_loop_closed_by_hand_reaches_the_worker(self) -> None:
        self.stranded_retry()
        next(iter(cl._settlement_tasks)).get_loop().close()
        result = cl.flush(5)
        self.assertTrue(result)
        self.assertEqual(result.settled, 1)
        self.assertEqual(len(self.srv.requests_for("commit")), 2)  # same key: settled once
        self.assertEqual(cl._settlement_tasks, {})
        self.srv.check_invariants()

    def test_aflush_on_a_new_loop_settles_a_closed_loops_retry(self) -> None:
        self.stranded_retry()
        next(iter(cl._settlement_tasks)).get_loop().close()

        async def scenario() -> Any:
            with mock.patch.object(cl._Transport, "send", side_effect=AssertionError("a thread")):
                return await cl.aflush(5)

        result = run(scenario)
        self.assertTrue(result)
        self.assertEqual(len(self.srv.requests_for("commit")), 2)

    def test_at_exit_a_retry_task_of_a_loop_left_unclosed_is_settled(self) -> None:
        self.stranded_retry()  # the loop is neither running nor closed, as a script leaves it
        cl._settlements._flush_at_exit()
        self.assertEqual(len(self.srv.requests_for("commit")), 2)
        self.assertEqual(cl._settlement_tasks, {})

    def stub_answer(
        self, answer: bytes, *, proxy: bool = False, within: float = 5.0
    ) -> CyclesResponse:
        """The client's response, within ``within`` seconds, to ``answer`` from a stub
        server (as a proxy for ``https://127.0.0.1:9`` when ``proxy``)."""
        async def scenario() -> CyclesResponse:
            done = asyncio.Event()

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(answer)
                    await reader.read()  # holds the connection open until the client drops it
                except ConnectionError:
                    pass
                finally:
                    writer.close()
                    done.set()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            stub = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            client = AsyncCyclesClient(CyclesConfig(
                base_url="https://127.0.0.1:9" if proxy else stub, api_key=API_KEY,
                journal_enabled=False, proxy=stub if proxy else None))
            try:
                return await client._call(balances_call(), cl._clock.monotonic() + within)
            finally:
                await client.aclose()
                await asyncio.wait_for(done.wait(), 5)
                server.close()
                await server.wait_closed()

        return run(scenario)

    def test_a_proxy_refusing_connect_with_a_body_is_reported_at_once(self) -> None:
        refusal = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                   b"Content-Length: 5\r\n\r\nnope!")
        response = self.stub_answer(refusal, proxy=True)
        self.assertTrue(response.is_transport_error)  # not a connect timeout
        self.assertIn("Tunnel connection failed: 407", response.error_message or "")

    def test_non_ascii_digits_in_the_head_are_a_malformed_response(self) -> None:
        length = self.stub_answer(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}")
        self.assertIn("Content-Length", length.error_message or "")
        status = self.stub_answer(b"HTTP/1.1 \xb200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIn("status line", status.error_message or "")

    def test_a_client_dropped_after_its_loop_was_closed_by_hand_does_not_warn(self) -> None:
        client = self.new_client()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop = asyncio.new_event_loop()
            self.assertTrue(loop.run_until_complete(client.get_balances(tenant=TENANT)).is_success)
            loop.close()  # no shutdown_asyncgens(), and no aclose() either
            del client
            gc.collect()
        self.assertEqual(resource_warnings(caught), [])

    def test_nothing_is_sent_once_the_deadline_passed(self) -> None:
        client = self.new_client()

        async def scenario() -> CyclesResponse:
            await client.get_balances(tenant=TENANT)  # an idle kept-alive connection
            sent = len(self.srv.requests)
            response = await client._call(balances_call(), cl._clock.monotonic() - 0.01)
            await client.get_balances(tenant=TENANT)  # after it, on the same server thread
            self.assertEqual(len(self.srv.requests), sent + 1)
            await client.aclose()
            return response

        response = run(scenario)
        self.assertTrue(response.is_transport_error)
        self.assertIn("deadline", response.error_message or "")


if __name__ == "__main__":
    unittest.main()


class TestOrphanReleaseSurvivesTheLoopsEnd(AsyncServerCase):
    """Review: the release of a call cancelled while its create was in flight ran on a
    task of its own that the end of the event loop cut off (reservation held to TTL)."""

    def test_the_release_moves_to_the_worker_with_the_same_key(self) -> None:
        client = self.new_client()
        self.srv.inject("create", "delay", delay_ms=300)
        self.srv.inject("release", "delay", delay_ms=1_500)  # in flight when the loop ends

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            return "ok"

        async def scenario() -> None:
            call = asyncio.ensure_future(guarded())
            await asyncio.sleep(0.05)
            call.cancel()
            await asyncio.sleep(0.6)  # the create answered at ~0.3 s; the release waits

        run(scenario)
        self.assertEqual(cl._settlements.pending(), 1)  # handed over, not cut off
        self.assertTrue(cl.flush(10))
        keys = [r.body["idempotency_key"] for r in self.srv.requests_for("release")]
        self.assertGreaterEqual(len(keys), 1)
        self.assertEqual(len(set(keys)), 1)
        self.assertTrue(keys[0].startswith("release-"))
        (create,) = [r for r in self.srv.requests_for("create") if r.status == 200]
        rid = create.response_body["reservation_id"]
        self.assertTrue(_wait_until(lambda: self.srv.reservation(rid)["status"] == "RELEASED"))
        run(client.aclose)
        self.srv.check_invariants()


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class TestGuardReleaseSurvivesTheLoopsEnd(AsyncServerCase):
    """Review: a guard's release still in flight when its cancelled caller's loop ended
    was cut off with the loop (reservation held to TTL)."""

    def test_the_release_moves_to_the_worker_with_the_same_key(self) -> None:
        client = self.new_client()
        self.srv.inject("release", "delay", delay_ms=1_500)

        async def scenario() -> None:
            async def work() -> None:
                async with client.reserve(10) as guard:
                    await guard.release("not needed")

            task = asyncio.ensure_future(work())
            await asyncio.sleep(0.3)  # the release is on the wire, the server holds it
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task  # the loop ends now, with the release in flight

        run(scenario)
        self.assertEqual(cl._settlements.pending(), 1)  # handed over, not cut off
        self.assertTrue(cl.flush(10))
        keys = {r.body["idempotency_key"] for r in self.srv.requests_for("release")}
        self.assertEqual(len(keys), 1)
        (create,) = [r for r in self.srv.requests_for("create") if r.status == 200]
        rid = create.response_body["reservation_id"]
        self.assertTrue(_wait_until(lambda: self.srv.reservation(rid)["status"] == "RELEASED"))
        run(client.aclose)
        self.srv.check_invariants()


class TestLoopRetryTasksCountAgainstTheCapacity(AsyncServerCase):
    """Review: async retry tasks did not count toward the settlement queue's capacity,
    so a long outage could pile up unbounded tasks."""

    def test_beyond_the_capacity_the_retry_runs_on_the_caller(self) -> None:
        queue = cl._SettlementQueue(capacity=2)
        self.addCleanup(setattr, cl, "_settlements", cl._settlements)
        cl._settlements = queue
        client = self.new_client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.srv.inject("commit", "status", status=503, times=4)  # every first attempt

        @cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                client=client)
        async def guarded() -> str:
            return "ok"

        peak: List[int] = []

        async def watch() -> None:
            while True:
                peak.append(len(cl._settlement_tasks))
                await asyncio.sleep(0.01)

        async def scenario() -> bool:
            watcher = asyncio.ensure_future(watch())
            results = await asyncio.gather(*(guarded() for _ in range(4)))
            self.assertEqual(set(results), {"ok"})
            settled = await cl.aflush(5)
            watcher.cancel()
            await client.aclose()
            return bool(settled)

        self.assertTrue(run(scenario))
        self.assertEqual(max(peak), 2)  # the other two retried on their callers
        self.assertEqual(len(self.srv.requests_for("commit")), 8)
        self.srv.check_invariants()
