"""The segmentation network: one class for the bundle, Lightning training and the OOD detectors."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


class CMRUNet(nn.Module):
    """2D U-Net of MONAI residual units, with named feature taps and a dictionary of output heads.

    Layers are named ``enc0`` (full resolution) ... ``enc{n-1}`` (deepest, the bottleneck), then
    ``dec{n-2}`` ... ``dec0`` on the way up. ``forward`` returns the segmentation logits (what inferers
    and exports need); :meth:`forward_heads` returns every head's output and any requested feature maps.
    Extra heads (``heads={"name": channels}``) are 1x1 convolutions on the last decoder map; they leave
    the segmentation weights untouched, so a state dict trained without them still loads (``strict=False``).
    """

    # TorchScript compiles every property; this one is Python-only (feature taps), not part of ``forward``
    __jit_unused_properties__ = ["layer_names"]

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        channels: tuple[int, ...] = (32, 64, 128, 256, 320),
        num_res_units: int = 2,
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
        heads: dict[str, int] | None = None,
    ):
        super().__init__()
        channels = tuple(channels)
        self.channels = channels
        self.divisor = 2 ** (len(channels) - 1)
        block = dict(spatial_dims=2, norm=norm, act=act, dropout=dropout)
        self.encoder = nn.ModuleList()
        previous = in_channels
        for i, c in enumerate(channels):
            self.encoder.append(ResidualUnit(in_channels=previous, out_channels=c, strides=1 if i == 0 else 2, subunits=num_res_units, **block))
            previous = c
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.up.append(Convolution(in_channels=previous, out_channels=channels[i], strides=2, kernel_size=3, is_transposed=True, **block))
            self.decoder.append(ResidualUnit(in_channels=2 * channels[i], out_channels=channels[i], subunits=1, **block))
            previous = channels[i]
        self.heads = nn.ModuleDict({"seg": nn.Conv2d(channels[0], out_channels, kernel_size=1)})
        for name, n in (heads or {}).items():
            self.add_head(name, n)

    def add_head(self, name: str, channels: int) -> None:
        """A 1x1 convolution on the last decoder map with ``channels`` outputs (kept if already there)."""
        if name in self.heads:
            if self.heads[name].out_channels != channels:
                raise ValueError(f"head '{name}' has {self.heads[name].out_channels} channels, {channels} asked for")
            return
        self.heads[name] = nn.Conv2d(self.channels[0], channels, kernel_size=1)

    @property
    def layer_names(self) -> list[str]:
        n = len(self.channels)
        return [f"enc{i}" for i in range(n)] + [f"dec{i}" for i in reversed(range(n - 1))]

    def resolve(self, name: str) -> str:
        """A layer's own name; ``bottleneck`` is the deepest encoder layer, whatever the depth."""
        name = f"enc{len(self.channels) - 1}" if name == "bottleneck" else name
        if name not in self.layer_names:
            raise KeyError(f"unknown layer '{name}'; layers are {self.layer_names} (or 'bottleneck')")
        return name

    def layer(self, name: str) -> nn.Module:
        """The module whose output is the feature map ``name`` (see :attr:`layer_names`)."""
        name = self.resolve(name)
        index = int(name[3:])
        return self.encoder[index] if name.startswith("enc") else self.decoder[len(self.channels) - 2 - index]

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.divisor, (-w) % self.divisor
        return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named feature map (input padded to a multiple of ``divisor``; maps not cropped)."""
        out = {}
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            out[f"enc{i}"] = x
            skips.append(x)
        for j, (up, dec) in enumerate(zip(self.up, self.decoder)):
            i = len(self.channels) - 2 - j
            x = dec(torch.cat([up(x), skips[i]], dim=1))
            out[f"dec{i}"] = x
        return out

    def forward_heads(self, x: torch.Tensor, taps: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every head's output (cropped to the input size) and the feature maps named in ``taps``."""
        x, (h, w) = self._pad(x)
        feats = self.features(x)
        last = feats["dec0"]
        out = {name: head(last)[..., :h, :w] for name, head in self.heads.items()}
        for name in taps:
            out[name] = feats[self.resolve(name)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self._pad(x)
        return self.heads["seg"](self.features(x)["dec0"])[..., :h, :w]


def load_weights(network: CMRUNet, checkpoint: str | os.PathLike, strict: bool = True) -> CMRUNet:
    """Load a state dict saved by training (tensors only: ``weights_only=True``), or a Lightning checkpoint.

    ``strict=False`` lets the output heads differ (a plain model into a multi-task network, a pretrained
    network without its proxy heads); every other weight must match."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = {k.removeprefix("network."): v for k, v in state["state_dict"].items() if k.startswith("network.")}
    own = network.state_dict()
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if resized:
        raise ValueError(f"{checkpoint}: weights of another network shape: {resized[:5]}")
    result = network.load_state_dict(state, strict=strict)
    if not strict:
        body = [k for k in (*result.missing_keys, *result.unexpected_keys) if not k.startswith("heads.")]
        if body:
            raise ValueError(f"{checkpoint}: weights do not match the network outside its heads: {body[:5]}")
    return network
