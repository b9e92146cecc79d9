"""oneDNN's Linear kernel in training: the same values and gradients as F.linear (to float rounding),
and `use_in` leaves every model exactly as it found it."""

import pytest
import torch

from grpo.backend import onednn
from grpo.testing import tiny_model

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear op")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_values_and_gradients_equal_f_linear(dtype, tol, bias):
    if dtype == torch.bfloat16 and not onednn.bf16_supported():
        pytest.skip("oneDNN runs no bfloat16 matmul on this CPU (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g).to(dtype).requires_grad_()  # [..., in] with two leading dims
    w = torch.randn(40, 24, generator=g).to(dtype).requires_grad_()
    b = torch.randn(40, generator=g).to(dtype).requires_grad_() if bias else None
    up = torch.randn(3, 5, 40, generator=g).to(dtype)
    inputs = [x, w] + ([b] if bias else [])
    ours = onednn.linear(x, w, b)
    theirs = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for a, e in zip(torch.autograd.grad(ours, inputs, up), torch.autograd.grad(theirs, inputs, up)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * 10)


def test_bfloat16_goes_to_onednn_only_where_the_cpu_runs_it():
    """An AVX2-only CPU refuses oneDNN's bfloat16 matmuls: such weights must take F.linear, not crash."""
    w = torch.randn(8, 4).to(torch.bfloat16)
    served = onednn.bf16_supported()
    assert (onednn.matmul_for(w) is not torch.nn.functional.linear) == served
    assert (onednn.reordered(w, 4) is not w) == (served and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8)).to(torch.bfloat16)
    assert onednn.usable(model) == served
    with onednn.use_in(model):
        out = model(torch.randn(2, 4).to(torch.bfloat16))
    assert out.shape == (2, 8)


def test_a_frozen_weight_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8)  # frozen, as a LoRA base layer
    y = onednn.linear(x, w)
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, torch.ones(4, 6) @ w)
    with torch.no_grad():
        assert onednn.linear(x, w).grad_fn is None


def test_use_in_patches_usable_models_only_composes_and_restores():
    model, other = tiny_model(50), tiny_model(50, seed=1)
    half = tiny_model(50).to(torch.float16)  # not served: left alone
    linears = lambda m: [x for x in m.modules() if type(x) is torch.nn.Linear]  # noqa: E731
    with onednn.use_in(model, None, half):
        assert all("forward" in m.__dict__ for m in linears(model))
        assert not any("forward" in m.__dict__ for m in linears(half))
        patched = model.lm_head.forward
        with onednn.use_in(model, other):  # nested: the outer patch stays, the other model is patched
            assert model.lm_head.forward == patched
            assert all("forward" in m.__dict__ for m in linears(other))
        assert not any("forward" in m.__dict__ for m in linears(other))
        assert model.lm_head.forward == patched
    with onednn.use_in(model, enabled=False):
        assert not any("forward" in m.__dict__ for m in linears(model))
    assert not any("forward" in m.__dict__ for m in linears(model) + linears(half))


def test_a_model_s_loss_and_gradients_are_the_same_through_onednn():
    model = tiny_model(60, seed=3)
    ids = torch.randint(4, 60, (3, 9), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain = grads()
    with onednn.use_in(model):
        loss, ours = grads()
    torch.testing.assert_close(loss, plain_loss)
    assert max(float(g.abs().max()) for g in plain) > 0.1
    for a, e in zip(ours, plain):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_matmul_for_picks_onednn_only_where_it_serves():
    assert onednn.matmul_for(torch.zeros(2, 2)) is not torch.nn.functional.linear
    assert onednn.matmul_for(torch.zeros(2, 2, dtype=torch.float16)) is torch.nn.functional.linear


def test_packed_weights_serve_no_grad_forwards_only_and_are_dropped_after():
    model = tiny_model(60, seed=4)
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with onednn.use_in(model), onednn.packed(model, rows=2):
        assert all(m.__dict__["_onednn_packed"].is_mkldnn for m in model.modules() if type(m) is torch.nn.Linear)
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=1e-5, atol=1e-5)
        model(input_ids=ids, labels=ids).loss.backward()  # a training forward reads the weights themselves
    assert model.lm_head.weight.grad is not None
    assert not any("_onednn_packed" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    with onednn.packed(model, rows=2):  # no enclosing use_in: no layer would read a reordered copy
        assert not any("_onednn_packed" in m.__dict__ for m in model.modules())
    with onednn.packed(model.to(torch.float16), rows=2):  # not served: nothing reordered
        assert not any("_onednn_packed" in m.__dict__ for m in model.modules())
