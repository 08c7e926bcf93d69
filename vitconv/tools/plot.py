"""Position-embedding similarity: the numbers (plain numpy) and the picture (matplotlib, optional).

A trained ViT learns position embeddings in which nearby patches are similar and the
same row or column stands out: figure 7 of the ViT paper (Dosovitskiy et al., 2021)
shows, for every patch, the cosine similarity of its embedding with every other's.
A converted checkpoint whose table was scrambled (transposed grid, class token in the
wrong row, a bad resize) loses that structure at a glance, which is why ``inspect``
can draw it. The computation lives in :func:`posembed_cosine_grid` so it can be tested
without matplotlib; the drawing needs the ``plot`` extra.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from vitconv.errors import BadInputError, VitconvError
from vitconv.formats.atomic import atomic_output

#: Output image size: fixed inches at a fixed dpi (no ``bbox_inches="tight"``) so the PNG's
#: pixel size does not depend on label widths: 900 x 800 px, multiplied by an integer
#: :func:`resolution_scale` for grids too fine to show at that size.
FIG_INCHES = (9.0, 8.0)
DPI = 100
#: Height of the heatmap area (axes fraction 0.84 of the figure) in pixels at scale 1.
_MAP_PX = 0.84 * FIG_INCHES[1] * DPI
#: Pixels each similarity cell should get at least, so one bright cell stays visible and the
#: gaps between tiles stay even.
_MIN_CELL_PX = 3


def resolution_scale(g: int) -> int:
    """Integer factor on the dpi for a ``g x g`` grid: 1 up to 14x14 (ViT-B/16 at 224px),
    3 for 24x24 (at 384px). Scaling the dpi, not the inches, keeps the layout identical."""
    cells = g * (g + 1) - 1 if g > 1 else 1
    return max(1, int(np.ceil(_MIN_CELL_PX * cells / _MAP_PX)))


def figure_pixels(g: int) -> tuple:
    """``(width, height)`` of the PNG drawn for a ``g x g`` grid."""
    k = resolution_scale(g)
    return int(round(FIG_INCHES[0] * DPI * k)), int(round(FIG_INCHES[1] * DPI * k))


def posembed_cosine_grid(pos_embed: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """Cosine similarity of every grid position's embedding with every other's.

    ``pos_embed`` is ``(1, N, D)`` or ``(N, D)`` with the ``num_prefix_tokens`` class/register
    rows first (excluded here: they have no grid position). Returns ``sim`` of shape
    ``(g, g, g, g)`` where ``sim[i, j]`` is the ``g x g`` map for the patch at row ``i``,
    column ``j``. An all-zero embedding has similarity 0 with everything (not NaN)."""
    pe = np.asarray(pos_embed, dtype=np.float64)
    if pe.ndim == 3 and pe.shape[0] == 1:
        pe = pe[0]
    if pe.ndim != 2:
        raise ValueError(f"position embedding must be (1, N, D) or (N, D), got {pos_embed.shape}")
    grid = pe[num_prefix_tokens:]
    n = grid.shape[0]
    g = int(round(n ** 0.5))
    if n == 0 or g * g != n:
        raise ValueError(f"{n} position rows after {num_prefix_tokens} prefix token(s) do not "
                         "form a square grid")
    norms = np.linalg.norm(grid, axis=1, keepdims=True)
    unit = grid / np.maximum(norms, np.finfo(np.float64).tiny)
    return (unit @ unit.T).reshape(g, g, g, g)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise VitconvError("drawing the position-embedding plot needs matplotlib, which is not "
                           "installed: pip install 'vitconv[plot]'") from None
    return matplotlib


def mosaic(sim: np.ndarray, gap: int = 1) -> np.ndarray:
    """Lay the ``(g, g, g, g)`` maps out as one image: tile ``(i, j)`` at row ``i``, column ``j``,
    tiles separated by ``gap`` NaN cells (drawn as background). One image instead of ``g*g``
    axes keeps a 24x24 grid (ViT-B/16 at 384px) as fast to draw as a 4x4 one."""
    g = sim.shape[0]
    step = g + gap
    out = np.full((g * step - gap, g * step - gap), np.nan)
    for i in range(g):
        for j in range(g):
            out[i * step:i * step + g, j * step:j * step + g] = sim[i, j]
    return out


def plot_posembed_similarity(sim: np.ndarray, path: os.PathLike | str,
                             title: Optional[str] = None) -> None:
    """Write the grid of similarity maps as a PNG (:func:`figure_pixels` in size), atomically.

    Rows and columns of the grid are the query patch's row and column; inside each tile,
    colour is the cosine similarity (-1 to 1) with the patch at that position."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if sim.ndim != 4 or len(set(sim.shape)) != 1:
        raise BadInputError(f"similarity grid must be (g, g, g, g), got {sim.shape}", path)
    g = sim.shape[0]
    gap = 1 if g > 1 else 0
    image = mosaic(sim, gap)
    fig = Figure(figsize=FIG_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)  # Agg, whatever backend the user's matplotlibrc names
    ax = fig.add_axes((0.08, 0.08, 0.76, 0.84))
    cax = fig.add_axes((0.87, 0.08, 0.03, 0.84))
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=-1.0, vmax=1.0,
                   interpolation="nearest")
    step = g + gap
    every = max(1, int(np.ceil(g / 12)))
    ticks = [i * step + (g - 1) / 2 for i in range(0, g, every)]
    labels = [str(i + 1) for i in range(0, g, every)]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title or f"Position embedding similarity ({g}x{g} grid)")
    fig.colorbar(im, cax=cax, label="cosine similarity")
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI * resolution_scale(g))
