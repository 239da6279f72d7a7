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
from dataclasses import dataclass
from pathlib import Path

from mpk.errors import MpkError

log = logging.getLogger("mpk.backends.cpu")

HERE = Path(__file__).resolve().parent
INCLUDE_DIRS = (HERE / "include", HERE.parent.parent / "runtime" / "include")
LIBRARY = "libmpk_graph.so"


class BuildError(MpkError):
    """The C++ compiler is missing or failed on generated code."""


@dataclass(frozen=True)
class Toolchain:
    """How to turn one generated source into a shared library."""

    name: str                      # the cache subdirectory: "cpu", "cuda-sm_90a", ...
    compiler: str                  # path of the compiler
    options: tuple[str, ...]
    suffix: str                    # of the source file
    include_dirs: tuple[Path, ...]


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


def cpu_toolchain(sanitize: str | None = None) -> Toolchain:
    name = "cpu" if sanitize is None else f"cpu-{sanitize}"
    return Toolchain(name, compiler(), tuple(flags(sanitize)), ".cpp", INCLUDE_DIRS)


def cache_root() -> Path:
    return Path(os.environ.get("MPK_CACHE_DIR", Path.home() / ".cache" / "mpk"))


def cache_key(source: str, toolchain: Toolchain) -> str:
    digest = hashlib.sha256()
    digest.update(source.encode())
    for directory in toolchain.include_dirs:
        for header in sorted(p for p in directory.rglob("*") if p.suffix in (".h", ".cuh")):
            digest.update(header.read_bytes())
    digest.update(_compiler_version(toolchain.compiler).encode())
    digest.update(" ".join(toolchain.options).encode())
    return digest.hexdigest()


def build_library(source: str, sanitize: str | None = None, toolchain: Toolchain | None = None) -> Path:
    """Return the path of the library built from ``source``, building it if not cached.
    The default toolchain is the host C++ compiler (with ``sanitize``, if given).
    """
    toolchain = toolchain or cpu_toolchain(sanitize)
    key = cache_key(source, toolchain)
    entry = cache_root() / toolchain.name.split("-")[0] / key[:24]
    library = entry / LIBRARY
    if _valid_entry(entry, key):
        log.info("%s backend: cached library %s", toolchain.name, library)
        return library
    if entry.exists():
        log.warning("%s backend: cache entry %s is stale or corrupted; rebuilding it", toolchain.name, entry)
    _compile(toolchain, source, entry, key)
    return library


def build_log(library: Path) -> str:
    """The compiler's output when it built ``library`` (ptxas statistics for CUDA)."""
    return json.loads((library.parent / "manifest.json").read_text()).get("log", "")


def _valid_entry(entry: Path, key: str) -> bool:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        return manifest["key"] == key and manifest["library_sha256"] == _sha256(entry / LIBRARY)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _compile(toolchain: Toolchain, source: str, entry: Path, key: str) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    source_path = entry / f"graph{toolchain.suffix}"
    source_path.write_text(source)
    # Build beside the entry and rename: a crash never leaves a half-written library in place.
    fd, partial = tempfile.mkstemp(dir=entry, suffix=".so.partial")
    os.close(fd)
    command = [toolchain.compiler, *toolchain.options, str(source_path), "-o", partial]
    log.info("%s backend: %s", toolchain.name, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(partial)
        message = (result.stderr or result.stdout).strip()
        tail = "\n".join(message.splitlines()[-40:])
        raise BuildError(f"{Path(toolchain.compiler).name} failed on {source_path} (exit {result.returncode}):\n{tail}")
    os.replace(partial, entry / LIBRARY)
    manifest = {"key": key, "library_sha256": _sha256(entry / LIBRARY), "command": command, "log": result.stderr}
    (entry / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_VERSIONS: dict[str, str] = {}


def _compiler_version(cxx: str) -> str:
    if cxx not in _VERSIONS:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True)
        _VERSIONS[cxx] = result.stdout
    return _VERSIONS[cxx]
