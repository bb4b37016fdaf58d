"""An exponential moving average of a model's weights, kept in a copy that evaluates and ships.

The copy holds ``decay * average + (1 - decay) * weights`` after every step, for parameters
and BN statistics alike (one fused lerp over all of them, on the device, no host sync). Early
in a run the average would be dominated by the random initial weights, so the decay starts low
and rises to ``decay``: ``min(decay, (1 + n) / (10 + n))`` after n updates.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self.mine, self.theirs = self._floats(self.model), self._floats(model)

    @staticmethod
    def _floats(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's weights as they are after a step."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.mine, self.theirs, 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {
            "state_dict": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.updates = state["updates"]
