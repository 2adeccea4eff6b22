"""`bitalloc llamacpp build`: the checks before compiling, and a cache that is complete or absent.

The compile itself is stood in for (it takes minutes; .ci/run does the real build once per
machine), on a small sdist laid out as the pinned one is.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from typer.testing import CliRunner

from bitalloc.quant.llamacpp import tools
from bitalloc.service.cli import app


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BITALLOC_LLAMACPP_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def sdist(monkeypatch, tmp_path):
    """A tarball with the pinned sdist's layout (the converter, its packages, a CMakeLists), pinned by its own sha256."""
    path = tmp_path / f"llama_cpp_python-{tools.VERSION}.tar.gz"
    prefix = f"llama_cpp_python-{tools.VERSION}/vendor/llama.cpp/"
    files = {"CMakeLists.txt": "", "LICENSE": "MIT", "convert_hf_to_gguf.py": "print('convert')\n",
             "conversion/__init__.py": "", "gguf-py/gguf/__init__.py": "", "src/llama.cpp": ""}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(tools, "SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def fake_cmake(cmake, generator, source, build, jobs, log):
    """What the real build leaves in build/bin: the tools and the shared libraries, plus things not kept."""
    (build / "bin").mkdir(parents=True)
    for name in (*tools.TOOLS, "libggml-base.so.0.25.3", "libllama.so", "llama-simple"):
        (build / "bin" / name).write_text(name)
    (build / "bin" / "libggml-base.so").symlink_to("libggml-base.so.0.25.3")


def test_a_build_lands_complete_and_a_second_call_does_nothing(cache, sdist, monkeypatch):
    monkeypatch.setattr(tools, "_cmake", fake_cmake)
    lines: list[str] = []
    built = tools.build(sdist=sdist, log=lines.append)
    assert built.root == cache / tools.VERSION and tools.find() == built
    assert sorted(p.name for p in built.bin.iterdir()) == sorted([*tools.TOOLS, "libggml-base.so",
                                                                   "libggml-base.so.0.25.3", "libllama.so"])
    assert built.library.is_symlink() and built.library.read_text() == "libggml-base.so.0.25.3"
    assert built.converter.read_text() == "print('convert')\n" and (built.gguf_py / "gguf").is_dir()
    assert built.manifest()["sha256"] == tools.SHA256 and built.manifest()["version"] == tools.VERSION
    assert [p.name for p in cache.iterdir()] == [tools.VERSION]  # no staging folder left behind
    monkeypatch.setattr(tools, "_cmake", lambda *args: pytest.fail("a built cache is not rebuilt"))
    assert tools.build(sdist=sdist, log=lines.append) == built
    assert lines[-1] == f"llama.cpp tools {tools.VERSION} already built in {built.root}"


def test_an_interrupted_build_leaves_no_cache_that_looks_built(cache, sdist, monkeypatch):
    def interrupted(cmake, generator, source, build, jobs, log):
        fake_cmake(cmake, generator, source, build, jobs, log)
        raise KeyboardInterrupt

    monkeypatch.setattr(tools, "_cmake", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tools.build(sdist=sdist, log=lambda _: None)
    assert tools.find() is None and list(cache.iterdir()) == []
    with pytest.raises(tools.ToolsNotBuilt, match="run `bitalloc llamacpp build`"):
        tools.tools()


def test_a_sdist_whose_sha256_differs_is_refused(cache, sdist, monkeypatch):
    monkeypatch.setattr(tools, "SHA256", "0" * 64)
    with pytest.raises(tools.LlamaCppError, match=f"sha256 {hashlib.sha256(sdist.read_bytes()).hexdigest()} is not"):
        tools.build(sdist=sdist, log=lambda _: None)
    assert tools.find() is None and list(cache.iterdir()) == []


@pytest.mark.parametrize("missing, message", [
    ({"cmake"}, "cmake is not installed"),
    ({"c++", "g++", "clang++"}, "no C\\+\\+ compiler found"),
])
def test_a_missing_cmake_or_compiler_is_named(cache, sdist, monkeypatch, missing, message):
    real_which = tools.shutil.which
    monkeypatch.setattr(tools.shutil, "which", lambda name: None if name in missing else real_which(name))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(tools.LlamaCppError, match=message):
        tools.build(sdist=sdist, log=lambda _: None)


def test_cli_where_and_build(cache, sdist, monkeypatch):
    runner = CliRunner()
    done = runner.invoke(app, ["llamacpp", "where"])
    assert done.exit_code == 1 and "run `bitalloc llamacpp build`" in done.output
    monkeypatch.setattr(tools, "_cmake", fake_cmake)
    done = runner.invoke(app, ["llamacpp", "build", "--sdist", str(sdist)])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["llamacpp", "where"])
    root = cache / tools.VERSION
    assert done.exit_code == 0 and f"quantize: {root / 'bin' / 'llama-quantize'}" in done.output
    assert f"converter: {root / 'convert_hf_to_gguf.py'}" in done.output
    assert json.loads((root / tools.MANIFEST).read_text())["tools"] == list(tools.TOOLS)
    monkeypatch.setattr(tools, "SHA256", "0" * 64)
    monkeypatch.setenv("BITALLOC_LLAMACPP_DIR", str(cache / "other"))
    done = runner.invoke(app, ["llamacpp", "build", "--sdist", str(sdist)])
    assert done.exit_code == 1 and "error:" in done.output and "sha256" in done.output


def test_a_folder_in_the_way_without_a_finished_build_is_named(cache, sdist, monkeypatch):
    monkeypatch.setattr(tools, "_cmake", fake_cmake)
    (cache / tools.VERSION / "bin").mkdir(parents=True)
    with pytest.raises(tools.LlamaCppError, match="exists but holds no finished build: remove it"):
        tools.build(sdist=sdist, log=lambda _: None)
    assert [p.name for p in cache.iterdir()] == [tools.VERSION]
