"""Linalg family: every implementation of the sketch ops against the reference (dense and CSR, every
kind of Omega, dtypes, layouts, odd shapes, offsets), Omega's definition, random projections'
norms, randomized_svd's accuracy contract (synthetic spectra and a Gowalla-shaped interaction
matrix, against a full SVD or scipy's svds and scikit-learn's randomized_svd at the same k,
oversampling and iterations; the comparisons with scikit-learn skip without it),
orthonormality, the sign convention, reproducibility (across thread counts for small matrices), CholeskyQR2's
fallbacks, the memory of a sketch (Omega is never stored), gradients, opcheck, one compile and
bad input for every input form (empty, not 2-D, non-finite, non-float, bad k)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

import diffcore
from diffcore import linalg
from diffcore.linalg import RankDeficiencyWarning
from diffcore.reference import linalg as ref
from diffcore.reference.random import normal, philox4x32_10
from diffcore.sparse import Adjacency
from tests.utils import impl_params, maybe_use, strided_rows

KINDS = ("gaussian", "rademacher", "sparse")
DTYPES = (torch.float32, torch.float64)


@pytest.fixture
def one_thread():
    """The accuracy tests' matrices are small: one thread runs them fastest, and a shared machine's
    busy cores cannot stall their many small parallel regions (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scale_of(k, kind, density=None):
    return 1.0 / np.sqrt(k * ((density or 1 / 3) if kind == "sparse" else 1.0))


def tolerance(dtype, kind):
    """float32: 1e-5 (relative to max |ref|); float64: exact signs to 1e-12, Gaussian normals to
    their few float32 ulp (the normals are float32 in every backend)."""
    if dtype == torch.float32:
        return 1e-5
    return 2e-6 if kind == "gaussian" else 1e-12


def assert_sketch_close(out, expected, dtype, kind):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tol = tolerance(dtype, kind) * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)


def interactions(n_users, n_items, nnz, seed, alpha=0.5):
    """A binary (n_users x n_items) scipy CSR matrix of distinct interactions with power-law user
    and item degrees (the bench's Gowalla generator, smaller)."""
    g = torch.Generator().manual_seed(seed)
    pu = torch.arange(1, n_users + 1, dtype=torch.float64) ** -alpha
    pi = torch.arange(1, n_items + 1, dtype=torch.float64) ** -alpha
    keys = torch.unique(torch.multinomial(pu, 2 * nnz, True, generator=g) * n_items
                        + torch.multinomial(pi, 2 * nnz, True, generator=g))[:nnz]
    keys = keys[torch.randperm(keys.numel(), generator=g)][:nnz]
    rows, cols = (keys // n_items).numpy(), (keys % n_items).numpy()
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))


def sparse_inputs(R: sp.csr_matrix, dtype):
    """The same matrix as scipy CSR, torch COO (uncoalesced order) and torch CSR."""
    R = R.astype(np.float32 if dtype == torch.float32 else np.float64)
    coo = R.tocoo()
    perm = np.random.default_rng(0).permutation(coo.nnz)
    t_coo = torch.sparse_coo_tensor(torch.tensor(np.stack([coo.row[perm], coo.col[perm]]), dtype=torch.long),
                                    torch.tensor(coo.data[perm]), R.shape, check_invariants=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t_csr = torch.sparse_csr_tensor(torch.tensor(R.indptr, dtype=torch.long),
                                        torch.tensor(R.indices, dtype=torch.long), torch.tensor(R.data), R.shape,
                                        check_invariants=True)
    return {"scipy": R, "torch_coo": t_coo, "torch_csr": t_csr}


def synthetic(m, n, spectrum, seed=0, dtype=torch.float64):
    """U diag(spectrum) V^T with Haar-random U, V."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((U * torch.as_tensor(spectrum, dtype=torch.float64)) @ V.T).to(dtype)


def sklearn_randomized_svd():
    """scikit-learn's ``sklearn.utils.extmath.randomized_svd``; skips the test without scikit-learn
    (``pip install .[test]`` installs it)."""
    return pytest.importorskip("sklearn.utils.extmath").randomized_svd


def errors(A_dense: np.ndarray, truth: np.ndarray, U, S, Vh):
    """(mean_i |S_i - sigma_i| / sigma_0 over the top k, ||A - U S Vh||_F)."""
    U, S, Vh = (np.asarray(x, dtype=np.float64) for x in (U, S, Vh))
    k = len(S)
    sv_err = float(np.mean(np.abs(S - truth[:k])) / truth[0])
    residual = float(np.linalg.norm(A_dense - (U * S) @ Vh))
    return sv_err, residual


# --- Omega's definition -------------------------------------------------------------------------
def test_omega_stream_definition():
    """Omega[i, j] is element i * k + j of the stream: Gaussian = the normal stream; the signs are
    bit 31 of word (i k + j) % 4 of counter offset + (i k + j) // 4; sparse keeps bits 7..30 < t."""
    n, k, seed, offset = 13, 7, 2**64 - 5, 2**32 - 3
    assert torch.equal(ref.omega(n, k, "gaussian", seed=seed, offset=offset), normal(n * k, seed, offset).reshape(n, k))
    counters = torch.arange(offset, offset + (n * k + 3) // 4)
    w = torch.stack(philox4x32_10(counters, seed), 1).reshape(-1)[: n * k]
    signs = torch.where(w >= 2**31, -1.0, 1.0).reshape(n, k)
    assert torch.equal(ref.omega(n, k, "rademacher", seed=seed, offset=offset), signs)
    kept = (((w >> 7) & 0xFFFFFF) < int(0.25 * 2**24)).reshape(n, k)
    assert torch.equal(ref.omega(n, k, "sparse", 0.25, seed=seed, offset=offset), signs * kept)


@pytest.mark.parametrize("kind", KINDS)
def test_random_projection_preserves_norms(kind):
    """E ||x Omega c||^2 = ||x||^2: the mean ratio over 2,000 rows is 1 within 6 standard errors;
    a sparse Omega has density 1/3 and a Rademacher one only +-1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 300, generator=g, dtype=torch.float64)
    y = linalg.random_projection(x, 64, kind, seed=9)
    ratio = (y.square().sum(1) / x.square().sum(1)).numpy()
    assert abs(ratio.mean() - 1) < 6 * ratio.std() / np.sqrt(len(ratio))
    Omega = ref.omega(4000, 64, kind)
    if kind == "rademacher":
        assert set(Omega.unique().tolist()) == {-1.0, 1.0}
    if kind == "sparse":
        assert abs(float((Omega != 0).double().mean()) - 1 / 3) < 0.005
        assert set(Omega.unique().tolist()) == {-1.0, 0.0, 1.0}


# --- sketches: every implementation against the reference ----------------------------------------
@pytest.mark.parametrize("name", impl_params("linalg_sketch"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_sketch_matches_reference(name, dtype):
    triton = name == "triton"
    shapes = [((5, 37), 7), ((3, 70), 20)] if triton else [((37, 53), 7), ((5, 301), 70), ((1, 1), 1),
                                                              ((64, 1500), 33), ((2, 10), 200)]
    layouts = ["column_major"] if triton else ["contiguous", "row_stride", "column_major"]
    draws = [("gaussian", None, 0, 0), ("rademacher", None, 2**64 - 1, 2**32 - 2), ("sparse", 0.1, 5, 3)]
    if not triton:
        draws.append(("sparse", None, 2**63 + 1, 11))
    g = torch.Generator().manual_seed(1)
    for shape, k in shapes:
        A = torch.randn(shape, generator=g, dtype=dtype)
        expected = [ref.sketch(A, k, kind, density or 1 / 3, scale_of(k, kind, density), seed, offset)
                    for kind, density, seed, offset in draws]
        plain = A @ ref.omega(shape[1], k, seed=7, dtype=dtype)
        for layout in layouts:
            A_laid = strided_rows(A, layout)
            for (kind, density, seed, offset), want in zip(draws, expected):
                with diffcore.use(name):
                    out = linalg.random_projection(A_laid, k, kind, seed, density=density, offset=offset)
                assert_sketch_close(out, want, dtype, kind)
            with diffcore.use(name):
                out = linalg.sketch(A_laid, k, seed=7)
            assert_sketch_close(out, plain, dtype, "gaussian")


def csr_matrices(dtype):
    """(name, operand, dense truth): binary and weighted matrices with empty rows and columns and a
    hub row, in each input form, int32 and int64 indices, and an Adjacency (float32 only)."""
    R = interactions(23, 41, 150, seed=4).tolil()
    R[0, :30] = 1.0  # a hub
    R = R.tocsr()
    weighted = R.copy()
    weighted.data = (np.arange(R.nnz) % 7 + 0.37).astype(np.float32)
    out = []
    for label, M in (("binary", R), ("weighted", weighted)):
        for form, operand in sparse_inputs(M, dtype).items():
            out.append((f"{label} {form}", operand, torch.tensor(M.toarray(), dtype=dtype)))
    float64_values = weighted.astype(np.float64)
    float64_values.data = float64_values.data + 1e-9  # not representable in float32
    if dtype == torch.float64:
        out.append(("float64 values", float64_values, torch.tensor(float64_values.toarray())))
    if dtype == torch.float32:
        adj = Adjacency.from_interactions(*map(torch.tensor, R.nonzero()), 23, 41)
        out.append(("adjacency", adj, adj.to_sparse_coo().to_dense()))
        big = Adjacency.from_interactions(*map(torch.tensor, R.nonzero()), 23, 41, index_dtype=torch.int64)
        out.append(("adjacency int64", big, big.to_sparse_coo().to_dense()))
    return out


@pytest.mark.parametrize("name", impl_params("linalg_sketch_csr"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_csr_sketch_matches_reference(name, dtype):
    triton = name == "triton"
    ks = (5,) if triton else (5, 70, 1)
    draws = [("gaussian", None, 2**64 - 1, 2**32 - 2), ("sparse", 0.5, 3, 1)]
    if not triton:
        draws.append(("rademacher", None, 0, 0))
    matrices = csr_matrices(dtype)
    if triton:  # interpreted: one form of each matrix
        matrices = [m for m in matrices if m[0].endswith(("torch_coo", "values", "int64"))]
    for label, operand, dense in matrices:
        for k in ks:
            for kind, density, seed, offset in draws:
                with diffcore.use(name):
                    out = linalg.random_projection(operand, k, kind, seed, density=density, offset=offset)
                expected = ref.sketch(dense, k, kind, density or 1 / 3, scale_of(k, kind, density), seed, offset)
                assert out.dtype == dense.dtype, label
                assert_sketch_close(out, expected, dense.dtype, kind)


def test_csr_sketch_tiles_threads_and_large_k():
    """Omega tiles of the CPU kernel (1 MB each) span the columns: a matrix with more columns than a
    tile, every thread count, equal to the reference and to the dense kernel's result."""
    R = interactions(300, 9000, 4000, seed=5)
    dense = torch.tensor(R.toarray())
    expected = ref.sketch(dense, 40, seed=2)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(linalg.sketch(R, 40, seed=2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(outs[0], expected, rtol=0, atol=atol)
    torch.testing.assert_close(linalg.sketch(dense, 40, seed=2), outs[0], rtol=0, atol=atol)


def test_zero_sparse_matrix_sketches_to_zeros():
    """A sparse matrix without nonzeros is a zero matrix, not an empty one: its sketch is zeros."""
    expected = torch.zeros(4, 3)
    for form, operand in sparse_inputs(sp.csr_matrix((4, 6), dtype=np.float32), torch.float32).items():
        assert torch.equal(linalg.sketch(operand, 3), expected), form
        assert torch.equal(linalg.random_projection(operand, 3, "sparse"), expected), form


@pytest.mark.parametrize("name", [None, *impl_params("linalg_sketch")])
def test_sketch_gradient(name):
    """Through the dispatcher and under diffcore.use(name) (the op's autograd formula)."""
    A = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    with maybe_use(name):
        assert torch.autograd.gradcheck(lambda a: linalg.random_projection(a, 4, "sparse", 5, offset=2), (A,))
        assert torch.autograd.gradcheck(lambda a: linalg.sketch(a.t(), 3, seed=1), (A,))


def test_sketch_gradient_on_two_threads():
    """More rows than one block of the dense sketch (256): the blocks' GEMMs run on worker threads,
    which the autograd dispatch's exclusion does not reach; the gradient is still Omega's row sums."""
    A = torch.randn(700, 30, dtype=torch.float64, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Y = linalg.sketch(A, 5, seed=3)
        Y.sum().backward()
    finally:
        torch.set_num_threads(threads)
    omega = diffcore.random.randn(30, 5, seed=3).double()
    torch.testing.assert_close(Y, A.detach() @ omega)
    torch.testing.assert_close(A.grad, omega.sum(1).expand(700, 30))


@pytest.mark.parametrize("op", ["linalg_sketch", "linalg_sketch_csr"])
def test_opcheck(op):
    if op == "linalg_sketch":
        A = torch.randn(7, 11, requires_grad=True)
        args = (A, 5, "rademacher", 1 / 3, 0.5, 3, 1)
    else:
        R = sp.random(7, 11, density=0.3, format="csr", random_state=1, dtype=np.float32)
        args = (torch.tensor(R.indptr, dtype=torch.long), torch.tensor(R.indices), torch.tensor(R.data), None,
                torch.rand(11), 11, 5, "gaussian", 1 / 3, 0.5, 3, 1, torch.float32)
    torch.library.opcheck(getattr(torch.ops.diffcore, op).default, args)


def test_compile_fullgraph():
    """One inductor compile for the family: a random projection inside a model, forward and backward."""
    x = torch.randn(16, 40, requires_grad=True)

    def model(v):
        return (linalg.random_projection(torch.tanh(v), 8, "rademacher", seed=4) ** 2).sum()

    compiled = torch.compile(model, fullgraph=True)
    got = torch.autograd.grad(compiled(x), x)[0]
    expected = torch.autograd.grad(model(x), x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sketch_never_stores_omega():
    """Sketching (4 x 1,000,000) and a CSR matrix of 1,000,000 columns into k = 64 columns, where
    Omega would take 256 MB: the peak RSS (VmHWM, reset through /proc/self/clear_refs) grows by
    less than 32 MB (a tile and the output), while materialising an Omega of that size (the
    positive control) grows it by >= 240 MB."""
    script = textwrap.dedent("""
        import torch, numpy as np, scipy.sparse as sp
        from diffcore import linalg

        def mb(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) / 1024

        def peak_growth(fn):
            base = mb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            out = fn()
            return mb("VmHWM") - base, out

        torch.set_num_threads(2)
        n, k = 1_000_000, 64
        A = torch.randn(4, n)
        R = sp.random(6, n, density=2e-3, format="csr", random_state=0, dtype=np.float32)
        linalg.sketch(A[:, :5000], k)  # load the kernels and the BLAS
        linalg.sketch(R[:, :5000], k)
        dense, y = peak_growth(lambda: linalg.sketch(A, k, seed=1))
        csr, z = peak_growth(lambda: linalg.sketch(R, k, seed=1))
        control, omega = peak_growth(lambda: torch.empty(n, k).normal_())
        print(dense, csr, control, float(y.abs().sum() + z.abs().sum()) > 0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {proc.stderr.splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    dense, csr, control, nonzero = proc.stdout.split()
    assert nonzero == "True"
    assert float(control) >= 240, f"the control did not register Omega's 256 MB: {control} MB"
    assert float(dense) < 32 and float(csr) < 32, f"peak RSS grew by {dense} MB (dense), {csr} MB (CSR); Omega: 256 MB"


# --- randomized SVD: accuracy contract -----------------------------------------------------------
SPECTRA = {
    "fast decay": lambda: 0.7 ** np.arange(120),
    "slow decay": lambda: 1.0 / np.sqrt(1.0 + np.arange(120)),
    "rank-deficient": lambda: np.r_[np.linspace(3, 1, 15), np.zeros(105)],
}


SKLEARN_NORMALIZER = {"cholqr2": "auto", "qr": "QR", "lu": "LU", "none": "none"}
SEEDS = range(5)


def median_errors(A_dense, truth, runs):
    return np.median(np.array([errors(A_dense, truth, *run) for run in runs]), axis=0)


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_synthetic_vs_sklearn(spectrum, dtype, one_thread):
    """Top-k singular values (mean |S_i - sigma_i| / sigma_0) and the residual ||A - U S Vh||_F
    against the full SVD, median over 5 seeds: no worse than scikit-learn's algorithm at the same
    k, oversampling, iterations and normalizer (its default "auto" for cholqr2): within 1.5x its
    singular-value error and 1% of its residual (1.5x for "none"), or at rounding level. Every
    normalizer in float32; cholqr2 with 1 and "auto" (4) iterations in float64."""
    sk_randomized_svd = sklearn_randomized_svd()
    sigma = SPECTRA[spectrum]()
    A = synthetic(240, 160, sigma, seed=1, dtype=dtype)
    A_np = A.double().numpy()
    truth = np.linalg.svd(A_np, compute_uv=False)
    k, p = 16, 8
    floor = (1e-5 if dtype == torch.float32 else 1e-12) * truth[0]
    optimal = np.sqrt(np.sum(truth[k:] ** 2))
    configs = [(1, "cholqr2"), ("auto", "cholqr2")]
    if dtype == torch.float32:
        configs += [("auto", name) for name in ("qr", "lu", "none")]
    for q, normalizer in configs:
        theirs = median_errors(A_np, truth, [
            sk_randomized_svd(A.numpy(), k, n_oversamples=p, n_iter=q,
                              power_iteration_normalizer=SKLEARN_NORMALIZER[normalizer], random_state=s)
            for s in SEEDS])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankDeficiencyWarning)
            mine = median_errors(A_np, truth, [
                linalg.randomized_svd(A, k, oversample=p, n_iter=q, normalizer=normalizer, seed=s) for s in SEEDS])
        what = f"{spectrum} {dtype} q={q} {normalizer}: (sv err, residual) {mine} vs sklearn {theirs}"
        # "none" drowns the small directions in float32 rounding, so its error is the BLAS's: the
        # same algorithm and Omega through torch's (MKL) SGEMM lose up to 40% more than numpy's
        # (OpenBLAS) here, measured; the normalizers that keep the iterates conditioned match.
        slack = 1.5 if normalizer == "none" else 1.01
        assert mine[0] <= max(1.5 * theirs[0], floor), what
        assert mine[1] <= max(slack * theirs[1], optimal + 10 * floor), what


INTERACTIONS_K = 16


@pytest.fixture(scope="module")
def interaction_matrix():
    """A Gowalla-shaped binary interaction matrix (power-law degrees, 600 users x 900 items, 9,000
    interactions) as scipy CSR, its dense float64 copy and its top 17 singular values from scipy's
    svds (ARPACK)."""
    R = interactions(600, 900, 9000, seed=7)
    truth = np.sort(spla.svds(R.astype(np.float64), k=INTERACTIONS_K + 1, random_state=0, solver="arpack")[1])[::-1]
    return R, R.toarray().astype(np.float64), truth


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_interaction_matrix_vs_svds(dtype, interaction_matrix, one_thread):
    """k = 16, defaults (10 oversamples, 7 iterations): singular values against scipy's svds to
    1e-2 of the largest (a flat spectrum: the trailing values converge slowly); scipy, torch
    COO/CSR and dense input give the same triplets (the same Omega)."""
    R, R_dense, truth = interaction_matrix
    k = INTERACTIONS_K
    inputs = dict(sparse_inputs(R, dtype), dense=torch.tensor(R_dense, dtype=dtype))
    results = {form: linalg.randomized_svd(operand, k) for form, operand in inputs.items()}
    for form, (U, S, Vh) in results.items():
        assert U.dtype == S.dtype == Vh.dtype == dtype
        assert np.abs(S.double().numpy() - truth[:k]).max() / truth[0] < 1e-2, form
        torch.testing.assert_close(S, results["scipy"][1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_interaction_matrix_vs_sklearn(dtype, interaction_matrix, one_thread):
    """The same matrix, k = 16, defaults: singular-value error (against svds) and residual
    ||A - U S Vh||_F, median over 5 seeds, no worse than scikit-learn's randomized_svd with the
    same k, oversampling and iterations (1.5x its singular-value error, 1% of its residual)."""
    sk_randomized_svd = sklearn_randomized_svd()
    R, R_dense, truth = interaction_matrix
    k = INTERACTIONS_K
    R_typed = R.astype(np.float32 if dtype == torch.float32 else np.float64)
    theirs = median_errors(R_dense, truth, [
        sk_randomized_svd(R_typed, k, n_oversamples=10, n_iter=7, random_state=s) for s in SEEDS])
    mine = median_errors(R_dense, truth, [
        linalg.randomized_svd(R_typed, k, oversample=10, n_iter=7, seed=s) for s in SEEDS])
    assert mine[0] <= 1.5 * theirs[0], f"(sv err, residual) {mine} vs sklearn {theirs}"
    assert mine[1] <= 1.01 * theirs[1], f"(sv err, residual) {mine} vs sklearn {theirs}"


def test_adjacency_matches_its_dense_operator(one_thread):
    R = interactions(80, 120, 900, seed=2)
    adj = Adjacency.from_interactions(*map(torch.tensor, R.nonzero()), 80, 120)
    dense = adj.to_sparse_coo().to_dense()
    U, S, Vh = linalg.randomized_svd(adj, 10)
    U2, S2, Vh2 = linalg.randomized_svd(dense, 10)
    torch.testing.assert_close(S, S2, rtol=1e-4, atol=1e-6)
    # its singular values come in pairs (the bipartite graph's +-lambda): compare the spans
    torch.testing.assert_close(U @ U.T, U2 @ U2.T, rtol=0, atol=1e-3)
    truth = torch.linalg.svdvals(dense.double())[:10].float()  # a flat spectrum: 7 iterations get within 1%
    torch.testing.assert_close(S, truth, rtol=1e-2, atol=0)


# --- randomized SVD: properties ------------------------------------------------------------------
@pytest.mark.parametrize("normalizer", linalg.NORMALIZERS)
def test_orthonormal_float32(normalizer, one_thread):
    """U's columns and Vh's rows are orthonormal to 1e-5 in float32, dense and sparse."""
    A = synthetic(500, 300, 0.9 ** np.arange(150), seed=2, dtype=torch.float32)
    for operand in (A, sp.csr_matrix(interactions(500, 300, 4000, seed=3))):
        U, S, Vh = linalg.randomized_svd(operand, 24, normalizer=normalizer)
        eye = torch.eye(24)
        assert (U.T @ U - eye).abs().max() < 1e-5
        assert (Vh @ Vh.T - eye).abs().max() < 1e-5
        assert bool((S[:-1] >= S[1:]).all())


def test_sign_convention_and_reproducibility():
    """The largest-magnitude entry of each column of U is positive; the same seed gives the same
    result at 1 and 2 threads for matrices this small (MKL keeps their GEMMs on one thread; larger
    ones differ in the last bits across thread counts, as the module docstring says), another
    seed another Omega."""
    A = synthetic(200, 150, 0.8 ** np.arange(100), seed=4, dtype=torch.float32)
    R = interactions(400, 300, 3000, seed=6)
    threads = torch.get_num_threads()
    try:
        for operand in (A, R):
            results = []
            for t in (1, 2, 1):
                torch.set_num_threads(t)
                results.append(linalg.randomized_svd(operand, 12, seed=5))
            for other in results[1:]:
                assert all(torch.equal(x, y) for x, y in zip(results[0], other))
            U = results[0][0]
            assert bool((U[U.abs().argmax(0), torch.arange(12)] > 0).all())
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(linalg.sketch(A, 12, seed=5), linalg.sketch(A, 12, seed=6))


@pytest.mark.parametrize("name", impl_params("linalg_sketch"))
def test_every_implementation_agrees(name):
    """randomized_svd through each implementation of the sketch (and the SpMM of that name), dense
    and sparse: the same triplets as the cpu kernels and the reference algorithm (HMT, Householder
    QR) for the same Omega."""
    A = synthetic(40, 30, 0.6 ** np.arange(30), seed=5, dtype=torch.float64)
    R = sp.csr_matrix(interactions(30, 45, 200, seed=8), dtype=np.float64)
    for operand, dense in ((A, A), (R, torch.tensor(R.toarray()))):
        with diffcore.use(name):
            U, S, Vh = linalg.randomized_svd(operand, 5, n_iter=2, normalizer="cholqr2")
        Ur, Sr, Vhr = ref.randomized_svd(dense, 5, n_iter=2)
        torch.testing.assert_close(S, Sr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(U, Ur, rtol=0, atol=1e-8)
        torch.testing.assert_close(Vh, Vhr, rtol=0, atol=1e-8)


# --- CholeskyQR2 and its fallbacks ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cholqr2_ill_conditioned(dtype, one_thread):
    """Full-rank Y with cond(Y) 1e4 (float32: the float64 Gram needs no shift) or 1e12 (float64:
    shifted CholeskyQR3): orthonormal Q spanning Y, no warning."""
    g = torch.Generator().manual_seed(0)
    cond = 1e4 if dtype == torch.float32 else 1e12
    U, _ = torch.linalg.qr(torch.randn(400, 30, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    Y = ((U * torch.logspace(0, -np.log10(cond), 30, dtype=torch.float64)) @ V.T).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Q = linalg.cholqr2(Y)
    eps = float(torch.finfo(dtype).eps)
    assert (Q.T @ Q - torch.eye(30, dtype=dtype)).abs().max() < 50 * eps
    assert (Y - Q @ (Q.T @ Y)).abs().max() < 100 * eps * float(Y.abs().max())


def test_cholqr2_rank_deficient_says_so(one_thread):
    """A rank-deficient Y (rank 5 of 12) and a zero one: a RankDeficiencyWarning naming the rank,
    orthonormal Q spanning Y, never a NaN."""
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 12, generator=g, dtype=torch.float64)
    for matrix, rank in ((Y.float(), 5), (Y, 5), (torch.zeros(50, 8), 0)):
        with pytest.warns(RankDeficiencyWarning, match=f"rank-deficient \\(rank {rank}"):
            Q = linalg.cholqr2(matrix)
        assert bool(torch.isfinite(Q).all())
        eye = torch.eye(matrix.shape[1], dtype=matrix.dtype)
        assert (Q.T @ Q - eye).abs().max() < 1e-5
        assert (matrix - Q @ (Q.T @ matrix)).abs().max() < 1e-5 * max(1.0, float(matrix.abs().max()))


def test_rank_deficient_matrix_says_so(one_thread):
    """A of rank 8 < k = 12: a warning naming the rank, trailing singular values at rounding level,
    U and V still orthonormal; the zero matrix gives zeros, not NaN."""
    A = synthetic(100, 80, np.r_[np.linspace(5, 1, 8)], seed=3, dtype=torch.float32)
    for normalizer in linalg.NORMALIZERS:
        with pytest.warns(RankDeficiencyWarning, match="numerical rank 8 < k = 12"):
            U, S, Vh = linalg.randomized_svd(A, 12, normalizer=normalizer)
        assert float(S[8:].max()) < 1e-5 * float(S[0])
        assert (U.T @ U - torch.eye(12)).abs().max() < 1e-5
        assert (Vh @ Vh.T - torch.eye(12)).abs().max() < 1e-5
    with pytest.warns(RankDeficiencyWarning, match="numerical rank 0"):
        U, S, Vh = linalg.randomized_svd(torch.zeros(30, 20), 4)
    assert bool(torch.isfinite(U).all() and torch.isfinite(Vh).all()) and float(S.abs().max()) == 0
    for normalizer in linalg.NORMALIZERS:  # exactly rank 1: LU meets exactly zero pivots
        with pytest.warns(RankDeficiencyWarning, match="numerical rank 1 < k = 2"):
            U, S, Vh = linalg.randomized_svd(torch.ones(6, 5), 2, normalizer=normalizer)
        torch.testing.assert_close(S[0], torch.tensor(30.0).sqrt())


# --- randomized SVD: any scale ---------------------------------------------------------------------
SCALES = {torch.float32: (1e-30, 1e-8, 1e37), torch.float64: (1e-300, 1e-100, 1e300)}


def scaled_forms(scale: float, dtype: torch.dtype) -> dict[str, object]:
    """A Gaussian (40 x 30) matrix (dense and torch COO), a sparse (200 x 150) one with uniform
    values (scipy CSR: a flat spectrum, so the power iterations skip normalisations) and, in
    float32, a weighted symmetric Adjacency (norm="none"), all times ``scale``."""
    gaussian = torch.from_numpy(np.random.default_rng(0).standard_normal((40, 30)) * scale).to(dtype)
    uniform = sp.random(200, 150, density=0.05, random_state=0, format="csr") * scale
    forms = {
        "dense": gaussian,
        "torch_coo": gaussian.to_sparse(),
        "scipy_csr": uniform.astype(np.float32 if dtype == torch.float32 else np.float64),
    }
    if dtype == torch.float32:
        symmetric = sp.random(50, 50, density=0.1, random_state=1, format="csr")
        forms["adjacency"] = Adjacency.from_scipy((symmetric + symmetric.T) * scale, norm="none")
    return forms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_scale_gives_the_result_of_scale_one(dtype, one_thread):
    """A times 1e-30, 1e-8 or 1e30 (float32; 1e-300, 1e-100 or 1e300 in float64), every form and
    normalizer: S / scale, U and Vh as at scale 1, to rounding. Their Gram matrices and R^-1 used
    to under- or overflow: float32 x 1e-11 raised a LinAlgError and x 1e-12 lost 2% of S with the
    default cholqr2, a float32 sparse matrix x 1e-8 (no iterate normalised for three products)
    7%, float64 x 1e-200 35%; float64 x 1e160 raised an OverflowError (cholqr2) or a LinAlgError
    (qr)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    base = scaled_forms(1.0, dtype)
    for scale in SCALES[dtype]:
        for form, A in scaled_forms(scale, dtype).items():
            for normalizer in linalg.NORMALIZERS:
                U0, S0, Vh0 = linalg.randomized_svd(base[form], 5, normalizer=normalizer)
                U, S, Vh = linalg.randomized_svd(A, 5, normalizer=normalizer)
                where = f"{form} x {scale:g}, {normalizer}"
                torch.testing.assert_close(S / scale, S0, rtol=tol, atol=0, msg=where)
                torch.testing.assert_close(U, U0, rtol=0, atol=100 * tol, msg=where)
                torch.testing.assert_close(Vh, Vh0, rtol=0, atol=100 * tol, msg=where)


# --- bad input -----------------------------------------------------------------------------------
def every_form(dense: np.ndarray) -> dict[str, object]:
    """The (m, n) matrix ``dense`` as a dense tensor, torch COO, torch CSR, scipy CSR and scipy COO
    array (in its own dtype; scipy.sparse has no float16)."""
    t = torch.from_numpy(dense)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t_csr = t.to_sparse_csr()
    forms = {"dense": t, "torch_coo": t.to_sparse(), "torch_csr": t_csr}
    if dense.dtype != np.float16:
        forms.update(scipy_csr=sp.csr_matrix(dense), scipy_coo_array=sp.coo_array(dense))
    return forms


def entry_points(k: int = 1):
    """randomized_svd, sketch and every kind of random_projection, with k columns."""
    return {
        "randomized_svd": lambda A: linalg.randomized_svd(A, k),
        "sketch": lambda A: linalg.sketch(A, k),
        **{f"random_projection {kind}": (lambda A, kind=kind: linalg.random_projection(A, k, kind)) for kind in KINDS},
    }


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)], ids=str)
def test_empty_matrices_raise(shape):
    """An A without rows or columns raises a ValueError naming A, what was expected and what came
    (its kind and shape), for every input form and entry point."""
    operands = every_form(np.zeros(shape, np.float32))
    if shape[0] == shape[1]:
        no_nodes = torch.zeros(0, dtype=torch.long)
        operands["adjacency"] = Adjacency.from_interactions(no_nodes, no_nodes, 0, 0)
    kinds = {"dense": "a dense tensor", "torch_coo": "a torch sparse_coo tensor", "torch_csr": "a torch sparse_csr "
             "tensor", "scipy_csr": "a scipy.sparse csr_matrix", "scipy_coo_array": "a scipy.sparse coo_array",
             "adjacency": "a diffcore.sparse.Adjacency"}
    for form, A in operands.items():
        message = (f"A: expected a non-empty matrix \\(at least 1 row and 1 column\\), got {kinds[form]} of shape "
                   f"\\({shape[0]}, {shape[1]}\\)")
        for fn in entry_points().values():
            with pytest.raises(ValueError, match=message):
                fn(A)


def test_bad_k_raises():
    """k < 1 or k > min(m, n) (randomized_svd), k < 1 (sketches: k > n is a valid sketch), non-int
    k: a ValueError naming k, its range and A's shape, for every input form; numpy ints are ints."""
    dense = interactions(10, 8, 30, seed=1).toarray()
    operands = every_form(dense)
    adj = Adjacency.from_interactions(*map(torch.tensor, sp.csr_matrix(dense).nonzero()), 10, 8)
    operands["adjacency"] = adj
    for form, A in operands.items():
        m, n = A.shape
        for k in (0, -1, min(m, n) + 1, 2.0, True, None):
            with pytest.raises(ValueError, match=f"k: expected an int in \\[1, min\\(m, n\\)\\] = \\[1, {min(m, n)}\\] "
                               f"for A of shape \\({m}, {n}\\), got {k!r}"):
                linalg.randomized_svd(A, k)
        for k in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=f"k: expected a positive int, got {k!r}"):
                linalg.sketch(A, k)
            with pytest.raises(ValueError, match="k: expected a positive int"):
                linalg.random_projection(A, k, "rademacher")
        assert linalg.sketch(A, n + 5).shape == (m, n + 5), form
    U, S, Vh = linalg.randomized_svd(operands["dense"], np.int64(3), oversample=np.int32(2), n_iter=np.int64(1),
                                     seed=np.uint32(4))
    assert U.shape == (10, 3) and S.shape == (3,) and Vh.shape == (3, 8)
    assert linalg.sketch(operands["scipy_csr"], np.int32(4)).shape == (10, 4)


def test_not_2d_raises():
    """Vectors and batches, dense, torch sparse and scipy sparse: a ValueError naming the dimension."""
    operands = {
        "dense 1-D": torch.randn(10), "dense 3-D": torch.randn(2, 10, 8), "dense 0-D": torch.tensor(1.0),
        "torch_coo 1-D": torch.randn(10).to_sparse(), "torch_coo 3-D": torch.randn(2, 10, 8).to_sparse(),
        "scipy 1-D": sp.coo_array(np.ones(10, np.float32)),
    }
    for form, A in operands.items():
        for fn in entry_points().values():
            with pytest.raises(ValueError, match="A: expected a 2-D matrix, got"):
                fn(A)


def test_non_finite_raises():
    """NaN or Inf anywhere in A, every input form and entry point: randomized_svd and the sparse
    sketches raise ValueError before any product; a dense sketch finds them in the kernel
    (RuntimeError, so a compiled graph does not break)."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        dense = interactions(10, 8, 30, seed=1).toarray()
        dense[3, 4] = bad
        for form, A in every_form(dense).items():
            for name, fn in entry_points().items():
                error = RuntimeError if form == "dense" and name != "randomized_svd" else ValueError
                with pytest.raises(error, match="A: expected finite values, found NaN or Inf"):
                    fn(A)


def test_too_large_for_its_dtype_raises():
    """A whose largest singular value (or a dense A's sketch) exceeds its dtype's largest value,
    every form and normalizer: a ValueError naming A and the dtype (a float32 A raised a
    LinAlgError from inside the factorisations, a float64 one an OverflowError or a LinAlgError)."""
    entries = 0.5 + np.random.default_rng(0).random((6, 5))  # S[0] about 4 times the largest entry
    for dtype, big in ((np.float32, 1e38), (np.float64, 1e308)):
        name = np.dtype(dtype).name
        for form, A in every_form((entries * big).astype(dtype)).items():
            for normalizer in linalg.NORMALIZERS:
                with pytest.raises(ValueError, match=f"A: too large for {name}: its products .* exceed {name}'s "
                                   "largest value"):
                    linalg.randomized_svd(A, 2, normalizer=normalizer)


def test_what_has_no_backward_refuses_inputs_that_require_grad():
    """randomized_svd, cholqr2 and the sketch of a sparse A have no backward: an input that
    requires grad raises under grad mode (it used to give wrong or silently missing gradients);
    under no_grad they run, and a dense A's sketch stays differentiable."""
    D = torch.randn(8, 5, dtype=torch.float64)
    cases = [
        (lambda A: linalg.randomized_svd(A, 3), D, "A: randomized_svd is not differentiable"),
        (cholqr2_fn := lambda Y: linalg.cholqr2(Y), D, "Y: cholqr2 is not differentiable"),
        (lambda A: linalg.sketch(A, 3), D.to_sparse(), "A: the sketch of a sparse A is not differentiable"),
        (lambda A: linalg.random_projection(A, 3, "rademacher"), D.to_sparse_csr(),
         "A: the sketch of a sparse A is not differentiable"),
    ]
    for fn, A, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(A.clone().requires_grad_())
        with torch.no_grad():
            out = fn(A.clone().requires_grad_())
        assert not any(t.requires_grad for t in (out if isinstance(out, tuple) else (out,)))
    assert cholqr2_fn(D).shape == (8, 5)
    A = D.clone().requires_grad_()
    linalg.sketch(A, 3).sum().backward()
    torch.testing.assert_close(A.grad, ref.omega(5, 3, dtype=torch.float64).sum(1).expand(8, 5), rtol=1e-6, atol=1e-6)


def test_dense_sketch_finds_non_finite_values_without_a_pass_over_a():
    """The dense kernel finds NaN and Inf from its output blocks: in a column of A that meets
    only zeros of a sparse Omega (checked on its own), in every tile of Omega and in the last,
    partial block of rows. A finite A whose product overflows gives Inf, as A @ Omega does."""
    n = 60
    zero = torch.nonzero(ref.omega(n, 1, "sparse", 0.05, seed=3)[:, 0] == 0)[0].item()
    nonzero = torch.nonzero(ref.omega(n, 1, "sparse", 0.05, seed=3)[:, 0])[0].item()
    for col in (zero, nonzero):
        A = torch.randn(20, n)
        A[7, col] = float("nan")
        with pytest.raises(RuntimeError, match="A: expected finite values, found NaN or Inf"):
            linalg.random_projection(A, 1, "sparse", seed=3, density=0.05)
    k = 1024  # float64: tiles of 512 rows of Omega, so 1,100 columns make three
    for row, col in ((0, 3), (299, 700), (150, 1099)):
        A = torch.randn(300, 1100, dtype=torch.float64)
        A[row, col] = float("-inf")
        with pytest.raises(RuntimeError, match="A: expected finite values, found NaN or Inf"):
            linalg.sketch(A, k)
    A = torch.randn(4, 8)
    A[1] = 3e38
    out = linalg.sketch(A, 4)
    expected = A @ ref.omega(8, 4)
    assert bool(torch.isinf(out[1]).any()) and bool(torch.isinf(expected[1]).any())
    torch.testing.assert_close(out[[0, 2, 3]], expected[[0, 2, 3]])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.float16], ids=lambda d: np.dtype(d).name)
def test_non_float_dtypes_raise(dtype):
    """Integer, bool and half values, every input form and entry point: a TypeError naming A, the
    dtypes taken and the one given, and how to convert."""
    dense = interactions(10, 8, 30, seed=1).toarray().astype(dtype)
    for form, A in every_form(dense).items():
        convert = "A.astype\\(np.float32\\)" if form.startswith("scipy") else "A.to\\(torch.float32\\)"
        message = f"A: expected float32 or float64 values, got .*; convert with {convert}"
        for fn in entry_points().values():
            with pytest.raises(TypeError, match=message):
                fn(A)


def test_bad_input():
    A = torch.randn(10, 8)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        linalg.randomized_svd(np.ones((5, 4)), 2)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        linalg.sketch([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="layout"):
        linalg.sketch(A.to_sparse_csc(), 2)
    with pytest.raises(ValueError, match="normalizer"):
        linalg.randomized_svd(A, 2, normalizer="householder")
    with pytest.raises(ValueError, match="n_iter"):
        linalg.randomized_svd(A, 2, n_iter=-1)
    with pytest.raises(ValueError, match="oversample"):
        linalg.randomized_svd(A, 2, oversample=-3)
    with pytest.raises(ValueError, match="kind"):
        linalg.random_projection(A, 2, "uniform")
    with pytest.raises(ValueError, match="density"):
        linalg.random_projection(A, 2, "sparse", density=0.0)
    with pytest.raises(ValueError, match="only kind='sparse'"):
        linalg.random_projection(A, 2, "gaussian", density=0.5)
    with pytest.raises(ValueError, match="seed"):
        linalg.sketch(A, 2, seed=-(2**63) - 1)
    with pytest.raises(ValueError, match="tall"):
        linalg.cholqr2(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="sorted within each row"):  # direct op calls check indices
        torch.ops.diffcore.linalg_sketch_csr(torch.tensor([0, 2]), torch.tensor([3, 1], dtype=torch.int32), None,
                                             None, None, 5, 2, "gaussian", 1 / 3, 1.0, 0, 0, torch.float32)
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.diffcore.linalg_sketch(A, 2, "uniform", 1 / 3, 1.0, 0, 0)


def unchecked_coo(index: list[list[int]], shape: tuple[int, int] = (3, 4)) -> torch.Tensor:
    """A torch COO tensor that torch did not check (its indices may lie outside the shape)."""
    return torch.sparse_coo_tensor(torch.tensor(index), torch.ones(len(index[0])), shape, check_invariants=False)


def unchecked_csr(crow: list[int], col: list[int], shape: tuple[int, int] = (3, 4), nnz: int | None = None
                  ) -> torch.Tensor:
    """A torch CSR tensor that torch did not check (broken row pointers, column indices outside the
    shape, ``nnz`` values when given rather than one per column index)."""
    values = torch.ones(len(col) if nnz is None else nnz)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col), values, shape, check_invariants=False)


BAD_INDICES = {
    "coo negative row": (unchecked_coo([[0, -1], [1, 0]]), r"A: row indices: ids must be non-negative, got -1"),
    "coo row past m": (unchecked_coo([[0, 3], [1, 0]]), r"A: row indices: ids must be < 3, got 3"),
    "coo negative column": (unchecked_coo([[0, 1], [-2, 0]]), r"A: column indices: ids must be non-negative, got -2"),
    "coo column past n": (unchecked_coo([[0, 1], [1, 7]]), r"A: column indices: ids must be < 4, got 7"),
    "csr column past n": (unchecked_csr([0, 1, 1, 2], [0, 9]), r"A: col_indices: ids must be < 4, got 9"),
    "csr negative column": (unchecked_csr([0, 1, 1, 2], [0, -1]), r"A: col_indices: ids must be non-negative, got -1"),
    "csr crow too short": (unchecked_csr([0, 1, 2], [0, 1]), r"A: crow_indices: expected shape \(4,\) \(rows \+ 1\), "
                           r"got \(3,\)"),
    "csr crow not from 0": (unchecked_csr([1, 1, 2, 2], [0, 1]), r"A: crow_indices: expected a first entry of 0, "
                            r"got 1"),
    "csr crow decreasing": (unchecked_csr([0, 2, 1, 2], [0, 1]), r"A: crow_indices: expected non-decreasing row "
                            r"pointers, got entry 1 = 2 > entry 2 = 1"),
    "csr crow past nnz": (unchecked_csr([0, 1, 1, 5], [0, 1]), r"A: crow_indices: expected a last entry equal to the "
                          r"number of stored values \(2\), got 5"),
    "csr crow short of nnz": (unchecked_csr([0, 1, 1, 1], [0, 1]), r"A: crow_indices: expected a last entry equal to "
                              r"the number of stored values \(2\), got 1"),
    "csr values not one per column": (unchecked_csr([0, 1, 1, 2], [0, 1], nnz=5), r"A: values: expected shape "
                                      r"\(2,\) \(one per column index\), got \(5,\)"),
}


@pytest.mark.parametrize("case", BAD_INDICES, ids=str)
def test_bad_sparse_indices_raise(case):
    """Torch sparse tensors built with check_invariants=False and indices outside the shape or a
    broken CSR structure: a ValueError naming A's array, for every entry point, raised before any
    torch sparse conversion (torch's coalesce() and to_sparse_csc() crashed the process on them:
    segfault or glibc heap-corruption abort; a decreasing crow gave 'repeats can not be negative')."""
    A, message = BAD_INDICES[case]
    for name, fn in entry_points(2).items():
        with pytest.raises(ValueError, match=message):
            fn(A)


def test_falsely_coalesced_coo_is_coalesced():
    """A COO tensor flagged coalesced whose entries are unsorted and repeated (torch trusts the flag,
    so its coalesce() keeps them): sketched as its true sum, as the same tensor without the flag."""
    index, values = torch.tensor([[2, 0, 0], [1, 3, 3]]), torch.tensor([1.0, 2.0, 4.0])
    flagged = torch.sparse_coo_tensor(index, values, (3, 4), is_coalesced=True, check_invariants=False)
    honest = torch.sparse_coo_tensor(index, values, (3, 4), check_invariants=True)
    torch.testing.assert_close(linalg.sketch(flagged, 3), linalg.sketch(honest, 3))
    torch.testing.assert_close(linalg.sketch(flagged, 3), honest.to_dense() @ ref.omega(4, 3))


@pytest.mark.parametrize("shape", [(5, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cholqr2_no_columns(shape, dtype):
    """Y with no columns is tall (m >= n): its basis is empty, with the shape torch.linalg.qr gives
    (it indexed the last singular value of an empty R: IndexError)."""
    Y = torch.randn(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        Q = linalg.cholqr2(Y)
    assert Q.shape == torch.linalg.qr(Y).Q.shape == shape and Q.dtype == dtype
