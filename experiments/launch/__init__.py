"""Starting an experiment on many processes.

* ``local.py`` -- ``python -m experiments.launch.local --num_processes N -- COMMAND``: N
  processes of one cluster on this machine (CPU devices over gloo with ``--cpu_devices``),
  the rehearsal of a pod that the tests run;
* ``cluster_flags.py`` -- the ``--coordinator_address``/``--num_processes``/``--process_id``
  flags of the entry points, and ``initialize()`` that joins the cluster;
* ``tpu_pod.sh`` -- a Cloud TPU v4-32 pod slice: create, install, train, stop, evaluate,
  delete;
* ``gpu_host.sh`` -- one machine with several GPUs (and the SLURM command for several).
"""
