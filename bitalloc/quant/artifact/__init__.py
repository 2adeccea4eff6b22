"""Artifacts: a model quantized as an allocation, on disk, loadable and verifiable.

Layout of an artifact folder:

* ``weights.safetensors`` (``weights-NNNNN.safetensors``, one per decoder block after what lies
  outside them, when the model was streamed block by block: ``weights`` in the manifest names
  them): each unit's tensors under ``<unit>.<name>`` in the storage its format calls for
  (``quant.artifact.storage``: packed bit planes + float16 scales/offsets for integers, float8 +
  per-row scales for ``fp8_e4m3``, packed codes + scales for NF4/FP6/FP4, 16-bit for bf16/fp16),
  and every other tensor of the model as it is, in its own dtype;
* ``bitalloc_artifact.json``: the manifest (``quant.artifact.manifest``): per unit its format,
  storage, ``[N, K]`` shape, group size, method, bytes and what runs it once loaded; per tensor
  its dtype, shape, sha256 and file; per file its size and sha256; tied tensors; the allocation; and
  provenance (model spec, bitalloc version, method, calibration hash for GPTQ);
* for a transformers model: ``config.json``, ``generation_config.json`` and the tokenizer files.

``build_artifact`` writes one; ``load_artifact`` verifies every byte, then returns a
``LoadedModel`` whose Linear units run on ``kernels.QuantLinear`` / ``Fp8Linear``.

``write_checkpoint`` writes the same quantized weights for another runtime: a compressed-tensors
checkpoint (a Hugging Face model folder) that vLLM and transformers load
(``quant.artifact.compressed_tensors``).
"""

from bitalloc.quant.artifact.build import build_artifact
from bitalloc.quant.artifact.compressed_tensors import Checkpoint, write_checkpoint
from bitalloc.quant.artifact.load import load_artifact
from bitalloc.quant.artifact.manifest import MANIFEST, WEIGHTS, Artifact, ArtifactError

__all__ = ["MANIFEST", "WEIGHTS", "Artifact", "ArtifactError", "Checkpoint", "build_artifact", "load_artifact",
           "write_checkpoint"]
