"""LLaVA-Instruct (VQA on COCO images) and `Mixture`, which weighs the datasets of a real run."""
from __future__ import annotations

import os

import numpy as np
import torch

from data import IMAGE_TOKEN, Sample
from realdata.common import DataFormatError, LLAVA_INSTRUCT_SOURCE, _missing_images, _need, _read_json, _spread, _where
from realdata.images import _load_rgb, pad_to_square


class LLaVAInstruct(torch.utils.data.Dataset):
    """vqa samples from LLaVA-Instruct-150k (§4.1 (4)).

    Schema (llava_instruct_150k.json): a list of {"id": str, "image": "<file in image_dir>",
    "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.
    Each human/gpt pair becomes one single-turn sample with the image (the `<image>` mark moved to
    the front, LLaVA-1.5's order); a record without "image" gives text-only samples. Departure:
    later turns lose the earlier ones as context (our chat template is single-turn).
    """

    NAME = "LLaVA-Instruct-150k"

    def __init__(self, json_path: str, image_dir: str, image_size: int = 336):
        self.image_dir = _need(self.NAME, image_dir, "image directory", LLAVA_INSTRUCT_SOURCE)
        self.json_path, self.image_size = json_path, image_size
        records = _read_json(self.NAME, json_path, LLAVA_INSTRUCT_SOURCE, "a list of conversation records")
        schema = ('{"id", "image" (optional), "conversations": [{"from": "human", "value"}, {"from": "gpt", '
                  '"value"}, ...]}')
        if not isinstance(records, list):
            raise DataFormatError(f"{_where(self.NAME, json_path)}: expected a list of records {schema}")
        self.turns = []  # (record index, image file or None, question, answer)
        for k, rec in enumerate(records):
            rid = rec.get("id", k) if isinstance(rec, dict) else k
            conv = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
                raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: expected {schema}")
            for t in range(0, len(conv), 2):
                q, a = conv[t], conv[t + 1]
                if not (isinstance(q, dict) and isinstance(a, dict) and q.get("from") == "human"
                        and a.get("from") == "gpt" and isinstance(q.get("value"), str)
                        and isinstance(a.get("value"), str)):
                    raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: turn {t} is not a human/gpt pair "
                                          f"with string values; expected {schema}")
                if not isinstance(rec.get("image", ""), str):
                    raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: \"image\" is a "
                                          f"{type(rec['image']).__name__}; expected a file name in the image directory")
                question = " ".join(q["value"].replace(IMAGE_TOKEN, " ").split())
                self.turns.append((k, rec.get("image"), question, a["value"].strip()))
        if not self.turns:
            raise DataFormatError(f"{_where(self.NAME, json_path)}: no conversation records")

    def __len__(self) -> int:
        return len(self.turns)

    def preflight(self) -> list:
        """Problems of the images of IMAGE_SAMPLE records spread over those that name one: missing files."""
        named = [(k, image) for k, image, _, _ in self.turns if image is not None]
        sample = [named[i] for i in _spread(len(named))]
        return _missing_images(self.NAME, self.image_dir, sample, LLAVA_INSTRUCT_SOURCE)

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Turn i (nothing to draw: `Mixture`'s interface)."""
        return self[i]

    def __getitem__(self, i: int) -> Sample:
        k, image_file, question, answer = self.turns[i]
        if image_file is None:
            return Sample("vqa", question, answer, index=i, text=question)
        image = _load_rgb(self.NAME, os.path.join(self.image_dir, image_file), f"record {k} of {self.json_path}",
                          LLAVA_INSTRUCT_SOURCE)
        return Sample("vqa", IMAGE_TOKEN + "\n" + question, answer, image=pad_to_square(image, self.image_size),
                      index=i, text=question)


class Mixture(torch.utils.data.Dataset):
    """A deterministic weighted mixture of datasets: sample i draws a dataset (by weight), a uniform
    index j into it, and that item's caption and prompt paraphrase (`ds.draw(j, rng)`), all from
    np.random.default_rng((seed, i)). Each index is an independent draw, so a training loop that
    samples indices from a large `length` (data.FRESH_DRAWS) reaches every item with every caption; a length
    equal to the data size would fix a pool of that many (item, caption) pairs, about 1 - 1/e of the
    items, for the whole run.

    Args:
        parts: (dataset, weight) pairs, weights non-negative, not all zero. length: samples.
    """


    def __init__(self, parts, length: int, seed: int = 0):
        if not parts:
            raise ValueError("Mixture: no datasets")
        w = np.asarray([float(p[1]) for p in parts])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"Mixture: weights must be finite, non-negative, not all zero: {w.tolist()}")
        self.datasets, self.p, self.length, self.seed = [p[0] for p in parts], w / w.sum(), int(length), seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        rng = np.random.default_rng((self.seed, int(i)))
        ds = self.datasets[int(rng.choice(len(self.datasets), p=self.p))]
        return ds.draw(int(rng.integers(len(ds))), rng)
