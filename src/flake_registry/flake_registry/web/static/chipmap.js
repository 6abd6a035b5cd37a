// Chip map: the scan mosaic with flake markers; zoom with the wheel, pan by dragging.
// Zoomed out, each flake is a disc (the thinner, the bolder); zoomed in, its outline is drawn
// around it with a transparent inside, so the flake itself stays visible.
'use strict';
(function () {
  const svg = document.getElementById('chipmap');
  if (!svg) return;
  const NS = 'http://www.w3.org/2000/svg';
  const OUTLINE_ZOOM = 3;        // zoom factor from which flakes are outlined instead of covered
  const status = document.getElementById('chipmap-status');
  const scaleBar = document.getElementById('chipmap-scale-bar');
  const scaleText = document.getElementById('chipmap-scale-text');
  let home = null;
  let view = null;
  let metresPerUnit = null;

  function zoom() { return home ? home.w / view.w : 1; }

  function updateScale() {
    if (!metresPerUnit || !svg.getScreenCTM()) return;
    const bar = window.flakeScaleBar(metresPerUnit / svg.getScreenCTM().a, 140);
    scaleBar.style.width = `${bar.pixels.toFixed(1)}px`;
    scaleText.textContent = bar.text;
  }

  function setView(v) {
    view = v;
    svg.setAttribute('viewBox', `${v.x} ${v.y} ${v.w} ${v.h}`);
    updateScale();
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
  window.addEventListener('resize', updateScale);

  const scan = encodeURIComponent(svg.dataset.scan);
  let layer = null;
  let truncated = false;
  let overview = [];
  let overviewTotal = 0;
  let waferToView = null;
  let regionTimer = null;
  let regionNumber = 0;
  let drawnOutlines = false;

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

  // Zoomed in (or with more flakes than markers), load the visible region's flakes, outlined when zoomed.
  function scheduleRegion() {
    const outlined = zoom() >= OUTLINE_ZOOM;
    if (!truncated && !outlined) {
      if (drawnOutlines) {
        drawMarkers(overview, false);
        status.textContent = `${overview.length} of ${overviewTotal} flakes shown`;
      }
      return;
    }
    clearTimeout(regionTimer);
    regionTimer = setTimeout(() => {
      const number = ++regionNumber;
      const region = viewRegion().map((v) => v.toExponential(6)).join(',');
      fetch(`/api/chipmap?scan_id=${scan}&region=${region}&outlines=${outlined}`)
        .then((r) => r.json().then((body) => ({ok: r.ok, body})))
        .then(({ok, body}) => {
          if (ok && number === regionNumber) {
            drawMarkers(body.markers, body.outlines);
            status.textContent = `${body.markers.length} of ${body.total} flakes in view shown` +
              (body.outlines ? ', outlined' : '');
          }
        });
    }, 250);
  }
  svg.addEventListener('wheel', scheduleRegion);
  window.addEventListener('mouseup', scheduleRegion);
  svg.addEventListener('dblclick', () => { if (home) { setView(home); scheduleRegion(); } });

  function titled(element, m) {
    const title = document.createElementNS(NS, 'title');
    title.textContent = `${m.id}: ${m.material} ${m.layer_name}, ${m.thickness_nm} nm, score ${m.score.toFixed(2)}`;
    element.appendChild(title);
    element.dataset.id = m.id;
    return element;
  }

  function drawMarkers(markers, outlined) {
    if (layer) layer.remove();
    drawnOutlines = outlined;
    layer = document.createElementNS(NS, 'g');
    svg.appendChild(layer);
    for (const m of markers) {
      const a = document.createElementNS(NS, 'a');
      a.setAttribute('href', `/flakes/${encodeURIComponent(m.id)}`);
      a.addEventListener('click', (event) => { if (drag && drag.moved) event.preventDefault(); });
      let shape;
      if (outlined && m.outline) {
        shape = document.createElementNS(NS, 'polygon');
        shape.setAttribute('points', m.outline.map(([u, v]) => `${u},${v}`).join(' '));
      } else {
        shape = document.createElementNS(NS, 'circle');
        shape.setAttribute('cx', m.u); shape.setAttribute('cy', m.v);
        shape.setAttribute('r', outlined ? m.r * 1.35 : m.r);
      }
      shape.setAttribute('class', `marker material-${m.material} layer-${m.layer_class}${outlined ? ' outlined' : ''}`);
      // Outlined: a transparent inside that still takes clicks, so the flake under it stays visible.
      shape.setAttribute('fill', outlined ? '#000000' : m.colour);
      shape.setAttribute('fill-opacity', outlined ? 0 : m.fill);
      shape.setAttribute('stroke', m.colour);
      shape.setAttribute('stroke-width', outlined ? Math.max(1.5, m.stroke) : m.stroke);
      shape.setAttribute('vector-effect', 'non-scaling-stroke');
      a.appendChild(titled(shape, m));
      layer.appendChild(a);
    }
  }

  fetch(`/api/chipmap?scan_id=${scan}`)
    .then((r) => r.json().then((body) => ({ok: r.ok, body})))
    .then(({ok, body}) => {
      if (!ok) { status.textContent = window.flakeErrorText(body); return; }
      const b = body.view;
      const margin = 0.03 * Math.max(b.w, b.h);
      home = {x: b.x - margin, y: b.y - margin, w: b.w + 2 * margin, h: b.h + 2 * margin};
      metresPerUnit = body.metres_per_view_unit;
      setView(home);
      waferToView = body.to_view;
      truncated = body.markers.length < body.total;
      overview = body.markers;
      overviewTotal = body.total;
      if (body.mosaic) {
        const img = document.createElementNS(NS, 'image');
        img.setAttribute('href', body.mosaic.url);
        img.setAttribute('x', 0); img.setAttribute('y', 0);
        img.setAttribute('width', body.mosaic.width); img.setAttribute('height', body.mosaic.height);
        svg.appendChild(img);
      }
      drawMarkers(body.markers, false);
      status.textContent = `${body.markers.length} of ${body.total} flakes shown`;
    })
    .catch((error) => { status.textContent = `could not load the map: ${error}`; });
})();
