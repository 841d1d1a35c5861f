"""Faithfulness measures of saliency maps, torch-free (NumPy + ONNX Runtime): does a map
rank first the parts of the image that the model's decision depends on?

Every map is brought to the model's input size (224 x 224) and ranked on a grid of CELL x
CELL pixel cells (the mean of the map over each cell), so that maps of every resolution
(7x7 CAMs, 14x14 or 28x28 Layer-CAMs, 224x224 Score-CAMs) are judged by the same cells.
A deleted cell is filled with a Gaussian blur of the image itself (sigma BLUR_SIGMA px):
no hard edge and no grey square for the network to react to. The score is the model's
probability of the class it decided (as `run` decides it: the stored threshold).

- deletion curve: the top 0, 10, 20, 30, 50, 70 and 100% of cells replaced, most salient
  first; area under it (trapezoid over the fraction deleted) -- lower is more faithful.
- insertion curve: from the blurred image, the top cells put back; AUC -- higher is better.
- top-k / random-k: the drop in mean confidence when the top k% of cells are deleted over
  the drop when k% random cells are (the same random cells for every map of an image).
- mass: where the map's mass lies (min-max normalised as the report shows it): bottom two
  sevenths of the rows, the outer seventh on either side, the top seventh, and inside the
  chest (`chest_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumoscan.inference.cam.onnx_cam import softmax

SIZE = 224
CELL = 16
FRACTIONS = np.array([0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
RANDOM_KS = (0.1, 0.2, 0.3)
BLUR_SIGMA = 12.0
OPEN_RADIUS = 6


class OnnxScorer:
    """Decided-class probabilities of a batch from the exported model (ONNX Runtime)."""

    def __init__(self, session, batch_size: int = 32):
        self.session, self.batch_size = session, batch_size

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        out = [self.session.run(["logits"], {"input": batch[i:i + self.batch_size]})[0]
               for i in range(0, len(batch), self.batch_size)]
        return softmax(np.concatenate(out))


def upsampled(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) maps -> (N, SIZE, SIZE), bilinear (Pillow, as the report draws them),
    min-max scaled to [0, 1]."""
    from PIL import Image

    out = np.stack([np.asarray(Image.fromarray(m.astype(np.float32), mode="F")
                               .resize((SIZE, SIZE), Image.BILINEAR)) for m in maps])
    lo = out.min(axis=(1, 2), keepdims=True)
    span = out.max(axis=(1, 2), keepdims=True) - lo
    return np.divide(out - lo, span, out=np.zeros_like(out), where=span > 0)


def cell_order(maps224: np.ndarray) -> np.ndarray:
    """(N, G*G) cell indices, most salient first (ties broken by position)."""
    g = SIZE // CELL
    cells = maps224.reshape(len(maps224), g, CELL, g, CELL).mean(axis=(2, 4)).reshape(
        len(maps224), -1)
    return np.argsort(-cells, axis=1, kind="stable")


def blurred(batch: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(x, sigma=(0, BLUR_SIGMA, BLUR_SIGMA), mode="reflect")
                     for x in batch]).astype(np.float32)


def cell_mask(order: np.ndarray, count: int) -> np.ndarray:
    """(SIZE, SIZE) bool: the first `count` cells of `order`."""
    g = SIZE // CELL
    grid = np.zeros(g * g, bool)
    grid[order[:count]] = True
    return np.kron(grid.reshape(g, g), np.ones((CELL, CELL), bool)).astype(bool)


def composite(image: np.ndarray, filler: np.ndarray, order: np.ndarray,
              fractions) -> np.ndarray:
    """The image with the first fraction of `order`'s cells taken from `filler`, one per
    fraction: (len(fractions), C, H, W)."""
    n_cells = len(order)
    return np.stack([np.where(cell_mask(order, round(f * n_cells)), filler, image)
                     for f in fractions])


@dataclass
class Baseline:
    """What every map of an image set is compared with: the decided class, its
    confidence on the image and on its blurred copy, and on random-k deletions."""
    decided: np.ndarray  # (N,)
    original: np.ndarray  # (N,) decided-class probability
    blurred: np.ndarray  # (N,)
    random_k: np.ndarray  # (N, len(RANDOM_KS))


def baseline(scorer: OnnxScorer, batch: np.ndarray, decided: np.ndarray,
             fillers: np.ndarray, seed: int = 0) -> Baseline:
    rng = np.random.default_rng(seed)
    n_cells = (SIZE // CELL) ** 2
    pick = np.arange(len(batch))
    original = scorer.probabilities(batch)[pick, decided]
    blur = scorer.probabilities(fillers)[pick, decided]
    perturbed = np.concatenate([composite(x, f, rng.permutation(n_cells), RANDOM_KS)
                                for x, f in zip(batch, fillers)])
    random_k = scorer.probabilities(perturbed)[:, :].reshape(len(batch), len(RANDOM_KS), -1)
    return Baseline(decided, original, blur, random_k[pick, :, decided])


def curves(scorer: OnnxScorer, batch: np.ndarray, fillers: np.ndarray, maps224: np.ndarray,
           base: Baseline) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion) decided-class confidence at FRACTIONS: (N, len(FRACTIONS)) each."""
    inner = FRACTIONS[1:-1]
    deletion, insertion = [], []
    for x, f, order, cls in zip(batch, fillers, cell_order(maps224), base.decided):
        probs = scorer.probabilities(np.concatenate([composite(x, f, order, inner),
                                                     composite(f, x, order, inner)]))[:, cls]
        deletion.append(probs[:len(inner)])
        insertion.append(probs[len(inner):])
    ends = np.stack([base.original, base.blurred], axis=1)
    deletion = np.column_stack([ends[:, 0], np.array(deletion), ends[:, 1]])
    insertion = np.column_stack([ends[:, 1], np.array(insertion), ends[:, 0]])
    return deletion, insertion


def auc(curve: np.ndarray) -> np.ndarray:
    return np.trapezoid(curve, FRACTIONS, axis=-1)


def top_vs_random(deletion: np.ndarray, base: Baseline) -> dict[float, float]:
    """Mean drop when the top k% cells are deleted / mean drop for k% random cells."""
    ratios = {}
    for j, k in enumerate(RANDOM_KS):
        at = int(np.argmin(np.abs(FRACTIONS - k)))
        top = (base.original - deletion[:, at]).mean()
        random = (base.original - base.random_k[:, j]).mean()
        ratios[k] = float(top / random) if random > 0 else float("nan")
    return ratios


def mass_shares(maps224: np.ndarray, chest: np.ndarray | None = None) -> dict[str, float]:
    """Mean share of each map's mass in each region (and inside `chest` masks, if given)."""
    total = maps224.sum(axis=(1, 2))
    ok = total > 0
    edge = SIZE // 7
    outer = np.zeros((SIZE, SIZE), bool)
    outer[:, :edge] = outer[:, -edge:] = True
    shares = {
        "bottom 2 rows": maps224[:, SIZE * 5 // 7:, :].sum(axis=(1, 2)),
        "outer columns": (maps224 * outer).sum(axis=(1, 2)),
        "top row": maps224[:, :edge, :].sum(axis=(1, 2)),
    }
    if chest is not None:  # beside the chest's share of the image: what a flat map would give
        shares["inside chest"] = (maps224 * chest).sum(axis=(1, 2))
        shares["chest area"] = chest.sum(axis=(1, 2)) / chest[0].size * total
    return {k: float((v[ok] / total[ok]).mean()) for k, v in shares.items()}


def chest_mask(pixels: np.ndarray) -> np.ndarray | None:
    """The chest on a (SIZE, SIZE) greyscale model image: the convex hull of the two lung
    fields, dilated by 8 px. Lung fields: the pixels darker than Otsu's threshold (after a
    3-px Gaussian) that are not connected to the image border (the air around the body
    is), the two largest such components of at least 2% of the image each. The hull takes
    in the mediastinum and heart between them; the margin the ribs and diaphragm edge.
    None when no two such fields are found (the image is then left out of this measure)."""
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import gaussian, threshold_multiotsu
    from skimage.measure import label, regionprops
    from skimage.morphology import convex_hull_image, dilation, disk, opening
    from skimage.segmentation import clear_border

    smooth = gaussian(pixels.astype(np.float32) / 255, sigma=3)
    air, tissue = threshold_multiotsu(smooth, classes=3)
    body = binary_fill_holes(smooth >= air)
    dark = clear_border(opening(body & (smooth < tissue), disk(OPEN_RADIUS)))
    labels = label(dark)
    regions = sorted(regionprops(labels), key=lambda r: r.area, reverse=True)[:2]
    if len(regions) < 2 or regions[1].area < 0.02 * SIZE * SIZE:
        return None
    lungs = np.isin(labels, [r.label for r in regions])
    return dilation(convex_hull_image(lungs), disk(8))
