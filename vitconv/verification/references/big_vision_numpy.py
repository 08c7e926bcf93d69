"""An independent NumPy forward pass of big_vision's ViT, run directly on a big_vision ``.npz``.

The twin of :mod:`vitconv.verification.references.google_numpy` (``vit_jax``) for big_vision files, for the same reason:
the converter's tables cannot check themselves. It imports nothing of ``vitconv.layouts``,
``vitconv.model`` or the pipeline; it reads big_vision's own arrays by big_vision's own names
and follows ``big_vision/models/vit.py`` (``_Model``, ``Encoder1DBlock``, ``MAPHead``,
``posemb_sincos_2d``, ``resample_posemb``) step by step, in float64 by default:

- the patch embedding plus the position table, *then* the class token (``pool_type='tok'``);
- blocks: ``x + MHDPA(LN_0(x))``, then ``x + MlpBlock(LN_1(x))`` with tanh GELU;
- ``encoder_norm`` on every token; pooling ``tok`` (token 0), ``gap`` (mean of all tokens) or
  ``map`` (``MAPHead``: a probe attends over the tokens, then ``x + MLP(LN(x))``, token 0);
- ``pre_logits`` = ``tanh(Dense)`` when present, then ``head``;
- ``posemb='sincos2d'`` (no ``pos_embedding`` stored): the table big_vision computes, in
  float32 as jax.numpy does; a learned table at another grid: ``scipy.ndimage.zoom(order=1)``
  in the table's own dtype, as ``resample_posemb``;
- ``scan=True`` files: each block's tensors are index ``i`` of the stacked arrays.

Where the model lives (``params/img/`` in a two-tower file, ``params/``, the root) is found by
the embedding's key. The bytes come through vitconv's safe ``.npz`` reader, which widens
big_vision's bfloat16 (2-byte void) members to float32 exactly, one tensor (a stacked
file: one block's slice) when the forward pass reaches it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, Union

import numpy as np

from vitconv.verification.references.google_numpy import NpzParams, ReadsFile, conv2d, gelu_tanh, layer_norm, reading, softmax

PREFIXES = ("params/img/", "params/", "", "opt/target/")
SINCOS_IMAGE_SIZE = 224  # what the converter assumes too; a sincos2d file records no resolution


def _prefix(keys) -> str:
    """Where the model lives: the prefix of its embedding (a two-tower file: the image tower)."""
    prefix = next((p for p in PREFIXES if p + "embedding/kernel" in keys), None)
    if prefix is None:
        raise KeyError("embedding/kernel")
    return prefix


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """``big_vision.models.vit.posemb_sincos_2d`` with jax.numpy's float32 arithmetic."""
    y, x = np.mgrid[:h, :w]
    quarter = width // 4
    omega = np.arange(quarter, dtype=np.float32) / np.float32(quarter - 1)
    omega = np.float32(1.0) / np.float32(temperature) ** omega
    y = np.einsum("m,d->md", y.flatten().astype(np.float32), omega)
    x = np.einsum("m,d->md", x.flatten().astype(np.float32), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None, :, :].astype(np.float32)


class BigVisionReference(ReadsFile):
    """``forward_stages(images_nhwc)`` named as ``VisionTransformer.forward_stages``."""

    def __init__(self, params: NpzParams, dtype=np.float64):
        self.p, self.dtype = params, np.dtype(dtype)
        p = self.p
        shape = p.shape  # from the members' headers, nothing read
        self.scan = any(k.startswith("Transformer/encoderblock/") for k in p)
        if self.scan:
            self.depth = int(shape("Transformer/encoderblock/LayerNorm_0/scale")[0])
        else:
            self.depth = len({m.group(1) for k in p if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
        kernel = shape("embedding/kernel")
        self.patch_size, self._in_chans, self.width = int(kernel[0]), int(kernel[2]), int(kernel[3])
        self.pool = "tok" if "cls" in p else ("map" if "MAPHead_0/probe" in p else "gap")
        self.sincos = "pos_embedding" not in p
        grid = SINCOS_IMAGE_SIZE // self.patch_size if self.sincos else math.isqrt(shape("pos_embedding")[1])
        self._image_size = grid * self.patch_size

    @classmethod
    def from_npz(cls, path: Union[str, os.PathLike], dtype=np.float64) -> "BigVisionReference":
        """Weights read from the file as the forward pass reaches them (:class:`~vitconv.
        reference.NpzParams`, a stacked block's slice alone): the reference holds about one
        tensor at a time, not the model. Each is used as stored (float32, bfloat16 widened);
        the float64 activations widen it where they meet, as a float64 copy would."""
        return reading(path, lambda src: cls(NpzParams(src, _prefix(set(src.keys()))), dtype=dtype))

    # -- what verify asks of any reference -------------------------------------
    @property
    def description(self) -> str:
        return f"big_vision .npz, NumPy {self.dtype.name} reference of big_vision's models/vit.py"

    @property
    def reference_dtype(self) -> str:
        return self.dtype.name

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def stride(self) -> int:
        return self.patch_size

    @property
    def in_chans(self) -> int:
        return self._in_chans

    # -- parameters --------------------------------------------------------------
    def block(self, i: int, name: str) -> np.ndarray:
        if self.scan:
            return self.p.index(f"Transformer/encoderblock/{name}", i)
        return self.p[f"Transformer/encoderblock_{i}/{name}"]

    def pos_embed(self, grid: int) -> np.ndarray:
        """The table added at a ``grid`` x ``grid`` token grid."""
        if self.sincos:
            return sincos_2d(grid, grid, self.width)
        table = self.p["pos_embedding"]
        old = math.isqrt(table.shape[1])
        if old == grid:
            return table
        import scipy.ndimage

        zoomed = scipy.ndimage.zoom(table.reshape(old, old, -1), (grid / old, grid / old, 1), order=1)
        return zoomed.reshape(1, grid * grid, -1)

    # -- layers --------------------------------------------------------------------
    def _attention(self, q_in: np.ndarray, kv_in: np.ndarray, get) -> np.ndarray:
        # (n, tokens, D) x (D, heads, head_dim) -> (n, heads, tokens, head_dim)
        q, k, v = ((np.tensordot(x, get(f"{n}/kernel"), axes=(2, 0)) + get(f"{n}/bias")).transpose(0, 2, 1, 3)
                   for x, n in ((q_in, "query"), (kv_in, "key"), (kv_in, "value")))
        w = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]))
        out = (w @ v).transpose(0, 2, 1, 3)
        return np.tensordot(out, get("out/kernel"), axes=([2, 3], [0, 1])) + get("out/bias")

    @staticmethod
    def _mlp(x: np.ndarray, get) -> np.ndarray:
        h = gelu_tanh(x @ get("Dense_0/kernel") + get("Dense_0/bias"))
        return h @ get("Dense_1/kernel") + get("Dense_1/bias")

    def forward_stages(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        p = self.p
        x = np.asarray(images).astype(self.dtype)
        if x.ndim != 4:
            raise ValueError(f"images must be NHWC (4-D), got shape {x.shape}")
        x = conv2d(x, p["embedding/kernel"], self.patch_size, "VALID") + p["embedding/bias"]
        n, gh, gw, d = x.shape
        if gh != gw:
            raise ValueError(f"token grid {gh}x{gw} is not square")
        x = x.reshape(n, gh * gw, d) + self.pos_embed(gh)  # the table first, then the class token
        if self.pool == "tok":
            x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, d)), x], axis=1)
        out: Dict[str, np.ndarray] = {"embed": x}
        for i in range(self.depth):
            y = layer_norm(x, self.block(i, "LayerNorm_0/scale"), self.block(i, "LayerNorm_0/bias"))
            x = x + self._attention(y, y, lambda k, i=i: self.block(i, "MultiHeadDotProductAttention_0/" + k))
            out[f"blocks.{i}.attn"] = x
            y = layer_norm(x, self.block(i, "LayerNorm_1/scale"), self.block(i, "LayerNorm_1/bias"))
            x = x + self._mlp(y, lambda k, i=i: self.block(i, "MlpBlock_0/" + k))
            out[f"blocks.{i}.mlp"] = x
        x = layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
        out["encoded"] = x
        if self.pool == "map":
            probe = np.broadcast_to(p["MAPHead_0/probe"], (n, 1, d))
            y = self._attention(probe, x, lambda k: p["MAPHead_0/MultiHeadDotProductAttention_0/" + k])
            z = layer_norm(y, p["MAPHead_0/LayerNorm_0/scale"], p["MAPHead_0/LayerNorm_0/bias"])
            pooled = (y + self._mlp(z, lambda k: p["MAPHead_0/MlpBlock_0/" + k]))[:, 0]
        elif self.pool == "gap":
            pooled = x.mean(axis=1)
        else:
            pooled = x[:, 0]
        out["pooled"] = pooled
        out["head_input"] = (np.tanh(pooled @ p["pre_logits/kernel"] + p["pre_logits/bias"])
                             if "pre_logits/kernel" in p else pooled)
        if "head/kernel" in p:
            out["logits"] = out["head_input"] @ p["head/kernel"] + p["head/bias"]
        else:  # big_vision's first return value without a head: pre_logits
            out["logits"] = out["head_input"]
        return out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.forward_stages(images)["logits"]

