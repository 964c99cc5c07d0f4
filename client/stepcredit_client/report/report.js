/* StepCredit's step-credit page: the one renderer of the report file and of /ui.
 *
 * Everything shown comes from the JSON in <script id="stepcredit-data">. Completions are
 * model output and may be hostile, so text only ever enters the page through textContent,
 * createElement and createElementNS: never innerHTML. The report file fetches nothing; the
 * playground (/ui) only POSTs to its own /v1/score.
 */
(function () {
  "use strict";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DATA = JSON.parse(document.getElementById("stepcredit-data").textContent);
  const APP = document.getElementById("app");

  // ------------------------------------------------------------------ small helpers
  function el(tag, props, children) {
    const node = document.createElement(tag);
    setProps(node, props);
    append(node, children);
    return node;
  }
  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    append(node, children);
    return node;
  }
  function setProps(node, props) {
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.className = value;
      else if (name === "dataset") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
      else if (name === "style") for (const [k, v] of Object.entries(value)) node.style.setProperty(k, v);
      else node.setAttribute(name, String(value));
    }
  }
  function append(node, children) {
    for (const child of [].concat(children === undefined ? [] : children)) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  const isObj = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  function fmt(x, digits) {
    if (!isNum(x)) return "–";
    const d = digits === undefined ? 3 : digits;
    return Math.abs(x) >= 1000 ? x.toFixed(0) : x.toFixed(d);
  }
  const pct = (n, d) => (d > 0 ? (100 * n / d).toFixed(0) + "%" : "–");
  const str = (x) => (typeof x === "string" ? x : x === undefined || x === null ? "" : JSON.stringify(x));

  // ------------------------------------------------------------------ rows
  // One row per completion: the item, its result, and what sorting and filtering read.
  function makeRow(item, result, position) {
    item = isObj(item) ? item : {};
    result = isObj(result) ? result : { status: "error", error: { code: "invalid_result", message: "the result is not an object" } };
    const ok = result.status === "ok";
    const text = typeof item.completion === "string" ? item.completion : "";
    const chars = Array.from(text);  // the service's offsets count code points, JavaScript's strings UTF-16 units
    const steps = ok && Array.isArray(result.steps) ? cleanSteps(result.steps, chars.length) : [];
    const gains = steps.map((s) => s.gain).filter(isNum);
    return {
      item, result, position, ok, chars, steps,
      mig: ok && isNum(result.mig_reward) ? result.mig_reward : null,
      outcome: ok && isNum(result.outcome_reward) ? result.outcome_reward : null,
      maxGain: gains.length ? Math.max(...gains) : null,
      nSteps: ok ? steps.length : null,
      correct: ok && result.correct === true,
    };
  }
  // Steps inside the text, in order, not overlapping: a malformed result cannot break the view.
  function cleanSteps(steps, length) {
    const valid = steps
      .filter((s) => isObj(s) && Number.isInteger(s.char_start) && Number.isInteger(s.char_end))
      .filter((s) => s.char_start >= 0 && s.char_start < s.char_end && s.char_end <= length)
      .sort((a, b) => a.char_start - b.char_start);
    const out = [];
    for (const s of valid) if (!out.length || s.char_start >= out[out.length - 1].char_end) out.push(s);
    return out;
  }

  // ------------------------------------------------------------------ gain colour
  let gainScale = 1;  // the largest gain on the page: the strongest shade
  function gainAlpha(gain) {
    if (!isNum(gain) || gain <= 0) return 0;
    return 0.18 + 0.72 * Math.min(1, gain / gainScale);
  }
  const gainColour = (gain) => "rgba(22, 163, 74, " + gainAlpha(gain).toFixed(3) + ")";

  // ------------------------------------------------------------------ the completion, shaded
  function completionView(row) {
    const pre = el("pre", { className: "completion", dataset: { testid: "completion" } });
    const span = Array.isArray(row.result.cot_span) ? row.result.cot_span : null;
    const cuts = new Set([0, row.chars.length]);
    if (span) for (const c of span) if (Number.isInteger(c) && c >= 0 && c <= row.chars.length) cuts.add(c);
    for (const s of row.steps) { cuts.add(s.char_start); cuts.add(s.char_end); }
    const points = Array.from(cuts).sort((a, b) => a - b);
    let k = 0;
    for (let i = 0; i + 1 < points.length; i++) {
      const [a, b] = [points[i], points[i + 1]];
      const piece = row.chars.slice(a, b).join("");
      while (k < row.steps.length && row.steps[k].char_end <= a) k++;
      const step = k < row.steps.length && row.steps[k].char_start <= a ? row.steps[k] : null;
      const inCot = span ? a >= span[0] && b <= span[1] : false;
      if (step) {
        const shaded = gainAlpha(step.gain) > 0;
        pre.appendChild(el("span", {
          className: "step" + (shaded ? "" : " nogain"),
          text: piece,
          title: "step " + step.index + " · ℓ_k " + fmt(step.loglik) + " · watermark " + fmt(step.watermark) +
            " · gain " + fmt(step.gain, 4) + (Number.isInteger(step.best_reference) ? " · reference #" + step.best_reference : ""),
          dataset: { testid: "step", index: step.index, gain: isNum(step.gain) ? step.gain : "" },
          style: shaded ? { "background-color": gainColour(step.gain) } : {},
        }));
      } else if (!inCot && row.ok) {
        pre.appendChild(el("span", { className: "outside-cot", text: piece, title: "outside the chain of thought (cot_span)" }));
      } else {
        pre.appendChild(document.createTextNode(piece));
      }
    }
    if (!row.chars.length) pre.appendChild(el("span", { className: "empty", text: "(no completion)" }));
    return pre;
  }

  // ------------------------------------------------------------------ the ℓ_k curve
  function curveView(row) {
    const r = row.result, steps = row.steps;
    const fig = el("figure", { className: "curve" });
    const base = isNum(r.baseline_loglik) ? r.baseline_loglik : null;
    if (base === null || !steps.length) {
      fig.appendChild(el("p", { className: "no-curve", dataset: { testid: "no-curve" },
        text: base === null ? "No chain of thought: no probes were run (ℓ₀ is null)." : "No steps: only ℓ₀ = " + fmt(base) + "." }));
      return fig;
    }
    const W = 340, H = 190, L = 52, R = 12, T = 12, B = 34;
    const K = steps.length;
    const values = [base];
    for (const s of steps) for (const v of [s.loglik, s.watermark]) if (isNum(v)) values.push(v);
    let lo = Math.min(...values), hi = Math.max(...values);
    if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08;
    lo -= pad; hi += pad;
    const x = (k) => L + (W - L - R) * (K === 0 ? 0.5 : k / K);
    const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
    const plot = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "ℓ_k per step, watermark and ℓ₀", "data-testid": "curve" });
    plot.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#8c959f" }));
    plot.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#8c959f" }));
    for (const v of [hi - pad, lo + pad]) {
      plot.appendChild(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(v, 2)));
    }
    for (const k of K <= 12 ? steps.map((_, i) => i + 1).concat([0]) : [0, Math.round(K / 2), K]) {
      plot.appendChild(svg("text", { x: x(k), y: H - B + 12, "text-anchor": "middle" }, String(k)));
    }
    plot.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "step k"));
    plot.appendChild(svg("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + (T + H - B) / 2 + ")" }, "ℓ_k (mean log p of the reference)"));
    // The watermark: the best ℓ so far, a step line that only rises.
    let d = "M" + x(0) + " " + y(base), h = base;
    steps.forEach((s, i) => {
      const next = isNum(s.watermark) ? s.watermark : h;
      d += " L" + x(i + 1) + " " + y(h) + " L" + x(i + 1) + " " + y(next);
      h = next;
    });
    plot.appendChild(svg("path", { d, fill: "none", stroke: "#d4a72c", "stroke-width": 2, "data-testid": "watermark" },
      [svg("title", {}, "watermark h_k (best ℓ so far)")]));
    // ℓ₀, the baseline before any step: drawn over the watermark, which starts on it.
    plot.appendChild(svg("line", { x1: L, y1: y(base), x2: W - R, y2: y(base), stroke: "#424a53",
      "stroke-dasharray": "4 3", "data-testid": "baseline" }, [svg("title", {}, "ℓ₀ (baseline_loglik) = " + fmt(base))]));
    plot.appendChild(svg("text", { x: W - R - 2, y: y(base) - 4, "text-anchor": "end" }, "ℓ₀"));
    // ℓ_1..ℓ_K, each point a step: green where it raised the watermark (gain > 0).
    const pts = steps.map((s, i) => (isNum(s.loglik) ? x(i + 1) + "," + y(s.loglik) : null)).filter(Boolean);
    plot.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#0969da", "stroke-width": 1.5,
      "data-testid": "loglik" }));
    steps.forEach((s, i) => {
      if (!isNum(s.loglik)) return;
      plot.appendChild(svg("circle", { cx: x(i + 1), cy: y(s.loglik), r: 3.5,
        fill: s.gain > 0 ? "rgb(22, 163, 74)" : "#ffffff", stroke: "#0969da", "data-testid": "point" },
        [svg("title", {}, "step " + s.index + ": ℓ_k " + fmt(s.loglik) + ", watermark " + fmt(s.watermark) + ", gain " + fmt(s.gain, 4))]));
    });
    fig.appendChild(plot);
    fig.appendChild(el("figcaption", { text: "blue: ℓ_k · yellow: watermark · dashed: ℓ₀ · filled: gain > 0" }));
    return fig;
  }

  // ------------------------------------------------------------------ a card
  function badge(label, value) {
    if (value === true) return el("span", { className: "badge yes", text: "✓ " + label });
    if (value === false) return el("span", { className: "badge no", text: "✗ " + label });
    return null;
  }
  function numBadge(label, value, digits) {
    return el("span", { className: "badge num", title: label }, [label + " ", el("b", { text: fmt(value, digits) })]);
  }
  // Inline images only: the page never loads anything (its CSP allows data: images alone).
  function isImageUri(u) { return typeof u === "string" && /^data:image\/(png|jpeg|webp|gif|bmp)[;,]/i.test(u); }
  function promptView(item) {
    let text = "";
    const images = [];
    const bare = Array.isArray(item.images) ? item.images.slice() : [];
    const part = (p) => {
      if (!isObj(p)) return str(p);
      if (p.type === "text") return str(p.text);
      if (p.type === "image_url") { images.push(isObj(p.image_url) ? p.image_url.url : null); return "[image " + images.length + "]"; }
      if (p.type === "image") { images.push(bare.shift()); return "[image " + images.length + "]"; }
      return "[" + str(p.type) + "]";
    };
    const content = (c) => (Array.isArray(c) ? c.map(part).join("") : str(c));
    if (typeof item.prompt === "string") { text = item.prompt; images.push(...bare); }
    else if (Array.isArray(item.messages)) text = item.messages.map((m) => (isObj(m) ? "[" + str(m.role) + "] " + content(m.content) : str(m))).join("\n\n");
    if (!text && !images.length) return null;
    const pictures = images.map((u, i) => (isImageUri(u)
      ? el("img", { className: "item-image", src: u, alt: "image " + (i + 1), title: "image " + (i + 1) })
      : el("span", { className: "badge no", text: "image " + (i + 1) + ": not an inline image" })));
    const body = [el("summary", { text: (Array.isArray(item.messages) ? "messages" : "prompt") + (images.length ? " · " + images.length + " image" + (images.length > 1 ? "s" : "") : "") })];
    if (pictures.length) body.push(el("div", { className: "item-images" }, pictures));
    body.push(el("pre", { text }));
    return el("details", { className: "prompt", open: images.length ? "" : null }, body);
  }
  function card(row) {
    const r = row.result, item = row.item;
    const status = row.ok ? "ok" : "error";
    const node = el("article", {
      className: "card " + (row.ok ? (row.correct ? "correct" : "incorrect") : "error"),
      dataset: {
        testid: "card", status, position: row.position,
        mig: row.mig === null ? "" : row.mig, outcome: row.outcome === null ? "" : row.outcome,
        maxGain: row.maxGain === null ? "" : row.maxGain, steps: row.nSteps === null ? "" : row.nSteps,
        correct: row.ok ? String(row.correct) : "",
      },
    });
    const id = typeof r.id === "string" ? r.id : typeof item.id === "string" ? item.id : "";
    const head = el("header", {}, [el("span", { className: "pos", text: "#" + (row.position + 1) }),
      id ? el("span", { className: "item-id", text: id }) : null]);
    if (row.ok) {
      append(head, [badge("correct", r.correct), badge("format_ok", r.format_ok), badge("format_gate", r.format_gate),
        badge("correctness_gate", r.correctness_gate), badge("sft_gate", r.sft_gate),
        numBadge("outcome", r.outcome_reward), numBadge("MIG", r.mig_reward, 4),
        r.steps_truncated ? el("span", { className: "badge warn", text: "steps truncated" }) : null,
        r.verify_timeout ? el("span", { className: "badge warn", text: "verify timeout" }) : null]);
    } else {
      head.appendChild(el("span", { className: "badge no", text: "error" }));
    }
    node.appendChild(head);
    if (!row.ok) {
      const error = isObj(r.error) ? r.error : {};
      node.appendChild(el("div", { className: "error-box", dataset: { testid: "error" } }, [
        el("span", { className: "error-code", dataset: { testid: "error-code" }, text: str(error.code) || "error" }),
        el("p", { className: "error-message", text: str(error.message) || "(no message)" })]));
    }
    append(node, promptView(item));
    const body = el("div", { className: "body" }, [completionView(row)]);
    if (row.ok) body.appendChild(curveView(row));
    node.appendChild(body);
    const refs = Array.isArray(item.references) ? item.references.map(str) : [];
    const facts = [["references", refs.length ? refs.map((v, i) => (i === r.matched_reference ? "▸" : "") + JSON.stringify(v)).join("  ") : null]];
    if (row.ok) {
      facts.push(["extracted_answer", r.extracted_answer === null || r.extracted_answer === undefined ? "none" : JSON.stringify(str(r.extracted_answer))],
        ["cot_span", Array.isArray(r.cot_span) ? "[" + r.cot_span.join(", ") + ")" : "none"],
        ["steps", String(row.steps.length)], ["ℓ₀", fmt(r.baseline_loglik)],
        ["max gain", fmt(row.maxGain, 4)], ["tokenization", r.tokenization || null]);
    }
    node.appendChild(el("div", { className: "facts" }, facts.filter((f) => f[1] !== null).map(([k, v]) => el("span", {}, [k + " ", el("b", { text: v })]))));
    return node;
  }

  // ------------------------------------------------------------------ summary and histograms
  function histogram(title, values, testid, integer) {
    const fig = el("figure", { className: "hist" });
    const W = 260, H = 120, L = 30, R = 8, T = 8, B = 22;
    const plot = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": title, "data-testid": testid });
    if (!values.length) {
      plot.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no values"));
    } else {
      const lo = Math.min(...values), hi = Math.max(...values);
      let bins = integer ? Math.min(20, Math.round(hi - lo) + 1) : hi > lo ? 10 : 1;
      const width = integer ? Math.max(1, Math.ceil((hi - lo + 1) / bins)) : (hi - lo) / bins || 1;
      if (integer) bins = Math.ceil((hi - lo + 1) / width);
      const counts = new Array(bins).fill(0);
      for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / width))]++;
      const top = Math.max(...counts);
      const bw = (W - L - R) / bins;
      counts.forEach((c, i) => {
        const h = (H - T - B) * c / top;
        const from = lo + i * width, to = integer ? from + width - 1 : from + width;
        plot.appendChild(svg("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(1, bw - 2), height: h, fill: "#54aeff", "data-testid": "bar" },
          [svg("title", {}, (integer ? (from === to ? String(from) : from + "–" + to) : fmt(from, 3) + " – " + fmt(to, 3)) + ": " + c)]));
      });
      plot.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#8c959f" }));
      plot.appendChild(svg("text", { x: L, y: H - 8, "text-anchor": "start" }, integer ? String(lo) : fmt(lo, 2)));
      plot.appendChild(svg("text", { x: W - R, y: H - 8, "text-anchor": "end" }, integer ? String(hi) : fmt(hi, 2)));
      plot.appendChild(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(top)));
      plot.appendChild(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    }
    fig.appendChild(plot);
    fig.appendChild(el("figcaption", { text: title + " (" + values.length + ")" }));
    return fig;
  }
  function summaryView(rows) {
    const ok = rows.filter((r) => r.ok);
    const count = (pred) => ok.filter(pred).length;
    const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
    const migs = ok.map((r) => r.mig).filter(isNum), outcomes = ok.map((r) => r.outcome).filter(isNum);
    const nsteps = ok.map((r) => r.nSteps);
    const stat = (label, value, testid) => el("span", { className: "count", dataset: { testid } }, [label + " ", el("b", { text: value })]);
    return el("section", { className: "panel", id: "summary", dataset: { testid: "summary" } }, [
      el("h2", { text: "Summary" }),
      el("div", { className: "counts" }, [
        stat("completions", String(rows.length), "count-all"),
        stat("ok", String(ok.length), "count-ok"),
        stat("errors", String(rows.length - ok.length), "count-error"),
        stat("correct", pct(count((r) => r.result.correct === true), ok.length), "rate-correct"),
        stat("format ok", pct(count((r) => r.result.format_ok === true), ok.length), "rate-format"),
        stat("SFT gate", pct(count((r) => r.result.sft_gate === true), ok.length), "rate-sft"),
        stat("mean outcome", fmt(mean(outcomes)), "mean-outcome"),
        stat("mean MIG", fmt(mean(migs), 4), "mean-mig"),
        stat("mean steps", fmt(mean(nsteps), 1), "mean-steps"),
      ]),
      el("div", { className: "hists" }, [
        histogram("outcome_reward", outcomes, "hist-outcome", false),
        histogram("mig_reward", migs, "hist-mig", false),
        histogram("steps per completion", nsteps, "hist-steps", true),
      ]),
    ]);
  }

  // ------------------------------------------------------------------ controls: sort and filter
  const SORT_KEYS = { input: "position", outcome: "outcome", mig: "mig", maxgain: "maxGain", steps: "nSteps" };
  function option(value, label) { return el("option", { value, text: label }); }
  function controlsView(state) {
    const sort = el("select", { id: "sort", "data-testid": "sort" }, [option("input", "input order"),
      option("outcome", "outcome reward"), option("mig", "MIG reward"), option("maxgain", "max step gain"), option("steps", "steps")]);
    const order = el("select", { id: "order", "data-testid": "order" }, [option("asc", "ascending"), option("desc", "descending")]);
    const filter = el("select", { id: "filter", "data-testid": "filter" }, [option("all", "all"), option("correct", "correct"),
      option("incorrect", "incorrect"), option("errors", "errors")]);
    const minGain = el("input", { id: "min-gain", type: "number", step: "any", min: "0", placeholder: "0", "data-testid": "min-gain" });
    const text = el("input", { id: "text-filter", type: "search", placeholder: "id or text", "data-testid": "text-filter" });
    const shown = el("span", { className: "shown", id: "shown", "data-testid": "shown" });
    const legend = el("span", { className: "legend", "data-testid": "legend" }, [
      "step gain 0", el("span", { className: "bar", style: { background: "linear-gradient(to right, rgba(22,163,74,0.05), rgba(22,163,74,0.18) 2%, rgba(22,163,74,0.9))" } }),
      fmt(gainScale, 3), el("span", { className: "outside-cot outside", text: "outside cot_span" })]);
    const update = () => apply(state, { sort: sort.value, order: order.value, filter: filter.value,
      minGain: parseFloat(minGain.value), text: text.value.trim().toLowerCase() });
    for (const c of [sort, order, filter]) c.addEventListener("change", update);
    for (const c of [minGain, text]) c.addEventListener("input", update);
    state.shown = shown;
    return el("section", { className: "panel controls", id: "controls" }, [
      el("label", {}, ["sort by", sort]), el("label", {}, ["order", order]), el("label", {}, ["show", filter]),
      el("label", {}, ["max gain ≥", minGain]), el("label", {}, ["find", text]), legend, shown]);
  }
  function apply(state, how) {
    const key = SORT_KEYS[how.sort] || "position";
    const sign = how.order === "desc" ? -1 : 1;
    const sorted = state.rows.slice().sort((a, b) => {
      const [x, y] = [a[key], b[key]];
      if (x === null || y === null) return (x === null) - (y === null) || a.position - b.position;  // none last
      return sign * (x - y) || a.position - b.position;
    });
    let visible = 0;
    for (const row of sorted) {
      let show = how.filter === "correct" ? row.ok && row.correct : how.filter === "incorrect" ? row.ok && !row.correct
        : how.filter === "errors" ? !row.ok : true;
      if (show && isNum(how.minGain) && how.minGain > 0) show = row.maxGain !== null && row.maxGain >= how.minGain;
      if (show && how.text) {
        const hay = [row.result.id, row.item.id, row.item.completion, row.item.prompt].map(str).join("\n").toLowerCase();
        show = hay.includes(how.text);
      }
      row.node.hidden = !show;
      visible += show;
      state.list.appendChild(row.node);  // moves the existing card: nothing is drawn again
    }
    state.shown.textContent = "showing " + visible + " of " + state.rows.length;
  }

  // ------------------------------------------------------------------ the page
  function header(meta) {
    const facts = Object.entries(isObj(meta) ? meta : {}).map(([k, v]) => el("span", {}, [k + ": ", el("b", { text: str(v) })]));
    const title = DATA.mode === "playground" ? null : el("h1", { text: DATA.title || "StepCredit" });
    return [title, facts.length ? el("div", { className: "meta", dataset: { testid: "meta" } }, facts) : null];
  }
  const results = el("div", { id: "results" });
  function renderRows(pairs, meta) {
    const rows = pairs.map((p, i) => makeRow(p.item, p.result, i));
    const gains = rows.map((r) => r.maxGain).filter(isNum);
    gainScale = gains.length && Math.max(...gains) > 0 ? Math.max(...gains) : 1;
    const state = { rows, list: el("div", { id: "cards", "data-testid": "cards" }) };
    for (const row of rows) row.node = card(row);
    results.replaceChildren(...header(meta).filter(Boolean), summaryView(rows), controlsView(state), state.list);
    apply(state, { sort: "input", order: "asc", filter: "all" });
    if (!rows.length) state.list.appendChild(el("p", { className: "empty", text: "No completions." }));
  }

  if (DATA.mode === "playground") {
    APP.appendChild(playground(DATA.playground || {}));
  } else {
    renderRows(DATA.rows || [], DATA.meta);
  }
  APP.appendChild(results);

  // ------------------------------------------------------------------ the playground (/ui)
  function playground(conf) {
    const chunk = Number.isInteger(conf.max_items_per_request) && conf.max_items_per_request > 0 ? conf.max_items_per_request : 64;
    const maxItems = Number.isInteger(conf.max_items) ? conf.max_items : 5000;
    const input = el("textarea", { id: "input", "data-testid": "input", spellcheck: "false",
      placeholder: 'One item per line (JSONL), a JSON array, or {"items": [...]}: {"prompt": "...", "completion": "<think>...</think><answer>...</answer>", "references": ["..."]}' });
    const file = el("input", { id: "file", type: "file", accept: ".jsonl,.json,application/json", "data-testid": "file" });
    const example = el("button", { id: "load-example", type: "button", "data-testid": "load-example", text: "Load the example items" });
    const key = el("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "API key (optional)",
      title: "sent as Authorization: Bearer, for a browser that does not send the page's credentials" });
    const score = el("button", { id: "score", type: "button", "data-testid": "score", text: "Score" });
    const status = el("p", { className: "status", id: "status", role: "status", "data-testid": "status" });
    const say = (text, isError) => { status.textContent = text; status.className = "status" + (isError ? " error" : ""); };

    example.addEventListener("click", () => { input.value = conf.example || ""; say("Loaded the example items: press Score."); });
    file.addEventListener("change", () => {
      const f = file.files && file.files[0];
      if (!f) return;
      f.text().then((t) => { input.value = t; say("Loaded " + f.name + "."); }, (e) => say("Cannot read " + f.name + ": " + e, true));
    });
    score.addEventListener("click", () => {
      let pending;
      try { pending = parseInput(input.value, maxItems); } catch (e) { say(String(e.message || e), true); return; }
      score.disabled = true;
      run(pending, chunk, key.value.trim(), say).finally(() => { score.disabled = false; });
    });
    return el("section", { className: "panel", id: "playground" }, [
      el("h1", { text: DATA.title || "StepCredit playground" }),
      el("p", { text: "Paste or upload items, score them with this service, and see the step credit. Items go to " +
        "POST /v1/score in requests of at most " + chunk + " items." }),
      input, el("div", { className: "row" }, [file, example, key, score]), status]);
  }
  // The items, in order; a line that is not JSON is that item's own error, never dropped.
  function parseInput(text, maxItems) {
    const trimmed = text.trim();
    if (!trimmed) throw new Error("Nothing to score: paste items, upload a file, or load the example.");
    let whole;
    try { whole = JSON.parse(trimmed); } catch (e) { whole = undefined; }
    let entries;
    if (Array.isArray(whole)) entries = whole.map((item) => ({ item }));
    else if (isObj(whole) && Array.isArray(whole.items)) entries = whole.items.map((item) => ({ item }));
    else if (whole !== undefined) entries = [{ item: whole }];
    else {
      entries = [];
      text.split("\n").forEach((line, i) => {
        line = line.replace(/\r$/, "");
        if (!line.trim()) return;
        try { entries.push({ item: JSON.parse(line) }); }
        catch (e) { entries.push({ item: { completion: line }, error: { code: "invalid_item", message: "line " + (i + 1) + ": not JSON (" + e.message + ")" } }); }
      });
    }
    if (entries.length > maxItems) throw new Error(entries.length + " items: this page shows at most " + maxItems + ".");
    return entries;
  }
  async function run(entries, chunk, key, say) {
    const pairs = entries.map((e) => ({ item: e.item, result: e.error ? { status: "error", error: e.error } : null }));
    const todo = pairs.filter((p) => p.result === null);
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    let model = null, failure = null;
    for (let start = 0; start < todo.length && !failure; start += chunk) {
      const part = todo.slice(start, start + chunk);
      say("Scoring items " + (start + 1) + "–" + (start + part.length) + " of " + todo.length + "…");
      try {
        const response = await fetch("/v1/score", { method: "POST", headers, credentials: "same-origin",
          body: JSON.stringify({ items: part.map((p) => p.item) }) });
        const body = await response.json().catch(() => null);
        if (!response.ok) failure = describeFailure(response, body);
        else if (!isObj(body) || !Array.isArray(body.results) || body.results.length !== part.length) failure = "the service's answer is not a list of " + part.length + " results";
        else { part.forEach((p, i) => { p.result = body.results[i]; }); model = body.model || model; }
      } catch (e) {
        failure = "the request failed: " + (e.message || e);
      }
    }
    for (const p of pairs) if (p.result === null) p.result = { status: "error", error: { code: "not_scored", message: failure } };
    const meta = isObj(model) ? { model: model.name, revision: model.revision, backend: model.backend, device: model.device } : {};
    renderRows(pairs, meta);
    const errors = pairs.filter((p) => !isObj(p.result) || p.result.status !== "ok").length;
    if (failure) say("Scoring stopped: " + failure, true);
    else say("Scored " + pairs.length + " items (" + errors + " with an error).");
  }
  function describeFailure(response, body) {
    const error = isObj(body) && isObj(body.error) ? body.error : {};
    let text = "HTTP " + response.status + (error.code ? " " + error.code : "") + (error.message ? ": " + error.message : "");
    const retry = response.headers.get("Retry-After");
    if (retry) text += " (Retry-After: " + retry + " s)";
    if (response.status === 401) text += ". Enter the API key, or open /ui again and sign in with it as the password.";
    return text;
  }
})();
