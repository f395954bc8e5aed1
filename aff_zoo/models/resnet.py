"""ImageNet-size AFF / iAFF ResNet and ResNeXt (paper Table 5), built on timm's ResNet.

The authors' ImageNet design ("bag of tricks" re-implementation): ResNet-D layout (deep 3x3
stem, average-pool downsampling in the shortcut), AFF replacing the residual addition of the
bottleneck blocks in the last two stages only, MS-CAM reduction r = 16. Reusing timm's
``ResNet`` gives every timm feature (features_only, forward_intermediates, grad checkpointing,
reset_classifier, ...) with timm's own semantics.

Deviation, on purpose: the authors' ResNeXt stem was 64 wide (64, 64, 128); we use timm's
ResNet-D stem (32, 32, 64) for all four so that ``resnet50d`` and ``resnext50d_32x4d`` are
exact plain-addition peers. It costs the ResNeXt 0.09 M parameters against the paper's count
(still within 1%) and saves 0.7 GMACs.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, register_model
from timm.models.resnet import Bottleneck, ResNet

from ..layers.fusion import AddFusion, create_fusion
from ._builder import build_aff_model, check_image_batch, imagenet_cfg, make_default_cfgs

torch.fx.wrap('check_image_batch')  # an FX leaf in every tracer (by name in this module; see _builder)

__all__ = ['FusionBottleneck', 'AFFResNet']


class FusionBottleneck(Bottleneck):
    """timm's bottleneck with the residual addition replaced by a fusion module ``fusion(shortcut, residual)``."""

    def __init__(self, *args, fusion: str = 'add', fusion_r: int = 16, fusion_scale: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusion = create_fusion(fusion, self.conv3.out_channels, r=fusion_r, scale=fusion_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if isinstance(self.fusion, AddFusion):
            x += shortcut  # timm's own in-place residual addition: plain stages cost exactly what timm's do
        else:
            x = self.fusion(shortcut, x)
        x = self.act3(x)
        return x


class AFFResNet(ResNet):
    """timm ResNet whose stages ``fusion_stages`` (0-based) fuse with ``fusion`` instead of adding."""

    def __init__(
            self,
            layers: Sequence[int],
            fusion: str = 'aff',
            fusion_r: int = 16,
            fusion_scale: float = 2.0,
            fusion_stages: Sequence[int] = (2, 3),
            zero_init_last: bool = True,
            **kwargs,
    ):
        super().__init__(block=FusionBottleneck, layers=layers, zero_init_last=zero_init_last, **kwargs)
        self.fusion_name = fusion
        self.in_chans = kwargs.get('in_chans', 3)
        self.total_stride = self.feature_info[-1]['reduction']
        for stage_idx in fusion_stages:
            for block in getattr(self, f'layer{stage_idx + 1}'):
                block.fusion = create_fusion(fusion, block.conv3.out_channels, r=fusion_r, scale=fusion_scale)
        self.init_weights(zero_init_last=zero_init_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``ResNet.forward_features`` after an input check (a clear error instead of a conv shape error)."""
        check_image_batch(x, self.in_chans, self.total_stride)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        check_image_batch(x, self.in_chans, self.total_stride)
        return super().forward_intermediates(x, *args, **kwargs)


def _create_aff_resnet(variant: str, pretrained: bool = False, **kwargs) -> AFFResNet:
    return build_aff_model(AFFResNet, variant, pretrained, **kwargs)


_RESNET_D = dict(stem_width=32, stem_type='deep', avg_down=True)
_RESNEXT = dict(cardinality=32, base_width=4)
_ARCHS = {
    'aff_resnet50': dict(layers=(3, 4, 6, 3), fusion='aff', **_RESNET_D),
    'aff_resnext50': dict(layers=(3, 4, 6, 3), fusion='aff', **_RESNET_D, **_RESNEXT),
    'iaff_resnet50': dict(layers=(3, 4, 6, 3), fusion='iaff', **_RESNET_D),
    'iaff_resnext50': dict(layers=(3, 4, 6, 3), fusion='iaff', **_RESNET_D, **_RESNEXT),
    'aff_resnet101': dict(layers=(3, 4, 23, 3), fusion='aff', **_RESNET_D),
    'aff_resnext101': dict(layers=(3, 4, 23, 3), fusion='aff', **_RESNET_D, **_RESNEXT),
    'iaff_resnet101': dict(layers=(3, 4, 23, 3), fusion='iaff', **_RESNET_D),
    'iaff_resnext101': dict(layers=(3, 4, 23, 3), fusion='iaff', **_RESNET_D, **_RESNEXT),
}

default_cfgs = make_default_cfgs(_ARCHS, imagenet_cfg)


def _model(name: str, pretrained: bool, kwargs) -> AFFResNet:
    return _create_aff_resnet(name, pretrained, **dict(_ARCHS[name], **kwargs))


@register_model
def aff_resnet50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNet-50: ResNet-50-D with AFF (r=16) in stages 3-4. Paper: 30.3 M params, 20.9% top-1 err."""
    return _model('aff_resnet50', pretrained, kwargs)


@register_model
def aff_resnext50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNeXt-50-32x4d (D stem/shortcut) with AFF in stages 3-4. Paper: 29.9 M, 20.8%."""
    return _model('aff_resnext50', pretrained, kwargs)


@register_model
def iaff_resnet50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNet-50: ResNet-50-D with iterative AFF in stages 3-4. Paper: 35.1 M, 20.4%."""
    return _model('iaff_resnet50', pretrained, kwargs)


@register_model
def iaff_resnext50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNeXt-50-32x4d with iterative AFF in stages 3-4. Paper: 34.7 M, 20.2%."""
    return _model('iaff_resnext50', pretrained, kwargs)


@register_model
def aff_resnet101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNet-101-D (layers 3-4-23-3; the authors define it, report no result)."""
    return _model('aff_resnet101', pretrained, kwargs)


@register_model
def aff_resnext101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNeXt-101-32x4d, D stem/shortcut."""
    return _model('aff_resnext101', pretrained, kwargs)


@register_model
def iaff_resnet101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNet-101-D."""
    return _model('iaff_resnet101', pretrained, kwargs)


@register_model
def iaff_resnext101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNeXt-101-32x4d, D stem/shortcut."""
    return _model('iaff_resnext101', pretrained, kwargs)
