// loha front end: when a file is chosen on a LoHa node, show its summary and preview.
//
// The summary comes from GET /loha/info?name=… (loha.summary's summary of the file),
// the picture from GET /loha/preview?name=… (name.preview.png or name.png beside it);
// both routes read only inside ComfyUI's "loras" folders. Metadata is shown as text,
// never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODES_WITH_FILE = ["LohaLoader", "LohaLoaderModelOnly", "LohaLoaderBypass", "LohaInfo"];
// Sent by a loader for what a file holds that the model does not get (nodes/host.py).
const NOT_APPLIED_EVENT = "loha.not_applied";
const FILE_WIDGET = "lora_name";
const FAMILY = { sd1: "SD 1.x", sd2: "SD 2.x", sdxl: "SDXL" };
const TAGS_SHOWN = 5;
const PANEL_HEIGHT = 150;
const NOTICE_HEIGHT = 60;

function listed(counts) {
  const parts = Object.entries(counts).map(([value, n]) => `${value} (${n})`);
  return parts.join(", ") || "none";
}

// [label, text] rows for a summary dict (see loha/inspect.py summarize()).
function summaryRows(s) {
  const parts = Object.entries(s.modules_by_part).map(([part, n]) => `${part} ${n}`).join(", ");
  const rows = [
    ["family", FAMILY[s.family] ?? s.family ?? "unknown"],
    ["modules", `${s.module_count}${parts ? ": " + parts : ""}`],
    ["rank", listed(s.ranks)],
    ["alpha", listed(s.alphas)],
  ];
  if (s.tucker || s.dora) rows.push(["tucker / dora", `${s.tucker} / ${s.dora}`]);
  const base = s.training?.base_model ?? s.training?.sd_model_name;
  if (base) rows.push(["base model", base]);
  if (s.top_tags?.length) {
    rows.push(["top tags", s.top_tags.slice(0, TAGS_SHOWN).map(([tag]) => tag).join(", ")]);
  }
  if (s.unknown_keys?.length) rows.push(["not applied", `${s.unknown_keys.length} keys of no known kind`]);
  return rows;
}

function makePanel() {
  const panel = document.createElement("div");
  panel.className = "loha-info";
  Object.assign(panel.style, {
    font: "11px monospace", color: "var(--input-text, #ddd)", overflow: "auto",
    display: "flex", gap: "6px", alignItems: "flex-start", padding: "2px 4px", boxSizing: "border-box",
  });
  const table = document.createElement("div");
  table.className = "loha-summary";
  Object.assign(table.style, { flex: "1 1 auto", minWidth: "0", whiteSpace: "pre-wrap", wordBreak: "break-word" });
  const image = document.createElement("img");
  image.className = "loha-preview";
  Object.assign(image.style, { maxWidth: "45%", maxHeight: `${PANEL_HEIGHT - 10}px`, display: "none", borderRadius: "4px" });
  image.onerror = () => { image.style.display = "none"; };
  panel.append(table, image);
  return { panel, table, image };
}

function showRows(table, rows) {
  table.replaceChildren(...rows.map(([label, text]) => {
    const row = document.createElement("div");
    const name = document.createElement("b");
    name.textContent = `${label}: `;
    row.append(name, document.createTextNode(text));
    return row;
  }));
}

async function update(view, name) {
  const token = (view.token = (view.token ?? 0) + 1);
  if (!name) {
    showRows(view.table, []);
    view.image.style.display = "none";
    return;
  }
  const query = `name=${encodeURIComponent(name)}`;
  let payload;
  try {
    const response = await api.fetchApi(`/loha/info?${query}`);
    payload = await response.json();
    if (!response.ok) throw new Error(payload.error ?? response.statusText);
  } catch (error) {
    if (token === view.token) showRows(view.table, [["error", String(error.message ?? error)]]);
    return;
  }
  if (token !== view.token) return; // a newer choice arrived meanwhile
  showRows(view.table, summaryRows(payload.summary));
  view.panel.title = payload.text;
  if (payload.preview) {
    view.image.src = api.apiURL(`/loha/preview?${query}&t=${Date.now()}`);
    view.image.style.display = "block";
  } else {
    view.image.style.display = "none";
  }
}

function attach(node) {
  const fileWidget = node.widgets?.find((w) => w.name === FILE_WIDGET);
  if (!fileWidget) return;
  const view = makePanel();
  const widget = node.addDOMWidget("loha_info", "loha_info", view.panel, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => PANEL_HEIGHT,
  });
  widget.serialize = false;
  const original = fileWidget.callback;
  fileWidget.callback = function (value, ...rest) {
    const result = original?.apply(this, [value, ...rest]);
    update(view, value);
    node.setDirtyCanvas?.(true, true);
    return result;
  };
  node.lohaView = view;
  // A loaded workflow sets widget values after creation: read the value once settled.
  requestAnimationFrame(() => update(view, fileWidget.value));
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], 360), Math.max(node.size[1], size[1])]);
}

// A node without a file widget (the stack) gets a panel for what was not applied on its first notice.
function noticeView(node) {
  if (!node.lohaView) {
    const view = makePanel();
    node.addDOMWidget("loha_info", "loha_info", view.panel, { serialize: false, hideOnZoom: false,
                                                              getMinHeight: () => NOTICE_HEIGHT });
    node.lohaView = view;
    node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  }
  return node.lohaView;
}

// A loader's run: what was not applied, shown on that node (once per text) until the file changes.
function showNotApplied({ detail }) {
  const node = app.graph?.getNodeById?.(Number(detail.node));
  if (!node) return;
  const view = noticeView(node);
  const rows = [...view.table.querySelectorAll(".loha-not-applied")];
  if (!rows.some((row) => row.textContent === detail.text)) {
    const row = document.createElement("div");
    row.className = "loha-not-applied";
    row.style.color = "var(--error-text, #f88)";
    row.textContent = detail.text;
    view.table.append(row);
  }
  node.setDirtyCanvas?.(true, true);
}

api.addEventListener(NOT_APPLIED_EVENT, showNotApplied);

app.registerExtension({
  name: "loha.fileInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_FILE.includes(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      attach(this);
      return result;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = configured?.apply(this, arguments);
      const fileWidget = this.widgets?.find((w) => w.name === FILE_WIDGET);
      if (this.lohaView && fileWidget) update(this.lohaView, fileWidget.value);
      return result;
    };
  },
});
