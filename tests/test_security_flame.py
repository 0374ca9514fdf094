"""A FLAME folder cannot run code: every pickle gadget is refused, in one line, before it runs.

Each gadget below is a hand-assembled pickle that, unpickled by plain ``pickle``,
creates a marker file (a control run proves each one live). The FLAME loader must
refuse it, as the model file and as the dynamic embedding ``.npy``, with a one-line
error and no marker. The synthetic FLAME files of ``test_prior_flame`` still load.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_prior_flame import write_synthetic_flame

from avatar.prior import PriorError, load_head_model
from avatar.prior.flame import read_flame_npy, read_flame_pickle

# -- a tiny pickle assembler (protocol 3: bytes need it) ---------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` (REDUCE); ``func`` and ``args`` are assembled fragments."""
    return func + b"(" + b"".join(args) + b"tR"


def _stack_global(module: str, name: str) -> bytes:
    """Protocol 4's STACK_GLOBAL, which lets a name be dotted (``os.system``)."""
    return _str(module) + _str(name) + b"\x93"


def _raw(fragment: bytes, proto: int = 3) -> bytes:
    return bytes([0x80, proto]) + fragment + b"."


def _pickle(fragment: bytes, proto: int = 3) -> bytes:
    """A FLAME-looking pickle: ``{"v_template": <fragment>}``."""
    return _raw(b"}" + _str("v_template") + fragment + b"s", proto)


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _evil_npy(path: Path, payload: bytes) -> Path:
    """A .npy whose header says 0-d object array and whose data is ``payload`` (a pickle)."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(payload)
    return path


def _gadget(kind: str, marker: Path, scratch: Path) -> bytes:
    code, touch = _code(marker), _list(_str("touch"), _str(str(marker)))
    if kind == "numpy runstring":  # numpy.testing's runstring calls exec
        return _call(_global("numpy.testing._private.utils", "runstring"), _str(code), b"}")
    if kind == "builtins.eval":
        return _call(_global("builtins", "eval"), _str(code))
    if kind == "__builtin__.eval":  # Python 2's name, mapped to builtins by plain pickle
        return _call(_global("__builtin__", "eval"), _str(code))
    if kind == "builtins.exec":
        return _call(_global("builtins", "exec"), _str(code))
    if kind == "os.system":
        return _call(_global("os", "system"), _str(f"touch {marker}"))
    if kind == "posix.system":
        return _call(_global("posix", "system"), _str(f"touch {marker}"))
    if kind == "subprocess.Popen":
        return _call(_global("subprocess", "Popen"), touch)
    if kind == "subprocess.check_output":
        return _call(_global("subprocess", "check_output"), touch)
    if kind == "numpy.load with allow_pickle":  # loads a second file with numpy's own pickle
        npy = _evil_npy(scratch / "inner.npy", _raw(_call(_global("os", "system"), _str(f"touch {marker}"))))
        return _call(_global("numpy", "load"), _str(str(npy)), b"N", b"\x88")
    if kind == "functools.partial":  # partial(eval, code)()
        return _call(_call(_global("functools", "partial"), _global("builtins", "eval"), _str(code)))
    if kind == "operator.attrgetter":  # attrgetter("system")(os)(cmd), os reached through numpy
        system = _call(_call(_global("operator", "attrgetter"), _str("system")),
                       _global("numpy.testing._private.utils", "os"))
        return _call(system, _str(f"touch {marker}"))
    if kind == "numpy dotted os.system":  # a dotted name under an allowed package
        return _call(_stack_global("numpy.testing._private.utils", "os.system"), _str(f"touch {marker}"))
    if kind == "importlib.import_module":
        os_module = _call(_global("importlib", "import_module"), _str("os"))
        return _call(_call(_global("builtins", "getattr"), os_module, _str("system")), _str(f"touch {marker}"))
    if kind == "pickle.loads":
        inner = pickle.dumps(_Eval(code), protocol=3)
        return _call(_global("pickle", "loads"), _bytes(inner))
    raise AssertionError(kind)


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


GADGETS = [
    "numpy runstring", "builtins.eval", "__builtin__.eval", "builtins.exec", "os.system", "posix.system",
    "subprocess.Popen", "subprocess.check_output", "numpy.load with allow_pickle", "functools.partial",
    "operator.attrgetter", "numpy dotted os.system", "importlib.import_module", "pickle.loads",
]


def _gadget_pickle(kind: str, marker: Path, scratch: Path) -> bytes:
    # Protocol 2 as Python 2 wrote FLAME (its module names are mapped only below protocol 3);
    # bytes need protocol 3 and a dotted name protocol 4.
    proto = {"numpy dotted os.system": 4, "pickle.loads": 3}.get(kind, 2)
    return _pickle(_gadget(kind, marker, scratch), proto)


def _wait_for(marker: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        time.sleep(0.02)
    return marker.exists()


@pytest.mark.parametrize("kind", GADGETS)
def test_each_gadget_is_live_under_plain_pickle(kind, tmp_path):
    # The control: without the FLAME loader's allow-list each gadget does create its marker.
    marker = tmp_path / "ran"
    pickle.loads(_gadget_pickle(kind, marker, tmp_path), encoding="latin1")
    assert _wait_for(marker), kind


def _one_line_refusal(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message, message
    assert "refused to load" in message or "not a readable" in message, message
    return message


@pytest.mark.parametrize("kind", GADGETS)
def test_flame_model_file_gadget_is_refused_and_runs_nothing(kind, tmp_path, monkeypatch):
    folder = tmp_path / "flame"
    write_synthetic_flame(folder, monkeypatch)
    marker = tmp_path / "ran"
    (folder / "generic_model.pkl").write_bytes(_gadget_pickle(kind, marker, tmp_path))
    with pytest.raises(PriorError) as info:
        load_head_model(f"flame:{folder}")
    assert not _wait_for(marker, 0.3 if "Popen" in kind else 0.0), "the gadget ran"
    message = _one_line_refusal(info.value)
    assert "generic_model.pkl" in message


@pytest.mark.parametrize("kind", GADGETS)
def test_dynamic_embedding_gadget_under_flame_dir_is_refused(kind, tmp_path, monkeypatch):
    # $AVATAR_FLAME_DIR makes every 'auto' load read this folder: the embedding is data only.
    folder = tmp_path / "flame"
    write_synthetic_flame(folder, monkeypatch)
    marker = tmp_path / "ran"
    payload = _gadget_pickle(kind, marker, tmp_path)
    # The gadget as the pickled payload of a 0-d object array, as numpy writes one.
    _evil_npy(folder / "flame_dynamic_embedding.npy", payload)
    monkeypatch.setenv("AVATAR_FLAME_DIR", str(folder))
    with pytest.warns(UserWarning, match="AVATAR_FLAME_DIR is set but unusable") as caught:
        model = load_head_model("auto")
    assert not _wait_for(marker, 0.3 if "Popen" in kind else 0.0), "the gadget ran"
    assert model.name == "anny"
    refusal = [str(w.message) for w in caught if "AVATAR_FLAME_DIR" in str(w.message)][0]
    assert "flame_dynamic_embedding.npy" in refusal and "\n" not in refusal
    assert "refused to load" in refusal or "not a readable" in refusal
    with pytest.raises(PriorError) as info:
        read_flame_npy(folder / "flame_dynamic_embedding.npy")
    _one_line_refusal(info.value)
    assert not marker.exists()


# -- numpy and scipy calls that are on the list but would read or write memory ----------------
F, T, N = b"\x89", b"\x88", b"N"


def _int(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _dtype(spec: str, state: bytes | None = None) -> bytes:
    made = _call(_global("numpy", "dtype"), _str(spec), F, T)
    return made if state is None else made + state + b"b"


def _plain_state(order: str, flags: int) -> bytes:
    return _tuple(_int(3), _str(order), N, N, N, _int(-1), _int(-1), _int(flags))


def _array(state_dtype: bytes, shape: tuple[int, ...], data: bytes) -> bytes:
    empty = _call(_global("numpy._core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _tuple(_int(0)),
                  _bytes(b"b"))
    return empty + _tuple(_int(1), _tuple(*map(_int, shape)), state_dtype, F, data) + b"b"


def _memory_gadgets() -> dict[str, bytes]:
    object_dtype = _dtype("O8", _plain_state("|", 63))
    # A float dtype restated as a record whose object field and int field share 8 bytes:
    # the int written second becomes the object pointer.
    fields = b"}(" + _str("a") + _tuple(object_dtype, _int(0)) + _str("b") + \
        _tuple(_dtype("i8", _plain_state("<", 0)), _int(0)) + b"u"
    overlapping = _dtype("f8", _tuple(_int(3), _str("|"), N, _tuple(_str("a"), _str("b")), fields, _int(8), _int(1),
                                      _int(63)))
    return {
        # ndarray(shape, object dtype, buffer): pointers read from the file.
        "numpy.ndarray with an object buffer": _call(_global("numpy", "ndarray"), _tuple(_int(2)), object_dtype,
                                                     _bytes(b"\x41" * 16)),
        "dtype with overlapping object field": _array(overlapping, (1,), _list(_tuple(N, _int(0x4141414141)))),
        "float dtype flagged as objects": _array(_dtype("i8", _plain_state("<", 63)), (2,), _bytes(b"\x41" * 16)),
        "_reconstruct as numpy never writes it": _call(_global("numpy._core.multiarray", "_reconstruct"),
                                                     _global("numpy", "ndarray"), _tuple(_int(10**6)), _bytes(b"O")),
    }


MEMORY_CHECK = r"""
import sys
from pathlib import Path
from avatar.prior import PriorError
from avatar.prior.flame import load_flame, read_flame_pickle
for path in sys.argv[1:]:
    path = Path(path)
    try:
        obj = load_flame(path) if path.is_dir() else read_flame_pickle(path)
        print("loaded", path.name, len(repr(obj)), flush=True)  # repr reads every element
    except PriorError as exc:
        print("refused", path.name, "one line" if "\n" not in str(exc) else "many lines", flush=True)
"""


def test_numpy_and_scipy_state_cannot_forge_memory(tmp_path, monkeypatch):
    # Run in a child: on a loader that let these through, the child crashes, not the tests.
    import scipy.sparse

    paths = []
    for i, fragment in enumerate(_memory_gadgets().values()):
        paths.append(tmp_path / f"gadget-{i}.pkl")
        paths[-1].write_bytes(_pickle(fragment, proto=3))
    # A FLAME model whose sparse J_regressor points outside its matrix: scipy's compiled
    # toarray trusts the indices and would write out of bounds.
    folder = tmp_path / "flame"
    write_synthetic_flame(folder, monkeypatch)
    model = read_flame_pickle(folder / "generic_model.pkl")
    bad = scipy.sparse.csr_matrix(np.asarray(model["J_regressor"].toarray()))
    bad.indices = bad.indices + 10**9
    model["J_regressor"] = bad
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    paths.append(folder)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHECK, *map(str, paths)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    results = out.stdout.splitlines()
    expected = [f"refused {p.name} one line" for p in paths]
    assert results == expected, out.stdout


def test_object_arrays_in_the_mediapipe_npz_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "flame"
    write_synthetic_flame(folder, monkeypatch)
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    np.savez(buf, lmk_face_idx=np.array([_Eval(_code(marker))], dtype=object),
             lmk_b_coords=np.ones((1, 3)) / 3, landmark_indices=np.array([0]))
    (folder / "mediapipe_landmark_embedding.npz").write_bytes(buf.getvalue())
    with pytest.raises(PriorError, match="mediapipe_landmark_embedding.npz") as info:
        load_head_model(f"flame:{folder}")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_real_format_dynamic_embedding_still_reads(tmp_path, monkeypatch):
    # numpy's own writer (np.save of a 0-d object array of a dict), read without numpy's pickle.
    folder = tmp_path / "flame"
    arrays = write_synthetic_flame(folder, monkeypatch)
    dyn = read_flame_npy(folder / "flame_dynamic_embedding.npy")
    np.testing.assert_array_equal(dyn["lmk_face_idx"], arrays["dynamic"]["lmk_face_idx"])
    np.testing.assert_array_equal(dyn["lmk_b_coords"], arrays["dynamic"]["lmk_b_coords"])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(read_flame_npy(plain), np.arange(6).reshape(2, 3))
    model = read_flame_pickle(folder / "generic_model.pkl")
    assert model["J_regressor"].shape[0] == 5


@pytest.mark.parametrize("proto", [0, 1, 2, 4, 5])
def test_flame_pickle_of_every_protocol_loads(tmp_path, proto):
    # Python 2 wrote protocols 0-2; a re-saved file may use 4 or 5 (numpy's _frombuffer).
    import scipy.sparse

    data = {"a": np.arange(12.0).reshape(3, 4), "s": scipy.sparse.csr_matrix(np.eye(3)), "n": np.float32(2.5),
            "t": {1, 2}}
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(data, protocol=proto))
    back = read_flame_pickle(path)
    np.testing.assert_array_equal(back["a"], data["a"])
    np.testing.assert_array_equal(back["s"].toarray(), np.eye(3))
    assert back["n"] == np.float32(2.5) and back["t"] == {1, 2}


# -- Python 2's protocol 0, as FLAME's own files are written (chumpy, CSC, py2 str data) ----------


def _p0_str(text: str | bytes) -> bytes:
    data = text.encode("latin1") if isinstance(text, str) else text
    return b"S'" + "".join(f"\\x{b:02x}" for b in data).encode() + b"'\n"


def _p0_int(value: int) -> bytes:
    return b"I" + str(value).encode() + b"\n"


def _p0_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _p0_dict(items: dict[str, bytes]) -> bytes:
    return b"(d" + b"".join(_p0_str(k) + v + b"s" for k, v in items.items())


def _p0_array(a: np.ndarray) -> bytes:
    """An ndarray as Python 2's numpy pickled it: _reconstruct, a dtype state, str data."""
    a = np.ascontiguousarray(a)
    order = "|" if a.dtype.itemsize == 1 else "<"
    dtype = (b"cnumpy\ndtype\n" + _p0_tuple(_p0_str(a.dtype.str[1:]), _p0_int(0), _p0_int(1)) + b"R"
             + _p0_tuple(_p0_int(3), _p0_str(order), b"N", b"N", b"N", _p0_int(-1), _p0_int(-1), _p0_int(0)) + b"b")
    empty = (b"cnumpy.core.multiarray\n_reconstruct\n"
             + _p0_tuple(b"cnumpy\nndarray\n", _p0_tuple(_p0_int(0)), _p0_str("b")) + b"R")
    state = _p0_tuple(_p0_int(1), _p0_tuple(*map(_p0_int, a.shape)), dtype, b"I00\n", _p0_str(a.tobytes()))
    return empty + state + b"b"


def _p0_object(module: str, name: str, state: bytes) -> bytes:
    """A new-style object as protocol 0 writes it: copy_reg._reconstructor, then its __dict__."""
    cls = f"c{module}\n{name}\n".encode()
    return b"ccopy_reg\n_reconstructor\n" + _p0_tuple(cls, b"c__builtin__\nobject\n", b"N") + b"R" + state + b"b"


def test_python2_protocol0_flame_model_loads(tmp_path):
    import scipy.sparse

    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 3))
    faces = np.array([[0, 1, 2], [2, 3, 4]], dtype=np.uint32)
    dense = np.zeros((2, 5))
    dense[0, 1], dense[1, 4] = 0.5, 1.0
    csc = scipy.sparse.csc_matrix(dense)
    chumpy_state = _p0_dict({"x": _p0_array(v), "_dirty_vars": b"c__builtin__\nset\n((ltR", "_itr": b"N"})
    sparse_state = _p0_dict({"data": _p0_array(csc.data), "indices": _p0_array(csc.indices.astype(np.int32)),
                             "indptr": _p0_array(csc.indptr.astype(np.int32)), "_shape": _p0_tuple(_p0_int(2),
                             _p0_int(5)), "maxprint": _p0_int(50), "format": _p0_str("csc")})
    data = _p0_dict({
        "v_template": _p0_object("chumpy.ch", "Ch", chumpy_state),
        "f": _p0_array(faces),
        "J_regressor": _p0_object("scipy.sparse.csc", "csc_matrix", sparse_state),
        "bs_style": _p0_str("lbs"),
    }) + b"."
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data)
    model = read_flame_pickle(path)
    np.testing.assert_array_equal(model["v_template"], v)
    np.testing.assert_array_equal(model["f"], faces)
    assert model["f"].dtype == np.uint32 and model["bs_style"] == "lbs"
    np.testing.assert_array_equal(model["J_regressor"].toarray(), dense)
