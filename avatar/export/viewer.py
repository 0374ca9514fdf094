"""Reading our GLB back, and ``preview.html``: an offline viewer for it.

:func:`read_glb` reads every triangle primitive of a GLB (the one mesh of ``--topology
surface``; the skin, eyes, teeth, tongue and accessory of ``--topology prior``), each with its
base-colour image and morph targets, and merges them into one mesh whose images are packed
into one texture (:func:`pack_images`, UVs remapped): what the turntable renders.

The viewer is one HTML file with the GLB embedded as base64 and a small WebGL
program in a classic ``<script>`` (ES modules do not load from ``file://``), so it
opens by double-click with no network and no server. It parses the GLB's JSON and
binary chunks itself (dense, sparse and zero accessors), draws every triangle primitive
with its base-colour texture and a headlight, orbits with the mouse (drag to turn, wheel
to zoom) and blends the morph targets on the CPU from one slider per target name, which
drives that target in every part (``preview.html#jawOpen=1`` opens with that weight).
It reads what avatar writes (float attributes, embedded PNGs, no node transforms: a
skinned mesh's node transform is ignored by the spec, and ours have none); it is a
preview, not a general glTF viewer. Its functions are ``globalThis.avatarPreview`` for tools
and tests.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class GLBPrimitive:
    """One triangle primitive of a GLB as stored.

    name: its mesh's name; positions (N, 3) metres; faces (F, 3) int64; uvs (N, 2) glTF
    convention; texture (H, W, 3) uint8: its base-colour image times the colour factor (a
    4 x 4 image of the factor where it has none); targets: name -> (N, 3) position deltas.
    """

    name: str
    positions: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class GLBMesh:
    """Every triangle primitive of a GLB merged into one mesh.

    positions (N, 3) metres, faces (F, 3), uvs (N, 2) into ``texture`` (H, W, 3) uint8 (the
    primitives' images packed into one, or the one image as it is); target_names: every
    morph target name, in the order met; targets: (T, N, 3) float32 position deltas (zero
    where a primitive lacks that target); parts: the primitives as stored; offsets: (P + 1,)
    each primitive's first row in ``positions``; extras: ``asset.extras``.
    """

    positions: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray
    target_names: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    targets: np.ndarray | None = None
    parts: list[GLBPrimitive] = field(default_factory=list)
    offsets: np.ndarray | None = None

    def morphed(self, weights: dict[str, float]) -> np.ndarray:
        """(N, 3) positions with the named targets applied at the given weights."""
        out = self.positions.copy()
        for name, weight in weights.items():
            out += float(weight) * self.targets[self.target_names.index(name)]
        return out


_DTYPES = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8, 5122: np.int16, 5120: np.int8}
_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _read_view(gltf: Any, blob: bytes, view_index: int, offset: int, dtype: np.dtype, rows: int,
               width: int) -> np.ndarray:
    view = gltf.bufferViews[view_index]
    start = (view.byteOffset or 0) + (offset or 0)
    item = dtype.itemsize * width
    stride = view.byteStride or item
    if stride == item:
        return np.frombuffer(blob, dtype=dtype, count=rows * width, offset=start).reshape(rows, width)
    raw = np.frombuffer(blob, dtype=np.uint8, count=(rows - 1) * stride + item, offset=start)
    return np.lib.stride_tricks.as_strided(raw, (rows, item), (stride, 1)).copy().view(dtype).reshape(rows, width)


def read_accessor(gltf: Any, blob: bytes, index: int) -> np.ndarray:
    """An accessor of a GLB as a NumPy array, (count,) or (count, width): dense (strided or
    not), sparse over its base, or zero where it has no ``bufferView`` (glTF 2.0, 3.6.2.3).
    A dense accessor is a read-only view of ``blob``."""
    acc = gltf.accessors[index]
    dtype, width = np.dtype(_DTYPES[acc.componentType]), _WIDTHS[acc.type]
    if acc.bufferView is None:
        data = np.zeros((acc.count, width), dtype=dtype)
    else:
        data = _read_view(gltf, blob, acc.bufferView, acc.byteOffset, dtype, acc.count, width)
    sparse = acc.sparse
    if sparse is not None and _get(sparse, "count"):
        indices, values, n = _get(sparse, "indices"), _get(sparse, "values"), int(_get(sparse, "count"))
        rows = _read_view(gltf, blob, _get(indices, "bufferView"), _get(indices, "byteOffset"),
                          np.dtype(_DTYPES[_get(indices, "componentType")]), n, 1)[:, 0]
        data = np.array(data)
        data[rows.astype(np.int64)] = _read_view(gltf, blob, _get(values, "bufferView"), _get(values, "byteOffset"),
                                                 dtype, n, width)
    return data if width > 1 else data.reshape(-1)


def pack_images(images: list[np.ndarray], pad: int = 4) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Images (H_i, W_i, 3) uint8 packed into one (shelves, tallest first), each bordered by
    ``pad`` pixels of its own edge so bilinear lookups at its border do not bleed into a
    neighbour. Returns the atlas and each image's box ``(x, y, w, h)`` in it (pixels, without
    the border)."""
    sizes = [(img.shape[1] + 2 * pad, img.shape[0] + 2 * pad) for img in images]
    width = max(max(w for w, _ in sizes), int(np.ceil(np.sqrt(sum(w * h for w, h in sizes)))))
    order = sorted(range(len(images)), key=lambda i: -sizes[i][1])
    boxes: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * len(images)
    x = y = shelf = 0
    for i in order:
        w, h = sizes[i]
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        boxes[i] = (x + pad, y + pad, w - 2 * pad, h - 2 * pad)
        x, shelf = x + w, max(shelf, h)
    atlas = np.zeros((y + shelf, width, 3), dtype=np.uint8)
    for i in order:
        bx, by, w, h = boxes[i]
        atlas[by - pad:by + h + pad, bx - pad:bx + w + pad] = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)),
                                                                     mode="edge")
    return atlas, boxes


def _base_colour(gltf: Any, blob: bytes, material_index: int | None, cache: dict[int, np.ndarray]) -> np.ndarray:
    """A primitive's base colour: its image times the factor, or a 4 x 4 image of the factor."""
    from PIL import Image

    material = gltf.materials[material_index] if material_index is not None else None
    pbr = material.pbrMetallicRoughness if material is not None else None
    factor = np.asarray((pbr.baseColorFactor if pbr is not None and pbr.baseColorFactor else None)
                        or [1.0, 1.0, 1.0, 1.0], dtype=np.float64)[:3]
    info = pbr.baseColorTexture if pbr is not None else None
    if info is None:
        return np.full((4, 4, 3), np.round(factor * 255.0), dtype=np.uint8)
    source = gltf.textures[info.index].source
    if source not in cache:
        view = gltf.bufferViews[gltf.images[source].bufferView]
        start = view.byteOffset or 0
        cache[source] = np.array(Image.open(io.BytesIO(blob[start:start + view.byteLength])).convert("RGB"))
    image = cache[source]
    if (factor == 1.0).all():
        return image
    return np.round(image * factor).clip(0, 255).astype(np.uint8)


def read_glb(source: str | Path | bytes) -> GLBMesh:
    """Every triangle primitive of a GLB (a path or the file's bytes) with its UVs, base colour
    and morph targets, merged into one mesh with one packed texture (see :class:`GLBMesh`).
    A GLB of one primitive (``--topology surface``) keeps its image and UVs as they are."""
    from pygltflib import GLTF2

    gltf = GLTF2.load_from_bytes(bytes(source)) if isinstance(source, (bytes, bytearray)) else \
        GLTF2().load_binary(str(source))
    blob = gltf.binary_blob()
    images: dict[int, np.ndarray] = {}
    parts: list[GLBPrimitive] = []
    names: list[str] = []
    for mesh in gltf.meshes:
        mesh_names = list((mesh.extras or {}).get("targetNames") or [])
        for prim in mesh.primitives:
            if prim.mode not in (None, 4):  # triangles only
                continue
            positions = read_accessor(gltf, blob, prim.attributes.POSITION).astype(np.float64)  # copies
            count = len(positions)
            uvs = (read_accessor(gltf, blob, prim.attributes.TEXCOORD_0).astype(np.float32)
                   if prim.attributes.TEXCOORD_0 is not None else np.zeros((count, 2), dtype=np.float32))
            faces = (read_accessor(gltf, blob, prim.indices).astype(np.int64).reshape(-1, 3)
                     if prim.indices is not None else np.arange(count, dtype=np.int64).reshape(-1, 3))
            targets = {}
            for k, target in enumerate(prim.targets or []):
                name = mesh_names[k] if k < len(mesh_names) else f"target_{k}"
                position = _get(target, "POSITION")
                if position is not None:
                    targets[name] = read_accessor(gltf, blob, position).astype(np.float32)
                if name not in names:
                    names.append(name)
            parts.append(GLBPrimitive(mesh.name or "", positions, faces, uvs,
                                      _base_colour(gltf, blob, prim.material, images), targets))
    if not parts:
        raise ValueError("read_glb: the file holds no triangle mesh")
    return _merge(parts, names, dict(gltf.asset.extras or {}))


def _merge(parts: list[GLBPrimitive], names: list[str], extras: dict[str, Any]) -> GLBMesh:
    offsets = np.cumsum([0, *(len(p.positions) for p in parts)])
    distinct: list[np.ndarray] = []
    slot = []
    for p in parts:  # primitives sharing an image share its place in the atlas
        same = next((i for i, img in enumerate(distinct) if img is p.texture), None)
        if same is None:
            distinct.append(p.texture)
            same = len(distinct) - 1
        slot.append(same)
    if len(distinct) == 1:
        texture, uvs = distinct[0], np.concatenate([p.uvs for p in parts])
    else:
        texture, boxes = pack_images(distinct)
        size = np.array([texture.shape[1], texture.shape[0]], dtype=np.float64)
        remapped = []
        for p, s in zip(parts, slot):
            x, y, w, h = boxes[s]
            remapped.append(((np.asarray(p.uvs, dtype=np.float64).clip(0.0, 1.0) * [w, h] + [x, y]) / size)
                            .astype(np.float32))
        uvs = np.concatenate(remapped)
    targets = np.zeros((len(names), offsets[-1], 3), dtype=np.float32)
    for p, start in zip(parts, offsets):
        for name, delta in p.targets.items():
            targets[names.index(name), start:start + len(p.positions)] = delta
    return GLBMesh(positions=np.concatenate([p.positions for p in parts]),
                   faces=np.concatenate([p.faces + start for p, start in zip(parts, offsets)]), uvs=uvs,
                   texture=texture, target_names=names, extras=extras, targets=targets, parts=parts, offsets=offsets)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__ - avatar preview</title>
<style>
  html, body { margin: 0; height: 100%; font: 13px system-ui, sans-serif; background: #20232a; color: #ddd; }
  #app { display: flex; height: 100%; }
  #view { flex: 1; min-width: 0; position: relative; }
  canvas { width: 100%; height: 100%; display: block; cursor: grab; }
  #panel { width: 300px; overflow-y: auto; padding: 10px; background: #16181d; box-sizing: border-box; }
  #panel h1 { font-size: 14px; margin: 0 0 4px; }
  #panel p { margin: 0 0 8px; color: #999; }
  .row { display: grid; grid-template-columns: 130px 1fr 34px; align-items: center; gap: 4px; margin: 1px 0; }
  .row label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .row input { width: 100%; }
  button { margin: 0 0 8px; }
  #status { position: absolute; left: 10px; bottom: 8px; color: #aaa; }
</style>
</head>
<body>
<div id="app">
  <div id="view"><canvas id="gl"></canvas><div id="status">loading...</div></div>
  <div id="panel">
    <h1>__TITLE__</h1>
    <p>Drag to orbit, wheel to zoom. Blendshapes:</p>
    <button id="reset" type="button">Reset expression</button>
    <div id="sliders"></div>
  </div>
</div>
<script id="glb-data" type="application/octet-stream">__GLB__</script>
<script>
"use strict";
(function () {
  var GL_TYPES = {5126: Float32Array, 5125: Uint32Array, 5123: Uint16Array, 5122: Int16Array, 5121: Uint8Array,
                  5120: Int8Array};
  var WIDTH = {SCALAR: 1, VEC2: 2, VEC3: 3, VEC4: 4, MAT4: 16};

  function base64ToBytes(text) {
    var bin = atob(text.replace(/\\s+/g, ""));
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // GLB: 12-byte header, then chunks (length, type, data); JSON first, BIN second.
  function parseGLB(bytes) {
    var dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (dv.getUint32(0, true) !== 0x46546c67) throw new Error("not a GLB file");
    var offset = 12, json = null, bin = null;
    while (offset < bytes.byteLength) {
      var len = dv.getUint32(offset, true), type = dv.getUint32(offset + 4, true);
      var chunk = bytes.subarray(offset + 8, offset + 8 + len);
      if (type === 0x4e4f534a) json = JSON.parse(new TextDecoder().decode(chunk));
      else if (type === 0x004e4942) bin = chunk;
      offset += 8 + len;
    }
    return {json: json, bin: bin};
  }

  // count * width elements of Type from a buffer view (copied, so typed arrays are aligned).
  function readView(glb, viewIndex, offset, Type, count, width) {
    var view = glb.json.bufferViews[viewIndex], item = width * Type.BYTES_PER_ELEMENT;
    var start = glb.bin.byteOffset + (view.byteOffset || 0) + (offset || 0), stride = view.byteStride || item;
    if (stride === item) return new Type(glb.bin.buffer.slice(start, start + count * item));
    var out = new Type(count * width);
    for (var r = 0; r < count; r++) {
      out.set(new Type(glb.bin.buffer.slice(start + r * stride, start + r * stride + item)), r * width);
    }
    return out;
  }

  // An accessor: dense, sparse over its base, or zeros where it has no bufferView (glTF 2.0, 3.6.2.3).
  function accessor(glb, index) {
    var acc = glb.json.accessors[index], width = WIDTH[acc.type], Type = GL_TYPES[acc.componentType];
    var out = acc.bufferView === undefined ? new Type(acc.count * width)
      : readView(glb, acc.bufferView, acc.byteOffset, Type, acc.count, width);
    var sp = acc.sparse;
    if (sp && sp.count) {
      var rows = readView(glb, sp.indices.bufferView, sp.indices.byteOffset, GL_TYPES[sp.indices.componentType],
                          sp.count, 1);
      var values = readView(glb, sp.values.bufferView, sp.values.byteOffset, Type, sp.count, width);
      for (var i = 0; i < sp.count; i++) {
        for (var c = 0; c < width; c++) out[rows[i] * width + c] = values[i * width + c];
      }
    }
    return out;
  }

  function vertexNormals(positions, indices) {  // area-weighted, for a primitive without NORMAL
    var n = new Float32Array(positions.length), p = positions;
    for (var f = 0; f < indices.length; f += 3) {
      var a = 3 * indices[f], b = 3 * indices[f + 1], c = 3 * indices[f + 2];
      var ux = p[b] - p[a], uy = p[b + 1] - p[a + 1], uz = p[b + 2] - p[a + 2];
      var vx = p[c] - p[a], vy = p[c + 1] - p[a + 1], vz = p[c + 2] - p[a + 2];
      var nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      [a, b, c].forEach(function (v) { n[v] += nx; n[v + 1] += ny; n[v + 2] += nz; });
    }
    return n;
  }

  // Every triangle primitive of every mesh, each with its base colour and its morph targets mapped
  // onto one list of target names (a name drives that target in every part).
  function loadScene(glb) {
    var names = [], primitives = [], json = glb.json;
    function nameIndex(name) {
      var k = names.indexOf(name);
      if (k < 0) { names.push(name); k = names.length - 1; }
      return k;
    }
    (json.meshes || []).forEach(function (mesh) {
      var meshNames = (mesh.extras && mesh.extras.targetNames) || [];
      mesh.primitives.forEach(function (prim) {
        if (prim.mode !== undefined && prim.mode !== 4) return;  // triangles only
        var a = prim.attributes, positions = accessor(glb, a.POSITION), count = positions.length / 3, i;
        var indices;
        if (prim.indices !== undefined) indices = accessor(glb, prim.indices);
        else { indices = new Uint32Array(count); for (i = 0; i < count; i++) indices[i] = i; }
        var p = {
          name: mesh.name || "", positions: positions, indices: indices,
          normals: a.NORMAL !== undefined ? accessor(glb, a.NORMAL) : vertexNormals(positions, indices),
          uvs: a.TEXCOORD_0 !== undefined ? accessor(glb, a.TEXCOORD_0) : new Float32Array(2 * count),
          targets: [], image: -1, factor: [1, 1, 1, 1], doubleSided: false
        };
        (prim.targets || []).forEach(function (t, k) {
          p.targets.push({index: nameIndex(k < meshNames.length ? meshNames[k] : "target_" + k),
                          position: t.POSITION !== undefined ? accessor(glb, t.POSITION) : null,
                          normal: t.NORMAL !== undefined ? accessor(glb, t.NORMAL) : null});
        });
        var mat = json.materials && prim.material !== undefined ? json.materials[prim.material] : null;
        var pbr = mat && mat.pbrMetallicRoughness;
        if (pbr && pbr.baseColorFactor) p.factor = pbr.baseColorFactor;
        if (pbr && pbr.baseColorTexture) p.image = json.textures[pbr.baseColorTexture.index].source;
        if (mat && mat.doubleSided) p.doubleSided = true;
        primitives.push(p);
      });
    });
    return {primitives: primitives, names: names};
  }

  // A primitive's positions and normals with the targets blended in: base + sum_k w_k * target_k.
  function morph(p, weights) {
    var positions = new Float32Array(p.positions), normals = new Float32Array(p.normals), i;
    p.targets.forEach(function (t) {
      var w = weights[t.index];
      if (!w) return;
      if (t.position) for (i = 0; i < positions.length; i++) positions[i] += w * t.position[i];
      if (t.normal) for (i = 0; i < normals.length; i++) normals[i] += w * t.normal[i];
    });
    return {positions: positions, normals: normals};
  }

  // "preview.html#jawOpen=1&eyeBlinkLeft=0.5" opens with those weights (clamped to [0, 1]).
  function hashWeights(names, hash) {
    var weights = new Float32Array(names.length);
    (hash || "").replace(/^#/, "").split("&").forEach(function (pair) {
      var kv = pair.split("="), k = names.indexOf(decodeURIComponent(kv[0]));
      if (k < 0 || kv.length < 2) return;
      weights[k] = Math.max(0, Math.min(1, parseFloat(kv[1]) || 0));
    });
    return weights;
  }

  globalThis.avatarPreview = {parseGLB: parseGLB, loadScene: loadScene, morph: morph, hashWeights: hashWeights};

  var VS = "attribute vec3 position; attribute vec3 normal; attribute vec2 uv;" +
    "uniform mat4 mvp; uniform mat4 model; varying vec3 vNormal; varying vec2 vUv;" +
    "void main() { vNormal = mat3(model) * normal; vUv = uv; gl_Position = mvp * vec4(position, 1.0); }";
  var FS = "precision mediump float; varying vec3 vNormal; varying vec2 vUv; uniform sampler2D tex;" +
    "uniform vec3 light; uniform vec4 factor; void main() { vec3 n = normalize(vNormal);" +
    "float d = 0.35 + 0.65 * max(dot(n, normalize(light)), 0.0);" +
    "gl_FragColor = vec4(texture2D(tex, vUv).rgb * factor.rgb * d, 1.0); }";

  function shader(gl, type, src) {
    var s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    return s;
  }

  function perspective(fovy, aspect, near, far) {
    var f = 1 / Math.tan(fovy / 2), nf = 1 / (near - far);
    return [f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0];
  }

  function multiply(a, b) {  // column-major 4x4: a * b
    var o = new Array(16);
    for (var c = 0; c < 4; c++) for (var r = 0; r < 4; r++) {
      var s = 0;
      for (var k = 0; k < 4; k++) s += a[k * 4 + r] * b[c * 4 + k];
      o[c * 4 + r] = s;
    }
    return o;
  }

  function rotation(yaw, pitch) {  // R = Rx(pitch) * Ry(yaw), column-major
    var cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    var ry = [cy, 0, -sy, 0, 0, 1, 0, 0, sy, 0, cy, 0, 0, 0, 0, 1];
    var rx = [1, 0, 0, 0, 0, cp, sp, 0, 0, -sp, cp, 0, 0, 0, 0, 1];
    return multiply(rx, ry);
  }

  function start() {
    var status = document.getElementById("status");
    var glb = parseGLB(base64ToBytes(document.getElementById("glb-data").textContent));
    var scene = loadScene(glb), prims = scene.primitives;
    var canvas = document.getElementById("gl");
    var gl = canvas.getContext("webgl", {antialias: true});
    if (!gl) { status.textContent = "WebGL is not available in this browser"; return; }
    if (prims.some(function (p) { return p.indices instanceof Uint32Array; }) &&
        !gl.getExtension("OES_element_index_uint")) {
      status.textContent = "this browser cannot draw meshes with 32-bit indices"; return;
    }
    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER, VS));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(prog);
    gl.useProgram(prog);
    var loc = {position: gl.getAttribLocation(prog, "position"), normal: gl.getAttribLocation(prog, "normal"),
               uv: gl.getAttribLocation(prog, "uv")};

    // Centre and size from the bounds of every part.
    var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity], vertices = 0, triangles = 0;
    prims.forEach(function (m) {
      var p = m.positions;
      for (var i = 0; i < p.length; i += 3) for (var c = 0; c < 3; c++) {
        lo[c] = Math.min(lo[c], p[i + c]); hi[c] = Math.max(hi[c], p[i + c]);
      }
      vertices += p.length / 3; triangles += m.indices.length / 3;
    });
    var centre = [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2];
    var radius = Math.max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]);

    function arrayBuffer(data) {
      var b = gl.createBuffer();
      gl.bindBuffer(gl.ARRAY_BUFFER, b);
      gl.bufferData(gl.ARRAY_BUFFER, data, gl.DYNAMIC_DRAW);
      return b;
    }
    function blankTexture() {
      var t = gl.createTexture();
      gl.bindTexture(gl.TEXTURE_2D, t);
      gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, 1, 1, 0, gl.RGB, gl.UNSIGNED_BYTE, new Uint8Array([255, 255, 255]));
      return t;
    }
    var textures = {}, pending = 0, draw = function () {};
    prims.forEach(function (m) {
      m.gl = {position: arrayBuffer(m.positions), normal: arrayBuffer(m.normals), uv: arrayBuffer(m.uvs),
              index: gl.createBuffer(),
              indexType: m.indices instanceof Uint32Array ? gl.UNSIGNED_INT
                : m.indices instanceof Uint16Array ? gl.UNSIGNED_SHORT : gl.UNSIGNED_BYTE};
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, m.gl.index);
      gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, m.indices, gl.STATIC_DRAW);
      if (m.image < 0 || textures[m.image]) return;
      var tex = textures[m.image] = blankTexture(), info = glb.json.images[m.image];
      var view = glb.json.bufferViews[info.bufferView], img = new Image();
      pending += 1;
      img.onload = function () {
        gl.bindTexture(gl.TEXTURE_2D, tex);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, img);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
        gl.generateMipmap(gl.TEXTURE_2D);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR_MIPMAP_LINEAR);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
        pending -= 1;
        if (!pending) showStatus();
        draw();
      };
      img.src = URL.createObjectURL(new Blob(
        [glb.bin.subarray(view.byteOffset || 0, (view.byteOffset || 0) + view.byteLength)], {type: info.mimeType}));
    });
    var white = blankTexture();
    function showStatus() {
      status.textContent = prims.length + (prims.length === 1 ? " part, " : " parts, ") + vertices + " vertices, " +
        triangles + " triangles, " + scene.names.length + " blendshapes";
    }

    // Morph targets blended on the CPU, the same weights for every part.
    var weights = hashWeights(scene.names, location.hash);
    function updateMorph() {
      prims.forEach(function (m) {
        var moved = morph(m, weights);
        gl.bindBuffer(gl.ARRAY_BUFFER, m.gl.position);
        gl.bufferSubData(gl.ARRAY_BUFFER, 0, moved.positions);
        gl.bindBuffer(gl.ARRAY_BUFFER, m.gl.normal);
        gl.bufferSubData(gl.ARRAY_BUFFER, 0, moved.normals);
      });
      draw();
    }
    var sliders = document.getElementById("sliders"), inputs = [];
    scene.names.forEach(function (name, k) {
      var row = document.createElement("div"), label = document.createElement("label");
      var input = document.createElement("input"), value = document.createElement("span");
      row.className = "row";
      label.textContent = name; label.title = name;
      input.type = "range"; input.min = 0; input.max = 1; input.step = 0.01; input.value = weights[k];
      input.setAttribute("data-target", name);
      value.textContent = weights[k].toFixed(2);
      input.addEventListener("input", function () {
        weights[k] = parseFloat(input.value); value.textContent = weights[k].toFixed(2); updateMorph();
      });
      row.appendChild(label); row.appendChild(input); row.appendChild(value);
      sliders.appendChild(row); inputs.push([input, value]);
    });
    document.getElementById("reset").addEventListener("click", function () {
      weights.fill(0);
      inputs.forEach(function (iv) { iv[0].value = 0; iv[1].textContent = "0.00"; });
      updateMorph();
    });

    var yaw = 0, pitch = 0.1, distance = 2.2 * radius, dragging = null;
    canvas.addEventListener("mousedown", function (e) { dragging = [e.clientX, e.clientY]; });
    window.addEventListener("mouseup", function () { dragging = null; });
    window.addEventListener("mousemove", function (e) {
      if (!dragging) return;
      yaw += (e.clientX - dragging[0]) * 0.01;
      pitch = Math.max(-1.5, Math.min(1.5, pitch + (e.clientY - dragging[1]) * 0.01));
      dragging = [e.clientX, e.clientY];
      draw();
    });
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      distance = Math.max(0.3 * radius, Math.min(10 * radius, distance * Math.exp(e.deltaY * 0.001)));
      draw();
    }, {passive: false});
    window.addEventListener("resize", function () { draw(); });

    var uMvp = gl.getUniformLocation(prog, "mvp"), uModel = gl.getUniformLocation(prog, "model");
    var uFactor = gl.getUniformLocation(prog, "factor");
    gl.uniform3f(gl.getUniformLocation(prog, "light"), 0.4, 0.6, 1.0);
    gl.enable(gl.DEPTH_TEST);
    function attribute(buffer, where, size) {
      gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
      gl.enableVertexAttribArray(where);
      gl.vertexAttribPointer(where, size, gl.FLOAT, false, 0, 0);
    }
    draw = function () {
      var w = canvas.clientWidth, h = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
        canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      }
      gl.viewport(0, 0, canvas.width, canvas.height);
      gl.clearColor(0.13, 0.14, 0.16, 1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      var rot = rotation(yaw, pitch);
      var centreT = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, -centre[0], -centre[1], -centre[2], 1];
      var view = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, -distance, 1];
      var model = multiply(rot, centreT);
      var mvp = multiply(perspective(0.6, w / Math.max(h, 1), distance / 100, distance * 10), multiply(view, model));
      gl.uniformMatrix4fv(uMvp, false, new Float32Array(mvp));
      gl.uniformMatrix4fv(uModel, false, new Float32Array(rot));
      prims.forEach(function (m) {
        attribute(m.gl.position, loc.position, 3);
        attribute(m.gl.normal, loc.normal, 3);
        attribute(m.gl.uv, loc.uv, 2);
        gl.activeTexture(gl.TEXTURE0);
        gl.bindTexture(gl.TEXTURE_2D, m.image >= 0 ? textures[m.image] : white);
        gl.uniform4f(uFactor, m.factor[0], m.factor[1], m.factor[2], m.factor[3]);
        if (m.doubleSided) gl.disable(gl.CULL_FACE); else gl.enable(gl.CULL_FACE);
        gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, m.gl.index);
        gl.drawElements(gl.TRIANGLES, m.indices.length, m.gl.indexType, 0);
      });
    };
    showStatus();
    updateMorph();
  }

  try { start(); } catch (err) { document.getElementById("status").textContent = "error: " + err.message; }
})();
</script>
</body>
</html>
"""


def viewer_html(glb: bytes, title: str = "avatar", target_names: list[str] | None = None) -> str:
    """``preview.html`` for a GLB (bytes): self-contained, works from ``file://``.

    target_names are listed in a comment too, so tools (and tests) can read them
    without running the script.
    """
    names = json.dumps(list(target_names or []))
    body = _TEMPLATE.replace("__GLB__", base64.b64encode(glb).decode("ascii"))
    body = body.replace("__TITLE__", html.escape(title))
    return body.replace("<head>\n", f"<head>\n<!-- avatar preview; blendshapes: {html.escape(names)} -->\n", 1)


def viewer_script(page: str) -> str:
    """The viewer's JavaScript, cut out of a ``preview.html`` (for syntax checks)."""
    start = page.index("<script>\n") + len("<script>\n")
    return page[start:page.index("</script>", start)]


__all__ = ["GLBMesh", "GLBPrimitive", "pack_images", "read_accessor", "read_glb", "viewer_html",
           "viewer_script"]
