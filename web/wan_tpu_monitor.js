// The TPU monitor: a small panel in the ComfyUI page with each device's memory and what this pack
// holds there, from GET /wan_tpu/devices. It refreshes every 2 s while a prompt runs, every 15 s
// otherwise. The route never starts the TPU: before the pack has run, the panel says so.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const RUNNING_MS = 2000;
const IDLE_MS = 15000;

function size(bytes) {
  if (bytes == null) return "?";
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function render(panel, body, report) {
  if (!report.started) {
    body.textContent = "idle: no device started yet";
    return;
  }
  const lines = report.devices.map((d) => {
    const memory = d.total_bytes != null ? `${size(d.used_bytes)} of ${size(d.total_bytes)} used` : "memory n/a";
    return `${d.platform} ${d.id} ${d.kind}: ${memory}, pack ${size(d.pack_bytes)}`;
  });
  const held = report.components.map((c) => `${c.kind} (${c.model}) ${size(c.bytes)}`);
  lines.push(held.length ? `holds: ${held.join(", ")}` : "holds: nothing");
  lines.push(`compiled programs: ${report.compiled_programs}`);
  body.textContent = lines.join("\n");
}

app.registerExtension({
  name: "ComfyUI-Wan-TPU.Monitor",
  async setup() {
    const panel = document.createElement("div");
    panel.id = "wan-tpu-monitor";
    Object.assign(panel.style, {
      position: "fixed", left: "8px", bottom: "8px", zIndex: 1000, maxWidth: "420px",
      background: "rgba(20, 20, 20, 0.85)", color: "#ddd", font: "11px monospace",
      padding: "6px 8px", borderRadius: "6px", whiteSpace: "pre", pointerEvents: "auto",
    });
    const title = document.createElement("div");
    title.textContent = "Wan TPU monitor";
    title.style.cursor = "pointer";
    title.style.fontWeight = "bold";
    const body = document.createElement("div");
    body.textContent = "…";
    title.addEventListener("click", () => { body.hidden = !body.hidden; });
    panel.append(title, body);
    document.body.append(panel);

    let running = false;
    let timer = null;
    async function refresh() {
      clearTimeout(timer);
      try {
        const answer = await api.fetchApi("/wan_tpu/devices");
        render(panel, body, await answer.json());
      } catch (error) {
        body.textContent = `unavailable (${error})`;
      }
      timer = setTimeout(refresh, running ? RUNNING_MS : IDLE_MS);
    }
    api.addEventListener("execution_start", () => { running = true; refresh(); });
    for (const done of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(done, () => { running = false; refresh(); });
    }
    refresh();
  },
});
