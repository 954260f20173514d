"""One VRPO training step, phase by phase: fused ops vs the same step with plain-PyTorch ops.

The step is composed from the library's public pieces, as :func:`vrpo_fast.trainer.run_training`
composes it (one PPO epoch over micro-batches):

    generate      rollout.generate (policy, KV cache, temperature 1)
    score         pi_old log-probs + pi_ref log-probs / entropy / perplexity      (TokenScorer, no grad)
    value_old     critic forward, no grad (V_old)
    gae           token_level_rewards + GAE advantages / returns
    policy_fb     policy forward + PPO loss + backward                  (micro-batches)
    value_fb      critic forward + VRPO value loss + backward           (micro-batches)
    optimizer     grad-norm clipping + AdamW steps of policy and critic

Variants: ``fused`` = ``TokenScorer(lm)`` (fused linear + log-softmax, no [B, T, V] logits) and
``gae_advantages`` (fused GAE + whitening); ``plain`` = ``TokenScorer(lm, fused=False)`` (full
logits + fp32 log_softmax) and ``vrpo_fast.ops.gae_reference``. Everything else is shared.

Timing: median per phase over ``--steps`` steps after one warm-up step (CUDA: synchronised around
every phase; variants one after the other; CPU: both variants in one process, steps interleaved).
Peak memory: CUDA, ``torch.cuda.max_memory_allocated`` over the timed steps (absolute,
weights and optimiser states included) and above the models + optimiser states; CPU, the peak extra
RSS of one full step in a fresh process (after a warm-up step there).

Precision: a variant name may carry ``-fp32`` or ``-bf16`` (``fused-bf16``): bf16 autocast with fp32
master weights and a bf16 reference, as the trainer runs ``--mixed-precision bf16``; without a suffix
the device's default (bf16 on CUDA, fp32 on CPU). ``-attn32`` next (``fused-bf16-attn32``) runs the
models' SDPA in fp32 on CPU (:func:`vrpo_fast.precision.use_fp32_attention`); ``-wcache`` last keeps
bf16 copies of the policy's and critic's weights until their optimiser steps
(:func:`vrpo_fast.precision.cache_low_precision_weights`) instead of autocast casting them again in
every autocast region. ``--variants`` picks them (default ``fused,plain``; ``fused,fused-bf16`` for
``--config smollm2``).

Against the machine: every phase's model FLOPs (:mod:`vrpo_fast.flops`, counted from the model config
and the step's actual shapes: prompt columns, generated columns) and its achieved GFLOP/s as a
fraction of the fp32 and bf16 GEMM rates measured in the same process before and after the timed
steps (best of ``torch.mm`` n = 512 and 1024, and a GEMM of the model's own MLP shape). ``--profile``
runs one more step per variant under ``torch.profiler`` and splits each phase into GEMM, attention,
other ops and time outside ops (Python, ``generate``'s loop, the dispatcher).

Configs: ``tiny`` (the embedded char-level model), ``small`` (random Llama, vocab 32000, hidden 256,
2 layers: logits memory matters on CPU), ``0.5b`` (random Llama, hidden 1024, 24 layers, vocab
151936, 64 x 1024-token responses; meant for CUDA with bf16 autocast), ``smollm2`` (SmolLM2-135M-
Instruct from the smollm2 extra).

    python benchmarks/bench_train_step.py --quick
    python benchmarks/bench_train_step.py --config small
    python benchmarks/bench_train_step.py --config smollm2 --batch 16 --new-tokens 32 --threads 1 --profile
    python benchmarks/bench_train_step.py --config 0.5b --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    cpu_peak_extra_bytes, fmt_bytes, machine, markdown_table, measure_copy_gbps, measure_matmul_tflops, pct_of,
)

from vrpo_fast.algorithms.advantages import gae_advantages, token_level_rewards  # noqa: E402
from vrpo_fast.algorithms.losses import policy_loss, vrpo_value_loss  # noqa: E402
from vrpo_fast.flops import PHASES, DecoderShape, rl_step_flops  # noqa: E402
from vrpo_fast.models.loading import build_value_model, frozen_copy  # noqa: E402
from vrpo_fast.ops import gae_reference  # noqa: E402
from vrpo_fast.rollout import generate  # noqa: E402
from vrpo_fast.scoring import TokenScorer, reference_stats, score  # noqa: E402

VARIANTS = ("fused", "plain")


@dataclass
class StepConfig:
    vocab_size: int  # 0: the embedded char tokenizer's vocabulary
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    batch: int  # rollouts per step
    new_tokens: int  # max_new_tokens
    prompt_chars: int  # prompt length in characters (~tokens)
    micro_batch: int  # rows per forward/backward micro-batch (and per scoring chunk)
    preset: str = ""  # a real pretrained model (vrpo_fast.models.presets) instead of a random Llama


CONFIGS = {
    "tiny": StepConfig(0, 128, 2, 4, 4, 256, batch=16, new_tokens=32, prompt_chars=12, micro_batch=16),
    "small": StepConfig(32000, 256, 2, 4, 4, 512, batch=16, new_tokens=64, prompt_chars=16, micro_batch=16),
    "0.5b": StepConfig(151936, 1024, 24, 16, 4, 2816, batch=64, new_tokens=1024, prompt_chars=32, micro_batch=8),
    # SmolLM2-135M-Instruct from the smollm2 extra (shape fields are read from the loaded model)
    "smollm2": StepConfig(49152, 576, 30, 9, 3, 1536, batch=8, new_tokens=64, prompt_chars=32, micro_batch=8,
                          preset="smollm2-135m"),
}
QUICK = {"tiny": dict(batch=8, new_tokens=16), "small": dict(batch=8, new_tokens=32),
         "0.5b": dict(batch=16, new_tokens=128, micro_batch=8),
         "smollm2": dict(batch=4, new_tokens=16, micro_batch=4)}


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int):
    """The embedded char tokenizer, its vocabulary padded with filler tokens up to ``vocab_size``.

    Prompts only use characters; sampled filler ids decode to ``<tN>`` strings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vrpo_fast.models.tiny import BOS, CHARACTERS, EOS, PAD, SPECIAL_TOKENS, UNK, build_char_tokenizer

    if vocab_size == 0:
        return build_char_tokenizer()
    base = SPECIAL_TOKENS + CHARACTERS
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be >= {len(base)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(base)}
    vocab.update({f"<t{i}>": i for i in range(len(base), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.FixedLength(length=1)
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, padding_side="left", clean_up_tokenization_spaces=False)


def build_policy(cfg: StepConfig, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(128, cfg.prompt_chars + cfg.new_tokens + 8),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(llama)
    gc = lm.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, \
        tokenizer.bos_token_id
    return lm


def make_prompts(n: int, chars: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    alphabet = "0123456789+-*= abcdefghij"
    idx = torch.randint(len(alphabet), (n, chars), generator=g).tolist()
    return ["".join(alphabet[i] for i in row) for row in idx]


def parse_variant(name: str):
    """``"fused"`` / ``"plain"``, optionally ``-fp32`` / ``-bf16``, optionally ``-attn32`` (SDPA in fp32
    on CPU, :func:`vrpo_fast.precision.use_fp32_attention`), optionally ``-wcache`` (bf16 weight copies
    kept across autocast regions, :func:`vrpo_fast.precision.cache_low_precision_weights`):
    ``(ops, precision or None, attn32, wcache)``."""
    ops, *rest = name.split("-")
    wcache = bool(rest) and rest[-1] == "wcache"
    rest = rest[:-1] if wcache else rest
    attn32 = bool(rest) and rest[-1] == "attn32"
    rest = rest[:-1] if attn32 else rest
    if ops not in VARIANTS or len(rest) > 1 or (rest and rest[0] not in ("fp32", "bf16")):
        raise ValueError(f"a variant is fused or plain, optionally with -fp32 / -bf16, then optionally -attn32, "
                         f"then optionally -wcache (e.g. fused-bf16-attn32-wcache), got {name!r}")
    return ops, (rest[0] if rest else None), attn32, wcache


class TrainStep:
    """Models, optimisers and one instrumented RL step for one variant."""

    def __init__(self, cfg: StepConfig, variant: str, device: str, seed: int = 0, fused_adamw: bool = False):
        ops, precision, attn32, wcache = parse_variant(variant)
        self.cfg, self.variant, self.device = cfg, variant, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.precision = precision or ("bf16" if self.cuda else "fp32")
        if cfg.preset:
            from vrpo_fast.models.presets import load_model_and_tokenizer

            policy_lm, self.tokenizer = load_model_and_tokenizer(cfg.preset)
        else:
            self.tokenizer = build_tokenizer(cfg.vocab_size)
            policy_lm = build_policy(cfg, self.tokenizer, seed)
        ref_lm = frozen_copy(policy_lm)
        torch.manual_seed(seed + 1)
        value_model = build_value_model(policy_lm, algo="vrpo")
        bf16 = self.precision == "bf16"
        if bf16:
            ref_lm.to(torch.bfloat16)  # as the trainer does under bf16 mixed precision
        if attn32:
            from vrpo_fast.precision import use_fp32_attention

            for model in (policy_lm, ref_lm, value_model):
                use_fp32_attention(model)
        self.fused = ops == "fused"
        self.policy_lm = policy_lm.to(self.device)
        self.policy = TokenScorer(self.policy_lm, fused=self.fused)
        self.ref = TokenScorer(ref_lm, fused=self.fused).to(self.device)
        self.value_model = value_model.to(self.device)
        self.value_head_params = sum(m.weight.numel() for name, m in self.value_model.named_modules()
                                     if isinstance(m, torch.nn.Linear) and not name.startswith("backbone"))
        adamw = dict(lr=1e-6, weight_decay=0.0, **({"fused": True} if fused_adamw else {}))
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), **adamw)
        self.value_opt = torch.optim.AdamW(self.value_model.parameters(), **adamw)
        if wcache:
            from vrpo_fast.precision import cache_low_precision_weights

            cache_low_precision_weights(self.policy_lm, [self.policy_opt])
            cache_low_precision_weights(self.value_model, [self.value_opt])
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.seed = seed
        self.shape = DecoderShape.from_config(self.policy_lm.config)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, step: int, marker=None):
        """One step; returns ``({phase: seconds}, tokens in the rollout, {phase: model FLOPs})``.

        ``marker(name)`` (profiling) is called at the start of every phase and with None at the end.
        """
        c, times = self.cfg, {}
        mark = [time.perf_counter()]
        phases = iter(PHASES)

        def lap(name):
            self._sync()
            now = time.perf_counter()
            times[name] = times.get(name, 0.0) + now - mark[0]
            mark[0] = now
            if marker is not None:
                marker(next(phases, None) if name != "optimizer" else None)

        # every variant samples the same prompts at the same step (their weights are equal at step 0)
        torch.manual_seed(self.seed * 1000 + step)
        prompts = make_prompts(c.batch, c.prompt_chars, self.seed * 1000 + step)
        self._sync()
        if marker is not None:
            marker(next(phases))
        mark[0] = time.perf_counter()
        with self.autocast():
            rollout = generate(self.policy_lm, self.tokenizer, prompts, max_new_tokens=c.new_tokens,
                               temperature=1.0, device=self.device)
        mask = rollout.action_mask
        lap("generate")

        with torch.no_grad(), self.autocast():
            old_logprobs, _ = score(self.policy, rollout, compute_entropy=False, batch_size=c.micro_batch)
            ref_stats = reference_stats(self.ref, rollout, batch_size=c.micro_batch)
        lap("score")
        with torch.no_grad(), self.autocast():
            self.value_model.eval()
            old_values = torch.cat([self.value_model(rollout.input_ids[i:i + c.micro_batch],
                                                     rollout.attention_mask[i:i + c.micro_batch],
                                                     response_mask=rollout.response_mask[i:i + c.micro_batch]).values
                                    for i in range(0, c.batch, c.micro_batch)])
            self.value_model.train()
        lap("value_old")

        reward = torch.rand(c.batch, generator=torch.Generator().manual_seed(step)).to(self.device)
        token_rewards = token_level_rewards(reward, mask, old_logprobs, ref_stats.logprobs, kl_coef=0.05)
        if self.fused:
            advantages, returns = gae_advantages(token_rewards, old_values, mask, gamma=1.0, lam=0.95, whiten=True)
        else:
            advantages, returns = gae_reference(token_rewards, old_values, mask != 0, gamma=1.0, lam=0.95,
                                                whiten=True)
            advantages, returns = advantages.float(), returns.float()
        lap("gae")

        for i in range(0, c.batch, c.micro_batch):
            rows = torch.arange(i, min(i + c.micro_batch, c.batch), device=self.device)
            mb, m = rollout.select(rows), mask[rows]
            with self.autocast():
                logprobs, entropy = score(self.policy, mb)
                loss_p, _ = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, clip=0.2,
                                        entropy=entropy, entropy_coef=0.001)
            loss_p.backward()
            lap("policy_fb")
            with self.autocast():
                out = self.value_model(mb.input_ids, mb.attention_mask, response_mask=mb.response_mask)
                loss_v, _ = vrpo_value_loss(out.values, old_values[rows], returns[rows], m, kl=out.kl,
                                            ent_pred=out.ent_pred, ent_target=ref_stats.entropy[rows],
                                            nll_pred=out.nll_pred, nll_target=ref_stats.nll[rows])
            loss_v.backward()
            lap("value_fb")
            if marker is not None and i + c.micro_batch < c.batch:
                phases = iter(PHASES[PHASES.index("policy_fb"):])  # the next micro-batch
                marker(next(phases))

        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), 1.0)
        self.policy_opt.step()
        self.value_opt.step()
        self.policy_opt.zero_grad(set_to_none=True)
        self.value_opt.zero_grad(set_to_none=True)
        lap("optimizer")
        P, L = rollout.prompt_length, rollout.input_ids.shape[1]
        # the fused scorer makes logits only where there is a label (vrpo_fast.scoring.TokenScorer)
        scored = int(mask.sum()) if self.fused and getattr(self.policy, "scores_labelled_only", False) else None
        flops = rl_step_flops(self.shape, batch=c.batch, prompt_length=P, new_tokens=L - P,
                              value_head_params=self.value_head_params, scored_tokens=scored)
        return times, int(rollout.attention_mask.sum()), flops


def make_cpu_step(cfg_dict: dict, variant: str, threads: int, fused_adamw: bool = False):
    """Module-level (picklable) builder for ``cpu_peak_extra_bytes``: warm-up step, then one step."""
    torch.set_num_threads(threads)
    bench = TrainStep(StepConfig(**cfg_dict), variant, "cpu", fused_adamw=fused_adamw)
    bench.run(0)  # optimiser states exist before the measurement, as in a long run
    return lambda: bench.run(1)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _summary(bench, runs):
    per_phase = {p: [t.get(p, 0.0) for t, _, _ in runs] for p in PHASES}
    totals = [sum(t.values()) for t, _, _ in runs]
    tokens = [n for _, n, _ in runs]
    # achieved model GFLOP/s per phase: median over steps of (that step's FLOPs / that step's time)
    rates = {p: statistics.median([f[p] / t[p] / 1e9 if t.get(p) else 0.0 for t, _, f in runs]) for p in PHASES}
    rates["step"] = statistics.median([f["step"] / sum(t.values()) / 1e9 for t, _, f in runs])
    gflop = {p: statistics.median([f[p] / 1e9 for _, _, f in runs]) for p in PHASES + ("step",)}
    return {"phases": {p: statistics.median(v) * 1e3 for p, v in per_phase.items()},
            "total_ms": statistics.median(totals) * 1e3,
            "tokens_per_s": statistics.median([n / t for n, t in zip(tokens, totals)]),
            "tokens": statistics.median(tokens), "gflops": rates, "gflop": gflop,
            "params": sum(p.numel() for p in bench.policy_lm.parameters())}


def measure_cuda(cfg: StepConfig, variant: str, device: str, steps: int, fused_adamw: bool = False):
    """One variant at a time, so that each has the allocator (and its peak statistics) to itself."""
    bench = TrainStep(cfg, variant, device, fused_adamw=fused_adamw)
    bench.run(0)  # warm-up: kernels compiled / autotuned, optimiser states allocated
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _summary(bench, [bench.run(s) for s in range(1, steps + 1)])
    torch.cuda.synchronize()
    out["peak"] = torch.cuda.max_memory_allocated()
    out["peak_extra"] = out["peak"] - resident
    del bench
    torch.cuda.empty_cache()
    return out


def measure_cpu(cfg: StepConfig, variants, steps: int, profile: bool = False, fused_adamw: bool = False,
                thread_sweep=()):
    """All variants in one process, steps interleaved, so that load from other processes hits them alike.

    ``thread_sweep`` (thread counts): every variant's step runs once at each count in turn, reported as
    ``"variant@Nt"``."""
    benches = {v: TrainStep(cfg, v, "cpu", fused_adamw=fused_adamw) for v in variants}
    for b in benches.values():
        b.run(0)
    threads = torch.get_num_threads()
    names = {(v, t): f"{v}@{t}t" if thread_sweep else v for v in variants for t in (thread_sweep or (threads,))}
    runs = {name: [] for name in names.values()}
    for s in range(1, steps + 1):
        for (v, t), name in names.items():
            torch.set_num_threads(t)
            runs[name].append(benches[v].run(s))
    torch.set_num_threads(threads)
    out = {name: _summary(benches[v], runs[name]) for (v, _), name in names.items()}
    if profile:
        for v in variants:
            out[v]["profile"] = profile_step(benches[v], steps + 1)
    return out


# ----------------------------------------------------------------------------------------------
# where the time goes: one step under torch.profiler
# ----------------------------------------------------------------------------------------------
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise", "aten::mkldnn_linear"}
CATEGORIES = ("GEMM", "attention", "other ops", "outside ops")


def _category(name: str) -> str:
    if name in GEMM_OPS:
        return "GEMM"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "other ops"


def profile_step(bench: "TrainStep", step: int) -> dict:
    """``{phase: {"wall": ms, category: ms}}`` of one step: the self time of every op inside the
    phase, by category; ``outside ops`` is the phase's wall time not spent inside any op (Python,
    ``generate``'s loop and logits processors, the dispatcher; the profiler's own cost lands here too)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    current = []

    def marker(name):
        if current:
            current.pop().__exit__(None, None, None)
        if name is not None:
            rf = record_function(f"phase::{name}")
            rf.__enter__()
            current.append(rf)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.run(step, marker=marker)
    events = list(prof.events())
    windows = [(e.name.split("::", 1)[1], e.time_range.start, e.time_range.end) for e in events
               if e.name.startswith("phase::")]
    out = {p: {"wall": 0.0, **{c: 0.0 for c in CATEGORIES}} for p in PHASES}
    for phase, start, end in windows:
        out[phase]["wall"] += (end - start) / 1e3
    # sort ops into windows by start time (windows do not overlap)
    windows.sort(key=lambda w: w[1])
    starts = [w[1] for w in windows]
    import bisect

    for e in events:
        if e.name.startswith("phase::"):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.start >= windows[i][2]:
            continue
        out[windows[i][0]][_category(e.name)] += e.self_cpu_time_total / 1e3
    for p in PHASES:
        inside = sum(out[p][c] for c in CATEGORIES[:3])
        out[p]["outside ops"] = max(0.0, out[p]["wall"] - inside)
    return out


# ----------------------------------------------------------------------------------------------
# the machine's limits, measured in this process
# ----------------------------------------------------------------------------------------------
def measure_gemm_rates(device, mlp_shape=None) -> dict:
    """GFLOP/s: ``{"fp32", "bf16"}`` best of square ``torch.mm`` n = 512 and 1024 (median of 3 each,
    ``_common.measure_matmul_tflops``); with ``mlp_shape = (m, k, n)`` also ``{"fp32_mlp", "bf16_mlp"}``,
    a GEMM of the model's own MLP shape (best of 3)."""
    out = {"copy_gbps": measure_copy_gbps(device, 256 << 20) if torch.device(device).type == "cpu" else 0.0}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = max(measure_matmul_tflops(device, dtype, n=n) * 1e3 for n in (512, 1024))
        if mlp_shape is not None and torch.device(device).type == "cpu":
            from vrpo_fast.precision import measure_cpu_gemm_gflops

            out[f"{name}_mlp"] = measure_cpu_gemm_gflops(dtype, *mlp_shape, reps=3)
    return out


def _max_rates(a: dict, b: dict) -> dict:
    return {k: max(a[k], b[k]) for k in a}


def model_flops_per_step(cfg_tokens: float, n_params: int, vocab: int, hidden: int) -> float:
    """Dense-matmul FLOPs of one step, ~2 x params per token per forward (x3 for forward + backward).

    The CUDA summary's quick estimate (``vrpo_fast.flops.rl_step_flops`` is the exact count):
    policy / reference forward 2 P (tied lm_head included), critic 2 (P - V H), so
    tokens * (12 P + 8 (P - V H)); attention's T^2 terms left out.
    """
    body = n_params - vocab * hidden
    return cfg_tokens * (12 * n_params + 8 * body)


def _saving(fused: float, plain: float) -> str:
    if plain <= 0 or fused <= 0:
        return "-"
    return f"fused {(1 - fused / plain) * 100:.0f}% less" if fused <= plain else f"fused {fused / plain:.2f}x more"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU model"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"


def machine_table(results: dict, variants, rates: dict) -> str:
    """Per phase: model GFLOP per step, achieved GFLOP/s and % of the measured fp32 / bf16 GEMM rates."""
    headers = ["phase", "model GFLOP"]
    for v in variants:
        headers += [f"{v} GFLOP/s", f"{v} % fp32 GEMM", f"{v} % bf16 GEMM"]
    first = results[variants[0]]
    rows = []
    for p in PHASES + ("step",):
        row = [p if p != "step" else "**step**", f"{first['gflop'][p]:.1f}"]
        for v in variants:
            g = results[v]["gflops"][p]
            row += [f"{g:.0f}" if first["gflop"][p] else "-", pct_of(g, rates["fp32"]) if g else "-",
                    pct_of(g, rates["bf16"]) if g else "-"]
        rows.append(row)
    return markdown_table(headers, rows)


def profile_table(prof: dict) -> str:
    rows = []
    total = {c: 0.0 for c in ("wall",) + CATEGORIES}
    for p in PHASES:
        r = prof[p]
        rows.append([p, f"{r['wall']:.0f}"] + [f"{r[c]:.0f} ({pct_of(r[c], r['wall'])})" for c in CATEGORIES])
        for c in total:
            total[c] += r[c]
    rows.append(["**step**", f"**{total['wall']:.0f}**"]
                + [f"{total[c]:.0f} ({pct_of(total[c], total['wall'])})" for c in CATEGORIES])
    return markdown_table(["phase", "wall ms (profiled)"] + [f"{c} ms" for c in CATEGORIES], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rollouts, shorter responses, 2 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 3; quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="override: rollouts per step")
    ap.add_argument("--new-tokens", type=int, default=None, help="override: max new tokens")
    ap.add_argument("--micro-batch", type=int, default=None, help="override: rows per forward/backward")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated: fused, plain, optionally -fp32 / -bf16 (default fused,plain; "
                         "fused,fused-bf16 for --config smollm2)")
    ap.add_argument("--profile", action="store_true", help="one more step per variant under torch.profiler (CPU)")
    ap.add_argument("--thread-sweep", default=None, metavar="N,M",
                    help="CPU: run every variant's steps at each of these torch thread counts in turn")
    ap.add_argument("--fused-adamw", action="store_true",
                    help="torch.optim.AdamW(fused=True) for every variant (default: AdamW's default, as the trainer)")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the fresh-process peak-memory runs")
    args = ap.parse_args(argv)

    cfg = CONFIGS[args.config]
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK[args.config])
    overrides = {"batch": args.batch, "new_tokens": args.new_tokens, "micro_batch": args.micro_batch}
    for k, v in overrides.items():
        if v is not None and v < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg = dataclasses.replace(cfg, micro_batch=min(cfg.micro_batch, cfg.batch))
    steps = args.steps or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    variants = tuple((args.variants or ("fused,fused-bf16" if cfg.preset else "fused,plain")).split(","))
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as err:
        raise SystemExit(f"--variants: {err}") from None
    if len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: each variant once, got {args.variants!r}")
    sweep = ()
    if args.thread_sweep:
        try:
            sweep = tuple(int(t) for t in args.thread_sweep.split(","))
        except ValueError:
            raise SystemExit(f"--thread-sweep: comma-separated thread counts, got {args.thread_sweep!r}") from None
        if any(t < 1 for t in sweep) or len(set(sweep)) != len(sweep):
            raise SystemExit(f"--thread-sweep: distinct counts >= 1, got {args.thread_sweep!r}")
        if device.type != "cpu" or args.profile:
            raise SystemExit("--thread-sweep is for CPU runs without --profile")

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = device.type == "cpu"
    mlp = None
    if cpu:
        mlp = (cfg.batch * (cfg.prompt_chars + 8 + cfg.new_tokens), cfg.hidden_size, cfg.intermediate_size)
    rates = measure_gemm_rates(device, mlp) if cpu else None
    if device.type == "cuda":
        results = {v: measure_cuda(cfg, v, args.device, steps, args.fused_adamw) for v in variants}
    else:
        results = measure_cpu(cfg, variants, steps, profile=args.profile, fused_adamw=args.fused_adamw,
                              thread_sweep=sweep)
        rates = _max_rates(rates, measure_gemm_rates(device, mlp))
        if sweep:
            variants = tuple(f"{v}@{t}t" for v in variants for t in sweep)
    if cpu and not args.no_memory and not sweep:
        for v in variants:
            results[v]["peak_extra"] = cpu_peak_extra_bytes(make_cpu_step, dataclasses.asdict(cfg), v,
                                                            torch.get_num_threads(), args.fused_adamw)

    vocab = cfg.vocab_size or len(build_tokenizer(0))
    first = results[variants[0]]
    n_params = first["params"]
    print(f"## One VRPO training step, phase by phase ({args.config}): {' vs '.join(variants)}\n")
    print(f"machine: {machine()}")
    if cpu:
        from vrpo_fast.precision import choose_cpu_mixed_precision, cpu_bf16_flags

        flags = cpu_bf16_flags()
        native = "+".join(flags) if flags else "none" if flags == () else "unknown"
        print(f"cpu: {_cpu_model()}; native bf16: {native}; "
              f"choose_cpu_mixed_precision(): {choose_cpu_mixed_precision().mixed_precision!r}")
    print(f"date: {date}")
    print(f"device: {args.device}" + (" (bf16 autocast, fp32 master weights, bf16 reference)" if device.type == "cuda"
                                       else " (variants without -bf16: fp32; -bf16: bf16 autocast, fp32 master "
                                            "weights, bf16 reference)"))
    kind = f"{cfg.preset} (pretrained)" if cfg.preset else "random Llama"
    print(f"model: {kind}, vocab {vocab}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, mlp {cfg.intermediate_size}"
          f", {n_params / 1e6:.2f}M params (tied embeddings)")
    print(f"step: {cfg.batch} rollouts x <= {cfg.new_tokens} new tokens (prompt ~{cfg.prompt_chars + 1} chars), "
          f"micro-batch {cfg.micro_batch}, 1 PPO epoch, AdamW{' (fused=True)' if args.fused_adamw else ''}; "
          f"median of {steps} steps after 1 warm-up step; "
          f"{first['tokens']:.0f} tokens/step\n")
    base = variants[0]
    ratio_headers = [f"{base} / {v}" if "plain" not in v else f"{v} / {base}" for v in variants[1:]]
    rows = []
    for p in PHASES:
        row = [p] + [f"{results[v]['phases'][p]:.1f}" for v in variants]
        for v in variants[1:]:
            a, b = results[base]["phases"][p], results[v]["phases"][p]
            row.append(_ratio(b, a) if "plain" in v else _ratio(a, b))
        rows.append(row)
    row = ["**step**"] + [f"**{results[v]['total_ms']:.1f}**" for v in variants]
    for v in variants[1:]:
        a, b = results[base]["total_ms"], results[v]["total_ms"]
        row.append(f"**{_ratio(b, a) if 'plain' in v else _ratio(a, b)}**")
    rows.append(row)
    row = ["tokens/s"] + [f"{results[v]['tokens_per_s']:.0f}" for v in variants]
    rows.append(row + [_ratio(results[base]["tokens_per_s"], results[v]["tokens_per_s"]) if "plain" in v
                       else _ratio(results[v]["tokens_per_s"], results[base]["tokens_per_s"]) for v in variants[1:]])
    if "peak_extra" in first:
        label = "peak memory above models + optimiser" if device.type == "cuda" else "peak extra RSS (1 step)"
        rows.append([label] + [fmt_bytes(results[v]["peak_extra"]) for v in variants]
                    + [_saving(results[base]["peak_extra"], results[v]["peak_extra"]) if "plain" in v else "-"
                       for v in variants[1:]])
    if "peak" in first:
        rows.append(["peak memory allocated (total)"] + [fmt_bytes(results[v]["peak"]) for v in variants]
                    + [_saving(results[base]["peak"], results[v]["peak"]) if "plain" in v else "-"
                       for v in variants[1:]])
    if device.type == "cuda":
        gemm = measure_matmul_tflops(device, torch.bfloat16)  # this card's bf16 GEMM rate, measured here
        tflops = {v: model_flops_per_step(results[v]["tokens"], n_params, vocab, cfg.hidden_size)
                  / results[v]["total_ms"] / 1e9 for v in variants}
        rows.append(["model TFLOP/s (est., dense matmuls)"] + [f"{tflops[v]:.1f}" for v in variants]
                    + [_ratio(tflops[base], tflops[v]) for v in variants[1:]])
        rows.append([f"% of measured bf16 GEMM ({gemm:.0f} TFLOP/s)"] + [pct_of(tflops[v], gemm) for v in variants]
                    + ["-" for _ in variants[1:]])
    print(markdown_table(["phase (ms)"] + list(variants) + ratio_headers, rows))
    if cpu:
        print(f"\n### Against the machine: model FLOPs (vrpo_fast.flops) and the GEMM rates measured in this run\n")
        print(f"GEMM rates ({torch.get_num_threads()} threads, best of before / after the steps): fp32 "
              f"{rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s (bf16 / fp32 "
              f"{rates['bf16'] / rates['fp32']:.1f}x; square n = 512 / 1024); at the model's MLP shape "
              f"[{mlp[0]} x {mlp[1]}] @ [{mlp[1]} x {mlp[2]}]: fp32 {rates['fp32_mlp']:.0f}, bf16 "
              f"{rates['bf16_mlp']:.0f} GFLOP/s\n")
        bw = rates["copy_gbps"]
        print(f"Copy bandwidth (256 MiB, read + write): {bw:.1f} GB/s. A decode step of generate streams every weight "
              f"once for {cfg.batch} rows (2 x {cfg.batch} FLOPs per weight): when the weights do not fit in cache it "
              f"is bound at ~{2 * cfg.batch / 4 * bw:.0f} GFLOP/s with fp32 weights, ~{2 * cfg.batch / 2 * bw:.0f} "
              f"with "
              f"bf16 ones (autocast caches one bf16 copy per generate), whatever the GEMM rate.\n")
        print(machine_table(results, variants, rates))
        if args.profile:
            for v in variants:
                print(f"\n### Where the time goes: {v}, one more step under torch.profiler (self time of ops)\n")
                print(profile_table(results[v]["profile"]))
    return results


if __name__ == "__main__":
    main()
