// The official SDKs (openai, @anthropic-ai/sdk, ollama from the npm registry), pointed at
// tokenfuse's LLM proxy. Each scenario prints one JSON line of what the client saw; the C++ test
// that runs it (tests/integration/proxy_sdk_test.cc) checks that and what the ledger booked.
//
//   node scenarios.mjs <scenario>      with PROXY=http://127.0.0.1:<port>/proxy
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { Ollama } from 'ollama';

const proxy = process.env.PROXY;
const tenant = process.env.TENANT ?? 'acme';
const labels = { 'X-Tokenfuse-Project': tenant, 'X-Tokenfuse-Run': process.env.RUN ?? 'run-1' };

const openai = (extra = {}) =>
  new OpenAI({ baseURL: `${proxy}/openai/v1`, apiKey: process.env.API_KEY ?? 'unused', defaultHeaders: labels, ...extra });
const anthropic = () => new Anthropic({ baseURL: `${proxy}/anthropic`, apiKey: 'unused', defaultHeaders: labels });
const ollama = () => new Ollama({ host: `${proxy}/ollama`, headers: labels });
const messages = [{ role: 'user', content: 'Say something.' }];

// What an SDK error says: its class, status and the tokenfuse code it carries.
function failure(e) {
  return {
    error: e.constructor.name,
    status: e.status ?? e.status_code ?? null,
    code: e.code ?? e.error?.error?.code ?? e.error?.code ?? null,
    message: String(e.message ?? e.error),
  };
}

async function collect(stream, text) {
  const out = { text: '', chunks: 0 };
  try {
    for await (const chunk of stream) {
      const piece = text(chunk);
      if (piece) {
        out.text += piece;
        out.chunks += 1;
      }
    }
  } catch (e) {
    out.failure = failure(e);
  }
  return out;
}

const scenarios = {
  async openai_whole() {
    const r = await openai().chat.completions.create({ model: 'gpt-4o', messages });
    return { text: r.choices[0].message.content, usage: r.usage, model: r.model };
  },
  async openai_stream() {
    const s = await openai().chat.completions.create({ model: 'gpt-4o', messages, stream: true });
    let usage_chunks = 0;
    const out = await collect(s, (c) => {
      if (c.choices.length === 0) usage_chunks += 1;
      return c.choices[0]?.delta?.content;
    });
    return { ...out, usage_chunks };
  },
  async openai_stream_usage() {   // a client that asks for usage itself gets it
    const s = await openai().chat.completions.create({
      model: 'gpt-4o', messages, stream: true, stream_options: { include_usage: true } });
    let usage = null;
    const out = await collect(s, (c) => {
      if (c.usage) usage = c.usage;
      return c.choices[0]?.delta?.content;
    });
    return { ...out, usage };
  },
  async openai_denied() {
    try {
      await openai().chat.completions.create({ model: 'gpt-4o', messages });
      return { error: null };
    } catch (e) {
      return failure(e);
    }
  },
  async openai_embeddings() {
    const r = await openai().embeddings.create({ model: 'text-embedding-3-small', input: 'hello' });
    return { dims: r.data[0].embedding.length, usage: r.usage };
  },
  async openai_responses_stream() {
    const s = await openai().responses.create({ model: 'gpt-4o', input: 'Say something.', stream: true });
    return collect(s, (e) => (e.type === 'response.output_text.delta' ? e.delta : ''));
  },
  async openai_models() {
    const page = await openai().models.list();
    return { ids: page.data.map((m) => m.id) };
  },
  // Reads `STOP_AFTER` chunks, then aborts: the client goes away mid-stream.
  async openai_disconnect() {
    const controller = new AbortController();
    const s = await openai().chat.completions.create({ model: 'gpt-4o', messages, stream: true }, { signal: controller.signal });
    const stopAfter = Number(process.env.STOP_AFTER ?? 3);
    let chunks = 0, text = '';
    try {
      for await (const c of s) {
        const piece = c.choices[0]?.delta?.content;
        if (piece) { text += piece; chunks += 1; }
        if (chunks === stopAfter) controller.abort();
      }
    } catch (e) {
      return { chunks, text, aborted: e.constructor.name };
    }
    return { chunks, text, aborted: null };
  },
  async openai_key() {   // API_KEY is a virtual key: it names the tenant
    try {
      const r = await new OpenAI({ baseURL: `${proxy}/openai/v1`, apiKey: process.env.API_KEY })
        .chat.completions.create({ model: 'gpt-4o', messages });
      return { text: r.choices[0].message.content };
    } catch (e) {
      return failure(e);
    }
  },
  // CALLS streamed calls at once; each reports what it received and how it ended.
  async openai_concurrent() {
    const calls = Number(process.env.CALLS ?? 200);
    const client = openai({ maxRetries: 0 });
    const one = async () => {
      try {
        const s = await client.chat.completions.create({ model: 'gpt-4o', messages, stream: true });
        return await collect(s, (c) => c.choices[0]?.delta?.content);
      } catch (e) {
        return { text: '', chunks: 0, failure: failure(e) };
      }
    };
    const results = await Promise.all(Array.from({ length: calls }, one));
    const outcome = (r) => (r.failure ? `${r.chunks > 0 ? 'cut' : 'denied'}:${r.failure.code}` : 'whole');
    const outcomes = {};
    for (const r of results) outcomes[outcome(r)] = (outcomes[outcome(r)] ?? 0) + 1;
    return { tokens: results.reduce((n, r) => n + r.chunks, 0), outcomes };
  },
  async anthropic_whole() {
    const r = await anthropic().messages.create({ model: 'claude-test', max_tokens: 100, messages });
    return { text: r.content[0].text, usage: r.usage };
  },
  async anthropic_stream() {
    const max_tokens = Number(process.env.MAX_TOKENS ?? 1000);
    const s = await anthropic().messages.create({ model: 'claude-test', max_tokens, messages, stream: true });
    return collect(s, (e) => (e.type === 'content_block_delta' ? e.delta.text : ''));
  },
  async anthropic_denied() {
    try {
      await anthropic().messages.create({ model: 'claude-test', max_tokens: 100, messages });
      return { error: null };
    } catch (e) {
      return { ...failure(e), type: e.error?.error?.type ?? null };
    }
  },
  async ollama_whole() {
    const r = await ollama().chat({ model: 'llama3.2', messages });
    return { text: r.message.content, prompt_eval_count: r.prompt_eval_count, eval_count: r.eval_count };
  },
  async ollama_stream() {
    const s = await ollama().chat({ model: 'llama3.2', messages, stream: true });
    return collect(s, (p) => p.message?.content);
  },
  async ollama_generate_stream() {
    const s = await ollama().generate({ model: 'llama3.2', prompt: 'Say something.', stream: true });
    return collect(s, (p) => p.response);
  },
  async ollama_denied() {
    try {
      await ollama().chat({ model: 'llama3.2', messages });
      return { error: null };
    } catch (e) {
      return failure(e);
    }
  },
  async ollama_tags() {
    const r = await ollama().list();
    return { names: r.models.map((m) => m.name) };
  },
};

const name = process.argv[2];
if (!scenarios[name]) {
  console.error(`no scenario "${name}"; there are: ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await scenarios[name]()));
} catch (e) {
  console.log(JSON.stringify({ uncaught: failure(e) }));
}
