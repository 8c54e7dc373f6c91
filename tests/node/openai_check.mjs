// The official openai Node SDK against a running mlx-engine server: a chat completion, a
// streamed one, and the activations extension (extra body fields on chat, and the
// /chat/completions/with_activations route). Prints one JSON object for the Python test to check.
import OpenAI from "openai";

const { MLX_BASE_URL, MLX_API_KEY, MLX_MODEL } = process.env;
const client = new OpenAI({ baseURL: MLX_BASE_URL, apiKey: MLX_API_KEY, maxRetries: 0, timeout: 60000 });
const messages = [{ role: "user", content: "Write the json encoder." }];
const hooks = [{ layer_name: 1, component: "residual" }];

const chat = await client.chat.completions.create({ model: MLX_MODEL, messages, max_tokens: 12, temperature: 0 });

const stream = await client.chat.completions.create({ model: MLX_MODEL, messages, max_tokens: 12, temperature: 0, stream: true });
const deltas = [];
let streamFinish = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    if (choice.delta?.content) deltas.push(choice.delta.content);
    if (choice.finish_reason) streamFinish = choice.finish_reason;
  }
}

// Unknown body fields pass through the SDK as they are: the extension rides on chat.
const extended = await client.chat.completions.create({
  model: MLX_MODEL, messages, max_tokens: 4, temperature: 0,
  activation_hooks: hooks, activation_format: "base64",
});
const route = await client.post("/chat/completions/with_activations", {
  body: { model: MLX_MODEL, messages, max_tokens: 4, temperature: 0, activation_hooks: hooks, activation_format: "base64" },
});

let authError = null;
try {
  await new OpenAI({ baseURL: MLX_BASE_URL, apiKey: "wrong", maxRetries: 0 }).models.list();
} catch (err) {
  authError = { status: err.status, code: err.code ?? err.error?.code ?? null, isAuth: err instanceof OpenAI.AuthenticationError };
}

console.log(JSON.stringify({
  models: (await client.models.list()).data.map((m) => m.id),
  chat: { content: chat.choices[0].message.content, finish_reason: chat.choices[0].finish_reason, usage: chat.usage },
  stream: { content: deltas.join(""), finish_reason: streamFinish },
  extended: { content: extended.choices[0].message.content, activations: extended.activations, generated_token_ids: extended.generated_token_ids },
  route: { content: route.choices[0].message.content, activations: route.activations, generated_token_ids: route.generated_token_ids },
  authError,
}));
