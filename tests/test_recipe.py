"""HeadSculpt's recipe (docs/METHOD.md, issue #15 section 2): the DMTet SDF in [-1, 1] cells,
the normal-map warm-up (as latents in the coarse stage), the shading, ambient and backdrop
drawn per step, the learned coarse backdrop, the per-sample orientation term, the unsquared
Laplacian and the defaults that carry HeadSculpt's numbers."""

from __future__ import annotations

import math

import pytest
import torch
from support import TINY_SIZES

from avatar.config import EditConfig, GenerateConfig, make_config
from avatar.fields.dmtet import DMTetGeometry, laplacian_loss, sdf_in_field_units
from avatar.ops.marching_tets import TetGridSpec
from avatar.pipeline.generate import GenerateRun, StepLook, sample_look
from avatar.render.cameras import orbit_cameras
from avatar.workspace import Workspace


def test_quality_defaults_are_headsculpts_numbers():
    """Each value against HeadSculpt's file:line (docs/METHOD.md), in our units where they differ."""
    cfg = make_config(GenerateConfig, "quality")
    c, f, cam = cfg.coarse, cfg.fine, cfg.cameras
    assert c.samples_per_ray == 1024                                    # main.py:91 --max_steps
    assert c.normal_warmup_steps == f.normal_warmup_steps == 2000       # main.py --warmup_iters, both stages
    assert tuple(c.shading_probs) == tuple(f.shading_probs) == (0.0, 0.8, 0.0, 0.2)  # utils.py:413-419
    assert tuple(c.ambient_range) == (0.1, 1.0)                          # utils.py:413
    assert c.background == "learned" and f.background == "white"        # renderer.py:821-826, 951-956
    assert c.random_background_prob == f.random_background_prob == 0.5  # utils.py:422-425
    assert c.lambda_orientation == 5e-4 and c.warmup_latents            # main.py:106; utils.py:451
    assert f.lr == 1e-2 and f.steps == 7000                              # network_grid.py:288; main.py:56
    assert f.lambda_normal == 0.0 and f.lambda_laplacian == 0.25         # main.py:108-109 (0.2 x 3.177/2.5)
    assert tuple(cam.radius_range) == pytest.approx((1.0 * 2.5 / 3.177, 1.5 * 2.5 / 3.177), abs=0.01)
    assert tuple(cam.sector_probs) == (0.25, 0.5, 0.25) and cam.look_at_jitter == 0.0  # provider.py:93-109
    assert cfg.guidance.negative_prompt == "" and cfg.guidance.guidance_scale == 101.0  # main.py:17, 41 (s + 1)
    for preset in ("quality", "fast", "smoke"):
        edit = make_config(EditConfig, preset)
        # The source is textured, so an edit starts shaded; its SDF rate fits 1500 steps, not 7000.
        assert edit.fine.normal_warmup_steps == 0 and edit.fine.lr == 5e-2, preset
    assert make_config(GenerateConfig, "smoke").fine.normal_warmup_steps > 0


def test_dmtet_sdf_is_stored_in_cells_within_minus_one_and_one():
    spec = TetGridSpec.covering((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5), 20)
    geo = DMTetGeometry(spec, sdf_init=lambda p: p.norm(dim=-1) - 0.3)
    distance = geo.grid_verts.norm(dim=-1) - 0.3
    assert geo.sdf.min() == -1.0 and geo.sdf.max() == 1.0
    near = distance.abs() < spec.cell
    torch.testing.assert_close(geo.sdf[near], distance[near] / spec.cell)  # exact within a cell
    assert torch.all(geo.sdf[distance > spec.cell] == 1.0) and torch.all(geo.sdf[distance < -spec.cell] == -1.0)
    assert geo.state_dict()["_extra_state"]["sdf_units"] == "cells"


def test_a_field_unit_sdf_of_an_older_state_loads_as_the_same_surface():
    spec = TetGridSpec.covering((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5), 12)
    geo = DMTetGeometry(spec, sdf_init=lambda p: p.norm(dim=-1) - 0.3)
    old = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in geo.state_dict().items()}
    old["sdf"] = old["sdf"] * spec.cell
    old["_extra_state"] = {"grid": spec.to_dict()}  # what states held before the SDF was in cells
    assert sdf_in_field_units(old) and not sdf_in_field_units(geo.state_dict())
    kept = old["sdf"].clone()
    loaded = DMTetGeometry.from_state_dict(old)
    torch.testing.assert_close(loaded.sdf, geo.sdf)
    assert torch.equal(old["sdf"], kept)  # the caller's tensors are not changed
    v0, f0 = geo.extract()
    v1, f1 = loaded.extract()
    assert torch.equal(f0, f1) and torch.allclose(v0, v1, atol=1e-6)


def _eyes(n: int = 1) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, 1.0]]).repeat(n, 1)


def test_the_warm_up_renders_normal_maps_over_the_stage_backdrop():
    st = make_config(GenerateConfig, "quality").coarse
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    look = sample_look(st, st.normal_warmup_steps - 1, _eyes(), g, torch.device("cpu"), default_background="bg")
    assert (look.shading, look.light, look.ambient, look.background) == ("normal", None, 1.0, "bg")
    assert torch.equal(g.get_state(), state)  # the warm-up draws nothing
    after = sample_look(st, st.normal_warmup_steps, _eyes(), g, torch.device("cpu"))
    assert after.shading in ("lambertian", "normal")


def test_after_the_warm_up_shading_ambient_and_backdrop_follow_the_recipe():
    st = make_config(GenerateConfig, "quality").fine
    g = torch.Generator().manual_seed(1)
    looks = [sample_look(st, st.normal_warmup_steps + i, _eyes(2), g, torch.device("cpu")) for i in range(3000)]
    shadings = [lk.shading for lk in looks]
    assert set(shadings) == {"lambertian", "normal"}
    assert shadings.count("lambertian") / len(looks) == pytest.approx(0.8, abs=0.03)
    lit = [lk for lk in looks if lk.shading == "lambertian"]
    assert all(lk.light is not None and lk.light.shape == (2, 3) for lk in lit)
    assert all(lk.light is None for lk in looks if lk.shading == "normal")
    ambients = torch.tensor([lk.ambient for lk in looks])
    assert 0.1 <= ambients.min() and ambients.max() <= 1.0
    assert ambients.mean().item() == pytest.approx(0.55, abs=0.02)  # uniform on [0.1, 1]
    coloured = [lk.background for lk in looks if isinstance(lk.background, torch.Tensor)]
    assert len(coloured) / len(looks) == pytest.approx(0.5, abs=0.03)
    colours = torch.stack(coloured)
    assert colours.shape[1] == 3 and 0 <= colours.min() and colours.max() <= 1 and colours.std() > 0.2
    assert all(lk.background == "white" for lk in looks if not isinstance(lk.background, torch.Tensor))


def test_three_shading_probabilities_read_as_four_and_fixed_looks_draw_as_asked():
    st = make_config(GenerateConfig, "quality", ["fine.shading_probs=[0, 1, 0]", "fine.ambient_range=[0.25, 0.25]",
                                                 "fine.random_background_prob=0"]).fine
    g = torch.Generator().manual_seed(2)
    looks = [sample_look(st, st.normal_warmup_steps + i, _eyes(), g, torch.device("cpu")) for i in range(50)]
    assert {lk.shading for lk in looks} == {"lambertian"} and {lk.ambient for lk in looks} == {0.25}
    assert {lk.background for lk in looks} == {"white"}


def _run(tmp_path, *extra: str, guidance: str = "tiny") -> GenerateRun:
    cfg = make_config(GenerateConfig, "smoke", ["prompt=a head", *TINY_SIZES, "engines.hashgrid=torch",
                                                f"guidance.model={guidance}", "coarse.steps=4", "fine.steps=2",
                                                "coarse.normal_warmup_steps=2", *extra])
    ws = Workspace.create(tmp_path / "run", "run")
    run = GenerateRun(cfg, ws, progress=False)
    run._ensure_stage()
    return run


def test_coarse_warm_up_feeds_normal_map_and_opacity_to_the_denoiser_as_latents(tmp_path, one_thread, monkeypatch):
    run = _run(tmp_path)
    calls = []
    encoded = []
    original = run.guidance.score_distillation
    encode = run.guidance.encoder.encode

    def spy(images, cameras, **kw):
        calls.append((images.detach().clone(), kw.get("as_latent", False)))
        return original(images, cameras, **kw)

    monkeypatch.setattr(run.guidance, "score_distillation", spy)
    monkeypatch.setattr(run.guidance.encoder, "encode", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    outputs = []
    render = run.coarse.render

    def keep(*a, **k):
        result = render(*a, **k)
        outputs.append(result[0])
        return result

    monkeypatch.setattr(run.coarse, "render", keep)
    for _ in range(3):
        run.train_step(run.coarse)
        run.step += 1
    enc = run.guidance.encoder
    side = enc.resolution // enc.scale_factor
    (first, as_latent), out = calls[0], outputs[0]
    assert as_latent and first.shape == (out.rgb.shape[0], 4, side, side)
    assert first.min() >= -1 and first.max() <= 1
    # Channels: the normal map (composited like the image) and the opacity, mapped to [-1, 1].
    want = torch.nn.functional.interpolate(torch.cat([out.rgb, out.opacity], -1).permute(0, 3, 1, 2).detach(),
                                           size=(side, side), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(first, want)
    assert calls[1][1]  # both warm-up steps skip the encoder; then images go through it, once
    assert not calls[2][1] and calls[2][0].shape[-1] == 3 and len(encoded) == 1


def test_the_oracle_gets_normal_maps_as_images_during_the_warm_up(tmp_path, one_thread, monkeypatch):
    import trimesh

    mesh = trimesh.creation.icosphere(2, radius=0.12)
    path = tmp_path / "sphere.ply"
    mesh.export(path)
    run = _run(tmp_path, guidance=f"oracle:{path}")
    calls = []
    original = run.guidance.score_distillation
    monkeypatch.setattr(run.guidance, "score_distillation",
                        lambda images, cameras, **kw: calls.append(kw.get("as_latent", False)) or
                        original(images, cameras, **kw))
    run.train_step(run.coarse)
    assert calls == [False] and run.look.shading == "normal" and run.target.look is run.look


def test_the_learned_coarse_backdrop_trains_saves_and_old_checkpoints_load_without_it(tmp_path, one_thread):
    from avatar.render.volume import BackgroundMLP

    run = _run(tmp_path)
    coarse = run.coarse
    assert isinstance(coarse.background, BackgroundMLP)
    names = [g["name"] for g in coarse.optimizer.param_groups]
    assert names == ["encoding", "mlp", "background"]
    before = [p.detach().clone() for p in coarse.background.parameters()]
    for _ in range(3):  # two warm-up steps (over the learned backdrop), then one shaded
        run.train_step(coarse)
        run.step += 1
    assert any(not torch.equal(a, b) for a, b in zip(before, coarse.background.parameters()))
    state = coarse.state_dict()
    assert state["background"] is not None
    old = dict(state, background=None)
    old["optimizer"] = {"state": {}, "param_groups": state["optimizer"]["param_groups"][:2]}
    again = _run(tmp_path / "again")
    again.coarse.load_state_dict(old)
    assert again.coarse.background == "white" and len(again.coarse.optimizer.param_groups) == 2
    white = _run(tmp_path / "white", "coarse.background=white")
    assert white.coarse.background == "white" and len(white.coarse.optimizer.param_groups) == 2


def test_a_random_backdrop_colour_reaches_the_fine_render_and_the_oracle_target(tmp_path, one_thread):
    import trimesh

    from avatar.pipeline.generate import MeshTarget

    run = _run(tmp_path, "coarse.steps=0", "fine.steps=2")
    colour = torch.tensor([0.2, 0.6, 0.9])
    cams = orbit_cameras(1, elevation=0.0, radius=1.3, fov_y=40.0, resolution=24)
    look = StepLook("lambertian", torch.tensor([[0.0, 0.0, 2.0]]), 0.4, colour)
    out, _ = run.fine.render(cams, look, run.generator, 0)
    corner = out.rgb[0, 0, 0]
    torch.testing.assert_close(corner, colour)
    mesh = trimesh.creation.icosphere(2, radius=0.12)
    path = tmp_path / "sphere.ply"
    mesh.export(path)
    target = MeshTarget(path, run.frame)
    target.look = look
    img = target(cams)
    torch.testing.assert_close(img[0, 0, 0], colour)
    dim = StepLook("lambertian", look.light, 0.1, colour)
    target.look = dim
    assert target(cams)[0, 12, 12].sum() < img[0, 12, 12].sum()  # the step's ambient reaches the target


def test_orientation_is_a_mean_over_the_samples(tmp_path, one_thread):
    run = _run(tmp_path, "coarse.normal_warmup_steps=0")
    cams = orbit_cameras(1, elevation=0.0, radius=1.3, fov_y=40.0, resolution=16)
    look = StepLook("lambertian", torch.tensor([[0.0, 0.0, 2.0]]), 0.5, "white")
    out, regs = run.coarse.render(cams, look, run.generator, 1)
    weight, value = regs["orientation"]
    ex = out.extras
    facing = (ex["normals"] * ex["dirs"][ex["ray_indices"]]).sum(-1).clamp(min=0).pow(2)
    assert weight == 5e-4
    torch.testing.assert_close(value, (ex["weights"].detach() * facing).sum() / facing.shape[0])
    assert facing.shape[0] > ex["dirs"].shape[0]  # more samples than rays: not the per-ray form
    run.coarse.cfg.orientation_per_ray = True  # version 1's form, kept for runs that started with it
    out, regs = run.coarse.render(cams, look, run.generator, 1)
    ex = out.extras
    facing = (ex["normals"] * ex["dirs"][ex["ray_indices"]]).sum(-1).clamp(min=0).pow(2)
    torch.testing.assert_close(regs["orientation"][1], (ex["weights"].detach() * facing).sum() / ex["dirs"].shape[0])


def test_laplacian_is_the_mean_unsquared_length():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
    lap = []
    for i in range(4):
        others = torch.cat([verts[:i], verts[i + 1:]])  # every vertex of a tetrahedron neighbours the rest
        lap.append(verts[i] - others.mean(0))
    lengths = torch.stack(lap).norm(dim=-1)
    torch.testing.assert_close(laplacian_loss(verts, faces), lengths.mean())
    torch.testing.assert_close(laplacian_loss(verts, faces, squared=True), lengths.pow(2).mean())
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], requires_grad=True)
    loss = laplacian_loss(flat, torch.tensor([[0, 1, 2]]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(flat.grad).all()


def test_texture_only_edits_skip_the_warm_up_and_normal_maps(monkeypatch):
    import avatar.pipeline.edit as edit

    class Source:
        prior_spec = "anny"
        config = {}
        root = "src"

    cfg = make_config(EditConfig, "quality", ["instruction=hat", "texture_only=true", "fine.normal_warmup_steps=100"])
    monkeypatch.setattr(edit, "source_guidance_config", lambda source: GenerateConfig().guidance)
    loop = edit.loop_config(cfg, Source())
    assert loop.fine.normal_warmup_steps == 0 and tuple(loop.fine.shading_probs) == (0.0, 1.0, 0.0, 0.0)


def test_a_run_saved_before_the_recipe_resumes_with_its_own_recipe(tmp_path):
    """A version-1 config.yaml lacks the recipe's new keys: they take version 1's behaviour
    (no warm-up, fixed ambient, white backdrops, the old regulariser forms), not today's."""
    import yaml

    from avatar.config import LEGACY_VALUES, load_config, save_config, to_dict

    cfg = make_config(GenerateConfig, "quality")
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(GenerateConfig, path) == cfg  # today's file: today's values
    data = {"config_version": 1, **to_dict(cfg)}
    for key in LEGACY_VALUES[1]:
        section, name = key.split(".")
        del data[section][name]
    data["fine"]["shading_probs"] = [0.5, 0.3, 0.2]  # version 1 stored three
    path.write_text(yaml.safe_dump(data))
    old = load_config(GenerateConfig, path)
    assert old.coarse.normal_warmup_steps == old.fine.normal_warmup_steps == 0
    assert tuple(old.fine.ambient_range) == (0.25, 0.25) and old.coarse.background == "white"
    assert old.coarse.random_background_prob == old.fine.random_background_prob == 0.0
    assert old.coarse.orientation_per_ray and old.fine.laplacian_squared
    assert tuple(old.fine.shading_probs) == (0.5, 0.3, 0.2)
    g = torch.Generator().manual_seed(0)
    looks = [sample_look(old.fine, i, _eyes(), g, torch.device("cpu")) for i in range(200)]
    assert {lk.shading for lk in looks} == {"albedo", "lambertian", "textureless"}
    assert {lk.ambient for lk in looks} == {0.25} and {lk.background for lk in looks} == {"white"}
