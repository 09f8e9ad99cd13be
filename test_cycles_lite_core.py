"""Issue 12 (lean core): one heartbeat thread for the process, declarations said once.

Real HTTP to ``cycles_lite_server``; nothing mocked but ``threading.Thread.start``
(counted, still called).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import os
import re
import threading
import typing
import unittest
import warnings
from typing import Any, List
from unittest import mock

import cycles_lite as cl
from cycles_lite import CyclesClient, CyclesConfig
from cycles_lite_server import LocalCyclesServer
from test_cycles_lite import VIRTUAL_CLOCK

API_KEY = "core-key"
TENANT = "acme"


class _ServerCase(unittest.TestCase):
    srv: LocalCyclesServer

    def run(self, result: Any = None) -> Any:
        # A guard entered and never exited keeps its context in this test's copy only.
        return contextvars.copy_context().run(super().run, result)

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = LocalCyclesServer(
            api_keys={API_KEY: TENANT},
            tenants={TENANT: "ACTIVE"},
            budgets=[{"scope": f"tenant:{TENANT}", "unit": "USD_MICROCENTS", "allocated": 10**12}],
        ).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def new_client(self, **options: Any) -> CyclesClient:
        config = CyclesConfig(
            base_url=self.srv.url, api_key=API_KEY, tenant=TENANT, journal_enabled=False, **options
        )
        client = CyclesClient(config)
        self.addCleanup(client.close)
        return client


def _count_thread_starts(test: unittest.TestCase) -> List[str]:
    started: List[str] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        real_start(thread)

    patcher = mock.patch.object(threading.Thread, "start", counting_start)
    patcher.start()
    test.addCleanup(patcher.stop)
    return started


class TestHeartbeatScheduler(_ServerCase):
    def test_guarded_calls_in_a_stream_start_no_thread(self) -> None:
        client = self.new_client()

        @cl.cycles(estimate=10, actual=5, action_kind="llm.completion", action_name="m",
                   agent="a", client=client)
        def guarded(i: int) -> int:
            return i

        guarded(0)  # the scheduler thread starts with the first heartbeat
        started = _count_thread_starts(self)
        self.assertEqual([guarded(i) for i in range(1, 30)], list(range(1, 30)))
        self.assertEqual(started, [])

    def test_one_scheduler_thread_serves_every_live_reservation(self) -> None:
        client = self.new_client()
        guards = [client.reserve(estimate=10, action_kind="k", action_name="n", agent=f"a{i}")
                  for i in range(5)]
        for guard in guards:
            guard.__enter__()
        try:
            names = [t.name for t in threading.enumerate()]
            self.assertEqual(names.count("cycles-lite-heartbeat"), 1)
        finally:
            for guard in guards:
                guard.__exit__(None, None, None)
        self.assertTrue(VIRTUAL_CLOCK.advance_until(lambda: cl._heartbeats._threads == 0,
                                                    within=5.0))
        self.assertNotIn("cycles-lite-heartbeat", [t.name for t in threading.enumerate()])

    @unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
    def test_a_forked_child_starts_its_own_scheduler(self) -> None:
        client = self.new_client()
        with client.reserve(estimate=10, action_kind="k", action_name="n", agent="parent"):
            read_end, write_end = os.pipe()
            with warnings.catch_warnings():  # 3.12+: fork() of a multi-threaded process
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through the pipe
                ok = cl._heartbeats._threads == 0 and not cl._heartbeats._heap
                os.write(write_end, b"1" if ok else b"0")
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                self.assertEqual(pipe.read(), b"1")
            os.waitpid(pid, 0)


class TestOneClock(_ServerCase):
    """Every time the client measures is read from ``_clock``: the commit's latency too."""

    def test_the_commit_latency_is_measured_on_the_client_clock(self) -> None:
        client = self.new_client()

        @cl.cycles(estimate=10, actual=5, agent="clock", client=client)
        def guarded() -> None:
            VIRTUAL_CLOCK.advance(2.0, self.srv)  # the work takes two seconds

        self.srv.clear_requests()
        guarded()
        latency_ms = self.srv.requests_for("commit")[-1].body["metrics"]["latency_ms"]
        self.assertGreaterEqual(latency_ms, 2000)
        self.assertLess(latency_ms, 60_000)


class TestDeclarations(unittest.TestCase):
    def test_every_model_field_is_declared_with_its_check(self) -> None:
        models = [
            obj for obj in vars(cl).values()
            if isinstance(obj, type) and issubclass(obj, cl._Model) and obj._fields
        ]
        self.assertGreater(len(models), 25)
        for model in models:
            with self.subTest(model=model.__name__):
                # Every annotated field has its check (repr, dump and parse see each), and
                # exactly the fields whose type admits None may be omitted.
                hints = typing.get_type_hints(model)
                names = {name for name in hints if name != "extra" and not name.startswith("_")}
                self.assertEqual(set(model._fields), names)
                required = {n for n in names if type(None) not in typing.get_args(hints[n])}
                self.assertEqual(set(model._required), required)
                self.assertEqual(list(model._required), [n for n in model._fields if n in required])
                if required:
                    with self.assertRaisesRegex(ValueError, "field required"):
                        model(**{n: None for n in model._fields})
                # inspect.signature shows the constructor's keywords, as pydantic's would.
                parameters = inspect.signature(model).parameters.values()
                self.assertEqual([p.name for p in parameters], list(model._fields))
                self.assertEqual({p.name for p in parameters if p.default is p.empty}, required)
                self.assertEqual({p.kind for p in parameters}, {inspect.Parameter.KEYWORD_ONLY})

    def test_success_schemas_name_fields_of_their_models(self) -> None:
        for operation, (_, model, read, pinned) in cl._SUCCESS_ANSWERS.items():
            with self.subTest(operation=operation):
                self.assertLessEqual({*read, *pinned}, set(model._fields))
                # A pinned value is a required field's: a parse holds it, or fails.
                self.assertLessEqual(set(pinned), set(model._required))

    def test_every_setting_has_a_check_and_reads_its_own_variable(self) -> None:
        environ = {"CYCLES_BASE_URL": "http://localhost:1", "CYCLES_API_KEY": "k"}
        for setting in dataclasses.fields(CyclesConfig):
            self.assertTrue(callable(setting.metadata["check"]), setting.name)
        self.assertEqual(
            [s.name for s in dataclasses.fields(CyclesConfig) if s.metadata["env"] is None],
            ["ssl_context"],
        )
        config = CyclesConfig.from_env(environ=dict(environ, CYCLES_POOL_MAXSIZE="7"))
        self.assertEqual((config.base_url, config.api_key, config.pool_maxsize),
                         ("http://localhost:1", "k", 7))


class TestRecordsStayDataclasses(unittest.TestCase):
    """The records made by ``_shared_dataclass`` behave as ``@dataclass`` made them, for
    a user's subclass too (review of issue 12)."""

    def test_a_users_frozen_subclass_of_a_frozen_record(self) -> None:
        @dataclasses.dataclass(frozen=True)
        class TaggedFlush(cl.FlushResult):
            tag: str = ""

        result = TaggedFlush(1, 2, 3, "nightly")
        self.assertEqual((result.settled, result.given_up, result.tag), (1, 3, "nightly"))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            result.settled = 5  # type: ignore[misc]
        with self.assertRaisesRegex(TypeError, "non-frozen"):
            @dataclasses.dataclass
            class Mutable(cl.EvidenceVerification):  # as @dataclass(frozen=True) refuses it
                note: str = ""

    def test_a_subclass_repr_names_the_subclass(self) -> None:
        class NightlyFlush(cl.FlushResult):
            pass

        class MyResponse(cl.CyclesResponse):
            pass

        self.assertEqual(repr(NightlyFlush(1, 2, 3)),  # as @dataclass writes it
                         f"{NightlyFlush.__qualname__}(settled=1, pending=2, given_up=3)")
        self.assertTrue(repr(MyResponse(status=200)).startswith(
            f"{MyResponse.__qualname__}(status=200,"))


class TestModuleLayout(unittest.TestCase):
    def test_the_docstring_contents_mirror_the_section_banners(self) -> None:
        with open(cl.__file__, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        banners = [
            (0 if rule.startswith("# ===") else 1, title[2:].strip())
            for rule, title in zip(lines, lines[1:])
            if rule.startswith(("# =====", "# -----")) and title.startswith("# ")
        ]
        doc = (cl.__doc__ or "").split("Contents", 1)[1].splitlines()[2:]
        contents = [
            ((len(line) - len(line.lstrip())) // 4 - 1, re.split(r"\s{2,}", line.strip())[0])
            for line in doc
            if line.strip()
        ]
        self.assertEqual(len(contents), len(banners), (contents, banners))
        for (depth, entry), (banner_depth, banner) in zip(contents, banners):
            self.assertEqual(depth, banner_depth, entry)
            self.assertTrue(banner.startswith(entry), (entry, banner))



if __name__ == "__main__":
    unittest.main()


def _answer_table() -> List[typing.Tuple[str, cl.CyclesResponse, bool]]:
    """Answers to judge, each with the schema verdict it must get: is it the operation's
    expected success answer (the lifecycle resends, and settlement retries, on the others)?"""
    amount = {"unit": "TOKENS", "amount": 5}
    balance = {"scope": "tenant:a", "scope_path": "tenant:a",
               "remaining": {"unit": "TOKENS", "amount": -3}, "reserved": amount}
    created = {"decision": "ALLOW", "reservation_id": "r-1", "affected_scopes": ["tenant:a"],
               "expires_at_ms": 10, "remaining_ttl_ms": 60_000, "scope_path": "tenant:a",
               "reserved": amount, "balances": [balance]}
    committed = {"status": "COMMITTED", "charged": amount, "released": amount,
                 "balances": [balance]}
    extended = {"status": "ACTIVE", "expires_at_ms": 10, "remaining_ttl_ms": 5}
    bad_uri = {"evidence_id": "a" * 64, "cycles_evidence_url": "http://["}
    rows = [  # operation, status, changes to its base body (None: the field left out), verdict
        ("create", 200, {}, True),
        ("create", 200, {"brand_new": [1], "caps": {"max_tokens": 5}}, True),
        ("create", 200, {"decision": "ALLOW_WITH_CAPS"}, True),
        ("create", 200, {"decision": "DENY", "reservation_id": None}, True),
        ("create", 200, {"reservation_id": None, "expires_at_ms": None}, True),
        ("create", 200, {"decision": "MAYBE"}, False),
        ("create", 200, {"decision": 1}, False),
        ("create", 200, {"decision": None}, False),
        ("create", 200, {"affected_scopes": None}, False),
        ("create", 200, {"affected_scopes": "tenant:a"}, False),
        ("create", 200, {"affected_scopes": ["tenant:a", 7]}, False),
        ("create", 200, {"affected_scopes": []}, True),
        ("create", 200, {"reservation_id": ""}, False),
        ("create", 200, {"reservation_id": 5}, False),
        ("create", 200, {"expires_at_ms": "10"}, False),
        ("create", 200, {"expires_at_ms": -1}, False),
        ("create", 200, {"expires_at_ms": True}, False),
        ("create", 200, {"expires_at_ms": 2**63}, False),
        ("create", 200, {"remaining_ttl_ms": 1.5}, False),
        ("create", 200, {"reserved": {"unit": "TOKENS"}}, True),  # optional, not read
        ("create", 200, {"balances": [dict(balance, remaining=None)]}, True),
        ("create", 200, {"balances": "none"}, True),
        ("create", 200, {"caps": []}, True),
        ("create", 200, {"scope_path": 5}, True),
        ("create", 200, {"cycles_evidence": bad_uri}, True),
        ("create", 201, {}, False),
        ("create", 500, {}, False),
        ("commit", 200, {}, True),
        ("commit", 200, {"balances": None, "brand_new": 1}, True),
        ("commit", 200, {"released": {"amount": 1}, "balances": [{}]}, True),
        ("commit", 200, {"charged": None}, False),
        ("commit", 200, {"charged": {"unit": "TOKENS", "amount": True}}, False),
        ("commit", 200, {"charged": {"unit": 3, "amount": 1}}, False),
        ("commit", 200, {"charged": [amount]}, False),
        ("commit", 200, {"status": "WEIRD"}, False),
        ("commit", 200, {"status": "RELEASED"}, False),
        ("commit", 200, {"status": None}, False),
        ("commit", 202, {}, False),
        ("release", 200, {"status": "RELEASED", "released": amount}, True),
        ("release", 200, {"status": "RELEASED"}, False),
        ("release", 200, {"status": "COMMITTED"}, False),
        ("extend", 200, {}, True),
        ("extend", 200, {"remaining_ttl_ms": None}, True),
        ("extend", 200, {"remaining_ttl_ms": -1}, False),
        ("extend", 200, {"expires_at_ms": "10"}, False),
        ("extend", 200, {"status": "EXPIRED"}, False),
        ("event", 201, {"status": "APPLIED", "event_id": "e"}, True),
        ("event", 201, {"status": "APPLIED", "event_id": "e", "charged": {"unit": "X"}}, True),
        ("event", 201, {"status": "APPLIED", "event_id": 7}, False),
        ("event", 200, {"status": "APPLIED", "event_id": "e"}, False),
        ("event", 201, {"status": "applied"}, False),
        ("nonsense", 200, {}, False),
    ]
    bases = {"create": created, "commit": committed, "extend": extended}
    table = []
    for operation, status, change, verdict in rows:
        body = {key: value for key, value in dict(bases.get(operation, {}), **change).items()
                if value is not None}
        table.append((operation, cl.CyclesResponse(status=status, body=body), verdict))
    for operation in ("create", "commit", "extend"):  # not an object, or no answer at all
        for body in (None, [created], "created"):
            table.append((operation, cl.CyclesResponse(status=200, body=body), False))
        table.append((operation, cl.CyclesResponse.transport_error(OSError("reset")), False))
    return table


class TestSchemaVerdict(unittest.TestCase):
    """The create answer is judged and parsed in one pass (``_success_answer``); settlement
    judges without parsing (``_is_schema_valid``).  Both give every answer the same verdict."""

    def test_each_answer_gets_its_verdict(self) -> None:
        for operation, response, verdict in _answer_table():
            with self.subTest(operation=operation, status=response.status, body=response.body):
                self.assertIs(cl._is_schema_valid(operation, response), verdict)

    def test_one_pass_gives_the_same_verdict_and_the_models_parse(self) -> None:
        for operation, response, verdict in _answer_table():
            with self.subTest(operation=operation, status=response.status, body=response.body):
                parsed = cl._success_answer(operation, response)
                self.assertIs(parsed is not None, verdict)
                if parsed is not None:
                    model = cl._SUCCESS_ANSWERS[operation][1]
                    self.assertEqual(parsed, model.model_validate(response.body))

    def test_a_uri_that_urlsplit_refuses_is_an_invalid_field(self) -> None:
        with self.assertRaisesRegex(cl.InvalidFieldError, "^cycles_evidence_url: must be an abs"):
            cl.CyclesEvidenceRef(evidence_id="a" * 64, cycles_evidence_url="http://[")
