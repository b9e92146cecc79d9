"""The plain backend's lean log-prob path under DDP and FSDP2, run by tests/test_distributed.py under torchrun:
each rank takes its 3 of the 6 rows of test_logprobs' random batch through the wrapped model (PlainBackend,
chunks of 4 tokens), backward of a loss over the log-probs and the entropy (times the world size, as the
trainer); the full-logits reference runs the whole batch on an unwrapped copy in this process. Each rank writes
OUT.<rank>: per case its rows' log-probs and entropy and the whole gradient, ours and the reference's, the most
rows the output head saw at once, and the token-id shapes the embedding saw.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_lean_worker.py OUT
"""

import copy
import sys

import torch

from grpo.backend import PlainBackend
from grpo.backend.plain import completion_logprobs_reference
from grpo.core.logprobs import micro_batch
from grpo.distributed import close_world, init_world
from grpo.models import checkpointed_layers
from grpo.parallel import wrap_policy
from grpo.testing import tiny_model

from test_logprobs import random_batch

CASES = {  # name: (parallel, tied head, gradient checkpointing, LoRA)
    "ddp": ("ddp", True, False, False),
    "ddp_checkpointing": ("ddp", True, True, False),
    "ddp_lora": ("ddp", True, False, True),
    "fsdp": ("fsdp", True, False, False),
    "fsdp_untied_checkpointing": ("fsdp", False, True, False),
}


def make_model(tied: bool, lora: bool):
    model = tiny_model(100, seed=1, tied=tied)
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, lora_config)
    return model


def loss_of(lp, ent, mask, weights, entropy_weights):
    return ((lp * weights + 0.3 * ent * entropy_weights) * mask).sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: a DTensor
            out[name.replace("module.", "", 1)] = g.detach().clone()
    return out


def run_case(world, parallel, tied, checkpointing, lora) -> dict:
    batch, mask = random_batch(100)
    weights, entropy_weights = torch.randn((2, *mask.shape), generator=torch.Generator().manual_seed(2))
    model = make_model(tied, lora)
    reference = copy.deepcopy(model)
    lp, ent = completion_logprobs_reference(reference, batch, 0.7, with_entropy=True, entropy_grad=True)
    loss_of(lp, ent, mask, weights, entropy_weights).backward()
    rows = list(range(3 * world.rank, 3 * world.rank + 3))
    mb = micro_batch(batch, rows)
    t = mb.sequences.completion_len
    inner = model.get_base_model() if lora else model
    seen_rows, shapes = [], []
    inner.lm_head.register_forward_hook(lambda m, a, out: seen_rows.append(out.numel() // out.shape[-1]))
    inner.model.embed_tokens.register_forward_hook(lambda m, a, out: shapes.append(list(a[0].shape)))
    policy = wrap_policy(model, parallel, torch.device("cpu"))
    with checkpointed_layers(model, checkpointing):
        ours, ours_ent = PlainBackend(torch.device("cpu"), chunk_tokens=4).logprobs(
            policy, mb.sequences, 0.7, with_entropy=True, entropy_grad=True)
        (loss_of(ours, ours_ent, mb.take(mask), mb.take(weights), mb.take(entropy_weights)) * world.size).backward()
    return {
        "logprobs": (ours.detach(), (lp.detach() * mask)[rows, :t]),
        "entropy": (ours_ent.detach(), (ent.detach() * mask)[rows, :t]),
        "grads": (grads(policy), grads(reference)),
        "head_rows": max(seen_rows),
        "embedded": shapes,
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    world = init_world("cpu", 120)
    results = {name: run_case(world, *case) for name, case in CASES.items()}
    torch.save(results, f"{out}.{world.rank}")
    close_world(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
