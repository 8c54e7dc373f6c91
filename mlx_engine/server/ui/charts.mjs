/**
 * The charts of the views, drawn with the vendored Apache ECharts (vendor/README.md).
 *
 * Heatmaps take category axes whose categories are indices ("0", "1", ...) and whose labels
 * are given separately, so two equal tokens stay two columns. Small charts use the SVG
 * renderer (labels are text in the page, which screen readers and the tests can read);
 * a heatmap of more cells than SVG draws quickly uses the canvas renderer.
 */

import * as echarts from "./vendor/echarts/echarts.esm.min.mjs";
import { VIRIDIS, fmt } from "./colors.mjs";

export { echarts };
const SVG_CELL_LIMIT = 40000;
const ROW_PX = 15;
const charts = new Map(); // chart -> what to redraw after a resize (or null)

function chartOn(el, cells = 0) {
  const existing = echarts.getInstanceByDom(el);
  if (existing) existing.dispose();
  const chart = echarts.init(el, null, { renderer: cells > SVG_CELL_LIMIT ? "canvas" : "svg" });
  charts.set(chart, null);
  return chart;
}

/** Resize every chart (a panel that was hidden when it drew has no size until shown). */
export function resizeCharts() {
  for (const [chart, after] of charts) {
    if (chart.isDisposed()) {
      charts.delete(chart);
    } else {
      chart.resize();
      if (after) after();
    }
  }
}

function categoryAxis(labels, name, gap, rotate, inverse = false) {
  return {
    type: "category",
    data: labels.map((_, i) => String(i)),
    name,
    nameLocation: "middle",
    nameGap: gap,
    nameTextStyle: { fontWeight: "bold" },
    inverse,
    axisLabel: { interval: labels.length <= 120 ? 0 : "auto", rotate, fontSize: 11, formatter: (value) => labels[Number(value)] },
    axisTick: { alignWithLabel: true },
    splitArea: { show: false },
  };
}

/**
 * A heatmap: `data` is [[x, y, value]]; `xLabels`/`yLabels` name the columns and rows;
 * `boundary` (a column index) draws a line before that column; `onClick(x, y)` answers a click
 * on a cell; `tooltip(x, y, value)` gives a cell's hover text. The element carries the labels
 * it draws as JSON in data-x-labels and data-y-labels.
 */
export function heatmap(el, spec) {
  const longest = Math.max(1, ...spec.xLabels.map((l) => l.length));
  const bottom = Math.min(160, 30 + 7 * longest);
  // At least ROW_PX per row, so every row's label has room.
  el.style.height = `${Math.max(el.dataset.minHeight || 0, 42 + bottom + 28 + ROW_PX * spec.yLabels.length)}px`;
  const chart = chartOn(el, spec.data.length);
  el.dataset.xLabels = JSON.stringify(spec.xLabels);
  el.dataset.yLabels = JSON.stringify(spec.yLabels);
  chart.setOption({
    animation: false,
    aria: { enabled: true, label: { description: spec.description || spec.title } },
    title: { text: spec.title, left: "center", textStyle: { fontSize: 14 } },
    tooltip: { position: "top", formatter: (p) => spec.tooltip(p.data[0], p.data[1], p.data[2]) },
    grid: { left: spec.left || 90, right: 110, top: 42, bottom: bottom + 28 },
    xAxis: categoryAxis(spec.xLabels, spec.xName, bottom, 90),
    yAxis: categoryAxis(spec.yLabels, spec.yName, (spec.left || 90) - 24, 0, true),
    visualMap: {
      type: "continuous",
      min: spec.min,
      max: spec.max,
      dimension: 2,
      orient: "vertical",
      right: 8,
      top: "middle",
      itemHeight: 220,
      calculable: false,
      inRange: { color: VIRIDIS },
      text: [fmt(spec.max), fmt(spec.min)],
      textStyle: { fontSize: 11 },
      formatter: (v) => fmt(v),
    },
    graphic: [],
    series: [
      {
        type: "heatmap",
        data: spec.data,
        progressive: 0,
        emphasis: { itemStyle: { borderColor: "#000", borderWidth: 1 } },
      },
    ],
  });
  if (spec.scaleLabel) chart.setOption({ visualMap: { text: [`${fmt(spec.max)}  (${spec.scaleLabel})`, fmt(spec.min)] } });
  if (spec.onClick) chart.on("click", (p) => spec.onClick(p.data[0], p.data[1]));
  if (spec.boundary !== null && spec.boundary !== undefined) {
    const draw = () => drawBoundary(chart, spec.boundary, spec.yLabels.length);
    draw();
    charts.set(chart, draw);
    el.dataset.boundary = String(spec.boundary);
  }
  return chart;
}

/** The prompt/generation boundary: a vertical line at the left edge of column `column`. */
function drawBoundary(chart, column, rows) {
  const left = chart.convertToPixel({ xAxisIndex: 0 }, String(Math.max(0, column - 1)));
  const right = chart.convertToPixel({ xAxisIndex: 0 }, String(column));
  const top = chart.convertToPixel({ yAxisIndex: 0 }, "0");
  const bottom = chart.convertToPixel({ yAxisIndex: 0 }, String(rows - 1));
  if (![left, right, top, bottom].every(Number.isFinite)) return;
  const band = Math.abs(bottom - top) / Math.max(1, rows - 1) || 20;
  const x = column === 0 ? left - (right - left || band) / 2 : (left + right) / 2;
  const y0 = Math.min(top, bottom) - band / 2;
  const y1 = Math.max(top, bottom) + band / 2;
  chart.setOption({
    graphic: [
      { type: "line", silent: true, z: 100, shape: { x1: x, y1: y0 - 6, x2: x, y2: y1 }, style: { stroke: "#d62728", lineWidth: 2 } },
      { type: "text", silent: true, z: 100, x: x + 3, y: y0 - 18, style: { text: "generation →", fill: "#d62728", fontSize: 11 } },
    ],
  });
}

/** A line chart of one or more series over a shared x axis. */
export function lines(el, spec) {
  const chart = chartOn(el);
  chart.setOption({
    animation: false,
    aria: { enabled: true },
    title: { text: spec.title, left: "center", textStyle: { fontSize: 14 } },
    tooltip: { trigger: "axis", valueFormatter: (v) => (spec.format ? spec.format(v) : fmt(v)) },
    legend: { bottom: 0 },
    grid: { left: 80, right: 30, top: 40, bottom: 60 },
    xAxis: { type: "category", data: spec.x, name: spec.xName, nameLocation: "middle", nameGap: 28 },
    yAxis: { type: "value", name: spec.yName, axisLabel: { formatter: (v) => (spec.format ? spec.format(v) : fmt(v)) } },
    series: spec.series.map((s) => ({ type: "line", name: s.name, data: s.data, showSymbol: false })),
  });
  return chart;
}

/** A bar chart: one bar per category, labels given separately as for heatmaps. */
export function bars(el, spec) {
  const chart = chartOn(el);
  el.dataset.xLabels = JSON.stringify(spec.labels);
  const longest = Math.max(1, ...spec.labels.map((l) => l.length));
  const bottom = Math.min(140, 24 + 7 * longest);
  chart.setOption({
    animation: false,
    aria: { enabled: true },
    title: { text: spec.title, left: "center", textStyle: { fontSize: 14 } },
    tooltip: { trigger: "axis", formatter: (ps) => spec.tooltip(Number(ps[0].name), ps[0].value) },
    grid: { left: 80, right: 30, top: 40, bottom: bottom + 24 },
    xAxis: categoryAxis(spec.labels, spec.xName, bottom, 90),
    yAxis: { type: "value", name: spec.yName, nameLocation: "middle", nameGap: 56 },
    series: [{ type: "bar", data: spec.values, itemStyle: { color: spec.color || "#1f5fbf" } }],
  });
  return chart;
}
