"""Robustness and optimisation bias of linear models.

Lp and Fourier-domain norms with their duals and projections, exact closed-form robustness
of linear classifiers (worst-case perturbations, robust margins, robust-accuracy curves,
certified radii), max-margin classifiers in any norm (cvxpy), steepest descent in a
norm as optax transformations, and the logistic loss regularised by a norm along a path
of vanishing penalties.

``p`` is always the norm of the perturbation (``1, 2, jnp.inf, "fourier_inf", ...``);
``norm`` is the norm on the weights (:func:`max_margin`) or the geometry of the step
(:func:`steepest_descent`). A classifier robust to ``p`` perturbations is the max-margin
one in ``norm = dual_exponent(p)``.

Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", https://arxiv.org/abs/2102.08868.
"""

import importlib
from typing import TYPE_CHECKING

from jaxeff.robust.attacks import ATTACK_LOSSES, AttackResult, pgd_attack
from jaxeff.robust.fourier import dft, idft
from jaxeff.robust.linear import (
    certified_radius,
    max_eps_at_accuracy,
    normalized_margin,
    robust_accuracy,
    robust_margin,
    worst_case_perturbation,
)
from jaxeff.robust.norms import (
    FOURIER_NORMS,
    dual_exponent,
    dual_norm,
    maximizing_direction,
    norm,
)
from jaxeff.robust.projections import project
from jaxeff.robust.regularization import regularization_path
from jaxeff.robust.steepest_descent import scale_by_steepest_descent, steepest_descent

if TYPE_CHECKING:
    from jaxeff.robust.max_margin import MaxMarginSolution, max_margin

__all__ = [
    "ATTACK_LOSSES",
    "AttackResult",
    "pgd_attack",
    "FOURIER_NORMS",
    "MaxMarginSolution",
    "certified_radius",
    "dft",
    "dual_exponent",
    "dual_norm",
    "idft",
    "max_eps_at_accuracy",
    "max_margin",
    "maximizing_direction",
    "norm",
    "normalized_margin",
    "project",
    "regularization_path",
    "robust_accuracy",
    "robust_margin",
    "scale_by_steepest_descent",
    "steepest_descent",
    "worst_case_perturbation",
]


def __getattr__(name: str):
    """The cvxpy-backed names, imported on first use (cvxpy is the ``[robust]`` extra)."""
    if name in ("MaxMarginSolution", "max_margin"):
        module = importlib.import_module("jaxeff.robust.max_margin")
        # Importing the submodule bound its name here; the function takes it back.
        globals().update(MaxMarginSolution=module.MaxMarginSolution, max_margin=module.max_margin)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
