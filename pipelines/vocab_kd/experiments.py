"""One grid point of the vocab_kd bench (the reproduce children are ordinary ``lightyard train`` runs; grids and tables are
in conf/vocab_kd.yaml).

``speed_point`` measures, in one process and interleaved round by round, the student of width ``bench.size`` against the
teacher on the same passages, each model reading them in its own segmentation: inference (forward, no gradient) and
training (forward + MLM loss + backward + AdamW) tokens/s, and the size table (parameters, MB in fp32 / fp16, ratios)."""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from common.hardware import resolve_accelerator, timed
from common.tracking import Tracker
from pipelines.vocab_kd.data import TextDataModule
from pipelines.vocab_kd.model import BERT_BASE_PARAMS, build_student, load_teacher, size_of, teacher_mlm_head


def _ids(pieces: list[list[list[int]]], cls_id: int, sep_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[cls_id] + [i for word in p for i in word] + [sep_id] for p in pieces]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    return ids, (ids != pad_id).long()


def speed_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Tokens/s of student and teacher, inference and training, and their ratios (target: 48-wide student ≥ 10 × teacher)."""
    b = cfg.bench
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    bf16 = device.type == "cuda"
    data = TextDataModule(cfg)
    data.setup()
    teacher, _, _ = load_teacher(data.teacher_path)
    head_t = teacher_mlm_head(teacher)
    # the configured |V_s| (4,928) even where the corpus yields fewer tokens (the generated one: ~740): sizes and the
    # output softmax as the method has them
    vocab = max(data.student_ids.size, int(cfg.student.vocab_size))
    student = build_student(
        vocab, int(b.size), teacher.config.num_hidden_layers, cfg.student.head_dim, cfg.data.max_len
    )  # fmt: skip  (passages already fit max_len tokens in both segmentations)
    passages = (data.splits["train"] * (1 + b.batch_size // max(len(data.splits["train"]), 1)))[: b.batch_size]
    words_t = [p.pieces_t[: b.seq_words] for p in passages]
    words_s = [p.pieces_s[: b.seq_words] for p in passages]
    t_ids, t_mask = _ids(words_t, data.teacher_ids.cls, data.teacher_ids.sep, data.teacher_ids.pad)
    s_ids, s_mask = _ids(words_s, data.student_ids.cls, data.student_ids.sep, data.student_ids.pad)
    tokens = {"teacher": int(t_mask.sum()), "student": int(s_mask.sum())}
    words = sum(len(w) for w in words_s)
    t_ids, t_mask, s_ids, s_mask = (x.to(device) for x in (t_ids, t_mask, s_ids, s_mask))
    teacher.to(device)
    head_t.to(device)
    student.to(device)
    optimizers = {
        "teacher": torch.optim.AdamW(list({id(p): p for p in [*teacher.parameters(), *head_t.parameters()]}.values()), lr=1e-5),
        "student": torch.optim.AdamW(student.parameters(), lr=1e-4),
    }

    def step(who: str, train: bool) -> Callable[[], None]:
        ids, mask = (t_ids, t_mask) if who == "teacher" else (s_ids, s_mask)

        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
                if who == "teacher":
                    logits = head_t(teacher(input_ids=ids, attention_mask=mask).last_hidden_state)
                else:
                    logits = student(input_ids=ids, attention_mask=mask).logits
                if not train:
                    return
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), ignore_index=0)
            optimizers[who].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[who].step()

        return run

    kinds = [(who, mode) for mode in ("infer", "train") for who in ("student", "teacher")]
    best = {kind: float("inf") for kind in kinds}
    for round_ in range(int(b.repeats) + 1):  # round 0 warms up
        for who, mode in kinds:
            (teacher if who == "teacher" else student).train(mode == "train")
            seconds, _ = timed(step(who, mode == "train"), device, int(b.steps))
            if round_ > 0:
                best[(who, mode)] = min(best[(who, mode)], seconds)
    out = {f"{who}_{mode}_tokens_per_s": tokens[who] * b.steps / s for (who, mode), s in best.items()}
    out.update(
        infer_speedup=out["student_infer_tokens_per_s"] / out["teacher_infer_tokens_per_s"],
        infer_speedup_words=best[("teacher", "infer")] / best[("student", "infer")],
        train_speedup=out["student_train_tokens_per_s"] / out["teacher_train_tokens_per_s"],
        student_tokens_per_word=tokens["student"] / words,
        teacher_tokens_per_word=tokens["teacher"] / words,
        torch_threads=float(torch.get_num_threads()),
    )
    s, t = size_of(student.bert), size_of(teacher)
    out.update({"size/student_params": s["params"], "size/student_mb_fp32": s["mb_fp32"], "size/student_mb_fp16": s["mb_fp16"],
                "size/teacher_params": t["params"], "size/teacher_mb_fp32": t["mb_fp32"],
                "size/ratio_vs_teacher": t["params"] / s["params"], "size/ratio_vs_bert_base": BERT_BASE_PARAMS / s["params"]})  # fmt: skip
    print(
        f"d_s={b.size}: inference {out['student_infer_tokens_per_s']:.0f} vs teacher {out['teacher_infer_tokens_per_s']:.0f} tok/s "
        f"({out['infer_speedup']:.1f}×; {out['infer_speedup_words']:.1f}× in words/s); training {out['train_speedup']:.1f}×; "
        f"{s['params'] / 1e6:.2f} M params, {s['mb_fp32']:.2f} MB fp32, {out['size/ratio_vs_teacher']:.1f}× smaller than the teacher",
        flush=True,
    )
    return out
