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

__all__ = [
    "HRNET_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "HRModule",
    "HRNet",
    "StageCfg",
]

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck, PyTorch style (stride on the 3×3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_layer(
    block: type[nn.Module], inplanes: int, planes: int, num_blocks: int, stride: int = 1
) -> nn.Sequential:
    downsample = None
    out_ch = planes * block.expansion
    if stride != 1 or inplanes != out_ch:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_ch, kernel_size=1, stride=stride, bias=False),
            _bn(out_ch),
        )
    layers = [block(inplanes, planes, stride, downsample)]
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
        multiscale_output: bool = True,
    ):
        super().__init__()
        n = len(num_blocks)
        if not (n == len(in_channels) == len(num_channels)):
            raise ValueError(
                f"HRModule: num_blocks {tuple(num_blocks)}, in_channels {tuple(in_channels)} and "
                f"num_channels {tuple(num_channels)} must have the same length"
            )
        self.num_branches = n
        self.multiscale_output = multiscale_output
        self.branches = nn.ModuleList(
            _make_layer(block, in_channels[i], num_channels[i], num_blocks[i]) for i in range(n)
        )
        self.out_channels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers() if n > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self) -> nn.ModuleList:
        ch = self.out_channels
        n = self.num_branches
        fuse_layers = nn.ModuleList()
        for i in range(n if self.multiscale_output else 1):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    # 1×1 conv + BN; the bilinear resize to branch i's size happens in forward.
                    row.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], kernel_size=1, bias=False), _bn(ch[i])))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    convs = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            convs.append(nn.Sequential(_conv3x3(ch[j], ch[i], stride=2), _bn(ch[i])))
                        else:
                            convs.append(
                                nn.Sequential(
                                    _conv3x3(ch[j], ch[j], stride=2), _bn(ch[j]), nn.ReLU(inplace=False)
                                )
                            )
                    row.append(nn.Sequential(*convs))
            fuse_layers.append(row)
        return fuse_layers

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if len(x) != self.num_branches:
            raise ValueError(f"HRModule expects {self.num_branches} inputs, got {len(x)}")
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.fuse_layers is None:
            return x
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

    @property
    def num_branches(self) -> int:
        return len(self.num_blocks)


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


class HRNet(nn.Module):
    """HRNetV2 backbone returning the 4 branch outputs of stage 4 (strides 4, 8, 16, 32).

    Args:
        stages: the four stage configs, or the name of one in :data:`HRNET_ARCHS`.
        in_channels: number of input image channels.
    """

    def __init__(self, stages: str | Sequence[StageCfg], in_channels: int = 3):
        super().__init__()
        if isinstance(stages, str):
            if stages not in HRNET_ARCHS:
                raise ValueError(f"unknown HRNet arch {stages!r}; choose from {sorted(HRNET_ARCHS)}")
            stages = HRNET_ARCHS[stages]
        stages = tuple(stages)
        if len(stages) != 4 or stages[0].num_branches != 1:
            raise ValueError("HRNet needs 4 stage configs, the first with a single branch")
        for k, s in enumerate(stages):
            if s.num_branches != k + 1 or len(s.num_channels) != s.num_branches:
                raise ValueError(f"stage{k + 1} must have {k + 1} branches, got {s}")
        self.stage_cfgs = stages

        # stem: two stride-2 3×3 convs
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=True)

        # stage 1
        s1 = stages[0]
        block1 = BLOCKS[s1.block]
        self.layer1 = _make_layer(block1, 64, s1.num_channels[0], s1.num_blocks[0])
        pre_channels = [s1.num_channels[0] * block1.expansion]

        # stages 2-4, each preceded by a transition
        for k in (1, 2, 3):
            cfg = stages[k]
            block = BLOCKS[cfg.block]
            cur_channels = [c * block.expansion for c in cfg.num_channels]
            setattr(self, f"transition{k}", self._make_transition(pre_channels, cur_channels))
            stage, pre_channels = self._make_stage(cfg, cur_channels)
            setattr(self, f"stage{k + 1}", stage)

        self.out_channels: list[int] = list(pre_channels)
        self.strides: list[int] = [4, 8, 16, 32]
        self.init_weights()

    @staticmethod
    def _make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i in range(len(cur)):
            if i < len(pre):
                if cur[i] != pre[i]:
                    layers.append(nn.Sequential(_conv3x3(pre[i], cur[i]), _bn(cur[i]), nn.ReLU(inplace=True)))
                else:
                    layers.append(nn.Identity())
            else:
                convs = []
                for j in range(i + 1 - len(pre)):
                    in_ch = pre[-1]
                    out_ch = cur[i] if j == i - len(pre) else in_ch
                    convs.append(
                        nn.Sequential(_conv3x3(in_ch, out_ch, stride=2), _bn(out_ch), nn.ReLU(inplace=True))
                    )
                layers.append(nn.Sequential(*convs))
        return layers

    @staticmethod
    def _make_stage(cfg: StageCfg, in_channels: list[int]) -> tuple[nn.Sequential, list[int]]:
        block = BLOCKS[cfg.block]
        modules = []
        for _ in range(cfg.num_modules):
            m = HRModule(block, cfg.num_blocks, in_channels, cfg.num_channels, multiscale_output=True)
            modules.append(m)
            in_channels = m.out_channels
        return nn.Sequential(*modules), list(in_channels)

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

    @staticmethod
    def _run_transition(transition: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
        # As MMSeg/timm: new (lower-resolution) branches branch off the last existing one.
        out = []
        for i, t in enumerate(transition):
            if isinstance(t, nn.Identity):
                out.append(ys[i])
            else:
                out.append(t(ys[i] if i < len(ys) else ys[-1]))
        return out

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
        for k in (1, 2, 3):
            xs = self._run_transition(getattr(self, f"transition{k}"), ys)
            ys = getattr(self, f"stage{k + 1}")(xs)
        return ys
