"""LoRA / QLoRA fine-tune of one adapter on its own dataset (Olive's LoRA or QLoRA pass)."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from phi_pipeline.paths import PipelinePaths
from phi_pipeline.plan import AdapterPlan, Plan
from phi_pipeline.workflows.common import engine, hf_model, system

TEMPLATE: dict[str, Any] = {
    "input_model": None,
    "systems": {"local_system": None},
    "data_configs": [],
    "passes": {"finetune": {"type": None, "train_data_config": "train_data", "eval_data_config": "eval_data"}},
    "host": "local_system",
    "target": "local_system",
}


def data_config(name: str, plan: AdapterPlan, split_file: str) -> dict[str, Any]:
    """One split as Olive's HuggingfaceContainer: JSON Lines in, one example per sequence."""
    data = plan.spec.data
    pre: dict[str, Any] = {
        "max_seq_len": plan.spec.training.max_seq_len,
        # Olive's default packs examples together ("join"); each example is its own sequence here,
        # so the model learns where an answer ends.
        "strategy": "line-by-line",
        "pad_to_max_len": False,
    }
    if data.messages_field:
        pre.update({"chat_template": True, "message_col": data.messages_field})
    else:
        pre.update({"text_template": data.text_template, "add_special_tokens": True})
    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": [split_file], "split": "train"},
        "pre_process_data_config": pre,
        "dataloader_config": {"batch_size": plan.spec.training.batch_size},
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
    config = deepcopy(TEMPLATE)
    config["input_model"] = hf_model(plan.base_model, trust_remote_code=plan.spec.base_model.trust_remote_code)
    config["systems"]["local_system"] = system(plan.training_device, plan.training_provider)
    config["data_configs"] = [
        data_config("train_data", adapter, adapter.spec.data.train),
        data_config("eval_data", adapter, adapter.spec.data.eval),
    ]
    finetune = config["passes"]["finetune"]
    finetune.update(
        {
            "type": "QLoRA" if lora.method == "qlora" else "LoRA",
            "r": lora.r,
            "alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "torch_dtype": adapter.spec.training.torch_dtype,
            "training_args": training_args(adapter, plan.paths),
        }
    )
    if lora.method == "lora":
        # Olive's QLoRA pass picks its own targets (every quantized Linear) and ignores this key.
        finetune["target_modules"] = list(adapter.target_modules)
    else:
        finetune["save_quant_config"] = False
    config.update(engine(plan.paths.finetune_dir(adapter.name), plan.paths.olive_cache_dir))
    return config
