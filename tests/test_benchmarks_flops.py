"""The FLOP / byte / memory counting of ``benchmarks/flops.py`` (``iteration.py --flops``).

Counts are checked against hand counts; no test asserts a time.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_flops():
    name = "avatar_benchmarks_flops"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "flops.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


flops = _load_flops()


def test_linear_forward_is_2_n_in_out():
    n, n_in, n_out = 7, 5, 3
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(n, n_in)
    c = flops.count(lambda: layer(x))
    assert c.flops == 2 * n * n_in * n_out
    assert c.kernels == 1  # one addmm; the weight's transpose is a view
    # addmm reads x, W and the bias and writes the output: every byte once.
    assert c.bytes == 4 * (n * n_in + n_in * n_out + n_out + n * n_out)


def test_linear_backward_adds_grad_input_and_grad_weight():
    n, n_in, n_out = 6, 4, 9
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(n, n_in, requires_grad=True)
    c = flops.count(lambda: layer(x).sum().backward())
    assert c.flops == 3 * 2 * n * n_in * n_out  # forward, grad of x, grad of W


def test_saved_bytes_are_activations_not_parameters():
    layer = torch.nn.Linear(8, 16)
    x = torch.randn(32, 8)  # no grad: only the input is saved (for the weight's gradient)

    def step():
        torch.sigmoid(layer(x)).sum().backward()

    c = flops.count(step, layer)
    # addmm saves x (32x8); sigmoid saves its output (32x16); the weight is excluded.
    assert c.saved_bytes == 4 * (32 * 8 + 32 * 16)


def test_views_are_free_and_gathers_count_what_they_touch():
    table = torch.randn(1_000_000, 2)
    index = torch.randint(0, table.shape[0], (100,))
    c = flops.count(lambda: table.view(-1).view(1_000_000, 2)[index])
    assert c.kernels == 1
    assert c.flops == 0
    assert c.bytes == index.numel() * 8 + 2 * (100 * 2 * 4)  # the indices, then each row read and written once


def test_sync_ops_are_counted():
    x = torch.randn(100)
    c = flops.count(lambda: x[x > 0])  # a boolean mask: the host must learn the output size
    assert c.syncs >= 1


def _tiny_models():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32,
    ).eval()
    for m in (unet, controlnet, vae):
        m.requires_grad_(False)
    return unet, controlnet, vae


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


def _on_meta(models, dtype=torch.float16):
    out = []
    for m in models:
        m = m.to("meta")
        for p in m.parameters():
            p.data = p.data.to(dtype)
        out.append(m)
    return out


def test_meta_device_counts_the_same_flops_as_real_tensors(tiny_models):
    check = flops.meta_matches_real(*tiny_models, vae_resolution=32, render_resolution=16)
    assert check["equal"], check
    assert check["cpu"]["unet_cfg"] > 0 and check["cpu"]["vae_encode"] > 0


def test_diffusion_parts_of_the_tiny_guidance(tiny_models):
    unet, controlnet, vae = _on_meta(copy.deepcopy(tiny_models))
    parts = flops.diffusion_parts(unet, controlnet, vae, batch=1, render_resolutions={"coarse": 8, "fine": 32},
                                  vae_resolution=32, p_control=0.75, dtype=torch.float16)
    assert set(parts) == {"vae_encode", "unet_cfg", "unet_cfg_controlnet_share"}
    assert set(parts["vae_encode"]) == {"coarse", "fine"}
    assert 0 < parts["unet_cfg_controlnet_share"] < 1
    acc = flops.H100_SXM
    for part in (parts["unet_cfg"], *parts["vae_encode"].values()):
        c = part.count
        assert c.flops > 0 and c.bytes > 0 and c.kernels > 0
        assert part.precision == "fp16" and part.weights_bytes > 0
        row = part.to_json(acc, steps=100)
        for key in ("tflop", "gb_moved", "kernels", "saved_for_backward_mib", "weights_mib", "h100",
                    "seconds_per_avatar"):
            assert key in row
        assert row["h100"]["bound"] in ("compute", "memory", "launch")
        assert row["h100"]["ms"] > 0 and row["seconds_per_avatar"] > 0
    # The encoder's backward keeps activations; the no-grad UNet keeps none.
    assert parts["vae_encode"]["fine"].count.saved_bytes > 0
    assert parts["unet_cfg"].count.saved_bytes == 0
    # The encoder does the same work whatever the render size (it is resized first).
    coarse, fine = parts["vae_encode"]["coarse"].count, parts["vae_encode"]["fine"].count
    assert coarse.flops == fine.flops
    # Fp16 weights: 2 bytes a parameter.
    n_params = sum(p.numel() for m in (unet, controlnet) for p in m.parameters())
    assert parts["unet_cfg"].weights_bytes == 2 * n_params


def test_projection_and_markdown_from_parts(tiny_models):
    unet, controlnet, vae = _on_meta(copy.deepcopy(tiny_models))
    parts = flops.diffusion_parts(unet, controlnet, vae, batch=1, render_resolutions={"coarse": 8, "fine": 32},
                                  vae_resolution=32, p_control=1.0, dtype=torch.float16)
    stages = {"coarse": {"vae_encode": parts["vae_encode"]["coarse"], "unet_cfg": parts["unet_cfg"]},
              "fine": {"vae_encode": parts["vae_encode"]["fine"], "unet_cfg": parts["unet_cfg"]}}
    proj = flops.project(stages, {"coarse": 70, "fine": 30}, flops.H100_SXM)
    assert proj["minutes_per_avatar"] > 0
    assert abs(sum(proj["share_by_part"].values()) - 1) < 1e-2
    assert proj["dominant"][0]["part"] in {f"{s}.{p}" for s in stages for p in stages[s]}
    # Slower assumptions never make the avatar faster.
    report = {"preset": "tiny", **flops.summarise(stages, {"coarse": 70, "fine": 30})}
    assert all(m >= report["sensitivity_minutes"]["no_launch_floor_cuda_graphs"]
               for m in report["sensitivity_minutes"].values())
    table = flops.markdown(report)
    assert table.count("| coarse |") == 3 and table.count("| fine |") == 3  # two parts and the step, per stage
    assert "minutes per avatar" in table


def test_resizing_scales_work_not_launches():
    c = flops.Count(flops=10, bytes=100, kernels=3, syncs=1, saved_bytes=8)
    big = c.resized(4)
    assert (big.flops, big.bytes, big.saved_bytes) == (40, 400, 32)
    assert (big.kernels, big.syncs) == (3, 1)
    mixed = flops.Count.mean([c, big], [0.5, 0.5])
    assert mixed.flops == 25 and mixed.kernels == 3


def _tiny_taesd():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()
    return ae.requires_grad_(False)


def test_the_tiny_ae_encoder_is_costed_through_the_guidance_encoder_and_against_the_floor(tiny_models):
    unet, controlnet, vae = _on_meta(copy.deepcopy(tiny_models))
    (taesd,) = _on_meta([_tiny_taesd()])
    kw = dict(batch=1, render_resolutions={"coarse": 8, "fine": 32}, vae_resolution=32, p_control=1.0,
              dtype=torch.float16)
    sd = flops.diffusion_parts(unet, controlnet, vae, **kw)
    tiny = flops.diffusion_parts(unet, controlnet, taesd, **kw)
    assert flops.encoder_name(taesd) == "tiny-ae" and flops.encoder_name(vae) == "sd"
    assert "TAESD" in tiny["vae_encode"]["fine"].note and "SD VAE" in sd["vae_encode"]["fine"].note
    enc = tiny["vae_encode"]["fine"].count
    assert enc.flops > 0 and enc.saved_bytes > 0  # forward and backward to the image
    # Same latents for the UNet: the floor is the same whichever encoder.
    assert tiny["unet_cfg"].count.flops == sd["unet_cfg"].count.flops
    stages = {"fine": {"vae_encode": tiny["vae_encode"]["fine"], "unet_cfg": tiny["unet_cfg"]}}
    ratio = flops.floor_ratios(stages)["fine"]
    floor = tiny["unet_cfg"].count.flops
    assert ratio["flops_over_floor"] == pytest.approx((floor + enc.flops) / floor, rel=1e-3)
    assert ratio["time_over_floor"] >= 1.0 and ratio["floor_ms"] > 0
    # An encoder that runs on half the steps costs half per step, but its activations still peak.
    half = flops._amortise_encoder(stages, {"fine": 0.5})["fine"]["vae_encode"].count
    assert half.flops == enc.flops / 2 and half.saved_bytes == enc.saved_bytes


def test_floor_table_per_preset_and_encoder():
    row = {"step_tflop": 2.4, "floor_tflop": 2.2, "flops_over_floor": 1.09, "step_ms": 6.0, "floor_ms": 5.5,
           "time_over_floor": 1.09}
    report = {"preset": "fast", "encoder": "tiny-ae", "by_encoder": {
        "tiny-ae": {"minutes_per_avatar": 1.5, "goal_minutes": 5.0, "met": True, "floor_goal": 1.2,
                    "floor_goal_met": True, "encoder_tflop": {"coarse": 0.25, "fine": 0.25},
                    "step_over_floor": {"coarse": row, "fine": row}},
        "sd": {"minutes_per_avatar": 3.0, "goal_minutes": 5.0, "met": True,
               "encoder_tflop": {"coarse": 2.3, "fine": 2.3}, "step_over_floor": {"coarse": row, "fine": row}}}}
    table = flops.floor_markdown([report])
    assert table.count("\n") == 1 + 4  # header, rule, two stages for each of two encoders
    assert "| fast | tiny-ae (preset) | coarse |" in table and "step <= 1.2x floor" in table
    assert "| 1.09x |" in table and "met (<= 5 min)" in table
