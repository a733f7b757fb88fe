// The bundle's files as the page reads them: each checked against the sha256 that manifest.json lists
// before it is used (the manifest itself is what `phi-pipeline verify` checks against the signature).

export class BundleError extends Error {}

const hex = (buffer) => Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');

export class Bundle {
  constructor(base, manifest, web) {
    this.base = base;  // URL of the bundle folder, ending in '/'
    this.manifest = manifest;
    this.web = web;  // web.json: the web graph, its external data, the LoRA inputs (phi_pipeline/bundle/web.py)
    this.files = manifest.files || {};
  }

  static async open(base) {
    const response = await fetch(base + 'manifest.json', { cache: 'no-store' });
    if (!response.ok) throw new BundleError(`manifest.json: HTTP ${response.status}; is ${base} a phi-pipeline bundle?`);
    const manifest = await response.json();
    const bundle = new Bundle(base, manifest, null);
    if (!('web.json' in bundle.files)) {
      throw new BundleError(`this ${manifest.target} bundle has no web graph (web.json); publish it for --target webgpu or cpu`);
    }
    bundle.web = JSON.parse(await bundle.text('web.json'));
    return bundle;
  }

  // The file's bytes, refused unless they hash to what the manifest lists.
  async bytes(path, onProgress) {
    const expected = this.files[path];
    if (!expected) throw new BundleError(`${path}: not listed in the bundle's manifest.json`);
    if (!globalThis.crypto?.subtle) {
      throw new BundleError('this page needs a secure context (https, or http://localhost / 127.0.0.1) to check the bundle\'s sha256 digests');
    }
    const response = await fetch(this.base + path, { cache: 'no-store' });
    if (!response.ok) throw new BundleError(`${path}: HTTP ${response.status}`);
    const buffer = await readAll(response, onProgress);
    if (hex(await crypto.subtle.digest('SHA-256', buffer)) !== expected) {
      throw new BundleError(`${path}: sha256 differs from the bundle's manifest (modified or corrupted); run phi-pipeline verify on the bundle`);
    }
    return new Uint8Array(buffer);
  }

  async text(path) {
    return new TextDecoder().decode(await this.bytes(path));
  }

  async json(path) {
    return JSON.parse(await this.text(path));
  }

  has(path) {
    return path in this.files;
  }
}

async function readAll(response, onProgress) {
  const total = Number(response.headers.get('content-length')) || 0;
  if (!onProgress || !response.body) return response.arrayBuffer();
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    onProgress(received, total);
  }
  const out = new Uint8Array(received);
  let at = 0;
  for (const chunk of chunks) { out.set(chunk, at); at += chunk.length; }
  return out.buffer;
}
