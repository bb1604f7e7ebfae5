#!/usr/bin/env bash
# GPU training, one host or several.
#   launch/gpu_host.sh WORKDIR [omni-jax train arguments ...]                  one host, all its GPUs
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-task=8 launch/gpu_host.sh /shared/run --config ...
#                                                                             SLURM: one process per node
#   launch/gpu_host.sh WORKDIR --coordinator HOST0:1234 --num-processes N --process-id I ...
#                                                                             any other cluster, on every host
# Under srun, jax.distributed.initialize() reads the job (coordinator = first node, process id = SLURM_PROCID)
# from SLURM's environment; WORKDIR must be shared by all nodes (NFS, gs://...). See launch/slurm_gpu.sbatch and
# docs/TRAINING.md, "Pods and multi-node GPU".
set -euo pipefail
if [ $# -lt 1 ]; then sed -n 2,10p "$0"; exit 2; fi
WORKDIR=$1
shift
exec omni-jax train --workdir "$WORKDIR" "$@"
