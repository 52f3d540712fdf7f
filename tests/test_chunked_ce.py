"""The chunked LM-head cross-entropy against F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from plait.kernels import chunked_cross_entropy


def _inputs(n, d=16, v=37, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def _reference(hidden, weight, targets, ignore_index=-100):
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, reduction="sum", ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _relative_error(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def _chunked(hidden, weight, targets, **kwargs):
    loss = chunked_cross_entropy(hidden, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("n,chunk", [(64, 16), (50, 16), (50, 7), (10, 4096), (1, 1), (33, 33)])
def test_matches_full_cross_entropy_fp32(n, chunk):
    hidden, weight, targets = _inputs(n)
    loss, gh, gw = _chunked(hidden, weight, targets, chunk_size=chunk)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index(ignore_index):
    hidden, weight, targets = _inputs(40)
    targets[::3] = ignore_index
    targets[-1] = ignore_index  # an ignored token in the last, partial chunk
    loss, gh, gw = _chunked(hidden, weight, targets, chunk_size=16, ignore_index=ignore_index)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets, ignore_index)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)
    assert gh[::3].abs().max() == 0  # ignored tokens get no gradient
    all_ignored = torch.full_like(targets, ignore_index)
    hidden.grad = weight.grad = None
    loss, gh, gw = _chunked(hidden, weight, all_ignored, chunk_size=16, ignore_index=ignore_index)
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_bf16_inputs_close_to_fp32_reference():
    hidden, weight, targets = _inputs(96, d=64, v=200, dtype=torch.bfloat16)
    loss, gh, gw = _chunked(hidden, weight, targets, chunk_size=40)
    assert loss.dtype == torch.float32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # The reference upcasts the same bf16 values, so the difference is the bf16 matmul
    # and the bf16 rounding of the gradients.
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-2)
    assert _relative_error(gh, ref_gh) < 1e-2
    assert _relative_error(gw, ref_gw) < 1e-2


def test_fp32_weight_with_bf16_hidden():
    """The benchmark's case: bf16 activations against an fp32 LM head weight."""
    hidden, weight, targets = _inputs(48, d=32, v=100)
    h16 = hidden.detach().bfloat16().requires_grad_()
    loss, gh, gw = _chunked(h16, weight, targets, chunk_size=20)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    ref_loss, ref_gh, ref_gw = _reference(h16, weight.detach().bfloat16(), targets)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-2)
    assert _relative_error(gh, ref_gh) < 1e-2
    assert _relative_error(gw, ref_gw) < 1e-2


def test_inside_autocast_and_in_a_graph():
    """Gradients flow through chunked CE to parameters upstream; autocast does not change it."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 16)
    weight = torch.randn(30, 16, requires_grad=True)
    x, targets = torch.randn(20, 8), torch.randint(0, 30, (20,))
    hidden = proj(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=6)
    loss.backward()
    ref = F.cross_entropy(proj(x) @ weight.T, targets, reduction="sum")
    grads = torch.autograd.grad(ref, [proj.weight, weight])
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.weight.grad, grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, grads[1], atol=1e-5, rtol=1e-5)


def test_no_full_logits_saved_for_backward():
    n, d, v, chunk = 256, 8, 500, 32
    hidden, weight, targets = _inputs(n, d=d, v=v)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    loss.backward()
    assert shapes, "nothing was saved: the hook did not see the custom function"
    largest = max(shapes, key=lambda s: torch.Size(s).numel())
    assert (n, v) not in shapes
    assert torch.Size(largest).numel() <= max(n, v) * d, shapes

    # The plain path, for contrast, keeps something of the full [N, V] size.
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert (n, v) in shapes


def test_bad_shapes_raise():
    hidden, weight, targets = _inputs(10)
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, targets[:5])
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_upstream_gradient_scales_the_gradients_made_in_forward():
    """The gradients are made in forward for an upstream gradient of 1; backward scales them."""
    hidden, weight, targets = _inputs(40)
    (chunked_cross_entropy(hidden, weight, targets, chunk_size=16) / 40 * 3).backward()
    _, ref_gh, ref_gw = _reference(hidden, weight, targets)
    torch.testing.assert_close(hidden.grad, ref_gh * 3 / 40, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, ref_gw * 3 / 40, atol=1e-6, rtol=1e-5)


def test_no_gradient_work_without_grad_mode():
    hidden, weight, targets = _inputs(40)
    shapes = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert not loss.requires_grad and shapes == []
    torch.testing.assert_close(loss, _reference(hidden, weight, targets)[0])
