// The offload playground: plain JavaScript against the server's public API, same origin, no build step.
//
// A request is created with POST v1/stream-chatgpt or v1/async-chatgpt; its reply is followed through the
// browser's own EventSource (private requests: the `stream_token` query, since EventSource sends no headers);
// its status document is polled (with If-None-Match) until it is final. Continuing sends `from_status_url` and
// `from_bearer_token` of the previous request, which the server resolves in its own store.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FINAL = ["done", "error", "stop"];
  const POLL_MS = 1000;

  /** The request shown in the inspector (one at a time). */
  let current = null;

  // ---- small helpers -------------------------------------------------------------------------------------

  function say(text, isError) {
    const el = $("message");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
  }

  function errorText(json, status) {
    const e = json && json.error;
    if (e && e.message) return `${e.message}${e.param ? ` (${e.param})` : ""} [HTTP ${status}]`;
    return `The server answered HTTP ${status}.`;
  }

  function bearer(token) {
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function radio(name) {
    const checked = document.querySelector(`input[name="${name}"]:checked`);
    return checked ? checked.value : "";
  }

  function setStatus(status) {
    const el = $("request-status");
    el.textContent = status || "none";
    el.dataset.status = status || "";
  }

  // ---- the transcript ------------------------------------------------------------------------------------

  function addTurn(role, text) {
    $("transcript-empty").hidden = true;
    const li = document.createElement("li");
    li.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    li.append(who, content);
    $("transcript").append(li);
    li.scrollIntoView({ block: "nearest" });
    return content;
  }

  function clearTranscript() {
    for (const li of [...$("transcript").querySelectorAll(".turn")]) li.remove();
    $("transcript-empty").hidden = false;
  }

  function contentOf(message) {
    if (!message) return "";
    if (typeof message.content === "string") return message.content;
    if (Array.isArray(message.content)) {
      return message.content.map((part) => (part && typeof part.text === "string" ? part.text : "")).join("");
    }
    if (message.tool_calls) return JSON.stringify(message.tool_calls);
    return "";
  }

  // ---- the inspector -------------------------------------------------------------------------------------

  function showUrls(request) {
    const dl = $("urls");
    dl.replaceChildren();
    const add = (name, value) => {
      if (!value) return;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      const code = document.createElement("code");
      code.textContent = value;
      dd.append(code);
      dl.append(dt, dd);
    };
    const endpoints = (request.doc && request.doc.endpoints) || request.endpoints || {};
    add("status_url", request.statusUrl);
    add("bearer_token", request.token);
    add("stream_token", request.streamToken);
    add("stream_events_url", endpoints.stream_events_url);
    add("response_raw_url", endpoints.response_raw_url);
    add("stop_url", endpoints.stop_url);
    add("from_status_url", endpoints.from_status_url);
  }

  function showDoc(request) {
    $("doc").textContent = request.doc ? JSON.stringify(request.doc, null, 2) : "Waiting for the status document…";
  }

  function logEvent(request, line) {
    request.log.push(line);
    if (request === current) {
      const pre = $("events");
      if (request.log.length === 1) pre.textContent = "";
      pre.append(`${line}\n`);
    }
  }

  async function loadRaw(request) {
    const pre = $("raw");
    const url = request.doc && request.doc.endpoints && request.doc.endpoints.response_raw_url;
    if (!url) {
      pre.textContent = "The upstream has not answered yet.";
      return;
    }
    pre.textContent = "Loading…";
    try {
      const r = await fetch(url, { headers: bearer(request.token), cache: "no-store" });
      const text = await r.text();
      if (request === current) pre.textContent = r.ok ? text : errorText(safeJson(text), r.status);
    } catch (e) {
      if (request === current) pre.textContent = `Could not load the raw response: ${e}`;
    }
  }

  function safeJson(text) {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  }

  // ---- following a request -------------------------------------------------------------------------------

  /** Makes `request` the one shown, and starts following it (events and status document). */
  function follow(request) {
    if (current) release(current);
    current = request;
    setStatus(request.doc ? request.doc.status : "pending");
    $("stop").disabled = false;
    $("events").textContent = request.streamUrl ? "Waiting for events…" : "Async requests have no event stream.";
    $("raw").textContent = "The upstream has not answered yet.";
    showUrls(request);
    showDoc(request);
    if (request.streamUrl && request.token && !request.streamToken) {
      $("events").textContent =
        "This private request's events need its stream token (the stream_url_arg of its create answer).";
      request.streamEnded = true;
    } else if (request.streamUrl) {
      openStream(request);
    }
    poll(request);
  }

  /** Stops following `request` (its EventSource and its polling); the request itself goes on. */
  function release(request) {
    request.released = true;
    if (request.source) request.source.close();
    clearTimeout(request.timer);
  }

  function openStream(request) {
    const url = new URL(request.streamUrl, location.href);
    // EventSource sends no headers: a private stream is opened with its stream token in the query.
    if (request.streamToken) url.searchParams.set("stream_token", request.streamToken);
    const source = new EventSource(url);
    request.source = source;
    source.onmessage = (e) => {
      if (e.data === "[DONE]") {
        logEvent(request, "[DONE]");
        source.close();
        request.streamEnded = true;
        render(request);
        refresh(request);
        return;
      }
      logEvent(request, `#${e.lastEventId} ${e.data}`);
      const chunk = safeJson(e.data);
      const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices.find((c) => c.index === 0) : null;
      const delta = choice && choice.delta;
      if (delta && typeof delta.content === "string" && delta.content) {
        request.text += delta.content;
        render(request);
        if (request === current && !FINAL.includes($("request-status").dataset.status)) setStatus("streaming");
      }
    };
    for (const name of ["stop", "error"]) {
      source.addEventListener(name, (e) => {
        // A connection error is an `error` Event without data; a named `error` event carries JSON.
        if (typeof e.data !== "string") return;
        logEvent(request, `event: ${name} ${e.data}`);
      });
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED && !request.streamEnded && !request.released) {
        logEvent(request, "(the event stream could not be opened or was closed by the server)");
        request.streamEnded = true;
        render(request);
      }
    };
  }

  /**
   * Shows the reply: the text of the events while they flow; once the stream is over (or for an async request)
   * the stored reply of a final document, which is the reference and fills in whatever a reader missed.
   */
  function render(request) {
    const following = request.streamUrl && !request.streamEnded;
    const stored = request.finalText;
    const transcript = $("transcript");
    // Keeps a reader at the bottom there while the reply grows, and leaves one who scrolled up alone.
    const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
    request.reply.textContent = !following && stored ? stored : request.text;
    if (atBottom) transcript.scrollTop = transcript.scrollHeight;
  }

  /** Fetches the status document now, then again every second until it is final. */
  async function poll(request) {
    await refresh(request);
    if (request.released || (request.doc && FINAL.includes(request.doc.status))) return;
    request.timer = setTimeout(() => poll(request), POLL_MS);
  }

  async function refresh(request) {
    if (request.released) return;
    const headers = bearer(request.token);
    if (request.etag) headers["If-None-Match"] = request.etag;
    let r;
    try {
      r = await fetch(request.statusUrl, { headers, cache: "no-store" });
    } catch (e) {
      say(`Could not read the status document: ${e}`, true);
      return;
    }
    if (r.status === 304 || request.released) return;
    const json = await r.json().catch(() => null);
    if (!r.ok) {
      say(errorText(json, r.status), true);
      return;
    }
    request.etag = r.headers.get("ETag");
    request.doc = json;
    if (request !== current) return;
    showDoc(request);
    showUrls(request);
    const status = json.status;
    // Events can run ahead of the document: a reply already flowing is not shown as `posting` again.
    if (!request.text || !["pending", "posting"].includes(status)) setStatus(status);
    if (FINAL.includes(status)) finished(request);
  }

  function finished(request) {
    const doc = request.doc;
    setStatus(doc.status);
    $("stop").disabled = true;
    const body = doc.response && doc.response.body;
    const choice = body && Array.isArray(body.choices) ? body.choices[0] : null;
    request.finalText = contentOf(choice && choice.message);
    if (!request.finalText && doc.error) request.finalText = `(${doc.error.code}: ${doc.error.message})`;
    render(request);
    request.reply.closest(".turn").setAttribute("aria-busy", "false");
    const how = doc.status === "error" && doc.error ? `error: ${doc.error.message}` : doc.status;
    say(`Finished (${how}). Send another prompt to continue this conversation.`, doc.status === "error");
    // The next prompt continues from here.
    $("from-url").value = request.statusUrl;
    $("from-token").value = request.token || "";
    $("continue").checked = true;
    if (!$("panel-raw").hidden) loadRaw(request);
  }

  // ---- actions -------------------------------------------------------------------------------------------

  async function send(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt) {
      say("Write a prompt first.", true);
      $("prompt").focus();
      return;
    }
    let body = {};
    const extra = $("extra").value.trim();
    if (extra) {
      const parsed = safeJson(extra);
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        say("Extra parameters must be a JSON object, like {\"temperature\": 0.2}.", true);
        $("more").open = true;
        $("extra").focus();
        return;
      }
      body = parsed;
    }
    const continuing = $("continue").checked && $("from-url").value.trim() !== "";
    const messages = [];
    const system = $("system").value.trim();
    if (system && !continuing) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: prompt });
    body.messages = messages;
    const model = $("model").value.trim();
    if (model) body.model = model;
    body.access = radio("access");
    if (continuing) {
      body.from_status_url = $("from-url").value.trim();
      const token = $("from-token").value.trim();
      if (token) body.from_bearer_token = token;
    }
    const mode = radio("mode");
    const headers = { "Content-Type": "application/json", ...bearer($("service-key").value.trim()) };

    $("send").disabled = true;
    say("Sending…");
    let r;
    let json;
    try {
      r = await fetch(mode === "async" ? "v1/async-chatgpt" : "v1/stream-chatgpt", {
        method: "POST",
        headers,
        body: JSON.stringify(body),
      });
      json = await r.json().catch(() => null);
    } catch (e) {
      say(`Could not reach the server: ${e}`, true);
      return;
    } finally {
      $("send").disabled = false;
    }
    if (!r.ok || !json || json.status !== "success") {
      say(errorText(json, r.status), true);
      if (r.status === 401) askForKey();
      return;
    }
    if (!continuing) clearTranscript();
    addTurn("user", prompt);
    const reply = addTurn("assistant", "");
    reply.closest(".turn").setAttribute("aria-busy", "true");
    $("prompt").value = "";
    say(mode === "async" ? "Accepted; waiting for the reply…" : "Accepted; the reply streams in as it arrives.");
    const auth = json.authorization || {};
    follow({
      statusUrl: json.endpoints.status_url,
      streamUrl: json.endpoints.stream_events_url || null,
      stopUrl: json.endpoints.stop_url,
      endpoints: json.endpoints,
      token: auth.bearer_token || null,
      streamToken: auth.stream_url_arg ? new URLSearchParams(auth.stream_url_arg).get("stream_token") : null,
      text: "",
      reply,
      log: [],
    });
  }

  async function stop() {
    const request = current;
    if (!request) return;
    const url = (request.doc && request.doc.endpoints && request.doc.endpoints.stop_url) || request.stopUrl;
    if (!url) return;
    $("stop").disabled = true;
    try {
      const r = await fetch(url, { method: "POST", headers: bearer(request.token) });
      if (r.ok) say("Stopped; what arrived so far is kept.");
      else say(errorText(await r.json().catch(() => null), r.status), r.status !== 405);
    } catch (e) {
      say(`Could not reach the server: ${e}`, true);
    }
    refresh(request);
  }

  async function open(event) {
    event.preventDefault();
    const url = $("open-url").value.trim();
    const token = $("open-token").value.trim() || null;
    // Accepted as the bare token or as the create answer's `stream_url_arg` (`stream_token=...`).
    const streamArg = $("open-stream-token").value.trim();
    const streamToken = (streamArg.includes("=") ? new URLSearchParams(streamArg).get("stream_token") : streamArg) || null;
    if (!url) {
      say("Enter a status URL to open.", true);
      return;
    }
    let r;
    let json;
    try {
      r = await fetch(url, { headers: bearer(token), cache: "no-store" });
      json = await r.json().catch(() => null);
    } catch (e) {
      say(`Could not read ${url}: ${e}`, true);
      return;
    }
    if (!r.ok || !json || !json.status || (json.status === "error" && !json.endpoints)) {
      say(errorText(json, r.status), true);
      return;
    }
    clearTranscript();
    const messages = (json.parameters && json.parameters.messages) || [];
    for (const m of messages) addTurn(m.role || "message", contentOf(m));
    const reply = addTurn("assistant", "");
    reply.closest(".turn").setAttribute("aria-busy", "true");
    say("Opened; replaying its events.");
    const endpoints = json.endpoints || {};
    follow({
      statusUrl: endpoints.status_url || url,
      streamUrl: endpoints.stream_events_url || null,
      stopUrl: endpoints.stop_url,
      endpoints,
      token,
      streamToken,
      text: "",
      reply,
      log: [],
      // Fetched again by the first poll: the stream decides the reply text, the document the rest.
      doc: null,
    });
  }

  function newConversation() {
    if (current) release(current);
    current = null;
    clearTranscript();
    $("continue").checked = false;
    $("from-url").value = "";
    $("from-token").value = "";
    $("stop").disabled = true;
    setStatus("");
    $("urls").replaceChildren();
    for (const id of ["doc", "raw", "events"]) $(id).textContent = "No request yet.";
    say("");
    $("prompt").focus();
  }

  function askForKey() {
    $("key-needed").hidden = false;
    $("more").open = true;
    $("service-key").focus();
  }

  // ---- tabs ----------------------------------------------------------------------------------------------

  function selectTab(tab) {
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !selected;
    }
    if (tab.id === "tab-raw" && current) loadRaw(current);
  }

  function tabKeys(event) {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const i = tabs.indexOf(event.target);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    const tab = tabs[(next + tabs.length) % tabs.length];
    tab.focus();
    selectTab(tab);
  }

  // ---- wiring --------------------------------------------------------------------------------------------

  function start() {
    $("composer").addEventListener("submit", send);
    $("stop").addEventListener("click", stop);
    $("open").addEventListener("submit", open);
    $("new-conversation").addEventListener("click", newConversation);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("composer").requestSubmit();
    });
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab));
      tab.addEventListener("keydown", tabKeys);
    }
    // The key stays in this tab only (sessionStorage), so that a reload does not ask again.
    const key = $("service-key");
    key.value = sessionStorage.getItem("offload.service_key") || "";
    key.addEventListener("change", () => sessionStorage.setItem("offload.service_key", key.value.trim()));
    if (document.body.dataset.keyRequired === "true" && !key.value) askForKey();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
