"""The profile: for every unit x format, the sensitivity ``error``, the exact ``bytes`` and
the ``latency``; with the model, metric, calibration hash and formats that made it.

A profile is the expensive, cacheable product of a model + calibration set + metric. It is
saved as one ``.npz`` (plain arrays plus a JSON header; no pickle), and ``ProfileCache``
finds it again by a key over everything that determines its numbers, so a second request
for the same profile is instant. ``search`` gets it as plain arrays (``arrays()``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.costs import LatencyModel, unit_bytes
from bitalloc.quant.device import module_device
from bitalloc.quant.formats import Format, GgmlFormat
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.llamacpp.tools import VERSION as LLAMACPP_VERSION
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.metrics import get_metric
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.streamed import WALKED, check_streamable
from bitalloc.quant.progress import ProgressFn, no_progress
from bitalloc.quant.quantizers import Method
from bitalloc.quant.shards import ShardRunner, in_sequence, sharded_errors
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.units import Unit, UnitSet

FORMAT_VERSION = 1
KEY_VERSION = 3
"""What a profile key covers. 2: also the windows' prefix (BOS), each cache's sliding window, and
the latency ``hardware`` (was ``device``). 3: also the compute device type and dtype the model ran
in. A profile cached under an older key is not found by a newer one: it is computed anew, and
``ProfileCache`` says so once."""
log = logging.getLogger("bitalloc.profile")


@dataclass
class Profile:
    units: list[Unit]
    formats: list[str]
    error: np.ndarray
    bytes: np.ndarray
    latency: np.ndarray
    allowed: np.ndarray
    tie_groups: list[list[str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.units), len(self.formats))
        for name in ("error", "bytes", "latency", "allowed"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"profile {name} has shape {getattr(self, name).shape}, expected {shape}")

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def numel(self) -> np.ndarray:
        return np.array([u.numel for u in self.units], dtype=np.int64)

    def arrays(self) -> dict:
        """What ``search`` needs, as plain arrays and lists (tie groups as unit indices)."""
        index = {name: i for i, name in enumerate(self.unit_names)}
        return {
            "error": self.error, "bytes": self.bytes, "latency": self.latency, "allowed": self.allowed,
            "numel": self.numel, "unit_names": self.unit_names, "format_names": list(self.formats),
            "tie_groups": [[index[n] for n in group] for group in self.tie_groups],
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written profile."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"version": FORMAT_VERSION, "units": [asdict(u) for u in self.units], "formats": self.formats,
                  "tie_groups": self.tie_groups, "meta": self.meta}
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
            np.savez_compressed(handle, error=self.error, bytes=self.bytes, latency=self.latency,
                                allowed=self.allowed, header=np.array(json.dumps(header)))
        os.replace(handle.name, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"profile {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {k: data[k] for k in ("error", "bytes", "latency", "allowed")}
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path} is not a bitalloc profile: {exc}") from exc
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: profile format version {header.get('version')} is not {FORMAT_VERSION}")
        units = [Unit(**{**u, "shape": tuple(u["shape"])}) for u in header["units"]]
        return cls(units, header["formats"], tie_groups=header["tie_groups"], meta=header["meta"], **arrays)


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and bytes: the model's identity for caching."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compute_of(model: LoadedModel) -> dict[str, str]:
    """Where and in what the model computes (``cpu``/``cuda``, ``float32``/``bfloat16``/...): both change
    a profile's numbers, so both are in its key and its meta. The device's index is not: ``cuda:1``
    computes what ``cuda:0`` does."""
    dtype = next(model.module.parameters()).dtype
    return {"device": module_device(model.module).type, "dtype": str(dtype).removeprefix("torch.")}


def model_identity(model: LoadedModel) -> str:
    """The model's fingerprint: of its checkpoint files when it streams (its weights are not in
    memory to hash), of its parameters otherwise."""
    if isinstance(model, StreamedModel):
        return "checkpoint:" + model.checkpoint.fingerprint()
    return model_fingerprint(model.module)


def profile_key(fingerprint: str, metric: str, calibration: CalibrationSet, formats: list[Format],
                method: Method, units: UnitSet, kv: KVOptions | None, hardware: str,
                compute: dict[str, str] | None = None, options: dict | None = None) -> str:
    """A hash of everything that determines a profile's numbers (``compute``: ``compute_of`` the model;
    ``options``: the metric's, such as its Hutchinson samples)."""
    payload = {
        "compute": compute, "model": fingerprint, "metric": metric, "calibration": calibration.describe(), "method": method,
        "formats": [f.name for f in formats], "units": units.names(), "ties": units.tie_groups,
        "windows": {u.name: u.window for u in units.units if u.window is not None},
        "kv": None if kv is None else asdict(kv), "hardware": hardware, "version": FORMAT_VERSION,
        "key_version": KEY_VERSION,
    }
    if options:  # only when given, so that the keys of profiles made with the defaults stay as they were
        payload["options"] = options
    if any(isinstance(f, GgmlFormat) for f in formats):  # ggml's quantizers are those of the pinned llama.cpp
        payload["llama.cpp"] = LLAMACPP_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cost_tables(units: list[Unit], formats: list[Format], latency: LatencyModel,
                kv: KVOptions | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact bytes, latency and the allowed mask for every cell."""
    shape = (len(units), len(formats))
    nbytes, seconds, allowed = np.zeros(shape, np.int64), np.zeros(shape), np.ones(shape, bool)
    context, batch = (kv.context, kv.batch) if kv else (0, 1)
    for i, unit in enumerate(units):
        for j, fmt in enumerate(formats):
            if unit.kind != "weight" and not (fmt.is_keep or fmt.name.startswith("int")):
                allowed[i, j] = False
                continue
            nbytes[i, j] = unit_bytes(unit, fmt, context=context, batch=batch)
            seconds[i, j] = latency.seconds(unit, fmt, int(nbytes[i, j]))
    return nbytes, seconds, allowed


def build_profile(
    model: LoadedModel,
    units: UnitSet,
    formats: list[Format],
    metric: str,
    calibration: CalibrationSet,
    *,
    method: Method = "rtn",
    kv: KVOptions | None = None,
    hardware: str = "h100",
    progress: ProgressFn = no_progress,
    options: dict | None = None,
    shards: int = 1,
    runner: ShardRunner = in_sequence,
) -> Profile:
    """Measure every unit x format cell with ``metric`` and cost it; a streamed model's cells in
    ``shards`` block ranges, run by ``runner`` (the same numbers however many: ``quant.shards``)."""
    metric_fn = get_metric(metric)
    start = time.perf_counter()
    ctx = ProfilingContext(model, units, formats, calibration, method, progress=progress, options=options or {})
    streamed = isinstance(model, StreamedModel)
    if shards != 1 and not streamed:
        raise ValueError("shards split a profile streamed block by block: stream the model (--stream), or leave shards at 1")
    if not streamed:
        weight_errors = metric_fn(ctx)
    elif metric in WALKED:
        check_streamable(metric, shards)
        weight_errors = WALKED[metric](ctx)
    else:
        weight_errors = sharded_errors(ctx, metric, shards, runner)
    error = np.zeros((len(units), len(formats)))
    weight_rows = [i for i, u in enumerate(units.units) if u.kind == "weight"]
    error[weight_rows] = weight_errors
    kv_rows = [i for i, u in enumerate(units.units) if u.kind != "weight"]
    if kv_rows:
        from bitalloc.quant.metrics.kv_kl import kv_errors

        error[kv_rows] = kv_errors(ctx, [units.units[i] for i in kv_rows])
    latency_model = LatencyModel.for_hardware(hardware)
    nbytes, seconds, allowed = cost_tables(units.units, formats, latency_model, kv)
    meta = {
        "model": model.spec, "metric": metric, "method": method, "calibration": calibration.describe(),
        "formats": [f.name for f in formats], "latency_source": latency_model.source, "hardware": hardware,
        **compute_of(model), "streamed": streamed,
        "kv": None if kv is None else asdict(kv), **({"options": options} if options else {}),
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Profile(units.units, [f.name for f in formats], error, nbytes, seconds, allowed, units.tie_groups, meta)


class ProfileCache:
    """Profiles on disk by key: ``get_or_build`` computes a profile only once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get_or_build(self, model: LoadedModel, units: UnitSet, formats: list[Format], metric: str,
                     calibration: CalibrationSet, **kwargs) -> tuple[Profile, bool]:
        """The cached profile (and ``True``), or a freshly built and stored one (and ``False``)."""
        key = profile_key(model_identity(model), metric, calibration, formats, kwargs.get("method", "rtn"), units,
                          kwargs.get("kv"), kwargs.get("hardware", "h100"), compute_of(model), kwargs.get("options"))
        path = self.path(key)
        if path.exists():
            return Profile.load(path), True
        self.say_if_rekeyed()
        profile = build_profile(model, units, formats, metric, calibration, **kwargs)
        profile.meta.update(key=key, key_version=KEY_VERSION)
        profile.save(path)
        return profile, False

    def say_if_rekeyed(self) -> int:
        """Warn (once per cache folder and process) how many cached profiles an older key made: they
        are not reused, so a model profiled before is profiled again. Returns their count."""
        root = self.root.resolve()
        if root in _REKEY_CHECKED:
            return 0
        _REKEY_CHECKED.add(root)
        older = 0
        for path in self.root.glob("*.npz"):
            try:
                with np.load(path, allow_pickle=False) as data:
                    older += json.loads(str(data["header"]))["meta"].get("key_version") != KEY_VERSION
            except (ValueError, KeyError, OSError):
                continue
        if older:
            log.warning("%d cached profile(s) in %s were keyed by an earlier bitalloc (key version < %d: before "
                        "the window prefix, sliding windows, the latency hardware, the compute device and dtype "
                        "were part of the key); they "
                        "are not reused, so this profile is computed anew", older, self.root, KEY_VERSION)
        return older


_REKEY_CHECKED: set[Path] = set()
