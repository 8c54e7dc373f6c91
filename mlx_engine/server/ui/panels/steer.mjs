/**
 * Steer: the shared request run twice, without and with one intervention, side by side:
 * add a steering vector (built by POST /v1/steering/vectors from two sets of prompts) with
 * a scale, zero-ablate attention heads (at `z`, the per-head outputs), clamp one neuron, or
 * edit one feature of an SAE attached to the model (GET /v1/models/{id}/saes; the edit moves
 * the SAE's site by the feature's decoder delta, sae/attach.py).
 * Each intervention acts at the positions chosen. Below the two continuations, the
 * difference between the two runs in a chosen capture: ‖steered − unsteered‖₂ per position.
 */

import { decodeActivations, describeError } from "../api.mjs";
import { mergeCaptures, rowPositions } from "../captures.mjs";
import { fmt } from "../colors.mjs";
import { bars } from "../charts.mjs";
import { el, featureCount, fillSelect, layerOptions, layersOffering, say } from "../dom.mjs";
import { label } from "../tokens.mjs";

const CLAMP_COMPONENTS = ["mlp_post", "expert_post", "residual", "resid_mid", "mlp_pre", "expert_pre"];
const TEMPLATE = `
<h2>Steer</h2>
<div class="controls">
  <label>Intervention <select id="steer-kind">
    <option value="add">add a steering vector</option>
    <option value="zero">zero-ablate heads (z)</option>
    <option value="clamp">clamp a neuron</option>
    <option value="sae">edit an SAE feature</option>
  </select></label>
  <label id="steer-layer-label">Layer <select id="steer-layer"></select></label>
  <label>Positions <select id="steer-positions">
    <option value="all">all</option><option value="prompt">prompt</option><option value="generated">generated</option><option value="list">listed…</option>
  </select></label>
  <label data-when="list">Listed positions <input id="steer-position-list" type="text" size="12" placeholder="3, 4, 5"></label>
</div>
<fieldset data-kind="add"><legend>Steering vector: mean residual of the positive prompts minus the negative ones</legend>
  <div class="columns">
    <label>Positive prompts, one per line<textarea id="steer-positive" rows="3">x = [1, 2, 3, 4, 5]
port = 8080</textarea></label>
    <label>Negative prompts, one per line<textarea id="steer-negative" rows="3">import os
return self._name</textarea></label>
  </div>
  <div class="controls">
    <label>Averaged over <select id="steer-average"><option value="mean">every position</option><option value="last">the last position</option></select></label>
    <button id="steer-build" type="button" class="secondary">Build the vector</button>
    <label>Scale <input id="steer-scale" type="number" step="0.5" value="8"></label>
    <span id="steer-vector" class="muted">no vector yet</span>
  </div>
</fieldset>
<fieldset data-kind="zero"><legend>Heads to zero</legend><div id="steer-heads" class="controls"></div></fieldset>
<fieldset data-kind="clamp"><legend>Neuron to clamp</legend><div class="controls">
  <label>Component <select id="steer-component"></select></label>
  <label>Neuron <input id="steer-neuron" type="number" min="0" value="0"></label>
  <label>Min <input id="steer-min" type="number" step="any" value="0"></label>
  <label>Max <input id="steer-max" type="number" step="any" value="0"></label>
</div></fieldset>
<fieldset data-kind="sae"><legend>SAE feature (an SAE attached to this model)</legend><div class="controls">
  <label>SAE <select id="steer-sae"></select></label>
  <label>Feature <input id="steer-feature" type="number" min="0" value="0"></label>
  <label>Edit <select id="steer-sae-op">
    <option value="add">add: amount × its decoder direction</option><option value="clamp">clamp to the amount</option><option value="zero">zero it</option>
  </select></label>
  <label>Amount <input id="steer-sae-amount" type="number" step="any" value="8"></label>
</div><p id="steer-sae-note" class="muted"></p>
<form id="steer-sae-attach" class="controls" autocomplete="off">
  <label>Attach an SAE <input id="steer-sae-source" type="text" size="28" placeholder="folder under a --sae-root, or owner/name"></label>
  <button type="submit" class="secondary">Attach</button>
</form></fieldset>
<div class="controls">
  <label>Difference in <select id="steer-compare-component"></select></label>
  <label>at layer <select id="steer-compare-layer"></select></label>
  <button id="steer-run" type="button">Run both</button>
</div>
<div class="columns">
  <div><h3>Unsteered</h3><pre id="steer-unsteered" class="continuation"></pre></div>
  <div><h3>Steered</h3><pre id="steer-steered" class="continuation"></pre></div>
</div>
<p id="steer-note" class="muted"></p>
<div id="steer-diff" class="chart" role="img" aria-label="Difference between the runs per position"></div>`;

function parsePositions(text) {
  const list = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!list.length || list.some((p) => !Number.isInteger(p) || p < 0)) throw new Error("listed positions must be whole numbers ≥ 0, e.g. 3, 4, 5");
  return list;
}

class SteerView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.section = section;
    this.q = (selector) => section.querySelector(selector);
    this.vector = null;
    this.saes = [];
    for (const id of ["#steer-kind", "#steer-positions", "#steer-component", "#steer-compare-component", "#steer-layer", "#steer-sae"]) {
      this.q(id).addEventListener("change", () => this.refreshControls());
    }
    this.q("#steer-build").addEventListener("click", () => this.buildVector());
    this.q("#steer-sae-attach").addEventListener("submit", (event) => {
      event.preventDefault();
      this.attachSae(this.q("#steer-sae-source").value.trim());
    });
    this.q("#steer-run").addEventListener("click", () => this.run());
    ctx.onModelChange(() => {
      this.vector = null;
      this.saes = [];
      this.refreshControls();
    });
  }

  async refreshControls() {
    let listing;
    try {
      listing = await this.ctx.listing();
    } catch (_) {
      return;
    }
    const kind = this.q("#steer-kind").value;
    for (const node of this.section.querySelectorAll("fieldset[data-kind]")) node.hidden = node.dataset.kind !== kind;
    this.q('[data-when="list"]').hidden = this.q("#steer-positions").value !== "list";
    this.q("#steer-layer-label").hidden = kind === "sae";
    if (kind === "sae") await this.refreshSaes();
    const clampComponents = CLAMP_COMPONENTS.filter((c) => listing.components.includes(c));
    fillSelect(this.q("#steer-component"), clampComponents.map((c) => [c, c]));
    const site = { add: "residual", zero: "z", clamp: this.q("#steer-component").value }[kind];
    fillSelect(this.q("#steer-layer"), layerOptions(listing, layersOffering(listing, site)));
    const layer = Number(this.q("#steer-layer").value || 0);
    if (kind === "clamp" && site) this.q("#steer-neuron").max = String(featureCount(listing, layer, site) - 1);
    const heads = this.q("#steer-heads");
    if (heads.childElementCount !== listing.n_heads) {
      heads.replaceChildren(
        ...Array.from({ length: listing.n_heads }, (_, h) => el("label", {}, el("input", { type: "checkbox", value: String(h), checked: h === 0 }), ` head ${h}`)),
      );
    }
    const flat = [...new Set(listing.layers.flatMap((l) => Object.entries(l.components).filter(([, c]) => c.shape.length === 2).map(([name]) => name)))];
    fillSelect(this.q("#steer-compare-component"), flat.map((c) => [c, c]), this.q("#steer-compare-component").value || "residual");
    const compare = this.q("#steer-compare-component").value;
    const layers = layersOffering(listing, compare);
    fillSelect(this.q("#steer-compare-layer"), layerOptions(listing, layers), this.q("#steer-compare-layer").value || String(layers[layers.length - 1]));
  }

  /** The model's attached SAEs, for the SAE choice (a server without the route says so). */
  async refreshSaes() {
    const note = this.q("#steer-sae-note");
    const paths = this.ctx.paths;
    if (paths !== null && ![...paths].some((p) => /^\/v1\/models\/\{[^}]+\}\/saes$/.test(p))) {
      this.saes = [];
      return say(note, "This server has no /v1/models/{id}/saes: it cannot attach SAEs.", true);
    }
    try {
      this.saes = (await this.ctx.api.get(`/v1/models/${encodeURIComponent(this.ctx.model)}/saes`)).data;
    } catch (error) {
      this.saes = [];
      return say(note, describeError(error), true);
    }
    fillSelect(this.q("#steer-sae"), this.saes.map((sae) => [sae.hook_id, `${sae.hook_id} (${sae.d_sae} features on ${sae.site})`]));
    const chosen = this.saes.find((sae) => sae.hook_id === this.q("#steer-sae").value);
    if (chosen) this.q("#steer-feature").max = String(chosen.d_sae - 1);
    say(note, this.saes.length ? "The edit changes the SAE's site by the feature's decoder delta; the SAE's error term is kept." : "No SAE is attached to this model: attach one with POST /v1/models/{id}/saes.");
  }

  /** POST /v1/models/{id}/saes: attach the SAE `source` names, then list it. */
  async attachSae(source) {
    const note = this.q("#steer-sae-note");
    if (!source) return say(note, "Name an SAE folder (under the server's --sae-root) or a Hub repo id first.", true);
    try {
      say(note, `Attaching ${source}…`);
      const sae = await this.ctx.api.post(`/v1/models/${encodeURIComponent(this.ctx.model)}/saes`, { source });
      this.ctx.listings.delete(this.ctx.model);
      await this.refreshSaes();
      this.q("#steer-sae").value = sae.hook_id;
      await this.refreshControls();
    } catch (error) {
      say(note, describeError(error), true);
    }
  }

  /** An SAE feature edit, as AttachedSAE.add / clamp / ablate spell it, with `sae` naming the SAE. */
  saeIntervention(positions) {
    const sae = this.saes.find((s) => s.hook_id === this.q("#steer-sae").value);
    if (!sae) throw new Error("attach an SAE to this model first (POST /v1/models/{id}/saes)");
    const feature = Number(this.q("#steer-feature").value);
    if (!(Number.isInteger(feature) && feature >= 0 && feature < sae.d_sae)) throw new Error(`the SAE has features 0..${sae.d_sae - 1}, not ${feature}`);
    const amount = Number(this.q("#steer-sae-amount").value);
    const op = this.q("#steer-sae-op").value;
    if (op === "add") {
      const vector = new Array(sae.d_sae).fill(0);
      vector[feature] = 1;
      return { sae: sae.hook_id, op: "add", vector, scale: amount, positions };
    }
    if (op === "clamp") return { sae: sae.hook_id, op: "clamp", indices: [feature], min: amount, max: amount, positions };
    return { sae: sae.hook_id, op: "zero", indices: [feature], positions };
  }

  positions() {
    const choice = this.q("#steer-positions").value;
    return choice === "list" ? parsePositions(this.q("#steer-position-list").value) : choice;
  }

  async buildVector() {
    const ctx = this.ctx;
    const lines = (id) => this.q(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
    try {
      const layer = Number(this.q("#steer-layer").value);
      ctx.status("Building the steering vector…");
      const body = {
        model: ctx.model,
        layer_name: layer,
        component: "residual",
        positive: lines("#steer-positive"),
        negative: lines("#steer-negative"),
        position: this.q("#steer-average").value,
        format: "base64",
      };
      this.vector = await ctx.api.post("/v1/steering/vectors", body);
      const v = this.vector;
      const shown = this.q("#steer-vector");
      say(shown, `${v.hook_id}: ‖v‖₂ = ${fmt(v.norm)} from ${v.n_positive} positive and ${v.n_negative} negative prompts`);
      shown.dataset.norm = String(v.norm);
      ctx.status("Steering vector ready.");
    } catch (error) {
      ctx.status(describeError(error), true);
    }
  }

  /** The intervention the form describes (the vector must be built first for "add"). */
  intervention() {
    const kind = this.q("#steer-kind").value;
    const layer = Number(this.q("#steer-layer").value);
    const positions = this.positions();
    if (kind === "sae") return this.saeIntervention(positions);
    if (kind === "add") {
      if (!this.vector || this.vector.layer !== layer) throw new Error(`build the steering vector for layer ${layer} first`);
      return { ...this.vector.intervention, scale: Number(this.q("#steer-scale").value), positions };
    }
    if (kind === "zero") {
      const heads = [...this.q("#steer-heads").querySelectorAll("input:checked")].map((box) => Number(box.value));
      if (!heads.length) throw new Error("tick at least one head to zero");
      return { layer_name: layer, component: "z", op: "zero", heads, positions };
    }
    const min = Number(this.q("#steer-min").value);
    const max = Number(this.q("#steer-max").value);
    return { layer_name: layer, component: this.q("#steer-component").value, op: "clamp", indices: [Number(this.q("#steer-neuron").value)], min, max, positions };
  }

  async run() {
    const ctx = this.ctx;
    const outs = { unsteered: this.q("#steer-unsteered"), steered: this.q("#steer-steered") };
    for (const out of Object.values(outs)) {
      delete out.dataset.tokens;
      out.textContent = "";
    }
    try {
      const intervention = this.intervention();
      const hook = { layer_name: Number(this.q("#steer-compare-layer").value), component: this.q("#steer-compare-component").value };
      const capture = { activation_hooks: [hook], activation_format: "base64" };
      const requests = {
        unsteered: ctx.request.activationRequest(ctx.model, capture),
        steered: ctx.request.activationRequest(ctx.model, { ...capture, interventions: [intervention] }),
      };
      const results = {};
      for (const name of ["unsteered", "steered"]) {
        ctx.status(`Running the ${name} request…`);
        outs[name].textContent = "…";
        results[name] = await ctx.api.post(requests[name].path, requests[name].body);
        const tokens = results[name].generated_tokens_text;
        outs[name].textContent = tokens.join("");
        outs[name].dataset.tokens = JSON.stringify(tokens);
        outs[name].dataset.request = JSON.stringify(requests[name].body);
      }
      this.drawDifference(results, `layers.${hook.layer_name}.${hook.component}`);
      ctx.status("Both runs done.");
    } catch (error) {
      ctx.status(describeError(error), true);
    }
  }

  drawDifference(results, hookId) {
    const rows = (body) => {
      const out = new Map();
      for (const c of mergeCaptures({}, decodeActivations(body.activations))[hookId] || []) {
        const width = c.shape[1];
        rowPositions(c).forEach((p, r) => out.set(p, c.array.subarray(r * width, (r + 1) * width)));
      }
      return out;
    };
    const a = rows(results.unsteered);
    const b = rows(results.steered);
    const tokensA = [...results.unsteered.prompt_tokens_text, ...results.unsteered.generated_tokens_text];
    const tokensB = [...results.steered.prompt_tokens_text, ...results.steered.generated_tokens_text];
    let agree = 0;
    while (agree < Math.min(tokensA.length, tokensB.length) && tokensA[agree] === tokensB[agree]) agree += 1;
    const positions = [...a.keys()].filter((p) => b.has(p) && p < agree).sort((x, y) => x - y);
    const values = positions.map((p) => {
      let sum = 0;
      const x = a.get(p);
      const y = b.get(p);
      for (let i = 0; i < x.length; i += 1) sum += (y[i] - x[i]) ** 2;
      return Math.sqrt(sum);
    });
    const chart = this.q("#steer-diff");
    chart.dataset.hook = hookId;
    chart.dataset.values = JSON.stringify(values);
    bars(chart, {
      title: `‖steered − unsteered‖₂ at ${hookId}, per position`,
      labels: positions.map((p) => label(tokensA[p])),
      values,
      xName: "token (both runs read the same tokens here)",
      yName: "‖Δ‖₂",
      color: "#d62728",
      tooltip: (i, v) => `position ${positions[i]} “${label(tokensA[positions[i]])}”: ‖Δ‖₂ = ${fmt(v)}`,
    });
    const diverged = agree < Math.max(tokensA.length, tokensB.length) ? `The runs read the same tokens up to position ${agree - 1}; from position ${agree} on they differ, so later positions are not compared.` : "The two runs generated the same tokens.";
    say(this.q("#steer-note"), diverged);
  }
}

export default {
  id: "steer",
  title: "Steer",
  mount(section, ctx) {
    const view = new SteerView(section, ctx);
    view.refreshControls();
    return view;
  },
};
