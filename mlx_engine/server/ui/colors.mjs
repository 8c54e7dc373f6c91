/**
 * Colours of every view: viridis, as matplotlib defines it (its 256 colours, so the page and the
 * demo's pictures colour a value alike), and the rule that maps a value to one of them.
 *
 * A value v on a scale [min, max] takes colour floor((v - min) / (max - min) * 256), clipped to
 * 0..255: matplotlib's own rule for a float in [0, 1]. The tests recompute colours with it.
 */

// matplotlib.colormaps["viridis"], 256 colours as 6-digit hex, dark purple to yellow.
const HEX =
  "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769" +
  "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a" +
  "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85" +
  "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b" +
  "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d" +
  "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e" +
  "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e" +
  "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d" +
  "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88" +
  "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81" +
  "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74" +
  "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863" +
  "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d" +
  "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32" +
  "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a" +
  "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725";

export const VIRIDIS = Object.freeze(Array.from({ length: 256 }, (_, i) => `#${HEX.slice(i * 6, i * 6 + 6)}`));

/** The index 0..255 of `value` on [min, max] (0 when the scale is a single value). */
export function colorIndex(value, min, max) {
  if (!(max > min)) return 0;
  const unit = (value - min) / (max - min);
  return Math.min(255, Math.max(0, Math.floor(unit * 256)));
}

/** The colour of `value` on [min, max] as "#rrggbb". */
export function viridis(value, min, max) {
  return VIRIDIS[colorIndex(value, min, max)];
}

/** Black or white, whichever reads better on colour `index` (viridis turns light past ~60%). */
export function inkOn(index) {
  return index > 150 ? "#000000" : "#ffffff";
}

/** {min, max} of the finite numbers in `values` (null when there are none). */
export function extent(values) {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (Number.isFinite(v)) {
      if (v < min) min = v;
      if (v > max) max = v;
    }
  }
  return min <= max ? { min, max } : null;
}

/** A CSS gradient of the colormap, for colour bars drawn without a chart. */
export function gradient(direction = "to right") {
  const stops = VIRIDIS.filter((_, i) => i % 16 === 0 || i === 255);
  return `linear-gradient(${direction}, ${stops.join(", ")})`;
}

/** A number as the views print it: 4 significant digits, exponent only when needed. */
export function fmt(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(3);
  return String(Number(value.toPrecision(4)));
}
