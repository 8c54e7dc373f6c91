/**
 * Generate: stream a generation token by token, each token coloured by a per-token scalar
 * the server captured for it: the residual norm at a layer, one neuron (of residual,
 * mlp_post or expert_post, asked with `indices: [i]` so each chunk carries one number per
 * position), or the token's log-probability. Values are on each token (data-value, and on
 * hover); the colour scale spans the values seen so far (data-min, data-max).
 *
 * A token's activations arrive with the next token (the pass that chose it), so the newest
 * token waits one step for its colour and the last one never gets any.
 *
 * The request's mode chooses the route: chat streams /v1/chat/completions/with_activations,
 * completion (the raw prompt) /v1/completions/with_activations. Both streams carry the prompt's
 * tokens first and then one chunk per token with its captures; only where the text and the
 * log-probability sit in a chunk differs (MODES).
 */

import { decodeActivations, describeError } from "../api.mjs";
import { neuronValues, rowNorms } from "../captures.mjs";
import { colorIndex, extent, fmt, gradient, inkOn, VIRIDIS } from "../colors.mjs";
import { el, featureCount, fillSelect, layerOptions, layersOffering, say } from "../dom.mjs";
import { inline, label } from "../tokens.mjs";

const NEURON_COMPONENTS = ["residual", "mlp_post", "expert_post"];

/** How each mode's stream chunk holds its text, reasoning and log-probability. */
const MODES = {
  chat: {
    body: (request, model, spec, extra) => request.chatBody(model, { ...extra, logprobs: Boolean(spec.logprob) }),
    read(chunk) {
      const choice = (chunk.choices && chunk.choices[0]) || {};
      const delta = choice.delta || {};
      const lp = choice.logprobs && choice.logprobs.content && choice.logprobs.content[0];
      return { content: delta.content || "", reasoning: delta.reasoning_content || "", logprob: lp ? lp.logprob : null, structure: !delta.content && !delta.reasoning_content };
    },
  },
  completion: {
    body: (request, model, spec, extra) => request.completionBody(model, spec.logprob ? { ...extra, logprobs: 0 } : extra),
    read(chunk) {
      const choice = (chunk.choices && chunk.choices[0]) || {};
      const lp = choice.logprobs && choice.logprobs.token_logprobs;
      return { content: choice.text || "", reasoning: "", logprob: lp && lp.length ? lp[0] : null, structure: false };
    },
  },
};
const TEMPLATE = `
<h2>Generate</h2>
<div class="controls">
  <label>Colour by <select id="gen-scalar">
    <option value="norm">residual norm at a layer</option>
    <option value="neuron">one neuron</option>
    <option value="logprob">log-probability of the token</option>
  </select></label>
  <label data-for="layer">Layer <select id="gen-layer"></select></label>
  <label data-for="neuron">Component <select id="gen-component"></select></label>
  <label data-for="neuron">Neuron <input id="gen-neuron" type="number" min="0" value="0"></label>
  <label data-for="expert">Expert <input id="gen-expert" type="number" min="0" value="0"></label>
  <button id="gen-run" type="button">Generate</button>
  <button id="gen-stop" type="button" class="secondary" disabled>Stop</button>
</div>
<div class="legend" aria-hidden="true"><span data-role="min">–</span><span class="ramp"></span><span data-role="max">–</span><span data-role="name" class="muted"></span></div>
<div id="gen-tokens" class="tokens" aria-live="polite" aria-label="The prompt and the generated tokens, coloured by the chosen value"></div>
<p id="gen-readout" class="readout">Hover a token to read its value.</p>
<p id="gen-note" class="muted"></p>
<h3>Text</h3>
<p class="muted">Final channel (what the user sees):</p><pre id="gen-content" class="continuation"></pre>
<p class="muted">Analysis channel (reasoning), for Harmony models:</p><pre id="gen-reasoning" class="continuation"></pre>`;

class GenerateView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.tokens = this.q("#gen-tokens");
    this.spans = [];
    this.values = new Map();
    this.controller = null;
    this.q("#gen-scalar").addEventListener("change", () => this.refreshControls());
    this.q("#gen-component").addEventListener("change", () => this.refreshControls());
    ctx.request.mode.addEventListener("change", () => this.refreshControls());
    ctx.onModelChange(() => this.refreshControls());
    this.q("#gen-run").addEventListener("click", () => this.run());
    this.q("#gen-stop").addEventListener("click", () => this.controller && this.controller.abort());
    this.tokens.addEventListener("mouseover", (event) => this.readout(event.target));
    this.q(".ramp").style.background = gradient();
  }

  async refreshControls() {
    const scalar = this.q("#gen-scalar");
    const chat = this.ctx.request.isChat;
    say(this.q("#gen-note"), chat ? "Chat mode: the prompt goes through the model's chat template." : "Completion mode: the raw prompt, no chat template.");
    let listing;
    try {
      listing = await this.ctx.listing();
    } catch (_) {
      return;
    }
    const components = NEURON_COMPONENTS.filter((c) => listing.components.includes(c));
    fillSelect(this.q("#gen-component"), components.map((c) => [c, c]));
    const component = scalar.value === "neuron" ? this.q("#gen-component").value : "residual";
    fillSelect(this.q("#gen-layer"), layerOptions(listing, layersOffering(listing, component)));
    const layer = Number(this.q("#gen-layer").value || 0);
    if (scalar.value === "neuron" && component) this.q("#gen-neuron").max = String(featureCount(listing, layer, component) - 1);
    this.q("#gen-expert").max = String(Math.max(0, (listing.n_experts || 1) - 1));
    const show = { layer: scalar.value !== "logprob", neuron: scalar.value === "neuron", expert: scalar.value === "neuron" && component === "expert_post" };
    for (const node of this.q(".controls").querySelectorAll("label[data-for]")) node.hidden = !show[node.dataset.for];
  }

  /** The hook spec of the chosen scalar, and how to read a per-position value from its captures. */
  scalarSpec() {
    const scalar = this.q("#gen-scalar").value;
    const layer = Number(this.q("#gen-layer").value);
    if (scalar === "norm") {
      return { hook: { layer_name: layer, component: "residual" }, name: `‖residual‖ at layer ${layer}`, read: (c) => rowNorms(c) };
    }
    if (scalar === "neuron") {
      const component = this.q("#gen-component").value;
      const index = Number(this.q("#gen-neuron").value);
      const expert = component === "expert_post" ? Number(this.q("#gen-expert").value) : null;
      const name = `layer ${layer} ${component}[${index}]${expert === null ? "" : ` of expert ${expert}`}`;
      return { hook: { layer_name: layer, component, indices: [index] }, name, read: (c) => neuronValues(c, expert) };
    }
    // Log-probabilities ride on the chunks; the with_activations route needs a hook, asked with no data.
    return { hook: { layer_name: 0, component: "residual" }, format: "none", logprob: true, name: "log-probability" };
  }

  reset(spec) {
    this.spans = [];
    this.values = new Map();
    this.tokens.replaceChildren();
    this.tokens.dataset.scalar = spec.name;
    this.tokens.dataset.state = "running";
    delete this.tokens.dataset.min;
    delete this.tokens.dataset.max;
    this.q("#gen-content").textContent = "";
    this.q("#gen-reasoning").textContent = "";
    this.q('[data-role="name"]').textContent = spec.name;
  }

  addToken(text, source, extraClass = "") {
    const position = this.spans.length;
    const span = el("span", { class: `tok pending ${extraClass}`.trim(), dataset: { position: String(position), source, token: text } }, inline(text));
    span.title = `position ${position} (${source}) ${JSON.stringify(text)}: no value yet`;
    this.spans.push(span);
    this.tokens.append(span);
    return span;
  }

  setValue(position, value, why = "") {
    const span = this.spans[position];
    if (!span) return;
    span.classList.remove("pending");
    if (value === null || value === undefined) {
      span.dataset.value = "";
      span.title = `position ${position} (${span.dataset.source}) ${JSON.stringify(span.dataset.token)}: ${why || "no value"}`;
      return;
    }
    this.values.set(position, value);
    span.dataset.value = String(value);
    span.title = `position ${position} (${span.dataset.source}) ${JSON.stringify(span.dataset.token)}: ${fmt(value)}`;
  }

  recolor() {
    const range = extent(this.values.values());
    if (!range) return;
    this.tokens.dataset.min = String(range.min);
    this.tokens.dataset.max = String(range.max);
    this.q('[data-role="min"]').textContent = fmt(range.min);
    this.q('[data-role="max"]').textContent = fmt(range.max);
    for (const [position, value] of this.values) {
      const index = colorIndex(value, range.min, range.max);
      this.spans[position].style.backgroundColor = VIRIDIS[index];
      this.spans[position].style.color = inkOn(index);
    }
  }

  readout(target) {
    const span = target.closest && target.closest(".tok");
    if (!span) return;
    const value = span.dataset.value;
    const shown = value ? fmt(Number(value)) : span.classList.contains("pending") ? "not yet" : "none";
    say(this.q("#gen-readout"), `position ${span.dataset.position} · ${span.dataset.source} · “${label(span.dataset.token)}” · ${this.tokens.dataset.scalar}: ${shown}`);
  }

  async run() {
    const ctx = this.ctx;
    if (!ctx.model) return ctx.status("No model is loaded.", true);
    const spec = this.scalarSpec();
    this.reset(spec);
    this.controller = new AbortController();
    this.q("#gen-run").disabled = true;
    this.q("#gen-stop").disabled = false;
    ctx.status("Generating…");
    try {
      await this.stream(spec);
      const last = this.spans[this.spans.length - 1];
      if (last && last.dataset.source === "generated" && spec.read) this.setValue(this.spans.length - 1, null, "the last token is never fed back through the model");
      this.tokens.dataset.state = "done";
      ctx.status(`Generated ${this.spans.filter((s) => s.dataset.source === "generated").length} tokens.`);
    } catch (error) {
      this.tokens.dataset.state = "failed";
      ctx.status(describeError(error), true);
    } finally {
      this.recolor();
      this.q("#gen-run").disabled = false;
      this.q("#gen-stop").disabled = true;
    }
  }

  /** Stream the request of the chosen mode with the scalar's hook, colouring each token as its captures arrive. */
  async stream(spec) {
    const request = this.ctx.request;
    const mode = MODES[request.isChat ? "chat" : "completion"];
    const { path } = request.activationRequest(this.ctx.model);
    const body = mode.body(request, this.ctx.model, spec, { activation_hooks: [spec.hook], activation_format: spec.format || "base64" });
    this.tokens.dataset.mode = request.isChat ? "chat" : "completion";
    this.tokens.dataset.path = path;
    const content = this.q("#gen-content");
    const reasoning = this.q("#gen-reasoning");
    for await (const chunk of this.ctx.api.stream(path, body, this.controller.signal)) {
      if (chunk.prompt_tokens_text) {
        chunk.prompt_tokens_text.forEach((t) => this.addToken(t, "prompt"));
        this.tokens.append(el("span", { class: "boundary", role: "separator", "aria-label": "generation starts here" }));
        this.tokens.dataset.boundary = String(this.spans.length);
      }
      const part = mode.read(chunk);
      if (chunk.token_text !== undefined && chunk.token_text !== null) {
        const kind = part.reasoning ? "reasoning" : part.structure ? "structure" : "";
        const span = this.addToken(chunk.token_text, "generated", kind);
        if (spec.logprob) this.setValue(span.dataset.position | 0, part.logprob, "the server reports log-probabilities for the final channel only");
      }
      content.textContent += part.content;
      reasoning.textContent += part.reasoning;
      if (spec.read && chunk.activations) {
        for (const captures of Object.values(decodeActivations(chunk.activations))) {
          for (const capture of captures) {
            for (const [position, value] of spec.read(capture)) this.setValue(position, value, "expert not routed for this token");
          }
        }
      }
      this.recolor();
    }
  }
}

export default {
  id: "generate",
  title: "Generate",
  mount(section, ctx) {
    const view = new GenerateView(section, ctx);
    view.refreshControls();
    return { show: () => view.refreshControls() };
  },
};
