// The live view: one tile per source, redrawn from the run's server-sent status.
// A tile's image is fetched only when its frame changed, so the page costs the run
// at most one JPEG per source per push, whatever the camera's fps.
"use strict";

const OFFLINE = new Set(["reconnecting", "ended", "failed", "starting"]);
const grid = document.getElementById("grid");
const template = document.getElementById("tile");
const connection = document.getElementById("connection");
const tiles = new Map(); // source id → {root, shownFrame}

function tileFor(id) {
  let tile = tiles.get(id);
  if (!tile) {
    const root = template.content.firstElementChild.cloneNode(true);
    root.dataset.source = id;
    root.querySelector(".name").textContent = id;
    root.querySelector("img").alt = `latest frame of ${id}`;
    grid.append(root);
    tile = { root, shownFrame: null };
    tiles.set(id, tile);
  }
  return tile;
}

function labelItem({ label, confidence }) {
  const item = document.createElement("li");
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = label;
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = confidence.toFixed(2);
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${Math.round(confidence * 100)}%`;
  item.append(name, value, bar);
  return item;
}

function eventItem(event) {
  const item = document.createElement("li");
  item.dataset.state = event.state;
  const dot = document.createElement("span");
  dot.className = "dot";
  const what = document.createElement("span");
  const seconds = (event.duration_ms / 1000).toFixed(1);
  what.textContent = `${event.label} · ${event.state === "open" ? "for" : "lasted"} ${seconds} s · peak ${event.peak_confidence.toFixed(2)}`;
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = new Date(event.start_time_ms).toLocaleTimeString();
  item.append(dot, what, when);
  return item;
}

function show(status) {
  const tile = tileFor(status.id);
  const root = tile.root;
  root.dataset.state = status.state;
  root.classList.toggle("offline", OFFLINE.has(status.state) && status.state !== "ended");
  root.querySelector(".badge").textContent = status.state === "reconnecting" ? "offline" : status.state;
  root.querySelector(".fps").textContent = status.fps.toFixed(1);
  const { p50, p95 } = status.latency_ms;
  root.querySelector(".latency").textContent = p50 === null ? "–" : `${p50.toFixed(0)}/${p95.toFixed(0)}`;
  root.querySelector(".published").textContent = status.published;
  root.querySelector(".dropped").textContent = status.dropped + status.failed + status.lost;
  root.querySelector(".error").textContent = OFFLINE.has(status.state) ? status.last_error || "" : "";
  root.querySelector(".labels").replaceChildren(...status.labels.map(labelItem));
  root.querySelector(".events").replaceChildren(...status.events.map(eventItem));
  const frame = status.frame && status.frame.index;
  if (frame !== null && frame !== tile.shownFrame) {
    tile.shownFrame = frame;
    root.querySelector("img").src = `/api/sources/${encodeURIComponent(status.id)}/frame.jpg?frame=${frame}`;
  }
}

function connect() {
  const events = new EventSource("/api/stream");
  events.onopen = () => { connection.textContent = "live"; };
  events.onmessage = (message) => {
    const statuses = JSON.parse(message.data);
    connection.textContent = `live · ${statuses.length} source${statuses.length === 1 ? "" : "s"}`;
    statuses.forEach(show);
  };
  // EventSource reconnects by itself; say so while it does
  events.onerror = () => { connection.textContent = "connection lost, retrying…"; };
}

connect();
