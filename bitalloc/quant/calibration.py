"""Token batches for calibration and evaluation, from any text source.

Sources (a string, so a job spec can name one):

* ``SCHEME:NAME`` for a registered text source (``register_text_source``): ``datasets:`` below,
  and the plugins' own, such as ``zoo:calibration`` / ``zoo:evaluation`` / ``zoo:tuning``, the
  reference splits built by ``bitalloc zoo build`` (``quant.zoo`` registers ``zoo``);
* a ``.txt`` file (one document) or a ``.jsonl`` file (one document per line, text in the
  ``text`` field, or another field named after ``#``: ``data.jsonl#content``);
* ``datasets:ORG/NAME[:CONFIG]:SPLIT[#field]``, a dataset on the hub, loaded with the ``datasets``
  library (never a local folder or one of its file builders: local text is named by its path).

Modules that are not language models take input tensors instead: a ``.safetensors`` file
whose ``inputs`` tensor holds the samples, or a registered tensor source
(``register_tensor_source``), such as ``zoo:digits`` (the digits CNN's training images).

Documents are tokenized separately and joined with the end-of-sequence token.
Calibration draws ``count`` windows at seeded random offsets; evaluation cuts consecutive,
non-overlapping windows, so every evaluated token is scored once. Each window starts the way
the model's tokenizer starts a sequence (``sequence_prefix``: BOS for Llama-3, Gemma, Mistral
and any tokenizer with ``add_bos_token``; nothing for SmolLM2 or Qwen2), since a model trained
to always see BOS first is another model without it; ``bos`` overrides the choice. The prefix
only conditions the window: every scored position predicts a text token. The sha256 of the text
goes with the tokens, so a profile records exactly what calibrated it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bitalloc.quant.loading import LoadPolicy
from bitalloc.quant.plugins import load_plugins

TextSource = Callable[[str], list[str]]
TensorSource = Callable[[str], torch.Tensor]
_TEXT_SOURCES: dict[str, TextSource] = {}
_TENSOR_SOURCES: dict[str, TensorSource] = {}


def register_text_source(scheme: str, load: TextSource) -> None:
    """Make ``SCHEME:NAME`` name the documents ``load(NAME)`` returns (``ValueError`` for a bad name)."""
    _TEXT_SOURCES[scheme] = load


def register_tensor_source(scheme: str, load: TensorSource) -> None:
    """Make ``SCHEME:NAME`` name the input samples ``load(NAME)`` returns, one per row."""
    _TENSOR_SOURCES[scheme] = load


def _registered(registry: dict, source: str) -> Callable | None:
    load_plugins()
    scheme = source.partition(":")[0]
    return registry.get(scheme) if scheme != source else None


@dataclass(frozen=True)
class CalibrationSet:
    """Model inputs cut from ``source``, whose data hashes to ``sha256``.

    For a language model ``inputs`` are token windows ``[windows, seq_len]`` and every
    token is a sample; for another module they are a batch of input tensors, one sample
    each. Metrics report errors per sample, so they compare across layers and models.
    """

    inputs: torch.Tensor
    source: str
    sha256: str
    tokens: bool = True
    prefix: tuple[int, ...] = ()

    @property
    def samples(self) -> int:
        return self.inputs.numel() if self.tokens else len(self.inputs)

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.inputs.split(batch_size))

    def head(self, windows: int, length: int | None = None) -> CalibrationSet:
        """The first ``windows`` inputs (cut to their first ``length`` tokens), same provenance:
        a cheaper subset for work that needs fewer samples (traces, gradients, KL)."""
        inputs = self.inputs[:windows] if length is None else self.inputs[:windows, :length]
        return replace(self, inputs=inputs.contiguous())

    def describe(self) -> dict:
        """Provenance: the source, its data hash, and a hash of the exact inputs drawn from it."""
        inputs_sha256 = hashlib.sha256(self.inputs.contiguous().numpy().tobytes()).hexdigest()
        return {"source": self.source, "sha256": self.sha256, "inputs_sha256": inputs_sha256,
                "shape": list(self.inputs.shape), "samples": self.samples, "prefix": list(self.prefix)}


def load_texts(source: str) -> list[str]:
    """The documents of a source; ``ValueError`` says what is wrong with a bad one."""
    load = _registered(_TEXT_SOURCES, source)
    if load is not None:
        return load(source.partition(":")[2])
    path_text, _, field = source.partition("#")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ValueError(f"text source {source!r}: file {path} does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path, field or "text")
    if field:
        raise ValueError(f"text source {source!r}: a field (#...) applies to .jsonl files only")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text source {source!r}: the file is empty")
    return [text]


def read_jsonl(path: Path, field: str) -> list[str]:
    """The ``field`` of every record of a JSON-lines file."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: no text field {field!r}")
            texts.append(record[field])
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _dataset_parts(spec: str) -> tuple[str, str | None, str, str]:
    """``ORG/NAME[:CONFIG]:SPLIT[#field]`` -> (name, config, split, field), refusing anything
    ``datasets`` would read from this machine: a local folder, a glob, or a file builder such as
    ``csv`` or ``json`` (which, given no files, reads the working directory)."""
    name_part, _, field = spec.partition("#")
    parts = name_part.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"datasets source {spec!r}: expected datasets:ORG/NAME[:CONFIG]:SPLIT[#field]")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    if not _HUB_DATASET.match(name) or ".." in name or Path(name).exists():
        raise ValueError(f"datasets source {spec!r}: name a dataset on the hub as ORG/NAME; "
                         "local text is named by its file path")
    return name, config, split, field or "text"


def check_source(source: str, policy: LoadPolicy) -> None:
    """What can be refused before any text is read: a ``datasets:`` source that is not a hub
    dataset, or a local file outside the model roots. ``load_texts`` and ``tensor_samples`` read
    only what passes, so a job is held to it at submit and in the worker."""
    if source.startswith("datasets:"):
        _dataset_parts(source.removeprefix("datasets:"))
    elif _registered(_TEXT_SOURCES, source) is None and _registered(_TENSOR_SOURCES, source) is None:
        policy.check_path(Path(source.partition("#")[0]), "text source")


def _load_datasets(spec: str) -> list[str]:
    from datasets import load_dataset

    name, config, split, field = _dataset_parts(spec)
    dataset = load_dataset(name, config, split=split)
    if field not in dataset.column_names:
        raise ValueError(f"datasets source {spec!r}: no column {field!r} (columns: {dataset.column_names})")
    return [t for t in dataset[field] if t and t.strip()]


register_text_source("datasets", _load_datasets)


def text_sha256(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


_STREAMS: dict[tuple, torch.Tensor] = {}


def _source_stream(tokenizer: Any, source: str) -> tuple[torch.Tensor, str]:
    """The token stream of a source and its text hash, tokenized once per process.

    Tokenizing the reference calibration split takes seconds; jobs, tests and benches
    that draw several calibration sets from one source should pay that once.
    """
    texts = load_texts(source)
    digest = text_sha256(texts)
    key = (digest, getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.eos_token_id)
    if key not in _STREAMS:
        _STREAMS[key] = token_stream(tokenizer, texts)
    return _STREAMS[key], digest


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents as one 1-D token stream, each followed by the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sequence_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text (what ``tokenizer(text)`` adds in
    front of ``tokenizer(text, add_special_tokens=False)``): usually BOS or nothing."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def window_prefix(tokenizer: Any, bos: bool | None = None) -> tuple[int, ...]:
    """What each window starts with: as the tokenizer starts a sequence (``bos=None``), the BOS
    token (``True``), or nothing (``False``)."""
    if bos is None:
        return sequence_prefix(tokenizer)
    if not bos:
        return ()
    if tokenizer.bos_token_id is None:
        raise ValueError("bos: this tokenizer has no BOS token")
    return (tokenizer.bos_token_id,)


def _with_prefix(body: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    if not prefix:
        return body
    return torch.cat([torch.tensor(prefix, dtype=body.dtype).expand(len(body), -1), body], dim=1)


def _text_to_cut(tokenizer: Any, source: str, seq_len: int, count: int | None,
                 bos: bool | None) -> tuple[tuple[int, ...], int, torch.Tensor, str]:
    """What windows are cut from: their prefix, how many text tokens follow it in a window, and
    the source's token stream and text hash."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    prefix = window_prefix(tokenizer, bos)
    stream, digest = _source_stream(tokenizer, source)
    return prefix, seq_len - len(prefix), stream, digest


def calibration_tokens(tokenizer: Any, source: str, *, seq_len: int = 512, count: int = 32, seed: int = 0,
                       bos: bool | None = None) -> CalibrationSet:
    """``count`` windows of ``seq_len`` tokens: the window prefix, then text from seeded random
    offsets of the source."""
    prefix, body, stream, digest = _text_to_cut(tokenizer, source, seq_len, count, bos)
    if body < 1 or len(stream) < body:
        raise ValueError(f"text source {source!r} has {len(stream)} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - body + 1, (count,), generator=generator)
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    return CalibrationSet(_with_prefix(windows, prefix), source, digest, prefix=prefix)


def evaluation_tokens(tokenizer: Any, source: str, *, seq_len: int = 512, max_windows: int | None = None,
                      bos: bool | None = None) -> CalibrationSet:
    """Consecutive, non-overlapping stretches of the source, each after the window prefix (the
    tail shorter than a window is dropped).

    ``max_windows`` keeps evenly spaced windows across the whole text, so a smaller
    evaluation still samples every document region rather than only the first ones.
    """
    prefix, body, stream, digest = _text_to_cut(tokenizer, source, seq_len, max_windows, bos)
    total = len(stream) // body if body > 0 else 0
    if total == 0:
        raise ValueError(f"text source {source!r} has {len(stream)} tokens, fewer than seq_len={seq_len}")
    windows = stream[: total * body].reshape(total, body)
    if max_windows is not None and max_windows < total:
        windows = windows[torch.linspace(0, total - 1, max_windows).round().long()]
    return CalibrationSet(_with_prefix(windows, prefix), source, digest, prefix=prefix)


def tensor_samples(source: str, *, count: int = 256, seed: int = 0) -> CalibrationSet:
    """``count`` input samples (seeded choice) for a module that is not a language model."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    load = _registered(_TENSOR_SOURCES, source)
    if load is not None:
        inputs = load(source.partition(":")[2])
    else:
        path = Path(source).expanduser()
        if path.suffix != ".safetensors" or not path.exists():
            known = ", ".join(f"{scheme}:NAME" for scheme in sorted(_TENSOR_SOURCES))
            raise ValueError(f"tensor source {source!r}: expected an existing .safetensors file or {known}")
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "inputs" not in tensors:
            raise ValueError(f"tensor source {source!r}: no tensor named 'inputs' (found {sorted(tensors)})")
        inputs = tensors["inputs"]
    digest = hashlib.sha256(inputs.contiguous().numpy().tobytes()).hexdigest()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(inputs), generator=generator)[: min(count, len(inputs))]
    return CalibrationSet(inputs[chosen], source, digest, tokens=False)


def calibration_for(model: Any, source: str | None = None, *, seq_len: int = 512, count: int = 32, seed: int = 0,
                    bos: bool | None = None) -> CalibrationSet:
    """Calibration inputs that fit the model: token windows for a causal LM, tensors otherwise.

    With no ``source``: the reference calibration split for a language model; a module
    must name its inputs (``zoo:digits`` for the reference CNN).
    """
    if getattr(model, "is_causal_lm", False):
        return calibration_tokens(model.tokenizer, source or "zoo:calibration", seq_len=seq_len, count=count, seed=seed,
                                  bos=bos)
    if source is None:
        raise ValueError("calibration: a module that is not a language model needs input tensors "
                         "(a .safetensors file with an 'inputs' tensor, or zoo:digits)")
    return tensor_samples(source, count=count, seed=seed)


def shared_documents(source_a: str, source_b: str) -> int:
    """How many documents two text sources have in common (by content hash).

    Calibration and evaluation text must never overlap, or the evaluation flatters
    whatever was fitted on calibration; the pipeline refuses a job where they do.
    """
    hashes = [{hashlib.sha256(t.encode("utf-8")).digest() for t in load_texts(s)} for s in (source_a, source_b)]
    return len(hashes[0] & hashes[1])
