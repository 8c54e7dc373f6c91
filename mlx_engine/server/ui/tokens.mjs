/**
 * Tokens as the views show them. Axis labels must show every token, so whitespace that would
 * vanish is spelled with a visible mark; the token flow of the Generate panel keeps real line
 * breaks and spaces, so text reads as text.
 */

const MARKS = { "\n": "↵", "\t": "⇥", "\r": "␍" };

/** A token as an axis label or table cell: control characters marked, end spaces as ␣. */
export function label(token) {
  if (token === null || token === undefined) return "";
  const marked = token.replace(/[\n\t\r]/g, (c) => MARKS[c]);
  const lead = marked.match(/^ */)[0].length;
  const trail = marked.length > lead ? marked.match(/ *$/)[0].length : 0;
  const middle = marked.slice(lead, marked.length - trail);
  return "␣".repeat(lead) + middle + "␣".repeat(trail) || "∅";
}

/** A token in running text: a newline shows its mark and then breaks the line. */
export function inline(token) {
  return token.replace(/\r/g, "␍").replace(/\t/g, "⇥\t").replace(/\n/g, "↵\n");
}

/** Prompt and generated token strings of a response, and where the generated part starts. */
export function sequence(body) {
  const prompt = body.prompt_tokens_text || [];
  const generated = body.generated_tokens_text || [];
  return { tokens: [...prompt, ...generated], boundary: prompt.length };
}
