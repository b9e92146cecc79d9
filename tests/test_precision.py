"""trainer.precision: bfloat16 autocast of the matmuls against float32 (within bfloat16's rounding), cpu_fast
against plain in bfloat16, the attention kept in float32 on a CPU, a bfloat16 run through the CLI, the refusal
on a CPU without bfloat16 matmuls, and old configs' trainer.autocast.

Tolerances: bfloat16 keeps 8 significant bits, so rounding an operand costs a relative error of at most
u = 2**-8 (~0.0039). Every matmul rounds its two operands (the products are summed in float32), and the
error of the layers adds up along the tiny model's 2 layers and the output head: a few u relative on each
logit and on the gradient. The tests allow 8u absolute on log-probs of magnitude ~5 (measured: ~2u) and
4u relative on the whole gradient (measured: ~1.3u), and demand that bfloat16 really changed the numbers
(more than u/8: float32 paths agree to ~1e-6).
"""

import json

import pytest
import torch

import trainer_helpers
from grpo.backend import CpuFastBackend, PlainBackend, bf16_unsupported, make_backend, onednn, resolve_precision
from grpo.config import ConfigError, load_config
from grpo.logging.metrics import Phases
from trainer_helpers import gradients

U = 2.0**-8  # bfloat16's unit roundoff
WHY = bf16_unsupported(torch.device("cpu"))
needs_bf16 = pytest.mark.skipif(WHY is not None, reason=f"trainer.precision=bfloat16 is refused here: {WHY}")


def logprobs_and_gradient(backend: str, precision: str, batch=None, *overrides: str):
    """Reference log-probs [N, T] and the loss's flattened gradient (DAPO loss with KL and an entropy bonus)
    of one batch on the tiny model; the batch is sampled by the first call and reused."""
    t = trainer_helpers.make_trainer("algorithm.beta=0.04", "algorithm.loss_type=dapo", "algorithm.entropy_coef=0.01",
                                     f"trainer.backend={backend}", f"trainer.precision={precision}", *overrides,
                                     micro_batch_size=3)
    with t.backend.step(t.model, t.ref_model):
        batch = batch if batch is not None else t.make_batch(t.sampler.next(2), Phases())
        ref = t.reference_logprobs(batch.sequences)
        return batch, ref, gradients(t, batch), t.backend


@pytest.fixture(scope="module")
def float32_run():
    return logprobs_and_gradient("plain", "float32")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_bf16
@pytest.mark.parametrize("backend", ["plain", "cpu_fast"])
def test_bfloat16_logprobs_and_gradients_are_float32_s_within_bfloat16_rounding(backend, float32_run):
    batch, ref32, grad32, _ = float32_run
    _, ref, grad, b = logprobs_and_gradient(backend, "bfloat16", batch)
    assert b.reduced_precision and b.name == backend
    assert ref.dtype == grad.dtype == torch.float32
    assert float(ref32.abs().max()) > 3 and float(grad32.abs().max()) > 0.01  # not trivially small
    assert float((ref - ref32).abs().max()) <= 8 * U
    assert rel(grad, grad32) <= 4 * U
    assert float((ref - ref32).abs().max()) > U / 8  # bfloat16 did run (float32 paths agree to ~1e-6)


@needs_bf16
def test_cpu_fast_bfloat16_equals_plain_bfloat16(float32_run):
    """The fast path's bfloat16 (oneDNN matmuls cast by hand, the fused head's recomputed logits in bfloat16
    too) against autocast's own: the two round at different points, so within a few u, not bit for bit."""
    batch = float32_run[0]
    _, ref_plain, grad_plain, _ = logprobs_and_gradient("plain", "bfloat16", batch)
    _, ref_fast, grad_fast, _ = logprobs_and_gradient("cpu_fast", "bfloat16", batch)
    assert float((ref_fast - ref_plain).abs().max()) <= 4 * U
    assert rel(grad_fast, grad_plain) <= 2 * U


@needs_bf16
@pytest.mark.parametrize("backend,checkpointing", [("plain", False), ("cpu_fast", False), ("plain", True)])
def test_a_cpu_bfloat16_step_runs_attention_in_float32(backend, checkpointing, monkeypatch, float32_run):
    """Every attention of the reference pass and of the policy's forward (and, with gradient checkpointing, of its
    recomputation in the backward pass) gets float32 q, k and v with autocast off (without `float32_attention`,
    autocast would round them to bfloat16: v arrives in bfloat16 from its matmul); the numbers stay within
    bfloat16's rounding of float32's, and transformers' attention table is as it was afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    batch, ref32, grad32, _ = float32_run
    _, ref, grad, _ = logprobs_and_gradient(backend, "bfloat16", batch,
                                            f"trainer.gradient_checkpointing={str(checkpointing).lower()}")
    passes = 3 if checkpointing else 2  # the reference's, the policy's, its recomputation
    assert len(seen) >= 2 * passes and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}  # 2 layers
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before
    assert float((ref - ref32).abs().max()) <= 8 * U and rel(grad, grad32) <= 4 * U


def test_float32_attention_wraps_the_models_own_entry_only_inside_an_autocast_and_puts_it_back():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as table

    from grpo.backend.plain import float32_attention

    calls = []

    def mine(module, q, k, v, mask, **kwargs):  # a user's own local "sdpa" entry
        calls.append((q.dtype, v.dtype, mask.dtype, torch.is_autocast_enabled("cpu"), kwargs))
        return q, None

    q = torch.randn(1, 2, 3, 4)
    v, mask = q.to(torch.bfloat16), torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16)  # an additive mask
    table["sdpa"] = mine
    try:
        with float32_attention():
            table["sdpa"](None, q, q, v, mask, scaling=0.5)  # no autocast: untouched
            with torch.autocast("cpu", torch.bfloat16), float32_attention():  # nested: one wrapper more
                table["sdpa"](None, q, q, v, mask, scaling=0.5)
            assert table["sdpa"] is not mine
        assert table["sdpa"] is mine
    finally:
        del table["sdpa"]
    with float32_attention():
        assert "sdpa" in table._local_mapping
    assert "sdpa" not in table._local_mapping  # transformers' own entry again
    f32, bf16 = torch.float32, torch.bfloat16
    assert calls == [(f32, bf16, bf16, False, {"scaling": 0.5}), (f32, f32, f32, False, {"scaling": 0.5})]


@needs_bf16
def test_onednn_linear_computes_in_bfloat16_under_a_cpu_autocast():
    """Forward and both backward matmuls in bfloat16 like autocast's F.linear; gradients in the inputs' dtypes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)  # [..., in]
    layer = torch.nn.Linear(64, 48)
    out_grad = torch.randn(3, 5, 48, generator=g)

    def run(fn):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            y = fn(x, layer.weight, layer.bias)
        (y.float() * out_grad).sum().backward()
        return y, x.grad, layer.weight.grad, layer.bias.grad

    want, got = run(torch.nn.functional.linear), run(onednn.linear)
    assert got[0].dtype == torch.bfloat16 and [t.dtype for t in got[1:]] == [torch.float32] * 3
    for w, o in zip(want, got):  # one bfloat16 rounding of a different float32 sum apart at most
        torch.testing.assert_close(o.float(), w.float(), rtol=2 * U, atol=2 * U * float(w.detach().abs().max()))
    with torch.no_grad():
        y32 = onednn.linear(x, layer.weight, layer.bias)  # outside autocast: float32, as before
    assert y32.dtype == torch.float32 and float((y32 - got[0].detach().float()).abs().max()) > 0


@needs_bf16
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_kept_bfloat16_weight_copies_follow_every_update(optimizer, monkeypatch):
    """oneDNN's layers keep one bfloat16 copy of each weight while it is unchanged (`onednn.weight_in`): four
    optimizer steps and an in-place edit inside one `use_in` block give bit for bit the losses and weights of a
    cast at every forward; the copy is shared by the forwards between two updates and dropped on exit."""
    import copy

    from grpo.testing import tiny_model

    def train(model, fresh_casts: bool):
        if fresh_casts:
            monkeypatch.setattr(onednn, "weight_in", lambda layer, dtype: layer.weight.detach().to(dtype))
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
               else torch.optim.SGD(model.parameters(), lr=0.5, foreach=False))
        ids = torch.randint(4, 60, (3, 7), generator=torch.Generator().manual_seed(1))
        losses, copies = [], []
        with onednn.use_in(model):
            for step in range(4):
                with torch.autocast("cpu", torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                    with torch.no_grad():
                        again = model(input_ids=ids, labels=ids).loss  # a second forward between two updates
                loss.backward()
                losses += [float(loss), float(again)]
                copies.append(onednn.weight_in(model.lm_head, torch.bfloat16))
                opt.step()
                opt.zero_grad()
                if step == 2:
                    with torch.no_grad():
                        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)  # not an optimizer's update
        monkeypatch.undo()
        return losses, copies

    model = tiny_model(60, seed=4)
    fresh = copy.deepcopy(model)
    kept_losses, copies = train(model, fresh_casts=False)
    fresh_losses, _ = train(fresh, fresh_casts=True)
    assert kept_losses == fresh_losses  # bit for bit: the same casts, only made fewer times
    assert len(set(kept_losses)) == 4  # each update changed the loss (the two forwards between agree)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert len({id(c) for c in copies}) == len(copies)  # a new copy after each update...
    assert not any("_onednn_cast" in m.__dict__ for m in model.modules())  # ...and none after the block
    with onednn.use_in(model), torch.autocast("cpu", torch.bfloat16):
        layer = model.model.layers[0].self_attn.q_proj
        assert onednn.weight_in(layer, torch.bfloat16) is onednn.weight_in(layer, torch.bfloat16)  # one per version


@needs_bf16
def test_a_bfloat16_training_step_through_the_cli(tiny_model_dir, tmp_path):
    """`grpo train trainer.precision=bfloat16` on the tiny model; with mu=2 the trainer computes pi_old itself
    (the sampler's float32 log-probs are not the bfloat16 passes')."""
    from test_cli import TINY, grpo

    out = tmp_path / "r"
    grpo("train", f"model.path={tiny_model_dir}", f"output.dir={out}", *TINY, "trainer.steps=1", "eval.before=false",
         "eval.after=false", "trainer.precision=bfloat16", "algorithm.mu=2")
    assert load_config(out / "config.yaml").trainer.precision == "bfloat16"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = [m for m in metrics if m.get("step") == 1][-1]
    assert "time/old_logprobs" in step and step["loss"] == step["loss"]  # pi_old computed; a finite loss


def test_bfloat16_is_refused_before_the_model_loads_on_a_cpu_without_it(monkeypatch, tiny_model_dir, tmp_path,
                                                                         capsys):
    import grpo.run
    from grpo.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(onednn, "bf16_matmul_hardware", lambda: False)
    monkeypatch.setattr(grpo.run, "load_model_and_tokenizer", no_loading)
    code = main(["train", "model.device=cpu", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}",
                 "trainer.precision=bfloat16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "trainer.precision=bfloat16" in err and "AVX512-BF16 nor AMX" in err and "trainer.precision=float32" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="trainer.precision=bfloat16"):
        make_backend("cpu_fast", torch.device("cpu"), "bfloat16")


def test_auto_is_bfloat16_on_a_gpu_with_it_and_float32_on_a_cpu(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert not make_backend("auto", torch.device("cpu")).reduced_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bfloat16"
    assert PlainBackend(torch.device("cuda"), "bfloat16").reduced_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    assert resolve_precision("auto", torch.device("cuda")) == "float32"
    with pytest.raises(ConfigError, match="Old GPU has no bfloat16"):
        resolve_precision("bfloat16", torch.device("cuda"))
    assert type(make_backend("cpu_fast", torch.device("cpu"), "float32")) is CpuFastBackend


def test_old_configs_trainer_autocast_still_load(tmp_path):
    assert load_config(None, ["trainer.autocast=true"]).trainer.precision == "auto"
    assert load_config(None, ["trainer.autocast=false"]).trainer.precision == "float32"
    assert load_config(None, ["trainer.autocast=false", "trainer.precision=float32"]).trainer.precision == "float32"
    old = tmp_path / "config.yaml"  # a run folder written before trainer.precision
    old.write_text("trainer:\n  steps: 3\n  autocast: true\n")
    assert load_config(old).trainer.precision == "auto"
    assert "autocast" not in load_config(old).model_dump()["trainer"]
    with pytest.raises(ConfigError, match="contradicts trainer.precision=bfloat16"):
        load_config(None, ["trainer.autocast=false", "trainer.precision=bfloat16"])
    with pytest.raises(ConfigError, match="trainer.precision"):
        load_config(None, ["trainer.precision=float16"])


def test_add_product_sums_the_product_slab_by_slab_into_float32():
    """lean._add_product: out += a @ b through a buffer of fewer rows than out (a ragged last slab), equal to
    the product made in one piece in a's dtype, then added in float32."""
    from grpo.backend.lean import _add_product

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(23, 5, generator=g).to(torch.bfloat16), torch.randn(5, 7, generator=g).to(torch.bfloat16)
    out = torch.randn(23, 7, generator=g)
    expected = out + torch.mm(a, b).float()
    _add_product(out, a, b, torch.empty(4, 7, dtype=torch.bfloat16))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    _add_product(out, a, b, torch.empty(4, 7, dtype=torch.bfloat16), overwrite=True)  # the first chunk: written
    torch.testing.assert_close(out, torch.mm(a, b).float(), rtol=0, atol=0)


@needs_bf16
def test_the_head_gradient_is_the_same_in_slabs(monkeypatch, float32_run):
    """The output head's weight gradient under bfloat16 made 7 vocabulary rows at a time (as a 49k vocabulary is
    made PRODUCT_ROWS at a time) is the one made in one slab (the tiny model's whole vocabulary fits in one)."""
    from grpo.backend import lean

    batch = float32_run[0]
    _, _, whole, _ = logprobs_and_gradient("cpu_fast", "bfloat16", batch)
    monkeypatch.setattr(lean, "PRODUCT_ROWS", 7)
    _, _, slabs, _ = logprobs_and_gradient("cpu_fast", "bfloat16", batch)
    assert rel(slabs, whole) <= 1e-6
