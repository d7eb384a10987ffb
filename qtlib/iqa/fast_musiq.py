"""MUSIQ with batched multi-scale preprocessing: pyiqa's tokens for a whole batch, padding dropped.

pyiqa's ``MUSIQ.forward`` (eval mode) calls
``pyiqa.data.multiscale_trans_util.get_multiscale_patches`` on every call: for
each scale (longer side 224 and 384, then the original resolution) a bicubic
resize with the aspect ratio kept, TF-``SAME`` padding and ``F.unfold`` into
32x32 patches, the hash-based spatial position of every patch computed anew with
``F.interpolate`` on a grid, everything concatenated as *floats* into one
``(B, 3 * 32 * 32 + 3, L)`` tensor (patches, spatial index, scale index, mask),
padded with zero tokens to ``ceil(longer / 32) ** 2`` per scale and transposed;
the arch then slices the three index rows back out, casts them to integers and
copies the non-contiguous patch slice into the stem. Padded tokens go through
the stem and every transformer layer and are masked in attention
(``masked_fill(-1e3)`` over the full ``B x heads x L x L`` matrix).

:class:`FastMUSIQ` computes the same function for a batch of equal-size images
(all blocks of a batch):

- the same bicubic ``F.interpolate`` per scale on the whole batch (bit-identical
  resized pixels), then patches by ``reshape``/``permute`` of the padded image
  straight into the stem's ``(N, 3, 32, 32)`` layout (the values ``F.unfold``
  gives; ``F.unfold`` is used when the stride differs from the patch size);
- spatial and scale indices as integer tensors, computed with pyiqa's own
  hashing function once per image size and cached;
- padded tokens dropped instead of masked. This is exact up to float rounding:
  pyiqa's mask gives a padded key the logit -1e3, whose softmax weight
  ``exp(-1e3 - max)`` is 0 in float32 whenever the valid logits exceed -897
  (they are O(1-10) for MUSIQ), and the CLS output (the score) depends only on
  valid tokens. Square images have no padded tokens at any scale; for non-square
  ones this also removes their stem and transformer compute.
- attention without a mask through ``F.scaled_dot_product_attention`` (fused
  kernel; same arithmetic, different summation order);
- the stem (root conv, SAME max pool, bottleneck) bit-identical to pyiqa's, without
  pyiqa's zero-width ``F.pad`` copies before its 1x1 convolutions and with the max
  pool on a channels-last copy on CPU (exact; PyTorch's NCHW CPU max pool was 20%
  of the stem).

Where the time goes (CPU, one thread, 8 blocks of 96 px, 202 tokens each): the
stem ~55%, the transformer ~40%, pyiqa's preprocessing ~5%. The arithmetic is
the model's, so on CPU the gain is small for square blocks and larger for
non-square ones (``benchmarks/bench_musiq.py``, one thread, 16 blocks, medians
of 5 interleaved: 1.14x for 96x96 blocks, 1.45x for 96x128 ones). On a GPU the
preprocessing, copies and full-matrix masking are memory-bound rather than
arithmetic and may weigh more; that has not been measured yet
(``python benchmarks/bench_musiq.py --device cuda``).

Scores agree with pyiqa's MUSIQ arch within :data:`TOLERANCE` (measured with
random weights in ``tests/test_iqa_fast.py``, several batches, 96-224 px,
square and non-square). In training mode (pyiqa expects pre-patchified input
there) and when a caller passes its own tokens (3- or 4-D input), the call goes
to pyiqa's arch unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyiqa.archs.arch_util import dist_to_mos
from pyiqa.data.multiscale_trans_util import get_hashed_spatial_pos_emb_index
from torch import Tensor, nn

TOLERANCE = 1e-4
"""Largest accepted |fast - pyiqa| of a MUSIQ score relative to max(1, |score|) (float32 rounding;
measured with random weights: at most 6.6e-7, scores -0.6 to -1.6, see tests/test_iqa_fast.py)."""


class _Scale:
    """Token layout of one scale for one input size: resize target, padding, indices."""

    def __init__(self, h: int, w: int, longer: int | None, scale_id: int, max_len: int,
                 patch: int, stride: int, grid: int) -> None:
        if longer is None:
            self.size = None
            rh, rw = h, w
        else:
            ratio = longer / max(h, w)
            rh, rw = round(h * ratio), round(w * ratio)  # pyiqa: Python round (half to even)
            self.size = (rh, rw)
        self.rh, self.rw = rh, rw
        self.count_h, self.count_w = math.ceil(rh / stride), math.ceil(rw / stride)
        pad_row = (self.count_h - 1) * stride + patch - rh
        pad_col = (self.count_w - 1) * stride + patch - rw
        self.pad = (pad_col // 2, pad_col - pad_col // 2, pad_row // 2, pad_row - pad_row // 2)
        n = self.count_h * self.count_w
        spatial = get_hashed_spatial_pos_emb_index(grid, self.count_h, self.count_w).reshape(-1).long()
        # pyiqa pads with zero tokens (masked) or cuts to max_len; max_len < 0 keeps all patches
        self.keep = n if max_len < 0 else min(n, max_len)
        self.spatial = spatial[: self.keep]
        self.scale = torch.full((self.keep,), scale_id, dtype=torch.long)


class FastMUSIQ(nn.Module):
    """Drop-in for pyiqa's ``MUSIQ`` arch: same parameters, batched preprocessing, no padded tokens.

    Args:
        arch: the built ``pyiqa.archs.musiq_arch.MUSIQ`` (kept as a submodule, so its
            parameters, device and dtype are this module's).
    """

    def __init__(self, arch: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        opts = arch.data_preprocess_opts
        self.patch = int(opts["patch_size"])
        self.stride = int(opts["patch_stride"])
        self.grid = int(opts["hse_grid_size"])
        self.longer = sorted(opts["longer_side_lengths"])  # pyiqa sorts too (scale ids)
        self.max_orig = opts["max_seq_len_from_original_res"]
        self._layouts: dict[tuple[int, int], list[_Scale]] = {}
        self._indices: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def layout(self, h: int, w: int) -> list[_Scale]:
        """The scales (resize, padding, positions) of an ``h x w`` input, cached per size."""
        key = (h, w)
        if key not in self._layouts:
            if len(self._layouts) >= 512:  # native-size labeling sees many sizes: keep the cache bounded
                self._layouts.clear()
                self._indices.clear()
            scales = [
                _Scale(h, w, longer, i, int(math.ceil(longer / self.stride) ** 2), self.patch, self.stride, self.grid)
                for i, longer in enumerate(self.longer)
            ]
            if self.max_orig is not None:
                scales.append(_Scale(h, w, None, len(self.longer), int(self.max_orig),
                                     self.patch, self.stride, self.grid))
            self._layouts[key] = scales
        return self._layouts[key]

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Multi-scale patches of a batch in [-1, 1]: ``(B, L, 3, P, P)``, spatial ``(L,)``, scale ``(L,)``.

        ``L`` counts only the valid tokens (pyiqa's tokens without its zero padding),
        in pyiqa's order.
        """
        b, c, h, w = x.shape
        p, s = self.patch, self.stride
        patches = []
        for sc in self.layout(h, w):
            img = x if sc.size is None else F.interpolate(x, sc.size, mode="bicubic", align_corners=False)
            img = F.pad(img, sc.pad) if any(sc.pad) else img
            if s == p:
                t = img.reshape(b, c, sc.count_h, p, sc.count_w, p).permute(0, 2, 4, 1, 3, 5)
                t = t.reshape(b, sc.count_h * sc.count_w, c, p, p)
            else:
                t = F.unfold(img, p, stride=s).transpose(1, 2).reshape(b, -1, c, p, p)
            patches.append(t[:, : sc.keep])
        key = (h, w, x.device)
        if key not in self._indices:  # once per size and device: no per-call index math or copies
            scales = self.layout(h, w)
            self._indices[key] = (torch.cat([sc.spatial for sc in scales]).to(x.device),
                                  torch.cat([sc.scale for sc in scales]).to(x.device))
        return torch.cat(patches, 1), *self._indices[key]

    def forward(self, x: Tensor, return_mos: bool = True, return_dist: bool = False):  # pyiqa's signature
        if self.training or x.dim() != 4:
            return self.arch(x, return_mos=return_mos, return_dist=return_dist)
        a = self.arch
        patches, spatial, scale = self.tokens((x - 0.5) * 2)
        b, n = patches.shape[:2]
        t = patches.reshape(b * n, *patches.shape[2:])
        t = _stem(a, t)
        t = a.embedding(t.permute(0, 2, 3, 1).reshape(b, n, -1))  # TF channel order, as pyiqa
        t = _encode(a.transformer_encoder, t, spatial, scale)
        q = a.head(t[:, 0])  # one crop per image: pyiqa's mean over crops is the identity
        mos = dist_to_mos(q)
        out = [v for v, want in ((mos, return_mos), (q, return_dist)) if want]
        return out if len(out) > 1 else out[0]


def _std_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """pyiqa's ``StdConv.forward`` (TF-SAME zero padding, standardized weight), skipping an all-zero pad."""
    pad = _same_pad(x.shape[-2:], conv.kernel_size, conv.stride)
    x = F.pad(x, pad) if any(pad) else x
    weight = conv.weight - conv.weight.mean((1, 2, 3), keepdim=True)
    weight = weight / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
    return F.conv2d(x, weight, conv.bias, conv.stride)


def _same_pad(hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    (h, w), (kh, kw), (sh, sw) = hw, kernel, stride
    rows = max((math.ceil(h / sh) - 1) * sh + kh - h, 0)
    cols = max((math.ceil(w / sw) - 1) * sw + kw - w, 0)
    return cols // 2, cols - cols // 2, rows // 2, rows - rows // 2


def _stem(a: nn.Module, x: Tensor) -> Tensor:
    """pyiqa's root conv, ReLU, SAME max pool and bottleneck on ``(N, 3, P, P)`` patches.

    Differences are exact: 1x1 convolutions skip pyiqa's zero-width ``F.pad`` copy, and
    the max pool runs on a channels-last copy (a max has no rounding; PyTorch's
    channels-last CPU kernel is several times faster than the NCHW one here).
    """
    x = a.gn_root(_std_conv(a.conv_root, x)).relu_()
    pool = a.root_pool[-1]
    x = F.pad(x, _same_pad(x.shape[-2:], _pair(pool.kernel_size), _pair(pool.stride)))
    if x.device.type == "cpu":
        x = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), pool.kernel_size, pool.stride)
        x = x.contiguous()
    else:
        x = F.max_pool2d(x, pool.kernel_size, pool.stride)
    blk = a.block1
    identity = blk.gn_proj(_std_conv(blk.conv_proj, x)) if blk.needs_projection else x
    y = blk.relu(blk.gn1(_std_conv(blk.conv1, x)))
    y = blk.relu(blk.gn2(_std_conv(blk.conv2, y)))
    y = blk.gn3(_std_conv(blk.conv3, y))
    return blk.relu(y + identity)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _attention(att: nn.Module, x: Tensor) -> Tensor:
    b, n, c = x.shape
    heads = att.num_heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    drop = att.attn_drop.p if att.training else 0.0
    y = F.scaled_dot_product_attention(split(att.query(x)), split(att.key(x)), split(att.value(x)),
                                       dropout_p=drop, scale=att.scale)
    return att.out_drop(att.out(y.transpose(1, 2).reshape(b, n, c)))


def _encode(enc: nn.Module, x: Tensor, spatial: Tensor, scale: Tensor) -> Tensor:
    """pyiqa's ``TransformerEncoder.forward`` for all-valid tokens (no mask)."""
    x = x + enc.posembed_input.position_emb.squeeze(0)[spatial]
    if enc.use_scale_emb:
        x = x + enc.scaleembed_input.scale_emb[scale]
    x = torch.cat([enc.cls.expand(x.shape[0], -1, -1), x], dim=1)
    x = enc.dropout(x)
    for block in enc.transformer.values():
        x = x + block.drop_path(_attention(block.attention, block.norm1(x)))
        x = x + block.drop_path(block.mlp(block.norm2(x)))
    return enc.encoder_norm(x)
