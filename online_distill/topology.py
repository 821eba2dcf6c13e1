"""Who is who in a cohort: rank -> (peer, replica), and the process groups, built once.

World size = peers x replicas, ranks laid out peer-major: rank = peer * replicas + replica.
- A peer's replicas form its *peer group*: ordinary data parallelism (DDP), gradients
  averaged within the peer only. Peers are never wrapped in one DDP.
- The peers that share a replica index see the same data shard and form an *exchange group*:
  they trade detached logits (DML) or weights (codistillation) over it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def peer_and_replica(rank: int, replicas: int) -> tuple[int, int]:
    return rank // replicas, rank % replicas


def peer_group_ranks(peer: int, replicas: int) -> list[int]:
    return [peer * replicas + r for r in range(replicas)]


def exchange_group_ranks(replica: int, num_peers: int, replicas: int) -> list[int]:
    return [p * replicas + replica for p in range(num_peers)]


@dataclass
class Topology:
    rank: int
    num_peers: int
    replicas: int
    peer_group: object = None
    """Process group of this peer's replicas (None when the peer has one replica)."""
    exchange_group: object = None
    """Process group of the peers sharing this replica's shard (None with one peer)."""

    @property
    def peer(self) -> int:
        return peer_and_replica(self.rank, self.replicas)[0]

    @property
    def replica(self) -> int:
        return peer_and_replica(self.rank, self.replicas)[1]

    @property
    def world_size(self) -> int:
        return self.num_peers * self.replicas

    @property
    def exchange_ranks(self) -> list[int]:
        return exchange_group_ranks(self.replica, self.num_peers, self.replicas)


def build_topology(rank: int, num_peers: int, replicas: int) -> Topology:
    """Create the groups. Every rank must call this, since new_group is collective."""
    topo = Topology(rank, num_peers, replicas)
    if not dist.is_initialized() or topo.world_size == 1:
        return topo
    if dist.get_world_size() != topo.world_size:
        raise RuntimeError(f"world size {dist.get_world_size()} != peers x replicas = {topo.world_size}")
    if replicas > 1:
        for p in range(num_peers):
            g = dist.new_group(peer_group_ranks(p, replicas))
            if p == topo.peer:
                topo.peer_group = g
    if num_peers > 1:
        if replicas == 1:
            topo.exchange_group = dist.group.WORLD
        else:
            for r in range(replicas):
                g = dist.new_group(exchange_group_ranks(r, num_peers, replicas))
                if r == topo.replica:
                    topo.exchange_group = g
    return topo
