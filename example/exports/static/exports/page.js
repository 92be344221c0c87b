// The example page: everything goes through the package's client module and REST API.
import { mountProgress, startJob } from "../task_ferry/ferry.mjs";

const form = document.getElementById("start-form");
const list = document.getElementById("job-list");
const empty = document.querySelector(".empty");
const formError = form.querySelector(".form-error");
const api = form.dataset.api;
// The server says whether it pushes events (ASGI with Redis); otherwise plain polling is finer.
const sse = form.dataset.sse === "true";

// Times in the viewer's own time zone, for server-rendered and new rows alike.
function showLocalTime(element) {
  element.textContent = new Date(element.dateTime).toLocaleTimeString([], { hour12: false });
}

document.querySelectorAll("#job-list time").forEach(showLocalTime);

function describeErrors(data) {
  if (!data || typeof data !== "object") return String(data || "");
  return Object.entries(data)
    .map(([field, messages]) => {
      const text = Array.isArray(messages) ? messages.join(" ") : String(messages);
      return field === "detail" || field === "non_field_errors" ? text : `${field}: ${text}`;
    })
    .join(" ");
}

function addJob(job, values) {
  const item = document.createElement("li");
  item.className = "job";
  item.dataset.jobId = job.id;
  const head = document.createElement("div");
  head.className = "job__head";
  const title = document.createElement("span");
  title.className = "job__title";
  title.textContent = `#${job.id} · ${job.type} · ${values.rows} rows`;
  const time = document.createElement("time");
  time.dateTime = job.created_at;
  showLocalTime(time);
  const link = document.createElement("a");
  link.className = "job__download";
  link.textContent = "Download";
  link.hidden = true;
  head.append(title, time, link);
  item.append(head);
  list.prepend(item);
  empty.hidden = true;
  mountProgress(item, job.id, { base: api, label: `Job ${job.id}`, job, sse });
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button[type=submit]");
  const values = {
    rows: Number(form.elements.rows.value),
    seconds: Number(form.elements.seconds.value),
    // Empty: the export does not fail (null, as the API shows it).
    fail_at_row: form.elements.fail_at_row.value ? Number(form.elements.fail_at_row.value) : null,
  };
  button.disabled = true;
  formError.hidden = true;
  try {
    const job = await startJob(form.dataset.jobType, values, { base: api });
    addJob(job, values);
  } catch (error) {
    formError.textContent = describeErrors(error.data) || error.message;
    formError.hidden = false;
  } finally {
    button.disabled = false;
  }
});

// A finished export gets its download link, whichever way the bar learnt it ended: the API
// shows its download_url (never the file's path on the server).
list.addEventListener("task-ferry:end", (event) => {
  const item = event.target.closest(".job");
  const link = item && item.querySelector(".job__download");
  if (!link) return;
  const url = event.detail.download_url;
  if (url) link.href = url;
  link.hidden = !url;
});
