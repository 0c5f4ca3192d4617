"""Sample quality as a distribution distance, computed offline in numpy: Fréchet distance on PCA features.

FID needs a pretrained Inception network, which cannot be downloaded here, and on 16x16 one-channel digits its
ImageNet features would say little anyway. The same Fréchet distance (Heusel et al. 2017) on the top principal
components of the real training images measures what matters for this data: whether samples match the real
digits' mean and covariance along the directions in which real digits vary. PCA is fitted on the train split
only; samples are compared with the held-out test split; the real-vs-real floor (train images vs the same
test split, at the same sample count) says which distances are sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 20 components hold ~90% of the digits' pixel variance at 16x16 and keep the 20x20 covariance well estimated
# from a few hundred images (n >> d, so the Fréchet distance's own small-sample bias stays small).
PCA_COMPONENTS = 20


@dataclass(frozen=True)
class PCAFeatures:
    """Projection of images (N, C, H, W) in [-1, 1] onto the top principal components of a reference set."""

    mean: np.ndarray        # (D,) pixel mean of the fitting set
    components: np.ndarray  # (k, D) orthonormal rows, largest variance first
    explained: float        # fraction of the fitting set's variance the k components hold

    @classmethod
    def fit(cls, images: np.ndarray, k: int = PCA_COMPONENTS) -> "PCAFeatures":
        x = images.reshape(len(images), -1).astype(np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s ** 2
        return cls(mean, vt[:k], float(var[:k].sum() / var.sum()))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float64)
        return (x - self.mean) @ self.components.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature rows a (N, k) and b (M, k)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))): a symmetric PSD matrix, so no complex
    # square roots (scipy's sqrtm route) are needed.
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = float(np.sqrt(np.clip(cross, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_cross)


def real_floor(features: PCAFeatures, train: np.ndarray, test: np.ndarray, n: int, draws: int = 5,
               seed: int = 0) -> tuple[float, float]:
    """Mean and std of FD(n random train images, test): the distance of real digits at the same sample count."""
    rng = np.random.default_rng(seed)
    f_test = features(test)
    d = [frechet_distance(features(train[rng.choice(len(train), n, replace=False)]), f_test) for _ in range(draws)]
    return float(np.mean(d)), float(np.std(d))
