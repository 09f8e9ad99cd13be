# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0.
"""Tests of the cycles_lite client core against a real LocalCyclesServer over HTTP(S).

Run with ``python3 -W error -m unittest test_cycles_lite`` (or pytest).  Test
doubles appear only where the server cannot produce the condition: a forward
proxy, a host a redirect points at, and the race that makes a pooled
connection stale between the idle check and the send.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from typing import Any, Dict, List, Optional
from unittest import mock

import cycles_lite as cl
from cycles_lite import (
    Action,
    Amount,
    AsyncCyclesClient,
    Balance,
    Caps,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    CyclesContext,
    CyclesMetrics,
    CyclesProtocolError,
    CyclesResponse,
    CyclesTransportError,
    Decision,
    DecisionRequest,
    DryRunResult,
    ErrorCode,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationListResponse,
    StreamUsage,
    Subject,
    Unit,
)
from cycles_lite_server import LocalCyclesServer

HERE = os.path.dirname(os.path.abspath(__file__))
API_KEY = "key-acme-0123456789"
OTHER_KEY = "key-other-0123456789"
ADMIN_KEY = "admin-secret-0123456789"
TENANT = "acme"
BIG = 10**12

# runcycles 0.5.3's __all__ (56 names); the guarded-execution issue adds the last six.
RUNCYCLES_NAMES = """
CyclesClient AsyncCyclesClient CyclesConfig cycles set_default_client set_default_config
CyclesContext get_cycles_context CyclesResponse StreamReservation AsyncStreamReservation
StreamUsage CyclesError CyclesProtocolError CyclesTransportError BudgetExceededError
DebtOutstandingError OverdraftLimitExceededError ReservationExpiredError
ReservationFinalizedError TenantClosedError Unit Amount SignedAmount Subject Action Caps
Decision CyclesMetrics CyclesEvidenceRef Balance CommitOveragePolicy ErrorCode ErrorResponse
ReservationStatus CommitStatus ReleaseStatus ExtendStatus EventStatus ReservationCreateRequest
CommitRequest ReleaseRequest ReservationExtendRequest DecisionRequest EventCreateRequest
ReservationCreateResponse CommitResponse ReleaseResponse ReservationExtendResponse
DecisionResponse EventCreateResponse DryRunResult ReservationDetail ReservationSummary
ReservationListResponse BalanceResponse
""".split()
DEFERRED_NAMES = {
    "cycles",
    "set_default_client",
    "set_default_config",
    "get_cycles_context",
    "StreamReservation",
    "AsyncStreamReservation",
}

ERROR_STATUS = {
    "INVALID_REQUEST": 400,
    "UNIT_MISMATCH": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "BUDGET_EXCEEDED": 409,
    "BUDGET_FROZEN": 409,
    "BUDGET_CLOSED": 409,
    "RESERVATION_FINALIZED": 409,
    "IDEMPOTENCY_MISMATCH": 409,
    "OVERDRAFT_LIMIT_EXCEEDED": 409,
    "DEBT_OUTSTANDING": 409,
    "MAX_EXTENSIONS_EXCEEDED": 409,
    "TENANT_CLOSED": 409,
    "RESERVATION_EXPIRED": 410,
    "LIMIT_EXCEEDED": 429,
    "INTERNAL_ERROR": 500,
}
TYPED_ERRORS = {
    "BUDGET_EXCEEDED": cl.BudgetExceededError,
    "OVERDRAFT_LIMIT_EXCEEDED": cl.OverdraftLimitExceededError,
    "DEBT_OUTSTANDING": cl.DebtOutstandingError,
    "TENANT_CLOSED": cl.TenantClosedError,
    "RESERVATION_EXPIRED": cl.ReservationExpiredError,
    "RESERVATION_FINALIZED": cl.ReservationFinalizedError,
}


def make_server(**kwargs: Any) -> LocalCyclesServer:
    return LocalCyclesServer(
        api_keys={API_KEY: TENANT, OTHER_KEY: "other", "your-api-key": TENANT, "your-key": TENANT},
        admin_keys=[ADMIN_KEY],
        tenants={TENANT: "ACTIVE", "other": "ACTIVE"},
        budgets=[
            {"scope": "tenant:acme", "unit": "USD_MICROCENTS", "allocated": BIG},
            {"scope": "tenant:acme/workspace:w1", "unit": "USD_MICROCENTS", "allocated": BIG},
            {"scope": "tenant:acme/workspace:w2", "unit": "USD_MICROCENTS", "allocated": BIG},
            {"scope": "tenant:acme/workspace:w3", "unit": "USD_MICROCENTS", "allocated": BIG},
            {"scope": "tenant:other", "unit": "USD_MICROCENTS", "allocated": BIG},
        ],
        **kwargs,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def create_body(agent: str = "bot", amount: int = 1000, **extra: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "idempotency_key": unique("create"),
        "subject": {"tenant": TENANT, "agent": agent},
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
        "ttl_ms": 60_000,
    }
    body.update(extra)
    return body


class ServerTestCase(unittest.TestCase):
    """One seeded LocalCyclesServer per class; faults and the request log reset per test."""

    server_kwargs: Dict[str, Any] = {}
    srv: LocalCyclesServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = make_server(**cls.server_kwargs).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()

    def config(self, **kwargs: Any) -> CyclesConfig:
        kwargs.setdefault("api_key", API_KEY)
        return CyclesConfig(base_url=self.srv.url, **kwargs)

    def client(self, **kwargs: Any) -> CyclesClient:
        client = CyclesClient(self.config(**kwargs))
        self.addCleanup(client.close)
        return client

    def last_request(self) -> Any:
        return self.srv.requests[-1]


# ---------------------------------------------------------------------------
# Models, errors, response
# ---------------------------------------------------------------------------


class TestModels(unittest.TestCase):
    def test_exports_every_runcycles_name_but_the_deferred_ones(self) -> None:
        expected = set(RUNCYCLES_NAMES) - DEFERRED_NAMES
        self.assertEqual(len(RUNCYCLES_NAMES), 56)
        self.assertEqual(expected - set(cl.__all__), set())
        self.assertEqual(set(cl.__all__) - expected, {"ReservationEvidence"})
        for name in cl.__all__:
            self.assertTrue(hasattr(cl, name), name)
        self.assertEqual(cl.__version__, "0.1.0")

    def test_keyword_construction_and_dump(self) -> None:
        request = ReservationCreateRequest(
            idempotency_key="k1",
            subject=Subject(tenant="acme", agent="bot"),
            action=Action(kind="llm.completion", name="gpt-4o", tags=["a"]),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500),
            ttl_ms=30_000,
        )
        dumped = request.model_dump(exclude_none=True, mode="json")
        self.assertEqual(
            dumped,
            {
                "idempotency_key": "k1",
                "subject": {"tenant": "acme", "agent": "bot"},
                "action": {"kind": "llm.completion", "name": "gpt-4o", "tags": ["a"]},
                "estimate": {"unit": "USD_MICROCENTS", "amount": 500},
                "ttl_ms": 30_000,
            },
        )
        self.assertIs(request.model_dump()["estimate"]["unit"], Unit.USD_MICROCENTS)
        self.assertIsNone(request.model_dump()["grace_period_ms"])
        self.assertEqual(json.loads(request.model_dump_json(exclude_none=True)), dumped)
        self.assertEqual(ReservationCreateRequest.model_validate(dumped), request)
        copy = request.model_copy(update={"ttl_ms": 5_000})
        self.assertEqual((copy.ttl_ms, request.ttl_ms), (5_000, 30_000))

    def test_nested_dicts_are_accepted_and_validated(self) -> None:
        request = CommitRequest(idempotency_key="k", actual={"unit": "TOKENS", "amount": 3})
        self.assertEqual(request.actual, Amount(unit=Unit.TOKENS, amount=3))
        with self.assertRaisesRegex(ValueError, r"^actual\.amount: must be a non-negative int64"):
            CommitRequest(idempotency_key="k", actual={"unit": "TOKENS", "amount": -1})
        with self.assertRaisesRegex(ValueError, r"^actual\.bogus: unknown field"):
            CommitRequest(idempotency_key="k", actual={"unit": "TOKENS", "amount": 1, "bogus": 1})

    def test_validation_names_the_field(self) -> None:
        subject = Subject(tenant="acme")
        action = Action(kind="k", name="n")
        estimate = Amount(unit="TOKENS", amount=1)

        def create(**overrides: Any) -> Any:
            fields: Dict[str, Any] = dict(
                idempotency_key="k", subject=subject, action=action, estimate=estimate
            )
            fields.update(overrides)
            return ReservationCreateRequest(**fields)

        cases: List[Any] = [
            (lambda: Amount(unit="TOKENS", amount=True), r"^amount: "),
            (lambda: Amount(unit="TOKENS", amount=1.0), r"^amount: "),
            (lambda: Amount(unit="TOKENS", amount=2**63), r"^amount: "),
            (lambda: Amount(unit="TOKENS"), r"^amount: field required"),
            (lambda: Amount(unit=5, amount=1), r"^unit: must be a string"),
            (lambda: Subject(tenant="x" * 129), r"^tenant: must be at most 128"),
            (
                lambda: Subject(tenant="a", dimensions={str(i): "v" for i in range(17)}),
                "dimensions",
            ),
            (lambda: Subject(tenant="a", dimensions={"k": "v" * 257}), r"^dimensions\['k'\]"),
            (lambda: Action(kind="k" * 65, name="n"), r"^kind: "),
            (lambda: Action(kind="k", name="n" * 257), r"^name: "),
            (lambda: Action(kind="k", name="n", tags=["t"] * 11), r"^tags: must have at most 10"),
            (lambda: Action(kind="k", name="n", tags=["t" * 65]), r"^tags\[0\]: "),
            (lambda: create(idempotency_key=""), r"^idempotency_key: must be at least 1"),
            (lambda: create(idempotency_key="k" * 257), r"^idempotency_key: must be at most 256"),
            (lambda: create(ttl_ms=999), r"^ttl_ms: "),
            (lambda: create(ttl_ms=86_400_001), r"^ttl_ms: "),
            (lambda: create(grace_period_ms=60_001), r"^grace_period_ms: "),
            (lambda: create(dry_run="yes"), r"^dry_run: must be a boolean"),
            (
                lambda: create(subject=Subject(dimensions={"a": "b"})),
                r"^subject: must have at least",
            ),
            (lambda: create(metadata=[1]), r"^metadata: must be a dict"),
            (lambda: ReservationExtendRequest(idempotency_key="k", extend_by_ms=0), "extend_by_ms"),
            (lambda: ReleaseRequest(idempotency_key="k", reason="r" * 257), r"^reason: "),
            (lambda: CyclesMetrics(tokens_input=-1), r"^tokens_input: "),
            (lambda: Caps(tool_allowlist="x"), r"^tool_allowlist: must be a list"),
            (lambda: EventCreateRequest(idempotency_key="k"), r"^subject: field required"),
        ]
        for make, pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
                make()

    def test_tolerant_response_parsing(self) -> None:
        body = {
            "decision": "ALLOW_WITH_SOMETHING_NEW",
            "affected_scopes": ["tenant:acme"],
            "reservation_id": "r1",
            "caps": {"max_tokens": 5, "future_cap": 1},
            "reserved": {"unit": "NEW_UNIT", "amount": 5},
            "brand_new_field": {"x": 1},
            "remaining_ttl_ms": None,
        }
        parsed = ReservationCreateResponse.model_validate(body)
        self.assertEqual(parsed.decision, "ALLOW_WITH_SOMETHING_NEW")
        self.assertNotIsInstance(parsed.decision, Decision)
        self.assertEqual(parsed.reserved.unit, "NEW_UNIT")  # type: ignore[union-attr]
        self.assertEqual(parsed.extra, {"brand_new_field": {"x": 1}})
        self.assertEqual(parsed.caps.extra, {"future_cap": 1})  # type: ignore[union-attr]
        self.assertEqual(parsed.model_dump(exclude_none=True)["brand_new_field"], {"x": 1})
        self.assertFalse(parsed.is_allowed())
        with self.assertRaisesRegex(ValueError, r"^affected_scopes: field required"):
            ReservationCreateResponse.model_validate({"decision": "ALLOW"})
        with self.assertRaisesRegex(ValueError, r"^reservations\[0\]\.status: field required"):
            ReservationListResponse.model_validate({"reservations": [{"reservation_id": "x"}]})
        with self.assertRaisesRegex(ValueError, r"^bogus: unknown field"):
            CommitRequest.model_validate({"idempotency_key": "k", "actual": None, "bogus": 1})
        with self.assertRaises(ValueError):
            ReservationCreateResponse.model_validate(["not", "a", "dict"])

    def test_enums_error_codes_and_helpers(self) -> None:
        spec_codes = set(ERROR_STATUS)
        self.assertEqual({c.value for c in ErrorCode}, spec_codes | {"UNKNOWN"})
        self.assertIs(ErrorCode.from_string("TENANT_CLOSED"), ErrorCode.TENANT_CLOSED)
        self.assertIs(ErrorCode.from_string("ACTION_QUOTA_EXCEEDED"), ErrorCode.UNKNOWN)
        self.assertIsNone(ErrorCode.from_string(None))
        retryable = {c for c in ErrorCode if c.is_retryable}
        self.assertEqual(retryable, {ErrorCode.INTERNAL_ERROR, ErrorCode.LIMIT_EXCEEDED})
        self.assertEqual(Unit("TOKENS"), "TOKENS")
        self.assertTrue(Caps(tool_allowlist=["a"], tool_denylist=["a"]).is_tool_allowed("a"))
        self.assertFalse(Caps(tool_allowlist=["a"]).is_tool_allowed("b"))
        self.assertFalse(Caps(tool_allowlist=[], tool_denylist=["b"]).is_tool_allowed("b"))
        self.assertTrue(Caps(tool_allowlist=[], tool_denylist=[]).is_tool_allowed("b"))
        metrics = CyclesMetrics()
        self.assertTrue(metrics.is_empty())
        metrics.put_custom("k", 1)
        self.assertEqual((metrics.custom, metrics.is_empty()), ({"k": 1}, False))
        self.assertFalse(Subject(dimensions={"a": "b"}).has_at_least_one_standard_field())
        detail = ReservationDetail.model_validate(
            {
                "reservation_id": "r",
                "status": "COMMITTED",
                "subject": {"tenant": "a"},
                "action": {"kind": "k", "name": "n"},
                "reserved": {"unit": "TOKENS", "amount": 1},
                "created_at_ms": 1,
                "expires_at_ms": 2,
                "scope_path": "tenant:a",
                "affected_scopes": ["tenant:a"],
            }
        )
        self.assertTrue(detail.is_committed())
        self.assertFalse(detail.is_active())
        with self.assertRaises(TypeError):
            hash(Amount(unit="TOKENS", amount=1))
        self.assertIn("Amount(unit=", repr(Amount(unit="TOKENS", amount=1)))

    def test_lifecycle_data_types(self) -> None:
        ctx = CyclesContext(reservation_id="r", estimate=5, decision=Decision.ALLOW)
        self.assertFalse(ctx.has_caps())
        ctx.update_expires_at_ms(10)
        self.assertEqual(ctx.expires_at_ms, 10)
        field_names = [f.name for f in dataclasses.fields(CyclesContext)]
        self.assertEqual(field_names[-2:], ["metrics", "commit_metadata"])
        usage = StreamUsage()
        usage.add_input_tokens(3)
        usage.add_output_tokens(4)
        usage.set_actual_cost(9)
        self.assertEqual((usage.tokens_input, usage.tokens_output, usage.actual_cost), (3, 4, 9))
        dry = DryRunResult.model_validate({"decision": "DENY", "reason_code": "BUDGET_EXCEEDED"})
        self.assertTrue(dry.is_denied())
        self.assertFalse(dry.has_caps())

    def test_response_properties_never_raise(self) -> None:
        def response(**headers: str) -> CyclesResponse:
            return cl._read_response(200, list(headers.items()), b"{}")

        ok = response(
            **{"X-RateLimit-Remaining": "-1", "X-RateLimit-Reset": "12", "Retry-After": "3"}
        )
        self.assertEqual((ok.rate_limit_remaining, ok.rate_limit_reset), (-1, 12))
        self.assertEqual(ok.retry_after_ms_header, 3000)
        bad = response(**{"X-RateLimit-Remaining": "lots", "X-RateLimit-Reset": "1e3"})
        self.assertEqual((bad.rate_limit_remaining, bad.rate_limit_reset), (None, None))
        for value in ("Wed, 21 Oct 2015 07:28:00 GMT", "-1", "1.5", "9" * 30, ""):
            with self.subTest(value=value):
                self.assertIsNone(response(**{"Retry-After": value}).retry_after_ms_header)
        dated = response(Date="Wed, 21 Oct 2015 07:28:00 GMT")
        self.assertEqual(dated.server_date_ms, 1445412480000)
        self.assertIsNone(response(Date="garbage").server_date_ms)
        self.assertEqual(
            list(ok.headers), ["x-ratelimit-remaining", "x-ratelimit-reset", "retry-after"]
        )

    def test_read_response_is_pure_and_tolerant(self) -> None:
        html = cl._read_response(502, [("Content-Type", "text/html")], b"<html>bad gateway</html>")
        self.assertEqual((html.status, html.body, html.error_message), (502, None, "HTTP 502"))
        self.assertTrue(html.is_server_error)
        broken = cl._read_response(200, [], b'{"status": "COMMI')
        self.assertEqual((broken.is_success, broken.body), (True, {}))
        self.assertFalse(cl._is_schema_valid("commit", broken))
        listed = cl._read_response(200, [], b"[1, 2]")
        self.assertEqual(listed.body, {})
        deep = cl._read_response(200, [], b"[" * 100_000 + b"]" * 100_000)
        self.assertEqual(deep.body, {})
        moved = cl._read_response(307, [("Location", "http://elsewhere/v1")], b"")
        self.assertIn("redirect not followed", moved.error_message or "")
        error = cl._read_response(409, [("X-Request-Id", "rq")], b'{"error": "X", "message": "m"}')
        self.assertEqual((error.error_message, error.request_id), ("m", "rq"))

    def test_schema_validity_per_operation(self) -> None:
        def valid(operation: str, status: int, body: Dict[str, Any]) -> bool:
            raw = json.dumps(body).encode()
            return cl._is_schema_valid(operation, cl._read_response(status, [], raw))

        amount = {"unit": "TOKENS", "amount": 1}
        commit = {"status": "COMMITTED", "charged": amount}
        self.assertTrue(valid("commit", 200, commit))
        self.assertTrue(valid("commit", 200, dict(commit, brand_new=1, balances=None)))
        self.assertFalse(valid("commit", 202, commit))
        self.assertFalse(valid("commit", 200, {"status": "COMMITTED"}))
        self.assertFalse(valid("commit", 200, dict(commit, status="WEIRD")))
        self.assertFalse(valid("commit", 200, dict(commit, charged={"unit": "T", "amount": True})))
        self.assertTrue(valid("release", 200, {"status": "RELEASED", "released": amount}))
        self.assertTrue(valid("extend", 200, {"status": "ACTIVE", "expires_at_ms": 5, "x": 1}))
        self.assertFalse(valid("extend", 200, {"status": "ACTIVE", "expires_at_ms": "5"}))
        self.assertFalse(
            valid("extend", 200, {"status": "ACTIVE", "expires_at_ms": 5, "remaining_ttl_ms": -1})
        )
        self.assertTrue(valid("event", 201, {"status": "APPLIED", "event_id": "e"}))
        self.assertFalse(valid("event", 200, {"status": "APPLIED", "event_id": "e"}))
        self.assertTrue(valid("create", 200, {"decision": "DENY", "affected_scopes": []}))
        self.assertFalse(valid("create", 200, {"decision": "MAYBE", "affected_scopes": []}))
        self.assertTrue(valid("decide", 200, {"decision": "ALLOW"}))
        self.assertFalse(valid("nonsense", 200, {}))
        self.assertFalse(cl._is_schema_valid("commit", CyclesResponse.transport_error(OSError())))

    def test_protocol_error_builder_never_raises(self) -> None:
        hostile: List[Any] = [
            None,
            {"error": 5, "message": ["x"], "retry_after_ms": "soon", "details": "no"},
            {"retry_after_ms": -5, "request_id": {"a": 1}},
            {"error": "BUDGET_EXCEEDED", "retry_after_ms": True},
        ]
        for body in hostile:
            response = CyclesResponse.http_error(409, "boom", body, {"retry-after": "x"})
            error = cl._protocol_error(response, "Reservation failed")
            self.assertIsInstance(error, CyclesProtocolError)
            self.assertIsNone(error.retry_after_ms)
        self.assertIsInstance(cl._protocol_error(object(), "x"), CyclesProtocolError)  # type: ignore[arg-type]
        transport = cl._protocol_error(
            CyclesResponse.transport_error(ConnectionResetError("rst")), "C"
        )
        self.assertIsInstance(transport, CyclesTransportError)
        self.assertEqual((transport.status, str(transport)), (-1, "C: rst"))
        self.assertIsInstance(transport.cause, ConnectionResetError)  # type: ignore[attr-defined]
        self.assertTrue(transport.is_retryable())

    def test_new_keys_are_uuid4_shaped_and_unique(self) -> None:
        keys = {cl._new_key() for _ in range(100)}
        self.assertEqual(len(keys), 100)
        for key in keys:
            self.assertRegex(
                key, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
            )


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


class TestConfig(unittest.TestCase):
    def test_runcycles_defaults(self) -> None:
        config = CyclesConfig(base_url="http://localhost:7878", api_key="k")
        expected = dict(
            tenant=None,
            connect_timeout=2.0,
            read_timeout=5.0,
            retry_enabled=True,
            retry_max_attempts=5,
            retry_initial_delay=0.5,
            retry_multiplier=2.0,
            retry_max_delay=30.0,
            retry_flush_timeout=10.0,
            journal_enabled=True,
            journal_dir=None,
        )
        for name, value in expected.items():
            self.assertEqual(getattr(config, name), value, name)
        self.assertEqual(config.attempt_timeout, 7.0)
        self.assertEqual(CyclesConfig("http://h", "k", request_timeout=1.5).attempt_timeout, 1.5)
        self.assertTrue(config.user_agent.startswith("cycles-lite/0.1.0 (Python "))
        positional = [f.name for f in dataclasses.fields(CyclesConfig)][:18]
        self.assertEqual(positional[:3], ["base_url", "api_key", "tenant"])
        self.assertEqual(positional[-2:], ["journal_enabled", "journal_dir"])

    def test_invalid_values_raise_naming_the_field(self) -> None:
        url = "http://localhost:7878"
        cases: List[Any] = [
            (dict(base_url=""), r"^base_url: "),
            (dict(base_url="localhost:7878"), r"^base_url: scheme must be http or https"),
            (dict(base_url="file:///etc/passwd"), r"^base_url: scheme must be http or https"),
            (dict(base_url="ftp://example.com/"), r"^base_url: scheme"),
            (dict(base_url="data:text/plain,hi"), r"^base_url: scheme"),
            (dict(base_url="http://"), r"^base_url: missing host"),
            (dict(base_url="http://u:p@h/"), r"^base_url: must not contain credentials"),
            (dict(base_url="http://h:99999"), r"^base_url: invalid port"),
            (dict(base_url="http://h/a b"), r"^base_url: must not contain spaces"),
            (dict(api_key=""), r"^api_key: required"),
            (dict(api_key="secret\r\nX: y"), r"^api_key: must be printable"),
            (dict(connect_timeout=-1), r"^connect_timeout: "),
            (dict(read_timeout=float("nan")), r"^read_timeout: "),
            (dict(read_timeout=float("inf")), r"^read_timeout: "),
            (dict(connect_timeout=0), r"^connect_timeout: "),
            (dict(request_timeout=True), r"^request_timeout: "),
            (dict(retry_max_attempts=-1), r"^retry_max_attempts: "),
            (dict(retry_max_attempts=2.5), r"^retry_max_attempts: "),
            (dict(retry_multiplier=0.5), r"^retry_multiplier: "),
            (dict(retry_initial_delay=-0.1), r"^retry_initial_delay: "),
            (dict(retry_enabled="yes"), r"^retry_enabled: "),
            (dict(tenant="t" * 129), r"^tenant: "),
            (dict(ca_bundle="/no/such/bundle.pem"), r"^ca_bundle: "),
            (dict(proxy="socks5://p:1080"), r"^proxy: "),
            (dict(user_agent="x\ny"), r"^user_agent: "),
            (dict(traceparent="00-abc-def-01"), r"^traceparent: "),
            (dict(trace_id="A" * 32), r"^trace_id: "),
            (dict(trace_id="0" * 32), r"^trace_id: "),
            (dict(pool_maxsize=-1), r"^pool_maxsize: "),
        ]
        for overrides, pattern in cases:
            fields: Dict[str, Any] = dict(base_url=url, api_key="secret-key")
            fields.update(overrides)
            with self.subTest(overrides=overrides):
                with self.assertRaisesRegex(ValueError, pattern) as caught:
                    CyclesConfig(**fields)
                self.assertNotIn("secret", str(caught.exception))

    def test_mutated_config_is_validated_again_by_the_client(self) -> None:
        config = CyclesConfig(base_url="http://localhost:7878", api_key="k")
        config.base_url = "file:///etc/passwd"
        with self.assertRaisesRegex(ValueError, "scheme must be http or https"):
            CyclesClient(config)
        with self.assertRaises(ValueError):
            dataclasses.replace(CyclesConfig("http://h", "k"), connect_timeout=-1)
        with self.assertRaises(TypeError):
            CyclesClient({"base_url": "http://h"})  # type: ignore[arg-type]

    def test_repr_masks_every_secret(self) -> None:
        config = CyclesConfig(
            base_url="http://h",
            api_key="tenant-secret",
            admin_api_key="admin-secret",
            proxy="http://user:proxy-secret@proxy:3128",
            tenant="acme",
        )
        text = repr(config)
        for secret in ("tenant-secret", "admin-secret", "proxy-secret"):
            self.assertNotIn(secret, text)
        self.assertIn("api_key='***'", text)
        self.assertIn("tenant='acme'", text)
        self.assertIn("admin_api_key=None", repr(CyclesConfig("http://h", "k")))
        client = CyclesClient(config)
        self.assertNotIn("secret", repr(client))
        client.close()

    def test_from_env_reads_runcycles_names_and_units(self) -> None:
        env = {
            "CYCLES_BASE_URL": "https://cycles.example:8443/base/",
            "CYCLES_API_KEY": "k",
            "CYCLES_TENANT": "acme",
            "CYCLES_TOOLSET": "tools",
            "CYCLES_CONNECT_TIMEOUT": "1.5",
            "CYCLES_READ_TIMEOUT": "3",
            "CYCLES_RETRY_ENABLED": "off",
            "CYCLES_RETRY_MAX_ATTEMPTS": "7",
            "CYCLES_RETRY_INITIAL_DELAY": "0.25",
            "CYCLES_RETRY_MULTIPLIER": "3",
            "CYCLES_RETRY_MAX_DELAY": "9",
            "CYCLES_RETRY_FLUSH_TIMEOUT": "0",
            "CYCLES_JOURNAL_ENABLED": "No",
            "CYCLES_JOURNAL_DIR": "/tmp/j",
            "CYCLES_ADMIN_API_KEY": "adm",
            "CYCLES_REQUEST_TIMEOUT": "4",
            "CYCLES_TRACE_ID": "ab" * 16,
            "CYCLES_WORKSPACE": "",
        }
        config = CyclesConfig.from_env(environ=env)
        self.assertEqual(
            (config.base_url, config.tenant, config.toolset, config.workspace),
            ("https://cycles.example:8443/base/", "acme", "tools", None),
        )
        self.assertEqual((config.connect_timeout, config.read_timeout), (1.5, 3.0))
        self.assertEqual((config.retry_enabled, config.journal_enabled), (False, False))
        self.assertEqual((config.retry_max_attempts, config.retry_multiplier), (7, 3.0))
        self.assertEqual((config.retry_flush_timeout, config.request_timeout), (0.0, 4.0))
        self.assertEqual((config.admin_api_key, config.trace_id), ("adm", "ab" * 16))
        with mock.patch.dict(os.environ, {"MY_BASE_URL": "http://h", "MY_API_KEY": "k"}):
            self.assertEqual(CyclesConfig.from_env("MY_").base_url, "http://h")

    def test_from_env_booleans_and_errors(self) -> None:
        base = {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k"}
        for word, value in [
            ("true", True),
            ("1", True),
            ("YES", True),
            ("On", True),
            ("false", False),
            ("0", False),
            ("no", False),
            ("off", False),
        ]:
            config = CyclesConfig.from_env(environ=dict(base, CYCLES_RETRY_ENABLED=word))
            self.assertIs(config.retry_enabled, value, word)
        bad = [
            ({"CYCLES_RETRY_ENABLED": "maybe"}, r"^CYCLES_RETRY_ENABLED: expected one of"),
            ({"CYCLES_CONNECT_TIMEOUT": "2s"}, r"^CYCLES_CONNECT_TIMEOUT: expected a number"),
            ({"CYCLES_READ_TIMEOUT": "nan"}, r"^CYCLES_READ_TIMEOUT: expected a finite"),
            (
                {"CYCLES_RETRY_MAX_ATTEMPTS": "five"},
                r"^CYCLES_RETRY_MAX_ATTEMPTS: expected an integer",
            ),
            ({"CYCLES_BASE_URL": ""}, r"^CYCLES_BASE_URL environment variable is required"),
            ({"CYCLES_API_KEY": ""}, r"^CYCLES_API_KEY environment variable is required"),
            ({"CYCLES_BASE_URL": "ftp://h"}, r"^base_url: scheme"),
        ]
        for overrides, pattern in bad:
            with self.subTest(overrides=overrides), self.assertRaisesRegex(ValueError, pattern):
                CyclesConfig.from_env(environ=dict(base, **overrides))
        admin_only = CyclesConfig.from_env(
            environ={"CYCLES_BASE_URL": "http://h", "CYCLES_ADMIN_API_KEY": "a"}
        )
        self.assertEqual((admin_only.api_key, admin_only.admin_api_key), ("", "a"))


# ---------------------------------------------------------------------------
# Every endpoint, sync and async (shared bodies)
# ---------------------------------------------------------------------------


class EndpointTests:
    """Endpoint tests run by TestClient (sync) and TestAsyncClient (async).

    ``call(name, ...)`` invokes a client method and returns its result, awaiting
    it on the async side; ``collect(name, ...)`` drains an iterator.
    """

    srv: LocalCyclesServer
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIn: Any
    assertNotIn: Any
    assertIsInstance: Any
    assertIsNone: Any
    assertRaises: Any
    assertRaisesRegex: Any
    assertGreaterEqual: Any
    subTest: Any
    last_request: Any

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def collect(self, name: str, **filters: Any) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def call_with(self, config: CyclesConfig, name: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reserve(self, **extra: Any) -> str:
        response = self.call("create_reservation", create_body(**extra))
        self.assertEqual(response.status, 200, response.body)
        return str(response.body["reservation_id"])

    def test_create_commit_lifecycle(self) -> None:
        request = ReservationCreateRequest(
            idempotency_key=unique("create"),
            subject=Subject(tenant=TENANT, agent="lifecycle"),
            action=Action(kind="llm.completion", name="gpt-4o"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=5_000),
            ttl_ms=30_000,
        )
        created = self.call("create_reservation", request)
        self.assertTrue(cl._is_schema_valid("create", created))
        self.assertEqual(created.get_body_attribute("decision"), "ALLOW")
        sent = self.last_request()
        self.assertEqual(
            (sent.method, sent.path, sent.operation), ("POST", "/v1/reservations", "create")
        )
        self.assertEqual(sent.body, request.model_dump(mode="json", exclude_none=True))
        self.assertEqual(sent.headers["x-idempotency-key"], request.idempotency_key)
        self.assertEqual(sent.headers["x-cycles-api-key"], API_KEY)
        self.assertTrue(sent.headers["user-agent"].startswith("cycles-lite/"))
        reservation_id = created.body["reservation_id"]
        commit = CommitRequest(
            idempotency_key=unique("commit"),
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=4_000),
            metrics=CyclesMetrics(tokens_input=10, latency_ms=5),
        )
        committed = self.call("commit_reservation", reservation_id, commit)
        self.assertTrue(cl._is_schema_valid("commit", committed))
        self.assertEqual(committed.body["charged"]["amount"], 4_000)
        self.assertEqual(self.last_request().headers["x-idempotency-key"], commit.idempotency_key)
        self.assertEqual(self.srv.reservation(reservation_id)["status"], "COMMITTED")
        self.srv.check_invariants()

    def test_release_extend_and_get(self) -> None:
        reservation_id = self.reserve()
        extended = self.call(
            "extend_reservation",
            reservation_id,
            ReservationExtendRequest(idempotency_key=unique("extend"), extend_by_ms=1_000),
        )
        self.assertTrue(cl._is_schema_valid("extend", extended), extended.body)
        got = self.call("get_reservation", reservation_id)
        self.assertTrue(cl._is_schema_valid("get", got))
        self.assertEqual(got.body["expires_at_ms"], extended.body["expires_at_ms"])
        self.assertEqual(ReservationDetail.model_validate(got.body).reservation_id, reservation_id)
        released = self.call(
            "release_reservation",
            reservation_id,
            {"idempotency_key": unique("rel"), "reason": "done"},
        )
        self.assertTrue(cl._is_schema_valid("release", released))
        again = self.call(
            "commit_reservation",
            reservation_id,
            {"idempotency_key": unique("c"), "actual": {"unit": "USD_MICROCENTS", "amount": 1}},
        )
        error = cl._protocol_error(again, "Commit failed")
        self.assertIsInstance(error, cl.ReservationFinalizedError)
        self.assertTrue(error.is_reservation_finalized())

    def test_decide_event_and_balances(self) -> None:
        decided = self.call(
            "decide",
            DecisionRequest(
                idempotency_key=unique("decide"),
                subject=Subject(tenant=TENANT),
                action=Action(kind="k", name="n"),
                estimate=Amount(unit="USD_MICROCENTS", amount=1),
            ),
        )
        self.assertTrue(cl._is_schema_valid("decide", decided))
        self.assertEqual(self.last_request().path, "/v1/decide")
        event = self.call(
            "create_event",
            EventCreateRequest(
                idempotency_key=unique("event"),
                subject=Subject(tenant=TENANT, agent="ev"),
                action=Action(kind="api.call", name="geocode"),
                actual=Amount(unit=Unit.USD_MICROCENTS, amount=1_500),
                client_time_ms=1,
            ),
        )
        self.assertEqual(event.status, 201)
        self.assertTrue(cl._is_schema_valid("event", event))
        balances = self.call("get_balances", tenant=TENANT, limit=50)
        self.assertTrue(cl._is_schema_valid("balances", balances))
        self.assertEqual(self.last_request().query, {"tenant": TENANT, "limit": "50"})
        self.assertIsInstance(Balance.model_validate(balances.body["balances"][0]), Balance)
        with self.assertRaisesRegex(ValueError, "at least one subject filter"):
            self.call("get_balances", limit=5)
        with self.assertRaisesRegex(ValueError, "at least one subject filter"):
            self.call("get_balances", tenant="")

    def test_bodies_dict_as_is_and_type_errors(self) -> None:
        body = create_body(metadata={"note": "kept", "nested": [1, {"a": None}]})
        self.call("create_reservation", body)
        self.assertEqual(self.last_request().body, body)
        count = len(self.srv.requests)
        with self.assertRaises(TypeError):
            self.call("create_reservation", "not a body")
        with self.assertRaises(TypeError):
            self.call(
                "create_reservation",
                CommitRequest(idempotency_key="k", actual=Amount(unit="TOKENS", amount=1)),
            )
        with self.assertRaises(ValueError):
            self.call("create_reservation", dict(body, metadata={"x": float("nan")}))
        self.assertEqual(len(self.srv.requests), count)

    def test_invalid_input_raises_before_sending(self) -> None:
        count = len(self.srv.requests)
        release = {"idempotency_key": "k"}
        for bad_id in ("", "x" * 129, None, 5):
            with self.subTest(reservation_id=bad_id):
                with self.assertRaisesRegex(ValueError, "^reservation_id: "):
                    self.call("get_reservation", bad_id)
                with self.assertRaisesRegex(ValueError, "^reservation_id: "):
                    self.call("release_reservation", bad_id, release)
        with self.assertRaisesRegex(ValueError, "^evidence_id: "):
            self.call("get_evidence", "../x")
        with self.assertRaisesRegex(ValueError, "^limit: query parameter"):
            self.call("list_reservations", limit=1.5)
        self.assertEqual(len(self.srv.requests), count)

    def test_reservation_ids_are_percent_encoded(self) -> None:
        response = self.call("get_reservation", "../balances")
        self.assertEqual(self.last_request().path, "/v1/reservations/..%2Fbalances")
        self.assertEqual(response.status, 404)
        self.call(
            "commit_reservation",
            "x/../../decide?a=b",
            {"idempotency_key": "k", "actual": {"unit": "TOKENS", "amount": 1}},
        )
        self.assertEqual(
            self.last_request().path, "/v1/reservations/x%2F..%2F..%2Fdecide%3Fa%3Db/commit"
        )

    def test_list_and_iterators_follow_cursors(self) -> None:
        agent = unique("iter")
        ids = {self.reserve(agent=agent) for _ in range(5)}
        page = self.call("list_reservations", agent=agent, limit="2")
        self.assertTrue(cl._is_schema_valid("list", page))
        self.assertEqual(len(page.body["reservations"]), 2)
        self.assertTrue(page.body["has_more"])
        self.srv.clear_requests()
        found = self.collect("iter_reservations", agent=agent, limit=2)
        self.assertEqual({r["reservation_id"] for r in found}, ids)
        cursors = [r.query.get("cursor") for r in self.srv.requests_for("list")]
        self.assertEqual(len(cursors), 3)
        self.assertIsNone(cursors[0])
        everything = self.call("get_balances", tenant=TENANT, limit=200).body["balances"]
        paged = self.collect("iter_balances", tenant=TENANT, limit=1)
        self.assertEqual(paged, everything)
        self.assertGreaterEqual(len(self.srv.requests_for("balances")), len(everything))
        with self.assertRaisesRegex(ValueError, "subject filter"):
            self.collect("iter_balances", limit=1)
        self.srv.inject("list", "status", status=503, error="INTERNAL_ERROR", skip=1)
        with self.assertRaises(CyclesProtocolError) as caught:
            self.collect("iter_reservations", agent=agent, limit=2)
        self.assertEqual(caught.exception.status, 503)

    def test_admin_key_list_get_release(self) -> None:
        reservation_id = self.reserve()
        both = self.config(admin_api_key=ADMIN_KEY)
        listed = self.call_with(both, "list_reservations", admin=True, tenant=TENANT, limit="5")
        self.assertTrue(listed.is_success, listed.body)
        headers = self.last_request().headers
        self.assertEqual(headers["x-admin-api-key"], ADMIN_KEY)
        self.assertNotIn("x-cycles-api-key", headers)
        self.call_with(both, "get_reservation", reservation_id)
        self.assertEqual(self.last_request().headers["x-cycles-api-key"], API_KEY)
        with self.assertRaisesRegex(ValueError, "^tenant: required"):
            self.call_with(both, "list_reservations", admin=True)
        with self.assertRaisesRegex(ValueError, "^admin_api_key: not configured"):
            self.call("get_reservation", reservation_id, admin=True)
        admin_only = CyclesConfig(base_url=self.srv.url, admin_api_key=ADMIN_KEY)
        got = self.call_with(admin_only, "get_reservation", reservation_id)
        self.assertTrue(got.is_success, got.body)
        self.assertEqual(self.last_request().headers["x-admin-api-key"], ADMIN_KEY)
        released = self.call_with(
            admin_only,
            "release_reservation",
            reservation_id,
            ReleaseRequest(idempotency_key=unique("rel"), reason="[INCIDENT_FORCE_RELEASE] stuck"),
        )
        self.assertTrue(cl._is_schema_valid("release", released), released.body)
        with self.assertRaisesRegex(ValueError, "^api_key: required for create"):
            self.call_with(admin_only, "create_reservation", create_body())

    def test_evidence_endpoints_are_public(self) -> None:
        evidence_id = "ab" * 32
        missing = self.call("get_evidence", evidence_id)
        self.assertEqual(
            (missing.status, self.last_request().path), (404, f"/v1/evidence/{evidence_id}")
        )
        self.assertNotIn("x-cycles-api-key", self.last_request().headers)
        envelope = {"evidence_id": evidence_id, "schema_version": "cycles-evidence/v0.1"}
        self.srv.inject("evidence", "status", status=200, body=envelope)
        found = self.call("get_evidence", evidence_id)
        self.assertTrue(cl._is_schema_valid("evidence", found))
        self.assertEqual(found.body, envelope)
        self.srv.inject("jwks", "status", status=200, body={"keys": []})
        jwks = self.call("get_evidence_jwks")
        self.assertEqual(self.last_request().path, "/v1/.well-known/cycles-jwks.json")
        self.assertTrue(cl._is_schema_valid("jwks", jwks))

    def test_every_error_code_maps_to_its_exception(self) -> None:
        for code, status in ERROR_STATUS.items():
            with self.subTest(code=code):
                self.srv.inject("balances", "status", status=status, error=code)
                response = self.call("get_balances", tenant=TENANT)
                self.assertEqual(response.status, status)
                error = cl._protocol_error(response, "Balances failed")
                self.assertIs(type(error), TYPED_ERRORS.get(code, CyclesProtocolError))
                self.assertEqual(
                    (error.error_code, error.reason_code, error.status), (code, code, status)
                )
                self.assertEqual(error.request_id, response.request_id)
                self.assertEqual(error.trace_id, response.trace_id)
                self.assertIsNotNone(response.get_error_response())
                self.assertTrue(str(error).startswith("Balances failed: "))
                expected_retryable = code in ("INTERNAL_ERROR", "LIMIT_EXCEEDED")
                self.assertEqual(error.is_retryable(), expected_retryable)
        self.srv.inject("balances", "status", status=409, error="ACTION_QUOTA_EXCEEDED")
        novel = cl._protocol_error(self.call("get_balances", tenant=TENANT), "x")
        self.assertEqual(
            (type(novel), novel.error_code), (CyclesProtocolError, "ACTION_QUOTA_EXCEEDED")
        )
        self.assertFalse(novel.is_retryable())

    def test_429_and_retry_after(self) -> None:
        self.srv.inject(
            "balances",
            "status",
            status=429,
            error="LIMIT_EXCEEDED",
            headers={"Retry-After": "2", "X-RateLimit-Reset": "1700000000"},
        )
        limited = self.call("get_balances", tenant=TENANT)
        self.assertEqual(
            (limited.retry_after_ms_header, limited.rate_limit_reset), (2000, 1700000000)
        )
        error = cl._protocol_error(limited, "x")
        self.assertEqual(error.retry_after_ms, 2000)
        self.assertTrue(error.is_retryable())
        body = {
            "error": "LIMIT_EXCEEDED",
            "message": "slow",
            "request_id": "r",
            "retry_after_ms": 150,
        }
        self.srv.inject(
            "balances",
            "status",
            status=429,
            body=body,
            headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
        )
        dated = self.call("get_balances", tenant=TENANT)
        self.assertIsNone(dated.retry_after_ms_header)
        self.assertEqual(cl._protocol_error(dated, "x").retry_after_ms, 150)

    def test_response_headers_are_captured(self) -> None:
        response = self.call("get_balances", tenant=TENANT)
        self.assertRegex(response.request_id, r"\S+")
        self.assertRegex(response.trace_id, r"^[0-9a-f]{32}$")
        self.assertEqual(response.cycles_tenant, TENANT)
        self.assertEqual((response.rate_limit_remaining, response.rate_limit_reset), (-1, 0))
        self.assertTrue(set(response.headers) <= cl.CAPTURED_HEADERS)

    def test_trace_headers_are_sent(self) -> None:
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{trace}-00f067aa0ba902b7-01"
        response = self.call_with(
            self.config(traceparent=traceparent), "get_balances", tenant=TENANT
        )
        self.assertEqual(self.last_request().headers["traceparent"], traceparent)
        self.assertEqual(response.trace_id, trace)
        flat = "0af7651916cd43dd8448eb211c80319c"
        response = self.call_with(self.config(trace_id=flat), "get_balances", tenant=TENANT)
        self.assertEqual(self.last_request().headers["x-cycles-trace-id"], flat)
        self.assertEqual(response.trace_id, flat)
        current = iter([traceparent, "garbage"])
        provider = self.config(traceparent=lambda: next(current))
        self.call_with(provider, "get_balances", tenant=TENANT)
        self.assertEqual(self.last_request().headers["traceparent"], traceparent)
        self.call_with(provider, "get_balances", tenant=TENANT)
        self.assertNotIn("traceparent", self.last_request().headers)

    def test_transport_failures_become_responses(self) -> None:
        fresh = self.config(pool_maxsize=0)
        for fault in ("drop", "lost_response"):
            with self.subTest(fault=fault):
                self.srv.inject("create", fault)
                response = self.call_with(fresh, "create_reservation", create_body())
                self.assertTrue(response.is_transport_error)
                self.assertEqual((response.status, response.body), (-1, None))
                self.assertIsInstance(response.transport_exception, OSError)
                self.assertFalse(cl._is_schema_valid("create", response))
        applied = [r.applied for r in self.srv.requests_for("create")]
        self.assertEqual(applied, [False, True])
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]
        nobody = CyclesConfig(base_url=f"http://127.0.0.1:{closed_port}", api_key="k")
        refused = self.call_with(nobody, "get_balances", tenant=TENANT)
        self.assertTrue(refused.is_transport_error)
        self.assertIsInstance(refused.transport_exception, ConnectionRefusedError)

    def test_redirects_are_not_followed(self) -> None:
        with socket.socket() as elsewhere:
            elsewhere.bind(("127.0.0.1", 0))
            elsewhere.listen(5)
            elsewhere.settimeout(0.05)
            location = f"http://127.0.0.1:{elsewhere.getsockname()[1]}/v1/balances"
            for status in (301, 302, 303, 307, 308):
                self.srv.inject("balances", "redirect", status=status, location=location)
                response = self.call("get_balances", tenant=TENANT)
                self.assertEqual(response.status, status)
                self.assertIn("redirect not followed", response.error_message)
                self.assertEqual(response.headers["location"], location)
            with self.assertRaises(OSError):
                elsewhere.accept()  # nobody followed the redirect: the key went nowhere
        self.assertEqual(len(self.srv.requests_for("balances")), 5)


class TestClient(ServerTestCase, EndpointTests):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.sync_client = CyclesClient(CyclesConfig(base_url=cls.srv.url, api_key=API_KEY))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sync_client.close()
        super().tearDownClass()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.sync_client, name)(*args, **kwargs)

    def collect(self, name: str, **filters: Any) -> List[Dict[str, Any]]:
        return list(getattr(self.sync_client, name)(**filters))

    def call_with(self, config: CyclesConfig, name: str, *args: Any, **kwargs: Any) -> Any:
        with CyclesClient(config) as client:
            return getattr(client, name)(*args, **kwargs)

    def test_concurrent_threads_share_the_pool(self) -> None:
        client = self.client(pool_maxsize=4)
        before = self.srv.connections_accepted
        errors: List[BaseException] = []

        def work() -> None:
            try:
                for _ in range(10):
                    self.assertTrue(client.get_balances(tenant=TENANT).is_success)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertLessEqual(self.srv.connections_accepted - before, 8)
        self.assertLessEqual(len(client._transport._idle), 4)

    def test_closed_client_refuses_requests(self) -> None:
        client = CyclesClient(self.config())
        client.get_balances(tenant=TENANT)
        client.close()
        with self.assertRaisesRegex(RuntimeError, "closed"):
            client.get_balances(tenant=TENANT)


class TestAsyncClient(ServerTestCase, EndpointTests):
    loop: asyncio.AbstractEventLoop

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.loop = asyncio.new_event_loop()
        cls.async_client = AsyncCyclesClient(CyclesConfig(base_url=cls.srv.url, api_key=API_KEY))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.loop.run_until_complete(cls.async_client.aclose())
        cls.loop.close()
        super().tearDownClass()

    def run_async(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.run_async(getattr(self.async_client, name)(*args, **kwargs))

    def collect(self, name: str, **filters: Any) -> List[Dict[str, Any]]:
        iterator = getattr(self.async_client, name)(**filters)

        async def drain() -> List[Dict[str, Any]]:
            return [item async for item in iterator]

        return self.run_async(drain())  # type: ignore[no-any-return]

    def call_with(self, config: CyclesConfig, name: str, *args: Any, **kwargs: Any) -> Any:
        async def go() -> Any:
            async with AsyncCyclesClient(config) as client:
                return await getattr(client, name)(*args, **kwargs)

        return self.run_async(go())

    def test_the_event_loop_keeps_running_during_a_request(self) -> None:
        self.srv.inject("balances", "delay", delay_ms=300)
        ticks = []

        async def ticker(stop: asyncio.Event) -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        async def scenario() -> CyclesResponse:
            stop = asyncio.Event()
            task = asyncio.ensure_future(ticker(stop))
            response = await self.async_client.get_balances(tenant=TENANT)
            stop.set()
            await task
            return response

        response = self.run_async(scenario())
        self.assertTrue(response.is_success)
        self.assertGreaterEqual(len(ticks), 10)

    def test_concurrent_tasks_and_no_threads_left_after_aclose(self) -> None:
        before = set(threading.enumerate())

        async def scenario() -> List[CyclesResponse]:
            async with AsyncCyclesClient(self.config()) as client:
                calls = [client.get_balances(tenant=TENANT) for _ in range(20)]
                return list(await asyncio.gather(*calls))

        responses = self.run_async(scenario())
        self.assertTrue(all(r.is_success for r in responses))
        self.assertEqual(threads_left(before), [])

    def test_cancelled_call_returns_at_once(self) -> None:
        self.srv.inject("balances", "delay", delay_ms=400)

        async def scenario() -> float:
            started = time.monotonic()
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(self.async_client.get_balances(tenant=TENANT), 0.05)
            return time.monotonic() - started

        self.assertLess(self.run_async(scenario()), 0.3)


def threads_left(before: Any, wait: float = 2.0) -> List[str]:
    """Names of threads started since ``before`` that are still alive after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        alive = [t.name for t in threading.enumerate() if t not in before]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------


class TestTransport(ServerTestCase):
    def test_keep_alive_reuses_one_connection(self) -> None:
        client = self.client()
        before = self.srv.connections_accepted
        for _ in range(30):
            self.assertTrue(client.get_balances(tenant=TENANT).is_success)
            self.assertTrue(client.create_reservation(create_body()).is_success)
        self.assertEqual(self.srv.connections_accepted - before, 1)

    def test_pool_disabled_sends_connection_close(self) -> None:
        client = self.client(pool_maxsize=0)
        before = self.srv.connections_accepted
        for _ in range(3):
            client.get_balances(tenant=TENANT)
        self.assertEqual(self.srv.connections_accepted - before, 3)
        self.assertEqual(self.last_request().headers["connection"], "close")

    def test_idle_connection_closed_by_server_is_replaced(self) -> None:
        client = self.client()
        client.get_balances(tenant=TENANT)
        before = self.srv.connections_accepted
        self.assertGreaterEqual(self.srv.close_idle_connections(), 1)
        self.assertTrue(client.get_balances(tenant=TENANT).is_success)
        self.assertEqual(self.srv.connections_accepted - before, 1)
        self.srv.inject("balances", "close_after")
        client.get_balances(tenant=TENANT)
        self.assertTrue(client.get_balances(tenant=TENANT).is_success)
        self.assertEqual(self.srv.connections_accepted - before, 2)

    def test_stale_connection_gets_one_reconnect_and_resend(self) -> None:
        # The server closes the connection between our idle check and our send:
        # simulated by skipping the idle check.
        client = self.client()
        client.get_balances(tenant=TENANT)
        self.srv.close_idle_connections()
        self.srv.clear_requests()
        before = self.srv.connections_accepted
        with mock.patch.object(cl, "_connection_dropped", return_value=False):
            body = create_body()
            response = client.create_reservation(body)
        self.assertTrue(response.is_success, response.error_message)
        self.assertEqual(self.srv.connections_accepted - before, 1)
        self.assertEqual(
            [r.body["idempotency_key"] for r in self.srv.requests], [body["idempotency_key"]]
        )

    def test_no_resend_without_an_idempotency_key(self) -> None:
        client = self.client()
        client.get_balances(tenant=TENANT)
        self.srv.close_idle_connections()
        body = create_body()
        del body["idempotency_key"]
        with mock.patch.object(cl, "_connection_dropped", return_value=False):
            response = client.create_reservation(body)
        self.assertTrue(response.is_transport_error)

    def test_lost_response_on_a_reused_connection_is_resent_with_the_same_key(self) -> None:
        client = self.client()
        client.get_balances(tenant=TENANT)
        self.srv.inject("create", "lost_response")
        body = create_body()
        response = client.create_reservation(body)
        self.assertTrue(response.is_success)
        sent = self.srv.requests_for("create")
        self.assertEqual(
            [r.headers["x-idempotency-key"] for r in sent], [body["idempotency_key"]] * 2
        )
        self.assertEqual([r.status for r in sent], [None, 200])
        self.srv.check_invariants()

    def test_whole_attempt_deadline_beats_a_trickling_server(self) -> None:
        client = self.client(read_timeout=5.0, request_timeout=0.4)
        self.srv.inject("balances", "trickle", interval_ms=50)
        started = time.monotonic()
        response = client.get_balances(tenant=TENANT)
        elapsed = time.monotonic() - started
        self.assertTrue(response.is_transport_error)
        self.assertIsInstance(response.transport_exception, TimeoutError)
        self.assertLess(elapsed, 1.5)
        self.assertGreaterEqual(elapsed, 0.35)
        self.assertTrue(client.get_balances(tenant=TENANT).is_success)

    def test_read_timeout_bounds_a_silent_server(self) -> None:
        client = self.client(read_timeout=0.2)
        self.srv.inject("balances", "delay", delay_ms=1_000)
        started = time.monotonic()
        response = client.get_balances(tenant=TENANT)
        self.assertTrue(response.is_transport_error)
        self.assertLess(time.monotonic() - started, 0.8)

    def test_explicit_deadline_through_the_send_seam(self) -> None:
        client = self.client()
        self.srv.inject("balances", "delay", delay_ms=500)
        response = client._send(
            "balances",
            "GET",
            "/v1/balances",
            query={"tenant": TENANT},
            deadline=time.monotonic() + 0.1,
        )
        self.assertTrue(response.is_transport_error)
        past = client._send(
            "balances",
            "GET",
            "/v1/balances",
            query={"tenant": TENANT},
            deadline=time.monotonic() - 1,
        )
        self.assertIn("deadline", past.error_message)

    def test_no_socket_leaks(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = CyclesClient(self.config(request_timeout=0.3))
            for _ in range(100):
                client.get_balances(tenant=TENANT)
            for fault in ("drop", "lost_response", "html", "malformed", "close_after", "redirect"):
                self.srv.inject("balances", fault)
                client.get_balances(tenant=TENANT)
            self.srv.inject("balances", "trickle", interval_ms=100)
            client.get_balances(tenant=TENANT)
            self.srv.close_idle_connections()
            client.get_balances(tenant=TENANT)
            client.close()
            del client
            gc.collect()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        self.assertEqual(leaks, [])

    def test_http_proxy_and_https_tunnel(self) -> None:
        with TinyProxy() as proxy:
            client = self.client(proxy=f"http://user:pw@127.0.0.1:{proxy.port}", pool_maxsize=0)
            response = client.get_balances(tenant=TENANT)
            self.assertTrue(response.is_success, response.error_message)
            head = proxy.heads[-1]
            self.assertTrue(head.startswith(f"GET {self.srv.url}/v1/balances?tenant=acme HTTP/1.1"))
            self.assertIn("Proxy-Authorization: Basic dXNlcjpwdw==", head)
        self.assertEqual(self.last_request().path, "/v1/balances")


class TinyProxy:
    """A minimal forward proxy for one request per connection (absolute-form only)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(5)
        self.port = self.listener.getsockname()[1]
        self.heads: List[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TinyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.listener.close()
        self.thread.join(2)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            self.heads.append(head.decode("latin-1"))
            method, target, version = head.split(b"\r\n", 1)[0].split(b" ")
            url = target.decode()
            host_port, _, path = url.split("://", 1)[1].partition("/")
            host, _, port = host_port.partition(":")
            lines = [line for line in head.split(b"\r\n")[1:] if not line.startswith(b"Proxy-")]
            forwarded = b"\r\n".join([b" ".join([method, b"/" + path.encode(), version])] + lines)
            with socket.create_connection((host, int(port))) as upstream:
                upstream.sendall(forwarded + b"\r\n\r\n" + rest)
                while True:
                    chunk = upstream.recv(65536)
                    if not chunk:
                        break
                    conn.sendall(chunk)


def make_certificate(directory: str) -> Optional[Dict[str, str]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    command = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign",
    ]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        return None
    return {"cert": cert, "key": key}


class TestHttps(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        import ssl

        cls.tmp = tempfile.TemporaryDirectory()
        files = make_certificate(cls.tmp.name)
        if files is None:
            cls.tmp.cleanup()
            raise unittest.SkipTest("the openssl command line tool is not available")
        cls.cert = files["cert"]
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files["cert"], files["key"])
        cls.srv = make_server(ssl_context=context).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()
        cls.tmp.cleanup()

    def test_https_with_a_custom_ca_bundle_and_keep_alive(self) -> None:
        self.assertTrue(self.srv.url.startswith("https://"))
        before = self.srv.connections_accepted
        with CyclesClient(
            CyclesConfig(base_url=self.srv.url, api_key=API_KEY, ca_bundle=self.cert)
        ) as client:
            for _ in range(5):
                response = client.get_balances(tenant=TENANT)
                self.assertTrue(response.is_success, response.error_message)
            self.assertTrue(client.create_reservation(create_body()).is_success)
        self.assertEqual(self.srv.connections_accepted - before, 1)

    def test_verification_is_on_by_default(self) -> None:
        with CyclesClient(CyclesConfig(base_url=self.srv.url, api_key=API_KEY)) as client:
            response = client.get_balances(tenant=TENANT)
        self.assertTrue(response.is_transport_error)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", response.error_message)

    def test_ssl_context_and_async(self) -> None:
        import ssl

        context = ssl.create_default_context(cafile=self.cert)

        async def scenario() -> CyclesResponse:
            config = CyclesConfig(base_url=self.srv.url, api_key=API_KEY, ssl_context=context)
            async with AsyncCyclesClient(config) as client:
                return await client.get_balances(tenant=TENANT)

        loop = asyncio.new_event_loop()
        try:
            self.assertTrue(loop.run_until_complete(scenario()).is_success)
        finally:
            loop.close()

    def test_https_tunnel_through_a_proxy(self) -> None:
        with TunnelProxy() as proxy:
            config = CyclesConfig(
                base_url=self.srv.url,
                api_key=API_KEY,
                ca_bundle=self.cert,
                proxy=f"http://127.0.0.1:{proxy.port}",
            )
            with CyclesClient(config) as client:
                self.assertTrue(client.get_balances(tenant=TENANT).is_success)
                self.assertTrue(client.get_balances(tenant=TENANT).is_success)
        self.assertEqual(len(proxy.heads), 1)
        self.assertTrue(proxy.heads[0].startswith(f"CONNECT 127.0.0.1:{self.srv.port} HTTP/1."))


class TunnelProxy(TinyProxy):
    """A CONNECT-only proxy that pipes bytes both ways for one connection."""

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.heads.append(data.split(b"\r\n", 1)[0].decode())
            host, _, port = data.split(b" ")[1].decode().partition(":")
            with socket.create_connection((host, int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pump = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
                pump.start()
                _pipe(conn, upstream)
                pump.join(2)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class TestImport(unittest.TestCase):
    def test_import_is_light_and_side_effect_free(self) -> None:
        code = (
            "import sys, threading; before = threading.active_count(); import cycles_lite; "
            "heavy = ['ssl', 'asyncio', 'uuid', 'hashlib', 'http.client', 'urllib.request', "
            "'concurrent.futures', 'argparse', 'socket', 'typing', 'email.utils']; "
            "print([m for m in heavy if m in sys.modules], threading.active_count() - before)"
        )
        result = subprocess.run(
            [sys.executable, "-S", "-c", code], cwd=HERE, capture_output=True, check=True
        )
        self.assertEqual(result.stdout.decode().strip(), "[] 0")

    def test_works_when_vendored_under_another_name(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(os.path.join(HERE, "cycles_lite.py"), os.path.join(tmp, "budget_client.py"))
            code = (
                "import logging, budget_client as b; "
                "print(b._log.name, b.CyclesConfig('http://h', 'k').attempt_timeout)"
            )
            result = subprocess.run(
                [sys.executable, "-S", "-c", code], cwd=tmp, capture_output=True, check=True
            )
        self.assertEqual(result.stdout.decode().split(), ["budget_client", "7.0"])


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class TestCli(ServerTestCase):
    def run_cli(self, *argv: str, api_key: Optional[str] = API_KEY, **env: str) -> Any:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
        environ["CYCLES_BASE_URL"] = self.srv.url
        if api_key is not None:
            environ["CYCLES_API_KEY"] = api_key
        environ.update(env)
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, environ, clear=True), contextlib.redirect_stdout(
            out
        ), contextlib.redirect_stderr(err):
            code = cl.main(list(argv))
        for secret in (API_KEY, ADMIN_KEY):
            self.assertNotIn(secret, out.getvalue() + err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def test_check(self) -> None:
        code, out, _ = self.run_cli("check")
        self.assertEqual(code, 0)
        self.assertIn("tenant", out)
        self.assertIn(TENANT, out)
        code, out, _ = self.run_cli("check", "--json")
        self.assertEqual(
            (code, json.loads(out)["tenant"], json.loads(out)["ok"]), (0, TENANT, True)
        )
        code, _, err = self.run_cli("check", api_key="wrong-key")
        self.assertEqual(code, 1)
        self.assertIn("HTTP 401 UNAUTHORIZED", err)
        code, out, _ = self.run_cli(
            "--json", "check", api_key=None, CYCLES_ADMIN_API_KEY=ADMIN_KEY, CYCLES_TENANT=TENANT
        )
        self.assertEqual((code, json.loads(out)["auth"]), (0, "admin key"))

    def test_exit_codes_for_config_usage_and_transport(self) -> None:
        code, _, err = self.run_cli("check", api_key=None)
        self.assertEqual(code, 2)
        self.assertIn("CYCLES_API_KEY", err)
        code, _, err = self.run_cli("check", CYCLES_CONNECT_TIMEOUT="soon")
        self.assertEqual(code, 2)
        self.assertEqual(self.run_cli("frobnicate")[0], 2)
        self.assertEqual(self.run_cli()[0], 2)
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("exit codes", out)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
        code, _, err = self.run_cli("balances", CYCLES_BASE_URL=closed, CYCLES_TENANT=TENANT)
        self.assertEqual(code, 3)
        self.assertIn("no answer", err)
        self.assertEqual(self.run_cli("balances")[0], 2)

    def test_balances_and_reservations(self) -> None:
        code, out, _ = self.run_cli("balances", "--tenant", TENANT)
        self.assertEqual(code, 0)
        self.assertIn("tenant:acme/workspace:w1", out)
        self.assertTrue(out.startswith("SCOPE"))
        code, out, _ = self.run_cli(
            "balances", "--json", "--all", "--limit", "1", CYCLES_TENANT=TENANT
        )
        self.assertEqual((code, len(json.loads(out)["balances"])), (0, 4))
        with CyclesClient(self.config()) as client:
            agent = unique("cli")
            reservation_id = client.create_reservation(create_body(agent=agent)).body[
                "reservation_id"
            ]
        code, out, _ = self.run_cli("reservations", "--agent", agent, "--status", "ACTIVE")
        self.assertEqual(code, 0)
        self.assertIn(reservation_id, out)
        self.assertEqual(self.last_request().query, {"agent": agent, "status": "ACTIVE"})
        code, out, _ = self.run_cli("reservations", "--json", "--agent", agent, "--all")
        self.assertEqual(
            [r["reservation_id"] for r in json.loads(out)["reservations"]], [reservation_id]
        )
        code, out, _ = self.run_cli("reservation", reservation_id)
        self.assertEqual(code, 0)
        self.assertIn("ACTIVE", out)
        self.assertIn("1000 USD_MICROCENTS", out)
        code, _, err = self.run_cli("reservation", "no-such-reservation")
        self.assertEqual(code, 1)
        self.assertIn("NOT_FOUND", err)
        code, _, err = self.run_cli("reservations", "--status", "BOGUS")
        self.assertEqual(code, 1)

    def test_release_with_the_admin_key(self) -> None:
        with CyclesClient(self.config()) as client:
            reservation_id = client.create_reservation(create_body()).body["reservation_id"]
        code, out, _ = self.run_cli(
            "release",
            reservation_id,
            "--admin",
            "--reason",
            "stuck worker",
            CYCLES_ADMIN_API_KEY=ADMIN_KEY,
        )
        self.assertEqual(code, 0, out)
        self.assertIn("released 1000 USD_MICROCENTS", out)
        sent = self.last_request()
        self.assertEqual(
            (sent.headers.get("x-admin-api-key"), sent.body["reason"]), (ADMIN_KEY, "stuck worker")
        )
        self.assertEqual(self.srv.reservation(reservation_id)["status"], "RELEASED")
        code, _, err = self.run_cli("release", reservation_id, "--json")
        self.assertEqual(code, 1)
        self.assertIn("RESERVATION_FINALIZED", err)
        code, _, err = self.run_cli("release", "x" * 200)
        self.assertEqual(code, 2)
        self.assertIn("reservation_id", err)


# ---------------------------------------------------------------------------
# runcycles README snippets, with only the import changed
# ---------------------------------------------------------------------------

README_SNIPPETS = {
    "programmatic": """
from runcycles import (
    CyclesClient, CyclesConfig, ReservationCreateRequest,
    CommitRequest, Subject, Action, Amount, Unit, CyclesMetrics,
)

config = CyclesConfig(base_url="http://localhost:7878", api_key="your-api-key")

with CyclesClient(config) as client:
    # 1. Reserve budget
    response = client.create_reservation(ReservationCreateRequest(
        idempotency_key="req-001",
        subject=Subject(tenant="acme", agent="support-bot"),
        action=Action(kind="llm.completion", name="gpt-4"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500_000),
        ttl_ms=30_000,
    ))

    if response.is_success:
        reservation_id = response.get_body_attribute("reservation_id")

        # 2. Do work ...

        # 3. Commit actual usage
        client.commit_reservation(reservation_id, CommitRequest(
            idempotency_key="commit-001",
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=420_000),
            metrics=CyclesMetrics(tokens_input=1200, tokens_output=800),
        ))
""",
    "from_env": """
from runcycles import CyclesConfig

config = CyclesConfig.from_env()
# Reads: CYCLES_BASE_URL, CYCLES_API_KEY, CYCLES_TENANT, etc.
""",
    "all_options": """
CyclesConfig(
    base_url="http://localhost:7878",
    api_key="your-api-key",
    tenant="acme",
    workspace="prod",
    app="chat",
    workflow="refund-flow",
    agent="planner",
    toolset="search-tools",
    connect_timeout=2.0,
    read_timeout=5.0,
    retry_enabled=True,
    retry_max_attempts=5,
    retry_initial_delay=0.5,
    retry_multiplier=2.0,
    retry_max_delay=30.0,
)
""",
    "error_handling": """
from runcycles import (
    CyclesClient, CyclesConfig, ReservationCreateRequest,
    Subject, Action, Amount, Unit,
)

config = CyclesConfig(base_url="http://localhost:7878", api_key="your-key")

with CyclesClient(config) as client:
    response = client.create_reservation(ReservationCreateRequest(
        idempotency_key="req-002",
        subject=Subject(tenant="acme"),
        action=Action(kind="llm.completion", name="gpt-4"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500_000),
    ))

    if response.is_transport_error:
        print(f"Transport error: {response.error_message}")
    elif not response.is_success:
        print(f"Error {response.status}: {response.error_message}")
        print(f"Request ID: {response.request_id}")
""",
    "decide": """
from runcycles import DecisionRequest, Subject, Action, Amount, Unit

response = client.decide(DecisionRequest(
    idempotency_key="decide-001",
    subject=Subject(tenant="acme"),
    action=Action(kind="llm.completion", name="gpt-4"),
    estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500_000),
))

if response.is_success:
    decision = response.get_body_attribute("decision")  # "ALLOW" or "DENY"
    print(f"Decision: {decision}")
""",
    "events": """
from runcycles import EventCreateRequest, Subject, Action, Amount, Unit

response = client.create_event(EventCreateRequest(
    idempotency_key="evt-001",
    subject=Subject(tenant="acme"),
    action=Action(kind="api.call", name="geocode"),
    actual=Amount(unit=Unit.USD_MICROCENTS, amount=1_500),
))
""",
    "balances": """
response = client.get_balances(tenant="acme")
if response.is_success:
    print(response.body)
""",
    "metadata": """
response = client.create_reservation(request)
print(response.request_id)            # X-Request-Id
print(response.rate_limit_remaining)   # X-RateLimit-Remaining (int or None)
print(response.rate_limit_reset)       # X-RateLimit-Reset (int or None)
print(response.cycles_tenant)          # X-Cycles-Tenant
""",
    "overage": """
from runcycles import CommitOveragePolicy
""",
}


class TestDropIn(ServerTestCase):
    """README snippets of runcycles run unchanged but for ``runcycles`` -> ``cycles_lite``
    (and the example URL pointing at the local server)."""

    def run_snippet(self, name: str, namespace: Dict[str, Any]) -> str:
        source = README_SNIPPETS[name].replace("from runcycles import", "from cycles_lite import")
        source = source.replace("http://localhost:7878", self.srv.url)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(source, f"<README {name}>", "exec"), namespace)  # noqa: S102
        return out.getvalue()

    def test_programmatic_client_snippet(self) -> None:
        namespace: Dict[str, Any] = {}
        self.run_snippet("programmatic", namespace)
        reservation = self.srv.reservation(namespace["reservation_id"])
        self.assertEqual(reservation["status"], "COMMITTED")
        self.assertEqual([r.operation for r in self.srv.requests], ["create", "commit"])

    def test_config_snippets(self) -> None:
        env = {
            "CYCLES_BASE_URL": self.srv.url,
            "CYCLES_API_KEY": "your-api-key",
            "CYCLES_TENANT": "acme",
        }
        namespace: Dict[str, Any] = {}
        with mock.patch.dict(os.environ, env):
            self.run_snippet("from_env", namespace)
        self.assertEqual(namespace["config"].tenant, "acme")
        self.run_snippet("all_options", namespace)
        self.run_snippet("overage", namespace)
        self.assertIs(namespace["CommitOveragePolicy"], cl.CommitOveragePolicy)

    def test_error_handling_decide_events_balances_and_metadata_snippets(self) -> None:
        self.srv.inject("create", "status", status=409, error="BUDGET_EXCEEDED")
        out = self.run_snippet("error_handling", {})
        self.assertIn("Error 409: ", out)
        self.assertRegex(out, r"Request ID: \S+")
        with CyclesClient(CyclesConfig(base_url=self.srv.url, api_key="your-api-key")) as client:
            request = ReservationCreateRequest.model_validate(create_body())
            namespace: Dict[str, Any] = {"client": client, "request": request}
            self.assertIn("Decision: ALLOW", self.run_snippet("decide", namespace))
            self.run_snippet("events", namespace)
            self.assertEqual(namespace["response"].status, 201)
            self.assertIn("'balances'", self.run_snippet("balances", namespace))
            lines = self.run_snippet("metadata", namespace).splitlines()
        self.assertEqual(lines[1:], ["-1", "0", "acme"])


if __name__ == "__main__":
    unittest.main()
