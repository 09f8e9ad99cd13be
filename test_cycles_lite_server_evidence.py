# Copyright 2026 the cycles-lite authors
# SPDX-License-Identifier: Apache-2.0
"""The local server's signed evidence across restarts (--state) and its retention.

Run: python3 -W error -m unittest test_cycles_lite_server_evidence -v
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest
from typing import Any, Dict, List, Optional

import cycles_lite as cl
from cycles_lite import CyclesClient, CyclesConfig
from cycles_lite_server import LocalCyclesServer

API_KEY = "key-acme"
TENANT = "acme"
USD = "USD_MICROCENTS"
HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "cycles_lite_server.py")
RETENTION_S = 60


def create_body(key: str, amount: int = 1000, **extra: Any) -> Dict[str, Any]:
    return dict(
        {
            "idempotency_key": key,
            "subject": {"tenant": TENANT, "agent": "bot"},
            "action": {"kind": "llm.completion", "name": "gpt-4o"},
            "estimate": {"unit": USD, "amount": amount},
        },
        **extra,
    )


def commit_body(key: str, amount: int = 700) -> Dict[str, Any]:
    return {"idempotency_key": key, "actual": {"unit": USD, "amount": amount}}


def make_server(state_file: Optional[str], port: int = 0, **kwargs: Any) -> LocalCyclesServer:
    kwargs.setdefault("evidence", True)
    return LocalCyclesServer(
        port=port,
        api_keys={API_KEY: TENANT},
        budgets=[{"scope": "tenant:acme", "unit": USD, "allocated": 10**9}],
        state_file=state_file,
        **kwargs,
    )


def fetch_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def saved_state(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        document: Dict[str, Any] = json.load(handle)
    return document


class EvidenceCase(unittest.TestCase):
    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = folder.name
        self.path = os.path.join(folder.name, "state.json")

    def client(self, port: int) -> CyclesClient:
        client = CyclesClient(CyclesConfig(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY))
        self.addCleanup(client.close)
        return client

    def assert_authentic(self, client: CyclesClient, ref: Any, kid: Optional[str] = None) -> None:
        result = client.verify_evidence(ref["evidence_id"])
        self.assertEqual((result.disposition, result.ok), (cl.AUTHENTIC, True), result.reason)
        if kid is not None:
            envelope = client.get_evidence(ref["evidence_id"]).body or {}
            self.assertTrue(envelope["signer_did"].endswith("#" + kid), envelope["signer_did"])

    def assert_no_private_key(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn('"d":', text)
        for jwk in json.loads(text)["sections"]["evidence"]["keys"]["keys"]:
            self.assertNotIn("d", jwk)

    def kids(self, client: CyclesClient) -> List[str]:
        return [key["kid"] for key in client.get_evidence_jwks().body["keys"]]


# ---------------------------------------------------------------------------
# Restarts with --state
# ---------------------------------------------------------------------------


class TestRestart(EvidenceCase):
    def test_a_restart_keeps_envelopes_refs_and_retired_keys(self) -> None:
        with make_server(self.path) as srv:
            port = srv.port
            client = self.client(port)
            created = client.create_reservation(create_body("r1")).body
            rid = created["reservation_id"]
            committed = client.commit_reservation(rid, commit_body("c1")).body
            decided = client.decide(create_body("d1")).body
            denied = client.create_reservation(create_body("big", 10**12))
            self.assertEqual(denied.status, 409)
            old_keys = client.get_evidence_jwks().body["keys"]
        self.assertEqual([key["status"] for key in old_keys], ["active"])
        old_kid = old_keys[0]["kid"]
        self.assert_no_private_key()
        with make_server(self.path, port=port) as srv:
            client = self.client(srv.port)
            keys = client.get_evidence_jwks().body["keys"]
            self.assertEqual([key["status"] for key in keys], ["retired", "active"])
            self.assertEqual(keys[0]["kid"], old_kid)
            self.assertEqual(keys[0]["cycles_exp_ms"], keys[1]["cycles_nbf_ms"])
            new_kid = keys[1]["kid"]
            self.assertNotEqual(new_kid, old_kid)
            # issued before the restart, fetched and verified after it
            for ref in (created["cycles_evidence"], committed["cycles_evidence"],
                        decided["cycles_evidence"], denied.body["cycles_evidence"]):
                self.assert_authentic(client, ref, old_kid)
            # same-key replays: the original response and its original evidence ref
            self.assertEqual(client.create_reservation(create_body("r1")).body["cycles_evidence"],
                             created["cycles_evidence"])
            self.assertEqual(client.commit_reservation(rid, commit_body("c1")).body, committed)
            self.assertEqual(client.decide(create_body("d1")).body, decided)
            rows = client.list_reservations(include="evidence", idempotency_key="r1").body
            row = rows["reservations"][0]
            self.assertEqual(row["evidence"], {"reserve": created["cycles_evidence"],
                                               "commit": committed["cycles_evidence"]})
            # a new decision is signed with the new key
            fresh = client.create_reservation(create_body("r2")).body["cycles_evidence"]
            self.assert_authentic(client, fresh, new_kid)
            srv.check_invariants()
        self.assert_no_private_key()
        with make_server(self.path, port=port) as srv:  # one more: both old keys stay
            client = self.client(srv.port)
            keys = client.get_evidence_jwks().body["keys"]
            self.assertEqual([key["kid"] for key in keys[:2]], [old_kid, new_kid])
            self.assertEqual([key["status"] for key in keys], ["retired", "retired", "active"])
            self.assert_authentic(client, created["cycles_evidence"], old_kid)
            self.assert_authentic(client, fresh, new_kid)

    def test_a_rotation_marks_the_state_dirty_and_is_kept(self) -> None:
        with make_server(self.path) as srv:
            port = srv.port
            client = self.client(port)
            before = client.create_reservation(create_body("r1")).body["cycles_evidence"]
            self.assertTrue(srv.save_state())
            self.assertFalse(srv.save_state())  # nothing changed since
            rotated_kid = srv.rotate_evidence_key()
            self.assertTrue(srv.save_state())  # the rotation alone is a change
            saved = saved_state(self.path)["sections"]["evidence"]["keys"]["keys"]
            self.assertEqual([key["kid"] for key in saved][-1], rotated_kid)
            self.assertEqual([key["status"] for key in saved], ["retired", "active"])
            after = client.create_reservation(create_body("r2")).body["cycles_evidence"]
        with make_server(self.path, port=port) as srv:
            client = self.client(srv.port)
            kids = self.kids(client)
            self.assertEqual(len(kids), 3)
            self.assertEqual(kids[1], rotated_kid)
            self.assert_authentic(client, before, kids[0])
            self.assert_authentic(client, after, rotated_kid)

    def test_with_a_key_file_the_file_keeps_signing(self) -> None:
        key_file = os.path.join(self.folder, "evidence-key.json")
        with make_server(self.path, evidence_key=key_file) as srv:
            port = srv.port
            client = self.client(port)
            before = client.create_reservation(create_body("r1")).body["cycles_evidence"]
            kid = self.kids(client)[0]
        self.assert_no_private_key()
        with open(key_file, encoding="utf-8") as handle:
            self.assertIn("d", json.load(handle)["keys"][0])  # the private key's one home
        with make_server(self.path, port=port, evidence_key=key_file) as srv:
            client = self.client(srv.port)
            self.assertEqual(self.kids(client), [kid])
            self.assert_authentic(client, before, kid)
            after = client.create_reservation(create_body("r2")).body["cycles_evidence"]
            self.assert_authentic(client, after, kid)

    def test_keys_of_a_run_without_the_key_file_are_kept_retired(self) -> None:
        key_file = os.path.join(self.folder, "evidence-key.json")
        with make_server(self.path) as srv:
            port = srv.port
            client = self.client(port)
            before = client.create_reservation(create_body("r1")).body["cycles_evidence"]
            generated = self.kids(client)[0]
        with make_server(self.path, port=port, evidence_key=key_file) as srv:
            client = self.client(srv.port)
            keys = client.get_evidence_jwks().body["keys"]
            self.assertEqual([(key["kid"], key["status"]) for key in keys][0],
                             (generated, "retired"))
            self.assertEqual(keys[-1]["status"], "active")
            self.assert_authentic(client, before, generated)
            after = client.create_reservation(create_body("r2")).body["cycles_evidence"]
            self.assert_authentic(client, after, keys[-1]["kid"])

    def test_a_key_file_key_the_state_retired_never_signs_again(self) -> None:
        key_file = os.path.join(self.folder, "evidence-key.json")
        refs = []
        with make_server(self.path, evidence_key=key_file) as srv:
            port = srv.port
            refs.append(self.client(port).create_reservation(create_body("r1")).body)
            file_kid = self.kids(self.client(port))[0]
        with make_server(self.path, port=port) as srv:  # without the file: its key retired
            refs.append(self.client(port).create_reservation(create_body("r2")).body)
        with make_server(self.path, port=port, evidence_key=key_file) as srv:
            client = self.client(port)
            keys = client.get_evidence_jwks().body["keys"]
            self.assertEqual([key["status"] for key in keys], ["retired", "retired", "active"])
            self.assertEqual(keys[0]["kid"], file_kid)
            refs.append(client.create_reservation(create_body("r3")).body)
            for body, key in zip(refs, keys):
                self.assert_authentic(client, body["cycles_evidence"], key["kid"])
        with open(key_file, encoding="utf-8") as handle:
            saved = json.load(handle)["keys"]
        self.assertEqual(saved[-1]["kid"], keys[-1]["kid"])  # the file holds the new key
        self.assertIn("d", saved[-1])

    def test_a_damaged_evidence_section_is_refused_and_left_as_it_was(self) -> None:
        with make_server(self.path) as srv:
            client = self.client(srv.port)
            client.create_reservation(create_body("r1"))
        document = saved_state(self.path)
        envelopes = document["sections"]["evidence"]["envelopes"]
        evidence_id = next(iter(envelopes))
        envelopes[evidence_id] = "AAAA" + envelopes[evidence_id]
        damaged = json.dumps(document).encode("utf-8")
        with open(self.path, "wb") as handle:
            handle.write(damaged)
        with self.assertRaises(ValueError) as raised:
            make_server(self.path)
        self.assertIn(self.path, str(raised.exception))
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), damaged)

    def test_the_cli_restarts_with_its_keys_and_envelopes(self) -> None:
        first = self.start_cli("--port", "0")
        port = int(first.stdout.readline().rsplit(":", 1)[1].split()[0])  # type: ignore[union-attr]
        try:
            client = self.client(port)
            created = client.create_reservation(create_body("r1")).body
            old_kid = self.kids(client)[0]
        finally:
            self.stop_cli(first)
        self.assert_no_private_key()
        second = self.start_cli("--port", str(port))
        try:
            self.assertIn(str(port), second.stdout.readline())  # type: ignore[union-attr]
            client = self.client(port)
            kids = self.kids(client)
            self.assertEqual(len(kids), 2)
            self.assertEqual(kids[0], old_kid)
            self.assert_authentic(client, created["cycles_evidence"], old_kid)
            replay = client.create_reservation(create_body("r1")).body
            self.assertEqual(replay["cycles_evidence"], created["cycles_evidence"])
            fresh = client.create_reservation(create_body("r2")).body["cycles_evidence"]
            self.assert_authentic(client, fresh, kids[1])
        finally:
            self.stop_cli(second)
        self.assert_no_private_key()

    def start_cli(self, *args: str) -> subprocess.Popen[str]:
        command = [sys.executable, SERVER_SCRIPT, "--state", self.path, "--evidence",
                   "--quiet", "--api-key", f"{API_KEY}={TENANT}",
                   "--budget", f"tenant:acme={USD}:1000000000", *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def stop_cli(self, process: subprocess.Popen[str]) -> None:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, err)


# ---------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------


class TestRetention(EvidenceCase):
    def test_envelopes_are_kept_for_the_retention_then_pruned(self) -> None:
        with make_server(None, retention_s=RETENTION_S) as srv:
            srv.clock.freeze()
            client = self.client(srv.port)
            created = client.create_reservation(create_body("r1")).body
            rid = created["reservation_id"]
            committed = client.commit_reservation(rid, commit_body("c1")).body
            decided = client.decide(create_body("d1")).body
            denied = client.create_reservation(create_body("big", 10**12)).body
            dry = client.create_reservation(create_body("dry", dry_run=True)).body
            refs = [body["cycles_evidence"]
                    for body in (created, committed, decided, denied, dry)]
            srv.clock.advance(RETENTION_S * 1000 - 1)
            client.get_balances(tenant=TENANT)  # a ledger request: prunes what is due
            for ref in refs:
                self.assertEqual(fetch_status(srv.port, f"/v1/evidence/{ref['evidence_id']}"),
                                 200)
            self.assertEqual(client.decide(create_body("d1")).body, decided)
            srv.clock.advance(1)
            client.get_balances(tenant=TENANT)
            for ref in refs:
                self.assertEqual(fetch_status(srv.port, f"/v1/evidence/{ref['evidence_id']}"),
                                 404)
            self.assertEqual(client.get_reservation(rid).status, 404)
            # the decide key was pruned with its record: a new decision, a new envelope
            again = client.decide(create_body("d1")).body["cycles_evidence"]
            self.assertNotEqual(again, decided["cycles_evidence"])
            self.assert_authentic(client, again)
            evidence = srv._evidence
            assert evidence is not None
            self.assertEqual(list(evidence._envelopes), [again["evidence_id"]])
            self.assertEqual((evidence._by_reservation, len(evidence._by_request)), ({}, 1))

    def test_an_active_reservation_keeps_its_envelope_past_the_window(self) -> None:
        with make_server(None, retention_s=RETENTION_S) as srv:
            srv.clock.freeze()
            client = self.client(srv.port)
            created = client.create_reservation(
                create_body("r1", ttl_ms=10 * RETENTION_S * 1000)
            ).body
            rid = created["reservation_id"]
            srv.clock.advance(5 * RETENTION_S * 1000)
            client.get_balances(tenant=TENANT)
            path = f"/v1/evidence/{created['cycles_evidence']['evidence_id']}"
            self.assertEqual(fetch_status(srv.port, path), 200)
            released = client.release_reservation(rid, {"idempotency_key": "x"}).body
            srv.clock.advance(RETENTION_S * 1000 - 1)
            client.get_balances(tenant=TENANT)
            self.assertEqual(fetch_status(srv.port, path), 200)
            srv.clock.advance(1)
            client.get_balances(tenant=TENANT)
            self.assertEqual(fetch_status(srv.port, path), 404)
            released_path = f"/v1/evidence/{released['cycles_evidence']['evidence_id']}"
            self.assertEqual(fetch_status(srv.port, released_path), 404)

    def test_restored_envelopes_are_pruned_on_the_stored_times(self) -> None:
        with make_server(self.path, retention_s=RETENTION_S) as srv:
            port = srv.port
            srv.clock.freeze()
            client = self.client(port)
            created = client.create_reservation(create_body("r1")).body
            client.commit_reservation(created["reservation_id"], commit_body("c1"))
            decided = client.decide(create_body("d1")).body
        paths = [f"/v1/evidence/{body['cycles_evidence']['evidence_id']}"
                 for body in (created, decided)]
        with make_server(self.path, port=port, retention_s=RETENTION_S) as srv:
            srv.clock.freeze()
            client = self.client(port)
            self.assertEqual([fetch_status(port, path) for path in paths], [200, 200])
            srv.clock.advance(RETENTION_S * 1000)
            client.get_balances(tenant=TENANT)
            self.assertEqual([fetch_status(port, path) for path in paths], [404, 404])
        sections = saved_state(self.path)["sections"]["evidence"]
        self.assertEqual((sections["envelopes"], sections["by_request"]), ({}, []))


if __name__ == "__main__":
    unittest.main()
