"""Synthetic multimodal data in the spirit of CentroBind's synthetic study (arXiv 2410.02086).

Every sample has a shared latent ``s ~ N(0, I)`` [shared_dim] and, per modality m, a private latent
``p_m ~ N(0, I)`` [private_dim]. Modality m observes

    x_m = f_m([a_m * s, p_m]) + noise_m * eps,    eps ~ N(0, I) [input_dim]

where ``f_m`` is a fixed random 2-layer tanh MLP drawn from the seed and ``a_m`` is the modality's
*informativeness* (how strongly the shared latent enters it). By default the last modality is the
deliberately poor one (low informativeness, high noise): anchoring on it is the case where
fixed-anchor binding is expected to suffer. The label of a sample is a function of the shared latent
only (``argmax`` of a fixed random linear map), so a linear probe of it measures how much shared
information an embedding kept.

Everything is deterministic given the seed: the maps are drawn once, training batch ``i`` is drawn
from its own generator seeded by (seed, "train", i) — so the data cursor of a checkpoint is just the
step — and the held-out sets come from separate streams that never overlap the training stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["SyntheticConfig", "SyntheticMultimodal", "Batch"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and difficulty of the synthetic data.

    informativeness / noise: one value per modality, or None for the default (every modality 1.0 /
    0.1 except the last one, 0.5 / 0.5: the deliberately noisy modality).
    """

    modalities: int = 3
    shared_dim: int = 8
    private_dim: int = 4
    input_dim: int = 32
    hidden: int = 64
    num_classes: int = 4
    informativeness: tuple[float, ...] | None = None
    noise: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.modalities < 2:
            raise ValueError(f"SyntheticConfig: modalities must be >= 2, got {self.modalities}")
        for name in ("informativeness", "noise"):
            value = getattr(self, name)
            if value is not None and len(value) != self.modalities:
                raise ValueError(
                    f"SyntheticConfig: {name} has {len(value)} values, expected one per modality ({self.modalities})"
                )

    def resolved_informativeness(self) -> tuple[float, ...]:
        if self.informativeness is not None:
            return tuple(float(v) for v in self.informativeness)
        return (1.0,) * (self.modalities - 1) + (0.5,)

    def resolved_noise(self) -> tuple[float, ...]:
        if self.noise is not None:
            return tuple(float(v) for v in self.noise)
        return (0.1,) * (self.modalities - 1) + (0.5,)


@dataclass
class Batch:
    """``inputs[m]`` [n, input_dim] float32 for each modality, ``labels`` [n] int64, ``shared`` [n, shared_dim]."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor
    shared: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed for (seed, stream, index): independent streams that never collide in practice."""
    digest = hashlib.sha256(f"fastbind-synthetic/{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SyntheticMultimodal:
    """The generator: fixed random maps per modality, deterministic batches and held-out sets."""

    def __init__(self, config: SyntheticConfig | None = None, **overrides):
        config = config or SyntheticConfig()
        if overrides:
            config = SyntheticConfig(**{**config.__dict__, **overrides})
        self.config = config
        self.informativeness = config.resolved_informativeness()
        self.noise = config.resolved_noise()
        g = torch.Generator().manual_seed(_stream_seed(config.seed, "maps"))
        in_dim = config.shared_dim + config.private_dim
        # Gain 2 on the first layer puts the tanh well into its nonlinear range; the scalings by
        # 1/sqrt(fan_in) keep every modality's signal at unit scale whatever the sizes.
        self.maps = []
        for _ in range(config.modalities):
            w1 = torch.randn(in_dim, config.hidden, generator=g) * (2.0 / in_dim**0.5)
            b1 = torch.randn(config.hidden, generator=g) * 0.5
            w2 = torch.randn(config.hidden, config.input_dim, generator=g) / config.hidden**0.5
            self.maps.append((w1, b1, w2))
        self.label_map = torch.randn(config.shared_dim, config.num_classes, generator=g)

    @property
    def input_dims(self) -> list[int]:
        return [self.config.input_dim] * self.config.modalities

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n fresh samples drawn with `generator`."""
        c = self.config
        shared = torch.randn(n, c.shared_dim, generator=generator)
        inputs = []
        for (w1, b1, w2), info, noise in zip(self.maps, self.informativeness, self.noise):
            private = torch.randn(n, c.private_dim, generator=generator)
            latent = torch.cat([info * shared, private], dim=1)
            clean = torch.tanh(latent @ w1 + b1) @ w2
            inputs.append(clean + noise * torch.randn(n, c.input_dim, generator=generator))
        labels = (shared @ self.label_map).argmax(dim=1)
        return Batch(inputs, labels, shared)

    def batch(self, step: int, batch_size: int) -> Batch:
        """Training batch number `step` (a function of (seed, step, batch_size) only)."""
        return self.sample(batch_size, torch.Generator().manual_seed(_stream_seed(self.config.seed, "train", step)))

    def held_out(self, n: int, split: str = "eval") -> Batch:
        """A held-out set: "eval" (retrieval and probe accuracy) or "probe" (fitting the linear probe)."""
        if split not in ("eval", "probe"):
            raise ValueError(f"held_out: split must be 'eval' or 'probe', got {split!r}")
        return self.sample(n, torch.Generator().manual_seed(_stream_seed(self.config.seed, split)))
