"""HRNetV2 backbone, as in MMSegmentation's ``mmseg/models/backbones/hrnet.py``.

The module names (and hence the state-dict keys) are those of MMSegmentation and of timm's
``HighResolutionNet`` (minus its classification head), so OpenMMLab ImageNet pretrain files, MMSeg
segmentor checkpoints and timm state dicts load without renaming (see :mod:`atrc_exp.models.backbones`).

Branch fusion of a lower-resolution branch j into branch i is MMSeg's (and the original ATRC's):
1×1 conv, BN, ``Upsample(scale_factor=2**(j-i), bilinear, align_corners=False)``, **then** a bilinear
resize to branch i's exact size (a no-op when the sizes already agree). Any input size works; at sizes
that are not multiples of 32 (the NYUD crop 425×560) the two steps differ from one direct resize, so
both are kept. Unlike timm, there is no classification head: ``forward`` returns the four branch
outputs of stage 4 (strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import resize_to


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_layer(block: type[nn.Module], inplanes: int, planes: int, num_blocks: int) -> nn.Sequential:
    downsample = None
    out_ch = planes * block.expansion
    if inplanes != out_ch:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch)
        )
    layers = [block(inplanes, planes, downsample)]
    layers += [block(out_ch, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """One high-resolution module: parallel branches followed by all-to-all fusion (sum + ReLU)."""

    def __init__(
        self,
        block: type[nn.Module],
        num_blocks: Sequence[int],
        in_channels: Sequence[int],
        num_channels: Sequence[int],
    ):
        super().__init__()
        n = len(num_blocks)
        self.branches = nn.ModuleList(
            _make_layer(block, in_channels[i], num_channels[i], num_blocks[i]) for i in range(n)
        )
        self.out_channels = ch = [c * block.expansion for c in num_channels]
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:  # 1×1 conv + BN; the bilinear resize to branch i's size happens in forward
                    conv = nn.Conv2d(ch[j], ch[i], kernel_size=1, bias=False)
                    row.append(nn.Sequential(conv, nn.BatchNorm2d(ch[i])))
                elif j == i:
                    row.append(nn.Identity())
                else:  # i - j stride-2 3×3 convs, a ReLU after all but the last
                    convs = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        c_out = ch[i] if last else ch[j]
                        layers = [_conv3x3(ch[j], c_out, stride=2), nn.BatchNorm2d(c_out)]
                        convs.append(nn.Sequential(*layers) if last else nn.Sequential(*layers, nn.ReLU()))
                    row.append(nn.Sequential(*convs))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = x[i].shape[-2:]
            y: Tensor | None = None
            for j, layer in enumerate(row):  # summed in branch order, as MMSeg and timm do
                z = layer(x[j])  # Identity for j == i
                if j > i:  # MMSeg's Upsample(scale_factor), then a resize to the exact size
                    z = F.interpolate(z, scale_factor=2 ** (j - i), mode="bilinear", align_corners=False)
                    z = resize_to(z, size)
                y = z if y is None else y + z
            out.append(self.relu(y))
        return out


@dataclass(frozen=True)
class StageCfg:
    num_modules: int
    block: str
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]


# (stage1, stage2, stage3, stage4), as in MMSeg's fcn_hr18s / fcn_hr48 configs.
HRNET_ARCHS: dict[str, tuple[StageCfg, StageCfg, StageCfg, StageCfg]] = {
    "hrnet18": (  # HRNetV2-W18-small (MMSeg fcn_hr18s, timm hrnet_w18_small_v2)
        StageCfg(1, "BOTTLENECK", (2,), (64,)),
        StageCfg(1, "BASIC", (2, 2), (18, 36)),
        StageCfg(3, "BASIC", (2, 2, 2), (18, 36, 72)),
        StageCfg(2, "BASIC", (2, 2, 2, 2), (18, 36, 72, 144)),
    ),
    "hrnet48": (  # HRNetV2-W48 (MMSeg fcn_hr48, timm hrnet_w48)
        StageCfg(1, "BOTTLENECK", (4,), (64,)),
        StageCfg(1, "BASIC", (4, 4), (48, 96)),
        StageCfg(4, "BASIC", (4, 4, 4), (48, 96, 192)),
        StageCfg(3, "BASIC", (4, 4, 4, 4), (48, 96, 192, 384)),
    ),
}


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv3x3(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class HRNet(nn.Module):
    """HRNetV2 backbone returning the 4 branch outputs of stage 4 (strides 4, 8, 16, 32).

    Args:
        stages: the four stage configs (stage k with k branches), or the name of one in
            :data:`HRNET_ARCHS`.
        in_channels: number of input image channels.
    """

    def __init__(self, stages: str | Sequence[StageCfg], in_channels: int = 3):
        super().__init__()
        stages = HRNET_ARCHS[stages] if isinstance(stages, str) else tuple(stages)
        # stem: two stride-2 3×3 convs
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        s1 = stages[0]
        block1 = BLOCKS[s1.block]
        self.layer1 = _make_layer(block1, 64, s1.num_channels[0], s1.num_blocks[0])
        pre = [s1.num_channels[0] * block1.expansion]
        for k in (1, 2, 3):  # stages 2-4, each preceded by a transition
            cfg = stages[k]
            block = BLOCKS[cfg.block]
            cur = [c * block.expansion for c in cfg.num_channels]
            transition = nn.ModuleList()
            for i, c in enumerate(cur):
                if i < len(pre):  # an existing branch: a 3×3 conv where its width changes
                    transition.append(nn.Identity() if c == pre[i] else _conv_bn_relu(pre[i], c))
                else:  # a new (lower-resolution) branch: stride-2 3×3 convs from the last existing one
                    n = i + 1 - len(pre)
                    convs = [_conv_bn_relu(pre[-1], c if j == n - 1 else pre[-1], stride=2) for j in range(n)]
                    transition.append(nn.Sequential(*convs))
            setattr(self, f"transition{k}", transition)
            modules = []
            for _ in range(cfg.num_modules):
                modules.append(HRModule(block, cfg.num_blocks, cur, cfg.num_channels))
                cur = modules[-1].out_channels
            setattr(self, f"stage{k + 1}", nn.Sequential(*modules))
            pre = list(cur)
        self.out_channels: list[int] = pre
        self.init_weights()

    def init_weights(self) -> None:
        """MMSeg default init: Kaiming normal (fan_out, relu) for convs, BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def compile_regions(self) -> list[nn.Module]:
        """The modules to compile one by one for a regional ``torch.compile``
        (``trainer.compile.regional``): the stage-1 blocks and every high-resolution module.
        Modules of one stage have the same code and shapes, so they share one compilation; the
        stem and the transitions (a few convolutions) stay eager."""
        return [*self.layer1, *self.stage2, *self.stage3, *self.stage4]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = [x]
        for k in (1, 2, 3):  # as MMSeg/timm: a new branch branches off the last existing one
            xs = [t(ys[min(i, len(ys) - 1)]) for i, t in enumerate(getattr(self, f"transition{k}"))]
            ys = getattr(self, f"stage{k + 1}")(xs)
        return ys
