#!/usr/bin/env bash
# One GPU host: launch/gpu_host.sh WORKDIR --config configs/toy.py [--config.key=value ...]
set -euo pipefail
WORKDIR=$1
shift
exec python "$(dirname "$0")/train.py" --workdir "$WORKDIR" "$@"
