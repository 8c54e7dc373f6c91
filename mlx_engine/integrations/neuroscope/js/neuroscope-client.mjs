/**
 * NeuroScope client for mlx-engine as an ES module, for the browser and Node 18+ (fetch).
 *
 * Chat with activations, whole or streamed (Server-Sent Events read from the fetch body as
 * they arrive), with every capture decoded into a typed array: base64 float32 into a
 * Float32Array, float16 and bfloat16 widened into a Float32Array exactly, integer dtypes
 * into their typed arrays. JSON-encoded captures decode the same way, the strings
 * "Infinity", "-Infinity" and "NaN" (JSON has no such literals) becoming numbers.
 *
 * The endpoint table below is generated from the server-side description
 * (mlx_engine/integrations/neuroscope/endpoints.py); a test keeps it equal.
 */

// endpoints:begin (generated from endpoints.py by endpoints_js(); do not edit)
export const ENDPOINTS = Object.freeze({
  "health": {"method": "GET", "path": "/health", "body": {}, "query": [], "required": []},
  "models": {"method": "GET", "path": "/v1/models", "body": {}, "query": [], "required": []},
  "load_model": {"method": "POST", "path": "/v1/models/load", "body": {"model": null}, "query": [], "required": ["model"]},
  "hook_points": {"method": "GET", "path": "/v1/models/{model_id}/hook_points", "body": {}, "query": [], "required": []},
  "register_hooks": {"method": "POST", "path": "/v1/activations/hooks", "body": {"hooks": null, "model": null}, "query": [], "required": ["hooks"]},
  "clear_hooks": {"method": "DELETE", "path": "/v1/activations/hooks", "body": {}, "query": ["model"], "required": []},
  "generate_with_activations": {"method": "POST", "path": "/v1/chat/completions/with_activations", "body": {"messages": null, "activation_hooks": null, "max_tokens": 32, "temperature": 0.0, "activation_format": "json", "stream": false, "interventions": null, "model": null}, "query": [], "required": ["messages", "activation_hooks"]},
  "complete_with_activations": {"method": "POST", "path": "/v1/completions/with_activations", "body": {"prompt": null, "activation_hooks": null, "max_tokens": 32, "temperature": 0.0, "activation_format": "json", "stream": false, "interventions": null, "model": null}, "query": [], "required": ["prompt", "activation_hooks"]},
  "list_stores": {"method": "GET", "path": "/v1/stores", "body": {}, "query": [], "required": []},
  "store_stats": {"method": "GET", "path": "/v1/stores/{store_id}/stats", "body": {}, "query": ["hook"], "required": []},
  "top_examples": {"method": "GET", "path": "/v1/stores/{store_id}/top_examples", "body": {}, "query": ["hook", "neuron", "k", "context"], "required": []},
  "ngram_neurons": {"method": "GET", "path": "/v1/stores/{store_id}/reverse", "body": {}, "query": ["ngram", "hook", "k"], "required": []},
  "neuron_ngrams": {"method": "GET", "path": "/v1/stores/{store_id}/reverse", "body": {}, "query": ["hook", "neuron", "n", "k"], "required": []},
  "logit_lens": {"method": "POST", "path": "/v1/analysis/logit_lens", "body": {"prompt": null, "top_k": 5, "model": null}, "query": [], "required": ["prompt"]},
  "attribution": {"method": "POST", "path": "/v1/analysis/attribution", "body": {"prompt": null, "target": null, "foil": null, "position": -1, "model": null}, "query": [], "required": ["prompt"]},
  "head_scores": {"method": "POST", "path": "/v1/analysis/heads", "body": {"prompt": null, "repeat_length": 20, "importance": false, "model": null}, "query": [], "required": ["prompt"]},
  "patching": {"method": "POST", "path": "/v1/analysis/patching", "body": {"clean": null, "corrupted": null, "component": "residual", "metric": "logit_diff", "model": null}, "query": [], "required": ["clean", "corrupted"]},
  "attach_sae": {"method": "POST", "path": "/v1/models/{model_id}/saes", "body": {"source": null, "top_k": null}, "query": [], "required": ["source"]},
  "list_saes": {"method": "GET", "path": "/v1/models/{model_id}/saes", "body": {}, "query": [], "required": []},
  "detach_sae": {"method": "DELETE", "path": "/v1/models/{model_id}/saes/{sae_id}", "body": {}, "query": [], "required": []},
  "neuron_distribution": {"method": "GET", "path": "/v1/stores/{store_id}/distribution", "body": {}, "query": ["hook", "neuron", "bins"], "required": []},
  "polysemantic_neurons": {"method": "GET", "path": "/v1/stores/{store_id}/polysemantic", "body": {}, "query": ["hook", "top", "neurons", "k", "distance"], "required": []},
  "start_extraction": {"method": "POST", "path": "/v1/extract", "body": {"documents": null, "hooks": null, "context_size": 1024, "batch_size": 8, "max_tokens": null, "dtype": "float32", "top_k": 20, "model": null}, "query": [], "required": ["documents", "hooks"]},
  "list_extractions": {"method": "GET", "path": "/v1/extract", "body": {}, "query": [], "required": []},
  "extraction_progress": {"method": "GET", "path": "/v1/extract/{job_id}", "body": {}, "query": [], "required": []},
  "cancel_extraction": {"method": "DELETE", "path": "/v1/extract/{job_id}", "body": {}, "query": [], "required": []},
  "steering_vector": {"method": "POST", "path": "/v1/steering/vectors", "body": {"layer_name": null, "positive": null, "negative": null, "component": "residual", "position": "mean", "format": "json", "model": null}, "query": [], "required": ["layer_name", "positive", "negative"]},
});
// The metadata every wire capture carries (wire/fields.py).
export const CAPTURE_FIELDS = Object.freeze(["hook_id", "layer_name", "layer", "component", "step", "positions", "key_positions", "is_input", "shape", "dtype"]);
// endpoints:end

/** An error the server reported: its message, HTTP status, type, param and code. */
export class NeuroScopeError extends Error {
  constructor(message, status, { type = null, param = null, code = null } = {}) {
    super(`HTTP ${status}: ${message}`);
    this.name = "NeuroScopeError";
    this.serverMessage = message;
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
  }
}

const INTEGER_ARRAYS = {
  int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array,
  int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
};
const NON_FINITE = { Infinity: Infinity, "-Infinity": -Infinity, NaN: NaN };

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** IEEE half precision bits to the (exactly equal) float32 value. */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

function elementCount(shape) {
  return shape.reduce((product, n) => product * n, 1);
}

/**
 * The data of `{shape, dtype, data}` sent with `encoding` as a flat typed array (row-major):
 * Float32Array for float32/float16/bfloat16, the matching integer array otherwise; null for "none".
 */
export function decodeArray(data, shape, dtype, encoding) {
  if (encoding === "none" || data === null || data === undefined) return null;
  const count = elementCount(shape);
  if (encoding === "base64") {
    const bytes = base64Bytes(data);
    const view = new DataView(bytes.buffer);
    if (dtype === "float32") {
      check(bytes.length, count * 4, shape, dtype);
      const out = new Float32Array(count);
      for (let i = 0; i < count; i += 1) out[i] = view.getFloat32(i * 4, true);
      return out;
    }
    if (dtype === "float16" || dtype === "bfloat16") {
      check(bytes.length, count * 2, shape, dtype);
      const out = new Float32Array(count);
      if (dtype === "bfloat16") {
        const wide = new DataView(new ArrayBuffer(4));
        for (let i = 0; i < count; i += 1) {
          wide.setUint32(0, view.getUint16(i * 2, true) << 16 >>> 0);
          out[i] = wide.getFloat32(0);
        }
      } else {
        for (let i = 0; i < count; i += 1) out[i] = halfToFloat(view.getUint16(i * 2, true));
      }
      return out;
    }
    const Integer = INTEGER_ARRAYS[dtype];
    if (!Integer) throw new Error(`unsupported dtype ${dtype}`);
    check(bytes.length, count * Integer.BYTES_PER_ELEMENT, shape, dtype);
    const out = new Integer(count);
    const size = Integer.BYTES_PER_ELEMENT;
    const read = {
      1: (i) => (dtype === "int8" ? view.getInt8(i) : view.getUint8(i)),
      2: (i) => (dtype === "int16" ? view.getInt16(i * 2, true) : view.getUint16(i * 2, true)),
      4: (i) => (dtype === "int32" ? view.getInt32(i * 4, true) : view.getUint32(i * 4, true)),
      8: (i) => (dtype === "int64" ? view.getBigInt64(i * 8, true) : view.getBigUint64(i * 8, true)),
    }[size];
    for (let i = 0; i < count; i += 1) out[i] = read(i);
    return out;
  }
  if (encoding === "json") {
    const flat = [data].flat(Infinity).map((v) => (typeof v === "string" ? NON_FINITE[v] : v));
    if (flat.length !== count) throw new Error(`json data holds ${flat.length} values; shape [${shape}] needs ${count}`);
    const Integer = INTEGER_ARRAYS[dtype];
    if (Integer) return Integer.from(flat, (v) => (Integer.BYTES_PER_ELEMENT === 8 ? BigInt(v) : v));
    return Float32Array.from(flat);
  }
  throw new Error(`unknown activation encoding ${encoding}`);
}

function check(actual, expected, shape, dtype) {
  if (actual !== expected) {
    throw new Error(`base64 data holds ${actual} bytes; shape [${shape}] of ${dtype} needs ${expected}`);
  }
}

/** A wire capture with `array` (flat typed array) and decoded `extras` (router experts/weights). */
export function decodeCapture(wire) {
  const missing = CAPTURE_FIELDS.filter((name) => !(name in wire));
  if (missing.length) throw new Error(`not a wire capture: it lacks ${missing.join(", ")}`);
  const capture = { ...wire, array: decodeArray(wire.data, wire.shape, wire.dtype, wire.encoding), extras: {} };
  delete capture.data;
  for (const [key, value] of Object.entries(wire)) {
    if (value && typeof value === "object" && !Array.isArray(value) && "shape" in value && "dtype" in value && "data" in value) {
      capture.extras[key] = decodeArray(value.data, value.shape, value.dtype, wire.encoding);
      delete capture[key];
    }
  }
  return capture;
}

/**
 * The MLP neurons of each of `layers` as hook specs: `component` is "mlp_post" (dense models) or
 * "expert_post" (the routed experts of an MoE model); `indices` asks for those neurons only.
 */
export function createNeuronHooks(layers, { component = "mlp_post", indices = null } = {}) {
  return layers.map((layer) => {
    const spec = { layer_name: `layers.${layer}`, component };
    if (indices !== null) spec.indices = [...indices];
    return spec;
  });
}

/** `{hook_id: [decoded capture, ...]}` from a response's or chunk's `activations`. */
export function decodeActivations(activations) {
  return Object.fromEntries(Object.entries(activations || {}).map(([hook, captures]) => [hook, captures.map(decodeCapture)]));
}

/** The JSON payloads of an SSE body as they arrive, until `data: [DONE]`. */
export async function* readServerSentEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length) {
            const payload = data.join("\n");
            data = [];
            if (payload === "[DONE]") return;
            yield JSON.parse(payload);
          }
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
        }
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

/** A chat's or text completion's choice text: the message's content, or the completion's text. */
function choiceText(choice) {
  return (choice.message ? choice.message.content : choice.text) || "";
}

function activationResult(body) {
  return {
    response: body,
    text: choiceText(body.choices[0]),
    captures: decodeActivations(body.activations),
    promptTokens: body.prompt_tokens_text || [],
    tokens: body.generated_tokens_text || [],
  };
}

export class NeuroScopeClient {
  /**
   * @param {string} baseUrl the server's root URL
   * @param {{apiKey?: string, fetch?: typeof fetch}} options an API key (sent as Bearer) and a fetch to use
   */
  constructor(baseUrl = "http://127.0.0.1:8080", { apiKey = null, fetch: fetchImpl = globalThis.fetch } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.apiKey = apiKey;
    // A browser's fetch must be called with the window as `this`; stored as a method of the
    // client and called as this.fetch(...) it throws "Illegal invocation". Node does not care.
    this.fetch = (...args) => fetchImpl(...args);
    this.model = null;
  }

  async request(name, { fields = {}, query = {}, path = {} } = {}) {
    const endpoint = ENDPOINTS[name];
    let url = this.baseUrl + endpoint.path.replace(/{(\w+)}/g, (_, key) => encodeURIComponent(path[key]));
    const params = new URLSearchParams();
    for (const key of endpoint.query) if (query[key] !== null && query[key] !== undefined) params.set(key, query[key]);
    if ([...params].length) url += `?${params}`;
    const headers = { Accept: "application/json, text/event-stream" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    const init = { method: endpoint.method, headers };
    if (Object.keys(endpoint.body).length) {
      const body = {};
      for (const [key, fallback] of Object.entries(endpoint.body)) {
        const value = fields[key] !== undefined ? fields[key] : fallback;
        if (value === null || value === undefined) {
          if (endpoint.required.includes(key)) throw new TypeError(`${name} needs ${key}`);
        } else {
          body[key] = value;
        }
      }
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await this.fetch(url, init);
    if (!response.ok) {
      const text = await response.text();
      let detail = null;
      try {
        detail = JSON.parse(text).error;
      } catch (_) {
        detail = null;
      }
      if (detail && detail.message) throw new NeuroScopeError(detail.message, response.status, detail);
      throw new NeuroScopeError(text || response.statusText, response.status);
    }
    return response;
  }

  async json(name, options) {
    return (await this.request(name, options)).json();
  }

  health() {
    return this.json("health");
  }

  async listModels() {
    return (await this.json("models")).data;
  }

  async loadModel(model) {
    const described = await this.json("load_model", { fields: { model } });
    this.model = described.id;
    return described;
  }

  /** The model requests name: the one chosen, else the server's first loaded model. */
  async currentModel() {
    if (this.model === null) {
      const models = await this.listModels();
      if (!models.length) throw new NeuroScopeError("the server has no model loaded; call loadModel first", 404);
      this.model = models[0].id;
    }
    return this.model;
  }

  async hookPoints(modelId = null) {
    return this.json("hook_points", { path: { model_id: modelId || (await this.currentModel()) } });
  }

  async registerHooks(hooks) {
    return (await this.json("register_hooks", { fields: { hooks, model: this.model } })).data;
  }

  async clearHooks() {
    return (await this.json("clear_hooks", { query: { model: this.model } })).data;
  }

  // Activation stores (read-only; ids from listStores).
  async listStores() {
    return (await this.json("list_stores")).data;
  }

  storeStats(storeId, hook) {
    return this.json("store_stats", { path: { store_id: storeId }, query: { hook } });
  }

  async topExamples(storeId, hook, neuron, { k = 20, context = 8 } = {}) {
    return (await this.json("top_examples", { path: { store_id: storeId }, query: { hook, neuron, k, context } })).examples;
  }

  /** The neurons a token or n-gram activates most: `ngram` is text, "#12 #40", or an array of token ids. */
  ngramNeurons(storeId, ngram, { hook = null, k = 10 } = {}) {
    const text = Array.isArray(ngram) ? ngram.join(",") : ngram;
    return this.json("ngram_neurons", { path: { store_id: storeId }, query: { ngram: text, hook, k } });
  }

  async neuronNgrams(storeId, hook, neuron, { n = 3, k = 10 } = {}) {
    return (await this.json("neuron_ngrams", { path: { store_id: storeId }, query: { hook, neuron, n, k } })).ngrams;
  }

  /** A neuron's histogram over the store's rows (`edges`, `counts`), quartiles, outliers and online moments. */
  neuronDistribution(storeId, hook, neuron, { bins = 64 } = {}) {
    return this.json("neuron_distribution", { path: { store_id: storeId }, query: { hook, neuron, bins } });
  }

  /** The hook's neurons (or `neurons`, an array of ids) ranked by polysemanticity; the answer's `neurons` holds the first `top`. */
  polysemanticNeurons(storeId, hook, { top = 20, neurons = null, k = null, distance = null } = {}) {
    const named = neurons === null ? null : neurons.join(",");
    return this.json("polysemantic_neurons", { path: { store_id: storeId }, query: { hook, top, neurons: named, k, distance } });
  }

  // Analyses on the client's model; `prompt` is text or an array of token ids.
  logitLens(prompt, { topK = 5 } = {}) {
    return this.json("logit_lens", { fields: { prompt, top_k: topK, model: this.model } });
  }

  attribution(prompt, { target = null, foil = null, position = -1 } = {}) {
    return this.json("attribution", { fields: { prompt, target, foil, position, model: this.model } });
  }

  headScores(prompt, { repeatLength = 20, importance = false } = {}) {
    return this.json("head_scores", { fields: { prompt, repeat_length: repeatLength, importance, model: this.model } });
  }

  patching(clean, corrupted, { component = "residual", metric = "logit_diff" } = {}) {
    return this.json("patching", { fields: { clean, corrupted, component, metric, model: this.model } });
  }

  // SAEs attached to the client's model: an attached SAE's `id` names its features ({sae: id} in a hook).
  async attachSae(source, { topK = null } = {}) {
    return this.json("attach_sae", { path: { model_id: await this.currentModel() }, fields: { source, top_k: topK } });
  }

  async listSaes() {
    return (await this.json("list_saes", { path: { model_id: await this.currentModel() } })).data;
  }

  async detachSae(saeId) {
    return (await this.json("detach_sae", { path: { model_id: await this.currentModel(), sae_id: saeId } })).data;
  }

  // Extraction jobs (a new store under the server's --store-root) and steering vectors.
  startExtraction(documents, hooks, { contextSize = 1024, batchSize = 8, maxTokens = null, dtype = "float32", topK = 20 } = {}) {
    const fields = { documents, hooks, context_size: contextSize, batch_size: batchSize, max_tokens: maxTokens, dtype, top_k: topK };
    return this.json("start_extraction", { fields: { ...fields, model: this.model } });
  }

  async listExtractions() {
    return (await this.json("list_extractions")).data;
  }

  extractionProgress(jobId) {
    return this.json("extraction_progress", { path: { job_id: jobId } });
  }

  cancelExtraction(jobId) {
    return this.json("cancel_extraction", { path: { job_id: jobId } });
  }

  /** Polls extractionProgress every `pollMs` until the job is no longer running; resolves to its last progress. */
  async waitForExtraction(jobId, { pollMs = 1000, timeoutMs = null } = {}) {
    const start = Date.now();
    for (;;) {
      const job = await this.extractionProgress(jobId);
      if (job.state !== "running") return job;
      if (timeoutMs !== null && Date.now() - start >= timeoutMs) {
        throw new Error(`extraction ${jobId} is still running after ${timeoutMs} ms; cancelExtraction stops it`);
      }
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  }

  /** Mean activation of `positive` minus that of `negative` prompts at a layer, with its ready `intervention`. */
  steeringVector(layerName, positive, negative, { component = "residual", position = "mean", format = "json" } = {}) {
    const fields = { layer_name: layerName, positive, negative, component, position, format, model: this.model };
    return this.json("steering_vector", { fields });
  }

  chatFields(messages, hooks, options, stream) {
    return this.captureFields({ messages: typeof messages === "string" ? [{ role: "user", content: messages }] : messages }, hooks, options, stream);
  }

  captureFields(prompt, hooks, options, stream) {
    const fields = {
      ...prompt,
      activation_hooks: hooks,
      activation_format: options.activationFormat || "base64",
      stream,
      model: this.model,
    };
    if (options.maxTokens !== undefined) fields.max_tokens = options.maxTokens;
    if (options.temperature !== undefined) fields.temperature = options.temperature;
    if (options.interventions !== undefined) fields.interventions = options.interventions;
    return fields;
  }

  /**
   * A whole chat with activations: the server's body plus `text`, `captures` (decoded),
   * `promptTokens` and `tokens` (strings).
   */
  async generateWithActivations(messages, hooks, options = {}) {
    return activationResult(await this.json("generate_with_activations", { fields: this.chatFields(messages, hooks, options, false) }));
  }

  /** A whole text completion of the raw `prompt` (text or token ids) with activations, as generateWithActivations answers. */
  async completeWithActivations(prompt, hooks, options = {}) {
    return activationResult(await this.json("complete_with_activations", { fields: this.captureFields({ prompt }, hooks, options, false) }));
  }

  /**
   * A streamed chat with activations: yields `{text, reasoning, tokenId, tokenText, captures,
   * finishReason, promptTokens, chunk}` per server event, as each token is generated.
   */
  async *streamWithActivations(messages, hooks, options = {}) {
    yield* this.streamEvents("generate_with_activations", this.chatFields(messages, hooks, options, true));
  }

  /** A streamed text completion with activations: yields the events streamWithActivations yields. */
  async *streamCompletionWithActivations(prompt, hooks, options = {}) {
    yield* this.streamEvents("complete_with_activations", this.captureFields({ prompt }, hooks, options, true));
  }

  async *streamEvents(name, fields) {
    const response = await this.request(name, { fields });
    for await (const chunk of readServerSentEvents(response.body)) {
      const choice = (chunk.choices || [])[0] || {};
      const delta = choice.delta || {};
      yield {
        text: ("delta" in choice ? delta.content : choice.text) || "",
        reasoning: delta.reasoning_content || "",
        tokenId: chunk.token_id ?? null,
        tokenText: chunk.token_text ?? null,
        captures: decodeActivations(chunk.activations),
        finishReason: choice.finish_reason ?? null,
        promptTokens: chunk.prompt_tokens_text || null,
        chunk,
      };
    }
  }
}
