// Text in, token ids out, as the Python runtime does it (phi_pipeline/runtime/genai.py, BundleModel):
// chat adapters and the base model get the chat template, text-template adapters the last user message put
// into their training template; the tokenizer is the bundle's tokenizer.json.
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';

const FORMAT_TOKEN = /\{\{|\}\}|\{(\w*)\}/g;

export class PromptError extends Error {}

export class Prompts {
  constructor(tokenizerJson, tokenizerConfig, chatTemplate, adapters) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.config = tokenizerConfig;
    this.template = new Template(chatTemplate);
    this.formats = new Map(adapters.map((a) => [a.name, a.prompt_format]));
  }

  static async load(bundle) {
    const config = await bundle.json('tokenizer_config.json');
    const template = bundle.has('chat_template.jinja') ? await bundle.text('chat_template.jinja') : config.chat_template;
    if (!template) throw new PromptError('the bundle has no chat template (chat_template.jinja or tokenizer_config.json)');
    const adapters = bundle.manifest.adapters.filter((a) => a.file);
    return new Prompts(await bundle.json('tokenizer.json'), config, template, adapters);
  }

  format(adapter) {
    return this.formats.get(adapter ?? '') ?? { type: 'chat' };
  }

  chat(messages) {
    const special = (name) => (typeof this.config[name] === 'object' ? this.config[name]?.content : this.config[name]);
    return this.template.render({
      messages, add_generation_prompt: true,
      bos_token: special('bos_token') ?? '', eos_token: special('eos_token') ?? '',
    });
  }

  // The exact text the adapter saw in training before its answer (an eval row's prompt: messages or text).
  promptFor(examplePrompt, adapter) {
    if (Array.isArray(examplePrompt)) return this.chat(examplePrompt);
    const bos = this.format(adapter).bos;
    return bos ? `${bos} ${examplePrompt}` : examplePrompt;
  }

  // A chat as the adapter was trained: the chat template, or the template adapter's one field filled.
  messagesPrompt(messages, adapter) {
    const fmt = this.format(adapter);
    if (fmt.type === 'chat') return this.chat(messages);
    const users = messages.filter((m) => m.role === 'user').map((m) => m.content);
    if (!users.length) throw new PromptError(`adapter '${adapter}' is a text-template adapter; give a user message for its template`);
    // str.format's grammar: {{ and }} are braces, {name} a field
    const fields = [...fmt.prefix.matchAll(FORMAT_TOKEN)].map((m) => m[1]).filter(Boolean);
    if (new Set(fields).size !== 1) throw new PromptError(`adapter '${adapter}' formats several fields [${fields}]`);
    const text = fmt.prefix.replace(FORMAT_TOKEN, (token, field) => (field !== undefined ? users.at(-1) : token[0]));
    return this.promptFor(text, adapter);
  }

  encode(text) {
    return this.tokenizer.encode(text).ids;
  }

  decode(ids) {  // the tokenizer refuses an empty list: an answer that is only the end token is empty
    return ids.length ? this.tokenizer.decode(ids, { skip_special_tokens: true }) : '';
  }
}
