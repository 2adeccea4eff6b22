"""llama.cpp's own tools, built once from a pinned sdist into a local cache.

The PyPI sdist of ``llama-cpp-python`` vendors llama.cpp's whole source tree (``vendor/llama.cpp``),
so the tools build offline from a package registry: pip fetches the sdist, its sha256 is checked
against the pin below, and cmake builds only ``llama-quantize``, ``llama-perplexity`` and
``llama-imatrix`` (CPU, Release, shared ggml libraries: ``libggml-base`` is what
``bitalloc.quant.llamacpp.ggml_lib`` loads with ctypes). The converter ``convert_hf_to_gguf.py``
is kept beside them with its ``conversion`` package and the ``gguf-py`` it imports first.
ggml's quantizers live in ``libggml-base``, which cmake compiles without ``-march=native``, so
the bytes they write do not depend on the machine; only ``libggml-cpu`` (the matrix products
llama-perplexity runs) is tuned to the CPU that built it.

The cache is ``$BITALLOC_LLAMACPP_DIR/<version>`` (default ``~/.cache/bitalloc/llama.cpp``):
outside any clone, so CI machines build it once. A build happens in a staging folder next to it
and is renamed into place only when complete, so an interrupted build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
"""The ``llama-cpp-python`` release whose vendored llama.cpp is built."""
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
"""sha256 of ``llama_cpp_python-0.3.36.tar.gz`` on PyPI."""
PACKAGE = "llama-cpp-python"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
LIBRARY = "libggml-base.so"
"""The shared library holding ``ggml_quantize_chunk`` (ggml's CPU-independent quantizers)."""
CONVERTER = "convert_hf_to_gguf.py"
MANIFEST = "bitalloc_llamacpp.json"
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "ON",
    "CMAKE_BUILD_RPATH": "$ORIGIN",  # the tools find the libraries beside them wherever the folder lands
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_OPENSSL": "OFF",  # no downloads from the tools
    "GGML_OPENMP": "OFF",  # ggml's own thread pool: no libgomp to find at run time
    "GGML_CCACHE": "OFF",
}
_SOURCE = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
_KEPT = (CONVERTER, "conversion", "gguf-py", "LICENSE")  # what the cache keeps of the source tree


class LlamaCppError(RuntimeError):
    """The tools cannot be built; the message says why."""


class ToolsNotBuilt(LlamaCppError, FileNotFoundError):
    """The tools are not in the cache: a missing file to every caller, with the command that builds them."""


def cache_root() -> Path:
    return Path(os.environ.get("BITALLOC_LLAMACPP_DIR") or Path.home() / ".cache" / "bitalloc" / "llama.cpp").expanduser()


def install_dir() -> Path:
    """Where the pinned version's tools are (or will be) built."""
    return cache_root() / VERSION


@dataclass(frozen=True)
class Tools:
    """Paths of one built copy of llama.cpp's tools."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def tool(self, name: str) -> Path:
        """``llama-quantize``, ``llama-perplexity`` or ``llama-imatrix``."""
        if name not in TOOLS:
            raise ValueError(f"unknown llama.cpp tool {name!r}; built: {TOOLS}")
        return self.bin / name

    @property
    def quantize(self) -> Path:
        return self.tool("llama-quantize")

    @property
    def perplexity(self) -> Path:
        return self.tool("llama-perplexity")

    @property
    def imatrix(self) -> Path:
        return self.tool("llama-imatrix")

    @property
    def library(self) -> Path:
        """``libggml-base.so``, for ctypes."""
        return self.bin / LIBRARY

    @property
    def converter(self) -> Path:
        """``convert_hf_to_gguf.py``; it puts the ``gguf-py`` beside it first on ``sys.path`` itself."""
        return self.root / CONVERTER

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def convert_command(self, model_dir: Path | str, outfile: Path | str, outtype: str = "f16") -> list[str]:
        """The command that converts a Hugging Face model folder to a GGUF, with this interpreter."""
        return [sys.executable, str(self.converter), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]

    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())


def find() -> Tools | None:
    """The built tools, or None. A folder without its manifest is not a finished build."""
    root = install_dir()
    return Tools(root) if (root / MANIFEST).is_file() else None


def tools() -> Tools:
    """The built tools, or ``ToolsNotBuilt`` saying how to build them."""
    found = find()
    if found is None:
        raise ToolsNotBuilt(f"llama.cpp's tools are not built (looked in {install_dir()}): run `bitalloc llamacpp build`")
    return found


def build(*, sdist: Path | None = None, jobs: int | None = None, log: Callable[[str], None] = print) -> Tools:
    """Build the pinned tools into the cache unless they are there; return where they are.

    ``sdist`` is a local copy of the pinned sdist (checked like a download); without it pip fetches
    it. ``jobs`` defaults to the cores this process may use.
    """
    found = find()
    if found is not None:
        log(f"llama.cpp tools {VERSION} already built in {found.root}")
        return found
    cmake, generator = _build_system()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{VERSION}-build-", dir=root))
    try:
        archive = sdist if sdist is not None else _download(staging / "download", log)
        _check_sha256(archive)
        source = _extract(archive, staging / "src")
        out = staging / VERSION
        started = time.monotonic()
        _cmake(cmake, generator, source, staging / "build", jobs or len(os.sched_getaffinity(0)), log)
        _assemble(source, staging / "build" / "bin", out)
        seconds = round(time.monotonic() - started, 1)
        manifest = {"package": PACKAGE, "version": VERSION, "sha256": SHA256, "cmake": CMAKE_OPTIONS,
                    "tools": list(TOOLS), "build_seconds": seconds}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            out.rename(install_dir())
        except OSError as exc:
            if find() is None:  # not another build that finished first
                raise LlamaCppError(f"{install_dir()} exists but holds no finished build: remove it and build again") from exc
        log(f"built llama.cpp tools {VERSION} in {seconds} s: {install_dir()}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tools()


def _build_system() -> tuple[str, str | None]:
    """cmake, and Ninja when present; a clear error when cmake or a C++ compiler is missing."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise LlamaCppError("cmake is not installed; it builds llama.cpp's tools (Debian: apt-get install cmake)")
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        raise LlamaCppError("no C++ compiler found (set CXX, or install one: Debian's apt-get install g++)")
    return cmake, "Ninja" if shutil.which("ninja") else None


def _download(folder: Path, log: Callable[[str], None]) -> Path:
    log(f"fetching {PACKAGE}=={VERSION} (sdist) with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(folder.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise LlamaCppError(f"pip could not fetch {PACKAGE}=={VERSION}: {result.stderr.strip()[-500:]}")
    return archives[0]


def _check_sha256(archive: Path) -> None:
    if not archive.is_file():
        raise LlamaCppError(f"{archive}: no such file")
    with open(archive, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != SHA256:
        raise LlamaCppError(f"{archive}: sha256 {digest} is not the pinned {PACKAGE} {VERSION} sdist's ({SHA256})")


def _extract(archive: Path, folder: Path) -> Path:
    """Only the vendored llama.cpp tree, through tarfile's ``data`` filter (no links out, no devices)."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_SOURCE)]
        tar.extractall(folder, members=members, filter="data")
    return folder / _SOURCE


def _cmake(cmake: str, generator: str | None, source: Path, build: Path, jobs: int, log: Callable[[str], None]) -> None:
    configure = [cmake, "-S", str(source), "-B", str(build), *(["-G", generator] if generator else []),
                 *(f"-D{key}={value}" for key, value in CMAKE_OPTIONS.items())]
    _run(configure, "configure", log)
    _run([cmake, "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], f"build ({jobs} jobs)", log)


def _run(command: Sequence[str], step: str, log: Callable[[str], None]) -> None:
    log(f"cmake {step}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LlamaCppError(f"cmake {step} of llama.cpp failed:\n{(result.stdout + result.stderr).strip()[-3000:]}")


def _assemble(source: Path, binaries: Path, out: Path) -> None:
    """The tools and shared libraries (symlinks kept), and the converter with what it imports."""
    (out / "bin").mkdir(parents=True)
    for path in binaries.iterdir():
        if path.name in TOOLS or ".so" in path.name:
            shutil.copy2(path, out / "bin" / path.name, follow_symlinks=False)
    for name in _KEPT:
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name, out / name)
