// The dashboard: a token screen, the jobs list with the "New job" form (#/) and a job page (#/jobs/ID)
// with the front, its points, the selected point's allocation, a comparison, downloads and artifact builds.

import {api, token} from "./api.js";
import {drawFront, X_AXES, Y_AXES} from "./chart.js";
import {fmtBytes, fmtNumber, fmtSeconds, fmtTime, h, progressBar, show} from "./dom.js";
import {comparison, formatColours, formatLegend, heatmap} from "./heatmap.js";
import {newJobCard} from "./jobform.js";
import {loadExports, pointPanel} from "./point.js";

const main = document.getElementById("main");
const forget = document.getElementById("forget-token");
const ACTIVE = ["queued", "running"];
let view = 0; // bumped on every route: pollers of an older view stop

function later(gen, seconds, task) {
  return setTimeout(() => { if (gen === view) task().catch(fail); }, seconds * 1000);
}

function fail(error) {
  if (error.status === 401) {
    token.clear();
    tokenForm("The server rejected this token (unknown or revoked). Enter another one.");
  } else {
    show(main, h("p", {class: "error", text: error.message}));
  }
}

function route() {
  view += 1;
  forget.hidden = !token.get();
  if (!token.get()) return tokenForm();
  const match = /^#\/jobs\/([0-9a-fA-F-]+)$/.exec(location.hash);
  return (match ? jobPage(match[1], view) : jobsPage(view)).catch(fail);
}

function tokenForm(message) {
  forget.hidden = true;
  const input = h("input", {type: "password", id: "token-input", autocomplete: "off", required: true,
                            placeholder: "bat_…", "aria-label": "API token"});
  const submit = (event) => {
    event.preventDefault();
    token.set(input.value.trim());
    route();
  };
  show(main, h("form", {id: "token-form", class: "card narrow", onsubmit: submit},
    h("h2", {text: "API token"}),
    h("p", {}, "Paste a token from ", h("code", {text: "bitalloc token create --name NAME"}),
      ". This browser keeps it (localStorage) until you choose Forget token."),
    message && h("p", {class: "error", text: message}),
    h("div", {class: "buttons"}, input, h("button", {type: "submit"}, "Use token"))));
  input.focus();
}

// ---- jobs list ------------------------------------------------------------------------------

function stateBadge(state) {
  return h("span", {class: `badge ${state}`, text: state});
}

function progressCell(job) {
  if (job.state === "succeeded") return "done";
  if (!ACTIVE.includes(job.state)) return job.error ? h("span", {class: "error-text", text: job.error}) : "–";
  const {phase, done, total, percent} = job.progress;
  const label = `${Math.round(percent)}%${phase ? ` · ${phase}` : ""}${total ? ` ${done}/${total}` : ""}`;
  return progressBar(percent, label);
}

function jobRow(job, selectedId) {
  const selected = job.id === selectedId;
  return h("tr", {"data-job-id": job.id, "data-state": job.state, class: selected && "selected",
                  "aria-current": selected && "true"},
    h("td", {}, h("a", {href: `#/jobs/${job.id}`, class: "job-link", text: job.id.slice(0, 8)})),
    h("td", {text: job.spec.model}),
    h("td", {class: "formats", text: (job.spec.formats || []).join(", ")}),
    h("td", {}, stateBadge(job.state)),
    h("td", {class: "progress"}, progressCell(job)),
    h("td", {text: fmtTime(job.created_at)}),
    h("td", {class: "num", text: fmtSeconds(job.seconds)}));
}

function jobsTable(list, selectedId) {
  if (!list.items.length) {
    return h("div", {class: "card"}, h("h2", {text: "Jobs"}),
      h("p", {class: "empty"}, "No jobs for this token yet. Submit one with New job above, or with ",
        h("code", {text: "POST /v1/jobs"}), " (see ", h("a", {href: "/v1/docs", text: "the API docs"}), ")."));
  }
  const head = ["job", "model", "formats", "state", "progress", "submitted", "took"].map((t) => h("th", {text: t}));
  return h("div", {class: "card"}, h("h2", {text: `Jobs (${list.total})`}),
    h("table", {class: "jobs"}, h("thead", {}, h("tr", {}, head)),
      h("tbody", {}, list.items.map((job) => jobRow(job, selectedId)))));
}

/** Redraw the jobs table now and then every second while a job is active, else every 10 s; a newer call wins. */
function jobsPoller(gen, box, state) {
  let seq = 0;
  let timer;
  const refresh = async () => {
    const mine = ++seq;
    const list = await api("/v1/jobs?limit=100");
    if (gen !== view || mine !== seq) return;
    show(box, jobsTable(list, state.selectedId));
    clearTimeout(timer);
    timer = later(gen, list.items.some((j) => ACTIVE.includes(j.state)) ? 1 : 10, refresh);
  };
  return refresh;
}

async function jobsPage(gen) {
  const state = {selectedId: null};
  const box = h("div", {id: "jobs"});
  const refresh = jobsPoller(gen, box, state);
  const onCreated = (job) => {
    state.selectedId = job.id;
    refresh().catch(fail);
  };
  show(main, newJobCard({onCreated, onFail: fail}), box);
  await refresh();
}

// ---- job page -------------------------------------------------------------------------------

function jobHeader(job) {
  const spec = job.spec;
  const evaluation = job.result?.evaluation;
  const facts = [["model", spec.model], ["formats", (spec.formats || []).join(", ")], ["metric", spec.metric],
                 ["solver", spec.solver], ["method", spec.method], ["submitted", fmtTime(job.created_at)],
                 ["took", fmtSeconds(job.seconds)]];
  if (evaluation && typeof evaluation === "object") {
    for (const [k, v] of Object.entries(evaluation)) if (typeof v === "number") facts.push([`held-out ${k}`, fmtNumber(v, 4)]);
  }
  return h("div", {class: "card job-header"},
    h("p", {}, h("a", {href: "#/", text: "← all jobs"})),
    h("h2", {}, `Job ${job.id} `, stateBadge(job.state)),
    ACTIVE.includes(job.state) && progressCell(job),
    shardList(job.shards),
    h("dl", {class: "facts"}, facts.map(([k, v]) => h("div", {}, h("dt", {text: k}), h("dd", {text: v})))));
}

/** The block-range shards of a profile measured by several workers, each with its state and progress. */
function shardList(shards) {
  if (!shards?.length) return false;
  const measured = shards.filter((s) => s.state === "succeeded").length;
  return h("div", {class: "shards"},
    h("p", {text: `profile shards: ${measured} of ${shards.length} measured`}),
    h("ul", {}, shards.map((s) => h("li", {},
      `shard ${s.index + 1} · blocks ${s.blocks[0]}–${s.blocks[1] - 1} `, stateBadge(s.state),
      ACTIVE.includes(s.state) && progressBar(s.percent, `${Math.round(s.percent)}%`),
      s.attempts > 1 && ` attempt ${s.attempts}`,
      s.error && h("span", {class: "error-text", text: ` ${s.error}`})))));
}

function notFinished(job) {
  if (ACTIVE.includes(job.state)) {
    return h("p", {class: "notice", text: `The job is ${job.state}: its front appears when it succeeds.`});
  }
  if (job.state === "failed") {
    return h("div", {class: "error job-failed"}, h("strong", {text: "The job failed: "}), job.error || "no reason recorded");
  }
  return h("p", {class: "notice", text: `The job was canceled${job.error ? `: ${job.error}` : ""}.`});
}

/** A secondary read that must not break the page: its value, or the fallback plus a note of why. */
async function optional(promise, fallback) {
  try {
    return {value: await promise};
  } catch (error) {
    if (error.status === 401) throw error;
    return {value: fallback, error: error.message};
  }
}

async function jobPage(jobId, gen) {
  const job = await api(`/v1/jobs/${jobId}`);
  if (gen !== view) return;
  if (job.state !== "succeeded") {
    show(main, jobHeader(job), notFinished(job));
    if (ACTIVE.includes(job.state)) later(gen, 1, () => jobPage(jobId, gen));
    return;
  }
  const [front, baselines, layout, exports] = await Promise.all([
    api(`/v1/jobs/${jobId}/front`), optional(api(`/v1/jobs/${jobId}/baselines`), {points: []}),
    optional(api(`/v1/jobs/${jobId}/units`), null), loadExports()]);
  if (gen !== view) return;
  const state = {
    jobId, job, front, exports, layout: layout.value, layoutError: layout.error, baselines: baselines.value.points,
    colours: layout.value && formatColours(layout.value.formats), x: "avg_bits", y: "error",
    selectedId: front.chosen_point_id ?? front.points[0]?.id ?? null, compareId: null, details: new Map(), seq: 0,
  };
  show(main, jobHeader(job), jobLayout(state, baselines.error));
  renderFront(state);
  renderSelection(state);
}

function jobLayout(state, baselinesError) {
  return h("div", {class: "job-grid"},
    h("section", {class: "card chart-card"}, h("h2", {text: "Pareto front"}), axisControls(state),
      h("div", {id: "chart", class: "chart"}),
      baselinesError && h("p", {class: "notice", text: `Baselines unavailable: ${baselinesError}`})),
    h("section", {class: "card", id: "point"}),
    h("section", {class: "card wide"}, h("h2", {text: "Allocation"}), compareControl(state), h("div", {id: "allocation"})),
    h("section", {class: "card wide"}, h("h2", {text: "Points"}), h("div", {id: "points", class: "scroll"})));
}

function toggle(label, options, current, enabled, onChange) {
  return h("div", {class: "toggle", role: "group", "aria-label": label}, h("span", {text: `${label}:`}),
    Object.entries(options).map(([key, axis]) => h("button", {
      type: "button", "data-axis": key, class: key === current ? "on" : "", disabled: !enabled(key),
      onclick: () => onChange(key),
    }, axis.short)));
}

function axisControls(state) {
  const box = h("div", {class: "controls"});
  const hasKl = state.front.points.some((p) => p.measured_kl !== null);
  const draw = () => {
    show(box,
      toggle("x", X_AXES, state.x, () => true,
             (key) => { state.x = key; draw(); renderFront(state); }),
      toggle("y", Y_AXES, state.y,
             (key) => key === "error" || hasKl, (key) => { state.y = key; draw(); renderFront(state); }));
  };
  draw();
  return box;
}

function compareControl(state) {
  const select = h("select", {id: "compare-select", "aria-label": "compare with",
    onchange: () => pick(state, select.value ? Number(select.value) : null, true)});
  const fillOptions = () => {
    show(select, h("option", {value: ""}, "— none —"),
      state.front.points.filter((p) => p.id !== state.selectedId)
        .map((p) => h("option", {value: p.id, selected: p.id === state.compareId},
                      `point ${p.id} · ${fmtNumber(p.avg_bits, 3)} bits`)));
  };
  state.refreshCompare = fillOptions;
  fillOptions();
  return h("p", {class: "controls"}, "Compare with ", select, h("span", {class: "hint", text: " (or shift-click a point)"}));
}

/** Click selects a point; shift-click (or the compare selector) sets or clears the point compared with it. */
function pick(state, id, compare) {
  if (compare) {
    state.compareId = id === state.compareId || id === state.selectedId ? null : id;
  } else {
    state.selectedId = id;
    if (state.compareId === id) state.compareId = null;
  }
  renderFront(state);
  renderSelection(state);
}

function renderFront(state) {
  const onPick = (id, shift) => pick(state, id, shift);
  drawFront(document.getElementById("chart"), {points: state.front.points, baselines: state.baselines, x: state.x,
    y: state.y, selectedId: state.selectedId, compareId: state.compareId, onPick});
  show(document.getElementById("points"), pointsTable(state, onPick));
  state.refreshCompare();
}

function pointsTable(state, onPick) {
  const head = ["point", "", "avg bits", "size", "predicted error", "latency", "measured KL"].map((t) => h("th", {text: t}));
  const rows = state.front.points.map((p) => h("tr", {
    "data-point-id": p.id, class: p.id === state.selectedId ? "selected" : p.id === state.compareId ? "compare" : "",
    onmousedown: (event) => { if (event.shiftKey) event.preventDefault(); }, // shift-click compares, not selects text
    onclick: (event) => onPick(p.id, event.shiftKey)},
    h("td", {class: "num", text: p.id}),
    h("td", {text: p.chosen ? "★" : "", title: p.chosen ? "solved at the job's budget" : ""}),
    h("td", {class: "num", text: fmtNumber(p.avg_bits, 4)}), h("td", {class: "num", text: fmtBytes(p.bytes)}),
    h("td", {class: "num", text: fmtNumber(p.error, 4)}), h("td", {class: "num", text: fmtSeconds(p.latency)}),
    h("td", {class: "num", text: fmtNumber(p.measured_kl, 4)})));
  return h("table", {class: "points"}, h("thead", {}, h("tr", {}, head)), h("tbody", {}, rows));
}

async function detail(state, id) {
  if (!state.details.has(id)) state.details.set(id, api(`/v1/jobs/${state.jobId}/points/${id}`));
  return state.details.get(id);
}

async function renderSelection(state) {
  const seq = ++state.seq;
  const panel = document.getElementById("point");
  const allocation = document.getElementById("allocation");
  if (state.selectedId === null) {
    show(panel, h("p", {class: "empty", text: "The front has no points."}));
    show(allocation);
    return;
  }
  const [a, b] = await Promise.all([detail(state, state.selectedId),
                                    state.compareId === null ? null : detail(state, state.compareId)]);
  if (seq !== state.seq || !panel.isConnected) return;
  show(panel, pointPanel({jobId: state.jobId, point: a, exports: state.exports, method: state.job.spec.method}));
  show(allocation, allocationView(state, a, b));
}

function allocationView(state, a, b) {
  if (!state.layout) return h("p", {class: "error", text: `Units unavailable: ${state.layoutError}`});
  const units = state.layout.units;
  const body = b ? comparison({units, colours: state.colours, a, b})
                 : heatmap({units, colours: state.colours, formats: a.formats, title: `point ${a.id}`});
  return h("div", {id: "allocation-view", "data-point-id": a.id, "data-compare-id": b ? b.id : ""},
           formatLegend(state.colours), body);
}

forget.addEventListener("click", () => {
  token.clear();
  route();
});
window.addEventListener("hashchange", route);
route();
