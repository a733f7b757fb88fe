"""Staging a bundle: copying the export, converting adapters, the manifest, model card and verification.

The bundle's layout (the files of dist/<pipeline>/<target>/) is in layout.py.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_pipeline.orchestration.cache import file_sha256, tree_files
from phi_pipeline.orchestration.distributed import DISTRIBUTED_FILE, describe
from phi_pipeline.orchestration.runlock import pid_alive
from phi_pipeline.pipeline_spec.schema import OBJECTIVE_NAMES
from phi_pipeline.orchestration.trained import TRAINER_STATE
from phi_pipeline.bundle.layout import (
    CARD, FORMAT, MANIFEST, MODEL_FILE, SIGNATURE, WEB_GRAPH, WEB_MANIFEST, adapter_file, variant_dir,
)
from phi_pipeline.versions import package_versions

if TYPE_CHECKING:
    from phi_pipeline.orchestration.trained import TrainedAdapter
    from phi_pipeline.pipeline_spec.plan import Plan
    from phi_pipeline.orchestration.progress import Stages

# Olive's bookkeeping and the layout adapter's weights are not part of a bundle.
_SKIP_FROM_EXPORT = ("model_config.json", "output_model_config.json")


def _prompt_format(adapter: "TrainedAdapter", bos_token: str | None) -> dict[str, Any]:
    from phi_pipeline.pipeline_spec.data import prompt_prefix

    data = adapter.plan.spec.data
    if data.messages_field:
        return {"type": "chat"}
    return {
        "type": "template",
        "prefix": prompt_prefix(data.text_template or "", data.response_field or ""),
        # Olive's text_template training wraps each example as "{bos} {text} {eos}".
        "bos": bos_token,
    }


def _bos_token(folder: Path) -> str | None:
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    bos = tok.get("bos_token")
    return bos.get("content") if isinstance(bos, dict) else bos


def remove_abandoned_staging(root: Path) -> None:
    """Delete staging folders of runs that were killed (their pid, the name's suffix, is gone)."""
    for folder in root.iterdir():
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def staging_dir(plan: "Plan", variant: str | None = None) -> Path:
    """This process's staging folder for the plan, or for one export-search variant of it (the pid, last,
    tells a killed run's leftovers)."""
    return plan.paths.staging_root / "-".join([plan.spec.name, plan.target.name, *([variant] if variant else []), str(os.getpid())])


def _new_staging(plan: "Plan", variant: str | None) -> Path:
    root = plan.paths.staging_root
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(root)
    staged = staging_dir(plan, variant)
    shutil.rmtree(staged, ignore_errors=True)
    return staged


def _copy_model(export: Path, dest: Path) -> None:
    """An exported model folder's shippable files (not Olive's bookkeeping or the layout adapter)."""
    for src in tree_files(export):
        rel = src.relative_to(export)
        if rel.name in _SKIP_FROM_EXPORT or rel.suffix == ".onnx_adapter" or rel.name == "cache-entry.json":
            continue
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        dst.chmod(0o644)  # Olive writes model.onnx.data owner-only; a bundle is meant to be shipped


def _set_decoder_session_options(model_dir: Path, options: dict[str, object]) -> None:
    """Merge the target's decoder session options into an exported genai_config.json."""
    if not options:
        return
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update(options)
    path.write_text(json.dumps(config, indent=4) + "\n")


def _adapter_entry(t: "TrainedAdapter", location: dict[str, str], bos: str | None) -> dict[str, Any]:
    spec = t.plan.spec
    return {
        "name": t.plan.name,
        **location,
        "method": spec.lora.method,
        "lora": {**spec.lora.model_dump(), "target_modules": list(t.plan.target_modules)},
        "training": spec.training.model_dump(),
        # how many ranks trained it, over which backend, with which effective batch
        "distributed": trained_distributed(t),
        # the data spec (sources, and how a row becomes text, so `phi-pipeline eval` can re-read the eval split)
        "dataset": {
            **spec.data.model_dump(exclude_none=True),
            **{f"{split}_sha256": sha for split, sha in t.dataset_sha256.items()},
            "validation_rows": t.validation,
        },
        "eval": spec.eval.model_dump(),
        "gates": spec.gates.model_dump(),
        "prompt_format": _prompt_format(t, bos),
        "cache_key": t.key,
        "training_history": training_history(t.folder),
        # the search that chose lora/training above: every trial, the best one, its objective
        "search": t.search,
    }


def _write_manifest(plan: "Plan", staged: Path, adapters: list[dict[str, Any]], stages: "Stages") -> None:
    manifest = {
        "format": FORMAT,
        "pipeline": plan.spec.name,
        "description": plan.spec.description,
        "target": plan.target.name,
        "execution_provider": plan.target.execution_provider,
        "precision": plan.precision,
        "layout": plan.layout,
        "export": plan.spec.export.model_dump(exclude={"search", "precision", "layout"}),
        "runtime_packages": list(plan.target.runtime_packages),
        "base_model": {"name_or_path": plan.base_model, "model_type": plan.model_type},
        "adapters": adapters,
        "seeds": {a["name"]: a["training"]["seed"] for a in adapters},
        "stage_seconds": dict(stages.seconds),
        "cached_stages": sorted(stages.cached),
        "packages": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if (staged / WEB_MANIFEST).is_file():
        manifest["web"] = WEB_MANIFEST  # the page manifest of the in-browser page (web.py)
    (staged / CARD).write_text(model_card(manifest))
    manifest["files"] = {
        p.relative_to(staged).as_posix(): file_sha256(p) for p in tree_files(staged) if p.name != MANIFEST
    }
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def stage(plan: "Plan", export: Path, trained: list["TrainedAdapter"], stages: "Stages", variant: str | None = None) -> Path:
    """Assemble a multi-adapter bundle in a fresh staging folder next to its destination (`variant`: an
    export-search variant's, beside the others)."""
    from phi_pipeline.bundle.adapters import convert_adapter
    from phi_pipeline.bundle.lora_packing import pack_lora_projections

    staged = _new_staging(plan, variant)
    _copy_model(export, staged)
    _set_decoder_session_options(staged, plan.target.decoder_session_options)
    if plan.spec.export.pack_projections:  # before conversion: adapters fill the packed inputs
        pack_lora_projections(staged, list(plan.lora_layout))
    bos = _bos_token(staged)
    adapters = []
    for t in trained:
        out = staged / adapter_file(t.plan.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_adapter(t.folder / "adapter", staged / MODEL_FILE, out)
        adapters.append(_adapter_entry(t, {"file": adapter_file(t.plan.name), "sha256": file_sha256(out)}, bos))
    if plan.target.web_page:
        from phi_pipeline.bundle.web import stage_web

        stage_web(staged)
    _write_manifest(plan, staged, adapters, stages)
    return staged


def stage_merged(plan: "Plan", variants: dict[str, Path], trained: list["TrainedAdapter"], stages: "Stages") -> Path:
    """Assemble a merged bundle: one complete model folder per adapter, for runtimes that cannot
    swap adapters (DirectML, NPUs)."""
    staged = _new_staging(plan, None)
    adapters = []
    for t in trained:
        folder = variant_dir(t.plan.name)
        _copy_model(variants[t.plan.name], staged / folder)
        _set_decoder_session_options(staged / folder, plan.target.decoder_session_options)
        if plan.target.export_route == "qnn":  # Olive 0.13's prompt graph vs onnxruntime 1.31 (qnn_graph.py)
            from phi_pipeline.bundle.qnn_graph import widen_first_window

            widen_first_window(staged / folder)
        adapters.append(_adapter_entry(t, {"model_dir": folder}, _bos_token(staged / folder)))
    _write_manifest(plan, staged, adapters, stages)
    return staged


def finalize_manifest(folder: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into a staged bundle's manifest, rewrite the model card from it and list the
    files added since stage().

    Files already listed keep their sha256 (verify() has just checked them); the card and files
    written after stage() (the evaluation report) are hashed, so verify() stays exact.
    """
    manifest = json.loads((folder / MANIFEST).read_text())
    for key, value in updates.items():  # mappings are merged one level deep, other values replaced
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    files: dict[str, str] = manifest.get("files", {})
    if (folder / CARD).is_file():  # what the card says (the export search's choice) may have changed
        (folder / CARD).write_text(model_card(manifest))
        files[CARD] = file_sha256(folder / CARD)
    for p in tree_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel != MANIFEST and rel not in files:
            files[rel] = file_sha256(p)
    manifest["files"] = dict(sorted(files.items()))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def trained_distributed(t: "TrainedAdapter") -> dict[str, Any]:
    path = t.folder / DISTRIBUTED_FILE
    # a cache entry from before data-parallel training was trained by one process
    return json.loads(path.read_text()) if path.is_file() else describe(t.plan.spec.training)


def training_history(folder: Path) -> list[dict[str, Any]]:
    """The trainer's logged history (loss, eval_loss, learning rate by step) of a fine-tune result."""
    try:
        return json.loads((folder / TRAINER_STATE).read_text()).get("log_history", [])
    except (OSError, ValueError):
        return []


def _example_prompt(fmt: dict[str, Any]) -> str:
    """The snippet's prompt line, in the first adapter's training format, the user's text left as "..."."""
    if fmt["type"] == "chat":
        return """prompt = tokenizer.apply_chat_template('[{"role": "user", "content": "..."}]', add_generation_prompt=True)"""
    fields = dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(fmt["prefix"]) if f)
    text = f"{fmt['bos']} {fmt['prefix']}" if fmt.get("bos") else fmt["prefix"]
    placeholders = ", ".join(f'{f}="..."' for f in fields)
    return f"prompt = {json.dumps(text)}.format({placeholders})"


def _quantization_text(manifest: dict[str, Any]) -> str:
    """The int4 settings the bundle was exported with and, after an export search, why these."""
    export = manifest.get("export")
    if not export or manifest["precision"] != "int4":
        return ""
    level = export["int4_accuracy_level"]
    text = (f"\nWeights: int4 in blocks of {export['int4_block_size']}, {'symmetric' if export['int4_symmetric'] else 'asymmetric'}, "
            f"{export['int4_algorithm']} quantization, LM head {export['int4_lm_head']}, sensitive layers "
            f"{export['int4_sensitive_layers']}, embeddings "
            f"{'int4' if export['int4_quantize_embeddings'] else 'fp32'}, MatMul activations at accuracy level "
            f"{level if level is not None else 'of the builder default'}.")
    search = manifest.get("export_search")
    if search:
        text += (f" Variant `{search['winner']}`, chosen by the export search among {len(search['variants'])} "
                 f"variants on this build machine: {search['variants'][search['winner']]['why']} "
                 "(report.md lists every variant).")
    return text + "\n"


def model_card(manifest: dict[str, Any]) -> str:
    names = [a["name"] for a in manifest["adapters"]]
    merged = manifest["layout"] == "merged"
    rows = "\n".join(
        f"| `{a['name']}` | `{a.get('file') or a['model_dir']}` | {a['method']} r={a['lora']['r']} "
        f"alpha={a['lora']['alpha']} | `{a['dataset'].get('train') or a['dataset'].get('hub')}` |"
        for a in manifest["adapters"]
    )
    searched = "".join(
        f"\n- `{a['name']}`: settings found by a {s['strategy']} search of {len(s['trials'])} trials ranked by "
        f"{OBJECTIVE_NAMES[s['objective']]} on its validation split; best trial {s['best_trial']}: "
        + ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}" for k, v in s["best_params"].items())
        for a in manifest["adapters"]
        if (s := a.get("search"))
    )
    rows += ("\n" + searched) if searched else ""
    first = names[0]
    quantization = _quantization_text(manifest)
    prompt = _example_prompt(manifest["adapters"][0]["prompt_format"])
    if merged:
        what = (
            f"{len(names)} ONNX Runtime GenAI model(s), one per adapter with the adapter merged into its "
            f"weights (the runtime for `{manifest['execution_provider']}` cannot swap adapters)"
        )
        usage = f"""model = og.Model("{variant_dir(first)}")        # one folder per adapter
tokenizer = og.Tokenizer(model)
{prompt}
params = og.GeneratorParams(model)
params.set_search_options(max_length=256, do_sample=False)
generator = og.Generator(model, params)"""
    else:
        what = f"An ONNX Runtime GenAI model with {len(names)} swappable LoRA adapter(s)"
        usage = f"""model = og.Model(".")                                  # this folder
tokenizer = og.Tokenizer(model)
adapters = og.Adapters(model)
adapters.load("adapters/{first}.onnx_adapter", "{first}")   # load each adapter once
{prompt}

params = og.GeneratorParams(model)
params.set_search_options(max_length=256, do_sample=False)
generator = og.Generator(model, params)
generator.set_active_adapter(adapters, "{first}")           # omit for the base model"""
    threads = ""
    if manifest["execution_provider"] == "CPUExecutionProvider":
        threads = """On CPU, this folder's genai_config.json runs the decoder on every core (`intra_op_num_threads`: 0;
onnxruntime-genai's own default is one thread, 1.6-1.7x slower on a 2-core machine). To use fewer, e.g. beside
other work: `config = og.Config("."); config.overlay('{"model": {"decoder": {"session_options":
{"intra_op_num_threads": 1}}}}'); model = og.Model(config)`, or `--threads 1` on the command line below.

"""
    browser = ""
    if manifest.get("web"):
        browser = f"""In a web page: `{WEB_GRAPH}` is the same model with its LoRA inputs required, for onnxruntime-web
(`{manifest['web']}` tells the page how to drive it). `phi-pipeline serve <this folder>` serves a chat page at /web/
that runs it in the browser (WebGPU, else WASM), an adapter per message; `phi-pipeline web <this folder> site/`
writes that page as static files.

"""
    return f"""# {manifest['pipeline']} ({manifest['target']}, {manifest['precision']}, {manifest['layout']})

{manifest['description']}

{what}, built by phi-pipeline from `{manifest['base_model']['name_or_path']}` for the
`{manifest['execution_provider']}`. Runtime: `pip install {' '.join(manifest['runtime_packages'])}` (no torch needed).

| adapter | file | LoRA | trained on |
|---|---|---|---|
{rows}
{quantization}
## Use it

```python
import onnxruntime_genai as og

{usage}
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

{threads}Each adapter expects prompts in the format it was trained on (`prompt_format` in manifest.json):
chat adapters use the model's chat template, template adapters the text before the answer.
Or from the command line: `phi-pipeline generate <this folder> --adapter {first} --prompt "..."`.

{browser}`report.md` and `eval.json`: each adapter's task metric against the base model, ONNX against the
PyTorch reference (metric, perplexity, token agreement, logit differences) and the publish gates.
`manifest.json` lists the sha256 of every file; `phi-pipeline verify <this folder>` checks them and
that each adapter fits the model's LoRA inputs.
"""


def sign(folder: Path, private_key: Path) -> Path:
    """Sign a bundle (every file but the signature, manifest.json included); returns the signature."""
    from phi_pipeline.bundle.signing import sign_folder

    return sign_folder(folder, folder / SIGNATURE, private_key)


def verify(folder: Path, public_key: Path | None = None) -> list[str]:
    """Every way the bundle differs from its manifest, or an adapter misfits the graph, or (with
    `public_key`) the bundle fails its signature; [] if none."""
    problems = _manifest_problems(folder)
    if public_key is not None:
        from phi_pipeline.bundle.signing import verify_folder

        problems += [p for p in verify_folder(folder, folder / SIGNATURE, public_key) if p not in problems]
    return problems


def _manifest_problems(folder: Path) -> list[str]:
    from phi_pipeline.bundle.adapters import check_adapter_fits

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{MANIFEST}: missing; not a phi-pipeline bundle"]
    except ValueError as exc:
        return [f"{MANIFEST}: not valid JSON ({exc})"]
    problems = []
    listed: dict[str, str] = manifest.get("files", {})
    present = {p.relative_to(folder).as_posix() for p in tree_files(folder)} - {MANIFEST, SIGNATURE}
    for rel in sorted(set(listed) - present):
        problems.append(f"{rel}: listed in the manifest but missing")
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: present but not in the manifest")
    for rel in sorted(set(listed) & present):
        if file_sha256(folder / rel) != listed[rel]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupted)")
    model = folder / MODEL_FILE
    if model.exists():
        for a in manifest.get("adapters", []):
            path = folder / a.get("file", "")
            if "file" in a and path.exists():
                problems += [f"{a['file']}: {p}" for p in check_adapter_fits(model, path)]
    return problems
