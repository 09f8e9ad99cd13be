"""Run unittest modules in several worker processes at once (standard library only).

    python3 -W error tools/run_tests.py [-j JOBS] [--record] test_a test_b ...

Many tests wait on real time (heartbeat cadence, TTL expiry, socket timeouts, forks),
so they overlap well even beyond the number of cores.  The unit of work is a test
class (a slow class is split into its tests); units go longest first, by the times in
tools/test_times.txt (``--record`` rewrites it), to whichever worker is free.  Each
worker is a fresh interpreter with the same ``-W``/``-X`` options, so every test
still runs as under ``python3 -m unittest``.  The output ends like unittest's: the
failures with their tracebacks, ``Ran N tests in Xs`` and ``OK``/``FAILED (...)``;
the exit status is non-zero on any failure or error.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import unittest
from typing import Any, Dict, List, Tuple

TIMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_times.txt")
SPLIT_CLASS_OVER_S = 4.0  # a class expected to take longer runs as one unit per test
UNKNOWN_TEST_S = 0.2  # expected time of a test not in the times file
SEPARATOR_BOLD = "=" * 70
SEPARATOR_THIN = "-" * 70


# --- the worker: runs the units it is sent, one JSON result line per unit ---------


def worker() -> None:
    """Read unit names from stdin; run each; answer on the original stdout.

    The tests' own prints go to stderr, so they cannot garble the answers."""
    with os.fdopen(os.dup(1), "w") as answers:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        for line in sys.stdin:
            answers.write(json.dumps(run_unit(line.strip())) + "\n")
            answers.flush()


class TimedResult(unittest.TestResult):
    """A TestResult that also notes how long each test took."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: Dict[str, float] = {}
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        self._started = time.perf_counter()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        self.seconds[test.id()] = time.perf_counter() - self._started

    def getDescription(self, test: unittest.TestCase) -> str:  # as TextTestResult words it
        doc = test.shortDescription()
        return f"{test}\n{doc}" if doc else str(test)


def run_unit(unit: str) -> Dict[str, Any]:
    result = TimedResult()
    started = time.perf_counter()
    unittest.defaultTestLoader.loadTestsFromName(unit).run(result)
    return {
        "unit": unit,
        "seconds": time.perf_counter() - started,
        "tests": result.seconds,
        "run": result.testsRun,
        "failures": [(result.getDescription(test), text) for test, text in result.failures],
        "errors": [(result.getDescription(test), text) for test, text in result.errors],
        "skipped": len(result.skipped),
        "expected_failures": len(result.expectedFailures),
        "unexpected_successes": [result.getDescription(t) for t in result.unexpectedSuccesses],
    }


# --- the parent: plan the units, feed the workers, print unittest's summary -------


def read_times() -> Dict[str, float]:
    times: Dict[str, float] = {}
    try:
        with open(TIMES_FILE) as lines:
            for line in lines:
                seconds, _, unit = line.partition(" ")
                times[unit.strip()] = float(seconds)
    except OSError:
        pass
    return times


def plan_units(modules: List[str], times: Dict[str, float]) -> List[Tuple[float, str]]:
    """The units to run with their expected seconds, longest first.

    Per module as ``python -m unittest`` loads it, so a class a module imports from
    another runs there too, as it does today."""
    units: List[Tuple[float, str]] = []
    for module in modules:
        classes: Dict[str, List[Tuple[float, str]]] = {}
        for test in iter_tests(unittest.defaultTestLoader.loadTestsFromName(module)):
            if type(test).__module__.startswith("unittest"):  # a module that fails to load
                classes.setdefault(module, [])
                continue
            name = f"{module}.{type(test).__name__}"
            expected = times.get(test.id(), UNKNOWN_TEST_S)
            classes.setdefault(name, []).append((expected, f"{name}.{test._testMethodName}"))
        for name, tests in classes.items():
            expected = sum(seconds for seconds, _ in tests)
            if expected > SPLIT_CLASS_OVER_S:
                units += tests
            else:
                units.append((times.get(name, expected or UNKNOWN_TEST_S), name))
    return sorted(units, reverse=True)


def iter_tests(suite: unittest.TestSuite) -> List[unittest.TestCase]:
    found: List[unittest.TestCase] = []
    for item in suite:
        found += iter_tests(item) if isinstance(item, unittest.TestSuite) else [item]
    return found


def run_parallel(modules: List[str], jobs: int) -> Tuple[List[Dict[str, Any]], float]:
    started = time.perf_counter()
    pending: queue.Queue[str] = queue.Queue()
    for _, unit in plan_units(modules, read_times()):
        pending.put(unit)
    results: List[Dict[str, Any]] = []
    options = [f"-W{w}" for w in sys.warnoptions]
    options += [f"-X{k}" if v is True else f"-X{k}={v}" for k, v in sys._xoptions.items()]
    command = [sys.executable, *options, os.path.abspath(__file__), "--worker"]

    def feed_one_worker() -> None:
        while not pending.empty():
            with subprocess.Popen(  # noqa: S603 - this interpreter, this script
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            ) as process:
                feed(process)

    def feed(process: subprocess.Popen[str]) -> None:
        """Send ``process`` units until none are left or it dies (reported, then replaced)."""
        assert process.stdin is not None and process.stdout is not None
        while True:
            try:
                unit = pending.get_nowait()
            except queue.Empty:
                return process.stdin.close()
            process.stdin.write(unit + "\n")
            answer = process.stdout.readline()
            if not answer:
                results.append(died(unit, process.wait()))
                return None
            results.append(json.loads(answer))

    threads = [threading.Thread(target=feed_one_worker) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def died(unit: str, status: int) -> Dict[str, Any]:
    text = f"the worker process running {unit} exited with status {status}\n"
    return {"unit": unit, "seconds": 0.0, "tests": {}, "run": 1, "failures": [],
            "errors": [(unit, text)], "skipped": 0, "expected_failures": 0,
            "unexpected_successes": []}


def report(results: List[Dict[str, Any]], seconds: float) -> bool:
    """Print the failures and unittest's closing lines; True when all passed."""
    out = sys.stderr  # where unittest's runner writes too
    total = {key: 0 for key in ("run", "skipped", "expected_failures")}
    failures, errors, unexpected = [], [], []
    for result in sorted(results, key=lambda r: r["unit"]):
        for key in total:
            total[key] += result[key]
        failures += result["failures"]
        errors += result["errors"]
        unexpected += result["unexpected_successes"]
    for flavour, found in (("ERROR", errors), ("FAIL", failures)):
        for description, text in found:
            out.write(f"{SEPARATOR_BOLD}\n{flavour}: {description}\n{SEPARATOR_THIN}\n{text}\n")
    run = total["run"]
    out.write(f"{SEPARATOR_THIN}\nRan {run} test{'s' if run != 1 else ''} in {seconds:.3f}s\n\n")
    details = [(name, count) for name, count in (
        ("failures", len(failures)), ("errors", len(errors)), ("skipped", total["skipped"]),
        ("expected failures", total["expected_failures"]),
        ("unexpected successes", len(unexpected))) if count]
    passed = not failures and not errors and not unexpected
    words = ", ".join(f"{name}={count}" for name, count in details)
    out.write(("OK" if passed else "FAILED") + (f" ({words})" if words else "") + "\n")
    return passed


def record_times(results: List[Dict[str, Any]]) -> None:
    times = read_times()
    for result in results:
        times[result["unit"]] = result["seconds"]
        times.update(result["tests"])
    with open(TIMES_FILE, "w") as out:
        for unit, seconds in sorted(times.items(), key=lambda item: (-item[1], item[0])):
            out.write(f"{seconds:.2f} {unit}\n")


def main(argv: List[str]) -> int:
    sys.path[0] = os.getcwd()  # import the tests as `python -m unittest` does, not tools/
    if argv[:1] == ["--worker"]:
        worker()
        return 0
    jobs, record, modules = 6, False, []
    args = iter(argv)
    for arg in args:
        if arg == "-j":
            jobs = int(next(args))
        elif arg.startswith("-j"):
            jobs = int(arg[2:])
        elif arg == "--record":
            record = True
        else:
            modules.append(arg)
    results, seconds = run_parallel(modules, max(1, jobs))
    if record:
        record_times(results)
    return 0 if report(results, seconds) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
