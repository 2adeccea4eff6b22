// Small DOM and number helpers. Text always goes in through textContent, never innerHTML,
// so model and unit names or error messages from the server cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("td", {class: "num"}, "4.25"). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element: s("circle", {cx: 1, cy: 2, r: 3}). */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace a container's children. */
export function show(container, ...children) {
  container.replaceChildren();
  return fill(container, {}, children);
}

export function fmtNumber(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1e4 || abs < 1e-3) return value.toExponential(digits - 1);
  return Number(value.toPrecision(digits)).toString();
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return `${i === 0 ? value : value.toPrecision(3)} ${units[i]}`;
}

export function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1e-3) return `${fmtNumber(seconds * 1e6)} µs`;
  if (seconds < 1) return `${fmtNumber(seconds * 1e3)} ms`;
  if (seconds < 120) return `${fmtNumber(seconds)} s`;
  return `${Math.round(seconds / 60)} min`;
}

export function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

/** A colour along a ramp of [r, g, b] stops, for t in [0, 1]. */
export function ramp(stops, t) {
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const rgb = stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
  return `rgb(${rgb.join(",")})`;
}

/** Black or white, whichever reads better on an rgb() background. */
export function inkFor(color) {
  const [r, g, b] = color.match(/\d+/g).map(Number);
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#111" : "#fff";
}

/** A progress bar whose fill width is set through the CSSOM (allowed by the page's CSP). */
export function progressBar(percent, label) {
  const bar = h("span", {class: "bar-fill"});
  bar.style.width = `${Math.min(Math.max(percent || 0, 0), 100)}%`;
  return h("span", {class: "bar", role: "progressbar", "aria-valuenow": Math.round(percent || 0),
                    "aria-valuemin": 0, "aria-valuemax": 100}, bar, h("span", {class: "bar-label", text: label}));
}
