"""The loss family: every divergence by name, its mode number, its parameter and how it is formed.

A row's loss is always ``w_head * FKL + w_tail * RKL + D``:

- the KL losses ("akl", "fkl", "rkl") set the weights (gap-weighted for AKL, fixed for FKL and
  RKL) and have no D; FKL and RKL are summed in the backends' first pass over a row;
- the other divergences set both weights to 0 and are a sum of per-element terms
  ``D = sum_j l_j(p_j, q_j)``, summed in a second pass once p and q are normalised. Their
  gradient has one form: with ``h_j = q_j * dD/dq_j`` and ``H = sum_j h_j``,
  ``dD/ds_j = (h_j - q_j H) / T`` (the softmax's Jacobian). Several use a mixture
  ``M = w_p p + w_q q`` whose weights come from their parameter.

Adding a divergence: a :class:`Divergence` row in DIVERGENCES (name, parameter, domain, mixture),
a LossMode number, its terms l_j and h_j in ``_rows.TERMS`` and in
``triton_backend._divergence_terms``, and its definition in ``reference/``. The public API, the
validation, the dispatch, the hidden-state form, the tests, the benchmarks and the example read
this table. docs/semantics.md section 2 states each definition.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple, Optional

from ._validation import check_number


class LossMode(enum.IntEnum):
    """The mode number every backend dispatches on (a compile-time constant of the kernels)."""

    AKL = 0
    FKL = 1
    RKL = 2
    JSD = 3
    TVD = 4
    SKL = 5
    SRKL = 6


class Divergence(NamedTuple):
    """One loss of the family.

    name: the ``loss=`` string. mode: its LossMode. summary: one line for the docs.
    kl_weights: (w_head, w_tail) applied to FKL and RKL; None for AKL's gap weights.
    parameter: the name of its keyword argument ("beta", "alpha") or None; default: its value
        when not given; domain: the interval as text; admits: whether a value lies in it;
        outside: the extra sentence of the error for a value outside it.
    mixture: parameter -> (w_p, w_q), the weights of M = w_p p + w_q q, or None.
    """

    name: str
    mode: LossMode
    summary: str
    kl_weights: Optional[tuple[float, float]]
    parameter: Optional[str] = None
    default: Optional[float] = None
    domain: str = ""
    admits: Callable[[float], bool] = lambda value: True
    outside: str = ""
    mixture: Optional[Callable[[float], tuple[float, float]]] = None

    @property
    def has_terms(self) -> bool:
        """Whether the loss is a sum of per-element terms (second pass), not weighted FKL/RKL."""
        return self.kl_weights == (0.0, 0.0)


def _open_unit(value):
    return 0.0 < value < 1.0


def _half_open_unit(value):
    return 0.0 < value <= 1.0


_NO_KL = (0.0, 0.0)

DIVERGENCES = {
    d.name: d
    for d in (
        Divergence("akl", LossMode.AKL, "Adaptive KL: w_head FKL + w_tail RKL, weights from the student's gaps on the teacher's head and tail at mu", None),
        Divergence("fkl", LossMode.FKL, "forward KL, KL(p || q)", (1.0, 0.0)),
        Divergence("rkl", LossMode.RKL, "reverse KL, KL(q || p)", (0.0, 1.0)),
        Divergence(
            "jsd", LossMode.JSD, "generalised Jensen-Shannon: beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q",
            _NO_KL, "beta", 0.5, "in (0, 1)", _open_unit,
            "at beta = 0 or 1 the divergence is 0 for every input; for KL(p || q) use loss='fkl', for KL(q || p) loss='rkl'",
            lambda beta: (beta, 1.0 - beta),
        ),
        Divergence("tvd", LossMode.TVD, "total variation distance, 0.5 sum |p - q|", _NO_KL),
        Divergence(
            "skl", LossMode.SKL, "skew KL (DistiLLM): KL(p || alpha p + (1 - alpha) q)",
            _NO_KL, "alpha", 0.1, "in (0, 1]", _half_open_unit,
            "at alpha = 0 skew KL is KL(p || q): use loss='fkl'",
            lambda alpha: (alpha, 1.0 - alpha),
        ),
        Divergence(
            "srkl", LossMode.SRKL, "skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q)",
            _NO_KL, "alpha", 0.1, "in (0, 1]", _half_open_unit,
            "at alpha = 0 skew reverse KL is KL(q || p): use loss='rkl'",
            lambda alpha: (1.0 - alpha, alpha),
        ),
    )
}

BY_MODE = {d.mode: d for d in DIVERGENCES.values()}
# The parameters some divergence takes, in the order the public functions list them.
PARAMETERS = ("beta", "alpha")


def divergence(name) -> Divergence:
    """The Divergence called `name`; ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in DIVERGENCES:
        raise ValueError(f"loss must be one of {tuple(DIVERGENCES)}, got {name!r}")
    return DIVERGENCES[name]


def resolve_parameter(loss: Divergence, **given) -> float:
    """The value of loss's parameter from the keyword arguments `given` (each None when not
    passed): its default when not given, 0.0 for a loss without one.

    TypeError for a tensor, ValueError for a value outside the domain (with the sentence that
    says what to use instead) and for a parameter that this loss does not take.
    """
    for name, value in given.items():
        if value is not None and name != loss.parameter:
            takers = [d.name for d in DIVERGENCES.values() if d.parameter == name]
            raise ValueError(f"{name} is a parameter of loss={' / '.join(map(repr, takers))}, not of loss={loss.name!r}")
    if loss.parameter is None:
        return 0.0
    value = given.get(loss.parameter)
    if value is None:
        return loss.default
    check_number(loss.parameter, value, loss.domain, loss.admits, loss.outside)
    return float(value)
