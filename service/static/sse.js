// Server-sent events read with fetch(): unlike EventSource it can send the API key, and it resumes with
// Last-Event-ID just the same.

import { authHeaders, formatDetail } from "./api.js";

/**
 * Follow an event stream until `onEvent` returns "stop", the signal aborts, or the server ends it for good.
 * Reconnects after a dropped connection, sending the last event id it saw.
 * @param {string} url
 * @param {{signal: AbortSignal, onEvent: (name: string, data: any, id: string|null) => (void|"stop"),
 *          onError?: (message: string) => void, lastEventId?: string|null}} opts
 */
export async function followEvents(url, { signal, onEvent, onError, lastEventId = null }) {
  let lastId = lastEventId;
  let retryMs = 2000;
  while (!signal.aborted) {
    let waitMs = retryMs;
    try {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const res = await fetch(url, { headers, signal, cache: "no-store" });
      if (!res.ok) {
        let msg = `${res.status} ${res.statusText}`;
        try {
          msg = formatDetail((await res.json()).detail) || msg;
        } catch {
          /* keep the status line */
        }
        onError?.(msg);
        // 429: this browser holds too many open streams (CONVLENS_MAX_SSE_PER_CLIENT); one may close soon.
        if (res.status === 429) waitMs = Math.max(retryMs, 1000 * (Number(res.headers.get("Retry-After")) || 5));
        else if (res.status >= 400 && res.status < 500) return; // 404, 401: retrying will not help
      } else {
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let name = "message";
            let id = null;
            const data = [];
            for (const line of block.split("\n")) {
              if (!line || line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "event") name = val;
              else if (field === "data") data.push(val);
              else if (field === "id") id = val;
              else if (field === "retry" && /^\d+$/.test(val)) retryMs = Number(val);
            }
            if (id !== null) lastId = id;
            if (!data.length) continue;
            let parsed = data.join("\n");
            try {
              parsed = JSON.parse(parsed);
            } catch {
              /* plain text data */
            }
            if (onEvent(name, parsed, id) === "stop") {
              reader.cancel().catch(() => {});
              return;
            }
          }
        }
      }
    } catch (e) {
      if (signal.aborted || e.name === "AbortError") return;
      onError?.(`the event stream dropped (${e.message}); reconnecting`);
    }
    await new Promise((r) => setTimeout(r, waitMs));
  }
}
