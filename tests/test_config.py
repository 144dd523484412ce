"""Config overrides: types, allowed values, unknown keys with suggestions, experiment loading; launch settings."""
import dataclasses

import pytest

from parallel.errors import UserError
from train.config import Config, apply_overrides, from_dict, load_experiment


def test_typed_overrides():
    cfg = apply_overrides(Config(), {"optim.lr": "3e-4", "train.steps": "1e3", "model.scan_layers": "true",
                                     "optim.name": "lamb", "mesh.fsdp": "-1", "mesh.data": "1"})
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 1000 and cfg.model.scan_layers is True
    assert cfg.optim.name == "lamb" and cfg.mesh.fsdp == -1


@pytest.mark.parametrize("key, value, match", [
    ("optim.lrr", "1", "did you mean 'optim.lr'"),
    ("optimizer.lr", "1", "did you mean 'optim.lr'"),
    ("train.steps", "ten", "expects an integer"),
    ("train.steps", "2.5", "expects an integer"),
    ("optim.lr", "fast", "expects a number"),
    ("optim.name", "adam", "'adamw', 'lamb', 'sgd'"),
    ("model.scan_layers", "maybe", "true or false"),
    ("model.n_heads", "3", "divisible"),
    ("train.batch_size", "0", "must be positive"),
])
def test_bad_overrides_name_the_key(key, value, match):
    with pytest.raises(UserError, match=match) as e:
        apply_overrides(Config(), {key: value})
    assert "\n" not in str(e.value)


def test_round_trip_through_json():
    cfg = apply_overrides(load_experiment("experiments/shakespeare_char.py"), {"optim.lr": "2e-3"})
    import json

    again = from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.name == "shakespeare_char"


def test_experiment_loading_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_experiment(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(UserError, match="get_config"):
        load_experiment(str(bad))


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0


def test_default_cpu_devices():
    from parallel.mesh import MeshConfig, default_cpu_devices

    assert default_cpu_devices(MeshConfig(), 12, cores=2) == 2
    assert default_cpu_devices(MeshConfig(), 12, cores=8) == 6  # 8 would not split 12 rows
    assert default_cpu_devices(MeshConfig(), 7, cores=4) == 1
    assert default_cpu_devices(MeshConfig(data=1, fsdp=4), 12, cores=2) == 4  # an explicit mesh gets its size
    assert default_cpu_devices(MeshConfig(data=-1, tensor=2), 12, cores=8) == 6
    # Two processes share an explicit mesh, and together must still split the batch.
    assert default_cpu_devices(MeshConfig(data=1, fsdp=4), 8, cores=2, processes=2) == 2
    assert default_cpu_devices(MeshConfig(), 6, cores=2, processes=2) == 1


@pytest.mark.parametrize("sizes", [dict(fsdp=0), dict(data=0), dict(data=-1, fsdp=-1), dict(tensor=-3),
                                   dict(cpu_devices=-1)])
def test_bad_mesh_sizes_are_user_errors(sizes):
    overrides = {f"mesh.{k}": str(v) for k, v in sizes.items()}
    with pytest.raises(UserError, match="mesh"):
        apply_overrides(Config(), overrides)


LAUNCH_ENV = ("MESHFORGE_COORDINATOR", "MESHFORGE_NUM_PROCESSES", "MESHFORGE_PROCESS_ID")


def test_launch_from_environment_variables(monkeypatch):
    """`train`'s --coordinator/--num-processes/--process-id, or MESHFORGE_COORDINATOR/NUM_PROCESSES/PROCESS_ID."""
    from parallel.mesh import Launch, resolve_launch

    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert resolve_launch(None, None, None) == Launch(None, 1, 0)  # one process
    for name, value in zip(LAUNCH_ENV, ("10.0.0.1:1234", "4", "2")):
        monkeypatch.setenv(name, value)
    assert resolve_launch(None, None, None) == Launch("10.0.0.1:1234", 4, 2)
    assert resolve_launch("host:99", 8, 0) == Launch("host:99", 8, 0)  # flags win, process 0 included
    monkeypatch.setenv("MESHFORGE_PROCESS_ID", "4")
    with pytest.raises(UserError, match=r"process-id must be in \[0, 4\), got 4"):
        resolve_launch(None, None, None)
    monkeypatch.setenv("MESHFORGE_NUM_PROCESSES", "two")
    with pytest.raises(UserError, match="MESHFORGE_NUM_PROCESSES: expects an integer, got 'two'"):
        resolve_launch(None, None, None)
    monkeypatch.delenv("MESHFORGE_NUM_PROCESSES")
    with pytest.raises(UserError, match="--coordinator needs --num-processes"):
        resolve_launch(None, None, None)
    monkeypatch.delenv("MESHFORGE_COORDINATOR")
    with pytest.raises(UserError, match="need --coordinator"):
        resolve_launch(None, None, None)  # MESHFORGE_PROCESS_ID=4 alone
