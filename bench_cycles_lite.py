#!/usr/bin/env python3
"""Benchmark cycles_lite against the official client ``runcycles`` in the same run.

Run it with ``make bench`` (which installs runcycles into a throwaway venv). Every
number is measured in this run, on this machine, against one local
``cycles_lite_server`` started as a separate process, so that the client's CPU time
is the client's alone. Results are ratios, never absolute targets.

What is measured:

- import time of each client in a fresh interpreter (median of several runs);
- N sequential create+commit pairs through each client's low-level API, over HTTP
  and HTTPS, with a floor: the same requests sent with raw ``http.client`` on one
  kept-alive connection;
- N decorated calls (``@cycles`` on a trivial function): latency, client CPU and
  threads started per call, with and without the commit journal;
- async: 200 concurrent decorated ``async def`` calls against a stub server that answers
  every request after a fixed delay (20 ms and 50 ms, a remote server): calls/s, median
  and p90 call latency, peak threads (``--async-only`` runs just this section).

Usage: ``python bench_cycles_lite.py [--pairs N] [--calls N] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
API_KEY = "bench-key"
TENANT = "bench"
CLIENTS = ("cycles_lite", "runcycles")


# ---------------------------------------------------------------------------
# Workers: each runs in a fresh interpreter and prints one JSON line.
# ---------------------------------------------------------------------------

def _import_client(name: str) -> Any:
    if name == "cycles_lite":
        sys.path.insert(0, HERE)
    return __import__(name)


def _worker_import(name: str) -> Dict[str, Any]:
    before = set(sys.modules)
    start = time.perf_counter()
    _import_client(name)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "modules": len(set(sys.modules) - before)}


def _config(lib: Any, url: str, journal: bool) -> Any:
    return lib.CyclesConfig(
        base_url=url, api_key=API_KEY, tenant=TENANT,
        journal_enabled=journal, journal_dir=tempfile.mkdtemp(prefix="bench-journal-"),
    )


def _worker_pairs(name: str, url: str, pairs: int) -> Dict[str, Any]:
    lib = _import_client(name)
    client = lib.CyclesClient(_config(lib, url, journal=False))
    subject = lib.Subject(tenant=TENANT, agent="bench")
    action = lib.Action(kind="llm.completion", name="bench-model")

    def one_pair(i: int) -> None:
        created = client.create_reservation(lib.ReservationCreateRequest(
            idempotency_key=f"{name}-c-{i}-{time.time_ns()}", subject=subject, action=action,
            estimate=lib.Amount(unit=lib.Unit.USD_MICROCENTS, amount=1000), ttl_ms=60_000,
        ))
        rid = created.get_body_attribute("reservation_id")
        committed = client.commit_reservation(rid, lib.CommitRequest(
            idempotency_key=f"{name}-m-{i}-{time.time_ns()}",
            actual=lib.Amount(unit=lib.Unit.USD_MICROCENTS, amount=900),
        ))
        if not committed.is_success:
            raise RuntimeError(f"commit failed: {committed.status} {committed.body}")

    return _timed_loop(one_pair, pairs, close=client.close)


def _count_thread_starts() -> List[int]:
    """Count every ``threading.Thread.start`` from now on, in the returned cell."""
    import threading

    started = [0]
    original_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started[0] += 1
        original_start(self)

    threading.Thread.start = counting_start  # type: ignore[method-assign]
    return started


def _worker_decorated(name: str, url: str, calls: int, journal: bool) -> Dict[str, Any]:

    lib = _import_client(name)
    client = lib.CyclesClient(_config(lib, url, journal=journal))
    started = _count_thread_starts()

    @lib.cycles(estimate=1000, actual=900, action_kind="llm.completion",
                action_name="bench-model", agent="bench", client=client)
    def guarded() -> str:
        return "ok"

    entries = _function_entries(lib, guarded)
    result = _timed_loop(lambda i: guarded(), calls, close=client.close, count=started)
    result["threads_per_call"] = result.pop("counted") / calls
    result.update(entries)
    return result


def _function_entries(lib: Any, call: Any, warm: int = 20, measured: int = 20) -> Dict[str, float]:
    """Python function entries per warm call on the caller's thread (generator
    resumptions included, as ``sys.setprofile`` reports them): inside the client
    library, and in all (the standard library's included)."""
    for _ in range(warm):
        call()
    home = os.path.dirname(lib.__file__) if lib.__file__.endswith("__init__.py") else lib.__file__
    counts = {"library": 0, "all": 0}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            counts["all"] += 1
            if frame.f_code.co_filename.startswith(home):
                counts["library"] += 1

    sys.setprofile(profile)
    try:
        for _ in range(measured):
            call()
    finally:
        sys.setprofile(None)
    return {"library_entries_per_call": counts["library"] / measured,
            "all_entries_per_call": counts["all"] / measured}


def _worker_raw(url: str, pairs: int) -> Dict[str, Any]:
    import http.client
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port)
    headers = {"Content-Type": "application/json", "X-Cycles-API-Key": API_KEY}

    def post(path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        conn.request("POST", path, json.dumps(body).encode(), headers)
        response = conn.getresponse()
        data: Dict[str, Any] = json.loads(response.read())
        return data

    def one_pair(i: int) -> None:
        stamp = time.time_ns()
        created = post("/v1/reservations", {
            "idempotency_key": f"raw-c-{i}-{stamp}",
            "subject": {"tenant": TENANT, "agent": "bench"},
            "action": {"kind": "llm.completion", "name": "bench-model"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": 1000}, "ttl_ms": 60_000,
        })
        post(f"/v1/reservations/{created['reservation_id']}/commit", {
            "idempotency_key": f"raw-m-{i}-{stamp}",
            "actual": {"unit": "USD_MICROCENTS", "amount": 900},
        })

    return _timed_loop(one_pair, pairs, close=conn.close)


def _timed_loop(step: Any, n: int, close: Any, count: Optional[List[int]] = None) -> Dict[str, Any]:
    for i in range(min(20, n)):  # warm-up: connections, lazy imports, first-call caches
        step(-1 - i)
    if count is not None:
        count[0] = 0
    latencies = []
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    close()
    result = {
        "median_ms": statistics.median(latencies) * 1000,
        "p90_ms": sorted(latencies)[int(0.9 * (n - 1))] * 1000,
        "cpu_ms_per_op": cpu / n * 1000,
        "wall_s": wall,
    }
    if count is not None:
        result["counted"] = count[0]
    return result


def _worker_main(argv: Sequence[str]) -> int:
    kind, *rest = argv
    if kind == "import":
        out = _worker_import(rest[0])
    elif kind == "pairs":
        out = _worker_pairs(rest[0], rest[1], int(rest[2]))
    elif kind == "decorated":
        out = _worker_decorated(rest[0], rest[1], int(rest[2]), rest[3] == "journal")
    elif kind == "raw":
        out = _worker_raw(rest[0], int(rest[1]))
    elif kind == "async":
        out = _worker_async(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif kind == "stub":
        return _stub_server(int(rest[0]))
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def _run_worker(args: Sequence[str], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    cmd = [sys.executable, "-E", "-s", os.path.abspath(__file__), "--worker", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class _Server:
    """cycles_lite_server in its own process, so client CPU is measured alone."""

    def __init__(self, tls: Optional[tuple] = None) -> None:
        cmd = [sys.executable, "-m", "cycles_lite_server", "--port", "0", "--quiet",
               "--api-key", f"{API_KEY}={TENANT}",
               "--budget", f"tenant:{TENANT}=USD_MICROCENTS:{10**15}"]
        if tls:
            cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        self.proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = next(word for word in line.split() if word.startswith("http"))
        if tls:  # the certificate is issued for "localhost"
            self.url = self.url.replace("127.0.0.1", "localhost")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def _make_cert(directory: str) -> Optional[tuple]:
    if not shutil.which("openssl"):
        return None
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    return cert, key


def _median_of(runs: List[Dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _compare(
    label: str, measure: Any, rounds: int, pick: Any = statistics.median
) -> Dict[str, Dict[str, float]]:
    """Alternate the clients round by round so drift hits both alike; ``pick`` summarises
    each client's rounds (the median; the minimum for import time, where noise only adds)."""
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CLIENTS}
    for _ in range(rounds):
        for name in CLIENTS:
            runs[name].append(measure(name))
    summary = {}
    for name in CLIENTS:
        summary[name] = {key: pick([run[key] for run in runs[name]]) for key in runs[name][0]}
    print(f"  {label}: " + ", ".join(
        f"{name} {summary[name].get('median_ms', summary[name].get('seconds', 0)):.3f}"
        for name in CLIENTS), file=sys.stderr)
    return summary


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker_main(argv[1:])
    if argv and argv[0] in ("--server", "--server-worker"):
        return server_main(argv[1:] if argv[0] == "--server" else argv)
    if argv and argv[0] == "--code-lines":
        return _code_lines_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--skip-decorated", action="store_true",
                        help="measure the low-level client only")
    parser.add_argument("--async-calls", type=int, default=200)
    parser.add_argument("--async-only", action="store_true",
                        help="measure only the concurrent async section")
    args = parser.parse_args(argv)
    try:
        import runcycles  # noqa: F401
    except ImportError:
        print("runcycles is not installed: run `make bench`", file=sys.stderr)
        return 2
    if args.async_only:
        print(_async_table(_async_section(args)))
        return 0

    results: Dict[str, Any] = {}
    rows: List[str] = []
    print("measuring import time", file=sys.stderr)
    imports = _compare("import", lambda name: _run_worker(["import", name]), rounds=9, pick=min)
    results["import"] = imports
    rows.append(_row("import time, best of 9 (ms)", imports["cycles_lite"]["seconds"] * 1000,
                     imports["runcycles"]["seconds"] * 1000))
    rows.append(_row("modules loaded by import", imports["cycles_lite"]["modules"],
                     imports["runcycles"]["modules"], digits=0))

    with tempfile.TemporaryDirectory() as tmp:
        tls = _make_cert(tmp)
        schemes = [("http", None)] + ([("https", tls)] if tls else [])
        for scheme, tls_files in schemes:
            server = _Server(tls_files)
            env = dict(os.environ, SSL_CERT_FILE=tls_files[0]) if tls_files else None
            try:
                print(f"measuring {scheme} create+commit pairs", file=sys.stderr)
                pairs_args = ["pairs", "", server.url, str(args.pairs)]
                pairs = _compare(
                    f"{scheme} pairs",
                    lambda name, a=pairs_args, e=env: _run_worker([a[0], name, *a[2:]], e),
                    args.rounds)
                floor = [_run_worker(["raw", server.url, str(args.pairs)], env)
                         for _ in range(args.rounds)]
                pairs["raw http.client"] = {"median_ms": _median_of(floor, "median_ms"),
                                            "cpu_ms_per_op": _median_of(floor, "cpu_ms_per_op")}
                results[f"pairs_{scheme}"] = pairs
                rows.append(_row(f"create+commit over {scheme.upper()}, median ms",
                                 pairs["cycles_lite"]["median_ms"], pairs["runcycles"]["median_ms"],
                                 floor=pairs["raw http.client"]["median_ms"]))
                rows.append(_row(f"create+commit over {scheme.upper()}, client CPU ms",
                                 pairs["cycles_lite"]["cpu_ms_per_op"],
                                 pairs["runcycles"]["cpu_ms_per_op"],
                                 floor=pairs["raw http.client"]["cpu_ms_per_op"]))
                if scheme == "http" and not args.skip_decorated:
                    _decorated_rows(server.url, args, results, rows)
            finally:
                server.close()

    table = _table(rows)
    print(table)
    results["async"] = _async_section(args)
    print()
    print(_async_table(results["async"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


def _decorated_rows(url: str, args: argparse.Namespace, results: Dict[str, Any],
                    rows: List[str]) -> None:
    for journal in ("journal", "nojournal"):
        print(f"measuring decorated calls ({journal})", file=sys.stderr)
        decorated = _compare(
            f"decorated {journal}",
            lambda name, j=journal: _run_worker(["decorated", name, url, str(args.calls), j]),
            args.rounds)
        results[f"decorated_{journal}"] = decorated
        label = "with journal" if journal == "journal" else "journal off"
        lite, official = decorated["cycles_lite"], decorated["runcycles"]
        rows.append(_row(f"@cycles call ({label}), median ms",
                         lite["median_ms"], official["median_ms"]))
        rows.append(_row(f"@cycles call ({label}), client CPU ms",
                         lite["cpu_ms_per_op"], official["cpu_ms_per_op"]))
        rows.append(_row(f"@cycles call ({label}), threads started per call",
                         lite["threads_per_call"], official["threads_per_call"], digits=2))
        rows.append(_row(f"@cycles call ({label}), function entries in the library",
                         lite["library_entries_per_call"], official["library_entries_per_call"],
                         digits=0))
        rows.append(_row(f"@cycles call ({label}), all Python function entries",
                         lite["all_entries_per_call"], official["all_entries_per_call"],
                         digits=0))


def _row(label: str, lite: float, official: float, floor: Optional[float] = None,
         digits: int = 3) -> str:
    floor_cell = f"{floor:.{digits}f}" if floor is not None else ""
    return (f"| {label} | {lite:.{digits}f} | {official:.{digits}f} | "
            f"{_ratio(lite, official)} | {floor_cell} |")


def _table(rows: List[str]) -> str:
    head = ("| measure | cycles_lite | runcycles 0.5.3 | lite / official "
            "| raw http.client floor |\n|---|---:|---:|---:|---:|")
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------
# Server (issue 10): memory per lifecycle, list cost at 100k rows, p99 under
# concurrent lists, restart replay. `python bench_cycles_lite.py --server`
# ---------------------------------------------------------------------------

SERVER_ADMIN_KEY = "bench-admin"


def _server_http(port: int) -> Any:
    import http.client

    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def _server_call(conn: Any, method: str, path: str, body: Any = None,
                 admin: bool = False) -> Any:
    headers = {"X-Admin-API-Key": SERVER_ADMIN_KEY} if admin else {"X-Cycles-API-Key": API_KEY}
    payload = None if body is None else json.dumps(body)
    if payload is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


def _lifecycle(conn: Any, key: str) -> None:
    """One reserve -> commit over HTTP."""
    status, body = _server_call(conn, "POST", "/v1/reservations", {
        "idempotency_key": "r-" + key, "subject": {"tenant": TENANT},
        "action": {"kind": "llm", "name": "bench"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 10}})
    assert status == 200, body
    status, body = _server_call(conn, "POST", f"/v1/reservations/{body['reservation_id']}/commit",
                                {"idempotency_key": "c-" + key,
                                 "actual": {"unit": "USD_MICROCENTS", "amount": 10}})
    assert status == 200, body


def _server_instance(**settings: Any) -> Any:
    sys.path.insert(0, HERE)
    from cycles_lite_server import LocalCyclesServer

    return LocalCyclesServer(
        api_keys={API_KEY: TENANT}, admin_keys=[SERVER_ADMIN_KEY],
        budgets=[{"scope": f"tenant:{TENANT}", "allocated": 10**15}], **settings)


def _server_memory(lifecycles: int) -> Dict[str, Any]:
    """Traced Python memory of an in-process server: the request log filled first,
    then ``lifecycles`` reserve->commit pairs, then past the retention window."""
    import tracemalloc

    tracemalloc.start()
    srv = _server_instance(retention_s=3600).start()
    srv.clock.freeze()
    conn = _server_http(srv.port)
    baseline = tracemalloc.get_traced_memory()[0]
    for index in range(6000):  # 12k requests: the request log is at its cap
        _lifecycle(conn, f"warm{index}")
    warm = tracemalloc.get_traced_memory()[0]
    for index in range(lifecycles):
        _lifecycle(conn, f"m{index}")
    grown = tracemalloc.get_traced_memory()[0]
    srv.clock.advance(3_601_000)
    while srv._ledger._reservations or srv._ledger._idempotency:  # each request prunes a batch
        _server_call(conn, "GET", f"/v1/balances?tenant={TENANT}")
    pruned = tracemalloc.get_traced_memory()[0]
    srv.clear_requests()  # the request log is bounded, but not part of any lifecycle
    cleared = tracemalloc.get_traced_memory()[0]
    conn.close()
    srv.stop()
    tracemalloc.stop()
    per_10k = 10_000 / lifecycles
    return {
        "request_log_and_warmup_mb": (warm - baseline) / 1e6,
        "growth_per_10k_lifecycles_mb": (grown - warm) * per_10k / 1e6,
        "after_retention_vs_before_lifecycles_mb": (pruned - warm) / 1e6,
        "after_retention_vs_start_mb": (pruned - baseline) / 1e6,
        "after_retention_and_log_cleared_vs_start_mb": (cleared - baseline) / 1e6,
    }


def _server_worker(rows: int) -> int:
    """A server seeded with ``rows`` committed reservations (through the ledger,
    not HTTP, to save minutes); prints its port and the state save/load times."""
    import hashlib

    srv = _server_instance(max_connections=64)
    ledger = srv._ledger
    for index in range(rows):
        body = {"idempotency_key": f"seed{index}", "subject": {"tenant": TENANT},
                "action": {"kind": "llm", "name": "seed"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": 10}}
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        created = ledger.create(TENANT, body, digest)
        caller = type("Caller", (), {"tenant": TENANT, "admin": False})()
        ledger.commit(caller, created.body["reservation_id"],
                      {"idempotency_key": f"c{index}",
                       "actual": {"unit": "USD_MICROCENTS", "amount": 10}}, digest)
    folder = tempfile.mkdtemp()
    try:
        srv._state = None
        from cycles_lite_server import _StateFile

        state = _StateFile(os.path.join(folder, "state.json"), 3600)
        start = time.perf_counter()
        state.save(srv._state_sections, ledger.changes, force=True)
        saved = time.perf_counter() - start
        size = os.path.getsize(state.path)
        start = time.perf_counter()
        _StateFile(state.path, 3600).load(_server_instance()._state_sections)
        loaded = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    srv.start()
    print(json.dumps({"port": srv.port, "state_save_s": saved, "state_load_s": loaded,
                      "state_mb": size / 1e6}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    srv.stop()
    return 0


def _percentiles(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": ordered[len(ordered) // 2] * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            "max_ms": ordered[-1] * 1000}


def _timed_calls(step: Any, count: int) -> List[float]:
    samples = []
    for index in range(count):
        start = time.perf_counter()
        step(index)
        samples.append(time.perf_counter() - start)
    return samples


def _in_background(step: Any, pause_s: float) -> Any:
    """Run ``step`` in a loop on a thread until the returned stop() is called."""
    import threading

    stopping = threading.Event()

    def loop() -> None:
        index = 0
        while not stopping.is_set():
            step(index)
            index += 1
            stopping.wait(pause_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join()

    return stop


def _server_latency(rows: int, lists: int, lifecycles: int) -> Dict[str, Any]:
    worker = subprocess.Popen([sys.executable, __file__, "--server-worker", str(rows)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None and worker.stdin is not None
    started = json.loads(worker.stdout.readline())
    port = started["port"]
    results: Dict[str, Any] = {"rows": rows, "state_save_s": started["state_save_s"],
                               "state_load_s": started["state_load_s"],
                               "state_mb": started["state_mb"]}
    try:
        lister, loader = _server_http(port), _server_http(port)
        page = f"/v1/reservations?tenant={TENANT}&limit=50"

        def list_once(_: int) -> None:
            status, body = _server_call(lister, "GET", page)
            assert status == 200 and len(body["reservations"]) == 50, body

        results["list_idle"] = _percentiles(_timed_calls(list_once, lists))
        stop = _in_background(lambda i: _lifecycle(loader, f"bg{i}"), 0.0)
        results["list_under_reserve_commit_load"] = _percentiles(_timed_calls(list_once, lists))
        stop()
        results["reserve_commit_idle"] = _percentiles(
            _timed_calls(lambda i: _lifecycle(loader, f"idle{i}"), lifecycles))
        background_lister = _server_http(port)
        stop = _in_background(lambda i: _server_call(background_lister, "GET", page), 0.05)
        results["reserve_commit_with_lists_every_50ms"] = _percentiles(
            _timed_calls(lambda i: _lifecycle(loader, f"busy{i}"), lifecycles))
        stop()
    finally:
        worker.stdin.close()
        worker.wait(60)
    return results


def _server_restart_replay() -> Dict[str, Any]:
    """Event + reserve + commit, SIGTERM, restart with only --state, replay every key."""
    import signal

    folder = tempfile.mkdtemp()
    state = os.path.join(folder, "state.json")

    def launch(*extra: str) -> Any:
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "cycles_lite_server.py"), "--port", "0",
             "--quiet", "--state", state, *extra], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1].split()[0])
        return process, _server_http(port)

    def stop(process: Any) -> None:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)

    event = {"idempotency_key": "e1", "subject": {"tenant": TENANT},
             "action": {"kind": "tool", "name": "search"},
             "actual": {"unit": "USD_MICROCENTS", "amount": 25}}
    reserve = {"idempotency_key": "r1", "subject": {"tenant": TENANT},
               "action": {"kind": "llm", "name": "chat"},
               "estimate": {"unit": "USD_MICROCENTS", "amount": 100}}
    try:
        process, conn = launch("--api-key", f"{API_KEY}={TENANT}",
                               "--budget", f"tenant:{TENANT}=USD_MICROCENTS:1000")
        first_event = _server_call(conn, "POST", "/v1/events", event)
        first_reserve = _server_call(conn, "POST", "/v1/reservations", reserve)
        commit_path = f"/v1/reservations/{first_reserve[1]['reservation_id']}/commit"
        commit = {"idempotency_key": "c1", "actual": {"unit": "USD_MICROCENTS", "amount": 80}}
        first_commit = _server_call(conn, "POST", commit_path, commit)
        before = _server_call(conn, "GET", f"/v1/balances?tenant={TENANT}")[1]
        stop(process)
        process, conn = launch()
        replays = [_server_call(conn, "POST", "/v1/events", event),
                   _server_call(conn, "POST", "/v1/reservations", reserve),
                   _server_call(conn, "POST", commit_path, commit)]
        after = _server_call(conn, "GET", f"/v1/balances?tenant={TENANT}")[1]
        stop(process)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    def settled(response: Any) -> Any:  # remaining_ttl_ms is live by design: 0 once committed
        status, body = response
        return status, {k: v for k, v in body.items() if k != "remaining_ttl_ms"}

    originals = [first_event, first_reserve, first_commit]
    return {
        "replays_identical_but_remaining_ttl_ms":
            [settled(r) for r in replays] == [settled(r) for r in originals],
        "balances_unchanged": before == after,
        "spent_after_restart": after["balances"][0]["spent"]["amount"],
    }


def server_main(argv: Sequence[str]) -> int:
    """Measure the local server as an all-day development server (issue 10)."""
    if argv and argv[0] == "--server-worker":
        return _server_worker(int(argv[1]))
    parser = argparse.ArgumentParser(description=server_main.__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--lifecycles", type=int, default=10_000,
                        help="for the memory figure")
    parser.add_argument("--samples", type=int, default=300,
                        help="list calls and reserve->commit pairs timed per case")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = {
        "memory": _server_memory(args.lifecycles),
        "latency": _server_latency(args.rows, args.samples, args.samples),
        "restart_replay": _server_restart_replay(),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


# ---------------------------------------------------------------------------
# Code lines: non-blank, non-comment lines outside docstrings, counted with tokenize.
# ``python bench_cycles_lite.py --code-lines [FILE ...]`` (default: cycles_lite.py).
# ---------------------------------------------------------------------------

def count_code_lines(path: str) -> int:
    """Lines holding a token other than a comment, a line break or a docstring."""
    import io
    import token
    import tokenize

    with open(path, "rb") as handle:
        tokens = list(tokenize.tokenize(io.BytesIO(handle.read()).readline))
    skip = {token.COMMENT, token.NL, token.NEWLINE, token.INDENT, token.DEDENT,
            token.ENCODING, token.ENDMARKER}
    lines = set()
    previous = token.NEWLINE  # a string opening a logical line is a docstring
    for tok in tokens:
        if tok.type in skip:
            if tok.type in (token.NEWLINE, token.INDENT, token.DEDENT):
                previous = token.NEWLINE
            continue
        is_docstring = tok.type == token.STRING and previous == token.NEWLINE
        previous = tok.type
        if not is_docstring:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def _code_lines_main(paths: Sequence[str]) -> int:
    for path in paths or [os.path.join(HERE, "cycles_lite.py")]:
        print(f"{count_code_lines(path)} code lines in {os.path.relpath(path)}")
    return 0

# ---------------------------------------------------------------------------
# Async: many concurrent decorated calls against a server with added latency
# ---------------------------------------------------------------------------

ASYNC_DELAYS_MS = (20, 50)
# (label, client, max_connections): both clients with their defaults (100 connections
# each: httpx's pool and cycles_lite's cap), and cycles_lite with the cap raised to the
# batch size, to show what the cap costs.
ASYNC_VARIANTS = (("cycles_lite", "cycles_lite", 0), ("runcycles", "runcycles", 0),
                  ("cycles_lite, max_connections=200", "cycles_lite", 200))


def _stub_server(delay_ms: int) -> int:
    """A minimal keep-alive HTTP/1.1 server (own process) answering create, commit and
    extend after ``delay_ms``, concurrently: a remote Cycles server, as the client sees it."""
    import asyncio
    import itertools

    ids = itertools.count()
    amount = {"unit": "USD_MICROCENTS", "amount": 900}

    def answer(method: str, path: str) -> Dict[str, Any]:
        now_ms = int(time.time() * 1000)
        if path.endswith("/commit"):
            return {"status": "COMMITTED", "charged": amount}
        if path.endswith("/extend"):
            return {"status": "ACTIVE", "expires_at_ms": now_ms + 60_000}
        if path.endswith("/release"):
            return {"status": "RELEASED", "released": amount}
        return {"decision": "ALLOW", "reservation_id": f"stub-{next(ids)}",
                "reserved": {"unit": "USD_MICROCENTS", "amount": 1000},
                "expires_at_ms": now_ms + 60_000, "remaining_ttl_ms": 60_000,
                "scope_path": f"tenant:{TENANT}", "affected_scopes": [f"tenant:{TENANT}"]}

    async def handle(reader: Any, writer: Any) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if length:
                    await reader.readexactly(length)
                await asyncio.sleep(delay_ms / 1000.0)
                body = json.dumps(answer(method, path)).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


def _worker_async(name: str, url: str, calls: int, max_connections: int = 0) -> Dict[str, Any]:
    """``calls`` concurrent decorated async calls (create + commit each), after a warm-up.
    ``max_connections`` (cycles_lite only, 0 = the default) sets its connection cap."""
    import asyncio
    import threading

    lib = _import_client(name)
    started = _count_thread_starts()

    async def run() -> Dict[str, Any]:
        config = _config(lib, url, journal=False)
        if max_connections:
            config.max_connections = max_connections
        client = lib.AsyncCyclesClient(config)

        @lib.cycles(estimate=1000, actual=900, action_kind="llm.completion",
                    action_name="bench-model", agent="bench", client=client)
        async def guarded() -> str:
            return "ok"

        async def timed() -> float:
            t0 = time.perf_counter()
            await guarded()
            return time.perf_counter() - t0

        peak = [threading.active_count()]
        done = asyncio.Event()

        async def sample_threads() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], threading.active_count())
                await asyncio.sleep(0.005)

        await asyncio.gather(*(timed() for _ in range(20)))  # warm-up
        started[0] = 0
        sampler = asyncio.ensure_future(sample_threads())
        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        latencies = await asyncio.gather(*(timed() for _ in range(calls)))
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        done.set()
        await sampler
        close = getattr(client, "aclose", None) or client.close
        closing = close()
        if asyncio.iscoroutine(closing):
            await closing
        ordered = sorted(latencies)
        return {
            "calls_per_s": calls / wall,
            "median_s": statistics.median(ordered),
            "p90_s": ordered[int(0.9 * (calls - 1))],
            "peak_threads": peak[0],
            "threads_started": started[0],
            "cpu_ms_per_call": cpu / calls * 1000,
        }

    return asyncio.run(run())


class _StubServer(_Server):
    def __init__(self, delay_ms: int) -> None:  # the stub instead of cycles_lite_server
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "stub", str(delay_ms)]
        self.proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = next(word for word in line.split() if word.startswith("http"))


def _async_section(args: argparse.Namespace) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    for delay in ASYNC_DELAYS_MS:
        server = _StubServer(delay)
        try:
            print(f"measuring {args.async_calls} concurrent async calls, {delay} ms server",
                  file=sys.stderr)
            runs: Dict[str, List[Dict[str, Any]]] = {label: [] for label, *_ in ASYNC_VARIANTS}
            for _ in range(args.rounds):
                for label, name, cap in ASYNC_VARIANTS:
                    runs[label].append(_run_worker(
                        ["async", name, server.url, str(args.async_calls), str(cap)]))
            results[f"{delay}ms"] = {
                label: {key: statistics.median(run[key] for run in runs[label])
                        for key in runs[label][0]}
                for label in runs
            }
        finally:
            server.close()
    return results


def _async_table(results: Dict[str, Any]) -> str:
    lines = ["| server delay | client | calls/s | median call s | p90 call s | peak threads "
             "| threads started | client CPU ms/call |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for delay, by_client in results.items():
        for name, r in by_client.items():
            lines.append(f"| {delay} | {name} | {r['calls_per_s']:.0f} | {r['median_s']:.3f} | "
                         f"{r['p90_s']:.3f} | {r['peak_threads']:.0f} | "
                         f"{r['threads_started']:.0f} | {r['cpu_ms_per_call']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
