r"""Why GC gains few steps and loses seconds: its refresh schedule, and draws with replacement.

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/diagnostics.py \
        --config.refresh_every=25 --workdir=/tmp/sampling_speed_fresh

The duplicated regimes of ``default.py`` at the learning rate tuned there for uniform and
GC (0.4), five seeds, with ``uniform_iid`` (independent uniform draws, with replacement as
GC's draws within a cluster) beside uniform's seeded epochs and GC. Rerun with
``--config.refresh_every`` 25 (clusters at most 25 steps stale, four times the passes),
100 (the study's) and 500 (a fifth of them) to separate staleness from overhead;
``--config.gc.replace=True`` draws independently within the clusters; and
``--config.gc.allocation=proportional --config.learning_rates='(0.4,0.8)'
--config.samplers='("uniform","gc")'`` gives each cluster slots in proportion to its size
(weights near ``1/b``, so GC can take the larger step).
"""

from experiments.sampling_speed.configs import default


def get_config():
    config = default.get_config()
    config.regimes = default.regimes("duplicates", "duplicates_heavy")
    config.samplers = ("uniform", "uniform_iid", "gc")
    config.learning_rates = (0.4,)
    return config
