// The "New job" form: the fields most jobs need, an advanced JSON object merged over them, and
// POST /v1/jobs with the token. Initial values (the schema's defaults and its example job), the
// choices of metric, solver and method, and each field's help come from the API's own schema
// (GET /v1/openapi.json); the server validates, and its 422 is shown beside the form, field by field.

import {api} from "./api.js";
import {h, show} from "./dom.js";

const MIB = 2 ** 20;

let schemas = null;

async function loadSchemas() {
  schemas ??= (await api("/v1/openapi.json")).components.schemas;
  return schemas;
}

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

/** The object `over` merged into `base`: objects key by key, anything else replaced. */
function merge(base, over) {
  const out = {...base};
  for (const [key, value] of Object.entries(over)) {
    out[key] = isObject(value) && isObject(base[key]) ? merge(base[key], value) : value;
  }
  return out;
}

function setPath(target, [key, ...rest], value) {
  if (rest.length) setPath(target[key] ??= {}, rest, value);
  else target[key] = value;
}

const asIs = (value) => value;
const list = (value) => value.split(/[\s,]+/).filter(Boolean);

function markInvalid(input, invalid) {
  if (invalid) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

/** The form's fields: where each value goes in the job (also the loc a 422 names) and how it is read. */
function fieldSpecs({JobCreate, BudgetsIn}) {
  const job = JobCreate.properties;
  const initial = {...Object.fromEntries(Object.entries(job).map(([k, p]) => [k, p.default])), ...JobCreate.examples?.[0]};
  const select = (name, label, options) => ({path: [name], label, options, value: initial[name],
                                             hint: job[name].description, read: asIs});
  return [
    {path: ["model"], label: "Model", value: initial.model, required: true, hint: job.model.description, read: asIs},
    {path: ["formats"], label: "Formats", value: initial.formats?.join(", "), required: true,
     hint: `${job.formats.description} Separate them with commas.`, read: list},
    {path: ["budgets", "avg_bits"], label: "Max average bits", type: "number", value: initial.budgets?.avg_bits,
     hint: BudgetsIn.properties.avg_bits.description, read: Number},
    {path: ["budgets", "bytes"], label: "Max memory (MiB)", type: "number", read: (v) => Math.round(Number(v) * MIB),
     hint: "Max total size (weights, and KV caches when included), in MiB; sent as budgets.bytes."},
    select("metric", "Metric", job.metric.enum),
    select("solver", "Solver", job.solver.enum),
    select("method", "Quantizer", job.method.enum),
    {path: ["baseline"], label: "Baseline (optional)", hint: job.baseline.description, read: asIs},
  ];
}

function control(spec, id) {
  const attrs = {id, name: spec.path.join("."), "aria-describedby": `${id}-hint`};
  if (spec.options) {
    return h("select", attrs, spec.options.map((o) => h("option", {value: o, selected: o === spec.value}, o)));
  }
  return h("input", {...attrs, type: spec.type || "text", step: spec.type === "number" ? "any" : null,
                     value: spec.value, required: spec.required, autocomplete: "off"});
}

function field(id, label, input, hint, wide) {
  return h("div", {class: wide ? "field wide" : "field"}, h("label", {for: id, text: label}), input,
           h("small", {id: `${id}-hint`, class: "hint", text: hint}));
}

/** The advanced JSON: an object, or nothing. */
function parseAdvanced(value) {
  if (!value.trim()) return {};
  const parsed = JSON.parse(value);
  if (!isObject(parsed)) throw new SyntaxError('must be a JSON object, e.g. {"points": 16}');
  return parsed;
}

/** The errors a failed submission shows: a 422's field errors (loc without "body"), else its message. */
function errorsOf(error) {
  if (error.status !== 422 || !Array.isArray(error.detail)) return [{loc: [], msg: error.message}];
  return error.detail.map(({loc = [], msg}) => ({loc: loc[0] === "body" ? loc.slice(1) : loc, msg}));
}

function jobForm(specs, {onCreated, onFail}) {
  const controls = specs.map((spec) => ({...spec, input: control(spec, `job-${spec.path.join("-").replaceAll("_", "-")}`)}));
  const advanced = h("textarea", {id: "job-advanced", rows: 4, spellcheck: "false", "aria-describedby": "job-advanced-hint",
                                  placeholder: '{"points": 16, "kv_cache": {"context": 4096}, "calibration": {"samples": 64}}'});
  const errors = h("ul", {id: "job-errors", class: "error form-errors", role: "alert", hidden: true});
  const status = h("p", {class: "status", "aria-live": "polite"});
  const submit = h("button", {type: "submit"}, "Submit job");

  // The input an error is about: the field whose path starts its loc, else (for any other field) "Advanced".
  const inputOf = (loc) => controls.find((c) => c.path.every((key, i) => loc[i] === key))?.input
                           ?? (loc.length ? advanced : null);
  const report = (list) => {
    show(errors, list.map(({loc, msg}) => h("li", {}, loc.length > 0 && [h("code", {text: loc.join(".")}), ": "], msg)));
    errors.hidden = !list.length;
    const invalid = new Set(list.map(({loc}) => inputOf(loc)));
    for (const input of [...controls.map((c) => c.input), advanced]) markInvalid(input, invalid.has(input));
  };

  const body = () => {
    const job = {};
    for (const c of controls) {
      const value = c.input.value.trim();
      if (value) setPath(job, c.path, c.read(value));
    }
    return merge(job, parseAdvanced(advanced.value));
  };

  const onsubmit = async (event) => {
    event.preventDefault();
    show(status);
    let job;
    try {
      job = body();
    } catch (error) {
      report([{loc: ["advanced"], msg: error.message}]);
      return;
    }
    submit.disabled = true;
    try {
      const created = await api("/v1/jobs", {method: "POST", body: job});
      report([]);
      show(status, `Submitted job ${created.id.slice(0, 8)}; it is selected in the list below.`);
      onCreated(created);
    } catch (error) {
      if (error.status === 401) onFail(error);
      else report(errorsOf(error));
    } finally {
      submit.disabled = false;
    }
  };

  return h("form", {id: "job-form", class: "job-form", onsubmit},
    controls.map((c) => field(c.input.id, c.label, c.input, c.hint, c.path[0] === "model")),
    field("job-advanced", "Advanced (JSON)", advanced,
          "Any other field of the job, merged over the fields above (objects key by key), as in POST /v1/jobs.", true),
    h("div", {class: "buttons wide"}, submit, status), errors);
}

/** The collapsible "New job" card; onCreated(job) runs after the server stored a job, onFail on a 401. */
export function newJobCard(handlers) {
  const body = h("div", {}, h("p", {class: "empty", text: "Loading the job schema…"}));
  loadSchemas().then((found) => show(body, jobForm(fieldSpecs(found), handlers)), (error) => {
    if (error.status === 401) handlers.onFail(error);
    else show(body, h("p", {class: "error", text: `Cannot read the job schema: ${error.message}`}));
  });
  return h("details", {class: "card new-job", id: "new-job"}, h("summary", {}, h("h2", {text: "New job"})), body);
}
