"""The transfer set's augmentation (Tang et al. 2019, "Distilling task-specific knowledge from BERT into simple
neural networks", section 3.2): masking, same-class word swap and n-gram sampling of whitespace words, on the host,
from one seeded numpy Generator, so a seed gives the same sentences on every run and every resume.

Per word w_i of a sentence, X_i ~ U[0, 1): X_i < p_mask masks it; p_mask <= X_i < p_mask + p_swap swaps it for a word
of its class, drawn from the class's unigram distribution (the word itself left out). Then, with p_ngram, the
sentence is replaced by a random n-gram of it, n uniform in 1..5 (cut to the sentence's length).

The mask (`mask_token`) is one token of the vocabulary the student reads, which the tokenizer gives as one id
in place of the word. GPT-2: its one special token, <|endoftext|> (id 50256). Tang's [MASK] is the unknown-word
token of the student; a GPT-2-vocabulary student has neither a mask nor an unknown token, and any ordinary word would
be read as that word. <|endoftext|> encodes to exactly one id that no text produces, and the student already knows
it as "no word here" (it pads every row). BERT and RoBERTa: their own mask token ([MASK], <mask>), Tang's. Llama:
no mask token, so its unknown-word token <unk>, Tang's meaning of [MASK] (an unknown word), one id that ordinary
text does not produce (a byte-fallback tokenizer never does); its pad token would be read as "no word here", as
GPT-2's is, but a Llama tokenizer need not have one of its own. The mask is glued to the word before it (`render`),
so a byte-level BPE (GPT-2, RoBERTa) or a metaspace tokenizer (Llama) gives one id for it, not a stray space token;
WordPiece (BERT) splits it off either way.

Word classes (`word_classes`) stand in for Tang's part-of-speech tags: distributional classes from the training set
itself (Schütze 1995): each word is described by which frequent words stand just before and just after it, and the
descriptions are clustered by k-means from a fixed start. No POS tagger in the environment works offline: NLTK's and
spaCy's need model downloads.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_kd_jax.data.errors import DataError

MASK = "<|endoftext|>"  # GPT-2's end-of-text token (id 50256): one id, never produced by text
MAX_NGRAM = 5  # Tang et al.: n uniform in 1..5
N_CLASSES = 32  # distributional word classes (about the size of the Penn Treebank's tag set, 36)
N_CONTEXT = 64  # the most frequent words that describe a word's left and right neighbours
KMEANS_ITERATIONS = 30
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation


def mask_token(tokenizer) -> str:
    """The mask the augmentation writes for `tokenizer`'s vocabulary: its mask token (BERT's [MASK], RoBERTa's
    <mask>), else its unknown-word token (Llama's <unk>; GPT-2's is its <|endoftext|>, MASK), checked to encode to
    exactly that one id."""
    token = tokenizer.mask_token or tokenizer.unk_token
    if token is None:
        raise DataError(f"{type(tokenizer).__name__} has neither a mask nor an unknown-word token: distill.augment "
                        "has no token to mask a word with; set distill.augment=0 (distill.unlabeled needs none)")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if ids != [tokenizer.convert_tokens_to_ids(token)]:
        raise DataError(f"the mask token {token!r} encodes to {ids}, not one id: distill.augment would not replace "
                        "a word by one token; set distill.augment=0")
    return str(token)


def split_word(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation) of a whitespace word: 'rocks.' -> ('', 'rocks', '.')."""
    m = _AFFIXES.match(word)
    return m.group(1), m.group(2), m.group(3)


def core_key(word: str) -> str:
    """The lowercased core a word's class is looked up by ('' for punctuation alone)."""
    return split_word(word)[1].lower()


@dataclasses.dataclass(frozen=True)
class WordClasses:
    """Which class each word (lowercased core) is in, and each class's words with their unigram counts."""

    of: dict[str, int]
    words: list[list[str]]  # per class, in first-seen order
    counts: list[np.ndarray]  # per class, the training-set count of each word

    @property
    def position(self) -> dict[str, int]:
        """Each word's place in its class's list."""
        if not hasattr(self, "_position"):
            object.__setattr__(self, "_position", {w: i for ws in self.words for i, w in enumerate(ws)})
        return self._position  # type: ignore[attr-defined]

    @property
    def n_classes(self) -> int:
        return len(self.words)


def word_classes(sentences: Sequence[str], n_classes: int = N_CLASSES, n_context: int = N_CONTEXT) -> WordClasses:
    """Distributional classes of the words of `sentences`: each word's left and right neighbours among the
    `n_context` most frequent words (and a sentence boundary, and 'any other word'), as two L2-normalised count
    profiles, clustered by k-means whose start is the profiles of the `n_classes` most frequent words. Deterministic."""
    docs = [[core_key(w) for w in s.split()] for s in sentences]
    docs = [[w for w in d if w] for d in docs]
    freq = Counter(w for d in docs for w in d)
    vocab = list(dict.fromkeys(w for d in docs for w in d))  # first-seen order
    if not vocab:
        return WordClasses({}, [], [])
    ranked = sorted(vocab, key=lambda w: -freq[w])  # stable: ties keep first-seen order
    context = {w: i for i, w in enumerate(ranked[:n_context])}
    width = n_context + 2  # the context words, the sentence boundary, any other word
    index = {w: i for i, w in enumerate(vocab)}
    profile = np.zeros((len(vocab), 2 * width), np.float64)
    for d in docs:
        padded = [None, *d, None]
        for j, w in enumerate(d, start=1):
            for side, neighbour in ((0, padded[j - 1]), (1, padded[j + 1])):
                col = n_context if neighbour is None else context.get(neighbour, n_context + 1)
                profile[index[w], side * width + col] += 1
    for side in (slice(0, width), slice(width, 2 * width)):
        profile[:, side] /= np.maximum(np.linalg.norm(profile[:, side], axis=1, keepdims=True), 1e-12)
    k = min(n_classes, len(vocab))
    centres = profile[[index[w] for w in ranked[:k]]].copy()
    assign = np.zeros(len(vocab), np.int64)
    for iteration in range(KMEANS_ITERATIONS):
        distance = (profile ** 2).sum(1)[:, None] - 2 * profile @ centres.T + (centres ** 2).sum(1)[None, :]
        new = np.argmin(distance, axis=1)
        if iteration and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = profile[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    used = list(dict.fromkeys(int(c) for c in assign))  # renumber classes in first-seen order, empty ones dropped
    renumber = {c: i for i, c in enumerate(used)}
    of = {w: renumber[int(assign[index[w]])] for w in vocab}
    words: list[list[str]] = [[] for _ in used]
    for w in vocab:
        words[of[w]].append(w)
    return WordClasses(of, words, [np.array([freq[w] for w in ws], np.float64) for ws in words])


def mask_or_swap(words: Sequence[str], rng: np.random.Generator, classes: WordClasses, p_mask: float,
                 p_swap: float, mask: str = MASK) -> list[str]:
    """Tang's per-word step: one uniform draw per word; below p_mask the word becomes `mask`, below p_mask + p_swap
    it is swapped (`swap_word`), else kept."""
    out = []
    for w in words:
        x = rng.random()
        out.append(mask if x < p_mask else swap_word(w, rng, classes) if x < p_mask + p_swap else w)
    return out


def swap_word(word: str, rng: np.random.Generator, classes: WordClasses) -> str:
    """Another word of `word`'s class, drawn by the class's unigram counts (the word itself left out), with the
    word's punctuation and capital kept; the word unchanged when its class has no other word (or it has none)."""
    lead, core, trail = split_word(word)
    key = core.lower()
    if key not in classes.of:
        return word
    c = classes.of[key]
    words, counts = classes.words[c], classes.counts[c].copy()
    counts[classes.position[key]] = 0.0
    if not counts.sum():
        return word
    new = words[int(rng.choice(len(words), p=counts / counts.sum()))]
    if core[:1].isupper():
        new = new[:1].upper() + new[1:]
    return f"{lead}{new}{trail}"


def sample_ngram(words: Sequence[str], rng: np.random.Generator) -> list[str]:
    """A random n-gram of `words`: n uniform in 1..MAX_NGRAM (cut to len(words)), its start uniform."""
    if not words:
        return list(words)
    n = min(int(rng.integers(1, MAX_NGRAM + 1)), len(words))
    start = int(rng.integers(0, len(words) - n + 1))
    return list(words[start:start + n])


def augment_words(words: Sequence[str], rng: np.random.Generator, classes: WordClasses, p_mask: float, p_swap: float,
                  p_ngram: float, mask: str = MASK) -> list[str]:
    """One augmented copy (Tang et al.): mask-or-swap each word, then with p_ngram keep only a random n-gram."""
    out = mask_or_swap(words, rng, classes, p_mask, p_swap, mask)
    return sample_ngram(out, rng) if rng.random() < p_ngram else out


def render(words: Sequence[str], mask: str = MASK) -> str:
    """Words back to a sentence: joined by spaces, `mask` glued to the word before it (one id, no space id)."""
    text = ""
    for i, w in enumerate(words):
        text += w if (i == 0 or w == mask) else f" {w}"
    return text


@dataclasses.dataclass(frozen=True)
class Augmented:
    """`copies` augmented copies of each sentence, sentence-major (copy j of sentence i at i * copies + j)."""

    sentences: list[str]
    source: np.ndarray  # int64 [len(sentences)]: the sentence each copy was made from
    unchanged: int  # copies that came out equal to their sentence (kept: they are still teacher-labelled rows)
    classes: WordClasses


def augment(sentences: Sequence[str], copies: int, seed: int, *, p_mask: float, p_swap: float, p_ngram: float,
            classes: WordClasses | None = None, mask: str = MASK) -> Augmented:
    """Tang et al.'s augmentation, `copies` times per sentence, from one Generator seeded by `seed` (the same
    sentences every time for the same inputs); the swap's classes from `sentences` unless given; `mask` the
    tokenizer's (`mask_token`; GPT-2's by default)."""
    classes = word_classes(sentences) if classes is None else classes
    rng = np.random.default_rng(seed)
    out, source, unchanged = [], [], 0
    for i, sentence in enumerate(sentences):
        words = sentence.split()
        for _ in range(copies):
            text = render(augment_words(words, rng, classes, p_mask, p_swap, p_ngram, mask), mask)
            unchanged += text == render(words, mask)
            out.append(text if text else sentence)
            source.append(i)
    return Augmented(out, np.asarray(source, np.int64), unchanged, classes)


def read_unlabeled(path: str | Path) -> tuple[list[str], int]:
    """(sentences, blank lines) of a text file with one sentence per line (surrounding whitespace stripped; blank
    lines skipped and counted)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"distill.unlabeled={path}: no such file (expected a text file, one sentence per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"distill.unlabeled={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise DataError(f"distill.unlabeled={path}: holds no sentence ({len(lines)} blank lines)")
    return sentences, len(lines) - len(sentences)
