"""Drop-in and first-hour tests: the README runs as written, types for installed copies,
errors a user can act on, targets that work from a plain clone, the differences table.

Standard library only; servers are real (``cycles_lite_server``), over HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import base64
import importlib.util
import io
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import typing
import unittest
import zipfile
from unittest import mock

import cycles_lite as cl
from cycles_lite_server import LocalCyclesServer

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
BACKEND = os.path.join(HERE, "tools", "cycles_lite_build.py")
RUNCYCLES_PYTHON = os.environ.get("CYCLES_RUNCYCLES_PYTHON") or os.path.join(
    HERE, ".venv-bench", "bin", "python"
)


def _readme() -> str:
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading of the same or a higher level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    following = re.compile(f"^#{{1,{len(level)}}} ", re.M)
    match = following.search(text, start + len(heading) + 1)
    return text[start : match.start() if match else len(text)]


def _blocks(text: str, language: str) -> typing.List[str]:
    return re.findall("```" + language + r"\n(.*?)```", text, re.S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _expected_prints(code: str) -> typing.List[str]:
    """What a snippet says it prints: the ``# ...`` comment of each ``print(...)`` line."""
    return [
        line.split("#", 1)[1].strip()
        for line in code.splitlines()
        if line.startswith("print(") and "#" in line
    ]


def _load_backend(path: str = BACKEND) -> typing.Any:
    spec = importlib.util.spec_from_file_location("cycles_lite_build_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(directory: str) -> typing.Set[str]:
    """The top-level names of a directory, without Python's own caches."""
    return {name for name in os.listdir(directory) if not name.endswith("_cache")} - {
        "__pycache__"
    }


# ===========================================================================
# Item 2: the README runs as written
# ===========================================================================


class ReadmeServer:
    """The local server started with the README's first command, as written, except
    for the port: a free one (other suites run on this machine at the same time)."""

    def __init__(self, readme: str) -> None:
        before_quick_start = readme[: readme.index("## Quick start")]
        commands = [b for b in _blocks(before_quick_start, "sh") if "cycles_lite_server" in b]
        self.command_text = commands[0].replace("\\\n", " ").strip()
        argv = shlex.split(self.command_text)
        self.port = argv[argv.index("--port") + 1]
        self.api_key, self.tenant = argv[argv.index("--api-key") + 1].split("=")
        self.free_port = str(_free_port())
        argv[argv.index("--port") + 1] = self.free_port
        assert argv[0] == "python3", argv
        self.argv = [sys.executable, *argv[1:]]
        self.process: typing.Optional[subprocess.Popen[str]] = None

    def start(self) -> str:
        self.process = subprocess.Popen(
            self.argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        first_line = self.process.stdout.readline()  # "... listening on http://... (Ctrl-C ...)"
        match = re.search(r"(http://\S+)", first_line)
        assert match, first_line
        return match.group(1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.communicate(timeout=30)

    def localize(self, code: str) -> str:
        """The snippet with the README's port replaced by the free one."""
        return code.replace(f":{self.port}", f":{self.free_port}")


def _run_snippet(code: str, home: str, cwd: str = HERE) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=home, PYTHONPATH=HERE)
    for name in list(env):
        if name.startswith("CYCLES_"):
            del env[name]
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )


class TestReadmeRunsAsWritten(unittest.TestCase):
    """Each test starts its own server: the printed balances depend on the ledger."""

    def setUp(self) -> None:
        self.readme = _readme()
        self.server = ReadmeServer(self.readme)
        self.server.start()
        self.addCleanup(self.server.stop)
        home = tempfile.TemporaryDirectory()
        self.addCleanup(home.cleanup)
        self.home = home.name

    def test_the_server_command_comes_before_the_quick_start(self) -> None:
        self.assertIn("python3 -m cycles_lite_server --port 7878", self.server.command_text)
        self.assertIn("--budget tenant:acme=", self.server.command_text)

    def test_quick_start_runs_verbatim_and_prints_what_it_says(self) -> None:
        code = _blocks(_section(self.readme, "## Quick start"), "python")[0]
        self.assertIn(f'api_key="{self.server.api_key}"', code)
        self.assertIn(f'tenant="{self.server.tenant}"', code)
        self.assertIn(f"http://127.0.0.1:{self.server.port}", code)
        result = _run_snippet(self.server.localize(code), self.home)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines(), _expected_prints(code))
        self.assertEqual(result.stderr, "")

    def test_stream_reservation_example_runs_verbatim(self) -> None:
        section = _section(self.readme, "### `client.stream_reservation(...)`")
        signature, example = _blocks(section, "python")[:2]
        for parameter in ("action: Action", "estimate: Amount", "subject: Subject | None",
                          "cost_fn", "idempotency_key", "raise_on_commit_failure"):
            self.assertIn(parameter, signature)
        result = _run_snippet(self.server.localize(example), self.home)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines(), _expected_prints(example))

    def test_low_level_example_runs_verbatim(self) -> None:
        code = _blocks(_section(self.readme, "### Low-level client"), "python")[0]
        result = _run_snippet(self.server.localize(code), self.home)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))

    def test_command_line_examples_run_against_the_same_server(self) -> None:
        block = _blocks(_section(self.readme, "### Command line"), "sh")[0]
        exported = next(line for line in block.splitlines() if line.startswith("export "))
        env = dict(os.environ, HOME=self.home)
        env.update(pair.split("=", 1) for pair in shlex.split(exported)[1:])
        env["CYCLES_BASE_URL"] = self.server.localize(env["CYCLES_BASE_URL"])
        for command in ("check", "balances"):
            line = next(x for x in block.splitlines()
                        if x.startswith(f"python -m cycles_lite {command}"))
            argv = shlex.split(re.sub(r"\[[^]]*\]", "", line.split("#")[0]))  # no [options]
            result = subprocess.run([sys.executable, *argv[1:]], cwd=HERE, env=env,
                                    capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, (line, result.stderr))

    def test_every_example_uses_one_url_one_key_one_tenant(self) -> None:
        key, tenant, port = self.server.api_key, self.server.tenant, self.server.port
        self.assertEqual(set(re.findall(r"--api-key (\S+)=", self.readme)), {key})
        self.assertEqual(set(re.findall(r"--api-key \S+=(\S+)", self.readme)), {tenant})
        self.assertEqual(set(re.findall(r"CYCLES_API_KEY=(\S+)", self.readme)), {key})
        for block in _blocks(self.readme, "python"):
            if f":{port}" in block:
                self.assertEqual(set(re.findall(r'api_key="([^"]*)"', block)), {key}, block)
                self.assertTrue(set(re.findall(r'tenant="([^"]*)"', block)) <= {tenant})
        self.assertEqual(set(re.findall(r"https?://[\w.]+:(\d+)", self.readme)), {port})


class TestReadmeTestingSection(unittest.TestCase):
    def setUp(self) -> None:
        self.section = _section(_readme(), "## Testing your own code")
        work = tempfile.TemporaryDirectory()
        self.addCleanup(work.cleanup)
        self.work = work.name

    def _write(self, name: str, code: str) -> None:
        with open(os.path.join(self.work, name), "w", encoding="utf-8") as handle:
            handle.write(code)

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, HOME=self.work, PYTHONPATH=HERE)
        return subprocess.run(
            [sys.executable, *argv], cwd=self.work, env=env, capture_output=True, text=True,
            timeout=120,
        )

    def test_unittest_base_class_runs(self) -> None:
        code = next(b for b in _blocks(self.section, "python") if "unittest.TestCase" in b)
        self._write("test_readme_unittest.py", code)
        result = self._run("-W", "error", "-m", "unittest", "-v", "test_readme_unittest")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, r"test_commit_is_charged .*\.\.\. ok")

    @unittest.skipUnless(importlib.util.find_spec("pytest"), "pytest is not installed")
    def test_pytest_fixtures_run(self) -> None:
        code = next(b for b in _blocks(self.section, "python") if "@pytest.fixture" in b)
        self._write("test_readme_pytest.py", code)
        result = self._run("-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_readme_pytest.py")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("1 passed", result.stdout)

    def test_mocking_example_runs(self) -> None:
        code = _blocks(_section(self.section, "### Mocking the client"), "python")[0]
        result = self._run("-c", code)
        self.assertEqual(result.returncode, 0, result.stderr)


# ===========================================================================
# Item 3: types for installed copies
# ===========================================================================


def _public_classes() -> typing.List[type]:
    return [obj for obj in (getattr(cl, n) for n in cl.__all__) if isinstance(obj, type)]


class TestTypeHints(unittest.TestCase):
    def test_get_type_hints_works_on_every_public_class(self) -> None:
        classes = _public_classes()
        self.assertGreater(len(classes), 50)
        for cls in classes:
            with self.subTest(cls=cls.__name__):
                hints = typing.get_type_hints(cls)
                self.assertTrue(all(not isinstance(h, str) for h in hints.values()))

    def test_hints_are_the_declared_types(self) -> None:
        self.assertEqual(typing.get_type_hints(cl.Amount)["amount"], int)
        self.assertEqual(
            typing.get_type_hints(cl.CyclesResponse)["body"],
            typing.Optional[typing.Dict[str, typing.Any]],
        )
        self.assertEqual(typing.get_type_hints(cl.Subject)["tenant"], typing.Optional[str])
        self.assertEqual(typing.get_type_hints(cl.Caps)["tool_allowlist"],
                         typing.Optional[typing.List[str]])
        self.assertEqual(typing.get_type_hints(cl.CyclesConfig)["base_url"], str)

    def test_quoted_names_resolve_and_literals_stay_values(self) -> None:
        self.assertEqual(cl._runtime_annotation('List["Amount"] | None'),
                         typing.Optional[typing.List[cl.Amount]])
        self.assertEqual(cl._runtime_annotation('Literal["a", "b"]'), typing.Literal["a", "b"])
        self.assertEqual(cl._runtime_annotation("NotAName[int]"), typing.Any)
        self.assertEqual(cl._runtime_annotation("dict[str, _Check]"),
                         typing.Dict[str, typing.Any])

    def test_a_user_subclass_gets_its_own_and_inherited_hints(self) -> None:
        class Priced(cl.Amount):
            label: typing.Optional[str] = None

        hints = typing.get_type_hints(Priced)
        self.assertEqual((hints["amount"], hints["label"]), (int, typing.Optional[str]))

    def test_dataclass_fields_and_constructors_are_unchanged(self) -> None:
        amount = cl.Amount(unit=cl.Unit.TOKENS, amount=5)
        typing.get_type_hints(cl.Amount)
        self.assertEqual(amount.model_dump(mode="json"), {"unit": "TOKENS", "amount": 5})
        self.assertEqual(cl.Amount.model_validate({"unit": "TOKENS", "amount": 5}), amount)

    def test_typing_is_not_imported_by_the_import(self) -> None:
        # -S: no site hooks, which may import typing themselves.
        probe = (
            "import sys; sys.path.insert(0, sys.argv[1]); import cycles_lite; "
            "before = 'typing' in sys.modules; import typing; "
            "typing.get_type_hints(cycles_lite.Amount); print(before)"
        )
        result = subprocess.run([sys.executable, "-S", "-c", probe, HERE],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "False"), result.stderr)


class TestWheel(unittest.TestCase):
    def setUp(self) -> None:
        out = tempfile.TemporaryDirectory()
        self.addCleanup(out.cleanup)
        self.out = out.name
        self.before = _tree(HERE)
        self.backend = _load_backend()

    def tearDown(self) -> None:
        self.assertEqual(_tree(HERE), self.before)  # nothing written into the source tree

    @unittest.skipIf(sys.version_info < (3, 11), "the backend reads pyproject.toml with tomllib")
    def test_wheel_installs_each_module_as_a_typed_package(self) -> None:
        name = self.backend.build_wheel(self.out)
        self.assertEqual(name, f"cycles_lite-{cl.__version__}-py3-none-any.whl")
        with zipfile.ZipFile(os.path.join(self.out, name)) as wheel:
            files = {info.filename: wheel.read(info) for info in wheel.infolist()}
        for module in ("cycles_lite", "cycles_lite_server"):
            with open(os.path.join(HERE, module + ".py"), "rb") as handle:
                self.assertEqual(files[f"{module}/__init__.py"], handle.read())
            self.assertEqual(files[f"{module}/py.typed"], b"")
            self.assertIn(b"sys.exit(main())", files[f"{module}/__main__.py"])
        dist_info = f"cycles_lite-{cl.__version__}.dist-info"
        metadata = files[f"{dist_info}/METADATA"].decode()
        self.assertIn(f"Version: {cl.__version__}\n", metadata)
        self.assertIn("Classifier: Typing :: Typed\n", metadata)
        self.assertIn("Requires-Python: >=3.8\n", metadata)
        self.assertIn(b"cycles-lite = cycles_lite:main", files[f"{dist_info}/entry_points.txt"])
        record = files[f"{dist_info}/RECORD"].decode().splitlines()
        self.assertEqual(len(record), len(files))
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            if path.endswith("RECORD"):
                continue
            expected = base64.urlsafe_b64encode(hashlib.sha256(files[path]).digest())
            self.assertEqual(digest, "sha256=" + expected.rstrip(b"=").decode())
            self.assertEqual(int(size), len(files[path]))

    @unittest.skipIf(sys.version_info < (3, 11), "the backend reads pyproject.toml with tomllib")
    def test_sdist_builds_the_same_wheel(self) -> None:
        sdist = self.backend.build_sdist(self.out)
        with tarfile.open(os.path.join(self.out, sdist)) as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(self.out, **safe)  # noqa: S202 - our own archive
        unpacked = os.path.join(self.out, sdist[: -len(".tar.gz")])
        self.assertTrue(os.path.exists(os.path.join(unpacked, "PKG-INFO")))
        rebuilt = os.path.join(self.out, "rebuilt")
        os.mkdir(rebuilt)
        backend = _load_backend(os.path.join(unpacked, "tools", "cycles_lite_build.py"))
        name = backend.build_wheel(rebuilt)
        with zipfile.ZipFile(os.path.join(rebuilt, name)) as wheel:
            self.assertIn("cycles_lite/py.typed", wheel.namelist())

    @unittest.skipIf(sys.version_info < (3, 11), "pip would fetch tomli to build on < 3.11")
    @unittest.skipUnless(importlib.util.find_spec("pip"), "pip is not installed")
    def test_pip_install_dot_works_and_writes_nothing_into_the_tree(self) -> None:
        target = os.path.join(self.out, "site")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "--no-deps", "--no-build-isolation", "--target", target, HERE]
        result = subprocess.run(pip, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.exists(os.path.join(target, "cycles_lite", "py.typed")))
        env = dict(os.environ, PYTHONPATH=target)
        outputs = []
        for argv in (["-c", "import cycles_lite; print(cycles_lite.__file__)"],
                     ["-m", "cycles_lite", "--version"],
                     ["-m", "cycles_lite_server", "--help"]):
            ran = subprocess.run([sys.executable, *argv], cwd=self.out, env=env,
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(ran.returncode, 0, ran.stderr)
            outputs.append(ran.stdout)
        self.assertEqual(outputs[0].strip(), os.path.join(target, "cycles_lite", "__init__.py"))
        self.assertEqual(outputs[1].strip(), f"cycles-lite {cl.__version__}")


# ===========================================================================
# Item 4: errors a user can act on
# ===========================================================================


class TestActionableErrors(unittest.TestCase):
    def _client(self, url: str) -> cl.CyclesClient:
        client = cl.CyclesClient(cl.CyclesConfig(
            base_url=url, api_key="k", tenant="acme", journal_enabled=False, retry_enabled=False,
        ))
        self.addCleanup(client.close)
        return client

    def _guarded(self, client: cl.CyclesClient) -> typing.Callable[[], str]:
        @cl.cycles(estimate=10, action_kind="llm.completion", action_name="m", client=client)
        def work() -> str:
            return "done"

        return work

    def test_refused_connection_is_a_public_connection_error_with_a_plain_message(self) -> None:
        work = self._guarded(self._client(f"http://127.0.0.1:{_free_port()}"))
        with self.assertLogs("cycles_lite", logging.DEBUG) as logs:
            with self.assertRaises(cl.CyclesConnectionError) as caught:
                work()
        error = caught.exception
        self.assertIsInstance(error, cl.CyclesProtocolError)  # runcycles' status -1 error
        self.assertIsInstance(error, cl.CyclesTransportError)
        self.assertEqual(error.status, -1)
        self.assertIn(type(error).__name__, cl.__all__)
        self.assertEqual(
            str(error),
            "Failed to create reservation: connection refused: nothing listens at the base URL"
            " (is the server running?)",
        )
        self.assertIsInstance(error.cause, ConnectionRefusedError)
        text = "\n".join(logs.output)
        self.assertNotIn("ambiguous", text)
        self.assertIn("not sent", text)

    def test_traceback_names_only_public_exception_types(self) -> None:
        work = self._guarded(self._client(f"http://127.0.0.1:{_free_port()}"))
        try:
            work()
        except cl.CyclesError:
            import traceback

            shown = traceback.format_exc()
        self.assertIn("cycles_lite.CyclesConnectionError: Failed to create reservation", shown)
        self.assertNotRegex(shown, r"cycles_lite\._\w+(Error|Exception)")

    def test_invalid_input_is_a_public_value_error_naming_the_field(self) -> None:
        client = self._client("http://127.0.0.1:9")
        with self.assertRaises(cl.InvalidFieldError) as caught:
            client.stream_reservation(action=cl.Action(kind="llm", name="m"),
                                      estimate=500)  # type: ignore[arg-type]
        self.assertIsInstance(caught.exception, ValueError)
        self.assertEqual(str(caught.exception), "estimate: must be an Amount or a dict, got int")
        self.assertEqual(caught.exception.path, "estimate")
        with self.assertRaises(cl.InvalidFieldError) as caught:
            cl.Subject(tenant="acme", dimensions={"k": 1})  # type: ignore[dict-item]
        self.assertTrue(str(caught.exception).startswith("dimensions"))

    def test_transport_messages_are_plain(self) -> None:
        import http.client

        cases = {
            ConnectionRefusedError(111, "Connection refused"): "connection refused",
            socket.gaierror(-2, "Name or service not known"): "cannot resolve the host",
            socket.timeout("timed out"): "timed out",
            ConnectionResetError(104, "reset"): "the connection closed before",
            http.client.RemoteDisconnected("closed"): "the connection closed before",
            http.client.BadStatusLine("garbage"): "not a valid HTTP answer",
        }
        for exc, start in cases.items():
            with self.subTest(exc=type(exc).__name__):
                message = cl.CyclesResponse.transport_error(exc).error_message or ""
                self.assertTrue(message.startswith(start), message)

    def test_html_answer_says_the_base_url_is_not_a_cycles_server(self) -> None:
        for status in (404, 501, 200):
            with self.subTest(status=status), LocalCyclesServer(api_keys={"k": "acme"}) as server:
                server.inject("*", "html", times=None, status=status)
                with self.assertRaises(cl.CyclesProtocolError) as caught:
                    self._guarded(self._client(server.url))()
                message = str(caught.exception)
                self.assertIn(f"HTTP {status} (text/html) is not a Cycles answer", message)
                self.assertIn("the base URL does not look like a Cycles server", message)

    def _cli(self, url: str) -> typing.Tuple[int, str]:
        env = {"CYCLES_BASE_URL": url, "CYCLES_API_KEY": "k", "CYCLES_TENANT": "acme",
               "CYCLES_JOURNAL_ENABLED": "false"}
        err = io.StringIO()
        with mock.patch.dict(os.environ, env), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            code = cl.main(["check"])
        return code, err.getvalue()

    def test_cli_check_against_a_web_page(self) -> None:
        for status in (404, 200):
            with self.subTest(status=status), LocalCyclesServer(api_keys={"k": "acme"}) as server:
                server.inject("*", "html", times=None, status=status)
                code, err = self._cli(server.url)
                self.assertEqual(code, cl.EXIT_API_ERROR)
                self.assertTrue(err.startswith(
                    f"cycles-lite: check failed: HTTP {status} (text/html) is not a Cycles"
                    " answer: the base URL does not look like a Cycles server"
                ), err)

    def test_cli_check_against_nothing(self) -> None:
        code, err = self._cli(f"http://127.0.0.1:{_free_port()}")
        self.assertEqual(code, cl.EXIT_TRANSPORT)
        self.assertIn("connection refused: nothing listens at the base URL", err)

    def test_cli_check_against_the_local_server_still_passes(self) -> None:
        with LocalCyclesServer(api_keys={"k": "acme"}) as server:
            self.assertEqual(self._cli(server.url), (cl.EXIT_OK, ""))


# ===========================================================================
# Item 5: targets that work from a plain clone
# ===========================================================================


@unittest.skipUnless(shutil.which("make"), "make is not installed")
class TestPlainClone(unittest.TestCase):
    def test_make_conformance_without_the_runner_names_protocol_dir(self) -> None:
        for override in ("SHARED=/nonexistent", "PROTOCOL_DIR=/nonexistent/cycles-protocol"):
            with self.subTest(override=override):
                result = subprocess.run(["make", "-s", "conformance", override], cwd=HERE,
                                        capture_output=True, text=True, timeout=60)
                self.assertEqual(result.returncode, 2)
                self.assertIn("the official runner is not at", result.stderr)
                self.assertIn("make conformance PROTOCOL_DIR=/path/to/cycles-protocol",
                              result.stderr)
                self.assertNotIn("Traceback", result.stdout + result.stderr)


# ===========================================================================
# Item 6: the differences from runcycles, side by side
# ===========================================================================


class TestDifferencesTable(unittest.TestCase):
    def setUp(self) -> None:
        section = _section(_readme(), "### Differences from runcycles")
        lines = [line for line in section.splitlines() if line.startswith("| ")]
        self.header = lines[0]
        self.rows = {
            cells[0]: cells[1:]
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
        }

    def test_every_row_says_what_runcycles_does_and_what_we_do(self) -> None:
        self.assertEqual(self.header, "| | runcycles 0.5.3 | cycles-lite | Why |")
        for name, cells in self.rows.items():
            self.assertEqual(len(cells), 3, name)
            self.assertTrue(cells[0] and cells[1], name)

    def test_the_rows_the_issue_asks_for(self) -> None:
        required = {
            "Invalid input": "ValueError",
            "Empty `tool_allowlist`": "no restriction",
            "`ErrorCode.UNKNOWN`, unknown error codes": "not retryable",
            "A release whose first attempt fails (429, 503, dropped connection, timeout)":
                "retried in the background with the same key",
            "Proxies": "`CYCLES_PROXY` only",
        }
        for name, ours in required.items():
            self.assertIn(ours, self.rows[name][1], name)
        self.assertIn("pydantic.ValidationError", self.rows["Invalid input"][0])

    def test_our_side_of_the_table_holds(self) -> None:
        self.assertTrue(cl.Caps(tool_allowlist=[]).is_tool_allowed("search"))
        self.assertFalse(cl.ErrorCode.UNKNOWN.is_retryable)
        self.assertFalse(cl.CyclesProtocolError("x", status=409, error_code="NEW").is_retryable())
        self.assertTrue(cl.CyclesProtocolError("x", status=-1).is_retryable())
        with self.assertRaises(ValueError):
            cl.Amount(unit="TOKENS", amount=-1)
        with mock.patch.dict(os.environ, {"HTTPS_PROXY": "http://127.0.0.1:1"}):
            config = cl.CyclesConfig(base_url="https://example.com", api_key="k")
        self.assertIsNone(config.proxy)

    @unittest.skipUnless(os.path.exists(RUNCYCLES_PYTHON), "runcycles venv not available")
    def test_runcycles_side_of_the_table_holds(self) -> None:
        probe = (
            "from runcycles import Caps, ErrorCode, CyclesProtocolError\n"
            "print(Caps(tool_allowlist=[]).is_tool_allowed('search'),"
            " ErrorCode.UNKNOWN.is_retryable,"
            " CyclesProtocolError('x', status=-1).is_retryable())\n"
        )
        result = subprocess.run([RUNCYCLES_PYTHON, "-c", probe], capture_output=True,
                                text=True, timeout=120)
        self.assertEqual(result.stdout.split(), ["False", "True", "False"], result.stderr)


if __name__ == "__main__":
    unittest.main()
