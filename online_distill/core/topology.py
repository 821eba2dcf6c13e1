"""Who is who in a cohort: rank -> (the peers it holds, replica), and the process groups, built once.

A worker holds `peers_per_worker` consecutive peers (a *slot*); world size = slots x replicas,
with slots = peers / peers_per_worker, and ranks laid out slot-major: rank = slot * replicas + replica.
- A slot's replicas form its *slot group*: ordinary data parallelism (DDP per peer), gradients
  averaged within each peer only. Peers are never wrapped in one DDP: that would average
  their gradients and collapse the cohort into one model.
- The slots that share a replica index form an *exchange group*: they trade detached logits
  (DML, where they also share the data shard) or weights (codistillation) over it. Peers in the
  same worker read each other's logits from memory; only other workers' peers come over the group.

    peers=2, replicas=2, peers_per_worker=1:
                           rank 0 = (peer 0, replica 0)   rank 1 = (peer 0, replica 1)
                           rank 2 = (peer 1, replica 0)   rank 3 = (peer 1, replica 1)
    slot groups: {0, 1}, {2, 3}          exchange groups: {0, 2}, {1, 3}
    peers=4, replicas=1, peers_per_worker=2:
                           rank 0 = (peers 0, 1)          rank 1 = (peers 2, 3)
    exchange group: {0, 1}; peers 0 and 1 trade logits in memory, with 2 and 3 over the group

A cohort's `Layout` (world size, training shards, what each worker asks for) is worked out in
one place, `layout_of(cfg)`: the driver's preflight plan holds it, the launch sizes the worker
group by it, and every worker builds its Topology from the one it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from ..config.schema import Config


def slot_and_replica(rank: int, replicas: int) -> tuple[int, int]:
    return rank // replicas, rank % replicas


def rank_of(slot: int, replica: int, replicas: int) -> int:
    return slot * replicas + replica


def slot_group_ranks(slot: int, replicas: int) -> list[int]:
    return [rank_of(slot, r, replicas) for r in range(replicas)]


def exchange_group_ranks(replica: int, num_slots: int, replicas: int) -> list[int]:
    return [rank_of(s, replica, replicas) for s in range(num_slots)]


def world_size(num_peers: int, replicas: int, peers_per_worker: int = 1) -> int:
    return num_peers // peers_per_worker * replicas


def train_shard(rank: int, num_peers: int, replicas: int, *, disjoint_peers: bool,
                peers_per_worker: int = 1) -> tuple[int, int]:
    """(shard index, number of shards) of the training set that this rank draws batches from.

    By default peers share shards (DML needs every peer to see the same batch at the same
    step), so the set is cut by replica only. With disjoint peers (codistillation, which
    exchanges no per-batch data) every worker gets its own shard: no example is seen by two
    workers (a worker's packed peers share its shard: they see one batch per step).
    """
    slot, replica = slot_and_replica(rank, replicas)
    if disjoint_peers:
        return rank_of(slot, replica, replicas), world_size(num_peers, replicas, peers_per_worker)
    return replica, replicas


@dataclass(frozen=True)
class Topology:
    rank: int
    num_peers: int
    replicas: int
    peers_per_worker: int = 1
    slot_group: Any = None
    """Process group of this slot's replicas (None when peers have one replica)."""
    exchange_group: Any = None
    """Process group of the workers sharing this replica index (None when one worker holds all peers)."""

    def __post_init__(self) -> None:
        if self.num_peers < 1 or self.replicas < 1 or self.peers_per_worker < 1:
            raise ValueError(f"need at least one peer, replica and peer per worker, got {self.num_peers} x "
                             f"{self.replicas} ({self.peers_per_worker} per worker)")
        if self.num_peers % self.peers_per_worker:
            raise ValueError(f"{self.peers_per_worker} peers per worker do not divide {self.num_peers} peers")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size} workers")

    @property
    def num_slots(self) -> int:
        return self.num_peers // self.peers_per_worker

    @property
    def slot(self) -> int:
        return slot_and_replica(self.rank, self.replicas)[0]

    @property
    def replica(self) -> int:
        return slot_and_replica(self.rank, self.replicas)[1]

    @property
    def peers(self) -> list[int]:
        """The peers this worker trains, in order."""
        first = self.slot * self.peers_per_worker
        return list(range(first, first + self.peers_per_worker))

    @property
    def world_size(self) -> int:
        return world_size(self.num_peers, self.replicas, self.peers_per_worker)

    @property
    def exchange_ranks(self) -> list[int]:
        """Global ranks of this rank's exchange group; position s holds slot s's peers."""
        return exchange_group_ranks(self.replica, self.num_slots, self.replicas)

    def holder(self, peer: int) -> int:
        """Global rank of the worker holding `peer` with this rank's replica index."""
        return rank_of(peer // self.peers_per_worker, self.replica, self.replicas)

    @property
    def slot_root(self) -> int:
        """Global rank of replica 0 of this slot: the one whose buffers DDP treats as its peers'."""
        return rank_of(self.slot, 0, self.replicas)


def build_topology(rank: int, num_peers: int, replicas: int, peers_per_worker: int = 1) -> Topology:
    """Create the groups. Every rank must call this, in the same order, since new_group is
    collective: each rank creates every group and keeps the two it belongs to."""
    topo = Topology(rank, num_peers, replicas, peers_per_worker)
    if not dist.is_initialized() or topo.world_size == 1:
        return topo
    if dist.get_world_size() != topo.world_size:
        raise RuntimeError(f"world size {dist.get_world_size()} != peers / peers_per_worker x replicas = "
                           f"{num_peers} / {peers_per_worker} x {replicas}")
    slot_group = exchange_group = None
    if replicas > 1:
        for s in range(topo.num_slots):
            g = dist.new_group(slot_group_ranks(s, replicas))
            if s == topo.slot:
                slot_group = g
    if topo.num_slots > 1:
        if replicas == 1:
            exchange_group = dist.group.WORLD
        else:
            for r in range(replicas):
                g = dist.new_group(exchange_group_ranks(r, topo.num_slots, replicas))
                if r == topo.replica:
                    exchange_group = g
    return Topology(rank, num_peers, replicas, peers_per_worker, slot_group, exchange_group)


@dataclass(frozen=True)
class Layout:
    """Where a cohort runs: its workers, the peers each holds, the training shards and what each
    worker asks Ray for. Worked out once (layout_of) by the driver's plan, and handed to every
    worker, which builds its Topology from it: the driver and the workers cannot disagree."""
    num_peers: int
    replicas: int
    peers_per_worker: int = 1
    disjoint_peers: bool = False
    """Each worker trains on a shard of its own (codistillation's distill.peer_data='disjoint');
    otherwise peers share shards, cut by replica only (DML needs every peer on the same batch)."""
    worker_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """What each Ray Train worker asks for (scale.cpus_per_worker, and its GPUs with scale.use_gpu)."""

    @property
    def world_size(self) -> int:
        return world_size(self.num_peers, self.replicas, self.peers_per_worker)

    @property
    def num_shards(self) -> int:
        """How many shards the training set is cut into."""
        return self.world_size if self.disjoint_peers else self.replicas

    @property
    def total_resources(self) -> dict[str, float]:
        """What the whole worker group asks for: it runs all at once or not at all."""
        return {k: v * self.world_size for k, v in self.worker_resources.items()}

    def topology(self, rank: int) -> Topology:
        """Who rank `rank` is, without process groups (the dry run's listing)."""
        return Topology(rank, self.num_peers, self.replicas, self.peers_per_worker)

    def build(self, rank: int) -> Topology:
        """This rank's Topology with its process groups (collective: every rank calls it)."""
        return build_topology(rank, self.num_peers, self.replicas, self.peers_per_worker)

    def shard(self, rank: int) -> tuple[int, int]:
        """(shard index, number of shards) of the training set that `rank` draws batches from."""
        return train_shard(rank, self.num_peers, self.replicas, disjoint_peers=self.disjoint_peers,
                           peers_per_worker=self.peers_per_worker)


def layout_of(cfg: Config) -> Layout:
    """The cohort's layout as its config says (models, scale, distill.peer_data): the one place
    it is worked out."""
    return Layout(cfg.num_peers, cfg.scale.replicas, cfg.scale.peers_per_worker,
                  disjoint_peers=cfg.distill.peer_data == "disjoint", worker_resources=dict(cfg.worker_resources))
