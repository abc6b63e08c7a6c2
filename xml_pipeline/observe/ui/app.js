// The web view: polls the daemon's JSON (the same origin, the same door) and draws it.
// Plain DOM and SVG, no library and no build step. Text from the organism (names,
// payloads, error details) only ever goes in through textContent, never as markup.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let previous = null; // the last graph reading, to turn totals into rates
let selected = null; // the conversation whose trace is open

function el(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attributes = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

async function getJson(path) {
  const answer = await fetch(path, { cache: "no-store" });
  if (!answer.ok) throw new Error(`${path}: HTTP ${answer.status}`);
  return answer.json();
}

function clock(seconds) {
  const when = new Date(seconds * 1000);
  return when.toLocaleTimeString([], { hour12: false }) + "." + String(when.getMilliseconds()).padStart(3, "0");
}

function shortType(type) {
  return type.split(":").pop();
}

// ---------------------------------------------------------------- the graph
function layout(names) {
  const places = {};
  const count = names.length;
  names.forEach((name, index) => {
    const angle = (2 * Math.PI * index) / Math.max(count, 1) - Math.PI / 2;
    places[name] = { x: 360 + 270 * Math.cos(angle), y: 210 + 160 * Math.sin(angle) };
  });
  return places;
}

function drawGraph(graph) {
  const canvas = document.getElementById("graph");
  const listeners = graph.listeners.filter((listener) => !listener.system);
  const known = new Set(listeners.map((listener) => listener.name));
  const clients = [...new Set(graph.edges.map((edge) => edge.from).filter((name) => !known.has(name) && name !== "system"))];
  const places = layout([...clients, ...listeners.map((listener) => listener.name)]);
  const elapsed = previous ? Math.max(graph.at - previous.at, 0.001) : null;
  const before = previous ? Object.fromEntries(previous.listeners.map((listener) => [listener.name, listener])) : {};

  canvas.replaceChildren();
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "28", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto" });
  marker.appendChild(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#1f6feb" }));
  defs.appendChild(marker);
  canvas.appendChild(defs);

  for (const listener of listeners) {
    for (const peer of listener.peers || []) {
      if (!places[peer]) continue;
      const a = places[listener.name], b = places[peer];
      canvas.appendChild(svg("line", { class: "edge peer", x1: a.x, y1: a.y, x2: b.x, y2: b.y }));
    }
  }
  for (const edge of graph.edges) {
    const a = places[edge.from], b = places[edge.to];
    if (!a || !b || edge.from === edge.to) continue;
    const bend = { x: (a.x + b.x) / 2 + (b.y - a.y) * 0.12, y: (a.y + b.y) / 2 - (b.x - a.x) * 0.12 };
    canvas.appendChild(svg("path", { class: "edge", d: `M ${a.x} ${a.y} Q ${bend.x} ${bend.y} ${b.x} ${b.y}`, "data-edge": `${edge.from}->${edge.to}` }));
    canvas.appendChild(svg("text", { class: "edge-label", x: bend.x, y: bend.y }, String(edge.messages)));
  }
  for (const name of clients) {
    const place = places[name];
    const group = svg("g", { class: "node client", "data-name": name, transform: `translate(${place.x},${place.y})` });
    group.appendChild(svg("circle", { r: "26" }));
    group.appendChild(svg("text", { class: "name", y: "4" }, name));
    canvas.appendChild(group);
  }
  for (const listener of listeners) {
    const place = places[listener.name];
    const last = before[listener.name];
    const rate = elapsed && last ? (listener.handled - last.handled) / elapsed : 0;
    const mean = listener.handled ? (listener.seconds / listener.handled) * 1000 : 0;
    const group = svg("g", {
      class: "node" + (listener.errors ? " failing" : ""),
      "data-name": listener.name,
      transform: `translate(${place.x},${place.y})`,
    });
    const title = svg("title", {}, `${listener.description || listener.name}\nhandled ${listener.handled}, errors ${listener.errors}` + (listener.cpu_bound ? "\nruns in the process pool" : ""));
    group.appendChild(title);
    group.appendChild(svg("circle", { r: "26" }));
    group.appendChild(svg("text", { class: "name", y: "-32" }, listener.name + (listener.ingress ? " ⇦" : "")));
    group.appendChild(svg("text", { class: "rate", y: "0" }, `${rate.toFixed(1)}/s`));
    group.appendChild(svg("text", { class: "latency", y: "14" }, `${mean.toFixed(2)} ms`));
    group.appendChild(svg("text", { class: listener.errors ? "errors error" : "errors", y: "44" }, `${listener.errors} errors`));
    canvas.appendChild(group);
  }
  previous = graph;
}

// ---------------------------------------------------------------- conversations
function drawConversations(answer) {
  document.getElementById("tracing-off").hidden = answer.tracing !== false;
  const body = document.querySelector("#conversations tbody");
  body.replaceChildren();
  for (const conversation of answer.conversations) {
    const row = el("tr", { "data-conversation": conversation.conversation });
    if (conversation.conversation === selected) row.classList.add("selected");
    row.appendChild(el("td", {}, clock(conversation.started)));
    row.appendChild(el("td", {}, `${conversation.from} → ${conversation.to}`));
    row.appendChild(el("td", {}, String(conversation.hops)));
    row.appendChild(el("td", conversation.errors ? { class: "error" } : {}, String(conversation.errors)));
    row.appendChild(el("td", conversation.ended ? {} : { class: "running" }, conversation.ended ? "ended" : "running"));
    row.addEventListener("click", () => openTrace(conversation.conversation));
    body.appendChild(row);
  }
}

// ---------------------------------------------------------------- a trace
function hopItem(hop, started) {
  const item = el("li", { class: "hop", "data-hop": hop.id });
  const details = el("details");
  const summary = el("summary");
  summary.appendChild(el("strong", {}, `${hop.from} → ${hop.to}`));
  summary.appendChild(document.createTextNode("  "));
  summary.appendChild(el("span", { class: "type" }, shortType(hop.type)));
  summary.appendChild(document.createTextNode(`  +${((hop.at - started) * 1000).toFixed(1)} ms  `));
  for (const call of hop.handled) {
    const latency = `${(call.seconds * 1000).toFixed(2)} ms`;
    summary.appendChild(call.error ? el("span", { class: "error" }, `failed ${call.error} after ${latency}`) : el("span", {}, `handled in ${latency}`));
  }
  details.appendChild(summary);
  for (const error of hop.errors) {
    details.appendChild(el("div", { class: "error" }, `${error.code} at ${error.listener || "-"}: ${error.detail}`));
  }
  details.appendChild(el("pre", { class: "xml" }, hop.xml || ""));
  item.appendChild(details);
  if (hop.children.length) {
    const children = el("ul");
    for (const child of hop.children) children.appendChild(hopItem(child, started));
    item.appendChild(children);
  }
  return item;
}

async function openTrace(conversation) {
  selected = conversation;
  const trace = await getJson(`/threads/${encodeURIComponent(conversation)}/trace?xml=1`);
  document.getElementById("trace-panel").hidden = false;
  document.getElementById("trace-id").textContent = conversation;
  const state = trace.ended ? "ended" : "running";
  document.getElementById("trace-summary").textContent =
    `${trace.hop_count} hops, ${state}` + (trace.dropped ? `, ${trace.dropped} events not kept (trace_max_bytes)` : "");
  const tree = document.getElementById("trace");
  tree.replaceChildren();
  for (const hop of trace.hops) tree.appendChild(hopItem(hop, trace.started));
  for (const error of trace.errors) tree.appendChild(el("li", { class: "error" }, `${error.code}: ${error.detail}`));
  for (const row of document.querySelectorAll("#conversations tbody tr")) {
    row.classList.toggle("selected", row.dataset.conversation === conversation);
  }
}

// ---------------------------------------------------------------- dead letters
function drawDeadLetters(answer) {
  document.getElementById("dead-letters-panel").hidden = !answer.mode;
  const body = document.querySelector("#dead-letters tbody");
  body.replaceChildren();
  for (const letter of answer.dead_letters) {
    const row = el("tr", { "data-conversation": letter.conversation });
    row.appendChild(el("td", {}, clock(letter.failed_at)));
    row.appendChild(el("td", {}, letter.listener));
    row.appendChild(el("td", {}, String(letter.deliveries)));
    row.appendChild(el("td", {}, letter.conversation));
    row.appendChild(el("td", { class: "type" }, letter.xml.slice(0, 200)));
    row.addEventListener("click", () => openTrace(letter.conversation));
    body.appendChild(row);
  }
}

// ---------------------------------------------------------------- polling
async function poll() {
  try {
    const [graph, conversations, letters] = await Promise.all([
      getJson("/ui/api/graph"),
      getJson("/ui/api/conversations"),
      getJson("/ui/api/dead-letters"),
    ]);
    document.getElementById("organism").textContent = graph.organism + (graph.durable ? " (durable)" : "");
    document.getElementById("health").textContent = "live, updated " + clock(graph.at);
    drawGraph(graph);
    drawConversations(conversations);
    drawDeadLetters(letters);
  } catch (problem) {
    document.getElementById("health").textContent = String(problem);
  }
  setTimeout(poll, POLL_MS);
}

poll();
