"""Loading guidance components (tiny, local folders, the hub cache, offline failures), prompts,
textual inversion, memory options, and SDS / IESD / InstructPix2Pix end to end with tiny models."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: F401 - import before timing offline loads
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from avatar.config import EditGuidanceConfig, GuidanceConfig
from avatar.guidance import models as M
from avatar.guidance.errors import GuidanceError, WeightsUnavailableError
from avatar.guidance.factory import make_edit_guidance, make_guidance
from avatar.guidance.memory import MemoryOptions, apply_memory_options, memory_options_report
from avatar.guidance.prompts import TextEmbedder, load_back_view_embedding
from avatar.guidance.sds import classifier_free_guidance, sds_weight
from avatar.guidance.tiny import TINY_IMAGE_SIZE, build_tiny_components, tiny_models_dir

PROMPT = "an old sea captain with a grey beard"


@pytest.fixture(scope="module", autouse=True)
def avatar_cache(tmp_path_factory):
    """A private avatar cache for this module: the tiny models are built once into it."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("avatar-cache")
    mp.setenv("AVATAR_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are too small to gain from threads, and on a shared 2-core machine
    OpenMP threads that wait on each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(avatar_cache) -> Path:
    return tiny_models_dir()


@pytest.fixture(scope="module")
def tiny_guidance(tiny_dir):
    return make_guidance(GuidanceConfig(model="tiny", half_precision=False), PROMPT, "cpu", seed=0)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------
# Tiny models and the tokenizer


def test_tiny_models_round_trip_through_from_pretrained(tiny_dir, tmp_path):
    built = build_tiny_components(seed=0)
    model = M.load_diffusion_model("tiny")
    assert model.record["kind"] == "tiny" and model.record["revision"].startswith("tiny-v")
    assert same_weights(model.unet, built["unet"]) and same_weights(model.vae, built["vae"])
    assert same_weights(model.text_encoder, built["text_encoder"])
    net, record = M.load_controlnet("tiny")
    assert same_weights(net, built["controlnets"]["controlnet-landmark"]) and record["role"] == M.LANDMARK_CONTROLNET
    ip2p = M.load_diffusion_model("tiny", M.INSTRUCT_PIX2PIX)
    assert ip2p.unet.config.in_channels == 8 and same_weights(ip2p.unet, built["ip2p_unet"])
    # SD 1.5's noise schedule.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(model.scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    # The same folder copied elsewhere loads as a local diffusers folder.
    local = shutil.copytree(tiny_dir / "stable-diffusion", tmp_path / "my-sd")
    again = M.load_diffusion_model(str(local))
    assert again.record == {"role": "text2img", "spec": str(local), "kind": "local", "id": str(local.resolve()),
                            "subfolder": None, "revision": None}
    assert same_weights(again.unet, model.unet)
    with pytest.raises(GuidanceError, match="input channels"):
        M.load_diffusion_model(str(local), M.INSTRUCT_PIX2PIX)
    with pytest.raises(GuidanceError, match="unet/config.json|config.json"):
        M.load_diffusion_model(str(tmp_path))


def test_tiny_tokenizer_is_a_real_clip_tokenizer(tiny_dir):
    folder = tiny_dir / "stable-diffusion" / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert not (folder / "tokenizer.json").exists()
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = "a portrait of an old man, back view"
    ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 == tok.model_max_length
    content = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and content[-1] == tok.eos_token_id
    assert ids[len(content):] == [tok.pad_token_id] * (77 - len(content)) and tok.pad_token_id == tok.eos_token_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ,", ",") == text  # CLIP decodes punctuation as its own word
    assert tok(decoded, padding="max_length", max_length=77).input_ids == ids
    assert tok.tokenize("old man back view") == ["old</w>", "man</w>", "back</w>", "view</w>"]
    long = tok(" ".join(["beard"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == tok.bos_token_id and long[-1] == tok.eos_token_id
    # The text encoder's config agrees with the tokenizer.
    cfg = M.load_diffusion_model("tiny").text_encoder.config
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == 77
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


# ---------------------------------------------------------------------------
# The hub: cache, offline, unreachable


def test_offline_hub_id_fails_fast_with_the_options(empty_hub_cache, offline):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        M.load_diffusion_model(M.DEFAULT_TEXT2IMG)
    assert time.monotonic() - start < 5.0
    msg = str(info.value)
    for part in (M.DEFAULT_TEXT2IMG, str(empty_hub_cache), "HF_HUB_OFFLINE", f"hf download {M.DEFAULT_TEXT2IMG}",
                 "--guidance DIR", "--guidance tiny"):
        assert part in msg, part
    with pytest.raises(WeightsUnavailableError, match="diffusion_sd15") as info:
        M.load_controlnet(M.DEFAULT_LANDMARK_CONTROLNET)
    assert "guidance.controlnet" in str(info.value)


def test_unreachable_hub_fails_fast(empty_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="unreachable") as info:
        make_guidance(GuidanceConfig(), PROMPT)
    assert time.monotonic() - start < 5.0
    assert "--guidance tiny" in str(info.value) and str(empty_hub_cache) in str(info.value)


def _fake_hub_repo(hub: Path, repo: str, source: Path, sub: str | None = None, sha: str = "0123abcd" * 5) -> str:
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    shutil.copytree(source, snap / sub if sub else snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    return sha


def test_cached_hub_snapshots_load_offline_with_their_revision(tiny_dir, empty_hub_cache, offline):
    sha = _fake_hub_repo(empty_hub_cache, "acme/tiny-sd", tiny_dir / "stable-diffusion")
    _fake_hub_repo(empty_hub_cache, "acme/face-cn", tiny_dir / "controlnet-landmark", sub="diffusion_sd15",
                   sha="feed" * 10)
    model = M.load_diffusion_model("acme/tiny-sd")
    assert model.record["kind"] == "hub" and model.record["id"] == "acme/tiny-sd" and model.record["revision"] == sha
    net, record = M.load_controlnet("acme/face-cn/diffusion_sd15")
    assert record["subfolder"] == "diffusion_sd15" and record["revision"] == "feed" * 10
    assert M.local_cache_status("acme/tiny-sd")["available"]
    status = M.local_cache_status("acme/other")
    assert not status["available"] and "hf download acme/other" in status["reason"]
    # A partial download (configs without weights) is reported, not crashed on.
    weights = next((empty_hub_cache / "models--acme--tiny-sd" / "snapshots" / sha / "unet").glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(WeightsUnavailableError, match="incomplete"):
        M.load_diffusion_model("acme/tiny-sd")


def test_weights_specs():
    assert M.parse_weights_spec("tiny").kind == "tiny"
    spec = M.parse_weights_spec(M.DEFAULT_LANDMARK_CONTROLNET, M.LANDMARK_CONTROLNET)
    assert (spec.kind, spec.location, spec.subfolder) == ("hub", M.DEFAULT_LANDMARK_CONTROLNET, "diffusion_sd15")
    assert M.parse_weights_spec("owner/name/a/b").subfolder == "a/b"
    assert M.oracle_mesh("oracle:heads/a.obj") == "heads/a.obj" and M.oracle_mesh("tiny") is None
    with pytest.raises(GuidanceError, match="neither an existing folder nor"):
        M.parse_weights_spec("not a repo id")


# ---------------------------------------------------------------------------
# Prompts and textual inversion


def test_prompt_embeddings_are_cached_on_disk(tiny_dir, tmp_path):
    model = M.load_diffusion_model("tiny")
    first = TextEmbedder(model.tokenizer, model.text_encoder, "tiny-key", cache_folder=tmp_path)
    a = first(["a viking, front view", "blurry"])
    assert a.shape == (2, 77, 32) and first.misses == 2
    second = TextEmbedder(model.tokenizer, None, "tiny-key", cache_folder=tmp_path)  # the encoder is gone
    torch.testing.assert_close(second(["blurry", "a viking, front view"]), a.flip(0))
    assert second.hits == 2
    other = TextEmbedder(model.tokenizer, None, "another-model", cache_folder=tmp_path)
    with pytest.raises(GuidanceError, match="freed"):
        other(["blurry"])


def test_textual_inversion_adds_the_back_view_token(tiny_dir, tmp_path):
    model = M.load_diffusion_model("tiny")
    embed = TextEmbedder(model.tokenizer, model.text_encoder)
    before = embed(["an old man, <back-view>"])
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<back-view>": vector}, str(path))
    token_text = load_back_view_embedding(path, model)
    assert token_text == "<back-view>"
    token_id = model.tokenizer.convert_tokens_to_ids("<back-view>")
    assert model.tokenizer.tokenize("an old man, <back-view>")[-1] == "<back-view>"
    torch.testing.assert_close(model.text_encoder.get_input_embeddings().weight[token_id], vector)
    after = embed(["an old man, <back-view>"])
    assert not torch.allclose(before, after)
    # A multi-vector file expands to several tokens, as diffusers' maybe_convert_prompt does.
    multi = tmp_path / "multi.safetensors"
    save_file({"<hair-back>": torch.randn(3, 32)}, str(multi))
    assert load_back_view_embedding(multi, model) == "<hair-back> <hair-back>_1 <hair-back>_2"
    with pytest.raises(GuidanceError, match="does not exist"):
        load_back_view_embedding(tmp_path / "missing.pt", model)


def test_make_guidance_uses_the_back_view_token(tiny_dir, tmp_path):
    path = tmp_path / "back.safetensors"
    save_file({"<back-view>": torch.randn(32)}, str(path))
    g = make_guidance(GuidanceConfig(model="tiny", half_precision=False, back_view_embedding=str(path)), PROMPT)
    assert g.predictor.prompts.texts["back"] == f"{PROMPT}, back view of head, <back-view>, without eyes, without faces"
    assert g.predictor.prompts.texts["front"] == f"{PROMPT}, front view of head"
    assert g.records["back_view_embedding"]["token"] == "<back-view>"


# ---------------------------------------------------------------------------
# End to end with tiny models


def test_tiny_guidance_records_notes_and_view_prompts(tiny_guidance):
    g = tiny_guidance
    assert g.kind == "tiny" and any("random weights" in n for n in g.notes)
    assert set(g.records) == {"model", "controlnet"}
    assert all(r["revision"] for r in g.records.values())
    assert g.encoder.resolution == TINY_IMAGE_SIZE
    words = {"front": "front view of head", "side": "side view of head", "back": "back view of head",
             "overhead": "overhead view of head"}
    assert g.predictor.prompts.texts == {v: f"{PROMPT}, {w}" for v, w in words.items()}


def test_make_guidance_frees_the_text_encoder_and_caches_embeddings(tiny_dir, monkeypatch):
    from avatar.guidance import factory

    loaded = []
    real = factory.M.load_diffusion_model
    monkeypatch.setattr(factory.M, "load_diffusion_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    cfg = GuidanceConfig(model="tiny", half_precision=False, view_dependent_prompt=False)
    first = make_guidance(cfg, "a clown with white face paint")
    assert loaded[0].text_encoder is None
    # The second build finds every embedding on disk: its text encoder is never called.
    monkeypatch.setattr(TextEmbedder, "tokenize", lambda *a: pytest.fail("text encoder called again"))
    second = make_guidance(cfg, "a clown with white face paint")
    assert torch.equal(first.predictor.prompts.cond["back"], second.predictor.prompts.cond["back"])
    assert first.predictor.prompts.texts["back"] == "a clown with white face paint"


def test_tiny_sds_on_rgb_renders_backpropagates(tiny_guidance):
    images = torch.rand(2, 24, 24, 3, requires_grad=True)
    out = tiny_guidance(images, ["front", "back"], torch.rand(2, 24, 24, 3), step=0)
    assert out.latents.shape == (2, 4, TINY_IMAGE_SIZE // 2, TINY_IMAGE_SIZE // 2)
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert set(out.metrics()) == {"sds_loss", "sds_t", "sds_grad_norm"}


def test_tiny_sds_prediction_is_cfg_with_landmark_control_except_back(tiny_guidance):
    g = tiny_guidance
    p = g.predictor
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    control = torch.rand(2, 32, 32, 3)
    noise, t = torch.randn(2, 4, 16, 16), torch.tensor([400, 700])
    out = g(latents, ["front", "back"], control, as_latent=True, t=t, noise=noise)
    out.loss.backward()
    x_t = g.add_noise(latents.detach(), noise, t)
    cond, uncond = p.prompts.select(["front", "back"])
    with torch.no_grad():
        x2, t2, enc = torch.cat([x_t[:1]] * 2), t[:1].repeat(2), torch.cat([uncond[:1], cond[:1]])
        ctrl = control[:1].permute(0, 3, 1, 2).repeat(2, 1, 1, 1)  # 32 px = 16 latents x 2
        down, mid = p.controlnet(x2, t2, encoder_hidden_states=enc, controlnet_cond=ctrl,
                                 conditioning_scale=p.controlnet_scale, return_dict=False)
        front = p.unet(x2, t2, encoder_hidden_states=enc, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        back = p.unet(torch.cat([x_t[1:]] * 2), t[1:].repeat(2),
                      encoder_hidden_states=torch.cat([uncond[1:], cond[1:]])).sample
    expected = torch.cat([classifier_free_guidance(*front.chunk(2), p.guidance_scale),
                          classifier_free_guidance(*back.chunk(2), p.guidance_scale)])
    torch.testing.assert_close(out.eps_hat, expected, atol=1e-4, rtol=1e-4)
    w = sds_weight(g.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(latents.grad, w * (out.eps_hat - noise) / 2, atol=1e-6, rtol=0)
    # Another landmark image changes the front prediction only.
    other = g(latents, ["front", "back"], torch.rand(2, 32, 32, 3), as_latent=True, t=t, noise=noise)
    assert not torch.allclose(other.eps_hat[0], out.eps_hat[0]) and torch.equal(other.eps_hat[1], out.eps_hat[1])


def test_tiny_iesd_is_linear_in_the_edit_weight_and_routes_controls(tiny_dir):
    base = GuidanceConfig(model="tiny", half_precision=False)
    g = make_edit_guidance(EditGuidanceConfig(model="tiny", half_precision=False), PROMPT,
                           "give him a red woollen hat", strength=1.0, base=base)
    assert set(g.records) == {"model", "controlnet", "identity_controlnet"}
    # HeadSculpt's IESD CFG (E1): 100, already in the standard form there, so not 101.
    assert g.predictor.guidance_scale == EditGuidanceConfig.guidance_scale == 100.0
    latents, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([300, 600])
    lmk, src = torch.rand(2, 32, 32, 3), torch.rand(2, 32, 32, 3)
    views = ["front", "back"]

    def eps(weight, lmk=lmk, src=src):
        g.predictor.edit_weight = weight
        return g(latents, views, lmk, as_latent=True, t=t, noise=noise, source_images=src).eps_hat

    e0, e1, e_half = eps(0.0), eps(1.0), eps(0.5)
    torch.testing.assert_close(e_half, 0.5 * (e0 + e1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(e0, e1)
    # The landmark image steers the front camera only; the source rendering steers both.
    e_lmk = eps(0.5, lmk=torch.rand(2, 32, 32, 3))
    assert not torch.allclose(e_lmk[0], e_half[0]) and torch.allclose(e_lmk[1], e_half[1])
    e_src = eps(0.5, src=torch.rand(2, 32, 32, 3))
    assert not torch.allclose(e_src[0], e_half[0]) and not torch.allclose(e_src[1], e_half[1])


def test_editing_a_tiny_run_stays_tiny_offline(tiny_dir, empty_hub_cache, offline):
    # The edit config keeps its hub defaults; the source run's guidance was tiny.
    g = make_edit_guidance(EditGuidanceConfig(half_precision=False), PROMPT, "add a crown",
                           base=GuidanceConfig(model="tiny", half_precision=False))
    assert g.kind == "tiny" and {r["kind"] for r in g.records.values()} == {"tiny"}
    assert g.predictor.source_prompts.negative_text == GuidanceConfig.negative_prompt


def test_instruct_pix2pix_mode_uses_headsculpt_scales(tiny_dir):
    # E1, E3: HeadSculpt's pure InstructPix2Pix distillation uses text 100 and image 20
    # (not diffusers' sampling defaults 7.5 and 1.5).
    g = make_edit_guidance(EditGuidanceConfig(model="tiny", mode="ip2p", half_precision=False), PROMPT,
                           "make the hair bright blue")
    assert (g.predictor.text_scale, g.predictor.image_scale) == (100.0, 20.0)


def test_tiny_instruct_pix2pix_mode(tiny_dir):
    cfg = EditGuidanceConfig(model="tiny", half_precision=False, guidance_scale=1.0, image_guidance_scale=1.0)
    cfg.mode = "ip2p"  # field proposed for EditGuidanceConfig
    g = make_edit_guidance(cfg, PROMPT, "make the hair bright blue")
    p = g.predictor
    assert p.unet.config.in_channels == 8
    latents, noise, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor([500])
    src = torch.rand(1, 32, 32, 3)
    out = g(latents, ["side"], as_latent=True, t=t, noise=noise, source_images=src)
    # With both scales 1 the guided prediction is the fully conditioned one.
    x_t = g.add_noise(latents, noise, t)
    image = p.image_latents(src.permute(0, 3, 1, 2), (16, 16))
    cond, _ = p.instruction.select(["side"])
    with torch.no_grad():
        expected = p.unet(torch.cat([x_t, image], 1), t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out.eps_hat, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(GuidanceError, match="source_images"):
        g(latents, ["side"], as_latent=True)


# ---------------------------------------------------------------------------
# Memory options


def test_memory_options_on_the_cpu(tiny_dir):
    model = M.load_diffusion_model("tiny")
    net, _ = M.load_controlnet("tiny")
    modules, applied = apply_memory_options({"unet": model.unet, "vae": model.vae, "controlnet": net}, "cpu",
                                            MemoryOptions(attention_slicing=True, channels_last=True,
                                                          cpu_offload=True))
    assert "attention_slicing" in applied and "channels_last" in applied and "fp16" not in applied
    assert any(a.startswith("cpu_offload skipped") for a in applied)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        out = modules["unet"](x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == x.shape
    report = memory_options_report()
    assert set(report) == {"fp16", "bf16", "attention_slicing", "cpu_offload", "channels_last", "torch_compile"}
    assert all(isinstance(e["available"], bool) and e["reason"] for e in report.values())


def test_cpu_offload_without_accelerate_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(GuidanceError, match="pip install accelerate"):
        apply_memory_options({"unet": torch.nn.Linear(1, 1)}, "cuda", MemoryOptions(cpu_offload=True))


def test_attention_is_pytorchs_fused_kernel_unless_slicing_is_asked(tiny_dir):
    """Slicing replaces scaled_dot_product_attention (flash / memory-efficient kernels on a GPU)
    with a slower loop: it must only happen when a user asks for it."""
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    from avatar.config import GuidanceConfig

    assert GuidanceConfig().attention_slicing is False

    def processors(opts: MemoryOptions) -> set[type]:
        model = M.load_diffusion_model("tiny")
        net, _ = M.load_controlnet("tiny")
        modules, _ = apply_memory_options({"unet": model.unet, "vae": model.vae, "controlnet": net}, "cpu", opts)
        return {type(p) for name in ("unet", "controlnet") for p in modules[name].attn_processors.values()}

    assert processors(MemoryOptions()) == {AttnProcessor2_0}
    assert processors(MemoryOptions(attention_slicing=True)) == {SlicedAttnProcessor}
