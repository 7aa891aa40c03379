// Search page of the marketplace service: calls POST ../search (and ../predict) with multipart forms.
(function () {
  "use strict";

  const base = new URL("..", window.location.href);   // the page lives at <service>/ui/
  const form = document.getElementById("search-form");
  const query = document.getElementById("query");
  const photo = document.getElementById("photo");
  const preview = document.getElementById("photo-preview");
  const clearPhoto = document.getElementById("clear-photo");
  const category = document.getElementById("category");
  const kSelect = document.getElementById("k");
  const submit = document.getElementById("submit");
  const statusBox = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const predictionBox = document.getElementById("prediction");
  const results = document.getElementById("results");
  const footer = document.getElementById("footer");

  const money = new Intl.NumberFormat("en-GB", { style: "currency", currency: "GBP" });

  function api(name) { return new URL(name, base).toString(); }

  function errorMessage(payload, response) {
    if (payload && typeof payload === "object") {
      const item = Array.isArray(payload) ? payload[0] : payload;
      if (item && item.error) {
        let msg = String(item.error);
        if (Array.isArray(item.detail) && item.detail.length) {
          msg += ": " + item.detail.map((d) => (d.loc ? d.loc.join(".") + " " : "") + (d.msg || "")).join("; ");
        }
        return msg;
      }
    }
    return "request failed (HTTP " + response.status + ")";
  }

  async function post(name, body) {
    const response = await fetch(api(name), { method: "POST", body: body });
    let payload = null;
    try { payload = await response.json(); } catch (e) { payload = null; }
    if (!response.ok) { throw new Error(errorMessage(payload, response)); }
    return payload;
  }

  function buildForm(withSearchFields) {
    const data = new FormData();
    const text = query.value.trim();
    // BentoML JSON-decodes multipart text fields, so strings are sent JSON-quoted ("123" stays text).
    if (text) data.append("text", JSON.stringify(text));
    if (photo.files && photo.files[0]) data.append("image", photo.files[0], photo.files[0].name);
    if (withSearchFields) {
      data.append("k", String(parseInt(kSelect.value, 10) || 10));
      if (category.value) data.append("category", JSON.stringify(category.value));
    }
    return data;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearMessages() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    statusBox.textContent = "";
  }

  function card(item) {
    const el = document.createElement("article");
    el.className = "card";
    el.dataset.productId = item.product_id;
    let thumb;
    if (item.thumbnail_url) {
      thumb = document.createElement("img");
      thumb.className = "thumb";
      thumb.loading = "lazy";
      thumb.alt = item.product_name || "listing photo";
      thumb.src = new URL(item.thumbnail_url, window.location.href).toString();
    } else {
      thumb = document.createElement("div");
      thumb.className = "thumb nothumb";
      thumb.textContent = "no photo";
    }
    el.appendChild(thumb);
    const body = document.createElement("div");
    body.className = "body";
    const fields = [
      ["name", item.product_name || "(no name)"],
      ["price", item.price === null || item.price === undefined ? "price n/a" : money.format(item.price)],
      ["category", item.category || ""],
      ["location", item.location || ""],
      ["score", "score " + Number(item.score).toFixed(3)],
    ];
    if (item.retrieval_score !== undefined && item.category_score !== undefined) {
      fields.push(["score-parts", "retrieval " + Number(item.retrieval_score).toFixed(3) +
                   " + category " + Number(item.category_score).toFixed(3)]);
    }
    for (const [cls, text] of fields) {
      const div = document.createElement("div");
      div.className = cls;
      div.textContent = text;
      body.appendChild(div);
    }
    const more = document.createElement("button");
    more.type = "button";
    more.className = "link more-like-this";
    more.textContent = "More like this";
    more.addEventListener("click", () => runSimilar(item));
    body.appendChild(more);
    el.appendChild(body);
    return el;
  }

  // "More like this listing": POST ../similar with the card's product id (same ranking as /search).
  async function runSimilar(item) {
    clearMessages();
    statusBox.textContent = "Finding listings like this one\u2026";
    try {
      const data = new FormData();
      data.append("product_id", JSON.stringify(item.product_id));
      data.append("k", String(parseInt(kSelect.value, 10) || 10));
      if (category.value) data.append("category", JSON.stringify(category.value));
      const found = await post("similar", data);
      results.innerHTML = "";
      predictionBox.hidden = true;
      const items = found.results || [];
      for (const hit of items) results.appendChild(card(hit));
      results.dataset.similarTo = item.product_id;
      statusBox.textContent = items.length + " listing" + (items.length === 1 ? "" : "s") + " like \u201c" +
        (item.product_name || item.product_id) + "\u201d (" + found.index.kind + " index)";
    } catch (err) {
      statusBox.textContent = "";
      showError(err.message || String(err));
    }
  }

  function renderPrediction(pred) {
    if (!pred) { predictionBox.hidden = true; return; }
    const p = pred.probabilities ? pred.probabilities[pred.category] : null;
    let text = "Looks like: " + pred.category + (p !== null && p !== undefined ? " (" + Math.round(p * 100) + "%)" : "");
    if (pred.price_estimate !== undefined && pred.price_estimate !== null) {
      text += " \u2014 estimated price " + money.format(pred.price_estimate);
    }
    predictionBox.textContent = text;
    predictionBox.hidden = false;
  }

  async function runSearch(event) {
    if (event) event.preventDefault();
    clearMessages();
    const hasText = query.value.trim().length > 0;
    const hasPhoto = photo.files && photo.files.length > 0;
    if (!hasText && !hasPhoto) {
      showError("Type a search text and/or choose a photo.");
      return;
    }
    submit.disabled = true;
    statusBox.textContent = "Searching\u2026";
    results.innerHTML = "";
    try {
      const [found, pred] = await Promise.all([
        post("search", buildForm(true)),
        post("predict", buildForm(false)).catch(() => null),
      ]);
      renderPrediction(pred);
      const items = found.results || [];
      delete results.dataset.similarTo;
      for (const item of items) results.appendChild(card(item));
      statusBox.textContent = items.length
        ? items.length + " listing" + (items.length === 1 ? "" : "s") + " found (" + found.index.kind + " index)"
        : "No listings found.";
    } catch (err) {
      predictionBox.hidden = true;
      statusBox.textContent = "";
      showError(err.message || String(err));
    } finally {
      submit.disabled = false;
    }
  }

  photo.addEventListener("change", () => {
    const file = photo.files && photo.files[0];
    if (file) {
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      clearPhoto.hidden = false;
    } else {
      preview.hidden = true;
      clearPhoto.hidden = true;
    }
  });
  clearPhoto.addEventListener("click", () => {
    photo.value = "";
    preview.hidden = true;
    clearPhoto.hidden = true;
  });
  form.addEventListener("submit", runSearch);

  async function loadMetadata() {
    try {
      const meta = await post("metadata", new FormData());
      for (const name of meta.categories || []) {
        const opt = document.createElement("option");
        opt.value = name;
        opt.textContent = name;
        category.appendChild(opt);
      }
      const models = Object.values(meta.models || {}).map((m) => m.kind + ": " + m.name + " v" + m.version);
      footer.textContent = "Bundle built " + (meta.built_at || "?") + " \u00b7 " + models.join(" \u00b7 ");
      document.body.dataset.ready = "true";
    } catch (err) {
      showError("Could not load the service metadata: " + (err.message || err));
    }
  }
  loadMetadata();
})();
