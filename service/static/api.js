// The page's only way to the server: the public HTTP API, with the API key when one is set.

const KEY_STORE = "convlens.apiKey";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

let keyInput = null;

/** Bind the API-key field: its value goes into every request; it lives in sessionStorage (this tab) only. */
export function bindKey(input) {
  keyInput = input;
  input.value = sessionStorage.getItem(KEY_STORE) || "";
  input.addEventListener("input", () => {
    const v = input.value.trim();
    if (v) sessionStorage.setItem(KEY_STORE, v);
    else sessionStorage.removeItem(KEY_STORE);
  });
}

export function authHeaders() {
  const key = keyInput ? keyInput.value.trim() : "";
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** FastAPI's `detail`: a sentence, or a list of validation errors naming the field. */
export function formatDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => {
        if (!e || typeof e !== "object") return String(e);
        const loc = Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body" && p !== "query").join(".") : "";
        return loc ? `${loc}: ${e.msg}` : e.msg;
      })
      .join("; ");
  }
  return JSON.stringify(detail);
}

async function errorFrom(res) {
  let body = null;
  let message = `${res.status} ${res.statusText}`;
  try {
    body = await res.json();
    if (body && body.detail !== undefined) message = formatDetail(body.detail);
  } catch {
    /* not JSON: keep the status line */
  }
  if (res.status === 401) message += " (enter the server's API key in the field at the top)";
  return new ApiError(res.status, message, body);
}

/** fetch() against the API; throws ApiError carrying the API's `detail` on a non-2xx answer. */
export async function request(path, { method = "GET", query, json, form, headers, signal } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
  }
  const init = { method, headers: { ...authHeaders(), ...(headers || {}) }, signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server did not answer (${e.message})`, null);
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

export async function getJSON(path, opts) {
  return (await request(path, opts)).json();
}

/** An image answer as an object URL (fetched with the key, so it works when every route needs one). */
export async function imageURL(path, opts) {
  const res = await request(path, opts);
  const blob = await res.blob();
  return { url: URL.createObjectURL(blob), res };
}

/** One file (or blob) as the multipart body the image endpoints read (`file`, or `files` for /predict). */
export function imageForm(blob, field = "file") {
  const form = new FormData();
  form.append(field, blob, blob.name || "image.png");
  return form;
}
