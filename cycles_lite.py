# Copyright 2026 the cycles-lite authors.
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use
# this file except in compliance with the License. You may obtain a copy of the
# License at http://www.apache.org/licenses/LICENSE-2.0. Unless required by
# applicable law or agreed to in writing, software distributed under the License
# is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.
"""cycles-lite: a single-file client for the Cycles budget-authority protocol.

Standard library only, Python 3.8+. Vendor this one file, or install it.
It is a drop-in for the official ``runcycles`` 0.5.3 package: code written for
``runcycles`` runs with ``from runcycles import ...`` changed to
``from cycles_lite import ...``.

Usage::

    from cycles_lite import CyclesClient, CyclesConfig, cycles

    client = CyclesClient(CyclesConfig.from_env())   # CYCLES_BASE_URL, CYCLES_API_KEY

    @cycles(estimate=1000, action_kind="llm.completion", action_name="gpt-4o",
            tenant="acme", client=client)
    def ask(prompt: str) -> str:
        return call_the_model(prompt)

The low-level client methods return a ``CyclesResponse`` and never raise on HTTP
or network errors; they raise ``ValueError`` for invalid input::

    response = client.get_balances(tenant="acme")
    if response.is_success:
        print(response.body["balances"])

Command line: ``python -m cycles_lite COMMAND`` with ``check``, ``balances``,
``reservations``, ``reservation ID``, ``release ID`` and ``recover`` (settle what the
commit journal holds after a crash or an outage), and ``verify-evidence FILE|ID``
(``verify_evidence``: signed CyclesEvidence checked offline, standard library only).

Contents (the section banners below, in order)::

    Constants
    Errors
    Models                  each field declared once, with its check
    Config                  each setting declared once: default, check, env variable
    Per process: fork safety and deadlines      the at-fork resets; deadline()
    Transport
        The asyncio transport   per-loop pools, the max_connections gate
    Client
    Async client
    Evidence                verify_evidence: RFC 8785, RFC 8032 Ed25519, key resolution
    Decorator               @cycles: where a guarded call starts
    Guard and heartbeat
        The reservation lifecycle: one object, three faces
        The steps: create, release, settle      written once, for sync and async
        The I/O seam: how the steps wait        incl. the one sync heartbeat scheduler
        Heartbeat plan          the spec's HEARTBEAT GUIDANCE, a pure state object
    Settlement and journal
        Settlement outcome table
        Commit journal, on-disk compatible with runcycles 0.5.3
    Runtime annotations     typing.get_type_hints() on the public classes, resolved lazily
    CLI                     commands from one table
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import enum
import functools
import heapq
import inspect
import itertools
import json
import logging
import math
import operator
import os
import stat
import sys
import threading
import time
import types
import weakref
from dataclasses import field
from urllib.parse import quote, unquote, urlencode, urlsplit

# typing is for the type checker only: importing it would cost more than the
# rest of this module's own setup (annotations are strings, never evaluated).
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import asyncio
    import socket
    import ssl
    from typing import (
        Any, AsyncIterator, Awaitable, Callable, ClassVar, Coroutine, Deque, Dict, FrozenSet,
        Generator, Iterable, Iterator, List, Mapping, Sequence, Tuple, Type, TypeVar, Union,
    )

    if sys.version_info >= (3, 11):  # type checkers on 3.8-3.10 see _Model's **values
        from typing import dataclass_transform

    from dataclasses import dataclass as _dataclass

    # A field check: (dotted path, value, tolerant) -> normalised value, or _FieldError.
    _Check = Callable[[str, Any, bool], Any]
    _M = TypeVar("_M", bound="_Model")
    _T = TypeVar("_T")
    _SyncGuard = TypeVar("_SyncGuard", bound="_SyncFace")
    _AsyncGuard = TypeVar("_AsyncGuard", bound="_AsyncFace")
    _F = TypeVar("_F", bound=Callable[..., Any])
else:

    def _dataclass(cls: Any = None, **options: Any) -> Any:
        """``@dataclass`` to the type checker; at run time _shared_dataclass (see there)."""
        if cls is None:
            return lambda cls: _shared_dataclass(cls, **options)
        return _shared_dataclass(cls, **options)


if not TYPE_CHECKING or sys.version_info < (3, 11):

    def dataclass_transform(**_: Any) -> Callable[[_T], _T]:
        """For type checkers only (typing's own from Python 3.11): the models' constructors,
        from their fields."""
        return lambda cls: cls


__version__ = "0.3.0"

__all__ = [  # noqa: RUF022 - grouped as in runcycles
    # Client
    "CyclesClient", "AsyncCyclesClient",
    # Config
    "CyclesConfig",
    # Decorator
    "cycles", "set_default_client", "set_default_config",
    # Context
    "CyclesContext", "get_cycles_context",
    # Response
    "CyclesResponse",
    # Streaming
    "StreamReservation", "AsyncStreamReservation", "StreamUsage",
    # Exceptions
    "CyclesError", "CyclesProtocolError", "CyclesTransportError", "BudgetExceededError",
    "DebtOutstandingError", "OverdraftLimitExceededError", "ReservationExpiredError",
    "ReservationFinalizedError", "TenantClosedError", "CyclesConnectionError", "InvalidFieldError",
    # Models
    "Unit", "Amount", "SignedAmount", "Subject", "Action", "Caps", "Decision", "CyclesMetrics",
    "CyclesEvidenceRef", "Balance", "CommitOveragePolicy", "ErrorCode", "ErrorResponse",
    "ReservationStatus", "CommitStatus", "ReleaseStatus", "ExtendStatus", "EventStatus",
    "ReservationCreateRequest", "CommitRequest", "ReleaseRequest", "ReservationExtendRequest",
    "DecisionRequest", "EventCreateRequest", "ReservationCreateResponse", "CommitResponse",
    "ReleaseResponse", "ReservationExtendResponse", "DecisionResponse", "EventCreateResponse",
    "DryRunResult", "ReservationDetail", "ReservationSummary", "ReservationListResponse",
    "BalanceResponse",
    # Beyond runcycles
    "ReservationEvidence", "ReservationGuard", "AsyncReservationGuard", "RecoverySummary", "flush",
    "aflush", "FlushResult", "deadline",
    # Evidence
    "EvidenceVerification", "verify_evidence",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())


# ===========================================================================
# Constants
# ===========================================================================

PROTOCOL_VERSION = "0.1.25.16"

API_KEY_HEADER = "X-Cycles-API-Key"
ADMIN_API_KEY_HEADER = "X-Admin-API-Key"
IDEMPOTENCY_KEY_HEADER = "X-Idempotency-Key"
TRACEPARENT_HEADER = "traceparent"
TRACE_ID_HEADER = "X-Cycles-Trace-Id"
REQUEST_ID_HEADER = "X-Request-Id"

# Response headers kept on CyclesResponse.headers (lower-case names).
CAPTURED_HEADERS: FrozenSet[str] = frozenset({
    "x-request-id", "x-cycles-trace-id", "x-cycles-tenant", "x-ratelimit-remaining",
    "x-ratelimit-reset", "retry-after", "date", "content-type", "location",
})

RESERVATIONS_PATH = "/v1/reservations"
DECIDE_PATH = "/v1/decide"
BALANCES_PATH = "/v1/balances"
EVENTS_PATH = "/v1/events"
EVIDENCE_PATH = "/v1/evidence"
JWKS_PATH = "/v1/.well-known/cycles-jwks.json"

DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_TTL_MS = 60_000
DEFAULT_GRACE_PERIOD_MS = 5_000
DEFAULT_OVERAGE_POLICY = "ALLOW_IF_AVAILABLE"
DEFAULT_UNIT = "USD_MICROCENTS"
DEFAULT_POOL_MAXSIZE = 4
DEFAULT_MAX_CONNECTIONS = 100  # requests on the wire at once per async client and event loop
DEFAULT_USER_AGENT = (
    f"cycles-lite/{__version__} (Python {sys.version_info[0]}.{sys.version_info[1]})"
)

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_RESERVATION_ID_LENGTH = 128
MAX_SUBJECT_FIELD_LENGTH = 128
MAX_DIMENSIONS = 16
MAX_DIMENSION_VALUE_LENGTH = 256
MAX_ACTION_KIND_LENGTH = 64
MAX_ACTION_NAME_LENGTH = 256
MAX_TAGS = 10
MAX_TAG_LENGTH = 64
MAX_TTL_MS = 86_400_000
MIN_TTL_MS = 1_000
MAX_GRACE_PERIOD_MS = 60_000
MAX_EXTEND_BY_MS = 86_400_000
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# Retry-After honoured by settlement: one hour at most (a mangled header must not park spend
# for days).  The heartbeat reads it uncapped: capping there would retry before the server
# allowed.
_MAX_HONORED_RETRY_AFTER_MS = 3_600_000

SUBJECT_FIELDS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")

_HEX_DIGITS = frozenset("0123456789abcdef")


def _is_hex(value: Any, length: int) -> bool:
    """Exactly ``length`` lowercase hex characters."""
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX_DIGITS


def _is_header_value(value: Any) -> bool:
    """Printable ASCII without blanks at the ends: safe as an HTTP header value."""
    return (
        isinstance(value, str)
        and value.isascii()
        and value.isprintable()
        and value.strip() == value != ""
    )


def _parse_decimal(raw: str | None, *, signed: bool) -> int | None:
    """An integer of at most 19 ASCII digits (optionally signed) between optional blanks
    (HTTP's spaces and tabs), else None."""
    if raw is None:
        return None
    text = raw.strip(" \t")
    digits = text[1:] if signed and text[:1] in ("+", "-") else text
    if not (0 < len(digits) <= 19 and digits.isascii() and digits.isdigit()):
        return None
    return int(text)


def _new_key() -> str:
    """A fresh idempotency key in uuid4 string form (no uuid import at module load)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ===========================================================================
# Errors
# ===========================================================================


class CyclesError(Exception):
    """Base class of every error cycles-lite raises on purpose."""


class CyclesProtocolError(CyclesError):
    """The server answered with a protocol error (or, with ``status == -1``, not at all)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_code: str | None = None,
        reason_code: str | None = None,
        retry_after_ms: int | None = None,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.reason_code = reason_code
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id
        self.details = details
        self.trace_id = trace_id

    def is_budget_exceeded(self) -> bool:
        return self.error_code == "BUDGET_EXCEEDED"

    def is_overdraft_limit_exceeded(self) -> bool:
        return self.error_code == "OVERDRAFT_LIMIT_EXCEEDED"

    def is_debt_outstanding(self) -> bool:
        return self.error_code == "DEBT_OUTSTANDING"

    def is_tenant_closed(self) -> bool:
        return self.error_code == "TENANT_CLOSED"

    def is_reservation_expired(self) -> bool:
        return self.error_code == "RESERVATION_EXPIRED"

    def is_reservation_finalized(self) -> bool:
        return self.error_code == "RESERVATION_FINALIZED"

    def is_idempotency_mismatch(self) -> bool:
        return self.error_code == "IDEMPOTENCY_MISMATCH"

    def is_unit_mismatch(self) -> bool:
        return self.error_code == "UNIT_MISMATCH"

    def is_retryable(self) -> bool:
        """True when the same request may succeed later (with the same idempotency key).

        Transport failures, 5xx, 429 and the INTERNAL_ERROR / LIMIT_EXCEEDED codes.
        Unlike runcycles, an unknown error code is not retryable by itself: codes a
        newer server adds (ACTION_QUOTA_EXCEEDED, ...) are denials.
        """
        if self.status == -1 or self.status == 429 or self.status >= 500:
            return True
        return self.error_code in ("INTERNAL_ERROR", "LIMIT_EXCEEDED")


class BudgetExceededError(CyclesProtocolError):
    """Not enough budget (BUDGET_EXCEEDED)."""


class OverdraftLimitExceededError(CyclesProtocolError):
    """Debt would pass the overdraft limit, or a scope is over limit (OVERDRAFT_LIMIT_EXCEEDED)."""


class DebtOutstandingError(CyclesProtocolError):
    """Outstanding debt blocks new reservations (DEBT_OUTSTANDING)."""


class TenantClosedError(CyclesProtocolError):
    """The owning tenant is CLOSED (TENANT_CLOSED); not retryable."""


class ReservationExpiredError(CyclesProtocolError):
    """The reservation expired (RESERVATION_EXPIRED, HTTP 410)."""


class ReservationFinalizedError(CyclesProtocolError):
    """The reservation was already committed or released (RESERVATION_FINALIZED)."""


class CyclesTransportError(CyclesError):
    """The request got no HTTP answer: connection refused or dropped, timeout, TLS failure."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class CyclesConnectionError(CyclesProtocolError, CyclesTransportError):
    """The server could not be reached or did not answer (connection refused, DNS,
    TLS, timeout, dropped connection), raised where runcycles raises
    ``CyclesProtocolError(status=-1)``.

    Catch it as either class; ``status`` is -1 and ``cause`` the underlying error.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        CyclesProtocolError.__init__(self, message, status=-1)
        self.cause = cause


_ERROR_CLASSES: Dict[str, Type[CyclesProtocolError]] = {
    "BUDGET_EXCEEDED": BudgetExceededError,
    "OVERDRAFT_LIMIT_EXCEEDED": OverdraftLimitExceededError,
    "DEBT_OUTSTANDING": DebtOutstandingError,
    "TENANT_CLOSED": TenantClosedError,
    "RESERVATION_EXPIRED": ReservationExpiredError,
    "RESERVATION_FINALIZED": ReservationFinalizedError,
}


def _protocol_error(response: CyclesResponse, prefix: str) -> CyclesProtocolError:
    """The one place that turns an unsuccessful response into a typed exception.

    Never raises, whatever the body holds.
    """
    try:
        return _build_protocol_error(response, prefix)
    except Exception:  # a hostile body must not break the caller
        return CyclesProtocolError(prefix, status=getattr(response, "status", 0))


def _public_cause(exc: BaseException | None) -> BaseException | None:
    """``exc`` for users: one of the transport's private classes (a TimeoutError for a
    passed attempt deadline, an OSError for a malformed answer) becomes its nearest
    public base with the same message.  Internally the original stays on the response."""
    if exc is None or not type(exc).__name__.startswith("_"):
        return exc
    public = next(k for k in type(exc).__mro__ if not k.__name__.startswith("_"))
    replacement: BaseException
    try:
        replacement = public(*exc.args)
    except Exception:  # a base with another signature: its message is kept all the same
        replacement = OSError(str(exc))
    replacement.__cause__ = exc.__cause__
    return replacement


def _build_protocol_error(response: CyclesResponse, prefix: str) -> CyclesProtocolError:
    if response.is_transport_error:
        return CyclesConnectionError(
            f"{prefix}: {response.error_message or 'transport error'}",
            cause=_public_cause(response.transport_exception),
        )
    body = response.body if isinstance(response.body, dict) else {}
    error_code = _error_code(response)
    message = _str_or_none(body.get("message")) or response.error_message
    retry_after_ms = body.get("retry_after_ms")
    if not _is_int(retry_after_ms, 0, INT64_MAX):
        retry_after_ms = response.retry_after_ms_header
    details = body.get("details")
    exc_class = _ERROR_CLASSES.get(error_code or "", CyclesProtocolError)
    return exc_class(
        f"{prefix}: {message}" if message else prefix,
        status=response.status,
        error_code=error_code,
        reason_code=_str_or_none(body.get("reason_code")) or error_code,
        retry_after_ms=retry_after_ms,
        request_id=_str_or_none(body.get("request_id")) or response.request_id,
        details=details if isinstance(details, dict) else None,
        trace_id=_str_or_none(body.get("trace_id")) or response.trace_id,
    )


def _error_code(response: CyclesResponse) -> str | None:
    """The one reading of an error code: the ``error`` string of a JSON object body
    (None when the body is not an object, or the field is absent, empty or not a string)."""
    body = response.body
    return _str_or_none(body.get("error")) if isinstance(body, dict) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_int(value: Any, lo: int, hi: int) -> bool:
    """An int in [lo, hi]; booleans and floats are not ints here."""
    return type(value) is int and lo <= value <= hi


# ===========================================================================
# Models
# ===========================================================================


class Unit(str, enum.Enum):
    """Unit of an amount."""

    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class CommitOveragePolicy(str, enum.Enum):
    """What a commit (or event) does when the actual exceeds what is available."""

    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


class Decision(str, enum.Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class ReservationStatus(str, enum.Enum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class CommitStatus(str, enum.Enum):
    COMMITTED = "COMMITTED"


class ReleaseStatus(str, enum.Enum):
    RELEASED = "RELEASED"


class ExtendStatus(str, enum.Enum):
    ACTIVE = "ACTIVE"


class EventStatus(str, enum.Enum):
    APPLIED = "APPLIED"


class ErrorCode(str, enum.Enum):
    """Every error code of the v0.1.25 spec, plus UNKNOWN for codes it does not list."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    BUDGET_FROZEN = "BUDGET_FROZEN"
    BUDGET_CLOSED = "BUDGET_CLOSED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    RESERVATION_FINALIZED = "RESERVATION_FINALIZED"
    IDEMPOTENCY_MISMATCH = "IDEMPOTENCY_MISMATCH"
    UNIT_MISMATCH = "UNIT_MISMATCH"
    OVERDRAFT_LIMIT_EXCEEDED = "OVERDRAFT_LIMIT_EXCEEDED"
    DEBT_OUTSTANDING = "DEBT_OUTSTANDING"
    MAX_EXTENSIONS_EXCEEDED = "MAX_EXTENSIONS_EXCEEDED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    TENANT_CLOSED = "TENANT_CLOSED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    UNKNOWN = "UNKNOWN"

    @property
    def is_retryable(self) -> bool:
        """INTERNAL_ERROR and LIMIT_EXCEEDED; not UNKNOWN (see CyclesProtocolError.is_retryable)."""
        return self in (ErrorCode.INTERNAL_ERROR, ErrorCode.LIMIT_EXCEEDED)

    @classmethod
    def from_string(cls, value: str | None) -> ErrorCode | None:
        """The member for ``value``; UNKNOWN for a code this client does not know; None for None."""
        return None if value is None else cls.__members__.get(value, cls.UNKNOWN)


# Validation helpers.  A check takes (field path, value, tolerant) and returns the
# normalised value or raises _FieldError; ``tolerant`` is True while parsing a
# server response (unknown fields are kept, never refused).


class InvalidFieldError(ValueError):
    """Invalid input: a ValueError whose message starts with the dotted path of the bad
    field (``path``), then the ``problem``.  Raised before anything is sent."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def under(self, parent: str) -> InvalidFieldError:
        if not parent:
            return self
        joiner = "" if self.path.startswith("[") else "."
        return InvalidFieldError(parent + joiner + self.path, self.problem)


_FieldError = InvalidFieldError  # the short name used by the field checks


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_kind(value: Any, expected: type, name: str = "client") -> None:
    """TypeError naming the parameter unless ``value`` is an ``expected``."""
    if not isinstance(value, expected):
        raise TypeError(f"{name}: expected a {expected.__name__}, got {_type_name(value)}")


def _str_check(max_len: int | None = None, min_len: int = 0) -> _Check:
    def check(path: str, value: Any, tolerant: bool) -> Any:
        if not isinstance(value, str):
            raise _FieldError(path, f"must be a string, got {_type_name(value)}")
        if len(value) < min_len:
            raise _FieldError(path, f"must be at least {min_len} characters")
        if max_len is not None and len(value) > max_len:
            raise _FieldError(path, f"must be at most {max_len} characters (got {len(value)})")
        return value

    return check


def _int_check(lo: int = INT64_MIN, hi: int = INT64_MAX, what: str = "an integer") -> _Check:
    def check(path: str, value: Any, tolerant: bool) -> Any:
        if type(value) is not int or not lo <= value <= hi:  # _is_int, inlined: a hot path
            raise _FieldError(path, f"must be {what} in [{lo}, {hi}], got {value!r}")
        return value

    return check


def _rule(valid: Callable[[Any], bool], problem: str) -> _Check:
    """A check from a predicate.  ``problem`` may show the refused value's ``{type}``
    or ``{value!r}`` (so never the value of a secret)."""

    def check(path: str, value: Any, tolerant: bool) -> Any:
        if not valid(value):
            raise _FieldError(path, problem.format(value=value, type=_type_name(value)))
        return value

    return check


_bool_check = _rule(lambda value: isinstance(value, bool), "must be a boolean, got {type}")


def _enum_check(enum_class: Type[enum.Enum]) -> _Check:
    """Known values become members; an unknown string stays a plain str (forward compatible)."""
    members = {member.value: member for member in enum_class}

    def check(path: str, value: Any, tolerant: bool) -> Any:
        if not isinstance(value, str):
            raise _FieldError(path, f"must be a string, got {_type_name(value)}")
        return members.get(value, value)

    return check


def _list_check(item: _Check, max_items: int | None = None) -> _Check:
    def check(path: str, value: Any, tolerant: bool) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _FieldError(path, f"must be a list, got {_type_name(value)}")
        if max_items is not None and len(value) > max_items:
            raise _FieldError(path, f"must have at most {max_items} items (got {len(value)})")
        return [item(f"{path}[{i}]", v, tolerant) for i, v in enumerate(value)]

    return check


def _object_check(path: str, value: Any, tolerant: bool) -> Any:
    """A free-form JSON object (metadata, details, custom): string keys, JSON values.

    In a request every value must be one JSON can carry (finite numbers, no sets,
    bytes or objects), checked now rather than failing on the wire.  A parsed
    response came from JSON already: only its shape is checked.
    """
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _FieldError(path, "must be a dict with string keys")
    if not tolerant:
        try:
            _check_json_values(value, [])
        except _FieldError as exc:
            raise _FieldError(path + exc.path, exc.problem) from None
        except RecursionError:
            raise _FieldError(path, "is nested too deeply") from None
    return value


def _check_json_values(value: Any, parents: List[int]) -> None:
    """_FieldError (its path relative to ``value``) for the first value JSON cannot carry.

    The path is only built on the way out of a failure: a valid object costs no strings.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _FieldError("", f"must be a finite number, got {value!r}")
        return
    if not isinstance(value, (dict, list, tuple)):
        raise _FieldError("", f"must be a JSON value, got {_type_name(value)}")
    if id(value) in parents:
        raise _FieldError("", "must not contain itself (a circular reference)")
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise _FieldError("", "must be a dict with string keys")
    parents.append(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        try:
            _check_json_values(item, parents)
        except _FieldError as exc:
            raise _FieldError(f"[{key!r}]" + exc.path, exc.problem) from None
    parents.pop()


def _dimensions_check(path: str, value: Any, tolerant: bool) -> Any:
    _object_check(path, value, tolerant)
    if len(value) > MAX_DIMENSIONS:
        raise _FieldError(path, f"must have at most {MAX_DIMENSIONS} entries (got {len(value)})")
    item = _str_check(MAX_DIMENSION_VALUE_LENGTH)
    for key, v in value.items():
        item(f"{path}[{key!r}]", v, tolerant)
    return value


_evidence_id_check = _rule(lambda value: _is_hex(value, 64), "must be 64 lowercase hex characters")


def _is_absolute_uri(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(urlsplit(value).scheme)
    except ValueError:  # urlsplit refuses some strings ("http://["): not a URI either
        return False


_absolute_uri_check = _rule(_is_absolute_uri, "must be an absolute URI")


def _dump_value(value: Any, exclude_none: bool, json_mode: bool) -> Any:
    if isinstance(value, _Model):
        return value.model_dump(exclude_none=exclude_none, mode="json" if json_mode else "python")
    if isinstance(value, enum.Enum):
        return value.value if json_mode else value
    if isinstance(value, list):
        return [_dump_value(v, exclude_none, json_mode) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v, exclude_none, json_mode) for k, v in value.items()}
    return value


class _ModelSignature:
    """A model class's ``__signature__`` for ``inspect.signature``: its fields as keyword
    arguments (like pydantic's), built when first asked for."""

    def __get__(self, model: Any, cls: Type[_Model]) -> inspect.Signature:
        keyword = inspect.Parameter.KEYWORD_ONLY
        return inspect.Signature([
            inspect.Parameter(name, keyword, **({} if name in cls._required else {"default": None}))
            for name in cls._fields
        ])


class _Field:
    """What ``_field(...)`` leaves in a model's class body until the class is made."""

    __slots__ = ("check", "required")

    def __init__(self, check: _Check, required: bool) -> None:
        self.check = check
        self.required = required


def _field(check: _Check, *, default: Any = ...) -> Any:
    """A model field and its check, declared together: ``amount: int = _field(_int64)``
    (required) or ``ttl_ms: int | None = _field(_ttl, default=None)`` (optional)."""
    return _Field(check, required=default is ...)


@dataclass_transform(kw_only_default=True, field_specifiers=(_field,))
class _Model:
    """Base of the protocol models: validation at construction, dump, tolerant parse.

    Each field is declared once, with its check (``_field``).  The constructor takes
    the fields as keywords (like runcycles' pydantic models) and checks each given
    value; a required field must be given.  ``extra`` keeps the unknown fields of a
    parsed response (a newer server may add fields; they are never refused).
    ``__init__``, ``__repr__`` and ``__eq__`` are written once here, for every model:
    generating them per class (``@dataclass``) would cost import time.
    """

    # Collected from the field declarations: name -> check, and the required names.
    _fields: ClassVar[Dict[str, _Check]] = {}
    _required: ClassVar[Tuple[str, ...]] = ()
    # Request models refuse unknown fields in model_validate too; the server would.
    _strict_validate: ClassVar[bool] = False
    __signature__ = _ModelSignature()
    extra: Dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        checks = dict(cls._fields)
        for name, declared in list(vars(cls).items()):
            if isinstance(declared, _Field):
                checks[name] = declared.check
                if declared.required:
                    cls._required += (name,)
                delattr(cls, name)
        cls._fields = checks

    def __init__(self, **values: Any) -> None:
        unknown = values.keys() - self._fields.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(unknown)}")
        self._load(values, tolerant=False)

    def _load(self, data: Mapping[str, Any], tolerant: bool) -> None:
        """Check each value of ``data`` and set every field (None when absent).

        Unknown fields go to ``extra`` when ``tolerant`` (parsing a response), else raise.
        """
        fields = self._fields
        known: Dict[str, Any] = {}
        extra: Dict[str, Any] = {}
        for key, value in data.items():
            check = fields.get(key)
            if check is None:
                if not tolerant:
                    raise _FieldError(str(key), "unknown field")
                extra[key] = value
            elif value is not None:
                try:
                    known[key] = check(key, value, tolerant)
                except _FieldError:
                    if not tolerant or key in self._required:
                        raise
                    # A malformed optional field must not make the whole answer unreadable
                    # (a usable create answer would leak its reservation): keep it raw.
                    extra[key] = value
        for name in self._required:
            if name not in known:
                raise _FieldError(name, "field required")
        vars(self).update(dict.fromkeys(fields), **known)
        self.extra = extra

    @classmethod
    def _parse(cls: Type[_M], path: str, value: Any, tolerant: bool) -> _M:
        """The check of a field holding this model: a model as it is, a dict parsed."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            article = "an" if cls.__name__[0] in "AEIOU" else "a"
            problem = f"must be {article} {cls.__name__} or a dict, got {_type_name(value)}"
            raise _FieldError(path, problem)
        model = cls.__new__(cls)
        try:
            model._load(value, tolerant)
        except _FieldError as exc:
            raise exc.under(path) from None
        return model

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, like pydantic models

    @classmethod
    def model_validate(cls: Type[_M], data: Any) -> _M:
        """Parse a dict (e.g. a response body).

        Raises ValueError naming the field when a required field is missing or a
        field has the wrong type.  Unknown fields go to ``extra`` (request models
        refuse them), and unknown enum values stay plain strings.
        """
        if not isinstance(data, (cls, dict)):
            raise _FieldError(cls.__name__, f"expected a dict, got {_type_name(data)}")
        return cls._parse("", data, tolerant=not cls._strict_validate)

    def model_dump(
        self, *, mode: str = "python", exclude_none: bool = False, by_alias: bool = False
    ) -> Dict[str, Any]:
        """The model as a dict, like pydantic's: ``mode="json"`` gives enum values as strings."""
        json_mode = mode == "json"
        out: Dict[str, Any] = {}
        for name in self._fields:
            value = getattr(self, name)
            if value is None and exclude_none:
                continue
            if isinstance(value, (_Model, enum.Enum, list, dict)):  # else: as it is
                value = _dump_value(value, exclude_none, json_mode)
            out[name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def model_dump_json(self, *, exclude_none: bool = False) -> str:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=exclude_none), separators=(",", ":")
        )

    def model_copy(self: _M, *, update: Mapping[str, Any] | None = None) -> _M:
        values = {name: getattr(self, name) for name in self._fields}
        copy = type(self)(**dict(values, **(update or {})))
        copy.extra = dict(self.extra)
        return copy


_int64 = _int_check(0, INT64_MAX, "a non-negative int64")
_any_str = _str_check()
_idempotency_key = _str_check(MAX_IDEMPOTENCY_KEY_LENGTH, min_len=1)
_str_list = _list_check(_any_str)
_subject_str = _str_check(MAX_SUBJECT_FIELD_LENGTH)


class Amount(_Model):
    """A non-negative int64 amount in one unit."""

    unit: Unit | str = _field(_enum_check(Unit))
    amount: int = _field(_int64)


class SignedAmount(_Model):
    """An amount that may be negative (only ``Balance.remaining``)."""

    unit: Unit | str = _field(_enum_check(Unit))
    amount: int = _field(_int_check(what="an int64"))


class Subject(_Model):
    """Who spends: the scope hierarchy (at least one standard field in a request)."""

    tenant: str | None = _field(_subject_str, default=None)
    workspace: str | None = _field(_subject_str, default=None)
    app: str | None = _field(_subject_str, default=None)
    workflow: str | None = _field(_subject_str, default=None)
    agent: str | None = _field(_subject_str, default=None)
    toolset: str | None = _field(_subject_str, default=None)
    dimensions: dict[str, str] | None = _field(_dimensions_check, default=None)

    def has_at_least_one_standard_field(self) -> bool:
        return any(map(vars(self).get, SUBJECT_FIELDS))


class Action(_Model):
    """What is being done: ``kind`` (e.g. llm.completion), ``name``, optional tags."""

    kind: str = _field(_str_check(MAX_ACTION_KIND_LENGTH))
    name: str = _field(_str_check(MAX_ACTION_NAME_LENGTH))
    tags: list[str] | None = _field(_list_check(_str_check(MAX_TAG_LENGTH), MAX_TAGS), default=None)


class Caps(_Model):
    """Limits that come with an ALLOW_WITH_CAPS decision (advisory for the client)."""

    max_tokens: int | None = _field(_int64, default=None)
    max_steps_remaining: int | None = _field(_int64, default=None)
    tool_allowlist: list[str] | None = _field(_list_check(_str_check(256)), default=None)
    tool_denylist: list[str] | None = _field(_list_check(_str_check(256)), default=None)
    cooldown_ms: int | None = _field(_int64, default=None)

    def is_tool_allowed(self, tool: str) -> bool:
        """The spec's precedence: a non-empty allowlist wins, then a non-empty denylist."""
        if self.tool_allowlist:
            return tool in self.tool_allowlist
        if self.tool_denylist:
            return tool not in self.tool_denylist
        return True


class CyclesMetrics(_Model):
    """Standard metrics sent with a commit or event."""

    tokens_input: int | None = _field(_int64, default=None)
    tokens_output: int | None = _field(_int64, default=None)
    latency_ms: int | None = _field(_int64, default=None)
    model_version: str | None = _field(_str_check(128), default=None)
    custom: dict[str, Any] | None = _field(_object_check, default=None)

    def put_custom(self, key: str, value: Any) -> None:
        if self.custom is None:
            self.custom = {}
        self.custom[key] = value

    def is_empty(self) -> bool:
        measured = (self.tokens_input, self.tokens_output, self.latency_ms, self.model_version)
        return measured == (None, None, None, None) and not self.custom


_amount = Amount._parse


class Balance(_Model):
    """One scope's budget state; ``remaining`` may be negative."""

    scope: str = _field(_any_str)
    scope_path: str = _field(_any_str)
    remaining: SignedAmount = _field(SignedAmount._parse)
    reserved: Amount | None = _field(_amount, default=None)
    spent: Amount | None = _field(_amount, default=None)
    allocated: Amount | None = _field(_amount, default=None)
    debt: Amount | None = _field(_amount, default=None)
    overdraft_limit: Amount | None = _field(_amount, default=None)
    is_over_limit: bool | None = _field(_bool_check, default=None)


class CyclesEvidenceRef(_Model):
    """Where to fetch a signed evidence envelope (``get_evidence(evidence_id)``)."""

    evidence_id: str = _field(_evidence_id_check)
    cycles_evidence_url: str = _field(_absolute_uri_check)


_evidence_ref = CyclesEvidenceRef._parse


class ReservationEvidence(_Model):
    """Evidence references of a reservation's reserve, commit and release."""

    reserve: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)
    commit: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)
    release: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)


_balances = _list_check(Balance._parse)
_caps = Caps._parse
_subject = Subject._parse
_action = Action._parse
_metrics = CyclesMetrics._parse
_overage_policy = _enum_check(CommitOveragePolicy)


class _Request(_Model):
    """Request bodies: refuse unknown fields, need a subject with a standard field."""

    _strict_validate = True

    def _load(self, data: Mapping[str, Any], tolerant: bool) -> None:
        super()._load(data, tolerant)
        subject = getattr(self, "subject", None)
        if isinstance(subject, Subject) and not subject.has_at_least_one_standard_field():
            raise _FieldError("subject", "must have at least one of " + ", ".join(SUBJECT_FIELDS))


class ReservationCreateRequest(_Request):
    """Body of ``POST /v1/reservations``."""

    idempotency_key: str = _field(_idempotency_key)
    subject: Subject = _field(_subject)
    action: Action = _field(_action)
    estimate: Amount = _field(_amount)
    ttl_ms: int | None = _field(_int_check(MIN_TTL_MS, MAX_TTL_MS), default=None)
    grace_period_ms: int | None = _field(_int_check(0, MAX_GRACE_PERIOD_MS), default=None)
    overage_policy: CommitOveragePolicy | str | None = _field(_overage_policy, default=None)
    dry_run: bool | None = _field(_bool_check, default=None)
    metadata: dict[str, Any] | None = _field(_object_check, default=None)


class CommitRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/commit``."""

    idempotency_key: str = _field(_idempotency_key)
    actual: Amount = _field(_amount)
    metrics: CyclesMetrics | None = _field(_metrics, default=None)
    metadata: dict[str, Any] | None = _field(_object_check, default=None)


class ReleaseRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/release``."""

    idempotency_key: str = _field(_idempotency_key)
    reason: str | None = _field(_str_check(256), default=None)


class ReservationExtendRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/extend`` (adds to the current expiry)."""

    idempotency_key: str = _field(_idempotency_key)
    extend_by_ms: int = _field(_int_check(1, MAX_EXTEND_BY_MS))
    metadata: dict[str, Any] | None = _field(_object_check, default=None)


class DecisionRequest(_Request):
    """Body of ``POST /v1/decide`` (a hint only; it holds nothing)."""

    idempotency_key: str = _field(_idempotency_key)
    subject: Subject = _field(_subject)
    action: Action = _field(_action)
    estimate: Amount = _field(_amount)
    metadata: dict[str, Any] | None = _field(_object_check, default=None)


class EventCreateRequest(_Request):
    """Body of ``POST /v1/events``: a direct debit without a reservation."""

    idempotency_key: str = _field(_idempotency_key)
    subject: Subject = _field(_subject)
    action: Action = _field(_action)
    actual: Amount = _field(_amount)
    overage_policy: CommitOveragePolicy | str | None = _field(_overage_policy, default=None)
    metrics: CyclesMetrics | None = _field(_metrics, default=None)
    client_time_ms: int | None = _field(_int64, default=None)
    metadata: dict[str, Any] | None = _field(_object_check, default=None)


class _Decided:
    decision: Decision | str

    def is_allowed(self) -> bool:
        return self.decision in (Decision.ALLOW, Decision.ALLOW_WITH_CAPS)

    def is_denied(self) -> bool:
        return self.decision == Decision.DENY


class ReservationCreateResponse(_Decided, _Model):
    """Answer to a reservation (live or dry run)."""

    decision: Decision | str = _field(_enum_check(Decision))
    reservation_id: str | None = _field(_str_check(min_len=1), default=None)
    affected_scopes: list[str] = _field(_str_list)
    expires_at_ms: int | None = _field(_int64, default=None)
    remaining_ttl_ms: int | None = _field(_int64, default=None)
    scope_path: str | None = _field(_any_str, default=None)
    reserved: Amount | None = _field(_amount, default=None)
    caps: Caps | None = _field(_caps, default=None)
    reason_code: str | None = _field(_any_str, default=None)
    retry_after_ms: int | None = _field(_int64, default=None)
    balances: list[Balance] | None = _field(_balances, default=None)
    cycles_evidence: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)


class CommitResponse(_Model):
    """Answer to a commit; ``charged`` may be less than the actual."""

    status: CommitStatus | str = _field(_enum_check(CommitStatus))
    charged: Amount = _field(_amount)
    released: Amount | None = _field(_amount, default=None)
    balances: list[Balance] | None = _field(_balances, default=None)
    cycles_evidence: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)


class ReleaseResponse(_Model):
    """Answer to a release."""

    status: ReleaseStatus | str = _field(_enum_check(ReleaseStatus))
    released: Amount = _field(_amount)
    balances: list[Balance] | None = _field(_balances, default=None)
    cycles_evidence: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)


class ReservationExtendResponse(_Model):
    """Answer to an extend; ``expires_at_ms`` is authoritative."""

    status: ExtendStatus | str = _field(_enum_check(ExtendStatus))
    expires_at_ms: int = _field(_int64)
    remaining_ttl_ms: int | None = _field(_int64, default=None)
    balances: list[Balance] | None = _field(_balances, default=None)


class DecisionResponse(_Decided, _Model):
    """Answer to ``decide``."""

    decision: Decision | str = _field(_enum_check(Decision))
    caps: Caps | None = _field(_caps, default=None)
    reason_code: str | None = _field(_any_str, default=None)
    retry_after_ms: int | None = _field(_int64, default=None)
    affected_scopes: list[str] | None = _field(_str_list, default=None)
    cycles_evidence: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)


class EventCreateResponse(_Model):
    """Answer to an event (HTTP 201)."""

    status: EventStatus | str = _field(_enum_check(EventStatus))
    event_id: str = _field(_any_str)
    charged: Amount | None = _field(_amount, default=None)
    balances: list[Balance] | None = _field(_balances, default=None)


class DryRunResult(_Decided, _Model):
    """What a ``dry_run`` guarded call returns instead of running the function."""

    decision: Decision | str = _field(_enum_check(Decision))
    caps: Caps | None = _field(_caps, default=None)
    affected_scopes: list[str] | None = _field(_str_list, default=None)
    scope_path: str | None = _field(_any_str, default=None)
    reserved: Amount | None = _field(_amount, default=None)
    balances: list[Balance] | None = _field(_balances, default=None)
    reason_code: str | None = _field(_any_str, default=None)
    retry_after_ms: int | None = _field(_int64, default=None)

    def has_caps(self) -> bool:
        return self.caps is not None


class ErrorResponse(_Model):
    """The error body (the code is kept as the raw string; ``error_code`` maps it)."""

    error: str = _field(_any_str)
    message: str = _field(_any_str)
    request_id: str = _field(_any_str)
    trace_id: str | None = _field(_any_str, default=None)
    details: dict[str, Any] | None = _field(_object_check, default=None)
    cycles_evidence: CyclesEvidenceRef | None = _field(_evidence_ref, default=None)

    @property
    def error_code(self) -> ErrorCode | None:
        return ErrorCode.from_string(self.error)




class _ReservationView:
    status: ReservationStatus | str

    def is_active(self) -> bool:
        return self.status == ReservationStatus.ACTIVE

    def is_committed(self) -> bool:
        return self.status == ReservationStatus.COMMITTED

    def is_released(self) -> bool:
        return self.status == ReservationStatus.RELEASED

    def is_expired(self) -> bool:
        return self.status == ReservationStatus.EXPIRED


class _ReservationRecord(_ReservationView, _Model):
    """The fields ``GET /v1/reservations/{id}`` and a listing row share."""

    reservation_id: str = _field(_any_str)
    status: ReservationStatus | str = _field(_enum_check(ReservationStatus))
    subject: Subject = _field(_subject)
    action: Action = _field(_action)
    reserved: Amount = _field(_amount)
    created_at_ms: int = _field(_int64)
    expires_at_ms: int = _field(_int64)
    scope_path: str = _field(_any_str)
    affected_scopes: list[str] = _field(_str_list)
    idempotency_key: str | None = _field(_any_str, default=None)
    committed: Amount | None = _field(_amount, default=None)
    finalized_at_ms: int | None = _field(_int64, default=None)
    metadata: dict[str, Any] | None = _field(_object_check, default=None)
    committed_metadata: dict[str, Any] | None = _field(_object_check, default=None)
    evidence: ReservationEvidence | None = _field(ReservationEvidence._parse, default=None)


class ReservationDetail(_ReservationRecord):
    """``GET /v1/reservations/{id}``."""


class ReservationSummary(_ReservationRecord):
    """One row of ``GET /v1/reservations``."""


class ReservationListResponse(_Model):
    """A page of ``GET /v1/reservations``."""

    reservations: list[ReservationSummary] = _field(
        _list_check(ReservationSummary._parse)
    )
    has_more: bool | None = _field(_bool_check, default=None)
    next_cursor: str | None = _field(_any_str, default=None)


class BalanceResponse(_Model):
    """A page of ``GET /v1/balances``."""

    balances: list[Balance] = _field(_balances)
    has_more: bool | None = _field(_bool_check, default=None)
    next_cursor: str | None = _field(_any_str, default=None)


class _Factory:
    """The default a signature shows for a field with a ``default_factory``."""

    def __repr__(self) -> str:
        return "<factory>"


def _shared_dataclass(cls: Any, *, frozen: bool = False) -> Any:
    """``@dataclass`` (``eq=True``) whose ``__init__``, ``__repr__``, ``__eq__`` (and when
    frozen ``__setattr__``, ``__delattr__``, ``__hash__``) are closures made here rather
    than code generated with ``exec``, which is most of a dataclass's import cost.
    ``dataclasses.fields``, ``replace`` and ``asdict`` see a dataclass;
    ``inspect.signature`` the parameters of the generated ``__init__``; the type
    checker sees ``@dataclass`` itself."""
    cls = dataclasses.dataclass(init=False, repr=False, eq=False)(cls)
    params = cls.__dataclass_params__  # what @dataclass reads when a user subclasses cls
    params.eq, params.frozen = True, frozen
    fields = dataclasses.fields(cls)
    missing = dataclasses.MISSING
    positional = tuple(f.name for f in fields if f.init)
    known = frozenset(positional)
    names = frozenset(f.name for f in fields)
    defaults = {f.name: f.default for f in fields if f.default is not missing}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not missing}
    required = known - defaults.keys() - factories.keys()
    compared = [f.name for f in fields if f.compare]
    post_init = getattr(cls, "__post_init__", None)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            if len(args) > len(positional) or not kwargs.keys().isdisjoint(positional[: len(args)]):
                raise TypeError(f"{cls.__name__}() got too many or repeated arguments")
            kwargs.update(zip(positional, args))
        if not required <= kwargs.keys() <= known:  # names only below: a value may be secret
            problems = [f"missing {name!r}" for name in sorted(required - kwargs.keys())]
            problems += [f"unexpected {name!r}" for name in sorted(kwargs.keys() - known)]
            raise TypeError(f"{cls.__name__}(): " + ", ".join(problems))
        state = vars(self)
        state.update(defaults)
        state.update(kwargs)
        for name, make in factories.items():
            if name not in kwargs:
                state[name] = make()
        if post_init is not None:
            self.__post_init__()

    def __repr__(self: Any) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields if f.repr)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return [getattr(self, n) for n in compared] == [getattr(other, n) for n in compared]

    def __hash__(self: Any) -> int:
        return hash(tuple(getattr(self, n) for n in compared))

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    Parameter = inspect.Parameter
    shown = {name: _Factory() for name in factories}
    shown.update(defaults)
    parameters = [
        Parameter(name, Parameter.POSITIONAL_OR_KEYWORD, default=shown.get(name, Parameter.empty))
        for name in ("self", *positional)
    ]
    __init__.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    methods: Dict[str, Any] = {"__init__": __init__, "__repr__": __repr__, "__eq__": __eq__}
    if frozen:
        methods.update(__setattr__=__setattr__, __delattr__=__delattr__, __hash__=__hash__)
    for name, method in methods.items():
        if name not in vars(cls):
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, method)
    if "__hash__" not in vars(cls):
        cls.__hash__ = None  # mutable and compared by value
    return cls


@_dataclass
class CyclesContext:
    """The reservation a guarded call runs under (``get_cycles_context()``).

    ``metrics`` and ``commit_metadata`` are written by the guarded code and go
    into the commit.  Beyond runcycles, the heartbeat reports on the lease here:
    ``heartbeat_error`` is the last failed extend (None again after a success),
    ``heartbeat_stopped`` why the heartbeat gave up (None while it runs), and
    ``lease_lost`` is True once it gave up: the reservation will lapse (or already
    did) if the work goes on.  Settlement still runs (heartbeat policy ``warn``).
    """

    reservation_id: str
    estimate: int
    decision: Decision | str
    caps: Caps | None = None
    expires_at_ms: int | None = None
    affected_scopes: list[str] | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    balances: list[Balance] | None = None
    metrics: CyclesMetrics | None = None
    commit_metadata: dict[str, Any] | None = None
    heartbeat_error: str | None = None
    heartbeat_stopped: str | None = None

    @property
    def lease_lost(self) -> bool:
        return self.heartbeat_stopped is not None

    def has_caps(self) -> bool:
        return self.caps is not None

    def update_expires_at_ms(self, new_expires_at_ms: int) -> None:
        self.expires_at_ms = new_expires_at_ms


@_dataclass
class StreamUsage:
    """Usage accumulated while streaming; read when the stream reservation settles."""

    tokens_input: int = 0
    tokens_output: int = 0
    actual_cost: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)

    def add_input_tokens(self, count: int) -> None:
        self.tokens_input += count

    def add_output_tokens(self, count: int) -> None:
        self.tokens_output += count

    def set_actual_cost(self, amount: int) -> None:
        self.actual_cost = amount


@_dataclass
class CyclesResponse:
    """The outcome of one call: an HTTP answer (any status) or a transport failure (status -1)."""

    status: int
    body: dict[str, Any] | None = None
    error_message: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    _is_transport_error: bool = field(default=False, repr=False)
    transport_exception: BaseException | None = field(default=None, repr=False)

    @classmethod
    def success(
        cls, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> CyclesResponse:
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def http_error(
        cls,
        status: int,
        error_message: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> CyclesResponse:
        return cls(status=status, body=body, error_message=error_message, headers=headers or {})

    @classmethod
    def transport_error(cls, ex: BaseException) -> CyclesResponse:
        return cls(
            status=-1,
            error_message=_transport_failure_message(ex),
            _is_transport_error=True,
            transport_exception=ex,
        )

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id") or _str_or_none(
            self.get_body_attribute("request_id")
        )

    @property
    def trace_id(self) -> str | None:
        """The server's trace id (``X-Cycles-Trace-Id``, else the error body's ``trace_id``)."""
        return self.headers.get("x-cycles-trace-id") or _str_or_none(
            self.get_body_attribute("trace_id")
        )

    @property
    def cycles_tenant(self) -> str | None:
        return self.headers.get("x-cycles-tenant")

    @property
    def rate_limit_remaining(self) -> int | None:
        """``X-RateLimit-Remaining`` (-1 means unlimited); None when absent or malformed."""
        return _header_int(self.headers.get("x-ratelimit-remaining"))

    @property
    def rate_limit_reset(self) -> int | None:
        """``X-RateLimit-Reset`` (Unix seconds); None when absent or malformed."""
        return _header_int(self.headers.get("x-ratelimit-reset"))

    @property
    def retry_after_ms_header(self) -> int | None:
        """``Retry-After`` in ms, uncapped; delta-seconds only (HTTP-date, garbage or
        overflow: None)."""
        return _parse_retry_after_ms(self.headers.get("retry-after"), cap_ms=None)

    @property
    def server_date_ms(self) -> int | None:
        """The ``Date`` header as epoch ms (informational; never used for lease arithmetic)."""
        raw = self.headers.get("date")
        if raw is None:
            return None
        from email.utils import parsedate_to_datetime

        try:
            return int(parsedate_to_datetime(raw).timestamp() * 1000)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def is_client_error(self) -> bool:
        return 400 <= self.status < 500

    @property
    def is_server_error(self) -> bool:
        return 500 <= self.status < 600

    @property
    def is_transport_error(self) -> bool:
        return self._is_transport_error

    def get_body_attribute(self, key: str) -> Any:
        return self.body.get(key) if isinstance(self.body, dict) else None

    def get_error_response(self) -> ErrorResponse | None:
        """The parsed error body, or None when there is none or it lacks a required field."""
        if not isinstance(self.body, dict):
            return None
        try:
            return ErrorResponse.model_validate(self.body)
        except ValueError:
            return None


def _parse_retry_after_ms(
    value: str | None, *, cap_ms: int | None = _MAX_HONORED_RETRY_AFTER_MS
) -> int | None:
    """Retry-After as milliseconds: ASCII delta-seconds only, else None.

    HTTP-dates, signs, fractions, garbage and values whose millisecond form
    overflows int64 are invalid (None). The result is capped at ``cap_ms``
    (one hour by default, the bounded-delay policy for settlement). The
    heartbeat passes ``cap_ms=None``: capping there would invent an earlier
    retry than the server allowed.
    """
    seconds = _parse_decimal(value, signed=False)
    if seconds is None or seconds > INT64_MAX // 1000:
        return None
    return seconds * 1000 if cap_ms is None else min(seconds * 1000, cap_ms)


def _header_int(raw: str | None) -> int | None:
    value = _parse_decimal(raw, signed=True)
    return value if value is not None and INT64_MIN <= value <= INT64_MAX else None


# The schema-validity judgement: is this the operation's expected success answer?
# Derived from the response models: the success status, the model's required fields
# (each passing its check), the optional fields lease arithmetic reads (checked when
# present) and the values a field must hold.  Unknown extra fields never make an
# answer invalid.  One row per operation the lifecycle and settlement act on
# (the event is the fallback settlement of an expired reservation).
_SUCCESS_ANSWERS: Dict[str, Tuple[int, Type[_Model], Tuple[str, ...], Dict[str, Any]]] = {
    "create": (
        200,
        ReservationCreateResponse,
        ("reservation_id", "expires_at_ms", "remaining_ttl_ms"),
        {"decision": frozenset(Decision)},
    ),
    "commit": (200, CommitResponse, (), {"status": {CommitStatus.COMMITTED}}),
    "release": (200, ReleaseResponse, (), {"status": {ReleaseStatus.RELEASED}}),
    "extend": (
        200, ReservationExtendResponse, ("remaining_ttl_ms",), {"status": {ExtendStatus.ACTIVE}}
    ),
    "event": (201, EventCreateResponse, (), {"status": {EventStatus.APPLIED}}),
}


def _success_answer(operation: str, response: CyclesResponse) -> _Model | None:
    """The operation's expected success answer, parsed; None for any other answer.

    The verdict is ``_is_schema_valid``'s (a test holds them to it), reached in the
    same pass as the parse: a tolerant parse fails only on a required field, keeps a
    malformed optional one in ``extra``, and holds each checked value.
    """
    answer = _SUCCESS_ANSWERS.get(operation)
    body = response.body
    if answer is None or response.status != answer[0] or not isinstance(body, dict):
        return None
    _, model, read, pinned = answer
    try:
        parsed = model.model_validate(body)
    except ValueError:
        return None
    if not parsed.extra.keys().isdisjoint(read):  # a field read later, present but malformed
        return None
    for name, allowed in pinned.items():
        if getattr(parsed, name) not in allowed:
            return None
    return parsed


def _is_schema_valid(operation: str, response: CyclesResponse) -> bool:
    """True only for the operation's success status with a body holding its required fields
    (checked without building the model: settlement needs no more than the verdict)."""
    answer = _SUCCESS_ANSWERS.get(operation)
    body = response.body
    if answer is None or response.status != answer[0] or not isinstance(body, dict):
        return False
    _, model, read, pinned = answer
    for name in (*model._required, *read):
        value = body.get(name)
        if value is None:
            if name in model._required:
                return False
            continue
        try:
            checked = model._fields[name](name, value, True)
        except ValueError:
            return False
        if name in pinned and checked not in pinned[name]:
            return False
    return True


# ===========================================================================
# Config
# ===========================================================================

_MASK = "'***'"


class _Origin:
    """Where requests go: scheme, host, port, and the base URL's path prefix."""

    __slots__ = ("base_path", "host", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, base_path: str) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path


class _Proxy:
    """An explicit http proxy; ``authorization`` comes from the URL's user:password."""

    __slots__ = ("authorization", "host", "port")

    def __init__(self, host: str, port: int, authorization: str | None) -> None:
        self.host = host
        self.port = port
        self.authorization = authorization


def _parse_base_url(url: Any, name: str = "base_url") -> _Origin:
    """Validate and split a base URL; only http and https are accepted."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{name}: must be a non-empty http(s) URL")
    if any(ch.isspace() or not ch.isprintable() for ch in url.strip()):
        raise ValueError(f"{name}: must not contain spaces or control characters")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{name}: scheme must be http or https, got {scheme or '(none)'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{name}: must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError(f"{name}: must not contain a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{name}: invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{name}: missing host")
    default_port = 443 if scheme == "https" else 80
    return _Origin(scheme, parts.hostname, port or default_port, parts.path.rstrip("/"))


def _parse_proxy(url: Any) -> _Proxy:
    """An explicit ``http://[user:password@]host:port`` proxy. The message never echoes the URL."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("proxy: must be an http://host:port URL")
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(
            "proxy: must be an http://host:port URL (an http proxy also tunnels https)"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("proxy: invalid port") from None
    authorization = None
    if parts.username is not None:
        import base64

        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return _Proxy(parts.hostname, port, authorization)


def _valid_traceparent(value: Any) -> bool:
    """``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``, ids not all zero."""
    parts = value.split("-") if isinstance(value, str) else []
    return (
        len(parts) == 4
        and parts[0] == "00"
        and _valid_trace_id(parts[1])
        and _is_hex(parts[2], 16)
        and set(parts[2]) != {"0"}
        and _is_hex(parts[3], 2)
    )


def _valid_trace_id(value: Any) -> bool:
    return _is_hex(value, 32) and set(value) != {"0"}


# Setting checks are field checks (see _rule); a setting whose default is None may be
# None without a check.


def _is_number(value: Any) -> bool:
    """An int or a float, not NaN (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def _number(minimum: float, inclusive: bool) -> _Check:
    """A finite number (of seconds, mostly) above ``minimum``, stored as a float."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def check(name: str, value: Any, tolerant: bool) -> Any:
        finite = _is_number(value) and math.isfinite(value)
        if not (finite and (value > minimum or (inclusive and value == minimum))):
            raise _FieldError(name, f"must be a finite number {bound}, got {value!r}")
        return float(value)

    return check


def _path_setting(name: str, value: Any, tolerant: bool) -> str:
    """A str (an ``os.PathLike`` is converted)."""
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(value, str):
        raise _FieldError(name, f"must be a path or None, got {_type_name(value)}")
    return value


def _ca_bundle_setting(name: str, value: Any, tolerant: bool) -> Any:
    value = _path_setting(name, value, tolerant)
    if not os.path.exists(value):
        raise _FieldError(name, f"no such file or directory: {value!r}")
    return value


def _base_url_setting(name: str, value: Any, tolerant: bool) -> Any:
    _parse_base_url(value, name)
    return value


def _proxy_setting(name: str, value: Any, tolerant: bool) -> Any:
    _parse_proxy(value)  # its messages never echo the URL (it may hold a password)
    return value


def _commit_retry_setting(name: str, value: Any, tolerant: bool) -> Any:
    if isinstance(value, str):
        value = value.strip().lower()
    if value not in ("background", "inline"):
        raise _FieldError(name, f"must be 'background' or 'inline', got {value!r}")
    return value


def _option(default: Any, check: _Check, env: str | None = None) -> Any:
    """A setting declared once: its default, its check, and how ``from_env`` reads
    ``<prefix><NAME>`` (a kind of ``_ENV_KINDS``; None: not from the environment)."""
    return field(default=default, metadata={"check": check, "env": env})


_api_key_setting = _rule(
    lambda value: value in (None, "") or _is_header_value(value),
    "must be printable ASCII without spaces at the ends",
)
_ssl_context_setting = _rule(
    lambda value: hasattr(value, "wrap_socket"), "must be an ssl.SSLContext"
)
_user_agent_setting = _rule(_is_header_value, "must be a non-empty printable ASCII string")
_traceparent_setting = _rule(
    lambda value: callable(value) or _valid_traceparent(value),
    "must be '00-<32 hex>-<16 hex>-<2 hex>' or a callable",
)
_trace_id_setting = _rule(_valid_trace_id, "must be 32 lowercase hex characters, not all zero")
_positive_seconds = _number(0, inclusive=False)
_seconds_or_zero = _number(0, inclusive=True)
_any_seconds = _rule(_is_number, "must be a number, got {value!r}")  # inf included
_per_mille = _int_check(0, 1000)


@_dataclass
class CyclesConfig:
    """Client configuration: runcycles' fields, defaults and env vars, plus transport options.

    Times are in seconds (floats), as in runcycles.  Every value is validated at
    construction (``ValueError`` naming the field), and ``repr()`` masks the keys.

    Beyond runcycles:

    * ``admin_api_key``: sent as ``X-Admin-API-Key`` on list/get/release when asked
      for (``admin=True``), or automatically when no ``api_key`` is configured.
    * ``request_timeout``: the whole-attempt deadline of one HTTP attempt, from
      connect to the last body byte (default ``connect_timeout + read_timeout``).
      DNS resolution is not covered (the stdlib cannot bound it).
    * ``ca_bundle`` (PEM file or directory) or ``ssl_context``: TLS trust.
      Verification is always on unless you pass a context that turns it off.
    * ``proxy``: an explicit ``http://[user:pass@]host:port`` proxy (https goes
      through CONNECT).  None means a direct connection: the ``HTTP(S)_PROXY`` /
      ``NO_PROXY`` environment variables are deliberately ignored, so a stray
      variable cannot route the API key elsewhere.  Set ``CYCLES_PROXY`` instead.
    * ``user_agent``: defaults to ``cycles-lite/<version> (Python x.y)``.
    * ``traceparent``: a W3C traceparent, or a zero-argument callable returning the
      current one (or None), sent on every request; ``trace_id``: a flat 32-hex id
      sent as ``X-Cycles-Trace-Id``.  Invalid values from the callable are dropped.
    * ``pool_maxsize``: idle keep-alive connections kept (0 disables keep-alive).
    * ``max_connections``: the async client's cap on connections in use at once, per
      event loop (default 100); further requests wait their turn, in order, with
      their attempt deadline running.
    * ``commit_retry``: ``"background"`` (default: commit retries after the first
      attempt run on one shared worker thread) or ``"inline"`` (every retry runs on
      the caller before the guarded call returns; for AWS Lambda).
    * ``journal_fsync``: fsync journal records and their directory (survives an OS
      crash, not just a process crash; costs a disk flush per guarded call).
    """

    base_url: str = field(metadata={"check": _base_url_setting, "env": "text"})
    api_key: str = _option("", _api_key_setting, "text")

    tenant: str | None = _option(None, _subject_str, "text")
    workspace: str | None = _option(None, _subject_str, "text")
    app: str | None = _option(None, _subject_str, "text")
    workflow: str | None = _option(None, _subject_str, "text")
    agent: str | None = _option(None, _subject_str, "text")
    toolset: str | None = _option(None, _subject_str, "text")

    connect_timeout: float = _option(DEFAULT_CONNECT_TIMEOUT, _positive_seconds, "seconds")
    read_timeout: float = _option(DEFAULT_READ_TIMEOUT, _positive_seconds, "seconds")

    retry_enabled: bool = _option(True, _bool_check, "flag")
    retry_max_attempts: int = _option(5, _per_mille, "integer")
    retry_initial_delay: float = _option(0.5, _seconds_or_zero, "seconds")
    retry_multiplier: float = _option(2.0, _number(1, inclusive=True), "seconds")
    retry_max_delay: float = _option(30.0, _seconds_or_zero, "seconds")
    retry_flush_timeout: float = _option(10.0, _seconds_or_zero, "seconds")

    journal_enabled: bool = _option(True, _bool_check, "flag")
    journal_dir: str | None = _option(None, _path_setting, "text")

    admin_api_key: str | None = _option(None, _api_key_setting, "text")
    request_timeout: float | None = _option(None, _positive_seconds, "seconds")
    ca_bundle: str | None = _option(None, _ca_bundle_setting, "text")
    ssl_context: ssl.SSLContext | None = _option(None, _ssl_context_setting)
    proxy: str | None = _option(None, _proxy_setting, "text")
    user_agent: str = _option(DEFAULT_USER_AGENT, _user_agent_setting, "text")
    traceparent: str | Callable[[], str | None] | None = _option(
        None, _traceparent_setting, "text"
    )
    trace_id: str | None = _option(None, _trace_id_setting, "text")
    pool_maxsize: int = _option(DEFAULT_POOL_MAXSIZE, _per_mille, "integer")
    max_connections: int = _option(DEFAULT_MAX_CONNECTIONS, _int_check(1, 100_000), "integer")
    commit_retry: str = _option("background", _commit_retry_setting, "text")
    journal_fsync: bool = _option(False, _bool_check, "flag")

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if value is not None or setting.default is not None:
                check = setting.metadata["check"]
                setattr(self, setting.name, check(setting.name, value, False))
        if not self.api_key and not self.admin_api_key:
            raise ValueError("api_key: required (or admin_api_key for admin-only use)")
        if self.ssl_context is not None and self.ca_bundle is not None:
            raise ValueError("ssl_context: give either ssl_context or ca_bundle, not both")

    @property
    def attempt_timeout(self) -> float:
        """The whole-attempt deadline of one HTTP attempt, in seconds (always finite)."""
        if self.request_timeout is not None:
            return self.request_timeout
        return self.connect_timeout + self.read_timeout

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            with_credentials = f.name == "proxy" and "@" in str(value or "")
            secret = f.name in ("api_key", "admin_api_key") or with_credentials
            shown.append(f"{f.name}={_MASK if value and secret else repr(value)}")
        return "CyclesConfig(" + ", ".join(shown) + ")"

    @classmethod
    def from_env(
        cls, prefix: str = "CYCLES_", *, environ: Mapping[str, str] | None = None
    ) -> CyclesConfig:
        """Build a config from ``<prefix>*`` environment variables (runcycles' names and units).

        Reads BASE_URL, API_KEY, TENANT, WORKSPACE, APP, WORKFLOW, AGENT, TOOLSET,
        CONNECT_TIMEOUT, READ_TIMEOUT, RETRY_ENABLED, RETRY_MAX_ATTEMPTS,
        RETRY_INITIAL_DELAY, RETRY_MULTIPLIER, RETRY_MAX_DELAY, RETRY_FLUSH_TIMEOUT,
        JOURNAL_ENABLED, JOURNAL_DIR, and beyond runcycles ADMIN_API_KEY,
        REQUEST_TIMEOUT, CA_BUNDLE, PROXY, USER_AGENT, TRACEPARENT, TRACE_ID,
        POOL_MAXSIZE, MAX_CONNECTIONS, COMMIT_RETRY, JOURNAL_FSYNC.  Empty values count as
        unset; booleans accept true/false/1/0/yes/no/on/off; a malformed value raises
        ValueError naming the variable.
        """
        environ = os.environ if environ is None else environ
        settings: Dict[str, Any] = {}
        for setting in dataclasses.fields(cls):
            variable = prefix + setting.name.upper()
            raw = environ.get(variable, "").strip()
            if raw and setting.metadata["env"] is not None:
                settings[setting.name] = _read_env(variable, raw, setting.metadata["env"])
        if "base_url" not in settings:
            raise ValueError(f"{prefix}BASE_URL environment variable is required")
        if "api_key" not in settings and "admin_api_key" not in settings:
            raise ValueError(
                f"{prefix}API_KEY environment variable is required (or {prefix}ADMIN_API_KEY)"
            )
        return cls(**settings)


_FLAG_WORDS: Dict[str, bool] = {"1": True, "true": True, "yes": True, "on": True}
_FLAG_WORDS.update({"0": False, "false": False, "no": False, "off": False})
# How from_env reads each kind of variable: a parse (KeyError or ValueError when the
# text is malformed) and what the error says is expected.
_ENV_KINDS: Dict[str, Tuple[Callable[[str], Any], str]] = {
    "text": (str, "text"),
    "integer": (int, "an integer"),
    "seconds": (float, "a number of seconds"),
    "flag": (lambda text: _FLAG_WORDS[text.lower()], "one of true/false/1/0/yes/no/on/off"),
}


def _read_env(variable: str, raw: str, kind: str) -> Any:
    """A variable's (non-empty) text read as ``kind``; ValueError naming the variable."""
    parse, expected = _ENV_KINDS[kind]
    try:
        value = parse(raw)
    except (KeyError, ValueError):
        raise ValueError(f"{variable}: expected {expected}, got {raw!r}") from None
    if kind == "seconds" and not 0 <= value < math.inf:  # NaN fails this too
        expected = "a finite, non-negative number of seconds"
        raise ValueError(f"{variable}: expected {expected}, got {raw!r}")
    return value


# ===========================================================================
# Per process: fork safety and deadlines
# ===========================================================================
#
# A forked child (gunicorn/uWSGI pre-fork, Celery's prefork pool, multiprocessing's
# "fork" start method) inherits this module's memory but only the thread that forked.
# What belongs to the parent process (pooled sockets, the settlement queue and its
# worker, locks another thread may have held, the heartbeat scheduler) is made the
# child's own here, right after the fork, before any code of the child runs.  This is
# the one place to add to: ``@_after_fork_in_child`` for module state,
# ``_reset_after_fork(obj)`` for an object with an ``_after_fork()`` method.


_fork_resets: List[Callable[[], None]] = []
_fork_objects: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child(reset: Callable[[], None]) -> Callable[[], None]:
    """Register ``reset`` to run in every forked child (a decorator)."""
    _fork_resets.append(reset)
    return reset


def _reset_after_fork(obj: Any) -> None:
    """Call ``obj._after_fork()`` in every forked child while ``obj`` is alive."""
    _fork_objects.add(obj)


def _run_fork_resets() -> None:
    for reset in [*_fork_resets, *(obj._after_fork for obj in list(_fork_objects))]:
        try:
            reset()
        except Exception:  # one broken reset must not leave the others undone
            _log.exception("cycles-lite: resetting state after fork failed")


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_run_fork_resets)


class _Clock:
    """The one clock every deadline, retry, heartbeat and settlement wait reads: the
    real one.  The tests put a clock here that they move forward instead of sleeping."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    @staticmethod
    def wait(condition: threading.Condition, timeout: float | None) -> bool:
        """``condition.wait(timeout)``, its lock held; a caller rechecks the time after."""
        return condition.wait(timeout)


_clock = _Clock()


# A deadline (``time.monotonic()`` value) that bounds all Cycles work started under it:
# every attempt's deadline, inline retries and ``flush``.  None: unbounded.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "cycles_lite_deadline", default=None
)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound all Cycles work started inside the block by ``seconds`` from now.

    ``with cycles_lite.deadline(context.get_remaining_time_in_millis() / 1000 - 0.3):``
    (plain ``with``, in sync and async code alike).  Creates, heartbeats, commits,
    releases, inline retries, ``flush`` and ``recover`` started inside end by then:
    an HTTP attempt is cut at the deadline, no retry waits past it, and a
    settlement that does not fit stays in the journal and on the background worker
    (never dropped).  Nested deadlines only shorten; a negative ``seconds`` counts as
    0 (nothing fits: the work is journaled for later).
    """
    _any_seconds("seconds", seconds, False)
    with _bounded_by(_clock.monotonic() + max(0.0, seconds)):
        yield


def _effective_deadline(default: float) -> float:
    """``default`` (a monotonic deadline), cut to the enclosing ``deadline()`` if sooner."""
    bound = _deadline.get()
    return default if bound is None or bound >= default else bound


def _out_of_time(at: float | None = None) -> bool:
    """True when the enclosing ``deadline()`` has passed, or will have by ``at``."""
    bound = _deadline.get()
    return bound is not None and max(_clock.monotonic(), at or 0.0) >= bound


@contextlib.contextmanager
def _bounded_by(bound: float | None) -> Iterator[None]:
    """Run the block under the absolute deadline ``bound`` (None: as it is)."""
    if bound is None:
        yield
        return
    token = _deadline.set(_effective_deadline(bound))
    try:
        yield
    finally:
        _deadline.reset(token)


# ===========================================================================
# Transport
# ===========================================================================
#
# Why not urllib.request's opener: it forces ``Connection: close`` (no keep-alive),
# installs file:/ftp:/data: handlers, follows redirects while copying every header
# (the API key included) to whatever host ``Location`` names, reads proxies from the
# environment, and applies timeouts per socket operation only.  Why not http.client:
# it parses every answer's headers through the email package, several hundred
# Python calls per request.  This transport writes HTTP/1.1 itself, the same for the
# blocking and the asyncio side: a scheme allowlist (http and https), the request
# head precomputed per client, keep-alive connections in a small LIFO pool, no
# redirect handling at all (a 3xx is returned as an error response), and a
# whole-attempt deadline enforced on every socket read and write.

if TYPE_CHECKING:  # pragma: no cover
    # The status, the headers (lower-case names, first value kept), the body and
    # whether the connection may be reused.
    _Answer = Tuple[int, Dict[str, str], bytes, bool]

_HEAD_LIMIT = 64 * 1024  # the longest response head (status line and headers) accepted
_PUBLIC_OPERATIONS = frozenset({"evidence", "jwks"})
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder()


class _AttemptDeadlineExceeded(TimeoutError):
    """The whole-attempt deadline passed, e.g. while a server trickled its answer."""


class _ResponseTooLarge(OSError):
    pass


class _MalformedResponse(OSError):
    """What the server sent is not a complete HTTP/1.x response."""


class _Truncated(_MalformedResponse):
    """The connection ended ``partial`` bytes into a part of the response."""

    def __init__(self, partial: int) -> None:
        super().__init__(f"{partial} bytes into a response part")
        self.partial = partial


class _RemoteDisconnected(ConnectionResetError):
    """The server closed the connection without answering (a stale keep-alive connection)."""


def _header_lines(headers: Mapping[str, str]) -> str:
    """``Name: value`` lines; ValueError (naming the header, never the value) on a bad value
    (a config mutated after it was validated)."""
    for name, value in headers.items():
        if not _is_header_value(value):
            raise ValueError(f"{name}: not a valid HTTP header value")
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_header(origin: _Origin) -> str:
    default_port = 443 if origin.scheme == "https" else 80
    host = _host_literal(origin.host)
    return host if origin.port == default_port else f"{host}:{origin.port}"


def _traceparent_line(traceparent: Callable[[], str | None]) -> str:
    try:
        value = traceparent()
    except Exception:
        _log.debug("traceparent callable raised; sending no traceparent", exc_info=True)
        return ""
    return f"{TRACEPARENT_HEADER}: {value}\r\n" if _valid_traceparent(value) else ""


class _TransportBase:
    """What the blocking and the asyncio transports share: the origin, the explicit
    proxy, the timeouts, TLS trust and the request bytes.  Everything the config
    decides (headers, target prefix) is checked and rendered once, here; the two
    transports differ only in how they move bytes."""

    def __init__(self, config: CyclesConfig) -> None:
        origin = self._origin = _parse_base_url(config.base_url)
        proxy = self._proxy = _parse_proxy(config.proxy) if config.proxy else None
        self._connect_timeout = config.connect_timeout
        self._read_timeout = config.read_timeout
        self.attempt_timeout = config.attempt_timeout
        self._pool_maxsize = config.pool_maxsize
        self._ssl_context = config.ssl_context
        self._ca_bundle = config.ca_bundle
        self.closed = False
        # A non-ASCII base path is percent-encoded (as a browser would); the rest is as given.
        base_path = quote(origin.base_path, safe="/%!$&'()*+,;=:@")
        self._target_prefix = base_path
        headers = {
            "Host": _host_header(origin),
            "Accept-Encoding": "identity",
            "User-Agent": config.user_agent,
            "Accept": "application/json",
        }
        if proxy is not None and origin.scheme == "http":  # absolute-form targets
            self._target_prefix = f"http://{headers['Host']}{base_path}"
            if proxy.authorization:
                headers["Proxy-Authorization"] = proxy.authorization
        if config.pool_maxsize == 0:
            headers["Connection"] = "close"
        if config.trace_id is not None:
            headers[TRACE_ID_HEADER] = config.trace_id
        traceparent = config.traceparent
        self._traceparent = traceparent if callable(traceparent) else None
        if isinstance(traceparent, str):
            headers[TRACEPARENT_HEADER] = traceparent
        self._public_head = _header_lines(headers)
        self._tenant_head = self._admin_head = None
        if config.api_key:
            self._tenant_head = self._public_head + _header_lines({API_KEY_HEADER: config.api_key})
        if config.admin_api_key:
            admin = {ADMIN_API_KEY_HEADER: config.admin_api_key}
            self._admin_head = self._public_head + _header_lines(admin)

    def encode(self, call: _Call) -> bytes:
        """The request's bytes.  Raises ValueError on bad input: nothing is sent."""
        if call.operation in _PUBLIC_OPERATIONS:
            head = self._public_head
        elif call.admin:
            if self._admin_head is None:
                raise ValueError("admin_api_key: not configured")
            head = self._admin_head
        elif self._tenant_head is not None:
            head = self._tenant_head
        else:
            raise ValueError(
                f"api_key: required for {call.operation} (only admin_api_key is configured)"
            )
        target = call.path
        if call.query:
            target += "?" + urlencode(call.query, safe="", quote_via=quote)
        lines = [f"{call.method} {self._target_prefix}{target} HTTP/1.1\r\n", head]
        if self._traceparent is not None:
            lines.append(_traceparent_line(self._traceparent))
        body = call.body
        if body is None:
            lines.append("\r\n")
            return "".join(lines).encode("latin-1")
        key = body.get("idempotency_key")
        if isinstance(key, str) and _is_header_value(key):
            lines.append(f"{IDEMPOTENCY_KEY_HEADER}: {key}\r\n")
        try:
            payload = _JSON_ENCODER.encode(body).encode("utf-8")
        except (TypeError, ValueError) as exc:  # a dict body sent as-is: name the bad value
            _object_check("body", body, False)
            raise ValueError(f"body: must be JSON-serialisable ({exc})") from None
        lines.append(f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        return "".join(lines).encode("latin-1") + payload

    def start_attempt(self, deadline: float | None) -> float:
        """The attempt's deadline: the one handed in, else the lifecycle step's (see
        ``_attempt``), else now + ``attempt_timeout``; cut to the enclosing ``deadline()``.
        RuntimeError on a closed client, except for a settlement retry, which may outlive
        the client that started it."""
        attempt = _attempt.get()
        if self.closed and not (attempt is not None and attempt.detached):
            raise RuntimeError("the client is closed")
        if deadline is None:
            if attempt is not None:
                deadline = attempt.deadline
            else:
                deadline = _clock.monotonic() + self.attempt_timeout
        bound = _deadline.get()
        return deadline if bound is None or bound >= deadline else bound

    def _connect_request(self) -> bytes:
        """The ``CONNECT`` that opens a tunnel through the proxy to an https origin."""
        assert self._proxy is not None
        authority = f"{_host_literal(self._origin.host)}:{self._origin.port}"
        headers = {"Host": authority}
        if self._proxy.authorization:
            headers["Proxy-Authorization"] = self._proxy.authorization
        return f"CONNECT {authority} HTTP/1.1\r\n{_header_lines(headers)}\r\n".encode("latin-1")

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            import ssl

            bundle = self._ca_bundle
            if bundle is not None and os.path.isdir(bundle):
                self._ssl_context = ssl.create_default_context(capath=bundle)
            else:
                self._ssl_context = ssl.create_default_context(cafile=bundle)
        return self._ssl_context


def _tunnel_opened(head: bytes) -> None:
    status = _parse_response_head(head)[0]
    if status != 200:
        raise OSError(f"Tunnel connection failed: {status}")


# -- reading an answer: one parser for both transports ------------------------------


def _parse_response_head(head: bytes) -> Tuple[int, Dict[str, str], bool]:
    """Pure: the status, the headers and whether the connection stays open, from a head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    version = parts[0]
    code = parts[1] if len(parts) > 1 else ""
    # isascii(): str.isdigit() also takes '\xb2' (superscript two), which int() refuses.
    if not (version.startswith("HTTP/1.") and len(code) == 3 and code.isascii() and code.isdigit()):
        raise _MalformedResponse(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name and name == name.strip():
            name, value = name.lower(), value.strip()
            if headers.setdefault(name, value) != value and name == "content-length":
                raise _MalformedResponse("conflicting Content-Length values")
    connection = headers.get("connection", "").lower()
    tokens = [token.strip() for token in connection.split(",")] if connection else []
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    return int(code), headers, keep_alive


async def _read_http_response(stream: _Connection | _Watchdog) -> _Answer:
    """One HTTP/1.x response, size-capped, from either transport's stream: its
    ``until(separator)``, ``exactly(size)`` and ``some()`` (b"" at the end) are all
    it reads with.  The blocking stream never suspends (see ``_run_blocking``)."""
    status = 100
    while 100 <= status < 200:  # interim answers (100 Continue) are skipped
        try:
            head = await stream.until(b"\r\n\r\n")
        except _Truncated as exc:
            if exc.partial:
                raise
            raise _RemoteDisconnected("remote end closed connection without response") from None
        status, headers, keep_alive = _parse_response_head(head)
    if status in (204, 304):
        return status, headers, b"", keep_alive
    length = headers.get("content-length")
    coding = headers.get("transfer-encoding")
    if coding is not None:  # it overrides Content-Length (RFC 9112 6.3)
        if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            return status, headers, await _read_to_eof(stream), False
        # Both framings at once hint at response smuggling: the connection is not reused.
        return status, headers, await _read_chunked(stream), keep_alive and length is None
    if length is None:  # the body runs to the end of the connection
        return status, headers, await _read_to_eof(stream), False
    if not (length.isascii() and length.isdigit()):  # as for the status code
        raise _MalformedResponse(f"bad Content-Length: {length[:40]!r}")
    if len(length) > 18 or int(length) > MAX_RESPONSE_BYTES:  # int() refuses 4300+ digits
        raise _ResponseTooLarge(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
    return status, headers, await stream.exactly(int(length)), keep_alive


async def _read_chunked(stream: _Connection | _Watchdog) -> bytes:
    chunks: List[bytes] = []
    total = 0
    while True:
        line = await stream.until(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
            raise _MalformedResponse(f"bad chunk size: {size_text[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > MAX_RESPONSE_BYTES:
            raise _ResponseTooLarge(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append((await stream.exactly(size + 2))[:-2])
    while await stream.until(b"\r\n") != b"\r\n":
        pass  # trailer fields
    return b"".join(chunks)


async def _read_to_eof(stream: _Connection | _Watchdog) -> bytes:
    chunks: List[bytes] = []
    total = 0
    while True:
        chunk = await stream.some()
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_RESPONSE_BYTES:
            raise _ResponseTooLarge(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)


def _run_blocking(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run an ``async def`` whose awaits all complete at once (the blocking stream's
    reads block instead of suspending), on this thread, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    coroutine.close()
    raise RuntimeError("a blocking read suspended")


def _read_response(status: int, headers: Mapping[str, str], raw: bytes) -> CyclesResponse:
    """Pure: a CyclesResponse from the status, headers (lower-case names) and raw body."""
    captured = {}
    for name, value in headers.items():
        if name in CAPTURED_HEADERS:
            captured[name] = value
    body = _json_object(raw)
    if 200 <= status < 300:
        response = CyclesResponse(status=status, body=body if body is not None else {},
                                  headers=captured)
        if body is None:
            response.error_message = _not_cycles_message(status, captured)
        return response
    return CyclesResponse.http_error(status, _error_message(status, body, captured), body, captured)


def _json_object(raw: bytes) -> Dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = _JSON_DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _error_message(status: int, body: Dict[str, Any] | None, headers: Mapping[str, str]) -> str:
    if 300 <= status < 400:
        location = headers.get("location")
        where = f" (Location: {location})" if location else ""
        return f"HTTP {status} redirect not followed{where}"
    if body is not None:
        for key in ("message", "error"):
            text = _str_or_none(body.get(key))
            if text:
                return text
    return _not_cycles_message(status, headers)


def _not_cycles_message(status: int, headers: Mapping[str, str]) -> str:
    """The message for an answer without a Cycles (JSON) body: an HTML page, a proxy."""
    content_type = headers.get("content-type") or "no content type"
    return (
        f"HTTP {status} ({content_type}) is not a Cycles answer: "
        "the base URL does not look like a Cycles server"
    )


def _transport_failure_message(exc: BaseException) -> str:
    """A plain description of a request that got no HTTP answer (for messages and logs)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens at the base URL (is the server running?)"
    socket, ssl, http_client = (sys.modules.get(m) for m in ("socket", "ssl", "http.client"))
    if socket is not None and isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of the base URL ({exc.strerror or detail})"
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS failure: {detail}"
    if isinstance(exc, TimeoutError) or (socket is not None and isinstance(exc, socket.timeout)):
        return "timed out" if detail == "timed out" else f"timed out ({detail})"
    closed: Tuple[type, ...] = (ConnectionError, _Truncated)  # (refused is handled above)
    if http_client is not None:  # a user's own exception handed to transport_error()
        closed += (http_client.IncompleteRead,)
        if not isinstance(exc, closed) and isinstance(exc, http_client.HTTPException):
            return f"not a valid HTTP answer ({type(exc).__name__}: {detail})"
    if isinstance(exc, closed):
        return f"the connection closed before a complete answer ({detail})"
    if isinstance(exc, _MalformedResponse):
        return f"not a valid HTTP answer ({detail})"
    return detail


def _never_sent(response: CyclesResponse) -> bool:
    """True when a transport failure proves the request never reached a server."""
    socket = sys.modules.get("socket")
    exc = response.transport_exception
    return isinstance(exc, ConnectionRefusedError) or (
        socket is not None and isinstance(exc, socket.gaierror)
    )


def _is_stale_error(exc: BaseException) -> bool:
    """The errors a keep-alive connection the server already closed produces before any answer."""
    if isinstance(exc, ConnectionError):  # _RemoteDisconnected, reset, broken pipe, aborted
        return True
    ssl_module = sys.modules.get("ssl")
    return ssl_module is not None and isinstance(
        exc, (ssl_module.SSLEOFError, ssl_module.SSLZeroReturnError)
    )


def _may_resend(reused: bool, exc: BaseException, call: _Call, deadline: float) -> bool:
    """One reconnect-and-resend: a reused connection found stale before any answer, time
    left, and a request safe to repeat (GET, or a body with an idempotency key)."""
    if not (reused and _is_stale_error(exc) and call.resendable):
        return False
    if _clock.monotonic() >= deadline:
        return False
    _log.debug("stale keep-alive connection (%s); reconnecting once", type(exc).__name__)
    return True


def _attempt_failed(call: _Call, exc: Exception) -> CyclesResponse:
    if not isinstance(exc, OSError):  # a bug: its outcome is as unknown, but say so loudly
        _log.error("%s %s failed: internal error", call.method, call.path, exc_info=exc)
    else:
        _log.debug("%s %s failed: %s: %s", call.method, call.path, type(exc).__name__, exc)
    return CyclesResponse.transport_error(exc)


# -- the blocking transport -----------------------------------------------------------


class _Connection:
    """One blocking keep-alive connection: its socket and what was read but not used.

    Every send and receive waits at most min(``read_timeout``, time left before
    ``deadline``), a ``time.monotonic()`` value set per request: a server that
    trickles one byte at a time cannot stretch the attempt past it.  The reads are
    ``async def`` only to share ``_read_http_response`` with the asyncio transport.
    """

    __slots__ = ("_op_timeout", "deadline", "sock", "unread")

    def __init__(self, sock: socket.socket, op_timeout: float) -> None:
        self.sock = sock
        self._op_timeout = op_timeout
        self.unread = bytearray()  # received, not yet consumed
        self.deadline = math.inf

    def send(self, data: bytes) -> None:
        self._bounded(self.sock.sendall, data)

    async def until(self, separator: bytes) -> bytes:
        """Everything up to and including ``separator``."""
        while True:
            end = self.unread.find(separator)
            if end >= 0:
                return self._take(end + len(separator))
            if len(self.unread) > _HEAD_LIMIT:
                raise _MalformedResponse("response head or chunk line too long")
            self._fill()

    async def exactly(self, size: int) -> bytes:
        while len(self.unread) < size:
            self._fill()
        return self._take(size)

    async def some(self) -> bytes:
        if self.unread:
            return self._take(len(self.unread))
        return self._bounded(self.sock.recv, 65536)

    def close(self) -> None:
        self.sock.close()

    def _take(self, size: int) -> bytes:
        part = bytes(self.unread[:size])
        del self.unread[:size]  # cheap: a bytearray drops its head without copying the rest
        return part

    def _fill(self) -> None:
        chunk = self._bounded(self.sock.recv, 65536)
        if not chunk:
            raise _Truncated(len(self.unread))
        self.unread += chunk

    def _bounded(self, operation: Callable[[Any], _T], argument: Any) -> _T:
        left = self.deadline - _clock.monotonic()
        if left <= 0:
            raise _AttemptDeadlineExceeded("attempt deadline exceeded")
        self.sock.settimeout(min(self._op_timeout, left))
        try:
            return operation(argument)
        except OSError as exc:
            import socket  # loaded already

            if not isinstance(exc, socket.timeout):
                raise
            if _clock.monotonic() >= self.deadline:
                raise _AttemptDeadlineExceeded("attempt deadline exceeded") from exc
            raise TimeoutError("timed out") from exc


def _connection_dropped(conn: _Connection) -> bool:
    """An idle keep-alive connection is unusable if its socket became readable (EOF or junk)."""
    if conn.unread:
        return True
    try:
        import select

        fd = conn.sock.fileno()
        if fd < 0:
            return True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


def _connect_within(host: str, port: int, timeout: float, deadline: float) -> socket.socket:
    """``socket.create_connection``, its addresses tried in turn before ``deadline`` (it
    would give each of them the whole ``timeout``: a host with several blackholed
    addresses would overrun the attempt)."""
    import socket

    failure: OSError | None = None
    addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for family, kind, proto, _name, address in addresses:
        left = deadline - _clock.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(timeout, left))
            sock.connect(address)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            failure = exc
    raise failure or _AttemptDeadlineExceeded("attempt deadline exceeded before connecting")


class _Transport(_TransportBase):
    """Pooled keep-alive HTTP(S) to one origin, with a whole-attempt deadline.

    Thread-safe: a connection is used by one request at a time; idle ones wait in
    a LIFO list (the most recently used is the least likely to be stale).  A
    reused connection that turns out stale gets one reconnect-and-resend, only for
    requests that are safe to repeat (GET, or a body with an idempotency key).
    """

    def __init__(self, config: CyclesConfig) -> None:
        super().__init__(config)
        self._idle: List[_Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _reset_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections (their sockets are shared
        with it) and its lock; closing our copies of the descriptors leaves the parent's
        connections open."""
        idle, self._idle = self._idle, []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    def send(self, call: _Call, request: bytes, deadline: float) -> _Answer:
        """Send one request and read the answer, or raise OSError."""
        conn, reused = self._checkout(deadline)
        try:
            answer = self._exchange(conn, request, deadline)
        except Exception as exc:
            if not _may_resend(reused, exc, call, deadline):
                raise
            self._discard_idle()  # its idle siblings are likely stale too
            conn = self._connect(deadline)
            answer = self._exchange(conn, request, deadline)
        if answer[3]:
            self._checkin(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._discard_idle()

    @staticmethod
    def _exchange(conn: _Connection, request: bytes, deadline: float) -> _Answer:
        """Send the request and read the answer; the connection is closed on failure."""
        conn.deadline = deadline
        try:
            conn.send(request)
            return _run_blocking(_read_http_response(conn))
        except BaseException:
            conn.close()
            raise

    def _checkout(self, deadline: float) -> Tuple[_Connection, bool]:
        if self._pid != os.getpid():  # forked without the at-fork hooks (a C-level fork)
            self._after_fork()
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(deadline), False
            if not _connection_dropped(conn):
                return conn, True
            conn.close()

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self.closed and len(self._idle) < self._pool_maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def _discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self, deadline: float) -> _Connection:
        import socket

        origin, proxy = self._origin, self._proxy
        host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
        sock = _connect_within(host, port, self._connect_timeout, deadline)
        try:
            # The head and the body go out in one write, but an answer must not wait
            # for a delayed ACK (~40 ms) either: Nagle's algorithm off.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, self._read_timeout)
            if origin.scheme == "https":
                if proxy is not None:
                    conn.deadline = deadline
                    conn.send(self._connect_request())
                    _tunnel_opened(_run_blocking(conn.until(b"\r\n\r\n")))
                conn.sock = self._tls_context().wrap_socket(sock, server_hostname=origin.host)
        except BaseException:
            sock.close()
            raise
        return conn


# ---------------------------------------------------------------------------
# The asyncio transport
#
# The same request bytes and the same reading as ``_Transport`` (``_TransportBase``,
# ``_read_http_response``, the stale-connection rule, the size cap), over asyncio
# streams: no thread per request.  Each event loop that sends gets its own
# ``_LoopPool`` (keep-alive connections and the ``max_connections`` gate), used
# only from that loop.  A loop's pool is closed when the loop shuts down its
# async generators (``asyncio.run`` does, before closing the loop), by
# ``aclose()``, and forgotten in a forked child.
# ---------------------------------------------------------------------------

_IDLE_EXPIRY = 5.0  # seconds an idle connection beyond pool_maxsize is kept (as httpx)


class _AsyncConnection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def dropped(self) -> bool:
        """An idle connection is unusable once the server closed it or sent unasked bytes."""
        reader = self.reader
        return self.writer.is_closing() or reader.at_eof() or bool(getattr(reader, "_buffer", b""))

    def unsent(self) -> bool:
        """True when some of what was written still waits in the buffer."""
        try:
            return bool(self.writer.transport.get_write_buffer_size())
        except AttributeError:  # Python < 3.11: a TLS connection already lost
            raise _RemoteDisconnected("connection lost before the request was sent") from None

    def close(self) -> None:
        """Drop the connection at once (like closing a socket: no TLS goodbye)."""
        transport = self.writer.transport
        try:
            transport.abort()
        except RuntimeError:  # its loop is closed
            _release_after_loop_closed(transport)


def _release_after_loop_closed(transport: Any) -> None:
    """Finish closing a transport whose event loop was closed without
    ``shutdown_asyncgens()``: asyncio completes a close on a later loop turn, which a
    closed loop never runs, so the socket would leak and warn.  This does that turn's
    part by hand.  Best effort over asyncio internals: looked up, never assumed."""
    ssl_protocol = getattr(transport, "_ssl_protocol", None)
    if ssl_protocol is not None:  # TLS: mark the TLS layer closed, then finish the socket's
        transport._closed = True
        transport = getattr(ssl_protocol, "_transport", None) or transport
    finish = getattr(transport, "_call_connection_lost", None)
    if finish is not None and getattr(transport, "_sock", None) is not None:
        with contextlib.suppress(Exception):  # the protocol's callbacks need the loop
            finish(None)  # closes the socket whatever the protocol does


class _LoopPool:
    """One event loop's connections to one origin and its ``max_connections`` gate.

    Used only from its loop, so it needs no lock.  At most ``max_connections``
    requests hold a connection at once; the others wait in arrival order, and a
    finished request hands its slot, with its connection, to the first of them.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_connections: int, max_idle: int, *, hook: bool
    ) -> None:
        import collections

        self.loop = loop
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.in_use = 0
        self.idle: List[_AsyncConnection] = []
        self.waiters: Deque[asyncio.Future[_AsyncConnection | None]] = collections.deque()
        self._trim_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.shutdown_hook: Any = _close_at_loop_shutdown(self) if hook else None
        if self.shutdown_hook is not None:
            _start_async_generator(self.shutdown_hook)

    async def acquire(self, deadline: float) -> _AsyncConnection | None:
        """Take a slot (waiting in line until ``deadline``); maybe a connection with it."""
        import asyncio

        if self.in_use < self.max_connections and not self.waiters:
            self.in_use += 1
            return None
        waiter: asyncio.Future[_AsyncConnection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, max(0.0, deadline - _clock.monotonic()))
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed a slot just as it gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise _AttemptDeadlineExceeded(
                    "attempt deadline exceeded waiting for a connection"
                    f" (max_connections={self.max_connections})"
                ) from None
            raise

    def release(self, conn: _AsyncConnection | None) -> None:
        """A request is done: its slot, and its connection if reusable, go to the next in line."""
        if conn is not None and self.closed:
            conn.close()
            conn = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.in_use -= 1
        if conn is None:
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if len(self.idle) > self.max_idle and self._trim_timer is None:
            self._trim_timer = self.loop.call_later(_IDLE_EXPIRY, self._trim)

    def _trim(self) -> None:
        """Idle connections beyond ``max_idle`` close once idle for ``_IDLE_EXPIRY``: a
        burst keeps its connections for the calls' next requests, a quiet pool shrinks."""
        self._trim_timer = None
        expired = time.monotonic() - _IDLE_EXPIRY
        while len(self.idle) > self.max_idle and self.idle[0].idle_since <= expired:
            self.idle.pop(0).close()  # the oldest first
        if len(self.idle) > self.max_idle:
            wait = self.idle[0].idle_since + _IDLE_EXPIRY - time.monotonic()
            self._trim_timer = self.loop.call_later(max(0.0, wait), self._trim)

    def take_idle(self) -> _AsyncConnection | None:
        """The most recently used idle connection still usable, if any."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.dropped():
                return conn
            conn.close()
        return None

    def discard_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self.closed = True
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        self.discard_idle()


async def _close_at_loop_shutdown(pool: _LoopPool) -> AsyncIterator[None]:
    """Suspended for the pool's lifetime.  The loop finalizes it in
    ``shutdown_asyncgens()`` (``asyncio.run`` calls it before closing the loop), which
    closes the pool's connections while the loop can still close them cleanly."""
    try:
        yield
    finally:
        pool.close()


def _start_async_generator(agen: Any) -> None:
    """Run an async generator to its first ``yield`` (it must not await before it): the
    running loop's first-iteration hook then tracks it for ``shutdown_asyncgens()``."""
    with contextlib.suppress(StopIteration):
        agen.__anext__().send(None)


class _AsyncTransport(_TransportBase):
    """``_Transport`` over asyncio streams: per-loop keep-alive pools, a connection cap.

    Every read and write waits at most min(``read_timeout``, time left before the
    attempt's deadline); so does waiting for a connection slot and connecting
    (min(``connect_timeout``, time left)).  A pool is only ever used by its loop.
    """

    def __init__(self, config: CyclesConfig) -> None:
        super().__init__(config)
        self._max_connections = config.max_connections
        self._pools: Dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._pools_lock = threading.Lock()
        self._pid = os.getpid()
        _reset_after_fork(self)

    async def send(self, call: _Call, request: bytes, deadline: float) -> _Answer:
        """Send one request and read the answer, or raise OSError."""
        pool = self._pool()
        conn = await pool.acquire(deadline)
        kept: _AsyncConnection | None = None
        try:
            answer, kept = await self._send_on(pool, conn, call, request, deadline)
        finally:
            pool.release(kept)
        return answer

    async def aclose(self) -> None:
        """Close every loop's idle connections (this loop's at once, a running other loop's
        on that loop); connections in use close when their request ends."""
        import asyncio

        with self._pools_lock:
            self.closed = True
            pools, self._pools = list(self._pools.values()), {}
        current = asyncio.get_running_loop()
        for pool in pools:
            if pool.loop is current:
                pool.close()
                if pool.shutdown_hook is not None:
                    await pool.shutdown_hook.aclose()
            elif pool.loop.is_closed():
                pool.close()
            else:
                try:
                    pool.loop.call_soon_threadsafe(pool.close)
                except RuntimeError:  # closed meanwhile
                    pool.close()
        await asyncio.sleep(0)  # the aborted connections finish closing

    def __del__(self) -> None:
        """Dropped without ``aclose()``: the connections of loops closed by hand (with no
        ``shutdown_asyncgens()``) are released here, without warnings."""
        for loop, pool in list(getattr(self, "_pools", {}).items()):
            if loop.is_closed():
                pool.close()

    def _after_fork(self) -> None:
        """In a forked child: the connections are the parent's.  Forget them without closing
        (that could disturb the parent's), kept referenced so they never warn."""
        _forked_pools.append(self._pools)
        self._pools = {}
        self._pools_lock = threading.Lock()
        self._pid = os.getpid()

    def _pool(self) -> _LoopPool:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():  # forked without the at-fork hooks (a C-level fork)
            self._after_fork()
        pool = self._pools.get(loop)
        if pool is not None and not pool.closed:
            return pool
        with self._pools_lock:
            # After aclose() (a settlement still retrying) or once the loop is shutting
            # down (a request from an async generator's cleanup, say): no idle
            # connections and no hook, so nothing is left open.
            shutting_down = getattr(loop, "_asyncgens_shutdown_called", False) is True
            late = self.closed or pool is not None or shutting_down
            pool = _LoopPool(
                loop, self._max_connections, 0 if late else self._pool_maxsize, hook=not late
            )
            pools = {}
            for key, value in self._pools.items():
                if key.is_closed():  # closed without shutdown_asyncgens(): release its sockets
                    value.close()
                else:
                    pools[key] = value
            pools[loop] = pool
            self._pools = pools
        return pool

    async def _send_on(
        self,
        pool: _LoopPool,
        handed: _AsyncConnection | None,
        call: _Call,
        request: bytes,
        deadline: float,
    ) -> Tuple[_Answer, _AsyncConnection | None]:
        """Send on the connection handed over with the slot, else an idle or a new one."""
        if handed is not None and handed.dropped():
            handed.close()
            handed = None
        conn = handed or pool.take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect(deadline)
        try:
            answer = await self._exchange(conn, request, deadline)
        except Exception as exc:
            if not _may_resend(reused, exc, call, deadline):
                raise
            pool.discard_idle()  # its idle siblings are likely stale too
            conn = await self._connect(deadline)
            answer = await self._exchange(conn, request, deadline)
        if answer[3] and pool.max_idle > 0:  # a late pool keeps nothing open (see _pool)
            return answer, conn
        conn.close()
        return answer, None

    async def _exchange(self, conn: _AsyncConnection, request: bytes, deadline: float) -> _Answer:
        """Write the request, read the whole response; the connection is closed on failure."""
        import asyncio

        watchdog = _Watchdog(conn, deadline, self._read_timeout)
        try:
            if _clock.monotonic() >= deadline:  # as the blocking send: nothing goes out late
                raise _AttemptDeadlineExceeded("attempt deadline exceeded before sending")
            conn.writer.write(request)
            if conn.unsent():
                await watchdog.step(conn.writer.drain)
            answer = await _read_http_response(watchdog)
            if watchdog.expired is not None:  # a body framed by EOF, cut short by the abort
                raise watchdog.expired
            return answer
        except BaseException as exc:
            conn.close()
            if watchdog.expired is not None and isinstance(exc, Exception):
                raise watchdog.expired from None
            if isinstance(exc, asyncio.LimitOverrunError):
                raise _MalformedResponse("response head or chunk line too long") from None
            raise
        finally:
            watchdog.stop()

    async def _connect(self, deadline: float) -> _AsyncConnection:
        import asyncio
        import socket

        left = deadline - _clock.monotonic()
        if left <= 0:
            raise _AttemptDeadlineExceeded("attempt deadline exceeded before connecting")
        timeout = min(self._connect_timeout, left)
        try:
            reader, writer = await asyncio.wait_for(self._open(), timeout)
        except asyncio.TimeoutError:  # past the deadline, or past connect_timeout only
            if timeout >= left:
                raise _AttemptDeadlineExceeded("attempt deadline exceeded connecting") from None
            raise TimeoutError("timed out connecting") from None
        conn = _AsyncConnection(reader, writer)
        try:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import asyncio

        origin, proxy = self._origin, self._proxy
        tls = self._tls_context() if origin.scheme == "https" else None
        if proxy is None:
            return await asyncio.open_connection(
                origin.host, origin.port, ssl=tls, limit=_HEAD_LIMIT
            )
        if tls is None:  # plain http through the proxy: absolute-form targets
            return await asyncio.open_connection(proxy.host, proxy.port, limit=_HEAD_LIMIT)
        sock = await self._tunnel(proxy)
        try:
            return await asyncio.open_connection(
                sock=sock, ssl=tls, server_hostname=origin.host, limit=_HEAD_LIMIT
            )
        except BaseException:
            sock.close()
            raise

    async def _tunnel(self, proxy: _Proxy) -> socket.socket:
        """A socket connected through the proxy to the origin with ``CONNECT``."""
        import asyncio
        import socket

        loop = asyncio.get_running_loop()
        addresses = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        for family, kind, proto, _name, address in addresses:  # in turn, as create_connection
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                break
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError) or address is addresses[-1][4]:  # the last
                    raise
        try:
            await loop.sock_sendall(sock, self._connect_request())
            head = b""
            while b"\r\n\r\n" not in head:  # a refusal may come with a body; a 200 has none
                chunk = await loop.sock_recv(sock, 1024)
                if not chunk or len(head) > _HEAD_LIMIT:
                    raise _MalformedResponse("the proxy did not answer CONNECT")
                head += chunk
            _tunnel_opened(head.partition(b"\r\n\r\n")[0])
            return sock
        except BaseException:
            sock.close()
            raise


class _Watchdog:
    """The asyncio side's stream for one exchange (see ``_read_http_response``): bounds
    each step by min(``read_timeout``, time left before the attempt's deadline).  A
    step that outlasts it has its connection aborted, which ends the step at once.
    One timer per step, cheaper than ``asyncio.wait_for``."""

    __slots__ = ("_conn", "_deadline", "_handle", "_loop", "_op_timeout", "expired")

    def __init__(self, conn: _AsyncConnection, deadline: float, op_timeout: float) -> None:
        import asyncio

        self._conn = conn
        self._deadline = deadline
        self._op_timeout = op_timeout
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self.expired: Exception | None = None  # the timeout error, once a step outlasted it

    async def until(self, separator: bytes) -> bytes:
        return await self.step(self._conn.reader.readuntil, separator)

    async def exactly(self, size: int) -> bytes:
        return await self.step(self._conn.reader.readexactly, size)

    async def some(self) -> bytes:
        return await self.step(self._conn.reader.read, 65536)

    async def step(self, operation: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        left = self._deadline - _clock.monotonic()
        if left <= 0:
            raise _AttemptDeadlineExceeded("attempt deadline exceeded")
        self.stop()
        at_deadline = left <= self._op_timeout
        self._handle = self._loop.call_later(
            min(left, self._op_timeout), self._expire, at_deadline
        )
        try:
            return await operation(*args)
        except EOFError as exc:  # asyncio.IncompleteReadError: the connection ended mid-part
            raise _Truncated(len(getattr(exc, "partial", b""))) from None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expire(self, at_deadline: bool) -> None:
        self.expired = (
            _AttemptDeadlineExceeded("attempt deadline exceeded")
            if at_deadline
            else TimeoutError("timed out")
        )
        self._conn.close()


_forked_pools: List[Any] = []  # a forked child's copies of its parent's pools, never touched


# ===========================================================================
# Client
# ===========================================================================


class _Call:
    """What one public method asks for; shared by the sync and async clients."""

    __slots__ = ("admin", "body", "method", "operation", "path", "query")

    def __init__(
        self,
        operation: str,
        method: str,
        path: str,
        body: Dict[str, Any] | None = None,
        query: Dict[str, str] | None = None,
        admin: bool = False,
    ) -> None:
        self.operation = operation
        self.method = method
        self.path = path
        self.body = body
        self.query = query
        self.admin = admin

    def with_cursor(self, cursor: str) -> _Call:
        query = dict(self.query or {}, cursor=cursor)
        return _Call(self.operation, self.method, self.path, self.body, query, self.admin)

    @property
    def resendable(self) -> bool:
        """Safe to send twice: a GET, or a body whose idempotency key makes the server replay."""
        key = (self.body or {}).get("idempotency_key")
        return self.method == "GET" or (isinstance(key, str) and _is_header_value(key))


def _reservation_path(reservation_id: Any, suffix: str = "") -> str:
    """The reservation's URL path, the id percent-encoded (``../x`` stays one segment)."""
    if not isinstance(reservation_id, str) or not reservation_id:
        raise ValueError("reservation_id: must be a non-empty string")
    if len(reservation_id) > MAX_RESERVATION_ID_LENGTH:
        raise ValueError(
            f"reservation_id: must be at most {MAX_RESERVATION_ID_LENGTH} characters"
            f" (got {len(reservation_id)})"
        )
    return f"{RESERVATIONS_PATH}/{quote(reservation_id, safe='')}{suffix}"


# Each operation that POSTs a body: its request model and its path ("{id}/...": under
# the reservation's own path).
_POSTS: Dict[str, Tuple[Type[_Model], str]] = {
    "create": (ReservationCreateRequest, RESERVATIONS_PATH),
    "commit": (CommitRequest, "{id}/commit"),
    "release": (ReleaseRequest, "{id}/release"),
    "extend": (ReservationExtendRequest, "{id}/extend"),
    "decide": (DecisionRequest, DECIDE_PATH),
    "event": (EventCreateRequest, EVENTS_PATH),
}


def _post(
    operation: str, request: Any, reservation_id: Any = None, admin: bool = False
) -> _Call:
    """A POST of ``request``: a dict is sent as given, a model (ours or a pydantic one, e.g.
    from runcycles) dumped without None fields; anything else is a TypeError."""
    expected, path = _POSTS[operation]
    if path.startswith("{id}"):
        path = _reservation_path(reservation_id, path[len("{id}"):])
    if isinstance(request, dict):
        return _Call(operation, "POST", path, request, admin=admin)
    if isinstance(request, _Model) and not isinstance(request, expected):
        raise TypeError(f"expected a {expected.__name__} or a dict, got {_type_name(request)}")
    dump = getattr(request, "model_dump", None)
    dumped = dump(mode="json", exclude_none=True) if callable(dump) else None
    if not isinstance(dumped, dict):
        raise TypeError(f"Unsupported body type: {_type_name(request)}")
    return _Call(operation, "POST", path, dumped, admin=admin)


def _query_pairs(query: Mapping[str, Any]) -> Iterator[Tuple[str, str]]:
    for name, value in query.items():
        if value is None:
            continue
        if isinstance(value, bool):
            yield name, "true" if value else "false"
        elif isinstance(value, (str, int)):
            yield name, str(value)
        else:
            raise ValueError(f"{name}: query parameter must be a string, got {_type_name(value)}")


def _use_admin(config: CyclesConfig, admin: bool | None) -> bool:
    """``admin=None`` means: use the admin key when it is the only key configured."""
    if admin is None:
        return not config.api_key and bool(config.admin_api_key)
    if admin and not config.admin_api_key:
        raise ValueError("admin_api_key: not configured")
    return bool(admin)


def _list_call(config: CyclesConfig, params: Mapping[str, Any], admin: bool | None) -> _Call:
    use_admin = _use_admin(config, admin)
    query = dict(_query_pairs(params))
    if use_admin and not query.get("tenant"):
        raise ValueError("tenant: required when listing reservations with the admin key")
    return _Call("list", "GET", RESERVATIONS_PATH, query=query, admin=use_admin)


def _get_call(config: CyclesConfig, reservation_id: str, admin: bool | None) -> _Call:
    return _Call("get", "GET", _reservation_path(reservation_id), admin=_use_admin(config, admin))


def _balances_call(params: Mapping[str, Any]) -> _Call:
    query = dict(_query_pairs(params))
    if not any(query.get(name) for name in SUBJECT_FIELDS):
        raise ValueError(
            "get_balances requires at least one subject filter"
            " (tenant, workspace, app, workflow, agent, or toolset)"
        )
    return _Call("balances", "GET", BALANCES_PATH, query=query)


def _evidence_call(evidence_id: Any) -> _Call:
    if not _is_hex(evidence_id, 64):
        raise ValueError("evidence_id: must be 64 lowercase hex characters")
    return _Call("evidence", "GET", f"{EVIDENCE_PATH}/{evidence_id}")


_JWKS_CALL = _Call("jwks", "GET", JWKS_PATH)


def _page(
    call: _Call, response: CyclesResponse, items_key: str
) -> Tuple[List[Dict[str, Any]], _Call | None]:
    """The items of one page and the call for the next page (None at the end).

    Raises the typed CyclesProtocolError when the page failed: an iterator has no
    response to hand back.
    """
    if not response.is_success:
        raise _protocol_error(response, f"{call.operation} page failed")
    items = response.get_body_attribute(items_key)
    if not isinstance(items, list):
        raise CyclesProtocolError(
            f"{call.operation} page failed: the answer has no {items_key!r} list",
            status=response.status,
            request_id=response.request_id,
            trace_id=response.trace_id,
        )
    cursor = response.get_body_attribute("next_cursor")
    more = response.get_body_attribute("has_more") is not False
    if more and isinstance(cursor, str) and cursor:
        return [i for i in items if isinstance(i, dict)], call.with_cursor(cursor)
    return [i for i in items if isinstance(i, dict)], None


def _refuse_repeated_cursor(call: _Call, followed: set[str]) -> None:
    """Before fetching a page: a cursor followed already (A -> B -> A) means the server is
    looping; end the iteration with CyclesProtocolError instead of looping for ever."""
    cursor = (call.query or {}).get("cursor")
    if cursor is None:
        return
    if cursor in followed:
        raise CyclesProtocolError(
            f"{call.operation} page failed: the server returned a cursor it had returned"
            " before; stopping instead of looping"
        )
    followed.add(cursor)


class CyclesClient:
    """Synchronous Cycles client (runcycles-compatible), thread-safe, with keep-alive.

    Every method returns a ``CyclesResponse`` and never raises on HTTP or network
    errors; invalid input raises ``ValueError`` (or ``TypeError`` for a body of
    the wrong type) before anything is sent.

    Admin key: ``release_reservation``, ``get_reservation``, ``list_reservations``
    and ``iter_reservations`` take ``admin=``.  ``True`` sends ``X-Admin-API-Key``
    (listing then needs a ``tenant`` filter), ``False`` the tenant key, and the
    default ``None`` uses the admin key only when no ``api_key`` is configured.

    Usage::

        with CyclesClient(CyclesConfig(base_url="http://localhost:7878", api_key="key")) as client:
            response = client.create_reservation(request)
    """

    def __init__(self, config: CyclesConfig) -> None:
        _check_kind(config, CyclesConfig, "config")
        self._config = config
        self._transport = _Transport(config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    def create_reservation(
        self, request: ReservationCreateRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_post("create", request))

    def commit_reservation(
        self, reservation_id: str, request: CommitRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_post("commit", request, reservation_id))

    def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | dict[str, Any],
        *,
        admin: bool | None = None,
    ) -> CyclesResponse:
        return self._call(
            _post("release", request, reservation_id, _use_admin(self._config, admin))
        )

    def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_post("extend", request, reservation_id))

    def decide(self, request: DecisionRequest | dict[str, Any]) -> CyclesResponse:
        return self._call(_post("decide", request))

    def list_reservations(
        self, *, admin: bool | None = None, **query_params: str
    ) -> CyclesResponse:
        return self._call(_list_call(self._config, query_params, admin))

    def get_reservation(self, reservation_id: str, *, admin: bool | None = None) -> CyclesResponse:
        return self._call(_get_call(self._config, reservation_id, admin))

    def get_balances(self, **query_params: str) -> CyclesResponse:
        return self._call(_balances_call(query_params))

    def create_event(self, request: EventCreateRequest | dict[str, Any]) -> CyclesResponse:
        return self._call(_post("event", request))

    def get_evidence(self, evidence_id: str) -> CyclesResponse:
        """``GET /v1/evidence/{id}`` (public: no key is sent). A fresh 404 may be transient."""
        return self._call(_evidence_call(evidence_id))

    def get_evidence_jwks(self) -> CyclesResponse:
        """The server's evidence signing keys (public: no key is sent)."""
        return self._call(_JWKS_CALL)

    def verify_evidence(
        self,
        evidence_id_or_envelope: str | dict[str, Any] | bytes,
        *,
        jwks: dict[str, Any] | str | bytes | None = None,
        expected_signer: str | None = None,
    ) -> EvidenceVerification:
        """Fetch (an envelope given by id, the server's JWK Set) and ``verify_evidence``.

        The JWK Set is fetched from ``{server_id}/.well-known/cycles-jwks.json`` when
        that is this client's server (else pass ``jwks=``).  A failed fetch is
        ``signer_resolution_failed``, never ``signature_invalid``.
        """
        steps = _verify_evidence_steps(self._config, evidence_id_or_envelope, jwks, expected_signer)
        return _run_sync(_fetch_and_verify(self, steps))

    def iter_balances(self, **filters: str) -> Iterator[dict[str, Any]]:
        """Every balance matching the filters, following cursors.

        Yields the JSON objects as returned (``Balance.model_validate(item)`` gives
        a model).  Raises CyclesProtocolError if a page fails.
        """
        return self._pages(_balances_call(filters), "balances")

    def iter_reservations(
        self, *, admin: bool | None = None, **filters: str
    ) -> Iterator[dict[str, Any]]:
        """Every reservation matching the filters, following cursors (see ``iter_balances``)."""
        return self._pages(_list_call(self._config, filters, admin), "reservations")

    def close(self) -> None:
        """Close idle pooled connections; the client cannot be used afterwards."""
        self._transport.close()

    def recover(self, timeout: float | None = 30.0) -> RecoverySummary:
        """Settle what the commit journal still holds for this client's identity (bounded)."""
        return _recover(self, timeout)

    def reserve(self, estimate: int | Amount, **options: Any) -> ReservationGuard:
        """``with client.reserve(estimate, action_kind=..., ...) as r:`` (see ReservationGuard)."""
        return ReservationGuard(self, estimate, **options)

    def stream_reservation(
        self,
        *,
        subject: Subject | None = None,
        action: Action,
        estimate: Amount,
        ttl_ms: int = 120_000,
        grace_period_ms: int | None = None,
        overage_policy: str = DEFAULT_OVERAGE_POLICY,
        cost_fn: Callable[[StreamUsage], int] | None = None,
        metadata: Dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        raise_on_commit_failure: bool = False,
    ) -> StreamReservation:
        """runcycles' ``with client.stream_reservation(...) as s:`` (see StreamReservation)."""
        return StreamReservation(
            self,
            subject=subject,
            action=action,
            estimate=estimate,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            cost_fn=cost_fn,
            metadata=metadata,
            idempotency_key=idempotency_key,
            raise_on_commit_failure=raise_on_commit_failure,
        )

    def __enter__(self) -> CyclesClient:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def _pages(self, call: _Call, items_key: str) -> Iterator[dict[str, Any]]:
        next_call: _Call | None = call
        followed: set[str] = set()
        while next_call is not None:
            _refuse_repeated_cursor(next_call, followed)
            items, next_call = _page(next_call, self._call(next_call), items_key)
            yield from items

    def _call(self, call: _Call, deadline: float | None = None) -> CyclesResponse:
        """The one path of every request: build, send one attempt, read.

        Never raises for HTTP or transport errors.

        ``deadline`` is a ``time.monotonic()`` value; by default the lifecycle step's
        (``_attempt``), else now + ``attempt_timeout``.
        """
        transport = self._transport
        request = transport.encode(call)
        deadline = transport.start_attempt(deadline)
        try:
            status, headers, body, _ = transport.send(call, request, deadline)
        except Exception as exc:
            return _attempt_failed(call, exc)
        return _read_response(status, headers, body)


# ===========================================================================
# Async client
# ===========================================================================

class AsyncCyclesClient:
    """Asynchronous Cycles client (runcycles-compatible).

    It builds and reads requests exactly like ``CyclesClient``, over asyncio
    streams: no thread per request.  Each event loop that uses the client gets
    its own keep-alive connections; at most ``config.max_connections`` requests
    per loop are on the wire at once, the others wait their turn in order (their
    attempt deadline running).  A cancelled call stops at once (its connection is
    dropped).  Journal file writes run on the loop's default executor (a slow disk
    or an fsync never stalls the loop); HTTP never uses a thread.
    """

    def __init__(self, config: CyclesConfig) -> None:
        _check_kind(config, CyclesConfig, "config")
        self._config = config
        self._transport = _AsyncTransport(config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    async def create_reservation(
        self, request: ReservationCreateRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_post("create", request))

    async def commit_reservation(
        self, reservation_id: str, request: CommitRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_post("commit", request, reservation_id))

    async def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | dict[str, Any],
        *,
        admin: bool | None = None,
    ) -> CyclesResponse:
        return await self._call(
            _post("release", request, reservation_id, _use_admin(self._config, admin))
        )

    async def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_post("extend", request, reservation_id))

    async def decide(self, request: DecisionRequest | dict[str, Any]) -> CyclesResponse:
        return await self._call(_post("decide", request))

    async def list_reservations(
        self, *, admin: bool | None = None, **query_params: str
    ) -> CyclesResponse:
        return await self._call(_list_call(self._config, query_params, admin))

    async def get_reservation(
        self, reservation_id: str, *, admin: bool | None = None
    ) -> CyclesResponse:
        return await self._call(_get_call(self._config, reservation_id, admin))

    async def get_balances(self, **query_params: str) -> CyclesResponse:
        return await self._call(_balances_call(query_params))

    async def create_event(self, request: EventCreateRequest | dict[str, Any]) -> CyclesResponse:
        return await self._call(_post("event", request))

    async def get_evidence(self, evidence_id: str) -> CyclesResponse:
        return await self._call(_evidence_call(evidence_id))

    async def get_evidence_jwks(self) -> CyclesResponse:
        return await self._call(_JWKS_CALL)

    async def verify_evidence(
        self,
        evidence_id_or_envelope: str | dict[str, Any] | bytes,
        *,
        jwks: dict[str, Any] | str | bytes | None = None,
        expected_signer: str | None = None,
    ) -> EvidenceVerification:
        """``CyclesClient.verify_evidence``; verification itself runs on the loop (~2 ms)."""
        steps = _verify_evidence_steps(self._config, evidence_id_or_envelope, jwks, expected_signer)
        return await _fetch_and_verify(self, steps)

    def iter_balances(self, **filters: str) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every matching balance (see ``CyclesClient.iter_balances``)."""
        return self._pages(_balances_call(filters), "balances")

    def iter_reservations(
        self, *, admin: bool | None = None, **filters: str
    ) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every matching reservation (see ``CyclesClient.iter_balances``)."""
        return self._pages(_list_call(self._config, filters, admin), "reservations")

    async def aclose(self) -> None:
        """Close every loop's connections; the client then refuses new calls.

        Settlement retries of this client still pending on this loop go on, same
        key, on the process's settlement worker (``await aflush()`` first to settle
        them here)."""
        await _hand_over_loop_settlements(self)
        await self._transport.aclose()

    async def recover(self, timeout: float | None = 30.0) -> RecoverySummary:
        """``CyclesClient.recover`` on the event loop (the journal scan on a thread)."""
        return await _recover_async(self, timeout)

    def reserve(self, estimate: int | Amount, **options: Any) -> AsyncReservationGuard:
        """``async with client.reserve(estimate, ...) as r:`` (see AsyncReservationGuard)."""
        return AsyncReservationGuard(self, estimate, **options)

    def stream_reservation(
        self,
        *,
        subject: Subject | None = None,
        action: Action,
        estimate: Amount,
        ttl_ms: int = 120_000,
        grace_period_ms: int | None = None,
        overage_policy: str = DEFAULT_OVERAGE_POLICY,
        cost_fn: Callable[[StreamUsage], int] | None = None,
        metadata: Dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        raise_on_commit_failure: bool = False,
    ) -> AsyncStreamReservation:
        """runcycles' ``async with client.stream_reservation(...)`` (see AsyncStreamReservation)."""
        return AsyncStreamReservation(
            self,
            subject=subject,
            action=action,
            estimate=estimate,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            cost_fn=cost_fn,
            metadata=metadata,
            idempotency_key=idempotency_key,
            raise_on_commit_failure=raise_on_commit_failure,
        )

    async def __aenter__(self) -> AsyncCyclesClient:
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()

    async def _pages(self, call: _Call, items_key: str) -> AsyncIterator[dict[str, Any]]:
        next_call: _Call | None = call
        followed: set[str] = set()
        while next_call is not None:
            _refuse_repeated_cursor(next_call, followed)
            items, next_call = _page(next_call, await self._call(next_call), items_key)
            for item in items:
                yield item

    async def _call(self, call: _Call, deadline: float | None = None) -> CyclesResponse:
        """``CyclesClient._call`` over the asyncio transport, on the running loop.

        ``deadline`` (a ``time.monotonic()`` value; by default the lifecycle step's
        (``_attempt``), else now + ``attempt_timeout``) is running already: time spent
        waiting for a connection slot counts against it (the heartbeat's safety margin
        relies on that bound).
        """
        transport = self._transport
        request = transport.encode(call)
        deadline = transport.start_attempt(deadline)
        try:
            status, headers, body, _ = await transport.send(call, request, deadline)
        except Exception as exc:
            return _attempt_failed(call, exc)
        return _read_response(status, headers, body)


# ===========================================================================
# Evidence: verify signed CyclesEvidence envelopes offline (cycles-evidence-v0.2)
# ===========================================================================
#
# RFC 8785 (JCS) canonical bytes, a pure-Python RFC 8032 Ed25519 verifier and the
# spec's signer-key resolution.  A bad envelope or key set is a disposition with a
# reason, never an exception; only a wrong argument raises.  Nothing is built at
# import: hashlib, base64, decimal and re are imported when something is verified.

EVIDENCE_SCHEMA_VERSION = "cycles-evidence/v0.1"
JWKS_SUFFIX = "/.well-known/cycles-jwks.json"
EVIDENCE_ARTIFACT_TYPES = ("decide", "reserve", "commit", "release", "error")

AUTHENTIC = "authentic"
BINDING_ONLY = "binding_only"
SIGNER_AUTHORITY_FAILED = "signer_authority_failed"
SIGNER_RESOLUTION_FAILED = "signer_resolution_failed"
SIGNATURE_INVALID = "signature_invalid"


@_dataclass(frozen=True)
class EvidenceVerification:
    """The outcome of verifying one CyclesEvidence envelope (cycles-evidence-v0.2).

    ``disposition`` is exactly one of ``"authentic"`` (signature valid and the key
    is the one window-covering key of ``server_id``'s JWK Set), ``"binding_only"``
    (signature valid, no authority resolved), ``"signer_authority_failed"`` (the
    set was read but does not authorise the key), ``"signer_resolution_failed"``
    (the set or the envelope could not be obtained or parsed: says nothing about
    the bytes) or ``"signature_invalid"`` (tampered or malformed envelope).

    ``signer_pin_matched``: None without an ``expected_signer`` pin, else whether
    the verifying key equals it.  ``ok`` is True for ``authentic`` (unless a pin
    was given and did not match) and for ``binding_only`` with a matching pin.
    ``signer_kid``: the ``kid`` of the JWK that established authority (archive
    that JWK with the envelope to verify it again once the server is gone).
    """

    disposition: str
    signer_pin_matched: bool | None
    evidence_id: str | None
    artifact_type: str | None
    reason: str
    signer_kid: str | None = None
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        pin = self.signer_pin_matched
        ok = (self.disposition == AUTHENTIC and pin is not False) or (
            self.disposition == BINDING_ONLY and pin is True
        )
        object.__setattr__(self, "ok", ok)


# -- RFC 8785: JSON Canonicalization Scheme ------------------------------------


def _jcs(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value; ValueError for a value that has
    no such form (NaN, a lone surrogate, a non-string key...)."""
    try:
        return _jcs_text(value).encode("utf-8")
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate (not valid Unicode)") from None


def _jcs_text(value: Any) -> str:
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return json.dumps(value, ensure_ascii=False)  # strings: the escapes of RFC 8785 3.2.2.2
    if isinstance(value, int):
        return str(value) if -(2**53) <= value <= 2**53 else _es_number(float(value))
    if isinstance(value, float):
        return _es_number(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("an object key is not a string")
        # RFC 8785 3.2.3: properties sort by their UTF-16 code units.
        keys = sorted(value, key=lambda key: key.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(_jcs_text(key) + ":" + _jcs_text(value[key]) for key in keys) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_jcs_text, value)) + "]"
    raise ValueError(f"{_type_name(value)} is not a JSON value")


def _es_number(value: float) -> str:
    """ECMAScript Number.prototype.toString of a double (RFC 8785 3.2.2.3)."""
    import decimal

    if not math.isfinite(value):
        raise ValueError("NaN and Infinity have no JSON form")
    if value == 0:
        return "0"
    if value < 0:
        return "-" + _es_number(-value)
    # repr() is the shortest round-tripping decimal, as ECMAScript requires.
    _, digit_tuple, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    count, point = len(digits), len(digits) + int(exponent)  # value = 0.digits * 10**point
    if count <= point <= 21:
        return digits + "0" * (point - count)
    if 0 < point <= 21:
        return digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    head = digits[0] + "." + digits[1:] if count > 1 else digits
    return f"{head}e{point - 1:+d}"


# -- RFC 8032: Ed25519 verification (pure Python, cofactorless) ------------------

_ED_P = 2**255 - 19
_ED_L = 2**252 + 27742317777372353535851937790883648493
# d = -121665/121666 and sqrt(-1) = 2**((p-1)/4), modulo p
_ED_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_ED_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
if TYPE_CHECKING:  # pragma: no cover
    # A point in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z.
    _EdPoint = Tuple[int, int, int, int]
_ED_IDENTITY = (0, 1, 1, 0)
_ED_BASE = (  # B of RFC 8032 5.1: y = 4/5, x even
    15112221349535400772501151409588531511454012693041857206046113283949847762202,
    46316835694926478169428394003475163141307993866256225615783033603165251855960,
    1,
    46827403850823179245072216630277197565144205554125654976674165829533817101731,
)


def _ed_add(a: _EdPoint, b: _EdPoint) -> _EdPoint:
    """Point addition on -x^2 + y^2 = 1 + d x^2 y^2 (RFC 8032 5.1.4); it also doubles."""
    p = _ED_P
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % p
    bb = (y1 + x1) * (y2 + x2) % p
    cc = t1 * t2 % p * _ED_D * 2 % p
    dd = 2 * z1 * z2 % p
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % p, g * h % p, f * g % p, e * h % p


def _ed_mul(
    scalar: int, point: _EdPoint, scalar2: int = 0, point2: _EdPoint = _ED_IDENTITY
) -> _EdPoint:
    """[scalar]point + [scalar2]point2, sharing one chain of doublings (Straus)."""
    total = _ED_IDENTITY
    addends = (_ED_IDENTITY, point, point2, _ed_add(point, point2))
    for bit in reversed(range(max(scalar.bit_length(), scalar2.bit_length()))):
        total = _ed_add(total, total)
        pick = (scalar >> bit & 1) | (scalar2 >> bit & 1) << 1
        if pick:
            total = _ed_add(total, addends[pick])
    return total


def _ed_decode(data: bytes) -> _EdPoint | None:
    """RFC 8032 5.1.3, strict: None for y >= p, no square root, or x = 0 with the sign bit."""
    p = _ED_P
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= p:
        return None
    u, v = y * y - 1, _ED_D * y * y + 1  # x^2 = u / v
    x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p
    if (v * x * x - u) % p:
        x = x * _ED_SQRT_M1 % p
    if (v * x * x - u) % p or (x == 0 and sign):
        return None
    if x & 1 != sign:
        x = p - x
    return x, y, 1, x * y % p


def _ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 5.1.7 with the cofactorless check [S]B = R + [k]A."""
    import hashlib

    if len(public_key) != 32 or len(signature) != 64:
        return False
    point_a = _ed_decode(public_key)
    point_r = _ed_decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if point_a is None or point_r is None or s >= _ED_L:
        return False
    digest = hashlib.sha512(signature[:32] + public_key + message).digest()
    k = int.from_bytes(digest, "little") % _ED_L
    p = _ED_P
    x, y, z, t = point_a
    x1, y1, z1, _ = _ed_mul(s, _ED_BASE, k, (p - x, y, z, p - t))  # [S]B - [k]A, to compare with R
    x2, y2, z2, _ = point_r
    return (x1 * z2 - x2 * z1) % p == 0 and (y1 * z2 - y2 * z1) % p == 0


# -- the verifier ----------------------------------------------------------------


class _Verdict(Exception):
    """A disposition and its reason, with the verifying key (and kid) once known.

    Raised where a disposition is reached early; also stands for an envelope or a key
    set that could not be obtained or parsed."""

    def __init__(
        self, disposition: str, reason: str, key: bytes | None = None, kid: str | None = None
    ) -> None:
        super().__init__(reason)
        self.disposition = disposition
        self.reason = reason
        self.key = key
        self.kid = kid


def verify_evidence(
    envelope: dict[str, Any] | str | bytes,
    *,
    jwks: dict[str, Any] | str | bytes | None = None,
    expected_signer: str | None = None,
) -> EvidenceVerification:
    """Verify a CyclesEvidence envelope offline (cycles-evidence-v0.2).

    ``envelope``: a dict, or its JSON text or bytes.  ``jwks``: the server's JWK
    Set (dict, JSON text or bytes); without it no signer authority is resolved
    (``binding_only`` at best).  ``expected_signer``: a raw-hex Ed25519 key to pin.
    Raises TypeError or ValueError for a wrong argument only; everything about the
    envelope and the key set is in the returned ``EvidenceVerification``.
    """
    pin = _signer_pin(expected_signer)
    key_set = _json_argument(jwks, "jwks")
    return _verify_envelope(_json_argument(envelope), key_set, pin)


def _signer_pin(expected_signer: Any) -> str | None:
    if expected_signer is None:
        return None
    if not isinstance(expected_signer, str):
        raise TypeError(f"expected_signer: expected a str, got {_type_name(expected_signer)}")
    pin = expected_signer.strip().lower()
    if not _is_hex(pin, 64):
        raise ValueError("expected_signer: must be a raw Ed25519 public key, 64 hex characters")
    return pin


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate object key")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_argument(value: Any, name: str = "envelope") -> Any:
    """The ``envelope`` or ``jwks`` argument: a dict as given, else JSON text or bytes parsed
    strictly (I-JSON: no duplicate keys, no NaN/Infinity); a _Verdict when it is not JSON
    (``jwks=None`` stays None: no authority resolution)."""
    if value is None and name == "jwks":
        return None
    if isinstance(value, dict):
        return value
    if not isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name}: expected a dict, JSON text or bytes, got {_type_name(value)}")
    try:
        return json.loads(value, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        if name == "jwks":
            return _Verdict(SIGNER_RESOLUTION_FAILED, f"the JWK Set is not valid JSON: {detail}")
        return _Verdict(SIGNATURE_INVALID, f"the envelope is not valid JSON: {detail}")


def _verify_envelope(
    envelope: Any, key_set: Any, pin: str | None, evidence_id: str | None = None
) -> EvidenceVerification:
    """The spec's verification of one parsed envelope (or the _Verdict already reached)
    against a key set (None: no authority resolution; a _Verdict: not obtained)."""
    artifact_type = None
    if isinstance(envelope, dict):
        claimed = envelope.get("evidence_id")
        evidence_id = claimed if _is_hex(claimed, 64) else None
        kind = envelope.get("artifact_type")
        artifact_type = kind if kind in EVIDENCE_ARTIFACT_TYPES else None
    try:
        verdict = _evaluate_envelope(envelope, key_set)
    except _Verdict as early:
        verdict = early
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a safety net
        verdict = _Verdict(SIGNATURE_INVALID, f"the envelope cannot be verified: {exc}")
    key, reason = verdict.key, verdict.reason
    pin_matched = None if pin is None else key is not None and key.hex() == pin
    if pin_matched is False:
        reason += "; the signer does not match expected_signer"
    return EvidenceVerification(
        verdict.disposition, pin_matched, evidence_id, artifact_type, reason, verdict.kid
    )


def _evaluate_envelope(envelope: Any, key_set: Any) -> _Verdict:
    """The disposition of a signature that verifies; raises _Verdict for any other."""
    if isinstance(envelope, _Verdict):
        return envelope
    _check_envelope_shape(envelope)
    message = _signing_input(envelope)
    signature = bytes.fromhex(envelope["signature"])
    signer, server_id = envelope["signer_did"], envelope["server_id"]
    issued_at = envelope["issued_at_ms"]
    if _is_hex(signer, 64):
        key = bytes.fromhex(signer)
        _check_signature(key, message, signature, "signer_did")
        if key_set is None:
            reason = "signature valid; signer authority not resolved (no JWK Set)"
            return _Verdict(BINDING_ONLY, reason, key)
        kid = _kid_of_key(_candidate_keys(key_set, key, issued_at), key, issued_at)
    else:
        kid = _did_cycles_kid(signer, server_id, key_set)
        key = _key_of_kid(_candidate_keys(key_set, None, issued_at), kid, issued_at)
        _check_signature(key, message, signature, f"key {kid!r}")
    return _Verdict(AUTHENTIC, f"signature valid; signed by key {kid!r} of {server_id}", key, kid)


def _check_signature(key: bytes, message: bytes, signature: bytes, against: str) -> None:
    if not _ed25519_verify(key, message, signature):
        raise _Verdict(SIGNATURE_INVALID, f"the signature does not verify against {against}", key)


def _invalid_envelope(reason: str) -> _Verdict:
    return _Verdict(SIGNATURE_INVALID, "malformed envelope: " + reason)


def _check_envelope_shape(envelope: Any) -> None:
    if not isinstance(envelope, dict):
        raise _invalid_envelope("not a JSON object")
    fields: Dict[str, Tuple[Callable[[Any], bool], str]] = {  # in the order they are checked
        "schema_version": (lambda v: v == EVIDENCE_SCHEMA_VERSION, repr(EVIDENCE_SCHEMA_VERSION)),
        "artifact_type": (lambda v: v in EVIDENCE_ARTIFACT_TYPES, "an artifact type"),
        "server_id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "signer_did": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "issued_at_ms": (lambda v: _is_int(v, 0, INT64_MAX), "a non-negative integer"),
        "payload": (lambda v: isinstance(v, dict), "an object"),
        "evidence_id": (lambda v: _is_hex(v, 64), "64 lowercase hex characters"),
        "signature": (lambda v: _is_hex(v, 128), "128 lowercase hex characters"),
        "trace_id": (lambda v: _is_hex(v, 32), "32 lowercase hex characters"),  # optional
    }
    for name, (valid, expected) in fields.items():
        if name not in envelope and name != "trace_id":
            raise _invalid_envelope(f"{name} is missing")
        if name in envelope and not valid(envelope[name]):
            raise _invalid_envelope(f"{name} must be {expected}")
    unknown = sorted(str(name) for name in envelope if name not in fields)
    if unknown:
        raise _invalid_envelope(f"unknown field {unknown[0]!r}")
    kind, payload = envelope["artifact_type"], envelope["payload"]
    if list(payload) != [kind] or not isinstance(payload[kind], dict):
        raise _invalid_envelope(f"payload must hold exactly the key {kind!r}, an object")


def _signing_input(envelope: Dict[str, Any]) -> bytes:
    """Check ``evidence_id`` (SHA-256 of JCS with id and signature emptied) and return the
    signed bytes (JCS with the id set and the signature emptied)."""
    import hashlib

    try:
        hashed = _jcs(dict(envelope, evidence_id="", signature=""))
        signed = _jcs(dict(envelope, signature=""))
    except ValueError as exc:
        raise _invalid_envelope(f"no RFC 8785 canonical form: {exc}") from None
    if hashlib.sha256(hashed).hexdigest() != envelope["evidence_id"]:
        reason = "evidence_id does not match the envelope's content (tampered)"
        raise _Verdict(SIGNATURE_INVALID, reason)
    return signed


def _did_cycles_kid(signer: str, server_id: str, key_set: Any) -> str:
    """The ``#kid`` of a ``did:cycles:<sha256 of server_id>#kid`` signer; raises _Verdict."""
    import hashlib

    prefix = "did:cycles:"
    if not signer.startswith(prefix):
        reason = "signer_did is neither a raw-hex key nor a did:cycles DID: cannot be resolved"
        raise _Verdict(SIGNER_RESOLUTION_FAILED, reason)
    server_hash, _, kid = signer[len(prefix) :].partition("#")
    if not server_hash or not kid:
        raise _Verdict(SIGNER_RESOLUTION_FAILED, "malformed did:cycles signer_did")
    if key_set is None:
        raise _Verdict(SIGNER_RESOLUTION_FAILED, "a did:cycles signer needs the server's JWK Set")
    if isinstance(key_set, _Verdict):
        raise key_set
    if hashlib.sha256(server_id.encode("utf-8")).hexdigest() != server_hash:
        reason = "signer_did does not bind to this envelope's server_id"
        raise _Verdict(SIGNER_AUTHORITY_FAILED, reason)
    return kid


def _candidate_keys(
    key_set: Any, key: bytes | None, issued_at_ms: int
) -> List[Tuple[str, bytes, bool]]:
    """(kid, key, whether its window covers issued_at_ms) for each valid Ed25519 JWK of the
    set, after the set-level rules (a ``keys`` list, unique kids)."""
    if isinstance(key_set, _Verdict):
        raise _Verdict(key_set.disposition, key_set.reason, key)
    entries = key_set.get("keys") if isinstance(key_set, dict) else None
    if not isinstance(entries, list):
        raise _Verdict(SIGNER_RESOLUTION_FAILED, "the JWK Set has no 'keys' list", key)
    seen: set[str] = set()
    for entry in entries:  # an invalid JWK's kid counts as taken too
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if isinstance(kid, str):
            if kid in seen:
                reason = f"duplicate kid {kid!r} in the JWK Set"
                raise _Verdict(SIGNER_AUTHORITY_FAILED, reason, key)
            seen.add(kid)
    candidates = (_candidate_key(entry, issued_at_ms) for entry in entries)
    return [candidate for candidate in candidates if candidate is not None]


def _candidate_key(entry: Any, issued_at_ms: int) -> Tuple[str, bytes, bool] | None:
    """(kid, key, whether ``nbf <= issued_at < exp`` holds) of a valid Ed25519 JWK (an
    absent exp is open-ended); None excludes the entry from candidacy."""
    if not isinstance(entry, dict):
        return None
    algorithm = (entry.get("kty"), entry.get("crv"), entry.get("alg", "EdDSA"))
    kid, nbf, exp = entry.get("kid"), entry.get("cycles_nbf_ms"), entry.get("cycles_exp_ms")
    if algorithm != ("OKP", "Ed25519", "EdDSA") or not isinstance(kid, str) or not kid:
        return None
    if type(nbf) is not int or not (exp is None or type(exp) is int):
        return None
    key = _base64url_key(entry.get("x"))
    covers = nbf <= issued_at_ms and (exp is None or issued_at_ms < exp)
    return None if key is None else (kid, key, covers)


def _base64url_key(text: Any) -> bytes | None:
    """Strict unpadded base64url of exactly 32 bytes (RFC 7515 2), else None."""
    import base64
    import re

    if not isinstance(text, str) or not re.fullmatch("[A-Za-z0-9_-]{43}", text):
        return None
    key = base64.urlsafe_b64decode(text + "=")
    return key if base64.urlsafe_b64encode(key).decode("ascii").rstrip("=") == text else None


def _key_of_kid(candidates: List[Tuple[str, bytes, bool]], kid: str, issued_at_ms: int) -> bytes:
    found = [(key, covers) for jwk_kid, key, covers in candidates if jwk_kid == kid]
    if not found:
        raise _Verdict(SIGNER_AUTHORITY_FAILED, f"no valid key with kid {kid!r} in the JWK Set")
    key, covers = found[0]
    if not covers:
        reason = f"key {kid!r} is not valid at issued_at_ms {issued_at_ms}"
        raise _Verdict(SIGNER_AUTHORITY_FAILED, reason, key)
    return key


def _kid_of_key(candidates: List[Tuple[str, bytes, bool]], key: bytes, issued_at_ms: int) -> str:
    """The raw-hex bridge: the kid of exactly one window-covering JWK whose x is this key."""
    same_key = [(kid, covers) for kid, jwk_key, covers in candidates if jwk_key == key]
    covering = [kid for kid, covers in same_key if covers]
    if len(covering) == 1:
        return covering[0]
    if covering:
        kids = ", ".join(map(repr, covering))
        reason = f"ambiguous: keys {kids} all cover issued_at_ms {issued_at_ms}"
    elif same_key:
        reason = f"the signer key is in the JWK Set but not valid at issued_at_ms {issued_at_ms}"
    else:
        reason = "the signer key is not in the JWK Set"
    raise _Verdict(SIGNER_AUTHORITY_FAILED, reason, key)


# -- fetching: client.verify_evidence ----------------------------------------------


def _is_own_jwks_url(config: CyclesConfig, url: str) -> bool:
    """Whether ``url`` is where this client's ``get_evidence_jwks`` goes."""
    origin = _parse_base_url(config.base_url)
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    own = (origin.scheme, origin.host.lower(), origin.port, origin.base_path + JWKS_PATH, "", "")
    return (
        parts.scheme.lower(), parts.hostname or "", port, parts.path, parts.query, parts.fragment
    ) == own


def _verify_evidence_steps(
    config: CyclesConfig, target: Any, jwks: Any, expected_signer: Any
) -> Generator[Tuple[str, str], CyclesResponse, EvidenceVerification]:
    """Fetch what verification needs, then verify: yields ``("evidence", id)`` or
    ``("jwks", "")`` and receives the response.

    A failed fetch is ``signer_resolution_failed``, never ``signature_invalid``.
    """
    pin = _signer_pin(expected_signer)
    key_set = _json_argument(jwks, "jwks")
    evidence_id = None
    if isinstance(target, str) and _is_hex(target, 64):
        evidence_id = target
        response = yield ("evidence", target)
        envelope: Any = response.body
        if not response.is_success or not envelope:
            reason = f"could not fetch evidence {target}: {_describe(response)}"
            envelope = _Verdict(SIGNER_RESOLUTION_FAILED, reason)
        elif envelope.get("evidence_id") != target:
            reason = f"the server answered {target} with another envelope"
            envelope = _Verdict(SIGNATURE_INVALID, reason)
    elif isinstance(target, str) and not target.lstrip().startswith("{"):
        raise ValueError("evidence_id_or_envelope: expected a 64-hex evidence id or an envelope")
    else:
        envelope = _json_argument(target)
    server_id = envelope.get("server_id") if isinstance(envelope, dict) else None
    if key_set is None and isinstance(server_id, str):
        url = (server_id[:-1] if server_id.endswith("/") else server_id) + JWKS_SUFFIX
        if not _is_own_jwks_url(config, url):
            reason = f"the JWK Set {url} is not on this client's server; pass jwks="
            key_set = _Verdict(SIGNER_RESOLUTION_FAILED, reason)
        else:
            response = yield ("jwks", "")
            key_set = response.body
            if not response.is_success:
                reason = f"could not fetch the JWK Set {url}: {_describe(response)}"
                key_set = _Verdict(SIGNER_RESOLUTION_FAILED, reason)
    return _verify_envelope(envelope, key_set, pin, evidence_id)


async def _fetch_and_verify(
    client: CyclesClient | AsyncCyclesClient,
    steps: Generator[Tuple[str, str], CyclesResponse, EvidenceVerification],
) -> EvidenceVerification:
    """Run _verify_evidence_steps with the client's own public requests (awaited when the
    client is async; a sync client's run under ``_run_sync``)."""
    try:
        what, evidence_id = next(steps)
        while True:
            if what == "evidence":
                response: Any = client.get_evidence(evidence_id)
            else:
                response = client.get_evidence_jwks()
            if inspect.isawaitable(response):
                response = await response
            what, evidence_id = steps.send(response)
    except StopIteration as done:
        result: EvidenceVerification = done.value
        return result


# ===========================================================================
# Decorator
# ===========================================================================


def cycles(
    estimate: int | Callable[..., int],
    *,
    actual: int | Callable[..., int] | None = None,
    action_kind: str | Callable[..., str | None] | None = None,
    action_name: str | Callable[..., str | None] | None = None,
    action_tags: list[str] | Callable[..., list[str] | None] | None = None,
    unit: Unit | str = Unit.USD_MICROCENTS,
    ttl_ms: int = DEFAULT_TTL_MS,
    grace_period_ms: int | None = None,
    overage_policy: str = DEFAULT_OVERAGE_POLICY,
    dry_run: bool = False,
    tenant: str | Callable[..., str | None] | None = None,
    workspace: str | Callable[..., str | None] | None = None,
    app: str | Callable[..., str | None] | None = None,
    workflow: str | Callable[..., str | None] | None = None,
    agent: str | Callable[..., str | None] | None = None,
    toolset: str | Callable[..., str | None] | None = None,
    dimensions: dict[str, str] | Callable[..., dict[str, str] | None] | None = None,
    client: CyclesClient | AsyncCyclesClient | None = None,
    use_estimate_if_actual_not_provided: bool = True,
) -> Callable[[_F], _F]:
    """Reserve budget before the function runs, keep it alive while it runs, settle it after.

    runcycles 0.5.3's decorator.  ``estimate`` and the subject/action
    parameters are constants or callables of the function's arguments;
    ``actual`` is a constant or a callable of its return value (default: the
    estimate, committed with metadata ``actual_source="estimate"``).  A denial
    raises the typed exception before the function runs; if the function raises,
    the reservation is released and the exception re-raised; if it returns, the
    actual is committed (never released), retried with the same idempotency key
    if needed, and the result returned.  ``dry_run=True`` returns a DryRunResult
    without running the function.  Works on ``def`` and ``async def`` functions
    and on objects with an ``async def __call__``; the client (``client=``, else
    the default client of the right kind, else one made from the default config)
    is resolved at each call.
    """
    spec = _CyclesSpec(
        estimate=estimate,
        actual=actual,
        per_call=dict(tenant=tenant, workspace=workspace, app=app, workflow=workflow,
                      agent=agent, toolset=toolset, dimensions=dimensions,
                      action_kind=action_kind, action_name=action_name, action_tags=action_tags),
        unit=unit,
        ttl_ms=ttl_ms,
        grace_period_ms=grace_period_ms,
        overage_policy=overage_policy,
        dry_run=dry_run,
        use_estimate_if_actual_not_provided=use_estimate_if_actual_not_provided,
    )

    def decorate(fn: _F) -> _F:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError("@cycles cannot guard a generator; use client.stream_reservation")
        if _is_async_callable(fn):
            return _async_guarded(fn, spec, client)  # type: ignore[return-value]
        return _sync_guarded(fn, spec, client)  # type: ignore[return-value]

    return decorate


def _sync_guarded(fn: Callable[..., Any], spec: _CyclesSpec, explicit: Any) -> Callable[..., Any]:
    # A CyclesClient given to @cycles is resolved and checked once, here.
    fixed = _SyncIO(explicit) if isinstance(explicit, CyclesClient) else None

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        io = fixed or _SyncIO(_resolve_client(explicit, is_async=False))
        body = spec.create_body(io.config, args, kwargs)
        if spec.dry_run:
            return _run_sync(_dry_run(io, body))
        with _SyncFace(io.client, body, None, io) as guard:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                _reject_awaitable(result)
            _run_sync(_commit_result(spec, guard, result))
        return result

    return guarded


def _async_guarded(fn: Callable[..., Any], spec: _CyclesSpec, explicit: Any) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        client = _resolve_client(explicit, is_async=True)
        body = spec.create_body(_config_of(client), args, kwargs)
        if spec.dry_run:
            return await _dry_run(_AsyncIO(client), body)
        async with _AsyncFace(client, body, None) as guard:
            result = await fn(*args, **kwargs)
            await _commit_result(spec, guard, result)
        return result

    return guarded


async def _commit_result(spec: _CyclesSpec, guard: _Reservation, result: Any) -> None:
    """After the function returned: commit its actual (or, if unknown, settle nothing)."""
    guard._work_done = True
    actual, estimated = spec.actual_for(result, guard)
    await guard._commit(actual, estimated=estimated)


async def _dry_run(io: _SyncIO | _AsyncIO, body: Dict[str, Any]) -> DryRunResult:
    created, _, _ = await _create(io, body)
    return DryRunResult(
        decision=created.decision,
        caps=created.caps,
        affected_scopes=created.affected_scopes,
        scope_path=created.scope_path,
        reserved=created.reserved,
        balances=created.balances,
        reason_code=created.reason_code,
        retry_after_ms=created.retry_after_ms,
    )


def _is_async_callable(fn: Any) -> bool:
    """``async def`` functions (partials too) and objects with an ``async def __call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def _reject_awaitable(result: Any) -> None:
    """A sync function that returns an awaitable has not done its work yet."""
    if inspect.iscoroutine(result):
        result.close()
    raise TypeError("@cycles: a sync function returned an awaitable; decorate the async def itself")


@_dataclass
class _CyclesSpec:
    """The ``@cycles`` parameters.  ``estimate`` and ``per_call`` (the subject and action
    parameters, by name) are constants or callables of the function's arguments."""

    estimate: Any
    actual: Any
    per_call: Dict[str, Any]
    unit: Any
    ttl_ms: Any
    grace_period_ms: Any
    overage_policy: Any
    dry_run: bool
    use_estimate_if_actual_not_provided: bool
    settings_checked: bool = field(default=False, init=False)
    callables: List[Tuple[str, Callable[..., Any]]] = field(default_factory=list, init=False)
    # Every parameter a constant and the settings valid: the body depends on the config's
    # subject defaults only, so its last checked form is kept (without its key) with them.
    constant_body: Tuple[Any, Dict[str, Any]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        """Check the settings (unit, ttl, grace, overage policy) once; a bad one is still
        raised by each call, where runcycles raises it, and in its order."""
        self.callables = [(name, v) for name, v in self.per_call.items() if callable(v)]
        try:
            _ttl_check("ttl_ms", self.ttl_ms, False)
            if self.grace_period_ms is not None:
                _grace_check("grace_period_ms", self.grace_period_ms, False)
            unit = _wire_value(_unit_check("unit", self.unit, False))
            if self.overage_policy is not None:
                policy = _overage_policy("overage_policy", self.overage_policy, False)
                self.overage_policy = _wire_value(policy)
        except ValueError:
            return
        self.unit, self.settings_checked = unit, True

    def create_body(
        self, config: CyclesConfig, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Dict[str, Any]:
        """The body of one call, under a fresh idempotency key; a constant body is checked
        once per set of subject defaults."""
        defaults = _subject_defaults(config)
        kept = self.constant_body
        if kept is not None and kept[0] == defaults:
            return _body_copy(kept[1], _new_key())
        body = self._checked_body(config, args, kwargs)
        if self._is_constant():
            self.constant_body = defaults, _body_copy(body, body["idempotency_key"])
        return body

    def _is_constant(self) -> bool:
        """Every parameter a constant the caller cannot change in place (dimensions and tags
        are read at each call, as runcycles reads them), and the settings valid."""
        per_call = self.per_call
        in_place = per_call["dimensions"] is not None or per_call["action_tags"] is not None
        return (
            self.settings_checked
            and not self.callables
            and not callable(self.estimate)
            and not in_place
        )

    def _checked_body(
        self, config: CyclesConfig, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Dict[str, Any]:
        """Checks in runcycles' order, before any request: the actual first, then the body."""
        estimate = self.estimate(*args, **kwargs) if callable(self.estimate) else self.estimate
        if not self.dry_run:
            if self.actual is None and not self.use_estimate_if_actual_not_provided:
                raise ValueError(
                    "actual expression is required when"
                    " use_estimate_if_actual_not_provided is False"
                )
            if self.actual is not None and not callable(self.actual):
                _int64("actual", self.actual, False)
        values = dict(self.per_call)
        for name, compute in self.callables:
            values[name] = compute(*args, **kwargs)
        return _reservation_body(
            estimate=estimate,
            unit=self.unit,
            subject=_subject_with_defaults(config, values, values["dimensions"]),
            action=_action_body(
                values["action_kind"], values["action_name"], values["action_tags"]
            ),
            ttl_ms=self.ttl_ms,
            grace_period_ms=self.grace_period_ms,
            overage_policy=self.overage_policy,
            dry_run=self.dry_run,
            settings_checked=self.settings_checked,
        )

    def actual_for(self, result: Any, guard: _Reservation) -> Tuple[int, bool]:
        """(actual, taken from the estimate?); raises when the actual is unknown."""
        if self.actual is None:
            return guard._estimate, True
        if not callable(self.actual):
            return int(self.actual), False
        try:
            return _int64("actual", self.actual(result), False), False
        except Exception:
            if not self.use_estimate_if_actual_not_provided:
                raise  # the actual is unknown: nothing is committed
            _log.error(
                "actual evaluation failed after the guarded work; committing the estimate:"
                " reservation_id=%s",
                guard.reservation_id,
                exc_info=True,
            )
            return guard._estimate, True


def _body_copy(body: Dict[str, Any], key: str) -> Dict[str, Any]:
    """``body`` under ``key``, with inner dicts of its own: a client may edit the body it
    is given (runcycles builds one per call), and the event fallback sends its subject."""
    return {
        **body,
        "idempotency_key": key,
        "estimate": dict(body["estimate"]),
        "subject": dict(body["subject"]),
        "action": dict(body["action"]),
    }


_defaults_lock = threading.Lock()
_default_client: CyclesClient | None = None
_default_async_client: AsyncCyclesClient | None = None
_default_config: CyclesConfig | None = None
_config_clients: Dict[bool, Any] = {}  # clients made from _default_config, by is_async


@_after_fork_in_child
def _defaults_after_fork() -> None:
    """The default clients stay (their pools reset themselves); the lock is the child's."""
    global _defaults_lock
    _defaults_lock = threading.Lock()


def set_default_client(client: CyclesClient | AsyncCyclesClient) -> None:
    """The client ``@cycles`` uses when none is passed (one default per kind)."""
    global _default_client, _default_async_client
    with _defaults_lock:
        if isinstance(client, AsyncCyclesClient):
            _default_async_client = client
        else:
            _check_kind(client, CyclesClient)
            _default_client = client


def set_default_config(config: CyclesConfig) -> None:
    """``@cycles`` creates its clients from this config, lazily, on first call."""
    global _default_config
    _check_kind(config, CyclesConfig, "config")
    with _defaults_lock:
        _default_config = config
        _config_clients.clear()


def _resolve_client(explicit: Any, is_async: bool) -> Any:
    """The client of one call, resolved at call time (set_default_* may come after decoration)."""
    client = explicit if explicit is not None else _default_client_for(is_async)
    head = "Async function requires" if is_async else "Sync function requires"
    _check_client(client, is_async, head)
    return client


def _default_client_for(is_async: bool) -> Any:
    with _defaults_lock:
        own = _default_async_client if is_async else _default_client
        if own is not None:
            return own
        if _default_config is not None:
            client = _config_clients.get(is_async)
            if client is None:
                kind = AsyncCyclesClient if is_async else CyclesClient
                client = _config_clients[is_async] = kind(_default_config)
            return client
        other = _default_client if is_async else _default_async_client
        if other is not None:
            return other  # the wrong kind: _resolve_client says so
    raise ValueError(
        "No Cycles client available. Either pass client= to @cycles, "
        "call set_default_client(), or call set_default_config()."
    )


# ===========================================================================
# Guard and heartbeat
# ===========================================================================

# ---------------------------------------------------------------------------
# The reservation lifecycle: one object, three faces
#
# ``@cycles`` (above), ``client.reserve(...)`` and ``client.stream_reservation(...)``
# all drive one ``_Reservation``: create -> (heartbeat) -> commit | release | event
# fallback.  Its steps are written once, as coroutines over an I/O object (``send``,
# ``sleep``, ``blocking``, heartbeat start/stop; see "The I/O seam" below): a sync
# face runs them with ``_run_sync`` over blocking I/O (they never suspend), an async
# face awaits them over asyncio I/O.  A decorated call, top-down from here: ``guarded``
# -> ``_SyncFace.__enter__`` -> ``_enter`` -> ``_open`` -> ``_create`` -> ``io.send`` ->
# ``client.create_reservation``; the heartbeat starts; the function runs;
# ``_commit_result`` -> ``_commit`` -> ``_settle_new`` (stops the heartbeat) ->
# ``_settle`` -> ``_settlement_attempt`` -> ``io.send`` -> ``client.commit_reservation``;
# then ``__exit__`` -> ``_leave``.
# ---------------------------------------------------------------------------

_current_context: contextvars.ContextVar[CyclesContext | None] = contextvars.ContextVar(
    "cycles_lite_context", default=None
)


def get_cycles_context() -> CyclesContext | None:
    """The reservation the current guarded call runs under, or None outside one."""
    return _current_context.get()


class _Reservation:
    """One reservation's lifecycle: create -> (heartbeat) -> commit | release | event fallback.

    The faces (ReservationGuard, AsyncReservationGuard, the streams and
    ``@cycles``) only pick the I/O.  Phases: new -> open -> closed; a
    reservation is opened once and settled (committed, released or abandoned) once.
    """

    _failure_reason = "guarded_method_failed"
    _is_async: ClassVar[bool] = False  # the face's kind of client

    def __init__(
        self,
        client: Any,
        create_body: Dict[str, Any],
        caller_key: str | None,
        io: _SyncIO | None = None,  # a sync face's I/O on ``client``, when one is at hand
    ) -> None:
        self._client = client
        self._io: _SyncIO | _AsyncIO = io or (_AsyncIO if self._is_async else _SyncIO)(client)
        self._create_body = create_body
        self._estimate: int = create_body["estimate"]["amount"]
        self._caller_key = caller_key
        self._created: ReservationCreateResponse | None = None
        self._context: CyclesContext | None = None
        self._context_token: contextvars.Token[CyclesContext | None] | None = None
        self._heartbeat: Any = None
        self._opened_at = 0.0
        self._phase = "new"
        self._work_done = False  # set once the function returned or commit() was called
        self._settlement_error: CyclesProtocolError | None = None
        self._release_error: CyclesProtocolError | None = None
        _replay_on_first_use(client)

    def __repr__(self) -> str:
        rid = self._created.reservation_id if self._created else None
        return f"{type(self).__name__}(reservation_id={rid!r}, phase={self._phase!r})"

    # -- what the guarded code can read ----------------------------------------

    @property
    def reservation_id(self) -> str:
        if self._created is None or self._created.reservation_id is None:
            raise RuntimeError("reservation_id not available outside context manager")
        return self._created.reservation_id

    @property
    def decision(self) -> Decision | str:
        return self._created.decision if self._created else Decision.ALLOW

    @property
    def caps(self) -> Caps | None:
        return self._created.caps if self._created else None

    @property
    def expires_at_ms(self) -> int | None:
        """The lease expiry in server time, as updated by every successful heartbeat."""
        return self._context.expires_at_ms if self._context else None

    @property
    def affected_scopes(self) -> List[str] | None:
        return self._created.affected_scopes if self._created else None

    @property
    def scope_path(self) -> str | None:
        return self._created.scope_path if self._created else None

    @property
    def reserved(self) -> Amount | None:
        return self._created.reserved if self._created else None

    @property
    def balances(self) -> List[Balance] | None:
        return self._created.balances if self._created else None

    @property
    def context(self) -> CyclesContext | None:
        return self._context

    @property
    def is_settled(self) -> bool:
        """True once a commit, release or abandonment has begun (it happens only once)."""
        return self._phase == "closed"

    @property
    def settlement_error(self) -> CyclesProtocolError | None:
        """Why the first commit attempt did not settle (retries may still succeed)."""
        return self._settlement_error

    @property
    def release_error(self) -> CyclesProtocolError | None:
        return self._release_error

    # -- open --------------------------------------------------------------------

    async def _enter(self) -> None:
        """Open; any exception on the way (a KeyboardInterrupt included) leaves at once."""
        try:
            await self._open()
        except BaseException as exc:
            await self._leave(exc)
            raise

    async def _open(self) -> None:
        if self._phase != "new":
            raise RuntimeError("a reservation can be entered only once")
        self._phase = "opening"
        created, sent_ms, received_ms = await _create(self._io, self._create_body)
        if not created.reservation_id:
            raise CyclesProtocolError(
                "Reservation successful but reservation_id missing", status=200
            )
        self._created = created
        self._context = CyclesContext(
            reservation_id=created.reservation_id,
            estimate=self._estimate,
            decision=created.decision,
            caps=created.caps,
            expires_at_ms=created.expires_at_ms,
            affected_scopes=created.affected_scopes,
            scope_path=created.scope_path,
            reserved=created.reserved,
            balances=created.balances,
        )
        self._phase = "open"  # from here on, every way out releases or settles (_leave)
        self._heartbeat = self._start_heartbeat(created, sent_ms, received_ms)
        self._context_token = _current_context.set(self._context)
        self._opened_at = _clock.monotonic()
        _log.debug(
            "reservation created: reservation_id=%s decision=%s",
            created.reservation_id,
            getattr(created.decision, "value", created.decision),
        )

    def _restore_context(self) -> None:
        """Put back the context that was current before this reservation (nesting-safe)."""
        token, self._context_token = self._context_token, None
        if token is None:
            return
        try:
            _current_context.reset(token)
        except ValueError:  # left in another context than it was entered in
            old = token.old_value
            _current_context.set(None if old is contextvars.Token.MISSING else old)

    def _require_open(self, what: str) -> None:
        if self._phase == "closed":
            raise RuntimeError(f"cannot {what}: the reservation is already settled")
        if self._phase != "open":
            raise RuntimeError(f"cannot {what}: the reservation is not open")

    # -- heartbeat -----------------------------------------------------------------

    def _start_heartbeat(
        self, created: ReservationCreateResponse, sent_ms: float, received_ms: float
    ) -> _ScheduledHeartbeat | _TaskHeartbeat:
        """Plan the first beat from the create answer; the beats run from then on (a sync
        heartbeat's are built only when that beat is due).  A bug in the plan stops the
        heartbeat; an interrupt here (Ctrl-C) is the caller's."""
        ttl_ms = int(self._create_body["ttl_ms"])
        plan = _HeartbeatPlan(ttl_ms, math.ceil(self._io.attempt_s * 1000))
        try:
            beat = plan.after_success(
                remaining_ttl_ms=created.remaining_ttl_ms,
                expires_at_ms=created.expires_at_ms,
                sent_ms=sent_ms,
                received_ms=received_ms,
            )
        except Exception:
            self._heartbeat_failed()
            beat = _Beat("stop", 0, "internal_error")
        # The caller's deadline(): a sync heartbeat runs outside the caller's context.
        beats = functools.partial(self._keep_alive, plan, beat, received_ms, _deadline.get())
        return self._io.start_heartbeat(beats, received_ms + beat.delay_ms)

    async def _keep_alive(
        self,
        plan: _HeartbeatPlan,
        beat: _Beat,
        received_ms: float,
        bound: float | None,
        io: _ScheduledHeartbeat | _TaskHeartbeat,
    ) -> None:
        """Keep the lease alive on ``io`` (the heartbeat's own): the spec's schedule from
        ``plan``, from ``beat`` on (``delay_ms`` counting from ``received_ms``).  A fresh
        key for every new beat, the same key for retries of a failed one; every beat asks
        for ``extend_by_ms = ttl_ms``.  Sleeps until each beat is due; no beat starts
        after the caller's deadline (``bound``)."""
        try:
            context = self._context
            assert context is not None
            ttl_ms = int(self._create_body["ttl_ms"])
            body: Dict[str, Any] | None = None
            while beat.action != "stop":
                due_ms = received_ms + beat.delay_ms
                if bound is not None and due_ms >= bound * 1000.0:
                    _log.debug("heartbeat: the deadline comes before the next beat; stopping")
                    return
                await io.sleep(max(0.0, due_ms - _clock.monotonic() * 1000.0) / 1000.0)
                if io.stopped or self._phase != "open":
                    return  # settled meanwhile
                if body is None or beat.action == "extend":
                    body = {"idempotency_key": _new_key(), "extend_by_ms": ttl_ms}
                sent_ms = _clock.monotonic() * 1000.0
                response = await io.send("extend", body, context.reservation_id)
                received_ms = _clock.monotonic() * 1000.0
                if io.stopped or self._phase != "open":
                    return  # stopped meanwhile: the late result is dropped
                beat = self._after_extend(plan, response, sent_ms, received_ms)
        except Exception:
            self._heartbeat_failed()

    def _heartbeat_failed(self) -> None:
        """An internal error in the heartbeat stops it like any other stop (lease lost)."""
        context = self._context
        if context is not None and context.heartbeat_stopped is None:
            context.heartbeat_stopped = "internal_error"
        _log.error(
            "heartbeat stopped by an internal error; the lease will lapse: reservation_id=%s",
            self.reservation_id,
            exc_info=True,
        )

    def _after_extend(
        self, plan: _HeartbeatPlan, response: CyclesResponse, sent_ms: float, received_ms: float
    ) -> _Beat:
        context = self._context
        assert context is not None
        valid = _is_schema_valid("extend", response)
        kind = _classify_extend(response.status, _error_code(response), valid)
        if kind == "success":
            body = response.body
            assert body is not None
            context.update_expires_at_ms(body["expires_at_ms"])
            context.heartbeat_error = None
            beat = plan.after_success(
                remaining_ttl_ms=body.get("remaining_ttl_ms"),
                expires_at_ms=body["expires_at_ms"],
                sent_ms=sent_ms,
                received_ms=received_ms,
            )
            problem = "the lease is shorter than the retry-safety budget"
        else:
            beat = plan.after_failure(
                kind=kind, retry_after_ms=response.retry_after_ms_header, now_ms=received_ms
            )
            problem = "extend failed: " + _describe(response)
            context.heartbeat_error = problem
        self._report_beat(context, kind, problem, beat)
        return beat

    def _report_beat(self, context: CyclesContext, kind: str, problem: str, beat: _Beat) -> None:
        """Policy ``warn``: every failure and every stop is logged and put on the context."""
        rid = context.reservation_id
        if beat.action == "stop":
            context.heartbeat_stopped = beat.reason
            _log.warning(
                "heartbeat: %s; stopping (%s), the lease will lapse: reservation_id=%s",
                problem,
                beat.reason,
                rid,
            )
        elif kind != "success":
            _log.warning(
                "heartbeat: %s; will retry with the same idempotency key in %d ms:"
                " reservation_id=%s",
                problem,
                beat.delay_ms,
                rid,
            )

    # -- settle ----------------------------------------------------------------------

    async def _commit(
        self,
        actual: Any,
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        estimated: bool = False,
    ) -> None:
        """Stop the heartbeat, journal the commit, send it; retries follow config.commit_retry."""
        self._require_open("commit")
        self._work_done = True  # asked to commit: the work happened, whatever the arguments
        commit_body = self._commit_body(actual, metrics, metadata, estimated)
        self._phase = "closed"
        reservation_id = self.reservation_id
        event_body = self._event_body(reservation_id, commit_body)
        job = _Settlement.new(self._client, reservation_id, commit_body, event_body)
        outcome = await _settle_new(self._io, job, self._heartbeat)
        if outcome is not _Disposition.SUCCESS and job.last_response is not None:
            self._settlement_error = _protocol_error(
                job.last_response,
                "Commit did not settle synchronously; known spend was not released",
            )

    def _commit_body(
        self,
        actual: Any,
        metrics: CyclesMetrics | None,
        metadata: Mapping[str, Any] | None,
        estimated: bool,
    ) -> Dict[str, Any]:
        """The commit body.  Bad arguments raise ValueError; bad values the guarded code left
        on the context are dropped with a warning (known spend is committed regardless)."""
        _int64("actual", actual, False)
        context = self._context
        assert context is not None
        measured = self._checked("metrics", metrics, context.metrics, _commit_metrics)
        extra = self._checked("metadata", metadata, context.commit_metadata, _commit_metadata)
        wire_metrics = measured.model_dump(mode="json", exclude_none=True) if measured else {}
        elapsed_ms = int((_clock.monotonic() - self._opened_at) * 1000)
        wire_metrics.setdefault("latency_ms", max(0, elapsed_ms))
        body: Dict[str, Any] = {
            "idempotency_key": _derived_key("commit", self._caller_key),
            "actual": {"unit": self._create_body["estimate"]["unit"], "amount": actual},
            "metrics": wire_metrics,
        }
        extra = dict(extra or {})
        if estimated:
            extra["actual_source"] = "estimate"  # mark assumed spend for auditors
        if extra:
            body["metadata"] = extra
        return body

    def _checked(
        self, name: str, given: Any, from_context: Any, check: Callable[[Any], _T]
    ) -> _T | None:
        if given is not None:
            return check(given)
        if from_context is None:
            return None
        try:
            return check(from_context)
        except ValueError as exc:
            _log.warning(
                "ignoring invalid context %s (%s): reservation_id=%s",
                name,
                exc,
                self.reservation_id,
            )
            return None

    def _event_body(self, reservation_id: str, commit_body: Dict[str, Any]) -> Dict[str, Any]:
        """POST /v1/events body recording the same spend if the reservation expired first.

        Same key (the event namespace is separate), the original subject and action,
        no overage_policy (the default never rejects spend that already happened).
        """
        metadata = dict(commit_body.get("metadata") or {})
        metadata["recovered_reservation_id"] = reservation_id
        metadata["recovery_reason"] = "commit_after_reservation_expired"
        event = {
            "idempotency_key": commit_body["idempotency_key"],
            "subject": self._create_body["subject"],
            "action": self._create_body["action"],
            "actual": commit_body["actual"],
            "metadata": metadata,
        }
        if "metrics" in commit_body:
            event["metrics"] = commit_body["metrics"]
        return event

    # -- leave -------------------------------------------------------------------------

    async def _leave(self, error: BaseException | None) -> None:
        """The one way out of the block: release or settle (``_exit``), then stop the
        heartbeat and restore the context whatever happens on the way."""
        try:
            await self._exit(error)
        finally:
            try:
                if self._heartbeat is not None and not self._heartbeat.stopped:
                    await self._io.stop_heartbeat(self._heartbeat)  # an interruption came first
            finally:
                self._restore_context()

    async def _exit(self, error: BaseException | None) -> None:
        """Leaving the block: the rule table in the README (Guarded execution)."""
        if self._phase != "open":
            return
        if error is None:
            await self._commit_on_exit()
        elif self._work_done:
            await self._work_done_exit(error)
        else:
            await self._release(self._failure_reason)

    async def _release(self, reason: str) -> None:
        """Give the budget back (only when the guarded work did not happen).

        One attempt on the caller; a transient failure (429, 5xx, a dropped
        connection, a timeout) is retried on the settlement worker with the same key,
        honouring Retry-After, within the retry policy; a refusal is final.
        """
        _reason_check("reason", reason, False)
        self._phase = "closed"
        if self._heartbeat is not None:
            await self._io.stop_heartbeat(self._heartbeat)
        key = _derived_key("release", self._caller_key)
        self._release_error = await _release_now(
            self._io, self._client, self.reservation_id, key, reason
        )

    async def _work_done_exit(self, error: BaseException) -> None:
        """The work ran but its actual amount is unknown (@cycles): settle nothing (see
        the README)."""
        self._phase = "closed"
        await self._io.stop_heartbeat(self._heartbeat)
        _log.error(
            "actual amount unknown after the guarded work (%s): nothing committed or released;"
            " the reservation will expire: reservation_id=%s",
            type(error).__name__,
            self.reservation_id,
        )

    async def _commit_on_exit(self) -> None:
        """Left without settling: the work presumably happened, so commit the estimate."""
        await self._commit(self._estimate, estimated=True)


class _SyncFace(_Reservation):
    """The ``with`` statement of a reservation on a CyclesClient: the steps on blocking I/O."""

    def __enter__(self: _SyncGuard) -> _SyncGuard:
        _run_sync(self._enter())
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        _run_sync(self._leave(exc))


class _AsyncFace(_Reservation):
    """The ``async with`` statement of a reservation on an AsyncCyclesClient (the rules of
    _SyncFace; a create in flight when the caller is cancelled is released on arrival)."""

    _is_async: ClassVar[bool] = True

    async def __aenter__(self: _AsyncGuard) -> _AsyncGuard:
        await self._enter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await self._leave(exc)


class _GuardOptions(_Reservation):
    """The keyword parameters of ``client.reserve(...)``, shared by both guards."""

    def __init__(
        self,
        client: Any,
        estimate: int | Amount,
        *,
        unit: Unit | str = Unit.USD_MICROCENTS,
        action_kind: str | None = None,
        action_name: str | None = None,
        action_tags: List[str] | None = None,
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
        dimensions: Dict[str, str] | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
        grace_period_ms: int | None = None,
        overage_policy: str = DEFAULT_OVERAGE_POLICY,
        metadata: Dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        _check_client(client, self._is_async)
        if isinstance(estimate, Amount):
            unit, estimate = estimate.unit, estimate.amount
        subject = _subject_with_defaults(
            _config_of(client),
            dict(tenant=tenant, workspace=workspace, app=app, workflow=workflow, agent=agent,
                 toolset=toolset),
            dimensions,
        )
        body = _reservation_body(
            estimate=estimate,
            unit=unit,
            subject=subject,
            action=_action_body(action_kind, action_name, action_tags),
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        super().__init__(client, body, idempotency_key)

    async def _work_done_exit(self, error: BaseException) -> None:
        """commit() was called but refused its arguments: the work happened, so the
        estimate is committed (marked) rather than released; the error is re-raised."""
        _log.warning(
            "commit arguments refused (%s); committing the estimate: reservation_id=%s",
            type(error).__name__,
            self.reservation_id,
        )
        await self._commit_on_exit()


class ReservationGuard(_GuardOptions, _SyncFace):
    """``with client.reserve(estimate, ...) as r:`` -- a budget reservation around a block.

    Entering reserves (a denial raises before the block runs) and starts the
    heartbeat; ``get_cycles_context()`` returns the reservation inside.  In the
    block, ``r.commit(actual, metrics=..., metadata=...)`` or ``r.release(reason)``
    settles it.  Leaving on an exception releases (the work did not happen);
    leaving without settling commits the estimate with metadata
    ``actual_source="estimate"`` (the work presumably happened: never release spend).
    So does leaving on an exception after ``commit()`` refused its arguments
    (a ValueError for a bad ``metrics`` field, say): the work happened.
    """

    def commit(
        self,
        actual: int,
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit ``actual``: the first attempt now, retries as configured.  A failed commit
        never raises (see ``settlement_error``); bad arguments raise ValueError."""
        _run_sync(self._commit(actual, metrics, metadata))

    def release(self, reason: str | None = None) -> None:
        """Release the reservation (for work that did not happen)."""
        self._require_open("release")
        _run_sync(self._release(reason or "released_by_caller"))


class AsyncReservationGuard(_GuardOptions, _AsyncFace):
    """``async with client.reserve(estimate, ...) as r:``; ``await r.commit(...)`` /
    ``await r.release(...)``.  The rules of ReservationGuard."""

    async def commit(
        self,
        actual: int,
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        await self._commit(actual, metrics, metadata)

    async def release(self, reason: str | None = None) -> None:
        self._require_open("release")
        await self._release(reason or "released_by_caller")


# -- streams (runcycles' StreamReservation / AsyncStreamReservation) ----------------


class _StreamOptions(_Reservation):
    """runcycles' stream reservation: reserve on enter; on a clean exit commit the usage."""

    _failure_reason = "stream_failed"

    def __init__(
        self,
        client: Any,
        *,
        subject: Subject | None = None,
        action: Action,
        estimate: Amount,
        ttl_ms: int = 120_000,
        grace_period_ms: int | None = None,
        overage_policy: str = DEFAULT_OVERAGE_POLICY,
        cost_fn: Callable[[StreamUsage], int] | None = None,
        metadata: Dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        raise_on_commit_failure: bool = False,
    ) -> None:
        _check_client(client, self._is_async)
        if subject is None:
            subject_body = _subject_with_defaults(_config_of(client), {}, None)
        else:
            subject_body = _subject("subject", subject, False).model_dump(exclude_none=True)
        amount = _amount("estimate", estimate, False)
        body = _reservation_body(
            estimate=amount.amount,
            unit=amount.unit,
            subject=subject_body,
            action=_action("action", action, False).model_dump(mode="json", exclude_none=True),
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            idempotency_key=idempotency_key,
        )
        super().__init__(client, body, idempotency_key)
        self._usage = StreamUsage()
        self._cost_fn = cost_fn
        self._metadata = _commit_metadata(metadata) if metadata is not None else None
        self._raise_on_commit_failure = raise_on_commit_failure

    @property
    def usage(self) -> StreamUsage:
        return self._usage

    async def _commit_on_exit(self) -> None:
        actual, estimated = self._actual_from_usage()
        metrics = self._metrics_from_usage() or CyclesMetrics()
        await self._commit(actual, metrics, self._metadata, estimated=estimated)
        if self._settlement_error is not None and self._raise_on_commit_failure:
            raise self._settlement_error

    def _actual_from_usage(self) -> Tuple[int, bool]:
        """usage.actual_cost, else cost_fn(usage), else the estimate (marked as such)."""
        usage = self._usage
        try:
            if usage.actual_cost is not None:
                return _int64("actual_cost", usage.actual_cost, False), False
            if self._cost_fn is not None:
                return _int64("cost_fn result", self._cost_fn(usage), False), False
        except Exception:
            _log.warning(
                "stream actual cost unusable; committing the estimate: reservation_id=%s",
                self.reservation_id,
                exc_info=True,
            )
        return self._estimate, True

    def _metrics_from_usage(self) -> CyclesMetrics | None:
        """ctx.metrics if the code set them, else the usage; a bad value costs the metrics only."""
        usage = self._usage
        try:
            if self._context is not None and self._context.metrics is not None:
                return _commit_metrics(self._context.metrics)
            return _commit_metrics(
                CyclesMetrics(
                    tokens_input=usage.tokens_input or None,
                    tokens_output=usage.tokens_output or None,
                    model_version=usage.model_version,
                    custom=usage.custom or None,
                )
            )
        except ValueError as exc:
            _log.warning(
                "ignoring invalid stream metrics (%s): reservation_id=%s", exc, self.reservation_id
            )
            return None


class StreamReservation(_StreamOptions, _SyncFace):
    """``with client.stream_reservation(action=..., estimate=...) as s:`` (runcycles-compatible).

    Update ``s.usage`` while streaming; a clean exit commits ``usage.actual_cost``,
    else ``cost_fn(usage)``, else the estimate; an exception releases ("stream_failed").
    """


class AsyncStreamReservation(_StreamOptions, _AsyncFace):
    """``async with client.stream_reservation(...)`` (runcycles-compatible)."""


# ---------------------------------------------------------------------------
# The steps: create, release, settle
# ---------------------------------------------------------------------------


def _describe(response: CyclesResponse) -> str:
    """A log-safe summary of a failed attempt (never a body or a header value)."""
    if response.is_transport_error:
        return f"transport error: {response.error_message}"
    code = _error_code(response)
    text = f"status={response.status}" + (f" error={code}" if code else "")
    return text + (" (not the expected answer)" if response.is_success else "")


async def _create(
    io: _SyncIO | _AsyncIO, body: Dict[str, Any]
) -> Tuple[ReservationCreateResponse, float, float]:
    """POST /v1/reservations; a denial or a lasting failure raises the typed exception.

    An ambiguous outcome (a transport error, a 5xx, or a 2xx that is not the schema-valid
    answer) is resent once at once, with the same key.  Returns the answer with the
    last attempt's monotonic send and receive times (ms): the heartbeat starts from them.
    """
    for resend in (False, True):
        sent_ms = _clock.monotonic() * 1000.0
        response = await io.send("create", body)
        received_ms = _clock.monotonic() * 1000.0
        created = _success_answer("create", response)
        valid = isinstance(created, ReservationCreateResponse)
        ambiguous = not valid and (
            response.is_transport_error or response.is_server_error or response.is_success
        )
        if resend or not ambiguous or _out_of_time():
            break
        _log.warning(
            "create: %s (%s); resending once with the same idempotency key",
            "not sent" if _never_sent(response) else "ambiguous outcome",
            _describe(response),
        )
    if not isinstance(created, ReservationCreateResponse):
        if response.is_success:
            raise CyclesProtocolError(
                "Create reservation did not produce a schema-valid HTTP 200 response"
                + (f": {response.error_message}" if response.error_message else ""),
                status=response.status,
                request_id=response.request_id,
                trace_id=response.trace_id,
            )
        raise _protocol_error(response, "Failed to create reservation")
    if created.decision == Decision.DENY:
        prefix = "Dry-run denied" if body.get("dry_run") else "Reservation denied"
        raise _protocol_error(response, prefix)
    return created, sent_ms, received_ms


# -- the create body, validated before anything is sent -------------------------

_ttl_check = ReservationCreateRequest._fields["ttl_ms"]
_grace_check = ReservationCreateRequest._fields["grace_period_ms"]
_unit_check = Amount._fields["unit"]
_reason_check = ReleaseRequest._fields["reason"]


_subject_defaults = operator.attrgetter(*SUBJECT_FIELDS)


def _subject_with_defaults(
    config: CyclesConfig,
    values: Mapping[str, str | None],
    dimensions: Mapping[str, str] | None,
) -> Dict[str, Any]:
    """Subject fields; a missing (falsy) one falls back to the config's default."""
    subject: Dict[str, Any] = {}
    for name in SUBJECT_FIELDS:
        value = values.get(name) or getattr(config, name)
        if value:
            subject[name] = value
    if dimensions:
        subject["dimensions"] = dict(dimensions)
    return subject


def _action_body(
    kind: str | None, name: str | None, tags: List[str] | None
) -> Dict[str, Any]:
    action: Dict[str, Any] = {"kind": kind or "unknown", "name": name or "unknown"}
    if tags:
        action["tags"] = list(tags)
    return action


def _reservation_body(
    *,
    estimate: Any,
    unit: Any,
    subject: Mapping[str, Any],
    action: Mapping[str, Any],
    ttl_ms: Any,
    grace_period_ms: Any,
    overage_policy: Any,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    dry_run: bool = False,
    settings_checked: bool = False,
) -> Dict[str, Any]:
    """The create body, each field checked by its model's check but no model built:
    ValueError naming the field, in runcycles' order (estimate, ttl, subject, grace),
    then every other field.  ``settings_checked``: unit, ttl, grace and overage policy
    were checked already (at decoration)."""
    _int64("estimate", estimate, False)
    if not settings_checked:
        _ttl_check("ttl_ms", ttl_ms, False)
    _check_fields(Subject, "subject", subject)
    if not any(map(subject.get, SUBJECT_FIELDS)):
        raise _FieldError("subject", "must have at least one of " + ", ".join(SUBJECT_FIELDS))
    if grace_period_ms is not None and not settings_checked:
        _grace_check("grace_period_ms", grace_period_ms, False)
    checked_metadata = _commit_metadata(metadata) if metadata else None
    _check_fields(Action, "action", action)
    if not settings_checked:
        unit = _wire_value(_unit_check("unit", unit, False))
        if overage_policy is not None:
            overage_policy = _wire_value(_overage_policy("overage_policy", overage_policy, False))
    body = {
        "idempotency_key": _new_key()
        if idempotency_key is None
        else _idempotency_key("idempotency_key", idempotency_key, False),
        "subject": dict(subject),
        "action": dict(action),
        "estimate": {"unit": unit, "amount": estimate},
        "ttl_ms": ttl_ms,
    }
    if grace_period_ms is not None:
        body["grace_period_ms"] = grace_period_ms
    if overage_policy is not None:
        body["overage_policy"] = overage_policy
    if dry_run:
        body["dry_run"] = True
    if checked_metadata:
        body["metadata"] = checked_metadata
    return body


def _check_fields(model: Type[_Model], path: str, values: Mapping[str, Any]) -> None:
    """Each of ``values`` by ``model``'s check for it, as a request model would (unknown
    names refused), without building the model."""
    for name, value in values.items():
        check = model._fields.get(name)
        if check is None:
            raise _FieldError(f"{path}.{name}", "unknown field")
        if value is not None:
            try:
                check(name, value, False)
            except _FieldError as exc:
                raise exc.under(path) from None


def _wire_value(value: Any) -> Any:
    """An enum member's JSON value; any other value as is."""
    return value.value if isinstance(value, enum.Enum) else value


def _derived_key(prefix: str, caller_key: str | None) -> str:
    """runcycles' rule: ``<prefix>-<caller key>`` (hashed when too long), else a fresh key."""
    if caller_key is None:
        return _new_key()
    candidate = f"{prefix}-{caller_key}"
    if len(candidate) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return candidate
    import hashlib

    return f"{prefix}-sha256-" + hashlib.sha256(caller_key.encode("utf-8")).hexdigest()


def _commit_metrics(value: Any) -> CyclesMetrics:
    """Checked again: the guarded code may have changed fields after construction."""
    metrics: CyclesMetrics = _metrics("metrics", value, False)
    if metrics is not value:
        return metrics  # built from a dict just now: checked, and nobody else holds it
    try:
        copy: CyclesMetrics = metrics.model_copy()  # a copy runs every field check again
    except _FieldError as exc:
        raise exc.under("metrics") from None
    return copy


def _commit_metadata(value: Any) -> Dict[str, Any]:
    """A JSON object (commit or create metadata), checked now rather than on the wire."""
    return dict(_object_check("metadata", value, False))


# -- release ---------------------------------------------------------------------


async def _release_now(
    io: _SyncIO | _AsyncIO, client: Any, reservation_id: str, key: str, reason: str
) -> CyclesProtocolError | None:
    """POST .../release: one attempt here; a transient failure (429, 5xx, a dropped
    connection, a timeout) is retried on the settlement worker with the same key,
    honouring Retry-After, within the retry policy; a refusal is final.  Returns the
    first attempt's error when it did not release."""
    job = _release_job(client, reservation_id, key, reason)
    outcome = await _settle(io, job, retry_inline=False)
    if outcome is _Disposition.RETRY and not _settlements.submit(job):
        _settlements.turn_away(job)
    if outcome is _Disposition.SUCCESS or job.last_response is None:
        return None
    return _protocol_error(job.last_response, "Release failed")


def _release_job(client: Any, reservation_id: str, key: str, reason: str) -> _Settlement:
    body = {"idempotency_key": key, "reason": reason}
    return _Settlement.for_release(client, reservation_id, body)


def _hand_over_release(job: _Settlement) -> None:
    """A release to send (again) from the settlement queue, now, with its own key: as a
    retry task on the running loop (handed to the worker thread if the loop ends
    first), or on the worker thread for a job without ``loop_client``."""
    job.due = _clock.monotonic()
    if not _settlements.submit(job):
        _settlements.turn_away(job)


# -- settle ----------------------------------------------------------------------


async def _settle_new(io: _SyncIO | _AsyncIO, job: _Settlement, heartbeat: Any) -> _Disposition:
    """Stop the heartbeat, journal the settlement, attempt it, then retry here (inline)
    or on the worker.  From the first step on, an interruption hands the job on.

    What the caller's ``deadline()`` leaves no time for goes to the worker; a
    settlement kept after its retry budget stays the process's (``_SettlementQueue``).
    """
    try:
        await io.stop_heartbeat(heartbeat)
        outcome = await _settle(io, job, retry_inline=job.inline)
        if outcome is _Disposition.RETRY and not _settlements.submit(job):
            outcome = await _settle(io, job, retry_inline=True)  # queue full: settle here
        if outcome is _Disposition.STOP_KEEP:
            _settlements.keep(job)
    except Exception:  # a bug, never the caller's: the worker retries with the same key
        _log.exception(
            "settlement failed by an internal error; retried in the background:"
            " reservation_id=%s",
            job.record.reservation_id,
        )
        job.due = _clock.monotonic()
        if _settlements.submit(job):
            return _Disposition.RETRY
        _settlements.keep(job)
        return _Disposition.STOP_KEEP
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):  # closed by its owner: not an interruption
            # Interrupted (task cancelled, Ctrl-C): the worker carries on, same key.
            job.due = _clock.monotonic()
            if not _settlements.submit(job):
                _settlements.turn_away(job)
        raise
    return outcome


async def _settle(io: _SyncIO | _AsyncIO, job: _Settlement, *, retry_inline: bool) -> _Disposition:
    """Attempts until the outcome is final; without ``retry_inline``, until a retry must wait.

    A job not journaled yet (a new settlement, possibly handed over by an interrupted
    caller) gets its record written before its first attempt leaves the process."""
    if not job.journaled and job.journal is not None:
        # Set after the write: an interrupted one is redone by the worker, a failed one
        # tried again on the next run, and until then a full queue knows it is not on disk.
        job.journaled = await io.blocking(functools.partial(job.journal.write, job.record))
    while True:
        if _out_of_time(job.due):  # no attempt starts after the caller's deadline
            return _Disposition.RETRY
        wait = job.due - _clock.monotonic()
        if wait > 0:
            await io.sleep(wait)
        step = await _settlement_attempt(io, job)
        if step.disposition is _Disposition.FALLBACK_EVENT:
            job.attempt = 0
            continue
        if step.disposition is not _Disposition.RETRY:
            return step.disposition
        job.due = _clock.monotonic() + step.delay_ms / 1000.0
        if not retry_inline:
            return _Disposition.RETRY


async def _settlement_attempt(io: _SyncIO | _AsyncIO, job: _Settlement) -> _SettlementStep:
    """One commit or event attempt, its outcome, and the journal kept in step with it."""
    job.attempt += 1
    operation, body, reservation_id = job.request()
    response = await io.send(operation, body, reservation_id)
    job.last_response = response
    job.kept = False
    retry_after = response.headers.get("retry-after")
    step = _decide_settlement(
        operation,
        status=response.status,
        error_code=_error_code(response),
        schema_valid=_is_schema_valid(operation, response),
        retry_after_ms=None if retry_after is None else _parse_retry_after_ms(retry_after),
        attempt=job.attempt,
        policy=job.policy,
        now_ms=_wall_clock_ms(),
        rand=_jitter,
    )
    updated = _record_after_step(job.record, step)
    if updated is not None:
        job.record = updated
        if job.journal is not None:  # event mode / a 429 floor: persisted before acting
            await io.blocking(functools.partial(job.journal.write, updated))
    elif step.disposition is _Disposition.FALLBACK_EVENT:
        step = _SettlementStep(_Disposition.STOP_KEEP, 0, None, "no_event_fallback_body")
    done = step.disposition is _Disposition.SUCCESS or step.disposition is _Disposition.STOP_DISCARD
    if job.journal is not None and done:
        await io.blocking(functools.partial(job.journal.remove, job.record.reservation_id))
    job.last_step = step
    _report_settlement(job, response, step)
    return step


# ---------------------------------------------------------------------------
# The I/O seam: how the steps wait
#
# The steps above await ``io.send`` / ``io.sleep`` / ``io.blocking`` and start and
# stop the heartbeat through their I/O object.  ``_AsyncIO`` awaits real things
# (never blocking the loop); ``_SyncIO``'s methods do their blocking work before they
# return, so steps on it never suspend and ``_run_sync`` runs them with one
# ``send(None)``.  A sync heartbeat (``_ScheduledHeartbeat``) is the one exception:
# its sleep suspends the beats, and the process-wide scheduler resumes them when due.
#
# Every protocol operation goes through the client's public method, as in runcycles,
# so a mocked or subclassed client sees each one.  The safety properties stay beneath
# or around them: the idempotency key is in the body (a resend is a retry with the
# same key), the attempt's deadline reaches ``_call`` through the ``_attempt`` context
# variable, and the journal and the outcome table wrap the call.  A method that
# raises or answers something other than a CyclesResponse is logged at ERROR and
# counts as a transport failure: the outcome is unknown, so a settlement keeps its
# record and retries the same key.
# ---------------------------------------------------------------------------


def _run_sync(steps: Coroutine[Any, Any, _T]) -> _T:
    """Run steps over blocking I/O to their end, on this thread."""
    try:
        steps.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    steps.close()
    raise RuntimeError("internal error: a blocking lifecycle step suspended")


_PUBLIC_METHODS = {
    "create": "create_reservation",
    "commit": "commit_reservation",
    "release": "release_reservation",
    "extend": "extend_reservation",
    "event": "create_event",
}


class _Attempt:
    """What ``_call`` beneath a public method inherits from the step that called it."""

    __slots__ = ("deadline", "detached")

    def __init__(self, deadline: float, detached: bool) -> None:
        self.deadline = deadline  # time.monotonic() by which the attempt ends
        self.detached = detached  # a settlement retry: it may outlive a closed client


_attempt: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "cycles_lite_attempt", default=None
)


class _SyncIO:
    """Blocking I/O on the calling thread.

    ``detached``: a settlement retry (the worker, ``flush``, ``recover``), which runs an
    async client's coroutine to completion on a private event loop, and may still use
    the pool of a client closed since the settlement began.
    """

    def __init__(
        self, client: Any, *, detached: bool = False, attempt_s: float | None = None
    ) -> None:
        self.client = client
        self.config = _config_of(client)
        self.detached = detached
        self.attempt_s = self.config.attempt_timeout if attempt_s is None else attempt_s

    async def send(
        self, operation: str, body: Dict[str, Any], reservation_id: str | None = None
    ) -> CyclesResponse:
        """One attempt through the public method (never raises but for a client of the
        wrong kind: TypeError)."""
        token = _attempt.set(_Attempt(_clock.monotonic() + self.attempt_s, self.detached))
        try:
            method = getattr(self.client, _PUBLIC_METHODS[operation])
            result = method(body) if reservation_id is None else method(reservation_id, body)
            if not isinstance(result, CyclesResponse) and inspect.isawaitable(result):
                if not self.detached:
                    _refuse_kind(operation, result, is_async=False)
                else:
                    result = _run_to_completion(result)
            return _response_of(operation, result)
        except _ClientMismatch as exc:
            raise TypeError(*exc.args) from None
        except Exception as exc:
            return _failed_send(operation, exc)
        finally:
            _attempt.reset(token)

    async def sleep(self, seconds: float) -> None:
        _clock.sleep(seconds)

    async def blocking(self, work: Callable[[], _T]) -> _T:
        return work()

    def start_heartbeat(
        self, beats: Callable[[_ScheduledHeartbeat], Coroutine[Any, Any, None]], due_ms: float
    ) -> _ScheduledHeartbeat:
        return _ScheduledHeartbeat(self, beats, due_ms)

    async def stop_heartbeat(self, heartbeat: _ScheduledHeartbeat) -> None:
        heartbeat.stop()


class _AsyncIO:
    """asyncio I/O: sends awaited, sleeps on the loop, blocking work on a thread."""

    def __init__(self, client: Any, *, attempt_s: float | None = None) -> None:
        self.client = client
        self.attempt_s = _config_of(client).attempt_timeout if attempt_s is None else attempt_s
        self.in_flight: asyncio.Future[CyclesResponse] | None = None  # the last shielded send
        self.deadline = 0.0  # time.monotonic() by which it ends

    async def send(
        self, operation: str, body: Dict[str, Any], reservation_id: str | None = None
    ) -> CyclesResponse:
        """One attempt through the async public method.

        A create, an extend or a release runs as its own task, awaited through
        ``asyncio.shield``: a heartbeat stop waits for its extend instead of cutting it
        off, a release whose caller is cancelled still goes out, and so does a create,
        whose reservation is then released (shielded from the cancellation: nobody will
        use it).  A commit is not shielded: an interrupted commit is handed to the
        settlement worker, which resends it with the same key.
        """
        import asyncio

        try:
            deadline = _clock.monotonic() + self.attempt_s
            token = _attempt.set(_Attempt(deadline, False))
            try:
                method = getattr(self.client, _PUBLIC_METHODS[operation])
                result = method(body) if reservation_id is None else method(reservation_id, body)
                if not inspect.isawaitable(result):
                    _refuse_kind(operation, result, is_async=True)
                    return _response_of(operation, result)
                if operation not in _SHIELDED:
                    return _response_of(operation, await result)
                task = asyncio.ensure_future(result)  # the task copies the context: _attempt
            finally:
                _attempt.reset(token)
            self.in_flight, self.deadline = task, deadline
            try:
                return _response_of(operation, await asyncio.shield(task))
            except asyncio.CancelledError:
                _keep_running(task)
                task.add_done_callback(
                    functools.partial(
                        _after_cancelled_send, self.client, operation, body, reservation_id
                    )
                )
                raise
        except _ClientMismatch as exc:
            raise TypeError(*exc.args) from None
        except Exception as exc:
            return _failed_send(operation, exc)

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    async def blocking(self, work: Callable[[], _T]) -> _T:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, work)

    def start_heartbeat(
        self, beats: Callable[[_TaskHeartbeat], Coroutine[Any, Any, None]], due_ms: float
    ) -> _TaskHeartbeat:
        return _TaskHeartbeat(self, beats)  # the beats sleep until ``due_ms`` first

    async def stop_heartbeat(self, heartbeat: _TaskHeartbeat) -> None:
        await heartbeat.stop()


# -- the wire: the client's public methods ------------------------------------------


class _ClientMismatch(TypeError):
    """A sync reservation on an async client, or the reverse: raised past the wire
    handlers, which treat other errors as transport failures; callers get a TypeError."""


@functools.lru_cache(maxsize=None)
def _detached_config() -> CyclesConfig:
    return CyclesConfig(base_url="http://localhost", api_key="unused", journal_enabled=False)


def _config_of(client: Any) -> CyclesConfig:
    """The client's ``_config``; a test double without one runs on the defaults, unjournaled
    (nothing identifies its server)."""
    config = getattr(client, "_config", None)
    return config if isinstance(config, CyclesConfig) else _detached_config()


def _check_client(client: Any, is_async: bool, head: str = "client: expected") -> None:
    """TypeError unless ``client`` has the public methods (a duck-typed object will do)
    and is not the other kind of client."""
    wanted, other = (
        (AsyncCyclesClient, CyclesClient) if is_async else (CyclesClient, AsyncCyclesClient)
    )
    if isinstance(client, wanted):
        return
    missing = [m for m in _PUBLIC_METHODS.values() if not callable(getattr(client, m, None))]
    if isinstance(client, other) or missing:
        detail = f" (missing {', '.join(missing)})" if missing and client is not None else ""
        article = "an" if is_async else "a"
        raise TypeError(
            f"{head} {article} {wanted.__name__}, got {_type_name(client)}{detail}"
        )


def _refuse_kind(operation: str, result: Any, is_async: bool) -> None:
    """An awaitable where an answer was due (or the reverse): a TypeError at the create,
    the first call; later (a duck with mixed methods) it counts as a bad answer."""
    if inspect.iscoroutine(result):
        result.close()  # never awaited: nothing was sent
    if operation == "create":
        kind, other = ("an async", "a sync") if is_async else ("a sync", "an async")
        raise _ClientMismatch(
            f"{_PUBLIC_METHODS['create']}() returned {_type_name(result)}: {kind}"
            f" reservation needs {kind} client, not {other} one"
        )


def _response_of(operation: str, result: Any) -> CyclesResponse:
    """``result`` if it is a well-formed CyclesResponse (a mock or a subclass may not be),
    else a transport failure: the outcome is unknown, a settlement retries the same key."""
    from collections.abc import Mapping as AnyMapping

    status = getattr(result, "status", None)
    headers = getattr(result, "headers", None)
    body = getattr(result, "body", None)
    if not isinstance(result, CyclesResponse):
        flaw = f"{_type_name(result)}, not a CyclesResponse"
    elif isinstance(status, bool) or not isinstance(status, int):
        flaw = f"a CyclesResponse whose status is {_type_name(status)}, not an int"
    elif not isinstance(headers, (dict, AnyMapping)):  # dict first: no ABC check
        flaw = f"a CyclesResponse whose headers are {_type_name(headers)}, not a mapping"
    elif body is not None and not isinstance(body, dict):
        flaw = f"a CyclesResponse whose body is {_type_name(body)}, not a dict or None"
    else:
        return result
    problem = TypeError(f"{_PUBLIC_METHODS[operation]}() returned {flaw}")
    _log.error("%s; counted as a transport failure", problem)
    return CyclesResponse.transport_error(problem)


def _failed_send(operation: str, exc: Exception) -> CyclesResponse:
    """A public method raised: a bug or a test double's error, never plain network trouble
    (the client answers that with a transport-error response)."""
    _log.error(
        "%s() raised %s; counted as a transport failure (a settlement keeps its"
        " idempotency key and retries)",
        _PUBLIC_METHODS[operation],
        type(exc).__name__,
        exc_info=exc,
    )
    return CyclesResponse.transport_error(exc)


def _run_to_completion(awaitable: Any) -> Any:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(awaitable)
    finally:
        try:  # as asyncio.run does: the async client's pool closes its connections here
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


_SHIELDED = frozenset({"create", "extend", "release"})
_shielded_tasks: set[Any] = set()  # strong references: tasks nobody awaits any more


def _keep_running(task: Any) -> None:
    _shielded_tasks.add(task)
    task.add_done_callback(_shielded_tasks.discard)


def _after_cancelled_send(
    client: Any, operation: str, body: Dict[str, Any], reservation_id: str | None, task: Any
) -> None:
    """A done callback on a shielded send whose caller was cancelled.  A release cut off
    by the end of the event loop (nothing else cancels it) goes to the worker thread
    with its key, unless the settlement queue already has it; a create that answered
    has its reservation released."""
    if operation == "release":
        assert reservation_id is not None
        if task.cancelled() and reservation_id not in _settlements.busy():
            job = _Settlement.for_release(client, reservation_id, body)
            job.loop_client = None  # the loop is ending: the worker sends it
            _hand_over_release(job)
    elif operation == "create":
        _release_orphan(client, body, task)


def _release_orphan(client: Any, create_body: Dict[str, Any], task: Any) -> None:
    """The create of a cancelled call answered: release what it reserved, as a settlement
    retry task on the loop, handed to the worker thread if the loop ends first."""
    if task.cancelled() or task.exception() is not None:
        return  # (an exception is retrieved here, so asyncio does not report it)
    response = task.result()
    if not isinstance(response, CyclesResponse) or not _is_schema_valid("create", response):
        return
    body = response.body or {}
    reservation_id = body.get("reservation_id")
    if body.get("decision") == Decision.DENY.value or not isinstance(reservation_id, str):
        return
    key = _derived_key("release", create_body.get("idempotency_key"))
    _hand_over_release(_release_job(client, reservation_id, key, "cancelled_before_use"))


# -- the heartbeats: a task each (async), one process-wide scheduler (sync) -----------


class _TaskHeartbeat(_AsyncIO):
    """An async heartbeat: its own I/O, and one asyncio task running the beats over it.

    ``stop()`` is final and, like ``_ScheduledHeartbeat.stop()``, waits for a beat in
    flight: cancelling the task only stops the waiting (the extend runs shielded), so
    it then waits for the extend (bounded by that attempt's deadline), and drops its
    result.  No extend is on the wire when the commit goes out.
    """

    def __init__(
        self, io: _AsyncIO, beats: Callable[[_TaskHeartbeat], Coroutine[Any, Any, None]]
    ) -> None:
        import asyncio

        super().__init__(io.client, attempt_s=io.attempt_s)
        self._task = asyncio.get_running_loop().create_task(beats(self))

    @property
    def stopped(self) -> bool:
        """True once the task ended: stopped, or the beats gave up on their own."""
        return self._task.done()

    async def stop(self) -> None:
        import asyncio

        task = self._task
        task.cancel()
        await asyncio.wait({task})  # never raises the task's own CancelledError
        if not task.cancelled() and task.exception() is not None:
            _log.error("heartbeat task failed", exc_info=task.exception())
        in_flight = self.in_flight
        if in_flight is not None and not in_flight.done():
            left = max(0.0, _effective_deadline(self.deadline) - _clock.monotonic())
            await asyncio.wait({in_flight}, timeout=left)
            in_flight.cancel()  # past its or the caller's deadline: stop waiting


@types.coroutine
def _pause(seconds: float) -> Generator[float, None, None]:
    """What a scheduled heartbeat's sleep awaits: it hands the seconds to the scheduler."""
    yield seconds


class _ScheduledHeartbeat:
    """A sync heartbeat: the beats' I/O (the reservation's blocking I/O, but its sleeps
    suspend the beats), run on the process-wide ``_heartbeats`` scheduler.

    Created with its first beat's due time, it costs one heap entry until then: the
    scheduler builds the beats when that beat is due, runs them up to their next sleep
    (one extend attempt, bounded by the transport's whole-attempt deadline,
    ``attempt_s``, and the caller's ``deadline()``) and schedules the next.  ``stop()``
    is final (a heartbeat is never restarted): it unschedules the heartbeat and waits
    for a beat in flight until that attempt's deadline, so no extend that keeps to its
    deadline is on the wire when the commit goes out; a result that arrives after
    ``stop()`` is dropped.  In a forked child the heartbeat is nobody's: the child's
    scheduler starts empty.

    The beats run outside every lock (they log).  The scheduler's lock guards
    ``stopped`` and which beat is running; whoever finds the beats idle closes them.
    """

    def __init__(
        self,
        io: _SyncIO,
        beats: Callable[[_ScheduledHeartbeat], Coroutine[Any, Any, None]],
        due_ms: float,
    ) -> None:
        self.io = io
        self.attempt_s = io.attempt_s
        self.bound = _deadline.get()  # the beats run outside the caller's context
        self.stopped = False
        self.queued = False  # an entry of it is in the scheduler's heap
        self.deadline = 0.0  # time.monotonic() by which its beat in flight ends
        self._make_beats = beats
        self._beats: Coroutine[Any, Any, None] | None = None  # built when first due
        _heartbeats.schedule(self, due_ms / 1000.0 - _clock.monotonic())

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await _pause(seconds)

    async def send(
        self, operation: str, body: Dict[str, Any], reservation_id: str | None = None
    ) -> CyclesResponse:
        """The blocking send; SystemExit from a test double, say, is an internal error."""
        self.deadline = _clock.monotonic() + self.attempt_s
        try:
            with _bounded_by(self.bound):
                return await self.io.send(operation, body, reservation_id)
        except Exception:
            raise
        except BaseException as exc:
            raise RuntimeError(
                f"{_PUBLIC_METHODS[operation]}() raised {type(exc).__name__}"
            ) from exc

    def beat(self) -> float | None:
        """Run the beats up to their next sleep: its seconds, or None once they are done.
        Never raises: whatever goes wrong ends this heartbeat only."""
        try:
            if self._beats is None:
                self._beats = self._make_beats(self)
            pause: float = self._beats.send(None)
        except StopIteration:
            return None
        except BaseException:  # a bug in the beats: the thread serves the other heartbeats
            _log.error("heartbeat stopped by an internal error", exc_info=True)
            return None
        return pause

    def stop(self) -> None:
        # Beats never built need no closing; a beat in flight closes them when it ends.
        if _heartbeats.unschedule(self) and self._beats is not None:
            self.close()

    def close(self) -> None:
        if self._beats is not None:
            # ValueError in a forked child: the parent's thread was inside the beats.
            with contextlib.suppress(ValueError):
                self._beats.close()


# How long a heartbeat thread waits for work before it exits: calls in a steady
# stream share one thread, and an idle process keeps none for long.
_HEARTBEAT_IDLE_EXIT_S = 1.0


class _HeartbeatScheduler:
    """Every live sync heartbeat's beats, each run when due, on a few daemon threads.

    One thread at a time, the leader, waits for the next due beat: the single timer.
    Taking a beat, the leader hands the timing on if another beat falls due before this
    one's attempt deadline (to an idle thread of the pool, else a new one), then runs
    the beat (one extend attempt) itself, and afterwards leads again or waits to.  So
    an extend in flight never delays another heartbeat's beat, and fast beats run on
    the one thread.  A thread exits after ``_HEARTBEAT_IDLE_EXIT_S`` without work; the
    next heartbeat starts one again.  A stopped heartbeat's entry stays in the heap and
    is skipped when it comes up (the heap is compacted when half of it is stale).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty and threadless, on new locks (also in a forked child: the parent's
        threads and the locks they held are not there)."""
        self._lock = threading.Lock()
        self._timing = threading.Condition(self._lock)  # the leader waits for a due beat
        self._handoff = threading.Condition(self._lock)  # idle threads wait to lead
        self._landed = threading.Condition(self._lock)  # stop() waits for a beat in flight
        self._heap: List[Tuple[float, int, _ScheduledHeartbeat]] = []
        self._stale = 0  # entries of stopped heartbeats in the heap
        self._order = itertools.count()
        self._threads = 0
        self._leader = False  # a thread times the heap (or is about to)
        self._idle = 0  # threads waiting to lead
        self._grants = 0  # leads handed to idle threads, not taken yet
        self._running: Dict[_ScheduledHeartbeat, threading.Thread] = {}
        self._active_at = _clock.monotonic()  # when a heartbeat last came or went
        # When the leader's wait ends (-inf while it is not waiting): a new beat due
        # later, or an emptied heap it will see within its idle spell, needs no wake-up.
        self._wake_at = -math.inf

    def schedule(self, heartbeat: _ScheduledHeartbeat, seconds: float | None) -> None:
        if seconds is None:
            return
        with self._lock:
            if heartbeat.stopped:
                return
            self._active_at = _clock.monotonic()
            self._push(heartbeat, seconds)

    def unschedule(self, heartbeat: _ScheduledHeartbeat) -> bool:
        """Stop ``heartbeat`` for good and wait for its beat in flight, if any, until that
        attempt's deadline, or the caller's ``deadline()`` if sooner.  True when none is
        running any more (its steps are idle)."""
        with self._lock:
            if not heartbeat.stopped:
                heartbeat.stopped = True
                self._active_at = _clock.monotonic()
                if heartbeat.queued:
                    self._drop_later()
            runner = self._running.get(heartbeat)
            while runner is not None and runner is not threading.current_thread():
                left = _effective_deadline(heartbeat.deadline) - _clock.monotonic()
                if left <= 0:
                    break  # a slow test double or the caller's deadline: the result is dropped
                _clock.wait(self._landed, left)
                runner = self._running.get(heartbeat)
            return runner is None

    def _drop_later(self) -> None:
        """Under the lock: one more stale entry; compact the heap once half of it is."""
        self._stale += 1
        if self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].stopped]
            heapq.heapify(self._heap)
            self._stale = 0
            if not self._heap and self._wake_at > self._active_at + _HEARTBEAT_IDLE_EXIT_S:
                self._timing.notify()  # the leader's idle spell starts now

    def _push(self, heartbeat: _ScheduledHeartbeat, seconds: float) -> None:
        """Under the lock: schedule the next beat; someone must be timing it."""
        entry = (_clock.monotonic() + seconds, next(self._order), heartbeat)
        heapq.heappush(self._heap, entry)
        heartbeat.queued = True
        if not self._leader:
            self._appoint_leader()
        elif entry[0] < self._wake_at:
            self._timing.notify()

    def _appoint_leader(self) -> None:
        """Under the lock: an idle thread takes the timing over, else a new thread."""
        self._leader = True
        if self._idle > self._grants:
            self._grants += 1
            self._handoff.notify()
            return
        thread = threading.Thread(
            target=self._work, args=(True,), name="cycles-lite-heartbeat", daemon=True
        )
        self._threads += 1
        try:
            thread.start()  # it waits for this lock before looking at the heap
        except RuntimeError:  # interpreter shutdown: the leases lapse with the process
            self._threads -= 1
            self._leader = False

    def _work(self, leading: bool) -> None:
        with self._lock:
            try:
                while leading or self._wait_to_lead():
                    heartbeat = self._next_due()
                    self._leader = False
                    if heartbeat is None:
                        return
                    if self._due_before(_clock.monotonic() + heartbeat.attempt_s):
                        self._appoint_leader()
                    seconds = self._run(heartbeat)
                    leading = not self._leader  # nobody times the heap: this thread will
                    self._leader = True
                    self._after_beat(heartbeat, seconds)
            finally:
                self._threads -= 1

    def _wait_to_lead(self) -> bool:
        """Under the lock: lead now if nobody does, else wait for a lead to be handed
        over; False after an idle spell."""
        if not self._leader:
            self._leader = True
            return True
        self._idle += 1
        try:
            until = _clock.monotonic() + _HEARTBEAT_IDLE_EXIT_S
            while not self._grants:
                left = until - _clock.monotonic()
                if left <= 0:
                    return False
                _clock.wait(self._handoff, left)
            self._grants -= 1
            return True
        finally:
            self._idle -= 1

    def _next_due(self) -> _ScheduledHeartbeat | None:
        """Under the lock, leading: pop the next due heartbeat, or None after an idle spell."""
        while True:
            self._skip_stale()
            if not self._heap:
                idle_s = _clock.monotonic() - self._active_at
                if idle_s >= _HEARTBEAT_IDLE_EXIT_S:
                    return None
                self._wait_until(self._active_at + _HEARTBEAT_IDLE_EXIT_S)
                continue
            if self._heap[0][0] <= _clock.monotonic():
                heartbeat = heapq.heappop(self._heap)[2]
                heartbeat.queued = False
                return heartbeat
            self._wait_until(self._heap[0][0])

    def _wait_until(self, moment: float) -> None:
        """Under the lock, leading: wait for ``moment`` or a notification."""
        self._wake_at = moment
        try:
            _clock.wait(self._timing, moment - _clock.monotonic())
        finally:
            self._wake_at = -math.inf

    def _skip_stale(self) -> None:
        while self._heap and self._heap[0][2].stopped:
            heapq.heappop(self._heap)
            self._stale -= 1

    def _due_before(self, moment: float) -> bool:
        """Under the lock: whether a live beat falls due before ``moment``."""
        self._skip_stale()
        return bool(self._heap) and self._heap[0][0] < moment

    def _run(self, heartbeat: _ScheduledHeartbeat) -> float | None:
        """Under the lock, released while the beat runs: its next sleep."""
        heartbeat.deadline = _clock.monotonic() + heartbeat.attempt_s
        self._running[heartbeat] = threading.current_thread()
        self._lock.release()
        try:
            return heartbeat.beat()
        finally:
            self._lock.acquire()
            del self._running[heartbeat]
            self._landed.notify_all()

    def _after_beat(self, heartbeat: _ScheduledHeartbeat, seconds: float | None) -> None:
        """Under the lock: schedule the next beat, or close the beats of a stopped one."""
        if not heartbeat.stopped:
            if seconds is not None:
                self._push(heartbeat, seconds)
            return
        self._lock.release()
        try:
            heartbeat.close()
        finally:
            self._lock.acquire()


_heartbeats = _HeartbeatScheduler()
_after_fork_in_child(_heartbeats.reset)


# ---------------------------------------------------------------------------
# Heartbeat plan (protocol HEARTBEAT GUIDANCE, v0.1.25.16)
#
# A pure state object: the heartbeat feeds it monotonic timestamps (ms) and the
# outcome of each create/extend attempt; it answers with the next beat.
# ---------------------------------------------------------------------------

_PERMANENT_EXTEND_CODES = frozenset(
    {
        "RESERVATION_EXPIRED",
        "RESERVATION_FINALIZED",
        "MAX_EXTENSIONS_EXCEEDED",
        "TENANT_CLOSED",
        "NOT_FOUND",
    }
)
_MAX_TRANSIENT_RETRY_MS = 30_000
# Timers beyond ~24.8 days overflow some platform wait primitives. Beating
# earlier than needed is always safe, so longer delays are cut to this.
_MAX_TIMER_DELAY_MS = 2**31 - 1
_FALLBACK_MIN_CADENCE_MS = 1000
_FALLBACK_MAX_HELD_MS = 30_000


def _classify_extend(status: int, error_code: str | None, schema_valid: bool) -> str:
    """"success" | "transient" | "rate_limited" | "terminal" | "rejected".

    Only a schema-valid HTTP 200 is success. Transport errors (status -1),
    5xx and any other 2xx (ambiguous) are transient; 429 or LIMIT_EXCEEDED is
    rate_limited; 404, 410 and the permanent codes are terminal; every other
    status (other 4xx, 3xx, 1xx, out of range) is rejected: a request or
    configuration problem that an unchanged retry cannot fix.
    """
    if status == 200 and schema_valid:
        return "success"
    if status < 0 or 500 <= status <= 599 or 200 <= status <= 299:
        return "transient"
    if status == 429 or error_code == "LIMIT_EXCEEDED":
        return "rate_limited"
    if 400 <= status <= 499 and (status in (404, 410) or error_code in _PERMANENT_EXTEND_CODES):
        return "terminal"
    return "rejected"


@_dataclass(frozen=True)
class _Beat:
    """Next heartbeat action.

    ``action``: "extend" (a fresh beat with a NEW idempotency key), "retry"
    (resend the pending extend with the SAME key) or "stop". ``delay_ms``
    counts from ``received_ms`` for ``after_success`` and from ``now_ms`` for
    ``after_failure``.
    """

    action: str
    delay_ms: int
    reason: str


def _ceil_elapsed_ms(start_ms: float | None, end_ms: float) -> int | None:
    """end - start rounded up, or None when timing is unknown or unreliable."""
    if start_ms is None:
        return None
    elapsed = end_ms - start_ms
    if not math.isfinite(elapsed) or elapsed < 0:
        return None
    return math.ceil(elapsed)


class _HeartbeatPlan:
    """Schedule of one reservation's heartbeat.

    ``extend_by_ms`` is the requested ttl (every extend asks for it; the
    plan never accumulates it). ``attempt_budget_ms`` is the transport's
    enforced whole-attempt deadline for one extend; None means unknown or
    unbounded, which the spec treats as infinite (next_delay is then always
    0, so only the one immediate fresh extend of the zero-delay guard runs).

    Primary path (a response carries ``remaining_ttl_ms``): exactly the
    normative algorithm, in integer milliseconds (Python ints cannot wrap;
    budgets and margins round up, leads and delays round down).
    Fallback path (a response without ``remaining_ttl_ms``): the spec's
    non-normative measured-grant heuristic, preferring over-beating to a lapse.
    """

    def __init__(self, extend_by_ms: int, attempt_budget_ms: int | None) -> None:
        if isinstance(extend_by_ms, bool) or extend_by_ms < 1:
            raise ValueError("extend_by_ms must be a positive integer")
        if attempt_budget_ms is not None and attempt_budget_ms < 0:
            raise ValueError("attempt_budget_ms must be >= 0 or None")
        self._extend_by_ms = extend_by_ms
        self._timeout_budget_ms = attempt_budget_ms
        self.max_rtt_ms = 0  # the largest round trip seen
        # Primary path: the last lead floor and when its response arrived.
        self._lead_floor_ms: int | None = None
        self._lead_anchor_ms: float | None = None
        self._zero_delay_used = False
        self._prev_failure_window_ms: int | None = None
        # Fallback path: expiry differences in the server frame.
        self.fallback = False
        self._reserve_received_ms: float | None = None
        self._first_expires_at_ms: int | None = None
        self._last_expires_at_ms: int | None = None
        self._last_success_ms: float | None = None
        self._last_grant_ms: int | None = None
        # Observable state: why it stopped (None while it runs); lease_lost once it
        # gave up on its own (any stop except close()); fallback while on that path.
        self.stopped_reason: str | None = None
        self.lease_lost = False

    def close(self, reason: str = "closed") -> None:
        """Owner stop (settlement started): every later result is ignored."""
        if self.stopped_reason is None:
            self.stopped_reason = reason

    # -- budgets --------------------------------------------------------------

    def _attempt_budget(self) -> int | None:
        """None means +infinity (unknown or unbounded request timeout)."""
        if self._timeout_budget_ms is None:
            return None
        return max(self._timeout_budget_ms, 1000, 2 * self.max_rtt_ms)

    def _safety_margin(self) -> int:
        return max(1000, 2 * self.max_rtt_ms)

    def _stop(self, reason: str) -> _Beat:
        if self.stopped_reason is None:
            self.stopped_reason = reason
            self.lease_lost = True
        return _Beat("stop", 0, self.stopped_reason)

    # -- success --------------------------------------------------------------

    def after_success(
        self,
        *,
        remaining_ttl_ms: int | None,
        expires_at_ms: int | None,
        sent_ms: float,
        received_ms: float,
    ) -> _Beat:
        """A schema-valid 200 from create (the first call) or from an extend."""
        if self.stopped_reason is not None:
            return _Beat("stop", 0, self.stopped_reason)
        self._prev_failure_window_ms = None
        rtt = _ceil_elapsed_ms(sent_ms, received_ms)
        if rtt is not None:
            self.max_rtt_ms = max(self.max_rtt_ms, rtt)
        grant, since_last = self._track_expiry(expires_at_ms, received_ms)
        if remaining_ttl_ms is None and expires_at_ms is not None:
            self.fallback = True
            return self._fallback_after_success(grant, since_last, received_ms)
        self.fallback = False
        return self._primary_after_success(remaining_ttl_ms, rtt, received_ms)

    def _track_expiry(
        self, expires_at_ms: int | None, received_ms: float
    ) -> Tuple[int | None, int | None]:
        """Record the server-frame expiry; return (grant, elapsed since last success)."""
        grant: int | None = None
        since_last = _ceil_elapsed_ms(self._last_success_ms, received_ms)
        if self._reserve_received_ms is None:
            self._reserve_received_ms = received_ms
        if expires_at_ms is not None:
            if self._first_expires_at_ms is None:
                self._first_expires_at_ms = expires_at_ms
            elif self._last_expires_at_ms is not None:
                grant = expires_at_ms - self._last_expires_at_ms
                self._last_grant_ms = grant
            self._last_expires_at_ms = expires_at_ms
        self._last_success_ms = received_ms
        return grant, since_last

    def _primary_after_success(
        self, remaining_ttl_ms: int | None, rtt: int | None, received_ms: float
    ) -> _Beat:
        budget = self._attempt_budget()
        if rtt is None or remaining_ttl_ms is None:
            lead_floor = 0  # unknown timing is never "zero elapsed"
        else:
            lead_floor = max(0, remaining_ttl_ms - rtt)
        if budget is None or rtt is None:
            next_delay = 0  # an unbounded timeout or unknown timing proves no safe delay
        else:
            next_delay = max(0, lead_floor - (2 * budget + self._safety_margin()))
        self._lead_floor_ms = lead_floor
        self._lead_anchor_ms = received_ms if math.isfinite(received_ms) else None
        if next_delay > 0:
            self._zero_delay_used = False
            return _Beat("extend", min(next_delay, _MAX_TIMER_DELAY_MS), "scheduled")
        if self._zero_delay_used:
            return self._stop("lease_shorter_than_retry_budget")
        self._zero_delay_used = True
        return _Beat("extend", 0, "zero_delay_immediate")

    def _held_cadence_ms(self) -> int:
        return max(1, min(self._extend_by_ms // 2, _FALLBACK_MAX_HELD_MS))

    def _fallback_after_success(
        self, grant: int | None, since_last: int | None, received_ms: float
    ) -> _Beat:
        if grant is None:
            # The reserve response: no create field bounds the initial lease, so
            # the first extend fires immediately (the spec's stated trade-off).
            return _Beat("extend", 0, "fallback_prime")
        ttl = self._extend_by_ms
        if 10 * grant >= 9 * ttl:
            cadence, reason = max(grant // 2, _FALLBACK_MIN_CADENCE_MS), "fallback_normal"
        elif grant <= 0 or (
            since_last is not None and 3 * since_last <= 4 * grant <= 5 * since_last
        ):
            # The grant mirrors our own call spacing: maximum-lead clamping.
            # Hold a bounded cadence; MAX_EXTENSIONS_EXCEEDED ends it.
            cadence, reason = self._held_cadence_ms(), "fallback_clamped"
        else:
            # A per-extend delta clamp: a smaller grant is a smaller lease.
            cadence, reason = max(grant // 2, _FALLBACK_MIN_CADENCE_MS), "fallback_small_grant"
        delay = cadence * self._beats_until_lead_low(grant, cadence, received_ms)
        return _Beat("extend", min(delay, _MAX_TIMER_DELAY_MS), reason)

    def _beats_until_lead_low(self, grant: int, cadence: int, received_ms: float) -> int:
        """Skip beats while lead_min >= 1.5 x last grant (closed form).

        lead_min(t) = sum(grants) - (t - reserve receipt) only decreases between
        successes, so the beat that would not be skipped is the first k >= 1
        with 2 * lead_min(received + k * cadence) < 3 * grant.
        """
        if grant <= 0 or self._first_expires_at_ms is None or self._last_expires_at_ms is None:
            return 1
        elapsed = _ceil_elapsed_ms(self._reserve_received_ms, received_ms)
        if elapsed is None:
            return 1
        lead_min = (self._last_expires_at_ms - self._first_expires_at_ms) - elapsed
        excess = 2 * lead_min - 3 * grant
        if excess < 0:
            return 1
        return excess // (2 * cadence) + 1

    # -- failure --------------------------------------------------------------

    def after_failure(
        self, *, kind: str, retry_after_ms: int | None, now_ms: float
    ) -> _Beat:
        """A failed extend attempt; ``kind`` comes from ``_classify_extend``.

        ``retry_after_ms`` must be parsed without the one-hour cap
        (``CyclesResponse.retry_after_ms_header``).
        """
        if self.stopped_reason is not None:
            return _Beat("stop", 0, self.stopped_reason)
        if kind == "terminal":
            return self._stop("terminal")
        if kind == "rejected":
            return self._stop("rejected")
        if kind not in ("transient", "rate_limited"):
            raise ValueError("kind must be transient, rate_limited, terminal or rejected")
        if self.fallback:
            return self._fallback_after_failure(kind, retry_after_ms)
        if self._lead_floor_ms is None:
            return self._stop("no_valid_lease")
        return self._primary_after_failure(kind, retry_after_ms, now_ms)

    def current_lead_estimate_ms(self, now_ms: float) -> int:
        """max(0, last lead_floor - elapsed since its response), rounded down."""
        if self._lead_floor_ms is None:
            return 0
        elapsed = _ceil_elapsed_ms(self._lead_anchor_ms, now_ms)
        if elapsed is None:
            return 0
        return max(0, self._lead_floor_ms - elapsed)

    def _primary_after_failure(
        self, kind: str, retry_after_ms: int | None, now_ms: float
    ) -> _Beat:
        budget = self._attempt_budget()
        if budget is None:
            return self._stop("no_retry_window")
        estimate = self.current_lead_estimate_ms(now_ms)
        window = estimate - budget - self._safety_margin()  # deliberately not clamped
        if window < 0:
            return self._stop("no_retry_window")
        previous = self._prev_failure_window_ms
        if previous is not None and window >= previous:
            # Neither elapsed time nor the window moved (this also ends the
            # single immediate retry a zero window allows).
            return self._stop("no_progress")
        self._prev_failure_window_ms = window
        if kind == "rate_limited":
            if retry_after_ms is None or retry_after_ms < 0:
                return self._stop("retry_after_missing")
            if retry_after_ms > window:
                return self._stop("retry_after_exceeds_window")
            return _Beat("retry", retry_after_ms, "rate_limited")
        delay = min(_MAX_TRANSIENT_RETRY_MS, estimate // 4, window)
        return _Beat("retry", delay, "transient")

    def _fallback_after_failure(self, kind: str, retry_after_ms: int | None) -> _Beat:
        """Non-normative: keep retrying the same key at a bounded cadence.

        A fieldless client cannot prove a lapse, so it over-beats; the
        server's 410/NOT_FOUND (terminal) or the owner's close() ends it.
        """
        delay = self._held_cadence_ms()
        grant = self._last_grant_ms
        if grant is not None and grant > 0:
            delay = min(delay, grant // 4)
        delay = max(delay, _FALLBACK_MIN_CADENCE_MS)
        if kind == "rate_limited" and retry_after_ms is not None and retry_after_ms >= 0:
            delay = max(delay, retry_after_ms)
        return _Beat("retry", min(delay, _MAX_TIMER_DELAY_MS), "fallback_" + kind)


# ===========================================================================
# Settlement and journal
# ===========================================================================

# ---------------------------------------------------------------------------
# Settlement outcome table
#
# One decision function for every settlement attempt: the first commit, the
# background retries, the event fallback and journal replay all ask the same
# question ("what now?") and get the same answer. It is pure: no I/O, no clock
# reads (the caller passes wall-clock ``now_ms``), no randomness of its own.
# ---------------------------------------------------------------------------


# Error codes a settlement can be rejected with for good. Only these justify
# discarding a durable spend record (C9, C17). Codes outside every set below,
# including the v0.1.26 ACTION_* codes, are "unknown": retried with the same
# key, then kept.
_SETTLE_REJECTION_CODES = frozenset(
    {"INVALID_REQUEST", "UNIT_MISMATCH", "NOT_FOUND", "BUDGET_EXCEEDED", "TENANT_CLOSED",
     "OVERDRAFT_LIMIT_EXCEEDED", "BUDGET_FROZEN", "BUDGET_CLOSED", "DEBT_OUTSTANDING",
     "MAX_EXTENSIONS_EXCEEDED"}
)
_AUTH_CODES = frozenset({"UNAUTHORIZED", "FORBIDDEN"})


class _Disposition(str, enum.Enum):
    """What to do after a settlement attempt."""

    SUCCESS = "success"  # settled: remove the journal record
    RETRY = "retry"  # same idempotency key, after ``delay_ms``
    FALLBACK_EVENT = "fallback_event"  # persist event mode, then POST /v1/events, same key
    STOP_KEEP = "stop_keep"  # give up for this run; the journal record stays for replay
    STOP_DISCARD = "stop_discard"  # understood terminal outcome: remove the record, never release


@_dataclass(frozen=True)
class _RetryPolicy:
    """Bounded same-key retry policy for commits and events.

    ``max_attempts`` counts every attempt of one run, the first included
    (runcycles' ``retry_max_attempts=5`` retries after the first attempt is
    ``max_attempts=6`` here).
    """

    max_attempts: int = 6
    initial_delay_ms: int = 500
    multiplier: float = 2.0
    max_delay_ms: int = 30_000

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ValueError("max_attempts must be an integer >= 1")
        if self.initial_delay_ms < 0:
            raise ValueError("initial_delay_ms must be >= 0")
        if not math.isfinite(self.multiplier) or self.multiplier < 1.0:
            raise ValueError("multiplier must be a finite number >= 1.0")
        if self.max_delay_ms < 0:
            raise ValueError("max_delay_ms must be >= 0")


@_dataclass(frozen=True)
class _SettlementStep:
    """The decision for one finished settlement attempt.

    ``delay_ms``/``not_before_ms`` are set for RETRY (``not_before_ms`` is the
    absolute wall-clock time of the next attempt, for the journal). A
    STOP_KEEP with reason ``retries_exhausted`` keeps them too, so a 429
    floor (``cause == "rate_limited"``) can still be persisted for the next
    process. ``cause`` names the last retryable reason when retries ran out.
    """

    disposition: _Disposition
    delay_ms: int
    not_before_ms: int | None
    reason: str
    cause: str | None = None


def _capped_exponential(initial_ms: int, multiplier: float, exponent: int, cap_ms: int) -> int:
    if initial_ms <= 0 or cap_ms <= 0:
        return 0
    if initial_ms >= cap_ms:
        return cap_ms
    if multiplier == 1.0 or exponent <= 0:
        return initial_ms
    # Compare in log space so huge attempt numbers cannot overflow a float.
    if exponent * math.log(multiplier) >= math.log(cap_ms / initial_ms):
        return cap_ms
    return min(cap_ms, int(initial_ms * multiplier**exponent))


def _backoff_ms(attempt: int, policy: _RetryPolicy, rand: Callable[[], float]) -> int:
    """Delay after attempt number ``attempt`` (1-based), with equal jitter.

    base = min(initial * multiplier**(attempt-1), max); the result lies in
    [base//2, base]: half fixed so retries always back off, half random so a
    fleet recovering from one outage does not retry in lockstep.
    """
    base = _capped_exponential(
        policy.initial_delay_ms, policy.multiplier, max(0, attempt - 1), policy.max_delay_ms
    )
    fixed = base // 2
    r = rand()
    if not r > 0.0:  # also catches NaN
        r = 0.0
    r = min(r, 1.0)
    return fixed + int((base - fixed) * r)


def _decide_settlement(
    operation: str,
    *,
    status: int,
    error_code: str | None,
    schema_valid: bool,
    retry_after_ms: int | None,
    attempt: int,
    policy: _RetryPolicy,
    now_ms: int,
    rand: Callable[[], float],
) -> _SettlementStep:
    """Classify one finished commit, event or release attempt.

    ``operation`` is "commit", "event" or "release"; ``status`` is the HTTP status or -1
    for a transport error (timeout, connection failure, unreadable response);
    ``error_code`` is the string ``error`` field read straight from a JSON
    object body (None when absent or not a string); ``schema_valid`` is the
    caller's judgement that the body is a valid CommitResponse /
    EventCreateResponse; ``retry_after_ms`` comes from
    ``_parse_retry_after_ms``; ``attempt`` is the 1-based number of the
    attempt that just finished.

    Order of the rules (first match wins):
      1. schema-valid body with the operation's success status (200 commit,
         201 event) -> SUCCESS. A schema-valid body under another status is
         ambiguous (rule 5).
      2. transport error -> RETRY "transport_error".
      3. 429, or LIMIT_EXCEEDED under any status -> RETRY "rate_limited",
         delay = max(backoff, Retry-After capped at 1 h). No Retry-After
         (bodyless or codeless 429) -> plain backoff.
      4. 5xx -> RETRY "server_error" (whatever code the body claims).
      5. other 2xx -> RETRY "ambiguous_2xx"; 3xx -> RETRY "redirect";
         1xx and statuses outside 100..599 -> RETRY "unexpected_status".
      6. 4xx, in this order:
         401/403 -> STOP_KEEP "auth_failed" (keep for a rotated key; never
         release); RESERVATION_FINALIZED -> STOP_DISCARD "already_finalized"
         (wins over 410: a contradictory body must not cause a second charge
         through the event); IDEMPOTENCY_MISMATCH -> STOP_DISCARD
         "idempotency_mismatch"; commit with 410 or RESERVATION_EXPIRED (even
         with a mangled body) -> FALLBACK_EVENT "reservation_expired";
         code UNAUTHORIZED/FORBIDDEN under another 4xx -> STOP_KEEP
         "auth_failed"; a recognised rejection code -> STOP_DISCARD
         "rejected:<CODE>"; INTERNAL_ERROR in a 4xx -> RETRY "server_error";
         anything else (no code, an HTML proxy page, an unknown or future
         code, RESERVATION_EXPIRED or a bare 410 on an event, which has no
         reservation to expire) -> RETRY "unrecognized_4xx".
    A release follows rules 1-5; any 4xx but 429 (and INTERNAL_ERROR) is final:
    STOP_DISCARD "release_refused:<CODE or status>" (already settled, expired, not
    found, no permission: retrying cannot change it).
    A RETRY on or after ``policy.max_attempts`` becomes STOP_KEEP
    "retries_exhausted" with ``cause`` set to the retry reason.
    FALLBACK_EVENT is immediate (delay 0) and does not count as exhaustion;
    the caller restarts its attempt count for the event.
    """
    if operation not in ("commit", "event", "release"):
        raise ValueError("operation must be 'commit', 'event' or 'release'")
    if attempt < 1:
        raise ValueError("attempt must be >= 1")
    success_status = 201 if operation == "event" else 200
    if schema_valid and status == success_status:
        return _SettlementStep(_Disposition.SUCCESS, 0, None, "settled")

    reason = _settlement_failure_reason(operation, status, error_code)
    if isinstance(reason, _SettlementStep):
        return reason
    delay = _backoff_ms(attempt, policy, rand)
    if reason == "rate_limited" and retry_after_ms is not None and retry_after_ms >= 0:
        delay = max(delay, min(retry_after_ms, _MAX_HONORED_RETRY_AFTER_MS))
    not_before = now_ms + delay
    if attempt >= policy.max_attempts:
        return _SettlementStep(
            _Disposition.STOP_KEEP, delay, not_before, "retries_exhausted", cause=reason
        )
    return _SettlementStep(_Disposition.RETRY, delay, not_before, reason)


def _settlement_failure_reason(
    operation: str, status: int, code: str | None
) -> Union[str, _SettlementStep]:
    """Either a retry reason (str) or a final non-retry step."""
    if status < 0:
        return "transport_error"
    if status == 429 or code == "LIMIT_EXCEEDED":
        return "rate_limited"
    if not 400 <= status <= 499:
        return {2: "ambiguous_2xx", 3: "redirect", 5: "server_error"}.get(
            status // 100, "unexpected_status"
        )
    if operation == "release" and code != "INTERNAL_ERROR":
        refused = "release_refused:" + (code or str(status))
        return _SettlementStep(_Disposition.STOP_DISCARD, 0, None, refused)
    if status in (401, 403):
        return _SettlementStep(_Disposition.STOP_KEEP, 0, None, "auth_failed")
    if code == "RESERVATION_FINALIZED":
        return _SettlementStep(_Disposition.STOP_DISCARD, 0, None, "already_finalized")
    if code == "IDEMPOTENCY_MISMATCH":
        return _SettlementStep(_Disposition.STOP_DISCARD, 0, None, "idempotency_mismatch")
    if operation == "commit" and (status == 410 or code == "RESERVATION_EXPIRED"):
        return _SettlementStep(_Disposition.FALLBACK_EVENT, 0, None, "reservation_expired")
    if code in _AUTH_CODES:
        return _SettlementStep(_Disposition.STOP_KEEP, 0, None, "auth_failed")
    if code in _SETTLE_REJECTION_CODES:
        return _SettlementStep(_Disposition.STOP_DISCARD, 0, None, "rejected:" + str(code))
    if code == "INTERNAL_ERROR":
        return "server_error"
    return "unrecognized_4xx"


def _record_after_step(
    record: _PendingSettlement, step: _SettlementStep
) -> _PendingSettlement | None:
    """The journal record to persist before acting on ``step``, or None.

    FALLBACK_EVENT switches the record to event mode (persisted before the
    event is sent; None when the record has no event body: the caller then
    keeps it and reports). A rate-limited RETRY, or retries exhausted on a
    429, persists the absolute not-before time so a restart cannot retry
    earlier than the server allowed.
    """
    if step.disposition is _Disposition.FALLBACK_EVENT:
        if not record.event_fallback_body:
            return None
        return dataclasses.replace(record, mode="event", not_before_ms=None)
    rate_limited = step.reason == "rate_limited" or step.cause == "rate_limited"
    if rate_limited and step.not_before_ms is not None:
        return dataclasses.replace(record, not_before_ms=step.not_before_ms)
    return None


def _replay_delay_ms(record: _PendingSettlement, now_ms: int) -> int:
    """How long replay must wait for a persisted 429 floor (at most one hour)."""
    if record.not_before_ms is None or record.not_before_ms <= now_ms:
        return 0
    return min(record.not_before_ms - now_ms, _MAX_HONORED_RETRY_AFTER_MS)


# ---------------------------------------------------------------------------
# Commit journal, on-disk compatible with runcycles 0.5.3
#
# <root>/<fingerprint>/v2-<sha256(reservation id)>.json, one JSON record per
# unresolved settlement. root defaults to ~/.runcycles/commit-journal; the
# fingerprint is the first 16 hex chars of PBKDF2-HMAC-SHA256 over the
# principal ("tenant\n<tenant>" or "key\n<api key>"), salted with the base
# URL, so the key itself is never stored.
# ---------------------------------------------------------------------------

_JOURNAL_RECORD_VERSION = 1
_JOURNAL_SUFFIX = ".json"
_JOURNAL_QUARANTINE_SUFFIX = ".corrupt"
_JOURNAL_TMP_SUFFIX = ".tmp"
_JOURNAL_TMP_MAX_AGE_S = 3600.0
_JOURNAL_PBKDF2_SALT_PREFIX = "runcycles-commit-journal\n"
_JOURNAL_PBKDF2_ITERATIONS = 30_000
_JOURNAL_FINGERPRINT_HEX = 16

_fingerprint_cache: Dict[Tuple[str, bytes], str] = {}
_journal_disabled_warned = False
# One lock for the process's journal bookkeeping: the journals, replay claims, warn-once.
_journals_lock = threading.Lock()


def _journal_fingerprint(base_url: str, *, tenant: str | None, api_key: str) -> str:
    """Identity directory name shared with runcycles and the TS client.

    With a tenant the principal is the tenant (stable across key rotation),
    otherwise the API key. PBKDF2 runs once per identity per process; the
    cache is keyed by a digest so it holds no raw key.
    """
    import hashlib

    principal = ("tenant\n" + tenant) if tenant and tenant.strip() else ("key\n" + api_key)
    principal_bytes = principal.encode("utf-8")
    cache_key = (base_url, hashlib.sha256(principal_bytes).digest())
    cached = _fingerprint_cache.get(cache_key)
    if cached is not None:
        return cached
    salt = (_JOURNAL_PBKDF2_SALT_PREFIX + base_url).encode("utf-8")
    digest = hashlib.pbkdf2_hmac("sha256", principal_bytes, salt, _JOURNAL_PBKDF2_ITERATIONS)
    fingerprint = digest.hex()[:_JOURNAL_FINGERPRINT_HEX]
    if len(_fingerprint_cache) >= 64:
        _fingerprint_cache.clear()
    _fingerprint_cache[cache_key] = fingerprint
    return fingerprint


def _journal_filename(reservation_id: str) -> str:
    """The cross-SDK name: v2-<sha256 lowercase hex of the exact UTF-8 id>.json."""
    import hashlib

    digest = hashlib.sha256(reservation_id.encode("utf-8")).hexdigest()
    return "v2-" + digest + _JOURNAL_SUFFIX


class _JournalRecordError(ValueError):
    """A journal file that is not a usable record (it gets quarantined)."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


@_dataclass
class _PendingSettlement:
    """One unresolved settlement, in runcycles' record format (version 1).

    ``mode`` is "commit" (send ``commit_body`` to the reservation's commit
    endpoint) or "event" (send ``event_fallback_body`` to /v1/events); both
    bodies carry the original idempotency key. ``not_before_ms`` is an
    absolute wall-clock floor from a 429.  (A "release" record exists in memory
    only, for a release retried in the background; it is never journaled.)
    """

    reservation_id: str
    base_url: str
    mode: str = "commit"
    # Bodies stay out of repr: a record may end up in a log line.
    commit_body: Dict[str, Any] | None = field(default=None, repr=False)
    event_fallback_body: Dict[str, Any] | None = field(default=None, repr=False)
    recorded_at_ms: int = field(default_factory=_wall_clock_ms)
    not_before_ms: int | None = None

    def to_json(self) -> str:
        # Field order and json.dumps defaults match runcycles byte for byte.
        fields = {name: getattr(self, name) for name in _RECORD_FIELDS}
        return json.dumps({"version": _JOURNAL_RECORD_VERSION, **fields})

    @classmethod
    def from_json(cls, raw: str) -> _PendingSettlement:
        """Parse and validate; raises _JournalRecordError for anything unusable."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _JournalRecordError("not valid JSON") from exc
        if not isinstance(data, dict):
            raise _JournalRecordError("not a JSON object")
        version = data.get("version")
        if not _is_int(version, _JOURNAL_RECORD_VERSION, _JOURNAL_RECORD_VERSION):
            raise _JournalRecordError(f"unsupported record version {version!r}", unsupported=True)
        values = {}
        for name, (default, valid) in _RECORD_FIELDS.items():
            values[name] = data.get(name, default)
            if not valid(values[name]):
                raise _JournalRecordError("invalid or missing " + name)
        mode = values["mode"]
        if values["commit_body" if mode == "commit" else "event_fallback_body"] is None:
            raise _JournalRecordError(f"{mode}-mode record without its body")
        return cls(**values)


def _is_body(value: Any) -> bool:
    return value is None or isinstance(value, dict)


# The record's fields in runcycles' order: the value when absent, and the check.
_RECORD_FIELDS: Dict[str, Tuple[Any, Callable[[Any], bool]]] = {
    "reservation_id": (None, lambda value: isinstance(value, str) and value != ""),
    "base_url": ("", lambda value: isinstance(value, str)),
    "mode": ("commit", lambda value: value in ("commit", "event")),
    "commit_body": (None, _is_body),
    "event_fallback_body": (None, _is_body),
    "recorded_at_ms": (0, lambda value: _is_int(value, 0, INT64_MAX)),
    "not_before_ms": (None, lambda value: value is None or _is_int(value, 0, INT64_MAX)),
}


def _make_private_dirs(path: str) -> None:
    """Create missing directories with mode 0o700; never touch existing ones."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        return
    if parent != path:
        _make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return  # created concurrently by someone else: leave it alone
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)  # ours: undo a restrictive umask


def _is_foreign(path: str) -> bool:
    """A symlink or a directory owned by another user (POSIX only)."""
    getuid = getattr(os, "getuid", None)
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(info.st_mode):
        return True
    return getuid is not None and info.st_uid != getuid()


def _random_suffix() -> str:
    return f"{os.getpid()}.{os.urandom(4).hex()}"


def _create_private(path: str, flags: int) -> int:
    """``open(..., opener=)``: a new file only its owner can read."""
    return os.open(path, flags, 0o600)


def _move_no_clobber(src: str, dst: str) -> bool:
    """Rename src to dst unless dst exists; False when dst exists."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except (OSError, NotImplementedError):
        if os.path.lexists(dst):
            return False
        os.replace(src, dst)  # no hard links here: a small race is the best we can do
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)
    return True


def _read_record(path: str) -> _PendingSettlement:
    """Raises OSError, or ValueError for a file that is not a usable record."""
    with open(path, "rb") as handle:
        return _PendingSettlement.from_json(handle.read().decode("utf-8"))


def _warn_journal_disabled(tried: List[str]) -> None:
    global _journal_disabled_warned
    with _journals_lock:
        warned, _journal_disabled_warned = _journal_disabled_warned, True
    if warned:
        return
    _log.warning(
        "commit journal disabled: no writable directory (tried %s); settlements run without"
        " durability", ", ".join(tried) or "none"
    )


class _CommitJournal:
    """File-per-settlement journal for one (server, principal) identity.

    Never raises from its public methods: journal I/O is best-effort and a
    failure only costs durability (it is logged and reported via return
    values). Blocking: call it off the event loop in async code.
    """

    def __init__(
        self, root: str | None, base_url: str, *, tenant: str | None, api_key: str,
        fsync: bool = False,
    ) -> None:
        self._root = root
        self._base_url = base_url
        self._tenant = tenant
        self._api_key = api_key
        self._fsync = fsync
        self._lock = threading.Lock()
        self._resolved = False
        self._directory: str | None = None

    def __repr__(self) -> str:
        state = self._directory if self._resolved else "unresolved"
        return f"_CommitJournal(root={self._root!r}, directory={state!r})"

    # -- location -------------------------------------------------------------

    @property
    def directory(self) -> str | None:
        """The identity directory, found (and created) on first use; None: disabled."""
        with self._lock:
            if not self._resolved:
                self._directory = self._find_directory()
                self._resolved = True
                self._api_key = ""  # the fingerprint is all we need from now on
        return self._directory

    def _find_directory(self) -> str | None:
        """The configured root (or ~/.runcycles/commit-journal), else the shared temp one."""
        try:
            fingerprint = _journal_fingerprint(
                self._base_url, tenant=self._tenant, api_key=self._api_key
            )
        except (UnicodeError, ValueError):
            _warn_journal_disabled([])
            return None
        roots: List[Tuple[str, bool]] = []  # (root, is the shared temp directory)
        if self._root:
            roots.append((self._root, False))
        else:
            home = os.path.expanduser("~")
            if home and not home.startswith("~"):
                roots.append((os.path.join(home, ".runcycles", "commit-journal"), False))
        with contextlib.suppress(OSError):  # no usable temp directory at all
            import tempfile

            roots.append((os.path.join(tempfile.gettempdir(), "runcycles-commit-journal"), True))
        for index, (root, is_shared_temp) in enumerate(roots):
            directory = os.path.join(root, fingerprint)
            if self._usable(root, directory, is_shared_temp):
                if index:
                    log = _log.warning if self._root else _log.info
                    log("commit journal root %s is not writable; using %s", roots[0][0], root)
                return directory
        _warn_journal_disabled([root for root, _shared in roots])
        return None

    @staticmethod
    def _usable(root: str, directory: str, is_shared_temp: bool) -> bool:
        """Created if missing, ours (in the shared temp directory) and writable."""
        probe = os.path.join(directory, ".probe." + _random_suffix() + _JOURNAL_TMP_SUFFIX)
        try:
            if is_shared_temp and _is_foreign(root):
                return False
            _make_private_dirs(directory)
            if is_shared_temp and _is_foreign(directory):
                return False
            os.close(_create_private(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except (OSError, ValueError):
            return False
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return True

    # -- write / remove -------------------------------------------------------

    def write(self, record: _PendingSettlement) -> bool:
        """Atomically persist ``record``; False (and a log line) on any failure."""
        directory = self.directory
        if directory is None:
            return False
        target = os.path.join(directory, _journal_filename(record.reservation_id))
        try:
            data = record.to_json().encode("utf-8")
            try:
                self._write_atomic(directory, target, data)
            except FileNotFoundError:  # the directory vanished (a cleaned temp dir): recreate
                _make_private_dirs(directory)
                self._write_atomic(directory, target, data)
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a body JSON cannot hold
            _log.warning(
                "commit journal write failed (settling without durability): reservation_id=%s"
                " error=%s", record.reservation_id, type(exc).__name__
            )
            return False
        return True

    def _write_atomic(self, directory: str, target: str, data: bytes) -> None:
        tmp = target + "." + _random_suffix() + _JOURNAL_TMP_SUFFIX
        try:
            with open(tmp, "xb", opener=_create_private) as handle:
                handle.write(data)
                if self._fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fsync:  # the rename too; Windows cannot open a directory, nothing to do there
            with contextlib.suppress(OSError):
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def remove(self, reservation_id: str) -> bool:
        """Delete the record; True when none remains (already-removed is fine).

        Only the v2 name is touched: legacy-named records are migrated to it by
        ``load_pending`` before they are replayed.
        """
        directory = self.directory
        try:
            if directory is not None:
                os.unlink(os.path.join(directory, _journal_filename(reservation_id)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning(
                "commit journal: could not remove record: reservation_id=%s error=%s",
                reservation_id, type(exc).__name__
            )
            return False
        return True

    # -- scan -----------------------------------------------------------------

    def record_names(self) -> set[str]:
        """File names of the records, if this process already found the directory."""
        directory = self._directory
        try:
            names = os.listdir(directory) if directory is not None else []
        except OSError:
            names = []
        return {name for name in names if name.endswith(_JOURNAL_SUFFIX)}

    def load_pending(self, quarantined: List[str] | None = None) -> List[_PendingSettlement]:
        """Records for this base URL, oldest name first. Never raises.

        Reaps stale temp files, quarantines corrupt and unsupported records
        (renamed to ``<name>.corrupt``, never deleted, each logged at ERROR, and
        appended to ``quarantined``), and migrates misnamed (legacy) records to
        their v2 name.
        """
        directory = self.directory
        if directory is None:
            return []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []  # nothing was ever written (or the temp dir was cleaned)
        except OSError as exc:
            _log.warning("commit journal scan failed: error=%s", type(exc).__name__)
            return []
        stale = time.time() - _JOURNAL_TMP_MAX_AGE_S
        parsed: List[Tuple[str, _PendingSettlement]] = []
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(_JOURNAL_TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_mtime < stale:
                        os.unlink(path)
            elif name.endswith(_JOURNAL_SUFFIX):
                record = self._read_or_quarantine(directory, name, quarantined)
                if record is not None:
                    parsed.append((name, record))
        loaded: List[_PendingSettlement] = []
        for name, record in parsed:  # migrated now: its v2 name may have been quarantined above
            misnamed = name != _journal_filename(record.reservation_id)
            usable = not misnamed or self._migrate(directory, name, record)
            if usable and record.base_url == self._base_url:
                loaded.append(record)
        return loaded

    @staticmethod
    def _read_or_quarantine(
        directory: str, name: str, quarantined: List[str] | None
    ) -> _PendingSettlement | None:
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path):
            return None
        try:
            return _read_record(path)
        except OSError:
            return None  # vanished (a concurrent replayer removed it) or unreadable
        except ValueError as exc:  # includes UnicodeDecodeError and _JournalRecordError
            stem = name[: -len(_JOURNAL_SUFFIX)]
            target: str | None = None
            for candidate in (stem, stem + "." + _random_suffix()):
                with contextlib.suppress(OSError):
                    quarantine = candidate + _JOURNAL_QUARANTINE_SUFFIX
                    if _move_no_clobber(path, os.path.join(directory, quarantine)):
                        target = quarantine
                        break
            unsupported = isinstance(exc, _JournalRecordError) and exc.unsupported
            kind = "unsupported" if unsupported else "corrupt"
            _log.error(
                "commit journal: %s record %s quarantined as %s (%s)", kind, name,
                target or "<rename failed>", exc
            )
            if quarantined is not None and target is not None:
                quarantined.append(target)
            return None

    @staticmethod
    def _migrate(directory: str, name: str, record: _PendingSettlement) -> bool:
        """Move a misnamed record to its v2 name. True when it is now loadable.

        Never deletes the old file unless an identical-id v2 record exists,
        and never overwrites a v2 file.
        """
        src = os.path.join(directory, name)
        standard_name = _journal_filename(record.reservation_id)
        standard = os.path.join(directory, standard_name)
        try:
            if _move_no_clobber(src, standard):
                _log.info("commit journal: migrated %s to %s", name, standard_name)
                return True
        except OSError as exc:
            _log.warning("commit journal: could not migrate %s: %s", name, type(exc).__name__)
            return False
        with contextlib.suppress(OSError, ValueError):
            if _read_record(standard).reservation_id == record.reservation_id:
                os.unlink(src)  # a duplicate of the v2 record, which stays authoritative
                return False  # the v2 file is loaded under its own name
        message = "commit journal: kept %s: %s holds a different or unreadable record"
        _log.warning(message, name, standard_name)
        return False


# A commit is settled exactly once, whatever the network does: the first
# attempt runs on the caller; retries (same idempotency key, backoff with
# jitter, Retry-After honoured) run on one process-wide background worker, or
# on the caller with ``commit_retry="inline"``.  Every attempt's outcome comes
# from ``_decide_settlement``; an expired reservation falls back to an event.


def _retry_policy(config: CyclesConfig) -> _RetryPolicy:
    """The config's policy: built (and checked) once per distinct setting, not per call."""
    retries = config.retry_max_attempts if config.retry_enabled else 0
    return _cached_retry_policy(
        1 + retries,
        int(config.retry_initial_delay * 1000),
        config.retry_multiplier,
        int(config.retry_max_delay * 1000),
    )


_cached_retry_policy = functools.lru_cache(maxsize=64)(_RetryPolicy)


def _jitter() -> float:
    """A uniform number in [0, 1) without importing ``random`` (it loads hashlib)."""
    return int.from_bytes(os.urandom(4), "big") / 4294967296.0


_journals: Dict[Tuple[Any, ...], _CommitJournal] = {}  # by identity (no raw key)


def _journal_for(config: CyclesConfig) -> _CommitJournal | None:
    """The journal of this config's (server, principal); None when disabled.

    Cheap: the directory is found (and created) on the first write, which runs
    off the event loop in async code.
    """
    if not config.journal_enabled:
        return None
    import hashlib

    # The cache lives as long as the process: it holds a digest, never the key itself.
    key_digest = hashlib.sha256(config.api_key.encode("utf-8")).digest()
    key = (config.journal_dir, config.base_url, config.tenant, key_digest, config.journal_fsync)
    with _journals_lock:
        journal = _journals.get(key)
        if journal is None:
            if len(_journals) >= 64:
                _journals.clear()
            journal = _journals[key] = _CommitJournal(
                config.journal_dir, config.base_url, tenant=config.tenant,
                api_key=config.api_key, fsync=config.journal_fsync,
            )
        return journal


@_after_fork_in_child
def _journals_after_fork() -> None:
    """The child finds the journals it uses afresh (another thread may have held a lock)."""
    global _journals_lock
    _journals_lock = threading.Lock()
    _journals.clear()


@_dataclass
class _Settlement:
    """One unresolved commit, or its event fallback, and the attempts made so far."""

    record: _PendingSettlement
    client: Any  # the worker sends through it (``_SyncIO(client, detached=True)``)
    policy: _RetryPolicy
    journal: _CommitJournal | None
    inline: bool  # commit_retry="inline": every retry on the caller
    flush_timeout: float
    attempt: int = 0
    due: float = 0.0  # time.monotonic() of the next attempt
    last_response: CyclesResponse | None = None
    last_step: _SettlementStep | None = None
    journaled: bool = True  # False until a new settlement's record is written
    release: Dict[str, Any] | None = None  # the body of a release retried in the background
    # Kept after its retry budget (STOP_KEEP), the process still owns it: see _SettlementQueue.
    kept: bool = False
    times_kept: int = 0
    kept_at: float = 0.0  # time.monotonic() when it was last kept
    not_before: float = 0.0  # time.monotonic() before which no attempt may start (429)
    loop_client: Any = None  # an AsyncCyclesClient: its retries run as tasks on its loop

    @classmethod
    def new(
        cls, client: Any, reservation_id: str, commit_body: Dict[str, Any],
        event_body: Dict[str, Any],
    ) -> _Settlement:
        """A guarded call's settlement: its record is written before the first attempt."""
        config = _config_of(client)
        record = _PendingSettlement(
            reservation_id, config.base_url, commit_body=commit_body, event_fallback_body=event_body
        )
        return cls.for_record(client, record, config=config, journaled=False)

    @classmethod
    def for_record(
        cls, client: Any, record: _PendingSettlement, config: CyclesConfig | None = None,
        **state: Any,
    ) -> _Settlement:
        """Also the hook for journal replay: settle a surviving record through the worker
        (``state`` sets fields, ``config`` saves looking the client's up again)."""
        config = config or _config_of(client)
        settings: Dict[str, Any] = {
            "client": client,
            "policy": _retry_policy(config),
            "journal": _journal_for(config) if config.journal_enabled else None,  # no call if off
            "inline": config.commit_retry == "inline",
            "flush_timeout": config.retry_flush_timeout,
            "loop_client": client if isinstance(client, AsyncCyclesClient) else None,
        }
        return cls(record=record, **{**settings, **state})

    @classmethod
    def for_release(cls, client: Any, reservation_id: str, body: Dict[str, Any]) -> _Settlement:
        """A release, retried in memory only when its first attempt fails transiently (an
        unreleased reservation costs nothing once its TTL passes)."""
        record = _PendingSettlement(reservation_id, "", mode="release")
        return cls.for_record(client, record, journal=None, inline=False, release=body)

    @property
    def operation(self) -> str:
        return self.record.mode

    def keep(self) -> None:
        """Retries ran out but the record stays: try again after a slow, growing
        interval (sooner on activity or ``flush``), never before a 429's floor."""
        step = self.last_step
        now = _clock.monotonic()
        floor_ms = step.delay_ms if step is not None and step.cause == "rate_limited" else 0
        self.kept = True
        self.times_kept += 1
        self.kept_at = now
        self.not_before = now + floor_ms / 1000.0
        interval = _capped_exponential(
            _KEPT_RETRY_FIRST_MS, 2.0, self.times_kept - 1, _KEPT_RETRY_MAX_MS
        )
        self.due = now + max(floor_ms, interval) / 1000.0

    def request(self) -> Tuple[str, Dict[str, Any], str | None]:
        """The next attempt's (operation, body, reservation id)."""
        record = self.record
        if self.release is not None:
            return "release", self.release, record.reservation_id
        if record.mode == "event":
            assert record.event_fallback_body is not None
            return "event", record.event_fallback_body, None
        assert record.commit_body is not None
        return "commit", record.commit_body, record.reservation_id


def _report_settlement(job: _Settlement, response: CyclesResponse, step: _SettlementStep) -> None:
    """One log line per attempt: DEBUG for a first-time commit, ERROR once per kept spend."""
    what, attempts, disposition = job.operation, job.attempt, step.disposition
    rid = job.record.reservation_id
    if disposition is _Disposition.SUCCESS:
        level = logging.INFO if attempts > 1 or what == "event" else logging.DEBUG
        _log.log(level, "%s settled (attempt %d): reservation_id=%s", what, attempts, rid)
        return
    level, why = logging.WARNING, f"{_describe(response)}, {step.reason}"
    if disposition is _Disposition.RETRY:
        message = (
            f"{what} attempt {attempts} failed ({why}): will retry with the same idempotency"
            f" key in {step.delay_ms} ms"
        )
    elif disposition is _Disposition.FALLBACK_EVENT:
        message = (
            f"commit failed ({_describe(response)}): the reservation expired; recording the"
            " spend as an event with the same idempotency key"
        )
    elif disposition is _Disposition.STOP_DISCARD:
        if what == "release":
            message = f"release refused ({why}); not retried"
        else:
            message = f"{what} not settled ({why}); not retried, nothing released"
    elif what == "release":
        message = (
            f"release not settled after {attempts} attempt(s) ({_describe(response)},"
            f" {step.cause or step.reason}); the reservation holds its budget until it expires"
        )
    else:
        on_disk = job.journal is not None and job.journaled
        kept = "kept (journal and memory)" if on_disk else "kept in memory (no journal)"
        level = logging.WARNING if job.times_kept else logging.ERROR  # ERROR once per settlement
        cause = f": {step.cause}" if step.cause else ""
        message = (
            f"{what} not settled after {attempts} attempt(s) ({why}{cause}): the spend is NOT"
            f" recorded yet; {kept}, retried later by this process"
        )
    _log.log(level, "%s: reservation_id=%s", message, rid)


# Settlements kept after their retry budget stay the process's: retried after 30 s,
# then at doubling intervals up to 5 min by the worker, on the next guarded call once
# _KEPT_RETRY_ACTIVITY_GAP_S passed since the last attempt, and once by every flush().
_KEPT_RETRY_FIRST_MS = 30_000
_KEPT_RETRY_MAX_MS = 300_000
_KEPT_RETRY_ACTIVITY_GAP_S = 2.0


def _start_daemon(target: Callable[[], None], name: str) -> threading.Thread | None:
    """A started daemon thread; None at interpreter shutdown (no new threads then)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        return None
    return thread


class _SettlementQueue:
    """The process's pending settlement retries, ordered by due time.

    One daemon worker thread drains it: started on the first retry, it exits as
    soon as nothing is pending, so a process whose commits settle at the first
    attempt never has it.  ``flush()`` drains the same heap on the caller's thread
    and never starts a thread.  The heap is bounded: ``submit`` answers False when
    it is full and the caller settles inline instead of dropping anything; journal
    replay takes at most half of it (``adopt``), so live retries keep room.
    A journal scan (``start_scan``) counts as pending work until it has submitted.

    A commit or event kept after its retry budget (``keep``) stays here too, due
    after a slow, capped interval (``_Settlement.keep``): the worker tries it again
    then, a guarded call wakes it sooner (``wake_kept``), and ``flush`` tries each
    once without waiting for it.  So a long outage never strands spend in a warm
    process, and never becomes a tight loop.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._exit_flush_timeout = 0.0
        self._atexit_registered = False
        self._after_fork()
        _reset_after_fork(self)

    def _after_fork(self) -> None:
        """Empty, threadless and unlocked: also a forked child's start (the parent's
        jobs stay the parent's; their journal records stay on disk)."""
        self._cond = threading.Condition()  # re-entrant
        self._heap: List[Tuple[float, int, _Settlement]] = []
        self._order = itertools.count()
        self._running: List[str] = []  # reservation ids being settled right now
        self._recovering: set[str] = set()  # reservation ids a recover() is settling
        # Ids settled or discarded here lately (bounded): a scan that read their records
        # before they were removed must not send them again.
        self._finished: Dict[str, None] = {}
        self._scans = 0  # journal scans still running (they submit what they find)
        self._worker: threading.Thread | None = None
        self.kept = 0  # kept jobs in the heap; read without the lock as a hint
        self._settled = 0  # outcomes of the jobs run here, for FlushResult
        self._given_up = 0
        self._lost = 0  # turned away with no journal record, since the last flush

    def _occupied(self) -> int:
        """Under the lock: what counts against the capacity: retries under their budget,
        running jobs, and the async clients' retry tasks on their loops."""
        return len(self._heap) - self.kept + len(self._running) + len(_settlement_tasks)

    def submit(self, job: _Settlement) -> bool:
        """Queue ``job``; False when full.  Kept jobs have room of their own (half the
        capacity), so a long outage never crowds live retries out onto the callers.
        The async clients' retry tasks count against the capacity like queued jobs."""
        with self._cond:
            if job.kept:
                if self.kept >= self._capacity // 2:
                    return False
            elif self._occupied() >= self._capacity:
                return False
            self._exit_flush_timeout = max(self._exit_flush_timeout, job.flush_timeout)
            if not self._atexit_registered:  # a loop task too: its loop may end unfinished
                atexit.register(self._flush_at_exit)
                self._atexit_registered = True
            if job.loop_client is not None and _retry_on_loop(job):
                return True
            if self._worker is None:
                self._worker = _start_daemon(self._work, "cycles-lite-settlement")
                if self._worker is None:  # interpreter shutdown: the caller settles inline
                    return False
            self._push(job)
            self._cond.notify_all()
        return True

    def keep(self, job: _Settlement) -> None:
        """A settlement out of retries: kept for later (a release is given up: its
        reservation expires by itself)."""
        if job.operation == "release":
            with self._cond:
                self._given_up += 1
            return
        job.keep()
        if not self.submit(job):
            self.turn_away(job)

    def turn_away(self, job: _Settlement) -> None:
        """A job the full settlement queue could not take.  Journaled, it stays on disk for
        ``recover()`` or the next process; without a record it is lost to this process:
        logged at ERROR and counted as given up by the next ``flush()``."""
        what, rid = job.operation, job.record.reservation_id
        if job.journal is not None and job.journaled and what != "release":
            _log.warning(
                "settlement queue full: %s left to the journal (recover() or the next process"
                " settles it): reservation_id=%s", what, rid
            )
            return
        with self._cond:
            self._lost += 1
        lost = (
            "release not retried; the reservation holds its budget until it expires"
            if what == "release"
            else f"{what} not journaled: the {what} is LOST, the spend is NOT recorded"
        )
        _log.error("settlement queue full: %s: reservation_id=%s", lost, rid)

    def wake_kept(self, tried_before: float | None = None) -> None:
        """Kept jobs last tried before ``tried_before`` (default: a guarded call's
        ``_KEPT_RETRY_ACTIVITY_GAP_S`` ago) are due now, or at their 429 floor."""
        if not self.kept:
            return
        with self._cond:
            now = _clock.monotonic()
            if tried_before is None:
                tried_before = now - _KEPT_RETRY_ACTIVITY_GAP_S
            for index, (due, order, job) in enumerate(self._heap):
                earliest = max(job.not_before, now)
                if job.kept and job.kept_at < tried_before and earliest < due:
                    job.due = earliest
                    self._heap[index] = (earliest, order, job)
            heapq.heapify(self._heap)
            self._cond.notify_all()

    def take_kept(self, reservation_ids: set[str] | None = None) -> None:
        """Take kept jobs (those of ``reservation_ids``, default all) out of the queue, for
        ``recover()`` to settle from their journal records."""
        with self._cond:
            wanted = reservation_ids
            kept = [
                entry for entry in self._heap
                if entry[2].kept and (wanted is None or entry[2].record.reservation_id in wanted)
            ]
            self._heap = [entry for entry in self._heap if entry not in kept]
            heapq.heapify(self._heap)
            self.kept -= len(kept)
            self._cond.notify_all()

    def take_over(self, reservation_ids: set[str]) -> Tuple[set[str], set[str]]:
        """``recover()``: take the kept jobs of ``reservation_ids`` out of the queue and
        mark as in progress the ids nothing else here holds (queued, running, another
        recover's, or finished here since the caller's scan), so a concurrent recover or
        replay skips them; those ids, until each is ``given_back``, and the finished ones."""
        with self._cond:
            self.take_kept(reservation_ids)
            finished = reservation_ids & self._finished.keys()
            claimed = reservation_ids - self.busy() - finished
            self._recovering |= claimed
            return claimed, finished

    def given_back(self, reservation_id: str, *, finished: bool = False) -> None:
        """A job ``take_over`` claimed is queued here, or ``finished`` (settled or
        discarded), or still unresolved."""
        with self._cond:
            self._recovering.discard(reservation_id)
            if finished:
                self._finish(reservation_id)

    def _finish(self, reservation_id: str) -> None:
        """Under the lock."""
        self._finished[reservation_id] = None
        if len(self._finished) > self._capacity:
            del self._finished[next(iter(self._finished))]

    def adopt(self, jobs: List[_Settlement]) -> int:
        """Replay: ``submit`` journal records' jobs, those this process does not settle
        already (checked under the same lock as ``take_over`` claims), while the queue is
        less than half full; how many it took."""
        with self._cond:
            busy = self.busy() | self._finished.keys()
            fresh = [job for job in jobs if job.record.reservation_id not in busy]
            room = self._capacity // 2 - self._occupied()
            return sum(1 for job in fresh[: max(0, room)] if self.submit(job))

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) + len(self._running)

    def busy(self) -> set[str]:
        """Reservation ids this process is already settling (queued, kept, running, or
        being recovered)."""
        with self._cond:
            queued = {job.record.reservation_id for _due, _n, job in self._heap}
            return queued | set(self._running) | self._recovering

    def start_scan(self, scan: Callable[[], None]) -> None:
        """Run ``scan`` on a one-shot daemon thread; ``flush()`` waits for it."""

        def done() -> None:
            with self._cond:
                self._scans -= 1
                self._cond.notify_all()

        def run() -> None:
            try:
                scan()
            finally:
                done()

        with self._cond:
            self._scans += 1
        if _start_daemon(run, "cycles-lite-replay") is None:  # shutdown: a later process replays
            done()

    def flush(self, timeout: float | None, *, retry_kept: bool = True) -> FlushResult:
        """Settle what is pending on this thread, waiting for not-yet-due retries while the
        deadline (``timeout``, and the enclosing ``deadline()``) allows; kept settlements
        get one attempt each (``retry_kept``), without waiting for them.  See FlushResult."""
        bound = _flush_bound(timeout)  # a bad timeout is refused before anything is done
        _rescue_stranded_settlements()
        started = _clock.monotonic()
        with self._cond:
            settled, given_up = self._settled, self._given_up
        while True:
            if retry_kept:
                self.wake_kept(started)  # each kept job: one attempt during this flush
            with self._cond:
                job = self._next_due(bound, live_only=True)
                if job is None:
                    settled, given_up = self._settled - settled, self._given_up - given_up
                    break
            with _bounded_by(bound):  # an attempt started here ends by flush's own deadline too
                self._run(job)
        return self.result(settled, given_up)

    def result(self, settled: int, given_up: int) -> FlushResult:
        """A FlushResult: also counts what is journaled, and what was lost since the last."""
        in_memory = self.busy()
        with _journals_lock:
            journals = list(_journals.values())
        on_disk: set[str] = set().union(*(journal.record_names() for journal in journals))
        on_disk -= {_journal_filename(rid) for rid in in_memory}
        with self._cond:
            lost, self._lost = self._lost, 0
        return FlushResult(settled, len(in_memory) + len(on_disk), given_up + lost)

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next_due(None)
                if job is None:
                    self._worker = None
                    return
            self._run(job)

    def _push(self, job: _Settlement) -> None:
        """Under the lock."""
        heapq.heappush(self._heap, (job.due, next(self._order), job))
        self.kept += job.kept

    def _next_due(self, deadline: float | None, *, live_only: bool = False) -> _Settlement | None:
        """Under the lock: pop the next due job (waiting for it until ``deadline``).

        None when nothing is pending (not even a job another thread is running, or a
        journal scan) or the deadline passed; with ``live_only`` (flush) also when only
        kept jobs that are not due yet remain.
        """
        while True:
            now = _clock.monotonic()
            if deadline is not None and now >= deadline:
                return None
            heap = self._heap
            if heap and heap[0][0] <= now:
                job = heapq.heappop(heap)[2]
                self.kept -= job.kept
                self._running.append(job.record.reservation_id)
                return job
            live = len(heap) - self.kept + len(self._running) + self._scans
            if not live and (live_only or not heap):
                return None
            if deadline is None:
                _clock.wait(self._cond, heap[0][0] - now if heap else None)
            elif self._running or self._scans or heap[0][0] <= deadline:
                _clock.wait(self._cond, min(deadline, heap[0][0] if heap else deadline) - now)
            else:
                return None  # the next retry is due after the deadline: waiting cannot help

    def _run(self, job: _Settlement) -> None:
        outcome = _Disposition.RETRY  # interrupted (Ctrl-C in flush): back to the heap
        try:
            io = _SyncIO(job.client, detached=True)
            outcome = _run_sync(_settle(io, job, retry_inline=False))
        except Exception:  # never let a bug kill the worker or lose the others
            _log.exception("settlement failed: reservation_id=%s", job.record.reservation_id)
            outcome = _Disposition.STOP_KEEP
        finally:
            kept = outcome is _Disposition.STOP_KEEP and job.operation != "release"
            if kept:
                job.keep()
            with self._cond:
                self._running.remove(job.record.reservation_id)
                room = self.kept < self._capacity // 2
                if outcome is _Disposition.RETRY or (kept and room):
                    self._push(job)
                elif outcome is _Disposition.SUCCESS:
                    self._settled += 1
                elif not kept:
                    self._given_up += 1
                finished = outcome is _Disposition.SUCCESS or outcome is _Disposition.STOP_DISCARD
                if finished and job.operation != "release":
                    self._finish(job.record.reservation_id)
                self._cond.notify_all()
            if kept and not room:
                self.turn_away(job)

    def _flush_at_exit(self) -> None:
        timeout = self._exit_flush_timeout
        _rescue_stranded_settlements(at_exit=True)
        if timeout > 0:  # kept settlements already had their budget: the next process's
            result = self.flush(timeout, retry_kept=False)
            if not result:
                _log.warning(
                    "%d settlement(s) still open at exit; journal records are replayed later",
                    result.pending
                )


_settlements = _SettlementQueue()


@_dataclass(frozen=True)
class FlushResult:
    """What ``flush()`` / ``aflush()`` did, and what is left.  True only when ``pending``
    is 0, so ``if cycles_lite.flush(2):`` reads as before (test it for truth, not ``is True``).

    * ``settled``: queued settlements (commit retries, events, replayed and kept
      records) that reached the ledger while it ran, here or on the worker.
    * ``pending``: settlements this process knows are still open afterwards: queued
      or kept in memory, or in the journal of a server and principal (base URL and
      tenant) this process uses.  They stay journaled and are retried later: by the
      worker, the next guarded call, the next ``flush``, or the next process.
    * ``given_up``: settlements that ended while it ran without reaching the ledger
      and with nothing left to retry: a recognised rejection (nothing is released,
      the record is removed) or a release out of retries (its reservation expires);
      also those the full settlement queue turned away since the previous flush
      without a journal record to keep them (lost, logged at ERROR).
    """

    settled: int = 0
    pending: int = 0
    given_up: int = 0

    def __bool__(self) -> bool:
        return self.pending == 0


def _flush_bound(timeout: float | None) -> float | None:
    """The deadline of ``flush(timeout)``: ``timeout`` seconds from now (a negative one
    counts as 0), cut to the enclosing ``deadline()``; None: unbounded."""
    if timeout is None:
        return _deadline.get()
    _any_seconds("timeout", timeout, False)
    return _effective_deadline(_clock.monotonic() + max(0.0, timeout))


def flush(timeout: float | None = None) -> FlushResult:
    """Wait for pending settlement retries, running them on the calling thread.

    Kept settlements (out of retries, still journaled) get one more attempt each.
    Ends by ``timeout`` seconds and by the enclosing ``deadline()``; what is left
    stays queued and journaled.  Returns a FlushResult: true when nothing this
    process knows of is unsettled.  Call it before a serverless handler returns.
    Never starts a thread.
    """
    return _settlements.flush(timeout)


async def aflush(timeout: float | None = None) -> FlushResult:
    """``flush(timeout)`` for async code.  This loop's settlement retries are tasks: they
    are awaited here, on the loop.  What the settlement worker holds (a sync client's
    retries, kept settlements, retries whose loop ended) is then drained as ``flush()``
    does, on the loop's default executor (in the caller's context, so ``deadline()``
    applies); when it holds nothing, no thread is used.  Ends by ``timeout`` and the
    enclosing ``deadline()``; cancelling it stops the waiting only."""
    import asyncio

    bound = _flush_bound(timeout)
    _rescue_stranded_settlements()  # onto this loop
    loop = asyncio.get_running_loop()
    mine = {task: job for task, job in list(_settlement_tasks.items()) if task.get_loop() is loop}
    if mine:
        left = None if bound is None else max(0.0, bound - _clock.monotonic())
        await asyncio.wait(mine, timeout=left)
    outcomes = [t.result() for t in mine if t.done() and not t.cancelled() and not t.exception()]
    if _settlements.pending():
        left = None if bound is None else max(0.0, bound - _clock.monotonic())
        drain = functools.partial(contextvars.copy_context().run, _settlements.flush, left)
        result = await loop.run_in_executor(None, drain)
    else:
        result = _settlements.result(0, 0)
    unjournaled = sum(1 for task, job in mine.items() if not task.done() and job.journal is None)
    return FlushResult(
        result.settled + outcomes.count(_Disposition.SUCCESS),
        result.pending + unjournaled,
        result.given_up + outcomes.count(_Disposition.STOP_DISCARD),
    )


# -- settlement retries of async clients, as tasks on their loop ----------------------

_settlement_tasks: Dict[asyncio.Task[_Disposition], _Settlement] = {}


@_after_fork_in_child
def _forget_settlement_tasks() -> None:
    """In a forked child: the parent's loop tasks are not the child's."""
    _settlement_tasks.clear()


def _retry_on_loop(job: _Settlement) -> bool:
    """Retry an async client's settlement as a task on the running loop (no thread).

    False, and the worker thread takes the job, outside a running loop (journal
    replay) and while an interruption is being handled: a cancelled caller may be
    the loop shutting down, which would never run a new task.
    """
    asyncio = sys.modules.get("asyncio")
    # A kept job (out of retries) is parked in the worker's queue, retried on activity or flush.
    if asyncio is None or job.kept or not isinstance(sys.exc_info()[1], (Exception, type(None))):
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    transport = getattr(job.loop_client, "_transport", None)  # a test double may have none
    if loop.is_closed() or getattr(transport, "closed", False) is True:
        return False
    task = loop.create_task(_settle_on_loop(job))
    _settlement_tasks[task] = job
    task.add_done_callback(lambda done: _settlement_tasks.pop(done, None))
    return True


_stranded_tasks: List[Any] = []  # their loops never run them again; kept, never destroyed


def _rescue_stranded_settlements(*, at_exit: bool = False) -> None:
    """Retry tasks whose loop was closed by hand (no ``asyncio.run`` cancelled them,
    so they never ran to the worker): their jobs go to the worker now (or to this
    loop's tasks, from ``aflush``).  At exit, so do those of a loop not running."""
    for task, job in list(_settlement_tasks.items()):
        loop = task.get_loop()
        if task.done() or not (loop.is_closed() or (at_exit and not loop.is_running())):
            continue
        if _settlement_tasks.pop(task, None) is None:
            continue  # taken by another thread meanwhile
        _stranded_tasks.append(task)  # destroyed pending, it would warn and close its coroutine
        if not _settlements.submit(job):
            _settlements.turn_away(job)


async def _settle_on_loop(job: _Settlement) -> _Disposition:
    """The worker's retries for one job, as a loop task: same steps, same key, asyncio
    sleeps, outside the caller's ``deadline()`` (as on the worker); out of retries, it
    is kept by the worker's queue like the worker's own.
    Cancelled (the loop shutting down, or ``aclose()``), the job goes on to the worker
    thread."""
    import asyncio

    _deadline.set(None)  # the task's own context: the worker's retries are not the caller's
    _attempt.set(None)  # deadline()-bound, nor are these
    try:
        outcome = await _settle(_AsyncIO(job.loop_client), job, retry_inline=True)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None:  # its room in the capacity goes with it to the worker
            _settlement_tasks.pop(current, None)
        if not _settlements.submit(job):
            _settlements.turn_away(job)
        raise
    except Exception:  # never lose the job silently to a bug
        _log.exception("settlement failed: reservation_id=%s", job.record.reservation_id)
        outcome = _Disposition.STOP_KEEP
    if outcome is _Disposition.STOP_KEEP:
        _settlements.keep(job)
    return outcome


async def _hand_over_loop_settlements(client: AsyncCyclesClient) -> None:
    """``aclose()``: this client's retry tasks on this loop move to the worker thread."""
    import asyncio

    loop = asyncio.get_running_loop()
    tasks = [
        task
        for task, job in list(_settlement_tasks.items())
        if job.loop_client is client and task.get_loop() is loop
    ]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


# -- journal replay --------------------------------------------------------------
#
# Records that survived a crash, a freeze or an outage are settled by the same
# steps as a live commit (``_Settlement.for_record`` + ``_settle``): same
# stored key, same outcome table, same journal updates.  Replay happens once per
# process and journal identity when a client is first used (in the background,
# on the settlement worker) and on demand with ``client.recover()``.


@_dataclass
class RecoverySummary:
    """What one ``recover()`` did with the commit journal of its client's identity.

    ``found``: valid records for this server and principal.  Each ends in exactly
    one of ``settled`` (committed, or recorded as an event; record removed),
    ``discarded`` (a genuine terminal rejection such as RESERVATION_FINALIZED;
    record removed, nothing released), ``kept`` (still unresolved: retries
    exhausted, an auth failure, an unclassified 4xx, still retrying when the time
    ran out, or already being settled in this process) and ``not_yet_due`` (not
    attempted before the deadline, e.g. a persisted 429 floor lies beyond it).
    Records still retrying or not yet due are handed to the background worker and
    stay journaled.  ``switched_to_event``: records that moved from commit to event
    mode (their reservation had expired).  ``quarantined``: malformed or
    unsupported files renamed to ``*.corrupt`` (never deleted; logged at ERROR).
    """

    found: int = 0
    settled: int = 0
    switched_to_event: int = 0
    kept: int = 0
    discarded: int = 0
    quarantined: int = 0
    not_yet_due: int = 0

    @property
    def unresolved(self) -> int:
        """Records still in the journal after this call (quarantined files aside)."""
        return self.kept + self.not_yet_due


_replayed_journals: set[str] = set()  # identity directories replayed by this process
# By identity: a client subclass may define ``__eq__`` and so be unhashable.
_clients_seen: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _claim_replay(journal: _CommitJournal) -> bool:
    """True the first time this process replays ``journal``'s identity directory."""
    directory = journal.directory
    with _journals_lock:
        if directory is None or directory in _replayed_journals:
            return False
        _replayed_journals.add(directory)
        return True


def _replay_on_first_use(client: Any) -> None:
    """Start replaying ``client``'s journal in the background, once per process and identity.

    Called when a guarded call (decorator, guard or stream) uses ``client``; every
    call also wakes the settlements this process kept after their retry budget.
    Never delays that call: the journal (key derivation, directory, scan,
    quarantine) is read on a one-shot daemon thread, for sync and async clients
    alike, and the surviving records are settled on the settlement worker.
    Never raises.
    """
    if _settlements.kept:
        _settlements.wake_kept()
    if not issubclass(type(client), (CyclesClient, AsyncCyclesClient)):
        return  # a test double or a duck: never hand it records other processes left
    if not client._config.journal_enabled:
        return
    with _journals_lock:
        if _clients_seen.get(id(client)) is client:
            return
        _clients_seen[id(client)] = client
    # Only records written before now are adopted: later ones belong to settlements
    # of this process that are still running (the async scan runs concurrently).
    first_use_ms = _wall_clock_ms()
    _settlements.start_scan(functools.partial(_replay_in_background, client, first_use_ms))


def _replay_in_background(client: Any, first_use_ms: int) -> None:
    """Queue this identity's surviving records, as many as ``_settlements.adopt`` takes."""
    try:
        journal = _journal_for(_config_of(client))
        if journal is None or not _claim_replay(journal):
            return
        busy = _settlements.busy()
        records = [
            record
            for record in journal.load_pending()
            if record.recorded_at_ms < first_use_ms and record.reservation_id not in busy
        ]
        queued = _settlements.adopt(_replay_jobs(client, records))
        if queued:
            _log.info(
                "replaying %d journaled settlement(s) in the background from %s", queued,
                journal.directory,
            )
        if queued < len(records):
            _log.warning(
                "replay: %d journaled settlement(s) left journaled for recover() or the next"
                " process (the settlement queue keeps room for live retries)", len(records) - queued
            )
    except Exception:  # a replay problem must never break a guarded call
        _log.exception("commit journal replay failed")


def _scan_journal(journal: _CommitJournal) -> Tuple[List[_PendingSettlement], int]:
    """This identity's records for this server, and how many files were quarantined."""
    quarantined: List[str] = []
    return journal.load_pending(quarantined), len(quarantined)


def _replay_jobs(client: Any, records: List[_PendingSettlement]) -> List[_Settlement]:
    """One settlement per record, due no earlier than its persisted 429 floor."""
    now, now_ms = _clock.monotonic(), _wall_clock_ms()
    return [
        _Settlement.for_record(client, record, due=now + _replay_delay_ms(record, now_ms) / 1000)
        for record in records
    ]


def _recover(client: Any, timeout: float | None) -> RecoverySummary:
    """``client.recover()``: replay the journal on this thread until done or ``timeout``."""
    return _run_sync(_recover_steps(_SyncIO(client, detached=True), client, timeout))


async def _recover_async(client: Any, timeout: float | None) -> RecoverySummary:
    """``AsyncCyclesClient.recover()``: the same steps on the loop (file I/O on a thread)."""
    return await _recover_steps(_AsyncIO(client), client, timeout)


async def _recover_steps(
    io: _SyncIO | _AsyncIO, client: Any, timeout: float | None
) -> RecoverySummary:
    """Replay the journal until done or ``timeout``: no attempt starts after the deadline;
    one already running is cut at it."""
    if timeout is not None and not (_is_number(timeout) and timeout >= 0):
        raise _FieldError("timeout", f"must be a number >= 0 or None, got {timeout!r}")
    summary = RecoverySummary()
    journal = _journal_for(client._config)
    if journal is None or journal.directory is None:
        _log.info("recover: the commit journal is disabled or not writable; nothing to replay")
        return summary
    _claim_replay(journal)  # this is the process's replay of this identity
    with _bounded_by(None if timeout is None else _clock.monotonic() + timeout):
        records, summary.quarantined = await io.blocking(functools.partial(_scan_journal, journal))
        mine, finished = _settlements.take_over({r.reservation_id for r in records})
        records = [r for r in records if r.reservation_id not in finished]  # settled since
        summary.found = len(records)
        fresh = [r for r in records if r.reservation_id in mine]  # kept ones included
        summary.kept = len(records) - len(fresh)
        jobs = _replay_jobs(client, fresh)
        commit_mode = {id(job) for job in jobs if job.record.mode == "commit"}
        await _settle_until(io, jobs, _deadline.get(), summary)
    summary.switched_to_event = sum(
        1 for job in jobs if id(job) in commit_mode and job.record.mode == "event"
    )
    _log.info("recover: %s", summary)
    return summary


async def _settle_until(
    io: _SyncIO | _AsyncIO,
    jobs: List[_Settlement],
    deadline: float | None,
    summary: RecoverySummary,
) -> None:
    """Run ``jobs`` in due order; hand what is left at the deadline, or when interrupted
    (a cancelled ``await client.recover()``), to the background retries (it stays
    journaled either way)."""
    heap = [(job.due, n, job) for n, job in enumerate(jobs)]
    heapq.heapify(heap)
    try:
        while heap and (deadline is None or max(heap[0][0], _clock.monotonic()) < deadline):
            job = heap[0][2]  # popped once settled: an interrupted one is handed over too
            outcome = await _settle(io, job, retry_inline=False)
            _due, n, _job = heapq.heappop(heap)
            if outcome is _Disposition.RETRY:
                heapq.heappush(heap, (job.due, n, job))
                continue
            if outcome is _Disposition.SUCCESS:
                summary.settled += 1
            elif outcome is _Disposition.STOP_DISCARD:
                summary.discarded += 1
            else:
                summary.kept += 1
                _settlements.keep(job)
            finished = outcome is _Disposition.SUCCESS or outcome is _Disposition.STOP_DISCARD
            _settlements.given_back(job.record.reservation_id, finished=finished)
    finally:
        _hand_over_recovery(heap, summary)


def _hand_over_recovery(
    heap: List[Tuple[float, int, _Settlement]], summary: RecoverySummary
) -> None:
    """``recover()``'s unfinished jobs go to the background retries."""
    for _due, _n, job in heap:
        if job.attempt:
            summary.kept += 1
        else:
            summary.not_yet_due += 1
        if not _settlements.submit(job):  # full: it stays journaled, and the log says so
            _settlements.turn_away(job)
        _settlements.given_back(job.record.reservation_id)


# ===========================================================================
# Runtime annotations: typing.get_type_hints() on the public classes
# ===========================================================================

# Annotations are strings (``from __future__ import annotations``) that name typing
# names imported for the type checker only, and use ``X | None`` and ``dict[...]``,
# which Python 3.8/3.9 cannot evaluate: typing.get_type_hints() (pydantic's
# TypeAdapter, cattrs, FastAPI) would raise NameError or TypeError.  Each public
# class's ``__annotations__`` therefore translates itself into typing objects the
# first time a tool reads its values; ``typing`` is imported then, never at import.
# Names only the type checker knows (private aliases) read as ``typing.Any``.


class _LazyAnnotations(dict):  # type: ignore[type-arg]
    """A class's ``__annotations__``: strings until a tool reads the values."""

    def _resolved(self) -> _LazyAnnotations:
        if not getattr(self, "_done", False):
            for name, text in dict.items(self):
                if isinstance(text, str):
                    dict.__setitem__(self, name, _runtime_annotation(text))
            self._done = True
        return self

    def items(self) -> Any:
        return dict.items(self._resolved())

    def values(self) -> Any:
        return dict.values(self._resolved())

    def __getitem__(self, name: str) -> Any:
        return dict.__getitem__(self._resolved(), name)

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self._resolved(), name, default)


class _AnnotationNames(dict):  # type: ignore[type-arg]
    """The names an annotation may use, each wrapped in a _TypeExpr (eval's locals)."""

    def __missing__(self, name: str) -> _TypeExpr:
        import builtins
        import typing

        for namespace in (globals(), vars(typing), vars(builtins)):
            if name in namespace:
                return _TypeExpr(namespace[name])
        return _TypeExpr(typing.Any)


class _TypeExpr:
    """A value inside an annotation being evaluated: ``|`` makes a Union, ``[...]``
    subscripts (``dict[...]`` as ``typing.Dict[...]`` on Python 3.8)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __or__(self, other: Any) -> _TypeExpr:
        import typing

        return _TypeExpr(typing.Union[self.value, _type_value(other)])

    def __ror__(self, other: Any) -> _TypeExpr:
        import typing

        return _TypeExpr(typing.Union[_type_value(other), self.value])

    def __getitem__(self, args: Any) -> _TypeExpr:
        import typing

        builtin_generics: Dict[Any, Any] = {
            dict: typing.Dict, list: typing.List, set: typing.Set, tuple: typing.Tuple,
            frozenset: typing.FrozenSet, type: typing.Type,
        }
        origin = builtin_generics.get(self.value, self.value)
        if origin is typing.Literal:  # its strings are values, not names
            return _TypeExpr(origin[args])
        return _TypeExpr(origin[_type_value(args)])

    def __getattr__(self, name: str) -> _TypeExpr:
        import typing

        return _TypeExpr(getattr(self.value, name, typing.Any))


def _type_value(part: Any) -> Any:
    if isinstance(part, _TypeExpr):
        return part.value
    if isinstance(part, (tuple, list)):
        return type(part)(_type_value(item) for item in part)
    if isinstance(part, str):  # a quoted name inside an annotation: List["_Effect"]
        return _runtime_annotation(part)
    return part


def _runtime_annotation(text: str) -> Any:
    """The typing object an annotation string stands for (``typing.Any`` if it cannot
    be evaluated)."""
    import typing

    try:
        value = eval(text, {"__builtins__": {}}, _AnnotationNames())  # noqa: S307
    except Exception:  # an annotation is never worth an error here
        return typing.Any
    return _type_value(value)


def _annotate_public_classes(names: Iterable[str]) -> None:
    """Give every public class (and the classes of this module it inherits from)
    annotations that typing.get_type_hints() can evaluate."""
    namespace = globals()
    for name in names:
        public = namespace.get(name)
        for cls in public.__mro__ if isinstance(public, type) else ():
            own = vars(cls).get("__annotations__")  # what get_type_hints() reads
            if cls.__module__ == __name__ and own and not isinstance(own, _LazyAnnotations):
                cls.__annotations__ = _LazyAnnotations(own)


# ===========================================================================
# CLI
# ===========================================================================

EXIT_OK = 0
EXIT_API_ERROR = 1  # the server answered with an error or a denial
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_TRANSPORT = 3  # no answer: connection, TLS or timeout failure

_CLI_EPILOG = """\
configuration comes from the environment:
  CYCLES_BASE_URL (required), CYCLES_API_KEY and/or CYCLES_ADMIN_API_KEY,
  CYCLES_TENANT (default subject filter), CYCLES_CONNECT_TIMEOUT, CYCLES_READ_TIMEOUT,
  CYCLES_REQUEST_TIMEOUT, CYCLES_CA_BUNDLE, CYCLES_PROXY, CYCLES_JOURNAL_DIR (recover), ...

exit codes: 0 ok, 1 API error or denial, 2 usage or configuration error, 3 transport error
"""

if TYPE_CHECKING:  # pragma: no cover
    from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cycles_lite``: check, balances, reservations, reservation ID, release ID,
    recover (settle what the commit journal holds), verify-evidence FILE|ID.

    Every command is a row of ``_CLI_COMMANDS``; a routine reports a failure through
    ``_cli_exit`` (SystemExit with the exit code, caught here)."""
    import argparse

    try:
        args = _cli_parser(argparse).parse_args(argv)
        if args.command == "verify-evidence":  # may run offline: no configuration needed
            return _cli_verify_evidence(args)
        try:
            config = CyclesConfig.from_env()
        except ValueError as exc:
            raise ValueError(f"configuration error: {exc}") from None
        with CyclesClient(config) as client:
            return int(args.run(client, config, args))
    except SystemExit as exc:  # --help/--version (0), a usage error argparse printed (2), _cli_exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (OSError, ValueError) as exc:
        _cli_error(f"{args.command}: {exc}")
        return EXIT_USAGE
    except CyclesProtocolError as exc:  # a failed page while following cursors
        _cli_error(str(exc))
        return EXIT_TRANSPORT if exc.status == -1 else EXIT_API_ERROR


def _cli_parser(argparse: Any) -> Any:
    json_flag = argparse.ArgumentParser(add_help=False)  # --json before or after the command
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table"
    )
    parser = argparse.ArgumentParser(
        prog="python -m cycles_lite",
        description="Inspect a Cycles server (connectivity, balances, reservations),"
        " release stuck reservations and settle what the commit journal holds.",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cycles-lite {__version__}")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, summary, run, arguments in _CLI_COMMANDS:
        command = commands.add_parser(name, parents=[json_flag], help=summary)
        for flag, options in arguments:
            command.add_argument(flag, **options)
        command.set_defaults(run=run)
    return parser


def _cli_error(message: str) -> None:
    print(f"cycles-lite: {message}", file=sys.stderr)


def _cli_exit(message: str, code: int) -> NoReturn:
    _cli_error(message)
    raise SystemExit(code)


def _cli_body(response: CyclesResponse, what: str, print_body: bool) -> Dict[str, Any]:
    """The body of a successful response, else report the failure and exit: 1 when the
    server answered (its error body printed too if ``print_body``), 3 when it did not."""
    if response.is_success:
        return response.body or {}
    if response.is_transport_error:
        _cli_exit(f"{what}: no answer from the server: {response.error_message}", EXIT_TRANSPORT)
    detail = response.error_message or ""
    if not detail.startswith(f"HTTP {response.status} "):
        code = _error_code(response)
        detail = f"HTTP {response.status}{' ' + code if code else ''}: {detail}"
    if response.request_id:
        detail += f" (request id {response.request_id})"
    _cli_error(f"{what} failed: {_cli_cell(detail)}")
    if print_body and response.body is not None:
        _cli_json(response.body)
    raise SystemExit(EXIT_API_ERROR)


def _cli_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _cli_output(
    args: Any, value: Any, headers: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """``value`` as JSON with --json, else ``rows`` as a table."""
    if args.json:
        _cli_json(value)
        return
    table = [list(headers)] + [[_cli_cell(cell) for cell in row] for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(headers))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _cli_cell(value: Any) -> str:
    """Table text: None is blank, control characters from the server are neutralised."""
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _cli_amount(value: Any, with_unit: bool = False) -> str:
    if not isinstance(value, dict):
        return ""
    amount = _cli_cell(value.get("amount"))
    return f"{amount} {_cli_cell(value.get('unit'))}" if with_unit else amount


def _cli_time(ms: Any) -> str:
    if not _is_int(ms, 0, INT64_MAX):
        return ""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000.0))
    except (OverflowError, OSError, ValueError):
        return str(ms)


def _cli_query(args: Any) -> Dict[str, Any]:
    """A list command's query: every option given, but the flags that are not filters."""
    not_filters = ("command", "run", "json", "all", "admin")
    given = {name: value for name, value in vars(args).items() if value is not None}
    return {name: value for name, value in given.items() if name not in not_filters}


def _cli_check(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    tenant = args.tenant or config.tenant
    admin_only = not config.api_key
    if admin_only and not tenant:
        message = "check: with only CYCLES_ADMIN_API_KEY set, give --tenant or CYCLES_TENANT"
        _cli_exit(message, EXIT_USAGE)
    started = time.monotonic()
    tenant_query = {"tenant": tenant or ""} if admin_only else {}
    response = client.list_reservations(admin=admin_only, limit="1", **tenant_query)
    elapsed_ms = int((time.monotonic() - started) * 1000)
    report = {
        "base_url": config.base_url,
        "api_key": "set" if config.api_key else "not set",
        "admin_api_key": "set" if config.admin_api_key else "not set",
        "auth": "admin key" if admin_only else "api key",
        "ok": response.is_success and isinstance(response.get_body_attribute("reservations"), list),
        "status": response.status,
        "latency_ms": elapsed_ms,
        "tenant": response.cycles_tenant or (tenant if admin_only else None),
        "trace_id": response.trace_id,
    }
    _cli_output(args, report, ["CHECK", "RESULT"], report.items())
    _cli_body(response, "check", print_body=False)  # the report is the output
    if not report["ok"]:
        message = _not_cycles_message(response.status, response.headers)
        _cli_exit("check failed: " + message, EXIT_API_ERROR)
    return EXIT_OK


def _cli_balances(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    filters = _cli_query(args)
    if not any(name in filters for name in SUBJECT_FIELDS):
        if not config.tenant:
            message = "balances: give a subject filter such as --tenant, or set CYCLES_TENANT"
            _cli_exit(message, EXIT_USAGE)
        filters["tenant"] = config.tenant
    headers = ["SCOPE", "UNIT", "REMAINING", "RESERVED", "SPENT", "ALLOCATED", "DEBT", "OVER LIMIT"]
    pages = (client.iter_balances, client.get_balances)
    return _cli_listing(args, "balances", pages, filters, headers, _cli_balance_row)


def _cli_balance_row(item: Mapping[str, Any]) -> List[Any]:
    remaining = item.get("remaining")
    amounts = ("remaining", "reserved", "spent", "allocated", "debt")
    return [
        item.get("scope_path") or item.get("scope"),
        remaining.get("unit") if isinstance(remaining, dict) else "",
        *(_cli_amount(item.get(name)) for name in amounts),
        "yes" if item.get("is_over_limit") else "",
    ]


def _cli_reservations(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    filters = _cli_query(args)
    if (args.admin or not config.api_key) and "tenant" not in filters and config.tenant:
        filters["tenant"] = config.tenant
    filters["admin"] = args.admin or None
    headers = ["ID", "STATUS", "SCOPE", "RESERVED", "CREATED", "EXPIRES"]
    pages = (client.iter_reservations, client.list_reservations)
    return _cli_listing(args, "reservations", pages, filters, headers, _cli_reservation_row)


def _cli_reservation_row(item: Mapping[str, Any]) -> List[Any]:
    return [
        item.get("reservation_id"),
        item.get("status"),
        item.get("scope_path"),
        _cli_amount(item.get("reserved"), with_unit=True),
        _cli_time(item.get("created_at_ms")),
        _cli_time(item.get("expires_at_ms")),
    ]


def _cli_listing(
    args: Any,
    what: str,
    pages: Tuple[Callable[..., Iterable[Dict[str, Any]]], Callable[..., CyclesResponse]],
    filters: Dict[str, Any],
    headers: Sequence[str],
    row: Callable[[Mapping[str, Any]], List[Any]],
) -> int:
    """A list command: one page (or with ``--all`` every item), as JSON or a table."""
    every_item, one_page = pages
    if args.all:
        body: Dict[str, Any] = {what: list(every_item(**filters))}
    else:
        body = _cli_body(one_page(**filters), what, args.json)
    items = [item for item in body.get(what) or [] if isinstance(item, dict)]
    _cli_output(args, body, headers, map(row, items))
    cursor = body.get("next_cursor")
    if not args.json and body.get("has_more") and isinstance(cursor, str):
        print(f"(more: --cursor {_cli_cell(cursor)}, or --all)", file=sys.stderr)
    return EXIT_OK


def _cli_reservation(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    response = client.get_reservation(args.reservation_id, admin=args.admin or None)
    body = _cli_body(response, "reservation", args.json)
    rows = [(key, _cli_field(key, value)) for key, value in body.items()]
    _cli_output(args, body, ["FIELD", "VALUE"], rows)
    return EXIT_OK


def _cli_field(key: str, value: Any) -> Any:
    if isinstance(value, dict) and "amount" in value:
        return _cli_amount(value, with_unit=True)
    if key.endswith("_at_ms"):
        return f"{_cli_time(value)} ({value})"
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _cli_release(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    request: Dict[str, Any] = {"idempotency_key": args.idempotency_key or _new_key()}
    if args.reason:
        request["reason"] = args.reason
    ReleaseRequest.model_validate(request)  # the same checks as the model: a clear ValueError
    response = client.release_reservation(args.reservation_id, request, admin=args.admin or None)
    body = _cli_body(response, "release", args.json)
    if args.json:
        _cli_json(body)
    else:
        released = _cli_amount(body.get("released"), with_unit=True) or "nothing"
        print(_cli_cell(f"released {released} from {args.reservation_id}"))
    return EXIT_OK


def _cli_recover(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    """Exit 0 when the journal holds nothing unresolved afterwards, 1 when records remain
    (or were quarantined), 2 when the journal is disabled or unusable."""
    journal = _journal_for(config)
    directory = journal.directory if journal is not None else None
    if directory is None:
        _cli_exit("the commit journal is disabled or not writable (CYCLES_JOURNAL_DIR)", EXIT_USAGE)
    # What is left stays journaled for the next run: do not wait for it again at exit.
    bounded = dataclasses.replace(config, retry_flush_timeout=0.0)
    with CyclesClient(bounded) as recovering:
        summary = _recover(recovering, args.timeout)
    counts = dataclasses.asdict(summary)
    if not args.json:
        print(f"journal: {directory}")
    _cli_output(args, dict(counts, journal=directory), ["result", "records"], counts.items())
    return EXIT_OK if summary.unresolved == 0 and summary.quarantined == 0 else EXIT_API_ERROR


def _cli_verify_evidence(args: Any) -> int:
    """Exit 0 only when the envelope is ok.  Runs without configuration: without --jwks
    the JWK Set comes from CYCLES_BASE_URL when it is set, else a FILE is checked
    offline (binding_only at best)."""
    jwks = _cli_read(args.jwks) if args.jwks else None
    is_id = _is_hex(args.target, 64) and not os.path.exists(args.target)
    target = args.target if is_id else _cli_read(args.target)
    if is_id or (jwks is None and os.environ.get("CYCLES_BASE_URL")):
        with CyclesClient(CyclesConfig.from_env()) as client:
            result = client.verify_evidence(target, jwks=jwks, expected_signer=args.expected_signer)
    else:
        result = verify_evidence(target, jwks=jwks, expected_signer=args.expected_signer)
    if not args.json:
        print(f"{result.disposition}: {_cli_cell(result.reason)}")
    names = ("evidence_id", "artifact_type", "signer_kid", "signer_pin_matched")
    rows = [(name, getattr(result, name)) for name in names]
    rows.append(("ok", "yes" if result.ok else "no"))
    _cli_output(args, dataclasses.asdict(result), ["FIELD", "VALUE"], rows)
    return EXIT_OK if result.ok else EXIT_API_ERROR


def _cli_read(path: str) -> bytes:
    """A file's bytes, or stdin's for '-'."""
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as handle:
        return handle.read()


def _arg(flag: str, **options: Any) -> Tuple[str, Dict[str, Any]]:
    """One command-line argument: its flag (or name) and its ``add_argument`` options."""
    return flag, options


_SUBJECT_FILTERS = [_arg("--" + name) for name in SUBJECT_FIELDS]
_PAGING = [
    _arg("--limit", type=int),
    _arg("--cursor"),
    _arg("--all", action="store_true", help="follow cursors to the end"),
]
_ADMIN = _arg("--admin", action="store_true", help="use CYCLES_ADMIN_API_KEY")
_RESERVATION_ID = _arg("reservation_id", metavar="ID")

# Every command: (name, help, routine, arguments).
_CLI_COMMANDS: List[Tuple[str, str, Callable[..., int], List[Tuple[str, Dict[str, Any]]]]] = [
    ("check", "check config, connectivity, auth and tenant", _cli_check, [
        _arg("--tenant", help="tenant to probe with an admin-only key (default: CYCLES_TENANT)"),
    ]),
    ("balances", "show balances (default: CYCLES_TENANT)", _cli_balances, [
        *_SUBJECT_FILTERS, *_PAGING,
    ]),
    ("reservations", "list reservations", _cli_reservations, [
        *_SUBJECT_FILTERS,
        _arg("--status", help="ACTIVE, COMMITTED, RELEASED or EXPIRED"),
        _arg("--idempotency-key"),
        _arg("--sort-by"),
        _arg("--sort-dir", choices=["asc", "desc"]),
        *_PAGING,
        _arg("--admin", action="store_true", help="use CYCLES_ADMIN_API_KEY (needs a tenant)"),
    ]),
    ("reservation", "show one reservation", _cli_reservation, [_RESERVATION_ID, _ADMIN]),
    ("release", "release a (stuck) reservation", _cli_release, [
        _RESERVATION_ID,
        _arg("--reason", help="e.g. '[INCIDENT_FORCE_RELEASE] stuck worker'"),
        _arg("--idempotency-key", help="default: a fresh key"),
        _ADMIN,
    ]),
    ("recover", "settle what the commit journal still holds (after a crash or an outage)",
     _cli_recover, [
        _arg("--timeout", type=float, default=30.0, metavar="S",
             help="give up after S seconds; what is left stays journaled (default: 30)"),
    ]),
    ("verify-evidence", "verify a signed CyclesEvidence envelope: a file ('-': stdin) or an id",
     _cli_verify_evidence, [
        _arg("target", metavar="FILE|ID"),
        _arg("--jwks", metavar="FILE", help="the server's JWK Set (default: CYCLES_BASE_URL's)"),
        _arg("--expected-signer", metavar="HEX", help="pin the raw-hex signer key"),
    ]),
]

_annotate_public_classes(__all__)

if __name__ == "__main__":
    sys.exit(main())
