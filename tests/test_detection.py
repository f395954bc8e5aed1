"""torchvision's Faster R-CNN on an aff_zoo backbone with the AFF feature pyramid, on real (CIFAR-10) images."""
import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.models.detection import FasterRCNN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from _cifar_jpegs import cifar_images
from aff_zoo.models.detection import AFFBackboneWithFPN, aff_fasterrcnn
from aff_zoo.layers.fpn import AFFFPN

CANVAS, OBJ = 96, 48


def _scenes():
    """Two 96x96 scenes: a CIFAR airplane and a CIFAR automobile, upscaled to 48x48, pasted at known boxes."""
    imgs = cifar_images({'airplane': 1, 'automobile': 1})
    images, targets = [], []
    for label, (cls, (x0, y0)) in enumerate([('airplane', (8, 12)), ('automobile', (40, 36))], start=1):
        canvas = torch.full((3, CANVAS, CANVAS), 0.5)
        canvas[:, y0:y0 + OBJ, x0:x0 + OBJ] = TF.to_tensor(imgs[cls][0].resize((OBJ, OBJ)))
        images.append(canvas)
        targets.append(dict(boxes=torch.tensor([[x0, y0, x0 + OBJ, y0 + OBJ]], dtype=torch.float32),
                            labels=torch.tensor([label])))
    return images, targets


def test_faster_rcnn_trains_and_infers():
    torch.manual_seed(0)
    images, targets = _scenes()
    backbone = AFFBackboneWithFPN('aff_resnet8', out_indices=(2, 3), out_channels=64, fusion='aff')
    assert isinstance(backbone.fpn, AFFFPN) and backbone.out_channels == 64
    assert backbone.output_strides() == [2, 4, 8]
    model = FasterRCNN(
        backbone, num_classes=3, min_size=CANVAS, max_size=CANVAS,
        image_mean=[0.49, 0.48, 0.45], image_std=[0.25, 0.24, 0.26],
        rpn_anchor_generator=backbone.anchor_generator(), box_roi_pool=backbone.roi_pool())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    totals = []
    for _ in range(5):
        losses = model(images, targets)
        assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
        assert all(math.isfinite(v.item()) for v in losses.values()), losses
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals
    # the AFF merges of the pyramid were trained too
    assert all(p.grad is not None for p in backbone.fpn.fusions.parameters())

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert set(det) == {'boxes', 'labels', 'scores'}
        assert det['boxes'].shape[1] == 4 and len(det['boxes']) == len(det['scores']) == len(det['labels']) > 0
        assert (det['boxes'] >= 0).all() and (det['boxes'] <= CANVAS).all()
        assert set(det['labels'].tolist()) <= {1, 2}


@pytest.mark.parametrize('fusion', ['iaff', 'add'])
def test_imagenet_backbone_pyramid(fusion):
    """Default levels of an ImageNet model: strides 4..32 plus the max-pool level, all out_channels wide."""
    backbone = AFFBackboneWithFPN('aff_resnet50', out_channels=32, fusion=fusion).eval()
    assert backbone.in_channels_list == [256, 512, 1024, 2048]
    assert backbone.output_strides() == [4, 8, 16, 32, 64]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]


def test_aff_fasterrcnn_helper_and_errors():
    model = aff_fasterrcnn('iaff_resnet8', num_classes=4, out_channels=16, min_size=32, max_size=32).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.backbone.output_strides() == [1, 2, 4, 8]  # CIFAR net: every level but the stem
    with torch.no_grad():
        out = model([torch.rand(3, 32, 32)])
    assert set(out[0]) == {'boxes', 'labels', 'scores'}
    # P6/P7 extra levels are counted in the anchors
    body = AFFBackboneWithFPN('add_resnet8', out_channels=16, extra_blocks=LastLevelP6P7(16, 16))
    assert body.output_strides() == [1, 2, 4, 8, 16]
    assert len(body.anchor_generator().sizes) == 5
    with pytest.raises(TypeError, match='features_only'):
        AFFBackboneWithFPN(torch.nn.Conv2d(3, 3, 1))
