// The upload page, enhanced. Without this script the form posts and the server renders the
// result page; with it the same request goes in the background (so drop and paste work and a
// busy indicator shows), and the result gets an opacity slider, an interactive legend and the
// name of the class under the pointer, read from the class-id PNG.
"use strict";

const DIMMED = 0.3; // brightness of the pixels outside the highlighted class
const BLACK = [0, 0, 0];

document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form[data-enhance]");
  if (form) {
    enhanceForm(form);
  }
  enhanceResult(document.getElementById("result"));
});

function enhanceForm(form) {
  const input = form.querySelector("input[type=file]");
  form.querySelector(".hint").hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(form);
  });
  // Files dropped anywhere on the page, or pasted, go into the form's own field and are sent.
  const take = (files) => {
    if (!files || files.length === 0) {
      return false;
    }
    const transfer = new DataTransfer();
    transfer.items.add(files[0]);
    input.files = transfer.files;
    form.requestSubmit();
    return true;
  };
  document.addEventListener("dragover", (event) => {
    if (event.dataTransfer && event.dataTransfer.types.includes("Files")) {
      event.preventDefault(); // allows the drop
      form.classList.add("dragging");
    }
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) { // left the window
      form.classList.remove("dragging");
    }
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault(); // never let the browser navigate to the dropped file
    form.classList.remove("dragging");
    take(event.dataTransfer && event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    if (take(event.clipboardData && event.clipboardData.files)) {
      event.preventDefault();
    }
  });
}

async function send(form) {
  const body = new FormData(form); // before the controls are disabled, which would leave them out
  const file = body.get("file");
  setBusy(form, true, file && file.name ? `Segmenting ${file.name}…` : "Segmenting…");
  try {
    const response = await fetch(form.action, { method: "POST", body });
    // The server answers with the whole page, as to the plain form: take its result and message.
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const error = page.getElementById("error");
    const result = page.getElementById("result");
    if (error || !response.ok || !result) {
      showResult(null);
      showError(error ? error.textContent : `the service answered ${response.status} ${response.statusText}`);
    } else {
      showError(null);
      showResult(document.adoptNode(result));
    }
  } catch (failure) {
    showError(`could not reach the service (${failure.message})`);
  } finally {
    setBusy(form, false, "");
  }
}

function setBusy(form, busy, text) {
  form.setAttribute("aria-busy", String(busy));
  for (const control of form.querySelectorAll("input, button")) {
    control.disabled = busy;
  }
  document.getElementById("busy-text").textContent = text;
  document.getElementById("busy").hidden = !busy;
}

function showError(message) {
  const messages = document.getElementById("messages");
  messages.replaceChildren();
  if (message) {
    const paragraph = document.createElement("p");
    paragraph.id = "error";
    paragraph.className = "error";
    paragraph.setAttribute("role", "alert");
    paragraph.textContent = message;
    messages.append(paragraph);
  }
}

function showResult(section) {
  const fresh = section || Object.assign(document.createElement("section"), { id: "result" });
  document.getElementById("result").replaceWith(fresh);
  enhanceResult(fresh);
}

async function enhanceResult(section) {
  const legend = section.querySelector("#legend");
  const photo = section.querySelector("#photo");
  if (!legend || !photo) {
    return;
  }
  const rows = [...legend.querySelectorAll("tr[data-class-id]")];
  const classes = rows.map((row) => ({
    row,
    id: Number(row.dataset.classId),
    name: row.querySelector(".name").textContent,
    colour: [1, 3, 5].map((at) => parseInt(row.dataset.colour.slice(at, at + 2), 16)),
  }));
  let photoPixels;
  let maskPixels;
  try {
    [photoPixels, maskPixels] = await Promise.all([pixelsOf(photo.src), pixelsOf(legend.dataset.maskUrl)]);
  } catch {
    return; // the images are still shown as the server made them
  }
  const view = new ResultView(section, classes, photoPixels, classIndex(maskPixels, classes));
  view.connect(photo, rows);
  for (const hint of section.querySelectorAll("[hidden].controls, [hidden].hint")) {
    hint.hidden = false;
  }
}

async function pixelsOf(url) {
  // The load event, not image.decode(): Chromium may reject decode() for an image that loads
  // (a cancelled decode is an EncodingError), and the page would then silently stay plain; a CI
  // run under load waited 60 s for a result canvas that never came.
  const image = await new Promise((resolve, reject) => {
    const loading = new Image();
    loading.onload = () => resolve(loading);
    loading.onerror = () => reject(new Error(`could not load ${url}`));
    loading.src = url;
  });
  const canvas = Object.assign(document.createElement("canvas"), { width: image.naturalWidth, height: image.naturalHeight });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

// Per pixel, the index in `classes` of its class (-1: a colour the legend does not list). The PNG
// holds class ids with the palette attached; a canvas gives back the palette colours, and those
// are distinct for every id, so the legend's colours lead back to the classes.
function classIndex(maskPixels, classes) {
  const byColour = new Map(classes.map((entry, k) => [(entry.colour[0] << 16) | (entry.colour[1] << 8) | entry.colour[2], k]));
  const data = maskPixels.data;
  const index = new Int16Array(maskPixels.width * maskPixels.height);
  for (let i = 0, j = 0; i < index.length; i++, j += 4) {
    const found = byColour.get((data[j] << 16) | (data[j + 1] << 8) | data[j + 2]);
    index[i] = found === undefined ? -1 : found;
  }
  return index;
}

class ResultView {
  constructor(section, classes, photoPixels, index) {
    this.classes = classes;
    this.photo = photoPixels.data;
    this.index = index;
    this.width = photoPixels.width;
    this.height = photoPixels.height;
    this.slider = section.querySelector("#opacity");
    this.caption = section.querySelector("#pointer-class");
    this.hovered = -1;
    this.selected = -1;
    this.pending = false;
    this.canvas = Object.assign(document.createElement("canvas"), { id: "result-canvas", width: this.width, height: this.height });
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", "segmentation overlay");
    const overlay = section.querySelector("#result-image");
    overlay.after(this.canvas);
    overlay.hidden = true;
    this.context = this.canvas.getContext("2d");
    this.paint();
  }

  connect(photo, rows) {
    this.slider.addEventListener("input", () => this.update());
    rows.forEach((row, k) => {
      row.tabIndex = 0;
      row.setAttribute("aria-selected", "false");
      row.addEventListener("mouseenter", () => { this.hovered = k; this.update(); });
      row.addEventListener("mouseleave", () => { this.hovered = -1; this.update(); });
      row.addEventListener("click", () => this.toggle(k));
      row.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          this.toggle(k);
        }
      });
    });
    for (const surface of [this.canvas, photo]) {
      surface.addEventListener("mousemove", (event) => this.name(event));
      surface.addEventListener("click", (event) => this.name(event)); // a tap, on touch screens
      surface.addEventListener("mouseleave", () => this.name(null));
    }
  }

  toggle(k) {
    this.selected = this.selected === k ? -1 : k;
    this.classes.forEach((entry, n) => entry.row.setAttribute("aria-selected", String(n === this.selected)));
    this.update();
  }

  name(event) {
    let k = -1;
    if (event) {
      const surface = event.currentTarget;
      const x = Math.min(this.width - 1, Math.floor((event.offsetX * this.width) / surface.clientWidth));
      const y = Math.min(this.height - 1, Math.floor((event.offsetY * this.height) / surface.clientHeight));
      k = this.index[y * this.width + Math.max(0, x)];
    }
    this.caption.textContent = k >= 0 ? this.classes[k].name : "";
    this.classes.forEach((entry, n) => entry.row.classList.toggle("pointed", n === k));
  }

  update() {
    if (!this.pending) { // at most one repaint per frame, however fast the slider moves
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.paint();
      });
    }
  }

  // The photo with each class's colour blended in at the slider's opacity, background left as
  // the photo (as the server's overlay); with a class highlighted, only that class is coloured
  // and the rest is dimmed.
  paint() {
    const alpha = Number(this.slider.value) / 100;
    const shown = this.hovered >= 0 ? this.hovered : this.selected;
    const colours = this.classes.map((entry) => entry.colour);
    const tinted = this.classes.map((entry) => entry.id !== 0);
    const out = this.context.createImageData(this.width, this.height);
    const data = out.data;
    const photo = this.photo;
    for (let i = 0, j = 0; i < this.index.length; i++, j += 4) {
      const k = this.index[i];
      const outside = shown >= 0 && k !== shown;
      const a = k >= 0 && tinted[k] && !outside ? alpha : 0;
      const light = outside ? DIMMED : 1;
      const colour = colours[k] || BLACK; // unlisted colours (k = -1) are never tinted
      data[j] = light * (photo[j] + a * (colour[0] - photo[j]));
      data[j + 1] = light * (photo[j + 1] + a * (colour[1] - photo[j + 1]));
      data[j + 2] = light * (photo[j + 2] + a * (colour[2] - photo[j + 2]));
      data[j + 3] = 255;
    }
    this.context.putImageData(out, 0, 0);
  }
}
