"""phi-pipeline: LoRA fine-tune -> Olive ONNX export -> multi-adapter ONNX Runtime GenAI bundle."""

__version__ = "0.1.0"
