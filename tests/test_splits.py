import pytest
import torch

from medmpc.imaging.splits import partition, partition_table, stratified_split

LABELS = torch.tensor([0] * 300 + [1] * 600 + [2] * 300)


def _fractions(idx):
    return torch.bincount(LABELS[idx], minlength=3).double() / len(idx)


def test_stratified_split_is_disjoint_reproducible_and_stratified():
    tr, va = stratified_split(LABELS, 0.2, seed=5)
    tr2, va2 = stratified_split(LABELS, 0.2, seed=5)
    _, va3 = stratified_split(LABELS, 0.2, seed=6)
    assert torch.equal(va, va2) and torch.equal(tr, tr2) and not torch.equal(va, va3)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == len(LABELS)
    assert torch.allclose(_fractions(va), torch.tensor([0.25, 0.5, 0.25], dtype=torch.double))


def test_iid_partition_covers_everything_with_equal_class_mix():
    parts = partition(LABELS, 4, "iid", seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(LABELS)))
    for p in parts:
        assert len(p) == 300
        assert torch.allclose(_fractions(p), torch.tensor([0.25, 0.5, 0.25], dtype=torch.double), atol=0.01)


def test_dirichlet_skews_labels_more_for_small_alpha():
    def skew(scheme):
        parts = partition(LABELS, 5, scheme, seed=1)
        assert sorted(torch.cat(parts).tolist()) == list(range(len(LABELS)))
        return torch.stack([_fractions(p) for p in parts]).std(0).mean()

    assert skew("dirichlet:0.1") > 5 * skew("iid")
    assert skew("dirichlet:0.1") > skew("dirichlet:100")


def test_unequal_sizes_follow_weights():
    parts = partition(LABELS, 3, "sizes:6,3,1", seed=0)
    assert [len(p) for p in parts] == [720, 360, 120]


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:-1", "sizes:1,2", "zipf", "iid:3"])
def test_bad_schemes_are_rejected(scheme):
    with pytest.raises(ValueError, match="dirichlet|sizes|unknown"):
        partition(LABELS, 3, scheme)


def test_partition_table_lists_counts():
    parts = partition(LABELS, 2, "iid")
    table = partition_table(parts, LABELS, ("normal", "bacterial", "viral"))
    assert table.splitlines()[0].split() == ["hospital", "normal", "bacterial", "viral", "total"]
    assert table.splitlines()[1].split() == ["0", "150", "300", "150", "600"]
