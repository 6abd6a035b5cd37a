// Chip map: the scan mosaic with flake markers; zoom with the wheel, pan by dragging.
'use strict';
(function () {
  const svg = document.getElementById('chipmap');
  if (!svg) return;
  const NS = 'http://www.w3.org/2000/svg';
  const status = document.getElementById('chipmap-status');
  let home = null;
  let view = null;

  function setView(v) {
    view = v;
    svg.setAttribute('viewBox', `${v.x} ${v.y} ${v.w} ${v.h}`);
  }

  // Client (screen) point -> view-box coordinates; the CTM accounts for the letterboxing
  // that keeps the map's aspect ratio inside a box of another shape.
  function clientToView(clientX, clientY) {
    const point = svg.createSVGPoint();
    point.x = clientX; point.y = clientY;
    return point.matrixTransform(svg.getScreenCTM().inverse());
  }

  svg.addEventListener('wheel', (event) => {
    event.preventDefault();
    const p = clientToView(event.clientX, event.clientY);
    const k = event.deltaY < 0 ? 0.8 : 1.25;
    setView({x: p.x - (p.x - view.x) * k, y: p.y - (p.y - view.y) * k, w: view.w * k, h: view.h * k});
  }, {passive: false});

  let drag = null;
  svg.addEventListener('mousedown', (event) => {
    drag = {x: event.clientX, y: event.clientY, view: view, scale: svg.getScreenCTM().a, moved: false};
  });
  window.addEventListener('mousemove', (event) => {
    if (!drag) return;
    const dx = (event.clientX - drag.x) / drag.scale;
    const dy = (event.clientY - drag.y) / drag.scale;
    if (Math.abs(event.clientX - drag.x) + Math.abs(event.clientY - drag.y) > 3) drag.moved = true;
    setView({x: drag.view.x - dx, y: drag.view.y - dy, w: drag.view.w, h: drag.view.h});
  });
  window.addEventListener('mouseup', () => { setTimeout(() => { drag = null; }, 0); });
  svg.addEventListener('dblclick', () => { if (home) setView(home); });

  const scan = encodeURIComponent(svg.dataset.scan);
  let layer = null;
  let truncated = false;
  let waferToView = null;
  let regionTimer = null;
  let regionNumber = 0;

  // The wafer rectangle [m] under the current view box (inverse of the wafer -> view map).
  function viewRegion() {
    const [a, b, c, d, e, f] = waferToView;
    const det = a * e - b * d;
    const box = svg.getBoundingClientRect();
    const corners = [[box.left, box.top], [box.right, box.top], [box.left, box.bottom], [box.right, box.bottom]]
      .map(([cx, cy]) => clientToView(cx, cy)).map(({x: u, y: v}) => [
      (e * (u - c) - b * (v - f)) / det, (-d * (u - c) + a * (v - f)) / det]);
    const xs = corners.map((p) => p[0]), ys = corners.map((p) => p[1]);
    return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
  }

  // With more flakes than markers, zooming in loads the best flakes of the visible region.
  function scheduleRegion() {
    if (!truncated) return;
    clearTimeout(regionTimer);
    regionTimer = setTimeout(() => {
      const number = ++regionNumber;
      const region = viewRegion().map((v) => v.toExponential(6)).join(',');
      fetch(`/api/chipmap?scan_id=${scan}&region=${region}`)
        .then((r) => r.json().then((body) => ({ok: r.ok, body})))
        .then(({ok, body}) => {
          if (ok && number === regionNumber) {
            drawMarkers(body.markers);
            status.textContent = `${body.markers.length} of ${body.total} flakes in view shown`;
          }
        });
    }, 300);
  }
  svg.addEventListener('wheel', scheduleRegion);
  window.addEventListener('mouseup', scheduleRegion);

  function drawMarkers(markers) {
    if (layer) layer.remove();
    layer = document.createElementNS(NS, 'g');
    svg.appendChild(layer);
    for (const m of markers) {
      const a = document.createElementNS(NS, 'a');
      a.setAttribute('href', `/flakes/${encodeURIComponent(m.id)}`);
      a.addEventListener('click', (event) => { if (drag && drag.moved) event.preventDefault(); });
      const c = document.createElementNS(NS, 'circle');
      c.setAttribute('cx', m.u); c.setAttribute('cy', m.v); c.setAttribute('r', m.r);
      c.setAttribute('class', `marker material-${m.material} layer-${m.layer_class}`);
      c.setAttribute('fill', m.colour);
      c.setAttribute('fill-opacity', m.fill);
      c.setAttribute('stroke', m.colour);
      c.setAttribute('stroke-width', m.stroke);
      c.setAttribute('vector-effect', 'non-scaling-stroke');
      c.dataset.id = m.id;
      const title = document.createElementNS(NS, 'title');
      title.textContent = `${m.id}: ${m.material} ${m.layer_name}, score ${m.score.toFixed(2)}`;
      c.appendChild(title);
      a.appendChild(c);
      layer.appendChild(a);
    }
  }

  fetch(`/api/chipmap?scan_id=${scan}`)
    .then((r) => r.json().then((body) => ({ok: r.ok, body})))
    .then(({ok, body}) => {
      if (!ok) { status.textContent = body.error ? body.error.message : 'could not load the map'; return; }
      const b = body.view;
      const margin = 0.03 * Math.max(b.w, b.h);
      home = {x: b.x - margin, y: b.y - margin, w: b.w + 2 * margin, h: b.h + 2 * margin};
      setView(home);
      waferToView = body.to_view;
      truncated = body.markers.length < body.total;
      if (body.mosaic) {
        const img = document.createElementNS(NS, 'image');
        img.setAttribute('href', body.mosaic.url);
        img.setAttribute('x', 0); img.setAttribute('y', 0);
        img.setAttribute('width', body.mosaic.width); img.setAttribute('height', body.mosaic.height);
        svg.appendChild(img);
      }
      drawMarkers(body.markers);
      status.textContent = `${body.markers.length} of ${body.total} flakes shown`;
    })
    .catch((error) => { status.textContent = `could not load the map: ${error}`; });
})();
