"""A static feature browser: one HTML file with its data and images inlined; opens from disk, no server.

The table lists latents (frequency, purity against the random baseline, best AUROC, the caption words
enriched among its top images with their BH q-values, IoU with the object mask) and sorts by any
column and filters by text and by frequency; a click opens the latent's top images and, for
per-location SAEs, where it fires on each of them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffdissect.atomic import atomic_write_bytes
from diffdissect.data.transforms import unit_to_uint8
from diffdissect.sae.features import ImageActivations

THUMB = 64


def _rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = unit_to_uint8(array)
    return Image.fromarray(array).convert("RGB")


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def resolve_image(images: Any, row: dict[str, Any]) -> Any:
    """The image a store row was captured from, found by what capture recorded (file name and content sha256),
    never by position alone: files added to or removed from a folder shift positions. None: changed or gone.
    In-memory sources (arrays) have no file names: their rows are matched by position, and by content hash
    where recorded."""
    try:
        record = images.load(int(row["source_index"]))
        if str(record.input_id) != str(row["input_id"]) and hasattr(images, "index_of"):
            index = images.index_of(str(row["input_id"]))
            record = images.load(index) if index is not None else None
    except Exception:  # an unreadable or missing file: no thumbnail, the tables still stand
        return None
    if record is None or (hasattr(images, "index_of") and str(record.input_id) != str(row["input_id"])):
        return None
    recorded, now = row.get("image_sha256"), getattr(record, "content_sha256", None)
    if recorded and now and recorded != now:
        return None
    return record


def overlay(image: Image.Image, activation: np.ndarray, peak: float) -> Image.Image:
    """The image with the activation map (scaled by the latent's peak) laid over it in red."""
    base = image.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(activation, np.float32) / max(peak, 1e-12), 0, 1)
    heat = (
        np.asarray(
            Image.fromarray((heat * 255).astype(np.uint8)).resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.float32
        )
        / 255
    )
    pixels = np.asarray(base, np.float32) * (1 - 0.6 * heat[..., None]) + np.array([255, 0, 0]) * 0.6 * heat[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def browser_data(
    results: dict[str, Any],
    acts: ImageActivations,
    rows: list[dict[str, Any]],
    images=None,
    *,
    per_latent: int = 8,
    max_latents: int | None = None,
) -> dict[str, Any]:
    """The page's data: one entry per latent that fired, its top images (and heatmaps) as data URIs."""
    latents = [l for l in results["latents"] if l["top"]]
    latents.sort(key=lambda l: -l["image_frequency"])
    if max_latents:
        latents = latents[:max_latents]
    cache: dict[int, Image.Image | None] = {}
    changed: list[str] = []

    def picture(position: int) -> Image.Image | None:
        if images is None:
            return None
        if position not in cache:
            record = resolve_image(images, rows[position])
            if record is None:
                changed.append(str(rows[position]["input_id"]))
            cache[position] = None if record is None else _rgb(record.image)
        return cache[position]

    entries = []
    for latent in latents:
        j = latent["latent"]
        shown = []
        for position in latent["top"][:per_latent]:
            item = {
                "input_id": str(rows[position]["input_id"]),
                "activation": round(float(acts.values[position, j]), 4),
                "labels": {c: str(rows[position].get(c)) for c in results["labels"]},
            }
            image = picture(position)
            if image is not None:
                item["image"] = _png(image.resize((THUMB, THUMB), Image.Resampling.NEAREST))
                heat = acts.map_of(position, j)
                if heat is not None:
                    item["heatmap"] = _png(overlay(image, heat, latent["max_activation"]))
            shown.append(item)
        best = max(
            ((c, v, a) for c, table in latent["auroc"].items() for v, a in table.items()),
            key=lambda x: x[2],
            default=(None, None, None),
        )
        entries.append(
            {
                "latent": j,
                "frequency": round(latent["image_frequency"], 4),
                "max_activation": round(latent["max_activation"], 4),
                "purity": {
                    c: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()}
                    for c, p in latent["purity"].items()
                },
                "best_auroc": None
                if best[0] is None
                else {"label": best[0], "value": best[1], "auroc": round(best[2], 4)},
                "words": [
                    {
                        "word": w["word"],
                        "enrichment": w["enrichment"],
                        "q": float(f"{w['q']:.3g}"),
                        "in_top": w["in_top"],
                        "top": w["top"],
                    }
                    for w in latent.get("words", [])
                ],
                "iou": round(latent["iou"], 4) if "iou" in latent else None,
                "causal": _causal_cells(results.get("causal", {}).get("latents", {}).get(str(j))),
                "top": shown,
            }
        )
    return {
        "title": f"SAE features: {results['slice']['layer']} @ t={results['slice']['t']}",
        "image_warning": (
            f"{len(set(changed))} images changed or went missing since the capture (e.g. "
            f"{sorted(set(changed))[:3]}); they are shown without a thumbnail."
        )
        if changed
        else None,
        "summary": {
            "n_latents": results["config"]["n_latents"],
            "k": results["config"]["k"],
            "heldout_images": results["heldout_images"],
            "top_n": results["top_n"],
            "metrics": results.get("metrics"),
            "baselines": results["baselines"],
            "values_with_auroc_ge_0.95": results["values_with_auroc_ge_0.95"],
            "heldout_values_with_auroc_ge_target": results.get("heldout", {}).get("heldout"),
            "per_location_values": results.get("per_location", {}).get("heldout"),
            "values_total": results["values_total"],
        },
        "labels": results["labels"],
        "latents": entries,
    }


def script_json(data: Any) -> str:
    """JSON safe inside <script>: no `<`, `>` or `&` (so no `</script>` or `<!--`), no U+2028/2029 line breaks."""
    text = json.dumps(data, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _causal_cells(entry: dict[str, Any] | None) -> dict[str, str] | None:
    """'colour->red 0.81' per edit: the attribute whose readings changed most, where to, and how often."""
    if not entry:
        return None
    out = {}
    for kind in ("up", "ablate"):
        best = max(entry[kind].items(), key=lambda kv: kv[1]["to_rate"] or 0.0)
        out[kind] = f"{best[0]}->{best[1]['to']} {best[1]['to_rate']:.2f}" if best[1]["to"] else "no change"
    return out


def write_browser(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = re.sub(
        r"__(TITLE|DATA)__", lambda m: html.escape(data["title"]) if m.group(1) == "TITLE" else script_json(data), _PAGE
    )  # one pass: a title holding "__DATA__" stays text
    atomic_write_bytes(path, page.encode())
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none}th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
tr.latent-row{cursor:pointer}tr.latent-row:hover{background:#eef5ff}tr.selected{background:#dde9ff}
#controls{margin:0.8em 0}#controls input{margin-right:1em}
#layout{display:flex;gap:2em;align-items:flex-start}#list{max-height:80vh;overflow:auto}
#detail{position:sticky;top:1em;min-width:420px}#detail img{width:64px;height:64px;image-rendering:pixelated;margin:2px}
.pair{display:inline-block;text-align:center;font-size:11px;margin:3px}.muted{color:#777}
</style></head><body>
<h1>__TITLE__</h1>
<p id="summary"></p>
<p id="image-warning" style="color:#a00"></p>
<div id="controls">
  <label>filter <input id="filter" type="search" placeholder="label, value or latent id"></label>
  <label>min frequency <input id="minfreq" type="number" step="0.01" min="0" max="1" value="0"></label>
  <label>purity of <select id="label"></select></label>
  <span id="count"></span>
</div>
<div id="layout">
  <div id="list"><table id="latents"><thead><tr id="header"></tr></thead><tbody></tbody></table></div>
  <div id="detail"><p class="muted">Click a latent to see its top images.</p></div>
</div>
<script id="data" type="application/json">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById("data").textContent);
let LABEL = DATA.labels[0];
const labelSelect = document.getElementById("label");
for (const name of DATA.labels) { const o = document.createElement("option"); o.value = o.textContent = name; labelSelect.appendChild(o); }
labelSelect.addEventListener("change", () => { LABEL = labelSelect.value; header.replaceChildren(); buildHeader(); summary();
if (DATA.image_warning) document.getElementById("image-warning").textContent = DATA.image_warning; render(); });
const columns = [
  ["latent", "latent", l => l.latent],
  ["frequency", "image frequency", l => l.frequency],
  ["max", "max activation", l => l.max_activation],
  ["purity", () => LABEL ? "purity (" + LABEL + ")" : "purity", l => l.purity[LABEL] ? l.purity[LABEL].majority : null],
  ["entropy", () => LABEL ? "entropy (" + LABEL + ")" : "entropy", l => l.purity[LABEL] ? l.purity[LABEL].entropy : null],
  ["majority", "majority value", l => l.purity[LABEL] ? l.purity[LABEL].majority_label : ""],
  ["auroc", "best AUROC", l => l.best_auroc ? l.best_auroc.auroc : null],
  ["auroc_of", "AUROC of", l => l.best_auroc ? l.best_auroc.label + "=" + l.best_auroc.value : ""],
  ["words", "caption words (BH q)", l => (l.words || []).map(w => w.word).join(" ")],
  ["iou", "IoU with object", l => l.iou ?? null],
  ["up", "turned up (causal)", l => l.causal ? l.causal.up : ""],
  ["ablate", "ablated (causal)", l => l.causal ? l.causal.ablate : ""],
];
let sortKey = "frequency", sortDir = -1, selected = null;
const s = DATA.summary, m = s.metrics || {};
function summary() { document.getElementById("summary").textContent =
  `${s.n_latents} latents, k=${s.k}; held-out FVU ${m.fvu !== undefined ? m.fvu.toFixed(3) : "?"}, ` +
  `L0 ${m.l0 !== undefined ? m.l0.toFixed(1) : "?"}, dead ${m.dead_fraction !== undefined ? (100*m.dead_fraction).toFixed(1) : "?"}%; ` +
  `${s.heldout_images} held-out images, top ${s.top_n} per latent; factor values with a latent of AUROC >= 0.95: ` +
  (s.heldout_values_with_auroc_ge_target !== null && s.heldout_values_with_auroc_ge_target !== undefined ?
   `${s.heldout_values_with_auroc_ge_target} of ${s.values_total} chosen on half A and scored on half B` +
   (s.per_location_values !== null && s.per_location_values !== undefined ? ` (per location: ${s.per_location_values})` : "") +
   `; as the max over latents on all held-out images (biased upwards) ` : "") +
  `${s.values_with_auroc_ge_0_95 ?? s["values_with_auroc_ge_0.95"]} of ${s.values_total}.` +
  (LABEL && s.baselines[LABEL] ? ` Random ${s.top_n} images: purity ${s.baselines[LABEL].majority_mean.toFixed(3)} ` +
   `(sd ${s.baselines[LABEL].majority_std.toFixed(3)}), entropy ${s.baselines[LABEL].entropy_mean.toFixed(3)} bits.` : ""); }
const header = document.getElementById("header");
function buildHeader() {
  for (const [key, title] of columns) {
    const th = document.createElement("th");
    th.textContent = typeof title === "function" ? title() : title; th.dataset.key = key;
    th.addEventListener("click", () => { sortDir = (sortKey === key) ? -sortDir : -1; sortKey = key; render(); });
    header.appendChild(th);
  }
}
buildHeader(); summary();
if (DATA.image_warning) document.getElementById("image-warning").textContent = DATA.image_warning;
document.getElementById("filter").addEventListener("input", render);
document.getElementById("minfreq").addEventListener("input", render);
function value(l, key) { return columns.find(c => c[0] === key)[2](l); }
function fmt(v) { return v === null || v === undefined ? "-" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v)); }
function render() {
  const text = document.getElementById("filter").value.trim().toLowerCase();
  const minFreq = parseFloat(document.getElementById("minfreq").value) || 0;
  const shown = DATA.latents.filter(l => l.frequency >= minFreq && (!text ||
    String(l.latent) === text || JSON.stringify([l.purity, l.best_auroc, l.words]).toLowerCase().includes(text)));
  shown.sort((a, b) => { const x = value(a, sortKey), y = value(b, sortKey);
    if (x === y) return a.latent - b.latent; if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : 1) * sortDir; });
  for (const th of header.children) th.className = th.dataset.key === sortKey ? (sortDir > 0 ? "sorted-asc" : "sorted-desc") : "";
  const body = document.querySelector("#latents tbody");
  body.replaceChildren();
  for (const l of shown) {
    const tr = document.createElement("tr");
    tr.className = "latent-row" + (l.latent === selected ? " selected" : ""); tr.dataset.latent = l.latent;
    for (const [key] of columns) { const td = document.createElement("td"); td.textContent = fmt(value(l, key)); tr.appendChild(td); }
    tr.addEventListener("click", () => { selected = l.latent; detail(l); render(); });
    body.appendChild(tr);
  }
  document.getElementById("count").textContent = `${shown.length} of ${DATA.latents.length} latents`;
}
function detail(l) {
  const box = document.getElementById("detail");
  box.replaceChildren();
  const h = document.createElement("h2"); h.id = "detail-title"; h.textContent = `latent ${l.latent}`; box.appendChild(h);
  const p = document.createElement("p");
  p.textContent = `image frequency ${fmt(l.frequency)}, max activation ${fmt(l.max_activation)}` +
    (l.best_auroc ? `, best AUROC ${fmt(l.best_auroc.auroc)} for ${l.best_auroc.label}=${l.best_auroc.value}` : "");
  box.appendChild(p);
  const table = document.createElement("table");
  table.innerHTML = "<tr><th>label</th><th>majority</th><th>purity</th><th>entropy (bits)</th><th>Revelio sigma</th></tr>";
  for (const [name, q] of Object.entries(l.purity)) {
    const tr = document.createElement("tr");
    for (const v of [name, q.majority_label, fmt(q.majority), fmt(q.entropy), fmt(q.revelio_sigma)]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
    table.appendChild(tr);
  }
  box.appendChild(table);
  if (l.words && l.words.length) {
    const words = document.createElement("table"); words.id = "words";
    words.innerHTML = "<tr><th>caption word</th><th>in top images</th><th>enrichment</th><th>BH q</th></tr>";
    for (const w of l.words) {
      const tr = document.createElement("tr");
      for (const v of [w.word, `${w.in_top} of ${w.top}`, fmt(w.enrichment), String(w.q)]) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
      words.appendChild(tr);
    }
    box.appendChild(words);
  }
  const grid = document.createElement("div"); grid.id = "top-images";
  for (const item of l.top) {
    const cell = document.createElement("div"); cell.className = "pair top-image";
    for (const key of ["image", "heatmap"]) if (item[key]) {
      const img = document.createElement("img"); img.src = item[key]; img.className = key; img.alt = key; cell.appendChild(img); }
    const cap = document.createElement("div");
    cap.textContent = `${fmt(item.activation)} ` + Object.values(item.labels).join(" ");
    cell.appendChild(cap); grid.appendChild(cell);
  }
  box.appendChild(grid);
}
render();
</script></body></html>
"""
