"""Selection logic of trainer/parallel.py and trainer/resources.py, with faked capabilities (no GPU, no processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import parallel, parallel_zero
from trainer.resources import torch_threads

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_cpu_gets_gloo_and_the_environment_is_left_alone():
    env = {}
    assert parallel.select_device_and_backend(cuda_available=False, environ=env) == (CPU, "gloo")
    assert env == {}


def test_gpu_gets_nccl_on_the_local_rank_and_async_error_handling():
    env = {"LOCAL_RANK": "3"}
    assert parallel.select_device_and_backend(cuda_available=True, environ=env) == (torch.device("cuda", 3), "nccl")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    device, _ = parallel.select_device_and_backend(cuda_available=True, local_rank=1, environ={})
    assert device == torch.device("cuda", 1)


@pytest.mark.parametrize("preset", [{"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}, {"TORCH_NCCL_BLOCKING_WAIT": "1"}])
def test_explicit_nccl_settings_win(preset):
    env = dict(preset)
    parallel.select_device_and_backend(cuda_available=True, environ=env)
    assert env == preset


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", CPU, None, "fp32"),
    ("auto", GPU, True, "bf16"),
    ("auto", GPU, False, "fp32"),
    ("bf16", CPU, None, "bf16"),
    ("bf16", GPU, True, "bf16"),
    ("fp32", GPU, True, "fp32"),
])
def test_precision(requested, device, bf16, expected):
    assert parallel.select_precision(requested, device, bf16_supported=bf16) == expected


def test_bad_precisions_are_named():
    with pytest.raises(ValueError, match="does not support bf16"):
        parallel.select_precision("bf16", GPU, bf16_supported=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        parallel.select_precision("fp16", CPU)


def test_deepspeed_config():
    cfg = parallel_zero.deepspeed_config(stage=2, precision="bf16", grad_accum_steps=4, grad_clip_norm=None,
                                         micro_batch_size=8)
    assert cfg["zero_optimization"] == {"stage": 2} and "bf16" not in cfg  # bf16 mode would cast the fp32 islands
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.0
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["zero_allow_untested_optimizer"] is True


def test_build_engine_rejects_bad_arguments_before_touching_processes():
    kw = dict(init_fn=None, param_groups_fn=None, optimizer_fn=None)
    with pytest.raises(ValueError, match="strategy must be one of"):
        parallel.build_engine("fsdp2", nn.Linear, **kw)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        parallel.build_engine("ddp", nn.Linear, grad_accum_steps=0, **kw)


def test_param_groups_must_cover_every_trainable_parameter_once():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    first, second = list(model[0].parameters()), list(model[1].parameters())
    specs = parallel._group_specs(model, [{"params": first, "name": "a", "freeze": True}, {"params": second}])
    assert specs == [{"name": "a", "params": ["0.weight", "0.bias"], "freeze": True},  # extra keys pass through
                     {"name": "group1", "params": ["1.weight", "1.bias"]}]
    with pytest.raises(ValueError, match="left 2 trainable parameters out"):
        parallel._group_specs(model, [{"params": first}])
    with pytest.raises(ValueError, match="more than one param group"):
        parallel._group_specs(model, [{"params": first + second}, {"params": second}])
    model[1].requires_grad_(False)  # frozen for good: may stay out of every group
    assert [s["params"] for s in parallel._group_specs(model, [{"params": first}])] == [["0.weight", "0.bias"]]


def test_names_lose_wrapper_prefixes():
    assert parallel.clean_name("module.vlm_layers.0._checkpoint_wrapped_module.mlp.w") == "vlm_layers.0.mlp.w"


class _CountingEngine(parallel.Engine):
    def _forward_backward(self, batch, generator, is_last_micro):
        return {}

    def _step(self):
        return 0.0


def test_micro_step_bookkeeping():
    engine = _CountingEngine(strategy="ddp", device=CPU, precision="fp32", grad_accum_steps=2, grad_clip_norm=None,
                             group_names=[])
    with pytest.raises(ValueError, match="does not match grad_accum_steps"):
        engine.forward_backward({}, generator=None, is_last_micro=True)
    engine._micro = 0
    engine.forward_backward({}, generator=None, is_last_micro=False)
    with pytest.raises(RuntimeError, match="after 1 of 2"):
        engine.step()


@pytest.mark.parametrize(("requested", "cpus", "ranks", "loader", "expected"), [
    (0, 2, 1, 1, 1),  # the CI box: one loader worker keeps a core, torch gets the other
    (0, 2, 2, 1, 1),  # never below one
    (0, 96, 8, 8, 4),  # GPU node: 12 cores per rank, 8 of them decoding
    (0, 16, 1, 0, 16),  # loading in the training process
    (3, 2, 1, 1, 3),  # explicit wins
])
def test_torch_threads_leave_cores_to_the_loader(requested, cpus, ranks, loader, expected):
    assert torch_threads(requested=requested, cpu_count=cpus, local_world_size=ranks,
                         loader_workers=loader) == expected


def test_negative_cpu_threads_is_rejected():
    with pytest.raises(ValueError, match="cpu_threads must be >= 0"):
        torch_threads(requested=-1, cpu_count=2, local_world_size=1, loader_workers=1)


def test_gpu_workers_get_production_nccl_settings_and_cpu_workers_none():
    assert parallel.nccl_env({}, use_gpu=False) == {}
    env = parallel.nccl_env({}, use_gpu=True)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0


def test_operator_nccl_settings_win():
    env = parallel.nccl_env({"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",
                             "NCCL_DEBUG": "INFO", "HOME": "/root"}, use_gpu=True)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env and env["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "0" and env["NCCL_DEBUG"] == "INFO" and "HOME" not in env


def test_workers_take_gpus_when_the_cluster_has_them_even_if_the_driver_does_not():
    from trainer.resources import workers_use_gpu

    # The Kubernetes case: driver on the CPU-only head pod, 8 GPUs per worker node.
    assert workers_use_gpu(env_value=None, driver_has_cuda=False, cluster_gpus=16.0)
    assert workers_use_gpu(env_value="auto", driver_has_cuda=True, cluster_gpus=0.0)
    assert not workers_use_gpu(env_value="", driver_has_cuda=False, cluster_gpus=0.0)  # this CPU machine
    assert workers_use_gpu(env_value="1", driver_has_cuda=False, cluster_gpus=0.0)  # waits for GPU nodes
    assert not workers_use_gpu(env_value="0", driver_has_cuda=True, cluster_gpus=8.0)
    with pytest.raises(ValueError, match="B1K_USE_GPU='maybe': use 1"):
        workers_use_gpu(env_value="maybe", driver_has_cuda=False, cluster_gpus=0.0)
