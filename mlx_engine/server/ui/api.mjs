/**
 * The page's calls to its own server: JSON requests and Server-Sent Event streams, with the
 * API key (when one is given) as a Bearer token. Errors are the server's own
 * `{"error": {message, type, param, code}}`, raised as NeuroScopeError; the decoding of
 * captures and the SSE reader are the package's JavaScript client's, so the page and the
 * client cannot disagree about the wire format.
 */

import { NeuroScopeError, decodeActivations, readServerSentEvents } from "./lib/neuroscope-client.mjs";

export { NeuroScopeError, decodeActivations };

export class Api {
  /** @param {string} base the server's root, "" for this page's own origin */
  constructor(base = "") {
    this.base = base;
    this.key = "";
  }

  setKey(key) {
    this.key = (key || "").trim();
  }

  headers(withBody) {
    const headers = { Accept: "application/json, text/event-stream" };
    if (withBody) headers["Content-Type"] = "application/json";
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async request(method, path, body, signal) {
    const init = { method, headers: this.headers(body !== undefined), signal };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(this.base + path, init);
    if (!response.ok) {
      const text = await response.text();
      let detail = null;
      try {
        detail = JSON.parse(text).error;
      } catch (_) {
        detail = null;
      }
      if (detail && detail.message) throw new NeuroScopeError(detail.message, response.status, detail);
      throw new NeuroScopeError(text || response.statusText, response.status);
    }
    return response;
  }

  async get(path) {
    return (await this.request("GET", path)).json();
  }

  async post(path, body, signal) {
    return (await this.request("POST", path, body, signal)).json();
  }

  /** The JSON chunks of a streamed request (`stream: true` is added), as they arrive. */
  async *stream(path, body, signal) {
    const response = await this.request("POST", path, { ...body, stream: true }, signal);
    for await (const chunk of readServerSentEvents(response.body)) {
      if (chunk.error) throw new NeuroScopeError(chunk.error.message, 500, chunk.error);
      yield chunk;
    }
  }
}

/** The message a view shows for a failed call. */
export function describeError(error) {
  if (error instanceof NeuroScopeError) {
    if (error.status === 401) return "This server needs its API key: enter it at the top and press “Use key”.";
    return `The server said (HTTP ${error.status}): ${error.serverMessage}`;
  }
  if (error && error.name === "AbortError") return "Stopped.";
  return `Request failed: ${error && error.message ? error.message : error}`;
}
