// The selected point: its figures, a download button per export format, and the quantized artifact build.

import {api, download} from "./api.js";
import {fmtBytes, fmtNumber, fmtSeconds, h, progressBar, show} from "./dom.js";

// Until the server lists its exports (GET /v1/exports), bitalloc's own JSON is the one we know it has.
const JSON_EXPORT = {name: "json", filename: "allocation.json", media_type: "application/json",
                     description: "bitalloc's own allocation: units, formats, totals, provenance."};
const FINISHED = ["succeeded", "failed", "canceled"];

let exportsList = null;
let buildsAvailable = true;
const builds = new Map(); // "jobId/pointId" -> the latest build record seen

/** The export formats the server offers (json only when it has no /v1/exports). */
export async function loadExports() {
  if (exportsList) return exportsList;
  try {
    const listed = await api("/v1/exports");
    exportsList = Array.isArray(listed) && listed.length ? listed : [JSON_EXPORT];
  } catch (error) {
    if (error.status === 401) throw error;
    exportsList = [JSON_EXPORT];
  }
  return exportsList;
}

function figures(point) {
  const rows = [["average bits", fmtNumber(point.avg_bits, 4)], ["size", fmtBytes(point.bytes)],
                ["predicted error", fmtNumber(point.error, 4)], ["latency", fmtSeconds(point.latency)],
                ["measured KL", fmtNumber(point.measured_kl, 4)], ["solver", point.solver || "–"]];
  return h("dl", {class: "figures"}, rows.map(([k, v]) => [h("dt", {text: k}), h("dd", {text: v})]));
}

function downloadButton(jobId, point, spec, status) {
  const path = `/v1/jobs/${jobId}/points/${point.id}/config?format=${encodeURIComponent(spec.name)}`;
  return h("button", {
    type: "button", class: "download", "data-export": spec.name, title: spec.description || spec.name,
    onclick: async () => {
      show(status, `downloading ${spec.name}…`);
      status.className = "status";
      try {
        show(status, `saved ${await download(path, spec.filename)}`);
      } catch (error) {
        show(status, `${spec.name}: ${error.message}`);
        status.className = "status error";
      }
    },
  }, `⬇ ${spec.name}`);
}

function downloads(jobId, point, exports) {
  const status = h("p", {class: "status", "aria-live": "polite"});
  return h("section", {class: "downloads"}, h("h3", {text: "Download the configuration"}),
           h("div", {class: "buttons"}, exports.map((spec) => downloadButton(jobId, point, spec, status))), status);
}

function buildStatus(build) {
  if (!build) return [];
  const running = !FINISHED.includes(build.state);
  const bar = running && progressBar(build.progress?.percent ?? 0, build.progress?.phase || "");
  const parts = [h("p", {}, `build ${build.state} `, bar)];
  if (build.error) parts.push(h("p", {class: "status error", text: build.error}));
  const artifact = build.artifact;
  if (artifact) {
    const status = h("p", {class: "status"});
    parts.push(h("p", {}, h("button", {
      type: "button", class: "download", "data-artifact": artifact.id,
      onclick: async () => {
        try {
          show(status, `saved ${await download(`/v1/artifacts/${artifact.id}`, artifact.name)}`);
        } catch (error) {
          show(status, error.message);
        }
      },
    }, `⬇ ${artifact.name} (${fmtBytes(artifact.size)})`)),
    h("p", {}, "sha256 ", h("code", {class: "sha", text: artifact.sha256})), status);
  }
  return parts;
}

const done = (build) => !build || build.artifact || FINISHED.includes(build.state);

/** Poll a build once a second until it has its artifact or ends; stops when its box leaves the page. */
async function followBuild(key, box) {
  let build = builds.get(key);
  while (!done(build)) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (!box.isConnected) return;
    try {
      build = await api(`/v1/builds/${build.id}`);
    } catch (error) {
      show(box, h("p", {class: "status error", text: error.message}));
      return;
    }
    builds.set(key, build);
    show(box, ...buildStatus(build));
  }
}

function artifactSection(jobId, point, method) {
  if (!buildsAvailable) return h("section", {class: "artifact"});
  const key = `${jobId}/${point.id}`;
  const box = h("div", {class: "build"}, buildStatus(builds.get(key)));
  const select = h("select", {"aria-label": "quantization method"},
                   ["rtn", "gptq"].map((m) => h("option", {value: m, selected: m === method}, m)));
  const section = h("section", {class: "artifact"}, h("h3", {text: "Quantized artifact"}));
  const start = async () => {
    try {
      const build = await api(`/v1/jobs/${jobId}/points/${point.id}/artifact`, {method: "POST", body: {method: select.value}});
      builds.set(key, build);
      show(box, ...buildStatus(build));
      followBuild(key, box);
    } catch (error) {
      // A 404 from the router itself ("Not Found"), not from the route, means no such endpoint.
      if ((error.status === 404 && error.message === "Not Found") || error.status === 405) {
        buildsAvailable = false;
        show(section, h("p", {class: "empty", text: "This server does not build artifacts."}));
      } else {
        show(box, h("p", {class: "status error", text: error.message}));
      }
    }
  };
  section.append(h("div", {class: "buttons"}, select,
                   h("button", {type: "button", id: "build-artifact", onclick: start}, "Build quantized artifact")), box);
  followBuild(key, box);
  return section;
}

/** The surrogate's account of a point it chose: each round's allocation as its fitted model
 * predicted it against its measured KL on the selection windows, and how well the model predicts
 * allocations held out of its fit, beside the profile's plain sum. Empty for other solvers. */
function surrogateSection(point) {
  const info = point.info || {};
  if (point.solver !== "surrogate" || !Array.isArray(info.rounds)) return [];
  const fit = info.held_out || {};
  const lines = [
    `${info.evaluations} allocations measured${info.reused ? ` (${info.reused} reused from earlier searches)` : ""}; ` +
    `fitness KL ${fmtNumber(info.start_measured, 4)} at the start, ${fmtNumber(info.selected_measured, 4)} at the best; ` +
    (info.confirmed ? "confirmed on the held-back windows" : "not confirmed on the held-back windows: the start was kept") +
    ` (p = ${fmtNumber(info.confirm_p_value, 3)})`,
  ];
  if (fit.configurations) {
    lines.push(`held out of the fit (${fit.folds}-fold, ${fit.configurations} allocations): Spearman ` +
               `${fmtNumber(fit.spearman, 3)} (the profile's sum ${fmtNumber(fit.additive_spearman, 3)}), ` +
               `error ${fmtNumber(100 * fit.relative_error, 3)} % of the mean`);
  }
  const head = ["round", "predicted KL", "measured KL", "p (lower than the best)"].map((t) => h("th", {text: t}));
  const rows = info.rounds.map((r, i) => h("tr", {},
    h("td", {class: "num", text: String(i + 1)}), h("td", {class: "num", text: fmtNumber(r.predicted, 4)}),
    h("td", {class: "num", text: fmtNumber(r.measured, 4)}), h("td", {class: "num", text: fmtNumber(r.p_value, 3)})));
  return h("section", {class: "surrogate"}, h("h3", {text: "Surrogate: predicted against measured"}),
           lines.map((text) => h("p", {text})),
           h("table", {class: "rounds"}, h("thead", {}, h("tr", {}, head)), h("tbody", {}, rows)));
}

/** The panel for one selected point (its detail from GET /v1/jobs/{id}/points/{pid}). */
export function pointPanel({jobId, point, exports, method}) {
  const title = `Point ${point.id}${point.chosen ? " ★ solved at the job's budget" : ""}`;
  return h("div", {class: "point-panel"}, h("h2", {text: title}), figures(point), surrogateSection(point),
           downloads(jobId, point, exports), artifactSection(jobId, point, method));
}
