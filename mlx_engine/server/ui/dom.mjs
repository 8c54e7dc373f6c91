/** Small DOM helpers the panels share: build elements, fill selects, read the hook-point listing. */

/** An element with attributes (`dataset` and `text` are special) and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

/** Replace a select's options with [value, label] pairs, keeping the choice when it still exists. */
export function fillSelect(select, options, preferred = null) {
  const keep = preferred !== null ? String(preferred) : select.value;
  select.replaceChildren(...options.map(([value, label]) => el("option", { value, text: label })));
  if (options.some(([value]) => String(value) === keep)) select.value = keep;
}

/** Layers of a hook-point listing that offer `component`, in order. */
export function layersOffering(listing, component) {
  return listing.layers.filter((layer) => component in layer.components).map((layer) => layer.layer);
}

/** The size of the last axis of a component at a layer (a neuron index runs below it). */
export function featureCount(listing, layer, component) {
  const shape = listing.layers[layer].components[component].shape;
  return shape[shape.length - 1];
}

/** Options "layer i (sliding window 128)" for a layer select. */
export function layerOptions(listing, layers) {
  return layers.map((i) => {
    const info = listing.layers[i];
    const kind = info.attention_type === "sliding_attention" ? ` (sliding window ${info.window})` : "";
    return [String(i), `layer ${i}${kind}`];
  });
}

/** Replace a node's content with a message (class "error" when `isError`). */
export function say(node, message, isError = false) {
  node.textContent = message;
  node.classList.toggle("error", isError);
}
