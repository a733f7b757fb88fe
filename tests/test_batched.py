"""The batched decoder (runtime/batched.py): per-row adapters of any rank, the KV rows' bookkeeping and
the sampler, on the tiny random multi-adapter bundle, against the bundle's own graph run one request at a
time by plain onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phi_pipeline.runtime.batched import BatchedDecoder, RowSampler, make_serving_graph, read_adapter
from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER, write_random_adapter

RANK8 = "rank8"


@pytest.fixture(scope="module")
def adapters(random_bundle, tmp_path_factory) -> dict[str, Path]:
    files = {a: random_bundle / "adapters" / f"{a}.onnx_adapter" for a in (CHAT_ADAPTER, TEMPLATE_ADAPTER)}
    files[RANK8] = write_random_adapter(files[CHAT_ADAPTER], tmp_path_factory.mktemp("rank8") / "r8.onnx_adapter", 8, 1)
    return files


@pytest.fixture(scope="module")
def reference(random_bundle, adapters):
    """The bundle's unchanged graph, one request at a time: (ids, adapter) -> logits of every position."""
    import onnxruntime

    import json

    session = onnxruntime.InferenceSession(str(random_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    config = json.loads((random_bundle / "genai_config.json").read_text())["model"]["decoder"]
    inputs = session.get_inputs()
    weights = {name: read_adapter(name, path).weights for name, path in adapters.items()}
    lora = [i for i in session.get_overridable_initializers() if "lora" in i.name]

    def run(ids, adapter):
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for i in inputs:
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        if adapter is not None:
            feed.update(weights[adapter])
        else:
            feed.update({i.name: np.zeros([0 if isinstance(d, str) else d for d in i.shape], np.float32) for i in lora})
        return session.run(["logits"], feed)[0][0]

    return run


@pytest.fixture(scope="module")
def decoder(random_bundle, adapters):
    return BatchedDecoder(random_bundle, adapters, max_batch=4, kv_len=64, threads=1)


def _prefill(decoder, row, ids, adapter, chunk=5):
    for start in range(0, len(ids), chunk):
        logits = decoder.prefill(ids[start : start + chunk], start, adapter, row)
    return logits


def test_serving_graph_masks_each_lora_product_by_row_and_keeps_no_default(random_bundle):
    import onnx

    graph = onnx.load_model_from_string(make_serving_graph(random_bundle)).graph
    lora_a = [i.name for i in graph.input if i.name.endswith("lora_A.MatMul.weight")]
    masks = {i.name: i for i in graph.input if i.name.endswith(".rows")}
    assert lora_a and set(masks) == {f"{a}.rows" for a in lora_a}
    assert all([d.dim_param or d.dim_value for d in m.type.tensor_type.shape.dim][:2] == ["batch_size", 1]
               for m in masks.values())
    muls = {n.input[1]: n for n in graph.node if n.op_type == "Mul" and n.input[1] in masks}
    producers = {o: n for n in graph.node for o in n.output}
    for a in lora_a:  # the mask multiplies x @ A, and the B product reads the masked rows
        product = producers[muls[f"{a}.rows"].input[0]]
        assert product.op_type == "MatMul" and product.input[1] == a
        assert [n.op_type for n in graph.node if muls[f"{a}.rows"].output[0] in n.input] == ["MatMul"]
    assert not [i for i in graph.initializer if "lora" in i.name]


def test_rows_of_different_ranks_and_the_base_decode_as_each_alone(decoder, reference):
    rows = [([5, 17, 99, 12, 7, 300, 2], RANK8), ([9, 8, 7], TEMPLATE_ADAPTER), ([40, 41, 42, 43, 44], None),
            ([3, 1, 4, 1, 5, 9], CHAT_ADAPTER)]
    tokens = [[5], [6], [7], [8]]
    for row, (ids, adapter) in enumerate(rows):
        first = _prefill(decoder, row, ids, adapter)
        np.testing.assert_allclose(first, reference(ids, adapter)[-1], atol=1e-4)
    lengths = [len(ids) for ids, _ in rows]
    for _ in range(3):
        logits = decoder.decode([t[-1] for t in tokens], lengths, [a for _, a in rows])
        for i, (ids, adapter) in enumerate(rows):
            alone = reference(ids + tokens[i], adapter)[-1]
            np.testing.assert_allclose(logits[i], alone, atol=1e-4, err_msg=f"row {i} ({adapter})")
            lengths[i] += 1
            tokens[i].append(int(np.argmax(logits[i])))


def test_a_moved_row_keeps_its_cache_and_the_batch_shrinks(decoder, reference):
    rows = [([11, 12, 13], CHAT_ADAPTER), ([21, 22, 23, 24], None), ([31, 32], RANK8)]
    for row, (ids, adapter) in enumerate(rows):
        _prefill(decoder, row, ids, adapter)
    # row 0 leaves: the last row takes its place, and the batch is rows 0..1
    decoder.move(2, 0, len(rows[2][0]))
    kept = [rows[2], rows[1]]
    logits = decoder.decode([7, 7], [len(kept[0][0]), len(kept[1][0])], [kept[0][1], kept[1][1]])
    for i, (ids, adapter) in enumerate(kept):
        np.testing.assert_allclose(logits[i], reference(ids + [7], adapter)[-1], atol=1e-4)


def test_a_prompt_going_in_past_the_batch_leaves_the_decoding_rows_alone(decoder, reference):
    """A prompt is prefilled in chunks straight into the row past the decoding ones, between their steps:
    their logits stay each row's alone, and the new row then decodes in place."""
    rows = [([5, 6, 7], RANK8), ([1, 2, 3, 4], None)]
    for row, (ids, adapter) in enumerate(rows):
        _prefill(decoder, row, ids, adapter)
    prompt, tokens, lengths = [9, 8, 7, 6, 5, 4, 3], [[7], [7]], [3, 4]
    for start in range(0, len(prompt), 3):  # a chunk, then a step of the two rows
        first = decoder.prefill(prompt[start : start + 3], start, CHAT_ADAPTER, 2)
        logits = decoder.decode([t[-1] for t in tokens], lengths, [a for _, a in rows])
        for i, (ids, adapter) in enumerate(rows):
            np.testing.assert_allclose(logits[i], reference(ids + tokens[i], adapter)[-1], atol=1e-4)
            lengths[i] += 1
            tokens[i].append(4)
    np.testing.assert_allclose(first, reference(prompt, CHAT_ADAPTER)[-1], atol=1e-4)
    rows.append((prompt, CHAT_ADAPTER))
    tokens.append([4])
    lengths.append(len(prompt))
    logits = decoder.decode([t[-1] for t in tokens], lengths, [a for _, a in rows])
    for i, (ids, adapter) in enumerate(rows):
        np.testing.assert_allclose(logits[i], reference(ids + tokens[i], adapter)[-1], atol=1e-4, err_msg=f"row {i}")


def test_a_prefix_kept_in_segments_restores_into_another_row_as_if_prefilled_there(decoder, reference):
    """The prefix cache keeps a conversation as segments (the restored entry's, then the new positions): restoring
    them, whole or up to a position inside a later segment, and prefilling the rest gives the logits of the
    whole prompt prefilled at once."""
    ids = [5, 17, 99, 12, 7, 300, 2, 8]
    _prefill(decoder, 0, ids, RANK8)
    segments = (decoder.snapshot(0, 0, 3), decoder.snapshot(0, 3, len(ids)))
    for reused in (len(ids) - 1, 5):
        decoder.restore(segments, reused, 1)
        logits = decoder.prefill(ids[reused:], reused, RANK8, 1)
        np.testing.assert_allclose(logits, reference(ids, RANK8)[-1], atol=1e-4, err_msg=f"{reused} restored")


def test_grouped_lora_inputs_read_each_adapter_once_and_mask_rows_by_adapter(decoder):
    feed = decoder.lora_feed([CHAT_ADAPTER, None, RANK8, CHAT_ADAPTER])
    name = next(k for k in feed if k.endswith("lora_A.MatMul.weight"))
    chat, rank8 = (decoder.adapters[a].weights[name] for a in (CHAT_ADAPTER, RANK8))
    # the distinct adapters side by side along the rank axis, in name order (chat's rank 4, then rank 8)
    np.testing.assert_array_equal(feed[name], np.concatenate([chat, rank8], axis=1))
    mask = feed[f"{name}.rows"][:, 0]
    np.testing.assert_array_equal(mask, [[1] * 4 + [0] * 8, [0] * 12, [0] * 4 + [1] * 8, [1] * 4 + [0] * 8])
    # one adapter for every row: its own arrays, no copy; only base rows: rank 0
    alone = decoder.lora_feed([RANK8, RANK8])
    assert alone[name] is rank8 and alone[f"{name}.rows"].all()
    assert decoder.lora_feed([None])[name].shape == (chat.shape[0], 0)


def test_grouped_rows_equal_each_row_alone_across_steps_and_a_batch_change(decoder, reference):
    """Grouped rows equal padded rows: a step of rows with different adapters (grouped) gives each row the
    logits of its adapter's batch of one (nothing to pad), on a reused binding and after the batch changes."""
    rows = [([8, 9, 10], RANK8), ([8, 9, 10], CHAT_ADAPTER), ([8, 9, 10], None), ([8, 9, 10], RANK8)]
    for row, (ids, adapter) in enumerate(rows):
        _prefill(decoder, row, ids, adapter)
    for step in range(2):  # the second step reuses the first's binding
        logits = decoder.decode([4] * 4, [3] * 4, [a for _, a in rows])
        for i, (ids, adapter) in enumerate(rows):
            np.testing.assert_allclose(logits[i], reference(ids + [4], adapter)[-1], atol=1e-4,
                                       err_msg=f"step {step}, row {i} ({adapter})")
    logits = decoder.decode([4] * 2, [3] * 2, [RANK8, CHAT_ADAPTER])
    np.testing.assert_allclose(logits[1], reference([8, 9, 10, 4], CHAT_ADAPTER)[-1], atol=1e-4)


def test_sampler_is_greedy_by_the_bundles_default_and_repeats_with_a_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert RowSampler({}, {"do_sample": False}, None).pick(logits) == 1
    assert RowSampler({"do_sample": False}, {"do_sample": True}, 3).pick(logits) == 1
    assert RowSampler({}, {}, None).pick(logits, banned=frozenset({1})) == 2  # min_tokens bans end-of-text
    sampled = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    draws = [RowSampler(sampled, {}, 2**63 + 5) for _ in range(2)]
    assert [draws[0].pick(logits) for _ in range(20)] == [draws[1].pick(logits) for _ in range(20)]
    assert {RowSampler({**sampled, "top_k": 1}, {}, s).pick(logits) for s in range(10)} == {1}
    assert {RowSampler({**sampled, "top_p": 0.5}, {}, s).pick(logits) for s in range(10)} == {1}
    assert len({RowSampler(sampled, {}, s).pick(logits) for s in range(40)}) > 1
