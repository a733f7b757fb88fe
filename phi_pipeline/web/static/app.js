// The page: loads the bundle (every file checked against manifest.json), one onnxruntime-web session, every
// adapter as tensors; chats with the base model or an adapter, streaming the answer. window.phi is the same
// engine for scripts (the browser test reads greedy answers and logits through it).
import { Bundle } from './bundle.js';
import { Prompts } from './prompts.js';
import { WebModel } from './model.js';

const $ = (id) => document.getElementById(id);
const BUNDLE = new URL('bundle/', location.href).href;
const ORT_BUILDS = { webgpu: 'onnxruntime-web/webgpu', wasm: 'onnxruntime-web/wasm' };

// WebGPU where the browser offers an adapter (with shader-f16 for a float16 graph), else the WASM backend;
// ?backend=wasm|webgpu chooses.
async function chooseBackend(kvDtype) {
  const asked = new URLSearchParams(location.search).get('backend');
  if (asked) return asked;
  const gpu = navigator.gpu && (await navigator.gpu.requestAdapter().catch(() => null));
  return gpu && (kvDtype !== 'float16' || gpu.features.has('shader-f16')) ? 'webgpu' : 'wasm';
}

function setState(state, message) {
  document.body.dataset.state = state;
  $('status').textContent = message;
}

async function start() {
  setState('loading', 'reading the bundle ...');
  const bundle = await Bundle.open(BUNDLE);
  const backend = await chooseBackend(bundle.web.kv_dtype);
  if (!(backend in ORT_BUILDS)) throw new Error(`backend '${backend}': use webgpu or wasm`);
  const ort = await import(ORT_BUILDS[backend]);
  ort.env.wasm.wasmPaths = new URL('vendor/', location.href).href;
  // several threads need SharedArrayBuffer, which only a cross-origin isolated page has (COOP/COEP headers)
  ort.env.wasm.numThreads = crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const prompts = await Prompts.load(bundle);
  const model = await WebModel.load(ort, bundle, backend, (path, got, total) => {
    $('status').textContent = `loading ${path}: ${(got / 1e6).toFixed(1)}${total ? ` of ${(total / 1e6).toFixed(1)}` : ''} MB`;
  });
  const refused = {};
  for (const a of bundle.manifest.adapters.filter((x) => x.file)) {
    try {
      model.addAdapter(a.name, await bundle.bytes(a.file));
    } catch (err) {
      refused[a.name] = err.message;
    }
  }
  return { bundle, prompts, model, backend, threads: ort.env.wasm.numThreads, refused };
}

// Greedy ids after `promptIds`, timed: the first token's time (the prefill) and the decode's tokens/s.
async function timedGenerate(engine, promptIds, adapter, maxNewTokens, { onToken, ignoreEos = false, t0 = performance.now() } = {}) {
  const times = [];
  const tokens = await engine.model.generate(promptIds, adapter, maxNewTokens, (id) => {
    times.push(performance.now());
    onToken?.(id);
  }, ignoreEos);
  return {
    promptIds, tokens, firstTokenMs: times[0] - t0,
    tokensPerSecond: times.length > 1 ? (times.length - 1) / ((times.at(-1) - times[0]) / 1000) : null,
  };
}

// One answer to messages (or an eval row's prompt), streamed to onText. formatAs: the adapter whose prompt
// format applies (default: `adapter`; the evaluation runs the base model on each adapter's prompts).
async function answer(engine, { adapter = null, formatAs = adapter, messages, prompt, maxNewTokens = 128, onText }) {
  const { prompts, model } = engine;
  const t0 = performance.now();  // the first token's time includes formatting and tokenizing
  const text = prompt !== undefined ? prompts.promptFor(prompt, formatAs) : prompts.messagesPrompt(messages, formatAs);
  const shown = [];
  const out = await timedGenerate(engine, prompts.encode(text), adapter, maxNewTokens, {
    t0, onToken: (id) => { if (!model.eos.has(id)) shown.push(id); onText?.(prompts.decode(shown)); },
  });
  return { ...out, text: prompts.decode(shown).trim() };
}

function addLine(role, text) {
  const line = document.createElement('div');
  line.className = role;
  line.textContent = text;
  $('log').append(line);
  return line;
}

function wire(engine) {
  const select = $('adapter');
  select.append(new Option(`${engine.bundle.manifest.pipeline} (base model)`, ''));
  for (const a of engine.bundle.manifest.adapters.filter((x) => x.file)) {
    const option = new Option(a.name in engine.refused ? `${a.name}: refused` : a.name, a.name);
    option.disabled = a.name in engine.refused;
    select.append(option);
  }
  for (const [name, why] of Object.entries(engine.refused)) addLine('error', `adapter ${name} refused: ${why}`);
  let history = [];
  $('new').onclick = () => { history = []; $('log').replaceChildren(); };
  $('form').onsubmit = async (event) => {
    event.preventDefault();
    const content = $('prompt').value.trim();
    if (!content) return;
    $('prompt').value = '';
    $('send').disabled = true;
    addLine('user', content);
    const line = addLine('assistant', '');
    line.dataset.state = 'streaming';
    const adapter = select.value || null;
    line.dataset.model = adapter ?? 'base model';  // shown before the answer, so a chat across adapters reads well
    try {
      const messages = [...history, { role: 'user', content }];
      // the live tokens' text; the finished answer is shown stripped, as the server and the eval compare it
      const out = await answer(engine, { adapter, messages, onText: (text) => { line.textContent = text; } });
      line.textContent = out.text;
      history = [...messages, { role: 'assistant', content: out.text }];
      $('speed').textContent = `${adapter ?? 'base'}: first token ${out.firstTokenMs.toFixed(0)} ms`
        + (out.tokensPerSecond ? `, ${out.tokensPerSecond.toFixed(1)} tokens/s` : '');
    } catch (err) {
      line.className = 'error';
      line.textContent = err.message;
    }
    line.dataset.state = 'done';
    $('send').disabled = false;
  };
}

start().then((engine) => {
  window.phi = {
    backend: engine.backend, threads: engine.threads, refused: engine.refused,
    answer: (request) => answer(engine, request),
    generateIds: (ids, adapter, maxNewTokens, options) => timedGenerate(engine, ids, adapter, maxNewTokens, options),
    nextLogits: async (ids, adapter) => Array.from(await engine.model.nextLogits(ids, adapter)),
  };
  wire(engine);
  setState('ready', `${engine.bundle.manifest.pipeline} ${engine.bundle.manifest.precision} on ${engine.backend === 'webgpu' ? 'WebGPU' : `WASM, ${engine.threads} thread${engine.threads > 1 ? 's' : ''}`}`);
}).catch((err) => {
  setState('failed', err.message);
  throw err;
});
