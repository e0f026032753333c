"""Process groups of one role (actor or critic) as a megatron ProcessGroupCollection.

Each role builds its own collection from a HyperCommGrid over all ranks (tp fastest, then cp, dp,
pp, as in megatron's default "tp-cp-ep-dp-pp" order), so the actor and the critic may use
different layouts in one process. The collection is passed explicitly to the model, DDP, the
optimizer and the schedule; nothing here writes megatron's global parallel_state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class RoleLayout:
    """Sizes and this rank's coordinates in one role's (tp, dp, pp) grid."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank holds the embedding (first pipeline stage)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the output layer / value head (last pipeline stage)."""
        return self.pp_rank == self.pp - 1


def build_role_groups(tensor_parallel_size: int, pipeline_parallel_size: int,
                      ) -> tuple[ProcessGroupCollection, RoleLayout]:
    """Create the groups of one role over the whole world: dp = world / (tp * pp).

    Collective: every rank must call it, with the same sizes, in the same order as other roles.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_role_groups: torch.distributed is not initialised")
    world = dist.get_world_size()
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} must be >= 1 and "
                         f"divide the world size {world}")
    dp = world // (tp * pp)
    grid = HyperCommGrid([tp, 1, dp, pp], ["tp", "cp", "dp", "pp"])
    pgs = ProcessGroupCollection()
    pgs.tp = grid.create_pg("tp")
    pgs.cp = grid.create_pg("cp")
    pgs.dp = grid.create_pg("dp")
    pgs.pp = grid.create_pg("pp")
    pgs.dp_cp = grid.create_pg(["cp", "dp"])
    pgs.tp_cp = grid.create_pg(["tp", "cp"])
    pgs.mp = grid.create_pg(["tp", "pp"])
    pgs.tp_dp_cp = grid.create_pg(["tp", "cp", "dp"])
    # no experts: the expert groups are the dense ones (DDP / optimizer read them), no extra groups
    pgs.ep = pgs.cp
    pgs.expt_tp = pgs.tp
    pgs.tp_ep = pgs.tp
    pgs.tp_ep_pp = pgs.mp
    pgs.expt_dp = pgs.dp
    pgs.intra_dp_cp = pgs.dp_cp
    pgs.intra_expt_dp = pgs.dp
    pgs.inter_dist_opt = None
    # one distributed-optimizer instance spans the whole model: grad norm / zero counts reduce here
    pgs.intra_dist_opt = grid.create_pg(["tp", "cp", "dp", "pp"])
    # embedding groups (first + last stage, for tied-embedding grads) are not grid dims: build them
    rank = dist.get_rank()
    pgs.embd, pgs.pos_embd = None, None
    for stage_ranks in grid.get_rank_enum("pp"):
        embd_ranks = sorted({stage_ranks[0], stage_ranks[-1]})
        embd = dist.new_group(embd_ranks)
        pos = dist.new_group([stage_ranks[0]])
        if rank in stage_ranks:
            pgs.embd = embd if rank in embd_ranks else None
            pgs.pos_embd = pos if rank == stage_ranks[0] else None
    layout = RoleLayout(tp=tp, pp=pp, dp=dp, tp_rank=pgs.tp.rank(), pp_rank=pgs.pp.rank(),
                        dp_rank=pgs.dp.rank())
    return pgs, layout
