"""aff_zoo: Attentional Feature Fusion (Dai et al., WACV 2021) for timm and torch.hub.

``import aff_zoo`` registers every model with timm, so ``timm.create_model("aff_resnext50")`` works.
"""
from .layers.fusion import AFF, FUSIONS, MSCAM, AddFusion, LocalFusion, SEFusion, SKFusion, create_fusion, iAFF
from .layers.fpn import AFFFPN
from .models import AFFResNet, CifarNet, list_models
from .models.upcycle import upcycle
from .models.weights import WEIGHTS, Weights, available_tags

__version__ = '0.1.0'
