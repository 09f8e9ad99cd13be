# Copyright 2026 the cycles-lite authors
# SPDX-License-Identifier: Apache-2.0
"""The local server as an all-day development server (issue 10), over real HTTP:
retention, indexed lists, atomic requests, connection hygiene, the admin API
subset, the health endpoint, the CLI and --state persistence.

Run: python3 -W error -m unittest test_cycles_lite_server_ops -v
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import cycles_lite_server
from cycles_lite_server import LocalCyclesServer

KEY = "key-acme"
OTHER_KEY = "key-other"
ADMIN_KEY = "admin-secret"
USD = "USD_MICROCENTS"
HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "cycles_lite_server.py")
DAY_MS = 86_400_000

Response = Tuple[int, Dict[str, str], Any]


def amount(value: int, unit: str = USD) -> Dict[str, Any]:
    return {"unit": unit, "amount": value}


def config(**overrides: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {
        "api_keys": {KEY: "acme", OTHER_KEY: "other"},
        "admin_keys": [ADMIN_KEY],
        "budgets": [
            {"scope": "tenant:acme", "unit": USD, "allocated": 1_000_000},
            {"scope": "tenant:other", "unit": USD, "allocated": 1_000_000},
        ],
    }
    base.update(overrides)
    return base


def call(srv: LocalCyclesServer, method: str, path: str, body: Any = None, *,
         key: Optional[str] = KEY, admin: Optional[str] = None, raw: Optional[bytes] = None
         ) -> Response:
    """One request on a fresh connection: (status, headers, parsed body)."""
    headers: Dict[str, str] = {}
    if key is not None:
        headers["X-Cycles-API-Key"] = key
    if admin is not None:
        headers["X-Admin-API-Key"] = admin
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                           else None)
    if payload is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        got = {name.lower(): value for name, value in response.getheaders()}
        return response.status, got, json.loads(data) if data else None
    finally:
        conn.close()


def admin_call(srv: LocalCyclesServer, method: str, path: str, body: Any = None,
               admin: Optional[str] = ADMIN_KEY, **kwargs: Any) -> Response:
    return call(srv, method, path, body, key=None, admin=admin, **kwargs)


def reserve_body(key: str, estimate: int = 100, **extra: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"idempotency_key": key, "subject": {"tenant": "acme"},
                            "action": {"kind": "llm", "name": "chat"},
                            "estimate": amount(estimate)}
    body.update(extra)
    return body


def event_body(key: str, actual: int = 10, **extra: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"idempotency_key": key, "subject": {"tenant": "acme"},
                            "action": {"kind": "llm", "name": "chat"},
                            "actual": amount(actual)}
    body.update(extra)
    return body


def nested(depth: int) -> Dict[str, Any]:
    value: Dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


class ServerCase(unittest.TestCase):
    settings: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.srv = LocalCyclesServer(**config(**self.settings)).start()
        self.addCleanup(self.srv.stop)
        self.srv.clock.freeze()

    def reserve(self, key: str, estimate: int = 100, **extra: Any) -> str:
        status, _, body = call(self.srv, "POST", "/v1/reservations",
                               reserve_body(key, estimate, **extra))
        self.assertEqual(status, 200, body)
        return str(body["reservation_id"])

    def commit(self, rid: str, key: str, actual: int = 100) -> Response:
        return call(self.srv, "POST", f"/v1/reservations/{rid}/commit",
                    {"idempotency_key": key, "actual": amount(actual)})

    def remaining(self, scope: str = "tenant:acme") -> int:
        return int(self.srv.balance(scope)["remaining"])


# =============================================================================
# 1. Bounded memory: retention and pruning, bounded request log
# =============================================================================


class TestRetention(ServerCase):
    settings = {"retention_s": 3600}

    def test_finalized_reservations_and_their_keys_are_pruned_after_retention(self) -> None:
        rid = self.reserve("r1")
        self.assertEqual(self.commit(rid, "c1")[0], 200)
        self.srv.clock.advance(3_599_000)
        self.assertEqual(call(self.srv, "GET", f"/v1/reservations/{rid}")[0], 200)
        self.assertEqual(self.commit(rid, "c1")[0], 200)  # replay still answered
        self.srv.clock.advance(2_000)
        status, _, body = call(self.srv, "GET", f"/v1/reservations/{rid}")
        self.assertEqual((status, body["error"]), (404, "NOT_FOUND"))
        self.assertIsNone(self.srv.reservation(rid))
        ledger = self.srv._ledger  # white box: nothing of the lifecycle is left
        self.assertEqual((len(ledger._reservations), len(ledger._idempotency)), (0, 0))
        self.assertEqual(ledger._by_tenant["acme"].all, [])
        self.srv.check_invariants()

    def test_expired_reservations_events_and_decisions_are_pruned(self) -> None:
        rid = self.reserve("r1", ttl_ms=1000)
        self.assertEqual(call(self.srv, "POST", "/v1/events", event_body("e1"))[0], 201)
        decide = reserve_body("d1")
        self.assertEqual(call(self.srv, "POST", "/v1/decide", decide)[0], 200)
        self.assertEqual(len(self.srv.events), 1)
        self.srv.clock.advance(10_000)  # expires (ttl + grace)
        self.assertEqual(call(self.srv, "GET", f"/v1/reservations/{rid}")[0], 410)
        self.srv.clock.advance(3_600_000)
        call(self.srv, "GET", "/v1/balances?tenant=acme")
        self.assertIsNone(self.srv.reservation(rid))
        self.assertEqual(self.srv.events, [])
        self.assertEqual(len(self.srv._ledger._idempotency), 0)
        self.assertEqual(self.remaining(), 1_000_000 - 10)

    def test_active_reservations_are_never_pruned(self) -> None:
        rid = self.reserve("r1", ttl_ms=3_600_000)
        for _ in range(3):
            self.assertEqual(call(self.srv, "POST", f"/v1/reservations/{rid}/extend",
                                  {"idempotency_key": f"x{_}", "extend_by_ms": 3_600_000})[0],
                             200)
            self.srv.clock.advance(3_000_000)
        self.assertEqual(call(self.srv, "GET", f"/v1/reservations/{rid}")[0], 200)
        self.assertEqual(self.commit(rid, "c1")[0], 200)

    def test_pruning_is_incremental_and_completes(self) -> None:
        count = cycles_lite_server._PRUNE_BATCH + 40
        for index in range(count):
            status = call(self.srv, "POST", "/v1/events", event_body(f"e{index}", 1))[0]
            self.assertEqual(status, 201)
        self.srv.clock.advance(3_601_000)
        call(self.srv, "GET", "/v1/balances?tenant=acme")
        self.assertGreater(len(self.srv.events), 0)  # one batch per request
        call(self.srv, "GET", "/v1/balances?tenant=acme")
        call(self.srv, "GET", "/v1/balances?tenant=acme")
        self.assertEqual(self.srv.events, [])

    def test_default_retention_is_a_day(self) -> None:
        with LocalCyclesServer(**config()) as srv:
            srv.clock.freeze()
            status, _, body = call(srv, "POST", "/v1/events", event_body("e1"))
            self.assertEqual(status, 201)
            srv.clock.advance(DAY_MS - 1000)
            self.assertEqual(call(srv, "POST", "/v1/events", event_body("e1"))[2], body)
            srv.clock.advance(2000)
            call(srv, "GET", "/v1/balances?tenant=acme")
            self.assertEqual(srv.events, [])


class TestRequestLog(ServerCase):
    settings = {"max_body_bytes": 1 << 20}

    def test_logged_bodies_are_truncated(self) -> None:
        big = reserve_body("big", metadata={"blob": "x" * 200_000})
        self.assertEqual(call(self.srv, "POST", "/v1/reservations", big)[0], 200)
        entry = self.srv.requests[-1]
        self.assertEqual(len(entry.raw_body), cycles_lite_server.MAX_LOGGED_BODY_BYTES)
        self.assertIsNone(entry.body)  # truncated: not JSON any more
        self.assertEqual(entry.response_body["decision"], "ALLOW")

    def test_log_line_shows_error_code_amounts_and_reservation(self) -> None:
        stream = io.StringIO()
        with LocalCyclesServer(**config(log_stream=stream)) as srv:
            status, _, body = call(srv, "POST", "/v1/reservations", reserve_body("r", 250))
            rid = body["reservation_id"]
            call(srv, "POST", f"/v1/reservations/{rid}/commit",
                 {"idempotency_key": "c", "actual": amount(200)})
            call(srv, "POST", "/v1/reservations", reserve_body("huge", 10**12))
        create, commit, denied = stream.getvalue().splitlines()
        self.assertIn(f"reservation={rid} estimate=250 {USD}", create)
        self.assertIn(f"reservation={rid} actual=200 {USD} charged=200 {USD} "
                      f"released=50 {USD}", commit)
        self.assertIn("409 op=create tenant=acme error=BUDGET_EXCEEDED", denied)


# =============================================================================
# 2. Cost independent of history: indexed list pages
# =============================================================================


class TestIndexedList(ServerCase):
    settings = {"retention_s": 3600}

    def page(self, query: str) -> Dict[str, Any]:
        status, _, body = call(self.srv, "GET", "/v1/reservations?" + query)
        self.assertEqual(status, 200, body)
        return dict(body)

    def walk(self, query: str) -> List[str]:
        seen: List[str] = []
        body = self.page(query)
        while True:
            seen.extend(row["reservation_id"] for row in body["reservations"])
            if not body["has_more"]:
                return seen
            body = self.page(query + "&cursor=" + body["next_cursor"])

    def test_pages_follow_creation_order_across_status_changes_and_pruning(self) -> None:
        rids = [self.reserve(f"r{i}", 10) for i in range(30)]
        for rid in rids[::3]:
            self.assertEqual(self.commit(rid, "c-" + rid, 10)[0], 200)
        self.assertEqual(self.walk("limit=7"), rids[::-1])
        self.assertEqual(self.walk("limit=4&sort_dir=asc"), rids)
        self.assertEqual(self.walk("limit=4&status=COMMITTED"), rids[::3][::-1])
        self.assertEqual(self.walk("limit=5&status=ACTIVE&sort_dir=asc"),
                         [r for i, r in enumerate(rids) if i % 3])
        first = self.page("limit=5&status=ACTIVE")
        self.srv.clock.advance(3_601_000 + 60_000)  # commits pruned, the rest expire
        call(self.srv, "GET", "/v1/balances?tenant=acme")
        rest = self.page("limit=5&status=ACTIVE&cursor=" + first["next_cursor"])
        self.assertEqual(rest["reservations"], [])
        self.assertEqual(len(self.walk("limit=50&status=EXPIRED")), 20)
        self.assertEqual(self.walk("limit=50&status=COMMITTED"), [])

    def test_other_sorts_and_filters_still_work(self) -> None:
        rids = [self.reserve(f"r{i}", 10 + i) for i in range(12)]
        self.assertEqual(self.walk("limit=5&sort_by=reserved&sort_dir=asc"), rids)
        self.assertEqual(self.walk("limit=5&idempotency_key=r3"), [rids[3]])

    def test_balances_pages_by_scope(self) -> None:
        for name in ("a", "b", "c", "d", "e"):
            self.srv.add_budget(f"tenant:acme/workspace:{name}", USD, 10)
        scopes: List[str] = []
        query = "/v1/balances?tenant=acme&limit=2"
        while True:
            status, _, body = call(self.srv, "GET", query)
            scopes.extend(row["scope_path"] for row in body["balances"])
            if not body["has_more"]:
                break
            query = "/v1/balances?tenant=acme&limit=2&cursor=" + body["next_cursor"]
        self.assertEqual(scopes, ["tenant:acme"] + [f"tenant:acme/workspace:{n}"
                                                   for n in "abcde"])


# =============================================================================
# 3. Atomic requests
# =============================================================================


class TestAtomicRequests(ServerCase):
    def test_json_nested_deeper_than_the_limit_is_400_and_changes_nothing(self) -> None:
        limit = cycles_lite_server.MAX_JSON_DEPTH
        rid = self.reserve("r1")
        before = self.srv.balance("tenant:acme")
        cases = [
            ("/v1/reservations", reserve_body("deep", metadata=nested(500))),
            ("/v1/events", event_body("deep", metadata=nested(500))),
            (f"/v1/reservations/{rid}/commit",
             {"idempotency_key": "deep", "actual": amount(5), "metadata": nested(limit)}),
        ]
        for path, body in cases:
            status, _, error = call(self.srv, "POST", path, body)
            self.assertEqual((status, error["error"]), (400, "INVALID_REQUEST"), path)
            self.assertIn(f"deeper than {limit} levels", error["message"])
        self.assertEqual(self.srv.balance("tenant:acme"), before)
        self.assertEqual(self.srv.reservation(rid)["status"], "ACTIVE")
        self.assertEqual(self.srv.events, [])
        fits = reserve_body("fits", metadata=nested(limit - 1))
        self.assertEqual(call(self.srv, "POST", "/v1/reservations", fits)[0], 200)

    def failing_once(self) -> Any:
        """Make the first balance snapshot after validation raise (a server bug)."""
        original = cycles_lite_server._Budget.snapshot
        calls = {"n": 0}

        def snapshot(budget: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure after the ledger changed")
            return original(budget)

        return mock.patch.object(cycles_lite_server._Budget, "snapshot", snapshot)

    def assert_fails_then_applies_once(self, path: str, body: Dict[str, Any],
                                       expected: int) -> Dict[str, Any]:
        before = self.srv.balance("tenant:acme")
        events = len(self.srv.events)
        with self.failing_once():
            status, _, error = call(self.srv, "POST", path, body)
        self.assertEqual((status, error["error"]), (500, "INTERNAL_ERROR"))
        self.assertEqual(self.srv.balance("tenant:acme"), before)
        self.assertEqual(len(self.srv.events), events)
        self.srv.check_invariants()
        status, _, first = call(self.srv, "POST", path, body)
        self.assertEqual(status, expected, first)
        status, _, again = call(self.srv, "POST", path, body)
        self.assertEqual((status, again), (expected, first))
        return dict(first)

    def test_a_failure_after_validation_leaves_the_ledger_unchanged(self) -> None:
        created = self.assert_fails_then_applies_once("/v1/reservations", reserve_body("r1", 777),
                                                      200)
        self.assertEqual(self.remaining(), 1_000_000 - 777)
        rows = call(self.srv, "GET", "/v1/reservations")[2]["reservations"]
        self.assertEqual([r["reservation_id"] for r in rows], [created["reservation_id"]])
        self.assert_fails_then_applies_once("/v1/events", event_body("e1", 50), 201)
        self.assertEqual(len(self.srv.events), 1)
        self.assertEqual(self.remaining(), 1_000_000 - 777 - 50)
        rid = created["reservation_id"]
        self.assert_fails_then_applies_once(
            f"/v1/reservations/{rid}/extend", {"idempotency_key": "x", "extend_by_ms": 1000}, 200)
        self.assert_fails_then_applies_once(
            f"/v1/reservations/{rid}/commit", {"idempotency_key": "c", "actual": amount(700)}, 200)
        self.assertEqual(self.srv.balance("tenant:acme")["spent"], 750)
        other = self.reserve("r2", 30)
        self.assert_fails_then_applies_once(
            f"/v1/reservations/{other}/release", {"idempotency_key": "rel"}, 200)
        self.assertEqual(self.remaining(), 1_000_000 - 750)
        self.srv.check_invariants()


# =============================================================================
# 4. Connection hygiene
# =============================================================================


def read_all(sock: socket.socket, deadline_s: float = 10.0) -> bytes:
    sock.settimeout(deadline_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class TestConnections(unittest.TestCase):
    def server(self, **settings: Any) -> LocalCyclesServer:
        srv = LocalCyclesServer(**config(**settings)).start()
        self.addCleanup(srv.stop)
        return srv

    def connect(self, srv: LocalCyclesServer) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def test_idle_connections_are_closed(self) -> None:
        srv = self.server(idle_timeout_s=0.2)
        sock = self.connect(srv)
        sock.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_all(sock)  # the answer, then the server closes the idle connection
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        self.assertIn(b'{"status":"UP"}', data)

    def test_a_request_slower_than_the_read_timeout_is_cut(self) -> None:
        srv = self.server(read_timeout_s=0.2)
        sock = self.connect(srv)
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        data = read_all(sock)
        self.assertNotIn(b"201", data)
        self.assertEqual(srv.events, [])

    def test_connections_over_the_cap_get_503_and_a_close(self) -> None:
        srv = self.server(max_connections=2)
        held = [self.connect(srv) for _ in range(2)]
        for sock in held:
            sock.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200", sock.recv(4096))
        extra = self.connect(srv)
        data = read_all(extra)
        self.assertTrue(data.startswith(b"HTTP/1.1 503"), data)
        self.assertIn(b"Connection: close", data)
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertIn("limit of 2 connections", body["message"])
        held[0].close()
        deadline = time.monotonic() + 10
        answer = b""
        while not answer.startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            time.sleep(0.05)  # the slot frees once the server sees the close
            sock = self.connect(srv)
            sock.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = read_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)

    def test_a_garbage_request_line_gets_an_http_400_with_json(self) -> None:
        srv = self.server()
        for line in (b"GARBAGE\r\n\r\n", b"GET /actuator/health\r\n\r\n",
                     b"GET / HTTP/9.x\r\n\r\n"):
            sock = self.connect(srv)
            sock.sendall(line)
            data = read_all(sock)
            self.assertTrue(data.startswith(b"HTTP/1.1 400 "), (line, data))
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertIn(b"Content-Type: application/json", head)
            self.assertEqual(json.loads(body)["error"], "INVALID_REQUEST")

    def test_port_in_use_and_unreadable_tls_files_exit_2_with_one_line(self) -> None:
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = str(blocker.getsockname()[1])
        for args, words in (
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
            (["--port", "0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"],
             "cannot load --tls-cert /nonexistent.pem"),
        ):
            done = subprocess.run([sys.executable, SERVER_SCRIPT, *args], capture_output=True,
                                  text=True, timeout=60)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
            self.assertIn(words, done.stderr)
            self.assertNotIn("Traceback", done.stderr)

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs RLIMIT_NOFILE semantics")
    def test_accept_failures_back_off_and_recover(self) -> None:
        import resource

        def low_fd_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))

        process = subprocess.Popen(
            [sys.executable, SERVER_SCRIPT, "--port", "0", "--idle-timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=low_fd_limit)
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.kill)
        assert process.stdout is not None and process.stderr is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1].split()[0])
        clients = []
        for _ in range(60):  # more connections than the server has descriptors
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1.0)
        for sock in clients:
            sock.close()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(read_all(sock, 20).startswith(b"HTTP/1.1 200"))
        sock.close()
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        failures = [line for line in out.splitlines() if "accept failed" in line]
        self.assertGreater(len(failures), 0)
        self.assertLess(len(failures), 200)  # backed off, not a busy loop


# =============================================================================
# 5. Operating it: health, admin API (operation by operation), CLI
# =============================================================================


class TestHealth(ServerCase):
    def test_health_answers_up_without_a_key(self) -> None:
        status, _, body = call(self.srv, "GET", "/actuator/health", key=None)
        self.assertEqual((status, body), (200, {"status": "UP"}))


class AdminCase(ServerCase):
    def assertError(self, response: Response, status: int, code: str) -> None:
        self.assertEqual((response[0], (response[2] or {}).get("error")), (status, code),
                         response[2])

    def assertUnauthorized(self, method: str, path: str, body: Any = None) -> None:
        self.assertError(admin_call(self.srv, method, path, body, admin=None), 401,
                         "UNAUTHORIZED")
        self.assertError(admin_call(self.srv, method, path, body, admin="wrong"), 401,
                         "UNAUTHORIZED")


class TestAdminTenants(AdminCase):
    def test_create_tenant(self) -> None:
        body = {"tenant_id": "dev-team", "name": "Dev team", "default_reservation_ttl_ms": 5000}
        status, _, tenant = admin_call(self.srv, "POST", "/v1/admin/tenants", body)
        self.assertEqual(status, 201)
        self.assertEqual((tenant["tenant_id"], tenant["name"], tenant["status"],
                          tenant["default_reservation_ttl_ms"]),
                         ("dev-team", "Dev team", "ACTIVE", 5000))
        self.assertTrue(tenant["created_at"].endswith("Z"))
        status, _, again = admin_call(self.srv, "POST", "/v1/admin/tenants", body)
        self.assertEqual((status, again), (200, tenant))
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/tenants",
                                    {"tenant_id": "dev-team", "name": "Other"}),
                         409, "DUPLICATE_RESOURCE")
        for bad in ({"tenant_id": "Dev_Team", "name": "x"}, {"tenant_id": "ab", "name": "x"},
                    {"name": "x"}, {"tenant_id": "abc", "name": "x", "bogus": 1},
                    {"tenant_id": "abc", "name": "x", "default_reservation_ttl_ms": 1}):
            self.assertError(admin_call(self.srv, "POST", "/v1/admin/tenants", bad),
                             400, "INVALID_REQUEST")
        self.assertUnauthorized("POST", "/v1/admin/tenants", body)
        self.assertError(call(self.srv, "POST", "/v1/admin/tenants", body), 401, "UNAUTHORIZED")

    def test_get_and_list_tenants(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            admin_call(self.srv, "POST", "/v1/admin/tenants",
                       {"tenant_id": name, "name": name.title()})
        self.srv.set_tenant_status("beta", "SUSPENDED")
        status, _, tenant = admin_call(self.srv, "GET", "/v1/admin/tenants/alpha")
        self.assertEqual((status, tenant["name"]), (200, "Alpha"))
        self.assertError(admin_call(self.srv, "GET", "/v1/admin/tenants/nobody"),
                         404, "TENANT_NOT_FOUND")
        self.assertUnauthorized("GET", "/v1/admin/tenants/alpha")
        status, _, page = admin_call(self.srv, "GET",
                                     "/v1/admin/tenants?sort_by=tenant_id&sort_dir=asc&limit=2")
        self.assertEqual(status, 200)
        self.assertEqual([t["tenant_id"] for t in page["tenants"]], ["acme", "alpha"])
        self.assertTrue(page["has_more"])
        status, _, rest = admin_call(
            self.srv, "GET", "/v1/admin/tenants?sort_by=tenant_id&sort_dir=asc&limit=2&cursor="
            + page["next_cursor"])
        self.assertEqual([t["tenant_id"] for t in rest["tenants"]], ["beta", "gamma"])
        status, _, suspended = admin_call(self.srv, "GET", "/v1/admin/tenants?status=SUSPENDED")
        self.assertEqual([t["tenant_id"] for t in suspended["tenants"]], ["beta"])
        status, _, found = admin_call(self.srv, "GET", "/v1/admin/tenants?search=AMM")
        self.assertEqual([t["tenant_id"] for t in found["tenants"]], ["gamma"])
        for query in ("status=GONE", "limit=0", "limit=101", "search=" + "x" * 129,
                      "sort_by=size", "cursor=garbage"):
            self.assertError(admin_call(self.srv, "GET", "/v1/admin/tenants?" + query),
                             400, "INVALID_REQUEST")
        self.assertUnauthorized("GET", "/v1/admin/tenants")
        self.assertEqual(admin_call(self.srv, "DELETE", "/v1/admin/tenants")[0], 405)


class TestAdminBudgets(AdminCase):
    def create(self, body: Dict[str, Any], **kwargs: Any) -> Response:
        if "key" in kwargs:
            return call(self.srv, "POST", "/v1/admin/budgets", body, **kwargs)
        return admin_call(self.srv, "POST", "/v1/admin/budgets", body)

    def test_create_budget(self) -> None:
        body = {"tenant_id": "acme", "scope": "tenant:acme/workspace:Dev", "unit": USD,
                "allocated": amount(5000), "overdraft_limit": amount(100),
                "commit_overage_policy": "REJECT"}
        status, _, ledger = self.create(body)
        self.assertEqual(status, 201, ledger)
        self.assertEqual((ledger["scope"], ledger["tenant_id"], ledger["allocated"],
                          ledger["remaining"], ledger["debt"], ledger["status"]),
                         ("tenant:acme/workspace:dev", "acme", amount(5000), amount(5000),
                          amount(0), "ACTIVE"))
        self.assertError(self.create(body), 409, "DUPLICATE_RESOURCE")
        own = {"scope": "tenant:acme/workspace:ops", "unit": USD, "allocated": amount(10)}
        self.assertEqual(self.create(own, key=KEY)[0], 201)
        self.assertError(self.create(dict(own, tenant_id="acme"), key=KEY), 400,
                         "INVALID_REQUEST")
        self.assertError(self.create({"scope": "tenant:other/workspace:x", "unit": USD,
                                      "allocated": amount(1)}, key=KEY), 403, "FORBIDDEN")
        self.assertError(self.create(dict(own, scope="tenant:acme/workspace:x")), 400,
                         "INVALID_REQUEST")  # admin without tenant_id
        self.assertError(self.create({"tenant_id": "ghost", "scope": "tenant:ghost",
                                      "unit": USD, "allocated": amount(1)}), 400,
                         "TENANT_NOT_FOUND")
        self.assertError(self.create({"tenant_id": "acme", "scope": "workspace:x", "unit": USD,
                                      "allocated": amount(1)}), 400, "INVALID_REQUEST")
        self.assertError(self.create({"tenant_id": "acme", "scope": "tenant:acme/app:x",
                                      "unit": USD, "allocated": amount(1, "TOKENS")}),
                         400, "UNIT_MISMATCH")
        self.srv.set_tenant_status("other", "CLOSED")
        self.assertError(self.create({"tenant_id": "other", "scope": "tenant:other/app:x",
                                      "unit": USD, "allocated": amount(1)}), 409,
                         "TENANT_CLOSED")
        self.assertUnauthorized("POST", "/v1/admin/budgets", body)
        self.assertError(self.create(own, key="bogus"), 401, "UNAUTHORIZED")
        # the new budget takes part in reservations at once, with its policy
        rid = self.reserve("r1", 100, subject={"tenant": "acme", "workspace": "dev"})
        status, _, error = self.commit(rid, "c1", 150)
        self.assertEqual((status, error["error"]), (409, "BUDGET_EXCEEDED"))

    def test_list_and_lookup_budgets(self) -> None:
        self.srv.add_budget("tenant:acme/workspace:a", USD, 100, spent=90)
        self.srv.add_budget("tenant:acme/workspace:b", USD, 100, debt=5, overdraft_limit=10)
        status, _, page = admin_call(self.srv, "GET", "/v1/admin/budgets")
        self.assertEqual(status, 200)
        self.assertEqual(len(page["ledgers"]), 4)  # every tenant without tenant_id
        status, _, mine = call(self.srv, "GET", "/v1/admin/budgets?tenant_id=other")
        self.assertEqual({row["tenant_id"] for row in mine["ledgers"]}, {"acme"})
        queries = {
            "tenant_id=acme&has_debt=true": ["tenant:acme/workspace:b"],
            "tenant_id=acme&utilization_min=0.5": ["tenant:acme/workspace:a"],
            "scope_prefix=tenant:acme/workspace&sort_by=scope&sort_dir=asc":
                ["tenant:acme/workspace:a", "tenant:acme/workspace:b"],
            "tenant_id=other&status=ACTIVE": ["tenant:other"],
        }
        for query, scopes in queries.items():
            status, _, body = admin_call(self.srv, "GET", "/v1/admin/budgets?" + query)
            self.assertEqual([row["scope"] for row in body["ledgers"]], scopes, query)
        for query in ("utilization_min=0.9&utilization_max=0.1", "utilization_min=2",
                      "over_limit=yes", "unit=EUR", "status=OPEN"):
            self.assertError(admin_call(self.srv, "GET", "/v1/admin/budgets?" + query),
                             400, "INVALID_REQUEST")
        self.assertUnauthorized("GET", "/v1/admin/budgets")
        lookup = "/v1/admin/budgets/lookup?scope=tenant:acme/workspace:a&unit=" + USD
        status, _, ledger = admin_call(self.srv, "GET", lookup)
        self.assertEqual((status, ledger["spent"]), (200, amount(90)))
        self.assertEqual(call(self.srv, "GET", lookup)[0], 200)
        self.assertError(call(self.srv, "GET", lookup, key=OTHER_KEY), 403, "FORBIDDEN")
        self.assertError(admin_call(self.srv, "GET", lookup.replace(":a", ":zz")), 404,
                         "BUDGET_NOT_FOUND")
        self.assertError(admin_call(self.srv, "GET", "/v1/admin/budgets/lookup?scope=tenant:acme"),
                         400, "INVALID_REQUEST")
        self.assertUnauthorized("GET", lookup)

    def fund(self, operation: str, value: int, tenant: str = "acme", **extra: Any) -> Response:
        path = f"/v1/admin/budgets/fund?tenant_id={tenant}&scope=tenant:acme&unit={USD}"
        return admin_call(self.srv, "POST", path,
                          dict({"operation": operation, "amount": amount(value)}, **extra))

    def test_fund_budget(self) -> None:
        rid = self.reserve("r1", 1000)
        status, _, body = self.fund("CREDIT", 500, idempotency_key="top-up-1")
        self.assertEqual(status, 200, body)
        self.assertEqual((body["operation"], body["previous_allocated"], body["new_allocated"],
                          body["previous_remaining"], body["new_remaining"]),
                         ("CREDIT", amount(1_000_000), amount(1_000_500), amount(999_000),
                          amount(999_500)))
        self.assertEqual(self.fund("CREDIT", 500, idempotency_key="top-up-1")[2], body)
        self.assertEqual(self.srv.balance("tenant:acme")["allocated"], 1_000_500)
        self.assertError(self.fund("CREDIT", 7, idempotency_key="top-up-1"), 409,
                         "IDEMPOTENCY_MISMATCH")
        self.assertEqual(self.fund("DEBIT", 500)[2]["new_allocated"], amount(1_000_000))
        self.assertError(self.fund("DEBIT", 10**9), 409, "BUDGET_EXCEEDED")
        body = self.fund("RESET", 2000)[2]
        self.assertEqual((body["new_allocated"], body["new_remaining"]), (amount(2000),
                                                                        amount(1000)))
        self.assertEqual(self.commit(rid, "c1", 1000)[0], 200)
        body = self.fund("RESET_SPENT", 3000)[2]
        self.assertEqual((body["previous_spent"], body["new_spent"], body["new_remaining"]),
                         (amount(1000), amount(0), amount(3000)))
        self.srv.set_budget("tenant:acme", debt=300, overdraft_limit=500)
        body = self.fund("REPAY_DEBT", 200)[2]
        self.assertEqual((body["previous_debt"], body["new_debt"]), (amount(300), amount(100)))
        self.srv.check_invariants()
        path = f"/v1/admin/budgets/fund?scope=tenant:acme&unit={USD}"
        status, _, own = call(self.srv, "POST", path, {"operation": "CREDIT",
                                                        "amount": amount(1)})
        self.assertEqual(status, 200, own)
        self.assertError(call(self.srv, "POST", path, {"operation": "CREDIT",
                                                       "amount": amount(1)}, key=OTHER_KEY),
                         403, "FORBIDDEN")
        self.assertError(admin_call(self.srv, "POST", path, {"operation": "CREDIT",
                                                             "amount": amount(1)}),
                         400, "INVALID_REQUEST")  # admin without tenant_id
        self.assertError(self.fund("CREDIT", 1, tenant="other"), 404, "BUDGET_NOT_FOUND")
        self.assertError(self.fund("GIFT", 1), 400, "INVALID_REQUEST")
        self.assertError(admin_call(self.srv, "POST", path.replace("tenant:acme", "tenant:zz")
                                    + "&tenant_id=zz", {"operation": "CREDIT",
                                                        "amount": amount(1)}),
                         404, "BUDGET_NOT_FOUND")
        self.srv.set_budget("tenant:acme", status="FROZEN")
        self.assertError(self.fund("CREDIT", 1), 409, "BUDGET_FROZEN")
        self.assertUnauthorized("POST", path + "&tenant_id=acme",
                                {"operation": "CREDIT", "amount": amount(1)})

    def test_freeze_and_unfreeze(self) -> None:
        path = f"?scope=tenant:acme&unit={USD}"
        status, _, ledger = admin_call(self.srv, "POST", "/v1/admin/budgets/freeze" + path,
                                       {"reason": "runaway agent"})
        self.assertEqual((status, ledger["status"]), (200, "FROZEN"))
        status, _, error = call(self.srv, "POST", "/v1/reservations", reserve_body("r1"))
        self.assertEqual((status, error["error"]), (409, "BUDGET_FROZEN"))
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/budgets/freeze" + path),
                         409, "BUDGET_FROZEN")
        status, _, ledger = admin_call(self.srv, "POST", "/v1/admin/budgets/unfreeze" + path)
        self.assertEqual((status, ledger["status"]), (200, "ACTIVE"))
        self.reserve("r1")
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/budgets/unfreeze" + path),
                         409, "INVALID_REQUEST")
        self.srv.set_budget("tenant:acme", status="CLOSED")
        for action in ("freeze", "unfreeze"):
            self.assertError(admin_call(self.srv, "POST", f"/v1/admin/budgets/{action}" + path),
                             409, "BUDGET_CLOSED")
            missing = f"/v1/admin/budgets/{action}?scope=tenant:nobody&unit={USD}"
            self.assertError(admin_call(self.srv, "POST", missing), 404, "BUDGET_NOT_FOUND")
            self.assertError(admin_call(self.srv, "POST", f"/v1/admin/budgets/{action}" + path,
                                        {"bogus": 1}), 400, "INVALID_REQUEST")
            self.assertUnauthorized("POST", f"/v1/admin/budgets/{action}" + path)
            # freeze/unfreeze are admin-only: an API key is not enough
            self.assertError(call(self.srv, "POST", f"/v1/admin/budgets/{action}" + path),
                             401, "UNAUTHORIZED")


class TestAdminApiKeys(AdminCase):
    def test_create_use_list_and_revoke_a_key(self) -> None:
        status, _, created = admin_call(self.srv, "POST", "/v1/admin/api-keys",
                                        {"tenant_id": "acme", "name": "laptop"})
        self.assertEqual(status, 201, created)
        secret = created["key_secret"]
        self.assertTrue(secret.startswith("cyc_test_") and len(secret) == 41)
        self.assertTrue(secret.startswith(created["key_prefix"]))
        logged = b"".join(r.response_raw + r.raw_body for r in self.srv.requests)
        self.assertNotIn(secret.encode(), logged)
        self.assertIn("reservations:create", created["permissions"])
        status, _, body = call(self.srv, "POST", "/v1/reservations", reserve_body("r1"),
                               key=secret)
        self.assertEqual(status, 200, body)
        status, _, listed = admin_call(self.srv, "GET", "/v1/admin/api-keys?tenant_id=acme")
        self.assertEqual(status, 200)
        names = {key["name"]: key for key in listed["keys"]}
        self.assertEqual(names["laptop"]["key_id"], created["key_id"])
        self.assertNotIn(secret, json.dumps(listed))
        self.assertNotIn(KEY, json.dumps(listed))
        revoke = f"/v1/admin/api-keys/{created['key_id']}?reason=lost"
        status, _, revoked = admin_call(self.srv, "DELETE", revoke)
        self.assertEqual((status, revoked["status"], revoked["revoked_reason"]),
                         (200, "REVOKED", "lost"))
        self.assertError(call(self.srv, "POST", "/v1/reservations", reserve_body("r2"),
                              key=secret), 401, "UNAUTHORIZED")
        self.assertError(admin_call(self.srv, "DELETE", revoke), 409, "KEY_REVOKED")
        self.assertError(admin_call(self.srv, "DELETE", "/v1/admin/api-keys/nope"), 404,
                         "NOT_FOUND")
        status, _, active = admin_call(self.srv, "GET", "/v1/admin/api-keys?status=REVOKED")
        self.assertEqual([k["key_id"] for k in active["keys"]], [created["key_id"]])
        self.assertUnauthorized("DELETE", revoke)

    def test_create_and_list_errors(self) -> None:
        bad_bodies = ({"tenant_id": "acme"}, {"tenant_id": "acme", "name": "x",
                                               "permissions": ["root"]},
                      {"tenant_id": "acme", "name": "x", "expires_at": "tomorrow"})
        for body in bad_bodies:
            self.assertError(admin_call(self.srv, "POST", "/v1/admin/api-keys", body), 400,
                             "INVALID_REQUEST")
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/api-keys",
                                    {"tenant_id": "ghost", "name": "x"}), 400,
                         "TENANT_NOT_FOUND")
        self.srv.set_tenant_status("other", "CLOSED")
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/api-keys",
                                    {"tenant_id": "other", "name": "x"}), 409, "TENANT_CLOSED")
        self.assertUnauthorized("POST", "/v1/admin/api-keys", {"tenant_id": "acme", "name": "x"})
        self.assertError(admin_call(self.srv, "GET", "/v1/admin/api-keys?status=LOST"), 400,
                         "INVALID_REQUEST")
        self.assertUnauthorized("GET", "/v1/admin/api-keys")
        past = {"tenant_id": "acme", "name": "old", "expires_at": "2001-01-01T00:00:00Z"}
        self.assertError(admin_call(self.srv, "POST", "/v1/admin/api-keys", past), 400,
                         "INVALID_REQUEST")
        soon = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                             time.gmtime(self.srv.clock.now_ms() // 1000 + 2))
        short = {"tenant_id": "acme", "name": "old", "expires_at": soon}
        secret = admin_call(self.srv, "POST", "/v1/admin/api-keys", short)[2]["key_secret"]
        self.srv.clock.advance(3000)
        self.assertError(call(self.srv, "GET", "/v1/balances?tenant=acme", key=secret), 401,
                         "UNAUTHORIZED")
        expired = admin_call(self.srv, "GET", "/v1/admin/api-keys?status=EXPIRED")[2]["keys"]
        self.assertEqual([k["name"] for k in expired], ["old"])


class TestCli(unittest.TestCase):
    def run_cli(self, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run([sys.executable, SERVER_SCRIPT, *args], capture_output=True,
                              text=True, timeout=60)

    def test_values_outside_the_spec_ranges_are_refused(self) -> None:
        for args, words in ((["--default-ttl-ms", "1"], "default_ttl_ms must be between 1000"),
                            (["--grace-ms", "60001"], "default_grace_ms must be between 0"),
                            (["--tenant", "acme,max_ttl_ms=5"], "max_ttl_ms must be between"),
                            (["--budget", "tenant:acme=USD_MICROCENTS:5,status=OPEN"],
                             "bad option 'status=OPEN'"),
                            (["--retention", "0"], "retention_s must be a positive number"),
                            (["--port", "70000"], "--port must be between 0 and 65535"),
                            (["--port", "-1"], "--port must be between 0 and 65535")):
            done = self.run_cli("--port", "0", *args)
            self.assertEqual(done.returncode, 2, (args, done.stderr))
            self.assertIn(words, done.stderr)

    def test_flags_cover_the_config_file_settings(self) -> None:
        built = cycles_lite_server._build_from_cli(
            ["--port", "0", "--tenant", "acme=SUSPENDED,default_ttl_ms=2000",
             "--budget", 'tenant:acme=TOKENS:500,overdraft_limit=50,status=FROZEN,'
                         'caps={"max_tokens":10,"tool_denylist":["a","b"]}',
             "--default-overage-policy", "REJECT", "--retention", "60",
             "--max-connections", "7", "--idle-timeout", "5", "--read-timeout", "2"],
            io.StringIO())
        state = built.balance("tenant:acme", "TOKENS")
        self.assertEqual((state["overdraft_limit"], state["status"], state["caps"]),
                         (50, "FROZEN", {"max_tokens": 10, "tool_denylist": ["a", "b"]}))
        self.assertEqual((built._max_connections, built._idle_timeout_s,
                          built._read_timeout_s, built._ledger._retention_ms),
                         (7, 5.0, 2.0, 60_000))
        help_text = self.run_cli("--help").stdout
        for flag in ("--state", "--retention", "--idle-timeout", "--read-timeout",
                     "--max-connections", "--admin-key", "--default-overage-policy",
                     "overdraft_limit=N", "caps=JSON"):
            self.assertIn(flag, help_text)


# =============================================================================
# 6. Persistence (--state)
# =============================================================================


class TestState(unittest.TestCase):
    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = folder.name
        self.path = os.path.join(folder.name, "state.json")

    def test_a_restart_brings_back_everything_and_replays_keys(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path)) as srv:
            srv.clock.freeze()
            created = admin_call(srv, "POST", "/v1/admin/api-keys",
                                 {"tenant_id": "acme", "name": "laptop"})[2]
            admin_call(srv, "POST", "/v1/admin/tenants", {"tenant_id": "dev", "name": "Dev"})
            admin_call(srv, "POST", "/v1/admin/budgets",
                       {"tenant_id": "dev", "scope": "tenant:dev", "unit": USD,
                        "allocated": amount(50)})
            event = call(srv, "POST", "/v1/events", event_body("e1", 10))
            reserve = call(srv, "POST", "/v1/reservations", reserve_body("r1", 100))
            rid = reserve[2]["reservation_id"]
            done = call(srv, "POST", "/v1/reservations", reserve_body("r2", 30))
            commit = call(srv, "POST", f"/v1/reservations/{done[2]['reservation_id']}/commit",
                          {"idempotency_key": "c2", "actual": amount(20)})
            before = srv.balance("tenant:acme")
            stopped_at = srv.clock.now_ms()
        self.assertEqual([n for n in os.listdir(self.folder)], ["state.json"])
        with LocalCyclesServer(state_file=self.path, admin_keys=[ADMIN_KEY]) as srv:
            self.assertGreaterEqual(srv.clock.now_ms(), stopped_at)
            self.assertEqual(srv.balance("tenant:acme"), before)
            self.assertEqual(call(srv, "POST", "/v1/events", event_body("e1", 10))[2], event[2])
            replay = call(srv, "POST", "/v1/reservations", reserve_body("r1", 100))
            self.assertEqual(replay[2]["reservation_id"], rid)
            self.assertEqual(call(srv, "POST",
                                  f"/v1/reservations/{done[2]['reservation_id']}/commit",
                                  {"idempotency_key": "c2", "actual": amount(20)})[2], commit[2])
            self.assertEqual(srv.balance("tenant:acme"), before)  # nothing charged twice
            self.assertEqual(call(srv, "GET", "/v1/balances?tenant=acme",
                                  key=created["key_secret"])[0], 200)
            self.assertEqual(call(srv, "GET", "/v1/balances?tenant=acme", key=KEY)[0], 200)
            self.assertEqual(admin_call(srv, "GET", "/v1/admin/tenants/dev")[2]["name"], "Dev")
            self.assertEqual(srv.balance("tenant:dev")["allocated"], 50)
            self.assertEqual(len(srv.events), 1)
            srv.check_invariants()
        with open(self.path, encoding="utf-8") as handle:
            saved = handle.read()
        for secret in (KEY, OTHER_KEY, ADMIN_KEY, created["key_secret"]):
            self.assertNotIn(secret, saved)

    def test_expiry_after_a_restart_follows_the_stored_times(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path)) as srv:
            srv.clock.freeze()
            rid = call(srv, "POST", "/v1/reservations",
                       reserve_body("r1", 100, ttl_ms=60_000, grace_period_ms=0))[2]
            rid = rid["reservation_id"]
            srv.clock.advance(30_000)
        with LocalCyclesServer(state_file=self.path) as srv:
            srv.clock.freeze()
            self.assertEqual(srv.reservation(rid)["status"], "ACTIVE")
            self.assertEqual(srv.balance("tenant:acme")["reserved"], 100)
            srv.clock.advance(31_000)
            self.assertEqual(call(srv, "GET", f"/v1/reservations/{rid}")[0], 410)
            self.assertEqual(srv.balance("tenant:acme")["reserved"], 0)

    def test_seeds_fill_in_only_what_the_state_lacks(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path)) as srv:
            call(srv, "POST", "/v1/events", event_body("e1", 10))
        budgets = config()["budgets"] + [{"scope": "tenant:acme/app:new", "allocated": 5}]
        with LocalCyclesServer(**config(state_file=self.path, budgets=budgets)) as srv:
            self.assertEqual(srv.balance("tenant:acme")["spent"], 10)
            self.assertEqual(srv.balance("tenant:acme/app:new")["allocated"], 5)

    def test_periodic_saves_while_running(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path, state_interval_s=0.05)) as srv:
            call(srv, "POST", "/v1/events", event_body("e1", 10))
            deadline = time.monotonic() + 10
            while not os.path.exists(self.path) and time.monotonic() < deadline:
                time.sleep(0.02)
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
            self.assertEqual(document["format"], "cycles-lite-server-state")
            self.assertEqual(set(document["sections"]) >= {"ledger", "clock"}, True)

    def test_unknown_sections_are_kept(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path)):
            pass
        with open(self.path, encoding="utf-8") as handle:
            document = json.load(handle)
        document["sections"]["keyring"] = {"kid": "k1"}
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
        with LocalCyclesServer(state_file=self.path):
            pass
        with open(self.path, encoding="utf-8") as handle:
            self.assertEqual(json.load(handle)["sections"]["keyring"], {"kid": "k1"})

    def test_a_corrupt_or_unreadable_file_is_refused_and_left_as_it_was(self) -> None:
        with LocalCyclesServer(**config(state_file=self.path)) as srv:
            call(srv, "POST", "/v1/events", event_body("e1", 10))
        with open(self.path, "rb") as handle:
            good = handle.read()
        corruptions = [b"{not json", good[: len(good) // 2], b'{"format":"other"}',
                       good.replace(b'"spent":10', b'"spent":11')]
        for corrupt in corruptions:
            with open(self.path, "wb") as handle:
                handle.write(corrupt)
            done = subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "0", "--state",
                                   self.path], capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(self.path, done.stderr)
            self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
            with open(self.path, "rb") as handle:
                self.assertEqual(handle.read(), corrupt)
        if os.geteuid() != 0:
            os.chmod(self.path, 0)
            done = subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "0", "--state",
                                   self.path], capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn("cannot read it", done.stderr)

    def test_the_cli_saves_at_shutdown_and_restores(self) -> None:
        args = [sys.executable, SERVER_SCRIPT, "--port", "0", "--state", self.path,
                "--admin-key", ADMIN_KEY, "--api-key", f"{KEY}=acme",
                "--budget", "tenant:acme=USD_MICROCENTS:1000"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1].split()[0])
        srv = mock.Mock(port=port)
        path = f"/v1/admin/budgets/fund?tenant_id=acme&scope=tenant:acme&unit={USD}"
        self.assertEqual(admin_call(srv, "POST", path, {"operation": "CREDIT",
                                                        "amount": amount(500)})[0], 200)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0)
        process = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--port", "0", "--state",
                                    self.path], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1].split()[0])
        try:
            status, _, body = call(mock.Mock(port=port), "GET", "/v1/balances?tenant=acme")
            self.assertEqual((status, body["balances"][0]["allocated"]), (200, amount(1500)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)


if __name__ == "__main__":
    unittest.main()
