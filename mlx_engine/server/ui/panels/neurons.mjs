/**
 * Neurons and features: one neuron (or SAE feature) of an activation store under the server's
 * --store-root. Its online statistics and its layer's summary (GET /v1/stores/{id}/stats),
 * a histogram of the layer's neurons with this one marked, the histogram of its own activations
 * over the store's rows (…/distribution), its top-activating examples with every token shaded
 * by its value (…/top_examples, Neuronpedia's fields), the n-grams that fire it and the neurons a
 * typed token or n-gram fires (…/reverse), the layer's dead neurons, and the hook's neurons
 * ranked by polysemanticity (…/polysemantic; a click opens one). Search is by hook (a layer and
 * component the store holds) and index.
 */

import { describeError } from "../api.mjs";
import { bars } from "../charts.mjs";
import { fmt } from "../colors.mjs";
import { el, fillSelect, say } from "../dom.mjs";
import { label } from "../tokens.mjs";

const STATS = ["mean", "std", "skewness", "kurtosis", "min", "max", "frac_active", "participation_ratio", "mean_abs", "dead"];
const SUMMARY = ["width", "tokens", "mean", "std", "min", "max", "frac_active", "dead", "dead_threshold", "l1_participation", "compression_potential"];
const BINS = 20;
const TEMPLATE = `
<h2>Neurons and features</h2>
<div class="controls">
  <label>Store <select id="neu-store"></select></label>
  <button id="neu-refresh" type="button" class="secondary">Refresh the list</button>
  <label>Hook <select id="neu-hook"></select></label>
  <label><span id="neu-unit">Neuron</span> <input id="neu-index" type="number" min="0" value="0"></label>
  <label>Examples <input id="neu-k" type="number" min="1" max="100" value="8"></label>
  <button id="neu-show" type="button">Show</button>
</div>
<p id="neu-note" class="muted" aria-live="polite"></p>
<div class="columns">
  <div><h3 id="neu-stats-title">Statistics</h3><table id="neu-stats"></table><h3>The layer</h3><table id="neu-summary"></table></div>
  <div><label>Histogram of <select id="neu-hist-stat"></select> over the hook's neurons</label>
    <div id="neu-hist" class="chart short" role="img" aria-label="Histogram over the hook's neurons"></div></div>
</div>
<h3>Its activations over the store</h3>
<div class="controls"><label>Bins <input id="neu-bins" type="number" min="1" max="1024" value="32"></label></div>
<div id="neu-dist" class="chart short" role="img" aria-label="Histogram of the neuron's activation values over the store's rows"></div>
<p id="neu-dist-note" class="muted"></p>
<h3>Top-activating examples</h3>
<p class="muted">Each token shaded by its value over these examples' largest (orange above zero, blue below); the peak is outlined; hover for the value.</p>
<ol id="neu-examples" class="examples"></ol>
<div class="lists">
  <div><h3>N-grams that fire it</h3><div id="neu-ngrams"></div></div>
  <div><h3>Neurons a token or n-gram fires</h3>
    <form id="neu-reverse" class="controls" autocomplete="off">
      <label>Token or n-gram <input id="neu-ngram" type="text" size="16" value=" the"></label>
      <button type="submit" class="secondary">Find neurons</button>
    </form>
    <div id="neu-token-neurons"></div></div>
</div>
<h3>Dead and polysemantic</h3>
<div class="controls"><label>Dead neurons <select id="neu-dead"></select></label></div>
<p id="neu-poly" class="muted"></p>
<form id="neu-poly-form" class="controls" autocomplete="off">
  <label>Rank the <input id="neu-poly-top" type="number" min="1" max="500" value="20"> most polysemantic</label>
  <label>of the neurons <input id="neu-poly-neurons" type="text" size="14" placeholder="all, or 3,17,40"></label>
  <button type="submit" class="secondary">Rank</button>
</form>
<p id="neu-poly-note" class="muted" aria-live="polite"></p>
<div id="neu-poly-list"></div>`;

/** An n-gram's token strings (a list) as one label, tokens separated by a middle dot. */
function gram(text) {
  return Array.isArray(text) ? text.map(label).join("·") : label(String(text));
}

function table(head, rows, attrs = {}) {
  return el("table", attrs, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))), el("tbody", {}, ...rows));
}

/** A token of an example, shaded by `value / scale` (orange for ≥ 0, blue below), as examples_html does. */
function shaded(token, value, scale, peak) {
  const alpha = Math.min(1, Math.abs(value) / scale);
  const colour = value >= 0 ? `rgba(255,120,0,${alpha.toFixed(3)})` : `rgba(0,100,255,${alpha.toFixed(3)})`;
  return el("span", { class: peak ? "tok peak" : "tok", style: `background:${colour}`, title: fmt(value), dataset: { value: String(value), token } }, label(token));
}

class NeuronsView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.stores = [];
    this.stats = null;
    fillSelect(this.q("#neu-hist-stat"), STATS.filter((s) => s !== "dead").map((s) => [s, s]), "mean");
    this.q("#neu-refresh").addEventListener("click", () => this.loadStores());
    this.q("#neu-store").addEventListener("change", () => this.fillHooks());
    this.q("#neu-hook").addEventListener("change", () => this.fillHooks(false));
    this.q("#neu-show").addEventListener("click", () => this.show_());
    this.q("#neu-index").addEventListener("keydown", (event) => {
      if (event.key === "Enter") this.show_();
    });
    this.q("#neu-hist-stat").addEventListener("change", () => this.drawHistogram());
    this.q("#neu-dead").addEventListener("change", () => this.pick(Number(this.q("#neu-dead").value)));
    this.q("#neu-reverse").addEventListener("submit", (event) => {
      event.preventDefault();
      this.tokenNeurons();
    });
    this.q("#neu-bins").addEventListener("change", () => this.shown !== null && this.distribution(this.shown).catch((error) => say(this.q("#neu-dist-note"), describeError(error), true)));
    this.q("#neu-poly-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.polysemantic();
    });
    this.shown = null; // the neuron whose details are drawn
  }

  show() {
    this.loadStores(); // each time: a store an extraction job just wrote appears
  }

  base() {
    return `/v1/stores/${encodeURIComponent(this.q("#neu-store").value)}`;
  }

  hook() {
    return this.q("#neu-hook").value;
  }

  query(params) {
    return new URLSearchParams({ hook: this.hook(), ...params }).toString();
  }

  async loadStores() {
    const note = this.q("#neu-note");
    try {
      this.stores = (await this.ctx.api.get("/v1/stores")).data;
    } catch (error) {
      this.stores = [];
      return say(note, error.code === "not_found" ? "This server has no /v1/stores: start it with --store-root DIR." : describeError(error), true);
    }
    fillSelect(this.q("#neu-store"), this.stores.map((s) => [s.id, `${s.id} (${s.model}, ${s.documents ?? "?"} documents, ${s.tokens} tokens, ${s.status})`]));
    if (!this.stores.length) return say(note, "No activation stores under this server's --store-root (or it has none: start it with --store-root DIR). Start one in the Models panel.");
    say(note, `${this.stores.length} store(s).`);
    this.fillHooks();
  }

  fillHooks(refill = true) {
    const store = this.stores.find((s) => s.id === this.q("#neu-store").value);
    if (!store) return;
    if (refill) fillSelect(this.q("#neu-hook"), store.hooks.map((h) => [h.hook, `${h.hook} (width ${h.width})`]));
    const info = store.hooks.find((h) => h.hook === this.hook());
    if (!info) return;
    this.q("#neu-index").max = String(info.width - 1);
    this.q("#neu-unit").textContent = info.component === "sae_features" ? "Feature" : "Neuron";
    this.stats = null;
  }

  pick(index) {
    this.q("#neu-index").value = String(index);
    this.show_();
  }

  async show_() {
    const ctx = this.ctx;
    const neuron = Number(this.q("#neu-index").value);
    const k = Math.max(1, Number.parseInt(this.q("#neu-k").value, 10) || 1);
    if (!this.hook()) return say(this.q("#neu-note"), "Choose a store and a hook first.", true);
    try {
      ctx.status(`Reading neuron ${neuron} of ${this.hook()}…`);
      if (!this.stats || this.stats.hook !== this.hook() || this.stats.store !== this.q("#neu-store").value) {
        this.stats = await ctx.api.get(`${this.base()}/stats?${this.query({})}`);
        this.drawLayer();
      }
      const row = this.stats.neurons[neuron];
      if (!row) throw new Error(`${this.hook()} has neurons 0..${this.stats.neurons.length - 1}, not ${neuron}`);
      this.drawNeuron(row);
      this.drawHistogram();
      this.shown = neuron;
      const [examples, reverse] = await Promise.all([
        ctx.api.get(`${this.base()}/top_examples?${this.query({ neuron, k })}`),
        ctx.api.get(`${this.base()}/reverse?${this.query({ neuron, n: 3, k: 5 })}`),
        this.distribution(neuron),
      ]);
      this.drawExamples(examples.examples);
      this.drawNgrams(reverse.ngrams);
      ctx.status(`Neuron ${neuron} of ${this.hook()}.`);
    } catch (error) {
      ctx.status(describeError(error), true);
      say(this.q("#neu-note"), describeError(error), true);
    }
  }

  drawLayer() {
    const s = this.stats.summary;
    this.q("#neu-summary").replaceChildren(...SUMMARY.map((key) => el("tr", {}, el("th", { text: key }), el("td", { class: "num", dataset: { key }, text: fmt(s[key]) }))));
    const dead = this.stats.neurons.filter((r) => r.dead).map((r) => r.neuron);
    fillSelect(this.q("#neu-dead"), [["", `${dead.length} dead (max ≤ ${fmt(s.dead_threshold)})`], ...dead.map((i) => [String(i), `neuron ${i}`])]);
    this.q("#neu-dead").dataset.dead = JSON.stringify(dead);
  }

  drawNeuron(row) {
    this.q("#neu-stats-title").textContent = `Statistics of ${this.q("#neu-unit").textContent.toLowerCase()} ${row.neuron} (${row.hook_id})`;
    const cells = STATS.map((key) => el("tr", {}, el("th", { text: key }), el("td", { class: "num", dataset: { key, value: String(row[key]) }, text: key === "dead" ? (row.dead ? "yes" : "no") : fmt(row[key]) })));
    this.q("#neu-stats").replaceChildren(...cells);
    this.q("#neu-stats").dataset.neuron = String(row.neuron);
  }

  /** Counts of the chosen statistic over the hook's neurons in BINS equal bins; the chosen neuron's bin in red. */
  drawHistogram() {
    if (!this.stats) return;
    const key = this.q("#neu-hist-stat").value;
    const values = this.stats.neurons.map((r) => r[key]).filter(Number.isFinite);
    if (!values.length) return;
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const width = hi > lo ? (hi - lo) / BINS : 1;
    const bin = (v) => Math.min(BINS - 1, Math.floor((v - lo) / width));
    const counts = new Array(BINS).fill(0);
    for (const v of values) counts[bin(v)] += 1;
    const mine = this.stats.neurons[Number(this.q("#neu-index").value)];
    const marked = mine && Number.isFinite(mine[key]) ? bin(mine[key]) : -1;
    const edges = Array.from({ length: BINS }, (_, i) => lo + i * width);
    const chart = this.q("#neu-hist");
    chart.dataset.counts = JSON.stringify(counts);
    bars(chart, {
      title: `${key} over ${values.length} neurons (this one: ${mine ? fmt(mine[key]) : "–"})`,
      labels: edges.map((e) => fmt(e)),
      values: counts.map((c, i) => (i === marked ? { value: c, itemStyle: { color: "#d62728" } } : c)),
      xName: `${key} (bin start)`,
      yName: "neurons",
      tooltip: (i, v) => `${fmt(edges[i])} to ${fmt(edges[i] + width)}: ${typeof v === "object" ? v.value : v} neurons${i === marked ? " (this one)" : ""}`,
    });
  }

  /** The neuron's own histogram: counts of its activation values over the store's rows, in equal bins (…/distribution). */
  async distribution(neuron) {
    const bins = Math.min(1024, Math.max(1, Number.parseInt(this.q("#neu-bins").value, 10) || 32));
    const hook = this.hook();
    const d = await this.ctx.api.get(`${this.base()}/distribution?${this.query({ neuron, bins })}`);
    const centres = d.counts.map((_, i) => (d.edges[i] + d.edges[i + 1]) / 2);
    const chart = this.q("#neu-dist");
    const unit = this.q("#neu-unit").textContent.toLowerCase();
    const title = `Activations of ${unit} ${neuron} (${hook})`;
    Object.assign(chart.dataset, { hook, neuron: String(neuron), title, counts: JSON.stringify(d.counts), edges: JSON.stringify(d.edges) });
    bars(chart, {
      title,
      labels: centres.map((c) => fmt(c)),
      values: d.counts,
      xName: "activation value (bin centre)",
      yName: "count",
      tooltip: (i, v) => `${fmt(d.edges[i])} to ${fmt(d.edges[i + 1])}: ${v} rows`,
    });
    say(this.q("#neu-dist-note"), `${d.sample_rows} of ${d.total_rows} rows${d.exact ? " (all of them)" : " (an even sample)"} in ${d.bins} bins ` +
      `from ${fmt(d.range[0])} to ${fmt(d.range[1])}; quartiles ${fmt(d.q1)}, ${fmt(d.median)}, ${fmt(d.q3)}; ` +
      `${d.z_outliers} z-score and ${d.iqr_outliers} IQR outliers.`);
  }

  /** The hook's neurons ranked by how many kinds of context their top examples fall into (…/polysemantic). */
  async polysemantic() {
    const note = this.q("#neu-poly-note");
    const out = this.q("#neu-poly-list");
    if (!this.hook()) return say(note, "Choose a store and a hook first.", true);
    const top = Math.min(500, Math.max(1, Number.parseInt(this.q("#neu-poly-top").value, 10) || 20));
    const neurons = this.q("#neu-poly-neurons").value.replace(/\s+/g, "");
    try {
      say(note, `Clustering the top examples of ${neurons ? "the chosen" : "every"} neuron of ${this.hook()}…`);
      const answer = await this.ctx.api.get(`${this.base()}/polysemantic?${this.query(neurons ? { top, neurons } : { top })}`);
      const rows = answer.neurons.map((r) => {
        const go = el("button", { type: "button", class: "secondary", text: `neuron ${r.neuron}` });
        go.addEventListener("click", () => this.pick(r.neuron));
        return el("tr", { dataset: { neuron: String(r.neuron), rank: String(r.rank), clusters: String(r.clusters), tokenEntropy: String(r.token_entropy) } },
          el("td", { class: "num", text: String(r.rank + 1) }), el("td", {}, go), el("td", { class: "num", text: String(r.clusters) }),
          el("td", { class: "num", text: fmt(r.token_entropy) }), el("td", { class: "num", text: String(r.distinct_tokens) }), el("td", { class: "num", text: String(r.examples) }));
      });
      out.replaceChildren(table(["rank", "neuron", "context clusters", "token entropy", "distinct tokens", "examples"], rows, { dataset: { hook: answer.hook } }));
      say(note, `${answer.scored} neurons scored (their top ${answer.k} examples clustered at cosine distance ${fmt(answer.distance)}); the first ${rows.length} by clusters, then token entropy. Click one to open it.`);
    } catch (error) {
      out.replaceChildren();
      say(note, describeError(error), true);
    }
  }

  /** The token-entropy measure of polysemanticity (analysis/neurons/polysemantic.py) over the examples' peak tokens. */
  drawPolysemanticity(examples) {
    const counts = new Map();
    for (const e of examples) counts.set(e.token_id, (counts.get(e.token_id) || 0) + 1);
    const n = examples.length;
    let h = 0;
    for (const c of counts.values()) h -= (c / n) * Math.log(c / n);
    const entropy = n < 2 ? 0 : Math.min(1, h / Math.log(n));
    const out = this.q("#neu-poly");
    out.dataset.tokenEntropy = String(entropy);
    say(out, `Its ${n} top examples peak on ${counts.size} distinct token(s): normalised token entropy ${fmt(entropy)} ` +
      "(0: always the same token, 1: all different; high values suggest a polysemantic neuron). “Rank” below clusters the " +
      "contexts of the hook's neurons and ranks them.");
  }

  drawExamples(examples) {
    this.drawPolysemanticity(examples);
    const list = this.q("#neu-examples");
    if (!examples.length) return list.replaceChildren(el("li", { class: "muted", text: "No examples: the neuron never appeared in the store's top-k." }));
    const scale = Math.max(...examples.flatMap((e) => e.values.map(Math.abs))) || 1;
    list.replaceChildren(...examples.map((e) => el("li", { dataset: { maxValue: String(e.maxValue), doc: String(e.doc), pos: String(e.pos) } },
      el("code", { text: `${fmt(e.maxValue)} ` }), el("small", { class: "muted", text: `doc ${e.doc} pos ${e.pos}: ` }),
      ...e.tokens.map((t, i) => shaded(t, e.values[i], scale, i === e.maxValueTokenIndex)))));
  }

  drawNgrams(ngrams) {
    const out = this.q("#neu-ngrams");
    const blocks = Object.entries(ngrams).map(([n, rows]) => table([`${n}-gram`, "mean", "count"],
      rows.map((r) => el("tr", { dataset: { mean: String(r.mean), count: String(r.count) } }, el("td", { text: gram(r.text) }), el("td", { class: "num", text: fmt(r.mean) }), el("td", { class: "num", text: String(r.count) }))),
      { dataset: { n } }));
    out.replaceChildren(...blocks);
  }

  async tokenNeurons() {
    const out = this.q("#neu-token-neurons");
    if (!this.hook()) return say(out, "Choose a store and a hook first.", true);
    try {
      const answer = await this.ctx.api.get(`${this.base()}/reverse?${this.query({ ngram: this.q("#neu-ngram").value, k: 10 })}`);
      const found = answer.hooks[this.hook()];
      if (!answer.count || !found) return say(out, `“${gram(answer.text)}” does not occur in this store.`);
      const rows = found.neurons.map((r) => {
        const go = el("button", { type: "button", class: "secondary", text: `neuron ${r.neuron}` });
        go.addEventListener("click", () => this.pick(r.neuron));
        return el("tr", { dataset: { neuron: String(r.neuron), mean: String(r.mean) } }, el("td", {}, go), el("td", { class: "num", text: fmt(r.mean) }), el("td", { class: "num", text: fmt(r.zscore) }), el("td", { class: "num", text: fmt(r.overall_mean) }));
      });
      out.replaceChildren(el("p", { class: "muted", text: `“${gram(answer.text)}” occurs ${answer.count} times; mean activation there:` }),
        table(["neuron", "mean there", "z-score", "overall mean"], rows));
    } catch (error) {
      say(out, describeError(error), true);
    }
  }
}

export default {
  id: "neurons",
  title: "Neurons and features",
  mount(section, ctx) {
    return new NeuronsView(section, ctx);
  },
};
