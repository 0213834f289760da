// The page's script: fragments fetched with the token, covers, and one init function per page.
import { ApiError, authHeaders, call, clearError, fragment, showError } from "./api.js";
import { follow } from "./stream.js";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const tokenRequired = () => document.body.dataset.token === "required";

function human(n) {
  if (typeof n !== "number" || n < 0) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

function liveState(state, message) {
  const el = $("#live");
  if (!el) return;
  el.hidden = false;
  el.dataset.state = state;
  el.textContent = state === "live" ? "live" : message || state;
}

// from where the page was rendered: nothing appended since then is missed
function stream(options) {
  return follow({ onState: liveState, since: document.body.dataset.since || "$", ...options });
}

// --- covers: the cover route when the API has one; the initial letter when a model has none ---------
function covers(root = document) {
  for (const img of $$("img.cover[data-src]", root)) {
    const url = img.dataset.src;
    img.removeAttribute("data-src");
    img.addEventListener("error", () => img.remove(), { once: true });
    if (!tokenRequired()) {
      img.src = url;
      continue;
    }
    fetch(url, { headers: authHeaders() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
      .then((blob) => { img.src = URL.createObjectURL(blob); })
      .catch(() => img.remove());
  }
}

// --- fragments ------------------------------------------------------------------------------------
async function load(container, url) {
  container.setAttribute("aria-busy", "true");
  try {
    container.innerHTML = await fragment(url);
  } catch (e) {
    container.innerHTML = "";
    const p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    showError(p, e);
    container.append(p);
  } finally {
    container.removeAttribute("aria-busy");
  }
  covers(container);
}

function reloadContent() {
  const content = $("#content");
  return load(content, content.dataset.fragment);
}

// a throttled reload: events may come by the hundred, the fragment is fetched at most every `ms`
function throttled(fn, ms) {
  let timer = null;
  let again = false;
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(function tick() {
      timer = null;
      if (again) { again = false; fn(); timer = setTimeout(tick, ms); }
    }, ms);
  };
}

// --- models ---------------------------------------------------------------------------------------
function initModels() {
  const form = $("#filters");
  const content = $("#content");
  const show = (query, push) => {
    content.dataset.fragment = `/ui/f/models?${query}`;
    history[push ? "pushState" : "replaceState"](null, "", `/ui?${query}`);
    return reloadContent();
  };
  const query = () => {
    const params = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...params]) if (!v) params.delete(k);
    return params.toString();
  };
  let timer = null;
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => show(query(), false), 200); });
  form.addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(timer); show(query(), false); });
  content.addEventListener("click", (e) => {
    const link = e.target.closest("a[data-frag]");
    if (!link) return;
    e.preventDefault();
    show(new URL(link.href).search.slice(1), true).then(() => $("#models-table", content)?.focus?.());
  });
  window.addEventListener("popstate", () => {
    const params = new URLSearchParams(location.search);
    for (const el of form.elements) if (el.name) el.value = params.get(el.name) || (el.tagName === "SELECT" ? el.options[0].value : "");
    content.dataset.fragment = `/ui/f/models${location.search}`;
    reloadContent();
  });
}

// --- one model ------------------------------------------------------------------------------------
function valueOf(kind, input) {
  if (kind === "bool") return input.checked;
  const text = input.value.trim();
  if (kind === "list") return text ? text.split(",").map((t) => t.trim()).filter(Boolean) : [];
  if (kind === "number") return text === "" ? null : Number(text);
  return text === "" ? null : text;
}

function fieldMessage(error, field) {
  const mine = (error.details || []).filter((d) => d.field === field || d.field === `body.${field}` || d.field?.endsWith(`.${field}`));
  return (mine.length ? mine.map((d) => d.message).join("; ") : error.message);
}

function initModel() {
  const content = $("#content");
  const key = content.dataset.key;
  const base = `/api/v2/models/i/${encodeURIComponent(key)}`;

  content.addEventListener("click", async (e) => {
    const target = e.target;
    const row = target.closest(".field");
    if (target.matches("button.edit")) {
      const editor = $(".editor", row);
      editor.hidden = false;
      target.hidden = true;
      $(".value", row).hidden = true;
      $("[name=value]", editor).focus();
    } else if (target.matches(".editor .cancel")) {
      const editor = target.closest(".editor");
      editor.hidden = true;
      $("button.edit", row).hidden = false;
      $(".value", row).hidden = false;
      $("button.edit", row).focus();
    } else if (target.matches("button.as-of")) {
      const out = $("#as-of");
      await load(out, `/ui/f/models/${encodeURIComponent(key)}/at/${encodeURIComponent(target.dataset.position)}`);
      for (const li of $$("#timeline li")) li.classList.toggle("selected", li.dataset.position === target.dataset.position);
    } else if (target.matches("#load, #unload")) {
      const loading = target.id === "load";
      const result = $("#load-result");
      const error = $("#load-error");
      clearError(error);
      result.textContent = loading ? "loading…" : "unloading…";
      target.disabled = true;
      try {
        const answer = await call("POST", `${base}/${target.id}`, {});
        await reloadContent();
        if (loading && answer.worker && !$("#holders").textContent.includes(answer.worker)) {
          // the worker's next heartbeat lists it; until then, the load's answer says where it went
          const li = document.createElement("li");
          li.textContent = `${answer.worker} (${answer.device || "?"}, just loaded)`;
          $("#holders .empty")?.remove();
          $("#holders").append(li);
        }
        $("#load-result").textContent = loading
          ? `loaded on ${answer.worker || "a worker"}${answer.cache_hit ? " (from its cache)" : ""}${answer.seconds !== undefined ? ` in ${Number(answer.seconds).toFixed(2)} s` : ""}`
          : answer.state === "unloaded" ? `unloaded from ${(answer.workers || []).join(", ") || "its workers"}` : "it was not loaded";
      } catch (err) {
        result.textContent = "";
        showError(error, err);
      } finally {
        target.disabled = false;
      }
    }
  });

  content.addEventListener("submit", async (e) => {
    if (e.target.matches(".editor")) {
      e.preventDefault();
      const editor = e.target;
      const row = editor.closest(".field");
      const field = row.dataset.field;
      const error = $(".field-error", editor);
      clearError(error);
      const value = valueOf(row.dataset.kind, $("[name=value]", editor));
      try {
        if (field === "name") await call("POST", `${base}/rename`, { name: value || "" });
        else await call("PATCH", base, { [field]: value });
        await reloadContent();
        $(`.field[data-field="${field}"] button.edit`)?.focus();
      } catch (err) {
        showError(error, new ApiError(err.status, err.type, fieldMessage(err, field)));  // what was typed stays
        $("[name=value]", editor).focus();
      }
    } else if (e.target.id === "delete-form") {
      e.preventDefault();
      const form = e.target;
      const dialog = $("#delete-dialog");
      const files = form.delete_files.checked;
      $("#confirm-text").textContent = files
        ? "The record and exactly the files recorded at its install are deleted."
        : "The record is removed; its files stay where they are.";
      dialog.returnValue = "";
      dialog.showModal();
      dialog.addEventListener("close", async () => {
        if (dialog.returnValue !== "delete") return;
        const error = $("#delete-error");
        clearError(error);
        try {
          await call("DELETE", `${base}?delete_files=${files}`);
          location.assign(`/ui?deleted=${encodeURIComponent(key)}`);
        } catch (err) {
          showError(error, err);
        }
      }, { once: true });
    }
  });
}

// --- install --------------------------------------------------------------------------------------
const TERMINAL = new Set(["completed", "error", "cancelled"]);

function initInstall() {
  const form = $("#install-form");
  const error = $("#install-error");
  const cards = new Map();   // job id -> {el, files: Map(file -> {bytes, at, speed})}
  const early = new Map();   // events that came before the POST's answer
  const onEvent = (d) => {
    const p = d.event.payload || {};
    const card = cards.get(p.job_id);
    if (!card) {
      if (p.job_id) { if (!early.has(p.job_id)) early.set(p.job_id, []); early.get(p.job_id).push(d); }
      return;
    }
    apply(card, d);
  };
  stream({ types: "install_progress,install_job", onEvent });

  function apply(card, d) {
    const p = d.event.payload;
    if (d.type === "install_progress") {
      const at = Date.parse(d.event.time);
      const before = card.files.get(p.file);
      const speed = before && at > before.at ? ((p.bytes - before.bytes) * 1000) / (at - before.at) : before?.speed || 0;
      card.files.set(p.file, { bytes: p.bytes, total: p.total_bytes, at, speed });
      render(card);
    } else if (d.type === "install_job") {
      setState(card, p.status);
      if (TERMINAL.has(p.status)) finish(card);
    }
  }

  function render(card) {
    const body = $(".job-files tbody", card.el);
    body.replaceChildren(...[...card.files].map(([file, f]) => {
      const tr = document.createElement("tr");
      const eta = f.speed > 0 && f.total ? Math.max(0, (f.total - f.bytes) / f.speed) : null;
      const label = /^\d+$/.test(file) ? `file ${Number(file) + 1}` : file;  // downloads number their files
      for (const text of [label, `${human(f.bytes)}${f.total ? ` / ${human(f.total)}` : ""}`,
        f.speed ? `${human(Math.round(f.speed))}/s` : "—", eta === null ? "—" : `${Math.ceil(eta)} s`]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }));
    const done = [...card.files.values()].reduce((a, f) => a + f.bytes, 0);
    const total = [...card.files.values()].reduce((a, f) => a + (f.total || 0), 0);
    const bar = $(".job-bar", card.el);
    if (total) { bar.max = total; bar.value = Math.min(done, total); }
  }

  function setState(card, state) {
    card.el.dataset.state = state;
    $(".job-state", card.el).textContent = state;
  }

  async function finish(card) {
    if (card.finished) return;
    card.finished = true;
    clearInterval(card.poll);
    try {
      const job = await call("GET", `/api/v2/models/install/${encodeURIComponent(card.id)}`);
      setState(card, job.state);
      if (job.state === "completed" && job.key) {
        const done = $(".job-done", card.el);
        const a = document.createElement("a");
        a.href = `/ui/models/${encodeURIComponent(job.key)}`;
        a.textContent = `Open ${(job.config && job.config.name) || job.key}`;
        done.replaceChildren("Installed. ", a);
        done.hidden = false;
        const bar = $(".job-bar", card.el);
        bar.max = 1; bar.value = 1;
      } else if (job.state !== "completed") {
        showError($(".job-error", card.el), `install of ${job.source} ${job.state}: ${job.error || "no reason given"}`);
      }
    } catch (err) {
      showError($(".job-error", card.el), err);
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError(error);
    const data = new FormData(form);
    const source = (data.get("source") || "").trim();
    if (!source) { showError(error, "a source is needed: a path, URL, owner/repo or civitai:ID"); $("#source").focus(); return; }
    const body = { source, inplace: data.get("inplace") === "on", force: data.get("force") === "on" };
    if (data.get("variant")) body.variant = data.get("variant").trim();
    if (data.get("name")) body.config = { name: data.get("name").trim() };
    const button = $("#install-submit");
    button.disabled = true;
    try {
      const job = await call("POST", "/api/v2/models/install", body);
      const el = $("#job-card").content.firstElementChild.cloneNode(true);
      el.dataset.job = job.id;
      $(".job-source", el).textContent = job.source;
      const card = { id: job.id, el, files: new Map(), finished: false };
      cards.set(job.id, card);
      $("#install-jobs").prepend(el);
      setState(card, job.state);
      for (const d of early.get(job.id) || []) apply(card, d);
      early.delete(job.id);
      if (TERMINAL.has(job.state)) finish(card);
      // a safety net beside the events: the job's state every few seconds until it ends
      card.poll = setInterval(async () => {
        try {
          const now = await call("GET", `/api/v2/models/install/${encodeURIComponent(job.id)}`);
          if (TERMINAL.has(now.state)) finish(card); else if (!card.files.size) setState(card, now.state);
        } catch { /* the next event or poll tells */ }
      }, 3000);
    } catch (err) {
      showError(error, err);  // the form keeps what was typed
    } finally {
      button.disabled = false;
    }
  });
}

// --- jobs -----------------------------------------------------------------------------------------
function initJobs() {
  const content = $("#content");
  const refresh = throttled(reloadContent, 500);
  stream({ types: "install_job,install_progress", onEvent: refresh });
  content.addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button) return;
    button.disabled = true;
    try {
      await call(button.dataset.method, button.dataset.url);
      await reloadContent();
    } catch (err) {
      button.disabled = false;
      let msg = button.parentElement.querySelector(".error");
      if (!msg) {
        msg = document.createElement("small");
        msg.className = "error";
        msg.setAttribute("role", "alert");
        button.after(msg);
      }
      showError(msg, err);
    }
  });
}

// --- event lists (workers' feed, events page) -----------------------------------------------------
function summary(d) {
  const e = d.event;
  const p = e.payload || {};
  const parts = [];
  if (p.model_key || p.key) parts.push(p.model_key || p.key);
  if (p.submodel) parts.push(p.submodel);
  if (p.worker) parts.push(`on ${p.worker}`);
  if (p.device) parts.push(p.device);
  if (p.cache_hit !== undefined) parts.push(p.cache_hit ? "cache hit" : "from disk");
  if (p.seconds !== undefined) parts.push(`${Number(p.seconds).toFixed(2)} s`);
  if (p.from && p.to) parts.push(`${p.from} → ${p.to} (${p.reason})`);
  if (p.bytes !== undefined && !p.from) parts.push(human(p.bytes));
  if (p.status) parts.push(p.status);
  if (p.error) parts.push(p.error);
  if (e.type !== "Activity") {
    parts.push(e.aggregate_id);
    if (e.changes) parts.push(Object.keys(e.changes).join(", "));
    if (e.new_name) parts.push(`→ ${e.new_name}`);
    if (e.source) parts.push(e.source);
    if (e.error) parts.push(e.error);
  }
  return parts.filter(Boolean).join(" · ");
}

function eventItem(d) {
  const li = document.createElement("li");
  li.dataset.id = d.id;
  li.dataset.type = d.type;
  li.dataset.time = d.event.time;
  const time = document.createElement("time");
  time.dateTime = d.event.time;
  time.textContent = (d.event.time || "").slice(11, 23);
  const type = document.createElement("strong");
  type.textContent = d.type;
  const stream = document.createElement("span");
  stream.className = `badge ${d.stream}`;
  stream.textContent = d.stream;
  const text = document.createElement("span");
  text.className = "summary";
  text.textContent = summary(d);
  li.append(time, " ", stream, " ", type, " ", text);
  return li;
}

function eventList(list, types, limit = 500) {
  return stream({
    types,
    onEvent: (d) => {
      list.prepend(eventItem(d));
      while (list.children.length > limit) list.lastElementChild.remove();
    },
  });
}

function initWorkers() {
  const content = $("#content");
  const every = Number(content.dataset.refresh) || 2000;
  const tick = async () => { await reloadContent(); setTimeout(tick, every); };
  setTimeout(tick, tokenRequired() ? 0 : every);
  const feed = $("#feed");
  eventList(feed, feed.dataset.types, 200);
}

function initEvents() {
  const list = $("#events");
  const form = $("#events-filter");
  let current = eventList(list, list.dataset.types);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    current.stop();
    list.replaceChildren();
    const types = form.types.value.trim();
    history.replaceState(null, "", types ? `/ui/events?types=${encodeURIComponent(types)}` : "/ui/events");
    document.body.dataset.since = "$";  // a new filter: what comes from now on
    current = eventList(list, types);
  });
  $("#events-clear").addEventListener("click", () => list.replaceChildren());
}

// --- start ----------------------------------------------------------------------------------------
const PAGES = { models: initModels, model: initModel, install: initInstall, jobs: initJobs,
  workers: initWorkers, events: initEvents };

async function start() {
  const content = $("#content");
  if (content && tokenRequired() && content.dataset.fragment && document.body.dataset.page !== "workers") {
    await reloadContent();  // the shell came without data: fetch it with the token (asked for on a 401)
  }
  covers();
  PAGES[document.body.dataset.page]?.();
  document.documentElement.dataset.ready = "yes";
}

start();
