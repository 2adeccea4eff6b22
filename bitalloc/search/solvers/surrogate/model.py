"""A model of measured KL that goes past the profile's sum: scales per format and per kind,
plus pairwise terms between units that interact.

For an allocation ``a`` with profile cells ``e_u = error[u, a_u]`` the prediction is

    c + sum_u e_u * (alpha[a_u] + beta[kind(u)]) + sum_(u,v) gamma[class(u,v)] * sqrt(e_u * e_v)

``sqrt(e_u e_v)`` is the size of the cross term ``dW_u^T H_uv dW_v`` of two rounding errors
whose own terms are ``e_u`` and ``e_v`` (CLADO's pairwise terms); its weight per class of pair
is what interaction the data shows. The profile ranks well but its level is off (the model's KL
is 0.59x the sum for uniform allocations and 1.31x at the sum's own optimum,
``bench/additivity.py``), which the scales absorb.

Every weight is kept non-negative, so more rounding error never predicts less KL. An exact
solver minimises whatever the model says: with free signs (ridge regression, tried first on
SmolLM2-135M at 4.5 bits) it found allocations the fit called negative KL that measured 1.5 and
11.6 against a start of 0.20, and the held-out Spearman was 0.55 against the plain sum's 0.87.
The weights are shrunk toward the scaled sum (``alpha`` at the least-squares scale of the sum,
the rest at 0) by a penalty chosen by k-fold cross-validation, so with few measured allocations
the model stays near the sum. Errors count relative to the measured value
(``relative_weights``): KL spans orders of magnitude, and the allocations that matter have the
least.

Other proxies of the same cells (``proxies``: HAWQ-V3's Hessian traces, say) add a scale per
format on their own cells, ``sum_u p_u * delta[a_u]``, shrunk toward 0: where another proxy ranks
some units better than the profile's own metric, the fit finds the mix of the two that measured
KL follows.

Every term is a function of one unit's format or of two units' formats, so the fitted model is
a table per unit and per pair (``cells``), which ``surrogate.exact`` minimises exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls
from scipy.stats import spearmanr
from sklearn.model_selection import KFold

from bitalloc.search.solvers.surrogate.layout import Layout

PENALTIES = tuple(np.logspace(-4, 2, 7))  # per measured allocation, on weights in units of their feature's size


@dataclass(frozen=True)
class Cells:
    """The fitted model as tables: ``linear[u, f]`` per unit, ``pair[p][f, g]`` per pair of
    ``pairs`` (unit ``pairs[p, 0]`` in ``f``, ``pairs[p, 1]`` in ``g``), plus a constant."""

    constant: float
    linear: np.ndarray
    pairs: np.ndarray
    pair: np.ndarray

    def value(self, choice: np.ndarray) -> float:
        """The model's prediction for one per-unit choice, from the tables."""
        choice = np.asarray(choice)
        rows = np.arange(len(choice))
        cross = self.pair[np.arange(len(self.pairs)), choice[self.pairs[:, 0]], choice[self.pairs[:, 1]]].sum()
        return float(self.constant + self.linear[rows, choice].sum() + cross)


class InteractionModel:
    """The model above over a problem's ``error`` table and a ``Layout``; ``fit`` then ``predict``."""

    def __init__(self, error: np.ndarray, layout: Layout, penalties: tuple[float, ...] = PENALTIES,
                 proxies: Sequence[np.ndarray] = ()) -> None:
        self.error = np.asarray(error, dtype=np.float64)
        self.layout = layout
        self.penalties = penalties
        self.proxies = [np.asarray(p, dtype=np.float64) for p in proxies]
        if any(p.shape != self.error.shape for p in self.proxies):
            raise ValueError(f"proxies must have the error table's shape {self.error.shape}")
        self.coef = np.zeros(self.n_features)
        self.intercept, self.scale, self.penalty = 0.0, 1.0, 0.0

    @property
    def n_features(self) -> int:
        n_formats = self.error.shape[1]
        return n_formats * (1 + len(self.proxies)) + len(self.layout.kind_names) + len(self.layout.class_names)

    def features(self, choices: np.ndarray) -> np.ndarray:
        """The features [N, D] of each row of ``choices`` [N, U]: each format's and each kind's
        sum of cells, each class of pair's sum of ``sqrt(e_u e_v)``, then each proxy's sum of
        cells per format."""
        choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        n, units = choices.shape
        n_formats, layout = self.error.shape[1], self.layout
        cells = self.error[np.arange(units), choices]  # [N, U]
        by_format = np.zeros((n, n_formats))
        np.add.at(by_format, (np.repeat(np.arange(n), units), choices.ravel()), cells.ravel())
        by_kind = np.zeros((n, len(layout.kind_names)))
        np.add.at(by_kind, (slice(None), layout.kinds), cells)
        by_class = np.zeros((n, len(layout.class_names)))
        if len(layout.pairs):
            cross = np.sqrt(cells[:, layout.pairs[:, 0]] * cells[:, layout.pairs[:, 1]])
            np.add.at(by_class, (slice(None), layout.pair_class), cross)
        by_proxy = []
        for proxy in self.proxies:
            sums = np.zeros((n, n_formats))
            np.add.at(sums, (np.repeat(np.arange(n), units), choices.ravel()), proxy[np.arange(units), choices].ravel())
            by_proxy.append(sums)
        return np.hstack([by_format, by_kind, by_class, *by_proxy])

    def fit(self, choices: np.ndarray, measured: np.ndarray) -> InteractionModel:
        """Fit to measured values (one per row of ``choices``); at least two rows."""
        measured = np.asarray(measured, dtype=np.float64)
        x = self.features(choices)
        if len(measured) != len(x) or len(measured) < 2:
            raise ValueError(f"fit needs one measured value per allocation and at least two, got {len(measured)}")
        weight = relative_weights(measured)
        total = x[:, :self.error.shape[1]].sum(axis=1)
        design = np.column_stack([np.ones_like(total), total]) * np.sqrt(weight)[:, None]
        (_, scale), *_ = np.linalg.lstsq(design, measured * np.sqrt(weight), rcond=None)
        self.scale = max(float(scale), 0.0)
        prior = np.zeros(self.n_features)
        prior[:self.error.shape[1]] = self.scale
        folds = min(5, len(measured) // 2)
        if folds >= 2 and len(self.penalties) > 1:
            self.penalty = min(self.penalties, key=lambda p: _cv_error(x, measured, weight, prior, p, folds))
        else:
            self.penalty = self.penalties[-1]
        self.coef, self.intercept = _penalised_nnls(x, measured, weight, prior, self.penalty)
        return self

    def predict(self, choices: np.ndarray) -> np.ndarray:
        return self.intercept + self.features(choices) @ self.coef

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """The weights as (per format, per kind, per class of pair, per proxy and format)."""
        n_formats, n_kinds, n_classes = self.error.shape[1], len(self.layout.kind_names), len(self.layout.class_names)
        alpha, beta, gamma, rest = np.split(self.coef, np.cumsum([n_formats, n_kinds, n_classes]))
        return alpha, beta, gamma, np.split(rest, len(self.proxies)) if self.proxies else []

    def weights(self) -> dict[str, dict]:
        """The fitted weights by name: per format, kind and class of pair, and per proxy and format."""
        alpha, beta, gamma, deltas = self._split()
        return {"format": dict(enumerate(alpha.tolist())), "kind": dict(zip(self.layout.kind_names, beta.tolist())),
                "pair": dict(zip(self.layout.class_names, gamma.tolist())),
                "proxies": [dict(enumerate(delta.tolist())) for delta in deltas]}

    def cells(self) -> Cells:
        """The fitted model as per-unit and per-pair tables (see :class:`Cells`)."""
        alpha, beta, gamma, deltas = self._split()
        layout, error = self.layout, self.error
        n_formats = error.shape[1]
        linear = error * (alpha[None, :] + beta[layout.kinds][:, None])
        for proxy, delta in zip(self.proxies, deltas):
            linear = linear + proxy * delta[None, :]
        root = np.sqrt(error)
        pair = gamma[layout.pair_class][:, None, None] * root[layout.pairs[:, 0]][:, :, None] * root[layout.pairs[:, 1]][:, None, :]
        return Cells(constant=self.intercept, linear=linear, pairs=layout.pairs,
                     pair=pair.reshape(len(layout.pairs), n_formats, n_formats))


def _penalised_nnls(x: np.ndarray, y: np.ndarray, weight: np.ndarray, prior: np.ndarray,
                    penalty: float) -> tuple[np.ndarray, float]:
    """Non-negative weights and a free intercept minimising the weighted squared error plus
    ``penalty * n`` times the squared distance from ``prior``, each weight measured in units of
    its feature's root mean square (so the penalty treats large and small features alike)."""
    norm = np.sqrt((x**2).mean(axis=0))
    norm[norm == 0] = 1.0
    root = np.sqrt(weight)[:, None]
    data = np.hstack([x / norm, np.ones((len(y), 1)), -np.ones((len(y), 1))]) * root
    shrink = np.sqrt(penalty * len(y)) * np.hstack([np.eye(x.shape[1]), np.zeros((x.shape[1], 2))])
    solution, _ = nnls(np.vstack([data, shrink]), np.concatenate([y * root[:, 0], np.sqrt(penalty * len(y)) * prior * norm]),
                       maxiter=50 * x.shape[1])
    return solution[:-2] / norm, float(solution[-2] - solution[-1])


def _cv_error(x: np.ndarray, y: np.ndarray, weight: np.ndarray, prior: np.ndarray, penalty: float, folds: int) -> float:
    error = 0.0
    for train, test in KFold(folds, shuffle=True, random_state=0).split(x):
        coef, intercept = _penalised_nnls(x[train], y[train], weight[train], prior, penalty)
        error += float((weight[test] * (intercept + x[test] @ coef - y[test]) ** 2).sum())
    return error


def relative_weights(measured: np.ndarray) -> np.ndarray:
    """Least-squares weights that make the fit's errors relative (``1 / y**2``) when every value is
    positive, as KL is: measured KL spans orders of magnitude, and the allocations that matter
    are the ones with the least. Otherwise equal weights."""
    if (measured <= 0).any():
        return np.ones_like(measured)
    weight = measured ** -2.0
    return weight / weight.mean()


def held_out(error: np.ndarray, layout: Layout, choices: np.ndarray, measured: np.ndarray, folds: int = 5,
             seed: int = 0, proxies: Sequence[np.ndarray] = ()) -> dict[str, float]:
    """How well the model predicts allocations it was not fitted on: k-fold out-of-fold
    predictions against the measurements (mean absolute error relative to the mean measured
    value, Spearman), beside the Spearman of the profile's plain sum."""
    choices, measured = np.asarray(choices), np.asarray(measured, dtype=np.float64)
    n = len(measured)
    folds = min(folds, n // 2)
    if folds < 2:
        return {}
    predicted = np.empty(n)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(choices):
        model = InteractionModel(error, layout, proxies=proxies)
        predicted[test] = model.fit(choices[train], measured[train]).predict(choices[test])
    additive = error[np.arange(choices.shape[1]), choices].sum(axis=1)
    return {"configurations": n, "folds": folds,
            "relative_error": float(np.abs(predicted - measured).mean() / np.abs(measured).mean()),
            "spearman": _spearman(predicted, measured), "additive_spearman": _spearman(additive, measured)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
