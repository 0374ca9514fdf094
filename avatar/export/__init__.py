"""Export: a finished run -> engine-ready files.

``export_run`` writes ``RUN/export/avatar.glb``, by default the prior's own head fitted
to the run (``prior_export``: skin subdivided to the face budget, eyes, teeth, tongue, an
accessory for what the prior cannot follow, base colour + normal + ORM maps, the prior's
blendshapes and visemes, a neck/head/jaw/eye skeleton) or, with ``topology="surface"``,
the generated surface with transferred blendshapes; OBJ + MTL + PNG, PLY with vertex
colours and, on request, a turntable MP4, and lists them in ``export.json``;
``preview_run`` writes ``preview.mp4`` (a turntable) and an offline ``preview.html``
viewer next to the GLB. An export is whole or absent: it is written into a hidden
sibling folder renamed into place (``run.staged_output``).

Modules: ``prior_export`` (the prior-topology head), ``fit`` (fitting the prior's head to
a surface), ``subdivide`` (red-green refinement), ``bake`` (normal/ORM/base colour maps),
``glb_rig`` (the multi-part GLB writer), ``mesh`` (extraction at export resolution, cleanup, decimation, normals),
``texture`` (xatlas UVs, baking in UV space), ``rig`` (blendshape and skin-weight
transfer), ``gltf`` (the GLB writer), ``formats`` (OBJ, PLY), ``video``
(textured rendering, turntable), ``viewer`` (GLB reader merging every part, preview.html), ``run``
(the two entry points). Importing this package is cheap.
"""

from __future__ import annotations

from avatar._lazy import lazy_exports

_EXPORTS = {
    "ExportError": "run",
    "export_run": "run",
    "preview_run": "run",
    "validate_export_config": "run",
    "build_export_mesh": "run",
    "FORMATS": "run",
    "build_glb": "gltf",
    "read_glb": "viewer",
    "transfer_rig": "rig",
    "render_textured": "video",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
