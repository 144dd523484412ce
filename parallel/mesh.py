"""Device meshes from the `mesh` config section, CPU device set-up, and multi-host start-up."""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.errors import UserError
from parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    replica: int = 1  # model replicas (outer.replicas) spread over this many device groups; 1: all on each group
    data: int = -1  # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    cpu_devices: int = 0  # CPU only: virtual devices to split the host into; 0: one per core (see below)

    def __post_init__(self):
        sizes = self.sizes()
        bad = [a for a, n in sizes.items() if n == 0 or n < -1]
        if bad:
            raise ValueError(f"mesh.{bad[0]} must be a positive size or -1 (all remaining devices), "
                             f"got {sizes[bad[0]]}")
        free = [a for a, n in sizes.items() if n == -1]
        if len(free) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in free)}")
        if self.cpu_devices < 0:
            raise ValueError(f"mesh.cpu_devices must be >= 0 (0: one per core), got {self.cpu_devices}")

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


def default_cpu_devices(cfg: MeshConfig, batch_rows: int, cores: int | None = None, processes: int = 1) -> int:
    """How many virtual CPU devices each process makes when mesh.cpu_devices is 0.

    A mesh with every size given needs exactly that many in all, shared by the processes. Otherwise one per
    core, but never more than the batch can be split over: the largest count <= cores whose total over all
    processes divides the rows of one (micro-)batch.
    """
    sizes = cfg.sizes()
    if -1 not in sizes.values():
        return max(1, math.prod(sizes.values()) // processes)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    cores = cores or os.cpu_count() or 1
    fits = [n for n in range(1, cores + 1) if (n * processes) % fixed == 0 and batch_rows % (n * processes) == 0]
    return max(fits, default=max(1, fixed // processes))


def configure_cpu_devices(n: int) -> None:
    """Split a CPU host into n virtual XLA devices before JAX starts its backends.

    One XLA CPU device barely uses a second core for small models; one device per core with the batch sharded
    over them is markedly faster. An explicit --xla_force_host_platform_device_count in XLA_FLAGS wins, and
    the setting has no effect on GPU or TPU hosts.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backends already initialised (e.g. inside a test process): keep what exists


def resolve_axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    sizes = cfg.sizes()
    free = [a for a, s in sizes.items() if s == -1]  # at most one, and no size below -1: MeshConfig checked
    fixed = math.prod(s for s in sizes.values() if s != -1)
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1)
    if free:
        if n_devices % fixed:
            raise UserError(f"mesh: {shape} needs a multiple of {fixed} devices, but {n_devices} are available; "
                            f"choose axis sizes whose product divides {n_devices}")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise UserError(f"mesh: {shape or 'all axes 1'} uses {fixed} devices, but {n_devices} are available; "
                        f"make the product of mesh sizes {n_devices} (or set one axis to -1)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    sizes = resolve_axis_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        # Multi-slice TPU: only one axis crosses the slow data-centre network between slices: the replica axis of
        # DiLoCo-style training when there is one (it communicates once a round), otherwise the data axis.
        from jax.experimental import mesh_utils

        across = "replica" if sizes["replica"] > 1 else "data"
        if sizes[across] % n_slices:
            raise UserError(f"mesh.{across} ({sizes[across]}) must be a multiple of the {n_slices} TPU slices")
        at = MESH_AXES.index(across)
        ici = tuple(n // n_slices if i == at else n for i, n in enumerate(shape))
        dcn = tuple(n_slices if i == at else 1 for i in range(len(shape)))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(batch, length) arrays: rows split over the replica axis (replica-major: replica r holds the r-th block of
    rows) and every axis the 'batch' rule names. The model's activations never name the replica axis: inside a
    replica step it is the vmapped axis (train/rounds.py)."""
    from flax.core import spmd

    from parallel.rules import RULES

    with spmd.logical_axis_rules(RULES):
        spec = spmd.get_pspec(PartitionSpec("batch", "length"))
    rows = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    if mesh.shape.get("replica", 1) > 1:
        rows = ("replica", *rows)
    return NamedSharding(mesh, PartitionSpec(rows or None, *spec[1:]))


def batch_divisor(mesh: Mesh) -> int:
    spec = batch_sharding(mesh).spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,)
    return math.prod(mesh.shape[a] for a in axes if a)


def padded_rows(mesh: Mesh, n: int) -> int:
    """n rounded up to whole rows per batch shard (the caller gives the extra rows no weight or drops them)."""
    div = batch_divisor(mesh)
    return -(-n // div) * div


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a run: alone (coordinator None) or as one of num_processes."""
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}: expects an integer, got {raw!r}") from None


def resolve_launch(coordinator: str | None, num_processes: int | None, process_id: int | None) -> Launch:
    """Flags first, then MESHFORGE_COORDINATOR / MESHFORGE_NUM_PROCESSES / MESHFORGE_PROCESS_ID."""
    coordinator = coordinator or os.environ.get("MESHFORGE_COORDINATOR") or None
    num_processes = num_processes or _env_int("MESHFORGE_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("MESHFORGE_PROCESS_ID")
    if not coordinator:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UserError("--num-processes/--process-id need --coordinator HOST:PORT (process 0's address)")
        return Launch()
    if not num_processes or process_id is None:
        raise UserError("--coordinator needs --num-processes and --process-id "
                        "(or MESHFORGE_NUM_PROCESSES / MESHFORGE_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    return Launch(coordinator, num_processes, process_id)


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM with JAX's TPU runtime installed (jax[tpu] brings libtpu)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None and os.environ.get("JAX_PLATFORMS", "") in ("", "tpu")


def maybe_initialize_distributed(launch: Launch) -> None:
    """Join a multi-process run: explicitly (a Launch with a coordinator), or on a Cloud TPU VM through JAX's own
    cluster detection, which reads the slice from the VM's metadata (and is harmless on a single host)."""
    if launch.coordinator:
        # CPU processes need a collectives backend; this touches only the CPU client.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # GKE TPU pods name their workers here
    elif on_cloud_tpu_vm():
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:  # not part of a slice JAX can see: run as one process
            print(f"meshforge: warning: jax.distributed did not start ({str(e).splitlines()[0][:160]}); "
                  "running as a single process", file=sys.stderr)
