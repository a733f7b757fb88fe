"""The bundle's layout: file and folder names inside a published bundle.

Layout of dist/<pipeline>/<target>/ (the one place that defines it):
    genai_config.json, model.onnx, model.onnx.data, tokenizer files   ONNX Runtime GenAI model folder
    adapters/<name>.onnx_adapter                                      one per adapter (multi-adapter layout)
    variants/<name>/ (model.onnx, genai_config.json, tokenizer ...)   one model per adapter (merged layout)
    model.web.onnx, web.json (cpu, webgpu)                            the graph with required LoRA inputs for
                                                                      onnxruntime-web (its weights: model.onnx.data)
                                                                      and what the page needs to drive it (web.py)
    manifest.json                                                     what, from what, with what, sha256 of every file
    model.sig                                                         optional: OpenSSF model-signing signature of every other file
    README.md                                                         model card: how to load it
    eval.json, report.md, report/*.png                                evaluation figures, publish gates, charts
"""

FORMAT = "phi-pipeline-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "model.sig"  # model-signing's default name; signs everything but itself (signing.py)
CARD = "README.md"
ADAPTERS_DIR = "adapters"
VARIANTS_DIR = "variants"
MODEL_FILE = "model.onnx"
WEB_GRAPH = "model.web.onnx"
WEB_MANIFEST = "web.json"


def adapter_file(name: str) -> str:
    return f"{ADAPTERS_DIR}/{name}.onnx_adapter"


def variant_dir(name: str) -> str:
    """Merged layout: the folder of the model with adapter `name` merged into its weights."""
    return f"{VARIANTS_DIR}/{name}"
