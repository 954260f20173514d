"""Moving a step's rollouts between data-parallel processes (through ``accelerate``).

Each process generates and scores its shard of the step's rollouts (the expensive part); the shards
are then gathered, so every process holds the whole global batch and computes the same advantages
(whitened over the global batch), the same mini-batch partition and the same loss normalisation.
That is what makes an N-process run equal a single-process run with the same global batch, up to
floating-point rounding. The gathered tensors are small next to the models ([B, T] token ids and a
few [B, T] floats).

Also here: the loss normalisation that makes a split mini-batch train like a whole one
(:func:`global_token_weight`), and what FSDP2 needs from the trainer (:func:`check_distributed_support`,
:func:`generation_weights`, :func:`full_state_dict`).

Shards are padded to the widest prompt and completion across processes first: prompts are
left-padded and completions right-padded (see :mod:`vrpo_fast.rollout`), so a shard gets extra
columns on both sides. Positions count real tokens only, so the extra padding changes no output.
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .rollout import Rollout

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["requested_processes", "gather_rollout", "gather_objects", "pad_columns", "global_token_weight", "mean_over_processes",
           "is_sharded", "check_distributed_support", "generation_weights", "full_state_dict",
           "optimizer_state", "load_optimizer_state"]


def requested_processes() -> Optional[int]:
    """``--num_processes`` of the ``accelerate launch`` that started this process, when it used the
    simple (single-process) launcher; None otherwise.

    On a machine without GPUs, ``accelerate launch --num_processes 2 ...`` (without ``--multi_gpu``)
    silently starts ONE process. The result is the same (N processes match one process with the same
    global batch), only slower, so the trainer warns instead of failing. Reads the parent's command
    line (Linux /proc via psutil, which accelerate depends on); None when that is not possible.
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return None  # not accelerate's simple launcher (torchrun sets WORLD_SIZE)
    try:
        import psutil

        argv = psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 - best effort: no psutil, no permission, a vanished parent
        return None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else \
            (argv[i + 1] if arg == "--num_processes" and i + 1 < len(argv) else None)
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def pad_columns(x: torch.Tensor, left: int, right: int, value=0) -> torch.Tensor:
    """``x`` [B, T] with ``left`` columns of ``value`` before and ``right`` after."""
    if left == 0 and right == 0:
        return x
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), (left, right), value=int(value)).bool()
    return F.pad(x, (left, right), value=value)


def gather_objects(accelerator, items: Sequence) -> List:
    """The concatenation, in process order, of every process's list ``items``."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def gather_rollout(accelerator, rollout: Rollout, tensors: Dict[str, torch.Tensor], *, pad_token_id: int
                   ) -> Tuple[Rollout, Dict[str, torch.Tensor]]:
    """Every process's rows, in process order: the rollout and the named per-row tensors.

    ``tensors`` holds [B] tensors (one value per row) and [B, T] tensors aligned with
    ``rollout.input_ids`` (token- or state-aligned alike; padded with 0; token ids with
    ``pad_token_id``). Row ``i`` of process ``r`` becomes global row ``r * B + i``: shards must be
    equal-sized and contiguous (as :func:`vrpo_fast.trainer.shard` makes them).
    """
    if accelerator.num_processes == 1:
        return rollout, dict(tensors)
    B, L = rollout.input_ids.shape
    P = rollout.prompt_length
    for name, t in tensors.items():
        if t.shape[0] != B or (t.dim() == 2 and t.shape[1] != L) or t.dim() > 2:
            raise ValueError(f"{name} must be [B] or [B, T] = [{B}], [{B}, {L}], got {tuple(t.shape)}")
    widths = accelerator.gather(torch.tensor([[P, L - P]], device=rollout.input_ids.device)).view(-1, 2)
    P_max, C_max = (int(w) for w in widths.max(0).values)
    left, right = P_max - P, C_max - (L - P)

    def gather(t: torch.Tensor, value=0) -> torch.Tensor:
        is_bool = t.dtype == torch.bool  # collectives and F.pad take no bool: one uint8 round trip
        t = t.to(torch.uint8) if is_bool else t
        if t.dim() == 2:
            t = pad_columns(t, left, right, value)
        out = accelerator.gather(t.contiguous())
        return out.bool() if is_bool else out

    merged = Rollout(gather(rollout.input_ids, pad_token_id), gather(rollout.attention_mask), gather(rollout.response_mask),
                     P_max, gather_objects(accelerator, rollout.completions))
    return merged, {name: gather(t) for name, t in tensors.items()}


def global_token_weight(accelerator, mask: torch.Tensor, total: Optional[torch.Tensor] = None,
                        accumulation_steps: int = 1) -> torch.Tensor:
    """Factor that turns this process's masked token mean into its share of the GLOBAL token mean.

    DDP averages gradients over the processes and ``accelerator.backward`` divides by the
    accumulation steps, so a mean of per-micro-batch means would weigh a token by how full its
    micro-batch is. Scaling each micro-batch's mean by ``n_local * processes * accumulation / total``
    (``total``: the tokens of the whole mini-batch, summed over processes when not given) makes the
    update the token mean over the mini-batch, however it is split: what makes an N-process run match
    a single-process run with the same global batch.
    """
    n_local = mask.sum().to(torch.float64)
    if total is None:
        total = accelerator.reduce(n_local.clone(), reduction="sum") if accelerator.num_processes > 1 else n_local
    return (n_local * (accelerator.num_processes * accumulation_steps) / total.clamp_min(1)).float()


def mean_over_processes(accelerator, values: Dict[str, Any]) -> Dict[str, float]:
    """Average scalar metrics over the processes (one all-reduce for all of them)."""
    names = list(values)
    local = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    return dict(zip(names, local.tolist()))


def is_sharded(accelerator) -> bool:
    """Whether the trained models' parameters are split across processes (FSDP), not replicated (DDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed_support(cfg: "TrainConfig", accelerator) -> None:
    """Refuse the accelerate setups this trainer does not handle, before any model is loaded."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("DeepSpeed is not supported: the policy and the critic are two trained models and "
                         "accelerator.backward drives a single DeepSpeed engine. Use examples/accelerate/fsdp.yaml "
                         "(FSDP2) or ddp.yaml (docs/multi_gpu.md)")
    if not is_sharded(accelerator):
        return
    if not accelerator.is_fsdp2:
        raise ValueError("FSDP1 is not supported: set fsdp_version: 2 (examples/accelerate/fsdp.yaml)")
    if cfg.model.lora_r:
        raise ValueError("--lora-r is not supported with FSDP yet: use DDP (examples/accelerate/ddp.yaml)")
    world = accelerator.num_processes
    # every process must call generate() as often as the others: each call all-gathers the weights
    if cfg.task.num_eval % world or (cfg.optim.warmup_target > 0 and cfg.optim.warmup_probe_size % world):
        raise ValueError(f"with FSDP, --num-eval ({cfg.task.num_eval}) and --warmup-probe-size "
                         f"({cfg.optim.warmup_probe_size}) must be divisible by the number of processes ({world})")


@contextlib.contextmanager
def generation_weights(accelerator, prepared):
    """Context in which ``unwrap_model(prepared).lm.generate`` runs under FSDP2.

    The prepared root (the TokenScorer) owns the parameters outside the wrapped decoder layers
    (embeddings, final norm, lm_head); calling its child LM directly skips the root's hooks, so they
    are gathered here. The decoder layers gather their own. A no-op without FSDP.
    """
    if not is_sharded(accelerator):
        yield
        return
    from torch.distributed.fsdp import fully_shard

    root = accelerator.unwrap_model(prepared)
    fully_shard.state(root)._lazy_init()  # FSDP2 needs the root initialised before any child runs
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def full_state_dict(accelerator, prepared, prefix: str = "") -> Optional[Dict[str, torch.Tensor]]:
    """Under FSDP, the full weights of ``prepared`` (keys starting with ``prefix``, stripped), gathered on
    the main process (a collective: call it on EVERY process); None without FSDP."""
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(prepared)
    # a tied weight (lm_head = embed_tokens) once, under the name save_pretrained itself keeps
    module = accelerator.unwrap_model(prepared)
    aliases = {n for n, _ in module.named_parameters(remove_duplicate=False)} - \
        {n for n, _ in module.named_parameters()}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k not in aliases}


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def optimizer_state(accelerator, prepared, optimizer) -> Optional[Dict[str, Any]]:
    """``optimizer``'s state dict for a checkpoint. Under FSDP the full (unsharded) state keyed by
    parameter name, gathered on the main process (a collective: call it on EVERY process; the others
    get an empty dict)."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    if not _inner_optimizer(optimizer).state:  # never stepped (e.g. the policy's after the critic warm-up):
        return {"never_stepped": True}  # torch's gather of an FSDP2 optimizer state needs a state to exist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(accelerator.unwrap_model(prepared), _inner_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, prepared, optimizer, state: Dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state` (every process passes the full state it read from disk;
    under FSDP each keeps its shard)."""
    if not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    if state.get("never_stepped"):
        return  # a fresh optimizer is what was saved
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(accelerator.unwrap_model(prepared), _inner_optimizer(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
