import numpy as np
import pytest
import torch

from lorafusion.multi import AdapterSegments, AdapterSpec, MultiLoRALinear


def specs(*ranks):
    return {f"a{i}": AdapterSpec(r, 2.0 * r) for i, r in enumerate(ranks)}


def test_segments_runs_slots_and_offsets():
    seg = AdapterSegments([1, 1, -1, 0, 0, 0, 1, -1, -1, 3], specs(2, 4, 8, 16))
    assert seg.num_rows == 10
    assert seg.seg_host == [(0, 2, 1, 0), (3, 6, 0, 0), (6, 7, 1, 2), (9, 10, 2, 0)]
    assert seg.present_names == ["a0", "a1", "a3"]  # a2 absent: no slot
    assert seg.slot_host == [(2, 0, 0), (4, 2, 6), (16, 6, 18)]  # (rank, weight row offset, flat offset)
    assert seg.total_rank == 22 and seg.s_numel == 6 + 12 + 16
    lo, hi = seg.block_lookup_host(4)
    assert list(zip(lo, hi)) == [(0, 2), (1, 3), (3, 4)]
    assert seg.tiles_host(2) == [(0, 0), (1, 3), (1, 5), (2, 6), (3, 9)]
    np.testing.assert_array_equal(seg.rows_of("a1"), [0, 1, 6])


def test_names_and_tensor_ids_agree():
    sp = specs(1, 2)
    a = AdapterSegments(["a1", None, "a0", "a0"], sp)
    b = AdapterSegments(torch.tensor([1, -1, 0, 0]), sp)
    assert a.seg_host == b.seg_host and a.slot_host == b.slot_host


def test_tables_moved_once_per_device():
    seg = AdapterSegments([0, 0, 1], specs(2, 3))
    t1, t2 = seg.tables("cpu"), seg.tables(torch.device("cpu"))
    assert t1 is t2
    assert t1.block_lookup(16)[0] is t1.block_lookup(16)[0]


def test_empty_and_all_none():
    seg = AdapterSegments([-1, -1], specs(2))
    assert seg.present == [] and seg.seg_host == [] and seg.total_rank == 0
    assert AdapterSegments([], specs(2)).num_rows == 0


@pytest.mark.parametrize("ids, match", [([0, 5], "5"), ([0, -2], "-2"), (["a0", "zz"], "'zz'")])
def test_unknown_adapter_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        AdapterSegments(ids, specs(2, 3))


def test_duplicate_names_and_bad_specs():
    with pytest.raises(ValueError, match="duplicate adapter name 'x'"):
        AdapterSegments([0], [("x", AdapterSpec(2, 2)), ("x", AdapterSpec(4, 4))])
    with pytest.raises(ValueError, match="r=0"):
        AdapterSpec(0, 1.0)
    with pytest.raises(ValueError, match="r=257"):
        AdapterSpec(257, 1.0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        AdapterSpec(4, 1.0, 1.0)
    with pytest.raises(TypeError):
        AdapterSegments(torch.tensor([0.5]), specs(2))


def test_layer_bad_input():
    layer = MultiLoRALinear(torch.nn.Linear(20, 12))
    layer.add_adapter("a", 4, 8)
    with pytest.raises(ValueError, match="duplicate adapter name 'a'"):
        layer.add_adapter("a", 2, 2)
    with pytest.raises(ValueError, match="r=257"):
        layer.add_adapter("b", 257, 2)  # > MAX_RANK (above min(in, out) is allowed, as in PEFT)
    with pytest.raises(ValueError, match="r=0"):
        layer.add_adapter("b", 0, 2)
    with pytest.raises(ValueError, match="adapter name 'a.b'"):
        layer.add_adapter("a.b", 2, 2)
    seg = layer.make_segments(["a"] * 5)
    with pytest.raises(ValueError, match="6 rows but the segment layout has 5"):
        layer(torch.randn(6, 20), segments=seg)
    with pytest.raises(ValueError, match="no segment layout"):
        layer(torch.randn(5, 20))
    other = AdapterSegments([0] * 5, {"zz": AdapterSpec(4, 8)})
    with pytest.raises(ValueError, match="'zz'"):
        layer(torch.randn(5, 20), segments=other)
    mismatch = AdapterSegments([0] * 5, {"a": AdapterSpec(8, 8)})
    with pytest.raises(ValueError, match="'a'"):
        layer(torch.randn(5, 20), segments=mismatch)
    with pytest.raises(ValueError, match="unknown adapter 'q'"):
        layer.remove_adapter("q")
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(5, 21), segments=seg)
