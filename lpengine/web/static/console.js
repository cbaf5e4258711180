// lpengine console: the few behaviours a server-rendered page cannot do alone. No build step, no dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, text, cls) => {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
};
const isAudio = (f) => f.type.startsWith("audio/") || /\.(wav|mp3)$/i.test(f.name);

// -- New batch ---------------------------------------------------------------------------------------------------
function newBatchPage() {
  const chosen = { images: [], audio: null };
  let problems = {};
  let lastEstimate = null;
  let checking = 0;

  const add = (files) => {
    for (const f of files) {
      if (isAudio(f)) chosen.audio = f;
      else chosen.images.push(f);
    }
    check();
  };
  $("#images").addEventListener("change", (e) => { add(e.target.files); e.target.value = ""; });
  $("#audio").addEventListener("change", (e) => { add(e.target.files); e.target.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
  $("#folder").addEventListener("change", check);
  $("#preset").addEventListener("change", check);
  document.querySelectorAll("[data-param]").forEach((input) => input.addEventListener("change", check));

  function params() {
    const out = {};
    document.querySelectorAll("[data-param]").forEach((input) => {
      out[input.dataset.param] = input.type === "checkbox" ? input.checked : Number(input.value);
    });
    return out;
  }

  function form(onlyGood) {
    const data = new FormData();
    for (const f of chosen.images) if (!onlyGood || !problems[f.name]) data.append("images", f, f.name);
    if (chosen.audio) data.append("audio", chosen.audio, chosen.audio.name);
    const folder = $("#folder").value.trim();
    if (folder) data.append("folder", folder);
    data.append("preset", $("#preset").value);
    data.append("params", JSON.stringify(params()));
    return data;
  }

  function render() {
    const list = $("#files");
    list.replaceChildren();
    const all = [...chosen.images, ...(chosen.audio ? [chosen.audio] : [])];
    for (const f of all) {
      const problem = problems[f.name];
      const li = el("li", null, problem ? "bad" : "good");
      li.append(el("span", f.name, "name"), el("span", problem ? problem : "ok", "problem"));
      list.append(li);
    }
  }

  async function check() {
    const mine = ++checking;
    $("#form-error").textContent = "";
    $("#start").disabled = true;
    if (!chosen.images.length && !$("#folder").value.trim()) { render(); return; }
    $("#estimate").textContent = "Checking the files…";
    const rsp = await fetch("/api/estimate", { method: "POST", body: form(false) });
    const body = await rsp.json();
    if (mine !== checking) return; // a newer check is under way
    problems = {};
    for (const p of body.files || []) problems[p.name] = p.problem;
    render();
    if (!rsp.ok) { $("#form-error").textContent = body.error; $("#estimate").textContent = ""; return; }
    lastEstimate = body.estimate;
    const e = body.estimate;
    const left = Object.keys(problems).length;
    $("#estimate").textContent =
      `${e.images} photo(s): ${e.calls} paid call(s) (${e.detect_calls} face checks, ${e.submit_calls} videos), ` +
      `${e.video_seconds} s of video, estimated ${e.cost_cny.toFixed(3)} CNY` +
      (left ? ` — ${left} file(s) with a problem will be left out` : "");
    $("#start").disabled = !(e.images > 0 || $("#folder").value.trim()) || !chosen.audio || !!problems[chosen.audio.name];
  }

  $("#start").addEventListener("click", async () => {
    if (!lastEstimate) return;
    $("#start").disabled = true;
    const rsp = await fetch("/api/batches", { method: "POST", body: form(true) });
    const body = await rsp.json();
    if (rsp.status === 201) { window.location.assign(`/batches/${body.id}`); return; }
    $("#form-error").textContent = body.error;
    for (const p of body.files || []) problems[p.name] = p.problem;
    render();
  });
}

// -- Batch -------------------------------------------------------------------------------------------------------
function batchPage() {
  const box = $("#batch");
  const id = box.dataset.id;
  const pageNo = box.dataset.pageNo || "1";
  let finished = null;
  let refreshing = false;

  document.querySelectorAll("[data-action]").forEach((button) =>
    button.addEventListener("click", async () => {
      const rsp = await fetch(`/api/batches/${id}/${button.dataset.action}`, { method: "POST" });
      const body = await rsp.json();
      if (!rsp.ok) $("#batch-error").textContent = body.error;
    })
  );

  // Redo bad: the cost first (the dry run of `lpengine run --redo bad`), then a confirmation naming what was priced.
  let redoConfirm = null;
  $("#redo-bad").addEventListener("click", async () => {
    const rsp = await fetch(`/api/batches/${id}/redo-bad`);
    const est = await rsp.json();
    $("#batch-error").textContent = rsp.ok ? est.message || "" : est.error;
    if (!rsp.ok || !est.items) return;
    const names = est.names.slice(0, 5).join(", ") + (est.names.length > 5 ? ", …" : "");
    let text = `Make ${est.items} video(s) judged bad again (${names}): ${est.video_seconds.toFixed(1)} s of video, ` +
      `about ${est.cost_cny.toFixed(3)} CNY, paid again. The earlier videos are kept as NAME.prevN.mp4.`;
    if (est.run_items > est.items) text += ` The run also makes ${est.run_items - est.items} item(s) not made yet: about ${est.run_cost_cny.toFixed(3)} CNY in all.`;
    $("#redo-cost").textContent = text;
    redoConfirm = est.confirm;
    $("#redo-box").hidden = false;
  });
  $("#redo-no").addEventListener("click", () => { $("#redo-box").hidden = true; redoConfirm = null; });
  $("#redo-yes").addEventListener("click", async () => {
    $("#redo-box").hidden = true;
    const rsp = await fetch(`/api/batches/${id}/redo-bad`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ confirm: redoConfirm }),
    });
    const body = await rsp.json();
    if (!rsp.ok) $("#batch-error").textContent = body.error;
  });

  async function refreshItems() {
    if (refreshing) return;
    refreshing = true;
    try {
      const rsp = await fetch(`/api/batches/${id}?page=${pageNo}`);
      const body = await rsp.json();
      const tbody = $("#items tbody");
      tbody.replaceChildren();
      for (const it of body.items) {
        const tr = el("tr");
        const name = el("td");
        if (it.video_url) { const a = el("a", it.name); a.href = it.video_url; name.append(a); } else name.textContent = it.name;
        const status = el("td");
        status.append(el("span", it.status, `status status-${it.status}`));
        const details = el("td", it.error || "");
        if (it.verdict) details.append(" ", el("span", it.verdict, "verdict"));
        tr.append(name, status, details);
        tbody.append(tr);
      }
    } finally {
      refreshing = false;
    }
  }

  const events = new EventSource(`/api/batches/${id}/events`);
  events.addEventListener("summary", (message) => {
    const { summary: s, log } = JSON.parse(message.data);
    const state = $("#state");
    state.textContent = s.state;
    state.className = `state state-${s.state}`;
    $("#done").textContent = s.counts.succeeded;
    $("#total").textContent = s.counts.total;
    $("#failed").textContent = s.counts.failed;
    $("#queue").textContent = s.service_queue;
    $("#eta").textContent = s.eta_s === null ? "–" : Math.round(s.eta_s);
    $("#spent").textContent = s.cost.spent_cny.toFixed(3);
    $("#remaining").textContent = s.cost.projected_remaining_cny.toFixed(3);
    $("#batch-error").textContent = s.error || "";
    const stages = $("#stages tbody");
    $("#stages").hidden = !s.counts.stages;
    stages.replaceChildren();
    for (const [stage, c] of Object.entries(s.counts.stages || {})) {
      const tr = el("tr");
      tr.append(el("td", stage), el("td", c.active), el("td", c.done));
      stages.append(tr);
    }
    if (log) $("#log").textContent = log.join("\n");
    const key = `${s.counts.finished}/${s.state}`;
    if (key !== finished) { finished = key; refreshItems(); }
    box.dataset.state = s.state;
  });
}

document.querySelectorAll("[data-time]").forEach((cell) => {
  const t = Number(cell.dataset.time);
  if (t) cell.textContent = new Date(t * 1000).toLocaleString();
});
if (document.body.dataset.page === "new") newBatchPage();
if (document.body.dataset.page === "batch") batchPage();
