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
``hessian_trace.rademacher``'s, so the streamed traces are the in-memory ones.

``fisher_mse`` needs each unit's output gradient of the sampled-label log-likelihood: a forward
walk keeps the boundary states, the head gives the gradient in the last hidden states, and a
reverse walk runs each block again from its input state and pulls the gradient through it,
collecting its units' output gradients on the way (each block read three times: forward,
backward, and for its Hessians and cells). The labels are drawn from ``fisher_mse``'s generator
in the same order, so the streamed cells are the in-memory ones. The KV units' ``kv_kl`` cells
score the model through ``quant.execution``, which streams, and so does ``kl``: one streamed walk
per cell. ``fisher`` (the empirical Fisher's diagonal) walks forward keeping each window's
boundary states, then backward once in reverse, squaring each window's weight gradients while
the block is read and filling its units' cells there. Those two are ``WALKED``: block ranges
cannot split them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitalloc.quant.hessian import HessianSums
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.fisher import diagonal_errors
from bitalloc.quant.metrics.fisher_mse import (
    channel_squares,
    fisher_batches,
    fisher_cells,
    fisher_generator,
    log_probs_of,
    sampled_score,
)
from bitalloc.quant.metrics.hessian_trace import (
    DEFAULT_SAMPLES,
    check_samples,
    hutchinson_setup,
    rademacher,
    trace_errors,
)
from bitalloc.quant.metrics.kl import kl
from bitalloc.quant.metrics.loss import as_matrix, differentiable, next_token_loss
from bitalloc.quant.metrics.output_mse import output_mse
from bitalloc.quant.stream import BlockInputs, StreamedModel, hidden_of
from bitalloc.quant.units import Unit, UnitSet

Shared = dict[str, torch.Tensor]
"""Per-unit quantities a metric needs the whole model walked for (a unit's Hutchinson trace, its
output Fisher), by unit name: computed once, before any block's rows, and handed to every shard."""


@dataclass(frozen=True)
class StreamedMetric:
    """A metric on a model streamed block by block, in two phases: ``shared`` walks the whole
    model for what each unit's rows need beyond its own block; ``fill`` then gives one block's
    units' rows from a context narrowed to them (their Hessians from the block's calibration
    pass) and those shared quantities. The second phase is what block-range shards split."""

    shared: Callable[[ProfilingContext], Shared]
    fill: Callable[[ProfilingContext, Shared], np.ndarray]


def check_streamable(metric: str, shards: int = 1) -> None:
    """Refuse a metric that a streamed profile cannot measure yet, or cannot split into shards."""
    if metric in WALKED and shards != 1:
        raise ValueError(f"metric {metric!r} walks the whole model for its cells, which block-range shards "
                         "cannot split: leave shards at 1")
    if metric not in STREAMED and metric not in WALKED:
        raise ValueError(f"metric {metric!r} cannot run on a model streamed block by block yet (streamed: "
                         f"{', '.join((*STREAMED, *WALKED))}); give a --max-memory the weights fit in, or one of "
                         "those metrics")


def streamed_metric(ctx: ProfilingContext, metric: str) -> StreamedMetric:
    """The streamed form of ``metric`` for ``ctx`` (whose model must be a ``StreamedModel``)."""
    if not isinstance(ctx.model, StreamedModel):
        raise TypeError("a streamed metric needs a StreamedModel")
    check_streamable(metric)
    return STREAMED[metric]


def block_rows(ctx: ProfilingContext, metric: StreamedMetric, shared: Shared, blocks: range, phase: str,
               entry: list[torch.Tensor] | None = None) -> tuple[list[int], np.ndarray]:
    """The rows of the units in ``blocks`` (their indices among the weight units, and their cells),
    block by block: each block runs on the calibration batches (collecting its units' Hessians,
    which GPTQ and the cells use), then ``metric.fill`` gives its units' rows. The blocks before
    the range run only to hand it their hidden states, unless ``entry`` gives those; none after
    it runs."""
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    units = ctx.weight_units
    row = {u.name: i for i, u in enumerate(units)}
    members = _by_block(model, units)
    found: dict[int, np.ndarray] = {}

    @contextlib.contextmanager
    def visit(index: int, block: nn.Module) -> Iterator[None]:
        names = {u.name for u in members[index]}
        groups = [g for g in ctx.units.tie_groups if g[0] in names]
        with HessianSums(ctx.modules, members[index], groups) as sums:
            yield
        cells = metric.fill(ctx.narrowed(UnitSet(members[index], groups), sums.result()), shared)
        found.update({row[u.name]: cells[k] for k, u in enumerate(members[index])})
        ctx.progress(index - blocks.start + 1, len(blocks), phase)

    model.walk(ctx.batches(), visit, blocks, entry)
    rows = sorted(found)
    return rows, np.array([found[r] for r in rows]).reshape(len(rows), len(ctx.formats))


def _trace_shared(ctx: ProfilingContext) -> Shared:
    traces = streamed_traces(*hutchinson_setup(ctx))
    return {u.name: torch.tensor(float(t), dtype=torch.float64) for u, t in zip(ctx.weight_units, traces)}


def _trace_fill(part: ProfilingContext, shared: Shared) -> np.ndarray:
    return trace_errors(part, np.array([float(shared[u.name]) for u in part.weight_units]))


def _fisher_shared(ctx: ProfilingContext) -> Shared:
    fisher = streamed_output_fisher(ctx, fisher_generator(ctx))
    return {u.name: g for u, g in zip(ctx.weight_units, fisher)}


STREAMED: dict[str, StreamedMetric] = {
    "output_mse": StreamedMetric(lambda ctx: {}, lambda part, shared: output_mse(part)),
    "hessian_trace": StreamedMetric(_trace_shared, _trace_fill),
    "fisher_mse": StreamedMetric(_fisher_shared, lambda part, shared: fisher_cells(
        part, [shared[u.name] for u in part.weight_units])),
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
    model, index, members = _gradient_layout(ctx)
    units = ctx.weight_units
    batches = [batch.to(model.device) for batch in ctx.batches()]
    predicted = sum(batch[:, 1:].numel() for batch in batches)
    pairs = [(b, s) for b in range(len(batches)) for s in range(samples)]
    inputs = model.block_inputs(batches)
    traces = torch.zeros(len(units), dtype=torch.float64)
    steps, done = 2 * len(members) + 1, 0

    def vectors(run: _BlockFunction, block_units: list[Unit], b: int, s: int) -> dict[str, torch.Tensor]:
        return {name: rademacher(run.params[name], seed, b, s, index[u.name]) for name, u in zip(run.names, block_units)}

    # Boundary states per batch, and their derivatives along each (batch, sample)'s vectors,
    # within the model's memory share (spilled beyond it).
    states, tangents = model.boundary_states(), model.boundary_states()
    hidden = [step.hidden for step in inputs]
    tangent = [torch.zeros_like(hidden[b]) for b, _ in pairs]
    states.append(hidden)
    tangents.append(tangent)
    with sdpa_kernel(SDPBackend.MATH), states, tangents:
        for i in range(len(members)):
            with model.materialized(i) as block:
                run = _BlockFunction(block, model.block_prefix(i), members[i])
                outputs, derivatives = [], []
                for k, (b, s) in enumerate(pairs):
                    out, derivative = jvp(lambda h, p, b=b: run(h, p, inputs[b]), (hidden[b], run.params),
                                          (tangent[k], vectors(run, members[i], b, s)))
                    if s == 0:
                        outputs.append(out)
                    derivatives.append(derivative)
            hidden, tangent = outputs, derivatives
            states.append(hidden)
            tangents.append(tangent)
            done += 1
            ctx.progress(done, steps, "hessian_trace (streamed)")

        def head(hidden: torch.Tensor, b: int) -> torch.Tensor:
            with model.bypassed(hidden):
                return next_token_loss(model.module, batches[b])

        grads, grad_tangents = [], []
        for k, (b, _) in enumerate(pairs):
            g, g_tangent = jvp(grad(lambda h, b=b: head(h, b)), (hidden[b],), (tangent[k],))
            grads.append(g)
            grad_tangents.append(g_tangent)
        done += 1
        ctx.progress(done, steps, "hessian_trace (streamed)")

        for i in reversed(range(len(members))):
            with model.materialized(i) as block:
                run = _BlockFunction(block, model.block_prefix(i), members[i])
                entering, entering_tangent = states[i], tangents[i]  # read once: either may be on disk
                for k, (b, s) in enumerate(pairs):
                    def pullback(h, p, g, b=b):
                        return vjp(lambda h, p: run(h, p, inputs[b]), h, p)[1](g)

                    v = vectors(run, members[i], b, s)
                    (g_in, _), (g_in_tangent, hv) = jvp(pullback, (entering[b], run.params, grads[k]),
                                                        (entering_tangent[k], v, grad_tangents[k]))
                    share = batches[b][:, 1:].numel() / predicted
                    for name, unit in zip(run.names, members[i]):
                        traces[index[unit.name]] += share * float((v[name] * hv[name]).sum(dtype=torch.float64))
                    grads[k], grad_tangents[k] = g_in, g_in_tangent
            del states[i + 1], tangents[i + 1]
            done += 1
            ctx.progress(done, steps, "hessian_trace (streamed)")
    return (traces / samples).numpy()


def streamed_output_fisher(ctx: ProfilingContext, generator: torch.Generator) -> list[torch.Tensor]:
    """``fisher_mse.output_fisher`` of a streamed model: forward block by block keeping the
    boundary states, the sampled-label score's gradient at the head, then backward block by block
    in reverse, each block run again from its input state so that its units' output gradients
    (and the gradient handed to the block below) come from one ``autograd.grad``."""
    model, index, members = _gradient_layout(ctx)
    units = ctx.weight_units
    batches = [batch.to(model.device) for batch in fisher_batches(ctx)]
    steps = 2 * len(members) + 1
    inputs, states, grads = model.walk_to_head(
        batches, lambda _, batch: sampled_score(log_probs_of(model.module, batch, True), generator),
        done=lambda k: ctx.progress(k, steps, "output fisher (streamed)"))

    with states:  # the spill files, if any, go with them
        sums = [torch.zeros(u.shape[0], dtype=torch.float64) for u in units]
        rows = [0] * len(units)
        for i in reversed(range(len(members))):
            with model.materialized(i), _captured_outputs(ctx, members[i]) as outputs, torch.enable_grad():
                entering = states[i]  # read once: a spilled boundary comes from disk
                for b, step in enumerate(inputs):
                    hidden = entering[b].detach().requires_grad_()
                    out = step.run(model.blocks[i], hidden)
                    names = list(outputs)
                    found = torch.autograd.grad(out, [hidden] + [outputs[n] for n in names], grad_outputs=grads[b],
                                                allow_unused=True)
                    grads[b] = found[0]
                    for name, grad in zip(names, found[1:]):
                        if grad is not None:  # an output the log-likelihood does not depend on: no sensitivity
                            squares, count = channel_squares(ctx.modules[name], grad)
                            sums[index[name]] += squares
                            rows[index[name]] += count
                    outputs.clear()
            del states[i + 1]
            ctx.progress(steps - i, steps, "output fisher (streamed)")
    return [(s / max(r, 1)).float() for s, r in zip(sums, rows)]


@contextlib.contextmanager
def _captured_outputs(ctx: ProfilingContext, units: list[Unit]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of ``units`` (by name) of the forward pass that just ran, while installed."""
    outputs: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output
        return hook

    handles = [ctx.modules[u.name].register_forward_hook(capture(u.name)) for u in units]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _gradient_layout(ctx: ProfilingContext) -> tuple[StreamedModel, dict[str, int], list[list[Unit]]]:
    """What a gradient metric walks: the streamed model, each weight unit's row, each block's units."""
    if not ctx.calibration.tokens:
        raise ValueError(f"{ctx.model.spec}: gradient metrics need a language model and token windows")
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    return model, {u.name: i for i, u in enumerate(ctx.weight_units)}, _by_block(model, ctx.weight_units)


def _by_block(model: StreamedModel, units: list[Unit]) -> list[list[Unit]]:
    """Each block's units, in unit order; a unit outside every block is refused."""
    members: list[list[Unit]] = [[] for _ in model.blocks]
    for unit in units:
        index = model.block_of(unit.name)
        if index is None:
            raise ValueError(f"unit {unit.name} lies outside the decoder blocks ({model.blocks_path}); a streamed "
                             "profile measures the blocks' units only: exclude it")
        members[index].append(unit)
    return members


def streamed_fisher(ctx: ProfilingContext) -> np.ndarray:
    """``fisher`` of a streamed model: one window at a time (a window is one example), forward block
    by block keeping the boundary states, the next-token loss's gradient at the head, then backward
    in reverse, each block run again from its input state so that one ``autograd.grad`` gives its
    units' weight gradients (squared and summed over the windows) and the gradient handed below.
    A block's cells are filled while it is read, from its ``F`` and its Hessians (GPTQ's), summed
    over the calibration batches as the whole model sums them."""
    model, index, members = _gradient_layout(ctx)
    windows = [window[None].to(model.device) for window in ctx.calibration.inputs]
    steps = 2 * len(members) + 1
    inputs, states, grads = model.walk_to_head(windows, lambda _, window: next_token_loss(model.module, window),
                                               done=lambda k: ctx.progress(k, steps, "fisher (streamed)"))
    batched = model.block_inputs(ctx.batches())  # the Hessians' passes, batched as the whole model's

    with states:  # the spill files, if any, go with them
        errors = np.zeros((len(ctx.weight_units), len(ctx.formats)))
        for i in reversed(range(len(members))):
            units = members[i]
            names = {u.name for u in units}
            groups = [g for g in ctx.units.tie_groups if g[0] in names]
            with model.materialized(i) as block:
                entering = states[i]  # read once: a spilled boundary comes from disk
                weights = [ctx.modules[u.name].weight for u in units]
                squares = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
                with HessianSums(ctx.modules, units, groups) as sums, torch.no_grad():
                    for k, step in enumerate(batched):
                        step.run(block, torch.cat(entering[k * ctx.batch_size:(k + 1) * ctx.batch_size]))
                with differentiable(weights):
                    for b, step in enumerate(inputs):
                        hidden = entering[b].detach().requires_grad_()
                        found = torch.autograd.grad(step.run(block, hidden), [hidden, *weights], grad_outputs=grads[b],
                                                    allow_unused=True)
                        grads[b] = found[0]
                        for square, grad in zip(squares, found[1:]):
                            if grad is not None:
                                square += grad.float() ** 2
                diagonals = [as_matrix(ctx.modules[u.name], f / len(windows)) for u, f in zip(units, squares)]
                cells = diagonal_errors(ctx.narrowed(UnitSet(units, groups), sums.result()), diagonals)
                errors[[index[u.name] for u in units]] = cells
            del states[i + 1]
            ctx.progress(steps - i, steps, "fisher (streamed)")
    return errors


WALKED: dict[str, Callable[[ProfilingContext], np.ndarray]] = {"kl": kl, "fisher": streamed_fisher}
"""The metrics whose cells come from walks of the whole streamed model, which block-range shards
cannot split: ``kl`` scores each cell through ``quant.execution`` (one walk per cell), ``fisher``
fills each block's cells during one reverse walk."""
