"""Graphs for node classification: generated CSBM graphs with a set edge homophily, and the Geom-GCN
benchmarks read from PyG's raw on-disk layouts (never downloaded).

Every graph is a PyG ``Data`` with ``train_mask``/``val_mask``/``test_mask`` of shape [N, 10]: ten
splits, one column each, as PyG stores the Geom-GCN splits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from common.config import ConfigError
from common.data import make_loader, require_files

# name → (PyG class, sub-folder of the root that holds raw/, split-file prefix)
REAL = {
    "texas": ("WebKB", "texas", "texas"),
    "wisconsin": ("WebKB", "wisconsin", "wisconsin"),
    "cornell": ("WebKB", "cornell", "cornell"),
    "chameleon": ("WikipediaNetwork", "chameleon/geom_gcn", "chameleon"),
    "squirrel": ("WikipediaNetwork", "squirrel/geom_gcn", "squirrel"),
    "actor": ("Actor", "actor", "film"),
    "cora": ("Planetoid", "Cora/geom-gcn", "cora"),
    "citeseer": ("Planetoid", "CiteSeer/geom-gcn", "citeseer"),
    "pubmed": ("Planetoid", "PubMed/geom-gcn", "pubmed"),
}
SPLITS = [f"_split_0.6_0.2_{i}.npz" for i in range(10)]


# -- generated ----------------------------------------------------------------------------------
def csbm(n: int, classes: int, degree: float, homophily: float, features: int, signal: float, seed: int) -> Data:
    """Contextual stochastic block model with a set *edge* homophily.

    Each of the n·degree/2 undirected edges picks a uniform endpoint u, then with probability
    ``homophily`` a partner of u's class, otherwise one from the other classes (uniformly): the
    expected fraction of intra-class edges is ``homophily`` exactly (duplicates are rare and dropped).
    Features are ``signal · μ_y + N(0, I)`` with random unit class means μ_c, so an MLP alone is
    only partly right and the graph decides the rest.
    """
    if not 0 <= homophily <= 1:
        raise ConfigError(f"data.homophily must be in [0, 1], got {homophily}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    members = [torch.nonzero(y == c).flatten() for c in range(classes)]
    m = int(n * degree / 2)
    u = torch.randint(0, n, (m,), generator=g)
    same = torch.rand(m, generator=g) < homophily
    # partner class: u's own, or one of the others uniformly (an offset 1..C-1 around the circle)
    offset = torch.randint(1, classes, (m,), generator=g)
    partner_class = torch.where(same, y[u], (y[u] + offset) % classes)
    sizes = torch.tensor([len(mem) for mem in members])
    pick = (torch.rand(m, generator=g) * sizes[partner_class]).long()
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes[:-1]]), 0)
    v = torch.cat(members)[starts[partner_class] + pick]
    edge_index, _ = remove_self_loops(torch.stack([u, v]))
    edge_index = to_undirected(edge_index, num_nodes=n)
    means = torch.randn(classes, features, generator=g)
    means = means / means.norm(dim=1, keepdim=True)
    x = signal * means[y] + torch.randn(n, features, generator=g)
    data = Data(x=x, edge_index=edge_index, y=y, num_nodes=n)
    data.train_mask, data.val_mask, data.test_mask = random_splits(y, 10, seed)
    return data


def random_splits(y: torch.Tensor, count: int, seed: int, fractions=(0.48, 0.32)) -> tuple[torch.Tensor, ...]:
    """``count`` random splits, 48 % / 32 % / 20 % of the nodes of every class (train / val / test)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = len(y)
    masks = [torch.zeros(n, count, dtype=torch.bool) for _ in range(3)]
    for s in range(count):
        for c in y.unique():
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            a = int(round(fractions[0] * len(idx)))
            b = a + int(round(fractions[1] * len(idx)))
            masks[0][idx[:a], s], masks[1][idx[a:b], s], masks[2][idx[b:], s] = True, True, True
    return tuple(masks)


def edge_homophily(edge_index: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of edges joining two nodes of the same class (Table 1's 'edge homophily ratio')."""
    return float((y[edge_index[0]] == y[edge_index[1]]).double().mean())


# -- real ---------------------------------------------------------------------------------------
def layout(name: str) -> str:
    cls, folder, prefix = REAL[name]
    if cls == "Planetoid":
        files = f"ind.{prefix}.{{x,tx,allx,y,ty,ally,graph,test.index}}, {prefix}_split_0.6_0.2_{{0..9}}.npz"
    else:
        files = f"out1_node_feature_label.txt, out1_graph_edges.txt, {prefix}_split_0.6_0.2_{{0..9}}.npz"
    return f"<root>/{folder}/raw/ holding {files} (PyG's {cls} raw layout)"


def raw_files(name: str) -> list[str]:
    cls, _, prefix = REAL[name]
    if cls == "Planetoid":
        base = [f"ind.{prefix}.{s}" for s in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
    else:
        base = ["out1_node_feature_label.txt", "out1_graph_edges.txt"]
    return base + [prefix + s for s in SPLITS]


def load_real(name: str, root: str | Path, cache_dir: str | Path) -> Data:
    """One Geom-GCN benchmark from PyG's raw layout under ``root``, with its ten splits.

    The raw folder is copied into ``cache_dir`` first: PyG writes processed files next to raw/,
    and the data folder may be read-only.
    """
    name = name.lower()
    if name not in REAL:
        raise ConfigError(f"unknown dataset '{name}'; valid: csbm, {', '.join(REAL)}")
    if not root:
        raise ConfigError(f"data.name={name} needs data.root=<folder>; expected layout: {layout(name)}")
    cls, folder, prefix = REAL[name]
    # root may also be the parent of heterophily/ and planetoid/ (as in ../shared/data/graphs)
    candidates = [Path(root) / sub / folder / "raw" for sub in ("", "heterophily", "planetoid")]
    found = next((c for c in candidates if c.is_dir()), candidates[0])
    raw = require_files(found, raw_files(name), layout(name))
    cache = Path(cache_dir) / "graphs" / folder
    if not all((cache / "raw" / f).exists() for f in raw_files(name)):
        shutil.copytree(raw, cache / "raw", dirs_exist_ok=True)
    import torch_geometric.datasets as pyg

    cache_root = Path(cache_dir) / "graphs"
    try:
        if cls == "WebKB":
            dataset = pyg.WebKB(str(cache_root), folder)
        elif cls == "WikipediaNetwork":
            dataset = pyg.WikipediaNetwork(str(cache_root), folder.split("/")[0], geom_gcn_preprocess=True)
        elif cls == "Actor":
            dataset = pyg.Actor(str(cache_root / folder))
        else:
            dataset = pyg.Planetoid(str(cache_root), folder.split("/")[0], split="geom-gcn")
    except (ValueError, IndexError, KeyError, RuntimeError, OSError) as err:
        raise ConfigError(f"could not read {name} from {raw} ({type(err).__name__}: {err}); expected layout: {layout(name)}") from None
    data = dataset[0]
    data.edge_index = coalesce(to_undirected(remove_self_loops(data.edge_index)[0], num_nodes=data.num_nodes))
    for key in ("train_mask", "val_mask", "test_mask"):  # Planetoid's geom-gcn masks load as uint8
        data[key] = data[key].bool()
    return data


def build_graph(cfg: DictConfig) -> Data:
    d = cfg.data
    if d.name == "csbm":
        return csbm(d.nodes, d.classes, d.degree, d.homophily, d.features, d.signal, cfg.seed)
    return load_real(d.name, d.root, cfg.paths.cache_dir)


class GraphDataModule(pl.LightningDataModule):
    """Full-batch transductive training: every step sees the whole graph and split ``data.split``."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.graph: Data | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.graph is None:
            graph = build_graph(self.cfg)
            split = self.cfg.data.split
            if not 0 <= split < graph.train_mask.shape[1]:
                raise ConfigError(f"data.split must be in 0..{graph.train_mask.shape[1] - 1}, got {split}")
            for key in ("train_mask", "val_mask", "test_mask"):
                graph[key] = graph[key][:, split]
            self.graph = graph

    def _loader(self):
        return make_loader([self.graph], 1, collate_fn=lambda items: items[0])

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()
