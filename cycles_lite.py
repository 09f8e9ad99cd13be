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

Command line: ``python -m cycles_lite check|balances|reservations|reservation ID|release ID``.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlencode, urlsplit

# typing is for the type checker only: importing it would cost more than the
# rest of this module's own setup (annotations are strings, never evaluated).
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import ssl
    from concurrent.futures import ThreadPoolExecutor
    from typing import (
        Any,
        AsyncIterator,
        Callable,
        ClassVar,
        Dict,
        FrozenSet,
        Iterable,
        Iterator,
        List,
        Mapping,
        Optional,
        Sequence,
        Tuple,
        Type,
        TypeVar,
    )

    # A field check: (dotted path, value, tolerant) -> normalised value, or _FieldError.
    _Check = Callable[[str, Any, bool], Any]
    _M = TypeVar("_M", bound="_Model")

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped as in runcycles
    # Client
    "CyclesClient",
    "AsyncCyclesClient",
    # Config
    "CyclesConfig",
    # Context
    "CyclesContext",
    # Response
    "CyclesResponse",
    # Streaming
    "StreamUsage",
    # Exceptions
    "CyclesError",
    "CyclesProtocolError",
    "CyclesTransportError",
    "BudgetExceededError",
    "DebtOutstandingError",
    "OverdraftLimitExceededError",
    "ReservationExpiredError",
    "ReservationFinalizedError",
    "TenantClosedError",
    # Models
    "Unit",
    "Amount",
    "SignedAmount",
    "Subject",
    "Action",
    "Caps",
    "Decision",
    "CyclesMetrics",
    "CyclesEvidenceRef",
    "Balance",
    "CommitOveragePolicy",
    "ErrorCode",
    "ErrorResponse",
    "ReservationStatus",
    "CommitStatus",
    "ReleaseStatus",
    "ExtendStatus",
    "EventStatus",
    "ReservationCreateRequest",
    "CommitRequest",
    "ReleaseRequest",
    "ReservationExtendRequest",
    "DecisionRequest",
    "EventCreateRequest",
    "ReservationCreateResponse",
    "CommitResponse",
    "ReleaseResponse",
    "ReservationExtendResponse",
    "DecisionResponse",
    "EventCreateResponse",
    "DryRunResult",
    "ReservationDetail",
    "ReservationSummary",
    "ReservationListResponse",
    "BalanceResponse",
    # Beyond runcycles
    "ReservationEvidence",
    # The guarded-execution issue adds the rest of runcycles' names:
    # "cycles", "set_default_client", "set_default_config", "get_cycles_context",
    # "StreamReservation", "AsyncStreamReservation".
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROTOCOL_VERSION = "0.1.25.16"

API_KEY_HEADER = "X-Cycles-API-Key"
ADMIN_API_KEY_HEADER = "X-Admin-API-Key"
IDEMPOTENCY_KEY_HEADER = "X-Idempotency-Key"
TRACEPARENT_HEADER = "traceparent"
TRACE_ID_HEADER = "X-Cycles-Trace-Id"
REQUEST_ID_HEADER = "X-Request-Id"

# Response headers kept on CyclesResponse.headers (lower-case names).
CAPTURED_HEADERS: FrozenSet[str] = frozenset(
    {
        "x-request-id",
        "x-cycles-trace-id",
        "x-cycles-tenant",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
        "date",
        "content-type",
        "location",
    }
)

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
    """An integer of at most 19 ASCII digits (optionally signed), else None."""
    if raw is None:
        return None
    text = raw.strip()
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


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


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


class _TransportProtocolError(CyclesProtocolError, CyclesTransportError):
    """A transport failure raised where runcycles raises ``CyclesProtocolError(status=-1)``.

    Catch it as either class.
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


def _build_protocol_error(response: CyclesResponse, prefix: str) -> CyclesProtocolError:
    if response.is_transport_error:
        return _TransportProtocolError(
            f"{prefix}: {response.error_message or 'transport error'}",
            cause=response.transport_exception,
        )
    body = response.body if isinstance(response.body, dict) else {}
    error_code = _str_or_none(body.get("error"))
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


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_int(value: Any, lo: int, hi: int) -> bool:
    """An int in [lo, hi]; booleans and floats are not ints here."""
    return type(value) is int and lo <= value <= hi


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


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
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


# Validation helpers.  A check takes (field path, value, tolerant) and returns the
# normalised value or raises _FieldError; ``tolerant`` is True while parsing a
# server response (unknown fields are kept, never refused).


class _RequiredMarker:
    """Default of a required model field: constructing without it is a ValueError."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _RequiredMarker()


class _FieldError(ValueError):
    """A ValueError whose message starts with the dotted path of the bad field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def under(self, parent: str) -> _FieldError:
        joiner = "" if self.path.startswith("[") else "."
        return _FieldError(parent + joiner + self.path, self.problem)


def _type_name(value: Any) -> str:
    return type(value).__name__


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
        if not _is_int(value, lo, hi):
            raise _FieldError(path, f"must be {what} in [{lo}, {hi}], got {value!r}")
        return value

    return check


def _bool_check(path: str, value: Any, tolerant: bool) -> Any:
    if not isinstance(value, bool):
        raise _FieldError(path, f"must be a boolean, got {_type_name(value)}")
    return value


def _enum_check(enum_class: Type[enum.Enum]) -> _Check:
    """Known values become members; an unknown string stays a plain str (forward compatible)."""

    def check(path: str, value: Any, tolerant: bool) -> Any:
        if isinstance(value, enum_class):
            return value
        if not isinstance(value, str):
            raise _FieldError(path, f"must be a string, got {_type_name(value)}")
        try:
            return enum_class(value)
        except ValueError:
            return value

    return check


def _model_check(model_class: Type[_Model]) -> _Check:
    def check(path: str, value: Any, tolerant: bool) -> Any:
        if isinstance(value, model_class):
            return value
        if not isinstance(value, dict):
            raise _FieldError(
                path, f"must be a {model_class.__name__} or a dict, got {_type_name(value)}"
            )
        try:
            return model_class._from_dict(value, tolerant)
        except _FieldError as exc:
            raise exc.under(path) from None

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
    """A free-form JSON object (metadata, details, custom): string keys, any values."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _FieldError(path, "must be a dict with string keys")
    return value


def _dimensions_check(path: str, value: Any, tolerant: bool) -> Any:
    _object_check(path, value, tolerant)
    if len(value) > MAX_DIMENSIONS:
        raise _FieldError(path, f"must have at most {MAX_DIMENSIONS} entries (got {len(value)})")
    item = _str_check(MAX_DIMENSION_VALUE_LENGTH)
    for key, v in value.items():
        item(f"{path}[{key!r}]", v, tolerant)
    return value


def _evidence_id_check(path: str, value: Any, tolerant: bool) -> Any:
    if not _is_hex(value, 64):
        raise _FieldError(path, "must be 64 lowercase hex characters")
    return value


def _absolute_uri_check(path: str, value: Any, tolerant: bool) -> Any:
    if not isinstance(value, str) or not urlsplit(value).scheme:
        raise _FieldError(path, "must be an absolute URI")
    return value


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


class _Model:
    """Base of the protocol dataclasses: validation at construction, dump, tolerant parse.

    Subclasses list a check per field in ``_fields``; a field whose default is
    ``_REQUIRED`` must be given.  ``extra`` keeps the unknown fields of a parsed
    response (a newer server may add fields; they are never refused).
    """

    _fields: ClassVar[Dict[str, _Check]] = {}
    _required: ClassVar[FrozenSet[str]] = frozenset()
    # Request models refuse unknown fields in model_validate too; the server would.
    _strict_validate: ClassVar[bool] = False
    extra: Dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._required = frozenset(n for n, v in vars(cls).items() if v is _REQUIRED)

    def __post_init__(self) -> None:
        self.extra = {}
        for name, check in self._fields.items():
            value = getattr(self, name)
            if value is None or value is _REQUIRED:
                if name in self._required:
                    raise _FieldError(name, "field required")
                continue
            checked = check(name, value, False)
            if checked is not value:
                setattr(self, name, checked)
        self._check_model()

    def _check_model(self) -> None:
        """Rules that span fields; subclasses override."""

    # Generic repr and eq (dataclass-generated ones would cost import time per class).
    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, like pydantic models

    @classmethod
    def _from_dict(cls: Type[_M], data: Mapping[str, Any], tolerant: bool) -> _M:
        known: Dict[str, Any] = {}
        extra: Dict[str, Any] = {}
        for key, value in data.items():
            check = cls._fields.get(key)
            if check is None:
                if not tolerant:
                    raise _FieldError(str(key), "unknown field")
                extra[key] = value
            else:
                known[key] = None if value is None else check(key, value, tolerant)
        obj = cls(**known)
        obj.extra = extra
        return obj

    @classmethod
    def model_validate(cls: Type[_M], data: Any) -> _M:
        """Parse a dict (e.g. a response body).

        Raises ValueError naming the field when a required field is missing or a
        field has the wrong type.  Unknown fields go to ``extra`` (request models
        refuse them), and unknown enum values stay plain strings.
        """
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise _FieldError(cls.__name__, f"expected a dict, got {_type_name(data)}")
        return cls._from_dict(data, tolerant=not cls._strict_validate)

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
            out[name] = _dump_value(value, exclude_none, json_mode)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def model_dump_json(self, *, exclude_none: bool = False) -> str:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=exclude_none), separators=(",", ":")
        )

    def model_copy(self: _M, *, update: Mapping[str, Any] | None = None) -> _M:
        copy = dataclasses.replace(self, **dict(update or {}))  # type: ignore[type-var]
        copy.extra = dict(self.extra)
        return copy


_int64 = _int_check(0, INT64_MAX, "a non-negative int64")
_any_str = _str_check()
_non_negative = _int_check(0, INT64_MAX, "a non-negative integer")
_idempotency_key = _str_check(MAX_IDEMPOTENCY_KEY_LENGTH, min_len=1)
_str_list = _list_check(_any_str)


@dataclass(repr=False, eq=False)
class Amount(_Model):
    """A non-negative int64 amount in one unit."""

    unit: Unit | str = _REQUIRED
    amount: int = _REQUIRED

    _fields = {"unit": _enum_check(Unit), "amount": _int64}


@dataclass(repr=False, eq=False)
class SignedAmount(_Model):
    """An amount that may be negative (only ``Balance.remaining``)."""

    unit: Unit | str = _REQUIRED
    amount: int = _REQUIRED

    _fields = {"unit": _enum_check(Unit), "amount": _int_check(what="an int64")}


@dataclass(repr=False, eq=False)
class Subject(_Model):
    """Who spends: the scope hierarchy (at least one standard field in a request)."""

    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    dimensions: dict[str, str] | None = None

    _fields = dict(
        {name: _str_check(MAX_SUBJECT_FIELD_LENGTH) for name in SUBJECT_FIELDS},
        dimensions=_dimensions_check,
    )

    def has_at_least_one_standard_field(self) -> bool:
        return any(getattr(self, name) for name in SUBJECT_FIELDS)


@dataclass(repr=False, eq=False)
class Action(_Model):
    """What is being done: ``kind`` (e.g. llm.completion), ``name``, optional tags."""

    kind: str = _REQUIRED
    name: str = _REQUIRED
    tags: list[str] | None = None

    _fields = {
        "kind": _str_check(MAX_ACTION_KIND_LENGTH),
        "name": _str_check(MAX_ACTION_NAME_LENGTH),
        "tags": _list_check(_str_check(MAX_TAG_LENGTH), MAX_TAGS),
    }


@dataclass(repr=False, eq=False)
class Caps(_Model):
    """Limits that come with an ALLOW_WITH_CAPS decision (advisory for the client)."""

    max_tokens: int | None = None
    max_steps_remaining: int | None = None
    tool_allowlist: list[str] | None = None
    tool_denylist: list[str] | None = None
    cooldown_ms: int | None = None

    _fields = {
        "max_tokens": _non_negative,
        "max_steps_remaining": _non_negative,
        "tool_allowlist": _list_check(_str_check(256)),
        "tool_denylist": _list_check(_str_check(256)),
        "cooldown_ms": _non_negative,
    }

    def is_tool_allowed(self, tool: str) -> bool:
        """The spec's precedence: a non-empty allowlist wins, then a non-empty denylist."""
        if self.tool_allowlist:
            return tool in self.tool_allowlist
        if self.tool_denylist:
            return tool not in self.tool_denylist
        return True


@dataclass(repr=False, eq=False)
class CyclesMetrics(_Model):
    """Standard metrics sent with a commit or event."""

    tokens_input: int | None = None
    tokens_output: int | None = None
    latency_ms: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] | None = None

    _fields = {
        "tokens_input": _non_negative,
        "tokens_output": _non_negative,
        "latency_ms": _non_negative,
        "model_version": _str_check(128),
        "custom": _object_check,
    }

    def put_custom(self, key: str, value: Any) -> None:
        if self.custom is None:
            self.custom = {}
        self.custom[key] = value

    def is_empty(self) -> bool:
        return (
            self.tokens_input is None
            and self.tokens_output is None
            and self.latency_ms is None
            and self.model_version is None
            and not self.custom
        )


_amount = _model_check(Amount)


@dataclass(repr=False, eq=False)
class Balance(_Model):
    """One scope's budget state; ``remaining`` may be negative."""

    scope: str = _REQUIRED
    scope_path: str = _REQUIRED
    remaining: SignedAmount = _REQUIRED
    reserved: Amount | None = None
    spent: Amount | None = None
    allocated: Amount | None = None
    debt: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool | None = None

    _fields = {
        "scope": _any_str,
        "scope_path": _any_str,
        "remaining": _model_check(SignedAmount),
        "reserved": _amount,
        "spent": _amount,
        "allocated": _amount,
        "debt": _amount,
        "overdraft_limit": _amount,
        "is_over_limit": _bool_check,
    }


@dataclass(repr=False, eq=False)
class CyclesEvidenceRef(_Model):
    """Where to fetch a signed evidence envelope (``get_evidence(evidence_id)``)."""

    evidence_id: str = _REQUIRED
    cycles_evidence_url: str = _REQUIRED

    _fields = {
        "evidence_id": _evidence_id_check,
        "cycles_evidence_url": _absolute_uri_check,
    }


@dataclass(repr=False, eq=False)
class ReservationEvidence(_Model):
    """Evidence references of a reservation's reserve, commit and release."""

    reserve: CyclesEvidenceRef | None = None
    commit: CyclesEvidenceRef | None = None
    release: CyclesEvidenceRef | None = None

    _fields = dict.fromkeys(("reserve", "commit", "release"), _model_check(CyclesEvidenceRef))


_balances = _list_check(_model_check(Balance))
_evidence_ref = _model_check(CyclesEvidenceRef)
_caps = _model_check(Caps)
_subject = _model_check(Subject)
_action = _model_check(Action)
_metrics = _model_check(CyclesMetrics)
_overage_policy = _enum_check(CommitOveragePolicy)


class _Request(_Model):
    """Request bodies: refuse unknown fields, need a subject with a standard field."""

    _strict_validate = True

    def _check_model(self) -> None:
        subject = getattr(self, "subject", None)
        if isinstance(subject, Subject) and not subject.has_at_least_one_standard_field():
            raise _FieldError("subject", "must have at least one of " + ", ".join(SUBJECT_FIELDS))


@dataclass(repr=False, eq=False)
class ReservationCreateRequest(_Request):
    """Body of ``POST /v1/reservations``."""

    idempotency_key: str = _REQUIRED
    subject: Subject = _REQUIRED
    action: Action = _REQUIRED
    estimate: Amount = _REQUIRED
    ttl_ms: int | None = None
    grace_period_ms: int | None = None
    overage_policy: CommitOveragePolicy | str | None = None
    dry_run: bool | None = None
    metadata: dict[str, Any] | None = None

    _fields = {
        "idempotency_key": _idempotency_key,
        "subject": _subject,
        "action": _action,
        "estimate": _amount,
        "ttl_ms": _int_check(MIN_TTL_MS, MAX_TTL_MS),
        "grace_period_ms": _int_check(0, MAX_GRACE_PERIOD_MS),
        "overage_policy": _overage_policy,
        "dry_run": _bool_check,
        "metadata": _object_check,
    }


@dataclass(repr=False, eq=False)
class CommitRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/commit``."""

    idempotency_key: str = _REQUIRED
    actual: Amount = _REQUIRED
    metrics: CyclesMetrics | None = None
    metadata: dict[str, Any] | None = None

    _fields = {
        "idempotency_key": _idempotency_key,
        "actual": _amount,
        "metrics": _metrics,
        "metadata": _object_check,
    }


@dataclass(repr=False, eq=False)
class ReleaseRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/release``."""

    idempotency_key: str = _REQUIRED
    reason: str | None = None

    _fields = {"idempotency_key": _idempotency_key, "reason": _str_check(256)}


@dataclass(repr=False, eq=False)
class ReservationExtendRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/extend`` (adds to the current expiry)."""

    idempotency_key: str = _REQUIRED
    extend_by_ms: int = _REQUIRED
    metadata: dict[str, Any] | None = None

    _fields = {
        "idempotency_key": _idempotency_key,
        "extend_by_ms": _int_check(1, MAX_EXTEND_BY_MS),
        "metadata": _object_check,
    }


@dataclass(repr=False, eq=False)
class DecisionRequest(_Request):
    """Body of ``POST /v1/decide`` (a hint only; it holds nothing)."""

    idempotency_key: str = _REQUIRED
    subject: Subject = _REQUIRED
    action: Action = _REQUIRED
    estimate: Amount = _REQUIRED
    metadata: dict[str, Any] | None = None

    _fields = {
        "idempotency_key": _idempotency_key,
        "subject": _subject,
        "action": _action,
        "estimate": _amount,
        "metadata": _object_check,
    }


@dataclass(repr=False, eq=False)
class EventCreateRequest(_Request):
    """Body of ``POST /v1/events``: a direct debit without a reservation."""

    idempotency_key: str = _REQUIRED
    subject: Subject = _REQUIRED
    action: Action = _REQUIRED
    actual: Amount = _REQUIRED
    overage_policy: CommitOveragePolicy | str | None = None
    metrics: CyclesMetrics | None = None
    client_time_ms: int | None = None
    metadata: dict[str, Any] | None = None

    _fields = {
        "idempotency_key": _idempotency_key,
        "subject": _subject,
        "action": _action,
        "actual": _amount,
        "overage_policy": _overage_policy,
        "metrics": _metrics,
        "client_time_ms": _int64,
        "metadata": _object_check,
    }


class _Decided:
    decision: Decision | str

    def is_allowed(self) -> bool:
        return self.decision in (Decision.ALLOW, Decision.ALLOW_WITH_CAPS)

    def is_denied(self) -> bool:
        return self.decision == Decision.DENY


@dataclass(repr=False, eq=False)
class ReservationCreateResponse(_Decided, _Model):
    """Answer to a reservation (live or dry run)."""

    decision: Decision | str = _REQUIRED
    reservation_id: str | None = None
    affected_scopes: list[str] = _REQUIRED
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    caps: Caps | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    _fields = {
        "decision": _enum_check(Decision),
        "reservation_id": _any_str,
        "affected_scopes": _str_list,
        "expires_at_ms": _int64,
        "remaining_ttl_ms": _int64,
        "scope_path": _any_str,
        "reserved": _amount,
        "caps": _caps,
        "reason_code": _any_str,
        "retry_after_ms": _non_negative,
        "balances": _balances,
        "cycles_evidence": _evidence_ref,
    }


@dataclass(repr=False, eq=False)
class CommitResponse(_Model):
    """Answer to a commit; ``charged`` may be less than the actual."""

    status: CommitStatus | str = _REQUIRED
    charged: Amount = _REQUIRED
    released: Amount | None = None
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    _fields = {
        "status": _enum_check(CommitStatus),
        "charged": _amount,
        "released": _amount,
        "balances": _balances,
        "cycles_evidence": _evidence_ref,
    }


@dataclass(repr=False, eq=False)
class ReleaseResponse(_Model):
    """Answer to a release."""

    status: ReleaseStatus | str = _REQUIRED
    released: Amount = _REQUIRED
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    _fields = {
        "status": _enum_check(ReleaseStatus),
        "released": _amount,
        "balances": _balances,
        "cycles_evidence": _evidence_ref,
    }


@dataclass(repr=False, eq=False)
class ReservationExtendResponse(_Model):
    """Answer to an extend; ``expires_at_ms`` is authoritative."""

    status: ExtendStatus | str = _REQUIRED
    expires_at_ms: int = _REQUIRED
    remaining_ttl_ms: int | None = None
    balances: list[Balance] | None = None

    _fields = {
        "status": _enum_check(ExtendStatus),
        "expires_at_ms": _int64,
        "remaining_ttl_ms": _int64,
        "balances": _balances,
    }


@dataclass(repr=False, eq=False)
class DecisionResponse(_Decided, _Model):
    """Answer to ``decide``."""

    decision: Decision | str = _REQUIRED
    caps: Caps | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None
    affected_scopes: list[str] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    _fields = {
        "decision": _enum_check(Decision),
        "caps": _caps,
        "reason_code": _any_str,
        "retry_after_ms": _non_negative,
        "affected_scopes": _str_list,
        "cycles_evidence": _evidence_ref,
    }


@dataclass(repr=False, eq=False)
class EventCreateResponse(_Model):
    """Answer to an event (HTTP 201)."""

    status: EventStatus | str = _REQUIRED
    event_id: str = _REQUIRED
    charged: Amount | None = None
    balances: list[Balance] | None = None

    _fields = {
        "status": _enum_check(EventStatus),
        "event_id": _any_str,
        "charged": _amount,
        "balances": _balances,
    }


@dataclass(repr=False, eq=False)
class DryRunResult(_Decided, _Model):
    """What a ``dry_run`` guarded call returns instead of running the function."""

    decision: Decision | str = _REQUIRED
    caps: Caps | None = None
    affected_scopes: list[str] | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    balances: list[Balance] | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None

    _fields = {
        "decision": _enum_check(Decision),
        "caps": _caps,
        "affected_scopes": _str_list,
        "scope_path": _any_str,
        "reserved": _amount,
        "balances": _balances,
        "reason_code": _any_str,
        "retry_after_ms": _non_negative,
    }

    def has_caps(self) -> bool:
        return self.caps is not None


@dataclass(repr=False, eq=False)
class ErrorResponse(_Model):
    """The error body (the code is kept as the raw string; ``error_code`` maps it)."""

    error: str = _REQUIRED
    message: str = _REQUIRED
    request_id: str = _REQUIRED
    trace_id: str | None = None
    details: dict[str, Any] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    _fields = {
        "error": _any_str,
        "message": _any_str,
        "request_id": _any_str,
        "trace_id": _any_str,
        "details": _object_check,
        "cycles_evidence": _evidence_ref,
    }

    @property
    def error_code(self) -> ErrorCode | None:
        return ErrorCode.from_string(self.error)


_RESERVATION_VIEW_FIELDS: Dict[str, _Check] = {
    "reservation_id": _any_str,
    "status": _enum_check(ReservationStatus),
    "subject": _subject,
    "action": _action,
    "reserved": _amount,
    "created_at_ms": _int64,
    "expires_at_ms": _int64,
    "scope_path": _any_str,
    "affected_scopes": _str_list,
    "idempotency_key": _any_str,
    "committed": _amount,
    "finalized_at_ms": _int64,
    "metadata": _object_check,
    "committed_metadata": _object_check,
    "evidence": _model_check(ReservationEvidence),
}


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


@dataclass(repr=False, eq=False)
class ReservationDetail(_ReservationView, _Model):
    """``GET /v1/reservations/{id}``."""

    reservation_id: str = _REQUIRED
    status: ReservationStatus | str = _REQUIRED
    subject: Subject = _REQUIRED
    action: Action = _REQUIRED
    reserved: Amount = _REQUIRED
    created_at_ms: int = _REQUIRED
    expires_at_ms: int = _REQUIRED
    scope_path: str = _REQUIRED
    affected_scopes: list[str] = _REQUIRED
    idempotency_key: str | None = None
    committed: Amount | None = None
    finalized_at_ms: int | None = None
    metadata: dict[str, Any] | None = None
    committed_metadata: dict[str, Any] | None = None
    evidence: ReservationEvidence | None = None

    _fields = _RESERVATION_VIEW_FIELDS


@dataclass(repr=False, eq=False)
class ReservationSummary(_ReservationView, _Model):
    """One row of ``GET /v1/reservations``."""

    reservation_id: str = _REQUIRED
    status: ReservationStatus | str = _REQUIRED
    subject: Subject = _REQUIRED
    action: Action = _REQUIRED
    reserved: Amount = _REQUIRED
    created_at_ms: int = _REQUIRED
    expires_at_ms: int = _REQUIRED
    scope_path: str = _REQUIRED
    affected_scopes: list[str] = _REQUIRED
    idempotency_key: str | None = None
    committed: Amount | None = None
    finalized_at_ms: int | None = None
    metadata: dict[str, Any] | None = None
    committed_metadata: dict[str, Any] | None = None
    evidence: ReservationEvidence | None = None

    _fields = _RESERVATION_VIEW_FIELDS


@dataclass(repr=False, eq=False)
class ReservationListResponse(_Model):
    """A page of ``GET /v1/reservations``."""

    reservations: list[ReservationSummary] = _REQUIRED
    has_more: bool | None = None
    next_cursor: str | None = None

    _fields = {
        "reservations": _list_check(_model_check(ReservationSummary)),
        "has_more": _bool_check,
        "next_cursor": _any_str,
    }


@dataclass(repr=False, eq=False)
class BalanceResponse(_Model):
    """A page of ``GET /v1/balances``."""

    balances: list[Balance] = _REQUIRED
    has_more: bool | None = None
    next_cursor: str | None = None

    _fields = {"balances": _balances, "has_more": _bool_check, "next_cursor": _any_str}


@dataclass
class CyclesContext:
    """The reservation a guarded call runs under (``get_cycles_context()``).

    ``metrics`` and ``commit_metadata`` are written by the guarded code and go
    into the commit.
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

    def has_caps(self) -> bool:
        return self.caps is not None

    def update_expires_at_ms(self, new_expires_at_ms: int) -> None:
        self.expires_at_ms = new_expires_at_ms


@dataclass
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


@dataclass
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
            error_message=str(ex) or type(ex).__name__,
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
        """``Retry-After`` in ms; delta-seconds only (HTTP-date, garbage or overflow: None)."""
        seconds = _parse_decimal(self.headers.get("retry-after"), signed=False)
        if seconds is None or seconds > INT64_MAX // 1000:
            return None
        return seconds * 1000

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
        if isinstance(self.body, dict):
            return self.body.get(key)
        return None

    def get_error_response(self) -> ErrorResponse | None:
        """The parsed error body, or None when there is none or it lacks a required field."""
        if not isinstance(self.body, dict):
            return None
        try:
            return ErrorResponse.model_validate(self.body)
        except ValueError:
            return None


def _header_int(raw: str | None) -> int | None:
    value = _parse_decimal(raw, signed=True)
    return value if value is not None and INT64_MIN <= value <= INT64_MAX else None


# The schema-validity judgement: is this the operation's expected success answer?
# Only the required fields (and the ones lease arithmetic reads) are checked;
# unknown extra fields never make an answer invalid.


def _is_amount(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("unit"), str)
        and _is_int(value.get("amount"), 0, INT64_MAX)
    )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _optional(body: Mapping[str, Any], key: str, valid: Callable[[Any], bool]) -> bool:
    value = body.get(key)
    return value is None or valid(value)


def _is_ms(value: Any) -> bool:
    return _is_int(value, 0, INT64_MAX)


_DECISIONS = frozenset(d.value for d in Decision)

_SUCCESS_SCHEMAS: Dict[str, Tuple[int, Callable[[Mapping[str, Any]], bool]]] = {
    "create": (
        200,
        lambda b: (
            b.get("decision") in _DECISIONS
            and _is_str_list(b.get("affected_scopes"))
            and _optional(b, "reservation_id", lambda v: isinstance(v, str) and bool(v))
            and _optional(b, "expires_at_ms", _is_ms)
            and _optional(b, "remaining_ttl_ms", _is_ms)
        ),
    ),
    "commit": (200, lambda b: b.get("status") == "COMMITTED" and _is_amount(b.get("charged"))),
    "release": (200, lambda b: b.get("status") == "RELEASED" and _is_amount(b.get("released"))),
    "extend": (
        200,
        lambda b: (
            b.get("status") == "ACTIVE"
            and _is_ms(b.get("expires_at_ms"))
            and _optional(b, "remaining_ttl_ms", _is_ms)
        ),
    ),
    "event": (201, lambda b: b.get("status") == "APPLIED" and isinstance(b.get("event_id"), str)),
    "decide": (200, lambda b: b.get("decision") in _DECISIONS),
    "balances": (200, lambda b: isinstance(b.get("balances"), list)),
    "list": (200, lambda b: isinstance(b.get("reservations"), list)),
    "get": (
        200,
        lambda b: isinstance(b.get("reservation_id"), str) and isinstance(b.get("status"), str),
    ),
    "evidence": (200, lambda b: isinstance(b.get("evidence_id"), str)),
    "jwks": (200, lambda b: isinstance(b.get("keys"), list)),
}


def _is_schema_valid(operation: str, response: CyclesResponse) -> bool:
    """True only for the operation's success status with a body holding its required fields."""
    schema = _SUCCESS_SCHEMAS.get(operation)
    if schema is None or response.status != schema[0] or not isinstance(response.body, dict):
        return False
    try:
        return bool(schema[1](response.body))
    except Exception:
        return False


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
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


def _seconds(name: str, value: Any, *, allow_zero: bool) -> float:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def _count(name: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value, lo, hi):
        raise ValueError(f"{name}: must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be a bool, got {value!r}")
    return value


def _optional_str(name: str, value: Any, max_len: int | None = None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a string or None, got {_type_name(value)}")
    if max_len is not None and len(value) > max_len:
        raise ValueError(f"{name}: must be at most {max_len} characters")


def _optional_path(name: str, value: Any) -> str | None:
    """A str (an ``os.PathLike`` is converted) or None."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    _optional_str(name, value)
    return None if value is None else str(value)


@dataclass(repr=False)
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
    """

    base_url: str
    api_key: str = ""

    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT

    retry_enabled: bool = True
    retry_max_attempts: int = 5
    retry_initial_delay: float = 0.5
    retry_multiplier: float = 2.0
    retry_max_delay: float = 30.0
    retry_flush_timeout: float = 10.0

    journal_enabled: bool = True
    journal_dir: str | None = None

    admin_api_key: str | None = None
    request_timeout: float | None = None
    ca_bundle: str | None = None
    ssl_context: ssl.SSLContext | None = None
    proxy: str | None = None
    user_agent: str = DEFAULT_USER_AGENT
    traceparent: str | Callable[[], str | None] | None = None
    trace_id: str | None = None
    pool_maxsize: int = DEFAULT_POOL_MAXSIZE

    def __post_init__(self) -> None:
        _parse_base_url(self.base_url)
        for name in ("api_key", "admin_api_key"):
            key = getattr(self, name)
            if key is not None and not isinstance(key, str):
                raise ValueError(f"{name}: must be a string")
            if key and not _is_header_value(key):
                raise ValueError(f"{name}: must be printable ASCII without spaces at the ends")
        if not self.api_key and not self.admin_api_key:
            raise ValueError("api_key: required (or admin_api_key for admin-only use)")
        for name in SUBJECT_FIELDS:
            _optional_str(name, getattr(self, name), MAX_SUBJECT_FIELD_LENGTH)
        self.connect_timeout = _seconds("connect_timeout", self.connect_timeout, allow_zero=False)
        self.read_timeout = _seconds("read_timeout", self.read_timeout, allow_zero=False)
        if self.request_timeout is not None:
            self.request_timeout = _seconds(
                "request_timeout", self.request_timeout, allow_zero=False
            )
        self.retry_enabled = _flag("retry_enabled", self.retry_enabled)
        self.retry_max_attempts = _count("retry_max_attempts", self.retry_max_attempts, 0, 1000)
        self.retry_initial_delay = _seconds(
            "retry_initial_delay", self.retry_initial_delay, allow_zero=True
        )
        self.retry_multiplier = _seconds(
            "retry_multiplier", self.retry_multiplier, allow_zero=False
        )
        if self.retry_multiplier < 1:
            raise ValueError(f"retry_multiplier: must be >= 1, got {self.retry_multiplier!r}")
        self.retry_max_delay = _seconds("retry_max_delay", self.retry_max_delay, allow_zero=True)
        self.retry_flush_timeout = _seconds(
            "retry_flush_timeout", self.retry_flush_timeout, allow_zero=True
        )
        self.journal_enabled = _flag("journal_enabled", self.journal_enabled)
        self.journal_dir = _optional_path("journal_dir", self.journal_dir)
        self._check_transport_options()

    def _check_transport_options(self) -> None:
        self.ca_bundle = _optional_path("ca_bundle", self.ca_bundle)
        if self.ca_bundle is not None and not os.path.exists(self.ca_bundle):
            raise ValueError(f"ca_bundle: no such file or directory: {self.ca_bundle!r}")
        if self.ssl_context is not None:
            if not hasattr(self.ssl_context, "wrap_socket"):
                raise ValueError("ssl_context: must be an ssl.SSLContext")
            if self.ca_bundle is not None:
                raise ValueError("ssl_context: give either ssl_context or ca_bundle, not both")
        if self.proxy is not None:
            _parse_proxy(self.proxy)
        if not _is_header_value(self.user_agent):
            raise ValueError("user_agent: must be a non-empty printable ASCII string")
        traceparent = self.traceparent
        if not (traceparent is None or callable(traceparent) or _valid_traceparent(traceparent)):
            raise ValueError("traceparent: must be '00-<32 hex>-<16 hex>-<2 hex>' or a callable")
        if self.trace_id is not None and not _valid_trace_id(self.trace_id):
            raise ValueError("trace_id: must be 32 lowercase hex characters, not all zero")
        self.pool_maxsize = _count("pool_maxsize", self.pool_maxsize, 0, 1000)

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
        POOL_MAXSIZE.  Empty values count as unset; booleans accept
        true/false/1/0/yes/no/on/off; a malformed value raises ValueError naming the variable.
        """
        env = _EnvReader(os.environ if environ is None else environ, prefix)
        base_url = env.text("BASE_URL")
        api_key = env.text("API_KEY")
        admin_api_key = env.text("ADMIN_API_KEY")
        if not base_url:
            raise ValueError(f"{prefix}BASE_URL environment variable is required")
        if not api_key and not admin_api_key:
            raise ValueError(
                f"{prefix}API_KEY environment variable is required (or {prefix}ADMIN_API_KEY)"
            )
        return cls(
            base_url=base_url,
            api_key=api_key or "",
            tenant=env.text("TENANT"),
            workspace=env.text("WORKSPACE"),
            app=env.text("APP"),
            workflow=env.text("WORKFLOW"),
            agent=env.text("AGENT"),
            toolset=env.text("TOOLSET"),
            connect_timeout=env.seconds("CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=env.seconds("READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            retry_enabled=env.flag("RETRY_ENABLED", True),
            retry_max_attempts=env.integer("RETRY_MAX_ATTEMPTS", 5),
            retry_initial_delay=env.seconds("RETRY_INITIAL_DELAY", 0.5),
            retry_multiplier=env.seconds("RETRY_MULTIPLIER", 2.0),
            retry_max_delay=env.seconds("RETRY_MAX_DELAY", 30.0),
            retry_flush_timeout=env.seconds("RETRY_FLUSH_TIMEOUT", 10.0),
            journal_enabled=env.flag("JOURNAL_ENABLED", True),
            journal_dir=env.text("JOURNAL_DIR"),
            admin_api_key=admin_api_key,
            request_timeout=env.seconds("REQUEST_TIMEOUT", None),
            ca_bundle=env.text("CA_BUNDLE"),
            proxy=env.text("PROXY"),
            user_agent=env.text("USER_AGENT") or DEFAULT_USER_AGENT,
            traceparent=env.text("TRACEPARENT"),
            trace_id=env.text("TRACE_ID"),
            pool_maxsize=env.integer("POOL_MAXSIZE", DEFAULT_POOL_MAXSIZE),
        )


class _EnvReader:
    """Typed reads of prefixed environment variables with errors that name the variable."""

    def __init__(self, environ: Mapping[str, str], prefix: str) -> None:
        self._environ = environ
        self._prefix = prefix

    def text(self, name: str) -> str | None:
        value = self._environ.get(self._prefix + name, "").strip()
        return value or None

    def _fail(self, name: str, expected: str) -> ValueError:
        raw = self._environ.get(self._prefix + name, "")
        return ValueError(f"{self._prefix}{name}: expected {expected}, got {raw!r}")

    def seconds(self, name: str, default: Any) -> Any:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(name, "a number of seconds") from None
        if not math.isfinite(value) or value < 0:
            raise self._fail(name, "a finite, non-negative number of seconds")
        return value

    def integer(self, name: str, default: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise self._fail(name, "an integer") from None

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        word = raw.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise self._fail(name, "one of true/false/1/0/yes/no/on/off")


# ---------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------
#
# Why not urllib.request's opener: it forces ``Connection: close`` (no keep-alive),
# installs file:/ftp:/data: handlers, follows redirects while copying every header
# (the API key included) to whatever host ``Location`` names, reads proxies from the
# environment, and applies timeouts per socket operation only.  This transport is
# the opener-shaped piece we need instead: a request builder, a scheme allowlist
# (http and https), http.client connections held in a small LIFO pool, no redirect
# handling at all (a 3xx is returned as an error response), and a whole-attempt
# deadline enforced on every socket read and write.


@dataclass
class _Prepared:
    """One HTTP request, fully built and validated; ``send`` only puts it on the wire."""

    operation: str
    method: str
    path: str
    query: Tuple[Tuple[str, str], ...] = ()
    headers: Dict[str, str] = field(default_factory=dict, repr=False)
    body: Optional[bytes] = field(default=None, repr=False)
    idempotency_key: Optional[str] = None

    @property
    def target(self) -> str:
        if not self.query:
            return self.path
        return self.path + "?" + urlencode(self.query, safe="", quote_via=quote)

    @property
    def resendable(self) -> bool:
        """Safe to send twice: a GET, or a body whose idempotency key makes the server replay."""
        return self.method == "GET" or self.idempotency_key is not None


_PUBLIC_OPERATIONS = frozenset({"evidence", "jwks"})


def _build_request(
    config: CyclesConfig,
    operation: str,
    method: str,
    path: str,
    *,
    body: Mapping[str, Any] | None = None,
    query: Mapping[str, str] | None = None,
    admin: bool = False,
) -> _Prepared:
    """Pure: the headers, body bytes and query of one call.  Raises ValueError on bad input."""
    headers = {"User-Agent": config.user_agent, "Accept": "application/json"}
    if operation not in _PUBLIC_OPERATIONS:
        if admin:
            if not config.admin_api_key:
                raise ValueError("admin_api_key: not configured")
            headers[ADMIN_API_KEY_HEADER] = config.admin_api_key
        elif config.api_key:
            headers[API_KEY_HEADER] = config.api_key
        else:
            raise ValueError(
                f"api_key: required for {operation} (only admin_api_key is configured)"
            )
    headers.update(_trace_headers(config))
    payload = None
    key = None
    if body is not None:
        raw_key = body.get("idempotency_key")
        if isinstance(raw_key, str) and _is_header_value(raw_key):
            key = raw_key
            headers[IDEMPOTENCY_KEY_HEADER] = raw_key
        payload = json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        headers["Content-Type"] = "application/json"
    pairs = tuple(_query_pairs(query or {}))
    return _Prepared(operation, method, path, pairs, headers, payload, key)


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


def _trace_headers(config: CyclesConfig) -> Dict[str, str]:
    headers = {}
    traceparent = config.traceparent
    if callable(traceparent):
        try:
            traceparent = traceparent()
        except Exception:
            _log.debug("traceparent callable raised; sending no traceparent", exc_info=True)
            traceparent = None
    if traceparent is not None and _valid_traceparent(traceparent):
        headers[TRACEPARENT_HEADER] = traceparent
    if config.trace_id is not None:
        headers[TRACE_ID_HEADER] = config.trace_id
    return headers


def _read_response(
    status: int, headers: Iterable[Tuple[str, str]], body_bytes: bytes
) -> CyclesResponse:
    """Pure: a CyclesResponse from the status, raw headers and raw body of an answer."""
    captured: Dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in CAPTURED_HEADERS and lower not in captured:
            captured[lower] = value
    body = _json_object(body_bytes)
    if 200 <= status < 300:
        return CyclesResponse.success(status, body if body is not None else {}, captured)
    return CyclesResponse.http_error(status, _error_message(status, body, captured), body, captured)


def _json_object(raw: bytes) -> Dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
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
    return f"HTTP {status}"


class _AttemptDeadlineExceeded(TimeoutError):
    """The whole-attempt deadline passed, e.g. while a server trickled its answer."""


class _ResponseTooLarge(OSError):
    pass


class _DeadlineReader(io.RawIOBase):
    """The raw stream http.client reads a response from; every read is deadline-bounded."""

    def __init__(self, sock: _DeadlineSocket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock._reader_closed()
        super().close()


class _DeadlineSocket:
    """Wraps a connected socket so each blocking call waits min(op_timeout, time left).

    ``deadline`` (a ``time.monotonic()`` value) is set per request; a server that
    trickles one byte at a time cannot stretch the attempt past it.  Like a real
    socket, closing it while a response reader is open defers the real close
    until the reader closes.
    """

    def __init__(self, sock: Any, op_timeout: float) -> None:
        self._sock = sock
        self._op_timeout = op_timeout
        self._readers = 0
        self._close_requested = False
        self.deadline = math.inf

    def _bounded(self, operation: Callable[..., Any], *args: Any) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _AttemptDeadlineExceeded("attempt deadline exceeded")
        self._sock.settimeout(min(self._op_timeout, left))
        try:
            return operation(*args)
        except OSError as exc:
            import socket  # loaded already by http.client

            if isinstance(exc, socket.timeout) and time.monotonic() >= self.deadline:
                raise _AttemptDeadlineExceeded("attempt deadline exceeded") from exc
            raise

    def sendall(self, data: bytes) -> None:
        self._bounded(self._sock.sendall, data)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        return int(self._bounded(self._sock.recv_into, buffer, nbytes))

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError("only binary reads are supported")
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def _reader_closed(self) -> None:
        self._readers -= 1
        if self._close_requested and self._readers <= 0:
            self._sock.close()

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def close(self) -> None:
        self._close_requested = True
        if self._readers <= 0:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _connection_dropped(conn: Any) -> bool:
    """An idle keep-alive connection is unusable if its socket became readable (EOF or junk)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        import select

        fd = sock.fileno()
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


def _is_stale_error(exc: BaseException) -> bool:
    """The errors a keep-alive connection the server already closed produces before any answer."""
    if isinstance(exc, ConnectionError):  # RemoteDisconnected, reset, broken pipe, aborted
        return True
    ssl_module = sys.modules.get("ssl")
    return ssl_module is not None and isinstance(
        exc, (ssl_module.SSLEOFError, ssl_module.SSLZeroReturnError)
    )


class _Transport:
    """Pooled keep-alive HTTP(S) to one origin, with a whole-attempt deadline.

    Thread-safe: a connection is used by one request at a time; idle ones wait in
    a LIFO list (the most recently used is the least likely to be stale).  A
    reused connection that turns out stale gets one reconnect-and-resend, only for
    requests that are safe to repeat (GET, or a body with an idempotency key).
    """

    def __init__(self, config: CyclesConfig) -> None:
        self._origin = _parse_base_url(config.base_url)
        self._proxy = _parse_proxy(config.proxy) if config.proxy else None
        self._connect_timeout = config.connect_timeout
        self._read_timeout = config.read_timeout
        self.attempt_timeout = config.attempt_timeout
        self._pool_maxsize = config.pool_maxsize
        self._ssl_context = config.ssl_context
        self._ca_bundle = config.ca_bundle
        self._idle: List[Any] = []
        self._lock = threading.Lock()
        self.closed = False

    def send(
        self, prepared: _Prepared, deadline: float
    ) -> Tuple[int, List[Tuple[str, str]], bytes]:
        """Send one request; the status, raw headers and body, or raise OSError / HTTPException."""
        target = self._request_target(prepared)
        headers = self._wire_headers(prepared)
        conn, reused = self._checkout(deadline, fresh=False)
        try:
            response = self._exchange(
                conn, prepared.method, target, headers, prepared.body, deadline
            )
        except Exception as exc:
            stale = reused and _is_stale_error(exc) and time.monotonic() < deadline
            if not (stale and prepared.resendable):
                raise
            _log.debug("stale keep-alive connection (%s); reconnecting once", type(exc).__name__)
            self._discard_idle()  # its idle siblings are likely stale too
            conn, _ = self._checkout(deadline, fresh=True)
            response = self._exchange(
                conn, prepared.method, target, headers, prepared.body, deadline
            )
        try:
            body = self._read_body(response)
        except BaseException:
            response.close()
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return response.status, response.getheaders(), body

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._discard_idle()

    def _request_target(self, prepared: _Prepared) -> str:
        target = self._origin.base_path + prepared.target
        if self._proxy is not None and self._origin.scheme == "http":
            return f"http://{_host_literal(self._origin.host)}:{self._origin.port}{target}"
        return target

    def _wire_headers(self, prepared: _Prepared) -> Dict[str, str]:
        headers = prepared.headers
        extra = {}
        if self._pool_maxsize == 0:
            extra["Connection"] = "close"
        if self._proxy is not None and self._proxy.authorization and self._origin.scheme == "http":
            extra["Proxy-Authorization"] = self._proxy.authorization
        return dict(headers, **extra) if extra else headers

    @staticmethod
    def _exchange(
        conn: Any,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None,
        deadline: float,
    ) -> Any:
        """Send the request and read the response head; the connection is closed on failure."""
        try:
            conn.sock.deadline = deadline
            conn.request(method, target, body=body, headers=headers)
            return conn.getresponse()
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _read_body(response: Any) -> bytes:
        length = response.length
        if length is not None and length <= MAX_RESPONSE_BYTES:
            return bytes(response.read())
        chunks: List[bytes] = []
        total = 0
        while True:
            chunk = response.read(65536)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > MAX_RESPONSE_BYTES:
                raise _ResponseTooLarge(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)

    def _checkout(self, deadline: float, *, fresh: bool) -> Tuple[Any, bool]:
        while not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if not _connection_dropped(conn):
                return conn, True
            conn.close()
        return self._connect(deadline), False

    def _checkin(self, conn: Any) -> None:
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

    def _connect(self, deadline: float) -> Any:
        import http.client

        left = deadline - time.monotonic()
        if left <= 0:
            raise _AttemptDeadlineExceeded("attempt deadline exceeded before connecting")
        timeout = min(self._connect_timeout, left)
        origin = self._origin
        host, port = (
            (self._proxy.host, self._proxy.port) if self._proxy else (origin.host, origin.port)
        )
        conn: Any
        if origin.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._tls_context()
            )
            if self._proxy is not None:
                tunnel_headers = (
                    {"Proxy-Authorization": self._proxy.authorization}
                    if self._proxy.authorization
                    else None
                )
                conn.set_tunnel(origin.host, origin.port, headers=tunnel_headers)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        conn.sock = _DeadlineSocket(conn.sock, self._read_timeout)
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            import ssl

            bundle = self._ca_bundle
            if bundle is not None and os.path.isdir(bundle):
                self._ssl_context = ssl.create_default_context(capath=bundle)
            else:
                self._ssl_context = ssl.create_default_context(cafile=bundle)
        return self._ssl_context


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _perform(
    transport: _Transport, prepared: _Prepared, deadline: float | None = None
) -> CyclesResponse:
    """Send and read one attempt; never raises for HTTP or transport failures.

    Blocking: the async client runs it on its worker threads.
    """
    if deadline is None:
        deadline = time.monotonic() + transport.attempt_timeout
    try:
        status, headers, body = transport.send(prepared, deadline)
    except Exception as exc:
        _log.debug("%s %s failed: %s: %s", prepared.method, prepared.path, type(exc).__name__, exc)
        return CyclesResponse.transport_error(exc)
    return _read_response(status, headers, body)


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


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


def _reservation_path(reservation_id: Any, suffix: str = "") -> str:
    """The reservation URL path, with the id percent-encoded (``../x`` stays one segment)."""
    if not isinstance(reservation_id, str) or not reservation_id:
        raise ValueError("reservation_id: must be a non-empty string")
    if len(reservation_id) > MAX_RESERVATION_ID_LENGTH:
        raise ValueError(
            f"reservation_id: must be at most {MAX_RESERVATION_ID_LENGTH} characters"
            f" (got {len(reservation_id)})"
        )
    return f"{RESERVATIONS_PATH}/{quote(reservation_id, safe='')}{suffix}"


def _request_body(request: Any, expected: Type[_Model]) -> Dict[str, Any]:
    """A model is dumped without None fields; a dict is sent as-is; anything else is a TypeError."""
    if isinstance(request, _Model):
        if not isinstance(request, expected):
            raise TypeError(f"expected a {expected.__name__} or a dict, got {_type_name(request)}")
        return request.model_dump(mode="json", exclude_none=True)
    if isinstance(request, dict):
        return request
    dump = getattr(request, "model_dump", None)  # a pydantic model, e.g. from runcycles
    if callable(dump):
        dumped = dump(mode="json", exclude_none=True)
        if isinstance(dumped, dict):
            return dumped
    raise TypeError(f"Unsupported body type: {_type_name(request)}")


def _query(params: Mapping[str, Any]) -> Dict[str, str]:
    return dict(_query_pairs(params))


def _use_admin(config: CyclesConfig, admin: bool | None) -> bool:
    """``admin=None`` means: use the admin key when it is the only key configured."""
    if admin is None:
        return not config.api_key and bool(config.admin_api_key)
    if admin and not config.admin_api_key:
        raise ValueError("admin_api_key: not configured")
    return bool(admin)


def _create_call(request: Any) -> _Call:
    return _Call(
        "create", "POST", RESERVATIONS_PATH, _request_body(request, ReservationCreateRequest)
    )


def _commit_call(reservation_id: str, request: Any) -> _Call:
    path = _reservation_path(reservation_id, "/commit")
    return _Call("commit", "POST", path, _request_body(request, CommitRequest))


def _release_call(
    config: CyclesConfig, reservation_id: str, request: Any, admin: bool | None
) -> _Call:
    path = _reservation_path(reservation_id, "/release")
    return _Call(
        "release",
        "POST",
        path,
        _request_body(request, ReleaseRequest),
        admin=_use_admin(config, admin),
    )


def _extend_call(reservation_id: str, request: Any) -> _Call:
    path = _reservation_path(reservation_id, "/extend")
    return _Call("extend", "POST", path, _request_body(request, ReservationExtendRequest))


def _decide_call(request: Any) -> _Call:
    return _Call("decide", "POST", DECIDE_PATH, _request_body(request, DecisionRequest))


def _event_call(request: Any) -> _Call:
    return _Call("event", "POST", EVENTS_PATH, _request_body(request, EventCreateRequest))


def _list_call(config: CyclesConfig, params: Mapping[str, Any], admin: bool | None) -> _Call:
    use_admin = _use_admin(config, admin)
    query = _query(params)
    if use_admin and not query.get("tenant"):
        raise ValueError("tenant: required when listing reservations with the admin key")
    return _Call("list", "GET", RESERVATIONS_PATH, query=query, admin=use_admin)


def _get_call(config: CyclesConfig, reservation_id: str, admin: bool | None) -> _Call:
    return _Call("get", "GET", _reservation_path(reservation_id), admin=_use_admin(config, admin))


def _balances_call(params: Mapping[str, Any]) -> _Call:
    query = _query(params)
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
) -> Tuple[List[Dict[str, Any]], Optional[_Call]]:
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
    query = call.query or {}
    more = response.get_body_attribute("has_more") is not False
    if more and isinstance(cursor, str) and cursor and cursor != query.get("cursor"):
        return [i for i in items if isinstance(i, dict)], call.with_cursor(cursor)
    return [i for i in items if isinstance(i, dict)], None


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
        if not isinstance(config, CyclesConfig):
            raise TypeError(f"config: expected a CyclesConfig, got {_type_name(config)}")
        self._config = config
        self._transport = _Transport(config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    def create_reservation(
        self, request: ReservationCreateRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_create_call(request))

    def commit_reservation(
        self, reservation_id: str, request: CommitRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_commit_call(reservation_id, request))

    def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | dict[str, Any],
        *,
        admin: bool | None = None,
    ) -> CyclesResponse:
        return self._call(_release_call(self._config, reservation_id, request, admin))

    def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest | dict[str, Any]
    ) -> CyclesResponse:
        return self._call(_extend_call(reservation_id, request))

    def decide(self, request: DecisionRequest | dict[str, Any]) -> CyclesResponse:
        return self._call(_decide_call(request))

    def list_reservations(
        self, *, admin: bool | None = None, **query_params: str
    ) -> CyclesResponse:
        return self._call(_list_call(self._config, query_params, admin))

    def get_reservation(self, reservation_id: str, *, admin: bool | None = None) -> CyclesResponse:
        return self._call(_get_call(self._config, reservation_id, admin))

    def get_balances(self, **query_params: str) -> CyclesResponse:
        return self._call(_balances_call(query_params))

    def create_event(self, request: EventCreateRequest | dict[str, Any]) -> CyclesResponse:
        return self._call(_event_call(request))

    def get_evidence(self, evidence_id: str) -> CyclesResponse:
        """``GET /v1/evidence/{id}`` (public: no key is sent). A fresh 404 may be transient."""
        return self._call(_evidence_call(evidence_id))

    def get_evidence_jwks(self) -> CyclesResponse:
        """The server's evidence signing keys (public: no key is sent)."""
        return self._call(_JWKS_CALL)

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

    def __enter__(self) -> CyclesClient:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def _pages(self, call: _Call, items_key: str) -> Iterator[dict[str, Any]]:
        next_call: Optional[_Call] = call
        while next_call is not None:
            items, next_call = _page(next_call, self._call(next_call), items_key)
            yield from items

    def _call(self, call: _Call) -> CyclesResponse:
        return self._send(
            call.operation,
            call.method,
            call.path,
            body=call.body,
            query=call.query,
            admin=call.admin,
        )

    def _send(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        admin: bool = False,
        deadline: float | None = None,
    ) -> CyclesResponse:
        """The one path of every request: build, send one attempt, read.

        Never raises for HTTP or transport errors.

        ``deadline`` is a ``time.monotonic()`` value; by default now + ``attempt_timeout``.
        """
        prepared = _build_request(
            self._config, operation, method, path, body=body, query=query, admin=admin
        )
        if self._transport.closed:
            raise RuntimeError("the client is closed")
        return _perform(self._transport, prepared, deadline)


# ---------------------------------------------------------------------------
# Async client
# ---------------------------------------------------------------------------

_ASYNC_MAX_WORKERS = 8


class AsyncCyclesClient:
    """Asynchronous Cycles client (runcycles-compatible).

    It builds and reads requests exactly like ``CyclesClient`` and runs the
    blocking send on a small thread pool it owns (created on first use, shut down
    by ``aclose``), so the event loop is never blocked.  A cancelled call stops
    waiting at once; its HTTP attempt ends by its deadline.
    """

    def __init__(self, config: CyclesConfig) -> None:
        if not isinstance(config, CyclesConfig):
            raise TypeError(f"config: expected a CyclesConfig, got {_type_name(config)}")
        self._config = config
        self._transport = _Transport(config)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    async def create_reservation(
        self, request: ReservationCreateRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_create_call(request))

    async def commit_reservation(
        self, reservation_id: str, request: CommitRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_commit_call(reservation_id, request))

    async def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | dict[str, Any],
        *,
        admin: bool | None = None,
    ) -> CyclesResponse:
        return await self._call(_release_call(self._config, reservation_id, request, admin))

    async def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest | dict[str, Any]
    ) -> CyclesResponse:
        return await self._call(_extend_call(reservation_id, request))

    async def decide(self, request: DecisionRequest | dict[str, Any]) -> CyclesResponse:
        return await self._call(_decide_call(request))

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
        return await self._call(_event_call(request))

    async def get_evidence(self, evidence_id: str) -> CyclesResponse:
        return await self._call(_evidence_call(evidence_id))

    async def get_evidence_jwks(self) -> CyclesResponse:
        return await self._call(_JWKS_CALL)

    def iter_balances(self, **filters: str) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every matching balance (see ``CyclesClient.iter_balances``)."""
        return self._pages(_balances_call(filters), "balances")

    def iter_reservations(
        self, *, admin: bool | None = None, **filters: str
    ) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every matching reservation (see ``CyclesClient.iter_balances``)."""
        return self._pages(_list_call(self._config, filters, admin), "reservations")

    async def aclose(self) -> None:
        """Close idle connections and let the worker threads exit."""
        self._transport.close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncCyclesClient:
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()

    async def _pages(self, call: _Call, items_key: str) -> AsyncIterator[dict[str, Any]]:
        next_call: Optional[_Call] = call
        while next_call is not None:
            items, next_call = _page(next_call, await self._call(next_call), items_key)
            for item in items:
                yield item

    async def _call(self, call: _Call) -> CyclesResponse:
        return await self._send(
            call.operation,
            call.method,
            call.path,
            body=call.body,
            query=call.query,
            admin=call.admin,
        )

    async def _send(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        admin: bool = False,
        deadline: float | None = None,
    ) -> CyclesResponse:
        """``CyclesClient._send`` with the blocking attempt on a worker thread."""
        import asyncio

        prepared = _build_request(
            self._config, operation, method, path, body=body, query=query, admin=admin
        )
        if self._transport.closed:
            raise RuntimeError("the client is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._io_executor(), _perform, self._transport, prepared, deadline
        )

    def _io_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(
                    _ASYNC_MAX_WORKERS, thread_name_prefix="cycles-lite-io"
                )
            return self._executor


# ---------------------------------------------------------------------------
# Guard and heartbeat
# ---------------------------------------------------------------------------

# Next issue: the reservation guard (``with client.reserve(...)``) and its heartbeat.


# ---------------------------------------------------------------------------
# Settlement and journal
# ---------------------------------------------------------------------------

# Next issue: commit/event settlement (exactly once), the retry worker and the journal.


# ---------------------------------------------------------------------------
# Decorator
# ---------------------------------------------------------------------------

# Next issue: ``@cycles``, ``set_default_client``/``set_default_config``, ``get_cycles_context``.


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

EXIT_OK = 0
EXIT_API_ERROR = 1  # the server answered with an error or a denial
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_TRANSPORT = 3  # no answer: connection, TLS or timeout failure

_CLI_EPILOG = """\
configuration comes from the environment:
  CYCLES_BASE_URL (required), CYCLES_API_KEY and/or CYCLES_ADMIN_API_KEY,
  CYCLES_TENANT (default subject filter), CYCLES_CONNECT_TIMEOUT, CYCLES_READ_TIMEOUT,
  CYCLES_REQUEST_TIMEOUT, CYCLES_CA_BUNDLE, CYCLES_PROXY, ...

exit codes: 0 ok, 1 API error or denial, 2 usage or configuration error, 3 transport error
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cycles_lite``: check, balances, reservations, reservation ID, release ID."""
    import argparse

    parser = _cli_parser(argparse)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error argparse has printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        config = CyclesConfig.from_env()
    except ValueError as exc:
        _cli_error(f"configuration error: {exc}")
        return EXIT_USAGE
    try:
        with CyclesClient(config) as client:
            return int(args.run(client, config, args))
    except ValueError as exc:
        _cli_error(str(exc))
        return EXIT_USAGE
    except CyclesProtocolError as exc:  # a failed page while following cursors
        _cli_error(str(exc))
        return EXIT_TRANSPORT if exc.status == -1 else EXIT_API_ERROR


def _cli_parser(argparse: Any) -> Any:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table"
    )
    parser = argparse.ArgumentParser(
        prog="python -m cycles_lite",
        description="Inspect a Cycles server (connectivity, balances, reservations)"
        " and release stuck reservations.",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cycles-lite {__version__}")
    parser.add_argument(
        "--json", action="store_true", default=False, help="print JSON, not a table"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser(
        "check", parents=[common], help="check config, connectivity, auth and tenant"
    )
    check.add_argument(
        "--tenant", help="tenant to probe with an admin-only key (default: CYCLES_TENANT)"
    )
    check.set_defaults(run=_cli_check)

    balances = commands.add_parser(
        "balances", parents=[common], help="show balances (default: CYCLES_TENANT)"
    )
    _add_subject_filters(balances)
    balances.add_argument("--limit", type=int)
    balances.add_argument("--cursor")
    balances.add_argument("--all", action="store_true", help="follow cursors to the end")
    balances.set_defaults(run=_cli_balances)

    listing = commands.add_parser("reservations", parents=[common], help="list reservations")
    _add_subject_filters(listing)
    listing.add_argument("--status", help="ACTIVE, COMMITTED, RELEASED or EXPIRED")
    listing.add_argument("--idempotency-key")
    listing.add_argument("--sort-by")
    listing.add_argument("--sort-dir", choices=["asc", "desc"])
    listing.add_argument("--limit", type=int)
    listing.add_argument("--cursor")
    listing.add_argument("--all", action="store_true", help="follow cursors to the end")
    listing.add_argument(
        "--admin", action="store_true", help="use CYCLES_ADMIN_API_KEY (needs a tenant)"
    )
    listing.set_defaults(run=_cli_reservations)

    show = commands.add_parser("reservation", parents=[common], help="show one reservation")
    show.add_argument("reservation_id", metavar="ID")
    show.add_argument("--admin", action="store_true", help="use CYCLES_ADMIN_API_KEY")
    show.set_defaults(run=_cli_reservation)

    release = commands.add_parser("release", parents=[common], help="release a (stuck) reservation")
    release.add_argument("reservation_id", metavar="ID")
    release.add_argument("--reason", help="e.g. '[INCIDENT_FORCE_RELEASE] stuck worker'")
    release.add_argument("--idempotency-key", help="default: a fresh key")
    release.add_argument("--admin", action="store_true", help="use CYCLES_ADMIN_API_KEY")
    release.set_defaults(run=_cli_release)
    return parser


def _add_subject_filters(parser: Any) -> None:
    for name in SUBJECT_FIELDS:
        parser.add_argument("--" + name)


def _cli_error(message: str) -> None:
    print(f"cycles-lite: {message}", file=sys.stderr)


def _cli_failed(response: CyclesResponse, what: str, print_body: bool) -> int:
    """Report an unsuccessful response; the exit code says whether the server answered."""
    if response.is_transport_error:
        _cli_error(f"{what}: no answer from the server: {response.error_message}")
        return EXIT_TRANSPORT
    code = _str_or_none(response.get_body_attribute("error"))
    code_text = " " + code if code else ""
    detail = f"HTTP {response.status}{code_text}: {response.error_message}"
    if response.request_id:
        detail += f" (request id {response.request_id})"
    _cli_error(f"{what} failed: {_cli_cell(detail)}")
    if print_body and response.body is not None:
        _cli_json(response.body)
    return EXIT_API_ERROR


def _cli_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


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


def _cli_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    for line in [list(headers)] + [list(r) for r in rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _cli_filters(args: Any, names: Sequence[str]) -> Dict[str, Any]:
    values = {name: getattr(args, name, None) for name in names}
    return {name.replace("-", "_"): value for name, value in values.items() if value is not None}


def _cli_check(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    tenant = args.tenant or config.tenant
    admin_only = not config.api_key
    if admin_only and not tenant:
        _cli_error("check: with only CYCLES_ADMIN_API_KEY set, give --tenant or CYCLES_TENANT")
        return EXIT_USAGE
    started = time.monotonic()
    if admin_only:
        response = client.list_reservations(admin=True, tenant=tenant or "", limit="1")
    else:
        response = client.list_reservations(admin=False, limit="1")
    elapsed_ms = int((time.monotonic() - started) * 1000)
    report = {
        "base_url": config.base_url,
        "api_key": "set" if config.api_key else "not set",
        "admin_api_key": "set" if config.admin_api_key else "not set",
        "auth": "admin key" if admin_only else "api key",
        "ok": response.is_success,
        "status": response.status,
        "latency_ms": elapsed_ms,
        "tenant": response.cycles_tenant or (tenant if admin_only else None),
        "trace_id": response.trace_id,
    }
    if args.json:
        _cli_json(report)
    else:
        _cli_table(["CHECK", "RESULT"], [[k, _cli_cell(v)] for k, v in report.items()])
    if not response.is_success:
        return _cli_failed(response, "check", print_body=False)  # the report is the output
    return EXIT_OK


def _cli_balances(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    filters = _cli_filters(args, SUBJECT_FIELDS)
    if not filters and config.tenant:
        filters["tenant"] = config.tenant
    if not filters:
        _cli_error("balances: give a subject filter such as --tenant, or set CYCLES_TENANT")
        return EXIT_USAGE
    filters.update(_cli_filters(args, ("limit", "cursor")))
    if args.all:
        body: Dict[str, Any] = {"balances": list(client.iter_balances(**filters))}
    else:
        response = client.get_balances(**filters)
        if not response.is_success:
            return _cli_failed(response, "balances", args.json)
        body = response.body or {}
    if args.json:
        _cli_json(body)
        return EXIT_OK
    rows = []
    for item in body.get("balances") or []:
        if not isinstance(item, dict):
            continue
        remaining = item.get("remaining")
        rows.append(
            [
                _cli_cell(item.get("scope_path") or item.get("scope")),
                _cli_cell(remaining.get("unit") if isinstance(remaining, dict) else ""),
                _cli_amount(remaining),
                _cli_amount(item.get("reserved")),
                _cli_amount(item.get("spent")),
                _cli_amount(item.get("allocated")),
                _cli_amount(item.get("debt")),
                "yes" if item.get("is_over_limit") else "",
            ]
        )
    _cli_table(
        ["SCOPE", "UNIT", "REMAINING", "RESERVED", "SPENT", "ALLOCATED", "DEBT", "OVER LIMIT"], rows
    )
    _cli_more(body)
    return EXIT_OK


def _cli_more(body: Mapping[str, Any]) -> None:
    cursor = body.get("next_cursor")
    if body.get("has_more") and isinstance(cursor, str):
        print(f"(more: --cursor {_cli_cell(cursor)}, or --all)", file=sys.stderr)


def _cli_reservations(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    filters = _cli_filters(
        args, (*SUBJECT_FIELDS, "status", "idempotency_key", "sort_by", "sort_dir")
    )
    filters.update(_cli_filters(args, ("limit", "cursor")))
    admin = True if args.admin else None
    if (args.admin or not config.api_key) and "tenant" not in filters and config.tenant:
        filters["tenant"] = config.tenant
    if args.all:
        body: Dict[str, Any] = {
            "reservations": list(client.iter_reservations(admin=admin, **filters))
        }
    else:
        response = client.list_reservations(admin=admin, **filters)
        if not response.is_success:
            return _cli_failed(response, "reservations", args.json)
        body = response.body or {}
    if args.json:
        _cli_json(body)
        return EXIT_OK
    rows = [
        [
            _cli_cell(item.get("reservation_id")),
            _cli_cell(item.get("status")),
            _cli_cell(item.get("scope_path")),
            _cli_amount(item.get("reserved"), with_unit=True),
            _cli_time(item.get("created_at_ms")),
            _cli_time(item.get("expires_at_ms")),
        ]
        for item in body.get("reservations") or []
        if isinstance(item, dict)
    ]
    _cli_table(["ID", "STATUS", "SCOPE", "RESERVED", "CREATED", "EXPIRES"], rows)
    _cli_more(body)
    return EXIT_OK


def _cli_reservation(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    response = client.get_reservation(args.reservation_id, admin=True if args.admin else None)
    if not response.is_success:
        return _cli_failed(response, "reservation", args.json)
    body = response.body or {}
    if args.json:
        _cli_json(body)
        return EXIT_OK
    rows = []
    for key, value in body.items():
        if isinstance(value, dict) and "amount" in value:
            text = _cli_amount(value, with_unit=True)
        elif key.endswith("_at_ms"):
            text = f"{_cli_time(value)} ({value})"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, sort_keys=True)
        else:
            text = value
        rows.append([_cli_cell(key), _cli_cell(text)])
    _cli_table(["FIELD", "VALUE"], rows)
    return EXIT_OK


def _cli_release(client: CyclesClient, config: CyclesConfig, args: Any) -> int:
    request: Dict[str, Any] = {"idempotency_key": args.idempotency_key or _new_key()}
    if args.reason:
        request["reason"] = args.reason
    ReleaseRequest.model_validate(request)  # the same checks as the model: a clear ValueError
    response = client.release_reservation(
        args.reservation_id, request, admin=True if args.admin else None
    )
    if not response.is_success:
        return _cli_failed(response, "release", args.json)
    body = response.body or {}
    if args.json:
        _cli_json(body)
    else:
        released = _cli_amount(body.get("released"), with_unit=True) or "nothing"
        print(f"released {released} from {_cli_cell(args.reservation_id)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
