# Omics-like tabular data for the supervised autoencoder of Barlaud, Perez & Marmorat (arXiv 2407.16293) and
# Perez & Barlaud (arXiv 2405.02086): many features (genes, metabolites), few samples, a handful of informative
# features. The authors' data sets (HIF2, LUNG, their Synth_1000f_64inf_1000s, ...) are CSV files we cannot
# download, so this module generates a synthetic stand-in with their published sizes (1000 features, 16 or 64
# informative, 1000 samples) and the traits that make feature selection hard:
#   - log-normal expression with per-feature baselines, a per-sample library-size factor (a shift common to all
#     features of a sample), and co-expression modules (features of a module share a latent factor), so that
#     noise features correlate with each other and with informative ones;
#   - informative features shift their log-expression by a class-specific amount (random sign per class);
#   - preprocessing as in the authors' pipeline: log1p, then standardisation with the training statistics.
# Real data sets that ship with scikit-learn are used when scikit-learn is installed (it is optional).
"""Synthetic omics-like classification data (known informative features) and scikit-learn's bundled data sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OmicsData", "SKLEARN_DATASETS", "load_sklearn", "make_omics", "standardize"]

SKLEARN_DATASETS = ("breast_cancer", "wine", "digits", "iris")


@dataclass(frozen=True)
class OmicsData:
    """A train/test split of a classification table.

    Attributes:
        x_train, x_test: float32 ``[n, F]`` (preprocessed: log1p + standardised with training statistics).
        y_train, y_test: int64 class labels ``[n]``.
        informative: indices of the truly informative features (``None`` for real data).
        name: where it came from.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    informative: torch.Tensor | None
    name: str

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


def standardize(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale both splits with the training mean and standard deviation (constant features -> 0)."""
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def _split(x: torch.Tensor, y: torch.Tensor, test_frac: float, gen: torch.Generator):
    """Stratified split: the same class proportions in train and test."""
    tr, te = [], []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(test_frac * idx.numel()))
        te.append(idx[:n_test])
        tr.append(idx[n_test:])
    tr_i, te_i = torch.cat(tr), torch.cat(te)
    tr_i = tr_i[torch.randperm(tr_i.numel(), generator=gen)]
    return x[tr_i], y[tr_i], x[te_i], y[te_i]


def make_omics(
    n_samples: int = 1000,
    n_features: int = 1000,
    n_informative: int = 16,
    n_classes: int = 2,
    *,
    effect: float = 0.8,
    module_size: int = 10,
    module_loading: float = 0.6,
    library_sd: float = 0.3,
    test_frac: float = 0.25,
    seed: int = 0,
) -> OmicsData:
    """Generate an omics-like classification problem (see the module header).

    Args:
        n_samples: samples in total (train + test).
        n_features: features (genes).
        n_informative: features whose distribution depends on the class.
        n_classes: number of classes (balanced).
        effect: size of the class shift of an informative feature, in units of its noise s.d.
        module_size: features per co-expression module (each shares one latent factor).
        module_loading: weight of the module factor in the log-expression.
        library_sd: s.d. of the per-sample shift common to all features.
        test_frac: fraction of samples held out (stratified).
        seed: the generator seed (the data are a pure function of the arguments).

    Returns:
        :class:`OmicsData` with ``informative`` set.

    Raises:
        ValueError: inconsistent sizes.

    Example:
        >>> d = make_omics(200, 100, 8, seed=1)
        >>> d.x_train.shape, d.informative.numel()
        (torch.Size([150, 100]), 8)
    """
    if not 0 < n_informative <= n_features:
        raise ValueError(f"need 0 < n_informative <= n_features, got {n_informative} and {n_features}")
    if n_classes < 2 or n_samples < 2 * n_classes:
        raise ValueError(f"need n_classes >= 2 and n_samples >= 2 * n_classes, got {n_classes} and {n_samples}")
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    if module_size < 1:
        raise ValueError(f"module_size must be >= 1, got {module_size}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_samples) % n_classes
    y = y[torch.randperm(n_samples, generator=g)]
    baseline = 2.0 + torch.randn(n_features, generator=g, dtype=torch.float64)  # per-feature mean log-expression
    n_modules = -(-n_features // module_size)
    factors = torch.randn(n_samples, n_modules, generator=g, dtype=torch.float64)
    module_of = torch.randperm(n_features, generator=g) % n_modules
    library = library_sd * torch.randn(n_samples, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    log_expr = baseline + library + module_loading * factors[:, module_of] + noise
    informative = torch.randperm(n_features, generator=g)[:n_informative].sort().values
    signs = torch.where(torch.rand(n_classes, n_informative, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    scale = 0.5 + torch.rand(n_classes, n_informative, generator=g, dtype=torch.float64)
    log_expr[:, informative] += effect * (signs * scale)[y]
    counts = torch.expm1(log_expr.clamp_min(0) * 1.5)  # nonnegative, heavy right tail like expression data
    x = torch.log1p(counts)
    x_tr, y_tr, x_te, y_te = _split(x, y, test_frac, g)
    x_tr, x_te = standardize(x_tr, x_te)
    return OmicsData(x_tr.float(), y_tr, x_te.float(), y_te, informative,
                     f"synthetic-omics-{n_features}f-{n_informative}inf-{n_samples}s")


def load_sklearn(name: str, *, test_frac: float = 0.25, seed: int = 0) -> OmicsData:
    """A data set bundled with scikit-learn (no download), split and standardised.

    Args:
        name: one of :data:`SKLEARN_DATASETS`.

    Raises:
        ImportError: scikit-learn is not installed (optional: the ``sae`` and ``dev`` extras install it).
        ValueError: unknown name.
    """
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"name must be one of {SKLEARN_DATASETS}, got {name!r}")
    try:
        from sklearn import datasets
    except ImportError as e:
        raise ImportError("load_sklearn needs scikit-learn, an optional dependency: pip install 'pflow-dist[sae]' "
                          "(or scikit-learn; the dev extra has it), or use make_omics for synthetic data") from e
    bunch = getattr(datasets, f"load_{name}")()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = _split(x, y, test_frac, g)
    x_tr, x_te = standardize(x_tr, x_te)
    return OmicsData(x_tr.float(), y_tr, x_te.float(), y_te, None, f"sklearn-{name}")
