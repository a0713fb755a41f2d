"""STG-KD (Pan et al., CVPR 2020): an object branch (spatio-temporal object graph → GCN → Transformer captioner), a scene
branch (frame features → Transformer captioner), and object-aware distillation of the object branch's word distributions
into the scene branch; at test time the scene branch alone decodes (beam search).

Graphs (notes: ../shared/papers/stg_kd.md). With ``K`` padded object slots per frame and ``N = T·K`` nodes per clip:
- spatial, within frame t: ``G^sp_t[i,j] = exp(IoU(b_i,b_j)) / Σ_k exp(IoU(b_i,b_k))`` (row softmax over the frame's real
  objects; IoU of a box with itself is 1, so every node keeps a self-edge);
- temporal, frame t → t+1: ``G^tm_t[i,j] = exp(cos(v_i^t, v_j^{t+1})) / Σ_k exp(cos(v_i^t, v_k^{t+1}))``;
- ``G_st``: the spatial blocks on the diagonal, the temporal blocks on the first block super-diagonal (directed: row i of
  frame t reads the nodes of frame t+1). Padded slots have no edges at all.
The GCN is ``V^{l+1} = ReLU(G_st V^l W^l) + V^l`` with PyG's ``GCNConv(normalize=False)`` on the edge weights of ``G_st``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
VARIANTS = ("scene", "object", "fused", "stg_kd")  # which branch decodes at test: scene, object, fused, scene
TEST_BRANCH = {"scene": "scene", "object": "object", "fused": "fused", "stg_kd": "scene"}


def check_variant(name: str) -> None:
    if name not in VARIANTS:
        raise ConfigError(f"model.variant '{name}' is not one of {', '.join(VARIANTS)}")


# -- graphs ------------------------------------------------------------------------------------------------------------
def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes [..., K, 4]`` (x1, y1, x2, y2) → IoU ``[..., K, K]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    w = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :])).clamp(min=0)
    h = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :])).clamp(min=0)
    inter = w * h
    union = area[..., :, None] + area[..., None, :] - inter
    return inter / union.clamp(min=1e-12)


def _masked_row_softmax(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Row softmax over the real columns; rows of padded slots and empty rows are all zero."""
    keep = rows[..., :, None] & cols[..., None, :]
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.nan_to_num(weights, nan=0.0) * keep


def spatial_adjacency(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``boxes [B, T, K, 4]``, ``mask [B, T, K]`` → ``G^sp [B, T, K, K]``."""
    return _masked_row_softmax(pairwise_iou(boxes), mask, mask)


def temporal_adjacency(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``features [B, T, K, D]`` → ``G^tm [B, T-1, K, K]``: row i of frame t over the objects of frame t+1."""
    v = F.normalize(features, dim=-1)
    cos = v[:, :-1] @ v[:, 1:].transpose(-1, -2)
    return _masked_row_softmax(cos, mask[:, :-1], mask[:, 1:])


def st_adjacency(boxes: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The block matrix ``G_st [B, T·K, T·K]`` (node index = t·K + k)."""
    b, t, k, _ = boxes.shape
    g = boxes.new_zeros(b, t, k, t, k)
    sp, tm = spatial_adjacency(boxes, mask), temporal_adjacency(features, mask)
    frames = torch.arange(t)
    g[:, frames, :, frames, :] = sp.transpose(0, 1)
    if t > 1:
        g[:, frames[:-1], :, frames[1:], :] = tm.transpose(0, 1)
    return g.reshape(b, t * k, t * k)


def dense_to_edges(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of dense adjacencies → one disjoint PyG graph: ``edge_index [2, E]`` (source j → target i for ``G[i, j]``)
    and ``edge_weight [E]``."""
    b, n, _ = g.shape
    batch, i, j = g.nonzero(as_tuple=True)
    return torch.stack([batch * n + j, batch * n + i]), g[batch, i, j]


# -- encoders ----------------------------------------------------------------------------------------------------------
class ObjectGraphEncoder(nn.Module):
    """Object nodes (RoI feature and normalised box, projected to d_model) → GCN over ``G_st`` → one token per frame
    (the mean over the frame's real objects; a frame with none gets a learned 'empty' token)."""

    def __init__(self, feature_dim: int, d_model: int, layers: int, use_box: bool = True):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.use_box = use_box
        self.project = nn.Linear(feature_dim + (4 if use_box else 0), d_model)
        self.convs = nn.ModuleList(GCNConv(d_model, d_model, normalize=False, add_self_loops=False) for _ in range(layers))
        self.empty = nn.Parameter(torch.zeros(d_model))

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, k, _ = features.shape
        g = st_adjacency(boxes, features, mask)
        edge_index, edge_weight = dense_to_edges(g)
        x = self.project(torch.cat([features, boxes], -1) if self.use_box else features).reshape(b * t * k, -1)
        for conv in self.convs:
            x = F.relu(conv(x, edge_index, edge_weight)) + x
        x = x.reshape(b, t, k, -1) * mask[..., None]
        count = mask.sum(-1, keepdim=True)
        pooled = x.sum(2) / count.clamp(min=1)
        return torch.where(count > 0, pooled, self.empty.expand_as(pooled))


class SceneEncoder(nn.Module):
    """Per-frame 2D (and optional 3D) features, concatenated, → d_model."""

    def __init__(self, feature_dim: int, d_model: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(feature_dim, d_model), nn.LayerNorm(d_model))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.project(frames)


class Captioner(nn.Module):
    """A Transformer encoder–decoder over a sequence of visual tokens ``[B, S, d]`` (with a padding mask), producing word
    logits under teacher forcing (``forward``) or step by step (``encode`` then ``decode``)."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, ff: int, dropout: float, max_src: int, max_len: int):
        super().__init__()
        self.src_pos = nn.Parameter(torch.zeros(1, max_src, d_model))
        self.tgt_pos = nn.Parameter(torch.zeros(1, max_len + 1, d_model))
        nn.init.trunc_normal_(self.src_pos, std=0.02)
        nn.init.trunc_normal_(self.tgt_pos, std=0.02)
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        make = lambda: dict(d_model=d_model, nhead=heads, dim_feedforward=ff, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**make()), layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**make()), layers)
        self.out = nn.Linear(d_model, vocab)
        self.scale = math.sqrt(d_model)

    def encode(self, src: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(src + self.src_pos[:, : src.shape[1]], src_key_padding_mask=src_pad)

    def decode(self, memory: torch.Tensor, memory_pad: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)  # True: may not attend
        x = self.embed(tokens) * self.scale + self.tgt_pos[:, :n]
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=tokens == PAD, memory_key_padding_mask=memory_pad)
        return self.out(h)

    def forward(self, src: torch.Tensor, src_pad: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(src, src_pad), src_pad, tokens)


class STGKD(nn.Module):
    """The branches a variant needs: ``scene`` (scene encoder + captioner), ``object`` (graph encoder + captioner),
    ``fused`` (one captioner over the scene tokens followed by the object tokens, with a type embedding), ``stg_kd``
    (both branches, trained jointly with the distillation term; the scene branch decodes at test)."""

    def __init__(self, variant: str, vocab: int, scene_dim: int, object_dim: int, frames: int, max_len: int, *, d_model: int = 64,
                 heads: int = 4, layers: int = 2, ff: int = 128, dropout: float = 0.1, gcn_layers: int = 2, use_box: bool = True):  # fmt: skip
        super().__init__()
        check_variant(variant)
        self.variant = variant
        cap = lambda src: Captioner(vocab, d_model, heads, layers, ff, dropout, src, max_len)
        self.encoders = nn.ModuleDict()
        self.captioners = nn.ModuleDict()
        if variant in ("scene", "fused", "stg_kd"):
            self.encoders["scene"] = SceneEncoder(scene_dim, d_model)
        if variant in ("object", "fused", "stg_kd"):
            self.encoders["object"] = ObjectGraphEncoder(object_dim, d_model, gcn_layers, use_box)
        for branch in ("scene", "object"):
            if branch in self.encoders and variant != "fused":
                self.captioners[branch] = cap(frames)
        if variant == "fused":
            self.captioners["fused"] = cap(2 * frames)
            self.type_embed = nn.Parameter(torch.zeros(2, d_model))

    def source(self, branch: str, batch: dict) -> torch.Tensor:
        """The visual tokens a branch's captioner reads."""
        if branch == "scene":
            return self.encoders["scene"](batch["scene"])
        if branch == "object":
            return self.encoders["object"](batch["obj_feats"], batch["boxes"], batch["obj_mask"])
        scene, objects = self.source("scene", batch), self.source("object", batch)
        return torch.cat([scene + self.type_embed[0], objects + self.type_embed[1]], 1)

    def forward(self, batch: dict, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced logits ``[B, L, V]`` of every captioner."""
        return {branch: cap(self.source(branch, batch), None, tokens) for branch, cap in self.captioners.items()}


# -- losses ------------------------------------------------------------------------------------------------------------
def caption_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real (non-pad) target tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``τ² · mean over real steps of KL(P_teacher^τ ‖ P_student^τ)`` (the teacher's distribution is the target; detach it
    before the call to keep the distillation out of the object branch)."""
    keep = targets != PAD
    log_p_s = F.log_softmax(student[keep] / temperature, -1)
    log_p_t = F.log_softmax(teacher[keep] / temperature, -1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


# -- decoding ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(captioner: Captioner, src: torch.Tensor, max_len: int) -> torch.Tensor:
    """Arg-max decoding; ``[B, ≤ max_len]`` token ids after BOS, PAD after EOS."""
    memory = captioner.encode(src)
    tokens = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = captioner.decode(memory, None, tokens)[:, -1]
        logits[:, BOS] = float("-inf")  # never a word (an undertrained model can still rank it first)
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == EOS
        if done.all():
            break
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(captioner: Captioner, src: torch.Tensor, beam: int, max_len: int, length_alpha: float = 0.0) -> torch.Tensor:
    """Beam search for a batch of videos at once (``B·beam`` hypotheses per step). A finished hypothesis only extends with
    PAD at no cost; the winner maximises ``log P / length^α`` (α = 0: the plain sum). Returns ``[B, ≤ max_len]``."""
    b = len(src)
    memory = captioner.encode(src).repeat_interleave(beam, 0)
    device = src.device
    tokens = torch.full((b * beam, 1), BOS, dtype=torch.long, device=device)
    scores = torch.full((b, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis at the start: the others would duplicate it
    done = torch.zeros(b * beam, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * beam, device=device)
    for _ in range(max_len):
        logp = captioner.decode(memory, None, tokens)[:, -1].float().log_softmax(-1)
        logp[:, BOS] = float("-inf")  # never a word
        vocab = logp.shape[-1]
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0
        top, index = (scores.reshape(-1, 1) + logp).reshape(b, beam * vocab).topk(beam, -1)
        origin = (torch.arange(b, device=device)[:, None] * beam + index // vocab).reshape(-1)
        word = (index % vocab).reshape(-1)
        tokens = torch.cat([tokens[origin], word[:, None]], 1)
        lengths = lengths[origin] + (~done[origin]).float()
        done = done[origin] | (word == EOS)
        scores = top
        if done.all():
            break
    final = scores / lengths.reshape(b, beam).clamp(min=1) ** length_alpha if length_alpha else scores
    best = torch.arange(b, device=device) * beam + final.argmax(-1)
    return tokens[best, 1:]
