"""The page at ``/``: drop (or pick) an image, see the top classes (the server's default top_k: 5, or every class
of a model with fewer). Self-contained: no CDN, no build step."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ganet-serve</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef; }
  #preview { max-width: 100%; max-height: 16rem; display: none; margin: 1rem auto; }
  table { width: 100%; border-collapse: collapse; margin-top: 1rem; }
  td { padding: .3rem; border-bottom: 1px solid #ddd; }
  td.score { text-align: right; font-variant-numeric: tabular-nums; width: 6rem; }
  .bar { background: #4a7; height: .6rem; }
  #status { color: #666; min-height: 1.2rem; }
  #status.error { color: #b00; }
</style>
</head>
<body>
<h1>ganet-serve</h1>
<p>Drop a photograph (JPEG, PNG, WebP, BMP, GIF, TIFF) below, or click to choose one.</p>
<label for="key">API key (only if the server needs one):</label> <input id="key" type="password" autocomplete="off">
<div id="drop" tabindex="0">Drop an image here</div>
<input id="file" type="file" accept="image/*" hidden>
<img id="preview" alt="the uploaded image">
<p id="status"></p>
<table id="results"><tbody></tbody></table>
<script>
const drop = document.getElementById("drop"), fileInput = document.getElementById("file");
const statusLine = document.getElementById("status"), tbody = document.querySelector("#results tbody");
const preview = document.getElementById("preview");

function show(message, isError) { statusLine.textContent = message; statusLine.className = isError ? "error" : ""; }

async function classify(file) {
  tbody.replaceChildren();
  preview.src = URL.createObjectURL(file); preview.style.display = "block";
  show("classifying " + file.name + " ...", false);
  const form = new FormData(); form.append("file", file, file.name);
  const headers = {}; const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const response = await fetch("classify", { method: "POST", body: form, headers });
    const body = await response.json();
    if (!response.ok) { show("error " + response.status + ": " + body.error, true); return; }
    for (const p of body.predictions) {
      const row = tbody.insertRow();
      row.className = "prediction";
      const label = row.insertCell(); label.textContent = p.label; label.className = "label";
      const bar = row.insertCell(); const fill = document.createElement("div");
      fill.className = "bar"; fill.style.width = (100 * p.score).toFixed(1) + "%"; bar.appendChild(fill);
      const score = row.insertCell(); score.className = "score"; score.textContent = (100 * p.score).toFixed(2) + " %";
    }
    show(body.model + ": " + body.timing_ms.total.toFixed(1) + " ms", false);
  } catch (e) { show("request failed: " + e, true); }
}

drop.addEventListener("click", () => fileInput.click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") fileInput.click(); });
fileInput.addEventListener("change", () => { if (fileInput.files.length) classify(fileInput.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
