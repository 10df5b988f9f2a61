"""What every reader shares: where each asset comes from, the format error that names the file and
the record, and checked readers of npz, JSON and pickle files."""
from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np


POSESCRIPT_SOURCE = ("the PoseScript V2 release, https://download.europe.naverlabs.com/ComputerVision/PoseScript/"
                     "posescript_release_v2.zip (see github.com/naver/posescript)")


AMASS_SOURCE = "AMASS in the SMPL+H G format, https://amass.is.tue.mpg.de (PoseScript uses its 19 sub-datasets)"


HMR2_DATA_SOURCE = ("4D-Humans' hmr2_evaluation_data.tar.gz (its README, 'Evaluation': 3dpw_test.npz, h36m_val_p2.npz, "
                    "...), or training npz files with SMPL poses in that schema or SPIN's (github.com/nkolot/SPIN, "
                    "datasets/preprocess: only its mpi_inf_3dhp_train.npz has poses; 4D-Humans ships its training "
                    "sets as webdataset tars, which are not read here), with each dataset's own images")


BEDLAM_SCRIPT_SOURCE = ("PoseEmbroider's BEDLAM processing (github.com/naver/poseembroider, datasets/process_bedlam/"
                        "do.sh) run on BEDLAM (https://bedlam.is.tue.mpg.de)")


LLAVA_INSTRUCT_SOURCE = ("llava_instruct_150k.json from the Hugging Face dataset liuhaotian/LLaVA-Instruct-150K, "
                         "with COCO train2017 images (https://cocodataset.org)")


DESCRIBE_PROMPT = "<image>\nDescribe the body pose of the person in this image."


# A longer caption is cut to this many characters, with a warning (PoseScript's run to a few hundred): a prompt
# past the language model's positions (4096 for LLaVA-1.5) would otherwise run on with no word.
MAX_CAPTION_CHARS = 2000


class DataFormatError(ValueError):
    """A dataset file that does not follow its schema."""


def _load_npz(dataset: str, path: str, what: str, source: str):
    """np.load of an npz (no pickles), DataFormatError naming the file if it is not one (truncated, corrupt)."""
    _need(dataset, path, what, source)
    problem = "not a zip archive"
    if zipfile.is_zipfile(path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            problem = f"{type(err).__name__}: {err}"
    raise DataFormatError(f"{_where(dataset, path)}: not a readable npz ({problem}); the file is truncated, corrupt or "
                          f"of another format: download it again ({source})")


def _checked_captions(dataset: str, path: str, key, vals: list, cut: list) -> list:
    """A record's captions: DataFormatError for an empty one; one longer than MAX_CAPTION_CHARS is cut to it
    and its length appended to `cut` (the caller warns once per file)."""
    if not all(v.strip() for v in vals):
        raise DataFormatError(f"{_where(dataset, path, key)}: an empty caption; give the record text or remove it")
    cut += [len(v) for v in vals if len(v) > MAX_CAPTION_CHARS]
    return [v[:MAX_CAPTION_CHARS] for v in vals]


def fit_captions(dataset, tokenizer, max_tokens: int) -> None:
    """Cut every caption of `dataset` (its `captions`, a list of lists: PoseScript, as evaluate.py reads it) to
    at most `max_tokens` tokens of `tokenizer`, in place, warning how many were cut and the longest: a prompt
    past the language model's positions would run on with no word."""
    cut = []
    for caps in dataset.captions:
        for k, text in enumerate(caps):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) > max_tokens:
                cut.append(len(enc["input_ids"]))
                caps[k] = text[:enc["offset_mapping"][max_tokens - 1][1]]
    if cut:
        print(f"warning: {getattr(dataset, 'NAME', 'dataset')}: {len(cut)} caption(s) longer than {max_tokens} tokens "
              f"(the longest {max(cut)}) cut to {max_tokens}, so that the prompts fit the language model's positions")


def _warn_cut(dataset: str, path: str, cut: list) -> None:
    if cut:
        print(f"warning: {dataset}: {path}: {len(cut)} caption(s) longer than {MAX_CAPTION_CHARS} characters cut to "
              f"{MAX_CAPTION_CHARS} (the longest had {max(cut)}; MAX_CAPTION_CHARS)")


def _where(dataset: str, path, record=None) -> str:
    return f"{dataset}: {path}" + ("" if record is None else f", record {record!r}")


def _need(dataset: str, path: str, what: str, source: str) -> str:
    """`path` if it exists, else FileNotFoundError naming the dataset, the file and its source."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: {what} {path} not found; it comes from {source}")
    return path


# The preflight (`preflight` of each dataset, preflight_real) checks the files of this many records
# per dataset, spread over them: a wrong image directory or a partial download shows in any sample.
IMAGE_SAMPLE = 64


def _spread(n: int, k: int = IMAGE_SAMPLE) -> list:
    """At most k indices spread evenly over range(n), first and last included."""
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))}) if n else []


def _missing_images(dataset: str, img_dir: str, records, source: str) -> list:
    """Problems for the images of `records` ((record, relative path) pairs) that are not files in img_dir."""
    gone = [(r, rel) for r, rel in records if not os.path.isfile(os.path.join(img_dir, rel))]
    if not gone:
        return []
    r, rel = gone[0]
    return [f"{_where(dataset, os.path.join(img_dir, rel), r)}: image not found ({len(gone)} of the {len(records)} "
            f"records checked name a missing image); pass the directory that holds them, as each record names it "
            f"(the images come from {source})"]


def npz_headers(path: str) -> dict:
    """{array name: (shape, dtype)} of an npz read from its .npy headers alone (no array is loaded).
    OSError / ValueError / zipfile.BadZipFile for a file that is not one."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                out[name[:-4]] = (shape, dtype)
    return out


def _read_json(dataset: str, path: str, source: str, schema: str):

    _need(dataset, path, "file", source)
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as err:
        raise DataFormatError(f"{_where(dataset, path)}: not valid JSON ({err}); expected {schema}; a truncated or "
                              f"damaged file: download it again ({source})") from None


def _read_pickle(dataset: str, path: str, source: str):
    """A pickle of numpy arrays and builtins, read without importing anything else it names."""

    from smpl_pickle import _allowed_globals

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "tuple"), ("builtins", "list")):
                return super().find_class(module, name)
            target = _allowed_globals().get((module, name))
            if target is None:
                raise DataFormatError(f"{_where(dataset, path)}: holds a {module}.{name} object; expected only "
                                      "numpy arrays, numbers, strings, lists and dicts")
            return target

    with open(_need(dataset, path, "file", source), "rb") as fh:
        try:
            return Restricted(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError, TypeError, AttributeError) as err:
            if isinstance(err, DataFormatError):
                raise
            raise DataFormatError(f"{_where(dataset, path)}: not a readable pickle ({type(err).__name__}: {err}); the "
                                  f"file is truncated or corrupt: make or download it again ({source})") from None
