"""Shading of rendered surfaces, sampled per step as DreamFusion does.

Albedo alone lets the optimiser paint geometry into the texture; Lambertian
shading under a random point light, and textureless (white albedo) shading,
force the geometry itself to explain the image (Poole et al. 2022, DreamFusion,
section 3.1). HeadSculpt also renders normal maps (20% of its steps, and all of its
warm-up); previews show them too.
"""

from __future__ import annotations

import torch

from avatar.seeding import draw

SHADING_MODES = ("albedo", "lambertian", "textureless", "normal")


def sample_shading(probs: tuple[float, ...], generator: torch.Generator | None = None) -> str:
    """Draw ``albedo``, ``lambertian``, ``textureless`` or ``normal`` (:data:`SHADING_MODES`, in
    that order) with the given probabilities; three values leave out ``normal``."""
    if not 1 <= len(probs) <= len(SHADING_MODES) or any(not x >= 0 for x in probs) or not sum(probs) > 0:
        raise ValueError(f"shading probabilities must be up to {len(SHADING_MODES)} non-negative values with a "
                         f"positive sum, got {probs}")
    p = torch.tensor(probs, dtype=torch.float64)
    idx = int(draw(torch.multinomial, p / p.sum(), 1, generator=generator))
    return SHADING_MODES[idx]


def random_light(eye: torch.Tensor, generator: torch.Generator | None = None, spread: float = 0.5,
                 distance: tuple[float, float] = (0.8, 1.5)) -> torch.Tensor:
    """(B, 3) point-light positions near each camera (DreamFusion samples the light
    around the camera so the lit side is mostly visible).

    eye: (B, 3) camera centres. spread: standard deviation of the direction jitter.
    """
    b = eye.shape[0]
    # Computed where the cameras are (no copy back to the host); the draws happen on the
    # generator's device and move there.
    eye64 = eye.double()
    direction = torch.nn.functional.normalize(eye64, dim=-1)
    noise = draw(torch.randn, b, 3, generator=generator, dtype=torch.float64, device=eye.device)
    direction = torch.nn.functional.normalize(direction + spread * noise, dim=-1)
    u = draw(torch.rand, b, 1, generator=generator, dtype=torch.float64, device=eye.device)
    dist = distance[0] + (distance[1] - distance[0]) * u
    return (direction * dist * eye64.norm(dim=-1, keepdim=True)).to(eye)


def shade(albedo: torch.Tensor, normals: torch.Tensor, positions: torch.Tensor | None, mode: str,
          light: torch.Tensor | None = None, ambient: float = 0.25) -> torch.Tensor:
    """Shade surface samples.

    albedo: (B, ..., 3) in [0, 1]. normals: (B, ..., 3) unit world normals.
    positions: (B, ..., 3) world points (needed for ``lambertian``/``textureless``).
    light: (B, 3) point-light positions. ambient: ambient fraction of the light.
    Returns (B, ..., 3) colours in [0, 1].
    """
    if mode == "albedo":
        return albedo
    if mode == "normal":
        return (normals + 1.0) * 0.5
    if mode not in ("lambertian", "textureless"):
        raise ValueError(f"unknown shading mode '{mode}': choose one of {', '.join(SHADING_MODES)}")
    if light is None or positions is None:
        raise ValueError(f"{mode} shading needs light positions and surface positions")
    shape = (light.shape[0],) + (1,) * (positions.dim() - 2) + (3,)
    to_light = torch.nn.functional.normalize(light.view(shape) - positions, dim=-1)
    diffuse = (normals * to_light).sum(-1, keepdim=True).clamp(min=0.0)
    intensity = ambient + (1.0 - ambient) * diffuse
    base = albedo if mode == "lambertian" else torch.ones_like(albedo)
    return (base * intensity).clamp(0.0, 1.0)
