"""The distribution installs one importable name, ``bitalloc``, and lives beside Hugging Face's ``kernels``.

transformers imports a top-level ``kernels`` (Hugging Face's kernel hub). Anything of ours at the
top level of site-packages, or of the repository root (on ``sys.path`` under ``python -m``), would
shadow or overwrite it; these tests build and install the real wheel and load the reference model
from both places to prove it does not.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def hugging_face_kernels() -> Path:
    """The folder of the ``kernels`` package transformers depends on, as its distribution installed it."""
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve() == installed, f"`kernels` resolves to {spec and spec.origin}"
    return installed.parent


def tree_digest(folder: Path) -> str:
    """One sha256 over every file's relative path and bytes (byte-code caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """bitalloc's wheel, built as ``pip install .`` builds it, from a copy of the checkout (the build
    writes ``build/`` and ``*.egg-info`` beside the sources)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "bitalloc", source / "bitalloc", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, cwd=out)
    (built,) = out.glob("bitalloc-*.whl")
    return built


def test_the_wheel_installs_only_bitalloc(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["bitalloc"]
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"bitalloc"}
    for data in ("bitalloc/service/dashboard/static/index.html", "bitalloc/migrations/script.py.mako",
                 "bitalloc/migrations/versions/0001_initial_schema.py"):
        assert data in names, f"{data} is missing from the wheel"


def test_installing_the_wheel_leaves_hugging_face_kernels_untouched(wheel, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(hugging_face_kernels(), site / "kernels")
    before = tree_digest(site / "kernels")
    # --upgrade replaces every top-level folder the wheel brings: a `kernels/` of ours would overwrite.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                    "--target", str(site), str(wheel)], check=True)
    assert tree_digest(site / "kernels") == before
    probe = ("import kernels, bitalloc.kernels as ours; "
             "from bitalloc.kernels import pack; "
             "print(kernels.__file__); print(ours.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    lines = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True,
                           capture_output=True, text=True).stdout.split()
    assert lines == [str(site / "kernels" / "__init__.py"), str(site / "bitalloc" / "kernels" / "__init__.py")]


LOAD = """
import sys
from pathlib import Path
import kernels
from transformers import AutoModelForCausalLM
from bitalloc.quant.zoo import asset_dir

print(Path(kernels.__file__).resolve())
model = AutoModelForCausalLM.from_pretrained(asset_dir("llm"))
print(type(model).__name__)
"""


@pytest.mark.reference
@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_transformers_loads_the_reference_model_beside_bitalloc(zoo, where, tmp_path):
    """``python -c`` puts the working directory first on sys.path, as ``python -m pytest`` does."""
    cwd = REPO if where == "repository root" else tmp_path
    out = subprocess.run([sys.executable, "-c", LOAD], cwd=cwd, check=True, capture_output=True, text=True)
    kernels_file, architecture = out.stdout.split()
    assert Path(kernels_file).parent == hugging_face_kernels()
    assert architecture == "LlamaForCausalLM"


def test_the_console_script_runs_from_any_directory(tmp_path):
    script = Path(sys.executable).parent / "bitalloc"
    out = subprocess.run([str(script), "--help"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "generate" in out.stdout and "run" in out.stdout
