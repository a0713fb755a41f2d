"""HOG-GCN (Wang et al., AAAI 2022) computed edge-wise on the sparse k-hop support, its dense reference
form, and the baselines MLP, GCN, GAT, GPR-GNN and H2GCN.

Sparse HOG-GCN never forms an n×n matrix: every quantity of the method that lives on pairs of nodes
(path counts of A_k, the learnable topology weights T, the attribute homophily S = BBᵀ, the combined
H and the propagation matrix) is a vector over the edges of the k-hop support, and the two products
it needs (propagation P·Z and S_ij = ⟨B_i, B_j⟩ on the support) have hand-written backward passes
that stay on the support, so memory grows with the number of support edges.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError

# torch's sparse CSR support works for everything used here; its beta notice would print on every product
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

MODELS = ("hog_gcn", "mlp", "gcn", "gat", "gpr_gnn", "h2gcn")


# -- sparse support and the two products on it --------------------------------------------------
class Pattern:
    """A fixed sparsity pattern (rows sorted, CSR order) and its transpose, for products with edge values."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor, n: int):
        order = torch.argsort(row * n + col)
        self.row, self.col, self.n = row[order], col[order], n
        self.crow = torch.ops.aten._convert_indices_from_coo_to_csr(self.row, n)
        self.perm_t = torch.argsort(self.col * n + self.row)  # entry order of the transpose
        self.crow_t = torch.ops.aten._convert_indices_from_coo_to_csr(self.col[self.perm_t], n)
        self.col_t = self.row[self.perm_t].contiguous()

    @property
    def edges(self) -> int:
        return len(self.row)

    def to(self, device) -> "Pattern":
        for key in ("row", "col", "crow", "perm_t", "crow_t", "col_t"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.n, self.n))

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t], (self.n, self.n))

    def row_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add_(0, self.row, values)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n, self.n, dtype=values.dtype, device=values.device)
        out[self.row, self.col] = values
        return out


class _Propagate(torch.autograd.Function):
    """out = P(values) @ Z; the gradient of ``values`` is ⟨G_i, Z_j⟩ on the pattern only (sampled matmul)."""

    @staticmethod
    def forward(ctx, values, pattern, Z):
        ctx.save_for_backward(values, Z)
        ctx.pattern = pattern
        return pattern.matrix(values) @ Z

    @staticmethod
    def backward(ctx, G):
        values, Z = ctx.saved_tensors
        p: Pattern = ctx.pattern
        G = G.contiguous()
        grad_values = grad_Z = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.sparse.sampled_addmm(p.matrix(torch.zeros_like(values)), G, Z.t()).values()
        if ctx.needs_input_grad[2]:
            grad_Z = p.matrix_t(values) @ G
        return grad_values, None, grad_Z


class _PairDot(torch.autograd.Function):
    """S_e = ⟨B_row(e), B_col(e)⟩ on the pattern (the support entries of BBᵀ), without gathering E×C rows."""

    @staticmethod
    def forward(ctx, B, pattern):
        ctx.save_for_backward(B)
        ctx.pattern = pattern
        return torch.sparse.sampled_addmm(pattern.matrix(B.new_zeros(pattern.edges)), B, B.t()).values()

    @staticmethod
    def backward(ctx, g):
        (B,) = ctx.saved_tensors
        p: Pattern = ctx.pattern
        return p.matrix(g) @ B + p.matrix_t(g) @ B, None


def propagate(pattern: Pattern, values: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    return _Propagate.apply(values, pattern, Z)


def pair_dot(B: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return _PairDot.apply(B.contiguous(), pattern)


def add_self_loops_pattern(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    loops = torch.arange(n, device=edge_index.device)
    return torch.cat([edge_index, torch.stack([loops, loops])], 1)


def khop_support(edge_index: torch.Tensor, n: int, hops: int) -> tuple[Pattern, torch.Tensor, torch.Tensor]:
    """Support of A'^k with A' = A + I: (pattern, path counts, 1-hop indicator), as the reference code builds it."""
    index = add_self_loops_pattern(edge_index, n)
    A1 = torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (n, n)).coalesce()
    A1 = torch.sparse_coo_tensor(A1.indices(), torch.ones(A1._nnz()), (n, n)).coalesce()  # binary A'
    Ak = A1
    for _ in range(hops - 1):
        Ak = torch.sparse.mm(Ak, A1).coalesce()
    row, col = Ak.indices()
    pattern = Pattern(row, col, n)
    order = torch.argsort(row * n + col)
    counts = Ak.values()[order]
    # 1-hop entries of the support: T starts at A' (1 on A', 0 on the farther hops), as in the reference code
    one_hop = torch.zeros(pattern.edges, dtype=torch.bool)
    key = pattern.row * n + pattern.col
    one_hop[torch.searchsorted(key, A1.indices()[0] * n + A1.indices()[1])] = True
    return pattern, counts, one_hop


def sym_norm_values(pattern: Pattern, weights: torch.Tensor | None = None) -> torch.Tensor:
    """D^-1/2 A D^-1/2 on the pattern."""
    w = torch.ones(pattern.edges) if weights is None else weights
    deg = pattern.row_sum(w).clamp(min=1e-12)
    return w * deg[pattern.row].rsqrt() * deg[pattern.col].rsqrt()


class SparseModule(nn.Module):
    """A module holding :class:`Pattern` attributes: they follow the module's device like buffers."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        device = next(self.buffers()).device
        for value in vars(self).values():
            if isinstance(value, Pattern):
                value.to(device)
        return out


# -- HOG-GCN ------------------------------------------------------------------------------------
class HomophilyPropagation(nn.Module):
    """Z' = μ·Z W_e + ξ·D̂⁻¹(A_k ⊙ H) Z W_n + b  (Eq. 10), with this layer's topology weights T."""

    def __init__(self, d_in: int, d_out: int, t_init: torch.Tensor, mu: float):
        super().__init__()
        self.ego = nn.Linear(d_in, d_out, bias=False)
        self.neighbour = nn.Linear(d_in, d_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.xi = nn.Parameter(torch.empty(1).uniform_(0.5, 1.0))  # learnable ξ, as the reference code
        self.T = nn.Parameter(t_init.clone().float())  # edge vector (sparse) or n×n (dense)
        self.mu = mu

    def propagate(self, P, Z, sparse_pattern: Pattern | None) -> torch.Tensor:
        # P(ZW) = (PZ)W: multiply on the narrower side
        if Z.shape[1] < self.neighbour.out_features:
            PZ = propagate(sparse_pattern, P, Z) if sparse_pattern is not None else P @ Z
            return self.neighbour(PZ)
        ZW = self.neighbour(Z)
        return propagate(sparse_pattern, P, ZW) if sparse_pattern is not None else P @ ZW

    def forward(self, Z, P, sparse_pattern, row_scale):
        # D̂⁻¹ applied to the product's rows rather than to every support entry (same result, one pass fewer over E)
        return self.mu * self.ego(Z) + self.xi * row_scale * self.propagate(P, Z, sparse_pattern) + self.bias


class HOGGCN(SparseModule):
    """Attribute homophily S = BBᵀ from an MLP, topology homophily T̂ from generalised label propagation
    with learnable edge weights, H = αS + βT̂, and homophily-guided propagation layers.

    ``dense=True`` computes the same with n×n matrices, as the reference code does (for parity checks).
    """

    def __init__(
        self,
        features: int,
        classes: int,
        edge_index: torch.Tensor,
        n: int,
        hidden: list[int],
        mlp_hidden: int,
        hops: int = 2,
        alpha: float = 1.0,
        beta: float = 0.1,
        mu: float = 1.0,
        dropout: float = 0.5,
        lp_labels: str = "train",
        dense: bool = False,
    ):
        super().__init__()
        if lp_labels not in ("train", "pseudo"):
            raise ConfigError(f"model.hog.lp_labels must be train or pseudo, got '{lp_labels}'")
        pattern, counts, one_hop = khop_support(edge_index.cpu(), n, hops)
        self.dense, self.alpha, self.beta, self.dropout, self.lp_labels = dense, alpha, beta, dropout, lp_labels
        self.support_edges = pattern.edges
        if dense:
            self.pattern = None
            self.register_buffer("counts", pattern.dense(counts))
            t_init = pattern.dense(one_hop.float())
        else:
            self.pattern = pattern
            self.register_buffer("counts", counts)
            t_init = one_hop.float()
        self.mlp = nn.Sequential(nn.Linear(features, mlp_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, classes))
        dims = [features, *hidden, classes]
        self.layers = nn.ModuleList(HomophilyPropagation(a, b, t_init, mu) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long))

    def _node_sum(self, values):
        """Row sums of a support matrix, one per node, as a column."""
        return values.sum(1, keepdim=True) if self.dense else self.pattern.row_sum(values).unsqueeze(1)

    def _row_sum(self, values):
        """The same sums, beside every support entry (sparse) or as a broadcastable column (dense)."""
        sums = self._node_sum(values)
        return sums if self.dense else sums[self.pattern.row, 0]

    def topology(self, layer: HomophilyPropagation) -> torch.Tensor:
        """T̂ = D_k⁻¹ (A_k ⊙ T): the label-propagation matrix (Eq. 7), row-normalised."""
        weighted = self.counts * layer.T
        return weighted / (self._row_sum(weighted.abs()) + 1e-12)

    def attribute(self, B: torch.Tensor) -> torch.Tensor:
        """S = BBᵀ (Eq. 4), on the support only in the sparse form."""
        return B @ B.t() if self.dense else pair_dot(B, self.pattern)

    def forward(self, x: torch.Tensor, label_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mlp_logits = self.mlp(x)
        S = self.attribute(mlp_logits.softmax(-1))
        Z, lp = x, label_input
        for i, layer in enumerate(self.layers):
            T_hat = self.topology(layer)
            if label_input is not None and (self.lp_labels == "train" or i == len(self.layers) - 1):
                # paper: labels propagate through every layer's T (Eq. 7); code: one step of the last T
                lp = (T_hat @ lp) if self.dense else propagate(self.pattern, T_hat, lp)
            H = self.alpha * S + self.beta * T_hat
            weighted = self.counts * H
            with torch.no_grad():  # the reference code's row normaliser carries no gradient
                row_scale = 1.0 / (self._node_sum(weighted.abs()) + 1e-12)
            Z = F.dropout(Z, self.dropout, self.training)
            Z = layer(Z, weighted, self.pattern, row_scale)
            if i < len(self.layers) - 1:
                Z = F.relu(Z)
        return {"logits": Z, "mlp_logits": mlp_logits, "lp": lp}


# -- baselines ----------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, features, classes, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
        )

    def forward(self, x, label_input=None):
        return {"logits": self.net(x)}


class GCN(nn.Module):
    def __init__(self, features, classes, edge_index, hidden, dropout):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.register_buffer("edge_index", edge_index)
        self.convs = nn.ModuleList([GCNConv(features, hidden, cached=True), GCNConv(hidden, classes, cached=True)])
        self.dropout = dropout

    def forward(self, x, label_input=None):
        x = F.dropout(x, self.dropout, self.training)
        x = F.dropout(F.relu(self.convs[0](x, self.edge_index)), self.dropout, self.training)
        return {"logits": self.convs[1](x, self.edge_index)}


class GAT(nn.Module):
    def __init__(self, features, classes, edge_index, hidden, dropout, heads):
        super().__init__()
        from torch_geometric.nn import GATConv

        self.register_buffer("edge_index", edge_index)
        per_head = max(hidden // heads, 1)
        self.convs = nn.ModuleList(
            [GATConv(features, per_head, heads=heads, dropout=dropout), GATConv(per_head * heads, classes, heads=1, dropout=dropout)]
        )
        self.dropout = dropout

    def forward(self, x, label_input=None):
        x = F.dropout(x, self.dropout, self.training)
        x = F.dropout(F.elu(self.convs[0](x, self.edge_index)), self.dropout, self.training)
        return {"logits": self.convs[1](x, self.edge_index)}


class GPRGNN(SparseModule):
    """GPR-GNN (Chien et al., 2021): MLP, then Σ_k γ_k Â^k Z with learnable γ initialised to PPR weights."""

    def __init__(self, features, classes, edge_index, n, hidden, dropout, K, alpha):
        super().__init__()
        index = add_self_loops_pattern(edge_index, n)
        self.pattern = Pattern(index[0], index[1], n)
        self.register_buffer("norm", sym_norm_values(self.pattern))
        self.mlp = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
        )
        gamma = alpha * (1 - alpha) ** torch.arange(K + 1, dtype=torch.float)
        gamma[-1] = (1 - alpha) ** K
        self.gamma = nn.Parameter(gamma)

    def forward(self, x, label_input=None):
        z = self.mlp(x)
        out = self.gamma[0] * z
        for k in range(1, len(self.gamma)):
            z = propagate(self.pattern, self.norm, z)
            out = out + self.gamma[k] * z
        return {"logits": out}


class H2GCN(SparseModule):
    """H2GCN (Zhu et al., 2020): ego embedding, separate 1-hop and strict 2-hop aggregation without self
    loops, K rounds, and a head on the concatenation of every round."""

    def __init__(self, features, classes, edge_index, n, hidden, dropout, rounds):
        super().__init__()
        self.one = Pattern(edge_index[0], edge_index[1], n)
        A = torch.sparse_coo_tensor(edge_index, torch.ones(edge_index.shape[1]), (n, n)).coalesce()
        A2 = torch.sparse.mm(A, A).coalesce()
        r, c = A2.indices()
        one_keys = self.one.row * n + self.one.col
        keys = r * n + c
        pos = torch.searchsorted(one_keys, keys).clamp(max=max(len(one_keys) - 1, 0))
        strict = (r != c) & ~((one_keys[pos] == keys) if len(one_keys) else torch.zeros_like(r, dtype=torch.bool))
        self.two = Pattern(r[strict], c[strict], n)
        self.register_buffer("norm_one", sym_norm_values(self.one))
        self.register_buffer("norm_two", sym_norm_values(self.two))
        self.embed = nn.Linear(features, hidden)
        self.rounds, self.dropout = rounds, dropout
        self.head = nn.Linear(hidden * (2 ** (rounds + 1) - 1), classes)

    def forward(self, x, label_input=None):
        r = F.relu(self.embed(x))
        reps = [r]
        for _ in range(self.rounds):
            r = torch.cat([propagate(self.one, self.norm_one, r), propagate(self.two, self.norm_two, r)], 1)
            reps.append(r)
        return {"logits": self.head(F.dropout(torch.cat(reps, 1), self.dropout, self.training))}


def build_model(model_cfg, features: int, classes: int, edge_index: torch.Tensor, n: int) -> nn.Module:
    m = model_cfg
    if m.name not in MODELS:
        raise ConfigError(f"unknown model.name '{m.name}'; valid: {', '.join(MODELS)}")
    if m.name == "hog_gcn":
        h = m.hog
        return HOGGCN(
            features, classes, edge_index, n, list(h.hidden), h.mlp_hidden, h.hops, h.alpha, h.beta, h.mu, m.dropout, h.lp_labels, h.dense
        )
    if m.name == "mlp":
        return MLP(features, classes, m.hidden, m.dropout)
    if m.name == "gcn":
        return GCN(features, classes, edge_index, m.hidden, m.dropout)
    if m.name == "gat":
        return GAT(features, classes, edge_index, m.hidden, m.dropout, m.gat_heads)
    if m.name == "gpr_gnn":
        return GPRGNN(features, classes, edge_index, n, m.hidden, m.dropout, m.gpr.K, m.gpr.alpha)
    return H2GCN(features, classes, edge_index, n, m.hidden, m.dropout, m.h2gcn_rounds)


def dense_bytes(n: int, layers: int) -> int:
    """Lower bound of dense HOG-GCN's n×n float32 state: A_k, S, and per layer T, its gradient, two Adam moments, H, P."""
    return 4 * n * n * (2 + 6 * layers)


def loss_terms(out: dict, y: torch.Tensor, train_mask: torch.Tensor, lp_target: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Cross-entropies on labelled nodes: L_gcn, L_mlp and L_lp (Eq. 12)."""
    terms = {"gcn": F.cross_entropy(out["logits"][train_mask], y[train_mask])}
    if "mlp_logits" in out:
        terms["mlp"] = F.cross_entropy(out["mlp_logits"][train_mask], y[train_mask])
    if out.get("lp") is not None and lp_target is not None and lp_target.any():
        # the reference code scores propagated label mass with log_softmax; rows with no mass give the uniform guess
        terms["lp"] = F.nll_loss(F.log_softmax(out["lp"][lp_target], -1), y[lp_target])
    return terms
