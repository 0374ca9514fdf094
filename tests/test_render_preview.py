"""Preview grids keep their layout and carry prompt and step in the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from avatar.render.preview import image_grid, save_preview


def test_grid_layout_and_text(tmp_path):
    rgb = torch.zeros(3, 8, 10, 3)
    rgb[1, ..., 0] = 1.0  # second camera red
    opacity = torch.ones(3, 8, 10, 1)
    path = save_preview(tmp_path / "p.png", {"rgb": rgb, "opacity": opacity}, prompt="a test head", step=42)
    img = Image.open(path)
    assert img.text["prompt"] == "a test head" and img.text["step"] == "42"
    arr = np.asarray(img)
    assert arr.shape == (2 * 10 + 2, 3 * 12 + 2, 3)
    assert tuple(arr[2 + 4, 2 + 12 + 5]) == (255, 0, 0)      # row 0, column 1 is red
    assert tuple(arr[2 + 10 + 4, 2 + 5]) == (255, 255, 255)   # row 1 is the white opacity


def test_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="expected"):
        image_grid([[torch.zeros(4, 4, 3), torch.zeros(5, 4, 3)]])
