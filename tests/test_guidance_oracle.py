"""Oracle guidance: SDS with a denoiser that knows the target reduces to reconstruction."""

from __future__ import annotations

import pytest
import torch

from avatar.config import EditGuidanceConfig, GuidanceConfig
from avatar.guidance.errors import GuidanceError
from avatar.guidance.factory import make_edit_guidance, make_guidance, make_oracle_guidance
from avatar.guidance.oracle import oracle_noise


class Cameras:
    """Stand-in for the renderer's cameras: view labels plus an id per camera."""

    def __init__(self, ids: list[int], views: list[str]):
        self.ids = ids
        self.views = views


def synthetic_target(seed: int, size: int = 16):
    """A fixed 'rendering' per camera id: render_target(cameras) -> (B, H, W, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(4, size, size, 3, generator=g)
    calls = []

    def render(cameras: Cameras) -> torch.Tensor:
        calls.append(list(cameras.ids))
        return table[cameras.ids]

    render.calls = calls  # type: ignore[attr-defined]
    render.table = table  # type: ignore[attr-defined]
    return render


def test_oracle_noise_recovers_the_true_noise_for_the_target():
    a = torch.tensor([0.3, 0.9])
    target, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t = a.sqrt().view(-1, 1, 1, 1) * target + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(oracle_noise(x_t, a, target), eps)


def test_oracle_gradient_points_from_the_target_to_the_rendering():
    render = synthetic_target(0)
    g = make_oracle_guidance(render, seed=0, weighting="dreamfusion")
    cams = Cameras([0, 2], ["front", "back"])
    images = torch.rand(2, 16, 16, 3, requires_grad=True)
    out = g(images, cams)
    assert render.calls == [[0, 2]]
    # eps_hat - eps = sqrt(abar / (1 - abar)) (x0 - x_tgt), x in [-1, 1] RGB space.
    a = g.alphas_cumprod[out.t].view(-1, 1, 1, 1)
    x0, x_tgt = images.detach().permute(0, 3, 1, 2) * 2 - 1, render.table[[0, 2]].permute(0, 3, 1, 2) * 2 - 1
    torch.testing.assert_close(out.grad, (1 - a) * (a / (1 - a)).sqrt() * (x0 - x_tgt), atol=1e-5, rtol=1e-4)
    # A rendering equal to the target gets no gradient.
    same = g(render.table[[1]].clone(), Cameras([1], ["side"]))
    assert same.grad.abs().max() < 1e-4


def test_one_oracle_step_lowers_the_distance_to_the_target():
    render = synthetic_target(1)
    g = make_guidance(GuidanceConfig(model="oracle:target.obj"), "ignored", render_target=render, seed=3)
    assert g.kind == "oracle" and g.records["model"]["id"] == "target.obj"
    cams = Cameras([0, 1, 3], ["front", "side", "back"])
    images = torch.rand(3, 16, 16, 3, requires_grad=True)
    before = (images.detach() - render.table[[0, 1, 3]]).pow(2).mean()
    out = g(images, cams, step=0)
    out.loss.backward()
    with torch.no_grad():
        images -= 0.5 * images.grad / images.grad.abs().max()
    after = (images.detach() - render.table[[0, 1, 3]]).pow(2).mean()
    assert after < before


def test_oracle_reconstructs_the_target_by_gradient_descent():
    render = synthetic_target(2, size=8)
    g = make_oracle_guidance(render, seed=0, t_range=(0.02, 0.98))
    cams = Cameras([0, 1, 2, 3], ["front", "side", "back", "side"])
    logits = torch.zeros(4, 8, 8, 3, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    start = (torch.sigmoid(logits) - render.table).abs().mean().item()
    for step in range(150):
        opt.zero_grad()
        g(torch.sigmoid(logits), cams, step=step).loss.backward()
        opt.step()
    end = (torch.sigmoid(logits) - render.table).abs().mean().item()
    assert end < 0.05 < start


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_iesd_oracle_pulls_toward_source_or_edit_target(strength):
    source, edit = synthetic_target(10), synthetic_target(11)
    cfg = EditGuidanceConfig(model="oracle:edited.obj")
    g = make_edit_guidance(cfg, "src", "make it blue", strength=strength, render_edit=edit, seed=0)
    cams = Cameras([0, 1], ["front", "back"])
    logits = torch.zeros(2, 16, 16, 3, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for step in range(120):
        opt.zero_grad()
        # The edit pipeline passes the frozen source avatar's renders as source_images.
        g(torch.sigmoid(logits), cams, step=step, source_images=source(cams)).loss.backward()
        opt.step()
    img = torch.sigmoid(logits).detach()
    d_src = (img - source.table[[0, 1]]).abs().mean()
    d_edit = (img - edit.table[[0, 1]]).abs().mean()
    if strength == 0.0:
        assert d_src < 0.05 < d_edit
    else:
        assert d_edit < 0.05 < d_src


def test_iesd_oracle_with_a_source_renderer_matches_the_combination():
    source, edit = synthetic_target(20), synthetic_target(21)
    g = make_edit_guidance(EditGuidanceConfig(model="oracle:e.obj"), "s", "i", strength=0.25, render_edit=edit,
                           render_source=source)
    cams = Cameras([3], ["side"])
    images = torch.rand(1, 16, 16, 3)
    out = g(images, cams)
    a = g.alphas_cumprod[out.t]
    x_t = g.add_noise(out.latents, out.noise, out.t)
    to_x = lambda im: im.permute(0, 3, 1, 2) * 2 - 1  # noqa: E731
    eps_s, eps_e = oracle_noise(x_t, a, to_x(source.table[[3]])), oracle_noise(x_t, a, to_x(edit.table[[3]]))
    torch.testing.assert_close(out.eps_hat, eps_s + 0.25 * (eps_e - eps_s), atol=1e-5, rtol=1e-5)


def test_oracle_needs_its_renderer():
    with pytest.raises(GuidanceError, match="render_target"):
        make_guidance(GuidanceConfig(model="oracle:head.obj"), "p")
    with pytest.raises(GuidanceError, match="render_edit"):
        make_edit_guidance(EditGuidanceConfig(model="oracle:head.obj"), "p", "i")
