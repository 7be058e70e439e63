"""Ray Train's torch backend, with the rendezvous address taken from the raylet instead of guessed.

Ray Train sets MASTER_ADDR to `ray.util.get_node_ip_address()`, which inside a worker process is the address
of the interface that routes to the internet, not the address the node was started with. On a cluster whose
nodes run on 127.0.0.1 (our local clusters: nothing may listen on or talk to another address) that puts the
process-group store on the LAN interface. Here rank 0 reports the NodeManagerAddress of its own node, which
is what `ray start --node-ip-address` / `ray.init(_node_ip_address=...)` set, and on a real multi-node cluster
the same routable address as before.
"""

from __future__ import annotations

import dataclasses
import socket

import ray.train.torch.config as ray_torch_config
from ray.train.torch import TorchConfig


def node_address_and_port() -> tuple[str, int]:
    """(this node's raylet address, a free TCP port on it). Runs on the rank-0 worker."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return address, s.getsockname()[1]


class _NodeAddressTorchBackend(ray_torch_config._TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        # on_start looks the function up as a module global when it runs; swap it only for this call.
        original = ray_torch_config.get_address_and_port
        ray_torch_config.get_address_and_port = node_address_and_port
        try:
            super().on_start(worker_group, backend_config)
        finally:
            ray_torch_config.get_address_and_port = original


@dataclasses.dataclass
class NodeAddressTorchConfig(TorchConfig):
    """TorchConfig whose process group rendezvous at the raylet's address (see the module docstring)."""

    @property
    def backend_cls(self):
        return _NodeAddressTorchBackend
