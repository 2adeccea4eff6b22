// The Pareto front as an SVG scatter: x = average bits or bytes, y = predicted error or measured KL
// (log scale), latency as colour, baselines as hollow markers of one shape per kind.

import {fmtBytes, fmtNumber, fmtSeconds, h, ramp, s, show} from "./dom.js";

const WIDTH = 760;
const HEIGHT = 400;
const MARGIN = {left: 72, right: 24, top: 16, bottom: 48};
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const SHAPES = ["square", "triangle", "diamond", "cross"];
const FRONT_COLOR = "#3b6fb6";

export const X_AXES = {
  avg_bits: {label: "average bits per element", short: "average bits", format: (v) => fmtNumber(v)},
  bytes: {label: "size", short: "bytes", format: fmtBytes},
};
export const Y_AXES = {
  error: {label: "predicted error (log scale)", short: "predicted error"},
  measured_kl: {label: "measured KL (log scale)", short: "measured KL"},
};

function niceStep(span, count) {
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const ratio = raw / magnitude;
  return magnitude * (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1);
}

/** Round-number ticks in [lo, hi]; bytes get steps that are round in KiB/MiB/GiB. */
function linearTicks(lo, hi, binary) {
  const unit = binary ? 1024 ** Math.max(0, Math.floor(Math.log(Math.max(hi, 1)) / Math.log(1024))) : 1;
  const step = niceStep((hi - lo) / unit, 6) * unit;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  return ticks;
}

/** Powers of ten (with 2 and 5 between them when the range is short) in [lo, hi]. */
function logTicks(lo, hi) {
  const first = Math.floor(Math.log10(lo));
  const last = Math.ceil(Math.log10(hi));
  const steps = last - first <= 2 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let e = first; e <= last; e += 1) {
    for (const m of steps) {
      const v = m * 10 ** e;
      if (v >= lo && v <= hi) ticks.push(v);
    }
  }
  return ticks.length >= 2 ? ticks : [lo, hi];
}

function linearScale(values, binary) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const pad = hi > lo ? (hi - lo) * 0.05 : Math.abs(hi) * 0.1 || 1;
  lo -= pad;
  hi += pad;
  return {map: (v) => (v - lo) / (hi - lo), ticks: linearTicks(lo, hi, binary)};
}

function logScale(values) {
  const positive = values.filter((v) => v > 0);
  let lo = positive.length ? Math.min(...positive) : 1e-6;
  let hi = positive.length ? Math.max(...positive) : 1;
  const pad = Math.max((Math.log10(hi) - Math.log10(lo)) * 0.06, 0.05);
  lo /= 10 ** pad;
  hi *= 10 ** pad;
  const map = (v) => (v > 0 ? (Math.log10(v) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)) : 0);
  return {map, ticks: logTicks(lo, hi)};
}

function markerPath(shape, x, y, r) {
  switch (shape) {
    case "triangle":
      return `M${x},${y - r * 1.2}L${x + r * 1.1},${y + r * 0.8}L${x - r * 1.1},${y + r * 0.8}Z`;
    case "diamond":
      return `M${x},${y - r * 1.3}L${x + r * 1.1},${y}L${x},${y + r * 1.3}L${x - r * 1.1},${y}Z`;
    case "cross":
      return `M${x - r},${y - r}L${x + r},${y + r}M${x - r},${y + r}L${x + r},${y - r}`;
    default:
      return `M${x - r},${y - r}h${2 * r}v${2 * r}h${-2 * r}Z`;
  }
}

/** Marker shape per baseline kind, in order of first appearance. */
function shapesByKind(baselines) {
  const kinds = [...new Set(baselines.map((b) => b.kind))];
  return new Map(kinds.map((kind, i) => [kind, SHAPES[i % SHAPES.length]]));
}

function latencyColour(points) {
  const known = points.map((p) => p.latency).filter((v) => v !== null && v !== undefined);
  if (!known.length) return null;
  const lo = Math.min(...known);
  const hi = Math.max(...known);
  return {lo, hi, of: (v) => (v === null || v === undefined ? "#999" : ramp(VIRIDIS, hi > lo ? (v - lo) / (hi - lo) : 0.5))};
}

function figures(item) {
  return [
    ["avg bits", fmtNumber(item.avg_bits, 4)],
    ["size", fmtBytes(item.bytes)],
    ["predicted error", fmtNumber(item.error, 4)],
    ["latency", fmtSeconds(item.latency)],
    ["measured KL", fmtNumber(item.measured_kl, 4)],
  ];
}

function tooltipContent(title, item) {
  return [h("strong", {text: title}),
          h("table", {}, figures(item).map(([k, v]) => h("tr", {}, h("th", {text: k}), h("td", {text: v}))))];
}

function attachTooltip(node, tooltip, container, content) {
  const move = (event) => {
    const box = container.getBoundingClientRect();
    tooltip.style.left = `${event.clientX - box.left + 14}px`;
    tooltip.style.top = `${event.clientY - box.top + 14}px`;
  };
  node.addEventListener("mouseenter", (event) => {
    show(tooltip, ...content());
    tooltip.hidden = false;
    move(event);
  });
  node.addEventListener("mousemove", move);
  node.addEventListener("mouseleave", () => { tooltip.hidden = true; });
}

function axes(svg, xScale, yScale, xAxis, yAxis, toPx) {
  const [x0, y0] = [MARGIN.left, HEIGHT - MARGIN.bottom];
  const grid = s("g", {class: "grid"});
  for (const t of xScale.ticks) {
    const x = toPx.x(t);
    grid.append(s("line", {x1: x, x2: x, y1: MARGIN.top, y2: y0}),
                s("text", {x, y: y0 + 18, "text-anchor": "middle", text: X_AXES[xAxis].format(t)}));
  }
  for (const t of yScale.ticks) {
    const y = toPx.y(t);
    grid.append(s("line", {x1: x0, x2: WIDTH - MARGIN.right, y1: y, y2: y}),
                s("text", {x: x0 - 8, y: y + 4, "text-anchor": "end", text: fmtNumber(t, 2)}));
  }
  svg.append(grid,
             s("rect", {class: "frame", x: x0, y: MARGIN.top, width: WIDTH - MARGIN.left - MARGIN.right,
                        height: y0 - MARGIN.top}),
             s("text", {class: "axis-label", x: (x0 + WIDTH - MARGIN.right) / 2, y: HEIGHT - 8,
                        "text-anchor": "middle", text: X_AXES[xAxis].label}),
             s("text", {class: "axis-label", x: 16, y: (MARGIN.top + y0) / 2, "text-anchor": "middle",
                        transform: `rotate(-90 16 ${(MARGIN.top + y0) / 2})`, text: Y_AXES[yAxis].label}));
}

function legend(shapes, colour, hasBaselines) {
  const swatch = (shape, cls) => s("svg", {width: 14, height: 14, class: "swatch"},
    shape === "circle" ? s("circle", {cx: 7, cy: 7, r: 5, class: cls})
                       : s("path", {d: markerPath(shape, 7, 7, 4.5), class: cls}));
  const items = [h("span", {class: "legend-item"}, swatch("circle", "pt-swatch"), "front")];
  if (hasBaselines) {
    for (const [kind, shape] of shapes) items.push(h("span", {class: "legend-item"}, swatch(shape, "baseline"), kind));
  }
  items.push(h("span", {class: "legend-item"}, swatch("circle", "ring-selected"), "selected"),
             h("span", {class: "legend-item"}, swatch("circle", "ring-compare"), "compared (shift-click)"));
  if (colour) {
    const gradient = h("span", {class: "gradient"});
    gradient.style.background = `linear-gradient(to right, ${VIRIDIS.map((c) => `rgb(${c.join(",")})`).join(",")})`;
    items.push(h("span", {class: "legend-item"}, "latency ", fmtSeconds(colour.lo), gradient, fmtSeconds(colour.hi)));
  }
  return h("div", {class: "legend"}, items);
}

const LABEL = {charWidth: 7, height: 12, gap: 2};  // SVG units at the labels' 10px font, on the safe side

/**
 * Labels for baseline markers that never overprint: markers within a few pixels of each other
 * share one label ("Q4_K_M = Q4_K_S"), and a label that would cover one already placed moves up
 * a line at a time until it is clear.
 */
export function placeLabels(markers) {
  const groups = [];
  for (const m of markers) {
    const near = groups.find((g) => Math.abs(g.px - m.px) < 4 && Math.abs(g.py - m.py) < 4);
    const name = m.name.replace(/^uniform /, "");
    if (near) near.names.push(name);
    else groups.push({px: m.px, py: m.py, names: [name]});
  }
  const placed = [];
  for (const g of groups.sort((a, b) => b.py - a.py || a.px - b.px)) {
    const text = [...new Set(g.names)].join(" = ");
    const box = {x: g.px + 8, y: g.py - 6, width: text.length * LABEL.charWidth, height: LABEL.height, text};
    const overlaps = (b) => placed.some((p) => b.x < p.x + p.width && p.x < b.x + b.width &&
                                             b.y - b.height < p.y && p.y - p.height < b.y);
    for (let tries = 0; overlaps(box) && tries < 40; tries += 1) box.y -= LABEL.height + LABEL.gap;
    placed.push(box);
  }
  return placed;
}

/**
 * Draw the chart into `container` (which holds the SVG, a tooltip and a legend).
 * `onPick(pointId, shift)` is called when a front point is clicked.
 */
export function drawFront(container, {points, baselines, x, y, selectedId, compareId, onPick}) {
  const shown = points.filter((p) => p[y] !== null && p[y] !== undefined);
  const refs = baselines.filter((b) => b[y] !== null && b[y] !== undefined);
  const tooltip = h("div", {class: "tooltip", hidden: true});
  if (!shown.length) {
    show(container, h("p", {class: "empty", text: `No point has a ${Y_AXES[y].short} yet.`}));
    return;
  }
  const all = [...shown, ...refs];
  const xScale = linearScale(all.map((p) => p[x]), x === "bytes");
  const yScale = logScale(all.map((p) => p[y]));
  const toPx = {
    x: (v) => MARGIN.left + xScale.map(v) * (WIDTH - MARGIN.left - MARGIN.right),
    y: (v) => HEIGHT - MARGIN.bottom - yScale.map(v) * (HEIGHT - MARGIN.top - MARGIN.bottom),
  };
  const svg = s("svg", {viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "front-chart", role: "img",
                        "aria-label": "Pareto front"});
  axes(svg, xScale, yScale, x, y, toPx);

  const shapes = shapesByKind(baselines);
  for (const b of refs) {
    const [px, py] = [toPx.x(b[x]), toPx.y(b[y])];
    const marker = s("path", {d: markerPath(shapes.get(b.kind), px, py, 5), class: "baseline", "data-baseline": b.name});
    attachTooltip(marker, tooltip, container, () => tooltipContent(b.name, b));
    svg.append(marker);
  }
  for (const label of placeLabels(refs.map((b) => ({px: toPx.x(b[x]), py: toPx.y(b[y]), name: b.name})))) {
    svg.append(s("text", {class: "baseline-label", x: label.x, y: label.y, text: label.text}));
  }

  const ordered = [...shown].sort((a, b) => a[x] - b[x]);
  const line = ordered.map((p, i) => `${i ? "L" : "M"}${toPx.x(p[x])},${toPx.y(p[y])}`).join("");
  svg.append(s("path", {class: "front-line", d: line}));
  const colour = latencyColour(shown);
  for (const p of ordered) {
    const cls = ["pt", p.id === selectedId && "selected", p.id === compareId && "compare"].filter(Boolean).join(" ");
    const dot = s("circle", {cx: toPx.x(p[x]), cy: toPx.y(p[y]), r: p.id === selectedId ? 7 : 5.5, class: cls,
                             fill: colour ? colour.of(p.latency) : FRONT_COLOR, "data-point-id": p.id, tabindex: 0});
    attachTooltip(dot, tooltip, container, () => tooltipContent(`point ${p.id}${p.chosen ? " ★ at the budget" : ""}`, p));
    dot.addEventListener("mousedown", (event) => { if (event.shiftKey) event.preventDefault(); });
    dot.addEventListener("click", (event) => onPick(p.id, event.shiftKey));
    dot.addEventListener("keydown", (event) => { if (event.key === "Enter") onPick(p.id, event.shiftKey); });
    svg.append(dot);
  }
  show(container, svg, tooltip, legend(shapes, colour, refs.length > 0));
}
