"""The multi-GPU configs in examples/accelerate/ (docs/multi_gpu.md).

Every YAML goes through accelerate's own ``--config_file`` path: ``load_config_from_file`` (what
``accelerate launch`` reads), ``_validate_launch_command`` (which copies the file into the launch
arguments) and the launcher's environment, from which the FSDP / DeepSpeed plugin is built exactly
as in a launched process. No GPU is needed for any of that.

What needs GPUs cannot run here: accelerate picks FSDP / DeepSpeed only with an accelerator device
(``Accelerator(cpu=True)`` becomes plain DDP over gloo). The slow tests launch the trainer with
ddp.yaml on 2 CPU processes, and with accelerate's FSDP2 code forced on CPU (gloo), whose saved
weights must match a single-process run's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import subprocess_env

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
EXPECTED_TYPE = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}


def _launch_args(path):
    """What ``accelerate launch --config_file path x.py`` resolves before starting any process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_the_documented_configs_exist():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED_TYPE)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_through_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED_TYPE[path.name]
    assert config.mixed_precision == "bf16"
    assert config.num_processes == 8 and config.num_machines == 1 and not config.use_cpu
    # sub-config keys are not checked by the loader: each must be a real launcher option, or
    # accelerate would drop it silently (a typo like fsdp_state_dict_typ would go unnoticed)
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp") else "fsdp_" + key) in options, key
    for key in config.deepspeed_config:
        assert key in options, key


def test_fsdp_config_builds_an_fsdp2_plugin_that_wraps_our_models():
    """The plugin a launched process builds from fsdp.yaml: FSDP2, full state dict, decoder-layer
    wrapping, and the layer class it names exists in the trained modules (TokenScorer, ValueModel)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
    from vrpo_fast.models.value_model import ValueModel
    from vrpo_fast.scoring import TokenScorer

    args, _ = _launch_args(CONFIG_DIR / "fsdp.yaml")
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.reshard_after_forward is True
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPU
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]

    tokenizer = build_char_tokenizer()
    lm = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=16, num_hidden_layers=2, intermediate_size=32))
    for model in (TokenScorer(lm), ValueModel(lm.base_model, head="vib", latent_dim=4)):
        with mock.patch.dict(os.environ, env, clear=True):
            plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(model)  # raises if the class is not in the model
        layers = [m for m in model.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
        assert len(layers) == 2 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)


class _FakeAccelerator:
    def __init__(self, kind, fsdp2=True, processes=2):
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.is_fsdp2, self.num_processes = fsdp2, processes


@pytest.mark.parametrize("kind, fsdp2, flags, match", [
    ("DEEPSPEED", True, {}, "DeepSpeed is not supported"),
    ("FSDP", False, {}, "FSDP1 is not supported"),
    ("FSDP", True, {"lora_r": 8}, "--lora-r is not supported with FSDP"),
    ("FSDP", True, {"num_eval": 5}, "--num-eval"),
])
def test_trainer_refuses_unsupported_setups_before_loading_anything(kind, fsdp2, flags, match):
    from vrpo_fast.config import TrainConfig
    from vrpo_fast.distributed import check_distributed_support

    cfg = TrainConfig.from_flat(**flags)
    with pytest.raises(ValueError, match=match):
        check_distributed_support(cfg, _FakeAccelerator(kind, fsdp2))
    check_distributed_support(TrainConfig.from_flat(), _FakeAccelerator("MULTI_GPU"))  # DDP: anything goes
    check_distributed_support(TrainConfig.from_flat(num_eval=64), _FakeAccelerator("FSDP"))


def test_ddp_config_launches_multi_gpu():
    args, _ = _launch_args(CONFIG_DIR / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.num_processes == 8 and args.gpu_ids == "all"


# ---------------------------------------------------------------------------------------------------
# launched: 2 CPU processes over gloo
# ---------------------------------------------------------------------------------------------------
TINY_RUN = ["--cpu", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--latent-dim", "8",
            "--task-kwargs", json.dumps({"max_operand": 20, "num_eval": 16}), "--num-eval", "4",
            "--eval-batch-size", "4", "--warmup-steps", "1", "--warmup-batch-size", "8", "--steps", "1",
            "--rollout-batch-size", "8", "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4",
            "--no-progress"]

# accelerate refuses FSDP without an accelerator device; this switches its shared state to FSDP2
# after construction and after every prepare() (its FSDP2 prepare re-derives MULTI_CPU on a CPU box)
FORCE_FSDP2 = '''
import sys
import accelerate
import vrpo_fast.trainer as trainer
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def force(acc):
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


make = trainer.make_accelerator


def make_fsdp2(cfg):
    acc = make(cfg)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True, cpu_ram_efficient_loading=False)
    force(acc)
    return acc


prepare = accelerate.Accelerator.prepare


def prepare_fsdp2(self, *args, **kwargs):
    out = prepare(self, *args, **kwargs)
    force(self)
    return out


trainer.make_accelerator = make_fsdp2
accelerate.Accelerator.prepare = prepare_fsdp2
from vrpo_fast.train import main

sys.exit(main(sys.argv[1:]))
'''


def _launch(tmp_path, launcher_args, target, *extra, run="run"):
    env = subprocess_env()
    env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", *target, *TINY_RUN,
           "--output-dir", str(tmp_path / run), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))


def _check_run(proc, run):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    from vrpo_fast.models.loading import load_causal_lm
    from vrpo_fast.models.value_model import ValueModel

    checkpoint = run / "checkpoints" / "step_000001"
    lm = load_causal_lm(str(checkpoint / "policy"), what="checkpoint")  # full weights, not shards
    assert lm.get_input_embeddings().weight.shape[1] == 32
    ValueModel.from_pretrained(str(checkpoint / "value"), head="vib", latent_dim=8)


@pytest.mark.slow
def test_ddp_config_trains_on_two_cpu_processes(tmp_path):
    # the file's 8 processes and bf16 are overridden on the command line, as docs/multi_gpu.md shows
    proc = _launch(tmp_path, ["--config_file", str(CONFIG_DIR / "ddp.yaml")], ["-m", "vrpo_fast.train"])
    _check_run(proc, tmp_path / "run")


@pytest.mark.slow
def test_trainer_under_fsdp2_forced_on_cpu(tmp_path):
    script = tmp_path / "force_fsdp2.py"
    script.write_text(FORCE_FSDP2)
    proc = _launch(tmp_path, ["--multi_gpu", "--num_machines", "1"], [str(script)])
    _check_run(proc, tmp_path / "run")
    # sharded training gives what one unsharded process gives with the same global batch
    one = subprocess.run([sys.executable, "-m", "vrpo_fast.train", *TINY_RUN, "--output-dir", str(tmp_path / "one")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    from safetensors.torch import load_file

    for sub in ("policy/model.safetensors", "value/model.safetensors", "value/value_head.safetensors"):
        a = load_file(tmp_path / "run" / "checkpoints" / "step_000001" / sub)
        b = load_file(tmp_path / "one" / "checkpoints" / "step_000001" / sub)
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5, sub


@pytest.mark.slow
def test_fsdp2_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Under FSDP2 (forced on CPU) a run stopped after 1 RL step and resumed to 2 logs the metrics and
    saves the weights of the run that never stopped: checkpoints carry the full optimizer states
    (gathered from the shards) and a resumed process loads its shard back."""
    script = tmp_path / "force_fsdp2.py"
    script.write_text(FORCE_FSDP2)
    fsdp = (["--multi_gpu", "--num_machines", "1"], [str(script)])
    for run, extra in (("straight", ["--steps", "2"]), ("stopped", ["--steps", "1"]),
                       ("stopped", ["--steps", "2", "--resume"])):
        proc = _launch(tmp_path, *fsdp, "--save-every", "1", *extra, run=run)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from vrpo_fast.metrics import read_metrics, without_timings

    a = without_timings(read_metrics(str(tmp_path / "straight" / "metrics.jsonl")))
    b = without_timings(read_metrics(str(tmp_path / "stopped" / "metrics.jsonl")))
    assert [r["step"] for r in b] == [1, 2] and a == b
    import torch
    from safetensors.torch import load_file

    for sub in ("policy/model.safetensors", "value/model.safetensors", "value/value_head.safetensors"):
        wa = load_file(tmp_path / "straight" / "checkpoints" / "step_000002" / sub)
        wb = load_file(tmp_path / "stopped" / "checkpoints" / "step_000002" / sub)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["policy_optimizer"]["state"] and state["value_optimizer"]["state"]  # full, not empty
