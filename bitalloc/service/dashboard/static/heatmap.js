// An allocation as a heatmap: blocks down, unit columns across (the server names the columns,
// so any model works), colour = bits per weight of the unit's format. Units outside blocks
// (lm_head, embeddings) get an extra row.

import {fmtNumber, h, inkFor, ramp} from "./dom.js";

// Few bits are warm, many bits cool (a diverging ramp, so 4 and 8 bits read clearly apart).
const BITS_RAMP = [[178, 24, 43], [239, 138, 98], [253, 219, 199], [209, 229, 240], [103, 169, 207], [33, 102, 172]];

/** Format name -> {colour, bits_per_weight}, on a log2 scale of bits so 2/4/8/16 are evenly spaced. */
export function formatColours(formats) {
  const logs = formats.map((f) => Math.log2(f.bits_per_weight));
  const lo = Math.min(...logs);
  const hi = Math.max(...logs);
  return new Map(formats.map((f, i) => [f.name, {
    colour: ramp(BITS_RAMP, hi > lo ? (logs[i] - lo) / (hi - lo) : 0.5),
    bits: f.bits_per_weight,
  }]));
}

/** Rows (block numbers, then null for units outside blocks) and columns (by first appearance). */
function grid(units) {
  const columns = [...new Set(units.map((u) => u.column))];
  const blocks = [...new Set(units.filter((u) => u.block !== null).map((u) => u.block))].sort((a, b) => a - b);
  const rows = units.some((u) => u.block === null) ? [...blocks, null] : blocks;
  const cells = new Map(units.map((u) => [`${u.block}|${u.column}`, u]));
  return {rows, columns, at: (block, column) => cells.get(`${block}|${column}`)};
}

function cell(unit, format, colours, differs) {
  if (!unit) return h("td", {class: "none"});
  if (!format) return h("td", {class: "none", title: `${unit.name}: not in this allocation`});
  const info = colours.get(format) || {colour: "rgb(200,200,200)", bits: null};
  const td = h("td", {class: differs && differs.has(unit.name) ? "cell differs" : "cell", "data-unit": unit.name,
                      "data-format": format, title: `${unit.name}\n${format} · ${fmtNumber(info.bits, 3)} bits/weight` +
                        (unit.context == null ? "" : `\ncaches ${unit.context} tokens`),
                      text: format});
  td.style.background = info.colour;
  td.style.color = inkFor(info.colour);
  return td;
}

/** One allocation's heatmap; `differs` (a Set of unit names) outlines the units a comparison changes. */
export function heatmap({units, colours, formats, title, differs}) {
  const {rows, columns, at} = grid(units);
  const head = h("tr", {}, h("th", {}), columns.map((c) => h("th", {scope: "col", text: c})));
  const body = rows.map((block) => h("tr", {},
    h("th", {scope: "row", text: block === null ? "outside blocks" : `block ${block}`}),
    columns.map((column) => {
      const unit = at(block, column);
      return cell(unit, unit && formats[unit.name], colours, differs);
    })));
  return h("figure", {class: "heatmap"}, h("figcaption", {text: title}),
           h("table", {}, h("thead", {}, head), h("tbody", {}, body)));
}

/** The format key: one swatch per format, fewest bits first. */
export function formatLegend(colours) {
  const entries = [...colours.entries()].sort((a, b) => a[1].bits - b[1].bits);
  return h("div", {class: "legend"}, entries.map(([name, info]) => {
    const swatch = h("span", {class: "chip"});
    swatch.style.background = info.colour;
    return h("span", {class: "legend-item"}, swatch, `${name} (${fmtNumber(info.bits, 3)} b)`);
  }));
}

/** Units whose format differs between two allocations, in unit order. */
function differences(units, a, b) {
  return units.filter((u) => a[u.name] !== b[u.name]).map((u) => ({unit: u.name, a: a[u.name], b: b[u.name]}));
}

/** Two heatmaps side by side and the list of units whose formats differ. */
export function comparison({units, colours, a, b}) {
  const changed = differences(units, a.formats, b.formats);
  const differs = new Set(changed.map((d) => d.unit));
  const list = changed.length
    ? h("div", {class: "scroll"}, h("table", {class: "diff"},
        h("thead", {}, h("tr", {}, h("th", {text: "unit"}), h("th", {text: `point ${a.id}`}), h("th", {text: `point ${b.id}`}))),
        h("tbody", {}, changed.map((d) => h("tr", {}, h("td", {text: d.unit}), h("td", {text: d.a}), h("td", {text: d.b}))))))
    : h("p", {class: "empty", text: "The two points give every unit the same format."});
  return h("div", {class: "comparison"},
    h("div", {class: "side-by-side"},
      heatmap({units, colours, formats: a.formats, title: `point ${a.id}`, differs}),
      heatmap({units, colours, formats: b.formats, title: `point ${b.id}`, differs})),
    h("h3", {text: `${changed.length} of ${units.length} units differ`}), list);
}
