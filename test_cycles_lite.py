# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0.
"""Tests of the cycles_lite client core against a real LocalCyclesServer over HTTP(S).

Run with ``python3 -W error -m unittest test_cycles_lite`` (or pytest).  Test
doubles appear only where the server cannot produce the condition: a forward
proxy, a host a redirect points at, and the race that makes a pooled
connection stale between the idle check and the send."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, TYPE_CHECKING, Tuple
from unittest import mock

import cycles_lite as cl
import cycles_lite
from cycles_lite import (
    Action,
    Amount,
    AsyncCyclesClient,
    Balance,
    Caps,
    CommitRequest,
    cycles,
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
from cycles_lite_server import (
    LocalCyclesServer,
)


HERE = os.path.dirname(os.path.abspath(__file__))
# A Python with runcycles 0.5.3 installed, for the on-disk journal compatibility tests
# (`make bench` and CI create .venv-bench); those tests are skipped without one.
RUNCYCLES_PYTHON = os.environ.get("CYCLES_RUNCYCLES_PYTHON") or os.path.join(
    HERE, ".venv-bench", "bin", "python"
)
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
EXTRA_NAMES = {
    "ReservationEvidence",
    "ReservationGuard",
    "AsyncReservationGuard",
    "RecoverySummary",
    "flush",
    "aflush",
    "CyclesConnectionError",
    "InvalidFieldError",
    "FlushResult",
    "deadline",
    "EvidenceVerification",
    "verify_evidence",
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

    def wait_for_late_answers(self, operation: str, fault: Any) -> None:
        """Until the server has answered every ``operation`` request that reached it (the
        ``fault`` delays them past the client's deadline): none lands in the next test's log."""
        self.assertTrue(wait_for(lambda: len(self.srv.requests_for(operation)) >= fault.hits))


# ---------------------------------------------------------------------------
# Models, errors, response
# ---------------------------------------------------------------------------


class TestModels(unittest.TestCase):
    def test_exports_every_runcycles_name_and_ours(self) -> None:
        self.assertEqual(len(RUNCYCLES_NAMES), 56)
        self.assertEqual(set(RUNCYCLES_NAMES) - set(cl.__all__), set())
        self.assertEqual(set(cl.__all__) - set(RUNCYCLES_NAMES), EXTRA_NAMES)
        self.assertEqual(len(cl.__all__), len(set(cl.__all__)))
        for name in cl.__all__:
            self.assertTrue(hasattr(cl, name), name)
        self.assertEqual(cl.__version__, "0.3.0")

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

    def test_a_malformed_optional_response_field_is_kept_in_extra(self) -> None:
        # Review bug 2: one bad optional field must not make a usable answer unreadable.
        body = {
            "decision": "ALLOW",
            "affected_scopes": ["tenant:acme"],
            "reservation_id": "r1",
            "caps": {"max_tokens": -1, "cooldown_ms": 5},
            "cycles_evidence": {"evidence_id": "nothex", "cycles_evidence_url": "https://e/x"},
        }
        parsed = ReservationCreateResponse.model_validate(body)
        self.assertEqual(parsed.reservation_id, "r1")
        self.assertIsNone(parsed.cycles_evidence)
        self.assertEqual(parsed.extra["cycles_evidence"], body["cycles_evidence"])
        self.assertEqual(parsed.caps.cooldown_ms, 5)  # type: ignore[union-attr]
        self.assertIsNone(parsed.caps.max_tokens)  # type: ignore[union-attr]
        self.assertEqual(parsed.caps.extra, {"max_tokens": -1})  # type: ignore[union-attr]
        with self.assertRaisesRegex(ValueError, r"^affected_scopes: must be a list"):
            ReservationCreateResponse.model_validate(dict(body, affected_scopes="x"))
        with self.assertRaisesRegex(ValueError, r"^caps\.max_tokens: "):  # requests stay strict
            ReservationCreateResponse(decision="ALLOW", affected_scopes=[], caps={"max_tokens": -1})

    def test_free_form_objects_must_be_json(self) -> None:
        # Review bug 4: the models, not the lifecycle, refuse what JSON cannot carry.
        actual = Amount(unit="TOKENS", amount=1)
        cases: List[Any] = [
            ({"x": float("nan")}, r"^metadata\['x'\]: must be a finite number"),
            ({"x": [1, {"y": float("inf")}]}, r"^metadata\['x'\]\[1\]\['y'\]: must be a finite"),
            ({"x": object()}, r"^metadata\['x'\]: must be a JSON value"),
            ({"x": {1: "a"}}, r"^metadata\['x'\]: must be a dict with string keys"),
            ({"x": b"bytes"}, r"^metadata\['x'\]: must be a JSON value"),
        ]
        for metadata, pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
                CommitRequest(idempotency_key="k", actual=actual, metadata=metadata)
        loop: Dict[str, Any] = {}
        loop["self"] = loop
        with self.assertRaisesRegex(ValueError, r"^metadata\['self'\]: .*circular"):
            CommitRequest(idempotency_key="k", actual=actual, metadata=loop)
        with self.assertRaisesRegex(ValueError, r"^custom\['x'\]: must be a finite number"):
            CyclesMetrics(custom={"x": float("nan")})
        with self.assertRaisesRegex(ValueError, r"^metrics\.custom\['x'\]: must be a JSON value"):
            CommitRequest(idempotency_key="k", actual=actual, metrics={"custom": {"x": {1, 2}}})
        fine = {"s": "t", "i": 1, "f": 1.5, "b": True, "n": None, "l": [1, "a"], "t": (1, 2)}
        self.assertEqual(
            CommitRequest(idempotency_key="k", actual=actual, metadata=fine).metadata, fine
        )

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
        runcycles_order = [
            "reservation_id", "estimate", "decision", "caps", "expires_at_ms", "affected_scopes",
            "scope_path", "reserved", "balances", "metrics", "commit_metadata",
        ]
        self.assertEqual(field_names, [*runcycles_order, "heartbeat_error", "heartbeat_stopped"])
        self.assertFalse(ctx.lease_lost)
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
            return cl._read_response(200, {k.lower(): v for k, v in headers.items()}, b"{}")

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
        html = cl._read_response(502, {"content-type": "text/html"}, b"<html>bad gateway</html>")
        self.assertEqual((html.status, html.body), (502, None))
        self.assertTrue(html.error_message.startswith("HTTP 502 (text/html) is not a Cycles"))
        self.assertTrue(html.is_server_error)
        broken = cl._read_response(200, {}, b'{"status": "COMMI')
        self.assertEqual((broken.is_success, broken.body), (True, {}))
        self.assertFalse(cl._is_schema_valid("commit", broken))
        listed = cl._read_response(200, {}, b"[1, 2]")
        self.assertEqual(listed.body, {})
        deep = cl._read_response(200, {}, b"[" * 100_000 + b"]" * 100_000)
        self.assertEqual(deep.body, {})
        moved = cl._read_response(307, {"location": "http://elsewhere/v1"}, b"")
        self.assertIn("redirect not followed", moved.error_message or "")
        error = cl._read_response(409, {"x-request-id": "rq"}, b'{"error": "X", "message": "m"}')
        self.assertEqual((error.error_message, error.request_id), ("m", "rq"))

    def test_schema_validity_per_operation(self) -> None:
        def valid(operation: str, status: int, body: Dict[str, Any]) -> bool:
            raw = json.dumps(body).encode()
            return cl._is_schema_valid(operation, cl._read_response(status, {}, raw))

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
        self.assertEqual(
            (transport.status, str(transport)),
            (-1, "C: the connection closed before a complete answer (rst)"),
        )
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
        self.assertTrue(config.user_agent.startswith("cycles-lite/0.3.0 (Python "))
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

    def test_a_mutated_key_is_checked_again_before_it_reaches_a_header(self) -> None:
        config = CyclesConfig(base_url="http://localhost:7878", api_key="k")
        config.api_key = "secret\r\nX-Injected: 1"
        for client_class in (CyclesClient, AsyncCyclesClient):
            with self.assertRaisesRegex(ValueError, "X-Cycles-API-Key: not a valid") as caught:
                client_class(config)
            self.assertNotIn("secret", str(caught.exception))

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
        cl.ReservationDetail.model_validate(got.body)
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
        cl.DecisionResponse.model_validate(decided.body)
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
        cl.EventCreateResponse.model_validate(event.body)
        balances = self.call("get_balances", tenant=TENANT, limit=50)
        cl.BalanceResponse.model_validate(balances.body)
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
        with self.assertRaisesRegex(ValueError, r"^body\['metadata'\]\['x'\]: must be a finite"):
            self.call("create_reservation", dict(body, metadata={"x": float("nan")}))
        with self.assertRaisesRegex(ValueError, r"^body\['metadata'\]\['x'\]: must be a JSON"):
            self.call("create_reservation", dict(body, metadata={"x": object()}))
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
        ReservationListResponse.model_validate(page.body)
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
        self.assertEqual(found.status, 200)
        self.assertEqual(found.body, envelope)
        self.srv.inject("jwks", "status", status=200, body={"keys": []})
        jwks = self.call("get_evidence_jwks")
        self.assertEqual(self.last_request().path, "/v1/.well-known/cycles-jwks.json")
        self.assertEqual((jwks.status, jwks.body), (200, {"keys": []}))

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

    def test_attempt_deadline_counts_from_submission(self) -> None:
        # Review bug 7: twice as many calls as connections; the half that waits for a
        # connection must not get a fresh attempt_timeout when it finally starts.
        held = self.srv.inject("balances", "delay", delay_ms=350, times=None)
        config = self.config(request_timeout=0.4, max_connections=8)

        async def timed(client: AsyncCyclesClient) -> float:
            started = time.monotonic()
            await client.get_balances(tenant=TENANT)
            return time.monotonic() - started

        async def scenario() -> List[float]:
            async with AsyncCyclesClient(config) as client:
                calls = [timed(client) for _ in range(2 * 8)]
                return list(await asyncio.gather(*calls))

        self.assertLess(max(self.run_async(scenario())), 0.4 + 0.15)
        # The server finishes the abandoned ones later: keep them out of the next test's log.
        # Each call went out at most once (on a loaded machine a queued one may reach its
        # deadline before a connection frees up, and is never sent).
        calls = 2 * 8
        self.assertTrue(wait_for(lambda: len(self.srv.requests_for("balances")) == held.hits))
        self.assertLessEqual(held.hits, calls)


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

    def test_connections_disable_nagle(self) -> None:
        client = self.client()
        self.assertTrue(client.get_balances(tenant=TENANT).is_success)
        (conn,) = client._transport._idle
        self.assertEqual(conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

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
        held = self.srv.inject("balances", "delay", delay_ms=1_000)
        started = time.monotonic()
        response = client.get_balances(tenant=TENANT)
        self.assertTrue(response.is_transport_error)
        self.assertLess(time.monotonic() - started, 0.8)
        self.wait_for_late_answers("balances", held)

    def test_explicit_deadline_through_the_send_seam(self) -> None:
        client = self.client()
        held = self.srv.inject("balances", "delay", delay_ms=500)
        self.addCleanup(self.wait_for_late_answers, "balances", held)
        balances = cl._Call("balances", "GET", "/v1/balances", query={"tenant": TENANT})
        response = client._call(balances, deadline=cl._clock.monotonic() + 0.1)
        self.assertTrue(response.is_transport_error)
        past = client._call(balances, deadline=cl._clock.monotonic() - 1)
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

    def test_the_deadline_bounds_connecting_across_every_address(self) -> None:
        # A listener whose one-slot backlog is taken: connecting there hangs (SYN dropped).
        full = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.addCleanup(full.close)
        self.addCleanup(socket.create_connection(full.getsockname()).close)
        resolve = socket.getaddrinfo

        def three_hanging(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != "cycles.test":
                return resolve(host, port, *args, **kwargs)
            return resolve(*full.getsockname(), *args, **kwargs) * 3

        config = CyclesConfig(base_url="http://cycles.test:7878", api_key=API_KEY,
                              request_timeout=0.4, journal_enabled=False)

        async def from_a_loop() -> CyclesResponse:
            async with AsyncCyclesClient(config) as client:
                return await client.get_balances(tenant=TENANT)

        for blocking in (True, False):
            with self.subTest(blocking=blocking), \
                    mock.patch.object(socket, "getaddrinfo", three_hanging):
                started = time.monotonic()
                if blocking:
                    with CyclesClient(config) as client:
                        response = client.get_balances(tenant=TENANT)
                else:
                    response = asyncio.run(from_a_loop())
                self.assertTrue(response.is_transport_error)
                # socket.timeout is TimeoutError from Python 3.10 on.
                self.assertIsInstance(response.transport_exception, (TimeoutError, socket.timeout))
                self.assertLess(time.monotonic() - started, 0.8)  # not 0.4 s per address

    def test_request_head_host_target_and_no_header_injection(self) -> None:
        hosts = {
            "http://[::1]:8080/base": "[::1]:8080",
            "https://[2001:db8::1]": "[2001:db8::1]",
            "https://h.example:443": "h.example",
            "http://h.example:8443": "h.example:8443",
        }
        injected = "k\r\nX-Injected: 1"
        for url, host in hosts.items():
            with self.subTest(url=url):
                transport = cl._Transport(CyclesConfig(
                    base_url=url, api_key=API_KEY, traceparent=lambda: injected))
                self.addCleanup(transport.close)
                call = cl._post("commit", {"idempotency_key": injected}, "../a b?c")
                head = transport.encode(call).partition(b"\r\n\r\n")[0].decode()
                path = url.partition("//")[2].partition("/")[1:]
                self.assertTrue(head.startswith(
                    f"POST {''.join(path)}/v1/reservations/..%2Fa%20b%3Fc/commit HTTP/1.1\r\n"
                ), head)
                self.assertIn(f"\r\nHost: {host}\r\n", head)
                self.assertNotIn("X-Injected", head)  # neither as a key nor as a traceparent

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
            self.heads.append(data.partition(b"\r\n\r\n")[0].decode())
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


_SIGNATURE_CHECK = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
import runcycles, cycles_lite

def params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [(p.name, str(p.kind), repr(p.default) if p.default is not p.empty else None)
            for p in sig.parameters.values()]

POSITIONAL = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")

def same(theirs, ours):
    # A parameter runcycles requires may become optional here (a relaxation).
    return ours is not None and theirs[:2] == ours[:2] and theirs[2] in (None, ours[2])

def compatible(a, b):
    pos_a = [p for p in a if p[1] in POSITIONAL]
    pos_b = [p for p in b if p[1] in POSITIONAL]
    if len(pos_b) < len(pos_a) or not all(map(same, pos_a, pos_b)):
        return False
    named_b = {p[0]: p for p in b}
    if not all(same(p, named_b.get(p[0])) for p in a):
        return False
    extras = [p for p in b if p[0] not in {q[0] for q in a}]
    return all(d is not None or k.startswith("VAR_") for _n, k, d in extras)

def compare(label, theirs, ours, problems):
    a, b = params(theirs), params(ours)
    if a is None:
        return
    if b is None or not compatible(a, b):
        problems.append(f"{label}: runcycles {a} vs cycles_lite {b}")

problems = []
for name in runcycles.__all__:
    theirs, ours = getattr(runcycles, name), getattr(cycles_lite, name)
    if inspect.isfunction(theirs):
        compare(name, theirs, ours, problems)
    elif inspect.isclass(theirs) and name in (
        "CyclesClient", "AsyncCyclesClient", "CyclesConfig", "CyclesProtocolError",
        "CyclesTransportError", "CyclesResponse", "StreamUsage", "CyclesContext",
    ):
        compare(name, theirs.__init__, ours.__init__, problems)
        for attr, member in vars(theirs).items():
            if callable(member) and not attr.startswith("_"):
                compare(f"{name}.{attr}", member, getattr(ours, attr, None), problems)
print(json.dumps(problems))
"""


@unittest.skipUnless(os.path.exists(RUNCYCLES_PYTHON), "runcycles venv not available")
class TestDropInSignatures(unittest.TestCase):
    """Every public function and client/config/exception method of runcycles 0.5.3 has the
    same parameters here (names, kinds, defaults); ours may only add optional ones after."""

    def test_signatures_match_runcycles(self) -> None:
        done = subprocess.run(
            [RUNCYCLES_PYTHON, "-c", _SIGNATURE_CHECK, HERE],
            capture_output=True, text=True, timeout=60, check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertEqual(json.loads(done.stdout), [])


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


# =============================================================================
# The pure decision core: settlement outcomes, backoff, Retry-After, heartbeat plan, journal
# =============================================================================

D = cl._Disposition
RC_PYTHON = RUNCYCLES_PYTHON
HAVE_RUNCYCLES = os.path.exists(RC_PYTHON)
NOW = 1_700_000_000_000


def zero() -> float:
    return 0.0


def decide(
    operation: str,
    status: int,
    code: Optional[str] = None,
    valid: bool = False,
    retry_after_ms: Optional[int] = None,
    attempt: int = 1,
    policy: Optional[cl._RetryPolicy] = None,
    rand: Any = zero,
) -> cl._SettlementStep:
    return cl._decide_settlement(
        operation,
        status=status,
        error_code=code,
        schema_valid=valid,
        retry_after_ms=retry_after_ms,
        attempt=attempt,
        policy=policy or cl._RetryPolicy(),
        now_ms=NOW,
        rand=rand,
    )


def run_runcycles(script: str, payload: Any) -> Any:
    """Run a snippet under the official runcycles venv; JSON in on stdin, JSON out."""
    proc = subprocess.run(
        [RC_PYTHON, "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError("runcycles helper failed: " + proc.stderr[-2000:])
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# Settlement outcome table
# ---------------------------------------------------------------------------

REJECTION_CODES = [
    "INVALID_REQUEST",
    "UNIT_MISMATCH",
    "NOT_FOUND",
    "BUDGET_EXCEEDED",
    "OVERDRAFT_LIMIT_EXCEEDED",
    "TENANT_CLOSED",
    "BUDGET_FROZEN",
    "BUDGET_CLOSED",
    "DEBT_OUTSTANDING",
    "MAX_EXTENSIONS_EXCEEDED",
]

# (operation, status, error_code, schema_valid, disposition, reason)
OUTCOME_TABLE = [
    ("commit", 200, None, True, D.SUCCESS, "settled"),
    ("event", 201, None, True, D.SUCCESS, "settled"),
    # only the operation's exact success status counts
    ("commit", 201, None, True, D.RETRY, "ambiguous_2xx"),
    ("event", 200, None, True, D.RETRY, "ambiguous_2xx"),
    ("commit", 200, None, False, D.RETRY, "ambiguous_2xx"),
    ("commit", 204, None, False, D.RETRY, "ambiguous_2xx"),
    ("event", 201, None, False, D.RETRY, "ambiguous_2xx"),
    ("commit", -1, None, False, D.RETRY, "transport_error"),
    ("event", -1, None, False, D.RETRY, "transport_error"),
    ("commit", 500, "INTERNAL_ERROR", False, D.RETRY, "server_error"),
    ("commit", 502, None, False, D.RETRY, "server_error"),
    ("commit", 503, "BUDGET_EXCEEDED", False, D.RETRY, "server_error"),
    ("event", 504, None, False, D.RETRY, "server_error"),
    ("commit", 429, None, False, D.RETRY, "rate_limited"),
    ("commit", 429, "LIMIT_EXCEEDED", False, D.RETRY, "rate_limited"),
    ("event", 429, None, False, D.RETRY, "rate_limited"),
    ("commit", 409, "LIMIT_EXCEEDED", False, D.RETRY, "rate_limited"),
    ("commit", 301, None, False, D.RETRY, "redirect"),
    ("commit", 307, None, False, D.RETRY, "redirect"),
    ("commit", 100, None, False, D.RETRY, "unexpected_status"),
    ("commit", 0, None, False, D.RETRY, "unexpected_status"),
    ("commit", 600, None, False, D.RETRY, "unexpected_status"),
    # expired commit -> event fallback, even with a mangled body
    ("commit", 410, "RESERVATION_EXPIRED", False, D.FALLBACK_EVENT, "reservation_expired"),
    ("commit", 410, None, False, D.FALLBACK_EVENT, "reservation_expired"),
    ("commit", 410, "Gone", False, D.FALLBACK_EVENT, "reservation_expired"),
    ("commit", 400, "RESERVATION_EXPIRED", False, D.FALLBACK_EVENT, "reservation_expired"),
    # an event has no reservation to expire: unknown, keep and retry
    ("event", 410, None, False, D.RETRY, "unrecognized_4xx"),
    ("event", 410, "RESERVATION_EXPIRED", False, D.RETRY, "unrecognized_4xx"),
    # already settled / key reuse: stop, discard, never release
    ("commit", 409, "RESERVATION_FINALIZED", False, D.STOP_DISCARD, "already_finalized"),
    ("commit", 410, "RESERVATION_FINALIZED", False, D.STOP_DISCARD, "already_finalized"),
    ("event", 409, "RESERVATION_FINALIZED", False, D.STOP_DISCARD, "already_finalized"),
    ("commit", 409, "IDEMPOTENCY_MISMATCH", False, D.STOP_DISCARD, "idempotency_mismatch"),
    ("event", 409, "IDEMPOTENCY_MISMATCH", False, D.STOP_DISCARD, "idempotency_mismatch"),
    # auth: keep the record for a rotated key
    ("commit", 401, None, False, D.STOP_KEEP, "auth_failed"),
    ("commit", 401, "UNAUTHORIZED", False, D.STOP_KEEP, "auth_failed"),
    ("commit", 403, "FORBIDDEN", False, D.STOP_KEEP, "auth_failed"),
    ("commit", 403, "RESERVATION_FINALIZED", False, D.STOP_KEEP, "auth_failed"),
    ("event", 401, None, False, D.STOP_KEEP, "auth_failed"),
    ("event", 403, None, False, D.STOP_KEEP, "auth_failed"),
    ("commit", 400, "UNAUTHORIZED", False, D.STOP_KEEP, "auth_failed"),
    # unknown 4xx: proxy pages, no code, future codes
    ("commit", 400, None, False, D.RETRY, "unrecognized_4xx"),
    ("commit", 404, None, False, D.RETRY, "unrecognized_4xx"),
    ("commit", 413, None, False, D.RETRY, "unrecognized_4xx"),
    ("commit", 418, "SOMETHING_NEW", False, D.RETRY, "unrecognized_4xx"),
    ("commit", 409, "ACTION_QUOTA_EXCEEDED", False, D.RETRY, "unrecognized_4xx"),
    ("event", 409, "ACTION_KIND_DENIED", False, D.RETRY, "unrecognized_4xx"),
    ("commit", 409, "UNKNOWN", False, D.RETRY, "unrecognized_4xx"),
    ("commit", 409, "INTERNAL_ERROR", False, D.RETRY, "server_error"),
] + [
    (op, status, code, False, D.STOP_DISCARD, "rejected:" + code)
    for code, status in zip(REJECTION_CODES, [400, 400, 404, 409, 409, 409, 409, 409, 409, 409])
    for op in ("commit", "event")
]


class TestSettlementOutcomeTable(unittest.TestCase):
    def test_every_row(self) -> None:
        for op, status, code, valid, disposition, reason in OUTCOME_TABLE:
            with self.subTest(op=op, status=status, code=code, valid=valid):
                step = decide(op, status, code, valid)
                self.assertIs(step.disposition, disposition)
                self.assertEqual(step.reason, reason)

    def test_retry_steps_carry_delay_and_absolute_not_before(self) -> None:
        step = decide("commit", 503)
        self.assertEqual(step.delay_ms, 250)
        self.assertEqual(step.not_before_ms, NOW + 250)

    def test_non_retry_steps_have_no_delay(self) -> None:
        for status, code in ((200, None), (410, None), (409, "RESERVATION_FINALIZED"), (401, None)):
            step = decide("commit", status, code, valid=status == 200)
            self.assertEqual(step.delay_ms, 0)
            self.assertIsNone(step.not_before_ms)

    def test_rate_limited_honours_larger_retry_after(self) -> None:
        step = decide("commit", 429, retry_after_ms=10_000)
        self.assertEqual((step.disposition, step.delay_ms), (D.RETRY, 10_000))
        self.assertEqual(step.not_before_ms, NOW + 10_000)

    def test_rate_limited_keeps_backoff_when_larger(self) -> None:
        step = decide("commit", 429, retry_after_ms=100, attempt=3)
        self.assertEqual(step.delay_ms, 1000)

    def test_rate_limited_retry_after_capped_at_one_hour(self) -> None:
        step = decide("event", 429, "LIMIT_EXCEEDED", retry_after_ms=7_200_000)
        self.assertEqual(step.delay_ms, 3_600_000)

    def test_bodyless_429_is_retryable_by_status_alone(self) -> None:
        step = decide("commit", 429, None, retry_after_ms=None)
        self.assertIs(step.disposition, D.RETRY)
        self.assertEqual(step.delay_ms, 250)

    def test_retry_after_ignored_for_other_reasons(self) -> None:
        self.assertEqual(decide("commit", 503, retry_after_ms=60_000).delay_ms, 250)

    def test_exhaustion_keeps_the_record(self) -> None:
        policy = cl._RetryPolicy(max_attempts=3)
        self.assertIs(decide("commit", 503, attempt=2, policy=policy).disposition, D.RETRY)
        step = decide("commit", 503, attempt=3, policy=policy)
        self.assertIs(step.disposition, D.STOP_KEEP)
        self.assertEqual((step.reason, step.cause), ("retries_exhausted", "server_error"))

    def test_exhaustion_after_429_keeps_the_floor(self) -> None:
        policy = cl._RetryPolicy(max_attempts=1)
        step = decide("commit", 429, retry_after_ms=120_000, policy=policy)
        self.assertIs(step.disposition, D.STOP_KEEP)
        self.assertEqual(step.cause, "rate_limited")
        self.assertEqual(step.not_before_ms, NOW + 120_000)

    def test_final_outcomes_are_not_subject_to_exhaustion(self) -> None:
        policy = cl._RetryPolicy(max_attempts=1)
        self.assertIs(decide("commit", 410, attempt=5, policy=policy).disposition, D.FALLBACK_EVENT)
        self.assertEqual(decide("commit", 401, attempt=5, policy=policy).reason, "auth_failed")
        self.assertEqual(
            decide("commit", 409, "BUDGET_EXCEEDED", attempt=9, policy=policy).reason,
            "rejected:BUDGET_EXCEEDED",
        )
        self.assertIs(decide("commit", 200, valid=True, attempt=9, policy=policy).disposition,
                      D.SUCCESS)

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            decide("extend", 200)
        with self.assertRaises(ValueError):
            decide("commit", 200, attempt=0)

    def test_disposition_is_a_str_enum(self) -> None:
        self.assertEqual(D.STOP_KEEP, "stop_keep")
        self.assertEqual(json.dumps(D.RETRY), '"retry"')


class TestBackoff(unittest.TestCase):
    policy = cl._RetryPolicy(max_attempts=10, initial_delay_ms=500, multiplier=2.0,
                             max_delay_ms=30_000)

    def test_bounds_with_fixed_rand(self) -> None:
        expected_bases = {1: 500, 2: 1000, 3: 2000, 4: 4000, 5: 8000, 6: 16000, 7: 30000,
                          8: 30000, 50: 30000}
        for attempt, base in expected_bases.items():
            with self.subTest(attempt=attempt):
                self.assertEqual(cl._backoff_ms(attempt, self.policy, lambda: 0.0), base // 2)
                self.assertEqual(cl._backoff_ms(attempt, self.policy, lambda: 1.0), base)
                hi = cl._backoff_ms(attempt, self.policy, lambda: 0.999999)
                self.assertTrue(base // 2 <= hi <= base)

    def test_equal_jitter_stays_in_range(self) -> None:
        rng = random.Random(7)
        for attempt in range(1, 12):
            base = min(500 * 2 ** (attempt - 1), 30_000)
            for _ in range(200):
                delay = cl._backoff_ms(attempt, self.policy, rng.random)
                self.assertTrue(base // 2 <= delay <= base, (attempt, delay))

    def test_out_of_range_rand_is_clamped(self) -> None:
        self.assertEqual(cl._backoff_ms(1, self.policy, lambda: -5.0), 250)
        self.assertEqual(cl._backoff_ms(1, self.policy, lambda: float("nan")), 250)
        self.assertEqual(cl._backoff_ms(1, self.policy, lambda: 7.0), 500)

    def test_huge_attempt_does_not_overflow(self) -> None:
        self.assertEqual(cl._backoff_ms(10**12, self.policy, lambda: 1.0), 30_000)
        slow = cl._RetryPolicy(multiplier=1.0000001, max_delay_ms=10**15)
        self.assertEqual(cl._backoff_ms(10**12, slow, lambda: 1.0), 10**15)

    def test_degenerate_policies(self) -> None:
        flat = cl._RetryPolicy(initial_delay_ms=700, multiplier=1.0)
        self.assertEqual(cl._backoff_ms(20, flat, lambda: 1.0), 700)
        none = cl._RetryPolicy(initial_delay_ms=0)
        self.assertEqual(cl._backoff_ms(5, none, lambda: 1.0), 0)
        capped = cl._RetryPolicy(initial_delay_ms=90_000, max_delay_ms=30_000)
        self.assertEqual(cl._backoff_ms(1, capped, lambda: 1.0), 30_000)

    def test_policy_validation(self) -> None:
        for kwargs in ({"max_attempts": 0}, {"initial_delay_ms": -1}, {"multiplier": 0.5},
                       {"multiplier": float("nan")}, {"multiplier": float("inf")},
                       {"max_delay_ms": -1}, {"max_attempts": True}):
            with self.subTest(kwargs=kwargs), self.assertRaises(ValueError):
                cl._RetryPolicy(**kwargs)


class TestRetryAfter(unittest.TestCase):
    def test_cases(self) -> None:
        cases = [
            (None, None), ("", None), ("   ", None), ("0", 0), ("5", 5000), (" 7 ", 7000),
            ("\t12", 12_000), ("3600", 3_600_000), ("3601", 3_600_000), ("99999", 3_600_000),
            ("-1", None), ("+5", None), ("1.5", None), ("1e3", None), ("0x10", None),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("abc", None), ("5 s", None),
            ("\u0663", None), ("\uff15", None), ("9" * 30, None), ("5\n", None),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(cl._parse_retry_after_ms(value), expected)

    def test_uncapped_for_the_heartbeat(self) -> None:
        self.assertEqual(cl._parse_retry_after_ms("3601", cap_ms=None), 3_601_000)
        limit = cl.INT64_MAX // 1000
        self.assertEqual(cl._parse_retry_after_ms(str(limit), cap_ms=None), limit * 1000)
        self.assertIsNone(cl._parse_retry_after_ms(str(limit + 1), cap_ms=None))


class TestRecordAfterStep(unittest.TestCase):
    def record(self, **kw: Any) -> cl._PendingSettlement:
        base: Dict[str, Any] = dict(
            reservation_id="r1", base_url="http://x", commit_body={"idempotency_key": "k"},
            event_fallback_body={"idempotency_key": "k"}, recorded_at_ms=1,
        )
        base.update(kw)
        return cl._PendingSettlement(**base)

    def test_fallback_switches_to_event_mode(self) -> None:
        rec = self.record(not_before_ms=NOW + 5)
        new = cl._record_after_step(rec, decide("commit", 410))
        assert new is not None
        self.assertEqual((new.mode, new.not_before_ms), ("event", None))
        self.assertEqual(rec.mode, "commit")  # the original is untouched

    def test_fallback_without_event_body(self) -> None:
        rec = self.record(event_fallback_body=None)
        self.assertIsNone(cl._record_after_step(rec, decide("commit", 410)))

    def test_rate_limit_floor_is_persisted(self) -> None:
        step = decide("commit", 429, retry_after_ms=30_000)
        new = cl._record_after_step(self.record(), step)
        assert new is not None
        self.assertEqual(new.not_before_ms, NOW + 30_000)
        exhausted = decide("commit", 429, retry_after_ms=30_000,
                           policy=cl._RetryPolicy(max_attempts=1))
        new = cl._record_after_step(self.record(), exhausted)
        assert new is not None
        self.assertEqual(new.not_before_ms, NOW + 30_000)

    def test_no_write_needed(self) -> None:
        for step in (decide("commit", 503), decide("commit", 200, valid=True),
                     decide("commit", 401), decide("commit", 409, "BUDGET_EXCEEDED")):
            self.assertIsNone(cl._record_after_step(self.record(), step))

    def test_replay_delay(self) -> None:
        self.assertEqual(cl._replay_delay_ms(self.record(), NOW), 0)
        self.assertEqual(cl._replay_delay_ms(self.record(not_before_ms=NOW - 1), NOW), 0)
        self.assertEqual(cl._replay_delay_ms(self.record(not_before_ms=NOW + 5000), NOW), 5000)
        self.assertEqual(
            cl._replay_delay_ms(self.record(not_before_ms=NOW + 10**12), NOW), 3_600_000
        )


# ---------------------------------------------------------------------------
# Heartbeat
# ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, ms: float) -> float:
        self.now += ms
        return self.now


class TestClassifyExtend(unittest.TestCase):
    def test_table(self) -> None:
        rows = [
            (200, None, True, "success"),
            (200, None, False, "transient"),
            (201, None, True, "transient"),
            (204, None, False, "transient"),
            (-1, None, False, "transient"),
            (500, None, False, "transient"),
            (503, "NOT_FOUND", False, "transient"),
            (429, None, False, "rate_limited"),
            (429, "LIMIT_EXCEEDED", False, "rate_limited"),
            (409, "LIMIT_EXCEEDED", False, "rate_limited"),
            (410, None, False, "terminal"),
            (410, "RESERVATION_EXPIRED", False, "terminal"),
            (404, None, False, "terminal"),
            (404, "NOT_FOUND", False, "terminal"),
            (409, "RESERVATION_FINALIZED", False, "terminal"),
            (409, "MAX_EXTENSIONS_EXCEEDED", False, "terminal"),
            (409, "TENANT_CLOSED", False, "terminal"),
            (400, "RESERVATION_EXPIRED", False, "terminal"),
            (400, "INVALID_REQUEST", False, "rejected"),
            (409, "BUDGET_EXCEEDED", False, "rejected"),
            (409, "IDEMPOTENCY_MISMATCH", False, "rejected"),
            (401, None, False, "rejected"),
            (403, "FORBIDDEN", False, "rejected"),
            (302, None, False, "rejected"),
            (100, None, False, "rejected"),
        ]
        for status, code, valid, kind in rows:
            with self.subTest(status=status, code=code, valid=valid):
                self.assertEqual(cl._classify_extend(status, code, valid), kind)


class TestHeartbeatPlanPrimary(unittest.TestCase):
    def test_spec_worked_example(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        beat = plan.after_success(remaining_ttl_ms=61_500, expires_at_ms=None,
                                  sent_ms=0.0, received_ms=1500.0)
        # lead_floor 60000, attempt_budget 10000, safety 3000, reserve 23000
        self.assertEqual(beat, cl._Beat("extend", 37_000, "scheduled"))
        self.assertEqual(plan.max_rtt_ms, 1500)

    def test_max_observed_rtt_is_kept(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=61_500, expires_at_ms=None, sent_ms=0.0,
                           received_ms=1500.0)
        beat = plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                  sent_ms=38_500.0, received_ms=38_700.0)
        # lead_floor 59800; safety still 2*1500
        self.assertEqual(beat.delay_ms, 59_800 - 23_000)

    def test_rtt_dominates_the_attempt_budget(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 2000)
        beat = plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                  sent_ms=0.0, received_ms=3000.0)
        # budget = max(2000, 1000, 6000) = 6000; safety 6000; reserve 18000
        self.assertEqual(beat.delay_ms, 57_000 - 18_000)

    def test_rounding_rtt_up_delay_down(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        beat = plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                  sent_ms=10.0, received_ms=10.2)
        # rtt 0.2 -> 1 ms; lead 59999; reserve 21000
        self.assertEqual(beat.delay_ms, 38_999)
        self.assertIsInstance(beat.delay_ms, int)

    def test_no_extend_by_accumulation(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        delays = [
            plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=10**6 + i * 60_000,
                               sent_ms=i * 40_000.0, received_ms=i * 40_000.0 + 100).delay_ms
            for i in range(6)
        ]
        self.assertEqual(len(set(delays)), 1)

    def test_thirty_second_timeout_gives_zero_delay(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 30_000)
        beat = plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                  sent_ms=0.0, received_ms=1.0)
        self.assertEqual(beat, cl._Beat("extend", 0, "zero_delay_immediate"))

    def test_zero_delay_guard_stops_on_second_zero(self) -> None:
        plan = cl._HeartbeatPlan(5000, 10_000)
        first = plan.after_success(remaining_ttl_ms=5000, expires_at_ms=None, sent_ms=0.0,
                                   received_ms=50.0)
        self.assertEqual((first.action, first.delay_ms), ("extend", 0))
        second = plan.after_success(remaining_ttl_ms=5000, expires_at_ms=None, sent_ms=60.0,
                                    received_ms=100.0)
        self.assertEqual(second, cl._Beat("stop", 0, "lease_shorter_than_retry_budget"))
        self.assertIsNotNone(plan.stopped_reason)
        self.assertTrue(plan.lease_lost)

    def test_zero_delay_then_additive_server_recovers(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        self.assertEqual(plan.after_success(remaining_ttl_ms=20_000, expires_at_ms=None,
                                            sent_ms=0.0, received_ms=10.0).delay_ms, 0)
        beat = plan.after_success(remaining_ttl_ms=80_000, expires_at_ms=None, sent_ms=20.0,
                                  received_ms=30.0)
        self.assertEqual(beat.action, "extend")
        self.assertGreater(beat.delay_ms, 0)
        # the guard re-arms after a positive delay: one more zero is allowed
        again = plan.after_success(remaining_ttl_ms=1000, expires_at_ms=None, sent_ms=40.0,
                                   received_ms=50.0)
        self.assertEqual(again.reason, "zero_delay_immediate")

    def test_zero_delay_guard_survives_failed_immediate_attempt(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 1000)
        # lead 3000 = reserve (2*1000 + 1000): next_delay 0
        b = plan.after_success(remaining_ttl_ms=3001, expires_at_ms=None, sent_ms=0.0,
                               received_ms=1.0)
        self.assertEqual(b.reason, "zero_delay_immediate")
        retry = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=2.0)
        # estimate 2999, window 999 -> min(30000, 749, 999)
        self.assertEqual(retry, cl._Beat("retry", 749, "transient"))
        stop = plan.after_success(remaining_ttl_ms=3000, expires_at_ms=None, sent_ms=3.0,
                                  received_ms=4.0)
        self.assertEqual(stop.reason, "lease_shorter_than_retry_budget")

    def test_unbounded_timeout(self) -> None:
        plan = cl._HeartbeatPlan(60_000, None)
        beat = plan.after_success(remaining_ttl_ms=3_600_000, expires_at_ms=None, sent_ms=0.0,
                                  received_ms=10.0)
        self.assertEqual(beat.delay_ms, 0)
        stop = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=20.0)
        self.assertEqual(stop, cl._Beat("stop", 0, "no_retry_window"))

    def test_unreliable_timing_means_zero_lead(self) -> None:
        for sent, received in ((10.0, 5.0), (0.0, float("nan")), (float("-inf"), 3.0)):
            with self.subTest(sent=sent, received=received):
                plan = cl._HeartbeatPlan(60_000, 10_000)
                beat = plan.after_success(remaining_ttl_ms=600_000, expires_at_ms=None,
                                          sent_ms=sent, received_ms=received)
                self.assertEqual(beat.reason, "zero_delay_immediate")
                stop = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=20.0)
                self.assertEqual(stop.reason, "no_retry_window")

    def test_no_lease_information_at_all(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        beat = plan.after_success(remaining_ttl_ms=None, expires_at_ms=None, sent_ms=0.0,
                                  received_ms=1.0)
        self.assertEqual(beat.reason, "zero_delay_immediate")
        self.assertFalse(plan.fallback)

    def test_huge_remaining_is_overflow_safe(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        beat = plan.after_success(remaining_ttl_ms=10**40, expires_at_ms=None, sent_ms=0.0,
                                  received_ms=1.0)
        self.assertEqual(beat.delay_ms, cl._MAX_TIMER_DELAY_MS)

    def test_retry_window_arithmetic(self) -> None:
        clock = FakeClock()
        plan = cl._HeartbeatPlan(120_000, 10_000)
        beat = plan.after_success(remaining_ttl_ms=120_000, expires_at_ms=None, sent_ms=0.0,
                                  received_ms=clock.advance(100))
        self.assertEqual(beat.delay_ms, 119_900 - 21_000)  # 98900
        anchor = clock.now

        def expected(now: float) -> Any:
            estimate = max(0, 119_900 - int(now - anchor))
            window = estimate - 10_000 - 1000
            return estimate, window

        clock.advance(beat.delay_ms + 100)  # connection refused after 100 ms
        est, window = expected(clock.now)
        self.assertEqual((est, window), (20_900, 9_900))
        b1 = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=clock.now)
        self.assertEqual(b1, cl._Beat("retry", min(30_000, est // 4, window), "transient"))
        self.assertEqual(plan.current_lead_estimate_ms(clock.now), 20_900)

        clock.advance(b1.delay_ms + 100)
        est, window = expected(clock.now)
        b2 = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=clock.now)
        self.assertEqual(b2.delay_ms, min(30_000, est // 4, window))
        self.assertEqual(b2.action, "retry")

        clock.advance(b2.delay_ms + 100)
        est, window = expected(clock.now)
        b3 = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=clock.now)
        self.assertEqual(b3.delay_ms, min(30_000, est // 4, window))
        self.assertEqual(b3.delay_ms, window)  # the window is now the binding cap

        clock.advance(b3.delay_ms + 100)
        self.assertLess(expected(clock.now)[1], 0)
        stop = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=clock.now)
        self.assertEqual(stop, cl._Beat("stop", 0, "no_retry_window"))
        self.assertTrue(plan.lease_lost)

    def test_thirty_second_cap_on_transient_delay(self) -> None:
        plan = cl._HeartbeatPlan(3_600_000, 5000)
        plan.after_success(remaining_ttl_ms=3_600_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=10.0)
        beat = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=20.0)
        self.assertEqual(beat.delay_ms, 30_000)

    def test_window_zero_allows_one_immediate_retry(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 1000)
        # lead_floor 3000; budget 1000 safety 1000 -> at elapsed 1000 the window is 0
        plan.after_success(remaining_ttl_ms=3001, expires_at_ms=None, sent_ms=0.0,
                           received_ms=1.0)
        retry = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=1001.0)
        self.assertEqual(retry, cl._Beat("retry", 0, "transient"))
        # coarse clock still reports the same time: must stop anyway
        stop = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=1001.0)
        self.assertEqual(stop.reason, "no_progress")

    def test_no_progress_between_failures(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 1000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=1.0)
        self.assertEqual(plan.after_failure(kind="transient", retry_after_ms=None,
                                            now_ms=5000.0).action, "retry")
        stop = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=5000.0)
        self.assertEqual(stop.reason, "no_progress")

    def test_success_resets_the_failure_history(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 1000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=1.0)
        plan.after_failure(kind="transient", retry_after_ms=None, now_ms=5000.0)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=5000.0,
                           received_ms=5001.0)
        again = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=5001.0)
        self.assertEqual(again.action, "retry")

    def test_rate_limited_inside_window(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=100.0)
        # at +20000: estimate 39900, window 39900 - 5000 - 1000 = 33900
        beat = plan.after_failure(kind="rate_limited", retry_after_ms=33_900, now_ms=20_100.0)
        self.assertEqual(beat, cl._Beat("retry", 33_900, "rate_limited"))

    def test_rate_limited_outside_window(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=100.0)
        beat = plan.after_failure(kind="rate_limited", retry_after_ms=33_901, now_ms=20_100.0)
        self.assertEqual(beat, cl._Beat("stop", 0, "retry_after_exceeds_window"))

    def test_rate_limited_without_retry_after_stops(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=100.0)
        beat = plan.after_failure(kind="rate_limited", retry_after_ms=None, now_ms=20_100.0)
        self.assertEqual(beat.reason, "retry_after_missing")

    def test_rate_limited_after_window_closed(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        plan.after_success(remaining_ttl_ms=10_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=100.0)
        beat = plan.after_failure(kind="rate_limited", retry_after_ms=0, now_ms=9000.0)
        self.assertEqual(beat.reason, "no_retry_window")

    def test_terminal_and_rejected_stop_permanently(self) -> None:
        for kind in ("terminal", "rejected"):
            with self.subTest(kind=kind):
                plan = cl._HeartbeatPlan(60_000, 5000)
                plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                                   received_ms=100.0)
                self.assertEqual(plan.after_failure(kind=kind, retry_after_ms=None,
                                                    now_ms=200.0), cl._Beat("stop", 0, kind))
                # a late extend result is ignored
                late = plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                          sent_ms=150.0, received_ms=300.0)
                self.assertEqual(late.action, "stop")
                self.assertEqual(plan.stopped_reason, kind)
                self.assertTrue(plan.lease_lost)

    def test_close_ignores_late_results(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None, sent_ms=0.0,
                           received_ms=100.0)
        plan.close("settling")
        self.assertEqual(plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=None,
                                            sent_ms=0.0, received_ms=200.0),
                         cl._Beat("stop", 0, "settling"))
        self.assertEqual(plan.after_failure(kind="transient", retry_after_ms=None,
                                            now_ms=300.0).action, "stop")
        self.assertFalse(plan.lease_lost)
        plan.close("again")
        self.assertEqual(plan.stopped_reason, "settling")

    def test_failure_before_any_success(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 5000)
        self.assertEqual(plan.after_failure(kind="transient", retry_after_ms=None,
                                            now_ms=1.0).reason, "no_valid_lease")

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            cl._HeartbeatPlan(0, 1000)
        with self.assertRaises(ValueError):
            cl._HeartbeatPlan(1000, -1)
        plan = cl._HeartbeatPlan(1000, 1000)
        with self.assertRaises(ValueError):
            plan.after_failure(kind="weird", retry_after_ms=None, now_ms=0.0)


class TestHeartbeatPlanFallback(unittest.TestCase):
    """Servers that never send remaining_ttl_ms (non-normative path)."""

    def test_additive_server_cadence(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        prime = plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_000_000,
                                   sent_ms=0.0, received_ms=0.0)
        self.assertEqual(prime, cl._Beat("extend", 0, "fallback_prime"))
        self.assertTrue(plan.fallback)
        b1 = plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_060_000, sent_ms=50.0,
                                received_ms=100.0)
        self.assertEqual(b1, cl._Beat("extend", 30_000, "fallback_normal"))
        b2 = plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_120_000,
                                sent_ms=30_100.0, received_ms=30_200.0)
        self.assertEqual(b2, cl._Beat("extend", 30_000, "fallback_normal"))

    def test_skips_beats_while_lead_is_ample(self) -> None:
        plan = cl._HeartbeatPlan(10_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=0, sent_ms=0.0,
                           received_ms=0.0)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=10_000, sent_ms=5.0,
                           received_ms=10.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=20_000, sent_ms=15.0,
                               received_ms=20.0)
        self.assertEqual(b.delay_ms, 5000)  # lead_min 19980 - 5000 < 15000
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=30_000, sent_ms=25.0,
                               received_ms=30.0)
        # lead_min 29970: beats at +5000 and +10000 are skipped (lead >= 15000)
        self.assertEqual(b.delay_ms, 15_000)
        self.assertLess(30_000 - (30 + b.delay_ms), 15_000)
        self.assertGreaterEqual(30_000 - (30 + b.delay_ms - 5000), 15_000)

    def test_max_lead_clamp_holds_bounded_cadence(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=60_000, sent_ms=0.0,
                           received_ms=0.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=60_010, sent_ms=5.0,
                               received_ms=10.0)
        self.assertEqual(b, cl._Beat("extend", 30_000, "fallback_clamped"))
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=90_010, sent_ms=30_005.0,
                               received_ms=30_010.0)
        self.assertEqual(b, cl._Beat("extend", 30_000, "fallback_clamped"))
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=90_000, sent_ms=60_005.0,
                               received_ms=60_010.0)  # a negative grant
        self.assertEqual(b.reason, "fallback_clamped")

    def test_held_cadence_is_bounded_by_thirty_seconds(self) -> None:
        plan = cl._HeartbeatPlan(600_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=600_000, sent_ms=0.0,
                           received_ms=0.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=600_000, sent_ms=5.0,
                               received_ms=10.0)
        self.assertEqual(b, cl._Beat("extend", 30_000, "fallback_clamped"))

    def test_delta_clamp_tightens(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=10_000, sent_ms=0.0,
                           received_ms=0.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=20_000, sent_ms=5.0,
                               received_ms=10.0)
        # grant 10000, elapsed 10: not the clamp band -> grant/2
        self.assertEqual(b, cl._Beat("extend", 5000, "fallback_small_grant"))

    def test_cadence_floor_one_second(self) -> None:
        plan = cl._HeartbeatPlan(1000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=1000, sent_ms=0.0,
                           received_ms=0.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=2000, sent_ms=5.0,
                               received_ms=10.0)
        self.assertEqual(b.delay_ms, 1000)

    def test_failures_retry_same_key_at_bounded_cadence(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_000_000, sent_ms=0.0,
                           received_ms=0.0)
        prime_fail = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=50.0)
        self.assertEqual(prime_fail, cl._Beat("retry", 30_000, "fallback_transient"))
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_060_000, sent_ms=60.0,
                           received_ms=100.0)
        fail = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=30_100.0)
        self.assertEqual(fail, cl._Beat("retry", 15_000, "fallback_transient"))
        again = plan.after_failure(kind="transient", retry_after_ms=None, now_ms=30_100.0)
        self.assertEqual(again.action, "retry")  # no window proof exists on this path
        limited = plan.after_failure(kind="rate_limited", retry_after_ms=45_000,
                                     now_ms=45_100.0)
        self.assertEqual(limited, cl._Beat("retry", 45_000, "fallback_rate_limited"))
        self.assertEqual(plan.after_failure(kind="terminal", retry_after_ms=None,
                                            now_ms=50_000.0).action, "stop")

    def test_switches_to_primary_when_the_field_appears(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=None, expires_at_ms=1_000_000, sent_ms=0.0,
                           received_ms=0.0)
        b = plan.after_success(remaining_ttl_ms=61_500, expires_at_ms=1_060_000,
                               sent_ms=0.0, received_ms=1500.0)
        self.assertEqual(b, cl._Beat("extend", 37_000, "scheduled"))
        self.assertFalse(plan.fallback)

    def test_primary_then_fieldless_uses_measured_grants(self) -> None:
        plan = cl._HeartbeatPlan(60_000, 10_000)
        plan.after_success(remaining_ttl_ms=60_000, expires_at_ms=60_000, sent_ms=0.0,
                           received_ms=10.0)
        b = plan.after_success(remaining_ttl_ms=None, expires_at_ms=120_000,
                               sent_ms=30_000.0, received_ms=30_010.0)
        self.assertEqual(b.reason, "fallback_normal")
        self.assertTrue(plan.fallback)


# ---------------------------------------------------------------------------
# Journal
# ---------------------------------------------------------------------------

URL = "http://127.0.0.1:7878"
KEY = "cyc_live_SECRET_KEY_do_not_store_1234567890"


def journal_record_path(journal: cl._CommitJournal, reservation_id: str) -> Optional[str]:
    """Where ``journal`` keeps the record of ``reservation_id`` (None when it is disabled)."""
    directory = journal.directory
    if directory is None:
        return None
    return os.path.join(directory, cl._journal_filename(reservation_id))


def journal_file_count(journal: cl._CommitJournal) -> int:
    """Record files in ``journal``'s directory (any server), without parsing them."""
    directory = journal.directory
    if directory is None:
        return 0
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return 0
    return sum(1 for name in names if name.endswith(".json"))


class JournalTestBase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="settle-core-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        # Isolate the temp-dir fallback from the real /tmp.
        self.fake_temp = os.path.join(self.tmp, "systemp")
        os.mkdir(self.fake_temp)
        patcher = mock.patch.object(tempfile, "tempdir", self.fake_temp)
        patcher.start()
        self.addCleanup(patcher.stop)
        warned = mock.patch.object(cl, "_journal_disabled_warned", False)
        warned.start()
        self.addCleanup(warned.stop)
        self.root = os.path.join(self.tmp, "journal")

    def journal(self, root: Optional[str] = "<test root>", *, tenant: Optional[str] = None,
                api_key: str = KEY, base_url: str = URL, fsync: bool = False
                ) -> cl._CommitJournal:
        if root == "<test root>":
            root = self.root
        return cl._CommitJournal(root, base_url, tenant=tenant, api_key=api_key, fsync=fsync)

    def record(self, rid: str = "res-1", **kw: Any) -> cl._PendingSettlement:
        fields: Dict[str, Any] = dict(
            reservation_id=rid,
            base_url=URL,
            commit_body={"idempotency_key": "commit-" + rid,
                         "actual": {"unit": "TOKENS", "amount": 42}},
            event_fallback_body={"idempotency_key": "commit-" + rid,
                                 "subject": {"tenant": "acme"},
                                 "action": {"kind": "llm", "name": "x"},
                                 "actual": {"unit": "TOKENS", "amount": 42},
                                 "metadata": {"recovered_reservation_id": rid}},
            recorded_at_ms=1_700_000_000_123,
        )
        fields.update(kw)
        return cl._PendingSettlement(**fields)

    def files(self, directory: str) -> List[str]:
        return sorted(os.listdir(directory))

    def put(self, directory: str, name: str, content: str) -> str:
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
        return path


class TestJournalFingerprint(JournalTestBase):
    def test_tenant_principal_is_stable_across_key_rotation(self) -> None:
        a = cl._journal_fingerprint(URL, tenant="acme", api_key="k1")
        b = cl._journal_fingerprint(URL, tenant="acme", api_key="k2")
        self.assertEqual(a, b)
        self.assertEqual(len(a), 16)
        self.assertNotEqual(a, cl._journal_fingerprint(URL, tenant=None, api_key="k1"))
        self.assertNotEqual(cl._journal_fingerprint(URL, tenant=None, api_key="k1"),
                            cl._journal_fingerprint(URL, tenant=None, api_key="k2"))
        self.assertNotEqual(a, cl._journal_fingerprint(URL + "/", tenant="acme", api_key="k1"))
        # a blank tenant falls back to the key, like runcycles
        self.assertEqual(cl._journal_fingerprint(URL, tenant="  ", api_key="k1"),
                         cl._journal_fingerprint(URL, tenant=None, api_key="k1"))

    def test_matches_the_documented_derivation(self) -> None:
        expected = hashlib.pbkdf2_hmac("sha256", b"tenant\nacme",
                                       ("runcycles-commit-journal\n" + URL).encode(),
                                       30_000).hex()[:16]
        self.assertEqual(cl._journal_fingerprint(URL, tenant="acme", api_key="x"), expected)

    def test_pbkdf2_runs_once_per_identity(self) -> None:
        cl._fingerprint_cache.clear()
        with mock.patch.object(hashlib, "pbkdf2_hmac", wraps=hashlib.pbkdf2_hmac) as spy:
            for _ in range(3):
                cl._journal_fingerprint(URL, tenant=None, api_key="k-cache")
            self.assertEqual(spy.call_count, 1)
        self.assertFalse(any("k-cache" in repr(k) for k in cl._fingerprint_cache))

    @unittest.skipUnless(HAVE_RUNCYCLES, "runcycles venv not available")
    def test_equals_runcycles_auth_fingerprint(self) -> None:
        identities: List[Tuple[str, str, Optional[str]]] = [
            (URL, "k1", None), (URL, "k1", "acme"), (URL, "k1", "  "), (URL, "k1", ""),
            ("https://cycles.example.com/", "cyc_\u00e9\u4e2d", "t\u00e4nant"),
            ("http://localhost:1", "", "x"),
        ]
        script = (
            "import json,sys\n"
            "from runcycles.journal import auth_fingerprint\n"
            "print(json.dumps([auth_fingerprint(u, k, t) for u, k, t in json.load(sys.stdin)]))\n"
        )
        expected = run_runcycles(script, identities)
        ours = [cl._journal_fingerprint(u, tenant=t, api_key=k) for u, k, t in identities]
        self.assertEqual(ours, expected)


def legacy_journal_filename(reservation_id: str) -> str:
    """runcycles' pre-v2 record name: code points outside ASCII [A-Za-z0-9_-] become '_'."""
    allowed = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    return "".join(c if c in allowed else "_" for c in reservation_id) + ".json"


class TestJournalFilename(unittest.TestCase):
    def test_v2_name_is_sha256_of_exact_utf8(self) -> None:
        for rid in ("res-1", "a/b", "a_b", "caf\u00e9", "cafe\u0301", "../../etc", "x" * 128):
            with self.subTest(rid=rid):
                digest = hashlib.sha256(rid.encode("utf-8")).hexdigest()
                self.assertEqual(cl._journal_filename(rid), "v2-" + digest + ".json")
        names = {cl._journal_filename(r) for r in ("a/b", "a_b", "a b", "caf\u00e9",
                                                   "cafe\u0301")}
        self.assertEqual(len(names), 5)

    def test_legacy_names_collide_as_before(self) -> None:
        # The client never computes legacy names any more (load_pending migrates any
        # misnamed record); the fixture that writes them must match runcycles' scheme.
        self.assertEqual(legacy_journal_filename("a/b"), "a_b.json")
        self.assertEqual(legacy_journal_filename("a_b"), "a_b.json")
        self.assertEqual(legacy_journal_filename("caf\u00e9-1"), "caf_-1.json")
        self.assertEqual(legacy_journal_filename("\u0661x"), "_x.json")

    @unittest.skipUnless(HAVE_RUNCYCLES, "runcycles venv not available")
    def test_names_equal_runcycles(self) -> None:
        ids = ["res-1", "a/b", "a b.c", "caf\u00e9", "\U0001f600", "x" * 128, "\u0661", "A_z-9"]
        script = (
            "import json,sys\n"
            "from runcycles import journal as j\n"
            "ids=json.load(sys.stdin)\n"
            "print(json.dumps([[j._safe_filename(i), j._legacy_filename(i)] for i in ids]))\n"
        )
        expected = run_runcycles(script, ids)
        ours = [[cl._journal_filename(i), legacy_journal_filename(i)] for i in ids]
        self.assertEqual(ours, expected)


class TestJournalRecordFormat(JournalTestBase):
    def test_round_trip(self) -> None:
        rec = self.record(not_before_ms=1_700_000_060_000, mode="event")
        self.assertEqual(cl._PendingSettlement.from_json(rec.to_json()), rec)

    def test_field_names_and_types(self) -> None:
        data = json.loads(self.record().to_json())
        self.assertEqual(list(data), ["version", "reservation_id", "base_url", "mode",
                                      "commit_body", "event_fallback_body", "recorded_at_ms",
                                      "not_before_ms"])
        self.assertEqual(data["version"], 1)
        self.assertIsNone(data["not_before_ms"])

    def test_repr_omits_bodies(self) -> None:
        text = repr(self.record())
        self.assertIn("res-1", text)
        self.assertNotIn("idempotency_key", text)
        self.assertNotIn("amount", text)

    def test_recorded_at_defaults_to_now(self) -> None:
        before = int(time.time() * 1000)
        rec = cl._PendingSettlement("r", URL, commit_body={"idempotency_key": "k"})
        self.assertTrue(before <= rec.recorded_at_ms <= int(time.time() * 1000) + 1)

    def test_defaults_when_optional_fields_are_missing(self) -> None:
        rec = cl._PendingSettlement.from_json(
            '{"version": 1, "reservation_id": "r", "commit_body": {}}')
        self.assertEqual((rec.base_url, rec.mode, rec.recorded_at_ms, rec.not_before_ms),
                         ("", "commit", 0, None))

    def test_rejects_bad_records(self) -> None:
        bad = {
            "not json": "nope",
            "array": "[]",
            "no version": '{"reservation_id": "r", "commit_body": {}}',
            "version 2": '{"version": 2, "reservation_id": "r", "commit_body": {}}',
            "version true": '{"version": true, "reservation_id": "r", "commit_body": {}}',
            "version 1.0": '{"version": 1.0, "reservation_id": "r", "commit_body": {}}',
            "empty id": '{"version": 1, "reservation_id": "", "commit_body": {}}',
            "int id": '{"version": 1, "reservation_id": 5, "commit_body": {}}',
            "bad mode": '{"version": 1, "reservation_id": "r", "mode": "x", "commit_body": {}}',
            "no commit body": '{"version": 1, "reservation_id": "r", "mode": "commit"}',
            "no event body": '{"version": 1, "reservation_id": "r", "mode": "event",'
                             ' "commit_body": {}}',
            "list body": '{"version": 1, "reservation_id": "r", "commit_body": []}',
            "bad event body": '{"version": 1, "reservation_id": "r", "commit_body": {},'
                              ' "event_fallback_body": "x"}',
            "bad base_url": '{"version": 1, "reservation_id": "r", "commit_body": {},'
                            ' "base_url": 3}',
            "bad recorded_at": '{"version": 1, "reservation_id": "r", "commit_body": {},'
                               ' "recorded_at_ms": -1}',
            "bool not_before": '{"version": 1, "reservation_id": "r", "commit_body": {},'
                               ' "not_before_ms": true}',
            "deep": "[" * 100_000 + "]" * 100_000,
        }
        for label, raw in bad.items():
            with self.subTest(label), self.assertRaises(cl._JournalRecordError) as ctx:
                cl._PendingSettlement.from_json(raw)
            self.assertEqual(ctx.exception.unsupported, label.startswith("version")
                             or label == "no version")

    @unittest.skipUnless(HAVE_RUNCYCLES, "runcycles venv not available")
    def test_bytes_equal_runcycles_to_json(self) -> None:
        recs = [self.record(), self.record("caf\u00e9/\U0001f600", mode="event",
                                           not_before_ms=1_700_000_999_000)]
        payload = [json.loads(r.to_json()) for r in recs]
        script = (
            "import json,sys\n"
            "from runcycles.journal import PendingCommitRecord\n"
            "out=[]\n"
            "for d in json.load(sys.stdin):\n"
            "    d.pop('version')\n"
            "    out.append(PendingCommitRecord(**d).to_json())\n"
            "print(json.dumps(out))\n"
        )
        self.assertEqual([r.to_json() for r in recs], run_runcycles(script, payload))


class TestJournalWrite(JournalTestBase):
    def test_lazy_resolution(self) -> None:
        j = self.journal()
        self.assertFalse(os.path.exists(self.root))
        self.assertIn("unresolved", repr(j))
        self.assertIsNotNone(j.directory)
        self.assertTrue(os.path.isdir(self.root))

    def test_layout_and_permissions(self) -> None:
        j = self.journal(tenant="acme")
        rec = self.record()
        self.assertTrue(j.write(rec))
        fp = cl._journal_fingerprint(URL, tenant="acme", api_key=KEY)
        directory = os.path.join(self.root, fp)
        self.assertEqual(j.directory, directory)
        path = os.path.join(directory, cl._journal_filename("res-1"))
        self.assertEqual(journal_record_path(j, "res-1"), path)
        self.assertEqual(self.files(directory), [os.path.basename(path)])
        if os.name == "posix":
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
            self.assertEqual(stat.S_IMODE(os.stat(self.root).st_mode), 0o700)
        with open(path, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), rec.to_json())

    def test_tmp_file_is_created_owner_only(self) -> None:
        seen: List[Any] = []
        real_open = os.open

        def spy(path: str, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
            seen.append((path, flags, mode))
            return real_open(path, flags, mode, *a, **k)

        j = self.journal()
        j.directory  # resolve first so the probe is not counted
        with mock.patch.object(os, "open", spy):
            self.assertTrue(j.write(self.record()))
        (path, flags, mode), = seen
        self.assertTrue(path.endswith(".tmp"))
        self.assertIn(f".{os.getpid()}.", path)
        self.assertEqual(mode, 0o600)
        self.assertTrue(flags & os.O_EXCL and flags & os.O_CREAT)

    def test_rewrite_replaces_atomically(self) -> None:
        j = self.journal()
        j.write(self.record())
        j.write(self.record(not_before_ms=NOW))
        (loaded,) = j.load_pending()
        self.assertEqual(loaded.not_before_ms, NOW)
        assert j.directory is not None
        self.assertEqual(len(self.files(j.directory)), 1)

    def test_fsync_option(self) -> None:
        j = self.journal(fsync=True)
        with mock.patch.object(os, "fsync", wraps=os.fsync) as spy:
            self.assertTrue(j.write(self.record()))
        self.assertGreaterEqual(spy.call_count, 1 if os.name != "posix" else 2)
        self.assertEqual(len(j.load_pending()), 1)

    def test_pre_existing_root_is_not_chmodded(self) -> None:
        os.mkdir(self.root, 0o755)
        os.chmod(self.root, 0o755)
        j = self.journal()
        self.assertTrue(j.write(self.record()))
        self.assertEqual(stat.S_IMODE(os.stat(self.root).st_mode), 0o755)
        assert j.directory is not None
        if os.name == "posix":
            self.assertEqual(stat.S_IMODE(os.stat(j.directory).st_mode), 0o700)

    def test_write_failure_returns_false_and_cleans_up(self) -> None:
        j = self.journal()
        j.directory
        with mock.patch.object(os, "replace", side_effect=OSError(28, "No space left")), \
                self.assertLogs("cycles_lite", "WARNING") as logs:
            self.assertFalse(j.write(self.record()))
        assert j.directory is not None
        self.assertEqual(self.files(j.directory), [])
        self.assertIn("res-1", logs.output[0])
        self.assertNotIn(KEY, "\n".join(logs.output))

    def test_unserialisable_record(self) -> None:
        j = self.journal()
        with self.assertLogs("cycles_lite", "WARNING"):
            self.assertFalse(j.write(self.record(commit_body={"x": object()})))

    def test_directory_recreated_when_removed(self) -> None:
        j = self.journal()
        j.directory
        shutil.rmtree(self.root)
        self.assertTrue(j.write(self.record()))
        self.assertEqual(len(j.load_pending()), 1)

    def test_distinct_ids_never_share_a_file(self) -> None:
        j = self.journal()
        for rid in ("a/b", "a_b", "a b", "caf\u00e9", "cafe\u0301"):
            self.assertTrue(j.write(self.record(rid)))
        self.assertEqual(journal_file_count(j), 5)
        self.assertEqual(sorted(r.reservation_id for r in j.load_pending()),
                         sorted(["a/b", "a_b", "a b", "caf\u00e9", "cafe\u0301"]))

    def test_api_key_never_stored_or_shown(self) -> None:
        j = self.journal()  # no tenant: the key is the principal
        for rid in ("r1", "r2"):
            j.write(self.record(rid))
        j.write(self.record("r3", mode="event"))
        j.load_pending()
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            for name in dirnames + filenames:
                self.assertNotIn("SECRET", name)
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as handle:
                    self.assertNotIn(b"SECRET", handle.read())
        self.assertNotIn("SECRET", repr(j))
        self.assertNotIn("SECRET", repr(vars(j)))

    def test_the_process_wide_journal_cache_holds_no_raw_key(self) -> None:
        config = CyclesConfig(base_url="http://127.0.0.1:9", api_key="SECRET-key-123",
                              journal_dir=self.tmp)
        journal = cl._journal_for(config)
        self.assertIs(cl._journal_for(dataclasses.replace(config)), journal)
        self.assertIsNot(cl._journal_for(dataclasses.replace(config, api_key="other")), journal)
        self.assertNotIn("SECRET", repr(list(cl._journals)))


class TestJournalRemove(JournalTestBase):
    def test_remove_and_already_removed(self) -> None:
        j = self.journal()
        j.write(self.record())
        self.assertTrue(j.remove("res-1"))
        self.assertEqual(j.load_pending(), [])
        self.assertTrue(j.remove("res-1"))

    def test_two_replayers_remove_once(self) -> None:
        a, b = self.journal(tenant="acme", api_key="k-a"), self.journal(tenant="acme",
                                                                        api_key="k-b")
        a.write(self.record())
        self.assertEqual([r.reservation_id for r in b.load_pending()], ["res-1"])
        self.assertEqual([r.reservation_id for r in a.load_pending()], ["res-1"])
        self.assertTrue(a.remove("res-1"))
        self.assertTrue(b.remove("res-1"))
        self.assertEqual(journal_file_count(a), 0)

    def test_remove_touches_only_the_v2_name(self) -> None:
        # A legacy-named file is load_pending's business (it migrates it), not remove's.
        j = self.journal()
        directory = j.directory
        assert directory is not None
        self.put(directory, "x_y.json", self.record("x/y").to_json())
        self.assertTrue(j.remove("x_y"))  # collides by legacy name, different id
        self.assertIn("x_y.json", self.files(directory))
        self.assertTrue(j.remove("x/y"))
        self.assertIn("x_y.json", self.files(directory))
        with self.assertLogs("cycles_lite", "INFO"):
            self.assertEqual([r.reservation_id for r in j.load_pending()], ["x/y"])
        self.assertEqual(self.files(directory), [cl._journal_filename("x/y")])

    def test_remove_failure_is_reported(self) -> None:
        j = self.journal()
        j.write(self.record())
        with mock.patch.object(os, "unlink", side_effect=PermissionError(13, "denied")), \
                self.assertLogs("cycles_lite", "WARNING"):
            self.assertFalse(j.remove("res-1"))
        self.assertEqual(journal_file_count(j), 1)


class TestJournalLoad(JournalTestBase):
    def test_quarantine_corrupt_and_unsupported(self) -> None:
        j = self.journal()
        j.write(self.record("good"))
        directory = j.directory
        assert directory is not None
        corrupt = cl._journal_filename("corrupt")
        unsupported = cl._journal_filename("future")
        self.put(directory, corrupt, '{"version": 1, "reservation_id": ')
        self.put(directory, unsupported, json.dumps(
            {"version": 2, "reservation_id": "future", "commit_body": {}}))
        self.put(directory, "odd.json", "[1, 2]")
        with open(os.path.join(directory, cl._journal_filename("binary")), "wb") as handle:
            handle.write(b"\xff\xfe\x00garbage")
        with self.assertLogs("cycles_lite", "ERROR") as logs:
            loaded = j.load_pending()
        self.assertEqual([r.reservation_id for r in loaded], ["good"])
        files = self.files(directory)
        self.assertIn(corrupt[:-5] + ".corrupt", files)
        self.assertIn(unsupported[:-5] + ".corrupt", files)
        self.assertIn("odd.corrupt", files)
        self.assertNotIn(corrupt, files)
        text = "\n".join(logs.output)
        self.assertEqual(len(logs.records), 4)
        self.assertIn("unsupported", text)
        self.assertIn("corrupt", text)
        # quarantined files are never deleted by later scans
        self.assertEqual(len(j.load_pending()), 1)
        self.assertIn(corrupt[:-5] + ".corrupt", self.files(directory))

    def test_quarantine_never_overwrites_an_earlier_quarantine(self) -> None:
        j = self.journal()
        directory = j.directory
        assert directory is not None
        name = cl._journal_filename("c")
        self.put(directory, name[:-5] + ".corrupt", "first")
        self.put(directory, name, "second")
        with self.assertLogs("cycles_lite", "ERROR"):
            j.load_pending()
        contents = []
        for f in self.files(directory):
            self.assertTrue(f.endswith(".corrupt"))
            with open(os.path.join(directory, f), encoding="utf-8") as handle:
                contents.append(handle.read())
        self.assertEqual(sorted(contents), ["first", "second"])

    def test_legacy_record_migrates(self) -> None:
        j = self.journal()
        directory = j.directory
        assert directory is not None
        rec = self.record("a/b")
        self.put(directory, "a_b.json", rec.to_json())
        with self.assertLogs("cycles_lite", "INFO"):
            (loaded,) = j.load_pending()
        self.assertEqual(loaded, rec)
        self.assertEqual(self.files(directory), [cl._journal_filename("a/b")])

    def test_legacy_duplicate_of_v2_is_dropped_only_on_exact_id(self) -> None:
        j = self.journal()
        directory = j.directory
        assert directory is not None
        v2 = self.record("a/b", mode="event")
        j.write(v2)
        self.put(directory, "a_b.json", self.record("a/b").to_json())
        (loaded,) = j.load_pending()
        self.assertEqual(loaded, v2)  # the v2 record stays authoritative
        self.assertEqual(self.files(directory), [cl._journal_filename("a/b")])

    def test_colliding_legacy_record_is_kept(self) -> None:
        # "a_b" (v2 file) and legacy "a_b.json" holding "a/b": both survive and load
        j = self.journal()
        directory = j.directory
        assert directory is not None
        j.write(self.record("a_b"))
        self.put(directory, "a_b.json", self.record("a/b").to_json())
        ids = sorted(r.reservation_id for r in j.load_pending())
        self.assertEqual(ids, ["a/b", "a_b"])
        self.assertEqual(self.files(directory),
                         sorted([cl._journal_filename("a/b"), cl._journal_filename("a_b")]))
        j.remove("a_b")
        self.assertEqual([r.reservation_id for r in j.load_pending()], ["a/b"])

    def test_migration_never_overwrites_a_different_v2_record(self) -> None:
        j = self.journal()
        directory = j.directory
        assert directory is not None
        target = cl._journal_filename("a/b")
        self.put(directory, target, self.record("intruder").to_json())  # misnamed v2 file
        self.put(directory, "a_b.json", self.record("a/b").to_json())
        with self.assertLogs("cycles_lite", "INFO") as logs:
            loaded = j.load_pending()
        self.assertIn("different or unreadable", "\n".join(logs.output))
        # the legacy file was kept (moving it would clobber), the misnamed intruder
        # moved to its own v2 name: nothing overwritten, nothing deleted
        self.assertEqual(self.files(directory),
                         sorted(["a_b.json", cl._journal_filename("intruder")]))
        self.assertEqual([r.reservation_id for r in loaded], ["intruder"])
        # the next scan finds the v2 name free and migrates the legacy record
        with self.assertLogs("cycles_lite", "INFO"):
            ids = sorted(r.reservation_id for r in j.load_pending())
        self.assertEqual(ids, ["a/b", "intruder"])
        self.assertEqual(self.files(directory),
                         sorted([target, cl._journal_filename("intruder")]))

    def test_other_base_url_is_left_alone(self) -> None:
        j = self.journal()
        j.write(self.record("mine"))
        j.write(self.record("theirs", base_url="http://other"))
        self.assertEqual([r.reservation_id for r in j.load_pending()], ["mine"])
        self.assertEqual(journal_file_count(j), 2)

    def test_stale_tmp_files_are_reaped(self) -> None:
        j = self.journal()
        directory = j.directory
        assert directory is not None
        old = self.put(directory, "v2-x.json.123.deadbeef.tmp", "{")
        fresh = self.put(directory, "v2-y.json.123.cafebabe.tmp", "{")
        two_hours_ago = time.time() - 7200
        os.utime(old, (two_hours_ago, two_hours_ago))
        self.assertEqual(j.load_pending(), [])
        self.assertEqual(self.files(directory), [os.path.basename(fresh)])

    def test_empty_or_missing_directory(self) -> None:
        j = self.journal()
        self.assertEqual(j.load_pending(), [])
        self.assertEqual(journal_file_count(j), 0)
        assert j.directory is not None
        shutil.rmtree(j.directory)
        self.assertEqual(j.load_pending(), [])
        self.assertEqual(journal_file_count(j), 0)


class TestJournalLocation(JournalTestBase):
    def test_default_root_under_home(self) -> None:
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        with mock.patch.dict(os.environ, {"HOME": home}):
            j = self.journal(root="")
            self.assertTrue(j.write(self.record()))
        fp = cl._journal_fingerprint(URL, tenant=None, api_key=KEY)
        self.assertEqual(j.directory, os.path.join(home, ".runcycles", "commit-journal", fp))
        if os.name == "posix":
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(home, ".runcycles")).st_mode),
                             0o700)

    def test_read_only_home_falls_back_to_temp(self) -> None:
        home_file = self.put(self.tmp, "home-is-a-file", "")  # mkdir below it fails
        with mock.patch.dict(os.environ, {"HOME": home_file}):
            j = self.journal(root=None)
            self.assertTrue(j.write(self.record()))
        fp = cl._journal_fingerprint(URL, tenant=None, api_key=KEY)
        self.assertEqual(j.directory,
                         os.path.join(self.fake_temp, "runcycles-commit-journal", fp))
        self.assertEqual(len(j.load_pending()), 1)

    def test_unwritable_configured_root_falls_back_with_warning(self) -> None:
        root_file = self.put(self.tmp, "root-is-a-file", "")
        with self.assertLogs("cycles_lite", "WARNING") as logs:
            j = self.journal(root=root_file)
            self.assertIsNotNone(j.directory)
        assert j.directory is not None
        self.assertTrue(j.directory.startswith(self.fake_temp))
        self.assertIn("not writable", logs.output[0])

    @unittest.skipIf(os.name != "posix" or os.geteuid() == 0,
                     "root ignores directory permissions")
    def test_read_only_directory_falls_back(self) -> None:
        os.mkdir(self.root, 0o500)
        self.addCleanup(os.chmod, self.root, 0o700)
        with self.assertLogs("cycles_lite", "WARNING"):
            j = self.journal()
            self.assertTrue(j.write(self.record()))
        assert j.directory is not None
        self.assertTrue(j.directory.startswith(self.fake_temp))

    def test_foreign_temp_base_is_not_used(self) -> None:
        link_target = os.path.join(self.tmp, "elsewhere")
        os.mkdir(link_target)
        os.symlink(link_target, os.path.join(self.fake_temp, "runcycles-commit-journal"))
        root_file = self.put(self.tmp, "root-is-a-file", "")
        with self.assertLogs("cycles_lite", "WARNING"):
            j = self.journal(root=root_file)
            self.assertIsNone(j.directory)
        self.assertEqual(os.listdir(link_target), [])

    def test_nothing_writable_disables_with_one_warning(self) -> None:
        root_file = self.put(self.tmp, "root-is-a-file", "")
        temp_file = self.put(self.tmp, "temp-is-a-file", "")
        handler = CaptureHandler()
        logger = logging.getLogger("cycles_lite")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        with mock.patch.object(tempfile, "tempdir", temp_file):
            journals = [self.journal(root=root_file), self.journal(root=root_file, tenant="t")]
            for j in journals:
                self.assertIsNone(j.directory)
                self.assertIsNone(j.directory)
                self.assertFalse(j.write(self.record()))
                self.assertTrue(j.remove("res-1"))
                self.assertEqual(j.load_pending(), [])
                self.assertEqual(journal_file_count(j), 0)
                self.assertIsNone(journal_record_path(j, "res-1"))
        disabled = [r for r in handler.records if "disabled" in r.getMessage()]
        self.assertEqual(len(disabled), 1)
        self.assertEqual(disabled[0].levelno, logging.WARNING)


class CaptureHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# =============================================================================
# Guarded execution: @cycles, guards, streams, heartbeat, settlement, recovery core scenarios
# =============================================================================


_LC_KEY = "key-lc-acme-0123456789"
_LC_TIGHT_KEY = "key-lc-tight-0123456789"
_LC_UNIT = "USD_MICROCENTS"
_LC_BIG = 10**12
_LC_LOGGER = "cycles_lite"


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


def _lc_run_now(coro: Any) -> Any:
    """Run a coroutine that never suspends (the sync mode's scenarios) to completion."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("a sync-mode scenario suspended")


class _LcAsyncView:
    """A sync guard or stream presented with the async API, so one scenario serves both."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __aenter__(self) -> _LcAsyncView:
        self.inner.__enter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.inner.__exit__(*exc)

    async def commit(self, *args: Any, **kwargs: Any) -> None:
        self.inner.commit(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> None:
        self.inner.release(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_lc_pool_lock = threading.Lock()
_lc_pool_holder: List[ThreadPoolExecutor] = []


def _lc_pool() -> ThreadPoolExecutor:
    """Worker threads that run the (blocking) bodies of async-mode guarded functions."""
    with _lc_pool_lock:
        if not _lc_pool_holder:
            _lc_pool_holder.append(ThreadPoolExecutor(8, thread_name_prefix="lc-test-body"))
        return _lc_pool_holder[0]


def _lc_threads_left(before: Any, wait: float = 3.0) -> List[str]:
    """Threads started since ``before`` (test pools excluded) still alive after ``wait``."""
    deadline = time.monotonic() + wait
    while True:
        alive = [
            t.name
            for t in threading.enumerate()
            if t not in before and not t.name.startswith("lc-test-body")
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False); the
    other test modules use this one too."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# The threads cycles_lite starts (the local server's threads are not the client's).
CLIENT_THREADS = ("cycles-lite-heartbeat", "cycles-lite-settlement", "cycles-lite-replay")


class VirtualClock:
    """The client's clock (``cycles_lite._clock``) that tests move forward instead of
    sleeping, the servers' clocks along with it.

    Between moves it runs at the real pace, so what really waits (a socket timeout, a
    beat on the wire) still means what it says.  ``advance`` wakes every clock wait of
    the client and returns once each of the client's threads (``CLIENT_THREADS``)
    waits on the clock again (so a beat that fell due has had its extend answered) or
    has exited: time does not run on while the client works.  Installed for the whole
    process when this module is imported: it never runs backwards under what the client
    has timed.
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._books = threading.Lock()
        self._moved = threading.Condition()  # sleep() waits on it
        self._conditions: weakref.WeakSet[threading.Condition] = weakref.WeakSet()
        self._waiting: Dict[threading.Thread, int] = {}  # thread -> moves seen when it began
        self._moves = 0
        self._driven: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # see run()

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def sleep(self, seconds: float) -> None:
        until = self.monotonic() + seconds
        with self._moved:
            while until > self.monotonic():
                self.wait(self._moved, until - self.monotonic())

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> bool:
        me = threading.current_thread()
        with self._books:
            self._conditions.add(condition)
            self._waiting[me] = self._moves
        try:
            return condition.wait(timeout)
        finally:
            with self._books:
                self._waiting.pop(me, None)

    def advance(self, seconds: float, *servers: LocalCyclesServer) -> None:
        """Move the client and ``servers`` ``seconds`` on; return once the client is quiet."""
        with self._books:
            self._offset += seconds
            self._moves += 1
            moves, conditions = self._moves, list(self._conditions)
        for server in servers:
            server.clock.advance(round(seconds * 1000))
        for condition in conditions:
            with condition:
                condition.notify_all()
        me = threading.current_thread()
        quiet_by = time.monotonic() + 3.0  # a thread held up elsewhere: carry on anyway
        while time.monotonic() < quiet_by:
            with self._books:
                busy = [t for t in threading.enumerate() if t is not me
                        and (t.name in CLIENT_THREADS or t in self._driven)
                        and self._waiting.get(t) != moves]
            if not busy:
                return
            time.sleep(0.001)

    def pass_time(self, seconds: float, *servers: LocalCyclesServer, step: float = 0.05) -> None:
        """Move time on by ``seconds``, ``step`` seconds at a time (each beat runs when due)."""
        while seconds > 1e-9:
            self.advance(min(step, seconds), *servers)
            seconds -= step

    def run(self, call: Callable[[], Any], *servers: LocalCyclesServer, step: float = 0.05
            ) -> Any:
        """``call()`` (a blocking flush, say) on a thread of its own while time moves on
        ``step`` seconds at a time; its result, or what it raised."""
        outcome: Dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = call()
            except BaseException as exc:  # raised again on the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="virtual-clock-run", daemon=True)
        self._driven.add(thread)
        thread.start()
        while thread.is_alive():
            self.advance(step, *servers)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def advance_until(self, predicate: Callable[[], Any], *servers: LocalCyclesServer,
                      step: float = 0.05, within: float = 10.0) -> bool:
        """Move time on ``step`` seconds at a time until ``predicate()`` holds (True), or
        ``within`` seconds have passed on this clock (False)."""
        moved = 0.0
        while not predicate():
            if moved >= within:
                return False
            self.advance(step, *servers)
            moved += step
        return True


VIRTUAL_CLOCK = VirtualClock()
cl._clock = VIRTUAL_CLOCK


class _LcCase(unittest.TestCase if TYPE_CHECKING else object):
    """A seeded server per class; per test a fresh agent scope, clients and request log.

    A mixin: the concrete classes add ``unittest.TestCase`` (so this one is not collected).
    """

    is_async = False
    srv: LocalCyclesServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = LocalCyclesServer(
            api_keys={_LC_KEY: "acme", _LC_TIGHT_KEY: "tight"},
            tenants={"acme": "ACTIVE", "tight": {"status": "ACTIVE", "max_extensions": 0}},
            budgets=[
                {"scope": "tenant:acme", "unit": _LC_UNIT, "allocated": _LC_BIG},
                {"scope": "tenant:tight", "unit": _LC_UNIT, "allocated": _LC_BIG},
            ],
        )
        cls.srv.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()
        self.srv.clear_requests()
        self.agent = "lc" + os.urandom(4).hex()
        self.scope = f"tenant:acme/agent:{self.agent}"
        self.srv.add_budget(self.scope, _LC_UNIT, 1_000_000)
        self._clients: List[Any] = []
        self.addCleanup(self._finish)
        self.client = self.new_client()

    def _finish(self) -> None:
        self.assertTrue(cl.flush(10), "settlements still pending after the test")
        for client in self._clients:
            self.close_client(client)
        self.srv.check_invariants()

    def config(self, **overrides: Any) -> cl.CyclesConfig:
        options: Dict[str, Any] = dict(
            base_url=self.srv.url,
            api_key=_LC_KEY,
            tenant="acme",
            agent=self.agent,
            journal_enabled=False,
            retry_initial_delay=0.01,
            retry_max_delay=0.05,
            retry_flush_timeout=1.0,
            request_timeout=1.0,
        )
        options.update(overrides)
        return cl.CyclesConfig(**options)

    def new_client(self, **overrides: Any) -> Any:
        config = self.config(**overrides)
        client = cl.AsyncCyclesClient(config) if self.is_async else cl.CyclesClient(config)
        self._clients.append(client)
        return client

    def close_client(self, client: Any) -> None:
        if isinstance(client, cl.AsyncCyclesClient):
            asyncio.run(client.aclose())
        else:
            client.close()

    # -- mode-specific faces, one interface -----------------------------------

    def flush_while_time_passes(self, timeout: float) -> bool:
        """``cl.flush(timeout)``: sync mode moves the virtual clock on meanwhile (async
        mode: real time, which the loop's retry sleeps follow)."""
        if self.is_async:
            return cl.flush(timeout)
        return bool(VIRTUAL_CLOCK.run(lambda: cl.flush(timeout), self.srv))

    def time_passes_until(self, predicate: Callable[[], Any], within: float) -> bool:
        """Until ``predicate()`` holds (True) or ``within`` seconds passed (False): sync
        mode moves the virtual clock on; async mode (its heartbeat is a task sleeping
        on the loop) waits in real time."""
        if self.is_async:
            return wait_for(predicate, within)
        return VIRTUAL_CLOCK.advance_until(predicate, self.srv, within=within)

    def drive(self, coro: Any) -> Any:
        return asyncio.run(coro) if self.is_async else _lc_run_now(coro)

    def guarded(self, body: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``body`` under @cycles as an async callable (sync mode: the sync wrapper inside).

        In async mode the wrapped function is an ``async def`` that runs the
        blocking body on a worker thread (in the caller's context), so the
        body may sleep while the heartbeat task runs on the loop.
        """
        options.setdefault("client", self.client)
        if self.is_async:

            async def in_thread(*args: Any, **kwargs: Any) -> Any:
                call = functools.partial(contextvars.copy_context().run, body, *args, **kwargs)
                return await asyncio.get_running_loop().run_in_executor(_lc_pool(), call)

            return cl.cycles(**options)(in_thread)  # type: ignore[no-any-return]
        wrapped = cl.cycles(**options)(body)

        async def call_sync(*args: Any, **kwargs: Any) -> Any:
            return wrapped(*args, **kwargs)

        return call_sync

    def call(self, body: Callable[..., Any], *args: Any, **options: Any) -> Any:
        """Run ``body(*args)`` under @cycles(**options) to completion."""
        return self.drive(self.guarded(body, **options)(*args))

    def reserve(self, estimate: Any = 100, client: Any = None, **options: Any) -> Any:
        guard = (client or self.client).reserve(estimate, **options)
        return guard if self.is_async else _LcAsyncView(guard)

    def stream(self, client: Any = None, **options: Any) -> Any:
        options.setdefault("action", cl.Action(kind="llm.completion", name="gpt-4o"))
        options.setdefault("estimate", cl.Amount(unit=_LC_UNIT, amount=1000))
        stream = (client or self.client).stream_reservation(**options)
        return stream if self.is_async else _LcAsyncView(stream)

    # -- oracle helpers ---------------------------------------------------------

    def ops(self) -> List[str]:
        return [r.operation for r in self.srv.requests]

    def keys(self, operation: str) -> List[str]:
        return [r.body["idempotency_key"] for r in self.srv.requests_for(operation)]

    def body_of(self, operation: str, index: int = -1) -> Dict[str, Any]:
        body: Dict[str, Any] = self.srv.requests_for(operation)[index].body
        return body

    def balance(self) -> Dict[str, Any]:
        return self.srv.balance(self.scope, _LC_UNIT)

    def reservation_id(self) -> str:
        rid: str = self.srv.requests_for("create")[-1].response_body["reservation_id"]
        return rid

    def status_of(self, reservation_id: Optional[str] = None) -> str:
        state = self.srv.reservation(reservation_id or self.reservation_id())
        assert state is not None
        status: str = state["status"]
        return status

    def assert_settled_once(self, actual: int) -> None:
        """The ledger shows exactly this spend and nothing left reserved."""
        balance = self.balance()
        self.assertEqual(balance["spent"], actual)
        self.assertEqual(balance["reserved"], 0)
        self.srv.check_invariants()


class _LcSyncMode:
    is_async = False


class _LcAsyncMode:
    is_async = True


# ---------------------------------------------------------------------------
# @cycles
# ---------------------------------------------------------------------------


class _LcDecoratorCases(_LcCase):
    def test_allow_runs_the_function_and_commits_the_actual(self) -> None:
        result = self.call(lambda x: x * 2, 21, estimate=100, actual=lambda r: r + 1)
        self.assertEqual(result, 42)
        self.assertEqual(self.ops(), ["create", "commit"])
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"], {"unit": _LC_UNIT, "amount": 43})
        self.assertIn("latency_ms", commit["metrics"])
        self.assertNotIn("metadata", commit)
        self.assertEqual(self.status_of(), "COMMITTED")
        self.assert_settled_once(43)
        self.assertIsNone(cl.get_cycles_context())

    def test_without_actual_the_estimate_is_committed_and_marked(self) -> None:
        self.call(lambda: None, estimate=77)
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 77)
        self.assertEqual(commit["metadata"], {"actual_source": "estimate"})
        self.assert_settled_once(77)

    def test_context_fields_and_writable_metrics_and_metadata(self) -> None:
        seen: Dict[str, Any] = {}

        def body() -> str:
            ctx = cl.get_cycles_context()
            assert ctx is not None
            seen["ctx"] = ctx
            ctx.metrics = cl.CyclesMetrics(tokens_input=5, tokens_output=7, latency_ms=3)
            ctx.commit_metadata = {"model": "m1"}
            return "ok"

        self.call(body, estimate=lambda: 250, actual=9, action_kind="llm.completion",
                  action_name="gpt-4o")
        ctx = seen["ctx"]
        self.assertEqual(ctx.reservation_id, self.reservation_id())
        self.assertEqual(ctx.estimate, 250)
        self.assertEqual(ctx.decision, cl.Decision.ALLOW)
        self.assertFalse(ctx.has_caps())
        self.assertIn(self.scope, ctx.affected_scopes)
        self.assertEqual(ctx.reserved.amount, 250)
        self.assertIsInstance(ctx.expires_at_ms, int)
        self.assertTrue(ctx.balances)
        self.assertFalse(ctx.lease_lost)
        self.assertIsNone(ctx.heartbeat_error)
        commit = self.body_of("commit")
        self.assertEqual(
            commit["metrics"], {"tokens_input": 5, "tokens_output": 7, "latency_ms": 3}
        )
        self.assertEqual(commit["metadata"], {"model": "m1"})

    def test_invalid_values_left_on_the_context_do_not_lose_the_commit(self) -> None:
        def body() -> None:
            ctx = cl.get_cycles_context()
            assert ctx is not None
            ctx.metrics = cl.CyclesMetrics(tokens_input=1)
            ctx.metrics.tokens_input = -1  # invalid after construction
            ctx.commit_metadata = {"when": object()}  # not JSON

        with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
            self.call(body, estimate=10, actual=4)
        self.assertIn("ignoring invalid context metrics", "\n".join(logs.output))
        commit = self.body_of("commit")
        self.assertEqual(set(commit["metrics"]), {"latency_ms"})
        self.assertNotIn("metadata", commit)
        self.assert_settled_once(4)

    def test_caps_are_exposed(self) -> None:
        self.srv.set_budget(self.scope, _LC_UNIT, caps={"max_tokens": 64,
                                                        "tool_allowlist": ["search"]})
        seen: Dict[str, Any] = {}

        def body() -> None:
            seen["ctx"] = cl.get_cycles_context()

        self.call(body, estimate=10)
        ctx = seen["ctx"]
        self.assertEqual(ctx.decision, cl.Decision.ALLOW_WITH_CAPS)
        self.assertTrue(ctx.has_caps())
        self.assertEqual(ctx.caps.max_tokens, 64)
        self.assertTrue(ctx.caps.is_tool_allowed("search"))
        self.assertFalse(ctx.caps.is_tool_allowed("shell"))

    def test_denial_raises_the_typed_error_before_the_function_runs(self) -> None:
        self.srv.set_budget(self.scope, _LC_UNIT, allocated=10)
        called = []
        with self.assertRaises(cl.BudgetExceededError) as caught:
            self.call(lambda: called.append(1), estimate=100)
        self.assertEqual(caught.exception.status, 409)
        self.assertEqual(caught.exception.error_code, "BUDGET_EXCEEDED")
        self.assertEqual(called, [])
        self.assertEqual(self.ops(), ["create"])

    def test_unknown_budget_unit_raises_before_the_function_runs(self) -> None:
        called = []
        with self.assertRaises(cl.CyclesProtocolError) as caught:
            self.call(lambda: called.append(1), estimate=5, unit="TOKENS")
        self.assertIn(caught.exception.status, (400, 404))
        self.assertEqual(called, [])
        self.assertEqual(self.ops(), ["create"])

    def test_create_429_raises_with_retry_after_and_is_not_retried(self) -> None:
        self.srv.inject("create", "status", status=429, headers={"Retry-After": "3"})
        with self.assertRaises(cl.CyclesProtocolError) as caught:
            self.call(lambda: None, estimate=5)
        self.assertEqual(caught.exception.status, 429)
        self.assertEqual(caught.exception.error_code, "LIMIT_EXCEEDED")
        self.assertEqual(caught.exception.retry_after_ms, 3000)
        self.assertEqual(self.ops(), ["create"])

    def test_ambiguous_create_is_resent_once_with_the_same_key(self) -> None:
        faults = [
            ("lost_response", {}),
            ("status", {"status": 503}),
            ("malformed", {}),
            ("nonconformant", {"status": 202}),
        ]
        for fault, params in faults:
            with self.subTest(fault=fault):
                self.srv.clear_requests()
                self.srv.inject("create", fault, **params)
                calls = []
                self.call(lambda: calls.append(1), estimate=5, actual=5)
                self.assertEqual(calls, [1])
                keys = self.keys("create")
                self.assertEqual(len(keys), 2)
                self.assertEqual(keys[0], keys[1])
                self.assertEqual(self.ops()[-1], "commit")
        self.assert_settled_once(5 * len(faults))

    def test_create_answer_with_a_malformed_optional_field_still_settles(self) -> None:
        # Review bug 2: a schema-valid create answer whose optional evidence reference is
        # malformed used to raise without a release, leaking the reservation until its TTL.
        bad_ref = {"evidence_id": "nothex", "cycles_evidence_url": "https://e.example/x"}
        self.srv.inject("create", "nonconformant", set_fields={"cycles_evidence": bad_ref})
        self.assertEqual(self.call(lambda: "ran", estimate=10, actual=4), "ran")
        self.assertEqual(self.ops(), ["create", "commit"])
        self.assertEqual(self.status_of(), "COMMITTED")
        self.assert_settled_once(4)

    def test_create_failing_twice_raises_and_never_runs_the_function(self) -> None:
        called = []
        self.srv.inject("create", "status", status=503, times=2)
        with self.assertRaises(cl.CyclesProtocolError) as caught:
            self.call(lambda: called.append(1), estimate=5)
        self.assertEqual(caught.exception.status, 503)
        self.srv.clear_requests()
        self.srv.inject("create", "nonconformant", status=202, times=2)
        with self.assertRaises(cl.CyclesProtocolError) as caught:
            self.call(lambda: called.append(1), estimate=5)
        self.assertIn("schema-valid", str(caught.exception))
        self.assertEqual(called, [])
        self.assertEqual(self.ops(), ["create", "create"])

    def test_function_raising_releases_and_reraises(self) -> None:
        def body() -> None:
            raise KeyError("boom")

        with self.assertRaises(KeyError):
            self.call(body, estimate=50)
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.body_of("release")["reason"], "guarded_method_failed")
        self.assertEqual(self.status_of(), "RELEASED")
        self.assert_settled_once(0)

    def test_finalized_or_mismatch_on_commit_stops_without_release(self) -> None:
        for code in ("RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH"):
            with self.subTest(code=code):
                self.srv.clear_requests()
                self.srv.inject("commit", "status", status=409, error=code)
                with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
                    self.assertEqual(self.call(lambda: "done", estimate=5), "done")
                self.assertEqual(self.ops(), ["create", "commit"])
                self.assertIn(self.reservation_id(), "\n".join(logs.output))
                self.srv.clock.advance(70_000)  # let the unsettled reservation expire

    def test_actual_callable_failure_falls_back_to_the_marked_estimate(self) -> None:
        with self.assertLogs(_LC_LOGGER, "ERROR"):
            self.call(lambda: "r", estimate=60, actual=lambda r: 1 // 0)
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 60)
        self.assertEqual(commit["metadata"]["actual_source"], "estimate")

    def test_invalid_configuration_fails_before_any_request(self) -> None:
        cases: List[Any] = [
            (dict(estimate=5, use_estimate_if_actual_not_provided=False), "actual expression"),
            (dict(estimate=5, actual=-1), "actual"),
            (dict(estimate=5, actual=True, ttl_ms=10), "actual"),  # actual checked first
            (dict(estimate=-5), "estimate"),
            (dict(estimate=1.5), "estimate"),
            (dict(estimate=5, ttl_ms=999), "ttl_ms"),
            (dict(estimate=5, grace_period_ms=60_001), "grace_period_ms"),
            (dict(estimate=5, action_tags=["x" * 65]), "action.tags"),
            (dict(estimate=5, workspace="w" * 129), "subject.workspace"),
        ]
        for options, field in cases:
            with self.subTest(options=options):
                with self.assertRaises(ValueError) as caught:
                    self.call(lambda: None, **options)
                self.assertIn(field, str(caught.exception))
        bare = self.new_client(tenant=None, agent=None)
        with self.assertRaises(ValueError) as caught:
            self.call(lambda: None, estimate=5, client=bare)
        self.assertIn("subject", str(caught.exception))
        self.assertEqual(self.srv.requests, [])

    def test_dry_run_returns_a_result_without_running_the_function(self) -> None:
        called = []
        result = self.call(lambda: called.append(1), estimate=5, dry_run=True)
        self.assertIsInstance(result, cl.DryRunResult)
        self.assertEqual(result.decision, cl.Decision.ALLOW)
        self.assertIn(self.scope, result.affected_scopes)
        self.assertEqual(called, [])
        self.assertEqual(self.ops(), ["create"])
        self.assertIs(self.body_of("create")["dry_run"], True)
        self.srv.set_budget(self.scope, _LC_UNIT, allocated=1)
        with self.assertRaises(cl.CyclesProtocolError) as caught:
            self.call(lambda: called.append(1), estimate=5, dry_run=True)
        self.assertEqual(caught.exception.reason_code, "BUDGET_EXCEEDED")
        self.assertIn("Dry-run denied", str(caught.exception))
        self.assertEqual(called, [])
        self.assert_settled_once(0)

    def test_callables_and_config_defaults_build_the_subject_and_action(self) -> None:
        self.call(
            lambda prompt, team: prompt,
            "hi",
            "red",
            estimate=lambda prompt, team: len(prompt) * 10,
            workspace=lambda prompt, team: team,
            agent=lambda prompt, team: None,  # falsy: the config's agent
            action_kind=lambda prompt, team: f"llm.{team}",
            action_name=lambda prompt, team: "",  # falsy: "unknown"
            action_tags=lambda prompt, team: [team],
            dimensions=lambda prompt, team: {"cost_center": team},
        )
        create = self.body_of("create")
        self.assertEqual(
            create["subject"],
            {"tenant": "acme", "workspace": "red", "agent": self.agent,
             "dimensions": {"cost_center": "red"}},
        )
        self.assertEqual(create["action"], {"kind": "llm.red", "name": "unknown", "tags": ["red"]})
        self.assertEqual(create["estimate"]["amount"], 20)
        self.assertEqual(create["ttl_ms"], 60_000)
        self.assertEqual(create["overage_policy"], "ALLOW_IF_AVAILABLE")

    def test_client_kind_mismatch_is_a_type_error(self) -> None:
        other = cl.CyclesClient(self.config()) if self.is_async else None
        if other is None:
            other_async = cl.AsyncCyclesClient(self.config())
            self._clients.append(other_async)
            with self.assertRaises(TypeError):
                self.call(lambda: None, estimate=1, client=other_async)
        else:
            self._clients.append(other)
            with self.assertRaises(TypeError):
                self.call(lambda: None, estimate=1, client=other)
        self.assertEqual(self.srv.requests, [])


class TestDecorator(_LcSyncMode, _LcDecoratorCases, unittest.TestCase):
    def test_sync_function_returning_an_awaitable_is_refused_and_released(self) -> None:
        async def work() -> int:
            return 1

        guarded = cl.cycles(estimate=5, client=self.client)(lambda: work())
        with self.assertRaises(TypeError):
            guarded()
        self.assertEqual(self.ops(), ["create", "release"])

    def test_generator_functions_are_refused_at_decoration(self) -> None:
        def gen() -> Any:
            yield 1

        with self.assertRaises(TypeError):
            cl.cycles(estimate=5, client=self.client)(gen)

    def test_nested_calls_restore_the_outer_context(self) -> None:
        seen: Dict[str, Any] = {}

        @cl.cycles(estimate=5, client=self.client)
        def inner() -> None:
            seen["inner"] = cl.get_cycles_context()

        @cl.cycles(estimate=10, client=self.client)
        def outer() -> None:
            seen["outer"] = cl.get_cycles_context()
            inner()
            seen["after"] = cl.get_cycles_context()

        outer()
        self.assertIsNot(seen["inner"], seen["outer"])
        self.assertIs(seen["after"], seen["outer"])
        self.assertIsNone(cl.get_cycles_context())
        self.assert_settled_once(15)

    def test_defaults_are_resolved_at_call_time_for_each_kind(self) -> None:
        saved = (cl._default_client, cl._default_async_client, cl._default_config)
        self.addCleanup(self._restore_defaults, saved)
        cl._default_client = cl._default_async_client = cl._default_config = None

        @cl.cycles(estimate=5)
        def sync_fn() -> str:
            return "sync"

        @cl.cycles(estimate=5)
        async def async_fn() -> str:
            return "async"

        with self.assertRaises(ValueError):
            sync_fn()
        cl.set_default_client(self.client)  # after decoration: used at call time
        self.assertEqual(sync_fn(), "sync")
        with self.assertRaises(TypeError):  # only a sync default exists
            asyncio.run(async_fn())
        cl.set_default_config(self.config())  # runcycles bug #10: both kinds now work
        self.assertEqual(asyncio.run(async_fn()), "async")
        self.assertEqual(sync_fn(), "sync")
        self.assertIsInstance(cl._config_clients[True], cl.AsyncCyclesClient)
        self.assert_settled_once(15)

    def _restore_defaults(self, saved: Any) -> None:
        for client in list(cl._config_clients.values()):
            self.close_client(client)
        cl._config_clients.clear()
        cl._default_client, cl._default_async_client, cl._default_config = saved


class TestDecoratorAsync(_LcAsyncMode, _LcDecoratorCases, unittest.TestCase):
    def test_async_callable_objects_are_guarded_as_async(self) -> None:
        class Agent:
            async def __call__(self, x: int) -> int:
                ctx = cl.get_cycles_context()
                assert ctx is not None
                return x + ctx.estimate

        guarded = cl.cycles(estimate=7, client=self.client)(Agent())
        self.assertEqual(asyncio.run(guarded(1)), 8)
        self.assertEqual(self.ops(), ["create", "commit"])

    def test_nested_calls_restore_the_outer_context(self) -> None:
        seen: Dict[str, Any] = {}

        @cl.cycles(estimate=5, client=self.client)
        async def inner() -> None:
            seen["inner"] = cl.get_cycles_context()

        @cl.cycles(estimate=10, client=self.client)
        async def outer() -> None:
            seen["outer"] = cl.get_cycles_context()
            await asyncio.gather(inner(), inner())
            seen["after"] = cl.get_cycles_context()

        asyncio.run(outer())
        self.assertIsNot(seen["inner"], seen["outer"])
        self.assertIs(seen["after"], seen["outer"])
        self.assert_settled_once(20)


# ---------------------------------------------------------------------------
# Reservation guards
# ---------------------------------------------------------------------------


class _LcGuardCases(_LcCase):
    def test_commit_inside_the_block(self) -> None:
        async def scenario() -> Any:
            async with self.reserve(500, action_kind="tool.search", action_name="web") as r:
                self.assertIs(cl.get_cycles_context(), r.context)
                self.assertEqual(r.decision, cl.Decision.ALLOW)
                self.assertIsNone(r.caps)
                self.assertEqual(r.reserved.amount, 500)
                self.assertIn(self.scope, r.affected_scopes)
                self.assertTrue(r.scope_path)
                self.assertTrue(r.balances)
                self.assertIsInstance(r.expires_at_ms, int)
                self.assertFalse(r.is_settled)
                await r.commit(120, metrics=cl.CyclesMetrics(tokens_output=3),
                               metadata={"k": "v"})
                self.assertTrue(r.is_settled)
                self.assertIsNone(r.settlement_error)
                with self.assertRaises(RuntimeError):
                    await r.commit(1)
            return r

        self.drive(scenario())
        self.assertIsNone(cl.get_cycles_context())
        self.assertEqual(self.ops(), ["create", "commit"])
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 120)
        self.assertEqual(commit["metrics"]["tokens_output"], 3)
        self.assertEqual(commit["metadata"], {"k": "v"})
        self.assertEqual(self.body_of("create")["action"], {"kind": "tool.search", "name": "web"})
        self.assert_settled_once(120)

    def test_leaving_without_settling_commits_the_marked_estimate(self) -> None:
        async def scenario() -> None:
            async with self.reserve(cl.Amount(unit=_LC_UNIT, amount=300)):
                pass

        self.drive(scenario())
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 300)
        self.assertEqual(commit["metadata"], {"actual_source": "estimate"})
        self.assert_settled_once(300)

    def test_leaving_on_an_exception_releases(self) -> None:
        async def scenario() -> None:
            async with self.reserve(300):
                raise LookupError("no")

        with self.assertRaises(LookupError):
            self.drive(scenario())
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.body_of("release")["reason"], "guarded_method_failed")
        self.assert_settled_once(0)

    def test_explicit_release_and_invalid_commit(self) -> None:
        async def scenario() -> None:
            async with self.reserve(300) as r:
                with self.assertRaises(ValueError):
                    await r.commit(-1)  # nothing sent, still open
                self.assertFalse(r.is_settled)
                await r.release("not_needed")
                with self.assertRaises(RuntimeError):
                    await r.release()

        self.drive(scenario())
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.body_of("release")["reason"], "not_needed")
        self.assert_settled_once(0)

    def test_a_rejected_commit_argument_commits_the_estimate_not_a_release(self) -> None:
        # Review bug 6: the work happened once commit() is called; a bad argument must
        # not turn the exit into a release.
        async def scenario() -> None:
            async with self.reserve(300) as r:
                await r.commit(20, metrics={"tokens_input": -1})

        with self.assertRaisesRegex(ValueError, r"^metrics\.tokens_input: "):
            self.drive(scenario())
        self.assertEqual(self.ops(), ["create", "commit"])
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 300)
        self.assertEqual(commit["metadata"], {"actual_source": "estimate"})
        self.assert_settled_once(300)

    def test_denial_raises_on_enter(self) -> None:
        self.srv.set_budget(self.scope, _LC_UNIT, allocated=10)

        async def scenario() -> None:
            async with self.reserve(100):
                raise AssertionError("the block must not run")

        with self.assertRaises(cl.BudgetExceededError):
            self.drive(scenario())
        self.assertIsNone(cl.get_cycles_context())

    def test_caller_key_derives_the_settlement_keys(self) -> None:
        async def scenario(key: str, release: bool) -> None:
            async with self.reserve(10, idempotency_key=key, metadata={"run": 1}) as r:
                if release:
                    await r.release()

        self.drive(scenario("job-1", False))
        self.assertEqual(self.keys("create"), ["job-1"])
        self.assertEqual(self.keys("commit"), ["commit-job-1"])
        self.assertEqual(self.body_of("create")["metadata"], {"run": 1})
        long_key = "k" * 250
        self.drive(scenario(long_key, True))
        self.assertTrue(self.keys("release")[-1].startswith("release-sha256-"))
        self.assertLessEqual(len(self.keys("release")[-1]), 256)

    def test_nested_guards_restore_the_outer_context(self) -> None:
        async def scenario() -> None:
            async with self.reserve(10) as outer:
                self.assertIs(cl.get_cycles_context(), outer.context)
                async with self.reserve(5) as inner:
                    self.assertIs(cl.get_cycles_context(), inner.context)
                self.assertIs(cl.get_cycles_context(), outer.context)
            self.assertIsNone(cl.get_cycles_context())

        self.drive(scenario())
        self.assert_settled_once(15)

    def test_wrong_client_kind_is_a_type_error(self) -> None:
        guard_class = cl.ReservationGuard if self.is_async else cl.AsyncReservationGuard
        with self.assertRaises(TypeError):
            guard_class(self.client, 5)


class TestGuard(_LcSyncMode, _LcGuardCases, unittest.TestCase):
    pass


class TestGuardAsync(_LcAsyncMode, _LcGuardCases, unittest.TestCase):
    pass


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------


class _LcStreamCases(_LcCase):
    def test_usage_actual_cost_is_committed_with_usage_metrics(self) -> None:
        async def scenario() -> Any:
            async with self.stream(ttl_ms=30_000) as s:
                self.assertIs(cl.get_cycles_context().reservation_id, s.reservation_id)
                s.usage.add_input_tokens(10)
                s.usage.add_output_tokens(20)
                s.usage.model_version = "v1"
                s.usage.set_actual_cost(640)
            return s

        stream = self.drive(scenario())
        self.assertIsNone(stream.settlement_error)
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 640)
        self.assertEqual(commit["metrics"]["tokens_input"], 10)
        self.assertEqual(commit["metrics"]["tokens_output"], 20)
        self.assertEqual(commit["metrics"]["model_version"], "v1")
        self.assertNotIn("metadata", commit)
        self.assertEqual(self.body_of("create")["subject"], {"tenant": "acme", "agent": self.agent})
        self.assertEqual(self.body_of("create")["ttl_ms"], 30_000)
        self.assert_settled_once(640)

    def test_cost_fn_then_marked_estimate(self) -> None:
        async def scenario(cost_fn: Any) -> None:
            async with self.stream(cost_fn=cost_fn, metadata={"m": 1}) as s:
                s.usage.add_output_tokens(4)

        self.drive(scenario(lambda usage: usage.tokens_output * 100))
        self.assertEqual(self.body_of("commit")["actual"]["amount"], 400)
        self.assertEqual(self.body_of("commit")["metadata"], {"m": 1})
        with self.assertLogs(_LC_LOGGER, "WARNING"):
            self.drive(scenario(lambda usage: -1))
        commit = self.body_of("commit")
        self.assertEqual(commit["actual"]["amount"], 1000)
        self.assertEqual(commit["metadata"], {"m": 1, "actual_source": "estimate"})
        self.assert_settled_once(1400)

    def test_exception_releases_as_stream_failed(self) -> None:
        async def scenario() -> None:
            async with self.stream(subject=cl.Subject(tenant="acme", agent=self.agent)):
                raise ConnectionError("stream broke")

        with self.assertRaises(ConnectionError):
            self.drive(scenario())
        self.assertEqual(self.ops(), ["create", "release"])
        self.assertEqual(self.body_of("release")["reason"], "stream_failed")
        self.assert_settled_once(0)

    def test_commit_failure_is_reported_and_raised_on_request(self) -> None:
        async def scenario(raise_on_failure: bool) -> Any:
            async with self.stream(raise_on_commit_failure=raise_on_failure,
                                   idempotency_key=os.urandom(4).hex()) as s:
                s.usage.set_actual_cost(5)
            return s

        self.srv.inject("commit", "status", status=400, error="INVALID_REQUEST")
        stream = self.drive(scenario(False))
        self.assertIsInstance(stream.settlement_error, cl.CyclesProtocolError)
        self.assertEqual(stream.settlement_error.error_code, "INVALID_REQUEST")
        self.srv.inject("commit", "status", status=400, error="INVALID_REQUEST")
        with self.assertRaises(cl.CyclesProtocolError):
            self.drive(scenario(True))
        self.assertTrue(self.keys("commit")[-1].startswith("commit-"))
        self.srv.clock.advance(200_000)  # the unsettled reservations expire

    def test_reservation_id_outside_the_block_is_an_error(self) -> None:
        stream = self.stream()
        with self.assertRaises(RuntimeError):
            _ = stream.reservation_id
        self.assertEqual(stream.decision, cl.Decision.ALLOW)


class TestStreaming(_LcSyncMode, _LcStreamCases, unittest.TestCase):
    pass


class TestStreamingAsync(_LcAsyncMode, _LcStreamCases, unittest.TestCase):
    pass


# ---------------------------------------------------------------------------
# Heartbeat
# ---------------------------------------------------------------------------


class _LcHeartbeatCases(_LcCase):
    """Short TTLs with a 1 s attempt budget: next beat = remaining - rtt - 3000 ms."""

    def extends(self) -> List[Any]:
        return self.srv.requests_for("extend")

    def run_until(self, predicate: Callable[[Any], bool], timeout: float = 4.0,
                  real_time: bool = False, **options: Any) -> Dict[str, Any]:
        """A guarded call whose body waits for ``predicate(context)`` (on the virtual
        clock in sync mode, unless ``real_time``); returns what it saw."""
        seen: Dict[str, Any] = {}
        wait = wait_for if real_time else self.time_passes_until

        def body() -> str:
            seen["ctx"] = ctx = cl.get_cycles_context()
            seen["reached"] = wait(lambda: predicate(ctx), timeout)
            seen["error"] = getattr(ctx, "heartbeat_error", None)
            seen["stopped"] = getattr(ctx, "heartbeat_stopped", None)
            seen["expires"] = getattr(ctx, "expires_at_ms", None)
            return "work done"

        options.setdefault("estimate", 10)
        seen["result"] = self.call(body, **options)
        return seen

    def test_cadence_follows_remaining_ttl_with_a_fresh_key_per_beat(self) -> None:
        # The server answers every extend with remaining_ttl_ms=3500: beats ~500 ms apart.
        self.srv.inject("extend", "nonconformant", times=10, set_fields={"remaining_ttl_ms": 3500})
        seen = self.run_until(lambda ctx: len(self.extends()) >= 3, ttl_ms=3500)
        self.assertTrue(seen["reached"])
        extends = self.extends()[:3]
        keys = [e.body["idempotency_key"] for e in extends]
        self.assertEqual(len(set(keys)), 3)
        self.assertEqual({e.body["extend_by_ms"] for e in extends}, {3500})
        created = self.srv.requests_for("create")[0].time_ms
        gaps = [b - a for a, b in zip([created] + [e.time_ms for e in extends],
                                      [e.time_ms for e in extends])]
        for gap in gaps:
            self.assertGreater(gap, 300)
            self.assertLess(gap, 1200)
        self.assertGreater(seen["expires"], self.srv.requests_for("create")[0]
                           .response_body["expires_at_ms"])
        self.assertEqual(self.ops()[-1], "commit")
        self.assertGreaterEqual(self.srv.reservation(self.reservation_id())["extension_count"], 3)

    def test_a_short_lease_gets_one_immediate_beat_then_stops(self) -> None:
        # ttl 3000 < retry reserve (2 x 1000 + 1000): one immediate extend; the server keeps
        # answering remaining_ttl_ms=3000 (maximum-lead clamping), so the heartbeat stops.
        self.srv.inject("extend", "nonconformant", times=5, set_fields={"remaining_ttl_ms": 3000})
        with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
            seen = self._short_lease()
        self.assertEqual(len(self.extends()), 1)
        self.assertEqual(seen["stopped"], "lease_shorter_than_retry_budget")
        self.assertTrue(seen["ctx"].lease_lost)
        self.assertIn("lease_shorter_than_retry_budget", "\n".join(logs.output))
        self.assertEqual(seen["result"], "work done")
        self.assertEqual(self.ops()[-1], "commit")

    def _short_lease(self) -> Dict[str, Any]:
        seen: Dict[str, Any] = {}

        def body() -> str:
            seen["ctx"] = ctx = cl.get_cycles_context()
            wait_for(lambda: getattr(ctx, "heartbeat_stopped", None) is not None, 3.0)
            seen["stopped"] = getattr(ctx, "heartbeat_stopped", None)
            return "work done"

        seen["result"] = self.call(body, estimate=10, ttl_ms=3000)
        return seen

    def test_a_short_lease_on_an_additive_server_keeps_beating(self) -> None:
        seen = self.run_until(lambda ctx: len(self.extends()) >= 1, ttl_ms=3000)
        self.assertTrue(seen["reached"])
        time.sleep(0.05)
        self.assertIsNone(getattr(seen["ctx"], "heartbeat_stopped", None))
        self.assertEqual(len(self.extends()), 1)  # next beat only ~3 s later

    def test_transient_failure_retries_the_same_key_and_recovers(self) -> None:
        # The first extend outlives the 0.3 s attempt deadline: a transport error.  Real
        # time: the server's delay is, and its late answer must land before the next beat.
        self.srv.inject("extend", "delay", delay_ms=600)
        with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
            seen = self.run_until(
                lambda ctx: len(self.extends()) >= 2 and ctx.heartbeat_error is None,
                ttl_ms=3500,
                real_time=True,
                client=self.new_client(request_timeout=0.3),
            )
        self.assertTrue(seen["reached"])
        keys = [e.body["idempotency_key"] for e in self.extends()]
        self.assertEqual(keys[0], keys[1])
        text = "\n".join(logs.output)
        self.assertIn("will retry with the same idempotency key", text)
        self.assertIn(self.reservation_id(), text)
        self.assertIsNone(seen["stopped"])

    def test_429_with_a_retry_after_inside_the_window_is_honoured(self) -> None:
        self.srv.inject("extend", "status", status=429, headers={"Retry-After": "0"})
        seen = self.run_until(lambda ctx: len(self.extends()) >= 2, ttl_ms=3500)
        self.assertTrue(seen["reached"])
        keys = [e.body["idempotency_key"] for e in self.extends()]
        self.assertEqual(keys[0], keys[1])
        self.assertIsNone(getattr(seen["ctx"], "heartbeat_stopped", None))

    def test_stop_rules(self) -> None:
        cases = [
            ("status", {"status": 429, "headers": {"Retry-After": "5"}},
             "retry_after_exceeds_window"),
            ("status", {"status": 429}, "retry_after_missing"),
            ("status", {"status": 400}, "rejected"),
            ("status", {"status": 403}, "rejected"),
            ("status", {"status": 404}, "terminal"),
            ("status", {"status": 409, "error": "RESERVATION_FINALIZED"}, "terminal"),
        ]
        for fault, params, reason in cases:
            with self.subTest(reason=reason, params=params):
                self.srv.clear_requests()
                self.srv.inject("extend", fault, **params)
                with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
                    seen = self.run_until(lambda ctx: ctx.heartbeat_stopped is not None,
                                          ttl_ms=3500)
                ctx = seen["ctx"]
                self.assertEqual(ctx.heartbeat_stopped, reason)
                self.assertTrue(ctx.lease_lost)
                self.assertEqual(len(self.extends()), 1)
                text = "\n".join(logs.output)
                self.assertIn("stopping (" + reason, text)
                self.assertIn(ctx.reservation_id, text)
                self.assertEqual(self.ops()[-1], "commit")  # settlement still runs (warn)

    def test_expired_lease_stops_and_the_commit_still_lands_in_grace(self) -> None:
        def body() -> str:
            ctx = cl.get_cycles_context()
            assert ctx is not None
            self.srv.clock.advance(3600)  # past expiry, inside the 5 s grace period
            self.time_passes_until(lambda: ctx.heartbeat_stopped is not None, 3.0)
            self.assertEqual(ctx.heartbeat_stopped, "terminal")
            self.assertIn("RESERVATION_EXPIRED", ctx.heartbeat_error)
            return "ok"

        self.call(body, estimate=10, actual=8, ttl_ms=3500)
        self.assertEqual(self.extends()[0].status, 410)
        self.assertEqual(self.ops()[-1], "commit")
        self.assert_settled_once(8)

    def test_max_extensions_stops_the_heartbeat(self) -> None:
        tight = self.new_client(api_key=_LC_TIGHT_KEY, tenant="tight")

        def body() -> str:
            ctx = cl.get_cycles_context()
            assert ctx is not None
            wait_for(lambda: ctx.heartbeat_stopped is not None, 3.0)
            self.assertEqual(ctx.heartbeat_stopped, "terminal")
            self.assertIn("MAX_EXTENSIONS_EXCEEDED", ctx.heartbeat_error)
            return "ok"

        with self.assertLogs(_LC_LOGGER, "WARNING"):
            self.call(body, estimate=10, ttl_ms=3000, client=tight)
        self.assertEqual([e.status for e in self.extends()], [409])

    def test_without_remaining_ttl_the_fallback_primes_at_once(self) -> None:
        self.srv.inject("create", "nonconformant", drop_fields=["remaining_ttl_ms"])
        seen = self.run_until(lambda ctx: len(self.extends()) >= 1, ttl_ms=60_000)
        self.assertTrue(seen["reached"])
        gap = self.extends()[0].time_ms - self.srv.requests_for("create")[0].time_ms
        self.assertLess(gap, 500)

    def test_heartbeat_stops_before_the_commit_and_late_results_are_ignored(self) -> None:
        # ttl 3000: an immediate beat, delayed 300 ms by the server; the work ends first.
        self.srv.inject("extend", "delay", delay_ms=300)
        seen: Dict[str, Any] = {}

        def body() -> str:
            seen["ctx"] = ctx = cl.get_cycles_context()
            assert ctx is not None
            seen["expires"] = ctx.expires_at_ms
            time.sleep(0.05)
            return "ok"

        self.call(body, estimate=10, ttl_ms=3000)
        self.assertTrue(wait_for(lambda: len(self.extends()) == 1))
        time.sleep(0.05)
        # The beat's result came after the stop: dropped, never written to the context.
        self.assertEqual(seen["ctx"].expires_at_ms, seen["expires"])
        self.assertIsNone(seen["ctx"].heartbeat_error)
        self.assertEqual(len(self.extends()), 1)
        self.assertEqual(self.srv.requests_for("commit")[0].status, 200)
        # Both stops wait for the beat in flight (review bug 5: the async one did not).
        self.assertEqual(self.ops(), ["create", "extend", "commit"])

    def test_one_timer_thread_at_most_per_reservation(self) -> None:
        if self.is_async:
            self.skipTest("the async heartbeat is a task")
        counts: List[int] = []
        self.srv.inject("extend", "nonconformant", times=10, set_fields={"remaining_ttl_ms": 3100})

        def body() -> None:
            for _ in range(100):  # one second, a beat about every 100 ms
                VIRTUAL_CLOCK.advance(0.01, self.srv)
                counts.append(sum(t.name == "cycles-lite-heartbeat"
                                  for t in threading.enumerate()))

        self.call(body, estimate=10, ttl_ms=3100)
        self.assertGreaterEqual(len(self.extends()), 5)
        self.assertLessEqual(max(counts), 2)  # the armed timer (+ the one that armed it)


class TestHeartbeat(_LcSyncMode, _LcHeartbeatCases, unittest.TestCase):
    pass


class TestHeartbeatAsync(_LcAsyncMode, _LcHeartbeatCases, unittest.TestCase):
    pass


# ---------------------------------------------------------------------------
# Settlement
# ---------------------------------------------------------------------------


class _LcSettlementCases(_LcCase):
    def commits(self) -> List[Any]:
        return self.srv.requests_for("commit")

    def assert_one_key(self, operation: str, count: int) -> None:
        keys = self.keys(operation)
        self.assertEqual(len(keys), count)
        self.assertEqual(len(set(keys)), 1)

    def test_5xx_storm_is_retried_with_the_same_key(self) -> None:
        self.srv.inject("commit", "status", status=503, times=3)
        self.assertEqual(self.call(lambda: "ok", estimate=10, actual=7), "ok")
        self.assertTrue(cl.flush(5))
        self.assert_one_key("commit", 4)
        self.assertEqual(self.status_of(), "COMMITTED")
        self.assert_settled_once(7)

    def test_exhausted_retries_keep_the_journal_record_and_log_an_error(self) -> None:
        journal_dir = tempfile.mkdtemp(prefix="lc-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        client = self.new_client(journal_enabled=True, journal_dir=journal_dir,
                                 retry_max_attempts=2)
        self.srv.inject("commit", "status", status=502, times=3)
        with self.assertLogs(_LC_LOGGER, "ERROR") as logs:
            self.call(lambda: None, estimate=10, actual=3, client=client)
            self.assertEqual(cl.flush(5), cl.FlushResult(settled=0, pending=1, given_up=0))
        rid = self.reservation_id()
        self.assert_one_key("commit", 3)
        self.assertNotIn("release", self.ops())
        self.assertIn(rid, "\n".join(logs.output))
        self.assertIn("not settled after 3 attempt(s)", "\n".join(logs.output))
        records = [os.path.join(root, name) for root, _, names in os.walk(journal_dir)
                   for name in names if name.endswith(".json")]
        self.assertEqual(len(records), 1)
        with open(records[0], encoding="utf-8") as handle:
            record = json.load(handle)
        self.assertEqual(record["reservation_id"], rid)
        self.assertEqual(record["commit_body"]["idempotency_key"], self.keys("commit")[0])
        self.assertEqual(self.status_of(), "ACTIVE")
        self.srv.clock.advance(70_000)

    def test_journal_record_lives_until_the_commit_settles(self) -> None:
        journal_dir = tempfile.mkdtemp(prefix="lc-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        # The retry waits 2 s on the virtual clock: a loaded machine cannot run it before
        # the record is looked at (in both modes it is on the settlement worker by then).
        client = self.new_client(journal_enabled=True, journal_dir=journal_dir,
                                 retry_initial_delay=2.0)

        def records() -> List[str]:
            return [name for _, _, names in os.walk(journal_dir) for name in names
                    if name.endswith(".json")]

        self.srv.inject("commit", "status", status=503)
        self.call(lambda: None, estimate=10, client=client)
        self.assertEqual(len(records()), 1)  # written before the first commit left
        self.assertTrue(VIRTUAL_CLOCK.run(lambda: cl.flush(5), self.srv))
        self.assertEqual(records(), [])
        self.assert_settled_once(10)

    def test_429_with_retry_after_waits_and_without_uses_backoff(self) -> None:
        journal_dir = tempfile.mkdtemp(prefix="lc-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        client = self.new_client(journal_enabled=True, journal_dir=journal_dir)
        self.srv.inject("commit", "status", status=429, headers={"Retry-After": "1"})
        self.call(lambda: None, estimate=10, actual=1, client=client)
        (record_path,) = [os.path.join(root, name) for root, _, names in os.walk(journal_dir)
                          for name in names if name.endswith(".json")]
        with open(record_path, encoding="utf-8") as handle:
            floor = json.load(handle)["not_before_ms"]  # the 429 floor is persisted
        self.assertGreaterEqual(floor, time.time() * 1000 + 800)
        self.assertTrue(self.flush_while_time_passes(5))
        first, second = self.commits()
        self.assertGreaterEqual(second.time_ms - first.time_ms, 950)
        self.assertFalse(os.path.exists(record_path))
        self.srv.clear_requests()
        self.srv.inject("commit", "status", status=429)
        self.call(lambda: None, estimate=10, actual=1)
        self.assertTrue(cl.flush(5))
        first, second = self.commits()
        self.assertLess(second.time_ms - first.time_ms, 500)
        self.assert_one_key("commit", 2)
        self.assert_settled_once(2)

    def test_proxy_html_pages_are_retried_or_kept_never_released(self) -> None:
        self.srv.inject("commit", "html", status=400)
        # A generous attempt timeout: a loaded machine must not add a timed-out retry.
        patient = self.new_client(request_timeout=5.0)
        self.call(lambda: None, estimate=10, actual=2, client=patient)
        self.assertTrue(cl.flush(5))
        self.assert_one_key("commit", 2)
        self.assert_settled_once(2)
        self.srv.clear_requests()
        self.srv.inject("commit", "html", status=403)  # auth trouble: kept, not retried now
        with self.assertLogs(_LC_LOGGER, "ERROR"):
            self.call(lambda: None, estimate=10, actual=2)
        self.assertEqual(self.ops(), ["create", "commit"])
        self.srv.clock.advance(70_000)

    def test_malformed_2xx_is_ambiguous_and_retried(self) -> None:
        self.srv.inject("commit", "malformed")
        self.call(lambda: None, estimate=10, actual=6)
        self.assertTrue(cl.flush(5))
        self.assert_one_key("commit", 2)
        self.assertTrue(self.commits()[0].applied)
        self.assert_settled_once(6)

    def test_slow_drip_commit_and_create_hit_the_attempt_deadline(self) -> None:
        client = self.new_client(request_timeout=0.3)
        self.srv.inject("create", "trickle", interval_ms=150)
        self.srv.inject("commit", "trickle", interval_ms=150)
        started = time.monotonic()
        self.call(lambda: None, estimate=10, actual=4, client=client)
        self.assertTrue(cl.flush(5))
        self.assertLess(time.monotonic() - started, 3.0)
        self.assert_one_key("create", 2)
        self.assert_one_key("commit", 2)
        self.assert_settled_once(4)

    def test_background_retry_and_flush(self) -> None:
        client = self.new_client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.srv.inject("commit", "status", status=503)
        started = time.monotonic()
        self.call(lambda: None, estimate=10, actual=5, client=client)
        self.assertLess(time.monotonic() - started, 0.25)  # the caller is not held
        self.assertEqual(len(self.commits()), 1)
        self.assertFalse(cl.flush(0))
        self.assertTrue(cl.flush(5))
        self.assert_one_key("commit", 2)
        self.assert_settled_once(5)
        self.assertTrue(wait_for(lambda: cl._settlements._worker is None))  # exits when idle

    def test_inline_commit_retry_settles_before_returning(self) -> None:
        client = self.new_client(commit_retry="inline")
        self.srv.inject("commit", "status", status=503, times=2)
        before = set(threading.enumerate())
        self.call(lambda: None, estimate=10, actual=5, client=client)
        self.assert_one_key("commit", 3)  # all attempts before the call returned
        self.assertEqual(cl._settlements.pending(), 0)
        self.assertNotIn("cycles-lite-settlement", _lc_threads_left(before, 0))
        self.assert_settled_once(5)

    def test_a_full_queue_settles_inline_instead_of_dropping(self) -> None:
        full = cl._SettlementQueue(capacity=0)
        saved = cl._settlements
        cl._settlements = full
        self.addCleanup(setattr, cl, "_settlements", saved)
        self.srv.inject("commit", "status", status=503)
        self.call(lambda: None, estimate=10, actual=5)
        self.assert_one_key("commit", 2)
        self.assert_settled_once(5)

    def test_auth_failure_on_commit_keeps_spend_and_never_releases(self) -> None:
        self.srv.inject("commit", "status", status=401)
        with self.assertLogs(_LC_LOGGER, "ERROR") as logs:
            self.call(lambda: None, estimate=10, actual=5)
        self.assertEqual(self.ops(), ["create", "commit"])
        self.assertIn("auth_failed", "\n".join(logs.output))
        self.srv.clock.advance(70_000)

    def test_an_interrupt_at_the_heartbeat_stop_still_journals_and_commits(self) -> None:
        # Review bug 1: Ctrl-C landing in the sync stop's join, or a cancel while the async
        # stop waits, used to lose the commit (nothing journaled, sent or queued).
        journal_dir = tempfile.mkdtemp(prefix="lc-journal-")
        self.addCleanup(shutil.rmtree, journal_dir, True)
        client = self.new_client(journal_enabled=True, journal_dir=journal_dir)
        interrupt: Any = asyncio.CancelledError if self.is_async else KeyboardInterrupt
        seam = cl._AsyncIO if self.is_async else cl._SyncIO
        real_stop = seam.stop_heartbeat
        fired: List[bool] = []

        async def stop_then_interrupt(io: Any, heartbeat: Any) -> None:
            await real_stop(io, heartbeat)
            if not fired:
                fired.append(True)
                raise interrupt()

        written: List[str] = []
        real_write = cl._CommitJournal.write

        def write(journal: Any, record: Any) -> bool:
            written.append(record.reservation_id)
            return bool(real_write(journal, record))

        with mock.patch.object(seam, "stop_heartbeat", stop_then_interrupt), \
                mock.patch.object(cl._CommitJournal, "write", write):
            with self.assertRaises(interrupt):
                self.call(lambda: "ok", estimate=10, actual=4, client=client)
            self.assertTrue(cl.flush(5))
        self.assertEqual(fired, [True])
        self.assertEqual(written, [self.reservation_id()])
        self.assertEqual(self.ops(), ["create", "commit"])
        self.assert_settled_once(4)
        self.assertEqual([n for _, _, names in os.walk(journal_dir) for n in names], [])

    def test_many_concurrent_calls_settle_exactly_once(self) -> None:
        self.srv.inject("commit", "lost_response", times=4)
        self.srv.inject("commit", "status", status=503, times=4)
        calls, actual = 40, 3
        body = self.guarded(lambda i: i, estimate=10, actual=actual)
        if self.is_async:

            async def scenario() -> List[Any]:
                return list(await asyncio.gather(*(body(i) for i in range(calls))))

            results = asyncio.run(scenario())
        else:
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(lambda i: _lc_run_now(body(i)), range(calls)))
        self.assertEqual(results, list(range(calls)))
        self.assertTrue(cl.flush(10))
        by_reservation: Dict[str, List[str]] = {}
        for request in self.commits():
            rid = request.path.split("/")[3]
            by_reservation.setdefault(rid, []).append(request.body["idempotency_key"])
        self.assertEqual(len(by_reservation), calls)
        for rid, keys in by_reservation.items():
            self.assertEqual(len(set(keys)), 1)
            self.assertEqual(self.status_of(rid), "COMMITTED")
        self.assert_settled_once(calls * actual)

    def test_no_thread_or_socket_left_after_calls_return(self) -> None:
        before = set(threading.enumerate())
        client = self.new_client()
        self.srv.inject("extend", "nonconformant", times=3, set_fields={"remaining_ttl_ms": 3000})

        def body(i: int) -> int:
            if i == 0:
                time.sleep(0.2)  # long enough for the immediate heartbeat beat
            return i

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for i in range(10):
                self.call(body, i, estimate=5, ttl_ms=3000 if i == 0 else 60_000,
                          client=client)
            self.srv.inject("commit", "status", status=503)
            self.call(body, 1, estimate=5, client=client)
            self.assertTrue(cl.flush(5))
            self._clients.remove(client)
            self.close_client(client)
            gc.collect()
        self.assertEqual(_lc_threads_left(before), [])
        self.assertEqual([w for w in caught if issubclass(w.category, ResourceWarning)], [])
        self.assertGreaterEqual(len(self.srv.requests_for("extend")), 1)


class TestSettlement(_LcSyncMode, _LcSettlementCases, unittest.TestCase):
    pass


class TestSettlementAtExit(_LcSyncMode, _LcCase, unittest.TestCase):
    def test_exit_flushes_pending_settlements(self) -> None:
        script = (
            "import sys, cycles_lite as cl\n"
            "cfg = cl.CyclesConfig(base_url=sys.argv[1], api_key=sys.argv[2], tenant='acme',"
            " agent=sys.argv[3], journal_enabled=False, retry_initial_delay=0.4,"
            " retry_flush_timeout=5.0)\n"
            "client = cl.CyclesClient(cfg)\n"
            "print(cl.cycles(estimate=10, actual=6, client=client)(lambda: 'ran')())\n"
        )
        self.srv.inject("commit", "status", status=503)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(cl.__file__), os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run(
            [sys.executable, "-W", "error", "-c", script, self.srv.url, _LC_KEY, self.agent],
            capture_output=True, env=env, timeout=30, check=True,
        )
        self.assertEqual(result.stdout.decode().strip(), "ran")
        self.assertEqual([r.status for r in self.srv.requests_for("commit")], [503, 200])
        self.assert_settled_once(6)


class TestSettlementAsync(_LcAsyncMode, _LcSettlementCases, unittest.TestCase):
    def test_aflush_drains_pending_retries_without_blocking_the_loop(self) -> None:
        client = self.new_client(retry_initial_delay=0.3, retry_max_delay=0.3)
        self.srv.inject("commit", "status", status=503)
        guarded = cl.cycles(estimate=10, actual=3, client=client)(self._nothing)

        async def scenario() -> Tuple[bool, bool, int]:
            await guarded()
            ticks = 0
            flushing = asyncio.ensure_future(cl.aflush(5))
            while not flushing.done():
                ticks += 1
                await asyncio.sleep(0.01)
            return await cl.aflush(0), flushing.result(), ticks

        empty_afterwards, drained, ticks = asyncio.run(scenario())
        self.assertTrue(drained)
        self.assertTrue(empty_afterwards)
        self.assertGreaterEqual(ticks, 5)  # the loop ran while the retry waited
        self.assert_one_key("commit", 2)
        self.assert_settled_once(3)

    @staticmethod
    async def _nothing() -> None:
        return None

    def test_cancelled_call_hands_its_commit_to_the_worker(self) -> None:
        self.srv.inject("commit", "delay", delay_ms=400)
        self.srv.inject("commit", "lost_response")

        async def work() -> None:
            return None

        guarded = cl.cycles(estimate=10, actual=2, client=self.client)(work)

        async def scenario() -> None:
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(guarded(), 0.2)

        asyncio.run(scenario())
        self.assertTrue(cl.flush(5))
        self.assert_settled_once(2)
        # The cancelled attempt still reaches the server (a replay of the same key).
        self.assertTrue(wait_for(lambda: len(self.srv.requests_for("commit")) == 3))
        self.assert_one_key("commit", 3)


# ---------------------------------------------------------------------------
# Recovery profile: core and boundary scenarios (client-recovery/scenarios.yaml)
# ---------------------------------------------------------------------------


class TestRecoveryCore(_LcCase, unittest.TestCase):
    """Each scenario runs on the sync and on the async client; the server's request log
    is the choreography oracle, its ledger the "settled at most once" oracle."""

    def both_modes(self, scenario: Callable[[], None]) -> None:
        for is_async in (False, True):
            with self.subTest(mode="async" if is_async else "sync"):
                self.is_async = is_async
                self.srv.clear_requests()
                self.srv.clear_faults()
                self.agent = "lc" + os.urandom(4).hex()
                self.scope = f"tenant:acme/agent:{self.agent}"
                self.srv.add_budget(self.scope, _LC_UNIT, 1_000_000)
                self.client = self.new_client()
                scenario()

    def settlement_ops(self) -> List[Any]:
        return [(r.operation, r.body["idempotency_key"]) for r in self.srv.requests
                if r.operation in ("commit", "event", "extend")]

    def test_cr_core_001_lost_commit_response_reuses_key(self) -> None:
        def scenario() -> None:
            self.srv.inject("commit", "lost_response")
            self.assertEqual(self.call(lambda: "done", estimate=40, actual=25), "done")
            self.assertTrue(cl.flush(5))
            (first, k1), (second, k2) = self.settlement_ops()  # commit, commit_same_key
            self.assertEqual((first, second), ("commit", "commit"))
            self.assertEqual(k1, k2)  # retry_uses_original_idempotency_key
            self.assertTrue(self.srv.requests_for("commit")[0].applied)
            self.assertIsNone(self.srv.requests_for("commit")[0].status)
            self.assertEqual(self.status_of(), "COMMITTED")  # settlement_occurs_at_most_once
            self.assert_settled_once(25)
            self.assertEqual(self.srv.events, [])

        self.both_modes(scenario)

    def test_cr_core_002_expired_commit_falls_back_to_event(self) -> None:
        def body() -> str:
            self.srv.clock.advance(60_000 + 5_000 + 1_000)  # past the lease and its grace
            return "done"

        def scenario() -> None:
            events_before = len(self.srv.events)
            self.call(body, estimate=40, actual=30, action_kind="llm.completion",
                      action_name="gpt-4o", workspace="w1")
            ops = self.settlement_ops()
            self.assertEqual([op for op, _ in ops], ["commit", "event"])
            self.assertEqual(self.srv.requests_for("commit")[0].status, 410)
            self.assertEqual(ops[0][1], ops[1][1])  # event_same_key
            create, commit, event = (self.body_of("create"), self.body_of("commit"),
                                     self.body_of("event"))
            self.assertEqual(event["subject"], create["subject"])  # original subject
            self.assertEqual(event["action"], create["action"])  # original action
            self.assertEqual(event["actual"], commit["actual"])  # original actual
            self.assertEqual(event["metrics"], commit["metrics"])
            self.assertEqual(event["metadata"]["recovered_reservation_id"],
                             self.reservation_id())
            self.assertEqual(event["metadata"]["recovery_reason"],
                             "commit_after_reservation_expired")
            self.assertNotIn("overage_policy", event)
            self.assertEqual(len(self.srv.events), events_before + 1)  # at most once
            self.assertEqual(self.status_of(), "EXPIRED")
            self.assertEqual(self.srv.requests_for("event")[0].status, 201)
            self.srv.check_invariants()

        self.both_modes(scenario)

    def test_cr_core_003_heartbeat_transport_failure_is_observable(self) -> None:
        def scenario() -> None:
            client = self.new_client(request_timeout=0.3)
            self.srv.inject("extend", "delay", delay_ms=600)  # outlives the attempt deadline
            seen: Dict[str, Any] = {}

            def body() -> str:
                ctx = cl.get_cycles_context()
                assert ctx is not None
                seen["failure_seen"] = wait_for(lambda: ctx.heartbeat_error is not None, 3)
                seen["recovered"] = wait_for(lambda: ctx.heartbeat_error is None, 3)
                seen["stopped"] = ctx.heartbeat_stopped
                return "finished"

            with self.assertLogs(_LC_LOGGER, "WARNING") as logs:
                result = self.call(body, estimate=10, actual=9, ttl_ms=3500, client=client)
            ops = self.settlement_ops()
            self.assertEqual([op for op, _ in ops], ["extend", "extend", "commit"])
            self.assertEqual(ops[0][1], ops[1][1])  # extend_same_key
            text = "\n".join(logs.output)
            # heartbeat_failure_reports_reservation_and_disposition
            self.assertIn(f"reservation_id={self.reservation_id()}", text)
            self.assertIn("will retry with the same idempotency key", text)
            # guarded_action_continues_under_warn_policy
            self.assertTrue(seen["failure_seen"])
            self.assertTrue(seen["recovered"])
            self.assertIsNone(seen["stopped"])
            self.assertEqual(result, "finished")
            # final_settlement_is_attempted
            self.assertEqual(self.srv.requests_for("commit")[0].status, 200)
            self.assert_settled_once(9)

        self.both_modes(scenario)

    def test_cr_core_004_nonconformant_success_stays_ambiguous(self) -> None:
        variants = [{"drop_fields": ["charged"]}, {"status": 202},
                    {"set_fields": {"status": "WEIRD"}}]

        def scenario() -> None:
            for params in variants:
                self.srv.clear_requests()
                self.srv.inject("commit", "nonconformant", **params)
                self.call(lambda: None, estimate=10, actual=1)
                self.assertTrue(cl.flush(5))
                ops = self.settlement_ops()
                self.assertEqual([op for op, _ in ops], ["commit", "commit"])
                # ambiguous_success_retains_original_idempotency_key
                self.assertEqual(ops[0][1], ops[1][1])
                first, second = self.srv.requests_for("commit")
                # only_schema_valid_expected_status_is_terminal_success
                self.assertTrue(first.applied and 200 <= first.status < 300)
                self.assertEqual(second.status, 200)
                self.assertEqual(self.status_of(), "COMMITTED")
            self.assert_settled_once(len(variants))

        self.both_modes(scenario)

    def test_cr_boundary_001_missing_actual_is_surfaced_without_settlement(self) -> None:
        def unknown_actual(result: Any) -> int:
            raise LookupError("the provider returned no usage")

        def failing() -> None:
            raise TimeoutError("the guarded action failed")

        def scenario() -> None:
            with self.assertLogs(_LC_LOGGER, "ERROR") as logs:
                with self.assertRaises(LookupError):  # missing actual is surfaced
                    self.call(lambda: "result", estimate=10, actual=unknown_actual,
                              use_estimate_if_actual_not_provided=False)
            self.assertEqual(self.ops(), ["create"])  # no commit or event without an actual
            self.assertIn(self.reservation_id(), "\n".join(logs.output))
            self.assertEqual(self.balance()["spent"], 0)
            with self.assertRaises(TimeoutError):  # the guarded action failure is surfaced
                self.call(failing, estimate=10, use_estimate_if_actual_not_provided=False,
                          actual=unknown_actual)
            self.assertNotIn("commit", self.ops())
            self.assertNotIn("event", self.ops())
            self.srv.clock.advance(70_000)  # the unsettled reservation expires
            self.assert_settled_once(0)

        self.both_modes(scenario)


# =============================================================================
# Durable settlement: the journal, restart recovery, recovery-profile durable scenarios
# =============================================================================

# ---------------------------------------------------------------------------
# Helpers (module level, prefixed _dur_)
# ---------------------------------------------------------------------------

_DUR_KEY = "key-acme"
_DUR_TENANT = "acme"
_DUR_SCOPE = "tenant:acme"
_DUR_ALLOCATED = 10_000_000
_DUR_ESTIMATE = 1000
_DUR_ACTUAL = 700
_DUR_TTL_MS = 60_000
_DUR_GRACE_MS = 5_000
_DUR_CHILD_TIMEOUT_S = 30.0
_DUR_RUNCYCLES_PYTHON = RUNCYCLES_PYTHON


def _dur_lite_path() -> str:
    configured = os.environ.get("CYCLES_LITE_PATH")
    if configured:
        return os.path.abspath(configured)
    return os.path.dirname(os.path.abspath(cycles_lite.__file__))


def _dur_v2_name(reservation_id: str) -> str:
    """The standard file name, computed here independently of the client."""
    return "v2-" + hashlib.sha256(reservation_id.encode("utf-8")).hexdigest() + ".json"


def _dur_fingerprint(base_url: str, principal: str) -> str:
    """runcycles' identity directory name, computed here independently of the client."""
    digest = hashlib.pbkdf2_hmac(
        "sha256",
        principal.encode("utf-8"),
        ("runcycles-commit-journal\n" + base_url).encode("utf-8"),
        30_000,
    )
    return digest.hex()[:16]


def _dur_files(root: str, suffix: str = "") -> List[str]:
    found = []
    for directory, _dirs, names in os.walk(root):
        found.extend(os.path.join(directory, n) for n in names if n.endswith(suffix))
    return sorted(found)


def _dur_records(root: str) -> Dict[str, Dict[str, Any]]:
    """Every ``*.json`` journal file under ``root``: path -> parsed record."""
    records = {}
    for path in _dur_files(root, ".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                records[path] = json.load(handle)
        except FileNotFoundError:  # settled (removed) since the directory was listed
            continue
    return records


def _dur_only_record(test: unittest.TestCase, root: str) -> Tuple[str, Dict[str, Any]]:
    records = _dur_records(root)
    test.assertEqual(len(records), 1, f"expected exactly one journal record, got {records}")
    return next(iter(records.items()))


def _dur_everything_stored(root: str) -> bytes:
    """Every name and every byte under ``root`` (to prove what is NOT stored)."""
    chunks = []
    for directory, dirs, names in os.walk(root):
        chunks.extend(n.encode("utf-8") for n in dirs + names)
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                chunks.append(handle.read())
    return b"\n".join(chunks)


def _dur_wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.002)


def _dur_on_arrival(fault: Any, callback: Callable[[], None]) -> threading.Event:
    """Run ``callback`` on the server thread the moment a faulted request arrives.

    The request has left the client (its bytes were read by the server) and
    nothing has been applied yet, so a journal snapshot taken here proves what
    was durable before the request left the process.
    """
    arrived = threading.Event()
    claim = fault._claim

    def probe() -> bool:
        applies = bool(claim())
        if applies and not arrived.is_set():
            callback()
            arrived.set()
        return applies

    fault._claim = probe
    return arrived


def _dur_key_of(request: Any) -> Optional[str]:
    body = request.body if isinstance(request.body, dict) else {}
    return body.get("idempotency_key")


def _dur_guarded(client: Any, actual: int = _DUR_ACTUAL) -> Any:
    @cycles(
        estimate=_DUR_ESTIMATE,
        actual=actual,
        action_kind="llm.completion",
        action_name="durable-test",
        client=client,
    )
    def work() -> str:
        return "done"

    return work()


# The fresh-process driver.  It gets a plan (JSON in argv[1]), builds ONE client
# from the plan's config and runs the steps; it reports events as JSON lines on
# stdout and logs (INFO and up) on stderr.
_DUR_CHILD = r"""
import dataclasses, json, logging, os, sys, time

plan = json.loads(sys.argv[1])
sys.path.insert(0, plan["lite_path"])
if plan.get("umask") is not None:
    os.umask(plan["umask"])
if plan.get("tempdir"):
    import tempfile
    tempfile.tempdir = plan["tempdir"]
logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)
import cycles_lite


def emit(event, **data):
    data["event"] = event
    data["wall_ms"] = int(time.time() * 1000)
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def new_client():
    return cycles_lite.CyclesClient(cycles_lite.CyclesConfig(**plan["config"]))


client = new_client()


def guarded(step):
    @cycles_lite.cycles(
        estimate=step.get("estimate", 1000),
        actual=step.get("actual", 700),
        action_kind="llm.completion",
        action_name="durable-test",
        ttl_ms=step.get("ttl_ms", 60000),
        grace_period_ms=step.get("grace_period_ms"),
        client=client,
    )
    def work():
        return "done"

    started = time.monotonic()
    value = work()
    emit("guarded", value=value, elapsed_ms=int((time.monotonic() - started) * 1000))


def recover(step):
    emit("recovering")
    summary = client.recover(timeout=step.get("timeout", 10.0))
    emit("recovered", **dataclasses.asdict(summary))


def barrier(step):
    emit("waiting")
    deadline = time.monotonic() + step.get("timeout", 20.0)
    while not os.path.exists(step["path"]):
        if time.monotonic() > deadline:
            emit("barrier_timeout")
            sys.exit(3)
        time.sleep(0.001)


def flush(step):
    result = cycles_lite.flush(step.get("timeout", 5.0))
    emit("flushed", drained=bool(result), pending=result.pending)


def move(step):
    os.replace(step["src"], step["dst"])
    emit("moved")


def renew(step):
    global client
    client = new_client()
    emit("renewed")


def hang(step):
    emit("hanging")
    time.sleep(step.get("seconds", 120))


for step in plan["steps"]:
    globals()[step["op"]](step)
emit("done")
if plan.get("hard_exit"):
    os._exit(0)
"""


_dur_child_numbers = itertools.count(1)


class _DurChild:
    """One fresh client process; stdout/stderr go to files so nothing can block."""

    def __init__(self, workdir: str, plan: Dict[str, Any], env: Dict[str, str]) -> None:
        stem = os.path.join(workdir, f"child-{next(_dur_child_numbers)}")
        self.out_path, self.err_path = stem + ".out", stem + ".err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DUR_CHILD, json.dumps(plan)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
            )

    def events(self) -> List[Dict[str, Any]]:
        with open(self.out_path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        # a line being written right now is incomplete: ignore it until it ends
        return [json.loads(line) for line in lines if line.endswith("}")]

    def event(self, name: str) -> Optional[Dict[str, Any]]:
        for event in self.events():
            if event["event"] == name:
                return event
        return None

    def wait_event(self, name: str, timeout: float = _DUR_CHILD_TIMEOUT_S) -> Dict[str, Any]:
        def seen() -> Optional[Dict[str, Any]]:
            if self.proc.poll() is not None and self.event(name) is None:
                raise AssertionError(f"child exited before {name!r}:\n{self.stderr}")
            return self.event(name)

        return _dur_wait(seen, timeout, f"child event {name!r}")  # type: ignore[no-any-return]

    @property
    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def finish(self, test: unittest.TestCase, timeout: float = _DUR_CHILD_TIMEOUT_S) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child did not finish in {timeout:g} s:\n{self.stderr}")
        test.assertEqual(code, 0, f"child failed:\n{self.stderr}")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, nothing runs (no atexit, no flush)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _DurCase(unittest.TestCase):
    """A fresh server, a temp dir (home, journal root) and a child factory per test."""

    srv: LocalCyclesServer

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="cycles-lite-durable-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.home = os.path.join(self.workdir, "home")
        os.mkdir(self.home)
        self.journal_root = os.path.join(self.workdir, "journal")
        self.srv = self._start_server({_DUR_KEY: _DUR_TENANT})
        self.addCleanup(self._forget_kept_settlements)

    def _forget_kept_settlements(self) -> None:
        """Commits kept in this process's memory die with the test's journal and server."""
        self.srv.clear_faults()
        cycles_lite.flush(10.0)
        cycles_lite._settlements.take_kept()

    def _start_server(self, api_keys: Dict[str, str]) -> LocalCyclesServer:
        srv = LocalCyclesServer(
            api_keys=api_keys,
            budgets=[{"scope": _DUR_SCOPE, "unit": "USD_MICROCENTS", "allocated": _DUR_ALLOCATED}],
            default_grace_ms=_DUR_GRACE_MS,
        )
        srv.start()
        self.addCleanup(srv.stop)
        return srv

    # -- configuration -------------------------------------------------------

    def child_config(self, **overrides: Any) -> Dict[str, Any]:
        config: Dict[str, Any] = {
            "base_url": self.srv.url,
            "api_key": _DUR_KEY,
            "tenant": _DUR_TENANT,
            "journal_dir": self.journal_root,
            "retry_initial_delay": 0.01,
            "retry_max_delay": 0.05,
            "retry_flush_timeout": 2.0,
        }
        config.update(overrides)
        return {k: v for k, v in config.items() if v is not None or k == "journal_dir"}

    def config(self, **overrides: Any) -> CyclesConfig:
        return CyclesConfig(**self.child_config(**overrides))

    def client(self, **overrides: Any) -> CyclesClient:
        client = CyclesClient(self.config(**overrides))
        self.addCleanup(client.close)
        return client

    # -- fresh processes -----------------------------------------------------

    def child_env(self, **overrides: str) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        env.update(HOME=self.home, TMPDIR=self.workdir, PYTHONUNBUFFERED="1")
        env.update(overrides)
        return env

    def start_child(
        self,
        steps: List[Dict[str, Any]],
        *,
        config: Optional[Dict[str, Any]] = None,
        env: Optional[Dict[str, str]] = None,
        **plan_extra: Any,
    ) -> _DurChild:
        plan = dict(
            lite_path=_dur_lite_path(),
            config=config if config is not None else self.child_config(),
            steps=steps,
            **plan_extra,
        )
        child = _DurChild(self.workdir, plan, env if env is not None else self.child_env())
        self.addCleanup(child.kill)
        return child

    def run_child(self, steps: List[Dict[str, Any]], **kwargs: Any) -> _DurChild:
        child = self.start_child(steps, **kwargs)
        child.finish(self)
        return child

    def recover_in_fresh_process(self, timeout: float = 10.0, **kwargs: Any) -> Dict[str, Any]:
        child = self.run_child([{"op": "recover", "timeout": timeout}], **kwargs)
        summary = child.event("recovered")
        assert summary is not None
        summary["stderr"] = child.stderr
        return summary

    def leave_unresolved_commit(self, **config: Any) -> Tuple[str, Dict[str, Any]]:
        """A fresh process whose commit fails for good leaves ONE commit-mode record."""
        self.srv.inject("commit", "status", status=503, times=None)
        self.run_child(
            [{"op": "guarded"}], config=self.child_config(retry_max_attempts=0, **config)
        )
        self.srv.clear_faults()
        path, record = _dur_only_record(self, self.journal_root)
        self.assertEqual(record["mode"], "commit")
        return path, record

    # -- oracle ----------------------------------------------------------------

    def commits(self) -> List[Any]:
        return sorted(self.srv.requests_for("commit"), key=lambda r: r.time_ms)

    def assert_settled_once(self, reservation_id: str, *, via_event: bool = False) -> None:
        balance = self.srv.balance(_DUR_SCOPE)
        self.assertEqual(balance["spent"], _DUR_ACTUAL, balance)
        self.assertEqual(balance["reserved"], 0, balance)
        applied = [r for r in self.srv.requests if r.applied and r.operation in ("commit", "event")]
        self.assertEqual(len(applied), 1, [(r.operation, r.status) for r in applied])
        self.assertEqual(applied[0].operation, "event" if via_event else "commit")
        self.assertEqual(self.srv.requests_for("release"), [])
        state = self.srv.reservation(reservation_id)
        assert state is not None
        self.assertEqual(state["status"], "EXPIRED" if via_event else "COMMITTED")
        self.srv.check_invariants()

    def created_reservation_id(self) -> str:
        created = [r for r in self.srv.requests_for("create") if r.status == 200]
        self.assertEqual(len(created), 1)
        return str(created[0].response_body["reservation_id"])


class TestRecoveryDurable(_DurCase):
    """The durable scenarios of client-recovery/scenarios.yaml, one test each."""

    def test_cr_durable_001_journal_written_before_first_commit(self) -> None:
        # Fault 1: the process dies while its first commit is in flight.
        held = self.srv.inject("commit", "delay", delay_ms=60_000)
        at_arrival: List[Dict[str, Dict[str, Any]]] = []
        arrived = _dur_on_arrival(held, lambda: at_arrival.append(_dur_records(self.journal_root)))
        first = self.start_child([{"op": "guarded"}, {"op": "hang"}])
        self.assertTrue(arrived.wait(_DUR_CHILD_TIMEOUT_S), first.stderr)
        first.kill()

        rid = self.created_reservation_id()
        self.assertEqual(len(at_arrival[0]), 1, "one record must exist when the commit arrives")
        journaled = next(iter(at_arrival[0].values()))
        self.assertEqual((journaled["reservation_id"], journaled["mode"]), (rid, "commit"))
        self.assertEqual(journaled["commit_body"]["actual"]["amount"], _DUR_ACTUAL)
        key = journaled["commit_body"]["idempotency_key"]
        self.assertEqual(_dur_records(self.journal_root), at_arrival[0], "the record survives")
        self.assertEqual(self.srv.reservation(rid)["status"], "ACTIVE")

        # Fault 2: restart. A fresh process sees only the journal and replays it.
        summary = self.recover_in_fresh_process()
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        self.assertEqual(_dur_records(self.journal_root), {}, "a successful replay removes it")
        replay = [r for r in self.commits() if r.status is not None]
        self.assertEqual(len(replay), 1)
        self.assertEqual(_dur_key_of(replay[0]), key)
        self.assertEqual(replay[0].headers.get("x-idempotency-key"), key)
        self.assertEqual(replay[0].status, 200)
        self.assert_settled_once(rid)

        # The first commit, still held by the server, lands now: same key, no second charge.
        self.srv.stop()
        commits = self.commits()
        self.assertEqual([_dur_key_of(r) for r in commits], [key, key])
        self.assertLess(commits[0].time_ms, commits[1].time_ms)
        self.assert_settled_once(rid)

    def test_cr_durable_002_expired_replay_switches_durably_to_event(self) -> None:
        _path, record = self.leave_unresolved_commit()
        rid, key = record["reservation_id"], record["commit_body"]["idempotency_key"]
        self.srv.clock.advance(_DUR_TTL_MS + _DUR_GRACE_MS + 1_000)  # the reservation expires

        # Restart; the replayed commit gets 410; the process dies once event mode is durable
        # (while its event is in flight).
        held = self.srv.inject("event", "delay", delay_ms=60_000)
        at_arrival: List[Dict[str, Dict[str, Any]]] = []
        arrived = _dur_on_arrival(held, lambda: at_arrival.append(_dur_records(self.journal_root)))
        replayer = self.start_child([{"op": "recover", "timeout": 20.0}])
        self.assertTrue(arrived.wait(_DUR_CHILD_TIMEOUT_S), replayer.stderr)
        replayer.kill()
        self.assertEqual(len(at_arrival[0]), 1)
        switched = next(iter(at_arrival[0].values()))
        self.assertEqual((switched["reservation_id"], switched["mode"]), (rid, "event"))
        self.assertEqual(switched["event_fallback_body"]["idempotency_key"], key)
        after_restart = self.commits()[1:]
        self.assertEqual([(_dur_key_of(r), r.status) for r in after_restart], [(key, 410)])

        # Restart again: the record is in event mode, so only the event is sent.
        summary = self.recover_in_fresh_process()
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        self.assertEqual(len(self.commits()), 2, "no commit after the durable mode switch")
        self.assertEqual(_dur_records(self.journal_root), {}, "a successful event removes it")
        self.srv.stop()  # the held event of the killed process lands now
        events = self.srv.requests_for("event")
        self.assertEqual([_dur_key_of(r) for r in events], [key, key])
        self.assertEqual(len(self.srv.events), 1)
        event = self.srv.events[0]
        self.assertEqual(event["actual"], {"unit": "USD_MICROCENTS", "amount": _DUR_ACTUAL})
        self.assertEqual(event["action"]["kind"], "llm.completion")
        self.assertEqual(event["action"]["name"], "durable-test")
        self.assertEqual(event["subject"]["tenant"], _DUR_TENANT)
        self.assertEqual(event["metadata"]["recovered_reservation_id"], rid)
        self.assert_settled_once(rid, via_event=True)

    def test_cr_durable_003_rate_limit_floor_survives_restart(self) -> None:
        # 5 s: room for two process starts on a loaded machine before the floor.
        self.srv.inject("commit", "status", status=429, headers={"Retry-After": "5"})
        first = self.start_child([{"op": "guarded"}, {"op": "hang"}])

        def floor_written() -> Any:
            records = _dur_records(self.journal_root)
            return [r for r in records.values() if r.get("not_before_ms")]

        record = _dur_wait(floor_written, _DUR_CHILD_TIMEOUT_S, "a persisted 429 floor")[0]
        first.kill()  # terminated after the journal write, before its own retry
        rid, key = record["reservation_id"], record["commit_body"]["idempotency_key"]
        rate_limited = self.commits()[0]
        self.assertEqual(rate_limited.status, 429)
        not_before = record["not_before_ms"]
        self.assertGreaterEqual(not_before, rate_limited.time_ms + 5_000)

        # Restarted before Retry-After elapsed: a short recover() sends nothing.
        early = self.recover_in_fresh_process(
            timeout=0.2, config=self.child_config(retry_flush_timeout=0.0)
        )
        self.assertLess(early["wall_ms"], not_before, "the restart came before Retry-After")
        self.assertEqual((early["found"], early["not_yet_due"]), (1, 1), early)
        self.assertEqual(len(self.commits()), 1, "no retry before the persisted floor")
        self.assertEqual(len(_dur_records(self.journal_root)), 1)

        # Restarted again with time to wait: the commit goes out at the floor, not earlier.
        summary = self.recover_in_fresh_process(timeout=10.0)
        self.assertEqual(summary["settled"], 1, summary)
        commits = self.commits()
        self.assertEqual([_dur_key_of(r) for r in commits], [key, key])
        self.assertGreaterEqual(commits[1].time_ms, not_before)
        self.assertEqual(_dur_records(self.journal_root), {})
        self.assert_settled_once(rid)

    def test_cr_durable_004_tenant_journal_survives_key_rotation(self) -> None:
        self.srv.add_api_key("key-old-1234", _DUR_TENANT)
        _path, record = self.leave_unresolved_commit(api_key="key-old-1234")
        rid, key = record["reservation_id"], record["commit_body"]["idempotency_key"]
        self.assertNotIn(b"key-old-1234", _dur_everything_stored(self.journal_root))

        self.srv.add_api_key("key-new-5678", _DUR_TENANT)
        self.srv.remove_api_key("key-old-1234")
        summary = self.recover_in_fresh_process(
            config=self.child_config(api_key="key-new-5678")
        )
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        replay = self.commits()[-1]
        self.assertEqual((_dur_key_of(replay), replay.status), (key, 200))
        self.assertEqual(replay.headers.get("x-cycles-api-key"), "key-new-5678")
        self.assertEqual(_dur_records(self.journal_root), {})
        stored = _dur_everything_stored(self.journal_root)
        self.assertNotIn(b"key-old-1234", stored)
        self.assertNotIn(b"key-new-5678", stored)
        self.assert_settled_once(rid)

    def test_cr_durable_005_corrupt_and_unsupported_records_quarantined(self) -> None:
        valid_path, record = self.leave_unresolved_commit()
        identity_dir = os.path.dirname(valid_path)
        corrupt = os.path.join(identity_dir, _dur_v2_name("res-corrupt"))
        with open(corrupt, "w", encoding="utf-8") as handle:
            handle.write('{"version": 1, "reservation_id": "res-corr')
        unsupported = os.path.join(identity_dir, _dur_v2_name("res-future"))
        future = dict(record, version=2, reservation_id="res-future")
        with open(unsupported, "w", encoding="utf-8") as handle:
            json.dump(future, handle)

        summary = self.recover_in_fresh_process()
        self.assertEqual(summary["quarantined"], 2, summary)
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        quarantined = sorted(os.path.basename(p) for p in _dur_files(identity_dir, ".corrupt"))
        self.assertEqual(
            quarantined, sorted(_dur_v2_name(r)[:-5] + ".corrupt" for r in ("res-corrupt",
                                                                           "res-future"))
        )
        with open(os.path.join(identity_dir, _dur_v2_name("res-future")[:-5] + ".corrupt")) as f:
            self.assertEqual(json.load(f), future, "quarantine keeps the bytes")
        self.assertIn("corrupt record", summary["stderr"])
        self.assertIn("unsupported record", summary["stderr"])
        self.assertEqual(_dur_records(self.journal_root), {}, "the valid record replayed")
        bodies = b"".join(r.raw_body for r in self.srv.requests)
        self.assertNotIn(b"res-corr", bodies)
        self.assertNotIn(b"res-future", bodies)
        self.assert_settled_once(record["reservation_id"])

    def test_cr_durable_006_concurrent_replay_settles_once(self) -> None:
        _path, record = self.leave_unresolved_commit()
        rid, key = record["reservation_id"], record["commit_body"]["idempotency_key"]
        # Both replays are held at the server together, so they truly overlap.
        self.srv.inject("commit", "delay", delay_ms=400, times=2)
        go = os.path.join(self.workdir, "barrier")
        steps = [{"op": "barrier", "path": go}, {"op": "recover", "timeout": 10.0}]
        workers = [self.start_child(steps), self.start_child(steps)]
        for worker in workers:
            worker.wait_event("waiting")
        with open(go, "w"):
            pass
        for worker in workers:
            worker.finish(self)

        replays = self.commits()[1:]
        self.assertEqual([_dur_key_of(r) for r in replays], [key, key], "same stored key")
        self.assertLess(abs(replays[0].time_ms - replays[1].time_ms), 400, "they overlapped")
        self.assertEqual([r.status for r in replays], [200, 200])
        self.assertEqual(sorted(r.applied for r in replays), [False, True])
        summaries = [w.event("recovered") for w in workers]
        self.assertEqual(sum(s["settled"] for s in summaries if s), 2, summaries)
        self.assertEqual(_dur_records(self.journal_root), {}, "the record is removed")
        self.assertEqual(_dur_files(self.journal_root, ".corrupt"), [])
        self.assert_settled_once(rid)

    def test_cr_durable_007_filenames_and_legacy_migration(self) -> None:
        journal = cycles_lite._CommitJournal(
            self.journal_root, "http://legacy.example", tenant=_DUR_TENANT, api_key=_DUR_KEY
        )
        directory = journal.directory
        assert directory is not None

        def record(rid: str) -> Any:
            return cycles_lite._PendingSettlement(
                reservation_id=rid,
                base_url="http://legacy.example",
                commit_body={"idempotency_key": "k-" + rid,
                             "actual": {"unit": "TOKENS", "amount": 1}},
            )

        # The standard name is sha256 of the exact UTF-8 id; ids that a sanitising
        # scheme would merge ("res/a", "res:a", "res_a", "rés a", NFC vs NFD) stay apart.
        ids = ["res/a", "res:a", "res_a", "r\u00e9s a", "re\u0301s a", "\u5f00/\U0001f600"]
        for rid in ids:
            self.assertTrue(journal.write(record(rid)))
        self.assertEqual(sorted(os.listdir(directory)), sorted(_dur_v2_name(r) for r in ids))
        self.assertEqual({r.reservation_id for r in journal.load_pending()}, set(ids))
        for rid in ids:
            journal.remove(rid)
        self.assertEqual(os.listdir(directory), [])

        # Legacy names: "res/b" and "res:b" both sanitise to "res_b.json".
        def legacy(name: str, rid: str) -> str:
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(record(rid).to_json())
            return path

        legacy("res_b.json", "res/b")  # a matching legacy record: migrated
        self.assertTrue(journal.write(record("res:c")))
        legacy("res_c.json", "res/c")  # a colliding one whose v2 target is free: migrated
        legacy("res_d.json", "res:d")
        self.assertTrue(journal.write(record("res:d")))  # a duplicate of a v2 record: dropped
        loaded = sorted(r.reservation_id for r in journal.load_pending())
        self.assertEqual(loaded, ["res/b", "res/c", "res:c", "res:d"])
        self.assertEqual(
            sorted(os.listdir(directory)),
            sorted(_dur_v2_name(r) for r in ("res/b", "res/c", "res:c", "res:d")),
        )

        # remove() never deletes a legacy file holding a different id; it touches only v2
        # names, and the next scan migrates a legacy file holding the exact id.
        kept = legacy("res_e.json", "res/e")
        journal.remove("res:e")
        self.assertTrue(os.path.exists(kept), "a colliding legacy record is never deleted")
        journal.remove("res/e")
        self.assertTrue(os.path.exists(kept), "remove() leaves legacy names to the scan")
        self.assertIn("res/e", [r.reservation_id for r in journal.load_pending()])
        self.assertFalse(os.path.exists(kept), "a legacy record with the exact id is migrated")
        self.assertTrue(os.path.exists(os.path.join(directory, _dur_v2_name("res/e"))))


class TestJournalRules(_DurCase):
    """Every journal rule of issue 5 beyond the scenario catalogue."""

    def test_record_format_is_runcycles_v1_written_privately(self) -> None:
        path, record = self.leave_unresolved_commit()
        self.assertEqual(
            list(record),
            ["version", "reservation_id", "base_url", "mode", "commit_body",
             "event_fallback_body", "recorded_at_ms", "not_before_ms"],
        )
        self.assertEqual(record["version"], 1)
        self.assertEqual(record["base_url"], self.srv.url)
        self.assertEqual(os.path.basename(path), _dur_v2_name(record["reservation_id"]))
        principal = "tenant\n" + _DUR_TENANT
        self.assertEqual(
            os.path.basename(os.path.dirname(path)), _dur_fingerprint(self.srv.url, principal)
        )
        fallback = record["event_fallback_body"]
        self.assertEqual(fallback["idempotency_key"], record["commit_body"]["idempotency_key"])
        self.assertEqual(fallback["actual"], record["commit_body"]["actual"])
        self.assertNotIn("overage_policy", fallback)

    def test_files_and_directories_are_owner_only_even_with_umask_zero(self) -> None:
        self.srv.inject("commit", "status", status=503, times=None)
        self.run_child(
            [{"op": "guarded"}], config=self.child_config(retry_max_attempts=0), umask=0
        )
        path, _record = _dur_only_record(self, self.journal_root)
        if os.name == "posix":
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
            self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)
            self.assertEqual(os.stat(self.journal_root).st_mode & 0o777, 0o700)
        self.assertEqual(_dur_files(self.journal_root, ".tmp"), [], "no temp file left")

    def test_write_is_atomic_and_fsync_is_optional(self) -> None:
        for fsync in (False, True):
            with self.subTest(fsync=fsync):
                root = os.path.join(self.workdir, f"atomic-{fsync}")
                journal = cycles_lite._CommitJournal(
                    root, self.srv.url, tenant=_DUR_TENANT, api_key=_DUR_KEY, fsync=fsync
                )
                record = cycles_lite._PendingSettlement(
                    reservation_id="res-1", base_url=self.srv.url,
                    commit_body={"idempotency_key": "k", "actual": {"unit": "TOKENS", "amount": 1}},
                )
                replaced = []
                real_replace = os.replace

                def spy(src: Any, dst: Any) -> None:
                    replaced.append((str(src), str(dst)))
                    real_replace(src, dst)

                with mock.patch.object(cycles_lite.os, "replace", spy):
                    self.assertTrue(journal.write(record))
                    self.assertTrue(journal.write(dataclasses.replace(record, mode="event",
                                                  event_fallback_body={"idempotency_key": "k"})))
                target = journal_record_path(journal, "res-1")
                self.assertEqual([dst for _src, dst in replaced], [target, target])
                self.assertTrue(all(src.endswith(".tmp") for src, _dst in replaced))
                with open(target, encoding="utf-8") as handle:
                    self.assertEqual(json.load(handle)["mode"], "event")
                self.assertEqual(_dur_files(root, ".tmp"), [])

    def test_malformed_records_are_quarantined_never_deleted(self) -> None:
        journal = cycles_lite._CommitJournal(
            self.journal_root, self.srv.url, tenant=_DUR_TENANT, api_key=_DUR_KEY
        )
        directory = journal.directory
        assert directory is not None
        good = {"version": 1, "reservation_id": "res-ok", "base_url": self.srv.url,
                "mode": "commit", "commit_body": {"idempotency_key": "k"},
                "event_fallback_body": None, "recorded_at_ms": 1, "not_before_ms": None}
        bad: Dict[str, bytes] = {
            "truncated": b'{"version": 1, "reserv',
            "not-an-object": b"[1, 2]",
            "bad-utf8": b'{"version": 1, "reservation_id": "\xff"}',
            "version-string": json.dumps(dict(good, version="1")).encode(),
            "version-two": json.dumps(dict(good, version=2)).encode(),
            "no-id": json.dumps(dict(good, reservation_id="")).encode(),
            "bad-mode": json.dumps(dict(good, mode="refund")).encode(),
            "commit-without-body": json.dumps(dict(good, commit_body=None)).encode(),
            "negative-floor": json.dumps(dict(good, not_before_ms=-1)).encode(),
        }
        for name, raw in bad.items():
            with open(os.path.join(directory, _dur_v2_name(name)), "wb") as handle:
                handle.write(raw)
        with open(os.path.join(directory, _dur_v2_name("res-ok")), "w") as handle:
            json.dump(good, handle)
        with self.assertLogs("cycles_lite", "ERROR") as logs:
            loaded = journal.load_pending()
        self.assertEqual([r.reservation_id for r in loaded], ["res-ok"])
        self.assertEqual(len(logs.records), len(bad))
        for name, raw in bad.items():
            quarantined = os.path.join(directory, _dur_v2_name(name)[:-5] + ".corrupt")
            with open(quarantined, "rb") as handle:
                self.assertEqual(handle.read(), raw, name)
        # A second corrupt file with the same name never overwrites the first quarantine.
        with open(os.path.join(directory, _dur_v2_name("truncated")), "wb") as handle:
            handle.write(b"again")
        with self.assertLogs("cycles_lite", "ERROR"):
            journal.load_pending()
        self.assertEqual(len(_dur_files(directory, ".corrupt")), len(bad) + 1)

    def test_retention_rules(self) -> None:
        # (fault, expected record afterwards, commits sent, events sent)
        cases: List[Tuple[str, Dict[str, Any], Optional[str], int, int]] = [
            ("success", {}, None, 1, 0),
            ("exhausted", {"status": 503}, "commit", 3, 0),
            # kept at the first attempt: flush tries a kept commit once more
            ("unauthorized", {"status": 401}, "commit", 2, 0),
            ("forbidden", {"status": 403}, "commit", 2, 0),
            ("unknown-code-4xx", {"status": 422, "error": "SOMETHING_NEW"}, "commit", 3, 0),
            ("proxy-html-4xx", {"html": 404}, "commit", 3, 0),
            ("codeless-4xx", {"status": 400, "body": {"message": "?"}}, "commit", 3, 0),
            ("finalized", {"status": 409, "error": "RESERVATION_FINALIZED"}, None, 1, 0),
            ("invalid-request", {"status": 400, "error": "INVALID_REQUEST"}, None, 1, 0),
            ("expired-event-ok", {"status": 410}, None, 1, 1),
            ("expired-event-fails", {"status": 410, "event": 503}, "event", 1, 3),
        ]
        for name, fault, kept_mode, n_commits, n_events in cases:
            with self.subTest(name):
                self.srv.clear_requests()
                self.srv.clear_faults()
                root = os.path.join(self.workdir, "retention-" + name)
                fault = dict(fault)
                event_status = fault.pop("event", None)
                if "html" in fault:
                    self.srv.inject("commit", "html", status=fault["html"], times=None)
                elif fault:
                    self.srv.inject("commit", "status", times=None, **fault)
                if event_status:
                    self.srv.inject("event", "status", status=event_status, times=None)
                client = self.client(journal_dir=root, retry_max_attempts=2)
                self.assertEqual(_dur_guarded(client), "done")
                self.assertEqual(cycles_lite.flush(10.0).pending, 0 if kept_mode is None else 1)
                records = list(_dur_records(root).values())
                if kept_mode is None:
                    self.assertEqual(records, [])
                else:
                    self.assertEqual([r["mode"] for r in records], [kept_mode])
                commits = self.srv.requests_for("commit")
                events = self.srv.requests_for("event")
                self.assertEqual((len(commits), len(events)), (n_commits, n_events))
                keys = {_dur_key_of(r) for r in commits + events}
                self.assertEqual(len(keys), 1, "every attempt reuses the original key")
                self.assertEqual(self.srv.requests_for("release"), [], "never released")
                cycles_lite._settlements.take_kept()  # its journal is this subtest's only:
                shutil.rmtree(root)  # gone, so later flushes do not count its records
        self.srv.clear_faults()

    def test_429_floor_is_persisted_and_flush_leaves_records_intact(self) -> None:
        self.srv.inject("commit", "status", status=429, headers={"Retry-After": "1"})
        client = self.client()
        before_ms = int(time.time() * 1000)
        _dur_guarded(client)
        _path, record = _dur_only_record(self, self.journal_root)
        self.assertGreaterEqual(record["not_before_ms"], before_ms + 1_000)
        self.assertLessEqual(record["not_before_ms"], int(time.time() * 1000) + 1_000 + 100)
        self.assertFalse(cycles_lite.flush(0.1), "not drained: the floor is in the future")
        self.assertEqual(len(self.commits()), 1)
        self.assertEqual(_dur_only_record(self, self.journal_root)[1], record, "left intact")
        self.assertTrue(VIRTUAL_CLOCK.run(lambda: cycles_lite.flush(10.0), self.srv))
        commits = self.commits()
        self.assertEqual(len(commits), 2)
        self.assertGreaterEqual(commits[1].time_ms, record["not_before_ms"])
        self.assertEqual(_dur_records(self.journal_root), {})

    def test_flush_timeout_leaves_unresolved_records_intact(self) -> None:
        self.srv.inject("commit", "status", status=503, times=None)
        client = self.client(retry_initial_delay=0.3, retry_max_delay=0.3, retry_max_attempts=3)
        _dur_guarded(client)
        started = time.monotonic()
        self.assertFalse(cycles_lite.flush(0.05))
        self.assertLess(time.monotonic() - started, 1.0, "the wait is bounded")
        _path, record = _dur_only_record(self, self.journal_root)
        self.assertEqual(record["mode"], "commit")
        self.srv.clear_faults()
        self.assertTrue(cycles_lite.flush(10.0))
        self.assertEqual(_dur_records(self.journal_root), {})

    def test_partition_by_server_and_principal(self) -> None:
        def directory(base_url: str, tenant: Optional[str], api_key: str) -> str:
            journal = cycles_lite._CommitJournal(
                self.journal_root, base_url, tenant=tenant, api_key=api_key
            )
            path = journal.directory
            assert path is not None
            return os.path.basename(path)

        url = self.srv.url
        self.assertEqual(directory(url, "acme", "k1"), directory(url, "acme", "k2"))
        self.assertEqual(directory(url, "acme", "k1"), _dur_fingerprint(url, "tenant\nacme"))
        self.assertNotEqual(directory(url, "acme", "k1"), directory(url, "other", "k1"))
        self.assertNotEqual(directory(url, "acme", "k1"), directory(url + "/x", "acme", "k1"))
        self.assertNotEqual(directory(url, None, "k1"), directory(url, None, "k2"))
        self.assertEqual(directory(url, None, "k1"), _dur_fingerprint(url, "key\nk1"))
        self.assertEqual(directory(url, "  ", "k1"), _dur_fingerprint(url, "key\nk1"))

    def test_api_key_is_never_stored_without_tenant(self) -> None:
        secret = "key-secret-without-tenant"
        self.srv.add_api_key(secret, _DUR_TENANT)
        self.srv.inject("commit", "status", status=503, times=None)
        client = self.client(api_key=secret, tenant=None, retry_max_attempts=0)

        @cycles(estimate=10, actual=5, tenant=_DUR_TENANT, client=client)
        def work() -> str:
            return "ok"

        work()
        self.assertFalse(cycles_lite.flush(5.0))  # kept: retried once more, still failing
        self.srv.clear_faults()
        path, _record = _dur_only_record(self, self.journal_root)
        self.assertEqual(
            os.path.basename(os.path.dirname(path)),
            _dur_fingerprint(self.srv.url, "key\n" + secret),
        )
        self.assertNotIn(secret.encode(), _dur_everything_stored(self.journal_root))
        journal = cycles_lite._CommitJournal(
            self.journal_root, self.srv.url, tenant=None, api_key=secret
        )
        self.assertNotIn(secret, repr(journal))
        self.assertEqual(client.recover(timeout=5.0).settled, 1)

    def test_failed_journal_write_is_reported_and_commit_still_sent(self) -> None:
        def disk_full(*_args: Any) -> None:
            raise OSError(28, "No space left on device")

        client = self.client()
        with mock.patch.object(cycles_lite._CommitJournal, "_write_atomic", disk_full):
            with self.assertLogs("cycles_lite", "WARNING") as logs:
                self.assertEqual(_dur_guarded(client), "done")
        self.assertTrue(any("journal write failed" in m for m in logs.output), logs.output)
        self.assertEqual([r.status for r in self.commits()], [200])
        self.assertEqual(_dur_records(self.journal_root), {})
        self.assert_settled_once(self.created_reservation_id())

    def test_journal_disabled_writes_nothing_and_still_settles(self) -> None:
        self.srv.inject("commit", "status", status=503)
        client = self.client(journal_enabled=False)
        _dur_guarded(client)
        self.assertTrue(cycles_lite.flush(10.0))
        self.assertFalse(os.path.exists(self.journal_root))
        self.assertEqual([r.status for r in self.commits()], [503, 200])
        summary = client.recover(timeout=1.0)
        self.assertEqual(summary.found, 0)

    def test_read_only_home_falls_back_to_temp_dir(self) -> None:
        blocker = os.path.join(self.workdir, "not-a-dir")
        with open(blocker, "w"):
            pass
        unusable_home = os.path.join(blocker, "home")  # mkdir fails even for root
        temp_root = os.path.join(self.workdir, "tmp")
        os.mkdir(temp_root)
        self.srv.inject("commit", "status", status=503, times=None)
        env = self.child_env(HOME=unusable_home, TMPDIR=temp_root)
        config = self.child_config(journal_dir=None, retry_max_attempts=0)
        first = self.run_child([{"op": "guarded"}], config=config, env=env)
        self.assertNotIn("Traceback", first.stderr)
        _path, record = _dur_only_record(self, os.path.join(temp_root, "runcycles-commit-journal"))
        self.srv.clear_faults()
        summary = self.recover_in_fresh_process(config=config, env=env)
        self.assertEqual(summary["settled"], 1, summary)
        self.assert_settled_once(record["reservation_id"])

    def test_nothing_writable_warns_once_and_settles_without_journal(self) -> None:
        blocker = os.path.join(self.workdir, "not-a-dir")
        with open(blocker, "w"):
            pass
        env = self.child_env(HOME=os.path.join(blocker, "home"))
        config = self.child_config(journal_dir=os.path.join(blocker, "journal"))
        child = self.run_child(
            [{"op": "guarded"}, {"op": "guarded"}, {"op": "flush"}],
            config=config,
            env=env,
            tempdir=os.path.join(blocker, "tmp"),
        )
        self.assertEqual(child.stderr.count("commit journal disabled"), 1, child.stderr)
        self.assertEqual([r.status for r in self.commits()], [200, 200])
        self.assertEqual(child.event("flushed")["drained"], True)

    def test_async_journal_io_runs_off_the_event_loop(self) -> None:
        writes: List[int] = []
        real_write = cycles_lite._CommitJournal.write

        def spy(journal: Any, record: Any) -> bool:
            writes.append(threading.get_ident())
            return bool(real_write(journal, record))

        self.srv.inject("commit", "status", status=429, headers={"Retry-After": "0"})

        async def scenario() -> Tuple[int, Any]:
            client = AsyncCyclesClient(self.config())

            @cycles(estimate=_DUR_ESTIMATE, actual=_DUR_ACTUAL, action_kind="llm.completion",
                    action_name="durable-test", client=client)
            async def work() -> str:
                return "done"

            try:
                await work()
                summary = await client.recover(timeout=1.0)
            finally:
                await client.aclose()
            return threading.get_ident(), summary

        with mock.patch.object(cycles_lite._CommitJournal, "write", spy):
            loop_thread, summary = asyncio.run(scenario())
        self.assertTrue(cycles_lite.flush(10.0))
        self.assertGreaterEqual(len(writes), 2, "journaled, then the 429 floor")
        self.assertNotIn(loop_thread, writes, "journal writes never run on the loop thread")
        self.assertIsInstance(summary, cycles_lite.RecoverySummary)
        self.assertEqual(_dur_records(self.journal_root), {})


class TestRecoveryReplay(_DurCase):
    """recover(), the CLI, automatic replay, legacy and runcycles records."""

    def test_recover_summary_counts_each_outcome(self) -> None:
        self.srv.inject("commit", "status", status=503, times=None)
        short = {"op": "guarded", "ttl_ms": 1_000, "grace_period_ms": 0}
        self.run_child(
            [{"op": "guarded"}, short, {"op": "guarded"}, {"op": "guarded"}, {"op": "guarded"}],
            config=self.child_config(retry_max_attempts=0),
        )
        self.srv.clear_faults()
        rids = [str(r.response_body["reservation_id"]) for r in self.srv.requests_for("create")]
        settle, expire, keep, discard, later = rids
        records = _dur_records(self.journal_root)
        paths = {rec["reservation_id"]: path for path, rec in records.items()}
        self.assertEqual(sorted(paths), sorted(rids))

        def edit(rid: str, **changes: Any) -> None:
            with open(paths[rid], encoding="utf-8") as handle:
                record = json.load(handle)
            record.update(changes)
            with open(paths[rid], "w", encoding="utf-8") as handle:
                json.dump(record, handle)

        self.srv.clock.advance(2_000)  # only the short reservation expires
        with open(paths[keep], encoding="utf-8") as handle:
            foreign = json.load(handle)["event_fallback_body"]
        foreign["subject"] = {"tenant": "someone-else"}  # the server answers 403
        edit(keep, mode="event", event_fallback_body=foreign)
        releaser = self.client()
        released = releaser.release_reservation(discard, {"idempotency_key": "rel-1"})
        self.assertEqual(released.status, 200)  # the commit then gets RESERVATION_FINALIZED
        edit(later, not_before_ms=int(time.time() * 1000) + 3_600_000)

        summary = self.recover_in_fresh_process(
            timeout=5.0, config=self.child_config(retry_flush_timeout=0.0)
        )
        counts = {k: summary[k] for k in ("found", "settled", "switched_to_event", "kept",
                                          "discarded", "quarantined", "not_yet_due")}
        self.assertEqual(
            counts,
            {"found": 5, "settled": 2, "switched_to_event": 1, "kept": 1, "discarded": 1,
             "quarantined": 0, "not_yet_due": 1},
        )
        self.assertEqual(
            sorted(rec["reservation_id"] for rec in _dur_records(self.journal_root).values()),
            sorted([keep, later]),
        )
        self.assertEqual(self.srv.reservation(settle)["status"], "COMMITTED")
        self.assertEqual(len(self.srv.events), 1)
        self.assertEqual(self.srv.events[0]["metadata"]["recovered_reservation_id"], expire)
        sent = {_dur_key_of(r) for r in self.srv.requests_for("commit")}
        self.assertNotIn(None, sent)

    def test_automatic_replay_runs_once_in_background_without_delaying_first_call(self) -> None:
        # An event-mode record (its reservation expired): its replay is the only event.
        self.srv.inject("commit", "status", status=410)
        self.srv.inject("event", "status", status=503, times=None)
        self.run_child([{"op": "guarded"}], config=self.child_config(retry_max_attempts=0))
        self.srv.clear_faults()
        self.srv.clear_requests()
        path, record = _dur_only_record(self, self.journal_root)
        self.assertEqual(record["mode"], "event")
        late = os.path.join(self.workdir, "late-record.json")
        late_rid = "res-late-" + record["reservation_id"]
        late_body = dict(record["event_fallback_body"], idempotency_key="late-key-1")
        with open(late, "w", encoding="utf-8") as handle:
            json.dump(dict(record, reservation_id=late_rid, event_fallback_body=late_body), handle)
        late_target = os.path.join(os.path.dirname(path), _dur_v2_name(late_rid))

        held = self.srv.inject("event", "delay", delay_ms=1_500)
        replay_started = os.path.join(self.workdir, "replay-started")
        child = self.start_child(
            [
                {"op": "guarded"},  # first use: the replay starts on the worker
                {"op": "barrier", "path": replay_started},
                {"op": "move", "src": late, "dst": late_target},
                {"op": "renew"},
                {"op": "guarded"},  # same identity, same process: no second replay
                {"op": "flush", "timeout": 10.0},
            ]
        )
        _dur_wait(lambda: held.hits, _DUR_CHILD_TIMEOUT_S, "the replayed event")
        with open(replay_started, "w"):
            pass
        child.finish(self)
        guarded = [e for e in child.events() if e["event"] == "guarded"]
        self.assertLess(guarded[0]["elapsed_ms"], 1_000, "the replay did not delay the call")
        self.assertEqual(child.event("flushed")["pending"], 1, "the late record, on disk")
        events = self.srv.requests_for("event")
        key = record["event_fallback_body"]["idempotency_key"]
        self.assertEqual([(_dur_key_of(r), r.status) for r in events], [(key, 201)])
        first_commit = [r for r in self.commits() if r.status == 200][0]
        self.assertLess(first_commit.time_ms, events[0].time_ms + 1_500, "not queued behind")
        self.assertEqual(list(_dur_records(self.journal_root)), [late_target])
        summary = self.recover_in_fresh_process(timeout=5.0)  # on demand it is replayed
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)

    def test_async_client_replays_off_the_event_loop_on_first_use(self) -> None:
        _path, record = self.leave_unresolved_commit()
        scans: List[int] = []
        real_load = cycles_lite._CommitJournal.load_pending

        def spy(journal: Any) -> Any:
            scans.append(threading.get_ident())
            return real_load(journal)

        async def first_use() -> int:
            client = AsyncCyclesClient(self.config())

            @cycles(estimate=_DUR_ESTIMATE, actual=_DUR_ACTUAL, action_kind="llm.completion",
                    action_name="durable-test", client=client)
            async def work() -> str:
                return "done"

            try:
                await work()
                await work()  # the same client: no second replay
            finally:
                await client.aclose()
            return threading.get_ident()

        with mock.patch.object(cycles_lite._CommitJournal, "load_pending", spy):
            loop_thread = asyncio.run(first_use())
            # the scan runs on a one-shot replay thread; then the worker settles the record
            _dur_wait(lambda: cycles_lite.flush(0.1) and not _dur_records(self.journal_root),
                      10.0, "the background replay")
        self.assertEqual(len(scans), 1, "one replay per process and identity")
        self.assertNotEqual(scans[0], loop_thread, "the journal scan ran off the event loop")
        self.assertEqual(_dur_records(self.journal_root), {})
        replay = [r for r in self.commits() if _dur_key_of(r) == record["commit_body"]
                  ["idempotency_key"] and r.status == 200]
        self.assertEqual(len(replay), 1)
        self.assertEqual(self.srv.reservation(record["reservation_id"])["status"], "COMMITTED")

    def guarded_work(self, client: Any) -> Callable[[], str]:
        return cycles(  # type: ignore[no-any-return]
            estimate=_DUR_ESTIMATE, actual=_DUR_ACTUAL, action_kind="llm.completion",
            action_name="durable-test", client=client,
        )(lambda: "done")

    def test_sync_first_use_never_waits_for_the_journal_scan(self) -> None:
        # Review bug 3: the sync client scanned the journal on the caller's thread.
        _path, record = self.leave_unresolved_commit()
        gate = threading.Event()
        self.addCleanup(gate.set)
        scans: List[threading.Thread] = []
        real_load = cycles_lite._CommitJournal.load_pending

        def held_scan(journal: Any) -> Any:
            scans.append(threading.current_thread())
            gate.wait(3)
            return real_load(journal)

        work = self.guarded_work(self.client())
        with mock.patch.object(cycles_lite._CommitJournal, "load_pending", held_scan):
            started = time.monotonic()
            self.assertEqual(work(), "done")
            elapsed = time.monotonic() - started
            _dur_wait(lambda: scans, 5.0, "the journal scan")
            self.assertFalse(cycles_lite.flush(0.05), "flush waits for a running scan")
            gate.set()
            _dur_wait(lambda: cycles_lite.flush(0.1) and not _dur_records(self.journal_root),
                      10.0, "the background replay")
        self.assertLess(elapsed, 1.0, "the first guarded call waited for the journal scan")
        self.assertIsNot(scans[0], threading.current_thread())
        self.assertEqual(self.srv.reservation(record["reservation_id"])["status"], "COMMITTED")

    def test_replay_takes_at_most_half_the_queue_and_leaves_the_rest_journaled(self) -> None:
        # Review bug 3: a big journal filled the shared queue, so live retries fell back to
        # inline and every leftover record logged a warning.
        queue = cycles_lite._SettlementQueue(capacity=8)
        self.addCleanup(setattr, cycles_lite, "_settlements", cycles_lite._settlements)
        cycles_lite._settlements = queue
        journal = cycles_lite._CommitJournal(
            self.journal_root, self.srv.url, tenant=_DUR_TENANT, api_key=_DUR_KEY
        )
        now_ms = int(time.time() * 1000)
        for i in range(20):
            journal.write(cycles_lite._PendingSettlement(
                reservation_id=f"res-old-{i}", base_url=self.srv.url,
                commit_body={"idempotency_key": f"old-{i}",
                             "actual": {"unit": "USD_MICROCENTS", "amount": 1}},
                recorded_at_ms=now_ms - 1_000, not_before_ms=now_ms + 60_000,
            ))
        work = self.guarded_work(self.client(retry_initial_delay=0.5, retry_max_delay=0.5))
        with self.assertLogs("cycles_lite", "INFO") as logs:
            work()  # first use: the replay takes its share of the queue (due in a minute)
            _dur_wait(lambda: queue.pending() == 4, 5.0, "the replay")
            self.srv.inject("commit", "status", status=503)
            work()  # its commit retry still finds room in the queue: not inline
            self.assertEqual(len(self.srv.requests_for("commit")), 2)
            _dur_wait(lambda: len(self.srv.requests_for("commit")) == 3, 5.0, "the retry")
        with queue._cond:  # drop the parked replays so the worker exits
            queue._heap.clear()
            queue._cond.notify_all()
        output = "\n".join(logs.output)
        self.assertNotIn("queue full", output)
        self.assertEqual(output.count("left journaled"), 1, output)
        self.assertIn("16 journaled settlement(s) left journaled", output)
        _dur_wait(lambda: len(_dur_records(self.journal_root)) == 20, 5.0, "the live commit")
        self.assertEqual({r["reservation_id"] for r in _dur_records(self.journal_root).values()},
                         {f"res-old-{i}" for i in range(20)})

    def test_cli_recover(self) -> None:
        _path, record = self.leave_unresolved_commit()
        env = self.child_env(
            CYCLES_BASE_URL=self.srv.url,
            CYCLES_API_KEY=_DUR_KEY,
            CYCLES_TENANT=_DUR_TENANT,
            CYCLES_JOURNAL_DIR=self.journal_root,
            PYTHONPATH=_dur_lite_path(),
        )
        command = [sys.executable, "-m", "cycles_lite", "recover", "--timeout", "5", "--json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        summary = json.loads(done.stdout)
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        self.assertEqual(_dur_records(self.journal_root), {})
        self.assert_settled_once(record["reservation_id"])
        # Nothing left: still exit 0; a table without --json.
        done = subprocess.run(command[:-1], env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("found", done.stdout)

    def test_cli_recover_exit_code_when_records_remain(self) -> None:
        self.leave_unresolved_commit()
        self.srv.inject("commit", "status", status=401, times=None)
        env = self.child_env(
            CYCLES_BASE_URL=self.srv.url,
            CYCLES_API_KEY=_DUR_KEY,
            CYCLES_TENANT=_DUR_TENANT,
            CYCLES_JOURNAL_DIR=self.journal_root,
            PYTHONPATH=_dur_lite_path(),
        )
        command = [sys.executable, "-m", "cycles_lite", "recover", "--timeout", "2", "--json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(json.loads(done.stdout)["kept"], 1)
        self.assertEqual(len(_dur_records(self.journal_root)), 1)

    def test_legacy_named_record_is_migrated_and_replayed_by_fresh_process(self) -> None:
        path, record = self.leave_unresolved_commit()
        legacy = os.path.join(os.path.dirname(path), "legacy_name.json")
        os.replace(path, legacy)
        summary = self.recover_in_fresh_process()
        self.assertEqual(summary["settled"], 1, summary)
        self.assertEqual(_dur_files(self.journal_root), [])
        self.assert_settled_once(record["reservation_id"])


@unittest.skipUnless(os.path.exists(_DUR_RUNCYCLES_PYTHON), "runcycles venv not available")
class TestRuncyclesJournalCompatibility(_DurCase, JournalTestBase):
    """Records cross between runcycles 0.5.3 and cycles_lite in both directions: the
    files themselves (directory, name, bytes, legacy names), and end to end through a
    guarded call and a replay against the local server."""

    def setUp(self) -> None:
        _DurCase.setUp(self)
        JournalTestBase.setUp(self)

    WRITE_SCRIPT = (
        "import json,sys\n"
        "from pathlib import Path\n"
        "from runcycles import journal as j\n"
        "a=json.load(sys.stdin)\n"
        "d=Path(a['root'])/j.auth_fingerprint(a['url'], a['key'], a['tenant'])\n"
        "jr=j.CommitJournal(d)\n"
        "for r in a['records']:\n"
        "    jr.record(j.PendingCommitRecord(**r))\n"
        "print(json.dumps(str(d)))\n"
    )
    LOAD_SCRIPT = (
        "import json,sys\n"
        "from pathlib import Path\n"
        "from runcycles import journal as j\n"
        "a=json.load(sys.stdin)\n"
        "d=Path(a['root'])/j.auth_fingerprint(a['url'], a['key'], a['tenant'])\n"
        "recs=j.CommitJournal(d).load_pending(a['url'])\n"
        "print(json.dumps([json.loads(r.to_json()) for r in recs]))\n"
    )

    def fields(self, rec: cl._PendingSettlement) -> Dict[str, Any]:
        data: Dict[str, Any] = json.loads(rec.to_json())
        data.pop("version")
        return data

    def test_runcycles_writes_we_replay(self) -> None:
        recs = [self.record("res-1"),
                self.record("caf\u00e9/\u4e2d", mode="event", not_before_ms=NOW)]
        directory = run_runcycles(self.WRITE_SCRIPT, {
            "root": self.root, "url": URL, "key": "old-key", "tenant": "acme",
            "records": [self.fields(r) for r in recs]})
        # rotated key, same tenant: the same identity directory
        ours = self.journal(tenant="acme", api_key="new-key")
        self.assertEqual(ours.directory, directory)
        loaded = sorted(ours.load_pending(), key=lambda r: r.reservation_id)
        self.assertEqual(loaded, sorted(recs, key=lambda r: r.reservation_id))
        for rec in recs:
            path = journal_record_path(ours, rec.reservation_id)
            assert path is not None
            with open(path, encoding="utf-8") as handle:
                self.assertEqual(handle.read(), rec.to_json())  # byte-identical
            self.assertTrue(ours.remove(rec.reservation_id))
        self.assertEqual(journal_file_count(ours), 0)

    def test_we_write_runcycles_replays(self) -> None:
        ours = self.journal(api_key=KEY)
        recs = [self.record("r-1"), self.record("a/b", mode="event", not_before_ms=NOW)]
        for rec in recs:
            self.assertTrue(ours.write(rec))
        loaded = run_runcycles(self.LOAD_SCRIPT, {
            "root": self.root, "url": URL, "key": KEY, "tenant": None})
        self.assertEqual(sorted(loaded, key=lambda d: d["reservation_id"]),
                         sorted((json.loads(r.to_json()) for r in recs),
                                key=lambda d: d["reservation_id"]))

    def test_runcycles_legacy_name_is_migrated(self) -> None:
        ours = self.journal(tenant="acme")
        directory = ours.directory
        assert directory is not None
        script = (
            "import json,sys\n"
            "from runcycles import journal as j\n"
            "a=json.load(sys.stdin)\n"
            "r=j.PendingCommitRecord(**a['record'])\n"
            "open(a['dir']+'/'+j._legacy_filename(r.reservation_id),'w').write(r.to_json())\n"
            "print('null')\n"
        )
        rec = self.record("legacy id/1")
        run_runcycles(script, {"dir": directory, "record": self.fields(rec)})
        self.assertEqual(self.files(directory), ["legacy_id_1.json"])
        with self.assertLogs("cycles_lite", "INFO"):
            self.assertEqual(ours.load_pending(), [rec])
        self.assertEqual(self.files(directory), [cl._journal_filename("legacy id/1")])

    def runcycles(self, script: str, *args: Any) -> Any:
        done = subprocess.run(
            [_DUR_RUNCYCLES_PYTHON, "-c", script, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.child_env(),
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout.splitlines()[-1])

    def test_runcycles_record_is_replayed_by_cycles_lite(self) -> None:
        # runcycles itself runs a guarded call whose commit fails; it journals the spend.
        self.srv.inject("commit", "status", status=503, times=None)
        self.runcycles(
            _DUR_RUNCYCLES_GUARDED, self.srv.url, _DUR_KEY, _DUR_TENANT, self.journal_root
        )
        self.srv.clear_faults()
        path, record = _dur_only_record(self, self.journal_root)
        key = record["commit_body"]["idempotency_key"]
        summary = self.recover_in_fresh_process()
        self.assertEqual((summary["found"], summary["settled"]), (1, 1), summary)
        replay = self.commits()[-1]
        self.assertEqual((_dur_key_of(replay), replay.status), (key, 200))
        self.assertFalse(os.path.exists(path))
        self.assert_settled_once(record["reservation_id"])

    def test_cycles_lite_record_is_read_by_runcycles(self) -> None:
        path, record = self.leave_unresolved_commit()
        seen = self.runcycles(
            _DUR_RUNCYCLES_LOAD, self.srv.url, _DUR_KEY, _DUR_TENANT, self.journal_root,
            record["reservation_id"],
        )
        self.assertEqual(seen["directory"], os.path.dirname(path))
        self.assertEqual(seen["filename"], os.path.basename(path))
        self.assertEqual(seen["records"], [record])


_DUR_RUNCYCLES_GUARDED = r"""
import json, sys
from runcycles import CyclesClient, CyclesConfig, cycles
base_url, api_key, tenant, journal_dir = json.loads(sys.argv[1])
config = CyclesConfig(base_url=base_url, api_key=api_key, tenant=tenant,
                      journal_dir=journal_dir, retry_enabled=False)
client = CyclesClient(config)

@cycles(estimate=1000, actual=700, action_kind="llm.completion", action_name="durable-test",
        client=client)
def work():
    return "done"

print(json.dumps(work()))
"""

_DUR_RUNCYCLES_LOAD = r"""
import dataclasses, json, sys
from pathlib import Path
from runcycles.journal import CommitJournal, _safe_filename, auth_fingerprint
base_url, api_key, tenant, root, rid = json.loads(sys.argv[1])
directory = Path(root) / auth_fingerprint(base_url, api_key, tenant)
records = CommitJournal(directory).load_pending(base_url)
print(json.dumps({
    "directory": str(directory),
    "filename": _safe_filename(rid),
    "records": [dict({"version": 1}, **dataclasses.asdict(r)) for r in records],
}))
"""


if __name__ == "__main__":
    unittest.main()
