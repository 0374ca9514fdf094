"""Prompts: view-dependent wording, text embeddings cached on disk, a learned back-view token.

Each (prompt, view) pair is encoded once per model and kept in
``cache_dir("prompt-embeddings")`` keyed by the model (id and revision, plus the
textual-inversion file if one is loaded) and the text, so that a resumed run or a
second prompt with the same negative never runs the text encoder again; after
encoding, the pipeline frees the text encoder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar.guidance.errors import GuidanceError

VIEWS = ("front", "side", "back", "overhead")
"""Camera view labels, as the renderer assigns them (``avatar.render.cameras.VIEWS``): azimuth
sectors, and ``overhead`` for cameras looking down from near the top only where
``CameraConfig.overhead_polar`` switches it on (off by default, as in HeadSculpt)."""

VIEW_SUFFIX = {"front": "front view of head", "side": "side view of head", "back": "back view of head",
               "overhead": "overhead view of head"}
"""Words appended to the prompt per view: HeadSculpt's ``f"{text}, {d} view of head"``
(its nerf/utils.py, see docs/METHOD.md), DreamFusion's view-dependent prompting."""

BACK_TOKEN_SUFFIX = "without eyes, without faces"
"""What HeadSculpt adds after its learned back-view token, so back views grow no face."""

LANDMARK_VIEWS = ("front", "side", "overhead")
"""Views that get the landmark ControlNet: all but ``back`` (HeadSculpt skips it there)."""

DEFAULT_BACK_TOKEN = "<back-view>"
"""Token given to a textual-inversion file that does not name its own (Automatic1111 format)."""


def view_prompt(prompt: str, view: str, back_token: str | None = None) -> str:
    """``"an old man"``, ``"back"`` -> ``"an old man, back view of head"``.

    With a learned back-view token (HeadSculpt's view-dependent textual inversion) the
    back view adds the token and HeadSculpt's negation of a face:
    ``"an old man, back view of head, <back-view>, without eyes, without faces"``.
    """
    if view not in VIEW_SUFFIX:
        raise GuidanceError(f"unknown view label '{view}': expected one of {', '.join(VIEWS)}")
    words = VIEW_SUFFIX[view]
    if view == "back" and back_token:
        words = f"{words}, {back_token}, {BACK_TOKEN_SUFFIX}"
    return f"{prompt}, {words}" if prompt else words


def view_labels(cameras: Any, batch_size: int | None = None) -> list[str]:
    """The view label of each camera: ``cameras.views`` (the renderer's cameras carry them) or a
    plain sequence of labels."""
    views = getattr(cameras, "views", None)
    if views is None and isinstance(cameras, Sequence) and all(isinstance(v, str) for v in cameras):
        views = cameras
    if views is None:
        raise GuidanceError(f"cannot read view labels from {type(cameras).__name__}: cameras must have a "
                            f"'views' attribute (a list of {'/'.join(VIEWS)})")
    views = [str(v) for v in views]
    bad = [v for v in views if v not in VIEW_SUFFIX]
    if bad:
        raise GuidanceError(f"unknown view labels {sorted(set(bad))}: expected one of {', '.join(VIEWS)}")
    if batch_size is not None and len(views) != batch_size:
        raise GuidanceError(f"{len(views)} camera view labels for a batch of {batch_size} images")
    return views


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TextEmbedder:
    """Text -> CLIP hidden states ``(N, L, D)`` (L = the tokenizer's 77), cached on disk.

    ``cache_key`` names the model (and anything that changes its embeddings, such as a
    textual-inversion file); None disables the disk cache.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, cache_key: str | None = None, device: Any = "cpu",
                 cache_folder: Path | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_key = cache_key
        self.device = device
        self._folder = cache_folder
        self.hits = 0
        self.misses = 0

    def _path(self, text: str) -> Path | None:
        if self.cache_key is None:
            return None
        if self._folder is None:
            from avatar.paths import cache_dir

            self._folder = cache_dir("prompt-embeddings")
        digest = hashlib.sha256(f"{self.cache_key}\x00{text}".encode()).hexdigest()
        return self._folder / f"{digest[:32]}.safetensors"

    def tokenize(self, texts: list[str]) -> Any:
        """Token ids ``(N, 77)``: bos, tokens, eos, padded with the pad token and truncated, as SD does."""
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def __call__(self, texts: list[str]) -> Any:
        import torch
        from safetensors.torch import load_file, save_file

        out: list[Any] = [None] * len(texts)
        todo = []
        for i, text in enumerate(texts):
            path = self._path(text)
            if path is not None and path.is_file():
                try:
                    out[i] = load_file(str(path))["embedding"]
                    self.hits += 1
                    continue
                except Exception:  # a truncated cache file: recompute and overwrite
                    pass
            todo.append(i)
        if todo:
            if self.text_encoder is None:
                raise GuidanceError("the text encoder was already freed; encode every prompt before freeing it")
            ids = self.tokenize([texts[i] for i in todo]).to(self.device)
            with torch.no_grad():
                hidden = self.text_encoder(ids)[0].float().cpu()
            for j, i in enumerate(todo):
                out[i] = hidden[j].contiguous()
                self.misses += 1
                path = self._path(texts[i])
                if path is not None:
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    save_file({"embedding": out[i]}, str(tmp))
                    os.replace(tmp, path)
        return torch.stack(out)


@dataclass
class ViewPromptEmbeddings:
    """Text embeddings of one prompt per view, and of the negative prompt.

    cond: view -> ``(L, D)``; negative: ``(L, D)``. Tensors stay on the CPU in fp32 until
    :meth:`select` puts a batch on the guidance's device and dtype.
    """

    prompt: str
    texts: dict[str, str]
    cond: dict[str, Any]
    negative_text: str
    negative: Any
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def select(self, views: list[str], device: Any = "cpu", dtype: Any = None) -> tuple[Any, Any]:
        """(cond ``(B, L, D)``, uncond ``(B, L, D)``) for the cameras' view labels.

        Each combination of labels is put on the device once per run and kept: later steps reuse
        it (no host-to-device copy, no cast). The tensors are shared: do not change them in place."""
        import torch

        key = (tuple(views), str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            cond = torch.stack([self.cond[v] for v in views]).to(device=device, dtype=dtype)
            uncond = self.negative.to(device=device, dtype=dtype).unsqueeze(0).expand(len(views), -1, -1)
            hit = self._cache[key] = (cond, uncond)
        return hit


def encode_view_prompts(embed: TextEmbedder, prompt: str, negative_prompt: str = "", *,
                        view_dependent: bool = True, back_token: str | None = None) -> ViewPromptEmbeddings:
    """Encode ``prompt`` once per view label (or once for all views) and the negative prompt."""
    texts = {v: (view_prompt(prompt, v, back_token) if view_dependent else prompt) for v in VIEWS}
    unique = list(dict.fromkeys([*texts.values(), negative_prompt]))
    hidden = embed(unique)
    by_text = dict(zip(unique, hidden))
    return ViewPromptEmbeddings(prompt, texts, {v: by_text[t] for v, t in texts.items()}, negative_prompt,
                                by_text[negative_prompt])


def load_back_view_embedding(path: str | Path, model: Any, token: str | None = None) -> str:
    """Load a textual-inversion file (diffusers or Automatic1111 format) into the model's
    tokenizer and text encoder, through diffusers' ``load_textual_inversion``.

    model: a :class:`~avatar.guidance.models.DiffusionModel` (its parts are changed in place).
    Returns the text that stands for the learned token in a prompt (several tokens for a
    multi-vector embedding, as diffusers' ``maybe_convert_prompt`` expands them).
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path).expanduser()
    if not path.is_file():
        raise GuidanceError(f"back-view embedding {path} does not exist: pass a textual-inversion file "
                            "(learned_embeds.safetensors / .bin / .pt) or leave guidance.back_view_embedding empty")
    if model.text_encoder is None:
        raise GuidanceError("load the back-view embedding before the text encoder is freed")
    # The loader is a pipeline mixin: a pipeline over the same components is only its host.
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    before = set(model.tokenizer.get_added_vocab())
    try:
        pipe.load_textual_inversion(str(path), token=token, tokenizer=model.tokenizer,
                                    text_encoder=model.text_encoder, local_files_only=True)
    except ValueError as exc:
        if token is not None or "token=" not in str(exc):  # only a bare tensor file lacks a token name
            raise GuidanceError(f"cannot load the back-view embedding {path}: {exc}") from None
        pipe.load_textual_inversion(str(path), token=DEFAULT_BACK_TOKEN, tokenizer=model.tokenizer,
                                    text_encoder=model.text_encoder, local_files_only=True)
    added = [t for t in model.tokenizer.get_added_vocab() if t not in before]
    if not added:
        raise GuidanceError(f"{path} added no token to the tokenizer (is its token already in the vocabulary?)")
    base = min(added, key=len)  # multi-vector files add "<t>", "<t>_1", ...
    return pipe.maybe_convert_prompt(base, model.tokenizer)
