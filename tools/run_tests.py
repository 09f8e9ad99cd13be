"""Run unittest modules in several worker processes at once (standard library only).

    python3 -W error tools/run_tests.py [-j JOBS] [--record] test_a test_b ...

Many tests wait on real time (heartbeat cadence, TTL expiry, socket timeouts, forks),
so they overlap well even beyond the number of cores.  The unit of work is a test
class (a slow class is split into its tests); units go longest first, by the times in
tools/test_times.txt (``--record`` rewrites it), to whichever worker is free.  The
workers are forks of this process taken once it has imported the tests (as
``python3 -m unittest`` would, with the same ``-W``/``-X`` options), so no worker
spends CPU importing them again.  The output ends like unittest's: the failures with
their tracebacks, ``Ran N tests in Xs`` and ``OK``/``FAILED (...)``; the exit status
is non-zero on any failure or error.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import sys
import threading
import time
import traceback
import unittest
from typing import IO, Any, Dict, List, Tuple

TIMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_times.txt")
SPLIT_CLASS_OVER_S = 4.0  # a class expected to take longer runs as one unit per test
UNKNOWN_TEST_S = 0.2  # expected time of a test not in the times file
SEPARATOR_BOLD = "=" * 70
SEPARATOR_THIN = "-" * 70


# --- the worker: runs the units it is sent, one JSON result line per unit ---------


def serve(units: IO[str], answers: IO[str]) -> None:
    """In a worker: run each unit named on ``units``; one JSON line on ``answers`` each."""
    for line in units:
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
    started, cpu = time.perf_counter(), sum(os.times()[:4])
    unittest.defaultTestLoader.loadTestsFromName(unit).run(result)
    return {
        "unit": unit,
        "seconds": time.perf_counter() - started,
        "cpu": sum(os.times()[:4]) - cpu,
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
        if not is_module(module):  # a class or a test named by hand: run it as it is
            units.append((times.get(module, UNKNOWN_TEST_S), module))
            continue
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
                units.append((expected or UNKNOWN_TEST_S, name))
    return sorted(units, reverse=True)


def is_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return "." not in name  # a module that fails to import: its error is reported
    return True


def iter_tests(suite: unittest.TestSuite) -> List[unittest.TestCase]:
    found: List[unittest.TestCase] = []
    for item in suite:
        found += iter_tests(item) if isinstance(item, unittest.TestSuite) else [item]
    return found


def run_parallel(modules: List[str], jobs: int) -> Tuple[List[Dict[str, Any]], float]:
    started = time.perf_counter()
    pending: queue.Queue[str] = queue.Queue()
    for _, unit in plan_units(modules, read_times()):  # imports the tests, once, here
        pending.put(unit)
    results: List[Dict[str, Any]] = []
    if not hasattr(os, "fork"):  # pragma: no cover - one process, as unittest would
        results += [run_unit(pending.get()) for _ in range(pending.qsize())]
        return results, time.perf_counter() - started
    workers = start_workers(jobs)  # before any thread of ours: a fork copies only the caller

    def feed(send: IO[str], receive: IO[str], pid: int) -> None:
        """Send the worker units until none are left; if it dies, report the unit it had
        (the other workers run the rest)."""
        with send, receive:
            while True:
                try:
                    unit = pending.get_nowait()
                except queue.Empty:
                    break
                send.write(unit + "\n")
                send.flush()
                answer = receive.readline()
                if not answer:
                    results.append(died(unit, "died in its worker process"))
                    break
                results.append(json.loads(answer))
        os.waitpid(pid, 0)

    threads = [threading.Thread(target=feed, args=worker) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while not pending.empty():  # every worker died before it
        results.append(died(pending.get(), "was never run: every worker had died"))
    return results, time.perf_counter() - started


def start_workers(jobs: int) -> List[Tuple[IO[str], IO[str], int]]:
    """Fork ``jobs`` workers; each has the tests imported already (no import per worker)."""
    workers: List[Tuple[IO[str], IO[str], int]] = []
    parent_ends: List[int] = []
    for _ in range(jobs):
        units_read, units_write = os.pipe()
        answers_read, answers_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: it keeps its own two ends only
            for fd in (*parent_ends, units_write, answers_read):
                os.close(fd)
            status = 1
            try:
                with os.fdopen(units_read) as units, os.fdopen(answers_write, "w") as answers:
                    serve(units, answers)
                status = 0
            except BaseException:  # the parent reports the unit it was running
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(units_read)
        os.close(answers_write)
        parent_ends += [units_write, answers_read]
        workers.append((os.fdopen(units_write, "w"), os.fdopen(answers_read), pid))
    return workers


def died(unit: str, what: str) -> Dict[str, Any]:
    text = f"{unit} {what}\n"
    return {"unit": unit, "seconds": 0.0, "cpu": 0.0, "tests": {}, "run": 1, "failures": [],
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
    """Each test's seconds (a class is expected to take the sum of its tests'); the
    tests this run did not include keep theirs."""
    times = read_times()
    for result in results:
        times.update(result["tests"])
    with open(TIMES_FILE, "w") as out:
        for unit, seconds in sorted(times.items(), key=lambda item: (-item[1], item[0])):
            out.write(f"{seconds:.2f} {unit}\n")
    modules: Dict[str, List[float]] = {}
    for result in results:
        totals = modules.setdefault(result["unit"].split(".")[0], [0, 0.0, 0.0])
        totals[0] += result["run"]
        totals[1] += result["seconds"]
        totals[2] += result["cpu"]
    for module, (run, seconds, cpu) in sorted(modules.items()):
        sys.stderr.write(f"{module:36} {int(run):4} tests {seconds:6.1f} s {cpu:6.1f} s CPU\n")


def main(argv: List[str]) -> int:
    sys.path[0] = os.getcwd()  # import the tests as `python -m unittest` does, not tools/
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
