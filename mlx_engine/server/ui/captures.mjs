/**
 * Numbers the views draw, computed from decoded captures (lib/neuroscope-client.mjs decodes
 * the wire objects into flat typed arrays, row-major in `shape`).
 *
 * Alignment: a capture's rows are the absolute positions [positions[0], positions[1]) (or
 * `row_positions`). The captures that arrive with generated token k are those of the pass
 * that chose token k, so a token's own values arrive one token later, and the last
 * generated token has none (it is never fed back through the model).
 */

/** The absolute position of each row of a capture. */
export function rowPositions(capture) {
  if (Array.isArray(capture.row_positions)) return capture.row_positions;
  const [start, stop] = capture.positions;
  return Array.from({ length: stop - start }, (_, i) => start + i);
}

/** L2 norm of each row of a [T, d] capture: Map position -> norm. */
export function rowNorms(capture) {
  const [rows, width] = capture.shape;
  const out = new Map();
  rowPositions(capture).forEach((position, r) => {
    let sum = 0;
    for (let i = r * width; i < (r + 1) * width; i += 1) sum += capture.array[i] * capture.array[i];
    out.set(position, Math.sqrt(sum));
  });
  if (rowPositions(capture).length !== rows) throw new Error(`${capture.hook_id}: ${rows} rows, positions disagree`);
  return out;
}

/**
 * One neuron per position, from a capture of a one-index subset (`indices: [i]`):
 * [T, 1] for residual or mlp_post; [T, k, 1] for expert_post, where row j is the j-th expert
 * the token was routed to (`extras.experts`). For an expert neuron the value is that of expert
 * `expert` where the token was routed to it, else null (the expert did not run for it).
 */
export function neuronValues(capture, expert = null) {
  const out = new Map();
  const positions = rowPositions(capture);
  if (capture.shape.length === 2) {
    positions.forEach((position, r) => out.set(position, capture.array[r * capture.shape[1]]));
    return out;
  }
  const [, k, width] = capture.shape;
  const experts = capture.extras && capture.extras.experts;
  if (!experts) throw new Error(`${capture.hook_id}: no 'experts' extra to say which expert each row is`);
  positions.forEach((position, r) => {
    let value = null;
    for (let j = 0; j < k; j += 1) {
      if (Number(experts[r * k + j]) === expert) value = capture.array[(r * k + j) * width];
    }
    out.set(position, value);
  });
  return out;
}

/**
 * One head's attention pattern over the positions its captures cover.
 * Returns {queries, keys, cells: Map "q,k" -> probability, sinkShare: Map q -> 1 - row sum}.
 * A cell exists only where the query could attend: a key column its capture carries
 * (`key_positions`: for a sliding-window layer, its window), not after the query, and inside
 * the window `window` when the layer has one (a prefill chunk carries every key of the
 * chunk, the masked ones at probability 0).
 */
export function headPattern(captures, head, window = null) {
  const cells = new Map();
  const sinkShare = new Map();
  const queries = [];
  const keySet = new Set();
  for (const capture of captures) {
    const [, rows, width] = capture.shape;
    const keys = capture.key_positions;
    rowPositions(capture).forEach((query, t) => {
      queries.push(query);
      let sum = 0;
      const base = (head * rows + t) * width;
      for (let s = 0; s < width; s += 1) {
        const key = keys[s];
        const p = capture.array[base + s];
        sum += p;
        if (key > query || (window && key <= query - window)) continue;
        cells.set(`${query},${key}`, p);
        keySet.add(key);
      }
      sinkShare.set(query, 1 - sum);
    });
  }
  const keys = [...keySet].sort((a, b) => a - b);
  return { queries, keys, cells, sinkShare };
}

/** Merge the `activations` of streamed chunks or a whole response: hook -> [capture] in step order. */
export function mergeCaptures(target, decoded) {
  for (const [hook, list] of Object.entries(decoded)) {
    if (!target[hook]) target[hook] = [];
    target[hook].push(...list);
  }
  return target;
}
