"""The privacy budget ε of DP-SGD, from dp-accounting's RDP and PLD accountants.

DP-SGD with Poisson sampling at rate ``q``, Gaussian noise of standard deviation ``σ``
times the sensitivity, and ``T`` steps is the ``T``-fold composition of the subsampled
Gaussian mechanism (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
https://arxiv.org/abs/1607.00133). Its ``(ε, δ)`` under add/remove-one adjacency comes
from dp-accounting: the Rényi accountant (Mironov, "Rényi Differential Privacy", 2017) or
the tighter privacy-loss-distribution accountant (Koskela et al. 2020; Doroshenko et al.
2022). Nothing is re-derived here; this is the event that describes the training run.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

from jaxeff._checks import check_number
from jaxeff._extras import require

if TYPE_CHECKING:
    import dp_accounting
else:
    dp_accounting = require("dp_accounting", extra="privacy", feature="jaxeff.privacy")

__all__ = ["ACCOUNTANTS", "dpsgd_event", "dpsgd_epsilon"]

ACCOUNTANTS = ("pld", "rdp")


def dpsgd_event(
    *, noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
    """The ``dp_accounting.DpEvent`` of ``steps`` Poisson-sampled Gaussian steps.

    Args:
      noise_multiplier: ``σ > 0``: the noise's standard deviation over the sensitivity.
      sampling_rate: ``q ∈ (0, 1]``: each example's probability of being in a batch.
      steps: ``T ≥ 0`` steps taken.
    """
    sigma = float(check_number(noise_multiplier, "noise_multiplier", above=0.0, static=True))
    q = float(check_number(sampling_rate, "sampling_rate", above=0.0, at_most=1.0, static=True))
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative int, got {steps!r}.")
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def dpsgd_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """``ε`` of DP-SGD after ``steps`` steps, at ``δ``, under add/remove-one adjacency.

    .. math::

      \\varepsilon(\\delta) \\text{ of }
      \\big(\\mathcal{S}_q \\circ \\mathcal{N}(0, \\sigma^2)\\big)^{\\otimes T}

    (:func:`dpsgd_event`), computed by dp-accounting's ``PLDAccountant`` (default; the
    tighter) or ``RdpAccountant``. For the noise that reaches a target ``ε``, see
    ``dp_accounting.calibrate_dp_mechanism`` with :func:`dpsgd_event`.

    Args:
      noise_multiplier, sampling_rate, steps: as :func:`dpsgd_event`.
      delta: ``δ ∈ (0, 1)``.
      accountant: ``"pld"`` or ``"rdp"``.

    Returns:
      ``ε`` (``0`` for no steps; ``inf`` where the accountant finds no finite bound).

    Example::

      dpsgd_epsilon(noise_multiplier=1.1, sampling_rate=256 / 60_000, steps=10_000,
                    delta=1e-5)
    """
    event = dpsgd_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    delta = float(check_number(delta, "delta", above=0.0, below=1.0, static=True))
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if steps == 0:
        return 0.0
    acc = (
        dp_accounting.pld.PLDAccountant()
        if accountant == "pld"
        else dp_accounting.rdp.RdpAccountant()
    )
    return float(acc.compose(event).get_epsilon(delta))
