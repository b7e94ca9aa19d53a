"""Contrastive hinge losses with hard negatives (VSE0 / VSE++)."""

from jaxeff.losses.hinge import (
    COLLAPSE_SPREAD,
    hinge_costs,
    hinge_loss,
    is_collapsed,
    max_of_hinges,
    positives_from_ids,
    similarity_spread,
    sum_of_hinges,
    vse_hinge_loss,
)
from jaxeff.losses.schedules import hard_negative_schedule
from jaxeff.losses.similarity import cosine_similarity, order_similarity, similarity_matrix

__all__ = [
    "COLLAPSE_SPREAD",
    "cosine_similarity",
    "hard_negative_schedule",
    "hinge_costs",
    "hinge_loss",
    "is_collapsed",
    "max_of_hinges",
    "order_similarity",
    "positives_from_ids",
    "similarity_matrix",
    "similarity_spread",
    "sum_of_hinges",
    "vse_hinge_loss",
]
