/**
 * Attention: one layer's and one head's attention pattern over the shared request's tokens,
 * queries down and keys across, both labelled with the token strings. Each query row shows
 * the keys it could attend to: a sliding-window layer's rows hold only their window (the
 * captures' key_positions), and positions after the query are blank. Where the model has
 * attention sinks the rows exclude the sink's share; it is shown beside the pattern as
 * 1 − row sum, read from the same captures.
 */

import { decodeActivations, describeError } from "../api.mjs";
import { headPattern, mergeCaptures } from "../captures.mjs";
import { fmt } from "../colors.mjs";
import { bars, heatmap } from "../charts.mjs";
import { fillSelect, layerOptions, layersOffering, say } from "../dom.mjs";
import { label, sequence } from "../tokens.mjs";

const SINK_EPSILON = 1e-4; // rows of a softmax without a sink sum to 1 within float error
const TEMPLATE = `
<h2>Attention</h2>
<div class="controls">
  <label>Layer <select id="attn-layer"></select></label>
  <button id="attn-run" type="button">Run the request</button>
  <label>Head <select id="attn-head"></select></label>
</div>
<p id="attn-note" class="muted">Runs the request above with this layer's attention pattern captured (every head), not streamed.</p>
<p id="attn-sinks" class="muted"></p>
<div id="attn-heatmap" class="chart" data-min-height="420" role="img" aria-label="Attention pattern"></div>
<div id="attn-sink-chart" class="chart short" role="img" aria-label="Sink share per query"></div>`;

class AttentionView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.q("#attn-run").addEventListener("click", () => this.run());
    this.q("#attn-head").addEventListener("change", () => this.draw());
    ctx.onModelChange(() => this.refreshControls());
    this.result = null;
  }

  async refreshControls() {
    let listing;
    try {
      listing = await this.ctx.listing();
    } catch (_) {
      return;
    }
    fillSelect(this.q("#attn-layer"), layerOptions(listing, layersOffering(listing, "attention_pattern")));
    fillSelect(this.q("#attn-head"), Array.from({ length: listing.n_heads }, (_, h) => [String(h), `head ${h}`]));
  }

  async run() {
    const ctx = this.ctx;
    try {
      const listing = await ctx.listing();
      const layer = Number(this.q("#attn-layer").value);
      ctx.status(`Running the request with layer ${layer}'s attention pattern…`);
      const hooks = [{ layer_name: layer, component: "attention_pattern" }];
      const request = ctx.request.activationRequest(ctx.model, { activation_hooks: hooks, activation_format: "base64" });
      const body = await ctx.api.post(request.path, request.body);
      const captures = mergeCaptures({}, decodeActivations(body.activations))[`layers.${layer}.attention_pattern`] || [];
      const info = listing.layers[layer];
      this.result = { layer, info, captures, ...sequence(body), capture: body.capture_id };
      this.draw();
      ctx.status(`Attention of layer ${layer} ready.`);
    } catch (error) {
      ctx.status(describeError(error), true);
    }
  }

  draw() {
    if (!this.result) return;
    const { layer, info, captures, tokens, boundary } = this.result;
    const head = Number(this.q("#attn-head").value);
    const sliding = info.attention_type === "sliding_attention" ? info.window : null;
    const pattern = headPattern(captures, head, sliding);
    const keyIndex = new Map(pattern.keys.map((k, i) => [k, i]));
    const data = [];
    pattern.queries.forEach((q, y) => {
      for (const k of pattern.keys) {
        const p = pattern.cells.get(`${q},${k}`);
        if (p !== undefined) data.push([keyIndex.get(k), y, p]);
      }
    });
    const queryLabels = pattern.queries.map((q) => label(tokens[q]));
    const keyLabels = pattern.keys.map((k) => label(tokens[k]));
    const sinks = pattern.queries.map((q) => pattern.sinkShare.get(q));
    const hasSinks = sinks.some((s) => s > SINK_EPSILON);
    const kind = sliding ? `sliding-window layer (window ${sliding}): each row shows only the keys in its window` : "full-attention layer";
    say(this.q("#attn-note"), `Layer ${layer} is a ${kind}. Rows are queries (top to bottom), columns keys (left to right); blank cells are keys the query cannot see. Capture ${this.result.capture}.`);
    say(
      this.q("#attn-sinks"),
      hasSinks
        ? "This model has attention sinks: each row excludes the sink's share, so rows sum to less than 1. The sink share of a row is 1 − row sum, drawn below."
        : "Rows sum to 1 (no attention sink takes a share).",
    );
    const grid = this.q("#attn-heatmap");
    grid.dataset.head = String(head);
    grid.dataset.layer = String(layer);
    heatmap(grid, {
      title: `Layer ${layer}, head ${head}: attention probabilities${hasSinks ? " (sink share excluded)" : ""}`,
      xName: "key token",
      yName: "query token",
      xLabels: keyLabels,
      yLabels: queryLabels,
      data,
      min: 0,
      max: 1,
      scaleLabel: "probability",
      boundary: pattern.keys.indexOf(boundary) >= 0 ? pattern.keys.indexOf(boundary) : null,
      left: 110,
      tooltip: (x, y, v) =>
        `query ${pattern.queries[y]} “${queryLabels[y]}” → key ${pattern.keys[x]} “${keyLabels[x]}”: ${fmt(v)}` +
        (hasSinks ? `<br>sink share of this row: ${fmt(sinks[y])}` : ""),
    });
    const sinkChart = this.q("#attn-sink-chart");
    sinkChart.hidden = !hasSinks;
    sinkChart.dataset.sinkShare = JSON.stringify(sinks);
    if (hasSinks) {
      bars(sinkChart, {
        title: `Sink share per query (1 − row sum), layer ${layer}, head ${head}`,
        labels: queryLabels,
        values: sinks,
        xName: "query token",
        yName: "sink share",
        color: "#8c564b",
        tooltip: (i, v) => `query ${pattern.queries[i]} “${queryLabels[i]}”: sink share ${fmt(v)}`,
      });
    }
  }
}

export default {
  id: "attention",
  title: "Attention",
  mount(section, ctx) {
    const view = new AttentionView(section, ctx);
    view.refreshControls();
    return view;
  },
};
