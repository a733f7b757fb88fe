"""The fine-tuned model in a web page: onnxruntime-web runs the bundle's web graph (site.py, static/)."""
