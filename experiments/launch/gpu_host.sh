#!/usr/bin/env bash
# Train and evaluate VSE++ on one machine with several GPUs (run it on that machine).
#
#   bash experiments/launch/gpu_host.sh install    # a venv with this checkout + jax[cuda12]
#   bash experiments/launch/gpu_host.sh train      # one process driving every GPU
#   bash experiments/launch/gpu_host.sh stop       # SIGTERM: checkpoint, then exit
#   bash experiments/launch/gpu_host.sh evaluate   # test numbers of the best checkpoint
#
# One process sees all the machine's GPUs and the mesh spans them: no cluster to form
# (jax.process_count() == 1), the batch is split over the GPUs and the gradient
# all-reduced between them. Several such machines form a cluster under SLURM, one task
# per GPU, found by JAX on its own:
#
#   srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 \
#     .venv/bin/python -m experiments.vsepp.main --config=$CONFIG --workdir=$WORKDIR
#
# (the workdir then on storage every node sees, e.g. NFS). Rerunning `train` after
# `stop`, a crash or a preemption resumes from the last checkpoint.
set -euo pipefail

JAX_VERSION=${JAX_VERSION:-0.10.2}           # the version the tests ran with
CONFIG=${CONFIG:-experiments/vsepp/configs/shapes.py}
WORKDIR=${WORKDIR:-$HOME/runs/vsepp_shapes}
cd "$(dirname "$0")/../.."

case "${1:-}" in
  install)
    python3.11 -m venv .venv
    . .venv/bin/activate
    pip install -U pip
    pip install -e ".[experiments]" "jax[cuda12]==$JAX_VERSION"
    python -c "import jax; print(jax.devices())"
    ;;
  train)
    . .venv/bin/activate
    mkdir -p "$WORKDIR"
    nohup python -m experiments.vsepp.main --config="$CONFIG" --workdir="$WORKDIR" \
      > "$WORKDIR.log" 2>&1 < /dev/null &
    echo $! > "$WORKDIR.pid"
    echo "training in the background: tail -f $WORKDIR.log"
    ;;
  stop)
    kill -TERM "$(cat "$WORKDIR.pid")"
    ;;
  evaluate)
    . .venv/bin/activate
    python -m experiments.vsepp.evaluate --workdir="$WORKDIR"
    ;;
  *)
    echo "usage: $0 install|train|stop|evaluate" >&2
    exit 2
    ;;
esac
