"""Flip test-time augmentation in ``evaluate``: checked against a hand-written mean of two softmaxes."""
import numpy as np
import timm
import torch

import aff_zoo  # noqa: F401  (registers the models, for their pretrained_cfg)
from aff_zoo.data import ImageArrays
from aff_zoo.training.evaluate import evaluate


def _random_set(n=40, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    return ImageArrays(images, labels, [f'{i}.png' for i in range(n)], [f'c{i}' for i in range(classes)], 'x', 'test')


def test_tta_flip_is_the_mean_softmax_of_image_and_mirror():
    torch.manual_seed(0)
    # a linear classifier on raw pixels: its predictions vary from image to image and change under a flip
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    model.pretrained_cfg = dict(timm.get_pretrained_cfg('aff_resnet8').to_dict())
    ds = _random_set()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    x = (torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        plain, mirrored = model(x), model(torch.flip(x, dims=[3]))
    both = (plain.softmax(1) + mirrored.softmax(1)) / 2
    # label every image with the two-view prediction: flip TTA must then score 100 %, single-view less
    ds.labels = both.argmax(1).numpy()
    y = torch.from_numpy(ds.labels)
    ref_top1 = 100. * (plain.argmax(1) == y).float().mean().item()
    ref_top5 = 100. * (plain.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert ref_top1 < 100  # the views disagree somewhere, so the test can tell them apart
    res = evaluate(model, ds, batch_size=16, channels_last=False, tta_flip=True)
    assert (res['top1'], res['top5']) == (round(ref_top1, 3), round(ref_top5, 3))  # headline: single view
    assert (res['top1_flip'], res['top5_flip']) == (100.0, 100.0)
    assert 'top1_flip' not in evaluate(model, ds, batch_size=16, channels_last=False)
