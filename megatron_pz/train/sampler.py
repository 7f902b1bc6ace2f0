"""Which passages each step trains on: a seeded permutation per epoch, split over data-parallel ranks.

The position is part of the checkpoint, so a resumed run sees exactly the passages it would have.
"""

from __future__ import annotations

import numpy as np


class PassageSampler:
    def __init__(self, dataset, global_batch: int, dp_rank: int, dp_size: int, seed: int,
                 usable=None):
        if global_batch % dp_size:
            raise ValueError(f"train.passages_per_step={global_batch} must be divisible by the "
                             f"data-parallel size {dp_size}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.indices = np.arange(len(dataset)) if usable is None else np.asarray(usable)
        if len(self.indices) < global_batch:
            raise ValueError(f"only {len(self.indices)} usable training passages for a global batch of "
                             f"{global_batch} (train.passages_per_step)")
        self.consumed = 0  # global passages handed out so far

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.indices)

    def next_global_indices(self) -> list[int]:
        """The next global batch's dataset indices, every data-parallel share in order (advances the position)."""
        per_epoch = len(self.indices) - len(self.indices) % self.global_batch
        epoch, offset = divmod(self.consumed, per_epoch)
        batch = self._order(epoch)[offset:offset + self.global_batch]
        self.consumed += self.global_batch
        return [int(i) for i in batch]

    def next_batch(self) -> list:
        batch = self.next_global_indices()
        share = self.global_batch // self.dp_size
        mine = batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [self.dataset[int(i)] for i in mine]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_usable": int(len(self.indices))}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_usable") != len(self.indices) or state.get("seed") != self.seed:
            raise ValueError(f"sampler state {state} does not match this dataset "
                             f"({len(self.indices)} usable passages, seed {self.seed})")
        self.consumed = int(state["consumed"])
