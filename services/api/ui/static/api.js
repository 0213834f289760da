// Calls to the modelbus API from its own page: the bearer token (asked once, kept in this tab's
// sessionStorage) on every call, and every error as an ApiError with the API's one-line message.
const KEY = "modelbus-token";

export class ApiError extends Error {
  constructor(status, type, message, details = []) {
    super(message);
    this.status = status;
    this.type = type;
    this.details = details;
  }
}

export const token = () => sessionStorage.getItem(KEY) || "";

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return headers;
}

let asking = null;

/** Show the token dialog; resolves once a token was entered. */
export function askToken() {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const error = document.getElementById("token-error");
  if (token()) {
    error.textContent = "The API refused that token; enter it again.";
    error.hidden = false;
  }
  asking = new Promise((resolve) => {
    form.addEventListener("submit", function done(e) {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      form.removeEventListener("submit", done);
      input.value = "";
      error.hidden = true;
      dialog.close();
      asking = null;
      resolve();
    });
  });
  dialog.addEventListener("cancel", (e) => e.preventDefault(), { once: true });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return asking;
}

export async function errorOf(response) {
  const text = await response.text();
  try {
    const e = JSON.parse(text).error;
    return new ApiError(response.status, e.type, e.message, e.details || []);
  } catch {
    const shown = new DOMParser().parseFromString(text, "text/html").querySelector(".error");
    return new ApiError(response.status, "HTTPError", shown ? shown.textContent.trim() : `HTTP ${response.status}`);
  }
}

async function send(method, url, body, accept) {
  for (;;) {
    const headers = authHeaders({ Accept: accept });
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, { method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "NetworkError", `the API did not answer (${e.message})`);
    }
    if (response.status === 401) {
      await askToken();
      continue;
    }
    return response;
  }
}

/** A JSON call; throws ApiError on any error status. */
export async function call(method, url, body) {
  const response = await send(method, url, body, "application/json");
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

/** A page fragment's HTML (a fragment that failed renders its own error, shown where it would be). */
export async function fragment(url) {
  const response = await send("GET", url, undefined, "text/html");
  if (response.ok || (response.headers.get("content-type") || "").startsWith("text/html")) return response.text();
  throw await errorOf(response);
}

/** Put an error's message in ``el`` (a role=alert element) and show it. */
export function showError(el, error) {
  el.textContent = error instanceof ApiError || error instanceof Error ? error.message : String(error);
  el.hidden = false;
}

export function clearError(el) {
  el.textContent = "";
  el.hidden = true;
}
