"""Thin launcher: `python launch/train.py [--multihost] <omni-jax train arguments>`.

--multihost calls jax.distributed.initialize() first (TPU pod slices discover their peers from the TPU
metadata; on GPU clusters set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), then runs the same
`omni-jax train` on every host. Each host reads its own 1/process_count share of the data (train/data.py).
"""

import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--multihost" in args:
        args.remove("--multihost")
        import jax

        jax.distributed.initialize()
    from omni_jax.cli import main

    sys.exit(main(["train", *args]))
