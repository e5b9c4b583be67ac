"""DAPO's dynamic sampling: a step trains on groups whose rewards differ.

A group whose G rewards are all equal (`objective.zero_spread_groups`) has advantage 0 and carries no
policy gradient. With `GRPOConfig.dynamic_sampling` the trainer calls `dynamic_sample` after its first
round: it samples and scores `prompts_per_step` prompts per round, keeps the informative groups and
samples more rounds until it has `prompts_per_step` of them or `max_sampling_rounds` is reached.

Multi-process design. Generation is split over processes as usual, but the keep/drop decision is
global: after each round every process receives every group (token ids, rewards and texts: small),
so every process sees the same pool in the same order (round, then the global row order) and
selects the same groups, exactly as one process would. The selected `prompts_per_step` groups are
then split evenly over the processes (a group may train on another process than the one that
sampled it; its prompt is encoded again there from the dataset row). Every process therefore
trains the same number of groups, so the same number of micro-batches (DeepSpeed needs equal
counts: each backward reduces gradients collectively and ZeRO-3 gathers weights for each forward).
When `max_sampling_rounds` ends short, the step tops the batch up with the earliest zero-spread
groups (advantage 0: they add only the KL term) rather than shrinking it, for the same reason, and
says so on stderr. Data order stays a function of the step: round r's rows come from a permutation
seeded by (seed, step, r), avoiding the step's earlier rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .distributed import all_gather_objects, is_main_process, shard, world
from .objective import zero_spread_groups
from .run import step_row_indices

# Rounds of one step draw their rows from permutations seeded (seed, step) * stride + round.
_ROUND_SEED_STRIDE = 1009


@dataclass
class Group:
    """One prompt's G completions as the pool holds them (CPU tensors; sent between processes)."""

    row: int  # dataset row index
    ids: torch.Tensor  # [G, C] with C this group's longest completion
    mask: torch.Tensor  # [G, C]
    truncated: torch.Tensor  # [G]
    texts: list[str]
    rewards: torch.Tensor  # [G]
    per_func: torch.Tensor  # [F, G]


def refill_row_indices(dataset_size: int, step: int, round_: int, count: int, seed: int, used: list[int]) -> list[int]:
    """`count` row indices for round `round_` (> 0) of `step`: a seeded permutation, rows not yet used
    in this step first (a dataset smaller than the step's rounds repeats rows)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * _ROUND_SEED_STRIDE + round_)
    order = torch.randperm(dataset_size, generator=generator).tolist()
    taken = set(used)
    return ([i for i in order if i not in taken] + [i for i in order if i in taken])[:count]


def local_groups(row_indices: list[int], completion_ids, completion_mask, truncated, texts, rewards, per_func,
                 group_size: int) -> list[Group]:
    """This process's sampled groups, one `Group` per prompt."""
    groups = []
    for k, row in enumerate(row_indices):
        rows = slice(k * group_size, (k + 1) * group_size)
        width = max(1, int(completion_mask[rows].sum(1).max()))
        groups.append(Group(row, completion_ids[rows, :width].cpu(), completion_mask[rows, :width].cpu(),
                            truncated[rows].cpu(), texts[rows], rewards[rows].cpu(), per_func[:, rows].cpu()))
    return groups


def gather_groups(groups: list[Group]) -> list[Group]:
    """Every process's groups in rank order: the round's global order (collective)."""
    return [group for part in all_gather_objects(groups) for group in part]


class Selection(NamedTuple):
    chosen: list[int]  # positions in the pool of the groups to train, in pool order
    informative: int  # how many of them have a reward spread
    dropped: int  # zero-spread groups of the pool left out


def select_groups(pool: list[Group], wanted: int) -> Selection:
    """The first `wanted` groups of the pool whose rewards differ, topped up with the earliest
    zero-spread ones when there are fewer."""
    zero = zero_spread_groups(torch.cat([g.rewards for g in pool]), len(pool[0].rewards)).tolist() if pool else []
    informative = [k for k, z in enumerate(zero) if not z][:wanted]
    filler = [k for k, z in enumerate(zero) if z][: wanted - len(informative)]
    return Selection(sorted(informative + filler), len(informative), sum(zero) - len(filler))


def pad_groups(groups: list[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion ids and mask [N, C] of `groups` (N = len(groups) x G), padded to the longest (pad after EOS)."""
    width = max(group.ids.shape[1] for group in groups)
    ids = torch.cat([torch.nn.functional.pad(g.ids, (0, width - g.ids.shape[1]), value=pad_id) for g in groups])
    mask = torch.cat([torch.nn.functional.pad(g.mask, (0, width - g.mask.shape[1]), value=0) for g in groups])
    return ids, mask


def dynamic_sample(batch, rewards: torch.Tensor, per_func: torch.Tensor, cfg, step: int, dataset_size: int,
                   pad_id: int, sample_round, regrouped):
    """More rounds of prompts_per_step prompts until the step has prompts_per_step groups whose rewards
    differ, or max_sampling_rounds; then this process's share of the selected groups. Collective.

    `batch`, `rewards` [N], `per_func` [F, N]: the first round on this process (the trainer's rollout);
    `cfg`: the GRPOConfig; `pad_id`: what pads the regrouped completions;
    `sample_round(row_indices, round_)`: the rollout, rewards and per_func of this process's rows in a
    later round; `regrouped(row_indices, completion_ids, completion_mask, truncated, texts)`: a rollout
    of chosen groups. Returns (batch, rewards, per_func, the step's counters).
    """
    rank, size = world()
    wanted, G = cfg.prompts_per_step, cfg.group_size
    used = step_row_indices(dataset_size, step, wanted, cfg.seed)
    pool = gather_groups(local_groups(batch.row_indices, batch.completion_ids, batch.completion_mask, batch.truncated,
                                      batch.texts, rewards, per_func, G))
    rounds = 1
    while select_groups(pool, wanted).informative < wanted and rounds < cfg.max_sampling_rounds:
        indices = refill_row_indices(dataset_size, step, rounds, wanted, cfg.seed, used)
        used += indices
        local = shard(indices, "prompts_per_step")
        extra, extra_rewards, extra_per_func = sample_round(local, rounds)
        pool += gather_groups(local_groups(local, extra.completion_ids, extra.completion_mask, extra.truncated,
                                           extra.texts, extra_rewards, extra_per_func, G))
        rounds += 1
    chosen, informative, dropped = select_groups(pool, wanted)
    if informative < wanted and is_main_process():
        print(f"[grpo] step {step + 1}: dynamic sampling found {informative} groups with a reward spread in "
              f"{rounds} rounds (max_sampling_rounds); the other {wanted - informative} trained are zero-spread",
              file=sys.stderr)
    counters = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/informative_groups": informative,
                "dynamic_sampling/groups_dropped": dropped, "dynamic_sampling/extra_rollouts": (rounds - 1) * wanted * G}
    if rounds == 1:  # the first round's groups, all of them, each trained where it was sampled
        return batch, rewards, per_func, counters
    per_process = wanted // size
    mine = [pool[k] for k in chosen[rank * per_process : (rank + 1) * per_process]]
    ids, mask = pad_groups(mine, pad_id)
    kept = regrouped([group.row for group in mine], ids, mask,
                     torch.cat([group.truncated for group in mine]).to(batch.truncated.device),
                     [text for group in mine for text in group.texts])
    return (kept, torch.cat([group.rewards for group in mine]), torch.cat([group.per_func for group in mine], dim=1),
            counters)
