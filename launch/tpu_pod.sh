#!/usr/bin/env bash
# Run one training command on every worker of a TPU pod slice (preemptible VMs resume from the latest checkpoint:
# SIGTERM saves one before exit). Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/workdir --config configs/toy.py [--config.key=value ...]
set -euo pipefail
TPU=$1 ZONE=$2 WORKDIR=$3
shift 3
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/omni_jax && python launch/train.py --multihost --workdir $WORKDIR $*"
