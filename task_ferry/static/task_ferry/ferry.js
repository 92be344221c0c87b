/*
 * django-task-ferry browser client. No dependencies, no build step.
 *
 * As a classic script it defines the global `TaskFerry` and the <task-ferry-progress> element;
 * ferry.mjs re-exports the same API as an ES module. See docs/javascript.md.
 */
(function () {
  "use strict";

  const TERMINAL_STATES = Object.freeze(["finished", "failed", "cancelled"]);
  const DEFAULT_BASE = "/api/jobs/";
  // Answers that say the server did not act on the request (it came too slowly, too early, too
  // often): worth sending again, even a request that must not run twice. Any other 4xx is
  // final (gone, forbidden, bad id).
  const RETRYABLE_CLIENT_ERRORS = new Set([408, 425, 429]);

  const DEFAULTS = Object.freeze({
    base: DEFAULT_BASE,
    sse: true,
    pollInterval: 1000,
    backoffBase: 1000,
    backoffMax: 30000,
    // Failed stream reconnections in a row before we settle for polling.
    maxStreamRetries: 5,
    // Event streams open at once on the page; HTTP/1.1 allows six connections per host.
    maxStreams: 4,
    credentials: "same-origin",
    csrfCookieName: "csrftoken",
    csrfHeaderName: "X-CSRFToken",
    csrfToken: null,
    onUpdate: null,
    onEnd: null,
    onError: null,
    onRetry: null,
  });

  class TaskFerryError extends Error {
    constructor(message, { status = 0, data = null, retryable = false } = {}) {
      super(message);
      this.name = "TaskFerryError";
      this.status = status;
      this.data = data;
      this.retryable = retryable;
    }
  }

  // Event streams this page holds open, across all followers.
  let openStreams = 0;

  function isTerminal(state) {
    return TERMINAL_STATES.includes(state);
  }

  function jobUrl(base, jobId, suffix) {
    const root = base.endsWith("/") ? base : base + "/";
    return root + encodeURIComponent(String(jobId)) + "/" + (suffix || "");
  }

  function getCookie(name) {
    const prefix = name + "=";
    for (const part of (typeof document === "undefined" ? "" : document.cookie).split(";")) {
      const item = part.trim();
      if (item.startsWith(prefix)) return decodeURIComponent(item.slice(prefix.length));
    }
    return null;
  }

  function csrfToken(options) {
    if (options.csrfToken) return options.csrfToken;
    const fromCookie = getCookie(options.csrfCookieName);
    if (fromCookie) return fromCookie;
    // CSRF_COOKIE_HTTPONLY hides the cookie; a {% csrf_token %} field on the page still works.
    const field = typeof document === "undefined"
      ? null
      : document.querySelector("input[name=csrfmiddlewaretoken], meta[name=csrf-token]");
    return field ? field.value || field.content || null : null;
  }

  /** Exponential backoff with "equal jitter": half the delay fixed, half random. */
  function backoffDelay(attempt, base, max) {
    const ceiling = Math.min(max, base * 2 ** Math.max(0, attempt - 1));
    return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  }

  function retryAfterMs(response) {
    const value = response.headers.get("Retry-After");
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
  }

  async function readBody(response) {
    const text = await response.text();
    try {
      return text ? JSON.parse(text) : null;
    } catch (_) {
      return text;
    }
  }

  function errorMessage(status, data) {
    if (data && typeof data === "object" && typeof data.detail === "string") return data.detail;
    return "The server answered HTTP " + status + ".";
  }

  /**
   * Whether a request that failed is worth sending again. Any 5xx for a request that may run
   * twice (a proxy's or CDN's own too, Cloudflare's 520 to 524). One that must not (creating a
   * job) may have been acted on before a 500 or a router's timeout: only a 503 with
   * Retry-After, the server refusing for now.
   */
  function retryableStatus(status, retryAfter, idempotent) {
    if (RETRYABLE_CLIENT_ERRORS.has(status)) return true;
    if (status < 500) return false;
    return idempotent || (status === 503 && retryAfter !== null);
  }

  async function request(url, options, init, idempotent = true) {
    let response;
    try {
      response = await fetch(url, Object.assign({ credentials: options.credentials }, init));
    } catch (exc) {
      // No answer: the request may still have reached the server and been acted on.
      throw new TaskFerryError("Network error: " + exc.message, { retryable: idempotent });
    }
    const data = await readBody(response).catch(() => null);
    if (!response.ok) {
      const retryAfter = retryAfterMs(response);
      const error = new TaskFerryError(errorMessage(response.status, data), {
        status: response.status,
        data: data,
        retryable: retryableStatus(response.status, retryAfter, idempotent),
      });
      error.retryAfter = retryAfter;
      throw error;
    }
    if (data === null || typeof data !== "object") {
      // A login page after a redirect, or an `api` that points at a page: retrying cannot help.
      const message = "The server did not answer with JSON (HTTP " + response.status + ").";
      throw new TaskFerryError(message, { status: response.status, data: data });
    }
    return data;
  }

  function post(url, body, options, idempotent) {
    const headers = { Accept: "application/json", "Content-Type": "application/json" };
    const token = csrfToken(options);
    if (token) headers[options.csrfHeaderName] = token;
    const init = { method: "POST", headers: headers };
    if (body !== undefined) init.body = JSON.stringify(body);
    return request(url, options, init, idempotent);
  }

  /** GET <base><id>/: the job's current snapshot. */
  function fetchJob(jobId, options) {
    const opts = Object.assign({}, DEFAULTS, options);
    return request(jobUrl(opts.base, jobId), opts, { headers: { Accept: "application/json" } });
  }

  /**
   * POST <base>: start a job of `type` with the type's own `values`. Resolves to the job.
   * Only types with api_create = True can be started; others answer 400.
   */
  function startJob(type, values, options) {
    const opts = Object.assign({}, DEFAULTS, options);
    // Not idempotent: sent again after a failure, it could start a second job.
    return post(opts.base, Object.assign({}, values, { type: type }), opts, false);
  }

  /** POST <base><id>/cancel/ with the CSRF token. Resolves to the job as the server sees it. */
  function cancelJob(jobId, options) {
    const opts = Object.assign({}, DEFAULTS, options);
    // Cancelling a cancelled or ended job changes nothing: safe to send again.
    return post(jobUrl(opts.base, jobId, "cancel/"), undefined, opts, true);
  }

  /**
   * Follows one job until it ends: by Server-Sent Events from <base><id>/events/ when the
   * server offers them, else by polling <base><id>/. Network errors are retried with
   * exponential backoff and jitter. Returns { stop(), done, mode }; `done` resolves with the
   * final job, or rejects with a TaskFerryError that retrying cannot fix (e.g. 404).
   */
  function followJob(jobId, options) {
    const opts = Object.assign({}, DEFAULTS, options);
    const follower = new JobFollower(jobId, opts);
    follower.start();
    return follower;
  }

  class JobFollower {
    constructor(jobId, options) {
      this.jobId = jobId;
      this.options = options;
      this.mode = options.sse && typeof EventSource !== "undefined" ? "sse" : "poll";
      this.job = null;
      this.stopped = false;
      this._failures = 0;
      this._streamFailures = 0;
      this._streamed = false;
      this._timer = null;
      // What the timer will call, and whether the server asked for the wait (Retry-After).
      this._waiting = null;
      this._serverWait = false;
      this._onWake = (event) => this._wake(event);
      this._source = null;
      this._controller = null;
      this.done = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      // A caller that only uses callbacks must not see unhandled rejections.
      this.done.catch(() => {});
    }

    start() {
      this._listen(true);
      if (this.mode === "sse") this._openStream();
      else this._poll();
    }

    stop() {
      this.stopped = true;
      this._listen(false);
      clearTimeout(this._timer);
      this._closeStream();
      if (this._controller) this._controller.abort();
    }

    _closeStream() {
      if (!this._source) return;
      this._source.close();
      this._source = null;
      openStreams -= 1;
    }

    _schedule(callback, delay, serverWait = false) {
      clearTimeout(this._timer);
      this._waiting = callback;
      this._serverWait = serverWait;
      this._timer = setTimeout(() => {
        this._waiting = null;
        if (!this.stopped) callback.call(this);
      }, delay);
    }

    _listen(on) {
      if (typeof window === "undefined" || typeof document === "undefined") return;
      const method = on ? "addEventListener" : "removeEventListener";
      document[method]("visibilitychange", this._onWake);
      window[method]("online", this._onWake);
    }

    /**
     * Browsers run the timers of a hidden tab about once a minute, and a backoff after a
     * network outage may still have seconds to go when the network is back: when the page is
     * shown again or the browser is back online, what was waiting runs now. Not a wait the
     * server asked for.
     */
    _wake(event) {
      if (this.stopped || !this._waiting || this._serverWait) return;
      if (event.type === "visibilitychange" && document.visibilityState !== "visible") return;
      this._schedule(this._waiting, 0);
    }

    _update(job) {
      if (this.stopped || !job || typeof job !== "object" || !job.state) return;
      this.job = job;
      if (this.options.onUpdate) this.options.onUpdate(job);
      if (isTerminal(job.state)) {
        this.stop();
        if (this.options.onEnd) this.options.onEnd(job);
        this._resolve(job);
      }
    }

    _fail(error) {
      this.stop();
      if (this.options.onError) this.options.onError(error);
      this._reject(error);
    }

    _openStream() {
      if (openStreams >= this.options.maxStreams) {
        // Other jobs hold the streams we allow: poll, and try again after the poll interval.
        this._poll();
        return;
      }
      const source = new EventSource(jobUrl(this.options.base, this.jobId, "events/"), {
        withCredentials: this.options.credentials === "include",
      });
      this._source = source;
      openStreams += 1;
      // Events since the last error: a stream that delivered and then closed is normal
      // (bounded lifetime, or the server's poll-through-SSE fallback under WSGI).
      let delivered = false;
      source.addEventListener("job", (event) => {
        let job;
        try {
          job = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        delivered = true;
        this._streamed = true;
        this._streamFailures = 0;
        this._update(job);
      });
      source.addEventListener("end", () => {
        if (this.stopped || this._source !== source) {
          source.close();
          return;
        }
        // The final `job` event normally came first; if not, fetch the final job.
        this._closeStream();
        this._poll();
      });
      source.addEventListener("reconnect", () => {
        // The server lost Redis for longer than it waits: poll now to bridge the gap, then
        // reopen the stream after a backoff (answered by polling until Redis is back).
        if (this.stopped || this._source !== source) {
          source.close();
          return;
        }
        this._closeStream();
        this._streamFailures += 1;
        this._poll();
      });
      source.addEventListener("error", () => {
        if (this.stopped || this._source !== source) return;
        if (delivered && source.readyState === EventSource.CONNECTING) {
          // Let the browser reconnect after the server's `retry:` delay.
          delivered = false;
          return;
        }
        this._closeStream();
        // Never a single event: the server has no stream for us (404, proxy, old server).
        if (!this._streamed) this.mode = "poll";
        this._streamFailures += 1;
        if (this._streamFailures > this.options.maxStreamRetries) this.mode = "poll";
        // Poll now: it reports a final error (404), retries with backoff, or reopens.
        this._poll();
      });
    }

    async _poll() {
      this._controller = typeof AbortController === "undefined" ? null : new AbortController();
      let job;
      try {
        job = await request(jobUrl(this.options.base, this.jobId), this.options, {
          headers: { Accept: "application/json" },
          signal: this._controller ? this._controller.signal : undefined,
        });
      } catch (error) {
        if (this.stopped) return;
        if (!error.retryable) {
          this._fail(error);
          return;
        }
        this._failures += 1;
        const backoff = backoffDelay(
          this._failures,
          this.options.backoffBase,
          this.options.backoffMax,
        );
        const delay = Math.max(error.retryAfter || 0, backoff);
        if (this.options.onRetry) {
          this.options.onRetry({ attempt: this._failures, delay: delay, error: error });
        }
        this._schedule(this._poll, delay, delay > backoff);
        return;
      }
      this._failures = 0;
      this._update(job);
      if (this.stopped) return;
      if (this.mode === "sse") {
        // A stream that broke is reopened after a backoff; the poll just bridged the gap.
        const failures = this._streamFailures;
        let delay = 0;
        if (failures) {
          delay = backoffDelay(failures, this.options.backoffBase, this.options.backoffMax);
        } else if (openStreams >= this.options.maxStreams) {
          delay = this.options.pollInterval;
        }
        this._schedule(this._openStream, delay);
      } else {
        this._schedule(this._poll, this.options.pollInterval);
      }
    }
  }

  function formatState(job) {
    return job && job.state ? job.state : "";
  }

  function el(tag, className, attributes) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    return node;
  }

  /** Write text only when it differs: rewriting a live region's text can announce it again. */
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  const HTMLElementBase = typeof HTMLElement === "undefined" ? class {} : HTMLElement;

  /**
   * <task-ferry-progress job-id="17" api="/api/jobs/"> renders an accessible progress bar
   * for one job and follows it until it ends. Optional attributes: state, percentage,
   * progress-state and human-readable-error (a server-rendered starting point; an ended state
   * makes no request), no-cancel, no-sse, poll-interval (ms), max-streams, label. Fires
   * task-ferry:update, task-ferry:end and task-ferry:error (detail: the job, or the error).
   */
  class ProgressElement extends HTMLElementBase {
    static get observedAttributes() {
      return ["job-id", "api"];
    }

    constructor() {
      super();
      this.job = null;
      this._follower = null;
      this._built = false;
      this._cancelling = false;
      this._cancelError = null;
      // The `state` attribute as this element last wrote it, to tell it from a starting point.
      this._writtenState = null;
    }

    get jobId() {
      return this.getAttribute("job-id");
    }

    get base() {
      return this.getAttribute("api") || DEFAULT_BASE;
    }

    connectedCallback() {
      if (!this._built) this._build();
      this._applyLabel();
      if (!this.job) {
        const state = this.getAttribute("state") || "pending";
        this._render({
          id: this.jobId,
          state: state,
          progress_percentage: Number(this.getAttribute("percentage")) || 0,
          progress_state: this.getAttribute("progress-state") || "",
          human_readable_error: this.getAttribute("human-readable-error") || "",
        });
      }
      if (!isTerminal(this.job.state)) this._follow();
    }

    disconnectedCallback() {
      this._unfollow();
    }

    attributeChangedCallback(name, oldValue, newValue) {
      if (oldValue === newValue || !this._built) return;
      // The previous job's state is no starting point for another job.
      if (name === "job-id" && this.getAttribute("state") === this._writtenState) {
        this.removeAttribute("state");
      }
      this.job = null;
      this._cancelling = false;
      this._cancelError = null;
      this._showError(null);
      this._unfollow();
      if (this.isConnected) this.connectedCallback();
    }

    /** Ask the server to cancel this job. Resolves to the job as the server answered. */
    async cancel() {
      if (this._cancelling || !this.job || isTerminal(this.job.state)) return this.job;
      const jobId = this.jobId;
      this._cancelling = true;
      this._cancelError = null;
      this._render(this.job);
      try {
        const { base, csrfCookieName, csrfHeaderName } = this._options();
        const job = await cancelJob(jobId, { base, csrfCookieName, csrfHeaderName });
        // The element was given another job meanwhile: this answer is not about it.
        if (this.jobId !== jobId) return job;
        this._showError(null);
        // A running job's answer comes from the database, with stale numbers: keep ours.
        if (isTerminal(job.state)) this._receive(job);
        else if (!this._follower && this.isConnected) this._follow();
        return job;
      } catch (error) {
        if (this.jobId !== jobId) throw error;
        this._cancelling = false;
        // Kept until the next cancel, so the next progress update does not wipe it at once.
        this._cancelError = "Could not cancel: " + error.message;
        this._showError(this._cancelError);
        this._render(this.job);
        throw error;
      }
    }

    _options() {
      const interval = Number(this.getAttribute("poll-interval"));
      // An empty or unreadable attribute keeps the default; 0 is a number the page chose.
      const maxStreams = this.getAttribute("max-streams");
      const streams = maxStreams === null || maxStreams.trim() === "" ? NaN : Number(maxStreams);
      return {
        base: this.base,
        sse: !this.hasAttribute("no-sse"),
        pollInterval: interval > 0 ? interval : DEFAULTS.pollInterval,
        maxStreams: streams >= 0 ? streams : DEFAULTS.maxStreams,
        // A project's own CSRF_COOKIE_NAME and CSRF_HEADER_NAME, which the page cannot guess.
        csrfCookieName: this.getAttribute("csrf-cookie-name") || DEFAULTS.csrfCookieName,
        csrfHeaderName: this.getAttribute("csrf-header-name") || DEFAULTS.csrfHeaderName,
        onUpdate: (job) => this._receive(job),
        onError: (error) => {
          this._follower = null;
          this._showError(error.status === 404 ? "This job does not exist." : error.message);
          this._emit("task-ferry:error", error);
        },
        onRetry: ({ delay }) => {
          this._showError("Connection lost; retrying in " + Math.ceil(delay / 1000) + " s.");
        },
      };
    }

    _follow() {
      if (!this.jobId) return;
      this._follower = followJob(this.jobId, this._options());
    }

    _unfollow() {
      if (this._follower) this._follower.stop();
      this._follower = null;
    }

    _receive(job) {
      const ended = this.job && isTerminal(this.job.state);
      if (ended) return;
      // A failed cancel is old news once the job has ended.
      if (isTerminal(job.state)) this._cancelError = null;
      this._showError(this._cancelError);
      this._render(job);
      this._emit("task-ferry:update", job);
      if (isTerminal(job.state)) {
        this._unfollow();
        this._emit("task-ferry:end", job);
      }
    }

    _emit(name, detail) {
      this.dispatchEvent(new CustomEvent(name, { detail: detail, bubbles: true }));
    }

    _build() {
      this._built = true;
      this.classList.add("tf-progress");
      this._track = el("div", "tf-progress__track", {
        role: "progressbar",
        "aria-valuemin": "0",
        "aria-valuemax": "100",
      });
      this._fill = el("div", "tf-progress__fill");
      this._track.append(this._fill);
      const meta = el("div", "tf-progress__meta");
      this._percentage = el("span", "tf-progress__percentage");
      this._label = el("span", "tf-progress__label");
      this._state = el("span", "tf-progress__state", { "aria-live": "polite" });
      this._button = el("button", "tf-progress__cancel", { type: "button" });
      this._button.addEventListener("click", () => this.cancel().catch(() => {}));
      meta.append(this._percentage, this._label, this._state);
      if (!this.hasAttribute("no-cancel")) meta.append(this._button);
      this._error = el("p", "tf-progress__error", { role: "alert" });
      this._error.hidden = true;
      this.replaceChildren(this._track, meta, this._error);
    }

    _applyLabel() {
      const label = this.getAttribute("label") || "Job " + this.jobId;
      this._track.setAttribute("aria-label", label);
      this._button.setAttribute("aria-label", "Cancel " + label);
    }

    _render(job) {
      this.job = job;
      const percentage = Math.max(0, Math.min(100, Math.round(job.progress_percentage || 0)));
      const ended = isTerminal(job.state);
      this._writtenState = job.state;
      this.setAttribute("state", job.state);
      this._fill.style.width = percentage + "%";
      this._track.setAttribute("aria-valuenow", String(percentage));
      this._track.setAttribute(
        "aria-valuetext",
        percentage + "%" + (job.progress_state ? ", " + job.progress_state : "") + ", " + job.state,
      );
      this._track.setAttribute("aria-busy", ended ? "false" : "true");
      setText(this._percentage, percentage + "%");
      setText(this._label, job.progress_state || "");
      setText(this._state, formatState(job));
      this._state.dataset.state = job.state;
      this._button.hidden = ended;
      this._button.disabled = this._cancelling;
      setText(this._button, this._cancelling ? "Cancelling…" : "Cancel");
      if (ended && job.state === "failed") {
        this._showError(job.human_readable_error || job.error || "The job failed.");
      }
    }

    _showError(message) {
      setText(this._error, message || "");
      this._error.hidden = !message;
    }
  }

  if (typeof customElements !== "undefined" && !customElements.get("task-ferry-progress")) {
    customElements.define("task-ferry-progress", ProgressElement);
  }

  /** Put a <task-ferry-progress> for `jobId` into `container` and return it. */
  function mountProgress(container, jobId, options) {
    const opts = options || {};
    const element = document.createElement("task-ferry-progress");
    element.setAttribute("job-id", String(jobId));
    element.setAttribute("api", opts.base || DEFAULT_BASE);
    if (opts.sse === false) element.setAttribute("no-sse", "");
    if (opts.cancel === false) element.setAttribute("no-cancel", "");
    if (opts.pollInterval) element.setAttribute("poll-interval", String(opts.pollInterval));
    if (opts.maxStreams !== undefined) element.setAttribute("max-streams", String(opts.maxStreams));
    if (opts.label) element.setAttribute("label", opts.label);
    if (opts.csrfCookieName) element.setAttribute("csrf-cookie-name", opts.csrfCookieName);
    if (opts.csrfHeaderName) element.setAttribute("csrf-header-name", opts.csrfHeaderName);
    if (opts.job) {
      element.setAttribute("state", opts.job.state);
      element.setAttribute("percentage", String(opts.job.progress_percentage || 0));
      element.setAttribute("progress-state", opts.job.progress_state || "");
      // A job that failed as it was created (an unreachable queue, an inline executor).
      if (opts.job.human_readable_error) {
        element.setAttribute("human-readable-error", opts.job.human_readable_error);
      }
    }
    container.append(element);
    return element;
  }

  globalThis.TaskFerry = Object.freeze({
    TERMINAL_STATES: TERMINAL_STATES,
    TaskFerryError: TaskFerryError,
    ProgressElement: ProgressElement,
    isTerminal: isTerminal,
    getCookie: getCookie,
    backoffDelay: backoffDelay,
    fetchJob: fetchJob,
    startJob: startJob,
    cancelJob: cancelJob,
    followJob: followJob,
    mountProgress: mountProgress,
  });
})();
