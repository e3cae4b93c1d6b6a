"""End to end with and without diffcore: a DiffRec-style model and a LightGCN, on synthetic data.

    python examples/compat_e2e.py                 # small sizes (seconds)
    python examples/compat_e2e.py --full          # DESIGN.md sizes: 400 x 94,949 items; Gowalla-sized graph

Each part runs the original code (the transcriptions of DiffRec's GaussianDiffusion and DNN and of
LightGCN-PyTorch's LightGCN in ``models.py``): inference for a batch of users, their history
masked, top-k. Then the same object accelerated by ``diffcore.compat`` with ``diffcore.retrieval.topk``
for the last step; checks the outputs agree and prints the times. Noise is seeded identically, so
the results agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from models import DNN, GaussianDiffusion, LightGCN, diffrec_recommend, lightgcn_recommend, random_interactions, timed

from diffcore import retrieval
from diffcore.compat import diffrec, lightgcn


def same_top_k(values: torch.Tensor, ids: torch.Tensor, ref_values: torch.Tensor, ref_scores: torch.Tensor) -> None:
    """diffcore's top k equals the original's: the same values, and each returned item's original
    score equal to the original's value at that rank (a near-tie may pick the other item)."""
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_scores.gather(1, ids), ref_values, rtol=1e-4, atol=1e-4)


def main() -> None:
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="DESIGN.md sizes (slow on few cores)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    B, n_items = (400, 94_949) if args.full else (64, 4_000)
    n_users, n_graph_items, n_edges, n_scored = (29_858, 40_981, 810_128, 2_048) if args.full else (
        2_000, 3_000, 40_000, 256)

    # DiffRec: p_sample (T = 5, starting from q_sample at t = 4, sampling noise on), mask, top-100
    torch.manual_seed(0)
    diffusion, model = GaussianDiffusion(steps=5), DNN(n_items).eval()
    batch = (torch.rand(B, n_items) < 0.01).float()
    history = batch.nonzero(as_tuple=True)  # DiffRec masks his_data.nonzero()
    exclude = batch.to_sparse_csr()

    def original():
        torch.manual_seed(1)
        return diffrec_recommend(diffusion, model, batch, history, 100, sampling_steps=5, sampling_noise=True)

    def accelerated():
        torch.manual_seed(1)
        prediction = diffusion.p_sample(model, batch, 5, sampling_noise=True)
        return retrieval.topk(prediction, 100, exclude=exclude)

    with torch.no_grad():
        (ref_values, _, ref_scores), t_ref = timed(original, args.repeat)
        with diffrec.accelerate(diffusion):
            (values, ids), t_fast = timed(accelerated, args.repeat)
    same_top_k(values, ids, ref_values, ref_scores)
    print(f"DiffRec-style {B} x {n_items}, 5 steps + top-100: original {t_ref * 1e3:.1f} ms, "
          f"diffcore {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.2f}x)")

    # LightGCN: computer(), the first n_scored users against every item, history masked, top-20
    users, items = random_interactions(n_users, n_graph_items, n_edges)
    gcn = LightGCN(n_users, n_graph_items, users, items)
    seen = torch.zeros(n_scored, n_graph_items, dtype=torch.bool)
    scored = users < n_scored
    seen[users[scored], items[scored]] = True
    history, exclude = seen.nonzero(as_tuple=True), seen.to_sparse_csr()
    batch_users = torch.arange(n_scored)

    def accelerated_gcn():
        all_users, all_items = gcn.computer()
        return retrieval.topk(all_users[batch_users], 20, items=all_items, exclude=exclude)

    with torch.no_grad():
        (ref_values, _, ref_scores), t_ref = timed(lambda: lightgcn_recommend(gcn, batch_users, history, 20),
                                                   args.repeat)
        with lightgcn.accelerate(gcn):
            (values, ids), t_fast = timed(accelerated_gcn, args.repeat)
    same_top_k(values, ids, ref_values, ref_scores)
    print(f"LightGCN {n_users} + {n_graph_items} nodes, {n_edges} edges, 3 layers + top-20 of {n_scored} users: "
          f"original {t_ref * 1e3:.1f} ms, diffcore {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.2f}x)")


if __name__ == "__main__":
    main()
