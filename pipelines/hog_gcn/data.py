"""Graphs for node classification: generated CSBM graphs with a set edge homophily, and the Geom-GCN
benchmarks read from PyG's raw on-disk layouts (never downloaded).

Every graph is a PyG ``Data`` with ``train_mask``/``val_mask``/``test_mask`` of shape [N, 10]: ten
splits, one column each, as PyG stores the Geom-GCN splits.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from common.config import ConfigError
from common.data import NUMPY_ARRAYS, NUMPY_READ_ERRORS, files_digest, load_numpy, load_pickle, numpy_error, read_text, require_files

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


FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def _fail(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}")


def _table(path: Path, columns: int) -> list[list[str]]:
    """Rows of a tab-separated Geom-GCN file after its header line, each checked to have ``columns`` fields."""
    lines = read_text(path, "table").splitlines()  # not UTF-8: one line from read_text
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    for number, row in enumerate(rows, start=2):
        if len(row) != columns:
            raise _fail(path, f"line {number} has {len(row)} tab-separated fields, expected {columns}")
    return rows


def _ints(path: Path, values: list[str], what: str) -> np.ndarray:
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError as err:
        raise _fail(path, f"{what} must be whole numbers ({err})") from None


def validate_geom_gcn(raw: Path, name: str) -> None:
    """Check the tab-separated features/labels, edges and split files before PyG reads them: PyG indexes with them
    unchecked, and an edge id past the node count crashes the process (segfault) instead of raising."""
    cls, _, prefix = REAL[name]
    nodes = _table(raw / "out1_node_feature_label.txt", 3)
    if not nodes:
        raise _fail(raw / "out1_node_feature_label.txt", "holds no nodes")
    ids = _ints(raw / "out1_node_feature_label.txt", [r[0] for r in nodes], "node ids")
    n = len(ids)
    if sorted(ids.tolist()) != list(range(n)):
        raise _fail(raw / "out1_node_feature_label.txt", f"node ids must be 0..{n - 1}, each once")
    labels = _ints(raw / "out1_node_feature_label.txt", [r[2] for r in nodes], "labels")
    if labels.min() < 0:
        raise _fail(raw / "out1_node_feature_label.txt", f"labels must be ≥ 0, found {labels.min()}")
    lengths = set()
    for number, row in enumerate(nodes, start=2):
        try:
            values = [float(v) for v in row[1].split(",")]
        except ValueError:
            raise _fail(raw / "out1_node_feature_label.txt", f"line {number}: features must be comma-separated numbers") from None
        if not np.all(np.isfinite(values)) or max(map(abs, values), default=0.0) > FLOAT32_MAX:  # (trained in float32)
            raise _fail(raw / "out1_node_feature_label.txt", f"line {number}: features hold NaN, infinite or beyond-float32 values")
        if cls == "Actor":  # sparse: the indices of the node's non-zero features
            if any(v < 0 or v != int(v) for v in values):
                raise _fail(raw / "out1_node_feature_label.txt", f"line {number}: feature indices must be whole numbers ≥ 0")
            if max(values, default=0) * n > 2**31:  # PyG builds a dense n × (max index + 1) matrix
                raise _fail(
                    raw / "out1_node_feature_label.txt",
                    f"line {number}: feature index {max(values):.0f} is too large for {n} nodes (a dense {n} × {max(values) + 1:.0f} matrix)",
                )
        else:
            lengths.add(len(values))
    if len(lengths) > 1:
        raise _fail(raw / "out1_node_feature_label.txt", f"nodes have feature vectors of different lengths {sorted(lengths)}")
    edges = _table(raw / "out1_graph_edges.txt", 2)
    ends = _ints(raw / "out1_graph_edges.txt", [v for r in edges for v in r], "node ids")
    if len(ends) and (ends.min() < 0 or ends.max() >= n):
        bad = int(ends[(ends < 0) | (ends >= n)][0])
        raise _fail(raw / "out1_graph_edges.txt", f"edge endpoint {bad} is not a node id (the features file has nodes 0..{n - 1})")
    if labels.max() >= n:  # classes = max label + 1: a stray huge label makes a million-class output layer
        raise _fail(
            raw / "out1_node_feature_label.txt",
            f"label {labels.max()} is not below the node count {n}; labels must be class indices 0..C-1",
        )
    empty = sorted(set(range(int(labels.max()) + 1)) - set(labels.tolist()))
    if empty:  # a stray label (99 among 0..4) would silently add classes no node has, scored as part of the output
        raise _fail(
            raw / "out1_node_feature_label.txt",
            f"labels must be class indices 0..C-1 with a node in each; no node has {empty[:5]} (the largest label is {labels.max()})",
        )
    validate_splits(raw, prefix, n)


def validate_splits(raw: Path, prefix: str, n: int) -> None:
    """The ten split files: three 0/1 masks of n nodes each, none empty, no node in two of them."""
    for split in SPLITS:
        path = raw / (prefix + split)
        masks = load_numpy(path, archive=True, what="train_mask, val_mask, test_mask")
        try:
            with masks:
                arrays = {k: masks[k] for k in ("train_mask", "val_mask", "test_mask")}
        except KeyError as err:
            raise _fail(path, f"lacks the array {err}; a split file holds train_mask, val_mask, test_mask") from None
        except NUMPY_READ_ERRORS as err:  # a damaged member, pickled objects …
            raise numpy_error(path, err) from None
        for key, mask in arrays.items():
            if mask.shape != (n,):
                raise _fail(path, f"{key} must be {n} zeros/ones (one per node), got shape {mask.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise _fail(path, f"{key} must hold only zeros and ones, got {mask[~np.isin(mask, (0, 1))][0].item()!r}")
            if not mask.any():  # training on no node gives NaN losses and a "finished" run
                raise _fail(path, f"{key} selects no node; every split needs training, validation and test nodes")
        for a, b in (("train_mask", "val_mask"), ("train_mask", "test_mask"), ("val_mask", "test_mask")):
            both = np.flatnonzero(arrays[a].astype(bool) & arrays[b].astype(bool))
            if len(both):  # a test node seen in training scores as if it were held out
                raise _fail(path, f"{a} and {b} share {len(both)} nodes (first: {both[0]}); the three sets must be disjoint")


# Planetoid's files are pickles: numpy arrays, scipy sparse matrices and plain containers only (a pickle from a user's
# folder could otherwise run code when PyG loads it)
PLANETOID_PICKLES = NUMPY_ARRAYS | {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "defaultdict"),
    ("builtins", "list"),
    ("builtins", "set"),
    ("builtins", "dict"),
    ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_array"),
}


def validate_planetoid(raw: Path, prefix: str) -> None:
    sizes = {}
    for part in ("x", "tx", "allx", "y", "ty", "ally", "graph"):
        path = raw / f"ind.{prefix}.{part}"
        try:
            with open(path, "rb") as f:
                value = load_pickle(f, PLANETOID_PICKLES, encoding="latin1")
        except Exception as err:
            raise _fail(path, f"is not a Planetoid array file ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
        sizes[part] = len(value) if part == "graph" else value.shape[0]
        if part == "graph":
            graph = value
    if sizes["x"] != sizes["y"] or sizes["tx"] != sizes["ty"] or sizes["allx"] != sizes["ally"]:
        raise _fail(raw, f"feature and label files disagree on their row counts ({sizes})")
    index_file = raw / f"ind.{prefix}.test.index"
    test = _ints(index_file, read_text(index_file, "test index list").split(), "test indices")
    if len(test) != sizes["tx"]:
        raise _fail(index_file, f"has {len(test)} indices for {sizes['tx']} test rows")
    # PyG indexes its arrays with these ids unchecked: an id past the node count corrupts memory (segfault, abort)
    n = max(sizes["allx"] + sizes["tx"], int(test.max()) + 1 if len(test) else 0)
    if len(test) and (test.min() < sizes["allx"] or test.max() >= n):
        raise _fail(index_file, f"test indices must lie in {sizes['allx']}..{n - 1} (after the {sizes['allx']} allx rows)")
    path = raw / f"ind.{prefix}.graph"
    if not isinstance(graph, dict):
        raise _fail(path, f"must hold a dict of node → neighbour list, got {type(graph).__name__}")
    for node, neighbours in graph.items():
        if not isinstance(neighbours, (list, tuple, set)):
            raise _fail(path, f"node {node!r}: its neighbours are not a list — node ids must be whole numbers 0..{n - 1}")
        bad = next((i for i in (node, *neighbours) if not (isinstance(i, (int, np.integer)) and 0 <= i < n)), None)
        if bad is not None:
            raise _fail(path, f"node {node!r}: id {bad!r} — node ids must be whole numbers 0..{n - 1}")
    validate_splits(raw, prefix, n)


def raw_folder(name: str, root: str | Path | None) -> Path:
    """The folder holding ``name``'s raw files under ``root`` (or under root/heterophily, root/planetoid, as in
    ../shared/data/graphs), with every file present; one line naming the layout otherwise."""
    if name not in REAL:
        raise ConfigError(f"unknown dataset '{name}'; valid: csbm, {', '.join(REAL)}")
    if not root:
        raise ConfigError(f"data.name={name} needs data.root=<folder>; expected layout: {layout(name)}")
    folder = REAL[name][1]
    candidates = [Path(root) / sub / folder / "raw" for sub in ("", "heterophily", "planetoid")]
    found = next((c for c in candidates if c.is_dir()), candidates[0])
    return require_files(found, raw_files(name), layout(name))


_VALIDATED: set[tuple] = set()  # (folder, its files' sizes and mtimes) already checked in this process


def checked_raw(name: str, root: str | Path | None) -> Path:
    """``raw_folder`` with every file validated, once per process while the files stay unchanged: the command checks
    them before a run opens and the run's loader finds them checked."""
    raw = raw_folder(name, root)
    cls, _, prefix = REAL[name]
    key = (str(raw.resolve()), tuple((f, (raw / f).stat().st_size, (raw / f).stat().st_mtime_ns) for f in raw_files(name)))
    if key not in _VALIDATED:
        validate_planetoid(raw, prefix) if cls == "Planetoid" else validate_geom_gcn(raw, name)
        _VALIDATED.add(key)
    return raw


def load_real(name: str, root: str | Path, cache_dir: str | Path) -> Data:
    """One Geom-GCN benchmark from PyG's raw layout under ``root``, with its ten splits.

    The raw files are checked, then copied into a cache folder named by a hash of their contents (PyG writes
    processed files next to raw/ and reuses them; the data folder may be read-only): changed or corrected files
    get a new cache, never a stale one.
    """
    name = name.lower()
    raw = checked_raw(name, root)
    cls, folder, prefix = REAL[name]
    cache_root = Path(cache_dir) / "graphs" / f"{name}-{files_digest([raw / f for f in raw_files(name)], raw)}"
    cache = cache_root / folder
    if not all((cache / "raw" / f).exists() for f in raw_files(name)):
        tmp = cache.parent / f".{cache.name}.{os.getpid()}"  # copy, then rename: a half-copied cache is never used
        shutil.copytree(raw, tmp / "raw", dirs_exist_ok=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    import torch_geometric.datasets as pyg

    # PyG's dataset class per REAL entry, given the hashed cache root and the entry's folder
    readers = {
        "WebKB": lambda root, folder: pyg.WebKB(str(root), folder),
        "WikipediaNetwork": lambda root, folder: pyg.WikipediaNetwork(str(root), folder.split("/")[0], geom_gcn_preprocess=True),
        "Actor": lambda root, folder: pyg.Actor(str(root / folder)),
        "Planetoid": lambda root, folder: pyg.Planetoid(str(root), folder.split("/")[0], split="geom-gcn"),
    }
    # PyG prints "Processing..."/"Done!" to stderr when it builds its processed/ files: -v shows them
    quiet = contextlib.nullcontext() if os.environ.get("LIGHTYARD_VERBOSE") else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            dataset = readers[cls](cache_root, folder)
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


class OneBatch:
    """An iterable of one item, re-iterable every epoch (a list would be read by Lightning as a list of loaders)."""

    def __init__(self, item) -> None:
        self.item = item

    def __iter__(self):
        yield self.item

    def __len__(self) -> int:
        return 1


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

    def train_dataloader(self):
        # the whole graph is every epoch's one batch (evaluation follows the step, HogGCNModule.on_train_batch_end):
        # a one-item iterable, not a DataLoader, whose iterator is rebuilt every epoch (a fixed cost beside a small
        # graph's epoch) and draws a base seed from the global RNG, shifting dropout away from fit_split's loop
        return OneBatch(self.graph)
