"""Running a bundle: the one wrapper of onnxruntime-genai, the NPU targets' runtimes, generation.

- genai.py: ``og.Model`` / ``og.Adapters`` / generators behind one class (the only place that calls
  onnxruntime-genai), sampling settings, decoder threads;
- target_models.py: targets onnxruntime-genai cannot run here (OpenVINO, QNN HTP), behind one protocol;
- generate.py: ``phi-pipeline generate``;
- batched.py: batched decoding on plain onnxruntime with a different adapter in every row (the
  serving graph, the KV rows, per-row sampling);
- engine.py: the serving engines (batched, and onnxruntime-genai's generators round-robin), one thread
  that owns the model.

May import: ``bundle`` (layout, manifest), ``pipeline_spec``, ``errors``. Never evaluation, search or serve.
"""
