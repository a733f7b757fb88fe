"""Batched decoding of a multi-adapter bundle on plain onnxruntime: every row its own adapter.

onnxruntime-genai applies one adapter to a whole generator and batches continuously only with paged
attention on CUDA, so serving many requests with different adapters on CPU needs its own driver of the
bundle's graph. This module is that driver; the serving engine (engine.py) schedules requests onto it.

- The serving graph: the bundle's model.onnx with a row mask after each LoRA A product:
  `x [batch, seq, in] @ A [in, R]`, times `mask [batch, 1, R]`, `@ B [R, out]`. A step's distinct
  adapters are concatenated along the rank axis (R is the sum of their ranks), and row i's mask is one on
  its adapter's slice and zero elsewhere (all zero for the base model). Each LoRA product is then one GEMM
  over every row that reads each adapter's weights once, as SGMV kernels group rows by adapter on GPUs;
  giving each row its own zero-padded copy (`A [batch, in, r_max]`) read the weights once per row: 8 ms of
  a 30 ms SmolLM2 step at 8 rows. Made in memory when the server starts (the weights are read from the
  bundle): the published bundle stays what onnxruntime-genai loads, and its signature holds.
- One KV buffer per layer, `[max_batch, kv_heads, kv_len, head]`, shared by past and present
  (GroupQueryAttention's shared-buffer mode, as onnxruntime-genai runs it). Rows `0..n-1` are the
  requests decoding; a step runs on that prefix, which is a contiguous block because the batch is the
  outer axis. GroupQueryAttention reads each row's own length from the attention mask (`seqlens_k`).
- A prompt goes in alone (GroupQueryAttention refuses batch > 1 when a call has several tokens and a
  past), in chunks, straight into the first row past the prefix (a one-row view of the same buffers), where
  it then decodes: no copy when it joins (a copy through a staging row took 2-20 ms of a round).
  `move` puts the last row into a finished row's place, so the prefix stays contiguous.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phi_pipeline.bundle.layout import MODEL_FILE
from phi_pipeline.runtime.prefix_cache import KV, Segments, positions

_LORA_INPUT = re.compile(r"lora_[AB]\b")
_ROWS = ".rows"


def is_lora_input(name: str) -> bool:
    """A LoRA weight input of the bundle's graph (not a serving graph's row mask)."""
    return bool(_LORA_INPUT.search(name)) and not name.endswith(_ROWS)


def is_lora_a(name: str) -> bool:
    return is_lora_input(name) and "lora_A" in name


def row_mask_input(lora_a: str) -> str:
    """The serving graph's input that masks the rows of LoRA input `lora_a`'s product."""
    return lora_a + _ROWS


def make_serving_graph(model_dir: Path) -> bytes:
    """The bundle's graph with a row mask input after each LoRA A product (module docstring), serialized;
    its weights stay in the bundle's external data file, which the session reads from `model_dir`."""
    import onnx

    path = model_dir / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    lora_a = {v.name: v for v in graph.input if is_lora_a(v.name)}
    if not lora_a:
        raise ValueError(f"{path} has no LoRA inputs: nothing to serve per row")
    users: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        name = next((i for i in node.input if i in lora_a), None)
        if name is None:
            continue
        if node.op_type != "MatMul" or node.input[1] != name:
            raise ValueError(f"{path}: LoRA input {name} feeds a {node.op_type} ({node.name}), not a MatMul's weight")
        value = lora_a[name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 2:
            raise ValueError(f"{path}: LoRA input {name} has {len(dims)} axes, expected 2")
        product, masked = node.output[0], node.output[0] + "/rows"
        for user in users.get(product, []):
            user.input[:] = [masked if i == product else i for i in user.input]
        nodes.append(onnx.helper.make_node("Mul", [product, row_mask_input(name)], [masked], name=f"{node.name}/rows"))
        rank = dims[1].dim_param or dims[1].dim_value
        graph.input.append(onnx.helper.make_tensor_value_info(
            row_mask_input(name), value.type.tensor_type.elem_type, ["batch_size", 1, rank]))
    del graph.node[:]
    graph.node.extend(nodes)
    # every LoRA input is fed, so the inputs' defaults (rank 0: no adapter) go: an input with a default is an
    # overridable initializer, which IO binding cannot bind
    defaults = [init for init in graph.initializer if is_lora_input(init.name)]
    for init in defaults:
        graph.initializer.remove(init)
    return model.SerializeToString()


def _numpy_float(onnx_type: str) -> type:
    """The numpy type of a float graph input ("tensor(float16)" or "tensor(float)")."""
    return np.float16 if "float16" in onnx_type else np.float32


@dataclass(frozen=True)
class Adapter:
    """One adapter's LoRA weights by graph input name."""

    name: str
    weights: dict[str, np.ndarray]

    def rank(self, name: str) -> int:
        """The rank axis of input `name` (a packed group's is the sum of its projections' ranks)."""
        w = self.weights[name]
        return w.shape[1] if is_lora_a(name) else w.shape[0]


def read_adapter(name: str, path: Path) -> Adapter:
    import onnxruntime

    params = onnxruntime.AdapterFormat.read_adapter(str(path)).get_parameters()
    # copied: the arrays would otherwise view memory the adapter's reader frees
    return Adapter(name, {k: np.array(v.numpy(), copy=True) for k, v in params.items()})


class BatchedDecoder:
    """The serving graph in one onnxruntime session, its KV buffers and the adapters' weights."""

    def __init__(
        self,
        model_dir: Path,
        adapters: dict[str, Path],
        *,
        max_batch: int,
        kv_len: int | None = None,
        threads: int | None = None,
        session_options: dict[str, object] | None = None,
    ):
        """session_options: onnxruntime SessionOptions attributes to set (e.g. enable_profiling for the bench)."""
        import onnxruntime

        self.model_dir = Path(model_dir)
        genai = json.loads((self.model_dir / "genai_config.json").read_text())["model"]
        decoder = genai["decoder"]
        self.layers: int = decoder["num_hidden_layers"]
        self.kv_heads: int = decoder["num_key_value_heads"]
        self.head: int = decoder["head_size"]
        self.vocab_size: int = genai["vocab_size"]
        self.kv_len = min(kv_len or genai["context_length"], genai["context_length"])
        self.max_batch = max_batch
        names = decoder["inputs"]
        self._past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        outs = decoder["outputs"]
        self._present = [(outs["present_key_names"] % i, outs["present_value_names"] % i) for i in range(self.layers)]

        options = onnxruntime.SessionOptions()
        # the graph comes from memory: its external weights are read from the folder model.onnx really is in
        # (onnxruntime refuses weights reached through a link out of the folder it is given)
        weights_dir = (self.model_dir / MODEL_FILE).resolve().parent
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        configured = decoder.get("session_options", {}).get("intra_op_num_threads")
        # as onnxruntime-genai would run this folder (genai.decoder_threads says it): its default is one thread
        options.intra_op_num_threads = threads or (1 if configured is None else configured)
        for key, value in (session_options or {}).items():
            setattr(options, key, value)
        self.session = onnxruntime.InferenceSession(make_serving_graph(self.model_dir), options,
                                                    providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.lora_inputs = sorted(n for n in inputs if is_lora_input(n))
        # [in, r] for A, [r, out] for B: the non-rank axis of each input, read from the graph
        self._lora_dims = {n: inputs[n].shape[0] if is_lora_a(n) else inputs[n].shape[1] for n in self.lora_inputs}
        self._lora_dtype = _numpy_float(inputs[self.lora_inputs[0]].type)
        dtype = self.dtype = _numpy_float(inputs[self._past[0][0]].type)
        shape = (max_batch, self.kv_heads, self.kv_len, self.head)
        # written once here, not left to np.zeros' lazily mapped pages: otherwise the first request to use each
        # row faults its pages in (huge pages zeroed by the kernel) inside its first prompt run, 0.9 s for SmolLM2
        # at 8 rows
        self.kv = [(np.full(shape, 0, dtype), np.full(shape, 0, dtype)) for _ in range(self.layers)]
        self.adapters: dict[str, Adapter] = {}
        self._bindings: dict[tuple[int | None, tuple[str | None, ...]], tuple[object, dict[str, np.ndarray]]] = {}
        self._group_cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        for name, path in adapters.items():
            self.add_adapter(name, path)

    def add_adapter(self, name: str, path: Path) -> None:
        """Read an .onnx_adapter and serve it as `name`; one without weights for every LoRA input of this graph
        (made for another base graph) is refused."""
        adapter = read_adapter(name, path)
        missing = set(self.lora_inputs) - set(adapter.weights)
        if missing:
            raise ValueError(f"adapter {name} ({path}): no weights for {len(missing)} LoRA inputs of this model "
                             f"(e.g. {min(missing)}); it was made for another base graph")
        wrong = [n for n in self.lora_inputs
                 if adapter.weights[n].shape[0 if is_lora_a(n) else 1] != self._lora_dims[n]]
        if wrong:
            raise ValueError(f"adapter {name} ({path}): {len(wrong)} LoRA weights do not fit this model's "
                             f"projections (e.g. {wrong[0]}); it was made for another base graph")
        self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        self._bindings = {k: v for k, v in self._bindings.items() if name not in k[1]}
        self._group_cache = {k: v for k, v in self._group_cache.items() if name not in k}

    # --- LoRA inputs ---------------------------------------------------------------------------

    def _group_weights(self, group: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The LoRA inputs of the adapters in `group` concatenated along the rank axis, in the group's order
        (one adapter's own arrays: no copy)."""
        cached = self._group_cache.get(group)
        if cached is not None:
            return cached
        weights = {}
        for name in self.lora_inputs:
            parts = [self.adapters[a].weights[name] for a in group]
            if len(parts) == 1:
                weights[name] = parts[0]
            elif parts:
                weights[name] = np.concatenate(parts, axis=1 if is_lora_a(name) else 0)
            else:  # only base-model rows: rank 0
                dim = self._lora_dims[name]
                weights[name] = np.zeros((dim, 0) if is_lora_a(name) else (0, dim), self._lora_dtype)
        if len(self._group_cache) >= 8:  # the sets of adapters that share a step: a few, each up to their size
            self._group_cache.clear()
            self._bindings.clear()  # they hold the arrays too: memory stays bounded by the 8 sets
        self._group_cache[group] = weights
        return weights

    def lora_feed(self, rows: Sequence[str | None]) -> dict[str, np.ndarray]:
        """The LoRA inputs for a batch whose row i runs adapter rows[i] (None: the base model): the distinct
        adapters' weights concatenated, and each row's mask."""
        group = tuple(sorted({a for a in rows if a is not None}))
        feed = dict(self._group_weights(group))
        masks: dict[tuple[int, ...], np.ndarray] = {}  # inputs whose adapters' ranks agree share a mask
        for name in self.lora_inputs:
            if not is_lora_a(name):
                continue
            ranks = tuple(self.adapters[a].rank(name) for a in group)
            mask = masks.get(ranks)
            if mask is None:
                starts = dict(zip(group, np.cumsum((0, *ranks[:-1])).tolist()))
                mask = np.zeros((len(rows), 1, sum(ranks)), self._lora_dtype)
                for i, a in enumerate(rows):
                    if a is not None:
                        mask[i, 0, starts[a] : starts[a] + ranks[group.index(a)]] = 1
                masks[ranks] = mask
            feed[row_mask_input(name)] = mask
        return feed

    # --- model runs ----------------------------------------------------------------------------

    def _binding(self, rows: tuple[str | None, ...], prompt_row: int | None) -> Any:
        """An IO binding of the LoRA inputs and KV buffers for a decode step on rows 0..len(rows)-1, or for a
        prompt run in row `prompt_row`; kept while the batch's rows stay the same: binding SmolLM2's 444 of them
        took 1 ms, a tenth of a step."""
        import onnxruntime

        entry = self._bindings.get((prompt_row, rows))
        if entry is not None:
            return entry[0]
        binding = self.session.io_binding()
        binding.bind_output("logits")  # first: outputs come back in the order they were bound
        feed = self.lora_feed(rows)
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        lo, hi = (0, len(rows)) if prompt_row is None else (prompt_row, prompt_row + 1)
        for (past_k, past_v), (present_k, present_v), (k, v) in zip(self._past, self._present, self.kv):
            # one buffer for past and present: GroupQueryAttention writes the new positions in place
            for past, present, buf in ((past_k, present_k, k), (past_v, present_v, v)):
                value = onnxruntime.OrtValue.ortvalue_from_numpy(buf[lo:hi])  # rows are the outer axis: contiguous
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        if len(self._bindings) >= 128:  # batches change as requests come and go: keep the recent ones
            self._bindings.clear()
        # a binding holds raw pointers: the arrays it reads are kept with it (the KV buffers live as long as self)
        self._bindings[(prompt_row, rows)] = (binding, feed)
        return binding

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: Sequence[str | None], prompt_row: int | None) -> np.ndarray:
        binding = self._binding(tuple(rows), prompt_row)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")  # a new array each run, in the place bound first
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # the logits alone: copying every output would copy the KV buffers

    def _check_fits(self, tokens: int) -> None:
        if tokens > self.kv_len:
            raise ValueError(f"{tokens} tokens do not fit the KV cache of {self.kv_len}")

    def prefill(self, ids: Sequence[int], start: int, adapter: str | None, row: int) -> np.ndarray:
        """Feed `ids` at positions start.. of row `row` (the request being prefilled: a row past the decoding
        prefix); the logits of its last position."""
        self._check_fits(start + len(ids))
        mask = np.ones((1, start + len(ids)), np.int64)
        logits = self._run(np.asarray([ids], np.int64), mask, [adapter], prompt_row=row)
        return np.asarray(logits[0, -1], np.float32)

    def warm_up(self) -> None:
        """A prompt run and a decode step of the base model: onnxruntime's first runs allocate and prepare kernels
        (0.7 s for SmolLM2's first prompt), which the server does before it says ready, not in the first client's
        time to first token. What they leave in row 0 is overwritten by later prompts."""
        self._run(np.zeros((1, 8), np.int64), np.ones((1, 8), np.int64), [None], prompt_row=0)
        self._run(np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64), [None], prompt_row=None)

    def snapshot(self, row: int, start: int, length: int) -> KV:
        """Copies of positions start..length-1 of row `row`, for the prefix cache."""
        return [(k[row, :, start:length].copy(), v[row, :, start:length].copy()) for k, v in self.kv]

    def restore(self, segments: Segments, length: int, row: int) -> None:
        """The first `length` positions of a prefix-cache entry into row `row`: a prefill from position `length`
        continues it."""
        self._check_fits(length)
        start = 0
        for segment in segments:
            n = min(positions(segment), length - start)
            if n <= 0:
                break
            for (k, v), (ck, cv) in zip(self.kv, segment, strict=True):
                k[row, :, start : start + n] = ck[:, :n]
                v[row, :, start : start + n] = cv[:, :n]
            start += n

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` positions to row `dst` (keeps the decoding rows a prefix)."""
        for k, v in self.kv:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def decode(self, tokens: Sequence[int], lengths: Sequence[int], adapters: Sequence[str | None]) -> np.ndarray:
        """One step for rows 0..n-1: row i holds lengths[i] tokens and gets tokens[i]; (n, vocab) logits."""
        total = max(lengths) + 1
        self._check_fits(total)
        mask = (np.arange(total)[None, :] <= np.asarray(lengths)[:, None]).astype(np.int64)
        logits = self._run(np.asarray(tokens, np.int64)[:, None], mask, adapters, prompt_row=None)
        return np.asarray(logits[:, -1], np.float32)


class RowSampler:
    """One request's next-token choice from its logits row: greedy, or sampled with temperature, top-k
    and top-p from its own seeded generator (the same seed gives the same tokens on this engine)."""

    def __init__(self, options: dict[str, object], defaults: dict[str, object], seed: int | None):
        """options: Sampling.search_options() of the request ({} for the bundle's defaults); defaults:
        the bundle's genai_config.json search section."""
        resolved = {**defaults, **options} if options else dict(defaults)
        self.greedy = not resolved.get("do_sample", False)
        self.temperature = float(resolved.get("temperature", 1.0) or 1.0)
        self.top_k = int(resolved.get("top_k", 0) or 0)
        self.top_p = float(resolved.get("top_p", 1.0) or 1.0)
        # numpy seeds are non-negative: a negative 64-bit seed is taken as its two's complement
        self.rng = np.random.default_rng(None if seed is None else seed % 2**64)

    def pick(self, logits: np.ndarray, banned: frozenset[int] = frozenset()) -> int:
        if banned:
            logits = logits.copy()
            logits[list(banned)] = -np.inf
        if self.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scaled, kind="stable")
        if 0 < self.top_k < len(order):
            order = order[: self.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:  # the smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
