"""LoRA / QLoRA fine-tune of one adapter on its own dataset (Olive's LoRA or QLoRA pass).

The workflow depends on the spec and the adapter's training device only, never on the export
target: every target of a pipeline that trains on the same device runs the same fine-tune config,
so its trained adapter (cached by content) serves them all.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from phi_pipeline.paths import PipelinePaths
from phi_pipeline.plan import AdapterPlan, Plan
from phi_pipeline.workflows.common import data_config, engine, hf_model, training_system

TEMPLATE: dict[str, Any] = {
    "input_model": None,
    "systems": {"local_system": None},
    "data_configs": [],
    "passes": {"finetune": {"type": None, "train_data_config": "train_data", "eval_data_config": "eval_data"}},
    "host": "local_system",
    "target": "local_system",
}


def training_args(plan: AdapterPlan, plan_paths: PipelinePaths) -> dict[str, Any]:
    t = plan.spec.training
    args: dict[str, Any] = {
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_ratio": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "gradient_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps",
        "eval_steps": t.logging_steps,
        # One save, at the last step: it writes trainer_state.json (the loss history for the report).
        "save_strategy": "steps",
        "save_steps": 1_000_000,
        "save_total_limit": 1,
        "save_only_model": True,
        "overwrite_output_dir": True,
        "output_dir": (plan_paths.finetune_dir(plan.name) / "trainer").as_posix(),
        "report_to": ["tensorboard"],
    }
    if t.max_steps is not None:
        args["max_steps"] = t.max_steps
    else:
        args["num_train_epochs"] = t.epochs if t.epochs is not None else 1.0
    return args


def finetune_config(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    lora = adapter.spec.lora
    training = adapter.spec.training
    config = deepcopy(TEMPLATE)
    config["input_model"] = hf_model(plan.base_model, trust_remote_code=plan.spec.base_model.trust_remote_code)
    config["systems"]["local_system"] = training_system(adapter.training_device)
    config["data_configs"] = [
        data_config("train_data", adapter, adapter.spec.data.train, batch_size=training.batch_size),
        data_config("eval_data", adapter, adapter.spec.data.eval, batch_size=training.batch_size),
    ]
    finetune = config["passes"]["finetune"]
    finetune.update(
        {
            "type": "QLoRA" if lora.method == "qlora" else "LoRA",
            "r": lora.r,
            "alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "torch_dtype": training.torch_dtype,
            "training_args": training_args(adapter, plan.paths),
        }
    )
    if lora.method == "lora":
        finetune["target_modules"] = list(adapter.target_modules)
    else:
        # Olive's QLoRA pass picks its own targets (every 4-bit Linear), so no target_modules.
        finetune.update(
            {
                "quant_type": "nf4",
                "double_quant": True,
                "compute_dtype": training.torch_dtype,
                # The trained adapter is merged into, or exported beside, the full-precision base.
                "save_quant_config": False,
            }
        )
        # Paged optimizers page optimizer state through CUDA unified memory; on CPU use the plain one.
        finetune["training_args"]["optim"] = "paged_adamw_32bit" if adapter.training_device == "cuda" else "adamw_torch"
    config.update(engine(plan.paths.finetune_dir(adapter.name), plan.paths.olive_cache_dir))
    return config
