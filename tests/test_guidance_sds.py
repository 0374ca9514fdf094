"""Score distillation math, CFG, ControlNet routing and IESD combination with noise predictors
that return known tensors (no diffusion weights)."""

from __future__ import annotations

import math

import pytest
import torch

from avatar.guidance.errors import GuidanceError
from avatar.guidance.iesd import IESDPredictor, InstructPix2PixPredictor, iesd_combine, instruct_pix2pix_guidance
from avatar.guidance.prompts import ViewPromptEmbeddings, view_labels, view_prompt
from avatar.guidance.sds import (
    GuidanceBatch,
    RGBEncoder,
    ScoreDistillation,
    TextToImagePredictor,
    TimestepSchedule,
    classifier_free_guidance,
    sds_gradient,
    sds_weight,
)


def sd_alphas() -> torch.Tensor:
    """SD 1.5's alpha_bar (scaled-linear betas 0.00085..0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class FixedPredictor:
    """Returns a known eps_hat and records its inputs."""

    def __init__(self, eps: torch.Tensor):
        self.eps = eps
        self.calls: list[tuple[torch.Tensor, torch.Tensor, GuidanceBatch]] = []

    def __call__(self, x_t, t, batch):
        self.calls.append((x_t, t, batch))
        return self.eps.clone()


class FakeUNet:
    """eps = mean(encoder_hidden_states) + mean(mid residual), per sample, broadcast over the latent."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, encoder_hidden_states, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, return_dict=False):
        self.calls.append({"batch": x.shape[0], "channels": x.shape[1], "x": x.clone()})
        value = encoder_hidden_states.float().mean(dim=(1, 2))
        if mid_block_additional_residual is not None:
            value = value + mid_block_additional_residual.float().mean(dim=(1, 2, 3))
        if x.shape[1] > 4:  # InstructPix2Pix-style extra channels: add their mean
            value = value + x[:, 4:].float().mean(dim=(1, 2, 3))
        return (torch.zeros(x.shape[0], 4, *x.shape[2:]) + value.view(-1, 1, 1, 1),)


class FakeControlNet:
    """Residual = scale * mean(control image) (+ offset) and records the control images it saw."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.calls = []

    def __call__(self, x, t, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, return_dict=False):
        self.calls.append({"batch": x.shape[0], "cond": controlnet_cond.clone(), "scale": conditioning_scale})
        value = conditioning_scale * (controlnet_cond.float().mean(dim=(1, 2, 3)) + self.offset)
        mid = torch.zeros(x.shape[0], 1, 1, 1) + value.view(-1, 1, 1, 1)
        return [torch.zeros_like(x)], mid


def constant_prompts(values: dict[str, float], negative: float, dim: int = 8) -> ViewPromptEmbeddings:
    return ViewPromptEmbeddings("p", {v: v for v in values}, {v: torch.full((77, dim), x) for v, x in values.items()},
                                "neg", torch.full((77, dim), negative))


PROMPTS = {"front": 1.0, "side": 2.0, "back": 3.0, "overhead": 4.0}


# ---------------------------------------------------------------------------
# Weighting, schedule, prompts


def test_sds_weight_options():
    a = torch.tensor([0.25, 0.81])
    assert torch.allclose(sds_weight(a, "headsculpt"), a.sqrt() * (1 - a))
    assert torch.allclose(sds_weight(a, "dreamfusion"), 1 - a)
    assert torch.equal(sds_weight(a, "uniform"), torch.ones(2))
    with pytest.raises(GuidanceError, match="weighting"):
        sds_weight(a, "nope")


def test_timestep_schedule_bounds_and_annealing():
    s = TimestepSchedule((0.02, 0.98), total_steps=101)
    assert s.bounds(0) == (20, 980) == s.bounds(100)
    t = s.sample(1000, 0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 980 and t.max() > 900
    lin = TimestepSchedule((0.02, 0.98), total_steps=101, anneal="linear", anneal_to=0.5)
    assert lin.bounds(0) == (20, 980) and lin.bounds(50) == (20, 740) and lin.bounds(100) == (20, 500)
    sq = TimestepSchedule((0.02, 0.98), total_steps=101, anneal="sqrt")
    assert sq.bounds(0) == (980, 980) and sq.bounds(100) == (20, 20)
    assert sq.bounds(25)[0] == round(980 - 960 * math.sqrt(0.25))
    assert torch.all(sq.sample(4, 25) == sq.bounds(25)[0])
    with pytest.raises(GuidanceError):
        TimestepSchedule((0.5, 0.2))
    with pytest.raises(GuidanceError):
        TimestepSchedule(anneal="cosine")


def test_view_prompts_and_labels():
    # HeadSculpt's wording (nerf/utils.py, docs/METHOD.md).
    assert view_prompt("an old man", "front") == "an old man, front view of head"
    assert view_prompt("an old man", "side") == "an old man, side view of head"
    assert view_prompt("an old man", "back") == "an old man, back view of head"
    assert view_prompt("an old man", "back", "<back-view>") == (
        "an old man, back view of head, <back-view>, without eyes, without faces")
    assert view_prompt("an old man", "front", "<back-view>") == "an old man, front view of head"
    assert view_prompt("an old man", "overhead") == "an old man, overhead view of head"

    class Cams:
        views = ["front", "back"]

    assert view_labels(Cams(), 2) == ["front", "back"]
    assert view_labels(["side"], 1) == ["side"]
    with pytest.raises(GuidanceError, match="views"):
        view_labels(object())
    with pytest.raises(GuidanceError, match="unknown view"):
        view_labels(["top"])
    with pytest.raises(GuidanceError, match="batch"):
        view_labels(["front"], 2)


# ---------------------------------------------------------------------------
# The SDS gradient


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weighting", ["headsculpt", "dreamfusion"])
def test_sds_gradient_equals_weighted_residual(batch, weighting):
    torch.manual_seed(0)
    alphas = sd_alphas()
    eps_hat = torch.randn(batch, 4, 8, 8)
    sds = ScoreDistillation(FixedPredictor(eps_hat), alphas, encoder=RGBEncoder(), weighting=weighting)
    latents = torch.randn(batch, 4, 8, 8, requires_grad=True)
    noise = torch.randn(batch, 4, 8, 8)
    t = torch.tensor([500, 123][:batch])
    out = sds(latents, ["front", "back"][:batch], as_latent=True, t=t, noise=noise)
    out.loss.backward()
    a = alphas[t].view(-1, 1, 1, 1)
    w = a.sqrt() * (1 - a) if weighting == "headsculpt" else 1 - a
    expected = w * (eps_hat - noise) / batch
    torch.testing.assert_close(latents.grad, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.grad, expected * batch, atol=1e-6, rtol=0)
    # The predictor saw x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    x_t = sds.predictor.calls[0][0]
    torch.testing.assert_close(x_t, a.sqrt() * latents.detach() + (1 - a).sqrt() * noise)


def test_add_noise_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sds = ScoreDistillation(FixedPredictor(torch.zeros(1)), sched.alphas_cumprod, encoder=RGBEncoder())
    x0, noise, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([0, 400, 999])
    torch.testing.assert_close(sds.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


def test_gradient_clipping_and_normalisation():
    eps_hat, noise, w = torch.full((2, 1, 2, 2), 3.0), torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0])
    assert torch.equal(sds_gradient(eps_hat, noise, w), torch.cat([torch.full((1, 1, 2, 2), 3.0),
                                                                   torch.full((1, 1, 2, 2), 6.0)]))
    assert sds_gradient(eps_hat, noise, w, grad_clip=1.0).max() == 1.0
    normed = sds_gradient(eps_hat, noise, w, grad_norm_max=2.0)
    torch.testing.assert_close(normed.flatten(1).norm(dim=1), torch.tensor([2.0, 2.0]))
    nan = sds_gradient(torch.tensor([[[[float("nan")]]]]), torch.zeros(1, 1, 1, 1), torch.ones(1))
    assert torch.equal(nan, torch.zeros(1, 1, 1, 1))


def test_sds_rejects_bad_inputs():
    sds = ScoreDistillation(FixedPredictor(torch.zeros(1, 3, 4, 4)), sd_alphas(), encoder=RGBEncoder())
    with pytest.raises(GuidanceError, match=r"\(B, H, W, 3\)"):
        sds(torch.rand(1, 3, 4, 4), ["front"])
    with pytest.raises(GuidanceError, match="batch"):
        sds(torch.rand(1, 4, 4, 3), ["front", "back"])


def test_set_stage_switches_the_timestep_schedule():
    sds = ScoreDistillation(FixedPredictor(torch.zeros(1)), sd_alphas(), encoder=RGBEncoder())
    sds.set_stage((0.02, 0.5), total_steps=11, anneal="linear", anneal_to=0.3)
    assert sds.timesteps.bounds(0) == (20, 500) and sds.timesteps.bounds(10) == (20, 300)


def test_generator_state_resumes_the_same_sequence():
    sds = ScoreDistillation(FixedPredictor(torch.zeros(1, 3, 4, 4)), sd_alphas(), encoder=RGBEncoder(), seed=7)
    images = torch.rand(1, 4, 4, 3)
    sds(images, ["front"])
    state = sds.state_dict()
    a = sds(images, ["front"])
    sds.load_state_dict(state)
    b = sds(images, ["front"])
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise)


# ---------------------------------------------------------------------------
# CFG and ControlNet routing


def test_classifier_free_guidance_formula():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)


def test_text_to_image_cfg_and_landmark_routing():
    unet, net = FakeUNet(), FakeControlNet()
    pred = TextToImagePredictor(unet, constant_prompts(PROMPTS, negative=-1.0), guidance_scale=10.0,
                                controlnet=net, controlnet_scale=0.5)
    views = ["front", "back", "side", "overhead"]
    shades = (0.2, 0.9, 0.4, 0.6)
    control = torch.stack([torch.full((3, 16, 16), v) for v in shades])
    eps = pred(torch.zeros(4, 4, 8, 8), torch.tensor([10, 20, 30, 40]), GuidanceBatch(None, views, control))
    # One ControlNet call: every camera but the back one, uncond + cond stacked (3 x 2), with their landmark images.
    assert len(net.calls) == 1 and net.calls[0]["batch"] == 6 and net.calls[0]["scale"] == 0.5
    seen = net.calls[0]["cond"][:, 0, 0, 0]
    torch.testing.assert_close(seen, torch.tensor([0.2, 0.4, 0.6] * 2))
    # The UNet ran twice: the ControlNet group and the back view without residuals.
    assert sorted(c["batch"] for c in unet.calls) == [2, 6]
    for b, (view, img) in enumerate(zip(views, shades)):
        residual = 0.5 * img if view != "back" else 0.0
        uncond, cond = -1.0 + residual, PROMPTS[view] + residual
        torch.testing.assert_close(eps[b], torch.full((4, 8, 8), uncond + 10.0 * (cond - uncond)))


def test_view_labels_match_the_renderer():
    cameras = pytest.importorskip("avatar.render.cameras")
    from avatar.guidance.prompts import VIEWS

    assert set(cameras.VIEWS) == set(VIEWS)


def test_back_views_never_call_the_landmark_controlnet():
    unet, net = FakeUNet(), FakeControlNet()
    pred = TextToImagePredictor(unet, constant_prompts(PROMPTS, 0.0), 5.0, controlnet=net)
    pred(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), GuidanceBatch(None, ["back", "back"], torch.rand(2, 3, 8, 8)))
    assert net.calls == [] and len(unet.calls) == 1
    # A front view without a landmark image is a caller's mistake.
    with pytest.raises(GuidanceError, match="control_images"):
        pred(torch.zeros(1, 4, 8, 8), torch.tensor([1]), GuidanceBatch(None, ["front"], None))


def test_control_images_are_resized_to_the_controlnet_input_size():
    class Net(FakeControlNet):
        config = {"conditioning_embedding_out_channels": (16, 32, 96, 256)}  # SD: 8 px per latent

    net = Net()
    pred = TextToImagePredictor(FakeUNet(), constant_prompts(PROMPTS, 0.0), 1.0, controlnet=net)
    pred(torch.zeros(1, 4, 8, 8), torch.tensor([5]), GuidanceBatch(None, ["front"], torch.rand(1, 3, 20, 20)))
    assert net.calls[0]["cond"].shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------
# IESD and InstructPix2Pix


def test_iesd_and_ip2p_formulas():
    src, edit = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])
    torch.testing.assert_close(iesd_combine(src, edit, 0.0), src)
    torch.testing.assert_close(iesd_combine(src, edit, 1.0), edit)
    torch.testing.assert_close(iesd_combine(src, edit, 0.25), src + 0.25 * (edit - src))
    e_t, e_i, e_u = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])
    torch.testing.assert_close(instruct_pix2pix_guidance(e_t, e_i, e_u, 7.5, 1.5),
                               e_u + 7.5 * (e_t - e_i) + 1.5 * (e_i - e_u))


def test_iesd_predictor_routing_and_combination():
    unet, landmark, identity = FakeUNet(), FakeControlNet(), FakeControlNet(offset=10.0)
    source = constant_prompts(PROMPTS, negative=-1.0)
    edit = constant_prompts(dict.fromkeys(PROMPTS, 7.0), negative=99.0)  # its negative is unused
    pred = IESDPredictor(unet, source, edit, landmark_controlnet=landmark, identity_controlnet=identity,
                         guidance_scale=4.0, edit_weight=0.3, landmark_scale=1.0, identity_scale=2.0)
    views = ["front", "back"]
    lmk = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.6)])
    src_img = torch.stack([torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.7)])
    eps = pred(torch.zeros(2, 4, 8, 8), torch.tensor([3, 4]), GuidanceBatch(None, views, lmk, src_img))
    # Landmark ControlNet: only the front camera (3 conditions: uncond, source, edit).
    assert [c["batch"] for c in landmark.calls] == [3]
    torch.testing.assert_close(landmark.calls[0]["cond"][:, 0, 0, 0], torch.full((3,), 0.2))
    # Identity (InstructPix2Pix) ControlNet: every camera, on the source rendering.
    assert sorted(c["batch"] for c in identity.calls) == [3, 3]
    for b, view in enumerate(views):
        res = 2.0 * (src_img[b, 0, 0, 0].item() + 10.0) + (lmk[b, 0, 0, 0].item() if view != "back" else 0.0)
        u, s, e = -1.0 + res, PROMPTS[view] + res, 7.0 + res
        eps_src, eps_edit = u + 4.0 * (s - u), u + 4.0 * (e - u)
        torch.testing.assert_close(eps[b], torch.full((4, 8, 8), eps_src + 0.3 * (eps_edit - eps_src)))
    with pytest.raises(GuidanceError, match="source_images"):
        pred(torch.zeros(1, 4, 8, 8), torch.tensor([3]), GuidanceBatch(None, ["front"], lmk[:1], None))


def test_iesd_edit_weight_zero_keeps_the_source_prediction():
    unet = FakeUNet()
    pred = IESDPredictor(unet, constant_prompts(PROMPTS, 0.0), constant_prompts(PROMPTS, 0.0), guidance_scale=2.0,
                         edit_weight=0.0)
    eps = pred(torch.zeros(1, 4, 4, 4), torch.tensor([1]), GuidanceBatch(None, ["side"]))
    assert unet.calls[0]["batch"] == 2  # the edit condition is skipped
    torch.testing.assert_close(eps, torch.full((1, 4, 4, 4), 2.0 * PROMPTS["side"]))


def test_instruct_pix2pix_predictor_conditions():
    class FakeVAE:
        class config:  # noqa: N801 - mimics a diffusers config object
            block_out_channels = (1, 1)  # 2 px per latent

        def encode(self, x):
            class Dist:
                def mode(self_inner):
                    return torch.nn.functional.avg_pool2d(x, 2).mean(dim=1, keepdim=True).expand(-1, 4, -1, -1)

            return type("Out", (), {"latent_dist": Dist()})()

    unet = FakeUNet()
    instruction = constant_prompts(dict.fromkeys(PROMPTS, 2.0), negative=0.5)
    pred = InstructPix2PixPredictor(unet, FakeVAE(), instruction, text_scale=7.5, image_scale=1.5)
    source = torch.full((1, 3, 8, 8), 0.75)  # -> image latents 2 * 0.75 - 1 = 0.5
    eps = pred(torch.zeros(1, 4, 4, 4), torch.tensor([9]), GuidanceBatch(None, ["front"], None, source))
    assert unet.calls[0]["channels"] == 8 and unet.calls[0]["batch"] == 3
    e_t, e_i, e_u = 2.0 + 0.5, 0.5 + 0.5, 0.5 + 0.0  # text + image, image only, neither
    torch.testing.assert_close(eps, torch.full((1, 4, 4, 4), e_u + 7.5 * (e_t - e_i) + 1.5 * (e_i - e_u)))
