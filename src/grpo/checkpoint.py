"""Checkpoints of a run: atomic save, listing, pruning, exact resume, and the config check of a resume.

A checkpoint is one folder, RUN_DIR/checkpoints/step-000004/. A run in one process writes it whole:
  model/          the policy as a Hugging Face folder (`transformers` loads it); LoRA: the adapter only
  reference.safetensors   the reference weights, only once ref_reset_steps has replaced them
                  (otherwise the reference is rebuilt from the start weights, as at the start of the run)
  trainer.pt      the Trainer's own state: step, optimizer, scheduler (with the schedule it runs), prompt
                  position; an optimizer that has made no update yet (the guard skipped every step so far) is
                  saved without state and left so (grpo.optim.kept_fresh): a save never changes the run
  rng.pt          every global RNG state: python random, numpy, torch CPU and CUDA
  config.yaml     the resolved config of the run that wrote it
  meta.json       written last: {"step": 4, "files": [...], "sizes": {path: bytes}}; a folder without it is
                  not a checkpoint, and one whose files do not match it is damaged (resume skips it)

A run on several ranks writes it sharded, with torch.distributed.checkpoint (every rank its own part, at once):
  state/          .metadata and a __R_0.distcp file per rank: the policy's trainable weights (LoRA: the adapter)
                  and AdamW state as each rank holds them (FSDP2: its shards; DDP: whole tensors, each written
                  once), and the reference once ref_reset_steps has replaced it
  trainer.pt      the Trainer's state without the optimizer; config.yaml and meta.json as above (rank 0)
  rng.pt          {"ranks": [...]}: every rank's RNG states, written by rank 0; each rank restores its own
Both kinds resume on any number of ranks: a whole one is read by rank 0 and sent to the others; a sharded one
is read by every rank, torch.distributed.checkpoint cutting it to the new sharding (one process reads it all).
So a run on several machines needs output.dir on a filesystem they all see, as every DCP checkpoint does; a
save checks that rank 0's folder holds every rank's file.

It is written to a hidden temporary folder, every file and the folder are fsynced, then the folder
is renamed into place and its parent fsynced: a kill at any instant leaves the previous checkpoint intact
(at worst a temporary folder, removed by the next save). Old checkpoints are renamed away before
they are deleted, so a kill during pruning never leaves a half-deleted folder that looks complete.
A resume takes the newest intact checkpoint: a damaged one (a file cut short or unreadable, say by
a disk that failed under it) is renamed to step-000004.damaged and the previous one is used.
The run's final `model/` is published the same way (`publish_policy`).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from grpo.config import Config, absolute_path_tree, dump_config
from grpo.distributed import SINGLE, World
from grpo.files import read_jsonl, write_text_atomic
from grpo.models import is_lora, no_progress_bars
from grpo.optim import kept_fresh
from grpo.parallel import load_rank_state, load_weights_state, rank_state, weights_state

CHECKPOINTS = "checkpoints"
NAME = re.compile(r"^step-(\d{6,})$")
SHARDED = "state"  # the torch.distributed.checkpoint folder of a sharded checkpoint

# Config fields a resume may change: the length of the run, where and how it is logged, eval, and the device
# (another machine may continue a run; under torchrun each rank's GPU is its own). Everything else changes what
# the remaining steps compute, so a resume refuses it.
RESUMABLE = ("trainer.steps", "trainer.samples_per_step", "trainer.samples_every", "trainer.max_bad_steps",
             "model.threads", "model.device", "output.", "eval.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read, or a resume is refused; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


# --- listing ----------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (a folder counts once its meta.json is in place)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = NAME.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append(Checkpoint(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --- damage -----------------------------------------------------------------------------------


def latest_intact_checkpoint(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest checkpoint whose files are whole, and the newer damaged ones with what is wrong with each."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = checkpoint_damage(ckpt)
        if why is None:
            return ckpt, damaged
        damaged.append((ckpt, why))
    return None, damaged


def checkpoint_damage(ckpt: Checkpoint) -> str | None:
    """What is wrong with a checkpoint's files (sizes against meta.json, safetensors headers, the zip
    archives torch.save writes), or None when they are whole. Reads headers only, not the weights."""
    try:
        meta = json.loads((ckpt.path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"{ckpt.path / 'meta.json'} is unreadable ({e})"
    for rel, size in meta.get("sizes", {}).items():  # checkpoints before sizes were recorded: none
        f = ckpt.path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} when it was saved (cut short?)"
    for name in ("trainer.pt", "rng.pt"):
        if why := torch_file_damage(ckpt.path / name):
            return why
    if is_sharded_checkpoint(ckpt):
        return sharded_damage(ckpt.path / SHARDED)
    if not (ckpt.path / "model").is_dir():
        return f"{ckpt.path / 'model'} is missing"
    if (ckpt.path / "reference.safetensors").exists() and (why := safetensors_damage(ckpt.path / "reference.safetensors")):
        return why
    return policy_damage(ckpt.path / "model")


def policy_damage(folder: Path) -> str | None:
    """What is wrong with a saved policy folder (missing, no weights, a cut-short weights file), or None."""
    if not folder.is_dir():
        return f"{folder} is missing"
    if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        return f"{folder} has no config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} has no .safetensors weights"
    for f in weights:
        if why := safetensors_damage(f):
            return why
    return None


def safetensors_damage(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors: its size must be
    exactly what the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("the header is longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"{path} is {size} bytes where its header needs {8 + n + end} (cut short?)"
    return None


def is_sharded_checkpoint(ckpt: Checkpoint) -> bool:
    return (ckpt.path / SHARDED).is_dir()


def sharded_damage(folder: Path) -> str | None:
    """A torch.distributed.checkpoint folder: its .metadata must load, and every file it names must be there and
    long enough for the pieces it holds (rank 0 finds here what the other ranks wrote, or not)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a pickle cut short raises anything
        return f"{folder / '.metadata'} is unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size < end:
            return f"{f} is {f.stat().st_size} bytes where its pieces need {end} (cut short?)"
    return None


def torch_file_damage(path: Path) -> str | None:
    """torch.save writes a zip archive, whose directory sits at its end: a cut-short file has none."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    return None


def set_aside(ckpt: Checkpoint) -> Path:
    """Rename a damaged checkpoint out of the listing (kept for inspection, never loaded)."""
    target = ckpt.path.with_name(ckpt.path.name + ".damaged")
    if target.exists():
        target = ckpt.path.with_name(f"{ckpt.path.name}.damaged-{os.getpid()}")
    ckpt.path.rename(target)
    return target


# --- atomic writing ---------------------------------------------------------------------------


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to the disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            fsync_dir(Path(root) / d)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale(run_dir: Path) -> None:
    """Temporary and half-pruned folders left by a kill."""
    folder = checkpoints_dir(run_dir)
    for p in folder.glob(".*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, write, keep: int | None = None, world: World = SINGLE) -> Checkpoint:
    """Atomically publish RUN_DIR/checkpoints/step-<step>: `write(tmp_folder)` fills a temporary folder,
    which is flushed and renamed into place; then all but the newest `keep` are removed.
    Under several ranks every rank calls it: rank 0 makes the folder, every rank writes its part, and rank 0
    publishes it once all have; a failure on any rank leaves the previous checkpoint and raises on every rank."""
    folder = checkpoints_dir(run_dir)
    target = folder / f"step-{step:06d}"
    with world.during("saving a checkpoint"):
        tmp = world.broadcast(folder / f".tmp-{target.name}-{os.getpid()}")  # rank 0's name
    old = error = None
    if world.is_main:
        error = _attempt(lambda: (folder.mkdir(parents=True, exist_ok=True), remove_stale(run_dir), tmp.mkdir()))
    if (error := _any_failed(world, error)) is None:
        error = _any_failed(world, _attempt(lambda: write(tmp)))
    if error is None and world.is_main:
        def publish():
            nonlocal old
            sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = {"step": step, "files": sorted(p.name for p in tmp.iterdir()), "sizes": sizes}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            fsync_tree(tmp)
            old = _hide(target) if target.exists() else None  # a checkpoint of this step: replaced whole
            tmp.rename(target)
            fsync_dir(folder)

        error = _attempt(publish)
    if world.distributed:
        error = _any_failed(world, error)
    if error is not None:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not target.exists():
                old.rename(target)
        raise write_error(run_dir, step, error) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep and world.is_main:
        prune(run_dir, keep)
    return Checkpoint(target, step)


def _attempt(fn) -> BaseException | None:
    """Run `fn`; the write error it raised (a full disk, a folder that cannot be written), or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        fn()
    except (*WRITE_ERRORS, CheckpointException, CheckpointError) as e:
        return e
    return None


def _any_failed(world: World, error: BaseException | None) -> BaseException | None:
    """Whether any rank failed, on every rank: one process keeps its own error; under several ranks the first
    failed rank's, naming it."""
    if not world.distributed:
        return error
    with world.during("saving a checkpoint"):
        words = world.gather(None if error is None else why_not_written(error))
    failed = [(rank, w) for rank, w in enumerate(words) if w]
    return RuntimeError(f"rank {failed[0][0]}: {failed[0][1]}") if failed else None


# torch.save reports a failed write (a full disk) as RuntimeError, safetensors as SafetensorError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL
    return "space" in str(e).lower() or "StorageFull" in str(e)  # torch's and safetensors' own errors


def write_error(run_dir: Path, step: int, e: Exception) -> CheckpointError:
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointError(
        f"could not write the checkpoint of step {step} in {checkpoints_dir(run_dir)}: {why_not_written(e)}; "
        f"{kept}. {how_to_continue(run_dir, e)}"
    )


def why_not_written(e: BaseException) -> str:
    if disk_full(e):
        return "no space left on device"
    return e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def how_to_continue(run_dir: Path, e: BaseException) -> str:
    """The fix for a failed write, then the command that continues the run: a resume only where a
    checkpoint exists (a resume without one is refused)."""
    fix = "free disk space (or set output.dir to a disk with room)" if disk_full(e) else f"check that {run_dir} can be written"
    if latest_checkpoint(run_dir) is not None:
        return f"To continue, {fix} and resume with: grpo train --resume {run_dir}"
    return (f"No checkpoint was saved, so there is nothing to resume: {fix} and run the same command again "
            "with --overwrite (or --resume auto)")


def _hide(path: Path) -> Path:
    """Rename to a hidden name (atomic) before deleting: a kill in between leaves a hidden folder
    (removed by the next save), never a half-deleted folder that looks like a checkpoint."""
    hidden = path.with_name(f".trash-{path.name}-{os.getpid()}")
    path.rename(hidden)
    return hidden


def prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(_hide(old.path), ignore_errors=True)


# --- what a checkpoint holds ------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, rank: int = 0) -> None:
    """Put back what rng.pt holds: one process's states, or (a sharded checkpoint) {"ranks": [every rank's]},
    of which this rank takes its own. A rank the writing run did not have keeps the states it has."""
    if "ranks" in state:
        if rank >= len(state["ranks"]):
            return
        state = state["ranks"][rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_policy(model, tokenizer, folder: Path) -> None:
    """The policy as a Hugging Face folder; for a LoRA (peft) policy only the adapter
    (adapter_config.json, adapter_model.safetensors), which load_policy reads back."""
    with no_progress_bars():  # no "Writing model shards" bar in the training output
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def publish_policy(model, tokenizer, folder: Path, run_dir: Path, same_as: Path | None = None) -> None:
    """save_policy, atomically as a checkpoint: a hidden temporary folder, flushed, then renamed over
    `folder`; a kill or a full disk leaves the previous folder (or none), never a partial one.
    `same_as`: a saved policy folder of these very weights (the final checkpoint's model/), whose files are
    hard-linked instead of written again, so the run's model/ and its last checkpoint share the disk space
    (each stays whole when the other is deleted); written anew where links are refused."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".tmp-{folder.name}-{os.getpid()}"), None
    for stale in [*folder.parent.glob(f".tmp-{folder.name}-*"), *folder.parent.glob(f".trash-{folder.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a kill
    try:
        if not (same_as is not None and link_folder(Path(same_as), tmp)):
            save_policy(model, tokenizer, tmp)
        fsync_tree(tmp)
        old = _hide(folder) if folder.exists() else None
        tmp.rename(folder)
        fsync_dir(folder.parent)
    except BaseException as e:  # a full disk, or Ctrl-C: no temporary folder stays, the previous one is back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)
        if isinstance(e, WRITE_ERRORS):
            raise CheckpointError(f"could not write {folder}: {why_not_written(e)}. {how_to_continue(run_dir, e)}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_folder(source: Path, target: Path) -> bool:
    """Hard-link every file of a whole saved policy folder into a new folder `target`; False (and no `target`)
    where the source is damaged or the filesystem refuses links."""
    if policy_damage(source) is not None or any(p.is_dir() for p in source.iterdir()):
        return False
    target.mkdir()
    try:
        for f in source.iterdir():
            os.link(f, target / f.name)
    except OSError:  # another filesystem, or links not supported: the caller writes the files
        shutil.rmtree(target, ignore_errors=True)
        return False
    return True


def load_policy(model, folder: Path) -> None:
    """Load saved policy weights into `model` in place (bitwise). Weights tied to a loaded one
    (e.g. lm_head to the embeddings, which save_pretrained writes once) may be absent."""
    from safetensors.torch import load_file

    if is_lora(model):
        return load_lora_policy(model, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights")
    state: dict = {}
    for f in files:
        state.update(load_file(f, device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match the model (missing {untied[:3]}, unexpected {unexpected[:3]})"
        )


def load_lora_policy(model, folder: Path) -> None:
    """Load a saved adapter into a peft policy in place (bitwise); every adapter weight must be there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (was this run trained without LoRA?)")
    state = load_file(path, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: the adapter does not match the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )


def write_checkpoint(folder: Path, config: Config, trainer, tokenizer) -> None:
    """Fill a (temporary) checkpoint folder: everything a run needs to continue exactly. Under several ranks every
    rank calls it and the checkpoint is sharded (`write_sharded`)."""
    from safetensors.torch import save_model

    if trainer.world.distributed:
        return write_sharded(folder, config, trainer)
    save_policy(trainer.model, tokenizer, folder / "model")
    torch.save(trainer.state_dict(), folder / "trainer.pt")
    torch.save(rng_state(), folder / "rng.pt")
    if trainer.ref_model is not None and trainer.ref_reset_step is not None:
        save_model(trainer.ref_model, str(folder / "reference.safetensors"))
    (folder / "config.yaml").write_text(dump_config(config))


def write_sharded(folder: Path, config: Config, trainer) -> None:
    """Every rank writes its part of the policy, the optimizer and a reset reference (torch.distributed.checkpoint);
    rank 0 then the trainer's state, every rank's RNG states and the config, after checking that every rank's file
    reached its folder (they do not where output.dir is not shared by every machine)."""
    import torch.distributed.checkpoint as dcp

    with trainer.world.during("saving a checkpoint"):
        rngs = trainer.world.gather(rng_state())  # every rank's own streams, in rank order
    state = sharded_state(trainer, with_reference=trainer.ref_reset_step is not None)
    dcp.save(state, checkpoint_id=str(folder / SHARDED))
    if not trainer.world.is_main:
        return
    if why := sharded_damage(folder / SHARDED):
        raise CheckpointError(f"{why}: the ranks wrote their parts of the checkpoint where rank 0 cannot see them; "
                              "output.dir must be on a filesystem every machine of the run shares")
    torch.save(trainer.state_dict(optimizer=False), folder / "trainer.pt")
    torch.save({"ranks": rngs}, folder / "rng.pt")
    (folder / "config.yaml").write_text(dump_config(config))


def sharded_state(trainer, with_reference: bool, fresh_optimizer: bool | None = None) -> dict:
    """What a sharded checkpoint holds, as this rank holds it (the dict torch.distributed.checkpoint saves or
    loads in place). An optimizer that has made no update yet is saved as such, its hyperparameters without any
    state (grpo.optim.kept_fresh); `fresh_optimizer`, to load: whether the checkpoint's was (None: this one)."""
    with kept_fresh(trainer.optimizer) as fresh:  # rank_state would give a fresh AdamW a step count
        policy = rank_state(trainer.model, trainer.optimizer)
    if fresh if fresh_optimizer is None else fresh_optimizer:
        policy["optimizer"] = {**policy["optimizer"], "state": {}}
    state = {"policy": policy}
    if with_reference and trainer.ref_model is not None:
        state["reference"] = weights_state(trainer.ref_model)
    return state


def restore_sharded(checkpoint: Checkpoint, trainer) -> None:
    """Every rank (or the one process): its part of a sharded checkpoint, cut to this run's world size and
    sharding, then the trainer's state and the RNG."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = checkpoint.path
    try:
        own = torch.load(path / "trainer.pt", weights_only=False)
        fresh = not saved_optimizer_state(path / SHARDED)
        state = sharded_state(trainer, with_reference=own["ref_reset_step"] is not None, fresh_optimizer=fresh)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            dcp.load(state, checkpoint_id=str(path / SHARDED))
        with kept_fresh(trainer.optimizer) if fresh else nullcontext():  # saved before the first update
            load_rank_state(trainer.model, trainer.optimizer, state["policy"])
        if "reference" in state:
            load_weights_state(trainer.ref_model, state["reference"])
        trainer.load_state_dict(own)
        set_rng_state(torch.load(path / "rng.pt", weights_only=False), trainer.world.rank)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch.distributed.checkpoint wraps what a rank met
        raise CheckpointError(
            f"cannot load the checkpoint {path}: {type(e).__name__}: {str(e)[:500]}. If it is damaged, move it "
            f"away (mv {path} {path}.damaged) and resume again to continue from the checkpoint before it"
        ) from None


def saved_optimizer_state(folder: Path) -> bool:
    """Whether a sharded checkpoint holds optimizer state (False: it was written before the first update)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(k.startswith("policy.optimizer.state.") for k in keys)


def saved_reference(checkpoint: Checkpoint) -> dict[str, torch.Tensor] | None:
    """A whole checkpoint's reset reference weights (None: the reference is the start weights)."""
    from safetensors.torch import load_file

    path = checkpoint.path / "reference.safetensors"
    return load_file(path) if path.is_file() else None


def restore(checkpoint: Checkpoint, trainer) -> None:
    """Put the policy, the reference, the Trainer and every RNG back to the checkpoint's state."""
    from safetensors.torch import load_model

    path = checkpoint.path
    try:
        load_policy(trainer.model, path / "model")
        trainer.load_state_dict(torch.load(path / "trainer.pt", weights_only=False))
        if (path / "reference.safetensors").is_file() and trainer.ref_model is not None:
            load_model(trainer.ref_model, str(path / "reference.safetensors"))
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"cannot load the checkpoint {path}: {type(e).__name__}: {e}. It is damaged: move it away "
            f"(mv {path} {path}.damaged) and resume again to continue from the checkpoint before it"
        ) from None


# --- resuming: which config, and is it the same run -------------------------------------------


def flatten(tree, prefix: str = "") -> dict:
    """{"trainer": {"lr": 1e-6}} -> {"trainer.lr": 1e-6}; lists (rewards) stay whole values."""
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, new: dict) -> list[str]:
    """Differences that matter between two configs (as model_dump(mode="json") trees), one line each."""
    a, b = flatten(saved), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE) or a.get(key) == b.get(key):
            continue
        lines.append(f"  {key}: {a.get(key, '(absent)')!r} in the checkpoint, {b.get(key, '(absent)')!r} now")
    return lines


def check_resume(checkpoint: Checkpoint, config: Config) -> None:
    """Refuse a resume that would not continue the same run, or that has nothing left to train."""
    check_same_run(checkpoint, config)
    if checkpoint.step >= config.trainer.steps:
        raise nothing_to_train(checkpoint, config)


def check_same_run(checkpoint: Checkpoint, config: Config) -> None:
    """Refuse a resume whose config changes what the remaining steps compute."""
    saved = yaml.safe_load((checkpoint.path / "config.yaml").read_text())
    saved = absolute_path_tree(saved)  # a run started before paths were stored absolute: relative to here
    diffs = config_diff(saved, config.model_dump(mode="json"))
    if diffs:
        raise CheckpointError(
            f"cannot resume from {checkpoint.path}: the config differs in ways that change the training:\n"
            + "\n".join(diffs)
            + "\n  (a resume may change trainer.steps, model.device, output.*, eval.* and logging fields; "
            "start a new run (another output.dir) to change the others)"
        )


def nothing_to_train(checkpoint: Checkpoint, config: Config) -> CheckpointError:
    return CheckpointError(
        f"nothing to train: the checkpoint {checkpoint.path.name} is at step {checkpoint.step} and "
        f"trainer.steps is {config.trainer.steps}; to train more, raise it, e.g. "
        f"grpo train --resume {checkpoint.path.parent.parent} trainer.steps={checkpoint.step + config.trainer.steps}"
    )


def logged_steps(path: Path) -> list[int]:
    """The steps of a metrics file's complete lines (a line cut by a kill is not a step)."""
    return [r["step"] for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a metrics/samples file up to `step`, so a resumed run's files read as one run
    (lines of steps after the checkpoint, and a line cut by a kill, are dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
