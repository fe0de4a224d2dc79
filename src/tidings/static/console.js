// Tidings web console: a small client of the v1 protocol (docs/protocol.md).
//
// Rules this file keeps:
// - Anything that came from the server (other users' content above all) is put on the
//   page with textContent, never parsed as HTML: no markup of theirs can run here.
// - A message is acknowledged as soon as it arrives and marked read once it is on the
//   page while the page is visible, as a real client would.
// - Reconnecting re-identifies with `since` (the last message received), drops repeats by
//   (from, id), and sends again, with the same ids, the messages that had no answer.
"use strict";

const $ = (id) => document.getElementById(id);
const STATES = ["sending", "received", "stored", "sent", "delivered", "read"];
const rank = (s) => STATES.indexOf(s);
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30000;
const PING_EVERY_MS = 20000;
// The server asks a connection to identify within 30 s; a quiet socket is checked
// with #ping, and one that answers nothing for two rounds is given up as dead.
const SILENCE_LIMIT_MS = 2 * PING_EVERY_MS + 5000;

const store = {
  // The URL and e-mail survive a reload so that the page resumes by itself; the token
  // does not: it stays in memory only, out of reach of anything that reads storage later.
  get: (key) => localStorage.getItem("tidings." + key) || "",
  set: (key, value) => localStorage.setItem("tidings." + key, value),
};

const conn = {
  ws: null,
  wanted: false,      // the user asked to be connected; a close then means reconnect
  identified: false,
  attempt: 0,         // consecutive failed attempts, for the backoff
  retryTimer: null,
  countdown: null,
  pingTimer: null,
  since: "",          // the `since` of the #email in flight
  lastFrameAt: 0,
  token: "",
  email: "",
};
const seen = new Set();          // "from\nid" of every incoming message shown
const outgoing = new Map();      // id -> {to, content, state, el}
const toRead = [];               // incoming messages shown but not yet marked read

// --- status ---------------------------------------------------------------------------

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
  $("connect").disabled = state !== "closed";
  $("disconnect").disabled = state === "closed";
}

function showHint(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

// --- connecting -----------------------------------------------------------------------

function defaultUrl() {
  // Same origin, so that the server's default Origin check accepts the page.
  const url = new URL("ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function connect() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdown);
  const url = $("url").value.trim();
  setStatus("connecting", "connecting…");
  // Browsers cannot set headers on a WebSocket: the token rides as a subprotocol.
  // tidings.v1 is offered too, so the server selects it and never echoes the token.
  const protocols = ["tidings.v1"];
  if (conn.token) protocols.push("bearer." + conn.token);
  let ws;
  try {
    ws = new WebSocket(url, protocols);
  } catch (err) {
    conn.wanted = false;
    setStatus("closed", "closed: " + err.message);
    return;
  }
  conn.ws = ws;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    conn.lastFrameAt = Date.now();
    identify(store.get("since." + conn.email));
    conn.pingTimer = setInterval(heartbeat, PING_EVERY_MS);
  };
  ws.onmessage = (event) => {
    conn.lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;  // the server sends only JSON; ignore anything else rather than stop
    }
    handle(frame);
  };
  ws.onclose = (event) => closed(ws, opened, event.code, event.reason);
}

function identify(since) {
  const frame = { type: "#email", email: conn.email };
  conn.since = since;
  if (since) frame.since = since;
  send(frame);
}

function heartbeat() {
  if (Date.now() - conn.lastFrameAt > SILENCE_LIMIT_MS) {
    // A half-open socket may take minutes to report its close: give up on it now.
    const ws = conn.ws;
    closed(ws, true, 4000, "no answer from the server");
    ws.onclose = null;
    ws.close();
    return;
  }
  send({ type: "#ping" });
}

async function closed(ws, opened, code, reason) {
  if (conn.ws !== ws) return;  // an old socket, already replaced
  conn.ws = null;
  conn.identified = false;
  clearInterval(conn.pingTimer);
  const why = code + (reason ? " " + reason : "");
  if (!conn.wanted) {
    setStatus("closed", "closed (" + why + ")");
    return;
  }
  if (!opened && (await refused(ws.url))) {
    // A browser hides the handshake's HTTP status, but a server that says it is ready
    // yet refused the WebSocket turned us away (403): retrying would not help.
    conn.wanted = false;
    setStatus("closed", "refused by the server");
    showHint(
      "token-hint",
      conn.token
        ? "The server refused this token (expired, or not for this server), or this page's origin."
        : "The server refused the connection: authentication is on, so paste a token " +
            "(tidings token --email you@example.com) and connect again.",
    );
    if (!conn.token) $("token").focus();
    return;
  }
  if (code === 1008 && /token expired/.test(reason)) {
    conn.wanted = false;
    setStatus("closed", "closed (" + why + ")");
    showHint("token-hint", "The token expired: paste a new one and connect again.");
    return;
  }
  scheduleReconnect(why);
}

async function refused(wsUrl) {
  // /readyz, not /healthz: a draining server still answers /healthz, but refuses
  // handshakes with 503 and says 503 here too, and then the page should reconnect.
  const ready = new URL("readyz", wsUrl.replace(/^ws/, "http"));
  try {
    const response = await fetch(ready, { cache: "no-store" });
    return response.ok;
  } catch {
    return false;  // unreachable: reconnect with backoff
  }
}

function scheduleReconnect(why) {
  // Full jitter: a random wait up to an exponentially growing cap, so that clients
  // dropped together by a restart do not all come back at the same instant.
  const cap = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** conn.attempt);
  const delay = Math.random() * cap;
  conn.attempt += 1;
  const due = Date.now() + delay;
  const tick = () => {
    const left = Math.ceil((due - Date.now()) / 1000);
    setStatus("reconnecting", "reconnecting in " + left + " s (" + why + ")");
  };
  tick();
  conn.countdown = setInterval(tick, 1000);
  conn.retryTimer = setTimeout(() => {
    clearInterval(conn.countdown);
    if (conn.wanted) connect();
  }, delay);
}

function send(frame) {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
  conn.ws.send(JSON.stringify(frame));
  return true;
}

// --- frames from the server -----------------------------------------------------------

function handle(frame) {
  switch (frame.type) {
    case "#email": return identified(frame);
    case "#user": return showRecipient(frame.user);
    case "message": return incoming(frame);
    case "state": return stateChanged(frame);
    case "error": return failed(frame);
    default: return undefined;  // #pong, and frames of later protocol versions
  }
}

function identified(frame) {
  conn.identified = true;
  conn.attempt = 0;
  setStatus("connected", "connected as " + frame.email);
  showHint("token-hint", "");
  showUser(frame.user);
  $("me").hidden = false;
  $("chat").hidden = false;
  // Messages that never reached `stored` may have been lost with the old socket, and
  // the states of those not yet delivered may have moved while we were away: sending
  // them again with the same id is safe (stored once) and answers the current state.
  for (const [id, message] of outgoing) {
    if (message.state !== "failed" && rank(message.state) < rank("delivered")) {
      transmit(id, message);
    }
  }
  markRead();
}

function showUser(user) {
  const list = $("user");
  list.replaceChildren();
  for (const [key, value] of Object.entries(user)) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = String(value);
    list.append(dt, dd);
  }
}

function showRecipient(user) {
  $("recipient").textContent =
    user.name + " <" + user.email + "> is " + (user.online ? "online" : "offline");
}

function incoming(message) {
  const key = message.from + "\n" + message.id;
  // The backlog after a reconnect may repeat what we have; ack again (the first ack may
  // have been lost with the socket) but show it once.
  if (message.state !== "delivered" && message.state !== "read") {
    send({ type: "ack", id: message.id, from: message.from });
  }
  if (seen.has(key)) return;
  seen.add(key);
  // New messages arrive in the order they were stored: the latest is where to resume.
  store.set("since." + conn.email, message.id);
  const el = entry("in", message.from, message.sent_at, message.content);
  el.dataset.from = message.from;
  el.dataset.id = message.id;
  if (message.state !== "read") toRead.push(message);
  markRead();
}

function markRead() {
  // "Read" means a person could have seen it: on the page, and the page in view.
  if (document.visibilityState !== "visible" || !conn.identified) return;
  while (toRead.length > 0) {
    const message = toRead[0];
    if (!send({ type: "read", id: message.id, from: message.from })) return;
    toRead.shift();
  }
}

function stateChanged(frame) {
  const message = outgoing.get(frame.id);
  if (!message) return;  // a message sent before this page was loaded
  const time = message.el.querySelector("time");
  if (frame.state === "stored") time.textContent = new Date(frame.at).toLocaleTimeString();
  if (frame.state === "failed") {
    setState(message, "failed", "failed: " + (frame.reason || frame.code));
  } else if (message.state !== "failed" && rank(frame.state) > rank(message.state)) {
    // States only move forward, and any later state implies the earlier ones; a resend
    // is answered `received` again, which must not move the tick back.
    setState(message, frame.state, frame.state);
  }
}

function failed(frame) {
  const message = outgoing.get(frame.ref);
  if (frame.code === "unavailable" && message) {
    // The outcome is unknown: the same id again is stored at most once.
    setTimeout(() => transmit(frame.ref, message), 1000);
  } else if (frame.code === "unavailable" && frame.ref === "#email") {
    setTimeout(() => identify(store.get("since." + conn.email)), 1000);
  } else if (frame.code === "not_found" && !conn.identified && frame.ref === conn.since) {
    // The `since` message is gone (retention): resume from the backlog alone.
    store.set("since." + conn.email, "");
    identify("");
  } else if (frame.code === "forbidden" && frame.ref === "#email") {
    showHint("token-hint", "This token is for another e-mail address.");
    stop();
  } else if (frame.code === "not_found" && frame.ref === "#user") {
    $("recipient").textContent = frame.message;
  } else {
    showHint("problem", frame.code + ": " + frame.message);
  }
}

// --- sending --------------------------------------------------------------------------

function newId() {
  // 22 URL-safe characters from 16 random bytes, inside the id alphabet [A-Za-z0-9_-].
  // getRandomValues, not randomUUID: the latter exists only in secure contexts (https).
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}

function transmit(id, message) {
  send({ type: "message", to: message.to, content: message.content, id });
}

function sendMessage() {
  const to = $("to").value.trim();
  const content = $("content").value;
  if (!to || !content) return;
  const id = newId();
  const message = { to, content, state: "sending", el: entry("out", to, "", content) };
  message.el.dataset.id = id;
  setState(message, "sending", "sending");
  outgoing.set(id, message);
  // Not connected: it stays "sending" and goes out when the connection is back.
  if (conn.identified) transmit(id, message);
  $("content").value = "";
}

function setState(message, state, text) {
  message.state = state;
  const badge = message.el.querySelector(".state");
  badge.dataset.state = state;
  badge.textContent = text;
}

// --- rendering ------------------------------------------------------------------------

function entry(dir, who, at, content) {
  const li = document.createElement("li");
  li.dataset.dir = dir;
  const meta = document.createElement("div");
  meta.className = "meta";
  const peer = document.createElement("span");
  peer.textContent = (dir === "in" ? "from " : "to ") + who;
  const time = document.createElement("time");
  time.textContent = at ? new Date(at).toLocaleTimeString() : "";
  const state = document.createElement("span");
  state.className = "state";
  meta.append(peer, time, state);
  const text = document.createElement("div");
  text.className = "content";
  text.textContent = content;  // plain text, never parsed: it is someone else's
  li.append(meta, text);
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// --- wiring ---------------------------------------------------------------------------

function start(event) {
  event?.preventDefault();  // form-action 'none': nothing is ever submitted
  const email = $("email").value.trim().toLowerCase();
  conn.token = $("token").value.trim();
  if (!email || !$("url").value.trim()) return;
  if (email !== conn.email) {
    // Another user: what was pending belongs to the previous one and must not be
    // sent again under this name.
    seen.clear();
    outgoing.clear();
    toRead.length = 0;
    $("messages").replaceChildren();
    conn.email = email;
  }
  store.set("url", $("url").value.trim());
  store.set("email", conn.email);
  showHint("token-hint", "");
  conn.wanted = true;
  conn.attempt = 0;
  connect();
}

function stop() {
  conn.wanted = false;
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdown);
  if (conn.ws) conn.ws.close(1000);
  else setStatus("closed", "not connected");
}

document.addEventListener("DOMContentLoaded", () => {
  $("url").value = store.get("url") || defaultUrl();
  $("email").value = store.get("email");
  $("connect-form").addEventListener("submit", start);
  $("disconnect").addEventListener("click", stop);
  $("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send({ type: "#user", email: $("to").value.trim() });
  });
  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  $("content").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) sendMessage();
  });
  document.addEventListener("visibilitychange", markRead);
  // A reload resumes: with a remembered e-mail, connect at once (a server with
  // authentication on refuses without a token, and the page then asks for one).
  if ($("email").value) start();
});
