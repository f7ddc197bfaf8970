"""Building the Accelerator: single process, DDP, or DeepSpeed ZeRO 0-3, on GPUs or on CPU over gloo.

Call ``build_accelerator`` BEFORE loading the model. Under ZeRO-3 the DeepSpeed plugin registers its
config with transformers (``HfDeepSpeedConfig``) when the Accelerator is created, so
``from_pretrained`` builds the model inside ``deepspeed.zero.Init`` and every rank holds only its
partition from the start: no rank ever materialises the whole model.

Where the settings come from, in order: ``--deepspeed-config FILE`` (its ``"auto"`` values are filled
from our flags), else ``--zero-stage N`` (a config generated here), else an ``accelerate launch
--config_file`` that selected DeepSpeed (Accelerate's ``ACCELERATE_DEEPSPEED_*`` environment), else
plain DDP (or a single process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from ..artifacts.errors import UsageError
from .config import option

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How training is laid out over processes and in which precision it computes."""

    PANEL: ClassVar[str] = "Distributed"

    mixed_precision: str = option("no", choices=MIXED_PRECISION, help=(
        "no, bf16 or fp16 autocast through Accelerate (master weights stay in --dtype)."))
    # How the work is laid out, not what is computed; CheckpointManager refuses a ZeRO layout change.
    zero_stage: int | None = option(None, semantic=False, choices=(0, 1, 2, 3), help=(
        "DeepSpeed ZeRO stage 0-3 (default: plain DDP)."))
    offload_optimizer: bool = option(False, semantic=False, help=(
        "ZeRO-Offload the optimizer state to CPU (stage >= 1)."))
    offload_params: bool = option(False, semantic=False, help="Offload parameters to CPU (stage 3).")
    deepspeed_config: str | None = option(None, semantic=False, help=(
        "DeepSpeed JSON config ('auto' values are filled from these flags)."))

    def check(self) -> None:
        if self.zero_stage is not None:
            generate_deepspeed_config(self.zero_stage, offload_optimizer=self.offload_optimizer,
                                      offload_params=self.offload_params)


def generate_deepspeed_config(zero_stage: int, *, offload_optimizer: bool = False, offload_params: bool = False,
                     per_device_batch_size: int | str = "auto", grad_accum: int | str = "auto",
                     max_grad_norm: float | str = "auto") -> dict[str, Any]:
    """The DeepSpeed config ``--zero-stage N`` stands for (also what configs/deepspeed/*.json hold).

    ZeRO-3 gathers the full 16-bit weights on save so the final model is a normal HF folder.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"--zero-stage must be 0, 1, 2 or 3, not {zero_stage}")
    if offload_optimizer and zero_stage < 1:
        raise UsageError("--offload-optimizer needs --zero-stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)")
    if offload_params and zero_stage != 3:
        raise UsageError("--offload-params needs --zero-stage 3 (only ZeRO-3 partitions the parameters)")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": per_device_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _read_deepspeed_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--deepspeed-config {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--deepspeed-config {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise UsageError(f"--deepspeed-config {path}: needs a \"zero_optimization\" section with a \"stage\"")
    if "optimizer" in config or "scheduler" in config:
        raise UsageError(
            f"--deepspeed-config {path}: remove its \"optimizer\"/\"scheduler\" sections; dpo builds AdamW and the "
            "learning-rate schedule from --learning-rate, --weight-decay and --lr-scheduler"
        )
    return config


def _fill_auto(config: dict[str, Any], source: str, per_device_batch_size: int, grad_accum: int,
               max_grad_norm: float) -> dict[str, Any]:
    """Resolve "auto" from our flags and refuse a file that contradicts them (it would silently win otherwise)."""
    ours = {
        "train_micro_batch_size_per_gpu": (per_device_batch_size, "--per-device-batch-size"),
        "gradient_accumulation_steps": (grad_accum, "--grad-accum"),
        "gradient_clipping": (float(max_grad_norm), "--max-grad-norm"),
    }
    for key, (value, flag) in ours.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif float(given) != float(value):
            raise UsageError(f"{source}: {key} is {given} but {flag} is {value}; set it to \"auto\" or make them agree")
    config.pop("train_batch_size", None)  # derived by Accelerate from the three above and the world size
    return config


def build_accelerator(config: DistributedConfig = DistributedConfig(), grad_accum: int = 1,
                      per_device_batch_size: int = 1, max_grad_norm: float = 0.0, cpu: bool | None = None,
                      seed: int | None = None):
    """An Accelerator for this process: DDP when launched with several processes, DeepSpeed when asked.

    ``cpu=None`` means CPU exactly when no CUDA device is visible. On CPU the process group uses gloo
    (Accelerate would otherwise not see the world size under DeepSpeed). ``max_grad_norm`` 0 turns
    clipping off. Under DeepSpeed the engine clips and accumulates itself; ``accelerator.clip_grad_norm_``
    then returns the engine's global norm.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    mixed_precision = config.mixed_precision
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise UsageError("--mixed-precision fp16 needs a GPU (use bf16 or no on CPU)")

    ds_config = None
    if config.deepspeed_config is not None:
        ds_config = _fill_auto(_read_deepspeed_file(config.deepspeed_config),
                               f"--deepspeed-config {config.deepspeed_config}", per_device_batch_size, grad_accum,
                               max_grad_norm)
    elif config.zero_stage is not None:
        ds_config = generate_deepspeed_config(
            config.zero_stage, offload_optimizer=config.offload_optimizer, offload_params=config.offload_params,
            per_device_batch_size=per_device_batch_size, grad_accum=grad_accum, max_grad_norm=float(max_grad_norm))
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml dpo train ...`
        env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if env_file != "none":
            ds_config = _fill_auto(_read_deepspeed_file(env_file), f"deepspeed_config_file {env_file}",
                                per_device_batch_size, grad_accum, max_grad_norm)
        else:
            ds_config = generate_deepspeed_config(
                int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
                offload_optimizer=os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none",
                offload_params=os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") != "none",
                per_device_batch_size=per_device_batch_size, grad_accum=grad_accum,
                max_grad_norm=float(max_grad_norm))
    plugin = None
    if ds_config is not None:
        # The launcher's inline DeepSpeed fields were folded into `ds_config` above (or overridden by our
        # flags), so Accelerate's "these fields would be ignored next to a config file" check does not apply.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config,
                                 zero3_init_flag=ds_config["zero_optimization"].get("stage") == 3)

    kwargs_handlers = []
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if plugin is not None and cpu and torch.cuda.is_available():
        raise UsageError("DeepSpeed on CPU while GPUs are visible: hide them with CUDA_VISIBLE_DEVICES=''")
    try:
        accelerator = Accelerator(
            # Accelerate ignores DeepSpeed when cpu=True; without CUDA its device is the CPU anyway.
            cpu=cpu and plugin is None,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
            deepspeed_plugin=plugin,
            kwargs_handlers=kwargs_handlers,
        )
    except ValueError as exc:  # Accelerate reports config contradictions as ValueError
        raise UsageError(f"cannot set up distribution: {exc}") from None
    if seed is not None:
        from accelerate.utils import set_seed

        set_seed(seed)
    log.info("distribution: %s", describe(accelerator))
    return accelerator


def zero_stage_of(accelerator) -> int | None:
    """The ZeRO stage the accelerator runs, or None without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def unwrap(accelerator, model):
    """The module that was given to ``accelerator.prepare``. A single process gets its module back as
    it was (unless compiled); Accelerate's own ``unwrap_model`` imports DeepSpeed to test for its
    engine even then, which costs 0.7 s of a stage's start-up on a machine with DeepSpeed installed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.NO and not hasattr(model, "_orig_mod"):
        return model
    return accelerator.unwrap_model(model)


def offloads_optimizer(accelerator) -> bool:
    """True under ZeRO-Offload, where DeepSpeed wants its own CPU Adam (see make_adamw)."""
    if zero_stage_of(accelerator) is None:
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def make_adamw(accelerator, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch AdamW, or DeepSpeed's CPU Adam (AdamW mode) when the optimizer is offloaded to CPU.

    DeepSpeed refuses a torch optimizer under ZeRO-Offload; its CPU Adam is a compiled op (built
    once into TORCH_EXTENSIONS_DIR). Without DeepSpeed, torch's fused kernel: one pass over each
    parameter instead of a dozen elementwise ops (on a CPU the default per-tensor loop is about 10x
    slower on a 16M-parameter model). DeepSpeed's ZeRO wraps the plain one, as it documents.
    """
    import torch

    if offloads_optimizer(accelerator):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
    fused = zero_stage_of(accelerator) is None and accelerator.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def describe(accelerator) -> str:
    stage = zero_stage_of(accelerator)
    kind = f"DeepSpeed ZeRO-{stage}" if stage is not None else str(accelerator.distributed_type.value)
    return (f"{kind}, {accelerator.num_processes} process(es), device {accelerator.device.type}, "
            f"mixed precision {accelerator.mixed_precision}")
