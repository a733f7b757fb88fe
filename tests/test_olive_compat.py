"""Unit tests for phi_pipeline.orchestration.olive_compat (the Olive 0.13 / onnxruntime-genai >= 0.15 shim).

Fast: no model is built; genai's builder functions are replaced by mocks where they would load a model.
"""

from __future__ import annotations

import sys
import types
from unittest import mock

import pytest
from packaging.version import Version

from phi_pipeline.orchestration import olive_compat as oc

model_builder = pytest.importorskip("olive.passes.onnx.model_builder")
ModelBuilder = model_builder.ModelBuilder


@pytest.fixture(autouse=True)
def restore_patched_state():
    """Undo every patch a test makes on Olive's ModelBuilder and genai's builder module."""
    from olive.telemetry.telemetry import Telemetry

    saved = {name: ModelBuilder.__dict__[name] for name in ("maybe_patch_quant", "_run_for_config")}
    saved_shutdown = Telemetry.__dict__["shutdown"]
    builder = sys.modules.get(oc.BUILDER_MODULE)
    saved_create_model = builder.create_model if builder is not None else None
    yield
    for name, value in saved.items():
        setattr(ModelBuilder, name, value)
    Telemetry.shutdown = saved_shutdown
    builder = sys.modules.get(oc.BUILDER_MODULE)
    if builder is not None:
        if saved_create_model is not None:
            builder.create_model = saved_create_model
        else:
            while oc._is_patched(builder.create_model):
                builder.create_model = builder.create_model.__wrapped_original__


def fake_builder_module():
    """A stand-in for onnxruntime_genai.models.builder with mocked create_model/check_extra_options."""
    module = types.SimpleNamespace()
    module.create_model = mock.Mock(name="create_model")

    def check_extra_options(model_name, input_path, output_dir, precision, execution_provider, cache_dir, opts):
        opts["hf_details"] = {"hf_config": "cfg"}

    module.check_extra_options = mock.Mock(name="check_extra_options", side_effect=check_extra_options)
    return module


POSITIONAL = ("model", "model", "out", "int4", "cpu", "cache")


# --- version gates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("genai", "create_model", "quant"),
    [("0.14.1", False, False), ("0.15.0", True, False), ("0.16.0", True, True), ("0.18.0", True, True)],
)
def test_needs_patch_matches_genai_version_when_version_given(genai, create_model, quant):
    assert oc.needs_create_model_patch(Version(genai)) is create_model
    assert oc.needs_quant_patch(Version(genai)) is quant


def test_apply_patches_nothing_when_genai_older_than_0_15(monkeypatch):
    monkeypatch.setattr(oc, "genai_version", lambda: Version("0.14.1"))
    before = dict(ModelBuilder.__dict__)

    assert oc.apply() == {"maybe_patch_quant": False, "create_model": False}
    assert ModelBuilder.__dict__["maybe_patch_quant"] is before["maybe_patch_quant"]
    assert ModelBuilder.__dict__["_run_for_config"] is before["_run_for_config"]


# --- apply() -----------------------------------------------------------------------------------------


def test_apply_is_idempotent_when_called_twice(monkeypatch):
    monkeypatch.setattr(oc, "genai_version", lambda: Version("0.18.0"))

    first = oc.apply()
    quant_after_first = ModelBuilder.__dict__["maybe_patch_quant"]
    run_after_first = ModelBuilder.__dict__["_run_for_config"]
    second = oc.apply()

    assert first == second == {"maybe_patch_quant": True, "create_model": True}
    assert ModelBuilder.__dict__["maybe_patch_quant"] is quant_after_first
    assert ModelBuilder.__dict__["_run_for_config"] is run_after_first
    # wrapped exactly once: the wrapped original is Olive's own function
    assert not oc._is_patched(ModelBuilder.maybe_patch_quant.__wrapped_original__)
    assert not oc._is_patched(ModelBuilder._run_for_config.__wrapped_original__)


def test_maybe_patch_quant_does_not_raise_when_applied_with_installed_genai():
    if not oc.needs_quant_patch():
        pytest.skip("installed onnxruntime-genai still ships quantized_model")
    unpatched = getattr(ModelBuilder.maybe_patch_quant, "__wrapped_original__", ModelBuilder.maybe_patch_quant)
    with pytest.raises(ModuleNotFoundError):
        unpatched()  # the Olive 0.13 behaviour (another test may have applied the shim in this process)

    oc.apply()

    assert ModelBuilder.maybe_patch_quant() is None


def test_guarded_maybe_patch_quant_keeps_original_behaviour_when_module_present():
    original = mock.Mock(return_value="patched")

    assert oc.guard_maybe_patch_quant(original)() == "patched"
    original.assert_called_once_with()


def test_guarded_maybe_patch_quant_reraises_when_another_module_is_missing():
    original = mock.Mock(side_effect=ModuleNotFoundError("No module named 'foo'", name="foo"))

    with pytest.raises(ModuleNotFoundError):
        oc.guard_maybe_patch_quant(original)()


def test_apply_wraps_create_model_when_genai_builder_already_imported():
    builder = pytest.importorskip(oc.BUILDER_MODULE)
    if not oc.needs_create_model_patch():
        pytest.skip("installed onnxruntime-genai does not need the create_model patch")
    # the genuine function, even if another test already applied the shim in this process
    original = getattr(builder.create_model, "__wrapped_original__", builder.create_model)

    oc.apply()
    oc.apply()

    assert oc._is_patched(builder.create_model)
    assert builder.create_model.__wrapped_original__ is original
    assert builder.check_extra_options is not None


def test_run_for_config_patches_genai_builder_when_pass_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(oc, "genai_version", lambda: Version("0.18.0"))
    monkeypatch.setattr(oc, "patch_genai_builder", lambda *a: calls.append("patch"))
    original = mock.Mock(side_effect=lambda *a, **k: calls.append("run") or "model")
    monkeypatch.setattr(ModelBuilder, "_run_for_config", original)

    oc.apply()
    calls.clear()  # apply() also patches at once if the builder module is already imported
    result = ModelBuilder._run_for_config("self", "model", "config", "out")

    assert result == "model"
    assert calls == ["patch", "run"]
    original.assert_called_once_with("self", "model", "config", "out")


# --- create_model wrapper ----------------------------------------------------------------------------


def test_create_model_wrapper_calls_check_extra_options_when_hf_details_missing():
    builder = fake_builder_module()
    wrapped = oc.wrap_create_model(builder.create_model, builder.check_extra_options)

    wrapped(*POSITIONAL, filename="model.onnx", adapter_path="/a")

    builder.check_extra_options.assert_called_once()
    args = builder.check_extra_options.call_args.args
    assert args[:6] == POSITIONAL
    assert args[6]["filename"] == "model.onnx"
    builder.create_model.assert_called_once()
    kwargs = builder.create_model.call_args.kwargs
    assert builder.create_model.call_args.args == POSITIONAL
    assert kwargs["hf_details"] == {"hf_config": "cfg"}
    assert kwargs["adapter_path"] == "/a"


def test_create_model_wrapper_skips_check_extra_options_when_hf_details_present():
    builder = fake_builder_module()
    wrapped = oc.wrap_create_model(builder.create_model, builder.check_extra_options)

    wrapped(*POSITIONAL, hf_details={"hf_config": "given"}, int4_block_size=64)

    builder.check_extra_options.assert_not_called()
    assert builder.create_model.call_args.kwargs == {"hf_details": {"hf_config": "given"}, "int4_block_size": 64}


def test_create_model_wrapper_renames_olive_int4_options_when_hf_details_missing():
    builder = fake_builder_module()
    wrapped = oc.wrap_create_model(builder.create_model, builder.check_extra_options)

    wrapped(*POSITIONAL, int4_block_size=64, int4_nodes_to_exclude=["/a"], int4_is_symmetric=False, accuracy_level=1,
            int4_accuracy_level=4)

    kwargs = builder.create_model.call_args.kwargs
    assert kwargs["block_size"] == 64
    assert kwargs["nodes_to_exclude"] == ["/a"]
    assert kwargs["is_symmetric"] is False
    assert kwargs["accuracy_level"] == 1  # an explicit new-style name wins
    assert not any(key.startswith("int4_") for key in kwargs)


def test_wrap_create_model_returns_same_function_when_already_wrapped():
    builder = fake_builder_module()
    once = oc.wrap_create_model(builder.create_model, builder.check_extra_options)

    assert oc.wrap_create_model(once, builder.check_extra_options) is once


def test_patch_genai_builder_wraps_once_when_called_twice(monkeypatch):
    monkeypatch.setattr(oc, "genai_version", lambda: Version("0.18.0"))
    builder = fake_builder_module()
    original = builder.create_model

    assert oc.patch_genai_builder(builder) is True
    first = builder.create_model
    assert oc.patch_genai_builder(builder) is True

    assert builder.create_model is first
    assert first.__wrapped_original__ is original


def test_real_check_extra_options_keeps_olive_value_types_when_hf_lookup_mocked(monkeypatch):
    builder = pytest.importorskip(oc.BUILDER_MODULE)
    if not oc.needs_create_model_patch():
        pytest.skip("installed onnxruntime-genai has no hf_details step")
    config = types.SimpleNamespace(tie_word_embeddings=False)
    monkeypatch.setattr(builder, "get_hf_details", lambda *a: {"extra_kwargs": {}, "hf_name": "m", "hf_config": config})
    inner = mock.Mock(name="create_model")
    wrapped = oc.wrap_create_model(inner, builder.check_extra_options)

    wrapped(*POSITIONAL, filename="model.onnx", int4_nodes_to_exclude=["/x/MatMul", "/y/MatMul"], block_size=64,
            exclude_embeds=False, include_hidden_states="true", adapter_path="/adapter")

    kwargs = inner.call_args.kwargs
    assert kwargs["nodes_to_exclude"] == ["/x/MatMul", "/y/MatMul"]
    assert kwargs["block_size"] == 64
    assert kwargs["exclude_embeds"] is False
    assert kwargs["include_hidden_states"] is True
    assert kwargs["filename"] == "model.onnx"
    assert kwargs["adapter_path"] == "/adapter"
    assert kwargs["hf_details"]["hf_config"] is config


# --- main() ------------------------------------------------------------------------------------------


def test_main_hands_same_argv_to_olive_cli_when_called(monkeypatch):
    import olive.cli.launcher as launcher

    monkeypatch.setattr(oc, "telemetry_disabled_by_env", lambda: False)

    events = []
    monkeypatch.setattr(oc, "apply", lambda: events.append("apply"))
    monkeypatch.setattr(
        launcher, "main", lambda raw_args=None, called_as_console_script=True: events.append(("olive", raw_args))
    )

    assert oc.main(["run", "--config", "x.json"]) == 0
    assert events == ["apply", ("olive", ["run", "--config", "x.json"])]


def test_main_patches_telemetry_shutdown_when_telemetry_disabled_by_env(monkeypatch):
    import olive.cli.launcher as launcher
    from olive.telemetry.telemetry import Telemetry

    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(oc, "apply", lambda: None)
    monkeypatch.setattr(launcher, "main", lambda raw_args=None, called_as_console_script=True: None)

    oc.main(["run", "--config", "x.json"])

    assert oc._is_patched(Telemetry.shutdown)


def test_main_keeps_telemetry_shutdown_when_telemetry_enabled(monkeypatch):
    import olive.cli.launcher as launcher
    from olive.telemetry.telemetry import Telemetry

    monkeypatch.setattr(oc, "telemetry_disabled_by_env", lambda: False)
    monkeypatch.setattr(oc, "apply", lambda: None)
    monkeypatch.setattr(launcher, "main", lambda raw_args=None, called_as_console_script=True: None)
    before = Telemetry.__dict__["shutdown"]

    oc.main(["run", "--config", "x.json"])

    assert Telemetry.__dict__["shutdown"] is before


def test_patched_telemetry_shutdown_passes_zero_callback_timeout_when_called(monkeypatch):
    from olive.telemetry.telemetry import Telemetry

    original = mock.Mock()
    monkeypatch.setattr(Telemetry, "shutdown", original)

    assert oc.patch_telemetry_shutdown() is True
    assert oc.patch_telemetry_shutdown() is True  # idempotent
    Telemetry.shutdown("self")

    original.assert_called_once_with("self", 10_000, 0)
