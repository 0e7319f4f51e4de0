"""passes.upsample_gradients: a nearest upsampling's gradient is summed over windows
rather than scattered, and only where the two are provably the same sum."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from remat.passes.upsample_gradients import nearest_upsample_gradients
from remat.planning import plan_each
from tests.checks import torch_threads
from tests.zoo import UpsamplingDecoder

aten = torch.ops.aten
N, C, H, W = 2, 3, 4, 5


def _nearest(output: int, input: int) -> torch.Tensor:
    """Nearest source indices as the upsampling's decomposition computes them."""
    return (torch.arange(output, dtype=torch.float32) * (input / output)).to(torch.int64)


def _scatter_add(
    height: int,
    width: int,
    rows: Callable[[], torch.Tensor] | None = None,
    fill: float = 0.0,
    accumulate: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``grad -> index_put(full(fill), [None, None, rows, cols], grad, accumulate)``
    from a (N, C, height, width) gradient into an (N, C, H, W) base, at nearest
    indices unless ``rows`` are given."""

    def scatter(grad: torch.Tensor) -> torch.Tensor:
        row_index = _nearest(height, H) if rows is None else rows()
        base = torch.full((N, C, H, W), fill)
        return aten.index_put(base, [None, None, row_index[:, None], _nearest(width, W)], grad, accumulate)

    return scatter


def _gradient(height: int, width: int) -> torch.Tensor:
    return torch.randn(N, C, height, width)


def _rewrites(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, mode: str = "fake") -> int:
    """How many scatter-adds the pass rewrites in ``fn``'s graph; checks that the graph
    still computes what ``fn`` does."""
    gm = make_fx(fn, tracing_mode=mode)(*inputs)
    rewritten = nearest_upsample_gradients(gm.graph, any_layout=False)
    gm.recompile()
    targets = {node.target for node in gm.graph.nodes}
    assert (aten.upsample_nearest2d_backward.default in targets) == (rewritten > 0)
    torch.testing.assert_close(gm(*inputs), fn(*inputs))
    return rewritten


@pytest.mark.parametrize("scales", [(2, 2), (4, 2), (1, 4), (3, 3), (5, 5)])
def test_a_scatter_add_at_nearest_indices_becomes_a_window_sum(scales: tuple[int, int]) -> None:
    size = (H * scales[0], W * scales[1])
    fn = _scatter_add(*size)
    assert _rewrites(fn, _gradient(*size)) == 1
    gm = make_fx(fn, tracing_mode="fake")(_gradient(*size))
    nearest_upsample_gradients(gm.graph, any_layout=False)
    # the zero fill and the indices only the scatter read are gone with it
    assert not {aten.index_put.default, aten.full.default, torch.ops.prims.iota.default} & {n.target for n in gm.graph.nodes}


@pytest.mark.parametrize(
    "fn, size",
    [
        pytest.param(_scatter_add(6, 2 * W), (6, 2 * W), id="a scale that is not an integer"),
        pytest.param(_scatter_add(8 * H, 4 * W), (8 * H, 4 * W), id="a window over 25 elements"),
        pytest.param(_scatter_add(2 * H, 2 * W, rows=lambda: torch.arange(2 * H) % H), (2 * H, 2 * W), id="indices that are not the nearest ones"),
        pytest.param(_scatter_add(2 * H, 2 * W, fill=1.0), (2 * H, 2 * W), id="a base that is not zeros"),
        pytest.param(_scatter_add(2 * H, 2 * W, accumulate=False), (2 * H, 2 * W), id="no accumulation"),
    ],
)
def test_other_scatters_are_left_alone(fn: Callable[[torch.Tensor], torch.Tensor], size: tuple[int, int]) -> None:
    assert _rewrites(fn, _gradient(*size)) == 0


def test_indices_read_from_an_input_are_left_alone() -> None:
    """Indices the pass cannot evaluate ahead of the step are not proven nearest."""

    def scatter(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return aten.index_put(torch.zeros(N, C, H, W), [None, None, rows[:, None], _nearest(2 * W, W)], grad, True)

    assert _rewrites(scatter, _gradient(2 * H, 2 * W), _nearest(2 * H, H)) == 0


def test_a_zero_base_read_elsewhere_is_left_alone() -> None:
    def scatter(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.zeros(N, C, H, W)
        return aten.index_put(base, [None, None, _nearest(2 * H, H)[:, None], _nearest(2 * W, W)], grad, True), base

    gm = make_fx(scatter, tracing_mode="fake")(_gradient(2 * H, 2 * W))
    assert nearest_upsample_gradients(gm.graph, any_layout=False) == 0


def test_symbolic_shapes_are_left_alone() -> None:
    assert _rewrites(_scatter_add(2 * H, 2 * W), _gradient(2 * H, 2 * W), mode="symbolic") == 0


def _backward_targets(model: nn.Module, x: torch.Tensor, options: dict) -> set[object]:
    (_, graphs), = plan_each(model, (x,), [options])
    return {node.target for node in graphs.backward.graph.nodes}


class Upsampling(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale)).square().mean()


@pytest.mark.parametrize("scale, window_sum", [(2.0, True), (3.0, True), (1.5, False)])
def test_an_upsampling_model_gets_a_window_sum_where_proven(scale: float, window_sum: bool) -> None:
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    targets = _backward_targets(Upsampling(scale), x, {"inner_compiler": "eager"})
    assert (aten.upsample_nearest2d_backward.default in targets) == window_sum
    assert (aten.index_put.default in targets) != window_sum


@pytest.mark.parametrize("inner_compiler, window_sum", [("eager", False), ("inductor", True)])
def test_a_channels_last_gradient_is_summed_over_windows_only_under_inductor(inner_compiler: str, window_sum: bool) -> None:
    """The window sum is channels-last like the gradient, the scatter contiguous like
    its zeros: op by op the readers would see the new layout, so only Inductor, which
    lays out what it computes itself, gets it."""
    model = Upsampling(2.0).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    targets = _backward_targets(model, x, {"inner_compiler": inner_compiler})
    assert (aten.upsample_nearest2d_backward.default in targets) == window_sum


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_with_the_window_sum_equal_eager(inner_compiler: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = UpsamplingDecoder(squared=True)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _assert_gradients_equal_eager(model, x, {"inner_compiler": inner_compiler, "on_plan_failure": "raise"})


def test_a_small_upsampling_compiles_on_two_threads() -> None:
    """Inductor's C++ scatter for this gradient fails an assertion on two threads
    (``CppVecKernel.store``, ``atomic_add``; torch 2.13, found by the property tests);
    the window sum compiles, and its gradients equal eager's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(21, 12, 3, padding=1), nn.Upsample(scale_factor=3.0), nn.Flatten(), nn.Linear(12 * 6 * 3, 1))
    x = torch.randn(8, 21, 2, 1, requires_grad=True)
    with torch_threads(2):
        _assert_gradients_equal_eager(nn.Sequential(model, _MeanSquare()), x, {"on_plan_failure": "raise"})


class _MeanSquare(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.square().mean()


def _assert_gradients_equal_eager(model: nn.Module, x: torch.Tensor, options: dict) -> None:
    """One backward of ``model(x)`` (a scalar loss) eagerly and under remat with
    ``options``: the input's and the parameters' gradients agree."""

    def gradients() -> list[torch.Tensor]:
        return [x.grad, *(p.grad for p in model.parameters())]

    model(x).backward()
    expected = gradients()
    x.grad = None
    model.zero_grad()
    torch.compile(model, backend="remat", options=options)(x).backward()
    for got, want in zip(gradients(), expected, strict=True):
        torch.testing.assert_close(got, want)
