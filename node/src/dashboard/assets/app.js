// kaapana-node dashboard: the only script. It keeps the live parts of a page current (a
// server-sent event stream of the node's events; the marked part is fetched again as HTML
// when an event concerns it), reads chosen files into their text areas, and asks before
// destructive actions. Everything else is plain HTML forms.
"use strict";

(function () {
  // File inputs: <input type=file data-file-into="ID"> copies the file's text into #ID.
  // (Delegated: the live parts of a page are replaced as they update.)
  document.addEventListener("change", (e) => {
    const input = e.target;
    if (!(input instanceof HTMLInputElement) || !input.dataset.fileInto) return;
    const target = document.getElementById(input.dataset.fileInto);
    const file = input.files && input.files[0];
    if (!target || !file) return;
    file.text().then((text) => {
      target.value = text;
      target.dispatchEvent(new Event("input"));
    });
  });

  // Forms with data-confirm ask first.
  document.addEventListener("submit", (e) => {
    const form = e.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      e.preventDefault();
    }
  });

  // The live part: <div id="live" data-live="URL" data-events="prefix,prefix">.
  const live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  const prefixes = (live.dataset.events || "").split(",").filter((p) => p);
  let timer = null;
  let inFlight = false;
  let again = false;

  async function refresh() {
    if (inFlight) {
      again = true;
      return;
    }
    inFlight = true;
    try {
      const r = await fetch(live.dataset.live, {
        credentials: "same-origin",
        headers: { Accept: "text/html-fragment" },
      });
      if (r.status === 401) {
        window.location.reload(); // the session ended: the page sends to the login
        return;
      }
      if (r.ok) {
        const html = await r.text();
        // Do not disturb a form someone is typing into.
        if (!live.contains(document.activeElement) || document.activeElement === document.body) {
          live.innerHTML = html;
        } else {
          again = true;
        }
        live.dataset.updated = String(Date.now());
        document.dispatchEvent(new CustomEvent("kaapana:updated"));
      }
    } catch (e) {
      // The node is restarting; the event stream reconnects and refreshes again.
    } finally {
      inFlight = false;
      if (again) {
        again = false;
        schedule(500);
      }
    }
  }

  function schedule(delay) {
    if (timer) return;
    timer = setTimeout(() => {
      timer = null;
      refresh();
    }, delay);
  }

  const source = new EventSource("/ui/events");
  source.onmessage = (m) => {
    let event;
    try {
      event = JSON.parse(m.data);
    } catch (e) {
      return;
    }
    if (prefixes.length === 0 || prefixes.some((p) => event.kind.startsWith(p))) {
      schedule(200);
    }
  };
  // After a reconnect (the node restarted), catch up once.
  source.onopen = () => {
    live.dataset.stream = "open";
    schedule(0);
  };
})();
