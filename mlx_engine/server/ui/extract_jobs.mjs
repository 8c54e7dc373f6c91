/**
 * Extraction jobs, shown in the Models panel next to the memory: start one (POST /v1/extract:
 * the documents typed here, the chosen hooks), follow every job's progress (GET /v1/extract,
 * polled with the memory), cancel a running one (DELETE /v1/extract/{id}). A job writes a new
 * activation store under the server's --store-root; a server started without one answers 403,
 * and the page shows that answer.
 */

import { describeError } from "./api.mjs";
import { fmt } from "./colors.mjs";
import { el, fillSelect, layerOptions, layersOffering, say } from "./dom.mjs";

const TEMPLATE = `
<h3>Extraction jobs <span class="muted">(activation stores written under the server's --store-root)</span></h3>
<form id="jobs-start" class="controls" autocomplete="off">
  <label>Documents, one per line<br><textarea id="jobs-documents" rows="3" cols="48">def add(a, b):
    return a + b
The cat sat on the mat.</textarea></label>
  <label>Component <select id="jobs-component"></select></label>
  <label>Layers <select id="jobs-layers" multiple size="4"></select></label>
  <label>Context size <input id="jobs-context" type="number" min="1" value="64"></label>
  <button type="submit">Start extraction</button>
  <span id="jobs-start-status" class="muted" aria-live="polite"></span>
</form>
<div class="scroll"><table id="jobs-table"></table></div>`;

const STORABLE = ["mlp_post", "residual", "mlp_pre", "resid_mid", "attention", "mlp", "layernorm"];

export class ExtractJobs {
  /** @param {HTMLElement} root where the section goes  @param {object} ctx the panels' context */
  constructor(root, ctx) {
    this.ctx = ctx;
    root.innerHTML = TEMPLATE;
    this.q = (selector) => root.querySelector(selector);
    this.q("#jobs-start").addEventListener("submit", (event) => {
      event.preventDefault();
      this.start();
    });
    this.q("#jobs-component").addEventListener("change", () => this.refreshControls());
    ctx.onModelChange(() => this.refreshControls());
  }

  async refreshControls() {
    let listing;
    try {
      listing = await this.ctx.listing();
    } catch (_) {
      return;
    }
    const components = STORABLE.filter((c) => listing.components.includes(c));
    fillSelect(this.q("#jobs-component"), components.map((c) => [c, c]));
    const layers = layersOffering(listing, this.q("#jobs-component").value);
    const select = this.q("#jobs-layers");
    const chosen = new Set([...select.selectedOptions].map((o) => o.value));
    fillSelect(select, layerOptions(listing, layers));
    for (const option of select.options) option.selected = chosen.size ? chosen.has(option.value) : option.value === String(layers[0]);
  }

  async start() {
    const status = this.q("#jobs-start-status");
    const documents = this.q("#jobs-documents").value.split("\n").map((s) => s.trim()).filter(Boolean);
    const component = this.q("#jobs-component").value;
    const layers = [...this.q("#jobs-layers").selectedOptions].map((o) => Number(o.value));
    if (!documents.length) return say(status, "Type at least one document.", true);
    if (!layers.length) return say(status, "Choose at least one layer.", true);
    try {
      const body = {
        model: this.ctx.model,
        documents,
        hooks: layers.map((layer) => ({ layer_name: layer, component })),
        context_size: Math.max(1, Number.parseInt(this.q("#jobs-context").value, 10) || 1),
      };
      const job = await this.ctx.api.post("/v1/extract", body);
      say(status, `Started ${job.id}: writing store ${job.store}.`);
      await this.poll();
    } catch (error) {
      say(status, describeError(error), true);
    }
  }

  async cancel(id) {
    try {
      await this.ctx.api.request("DELETE", `/v1/extract/${encodeURIComponent(id)}`);
      await this.poll();
    } catch (error) {
      say(this.q("#jobs-start-status"), describeError(error), true);
    }
  }

  /** Redraw the job table from GET /v1/extract (called with each memory poll). */
  async poll() {
    const table = this.q("#jobs-table");
    let jobs;
    try {
      jobs = (await this.ctx.api.get("/v1/extract")).data;
    } catch (error) {
      table.replaceChildren(el("caption", { class: "error", text: describeError(error) }));
      return;
    }
    const head = el("tr", {}, ...["job", "model", "store", "state", "progress", "tokens", "tokens/s", "ETA", ""].map((h) => el("th", { text: h })));
    const rows = jobs.map((job) => {
      const progress = el("progress", { max: String(job.documents_total), value: String(job.documents_done), "aria-label": `${job.id} documents done` });
      const cancel = job.state === "running" ? el("button", { type: "button", class: "secondary", text: `Cancel ${job.id}` }) : null;
      if (cancel) cancel.addEventListener("click", () => this.cancel(job.id));
      return el(
        "tr",
        { dataset: { job: job.id, state: job.state, documentsDone: String(job.documents_done), tokensDone: String(job.tokens_done) } },
        el("td", { text: job.id }),
        el("td", { text: job.model }),
        el("td", { text: job.store }),
        el("td", { class: job.state === "failed" ? "error" : null, text: job.error ? `${job.state}: ${job.error}` : job.state }),
        el("td", {}, progress, ` ${job.documents_done} / ${job.documents_total} documents`),
        el("td", { class: "num", text: String(job.tokens_done) }),
        el("td", { class: "num", text: job.tokens_per_second === null ? "–" : fmt(job.tokens_per_second) }),
        el("td", { class: "num", text: job.eta_seconds === null ? "–" : `${fmt(job.eta_seconds)} s` }),
        el("td", {}, cancel),
      );
    });
    const empty = jobs.length ? null : el("caption", { class: "muted", text: "No extraction jobs yet." });
    table.replaceChildren(...[empty, el("thead", {}, head), el("tbody", {}, ...rows)].filter(Boolean));
  }
}
