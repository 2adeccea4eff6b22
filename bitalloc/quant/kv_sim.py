"""KV-cache quantization in simulation: run a transformers model whose K or V caches are
held in integer formats, as ``quant.evaluate.applied`` does for weights.

Layouts follow KIVI (Liu et al., 2024) and match what ``quant.kv`` costs:

* keys ``[batch, heads, tokens, head_dim]`` are quantized per channel: every
  (head, channel) is a row whose groups are ``group_size`` consecutive tokens (``_pc``: one
  group over the whole context), because key outliers sit in fixed channels;
* values are quantized per token: every (head, token) is a row whose groups are
  ``group_size`` consecutive channels of the head (``_pc``: the whole head).

The grids are ``IntFormat``'s own (float16 scales, offsets when asymmetric), so a cache
cell costs and rounds exactly as the weight formats of the same name.

``SimulatedKVCache`` is a ``DynamicCache`` that stores the exact states and hands the
attention their fake-quantized copy, so every query, the current token's included, reads
the quantized cache. That is slightly harsher than KIVI, which keeps the newest tokens in
a full-precision residual; groups of keys are quantized as they stand, a partial last
group with the tokens it has so far. ``kv_applied`` puts such a cache into every forward
pass of a model, so code that calls ``model(input_ids, use_cache=False)`` (the
``Evaluator``) scores the quantized cache unchanged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bitalloc.quant.formats import Format, IntFormat, get_format
from bitalloc.quant.loading import LoadedModel

_KV_UNIT = re.compile(r"^kv\.(\d+)\.(key|value)$")


def fake_quantize_keys(keys: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Keys ``[batch, heads, tokens, head_dim]`` through ``fmt`` per channel, grouped along tokens."""
    *lead, tokens, head_dim = keys.shape
    rows = keys.transpose(-1, -2).reshape(-1, tokens)
    return fmt.fake_quantize(rows).reshape(*lead, head_dim, tokens).transpose(-1, -2)


def fake_quantize_values(values: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Values ``[batch, heads, tokens, head_dim]`` through ``fmt`` per token, grouped along ``head_dim``."""
    return fmt.fake_quantize(values.reshape(-1, values.shape[-1])).reshape(values.shape)


@dataclass(frozen=True)
class LayerPlan:
    """The formats of one attention layer's caches; ``None`` leaves a cache as the model computes it."""

    key: IntFormat | None = None
    value: IntFormat | None = None


def _cache_format(unit: str, name: str) -> IntFormat | None:
    fmt: Format = get_format(name)
    if fmt.is_keep:
        return None
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"{unit}: KV caches take integer formats or 16-bit, not {fmt.name}")
    return fmt


def kv_plan(allocation: Mapping[str, str]) -> dict[int, LayerPlan]:
    """Per layer index, the cache formats that ``allocation`` names (its weight units are ignored).

    A 16-bit format (``bf16``/``fp16``) keeps the cache in the model's own precision: the
    unquantized reference is the model as it runs, so such a cache costs no accuracy.
    """
    plan: dict[int, LayerPlan] = {}
    for unit, name in allocation.items():
        match = _KV_UNIT.match(unit)
        if match is None:
            if unit.startswith("kv."):
                raise KeyError(f"{unit!r} is not a KV unit name (expected kv.LAYER.key or kv.LAYER.value)")
            continue
        layer, which = int(match[1]), match[2]
        current = plan.get(layer, LayerPlan())
        fmt = _cache_format(unit, name)
        plan[layer] = LayerPlan(fmt, current.value) if which == "key" else LayerPlan(current.key, fmt)
    return plan


class SimulatedKVCache(DynamicCache):
    """A ``DynamicCache`` whose planned layers return their states fake-quantized.

    The stored states stay exact, so each update re-quantizes the whole cache from them:
    complete key groups round the same way every step, as if they had been stored quantized.
    """

    def __init__(self, config, plan: Mapping[int, LayerPlan]):
        super().__init__(config=config)
        self.plan = dict(plan)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.plan.get(layer_idx)
        if layer is None:
            return keys, values
        if layer.key is not None:
            keys = fake_quantize_keys(keys, layer.key)
        if layer.value is not None:
            values = fake_quantize_values(values, layer.value)
        return keys, values


@contextlib.contextmanager
def kv_applied(model: LoadedModel, allocation: Mapping[str, str]) -> Iterator[None]:
    """Run ``model`` with the KV units of ``allocation`` (unit -> format name) in their formats.

    Every forward pass that brings no cache of its own gets a fresh ``SimulatedKVCache``
    (and ``use_cache=True``, which changes nothing else), so prefill scoring such as
    ``Evaluator.score`` sees the quantized caches. A pass that brings a different cache
    (``generate``) is refused rather than silently run unquantized: decode with a
    ``SimulatedKVCache(config, kv_plan(allocation))`` instead. An allocation without KV units
    leaves the model untouched. The hook is removed on exit, even after an error. Build an
    ``Evaluator`` outside the block: its reference is a deep copy, which would carry the hook.
    """
    plan = kv_plan(allocation)
    if not plan:
        yield
        return
    module = model.module
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"{model.spec} has no transformers config: its KV caches cannot be simulated")

    def inject(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("past_key_values")
        if cache is None:
            kwargs["past_key_values"] = SimulatedKVCache(config, plan)
            kwargs["use_cache"] = True
        elif not isinstance(cache, SimulatedKVCache):
            raise ValueError("kv_applied: this forward pass brings its own cache; pass a SimulatedKVCache to decode")
        return args, kwargs

    handle = module.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
