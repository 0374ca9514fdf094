"""Reading our GLB back, and ``preview.html``: an offline viewer for it.

The viewer is one HTML file with the GLB embedded as base64 and a small WebGL
program in a classic ``<script>`` (ES modules do not load from ``file://``), so it
opens by double-click with no network and no server. It parses the GLB's JSON and
binary chunks itself, draws the mesh with its base-colour texture and a headlight,
orbits with the mouse (drag to turn, wheel to zoom) and blends the morph targets on
the CPU from one slider per target name (``preview.html#jawOpen=1`` opens with
that weight). It reads only what avatar writes (one
triangle primitive, float attributes, an embedded PNG); it is a preview, not a
general glTF viewer.
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
class GLBMesh:
    """The first primitive of a GLB: positions (N, 3) metres, faces (F, 3), uvs (N, 2),
    texture (H, W, 3) uint8, target names and ``asset.extras``."""

    positions: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray
    target_names: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def read_accessor(gltf: Any, blob: bytes, index: int) -> np.ndarray:
    """An accessor of a GLB as a NumPy array (tightly packed views only, as we write them)."""
    dtypes = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8, 5122: np.int16, 5120: np.int8}
    widths = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype = np.dtype(dtypes[acc.componentType])
    width = widths[acc.type]
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    data = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=start)
    return data.reshape(acc.count, width) if width > 1 else data


def read_glb(path: str | Path) -> GLBMesh:
    """Mesh, UVs and base-colour image of a GLB written by :func:`avatar.export.gltf.build_glb`."""
    from PIL import Image
    from pygltflib import GLTF2

    gltf = GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]
    positions = read_accessor(gltf, blob, prim.attributes.POSITION).astype(np.float64)  # copies
    uvs = read_accessor(gltf, blob, prim.attributes.TEXCOORD_0).astype(np.float32)
    faces = read_accessor(gltf, blob, prim.indices).astype(np.int64).reshape(-1, 3)
    texture = np.zeros((1, 1, 3), dtype=np.uint8)
    material = gltf.materials[prim.material] if prim.material is not None else None
    if material is not None and material.pbrMetallicRoughness and material.pbrMetallicRoughness.baseColorTexture:
        image = gltf.images[gltf.textures[material.pbrMetallicRoughness.baseColorTexture.index].source]
        view = gltf.bufferViews[image.bufferView]
        start = view.byteOffset or 0
        texture = np.array(Image.open(io.BytesIO(blob[start:start + view.byteLength])).convert("RGB"))
    names = list(((gltf.meshes[0].extras or {}).get("targetNames")) or [])
    return GLBMesh(positions, faces, uvs, texture, names, dict(gltf.asset.extras or {}))


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
  var GL_TYPES = {5126: Float32Array, 5125: Uint32Array, 5123: Uint16Array, 5121: Uint8Array};
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

  function accessor(glb, index) {
    var acc = glb.json.accessors[index], view = glb.json.bufferViews[acc.bufferView];
    var Type = GL_TYPES[acc.componentType], n = acc.count * WIDTH[acc.type];
    var start = glb.bin.byteOffset + (view.byteOffset || 0) + (acc.byteOffset || 0);
    return new Type(glb.bin.buffer.slice(start, start + n * Type.BYTES_PER_ELEMENT));
  }

  function loadMesh(glb) {
    var mesh = glb.json.meshes[0], prim = mesh.primitives[0], a = prim.attributes;
    var out = {
      positions: accessor(glb, a.POSITION), normals: accessor(glb, a.NORMAL), uvs: accessor(glb, a.TEXCOORD_0),
      indices: accessor(glb, prim.indices), targets: [], names: (mesh.extras && mesh.extras.targetNames) || [],
      image: null
    };
    (prim.targets || []).forEach(function (t) { out.targets.push(accessor(glb, t.POSITION)); });
    var mat = glb.json.materials && glb.json.materials[prim.material];
    var info = mat && mat.pbrMetallicRoughness && mat.pbrMetallicRoughness.baseColorTexture;
    if (info) {
      var img = glb.json.images[glb.json.textures[info.index].source], view = glb.json.bufferViews[img.bufferView];
      out.image = new Blob([glb.bin.subarray(view.byteOffset || 0, (view.byteOffset || 0) + view.byteLength)],
                           {type: img.mimeType});
    }
    return out;
  }

  var VS = "attribute vec3 position; attribute vec3 normal; attribute vec2 uv;" +
    "uniform mat4 mvp; uniform mat4 model; varying vec3 vNormal; varying vec2 vUv;" +
    "void main() { vNormal = mat3(model) * normal; vUv = uv; gl_Position = mvp * vec4(position, 1.0); }";
  var FS = "precision mediump float; varying vec3 vNormal; varying vec2 vUv; uniform sampler2D tex;" +
    "uniform vec3 light; void main() { vec3 n = normalize(vNormal);" +
    "float d = 0.35 + 0.65 * max(dot(n, normalize(light)), 0.0);" +
    "gl_FragColor = vec4(texture2D(tex, vUv).rgb * d, 1.0); }";

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
    var m = loadMesh(glb);
    var canvas = document.getElementById("gl");
    var gl = canvas.getContext("webgl", {antialias: true});
    if (!gl) { status.textContent = "WebGL is not available in this browser"; return; }
    if (m.indices instanceof Uint32Array && !gl.getExtension("OES_element_index_uint")) {
      status.textContent = "this browser cannot draw meshes with 32-bit indices"; return;
    }
    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER, VS));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(prog);
    gl.useProgram(prog);

    // Centre and size from the bounds.
    var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity], p = m.positions;
    for (var i = 0; i < p.length; i += 3) for (var c = 0; c < 3; c++) {
      lo[c] = Math.min(lo[c], p[i + c]); hi[c] = Math.max(hi[c], p[i + c]);
    }
    var centre = [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2];
    var radius = Math.max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]);

    function buffer(data, attr, size) {
      var b = gl.createBuffer();
      gl.bindBuffer(gl.ARRAY_BUFFER, b);
      gl.bufferData(gl.ARRAY_BUFFER, data, gl.DYNAMIC_DRAW);
      var loc = gl.getAttribLocation(prog, attr);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, gl.FLOAT, false, 0, 0);
      return b;
    }
    var posBuffer = buffer(m.positions, "position", 3);
    buffer(m.normals, "normal", 3);
    buffer(m.uvs, "uv", 2);
    var ib = gl.createBuffer();
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib);
    gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, m.indices, gl.STATIC_DRAW);
    var indexType = m.indices instanceof Uint32Array ? gl.UNSIGNED_INT : gl.UNSIGNED_SHORT;

    var tex = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, tex);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, 1, 1, 0, gl.RGB, gl.UNSIGNED_BYTE, new Uint8Array([200, 200, 200]));
    var draw;
    if (m.image) {
      var img = new Image();
      img.onload = function () {
        gl.bindTexture(gl.TEXTURE_2D, tex);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, img);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
        gl.generateMipmap(gl.TEXTURE_2D);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR_MIPMAP_LINEAR);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
        status.textContent = m.positions.length / 3 + " vertices, " + m.indices.length / 3 + " triangles, " +
          m.targets.length + " blendshapes";
        updateMorph();
      };
      img.src = URL.createObjectURL(m.image);
    }

    // Morph targets blended on the CPU: position = base + sum_k w_k * target_k.
    var weights = new Float32Array(m.targets.length), morphed = new Float32Array(m.positions.length);
    function updateMorph() {
      morphed.set(m.positions);
      for (var k = 0; k < m.targets.length; k++) {
        var w = weights[k], t = m.targets[k];
        if (w === 0) continue;
        for (var i = 0; i < t.length; i++) morphed[i] += w * t[i];
      }
      gl.bindBuffer(gl.ARRAY_BUFFER, posBuffer);
      gl.bufferSubData(gl.ARRAY_BUFFER, 0, morphed);
      draw();
    }
    var sliders = document.getElementById("sliders"), inputs = [];
    m.names.forEach(function (name, k) {
      var row = document.createElement("div"), label = document.createElement("label");
      var input = document.createElement("input"), value = document.createElement("span");
      row.className = "row";
      label.textContent = name; label.title = name;
      input.type = "range"; input.min = 0; input.max = 1; input.step = 0.01; input.value = 0;
      input.setAttribute("data-target", name);
      value.textContent = "0.00";
      input.addEventListener("input", function () {
        weights[k] = parseFloat(input.value); value.textContent = weights[k].toFixed(2); updateMorph();
      });
      row.appendChild(label); row.appendChild(input); row.appendChild(value);
      sliders.appendChild(row); inputs.push([input, value]);
    });
    // "preview.html#jawOpen=1&eyeBlinkLeft=0.5" opens with those weights.
    location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
      var kv = pair.split("="), k = m.names.indexOf(decodeURIComponent(kv[0]));
      if (k < 0 || kv.length < 2) return;
      weights[k] = Math.max(0, Math.min(1, parseFloat(kv[1]) || 0));
      inputs[k][0].value = weights[k]; inputs[k][1].textContent = weights[k].toFixed(2);
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
    gl.uniform3f(gl.getUniformLocation(prog, "light"), 0.4, 0.6, 1.0);
    gl.enable(gl.DEPTH_TEST);
    gl.enable(gl.CULL_FACE);
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
      gl.drawElements(gl.TRIANGLES, m.indices.length, indexType, 0);
    };
    if (!m.image) updateMorph();
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


__all__ = ["GLBMesh", "read_accessor", "read_glb", "viewer_html", "viewer_script"]
