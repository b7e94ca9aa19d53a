"""Robustness and optimisation bias of linear models: the synthetic study of optimisers
and regularisers in three norms (:mod:`train`) and the linear-convolution experiment
(:mod:`linear_conv`)."""
