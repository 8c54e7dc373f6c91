/**
 * Layers × tokens: the L2 norm of the residual stream at every layer and position of one
 * generation (the shared request, asked once with every layer's residual), as a heatmap with
 * the token strings along one axis and the layer numbers along the other. A click on a cell,
 * or a position typed in the box, opens that position's values at every layer.
 */

import { decodeActivations, describeError } from "../api.mjs";
import { mergeCaptures, rowNorms } from "../captures.mjs";
import { fmt } from "../colors.mjs";
import { bars, heatmap } from "../charts.mjs";
import { el, layersOffering, say } from "../dom.mjs";
import { label, sequence } from "../tokens.mjs";

const TEMPLATE = `
<h2>Layers × tokens</h2>
<div class="controls">
  <button id="layers-run" type="button">Run the request</button>
  <label>Position <input id="layers-position" type="number" min="0" value="0"></label>
  <button id="layers-show" type="button" class="secondary">Show position</button>
</div>
<p id="layers-note" class="muted">Runs the request above with the residual stream of every layer captured (base64), not streamed.</p>
<div id="layers-heatmap" class="chart" data-min-height="380" role="img" aria-label="Residual norm per layer and token"></div>
<section id="layers-details" aria-live="polite"></section>`;

class LayersView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.q("#layers-run").addEventListener("click", () => this.run());
    this.q("#layers-show").addEventListener("click", () => this.details(Number(this.q("#layers-position").value)));
    this.q("#layers-position").addEventListener("keydown", (event) => {
      if (event.key === "Enter") this.details(Number(this.q("#layers-position").value));
    });
    this.result = null;
  }

  async run() {
    const ctx = this.ctx;
    try {
      const listing = await ctx.listing();
      const layers = layersOffering(listing, "residual");
      const hooks = layers.map((i) => ({ layer_name: i, component: "residual" }));
      ctx.status("Running the request with every layer's residual stream…");
      const request = ctx.request.activationRequest(ctx.model, { activation_hooks: hooks, activation_format: "base64" });
      const body = await ctx.api.post(request.path, request.body);
      const captures = mergeCaptures({}, decodeActivations(body.activations));
      const { tokens, boundary } = sequence(body);
      const norms = layers.map((i) => {
        const row = new Map();
        for (const capture of captures[`layers.${i}.residual`] || []) for (const [p, v] of rowNorms(capture)) row.set(p, v);
        return row;
      });
      const positions = Math.max(...norms.map((row) => row.size));
      this.result = { layers, tokens, boundary, norms, positions };
      this.draw();
      say(this.q("#layers-note"), `${layers.length} layers × ${positions} positions (the last generated token is never fed back, so it has none). Capture ${body.capture_id}.`);
      this.q("#layers-position").max = String(positions - 1);
      ctx.status("Layers × tokens ready: click a cell for that position's details.");
    } catch (error) {
      ctx.status(describeError(error), true);
    }
  }

  draw() {
    const { layers, tokens, boundary, norms, positions } = this.result;
    const data = [];
    let min = Infinity;
    let max = -Infinity;
    norms.forEach((row, y) => {
      for (const [p, v] of row) {
        data.push([p, y, v]);
        min = Math.min(min, v);
        max = Math.max(max, v);
      }
    });
    const xLabels = tokens.slice(0, positions).map(label);
    heatmap(this.q("#layers-heatmap"), {
      title: "Residual stream norm ‖x‖₂ per layer and token",
      xName: "token (position, left to right)",
      yName: "layer",
      xLabels,
      yLabels: layers.map(String),
      data,
      min,
      max,
      scaleLabel: "‖x‖₂",
      boundary,
      left: 70,
      tooltip: (x, y, v) => `position ${x} “${xLabels[x]}”<br>layer ${layers[y]}: ‖x‖₂ = ${fmt(v)}`,
      onClick: (x) => this.details(x),
    });
  }

  details(position) {
    const out = this.q("#layers-details");
    if (!this.result || !(position >= 0 && position < this.result.positions)) {
      out.replaceChildren(el("p", { class: "muted", text: this.result ? `Position ${position} has no activations.` : "Run the request first." }));
      return;
    }
    const { layers, tokens, boundary, norms } = this.result;
    this.q("#layers-position").value = String(position);
    const values = norms.map((row) => row.get(position));
    const table = el(
      "table",
      { dataset: { position: String(position) } },
      el("thead", {}, el("tr", {}, el("th", { text: "layer" }), el("th", { text: "‖residual‖₂" }), el("th", { text: "change from the layer below" }))),
      el(
        "tbody",
        {},
        ...layers.map((layer, i) =>
          el(
            "tr",
            { dataset: { layer: String(layer), value: String(values[i]) } },
            el("td", { text: String(layer) }),
            el("td", { class: "num", text: fmt(values[i]) }),
            el("td", { class: "num", text: i ? fmt(values[i] - values[i - 1]) : "" }),
          ),
        ),
      ),
    );
    const source = position < boundary ? "prompt" : "generated";
    const chart = el("div", { class: "chart short", role: "img", "aria-label": `Residual norm by layer at position ${position}` });
    out.replaceChildren(el("h3", { text: `Position ${position}: “${label(tokens[position])}” (${source})` }), table, chart);
    bars(chart, {
      title: `‖residual‖₂ by layer at position ${position}`,
      labels: layers.map(String),
      values,
      xName: "layer",
      yName: "‖x‖₂",
      tooltip: (i, v) => `layer ${layers[i]}: ${fmt(v)}`,
    });
  }
}

export default {
  id: "layers",
  title: "Layers × tokens",
  mount(section, ctx) {
    return new LayersView(section, ctx);
  },
};
