# Copyright 2026 the cycles-lite authors
# SPDX-License-Identifier: Apache-2.0
"""The local server under hostile or careless input, over real HTTP: numbers
JSON cannot carry, lone surrogates, evidence signing inside the ledger change,
requests cut before their headers end, forged log lines, command-line values
out of range, --state that cannot be written, key prefixes, the admin key from
the environment, and a few admin-spec points.

Run: python3 -W error -m unittest test_cycles_lite_server_hardening -v
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
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

KEY = "key-acme-0123456789abcdef"
ADMIN_KEY = "admin-secret-0123456789"
USD = "USD_MICROCENTS"
HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "cycles_lite_server.py")

Response = Tuple[int, Any]


def amount(value: int, unit: str = USD) -> Dict[str, Any]:
    return {"unit": unit, "amount": value}


def reserve_body(key: str, estimate: int = 100, metadata: str = "") -> bytes:
    """A createReservation body; ``metadata`` is spliced in as raw JSON text."""
    extra = f',"metadata":{metadata}' if metadata else ""
    return (f'{{"idempotency_key":"{key}","subject":{{"tenant":"acme"}},'
            f'"action":{{"kind":"llm","name":"chat"}},'
            f'"estimate":{{"unit":"{USD}","amount":{estimate}}}{extra}}}').encode()


def commit_body(key: str, actual: int = 70, metadata: str = "") -> bytes:
    extra = f',"metadata":{metadata}' if metadata else ""
    return (f'{{"idempotency_key":"{key}",'
            f'"actual":{{"unit":"{USD}","amount":{actual}}}{extra}}}').encode()


def call(srv: LocalCyclesServer, method: str, path: str, raw: Optional[bytes] = None, *,
         key: Optional[str] = KEY, admin: Optional[str] = None) -> Response:
    """One request on a fresh connection: (status, parsed body)."""
    headers: Dict[str, str] = {}
    if key is not None:
        headers["X-Cycles-API-Key"] = key
    if admin is not None:
        headers["X-Admin-API-Key"] = admin
    if raw is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=raw, headers=headers)
        data = conn.getresponse()
        status, text = data.status, data.read()
        return status, json.loads(text) if text else None  # strict: no Infinity
    finally:
        conn.close()


def admin(srv: LocalCyclesServer, method: str, path: str, body: Any = None) -> Response:
    raw = json.dumps(body).encode() if body is not None else None
    return call(srv, method, path, raw, key=None, admin=ADMIN_KEY)


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


class ServerCase(unittest.TestCase):
    evidence = False
    settings: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.log = io.StringIO()
        self.srv = LocalCyclesServer(
            api_keys={KEY: "acme"}, admin_keys=[ADMIN_KEY], evidence=self.evidence,
            budgets=[{"scope": "tenant:acme", "unit": USD, "allocated": 1_000_000}],
            log_stream=self.log, **self.settings,
        ).start()
        self.addCleanup(self.srv.stop)

    def assertError(self, response: Response, status: int, code: str, words: str = "") -> None:
        self.assertEqual((response[0], response[1]["error"]), (status, code), response)
        self.assertIn(words, response[1]["message"])

    def reserved(self) -> int:
        return int(self.srv.balance("tenant:acme")["reserved"])

    def spent(self) -> int:
        return int(self.srv.balance("tenant:acme")["spent"])

    def reservation_ids(self) -> List[str]:
        rows = call(self.srv, "GET", "/v1/reservations")[1]["reservations"]
        return [row["reservation_id"] for row in rows]

    def reserve(self, key: str, estimate: int = 100) -> str:
        status, body = call(self.srv, "POST", "/v1/reservations", reserve_body(key, estimate))
        self.assertEqual(status, 200, body)
        return str(body["reservation_id"])


# =============================================================================
# 1. Numbers JSON cannot carry; evidence signing inside the ledger change
# =============================================================================


class TestNonFiniteNumbers(ServerCase):
    evidence = True
    out_of_range = ("1e400", "-1e400", "1e999", "1" + "0" * 400)

    def test_an_out_of_range_number_is_400_and_changes_nothing(self) -> None:
        for index, number in enumerate(self.out_of_range):
            response = call(self.srv, "POST", "/v1/reservations",
                            reserve_body(f"r{index}", 100, f'{{"f":{number}}}'))
            self.assertError(response, 400, "INVALID_REQUEST", "out of range")
        self.assertEqual((self.reserved(), self.reservation_ids()), (0, []))
        rid = self.reserve("ok")
        for number in self.out_of_range:
            response = call(self.srv, "POST", f"/v1/reservations/{rid}/commit",
                            commit_body("c", 70, f'{{"x":{number}}}'))
            self.assertError(response, 400, "INVALID_REQUEST", "out of range")
        self.assertEqual(self.srv.reservation(rid)["status"], "ACTIVE")
        status, body = call(self.srv, "POST", f"/v1/reservations/{rid}/commit",
                            commit_body("c", 70, '{"x":1e300}'))
        self.assertEqual((status, body["status"], self.spent()), (200, "COMMITTED", 70))
        self.srv.check_invariants()

    def test_nan_and_infinity_literals_are_400(self) -> None:
        for literal in ("NaN", "Infinity", "-Infinity"):
            response = call(self.srv, "POST", "/v1/reservations",
                            reserve_body("r", 100, f'{{"f":{literal}}}'))
            self.assertError(response, 400, "INVALID_REQUEST")
        self.assertEqual(self.reserved(), 0)


class TestNonFiniteNumbersWithoutEvidence(TestNonFiniteNumbers):
    evidence = False

    def test_a_reservation_read_back_is_valid_json(self) -> None:
        rid = self.reserve("r")
        status, body = call(self.srv, "GET", f"/v1/reservations/{rid}")  # json.loads: strict
        self.assertEqual((status, body["status"]), (200, "ACTIVE"))


class TestSigningIsPartOfTheChange(ServerCase):
    evidence = True

    def failing_sign(self) -> Any:
        """The next envelope fails to sign (once), as a bug in signing would."""
        real = cycles_lite_server._EvidenceLog._sign
        calls: List[int] = []

        def sign(log: Any, *args: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("signing failed")
            return real(log, *args)

        return mock.patch.object(cycles_lite_server._EvidenceLog, "_sign", sign)

    def test_a_failed_signature_leaves_the_ledger_unchanged_and_a_retry_charges_once(
        self,
    ) -> None:
        with self.failing_sign():
            status, _ = call(self.srv, "POST", "/v1/reservations", reserve_body("r1", 300))
        self.assertEqual(status, 500)
        self.assertEqual((self.reserved(), self.reservation_ids()), (0, []))
        rid = self.reserve("r1", 300)  # the same key: applied now, once
        self.assertEqual((self.reserved(), self.reservation_ids()), (300, [rid]))
        with self.failing_sign():
            status, _ = call(self.srv, "POST", f"/v1/reservations/{rid}/commit",
                             commit_body("c1", 200))
        self.assertEqual(status, 500)
        self.assertEqual((self.srv.reservation(rid)["status"], self.spent(), self.reserved()),
                         ("ACTIVE", 0, 300))
        for _ in range(2):  # the retry applies, its replay answers the same
            status, body = call(self.srv, "POST", f"/v1/reservations/{rid}/commit",
                                commit_body("c1", 200))
            self.assertEqual((status, body["charged"]["amount"]), (200, 200))
            self.assertIn("cycles_evidence", body)
        self.assertEqual((self.spent(), self.reserved()), (200, 0))
        self.srv.check_invariants()

    def test_a_failed_signature_on_release_and_decide_changes_nothing(self) -> None:
        rid = self.reserve("r1", 300)
        release = b'{"idempotency_key":"rel"}'
        with self.failing_sign():
            status, _ = call(self.srv, "POST", f"/v1/reservations/{rid}/release", release)
        self.assertEqual((status, self.reserved()), (500, 300))
        status, body = call(self.srv, "POST", f"/v1/reservations/{rid}/release", release)
        self.assertEqual((status, body["status"], self.reserved()), (200, "RELEASED", 0))
        decide = reserve_body("d1", 10)
        with self.failing_sign():
            self.assertEqual(call(self.srv, "POST", "/v1/decide", decide)[0], 500)
        status, body = call(self.srv, "POST", "/v1/decide", decide)
        self.assertEqual((status, body["decision"]), (200, "ALLOW"))
        self.assertIn("cycles_evidence", body)


# =============================================================================
# 2. Lone surrogates; the internal-error log line
# =============================================================================


class TestLoneSurrogates(ServerCase):
    evidence = True

    def test_a_lone_surrogate_anywhere_is_400(self) -> None:
        for body in (reserve_body("\\ud800"), reserve_body("r", 100, '{"a":"x\\udfff"}'),
                     reserve_body("r", 100, '{"\\ud800":"x"}')):
            self.assertError(call(self.srv, "POST", "/v1/reservations", body), 400,
                             "INVALID_REQUEST", "lone UTF-16 surrogate")
        self.assertEqual(self.reserved(), 0)
        tenant = b'{"tenant_id":"beta","name":"B\\udc00"}'
        self.assertError(call(self.srv, "POST", "/v1/admin/tenants", tenant, key=None,
                              admin=ADMIN_KEY), 400, "INVALID_REQUEST", "surrogate")

    def test_a_surrogate_pair_is_a_character(self) -> None:
        status, body = call(self.srv, "POST", "/v1/reservations",
                            reserve_body("r", 100, '{"emoji":"\\ud83d\\ude00"}'))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.srv.reservation(body["reservation_id"])["metadata"],
                         {"emoji": "\U0001f600"})

    def test_an_internal_error_log_line_is_capped(self) -> None:
        boom = RuntimeError("x" * 100_000)
        with mock.patch.object(cycles_lite_server._EvidenceLog, "_sign", side_effect=boom):
            status, _ = call(self.srv, "POST", "/v1/reservations", reserve_body("r"))
        self.assertEqual(status, 500)
        lines = [line for line in self.log.getvalue().splitlines() if "internal error" in line]
        self.assertEqual(len(lines), 1)
        self.assertLess(len(lines[0]), 1000)


# =============================================================================
# 3. A request cut before its headers end is never run
# =============================================================================


class TestCutRequests(ServerCase):
    settings = {"read_timeout_s": 0.3}
    freeze = (b"POST /v1/admin/budgets/freeze?scope=tenant:acme&unit=USD_MICROCENTS "
              b"HTTP/1.1\r\nX-Admin-API-Key: " + ADMIN_KEY.encode() + b"\r\n")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.srv.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def assert_not_run(self, data: bytes, drops: int = 1) -> None:
        self.assertEqual(data, b"")
        deadline = time.monotonic() + 10  # the handler thread logs after the close
        while self.log.getvalue().count("dropped") < drops and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.log.getvalue().count("dropped: its headers were cut short"),
                         drops, self.log.getvalue())
        self.assertEqual(self.srv.balance("tenant:acme")["status"], "ACTIVE")
        self.assertEqual(self.srv.requests_for("admin"), [])

    def test_headers_cut_by_the_read_timeout_are_not_run(self) -> None:
        sock = self.connect()
        sock.sendall(self.freeze + b"X-Partial: tru")
        self.assert_not_run(read_all(sock))  # the server closes it after the read timeout

    def test_headers_cut_by_a_half_close_are_not_run(self) -> None:
        for drops, cut in enumerate((b"X-Partial: tru", b""), 1):
            sock = self.connect()
            sock.sendall(self.freeze + cut)
            sock.shutdown(socket.SHUT_WR)
            self.assert_not_run(read_all(sock), drops)

    def test_complete_headers_still_run(self) -> None:
        sock = self.connect()
        sock.sendall(self.freeze + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(read_all(sock).startswith(b"HTTP/1.1 200"))
        self.assertEqual(self.srv.balance("tenant:acme")["status"], "FROZEN")


# =============================================================================
# 4. Nothing from a request can forge a log line
# =============================================================================


class TestLogLines(ServerCase):
    def test_control_characters_from_a_request_are_escaped(self) -> None:
        self.assertEqual(call(self.srv, "GET", "/v1/reservations/a%0d%0aFAKE-LINE%00x")[0], 404)
        bad_unit = b'{"idempotency_key":"k","subject":{"tenant":"acme"},' \
                   b'"action":{"kind":"llm","name":"chat"},' \
                   b'"estimate":{"unit":"X\\nFAKE-LINE","amount":5}}'
        self.assertEqual(call(self.srv, "POST", "/v1/reservations", bad_unit)[0], 400)
        text = self.log.getvalue()
        self.assertNotIn("\x00", text)
        self.assertNotIn("\r", text)
        lines = text.splitlines()
        self.assertEqual(len(lines), 2, lines)
        for line in lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
        self.assertIn("reservation=a\\r\\nFAKE-LINE\\x00x", lines[0])
        self.assertIn("estimate=5 X\\nFAKE-LINE", lines[1])


# =============================================================================
# 5-8. Command line: ranges, --state, secrets
# =============================================================================


def run_cli(*args: str, env: Optional[Dict[str, str]] = None
            ) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "0", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def start_cli(*args: str) -> Tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    process = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline().rsplit(":", 1)[1].split()[0])
    return process, port


class TestCommandLine(unittest.TestCase):
    def test_unusable_values_are_refused_with_one_clear_line(self) -> None:
        for args, words in (
            (["--idle-timeout", "inf"], "idle_timeout_s must be a positive number"),
            (["--read-timeout", "1e400"], "read_timeout_s must be a positive number"),
            (["--state-interval", "nan"], "state_interval_s must be a positive number"),
            (["--default-ttl-ms", "5000", "--max-ttl-ms", "2000"],
             "default_ttl_ms (5000) must not exceed max_ttl_ms (2000)"),
            (["--max-ttl-ms", "2000"], "default_ttl_ms (60000) must not exceed"),
            (["--tenant", "acme,default_ttl_ms=5000,max_ttl_ms=2000"],
             "--tenant acme: default_ttl_ms (5000) must not exceed"),
            (["--tenant", "acme=MALFORMED"], "status must be one of ACTIVE, SUSPENDED, CLOSED"),
            (["--tenant", "acme=active"], "status must be one of"),
        ):
            done = run_cli(*args)
            self.assertEqual(done.returncode, 2, (args, done.stderr))
            self.assertIn(words, done.stderr)
            self.assertNotIn("Traceback", done.stderr)

    def test_state_in_a_missing_directory_is_refused_naming_the_file(self) -> None:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "missing", "state.json")
        done = run_cli("--state", path)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn(f"--state {path}: cannot write it", done.stderr)
        with self.assertRaisesRegex(ValueError, "cannot write it"):
            LocalCyclesServer(state_file=path)
        self.assertEqual(os.listdir(folder), [])

    def test_a_failed_final_save_exits_non_zero(self) -> None:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "state.json")
        process, _ = start_cli("--state", path)
        self.assertEqual(os.listdir(folder), [])  # the write check left nothing behind
        os.rmdir(folder)  # the state can no longer be written
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 1, err)
        self.assertIn(f"could not save state to {path}", err)

    def test_the_admin_key_can_come_from_the_environment(self) -> None:
        env = dict(os.environ, CYCLES_ADMIN_API_KEY=ADMIN_KEY)
        with mock.patch.dict(os.environ, env):
            srv = cycles_lite_server._build_from_cli(["--port", "0", "--quiet"], io.StringIO())
        srv.start()
        self.addCleanup(srv.stop)
        status, body = admin(srv, "GET", "/v1/admin/tenants")
        self.assertEqual(status, 200, body)
        help_text = " ".join(run_cli("--help").stdout.split())
        self.assertIn("CYCLES_ADMIN_API_KEY", help_text)
        self.assertIn("visible in the process list (ps)", help_text)


class TestKeyPrefixes(unittest.TestCase):
    def test_a_given_key_shows_at_most_four_characters(self) -> None:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "state.json")
        srv = LocalCyclesServer(api_keys={KEY: "acme", "cyc_live_" + KEY: "acme", "ab": "acme"},
                                admin_keys=[ADMIN_KEY], state_file=path).start()
        self.addCleanup(srv.stop)
        status, body = admin(srv, "GET", "/v1/admin/api-keys?tenant_id=acme")
        self.assertEqual(status, 200, body)
        prefixes = sorted(key["key_prefix"] for key in body["keys"])
        self.assertEqual(prefixes, ["", "cyc_live_key-", "key-"])
        srv.stop()
        with open(path, encoding="utf-8") as handle:
            saved = handle.read()
        self.assertNotIn(KEY[:5], saved)
        self.assertIn('"key_prefix":"key-"', saved)


# =============================================================================
# 9. Admin spec points
# =============================================================================


class TestAdminSpecPoints(ServerCase):
    def test_a_budget_for_a_suspended_tenant_is_400_tenant_suspended(self) -> None:
        self.srv.add_tenant("beta", "SUSPENDED")
        budget = {"tenant_id": "beta", "scope": "tenant:beta", "unit": USD,
                  "allocated": amount(100)}
        self.assertError(admin(self.srv, "POST", "/v1/admin/budgets", budget), 400,
                         "TENANT_SUSPENDED")

    def test_a_key_expiring_in_the_past_is_400(self) -> None:
        body = {"tenant_id": "acme", "name": "old", "expires_at": "2001-01-01T00:00:00Z"}
        self.assertError(admin(self.srv, "POST", "/v1/admin/api-keys", body), 400,
                         "INVALID_REQUEST", "expires_at must be in the future")

    def test_an_unknown_parent_tenant_is_400_tenant_not_found(self) -> None:
        orphan = {"tenant_id": "beta", "name": "Beta", "parent_tenant_id": "ghost"}
        self.assertError(admin(self.srv, "POST", "/v1/admin/tenants", orphan), 400,
                         "TENANT_NOT_FOUND", "parent_tenant_id")
        child = dict(orphan, parent_tenant_id="acme")
        status, body = admin(self.srv, "POST", "/v1/admin/tenants", child)
        self.assertEqual((status, body["parent_tenant_id"]), (201, "acme"))

    def test_unknown_include_tokens_are_ignored_as_the_protocol_says(self) -> None:
        self.reserve("r")
        status, body = call(self.srv, "GET", "/v1/reservations?include=metadata,bogus")
        self.assertEqual((status, len(body["reservations"])), (200, 1))


if __name__ == "__main__":
    unittest.main()
