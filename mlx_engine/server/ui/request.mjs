/**
 * The request every panel sends: chat (one user message, through the model's chat template)
 * or completion (the raw prompt), with the sampling settings. One form above the panels, so
 * the Generate, Layers, Attention and Steer views all look at the same generation.
 *
 * Both modes capture activations: /v1/chat/completions/with_activations for chat,
 * /v1/completions/with_activations for a raw prompt, with the same capture fields in the answer
 * (`activations`, `prompt_tokens_text`, `generated_tokens_text`, `capture_id`), so a panel asks
 * `activationRequest` for the path and body of the chosen mode and reads either answer alike.
 */

const TEMPLATE = `
<div class="fields">
  <label>Prompt<br><textarea id="req-prompt" rows="3">Write a Python function that counts the lines in a text file.</textarea></label>
  <div class="knobs">
    <label for="req-mode">Mode</label>
    <select id="req-mode"><option value="chat">chat (chat template)</option><option value="completion">completion (raw prompt)</option></select>
    <label for="req-max-tokens">Max tokens</label><input id="req-max-tokens" type="number" min="1" value="24">
    <label for="req-temperature">Temperature</label><input id="req-temperature" type="number" min="0" max="2" step="0.1" value="0">
    <label for="req-seed">Seed</label><input id="req-seed" type="number" min="0" step="1" placeholder="none">
  </div>
</div>`;

export class RequestForm {
  constructor(root) {
    root.innerHTML = TEMPLATE;
    this.prompt = root.querySelector("#req-prompt");
    this.mode = root.querySelector("#req-mode");
    this.maxTokens = root.querySelector("#req-max-tokens");
    this.temperature = root.querySelector("#req-temperature");
    this.seed = root.querySelector("#req-seed");
  }

  get isChat() {
    return this.mode.value === "chat";
  }

  /** The sampling fields, as the API names them (seed left out when blank). */
  sampling() {
    const out = {
      max_tokens: Math.max(1, Number.parseInt(this.maxTokens.value, 10) || 1),
      temperature: Number.parseFloat(this.temperature.value) || 0,
    };
    if (this.seed.value.trim() !== "") out.seed = Number.parseInt(this.seed.value, 10);
    return out;
  }

  /** A chat request body for `model`, plus `extra` (hooks, interventions, ...). */
  chatBody(model, extra = {}) {
    return { model, messages: [{ role: "user", content: this.prompt.value }], ...this.sampling(), ...extra };
  }

  /** A text-completion request body for `model`, plus `extra`. */
  completionBody(model, extra = {}) {
    return { model, prompt: this.prompt.value, ...this.sampling(), ...extra };
  }

  /** The with-activations request of the chosen mode: `{ path, body }`, `extra` (hooks, format, ...) in the body. */
  activationRequest(model, extra = {}) {
    return this.isChat
      ? { path: "/v1/chat/completions/with_activations", body: this.chatBody(model, extra) }
      : { path: "/v1/completions/with_activations", body: this.completionBody(model, extra) };
  }
}
