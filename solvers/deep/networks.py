"""Torch building blocks shared by the deep followers and reward networks.

Observations reach a network through an *encoder* that maps a batch to flat features:

- vector observations (any non-image ``Box``): flattened and cast to float32 (bytes scaled by
  1/255);
- image observations (``uint8`` ``Box`` of shape ``(C, H, W)``, channels first, as Atari frame
  stacks ``(4, 84, 84)``, or colour stacks ``(4, H, W, 3)``, read as 12 channels): the "Nature"
  DQN encoder (Mnih et al. 2015), inputs scaled by 1/255.

All layers keep PyTorch's default initialisation (Kaiming-uniform weights, small uniform
biases). SAC learns well from it on both MuJoCo and Atari, and no extra init code means one
fewer thing whose seeding or scale has to be kept right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """A ReLU multilayer perceptron; ``hidden = ()`` gives a single linear layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def flat_features(obs: Tensor) -> Tensor:
    """A batch of observations as flat float32 rows; bytes (pixels) scaled to [0, 1], as the
    image encoders scale them, so that an MLP on pixels starts as well scaled as a CNN."""
    flat = obs.flatten(1)
    return flat.float() / 255.0 if flat.dtype == torch.uint8 else flat.float()


def image_channels(shape: Sequence[int]) -> int:
    """Channels of an image observation: the stack, or three per frame of a colour stack."""
    return shape[0] * shape[3] if len(shape) == 4 else shape[0]


def channels_first(obs: Tensor) -> Tensor:
    """A batch of colour frame stacks ``(B, stack, H, W, 3)`` as ``(B, 3 stack, H, W)``."""
    return obs.permute(0, 1, 4, 2, 3).flatten(1, 2) if obs.dim() == 5 else obs


# the smallest square frame that each convolution stack reads (a map of 1 x 1 at its end)
NATURE_MIN_SCREEN = 36


class VectorEncoder(nn.Module):
    """Flattens vector observations to float32 features (no parameters)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.out_dim = math.prod(shape)

    def forward(self, obs: Tensor) -> Tensor:
        return flat_features(obs)


class NatureEncoder(nn.Module):
    """The 3-conv Atari encoder: 32 8x8/4, 64 4x4/2, 64 3x3/1, then a ReLU linear layer."""

    def __init__(self, shape: Sequence[int], features: int = 512) -> None:
        super().__init__()
        channels = image_channels(shape)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, channels, shape[1], shape[2])).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, features), nn.ReLU())
        self.out_dim = features

    def forward(self, obs: Tensor) -> Tensor:
        return self.fc(self.conv(channels_first(obs).float() / 255.0))


def is_image_space(space: spaces.Space) -> bool:
    """Whether observations are uint8 images, grey stacks ``(C, H, W)`` or colour stacks
    ``(C, H, W, 3)`` (and get the Nature encoder)."""
    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and (
        len(space.shape) == 3 or (len(space.shape) == 4 and space.shape[3] == 3))


def make_encoder(space: spaces.Box) -> VectorEncoder | NatureEncoder:
    """The encoder for an observation space; its ``out_dim`` is the feature width."""
    if not isinstance(space, spaces.Box):
        raise TypeError(f"observations must be a Box space, got {space}")
    return NatureEncoder(space.shape) if is_image_space(space) else VectorEncoder(space.shape)
