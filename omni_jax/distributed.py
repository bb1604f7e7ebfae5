"""Several processes, one job: joining a multi-process JAX run, who writes shared files, and agreeing on a stop.

    omni-jax train --coordinator 10.0.0.2:1234 --num-processes 4 --process-id 0 ...   # explicit (any cluster)
    omni-jax train ...                                                               # Cloud TPU / SLURM / Open MPI:
                                                                                     # auto-detected by JAX

`initialize` runs once, before anything touches a device. Without the explicit flags it calls
`jax.distributed.initialize()` (JAX reads the TPU metadata server, SLURM's or Open MPI's environment) only when the
environment shows such a cluster, so a plain single-process run never waits for peers. With several processes on
CPU it selects the gloo cross-process collectives first (XLA's CPU client has no other).

In a multi-process job every process runs the same program on its own devices of one global mesh; files that are
not sharded arrays (metrics, TensorBoard events, export side files, the example question) are written by the
primary process (`is_primary`), Orbax checkpoints by all processes together. `StopFlag` turns a SIGTERM received
by any one process into the same stopping step on every process (a barrier of the coordination service per step:
no device synchronisation). jax is imported inside the functions, so that the CLI's argument parser stays light.
"""

from __future__ import annotations

import argparse
import logging
import os

from omni_jax.errors import OmniJaxError

log = logging.getLogger("omni_jax.distributed")


class DistributedError(OmniJaxError):
    """Inconsistent multi-process flags, or a job whose processes cannot agree."""


def add_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of `omni-jax train / generate / plan`."""
    g = p.add_argument_group(
        "multi-process jobs", "Several processes (hosts) running one job over one global device mesh. On Cloud TPU "
        "pods, SLURM (srun) and Open MPI the flags are read from the environment by jax.distributed.initialize(); "
        "elsewhere give all three on every process (the same --coordinator, its own --process-id). See "
        "docs/TRAINING.md, 'Pods and multi-node GPU'.")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service (a free port on process 0's host)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 .. N-1")


def cluster_detected(env=None) -> str | None:
    """The cluster kind JAX can auto-detect here with more than one process, or None for a plain machine."""
    env = os.environ if env is None else env

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if env.get("OMPI_MCA_orte_hnp_uri") and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if env.get("TPU_SKIP_MDS_QUERY") is None and env.get("JAX_PLATFORMS", "") in ("", "tpu") and _tpu_vm():
        return "tpu"  # a Cloud TPU VM: JAX asks the metadata server for the slice's workers
    return None


def skip_absent_tpu(env=None) -> bool:
    """On a machine without TPU chips or a GPU, with JAX_PLATFORMS unset, use the CPU backend only: with libtpu
    installed (the `tpu` extra, for compiling TPU programs from any machine) JAX otherwise initialises libtpu on
    first use, which prints metadata-server warnings and an INVALID_ARGUMENT line on every command. Compiling for
    a TPU topology (`plan --compile`) does not need the TPU backend. Returns whether it changed the setting."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS") or _tpu_vm():
        return False
    if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return False  # a GPU machine: JAX picks its backend
    import jax

    jax.config.update("jax_platforms", "cpu")
    return True


def _tpu_vm() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001  (no PCI listing: not a TPU VM)
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, env=None) -> int:
    """Join the job (see the module docstring); returns the process count. Idempotent."""
    import jax

    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise DistributedError("--coordinator, --num-processes and --process-id go together: give all three (or "
                               "none, to let jax.distributed.initialize() read a TPU pod / SLURM environment)")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in 0..{num_processes - 1} "
                                   f"(--num-processes {num_processes})")
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"--coordinator {coordinator!r} is not HOST:PORT")
    if jax.distributed.is_initialized():
        return jax.process_count()
    if all(given):
        if num_processes == 1:
            return 1
        _use_gloo()
        log.info("joining %d-process job at %s as process %d", num_processes, coordinator, process_id)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return jax.process_count()
    kind = cluster_detected(env)
    if kind is None:
        return 1
    _use_gloo()
    log.info("%s environment: jax.distributed.initialize() reads the job from it", kind)
    jax.distributed.initialize()
    return jax.process_count()


def _use_gloo():
    """CPU devices of several processes reduce across processes only with a collectives implementation; it
    changes nothing on TPU or GPU (their collectives are their own)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    """True on the process that writes the job's shared files (process 0)."""
    import jax

    return jax.process_index() == 0


def check_same(what: str, text: str) -> None:
    """Raise DistributedError unless every process passes the same `text` (e.g. its training config): processes
    that disagree would otherwise wait for each other forever in their first differing collective."""
    import hashlib

    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    digest, key = hashlib.sha256(text.encode()).hexdigest()[:16], "omni_jax/same/" + what.replace(" ", "_")
    client.key_value_set(f"{key}/{jax.process_index()}", digest)
    client.wait_at_barrier(key, 600_000)
    got = dict(client.key_value_dir_get(key + "/"))
    groups: dict[str, list[int]] = {}
    for key, value in got.items():
        groups.setdefault(value, []).append(int(key.rsplit("/", 1)[-1]))
    if len(groups) > 1:
        parts = "; ".join(f"processes {sorted(v)}" for v in groups.values())
        raise DistributedError(f"the processes of this job were given different {what}s ({parts} agree among "
                               f"themselves): start every process with the same arguments")


class StopFlag:
    """A stop request (SIGTERM) that every process of the job sees at the same step.

    `request()` marks this process (from a signal handler); `agreed(step)` is called by every process after every
    step and returns the same answer everywhere: True iff some process requested a stop before it reached step
    `step`'s barrier. A process that is asked to stop posts `stop/<step>` to the coordination service's key-value
    store before that barrier, and all read it after: host-side messages only, the devices keep running ahead.
    With one process it is a plain flag."""

    def __init__(self):
        self.requested = False

    def request(self):
        self.requested = True

    def agreed(self, step: int) -> bool:
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax._src import distributed

        client = distributed.global_state.client
        folder = f"omni_jax/stop/{step}/"
        requested = self.requested  # read once: a SIGTERM arriving after this line counts for the next step
        if requested:
            client.key_value_set(folder + str(jax.process_index()), "stop")
        client.wait_at_barrier(f"omni_jax/step/{step}", 3_600_000)
        return requested or bool(client.key_value_dir_get(folder))
