"""The temperature of the loss modules: a buffer, or a parameter learnt directly."""

from __future__ import annotations

import torch


class _TemperatureMixin(torch.nn.Module):
    def _init_temperature(self, name: str, temperature: float, learnable: bool) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{name}: temperature must be a float > 0, got {temperature!r}")
        value = torch.tensor(float(temperature))
        if learnable:
            # learnt directly, as GRAM's τ (CLIP's log-scale parametrisation is a choice of the caller)
            self.temperature = torch.nn.Parameter(value)
        else:
            self.register_buffer("temperature", value)
