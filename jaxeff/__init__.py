"""jaxeff: training efficiency and robustness for JAX.

Subpackages:
  losses     contrastive hinge losses with hard negatives (VSE++).
  retrieval  image-text retrieval metrics (R@K, median/mean rank, rsum).
  pergrad    per-example gradients (vmap reference) and fast Dense/Conv gradient statistics.
  gvar       gradient estimators (SGD, SVRG, samplers) and their measured variance.
  robust     norms, closed-form robustness of linear models, max-margin (cvxpy), steepest descent.
  models     flax nnx models used by the experiments.
  data       tensorflow-datasets builders, generated datasets, grain pipelines.
  train      jit-compiled train steps, sharding, checkpoints, metric logging.
"""

__version__ = "0.1.0"
