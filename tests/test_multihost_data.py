"""Two processes (jax.distributed on CPU) each read a disjoint half of every global batch; the assembled global
batches equal those of one process with the same seed."""
import json
import subprocess
import sys
import textwrap

import numpy as np

from data.packed import PackedPipeline
from data_helpers import mixture, write_corpus
from helpers import REPO, cli_env, free_port

B, T, STEPS = 8, 32, 6

WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, cfg_json, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    B, T, STEPS = (int(x) for x in sys.argv[5:8])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from data.config import DataConfig, SourceConfig
    from data.loader import process_rows, to_global
    from data.packed import PackedPipeline
    from parallel.mesh import MeshConfig, batch_sharding, make_mesh
    spec = json.loads(cfg_json)
    spec["sources"] = tuple(SourceConfig(**s) for s in spec["sources"])
    cfg = DataConfig(**spec)
    sharding = batch_sharding(make_mesh(MeshConfig(data=-1)))
    rows = process_rows(sharding, B)
    pipe = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=11)
    result = {"process": pid, "devices": jax.device_count(), "rows": rows.tolist(), "steps": []}
    for step in range(STEPS):
        host = pipe.train_batch(step, rows)
        assert all(len(v) == len(rows) for v in host.values())
        glob = to_global(host, sharding, B)
        full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist() for k, v in glob.items()}
        result["steps"].append(full)
    pipe.close()
    open(out, "w").write(json.dumps(result))
""")


def test_two_processes_read_disjoint_halves_and_assemble_the_same_batches(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=150)["txt"]
    cfg = mixture(tmp_path / "cache", corpus, objective="causal", prefetch=2)
    single = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=11)  # also builds the cache both processes read
    expected = [single.train_batch(s, np.arange(B)) for s in range(STEPS)]

    spec = {k: v for k, v in cfg.__dict__.items()}
    spec["sources"] = [s.__dict__ for s in cfg.sources]
    port = free_port()
    env = cli_env(devices=2)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), json.dumps(spec),
                               str(tmp_path / f"out{i}.json"), str(B), str(T), str(STEPS)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert all(r["devices"] == 4 for r in results)
    rows0, rows1 = results[0]["rows"], results[1]["rows"]
    assert len(rows0) == len(rows1) == B // 2 and not set(rows0) & set(rows1)
    assert sorted(rows0 + rows1) == list(range(B))
    for step in range(STEPS):
        for r in results:
            for k, v in expected[step].items():
                np.testing.assert_array_equal(np.asarray(r["steps"][step][k]), v, err_msg=f"step {step} {k}")
