"""U2-Net-p in torch, its weights read from the ONNX export (the `u2netp.onnx` rembg ships).

The architecture is U2-Net's small variant (Qin et al. 2020, "U2-Net: Going Deeper with Nested
U-Structure for Salient Object Detection"): six encoder stages and five decoder stages, each a
residual U-block (RSU), six side outputs fused by a 1x1 convolution. The export folded every
batch norm into its convolution, so each block here is a biased 3x3 convolution and a ReLU.
Running it in torch lets masks use whatever GPU torch sees, batched; onnxruntime remains the
CPU path (see BENCHMARKS.md, "U2-Net-p").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from udfs.onnx_graph import Graph, read_graph


class ConvReLU(nn.Sequential):
    """3x3 convolution (batch norm folded in by the export) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
                         nn.ReLU(inplace=True))


def upsample_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Bilinear, align_corners=False: the export's Resize (linear, pytorch_half_pixel).
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of `height` levels. Pooled (RSU-7..4): max-pool between encoder levels and
    a dilation-2 bottom. Dilated (RSU-4F): no pooling, dilations 1, 2, 4 and an 8 at the bottom."""

    def __init__(self, height: int, in_channels: int, mid_channels: int, out_channels: int, dilated: bool = False):
        super().__init__()
        self.pooled = not dilated
        dilations = [2 ** i if dilated else 1 for i in range(height - 1)]
        self.conv_in = ConvReLU(in_channels, out_channels)
        self.encoder = nn.ModuleList(ConvReLU(out_channels if i == 0 else mid_channels, mid_channels, d)
                                     for i, d in enumerate(dilations))
        self.bottom = ConvReLU(mid_channels, mid_channels, 2 ** (height - 1) if dilated else 2)
        self.decoder = nn.ModuleList(ConvReLU(2 * mid_channels, out_channels if i == 0 else mid_channels, d)
                                     for i, d in reversed(list(enumerate(dilations))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = hx = self.conv_in(x)
        skips = []
        for level, conv in enumerate(self.encoder):
            if level > 0 and self.pooled:
                hx = F.max_pool2d(hx, 2, 2, ceil_mode=True)
            hx = conv(hx)
            skips.append(hx)
        hx = self.bottom(hx)
        for conv, skip in zip(self.decoder, reversed(skips)):
            if hx.shape[2:] != skip.shape[2:]:
                hx = upsample_like(hx, skip)
            hx = conv(torch.cat([hx, skip], 1))
        return hx + x_in


class U2NetP(nn.Module):
    """Input: (N, 3, H, W) normalised RGB. Output: (N, 1, H, W) saliency in 0..1 (the fused map)."""

    def __init__(self, mid: int = 16, width: int = 64):
        super().__init__()
        self.encoder = nn.ModuleList([RSU(7, 3, mid, width), RSU(6, width, mid, width), RSU(5, width, mid, width),
                                      RSU(4, width, mid, width), RSU(4, width, mid, width, dilated=True),
                                      RSU(4, width, mid, width, dilated=True)])
        self.decoder = nn.ModuleList([RSU(4, 2 * width, mid, width, dilated=True), RSU(4, 2 * width, mid, width),
                                      RSU(5, 2 * width, mid, width), RSU(6, 2 * width, mid, width),
                                      RSU(7, 2 * width, mid, width)])
        # side[0] reads the last decoder stage (full resolution), side[5] the deepest encoder stage.
        self.side = nn.ModuleList(nn.Conv2d(width, 1, 3, padding=1) for _ in range(6))
        self.fuse = nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN's default TF32 convolutions moved the saliency by up to 0.08 from onnxruntime's
        # (H200, BENCHMARKS.md): run them in full fp32 here, leaving the setting as it was for others.
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, hx = [], x
        for level, stage in enumerate(self.encoder):
            if level > 0:
                hx = F.max_pool2d(hx, 2, 2, ceil_mode=True)
            hx = stage(hx)
            skips.append(hx)
        stage_outputs = [hx]
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            hx = stage(torch.cat([upsample_like(hx, skip), skip], 1))
            stage_outputs.append(hx)
        finest = stage_outputs[-1]
        sides = [side(output) for side, output in zip(self.side, reversed(stage_outputs))]
        sides = [sides[0]] + [upsample_like(s, finest) for s in sides[1:]]
        return torch.sigmoid(self.fuse(torch.cat(sides, 1)))


def convolutions(model: nn.Module) -> list[nn.Conv2d]:
    """The model's convolutions in the order its forward runs them (registration order here),
    which is the order the ONNX export lists its Conv nodes."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def load_u2netp_onnx(path: str | Path) -> U2NetP:
    """U2NetP with the weights of an ONNX export of it."""
    return u2netp_from_graph(read_graph(path), str(path))


def u2netp_from_graph(graph: Graph, path: str) -> U2NetP:
    """The k-th Conv node of the graph gives the k-th convolution's weight and bias; shapes and
    convolution settings must agree, else ValueError naming the node."""
    conv_nodes = [n for n in graph.nodes if n.op_type == "Conv"]
    model = U2NetP().eval()
    convs = convolutions(model)
    if len(conv_nodes) != len(convs):
        raise ValueError(f"{path}: {len(conv_nodes)} Conv nodes, U2-Net-p has {len(convs)} convolutions")
    state = {}
    names = {conv: name for name, conv in model.named_modules()}
    for index, (node, conv) in enumerate(zip(conv_nodes, convs)):
        where = f"{path}: Conv node {index} ({node.name}) for {names[conv]}"
        if len(node.inputs) != 3:
            raise ValueError(f"{where} has no bias input")
        weight, bias = (graph.initializers.get(name) for name in node.inputs[1:])
        if weight is None or bias is None:
            raise ValueError(f"{where}: its weight or bias is not an initializer")
        if tuple(weight.shape) != tuple(conv.weight.shape) or tuple(bias.shape) != tuple(conv.bias.shape):
            raise ValueError(f"{where}: shapes {weight.shape}, {bias.shape}; expected "
                             f"{tuple(conv.weight.shape)}, {tuple(conv.bias.shape)}")
        expected = {"dilations": list(conv.dilation), "strides": list(conv.stride), "group": conv.groups,
                    "pads": list(conv.padding) * 2}
        got = {key: node.attributes.get(key, default) for key, default in
               (("dilations", [1, 1]), ("strides", [1, 1]), ("group", 1), ("pads", [0, 0, 0, 0]))}
        if got != expected:
            raise ValueError(f"{where}: settings {got}, expected {expected}")
        state[f"{names[conv]}.weight"] = torch.from_numpy(weight.copy())
        state[f"{names[conv]}.bias"] = torch.from_numpy(bias.copy())
    model.load_state_dict(state, strict=True)
    return model
