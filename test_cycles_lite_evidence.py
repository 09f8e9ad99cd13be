# Copyright 2026 the cycles-lite authors
# SPDX-License-Identifier: Apache-2.0
"""Signed evidence: RFC 8785, RFC 8032, the cycles-evidence-v0.2 dispositions, the
server's signing and the client's verifying (each written without the other).

Run: python3 -W error -m unittest test_cycles_lite_evidence -v
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import stat
import struct
import tempfile
import unittest
from typing import Any, Dict, Optional, Tuple
from unittest import mock

import cycles_lite as cl
import cycles_lite_server as server_module
from cycles_lite import AsyncCyclesClient, CyclesClient, CyclesConfig, verify_evidence
from cycles_lite_server import LocalCyclesServer, _canonical_bytes, _Ed25519Key

API_KEY = "key-acme"
TENANT = "acme"
USD = "USD_MICROCENTS"
SERVER_ID = "https://cycles.example.com/v1"
ISSUED_AT = 1_810_000_000_000
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
KEY_A = _Ed25519Key(bytes(range(32)))
KEY_B = _Ed25519Key(bytes(range(1, 33)))
KEY_C = _Ed25519Key(bytes(range(2, 34)))

# RFC 8032 section 7.1: (secret key, public key, message, signature).
_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0"
)
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        _TEST_1024_MESSAGE,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]

# RFC 8785 Appendix B: IEEE 754 bits -> canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]

COMMIT_PAYLOAD: Dict[str, Any] = {
    "reservation_id": "01HZZ8N4F8FBQX5K6TGYR0M0A2",
    "request": {
        "idempotency_key": "01HZZ8N4F8FBQX5K6TGYR0M0A3",
        "actual": {"unit": USD, "amount": 1_500_000},
        "metadata": {
            "note": "caf\u00e9 \u20ac \U0001f600 \u2028 \x7f\n",
            "ratio": 0.1,
            "big": 2**60,
        },
    },
    "response": {"status": "COMMITTED", "charged": {"unit": USD, "amount": 1_500_000}},
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def server_hash(server_id: str = SERVER_ID) -> str:
    return hashlib.sha256(server_id.encode("utf-8")).hexdigest()


def did(kid: str, server_id: str = SERVER_ID) -> str:
    return f"did:cycles:{server_hash(server_id)}#{kid}"


def jwk(key: _Ed25519Key, kid: str, nbf: Any = 0, exp: Any = None, **extra: Any) -> Dict[str, Any]:
    entry = {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "kid": kid,
        "x": b64url(key.public),
        "cycles_nbf_ms": nbf,
        "cycles_exp_ms": exp,
    }
    entry.update(extra)
    return {name: value for name, value in entry.items() if value is not DROP}


DROP = object()


def envelope(
    key: _Ed25519Key = KEY_A,
    signer_did: Optional[str] = None,
    issued_at: int = ISSUED_AT,
    server_id: str = SERVER_ID,
    artifact: str = "commit",
    payload: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """An envelope signed with the SERVER's JCS and Ed25519 code (never the client's)."""
    built: Dict[str, Any] = {
        "schema_version": "cycles-evidence/v0.1",
        "artifact_type": artifact,
        "server_id": server_id,
        "signer_did": signer_did or key.public.hex(),
        "issued_at_ms": issued_at,
        "trace_id": TRACE_ID,
        "payload": payload if payload is not None else {artifact: COMMIT_PAYLOAD},
        "evidence_id": "",
        "signature": "",
    }
    built["evidence_id"] = hashlib.sha256(_canonical_bytes(built)).hexdigest()
    built["signature"] = key.sign(_canonical_bytes(built)).hex()
    return built


def double(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


# ---------------------------------------------------------------------------
# RFC 8032
# ---------------------------------------------------------------------------


class TestEd25519(unittest.TestCase):
    def test_rfc8032_vectors_verify_and_the_server_signs_them(self) -> None:
        for secret, public, message, signature in RFC8032_VECTORS:
            with self.subTest(public=public[:16]):
                pk, msg, sig = (
                    bytes.fromhex(public),
                    bytes.fromhex(message),
                    bytes.fromhex(signature),
                )
                self.assertTrue(cl._ed25519_verify(pk, msg, sig))
                key = _Ed25519Key(bytes.fromhex(secret))
                self.assertEqual(key.public.hex(), public)
                self.assertEqual(key.sign(msg).hex(), signature)
                self.assertFalse(cl._ed25519_verify(pk, msg + b"x", sig))
                for index in (0, 31, 32, 63):
                    flipped = bytearray(sig)
                    flipped[index] ^= 0x01
                    self.assertFalse(cl._ed25519_verify(pk, msg, bytes(flipped)))

    def test_strict_decoding_and_s_below_l(self) -> None:
        _, public, message, signature = RFC8032_VECTORS[1]
        pk, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
        s = int.from_bytes(sig[32:], "little")
        self.assertFalse(
            cl._ed25519_verify(pk, msg, sig[:32] + (s + cl._ED_L).to_bytes(32, "little"))
        )
        self.assertFalse(cl._ed25519_verify(pk, msg, sig[:32] + cl._ED_L.to_bytes(32, "little")))
        self.assertFalse(cl._ed25519_verify(pk[:31], msg, sig))
        self.assertFalse(cl._ed25519_verify(pk, msg, sig[:63]))
        p = cl._ED_P
        non_canonical = [
            (p + 1).to_bytes(32, "little"),  # y >= p (y = 1 written as p + 1)
            bytes([1]) + bytes(30) + bytes([0x80]),  # x = 0 with the sign bit set
        ]
        for encoding in non_canonical:
            self.assertIsNone(cl._ed_decode(encoding))
            self.assertFalse(cl._ed25519_verify(encoding, msg, sig))
            self.assertFalse(cl._ed25519_verify(pk, msg, encoding + sig[32:]))
        not_a_point = next(
            bytes([y]) + bytes(31)
            for y in range(2, 64)
            if cl._ed_decode(bytes([y]) + bytes(31)) is None
        )
        self.assertFalse(cl._ed25519_verify(not_a_point, msg, sig))

    def test_the_check_is_cofactorless(self) -> None:
        # A public key with a small-order component: [S]B = R + [k]A' holds only when
        # [k]T vanishes (k % 8 == 0); a cofactored [8][S]B = [8]R + [8][k]A' always would.
        torsion = self.point_of_order_8()
        mixed = cl._ed_add(cl._ed_decode(KEY_A.public) or cl._ED_IDENTITY, torsion)
        public = server_module._compress(mixed)
        seen = set()
        for index in range(200):
            message = b"message %d" % index
            signature, k = self.sign_with_mixed_key(public, message)
            seen.add(k % 8 == 0)
            self.assertEqual(cl._ed25519_verify(public, message, signature), k % 8 == 0)
            if seen == {True, False}:
                return
        self.fail("no message gave both cases")

    @staticmethod
    def point_of_order_8() -> Tuple[int, int, int, int]:
        for y in range(2, 1000):
            point = cl._ed_decode(y.to_bytes(32, "little"))
            if point is None:
                continue
            torsion = cl._ed_mul(cl._ED_L, point)
            four = cl._ed_mul(4, torsion)
            if server_module._compress(four) != server_module._compress(cl._ED_IDENTITY):
                return torsion
        raise AssertionError("no point of order 8 found")

    @staticmethod
    def sign_with_mixed_key(public: bytes, message: bytes) -> Tuple[bytes, int]:
        def reduced(data: bytes) -> int:
            return int.from_bytes(hashlib.sha512(data).digest(), "little") % cl._ED_L

        r = reduced(KEY_A._prefix + message)
        encoded_r = server_module._compress(server_module._base_times(r))
        k = reduced(encoded_r + public + message)
        s = (r + k * KEY_A._scalar) % cl._ED_L
        return encoded_r + s.to_bytes(32, "little"), k


# ---------------------------------------------------------------------------
# RFC 8785
# ---------------------------------------------------------------------------

CANONICALISERS = (("client", cl._jcs), ("server", _canonical_bytes))


class TestJcs(unittest.TestCase):
    def test_rfc8785_sample(self) -> None:
        # Sections 3.2.2 to 3.2.4: the sample object and its canonical form.
        text = (
            '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
            ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            ' "literals": [null, true, false]}'
        )
        expected = (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode("utf-8")
        for name, canonical in CANONICALISERS:
            with self.subTest(name):
                self.assertEqual(canonical(json.loads(text)), expected)
        self.assertEqual(expected[:10].hex(), "7b226c69746572616c73")  # 3.2.4's first bytes

    def test_appendix_b_numbers(self) -> None:
        for bits, text in APPENDIX_B:
            with self.subTest(bits):
                self.assertEqual(cl._es_number(double(bits)), text)
                self.assertEqual(server_module._ecmascript_number(double(bits)), text)
                self.assertEqual(cl._jcs([double(bits)]), f"[{text}]".encode())
        for bad in ("7fffffffffffffff", "7ff0000000000000", "fff0000000000000"):
            with self.assertRaises(ValueError):
                cl._jcs(double(bad))
            with self.assertRaises(ValueError):
                _canonical_bytes(double(bad))

    def test_integers_are_numbers(self) -> None:
        cases = {
            0: "0",
            -7: "-7",
            2**53: "9007199254740992",
            2**53 + 1: "9007199254740992",
            10**21: "1e+21",
            2**63 - 1: "9223372036854776000",
            -(10**22): "-1e+22",
        }
        for value, text in cases.items():
            for name, canonical in CANONICALISERS:
                with self.subTest(name, value=value):
                    self.assertEqual(canonical(value), text.encode())

    def test_keys_sort_by_utf16_code_units(self) -> None:
        # Section 3.2.3's example: "\ud83d\ude00" sorts before "\ufb33" in UTF-16 but
        # not by code point.
        value = {
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\U0001f600": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis",
        }
        expected = (
            '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
            '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
            '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
        ).encode("utf-8")
        for name, canonical in CANONICALISERS:
            with self.subTest(name):
                self.assertEqual(canonical(value), expected)
        self.assertNotEqual(
            json.dumps(value, sort_keys=True, ensure_ascii=False).encode(), expected
        )

    def test_strings_and_structure(self) -> None:
        value = {"b": [1, {"z": None, "a": True}], "a": '\x00\x1f"\\/\u2028\x7f\t', "": {}}
        expected = (
            b'{"":{},"a":"\\u0000\\u001f\\"\\\\/\xe2\x80\xa8\x7f\\t","b":[1,{"a":true,"z":null}]}'
        )
        for name, canonical in CANONICALISERS:
            with self.subTest(name):
                self.assertEqual(canonical(value), expected)
        self.assertEqual(cl._jcs(COMMIT_PAYLOAD), _canonical_bytes(COMMIT_PAYLOAD))
        for bad in ("\ud800", {1: "x"}, {"a": object()}):
            with self.assertRaises(ValueError):
                cl._jcs(bad)


# ---------------------------------------------------------------------------
# The dispositions, with hand-made JWK Sets
# ---------------------------------------------------------------------------


class TestDispositions(unittest.TestCase):
    def check(self, result: cl.EvidenceVerification, disposition: str, reason: str = "") -> None:
        self.assertEqual(result.disposition, disposition, result.reason)
        self.assertIn(reason, result.reason)
        self.assertEqual(result.ok, disposition == cl.AUTHENTIC)

    def test_authentic_with_a_did_and_with_the_raw_hex_bridge(self) -> None:
        keys = {"keys": [jwk(KEY_B, "old", 0, ISSUED_AT - 10, status="retired"), jwk(KEY_A, "k1")]}
        by_did = envelope(signer_did=did("k1"))
        result = verify_evidence(by_did, jwks=keys)
        self.check(result, cl.AUTHENTIC)
        self.assertEqual(
            (
                result.evidence_id,
                result.artifact_type,
                result.signer_kid,
                result.signer_pin_matched,
            ),
            (by_did["evidence_id"], "commit", "k1", None),
        )
        raw = envelope()
        self.check(verify_evidence(raw, jwks=keys), cl.AUTHENTIC)
        self.check(verify_evidence(json.dumps(raw), jwks=json.dumps(keys)), cl.AUTHENTIC)
        self.check(
            verify_evidence(json.dumps(raw).encode(), jwks=json.dumps(keys).encode()), cl.AUTHENTIC
        )
        unknown_members = {"keys": [jwk(KEY_A, "k1", alg=DROP, use="sig", extra=1)], "x": 1}
        self.check(verify_evidence(by_did, jwks=unknown_members), cl.AUTHENTIC)

    def test_binding_only_and_the_pin(self) -> None:
        raw = envelope()
        result = verify_evidence(raw)
        self.assertEqual(
            (result.disposition, result.ok, result.signer_pin_matched),
            (cl.BINDING_ONLY, False, None),
        )
        pinned = verify_evidence(raw, expected_signer=KEY_A.public.hex().upper())
        self.assertEqual(
            (pinned.disposition, pinned.ok, pinned.signer_pin_matched),
            (cl.BINDING_ONLY, True, True),
        )
        other = verify_evidence(raw, expected_signer=KEY_B.public.hex())
        self.assertEqual(
            (other.disposition, other.ok, other.signer_pin_matched), (cl.BINDING_ONLY, False, False)
        )
        keys = {"keys": [jwk(KEY_A, "k1")]}
        mismatch = verify_evidence(raw, jwks=keys, expected_signer=KEY_B.public.hex())
        self.assertEqual((mismatch.disposition, mismatch.ok), (cl.AUTHENTIC, False))
        by_did = verify_evidence(
            envelope(signer_did=did("k1")), jwks=keys, expected_signer=KEY_A.public.hex()
        )
        self.assertEqual((by_did.ok, by_did.signer_pin_matched), (True, True))

    def test_rotation_with_retired_keys(self) -> None:
        rotated_at = ISSUED_AT + 1000
        keys = {
            "keys": [
                jwk(KEY_A, "2026-05", ISSUED_AT - 10_000, rotated_at, status="retired"),
                jwk(KEY_B, "2026-06", rotated_at, None, status="active"),
            ]
        }
        before = envelope(KEY_A, did("2026-05"), ISSUED_AT)
        self.check(verify_evidence(before, jwks=keys), cl.AUTHENTIC)
        self.check(verify_evidence(envelope(KEY_A, None, rotated_at - 1), jwks=keys), cl.AUTHENTIC)
        self.check(
            verify_evidence(envelope(KEY_B, did("2026-06"), rotated_at), jwks=keys), cl.AUTHENTIC
        )
        after = envelope(KEY_A, did("2026-05"), rotated_at)  # exp is exclusive
        self.check(verify_evidence(after, jwks=keys), cl.SIGNER_AUTHORITY_FAILED, "not valid at")
        self.check(
            verify_evidence(envelope(KEY_A, None, rotated_at), jwks=keys),
            cl.SIGNER_AUTHORITY_FAILED,
        )
        early = envelope(KEY_B, did("2026-06"), rotated_at - 1)  # nbf is inclusive
        self.check(verify_evidence(early, jwks=keys), cl.SIGNER_AUTHORITY_FAILED)
        # status is advisory: a key marked "retired" with an open window still selects.
        advisory = {"keys": [jwk(KEY_A, "k1", status="retired")]}
        self.check(verify_evidence(envelope(signer_did=did("k1")), jwks=advisory), cl.AUTHENTIC)

    def test_duplicate_kid(self) -> None:
        keys = {"keys": [jwk(KEY_A, "k1"), jwk(KEY_B, "k1", 0, 5)]}
        for signed in (envelope(signer_did=did("k1")), envelope()):
            self.check(
                verify_evidence(signed, jwks=keys), cl.SIGNER_AUTHORITY_FAILED, "duplicate kid"
            )

    def test_overlapping_windows(self) -> None:
        keys = {"keys": [jwk(KEY_A, "k1", 0, None), jwk(KEY_A, "k2", ISSUED_AT - 5, ISSUED_AT + 5)]}
        self.check(verify_evidence(envelope(), jwks=keys), cl.SIGNER_AUTHORITY_FAILED, "ambiguous")
        # by kid, the overlap is no ambiguity; other keys' windows do not matter.
        self.check(verify_evidence(envelope(signer_did=did("k2")), jwks=keys), cl.AUTHENTIC)
        disjoint = {"keys": [jwk(KEY_A, "k1", 0, ISSUED_AT), jwk(KEY_A, "k2", ISSUED_AT, None)]}
        result = verify_evidence(envelope(), jwks=disjoint)
        self.assertEqual((result.disposition, result.signer_kid), (cl.AUTHENTIC, "k2"))

    def test_invalid_jwks_are_excluded(self) -> None:
        short_x = b64url(KEY_A.public[:31])
        invalid = {
            "wrong-length x": {"x": short_x},
            "padded x": {"x": b64url(KEY_A.public) + "="},
            "standard base64 x": {"x": base64.b64encode(KEY_A.public).decode()},
            "non-canonical x": {
                "x": b64url(KEY_A.public)[:-1] + chr(ord(b64url(KEY_A.public)[-1]) + 1)
            },
            "kty": {"kty": "EC"},
            "crv": {"crv": "X25519"},
            "alg": {"alg": "ES256"},
            "missing nbf": {"cycles_nbf_ms": DROP},
            "float nbf": {"cycles_nbf_ms": 1.5},
            "string exp": {"cycles_exp_ms": "never"},
        }
        for name, override in invalid.items():
            with self.subTest(name):
                keys = {"keys": [jwk(KEY_A, "k1", **override)]}
                self.check(
                    verify_evidence(envelope(signer_did=did("k1")), jwks=keys),
                    cl.SIGNER_AUTHORITY_FAILED,
                )
                self.check(verify_evidence(envelope(), jwks=keys), cl.SIGNER_AUTHORITY_FAILED)
        # excluded keys do not block a valid one; their kids still count as taken
        keys = {"keys": [jwk(KEY_A, "bad", x=short_x), "junk", jwk(KEY_A, "k1")]}
        self.check(verify_evidence(envelope(), jwks=keys), cl.AUTHENTIC)

    def test_a_did_binding_another_server_id(self) -> None:
        keys = {"keys": [jwk(KEY_A, "k1")]}
        foreign = envelope(signer_did=did("k1", "https://other.example.com/v1"))
        self.check(verify_evidence(foreign, jwks=keys), cl.SIGNER_AUTHORITY_FAILED, "server_id")
        slash = envelope(signer_did=did("k1", SERVER_ID + "/"))  # no URL normalisation
        self.check(verify_evidence(slash, jwks=keys), cl.SIGNER_AUTHORITY_FAILED)
        upper = envelope(signer_did=did("k1").replace(server_hash(), server_hash().upper()))
        self.check(verify_evidence(upper, jwks=keys), cl.SIGNER_AUTHORITY_FAILED)

    def test_authority_failures(self) -> None:
        keys = {"keys": [jwk(KEY_B, "k2")]}
        self.check(
            verify_evidence(envelope(), jwks=keys), cl.SIGNER_AUTHORITY_FAILED, "not in the JWK Set"
        )
        self.check(
            verify_evidence(envelope(signer_did=did("k1")), jwks=keys),
            cl.SIGNER_AUTHORITY_FAILED,
            "kid",
        )
        self.check(verify_evidence(envelope(), jwks={"keys": []}), cl.SIGNER_AUTHORITY_FAILED)

    def test_resolution_failures(self) -> None:
        by_did = envelope(signer_did=did("k1"))
        self.check(verify_evidence(by_did), cl.SIGNER_RESOLUTION_FAILED, "JWK Set")
        for unparseable in (
            "{not json",
            b"\xff",
            "[1]",
            '{"keys": {}}',
            '{"keys": [], "keys": []}',
        ):
            with self.subTest(unparseable):
                self.check(verify_evidence(by_did, jwks=unparseable), cl.SIGNER_RESOLUTION_FAILED)
                self.check(
                    verify_evidence(envelope(), jwks=unparseable), cl.SIGNER_RESOLUTION_FAILED
                )
        for signer in (
            "did:web:example.com",
            "did:cycles:" + server_hash(),
            "did:cycles:abc#k1",
            "AB" * 32,
        ):
            with self.subTest(signer):
                self.check(
                    verify_evidence(envelope(signer_did=signer)), cl.SIGNER_RESOLUTION_FAILED
                )

    def test_malformed_envelopes_are_signature_invalid(self) -> None:
        good = envelope()
        cases: Dict[str, Any] = {
            "version": dict(good, schema_version="cycles-evidence/v0.2"),
            "no version": {k: v for k, v in good.items() if k != "schema_version"},
            "artifact mismatch": envelope(artifact="commit", payload={"release": COMMIT_PAYLOAD}),
            "two payload keys": envelope(payload={"commit": COMMIT_PAYLOAD, "error": {}}),
            "unknown artifact": envelope(artifact="expire", payload={"expire": {}}),
            "extra field": dict(good, extra=1),
            "no signature": {k: v for k, v in good.items() if k != "signature"},
            "null id": dict(good, evidence_id=None),
            "negative time": envelope(issued_at=-1),
            "boolean time": dict(good, issued_at_ms=True),
            "bad trace": dict(good, trace_id="XYZ"),
            "not an object": [good],
            "nan": dict(good, payload={"commit": {"x": float("nan")}}),
        }
        for name, bad in cases.items():
            with self.subTest(name):
                self.check(
                    verify_evidence(bad if isinstance(bad, dict) else json.dumps(bad)),
                    cl.SIGNATURE_INVALID,
                )
        for text in ("", "{", '{"a": 1, "a": 2}', '{"x": NaN}', "[" * 100_000):
            with self.subTest(text[:10]):
                self.check(verify_evidence(text), cl.SIGNATURE_INVALID, "not valid JSON")

    def test_wrong_arguments_raise(self) -> None:
        with self.assertRaises(TypeError):
            verify_evidence(42)  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            verify_evidence(envelope(), jwks=[1])  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            verify_evidence(envelope(), expected_signer=b"x" * 32)  # type: ignore[arg-type]
        with self.assertRaisesRegex(ValueError, "^expected_signer: "):
            verify_evidence(envelope(), expected_signer="did:cycles:x")
        result = verify_evidence(envelope())
        with self.assertRaises(dataclasses_frozen_error()):
            result.ok = True  # type: ignore[misc]


def dataclasses_frozen_error() -> type:
    import dataclasses

    return dataclasses.FrozenInstanceError


# ---------------------------------------------------------------------------
# Tampering
# ---------------------------------------------------------------------------


class TestTampering(unittest.TestCase):
    def test_one_flipped_byte_anywhere(self) -> None:
        keys = {"keys": [jwk(KEY_A, "k1")]}
        original = envelope(signer_did=did("k1"))
        data = cl._jcs(original)
        self.assertTrue(verify_evidence(data, jwks=keys).ok)
        for index in range(len(data)):
            tampered = bytearray(data)
            tampered[index] ^= 0x01
            result = verify_evidence(bytes(tampered), jwks=keys)
            if result.disposition == cl.SIGNATURE_INVALID:
                continue
            # JCS compares values: 2**60's last digit names the same double (I-JSON).
            self.assertEqual(cl._jcs(json.loads(bytes(tampered))), data, f"byte {index}: {result}")

    def test_payload_id_and_signature(self) -> None:
        keys = {"keys": [jwk(KEY_A, "k1")]}
        original = envelope(signer_did=did("k1"))
        payload = json.loads(json.dumps(original))
        payload["payload"]["commit"]["response"]["charged"]["amount"] += 1
        result = verify_evidence(payload, jwks=keys)
        self.assertEqual((result.disposition, result.ok), (cl.SIGNATURE_INVALID, False))
        self.assertIn("evidence_id", result.reason)
        for name in ("evidence_id", "signature"):
            with self.subTest(name):
                text = original[name]
                flipped = dict(
                    original, **{name: ("1" if text[7] == "0" else "0").join((text[:7], text[8:]))}
                )
                self.assertEqual(
                    verify_evidence(flipped, jwks=keys).disposition, cl.SIGNATURE_INVALID
                )
        # A forged envelope that re-derives its id but is signed by another key.
        forged = envelope(KEY_B, did("k1"))
        self.assertEqual(verify_evidence(forged, jwks=keys).disposition, cl.SIGNATURE_INVALID)
        self.assertEqual(
            verify_evidence(envelope(KEY_B, KEY_A.public.hex())).disposition, cl.SIGNATURE_INVALID
        )


# ---------------------------------------------------------------------------
# The local server signs; the client fetches and verifies
# ---------------------------------------------------------------------------


def create_body(amount: int = 1000, key: Optional[str] = None) -> Dict[str, Any]:
    return {
        "idempotency_key": key or "create-" + os.urandom(4).hex(),
        "subject": {"tenant": TENANT, "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": {"unit": USD, "amount": amount},
    }


def make_server(**kwargs: Any) -> LocalCyclesServer:
    kwargs.setdefault("evidence", True)
    return LocalCyclesServer(
        api_keys={API_KEY: TENANT},
        budgets=[{"scope": "tenant:acme", "unit": USD, "allocated": 10**9}],
        **kwargs,
    )


def raw_get(srv: LocalCyclesServer, path: str) -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


class ServerCase(unittest.TestCase):
    srv: LocalCyclesServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = make_server().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.srv.stop()

    def setUp(self) -> None:
        self.srv.clear_faults()

    def client(self, **kwargs: Any) -> CyclesClient:
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("base_url", self.srv.url)
        client = CyclesClient(CyclesConfig(**kwargs))
        self.addCleanup(client.close)
        return client

    def assert_authentic(self, client: CyclesClient, ref: Any, artifact: str) -> Dict[str, Any]:
        self.assertIsInstance(ref, dict)
        evidence_id = ref["evidence_id"]
        self.assertEqual(ref["cycles_evidence_url"], f"{self.srv.url}/v1/evidence/{evidence_id}")
        result = client.verify_evidence(evidence_id)
        self.assertEqual((result.disposition, result.ok), (cl.AUTHENTIC, True), result.reason)
        self.assertEqual((result.artifact_type, result.evidence_id), (artifact, evidence_id))
        body: Dict[str, Any] = client.get_evidence(evidence_id).body or {}
        self.assertNotIn("cycles_evidence", json.dumps(body["payload"]))
        return body


class TestServerEvidence(ServerCase):
    def test_end_to_end_guarded_calls(self) -> None:
        client = self.client()

        @cl.cycles(
            estimate=700,
            action_kind="llm.completion",
            action_name="gpt-4o",
            tenant=TENANT,
            client=client,
        )
        def answer(question: str) -> str:
            return question.upper()

        @cl.cycles(
            estimate=300,
            action_kind="tool.call",
            action_name="search",
            tenant=TENANT,
            client=client,
        )
        def fail() -> None:
            raise RuntimeError("tool crashed")

        self.assertEqual(answer("why"), "WHY")
        with self.assertRaises(RuntimeError):
            fail()
        cl.flush(5.0)
        rows = client.list_reservations(include="evidence", limit="2").body["reservations"]
        outcomes = {row["status"]: row for row in rows}
        self.assertEqual(set(outcomes), {"COMMITTED", "RELEASED"})
        committed = outcomes["COMMITTED"]["evidence"]
        reserve = self.assert_authentic(client, committed["reserve"], "reserve")
        commit = self.assert_authentic(client, committed["commit"], "commit")
        reservation_id = outcomes["COMMITTED"]["reservation_id"]
        self.assertEqual(
            reserve["payload"]["reserve"]["response"]["reservation_id"], reservation_id
        )
        self.assertEqual(commit["payload"]["commit"]["reservation_id"], reservation_id)
        self.assertNotIn("remaining_ttl_ms", reserve["payload"]["reserve"]["response"])
        released = outcomes["RELEASED"]["evidence"]
        self.assert_authentic(client, released["reserve"], "reserve")
        self.assert_authentic(client, released["release"], "release")
        self.assertEqual(set(released), {"reserve", "release"})
        # decide, a dry run and a denial are attested too
        decided = client.decide(create_body(10**12))
        self.assertEqual(decided.body["decision"], "DENY")
        self.assert_authentic(client, decided.body["cycles_evidence"], "decide")
        dry = client.create_reservation(dict(create_body(), dry_run=True))
        self.assert_authentic(client, dry.body["cycles_evidence"], "reserve")
        denied = client.create_reservation(create_body(10**12))
        self.assertEqual(denied.status, 409)
        error = self.assert_authentic(client, denied.body["cycles_evidence"], "error")
        self.assertEqual(error["payload"]["error"]["endpoint"], "POST /v1/reservations")
        self.assertEqual(error["payload"]["error"]["http_status"], 409)
        finalized = client.commit_reservation(
            reservation_id, {"idempotency_key": "late", "actual": {"unit": USD, "amount": 1}}
        )
        self.assertEqual(finalized.status, 409)
        late = self.assert_authentic(client, finalized.body["cycles_evidence"], "error")
        self.assertEqual(late["payload"]["error"]["reservation_id"], reservation_id)
        # nothing was decided: no evidence for validation or auth failures
        invalid = client.create_reservation(dict(create_body(), ttl_ms=1))
        self.assertEqual((invalid.status, "cycles_evidence" in (invalid.body or {})), (400, False))

    def test_async_client(self) -> None:
        async def run() -> Tuple[cl.EvidenceVerification, cl.EvidenceVerification]:
            async with AsyncCyclesClient(
                CyclesConfig(base_url=self.srv.url, api_key=API_KEY)
            ) as client:
                created = await client.create_reservation(create_body())
                evidence_id = created.body["cycles_evidence"]["evidence_id"]
                envelope_body = (await client.get_evidence(evidence_id)).body
                return await client.verify_evidence(evidence_id), await client.verify_evidence(
                    envelope_body
                )

        by_id, by_envelope = asyncio.run(run())
        self.assertEqual((by_id.disposition, by_envelope.disposition), (cl.AUTHENTIC, cl.AUTHENTIC))

    def test_serving_headers_and_bytes(self) -> None:
        client = self.client()
        created = client.create_reservation(create_body())
        evidence_id = created.body["cycles_evidence"]["evidence_id"]
        status, headers, body = raw_get(self.srv, f"/v1/evidence/{evidence_id}")
        self.assertEqual((status, headers["cache-control"]), (200, "public, immutable"))
        self.assertEqual(headers["content-type"], "application/json")
        self.assertRegex(headers["x-cycles-trace-id"], "^[0-9a-f]{32}$")
        self.assertIn("x-request-id", headers)
        self.assertEqual(body, cl._jcs(json.loads(body)))  # served as its JCS bytes
        self.assertEqual(json.loads(body)["trace_id"], created.trace_id)
        status, headers, body = raw_get(self.srv, "/v1/.well-known/cycles-jwks.json")
        self.assertEqual((status, headers["cache-control"]), (200, "public, max-age=60"))
        self.assertNotIn(b'"d"', body)
        status, _, _ = raw_get(self.srv, "/v1/evidence/" + "0" * 64)
        self.assertEqual(status, 404)

    def test_include_evidence_on_list_and_get(self) -> None:
        client = self.client()
        reservation_id = client.create_reservation(create_body()).body["reservation_id"]
        plain = client.list_reservations(limit="1").body["reservations"][0]
        self.assertEqual(plain["reservation_id"], reservation_id)
        self.assertNotIn("evidence", plain)
        listed = client.list_reservations(limit="1", include=" metadata, evidence,").body
        self.assertEqual(set(listed["reservations"][0]["evidence"]), {"reserve"})
        detail = client.get_reservation(reservation_id).body
        self.assertEqual(set(detail["evidence"]), {"reserve"})
        self.assertEqual(
            cl.ReservationDetail.model_validate(detail).evidence.reserve.evidence_id,
            detail["evidence"]["reserve"]["evidence_id"],
        )

    def test_a_replay_returns_the_original_evidence(self) -> None:
        client = self.client()
        body = create_body()
        first = client.create_reservation(body)
        self.srv.clock.advance(1000)
        again = client.create_reservation(body)
        self.assertEqual(first.body["cycles_evidence"], again.body["cycles_evidence"])
        self.assertNotEqual(first.body["remaining_ttl_ms"], again.body["remaining_ttl_ms"])

    def test_rotation_keeps_retired_keys(self) -> None:
        client = self.client()
        created = client.create_reservation(create_body())
        self.srv.clock.advance(5)
        new_kid = self.srv.rotate_evidence_key()
        self.srv.clock.advance(5)
        committed = client.commit_reservation(
            created.body["reservation_id"],
            {"idempotency_key": "c", "actual": {"unit": USD, "amount": 1}},
        )
        keys = client.get_evidence_jwks().body["keys"]
        self.assertEqual([key["status"] for key in keys[-2:]], ["retired", "active"])
        self.assertEqual(keys[-1]["kid"], new_kid)
        self.assertEqual(keys[-2]["cycles_exp_ms"], keys[-1]["cycles_nbf_ms"])
        self.assert_authentic(client, created.body["cycles_evidence"], "reserve")
        commit = self.assert_authentic(client, committed.body["cycles_evidence"], "commit")
        self.assertTrue(commit["signer_did"].endswith("#" + new_kid))

    def test_rotation_under_a_frozen_clock(self) -> None:
        client = self.client()
        self.srv.clock.freeze()
        self.addCleanup(self.srv.clock.unfreeze)
        created = client.create_reservation(create_body())
        self.srv.rotate_evidence_key()
        released = client.release_reservation(
            created.body["reservation_id"], {"idempotency_key": "r"}
        )
        self.assert_authentic(client, created.body["cycles_evidence"], "reserve")
        self.assert_authentic(client, released.body["cycles_evidence"], "release")

    def test_fetch_failures_are_resolution_failures(self) -> None:
        client = self.client()
        evidence_id = client.create_reservation(create_body()).body["cycles_evidence"][
            "evidence_id"
        ]
        envelope_body = client.get_evidence(evidence_id).body
        for fault, params in (
            ("status", {"status": 503}),
            ("drop", {}),
            ("malformed", {"status": 200}),
        ):
            with self.subTest(fault):
                self.srv.inject("jwks", fault, times=None, **params)
                result = client.verify_evidence(evidence_id)
                self.srv.clear_faults()
                self.assertEqual(result.disposition, cl.SIGNER_RESOLUTION_FAILED, result.reason)
        self.srv.inject("evidence", "status", status=404)
        missing = client.verify_evidence(evidence_id)
        self.assertEqual(
            (missing.disposition, missing.evidence_id), (cl.SIGNER_RESOLUTION_FAILED, evidence_id)
        )
        self.srv.inject(
            "evidence", "status", status=200, body=dict(envelope_body, evidence_id="1" * 64)
        )
        self.assertEqual(client.verify_evidence(evidence_id).disposition, cl.SIGNATURE_INVALID)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
        unreachable = self.client(base_url=closed, connect_timeout=0.5)
        result = unreachable.verify_evidence(envelope_body)
        self.assertEqual(result.disposition, cl.SIGNER_RESOLUTION_FAILED)
        self.assertIn("not on this client's server", result.reason)
        self.assertEqual(
            unreachable.verify_evidence(
                json.dumps(envelope_body), jwks=client.get_evidence_jwks().body
            ).disposition,
            cl.AUTHENTIC,
        )
        with self.assertRaisesRegex(ValueError, "^evidence_id_or_envelope: "):
            client.verify_evidence("not-an-id")
        with self.assertRaises(TypeError):
            client.verify_evidence(42)  # type: ignore[arg-type]


class TestKeyring(unittest.TestCase):
    def test_key_file_restart_and_rotate(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "evidence-key.json")
            with make_server(evidence_key=path) as first, CyclesClient(
                CyclesConfig(base_url=first.url, api_key=API_KEY)
            ) as client:
                evidence_id = client.create_reservation(create_body()).body["cycles_evidence"][
                    "evidence_id"
                ]
                archived = client.get_evidence(evidence_id).body
                first_kid = client.get_evidence_jwks().body["keys"][-1]["kid"]
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            self.assertEqual([("d" in key) for key in stored["keys"]], [True])
            with make_server(evidence_key=path) as same:
                self.assertEqual(same.evidence_keys()["keys"][-1]["kid"], first_kid)
            out = io.StringIO()
            argv = [
                "--port",
                "0",
                "--quiet",
                "--api-key",
                f"{API_KEY}={TENANT}",
                "--budget",
                "tenant:acme=USD_MICROCENTS:1000000",
                "--evidence-key",
                path,
                "--rotate",
            ]
            rotated = server_module._build_from_cli(argv, out)
            public = rotated.evidence_keys()
            self.assertEqual([key["kid"] == first_kid for key in public["keys"]], [True, False])
            self.assertEqual([key["status"] for key in public["keys"]], ["retired", "active"])
            self.assertNotIn('"d":', json.dumps(public))
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            self.assertEqual([("d" in key) for key in stored["keys"]], [False, True])
            # the archived envelope (its server is gone) verifies against the new set
            self.assertEqual(verify_evidence(archived, jwks=public).disposition, cl.AUTHENTIC)

    def test_the_public_keyring_round_trips_through_a_plain_dict(self) -> None:
        with make_server() as first:
            public = first.evidence_keys()
            self.assertNotIn('"d":', json.dumps(public))
            self.assertIn('"d":', json.dumps(first.evidence_keys(private=True)))
        restored = make_server(evidence_key=json.loads(json.dumps(public)))
        keys = restored.evidence_keys()["keys"]
        self.assertEqual(keys[0]["kid"], public["keys"][0]["kid"])
        self.assertEqual([key["status"] for key in keys], ["retired", "active"])
        private = make_server(evidence_key=first.evidence_keys(private=True)).evidence_keys()
        self.assertEqual(private, public)
        for bad in (
            {"keys": "x"},
            {"keys": [{"kid": "a"}]},
            {"keys": [jwk(KEY_A, "a"), jwk(KEY_B, "a")]},
        ):
            with self.assertRaises(ValueError):
                make_server(evidence_key=bad)

    def test_cli_flags(self) -> None:
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            server_module._build_from_cli(["--rotate"], io.StringIO())
        srv = server_module._build_from_cli(["--port", "0", "--evidence"], io.StringIO())
        self.assertEqual(len(srv.evidence_keys()["keys"]), 1)
        plain = server_module._build_from_cli(["--port", "0"], io.StringIO())
        with self.assertRaises(RuntimeError):
            plain.evidence_keys()
        implied = LocalCyclesServer(evidence_key=srv.evidence_keys(private=True))
        self.assertEqual(implied.evidence_keys(), srv.evidence_keys())
        with tempfile.TemporaryDirectory() as tmp:
            garbage = os.path.join(tmp, "key.json")
            with open(garbage, "w", encoding="utf-8") as handle:
                handle.write("not json")
            with self.assertRaisesRegex(ValueError, "^evidence key file .*key.json: "):
                server_module._build_from_cli(
                    ["--port", "0", "--evidence-key", garbage], io.StringIO()
                )


# ---------------------------------------------------------------------------
# CLI: python -m cycles_lite verify-evidence
# ---------------------------------------------------------------------------


class TestCli(ServerCase):
    def run_cli(self, *argv: str, base_url: Optional[str] = None) -> Tuple[int, str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
        if base_url is not None:
            environ.update(CYCLES_BASE_URL=base_url, CYCLES_API_KEY=API_KEY)
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, environ, clear=True), contextlib.redirect_stdout(
            out
        ), contextlib.redirect_stderr(err):
            code = cl.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def write(self, tmp: str, name: str, value: Any) -> str:
        path = os.path.join(tmp, name)
        with open(path, "wb") as handle:
            handle.write(value if isinstance(value, bytes) else json.dumps(value).encode())
        return path

    def test_verify_evidence(self) -> None:
        client = self.client()
        evidence_id = client.create_reservation(create_body()).body["cycles_evidence"][
            "evidence_id"
        ]
        with tempfile.TemporaryDirectory() as tmp:
            envelope_file = self.write(tmp, "envelope.json", client.get_evidence(evidence_id).body)
            jwks_file = self.write(tmp, "jwks.json", client.get_evidence_jwks().body)
            code, out, _ = self.run_cli("verify-evidence", envelope_file, "--jwks", jwks_file)
            self.assertEqual(code, 0)
            self.assertTrue(out.startswith("authentic: signature valid"))
            self.assertIn(evidence_id, out)
            code, out, _ = self.run_cli("verify-evidence", evidence_id, base_url=self.srv.url)
            self.assertEqual(code, 0)
            code, out, _ = self.run_cli(
                "--json", "verify-evidence", envelope_file, base_url=self.srv.url
            )
            self.assertEqual(
                (code, json.loads(out)["disposition"], json.loads(out)["ok"]),
                (0, "authentic", True),
            )
            code, out, _ = self.run_cli("verify-evidence", envelope_file)  # offline, no set
            self.assertEqual(code, 1)
            self.assertTrue(out.startswith("signer_resolution_failed"))
            with open(envelope_file, "rb") as handle:
                tampered = handle.read().replace(b'"amount": 1000', b'"amount": 1001')
            tampered_file = self.write(tmp, "tampered.json", tampered)
            code, out, _ = self.run_cli("verify-evidence", tampered_file, "--jwks", jwks_file)
            self.assertEqual(code, 1)
            self.assertTrue(out.startswith("signature_invalid"))
            raw = self.write(tmp, "raw.json", envelope())
            self.assertEqual(self.run_cli("verify-evidence", raw)[0], 1)  # binding_only, unpinned
            code, out, _ = self.run_cli(
                "verify-evidence", raw, "--expected-signer", KEY_A.public.hex()
            )
            self.assertEqual(code, 0)
            self.assertTrue(out.startswith("binding_only"))
            code, _, err = self.run_cli("verify-evidence", os.path.join(tmp, "missing.json"))
            self.assertEqual(code, 2)
            self.assertIn("verify-evidence:", err)
            self.assertEqual(self.run_cli("verify-evidence", raw, "--expected-signer", "xyz")[0], 2)
            self.assertEqual(
                self.run_cli("verify-evidence", evidence_id)[0], 2
            )  # no CYCLES_BASE_URL
