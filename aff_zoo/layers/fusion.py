"""Attentional feature fusion (Dai et al., WACV 2021) and the baselines it is compared with.

Every fusion module has the same call, ``fusion(x, y) -> z`` for two tensors of one shape,
so a network picks its fusion by name (``create_fusion``) and an ablation is one flag away.
Roles follow the paper, not the authors' code: in a residual block ``x`` is the shortcut
(identity) and ``y`` the learned residual branch; in an FPN ``x`` is the low-level lateral
feature and ``y`` the upsampled high-level one.

Design decisions, each tested in ``tests/test_fusion.py``:

* **Output scale.** Selection fusions compute ``scale * (w * x + (1 - w) * y)``. The default
  ``scale=2`` makes a selection with ``w = 0.5`` equal to ``x + y``. The authors' code uses 2 for AFF
  and (by oversight, their issue #13) 1 for iAFF; here AFF, iAFF, SK-style and local-only all
  share one ``scale`` argument and one default. iAFF's first (inner) AFF uses the same scale,
  since its output stands in for ``x + y``. Pass ``scale=1.0`` for the paper's Eq. 4-5.
* **Initialisation.** ``zero_init_last()`` zeroes the attention's last layers, so ``w = 0.5`` and
  the fusion is exactly the addition it replaces; the models do this by default (timm's
  ``zero_init_last``). Random attentions multiply the gradient through a deep stack: 15 iAFF
  blocks (``iaff_resnet32``) grew the stem weights 400x within 96 steps; the 4x wide one reached
  BN running variances of 1e21 in its first epoch, and on a GPU its validation losses were NaN.
* **Batch size 1.** The global branch normalises with a LayerNorm over its hidden units instead
  of BatchNorm: after global pooling a batch of N holds only N values per channel, so BN there
  fails at N=1 in training (the authors' issues #15/#43/#44) and is noisy for small N. The local
  branch works at full resolution and keeps its BatchNorms.
* **No dead parameters.** Convolutions followed by BatchNorm carry no bias (its gradient is
  zero); iAFF's second MS-CAM has its own local *and* global branch, both used (the existing
  PyTorch port leaves the second global branch unused).
* **Speed** (``tests/test_fast.py``; measured by ``aff-zoo benchmark``, see the README's Speed
  section): the global branch runs on the pooled N x C matrix, the sigmoid and the blend are one
  step (``sigmoid_blend``; a hand-written backward in training), ``fuse_for_inference`` folds the
  local branch's BatchNorms for inference.
"""
from typing import Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = [
    'MSCAM', 'AFF', 'iAFF', 'AddFusion', 'SEFusion', 'SKFusion', 'LocalFusion',
    'FUSIONS', 'create_fusion', 'bottleneck_width', 'blend', 'sigmoid_blend', 'fuse_for_inference', 'zero_init_fusions',
]


def bottleneck_width(channels: int, r: int, min_channels: int = 4) -> int:
    """Hidden width C/r of the attention bottleneck, never below ``min_channels``."""
    if channels < 1 or r < 1:
        raise ValueError(f'channels and r must be positive, got channels={channels}, r={r}')
    return max(channels // r, min(min_channels, channels))


@register_notrace_function  # FX leaf (its branches test dtypes and strides); see torch.fx.wrap below
def blend(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, scale: float, reuse_w: bool = False) -> torch.Tensor:
    """``scale * (w*x + (1-w)*y)`` as ``lerp(y, x, w) * scale``: one pass and no temporary for ``x - y``
    (``torch.lerp``), then an in-place scale (the lerp's output is not saved for backward).

    ``reuse_w=True`` (inference, ``w`` a full-size tensor nobody else holds) writes the result into
    ``w``'s memory: a fresh full-size output costs page faults that, at ImageNet stage-3 sizes on a
    CPU, took longer than the lerp itself."""
    if x.dtype == y.dtype and y.dtype == w.dtype:
        if reuse_w and w.shape == x.shape and w.stride() == x.stride() and w.stride() == y.stride():
            out = torch.lerp(y, x, w, out=w)
        else:
            out = torch.lerp(y, x, w)
    else:  # mixed precision without autocast: addcmul promotes, lerp would refuse
        out = torch.addcmul(y, w, x - y)
    if scale != 1.0:
        out = out.mul_(scale)
    return out


class _SigmoidBlend(torch.autograd.Function):
    """``scale * lerp(y, x, sigmoid(logits))`` with a hand-written backward for training.

    Autograd's own backward of sigmoid -> lerp -> scale makes 9 full-size passes (lerp alone
    builds ``1 - w`` in three); this one makes 6, allocates 3 and saves only ``x``, ``y`` and ``w``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, scale: float) -> torch.Tensor:
        w = torch.sigmoid(logits)
        out = torch.lerp(y, x, w)
        if scale != 1.0:
            out.mul_(scale)
        ctx.save_for_backward(x, y, w)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, w = ctx.saved_tensors
        own = ctx.scale != 1.0  # ``a`` is our own buffer (else it is ``grad``, which we must not overwrite)
        a = grad * ctx.scale if own else grad
        # dlogits = a * (x - y) * w * (1 - w), written into one new buffer
        dlogits = torch.sub(x, y).mul_(a)
        torch.ops.aten.sigmoid_backward.grad_input(dlogits, w, grad_input=dlogits)
        dx = a * w
        dy = a.sub_(dx) if own else a - dx
        return dx, dy, dlogits, None


@register_notrace_function  # FX leaf (its branches test shapes, dtypes, grad mode); see torch.fx.wrap below
def sigmoid_blend(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``blend(x, y, sigmoid(logits), scale)``; consumes ``logits`` (overwritten when no gradient is needed)."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled():
        return blend(x, y, logits.sigmoid_(), scale, reuse_w=not torch.is_grad_enabled())
    if logits.shape == x.shape and x.shape == y.shape and x.dtype == y.dtype and y.dtype == logits.dtype:
        return _sigmoid_blend_autograd(x, y, logits, scale)
    return blend(x, y, torch.sigmoid(logits), scale)


@torch.jit.unused
def _sigmoid_blend_autograd(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, scale: float) -> torch.Tensor:
    return _SigmoidBlend.apply(x, y, logits, scale)


def _conv1x1(in_chs: int, out_chs: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=bias)


class _LocalContext(nn.Sequential):
    """L(X) = BN(PWConv2(ReLU(BN(PWConv1(X))))) at full resolution (paper Eq. 2)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = _conv1x1(channels, hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv1x1(hidden, channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    @torch.no_grad()
    def fuse(self):
        """Fold both BatchNorms (eval statistics) into the convolutions; BNs become ``Identity``. Idempotent."""
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.conv1 = _fold_bn(self.conv1, self.bn1)
            self.bn1 = nn.Identity()
        if isinstance(self.bn2, nn.BatchNorm2d):
            self.conv2 = _fold_bn(self.conv2, self.bn2)
            self.bn2 = nn.Identity()


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x C mean. As ``sum * (1/HW)``: the backward of a sum is a broadcast view, that of
    ``mean`` a full-size division whose output is NCHW even for channels_last inputs (slow mixed-format adds)."""
    return x.sum((2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))


@register_notrace_function  # FX leaf: the check stays in the traced graph; see torch.fx.wrap below
def check_attention_input(x: torch.Tensor, channels: int) -> None:
    """A clear error for a wrong-sized input (instead of a convolution shape error deep in the branch)."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError('MSCAM expects an N x ' + str(channels) + ' x H x W tensor, got shape ' + str(list(x.shape)))


# FX leaves for every tracer: timm's register_notrace_function reaches only timm's tracer; torch.fx.wrap
# (by the global name in this module, so it must sit here at top level) reaches symbolic_trace and
# torchvision's create_feature_extractor too. torch.export and torch.compile trace through these functions.
torch.fx.wrap('blend')
torch.fx.wrap('sigmoid_blend')
torch.fx.wrap('check_attention_input')


class _GlobalContext(nn.Module):
    """g(X) = PWConv2(ReLU(LN(PWConv1(GAP(X))))) on the pooled vector.

    The paper has BN where we have LN (a LayerNorm over the C/r hidden units of each sample):
    BN after global pooling fails at batch size 1. Dropping the norm altogether is worse: with
    a bottleneck of 4 units, all of them start inactive in about 1 of 16 MS-CAMs and that
    branch never gets a gradient; normalising across the units keeps some of them active.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = _conv1x1(channels, hidden, bias=False)
        self.norm = nn.GroupNorm(1, hidden)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv1x1(hidden, channels, bias=True)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The N x C' vector of global logits. Computed on the pooled N x C matrix: two small matmuls
        (the 1x1 convolutions' weights as matrices) instead of convolutions over 1x1 maps."""
        x = _spatial_mean(x)
        x = self.act(self.norm(F.linear(x, self.conv1.weight.flatten(1), self.conv1.bias)))
        return F.linear(x, self.conv2.weight.flatten(1), self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(x)[:, :, None, None]


class MSCAM(nn.Module):
    """Multi-scale channel attention: ``M(X) = sigmoid(L(X) + g(X))`` (paper Eq. 3).

    Returns the attention map M(X) of X's shape (N x C x 1 x 1 when only the global branch is used);
    the paper's refined feature is ``X * MSCAM(X)``.
    """

    def __init__(
            self,
            channels: int,
            r: int = 4,
            use_local: bool = True,
            use_global: bool = True,
            min_channels: int = 4,
    ):
        super().__init__()
        if not (use_local or use_global):
            raise ValueError('MSCAM needs at least one of the local and global branches')
        hidden = bottleneck_width(channels, r, min_channels)
        self.channels = channels
        self.local_att = _LocalContext(channels, hidden) if use_local else None
        self.global_att = _GlobalContext(channels, hidden) if use_global else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``L(X) + g(X)`` before the sigmoid."""
        check_attention_input(x, self.channels)
        if self.local_att is not None and self.global_att is not None:
            # In place: the local branch's last output (BN or, once fused, conv) is not saved for backward.
            return self.local_att(x).add_(self.global_att(x))
        if self.local_att is not None:
            return self.local_att(x)
        assert self.global_att is not None
        return self.global_att(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``logits`` is a fresh tensor nobody else holds, so the sigmoid can overwrite it.
        return self.logits(x).sigmoid_()

    def blend(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * (M(s)*x + (1-M(s))*y)`` in one step (fused sigmoid-and-blend)."""
        return sigmoid_blend(x, y, self.logits(s), scale)

    @torch.no_grad()
    def zero_logits(self) -> None:
        """Zero each branch's last layer (local BN gamma and beta, global conv2): logits 0, ``M = 0.5``."""
        if self.local_att is not None:
            self.local_att.bn2.weight.zero_()
            self.local_att.bn2.bias.zero_()
        if self.global_att is not None:
            self.global_att.conv2.weight.zero_()
            self.global_att.conv2.bias.zero_()


class AddFusion(nn.Module):
    """Plain addition ``x + y``: the residual connection AFF replaces."""

    def __init__(self, channels: int = 0, r: int = 4, scale: float = 2.0):
        super().__init__()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class _Selection(nn.Module):
    """``scale * (w*x + (1-w)*y)`` with ``w = attention(x + y)``: soft selection between the inputs."""

    def __init__(self, attention: nn.Module, scale: float):
        super().__init__()
        self.att = attention
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.att.blend(x, y, x + y, self.scale)

    def zero_init_last(self) -> None:
        """Equal weights for both inputs: with ``scale=2`` the fusion computes ``x + y``. The name is timm's
        hook: ``ResNet.init_weights(zero_init_last=True)`` calls it, as it does the blocks' own."""
        self.att.zero_logits()


class AFF(_Selection):
    """Attentional feature fusion, paper Eq. 4: ``Z = M(X+Y)*X + (1-M(X+Y))*Y`` (times ``scale``)."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0):
        super().__init__(MSCAM(channels, r), scale)


class LocalFusion(_Selection):
    """AFF with a local-only MS-CAM (no global branch): the 'local context only' ablation."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0):
        super().__init__(MSCAM(channels, r, use_global=False), scale)


class _TwoWaySoftmax(_GlobalContext):
    """SKNet's selection weights: global context -> one logit per input and channel -> softmax over the two."""

    def __init__(self, channels: int, r: int):
        super().__init__(channels, bottleneck_width(channels, r))
        self.channels = channels
        self.conv2 = _conv1x1(self.conv2.in_channels, 2 * channels, bias=True)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        logits = self.context(s)
        logits = logits.view(logits.shape[0], 2, self.channels, 1, 1)
        return torch.softmax(logits, dim=1)[:, 0]

    def blend(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
        return blend(x, y, self.forward(s), scale)

    @torch.no_grad()
    def zero_logits(self) -> None:
        """Equal logits for both inputs: softmax 0.5 / 0.5."""
        self.conv2.weight.zero_()
        self.conv2.bias.zero_()


class SKFusion(_Selection):
    """SK-style selection: global context only, softmax over the two inputs (Li et al., SKNet, 2019)."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0):
        super().__init__(_TwoWaySoftmax(channels, r), scale)


class SEFusion(nn.Module):
    """SE-style: global channel attention refines the residual, then adds: ``x + y * sigmoid(g(y))``."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0):
        super().__init__()
        self.att = MSCAM(channels, r, use_local=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, y, self.att(y))


class iAFF(nn.Module):
    """Iterative AFF, paper Eq. 5: the initial ``X+Y`` is replaced by a first AFF with its own MS-CAM.

    ``xi = s*(M1(X+Y)*X + (1-M1)*Y)``, ``Z = s*(M2(xi)*X + (1-M2(xi))*Y)`` with ``s = scale``.
    """

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0):
        super().__init__()
        self.att1 = MSCAM(channels, r)
        self.att2 = MSCAM(channels, r)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xi = self.att1.blend(x, y, x + y, self.scale)
        return self.att2.blend(x, y, xi, self.scale)

    def zero_init_last(self) -> None:
        """The outer MS-CAM only: its weights decide the output, so that is ``x + y`` whatever the inner AFF
        gives; the inner one keeps its random start and gets gradients from the second step on (zeroing it
        too would block its own inner layers until the third)."""
        self.att2.zero_logits()


def zero_init_fusions(model: nn.Module) -> int:
    """``zero_init_last()`` on every selection fusion (AFF, iAFF, local-only, SK) in ``model``, so that each
    starts as the addition it replaces (with ``scale=2``); returns how many. Without it, a deep stack of
    randomly initialised attentions multiplies the gradient: ``iaff_resnet32``'s stem weights grew 400x in
    its first 96 steps (docs/cifar10-weights.md). Additions and SE are left as they are. timm's
    ``ResNet.init_weights`` does the same for the ImageNet models (the method name is its hook)."""
    fusions = [m for m in model.modules() if isinstance(m, (_Selection, iAFF))]
    for m in fusions:
        m.zero_init_last()
    return len(fusions)


FUSIONS: Dict[str, Type[nn.Module]] = {
    'add': AddFusion,
    'se': SEFusion,
    'sk': SKFusion,
    'local': LocalFusion,
    'aff': AFF,
    'iaff': iAFF,
}


def create_fusion(name: str, channels: int, r: int = 4, scale: float = 2.0) -> nn.Module:
    """Build a fusion module by name: one of ``FUSIONS`` (add, se, sk, local, aff, iaff)."""
    if name not in FUSIONS:
        raise ValueError(f'Unknown fusion {name!r}; choose one of {", ".join(FUSIONS)}')
    return FUSIONS[name](channels, r=r, scale=scale)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A 1x1 convolution with ``bn`` (eval statistics) folded into its weight and bias (memory format kept)."""
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    return fused.to(memory_format=torch.channels_last) if channels_last else fused


def fuse_for_inference(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm of every MS-CAM local branch into its 1x1 convolutions, in place; idempotent.

    For inference only (the module must be in eval mode: the running statistics are folded in, so
    training the result would train a different network): the folded module computes the eval-mode
    original's function (to float rounding) without two passes over each full-size tensor. The
    state_dict changes (conv biases, no BN entries): fold after loading weights. Returns ``module``.
    """
    if module.training:
        raise ValueError('fuse_for_inference folds eval-mode BatchNorm statistics: call module.eval() first')
    for m in module.modules():
        if isinstance(m, _LocalContext):
            m.fuse()
    return module
