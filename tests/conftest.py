"""Every test process sees 8 fake CPU devices; single-device tests build a mesh from jax.devices()[:1]."""
import os
import shutil
import tempfile

# One persistent compilation cache per test session, shared by the test processes and the CLI runs they start:
# they compile the same tiny programs over and over, and compiling is most of a small test's time (a cold cache
# took the CLI, data-CLI, reliability and experiment tests from 431 s to 306 s on a 2-core AMD EPYC VM).
# xdist workers inherit the controller's environment, so all of them find the directory made here.
# Unlocked (JAX's size-limited cache takes a file lock for every read: 345 s instead of 306 s there), so a
# process can read an entry another is still writing; JAX then compiles anew and warns, and that warning must not
# become a CLI run's extra stderr line.
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="meshforge-test-jax-cache-")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                          "ignore:Error reading persistent compilation cache"]))

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# No test may reach the network: HuggingFace's libraries (datasets, huggingface_hub, transformers) refuse every
# request in offline mode, and the CLI runs the tests start inherit it (meshforge only ever turns offline on).
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_report_header(config) -> str:
    """Which end of the supported range this run tests (see .ci/run)."""
    from importlib.metadata import version
    return "stack: " + ", ".join(f"{name} {version(name)}" for name in ("jax", "flax", "optax", "orbax-checkpoint"))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
