"""The light encoder (TAESD through diffusers' ``AutoencoderTiny``), half precision, channels-last
and ``torch.compile`` of the guidance models, and the per-run caches of a step (issue 16).
Tiny models only: every check runs on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from huggingface_hub import constants as hub_constants
from torch.utils._python_dispatch import TorchDispatchMode

from avatar.config import EditGuidanceConfig, GenerateConfig, GuidanceConfig, make_config
from avatar.guidance import models as M
from avatar.guidance.errors import GuidanceError, WeightsUnavailableError
from avatar.guidance.factory import make_edit_guidance, make_guidance
from avatar.guidance.memory import MemoryOptions, apply_memory_options, choose_dtype
from avatar.guidance.prompts import ViewPromptEmbeddings
from avatar.guidance.sds import RGBEncoder, ScoreDistillation, TinyAEEncoder, VAEEncoder
from avatar.guidance.tiny import TINY_AE, TINY_IMAGE_SIZE, build_tiny_components, tiny_models_dir

PROMPT = "an old sea captain with a grey beard"


@pytest.fixture(scope="module", autouse=True)
def avatar_cache(tmp_path_factory):
    """A private avatar cache for this module: the tiny models are built once into it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AVATAR_CACHE_DIR", str(tmp_path_factory.mktemp("avatar-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return tiny_models_dir()


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_config(**fields) -> GuidanceConfig:
    return GuidanceConfig(model="tiny", half_precision=False, guidance_scale=7.5, **fields)


# ---------------------------------------------------------------------------
# Loading TAESD: tiny, a local folder, the hub cache, offline


def test_tiny_autoencoder_loads_through_every_loader_path(tiny_dir, tmp_path, empty_hub_cache):
    built = build_tiny_components(seed=0)["tiny_ae"]
    ae, record = M.load_tiny_autoencoder("tiny")
    assert isinstance(ae, AutoencoderTiny) and same_weights(ae, built)
    assert record["role"] == M.TINY_AE and record["kind"] == "tiny" and record["revision"].startswith("tiny-v")
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    # TAESD's convention, in the config: latents already in the UNet's scale.
    assert ae.config.scaling_factor == 1.0
    # A folder as save_pretrained writes it (TAESD's hub layout: config.json and the weights at the top).
    local = shutil.copytree(tiny_dir / TINY_AE, tmp_path / "my-taesd")
    again, rec = M.load_tiny_autoencoder(str(local))
    assert same_weights(again, built) and rec["kind"] == "local" and rec["id"] == str(local.resolve())
    # A cached hub snapshot loads offline, with its revision.
    snap = empty_hub_cache / "models--acme--taesd" / "snapshots" / ("ab" * 20)
    shutil.copytree(local, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("ab" * 20)
    cached, rec = M.load_tiny_autoencoder("acme/taesd")
    assert same_weights(cached, built) and rec["kind"] == "hub" and rec["revision"] == "ab" * 20
    # Nothing cached and no network: one line naming the repository, the download and the options.
    with pytest.raises(WeightsUnavailableError) as info:
        M.load_tiny_autoencoder(M.DEFAULT_TINY_AE)
    msg = str(info.value)
    for part in ("madebyollin/taesd", 'hf download madebyollin/taesd --include "config.json"', "HF_HUB_OFFLINE",
                 "guidance.tiny_ae=DIR", "guidance.encoder=sd", "--guidance tiny"):
        assert part in msg, part
    assert "\n" not in msg


def test_doctor_lists_taesd_with_its_download_command(empty_hub_cache):
    from avatar import doctor

    report = doctor._guidance()
    entry = report[M.DEFAULT_TINY_AE]
    assert entry["available"] is False
    assert 'hf download madebyollin/taesd --include "config.json" "diffusion_pytorch_model*.safetensors"' \
        in entry["reason"]


# ---------------------------------------------------------------------------
# The encoders: each model's own latent scaling


def test_tiny_ae_encoder_uses_taesd_conventions(tiny_dir):
    """[-1, 1] in (EncoderTiny maps it to TAESD's own [0, 1]), latents times the config's scaling
    factor (1.0 for TAESD), deterministic; the SD VAE's encoder scales its posterior by 0.18215-like
    factors instead."""
    ae, _ = M.load_tiny_autoencoder("tiny")
    enc = TinyAEEncoder(ae, resolution=TINY_IMAGE_SIZE)
    assert enc.scale_factor == 2 and enc.resolution == TINY_IMAGE_SIZE
    images = torch.rand(2, 3, 48, 48)
    z = enc.encode(images)
    x = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        raw = ae.encoder.layers(x)  # TAESD's own network on [0, 1] images
    assert z.shape == (2, 4, 32, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z, raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.encode(images), z, atol=0, rtol=0)  # no posterior sample
    torch.testing.assert_close(enc.encode_target(images), z, atol=0, rtol=0)
    # A model that defines another scaling factor gets it applied.
    ae.register_to_config(scaling_factor=0.5)
    try:
        torch.testing.assert_close(TinyAEEncoder(ae, TINY_IMAGE_SIZE).encode(images), 0.5 * z)
    finally:
        ae.register_to_config(scaling_factor=1.0)
    # The SD VAE: posterior mean times its own scaling factor.
    vae = M.load_diffusion_model("tiny").vae
    vae_enc = VAEEncoder(vae, TINY_IMAGE_SIZE)
    with torch.no_grad():
        mean = vae.encode(x * 2 - 1).latent_dist.mean
    torch.testing.assert_close(vae_enc.encode_target(images), mean * vae.config.scaling_factor)


def test_half_precision_encoders_give_fp32_latents_and_fp32_sds_gradients(tiny_dir):
    """The models may run in half precision; the latents, the SDS gradient w(t)(eps_hat - eps) and
    the render's gradient are fp32."""
    ae, _ = M.load_tiny_autoencoder("tiny", dtype=torch.bfloat16)

    class HalfPredictor:
        def __call__(self, x_t, t, batch):
            return (0.5 * x_t + 0.25).to(torch.bfloat16)

    alphas = M.noise_schedule().alphas_cumprod
    sds = ScoreDistillation(HalfPredictor(), alphas, encoder=TinyAEEncoder(ae, TINY_IMAGE_SIZE, torch.bfloat16))
    images = torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3, requires_grad=True)
    t = torch.tensor([100, 800])
    noise = torch.randn(2, 4, 32, 32)
    out = sds.score_distillation(images, ["front", "back"], t=t, noise=noise)
    assert out.latents.dtype == out.grad.dtype == out.eps_hat.dtype == torch.float32
    w = (alphas[t].sqrt() * (1 - alphas[t])).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, w * (out.eps_hat - noise), atol=0, rtol=0)
    out.loss.backward()
    assert images.grad.dtype == torch.float32 and bool(torch.isfinite(images.grad).all())


# ---------------------------------------------------------------------------
# The factory: guidance.encoder


def test_encoder_choice_in_generation_guidance(tiny_dir):
    sd = make_guidance(tiny_config(encoder="sd"), PROMPT, "cpu", seed=0)
    assert isinstance(sd.encoder, VAEEncoder) and "tiny_ae" not in sd.records
    fast = make_guidance(tiny_config(encoder="tiny-ae"), PROMPT, "cpu", seed=0)
    assert isinstance(fast.encoder, TinyAEEncoder) and isinstance(fast.encoder.ae, AutoencoderTiny)
    assert fast.records["tiny_ae"]["kind"] == "tiny" and "image encoder: tiny-ae (TAESD)" in fast.notes
    # Same resolution and latent size as the SD VAE: the UNet sees the same shapes.
    assert (fast.encoder.resolution, fast.encoder.scale_factor) == (sd.encoder.resolution, sd.encoder.scale_factor)
    images = torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3, requires_grad=True)
    out = fast.score_distillation(images, ["front", "back"], control_images=torch.rand(2, 64, 64, 3))
    out.loss.backward()
    assert out.latents.shape == (2, 4, 32, 32)
    assert bool(torch.isfinite(images.grad).all()) and float(images.grad.abs().max()) > 0
    with pytest.raises(GuidanceError, match="unknown guidance.encoder 'taesd': choose one of sd, tiny-ae"):
        make_guidance(tiny_config(encoder="taesd"), PROMPT, "cpu")


def test_oracle_guidance_ignores_the_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "load_tiny_autoencoder", lambda *a, **k: pytest.fail("the oracle loaded TAESD"))
    g = make_guidance(GuidanceConfig(model="oracle:head.obj", encoder="tiny-ae"), PROMPT, "cpu",
                      render_target=lambda cams: torch.zeros(1, 8, 8, 3))
    assert isinstance(g.encoder, RGBEncoder) and g.kind == "oracle"


def test_edits_encode_renders_with_tiny_ae_but_ip2p_image_latents_keep_the_sd_vae(tiny_dir):
    base = GuidanceConfig(model="tiny", encoder="tiny-ae", half_precision=False)
    ip2p = make_edit_guidance(EditGuidanceConfig(mode="ip2p", model="tiny"), PROMPT, "give him a hat", "cpu",
                              base=base)
    assert isinstance(ip2p.encoder, TinyAEEncoder)
    assert isinstance(ip2p.predictor.vae, AutoencoderKL)  # InstructPix2Pix's image latents: the real posterior
    iesd = make_edit_guidance(EditGuidanceConfig(model="tiny"), PROMPT, "give him a hat", "cpu", base=base)
    assert isinstance(iesd.encoder, TinyAEEncoder) and "tiny_ae" in iesd.records
    plain = make_edit_guidance(EditGuidanceConfig(model="tiny"), PROMPT, "give him a hat", "cpu",
                               base=GuidanceConfig(model="tiny", half_precision=False))
    assert isinstance(plain.encoder, VAEEncoder)


def test_presets_fast_and_smoke_use_tiny_ae_quality_keeps_the_sd_vae():
    assert make_config(GenerateConfig, "quality").guidance.encoder == "sd"
    assert make_config(GenerateConfig, "fast").guidance.encoder == "tiny-ae"
    assert make_config(GenerateConfig, "smoke").guidance.encoder == "tiny-ae"
    assert GuidanceConfig().tiny_ae == M.DEFAULT_TINY_AE == "madebyollin/taesd"


# ---------------------------------------------------------------------------
# Half precision: the dtype, a pure function


@pytest.mark.parametrize(("device", "half", "ask", "bf16", "want"), [
    ("cpu", True, "auto", True, torch.float32),
    ("cuda", False, "auto", True, torch.float32),
    ("cuda", True, "auto", True, torch.bfloat16),
    ("cuda", True, "auto", False, torch.float16),
    ("cuda", True, "fp16", True, torch.float16),
    ("cuda", True, "bf16", True, torch.bfloat16),
    ("cpu", True, "bf16", False, torch.float32),
])
def test_the_guidance_dtype_is_chosen_from_device_options_and_bf16_support(device, half, ask, bf16, want):
    assert choose_dtype(device, half, ask, bf16) == want


def test_bf16_on_a_card_without_it_and_unknown_dtypes_are_one_line_errors():
    with pytest.raises(GuidanceError, match="does not support bf16: set guidance.half_dtype=fp16"):
        choose_dtype("cuda", True, "bf16", False)
    with pytest.raises(GuidanceError, match="unknown guidance.half_dtype 'fp8'"):
        choose_dtype("cpu", True, "fp8", False)


# ---------------------------------------------------------------------------
# Channels-last and torch.compile


def test_channels_last_covers_the_encoders_too(tiny_dir):
    model = M.load_diffusion_model("tiny")
    ae, _ = M.load_tiny_autoencoder("tiny")
    net, _ = M.load_controlnet("tiny")
    modules, applied = apply_memory_options({"unet": model.unet, "vae": model.vae, "tiny_ae": ae,
                                             "controlnet_landmark": net}, "cpu", MemoryOptions(channels_last=True))
    assert "channels_last" in applied
    for name, module in modules.items():
        convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs), name


class _FakeCompile:
    """Records what torch.compile is asked to compile, and returns it unchanged."""

    def __init__(self):
        self.calls: list[tuple[object, dict]] = []

    def __call__(self, fn, **kwargs):
        self.calls.append((fn, kwargs))
        return fn


def test_compile_wraps_unet_controlnet_and_encoder_with_static_shapes(tiny_dir, monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    g = make_guidance(tiny_config(encoder="tiny-ae", compile=True), PROMPT, "cpu")
    compiled = [fn for fn, _ in fake.calls]
    assert any(fn is g.predictor.unet for fn in compiled) and any(fn is g.predictor.controlnet for fn in compiled)
    assert any(getattr(fn, "__self__", None) is g.encoder for fn in compiled)  # the encoder's forward
    assert all(kw.get("dynamic") is False for _, kw in fake.calls)
    assert "torch.compile(unet, controlnet)" in g.notes
    fake.calls.clear()
    g = make_guidance(tiny_config(encoder="sd", compile=True), PROMPT, "cpu")
    assert any(getattr(fn, "__self__", None) is g.encoder for fn, _ in fake.calls)
    fake.calls.clear()
    make_guidance(tiny_config(), PROMPT, "cpu")
    assert fake.calls == []
    with pytest.raises(GuidanceError, match="compile and guidance.cpu_offload"):
        apply_memory_options({"unet": torch.nn.Linear(1, 1)}, "cpu", MemoryOptions(compile=True, cpu_offload=True))


@pytest.mark.slow
def test_compiled_and_eager_guidance_agree(tiny_dir):
    """Inductor on the CPU (a C++ compiler; about a minute or two on 2 cores): the compiled UNet,
    ControlNet and encoder give the eager step's noise prediction, latents and render gradient."""
    results = []
    images = torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    control = torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    t, noise = torch.tensor([300, 600]), torch.randn(2, 4, 32, 32)
    for compile in (False, True):
        g = make_guidance(tiny_config(encoder="tiny-ae", compile=compile), PROMPT, "cpu")
        x = images.clone().requires_grad_()
        out = g.score_distillation(x, ["front", "side"], control_images=control, t=t, noise=noise)
        out.loss.backward()
        results.append((out.eps_hat, out.latents, x.grad))
    (eps, lat, grad), (eps_c, lat_c, grad_c) = results
    torch.testing.assert_close(lat_c, lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_c, eps, atol=1e-4 * float(eps.abs().max()), rtol=1e-4)
    torch.testing.assert_close(grad_c, grad, atol=1e-4 * float(grad.abs().max()), rtol=1e-4)


# ---------------------------------------------------------------------------
# No repeated work inside a step


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_to_copy", "copy_", "stack", "cat"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_view_embeddings_reach_the_device_once_per_run():
    emb = ViewPromptEmbeddings("p", {}, {v: torch.randn(77, 8) for v in ("front", "side", "back", "overhead")},
                               "", torch.randn(77, 8))
    first = emb.select(["front", "back"], "cpu", torch.bfloat16)
    with _Copies() as copies:
        again = emb.select(["front", "back"], "cpu", torch.bfloat16)
    assert copies.n == 0  # no cast, no stack, no copy on later steps
    assert again[0] is first[0] and again[1] is first[1]
    torch.testing.assert_close(first[0][1], emb.cond["back"].to(torch.bfloat16))
    assert first[1].shape == (2, 77, 8)
    other = emb.select(["side"], "cpu", torch.bfloat16)
    torch.testing.assert_close(other[0][0], emb.cond["side"].to(torch.bfloat16))
