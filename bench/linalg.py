"""Randomized SVD and sketches: ``diffcore.linalg`` against ``torch.svd_lowrank``, scikit-learn's
``randomized_svd`` and scipy's ``svds``, time and accuracy side by side.

Workloads (float32):
- gowalla: the Gowalla interaction matrix R, 29,858 users x 40,981 items, 810,128 interactions
  (binary, power-law degrees: bench.sparse's generator), as scipy CSR / torch CSR;
- dense: 20,000 x 2,000, ``G1 diag(s) G2`` with Gaussian G1 (20,000 x 256), G2 (256 x 2,000)
  and ``s_i = (1 + i)^-1/2``: a decaying spectrum.

Variants:
- ``randomized_svd k=64``: 10 oversamples and 7 power iterations (scikit-learn's defaults for
  k < 0.1 min(m, n)) for every randomized provider: diffcore (CholeskyQR2, Omega in the kernel),
  ``torch.svd_lowrank(A, q=74, niter=7)`` (Householder QR after every product, Omega
  materialised), scikit-learn's ``randomized_svd`` (LU; numpy) when it is installed and a
  transcription of its algorithm with numpy and scipy (the same calls) always, and scipy's
  ``svds`` (ARPACK, exact; the full suite only: about 35 s a call on Gowalla here). Every output
  is checked against the top-64 singular values from ``svds`` (computed once per case) and its
  accuracy lands in the notes: the largest relative error of S and the residual
  ``||A - U S Vh||_F`` over the optimal one (``||A||_F^2 - 2 sum_i S_i u_i^T A v_i + sum_i S_i^2``,
  exact for orthonormal U, V, so no dense A is formed).
- ``sketch k=64``: ``A @ Omega``; diffcore generates Omega in the kernel, the baselines draw it with
  ``torch.randn`` / numpy and multiply (torch CSR ``@``, scipy ``@``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch

import diffcore
from bench.core import ALLOCATING, EAGER, Case, Config, Inputs, Provider, Target, Workload, implementation_providers
from bench.sparse import power_law_interactions
from diffcore.reference import linalg as ref

FAMILY = "linalg"
DESCRIPTION = "randomized SVD (k = 64) and sketches of the Gowalla interaction matrix and a dense matrix"
OP_SVD, OP_SKETCH = "randomized_svd", "sketch"
K, OVERSAMPLE, N_ITER = 64, 10, 7
SVD_VARIANT = f"randomized_svd k={K}"
SKLEARN = "sklearn randomized_svd"
TRANSCRIPTION = "sklearn's algorithm (numpy transcription)"
SEED = 0


@dataclass(frozen=True)
class Matrix:
    workload: Workload
    nnz: int | None  # None: dense
    k: int


GOWALLA = Matrix(Workload("gowalla", (29_858, 40_981), "the Gowalla interaction matrix R, 810,128 interactions"),
                 810_128, K)
DENSE = Matrix(Workload("dense", (20_000, 2_000), "G1 diag((1 + i)^-1/2) G2, rank 256"), None, K)
SMOKE = [Matrix(Workload("smoke-sparse", (300, 400), "tiny, for the test suite"), 3_000, 8),
         Matrix(Workload("smoke-dense", (200, 100), "tiny, for the test suite"), None, 8)]

TARGETS = [
    Target(FAMILY, OP_SVD, "gowalla", GOWALLA.workload.shape, SVD_VARIANT, ALLOCATING, "diffcore:cpu", "vs_provider",
           3.0, baseline=baseline)
    for baseline in (SKLEARN, TRANSCRIPTION)
]

NOTES = [
    f"linalg: `{TRANSCRIPTION}` runs scikit-learn's randomized_svd line by line (numpy Omega, scipy.linalg.lu "
    "power iterations, economic QR, SVD of Q^T A, svd_flip) for machines without scikit-learn; it is the baseline "
    f"of the second Gowalla target, `{SKLEARN}` of the first",
    "linalg: diffcore's randomized_svd rows include converting the scipy CSR input (and building its transpose) "
    "in every call, as a user's call does",
]


def settings(suite: str) -> list[Matrix]:
    return SMOKE if suite == "smoke" else [GOWALLA, DENSE]


def cases(config: Config) -> list[Case]:
    out = []
    for matrix in settings(config.suite):
        if matrix.nnz is not None or config.suite != "quick":  # quick: the dense SVD, no target, is left out
            out.append(_svd_case(matrix, config))
        out.append(_sketch_case(matrix, config))
    return out


# --- inputs ---------------------------------------------------------------------------------------
def _matrix(matrix: Matrix, config: Config) -> Inputs:
    m, n = matrix.workload.shape
    if matrix.nnz is not None:
        users, items = power_law_interactions(m, n, matrix.nnz, config.seed)
        R = sp.csr_matrix((np.ones(users.numel(), np.float32), (users.numpy(), items.numpy())), shape=(m, n))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            torch_csr = torch.sparse_csr_tensor(torch.from_numpy(R.indptr.astype(np.int64)),
                                                torch.from_numpy(R.indices.astype(np.int64)), torch.from_numpy(R.data),
                                                (m, n), check_invariants=False)
        return {"A": R, "torch": torch_csr, "fro2": float(R.nnz)}
    g = torch.Generator().manual_seed(config.seed)
    r = min(256, n)
    s = (1.0 + torch.arange(r, dtype=torch.float32)) ** -0.5
    A = (torch.randn(m, r, generator=g) * s / math.sqrt(m)) @ (torch.randn(r, n, generator=g) / math.sqrt(n))
    A = A * math.sqrt(m)  # singular values ~ sqrt(m) s_i
    return {"A": A, "torch": A, "fro2": float(A.double().square().sum())}


def _truth(inputs: Inputs, k: int) -> np.ndarray:
    """The top-k singular values, from scipy's svds (ARPACK) in float64."""
    import scipy.sparse.linalg as spla

    A = inputs["A"]
    A64 = A.astype(np.float64) if sp.issparse(A) else A.double().numpy()
    return np.sort(spla.svds(A64, k=k, random_state=0, return_singular_vectors=False))[::-1]


# --- randomized SVD -------------------------------------------------------------------------------
def sklearn_randomized_svd(M, n_components: int, *, n_oversamples: int = 10, n_iter: int | str = "auto",
                           random_state: int = 0):
    """scikit-learn's randomized_svd (sklearn.utils.extmath, 1.5) with its defaults: Omega from
    numpy's normal, LU power iterations (none for n_iter <= 2), economic QR, the SVD of Q^T M,
    svd_flip; M transposed when it is wide."""
    rs = np.random.RandomState(random_state)
    n_random = n_components + n_oversamples
    n_samples, n_features = M.shape
    if n_iter == "auto":
        n_iter = 7 if n_components < 0.1 * min(M.shape) else 4
    transpose = n_samples < n_features
    if transpose:
        M = M.T
    Q = rs.normal(size=(M.shape[1], n_random)).astype(M.dtype, copy=False)
    for _ in range(n_iter):
        if n_iter <= 2:
            Q = M.T @ (M @ Q)
        else:
            Q, _ = sla.lu(M @ Q, permute_l=True)
            Q, _ = sla.lu(M.T @ Q, permute_l=True)
    Q, _ = sla.qr(M @ Q, mode="economic")
    B = np.asarray((M.T @ Q).T)
    Uhat, s, Vt = sla.svd(B, full_matrices=False, lapack_driver="gesdd")
    U = Q @ Uhat
    if not transpose:
        rows = np.argmax(np.abs(U), axis=0)
        signs = np.sign(U[rows, range(U.shape[1])])
    else:
        cols = np.argmax(np.abs(Vt), axis=1)
        signs = np.sign(Vt[range(Vt.shape[0]), cols])
    U, Vt = U * signs, Vt * signs[:, None]
    if transpose:
        return Vt[:n_components].T, s[:n_components], U[:, :n_components].T
    return U[:, :n_components], s[:n_components], Vt[:n_components]


def _accuracy(inputs: Inputs, U, S, Vh) -> tuple[float, float]:
    """(max_i |S_i - sigma_i| / sigma_i, ||A - U S Vh||_F / the optimal rank-k residual)."""
    U, S, Vh = (np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
                for x in (U, S, Vh))
    truth = inputs["truth"][: len(S)]
    A = inputs["A"]
    AV = A @ Vh.T.astype(np.float32) if sp.issparse(A) else A.double().numpy() @ Vh.T
    cross = float(np.sum(S * np.einsum("ij,ij->j", U, np.asarray(AV, dtype=np.float64))))
    residual2 = max(inputs["fro2"] - 2 * cross + float(np.sum(S**2)), 0.0)
    optimal2 = max(inputs["fro2"] - float(np.sum(truth**2)), 1e-30)
    return float(np.max(np.abs(S - truth) / truth)), math.sqrt(residual2 / optimal2)


def _svd_case(matrix: Matrix, config: Config) -> Case:
    w, k = matrix.workload, matrix.k
    sparse = matrix.nnz is not None
    op = "linalg_sketch_csr" if sparse else "linalg_sketch"
    notes = list(NOTES)  # the case's own list: the checks add the accuracy lines to it
    accuracy: dict[str, tuple[float, float]] = {}

    def check(name: str, limit: float = 0.05):
        def run(inputs: Inputs, out) -> str | None:
            U, S, Vh = out
            if "truth" not in inputs:
                inputs["truth"] = _truth(inputs, k)
            err, residual = _accuracy(inputs, U, S, Vh)
            accuracy[name] = (err, residual)
            notes.append(f"linalg accuracy, {w.name} k={k}: `{name}`: max |S_i - s_i| / s_i = {err:.2e} against svds, "
                         f"||A - U S Vh||_F = {residual:.6f} x the optimal")
            mine = accuracy.get("diffcore:cpu")
            if name in (SKLEARN, TRANSCRIPTION) and mine is not None:
                better = mine[0] <= err * 1.5 and mine[1] <= residual * (1 + 1e-4)
                notes.append(f"linalg accuracy, {w.name} k={k}: `diffcore:cpu` vs `{name}`: "
                             f"{'equal or better' if better else 'WORSE'} (S error {mine[0]:.2e} vs {err:.2e}, "
                             f"residual {mine[1]:.6f} vs {residual:.6f})")
            if not err <= limit or not residual <= 1 + limit:
                return f"inaccurate: max S error {err:.3g}, residual {residual:.4f} x the optimal"
            return None

        return run

    def diffcore_svd(inputs: Inputs):
        A = inputs["A"]
        return lambda: diffcore.linalg.randomized_svd(A, k, oversample=OVERSAMPLE, n_iter=N_ITER, seed=SEED)

    device_impl = "diffcore:cpu" if config.device.type == "cpu" else "diffcore:triton"
    providers, impl_notes = implementation_providers(
        op, config, calls={ALLOCATING: diffcore_svd}, checks={ALLOCATING: check(device_impl)}, numel=math.prod(w.shape),
    )
    notes[:0] = impl_notes

    def svd_lowrank(inputs: Inputs):
        A = inputs["torch"]

        def run():
            U, S, V = torch.svd_lowrank(A, q=k + OVERSAMPLE, niter=N_ITER)
            return U[:, :k], S[:k], V[:, :k].mT

        return run

    def transcription(inputs: Inputs):
        A = inputs["A"]
        M = A if sparse else A.numpy()
        return lambda: sklearn_randomized_svd(M, k, n_oversamples=OVERSAMPLE, n_iter=N_ITER, random_state=SEED)

    try:
        from sklearn.utils.extmath import randomized_svd as sk_randomized_svd
        sklearn_missing = None
    except ImportError as exc:
        sk_randomized_svd, sklearn_missing = None, f"scikit-learn is not installed ({exc})"

    def sklearn(inputs: Inputs):
        A = inputs["A"]
        M = A if sparse else A.numpy()
        return lambda: sk_randomized_svd(M, k, n_oversamples=OVERSAMPLE, n_iter=N_ITER, random_state=SEED)

    def svds(inputs: Inputs):
        import scipy.sparse.linalg as spla

        A = inputs["A"] if sparse else inputs["A"].numpy()

        def run():
            u, s, vt = spla.svds(A, k=k, random_state=0)
            order = np.argsort(s)[::-1]
            return u[:, order], s[order], vt[order]

        return run

    slow = "scipy svds (ARPACK) takes about 35 s a call on Gowalla here: --suite full" \
        if config.suite == "quick" and sparse else None
    cpu_only = None if config.device.type == "cpu" else "numpy and scipy run on the CPU only"
    providers += [
        Provider(f"torch.svd_lowrank (q={k + OVERSAMPLE}, niter={N_ITER})", ALLOCATING, setup=svd_lowrank,
                 check=check("torch.svd_lowrank"), role=EAGER),
        Provider(SKLEARN, ALLOCATING, setup=sklearn, check=check(SKLEARN), unavailable=sklearn_missing or cpu_only),
        Provider(TRANSCRIPTION, ALLOCATING, setup=transcription, check=check(TRANSCRIPTION), unavailable=cpu_only),
        Provider("scipy svds (ARPACK)", ALLOCATING, setup=svds, check=check("scipy svds", 1e-3),
                 unavailable=slow or cpu_only),
    ]
    m, n = w.shape
    elem = 4
    passes = 2 * N_ITER + 2  # products with A or A^T, each reading A and writing an (m or n) x l block
    a_bytes = matrix.nnz * 4 + (m + 1) * 8 if sparse else m * n * elem
    return Case(
        FAMILY, OP_SVD, w, f"randomized_svd k={k}",
        bytes_moved=passes * (a_bytes + max(m, n) * (k + OVERSAMPLE) * elem),
        make_inputs=lambda: _matrix(matrix, config),
        providers=providers,
        notes=notes,
    )


# --- sketches -------------------------------------------------------------------------------------
def _sketch_case(matrix: Matrix, config: Config) -> Case:
    w, k = matrix.workload, matrix.k
    sparse = matrix.nnz is not None
    op = "linalg_sketch_csr" if sparse else "linalg_sketch"
    m, n = w.shape

    def diffcore_sketch(inputs: Inputs):
        A = inputs["A"]
        return lambda: diffcore.linalg.sketch(A, k, seed=SEED)

    def exact(inputs: Inputs, out: torch.Tensor) -> str | None:
        """Against A @ Omega with Omega from the reference Philox stream (rows checked: 512)."""
        if "expected" not in inputs:
            A = inputs["A"]
            omega = ref.omega(n, k, seed=SEED)
            rows = slice(0, min(m, 512))
            inputs["expected"] = torch.from_numpy(np.asarray(A[rows] @ omega.numpy())) if sparse else \
                A[rows] @ omega
        expected = inputs["expected"]
        err = float((out[: expected.shape[0]] - expected).abs().max())
        bound = 1e-4 * max(1.0, float(expected.abs().max()))
        return None if err <= bound else f"max abs err {err:.3g} > {bound:.3g} against A @ Omega (reference Philox)"

    def norms(inputs: Inputs, out) -> str | None:
        """A Gaussian Omega from another generator: each column A w_j has E ||A w_j||^2 = ||A||_F^2;
        their mean over the k columns is within 6 standard errors of it."""
        col2 = torch.as_tensor(np.asarray(out)).double().square().sum(0)
        ratio = col2 / float(inputs["fro2"])
        mean, se = float(ratio.mean()), float(ratio.std()) / math.sqrt(k)
        if abs(mean - 1) <= 6 * se + 1e-3:
            return None
        return f"mean_j ||A w_j||^2 / ||A||_F^2 = {mean:.4f} +- {se:.4f}, expected 1"

    providers, impl_notes = implementation_providers(
        op, config, calls={ALLOCATING: diffcore_sketch}, checks={ALLOCATING: exact}, numel=m * k,
    )

    def torch_randn(inputs: Inputs):
        A = inputs["torch"]
        return lambda: A @ torch.randn(n, k)

    def numpy_normal(inputs: Inputs):
        A = inputs["A"]
        rng = np.random.default_rng(SEED)
        M = A if sparse else A.numpy()
        return lambda: M @ rng.standard_normal((n, k), dtype=np.float32)

    providers += [
        Provider("torch: A @ torch.randn(n, k)", ALLOCATING, setup=torch_randn, check=norms, role=EAGER),
        Provider("numpy: A @ standard_normal((n, k))" if not sparse else "scipy: R @ standard_normal((n, k))",
                 ALLOCATING, setup=numpy_normal, check=norms,
                 unavailable=None if config.device.type == "cpu" else "numpy and scipy run on the CPU only"),
    ]
    a_bytes = matrix.nnz * 4 + (m + 1) * 8 if sparse else m * n * 4
    return Case(
        FAMILY, OP_SKETCH, w, f"sketch k={k}",
        bytes_moved=a_bytes + m * k * 4,
        make_inputs=lambda: _matrix(matrix, config),
        providers=providers,
        notes=impl_notes + [
            "linalg sketch rows: diffcore generates Omega inside the kernel (never stored; checked against the "
            "reference Philox Omega); the baselines draw and store Omega (n x k) in every call, checked by "
            "norm preservation",
        ],
    )
