// UNFED dashboard: everything here goes through the JSON API under /api/ (see README).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { config: null, token: sessionStorage.getItem("unfed.token"), address: null, socket: null, turn: null, view: "chat" };

function message(text, kind = "error") {
  const box = document.createElement("div");
  box.className = "message" + (kind === "info" ? " info" : "");
  box.setAttribute("role", kind === "info" ? "status" : "alert");
  box.textContent = text;
  $("#messages").replaceChildren(box);
  if (kind === "info") setTimeout(() => box.remove(), 6000);
}

function clearMessages() { $("#messages").replaceChildren(); }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, { ...options, headers });
  const body = await resp.json().catch(() => ({ error: "the server answered " + resp.status }));
  if (!resp.ok) throw Object.assign(new Error(body.error || resp.statusText), { status: resp.status });
  return body;
}

const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body || {}) });

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === undefined || value === null ? "—" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fillTable(sel, rows, columns) {
  const body = $(sel + " tbody");
  const out = rows.map((r) => {
    const tr = document.createElement("tr");
    columns(r).forEach(([v, cls]) => cell(tr, v, cls));
    return tr;
  });
  body.replaceChildren(...out);
}

const short = (s) => (s && s.length > 16 ? s.slice(0, 8) + "…" + s.slice(-6) : s);

// ---- wallet ---------------------------------------------------------------

function showWallet() {
  const signed = !!state.address;
  $("#wallet-address").textContent = signed ? state.address : "not signed in";
  $("#sign-in").hidden = signed;
  $("#demo-sign-in").hidden = signed || !(state.config && state.config.auth.demo);
  // Only a loopback dashboard on a local Anvil offers it (its key is public).
  $("#dev-sign-in").hidden = signed || !(state.config && state.config.auth.dev_wallet);
  $("#sign-out").hidden = !signed;
  $("#faucet").hidden = !(signed && state.config && state.config.faucet.enabled);
  if (!signed) { $("#wallet-balance").textContent = ""; delete $("#wallet-balance").dataset.depositWei; }
}

function signedIn(s) {
  state.token = s.token;
  state.address = s.address;
  sessionStorage.setItem("unfed.token", s.token);
  showWallet();
  refreshBalance();
}

function utf8Hex(text) {
  return "0x" + Array.from(new TextEncoder().encode(text), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function signIn() {
  clearMessages();
  if (!window.ethereum) {
    message("No wallet found in this browser. Install MetaMask (or another EIP-1193 wallet) to sign in.");
    return;
  }
  try {
    const [address] = await window.ethereum.request({ method: "eth_requestAccounts" });
    const challenge = await post("/api/auth/challenge", { address });
    const signature = await window.ethereum.request({ method: "personal_sign", params: [utf8Hex(challenge.message), address] });
    signedIn(await post("/api/auth/verify", { nonce: challenge.nonce, signature }));
    message("Signed in as " + state.address, "info");
  } catch (e) {
    message("Sign-in failed: " + e.message);
  }
}

async function restoreSession() {
  if (!state.token) return;
  try {
    state.address = (await api("/api/auth/session")).address;
  } catch {
    state.token = null;
    sessionStorage.removeItem("unfed.token");
  }
  showWallet();
}

async function refreshBalance() {
  if (!state.address || !state.config || !state.config.chain) return;
  try {
    const b = await api("/api/balance/" + state.address);
    const el = $("#wallet-balance");
    el.textContent = "deposit " + b.deposit.text + " UNFED";
    el.dataset.depositWei = b.deposit.wei;
  } catch (e) {
    $("#wallet-balance").textContent = "balance unavailable";
  }
}

async function faucet() {
  try {
    const r = await post("/api/faucet", { address: state.address });
    message("Faucet deposited " + r.deposited.text + " UNFED for " + r.address, "info");
    refreshBalance();
  } catch (e) {
    message("Faucet: " + e.message);
  }
}

// ---- chat -----------------------------------------------------------------

function addTurn(kind, text) {
  const div = document.createElement("div");
  div.className = "turn " + kind;
  div.textContent = text;
  $("#transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function busy(on) {
  $("#send").disabled = on;
  $("#stop").disabled = !on;
}

function openSocket() {
  return new Promise((resolve, reject) => {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) return resolve(state.socket);
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/chat/ws");
    ws.onopen = () => { state.socket = ws; resolve(ws); };
    ws.onerror = () => reject(new Error("cannot open the chat connection to the dashboard"));
    ws.onclose = () => {
      if (state.turn) { message("The chat connection closed before the answer finished."); busy(false); state.turn = null; }
      state.socket = null;
    };
    ws.onmessage = (ev) => onChatEvent(JSON.parse(ev.data));
  });
}

function onChatEvent(ev) {
  if (ev.type === "started") {
    state.turn = addTurn("assistant", "");
    $("#summary").textContent = "generating with " + ev.model + " (" + ev.prompt_tokens + " prompt tokens)…";
  } else if (ev.type === "token") {
    state.turn.textContent += ev.text;
  } else if (ev.type === "done") {
    showSummary(ev.summary);
    state.turn = null;
    busy(false);
    refreshBalance();
  } else if (ev.type === "error") {
    message(ev.error);
    if (state.turn && !state.turn.textContent) state.turn.remove();
    state.turn = null;
    busy(false);
  }
}

function showSummary(s) {
  const el = $("#summary");
  const parts = [
    s.tokens + " tokens",
    s.tokens_per_s.toFixed(1) + " tok/s",
    "first token " + s.ttft_ms.toFixed(0) + " ms",
    "cost " + s.cost.text + " UNFED",
  ];
  if (s.deposit) parts.push("deposit " + s.deposit.text + " UNFED (this chat settles on-chain with the next settlement)");
  if (s.stopped) parts.push("stopped");
  el.textContent = parts.join(" · ");
  el.dataset.costWei = s.cost.wei;
  el.dataset.tokens = s.tokens;
  el.dataset.stopped = s.stopped;
  el.dataset.text = s.text;
  state.lastRoute = s.route;
  showRoute();
  // The same "sees:" lines as `unfedctl plan` and `chat --json`.
  if (s.privacy) {
    const items = [s.privacy.mode].concat(s.privacy.sees).map((line) => {
      const li = document.createElement("li");
      li.textContent = line;
      return li;
    });
    $("#privacy").replaceChildren(...items);
  }
}

function showRoute() {
  if (!state.lastRoute) return;
  const items = state.lastRoute.map((h) => {
    const li = document.createElement("li");
    li.textContent = "shard " + h.shard_index + ": " + h.node_id + " at " + h.address + (h.compute_ms != null ? " (" + h.compute_ms.toFixed(1) + " ms compute)" : "");
    return li;
  });
  $("#route").replaceChildren(...items);
}

async function send(event) {
  event.preventDefault();
  clearMessages();
  const prompt = $("#prompt").value;
  if (!prompt.trim()) { message("Type a prompt first."); return; }
  if (!state.address && !(state.config && state.config.auth.demo)) {
    message("Sign in with your wallet first: chats are billed to the signed-in wallet's deposit.");
    return;
  }
  const num = (id) => Number($(id).value);
  const request = {
    type: "start", token: state.token, prompt,
    max_tokens: num("#max-tokens"), temperature: num("#temperature"), top_p: num("#top-p"),
    top_k: num("#top-k"), seed: num("#seed"), raw: $("#raw").checked,
  };
  busy(true);
  delete $("#summary").dataset.costWei;
  try {
    request.model = $("#model").value || undefined;
    request.image = (await readImage()) || undefined;
    const ws = await openSocket();
    const turn = addTurn("user", prompt);
    if (request.image) {
      const img = document.createElement("img");
      img.src = request.image;
      img.alt = "attached image";
      turn.prepend(img);
    }
    $("#prompt").value = "";
    ws.send(JSON.stringify(request));
  } catch (e) {
    message(e.message);
    busy(false);
  }
}

function stop() {
  if (state.socket) state.socket.send(JSON.stringify({ type: "stop" }));
}

// ---- views ------------------------------------------------------------------

async function refreshModels() {
  try {
    const { models } = await api("/api/models");
    const line = models.length ? models.map((m) => m.model + ": " + m.status).join(" · ") : "no model registered yet";
    $("#model-line").textContent = line;
    const select = $("#model");
    const chosen = select.value;
    const names = models.map((m) => m.model).join("\n");
    if (select.dataset.names !== names) {
      select.dataset.names = names;
      select.replaceChildren(...models.map((m) => new Option(m.model + (m.vision ? " (image + text)" : ""), m.model)));
      const ready = models.find((m) => m.model === chosen) || models.find((m) => m.ready);
      if (ready) select.value = ready.model;
    }
    state.models = models;
    showImageField();
    fillTable("#models-table", models, (m) => [[m.model], [m.status, m.ready ? "ok" : "bad"], [m.nodes], [m.text_shards_covered + "/" + m.text_shards_total]]);
  } catch (e) {
    $("#model-line").textContent = "registry unreachable: " + e.message;
  }
}

function showImageField() {
  const m = (state.models || []).find((x) => x.model === $("#model").value);
  $("#image-field").hidden = !(m && m.vision);
}

function readImage() {
  const file = $("#image").files[0];
  if ($("#image-field").hidden || !file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

async function refreshNetwork() {
  const n = await api("/api/network");
  const health = {};
  for (const [model, shards] of Object.entries(n.shards)) for (const s of shards) health[model + "/" + s.stack + "/" + s.shard_index] = s.state;
  fillTable("#nodes-table", n.nodes, (x) => [
    [short(x.node_id), "mono"], [x.role + (x.excluded ? " (EXCLUDED)" : ""), x.excluded ? "bad" : ""],
    [x.role === "compute" ? x.stack + " " + x.shard_index : ""], [x.role === "compute" ? x.layers[0] + "–" + x.layers[1] : ""],
    [health[x.model + "/" + x.stack + "/" + x.shard_index] || (x.role === "daemon" ? "healthy" : "")],
    [x.chain ? x.chain.stake.text : null], [(x.last_heartbeat_ms_ago / 1000).toFixed(1) + " s ago"],
  ]);
  const verdicts = n.verdicts.map((v) => {
    const li = document.createElement("li");
    li.textContent = (v.guilty ? "GUILTY" : "not guilty") + " [" + v.stage + "] " + v.accused + " (shard " + v.shard_index + "): " + v.detail + (v.slashed ? " — slashed " + v.slashed.text : "");
    return li;
  });
  if (verdicts.length) $("#verdicts").replaceChildren(...verdicts);
  showRoute();
}

async function refreshChain() {
  const [c, n] = await Promise.all([api("/api/chain"), api("/api/network").catch(() => ({ nodes: [] }))]);
  const sc = c.share_chain;
  if (sc.error) {
    $("#share-chain-line").textContent = "share chain: " + sc.error;
  } else {
    $("#share-chain-line").textContent = "height " + sc.height + " · tip " + short(sc.tip) + " · " + sc.shares + " shares (" + sc.pending_shares + " pending) · daemon " + sc.address;
    fillTable("#blocks-table", sc.blocks, (b) => [[b.height], [short(b.hash), "mono"], [b.shares], [new Date(b.timestamp_ms).toLocaleTimeString()]]);
    fillTable("#settlements-table", sc.settlements, (s) => [[s.blocks[0] + "–" + s.blocks[1]], [short(s.client), "mono"], [s.total ? s.total.text : null], [s.status + (s.last_error ? " (" + s.last_error + ")" : ""), s.status === "finalized" ? "ok" : ""]]);
    const stake = {};
    for (const x of n.nodes) stake[x.node_id] = x.chain;
    fillTable("#totals-table", sc.nodes, (x) => [[short(x.node_id), "mono"], [x.shares], [x.input_tokens], [x.output_tokens], [stake[x.node_id] ? stake[x.node_id].stake.text : null], [stake[x.node_id] && stake[x.node_id].earnings ? stake[x.node_id].earnings.text : null]]);
  }
  $("#onchain-line").textContent = c.onchain ? "block " + c.onchain.block + " · escrow " + c.onchain.escrow + " · token " + c.onchain.token + " · " + c.onchain.rpc_url : "no chain configured";
}

function showView(name) {
  state.view = name;
  document.querySelectorAll("nav button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.view === name)));
  document.querySelectorAll(".view").forEach((v) => (v.hidden = v.id !== "view-" + name));
  tick();
}

async function tick() {
  try {
    await refreshModels();
    if (state.view === "network") await refreshNetwork();
    if (state.view === "chain") await refreshChain();
    await refreshBalance();
  } catch (e) {
    message(e.message);
  }
}

async function main() {
  try {
    state.config = await api("/api/config");
  } catch (e) {
    message("The dashboard's API does not answer: " + e.message);
  }
  await restoreSession();
  showWallet();
  $("#sign-in").onclick = signIn;
  $("#dev-sign-in").onclick = async () => { try { signedIn(await post("/api/auth/dev-wallet")); } catch (e) { message(e.message); } };
  $("#demo-sign-in").onclick = async () => { try { signedIn(await post("/api/auth/demo")); } catch (e) { message(e.message); } };
  $("#sign-out").onclick = async () => { await post("/api/auth/logout").catch(() => {}); state.token = null; state.address = null; sessionStorage.removeItem("unfed.token"); showWallet(); };
  $("#faucet").onclick = faucet;
  $("#chat-form").onsubmit = send;
  $("#stop").onclick = stop;
  $("#model").onchange = showImageField;
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  document.querySelectorAll("nav button").forEach((b) => (b.onclick = () => showView(b.dataset.view)));
  tick();
  setInterval(tick, 2000);
}

main();
