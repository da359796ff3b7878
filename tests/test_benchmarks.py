"""benchmarks/bench_speed.py counts what torch's FLOP counter does not know as the work it stands for."""
import sys
from pathlib import Path

import torch
import torch.utils.flop_counter
from torchvision.ops import deform_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_speed  # noqa: E402


def test_a_deformable_convolution_counts_as_its_dense_equivalent():
    x, weight = torch.randn(2, 8, 10, 12), torch.randn(6, 8, 3, 3)
    offset, mask = torch.zeros(2, 18, 5, 6), torch.ones(2, 9, 5, 6)
    deformable = bench_speed.gflop(lambda: deform_conv2d(x, offset, weight, stride=2, padding=1, mask=mask))
    dense = bench_speed.gflop(lambda: torch.nn.functional.conv2d(x, weight, stride=2, padding=1))
    assert deformable == dense > 0


def test_fused_attention_counts_as_the_unfused_layer():
    layer = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        fused = bench_speed.gflop(lambda: layer(x, x, x, need_weights=False))
        with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
            layer(x, x, x, need_weights=False)
        assert plain.get_total_flops() / 1e9 < fused  # the fast path is one op the counter alone misses
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = bench_speed.gflop(lambda: layer(x, x, x, need_weights=False))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert fused == unfused > 0
