/**
 * Models: the models the server has loaded (load one more, unload one), the chosen model's
 * hook points (every layer's components and their shapes), and the process's memory, polled
 * from GET /v1/memory every two seconds while this tab is open, with the extraction jobs and
 * their progress (extract_jobs.mjs) polled alongside.
 */

import { describeError } from "../api.mjs";
import { lines } from "../charts.mjs";
import { el, say } from "../dom.mjs";
import { ExtractJobs } from "../extract_jobs.mjs";

const POLL_MS = 2000;
const HISTORY = 150; // samples kept for the chart: five minutes
const TEMPLATE = `
<h2>Models</h2>
<form id="models-load" class="controls" autocomplete="off">
  <label>Load a model <input id="models-name" type="text" size="32" placeholder="folder under a --model-root, or owner/name"></label>
  <button type="submit">Load</button>
  <span id="models-load-status" class="muted"></span>
</form>
<div class="scroll"><table id="models-table"></table></div>
<h3>Memory <span class="muted">(live, every 2 s while this tab is open)</span></h3>
<div class="columns">
  <dl id="models-memory" class="memory"></dl>
  <div id="models-memory-chart" class="chart short" role="img" aria-label="Memory over time"></div>
</div>
<section id="models-jobs" aria-label="Extraction jobs"></section>
<h3 id="models-hooks-title">Hook points</h3>
<p id="models-notes" class="muted"></p>
<div class="scroll"><table id="models-hooks"></table></div>`;

function bytes(n) {
  if (n === null || n === undefined) return "not reported here";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

class ModelsView {
  constructor(section, ctx) {
    this.ctx = ctx;
    section.innerHTML = TEMPLATE;
    this.q = (selector) => section.querySelector(selector);
    this.samples = [];
    this.timer = null;
    this.parameterBytes = new Map();
    this.q("#models-load").addEventListener("submit", (event) => {
      event.preventDefault();
      this.load(this.q("#models-name").value.trim());
    });
    ctx.onModelChange(() => this.drawHooks());
    this.jobs = new ExtractJobs(this.q("#models-jobs"), ctx);
  }

  show() {
    this.refresh();
    this.jobs.refreshControls();
    this.poll();
    if (this.timer === null) this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  hide() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    try {
      const models = (await this.ctx.api.get("/v1/models")).data;
      const head = el("tr", {}, ...["id", "type", "native", "Harmony", "layers", "d_model", "weights", ""].map((h) => el("th", { text: h })));
      const rows = models.map((m) => {
        const unload = el("button", { type: "button", class: "secondary", text: `Unload ${m.id}` });
        unload.addEventListener("click", () => this.unload(m.id));
        return el(
          "tr",
          { dataset: { model: m.id } },
          ...[m.id, m.model_type, m.native ? "yes" : "no", m.harmony ? "yes" : "no", m.num_layers, m.d_model].map((v) => el("td", { text: String(v) })),
          el("td", { class: "num", dataset: { role: "weights" }, text: this.parameterBytes.has(m.id) ? bytes(this.parameterBytes.get(m.id)) : "…" }),
          el("td", {}, unload),
        );
      });
      this.q("#models-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
      this.drawHooks();
    } catch (error) {
      this.ctx.status(describeError(error), true);
    }
  }

  async load(name) {
    const status = this.q("#models-load-status");
    if (!name) return say(status, "Name a model first.", true);
    say(status, `Loading ${name}…`);
    try {
      const model = await this.ctx.api.post("/v1/models/load", { model: name });
      say(status, `Loaded ${model.id}.`);
      await this.ctx.refreshModels();
      await this.refresh();
      await this.poll();
    } catch (error) {
      say(status, describeError(error), true);
    }
  }

  async unload(id) {
    const status = this.q("#models-load-status");
    try {
      await this.ctx.api.post("/v1/models/unload", { model: id });
      say(status, `Unloaded ${id}.`);
      this.ctx.listings.delete(id);
      await this.ctx.refreshModels();
      await this.refresh();
    } catch (error) {
      say(status, describeError(error), true);
    }
  }

  async poll() {
    try {
      const [memory, health] = await Promise.all([this.ctx.api.get("/v1/memory"), this.ctx.api.get("/health"), this.jobs.poll()]);
      for (const m of memory.models) this.parameterBytes.set(m.id, m.parameter_bytes);
      for (const cell of this.q("#models-table").querySelectorAll("tr[data-model]")) {
        cell.querySelector('[data-role="weights"]').textContent = bytes(this.parameterBytes.get(cell.dataset.model));
      }
      const entries = [
        ["resident set (process)", memory.process.rss_bytes, "rss"],
        ["peak resident set", memory.process.peak_rss_bytes, "peak-rss"],
        ["MLX active", memory.mlx.active_bytes, "mlx-active"],
        ["MLX cache", memory.mlx.cache_bytes, "mlx-cache"],
        ["MLX peak", memory.mlx.peak_bytes, "mlx-peak"],
      ];
      const list = this.q("#models-memory");
      list.replaceChildren(
        ...entries.flatMap(([name, value, key]) => [el("dt", { text: name }), el("dd", { dataset: { key, bytes: String(value ?? "") }, text: bytes(value) })]),
        el("dt", { text: "engine" }),
        el("dd", { text: `${health.engine.busy ? "busy" : "idle"}, ${health.engine.queue_depth} queued, ${health.engine.completed_generations} done` }),
      );
      list.dataset.updated = new Date().toISOString();
      this.samples.push({ t: new Date().toLocaleTimeString(), rss: memory.process.rss_bytes, active: memory.mlx.active_bytes, cache: memory.mlx.cache_bytes });
      if (this.samples.length > HISTORY) this.samples.shift();
      const mib = (v) => (v === null || v === undefined ? null : v / 2 ** 20);
      lines(this.q("#models-memory-chart"), {
        title: "Memory (MiB)",
        x: this.samples.map((s) => s.t),
        xName: "time",
        yName: "MiB",
        format: (v) => `${Number(v).toFixed(1)} MiB`,
        series: [
          { name: "resident set", data: this.samples.map((s) => mib(s.rss)) },
          { name: "MLX active", data: this.samples.map((s) => mib(s.active)) },
          { name: "MLX cache", data: this.samples.map((s) => mib(s.cache)) },
        ],
      });
    } catch (error) {
      this.ctx.status(describeError(error), true);
    }
  }

  async drawHooks() {
    let listing;
    try {
      listing = await this.ctx.listing();
    } catch (_) {
      this.q("#models-hooks").replaceChildren();
      return;
    }
    this.q("#models-hooks-title").textContent = `Hook points of ${listing.model}`;
    const neurons = Object.entries(listing.neurons || {}).map(([c, meaning]) => `${c}: ${meaning}`);
    say(
      this.q("#models-notes"),
      `${listing.model_type}, ${listing.num_layers} layers, d_model ${listing.d_model}, ${listing.n_heads} heads (${listing.n_kv_heads} key/value). ` +
        [...(listing.notes || []), ...neurons].join(". "),
    );
    const components = listing.components.filter((c) => c !== "embedding");
    const head = el("tr", {}, el("th", { text: "layer" }), el("th", { text: "attention" }), ...components.map((c) => el("th", { text: c })));
    const rows = listing.layers.map((layer) =>
      el(
        "tr",
        { dataset: { layer: String(layer.layer) } },
        el("td", { text: String(layer.layer) }),
        el("td", { text: layer.window ? `${layer.attention_type} (${layer.window})` : layer.attention_type || "" }),
        ...components.map((c) => el("td", { text: layer.components[c] ? `[${layer.components[c].shape.join(", ")}]` : "–" })),
      ),
    );
    this.q("#models-hooks").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  }
}

export default {
  id: "models",
  title: "Models",
  mount(section, ctx) {
    return new ModelsView(section, ctx);
  },
};
