"""Rank grid arithmetic of the mesh (pure: no processes)."""

from plait.mesh import ParallelDims


def test_coordinates_round_trip_with_tp_fastest():
    dims = ParallelDims(dp=2, tp=2, cp=1, pp=2)
    assert dims.world_size == 8
    assert dims.coords(1) == {"tp": 1, "cp": 0, "dp": 0, "pp": 0}
    assert dims.coords(2) == {"tp": 0, "cp": 0, "dp": 1, "pp": 0}
    assert dims.coords(4) == {"tp": 0, "cp": 0, "dp": 0, "pp": 1}
    assert all(dims.rank_of(dims.coords(r)) == r for r in range(8))


def test_groups_partition_the_world():
    dims = ParallelDims(dp=2, tp=2, cp=2, pp=1)
    assert dims.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.group_ranks("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for dim in ("tp", "cp", "dp", "pp"):
        members = sorted(r for g in dims.group_ranks(dim) for r in g)
        assert members == list(range(8))


def test_combined_dp_cp_groups():
    dims = ParallelDims(dp=2, tp=2, cp=2, pp=1)
    assert dims.group_ranks("dp", "cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
