"""shakespeare_char trained by 4 DiLoCo replicas that synchronise every 50 steps, on the same tokens.

    meshforge train experiments/shakespeare_diloco.py

(RESULTS PENDING)
"""
import dataclasses

from experiments.shakespeare_char import get_config as synchronous_config
from optim.outer import OuterConfig
from parallel.mesh import MeshConfig
from train.config import Config


def get_config() -> Config:
    return dataclasses.replace(
        synchronous_config(), name="shakespeare_diloco",
        # 2 replicas on each of the 2 CPU devices: each replica's 3 rows stay on one device
        mesh=MeshConfig(replica=2, data=1),
        outer=OuterConfig(replicas=4, inner_steps=50, optimizer="nesterov", lr=0.7, momentum=0.9),
    )
