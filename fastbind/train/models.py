"""Small per-modality encoders with L2-normalised outputs and a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BindingModel", "MLPEncoder"]


class MLPEncoder(nn.Module):
    """[n, input_dim] -> [n, dim] unit vectors: Linear-GELU-Linear-GELU-Linear, then L2 normalisation."""

    def __init__(self, input_dim: int, dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class BindingModel(nn.Module):
    """One encoder per modality and a shared learnable temperature.

    The temperature is parameterised by its logarithm (always positive) and clamped from below at
    `min_temperature`, as CLIP clamps its logit scale, so that 1/tau cannot blow up.
    """

    def __init__(
        self,
        input_dims: list[int],
        dim: int,
        hidden: int = 128,
        temperature: float = 0.1,
        min_temperature: float = 0.01,
    ):
        super().__init__()
        self.encoders = nn.ModuleList(MLPEncoder(d, dim, hidden) for d in input_dims)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.min_temperature = min_temperature

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=self.min_temperature)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [encoder(x) for encoder, x in zip(self.encoders, inputs)]
