"""The PEP 517 build backend of cycles-lite (standard library only, plus tomli before 3.11).

The source stays two vendorable files, ``cycles_lite.py`` and ``cycles_lite_server.py``;
the wheel installs each as a package (``cycles_lite/__init__.py`` with ``py.typed`` and
``__main__.py``), because PEP 561 lets type checkers read the types of installed
packages only.  ``import cycles_lite``, ``python -m cycles_lite`` and the console scripts
work the same either way.  Nothing is written into the source tree: no ``build/``, no
``*.egg-info``.  Metadata comes from ``pyproject.toml``'s ``[project]`` table.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import sys
import tarfile
import time
import zipfile
from typing import Any, Dict, List, Optional, Tuple

SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("cycles_lite", "cycles_lite_server")
SDIST_FILES = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "cycles_lite.py",
    "cycles_lite_server.py",
    "tools/cycles_lite_build.py",
)
MAIN_PY = "import sys\n\nfrom {module} import main\n\nsys.exit(main())\n"
# Reproducible archives: the date of the ZIP epoch unless SOURCE_DATE_EPOCH says otherwise.
ZIP_EPOCH = 315532800


def _read(relative: str) -> bytes:
    with open(os.path.join(SOURCE_DIR, relative), "rb") as handle:
        return handle.read()


def _project() -> Dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pyproject.toml's build requirement
        import tomli as tomllib
    project: Dict[str, Any] = tomllib.loads(_read("pyproject.toml").decode("utf-8"))["project"]
    return project


def _version() -> str:
    """``__version__`` of cycles_lite.py, read without importing it."""
    match = re.search(r'^__version__ = "([^"]+)"$', _read("cycles_lite.py").decode(), re.M)
    if match is None:
        raise RuntimeError("cycles_lite.py has no __version__ line")
    return match.group(1)


def _dist_name(project: Dict[str, Any]) -> str:
    return re.sub(r"[-_.]+", "_", project["name"]).lower()


def _metadata(project: Dict[str, Any]) -> bytes:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {_version()}",
        f"Summary: {project['description']}",
        f"License: {project['license']['text']}",
        f"Requires-Python: {project['requires-python']}",
        f"Keywords: {','.join(project.get('keywords', []))}",
    ]
    lines += [f"Author: {author['name']}" for author in project.get("authors", [])]
    lines += [f"Classifier: {classifier}" for classifier in project.get("classifiers", [])]
    lines += [f"Requires-Dist: {requirement}" for requirement in project.get("dependencies", [])]
    lines.append("Description-Content-Type: text/markdown")
    readme = _read(project["readme"]).decode("utf-8")
    return ("\n".join(lines) + "\n\n" + readme).encode("utf-8")


def _entry_points(project: Dict[str, Any]) -> bytes:
    scripts = project.get("scripts", {})
    lines = ["[console_scripts]"] + [f"{name} = {target}" for name, target in scripts.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _timestamp() -> int:
    return max(ZIP_EPOCH, int(os.environ.get("SOURCE_DATE_EPOCH", ZIP_EPOCH)))


def _write_wheel(wheel_directory: str, files: List[Tuple[str, bytes]]) -> str:
    project = _project()
    name = f"{_dist_name(project)}-{_version()}"
    dist_info = f"{name}.dist-info"
    files = [
        *files,
        (f"{dist_info}/METADATA", _metadata(project)),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: cycles_lite_build\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", _entry_points(project)),
        (f"{dist_info}/LICENSE", _read("LICENSE")),
    ]
    record = [_record_line(path, data) for path, data in files] + [f"{dist_info}/RECORD,,"]
    files.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode("utf-8")))
    filename = f"{name}-py3-none-any.whl"
    date = time.gmtime(_timestamp())[:6]
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w") as wheel:
        for path, data in files:
            info = zipfile.ZipInfo(path, date_time=date)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data)
    return filename


def _package_files() -> List[Tuple[str, bytes]]:
    files: List[Tuple[str, bytes]] = []
    for module in MODULES:
        files += [
            (f"{module}/__init__.py", _read(f"{module}.py")),
            (f"{module}/__main__.py", MAIN_PY.format(module=module).encode("utf-8")),
            (f"{module}/py.typed", b""),
        ]
    return files


# -- PEP 517 / PEP 660 hooks --------------------------------------------------------


def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_editable(
    config_settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    return []


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Dict[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    return _write_wheel(wheel_directory, _package_files())


def build_editable(
    wheel_directory: str,
    config_settings: Optional[Dict[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    """An editable install puts the source directory on sys.path (the plain modules)."""
    return _write_wheel(wheel_directory, [("cycles_lite_editable.pth", SOURCE_DIR.encode())])


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    project = _project()
    name = f"{_dist_name(project)}-{_version()}"
    filename = f"{name}.tar.gz"
    members = [(path, _read(path)) for path in SDIST_FILES]
    members.append(("PKG-INFO", _metadata(project)))
    archive = os.path.join(sdist_directory, filename)
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as sdist:
        for path, data in members:
            info = tarfile.TarInfo(f"{name}/{path}")
            info.size, info.mtime, info.mode = len(data), _timestamp(), 0o644
            sdist.addfile(info, io.BytesIO(data))
    return filename
