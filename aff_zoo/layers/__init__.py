"""The lowest layer: the fusion modules (MS-CAM, AFF, iAFF and the baselines) and the AFF feature pyramid."""
from .fusion import AFF, FUSIONS, MSCAM, AddFusion, LocalFusion, SEFusion, SKFusion, create_fusion, iAFF
from .fpn import AFFFPN
