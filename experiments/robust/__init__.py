"""Robustness and optimisation bias of linear models: the synthetic study."""
