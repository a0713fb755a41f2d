"""One grid point of the stg_kd bench, and the reproduce report's extra section (the grids and tables: conf/stg_kd.yaml).

The reproduce children are ordinary ``lightyard train`` runs of :class:`STGKDModule`. ``bench_point`` trains a scene
branch briefly on the embedded clips (so captions have their real lengths, not max_len every time), then decodes the same
test clips by beam search all at once and one clip at a time, interleaved, and compares the captions."""

from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig

from common.hardware import resolve_accelerator, timed
from common.tracking import Tracker, notice
from pipelines.stg_kd.data import VideoCaptionDataModule, collate, CaptionSet
from pipelines.stg_kd.model import beam_search, caption_ce
from pipelines.stg_kd.module import build_model


def _trained_scene_branch(cfg: DictConfig, data: VideoCaptionDataModule, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(data.vocab), data.scene_dim, data.object_dim, data.frames, variant="scene").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    train = CaptionSet(data.splits["train"], data.vocab, int(cfg.data.max_words), pairs=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    for _ in range(int(cfg.trainer.max_epochs)):
        for idx in order.split(int(cfg.data.batch_size)):
            batch = {k: v.to(device) for k, v in collate([train[i] for i in idx.tolist()]).items()}
            loss = caption_ce(model(batch, batch["tokens_in"])["scene"], batch["targets"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def bench_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    b = cfg.bench
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    data = VideoCaptionDataModule(cfg)
    data.setup()
    model = _trained_scene_branch(cfg, data, device)
    cap = model.captioners["scene"]
    test = data.splits["test"]
    n = min(int(b.videos), len(test["ids"]))
    if n < b.videos:
        notice(f"bench.videos={b.videos} is more than the {n} test clips: decoding {n}")
    with torch.no_grad():
        src = model.source("scene", {"scene": test["scene"][:n].to(device)})
    decode = lambda x: beam_search(cap, x, int(b.beam), int(cfg.decode.max_len), float(cfg.decode.length_alpha))
    batched = decode(src)  # warm-up, and the captions compared
    single = [decode(src[i : i + 1])[0] for i in range(n)]
    text = lambda ids: data.vocab.decode(ids.tolist())
    same = sum(text(batched[i]) == text(single[i]) for i in range(n))
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(int(b.repeats)):
        times["batched"].append(timed(lambda: decode(src), device)[0])
        times["single"].append(timed(lambda: [decode(src[i : i + 1]) for i in range(n)], device)[0])
    fastest = {k: min(v) for k, v in times.items()}
    out = {
        "batched_captions_per_s": n / fastest["batched"],
        "single_captions_per_s": n / fastest["single"],
        "speedup": fastest["single"] / fastest["batched"],
        "identical": same / n,
        "videos": float(n),
        "mean_words": statistics.mean(len(text(batched[i]).split()) for i in range(n)),
        "torch_threads": float(torch.get_num_threads()),
    }
    print(
        f"beam {b.beam}: batched {out['batched_captions_per_s']:.1f} captions/s, one by one {out['single_captions_per_s']:.1f} "
        f"({out['speedup']:.2f}×), identical captions {same}/{n}; e.g. '{text(batched[0])}'",
        flush=True,
    )
    return out


def lift(children: list[dict], cfg: DictConfig, tracker: Tracker | None) -> str:
    """Does distillation lift the scene branch toward the object branch (the paper's claim)? Per metric: scene-only,
    STG-KD (scene branch), object-only, and the share of the scene → object gap that STG-KD closes."""
    lines = []
    for key, label in (("test/cider", "CIDEr-D"), ("test/bleu4", "BLEU-4"), ("test/meteor", "METEOR"), ("test/rouge_l", "ROUGE-L")):
        mean = {}
        for variant in ("scene", "object", "fused", "stg_kd"):
            values = [c[key] for c in children if c.get("model.variant") == variant and key in c]
            if values:
                mean[variant] = 100 * statistics.mean(values)
        if not {"scene", "object", "stg_kd"} <= set(mean):
            continue
        gap = mean["object"] - mean["scene"]
        closed = (mean["stg_kd"] - mean["scene"]) / gap if abs(gap) > 1e-9 else float("nan")
        verdict = "lifts the scene branch" if mean["stg_kd"] > mean["scene"] else "does not lift the scene branch"
        lines.append(
            f"- {label}: scene {mean['scene']:.1f}, STG-KD (scene branch) {mean['stg_kd']:.1f}, object {mean['object']:.1f}"
            + (f", fused {mean['fused']:.1f}" if "fused" in mean else "")
            + f" — distillation {verdict} ({mean['stg_kd'] - mean['scene']:+.1f}; {100 * closed:.0f} % of the scene → object gap)"
        )
    if not lines:
        return "Distillation: the grid lacks scene, object or stg_kd runs, so the lift is not computed."
    return "Distillation (means over seeds; the paper: the distilled scene branch beats both branches alone):\n\n" + "\n".join(lines)
