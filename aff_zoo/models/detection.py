"""aff_zoo backbones for torchvision's detection models: ``BackboneWithFPN`` with an AFF feature pyramid.

    backbone = AFFBackboneWithFPN('aff_resnet50', pretrained=True)     # timm features_only -> AFFFPN
    model = torchvision.models.detection.FasterRCNN(
        backbone, num_classes=3,
        rpn_anchor_generator=backbone.anchor_generator(), box_roi_pool=backbone.roi_pool())

or, in one call, ``aff_fasterrcnn('aff_resnet50', num_classes=3, pretrained_backbone=True)``.
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..layers.fpn import AFFFPN

__all__ = ['AFFBackboneWithFPN', 'aff_fasterrcnn']


def _default_out_indices(num_levels: int) -> Tuple[int, ...]:
    """Every level but the first (the stem, at stride 1-2, is too large and too shallow for a pyramid)."""
    return tuple(range(1, num_levels))


class AFFBackboneWithFPN(nn.Module):
    """A timm ``features_only`` aff_zoo model followed by ``AFFFPN``; has ``out_channels`` as torchvision needs.

    Args:
        backbone: a model name (``'aff_resnet50'``) or a timm ``features_only`` model.
        out_indices: feature levels fed to the pyramid (default: all but the stem).
        out_channels: channels of every pyramid level.
        fusion: top-down merge of the pyramid (``'aff'``, ``'iaff'``, ``'add'``, ...).
        extra_blocks: torchvision ``ExtraFPNBlock``; default ``LastLevelMaxPool`` (as ``BackboneWithFPN``).
        frozen_bn: freeze the backbone's BatchNorm (statistics and affine), usual for small detection batches.
        pretrained, **model_kwargs: passed to ``timm.create_model`` when ``backbone`` is a name.
    """

    def __init__(
            self,
            backbone: Union[str, nn.Module],
            out_indices: Optional[Sequence[int]] = None,
            out_channels: int = 256,
            fusion: str = 'aff',
            fusion_r: int = 4,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            frozen_bn: bool = False,
            pretrained: bool = False,
            **model_kwargs,
    ):
        super().__init__()
        if isinstance(backbone, str):
            if out_indices is None:
                with torch.device('meta'):  # structure only: no memory, no init cost
                    num_levels = len(timm.create_model(backbone, **model_kwargs).feature_info)
                out_indices = _default_out_indices(num_levels)
            backbone = timm.create_model(
                backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **model_kwargs)
        elif not hasattr(backbone, 'feature_info') or not hasattr(backbone.feature_info, 'channels'):
            raise TypeError(
                'backbone must be a model name or a timm features_only model '
                '(timm.create_model(name, features_only=True)), got ' + type(backbone).__name__)
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d
            backbone = freeze_batch_norm_2d(backbone)
        self.body = backbone
        self.in_channels_list = list(backbone.feature_info.channels())
        self.feature_reductions = list(backbone.feature_info.reduction())
        self.feature_names = [str(i) for i in range(len(self.in_channels_list))]  # torchvision's names
        self.fpn = AFFFPN(
            self.in_channels_list, out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer, fusion=fusion, fusion_r=fusion_r)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict([(n, f) for n, f in zip(self.feature_names, feats)]))

    def output_strides(self) -> List[int]:
        """Stride of every output level, the extra blocks' levels included."""
        strides = list(self.feature_reductions)
        extra = self.fpn.extra_blocks
        if isinstance(extra, LastLevelMaxPool):
            strides.append(strides[-1] * 2)
        elif isinstance(extra, LastLevelP6P7):
            strides += [strides[-1] * 2, strides[-1] * 4]
        elif extra is not None:
            raise ValueError(
                f'Unknown extra block {type(extra).__name__}: build the AnchorGenerator yourself, '
                'with one size tuple per output level.')
        return strides

    def anchor_generator(self, size_per_stride: int = 8, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
        """An ``AnchorGenerator`` with one anchor size (``size_per_stride`` x stride) per output level."""
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        strides = self.output_strides()
        return AnchorGenerator(
            sizes=tuple((size_per_stride * s,) for s in strides),
            aspect_ratios=(tuple(aspect_ratios),) * len(strides))

    def roi_pool(self, output_size: int = 7, sampling_ratio: int = 2) -> MultiScaleRoIAlign:
        """Faster R-CNN's box RoI pooling over the pyramid levels (not the extra ones), as torchvision does."""
        return MultiScaleRoIAlign(self.feature_names, output_size=output_size, sampling_ratio=sampling_ratio)


def aff_fasterrcnn(
        backbone: str,
        num_classes: int,
        pretrained_backbone: bool = False,
        fusion: str = 'aff',
        out_channels: int = 256,
        out_indices: Optional[Sequence[int]] = None,
        frozen_bn: bool = False,
        anchor_size_per_stride: int = 8,
        **faster_rcnn_kwargs,
):
    """torchvision ``FasterRCNN`` on an aff_zoo backbone with an AFF feature pyramid (``num_classes`` incl. background)."""
    from torchvision.models.detection import FasterRCNN
    body = AFFBackboneWithFPN(
        backbone, out_indices=out_indices, out_channels=out_channels, fusion=fusion,
        frozen_bn=frozen_bn, pretrained=pretrained_backbone)
    return FasterRCNN(
        body, num_classes=num_classes,
        rpn_anchor_generator=body.anchor_generator(anchor_size_per_stride), box_roi_pool=body.roi_pool(),
        **faster_rcnn_kwargs)
