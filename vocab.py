"""The tiny preset's tokenizer: word-level, built from every text of the built-in benchmark (the
templates, every prompt with its captions or questions, every answer) and cached per benchmark
configuration. With the pose-input tasks (--mix with 5 weights) or the abstract prompts (6) it is
extended, every id of the smaller vocabulary kept, so the default model stays as it was."""
from __future__ import annotations

import collections
import os
import re
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import plumbing
import posebench
from data import (ABSTRACT_TASK, ALL_TASKS, IMAGE_TOKEN, MIX_TASKS, POSE_ANSWER, POSE_INPUT_TASKS, POSE_INPUT_TOKEN,
                  POSE_TOKEN, PROMPTS, TASKS, chat_text, fill_template)


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, POSE_TOKEN)  # ids 0..5 in this order
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS + (POSE_INPUT_TOKEN,)) + ")")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a `tokenizers` one, with the special tokens named;
    `image_token_id` and `pose_token_id` (and `pose_input_token_id`, where the vocabulary has it)
    become attributes. No bos/eos are added on encode."""
    named = {"image_token": IMAGE_TOKEN, "pose_token": POSE_TOKEN}
    if tok.token_to_id(POSE_INPUT_TOKEN) is not None:
        named["pose_input_token"] = POSE_INPUT_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=named, clean_up_tokenization_spaces=True)  # decode "pose ." as "pose."


def _pre_tokenizer():
    """Whitespace, then every punctuation character alone: the word-level tokenizer's split."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _count_words(texts: Iterable[str]) -> collections.Counter:
    """How often each word (the word-level split) occurs in `texts`, the special tokens left out."""
    pre = _pre_tokenizer()
    chunks = collections.Counter()  # whitespace-separated chunks first: few distinct ones, fast
    for text in texts:
        for piece in _SPECIAL_SPLIT.split(text):
            if piece not in SPECIAL_TOKENS and piece != POSE_INPUT_TOKEN:
                chunks.update(piece.split())
    counts = collections.Counter()
    for chunk, n in chunks.items():
        for word, _ in pre.pre_tokenize_str(chunk):
            counts[word] += n
    return counts


def extend_tokenizer(tok: PreTrainedTokenizerFast, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """`tok` with POSE_INPUT_TOKEN (special) and every word of `texts` it lacks appended: every id
    of `tok` keeps its meaning, the new ones follow (POSE_INPUT_TOKEN first, then the words by
    frequency, then alphabetically). The pose-input tasks' vocabulary (`tiny_tokenizer`)."""
    vocab = dict(tok.get_vocab())
    counts = _count_words(texts)
    new = sorted((w for w in counts if w not in vocab), key=lambda w: (-counts[w], w))
    for t in (POSE_INPUT_TOKEN, *new):
        vocab.setdefault(t, len(vocab))
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("extend_tokenizer: the tokenizer's ids are not 0..V-1")
    out = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    out.pre_tokenizer = _pre_tokenizer()
    out.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS + (POSE_INPUT_TOKEN,)])
    return _wrap(out)


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark of `texts`.

    Text splits on whitespace, then every punctuation character is its own token; case is kept.
    The special tokens (`SPECIAL_TOKENS`, ids 0-5) are matched before that split, so "<POSE>"
    and "<image>" are single ids. Words are ordered by frequency, then alphabetically, so the
    same texts (in any order) give the same ids. Being special, <POSE> is dropped by
    `decode(..., skip_special_tokens=True)`: decode generated answers (cut at eos) without it
    before the format reward's regex.
    """
    counts = _count_words(texts)
    words = sorted(counts, key=lambda word: (-counts[word], word))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _wrap(tok)


def _template_texts(tasks: Sequence[str] = TASKS) -> list[str]:
    """The fixed words of every template of `tasks` (fields left out)."""
    fixed = [re.sub(r"\{\w+\}", " ", p) for t in tasks for p in PROMPTS[t]]
    return fixed + [POSE_ANSWER, chat_text("", None)]


def pose_input_texts(cfg: posebench.BenchConfig | None = None, splits: Sequence[str] = posebench.SPLITS) -> list[str]:
    """The pose-input tasks' texts of the given splits: their templates, every instruction alone
    and in every editing prompt (the captions, their answers, are `benchmark_texts`'). Sorted."""
    texts = set(_template_texts(POSE_INPUT_TASKS)) | set(PROMPTS["pose_to_text"])
    for split in splits:
        for ins in posebench.load_edits(split, cfg).instructions:
            texts.update(ins)
            texts.update(fill_template(p, instruction=i) for i in ins for p in PROMPTS["pose_edit"])
    return sorted(texts)


def abstract_texts() -> list[str]:
    """The abstract-prompt task's texts: every prompt template filled with every archetype phrase (its
    answers are captions and POSE_ANSWER, already `benchmark_texts`'). Sorted."""
    return sorted({fill_template(p, phrase=ph) for phrases in posebench.ARCHETYPE_PHRASES.values()
                   for ph in phrases for p in PROMPTS[ABSTRACT_TASK]})


def benchmark_texts(cfg: posebench.BenchConfig | None = None, splits: Sequence[str] = posebench.SPLITS) -> list[str]:
    """The texts of the benchmark `cfg`: the templates, every prompt of the given splits with each
    of its captions or questions filled in, every answer. The tokenizer's vocabulary reads every
    split (a word-level vocabulary must cover the test words); stage 0's LM pretraining reads the
    training split only. Returns the distinct texts, sorted."""
    unknown = [s for s in splits if s not in posebench.SPLITS]
    if unknown:
        raise ValueError(f"benchmark_texts: unknown split {unknown[0]!r}; expected some of {posebench.SPLITS}")
    texts = set(_template_texts())
    for split in splits:
        d = posebench.load_split(split, cfg)
        texts.update(PROMPTS["image_to_pose"])
        for captions in d.captions:
            texts.update(fill_template(p, caption=c) for c in captions for p in PROMPTS["text_to_pose"])
        for qas in d.vqa:
            texts.update(fill_template(p, question=qa["question"]) for qa in qas for p in PROMPTS["vqa"])
            texts.update(qa["answer"] for qa in qas)
    texts.add(POSE_ANSWER)
    return sorted(texts)


def tiny_tokenizer(cfg: posebench.BenchConfig | None = None, pose_input: bool = False,
                   abstract: bool = False) -> PreTrainedTokenizerFast:
    """`build_tokenizer(benchmark_texts(cfg))`, built once per benchmark configuration and cached
    at <cache_dir>/tokenizers/<config_key>/tokenizer.json (written atomically).

    pose_input: that tokenizer extended by the pose-input tasks' token and words
    (`extend_tokenizer(..., pose_input_texts(cfg))`, cached beside it as tokenizer_pose_input.json):
    the default vocabulary, and so the default model, stays as it was without them.

    abstract (implies pose_input; --mix with 6 weights): the pose-input tokenizer extended by the
    abstract prompts' words (`abstract_texts`), cached as tokenizer_abstract.json: every id of the two
    smaller vocabularies keeps its meaning.

    A cached file that cannot encode this file's templates (they changed since it was written)
    is rebuilt.
    """
    cfg = cfg or posebench.BenchConfig()
    folder = os.path.join(plumbing.cache_dir(), "tokenizers", posebench.config_key(cfg))
    name = "tokenizer_abstract.json" if abstract else "tokenizer_pose_input.json" if pose_input else "tokenizer.json"
    path = os.path.join(folder, name)
    templates = _template_texts(MIX_TASKS if abstract else ALL_TASKS if pose_input else TASKS)
    if os.path.exists(path):
        tok = _wrap(Tokenizer.from_file(path))
        if tok.unk_token_id not in sum(tok(templates, add_special_tokens=False)["input_ids"], []):
            return tok
    if abstract:
        tok = extend_tokenizer(tiny_tokenizer(cfg, pose_input=True), abstract_texts())
    elif pose_input:
        tok = extend_tokenizer(tiny_tokenizer(cfg), pose_input_texts(cfg))
    else:
        tok = build_tokenizer(benchmark_texts(cfg))
    plumbing.atomic_write(path, lambda fh: fh.write(tok.backend_tokenizer.to_str()))
    return tok
