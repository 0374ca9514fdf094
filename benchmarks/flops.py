"""The cost of one quality run on paper: FLOPs, bytes moved and memory of one optimisation step,
by part, and the time they project to on an H100 (issue 14).

Used by ``python benchmarks/iteration.py --flops [--markdown]`` (``python benchmarks/flops.py REPORT.json``
prints the markdown of a saved report); the counting helpers are
importable (``count``, :class:`Meter`) and tested in ``tests/test_benchmarks_flops.py``.

What is counted, per part of one step (the sizes are read from ``avatar/config.py`` at run time):

- ``flops``: :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products, convolutions and
  attention (forward and backward), 2 FLOPs per multiply-add. Elementwise ops, gathers and our
  native kernels (hash grid, ray marching, compositing, rasterisation) count 0: they are
  memory-bound and are timed by their bytes instead.
- ``bytes``: a dispatch mode adds up, for every kernel (each aten or ``avatar::`` op that is not a
  view), the bytes of its tensor inputs and outputs: what an unfused eager kernel reads from and
  writes to HBM (caches ignored). Gathers and scatters count the elements they touch and their
  indices, not the whole source; the hash grid counts one 32-byte sector per corner per level per
  point (random reads), twice in its backward (atomic read-modify-write), plus its dense gradient.
- ``kernels``: those ops (one launch each on a GPU); ``syncs``: ops whose output size depends on
  the data (``nonzero``, ``unique``, ``item``, boolean masks, ray marching): a host round trip each.
- ``saved_bytes``: storages saved for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  parameters and buffers excluded: the activations a part holds between forward and backward.
  ``weights_bytes``, ``optimizer_bytes`` (gradients + Adam's two moments) and ``buffer_bytes``
  are what it holds for the whole run.

The diffusion parts run their real architectures on ``torch.device('meta')`` (shapes only: the
counts take seconds and need no weights); FlopCounterMode counts them exactly as on real tensors
(checked on the tiny models by :func:`meta_matches_real`). The field and render parts run for
real on the CPU with the engines the project picks there (native kernels): their sizes depend on
the data (samples that survive empty-space skipping, surface triangles, covered pixels).

Projected time of a part on the accelerator: ``max(flops / (peak x utilisation),
bytes / (HBM x utilisation), kernels x launch) + syncs x sync`` (a roofline with a launch floor).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# ---------------------------------------------------------------------------
# The accelerator and the time model


@dataclass(frozen=True)
class Accelerator:
    """Peaks of an accelerator and the fractions of them a part is assumed to reach."""

    name: str = "NVIDIA H100 SXM5 80GB"
    tensor_tflops: float = 989.0
    """Dense fp16/bf16 tensor-core peak (no sparsity), TFLOP/s."""
    fp32_tflops: float = 67.0
    """fp32 peak without tensor cores (PyTorch keeps TF32 off for matmuls by default), TFLOP/s."""
    hbm_tb_s: float = 3.35
    """HBM3 bandwidth, TB/s."""
    tensor_utilisation: float = 0.40
    """Fraction of the tensor peak reached by fp16 UNet / ControlNet / VAE convolutions and attention."""
    fp32_utilisation: float = 0.25
    """Fraction of the fp32 peak reached by the fields' small (64-wide) MLPs."""
    hbm_utilisation: float = 0.50
    """Fraction of HBM bandwidth reached by memory-bound kernels (gathers, scatters, elementwise)."""
    launch_us: float = 5.0
    """Host cost of one eager kernel launch (PyTorch dispatch + CUDA launch), microseconds."""
    sync_us: float = 20.0
    """One host-device round trip (an op whose output size depends on the data), microseconds."""
    sector_bytes: int = 32
    """Bytes a random read really moves (one DRAM sector)."""

    def assumptions(self) -> list[str]:
        return [
            f"{self.name}: dense fp16/bf16 tensor peak {self.tensor_tflops:g} TFLOP/s, fp32 (non-tensor) "
            f"{self.fp32_tflops:g} TFLOP/s, HBM {self.hbm_tb_s:g} TB/s",
            f"utilisation: {self.tensor_utilisation:.0%} of the tensor peak for the fp16 diffusion models, "
            f"{self.fp32_utilisation:.0%} of the fp32 peak for the fields' small MLPs, "
            f"{self.hbm_utilisation:.0%} of HBM bandwidth for memory-bound kernels",
            "FlopCounterMode counts matmuls, convolutions and attention only; hash-grid gathers, ray "
            "marching, compositing, marching tetrahedra and rasterisation are memory-bound and timed by "
            "the bytes their kernels read and write (unfused eager kernels, caches ignored; hash-grid "
            f"corners as random {self.sector_bytes}-byte sectors)",
            f"each kernel costs at least {self.launch_us:g} us of host launch time (eager PyTorch, no CUDA "
            f"graphs) and each data-dependent size a {self.sync_us:g} us host round trip",
            "part time = max(compute, memory, launch) + syncs; parts run one after another (one stream)",
        ]

    def peak_flops(self, precision: str) -> float:
        if precision in ("fp16", "bf16"):
            return self.tensor_tflops * 1e12 * self.tensor_utilisation
        return self.fp32_tflops * 1e12 * self.fp32_utilisation

    def bandwidth(self) -> float:
        return self.hbm_tb_s * 1e12 * self.hbm_utilisation


H100_SXM = Accelerator()


# ---------------------------------------------------------------------------
# Counting


@dataclass
class Count:
    """The work of a piece of code: FLOPs, bytes moved, kernels, host syncs, bytes saved for backward."""

    flops: float = 0.0
    bytes: float = 0.0
    kernels: float = 0.0
    syncs: float = 0.0
    saved_bytes: float = 0.0
    flops_by_op: dict[str, float] = field(default_factory=dict)

    def scaled(self, k: float) -> Count:
        """The work of ``k`` such pieces (``saved_bytes`` too: k copies held at once)."""
        return Count(self.flops * k, self.bytes * k, self.kernels * k, self.syncs * k, self.saved_bytes * k,
                     {op: v * k for op, v in self.flops_by_op.items()})

    def resized(self, k: float) -> Count:
        """The same code on ``k`` times as much data: FLOPs, bytes and saved bytes scale, the
        kernels and syncs (one per op) do not."""
        c = self.scaled(k)
        c.kernels, c.syncs = self.kernels, self.syncs
        return c

    def __add__(self, other: Count) -> Count:
        ops = dict(self.flops_by_op)
        for op, v in other.flops_by_op.items():
            ops[op] = ops.get(op, 0.0) + v
        return Count(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels,
                     self.syncs + other.syncs, self.saved_bytes + other.saved_bytes, ops)

    def __sub__(self, other: Count) -> Count:
        """What ``self`` did beyond ``other`` (clamped at 0)."""
        ops = {op: max(0.0, v - other.flops_by_op.get(op, 0.0)) for op, v in self.flops_by_op.items()}
        return Count(max(0.0, self.flops - other.flops), max(0.0, self.bytes - other.bytes),
                     max(0.0, self.kernels - other.kernels), max(0.0, self.syncs - other.syncs),
                     max(0.0, self.saved_bytes - other.saved_bytes), {k: v for k, v in ops.items() if v})

    @staticmethod
    def mean(counts: Iterable[Count], weights: Iterable[float] | None = None) -> Count:
        """The weighted mean (an expectation over cameras, shadings or views)."""
        counts = list(counts)
        weights = list(weights) if weights is not None else [1.0] * len(counts)
        total = sum(weights)
        out = Count()
        for c, w in zip(counts, weights):
            out = out + c.scaled(w / total)
        return out


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_sdpa_cpu_flops._get_raw = True  # type: ignore[attr-defined]
_sdpa_cpu_backward_flops._get_raw = True  # type: ignore[attr-defined]

EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}
"""The CPU's fused attention, which FlopCounterMode's table lacks: counted as its CUDA twins are."""

_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
         "alias", "detach", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
         "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "to_dense"}
"""Ops that allocate or relabel memory without a kernel."""
_WRITE_ONLY = {"fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange",
               "linspace", "rand", "randn", "randint", "rand_like", "randn_like", "normal_", "uniform_",
               "scalar_tensor", "bernoulli_", "random_", "eye"}
_GATHER = {"index", "index_select", "gather", "embedding", "take", "_index_select_backward"}
_SCATTER = {"index_put", "index_put_", "_index_put_impl_", "index_add", "index_add_", "scatter", "scatter_",
            "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_copy", "index_copy_",
            "masked_scatter", "masked_scatter_", "embedding_dense_backward"}
_SYNC = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "_unique",
         "_local_scalar_dense", "is_nonzero", "equal", "occupancy_march", "nonzero_static"}
"""Ops whose output size (or value) the host must wait for."""


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads from ``t``: its elements, but no more than its storage (broadcasts)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


class _Traffic(TorchDispatchMode):
    """Counts kernels, host syncs and bytes moved of every op it sees (see the module docstring)."""

    def __init__(self, sector_bytes: int = 32):
        super().__init__()
        self.sector = sector_bytes
        self.bytes = 0
        self.kernels = 0
        self.syncs = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        moved = self._bytes(func, name, args, kwargs, out)
        self.kernels += 1
        self.bytes += moved
        key = f"{func.namespace}.{name}"
        self.by_op[key] = self.by_op.get(key, 0) + moved
        if name in _SYNC or (name in ("index", "index_put", "index_put_", "_index_put_impl_")
                             and any(t.dtype == torch.bool for t in _tensors(args[1]))):
            self.syncs += 1
        return out

    def _bytes(self, func, name: str, args, kwargs, out) -> int:
        outs = _tensors(out)
        out_bytes = sum(t.numel() * t.element_size() for t in outs)
        if name in _WRITE_ONLY:
            return out_bytes
        if name == "copy_":
            return 2 * _tensor_bytes(args[1])
        if name in _GATHER:
            index = sum(_tensor_bytes(t) for t in _tensors(args[1:]) if not t.is_floating_point())
            return index + 2 * out_bytes
        if name in _SCATTER:
            self_t, rest = args[0], _tensors(list(args[1:]) + list(kwargs.values()))
            index = sum(_tensor_bytes(t) for t in rest if not t.is_floating_point() and t.dtype != torch.bool)
            src = sum(_tensor_bytes(t) for t in rest if t.is_floating_point())
            copy_self = 0 if name.endswith("_") else 2 * _tensor_bytes(self_t)
            return index + 3 * src + copy_self
        if func.namespace == "avatar" and name in ("hashgrid_forward", "hashgrid_backward"):
            return self._hash_grid(name, args, outs)
        return sum(_tensor_bytes(t) for t in _tensors((args, kwargs))) + out_bytes

    def _hash_grid(self, name: str, args, outs: list[torch.Tensor]) -> int:
        """Instant-NGP's kernel: per point and level, 8 random corner reads of F features (one sector
        each); the backward adds atomically (read-modify-write) into a zeroed dense table gradient."""
        if name == "hashgrid_forward":
            points, table = args[0], args[1]
            levels = outs[0].shape[1] // table.shape[1]
            corners = points.shape[0] * levels * 8
            return _tensor_bytes(points) + outs[0].numel() * outs[0].element_size() + corners * max(
                self.sector, table.shape[1] * table.element_size())
        grad_out, points, table = args[0], args[1], args[2]
        need_table, need_points = bool(args[6]), bool(args[7])
        levels = grad_out.shape[1] // table.shape[1]
        corners = points.shape[0] * levels * 8
        per = max(self.sector, table.shape[1] * 4)  # the gradient accumulates in fp32
        moved = _tensor_bytes(grad_out) + _tensor_bytes(points)
        if need_table:
            moved += table.numel() * 4 + 2 * corners * per  # zero fill, then atomic read-modify-write
        if need_points:
            moved += corners * per + points.numel() * points.element_size()
        return moved


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class Meter:
    """Measure the work of the code run inside it: ``with Meter(model) as m: ...; m.count``.

    exclude: modules and tensors whose storages (parameters, buffers) are not counted as
        saved activations.
    """

    def __init__(self, *exclude: torch.nn.Module | torch.Tensor, sector_bytes: int = 32):
        self._exclude: set[int] = set()
        for obj in exclude:
            tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else [obj]
            self._exclude.update(_storage_key(t) for t in tensors)
        self._sector = sector_bytes
        self.count = Count()

    def __enter__(self) -> Meter:
        self._saved: dict[int, int] = {}
        self._flops = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        self._traffic = _Traffic(self._sector)
        self._attention = _FusedAttentionOnMeta()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key not in self._exclude:
                self._saved[key] = t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._attention.__enter__()
        self._flops.__enter__()
        self._traffic.__enter__()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._traffic.__exit__(*exc)
        self._flops.__exit__(*exc)
        self._attention.__exit__(*exc)
        by_op = {str(op): float(n) for op, n in self._flops.get_flop_counts().get("Global", {}).items()}
        self.count = Count(float(self._flops.get_total_flops()), float(self._traffic.bytes),
                           float(self._traffic.kernels), float(self._traffic.syncs),
                           float(sum(self._saved.values())), by_op)


class _FusedAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """On meta tensors, ``scaled_dot_product_attention`` would take the unfused math path (two
    bmm and a softmax, the score matrix materialised); route it to the fused kernel a GPU runs
    (memory-efficient attention), so bytes, kernels and the backward's FLOPs are the GPU's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            plain = (kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and len(args) == 3
                     and not kwargs.get("enable_gqa"))
            if q.device.type == "meta" and plain:
                need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                return aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, need_lse, 0.0, bool(kwargs.get("is_causal", False)), scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def count(fn: Callable[[], Any], *exclude: torch.nn.Module | torch.Tensor) -> Count:
    """The :class:`Count` of calling ``fn()`` (e.g. a forward and backward)."""
    with Meter(*exclude) as meter:
        fn()
    return meter.count


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


# ---------------------------------------------------------------------------
# Parts


@dataclass
class Part:
    """One part of a step: its work, what it holds, and how it was measured."""

    count: Count
    precision: str = "fp32"
    """Precision of its FLOPs on the accelerator (fp16 -> tensor cores, fp32 -> CUDA cores)."""
    weights_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    """Gradients + Adam moments of its trained parameters."""
    buffer_bytes: float = 0.0
    measured: str = ""
    note: str = ""

    def project(self, acc: Accelerator) -> dict[str, Any]:
        c = self.count
        compute = c.flops / acc.peak_flops(self.precision)
        memory = c.bytes / acc.bandwidth()
        launch = c.kernels * acc.launch_us * 1e-6
        terms = {"compute": compute, "memory": memory, "launch": launch}
        bound = max(terms, key=terms.get)
        seconds = terms[bound] + c.syncs * acc.sync_us * 1e-6
        return {"ms": seconds * 1e3, "bound": bound, **{f"{k}_ms": v * 1e3 for k, v in terms.items()},
                "sync_ms": c.syncs * acc.sync_us * 1e-3}

    def to_json(self, acc: Accelerator, steps: int) -> dict[str, Any]:
        c = self.count
        proj = self.project(acc)
        top = sorted(c.flops_by_op.items(), key=lambda kv: -kv[1])[:4]
        return {
            "tflop": _r(c.flops / 1e12, 5), "gb_moved": _r(c.bytes / 1e9, 4), "kernels": round(c.kernels, 1),
            "syncs": round(c.syncs, 2), "saved_for_backward_mib": _r(c.saved_bytes / 2**20, 2),
            "weights_mib": _r(self.weights_bytes / 2**20, 2), "optimizer_mib": _r(self.optimizer_bytes / 2**20, 2),
            "buffers_mib": _r(self.buffer_bytes / 2**20, 2), "precision": self.precision,
            "flops_by_op": {op: _r(v / 1e12, 5) for op, v in top},
            "h100": {k: (_r(v, 4) if isinstance(v, float) else v) for k, v in proj.items()},
            "seconds_per_avatar": _r(proj["ms"] * steps / 1e3, 2), "measured": self.measured,
            **({"note": self.note} if self.note else {}),
        }


def _r(x: float, digits: int) -> float:
    """Round to ``digits`` significant digits (JSON stays readable across magnitudes)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


def _module_bytes(*modules: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes)."""
    return (tensor_bytes(p for m in modules for p in m.parameters()),
            tensor_bytes(b for m in modules for b in m.buffers()))


def _trained_bytes(params: Iterable[torch.Tensor]) -> int:
    """Gradient + Adam's first and second moments, fp32 each."""
    return 3 * sum(p.numel() * 4 for p in params)


# -- diffusion --------------------------------------------------------------


def image_encoder(autoencoder: torch.nn.Module, resolution: int, dtype: torch.dtype) -> Any:
    """The guidance's own encoder for ``autoencoder``: :class:`TinyAEEncoder` for an
    ``AutoencoderTiny`` (TAESD), :class:`VAEEncoder` for SD's ``AutoencoderKL``."""
    from avatar.guidance.sds import TinyAEEncoder, VAEEncoder

    if hasattr(autoencoder.config, "latent_magnitude"):  # AutoencoderTiny's config
        return TinyAEEncoder(autoencoder, resolution, dtype)
    return VAEEncoder(autoencoder, resolution, dtype)


def encoder_name(autoencoder: torch.nn.Module) -> str:
    """``guidance.encoder`` of an autoencoder: ``tiny-ae`` or ``sd``."""
    return "tiny-ae" if hasattr(autoencoder.config, "latent_magnitude") else "sd"


def encoder_parts(autoencoder: torch.nn.Module, *, batch: int, render_resolutions: dict[str, int],
                  vae_resolution: int, dtype: torch.dtype, device: str | torch.device = "meta") -> dict[str, Part]:
    """``vae_encode`` per stage: renders of that stage's size -> resize -> the image encoder (SD's
    VAE or TAESD), forward and backward to the image, through the guidance's own encoder classes."""
    from avatar.guidance.sds import to_channels_first

    device = torch.device(device)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    encoder = image_encoder(autoencoder, vae_resolution, dtype)
    quant = getattr(autoencoder, "quant_conv", None)
    weights, buffers = _module_bytes(autoencoder.encoder, *([quant] if quant is not None else []))
    name = "TAESD" if encoder_name(autoencoder) == "tiny-ae" else "SD VAE"
    parts = {}
    for stage, res in render_resolutions.items():
        def step(res: int = res) -> None:
            image = torch.rand(batch, res, res, 3, device=device, requires_grad=True)
            latents = encoder.encode(to_channels_first(image))
            latents.sum().backward()

        parts[stage] = Part(count(step, autoencoder), precision, weights, 0, buffers, measured=device.type,
                            note=f"{res}px render -> {vae_resolution}px {name} encoder")
    return parts


def diffusion_parts(unet: torch.nn.Module, controlnet: torch.nn.Module | None, vae: torch.nn.Module, *,
                    batch: int, render_resolutions: dict[str, int], vae_resolution: int, p_control: float,
                    dtype: torch.dtype, device: str | torch.device = "meta",
                    text_tokens: int = 77) -> dict[str, Any]:
    """``vae_encode`` per stage (:func:`encoder_parts`; ``vae`` may be SD's VAE or TAESD) and
    ``unet_cfg`` (UNet on the classifier-free-guidance batch of 2 x ``batch`` latents, with the
    landmark ControlNet for the fraction ``p_control`` of cameras it applies to; no grad),
    through the pipeline's own encoders and ``unet_predictions``. ``unet_cfg`` is the floor of a
    step: what score distillation cannot do without.

    Returns {"vae_encode": {stage: Part}, "unet_cfg": Part, "unet_cfg_controlnet_share": float}.
    """
    from avatar.guidance.prompts import LANDMARK_VIEWS
    from avatar.guidance.sds import ControlBranch, unet_predictions

    device = torch.device(device)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    vae_parts = encoder_parts(vae, batch=batch, render_resolutions=render_resolutions, vae_resolution=vae_resolution,
                              dtype=dtype, device=device)
    encoder = image_encoder(vae, vae_resolution, dtype)

    latent = vae_resolution // encoder.scale_factor
    channels = unet.config.in_channels
    text_dim = unet.config.cross_attention_dim
    x_t = torch.randn(batch, channels, latent, latent, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    text = [torch.randn(batch, text_tokens, text_dim, device=device, dtype=dtype) for _ in range(2)]

    def unet_step(views: list[str]) -> Count:
        branches = []
        if controlnet is not None:
            from avatar.guidance.sds import control_scale_factor

            size = latent * control_scale_factor(controlnet)
            images = torch.rand(batch, 3, size, size, device=device)
            branches.append(ControlBranch(controlnet, images, 1.0, frozenset(LANDMARK_VIEWS)))

        def run() -> None:
            with torch.no_grad():
                unet_predictions(unet, x_t, t, text, branches, views, dtype=dtype)

        return count(run, unet, *([controlnet] if controlnet is not None else []))

    with_control = unet_step(["front"] * batch)
    without = unet_step(["back"] * batch) if controlnet is not None else with_control
    unet_count = Count.mean([with_control, without], [p_control, 1.0 - p_control])
    weights, buffers = _module_bytes(unet, *([controlnet] if controlnet is not None else []))
    note = (f"CFG batch {2 * batch}, {latent}x{latent} latents; ControlNet on {p_control:.0%} of cameras "
            "(not on back views)") if controlnet is not None else f"CFG batch {2 * batch}, {latent}x{latent} latents"
    unet_part = Part(unet_count, precision, weights, 0, buffers, measured=device.type, note=note)
    return {"vae_encode": vae_parts, "unet_cfg": unet_part,
            "unet_cfg_controlnet_share": _r(1.0 - without.flops / with_control.flops, 4)}


def meta_matches_real(unet: torch.nn.Module, controlnet: torch.nn.Module | None, vae: torch.nn.Module, *,
                      vae_resolution: int, render_resolution: int) -> dict[str, Any]:
    """FLOPs of the diffusion parts on real CPU tensors and on meta copies of the same models."""
    result: dict[str, Any] = {}
    for device in ("cpu", "meta"):
        models = [copy.deepcopy(m).to(device) if m is not None else None for m in (unet, controlnet, vae)]
        parts = diffusion_parts(*models, batch=1, render_resolutions={"stage": render_resolution},
                                vae_resolution=vae_resolution, p_control=1.0, dtype=torch.float32, device=device)
        result[device] = {"unet_cfg": parts["unet_cfg"].count.flops,
                          "vae_encode": parts["vae_encode"]["stage"].count.flops}
    result["equal"] = result["cpu"] == result["meta"]
    return result


# -- fields and renderers -----------------------------------------------------


def control_probability(cfg: Any, n: int = 4096, seed: int = 0) -> float:
    """Fraction of the training cameras the landmark ControlNet applies to (all views but the back)."""
    from avatar.guidance.prompts import LANDMARK_VIEWS
    from avatar.render.cameras import sample_cameras

    cams = sample_cameras(n, cfg.cameras, 8, torch.Generator().manual_seed(seed), "cpu")
    return sum(v in LANDMARK_VIEWS for v in cams.views) / n


def _shading_mix(st: Any) -> tuple[float, float]:
    """(P(albedo), P(lit)) over a stage's steps: lambertian, textureless and normal-map shading cost
    the same (normals, a light); the normal-map warm-up steps count as lit."""
    p = [float(x) for x in st.shading_probs]
    warm = min(int(getattr(st, "normal_warmup_steps", 0)), int(st.steps)) / max(int(st.steps), 1)
    albedo = p[0] / sum(p) * (1.0 - warm)
    return albedo, 1.0 - albedo


def _look(shading: str, light: Any, background: Any = "white") -> Any:
    """The pipeline's :class:`StepLook` for a shading (ambient 1: the cost does not depend on it)."""
    from avatar.pipeline.generate import StepLook

    return StepLook(shading, light, 1.0, background)


def coarse_parts(cfg: Any, prior: Any, frame: Any, cameras: int = 3, seed: int = 0
                 ) -> tuple[dict[str, Part], dict[str, Any]]:
    """The coarse stage's ``field_render`` (NeRF + occupancy-skipped volume rendering + its
    regularisers, forward and backward, averaged over cameras and the shading mix),
    ``occupancy_update`` (amortised over the steps) and ``optimiser_step`` (Adam).

    The occupancy grid is the one a run starts with (from the prior's density): the samples a
    ray keeps, and so this part's bytes, grow with what the field fills. Returns (parts, facts)."""
    from avatar.pipeline.generate import CoarseStage
    from avatar.render.cameras import sample_cameras
    from avatar.render.shading import random_light

    st = cfg.coarse
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    stage = CoarseStage(cfg, frame, prior, device)
    stage.renderer.update_occupancy(0, generator=gen)  # the prior's initial density
    occupied = stage.occupancy.occupancy
    samples = []
    by_shading = {}
    for shading in ("albedo", "lambertian"):
        per_camera = []
        for _ in range(cameras):
            cams = sample_cameras(st.batch_size, cfg.cameras, st.resolution, gen, device)
            light = random_light(cams.eye, gen) if shading != "albedo" else None

            def step(cams: Any = cams, light: Any = light, shading: str = shading) -> None:
                out, regs = stage.render(cams, _look(shading, light, stage.background), gen, 1)  # no refresh
                loss = out.rgb.mean() + sum(w * v for w, v in regs.values())
                stage.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                samples.append(int(out.extras["n_samples"]))

            per_camera.append(count(step, stage.field, stage.occupancy))
        by_shading[shading] = Count.mean(per_camera)
    p_albedo, p_lit = _shading_mix(st)
    render = Count.mean([by_shading["albedo"], by_shading["lambertian"]], [p_albedo, p_lit])

    occ = stage.occupancy
    full = count(lambda: stage.renderer.update_occupancy(0, force=True, generator=gen))
    later_step = math.ceil(occ.warmup_steps / occ.update_every) * occ.update_every
    partial = count(lambda: stage.renderer.update_occupancy(later_step, generator=gen))
    refreshes = [s for s in range(0, st.steps, occ.update_every)]
    n_full = sum(s < occ.warmup_steps for s in refreshes)
    n_partial = len(refreshes) - n_full
    occupancy = (full.scaled(n_full) + partial.scaled(n_partial)).scaled(1.0 / max(st.steps, 1))
    occupancy.saved_bytes = 0.0

    stage.optimizer.step()  # Adam's state exists from here on, as in a run; count the next step
    out, _ = stage.render(sample_cameras(st.batch_size, cfg.cameras, st.resolution, gen, device),
                          _look("albedo", None, stage.background), gen, 1)
    stage.optimizer.zero_grad(set_to_none=True)
    out.rgb.mean().backward()
    adam = count(stage.optimizer.step)

    weights, buffers = _module_bytes(stage.field, stage.occupancy)
    trained = _trained_bytes(p for g in stage.optimizer.param_groups for p in g["params"])
    mean_samples = sum(samples) / max(len(samples), 1)
    facts = {"rays_per_step": st.batch_size * st.resolution**2, "samples_per_step": round(mean_samples),
             "samples_per_ray_mean": _r(mean_samples / (st.batch_size * st.resolution**2), 3),
             "occupied_cells": _r(occupied, 3), "lit_fraction": _r(p_lit, 3)}
    return {
        "field_render": Part(render, "fp32", weights, trained, buffers, measured="cpu",
                             note=f"{st.resolution}x{st.resolution} rays, <= {st.samples_per_ray} samples per ray, "
                                  f"{mean_samples:.0f} samples kept by the occupancy grid (occupancy "
                                  f"{occupied:.1%}); {p_lit:.0%} of steps lit (normals: 6 more density "
                                  "queries per sample)"),
        "occupancy_update": Part(occupancy, "fp32", measured="cpu",
                                 note=f"{occ.resolution}^3 grid every {occ.update_every} steps, amortised"),
        "optimiser_step": Part(adam, "fp32", measured="cpu", note="Adam over the hash grid and MLPs"),
    }, facts


def fine_parts(cfg: Any, prior: Any, frame: Any, cameras: int = 3, seed: int = 0,
               max_tets: int = 16_000_000) -> tuple[dict[str, Part], dict[str, Any]]:
    """The fine stage's ``field_render`` (rasterisation at the stage's resolution + texture field +
    shading + antialiasing, forward and backward), ``marching_tets`` (DMTet surface extraction,
    forward and backward), ``regularisers`` (what else the stage's ``render`` adds: Laplacian and
    normal consistency, forward and backward) and ``optimiser_step``.

    The DMTet grid of the config is used when it has at most ``max_tets`` tetrahedra (a CPU
    limit); otherwise a coarser grid is measured and the grid-sized terms scaled up: marching
    tetrahedra and the optimiser by the tetrahedron count, the regularisers by the surface
    (resolution squared). Returns (parts, facts about the grid).
    """
    from avatar.config import set_value
    from avatar.pipeline.generate import FineStage
    from avatar.render.cameras import sample_cameras
    from avatar.render.shading import random_light

    st = cfg.fine
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)

    def sdf_init(p: torch.Tensor) -> torch.Tensor:
        return prior.sdf(frame.to_metres(p)).float() * frame.scale

    def build(res: int) -> Any:
        c = copy.deepcopy(cfg)
        set_value(c, "fine.dmtet_resolution", res)
        return FineStage(c, frame, device, sdf_init)

    target = int(st.dmtet_resolution)
    probe_res = min(target, 16)
    probe = build(probe_res)
    tets_probe = probe.geometry.tets.shape[0]
    est_tets = tets_probe * (target / probe_res) ** 3
    res = target if est_tets <= max_tets else max(16, int(target * (max_tets / est_tets) ** (1 / 3)))
    stage = probe if res == probe_res else build(res)
    geometry = stage.geometry
    tets = geometry.tets.shape[0]
    grid_verts = geometry.grid_verts.shape[0]
    scale_grid = est_tets / tets if res != target else 1.0
    if res == target:
        est_tets = tets
    scale_surface = (target / res) ** 2

    # Marching tetrahedra, forward (the mesh) and backward (into the SDF and the deformation).
    with Meter(geometry) as mt_fwd:
        verts, faces = stage.mesh()
    leaf = verts.detach().requires_grad_(True)
    stage.mesh = lambda: (leaf, faces)  # the stage renders this mesh; its gradient arrives on ``leaf``

    render_counts, whole_counts = {}, {}
    for shading in ("albedo", "lambertian"):
        per_render, per_whole = [], []
        for _ in range(cameras):
            cams = sample_cameras(st.batch_size, cfg.cameras, st.resolution, gen, device)
            light = random_light(cams.eye, gen) if shading != "albedo" else None

            def render_only(cams: Any = cams, light: Any = light, shading: str = shading) -> None:
                out = stage.renderer.render(cams, leaf, faces, albedo=stage.texture, shading=shading, light=light,
                                            background="white")
                stage.optimizer.zero_grad(set_to_none=True)
                out.rgb.mean().backward()

            def whole(cams: Any = cams, light: Any = light, shading: str = shading) -> None:
                out, regs = stage.render(cams, _look(shading, light), gen, 1)
                loss = out.rgb.mean() + sum(w * v for w, v in regs.values())
                stage.optimizer.zero_grad(set_to_none=True)
                loss.backward()

            per_render.append(count(render_only, stage.texture, geometry))
            leaf.grad = None
            per_whole.append(count(whole, stage.texture, geometry))
        render_counts[shading] = Count.mean(per_render)
        whole_counts[shading] = Count.mean(per_whole)
    p_albedo, p_lit = _shading_mix(st)
    render = Count.mean([render_counts["albedo"], render_counts["lambertian"]], [p_albedo, p_lit])
    whole = Count.mean([whole_counts["albedo"], whole_counts["lambertian"]], [p_albedo, p_lit])
    regularisers = whole - render

    grad = leaf.grad if leaf.grad is not None else torch.ones_like(leaf)
    with Meter(geometry) as mt_bwd:
        verts.backward(grad)
    marching = (mt_fwd.count + mt_bwd.count).resized(scale_grid)

    stage.optimizer.step()
    adam_fine = count(stage.optimizer.step)
    geo_params = [geometry.sdf, geometry.deform]
    geo_bytes = tensor_bytes(geo_params)
    tex_bytes = tensor_bytes(stage.texture.parameters())
    # Adam's cost per parameter is the same everywhere: scale the grid's share to the target grid.
    share = geo_bytes / (geo_bytes + tex_bytes)
    adam = adam_fine.resized(1.0 - share + share * scale_grid)

    tex_weights, tex_buffers = _module_bytes(stage.texture)
    mesh_v, mesh_f = int(verts.shape[0]), int(faces.shape[0])
    facts = {"dmtet_resolution": target, "tets": int(est_tets), "measured_at_resolution": res,
             "measured_tets": int(tets), "grid_vertices": int(grid_verts * scale_grid),
             "mesh_vertices": int(mesh_v * scale_surface), "mesh_faces": int(mesh_f * scale_surface),
             "scaled": res != target}
    return {
        "field_render": Part(render, "fp32", tex_weights, _trained_bytes(stage.texture.parameters()), tex_buffers,
                             measured="cpu",
                             note=f"rasterise {st.resolution}x{st.resolution} ({facts['mesh_faces']} faces), texture "
                                  "field at covered pixels, shading, antialias"),
        "marching_tets": Part(marching, "fp32", geo_bytes * scale_grid, _trained_bytes(geo_params) * scale_grid,
                              tensor_bytes(geometry.buffers()) * scale_grid, measured="cpu",
                              note=f"{facts['tets']} tetrahedra"
                                   + (f" (measured on {tets}, scaled)" if facts["scaled"] else "")),
        "regularisers": Part(regularisers.resized(scale_surface), "fp32", measured="cpu",
                             note="Laplacian + normal consistency on the mesh"),
        "optimiser_step": Part(adam, "fp32", measured="cpu", note="Adam over the SDF, deformation and texture"),
    }, facts


def control_image_part(cfg: Any, prior: Any, frame: Any, seed: int = 0) -> Part:
    """The head prior's landmark image for each camera of a step, at the ControlNet's size."""
    from avatar.render.cameras import sample_cameras
    from avatar.render.control import CONTROL_RESOLUTION, control_images

    verts = frame.to_field(prior.template.detach().float())
    landmarks = frame.to_field(prior.neutral_landmarks().detach().float())
    faces = prior.all_faces()
    cams = sample_cameras(cfg.coarse.batch_size, cfg.cameras, CONTROL_RESOLUTION, torch.Generator().manual_seed(seed))
    c = count(lambda: control_images(cams, landmarks, prior.landmark_contours, verts, faces,
                                     closed=prior.closed_contours, engine=cfg.engines.raster))
    return Part(c, "fp32", buffer_bytes=tensor_bytes([verts, landmarks, faces]), measured="cpu",
                note=f"{CONTROL_RESOLUTION}x{CONTROL_RESOLUTION}, drawn every step")


# ---------------------------------------------------------------------------
# The report


SENSITIVITY = {
    "tensor_utilisation_20%": {"tensor_utilisation": 0.2},
    "tensor_utilisation_10%": {"tensor_utilisation": 0.1},
    "tensor_utilisation_5%": {"tensor_utilisation": 0.05},
    "hbm_utilisation_25%": {"hbm_utilisation": 0.25},
    "launch_10us": {"launch_us": 10.0},
    "pessimistic_all": {"tensor_utilisation": 0.05, "fp32_utilisation": 0.1, "hbm_utilisation": 0.25,
                        "launch_us": 10.0, "sync_us": 50.0},
    "no_launch_floor_cuda_graphs": {"launch_us": 0.0, "sync_us": 0.0},
}
"""Other assumptions the minutes per avatar are recomputed under (one change from the stated ones each,
but ``pessimistic_all``)."""

STAGE_PARTS = {
    "coarse": ("field_render", "occupancy_update", "vae_encode", "unet_cfg", "control_image", "optimiser_step"),
    "fine": ("field_render", "marching_tets", "regularisers", "vae_encode", "unet_cfg", "control_image",
             "optimiser_step"),
}


def project(stages: dict[str, dict[str, Part]], steps: dict[str, int], acc: Accelerator) -> dict[str, Any]:
    """Seconds per step and per avatar, by part and in total; what dominates."""
    per_part = []
    out: dict[str, Any] = {"stages": {}}
    for stage, parts in stages.items():
        step_ms = sum(p.project(acc)["ms"] for p in parts.values())
        out["stages"][stage] = {"steps": steps[stage], "ms_per_step": _r(step_ms, 4),
                                "minutes": _r(step_ms * steps[stage] / 6e4, 4)}
        per_part += [(f"{stage}.{name}", p.project(acc)["ms"] * steps[stage] / 1e3) for name, p in parts.items()]
    total = sum(s for _, s in per_part)
    out["minutes_per_avatar"] = _r(total / 60, 4)
    ranked = sorted(per_part, key=lambda kv: -kv[1])
    out["dominant"] = [{"part": name, "seconds": _r(s, 4), "share": _r(s / total, 3)} for name, s in ranked[:4]]
    by_kind: dict[str, float] = {}
    for name, s in per_part:
        kind = name.split(".", 1)[1]
        by_kind[kind] = by_kind.get(kind, 0.0) + s
    out["share_by_part"] = {k: _r(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    return out


GOAL_MINUTES = {"quality": 15.0, "fast": 5.0}
"""Minutes per avatar on one H100, projected, that a preset must meet (issue 16)."""

FLOOR_GOAL = 1.2
"""A step's FLOPs over the floor's (the UNet + ControlNet CFG forward) with ``tiny-ae`` (issue 16)."""


def _amortise_encoder(stages: dict[str, dict[str, Part]], fraction: dict[str, float]) -> dict[str, dict[str, Part]]:
    """The stages with ``vae_encode`` spread over all steps when only ``fraction`` of them encode
    (the activations it saves, what the peak holds, are not spread)."""
    out = {}
    for stage, parts in stages.items():
        k = fraction.get(stage, 1.0)
        out[stage] = dict(parts)
        part = parts.get("vae_encode")
        if part is not None and k != 1.0:
            c = part.count.scaled(k)
            c.saved_bytes = part.count.saved_bytes
            out[stage]["vae_encode"] = Part(c, part.precision, part.weights_bytes, part.optimizer_bytes,
                                            part.buffer_bytes, part.measured,
                                            f"{part.note}; on {k:.0%} of the steps (none in the normal warm-up)")
    return out


def floor_ratios(stages: dict[str, dict[str, Part]], acc: Accelerator = H100_SXM) -> dict[str, Any]:
    """Per stage: the whole step against its floor, ``unet_cfg`` (one classifier-free-guidance
    forward of the UNet with its ControlNet: the work score distillation cannot skip), in FLOPs
    and in projected time."""
    out = {}
    for stage, parts in stages.items():
        floor = parts["unet_cfg"]
        step_flops = sum(p.count.flops for p in parts.values())
        step_ms = sum(p.project(acc)["ms"] for p in parts.values())
        floor_ms = floor.project(acc)["ms"]
        out[stage] = {"step_tflop": _r(step_flops / 1e12, 4), "floor_tflop": _r(floor.count.flops / 1e12, 4),
                      "flops_over_floor": _r(step_flops / floor.count.flops, 4), "step_ms": _r(step_ms, 4),
                      "floor_ms": _r(floor_ms, 4), "time_over_floor": _r(step_ms / floor_ms, 4)}
    return out


def quality_report(sd_models: tuple[Any, Any, Any], tiny: tuple[Any, Any, Any] | None = None,
                   preset: str = "quality", overrides: Iterable[str] = (), cameras: int = 3,
                   max_tets: int = 16_000_000, acc: Accelerator = H100_SXM, goal_minutes: float | None = None,
                   log: Callable[[str], None] = lambda msg: None, tiny_ae: Any = None,
                   encoders: Iterable[str] | None = None) -> dict[str, Any]:
    """The whole ``--flops`` report for ``preset`` (read from ``avatar/config.py`` now).

    sd_models: (UNet, ControlNet or None, VAE), normally SD 1.5's architectures on the meta device.
    tiny: the tiny guidance's models (real tensors), for the meta-vs-real check.
    tiny_ae: TAESD (``AutoencoderTiny``) like them, for ``guidance.encoder=tiny-ae``.
    encoders: the ``guidance.encoder`` values to compare (``by_encoder``: the same step with each
    encoder, the rest unchanged); the preset's own is the one detailed by part.
    goal_minutes: default :data:`GOAL_MINUTES` of the preset (15 for another).
    """
    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.generate import head_frame, load_prior

    started = time.perf_counter()
    cfg = make_config(GenerateConfig, preset, ["device=cpu", "prior.spec=anny", *overrides])
    goal_minutes = GOAL_MINUTES.get(preset, 15.0) if goal_minutes is None else goal_minutes
    dtype = torch.float16 if cfg.guidance.half_precision else torch.float32
    p_control = control_probability(cfg) if sd_models[1] is not None and cfg.guidance.controlnet else 1.0
    unet, controlnet, sd_vae = sd_models
    own_encoder = str(getattr(cfg.guidance, "encoder", "sd"))
    autoencoders = {"sd": sd_vae, "tiny-ae": tiny_ae}
    encoders = list(dict.fromkeys([own_encoder, *(encoders or [])]))
    missing = [e for e in encoders if autoencoders.get(e) is None]
    if missing:
        raise ValueError(f"no model given for encoder(s) {missing}: pass tiny_ae= for tiny-ae")
    vae = autoencoders[own_encoder]
    if not cfg.guidance.controlnet:
        controlnet = None
    prior = load_prior(cfg.prior.spec)
    frame = head_frame(prior)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log(name)
        value = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    diff = timed("diffusion (meta)", lambda: diffusion_parts(
        unet, controlnet, vae, batch=cfg.coarse.batch_size,
        render_resolutions={"coarse": cfg.coarse.resolution, "fine": cfg.fine.resolution},
        vae_resolution=cfg.guidance.vae_resolution, p_control=p_control, dtype=dtype,
        device=next(unet.parameters()).device))
    if cfg.fine.batch_size != cfg.coarse.batch_size:
        fine_diff = diffusion_parts(unet, controlnet, vae, batch=cfg.fine.batch_size,
                                    render_resolutions={"fine": cfg.fine.resolution},
                                    vae_resolution=cfg.guidance.vae_resolution, p_control=p_control, dtype=dtype,
                                    device=next(unet.parameters()).device)
        diff["vae_encode"]["fine"] = fine_diff["vae_encode"]["fine"]
        unet_fine = fine_diff["unet_cfg"]
    else:
        unet_fine = diff["unet_cfg"]
    coarse, coarse_facts = timed("coarse field + render (cpu)", lambda: coarse_parts(cfg, prior, frame, cameras))
    fine, facts = timed("fine DMTet + raster (cpu)", lambda: fine_parts(cfg, prior, frame, cameras, max_tets=max_tets))
    control = timed("control image (cpu)", lambda: control_image_part(cfg, prior, frame)) \
        if controlnet is not None else None

    stages: dict[str, dict[str, Part]] = {"coarse": {}, "fine": {}}
    for stage, own in (("coarse", coarse), ("fine", fine)):
        extra = {"vae_encode": diff["vae_encode"][stage], "unet_cfg": diff["unet_cfg"] if stage == "coarse"
                 else unet_fine}
        if control is not None:
            extra["control_image"] = control
        for name in STAGE_PARTS[stage]:
            part = own.get(name) or extra.get(name)
            if part is not None:
                stages[stage][name] = part
    steps = {"coarse": int(cfg.coarse.steps), "fine": int(cfg.fine.steps)}
    # During the coarse normal-map warm-up the denoiser takes the normal map as its latents
    # (coarse.warmup_latents): those steps run no encoder.
    warm = min(int(getattr(cfg.coarse, "normal_warmup_steps", 0)), steps["coarse"]) \
        if getattr(cfg.coarse, "warmup_latents", False) else 0
    encode_fraction = {"coarse": 1.0 - warm / max(steps["coarse"], 1), "fine": 1.0}
    by_encoder: dict[str, Any] = {}
    for name in encoders:
        if name == own_encoder:
            swapped = stages
        else:
            other = encoder_parts(autoencoders[name], batch=cfg.coarse.batch_size,
                                  render_resolutions={"coarse": cfg.coarse.resolution, "fine": cfg.fine.resolution},
                                  vae_resolution=cfg.guidance.vae_resolution, dtype=dtype,
                                  device=next(unet.parameters()).device)
            swapped = {stage: {k: (other[stage] if k == "vae_encode" else v) for k, v in parts.items()}
                       for stage, parts in stages.items()}
        proj = project(_amortise_encoder(swapped, encode_fraction), steps, acc)
        ratios = floor_ratios(swapped, acc)
        by_encoder[name] = {
            "minutes_per_avatar": proj["minutes_per_avatar"], "goal_minutes": goal_minutes,
            "met": proj["minutes_per_avatar"] <= goal_minutes,
            "encoder_tflop": {stage: _r(parts["vae_encode"].count.flops / 1e12, 4)
                              for stage, parts in swapped.items()},
            "step_over_floor": ratios,
            **({"floor_goal": FLOOR_GOAL,
                "floor_goal_met": all(r["flops_over_floor"] <= FLOOR_GOAL for r in ratios.values())}
               if name == "tiny-ae" else {}),
        }
    report: dict[str, Any] = {
        "preset": preset,
        "encoder": own_encoder,
        "by_encoder": by_encoder,
        "config": {
            "coarse": {**{k: getattr(cfg.coarse, k) for k in ("steps", "resolution", "samples_per_ray", "batch_size",
                                                              "n_levels", "log2_hashmap_size", "max_resolution",
                                                              "hidden", "occupancy_resolution")},
                       "volume": coarse_facts},
            "fine": {**{k: getattr(cfg.fine, k) for k in ("steps", "resolution", "dmtet_resolution", "batch_size",
                                                          "n_levels", "log2_hashmap_size", "max_resolution",
                                                          "hidden")}, "dmtet": facts},
            "guidance": {"encoder": own_encoder, "vae_resolution": cfg.guidance.vae_resolution,
                         "dtype_on_gpu": str(dtype).split(".")[-1],
                         "controlnet": bool(controlnet is not None), "controlnet_fraction_of_cameras": _r(p_control, 3),
                         "architectures": "SD 1.5 UNet + ControlNet (from the UNet) + VAE / TAESD, published "
                                          "configs"},
        },
        "unet_cfg_controlnet_share_of_flops": diff["unet_cfg_controlnet_share"],
        "encoder_runs_on_fraction_of_steps": {k: _r(v, 4) for k, v in encode_fraction.items()},
        **summarise(_amortise_encoder(stages, encode_fraction), steps, acc, goal_minutes),
    }
    if tiny is not None:
        check = timed("meta vs real (tiny)", lambda: meta_matches_real(*tiny, vae_resolution=64, render_resolution=32))
        report["checks"] = {"meta_flops_equal_real_on_tiny_models": check}
    seconds["total"] = round(time.perf_counter() - started, 1)
    report["seconds_to_count"] = seconds
    return report


def summarise(stages: dict[str, dict[str, Part]], steps: dict[str, int], acc: Accelerator = H100_SXM,
              goal_minutes: float = 15.0) -> dict[str, Any]:
    """The report's accelerator, parts, per-avatar projection, sensitivity and memory sections."""
    proj = project(stages, steps, acc)
    sensitivity = {label: project(stages, steps, Accelerator(**{**asdict(acc), **change}))["minutes_per_avatar"]
                   for label, change in SENSITIVITY.items()}
    return {
        "accelerator": {**asdict(acc), "assumptions": acc.assumptions()},
        "parts": {stage: {name: p.to_json(acc, steps[stage]) for name, p in parts.items()}
                  for stage, parts in stages.items()},
        "per_avatar": {**proj, "goal_minutes": goal_minutes, "met": proj["minutes_per_avatar"] <= goal_minutes},
        "sensitivity_minutes": sensitivity,
        "memory": _memory(stages),
    }


def _memory(stages: dict[str, dict[str, Part]]) -> dict[str, Any]:
    """What a stage holds at the peak of a step: every part's weights, optimiser state and buffers
    (shared models once), plus the activations all parts save for the one backward."""
    out = {}
    for stage, parts in stages.items():
        held = {}
        for p in parts.values():
            held[id(p)] = p.weights_bytes + p.optimizer_bytes + p.buffer_bytes
        saved = sum(p.count.saved_bytes for p in parts.values())
        out[stage] = {"held_gib": _r(sum(held.values()) / 2**30, 3), "saved_for_backward_gib": _r(saved / 2**30, 3),
                      "peak_estimate_gib": _r((sum(held.values()) + saved) / 2**30, 3)}
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as a table for the README's performance section."""
    acc = report["accelerator"]
    per = report["per_avatar"]
    lines = [
        f"One `{report['preset']}` avatar on paper: FLOPs and bytes of one step by part "
        f"(`python benchmarks/iteration.py --flops --markdown`), projected to one {acc['name']}.",
        "",
        "| stage | part | TFLOP / step | GB moved / step | kernels | saved for bwd (MiB) | weights (MiB) "
        "| bound | H100 ms / step | steps | min / avatar | share |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    total_s = per["minutes_per_avatar"] * 60
    for stage, parts in report["parts"].items():
        steps = per["stages"][stage]["steps"]
        for name, p in parts.items():
            s = p["seconds_per_avatar"]
            lines.append(
                f"| {stage} | {name} | {_fmt(p['tflop'])} | {_fmt(p['gb_moved'])} | {p['kernels']:.0f} "
                f"| {_fmt(p['saved_for_backward_mib'])} | {_fmt(p['weights_mib'])} | {p['h100']['bound']} "
                f"| {_fmt(p['h100']['ms'])} | {steps} | {_fmt(s / 60)} | {s / total_s:.1%} |")
        st = per["stages"][stage]
        lines.append(f"| {stage} | **step** | | | | | | | **{_fmt(st['ms_per_step'])}** | {steps} "
                     f"| **{_fmt(st['minutes'])}** | |")
    met = "meets" if per["met"] else "misses"
    lines += [
        "",
        f"**{_fmt(per['minutes_per_avatar'])} minutes per avatar** on one H100, projected: {met} the goal of "
        f"{per['goal_minutes']:g} minutes. Largest parts: "
        + ", ".join(f"{d['part']} ({d['share']:.0%})" for d in per["dominant"][:3]) + ".",
        "",
        "Sensitivity (minutes per avatar): " + ", ".join(
            f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in report["sensitivity_minutes"].items()) + ".",
        "",
        "Assumptions:",
        *[f"- {a}" for a in acc["assumptions"]],
        "- FLOP and byte counts do not depend on the machine that counts them; the diffusion models are "
        "counted on the meta device, the fields and renderers on real tensors on the CPU (native engines).",
    ]
    return "\n".join(lines)


def floor_markdown(reports: Iterable[dict[str, Any]]) -> str:
    """Each preset and encoder: one step against its floor (the UNet + ControlNet CFG forward), and
    the minutes per avatar projected on one H100, against the goals of issue 16."""
    lines = [
        "| preset | encoder | stage | encoder TFLOP | floor TFLOP | step TFLOP | step / floor (FLOPs) "
        "| step / floor (H100 time) | H100 ms / step | min / avatar | goal |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for report in reports:
        for name, enc in report.get("by_encoder", {}).items():
            own = " (preset)" if name == report.get("encoder") else ""
            for i, (stage, r) in enumerate(enc["step_over_floor"].items()):
                goal = ""
                if i == 0:
                    goal = f"{'met' if enc['met'] else 'missed'} (<= {enc['goal_minutes']:g} min)"
                    if "floor_goal" in enc:
                        goal += f"; step {'<=' if enc['floor_goal_met'] else '>'} {enc['floor_goal']:g}x floor"
                minutes = f"**{_fmt(enc['minutes_per_avatar'])}**" if i == 0 else ""
                lines.append(
                    f"| {report['preset'] if i == 0 else ''} | {name + own if i == 0 else ''} | {stage} "
                    f"| {_fmt(enc['encoder_tflop'][stage])} | {_fmt(r['floor_tflop'])} | {_fmt(r['step_tflop'])} "
                    f"| {r['flops_over_floor']:.2f}x | {r['time_over_floor']:.2f}x | {_fmt(r['step_ms'])} "
                    f"| {minutes} | {goal} |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}"
    return f"{x:.2g}"


if __name__ == "__main__":
    # ``python benchmarks/flops.py REPORT.json``: the markdown table of a saved ``--flops`` report.
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/flops.py REPORT.json  (from python benchmarks/iteration.py --flops)")
    with open(sys.argv[1]) as fh:
        saved = json.load(fh)
    reports = list(saved["presets"].values()) if "presets" in saved else [saved]
    print(floor_markdown(reports))
    for one in reports:
        print()
        print(markdown(one))
