/**
 * Logit lens: the residual stream after every layer decoded through the model's own final
 * norm and head (POST /v1/analysis/logit_lens on the shared prompt, as written: no chat
 * template). A grid of layers × positions shows each cell's top token and its probability
 * (the cell shaded by that probability on viridis); a click on a cell, or the position box,
 * opens that position's top tokens at every layer, with the rank and probability of the token
 * that comes next (the prompt's next token; at the last position the model's own choice).
 */

import { describeError } from "../api.mjs";
import { bars } from "../charts.mjs";
import { colorIndex, fmt, gradient, inkOn, viridis } from "../colors.mjs";
import { el, say } from "../dom.mjs";
import { label } from "../tokens.mjs";

const TEMPLATE = `
<h2>Logit lens</h2>
<div class="controls">
  <label>Top tokens per cell <input id="lens-top-k" type="number" min="1" max="50" value="5"></label>
  <button id="lens-run" type="button">Run the lens on the prompt</button>
  <label>Position <input id="lens-position" type="number" min="0" value="0"></label>
  <button id="lens-show" type="button" class="secondary">Show position</button>
</div>
<p id="lens-note" class="muted">Reads the prompt above as written (no chat template): each layer's residual stream decoded as if it were the last.</p>
<div class="legend" id="lens-legend" hidden><span>top-1 probability: 0</span><span class="ramp"></span><span>1</span></div>
<div class="scroll"><table id="lens-grid" class="lens-grid"></table></div>
<section id="lens-details" aria-live="polite"></section>`;

class LensView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.q("#lens-legend .ramp").style.background = gradient();
    this.q("#lens-run").addEventListener("click", () => this.run());
    const show = () => this.details(Number(this.q("#lens-position").value));
    this.q("#lens-show").addEventListener("click", show);
    this.q("#lens-position").addEventListener("keydown", (event) => {
      if (event.key === "Enter") show();
    });
    this.q("#lens-grid").addEventListener("click", (event) => {
      const cell = event.target.closest("td[data-position]");
      if (cell) this.details(Number(cell.dataset.position));
    });
    this.lens = null;
  }

  /** The request body this panel sends (the tests send the same one). */
  body() {
    return { model: this.ctx.model, prompt: this.ctx.request.prompt.value, top_k: Math.max(1, Number.parseInt(this.q("#lens-top-k").value, 10) || 1) };
  }

  async run() {
    const ctx = this.ctx;
    const grid = this.q("#lens-grid");
    if (!ctx.offers("/v1/analysis/logit_lens")) return say(this.q("#lens-note"), "This server has no /v1/analysis/logit_lens: it needs a version of mlx-engine that serves the analysis routes.", true);
    try {
      ctx.status("Running the logit lens…");
      const body = this.body();
      const answer = await ctx.api.post("/v1/analysis/logit_lens", body);
      this.lens = answer.lens || answer;
      grid.dataset.request = JSON.stringify(body);
      this.draw();
      const lens = this.lens;
      const error = lens.final_logits_max_error;
      say(this.q("#lens-note"), `${lens.layers.length} rows (the embedding, then each layer) × ${lens.tokens.length} positions; ` +
        `the last row is the model's own output (largest difference from its logits: ${fmt(error)}).`);
      this.q("#lens-position").max = String(lens.tokens.length - 1);
      this.details(lens.tokens.length - 1);
      ctx.status("Logit lens ready: click a cell for that position's top tokens.");
    } catch (error) {
      say(this.q("#lens-note"), describeError(error), true);
      ctx.status(describeError(error), true);
    }
  }

  draw() {
    const lens = this.lens;
    const head = el("tr", {}, el("th", { scope: "col", text: "layer \\ token" }),
      ...lens.token_strings.map((t, p) => el("th", { scope: "col", dataset: { position: String(p) }, text: `${p} ${label(t)}` })));
    const rows = lens.layers.map((layer, r) =>
      el("tr", { dataset: { layer } }, el("th", { scope: "row", text: layer }),
        ...lens.token_strings.map((_, p) => {
          const prob = lens.top_probs[r][p][0];
          const index = colorIndex(prob, 0, 1);
          const top = lens.top_strings[r][p][0];
          return el("td", {
            dataset: { position: String(p), layer, token: top, prob: String(prob), rank: String(lens.next_rank[r][p]) },
            style: `background:${viridis(prob, 0, 1)};color:${inkOn(index)}`,
            title: `layer ${layer}, position ${p}: “${label(top)}” p = ${fmt(prob)}; next token “${label(lens.next_strings[p])}” rank ${lens.next_rank[r][p]}`,
          }, el("span", { class: "lens-token", text: label(top) }), el("span", { class: "lens-prob", text: fmt(prob) }),
          el("span", { class: "lens-rank", text: `next #${lens.next_rank[r][p]}` }));
        })));
    this.q("#lens-grid").replaceChildren(el("caption", { text: "Per layer (rows) and position (columns): the top token, its probability, and the rank of the token that comes next (#0: the top one)" }), el("thead", {}, head), el("tbody", {}, ...rows));
    this.q("#lens-legend").hidden = false;
  }

  details(position) {
    const out = this.q("#lens-details");
    const lens = this.lens;
    if (!lens || !(position >= 0 && position < lens.tokens.length)) {
      out.replaceChildren(el("p", { class: "muted", text: lens ? `The prompt has no position ${position}.` : "Run the lens first." }));
      return;
    }
    this.q("#lens-position").value = String(position);
    const next = label(lens.next_strings[position]);
    const k = lens.top_strings[0][position].length;
    const table = el("table", { dataset: { position: String(position) } },
      el("thead", {}, el("tr", {}, el("th", { text: "layer" }), ...Array.from({ length: k }, (_, i) => el("th", { text: `top ${i + 1}` })),
        el("th", { text: `rank of “${next}”` }), el("th", { text: `p(“${next}”)` }), el("th", { text: "KL(final ‖ layer), nats" }))),
      el("tbody", {}, ...lens.layers.map((layer, r) =>
        el("tr", { dataset: { layer, rank: String(lens.next_rank[r][position]), prob: String(lens.next_prob[r][position]) } },
          el("td", { text: layer }),
          ...lens.top_strings[r][position].map((t, i) => el("td", { text: `${label(t)} ${fmt(lens.top_probs[r][position][i])}` })),
          el("td", { class: "num", text: String(lens.next_rank[r][position]) }),
          el("td", { class: "num", text: fmt(lens.next_prob[r][position]) }),
          el("td", { class: "num", text: fmt(lens.kl_to_final[r][position]) })))));
    const chart = el("div", { class: "chart short", role: "img", "aria-label": `Probability of the next token by layer at position ${position}` });
    const source = position === lens.tokens.length - 1 ? "the model's own next token" : "the prompt's next token";
    out.replaceChildren(el("h3", { text: `Position ${position}: “${label(lens.token_strings[position])}” → “${next}” (${source})` }), table, chart);
    bars(chart, {
      title: `p(“${next}”) by layer at position ${position}`,
      labels: lens.layers,
      values: lens.layers.map((_, r) => lens.next_prob[r][position]),
      xName: "layer",
      yName: "probability",
      tooltip: (i, v) => `layer ${lens.layers[i]}: p = ${fmt(v)}, rank ${lens.next_rank[i][position]}`,
    });
  }
}

export default {
  id: "lens",
  title: "Logit lens",
  mount(section, ctx) {
    return new LensView(section, ctx);
  },
};
