"""End to end on the tiny model: the published bundle's contract, and that it runs on
onnxruntime-genai alone with adapters swapped on one loaded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi_pipeline.bundle.staging import verify
from phi_pipeline.orchestration.cache import file_sha256

pytestmark = pytest.mark.slow

ADAPTERS = ("tone", "antonyms")


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_bundle_has_the_documented_files(tiny_bundle):
    names = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "manifest.json", "README.md"} <= names
    assert {f"adapters/{a}.onnx_adapter" for a in ADAPTERS} <= names
    assert not any(n.endswith(".safetensors") or n.endswith(".bin") for n in names)  # no PyTorch weights shipped


def test_manifest_describes_every_adapter_and_file(tiny_bundle):
    m = manifest(tiny_bundle)
    assert (m["pipeline"], m["target"], m["precision"], m["layout"]) == ("tiny-phi3", "cpu", "int4", "multi-adapter")
    assert [a["name"] for a in m["adapters"]] == list(ADAPTERS)
    for a in m["adapters"]:
        assert a["sha256"] == file_sha256(tiny_bundle / a["file"]) == m["files"][a["file"]]
        assert a["dataset"]["train_sha256"] == file_sha256(Path(__file__).parents[1] / a["dataset"]["train"])
        assert a["lora"]["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        assert any("loss" in h for h in a["training_history"])
    assert set(m["files"]) == {
        p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()
    } - {"manifest.json"}
    assert {"onnxruntime-genai", "olive-ai", "torch"} <= set(m["packages"])
    assert {"finetune:tone", "finetune:antonyms", "export"} <= set(m["stage_seconds"])


def test_published_bundle_verifies(tiny_bundle):
    assert verify(tiny_bundle) == []


def test_int4_model_keeps_lora_matmuls_in_float(tiny_bundle):
    import onnx

    graph = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False).graph
    lora_nodes = [n for n in graph.node if "/lora_" in n.name and n.op_type.startswith("MatMul")]
    assert lora_nodes and {n.op_type for n in lora_nodes} == {"MatMul"}
    assert any(n.op_type == "MatMulNBits" for n in graph.node)  # the base weights are int4


def test_int4_bundle_quantizes_the_embedding_table(tiny_bundle):
    import onnx

    graph = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False).graph
    embed = [n for n in graph.node if n.name.startswith("/model/embed_tokens/")]
    assert [n.op_type for n in embed] == ["GatherBlockQuantized"]


GENAI_ONLY = r"""
import json, sys
import onnxruntime_genai as og
bundle = sys.argv[1]
m = json.load(open(f"{bundle}/manifest.json"))
model = og.Model(bundle)
tok = og.Tokenizer(model)
adapters = og.Adapters(model)
for a in m["adapters"]:
    adapters.load(f"{bundle}/{a['file']}", a["name"])
prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": "Classify the tone: a happy dog"}]), add_generation_prompt=True)
out = {}
for name in [None, "tone", "antonyms", "tone", None]:
    ids = tok.encode(prompt)
    p = og.GeneratorParams(model)
    p.set_search_options(do_sample=False, max_length=len(ids) + 12)
    g = og.Generator(model, p)
    if name:
        g.set_active_adapter(adapters, name)
    g.append_tokens(ids)
    while not g.is_done():
        g.generate_next_token()
    out.setdefault(str(name), []).append(tok.decode(g.get_sequence(0)[len(ids):]))
print(json.dumps({"out": out, "torch_loaded": "torch" in sys.modules}))
"""


def test_bundle_runs_on_genai_alone_and_adapters_switch_on_one_model(tiny_bundle):
    proc = subprocess.run([sys.executable, "-c", GENAI_ONLY, str(tiny_bundle)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False
    out = result["out"]
    assert out["None"][0] == out["None"][1] and out["tone"][0] == out["tone"][1]  # switching back is exact
    assert len({out["None"][0], out["tone"][0], out["antonyms"][0]}) == 3  # each adapter changes the output


def test_each_adapter_beats_the_base_on_its_eval_split(tiny_bundle):
    """The pipeline's own evaluation (eval.json), on the held-out split, in each adapter's metric."""
    summary = manifest(tiny_bundle)["evaluation"]["adapters"]
    assert set(summary) == set(ADAPTERS)
    for name, figures in summary.items():
        margin = 0.2 if figures["metric"] == "exact_match" else 5.0  # 0-1 vs chrF's 0-100
        assert figures["adapter_onnx"] > figures["base_onnx"] + margin, (name, figures)


def test_generate_command_answers_with_the_threads_asked_for_and_refuses_zero(tiny_bundle, capsys):
    from phi_pipeline.cli import main

    args = ["generate", str(tiny_bundle), "--adapter", "antonyms", "--prompt", "a hot drink", "--max-new-tokens", "8"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main([*args, "--threads", "2"]) == 0
    assert capsys.readouterr().out == default  # greedy: the thread count changes speed, not the answer
    assert main([*args, "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_cpu_model_card_says_how_to_choose_the_threads(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text()
    assert "intra_op_num_threads" in card and "--threads 1" in card


# Threads of a process holding the bundle loaded as `generate --threads N` loads it (N = 0: not given).
THREADS_WHILE_LOADED = r"""
import os, sys
from phi_pipeline.runtime.genai import BundleModel
model = BundleModel(sys.argv[1], threads=int(sys.argv[2]) or None)
model.generate(model.user_prompt("hello", None), None, 2)
print(len(os.listdir("/proc/self/task")))
"""


def _threads_while_loaded(bundle: Path, threads: int) -> int:
    proc = subprocess.run([sys.executable, "-c", THREADS_WHILE_LOADED, str(bundle), str(threads)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/task").is_dir(), reason="needs 2+ cores and /proc")
def test_published_cpu_bundle_decodes_on_every_core_and_threads_1_overrides_it(tiny_bundle):
    decoder = json.loads((tiny_bundle / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["session_options"]["intra_op_num_threads"] == 0  # onnxruntime: one intra-op thread per core
    # onnxruntime's intra-op pool starts threads beyond the caller's: one fewer with --threads 1
    assert _threads_while_loaded(tiny_bundle, 0) > _threads_while_loaded(tiny_bundle, 1)
