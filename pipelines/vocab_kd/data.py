"""Text for vocab_kd: passages with a source label (the downstream "which book" task), the student vocabulary trained on the
training passages, and every passage pre-segmented word by word with both vocabularies.

Embedded default (``data.name=generated``): a small English corpus from a grammar with several "books", each with its own
topic words (nouns, verbs, adjectives with their inflections) over a shared function-word grammar, so that subword
vocabularies, masked-LM and the book classification all have something to learn. Real data (``data.name=text_folder``):
plain-text files ``<root>/<collection>/*.txt`` such as ``../shared/data/english_text``; a file ``<author>-<title>.txt`` is
labelled by its author, a file whose name starts with a year (``1789-Washington.txt``) by its collection folder.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig
from torch.utils.data import Dataset

from common.config import ConfigError
from common.data import check_full_batch, check_root_is_read, eval_loader, training_loader
from common.tracking import notice
from pipelines.vocab_kd.model import SpecialIds, normalise_and_split, resolve_teacher_path, segment_words, train_wordpiece

TEXT_LAYOUT = "<root>/<collection>/*.txt (plain text; e.g. english_text/{gutenberg,inaugural,state_union}/*.txt)"

# -- the generated corpus -------------------------------------------------------------------------------------------
BOOKS = {
    "sea": (
        "ship sailor captain whale harbour wave anchor island storm compass lantern rope",
        "sail drift anchor steer harpoon wreck",
        "salty stormy distant grey windward foggy",
    ),
    "farm": (
        "farmer barn harvest orchard wheat cattle plough meadow horse fence apple scythe",
        "plant reap milk plough gather feed",
        "golden muddy fertile quiet rustic green",
    ),
    "war": (
        "soldier general battle cannon army fortress banner sword siege trench rifle officer",
        "march attack defend retreat surrender charge",
        "brave bloody loyal fierce wounded victorious",
    ),
    "court": (
        "judge lawyer witness jury verdict prisoner trial court clerk statute evidence appeal",
        "testify accuse sentence argue pardon question",
        "guilty innocent solemn lawful crowded learned",
    ),
    "garden": (
        "rose gardener hedge blossom fountain lily bee path seed bench ivy tulip",
        "bloom prune water wander whisper grow",
        "fragrant sunny tender pale wild blooming",
    ),
    "city": (
        "merchant street market tower bridge clerk carriage lamp factory crowd bank coin",
        "trade hurry build borrow lend shout",
        "busy noisy narrow wealthy smoky modern",
    ),
}
NAMES = "anna thomas margaret william eliza henry".split()
DETERMINERS = "the a every that this no".split()
PREPOSITIONS = "near beside beyond under across through toward".split()
ADVERBS = "slowly quietly suddenly often never always".split()
CONNECTIVES = "and but while because although when".split()


def _past(verb: str) -> str:
    return verb + ("d" if verb.endswith("e") else "ed")


def _ing(verb: str) -> str:
    return (verb[:-1] if verb.endswith("e") and not verb.endswith("ee") else verb) + "ing"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "ch", "sh", "x")) else "s")


def _sentence(rng: random.Random, topic: tuple[list[str], list[str], list[str]], shared: tuple[list[str], list[str], list[str]]) -> str:
    nouns, verbs, adjectives = topic

    # 85 % of the content words from the book's own topic, the rest from any book: the classes overlap
    def pick(own: list[str], other: list[str]) -> str:
        return rng.choice(own if rng.random() < 0.85 else other)

    noun = lambda: pick(nouns, shared[0]) if rng.random() < 0.7 else _plural(pick(nouns, shared[0]))  # noqa: E731
    verb = pick(verbs, shared[1])
    verb = rng.choice([verb, _past(verb), _ing(verb), verb + "s"])
    subject = rng.choice([f"{rng.choice(DETERMINERS)} {pick(adjectives, shared[2])} {noun()}", rng.choice(NAMES), f"the {noun()}"])
    clause = f"{subject} {rng.choice(ADVERBS) + ' ' if rng.random() < 0.3 else ''}{verb} {rng.choice(PREPOSITIONS)} the {noun()}"
    if rng.random() < 0.4:
        clause += (
            f" {rng.choice(CONNECTIVES)} {rng.choice(NAMES)} {_past(pick(verbs, shared[1]))} the {pick(adjectives, shared[2])} {noun()}"
        )
    return clause.capitalize() + rng.choice([".", ".", ".", "!", "?", ";"])


def generated_corpus(books: int, words_per_book: int, seed: int) -> dict[str, str]:
    """{book name: text}; the first ``books`` topics of :data:`BOOKS`, about ``words_per_book`` words each."""
    if not 2 <= books <= len(BOOKS):
        raise ConfigError(f"data.books must be in [2, {len(BOOKS)}] (the generated topics), got {books}")
    rng = random.Random(seed)
    topics = {name: tuple(part.split() for part in parts) for name, parts in list(BOOKS.items())[:books]}
    shared = tuple(sum((t[i] for t in topics.values()), []) for i in range(3))
    out = {}
    for name, topic in topics.items():
        sentences, count = [], 0
        while count < words_per_book:
            sentence = _sentence(rng, topic, shared)
            sentences.append(sentence)
            count += len(sentence.split())
        out[name] = " ".join(sentences)
    return out


# -- a folder of text files -------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # nine of english_text's files are Latin-1
        # ...but a UTF-8 file with a stray byte would be garbled whole ("café" → "cafÃ©"): valid multi-byte sequences
        # that outnumber the invalid bytes say it is UTF-8 (Latin-1 text makes one by chance now and then: "à\xa0»")
        decoded = raw.decode("utf-8", errors="replace")
        invalid = decoded.count("\ufffd")
        if sum(1 for c in decoded if c > "\x7f") - invalid >= 3 * invalid:
            raise ConfigError(
                f"{path}: UTF-8 text with an invalid byte 0x{raw[err.start]:02x} at offset {err.start}; fix that byte or save the file as UTF-8"
            ) from None
        text = raw.decode("latin-1")
    # Latin-1 decodes any bytes: a binary file would train as text. Text has next to no control characters
    controls = sum(1 for c in text if c < " " and c not in "\n\r\t\f") + text.count("\x7f")
    if controls > max(2, len(text) // 1000):
        raise ConfigError(f"{path}: {controls} control characters in {len(text)}: not a text file (binary data?); remove it")
    return text.replace("\r\n", "\n")


def label_of(path: Path) -> str:
    """``austen-emma.txt`` → austen; ``1789-Washington.txt`` → its folder's name (inaugural); ``notes.txt`` → its folder's."""
    head = path.stem.split("-")[0]
    return path.parent.name if (head.isdigit() or head == path.stem) else head.lower()


def read_text_folder(root: str | Path) -> dict[str, str]:
    """{label: the concatenated text of its files}, labels as :func:`label_of` names them."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root {root} is not a folder; expected layout: {TEXT_LAYOUT}")
    files = sorted(p for p in root.glob("*/*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"data.root {root} holds no text files; expected layout: {TEXT_LAYOUT}")
    out: dict[str, list[str]] = {}
    empty: list[Path] = []
    for path in files:
        text = _read_text(path)
        if text.strip():
            out.setdefault(label_of(path), []).append(text)
        else:
            empty.append(path)
    if not out:
        raise ConfigError(f"data.root {root}: every text file is empty; expected layout: {TEXT_LAYOUT}")
    if len(out) < 2:
        skipped = f" ({len(empty)} empty files skipped, e.g. {empty[0].relative_to(root)})" if empty else ""
        raise ConfigError(f"data.root {root} gives one label ({next(iter(out))}){skipped}; the book task needs two: {TEXT_LAYOUT}")
    return {label: "\n".join(texts) for label, texts in sorted(out.items())}


def passages_of(texts: dict[str, str], words: int, per_label: int, seed: int) -> list[tuple[str, int]]:
    """Consecutive ``words``-word passages of each label's text, at most ``per_label`` of them drawn evenly at random
    (fixed ``seed``); [(passage, label index)]."""
    rng = random.Random(seed)
    out = []
    for label, text in enumerate(texts.values()):
        tokens = text.split()
        chunks = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]
        if per_label and len(chunks) > per_label:
            chunks = rng.sample(chunks, per_label)
        out += [(c, label) for c in chunks]
    return out


# -- segmentation of the passages -------------------------------------------------------------------------------------
@dataclass
class Passage:
    text: str
    label: int
    pieces_t: list[list[int]]  # per word, V_t ids
    pieces_s: list[list[int]]  # per word, V_s ids


def fit_to_length(pieces_t: list[list[int]], pieces_s: list[list[int]], max_len: int) -> int:
    """How many leading words fit in ``max_len`` tokens ([CLS] + [SEP] included) whatever the mix: Σ max(|t_i|, |s_i|)."""
    total, n = 2, 0
    for t, s in zip(pieces_t, pieces_s):
        total += max(len(t), len(s))
        if total > max_len:
            break
        n += 1
    return n


def segment_passages(items: list[tuple[str, int]], teacher_tok, student_tok, max_len: int) -> list[Passage]:
    out = []
    for text, label in items:
        words = normalise_and_split(text)
        pieces_t, pieces_s = segment_words(teacher_tok, words), segment_words(student_tok, words)
        n = fit_to_length(pieces_t, pieces_s, max_len)
        if n:
            out.append(Passage(" ".join(words[:n]), label, pieces_t[:n], pieces_s[:n]))
    return out


class Passages(Dataset):
    def __init__(self, passages: list[Passage]):
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i: int) -> Passage:
        return self.passages[i]


def collate(items: list[Passage]) -> list[Passage]:
    return items  # the masked batch is drawn in the module (its draws follow the run's seed)


DATASETS = ("generated", "text_folder")
UNKNOWN_WORDS_NOTICE = 0.01  # above this share of test words [UNK] to the student, a notice says so


def split_passages(texts: dict[str, str], d: DictConfig) -> dict[str, list[tuple[str, int]]]:
    """Each label's passages shuffled (``data.seed``) into test, val (``data.eval_fraction`` each) and train."""
    items = passages_of(texts, d.passage_words, d.per_label, d.seed)
    rng = random.Random(d.seed)
    splits = {"train": [], "val": [], "test": []}
    for label, name in enumerate(texts):
        mine = [it for it in items if it[1] == label]
        rng.shuffle(mine)
        n_eval = max(1, round(d.eval_fraction * len(mine)))
        if len(mine) < 2 * n_eval + 1:
            raise ConfigError(f"label '{name}' has only {len(mine)} passages of {d.passage_words} words: too few for train/val/test")
        splits["test"] += mine[:n_eval]
        splits["val"] += mine[n_eval : 2 * n_eval]
        splits["train"] += mine[2 * n_eval :]
    return splits


def check_data(d: DictConfig) -> None:
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name == "text_folder" and not d.root:
        raise ConfigError(f"data.name=text_folder needs data.root=<folder>; expected layout: {TEXT_LAYOUT}")
    check_root_is_read(d, "generated", DATASETS)
    if d.name == "text_folder":  # before any run opens (reading waits for setup)
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root {root} is not a folder; expected layout: {TEXT_LAYOUT}")
        if not any(p.is_file() for p in root.glob("*/*.txt")):
            raise ConfigError(f"data.root {root} holds no text files; expected layout: {TEXT_LAYOUT}")
    if d.name == "generated":  # the corpus is the config's: its passages are counted before a run opens (milliseconds)
        split_passages(generated_corpus(d.books, d.words_per_book, d.seed), d)


class TextDataModule(pl.LightningDataModule):
    """Passages split into train / val / test (per label, fixed ``data.seed``), the student vocabulary (cached by a hash
    of the training passages and its settings) and both segmentations of every passage."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_data(cfg.data)
        self.cfg = cfg
        self.splits: dict[str, list[Passage]] | None = None

    def texts(self) -> dict[str, str]:
        d = self.cfg.data
        if d.name == "generated":
            return generated_corpus(d.books, d.words_per_book, d.seed)
        return read_text_folder(d.root)

    def split_items(self) -> dict[str, list[tuple[str, int]]]:
        texts = self.texts()
        self.label_names = list(texts)
        return split_passages(texts, self.cfg.data)

    def student_tokenizer(self, train_texts: list[str]):
        from tokenizers import BertWordPieceTokenizer

        s = self.cfg.student
        key = json.dumps({"texts": hashlib.sha1("\n".join(train_texts).encode()).hexdigest(), "vocab": s.vocab_size,
                          "alphabet": s.limit_alphabet, "min_frequency": s.min_frequency,
                          "trainer": "sorted-continuations"})  # fmt: skip
        folder = Path(self.cfg.paths.cache_dir) / "vocab_kd" / f"vocab-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        if not (folder / "vocab.txt").is_file():
            tokenizer = train_wordpiece(train_texts, s.vocab_size, s.limit_alphabet, s.min_frequency)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"tmp{uuid.uuid4().hex}"  # not random: the global RNG stays untouched
            tmp.mkdir()
            tokenizer.save_model(str(tmp))
            (tmp / "vocab.txt").replace(folder / "vocab.txt")
            tmp.rmdir()
        return BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True, strip_accents=None)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from tokenizers import BertWordPieceTokenizer

        items = self.split_items()
        self.teacher_path = resolve_teacher_path(self.cfg.teacher.path)
        self.teacher_tokenizer = BertWordPieceTokenizer(str(self.teacher_path / "vocab.txt"), lowercase=True)
        self.student_tok = self.student_tokenizer([t for t, _ in items["train"]])
        self.teacher_ids, self.student_ids = SpecialIds.of(self.teacher_tokenizer), SpecialIds.of(self.student_tok)
        max_len = self.cfg.data.max_len
        self.splits = {k: segment_passages(v, self.teacher_tokenizer, self.student_tok, max_len) for k, v in items.items()}
        check_full_batch(self.cfg.data.batch_size, len(self.splits["train"]), "training passages")
        words = [w for p in self.splits["test"] for w in p.pieces_s]
        unknown = sum(w == [self.student_ids.unk] for w in words) / max(len(words), 1)
        if unknown > UNKNOWN_WORDS_NOTICE:  # each such word is one easy [UNK] to predict: a perplexity that flatters
            notice(
                f"{100 * unknown:.0f} % of the test words are [UNK] to the student (its alphabet cannot spell them; "
                f"student.limit_alphabet={self.cfg.student.limit_alphabet}): its perplexity is not comparable to the teacher's"
            )

    def identity(self) -> dict:
        """What the teacher's MLM head cache depends on: the training text, and the student vocabulary (its batches mask
        whole words of both segmentations, so the draws follow the student's pieces too)."""
        digest = hashlib.sha1("\n".join(p.text for p in self.splits["train"]).encode()).hexdigest()[:16]
        vocab = hashlib.sha1(json.dumps(self.student_tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]
        return {"train_text": digest, "max_len": self.cfg.data.max_len, "student_vocab": vocab}

    def train_dataloader(self):
        return training_loader(self, Passages(self.splits["train"]), collate_fn=collate, drop_last=True)

    def val_dataloader(self):
        return eval_loader(self, Passages(self.splits["val"]), collate_fn=collate)

    def test_dataloader(self):
        return eval_loader(self, Passages(self.splits["test"]), collate_fn=collate)
