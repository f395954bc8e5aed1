"""CIFAR-size (32x32, three stages) networks with any fusion, for training and fair ablations.

* ResNet-{8,20,32,56}: the He et al. CIFAR depths (3 stages x b blocks, depth 6b+2) and widths
  16/32/64, built from the authors' pre-activation basic block (``AFFResBlockV2``): the
  shortcut is the input, or avg-pool + 1x1 conv where the shape changes; MS-CAM r = 4.
* ResNeXt-20-32x4d: the authors' CIFAR ResNeXt block (post-activation bottleneck,
  cardinality 32, width 4, outputs 256/512/1024, avg-pool shortcut) with 2 blocks per stage; r = 16.
* ResNet-9: Page's DAWNBench network ("How to train your ResNet", 2018; 94 % in 24 epochs), a stem and
  three conv-pool stages (64/128/256/512), the first and last with a two-conv residual block whose addition
  is the fusion; r = 4. Chosen for our 2-core CPU: Page reached ResNet-56's accuracy in 24 epochs instead of
  160, and its wide convolutions train 2.4-2.7x faster in bfloat16 (AMX) where ResNet-56's thin ones gain
  1.2-2x (docs/cifar10-weights.md).
* ResNet-11: the shape of Jordan's airbench96 (2024; 96 % on CIFAR-10 in 37 epochs): ResNet-9's stages at
  128/384/512 with the residual block in all three (three fusions), from the same blocks and stem. For the
  lent GPU, where ResNet-9 trains six runs of 96 epochs in under 7 minutes but stays at 92 % on our data.

Every architecture is registered once per fusion (``FUSIONS``): ``{fusion}_{arch}``, e.g.
``aff_resnet20``, ``iaff_resnet20``, ``add_resnet20``, ``se_resnet20``, ``sk_resnet20``,
``local_resnet20``, so an ablation differs in the ``--model`` flag only.
"""
from collections import OrderedDict
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, create_classifier
from timm.models._features import feature_take_indices
from timm.models import checkpoint_seq, register_model
from timm.models.resnet import make_blocks

from ..layers.fusion import FUSIONS, create_fusion, zero_init_fusions
from ._builder import build_aff_model, check_image_batch, cifar_cfg, make_default_cfgs
from .resnet import FusionBottleneck

torch.fx.wrap('check_image_batch')  # an FX leaf in every tracer (by name in this module; see _builder)

__all__ = ['PreActFusionBlock', 'CifarNet']


class PreActFusionBlock(nn.Module):
    """Pre-activation basic block whose residual addition is a fusion: ``fusion(shortcut, residual)``."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            fusion: str = 'aff',
            fusion_r: int = 4,
            fusion_scale: float = 2.0,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
            )
        else:
            self.downsample = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fusion = create_fusion(fusion, out_chs, r=fusion_r, scale=fusion_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        out = self.conv1(x_pre)
        out = self.conv2(self.act2(self.bn2(out)))
        return self.fusion(shortcut, self.drop_path(out))


class PostActFusionBlock(nn.Module):
    """Page's residual block, ``fusion(x, ReLU(BN(conv(ReLU(BN(conv(x)))))))``: same shape in and out."""

    def __init__(self, chs: int, fusion: str = 'aff', fusion_r: int = 4, fusion_scale: float = 2.0,
                 drop_path: float = 0.):
        super().__init__()
        self.conv1 = nn.Conv2d(chs, chs, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(chs, chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fusion = create_fusion(fusion, chs, r=fusion_r, scale=fusion_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.fusion(x, self.drop_path(out))


def _conv_pool_stages(widths, stem_width, res_stages, fusion, fusion_r, fusion_scale, drop_path_rate):
    """Conv, 2x2 max-pool, BN, ReLU (pooling before BN: a quarter of the BN/ReLU work, as in Page's later
    versions), then the residual block where ``res_stages`` says."""
    stages, in_chs, n_res = [], stem_width, max(len(res_stages) - 1, 1)
    for i, width in enumerate(widths):
        layers = OrderedDict(conv=nn.Conv2d(in_chs, width, 3, padding=1, bias=False), pool=nn.MaxPool2d(2),
                             bn=nn.BatchNorm2d(width), act=nn.ReLU(inplace=True))
        if i in res_stages:
            dpr = drop_path_rate * res_stages.index(i) / n_res
            layers['block'] = PostActFusionBlock(width, fusion, fusion_r, fusion_scale, dpr)
        stages.append(nn.Sequential(layers))
        in_chs = width
    return stages


def _preact_stages(layers, widths, stem_width, fusion, fusion_r, fusion_scale, drop_path_rate):
    stages, in_chs, block_idx, n_blocks = [], stem_width, 0, sum(layers)
    for stage_idx, (depth, width) in enumerate(zip(layers, widths)):
        blocks = []
        for i in range(depth):
            dpr = drop_path_rate * block_idx / max(n_blocks - 1, 1)
            stride = 2 if (stage_idx > 0 and i == 0) else 1
            blocks.append(PreActFusionBlock(in_chs, width, stride, fusion, fusion_r, fusion_scale, dpr))
            in_chs, block_idx = width, block_idx + 1
        stages.append(nn.Sequential(*blocks))
    return stages


def _bottleneck_stages(layers, widths, stem_width, fusion, fusion_r, fusion_scale, drop_path_rate, cardinality, base_width):
    block = partial(FusionBottleneck, fusion=fusion, fusion_r=fusion_r, fusion_scale=fusion_scale)
    block.expansion = FusionBottleneck.expansion
    stage_modules, _ = make_blocks(
        (block,) * len(layers), tuple(widths), tuple(layers), stem_width, avg_down=True,
        cardinality=cardinality, base_width=base_width, drop_path_rate=drop_path_rate, output_stride=32,
    )
    return [m for _, m in stage_modules]


class CifarNet(nn.Module):
    """Three-stage CIFAR network (strides 1, 2, 2) with the timm model interface."""

    def __init__(
            self,
            layers: Sequence[int] = (3, 3, 3),
            widths: Sequence[int] = (16, 32, 64),
            block: str = 'preact',
            res_stages: Sequence[int] = (0, 2),
            head_scale: float = 1.0,
            stem_width: int = 16,
            fusion: str = 'aff',
            fusion_r: int = 4,
            fusion_scale: float = 2.0,
            cardinality: int = 1,
            base_width: int = 64,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f'Unknown fusion {fusion!r}; choose one of {", ".join(FUSIONS)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.fusion_name = fusion
        self.grad_checkpointing = False
        self.head_scale = head_scale  # ResNet-9: logits x 0.125 (Page), which lets it train at lr 0.4
        preact = block == 'preact'

        stem = [('conv', nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False))]
        if not preact:
            stem += [('bn', nn.BatchNorm2d(stem_width)), ('act', nn.ReLU(inplace=True))]
        self.stem = nn.Sequential(OrderedDict(stem))

        if preact:
            stages = _preact_stages(layers, widths, stem_width, fusion, fusion_r, fusion_scale, drop_path_rate)
            out_chs = list(widths)
        elif block == 'conv_pool':
            stages = _conv_pool_stages(
                widths, stem_width, list(res_stages), fusion, fusion_r, fusion_scale, drop_path_rate)
            out_chs = list(widths)
        elif block == 'bottleneck':
            stages = _bottleneck_stages(
                layers, widths, stem_width, fusion, fusion_r, fusion_scale, drop_path_rate, cardinality, base_width)
            out_chs = [w * FusionBottleneck.expansion for w in widths]
        else:
            raise ValueError(f"block must be 'preact', 'conv_pool' or 'bottleneck', got {block!r}")
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = out_chs[-1]
        # Pre-activation nets end un-normalised: the final BN-ReLU belongs to the last feature.
        self.norm = nn.Sequential(nn.BatchNorm2d(out_chs[-1]), nn.ReLU(inplace=True)) if preact else nn.Identity()

        reductions = [2 ** (i + (block == 'conv_pool')) for i in range(len(out_chs))]
        self.total_stride = reductions[-1]
        # Module names as timm's FeatureListNet sees them (first-level Sequentials flattened).
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='stem.conv' if preact else 'stem.act')]
        self.feature_info += [
            dict(num_chs=c, reduction=r, module=f'stages.{i}') for i, (c, r) in enumerate(zip(out_chs, reductions))]
        if preact:
            self.feature_info[-1]['module'] = 'norm.1'

        self.global_pool_type = global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.init_weights(zero_init_last)

    def init_weights(self, zero_init_last: bool = True):
        """He init; with ``zero_init_last`` (timm's name) every selection fusion starts as the addition it
        replaces, since random attentions in a deep stack multiply the gradient (``zero_init_fusions``)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            zero_init_fusions(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new head; the pooling stays the network's own (ResNet-9: max) unless ``global_pool`` is given."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool_type = global_pool
        global_pool = self.global_pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def _check_input(self, x: torch.Tensor):
        check_image_batch(x, self.in_chans, self.total_stride)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features at the stem and after each stage (timm semantics: ``indices`` into those 4)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last_idx = len(self.stages)
        stages = self.stages if not stop_early else self.stages[:max_index]
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i == last_idx:
                x = self.norm(x)  # the last feature is the normalised one (pre-activation net)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if max_index < len(self.feature_info) - 1 and prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        if pre_logits:
            return x
        x = self.fc(x)
        return x * self.head_scale if self.head_scale != 1.0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar(variant: str, pretrained: bool = False, **kwargs) -> CifarNet:
    return build_aff_model(
        CifarNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


_BASE_ARCHS = {
    'resnet8': dict(layers=(1, 1, 1)),
    'resnet20': dict(layers=(3, 3, 3)),
    'resnet32': dict(layers=(5, 5, 5)),
    'resnet56': dict(layers=(9, 9, 9)),
    # The authors' AFF-ResNet-32 (channel_times=4; 96.3 % on CIFAR-10 in 400 epochs): ResNet-32 at 4x width.
    'resnet32_w4': dict(layers=(5, 5, 5), widths=(64, 128, 256), stem_width=64),
    'resnext20_32x4d': dict(
        layers=(2, 2, 2), widths=(64, 128, 256), block='bottleneck', stem_width=64,
        cardinality=32, base_width=4, fusion_r=16),
    'resnet9': dict(
        widths=(128, 256, 512), block='conv_pool', stem_width=64, res_stages=(0, 2), global_pool='max',
        head_scale=0.125),
    'resnet11': dict(
        widths=(128, 384, 512), block='conv_pool', stem_width=64, res_stages=(0, 1, 2), global_pool='max',
        head_scale=0.125),
}
_ARCHS = {
    f'{fusion}_{base}': dict(arch, fusion=fusion) for base, arch in _BASE_ARCHS.items() for fusion in FUSIONS
}

# pretrained_cfg fields that differ from cifar_cfg's: conv-pool networks pool three times, 32 -> 4
_CFG_OVERRIDES = {base: dict(pool_size=(4, 4)) for base, arch in _BASE_ARCHS.items()
                  if arch.get('block') == 'conv_pool'}

default_cfgs = {}
for _base in _BASE_ARCHS:
    default_cfgs.update(make_default_cfgs(
        [f'{fusion}_{_base}' for fusion in FUSIONS], partial(cifar_cfg, **_CFG_OVERRIDES.get(_base, {}))))


def _register(name: str):
    arch = _ARCHS[name]

    def entrypoint(pretrained: bool = False, **kwargs) -> CifarNet:
        return _create_cifar(name, pretrained, **dict(arch, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'CIFAR {name.split("_", 1)[1]} with {arch["fusion"]!r} fusion in every block.'
    globals()[name] = register_model(entrypoint)


for _name in _ARCHS:
    _register(_name)
