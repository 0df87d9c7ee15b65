"""Exponential moving average of a model's trainable weights (Polyak averaging).

A short, budget-bound run ends on weights that still carry the last steps' gradient noise; the
average over the last ~1/(1 - decay) steps is a smoother model at no training cost (one lerp per
step). The run hands on the averaged weights; its online weights are kept beside them.

The average lives in float32 beside the module's parameters, so it needs whole parameters on each
rank: ZeRO stages 0-2 (ZeRO-3 shards them; a run with stage 3 is refused with the fix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"weight-average decay={decay} must lie in (0, 1)")
        self.decay = decay
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        # Ramped up from 0.1 so that the first steps' random weights do not linger in the average.
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters in after an optimiser step."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: tensor for name, tensor in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.names) - set(state["shadow"]))
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {missing[:3]}: the model changed since it "
                             f"was written; start a new run (another run_name) or set resume=false")
        self.updates = int(state["updates"])
        for name, tensor in zip(self.names, self.shadow):
            tensor.copy_(state["shadow"][name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights for the duration, its own ones again after."""
        online = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, tensor in zip(self.params, self.shadow):
                param.copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, tensor in zip(self.params, online):
                    param.copy_(tensor)
