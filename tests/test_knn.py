"""Weighted k-NN on frozen features against a brute-force hand computation."""
import math

import torch

from mim.train import knn


def brute_force(bank, labels, queries, num_classes, k, t):
    out = []
    for q in queries:
        sims = []
        for b, y in zip(bank, labels):
            cos = float(q @ b) / (math.sqrt(float(q @ q)) * math.sqrt(float(b @ b)))
            sims.append((cos, int(y)))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for cos, y in sims[:k]:
            votes[y] += math.exp(cos / t)
        out.append(votes)
    return torch.tensor(out)


def test_knn_votes_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=g)
    queries = torch.randn(7, 5, generator=g, dtype=torch.float64)
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.5), (50, 0.07)):
        got = knn.classify(bank, labels, queries, 4, k=k, temperature=t, chunk=3)
        want = brute_force(bank, labels, queries, 4, min(k, 30), t)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-3)


def test_knn_finds_the_nearest_class():
    # two well separated clusters: every query takes the label of its own cluster
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    bank = torch.cat([c + 0.1 * torch.randn(10, 3, generator=g) for c in centres])
    labels = torch.arange(2).repeat_interleave(10)
    queries = centres + 0.1 * torch.randn(2, 3, generator=g)
    assert knn.classify(bank, labels, queries, 2, k=5).argmax(1).tolist() == [0, 1]
