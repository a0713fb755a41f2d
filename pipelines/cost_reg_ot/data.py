"""Paired point clouds in two spaces: generated defaults and real single-cell pairs (SCOT layout, AnnData).

Rows are paired (row i of X and row i of Y are the same cell) only for evaluation (FOSCTTM,
label transfer); the solvers never see the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from common.config import ConfigError
from common.data import check_root_is_read, load_numpy, require_files
from common.tracking import notice

SCOT_LAYOUT = (
    "<root>/<x_file> and <y_file> (.npy, or .csv without header: cells × features, row i of both = cell i), "
    "optional <x_labels>/<y_labels> text files with one integer cell type per line, optional "
    "<x_shared>/<y_shared> matrices of features both sides measure (same columns, for fused GW)"
)


@dataclass
class PairedData:
    X: torch.Tensor  # n × dx
    Y: torch.Tensor  # n × dy (paired by row with X)
    x_labels: torch.Tensor | None  # n (None: unlabelled, no label transfer is scored)
    y_labels: torch.Tensor | None  # n
    true_map: torch.Tensor | None = None  # dy × dx, known for the planted generator
    name: str = ""
    # features both sides measure (n × k and m × k, same columns): the fused term of fused GW
    x_shared: torch.Tensor | None = None
    y_shared: torch.Tensor | None = None

    def shared(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.x_shared is None else (self.x_shared, self.y_shared)


def planted_pair(
    n: int = 300,
    informative: int = 5,
    nuisance: int = 5,
    dy: int = 6,
    extra_nonzeros: int = 3,
    clusters: int = 4,
    noise: float = 0.05,
    seed: int = 0,
) -> PairedData:
    """Source points in R^dx (dx = informative + nuisance) and y_i = M* x_i + noise.

    The planted map M* (dy × dx) reads only the informative source features (each at least once,
    plus ``extra_nonzeros`` more entries); the nuisance features are seen by X alone, with a smaller
    spread. Features have distinct scales and cluster structure (clusters act as cell types), so
    the matching is identifiable; a column-sparse map (ℓ1,2) should select the informative features.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % clusters
    dx = informative + nuisance
    scales = torch.cat([torch.linspace(2.0, 1.0, informative), torch.full((nuisance,), 0.3)]).double()
    centers = torch.randn(clusters, dx, generator=g, dtype=torch.float64)
    X = (centers[labels] + 0.5 * torch.randn(n, dx, generator=g, dtype=torch.float64)) * scales
    true_map = torch.zeros(dy, dx, dtype=torch.float64)
    rows = torch.randint(dy, (informative,), generator=g)
    true_map[rows, torch.arange(informative)] = 1.0 + torch.rand(informative, generator=g, dtype=torch.float64)
    extra = torch.randperm(dy * informative, generator=g)[:extra_nonzeros]
    block = true_map[:, :informative].reshape(-1)
    block[extra] = torch.where(block[extra] == 0, 1.0, block[extra])
    true_map[:, :informative] = block.view(dy, informative)
    Y = X @ true_map.T + noise * torch.randn(n, dy, generator=g, dtype=torch.float64)
    return PairedData(X, Y, labels, labels.clone(), true_map, "planted sparse map")


def multiomics_pair(
    n: int = 400, latent: int = 5, dx: int = 30, dy: int = 20, cell_types: int = 5, noise: float = 0.1, seed: int = 0, shared: int = 0
) -> PairedData:
    """A shared latent cell state z (cell-type clusters, axes of distinct spread) seen through two
    modalities of different dimension: x = W₁z + noise, y = W₂z + noise. With ``shared`` > 0 both
    sides also measure the same ``shared`` noisy features W₃z (a few marker genes both assays see),
    the input of fused GW.

    Linear views are what a linear map between the spaces can align; with a softplus on x (tried)
    every method here, GW included, stays near chance.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % cell_types
    spread = torch.linspace(3.0, 0.6, latent, dtype=torch.float64)
    centers = torch.randn(cell_types, latent, generator=g, dtype=torch.float64)
    z = (centers[labels] + 0.4 * torch.randn(n, latent, generator=g, dtype=torch.float64)) * spread
    W1 = torch.randn(latent, dx, generator=g, dtype=torch.float64) / latent**0.5
    W2 = torch.randn(latent, dy, generator=g, dtype=torch.float64) / latent**0.5
    X = z @ W1 + noise * torch.randn(n, dx, generator=g, dtype=torch.float64)
    Y = z @ W2 + noise * torch.randn(n, dy, generator=g, dtype=torch.float64)
    data = PairedData(X, Y, labels, labels.clone(), None, "multi-omics-like")
    if shared > 0:
        W3 = torch.randn(latent, shared, generator=g, dtype=torch.float64) / latent**0.5
        data.x_shared = z @ W3 + 3 * noise * torch.randn(n, shared, generator=g, dtype=torch.float64)
        data.y_shared = z @ W3 + 3 * noise * torch.randn(n, shared, generator=g, dtype=torch.float64)
    return data


def _read_matrix(path: Path) -> np.ndarray:
    """A numeric matrix from .npy (never unpickled) or a delimited text file; one line naming the file otherwise."""
    if path.suffix == ".npy":
        matrix = load_numpy(path, archive=False, what="a cells × features matrix")
    else:
        try:
            matrix = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
        except (ValueError, OSError, EOFError) as err:
            raise ConfigError(f"{path} is not a numeric matrix, one row per line ({' '.join(str(err).split())[:100]})") from None
    if matrix.dtype.kind not in "buif":  # (complex values are numbers, but not features)
        raise ConfigError(f"{path} holds {matrix.dtype} values, not real numbers")
    finite = matrix[np.isfinite(matrix)]
    if matrix.ndim == 2 and finite.size and np.ptp(finite) == 0:
        raise ConfigError(f"{path} is constant (every entry {finite[0]}): nothing to align")
    return matrix


def _read_labels(path: Path) -> np.ndarray:
    """One whole-number cell type per line (a float label would be truncated silently otherwise)."""
    try:
        labels = np.loadtxt(path, ndmin=1)
    except ValueError as err:
        raise ConfigError(f"{path} must hold one whole-number cell type per line ({' '.join(str(err).split())[:100]})") from None
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        bad = labels[~np.isfinite(labels) | (labels != np.round(labels))][0]
        raise ConfigError(f"{path} must hold whole-number cell types, found {bad}")
    return labels.astype(np.int64)


# the generated pairs of reproduce.dataset (and the bench's data.source)
GENERATED = {
    "planted": lambda d, seed: planted_pair(d.n, d.informative, d.nuisance, d.dy, d.extra_nonzeros, d.clusters, d.noise, seed),
    "multiomics": lambda d, seed: multiomics_pair(d.n, d.latent, d.dx, d.dy, d.clusters, 0.1, seed),
}
# the real pairs of ../shared/data/singlecell in SCOT's layout: (folder, X, Y, X labels, Y labels, normalise rows)
REAL = {
    "scGEM": ("scGEM", "scGEM_expression.csv", "scGEM_methylation.csv", "scGEM_typeExpression.txt", "scGEM_typeMethylation.txt", False),
    "SNARE-seq": ("SNARE", "SNAREseq_atac_feat.npy", "SNAREseq_rna_feat.npy", "SNAREseq_atac_types.txt", "SNAREseq_rna_types.txt", True),
}


def real_folder(real_root: str | None, name: str) -> Path:
    """The folder of real pair ``name`` under ``reproduce.real_root``, its files checked (names only: before any run)."""
    if not real_root:
        raise ConfigError(f"dataset {name} needs reproduce.real_root=<folder> holding {', '.join(f[0] for f in REAL.values())}/")
    folder, *files, _ = REAL[name]
    return require_files(Path(real_root) / folder, list(files), SCOT_LAYOUT)


def load_scot(
    root: str | Path,
    x_file: str,
    y_file: str,
    x_labels: str | None,
    y_labels: str | None,
    name: str = "",
    x_shared: str | None = None,
    y_shared: str | None = None,
) -> PairedData:
    """A SCOT-layout pair (scGEM: expression/methylation CSVs; SNARE-seq: ATAC/RNA .npy) with cell types,
    and optionally features both sides measure (``x_shared``/``y_shared``, for fused GW)."""
    if bool(x_shared) != bool(y_shared):
        raise ConfigError("give both data.x_shared and data.y_shared (features both sides measure), or neither")
    if bool(x_labels) != bool(y_labels):
        raise ConfigError("give both data.x_labels and data.y_labels (one cell type per line), or neither")
    names = [x_file, y_file] + [f for f in (x_labels, y_labels, x_shared, y_shared) if f]
    root = require_files(root, names, SCOT_LAYOUT)
    X, Y = _read_matrix(root / x_file), _read_matrix(root / y_file)
    if X.ndim != 2 or Y.ndim != 2:
        raise ConfigError(f"{root}: {x_file} and {y_file} must be 2-D matrices (cells × features), got shapes {X.shape} and {Y.shape}")
    if len(X) != len(Y):
        raise ConfigError(f"{root}: {x_file} has {len(X)} cells but {y_file} has {len(Y)}; the rows must be paired cells")
    labels = [None, None]
    if x_labels:
        xl, yl = _read_labels(root / x_labels), _read_labels(root / y_labels)
        if len(xl) != len(X) or len(yl) != len(Y):
            raise ConfigError(f"{root}: label files have {len(xl)} and {len(yl)} lines for {len(X)} cells; give one label per cell")
        labels = [torch.from_numpy(xl), torch.from_numpy(yl)]
    else:  # (zeros would score every transfer as right)
        notice(f"{root}: no data.x_labels/data.y_labels, so label_transfer is not computed (FOSCTTM needs only the pairing)")
    data = PairedData(
        torch.from_numpy(np.asarray(X, dtype=np.float64)),
        torch.from_numpy(np.asarray(Y, dtype=np.float64)),
        *labels,
        None,
        name or root.name,
    )
    if x_shared:
        xs, ys = _read_matrix(root / x_shared), _read_matrix(root / y_shared)
        if xs.ndim != 2 or ys.ndim != 2 or len(xs) != len(X) or len(ys) != len(Y) or xs.shape[1] != ys.shape[1]:
            raise ConfigError(
                f"{root}: shared features {x_shared} {xs.shape} and {y_shared} {ys.shape} must be cells × k with "
                f"the same k and one row per cell of {x_file} ({len(X)}) and {y_file} ({len(Y)})"
            )
        data.x_shared, data.y_shared = (torch.from_numpy(np.asarray(m, dtype=np.float64)) for m in (xs, ys))
    return data


H5AD_LAYOUT = "<root>/<x_file>.h5ad and <y_file>.h5ad with the same cells in obs"


def load_h5ad(root: str | Path, x_file: str, y_file: str, label_key: str) -> PairedData:
    """Two AnnData files with the same cells (obs) in the same order; labels from ``obs[label_key]``."""
    try:
        import anndata
    except ImportError:
        raise ConfigError("data.source=h5ad needs the optional 'anndata' package: pip install -e '.[datasets]'") from None
    root = require_files(root, [x_file, y_file], H5AD_LAYOUT)
    ax, ay = anndata.read_h5ad(root / x_file), anndata.read_h5ad(root / y_file)
    if ax.n_obs != ay.n_obs:
        raise ConfigError(f"{root}: {x_file} has {ax.n_obs} cells but {y_file} has {ay.n_obs}; the cells must be paired")
    for adata, file in ((ax, x_file), (ay, y_file)):
        if label_key not in adata.obs:
            raise ConfigError(f"{root}/{file}: no obs column '{label_key}'; columns: {', '.join(adata.obs.columns) or '(none)'}")

    def dense(adata):
        return np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float64)

    codes = {c: i for i, c in enumerate(sorted(set(ax.obs[label_key].astype(str)) | set(ay.obs[label_key].astype(str))))}
    xl = np.array([codes[c] for c in ax.obs[label_key].astype(str)])
    yl = np.array([codes[c] for c in ay.obs[label_key].astype(str)])
    return PairedData(torch.from_numpy(dense(ax)), torch.from_numpy(dense(ay)), torch.from_numpy(xl), torch.from_numpy(yl), None, root.name)


def check_pair(data: PairedData) -> PairedData:
    for name, value in (("X", data.X), ("Y", data.Y), ("x_shared", data.x_shared), ("y_shared", data.y_shared)):
        if value is None:
            continue
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).any(1).sum())
            raise ConfigError(
                f"{data.name}: {name} has NaN or infinite values in {bad} rows (after loading and preprocessing: values near "
                f"the float range overflow when centred or scaled); clean or impute them first"
            )
    if len(data.X) < 2 or len(data.Y) < 2:
        raise ConfigError(f"{data.name}: need at least 2 points on each side, got {len(data.X)} and {len(data.Y)}")
    return data


def preprocess(data: PairedData, center: bool, normalize_rows: bool, scale: bool) -> PairedData:
    """Optionally ℓ2-normalise the raw rows (SCOT, SNARE-seq); centre columns; scale each side to top
    covariance eigenvalue 1."""
    X, Y = data.X.clone(), data.Y.clone()
    if normalize_rows:
        # before centring, as SCOT does: on SNARE-seq's ATAC topics (one dominant positive column) the
        # other order leaves inner-product GW preferring a wrong matching (README: FOSCTTM 0.63 vs 0.15)
        X = X / X.norm(dim=1, keepdim=True).clamp(min=1e-12)
        Y = Y / Y.norm(dim=1, keepdim=True).clamp(min=1e-12)
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    if scale:
        # top covariance eigenvalue 1 on each side: the alternating scheme leaves the trivial
        # fixed point (P = abᵀ, M = 0) only if ε < λ_max(Σ_x) λ_max(Σ_y), so ε is then on a known scale
        for name, Z in (("X", X), ("Y", Y)):
            if float(Z.abs().max()) < 1e-12:  # identical rows: nothing to scale, and nothing to align
                raise ConfigError(f"{data.name}: every row of {name} is the same after centring (no variation to align)")
        X = X / torch.linalg.eigvalsh(X.T @ X / len(X))[-1].sqrt()
        Y = Y / torch.linalg.eigvalsh(Y.T @ Y / len(Y))[-1].sqrt()
    shared = {}
    if data.x_shared is not None:  # centred and scaled together, so that their distances stay comparable
        both = torch.cat([data.x_shared, data.y_shared])
        both = both - both.mean(0) if center else both
        both = both / both.std().clamp(min=1e-12) if scale else both
        shared = {"x_shared": both[: len(X)], "y_shared": both[len(X) :]}
    return PairedData(X, Y, data.x_labels, data.y_labels, data.true_map, data.name, **shared)


SOURCES = {  # data.source → its pair: generated (the first two) or read from data.root
    "planted": lambda d, seed: planted_pair(d.n, d.informative, d.nuisance, d.dy, d.extra_nonzeros, d.clusters, d.noise, seed),
    "multiomics": lambda d, seed: multiomics_pair(d.n, d.latent, d.dx, d.dy, d.clusters, d.noise, seed, d.shared),
    "scot": lambda d, seed: load_scot(d.root, d.x_file, d.y_file, d.x_labels, d.y_labels, x_shared=d.x_shared, y_shared=d.y_shared),
    "h5ad": lambda d, seed: load_h5ad(d.root, d.x_file, d.y_file, d.label_key),
}
GENERATED_SOURCES = ("planted", "multiomics")


def check_source(d: DictConfig) -> None:
    if d.source not in SOURCES:
        raise ConfigError(f"unknown data.source '{d.source}'; valid: {', '.join(SOURCES)}")
    if d.source not in GENERATED_SOURCES and not d.root:
        layout = SCOT_LAYOUT if d.source == "scot" else H5AD_LAYOUT
        raise ConfigError(f"data.source={d.source} needs data.root=<folder>; expected layout: {layout}")
    check_root_is_read(d, GENERATED_SOURCES, SOURCES, key="source")
    if d.source == "h5ad" and not (d.x_file.endswith(".h5ad") and d.y_file.endswith(".h5ad")):  # the defaults are scot's
        raise ConfigError(
            f"data.source=h5ad reads AnnData files: give data.x_file=<name>.h5ad data.y_file=<name>.h5ad (got {d.x_file}, {d.y_file})"
        )
    if d.source in GENERATED_SOURCES and d.clusters > d.n:  # (clusters without a cell: label transfer scored on fewer)
        raise ConfigError(f"data.clusters={d.clusters} exceeds the data.n={d.n} cells generated; give at most {d.n}")


def build_pair(cfg: DictConfig) -> PairedData:
    d = cfg.data
    check_source(d)
    data = SOURCES[d.source](d, cfg.seed)
    return check_pair(preprocess(check_pair(data), d.center, d.normalize_rows, d.scale))


class _Whole(Dataset):
    """The whole pair, once per outer iteration of the solver (one training step each)."""

    def __init__(self, data: PairedData, iterations: int):
        self.data, self.iterations = data, iterations

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, index: int) -> PairedData:
        return self.data


class PairedSpacesDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.pair: PairedData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pair is None:
            self.pair = build_pair(self.cfg)

    def train_dataloader(self):
        from common.data import make_loader

        return make_loader(_Whole(self.pair, self.cfg.solver.max_iter), batch_size=None)  # its position resumes
