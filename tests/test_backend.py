"""The backends: cpu_fast gives the plain path's log-probs, loss and gradients (each fast piece has its own
equivalence test too: test_logprobs.py, test_onednn.py, and the sparse embedding gradient here), and
`auto` picks by device."""

import pytest
import torch

from grpo.backend import CpuFastBackend, PlainBackend, make_backend, onednn, resolve_backend
from grpo.backend.cpu_fast import densify_grads, sparse_embedding_grad
from grpo.logging.metrics import Phases

import trainer_helpers
from trainer_helpers import gradients


def test_auto_is_cpu_fast_on_a_cpu_and_plain_elsewhere():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu_fast"
    assert resolve_backend("auto", torch.device("cuda")) == "plain"
    assert isinstance(make_backend("plain", torch.device("cpu")), PlainBackend)
    assert type(make_backend("auto", torch.device("cpu"))) is CpuFastBackend
    with pytest.raises(ValueError, match="cpu_fast runs on a CPU only"):
        resolve_backend("cpu_fast", torch.device("cuda"))


@pytest.mark.parametrize("kernel", ["onednn", "mkl"])
@pytest.mark.parametrize("extra", [[], ["algorithm.loss_type=dapo", "algorithm.entropy_coef=0.01"],
                                   ["trainer.gradient_checkpointing=true"]])
def test_cpu_fast_gives_the_plain_backend_s_logprobs_loss_and_gradients(extra, kernel, monkeypatch):
    """The same batch through both backends: reference log-probs, every metric of the backward and the
    accumulated gradient agree to float rounding (oneDNN and the chunked head sum in another order), with either
    float32 kernel a CPU may get (`onednn.float32_training_kernel`)."""
    monkeypatch.setattr(onednn, "float32_training_kernel", lambda: kernel)
    fast = trainer_helpers.make_trainer("algorithm.beta=0.04", *extra, micro_batch_size=3)
    assert isinstance(fast.backend, CpuFastBackend)
    with fast.backend.step(fast.model, fast.ref_model):
        batch = fast.make_batch(fast.sampler.next(2), Phases())
        got_ref = batch.ref_logprobs
        got_sums = fast.accumulate_gradients(batch, compare_rollout=True)
        got = gradients(fast, batch)
    plain = trainer_helpers.make_trainer("algorithm.beta=0.04", "trainer.backend=plain", *extra, micro_batch_size=3)
    assert type(plain.backend) is PlainBackend
    ref = plain.reference_logprobs(batch.sequences)
    torch.testing.assert_close(ref, got_ref, rtol=0, atol=2e-5)
    sums = plain.accumulate_gradients(batch, compare_rollout=True)
    for key in sums:
        assert sums[key] == pytest.approx(got_sums[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(gradients(plain, batch), got, rtol=1e-4, atol=1e-6)
    assert float(got.abs().max()) > 0


def _embedding_grads(model, ids, sparse: bool):
    """The parameters' gradients of a loss over `ids`, with or without sparse_embedding_grad (two
    forwards, as a shared prompt pass and its completions: the sparse parts are summed first)."""
    model.zero_grad(set_to_none=True)
    ctx = sparse_embedding_grad(model) if sparse else torch.enable_grad()
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss + model(input_ids=ids[:, :4]).logits.square().mean()
        loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_sparse_embedding_gradient_equals_the_dense_one(tied):
    from grpo.testing import tiny_model

    model = tiny_model(80, seed=2, tied=tied)
    emb = model.get_input_embeddings()
    weight = emb.weight
    ids = torch.randint(4, 80, (3, 7), generator=torch.Generator().manual_seed(0))
    dense = _embedding_grads(model, ids, sparse=False)
    got = _embedding_grads(model, ids, sparse=True)
    assert emb.weight is weight and not emb.sparse  # the block left the module as it was
    name = "model.embed_tokens.weight"
    assert got[name].is_sparse == (not tied)  # untied: nothing dense to add into, sparse until densified
    densify_grads(model.parameters())
    assert not weight.grad.is_sparse
    assert dense.keys() == got.keys()
    assert float(dense[name].abs().max()) > 0
    for key in dense:
        torch.testing.assert_close(weight.grad if key == name else got[key], dense[key], rtol=1e-5, atol=1e-6)


def test_sparse_embedding_grad_leaves_a_frozen_embedding_alone():
    from grpo.testing import tiny_model

    model = tiny_model(80)
    model.get_input_embeddings().weight.requires_grad_(False)
    with sparse_embedding_grad(model):
        assert not model.get_input_embeddings().sparse


def _served_by_onednn(model) -> bool:
    return all(getattr(m.__dict__.get("forward"), "__func__", None) is onednn._forward
               for m in model.modules() if type(m) is torch.nn.Linear)


@pytest.mark.parametrize("vendor,mkl,kernel", [("GenuineIntel", True, "mkl"), ("GenuineIntel", False, "onednn"),
                                               ("AuthenticAMD", True, "onednn"), ("", True, "onednn")])
def test_a_float32_step_takes_the_cpus_faster_kernel_and_bfloat16_always_onednn(vendor, mkl, kernel, monkeypatch):
    """float32: PyTorch's own kernel (MKL) on an Intel CPU with MKL, oneDNN's elsewhere; bfloat16: oneDNN's
    always (it casts the operands itself; see grpo.backend.onednn)."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    onednn.float32_training_kernel.cache_clear()
    try:
        assert onednn.float32_training_kernel() == kernel
        model = trainer_helpers.make_trainer().model
        with make_backend("cpu_fast", torch.device("cpu"), "float32").step(model):
            assert _served_by_onednn(model) is (kernel == "onednn")
        if onednn.bf16_matmul_hardware():
            with make_backend("cpu_fast", torch.device("cpu"), "bfloat16").step(model):
                assert _served_by_onednn(model)
        assert not any("forward" in m.__dict__ for m in model.modules())  # put back
    finally:
        onednn.float32_training_kernel.cache_clear()


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\nprocessor\t: 1\n"
                    "vendor_id\t: AuthenticAMD\n")
    assert onednn.cpu_vendor(info) == "AuthenticAMD"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM CPU names no vendor_id
    assert onednn.cpu_vendor(info) == ""
    assert onednn.cpu_vendor(tmp_path / "missing") == ""
