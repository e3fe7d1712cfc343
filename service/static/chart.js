// A small line chart drawn on a <canvas>: a few series of (x, y) points, axes with ticks, a legend.
// No library: the page needs two live charts, and ~150 lines do them.

const PAD = { left: 52, right: 12, top: 26, bottom: 34 };

function niceStep(span, ticks) {
  const raw = span / Math.max(ticks, 1);
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  const norm = raw / mag;
  return (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
}

function fmt(v) {
  const a = Math.abs(v);
  if (Number.isInteger(v)) return String(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1).replace(/\.0$/, "");
  if (a >= 1) return v.toFixed(2).replace(/0$/, "").replace(/\.$/, "");
  return v.toPrecision(2);
}

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{xLabel: string, series: {key: string, name: string, color: string}[], yMin?: number, yMax?: number}} opts
   */
  constructor(canvas, opts) {
    this.canvas = canvas;
    this.opts = opts;
    this.data = new Map(opts.series.map((s) => [s.key, []]));
    this.pending = false;
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.schedule()).observe(canvas);
    }
    this.schedule();
  }

  clear() {
    for (const pts of this.data.values()) pts.length = 0;
    this.schedule();
  }

  /** One point; a point at an x the series has already (a record delivered twice) replaces it. */
  add(key, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y) || !this.data.has(key)) return;
    const pts = this.data.get(key);
    let i = pts.length - 1;
    while (i >= 0 && pts[i][0] > x) i--; // records come in order: a repeat sits at the tail
    if (i >= 0 && pts[i][0] === x) pts[i] = [x, y];
    else pts.splice(i + 1, 0, [x, y]);
    this.schedule();
  }

  count() {
    let n = 0;
    for (const pts of this.data.values()) n += pts.length;
    return n;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const c = this.canvas;
    const n = this.count();
    c.dataset.points = String(n); // for tests and for anyone inspecting the page
    const summary = this.opts.series
      .map((s) => {
        const pts = this.data.get(s.key);
        return pts.length ? `${s.name}: ${pts.length} points, last ${fmt(pts[pts.length - 1][1])}` : "";
      })
      .filter(Boolean)
      .join("; ");
    c.setAttribute("aria-label", `${c.dataset.title || ""} ${summary || "no data yet"}`.trim());

    const dpr = window.devicePixelRatio || 1;
    const cssW = c.clientWidth || c.width;
    const cssH = c.clientHeight || c.height;
    if (c.width !== Math.round(cssW * dpr) || c.height !== Math.round(cssH * dpr)) {
      c.width = Math.round(cssW * dpr);
      c.height = Math.round(cssH * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const style = getComputedStyle(c);
    const fg = style.color || "#222";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillStyle = fg;
    ctx.strokeStyle = fg;

    const all = [...this.data.values()].flat();
    const W = cssW - PAD.left - PAD.right;
    const H = cssH - PAD.top - PAD.bottom;
    if (!all.length || W <= 10 || H <= 10) {
      ctx.globalAlpha = 0.6;
      ctx.fillText("no data yet", PAD.left + 8, PAD.top + 20);
      ctx.globalAlpha = 1;
      return;
    }
    let x0 = Math.min(...all.map((p) => p[0]));
    let x1 = Math.max(...all.map((p) => p[0]));
    let y0 = this.opts.yMin ?? Math.min(...all.map((p) => p[1]));
    let y1 = this.opts.yMax ?? Math.max(...all.map((p) => p[1]));
    if (this.opts.yMin === undefined) y0 = Math.min(y0, 0);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * W;
    const sy = (y) => PAD.top + H - ((y - y0) / (y1 - y0)) * H;

    // axes and ticks
    ctx.globalAlpha = 0.25;
    ctx.beginPath();
    const ys = niceStep(y1 - y0, 4);
    for (let y = Math.ceil(y0 / ys) * ys; y <= y1 + 1e-9; y += ys) {
      ctx.moveTo(PAD.left, sy(y));
      ctx.lineTo(PAD.left + W, sy(y));
    }
    ctx.stroke();
    ctx.globalAlpha = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let y = Math.ceil(y0 / ys) * ys; y <= y1 + 1e-9; y += ys) ctx.fillText(fmt(y), PAD.left - 6, sy(y));
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xs = Math.max(niceStep(x1 - x0, 5), this.opts.integerX ? 1 : 0);
    for (let x = Math.ceil(x0 / xs) * xs; x <= x1 + 1e-9; x += xs) ctx.fillText(fmt(x), sx(x), PAD.top + H + 4);
    ctx.fillText(this.opts.xLabel, PAD.left + W / 2, PAD.top + H + 18);
    ctx.beginPath();
    ctx.moveTo(PAD.left, PAD.top);
    ctx.lineTo(PAD.left, PAD.top + H);
    ctx.lineTo(PAD.left + W, PAD.top + H);
    ctx.stroke();

    // series and legend
    let lx = PAD.left;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    for (const s of this.opts.series) {
      const pts = this.data.get(s.key);
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.75;
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
      ctx.stroke();
      if (pts.length < 40) for (const [x, y] of pts) ctx.fillRect(sx(x) - 2, sy(y) - 2, 4, 4);
      ctx.fillRect(lx, 9, 14, 3);
      ctx.fillStyle = fg;
      ctx.fillText(s.name, lx + 18, 11);
      lx += 26 + ctx.measureText(s.name).width;
    }
    ctx.lineWidth = 1;
  }
}
