"""Every test process sees 8 fake CPU devices; single-device tests build a mesh from jax.devices()[:1]."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_report_header(config) -> str:
    """Which end of the supported range this run tests (see .ci/run)."""
    from importlib.metadata import version
    return "stack: " + ", ".join(f"{name} {version(name)}" for name in ("jax", "flax", "optax", "orbax-checkpoint"))
