"""AFF feature pyramid: torchvision's ``FeaturePyramidNetwork`` with an attentional top-down merge.

The paper's third use of AFF is the long skip connection of an FPN (Dai et al. 2021, Sec. 4.1):
``x`` is the low-level lateral feature, ``y`` the upsampled high-level one. ``AFFFPN`` keeps
torchvision's inputs, outputs and parameter names (``inner_blocks`` = lateral 1x1 convs,
``layer_blocks`` = 3x3 output convs, ``extra_blocks``) and adds one fusion module per merge.
With ``fusion='add'`` it computes exactly torchvision's FPN (the same state dict loads into it),
which is the comparison baseline.
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from .fusion import FUSIONS, create_fusion

__all__ = ['AFFFPN']


class AFFFPN(FeaturePyramidNetwork):
    """Feature pyramid whose top-down merge is ``fusion(lateral, upsample(top_down))``.

    torchvision's ``FeaturePyramidNetwork`` builds the lateral and output convs, their init, the old
    state-dict keys and the block getters; ``forward`` is its forward with the merge replaced (torchvision
    adds inline, with no method to override) and clear input errors.

    Args:
        in_channels_list: channels of each input level, highest resolution first.
        out_channels: channels of every pyramid level.
        extra_blocks: torchvision ``ExtraFPNBlock`` (e.g. ``LastLevelMaxPool``) applied after the pyramid.
        norm_layer: optional norm for the lateral and output convs (torchvision's argument).
        fusion: ``'aff'``, ``'iaff'``, ``'add'`` or any other name in ``aff_zoo.layers.fusion.FUSIONS``.
        fusion_r: MS-CAM channel reduction r.
        fusion_scale: output scale of the selection fusions (2 = behaves like addition at w = 0.5).
    """

    def __init__(
            self,
            in_channels_list: List[int],
            out_channels: int,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            fusion: str = 'aff',
            fusion_r: int = 4,
            fusion_scale: float = 2.0,
    ):
        if not in_channels_list or any(c <= 0 for c in in_channels_list):
            raise ValueError(f'in_channels_list must hold positive channel counts, got {in_channels_list}')
        if fusion not in FUSIONS:
            raise ValueError(f'Unknown fusion {fusion!r}; choose one of {", ".join(FUSIONS)}')
        if extra_blocks is not None and not isinstance(extra_blocks, ExtraFPNBlock):
            raise TypeError(f'extra_blocks should be of type ExtraFPNBlock, not {type(extra_blocks).__name__}')
        super().__init__(in_channels_list, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.fusion_name = fusion
        # fusions[i] merges level i (lateral) with the top-down path from level i + 1.
        self.fusions = nn.ModuleList([
            create_fusion(fusion, out_channels, r=fusion_r, scale=fusion_scale)
            for _ in range(len(in_channels_list) - 1)])

    def _fuse(self, lateral: torch.Tensor, top_down: torch.Tensor, idx: int) -> torch.Tensor:
        """``self.fusions[idx](lateral, top_down)``; TorchScript cannot index a ModuleList with a variable."""
        out = lateral
        for i, m in enumerate(self.fusions):
            if i == idx:
                out = m(lateral, top_down)
        return out

    def forward(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``OrderedDict`` of levels (highest resolution first) -> ``OrderedDict`` of pyramid levels."""
        names = list(x.keys())
        feats = list(x.values())
        if len(feats) != len(self.in_channels_list):
            raise ValueError(
                'AFFFPN was built for ' + str(len(self.in_channels_list)) + ' levels, got '
                + str(len(feats)) + ' (' + ', '.join(names) + ').')
        for i, f in enumerate(feats):
            if f.dim() != 4 or f.shape[1] != self.in_channels_list[i]:
                raise ValueError(
                    'AFFFPN level ' + names[i] + ' has shape ' + str(list(f.shape)) + ' but the pyramid expects '
                    + str(self.in_channels_list[i]) + ' channels there (in_channels_list='
                    + str(self.in_channels_list) + '). Build it from the backbone\'s feature_info.channels().')

        last = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            top_down = F.interpolate(last, size=lateral.shape[-2:], mode='nearest')
            last = self._fuse(lateral, top_down, idx)  # x = low-level lateral, y = high-level top-down
            results.insert(0, self.get_result_from_layer_blocks(last, idx))

        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict([(k, v) for k, v in zip(names, results)])
