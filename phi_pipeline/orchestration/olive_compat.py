"""Compatibility shim: Olive 0.13's ModelBuilder pass on onnxruntime-genai >= 0.15.

What breaks
-----------
Olive 0.13.0's ``ModelBuilder`` pass (``olive/passes/onnx/model_builder.py``) was written against the
onnxruntime-genai model builder of 0.14 and earlier. With onnxruntime-genai 0.18 it fails in two places:

1. ``ModelBuilder.maybe_patch_quant()`` runs on every build and imports
   ``onnxruntime_genai.models.quantized_model``, a module removed in genai 0.16:
   ``ModuleNotFoundError``. The patch it installs only matters for checkpoints pre-quantized by Olive's
   GPTQ/RTN passes, which this pipeline does not use. After :func:`apply` the call is skipped (with a
   debug log line) when that module is absent, and behaves exactly as before when it is present.
2. Since genai 0.15, ``onnxruntime_genai.models.builder.create_model()`` expects the caller to have run
   ``parse_extra_options()`` first, which loads the Hugging Face config/tokenizer (and the PEFT config of
   ``adapter_path``) into ``extra_options["hf_details"]``. Olive calls ``create_model`` directly with a
   plain kwargs dict: ``Exception: Hugging Face details not found in extra_options``. After :func:`apply`,
   ``create_model`` is wrapped: when ``hf_details`` is missing, the wrapper runs genai's own
   ``check_extra_options(model_name, input_path, output_dir, precision, execution_provider, cache_dir,
   extra_options)`` on the kwargs dict first. That is the part of ``parse_extra_options`` that matters
   here: ``parse_extra_options`` only adds KEY=VALUE string splitting (Olive already passes typed values)
   and ``normalize_builder_config``, which for the legacy (version 1) configuration Olive uses is a plain
   copy of the options. ``check_extra_options`` keeps bools, ints and lists as they are (it converts
   only the strings "true"/"false"/"1"/"0" and splits a comma-separated ``nodes_to_exclude`` string).

   The same wrapper also maps Olive's ``int4_*`` option names (``int4_block_size``,
   ``int4_accuracy_level``, ``int4_is_symmetric``, ``int4_op_types_to_quantize``,
   ``int4_nodes_to_exclude``, ``int4_algo_config``), which the ModelBuilder pass emits from its typed
   parameters, to the names genai >= 0.15 reads (``block_size``, ``accuracy_level``, ...). genai 0.18's
   help text calls the old names "deprecated aliases that still work", but no code in 0.18 reads them:
   without the mapping they are silently ignored. A name already given in its new form wins.

Lazy patching: the genai builder module imports torch/transformers and every model architecture (about
1.5 s), so :func:`apply` does not import it. It wraps ``ModelBuilder._run_for_config`` instead, which
patches the builder module just before Olive's own ``from onnxruntime_genai.models.builder import
create_model`` runs. If the builder module is already imported, it is patched at once.

Only what the installed versions need is patched (checked with ``packaging.version``): nothing for
genai < 0.15; the ``create_model`` wrapper for genai >= 0.15; the ``maybe_patch_quant`` guard for
genai >= 0.16. Both patches are no-ops where the problem is absent (``hf_details`` already present; the
module importable), so they are safe with any Olive version.

When to delete this module
--------------------------
When the Olive release we pin calls ``parse_extra_options``/``check_extra_options`` itself before
``create_model`` (and no longer imports ``quantized_model`` unconditionally), i.e. when a plain
``olive run`` of a ModelBuilder workflow works with the pinned onnxruntime-genai. Then replace
``python -m phi_pipeline.orchestration.olive_compat run ...`` with ``olive run ...`` and drop this file and its tests.

Trainer hooks
-------------
Olive 0.13's LoRA/QLoRA pass builds its ``transformers.Trainer`` without callbacks, so there is no
option for early stopping or for reporting progress. :func:`install_trainer_hooks` wraps
``transformers.Trainer.__init__`` in Olive's process to append, as set by the JSON in
``PHI_PIPELINE_TRAINER_HOOKS`` (written by the run from ``workflows.finetune.trainer_hooks``):

- ``early_stopping: {patience, threshold}``: transformers' own ``EarlyStoppingCallback`` on the validation
  loss (the workflow sets ``load_best_model_at_end`` and ``metric_for_best_model: eval_loss``, so the best
  checkpoint's weights are what Olive saves as the adapter);
- ``progress_file``: :class:`ProgressWriter`, one JSON line per trainer log (step, max_steps, loss,
  eval_loss, time), a ``begin`` line (with the step a resumed run starts from and the trainer's world size)
  and an ``end`` line; at the
  end it also writes the trainer's whole state (``trainer_state.json``, the loss history) beside it.

Always, whatever the hooks: :class:`CheckpointSeal` writes the sha256 of every file of each checkpoint the
trainer has just saved into it (``SEAL_FILE``), so a resumed run reads only a checkpoint it can verify
(``orchestration.training.prepare_finetune_dir``).

Delete these when Olive's LoRA pass accepts callbacks.

``modules_to_save``
-------------------
Olive 0.13's LoRA pass declares its ``modules_to_save`` parameter with ``type_=None``, so its config schema
accepts nothing but null: ``modules_to_save: [lm_head]`` is refused while the config is validated, before
the pass (which hands the value to PEFT's ``LoraConfig``) can use it. :func:`patch_lora_modules_to_save`,
run by :func:`apply`, declares it ``Optional[list[str]]``, for LoRA and every pass deriving from it
(QLoRA). A no-op once Olive declares a type.

Usage
-----
``python -m phi_pipeline.orchestration.olive_compat run --config workflow.json`` is ``olive run --config
workflow.json`` with :func:`apply` done first in the same process (Olive runs passes of a local
system in-process, so the patches take effect).

:func:`main` also saves about 2 s at the end of every run when telemetry is disabled by the environment
(``OLIVE_DISABLE_TELEMETRY=1`` or a CI variable such as ``CI=1``): Olive 0.13 still counts the events it
does not send, so ``Telemetry.shutdown()`` waits its full 2 s callback timeout for transmissions that never
happen. With telemetry disabled there is nothing to flush, so the wait is cut to 0
(:func:`patch_telemetry_shutdown`). Olive's own behaviour is unchanged when telemetry is enabled.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from packaging import version

logger = logging.getLogger(__name__)

__all__ = [
    "apply",
    "main",
    "genai_version",
    "needs_create_model_patch",
    "needs_quant_patch",
    "patch_telemetry_shutdown",
    "install_trainer_hooks",
    "patch_lora_modules_to_save",
]

#: First onnxruntime-genai version whose ``create_model`` needs ``hf_details`` (from ``parse_extra_options``).
GENAI_HF_DETAILS_SINCE = version.Version("0.15")
#: First onnxruntime-genai version without ``onnxruntime_genai.models.quantized_model``.
GENAI_NO_QUANTIZED_MODEL_SINCE = version.Version("0.16")

QUANTIZED_MODEL_MODULE = "onnxruntime_genai.models.quantized_model"
BUILDER_MODULE = "onnxruntime_genai.models.builder"

#: Olive ModelBuilder pass option names -> names read by the genai >= 0.15 model builder.
INT4_OPTION_ALIASES = {
    "int4_block_size": "block_size",
    "int4_accuracy_level": "accuracy_level",
    "int4_is_symmetric": "is_symmetric",
    "int4_op_types_to_quantize": "op_types_to_quantize",
    "int4_nodes_to_exclude": "nodes_to_exclude",
    "int4_algo_config": "algo_config",
}

# Marker attribute set on every function this module installs (makes apply() idempotent).
_PATCH_MARK = "__phi_pipeline_olive_compat__"


def genai_version() -> version.Version | None:
    """Installed onnxruntime-genai version (from package metadata, without importing it), or None."""
    for dist in ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"):
        try:
            return version.Version(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def needs_create_model_patch(genai: version.Version | None = None) -> bool:
    """True when genai's ``create_model`` requires ``hf_details`` (genai >= 0.15)."""
    genai = genai if genai is not None else genai_version()
    return genai is not None and genai.release >= GENAI_HF_DETAILS_SINCE.release


def needs_quant_patch(genai: version.Version | None = None) -> bool:
    """True when ``onnxruntime_genai.models.quantized_model`` no longer exists (genai >= 0.16)."""
    genai = genai if genai is not None else genai_version()
    return genai is not None and genai.release >= GENAI_NO_QUANTIZED_MODEL_SINCE.release


def _is_patched(func: Any) -> bool:
    return getattr(func, _PATCH_MARK, False)


def _mark(func: Callable) -> Callable:
    setattr(func, _PATCH_MARK, True)
    return func


def translate_int4_options(extra_options: dict[str, Any]) -> dict[str, Any]:
    """Rename Olive's ``int4_*`` keys in place to the genai >= 0.15 names; an existing new name wins."""
    for old, new in INT4_OPTION_ALIASES.items():
        if old in extra_options:
            value = extra_options.pop(old)
            if new in extra_options:
                logger.debug("olive_compat: both %s and %s given; keeping %s", old, new, new)
            else:
                extra_options[new] = value
    return extra_options


def wrap_create_model(create_model: Callable, check_extra_options: Callable) -> Callable:
    """Return ``create_model`` that first runs ``check_extra_options`` on its kwargs if ``hf_details`` is missing.

    ``check_extra_options`` mutates the options dict in place and adds ``hf_details``; it is exactly what
    genai's ``parse_extra_options`` runs for Olive's (legacy, version 1) option set.
    """
    if _is_patched(create_model):
        return create_model

    @functools.wraps(create_model)
    def create_model_with_hf_details(
        model_name, input_path, output_dir, precision, execution_provider, cache_dir, **extra_options
    ):
        if "hf_details" not in extra_options:
            translate_int4_options(extra_options)
            logger.debug("olive_compat: running check_extra_options before create_model: %s", extra_options)
            check_extra_options(
                model_name, input_path, output_dir, precision, execution_provider, cache_dir, extra_options
            )
        return create_model(
            model_name, input_path, output_dir, precision, execution_provider, cache_dir, **extra_options
        )

    create_model_with_hf_details.__wrapped_original__ = create_model
    return _mark(create_model_with_hf_details)


def patch_genai_builder(builder_module: Any | None = None) -> bool:
    """Wrap ``create_model`` in genai's builder module (imported if not given). Idempotent.

    Returns True when the module's ``create_model`` is (now) wrapped.
    """
    if not needs_create_model_patch():
        return False
    builder = builder_module if builder_module is not None else importlib.import_module(BUILDER_MODULE)
    if not _is_patched(builder.create_model):
        builder.create_model = wrap_create_model(builder.create_model, builder.check_extra_options)
    return True


def guard_maybe_patch_quant(maybe_patch_quant: Callable) -> Callable:
    """Return a ``maybe_patch_quant`` that skips cleanly when genai's ``quantized_model`` module is absent."""
    if _is_patched(maybe_patch_quant):
        return maybe_patch_quant

    @functools.wraps(maybe_patch_quant)
    def guarded_maybe_patch_quant(*args, **kwargs):
        try:
            return maybe_patch_quant(*args, **kwargs)
        except ModuleNotFoundError as e:
            if e.name not in (QUANTIZED_MODEL_MODULE, "onnxruntime_genai.models"):
                raise
            logger.debug(
                "olive_compat: %s is absent (onnxruntime-genai >= 0.16); skipping Olive's patch for models "
                "pre-quantized by Olive GPTQ/RTN",
                QUANTIZED_MODEL_MODULE,
            )
            return None

    guarded_maybe_patch_quant.__wrapped_original__ = maybe_patch_quant
    return _mark(guarded_maybe_patch_quant)


def _lazy_run_for_config(run_for_config: Callable) -> Callable:
    """Wrap ``ModelBuilder._run_for_config`` so genai's builder is patched right before it runs."""
    if _is_patched(run_for_config):
        return run_for_config

    @functools.wraps(run_for_config)
    def run_for_config_with_compat(self, *args, **kwargs):
        patch_genai_builder()
        return run_for_config(self, *args, **kwargs)

    run_for_config_with_compat.__wrapped_original__ = run_for_config
    return _mark(run_for_config_with_compat)


def patch_lora_modules_to_save() -> bool:
    """Let Olive's LoRA pass config accept a list for ``modules_to_save`` (see the module docstring). Idempotent."""
    from typing import Optional

    from olive.passes.pytorch.lora import LoRA

    original = LoRA.__dict__["_default_config"].__func__
    if _is_patched(original):
        return True

    @functools.wraps(original)
    def default_config_with_typed_modules_to_save(cls, accelerator_spec):
        config = original(cls, accelerator_spec)
        param = config.get("modules_to_save")
        if param is not None and param.type_ is None:
            param.type_ = Optional[list[str]]
        return config

    default_config_with_typed_modules_to_save.__wrapped_original__ = original
    LoRA._default_config = classmethod(_mark(default_config_with_typed_modules_to_save))
    return True


def apply() -> dict[str, bool]:
    """Patch Olive for the installed onnxruntime-genai (ModelBuilder) and LoRA's modules_to_save type. Idempotent.

    Returns which patches are active: ``{"maybe_patch_quant": bool, "create_model": bool}``.
    """
    patch_lora_modules_to_save()
    genai = genai_version()
    active = {"maybe_patch_quant": False, "create_model": False}
    if genai is None:
        logger.debug("olive_compat: onnxruntime-genai is not installed; nothing to patch")
        return active

    from olive.passes.onnx.model_builder import ModelBuilder

    if needs_quant_patch(genai):
        # maybe_patch_quant is a staticmethod: reading it from the class gives the plain function.
        if not _is_patched(ModelBuilder.maybe_patch_quant):
            ModelBuilder.maybe_patch_quant = staticmethod(guard_maybe_patch_quant(ModelBuilder.maybe_patch_quant))
        active["maybe_patch_quant"] = True

    if needs_create_model_patch(genai):
        if not _is_patched(ModelBuilder._run_for_config):
            ModelBuilder._run_for_config = _lazy_run_for_config(ModelBuilder._run_for_config)
        if BUILDER_MODULE in sys.modules:
            patch_genai_builder(sys.modules[BUILDER_MODULE])
        active["create_model"] = True

    return active


def telemetry_disabled_by_env() -> bool:
    """True when Olive disables its telemetry because of the environment (OLIVE_DISABLE_TELEMETRY=1 or CI)."""
    if os.environ.get("OLIVE_DISABLE_TELEMETRY") == "1":
        return True
    from olive.telemetry.telemetry import Telemetry

    is_ci = getattr(Telemetry, "_is_ci_environment", None)
    return bool(is_ci()) if callable(is_ci) else bool(os.environ.get("CI"))


def patch_telemetry_shutdown() -> bool:
    """Make Olive's ``Telemetry.shutdown()`` skip its 2 s wait for send callbacks. Idempotent.

    Only meant for runs where telemetry is disabled (nothing is sent, so no callback ever arrives).
    Returns True when the patch is (now) installed.
    """
    from olive.telemetry.telemetry import Telemetry

    if _is_patched(Telemetry.shutdown):
        return True
    original = Telemetry.shutdown

    @functools.wraps(original)
    def shutdown_without_callback_wait(self, timeout_millis: float = 10_000, callback_timeout_millis: float = 2_000):
        return original(self, timeout_millis, 0)

    shutdown_without_callback_wait.__wrapped_original__ = original
    Telemetry.shutdown = _mark(shutdown_without_callback_wait)
    return True


HOOKS_ENV = "PHI_PIPELINE_TRAINER_HOOKS"


def progress_writer_class() -> type:
    """transformers.TrainerCallback writing the trainer's logs as JSON lines (imported lazily: torch)."""
    import json
    import time
    from pathlib import Path

    from transformers import TrainerCallback

    class ProgressWriter(TrainerCallback):
        def __init__(self, path: str):
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)

        def _write(self, record: dict[str, Any]) -> None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            # world_size: the trainer's own count of data-parallel processes (torchrun ranks)
            self._write({"event": "begin", "step": state.global_step, "max_steps": state.max_steps,
                         "world_size": args.world_size, "time": time.time()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            record = {"event": "log", "step": state.global_step, "max_steps": state.max_steps, "time": time.time()}
            record.update({k: logs[k] for k in ("loss", "eval_loss") if k in logs})
            if len(record) > 4:
                self._write(record)

        def on_train_end(self, args, state, control, **kwargs):
            state.save_to_json(str(self.path.with_name("trainer_state.json")))
            self._write(
                {
                    "event": "end",
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "best_checkpoint": state.best_model_checkpoint,
                    "best_eval_loss": state.best_metric,
                    "time": time.time(),
                }
            )

    return ProgressWriter


SEAL_FILE = "phi-pipeline-seal.json"
"""In each trainer checkpoint: {"files": {relative path: sha256}} of the checkpoint as saved."""


def checkpoint_seal_class() -> type:
    """transformers.TrainerCallback sealing each checkpoint once saved (imported lazily: torch)."""
    import json
    from pathlib import Path

    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from phi_pipeline.orchestration.cache import file_digests

    class CheckpointSeal(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # only the main process writes checkpoints
                return
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not folder.is_dir():
                return
            tmp = folder / f".{SEAL_FILE}.tmp"
            tmp.write_text(json.dumps({"files": file_digests(folder, exclude=SEAL_FILE)}, indent=1))
            os.replace(tmp, folder / SEAL_FILE)  # a kill leaves no seal, never half of one

    return CheckpointSeal


def trainer_callbacks(hooks: dict[str, Any]) -> list[Any]:
    """The callbacks a hooks setting (see the module docstring) asks for, and the checkpoint seal."""
    callbacks: list[Any] = [checkpoint_seal_class()()]
    if "early_stopping" in hooks:
        from transformers import EarlyStoppingCallback

        stop = hooks["early_stopping"]
        callbacks.append(EarlyStoppingCallback(stop["patience"], stop.get("threshold", 0.0)))
    if "progress_file" in hooks:
        callbacks.append(progress_writer_class()(hooks["progress_file"]))
    return callbacks


def install_trainer_hooks(hooks: dict[str, Any]) -> bool:
    """Make every ``transformers.Trainer`` built in this process get the hooks' callbacks. Idempotent."""
    import transformers

    if _is_patched(transformers.Trainer.__init__):
        return True
    original = transformers.Trainer.__init__

    @functools.wraps(original)
    def init_with_callbacks(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), *trainer_callbacks(hooks)], **kwargs)

    init_with_callbacks.__wrapped_original__ = original
    transformers.Trainer.__init__ = _mark(init_with_callbacks)
    return True


def trainer_hooks_from_env() -> dict[str, Any] | None:
    import json

    value = os.environ.get(HOOKS_ENV)
    return json.loads(value) if value else None


SEED_ENV = "PHI_PIPELINE_SEED"


def seed_from_env() -> int | None:
    """Seed Python, NumPy and torch from PHI_PIPELINE_SEED, if set.

    Olive's LoRA pass creates the PEFT weights before the Trainer applies its seed, so two runs of one
    workflow train from different initialisations; seeding the process first makes them identical.
    """
    value = os.environ.get(SEED_ENV)
    if value is None:
        return None
    import random

    import numpy as np
    import torch

    seed = int(value)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phi_pipeline.orchestration.olive_compat <olive args>``: apply() then Olive's own CLI with the same argv."""
    args = list(sys.argv[1:] if argv is None else argv)
    apply()
    seed_from_env()
    hooks = trainer_hooks_from_env()
    if hooks:
        install_trainer_hooks(hooks)
    if telemetry_disabled_by_env():
        patch_telemetry_shutdown()
    from olive.cli.launcher import main as olive_main

    olive_main(args, called_as_console_script=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
