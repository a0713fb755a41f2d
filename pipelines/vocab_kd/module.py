"""Lightning glue of vocab_kd: the teacher (with its briefly trained MLM head, cached by a hash of its settings and the
training text), the student, simultaneous training (student MLM + dual training of the teacher + soft-target distillation +
shared-projection loss), and the held-out metrics: MLM loss/perplexity, sizes and ratios, sentence-embedding agreement
and the book-classification probe."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from common.cache import MISSING, cache_file, cached, read_cached, save_atomic
from common.config import ConfigError
from common.data import fit_state_dict
from common.hardware import check_finite_length, total_steps
from pipelines.vocab_kd.data import Passage, TextDataModule, check_data
from pipelines.vocab_kd.model import (
    BERT_BASE_PARAMS,
    IGNORE,
    MixedEmbedding,
    SharedProjection,
    StudentVocabHead,
    build_batch,
    build_student,
    distillation_loss,
    dual_mlm_loss,
    hidden_projection_loss,
    load_teacher,
    masked_mean_pool,
    resolve_teacher_path,
    size_of,
    teacher_config,
    teacher_mlm_head,
    weight_projection_loss,
)

READINGS = ("hidden", "weights")


# -- the teacher's MLM head -----------------------------------------------------------------------------------------
def head_cache_path(cfg: DictConfig, data: TextDataModule) -> Path:
    folder = resolve_teacher_path(cfg.teacher.path)
    weights = folder / "model.safetensors"
    weights = weights if weights.is_file() else folder / "pytorch_model.bin"
    key = {"teacher": str(folder.resolve()), "bytes": weights.stat().st_size, "head": OmegaConf.to_container(cfg.teacher.head, resolve=True),
           "mask_prob": cfg.dual.mask_prob, "data": data.identity()}  # fmt: skip
    return cache_file(cfg, "vocab_kd", "mlm-head", key)


def train_mlm_head(cfg: DictConfig, data: TextDataModule, teacher, head, device: torch.device) -> dict:
    """The checkpoint has no MLM head: fit BERT's head (transform + bias; decoder tied to the frozen word embeddings) on the
    training passages with the encoder frozen, AdamW, ``teacher.head.steps`` steps. Returns {'state', 'loss'}."""
    from tqdm import tqdm

    h = cfg.teacher.head
    generator = torch.Generator().manual_seed(h.seed)
    teacher.to(device).eval()
    head.to(device).train()
    params = [p for n, p in head.named_parameters() if not n.endswith("decoder.weight")]
    opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=0.0)
    passages = data.splits["train"]
    history = []
    bar = tqdm(range(h.steps), desc="teacher MLM head (encoder frozen)", unit="step", disable=not cfg.trainer.enable_progress_bar)
    for _ in bar:
        pick = torch.randint(len(passages), (h.batch_size,), generator=generator).tolist()
        b = build_batch([(passages[i].pieces_t, passages[i].pieces_s) for i in pick], data.teacher_ids, data.student_ids, 0.0,
                        cfg.dual.mask_prob, generator)  # fmt: skip
        masked = b["t_labels"] != IGNORE
        with torch.no_grad():
            hidden = teacher(input_ids=b["t_ids"].to(device), attention_mask=b["t_mask"].to(device)).last_hidden_state
        loss = F.cross_entropy(head(hidden[masked.to(device)]), b["t_labels"][masked].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    state = {k: v.detach().cpu() for k, v in head.state_dict().items() if not k.endswith("decoder.weight")}
    return {"state": state, "loss": torch.tensor(history)}


def teacher_head(cfg: DictConfig, data: TextDataModule, teacher, checkpoint_head: dict | None, device: torch.device):
    """The MLM head over V_t: the checkpoint's if it has one, else trained briefly once and cached. Returns (head, note)."""
    head = teacher_mlm_head(teacher)
    if checkpoint_head is not None:
        head.load_state_dict(checkpoint_head, strict=False)
        return head, None
    tied = tuple(k for k in head.state_dict() if k.endswith("decoder.weight"))  # the teacher's embedding: not cached

    def check(result: dict) -> None:  # a file this version did not build is built again (common.cache)
        fit_state_dict(head, result["state"], "teacher MLM head", optional=tied, load=False)
        result["loss"].reshape(-1)

    result = cached(head_cache_path(cfg, data), lambda: train_mlm_head(cfg, data, teacher, head, device), "teacher MLM head", check=check)
    head.load_state_dict(result["state"], strict=False)
    return head, result["loss"]


# -- downstream ------------------------------------------------------------------------------------------------------
def embedding_agreement(s_fit, t_fit, s_test, t_test) -> dict[str, float]:
    """Cosine between the teacher's sentence embedding and the student's mapped into the teacher's space (a least-squares
    affine map fitted on the fit passages), and Spearman between the two models' cosine similarities over all test pairs."""
    from torchmetrics.functional import spearman_corrcoef

    ones = lambda x: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # noqa: E731
    mapping = torch.linalg.lstsq(ones(s_fit).double(), t_fit.double()).solution
    mapped = (ones(s_test).double() @ mapping).float()
    cosine = F.cosine_similarity(mapped, t_test, dim=1).mean()
    i, j = torch.triu_indices(len(s_test), len(s_test), 1)
    sim_s = F.cosine_similarity(s_test[i], s_test[j], dim=1)
    sim_t = F.cosine_similarity(t_test[i], t_test[j], dim=1)
    return {"embed_cosine": float(cosine), "sim_spearman": float(spearman_corrcoef(sim_s, sim_t))}


def probe_accuracy(x_fit, y_fit, x_test, y_test) -> float:
    """Book classification from frozen sentence embeddings: a standardised logistic-regression probe (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torchmetrics.functional.classification import multiclass_accuracy

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(x_fit.numpy(), y_fit.numpy())
    classes = int(max(y_fit.max(), y_test.max())) + 1
    pred = torch.as_tensor(probe.predict(x_test.numpy()))
    return float(multiclass_accuracy(pred, y_test, classes, average="micro"))


def student_parts(cfg: DictConfig, teacher, vocab_size: int) -> dict[str, torch.nn.Module]:
    """The student and the modules between it and the teacher, in the order setup registers them."""
    student = build_student(vocab_size, cfg.student.hidden, teacher.config.num_hidden_layers, cfg.student.head_dim, cfg.data.max_len)
    parts = {"student": student}
    e_s, d_t = student.bert.embeddings.word_embeddings, teacher.config.hidden_size
    if cfg.dual.enabled:
        parts["mixed"] = MixedEmbedding(teacher.embeddings.word_embeddings, e_s)
        parts["head_s"] = StudentVocabHead(d_t, e_s)
    if cfg.proj.enabled:
        parts["projection"] = SharedProjection(cfg.student.hidden, d_t, cfg.proj.direction)
    return parts


class VocabKDModule(pl.LightningModule):
    """Student (V_s, width d_s) trained with the teacher at once; the teacher's body stays frozen unless
    ``dual.train_teacher`` (CPU budgets: dual training then shapes E_s, the up-projection and the V_s softmax through it)."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_finite_length(cfg.trainer, "vocab_kd's learning-rate schedule")
        check_data(cfg.data)
        positions = teacher_config(resolve_teacher_path(cfg.teacher.path)).get("max_position_embeddings", 512)
        if cfg.data.max_len > positions:  # (the teacher reads the same sequences)
            raise ConfigError(f"data.max_len={cfg.data.max_len} exceeds the teacher's {positions} positions; give at most {positions}")
        if cfg.proj.reading not in READINGS:
            raise ConfigError(f"unknown proj.reading '{cfg.proj.reading}'; valid: {', '.join(READINGS)}")
        widths = {"student.hidden": cfg.student.hidden}
        if cfg.experiment and cfg.experiments[cfg.experiment].command == "bench":  # a bench point's student has its own width
            widths["bench.sizes entry"] = cfg.bench.size
        for key, hidden in widths.items():
            if hidden % cfg.student.head_dim:
                raise ConfigError(f"{key}={hidden} must be a multiple of student.head_dim={cfg.student.head_dim}")

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (setup builds the networks for the data's vocabularies): the teacher
        from its config.json, the student for a placeholder vocabulary, in setup's order (shared tensors keep the name
        they are first registered under)."""
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(str(resolve_teacher_path(cfg.teacher.path)), local_files_only=True)
        teacher = BertModel(config, add_pooling_layer=False)
        return torch.nn.ModuleDict({"head_t": teacher_mlm_head(teacher), "teacher": teacher, **student_parts(cfg, teacher, 8)})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.student = None
        self.strict_loading = False  # the frozen teacher is not saved in checkpoints (it is rebuilt from its folder)

    # -- build -------------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.student is not None:
            return
        cfg = self.cfg
        data: TextDataModule = self.trainer.datamodule
        self.teacher_ids, self.student_ids = data.teacher_ids, data.student_ids
        teacher, checkpoint_head, _ = load_teacher(data.teacher_path)
        self.head_t, self.head_loss = teacher_head(cfg, data, teacher, checkpoint_head, self.trainer.strategy.root_device)
        self.teacher = teacher
        train_teacher = cfg.dual.enabled and cfg.dual.train_teacher
        # a frozen teacher without dropout, whether or not the head was just trained (which left it in eval mode:
        # Lightning keeps each submodule's mode, so a run that loaded the cached head trained against a dropout teacher)
        self.teacher.train(train_teacher)
        for p in [*self.teacher.parameters(), *self.head_t.parameters()]:
            p.requires_grad_(train_teacher)
        for name, part in student_parts(cfg, teacher, self.student_ids.size).items():
            setattr(self, name, part)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if not (self.cfg.dual.enabled and self.cfg.dual.train_teacher):
            prefix = kwargs.get("prefix", "")
            for key in [k for k in state if k.startswith((f"{prefix}teacher.", f"{prefix}head_t."))]:
                del state[key]
        return state

    # -- training ----------------------------------------------------------------------------------------------------
    def _batch(self, passages: list[Passage], mix_prob: float, generator=None) -> dict[str, torch.Tensor]:
        b = build_batch([(p.pieces_t, p.pieces_s) for p in passages], self.teacher_ids, self.student_ids, mix_prob,
                        self.cfg.dual.mask_prob, generator)  # fmt: skip
        return {k: v.to(self.device) for k, v in b.items()}

    def _teacher_forward(self, b: dict, mixed: bool, hidden_states: bool):
        if mixed:
            embeds = self.mixed(b["t_ids"], b["t_flags"])
            return self.teacher(inputs_embeds=embeds, attention_mask=b["t_mask"], output_hidden_states=hidden_states)
        with torch.set_grad_enabled(self.training and self.cfg.dual.train_teacher and self.cfg.dual.enabled):
            return self.teacher(input_ids=b["t_ids"], attention_mask=b["t_mask"], output_hidden_states=hidden_states)

    def training_step(self, passages: list[Passage], batch_idx: int):
        cfg = self.cfg
        dual, proj = cfg.dual.enabled, cfg.proj.enabled
        b = self._batch(passages, cfg.dual.mix_prob if dual else 0.0)
        s_out = self.student(input_ids=b["s_ids"], attention_mask=b["s_mask"], output_hidden_states=True)
        losses = {"student_mlm": F.cross_entropy(s_out.logits.flatten(0, 1), b["s_labels"].flatten(), ignore_index=IGNORE)}
        t_out = None
        if dual or (proj and cfg.proj.reading == "hidden"):
            t_out = self._teacher_forward(b, mixed=dual, hidden_states=proj and cfg.proj.reading == "hidden")
        if dual:
            h_t = t_out.last_hidden_state
            losses["dual_mlm"] = dual_mlm_loss(h_t, b["t_labels"], b["t_flags"], self.head_t, self.head_s)
            kb, kt, ks = b["kd_index"]
            t_logits = self.head_s(h_t[kb, kt])
            losses["kd"] = distillation_loss(s_out.logits[kb, ks], t_logits, cfg.loss.temperature)
        if proj:
            if cfg.proj.reading == "hidden":
                losses["proj"] = hidden_projection_loss(
                    self.projection, t_out.hidden_states, s_out.hidden_states, b["t_words"], b["s_words"]
                )
            else:
                losses["proj"] = weight_projection_loss(self.projection, self.teacher, self.student.bert)
        weights = {"student_mlm": 1.0, "dual_mlm": cfg.loss.dual_weight, "kd": cfg.loss.kd_weight, "proj": cfg.loss.proj_weight}
        loss = sum(weights[k] * v for k, v in losses.items())
        n = len(passages)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        for key, value in losses.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=n)
        return loss

    # -- evaluation --------------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._sums = {"s_loss": 0.0, "s_n": 0}

    on_test_epoch_start = on_validation_epoch_start

    def _eval_step(self, passages: list[Passage], batch_idx: int) -> None:
        # fixed masks: the held-out loss of every run is over the same masked words
        b = self._batch(passages, 0.0, torch.Generator().manual_seed(10_007 * self.cfg.data.seed + batch_idx))
        logits = self.student(input_ids=b["s_ids"], attention_mask=b["s_mask"]).logits
        masked = b["s_labels"] != IGNORE
        self._sums["s_loss"] += float(F.cross_entropy(logits[masked], b["s_labels"][masked], reduction="sum"))
        self._sums["s_n"] += int(masked.sum())

    def validation_step(self, passages, batch_idx):
        self._eval_step(passages, batch_idx)

    def test_step(self, passages, batch_idx):
        self._eval_step(passages, batch_idx)  # the teacher's side: teacher_eval (cached while frozen)

    def _held_out_loss(self) -> float:
        """The student's mean MLM loss over the masked words of the whole split: under DDP each rank summed its
        share, so the sums are added across ranks first (a collective: every rank calls it)."""
        sums = torch.tensor([self._sums["s_loss"], self._sums["s_n"]], dtype=torch.float64, device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return float(sums[0] / sums[1].clamp(min=1))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        loss = self._held_out_loss()
        self.log_dict({"val/student_mlm_loss": loss, "val/student_ppl": float(torch.tensor(loss).exp())}, batch_size=1)

    @torch.no_grad()
    def embed(self, passages: list[Passage], who: str) -> torch.Tensor:
        """Mean-pooled last hidden states of the student or the teacher on unmasked passages: [n, d_s] or [n, d_t]."""
        out = []
        size = self.cfg.data.eval_batch_size
        for start in range(0, len(passages), size):
            b = self._batch(passages[start : start + size], 0.0, torch.Generator().manual_seed(0))
            ids = torch.where(b[f"{who}_labels"] != IGNORE, b[f"{who}_labels"], b[f"{who}_ids"])  # undo the masking
            model = self.student.bert if who == "s" else self.teacher
            out.append(masked_mean_pool(model(input_ids=ids, attention_mask=b[f"{who}_mask"]).last_hidden_state, b[f"{who}_mask"]).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def teacher_eval(self, fit: list[Passage], test: list[Passage]) -> dict:
        """The teacher's held-out MLM loss (same fixed masks as the student's) and its embeddings of the fit and test passages;
        cached by the head's cache key while the teacher is frozen (every child of a grid shares them)."""
        data: TextDataModule = self.trainer.datamodule
        frozen = not (self.cfg.dual.enabled and self.cfg.dual.train_teacher)
        key = f"{head_cache_path(self.cfg, data).stem}-{len(fit)}-{self.cfg.data.eval_batch_size}-{self.cfg.data.seed}"
        path = Path(self.cfg.paths.cache_dir) / "vocab_kd" / f"teacher-eval-{key}.pt"

        def check(found: dict) -> None:  # another version's file, or other passages: built again (common.cache)
            width = self.teacher.config.hidden_size
            if found["fit"].shape != (len(fit), width) or found["test"].shape != (len(test), width) or found["loss"].numel() != 1:
                raise ValueError(
                    f"embeddings {tuple(found['fit'].shape)} and {tuple(found['test'].shape)} for {len(fit)} and {len(test)} passages"
                )

        if frozen and (found := read_cached(path, "teacher evaluation", check)) is not MISSING:
            return found
        total, count = 0.0, 0
        size = self.cfg.data.eval_batch_size
        for batch_idx, start in enumerate(range(0, len(test), size)):
            b = self._batch(test[start : start + size], 0.0, torch.Generator().manual_seed(10_007 * self.cfg.data.seed + batch_idx))
            h_t = self.teacher(input_ids=b["t_ids"], attention_mask=b["t_mask"]).last_hidden_state
            masked = b["t_labels"] != IGNORE
            total += float(F.cross_entropy(self.head_t(h_t[masked]), b["t_labels"][masked], reduction="sum"))
            count += int(masked.sum())
        out = {"loss": torch.tensor(total / max(count, 1)), "fit": self.embed(fit, "t"), "test": self.embed(test, "t")}
        if frozen:
            save_atomic(out, path)
        return out

    def on_test_epoch_end(self) -> None:
        data: TextDataModule = self.trainer.datamodule
        train = data.splits["train"]  # (ordered by label: an even stride keeps every label in the fit set)
        fit = [train[i] for i in torch.linspace(0, len(train) - 1, min(self.cfg.metrics.fit_passages, len(train))).long().tolist()]
        test = data.splits["test"]
        teacher = self.teacher_eval(fit, test)
        s_loss = self._held_out_loss()
        t_loss = float(teacher["loss"])
        metrics = {
            "test/student_mlm_loss": s_loss,
            "test/student_ppl": float(torch.tensor(s_loss).exp()),
            "test/teacher_mlm_loss": t_loss,
            "test/teacher_ppl": float(torch.tensor(t_loss).exp()),
        }
        s_fit, t_fit = self.embed(fit, "s"), teacher["fit"]
        s_test, t_test = self.embed(test, "s"), teacher["test"]
        y_fit = torch.tensor([p.label for p in fit])
        y_test = torch.tensor([p.label for p in test])
        metrics.update({f"test/{k}": v for k, v in embedding_agreement(s_fit, t_fit, s_test, t_test).items()})
        metrics["test/student_probe_acc"] = probe_accuracy(s_fit, y_fit, s_test, y_test)
        metrics["test/teacher_probe_acc"] = probe_accuracy(t_fit, y_fit, t_test, y_test)
        metrics.update(self.sizes())
        self.log_dict(metrics, batch_size=1)

    def sizes(self) -> dict[str, float]:
        """Encoders as deployed (embeddings + layers; no pooler, no MLM head) in parameters and MB; ratios against the
        teacher and, by arithmetic, against BERT-base's 109.5 M."""
        s, t = size_of(self.student.bert), size_of(self.teacher)
        return {
            "size/student_params": s["params"],
            "size/student_mb_fp32": s["mb_fp32"],
            "size/student_mb_fp16": s["mb_fp16"],
            "size/teacher_params": t["params"],
            "size/teacher_mb_fp32": t["mb_fp32"],
            "size/ratio_vs_teacher": t["params"] / s["params"],
            "size/ratio_vs_bert_base": BERT_BASE_PARAMS / s["params"],
        }

    def on_fit_start(self) -> None:
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is None or self.global_step > 0:
            return
        tracker.set_tags({"vocab_kd.student_vocab": self.student_ids.size, "vocab_kd.teacher_head":
                          "trained briefly (checkpoint has none)" if self.head_loss is not None else "from the checkpoint"})  # fmt: skip
        if self.head_loss is not None:
            for step, value in enumerate(self.head_loss.tolist()):
                tracker.log_metrics({"teacher_head/loss": value}, step=step)

    def configure_optimizers(self):
        o = self.cfg.optim
        # a trained teacher (dual.train_teacher) starts pretrained: its layers and V_t head take optim.teacher_lr
        teacher = {id(p) for p in [*self.teacher.parameters(), *self.head_t.parameters()]}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in teacher]}]
        if any(id(p) in teacher for p in params):
            groups.append({"params": [p for p in params if id(p) in teacher], "lr": o.teacher_lr})
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        total = max(int(total_steps(self.trainer)), 1)
        warmup = int(o.warmup_fraction * total)

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0 (BERT's schedule)
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}
