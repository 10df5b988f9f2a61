"""Tests for reading official (chumpy/scipy-laden) SMPL pickles without chumpy.

The fixture writes a small fake SMPL model the way the official files were written:
Python 2 ``pickle.dump(dict, f, -1)`` (protocol 2, byte strings as py2 ``str``), with
``shapedirs`` as a ``chumpy.ch.Ch`` object, ``J`` as a ``chumpy.reordering.Reshape`` of
one, and ``J_regressor``/``J_regressor_prior`` as ``scipy.sparse.csc_matrix`` under the old
``scipy.sparse.csc`` module path.  chumpy itself is never imported: a fake ``chumpy``
package lives in ``sys.modules`` only while pickling, and its ``Ch`` pickles its state the
way chumpy's does (``__getstate__`` = instance ``__dict__`` minus ``_parents``/``_cache``).
"""
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import types
import weakref

import numpy as np
import pytest
import scipy.sparse

from smpl_pickle import UnsafePickleError, convert_smpl_pickle, load_smpl_pickle

V = 30
F = 40
K = 10
PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
ROOT = 4294967295  # the official kintree_table stores the root's parent as 2**32 - 1


# ----------------------------------------------------------------- fake chumpy package

class _FakeChBase:
    """Bookkeeping that chumpy.ch.Ch.__new__ and Ch.__setattr__ put in every instance."""

    def _init_bookkeeping(self):
        self._dirty_vars = set()
        self._itr = None
        self._parents = weakref.WeakKeyDictionary()
        self._cache = {"r": None, "drs": weakref.WeakKeyDictionary()}
        self._make_dense = False
        self._make_sparse = False
        self._depends_on_deps = {}

    def __getstate__(self):
        # chumpy: copy of __dict__ without the unpicklable weak dictionaries
        state = dict(self.__dict__)
        del state["_parents"]
        del state["_cache"]
        return state


class _FakeCh(_FakeChBase):
    def __init__(self, x):
        self._init_bookkeeping()
        self.x = np.asarray(x, dtype=np.float64)
        self._dirty_vars.add("x")


class _FakeReshape(_FakeChBase):
    def __init__(self, a, newshape):
        self._init_bookkeeping()
        self.a = a
        self.newshape = newshape
        self._dirty_vars.update({"a", "newshape"})


class _FakeSelect(_FakeChBase):
    """What chumpy's Ch.__getitem__ returns: a flat index selection of term ``a``."""

    def __init__(self, a, idxs, preferred_shape):
        self._init_bookkeeping()
        self.a = a
        self.idxs = idxs
        self.preferred_shape = preferred_shape
        self._dirty_vars.update({"a", "idxs", "preferred_shape"})


def _install_fake_chumpy():
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")
    reordering = types.ModuleType("chumpy.reordering")
    for cls, mod, name in ((_FakeCh, ch, "Ch"), (_FakeReshape, reordering, "Reshape"),
                           (_FakeSelect, reordering, "Select")):
        cls.__module__, cls.__name__, cls.__qualname__ = mod.__name__, name, name
        setattr(mod, name, cls)
    chumpy.ch, chumpy.reordering, chumpy.Ch = ch, reordering, _FakeCh
    sys.modules.update({"chumpy": chumpy, "chumpy.ch": ch, "chumpy.reordering": reordering})


def _remove_fake_chumpy():
    for name in ("chumpy", "chumpy.ch", "chumpy.reordering"):
        sys.modules.pop(name, None)


# ----------------------------------------------------------------- Python-2 style pickler

class _Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler writing bytes and ASCII text as Python 2 ``str`` (BINSTRING)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, data: bytes, obj):
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)
        self.memoize(obj)

    def save_bytes(self, obj):
        self._save_py2_str(obj, obj)

    def save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj.encode("ascii"), obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _dumps(obj, style):
    _install_fake_chumpy()
    try:
        if style == "py2":
            buf = io.BytesIO()
            _Py2StylePickler(buf, protocol=2).dump(obj)
            data = buf.getvalue()
            # module paths as numpy 1.x / scipy < 1.8 wrote them
            data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            data = data.replace(b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")
            return data
        return pickle.dumps(obj, protocol=2)  # what Python 3 writes (bytes via _codecs)
    finally:
        _remove_fake_chumpy()


# ----------------------------------------------------------------- fake SMPL model

def _fake_model():
    rng = np.random.default_rng(0)
    weights = rng.random((V, 24))
    weights /= weights.sum(1, keepdims=True)
    jreg = np.zeros((24, V))
    for j in range(24):
        cols = rng.choice(V, size=4, replace=False)
        w = rng.random(4)
        jreg[j, cols] = w / w.sum()
    kintree = np.array([[ROOT] + PARENTS[1:], list(range(24))], dtype=np.int64)
    v_template = rng.normal(size=(V, 3))
    return {
        "v_template": v_template,
        "shapedirs": rng.normal(scale=0.01, size=(V, 3, K)),
        "posedirs": rng.normal(scale=0.001, size=(V, 3, 207)),
        "J_regressor": jreg,
        "J_regressor_prior": jreg.copy(),
        "weights": weights,
        "weights_prior": weights.copy(),
        "kintree_table": kintree,
        "f": rng.integers(0, V, size=(F, 3)).astype(np.uint32),
        "J": jreg @ v_template,
        "vert_sym_idxs": np.arange(V)[::-1].copy(),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def _official_style_dict(model):
    """The dict as the official file holds it: chumpy and scipy.sparse objects inside."""
    out = dict(model)
    out["shapedirs"] = _FakeCh(model["shapedirs"])
    out["J"] = _FakeReshape(_FakeCh(model["J"].ravel()), (24, 3))
    out["J_regressor"] = scipy.sparse.csc_matrix(model["J_regressor"])
    out["J_regressor_prior"] = scipy.sparse.csc_matrix(model["J_regressor_prior"])
    return out


@pytest.fixture(scope="module")
def model():
    return _fake_model()


@pytest.fixture(scope="module", params=["py2", "py3"])
def official_pkl(request, model, tmp_path_factory):
    path = tmp_path_factory.mktemp("smpl") / ("basicModel_neutral_%s.pkl" % request.param)
    path.write_bytes(_dumps(_official_style_dict(model), request.param))
    return path


def _write(path, obj):
    path.write_bytes(_dumps(obj, "py2"))
    return path


def _globals_in(data: bytes):
    """Every (module, name) a pickle imports, from GLOBAL and STACK_GLOBAL opcodes."""
    found, memo, history = [], {}, []
    last = None
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.append((history[-2], history[-1]))
        if op.name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                       "SHORT_BINSTRING", "BINSTRING", "STRING"):
            last = arg
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(arg)
        else:
            last = None
        history.append(last)
    return found


# ----------------------------------------------------------------- tests

def test_fixture_looks_like_the_official_file(official_pkl):
    data = official_pkl.read_bytes()
    assert data[:2] == b"\x80\x02"
    names = {"%s.%s" % g for g in _globals_in(data)}
    assert "chumpy.ch.Ch" in names and "chumpy.reordering.Reshape" in names
    assert any(n.startswith("scipy.sparse.") and n.endswith("csc_matrix") for n in names)
    assert "chumpy" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="chumpy"):
        with open(official_pkl, "rb") as fh:
            pickle.load(fh, encoding="latin1")


def test_load_gives_plain_numpy_equal_to_original(official_pkl, model):
    loaded = load_smpl_pickle(official_pkl)
    assert set(loaded) == set(model)
    for key, value in model.items():
        if isinstance(value, str):
            assert loaded[key] == value
        else:
            assert isinstance(loaded[key], np.ndarray), key
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert loaded["kintree_table"][0, 0] == ROOT
    assert "chumpy" not in sys.modules


def test_loader_needs_neither_chumpy_nor_scipy(official_pkl, model):
    code = (
        "import sys; sys.modules['chumpy'] = None; sys.modules['scipy'] = None\n"
        "from smpl_pickle import load_smpl_pickle\n"
        "m = load_smpl_pickle(sys.argv[1])\n"
        "print(m['J_regressor'].shape, type(m['shapedirs']).__name__)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code, str(official_pkl)], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["(24,", "%d)" % V, "ndarray"]


def test_convert_writes_plain_pickle(official_pkl, model, tmp_path):
    dst = tmp_path / "out" / "SMPL_NEUTRAL.pkl"
    summary = convert_smpl_pickle(official_pkl, dst)
    assert summary["num_vertices"] == V
    assert summary["num_faces"] == F
    assert summary["num_betas"] == K
    assert summary["dropped_keys"] == []
    data = dst.read_bytes()
    for module, name in _globals_in(data):
        assert module in ("builtins", "numpy") or module.startswith("numpy."), (module, name)
    assert [p.name for p in dst.parent.iterdir()] == ["SMPL_NEUTRAL.pkl"]  # no temp left
    with open(dst, "rb") as fh:
        plain = pickle.load(fh, encoding="latin1")
    assert set(plain) == set(model)
    for key, value in model.items():
        if isinstance(value, str):
            assert plain[key] == value
            continue
        assert type(plain[key]) is np.ndarray
        np.testing.assert_array_equal(plain[key], value, err_msg=key)
    assert plain["f"].dtype == np.int64 and plain["kintree_table"].dtype == np.int64
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "J"):
        assert plain[key].dtype == np.float64, key
    # the converted file reads back through the loader too
    again = load_smpl_pickle(dst)
    np.testing.assert_array_equal(again["shapedirs"], model["shapedirs"])


def test_smplx_loads_converted_file(official_pkl, model, tmp_path):
    import torch
    import smplx
    from smplx.vertex_ids import vertex_ids as VERTEX_IDS

    dst = tmp_path / "SMPL_NEUTRAL.pkl"
    convert_smpl_pickle(official_pkl, dst)
    # SMPL's VertexJointSelector wants the SMPL-H keyed landmark vertices; any valid index
    vids = {name: i % V for i, name in enumerate(VERTEX_IDS["smplh"])}
    body = smplx.SMPL(model_path=str(dst), vertex_ids=vids, dtype=torch.float64)
    with torch.no_grad():
        out = body()
        assert out.vertices.shape == (1, V, 3)
        assert out.joints.shape == (1, 24 + len(vids), 3)
        assert torch.isfinite(out.joints).all()
        # zero pose and betas: the template mesh and its regressed joints (smplx's to_np
        # rounds every array through float32, hence the tolerance)
        np.testing.assert_allclose(out.vertices[0].numpy(), model["v_template"], atol=1e-6)
        np.testing.assert_allclose(out.joints[0, :24].numpy(),
                                   model["J_regressor"] @ model["v_template"], atol=1e-6)
        posed = body(betas=torch.ones(1, K, dtype=torch.float64),
                     body_pose=torch.full((1, 69), 0.2, dtype=torch.float64))
        assert torch.isfinite(posed.joints).all()
    assert body.parents.tolist() == PARENTS


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "SMPL_NEUTRAL.pkl"
    with pytest.raises(FileNotFoundError) as err:
        load_smpl_pickle(missing)
    msg = str(err.value)
    assert str(missing) in msg
    assert "https://smpl.is.tue.mpg.de" in msg and "SMPL for Python" in msg and "SMPLify" in msg


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "not_a_dict"])
def test_not_a_pickle(kind, official_pkl, tmp_path):
    bad = tmp_path / ("%s.pkl" % kind)
    if kind == "garbage":
        bad.write_bytes(b"this is not a pickle \x00\xff" * 10)
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(official_pkl.read_bytes()[:5000])
    else:
        bad.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        load_smpl_pickle(bad)
    dst = tmp_path / "dst.pkl"
    with pytest.raises(ValueError):
        convert_smpl_pickle(bad, dst)
    assert not dst.exists()


def test_missing_keys(model, tmp_path):
    obj = _official_style_dict(model)
    del obj["posedirs"], obj["f"]
    path = _write(tmp_path / "m.pkl", obj)
    with pytest.raises(ValueError, match=r"missing required key\(s\) posedirs, f") as err:
        load_smpl_pickle(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key, shape, expected", [
    ("v_template", (V, 2), "(V, 3)"),
    ("weights", (V, 23), "(%d, 24)" % V),
    ("J_regressor", (24, V + 1), "(24, %d)" % V),
    ("f", (F, 4), "(F, 3)"),
    ("shapedirs", (V, 3), "(%d, 3, K)" % V),
    ("posedirs", (V, 3, 206), "(%d, 3, 207)" % V),
])
def test_wrong_shape(key, shape, expected, model, tmp_path):
    obj = _official_style_dict(model)
    bad = np.zeros(shape, dtype=np.uint32 if key == "f" else np.float64)
    obj[key] = _FakeCh(bad) if key == "shapedirs" else bad
    path = _write(tmp_path / "m.pkl", obj)
    with pytest.raises(ValueError) as err:
        load_smpl_pickle(path)
    msg = str(err.value)
    assert str(path) in msg and repr(key) in msg
    assert "shape %s" % (shape,) in msg and expected in msg


def test_face_index_out_of_range(model, tmp_path):
    obj = _official_style_dict(model)
    obj["f"] = model["f"].copy()
    obj["f"][0, 0] = V
    with pytest.raises(ValueError, match="'f' has vertex indices"):
        load_smpl_pickle(_write(tmp_path / "m.pkl", obj))


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_unknown_class_is_refused(model, tmp_path):
    marker = tmp_path / "pwned"
    obj = _official_style_dict(model)
    obj["bs_style"] = _Evil("touch %s" % marker)
    path = _write(tmp_path / "evil.pkl", obj)
    with pytest.raises(UnsafePickleError) as err:
        load_smpl_pickle(path)
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and os.system.__module__ in msg
    assert not marker.exists()
    assert isinstance(err.value, ValueError)

    # hand-written GLOBAL 'os system', as an attacker would write it
    crafted = tmp_path / "crafted.pkl"
    crafted.write_bytes(b"\x80\x02}q\x00U\x01aq\x01cos\nsystem\nq\x02U\x05touch\x85R\x73.")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        load_smpl_pickle(crafted)
    dst = tmp_path / "dst.pkl"
    with pytest.raises(UnsafePickleError):
        convert_smpl_pickle(crafted, dst)
    assert not dst.exists()


@pytest.mark.parametrize("protocol", [0, 4])
def test_other_sparse_formats_protocols_and_select(protocol, model, tmp_path):
    obj = _official_style_dict(model)
    obj["J_regressor"] = scipy.sparse.coo_matrix(model["J_regressor"])
    obj["J_regressor_prior"] = scipy.sparse.csr_matrix(model["J_regressor_prior"])
    obj["weights_prior"] = scipy.sparse.csc_array(model["weights_prior"])
    # v_template[::-1] through a chumpy Select, as Ch.__getitem__ would build it
    flat = model["v_template"][::-1].ravel()
    idxs = np.arange(V * 3).reshape(V, 3)[::-1].ravel()
    obj["v_template"] = _FakeSelect(_FakeCh(flat), idxs, (V, 3))
    _install_fake_chumpy()
    try:
        data = pickle.dumps(obj, protocol=protocol)
    finally:
        _remove_fake_chumpy()
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    loaded = load_smpl_pickle(path)
    for key in ("J_regressor", "J_regressor_prior", "weights_prior", "v_template"):
        np.testing.assert_array_equal(loaded[key], model[key], err_msg=key)


def test_failed_conversion_keeps_existing_destination(tmp_path):
    dst = tmp_path / "SMPL_NEUTRAL.pkl"
    dst.write_bytes(b"previous good file")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError):
        convert_smpl_pickle(bad, dst)
    assert dst.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SMPL_NEUTRAL.pkl", "bad.pkl"]
