"""Tiny diffusion models: small seeded random components for plumbing, tests and CPU smoke runs.

``--guidance tiny`` builds (once, into ``cache_dir("tiny", ...)``) folders laid out
like the real Hugging Face repositories and loads them back through the same
``from_pretrained(local_files_only=True)`` path as real weights
(:mod:`avatar.guidance.models`):

``stable-diffusion/``       a Stable Diffusion 1.5-shaped pipeline folder (tokenizer, text encoder,
                            UNet with 4 input channels, VAE, DDIM scheduler with SD 1.5's betas)
``instruct-pix2pix/``       the same with an 8-input-channel UNet (noisy latents + image latents)
``controlnet-landmark/``    a ControlNet matching the tiny UNet (stands in for the MediaPipe-face one)
``controlnet-ip2p/``        a second ControlNet (stands in for ``control_v11e_sd15_ip2p``)
``tiny-ae/``                an ``AutoencoderTiny`` with the tiny VAE's downsampling (stands in for
                            TAESD, ``madebyollin/taesd``)

The tokenizer is a real ``CLIPTokenizer`` over a byte-level BPE vocabulary that we
train here with the ``tokenizers`` library from the project's prompt files plus the
view words, written as CLIP's ``vocab.json`` / ``merges.txt`` (the files SD 1.5's
tokenizer loads from). The architecture sizes follow diffusers' own
``get_dummy_components()`` test configs, shrunk so that a UNet forward on 32x32
latents takes milliseconds on a CPU.

The weights are random: images made with them mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "2"
"""Bumped whenever the tiny architecture or its build changes (a new cache folder is used)."""

TEXT2IMG = "stable-diffusion"
INSTRUCT_PIX2PIX = "instruct-pix2pix"
LANDMARK_CONTROLNET = "controlnet-landmark"
IDENTITY_CONTROLNET = "controlnet-ip2p"
TINY_AE = "tiny-ae"
TINY_FOLDERS = (TEXT2IMG, INSTRUCT_PIX2PIX, LANDMARK_CONTROLNET, IDENTITY_CONTROLNET, TINY_AE)

TINY_IMAGE_SIZE = 64
"""Image size fed to the tiny VAE (it downsamples by 2: 64 px -> 32x32 latents), the tiny
counterpart of SD 1.5's 512 px -> 64x64 latents."""

MAX_LENGTH = 77
"""Token sequence length, as CLIP ViT-L/14 in SD 1.5."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

VIEW_WORDS = (
    "front view", "side view", "back view of head", "back view", "overhead view",
    "a portrait of an old man, back view", "a photo of the head of a person",
    "blurry, low quality, deformed, cropped, multiple faces",
)
"""Text added to the prompt files when training the tiny vocabulary."""

_FALLBACK_CORPUS = (
    "an old sea captain with a grey beard",
    "a young woman with freckles and curly red hair",
    "give him a red woollen hat",
    "put on round glasses",
)
"""Used when the prompt files are not present (an installed, non-editable package)."""


# ---------------------------------------------------------------------------
# Tokenizer


def prompt_corpus() -> list[str]:
    """Lines of ``prompts/heads.txt`` and ``prompts/edits.txt`` (comments skipped) plus :data:`VIEW_WORDS`."""
    root = Path(__file__).resolve().parents[2] / "prompts"
    lines: list[str] = []
    for name in ("heads.txt", "edits.txt"):
        path = root / name
        if path.is_file():
            lines += [s.strip() for s in path.read_text(encoding="utf-8").splitlines()
                      if s.strip() and not s.lstrip().startswith("#")]
    if not lines:
        lines = list(_FALLBACK_CORPUS)
    return lines + list(VIEW_WORDS)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# CLIP's pre-tokenisation: the regex of openai/CLIP's SimpleTokenizer (also used by
# transformers' CLIPTokenizer), then byte-level characters.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_bpe(texts: list[str], vocab_size: int = 4096) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a CLIP-style byte-level BPE on ``texts``; return (vocab, merges).

    The vocabulary is laid out as openai/CLIP lays out its own: the 256 byte
    characters, the same with the end-of-word marker ``</w>``, one token per merge
    in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (so bos = V-2,
    eos = V-1). Any text tokenises (unknown words fall back to bytes).
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=EOS_TOKEN, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=[], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write the files SD 1.5's ``tokenizer/`` folder has: vocab.json, merges.txt and the configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json",):  # a fast-tokenizer file would shadow vocab.json/merges.txt
        (folder / stale).unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------
# Models


def _randomise_zero_convs(controlnet, std: float = 0.05) -> None:
    """A fresh ControlNet's zero convolutions (its outputs, and the last layer of its condition
    embedding) make it a no-op by design; give them small random weights so that the tiny
    ControlNets' residuals depend on their control image and visibly change the UNet's prediction."""
    import torch

    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.normal_(0.0, std)
            conv.bias.zero_()


def _unet_kwargs() -> dict:
    return dict(
        sample_size=32, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_autoencoder_kwargs() -> dict:
    """An ``AutoencoderTiny`` (TAESD's architecture) shrunk like the tiny VAE: 2 blocks, so it
    downsamples by 2 as the tiny VAE does (TAESD's 4 blocks downsample by 8, as SD's VAE)."""
    return dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 1), latent_channels=4)


def build_tiny_components(seed: int = 0) -> dict:
    """Seeded random components (not saved): tokenizer, text encoder, UNets, VAE, scheduler, ControlNets
    and a tiny autoencoder."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = train_clip_bpe(prompt_corpus())
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), vocab, merges)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=32, layer_norm_eps=1e-5,
            bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
        )).eval()
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **_unet_kwargs()).eval()
        ip2p_unet = UNet2DConditionModel(in_channels=8, out_channels=4, **_unet_kwargs()).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=TINY_IMAGE_SIZE,
        ).eval()
        controlnets = {}
        for name in (LANDMARK_CONTROLNET, IDENTITY_CONTROLNET):
            kwargs = {k: v for k, v in _unet_kwargs().items() if k not in ("up_block_types", "sample_size")}
            net = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 16), **kwargs).eval()
            _randomise_zero_convs(net)
            controlnets[name] = net
        tiny_ae = AutoencoderTiny(**tiny_autoencoder_kwargs()).eval()
    # SD 1.5's noise schedule (its scheduler_config.json), with DDIM as HeadSculpt uses.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {"vocab": vocab, "merges": merges, "tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet,
            "ip2p_unet": ip2p_unet, "vae": vae, "scheduler": scheduler, "controlnets": controlnets,
            "tiny_ae": tiny_ae}


def save_tiny_models(folder: Path, seed: int = 0) -> None:
    """Build the tiny components and save them under ``folder`` in the real repositories' layouts."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    c = build_tiny_components(seed)
    common = dict(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], scheduler=c["scheduler"],
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    StableDiffusionPipeline(unet=c["unet"], **common).save_pretrained(folder / TEXT2IMG)
    StableDiffusionInstructPix2PixPipeline(unet=c["ip2p_unet"], **common).save_pretrained(folder / INSTRUCT_PIX2PIX)
    for sub in (TEXT2IMG, INSTRUCT_PIX2PIX):
        # transformers 5 saves a tokenizer.json only; write CLIP's own files as SD 1.5 ships them.
        shutil.rmtree(folder / sub / "tokenizer")
        write_clip_tokenizer(folder / sub / "tokenizer", c["vocab"], c["merges"])
    for name, net in c["controlnets"].items():
        net.save_pretrained(folder / name)
    c["tiny_ae"].save_pretrained(folder / TINY_AE)
    # AutoencoderTiny records block_out_channels (the decoder's) in its config but does not take it
    # back, and diffusers warns about it on every load: drop it (the loader would ignore it).
    config_path = folder / TINY_AE / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    info = {"tiny_version": TINY_VERSION, "seed": seed, "image_size": TINY_IMAGE_SIZE,
            "note": "random weights: for plumbing, tests and CPU smoke runs only"}
    (folder / "avatar_tiny.json").write_text(json.dumps(info, indent=2))


def _corpus_digest() -> str:
    return hashlib.sha256("\n".join(prompt_corpus()).encode()).hexdigest()[:10]


def tiny_models_dir(seed: int = 0) -> Path:
    """The folder of the tiny models, built on first use (atomically: built in a temp folder, then renamed)."""
    from avatar.paths import cache_dir

    parent = cache_dir("tiny")
    target = parent / f"v{TINY_VERSION}-seed{seed}-{_corpus_digest()}"
    if (target / "avatar_tiny.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        save_tiny_models(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists): use theirs.
            if not (target / "avatar_tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
