"""Who is who in a cohort: rank -> (peer, replica), and the process groups, built once.

World size = peers x replicas, ranks laid out peer-major: rank = peer * replicas + replica.
- A peer's replicas form its *peer group*: ordinary data parallelism (DDP), gradients
  averaged within the peer only. Peers are never wrapped in one DDP: that would average
  their gradients and collapse the cohort into one model.
- The peers that share a replica index form an *exchange group*: they trade detached logits
  (DML, where they also share the data shard) or weights (codistillation) over it.

    peers=2, replicas=2:   rank 0 = (peer 0, replica 0)   rank 1 = (peer 0, replica 1)
                           rank 2 = (peer 1, replica 0)   rank 3 = (peer 1, replica 1)
    peer groups: {0, 1}, {2, 3}          exchange groups: {0, 2}, {1, 3}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def peer_and_replica(rank: int, replicas: int) -> tuple[int, int]:
    return rank // replicas, rank % replicas


def rank_of(peer: int, replica: int, replicas: int) -> int:
    return peer * replicas + replica


def peer_group_ranks(peer: int, replicas: int) -> list[int]:
    return [rank_of(peer, r, replicas) for r in range(replicas)]


def exchange_group_ranks(replica: int, num_peers: int, replicas: int) -> list[int]:
    return [rank_of(p, replica, replicas) for p in range(num_peers)]


def train_shard(rank: int, num_peers: int, replicas: int, *, disjoint_peers: bool) -> tuple[int, int]:
    """(shard index, number of shards) of the training set that this rank draws batches from.

    By default peers share shards (DML needs every peer to see the same batch at the same
    step), so the set is cut by replica only. With disjoint peers (codistillation, which
    exchanges no per-batch data) every rank gets its own shard: no example is seen by two peers.
    """
    peer, replica = peer_and_replica(rank, replicas)
    if disjoint_peers:
        return rank_of(peer, replica, replicas), num_peers * replicas
    return replica, replicas


@dataclass(frozen=True)
class Topology:
    rank: int
    num_peers: int
    replicas: int
    peer_group: Any = None
    """Process group of this peer's replicas (None when the peer has one replica)."""
    exchange_group: Any = None
    """Process group of the peers sharing this replica index (None with one peer)."""

    def __post_init__(self) -> None:
        if self.num_peers < 1 or self.replicas < 1:
            raise ValueError(f"need at least one peer and one replica, got {self.num_peers} x {self.replicas}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.num_peers} peers x {self.replicas} replicas")

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
        """Global ranks of this rank's exchange group; position p holds peer p."""
        return exchange_group_ranks(self.replica, self.num_peers, self.replicas)

    @property
    def peer_root(self) -> int:
        """Global rank of replica 0 of this peer: the one whose buffers DDP treats as the peer's."""
        return rank_of(self.peer, 0, self.replicas)


def build_topology(rank: int, num_peers: int, replicas: int) -> Topology:
    """Create the groups. Every rank must call this, in the same order, since new_group is
    collective: each rank creates every group and keeps the two it belongs to."""
    if not dist.is_initialized() or num_peers * replicas == 1:
        return Topology(rank, num_peers, replicas)
    world = num_peers * replicas
    if dist.get_world_size() != world:
        raise RuntimeError(f"world size {dist.get_world_size()} != peers x replicas = {num_peers} x {replicas}")
    peer, replica = peer_and_replica(rank, replicas)
    peer_group = exchange_group = None
    if replicas > 1:
        for p in range(num_peers):
            g = dist.new_group(peer_group_ranks(p, replicas))
            if p == peer:
                peer_group = g
    if num_peers > 1:
        if replicas == 1:
            exchange_group = dist.group.WORLD
        else:
            for r in range(replicas):
                g = dist.new_group(exchange_group_ranks(r, num_peers, replicas))
                if r == replica:
                    exchange_group = g
    return Topology(rank, num_peers, replicas, peer_group, exchange_group)
