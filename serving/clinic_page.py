"""The clinic page's HTML, script and style (served by ``serving.clinic``, from this machine only).

The script writes every name and message with ``textContent``, never as HTML, so a file name
cannot inject markup. Probabilities are written as numbers beside their bars and the predicted
class is named in words, so nothing depends on telling colours apart.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medmpc clinic: encrypted chest X-ray predictions</title>
<link rel="stylesheet" href="/clinic.css">
<script src="/clinic.js" defer></script>
</head>
<body>
<header>
  <h1>Encrypted chest X-ray prediction</h1>
  <p id="status" role="status">Connecting to the prediction service&hellip;</p>
</header>
<main>
  <section id="drop" aria-labelledby="add-title">
    <h2 id="add-title">Add X-rays</h2>
    <p>Drop PNG, JPEG or DICOM files anywhere on this page, or choose them:</p>
    <label for="files">X-ray files</label>
    <input id="files" type="file" multiple accept=".png,.jpg,.jpeg,.dcm,.dicom">
  </section>
  <section aria-labelledby="results-title">
    <h2 id="results-title">Results</h2>
    <p id="empty">No X-rays yet.</p>
    <ol id="results" aria-live="polite"></ol>
  </section>
  <section aria-labelledby="privacy-title">
    <h2 id="privacy-title">Who sees the X-ray</h2>
    <p>This page runs on this computer. Before anything leaves it, each image is split into two
    random-looking shares, one for each of the two servers; neither share alone says anything about
    the image. The servers compute on the shares and send back shares of the result, which only this
    computer puts together.</p>
  </section>
</main>
</body>
</html>
"""

SCRIPT = r"""
"use strict";
const SAW = "Each server saw only a random-looking share of this image and learnt nothing from it; " +
  "only this computer put the result together.";
const READABLE = "WARNING: the shares travelled over plain HTTP to another machine, so anyone on the " +
  "network path could read both of them, and with them the image.";
let service = {readable_in_transit: false, timeout_s: 120};

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; }
  catch (e) { return response.statusText || ("HTTP " + response.status); }
}

async function showStatus() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/api/status");
    if (!r.ok) { status.textContent = "Service problem: " + await detail(r); status.className = "problem"; return; }
    const s = await r.json();
    service = s;
    status.textContent = "Model " + s.model + " (" + s.classes.join(", ") + "; " + s.image_size +
      " px), served by " + s.servers.join(" and ") + "." +
      (s.synthetic ? " Trained on synthetic images only: its predictions say nothing about a patient." : "");
    status.className = s.synthetic ? "problem" : "";
  } catch (e) {
    status.textContent = "This page lost its connection to the clinic program: " + e; status.className = "problem";
  }
}

function showResult(item, result) {
  item.dataset.state = "done";
  item.querySelector(".state").textContent = "";
  const verdict = el("p", "Prediction: ", "prediction");
  verdict.appendChild(el("strong", result.prediction));
  item.appendChild(verdict);
  const list = el("dl", undefined, "probabilities");
  for (const [name, p] of Object.entries(result.probabilities)) {
    const percent = (100 * p).toFixed(1) + " %";
    const term = el("dt", name + (name === result.prediction ? " (predicted)" : ""));
    const value = el("dd");
    const bar = el("span", undefined, "bar" + (name === result.prediction ? " top" : ""));
    bar.style.width = (100 * p).toFixed(1) + "%";
    bar.setAttribute("aria-hidden", "true");
    const track = el("span", undefined, "track");
    track.appendChild(bar);
    value.appendChild(track);
    value.appendChild(el("span", percent, "percent"));
    list.appendChild(term);
    list.appendChild(value);
  }
  item.appendChild(list);
  item.appendChild(el("p", "Took " + result.seconds.toFixed(2) + " s, finished at " +
    new Date().toLocaleTimeString() + ".", "time"));
  item.appendChild(el("p", service.readable_in_transit ? READABLE : SAW,
    service.readable_in_transit ? "saw problem" : "saw"));
}

function showError(item, message) {
  item.dataset.state = "error";
  item.setAttribute("role", "alert");
  item.querySelector(".state").textContent = "";
  item.appendChild(el("p", "Could not predict: " + message, "error"));
}

async function predict(file) {
  document.getElementById("empty").hidden = true;
  const item = el("li", undefined, "result");
  item.dataset.state = "pending";
  item.appendChild(el("h3", file.name));
  item.appendChild(el("p", "Sharing and predicting\u2026", "state"));
  document.getElementById("results").prepend(item);
  // the clinic program gives up on the service after its timeout; this page a little later
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 1000 * (2 * service.timeout_s + 30));
  try {
    const r = await fetch("/api/predict", {
      signal: abort.signal,
      method: "POST",
      headers: {"X-Medmpc-Clinic": "1", "X-Filename": encodeURIComponent(file.name),
                "Content-Type": "application/octet-stream"},
      body: file,
    });
    if (r.ok) showResult(item, await r.json());
    else showError(item, await detail(r));
  } catch (e) {
    showError(item, "the clinic program on this computer did not answer (" + e + ")");
  } finally {
    clearTimeout(timer);
  }
}

async function predictAll(files) {
  for (const file of files) await predict(file);  // one at a time: a bad file never stops the rest
}

document.addEventListener("DOMContentLoaded", () => {
  showStatus();
  const input = document.getElementById("files");
  input.addEventListener("change", () => { predictAll(Array.from(input.files)); input.value = ""; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    predictAll(Array.from(e.dataTransfer.files));
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 46rem; padding: 1rem 1.5rem;
       color: #111; background: #fff; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: 0.25rem; }
h2 { font-size: 1.15rem; margin-top: 1.5rem; }
h3 { font-size: 1rem; margin: 0 0 0.25rem; word-break: break-all; }
#drop { border: 2px dashed #555; border-radius: 0.5rem; padding: 0.5rem 1rem 1rem; }
body.dragging #drop { border-style: solid; background: #eef4ff; }
label { display: block; font-weight: 600; margin-bottom: 0.25rem; }
input[type=file] { font-size: 1rem; }
:focus-visible { outline: 3px solid #1a56db; outline-offset: 2px; }
#results { list-style: none; padding: 0; }
.result { border: 1px solid #888; border-radius: 0.5rem; padding: 0.75rem 1rem; margin-bottom: 0.75rem; }
.result[data-state=error] { border: 3px double #a00; }
.problem, .error { font-weight: 600; }
.error::before, .problem::before { content: "\\26A0  "; }
.prediction strong { font-size: 1.15rem; text-transform: capitalize; }
.probabilities { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 0.75rem; margin: 0.5rem 0; }
.probabilities dt::first-letter { text-transform: uppercase; }
.probabilities dd { margin: 0; display: flex; align-items: center; gap: 0.5rem; }
.track { flex: 1; height: 0.9rem; border: 1px solid #555; background: #f4f4f4; }
.bar { display: block; height: 100%; background: #6b7280; }
.bar.top { background: #1a56db; }
.percent { min-width: 4.5rem; text-align: right; font-variant-numeric: tabular-nums; }
.time, .saw { color: #333; font-size: 0.9rem; margin: 0.25rem 0; }
"""
