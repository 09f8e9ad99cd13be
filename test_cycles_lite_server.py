# Copyright 2026 the cycles-lite authors
# SPDX-License-Identifier: Apache-2.0
"""Tests for cycles_lite_server, over real HTTP with the stdlib http.client.

Run: python3 -W error -m unittest test_cycles_lite_server -v
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlencode

from cycles_lite_server import LocalCyclesServer

KEY = "key-acme"
OTHER_KEY = "key-other"
ADMIN_KEY = "admin-secret"
USD = "USD_MICROCENTS"
TOKENS = "TOKENS"
HERE = os.path.dirname(os.path.abspath(__file__))
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TRACE_RE = re.compile(r"[0-9a-f]{32}")
_DEFAULT = object()

Response = Tuple[int, Dict[str, str], Any]


def amount(value: int, unit: str = USD) -> Dict[str, Any]:
    return {"unit": unit, "amount": value}


def iso(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000.0, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")


class Http:
    """One kept-alive connection; request() returns (status, headers, body)."""

    def __init__(self, srv: LocalCyclesServer, api_key: Optional[str] = KEY,
                 timeout: float = 5.0) -> None:
        self.api_key = api_key
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, api_key: Any = _DEFAULT,
                headers: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None
                ) -> Response:
        sent: Dict[str, str] = {}
        key = self.api_key if api_key is _DEFAULT else api_key
        if key is not None:
            sent["X-Cycles-API-Key"] = key
        payload = raw
        if body is not None:
            payload = json.dumps(body).encode()
        if payload is not None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        self.conn.request(method, path, body=payload, headers=sent)
        response = self.conn.getresponse()
        data = response.read()
        got = {name.lower(): value for name, value in response.getheaders()}
        try:
            parsed: Any = json.loads(data) if data else None
        except ValueError:
            parsed = data
        return response.status, got, parsed

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def close(self) -> None:
        self.conn.close()


def base_config(**overrides: Any) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "api_keys": {KEY: "acme", OTHER_KEY: "other"},
        "admin_keys": [ADMIN_KEY],
        "tenants": {"acme": "ACTIVE", "other": "ACTIVE"},
        "budgets": [
            {"scope": "tenant:acme", "unit": USD, "allocated": 1_000_000},
            {"scope": "tenant:other", "unit": USD, "allocated": 1_000_000},
        ],
    }
    config.update(overrides)
    return config


class ServerTest(unittest.TestCase):
    """A fresh server per test, with a frozen clock and one client connection."""

    config: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.srv = LocalCyclesServer(**base_config(**self.config)).start()
        self.addCleanup(self.srv.stop)
        self.addCleanup(self.srv.check_invariants)
        self.t0 = self.srv.clock.freeze()
        self.http = Http(self.srv)
        self.addCleanup(self.http.close)
        self._keys = 0

    # -- helpers ---------------------------------------------------------------

    def key(self) -> str:
        self._keys += 1
        return f"{self.id().rsplit('.', 1)[-1]}-{self._keys}"

    def client(self, api_key: Optional[str] = KEY) -> Http:
        extra = Http(self.srv, api_key)
        self.addCleanup(extra.close)
        return extra

    def reserve_body(self, value: int = 100, subject: Optional[Dict[str, Any]] = None,
                     key: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        body = {
            "idempotency_key": key or self.key(),
            "subject": subject if subject is not None else {"tenant": "acme"},
            "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
            "estimate": amount(value, fields.pop("unit", USD)),
        }
        body.update(fields)
        return body

    def reserve(self, value: int = 100, **fields: Any) -> Dict[str, Any]:
        status, _, body = self.http.post("/v1/reservations", self.reserve_body(value, **fields))
        self.assertEqual(status, 200, body)
        result: Dict[str, Any] = body
        return result

    def commit(self, rid: str, actual: int, key: Optional[str] = None, unit: str = USD,
               http: Optional[Http] = None, **fields: Any) -> Response:
        body = {"idempotency_key": key or self.key(), "actual": amount(actual, unit)}
        body.update(fields)
        return (http or self.http).post(f"/v1/reservations/{rid}/commit", body)

    def release(self, rid: str, key: Optional[str] = None, http: Optional[Http] = None,
                **fields: Any) -> Response:
        body = {"idempotency_key": key or self.key()}
        body.update(fields)
        return (http or self.http).post(f"/v1/reservations/{rid}/release", body)

    def extend(self, rid: str, by_ms: int, key: Optional[str] = None) -> Response:
        body = {"idempotency_key": key or self.key(), "extend_by_ms": by_ms}
        return self.http.post(f"/v1/reservations/{rid}/extend", body)

    def decide(self, value: int = 100, **fields: Any) -> Response:
        body = self.reserve_body(value, **fields)
        return self.http.post("/v1/decide", body)

    def event_body(self, value: int, subject: Optional[Dict[str, Any]] = None,
                   **fields: Any) -> Dict[str, Any]:
        body = {
            "idempotency_key": fields.pop("key", None) or self.key(),
            "subject": subject or {"tenant": "acme"},
            "action": {"kind": "tool.search", "name": "web.search"},
            "actual": amount(value, fields.pop("unit", USD)),
        }
        body.update(fields)
        return body

    def event(self, value: int, **fields: Any) -> Response:
        return self.http.post("/v1/events", self.event_body(value, **fields))

    def assert_error(self, response: Response, status: int, code: str) -> Dict[str, Any]:
        got_status, headers, body = response
        self.assertEqual((got_status, body.get("error") if isinstance(body, dict) else body),
                         (status, code), body)
        self.assertEqual(set(body) - {"details"}, {"error", "message", "request_id", "trace_id"})
        self.assertEqual(body["request_id"], headers["x-request-id"])
        self.assertEqual(body["trace_id"], headers["x-cycles-trace-id"])
        result: Dict[str, Any] = body
        return result

    def remaining(self, scope: str = "tenant:acme", unit: str = USD) -> int:
        value: int = self.srv.balance(scope, unit)["remaining"]
        return value


# =============================================================================
# Transport, headers, tracing
# =============================================================================


class TestHeadersAndTransport(ServerTest):
    def test_every_response_carries_ids_and_rate_limit_headers(self) -> None:
        for response in (
            self.http.post("/v1/reservations", self.reserve_body()),
            self.http.get("/v1/balances?tenant=acme"),
            self.http.get("/v1/balances?tenant=acme", api_key=None),
            self.http.get("/v1/nope"),
        ):
            _, headers, _ = response
            self.assertTrue(UUID_RE.fullmatch(headers["x-request-id"]))
            self.assertTrue(TRACE_RE.fullmatch(headers["x-cycles-trace-id"]))
            self.assertEqual(headers["x-ratelimit-remaining"], "-1")
            self.assertEqual(headers["x-ratelimit-reset"], "0")
            self.assertEqual(headers["content-type"], "application/json")

    def test_request_ids_are_unique(self) -> None:
        ids = {self.http.get("/v1/balances?tenant=acme")[1]["x-request-id"] for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_tenant_header_only_once_authenticated(self) -> None:
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[1]["x-cycles-tenant"], "acme")
        forbidden = self.http.get("/v1/balances?tenant=other")
        self.assertEqual(forbidden[1]["x-cycles-tenant"], "acme")
        self.assertNotIn("x-cycles-tenant", self.http.get("/v1/balances", api_key="bad")[1])
        self.assertNotIn("x-cycles-tenant", self.http.get("/v1/nope")[1])

    def test_traceparent_is_used(self) -> None:
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        _, headers, _ = self.http.get(
            "/v1/balances?tenant=acme",
            headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
        self.assertEqual(headers["x-cycles-trace-id"], trace)

    def test_traceparent_beats_flat_header(self) -> None:
        parent = "4bf92f3577b34da6a3ce929d0e0e4736"
        flat = "0af7651916cd43dd8448eb211c80319c"
        _, headers, _ = self.http.get("/v1/balances?tenant=acme", headers={
            "traceparent": f"00-{parent}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": flat})
        self.assertEqual(headers["x-cycles-trace-id"], parent)

    def test_invalid_traceparent_falls_back_to_flat_header(self) -> None:
        flat = "0af7651916cd43dd8448eb211c80319c"
        for bad in ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                    "garbage"):
            status, headers, _ = self.http.get("/v1/balances?tenant=acme", headers={
                "traceparent": bad, "X-Cycles-Trace-Id": flat})
            self.assertEqual((status, headers["x-cycles-trace-id"]), (200, flat), bad)

    def test_malformed_flat_trace_id_is_ignored_never_rejected(self) -> None:
        for bad in ("0AF7651916CD43DD8448EB211C80319C", "0" * 32, "xyz", "0af76519"):
            status, headers, _ = self.http.get(
                "/v1/balances?tenant=acme", headers={"X-Cycles-Trace-Id": bad})
            self.assertEqual(status, 200)
            self.assertTrue(TRACE_RE.fullmatch(headers["x-cycles-trace-id"]))
            self.assertNotEqual(headers["x-cycles-trace-id"], bad.lower())

    def test_error_body_trace_id_matches_header(self) -> None:
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        body = self.assert_error(
            self.http.post("/v1/reservations", self.reserve_body(), api_key=None,
                           headers={"X-Cycles-Trace-Id": trace}),
            401, "UNAUTHORIZED")
        self.assertEqual(body["trace_id"], trace)

    def test_unknown_path_is_conformant_404(self) -> None:
        self.assert_error(self.http.get("/v1/unknown"), 404, "NOT_FOUND")
        self.assert_error(self.http.post("/nope", {"a": 1}), 404, "NOT_FOUND")
        self.assert_error(self.http.get("/v1/reservations/"), 404, "NOT_FOUND")
        self.assertEqual(self.srv.requests[-1].operation, "unknown")

    def test_wrong_method_is_405_with_allow(self) -> None:
        response = self.http.request("DELETE", "/v1/reservations")
        self.assert_error(response, 405, "INVALID_REQUEST")
        self.assertEqual(response[1]["allow"], "POST, GET")
        self.assertEqual(self.http.request("PUT", "/v1/decide", {})[0], 405)
        self.assertEqual(self.http.get("/v1/events")[0], 405)
        self.http.conn.request("HEAD", "/v1/balances?tenant=acme")
        head = self.http.conn.getresponse()
        self.assertEqual((head.status, head.read()), (405, b""))
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)

    def test_unsupported_method_gets_json_error_and_server_survives(self) -> None:
        with socket.create_connection(("127.0.0.1", self.srv.port), timeout=5) as sock:
            sock.sendall(b"BOGUS /v1/decide HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 501"), head)
        self.assertIn(b"X-Cycles-Trace-Id", head)
        self.assertEqual(json.loads(body)["error"], "INTERNAL_ERROR")
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)

    def test_malformed_json_and_garbage_bodies_are_400(self) -> None:
        for raw in (b"{", b"\xff\xfe\x00", b"[1, 2]", b'{"idempotency_key": NaN}',
                    b"[" * 100_000, b"null", b'"text"', b""):
            response = self.http.post("/v1/reservations", raw=raw,
                                      headers={"Content-Type": "application/json"})
            self.assert_error(response, 400, "INVALID_REQUEST")
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)

    def test_content_type_must_be_json(self) -> None:
        raw = json.dumps(self.reserve_body()).encode()
        response = self.http.post("/v1/reservations", raw=raw,
                                  headers={"Content-Type": "text/plain"})
        self.assert_error(response, 400, "INVALID_REQUEST")
        ok = self.http.post("/v1/reservations", raw=raw,
                            headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(ok[0], 200)

    def test_oversized_body_is_413_and_connection_closes(self) -> None:
        self.srv.stop()
        self.srv = LocalCyclesServer(**base_config(max_body_bytes=1000)).start()
        self.addCleanup(self.srv.stop)
        client = self.client()
        body = self.reserve_body(metadata={"blob": "x" * 2000})
        response = client.post("/v1/reservations", body)
        self.assert_error(response, 413, "INVALID_REQUEST")
        self.assertEqual(response[1]["connection"], "close")
        self.assertEqual(client.post("/v1/reservations", self.reserve_body())[0], 200)

    def test_chunked_request_body_is_accepted(self) -> None:
        payload = json.dumps(self.reserve_body()).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/reservations", body=iter([payload[:10], payload[10:]]),
                     headers={"Content-Type": "application/json", "X-Cycles-API-Key": KEY},
                     encode_chunked=True)
        response = conn.getresponse()
        self.assertEqual(response.status, 200, response.read())
        response.read()

    def test_keep_alive_reuses_one_connection_without_nagle_stalls(self) -> None:
        started = time.perf_counter()
        for _ in range(50):
            self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        elapsed = time.perf_counter() - started
        self.assertEqual(self.srv.connections_accepted, 1)
        self.assertLess(elapsed, 1.0, "kept-alive requests stall (TCP_NODELAY missing?)")
        self.client().get("/v1/balances?tenant=acme")
        self.assertEqual(self.srv.connections_accepted, 2)

    def test_connection_close_request_is_honoured(self) -> None:
        response = self.http.get("/v1/balances?tenant=acme", headers={"Connection": "close"})
        self.assertEqual(response[1]["connection"], "close")

    def test_http_date_and_server_headers(self) -> None:
        _, headers, _ = self.http.post("/v1/reservations", self.reserve_body())
        self.assertIn("date", headers)
        self.assertEqual(headers["server"], "cycles-lite-server/0.3.0")


# =============================================================================
# Authentication and tenancy
# =============================================================================


class TestAuth(ServerTest):
    def test_missing_or_invalid_key_is_401_on_every_endpoint(self) -> None:
        rid = self.reserve()["reservation_id"]
        calls = [
            ("POST", "/v1/reservations", self.reserve_body()),
            ("POST", "/v1/decide", self.reserve_body()),
            ("POST", "/v1/events", self.event_body(1)),
            ("POST", f"/v1/reservations/{rid}/commit", {"idempotency_key": "x",
                                                         "actual": amount(1)}),
            ("POST", f"/v1/reservations/{rid}/release", {"idempotency_key": "x"}),
            ("POST", f"/v1/reservations/{rid}/extend", {"idempotency_key": "x",
                                                         "extend_by_ms": 1}),
            ("GET", "/v1/balances?tenant=acme", None),
            ("GET", "/v1/reservations", None),
            ("GET", f"/v1/reservations/{rid}", None),
        ]
        for method, path, body in calls:
            for key in (None, "wrong-key"):
                self.assert_error(self.http.request(method, path, body, api_key=key),
                                  401, "UNAUTHORIZED")

    def test_auth_comes_before_validation(self) -> None:
        self.assert_error(self.http.post("/v1/reservations", raw=b"{", api_key=None,
                                         headers={"Content-Type": "application/json"}),
                          401, "UNAUTHORIZED")

    def test_keys_can_be_added_and_removed_at_run_time(self) -> None:
        self.srv.add_api_key("new-key", "newco")
        self.srv.add_budget("tenant:newco", USD, 100)
        client = self.client("new-key")
        status, headers, _ = client.get("/v1/balances?tenant=newco")
        self.assertEqual((status, headers["x-cycles-tenant"]), (200, "newco"))
        self.srv.remove_api_key("new-key")
        self.assert_error(client.get("/v1/balances?tenant=newco"), 401, "UNAUTHORIZED")

    def test_admin_key_rejected_outside_list_get_release(self) -> None:
        rid = self.reserve()["reservation_id"]
        admin = {"X-Admin-API-Key": ADMIN_KEY}
        for method, path, body in [
            ("POST", "/v1/reservations", self.reserve_body()),
            ("POST", "/v1/decide", self.reserve_body()),
            ("POST", "/v1/events", self.event_body(1)),
            ("POST", f"/v1/reservations/{rid}/commit", {"idempotency_key": "x",
                                                         "actual": amount(1)}),
            ("POST", f"/v1/reservations/{rid}/extend", {"idempotency_key": "x",
                                                         "extend_by_ms": 1}),
            ("GET", "/v1/balances?tenant=acme", None),
        ]:
            self.assert_error(self.http.request(method, path, body, api_key=None,
                                                headers=admin), 401, "UNAUTHORIZED")

    def test_admin_list_requires_tenant_and_filters_by_it(self) -> None:
        rid = self.reserve()["reservation_id"]
        admin = self.client(None)
        headers = {"X-Admin-API-Key": ADMIN_KEY}
        body = self.assert_error(admin.get("/v1/reservations", headers=headers),
                                 400, "INVALID_REQUEST")
        self.assertEqual(body["message"],
                         "tenant query parameter is required when using admin key authentication")
        status, got, listed = admin.get("/v1/reservations?tenant=acme", headers=headers)
        self.assertEqual(status, 200)
        self.assertNotIn("x-cycles-tenant", got)
        self.assertEqual([r["reservation_id"] for r in listed["reservations"]], [rid])
        status, _, listed = admin.get("/v1/reservations?tenant=other", headers=headers)
        self.assertEqual((status, listed["reservations"]), (200, []))

    def test_admin_get_and_release_any_tenant(self) -> None:
        rid = self.reserve()["reservation_id"]
        admin = self.client(None)
        headers = {"X-Admin-API-Key": ADMIN_KEY}
        status, _, detail = admin.get(f"/v1/reservations/{rid}", headers=headers)
        self.assertEqual((status, detail["reservation_id"]), (200, rid))
        status, _, released = admin.post(
            f"/v1/reservations/{rid}/release",
            {"idempotency_key": "force", "reason": "[INCIDENT_FORCE_RELEASE]"}, headers=headers)
        self.assertEqual((status, released["status"]), (200, "RELEASED"))
        stored = self.srv.reservation(rid)
        assert stored is not None
        self.assertEqual((stored["finalized_by"], stored["release_reason"]),
                         ("admin_on_behalf_of", "[INCIDENT_FORCE_RELEASE]"))
        self.assert_error(admin.get(f"/v1/reservations/{rid}",
                                    headers={"X-Admin-API-Key": "wrong"}), 401, "UNAUTHORIZED")
        self.assert_error(admin.get("/v1/reservations/missing", headers=headers),
                          404, "NOT_FOUND")

    def test_subject_tenant_mismatch_is_403(self) -> None:
        body = self.reserve_body(subject={"tenant": "other"})
        self.assert_error(self.http.post("/v1/reservations", body), 403, "FORBIDDEN")
        self.assert_error(self.http.post("/v1/decide", body), 403, "FORBIDDEN")
        self.assert_error(self.http.post("/v1/events",
                                         self.event_body(1, subject={"tenant": "other"})),
                          403, "FORBIDDEN")
        dry = self.reserve_body(subject={"tenant": "other"}, dry_run=True)
        self.assert_error(self.http.post("/v1/reservations", dry), 403, "FORBIDDEN")

    def test_subject_without_tenant_uses_effective_tenant(self) -> None:
        self.srv.add_budget("tenant:acme/agent:bot", USD, 500)
        created = self.reserve(subject={"agent": "bot"})
        self.assertEqual(created["affected_scopes"], ["tenant:acme", "tenant:acme/agent:bot"])
        detail = self.http.get(f"/v1/reservations/{created['reservation_id']}")[2]
        self.assertEqual(detail["subject"], {"agent": "bot", "tenant": "acme"})

    def test_foreign_reservation_is_403_unknown_is_404(self) -> None:
        rid = self.reserve()["reservation_id"]
        other = self.client(OTHER_KEY)
        self.assert_error(other.get(f"/v1/reservations/{rid}"), 403, "FORBIDDEN")
        self.assert_error(self.commit(rid, 1, http=other), 403, "FORBIDDEN")
        self.assert_error(self.release(rid, http=other), 403, "FORBIDDEN")
        self.assert_error(other.post(f"/v1/reservations/{rid}/extend",
                                     {"idempotency_key": "x", "extend_by_ms": 5}),
                          403, "FORBIDDEN")
        self.assert_error(other.get("/v1/reservations/no-such-id"), 404, "NOT_FOUND")
        self.assert_error(self.commit("no-such-id", 1, http=other), 404, "NOT_FOUND")
        self.assert_error(self.release("no-such-id"), 404, "NOT_FOUND")
        self.assert_error(self.extend("no-such-id", 5), 404, "NOT_FOUND")

    def test_tenant_query_parameter_is_a_check(self) -> None:
        self.assert_error(self.http.get("/v1/reservations?tenant=other"), 403, "FORBIDDEN")
        self.assert_error(self.http.get("/v1/balances?tenant=other"), 403, "FORBIDDEN")
        self.assertEqual(self.http.get("/v1/reservations?tenant=acme")[0], 200)


# =============================================================================
# Request validation
# =============================================================================


class TestValidation(ServerTest):
    def assert_invalid(self, path: str, body: Any, field: str = "") -> None:
        response = self.http.post(path, body)
        error = self.assert_error(response, 400, "INVALID_REQUEST")
        self.assertIn(field, error["message"])

    def test_unknown_fields_are_rejected_at_every_level(self) -> None:
        base = self.reserve_body()
        for where, name in (("", "observe_mode"), ("subject", "region"),
                            ("action", "policy_keys"), ("estimate", "currency")):
            body = json.loads(json.dumps(base))
            (body[where] if where else body)[name] = "x"
            self.assert_invalid("/v1/reservations", body, "not a known field")
        commit = {"idempotency_key": "k", "actual": amount(1), "extra": 1}
        self.assert_invalid("/v1/reservations/x/commit", commit, "extra")
        metrics = {"idempotency_key": "k", "actual": amount(1), "metrics": {"cost": 1}}
        self.assert_invalid("/v1/reservations/x/commit", metrics, "metrics.cost")

    def test_required_fields(self) -> None:
        for name in ("idempotency_key", "subject", "action", "estimate"):
            body = self.reserve_body()
            del body[name]
            self.assert_invalid("/v1/reservations", body, name)
        body = self.reserve_body()
        del body["action"]["name"]
        self.assert_invalid("/v1/reservations", body, "action.name")
        self.assert_invalid("/v1/reservations/x/extend", {"idempotency_key": "k"},
                            "extend_by_ms")
        self.assert_invalid("/v1/reservations/x/release", {}, "idempotency_key")

    def test_subject_rules(self) -> None:
        for subject, field in (
            ({"dimensions": {"team": "a"}}, "subject"),
            ({}, "subject"),
            ({"tenant": "acme", "agent": "bad agent"}, "subject.agent"),
            ({"tenant": "acme", "agent": "a/b"}, "subject.agent"),
            ({"tenant": "acme", "agent": ""}, "subject.agent"),
            ({"tenant": "acme", "agent": "a" * 129}, "subject.agent"),
            ({"tenant": "acme", "agent": 5}, "subject.agent"),
            ({"tenant": "acme", "dimensions": {"k": "v" * 257}}, "subject.dimensions.k"),
            ({"tenant": "acme", "dimensions": {f"k{i}": "v" for i in range(17)}},
             "subject.dimensions"),
            ({"tenant": "acme", "dimensions": {"k": 1}}, "subject.dimensions.k"),
        ):
            self.assert_invalid("/v1/reservations", self.reserve_body(subject=subject), field)
        ok = self.reserve_body(subject={"tenant": "acme", "agent": "a" * 128,
                                        "dimensions": {f"k{i}": "v" * 256 for i in range(16)}})
        self.srv.add_budget("tenant:acme/agent:" + "a" * 128, USD, 1000)
        self.assertEqual(self.http.post("/v1/reservations", ok)[0], 200)

    def test_amounts_are_non_negative_int64_never_float_or_bool(self) -> None:
        for value in (1.0, 1e3, True, False, -1, 2**63, "100", None):
            body = self.reserve_body()
            body["estimate"]["amount"] = value
            self.assert_invalid("/v1/reservations", body, "estimate.amount")
        body = self.reserve_body()
        body["estimate"]["amount"] = 2**63 - 1
        self.assert_error(self.http.post("/v1/reservations", body), 409, "BUDGET_EXCEEDED")
        body = self.reserve_body()
        body["estimate"]["unit"] = "EUR"
        self.assert_invalid("/v1/reservations", body, "estimate.unit")

    def test_lengths_and_ranges(self) -> None:
        cases: List[Tuple[Dict[str, Any], str]] = [
            ({"idempotency_key": ""}, "idempotency_key"),
            ({"idempotency_key": "k" * 257}, "idempotency_key"),
            ({"ttl_ms": 999}, "ttl_ms"),
            ({"ttl_ms": 86_400_001}, "ttl_ms"),
            ({"grace_period_ms": -1}, "grace_period_ms"),
            ({"grace_period_ms": 60_001}, "grace_period_ms"),
            ({"overage_policy": "SOMETIMES"}, "overage_policy"),
            ({"dry_run": "true"}, "dry_run"),
            ({"dry_run": 1}, "dry_run"),
            ({"metadata": []}, "metadata"),
            ({"action": {"kind": "k" * 65, "name": "n"}}, "action.kind"),
            ({"action": {"kind": "k", "name": "n" * 257}}, "action.name"),
            ({"action": {"kind": "k", "name": "n", "tags": ["t"] * 11}}, "action.tags"),
            ({"action": {"kind": "k", "name": "n", "tags": ["t" * 65]}}, "action.tags[0]"),
        ]
        for fields, field in cases:
            body = self.reserve_body()
            body.update(fields)
            self.assert_invalid("/v1/reservations", body, field)
        body = self.reserve_body(ttl_ms=1000, grace_period_ms=60_000, idempotency_key="k" * 256)
        body["action"]["tags"] = ["t" * 64] * 10
        self.assertEqual(self.http.post("/v1/reservations", body)[0], 200)

    def test_extend_release_event_limits(self) -> None:
        for by_ms in (0, 86_400_001, 1.5):
            self.assert_invalid("/v1/reservations/x/extend",
                                {"idempotency_key": "k", "extend_by_ms": by_ms}, "extend_by_ms")
        self.assert_invalid("/v1/reservations/x/release",
                            {"idempotency_key": "k", "reason": "r" * 257}, "reason")
        self.assert_invalid("/v1/events", self.event_body(1, client_time_ms=-5),
                            "client_time_ms")
        self.assert_invalid("/v1/events", self.event_body(1, metrics={"latency_ms": -1}),
                            "metrics.latency_ms")
        self.assert_invalid("/v1/decide", self.reserve_body(ttl_ms=5000), "ttl_ms")

    def test_reservation_id_path_length(self) -> None:
        self.assert_invalid("/v1/reservations/" + "r" * 129 + "/commit",
                            {"idempotency_key": "k", "actual": amount(1)}, "reservation_id")
        self.assert_error(self.http.get("/v1/reservations/" + "r" * 129), 400, "INVALID_REQUEST")
        self.assert_error(self.http.get("/v1/reservations/" + "r" * 128), 404, "NOT_FOUND")

    def test_idempotency_header_must_match_body(self) -> None:
        body = self.reserve_body(key="body-key")
        error = self.assert_error(
            self.http.post("/v1/reservations", body, headers={"X-Idempotency-Key": "other"}),
            400, "INVALID_REQUEST")
        self.assertIn("X-Idempotency-Key", error["message"])
        status, _, _ = self.http.post("/v1/reservations", body,
                                      headers={"X-Idempotency-Key": "body-key"})
        self.assertEqual(status, 200)
        rid = self.reserve()["reservation_id"]
        self.assert_error(
            self.http.post(f"/v1/reservations/{rid}/release", {"idempotency_key": "a"},
                           headers={"X-Idempotency-Key": "b"}), 400, "INVALID_REQUEST")

    def test_validation_failures_do_not_bind_or_mutate(self) -> None:
        before = self.srv.balance("tenant:acme")
        body = self.reserve_body(key="same")
        body["estimate"]["amount"] = -1
        self.http.post("/v1/reservations", body)
        self.assertEqual(self.srv.balance("tenant:acme"), before)
        self.assertEqual(self.http.post("/v1/reservations",
                                        self.reserve_body(key="same"))[0], 200)


# =============================================================================
# createReservation (live and dry-run)
# =============================================================================


class TestReserve(ServerTest):
    def test_happy_path(self) -> None:
        created = self.reserve(250, metadata={"run": 1})
        self.assertEqual(created["decision"], "ALLOW")
        self.assertTrue(UUID_RE.fullmatch(created["reservation_id"]))
        self.assertEqual(created["reserved"], amount(250))
        self.assertEqual(created["expires_at_ms"], self.t0 + 60_000)
        self.assertEqual(created["remaining_ttl_ms"], 60_000)
        self.assertEqual(created["scope_path"], "tenant:acme")
        self.assertEqual(created["affected_scopes"], ["tenant:acme"])
        self.assertNotIn("caps", created)
        [balance] = created["balances"]
        self.assertEqual(balance["remaining"], amount(1_000_000 - 250))
        self.assertEqual(balance["reserved"], amount(250))
        state = self.srv.balance("tenant:acme")
        self.assertEqual((state["reserved"], state["remaining"]), (250, 999_750))
        stored = self.srv.reservation(created["reservation_id"])
        assert stored is not None
        self.assertEqual((stored["status"], stored["reserved"], stored["extension_count"]),
                         ("ACTIVE", 250, 0))
        self.assertTrue(self.srv.requests_for("create")[-1].applied)

    def test_scope_derivation_is_canonical_lowercase_and_skips_gaps(self) -> None:
        self.srv.add_budget("tenant:acme/workspace:prod/agent:bot", USD, 1000)
        subject = {"agent": "Bot", "workspace": "Prod", "tenant": "acme"}
        created = self.reserve(subject=subject)
        self.assertEqual(created["affected_scopes"], [
            "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"])
        self.assertEqual(created["scope_path"], "tenant:acme/workspace:prod/agent:bot")
        self.assertEqual(self.remaining("tenant:acme/workspace:prod/agent:bot"), 900)
        self.assertEqual(self.remaining("tenant:acme"), 999_900)
        self.assertEqual([b["scope"] for b in created["balances"]], ["tenant:acme", "agent:bot"])

    def test_reserve_is_atomic_across_scopes(self) -> None:
        self.srv.add_budget("tenant:acme/agent:bot", USD, 100)
        body = self.reserve_body(150, subject={"tenant": "acme", "agent": "bot"})
        error = self.assert_error(self.http.post("/v1/reservations", body), 409,
                                  "BUDGET_EXCEEDED")
        self.assertEqual(error["details"], {"scope": "tenant:acme/agent:bot"})
        self.assertEqual(self.remaining("tenant:acme"), 1_000_000)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)
        self.assertFalse(self.srv.requests[-1].applied)

    def test_no_budget_in_any_unit_is_404(self) -> None:
        self.srv.add_tenant("ghost")
        self.srv.add_api_key("ghost-key", "ghost")
        ghost = self.client("ghost-key")
        body = self.reserve_body(subject={"tenant": "ghost", "agent": "a"})
        error = self.assert_error(ghost.post("/v1/reservations", body), 404, "NOT_FOUND")
        self.assertEqual(error["message"],
                         "Budget not found for provided scope: tenant:ghost/agent:a")
        self.assertEqual(self.srv.requests[-1].response_body["error"], "NOT_FOUND")
        status, _, dry = ghost.post("/v1/reservations", self.reserve_body(
            subject={"tenant": "ghost"}, dry_run=True))
        self.assertEqual((status, dry["decision"], dry["reason_code"]),
                         (200, "DENY", "BUDGET_NOT_FOUND"))

    def test_unit_mismatch_vs_skip(self) -> None:
        self.srv.add_budget("tenant:acme/agent:tok", TOKENS, 1000)
        body = self.reserve_body(subject={"tenant": "acme", "agent": "tok"}, unit=TOKENS)
        self.assertEqual(self.http.post("/v1/reservations", body)[0], 200)
        mixed = self.reserve_body(subject={"tenant": "acme", "agent": "tok"})
        created = self.http.post("/v1/reservations", mixed)[2]
        self.assertEqual([b["scope_path"] for b in created["balances"]], ["tenant:acme"])
        self.srv.add_tenant("solo")
        self.srv.add_api_key("solo-key", "solo")
        self.srv.add_budget("tenant:solo", TOKENS, 10)
        solo = self.client("solo-key")
        body = self.reserve_body(subject={"tenant": "solo"})
        error = self.assert_error(solo.post("/v1/reservations", body), 400, "UNIT_MISMATCH")
        self.assertEqual(error["details"], {"scope": "tenant:solo", "requested_unit": USD,
                                            "expected_units": [TOKENS]})
        dry = self.reserve_body(subject={"tenant": "solo"}, dry_run=True)
        self.assert_error(solo.post("/v1/reservations", dry), 400, "UNIT_MISMATCH")

    def test_denials_live_409_and_dry_run_deny(self) -> None:
        cases: List[Tuple[Dict[str, Any], str]] = [
            ({"is_over_limit": True, "debt": 5}, "OVERDRAFT_LIMIT_EXCEEDED"),
            ({"status": "FROZEN"}, "BUDGET_FROZEN"),
            ({"status": "CLOSED"}, "BUDGET_CLOSED"),
            ({"debt": 5}, "DEBT_OUTSTANDING"),
            ({"allocated": 99}, "BUDGET_EXCEEDED"),
        ]
        for fields, code in cases:
            with self.subTest(code=code):
                self.srv.set_budget("tenant:acme", allocated=1_000_000, debt=0, status="ACTIVE",
                                    is_over_limit=False)
                self.srv.set_budget("tenant:acme", **fields)
                before = self.srv.balance("tenant:acme")
                self.assert_error(self.http.post("/v1/reservations", self.reserve_body(100)),
                                  409, code)
                status, _, dry = self.http.post(
                    "/v1/reservations", self.reserve_body(100, dry_run=True))
                self.assertEqual((status, dry["decision"], dry["reason_code"]),
                                 (200, "DENY", code))
                self.assertEqual(dry["affected_scopes"], ["tenant:acme"])
                for absent in ("reservation_id", "expires_at_ms", "remaining_ttl_ms", "caps"):
                    self.assertNotIn(absent, dry)
                status, _, decision = self.decide(100)
                self.assertEqual((status, decision["decision"], decision["reason_code"]),
                                 (200, "DENY", code))
                self.assertEqual(self.srv.balance("tenant:acme"), before)

    def test_check_order_over_limit_first_then_status_then_debt(self) -> None:
        self.srv.add_budget("tenant:acme/agent:a", USD, 1000, status="FROZEN", debt=5)
        subject = {"tenant": "acme", "agent": "a"}
        self.srv.set_budget("tenant:acme", is_over_limit=True)
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(
            subject=subject)), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        self.srv.set_budget("tenant:acme", is_over_limit=False)
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(
            subject=subject)), 409, "BUDGET_FROZEN")
        self.srv.set_budget("tenant:acme/agent:a", status="ACTIVE")
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(
            subject=subject)), 409, "DEBT_OUTSTANDING")

    def test_debt_with_overdraft_limit_does_not_block(self) -> None:
        self.srv.set_budget("tenant:acme", debt=50, overdraft_limit=100)
        self.assertEqual(self.reserve(10)["decision"], "ALLOW")

    def test_overage_policy_does_not_apply_at_reserve_time(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=50)
        for policy in ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"):
            body = self.reserve_body(100, overage_policy=policy)
            self.assert_error(self.http.post("/v1/reservations", body), 409, "BUDGET_EXCEEDED")

    def test_caps_give_allow_with_caps(self) -> None:
        caps = {"max_tokens": 100, "tool_allowlist": ["web.search"]}
        self.srv.add_budget("tenant:acme/agent:capped", USD, 1000, caps=caps)
        subject = {"tenant": "acme", "agent": "capped"}
        created = self.reserve(subject=subject)
        self.assertEqual((created["decision"], created["caps"]), ("ALLOW_WITH_CAPS", caps))
        dry = self.http.post("/v1/reservations",
                             self.reserve_body(subject=subject, dry_run=True))[2]
        self.assertEqual((dry["decision"], dry["caps"]), ("ALLOW_WITH_CAPS", caps))
        decision = self.decide(subject=subject)[2]
        self.assertEqual((decision["decision"], decision["caps"]), ("ALLOW_WITH_CAPS", caps))
        self.assertNotIn("caps", self.reserve())

    def test_ttl_default_request_and_silent_clamp(self) -> None:
        self.assertEqual(self.reserve(ttl_ms=5000)["expires_at_ms"], self.t0 + 5000)
        created = self.reserve(ttl_ms=86_400_000)
        self.assertEqual(created["expires_at_ms"], self.t0 + 3_600_000)
        self.assertEqual(created["remaining_ttl_ms"], 3_600_000)

    def test_tenant_policy_overrides_server_defaults(self) -> None:
        self.srv.add_tenant("acme", "ACTIVE", default_ttl_ms=2000, max_ttl_ms=10_000,
                            default_grace_ms=0, max_extensions=1,
                            default_overage_policy="REJECT")
        created = self.reserve()
        self.assertEqual(created["expires_at_ms"], self.t0 + 2000)
        self.assertEqual(self.reserve(ttl_ms=20_000)["expires_at_ms"], self.t0 + 10_000)
        stored = self.srv.reservation(created["reservation_id"])
        assert stored is not None
        self.assertEqual((stored["grace_period_ms"], stored["max_extensions"],
                          stored["overage_policy"]), (0, 1, "REJECT"))

    def test_dry_run_never_mutates(self) -> None:
        status, _, dry = self.http.post("/v1/reservations",
                                        self.reserve_body(300, dry_run=True))
        self.assertEqual((status, dry["decision"]), (200, "ALLOW"))
        self.assertEqual(dry["affected_scopes"], ["tenant:acme"])
        self.assertEqual(dry["reserved"], amount(300))
        self.assertEqual(dry["balances"][0]["remaining"], amount(1_000_000))
        for absent in ("reservation_id", "expires_at_ms", "remaining_ttl_ms"):
            self.assertNotIn(absent, dry)
        self.assertEqual(self.remaining(), 1_000_000)
        self.assertEqual(self.http.get("/v1/reservations")[2]["reservations"], [])
        self.assertFalse(self.srv.requests[-2].applied)

    def test_zero_estimate_is_allowed(self) -> None:
        created = self.reserve(0)
        self.assertEqual(created["reserved"], amount(0))


# =============================================================================
# commitReservation
# =============================================================================


class TestCommit(ServerTest):
    def test_actual_below_reserved_releases_the_rest(self) -> None:
        rid = self.reserve(1000)["reservation_id"]
        status, _, body = self.commit(rid, 400, metadata={"note": "done"})
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "COMMITTED")
        self.assertEqual((body["charged"], body["released"]), (amount(400), amount(600)))
        self.assertEqual(body["balances"][0]["spent"], amount(400))
        state = self.srv.balance("tenant:acme")
        self.assertEqual((state["spent"], state["reserved"], state["remaining"]),
                         (400, 0, 999_600))
        detail = self.http.get(f"/v1/reservations/{rid}")[2]
        self.assertEqual((detail["status"], detail["committed"], detail["finalized_at_ms"],
                          detail["committed_metadata"]),
                         ("COMMITTED", amount(400), self.t0, {"note": "done"}))

    def test_actual_equal_to_reserved_has_no_released(self) -> None:
        rid = self.reserve(1000)["reservation_id"]
        body = self.commit(rid, 1000)[2]
        self.assertEqual(body["charged"], amount(1000))
        self.assertNotIn("released", body)

    def test_allow_if_available_is_default_and_charges_covered_overage(self) -> None:
        rid = self.reserve(100)["reservation_id"]
        body = self.commit(rid, 150)[2]
        self.assertEqual(body["charged"], amount(150))
        self.assertEqual(self.srv.balance("tenant:acme")["spent"], 150)
        stored = self.srv.reservation(rid)
        assert stored is not None
        self.assertEqual(stored["overage_policy"], "ALLOW_IF_AVAILABLE")

    def test_allow_if_available_caps_and_flags_over_limit(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=1000)
        self.srv.add_budget("tenant:acme/agent:bot", USD, 10_000)
        rid = self.reserve(900, subject={"tenant": "acme", "agent": "bot"})["reservation_id"]
        status, _, body = self.commit(rid, 1500)
        self.assertEqual((status, body["charged"]), (200, amount(1000)))
        tenant = self.srv.balance("tenant:acme")
        agent = self.srv.balance("tenant:acme/agent:bot")
        self.assertEqual((tenant["spent"], tenant["remaining"], tenant["debt"],
                          tenant["is_over_limit"]), (1000, 0, 0, True))
        self.assertEqual((agent["spent"], agent["is_over_limit"]), (1000, False))
        self.assertTrue(body["balances"][0]["is_over_limit"])
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(0)),
                          409, "OVERDRAFT_LIMIT_EXCEEDED")
        self.assertEqual(self.event(1)[0], 201)

    def test_reject_overage_is_409_and_reservation_stays_active(self) -> None:
        rid = self.reserve(100, overage_policy="REJECT")["reservation_id"]
        self.assert_error(self.commit(rid, 101), 409, "BUDGET_EXCEEDED")
        self.assertEqual(self.srv.reservation(rid)["status"], "ACTIVE")  # type: ignore[index]
        self.assertEqual(self.commit(rid, 100)[0], 200)

    def test_allow_with_overdraft_creates_debt_from_the_shortfall(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=1000, overdraft_limit=500)
        rid = self.reserve(800, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        status, _, body = self.commit(rid, 1300)
        self.assertEqual((status, body["charged"]), (200, amount(1300)))
        state = self.srv.balance("tenant:acme")
        # remaining 200 funded part of the 500 overage; the 300 shortfall is debt.
        self.assertEqual((state["spent"], state["debt"], state["remaining"],
                          state["is_over_limit"]), (1000, 300, -300, False))
        self.assertEqual(body["balances"][0]["debt"], amount(300))
        self.assertEqual(body["balances"][0]["overdraft_limit"], amount(500))
        self.assertEqual(body["balances"][0]["remaining"], amount(-300))
        # debt below a non-zero overdraft limit is not DEBT_OUTSTANDING, but a
        # negative remaining cannot cover even a zero estimate.
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(0)),
                          409, "BUDGET_EXCEEDED")
        self.srv.fund("tenant:acme", 400)
        self.assertEqual(self.reserve(100)["decision"], "ALLOW")

    def test_allow_with_overdraft_over_limit_is_409_without_mutation(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=1000, overdraft_limit=100)
        rid = self.reserve(900, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        before = self.srv.balance("tenant:acme")
        # overage 201 against remaining 100: shortfall 101 > limit 100
        self.assert_error(self.commit(rid, 1101), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        self.assertEqual(self.srv.balance("tenant:acme"), before)
        self.assertEqual(self.srv.reservation(rid)["status"], "ACTIVE")  # type: ignore[index]
        self.assertEqual(self.commit(rid, 1100)[0], 200)
        self.assertEqual(self.srv.balance("tenant:acme")["debt"], 100)

    def test_allow_with_overdraft_without_limit_behaves_as_allow_if_available(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=1000)
        rid = self.reserve(900, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        body = self.commit(rid, 1500)[2]
        self.assertEqual(body["charged"], amount(1000))
        state = self.srv.balance("tenant:acme")
        self.assertEqual((state["debt"], state["is_over_limit"]), (0, True))

    def test_unit_mismatch(self) -> None:
        rid = self.reserve()["reservation_id"]
        self.assert_error(self.commit(rid, 10, unit=TOKENS), 400, "UNIT_MISMATCH")

    def test_same_key_replays_verbatim_and_mismatch_is_409(self) -> None:
        rid = self.reserve(100)["reservation_id"]
        first = self.commit(rid, 60, key="c1")
        self.event(10)
        again = self.commit(rid, 60, key="c1")
        self.assertEqual(again[2], first[2])
        self.assertFalse(self.srv.requests[-1].applied)
        self.assertEqual(self.srv.balance("tenant:acme")["spent"], 70)
        self.assert_error(self.commit(rid, 61, key="c1"), 409, "IDEMPOTENCY_MISMATCH")
        self.assert_error(self.commit(rid, 60, key="c2"), 409, "RESERVATION_FINALIZED")
        self.assert_error(self.release(rid), 409, "RESERVATION_FINALIZED")

    def test_commit_after_release_is_finalized(self) -> None:
        rid = self.reserve()["reservation_id"]
        self.assertEqual(self.release(rid)[0], 200)
        self.assert_error(self.commit(rid, 1), 409, "RESERVATION_FINALIZED")

    def test_same_commit_key_on_another_reservation_is_independent(self) -> None:
        first = self.reserve()["reservation_id"]
        second = self.reserve()["reservation_id"]
        self.assertEqual(self.commit(first, 10, key="shared")[0], 200)
        self.assertEqual(self.commit(second, 20, key="shared")[0], 200)


# =============================================================================
# releaseReservation and extendReservation
# =============================================================================


class TestRelease(ServerTest):
    def test_release_returns_budget_and_replays(self) -> None:
        rid = self.reserve(300)["reservation_id"]
        status, _, body = self.release(rid, key="r1", reason="not needed")
        self.assertEqual((status, body["status"], body["released"]),
                         (200, "RELEASED", amount(300)))
        self.assertEqual(self.remaining(), 1_000_000)
        self.assertEqual(self.release(rid, key="r1", reason="not needed")[2], body)
        self.assert_error(self.release(rid, key="r1", reason="changed"),
                          409, "IDEMPOTENCY_MISMATCH")
        self.assert_error(self.release(rid, key="r2"), 409, "RESERVATION_FINALIZED")
        detail = self.http.get(f"/v1/reservations/{rid}")[2]
        self.assertEqual((detail["status"], detail["finalized_at_ms"]), ("RELEASED", self.t0))
        self.assertNotIn("committed", detail)


class TestExtend(ServerTest):
    def test_extend_is_relative_to_current_expiry(self) -> None:
        rid = self.reserve(ttl_ms=10_000)["reservation_id"]
        self.srv.clock.advance(4000)
        status, _, body = self.extend(rid, 10_000)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ACTIVE")
        self.assertEqual(body["expires_at_ms"], self.t0 + 20_000)
        self.assertEqual(body["remaining_ttl_ms"], 16_000)
        self.assertEqual(body["balances"][0]["reserved"], amount(100))
        stored = self.srv.reservation(rid)
        assert stored is not None
        self.assertEqual((stored["expires_at_ms"], stored["extension_count"]),
                         (self.t0 + 20_000, 1))

    def test_max_extensions(self) -> None:
        rid = self.reserve()["reservation_id"]
        for _ in range(10):
            self.assertEqual(self.extend(rid, 1000)[0], 200)
        self.assert_error(self.extend(rid, 1000), 409, "MAX_EXTENSIONS_EXCEEDED")

    def test_extend_replay_recomputes_remaining_ttl(self) -> None:
        rid = self.reserve(ttl_ms=10_000)["reservation_id"]
        first = self.extend(rid, 5000, key="e1")[2]
        self.assertEqual(first["remaining_ttl_ms"], 15_000)
        self.srv.clock.advance(2500)
        again = self.extend(rid, 5000, key="e1")[2]
        self.assertEqual(again["expires_at_ms"], first["expires_at_ms"])
        self.assertEqual(again["remaining_ttl_ms"], 12_500)
        self.assertEqual({k: v for k, v in again.items() if k != "remaining_ttl_ms"},
                         {k: v for k, v in first.items() if k != "remaining_ttl_ms"})
        self.assertEqual(self.srv.reservation(rid)["extension_count"], 1)  # type: ignore[index]
        self.assert_error(self.extend(rid, 5001, key="e1"), 409, "IDEMPOTENCY_MISMATCH")
        self.commit(rid, 1)
        self.assertEqual(self.extend(rid, 5000, key="e1")[2]["remaining_ttl_ms"], 0)

    def test_extend_key_is_scoped_to_the_reservation(self) -> None:
        first = self.reserve()["reservation_id"]
        second = self.reserve()["reservation_id"]
        self.assertEqual(self.extend(first, 1000, key="hb")[0], 200)
        self.assertEqual(self.extend(second, 2000, key="hb")[0], 200)

    def test_no_grace_on_extend(self) -> None:
        rid = self.reserve(ttl_ms=10_000)["reservation_id"]
        self.srv.clock.advance(10_000)
        self.assertEqual(self.extend(rid, 1000)[0], 200)
        self.srv.clock.advance(1001)
        error = self.assert_error(self.extend(rid, 1000), 410, "RESERVATION_EXPIRED")
        self.assertIn("grace", error["message"])
        self.assertEqual(self.commit(rid, 50)[0], 200)

    def test_extend_finalized_and_expired(self) -> None:
        rid = self.reserve()["reservation_id"]
        self.release(rid)
        self.assert_error(self.extend(rid, 1000), 409, "RESERVATION_FINALIZED")
        rid = self.reserve(ttl_ms=1000)["reservation_id"]
        self.srv.clock.advance(7000)
        self.assert_error(self.extend(rid, 1000), 410, "RESERVATION_EXPIRED")


# =============================================================================
# Expiry with the controllable clock
# =============================================================================


class TestExpiry(ServerTest):
    def test_commit_accepted_through_grace_window(self) -> None:
        rid = self.reserve(ttl_ms=10_000)["reservation_id"]
        self.srv.clock.advance(15_000)  # exactly expires_at + grace
        self.assertEqual(self.commit(rid, 10)[0], 200)

    def test_commit_after_grace_is_410_and_budget_returns(self) -> None:
        rid = self.reserve(500, ttl_ms=10_000)["reservation_id"]
        self.assertEqual(self.remaining(), 999_500)
        self.srv.clock.advance(15_001)
        self.assert_error(self.commit(rid, 10), 410, "RESERVATION_EXPIRED")
        self.assertEqual(self.remaining(), 1_000_000)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)
        self.assert_error(self.release(rid), 410, "RESERVATION_EXPIRED")

    def test_expired_budget_returns_without_touching_the_reservation(self) -> None:
        self.reserve(500, ttl_ms=1000)
        self.srv.clock.advance(6001)
        balances = self.http.get("/v1/balances?tenant=acme")[2]["balances"]
        self.assertEqual(balances[0]["reserved"], amount(0))
        self.assertEqual(balances[0]["remaining"], amount(1_000_000))

    def test_get_expired_is_410_and_list_shows_it(self) -> None:
        rid = self.reserve(ttl_ms=1000)["reservation_id"]
        self.srv.clock.advance(6001)
        self.assert_error(self.http.get(f"/v1/reservations/{rid}"), 410, "RESERVATION_EXPIRED")
        [row] = self.http.get("/v1/reservations")[2]["reservations"]
        self.assertEqual(row["status"], "EXPIRED")
        self.assertNotIn("finalized_at_ms", row)
        self.assertEqual(self.srv.reservation(rid)["status"], "EXPIRED")  # type: ignore[index]

    def test_custom_grace_period(self) -> None:
        rid = self.reserve(ttl_ms=1000, grace_period_ms=0)["reservation_id"]
        self.srv.clock.advance(1001)
        self.assert_error(self.commit(rid, 1), 410, "RESERVATION_EXPIRED")
        rid = self.reserve(ttl_ms=1000, grace_period_ms=60_000)["reservation_id"]
        self.srv.clock.advance(61_000)
        self.assertEqual(self.release(rid)[0], 200)

    def test_extension_postpones_expiry(self) -> None:
        rid = self.reserve(ttl_ms=1000)["reservation_id"]
        self.extend(rid, 10_000)
        self.srv.clock.advance(15_000)
        self.assertEqual(self.http.get(f"/v1/reservations/{rid}")[2]["status"], "ACTIVE")
        self.srv.clock.advance(1001)
        self.assert_error(self.http.get(f"/v1/reservations/{rid}"), 410, "RESERVATION_EXPIRED")

    def test_many_expiries_are_swept(self) -> None:
        for index in range(30):
            self.reserve(10, ttl_ms=1000 + index * 100)
        # deadlines are t0 + 1000 + 100 * i + grace 5000: advance past the first 20
        self.srv.clock.advance(6000 + 100 * 19 + 1)
        state = self.srv.balance("tenant:acme")
        self.assertEqual(state["reserved"], 100)  # the last ten are still in their grace
        self.srv.clock.advance(2000)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)


# =============================================================================
# Idempotency
# =============================================================================


class TestIdempotency(ServerTest):
    def test_create_replay_is_verbatim_except_remaining_ttl(self) -> None:
        body = self.reserve_body(key="k1")
        first = self.http.post("/v1/reservations", body)[2]
        self.srv.clock.advance(1000)
        shuffled = json.loads(json.dumps(body, sort_keys=True))
        second = self.http.post("/v1/reservations", shuffled)[2]
        self.assertEqual(second["remaining_ttl_ms"], 59_000)
        first.pop("remaining_ttl_ms")
        second.pop("remaining_ttl_ms")
        self.assertEqual(first, second)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)
        self.release(first["reservation_id"])
        self.assertEqual(self.http.post("/v1/reservations", body)[2]["remaining_ttl_ms"], 0)

    def test_replay_after_expiry_reports_zero_ttl(self) -> None:
        body = self.reserve_body(key="k1", ttl_ms=1000)
        self.http.post("/v1/reservations", body)
        self.srv.clock.advance(3000)
        self.assertEqual(self.http.post("/v1/reservations", body)[2]["remaining_ttl_ms"], 0)

    def test_different_payload_same_key_is_mismatch(self) -> None:
        self.http.post("/v1/reservations", self.reserve_body(100, key="k1"))
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(101, key="k1")),
                          409, "IDEMPOTENCY_MISMATCH")
        self.assert_error(self.http.post("/v1/reservations",
                                         self.reserve_body(100, key="k1", dry_run=True)),
                          409, "IDEMPOTENCY_MISMATCH")

    def test_dry_run_deny_is_stored_and_replayed(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=10)
        body = self.reserve_body(100, key="d1", dry_run=True)
        first = self.http.post("/v1/reservations", body)[2]
        self.srv.set_budget("tenant:acme", allocated=1_000_000)
        self.assertEqual(self.http.post("/v1/reservations", body)[2], first)
        self.assertEqual(first["decision"], "DENY")

    def test_keys_are_per_tenant(self) -> None:
        mine = self.http.post("/v1/reservations", self.reserve_body(key="same"))[2]
        body = self.reserve_body(key="same", subject={"tenant": "other"})
        theirs = self.client(OTHER_KEY).post("/v1/reservations", body)[2]
        self.assertNotEqual(mine["reservation_id"], theirs["reservation_id"])

    def test_failed_request_does_not_bind_its_key(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=50)
        body = self.reserve_body(100, key="retry")
        self.assert_error(self.http.post("/v1/reservations", body), 409, "BUDGET_EXCEEDED")
        self.srv.set_budget("tenant:acme", allocated=1000)
        self.assertEqual(self.http.post("/v1/reservations", body)[0], 200)

    def test_operations_have_separate_namespaces(self) -> None:
        rid = self.reserve(key="shared")["reservation_id"]
        self.assertEqual(self.commit(rid, 10, key="shared")[0], 200)
        self.assertEqual(self.event(5, key="shared")[0], 201)
        status, _, decision = self.decide(key="shared")
        self.assertEqual((status, decision["decision"]), (200, "ALLOW"))

    def test_decide_and_event_replay(self) -> None:
        body = self.reserve_body(key="d")
        first = self.http.post("/v1/decide", body)[2]
        self.srv.set_budget("tenant:acme", status="FROZEN")
        self.assertEqual(self.http.post("/v1/decide", body)[2], first)
        self.srv.set_budget("tenant:acme", status="ACTIVE")
        event = self.event_body(10, key="e")
        status, _, created = self.http.post("/v1/events", event)
        replay = self.http.post("/v1/events", event)
        self.assertEqual((status, replay[0], replay[2]), (201, 201, created))
        self.assertEqual(self.srv.balance("tenant:acme")["spent"], 10)
        self.assertEqual(len(self.srv.events), 1)
        event["actual"] = amount(11)
        self.assert_error(self.http.post("/v1/events", event), 409, "IDEMPOTENCY_MISMATCH")

    def test_concurrent_same_key_requests_converge(self) -> None:
        body = self.reserve_body(100, key="race")
        barrier = threading.Barrier(16)
        results: List[Response] = []
        lock = threading.Lock()

        def worker() -> None:
            client = Http(self.srv)
            try:
                barrier.wait()
                response = client.post("/v1/reservations", body)
            finally:
                client.close()
            with lock:
                results.append(response)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual({status for status, _, _ in results}, {200})
        self.assertEqual(len({body["reservation_id"] for _, _, body in results}), 1)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)
        self.assertEqual(sum(r.applied for r in self.srv.requests_for("create")), 1)


# =============================================================================
# Concurrency and the ledger invariant
# =============================================================================


class TestConcurrency(ServerTest):
    def test_many_threads_never_oversubscribe(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=100_000)
        self.srv.add_budget("tenant:acme/agent:bot", USD, 1000)
        outcomes: List[Tuple[int, Optional[str]]] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            client = Http(self.srv)
            try:
                for step in range(20):
                    body = self.reserve_body(7, key=f"w{index}-{step}",
                                             subject={"tenant": "acme", "agent": "bot"})
                    status, _, got = client.post("/v1/reservations", body)
                    rid = got.get("reservation_id") if status == 200 else None
                    if rid and step % 3 == 0:
                        self.release(rid, key=f"rel-{rid}", http=client)
                        rid = None
                    with lock:
                        outcomes.append((status, rid))
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.srv.check_invariants()
        held = [rid for status, rid in outcomes if rid]
        self.assertEqual({status for status, _ in outcomes}, {200, 409})
        agent = self.srv.balance("tenant:acme/agent:bot")
        self.assertEqual(agent["reserved"], 7 * len(held))
        self.assertLessEqual(agent["reserved"], 1000)
        self.assertGreaterEqual(agent["remaining"], 0)
        self.assertLess(agent["remaining"], 7)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 7 * len(held))
        for rid in held:
            self.assertEqual(self.commit(rid, 9)[0], 200)
        self.srv.check_invariants()

    def test_check_invariants_detects_corruption(self) -> None:
        self.reserve(10)
        self.srv.check_invariants()
        ledger = self.srv._ledger  # white box: corrupt one counter on purpose
        budget = ledger._budgets[("tenant:acme", USD)]
        budget.remaining += 1
        with self.assertRaises(AssertionError):
            self.srv.check_invariants()
        budget.remaining -= 1
        budget.reserved += 1
        budget.remaining -= 1
        with self.assertRaises(AssertionError):
            self.srv.check_invariants()
        budget.reserved -= 1
        budget.remaining += 1


# =============================================================================
# Tenant status
# =============================================================================


class TestTenantClosed(ServerTest):
    def test_closed_tenant_per_endpoint(self) -> None:
        rid = self.reserve()["reservation_id"]
        committed = self.reserve()["reservation_id"]
        commit_response = self.commit(committed, 10, key="pre-close")
        self.srv.set_tenant_status("acme", "CLOSED")
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body()),
                          409, "TENANT_CLOSED")
        dry = self.http.post("/v1/reservations", self.reserve_body(dry_run=True))
        self.assertEqual((dry[0], dry[2]["decision"], dry[2]["reason_code"]),
                         (200, "DENY", "TENANT_CLOSED"))
        decision = self.decide()
        self.assertEqual((decision[0], decision[2]["reason_code"]), (200, "TENANT_CLOSED"))
        self.assert_error(self.commit(rid, 1), 409, "TENANT_CLOSED")
        self.assert_error(self.release(rid), 409, "TENANT_CLOSED")
        self.assert_error(self.extend(rid, 1000), 409, "TENANT_CLOSED")
        self.assert_error(self.event(1), 409, "TENANT_CLOSED")
        # TENANT_CLOSED beats RESERVATION_FINALIZED, a replay beats TENANT_CLOSED.
        self.assert_error(self.commit(committed, 10, key="other-key"), 409, "TENANT_CLOSED")
        replay = self.commit(committed, 10, key="pre-close")
        self.assertEqual((replay[0], replay[2]), (commit_response[0], commit_response[2]))
        # Reads stay available.
        self.assertEqual(self.http.get(f"/v1/reservations/{rid}")[0], 200)
        self.assertEqual(self.http.get("/v1/reservations")[0], 200)
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        admin = self.client(None)
        self.assert_error(admin.post(f"/v1/reservations/{rid}/release", {"idempotency_key": "a"},
                                     headers={"X-Admin-API-Key": ADMIN_KEY}),
                          409, "TENANT_CLOSED")

    def test_replay_of_pre_close_create_beats_tenant_closed(self) -> None:
        body = self.reserve_body(key="before")
        first = self.http.post("/v1/reservations", body)[2]
        self.srv.set_tenant_status("acme", "CLOSED")
        status, _, again = self.http.post("/v1/reservations", body)
        self.assertEqual((status, again["reservation_id"]), (200, first["reservation_id"]))

    def test_suspended_tenant_passes(self) -> None:
        self.srv.set_tenant_status("acme", "SUSPENDED")
        self.assertEqual(self.reserve()["decision"], "ALLOW")

    def test_malformed_tenant_record_fails_closed_even_on_dry_run(self) -> None:
        self.srv.set_tenant_status("acme", "MALFORMED")
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body()),
                          500, "INTERNAL_ERROR")
        self.assert_error(self.http.post("/v1/reservations", self.reserve_body(dry_run=True)),
                          500, "INTERNAL_ERROR")
        self.assert_error(self.decide(), 500, "INTERNAL_ERROR")
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)

    def test_malformed_tenant_record_blocks_settlement_too(self) -> None:
        rid = self.reserve()["reservation_id"]
        self.srv.set_tenant_status("acme", "MALFORMED")
        self.assert_error(self.commit(rid, 1), 500, "INTERNAL_ERROR")
        self.assert_error(self.release(rid), 500, "INTERNAL_ERROR")
        self.assert_error(self.extend(rid, 10), 500, "INTERNAL_ERROR")
        self.assert_error(self.event(1), 500, "INTERNAL_ERROR")
        self.assertEqual(self.http.get(f"/v1/reservations/{rid}")[0], 200)
        self.srv.set_tenant_status("acme", "ACTIVE")
        self.assertEqual(self.commit(rid, 1)[0], 200)


# =============================================================================
# decide and events
# =============================================================================


class TestDecide(ServerTest):
    def test_allow_and_no_mutation(self) -> None:
        status, headers, body = self.decide(100)
        self.assertEqual(status, 200)
        self.assertEqual(body, {"decision": "ALLOW", "affected_scopes": ["tenant:acme"]})
        self.assertEqual(headers["x-ratelimit-remaining"], "-1")
        self.assertEqual(self.remaining(), 1_000_000)

    def test_missing_budget_is_deny_not_404(self) -> None:
        self.srv.add_tenant("ghost")
        self.srv.add_api_key("ghost-key", "ghost")
        body = self.reserve_body(subject={"tenant": "ghost"})
        status, _, decision = self.client("ghost-key").post("/v1/decide", body)
        self.assertEqual((status, decision["decision"], decision["reason_code"]),
                         (200, "DENY", "BUDGET_NOT_FOUND"))

    def test_idempotency_mismatch_is_the_only_409(self) -> None:
        self.assertEqual(self.decide(100, key="d")[0], 200)
        self.assert_error(self.decide(101, key="d"), 409, "IDEMPOTENCY_MISMATCH")
        self.srv.set_budget("tenant:acme", is_over_limit=True, debt=5)
        status, _, body = self.decide(100)
        self.assertEqual((status, body["reason_code"]), (200, "OVERDRAFT_LIMIT_EXCEEDED"))

    def test_unit_mismatch_is_400(self) -> None:
        self.srv.add_tenant("solo")
        self.srv.add_api_key("solo-key", "solo")
        self.srv.add_budget("tenant:solo", TOKENS, 10)
        body = self.reserve_body(subject={"tenant": "solo"})
        self.assert_error(self.client("solo-key").post("/v1/decide", body),
                          400, "UNIT_MISMATCH")


class TestEvents(ServerTest):
    def test_event_applies_and_returns_201(self) -> None:
        status, headers, body = self.event(250, metadata={"m": 1}, client_time_ms=5)
        self.assertEqual((status, body["status"]), (201, "APPLIED"))
        self.assertTrue(body["event_id"].startswith("evt_"))
        self.assertNotIn("charged", body)
        self.assertEqual(headers["x-cycles-tenant"], "acme")
        self.assertEqual(self.srv.balance("tenant:acme")["spent"], 250)
        [event] = self.srv.events
        self.assertEqual((event["event_id"], event["actual"], event["charged"],
                          event["metadata"]), (body["event_id"], amount(250), amount(250),
                                               {"m": 1}))
        self.assertEqual(event["action"], {"kind": "tool.search", "name": "web.search"})
        self.assertEqual(event["subject"], {"tenant": "acme"})

    def test_allow_if_available_caps_and_reports_charged(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=100)
        body = self.event(250)[2]
        self.assertEqual(body["charged"], amount(100))
        state = self.srv.balance("tenant:acme")
        self.assertEqual((state["spent"], state["remaining"], state["debt"],
                          state["is_over_limit"]), (100, 0, 0, True))
        self.assertEqual(self.event(5)[0], 201)  # events are not blocked by over-limit

    def test_reject_and_overdraft(self) -> None:
        self.srv.set_budget("tenant:acme", allocated=100, overdraft_limit=50)
        self.assert_error(self.event(101, overage_policy="REJECT"), 409, "BUDGET_EXCEEDED")
        self.assertEqual(self.event(100, overage_policy="REJECT")[0], 201)
        self.assert_error(self.event(51, overage_policy="ALLOW_WITH_OVERDRAFT"),
                          409, "OVERDRAFT_LIMIT_EXCEEDED")
        body = self.event(30, overage_policy="ALLOW_WITH_OVERDRAFT")[2]
        self.assertNotIn("charged", body)
        state = self.srv.balance("tenant:acme")
        self.assertEqual((state["spent"], state["debt"], state["remaining"]), (100, 30, -30))
        self.assertEqual(self.event(20, overage_policy="ALLOW_WITH_OVERDRAFT")[0], 201)
        self.assertEqual(self.srv.balance("tenant:acme")["debt"], 50)

    def test_budget_state_and_lookup_errors(self) -> None:
        self.srv.set_budget("tenant:acme", status="FROZEN")
        self.assert_error(self.event(1), 409, "BUDGET_FROZEN")
        self.srv.set_budget("tenant:acme", status="CLOSED")
        self.assert_error(self.event(1), 409, "BUDGET_CLOSED")
        self.srv.set_budget("tenant:acme", status="ACTIVE", debt=10)
        self.assertEqual(self.event(1)[0], 201)  # debt blocks reservations only
        self.assert_error(self.event(1, unit=TOKENS), 400, "UNIT_MISMATCH")
        self.srv.add_tenant("ghost")
        self.srv.add_api_key("ghost-key", "ghost")
        body = self.event_body(1, subject={"tenant": "ghost"})
        error = self.assert_error(self.client("ghost-key").post("/v1/events", body),
                                  404, "NOT_FOUND")
        self.assertIn("Budget not found", error["message"])


# =============================================================================
# listReservations and getReservation
# =============================================================================


class TestList(ServerTest):
    def setUp(self) -> None:
        super().setUp()
        self.srv.add_budget("tenant:acme/workspace:prod", USD, 100_000)
        self.ids: List[str] = []
        specs = [(300, "prod", "a"), (100, None, "b"), (200, "prod", "c")]
        for index, (value, workspace, agent) in enumerate(specs):
            subject = {"tenant": "acme", "agent": agent}
            if workspace:
                subject["workspace"] = workspace
            created = self.reserve(value, subject=subject, key=f"create-{index}",
                                   metadata={"i": index})
            self.ids.append(created["reservation_id"])
            self.srv.clock.advance(1000)
        self.commit(self.ids[0], 250, metadata={"c": 1})      # at t0 + 3000
        self.srv.clock.advance(1000)
        self.release(self.ids[1])                              # at t0 + 4000

    def list_ids(self, **params: Any) -> List[str]:
        status, _, body = self.http.get("/v1/reservations?" + urlencode(params))
        self.assertEqual(status, 200, body)
        return [row["reservation_id"] for row in body["reservations"]]

    def test_default_order_is_newest_first(self) -> None:
        self.assertEqual(self.list_ids(), list(reversed(self.ids)))

    def test_summary_projection(self) -> None:
        rows = {r["reservation_id"]: r for r in self.http.get("/v1/reservations")[2]
                ["reservations"]}
        committed = rows[self.ids[0]]
        self.assertEqual(committed["committed"], amount(250))
        self.assertEqual(committed["finalized_at_ms"], self.t0 + 3000)
        self.assertEqual(committed["idempotency_key"], "create-0")
        for absent in ("metadata", "committed_metadata", "evidence"):
            self.assertNotIn(absent, committed)
        self.assertNotIn("committed", rows[self.ids[1]])
        self.assertNotIn("finalized_at_ms", rows[self.ids[2]])
        included = self.http.get("/v1/reservations?include=metadata,%20committed_metadata,,"
                                 "bogus")[2]["reservations"]
        by_id = {r["reservation_id"]: r for r in included}
        self.assertEqual(by_id[self.ids[0]]["metadata"], {"i": 0})
        self.assertEqual(by_id[self.ids[0]]["committed_metadata"], {"c": 1})
        self.assertNotIn("committed_metadata", by_id[self.ids[2]])

    def test_get_detail_always_has_metadata(self) -> None:
        detail = self.http.get(f"/v1/reservations/{self.ids[0]}")[2]
        self.assertEqual((detail["metadata"], detail["committed_metadata"]),
                         ({"i": 0}, {"c": 1}))
        self.assertEqual(detail["affected_scopes"], [
            "tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:a"])

    def test_filters(self) -> None:
        self.assertEqual(self.list_ids(status="ACTIVE"), [self.ids[2]])
        self.assertEqual(self.list_ids(status="COMMITTED"), [self.ids[0]])
        self.assertEqual(self.list_ids(idempotency_key="create-1"), [self.ids[1]])
        self.assertEqual(self.list_ids(idempotency_key="nope"), [])
        self.assertEqual(set(self.list_ids(workspace="prod")), {self.ids[0], self.ids[2]})
        self.assertEqual(self.list_ids(agent="B"), [self.ids[1]])
        self.assertEqual(self.list_ids(tenant="acme", workspace="prod", agent="c"),
                         [self.ids[2]])
        self.assert_error(self.http.get("/v1/reservations?status=DONE"), 400, "INVALID_REQUEST")

    def test_time_windows(self) -> None:
        t0 = self.t0
        self.assertEqual(set(self.list_ids(**{"from": iso(t0 + 1000)})),
                         {self.ids[1], self.ids[2]})
        self.assertEqual(set(self.list_ids(to=iso(t0 + 1000))), {self.ids[0], self.ids[1]})
        self.assertEqual(self.list_ids(**{"from": iso(t0 + 1000), "to": iso(t0 + 1000)}),
                         [self.ids[1]])
        self.assertEqual(self.list_ids(finalized_from=iso(t0 + 3500)), [self.ids[1]])
        self.assertEqual(set(self.list_ids(finalized_to=iso(t0 + 9999))),
                         {self.ids[0], self.ids[1]})
        self.assertEqual(self.list_ids(expires_from=iso(t0 + 62_000)), [self.ids[2]])
        self.assertEqual(set(self.list_ids(expires_to=iso(t0 + 61_000))),
                         {self.ids[0], self.ids[1]})
        zulu = iso(t0 + 1000).replace("+00:00", "Z")
        self.assertEqual(set(self.list_ids(**{"from": zulu})), {self.ids[1], self.ids[2]})
        shifted = datetime.datetime.fromtimestamp((t0 + 1000) / 1000.0, tz=datetime.timezone(
            datetime.timedelta(hours=2))).isoformat(timespec="milliseconds")
        self.assertEqual(set(self.list_ids(**{"from": shifted})), {self.ids[1], self.ids[2]})

    def test_blank_window_is_unset_and_bad_windows_are_400(self) -> None:
        self.assertEqual(len(self.list_ids(**{"from": "", "to": "", "expires_from": "",
                                              "finalized_to": ""})), 3)
        for params in ({"from": iso(self.t0 + 5), "to": iso(self.t0)},
                       {"expires_from": iso(self.t0 + 5), "expires_to": iso(self.t0)},
                       {"finalized_from": iso(self.t0 + 5), "finalized_to": iso(self.t0)},
                       {"from": "yesterday"}, {"to": "2026-13-01T00:00:00Z"},
                       {"from": "2026-01-01T00:00:00"}):
            self.assert_error(self.http.get("/v1/reservations?" + urlencode(params)),
                              400, "INVALID_REQUEST")

    def test_sorting(self) -> None:
        self.assertEqual(self.list_ids(sort_by="reserved", sort_dir="asc"),
                         [self.ids[1], self.ids[2], self.ids[0]])
        self.assertEqual(self.list_ids(sort_by="reserved"),
                         [self.ids[0], self.ids[2], self.ids[1]])
        self.assertEqual(self.list_ids(sort_by="created_at_ms", sort_dir="asc"), self.ids)
        paths = self.list_ids(sort_by="scope_path", sort_dir="asc")
        self.assertEqual(paths, [self.ids[1], self.ids[0], self.ids[2]])
        self.assertEqual(self.list_ids(sort_by="status", sort_dir="asc"),
                         [self.ids[2], self.ids[0], self.ids[1]])
        self.assertEqual(sorted(self.list_ids(sort_by="reservation_id", sort_dir="asc")),
                         self.list_ids(sort_by="reservation_id", sort_dir="asc"))
        self.assertEqual(len(self.list_ids(sort_by="tenant")), 3)
        self.assertEqual(len(self.list_ids(sort_by="expires_at_ms")), 3)
        for params in ({"sort_by": "amount"}, {"sort_dir": "up"}):
            self.assert_error(self.http.get("/v1/reservations?" + urlencode(params)),
                              400, "INVALID_REQUEST")

    def test_limit_bounds(self) -> None:
        for limit in ("0", "201", "-1", "ten", "1.5"):
            self.assert_error(self.http.get(f"/v1/reservations?limit={limit}"),
                              400, "INVALID_REQUEST")
        self.assertEqual(len(self.list_ids(limit=1)), 1)
        self.assertEqual(len(self.list_ids(limit=200)), 3)

    def test_cursor_pages_through_everything_once(self) -> None:
        for index in range(8):
            self.reserve(50, key=f"extra-{index}")  # equal amounts: ties across pages
        for params in ({}, {"sort_by": "reserved", "sort_dir": "asc"},
                       {"sort_by": "reserved"}, {"sort_by": "status", "sort_dir": "asc"}):
            seen: List[str] = []
            query = dict(params, limit=3)
            while True:
                status, _, body = self.http.get("/v1/reservations?" + urlencode(query))
                self.assertEqual(status, 200, body)
                seen.extend(row["reservation_id"] for row in body["reservations"])
                if not body["has_more"]:
                    self.assertNotIn("next_cursor", body)
                    break
                query["cursor"] = body["next_cursor"]
            self.assertEqual(len(seen), 11, params)
            self.assertEqual(len(set(seen)), 11, params)
            self.assertEqual(seen, self.list_ids(**params), params)

    def test_cursor_is_bound_to_filters_windows_and_sort_but_not_include(self) -> None:
        first = self.http.get("/v1/reservations?limit=1&" + urlencode(
            {"from": iso(self.t0)}))[2]
        cursor = first["next_cursor"]
        good = {"limit": 1, "from": iso(self.t0), "cursor": cursor}
        self.assertEqual(self.http.get("/v1/reservations?" + urlencode(
            dict(good, include="metadata")))[0], 200)
        for changed in ({"from": iso(self.t0 + 1)}, {"to": iso(self.t0 + 99_999)},
                        {"status": "ACTIVE"}, {"sort_by": "reserved"}, {"sort_dir": "asc"},
                        {"agent": "a"}):
            response = self.http.get("/v1/reservations?" + urlencode(dict(good, **changed)))
            self.assert_error(response, 400, "INVALID_REQUEST")
        for garbage in ("x", "!!!", "eyJhIjoxfQ"):
            self.assert_error(self.http.get(f"/v1/reservations?cursor={garbage}"),
                              400, "INVALID_REQUEST")

    def test_list_is_tenant_scoped(self) -> None:
        self.assertEqual(self.client(OTHER_KEY).get("/v1/reservations")[2]["reservations"], [])


# =============================================================================
# getBalances
# =============================================================================


class TestBalances(ServerTest):
    def setUp(self) -> None:
        super().setUp()
        self.srv.add_budget("tenant:acme", TOKENS, 500)
        self.srv.add_budget("tenant:acme/workspace:prod", USD, 1000, overdraft_limit=10,
                            debt=4)
        self.srv.add_budget("tenant:acme/workspace:prod/agent:bot", USD, 100,
                            is_over_limit=True)

    def scopes(self, query: str) -> List[Tuple[str, str]]:
        status, _, body = self.http.get("/v1/balances?" + query)
        self.assertEqual(status, 200, body)
        return [(b["scope_path"], b["remaining"]["unit"]) for b in body["balances"]]

    def test_subject_filter_is_required(self) -> None:
        self.assert_error(self.http.get("/v1/balances"), 400, "INVALID_REQUEST")
        self.assert_error(self.http.get("/v1/balances?include_children=true"),
                          400, "INVALID_REQUEST")
        self.assert_error(self.http.get("/v1/balances?tenant="), 400, "INVALID_REQUEST")

    def test_filters_match_segments_within_the_tenant(self) -> None:
        self.assertEqual(len(self.scopes("tenant=acme")), 4)
        self.assertEqual(self.scopes("workspace=prod"), [
            ("tenant:acme/workspace:prod", USD), ("tenant:acme/workspace:prod/agent:bot", USD)])
        self.assertEqual(self.scopes("agent=BOT"),
                         [("tenant:acme/workspace:prod/agent:bot", USD)])
        self.assertEqual(self.scopes("app=none"), [])
        other = self.client(OTHER_KEY).get("/v1/balances?workspace=prod")[2]["balances"]
        self.assertEqual(other, [])

    def test_balance_shape(self) -> None:
        body = self.http.get("/v1/balances?agent=bot")[2]
        [bot] = body["balances"]
        self.assertEqual(bot["scope"], "agent:bot")
        self.assertTrue(bot["is_over_limit"])
        self.assertNotIn("debt", bot)
        self.assertNotIn("overdraft_limit", bot)
        prod = self.http.get("/v1/balances?workspace=prod&limit=1")[2]["balances"][0]
        self.assertEqual((prod["debt"], prod["overdraft_limit"], prod["remaining"]),
                         (amount(4), amount(10), amount(996)))
        self.assertNotIn("is_over_limit", prod)
        self.assertEqual(set(prod), {"scope", "scope_path", "remaining", "reserved", "spent",
                                     "allocated", "debt", "overdraft_limit"})

    def test_pagination_and_cursor_binding(self) -> None:
        seen: List[Tuple[str, str]] = []
        query = "tenant=acme&limit=3"
        cursor = None
        while True:
            status, _, body = self.http.get("/v1/balances?" + query + (
                f"&cursor={cursor}" if cursor else ""))
            self.assertEqual(status, 200)
            seen.extend((b["scope_path"], b["remaining"]["unit"]) for b in body["balances"])
            if not body["has_more"]:
                break
            cursor = body["next_cursor"]
            self.assert_error(self.http.get(f"/v1/balances?workspace=prod&cursor={cursor}"),
                              400, "INVALID_REQUEST")
        self.assertEqual(seen, sorted(self.scopes("tenant=acme")))
        self.assertEqual(len(seen), 4)
        for limit in ("0", "201", "x"):
            self.assert_error(self.http.get(f"/v1/balances?tenant=acme&limit={limit}"),
                              400, "INVALID_REQUEST")


class TestEvidence(ServerTest):
    def test_evidence_endpoints_are_public_404(self) -> None:
        self.assert_error(self.http.get("/v1/evidence/" + "a" * 64, api_key=None),
                          404, "NOT_FOUND")
        self.assert_error(self.http.get("/v1/evidence/not-hex", api_key=None),
                          400, "INVALID_REQUEST")
        self.assert_error(self.http.get("/v1/.well-known/cycles-jwks.json", api_key=None),
                          404, "NOT_FOUND")
        self.assertEqual([r.operation for r in self.srv.requests],
                         ["evidence", "evidence", "jwks"])


# =============================================================================
# Fault injection
# =============================================================================


class TestFaults(ServerTest):
    def raw_exchange(self, client: Http, body: Dict[str, Any]
                     ) -> Tuple[int, Dict[str, str], bytes]:
        client.conn.request("POST", "/v1/reservations", body=json.dumps(body), headers={
            "Content-Type": "application/json", "X-Cycles-API-Key": KEY})
        response = client.conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())

    def test_lost_response_applies_then_drops(self) -> None:
        self.srv.inject("create", "lost_response")
        body = self.reserve_body(key="lost")
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.http.post("/v1/reservations", body)
        self.http.close()
        [entry] = self.srv.requests_for("create")
        self.assertEqual((entry.status, entry.applied, entry.fault),
                         (None, True, "lost_response"))
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)
        status, _, replay = self.http.post("/v1/reservations", body)
        self.assertEqual(status, 200)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)
        self.assertEqual(self.srv.reservation(replay["reservation_id"])["status"],  # type: ignore[index]
                         "ACTIVE")

    def test_drop_does_not_apply(self) -> None:
        self.srv.inject("create", "drop")
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.http.post("/v1/reservations", self.reserve_body())
        self.http.close()
        [entry] = self.srv.requests_for("create")
        self.assertEqual((entry.status, entry.applied, entry.fault), (None, False, "drop"))
        self.assertEqual(entry.body["estimate"], amount(100))
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)

    def test_delay(self) -> None:
        self.srv.inject("decide", "delay", delay_ms=150)
        started = time.perf_counter()
        self.assertEqual(self.decide()[0], 200)
        self.assertGreaterEqual(time.perf_counter() - started, 0.14)

    def test_status_with_generated_error_body_and_headers(self) -> None:
        self.srv.inject("create", "status", status=429, headers={"Retry-After": "2"})
        response = self.http.post("/v1/reservations", self.reserve_body())
        self.assert_error(response, 429, "LIMIT_EXCEEDED")
        self.assertEqual(response[1]["retry-after"], "2")
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)
        for status, code in ((503, "INTERNAL_ERROR"), (500, "INTERNAL_ERROR"),
                             (401, "UNAUTHORIZED"), (400, "INVALID_REQUEST"),
                             (403, "FORBIDDEN"), (404, "NOT_FOUND"),
                             (410, "RESERVATION_EXPIRED")):
            self.srv.inject("*", "status", status=status)
            self.assert_error(self.http.post("/v1/reservations", self.reserve_body()),
                              status, code)
        self.srv.inject("*", "status", status=409, error="BUDGET_EXCEEDED", message="no")
        error = self.assert_error(self.http.post("/v1/reservations", self.reserve_body()),
                                  409, "BUDGET_EXCEEDED")
        self.assertEqual(error["message"], "no")
        with self.assertRaises(ValueError):
            self.srv.inject("*", "status", status=409)
        self.assertFalse(any(r.applied for r in self.srv.requests))

    def test_status_with_custom_bodies(self) -> None:
        self.srv.inject("decide", "status", status=200, body={"decision": "MAYBE"})
        self.assertEqual(self.decide()[2], {"decision": "MAYBE"})
        self.srv.inject("decide", "status", status=500, body="oops", content_type="text/plain")
        status, headers, body = self.decide()
        self.assertEqual((status, headers["content-type"], body), (500, "text/plain", b"oops"))
        self.srv.inject("decide", "status", status=502, body=b"\x00\x01")
        self.assertEqual(self.decide()[2], b"\x00\x01")

    def test_nonconformant_applies_and_rewrites(self) -> None:
        rid = self.reserve()["reservation_id"]
        self.srv.inject("commit", "nonconformant", status=202, drop_fields=["charged"],
                        set_fields={"status": "WEIRD"})
        status, _, body = self.commit(rid, 50)
        self.assertEqual((status, body["status"]), (202, "WEIRD"))
        self.assertNotIn("charged", body)
        self.assertEqual(self.srv.reservation(rid)["status"], "COMMITTED")  # type: ignore[index]
        self.assertTrue(self.srv.requests[-1].applied)

    def test_malformed_body(self) -> None:
        self.srv.inject("create", "malformed")
        status, headers, body = self.http.post("/v1/reservations", self.reserve_body())
        self.assertEqual((status, headers["content-type"]), (200, "application/json"))
        self.assertIsInstance(body, bytes)
        self.assertTrue(self.srv.requests[-1].applied)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)
        self.srv.inject("create", "malformed", apply=False)
        status, _, body = self.http.post("/v1/reservations", self.reserve_body())
        self.assertEqual(status, 200)
        self.assertIsInstance(body, bytes)
        self.assertFalse(self.srv.requests[-1].applied)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 100)

    def test_html_proxy_page(self) -> None:
        self.srv.inject("create", "html")
        status, headers, body = self.http.post("/v1/reservations", self.reserve_body())
        self.assertEqual((status, headers["content-type"]), (502, "text/html"))
        self.assertIn(b"<html>", body)
        self.assertEqual(self.srv.balance("tenant:acme")["reserved"], 0)
        self.srv.inject("create", "html", status=504)
        self.assertEqual(self.http.post("/v1/reservations", self.reserve_body())[0], 504)

    def test_redirect(self) -> None:
        self.srv.inject("list", "redirect")
        status, headers, _ = self.http.get("/v1/reservations?limit=5")
        self.assertEqual(status, 307)
        self.assertEqual(headers["location"],
                         f"http://127.0.0.2:{self.srv.port}/v1/reservations?limit=5")
        self.srv.inject("list", "redirect", status=302, location="https://example.invalid/x")
        status, headers, _ = self.http.get("/v1/reservations")
        self.assertEqual((status, headers["location"]), (302, "https://example.invalid/x"))

    def test_trickle_sends_the_body_slowly(self) -> None:
        self.srv.inject("decide", "trickle", interval_ms=4)
        self.http.conn.request("POST", "/v1/decide", body=json.dumps(self.reserve_body()),
                               headers={"Content-Type": "application/json",
                                        "X-Cycles-API-Key": KEY})
        response = self.http.conn.getresponse()
        started = time.perf_counter()
        data = response.read()
        elapsed = time.perf_counter() - started
        self.assertEqual(json.loads(data)["decision"], "ALLOW")
        self.assertGreaterEqual(elapsed, (len(data) - 2) * 0.004 * 0.8)
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.assertEqual(self.srv.connections_accepted, 1)

    def test_trickle_times_out_a_client_and_stop_stays_prompt(self) -> None:
        self.srv.inject("decide", "trickle", interval_ms=300)
        impatient = Http(self.srv, timeout=0.2)
        self.addCleanup(impatient.close)
        with self.assertRaises(OSError):
            impatient.post("/v1/decide", self.reserve_body())
        started = time.perf_counter()
        self.srv.stop()
        self.assertLess(time.perf_counter() - started, 1.0)

    def test_close_after_makes_the_pooled_connection_stale(self) -> None:
        self.srv.inject("*", "close_after")
        status, headers, _ = self.http.get("/v1/balances?tenant=acme")
        self.assertEqual(status, 200)
        self.assertNotEqual(headers.get("connection"), "close")
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.http.get("/v1/balances?tenant=acme")
        self.http.close()
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.assertEqual(self.srv.connections_accepted, 2)

    def test_close_idle_connections(self) -> None:
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.assertEqual(self.srv.connections_accepted, 1)
        self.assertEqual(self.srv.close_idle_connections(), 1)
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.http.get("/v1/balances?tenant=acme")
        self.http.close()
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.assertEqual(self.srv.connections_accepted, 2)

    def test_times_skip_and_wildcard(self) -> None:
        fault = self.srv.inject("decide", "status", status=503, times=2, skip=1)
        statuses = [self.decide()[0] for _ in range(5)]
        self.assertEqual(statuses, [200, 503, 503, 200, 200])
        self.assertEqual(fault.hits, 2)
        self.srv.inject("*", "status", status=500)
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 500)
        self.assertEqual(self.http.get("/v1/balances?tenant=acme")[0], 200)
        self.srv.inject("create", "status", status=503, times=None)
        for _ in range(3):
            self.assertEqual(self.http.post("/v1/reservations", self.reserve_body())[0], 503)
        self.assertEqual(self.decide()[0], 200)
        self.srv.clear_faults()
        self.assertEqual(self.http.post("/v1/reservations", self.reserve_body())[0], 200)
        faulted = [r.fault for r in self.srv.requests_for("decide")]
        self.assertEqual(faulted, [None, "status", "status", None, None, None])

    def test_inject_validates_its_arguments(self) -> None:
        cases: Tuple[Tuple[Tuple[str, str], Dict[str, Any]], ...] = (
                             (("create", "explode"), {}), (("nope", "drop"), {}),
                             (("create", "drop"), {"times": 0}),
                             (("create", "drop"), {"skip": -1}),
                             (("create", "delay"), {}),
                             (("create", "delay"), {"delay_ms": 5, "typo": 1}),
                             (("create", "status"), {}),
                             (("create", "status"), {"status": 99}),
                             (("create", "trickle"), {"interval_ms": -1}))
        for args, kwargs in cases:
            with self.assertRaises(ValueError, msg=(args, kwargs)):
                self.srv.inject(*args, **kwargs)


# =============================================================================
# Python API: lifecycle, seeding, clock, request log, TLS
# =============================================================================


class TestPublicApi(unittest.TestCase):
    def test_clock(self) -> None:
        srv = LocalCyclesServer()
        before = srv.clock.now_ms()
        self.assertAlmostEqual(before, time.time() * 1000, delta=1000)
        self.assertGreaterEqual(srv.clock.advance(5000), before + 5000)
        frozen = srv.clock.freeze()
        self.assertEqual(srv.clock.now_ms(), frozen)
        self.assertEqual(srv.clock.advance(10), frozen + 10)
        srv.clock.unfreeze()
        self.assertGreaterEqual(srv.clock.now_ms(), frozen + 10)
        with self.assertRaises(ValueError):
            srv.clock.advance(-1)

    def test_context_manager_lifecycle_and_threads(self) -> None:
        threads_before = {t.ident for t in threading.enumerate()}
        with LocalCyclesServer(api_keys={KEY: "acme"}) as srv:
            self.assertTrue(srv.url.startswith("http://127.0.0.1:"))
            self.assertEqual(srv.url, f"http://127.0.0.1:{srv.port}")
            self.assertNotEqual(srv.port, 0)
            client = Http(srv)
            client.get("/v1/balances?tenant=acme")
            client.close()
            with self.assertRaises(RuntimeError):
                srv.start()
        leftover = [t for t in threading.enumerate()
                    if t.ident not in threads_before and t.is_alive()]
        self.assertEqual(leftover, [])
        srv.stop()  # idempotent
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()

    def test_stop_closes_open_keep_alive_connections(self) -> None:
        srv = LocalCyclesServer(api_keys={KEY: "acme"}).start()
        client = Http(srv)
        self.addCleanup(client.close)
        client.get("/v1/balances?tenant=acme")
        started = time.perf_counter()
        srv.stop()
        self.assertLess(time.perf_counter() - started, 1.0)
        with self.assertRaises((http.client.HTTPException, OSError)):
            client.get("/v1/balances?tenant=acme")

    def test_seeding_from_constructor(self) -> None:
        srv = LocalCyclesServer(
            api_keys={"k1": "auto"},
            admin_keys=["adm"],
            tenants={"acme": "ACTIVE", "closed": {"status": "CLOSED", "max_extensions": 3}},
            budgets=[{"scope": "tenant:Acme/Agent:x".replace("Agent", "agent"),
                      "allocated": 10, "caps": {"max_tokens": 5}, "overdraft_limit": 3,
                      "spent": 2, "debt": 1, "status": "FROZEN", "is_over_limit": True}],
        )
        state = srv.balance("tenant:acme/agent:x")
        self.assertEqual(state, {
            "scope": "tenant:acme/agent:x", "unit": USD, "allocated": 10, "spent": 2,
            "reserved": 0, "debt": 1, "remaining": 7, "overdraft_limit": 3,
            "is_over_limit": True, "status": "FROZEN", "caps": {"max_tokens": 5}})
        srv.check_invariants()
        self.assertIsNone(srv.reservation("nope"))
        self.assertEqual(srv.events, [])

    def test_seeding_validation(self) -> None:
        srv = LocalCyclesServer()
        for call in (
            lambda: srv.add_budget("acme", USD, 1),
            lambda: srv.add_budget("agent:x", USD, 1),
            lambda: srv.add_budget("tenant:acme/tenant:b", USD, 1),
            lambda: srv.add_budget("tenant:a b", USD, 1),
            lambda: srv.add_budget("tenant:acme", "EUR", 1),
            lambda: srv.add_budget("tenant:acme", USD, -1),
            lambda: srv.add_budget("tenant:acme", USD, 1.5),  # type: ignore[arg-type]
            lambda: srv.add_budget("tenant:acme", USD, 1, status="OPEN"),
            lambda: srv.add_budget("tenant:acme", USD, 1, caps={"max_tokens": -1}),
            lambda: srv.add_budget("tenant:acme", USD, 1, caps={"bogus": 1}),
            lambda: srv.add_tenant("acme", "DELETED"),
            lambda: srv.add_tenant("acme", "ACTIVE", ttl=5),
            lambda: srv.add_tenant("bad name"),
            lambda: srv.set_budget("tenant:acme", USD, allocated=1),
            lambda: srv.add_api_key("", "acme"),
            lambda: LocalCyclesServer(default_ttl_ms=0),
            lambda: LocalCyclesServer(budgets=[{"allocated": 1}]),
        ):
            with self.assertRaises((ValueError, KeyError)):
                call()
        srv.add_budget("tenant:acme", USD, 1)
        with self.assertRaises(ValueError):
            srv.add_budget("tenant:acme", USD, 1)
        with self.assertRaises(ValueError):
            srv.set_budget("tenant:acme", USD, reserved=5)
        with self.assertRaises(KeyError):
            srv.set_tenant_status("missing", "CLOSED")

    def test_fund_repays_debt_first_and_clears_over_limit(self) -> None:
        srv = LocalCyclesServer()
        srv.add_budget("tenant:acme", USD, 100, debt=150, overdraft_limit=100,
                       is_over_limit=True)
        srv.fund("tenant:acme", 80)
        state = srv.balance("tenant:acme")
        self.assertEqual((state["debt"], state["spent"], state["remaining"],
                          state["is_over_limit"]), (70, 80, 30, False))
        srv.check_invariants()

    def test_request_log_and_redaction(self) -> None:
        stream = io.StringIO()
        with LocalCyclesServer(api_keys={KEY: "acme"}, log_stream=stream,
                               budgets=[{"scope": "tenant:acme", "allocated": 100}]) as srv:
            client = Http(srv)
            body = {"idempotency_key": "x", "subject": {"tenant": "acme"},
                    "action": {"kind": "k", "name": "n"}, "estimate": amount(5)}
            client.post("/v1/reservations?debug=1", body, headers={"X-Custom": "yes"})
            client.get("/v1/balances?tenant=acme&limit=5")
            client.close()
            entry = srv.requests[0]
            self.assertEqual((entry.method, entry.path, entry.query, entry.operation),
                             ("POST", "/v1/reservations", {"debug": "1"}, "create"))
            self.assertEqual(entry.headers["x-custom"], "yes")
            self.assertEqual(entry.headers["x-cycles-api-key"], KEY)
            self.assertEqual(entry.body, body)
            self.assertEqual(json.loads(entry.raw_body), body)
            self.assertEqual(entry.status, 200)
            self.assertEqual(entry.response_body["decision"], "ALLOW")
            self.assertTrue(entry.applied)
            self.assertIsNone(entry.fault)
            self.assertAlmostEqual(entry.time_ms, srv.clock.now_ms(), delta=5000)
            self.assertNotIn(KEY, repr(entry))
            self.assertIn("<redacted>", repr(entry))
            self.assertEqual([r.operation for r in srv.requests_for("balances")], ["balances"])
            self.assertEqual(srv.requests[1].query, {"tenant": "acme", "limit": "5"})
            snapshot = srv.requests
            srv.clear_requests()
            self.assertEqual(srv.requests, [])
            self.assertEqual(len(snapshot), 2)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("POST /v1/reservations 200 op=create tenant=acme", lines[0])
        self.assertNotIn(KEY, stream.getvalue())
        self.assertNotIn(KEY, repr(srv))

    def test_request_log_is_bounded(self) -> None:
        with LocalCyclesServer(max_logged_requests=3) as srv:
            client = Http(srv)
            for _ in range(5):
                client.get("/v1/nothing")
            client.close()
            self.assertEqual(len(srv.requests), 3)

    @unittest.skipUnless(shutil.which("openssl"), "openssl CLI not available")
    def test_tls(self) -> None:
        import ssl

        with tempfile.TemporaryDirectory() as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", key, "-out", cert],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_context.load_cert_chain(cert, key)
            client_context = ssl.create_default_context(cafile=cert)
            with LocalCyclesServer(ssl_context=server_context, api_keys={KEY: "acme"},
                                   budgets=[{"scope": "tenant:acme", "allocated": 1}]) as srv:
                self.assertTrue(srv.url.startswith("https://127.0.0.1:"))
                conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=5,
                                                   context=client_context)
                for _ in range(3):
                    conn.request("GET", "/v1/balances?tenant=acme",
                                 headers={"X-Cycles-API-Key": KEY})
                    response = conn.getresponse()
                    self.assertEqual(response.status, 200)
                    response.read()
                conn.close()
                self.assertEqual(srv.connections_accepted, 1)
                with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as plain:
                    plain.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: handshake fails
                    try:
                        plain.recv(100)
                    except ConnectionResetError:
                        pass
                conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=5,
                                                   context=client_context)
                conn.request("GET", "/v1/balances?tenant=acme",
                             headers={"X-Cycles-API-Key": KEY})
                response = conn.getresponse()
                self.assertEqual(response.status, 200)
                response.read()
                conn.close()


# =============================================================================
# Command line
# =============================================================================


class TestCli(unittest.TestCase):
    def start(self, *args: str) -> Tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
        env = dict(os.environ, PYTHONPATH=HERE, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cycles_lite_server", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
        self.addCleanup(self.cleanup, proc)
        timer = threading.Timer(15.0, proc.kill)
        timer.daemon = True
        timer.start()
        self.addCleanup(timer.cancel)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"https?://\S+", line)
        if match is None:
            proc.kill()
            self.fail(f"no URL printed: {line!r} {proc.communicate()[1]!r}")
        return proc, match.group(0)

    @staticmethod
    def cleanup(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    def test_cli_serves_logs_and_stops_cleanly(self) -> None:
        proc, url = self.start("--api-key", "cli-secret=acme",
                               "--budget", "tenant:acme=USD_MICROCENTS:1000",
                               "--budget", "tenant:acme/agent:x=500")
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/balances?tenant=acme",
                     headers={"X-Cycles-API-Key": "cli-secret"})
        response = conn.getresponse()
        balances = json.loads(response.read())["balances"]
        conn.close()
        self.assertEqual(response.status, 200)
        self.assertEqual([b["allocated"]["amount"] for b in balances], [1000, 500])
        assert proc.stdout is not None
        log_line = proc.stdout.readline()
        self.assertIn("GET /v1/balances 200 op=balances tenant=acme", log_line)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn("stopped", out)
        self.assertNotIn("cli-secret", out + err + log_line)

    def test_cli_config_file(self) -> None:
        config = {
            "api_keys": {"cfg-key": "acme"},
            "admin_keys": ["cfg-admin"],
            "tenants": {"acme": {"status": "ACTIVE", "max_extensions": 1}},
            "budgets": [{"scope": "tenant:acme", "unit": "TOKENS", "allocated": 7}],
            "default_ttl_ms": 1234,
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(config, handle)
        self.addCleanup(os.unlink, handle.name)
        proc, url = self.start("--config", handle.name, "--quiet")
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        body = {"idempotency_key": "a", "subject": {"tenant": "acme"},
                "action": {"kind": "k", "name": "n"}, "estimate": amount(3, TOKENS)}
        conn.request("POST", "/v1/reservations", json.dumps(body),
                     {"X-Cycles-API-Key": "cfg-key", "Content-Type": "application/json"})
        response = conn.getresponse()
        created = json.loads(response.read())
        self.assertEqual(created["remaining_ttl_ms"], 1234)
        conn.request("GET", "/v1/reservations?tenant=acme",
                     headers={"X-Admin-API-Key": "cfg-admin"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        response.read()
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0)
        self.assertNotIn("GET /v1/reservations", out)

    def test_cli_rejects_bad_arguments(self) -> None:
        env = dict(os.environ, PYTHONPATH=HERE)
        result = subprocess.run(
            [sys.executable, "-m", "cycles_lite_server", "--port", "0", "--budget", "oops"],
            capture_output=True, text=True, env=env, cwd=HERE, timeout=15)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--budget", result.stderr)


if __name__ == "__main__":
    unittest.main()
