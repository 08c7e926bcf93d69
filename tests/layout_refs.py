"""Independent reference models for layouts whose own code cannot run here, written for these
tests from the layouts' published semantics (not from vitconv.model): timm's
``VisionTransformer`` (a second reference beside the real timm of ``test_timm_real.py``,
which imports only with a torchvision placeholder), the timm-derived ``PositionEmbs`` variant, jeonsworld's ``ViT-pytorch``
and the older vit-pytorch ``PreNorm`` ViT. Parameter names follow each layout so that
``load_state_dict(strict=True)`` checks the key names too. Attention is spelled out
(softmax(q k^T / sqrt(d)) v), not SDPA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def act_fn(name: str):
    return {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]


def attend(q, k, v, heads):
    b, n, a = q.shape
    q, k, v = (t.reshape(b, n, heads, a // heads).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a // heads), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, a)


class _Attn(nn.Module):
    def __init__(self, d, heads, bias=True):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads))


class _Mlp(nn.Module):
    def __init__(self, d, m, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, m), nn.Linear(m, d), act_fn(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _TimmBlock(nn.Module):
    def __init__(self, d, heads, m, act, eps):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=eps), _Attn(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=eps), _Mlp(d, m, act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PosEmbs(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, n, d) * 0.02)


class TimmLikeViT(nn.Module):
    """timm ``VisionTransformer`` (global_pool token or avg, fc_norm, old ``pre_logits.fc``)
    or, with ``posembs=True``, the timm-derived variant with ``pos_embedding.pos_embedding``."""

    def __init__(self, img=32, patch=8, d=48, depth=2, heads=3, mlp=96, classes=10, class_token=True,
                 fc_norm=False, rep=None, act="gelu", eps=1e-6, posembs=False):
        super().__init__()
        self.heads, self.class_token, self.use_fc = heads, class_token, fc_norm
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2 + (1 if class_token else 0)
        if class_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        if posembs:
            self.pos_embedding = _PosEmbs(n, d)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.blocks = nn.ModuleList(_TimmBlock(d, heads, mlp, act, eps) for _ in range(depth))
        if fc_norm:
            self.fc_norm = nn.LayerNorm(d, eps=eps)
        else:
            self.norm = nn.LayerNorm(d, eps=eps)
        if rep:
            self.pre_logits = nn.Module()
            self.pre_logits.fc = nn.Linear(d, rep)
        self.rep = rep
        self.head = nn.Linear(rep or d, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        pos = self.pos_embedding.pos_embedding if hasattr(self, "pos_embedding") else self.pos_embed
        x = x + pos
        for b in self.blocks:
            x = b(x)
        if self.use_fc:
            x = self.fc_norm(x.mean(1))
        else:
            x = self.norm(x)
            x = x[:, 0] if self.class_token else x.mean(1)
        if self.rep:
            x = torch.tanh(self.pre_logits.fc(x))
        return self.head(x)


class _JAttn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.out(attend(self.query(x), self.key(x), self.value(x), self.heads))


class _JBlock(nn.Module):
    def __init__(self, d, heads, m, act):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.ffn, self.attn = _Mlp(d, m, act), _JAttn(d, heads)

    def forward(self, x):
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class JeonsworldViT(nn.Module):
    """jeonsworld's ``VisionTransformer`` (non-hybrid): class token, encoder_norm, head."""

    def __init__(self, img=32, patch=8, d=48, depth=2, heads=3, mlp=96, classes=10, act="gelu"):
        super().__init__()
        self.transformer = nn.Module()
        e = self.transformer.embeddings = nn.Module()
        e.patch_embeddings = nn.Conv2d(3, d, patch, patch)
        e.position_embeddings = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d) * 0.02)
        e.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        enc = self.transformer.encoder = nn.Module()
        enc.layer = nn.ModuleList(_JBlock(d, heads, mlp, act) for _ in range(depth))
        enc.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        e, enc = self.transformer.embeddings, self.transformer.encoder
        x = e.patch_embeddings(x).flatten(2).transpose(-1, -2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], 1) + e.position_embeddings
        for blk in enc.layer:
            x = blk(x)
        return self.head(enc.encoder_norm(x)[:, 0])


class _PreNorm(nn.Module):
    def __init__(self, d, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _LAttn(nn.Module):
    def __init__(self, d, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(d, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, d))

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out(attend(q, k, v, self.heads))


class _FF(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Identity(), nn.Linear(m, d))

    def forward(self, x):
        return self.net(x)


class PrenormViT(nn.Module):
    """The older vit-pytorch ``ViT`` (PreNorm wrappers, LayerNorm + Linear ``mlp_head``),
    ``pool='cls'``; patches flattened in ``(p1 p2 c)`` order."""

    def __init__(self, img=32, patch=8, d=40, depth=2, heads=2, dim_head=64, mlp=80, classes=10, ch=3):
        super().__init__()
        self.p = patch
        self.to_patch_embedding = nn.Sequential(nn.Identity(), nn.Linear(patch * patch * ch, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(d, _LAttn(d, heads, dim_head)), _PreNorm(d, _FF(d, mlp))]) for _ in range(depth))
        self.mlp_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.p
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = self.to_patch_embedding(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.pos_embedding
        for attn, ff in self.transformer.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.mlp_head(x[:, 0])
