// The /v1 API with the user's bearer token. The token lives in localStorage; downloads go
// through fetch + Blob + an object URL, because a plain link cannot send the Authorization header.

const TOKEN_KEY = "bitalloc.token";

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

/** An HTTP error with the server's reason (FastAPI's "detail", a string or a list of field errors). */
export class ApiError extends Error {
  constructor(status, detail) {
    super(describe(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

function describe(detail) {
  if (Array.isArray(detail)) return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  return typeof detail === "string" ? detail : "";
}

async function errorOf(response) {
  let detail = "";
  try {
    detail = (await response.json()).detail;
  } catch {
    detail = response.statusText;
  }
  return new ApiError(response.status, detail);
}

async function request(path, options = {}) {
  const headers = {Authorization: `Bearer ${token.get() || ""}`, ...(options.headers || {})};
  const response = await fetch(path, {...options, headers});
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** GET (or another method with a JSON body) and parse the JSON answer. */
export async function api(path, {method = "GET", body} = {}) {
  const options = {method};
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = {"Content-Type": "application/json"};
  }
  return (await request(path, options)).json();
}

function filenameOf(response, fallback) {
  const match = /filename="?([^";]+)"?/.exec(response.headers.get("Content-Disposition") || "");
  return match ? match[1] : fallback;
}

/** Fetch a file with the token and hand it to the browser as a download; returns its file name. */
export async function download(path, fallbackName) {
  const response = await request(path);
  const name = filenameOf(response, fallbackName);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 5000);
  return name;
}
