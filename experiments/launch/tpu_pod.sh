#!/usr/bin/env bash
# Train and evaluate VSE++ on a Cloud TPU v4-32 pod slice: 4 hosts x 4 chips, 16 devices.
#
#   export PROJECT=my-project            # required
#   bash experiments/launch/tpu_pod.sh create     # the TPU VMs and a Filestore NFS share
#   bash experiments/launch/tpu_pod.sh install    # this checkout + jax[tpu] on every worker
#   bash experiments/launch/tpu_pod.sh train      # the same command on every worker
#   bash experiments/launch/tpu_pod.sh logs       # follow worker 0 (process 0 logs)
#   bash experiments/launch/tpu_pod.sh stop       # SIGTERM: checkpoint, then exit
#   bash experiments/launch/tpu_pod.sh evaluate   # test numbers of the best checkpoint
#   bash experiments/launch/tpu_pod.sh delete     # release the TPU and the share
#
# Every worker runs one process; JAX finds the others on its own (Cloud TPU detection in
# jaxeff.train.distributed.initialize_distributed). The workdir must be one directory that
# every worker sees, for the checkpoints (written by all processes, orbax) and for the
# prepared dataset: here a Filestore NFS share mounted at /mnt/shared on every worker.
# Rerunning `train` after `stop`, a crash or a preemption resumes from the last checkpoint.
set -euo pipefail

: "${PROJECT:?set PROJECT to your Google Cloud project}"
ZONE=${ZONE:-us-central2-b}                  # a zone with v4 TPUs
TPU_NAME=${TPU_NAME:-jaxeff-v4-32}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
NFS_NAME=${NFS_NAME:-jaxeff-nfs}
NFS_ZONE=${NFS_ZONE:-$ZONE}                  # Filestore must share the TPU's VPC network
JAX_VERSION=${JAX_VERSION:-0.10.2}           # the version the tests ran with
CONFIG=${CONFIG:-experiments/vsepp/configs/shapes.py}
WORKDIR=${WORKDIR:-/mnt/shared/runs/vsepp_shapes}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    gcloud filestore instances create "$NFS_NAME" --project="$PROJECT" --zone="$NFS_ZONE" \
      --tier=BASIC_HDD --file-share=name=share,capacity=1TB --network=name=default
    NFS_IP=$(gcloud filestore instances describe "$NFS_NAME" --project="$PROJECT" \
      --zone="$NFS_ZONE" --format="value(networks[0].ipAddresses[0])")
    on_all_workers "sudo apt-get update -q && sudo apt-get install -y -q nfs-common && \
      sudo mkdir -p /mnt/shared && sudo mount -o rw,hard $NFS_IP:/share /mnt/shared && \
      sudo chmod a+rwx /mnt/shared"
    ;;
  install)
    tar --exclude=.venv --exclude=.git --exclude='__pycache__' -czf /tmp/jaxeff.tgz -C "$REPO" .
    gcloud compute tpus tpu-vm scp /tmp/jaxeff.tgz "$TPU_NAME":jaxeff.tgz \
      --project="$PROJECT" --zone="$ZONE" --worker=all
    on_all_workers "set -e; sudo apt-get install -y -q python3.11 python3.11-venv; \
      rm -rf ~/jaxeff && mkdir ~/jaxeff && tar xzf ~/jaxeff.tgz -C ~/jaxeff && cd ~/jaxeff && \
      python3.11 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
      pip install -q -e '.[experiments]' 'jax[tpu]==$JAX_VERSION' && \
      python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
    ;;
  train)
    # In the background, so that a dropped ssh connection does not stop the run.
    on_all_workers "cd ~/jaxeff && . .venv/bin/activate && mkdir -p $WORKDIR && \
      nohup python -m experiments.vsepp.main --config=$CONFIG --workdir=$WORKDIR \
      > ~/vsepp.log 2>&1 < /dev/null & echo \$! > ~/vsepp.pid"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --worker=0 --command="tail -f ~/vsepp.log"
    ;;
  stop)
    on_all_workers "kill -TERM \$(cat ~/vsepp.pid)"
    ;;
  evaluate)
    on_all_workers "cd ~/jaxeff && . .venv/bin/activate && \
      python -m experiments.vsepp.evaluate --workdir=$WORKDIR"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
    gcloud filestore instances delete "$NFS_NAME" --project="$PROJECT" --zone="$NFS_ZONE" --quiet
    ;;
  *)
    echo "usage: $0 create|install|train|logs|stop|evaluate|delete" >&2
    exit 2
    ;;
esac
