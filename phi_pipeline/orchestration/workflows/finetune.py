"""LoRA / QLoRA fine-tune of one adapter on its own dataset (Olive's LoRA or QLoRA pass).

The workflow depends on the spec and the adapter's training device only, never on the export
target: every target of a pipeline that trains on the same device runs the same fine-tune config,
so its trained adapter (cached by content) serves them all.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from phi_pipeline.pipeline_spec.paths import PipelinePaths
from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan
from phi_pipeline.orchestration.workflows.common import data_config, engine, hf_model, training_system

TEMPLATE: dict[str, Any] = {
    "input_model": None,
    "systems": {"local_system": None},
    "data_configs": [],
    "passes": {"finetune": {"type": None, "train_data_config": "train_data"}},
    "host": "local_system",
    "target": "local_system",
}


def training_args(plan: AdapterPlan, plan_paths: PipelinePaths) -> dict[str, Any]:
    t = plan.spec.training
    validates = plan.validation_data is not None
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
        "eval_strategy": "steps" if validates else "no",
        "eval_steps": t.eval_every,
        # Checkpoints with optimizer state: a killed run resumes from the last one (Olive's LoRA pass resumes
        # from output_dir when overwrite_output_dir is false; the run clears it when the training key changes).
        "save_strategy": "steps",
        "save_steps": t.save_every,
        "save_total_limit": 2,  # the last and, with load_best_model_at_end, the best
        "overwrite_output_dir": False,
        "output_dir": (plan_paths.finetune_dir(plan.name) / "trainer").as_posix(),
        "report_to": ["tensorboard"],
    }
    if validates:
        # the best checkpoint (and early stopping's yardstick) is the lowest validation loss
        args.update({"metric_for_best_model": "eval_loss", "greater_is_better": False})
        # the validation loss before training: the learned floor's yardstick (gates.min_validation_loss_drop)
        args["eval_on_start"] = True
        args["load_best_model_at_end"] = t.load_best_model_at_end
    if t.max_steps is not None:
        args["max_steps"] = t.max_steps
    else:
        args["num_train_epochs"] = t.epochs if t.epochs is not None else 1.0
    return args


def trainer_hooks(adapter: AdapterPlan, plan_paths: PipelinePaths) -> dict[str, Any]:
    """What olive_compat adds to the Trainer Olive builds (it takes no callbacks): early stopping and the
    progress file the run tails. Part of the training's cache key, like the workflow."""
    t = adapter.spec.training
    hooks: dict[str, Any] = {"progress_file": plan_paths.progress_file(adapter.name).as_posix()}
    if t.early_stopping_patience is not None:
        hooks["early_stopping"] = {"patience": t.early_stopping_patience, "threshold": t.early_stopping_threshold}
    return hooks


def finetune_config(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    lora = adapter.spec.lora
    training = adapter.spec.training
    config = deepcopy(TEMPLATE)
    config["input_model"] = hf_model(plan.base_model, trust_remote_code=plan.spec.base_model.trust_remote_code)
    config["systems"]["local_system"] = training_system(adapter.training_device)
    config["data_configs"] = [
        data_config("train_data", adapter, adapter.train_data, batch_size=training.batch_size),
    ]
    if adapter.validation_data is not None:
        config["data_configs"].append(
            data_config("validation_data", adapter, adapter.validation_data, batch_size=training.batch_size)
        )
        config["passes"]["finetune"]["eval_data_config"] = "validation_data"
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
    if lora.modules_to_save:
        finetune["modules_to_save"] = list(lora.modules_to_save)
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
