"""Metrics on a model streamed block by block (``quant.stream``): each block's rows of the error
table are filled while that block is materialized, from the Hessians its calibration pass
collected, and both are dropped before the next block is read.

``output_mse`` needs nothing beyond a unit's own block. ``hessian_trace`` needs the loss
Hessian's products with random vectors, which run through the whole model; streamed, they are
computed forward-over-reverse one block at a time (Pearlmutter's R-operator):

1. forward, block by block: each block's output and its directional derivative along the
   units' random vectors (``torch.func.jvp``), from its input and the input's derivative;
   the boundary states and their derivatives are kept;
2. at the head: the loss gradient in the last hidden states and its derivative;
3. backward, block by block in reverse: the block's pullback of the incoming gradient and the
   derivative of that pullback, whose weight part is the Hessian-vector product ``(H v)_unit``
   and whose input part goes to the block below.

Each block is read twice per profile, whatever the number of vectors. The random vectors are
``hessian_trace.rademacher``'s, so the streamed traces are the in-memory ones. Metrics that
need the output's gradient sampled (``fisher_mse``, ``fisher``) or whole-model KL (``kl``, the
KV cells) are not streamed yet and are refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitalloc.quant.hessian import HessianSums
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.hessian_trace import DEFAULT_SAMPLES, check_samples, rademacher, trace_errors
from bitalloc.quant.metrics.loss import next_token_loss
from bitalloc.quant.metrics.output_mse import output_mse
from bitalloc.quant.stream import BlockInputs, StreamedModel, hidden_of
from bitalloc.quant.units import Unit, UnitSet

BlockRows = Callable[[ProfilingContext, list[int]], np.ndarray]
"""Fills some units' rows (their indices among the weight units) from a context narrowed to them."""


def check_streamable(metric: str, kv_cache: bool) -> None:
    """Refuse a metric, or KV-cache units, that a streamed profile cannot measure yet."""
    if metric not in STREAMED:
        raise ValueError(f"metric {metric!r} cannot run on a model streamed block by block yet (streamed: "
                         f"{', '.join(STREAMED)}); give a --max-memory the weights fit in, or one of those metrics")
    if kv_cache:
        raise ValueError("KV-cache units cannot be measured on a model streamed block by block yet")


def streamed_errors(ctx: ProfilingContext, metric: str) -> np.ndarray:
    """The weight rows of the error table, one decoder block at a time (``ctx.model`` is a ``StreamedModel``)."""
    if not isinstance(ctx.model, StreamedModel):
        raise TypeError("streamed_errors needs a StreamedModel")
    check_streamable(metric, len(ctx.units.weights) != len(ctx.units))
    return STREAMED[metric](ctx)


def block_rows(ctx: ProfilingContext, fill: BlockRows, phase: str) -> np.ndarray:
    """The error table, block by block: each block runs on the calibration batches (collecting its
    units' Hessians, which GPTQ and ``output_mse`` use), then ``fill`` gives its units' rows."""
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    units = ctx.weight_units
    row = {u.name: i for i, u in enumerate(units)}
    members = _by_block(model, units)
    errors = np.zeros((len(units), len(ctx.formats)))

    @contextlib.contextmanager
    def visit(index: int, block: nn.Module) -> Iterator[None]:
        names = {u.name for u in members[index]}
        groups = [g for g in ctx.units.tie_groups if g[0] in names]
        with HessianSums(ctx.modules, members[index], groups) as sums:
            yield
        rows = [row[u.name] for u in members[index]]
        errors[rows] = fill(ctx.narrowed(UnitSet(members[index], groups), sums.result()), rows)
        ctx.progress(index + 1, len(members), phase)

    model.walk(ctx.batches(), visit)
    return errors


def _output_mse(ctx: ProfilingContext) -> np.ndarray:
    return block_rows(ctx, lambda part, rows: output_mse(part), "output_mse (streamed)")


def _hessian_trace(ctx: ProfilingContext) -> np.ndarray:
    samples = int(ctx.options.get("hutchinson_samples", DEFAULT_SAMPLES))
    traces = streamed_traces(ctx, samples, int(ctx.options.get("hutchinson_seed", 0)))
    return block_rows(ctx, lambda part, rows: trace_errors(part, traces[rows]), "hessian_trace cells (streamed)")


STREAMED: dict[str, Callable[[ProfilingContext], np.ndarray]] = {
    "output_mse": _output_mse,
    "hessian_trace": _hessian_trace,
}
"""The metrics that run block by block, by name."""


class _BlockFunction:
    """One materialized block as a function of its input hidden states and its units' weights."""

    def __init__(self, block: nn.Module, prefix: str, units: list[Unit]) -> None:
        self.block = block
        self.names = [u.name.removeprefix(prefix) + ".weight" for u in units]
        self.params = {name: block.get_parameter(name) for name in self.names}

    def __call__(self, hidden: torch.Tensor, params: dict[str, torch.Tensor], inputs: BlockInputs) -> torch.Tensor:
        step = inputs.with_hidden(hidden)
        return hidden_of(functional_call(self.block, params, step.args, step.kwargs))


def streamed_traces(ctx: ProfilingContext, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> np.ndarray:
    """``hessian_trace.hutchinson_traces`` of a streamed model, forward-over-reverse block by block."""
    check_samples(samples)
    if not ctx.calibration.tokens:
        raise ValueError(f"{ctx.model.spec}: gradient metrics need a language model and token windows")
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    units = ctx.weight_units
    index = {u.name: i for i, u in enumerate(units)}
    members = _by_block(model, units)
    batches = [batch.to(model.device) for batch in ctx.batches()]
    predicted = sum(batch[:, 1:].numel() for batch in batches)
    pairs = [(b, s) for b in range(len(batches)) for s in range(samples)]
    inputs = model.block_inputs(batches)
    traces = torch.zeros(len(units), dtype=torch.float64)
    steps, done = 2 * len(members) + 1, 0

    def vectors(run: _BlockFunction, block_units: list[Unit], b: int, s: int) -> dict[str, torch.Tensor]:
        return {name: rademacher(run.params[name], seed, b, s, index[u.name]) for name, u in zip(run.names, block_units)}

    # Boundary states per batch, and their derivatives along each (batch, sample)'s vectors.
    states = [[step.hidden for step in inputs]]
    tangents = [[torch.zeros_like(states[0][b]) for b, _ in pairs]]
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(len(members)):
            with model.materialized(i) as block:
                run = _BlockFunction(block, model.block_prefix(i), members[i])
                outputs, derivatives = [], []
                for k, (b, s) in enumerate(pairs):
                    out, derivative = jvp(lambda h, p, b=b: run(h, p, inputs[b]), (states[i][b], run.params),
                                          (tangents[i][k], vectors(run, members[i], b, s)))
                    if s == 0:
                        outputs.append(out)
                    derivatives.append(derivative)
            states.append(outputs)
            tangents.append(derivatives)
            done += 1
            ctx.progress(done, steps, "hessian_trace (streamed)")

        def head(hidden: torch.Tensor, b: int) -> torch.Tensor:
            with model.bypassed(hidden):
                return next_token_loss(model.module, batches[b])

        grads, grad_tangents = [], []
        for k, (b, _) in enumerate(pairs):
            g, g_tangent = jvp(grad(lambda h, b=b: head(h, b)), (states[-1][b],), (tangents[-1][k],))
            grads.append(g)
            grad_tangents.append(g_tangent)
        done += 1
        ctx.progress(done, steps, "hessian_trace (streamed)")

        for i in reversed(range(len(members))):
            with model.materialized(i) as block:
                run = _BlockFunction(block, model.block_prefix(i), members[i])
                for k, (b, s) in enumerate(pairs):
                    def pullback(h, p, g, b=b):
                        return vjp(lambda h, p: run(h, p, inputs[b]), h, p)[1](g)

                    v = vectors(run, members[i], b, s)
                    (g_in, _), (g_in_tangent, hv) = jvp(pullback, (states[i][b], run.params, grads[k]),
                                                        (tangents[i][k], v, grad_tangents[k]))
                    share = batches[b][:, 1:].numel() / predicted
                    for name, unit in zip(run.names, members[i]):
                        traces[index[unit.name]] += share * float((v[name] * hv[name]).sum(dtype=torch.float64))
                    grads[k], grad_tangents[k] = g_in, g_in_tangent
            del states[i + 1], tangents[i + 1]
            done += 1
            ctx.progress(done, steps, "hessian_trace (streamed)")
    return (traces / samples).numpy()


def _by_block(model: StreamedModel, units: list[Unit]) -> list[list[Unit]]:
    """Each block's units, in unit order; a unit outside every block is refused."""
    members: list[list[Unit]] = [[] for _ in model.blocks]
    for unit in units:
        index = next((i for i in range(len(members)) if unit.name.startswith(model.block_prefix(i))), None)
        if index is None:
            raise ValueError(f"unit {unit.name} lies outside the decoder blocks ({model.blocks_path}); a streamed "
                             "profile measures the blocks' units only: exclude it")
        members[index].append(unit)
    return members
