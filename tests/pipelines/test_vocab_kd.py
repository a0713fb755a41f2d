"""vocab_kd: the student tokenizer round-trips text, mixed segmentation keeps word alignment, one shared projection serves
every layer, the losses against hand computations, loaders on real-format fixtures, one-line errors, the packaged MiniLM
teacher, and a smoke run of train / reproduce / bench with a tiny random BERT teacher in the real checkpoint layout."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn import functional as F

from common.config import ConfigError
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.vocab_kd.data import check_data, generated_corpus, label_of, passages_of, read_text_folder
from pipelines.vocab_kd.model import (
    IGNORE,
    SharedProjection,
    SpecialIds,
    build_batch,
    build_student,
    distillation_loss,
    dual_mlm_loss,
    hidden_projection_loss,
    load_teacher,
    mixed_sequence,
    normalise_and_split,
    packaged_teacher_path,
    resolve_teacher_path,
    segment_words,
    train_wordpiece,
    weight_projection_loss,
    word_means,
)

TEXTS = list(generated_corpus(3, 600, seed=0).values())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A randomly initialised 2-layer BERT saved as a checkpoint folder (config.json, model.safetensors, vocab.txt), with
    a WordPiece vocabulary of the generated corpus and no MLM head, as all-MiniLM-L6-v2 has none."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("teacher")
    vocab = train_wordpiece(TEXTS, 300, 100, 1)
    vocab.save_model(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return folder


# -- vocabularies and segmentation ----------------------------------------------------------------------------------
def test_student_tokenizer_round_trips_text_and_respects_its_size():
    tokenizer = train_wordpiece(TEXTS, 150, 100, 2)
    assert tokenizer.get_vocab_size() <= 150 and SpecialIds.of(tokenizer).pad == 0
    text = "The Stormy CAPTAIN harpooned beyond the harbours; Anna sailed!"
    encoding = tokenizer.encode(text)
    assert "[UNK]" not in encoding.tokens and any(t.startswith("##") for t in encoding.tokens)  # words split into pieces
    assert tokenizer.decode(encoding.ids) == " ".join(normalise_and_split(text)).replace(" !", "!")  # cleanup glues "!" back, not ";"
    # word by word: the pieces of each word spell it
    words = normalise_and_split(text)
    for word, pieces in zip(words, segment_words(tokenizer, words)):
        assert "".join(tokenizer.id_to_token(i).removeprefix("##") for i in pieces) == word


def test_student_vocabulary_is_the_same_in_another_process():
    """HF's trainer numbered the ## forms in hash-map order, which changes per process: before train_wordpiece fixed
    their order, 5 processes gave 5 different vocabularies of this corpus (ids or tokens)."""
    import subprocess
    import sys

    script = (
        "import json; from tests.pipelines.test_vocab_kd import TEXTS; from pipelines.vocab_kd.model import train_wordpiece; "
        "print(json.dumps(train_wordpiece(TEXTS, 150, 100, 2).get_vocab(), sort_keys=True))"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert json.loads(other.stdout) == train_wordpiece(TEXTS, 150, 100, 2).get_vocab()


def test_teacher_head_cache_is_keyed_by_the_student_vocabulary(home, tiny_teacher):
    """The head's batches mask whole words of both segmentations (per-token draws), so a head trained beside another
    student vocabulary is another head: its cache (and the teacher evaluation's) must not be found for this one."""
    from pipelines.vocab_kd.data import TextDataModule
    from pipelines.vocab_kd.module import head_cache_path

    def path(**values):
        # (max_len 64, the default: no passage is cut, so the training text is the same for both vocabularies)
        cfg = compose("vocab_kd", {"preset": "smoke", "data.max_len": 64, "teacher.path": str(tiny_teacher), **values})
        data = TextDataModule(cfg)
        data.setup()
        return head_cache_path(cfg, data)

    assert path() == path() != path(**{"student.vocab_size": compose("vocab_kd", {"preset": "smoke"}).student.vocab_size - 20})


def test_a_student_that_cannot_spell_the_test_words_is_said(home, tiny_teacher, capsys):
    """An alphabet of 1 character: nearly every word one [UNK], an easy token, and a perplexity far below the default's."""
    from pipelines.vocab_kd.data import TextDataModule

    for alphabet in (1000, 1):
        values = {"preset": "smoke", "teacher.path": str(tiny_teacher), "student.limit_alphabet": alphabet}
        TextDataModule(compose("vocab_kd", values)).setup()
        said = capsys.readouterr().err
        assert ("of the test words are [UNK] to the student" in said) == (alphabet == 1), said
    assert re.search(r"notice: 100 % of the test words are \[UNK\] .*student.limit_alphabet=1\): its perplexity is not", said)


def test_vocabulary_below_the_alphabet_is_one_line():
    with pytest.raises(ConfigError) as err:
        train_wordpiece(TEXTS, 20, 100, 2)
    assert re.fullmatch(r"student.vocab_size=20 is below the alphabet size of the corpus \(\d+ = 5 special tokens \+ \d+ characters \+ \d+ ## forms\); "
                        r"raise student.vocab_size or lower student.limit_alphabet", str(err.value))  # fmt: skip


def test_mixed_sequence_segments_whole_words_with_one_vocabulary():
    ids, flags, words = mixed_sequence([[10], [11, 12], [13]], [[5, 6], [7], [8, 9]], [True, False, True], cls_id=1, sep_id=2)
    assert ids == [1, 5, 6, 11, 12, 8, 9, 2]
    assert flags == [0, 1, 1, 0, 0, 1, 1, 0]
    assert words == [-1, 0, 0, 1, 1, 2, 2, -1]


def test_build_batch_keeps_word_alignment_and_pairs_identical_pieces_for_distillation():
    t_ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, size=100)
    s_ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, size=50)
    passages = [([[10 + w] * (1 + w % 2) for w in range(7)], [[20 + w] * (1 + (w + 1) % 3) for w in range(7)]) for _ in range(4)]
    b = build_batch(passages, t_ids, s_ids, mix_prob=0.5, mask_prob=0.4, generator=torch.Generator().manual_seed(3))
    for r, (pieces_t, pieces_s) in enumerate(passages):
        original = torch.where(b["t_labels"][r] != IGNORE, b["t_labels"][r], b["t_ids"][r])
        for w in range(7):
            at = b["t_words"][r] == w
            chosen = pieces_s[w] if b["t_flags"][r][at].all() else pieces_t[w]
            assert b["t_flags"][r][at].unique().numel() == 1  # one vocabulary per word
            assert original[at].tolist() == chosen
            s_at = b["s_words"][r] == w
            assert torch.where(b["s_labels"][r] != IGNORE, b["s_labels"][r], b["s_ids"][r])[s_at].tolist() == pieces_s[w]
            # a word is masked in both sequences or in neither (whole-word masking)
            assert (b["t_labels"][r][at] != IGNORE).all() == (b["s_labels"][r][s_at] != IGNORE).all()
    assert b["t_flags"].sum() > 0 and (b["t_flags"] == 0).logical_and(b["t_words"] >= 0).sum() > 0
    kb, kt, ks = b["kd_index"]
    assert len(kb) > 0 and torch.equal(b["t_labels"][kb, kt], b["s_labels"][kb, ks])  # the same V_s piece at both ends
    assert (b["t_flags"][kb, kt] == 1).all()
    plain = build_batch(passages, t_ids, s_ids, mix_prob=0.0, mask_prob=0.4)
    assert plain["t_flags"].sum() == 0 and plain["kd_index"].shape == (3, 0)


# -- shared projections ----------------------------------------------------------------------------------------------
def test_one_shared_projection_serves_every_layer():
    torch.manual_seed(0)
    projection = SharedProjection(4, 6, "up")
    assert [n for n, _ in projection.named_parameters()] == ["U", "V"]
    used = []
    original = projection.hidden
    projection.hidden = lambda h_t, h_s: (used.append(projection.V), original(h_t, h_s))[1]
    layers = 3
    t_hidden = tuple(torch.randn(2, 5, 6) for _ in range(layers + 1))
    s_hidden = tuple(torch.randn(2, 4, 4, requires_grad=True) for _ in range(layers + 1))
    t_words = torch.tensor([[-1, 0, 1, 1, -1], [-1, 0, 0, 1, 2]])
    s_words = torch.tensor([[-1, 0, 1, -1], [-1, 0, 1, 2]])
    loss = hidden_projection_loss(projection, t_hidden, s_hidden, t_words, s_words)
    assert len(used) == layers and all(v is projection.V for v in used)  # identity, not equal copies
    loss.backward()
    # the shared V's gradient is the sum of each layer's: check against per-layer recomputation
    grads = []
    for layer in range(1, layers + 1):
        v = projection.V.detach().clone().requires_grad_(True)
        w_t, p_t = word_means(t_hidden[layer], t_words, 3)
        w_s, p_s = word_means(s_hidden[layer].detach(), s_words, 3)
        both = p_t & p_s
        (((w_t[both] - w_s[both] @ v.T) ** 2).mean() / layers).backward()
        grads.append(v.grad)
    assert torch.allclose(projection.V.grad, sum(grads), atol=1e-6)
    assert projection.U.grad is None  # the up reading does not use U


def test_word_means_and_weight_projection_match_hand_computation():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [9.0, 9.0]]])
    means, present = word_means(hidden, torch.tensor([[-1, 0, 0, 1]]), 3)
    assert means[0].tolist() == [[4.0, 3.0], [9.0, 9.0], [0.0, 0.0]] and present[0].tolist() == [True, True, False]

    teacher = build_student(30, 6, 2, 3, 16).bert
    student = build_student(30, 4, 2, 2, 16).bert
    for direction in ("up", "down"):
        projection = SharedProjection(4, 6, direction)
        terms = []
        for lt, ls in zip(teacher.encoder.layer, student.encoder.layer):
            for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
                wt, ws = lt.get_submodule(name).weight, ls.get_submodule(name).weight
                if direction == "up":
                    terms.append(((wt - projection.V @ ws @ projection.V.T) ** 2).sum() / wt.numel())
                else:
                    terms.append(((projection.U @ wt @ projection.U.T - ws) ** 2).sum() / ws.numel())
        expected = sum(terms) / len(terms)
        assert float(weight_projection_loss(projection, teacher, student).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# -- losses ------------------------------------------------------------------------------------------------------------
def test_distillation_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    for tau in (1.0, 2.0):
        hand = 0.0
        for zs, zt in zip(s.tolist(), t.tolist()):
            ps = [math.exp(v / tau) / sum(math.exp(u / tau) for u in zs) for v in zs]
            pt = [math.exp(v / tau) / sum(math.exp(u / tau) for u in zt) for v in zt]
            hand += sum(q * math.log(q / p) for q, p in zip(pt, ps))
        assert float(distillation_loss(s, t, tau)) == pytest.approx(hand / 2 * tau**2, rel=1e-5)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_dual_mlm_loss_scores_each_token_with_its_own_vocabulary():
    torch.manual_seed(0)
    head_t, head_s = torch.nn.Linear(4, 7), torch.nn.Linear(4, 3)
    h = torch.randn(1, 4, 4)
    labels = torch.tensor([[IGNORE, 5, 2, 1]])
    flags = torch.tensor([[0, 0, 1, 1]])
    hand = -(F.log_softmax(head_t(h[0, 1]), -1)[5] + F.log_softmax(head_s(h[0, 2]), -1)[2] + F.log_softmax(head_s(h[0, 3]), -1)[1]) / 3
    assert float(dual_mlm_loss(h, labels, flags, head_t, head_s)) == pytest.approx(float(hand), rel=1e-5)


# -- data ----------------------------------------------------------------------------------------------------------------
def test_text_folder_reads_the_english_text_layout(tmp_path):
    (tmp_path / "gutenberg").mkdir()
    (tmp_path / "inaugural").mkdir()
    (tmp_path / "gutenberg" / "austen-emma.txt").write_bytes("Emma Woodhouse, handsome\r\nclever and rich caf\xe9.".encode("latin-1"))
    (tmp_path / "gutenberg" / "austen-sense.txt").write_text("Elinor and Marianne.")
    (tmp_path / "gutenberg" / "README").write_text("not a text file of the corpus")
    (tmp_path / "inaugural" / "1789-Washington.txt").write_text("Fellow citizens of the Senate.")
    texts = read_text_folder(tmp_path)
    assert list(texts) == ["austen", "inaugural"]
    assert texts["austen"] == "Emma Woodhouse, handsome\nclever and rich café.\nElinor and Marianne."
    assert label_of(tmp_path / "state_union" / "1945-Truman.txt") == "state_union"
    items = passages_of(texts, 3, 0, seed=0)
    assert [(p, label) for p, label in items if label == 1] == [("Fellow citizens of", 1)]
    assert len(passages_of({"a": " ".join(["w"] * 30)}, 3, 4, seed=0)) == 4  # per_label caps the draw
    (tmp_path / "inaugural" / "1793-Washington.txt").write_bytes(bytes(range(256)) * 40)  # decodes as Latin-1, is not text
    with pytest.raises(ConfigError, match=r"1793-Washington.txt: \d+ control characters in 10240: not a text file"):
        read_text_folder(tmp_path)
    # UTF-8 with one stray byte: not read as Latin-1 whole ("café" became "cafÃ©")
    (tmp_path / "inaugural" / "1793-Washington.txt").write_bytes("café naïve déjà ".encode() + b"\xff" + b" more.")
    with pytest.raises(ConfigError, match=r"1793-Washington.txt: UTF-8 text with an invalid byte 0xff at offset 20; fix that byte"):
        read_text_folder(tmp_path)
    # Latin-1 that holds a valid UTF-8 pair by chance ("à\xa0»" is E0 A0 BB) is still Latin-1
    (tmp_path / "inaugural" / "1793-Washington.txt").write_bytes("« Voilà\xa0» dit-il, Größe 5×².".encode("latin-1"))
    assert read_text_folder(tmp_path)["inaugural"].endswith("« Voilà\xa0» dit-il, Größe 5×².")
    for path in (tmp_path / "inaugural").iterdir():  # a collection of empty files: the one-label error names them
        path.write_text(" \n")
    with pytest.raises(ConfigError, match=r"gives one label \(austen\) \(2 empty files skipped, e.g. inaugural/1789-Washington.txt\)"):
        read_text_folder(tmp_path)


def test_bad_inputs_are_one_line(tmp_path, tiny_teacher):
    with pytest.raises(ConfigError, match=r"holds no text files; expected layout: <root>/<collection>/\*.txt"):
        read_text_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"^label 'sea' has only 0 passages of 5000 words: too few for train/val/test$"):
        check_data(compose("vocab_kd", {"preset": "smoke", "data.passage_words": 5000}).data)  # the generated corpus, before a run
    no_weights = tmp_path / "teacher"
    no_weights.mkdir()
    for name in ("config.json", "vocab.txt"):
        (no_weights / name).write_bytes((tiny_teacher / name).read_bytes())
    with pytest.raises(
        ConfigError, match=re.escape(f"teacher.path {no_weights} lacks model.safetensors; expected layout: <folder>/config.json")
    ):
        resolve_teacher_path(str(no_weights))
    import json

    from pipelines.vocab_kd.model import load_teacher

    odd = tmp_path / "odd_teacher"
    odd.mkdir()
    for file in tiny_teacher.iterdir():
        (odd / file.name).write_bytes(file.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "hidden_size": 10, "num_attention_heads": 3}))
    with pytest.raises(ConfigError, match=r"does not load as a BERT model \(ValueError: The hidden size \(10\) is not a multiple"):
        load_teacher(odd)
    with pytest.raises(ConfigError, match="config key 'dual.mix_prob' must be in \\[0, 1\\], got 1.5"):
        compose("vocab_kd", {"dual.mix_prob": 1.5})
    from pipelines.vocab_kd.module import VocabKDModule

    with pytest.raises(ConfigError, match="data.name=text_folder needs data.root=<folder>"):
        VocabKDModule.check_config(compose("vocab_kd", {"data.name": "text_folder"}))
    with pytest.raises(ConfigError, match=r"^data.max_len=65 exceeds the teacher's 64 positions; give at most 64$"):  # was: a FAILED run
        VocabKDModule.check_config(compose("vocab_kd", {"data.max_len": 65, "teacher.path": str(tiny_teacher)}))


def test_cli_bad_teacher_path_and_empty_corpus_are_one_line(home, tmp_path):
    with pytest.raises(ConfigError) as err:  # (the command line prints a ConfigError as one line, exit 2: tests/test_config.py)
        train("vocab_kd", [f"teacher.path={tmp_path}"])
    assert str(err.value) == (
        f"teacher.path {tmp_path} lacks config.json, vocab.txt, model.safetensors; expected layout: "
        "<folder>/config.json (a BERT config), <folder>/model.safetensors (or pytorch_model.bin), <folder>/vocab.txt"
    )
    from pipelines.vocab_kd.module import VocabKDModule

    (tmp_path / "gutenberg").mkdir()  # a corpus folder without text files: refused before any run opens
    with pytest.raises(
        ConfigError, match=re.escape(f"data.root {tmp_path} holds no text files; expected layout: <root>/<collection>/*.txt")
    ):
        VocabKDModule.check_config(compose("vocab_kd", {"data.name": "text_folder", "data.root": str(tmp_path)}))


def test_packaged_minilm_teacher_loads_offline():
    from safetensors.torch import load_file

    folder = packaged_teacher_path()
    teacher, head, tokenizer = load_teacher(resolve_teacher_path("packaged"))
    assert head is None and tokenizer.get_vocab_size() == 30522
    assert (teacher.config.hidden_size, teacher.config.num_hidden_layers) == (384, 6)
    assert sum(p.numel() for p in teacher.parameters()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler
    stored = load_file(str(folder / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.5.attention.self.query.weight"))
    assert torch.equal(teacher.encoder.layer[5].attention.self.query.weight, stored[key])


# -- smoke runs through the command line's path ------------------------------------------------------------------------
def test_train_smoke_logs_metrics_and_caches_the_teacher_head(home, tiny_teacher):
    (first,) = train("vocab_kd", ["preset=smoke", f"teacher.path={tiny_teacher}"])
    wanted = {"test/student_ppl", "test/teacher_ppl", "test/embed_cosine", "test/sim_spearman", "test/student_probe_acc",
              "size/student_mb_fp32", "size/ratio_vs_teacher"}  # fmt: skip
    assert wanted <= set(first.metrics)
    assert first.metrics["test/student_ppl"] == pytest.approx(math.exp(first.metrics["test/student_mlm_loss"]), rel=1e-4)
    assert first.metrics["size/student_mb_fp32"] == pytest.approx(first.metrics["size/student_params"] * 4 / 1e6)
    cached = list((home / "cache" / "vocab_kd").glob("mlm-head-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    # freeze=[…] passes the check on the skeleton (before the run) and is applied to the networks setup built
    (frozen,) = train("vocab_kd", ["preset=smoke", f"teacher.path={tiny_teacher}", "seed=1", "proj.reading=weights", "proj.direction=down",
                                   "freeze=[mixed.up]"])  # fmt: skip
    client = MlflowClient(tracking_uri=tracking_uri(first.config))
    a, b = (client.get_run(r.run_id).data.metrics for r in (first, frozen))
    up = compose("vocab_kd", {"preset": "smoke"}).student.hidden * 32 + 32  # d_s → the tiny teacher's 32, weight and bias
    assert b["memory/frozen_params"] - a["memory/frozen_params"] == up
    assert [p.stat().st_mtime_ns for p in (home / "cache" / "vocab_kd").glob("mlm-head-*.pt")] == [stamp]  # read, not retrained
    assert client.get_run(first.run_id).data.tags["vocab_kd.teacher_head"] == "trained briefly (checkpoint has none)"
    # the first run built the head cache, this one reads it: the same run (its teacher had dropout on before)
    (again,) = train("vocab_kd", ["preset=smoke", f"teacher.path={tiny_teacher}"])
    learnt = lambda metrics: {k: v for k, v in metrics.items() if k.startswith(("train/", "val/", "test/"))}  # noqa: E731
    assert learnt(client.get_run(again.run_id).data.metrics) == learnt(a) != {}


def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("vocab_kd")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def test_reproduce_smoke_runs_the_ablation_and_tabulates_it(home, tiny_teacher):
    result = run_experiment("reproduce", "vocab_kd", ["preset=smoke", f"teacher.path={tiny_teacher}"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    cells = sorted((c["dual.enabled"], c["proj.enabled"]) for c in _children(result))
    assert cells == [(False, False), (False, True), (True, False), (True, True)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[:3] == ["16", "on", "on"]]
    child = next(c for c in _children(result) if c["dual.enabled"] and c["proj.enabled"])
    assert row[3] == f"{child['size/student_mb_fp32']:.2f}" and row[-1] == "1"


def test_bench_smoke_measures_student_and_teacher_in_one_run(home, tiny_teacher):
    result = run_experiment("bench", "vocab_kd", ["preset=smoke", f"teacher.path={tiny_teacher}"])
    assert (result.status, result.total) == ("FINISHED", 1), result.report
    (child,) = _children(result)
    assert child["infer_speedup"] == pytest.approx(child["student_infer_tokens_per_s"] / child["teacher_infer_tokens_per_s"])
    assert child["size/ratio_vs_teacher"] == pytest.approx(child["size/teacher_params"] / child["size/student_params"])


def test_the_held_out_loss_adds_every_ranks_share_before_dividing():
    """Under DDP each rank sums the loss over its share of the split; the logged mean is over all of them (it was rank
    0's share alone). Here a second rank holds a loss sum of 30 over 10 masked words against this rank's 10 over 10."""
    from types import SimpleNamespace

    from pipelines.vocab_kd.module import VocabKDModule

    other = torch.tensor([30.0, 10.0], dtype=torch.float64)
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t + other if reduce_op == "sum" else None)
    rank = SimpleNamespace(_sums={"s_loss": 10.0, "s_n": 10}, device=torch.device("cpu"), trainer=SimpleNamespace(strategy=strategy))
    assert VocabKDModule._held_out_loss(rank) == pytest.approx(2.0)


def test_a_trained_teacher_takes_its_own_learning_rate(home):
    (result,) = train("vocab_kd", ["preset=smoke", "dual.train_teacher=true", "optim.teacher_lr=1e-9"])
    (frozen,) = train("vocab_kd", ["preset=smoke"])
    # at a vanishing rate the trained teacher stays the frozen one (its perplexity to 4 digits; at the student's
    # rate it moved from 11333 to 4840 in three steps)
    assert result.metrics["test/teacher_ppl"] == pytest.approx(frozen.metrics["test/teacher_ppl"], rel=1e-3)


def _english_text(root: Path) -> Path:
    """A tiny ../shared/data/english_text: two collections (the labels) of two books each, 600 words a book."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = {"gutenberg": ["whale", "sea", "ship", "captain", "the", "a"], "inaugural": ["nation", "people", "union", "the", "a"]}
    for folder, vocab in words.items():
        (root / folder).mkdir(parents=True)
        for author in ("one", "two"):
            (root / folder / f"{author}-book.txt").write_text(" ".join(rng.choice(vocab, 600)) + ".")
    return root


def _english_text_overrides(teacher: Path, root: Path) -> list[str]:
    """The smoke preset, and the text experiments' steps, passages and fit passages cut to a few."""
    return ["preset=smoke", f"teacher.path={teacher}", f"root={root}", "trainer.max_steps=4", "teacher.head.steps=4",
            "data.per_label=30", "metrics.fit_passages=20"]  # fmt: skip


@pytest.mark.slow  # ~30 s; the text folder's reader: test_text_folder_reads_the_english_text_layout
def test_english_text_experiment_smoke_on_a_text_folder_fixture(home, tiny_teacher, tmp_path):
    overrides = _english_text_overrides(tiny_teacher, _english_text(tmp_path / "text"))
    result = run_experiment("reproduce", "vocab_kd", ["experiment=english_text", *overrides])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    children = _children(result)
    assert all(c["test/student_ppl"] > 1 and c["test/teacher_ppl"] > 1 for c in children)
    assert sorted((c["dual.enabled"], c["proj.enabled"]) for c in children) == [(False, False), (False, True), (True, False), (True, True)]


def test_english_text_long_experiment_smoke_on_a_text_folder_fixture(home, tiny_teacher, tmp_path):
    """experiment=english_text_long: its grid's two points (the 48-wide student alone, and with dual training and
    shared projections) on the text folder fixture."""
    root = _english_text(tmp_path / "text")
    result = run_experiment("reproduce", "vocab_kd", ["experiment=english_text_long", *_english_text_overrides(tiny_teacher, root)])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    children = _children(result)
    assert sorted((c["student.hidden"], c["dual.enabled"], c["proj.enabled"]) for c in children) == [(48, False, False), (48, True, True)]
    client = MlflowClient(tracking_uri=tracking_uri(compose("vocab_kd")))
    for child in children:  # each read the fixture's two collections, not the generated books
        params = client.get_run(child["_run_id"]).data.params
        assert (params["data.name"], params["data.root"]) == ("text_folder", str(root))
        assert child["test/student_ppl"] > 1 and child["test/teacher_ppl"] > 1 and math.isfinite(child["test/embed_cosine"])
        assert 0 <= child["test/student_probe_acc"] <= 1
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    assert sorted(r[:3] for r in rows if r[0] == "48") == [["48", "off", "off"], ["48", "on", "on"]]
    (row,) = [r for r in rows if r[:3] == ["48", "on", "on"]]
    child = next(c for c in children if c["dual.enabled"])
    assert row[3] == f"{child['size/student_mb_fp32']:.2f}" and row[-1] == "1"
