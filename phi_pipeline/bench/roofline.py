"""Memory-bandwidth roofline: how close decode gets to the speed memory allows.

At batch 1 a decode step reads every weight once (the embedding table only one row) plus the KV
cache so far, and does little arithmetic per byte, so tokens/s x bytes read per token cannot
exceed the machine's memory bandwidth. The fraction reached says whether a bundle is
bandwidth-bound (near 1) or losing time elsewhere (per-operator overhead, threads, unpacking).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from phi_pipeline.evaluate.stats import summary

EMBEDDING = "model.embed_tokens.weight"


def copy_bandwidth(threads: int, megabytes: int = 512, reps: int = 5) -> dict[str, Any]:
    """Bytes moved per second (read + write) by a large numpy copy, split over `threads` threads.

    numpy releases the GIL while copying, so the threads copy their slices concurrently.
    """
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    slices = [slice(i * len(src) // threads, (i + 1) * len(src) // threads) for i in range(threads)]
    np.copyto(dst, src)  # touch every page before timing
    rates = []
    for _ in range(reps):
        workers = [threading.Thread(target=np.copyto, args=(dst[s], src[s])) for s in slices]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    return {"threads": threads, "gb_per_s": summary(rates, digits=2)}


def device_copy_bandwidth(megabytes: int = 1024, reps: int = 5) -> dict[str, Any]:
    """Bytes moved per second (read + write) by a CUDA device-to-device copy (torch)."""
    import torch

    src = torch.ones(megabytes * (1 << 20) // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    return {"device": torch.cuda.get_device_name(), "gb_per_s": summary(rates, digits=2)}


def bandwidths(device: str, threads: int, reps: int) -> dict[str, Any]:
    """The copy bandwidths a decode step competes for: host memory with one thread and with
    `threads`, or the GPU's memory."""
    if device == "cuda":
        return {"gpu": device_copy_bandwidth(reps=reps)}
    return {"one_thread": copy_bandwidth(1, reps=reps), "all_cores": copy_bandwidth(threads, reps=reps)}


def _initializer_bytes(tensor: Any) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims)) * np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def bytes_per_token(model_dir: Path, context: int) -> dict[str, int]:
    """Bytes one decode step reads: weights (one embedding row) and the KV cache at `context`,
    in the graph's KV dtype (fp32 for CPU bundles, fp16 for CUDA ones)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    weights = 0
    for init in graph.initializer:
        size = _initializer_bytes(init)
        # the token embedding table, fp32 or int4 (GatherBlockQuantized's weight_Q4 and weight_scales)
        weights += size // init.dims[0] if init.name.startswith(EMBEDDING) else size
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    past = next(i for i in graph.input if i.name.startswith("past_key_values"))
    kv_bytes = np.dtype(tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)).itemsize
    kv_per_position = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * kv_bytes
    return {"weights": weights, "kv_cache": kv_per_position * context, "total": weights + kv_per_position * context}


def roofline(tok_s: float, read_bytes: int, bandwidth_gb_s: float) -> float:
    """Share of the bandwidth bound reached: tokens/s x bytes per token / bytes per second."""
    return round(tok_s * read_bytes / (bandwidth_gb_s * 1e9), 4)
