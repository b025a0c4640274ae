"""AVSBench-semantic classes and their colours.

Class order is the key order of the official `label2idx.json` (background first); the colour of
class j is the PASCAL-VOC bit-interleaved colour map (docs/AVSBENCH.md section 3).
"""

from __future__ import annotations

import numpy as np

AVSS_CLASSES: tuple[str, ...] = (
    "background",
    "accordion",
    "airplane",
    "axe",
    "baby",
    "bassoon",
    "bell",
    "bird",
    "boat",
    "boy",
    "bus",
    "car",
    "cat",
    "cello",
    "clarinet",
    "clipper",
    "clock",
    "dog",
    "donkey",
    "drum",
    "duck",
    "elephant",
    "emergency-car",
    "erhu",
    "flute",
    "frying-food",
    "girl",
    "goose",
    "guitar",
    "gun",
    "guzheng",
    "hair-dryer",
    "handpan",
    "harmonica",
    "harp",
    "helicopter",
    "hen",
    "horse",
    "keyboard",
    "leopard",
    "lion",
    "man",
    "marimba",
    "missile-rocket",
    "motorcycle",
    "mower",
    "parrot",
    "piano",
    "pig",
    "pipa",
    "saw",
    "saxophone",
    "sheep",
    "sitar",
    "sorna",
    "squirrel",
    "tabla",
    "tank",
    "tiger",
    "tractor",
    "train",
    "trombone",
    "truck",
    "trumpet",
    "tuba",
    "ukulele",
    "utv",
    "vacuum-cleaner",
    "violin",
    "wolf",
    "woman",
)
NUM_AVSS_CLASSES = len(AVSS_CLASSES)  # 71, background included
assert NUM_AVSS_CLASSES == 71


def voc_colormap(num_classes: int = 256) -> np.ndarray:
    """PASCAL-VOC colour map: uint8 [num_classes, 3]; bits of j spread over R, G, B, MSB first."""
    cmap = np.zeros((num_classes, 3), dtype=np.uint8)
    for j in range(num_classes):
        r = g = b = 0
        c = j
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        cmap[j] = (r, g, b)
    return cmap


def label2idx_json(classes: tuple[str, ...] = AVSS_CLASSES) -> dict[str, int]:
    """The official `label2idx.json` content: class name -> 1-based value (the values are not used)."""
    return {name: i + 1 for i, name in enumerate(classes)}


def colour_to_index_lut(num_classes: int) -> dict[int, int]:
    """Packed RGB (R << 16 | G << 8 | B) -> class index, for classes 0..num_classes-1."""
    cmap = voc_colormap(num_classes).astype(np.int64)
    packed = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    return {int(p): i for i, p in enumerate(packed)}


def decode_colour_mask(rgb: np.ndarray, num_classes: int = NUM_AVSS_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Map an RGB mask uint8 [H, W, 3] to class indices int64 [H, W].

    Returns (indices, unknown) where `unknown` is a bool [H, W] of pixels whose colour is no class
    colour. Callers must raise on any unknown pixel (the official loader silently maps them to 0).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB array [H, W, 3], got shape {rgb.shape}")
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lut = colour_to_index_lut(num_classes)
    keys = np.fromiter(lut.keys(), dtype=np.int64)
    vals = np.fromiter(lut.values(), dtype=np.int64)
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    known = keys[pos] == packed
    return np.where(known, vals[pos], 0), ~known


def encode_colour_mask(index: np.ndarray) -> np.ndarray:
    """Class indices int [H, W] -> RGB uint8 [H, W, 3] with the VOC colours."""
    cmap = voc_colormap(max(256, int(index.max()) + 1))
    return cmap[index]
