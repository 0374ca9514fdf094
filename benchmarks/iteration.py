"""Seconds per optimisation step, split into its parts, as one JSON object.

    python benchmarks/iteration.py                # SD 1.5 architectures + tiny models + a smoke run's memory
    python benchmarks/iteration.py --quick        # tiny models and a smaller fine stage only
    python benchmarks/iteration.py --no-smoke     # skip the smoke run (peak memory)
    python benchmarks/iteration.py --smoke-only   # only the smoke run
    python benchmarks/iteration.py --flops [--markdown]  # FLOPs, bytes, memory by part; H100 projection

``--flops`` (issues 14 and 16) prints, instead of times on this machine, what one step of each
preset (``--preset fast,quality``) costs on paper, by part, with each image encoder
(``--encoders sd,tiny-ae``: SD's VAE and TAESD), the ratio of the whole step to its floor (one
UNet + ControlNet classifier-free-guidance forward), and the minutes per avatar it projects to on
one H100 at stated utilisations; ``--markdown`` prints the same as tables for the README. See
``benchmarks/flops.py``.

Parts of one step (issue 7), each timed on its own (wall clock, best of N after a warm-up):

- ``field_render``: the stage's field queries and rendering, forward and backward
  (coarse: hash-grid NeRF, occupancy-skipped volume rendering at 64x64, 128 samples
  per ray; fine: DMTet marching tetrahedra + rasterisation at 512x512 + texture field);
  the backward is of a loss on the image, the regularisers included;
- ``vae_encode``: the VAE encoder at 512x512 (the renders are resized to it), forward
  and backward to the image;
- ``unet_cfg``: one UNet forward on the classifier-free-guidance batch (2 latents of
  64x64, text embeddings 77x768), with the MediaPipe ControlNet forward on its
  512x512 landmark image (SDS does not backpropagate through them);
- ``rest``: the optimiser step and the landmark control image.

The UNet, ControlNet and VAE are the real Stable Diffusion 1.5 architectures
(their published configs) at random weights: their cost does not depend on the
weights. The same parts are timed with the tiny models of ``--guidance tiny``.
The goal (issue 7): coarse ``field_render`` at most 10% of ``unet_cfg``.

``smoke_run``: peak resident memory (the child's ``ru_maxrss``) and wall time of
``avatar generate ... --preset smoke --guidance tiny`` in a subprocess (goal: 4 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]



def best_of(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"best_s": round(times[0], 4), "median_s": round(times[len(times) // 2], 4), "repeats": repeats}


# ---------------------------------------------------------------------------
# Diffusion parts


def diffusion_parts(unet, controlnet, vae, latent: int, image: int, text_dim: int, repeats: int) -> dict:
    """unet_cfg (UNet + ControlNet on the CFG batch, no grad) and vae_encode (forward + backward)."""
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500, 500])
    text = torch.randn(2, 77, text_dim)
    cond = torch.rand(2, 3, image, image)

    @torch.no_grad()
    def unet_cfg():
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)

    def vae_encode():
        img = torch.rand(1, 3, image, image, requires_grad=True)
        lat = vae.encode(img * 2 - 1).latent_dist.sample()
        lat.sum().backward()

    return {"unet_cfg": best_of(unet_cfg, repeats), "vae_encode": best_of(vae_encode, repeats)}


def sd15_models(device: str = "cpu", dtype: torch.dtype = torch.float32, encoder: str = "sd"):
    """SD 1.5's UNet, its ControlNet and VAE (``encoder='tiny-ae'``: TAESD instead) at random
    weights; on ``meta`` they hold shapes only."""
    from avatar.guidance.architectures import sd15_models as build

    m = build(device, dtype)
    return m["unet"], m["controlnet"], m["tiny_ae" if encoder == "tiny-ae" else "vae"]


def tiny_models(encoder: str = "sd"):
    from avatar.guidance.tiny import LANDMARK_CONTROLNET, build_tiny_components

    c = build_tiny_components(0)
    ae = c["tiny_ae"] if encoder == "tiny-ae" else c["vae"]
    for m in (c["unet"], ae, c["controlnets"][LANDMARK_CONTROLNET]):
        m.requires_grad_(False)
    return c["unet"], c["controlnets"][LANDMARK_CONTROLNET], ae


# ---------------------------------------------------------------------------
# Field + render


def stage_parts(stage_name: str, preset: str, overrides: list[str], repeats: int) -> dict:
    """field_render (forward + backward) and the optimiser step of one stage, with that preset's sizes."""
    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.generate import CoarseStage, FineStage, StepLook, head_frame, load_prior
    from avatar.render.cameras import sample_cameras

    cfg = make_config(GenerateConfig, preset, ["device=cpu", "prior.spec=anny", *overrides])
    prior = load_prior(cfg.prior.spec)
    frame = head_frame(prior)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    if stage_name == "coarse":
        stage = CoarseStage(cfg, frame, prior, device)
        stage.renderer.update_occupancy(0, generator=gen)
    else:
        stage = FineStage(cfg, frame, device, lambda p: prior.sdf(frame.to_metres(p)).float() * frame.scale)
    st = getattr(cfg, stage_name)

    def field_render():
        cams = sample_cameras(1, cfg.cameras, st.resolution, gen, device)
        look = StepLook("lambertian", cams.eye, 1.0, getattr(stage, "background", "white"))
        out, regs = stage.render(cams, look, gen, 1)
        loss = out.rgb.mean() + sum(w * v for w, v in regs.values())
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def optimiser_step():
        stage.optimizer.step()

    field = best_of(field_render, repeats)
    opt = best_of(optimiser_step, repeats)
    out = {"field_render": field, "optimiser_step": opt, "resolution": st.resolution, "preset": preset}
    if stage_name == "coarse":
        out["samples_per_ray"] = st.samples_per_ray
        out["occupancy"] = round(stage.occupancy.occupancy, 4)
    else:
        out["dmtet_resolution"] = st.dmtet_resolution
    out["hash_grid"] = {k: getattr(st, k) for k in ("n_levels", "log2_hashmap_size", "max_resolution")}
    return out


def control_part(repeats: int) -> dict:
    """The landmark control image at 512x512 (ControlNetMediaPipeFace's input size)."""
    from avatar.pipeline.generate import head_frame, load_prior
    from avatar.render.cameras import orbit_cameras
    from avatar.render.control import CONTROL_RESOLUTION, control_images

    prior = load_prior("anny")
    frame = head_frame(prior)
    verts = frame.to_field(prior.template.float())
    landmarks = frame.to_field(prior.neutral_landmarks().float())
    cams = orbit_cameras(1, elevation=10.0, radius=1.3, resolution=CONTROL_RESOLUTION)
    return best_of(lambda: control_images(cams, landmarks, prior.landmark_contours, verts, prior.all_faces(),
                                          closed=prior.closed_contours), repeats)


# ---------------------------------------------------------------------------
# Smoke run memory


SMOKE_CHILD = """
import sys
sys.argv = ["avatar", *sys.argv[1:]]
try:
    from avatar.cli import main
    main()
finally:
    status = open("/proc/self/status").read()
    print("VMHWM_KIB", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
"""
"""The smoke run's child: the CLI, then its own peak RSS (VmHWM) on stderr. The child's, not
``RUSAGE_CHILDREN``'s, which would also count a compiler run by a first native build."""


def smoke_run() -> dict:
    """Peak RSS and wall time of a whole smoke run with tiny guidance, in a child process."""
    subprocess.run([sys.executable, "-m", "avatar.cli", "doctor", "--build", "--json"], capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", SMOKE_CHILD, "generate", "an old sea captain", "--preset", "smoke",
               "--guidance", "tiny", "--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - t0
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM_KIB")]
    peak_mib = int(peak[-1]) / 1024 if peak else float("nan")
    return {"ok": proc.returncode == 0, "seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib, 1),
            "goal_mib": 4096, "meets_goal": proc.returncode == 0 and peak_mib <= 4096,
            **({} if proc.returncode == 0 else {"stderr": proc.stderr[-2000:]})}


def flops_mode(args: argparse.Namespace, log) -> None:
    """``--flops``: the cost of one step of the preset on paper, and its H100 projection."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flops

    from avatar.config import GenerateConfig, make_config
    from avatar.guidance.architectures import sd15_models as build

    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    dtypes = {torch.float16 if make_config(GenerateConfig, p, ["device=cpu"]).guidance.half_precision
              else torch.float32 for p in presets}
    reports = {}
    for dtype in dtypes:
        log(f"SD 1.5 architectures (UNet, ControlNet, VAE, TAESD) on the meta device, {dtype}")
        models = build("meta", dtype)
        tiny = tiny_models() if not args.no_check else None
        for preset in presets:
            cfg = make_config(GenerateConfig, preset, ["device=cpu"])
            if (torch.float16 if cfg.guidance.half_precision else torch.float32) != dtype:
                continue
            log(f"preset {preset}")
            reports[preset] = flops.quality_report(
                (models["unet"], models["controlnet"], models["vae"]), tiny, preset=preset,
                cameras=args.flops_cameras, max_tets=args.max_tets, log=log, tiny_ae=models["tiny_ae"],
                encoders=encoders)
            tiny = None  # the meta-vs-real check once is enough
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count()}
    ordered = [reports[p] for p in presets]
    if args.markdown:
        print(flops.floor_markdown(ordered))
        for report in ordered:
            print()
            print(flops.markdown(report))
    else:
        print(json.dumps({"presets": {p: reports[p] for p in presets}, "machine": machine}, indent=2))


def _quality_dmtet() -> int:
    from avatar.config import GenerateConfig, make_config

    return int(make_config(GenerateConfig, "quality", []).fine.dmtet_resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a smaller fine stage only")
    parser.add_argument("--no-smoke", action="store_true", help="skip the smoke run")
    parser.add_argument("--smoke-only", action="store_true", help="only the smoke run's time and peak memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fine-dmtet", type=int, default=None,
                        help="DMTet cells along the head box of the fine case (default: the quality preset's)")
    parser.add_argument("--flops", action="store_true",
                        help="FLOPs, bytes moved and memory of one step by part, and its H100 projection")
    parser.add_argument("--markdown", action="store_true", help="with --flops: a markdown table instead of JSON")
    parser.add_argument("--preset", default="fast,quality",
                        help="with --flops: the presets to cost, comma-separated (default fast,quality)")
    parser.add_argument("--encoders", default="sd,tiny-ae",
                        help="with --flops: the image encoders to compare, comma-separated (default sd,tiny-ae)")
    parser.add_argument("--flops-cameras", type=int, default=3,
                        help="with --flops: random cameras per shading the field parts are averaged over")
    parser.add_argument("--max-tets", type=int, default=16_000_000,
                        help="with --flops: larger DMTet grids are counted on a coarser grid and scaled up")
    parser.add_argument("--no-check", action="store_true",
                        help="with --flops: skip the check that meta and real tensors count the same FLOPs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    torch.set_grad_enabled(True)
    report: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}

    def log(msg: str) -> None:
        print(f"[iteration] {msg}", file=sys.stderr, flush=True)

    if args.flops:
        flops_mode(args, log)
        return
    if args.smoke_only:
        print(json.dumps({**report, "smoke_run": smoke_run()}, indent=2))
        return

    log("coarse stage (quality sizes: 64x64, 128 samples, L16 T19)")
    report["coarse"] = stage_parts("coarse", "quality", [], args.repeats)
    fine_dmtet = 64 if args.quick else (args.fine_dmtet or _quality_dmtet())
    log(f"fine stage (512x512, DMTet {fine_dmtet})")
    report["fine"] = stage_parts("fine", "quality", [f"fine.dmtet_resolution={fine_dmtet}"], max(1, args.repeats - 1))
    report["control_image"] = control_part(args.repeats)
    log("tiny models")
    report["tiny"] = diffusion_parts(*tiny_models(), latent=32, image=64, text_dim=32, repeats=args.repeats)
    if not args.quick:
        log("SD 1.5 architectures at random weights (fp32, CPU)")
        report["sd15"] = diffusion_parts(*sd15_models(), latent=64, image=512, text_dim=768, repeats=2)
    diff = report.get("sd15", report["tiny"])
    unet = diff["unet_cfg"]["best_s"]
    for stage in ("coarse", "fine"):
        part = report[stage]
        part["step_s"] = round(part["field_render"]["best_s"] + diff["vae_encode"]["best_s"] + unet
                               + part["optimiser_step"]["best_s"] + report["control_image"]["best_s"], 3)
        part["field_render_over_unet_cfg"] = round(part["field_render"]["best_s"] / unet, 4)
    report["goal"] = {"coarse_field_render_over_unet_cfg_max": 0.10,
                      "met": report["coarse"]["field_render_over_unet_cfg"] <= 0.10,
                      "against": "sd15" if "sd15" in report else "tiny"}
    if not args.no_smoke:
        log("smoke run (tiny guidance), peak memory")
        report["smoke_run"] = smoke_run()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
