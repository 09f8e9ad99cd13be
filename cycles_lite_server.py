# Copyright 2026 the cycles-lite authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""A local, in-memory, spec-faithful Cycles budget-authority server.

It implements the runtime plane of ``cycles-protocol-v0.yaml`` (0.1.25.16):
reserve, commit, release, extend, decide, events, balances, list and get,
with the reference server's choices wherever the spec is silent. It uses
the standard library only and never imports ``cycles_lite``: it is a second,
independent reading of the spec.

Use it in tests and demos::

    from cycles_lite_server import LocalCyclesServer

    with LocalCyclesServer(
        api_keys={"key-acme": "acme"},
        budgets=[{"scope": "tenant:acme", "unit": "USD_MICROCENTS",
                  "allocated": 1_000_000}],
    ) as srv:
        print(srv.url)                  # http://127.0.0.1:<free port>
        ...                             # talk HTTP to it
        srv.clock.advance(70_000)       # expire reservations without sleeping
        print(srv.balance("tenant:acme"))

or next to your own agent::

    python3 -m cycles_lite_server --port 7878 --api-key KEY=acme \\
        --budget tenant:acme=USD_MICROCENTS:100000000

Choices where the spec is silent (the reference server's, "[R]", unless noted):

* A subject without ``tenant`` is budgeted under the effective tenant: the
  stored subject gets ``tenant`` filled in and every scope starts with it.
  ``subject.tenant`` must equal the key's tenant exactly (else 403).
* Scope values are lower-cased; ``Balance.scope`` is the leaf segment, and
  a Balance omits zero ``debt``/``overdraft_limit`` and a false
  ``is_over_limit``. Caps come from the deepest budgeted scope that has any.
* Unknown request fields, nulls, floats, booleans, out-of-range integers,
  subject values outside ``[a-zA-Z0-9_.-]``, a Content-Type other than
  application/json and a header/body idempotency key mismatch are all 400
  INVALID_REQUEST. Bodies over ``max_body_bytes`` are 413; an unknown path
  is 404 NOT_FOUND, a known path with the wrong method 405.
* Reserve checks run in this order: replay, closed tenant, no budget
  (UNIT_MISMATCH if another unit exists, else 404), then across all
  budgeted scopes over-limit, frozen/closed, debt (only where
  ``overdraft_limit == 0``), remaining < estimate.
* Overdraft arithmetic uses the unfunded *shortfall*: on a short scope,
  ``spent`` grows by what ``remaining`` could still fund, ``debt`` by the
  rest, and ``remaining`` drops by the whole overage, so
  ``remaining == allocated - spent - reserved - debt`` always holds. Scopes
  without an overdraft limit cap the overage like ALLOW_IF_AVAILABLE.
* TTL is the request's, else the tenant default, silently clamped to the
  tenant maximum; extends are not clamped.
* Expiry is lazy: every operation first expires reservations whose
  ``expires_at_ms + grace_period_ms`` has passed and returns their budget.
* Idempotency is keyed on (tenant, operation, reservation id or "", key),
  compares a SHA-256 of the canonical JSON body, and binds only successful
  outcomes (dry-run and decide DENY included). Live and dry-run create share
  one namespace. Everything runs under one lock, so concurrent same-key
  requests converge on one outcome.
* An API key wins over an admin key when a request carries both; an admin
  release of a closed tenant's reservation is still TENANT_CLOSED.
* Blank query values count as unset. List cursors are keyset cursors bound
  to the tenant, filters, windows and sort (not ``include``); balances
  cursors are bound to their filters. Without ``sort_by`` the list is
  newest first.
* Evidence (``evidence=True``, off by default): signed synchronously, so
  ``GET /v1/evidence/{id}`` never answers a transient 404; the signer is
  ``did:cycles:<sha256(server_id)>#<kid>`` with ``server_id`` = ``{url}/v1``;
  ``error`` evidence only for denials reached after evaluation (409/410
  budget and lifecycle codes), none for validation, auth or lookup errors.
* A tenant status of ``MALFORMED`` simulates an unreadable tenant record:
  every guarded call (reserve, dry-run, decide, commit, release, extend,
  event) fails closed with 500; reads still work (this server's own hook).
* Finalized and expired reservations, idempotency records and events are
  kept ``retention_s`` (24 h) of server clock, then pruned; afterwards a
  get is 404 and a replayed key is new. JSON nested deeper than 64 levels,
  numbers outside a double's range (``1e400``) and lone UTF-16 surrogates
  are 400. A request that fails after validation, evidence signing included,
  undoes every change (500).

All-day use (this server's own): ``/actuator/health``; the governance-admin
subset (tenants create/get/list; budgets create/list/lookup/fund/freeze/
unfreeze; api-keys create/list/revoke) behind ``X-Admin-API-Key``, choices
listed in the README; idle/read timeouts and a connection cap; ``--state``
persistence (see _StateFile; components add sections to ``_state_sections``).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import functools
import heapq
import json
import os
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import ssl
    from io import BufferedIOBase

__version__ = "0.3.0"

__all__ = [
    "FAULT_KINDS",
    "OPERATIONS",
    "Clock",
    "Fault",
    "LocalCyclesServer",
    "LoggedRequest",
    "main",
]

JsonObject = Dict[str, Any]
# (tenant, operation, reservation id or "", idempotency key)
_Slot = Tuple[str, str, str, str]
# a list row's sort value plus its creation sequence number as tie-breaker
_SortKey = Tuple[Union[str, int], int]

# =============================================================================
# Constants
# =============================================================================

SUBJECT_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
UNITS = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")
OVERAGE_POLICIES = ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT")
RESERVATION_STATUSES = ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED")
BUDGET_STATUSES = ("ACTIVE", "FROZEN", "CLOSED")
# MALFORMED simulates a tenant record whose status cannot be read: the
# closed-tenant guard then fails closed with 500 INTERNAL_ERROR.
TENANT_STATUSES = ("ACTIVE", "SUSPENDED", "CLOSED", "MALFORMED")

OPERATIONS = (
    "create", "commit", "release", "extend", "decide", "event",
    "balances", "list", "get", "evidence", "jwks", "health", "admin", "unknown",
)
FAULT_KINDS = (
    "lost_response", "drop", "delay", "status", "nonconformant",
    "malformed", "html", "redirect", "trickle", "close_after",
)

INT64_MAX = 2**63 - 1
DEFAULT_TTL_MS = 60_000
DEFAULT_MAX_TTL_MS = 3_600_000
DEFAULT_GRACE_MS = 5_000
DEFAULT_MAX_EXTENSIONS = 10
DEFAULT_OVERAGE_POLICY = "ALLOW_IF_AVAILABLE"
DEFAULT_UNIT = "USD_MICROCENTS"
MAX_BODY_BYTES = 1 << 20
MAX_LOGGED_REQUESTS = 10_000
# A logged request keeps at most this much of its request and response bodies.
MAX_LOGGED_BODY_BYTES = 4096
# JSON nested deeper than this is refused with 400 before anything else runs.
MAX_JSON_DEPTH = 64
# Finalized and expired reservations, idempotency records and events are
# kept this long (server clock), then pruned a few at a time.
DEFAULT_RETENTION_S = 86_400
DEFAULT_IDLE_TIMEOUT_S = 120.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_STATE_INTERVAL_S = 30.0
_PRUNE_BATCH = 512
_SCAN_CHUNK = 512
LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 200

_TTL_RANGE = (1_000, 86_400_000)
_GRACE_RANGE = (0, 60_000)
_EXTEND_RANGE = (1, 86_400_000)
_TLS_HANDSHAKE_TIMEOUT_S = 10.0
_STOP_JOIN_TIMEOUT_S = 2.0
# a log line shows at most this much of a request's path, error text, ...
_LOGGED_TEXT_CHARS = 300
_MAX_DRAIN_BYTES = 16 << 20
_SECRET_HEADERS = frozenset({"x-cycles-api-key", "x-admin-api-key"})

_SUBJECT_VALUE_RE = re.compile(r"[a-zA-Z0-9_.-]+")
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_EVIDENCE_ID_RE = re.compile(r"[0-9a-f]{64}")
_KEY_MARKER_RE = re.compile(r"cyc_[a-z]{1,16}_")
_LIMIT_RE = re.compile(r"[0-9]{1,4}")
_DATETIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))"
)

# =============================================================================
# Errors and validation
# =============================================================================

_DEFAULT_ERROR_CODES = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    410: "RESERVATION_EXPIRED",
    413: "INVALID_REQUEST",
    429: "LIMIT_EXCEEDED",
}


def _pop_due(queue: Deque[Tuple[Any, ...]], now: int) -> Iterator[Tuple[Any, ...]]:
    """Pop the retention queue's entries due by ``now`` (each starts with its due
    time), at most _PRUNE_BATCH of them: pruning is incremental."""
    for _ in range(_PRUNE_BATCH):
        if not queue or queue[0][0] > now:
            return
        yield queue.popleft()


def _default_error_code(status: int) -> Optional[str]:
    if status >= 500:
        return "INTERNAL_ERROR"
    return _DEFAULT_ERROR_CODES.get(status)


class ApiError(Exception):
    """A protocol error: becomes an ErrorResponse with this status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Optional[JsonObject] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


class _SchemaError(Exception):
    """A value that breaks its schema; ``str()`` names the field."""


_Check = Callable[[Any, str], None]


def _join(path: str, name: str) -> str:
    return name if not path else path + "." + name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(minimum: int = 0, maximum: int = INT64_MAX) -> _Check:
    def check(value: Any, path: str) -> None:
        if not _is_int(value):
            raise _SchemaError(f"{path} must be an integer")
        if not minimum <= value <= maximum:
            raise _SchemaError(f"{path} must be between {minimum} and {maximum}")

    return check


def _string(
    max_length: int, min_length: int = 0, pattern: Optional[re.Pattern[str]] = None
) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _SchemaError(f"{path} must be a string")
        if not min_length <= len(value) <= max_length:
            raise _SchemaError(
                f"{path} must be {min_length} to {max_length} characters long"
            )
        if pattern is not None and not pattern.fullmatch(value):
            raise _SchemaError(f"{path} must match {pattern.pattern}")

    return check


def _boolean() -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _SchemaError(f"{path} must be a boolean")

    return check


def _one_of(values: Sequence[str]) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or value not in values:
            raise _SchemaError(f"{path} must be one of {', '.join(values)}")

    return check


def _array(item: _Check, max_items: Optional[int] = None) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _SchemaError(f"{path} must be an array")
        if max_items is not None and len(value) > max_items:
            raise _SchemaError(f"{path} must have at most {max_items} items")
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")

    return check


def _any_object() -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _SchemaError(f"{path} must be a JSON object")

    return check


def _string_map(max_value_length: int, max_properties: int) -> _Check:
    value_check = _string(max_value_length)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _SchemaError(f"{path} must be a JSON object")
        if len(value) > max_properties:
            raise _SchemaError(f"{path} must have at most {max_properties} properties")
        for key, item in value.items():
            value_check(item, _join(path, key))

    return check


def _object(
    properties: Mapping[str, _Check],
    required: Sequence[str] = (),
    rule: Optional[_Check] = None,
) -> _Check:
    """An object schema with additionalProperties: false."""

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _SchemaError(f"{path or 'request body'} must be a JSON object")
        for name in required:
            if name not in value:
                raise _SchemaError(f"{_join(path, name)} is required")
        for name, item in value.items():
            checker = properties.get(name)
            if checker is None:
                raise _SchemaError(f"{_join(path, name)} is not a known field")
            checker(item, _join(path, name))
        if rule is not None:
            rule(value, path)

    return check


def _require_standard_field(value: Any, path: str) -> None:
    if not any(level in value for level in SUBJECT_LEVELS):
        raise _SchemaError(
            f"{path} must contain at least one of {', '.join(SUBJECT_LEVELS)}"
        )


_IDEMPOTENCY_KEY = _string(256, min_length=1)
_AMOUNT = _object({"unit": _one_of(UNITS), "amount": _integer()}, ("unit", "amount"))
_SUBJECT_PROPERTIES: Dict[str, _Check] = {
    level: _string(128, 1, _SUBJECT_VALUE_RE) for level in SUBJECT_LEVELS
}
_SUBJECT_PROPERTIES["dimensions"] = _string_map(256, 16)
_SUBJECT = _object(_SUBJECT_PROPERTIES, rule=_require_standard_field)
_ACTION = _object(
    {"kind": _string(64), "name": _string(256), "tags": _array(_string(64), 10)},
    ("kind", "name"),
)
_CAPS = _object(
    {
        "max_tokens": _integer(),
        "max_steps_remaining": _integer(),
        "tool_allowlist": _array(_string(256)),
        "tool_denylist": _array(_string(256)),
        "cooldown_ms": _integer(),
    }
)
_METRICS = _object(
    {
        "tokens_input": _integer(),
        "tokens_output": _integer(),
        "latency_ms": _integer(),
        "model_version": _string(128),
        "custom": _any_object(),
    }
)

_CREATE_REQUEST = _object(
    {
        "idempotency_key": _IDEMPOTENCY_KEY,
        "subject": _SUBJECT,
        "action": _ACTION,
        "estimate": _AMOUNT,
        "ttl_ms": _integer(*_TTL_RANGE),
        "grace_period_ms": _integer(*_GRACE_RANGE),
        "overage_policy": _one_of(OVERAGE_POLICIES),
        "dry_run": _boolean(),
        "metadata": _any_object(),
    },
    ("idempotency_key", "subject", "action", "estimate"),
)
_DECIDE_REQUEST = _object(
    {
        "idempotency_key": _IDEMPOTENCY_KEY,
        "subject": _SUBJECT,
        "action": _ACTION,
        "estimate": _AMOUNT,
        "metadata": _any_object(),
    },
    ("idempotency_key", "subject", "action", "estimate"),
)
_COMMIT_REQUEST = _object(
    {
        "idempotency_key": _IDEMPOTENCY_KEY,
        "actual": _AMOUNT,
        "metrics": _METRICS,
        "metadata": _any_object(),
    },
    ("idempotency_key", "actual"),
)
_RELEASE_REQUEST = _object(
    {"idempotency_key": _IDEMPOTENCY_KEY, "reason": _string(256)},
    ("idempotency_key",),
)
_EXTEND_REQUEST = _object(
    {
        "idempotency_key": _IDEMPOTENCY_KEY,
        "extend_by_ms": _integer(*_EXTEND_RANGE),
        "metadata": _any_object(),
    },
    ("idempotency_key", "extend_by_ms"),
)
_EVENT_REQUEST = _object(
    {
        "idempotency_key": _IDEMPOTENCY_KEY,
        "subject": _SUBJECT,
        "action": _ACTION,
        "actual": _AMOUNT,
        "overage_policy": _one_of(OVERAGE_POLICIES),
        "metrics": _METRICS,
        "client_time_ms": _integer(),
        "metadata": _any_object(),
    },
    ("idempotency_key", "subject", "action", "actual"),
)


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_INFINITY = float("inf")


class _Unrepresentable(ValueError):
    """Valid JSON text whose value has no canonical JSON form (JCS, UTF-8)."""


# \ud800-\udfff escapes: json.loads turns an unpaired one into a lone surrogate
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (_INFINITY, -_INFINITY):
        raise _Unrepresentable(f"number {text[:40]} is out of range")
    return value


def _float_sized_int(text: str) -> int:
    """An integer a JSON number (an IEEE double) can hold the magnitude of."""
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Unrepresentable(f"number {text[:40]}... is out of range") from None
    return value


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, finite numbers (no NaN/Infinity, nothing like 1e400), no
    lone UTF-16 surrogates, at most MAX_JSON_DEPTH levels. Raises ValueError."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_json_constant,
                           parse_float=_finite_float, parse_int=_float_sized_int)
    except RecursionError as exc:
        raise _TooDeep() from exc
    _check_depth(value)
    if _SURROGATE_ESCAPE_RE.search(text):
        try:
            _canonical_json(value).encode("utf-8")
        except UnicodeEncodeError:
            raise _Unrepresentable("a string holds a lone UTF-16 surrogate") from None
    return value


class _TooDeep(ValueError):
    def __init__(self) -> None:
        super().__init__(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")


def _check_depth(value: Any) -> None:
    """ValueError if ``value`` nests objects/arrays deeper than MAX_JSON_DEPTH (no recursion)."""
    pending: List[Tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _TooDeep()
        pending.extend((child, depth + 1) for child in children)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _payload_hash(value: Any) -> str:
    import hashlib

    return hashlib.sha256(_canonical_json(value).encode("utf-8")).hexdigest()[:32]


def _parse_scope(scope: str) -> str:
    """Normalise a seeding scope like "tenant:Acme/agent:bot"; ValueError if bad."""
    if not isinstance(scope, str) or not scope:
        raise ValueError("scope must be a non-empty string like 'tenant:acme'")
    segments = []
    last_level = -1
    for part in scope.split("/"):
        level, sep, value = part.partition(":")
        if not sep or level not in SUBJECT_LEVELS or not _SUBJECT_VALUE_RE.fullmatch(value):
            raise ValueError(f"scope {scope!r}: bad segment {part!r}")
        index = SUBJECT_LEVELS.index(level)
        if index <= last_level:
            raise ValueError(f"scope {scope!r}: levels must follow {'/'.join(SUBJECT_LEVELS)}")
        last_level = index
        segments.append(f"{level}:{value.lower()}")
    if not segments[0].startswith("tenant:"):
        raise ValueError(f"scope {scope!r} must start with a tenant segment")
    return "/".join(segments)


def _derive_scopes(subject: Mapping[str, Any]) -> List[str]:
    """Canonical cumulative scope ids; levels absent from the subject are skipped."""
    scopes: List[str] = []
    for level in SUBJECT_LEVELS:
        value = subject.get(level)
        if value:
            segment = f"{level}:{str(value).lower()}"
            scopes.append(segment if not scopes else scopes[-1] + "/" + segment)
    return scopes


def _parse_datetime_ms(text: str) -> int:
    """ISO-8601 / RFC 3339 date-time with an offset -> epoch ms; ValueError if bad."""
    import datetime as dt

    match = _DATETIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(text)
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "").ljust(3, "0")[:3]
    offset = dt.timedelta(0)
    if match.group(9):
        offset = dt.timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
        if match.group(9) == "-":
            offset = -offset
    moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone.utc)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (moment - offset - epoch) // dt.timedelta(milliseconds=1) + int(fraction)


def _extract_trace_id(traceparent: Optional[str], flat: Optional[str]) -> str:
    """traceparent > X-Cycles-Trace-Id > generated; malformed headers are ignored."""
    zero = "0" * 32
    if traceparent is not None:
        match = _TRACEPARENT_RE.fullmatch(traceparent.strip())
        if match and match.group(1) != zero and match.group(2) != "0" * 16:
            return match.group(1)
    if flat is not None:
        candidate = flat.strip()
        if _TRACE_ID_RE.fullmatch(candidate) and candidate != zero:
            return candidate
    while True:
        generated = os.urandom(16).hex()
        if generated != zero:
            return generated


# =============================================================================
# Ledger and state (the pure core: one lock, no HTTP)
# =============================================================================


class Clock:
    """Server time in epoch ms: the wall clock plus an offset tests can advance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset_ms = 0
        self._frozen_at: Optional[int] = None
        self._last_ms = 0

    def now_ms(self) -> int:
        """Never goes backward, even if the wall clock does."""
        with self._lock:
            base = self._frozen_at if self._frozen_at is not None else int(time.time() * 1000)
            self._last_ms = max(self._last_ms, base + self._offset_ms)
            return self._last_ms

    @property
    def offset_ms(self) -> int:
        """How far advance() has moved this clock past the wall clock."""
        return self._offset_ms

    def restore_offset(self, offset_ms: int) -> None:
        """Continue a saved server clock (a --state file) where it left off."""
        with self._lock:
            self._offset_ms = max(self._offset_ms, offset_ms)

    def advance(self, ms: int) -> int:
        """Jump forward by ``ms`` milliseconds; returns the new now_ms()."""
        if not _is_int(ms) or ms < 0:
            raise ValueError("ms must be a non-negative integer")
        with self._lock:
            self._offset_ms += ms
        return self.now_ms()

    def freeze(self) -> int:
        """Stop real time from flowing (advance() still works); returns now_ms()."""
        with self._lock:
            if self._frozen_at is None:
                self._frozen_at = int(time.time() * 1000)
        return self.now_ms()

    def unfreeze(self) -> None:
        """Let real time flow again from the frozen instant."""
        with self._lock:
            if self._frozen_at is not None:
                self._offset_ms += self._frozen_at - int(time.time() * 1000)
                self._frozen_at = None

    def __repr__(self) -> str:
        return f"Clock(now_ms={self.now_ms()}, offset_ms={self._offset_ms})"


@dataclass
class _Tenant:
    name: str
    status: str = "ACTIVE"
    created_at_ms: int = 0
    display_name: Optional[str] = None
    parent_tenant_id: Optional[str] = None
    metadata: Optional[Dict[str, str]] = None
    reservation_expiry_policy: Optional[str] = None
    default_ttl_ms: Optional[int] = None
    max_ttl_ms: Optional[int] = None
    max_extensions: Optional[int] = None
    default_overage_policy: Optional[str] = None
    default_grace_ms: Optional[int] = None


@dataclass
class _Policy:
    """A tenant's reservation policy with the server defaults filled in."""

    default_ttl_ms: int
    max_ttl_ms: int
    max_extensions: int
    default_overage_policy: str
    default_grace_ms: int


_POLICY_FIELDS = (
    "default_ttl_ms", "max_ttl_ms", "max_extensions", "default_overage_policy",
    "default_grace_ms",
)


@dataclass
class _Budget:
    scope: str
    unit: str
    allocated: int
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    remaining: int = 0
    overdraft_limit: int = 0
    status: str = "ACTIVE"
    caps: Optional[JsonObject] = None
    is_over_limit: bool = False
    created_at_ms: int = 0
    updated_at_ms: int = 0
    commit_overage_policy: Optional[str] = None
    metadata: Optional[JsonObject] = None

    @property
    def tenant_segment(self) -> str:
        return self.scope.split("/", 1)[0]

    def snapshot(self) -> JsonObject:
        """The wire Balance; [R] omits zero debt/overdraft and a false flag."""
        def amount(value: int) -> JsonObject:
            return {"unit": self.unit, "amount": value}

        balance: JsonObject = {
            "scope": self.scope.rsplit("/", 1)[-1],
            "scope_path": self.scope,
            "remaining": amount(self.remaining),
            "reserved": amount(self.reserved),
            "spent": amount(self.spent),
            "allocated": amount(self.allocated),
        }
        if self.debt:
            balance["debt"] = amount(self.debt)
        if self.overdraft_limit:
            balance["overdraft_limit"] = amount(self.overdraft_limit)
        if self.is_over_limit:
            balance["is_over_limit"] = True
        return balance

    def as_dict(self) -> JsonObject:
        return {
            "scope": self.scope,
            "unit": self.unit,
            "allocated": self.allocated,
            "spent": self.spent,
            "reserved": self.reserved,
            "debt": self.debt,
            "remaining": self.remaining,
            "overdraft_limit": self.overdraft_limit,
            "is_over_limit": self.is_over_limit,
            "status": self.status,
            "caps": copy.deepcopy(self.caps),
        }


@dataclass
class _Reservation:
    reservation_id: str
    seq: int
    tenant: str
    subject: JsonObject
    action: JsonObject
    unit: str
    amount: int
    overage_policy: str
    idempotency_key: str
    metadata: Optional[JsonObject]
    grace_ms: int
    created_at_ms: int
    expires_at_ms: int
    scope_path: str
    affected_scopes: List[str]
    budget_keys: List[Tuple[str, str]]
    max_extensions: int
    status: str = "ACTIVE"
    extension_count: int = 0
    finalized_at_ms: Optional[int] = None
    committed: Optional[int] = None
    committed_metadata: Optional[JsonObject] = None
    finalized_by: Optional[str] = None
    release_reason: Optional[str] = None
    # idempotency records bound to this reservation: pruned with it
    slots: List[_Slot] = field(default_factory=list)

    def view(self, include: Iterable[str] = ("metadata", "committed_metadata")) -> JsonObject:
        """ReservationDetail / ReservationSummary with the requested heavy fields."""
        row: JsonObject = {
            "reservation_id": self.reservation_id,
            "status": self.status,
            "idempotency_key": self.idempotency_key,
            "subject": copy.deepcopy(self.subject),
            "action": copy.deepcopy(self.action),
            "reserved": {"unit": self.unit, "amount": self.amount},
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "scope_path": self.scope_path,
            "affected_scopes": list(self.affected_scopes),
        }
        if self.finalized_at_ms is not None:
            row["finalized_at_ms"] = self.finalized_at_ms
        if self.status == "COMMITTED" and self.committed is not None:
            row["committed"] = {"unit": self.unit, "amount": self.committed}
        wanted = set(include)
        if "metadata" in wanted and self.metadata is not None:
            row["metadata"] = copy.deepcopy(self.metadata)
        if "committed_metadata" in wanted and self.committed_metadata is not None:
            row["committed_metadata"] = copy.deepcopy(self.committed_metadata)
        return row

    def sort_value(self, sort_by: str) -> Union[str, int]:
        if sort_by == "tenant":
            return str(self.subject.get("tenant", self.tenant))
        if sort_by == "reserved":
            return self.amount
        value: Union[str, int] = getattr(self, sort_by)
        return value

    def as_dict(self) -> JsonObject:
        return {
            "reservation_id": self.reservation_id,
            "tenant": self.tenant,
            "status": self.status,
            "subject": copy.deepcopy(self.subject),
            "action": copy.deepcopy(self.action),
            "unit": self.unit,
            "reserved": self.amount,
            "committed": self.committed,
            "overage_policy": self.overage_policy,
            "idempotency_key": self.idempotency_key,
            "metadata": copy.deepcopy(self.metadata),
            "committed_metadata": copy.deepcopy(self.committed_metadata),
            "grace_period_ms": self.grace_ms,
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "finalized_at_ms": self.finalized_at_ms,
            "extension_count": self.extension_count,
            "max_extensions": self.max_extensions,
            "finalized_by": self.finalized_by,
            "release_reason": self.release_reason,
            "scope_path": self.scope_path,
            "affected_scopes": list(self.affected_scopes),
            "budgeted_scopes": [scope for scope, _ in self.budget_keys],
        }


@dataclass
class _Stored:
    """A bound idempotency key: the payload hash and the successful response,
    kept as compact JSON (a third of the memory of the dict)."""

    payload_hash: str
    status: int
    body_json: str

    @classmethod
    def of(cls, payload_hash: str, status: int, body: JsonObject) -> _Stored:
        return cls(payload_hash, status, json.dumps(body, separators=(",", ":")))

    def body(self) -> JsonObject:
        parsed: JsonObject = json.loads(self.body_json)
        return parsed


@dataclass
class _ApiKey:
    """An API key as the admin plane sees it; only a SHA-256 of the secret is kept."""

    key_id: str
    tenant_id: str
    key_prefix: str
    created_at_ms: int
    name: str = ""
    description: Optional[str] = None
    permissions: List[str] = field(default_factory=list)
    scope_filter: Optional[List[str]] = None
    expires_at_ms: Optional[int] = None
    status: str = "ACTIVE"
    revoked_at_ms: Optional[int] = None
    revoked_reason: Optional[str] = None
    metadata: Optional[JsonObject] = None

    def is_usable(self, now: int) -> bool:
        return self.status == "ACTIVE" and (self.expires_at_ms is None or now < self.expires_at_ms)


class _Retired:
    """A finalized or expired reservation and the idempotency records bound to it,
    kept as one compressed blob (a few hundred bytes instead of a few KB) until
    the retention window prunes it. Reads thaw it into a transient _Reservation."""

    __slots__ = ("blob", "create_slot", "reservation_id", "seq", "status", "tenant")

    def __init__(self, seq: int, reservation_id: str, tenant: str, status: str,
                 create_slot: Optional[_Slot], blob: bytes) -> None:
        self.seq = seq
        self.reservation_id = reservation_id
        self.tenant = tenant
        self.status = status
        self.create_slot = create_slot
        self.blob = blob

    @classmethod
    def of(cls, reservation: _Reservation, stored: List[Tuple[_Slot, _Stored]],
           create_slot: Optional[_Slot]) -> _Retired:
        fields = _record_fields(reservation)
        records = [[list(slot), s.payload_hash, s.status, s.body_json] for slot, s in stored]
        blob = _deflate_text(json.dumps([fields, records], separators=(",", ":")))
        return cls(reservation.seq, reservation.reservation_id, reservation.tenant,
                   reservation.status, create_slot, blob)

    def thaw(self) -> Tuple[_Reservation, Dict[_Slot, _Stored]]:
        fields, records = json.loads(_inflate_text(self.blob))
        stored = {_slot(slot): _Stored(digest, status, body)
                  for slot, digest, status, body in records}
        return _reservation_from(fields), stored

    def dump(self) -> List[Any]:
        """For the state file: the blob as it is (the preset dictionary never changes)."""
        return [self.seq, self.reservation_id, self.tenant, self.status,
                list(self.create_slot) if self.create_slot else None,
                base64.b64encode(self.blob).decode("ascii")]

    @classmethod
    def load(cls, saved: Sequence[Any]) -> _Retired:
        seq, reservation_id, tenant, status, create_slot, blob = saved
        if status not in RESERVATION_STATUSES or status == "ACTIVE":
            raise ValueError(f"retired reservation {reservation_id} has status {status!r}")
        return cls(int(seq), str(reservation_id), str(tenant), str(status),
                   _slot(create_slot) if create_slot else None,
                   base64.b64decode(str(blob), validate=True))


_Record = Union[_Reservation, _Retired]


def _record_fields(reservation: _Reservation) -> JsonObject:
    import dataclasses

    return {f.name: getattr(reservation, f.name) for f in dataclasses.fields(reservation)}


def _reservation_from(fields: JsonObject) -> _Reservation:
    reservation = _Reservation(**fields)
    reservation.budget_keys = [(scope, unit) for scope, unit in reservation.budget_keys]
    reservation.slots = [_slot(slot) for slot in reservation.slots]
    return reservation


def _live(record: _Record) -> _Reservation:
    return record.thaw()[0] if isinstance(record, _Retired) else record


_ZDICT: List[bytes] = []


def _zdict() -> bytes:
    """The preset dictionary of _Retired blobs: one typical lifecycle, so a blob
    holds little more than its ids, times and amounts. Blobs are saved as they are
    in --state files: never change this, or old files stop loading."""
    if not _ZDICT:
        amount = {"unit": "USD_MICROCENTS", "amount": 0}
        balance = {"scope": "tenant", "scope_path": "tenant:", "remaining": amount,
                   "reserved": amount, "spent": amount, "allocated": amount}
        fields = {
            "reservation_id": "", "seq": 0, "tenant": "", "subject": {"tenant": ""},
            "action": {"kind": "", "name": ""}, "unit": "USD_MICROCENTS", "amount": 0,
            "overage_policy": "ALLOW_IF_AVAILABLE", "idempotency_key": "", "metadata": None,
            "grace_ms": 5000, "created_at_ms": 0, "expires_at_ms": 0, "scope_path": "tenant:",
            "affected_scopes": ["tenant:"], "budget_keys": [["tenant:", "USD_MICROCENTS"]],
            "max_extensions": 10, "status": "COMMITTED", "extension_count": 0,
            "finalized_at_ms": 0, "committed": 0, "committed_metadata": None,
            "finalized_by": "api_key", "release_reason": None, "slots": [],
        }
        bodies = [
            {"decision": "ALLOW", "reservation_id": "", "reserved": amount, "expires_at_ms": 0,
             "remaining_ttl_ms": 0, "scope_path": "tenant:", "affected_scopes": ["tenant:"],
             "balances": [balance]},
            {"status": "COMMITTED", "charged": amount, "released": amount,
             "balances": [balance]},
            {"status": "RELEASED", "released": amount, "balances": [balance]},
        ]
        text = json.dumps([fields, [
            [["", op, "", ""], "", 200, json.dumps(body, separators=(",", ":"))]
            for op, body in zip(("create", "commit", "release"), bodies)
        ]], separators=(",", ":"))
        _ZDICT.append(text.encode("utf-8"))
    return _ZDICT[0]


def _deflate_text(text: str) -> bytes:
    return _deflate(text.encode("utf-8"), _zdict())


def _inflate_text(blob: bytes) -> str:
    return _inflate(blob, _zdict()).decode("utf-8")


def _deflate(data: bytes, zdict: bytes) -> bytes:
    """Raw deflate with a preset dictionary."""
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    return packer.compress(data) + packer.flush()


def _inflate(blob: bytes, zdict: bytes) -> bytes:
    import zlib

    unpacker = zlib.decompressobj(-15, zdict)
    try:
        return unpacker.decompress(blob) + unpacker.flush()
    except zlib.error as error:
        raise ValueError(f"a damaged compressed record ({error})") from None


class _TenantRows:
    """One tenant's reservations by creation sequence, overall and per status:
    a page in creation order costs O(page + log n)."""

    def __init__(self) -> None:
        self.rows: Dict[int, _Record] = {}
        self.all: List[int] = []
        self.by_status: Dict[str, List[int]] = {status: [] for status in RESERVATION_STATUSES}

    def add(self, reservation: _Record) -> None:
        self.rows[reservation.seq] = reservation
        _sorted_insert(self.all, reservation.seq)
        _sorted_insert(self.by_status[reservation.status], reservation.seq)

    def remove(self, reservation: _Record) -> None:
        self.rows.pop(reservation.seq, None)
        _sorted_remove(self.all, reservation.seq)
        _sorted_remove(self.by_status[reservation.status], reservation.seq)

    def restatus(self, reservation: _Reservation, old: str) -> None:
        _sorted_remove(self.by_status[old], reservation.seq)
        _sorted_insert(self.by_status[reservation.status], reservation.seq)

    def window(
        self, status: Optional[str], after_seq: Optional[int], descending: bool, count: int
    ) -> List[int]:
        """Up to ``count`` sequence numbers past ``after_seq`` in the given direction."""
        import bisect

        seqs = self.all if status is None else self.by_status[status]
        if descending:
            end = len(seqs) if after_seq is None else bisect.bisect_left(seqs, after_seq)
            return seqs[max(0, end - count):end][::-1]
        start = 0 if after_seq is None else bisect.bisect_right(seqs, after_seq)
        return seqs[start:start + count]


def _sorted_insert(values: List[Any], value: Any) -> None:
    import bisect

    if not values or values[-1] < value:
        values.append(value)
    else:
        bisect.insort(values, value)


def _sorted_remove(values: List[Any], value: Any) -> None:
    import bisect

    index = bisect.bisect_left(values, value)
    if index < len(values) and values[index] == value:
        del values[index]


_DEFAULT_PERMISSIONS = (
    "reservations:create", "reservations:commit", "reservations:release",
    "reservations:extend", "reservations:list", "balances:read", "budgets:read",
    "budgets:write", "policies:read", "policies:write",
)


def _key_prefix(secret: str) -> str:
    """The visible start of a given key: a ``cyc_live_``-style marker, then at most
    4 characters, never more than a quarter of what follows the marker."""
    marker = _KEY_MARKER_RE.match(secret)
    head = marker.group(0) if marker else ""
    rest = secret[len(head):]
    return head + rest[: min(4, len(rest) // 4)]


def _secret_hash(secret: str) -> str:
    import hashlib

    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass
class _Outcome:
    status: int
    body: JsonObject
    applied: bool = False


@dataclass
class _Caller:
    """Who is calling: a tenant (API key) or an admin (no effective tenant)."""

    tenant: Optional[str]
    admin: bool = False


@dataclass
class _ListQuery:
    tenant: str
    status: Optional[str]
    idempotency_key: Optional[str]
    segments: List[str]
    windows: List[Tuple[str, Optional[int], Optional[int]]]
    sort_by: str
    descending: bool
    limit: int
    after: Optional[_SortKey]
    include: Set[str]


@dataclass
class _Evaluation:
    budgets: List[_Budget]
    reason: Optional[str] = None
    reason_scope: str = ""
    caps: Optional[JsonObject] = None


_DENIAL_MESSAGES = {
    "OVERDRAFT_LIMIT_EXCEEDED": "Scope {scope} is over its overdraft limit",
    "BUDGET_FROZEN": "Budget for scope {scope} is frozen",
    "BUDGET_CLOSED": "Budget for scope {scope} is closed",
    "DEBT_OUTSTANDING": "Scope {scope} has outstanding debt",
    "BUDGET_EXCEEDED": "Insufficient remaining budget for scope {scope}",
}


def _denial_error(reason: str, scope: str) -> ApiError:
    message = _DENIAL_MESSAGES[reason].format(scope=scope)
    return ApiError(409, reason, message, {"scope": scope})


class _Ledger:
    """All server state behind one lock; every operation is atomic.

    Operations take validated request bodies, return an _Outcome or raise
    ApiError, and keep ``remaining == allocated - spent - reserved - debt``
    for every budget and ``reserved == sum of its ACTIVE reservations``.
    """

    def __init__(
        self,
        clock: Clock,
        default_ttl_ms: int,
        max_ttl_ms: int,
        default_grace_ms: int,
        max_extensions: int,
        default_overage_policy: str,
        retention_ms: int = DEFAULT_RETENTION_S * 1000,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._retention_ms = retention_ms
        self._defaults = _Policy(
            default_ttl_ms=default_ttl_ms,
            max_ttl_ms=max_ttl_ms,
            max_extensions=max_extensions,
            default_overage_policy=default_overage_policy,
            default_grace_ms=default_grace_ms,
        )
        self._tenants: Dict[str, _Tenant] = {}
        self._api_keys: Dict[str, _ApiKey] = {}  # by SHA-256 of the secret
        self._admin_keys: Set[str] = set()  # SHA-256 of each admin key
        self._budgets: Dict[Tuple[str, str], _Budget] = {}
        self._budget_keys_by_tenant: Dict[str, List[Tuple[str, str]]] = {}
        self._units_by_scope: Dict[str, Set[str]] = {}
        self._reservations: Dict[str, _Record] = {}
        self._by_tenant: Dict[str, _TenantRows] = {}
        self._expiry_heap: List[Tuple[int, int, str]] = []
        # a reservation's records move into its _Retired blob; its create key points there
        self._idempotency: Dict[_Slot, Union[_Stored, _Retired]] = {}
        self._to_retire: List[_Reservation] = []
        self._events: Dict[str, JsonObject] = {}
        # (prune at ms, kind, key), in time order: the clock never goes backward
        self._prune_queue: Deque[Tuple[int, str, Any]] = collections.deque()
        self._undo: Optional[List[Callable[[], object]]] = None
        # run on a successful outcome inside its atomic unit (see sealing())
        self._seal: Optional[Callable[[_Outcome], None]] = None
        self._seq = 0
        self.changes = 0  # bumped by every change; --state saves when it moved
        # told the id of each reservation pruned (lock held): what refers to it goes too
        self.on_reservation_pruned: Optional[Callable[[str], None]] = None

    # -- seeding and inspection ------------------------------------------------

    def add_tenant(self, name: str, status: str = "ACTIVE", **policy: Any) -> None:
        if not isinstance(name, str) or not _SUBJECT_VALUE_RE.fullmatch(name):
            raise ValueError("tenant must match ^[a-zA-Z0-9_.-]+$")
        _check_choice("status", status, TENANT_STATUSES)
        tenant = _Tenant(name=name, status=status, created_at_ms=self._clock.now_ms())
        for key, value in policy.items():
            if key in ("default_ttl_ms", "max_ttl_ms", "default_grace_ms", "max_extensions"):
                _check_amount(key, value)
            elif key == "default_overage_policy":
                _check_choice(key, value, OVERAGE_POLICIES)
            else:
                raise ValueError(f"unknown tenant policy field {key!r}; known: {_POLICY_FIELDS}")
            setattr(tenant, key, value)
        with self._lock:
            self._tenants[name] = tenant
            self.changes += 1

    def ensure_tenant(self, name: str) -> None:
        with self._lock:
            if name not in self._tenants:
                self.add_tenant(name)

    def set_tenant_status(self, name: str, status: str) -> None:
        _check_choice("status", status, TENANT_STATUSES)
        with self._lock:
            if name not in self._tenants:
                raise KeyError(f"unknown tenant {name!r}")
            self._tenants[name].status = status
            self.changes += 1

    def add_api_key(self, key: str, tenant: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("api key must be a non-empty string")
        digest = _secret_hash(key)
        with self._lock:
            self.ensure_tenant(tenant)
            self._api_keys[digest] = _ApiKey(
                key_id="key_" + digest[:16], tenant_id=tenant, key_prefix=_key_prefix(key),
                created_at_ms=self._clock.now_ms(), name="seeded",
                permissions=list(_DEFAULT_PERMISSIONS),
            )
            self.changes += 1

    def remove_api_key(self, key: str) -> None:
        with self._lock:
            self._api_keys.pop(_secret_hash(key), None)
            self.changes += 1

    def add_admin_key(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("admin key must be a non-empty string")
        with self._lock:
            self._admin_keys.add(_secret_hash(key))

    def remove_admin_key(self, key: str) -> None:
        with self._lock:
            self._admin_keys.discard(_secret_hash(key))

    def add_budget(self, scope: str, unit: str, allocated: int, **fields: Any) -> None:
        scope = _parse_scope(scope)
        _check_choice("unit", unit, UNITS)
        _check_amount("allocated", allocated)
        now = self._clock.now_ms()
        budget = _Budget(scope=scope, unit=unit, allocated=allocated, created_at_ms=now,
                         updated_at_ms=now)
        _apply_budget_fields(budget, fields)
        budget.remaining = budget.allocated - budget.spent - budget.reserved - budget.debt
        with self._lock:
            if (scope, unit) in self._budgets:
                raise ValueError(f"budget {scope} {unit} already exists")
            tenant = budget.tenant_segment.split(":", 1)[1]
            self.ensure_tenant(tenant)
            self._budgets[(scope, unit)] = budget
            _sorted_insert(self._budget_keys_by_tenant.setdefault(tenant, []), (scope, unit))
            self._units_by_scope.setdefault(scope, set()).add(unit)
            self.changes += 1

    def has_budget(self, scope: str, unit: str) -> bool:
        with self._lock:
            return (_parse_scope(scope), unit) in self._budgets

    def set_budget(self, scope: str, unit: str, fields: Mapping[str, Any]) -> None:
        with self._lock:
            budget = self._budget(scope, unit)
            _apply_budget_fields(budget, fields)
            budget.remaining = budget.allocated - budget.spent - budget.reserved - budget.debt
            self.changes += 1

    def fund(self, scope: str, unit: str, amount: int) -> None:
        """Add funds: repay debt first (moving it to spent), then raise remaining."""
        _check_amount("amount", amount)
        with self._lock:
            budget = self._budget(scope, unit)
            repaid = min(amount, budget.debt)
            budget.allocated += amount
            budget.debt -= repaid
            budget.spent += repaid
            budget.remaining += amount
            if budget.is_over_limit and budget.debt <= budget.overdraft_limit:
                budget.is_over_limit = False
            self.changes += 1

    def balance(self, scope: str, unit: str) -> JsonObject:
        with self._lock:
            self._sweep(self._clock.now_ms())
            return self._budget(scope, unit).as_dict()

    def reservation(self, reservation_id: str) -> Optional[JsonObject]:
        with self._lock:
            self._sweep(self._clock.now_ms())
            found = self._reservations.get(reservation_id)
            return _live(found).as_dict() if found else None

    def events(self) -> List[JsonObject]:
        with self._lock:
            return copy.deepcopy(list(self._events.values()))

    def check_invariants(self) -> None:
        with self._lock:
            held: Dict[Tuple[str, str], int] = {}
            for reservation in self._reservations.values():
                if isinstance(reservation, _Reservation) and reservation.status == "ACTIVE":
                    for key in reservation.budget_keys:
                        held[key] = held.get(key, 0) + reservation.amount
            for key, budget in self._budgets.items():
                expected = budget.allocated - budget.spent - budget.reserved - budget.debt
                if budget.remaining != expected:
                    raise AssertionError(
                        f"{budget.scope} {budget.unit}: remaining {budget.remaining} != "
                        f"allocated - spent - reserved - debt = {expected}"
                    )
                if budget.reserved != held.get(key, 0):
                    raise AssertionError(
                        f"{budget.scope} {budget.unit}: reserved {budget.reserved} != "
                        f"sum of active reservations {held.get(key, 0)}"
                    )
                if min(budget.spent, budget.reserved, budget.debt) < 0:
                    raise AssertionError(f"{budget.scope} {budget.unit}: negative counter")

    # -- persistence -----------------------------------------------------------

    def has_tenant(self, name: str) -> bool:
        return name in self._tenants

    def dump_state(self) -> JsonObject:
        """Everything a restart needs, as JSON-ready values. The lock is held only
        for shallow copies (nested values are replaced, never changed in place;
        retired blobs never change); retired records are thawed after it."""
        with self._lock:
            state = {
                "reservations": [_dump_record(r) for r in self._reservations.values()
                                 if isinstance(r, _Reservation)],
                "retired": [r.dump() for r in self._reservations.values()
                            if isinstance(r, _Retired)],
                "seq": self._seq,
                "tenants": [dict(vars(t)) for t in self._tenants.values()],
                "api_keys": {h: dict(vars(k)) for h, k in self._api_keys.items()},
                "budgets": [dict(vars(b)) for b in self._budgets.values()],
                "idempotency": [
                    [list(slot), stored.payload_hash, stored.status, stored.body_json]
                    for slot, stored in self._idempotency.items() if isinstance(stored, _Stored)
                ],
                "events": list(self._events.values()),
                "prune_queue": list(self._prune_queue),
            }
        return state

    def load_state(self, saved: JsonObject) -> None:
        """Replace the ledger with a dump_state() document (raises on a bad one)."""
        with self._lock:
            self._tenants = {t["name"]: _Tenant(**t) for t in saved["tenants"]}
            self._api_keys = {h: _ApiKey(**k) for h, k in saved["api_keys"].items()}
            self._budgets, self._budget_keys_by_tenant, self._units_by_scope = {}, {}, {}
            for fields in saved["budgets"]:
                budget = _Budget(**fields)
                key = (budget.scope, budget.unit)
                self._budgets[key] = budget
                tenant = budget.tenant_segment.split(":", 1)[1]
                _sorted_insert(self._budget_keys_by_tenant.setdefault(tenant, []), key)
                self._units_by_scope.setdefault(budget.scope, set()).add(budget.unit)
            self._reservations, self._by_tenant, self._expiry_heap = {}, {}, []
            self._idempotency = {}
            for saved_record in saved["retired"]:
                retired = _Retired.load(saved_record)
                self._reservations[retired.reservation_id] = retired
                self._by_tenant.setdefault(retired.tenant, _TenantRows()).add(retired)
                if retired.create_slot is not None:
                    self._idempotency[retired.create_slot] = retired
            for fields in saved["reservations"]:
                reservation = _reservation_from(fields)
                if any(key not in self._budgets for key in reservation.budget_keys):
                    raise ValueError(f"reservation {reservation.reservation_id} has no budget")
                self._reservations[reservation.reservation_id] = reservation
                self._by_tenant.setdefault(reservation.tenant, _TenantRows()).add(reservation)
                if reservation.status == "ACTIVE":
                    self._schedule_expiry(reservation)
                else:
                    self._to_retire.append(reservation)
            for slot, digest, status, body in saved["idempotency"]:
                self._idempotency[_slot(slot)] = _Stored(str(digest), int(status), str(body))
            self._retire_pending()
            self._events = {str(e["event_id"]): e for e in saved["events"]}
            self._prune_queue = collections.deque(
                (int(at), str(kind), key) for at, kind, key in saved["prune_queue"]
            )
            self._seq = max([int(saved["seq"])] + [r.seq for r in self._reservations.values()])
            for retired_record in self._reservations.values():  # every blob must open
                if isinstance(retired_record, _Retired):
                    retired_record.thaw()
            self.check_invariants()

    # -- authentication --------------------------------------------------------

    def tenant_for_key(self, key: str) -> Optional[str]:
        """The tenant of an active, unexpired API key."""
        record = self._api_keys.get(_secret_hash(key))
        if record is None or not record.is_usable(self._clock.now_ms()):
            return None
        return record.tenant_id

    def is_admin_key(self, key: str) -> bool:
        return _secret_hash(key) in self._admin_keys

    # -- atomicity and retention (call with the lock held) ----------------------

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """Run a mutation so that, if anything in it raises, every change it
        recorded is undone: a failed request leaves the ledger as it was."""
        undo: List[Callable[[], object]] = []
        self._undo = undo
        try:
            yield
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        finally:
            self._undo = None
        self.changes += 1
        self._retire_pending()

    @contextlib.contextmanager
    def sealing(self, seal: Callable[[_Outcome], None]) -> Iterator[None]:
        """Hold the lock; the reserve/decide/commit/release run inside calls ``seal``
        with its outcome before its change is kept: if ``seal`` raises, it is undone."""
        with self._lock:
            self._seal = seal
            try:
                yield
            finally:
                self._seal = None

    def _sealed(self, outcome: _Outcome) -> _Outcome:
        """Seal an outcome (call inside _atomic): evidence is signed before the change stays."""
        if self._seal is not None:
            self._seal(outcome)
        return outcome

    def _touch(self, *records: Any) -> None:
        """Remember the fields of budgets/reservations about to change."""
        if self._undo is None:
            return
        for record in records:
            self._undo.append(functools.partial(_restore, record, dict(vars(record))))

    def _on_undo(self, step: Callable[[], object]) -> None:
        if self._undo is not None:
            self._undo.append(step)

    def _bind(self, slot: _Slot, stored: _Stored, owner: Optional[_Reservation]) -> None:
        """Bind an idempotency key; it lives as long as its reservation, else the retention."""
        self._idempotency[slot] = stored
        self._on_undo(lambda: self._idempotency.pop(slot, None))
        if owner is not None:
            owner.slots.append(slot)
            self._on_undo(owner.slots.pop)
        else:
            self._retain("slot", slot)

    def _retain(self, kind: str, key: Any) -> None:
        self._prune_queue.append((self._clock.now_ms() + self._retention_ms, kind, key))
        self._on_undo(self._prune_queue.pop)

    def _set_status(self, reservation: _Reservation, status: str) -> None:
        """Finalize or expire a reservation: re-index it and start its retention."""
        old = reservation.status
        reservation.status = status
        self._by_tenant[reservation.tenant].restatus(reservation, old)
        self._on_undo(lambda: self._by_tenant[reservation.tenant].restatus(reservation, status))
        self._retain("reservation", reservation.reservation_id)
        self._to_retire.append(reservation)
        self._on_undo(self._to_retire.pop)

    def _retire_pending(self) -> None:
        """Compress what was finalized: from here on it is only read and replayed."""
        pending, self._to_retire = self._to_retire, []
        for reservation in pending:
            if self._reservations.get(reservation.reservation_id) is not reservation:
                continue
            stored = [(slot, self._idempotency.pop(slot)) for slot in reservation.slots
                      if slot in self._idempotency]
            create = next((slot for slot, _ in stored if slot[1] == "create"), None)
            retired = _Retired.of(reservation, [(k, v) for k, v in stored
                                                if isinstance(v, _Stored)], create)
            self._reservations[reservation.reservation_id] = retired
            self._by_tenant[reservation.tenant].rows[reservation.seq] = retired
            if create is not None:
                self._idempotency[create] = retired
        if len(self._expiry_heap) > 4096 and pending:
            active = [rows.rows[seq] for rows in self._by_tenant.values()
                      for seq in rows.by_status["ACTIVE"]]
            if len(self._expiry_heap) > 2 * len(active) + 4096:
                self._compact_expiry_heap(active)

    def _compact_expiry_heap(self, active: List[_Record]) -> None:
        """Drop the entries of reservations no longer active (amortized O(1))."""
        self._expiry_heap = [
            (r.expires_at_ms + r.grace_ms, r.seq, r.reservation_id)
            for r in active if isinstance(r, _Reservation)
        ]
        heapq.heapify(self._expiry_heap)

    def _prune(self, now: int) -> None:
        """Forget what has outlived the retention window, at most _PRUNE_BATCH at a time."""
        for _, kind, key in _pop_due(self._prune_queue, now):
            if kind == "reservation":
                record = self._reservations.pop(key, None)
                if record is not None:
                    self._by_tenant[record.tenant].remove(record)
                    slots = [record.create_slot] if isinstance(record, _Retired) else record.slots
                    for slot in slots:
                        if slot is not None:
                            self._idempotency.pop(slot, None)
                    if self.on_reservation_pruned is not None:
                        self.on_reservation_pruned(key)
            elif kind == "event":
                self._events.pop(key, None)
            else:
                self._idempotency.pop(_slot(key), None)
            self.changes += 1

    # -- createReservation / decide --------------------------------------------

    def create(self, tenant: str, request: JsonObject, payload_hash: str) -> _Outcome:
        with self._lock:
            now = self._start(self._clock.now_ms())
            slot = (tenant, "create", "", request["idempotency_key"])
            replay = self._replay(slot, payload_hash, now)
            if replay is not None:
                return replay
            closed = self._tenant_is_closed(tenant)
            subject = _subject_for(request["subject"], tenant)
            scopes = _derive_scopes(subject)
            estimate = request["estimate"]
            with self._atomic():
                if request.get("dry_run", False):
                    body = self._dry_run_body(closed, scopes, estimate)
                    self._bind(slot, _Stored.of(payload_hash, 200, body), None)
                    return self._sealed(_Outcome(200, body))
                if closed:
                    raise ApiError(409, "TENANT_CLOSED", f"Tenant {tenant} is closed")
                evaluation = self._evaluate(scopes, estimate["unit"], estimate["amount"])
                if evaluation.reason == "BUDGET_NOT_FOUND":
                    raise ApiError(
                        404, "NOT_FOUND", f"Budget not found for provided scope: {scopes[-1]}"
                    )
                if evaluation.reason is not None:
                    raise _denial_error(evaluation.reason, evaluation.reason_scope)
                reservation = self._open_reservation(
                    tenant, request, subject, scopes, evaluation, now
                )
                body = {
                    "decision": "ALLOW_WITH_CAPS" if evaluation.caps else "ALLOW",
                    "reservation_id": reservation.reservation_id,
                    "reserved": dict(estimate),
                    "expires_at_ms": reservation.expires_at_ms,
                    "remaining_ttl_ms": max(0, reservation.expires_at_ms - now),
                    "scope_path": reservation.scope_path,
                    "affected_scopes": list(scopes),
                    "balances": [b.snapshot() for b in evaluation.budgets],
                }
                if evaluation.caps:
                    body["caps"] = copy.deepcopy(evaluation.caps)
                self._bind(slot, _Stored.of(payload_hash, 200, body), reservation)
                return self._sealed(_Outcome(200, body, applied=True))

    def decide(self, tenant: str, request: JsonObject, payload_hash: str) -> _Outcome:
        with self._lock:
            now = self._start(self._clock.now_ms())
            slot = (tenant, "decide", "", request["idempotency_key"])
            replay = self._replay(slot, payload_hash, now)
            if replay is not None:
                return replay
            closed = self._tenant_is_closed(tenant)
            scopes = _derive_scopes(_subject_for(request["subject"], tenant))
            with self._atomic():
                body = self._dry_run_body(closed, scopes, request["estimate"])
                decision: JsonObject = {"decision": body["decision"]}
                for name in ("caps", "reason_code", "affected_scopes"):
                    if name in body:
                        decision[name] = body[name]
                self._bind(slot, _Stored.of(payload_hash, 200, decision), None)
                return self._sealed(_Outcome(200, decision))

    def _dry_run_body(self, closed: bool, scopes: List[str], estimate: JsonObject) -> JsonObject:
        """A non-mutating evaluation: denials become 200 DENY with a reason_code."""
        body: JsonObject = {"decision": "DENY", "affected_scopes": list(scopes)}
        body["scope_path"] = scopes[-1]
        if closed:
            body["reason_code"] = "TENANT_CLOSED"
            return body
        evaluation = self._evaluate(scopes, estimate["unit"], estimate["amount"])
        if evaluation.budgets:
            body["balances"] = [b.snapshot() for b in evaluation.budgets]
        if evaluation.reason is not None:
            body["reason_code"] = evaluation.reason
            return body
        body["decision"] = "ALLOW_WITH_CAPS" if evaluation.caps else "ALLOW"
        body["reserved"] = dict(estimate)
        if evaluation.caps:
            body["caps"] = copy.deepcopy(evaluation.caps)
        return body

    def _evaluate(self, scopes: List[str], unit: str, amount: int) -> _Evaluation:
        """Reserve checks in order: unit, over-limit, frozen/closed, debt, remaining."""
        budgets = [self._budgets[(s, unit)] for s in scopes if (s, unit) in self._budgets]
        if not budgets:
            elsewhere = [s for s in scopes if self._units_by_scope.get(s)]
            if elsewhere:
                scope = elsewhere[-1]
                expected = sorted(self._units_by_scope[scope])
                raise ApiError(
                    400,
                    "UNIT_MISMATCH",
                    f"No budget in {unit} for scope {scope}; budgets exist in "
                    f"{', '.join(expected)}",
                    {"scope": scope, "requested_unit": unit, "expected_units": expected},
                )
            return _Evaluation([], "BUDGET_NOT_FOUND", scopes[-1])
        checks: List[Tuple[str, Callable[[_Budget], bool]]] = [
            ("OVERDRAFT_LIMIT_EXCEEDED", lambda b: b.is_over_limit),
            ("BUDGET_FROZEN", lambda b: b.status == "FROZEN"),
            ("BUDGET_CLOSED", lambda b: b.status == "CLOSED"),
            ("DEBT_OUTSTANDING", lambda b: b.debt > 0 and b.overdraft_limit == 0),
            ("BUDGET_EXCEEDED", lambda b: b.remaining < amount),
        ]
        for reason, failed in checks:
            for budget in budgets:
                if failed(budget):
                    return _Evaluation(budgets, reason, budget.scope)
        caps = next((b.caps for b in reversed(budgets) if b.caps), None)
        return _Evaluation(budgets, caps=caps)

    def _open_reservation(
        self,
        tenant: str,
        request: JsonObject,
        subject: JsonObject,
        scopes: List[str],
        evaluation: _Evaluation,
        now: int,
    ) -> _Reservation:
        policy = self._policy(tenant)
        ttl = min(int(request.get("ttl_ms", policy.default_ttl_ms)), policy.max_ttl_ms)
        amount = request["estimate"]["amount"]
        overage_policy = request.get("overage_policy") or _budget_policy(evaluation.budgets)
        self._touch(*evaluation.budgets)
        for budget in evaluation.budgets:
            budget.reserved += amount
            budget.remaining -= amount
        self._seq += 1
        reservation = _Reservation(
            reservation_id=str(uuid.uuid4()),
            seq=self._seq,
            tenant=tenant,
            subject=subject,
            action=copy.deepcopy(request["action"]),
            unit=request["estimate"]["unit"],
            amount=amount,
            overage_policy=str(overage_policy or policy.default_overage_policy),
            idempotency_key=request["idempotency_key"],
            metadata=copy.deepcopy(request.get("metadata")),
            grace_ms=int(request.get("grace_period_ms", policy.default_grace_ms)),
            created_at_ms=now,
            expires_at_ms=now + ttl,
            scope_path=scopes[-1],
            affected_scopes=list(scopes),
            budget_keys=[(b.scope, b.unit) for b in evaluation.budgets],
            max_extensions=policy.max_extensions,
        )
        self._reservations[reservation.reservation_id] = reservation
        rows = self._by_tenant.setdefault(tenant, _TenantRows())
        rows.add(reservation)
        self._on_undo(lambda: rows.remove(reservation))
        self._on_undo(lambda: self._reservations.pop(reservation.reservation_id, None))
        self._schedule_expiry(reservation)
        return reservation

    # -- commit / release / extend ---------------------------------------------

    def _open_reservation_call(
        self,
        caller: _Caller,
        operation: str,
        reservation_id: str,
        request: JsonObject,
        payload_hash: str,
        *,
        admin_allowed: bool,
    ) -> Tuple[int, _Reservation, _Slot, Optional[_Outcome]]:
        """The shared start of commit/release/extend, under the lock: expire what is due,
        find the reservation (404 before 403), then a same-key replay, which beats
        TENANT_CLOSED; otherwise the closed-tenant guard."""
        now = self._start(self._clock.now_ms())
        reservation = self._owned(caller, reservation_id, admin_allowed=admin_allowed)
        slot = (reservation.tenant, operation, reservation_id, request["idempotency_key"])
        replay = self._replay(slot, payload_hash, now)
        if replay is None:
            self._guard_mutation(reservation.tenant)
        return now, reservation, slot, replay

    def commit(
        self, caller: _Caller, reservation_id: str, request: JsonObject, payload_hash: str
    ) -> _Outcome:
        with self._lock:
            now, reservation, slot, replay = self._open_reservation_call(
                caller, "commit", reservation_id, request, payload_hash, admin_allowed=False
            )
            if replay is not None:
                return replay
            with self._atomic():
                self._require_settleable(reservation, now)
                actual = request["actual"]
                if actual["unit"] != reservation.unit:
                    raise ApiError(
                        400,
                        "UNIT_MISMATCH",
                        f"actual.unit {actual['unit']} does not match the reservation unit "
                        f"{reservation.unit}",
                    )
                held = reservation.amount
                if actual["amount"] > held and reservation.overage_policy == "REJECT":
                    raise ApiError(
                        409,
                        "BUDGET_EXCEEDED",
                        f"actual {actual['amount']} exceeds reserved {held} under REJECT",
                    )
                budgets = self._budgets_of(reservation)
                self._touch(reservation, *budgets)
                charged = _settle(budgets, held, actual["amount"], reservation.overage_policy)
                self._set_status(reservation, "COMMITTED")
                reservation.finalized_at_ms = now
                reservation.finalized_by = "api_key"
                reservation.committed = charged
                reservation.committed_metadata = copy.deepcopy(request.get("metadata"))
                body: JsonObject = {
                    "status": "COMMITTED",
                    "charged": {"unit": reservation.unit, "amount": charged},
                }
                if actual["amount"] < held:
                    body["released"] = {
                        "unit": reservation.unit, "amount": held - actual["amount"]
                    }
                body["balances"] = [b.snapshot() for b in budgets]
                self._bind(slot, _Stored.of(payload_hash, 200, body), reservation)
                return self._sealed(_Outcome(200, body, applied=True))

    def release(
        self, caller: _Caller, reservation_id: str, request: JsonObject, payload_hash: str
    ) -> _Outcome:
        with self._lock:
            now, reservation, slot, replay = self._open_reservation_call(
                caller, "release", reservation_id, request, payload_hash, admin_allowed=True
            )
            if replay is not None:
                return replay
            with self._atomic():
                self._require_settleable(reservation, now)
                budgets = self._budgets_of(reservation)
                self._touch(reservation, *budgets)
                for budget in budgets:
                    budget.reserved -= reservation.amount
                    budget.remaining += reservation.amount
                self._set_status(reservation, "RELEASED")
                reservation.finalized_at_ms = now
                # The spec's audit entry for admin releases lives on the admin
                # plane; locally it is recorded on the reservation.
                reservation.finalized_by = "admin_on_behalf_of" if caller.admin else "api_key"
                reservation.release_reason = request.get("reason")
                body = {
                    "status": "RELEASED",
                    "released": {"unit": reservation.unit, "amount": reservation.amount},
                    "balances": [b.snapshot() for b in budgets],
                }
                self._bind(slot, _Stored.of(payload_hash, 200, body), reservation)
                return self._sealed(_Outcome(200, body, applied=True))

    def extend(
        self, caller: _Caller, reservation_id: str, request: JsonObject, payload_hash: str
    ) -> _Outcome:
        with self._lock:
            now, reservation, slot, replay = self._open_reservation_call(
                caller, "extend", reservation_id, request, payload_hash, admin_allowed=False
            )
            if replay is not None:
                return replay
            self._require_active(reservation)
            if now > reservation.expires_at_ms:
                raise ApiError(
                    410,
                    "RESERVATION_EXPIRED",
                    f"Reservation {reservation_id} expired at {reservation.expires_at_ms} "
                    "(extend has no grace period)",
                )
            if reservation.extension_count >= reservation.max_extensions:
                raise ApiError(
                    409,
                    "MAX_EXTENSIONS_EXCEEDED",
                    f"Reservation {reservation_id} reached its limit of "
                    f"{reservation.max_extensions} extensions",
                )
            with self._atomic():
                self._touch(reservation)
                reservation.expires_at_ms += request["extend_by_ms"]
                reservation.extension_count += 1
                body = {
                    "status": "ACTIVE",
                    "expires_at_ms": reservation.expires_at_ms,
                    "remaining_ttl_ms": max(0, reservation.expires_at_ms - now),
                    "balances": [b.snapshot() for b in self._budgets_of(reservation)],
                }
                self._bind(slot, _Stored.of(payload_hash, 200, body), reservation)
            self._schedule_expiry(reservation)
            return _Outcome(200, body, applied=True)

    # -- createEvent -----------------------------------------------------------

    def event(self, tenant: str, request: JsonObject, payload_hash: str) -> _Outcome:
        with self._lock:
            now = self._start(self._clock.now_ms())
            slot = (tenant, "event", "", request["idempotency_key"])
            replay = self._replay(slot, payload_hash, now)
            if replay is not None:
                return replay
            self._guard_mutation(tenant)
            subject = _subject_for(request["subject"], tenant)
            scopes = _derive_scopes(subject)
            actual = request["actual"]
            budgets = self._event_budgets(scopes, actual["unit"])
            policy = (
                request.get("overage_policy")
                or _budget_policy(budgets)
                or self._policy(tenant).default_overage_policy
            )
            if policy == "REJECT":
                for budget in budgets:
                    if budget.remaining < actual["amount"]:
                        raise _denial_error("BUDGET_EXCEEDED", budget.scope)
            with self._atomic():
                self._touch(*budgets)
                charged = _settle(budgets, 0, actual["amount"], str(policy))
                event_id = "evt_" + uuid.uuid4().hex
                self._events[event_id] = {
                    "event_id": event_id,
                    "tenant": tenant,
                    "subject": subject,
                    "action": copy.deepcopy(request["action"]),
                    "actual": dict(actual),
                    "charged": {"unit": actual["unit"], "amount": charged},
                    "overage_policy": policy,
                    "metrics": copy.deepcopy(request.get("metrics")),
                    "metadata": copy.deepcopy(request.get("metadata")),
                    "client_time_ms": request.get("client_time_ms"),
                    "idempotency_key": request["idempotency_key"],
                    "scope_path": scopes[-1],
                    "affected_scopes": list(scopes),
                    "created_at_ms": now,
                }
                self._on_undo(lambda: self._events.pop(event_id, None))
                self._retain("event", event_id)
                body: JsonObject = {"status": "APPLIED", "event_id": event_id}
                if charged < actual["amount"]:
                    body["charged"] = {"unit": actual["unit"], "amount": charged}
                body["balances"] = [b.snapshot() for b in budgets]
                self._bind(slot, _Stored.of(payload_hash, 201, body), None)
                return _Outcome(201, body, applied=True)

    def _event_budgets(self, scopes: List[str], unit: str) -> List[_Budget]:
        budgets = [self._budgets[(s, unit)] for s in scopes if (s, unit) in self._budgets]
        if not budgets:
            evaluation = self._evaluate(scopes, unit, 0)  # raises UNIT_MISMATCH
            raise ApiError(
                404, "NOT_FOUND", f"Budget not found for provided scope: {evaluation.reason_scope}"
            )
        for budget in budgets:
            if budget.status in ("FROZEN", "CLOSED"):
                raise _denial_error("BUDGET_" + budget.status, budget.scope)
        return budgets

    # -- reads -----------------------------------------------------------------

    def get(self, caller: _Caller, reservation_id: str) -> _Outcome:
        with self._lock:
            self._start(self._clock.now_ms())
            reservation = self._owned(caller, reservation_id, admin_allowed=True)
            if reservation.status == "EXPIRED":
                raise ApiError(
                    410, "RESERVATION_EXPIRED", f"Reservation {reservation_id} has expired"
                )
            return _Outcome(200, reservation.view())

    def list(self, query: _ListQuery) -> Tuple[List[JsonObject], Optional[_SortKey]]:
        """One page of rows plus the sort key of the last row when more follow.

        In creation order (the default) a page costs O(page + log n); other
        orders sort the matching rows. Either way the shared lock is taken
        for at most _SCAN_CHUNK rows at a time, never for a whole scan.
        """
        with self._lock:
            self._start(self._clock.now_ms())
        in_creation_order = query.sort_by == "created_at_ms"
        after_seq = query.after[1] if query.after is not None and in_creation_order else None
        wanted = query.limit + 1 if in_creation_order else None
        found = self._scan(query, after_seq, query.descending, wanted, not in_creation_order)

        def key(record: _Record) -> _SortKey:
            reservation = _live(record)
            return (reservation.sort_value(query.sort_by), reservation.seq)

        if not in_creation_order:
            if query.after is not None:
                after = query.after
                found = [r for r in found if (key(r) < after if query.descending
                                              else key(r) > after)]
            found.sort(key=key, reverse=query.descending)
        page = found[: query.limit]
        with self._lock:
            views = [_live(r).view(query.include) for r in page]
        more = len(found) > query.limit
        return views, (key(page[-1]) if more else None)

    def _scan(
        self, query: _ListQuery, after_seq: Optional[int], descending: bool,
        wanted: Optional[int], thaw: bool,
    ) -> List[_Record]:
        """Matching rows in creation order, ``wanted`` of them or all, chunk by chunk.
        Retired rows are thawed only to test filters beyond status, or if ``thaw``."""
        found: List[_Record] = []
        by_status_only = not (query.idempotency_key or query.segments or query.windows)
        while wanted is None or len(found) < wanted:
            with self._lock:
                rows = self._by_tenant.get(query.tenant)
                if rows is None:
                    return found
                chunk = rows.window(query.status, after_seq, descending, _SCAN_CHUNK)
                for seq in chunk:
                    record = rows.rows[seq]
                    if by_status_only and not thaw:
                        found.append(record)
                        continue
                    reservation = _live(record)
                    if _matches(reservation, query):
                        found.append(reservation)
            if len(chunk) < _SCAN_CHUNK:
                break
            after_seq = chunk[-1]
        return found if wanted is None else found[:wanted]

    def balances(
        self, tenant: str, segments: List[str], limit: int, after: Optional[Tuple[str, str]]
    ) -> Tuple[List[JsonObject], Optional[Tuple[str, str]]]:
        """A page of the tenant's budgets in (scope, unit) order: O(page + log n)
        without segment filters."""
        import bisect

        with self._lock:
            self._start(self._clock.now_ms())
            keys = self._budget_keys_by_tenant.get(tenant.lower(), [])
            start = 0 if after is None else bisect.bisect_right(keys, after)
            found: List[_Budget] = []
            for index in range(start, len(keys)):
                budget = self._budgets[keys[index]]
                parts = budget.scope.split("/")
                if all(s in parts for s in segments):
                    found.append(budget)
                    if len(found) > limit:
                        break
            page = found[:limit]
            more = len(found) > limit
            last = (page[-1].scope, page[-1].unit) if more else None
            return [b.snapshot() for b in page], last

    # -- helpers (call with the lock held) ---------------------------------------

    def _budget(self, scope: str, unit: str) -> _Budget:
        key = (_parse_scope(scope), unit)
        if key not in self._budgets:
            raise KeyError(f"no budget for {key[0]} in {unit}")
        return self._budgets[key]

    def _budgets_of(self, reservation: _Reservation) -> List[_Budget]:
        return [self._budgets[key] for key in reservation.budget_keys]

    def _policy(self, tenant: str) -> _Policy:
        """The tenant's policy with server defaults filled in."""
        record = self._tenants.get(tenant)
        merged = copy.copy(self._defaults)
        for name in _POLICY_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                setattr(merged, name, value)
        return merged

    def _tenant_is_closed(self, tenant: str) -> bool:
        record = self._tenants.get(tenant)
        if record is None:
            return False
        if record.status == "MALFORMED":
            raise ApiError(
                500, "INTERNAL_ERROR", f"Tenant record for {tenant} is unreadable; failing closed"
            )
        return record.status == "CLOSED"

    def _guard_mutation(self, tenant: str) -> None:
        if self._tenant_is_closed(tenant):
            raise ApiError(409, "TENANT_CLOSED", f"Tenant {tenant} is closed")

    def _owned(self, caller: _Caller, reservation_id: str, admin_allowed: bool) -> _Reservation:
        """404 for an unknown id before 403 for another tenant's reservation."""
        record = self._reservations.get(reservation_id)
        if record is None:
            raise ApiError(404, "NOT_FOUND", f"Reservation {reservation_id} not found")
        reservation = _live(record)  # a transient copy if retired: only read
        if caller.admin and admin_allowed:
            return reservation
        if caller.tenant != reservation.tenant:
            raise ApiError(
                403, "FORBIDDEN", f"Reservation {reservation_id} belongs to another tenant"
            )
        return reservation

    def _require_active(self, reservation: _Reservation) -> None:
        if reservation.status == "EXPIRED":
            raise ApiError(
                410, "RESERVATION_EXPIRED", f"Reservation {reservation.reservation_id} has expired"
            )
        if reservation.status != "ACTIVE":
            raise ApiError(
                409,
                "RESERVATION_FINALIZED",
                f"Reservation {reservation.reservation_id} is already {reservation.status}",
            )

    def _require_settleable(self, reservation: _Reservation, now: int) -> None:
        self._require_active(reservation)
        if now > reservation.expires_at_ms + reservation.grace_ms:
            self._expire(reservation)
            self._require_active(reservation)

    def _replay(self, slot: _Slot, payload_hash: str, now: int) -> Optional[_Outcome]:
        found = self._idempotency.get(slot)
        if found is None and slot[2]:  # commit/release/extend of a retired reservation
            owner = self._reservations.get(slot[2])
            found = owner if isinstance(owner, _Retired) else None
        stored = found.thaw()[1].get(slot) if isinstance(found, _Retired) else found
        if stored is None:
            return None
        if stored.payload_hash != payload_hash:
            raise ApiError(
                409,
                "IDEMPOTENCY_MISMATCH",
                "idempotency_key was already used with a different request payload",
            )
        body = stored.body()
        if "remaining_ttl_ms" in body:
            operation, reservation_id = slot[1], slot[2]
            if operation == "create":
                reservation_id = str(body.get("reservation_id", ""))
            reservation = self._reservations.get(reservation_id)
            live = reservation is not None and reservation.status == "ACTIVE"
            body["remaining_ttl_ms"] = max(0, int(body["expires_at_ms"]) - now) if live else 0
        return _Outcome(stored.status, body)

    def _schedule_expiry(self, reservation: _Reservation) -> None:
        deadline = reservation.expires_at_ms + reservation.grace_ms
        heapq.heappush(self._expiry_heap, (deadline, reservation.seq, reservation.reservation_id))

    def _start(self, now: int) -> int:
        """What every operation does first: expire what is due, prune what is old."""
        self._sweep(now)
        self._retire_pending()
        self._prune(now)
        return now

    def _sweep(self, now: int) -> None:
        """Lazily expire reservations past expires_at_ms + grace; O(log n) each."""
        heap = self._expiry_heap
        while heap and heap[0][0] < now:
            _, _, reservation_id = heapq.heappop(heap)
            reservation = self._reservations.get(reservation_id)
            if not isinstance(reservation, _Reservation) or reservation.status != "ACTIVE":
                continue
            deadline = reservation.expires_at_ms + reservation.grace_ms
            if deadline < now:
                self._expire(reservation)
                self.changes += 1

    def _expire(self, reservation: _Reservation) -> None:
        budgets = self._budgets_of(reservation)
        self._touch(reservation, *budgets)
        for budget in budgets:
            budget.reserved -= reservation.amount
            budget.remaining += reservation.amount
        self._set_status(reservation, "EXPIRED")


def _dump_record(reservation: _Reservation) -> JsonObject:
    return dict(_record_fields(reservation), slots=list(reservation.slots))


def _slot(saved: Sequence[Any]) -> _Slot:
    tenant, operation, reservation_id, key = (str(part) for part in saved)
    return (tenant, operation, reservation_id, key)


def _restore(record: Any, saved: Dict[str, Any]) -> None:
    fields = vars(record)
    fields.clear()
    fields.update(saved)


def _budget_policy(budgets: List[_Budget]) -> Optional[str]:
    """The commit overage policy set on the deepest budget that has one (admin plane)."""
    return next((b.commit_overage_policy for b in reversed(budgets) if b.commit_overage_policy),
                None)


def _settle(budgets: List[_Budget], held: int, actual: int, policy: str) -> int:
    """Charge ``actual`` to budgets that hold ``held`` for it; returns the charge.

    A covered overage is charged in full. Otherwise ALLOW_IF_AVAILABLE caps
    the overage to the smallest non-negative remaining and flags the scopes
    that fell short as over-limit (never debt). ALLOW_WITH_OVERDRAFT turns
    the shortfall into debt on scopes with an overdraft_limit (409 if that
    would pass the limit) and treats scopes without one like
    ALLOW_IF_AVAILABLE. The caller has already handled REJECT.
    """
    overage = max(0, actual - held)
    if all(b.remaining >= overage for b in budgets):
        cappers: List[_Budget] = []
        debtors: List[_Budget] = []
    elif policy == "ALLOW_WITH_OVERDRAFT":
        cappers = [b for b in budgets if b.overdraft_limit == 0]
        debtors = [b for b in budgets if b.overdraft_limit > 0]
    else:
        cappers, debtors = list(budgets), []
    granted = min([overage] + [max(b.remaining, 0) for b in cappers])
    capper_ids = {id(b) for b in cappers}
    debtor_ids = {id(b) for b in debtors}
    for budget in debtors:
        shortfall = granted - max(budget.remaining, 0)
        if shortfall > 0 and budget.debt + shortfall > budget.overdraft_limit:
            raise _denial_error("OVERDRAFT_LIMIT_EXCEEDED", budget.scope)
    charged = min(actual, held) + granted
    for budget in budgets:
        funded = min(granted, max(budget.remaining, 0))
        if id(budget) in capper_ids and budget.remaining < overage:
            budget.is_over_limit = True
        budget.reserved -= held
        budget.spent += charged - granted + funded
        budget.debt += granted - funded
        budget.remaining += held - charged
        if id(budget) in debtor_ids and budget.debt > budget.overdraft_limit:
            budget.is_over_limit = True
    return charged


def _matches(reservation: _Reservation, query: _ListQuery) -> bool:
    if query.status is not None and reservation.status != query.status:
        return False
    if query.idempotency_key is not None and reservation.idempotency_key != query.idempotency_key:
        return False
    if query.segments:
        parts = reservation.scope_path.split("/")
        if not all(segment in parts for segment in query.segments):
            return False
    for attribute, low, high in query.windows:
        value: Optional[int] = getattr(reservation, attribute)
        if value is None:
            return False
        if (low is not None and value < low) or (high is not None and value > high):
            return False
    return True


def _subject_for(subject: JsonObject, tenant: str) -> JsonObject:
    """The stored subject: as sent, with the effective tenant filled in."""
    filled = copy.deepcopy(subject)
    filled.setdefault("tenant", tenant)
    return filled


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_amount(name: str, value: Any, minimum: int = 0) -> None:
    if not _is_int(value) or not minimum <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an integer between {minimum} and {INT64_MAX}")


def _apply_budget_fields(budget: _Budget, fields: Mapping[str, Any]) -> None:
    for name, value in fields.items():
        if name in ("allocated", "spent", "debt", "overdraft_limit"):
            _check_amount(name, value)
        elif name == "status":
            _check_choice(name, value, BUDGET_STATUSES)
        elif name == "is_over_limit":
            if not isinstance(value, bool):
                raise ValueError("is_over_limit must be a boolean")
        elif name == "caps":
            if value is not None:
                try:
                    _CAPS(value, "caps")
                except _SchemaError as exc:
                    raise ValueError(str(exc)) from None
                value = copy.deepcopy(value)
        else:
            raise ValueError(f"unknown budget field {name!r}")
        setattr(budget, name, value)


# =============================================================================
# Request handling per endpoint
# =============================================================================


@dataclass(repr=False)  # its headers hold the API key: never print them
class _Request:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    raw_body: bytes
    request_id: str
    trace_id: str
    target: str = ""


@dataclass
class _Response:
    status: int
    body: Optional[JsonObject] = None
    raw: Optional[bytes] = None
    content_type: str = "application/json"
    headers: List[Tuple[str, str]] = field(default_factory=list)
    tenant: Optional[str] = None
    applied: bool = False

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.body is None:
            return b""
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


@dataclass
class _Route:
    operation: str
    allowed_methods: Tuple[str, ...]
    reservation_id: Optional[str] = None
    evidence_id: Optional[str] = None
    admin_operation: Optional[str] = None  # the admin spec's operationId
    item_id: Optional[str] = None  # {tenant_id} or {key_id} on admin item paths


_RESERVATION_PATH_RE = re.compile(r"/v1/reservations/([^/]+)(?:/(commit|release|extend))?")
_EVIDENCE_PATH_RE = re.compile(r"/v1/evidence/([^/]+)")
_FIXED_ROUTES = {
    "/v1/reservations": ("create", ("POST",), "list", ("GET",)),
    "/v1/decide": ("decide", ("POST",), "", ()),
    "/v1/events": ("event", ("POST",), "", ()),
    "/v1/balances": ("", (), "balances", ("GET",)),
    "/v1/.well-known/cycles-jwks.json": ("", (), "jwks", ("GET",)),
    "/actuator/health": ("", (), "health", ("GET",)),
}


def _resolve_admin_route(method: str, path: str) -> Optional[_Route]:
    methods = _ADMIN_ROUTES.get(path)
    item_id = None
    if methods is None:
        for pattern, item_methods in _ADMIN_ITEM_ROUTES:
            match = pattern.fullmatch(path)
            if match:
                methods, item_id = item_methods, unquote(match.group(1))
                break
    if methods is None:
        return None
    allowed = tuple(methods)
    if method not in methods:
        return _Route("unknown", allowed)
    return _Route("admin", allowed, admin_operation=methods[method], item_id=item_id)


def _resolve_route(method: str, path: str) -> Optional[_Route]:
    """The route for a path; operation "unknown" if the method does not fit."""
    if path.startswith("/v1/admin/"):
        return _resolve_admin_route(method, path)
    fixed = _FIXED_ROUTES.get(path)
    if fixed is not None:
        post_op, post_methods, get_op, get_methods = fixed
        allowed = post_methods + get_methods
        if method in post_methods:
            return _Route(post_op, allowed)
        if method in get_methods:
            return _Route(get_op, allowed)
        return _Route("unknown", allowed)
    match = _RESERVATION_PATH_RE.fullmatch(path)
    if match:
        reservation_id = unquote(match.group(1))
        action = match.group(2)
        methods = ("GET",) if action is None else ("POST",)
        operation = (action or "get") if method in methods else "unknown"
        return _Route(operation, methods, reservation_id=reservation_id)
    match = _EVIDENCE_PATH_RE.fullmatch(path)
    if match:
        operation = "evidence" if method == "GET" else "unknown"
        return _Route(operation, ("GET",), evidence_id=unquote(match.group(1)))
    return None


def _error_response(
    status: int,
    code: str,
    message: str,
    request: _Request,
    details: Optional[JsonObject] = None,
    tenant: Optional[str] = None,
) -> _Response:
    body: JsonObject = {
        "error": code,
        "message": message,
        "request_id": request.request_id,
        "trace_id": request.trace_id,
    }
    if details:
        body["details"] = details
    return _Response(status, body, tenant=tenant)


_LIST_WINDOWS = (
    ("from", "to", "created_at_ms"),
    ("expires_from", "expires_to", "expires_at_ms"),
    ("finalized_from", "finalized_to", "finalized_at_ms"),
)
_SORT_FIELDS = (
    "reservation_id", "tenant", "scope_path", "status", "reserved",
    "created_at_ms", "expires_at_ms",
)
_INCLUDE_TOKENS = ("metadata", "committed_metadata", "evidence")


class _Api:
    """Authenticates, validates and maps each endpoint onto the ledger."""

    def __init__(self, ledger: _Ledger, evidence: Optional[_EvidenceLog] = None) -> None:
        self._ledger = ledger
        self._admin = _AdminPlane(ledger)
        self._evidence_log = evidence

    def handle(self, route: _Route, request: _Request) -> _Response:
        caller: Optional[_Caller] = None
        try:
            if route.operation == "unknown":
                allow = ", ".join(route.allowed_methods)
                response = _error_response(
                    405, "INVALID_REQUEST", f"{request.method} is not allowed on {request.path}",
                    request,
                )
                response.headers.append(("Allow", allow))
                return response
            if route.operation in ("evidence", "jwks"):
                return self._evidence(route, request)
            if route.operation == "health":
                return _Response(200, {"status": "UP"})
            if route.operation == "admin":
                operation = str(route.admin_operation)
                caller = self._authenticate_admin(operation, request)
                outcome = self._admin.handle(operation, route.item_id, request, caller)
            else:
                caller = self._authenticate(route.operation, request)
                outcome = self._dispatch(route, request, caller)
                if self._evidence_log is not None and route.operation == "get":
                    self._evidence_log.attach_refs([outcome.body])
            return _Response(
                outcome.status, outcome.body, tenant=caller.tenant, applied=outcome.applied
            )
        except ApiError as error:
            response = _error_response(
                error.status, error.code, error.message, request, error.details,
                tenant=caller.tenant if caller else None,
            )
            if self._evidence_log is not None and response.body is not None:
                self._evidence_log.record_denial(
                    route.operation, request, route, response.status, response.body
                )
            return response

    def _authenticate(self, operation: str, request: _Request) -> _Caller:
        api_key = request.headers.get("x-cycles-api-key")
        if api_key:
            tenant = self._ledger.tenant_for_key(api_key)
            if tenant is None:
                raise ApiError(401, "UNAUTHORIZED", "Invalid API key")
            return _Caller(tenant)
        admin_key = request.headers.get("x-admin-api-key")
        if admin_key and operation in ("list", "get", "release"):
            if not self._ledger.is_admin_key(admin_key):
                raise ApiError(401, "UNAUTHORIZED", "Invalid admin API key")
            return _Caller(None, admin=True)
        raise ApiError(401, "UNAUTHORIZED", "Missing X-Cycles-API-Key header")

    def _authenticate_admin(self, operation: str, request: _Request) -> _Caller:
        """X-Admin-API-Key; on the spec's dual-auth operations an API key too (it wins)."""
        api_key = request.headers.get("x-cycles-api-key")
        if api_key and operation in _DUAL_AUTH:
            tenant = self._ledger.tenant_for_key(api_key)
            if tenant is None:
                raise ApiError(401, "UNAUTHORIZED", "Invalid API key")
            return _Caller(tenant)
        admin_key = request.headers.get("x-admin-api-key")
        if not admin_key:
            raise ApiError(401, "UNAUTHORIZED", "Missing X-Admin-API-Key header")
        if not self._ledger.is_admin_key(admin_key):
            raise ApiError(401, "UNAUTHORIZED", "Invalid admin API key")
        return _Caller(None, admin=True)

    def _dispatch(self, route: _Route, request: _Request, caller: _Caller) -> _Outcome:
        operation = route.operation
        if operation == "list":
            return self._list(request, caller)
        if operation == "balances":
            return self._balances(request, caller)
        reservation_id = route.reservation_id or ""
        if route.reservation_id is not None and not 1 <= len(reservation_id) <= 128:
            raise _invalid("reservation_id must be 1 to 128 characters long")
        if operation == "get":
            return self._ledger.get(caller, reservation_id)
        schema = {
            "create": _CREATE_REQUEST,
            "decide": _DECIDE_REQUEST,
            "commit": _COMMIT_REQUEST,
            "release": _RELEASE_REQUEST,
            "extend": _EXTEND_REQUEST,
            "event": _EVENT_REQUEST,
        }[operation]
        body = _validated_body(request, schema)
        digest = _payload_hash(body)
        if operation in ("create", "decide", "event"):
            _check_subject_tenant(body["subject"], str(caller.tenant))
        apply = functools.partial(self._apply, operation, caller, reservation_id, body, digest)
        evidence = self._evidence_log
        if evidence is None or operation not in _ARTIFACT_OF:
            return apply()
        sealed: List[_Outcome] = []

        def seal(outcome: _Outcome) -> None:
            evidence.record_success(operation, request, caller, route, outcome.body)
            sealed.append(outcome)

        # The envelope is signed inside the ledger change: if signing fails, so does it.
        with self._ledger.sealing(seal):
            outcome = apply()
        if not sealed:  # a replay: nothing changed, so nothing to undo if signing fails
            seal(outcome)
        return outcome

    def _apply(self, operation: str, caller: _Caller, reservation_id: str, body: JsonObject,
               digest: str) -> _Outcome:
        ledger = self._ledger
        if operation == "create":
            return ledger.create(str(caller.tenant), body, digest)
        if operation == "decide":
            return ledger.decide(str(caller.tenant), body, digest)
        if operation == "event":
            return ledger.event(str(caller.tenant), body, digest)
        if operation == "commit":
            return ledger.commit(caller, reservation_id, body, digest)
        if operation == "release":
            return ledger.release(caller, reservation_id, body, digest)
        return ledger.extend(caller, reservation_id, body, digest)

    def _evidence(self, route: _Route, request: _Request) -> _Response:
        evidence = self._evidence_log
        if route.operation == "evidence":
            if not _EVIDENCE_ID_RE.fullmatch(route.evidence_id or ""):
                raise _invalid("evidence_id must be 64 lowercase hex characters")
            envelope = evidence.envelope(route.evidence_id or "") if evidence else None
            if envelope is not None:
                headers = [("Cache-Control", "public, immutable")]
                return _Response(200, raw=envelope, headers=headers)
            message = "Evidence not found" if evidence else (
                "Evidence not found: this server does not emit CyclesEvidence"
            )
        elif evidence is not None:
            headers = [("Cache-Control", "public, max-age=60")]
            return _Response(200, evidence.jwks(), headers=headers)
        else:
            message = "This server does not publish a CyclesEvidence JWK Set"
        return _error_response(404, "NOT_FOUND", message, request)

    def _list(self, request: _Request, caller: _Caller) -> _Outcome:
        params = _QueryParams(request.query)
        tenant = _resolve_tenant_filter(params, caller, list_endpoint=True)
        status = params.optional("status")
        if status is not None and status not in RESERVATION_STATUSES:
            raise _invalid(f"status must be one of {', '.join(RESERVATION_STATUSES)}")
        key = params.optional("idempotency_key")
        if key is not None and len(key) > 256:
            raise _invalid("idempotency_key must be 1 to 256 characters long")
        windows = []
        for low_name, high_name, attribute in _LIST_WINDOWS:
            low, high = params.datetime_ms(low_name), params.datetime_ms(high_name)
            if low is not None and high is not None and low > high:
                raise _invalid(f"{low_name} must not be after {high_name}")
            if low is not None or high is not None:
                windows.append((attribute, low, high))
        sort_by = params.optional("sort_by") or "created_at_ms"
        if sort_by not in _SORT_FIELDS:
            raise _invalid(f"sort_by must be one of {', '.join(_SORT_FIELDS)}")
        sort_dir = params.optional("sort_dir") or "desc"
        if sort_dir not in ("asc", "desc"):
            raise _invalid("sort_dir must be asc or desc")
        include = {token.strip() for value in request.query.get("include", [])
                   for token in value.split(",")} & set(_INCLUDE_TOKENS)
        segments = _segment_filters(params)
        binding = _payload_hash(
            [tenant, status, key, segments, windows, sort_by, sort_dir]
        )
        cursor = params.cursor(binding)
        after: Optional[Tuple[Union[str, int], int]] = None
        if cursor is not None:
            value, seq = cursor
            numeric = sort_by in ("reserved", "created_at_ms", "expires_at_ms")
            value_ok = _is_int(value) if numeric else isinstance(value, str)
            if not value_ok or not _is_int(seq):
                raise _invalid("cursor is not valid for this sort")
            after = (value, seq)
        query = _ListQuery(
            tenant=tenant,
            status=status,
            idempotency_key=key,
            segments=segments,
            windows=windows,
            sort_by=sort_by,
            descending=sort_dir == "desc",
            limit=params.limit(),
            after=after,
            include=include,
        )
        rows, last = self._ledger.list(query)
        if "evidence" in include and self._evidence_log is not None:
            self._evidence_log.attach_refs(rows)
        body: JsonObject = {"reservations": rows, "has_more": last is not None}
        if last is not None:
            body["next_cursor"] = _encode_cursor(binding, list(last))
        return _Outcome(200, body)

    def _balances(self, request: _Request, caller: _Caller) -> _Outcome:
        params = _QueryParams(request.query)
        if not any(params.optional(level) for level in SUBJECT_LEVELS):
            raise _invalid(
                "at least one of tenant, workspace, app, workflow, agent, toolset is required"
            )
        tenant = _resolve_tenant_filter(params, caller, list_endpoint=False)
        segments = _segment_filters(params)
        binding = _payload_hash([tenant, segments])
        cursor = params.cursor(binding)
        after: Optional[Tuple[str, str]] = None
        if cursor is not None:
            if not all(isinstance(part, str) for part in cursor):
                raise _invalid("cursor is not valid for this query")
            after = (str(cursor[0]), str(cursor[1]))
        rows, last = self._ledger.balances(tenant, segments, params.limit(), after)
        body: JsonObject = {"balances": rows, "has_more": last is not None}
        if last is not None:
            body["next_cursor"] = _encode_cursor(binding, list(last))
        return _Outcome(200, body)


class _QueryParams:
    """Query-string access; blank values count as unset."""

    def __init__(self, query: Mapping[str, List[str]]) -> None:
        self._query = query

    def optional(self, name: str) -> Optional[str]:
        values = self._query.get(name)
        if not values or values[0] == "":
            return None
        return values[0]

    def datetime_ms(self, name: str) -> Optional[int]:
        text = self.optional(name)
        if text is None:
            return None
        try:
            return _parse_datetime_ms(text)
        except ValueError:
            raise _invalid(f"{name} must be an ISO-8601 date-time with an offset") from None

    def limit(self) -> int:
        text = self.optional("limit")
        if text is None:
            return LIST_DEFAULT_LIMIT
        if not _LIMIT_RE.fullmatch(text) or not 1 <= int(text) <= LIST_MAX_LIMIT:
            raise _invalid(f"limit must be an integer between 1 and {LIST_MAX_LIMIT}")
        return int(text)

    def cursor(self, binding: str) -> Optional[List[Any]]:
        text = self.optional("cursor")
        if text is None:
            return None
        try:
            decoded = _parse_json(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except ValueError:
            raise _invalid("cursor is malformed") from None
        if (
            not isinstance(decoded, dict)
            or not isinstance(decoded.get("k"), list)
            or len(decoded["k"]) != 2
        ):
            raise _invalid("cursor is malformed")
        if decoded.get("b") != binding:
            raise _invalid("cursor does not match this query's filters, windows or sort")
        key: List[Any] = decoded["k"]
        return key


def _encode_cursor(binding: str, key: List[Any]) -> str:
    raw = json.dumps({"b": binding, "k": key}, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _resolve_tenant_filter(params: _QueryParams, caller: _Caller, list_endpoint: bool) -> str:
    """The tenant whose data is read: a check under ApiKeyAuth, a filter for admins."""
    requested = params.optional("tenant")
    if caller.admin:
        if requested is None:
            raise _invalid("tenant query parameter is required when using admin key authentication")
        return requested
    tenant = str(caller.tenant)
    if requested is not None and requested != tenant:
        what = "reservations" if list_endpoint else "balances"
        raise ApiError(403, "FORBIDDEN", f"Cannot read another tenant's {what}")
    return tenant


def _segment_filters(params: _QueryParams) -> List[str]:
    segments = []
    for level in SUBJECT_LEVELS[1:]:
        value = params.optional(level)
        if value is not None:
            segments.append(f"{level}:{value.lower()}")
    return segments


def _validated_body(
    request: _Request, schema: _Check, idempotency_header: bool = True
) -> JsonObject:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise _invalid("Content-Type must be application/json")
    if not request.raw_body:
        raise _invalid("request body is required")
    try:
        body = _parse_json(request.raw_body)
    except (_TooDeep, _Unrepresentable) as exc:
        raise _invalid(f"request body: {exc}") from None
    except ValueError:
        raise _invalid("request body is not valid JSON") from None
    try:
        schema(body, "")
    except _SchemaError as exc:
        raise _invalid(str(exc)) from None
    header_key = request.headers.get("x-idempotency-key") if idempotency_header else None
    if header_key is not None and header_key != body["idempotency_key"]:
        raise _invalid("X-Idempotency-Key header does not match idempotency_key in request body")
    result: JsonObject = body
    return result


def _check_subject_tenant(subject: JsonObject, tenant: str) -> None:
    requested = subject.get("tenant")
    if requested is not None and requested != tenant:
        raise ApiError(
            403, "FORBIDDEN", f"subject.tenant {requested!r} does not match the API key's tenant"
        )


# =============================================================================
# Admin API: the provisioning subset of cycles-governance-admin-v0.1.25
# =============================================================================

# operationId per (path, method); the dual-auth ones also take X-Cycles-API-Key.
_ADMIN_ROUTES: Dict[str, Dict[str, str]] = {
    "/v1/admin/tenants": {"POST": "createTenant", "GET": "listTenants"},
    "/v1/admin/budgets": {"POST": "createBudget", "GET": "listBudgets"},
    "/v1/admin/budgets/lookup": {"GET": "lookupBudget"},
    "/v1/admin/budgets/fund": {"POST": "fundBudget"},
    "/v1/admin/budgets/freeze": {"POST": "freezeBudget"},
    "/v1/admin/budgets/unfreeze": {"POST": "unfreezeBudget"},
    "/v1/admin/api-keys": {"POST": "createApiKey", "GET": "listApiKeys"},
}
_ADMIN_ITEM_ROUTES = (
    (re.compile(r"/v1/admin/tenants/([^/]+)"), {"GET": "getTenant"}),
    (re.compile(r"/v1/admin/api-keys/([^/]+)"), {"DELETE": "revokeApiKey"}),
)
_DUAL_AUTH = frozenset({"createBudget", "listBudgets", "lookupBudget", "fundBudget"})
_ADMIN_LIST_MAX = 100
_KEY_LIFETIME_MS = 90 * 86_400_000  # the spec's recommended expiry when none is given
_PERMISSIONS = (
    *_DEFAULT_PERMISSIONS,
    "webhooks:read", "webhooks:write", "events:read", "admin:read", "admin:write",
    "admin:tenants:read", "admin:tenants:write", "admin:budgets:read", "admin:budgets:write",
    "admin:policies:read", "admin:policies:write", "admin:apikeys:read",
    "admin:apikeys:write", "admin:webhooks:read", "admin:webhooks:write",
    "admin:events:read", "admin:audit:read",
)
_FUND_OPERATIONS = ("CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT")
_TENANT_ID = _string(64, 3, re.compile(r"[a-z0-9-]+"))
_TTL_MS = _integer(*_TTL_RANGE)


def _datetime() -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _SchemaError(f"{path} must be a date-time string")
        try:
            _parse_datetime_ms(value)
        except ValueError:
            raise _SchemaError(f"{path} must be an ISO-8601 date-time with an offset") from None

    return check


_TENANT_CREATE = _object(
    {
        "tenant_id": _TENANT_ID,
        "name": _string(256),
        "parent_tenant_id": _string(256),
        "metadata": _string_map(4096, 32),
        "default_commit_overage_policy": _one_of(OVERAGE_POLICIES),
        "default_reservation_ttl_ms": _TTL_MS,
        "max_reservation_ttl_ms": _TTL_MS,
        "max_reservation_extensions": _integer(),
        "reservation_expiry_policy": _one_of(("AUTO_RELEASE", "MANUAL_CLEANUP", "GRACE_ONLY")),
    },
    ("tenant_id", "name"),
)
_BUDGET_CREATE = _object(
    {
        "tenant_id": _string(256),
        "scope": _string(1024, 1),
        "unit": _one_of(UNITS),
        "allocated": _AMOUNT,
        "overdraft_limit": _AMOUNT,
        "commit_overage_policy": _one_of(OVERAGE_POLICIES),
        "rollover_policy": _one_of(("NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED")),
        "period_start": _datetime(),
        "period_end": _datetime(),
        "metadata": _any_object(),
    },
    ("scope", "unit", "allocated"),
)
_STATUS_TRANSITION = _object({"reason": _string(512), "metadata": _any_object()})
_FUNDING = _object(
    {
        "operation": _one_of(_FUND_OPERATIONS),
        "amount": _AMOUNT,
        "spent": _AMOUNT,
        "reason": _string(512),
        "idempotency_key": _IDEMPOTENCY_KEY,
        "metadata": _any_object(),
    },
    ("operation", "amount"),
)
_KEY_CREATE = _object(
    {
        "tenant_id": _string(256),
        "name": _string(256),
        "description": _string(1024),
        "permissions": _array(_one_of(_PERMISSIONS)),
        "scope_filter": _array(_string(1024)),
        "expires_at": _datetime(),
        "metadata": _any_object(),
    },
    ("tenant_id", "name"),
)


def _iso(ms: int) -> str:
    import datetime as dt

    moment = dt.datetime.fromtimestamp(ms / 1000.0, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _money(unit: str, value: int) -> JsonObject:
    return {"unit": unit, "amount": value}


def _ledger_view(budget: _Budget) -> JsonObject:
    """A BudgetLedger (admin plane): every amount, explicit zeros included."""
    unit = budget.unit
    view: JsonObject = {
        "ledger_id": "ldg_" + _secret_hash(budget.scope + "|" + unit)[:16],
        "tenant_id": budget.tenant_segment.split(":", 1)[1],
        "scope": budget.scope,
        "scope_path": budget.scope,
        "unit": unit,
        "allocated": _money(unit, budget.allocated),
        "remaining": _money(unit, budget.remaining),
        "reserved": _money(unit, budget.reserved),
        "spent": _money(unit, budget.spent),
        "debt": _money(unit, budget.debt),
        "overdraft_limit": _money(unit, budget.overdraft_limit),
        "is_over_limit": budget.is_over_limit,
        "status": budget.status,
        "created_at": _iso(budget.created_at_ms),
        "updated_at": _iso(budget.updated_at_ms or budget.created_at_ms),
    }
    if budget.commit_overage_policy:
        view["commit_overage_policy"] = budget.commit_overage_policy
    for name in ("rollover_policy", "period_start", "period_end"):
        value = (budget.metadata or {}).get("__" + name)
        if value is not None:
            view[name] = value
    return view


def _key_view(record: _ApiKey, now: int) -> JsonObject:
    status = record.status
    if status == "ACTIVE" and not record.is_usable(now):
        status = "EXPIRED"
    view: JsonObject = {
        "key_id": record.key_id,
        "tenant_id": record.tenant_id,
        "key_prefix": record.key_prefix,
        "name": record.name,
        "permissions": list(record.permissions),
        "status": status,
        "created_at": _iso(record.created_at_ms),
        "expires_at": _iso(record.expires_at_ms or record.created_at_ms + _KEY_LIFETIME_MS),
    }
    optional = {
        "description": record.description,
        "scope_filter": record.scope_filter,
        "revoked_at": _iso(record.revoked_at_ms) if record.revoked_at_ms else None,
        "revoked_reason": record.revoked_reason,
        "metadata": record.metadata,
    }
    view.update({k: copy.deepcopy(v) for k, v in optional.items() if v is not None})
    return view


def _not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


class _AdminPlane:
    """The governance-admin operations a developer needs to provision and top up
    a local server at runtime. Runs on the ledger's lock and undo journal."""

    def __init__(self, ledger: _Ledger) -> None:
        self._ledger = ledger

    def handle(self, operation: str, item_id: Optional[str], request: _Request,
               caller: _Caller) -> _Outcome:
        handler: Callable[[_Request, _Caller, Optional[str]], _Outcome] = getattr(
            self, "_" + operation
        )
        return handler(request, caller, item_id)

    # -- tenants ---------------------------------------------------------------

    def _createTenant(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        body = _validated_admin_body(request, _TENANT_CREATE)
        ledger = self._ledger
        with ledger._lock, ledger._atomic():
            existing = ledger._tenants.get(body["tenant_id"])
            if existing is not None:
                if existing.display_name not in (None, body["name"]):
                    raise ApiError(409, "DUPLICATE_RESOURCE",
                                   f"Tenant {body['tenant_id']} exists with another name")
                ledger._touch(existing)
                existing.display_name = body["name"]
                return _Outcome(200, self._tenant_view(existing))
            parent = body.get("parent_tenant_id")
            if parent is not None and parent not in ledger._tenants:
                raise ApiError(400, "TENANT_NOT_FOUND", f"parent_tenant_id: Tenant {parent} "
                                                        "not found")
            tenant = _Tenant(name=body["tenant_id"], created_at_ms=ledger._clock.now_ms(),
                             display_name=body["name"])
            for wire, attribute in _TENANT_FIELDS:
                if wire in body:
                    setattr(tenant, attribute, copy.deepcopy(body[wire]))
            ledger._tenants[tenant.name] = tenant
            ledger._on_undo(lambda: ledger._tenants.pop(tenant.name, None))
            return _Outcome(201, self._tenant_view(tenant), applied=True)

    def _getTenant(self, request: _Request, caller: _Caller, tenant_id: Optional[str]) -> _Outcome:
        with self._ledger._lock:
            tenant = self._ledger._tenants.get(str(tenant_id))
            if tenant is None:
                raise _not_found("TENANT_NOT_FOUND", f"Tenant {tenant_id} not found")
            return _Outcome(200, self._tenant_view(tenant))

    def _listTenants(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        params = _QueryParams(request.query)
        status = _enum_param(params, "status", ("ACTIVE", "SUSPENDED", "CLOSED"))
        parent = params.optional("parent_tenant_id")
        search = _search_param(params)
        with self._ledger._lock:
            views = [self._tenant_view(t) for t in self._ledger._tenants.values()
                     if t.status != "MALFORMED"]
        rows = [v for v in views
                if (status is None or v["status"] == status)
                and (parent is None or v.get("parent_tenant_id") == parent)
                and _search_hit(search, v["tenant_id"], v["name"])]
        return _admin_page(request, "tenants", rows, ("tenant_id", "name", "status", "created_at"),
                           "created_at", "tenant_id")

    def _tenant_view(self, tenant: _Tenant) -> JsonObject:
        if tenant.status == "MALFORMED":
            raise ApiError(500, "INTERNAL_ERROR", f"Tenant record for {tenant.name} is unreadable")
        policy = self._ledger._policy(tenant.name)
        view: JsonObject = {
            "tenant_id": tenant.name,
            "name": tenant.display_name or tenant.name,
            "status": tenant.status,
            "default_commit_overage_policy": policy.default_overage_policy,
            "default_reservation_ttl_ms": policy.default_ttl_ms,
            "max_reservation_ttl_ms": policy.max_ttl_ms,
            "max_reservation_extensions": policy.max_extensions,
            "reservation_expiry_policy": tenant.reservation_expiry_policy or "AUTO_RELEASE",
            "created_at": _iso(tenant.created_at_ms),
        }
        if tenant.parent_tenant_id:
            view["parent_tenant_id"] = tenant.parent_tenant_id
        if tenant.metadata:
            view["metadata"] = dict(tenant.metadata)
        return view

    # -- budgets ---------------------------------------------------------------

    def _createBudget(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        body = _validated_admin_body(request, _BUDGET_CREATE)
        if caller.admin:
            if "tenant_id" not in body:
                raise _invalid("tenant_id is required when using admin key authentication")
            tenant = str(body["tenant_id"])
        elif "tenant_id" in body:
            raise _invalid("tenant_id must not be sent with an API key: it is the key's tenant")
        else:
            tenant = str(caller.tenant)
        try:
            scope = _parse_scope(body["scope"])
        except ValueError as error:
            raise _invalid(str(error)) from None
        if scope.split("/", 1)[0] != "tenant:" + tenant.lower():
            if not caller.admin:
                raise ApiError(403, "FORBIDDEN", f"scope {scope} is outside tenant {tenant}")
            raise _invalid(f"scope {scope} does not belong to tenant_id {tenant}")
        unit = body["unit"]
        for name in ("allocated", "overdraft_limit"):
            if name in body and body[name]["unit"] != unit:
                raise ApiError(400, "UNIT_MISMATCH", f"{name}.unit must be {unit}")
        ledger = self._ledger
        with ledger._lock, ledger._atomic():
            self._require_open_tenant(tenant)
            if (scope, unit) in ledger._budgets:
                raise ApiError(409, "DUPLICATE_RESOURCE", f"Budget {scope} {unit} already exists")
            extras = {f"__{k}": body[k] for k in ("rollover_policy", "period_start", "period_end")
                      if k in body}
            ledger.add_budget(
                scope, unit, body["allocated"]["amount"],
                overdraft_limit=body.get("overdraft_limit", {"amount": 0})["amount"],
            )
            ledger._on_undo(lambda: self._drop_budget(scope, unit))
            budget = ledger._budgets[(scope, unit)]
            budget.commit_overage_policy = body.get("commit_overage_policy")
            budget.metadata = dict(copy.deepcopy(body.get("metadata") or {}), **extras) or None
            return _Outcome(201, _ledger_view(budget), applied=True)

    def _drop_budget(self, scope: str, unit: str) -> None:
        ledger = self._ledger
        ledger._budgets.pop((scope, unit), None)
        tenant = scope.split("/", 1)[0].split(":", 1)[1]
        _sorted_remove(ledger._budget_keys_by_tenant.get(tenant, []), (scope, unit))
        ledger._units_by_scope.get(scope, set()).discard(unit)

    def _require_open_tenant(self, tenant: str) -> None:
        record = self._ledger._tenants.get(tenant)
        if record is None:
            raise ApiError(400, "TENANT_NOT_FOUND", f"Tenant {tenant} not found")
        self._ledger._guard_mutation(tenant)
        if record.status != "ACTIVE":  # the spec: "Tenant must exist and be ACTIVE" (400)
            raise ApiError(400, "TENANT_SUSPENDED", f"Tenant {tenant} is {record.status}")

    def _listBudgets(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        params = _QueryParams(request.query)
        tenant = params.optional("tenant_id") if caller.admin else caller.tenant
        prefix = params.optional("scope_prefix")
        unit = _enum_param(params, "unit", UNITS)
        status = _enum_param(params, "status", BUDGET_STATUSES)
        over_limit = _bool_param(params, "over_limit")
        has_debt = _bool_param(params, "has_debt")
        low = _fraction_param(params, "utilization_min")
        high = _fraction_param(params, "utilization_max")
        if low is not None and high is not None and low > high:
            raise _invalid("utilization_min must not be greater than utilization_max")
        search = _search_param(params)
        ledger = self._ledger
        with ledger._lock:
            if tenant is None:
                keys = [key for keys in ledger._budget_keys_by_tenant.values() for key in keys]
            else:
                keys = list(ledger._budget_keys_by_tenant.get(tenant.lower(), []))
            budgets = [ledger._budgets[key] for key in keys]
            rows = []
            for budget in budgets:
                used = budget.spent / budget.allocated if budget.allocated else 0.0
                if ((prefix is None or budget.scope.startswith(prefix.lower()))
                        and unit in (None, budget.unit) and status in (None, budget.status)
                        and over_limit in (None, budget.is_over_limit)
                        and has_debt in (None, budget.debt > 0)
                        and (low is None or used >= low) and (high is None or used <= high)
                        and _search_hit(search, budget.scope)):
                    view = _ledger_view(budget)
                    view["utilization"] = used
                    view["debt_amount"] = budget.debt
                    rows.append(view)
        sorts = ("tenant_id", "scope", "unit", "status", "commit_overage_policy", "utilization",
                 "debt")
        outcome = _admin_page(request, "ledgers", rows, sorts, None, "scope")
        for row in outcome.body["ledgers"]:
            row.pop("utilization")
            row.pop("debt_amount")
        return outcome

    def _lookupBudget(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        with self._ledger._lock:
            budget = self._addressed_budget(request, caller)
            return _Outcome(200, _ledger_view(budget))

    def _addressed_budget(self, request: _Request, caller: _Caller) -> _Budget:
        """The budget named by ?scope=&unit= (404 if none, 403 if another tenant's)."""
        params = _QueryParams(request.query)
        text, unit = params.optional("scope"), _enum_param(params, "unit", UNITS)
        if text is None or unit is None:
            raise _invalid("scope and unit query parameters are required")
        try:
            scope = _parse_scope(text)
        except ValueError as error:
            raise _invalid(str(error)) from None
        if not caller.admin and scope.split("/", 1)[0] != "tenant:" + str(caller.tenant).lower():
            raise ApiError(403, "FORBIDDEN", f"scope {scope} is outside the API key's tenant")
        budget = self._ledger._budgets.get((scope, unit))
        if budget is None:
            raise _not_found("BUDGET_NOT_FOUND", f"No budget for scope {scope} in {unit}")
        return budget

    def _fundBudget(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        params = _QueryParams(request.query)
        if caller.admin and params.optional("tenant_id") is None:
            raise _invalid("tenant_id query parameter is required when using admin key "
                           "authentication")
        body = _validated_admin_body(request, _FUNDING)
        digest = _payload_hash([request.query.get("scope"), request.query.get("unit"), body])
        ledger = self._ledger
        with ledger._lock:
            ledger._start(ledger._clock.now_ms())
            budget = self._addressed_budget(request, caller)
            tenant = budget.tenant_segment.split(":", 1)[1]
            if caller.admin and str(params.optional("tenant_id")).lower() != tenant:
                raise _not_found("BUDGET_NOT_FOUND",
                                 f"No budget for scope {budget.scope} in tenant "
                                 f"{params.optional('tenant_id')}")
            slot: Optional[_Slot] = None
            if "idempotency_key" in body:
                slot = (tenant, "fund", f"{budget.scope}|{budget.unit}", body["idempotency_key"])
                replay = ledger._replay(slot, digest, 0)
                if replay is not None:
                    return replay
            ledger._guard_mutation(tenant)
            if budget.status != "ACTIVE":
                raise ApiError(409, "BUDGET_" + budget.status,
                               f"Budget {budget.scope} is {budget.status}")
            for name in ("amount", "spent"):
                if name in body and body[name]["unit"] != budget.unit:
                    raise ApiError(400, "UNIT_MISMATCH", f"{name}.unit must be {budget.unit}")
            with ledger._atomic():
                ledger._touch(budget)
                before = dict(vars(budget))
                _apply_funding(budget, body)
                budget.updated_at_ms = ledger._clock.now_ms()
                response: JsonObject = {"operation": body["operation"]}
                for name in ("allocated", "remaining", "debt", "spent"):
                    response["previous_" + name] = _money(budget.unit, before[name])
                    response["new_" + name] = _money(budget.unit, getattr(budget, name))
                response["timestamp"] = _iso(budget.updated_at_ms)
                if slot is not None:
                    ledger._bind(slot, _Stored.of(digest, 200, response), None)
                return _Outcome(200, response, applied=True)

    def _freezeBudget(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        return self._transition(request, caller, "ACTIVE", "FROZEN")

    def _unfreezeBudget(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        return self._transition(request, caller, "FROZEN", "ACTIVE")

    def _transition(self, request: _Request, caller: _Caller, source: str,
                    target: str) -> _Outcome:
        if request.raw_body.strip():
            _validated_admin_body(request, _STATUS_TRANSITION)
        ledger = self._ledger
        with ledger._lock, ledger._atomic():
            budget = self._addressed_budget(request, caller)
            ledger._guard_mutation(budget.tenant_segment.split(":", 1)[1])
            if budget.status != source:
                code = {"FROZEN": "BUDGET_FROZEN", "CLOSED": "BUDGET_CLOSED"}.get(
                    budget.status, "INVALID_REQUEST")
                raise ApiError(409, code, f"Budget {budget.scope} is already {budget.status}"
                               if budget.status == target else
                               f"Budget {budget.scope} is {budget.status}, not {source}")
            ledger._touch(budget)
            budget.status = target
            budget.updated_at_ms = ledger._clock.now_ms()
            return _Outcome(200, _ledger_view(budget), applied=True)

    # -- api keys --------------------------------------------------------------

    def _createApiKey(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        import secrets
        import string

        body = _validated_admin_body(request, _KEY_CREATE)
        ledger = self._ledger
        with ledger._lock, ledger._atomic():
            tenant = body["tenant_id"]
            if tenant not in ledger._tenants:
                raise ApiError(400, "TENANT_NOT_FOUND", f"Tenant {tenant} not found")
            ledger._guard_mutation(tenant)
            alphabet = string.ascii_letters + string.digits
            secret = "cyc_test_" + "".join(secrets.choice(alphabet) for _ in range(32))
            now = ledger._clock.now_ms()
            expires = (_parse_datetime_ms(body["expires_at"]) if "expires_at" in body
                       else now + _KEY_LIFETIME_MS)
            if expires <= now:
                raise _invalid("expires_at must be in the future")
            record = _ApiKey(
                key_id=str(uuid.uuid4()), tenant_id=tenant, key_prefix=secret[:15],
                created_at_ms=now, name=body["name"], description=body.get("description"),
                permissions=list(body.get("permissions", _DEFAULT_PERMISSIONS)),
                scope_filter=copy.deepcopy(body.get("scope_filter")), expires_at_ms=expires,
                metadata=copy.deepcopy(body.get("metadata")),
            )
            digest = _secret_hash(secret)
            ledger._api_keys[digest] = record
            ledger._on_undo(lambda: ledger._api_keys.pop(digest, None))
            view = _key_view(record, now)
            created = {name: view[name] for name in ("key_id", "key_prefix", "tenant_id",
                                                     "permissions", "created_at", "expires_at")}
            created["key_secret"] = secret
            return _Outcome(201, created, applied=True)

    def _listApiKeys(self, request: _Request, caller: _Caller, _: Optional[str]) -> _Outcome:
        params = _QueryParams(request.query)
        tenant = params.optional("tenant_id")
        status = _enum_param(params, "status", ("ACTIVE", "REVOKED", "EXPIRED"))
        search = _search_param(params)
        ledger = self._ledger
        with ledger._lock:
            now = ledger._clock.now_ms()
            views = [_key_view(record, now) for record in ledger._api_keys.values()]
        rows = [v for v in views
                if tenant in (None, v["tenant_id"]) and status in (None, v["status"])
                and _search_hit(search, v["key_id"], v["name"])]
        sorts = ("key_id", "name", "tenant_id", "status", "created_at", "expires_at")
        return _admin_page(request, "keys", rows, sorts, "created_at", "key_id")

    def _revokeApiKey(self, request: _Request, caller: _Caller, key_id: Optional[str]) -> _Outcome:
        params = _QueryParams(request.query)
        reason = params.optional("reason")
        if reason is not None and len(reason) > 512:
            raise _invalid("reason must be at most 512 characters long")
        ledger = self._ledger
        with ledger._lock, ledger._atomic():
            record = next((r for r in ledger._api_keys.values() if r.key_id == key_id), None)
            if record is None:
                raise _not_found("NOT_FOUND", f"API key {key_id} not found")
            if record.status == "REVOKED":
                raise ApiError(409, "KEY_REVOKED", f"API key {key_id} is already revoked")
            ledger._touch(record)
            record.status = "REVOKED"
            record.revoked_at_ms = ledger._clock.now_ms()
            record.revoked_reason = reason
            return _Outcome(200, _key_view(record, record.revoked_at_ms), applied=True)


# TenantCreateRequest field -> _Tenant attribute
_TENANT_FIELDS = (
    ("parent_tenant_id", "parent_tenant_id"),
    ("metadata", "metadata"),
    ("default_commit_overage_policy", "default_overage_policy"),
    ("default_reservation_ttl_ms", "default_ttl_ms"),
    ("max_reservation_ttl_ms", "max_ttl_ms"),
    ("max_reservation_extensions", "max_extensions"),
    ("reservation_expiry_policy", "reservation_expiry_policy"),
)


def _apply_funding(budget: _Budget, body: JsonObject) -> None:
    """CREDIT, DEBIT, RESET, RESET_SPENT or REPAY_DEBT, keeping
    remaining == allocated - spent - reserved - debt."""
    operation, amount = body["operation"], body["amount"]["amount"]
    if operation == "CREDIT":
        budget.allocated += amount
    elif operation == "DEBIT":
        if amount > budget.remaining or amount > budget.allocated:
            raise ApiError(409, "BUDGET_EXCEEDED",
                           f"DEBIT of {amount} exceeds remaining {budget.remaining}")
        budget.allocated -= amount
    elif operation == "RESET":
        budget.allocated = amount
    elif operation == "RESET_SPENT":
        budget.allocated = amount
        budget.spent = body.get("spent", {"amount": 0})["amount"]
    else:  # REPAY_DEBT: the payment settles debt (as spend) and credits any excess
        repaid = min(amount, budget.debt)
        budget.debt -= repaid
        budget.spent += repaid
        budget.allocated += amount
    if budget.allocated > INT64_MAX or budget.spent > INT64_MAX:
        raise _invalid("the resulting amount is out of range")
    budget.remaining = budget.allocated - budget.spent - budget.reserved - budget.debt
    if budget.is_over_limit and budget.debt <= budget.overdraft_limit:
        budget.is_over_limit = False


def _validated_admin_body(request: _Request, schema: _Check) -> JsonObject:
    return _validated_body(request, schema, idempotency_header=False)


def _enum_param(params: _QueryParams, name: str, choices: Sequence[str]) -> Optional[str]:
    value = params.optional(name)
    if value is not None and value not in choices:
        raise _invalid(f"{name} must be one of {', '.join(choices)}")
    return value


def _bool_param(params: _QueryParams, name: str) -> Optional[bool]:
    value = params.optional(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise _invalid(f"{name} must be true or false")
    return value == "true"


def _fraction_param(params: _QueryParams, name: str) -> Optional[float]:
    value = params.optional(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise _invalid(f"{name} must be a number between 0 and 1")
    return number


def _search_param(params: _QueryParams) -> Optional[str]:
    value = params.optional("search")
    if value is not None and len(value) > 128:
        raise _invalid("search must be at most 128 characters long")
    return value.lower() if value else None


def _search_hit(search: Optional[str], *fields: Any) -> bool:
    return search is None or any(search in str(value).lower() for value in fields)


def _admin_page(
    request: _Request, wrapper: str, rows: List[JsonObject], sorts: Sequence[str],
    default_sort: Optional[str], tie_breaker: str,
) -> _Outcome:
    """Sort, then one page of ``rows`` behind an offset cursor bound to the query."""
    params = _QueryParams(request.query)
    sort_by = _enum_param(params, "sort_by", sorts) or default_sort
    sort_dir = _enum_param(params, "sort_dir", ("asc", "desc")) or "desc"
    text = params.optional("limit")
    if text is not None and (not _LIMIT_RE.fullmatch(text)
                             or not 1 <= int(text) <= _ADMIN_LIST_MAX):
        raise _invalid(f"limit must be an integer between 1 and {_ADMIN_LIST_MAX}")
    limit = int(text) if text is not None else LIST_DEFAULT_LIMIT
    filters = sorted((k, v) for k, v in request.query.items() if k not in ("cursor", "limit"))
    binding = _payload_hash(filters)
    cursor = params.cursor(binding)
    offset = 0
    if cursor is not None:
        if not _is_int(cursor[0]) or cursor[0] < 0:
            raise _invalid("cursor is malformed")
        offset = int(cursor[0])
    rows.sort(key=lambda row: str(row[tie_breaker]))
    if sort_by is not None:
        sort_field = {"utilization": "utilization", "debt": "debt_amount"}.get(sort_by, sort_by)
        rows.sort(key=lambda row: (row.get(sort_field) is None, row.get(sort_field) or ""),
                  reverse=sort_dir == "desc")
    page = rows[offset:offset + limit]
    body: JsonObject = {wrapper: page, "has_more": offset + limit < len(rows)}
    if body["has_more"]:
        body["next_cursor"] = _encode_cursor(binding, [offset + limit, 0])
    return _Outcome(200, body)


# =============================================================================
# Fault injection
# =============================================================================

_FAULT_PARAMS: Dict[str, Tuple[str, ...]] = {
    "lost_response": (),
    "drop": (),
    "delay": ("delay_ms",),
    "status": ("status", "headers", "body", "error", "message", "content_type"),
    "nonconformant": ("status", "drop_fields", "set_fields", "headers"),
    "malformed": ("apply", "status"),
    "html": ("status",),
    "redirect": ("status", "location"),
    "trickle": ("interval_ms",),
    "close_after": (),
}

_PROXY_PAGE = (
    "<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


class Fault:
    """One injected fault: applies to ``times`` matching requests after ``skip``."""

    def __init__(
        self, operation: str, kind: str, times: Optional[int], skip: int, params: Dict[str, Any]
    ) -> None:
        self.operation = operation
        self.kind = kind
        self.times = times
        self.skip = skip
        self.params = params
        self.hits = 0
        self._skipped = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def _claim(self) -> bool:
        """Count one matching request; True if the fault applies to it."""
        if self._skipped < self.skip:
            self._skipped += 1
            return False
        self.hits += 1
        return True

    def __repr__(self) -> str:
        return (
            f"Fault(operation={self.operation!r}, kind={self.kind!r}, times={self.times}, "
            f"skip={self.skip}, hits={self.hits})"
        )


def _validate_fault(operation: str, kind: str, times: Optional[int], skip: int,
                    params: Mapping[str, Any]) -> None:
    if operation != "*" and operation not in OPERATIONS:
        raise ValueError(f"operation must be '*' or one of {', '.join(OPERATIONS)}")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault must be one of {', '.join(FAULT_KINDS)}")
    if times is not None and (not _is_int(times) or times < 1):
        raise ValueError("times must be a positive integer or None (forever)")
    if not _is_int(skip) or skip < 0:
        raise ValueError("skip must be a non-negative integer")
    unknown = set(params) - set(_FAULT_PARAMS[kind])
    if unknown:
        raise ValueError(f"unknown parameters for fault {kind!r}: {', '.join(sorted(unknown))}")
    status = params.get("status")
    if status is not None and (not _is_int(status) or not 100 <= status <= 599):
        raise ValueError("status must be an HTTP status code")
    if kind == "status":
        if status is None:
            raise ValueError("fault 'status' needs status=")
        needs_code = params.get("body") is None and status >= 400 and not params.get("error")
        if needs_code and _default_error_code(status) is None:
            raise ValueError(f"fault 'status' with status {status} needs error=")
    if kind == "delay" and (not _is_int(params.get("delay_ms")) or params["delay_ms"] < 0):
        raise ValueError("fault 'delay' needs delay_ms= (a non-negative integer)")
    interval = params.get("interval_ms", 0)
    if kind == "trickle" and (not _is_int(interval) or interval < 0):
        raise ValueError("interval_ms must be a non-negative integer")


class _FaultRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: List[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, operation: str) -> Optional[Fault]:
        """The fault that applies to this request, if any (first registered wins)."""
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or fault.operation not in ("*", operation):
                    continue
                if fault._claim():
                    return fault
            self._faults = [f for f in self._faults if not f.exhausted]
            return None


@dataclass
class _Plan:
    """What the HTTP layer writes: a response (or nothing) and how."""

    response: Optional[_Response]
    applied: bool = False
    close_after: bool = False
    trickle_interval_ms: Optional[int] = None


def _plan_response(
    fault: Optional[Fault],
    run: Callable[[], _Response],
    request: _Request,
    location_base: str,
    wait: Callable[[float], bool],
) -> _Plan:
    """Apply ``fault`` (or none) around running the operation."""
    if fault is None:
        response = run()
        return _Plan(response, applied=response.applied)
    kind, params = fault.kind, fault.params
    if kind == "drop":
        return _Plan(None)
    if kind == "status":
        return _Plan(_status_fault_response(params, request))
    if kind == "html":
        status = int(params.get("status", 502))
        page = _PROXY_PAGE.format(status=status).encode("ascii")
        return _Plan(_Response(status, raw=page, content_type="text/html"))
    if kind == "redirect":
        status = int(params.get("status", 307))
        target = str(params.get("location") or location_base + (request.target or request.path))
        return _Plan(_Response(status, raw=b"", headers=[("Location", target)]))
    if kind == "delay":
        wait(int(params["delay_ms"]) / 1000.0)
    if kind == "malformed" and not params.get("apply", True):
        response = _Response(200, raw=b"", applied=False)
    else:
        response = run()
    applied = response.applied
    if kind == "lost_response":
        return _Plan(None, applied=applied)
    if kind == "nonconformant":
        body = dict(response.body or {})
        for name in params.get("drop_fields") or ():
            body.pop(name, None)
        body.update(params.get("set_fields") or {})
        response.body = body
        response.status = int(params.get("status", response.status))
        response.headers.extend((params.get("headers") or {}).items())
    if kind == "malformed":
        whole = response.payload() or b'{"status":"COMMITTED","charged":{"unit":"USD'
        response.raw = whole[: max(1, len(whole) // 2)]
        response.status = int(params.get("status", 200))
        response.content_type = "application/json"
    if kind == "trickle":
        return _Plan(response, applied, trickle_interval_ms=int(params.get("interval_ms", 100)))
    return _Plan(response, applied, close_after=kind == "close_after")


def _status_fault_response(params: Mapping[str, Any], request: _Request) -> _Response:
    status = int(params["status"])
    headers = list((params.get("headers") or {}).items())
    body = params.get("body")
    content_type = str(params.get("content_type") or "application/json")
    if body is None and status >= 400:
        code = params.get("error") or _default_error_code(status) or "INTERNAL_ERROR"
        message = params.get("message") or f"Injected {status} response"
        response = _error_response(status, str(code), str(message), request)
        response.headers = headers
        return response
    if body is None:
        return _Response(status, raw=b"", headers=headers, content_type=content_type)
    if isinstance(body, dict):
        return _Response(
            status, body=copy.deepcopy(body), headers=headers, content_type=content_type
        )
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    return _Response(status, raw=raw, headers=headers, content_type=content_type)


# =============================================================================
# Evidence: Ed25519-signed CyclesEvidence envelopes (cycles-evidence-v0.2)
# =============================================================================
# This server's own RFC 8785 canonicalisation and RFC 8032 signing, written
# without cycles_lite's verifier, so that each checks the other. The keyring's
# plain-dict form is the JWK Set (plus the active key's private "d" when asked):
# retired keys stay in it, so envelopes signed before a rotation still verify.

EVIDENCE_SCHEMA = "cycles-evidence/v0.1"
JWKS_PATH = "/.well-known/cycles-jwks.json"
_EVIDENCE_ENDPOINTS = {
    "decide": "POST /v1/decide",
    "create": "POST /v1/reservations",
    "commit": "POST /v1/reservations/{reservation_id}/commit",
    "release": "POST /v1/reservations/{reservation_id}/release",
}
_ARTIFACT_OF = {"decide": "decide", "create": "reserve", "commit": "commit", "release": "release"}
# The attested response fields per artifact (the spec's response mirrors): transport
# metadata such as remaining_ttl_ms and cycles_evidence is never signed.
_ATTESTED_FIELDS = {
    "decide": ("decision", "caps", "reason_code", "retry_after_ms", "affected_scopes"),
    "reserve": (
        "decision", "affected_scopes", "reservation_id", "reserved", "caps", "reason_code",
        "retry_after_ms", "expires_at_ms", "scope_path", "balances",
    ),
    "commit": ("status", "charged", "released", "balances"),
    "release": ("status", "released", "balances"),
    "error": ("error", "message", "request_id", "trace_id", "details"),
}
# Denials reached after evaluation get `error` evidence; validation, auth and
# lookup failures decided nothing, so there is nothing to attest.
_ATTESTED_DENIALS = frozenset({
    "BUDGET_EXCEEDED", "BUDGET_FROZEN", "BUDGET_CLOSED", "OVERDRAFT_LIMIT_EXCEEDED",
    "DEBT_OUTSTANDING", "TENANT_CLOSED", "UNIT_MISMATCH", "RESERVATION_EXPIRED",
    "RESERVATION_FINALIZED",
})

# -- RFC 8785 ------------------------------------------------------------------

_JCS_SHORT_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
}


def _canonical_bytes(value: Any) -> bytes:
    """RFC 8785 (JCS): sorted keys by UTF-16 code units, ECMAScript numbers, UTF-8."""
    return _canonical_text(value).encode("utf-8")


def _canonical_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) <= 2**53 else _ecmascript_number(float(value))
    if isinstance(value, float):
        return _ecmascript_number(value)
    if isinstance(value, str):
        return _canonical_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical_text(item) for item in value) + "]"
    if isinstance(value, dict):
        members = sorted(value.items(), key=lambda item: item[0].encode("utf-16-be"))
        return "{" + ",".join(
            _canonical_string(name) + ":" + _canonical_text(member) for name, member in members
        ) + "}"
    raise ValueError(f"{type(value).__name__} has no JSON form")


def _canonical_string(text: str) -> str:
    out = ['"']
    for char in text:
        escaped = _JCS_SHORT_ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char < " ":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _ecmascript_number(value: float) -> str:
    """Number.prototype.toString: the shortest round-trip digits, ES layout rules."""
    import decimal
    import math

    if not math.isfinite(value):
        raise ValueError("NaN and Infinity are not JSON")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    parsed = decimal.Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, parsed.digits))
    exponent = int(parsed.exponent)
    k, n = len(digits), len(digits) + exponent  # value = 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = mantissa + "e" + ("+" if n - 1 >= 0 else "-") + str(abs(n - 1))
    return sign + text


# -- RFC 8032 Ed25519 signing -----------------------------------------------------

_FIELD = 2**255 - 19
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
_EDWARDS_D = -121665 * pow(121666, _FIELD - 2, _FIELD) % _FIELD
_Edwards = Tuple[int, int, int, int]
_base_doublings: List[_Edwards] = []
_doublings_lock = threading.Lock()


def _edwards_add(first: _Edwards, second: _Edwards) -> _Edwards:
    """Unified extended-coordinates addition on -x^2 + y^2 = 1 + d x^2 y^2 (also doubles)."""
    q = _FIELD
    x1, y1, z1, t1 = first
    x2, y2, z2, t2 = second
    a = (y1 - x1) * (y2 - x2) % q
    b = (y1 + x1) * (y2 + x2) % q
    c = t1 * t2 % q * 2 * _EDWARDS_D % q
    d = z1 * z2 * 2 % q
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % q, g * h % q, f * g % q, e * h % q


def _base_point_doublings() -> List[_Edwards]:
    """2**i * B for i < 255 (a clamped scalar has bit 254 set), built on first use."""
    with _doublings_lock:
        if not _base_doublings:
            q, d = _FIELD, _EDWARDS_D
            y = 4 * pow(5, q - 2, q) % q
            xx = (y * y - 1) * pow(d * y * y + 1, q - 2, q) % q
            x = pow(xx, (q + 3) // 8, q)
            if (x * x - xx) % q:
                x = x * pow(2, (q - 1) // 4, q) % q
            if x % 2:
                x = q - x
            point: _Edwards = (x, y, 1, x * y % q)
            for _ in range(255):
                _base_doublings.append(point)
                point = _edwards_add(point, point)
        return _base_doublings


def _base_times(scalar: int) -> _Edwards:
    total: _Edwards = (0, 1, 1, 0)
    for bit, power in enumerate(_base_point_doublings()):
        if scalar >> bit & 1:
            total = _edwards_add(total, power)
    return total


def _compress(point: _Edwards) -> bytes:
    q = _FIELD
    x, y, z, _ = point
    inverse = pow(z, q - 2, q)
    x, y = x * inverse % q, y * inverse % q
    return (y | (x & 1) << 255).to_bytes(32, "little")


class _Ed25519Key:
    """An Ed25519 private key from its 32-byte seed (RFC 8032 5.1.5)."""

    def __init__(self, seed: bytes) -> None:
        import hashlib

        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        digest = hashlib.sha512(seed).digest()
        self._scalar = int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | (1 << 254)
        self._prefix = digest[32:]
        self._seed = seed
        self.public = _compress(_base_times(self._scalar))

    def __repr__(self) -> str:
        return f"_Ed25519Key(public={self.public.hex()})"  # never the seed

    @property
    def seed(self) -> bytes:
        return self._seed

    def sign(self, message: bytes) -> bytes:
        """RFC 8032 5.1.6: deterministic R = [r]B, S = r + H(R, A, M) * s mod L."""
        import hashlib

        def reduced(data: bytes) -> int:
            return int.from_bytes(hashlib.sha512(data).digest(), "little") % _GROUP_ORDER

        r = reduced(self._prefix + message)
        encoded_r = _compress(_base_times(r))
        s = (r + reduced(encoded_r + self.public + message) * self._scalar) % _GROUP_ORDER
        return encoded_r + s.to_bytes(32, "little")


# -- the keyring -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _KeyEntry:
    kid: str
    public: bytes
    nbf_ms: int
    exp_ms: Optional[int] = None
    private: Optional[_Ed25519Key] = field(default=None, repr=False)

    def jwk(self, with_private: bool = False) -> JsonObject:
        entry: JsonObject = {
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid,
            "x": _b64url(self.public), "cycles_nbf_ms": self.nbf_ms,
            "cycles_exp_ms": self.exp_ms, "status": "active" if self.exp_ms is None else "retired",
        }
        if with_private and self.private is not None:
            entry["d"] = _b64url(self.private.seed)
        return entry


class _Keyring:
    """The signing keys: one active (open-ended window), the retired ones kept.

    ``to_dict()`` is the public JWK Set; ``to_dict(private=True)`` adds the active
    key's ``d`` (its seed). ``from_dict`` takes either: an active key without
    ``d`` is retired at ``now_ms`` and a fresh key takes over.
    """

    def __init__(self, keys: List[_KeyEntry]) -> None:
        self._keys = keys

    @classmethod
    def generate(cls, now_ms: int) -> _Keyring:
        return cls([_new_key_entry(now_ms)])

    @classmethod
    def from_dict(cls, data: Any, now_ms: int) -> _Keyring:
        keys = _key_entries(data)
        active = [key for key in keys if key.exp_ms is None]
        if len(active) > 1:
            raise ValueError("an evidence keyring has at most one open-ended key")
        ring = cls(keys)
        if not active:
            ring._keys.append(_new_key_entry(now_ms))
        elif active[0].private is None:
            ring.rotate(now_ms)
        return ring

    def to_dict(self, private: bool = False) -> JsonObject:
        return {"keys": [key.jwk(with_private=private) for key in self._keys]}

    def adopt(self, saved: Any, at_ms: int) -> bool:
        """Keep the keys of a saved JWK Set (a --state file) that this ring lacks, as
        retired ones (a key still open there is closed at ``at_ms``). If the saved set
        had retired this ring's active key, rotate at ``at_ms``: a retired key never
        signs again. True when the ring's own keys changed."""
        known = {key.kid for key in self._keys}
        retired_active = False
        for entry in _key_entries(saved):
            if entry.kid not in known:
                entry.private = None
                if entry.exp_ms is None:
                    entry.exp_ms = max(at_ms, entry.nbf_ms)
                self._keys.insert(len(self._keys) - 1, entry)
            elif entry.kid == self.active.kid and entry.exp_ms is not None:
                retired_active = True
        if retired_active:
            self.rotate(at_ms)
        self._keys[:-1] = sorted(self._keys[:-1], key=lambda key: key.nbf_ms)
        return retired_active

    @property
    def active(self) -> _KeyEntry:
        return self._keys[-1]

    def rotate(self, at_ms: int) -> str:
        """Retire the active key at ``at_ms`` (exclusive) and start a new one there."""
        retiring = self.active
        at_ms = max(at_ms, retiring.nbf_ms)
        retiring.exp_ms = at_ms
        retiring.private = None  # a retired key never signs again: forget its secret
        self._keys.append(_new_key_entry(at_ms))
        return self.active.kid


def _new_key_entry(nbf_ms: int) -> _KeyEntry:
    import hashlib

    private = _Ed25519Key(os.urandom(32))
    kid = hashlib.sha256(private.public).hexdigest()[:16]
    return _KeyEntry(kid, private.public, nbf_ms, None, private)


def _key_entries(data: Any) -> List[_KeyEntry]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("an evidence keyring is a JWK Set: {\"keys\": [...]}")
    keys = [_key_entry_from_jwk(jwk) for jwk in data["keys"]]
    if len({key.kid for key in keys}) != len(keys):
        raise ValueError("an evidence keyring needs unique kids")
    return keys


def _key_entry_from_jwk(jwk: Any) -> _KeyEntry:
    if not isinstance(jwk, dict):
        raise ValueError("every evidence key is a JSON object")
    kid, x = jwk.get("kid"), jwk.get("x")
    nbf, exp = jwk.get("cycles_nbf_ms"), jwk.get("cycles_exp_ms")
    if not isinstance(kid, str) or not kid or not isinstance(x, str):
        raise ValueError("every evidence key needs a kid and an x")
    if not isinstance(nbf, int) or (exp is not None and not isinstance(exp, int)):
        raise ValueError(f"evidence key {kid!r}: cycles_nbf_ms/cycles_exp_ms must be integers")
    public = _b64url_decode(x)
    private = None
    if exp is None and isinstance(jwk.get("d"), str):
        private = _Ed25519Key(_b64url_decode(jwk["d"]))
        if private.public != public:
            raise ValueError(f"evidence key {kid!r}: d does not match x")
    return _KeyEntry(kid, public, int(nbf), None if exp is None else int(exp), private)


def _load_keyring_file(path: str, now_ms: int) -> _Keyring:
    """The keyring in ``path``; a missing file gets a fresh one, written owner-only."""
    try:
        with open(path, encoding="utf-8") as handle:
            return _Keyring.from_dict(json.load(handle), now_ms)
    except FileNotFoundError:
        ring = _Keyring.generate(now_ms)
        _save_keyring_file(path, ring)
        return ring
    except ValueError as error:
        raise ValueError(f"evidence key file {path}: {error}") from None


def _save_keyring_file(path: str, ring: _Keyring) -> None:
    """Atomically replace ``path`` with the keyring, private key included, mode 0600."""
    temporary = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(ring.to_dict(private=True), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# -- the evidence log ----------------------------------------------------------------


# A stored ref: (server_id, evidence_id, replay digest); the server_id string is
# shared by every ref, the digest (b"" for denials) finds a same-key replay.
_Ref = Tuple[str, str, bytes]


class _EvidenceLog:
    """Signs, stores and serves envelopes; remembers the refs of each reservation.

    A same-key replay gets the original envelope's ref (the attested response does
    not change on replay), a new operation a new envelope. Retention: a
    reservation's envelopes (reserve, commit, release) go when the ledger prunes
    the reservation (``forget_reservation``), the others (decide, dry runs,
    denials) ``retention_ms`` after they were issued, like the idempotency records
    that refer to them. Envelopes are kept deflated, with the first one stored as
    the preset dictionary (a few hundred bytes each instead of about 1.2 KB).
    Nested values are replaced, never changed in place, so ``dump_state`` needs
    the lock only for shallow copies.
    """

    def __init__(
        self, keyring: _Keyring, clock: Clock, server_id: Callable[[], str],
        key_file: Optional[str] = None, *, retention_ms: int = DEFAULT_RETENTION_S * 1000,
        generated_keyring: bool = False,
    ) -> None:
        self._keyring = keyring
        self._clock = clock
        self._server_id = server_id
        self._key_file = key_file
        self._retention_ms = retention_ms
        # a generated keyring gives way to a --state file's (its active key retired)
        self._generated_keyring = generated_keyring
        self._lock = threading.Lock()
        self._envelopes: Dict[str, bytes] = {}  # evidence_id -> deflated JCS bytes
        self._zdict = b""  # the start of the first envelope stored
        self._server_ids: Dict[str, str] = {}  # one shared string per server_id
        self._by_request: Dict[bytes, _Ref] = {}  # decide and dry-run refs by replay digest
        self._by_reservation: Dict[str, Dict[str, _Ref]] = {}  # reservation -> artifact -> ref
        # (prune at ms, evidence_id, replay digest) in time order, for envelopes of no reservation
        self._expiring: Deque[Tuple[int, str, bytes]] = collections.deque()
        self._last_issued_ms = -1
        self.changes = 0  # bumped by every change; --state saves when it moved

    # -- publishing --------------------------------------------------------------

    def envelope(self, evidence_id: str) -> Optional[bytes]:
        with self._lock:
            self._prune(self._clock.now_ms())
            blob = self._envelopes.get(evidence_id)
            return None if blob is None else _inflate(blob, self._zdict)

    def jwks(self, private: bool = False) -> JsonObject:
        with self._lock:
            return self._keyring.to_dict(private)

    def rotate(self) -> str:
        with self._lock:
            kid = self._keyring.rotate(max(self._clock.now_ms(), self._last_issued_ms + 1))
            if self._key_file is not None:
                _save_keyring_file(self._key_file, self._keyring)
            self.changes += 1
            return kid

    def attach_refs(self, rows: Iterable[JsonObject]) -> None:
        """Set ``evidence`` (ReservationEvidence) on reservation views that have any."""
        with self._lock:
            for row in rows:
                refs = self._by_reservation.get(str(row.get("reservation_id")))
                if refs:
                    row["evidence"] = {name: _ref_json(ref) for name, ref in refs.items()}

    # -- recording ---------------------------------------------------------------

    def record_success(
        self, operation: str, request: _Request, caller: _Caller, route: _Route, body: JsonObject
    ) -> None:
        """Stamp ``cycles_evidence`` on a successful decide/reserve/commit/release body."""
        import hashlib

        sent = _parse_json(request.raw_body)
        artifact = _ARTIFACT_OF[operation]
        reservation_id = route.reservation_id or str(body.get("reservation_id") or "")
        replay_key = (
            "" if route.reservation_id else str(caller.tenant), operation, reservation_id,
            str(sent.get("idempotency_key")), _payload_hash(sent),
        )
        digest = hashlib.sha256(json.dumps(replay_key).encode("utf-8")).digest()[:16]
        of_reservation = artifact != "decide" and bool(reservation_id)
        inner: JsonObject = {"request": sent, "response": _attested(artifact, body)}
        if route.reservation_id is not None:
            inner = {"reservation_id": route.reservation_id, **inner}
        with self._lock:
            if of_reservation:
                refs = self._by_reservation.get(reservation_id, {})
                ref = refs.get(artifact)
                if ref is None or ref[2] != digest:
                    ref = self._sign(artifact, {artifact: inner}, request.trace_id, digest)
                    self._by_reservation[reservation_id] = dict(refs, **{artifact: ref})
            else:
                found = self._by_request.get(digest)
                if found is None:
                    found = self._sign(artifact, {artifact: inner}, request.trace_id, digest)
                    self._by_request[digest] = found
                    self._expire_later(found)
                ref = found
        body["cycles_evidence"] = _ref_json(ref)

    def record_denial(
        self, operation: str, request: _Request, route: _Route, status: int, body: JsonObject
    ) -> None:
        """Stamp ``cycles_evidence`` on a denial reached after evaluation."""
        if operation not in _EVIDENCE_ENDPOINTS or body.get("error") not in _ATTESTED_DENIALS:
            return
        inner: JsonObject = {"endpoint": _EVIDENCE_ENDPOINTS[operation], "http_status": status}
        if route.reservation_id is not None:
            inner["reservation_id"] = route.reservation_id
        with contextlib.suppress(ValueError):
            inner["request"] = _parse_json(request.raw_body)
        inner["response"] = _attested("error", body)
        with self._lock:
            ref = self._sign("error", {"error": inner}, request.trace_id, b"")
            self._expire_later(ref)
        body["cycles_evidence"] = _ref_json(ref)

    # -- retention -----------------------------------------------------------------

    def forget_reservation(self, reservation_id: str) -> None:
        """The ledger pruned this reservation: its envelopes go too."""
        with self._lock:
            refs = self._by_reservation.pop(reservation_id, None)
            if refs is not None:
                for ref in refs.values():
                    self._envelopes.pop(ref[1], None)
                self.changes += 1

    def _expire_later(self, ref: _Ref) -> None:
        """Keep an envelope of no reservation for the retention window (lock held)."""
        self._expiring.append((self._last_issued_ms + self._retention_ms, ref[1], ref[2]))

    def _prune(self, now: int) -> None:
        """Forget what has outlived the retention window, at most _PRUNE_BATCH at a time."""
        for _, evidence_id, digest in _pop_due(self._expiring, now):
            self._envelopes.pop(evidence_id, None)
            if digest:
                self._by_request.pop(digest, None)
            self.changes += 1

    # -- persistence (--state) -------------------------------------------------------

    def dump_state(self) -> JsonObject:
        """Everything a restart needs but the private key: public keys only."""
        with self._lock:
            keys = self._keyring.to_dict(private=False)
            last_issued_ms, zdict = self._last_issued_ms, self._zdict
            envelopes = list(self._envelopes.items())
            by_request = list(self._by_request.values())
            by_reservation = list(self._by_reservation.items())
            expiring = list(self._expiring)
        return {
            "keys": keys,
            "last_issued_ms": last_issued_ms,
            "zdict": base64.b64encode(zdict).decode("ascii"),
            "envelopes": {evidence_id: base64.b64encode(blob).decode("ascii")
                          for evidence_id, blob in envelopes},
            "by_request": [_dump_ref(ref) for ref in by_request],
            "by_reservation": {rid: {name: _dump_ref(ref) for name, ref in refs.items()}
                               for rid, refs in by_reservation},
            "expiring": [[at, evidence_id, digest.hex()] for at, evidence_id, digest in expiring],
        }

    def load_state(self, saved: JsonObject) -> None:
        """Continue a dump_state() document (raises on a bad one).

        The saved keys come back as retired ones, closed at this restart: without
        a given key (file or dict) a fresh key signs from now on; with one, that
        key keeps signing unless the saved set had retired it.
        """
        with self._lock:
            self._last_issued_ms = max(self._last_issued_ms, int(saved["last_issued_ms"]))
            restart_at = max(self._clock.now_ms(), self._last_issued_ms + 1)
            if self._generated_keyring:
                self._keyring = _Keyring.from_dict(saved["keys"], restart_at)
            elif self._keyring.adopt(saved["keys"], restart_at) and self._key_file:
                _save_keyring_file(self._key_file, self._keyring)
            self._zdict = base64.b64decode(str(saved["zdict"]), validate=True)
            self._envelopes = {
                str(evidence_id): base64.b64decode(str(blob), validate=True)
                for evidence_id, blob in saved["envelopes"].items()
            }
            for blob in self._envelopes.values():  # every envelope must open
                json.loads(_inflate(blob, self._zdict))
            self._by_request = {}
            for saved_ref in saved["by_request"]:
                ref = self._load_ref(saved_ref)
                self._by_request[ref[2]] = ref
            self._by_reservation = {
                str(rid): {str(name): self._load_ref(ref) for name, ref in refs.items()}
                for rid, refs in saved["by_reservation"].items()
            }
            self._expiring = collections.deque(
                (int(at), str(evidence_id), bytes.fromhex(str(digest)))
                for at, evidence_id, digest in saved["expiring"]
            )

    def _load_ref(self, saved: Sequence[Any]) -> _Ref:
        server_id, evidence_id, digest = (str(part) for part in saved)
        return (self._server_ids.setdefault(server_id, server_id), evidence_id,
                bytes.fromhex(digest))

    def _sign(self, artifact: str, payload: JsonObject, trace_id: str, digest: bytes) -> _Ref:
        """Build, hash, sign and store one envelope (lock held); its ref."""
        import hashlib

        self._prune(self._clock.now_ms())
        self.changes += 1
        server_id = self._server_id()
        server_id = self._server_ids.setdefault(server_id, server_id)
        key = self._keyring.active
        # Never before the last envelope nor before the active key's window (a rotation
        # may have started it 1 ms ahead of a frozen or coarse clock).
        issued_at = max(self._clock.now_ms(), self._last_issued_ms, key.nbf_ms)
        self._last_issued_ms = issued_at
        if key.private is None:  # pragma: no cover - the keyring always holds one
            raise RuntimeError("no active evidence signing key")
        server_hash = hashlib.sha256(server_id.encode("utf-8")).hexdigest()
        envelope: JsonObject = {
            "schema_version": EVIDENCE_SCHEMA,
            "artifact_type": artifact,
            "server_id": server_id,
            "signer_did": f"did:cycles:{server_hash}#{key.kid}",
            "issued_at_ms": issued_at,
            "trace_id": trace_id,
            "payload": copy.deepcopy(payload),
            "evidence_id": "",
            "signature": "",
        }
        envelope["evidence_id"] = hashlib.sha256(_canonical_bytes(envelope)).hexdigest()
        envelope["signature"] = key.private.sign(_canonical_bytes(envelope)).hex()
        evidence_id: str = envelope["evidence_id"]
        raw = _canonical_bytes(envelope)
        if not self._zdict:
            self._zdict = raw[:4096]
        self._envelopes[evidence_id] = _deflate(raw, self._zdict)
        return (server_id, evidence_id, digest)


def _ref_json(ref: _Ref) -> JsonObject:
    """The CyclesEvidenceRef of a stored ref."""
    server_id, evidence_id, _ = ref
    url = f"{server_id}/evidence/{evidence_id}"
    return {"evidence_id": evidence_id, "cycles_evidence_url": url}


def _dump_ref(ref: _Ref) -> List[str]:
    return [ref[0], ref[1], ref[2].hex()]


def _attested(artifact: str, body: JsonObject) -> JsonObject:
    fields = _ATTESTED_FIELDS[artifact]
    return {name: copy.deepcopy(body[name]) for name in fields if name in body}


# =============================================================================
# HTTP layer
# =============================================================================


@dataclass(repr=False)
class LoggedRequest:
    """One request as the server saw it (secret header values are redacted in repr)."""

    method: str
    path: str
    query: Dict[str, str]
    headers: Dict[str, str]
    raw_body: bytes  # the first MAX_LOGGED_BODY_BYTES bytes
    status: Optional[int]
    response_raw: bytes  # the first MAX_LOGGED_BODY_BYTES bytes
    operation: str
    fault: Optional[str]
    applied: bool
    time_ms: int
    request_id: str = ""
    trace_id: str = ""
    tenant: Optional[str] = None

    @property
    def body(self) -> Any:
        """The request body as JSON (None if absent, not JSON or truncated)."""
        return _try_json(self.raw_body)

    @property
    def response_body(self) -> Any:
        """The response body as JSON (None if absent, not JSON or truncated)."""
        return _try_json(self.response_raw)

    def __repr__(self) -> str:
        shown = {k: ("<redacted>" if k in _SECRET_HEADERS else v) for k, v in self.headers.items()}
        return (
            f"LoggedRequest(method={self.method!r}, path={self.path!r}, "
            f"operation={self.operation!r}, status={self.status!r}, fault={self.fault!r}, "
            f"applied={self.applied!r}, headers={shown!r}, body={self.body!r})"
        )


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Connection:
    """A client socket, whether it sits idle between requests and since when
    it has been in its current phase (idle, reading, working, writing)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.idle = True
        self.phase = "idle"
        self.since = time.monotonic()
        self.cut = False  # shut down by the server: what is read from it now is never run

    def enter(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
            self.idle = False
            self.since = time.monotonic()

    def become_idle(self) -> None:
        """Waiting for the next request (call with ``lock`` held)."""
        self.phase = "idle"
        self.idle = True
        self.since = time.monotonic()

    def overdue(self, now: float, idle_timeout: float, read_timeout: float) -> bool:
        """Idle past the idle timeout, or reading/writing one request past the read timeout."""
        if self.phase == "working":
            return False
        limit = idle_timeout if self.phase == "idle" else read_timeout
        return now - self.since > limit

    def shutdown(self) -> None:
        self.cut = True
        # socket.socket.shutdown, not SSLSocket.shutdown: leave the TLS object
        # to the handler thread that may be blocked reading it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True
    timeout = 1.0  # bounds handle_request()'s own wait should readiness be spurious

    def __init__(self, address: Tuple[str, int], owner: LocalCyclesServer) -> None:
        self.owner = owner
        self.connections: Dict[int, _Connection] = {}
        self.handler_threads: Set[threading.Thread] = set()
        self.registry_lock = threading.Lock()
        self.accepted = 0
        self.refused = 0
        self._stop_requested = False
        # before binding: a failed bind calls server_close(), which closes these
        self._wake_reader, self._wake_writer = socket.socketpair()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.socket.setblocking(False)

    def serve_until_stopped(self) -> None:
        """Accept connections until request_stop(); wakes only to close overdue
        connections, and backs off when accept() fails (out of descriptors)."""
        owner = self.owner
        tick = max(0.05, min(1.0, owner._idle_timeout_s / 4, owner._read_timeout_s / 4))
        backoff = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._stop_requested:
                ready = selector.select(tick)
                self._close_overdue()
                if any(key.fileobj is self.socket for key, _ in ready):
                    if self._accept():
                        backoff = 0.0
                    else:
                        backoff = min(1.0, max(0.05, backoff * 2))
                        owner._stopping.wait(backoff)

    def _accept(self) -> bool:
        """Accept one connection; False (logged) if accept() failed."""
        try:
            request, client_address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as error:
            self.owner._log_line(f"accept failed, backing off: {error}")
            return False
        request.setblocking(True)
        if self._stop_requested:
            request.close()
            return True
        with self.registry_lock:
            full = len(self.connections) >= self.owner._max_connections
            if full:
                self.refused += 1
        if full:
            self._refuse(request)
        else:
            self.process_request(request, client_address)
        return True

    def _refuse(self, request: socket.socket) -> None:
        """503 and close: over --max-connections, never a hang."""
        body = json.dumps({
            "error": "INTERNAL_ERROR",
            "message": f"server is at its limit of {self.owner._max_connections} connections",
            "request_id": str(uuid.uuid4()),
            "trace_id": _extract_trace_id(None, None),
        }).encode("utf-8")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        with contextlib.suppress(OSError):
            if self.owner._ssl_context is None:  # a TLS client cannot read plain text
                request.settimeout(1.0)
                request.sendall(head + body)
            request.shutdown(socket.SHUT_RDWR)
        request.close()

    def _close_overdue(self) -> None:
        owner = self.owner
        now = time.monotonic()
        with self.registry_lock:
            connections = list(self.connections.values())
        for connection in connections:
            if connection.overdue(now, owner._idle_timeout_s, owner._read_timeout_s):
                connection.shutdown()

    def request_stop(self) -> None:
        self._stop_requested = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = _Connection(request)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"cycles-lite-conn-{self.accepted + 1}",
            daemon=True,
        )
        with self.registry_lock:
            self.accepted += 1
            self.connections[id(request)] = connection
            self.handler_threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a broken connection must not kill the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self.registry_lock:
                self.connections.pop(id(request), None)
                self.handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            return
        self.owner._log_line(
            f"internal error while serving {client_address}: {_capped(repr(error))}")

    def connection_for(self, request: Any) -> _Connection:
        with self.registry_lock:
            return self.connections.get(id(request)) or _Connection(request)


class _LastLineReader:
    """The request stream as http.client.parse_headers reads it, keeping the last line."""

    def __init__(self, stream: BufferedIOBase) -> None:
        self._stream = stream
        self.last = b""

    def readline(self, limit: int = -1) -> bytes:
        self.last = self._stream.readline(limit)
        return self.last


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "cycles-lite-server/" + __version__
    sys_version = ""
    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.conn = self.server.connection_for(self.request)
        self.tls_failed = False
        context = self.server.owner._ssl_context
        if context is not None:
            raw = self.request
            try:
                raw.settimeout(_TLS_HANDSHAKE_TIMEOUT_S)
                self.request = context.wrap_socket(raw, server_side=True)
                self.request.settimeout(None)
                self.conn.sock = self.request
            except (OSError, ValueError):
                self.tls_failed = True
                self.request = raw
        super().setup()

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.server.owner._ssl_context is not None and not self.tls_failed:
                self.request.close()

    def parse_request(self) -> bool:
        self.conn.enter("reading")
        rfile = self.rfile
        header_lines = _LastLineReader(rfile)
        self.rfile = header_lines  # type: ignore[assignment]
        try:
            if not super().parse_request():
                return False
        finally:
            self.rfile = rfile
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        # http.client.parse_headers takes end of input (a timeout's shutdown, a
        # half-close) for the end of the headers: such a request is dropped unrun.
        if header_lines.last not in (b"\r\n", b"\n"):
            self._drop("its headers were cut short")
            return False
        if self.conn.cut:
            self._drop("its connection was closed (read timeout or stop)")
            return False
        return True

    def _drop(self, why: str) -> None:
        """Close without running or answering the request."""
        self.close_connection = True
        self.server.owner._log_line(
            f"{_capped(self.command or '')} {_capped(self.path or '')} dropped: {why}")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's stderr logging; requests are logged by _serve."""

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def send_error(
        self, code: int, message: Optional[str] = None, explain: Optional[str] = None
    ) -> None:
        """Errors raised by http.server itself (bad request line, ...) as ErrorResponses."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # a status line even for a garbage request line
        headers = getattr(self, "headers", None)
        request = _Request(
            method=getattr(self, "command", None) or "",
            path="",
            query={},
            headers={},
            raw_body=b"",
            request_id=str(uuid.uuid4()),
            trace_id=_extract_trace_id(
                headers.get("traceparent") if headers else None,
                headers.get("x-cycles-trace-id") if headers else None,
            ),
        )
        code_name = _default_error_code(code) or "INVALID_REQUEST"
        response = _error_response(code, code_name, message or "Bad request", request)
        with contextlib.suppress(OSError):
            self._write(response, request)

    # -- request cycle ---------------------------------------------------------

    def _serve(self) -> None:
        owner = self.server.owner
        started = time.perf_counter()
        split = urlsplit(self.path)
        headers: Dict[str, str] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), value)
        request = _Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            raw_body=b"",
            request_id=str(uuid.uuid4()),
            trace_id=_extract_trace_id(
                headers.get("traceparent"), headers.get("x-cycles-trace-id")
            ),
            target=self.path,
        )
        route = _resolve_route(self.command, split.path)
        entry = LoggedRequest(
            method=self.command,
            path=split.path,
            query={name: values[0] for name, values in request.query.items()},
            headers=headers,  # shared with the request: never changed after parsing
            raw_body=b"",
            status=None,
            response_raw=b"",
            operation=route.operation if route else "unknown",
            fault=None,
            applied=False,
            time_ms=owner.clock.now_ms(),
            request_id=request.request_id,
            trace_id=request.trace_id,
        )
        try:
            plan = self._plan(route, request, entry)
        except Exception as error:  # answer 500, never kill the thread
            owner._log_line(f"internal error on {self.command} {_capped(split.path)}: "
                            f"{_capped(repr(error))}")
            plan = _Plan(_error_response(500, "INTERNAL_ERROR", "Internal server error", request))
        response = plan.response
        entry.applied = plan.applied
        details = ""
        if response is not None:
            entry.status = response.status
            entry.tenant = response.tenant
            entry.response_raw = response.payload()[:MAX_LOGGED_BODY_BYTES]
            if route is not None and route.admin_operation == "createApiKey":
                entry.response_raw = b""  # it holds the only copy of the new key's secret
            if owner._log_stream is not None:
                details = _log_details(route, request, response)
        owner._record(entry, (time.perf_counter() - started) * 1000.0, details)
        if response is None:
            self.close_connection = True
            return
        self._write(response, request, plan.trickle_interval_ms)
        if plan.close_after:
            self.close_connection = True

    def _plan(self, route: Optional[_Route], request: _Request, entry: LoggedRequest) -> _Plan:
        owner = self.server.owner
        try:
            request.raw_body = self._read_body()
        except _BodyError as error:
            self.close_connection = True
            return _Plan(_error_response(error.status, "INVALID_REQUEST", error.message, request))
        entry.raw_body = request.raw_body[:MAX_LOGGED_BODY_BYTES]
        if self.conn.cut:  # timed out or stopping while the body came in
            self.close_connection = True
            return _Plan(None)
        self.conn.enter("working")
        fault = owner._faults.take(entry.operation)
        entry.fault = fault.kind if fault else None

        def run() -> _Response:
            if route is None:
                return _error_response(404, "NOT_FOUND", f"No route for {request.path}", request)
            return owner._api.handle(route, request)

        return _plan_response(fault, run, request, owner._redirect_base(), owner._stopping.wait)

    def _read_body(self) -> bytes:
        limit = self.server.owner._max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        if not length_text.strip().isdigit():
            raise _BodyError(400, "Content-Length is not a valid number")
        length = int(length_text)
        if length > limit:
            # Drain a moderately oversized body so the client reads the 413
            # instead of a TCP reset; give up on anything huge.
            if length <= _MAX_DRAIN_BYTES:
                while length > 0:
                    chunk = self.rfile.read(min(length, 65536))
                    if not chunk:
                        break
                    length -= len(chunk)
            raise _BodyError(413, f"request body exceeds {limit} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            raise _BodyError(400, "request body ended early")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        chunks: List[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BodyError(400, "malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise _BodyError(413, f"request body exceeds {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyError(400, "malformed chunked body")
            chunks.append(chunk)

    def _write(
        self, response: _Response, request: _Request, trickle_interval_ms: Optional[int] = None
    ) -> None:
        payload = response.payload()
        self.send_response(response.status)
        header_names = {name.lower() for name, _ in response.headers}
        defaults = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(payload))),
            ("X-Request-Id", request.request_id),
            ("X-Cycles-Trace-Id", request.trace_id),
            ("X-RateLimit-Remaining", "-1"),
            ("X-RateLimit-Reset", "0"),
        ]
        if response.tenant is not None:
            defaults.append(("X-Cycles-Tenant", response.tenant))
        for name, value in defaults:
            if name.lower() not in header_names:
                self.send_header(name, value)
        for name, value in response.headers:
            self.send_header(name, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        if self.command == "HEAD":
            payload = b""
        self.conn.enter("writing")
        try:
            if trickle_interval_ms is not None and len(payload) > 1:
                self.end_headers()
                payload = self._trickle(payload, trickle_interval_ms / 1000.0)
                with self.conn.lock:
                    self.wfile.write(payload)
                    self.conn.become_idle()
                return
            with self.conn.lock:
                self.end_headers()
                self.wfile.write(payload)
                self.conn.become_idle()
        except OSError:
            self.close_connection = True

    def _trickle(self, payload: bytes, interval_s: float) -> bytes:
        """Send all but the last byte slowly; returns what is left to send."""
        stopping = self.server.owner._stopping
        for index in range(len(payload) - 1):
            if stopping.wait(interval_s):
                raise ConnectionAbortedError("server stopping")
            self.wfile.write(payload[index:index + 1])
        return payload[-1:]


def _printable(text: str) -> str:
    """``text`` with every non-printable character (CR, LF, NUL, ...) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _capped(text: str, limit: int = _LOGGED_TEXT_CHARS) -> str:
    """At most ``limit`` characters of request-derived text for one log line."""
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _try_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return _parse_json(raw)
    except ValueError:
        return None


def _log_details(route: Optional[_Route], request: _Request, response: _Response) -> str:
    """The log line's extras: error code, reservation id and amounts, where there are any."""
    parts: List[str] = []
    body = response.body if isinstance(response.body, dict) else {}
    if "error" in body:
        parts.append(f"error={body['error']}")
    reservation_id = (route.reservation_id if route else None) or body.get("reservation_id")
    if reservation_id:
        parts.append(f"reservation={reservation_id}")
    sent = _try_json(request.raw_body) if len(request.raw_body) <= MAX_LOGGED_BODY_BYTES else None
    for source, names in ((sent, ("estimate", "actual")), (body, ("charged", "released"))):
        for name in names:
            value = source.get(name) if isinstance(source, dict) else None
            if isinstance(value, dict) and "amount" in value:
                parts.append(f"{name}={value['amount']} {value.get('unit', '')}".rstrip())
    return "".join(" " + part for part in parts)


# =============================================================================
# Persistence (--state FILE)
# =============================================================================

_STATE_FORMAT = "cycles-lite-server-state"
_STATE_VERSION = 1


@dataclass
class _StateSection:
    """One named entry of the saved document: how to dump it and load it back."""

    dump: Callable[[], Any]
    load: Callable[[Any], None]


class _StateFile:
    """The --state document: written atomically (temp file, fsync, rename),
    loaded once at start. A file that cannot be read is refused, never replaced."""

    def __init__(self, path: str, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._saved_changes: Optional[int] = None
        self._foreign: JsonObject = {}  # sections nobody here registered: kept as they were

    def load(self, sections: Mapping[str, _StateSection]) -> bool:
        """Load every registered section; False if the file does not exist yet."""
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return False
        except OSError as error:
            raise ValueError(f"--state {self.path}: cannot read it: {error}") from None
        try:
            document = json.loads(raw.decode("utf-8"))
            if not isinstance(document, dict) or document.get("format") != _STATE_FORMAT:
                raise ValueError(f"not a {_STATE_FORMAT} document")
            if document.get("version") != _STATE_VERSION:
                raise ValueError(f"version {document.get('version')!r} is not {_STATE_VERSION}")
            saved = document["sections"]
            for name, section in sections.items():
                if name in saved:
                    section.load(saved[name])
            self._foreign = {k: v for k, v in saved.items() if k not in sections}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError,
                AssertionError) as error:
            raise ValueError(
                f"--state {self.path}: unreadable state file ({error}); "
                "it was left untouched"
            ) from None
        return True

    def save(self, sections: Mapping[str, _StateSection], changes: int,
             force: bool = False) -> bool:
        """Write the document if ``changes`` moved since the last save (or ``force``)."""
        with self._lock:
            if not force and changes == self._saved_changes:
                return False
            parts = {name: section.dump() for name, section in sections.items()}
            document = {
                "format": _STATE_FORMAT,
                "version": _STATE_VERSION,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sections": dict(self._foreign, **parts),
            }
            _write_atomically(self.path, json.dumps(document, separators=(",", ":")))
            self._saved_changes = changes
            return True

    def check_writable(self) -> None:
        """ValueError naming the file unless a save could write next to it."""
        probe = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
            os.unlink(probe)
        except OSError as error:
            raise ValueError(
                f"--state {self.path}: cannot write it: {error.strerror or error}"
            ) from None


def _write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _check_seconds(name: str, value: Any) -> None:
    """A positive, finite number of seconds a thread can wait for (no inf, no NaN)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not 0 < value <= threading.TIMEOUT_MAX):
        raise ValueError(f"{name} must be a positive number of seconds, at most "
                         f"{threading.TIMEOUT_MAX:.0f}, not {value!r}")


# =============================================================================
# Public API: LocalCyclesServer
# =============================================================================


class LocalCyclesServer:
    """An in-memory Cycles server on a background thread; see the module docstring.

    Tenants: ``{"acme": "ACTIVE"}`` or ``{"acme": {"status": "CLOSED",
    "default_ttl_ms": ..., "max_ttl_ms": ..., "max_extensions": ...,
    "default_overage_policy": ..., "default_grace_ms": ...}}``. Budgets: a list
    of ``{"scope", "unit", "allocated", ...}`` dicts with the keyword fields
    of :meth:`add_budget`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        api_keys: Optional[Mapping[str, str]] = None,
        admin_keys: Optional[Iterable[str]] = None,
        tenants: Optional[Mapping[str, Union[str, Mapping[str, Any]]]] = None,
        budgets: Optional[Iterable[Mapping[str, Any]]] = None,
        default_ttl_ms: int = DEFAULT_TTL_MS,
        max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
        default_grace_ms: int = DEFAULT_GRACE_MS,
        max_extensions: int = DEFAULT_MAX_EXTENSIONS,
        default_overage_policy: str = DEFAULT_OVERAGE_POLICY,
        log_stream: Optional[IO[str]] = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_logged_requests: int = MAX_LOGGED_REQUESTS,
        retention_s: float = DEFAULT_RETENTION_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        state_file: Optional[str] = None,
        state_interval_s: float = DEFAULT_STATE_INTERVAL_S,
        evidence: bool = False,
        evidence_key: Union[str, Mapping[str, Any], None] = None,
    ) -> None:
        for name, seconds in (("retention_s", retention_s), ("idle_timeout_s", idle_timeout_s),
                              ("read_timeout_s", read_timeout_s),
                              ("state_interval_s", state_interval_s)):
            _check_seconds(name, seconds)
        _check_amount("max_connections", max_connections, minimum=1)
        _check_amount("default_ttl_ms", default_ttl_ms, minimum=1)
        _check_amount("max_ttl_ms", max_ttl_ms, minimum=1)
        _check_ttl_order(default_ttl_ms, max_ttl_ms, "settings")
        _check_amount("default_grace_ms", default_grace_ms)
        _check_amount("max_extensions", max_extensions)
        _check_amount("max_body_bytes", max_body_bytes, minimum=1)
        _check_amount("max_logged_requests", max_logged_requests)
        _check_choice("default_overage_policy", default_overage_policy, OVERAGE_POLICIES)
        self._host = host
        self._requested_port = port
        self._ssl_context = ssl_context
        self._log_stream = log_stream
        self._max_body_bytes = max_body_bytes
        self._idle_timeout_s = float(idle_timeout_s)
        self._read_timeout_s = float(read_timeout_s)
        self._max_connections = max_connections
        self.clock = Clock()
        retention_ms = int(retention_s * 1000)
        self._ledger = _Ledger(
            self.clock, default_ttl_ms, max_ttl_ms, default_grace_ms, max_extensions,
            default_overage_policy, retention_ms=retention_ms,
        )
        enabled = evidence or evidence_key is not None
        self._evidence = self._evidence_log(evidence_key, retention_ms) if enabled else None
        self._api = _Api(self._ledger, self._evidence)
        self._faults = _FaultRegistry()
        self._log_lock = threading.Lock()
        self._requests: Deque[LoggedRequest] = collections.deque(maxlen=max_logged_requests)
        self._stopping = threading.Event()
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._saver: Optional[threading.Thread] = None
        # --state: the saved document holds one entry per section below. A
        # component with state of its own registers (dump, load) here, before
        # the file is loaded.
        self._state_sections: Dict[str, _StateSection] = {
            "clock": _StateSection(
                lambda: {"offset_ms": self.clock.offset_ms},
                lambda saved: self.clock.restore_offset(int(saved["offset_ms"])),
            ),
            "ledger": _StateSection(self._ledger.dump_state, self._ledger.load_state),
        }
        if self._evidence is not None:
            self._ledger.on_reservation_pruned = self._evidence.forget_reservation
            self._state_sections["evidence"] = _StateSection(
                self._evidence.dump_state, self._evidence.load_state
            )
        self._state = _StateFile(state_file, state_interval_s) if state_file else None
        restored = self._state is not None and self._state.load(self._state_sections)
        if self._state is not None:
            self._state.check_writable()
        self._state_error: Optional[str] = None  # why the last --state save failed
        # With a restored state the file wins; the seeds below add what it lacks.
        for name, spec in (tenants or {}).items():
            if restored and self._ledger.has_tenant(name):
                continue
            if isinstance(spec, str):
                self.add_tenant(name, spec)
            else:
                policy = dict(spec)
                self.add_tenant(name, policy.pop("status", "ACTIVE"), **policy)
        for key, tenant in (api_keys or {}).items():
            if not (restored and self._ledger.tenant_for_key(key)):
                self.add_api_key(key, tenant)
        for key in admin_keys or ():
            self.add_admin_key(key)
        for spec in budgets or ():
            fields = dict(spec)
            if "scope" not in fields:
                raise ValueError("every budget needs a scope")
            if restored and self._ledger.has_budget(fields["scope"],
                                                    fields.get("unit", DEFAULT_UNIT)):
                continue
            self.add_budget(fields.pop("scope"), fields.pop("unit", DEFAULT_UNIT),
                            fields.pop("allocated", 0), **fields)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> LocalCyclesServer:
        """Bind and serve on a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        httpd = _HTTPServer((self._host, self._requested_port), self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_until_stopped, name="cycles-lite-server", daemon=True,
        )
        self._thread.start()
        if self._state is not None:
            self._saver = threading.Thread(
                target=self._save_periodically, name="cycles-lite-state", daemon=True
            )
            self._saver.start()
        return self

    def _save_periodically(self) -> None:
        state = self._state
        assert state is not None
        while not self._stopping.wait(state.interval_s):
            self.save_state()

    def save_state(self, force: bool = False) -> bool:
        """Write the --state file now if anything changed since the last save."""
        if self._state is None:
            return False
        try:
            changes = self._ledger.changes + (self._evidence.changes if self._evidence else 0)
            saved = self._state.save(self._state_sections, changes, force)
        except OSError as error:
            self._state_error = f"could not save state to {self._state.path}: {error}"
            self._log_line(self._state_error)
            return False
        self._state_error = None
        return saved

    def stop(self) -> None:
        """Stop serving, close every socket and wait briefly for handler threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        httpd.request_stop()
        thread.join()
        httpd.server_close()
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT_S
        with httpd.registry_lock:
            connections = list(httpd.connections.values())
            threads = list(httpd.handler_threads)
        for connection in connections:
            connection.shutdown()
        for handler in threads:
            handler.join(max(0.0, deadline - time.monotonic()))
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        self.save_state(force=True)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LocalCyclesServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is not None:
            return int(self._httpd.server_address[1])
        return self._requested_port

    @property
    def host(self) -> str:
        return self._host

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self._httpd is not None else "stopped"
        return f"LocalCyclesServer(url={self.url!r}, {state})"

    # -- connections -----------------------------------------------------------

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start."""
        httpd = self._httpd
        if httpd is None:
            return 0
        with httpd.registry_lock:
            return httpd.accepted

    def close_idle_connections(self) -> int:
        """Close every kept-alive connection waiting for its next request."""
        httpd = self._httpd
        if httpd is None:
            return 0
        with httpd.registry_lock:
            connections = list(httpd.connections.values())
        closed = 0
        for connection in connections:
            with connection.lock:
                if connection.idle:
                    connection.shutdown()
                    closed += 1
        return closed

    # -- request log -----------------------------------------------------------

    @property
    def requests(self) -> List[LoggedRequest]:
        with self._log_lock:
            return list(self._requests)

    def requests_for(self, operation: str) -> List[LoggedRequest]:
        with self._log_lock:
            return [r for r in self._requests if r.operation == operation]

    def clear_requests(self) -> None:
        with self._log_lock:
            self._requests.clear()

    def _record(self, entry: LoggedRequest, elapsed_ms: float, details: str = "") -> None:
        with self._log_lock:
            self._requests.append(entry)
        status = "dropped" if entry.status is None else str(entry.status)
        extras = f" fault={entry.fault}" if entry.fault else ""
        self._log_line(
            f"{_capped(entry.method)} {_capped(entry.path)} {status} op={entry.operation} "
            f"tenant={entry.tenant or '-'}{_capped(details)} {elapsed_ms:.1f}ms "
            f"id={entry.request_id}{extras}"
        )

    def _log_line(self, line: str) -> None:
        stream = self._log_stream
        if stream is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = _printable(line)  # what came from a request can never forge a line
        with self._log_lock:
            try:
                stream.write(f"{stamp}Z {line}\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    # -- fault injection -------------------------------------------------------

    def inject(
        self, operation: str, fault: str, *, times: Optional[int] = 1, skip: int = 0, **params: Any
    ) -> Fault:
        """Apply ``fault`` to the next ``times`` ``operation`` requests after ``skip``."""
        _validate_fault(operation, fault, times, skip, params)
        injected = Fault(operation, fault, times, skip, dict(params))
        self._faults.add(injected)
        return injected

    def clear_faults(self) -> None:
        self._faults.clear()

    def _redirect_base(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.2:{self.port}"

    # -- seeding and inspection ------------------------------------------------

    def add_tenant(self, tenant: str, status: str = "ACTIVE", **policy: Any) -> None:
        self._ledger.add_tenant(tenant, status, **policy)

    def set_tenant_status(self, tenant: str, status: str) -> None:
        self._ledger.set_tenant_status(tenant, status)

    def add_api_key(self, key: str, tenant: str) -> None:
        self._ledger.add_api_key(key, tenant)

    def remove_api_key(self, key: str) -> None:
        self._ledger.remove_api_key(key)

    def add_admin_key(self, key: str) -> None:
        self._ledger.add_admin_key(key)

    def remove_admin_key(self, key: str) -> None:
        self._ledger.remove_admin_key(key)

    def add_budget(
        self,
        scope: str,
        unit: str = DEFAULT_UNIT,
        allocated: int = 0,
        *,
        overdraft_limit: int = 0,
        status: str = "ACTIVE",
        caps: Optional[Mapping[str, Any]] = None,
        debt: int = 0,
        spent: int = 0,
        is_over_limit: bool = False,
    ) -> None:
        self._ledger.add_budget(
            scope, unit, allocated, overdraft_limit=overdraft_limit, status=status,
            caps=dict(caps) if caps is not None else None, debt=debt, spent=spent,
            is_over_limit=is_over_limit,
        )

    def set_budget(self, scope: str, unit: str = DEFAULT_UNIT, **fields: Any) -> None:
        """Overwrite budget fields (status, allocated, caps, debt, spent,
        overdraft_limit, is_over_limit); remaining is recomputed."""
        self._ledger.set_budget(scope, unit, fields)

    def fund(self, scope: str, amount: int, unit: str = DEFAULT_UNIT) -> None:
        """Add funds the way the admin plane does: debt is repaid first."""
        self._ledger.fund(scope, unit, amount)

    def balance(self, scope: str, unit: str = DEFAULT_UNIT) -> JsonObject:
        return self._ledger.balance(scope, unit)

    def reservation(self, reservation_id: str) -> Optional[JsonObject]:
        return self._ledger.reservation(reservation_id)

    @property
    def events(self) -> List[JsonObject]:
        return self._ledger.events()

    def check_invariants(self) -> None:
        """AssertionError unless every budget keeps the ledger invariant."""
        self._ledger.check_invariants()

    # -- evidence ----------------------------------------------------------------

    def _evidence_log(
        self, key: Union[str, Mapping[str, Any], None], retention_ms: int
    ) -> _EvidenceLog:
        """Signed evidence (``evidence=True``, implied by ``evidence_key``): the key is a
        keyring file (created if missing), a dict from ``evidence_keys()``, or None (fresh;
        a --state file's keys then take over, their active one retired)."""
        now = self.clock.now_ms()
        if isinstance(key, str):
            keyring = _load_keyring_file(key, now)
        elif key is not None:
            keyring = _Keyring.from_dict(dict(key), now)
        else:
            keyring = _Keyring.generate(now)
        key_file = key if isinstance(key, str) else None
        return _EvidenceLog(
            keyring, self.clock, lambda: self.url + "/v1", key_file,
            retention_ms=retention_ms, generated_keyring=key is None,
        )

    def rotate_evidence_key(self) -> str:
        """Retire the active evidence key now and sign with a fresh one; returns its kid.

        The retired key stays in the JWK Set (and in the key file, when there is one).
        """
        if self._evidence is None:
            raise RuntimeError("evidence is not enabled (evidence=True)")
        return self._evidence.rotate()

    def evidence_keys(self, private: bool = False) -> JsonObject:
        """The evidence keyring as a plain dict: the JWK Set, retired keys included.

        ``private=True`` adds the active key's seed as ``d``; without it, a server
        given this dict back as ``evidence_key`` retires that key and starts a new one.
        """
        if self._evidence is None:
            raise RuntimeError("evidence is not enabled (evidence=True)")
        return self._evidence.jwks(private)


# =============================================================================
# Command line
# =============================================================================


_BUDGET_OPTIONS = ("overdraft_limit", "debt", "spent")
# an admin key kept out of the process list (the variable cycles_lite's client reads)
_ADMIN_KEY_ENV = "CYCLES_ADMIN_API_KEY"
# nobody inspects a command-line server's request log: keep it small
_CLI_LOGGED_REQUESTS = 1000
# MALFORMED (a simulated unreadable record) is for tests through the Python API
_CLI_TENANT_STATUSES = ("ACTIVE", "SUSPENDED", "CLOSED")
_TENANT_OPTIONS = ("default_ttl_ms", "max_ttl_ms", "default_grace_ms", "max_extensions")
# the spec's ranges for the reservation policy settings
_POLICY_RANGES = {
    "default_ttl_ms": _TTL_RANGE,
    "max_ttl_ms": _TTL_RANGE,
    "default_grace_ms": _GRACE_RANGE,
    "max_extensions": (0, INT64_MAX),
}


def _parse_budget_flag(text: str) -> JsonObject:
    """SCOPE=UNIT:AMOUNT[,overdraft_limit=N][,debt=N][,spent=N][,status=S]
    [,is_over_limit=true][,caps=JSON] (caps last: its JSON may hold commas)."""
    scope, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"--budget {text!r}: expected SCOPE=UNIT:AMOUNT[,OPTION=VALUE...]")
    head, _, options = rest.partition(",")
    unit, _, amount = head.rpartition(":")
    if not amount.isdigit():
        raise ValueError(f"--budget {text!r}: amount must be a non-negative integer")
    budget: JsonObject = {"scope": scope, "unit": unit or DEFAULT_UNIT, "allocated": int(amount)}
    while options:
        if options.startswith("caps="):
            try:
                budget["caps"] = json.loads(options[len("caps="):])
            except ValueError:
                raise ValueError(f"--budget {text!r}: caps must be a JSON object") from None
            break
        option, _, options = options.partition(",")
        name, _, value = option.partition("=")
        if name in _BUDGET_OPTIONS and value.isdigit():
            budget[name] = int(value)
        elif name == "status" and value in BUDGET_STATUSES:
            budget[name] = value
        elif name == "is_over_limit" and value in ("true", "false"):
            budget[name] = value == "true"
        else:
            raise ValueError(f"--budget {text!r}: bad option {option!r}")
    return budget


def _parse_tenant_flag(text: str) -> Tuple[str, JsonObject]:
    """TENANT[=STATUS][,default_ttl_ms=N][,max_ttl_ms=N][,default_grace_ms=N]
    [,max_extensions=N][,default_overage_policy=P]"""
    head, _, options = text.partition(",")
    name, _, status = head.partition("=")
    spec: JsonObject = {"status": status or "ACTIVE"}
    if spec["status"] not in _CLI_TENANT_STATUSES:
        raise ValueError(f"--tenant {text!r}: status must be one of "
                         f"{', '.join(_CLI_TENANT_STATUSES)}, not {status!r}")
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key in _TENANT_OPTIONS and value.isdigit():
            spec[key] = int(value)
        elif key == "default_overage_policy" and value in OVERAGE_POLICIES:
            spec[key] = value
        else:
            raise ValueError(f"--tenant {text!r}: bad option {option!r}")
    _check_policy_ranges(spec, f"--tenant {name}")
    return name, spec


def _check_policy_ranges(values: Mapping[str, Any], where: str) -> None:
    for name, (low, high) in _POLICY_RANGES.items():
        value = values.get(name)
        if value is not None and (not _is_int(value) or not low <= value <= high):
            raise ValueError(f"{where}: {name} must be between {low} and {high}, not {value!r}")
    default_ttl, max_ttl = values.get("default_ttl_ms"), values.get("max_ttl_ms")
    if default_ttl is not None and max_ttl is not None:
        _check_ttl_order(default_ttl, max_ttl, where)


def _check_ttl_order(default_ttl_ms: int, max_ttl_ms: int, where: str) -> None:
    if default_ttl_ms > max_ttl_ms:
        raise ValueError(f"{where}: default_ttl_ms ({default_ttl_ms}) must not exceed "
                         f"max_ttl_ms ({max_ttl_ms})")


def _cli_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python3 -m cycles_lite_server",
        description="Run a local in-memory Cycles server (runtime API, the admin API's "
                    "provisioning subset, /actuator/health).",
    )
    add = parser.add_argument
    add("--host", default=None, help="bind address (default 127.0.0.1)")
    add("--port", type=int, default=None, help="port (default 7878; 0 = any)")
    add("--config", help="JSON file with LocalCyclesServer arguments (flags win)")
    add("--state", metavar="FILE",
        help="keep tenants, keys, budgets, reservations, idempotency records, events "
             "and evidence (envelopes, public keys) in FILE across restarts (written "
             "atomically at shutdown and every --state-interval seconds)")
    add("--state-interval", type=float, metavar="SECONDS", dest="state_interval_s",
        help=f"how often to save --state when something changed (default "
             f"{DEFAULT_STATE_INTERVAL_S:g})")
    add("--api-key", action="append", default=[], metavar="KEY=TENANT",
        help="visible in the process list; prefer --config or the admin API for real keys")
    add("--admin-key", action="append", default=[], metavar="KEY",
        help="accept this X-Admin-API-Key (admin API; list/get/release of reservations); "
             f"visible in the process list (ps): prefer the {_ADMIN_KEY_ENV} environment "
             "variable, which adds its key too")
    add("--tenant", action="append", default=[], metavar="TENANT[=STATUS][,OPTION=N...]",
        help="add a tenant; STATUS is ACTIVE, SUSPENDED or CLOSED; options: "
             "default_ttl_ms, max_ttl_ms, default_grace_ms, max_extensions, "
             "default_overage_policy")
    add("--budget", action="append", default=[], metavar="SCOPE=UNIT:AMOUNT[,OPTION=V...]",
        help="add a budget; options: overdraft_limit=N, debt=N, spent=N, "
             "status=ACTIVE|FROZEN|CLOSED, is_over_limit=true, caps=JSON (last)")
    add("--default-ttl-ms", type=int, help=f"reservation TTL when a request gives none "
        f"(default {DEFAULT_TTL_MS}; {_TTL_RANGE[0]}-{_TTL_RANGE[1]})")
    add("--max-ttl-ms", type=int, help=f"longest TTL; longer requests are clamped "
        f"(default {DEFAULT_MAX_TTL_MS}; {_TTL_RANGE[0]}-{_TTL_RANGE[1]})")
    add("--grace-ms", type=int, dest="default_grace_ms", help=f"default grace period "
        f"(default {DEFAULT_GRACE_MS}; {_GRACE_RANGE[0]}-{_GRACE_RANGE[1]})")
    add("--max-extensions", type=int,
        help=f"extensions per reservation (default {DEFAULT_MAX_EXTENSIONS})")
    add("--default-overage-policy", choices=OVERAGE_POLICIES,
        help=f"commit overage policy when none is given (default {DEFAULT_OVERAGE_POLICY})")
    add("--retention", type=float, metavar="SECONDS", dest="retention_s",
        help=f"keep finalized/expired reservations, idempotency records and events this "
             f"long by the server clock, then prune them (default {DEFAULT_RETENTION_S})")
    add("--idle-timeout", type=float, metavar="SECONDS", dest="idle_timeout_s",
        help=f"close a kept-alive connection idle this long "
             f"(default {DEFAULT_IDLE_TIMEOUT_S:g})")
    add("--read-timeout", type=float, metavar="SECONDS", dest="read_timeout_s",
        help=f"close a connection that takes longer to send one request or read one "
             f"response (default {DEFAULT_READ_TIMEOUT_S:g})")
    add("--max-connections", type=int, metavar="N",
        help=f"open connections at most; more get 503 and a close "
             f"(default {DEFAULT_MAX_CONNECTIONS})")
    add("--max-body-bytes", type=int, metavar="N",
        help=f"larger request bodies get 413 (default {MAX_BODY_BYTES})")
    add("--max-logged-requests", type=int, metavar="N",
        help=f"requests kept in memory (default here {_CLI_LOGGED_REQUESTS}; "
             f"LocalCyclesServer keeps {MAX_LOGGED_REQUESTS} for tests to inspect)")
    add("--quiet", action="store_true", help="do not log requests")
    add("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    add("--tls-key", metavar="PEM", help="private key for --tls-cert")
    add("--evidence", action="store_true",
        help="sign every decision (CyclesEvidence) and serve the JWK Set")
    add("--evidence-key", metavar="FILE",
        help="evidence keyring (JSON, owner-only; created if missing); implies --evidence")
    add("--rotate", action="store_true",
        help="retire the --evidence-key key (kept in the JWK Set), use a new one")
    return parser


_PLAIN_FLAGS = (
    "default_ttl_ms", "max_ttl_ms", "default_grace_ms", "max_extensions",
    "default_overage_policy", "retention_s", "idle_timeout_s", "read_timeout_s",
    "max_connections", "max_body_bytes", "max_logged_requests", "state_interval_s",
)


def _build_from_cli(argv: Optional[Sequence[str]], stream: IO[str]) -> LocalCyclesServer:
    parser = _cli_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.rotate and not args.evidence_key:
        parser.error("--rotate needs --evidence-key FILE (the keyring to rotate)")

    config: JsonObject = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"--config {args.config}: {error}") from None
        if not isinstance(loaded, dict):
            parser.error("--config must hold a JSON object")
        config = loaded
    try:
        tenants: Dict[str, Any] = dict(config.pop("tenants", {}))
        tenants.update(_parse_tenant_flag(text) for text in args.tenant)
        budgets = list(config.pop("budgets", []))
        budgets.extend(_parse_budget_flag(text) for text in args.budget)
    except ValueError as exc:
        parser.error(str(exc))
    api_keys: Dict[str, str] = dict(config.pop("api_keys", {}))
    for text in args.api_key:
        key, sep, tenant = text.rpartition("=")
        if not sep or not key or not tenant:
            parser.error("--api-key expects KEY=TENANT")
        api_keys[key] = tenant
    admin_keys = list(config.pop("admin_keys", [])) + list(args.admin_key)
    if os.environ.get(_ADMIN_KEY_ENV):
        admin_keys.append(os.environ[_ADMIN_KEY_ENV])
    for name in _PLAIN_FLAGS:
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    config.setdefault("max_logged_requests", _CLI_LOGGED_REQUESTS)
    try:
        _check_policy_ranges(config, "settings")
    except ValueError as exc:
        parser.error(str(exc))
    host = args.host or config.pop("host", "127.0.0.1")
    port = args.port if args.port is not None else config.pop("port", 7878)
    if not _is_int(port) or not 0 <= port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {port!r}")
    config.pop("host", None)
    config.pop("port", None)
    if args.state:
        config["state_file"] = args.state
    if args.tls_cert:
        config["ssl_context"] = _server_tls_context(args.tls_cert, args.tls_key)
    if args.evidence or args.evidence_key:
        config["evidence"] = True
    if args.evidence_key:
        config["evidence_key"] = args.evidence_key
    server = LocalCyclesServer(
        host, port, api_keys=api_keys, admin_keys=admin_keys, tenants=tenants,
        budgets=budgets, log_stream=None if args.quiet else stream, **config,
    )
    if args.rotate:
        server.rotate_evidence_key()
    return server


def _server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    import ssl as ssl_module

    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as error:  # ssl.SSLError is an OSError
        raise ValueError(
            f"cannot load --tls-cert {cert_file} / --tls-key {key_file}: "
            f"{error.strerror or error}"
        ) from None
    return context


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; returns the exit status."""
    import signal

    stream = sys.stdout
    try:
        server = _build_from_cli(argv, stream)
    except (ValueError, TypeError, KeyError, OSError) as exc:  # ssl.SSLError is an OSError
        print(f"cycles_lite_server: {exc}", file=sys.stderr)
        return 2

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        server.start()
    except OSError as exc:
        where = f"{server.host}:{server.port}"
        print(f"cycles_lite_server: cannot listen on {where}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    try:  # a signal may land while the banner is printed: shut down cleanly then too
        print(f"Cycles local server listening on {server.url} (Ctrl-C to stop)", flush=True)
        if server._evidence is not None:
            kid = server.evidence_keys()["keys"][-1]["kid"]
            print(f"Signing CyclesEvidence with key {kid}: {server.url}/v1{JWKS_PATH}",
                  flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM must not interrupt the clean shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    if server._state_error is not None:
        print(f"cycles_lite_server: {server._state_error}; changes since the last save "
              "are lost", file=sys.stderr)
        return 1
    print("Cycles local server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
