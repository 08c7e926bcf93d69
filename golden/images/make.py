"""Writes ``shapes_64x48.png``: a small synthetic RGB test image (a gradient sky, a sun, a
field and a house), not square, so resize-and-crop preprocessing is exercised. Deterministic:
``python golden/images/make.py`` rewrites the same bytes."""

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 48, 64
y, x = np.mgrid[0:H, 0:W]
img = np.zeros((H, W, 3), np.float64)
img[..., 0], img[..., 1], img[..., 2] = 90 + y * 2, 140 + y * 1.5, 235 - y      # sky
img[(x - 48) ** 2 + (y - 10) ** 2 < 36] = (250, 210, 60)                         # sun
img[y > 32] = np.stack([40 + x[y > 32], 150 - 0 * x[y > 32], 50 + 0 * x[y > 32]], -1)  # field
img[(x > 12) & (x < 30) & (y > 22) & (y <= 34)] = (170, 60, 50)                   # house
img[(y > 12) & (y <= 22) & (np.abs(x - 21) < (y - 12))] = (110, 40, 30)           # roof
img[(x > 18) & (x < 23) & (y > 28) & (y <= 34)] = (60, 40, 20)                    # door
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(Path(__file__).with_name("shapes_64x48.png"),
                                                            optimize=True)
