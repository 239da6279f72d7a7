"""Building generated C++ into a shared library, cached by content hash.

The cache key covers the source, the runtime and kernel headers, the compiler's
version and the flags, so compiling the same graph again loads the cached library
without running the compiler. Each entry keeps a manifest with the library's own
hash: an entry whose library was truncated, replaced or left half-written is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mpk.errors import MpkError

log = logging.getLogger("mpk.backends.cpu")

HERE = Path(__file__).resolve().parent
INCLUDE_DIRS = (HERE / "include", HERE.parent.parent / "runtime" / "include")
LIBRARY = "libmpk_graph.so"


class BuildError(MpkError):
    """The C++ compiler is missing or failed on generated code."""


def compiler() -> str:
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise BuildError(
            f"no C++ compiler found (looked for {name!r} on PATH); the CPU backend needs one: "
            f"install g++ (for example `apt-get install g++`) or set CXX to a C++20 compiler"
        )
    return path


def flags(sanitize: str | None) -> list[str]:
    common = ["-std=c++20", "-shared", "-fPIC", "-pthread", "-march=native", *(f"-I{d}" for d in INCLUDE_DIRS)]
    if sanitize == "thread":
        return [*common, "-O1", "-g", "-fsanitize=thread"]
    if sanitize is not None:
        raise BuildError(f"unknown sanitizer {sanitize!r}; use 'thread' or none")
    return [*common, "-O3", "-fno-math-errno"]


def cache_root() -> Path:
    return Path(os.environ.get("MPK_CACHE_DIR", Path.home() / ".cache" / "mpk")) / "cpu"


def cache_key(source: str, cxx: str, options: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(source.encode())
    for directory in INCLUDE_DIRS:
        for header in sorted(directory.rglob("*.h")):
            digest.update(header.read_bytes())
    digest.update(_compiler_version(cxx).encode())
    digest.update(" ".join(options).encode())
    return digest.hexdigest()


def build_library(source: str, sanitize: str | None = None) -> Path:
    """Return the path of the library built from ``source``, building it if not cached."""
    cxx = compiler()
    options = flags(sanitize)
    key = cache_key(source, cxx, options)
    entry = cache_root() / key[:24]
    library = entry / LIBRARY
    if _valid_entry(entry, key):
        log.info("cpu backend: cached library %s", library)
        return library
    if entry.exists():
        log.warning("cpu backend: cache entry %s is stale or corrupted; rebuilding it", entry)
    _compile(cxx, options, source, entry, key)
    return library


def _valid_entry(entry: Path, key: str) -> bool:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        return manifest["key"] == key and manifest["library_sha256"] == _sha256(entry / LIBRARY)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _compile(cxx: str, options: list[str], source: str, entry: Path, key: str) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    source_path = entry / "graph.cpp"
    source_path.write_text(source)
    # Build beside the entry and rename: a crash never leaves a half-written library in place.
    fd, partial = tempfile.mkstemp(dir=entry, suffix=".so.partial")
    os.close(fd)
    command = [cxx, *options, str(source_path), "-o", partial]
    log.info("cpu backend: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(partial)
        message = (result.stderr or result.stdout).strip()
        tail = "\n".join(message.splitlines()[-40:])
        raise BuildError(f"the C++ compiler failed on {source_path} (exit {result.returncode}):\n{tail}")
    os.replace(partial, entry / LIBRARY)
    manifest = {"key": key, "library_sha256": _sha256(entry / LIBRARY), "command": command}
    (entry / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_VERSIONS: dict[str, str] = {}


def _compiler_version(cxx: str) -> str:
    if cxx not in _VERSIONS:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True)
        _VERSIONS[cxx] = result.stdout
    return _VERSIONS[cxx]
