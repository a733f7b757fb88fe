// The web graph on onnxruntime-web: one session for the page's life; an adapter is a set of LoRA input
// tensors, so switching adapters swaps feeds, never the session. Greedy decoding as the Python runtime
// does it (a prefill of the prompt, then one token a run; the KV cache passed from present to past).
import { readAdapter } from './adapter_format.js';

export class AdapterMismatch extends Error {}

const HALF = (() => {  // float16 bits -> float32, for argmax over float16 logits
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    table[h] = exp === 0 ? sign * 2 ** -14 * (frac / 1024)
      : exp === 31 ? (frac ? NaN : sign * Infinity) : sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }
  return table;
})();

// The logits of position `row` as float32.
export function logitsRow(tensor, row) {
  const vocab = tensor.dims.at(-1);
  const data = tensor.data.subarray(row * vocab, (row + 1) * vocab);
  return data instanceof Uint16Array ? Float32Array.from(data, (h) => HALF[h]) : Float32Array.from(data);
}

function argmax(values) {  // the first maximum, as onnxruntime-genai's greedy search takes it
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

const TYPED = { float32: Float32Array, float16: Uint16Array };

export class WebModel {
  constructor(ort, session, genai, web, backend) {
    this.ort = ort;
    this.session = session;
    this.backend = backend;
    this.web = web;
    const decoder = genai.model.decoder;
    this.layers = decoder.num_hidden_layers;
    this.kvHeads = decoder.num_key_value_heads;
    this.headSize = decoder.head_size;
    this.names = { ...decoder.inputs, ...decoder.outputs };
    this.eos = new Set([genai.model.eos_token_id].flat());
    this.contextLength = genai.model.context_length;
    this.usesPositionIds = session.inputNames.includes(decoder.inputs.position_ids ?? 'position_ids');
    this.adapters = new Map([[null, this.zeroLora()]]);  // null: the base model
  }

  static async load(ort, bundle, backend, onProgress) {
    const genai = await bundle.json('genai_config.json');
    const externalData = [];
    for (const path of bundle.web.external_data) {
      externalData.push({ path, data: await bundle.bytes(path, (got, total) => onProgress?.(path, got, total)) });
    }
    const graph = await bundle.bytes(bundle.web.graph);
    const session = await ort.InferenceSession.create(graph, {
      executionProviders: [backend], externalData, graphOptimizationLevel: 'all',
    });
    const missing = Object.keys(bundle.web.lora_inputs).filter((n) => !session.inputNames.includes(n));
    if (missing.length) throw new AdapterMismatch(`${bundle.web.graph}: LoRA inputs are not required inputs (${missing[0]}, ...)`);
    return new WebModel(ort, session, genai, bundle.web, backend);
  }

  // Zeros of rank 1 for every LoRA input: the base model (rank 0 fails on WebGPU, onnxruntime #22987).
  zeroLora() {
    const feeds = {};
    for (const [name, { shape, dtype }] of Object.entries(this.web.lora_inputs)) {
      const dims = shape.map((d) => (typeof d === 'number' ? d : 1));
      feeds[name] = new this.ort.Tensor(dtype, new TYPED[dtype](dims.reduce((a, b) => a * b, 1)), dims);
    }
    return feeds;
  }

  // Problems that keep an adapter's weights from this graph (phi_pipeline/bundle/adapters.py, check_adapter_fits).
  static fitProblems(parameters, loraInputs) {
    const problems = [];
    for (const name of parameters.keys()) if (!(name in loraInputs)) problems.push(`${name}: not an input of the model`);
    const ranks = new Map();
    for (const [name, { shape, dtype }] of Object.entries(loraInputs)) {
      const p = parameters.get(name);
      if (!p) { problems.push(`${name}: model input with no weight in the adapter`); continue; }
      if (p.type !== dtype) problems.push(`${name}: ${p.type}, the model expects ${dtype}`);
      if (p.dims.length !== shape.length || shape.some((d, i) => typeof d === 'number' && d !== p.dims[i])) {
        problems.push(`${name}: shape [${p.dims}], the model expects [${shape}]`);
      }
      const axis = name.includes('lora_A') ? shape.length - 1 : 0;
      ranks.set(shape[axis], new Set([...(ranks.get(shape[axis]) ?? []), p.dims[axis]]));
    }
    for (const [dim, found] of ranks) if (found.size > 1) problems.push(`LoRA rank differs between weights on ${dim}: ${[...found]}`);
    return problems;
  }

  // Read an .onnx_adapter file's bytes into feeds for this graph, refusing one made for another graph.
  addAdapter(name, bytes) {
    const { parameters } = readAdapter(bytes);
    const problems = WebModel.fitProblems(parameters, this.web.lora_inputs);
    if (problems.length) throw new AdapterMismatch(`adapter '${name}' does not fit this model: ${problems.slice(0, 3).join('; ')}`);
    const feeds = {};
    for (const [key, p] of parameters) feeds[key] = new this.ort.Tensor(p.type, p.data, p.dims);
    this.adapters.set(name, feeds);
  }

  emptyPast() {
    const feeds = {}, dtype = this.web.kv_dtype;
    for (let i = 0; i < this.layers; i++) {
      for (const kind of ['key', 'value']) {
        const name = this.names[kind === 'key' ? 'past_key_names' : 'past_value_names'].replace('%d', i);
        feeds[name] = new this.ort.Tensor(dtype, new TYPED[dtype](0), [1, this.kvHeads, 0, this.headSize]);
      }
    }
    return feeds;
  }

  // One run over `ids` after `past` (positions start..start+n-1): {logits, past}.
  async forward(ids, start, past, lora) {
    const T = this.ort.Tensor, total = start + ids.length;
    const feeds = {
      ...lora, ...past,
      [this.names.input_ids]: new T('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
      [this.names.attention_mask]: new T('int64', new BigInt64Array(total).fill(1n), [1, total]),
    };
    if (this.usesPositionIds) {
      feeds[this.names.position_ids ?? 'position_ids'] = new T('int64', BigInt64Array.from(ids, (_, i) => BigInt(start + i)), [1, ids.length]);
    }
    const out = await this.session.run(feeds);
    const next = {};
    for (let i = 0; i < this.layers; i++) {
      for (const [p, q] of [['past_key_names', 'present_key_names'], ['past_value_names', 'present_value_names']]) {
        next[this.names[p].replace('%d', i)] = out[this.names[q].replace('%d', i)];
      }
    }
    return { logits: out[this.names.logits], past: next };
  }

  lora(adapter) {
    const feeds = this.adapters.get(adapter ?? null);
    if (!feeds) throw new AdapterMismatch(`no adapter '${adapter}' in this page`);
    return feeds;
  }

  // The next-token logits after `ids` (float32, one run): what the equality test reads at a differing token.
  async nextLogits(ids, adapter) {
    const { logits } = await this.forward(ids, 0, this.emptyPast(), this.lora(adapter));
    return logitsRow(logits, logits.dims[1] - 1);
  }

  // Greedy new tokens after `promptIds`, the end token included when one comes (ignoreEos: go on past it, as
  // the benchmark decodes a fixed count); onToken(id) after each.
  async generate(promptIds, adapter, maxNewTokens, onToken, ignoreEos = false) {
    const lora = this.lora(adapter);
    const limit = Math.min(maxNewTokens, this.contextLength - promptIds.length);
    const tokens = [];
    let past = this.emptyPast(), ids = promptIds, start = 0;
    while (tokens.length < limit) {
      const step = await this.forward(ids, start, past, lora);
      const token = argmax(logitsRow(step.logits, step.logits.dims[1] - 1));
      start += ids.length;
      past = step.past;
      tokens.push(token);
      onToken?.(token);
      if (this.eos.has(token) && !ignoreEos) break;
      ids = [token];
    }
    return tokens;
  }
}
