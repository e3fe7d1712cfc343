// The page's two DOM helpers, shared by app.js, microscope.js and sweeps.js.

/** The first element matching `sel` (under `root`). */
export const $ = (sel, root = document) => root.querySelector(sel);

/** An element: `attrs` sets class, text, `on*` listeners and attributes (true: present, false/null: absent). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}
