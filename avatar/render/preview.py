"""Preview grids: rows of rendered channels over fixed cameras, saved as PNG.

The prompt and step go into the PNG's text chunks (``prompt``, ``step``,
``caption``), so a preview found on disk says what it shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, C) float in [0, 1] (C = 1 or 3) -> (H, W, 3) uint8."""
    img = image.detach().float().clamp(0, 1).cpu()
    if img.dim() == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = img.expand(*img.shape[:2], 3)
    return (img[..., :3].numpy() * 255.0 + 0.5).astype(np.uint8)


def image_grid(rows: list[list[torch.Tensor]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile images (each (H, W, C) in [0, 1], all the same H and W) row by row."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                raise ValueError(f"image ({i}, {j}) is {tuple(img.shape[:2])}, expected {(h, w)}")
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = to_uint8(img)
    return grid


def save_png(path: str | Path, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write a uint8 (H, W, 3) image with optional PNG text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=info)
    return path


def save_preview(path: str | Path, channels: dict[str, torch.Tensor], prompt: str = "", step: int = 0) -> Path:
    """One row per channel (e.g. ``rgb``, ``normal``, ``opacity``, ``control``), one
    column per camera. channels: name -> (B, H, W, C) in [0, 1]."""
    rows = [[img for img in batch] for batch in channels.values()]
    caption = f"{prompt} | step {step} | rows: {', '.join(channels)}"
    return save_png(path, image_grid(rows), {"prompt": prompt, "step": str(step), "caption": caption})
