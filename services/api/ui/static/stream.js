// The SSE stream /api/v2/events read with fetch (an EventSource cannot send the bearer token). After a
// dropped connection it reconnects with Last-Event-ID, so the server resumes right after the last
// message this page got: no gap, no double (ids are also checked here).
import { askToken, authHeaders, errorOf } from "./api.js";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function parse(block) {
  const message = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    message[field] = message[field] === undefined ? value : `${message[field]}\n${value}`;
  }
  if (message.data === undefined) return null;
  return { id: message.id, type: message.event, ...JSON.parse(message.data) };
}

/**
 * Follow the events of ``types`` (comma-separated; "" for all) from ``since`` ("$": new ones only).
 * ``onEvent(delivered)`` gets {id, stream, position, type, event}; ``onState(state, message)`` gets
 * "live", "reconnecting" or "error".
 */
export function follow({ types = "", since = "$", onEvent, onState = () => {} }) {
  let last = null;
  let stopped = false;
  let controller = null;
  const seen = new Set();

  async function run() {
    let attempt = 0;
    while (!stopped) {
      controller = new AbortController();
      const params = new URLSearchParams({ since });
      if (types) params.set("types", types);
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (last) headers["Last-Event-ID"] = last;
      try {
        const response = await fetch(`/api/v2/events?${params}`, { headers, signal: controller.signal });
        if (response.status === 401) {
          await askToken();
          continue;
        }
        if (!response.ok) {
          const error = await errorOf(response);
          onState("error", error.message);
          if (response.status < 500) return;  // a bad filter stays bad
        } else {
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          onState("live");
          attempt = 0;
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const message = parse(buffer.slice(0, end));
              buffer = buffer.slice(end + 2);
              if (!message || seen.has(message.id)) continue;
              seen.add(message.id);
              if (seen.size > 5000) seen.delete(seen.values().next().value);
              last = message.id;
              onEvent(message);
            }
          }
        }
      } catch (e) {
        if (stopped) return;
      }
      if (stopped) return;
      attempt += 1;
      onState("reconnecting", "event stream dropped; reconnecting…");
      await sleep(Math.min(5000, 250 * 2 ** Math.min(attempt, 5)));
    }
  }
  run();
  return {
    stop() {
      stopped = true;
      if (controller) controller.abort();
    },
  };
}
