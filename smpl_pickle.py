"""Read the official SMPL model pickles without chumpy (and without scipy).

Why this exists
---------------
The SMPL model files handed out by the Max Planck Institute ("SMPL for Python" from
https://smpl.is.tue.mpg.de, e.g. ``basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl``, and the
neutral model ``basicModel_neutral_lbs_10_207_0_v1.0.0.pkl`` that ships with SMPLify) were
written by Python 2 with ``pickle.dump(model_dict, f, -1)`` (protocol 2).  Some values in
that dict are not numpy arrays:

* ``shapedirs`` is a ``chumpy.ch.Ch`` object (chumpy is the autodiff library SMPL was
  built with).  Other keys may be chumpy objects too in some releases.
* ``J_regressor`` (and ``J_regressor_prior``) are ``scipy.sparse.csc_matrix`` objects,
  pickled under the old module path ``scipy.sparse.csc``.

Unpickling a chumpy object imports chumpy, and chumpy does not import on numpy >= 1.24
(it uses ``np.bool``/``np.int`` and friends, which numpy removed), so plain
``pickle.load`` fails, and chumpy cannot be installed beside this project's numpy.

What the stand-ins do
---------------------
``load_smpl_pickle`` uses a ``pickle.Unpickler`` subclass whose ``find_class`` never
imports the module a pickle names:

* any ``chumpy.*`` class becomes a small stand-in class.  chumpy's ``Ch`` has no
  ``__reduce__``; ``Ch.__getstate__`` returns a copy of the instance ``__dict__`` minus the
  unpicklable ``_parents`` and ``_cache`` entries, so with protocol 2 an object is written
  as ``chumpy.ch.Ch`` + NEWOBJ (no arguments) + BUILD(state dict).  The state dict holds
  bookkeeping (``_dirty_vars`` (a set), ``_itr``, ``_make_dense``, ``_make_sparse``,
  ``_depends_on_deps``) and, for a plain ``Ch``, the value itself under ``'x'``.  The
  stand-in just keeps that state dict; afterwards the value is taken from ``'x'`` (the
  derived objects ``chumpy.reordering.Reshape``/``transpose``/``Select`` are evaluated from
  their ``'a'`` term; anything else is refused with a clear error).
* any ``scipy.sparse.*`` csc/csr/coo matrix (old paths such as ``scipy.sparse.csc`` and new
  ones such as ``scipy.sparse._csc``) becomes a stand-in that keeps its state dict
  (``data``, ``indices``, ``indptr``, ``_shape`` (``shape`` in very old scipy)); it is turned
  into a dense float64 array with numpy alone.
* everything else must be on a short allow-list (numpy's array/dtype/scalar
  reconstructors and a few harmless builtins).  Any other global - ``os.system``, say -
  is refused before it is ever imported, with an error naming the file and the class.
  A pickle can run code when it is loaded, so this also makes loading a stray or
  tampered file safe.

``convert_smpl_pickle`` writes the result as a plain pickle (numpy arrays, strings, only
numpy and builtins globals) that loads with ``pickle.load(f, encoding='latin1')`` and with
``smplx.SMPL(model_path=...)`` unchanged.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Dict

import numpy as np

__all__ = ["load_smpl_pickle", "convert_smpl_pickle", "UnsafePickleError"]

NUM_JOINTS = 24
NUM_POSE_BASIS = (NUM_JOINTS - 1) * 9  # 207

REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights",
                 "kintree_table", "f")

# Keys convert_smpl_pickle keeps besides REQUIRED_KEYS (when present).
_EXTRA_FLOAT_KEYS = ("J", "J_regressor_prior", "weights_prior")
_EXTRA_INT_KEYS = ("vert_sym_idxs",)
_EXTRA_STR_KEYS = ("bs_style", "bs_type")

_DOWNLOAD_HINT = (
    "The official SMPL model comes from https://smpl.is.tue.mpg.de (register, then download "
    "'SMPL for Python'; its models/ folder holds basicmodel_{m,f,neutral}_lbs_10_207_0_v1.1.0.pkl). "
    "The gender-neutral model basicModel_neutral_lbs_10_207_0_v1.0.0.pkl (often renamed "
    "SMPL_NEUTRAL.pkl) ships with SMPLify (https://smplify.is.tue.mpg.de)."
)

_MAX_CHUMPY_DEPTH = 32


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a class or function that is not on the allow-list."""


# --------------------------------------------------------------------------- stand-ins

class _PickledStandIn:
    """Base for stand-ins: accepts any constructor arguments and keeps the pickled state."""

    pickled_path = "?"  # "module.name" of the class this stands in for

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._pickled_args = args
        obj._pickled_state = None
        return obj

    def __init__(self, *args, **kwargs):  # called only by REDUCE-style pickles
        pass

    def __setstate__(self, state):
        self._pickled_state = state

    def __repr__(self):
        return "<stand-in for %s>" % self.pickled_path


class _ChumpyStandIn(_PickledStandIn):
    """Stands in for a chumpy class (chumpy.ch.Ch, chumpy.reordering.Select, ...)."""


class _SparseStandIn(_PickledStandIn):
    """Stands in for a scipy.sparse matrix class."""


_STAND_IN_CACHE: Dict[tuple, type] = {}


def _stand_in_class(base: type, module: str, name: str) -> type:
    key = (base, module, name)
    cls = _STAND_IN_CACHE.get(key)
    if cls is None:
        cls = type(name, (base,), {"pickled_path": "%s.%s" % (module, name),
                                   "pickled_name": name})
        _STAND_IN_CACHE[key] = cls
    return cls


_SPARSE_FORMATS = ("csc", "csr", "coo")


def _sparse_format(name: str):
    for fmt in _SPARSE_FORMATS:
        if name in ("%s_matrix" % fmt, "%s_array" % fmt):
            return fmt
    return None


# ------------------------------------------------------------------------- allow-list

def _numpy_attr(modules, name):
    import importlib
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor, limited to the stand-in classes (protocol 0/1 pickles)."""
    if isinstance(cls, type) and issubclass(cls, _PickledStandIn) and base is object:
        return cls.__new__(cls)
    raise UnsafePickleError("copyreg._reconstructor refused for %r" % (cls,))


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """_codecs.encode as Python 3 writes bytes into protocol 2 pickles; latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode refused for encoding %r" % (encoding,))
    return text.encode("latin-1", errors)


_ALLOWED_CACHE: Dict[tuple, Any] = {}


def _allowed_globals() -> Dict[tuple, Any]:
    if _ALLOWED_CACHE:
        return _ALLOWED_CACHE
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    table: Dict[tuple, Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytes"): bytes,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("_codecs", "encode"): _latin1_encode,
    }
    for name in ("_reconstruct", "scalar"):
        fn = _numpy_attr(multiarray, name)
        if fn is not None:
            for mod in multiarray:
                table[(mod, name)] = fn
    fn = _numpy_attr(numeric, "_frombuffer")
    if fn is not None:
        for mod in numeric:
            table[(mod, "_frombuffer")] = fn
    _ALLOWED_CACHE.update(table)
    return _ALLOWED_CACHE


# Python 2 module names, as the pickle module's fix_imports would map them.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _SMPLUnpickler(pickle.Unpickler):
    """Unpickler that never imports what the pickle names; see the module docstring."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        if module == "chumpy" or module.startswith("chumpy."):
            return _stand_in_class(_ChumpyStandIn, module, name)
        if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and _sparse_format(name):
            return _stand_in_class(_SparseStandIn, module, name)
        target = _allowed_globals().get((module, name))
        if target is None:
            raise UnsafePickleError(
                "%s: refusing to load %s.%s from this pickle: only numpy arrays, chumpy "
                "objects and scipy.sparse csc/csr/coo matrices are expected in an SMPL model "
                "file" % (self._path, module, name))
        return target


# ------------------------------------------------------------------------- conversion

def _chumpy_value(obj: _ChumpyStandIn, key: str, path: str, depth: int = 0) -> np.ndarray:
    """The value (chumpy's ``.r``: float64, at least 1-d) of a pickled chumpy object."""
    if depth > _MAX_CHUMPY_DEPTH:
        raise ValueError("%s: key %r: chumpy object nesting is too deep" % (path, key))
    state = obj._pickled_state
    name = type(obj).pickled_name
    if not isinstance(state, dict):
        raise ValueError("%s: key %r holds a %s object without the expected state dict"
                         % (path, key, obj.pickled_path))

    def term(term_name):
        if term_name not in state:
            raise ValueError("%s: key %r: %s object has no %r term"
                             % (path, key, obj.pickled_path, term_name))
        value = state[term_name]
        if isinstance(value, _ChumpyStandIn):
            return _chumpy_value(value, key, path, depth + 1)
        return np.asarray(_to_plain(value, key, path), dtype=np.float64)

    if name == "Reshape":
        value = term("a").reshape(state["newshape"])
    elif name == "transpose":
        value = np.transpose(term("a"), axes=state.get("axes"))
    elif name == "Select":
        value = term("a").ravel()[np.asarray(state["idxs"], dtype=np.int64)]
        if state.get("preferred_shape") is not None:
            value = value.reshape(state["preferred_shape"])
    elif "x" in state and "a" not in state:  # chumpy.ch.Ch (or a leaf subclass of it)
        value = term("x")
    else:
        raise ValueError(
            "%s: key %r holds a %s object; without chumpy only chumpy.ch.Ch values and "
            "Reshape/transpose/Select of them can be read" % (path, key, obj.pickled_path))
    return np.atleast_1d(np.ascontiguousarray(value, dtype=np.float64))


def _sparse_to_dense(obj: _SparseStandIn, key: str, path: str) -> np.ndarray:
    state = obj._pickled_state
    fmt = _sparse_format(type(obj).pickled_name)
    what = "%s: key %r (%s)" % (path, key, obj.pickled_path)
    if not isinstance(state, dict):
        raise ValueError("%s has no state dict" % what)
    shape = state.get("_shape", state.get("shape"))
    try:
        nrows, ncols = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError("%s: sparse matrix without a 2-d shape (found %r)" % (what, shape))
    try:
        data = np.asarray(state["data"])
        if fmt in ("csc", "csr"):
            indices = np.asarray(state["indices"], dtype=np.int64)
            indptr = np.asarray(state["indptr"], dtype=np.int64)
            nmajor = ncols if fmt == "csc" else nrows
            if indptr.shape != (nmajor + 1,) or indptr[-1] != indices.size:
                raise ValueError("indptr does not match the shape and indices")
            major = np.repeat(np.arange(nmajor, dtype=np.int64), np.diff(indptr))
            rows, cols = (indices, major) if fmt == "csc" else (major, indices)
        else:  # coo: scipy >= 1.13 keeps 'coords', older versions 'row' and 'col'
            coords = state.get("coords")
            if coords is None:
                coords = (state["row"], state["col"])
            rows, cols = (np.asarray(c, dtype=np.int64) for c in coords)
    except KeyError as exc:
        raise ValueError("%s: sparse matrix state lacks %s" % (what, exc))
    if not (rows.size == cols.size == data.size):
        raise ValueError("%s: sparse matrix arrays have inconsistent sizes" % what)
    if rows.size and (rows.min() < 0 or rows.max() >= nrows or cols.min() < 0 or cols.max() >= ncols):
        raise ValueError("%s: sparse matrix index out of range for shape %s" % (what, (nrows, ncols)))
    dtype = np.complex128 if np.iscomplexobj(data) else np.float64
    dense = np.zeros((nrows, ncols), dtype=dtype)
    np.add.at(dense, (rows, cols), data.astype(dtype))  # duplicates add up, as in scipy
    return dense


def _to_plain(value, key: str, path: str):
    """Replace stand-ins (recursively inside dicts/lists/tuples) by numpy arrays."""
    if isinstance(value, _ChumpyStandIn):
        return _chumpy_value(value, key, path)
    if isinstance(value, _SparseStandIn):
        return _sparse_to_dense(value, key, path)
    if isinstance(value, dict):
        return {k: _to_plain(v, key, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v, key, path) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_plain(v, key, path) for v in value)
    if isinstance(value, _PickledStandIn):  # pragma: no cover - no other stand-in kinds
        raise ValueError("%s: key %r holds an unsupported %s" % (path, key, value.pickled_path))
    return value


# ------------------------------------------------------------------------- validation

def _check_shapes(model: Dict[str, Any], path: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in model]
    if missing:
        raise ValueError("%s: not an SMPL model: missing required key(s) %s (keys found: %s)"
                         % (path, ", ".join(missing), ", ".join(sorted(map(str, model)))))
    arrays = {}
    for key in REQUIRED_KEYS:
        try:
            arr = np.asarray(model[key])
        except Exception as exc:  # e.g. ragged lists
            raise ValueError("%s: key %r is not an array (%s)" % (path, key, exc))
        if arr.dtype.kind not in "biuf":
            raise ValueError("%s: key %r has dtype %s, expected numbers" % (path, key, arr.dtype))
        arrays[key] = arr

    def bad(key, expected):
        raise ValueError("%s: key %r has shape %s, expected %s"
                         % (path, key, tuple(arrays[key].shape), expected))

    vt = arrays["v_template"]
    if vt.ndim != 2 or vt.shape[1] != 3 or vt.shape[0] < 1:
        bad("v_template", "(V, 3)")
    V = vt.shape[0]
    sd = arrays["shapedirs"]
    if sd.ndim != 3 or sd.shape[:2] != (V, 3) or sd.shape[2] < 1:
        bad("shapedirs", "(V, 3, K) = (%d, 3, K) with K >= 1 shape coefficients" % V)
    if arrays["posedirs"].shape != (V, 3, NUM_POSE_BASIS):
        bad("posedirs", "(V, 3, %d) = (%d, 3, %d)" % (NUM_POSE_BASIS, V, NUM_POSE_BASIS))
    if arrays["J_regressor"].shape != (NUM_JOINTS, V):
        bad("J_regressor", "(%d, V) = (%d, %d)" % (NUM_JOINTS, NUM_JOINTS, V))
    if arrays["weights"].shape != (V, NUM_JOINTS):
        bad("weights", "(V, %d) = (%d, %d)" % (NUM_JOINTS, V, NUM_JOINTS))
    if arrays["kintree_table"].shape != (2, NUM_JOINTS):
        bad("kintree_table", "(2, %d)" % NUM_JOINTS)
    f = arrays["f"]
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
        bad("f", "(F, 3)")
    if f.dtype.kind == "f" and not np.array_equal(f, np.round(f)):
        raise ValueError("%s: key 'f' holds non-integer vertex indices" % path)
    if f.min() < 0 or f.max() >= V:
        raise ValueError("%s: key 'f' has vertex indices in [%d, %d], expected [0, %d]"
                         % (path, f.min(), f.max(), V - 1))
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        if not np.all(np.isfinite(arrays[key])):
            raise ValueError("%s: key %r holds non-finite values" % (path, key))


# ------------------------------------------------------------------------- public API

def load_smpl_pickle(path) -> Dict[str, Any]:
    """Load an SMPL model pickle without chumpy or scipy; every array comes back as numpy.

    chumpy objects become their value (float64 arrays), scipy sparse matrices become dense
    float64 arrays, strings and scalars are kept.  Raises FileNotFoundError (with where to
    get the official file) for a missing file, ``UnsafePickleError`` (a ValueError) for a
    pickle naming a class off the allow-list, and ValueError for a file that is not a
    pickle, is truncated, lacks a required key or has an array of the wrong shape.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError("SMPL model file not found: %s. %s" % (path, _DOWNLOAD_HINT))
    if os.path.isdir(path):
        raise ValueError("%s is a directory, expected an SMPL model .pkl file" % path)
    if os.path.getsize(path) == 0:
        raise ValueError("%s is empty, expected an SMPL model pickle" % path)
    with open(path, "rb") as fh:
        try:
            raw = _SMPLUnpickler(fh, path).load()
        except UnsafePickleError as exc:
            msg = str(exc)
            if path not in msg:
                msg = "%s: %s" % (path, msg)
            raise UnsafePickleError(msg) from None
        except Exception as exc:  # garbage, truncation, bad opcodes, ...
            raise ValueError("%s is not a readable SMPL model pickle (%s: %s)"
                             % (path, type(exc).__name__, exc)) from exc
    if not isinstance(raw, dict):
        raise ValueError("%s: expected a pickled dict of model arrays, found %s"
                         % (path, type(raw).__name__))
    model = {}
    for key, value in raw.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        model[key] = _to_plain(value, key, path)
    _check_shapes(model, path)
    return model


def convert_smpl_pickle(src, dst) -> Dict[str, Any]:
    """Convert an official SMPL pickle into a plain numpy-only pickle at ``dst``.

    Floating arrays are stored as C-contiguous float64 (the official files are float64;
    smplx casts to its own dtype when it builds buffers), ``f`` as int64 (smplx reads it
    with ``to_np(f, dtype=np.int64)``), ``kintree_table`` and ``vert_sym_idxs`` as int64.
    Kept keys: the required ones plus J, J_regressor_prior, weights_prior, vert_sym_idxs,
    bs_style and bs_type when present; anything else is dropped and listed in the summary.
    ``dst`` is written atomically (temp file in the same folder, then ``os.replace``) with
    pickle protocol 4; it loads with ``pickle.load(f, encoding='latin1')`` and with
    ``smplx.SMPL(model_path=dst)``.  Returns a small summary dict.
    """
    src = os.fspath(src)
    dst = os.fspath(dst)
    model = load_smpl_pickle(src)

    out: Dict[str, Any] = {}
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights") + _EXTRA_FLOAT_KEYS:
        if key in model:
            out[key] = np.ascontiguousarray(model[key], dtype=np.float64)
    out["f"] = np.ascontiguousarray(model["f"], dtype=np.int64)
    out["kintree_table"] = np.ascontiguousarray(model["kintree_table"], dtype=np.int64)
    for key in _EXTRA_INT_KEYS:
        if key in model:
            out[key] = np.ascontiguousarray(model[key], dtype=np.int64)
    for key in _EXTRA_STR_KEYS:
        if isinstance(model.get(key), str):
            out[key] = model[key]
    dropped = sorted(k for k in model if k not in out)

    _atomic_pickle_dump(out, dst)
    return {
        "path": dst,
        "num_vertices": int(out["v_template"].shape[0]),
        "num_faces": int(out["f"].shape[0]),
        "num_betas": int(out["shapedirs"].shape[2]),
        "num_joints": NUM_JOINTS,
        "dropped_keys": dropped,
    }


def _atomic_pickle_dump(obj, dst: str) -> None:
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
