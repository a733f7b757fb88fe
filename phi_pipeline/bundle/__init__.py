"""Stage 3, the deployable folder: staging, graph surgery, adapters, manifest, publish, sign, package.

- layout.py: the names of a bundle's files and folders (the one place that defines them);
- staging.py: export + trained adapters -> a staged bundle with its manifest and model card; verify;
- adapters.py: PEFT adapters -> ``.onnx_adapter`` files that fit the exported graph;
- lora_packing.py: graph surgery that packs split q/k/v and gate/up projections with their LoRA inputs;
- qnn_graph.py: graph surgery for the qnn target's prompt graph (GroupQueryAttention's window);
- publish.py (atomic replace), signing.py (model-signing), package.py (ORT model package of targets).

May import: ``pipeline_spec``, ``orchestration``, ``errors``, ``versions``. Never a runtime, evaluation or search.
"""
