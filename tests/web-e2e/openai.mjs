// Drives the dashboard's OpenAI-compatible API with the official `openai` SDK, as any
// tool built on it would: list models, chat (plain, streamed, seeded twice), a
// completion, and the refusals (bad key, unknown model, over-long prompt). Prints one
// JSON line with what it saw; cli/tests/openai_api.rs asserts on it.
//
// Environment: BASE_URL (http://host:port/v1), API_KEY, PROMPT, MAX_TOKENS.
import OpenAI from "openai";

const env = (k) => {
  const v = process.env[k];
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const baseURL = env("BASE_URL");
const prompt = env("PROMPT");
const maxTokens = Number(env("MAX_TOKENS"));
const client = new OpenAI({ baseURL, apiKey: env("API_KEY"), maxRetries: 0 });
const result = {};

// The status and error body an SDK call was refused with.
const refusal = async (call) => {
  try {
    await call();
    return { status: 0 };
  } catch (e) {
    return { status: e.status, type: e.type ?? null, code: e.code ?? null, param: e.param ?? null, message: e.message };
  }
};

try {
  const models = await client.models.list();
  result.models = models.data.map((m) => m.id);
  const model = result.models[0];
  const messages = [{ role: "user", content: prompt }];

  const t0 = performance.now();
  const greedy = await client.chat.completions.create({ model, messages, max_tokens: maxTokens, temperature: 0 });
  result.greedy_ms = performance.now() - t0;
  result.greedy = {
    text: greedy.choices[0].message.content,
    role: greedy.choices[0].message.role,
    finish_reason: greedy.choices[0].finish_reason,
    usage: greedy.usage,
    object: greedy.object,
  };

  // Streamed: the deltas, and when each arrived (decode throughput).
  const stream = await client.chat.completions.create({
    model, messages, max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  const arrivals = [];
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta?.content) {
        text += c.delta.content;
        arrivals.push(performance.now());
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  const span = arrivals.length > 1 ? arrivals[arrivals.length - 1] - arrivals[0] : 0;
  result.stream = {
    text, chunks: arrivals.length, finish_reason: finish, usage,
    decode_tokens_per_s: span > 0 && usage ? ((usage.completion_tokens - 1) * 1000) / span : null,
  };

  const seeded = () => client.chat.completions.create({ model, messages, max_tokens: maxTokens, temperature: 1.0, top_p: 0.9, seed: 1234 });
  const [a, b] = [await seeded(), await seeded()];
  result.seeded = [a.choices[0].message.content, b.choices[0].message.content];

  const completion = await client.completions.create({ model, prompt, max_tokens: 8, temperature: 0 });
  result.completion = { text: completion.choices[0].text, object: completion.object, usage: completion.usage };

  const badKey = new OpenAI({ baseURL, apiKey: "unfed-sk-not-a-key", maxRetries: 0 });
  result.bad_key = await refusal(() => badKey.chat.completions.create({ model, messages, max_tokens: 4 }));
  result.unknown_model = await refusal(() => client.chat.completions.create({ model: "no-such-model", messages, max_tokens: 4 }));
  result.long_prompt = await refusal(() => client.chat.completions.create({
    model, messages: [{ role: "user", content: "word ".repeat(2000) }], max_tokens: 4,
  }));
  result.n2 = await refusal(() => client.chat.completions.create({ model, messages, max_tokens: 4, n: 2 }));
} catch (e) {
  result.error = String(e?.stack ?? e);
}
console.log(JSON.stringify(result));
