/**
 * The viewer's shell: the connection bar (API key, model), the shared request form, and one
 * tab per panel. A panel is one ES module under panels/ that default-exports
 * `{ id, title, mount(section, ctx) }`; `mount` may return `{ show(), hide() }`, called each
 * time its tab opens and closes. Adding a panel is one module and one name in PANELS.
 */

import { Api, describeError } from "./api.mjs";
import { resizeCharts } from "./charts.mjs";
import { el, fillSelect, say } from "./dom.mjs";
import { RequestForm } from "./request.mjs";

const PANELS = ["generate", "layers", "attention", "lens", "neurons", "steer", "models"];

/** What every panel is given: the API, the shared request, the chosen model and its listing. */
class Context {
  constructor(api, request) {
    this.api = api;
    this.request = request;
    this.model = null;
    this.listings = new Map();
    this.modelListeners = [];
    this.paths = null; // the API's paths from /openapi.json (null until read)
    this.statusLine = document.getElementById("status");
  }

  /** The hook-point listing of the chosen model (fetched once per model). */
  async listing() {
    if (!this.model) throw new Error("no model is loaded on this server");
    if (!this.listings.has(this.model)) {
      const id = this.model;
      const pending = this.api.get(`/v1/models/${encodeURIComponent(id)}/hook_points`);
      this.listings.set(id, pending);
      pending.catch(() => this.listings.delete(id));
    }
    return this.listings.get(this.model);
  }

  /** Whether this server offers `path` (as /openapi.json spells it, e.g. "/v1/stores/{store_id}/stats"). */
  offers(path) {
    return this.paths === null || this.paths.has(path);
  }

  onModelChange(listener) {
    this.modelListeners.push(listener);
  }

  setModel(id) {
    if (id === this.model) return;
    this.model = id || null;
    for (const listener of this.modelListeners) listener(this.model);
  }

  status(message, isError = false) {
    say(this.statusLine, message, isError);
  }
}

async function refreshModels(ctx, select, serverStatus) {
  try {
    const health = await ctx.api.get("/health");
    const models = (await ctx.api.get("/v1/models")).data;
    fillSelect(select, models.map((m) => [m.id, `${m.id} (${m.model_type}, ${m.num_layers} layers)`]), ctx.model);
    if (!models.length) select.replaceChildren(el("option", { value: "", text: "(no model loaded)" }));
    ctx.setModel(select.value);
    say(serverStatus, `server ${health.status}; ${models.length} model(s) loaded`);
    return models;
  } catch (error) {
    say(serverStatus, describeError(error), true);
    return [];
  }
}

function buildTabs(ctx) {
  const tabs = document.getElementById("tabs");
  const main = document.getElementById("panels");
  const entries = [];
  let current = -1;
  const open = (index, focus = false) => {
    if (current >= 0 && current !== index && entries[current].view && entries[current].view.hide) entries[current].view.hide();
    current = index;
    entries.forEach((entry, i) => {
      const selected = i === index;
      entry.tab.setAttribute("aria-selected", String(selected));
      entry.tab.tabIndex = selected ? 0 : -1;
      entry.section.hidden = !selected;
    });
    if (focus) entries[index].tab.focus();
    history.replaceState(null, "", `#${entries[index].id}`);
    const view = entries[index].view;
    if (view && view.show) view.show();
    resizeCharts();
  };
  return {
    entries,
    open,
    add(panel, view, section) {
      const index = entries.length;
      const tab = el("button", { type: "button", role: "tab", id: `tab-${panel.id}`, "aria-controls": `panel-${panel.id}`, text: panel.title });
      tab.addEventListener("click", () => open(index));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (step) open((index + step + entries.length) % entries.length, true);
      });
      tabs.append(tab);
      main.append(section);
      entries.push({ id: panel.id, tab, section, view });
    },
  };
}

async function start() {
  const api = new Api("");
  const ctx = new Context(api, new RequestForm(document.getElementById("request")));
  const select = document.getElementById("model-select");
  const serverStatus = document.getElementById("server-status");
  select.addEventListener("change", () => ctx.setModel(select.value));
  ctx.refreshModels = () => refreshModels(ctx, select, serverStatus);
  document.getElementById("connection").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setKey(document.getElementById("api-key").value);
    ctx.listings.clear();
    ctx.refreshModels();
  });
  const tabs = buildTabs(ctx);
  const modules = await Promise.all(PANELS.map((name) => import(`./panels/${name}.mjs`)));
  for (const module of modules) {
    const panel = module.default;
    const section = el("section", { class: "panel", id: `panel-${panel.id}`, role: "tabpanel", "aria-labelledby": `tab-${panel.id}`, hidden: true });
    tabs.add(panel, panel.mount(section, ctx) || null, section);
  }
  const wanted = tabs.entries.findIndex((entry) => `#${entry.id}` === location.hash);
  tabs.open(wanted >= 0 ? wanted : 0);
  window.addEventListener("resize", resizeCharts);
  // The public OpenAPI document says whether /v1/* wants a key; asking before any call keeps a
  // keyed server from answering the page's first requests with 401s.
  const doc = await api.get("/openapi.json");
  ctx.paths = new Set(Object.keys(doc.paths || {}));
  const needsKey = Array.isArray(doc.security) && doc.security.length > 0;
  document.body.dataset.needsKey = String(needsKey);
  if (needsKey) {
    say(serverStatus, "This server needs its API key: enter it and press “Use key”.");
    document.getElementById("api-key").focus();
  } else {
    await ctx.refreshModels();
  }
  document.body.dataset.ready = "true";
}

start().catch((error) => {
  document.getElementById("status").textContent = `The viewer failed to start: ${error.message}`;
  throw error;
});
