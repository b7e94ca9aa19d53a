"""Writers of small data files in the real on-disk formats, for the data tests."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def precomp_captions(split: str, num_images: int) -> list[str]:
    """Distinct captions ``"<split> image <i> caption <j>"``, 5 per image, in file order."""
    return [f"{split} image {i} caption {j}" for i in range(num_images) for j in range(5)]


def write_precomp(folder, split, features, captions=None, *, per_caption=False):
    """Writes ``<split>_ims.npy`` and ``<split>_caps.txt`` as in the VSE++ release.

    Args:
      folder: destination folder (created).
      split: split name.
      features: ``(N, D)`` array, one row per image.
      captions: the ``5 N`` caption lines; :func:`precomp_captions` by default.
      per_caption: store each feature row 5 times (one row per caption).
    """
    os.makedirs(folder, exist_ok=True)
    features = np.asarray(features)
    if captions is None:
        captions = precomp_captions(split, features.shape[0])
    rows = np.repeat(features, 5, axis=0) if per_caption else features
    np.save(os.path.join(folder, f"{split}_ims.npy"), rows)
    with open(os.path.join(folder, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
        f.writelines(c + "\n" for c in captions)


def write_image(path, colour, size=(8, 10)):
    """Writes a solid-colour RGB image (format from the extension) of ``size`` = (H, W)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.broadcast_to(np.asarray(colour, np.uint8), (*size, 3))
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=100)


def write_karpathy_json(path, entries):
    """Writes ``{"images": [...]}`` from ``(filename, split, sentences)`` tuples."""
    images = [
        {
            "filename": filename,
            "imgid": k,
            "split": split,
            "sentids": list(range(5 * k, 5 * k + len(sentences))),
            "sentences": [
                {"raw": raw, "tokens": raw.lower().split(), "imgid": k, "sentid": 5 * k + s}
                for s, raw in enumerate(sentences)
            ],
        }
        for k, (filename, split, sentences) in enumerate(entries)
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "dataset": "flickr30k"}, f)
