#!/usr/bin/env bash
# One training job on every worker of a Cloud TPU VM slice (e.g. v5p-64: 8 workers x 4 chips = 32 chips):
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/run [omni-jax train arguments ...]
# 1. copies this checkout (git HEAD, or the folder if it is not a git checkout) to ~/omni_jax on every worker and
#    installs it with jax[tpu] (JAX_TPU, default jax[tpu]==0.10.2) and gcsfs (gs:// paths);
# 2. starts `omni-jax train --workdir gs://BUCKET/run ARGS` on all workers at once (arguments quoted as given).
# Each worker's jax.distributed.initialize() finds its peers from the TPU metadata; the default mesh is FSDP over
# all chips. Preemption (SIGTERM) saves one agreed step on every worker; rerun the same command to resume.
# SKIP_INSTALL=1 skips step 1. See docs/TRAINING.md, "Pods and multi-node GPU".
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,9p "$0"; exit 2; fi
TPU=$1 ZONE=$2 WORKDIR=$3
shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  TAR=$(mktemp -d)/omni_jax.tar.gz
  if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    git -C "$REPO" archive --format=tar.gz -o "$TAR" HEAD
  else
    tar -czf "$TAR" -C "$REPO" --exclude=.git .
  fi
  gcloud compute tpus tpu-vm scp "$TAR" "$TPU":omni_jax.tar.gz --zone "$ZONE" --worker=all
  ssh_all "rm -rf ~/omni_jax && mkdir -p ~/omni_jax && tar -xzf ~/omni_jax.tar.gz -C ~/omni_jax && \
python3 -m pip install -q -e ~/omni_jax $(printf '%q' "${JAX_TPU:-jax[tpu]==0.10.2}") gcsfs"
fi
ARGS=$(printf '%q ' --workdir "$WORKDIR" "$@")
ssh_all "cd ~/omni_jax && PATH=\$HOME/.local/bin:\$PATH omni-jax train $ARGS"
