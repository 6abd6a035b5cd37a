// Stack planner: find flakes by thickness and area, pick them layer by layer, rotate them,
// check coverage, reserve all at once. Each layer has its own colour (a shade of its
// material's colour) and dash pattern, sent by the server with the preview.
'use strict';
(function () {
  const NS = 'http://www.w3.org/2000/svg';
  const PAGE = 30;
  const layers = [];  // {flake_id, material, layer_class, thickness_nm, rotation_deg}
  const layersBox = document.getElementById('stack-layers');
  const svg = document.getElementById('stack-svg');
  const coverage = document.getElementById('coverage');
  const message = document.getElementById('planner-message');
  const reserveButton = document.getElementById('reserve-button');
  const moreButton = document.getElementById('more-button');
  const candidatesBox = document.getElementById('candidates');
  const summary = document.getElementById('search-summary');
  let searchPage = 1;
  let searchNumber = 0;

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? 'error-text' : 'notice';
  }

  function searchParams() {
    const [sortBy, direction] = document.getElementById('search-sort').value.split(':');
    const params = new URLSearchParams({statuses: 'available', sort_by: sortBy, limit: String(PAGE)});
    if (direction === 'asc') params.set('ascending', 'true');
    const fields = {material: 'search-material', layer_classes: 'search-layer',
      thickness_nm_min: 'search-thickness-min', thickness_nm_max: 'search-thickness-max',
      area_min_um2: 'search-area-min', area_max_um2: 'search-area-max'};
    for (const [name, id] of Object.entries(fields)) {
      const value = document.getElementById(id).value.trim();
      if (value) params.set(name, value);
    }
    // Thinnest first means the thinnest measured: flakes of unknown thickness are left out.
    if (sortBy === 'thickness' && !params.has('thickness_nm_min')) params.set('thickness_nm_min', '0.001');
    return params;
  }

  function candidateRow(f) {
    const row = document.createElement('div');
    row.className = 'row';
    row.dataset.flake = f.id;
    const thumb = document.createElement('img');
    thumb.src = `/flakes/${encodeURIComponent(f.id)}/thumb.png`;
    thumb.width = 64; thumb.height = 64; thumb.alt = f.id; thumb.loading = 'lazy';
    thumb.className = 'thumb';
    const text = document.createElement('span');
    text.className = 'row-text';
    const name = document.createElement('b');
    name.textContent = f.id;
    const material = document.createElement('span');
    material.className = `mat mat-${f.material}`;
    material.textContent = f.material;
    text.append(name, ' ', material,
      ` · ${f.layer_class} · ${f.thickness_nm.toFixed(1)} nm · ${f.area_um2.toFixed(0)} µm²`);
    const add = document.createElement('button');
    add.textContent = 'add';
    add.className = 'add-layer';
    add.addEventListener('click', () => {
      if (layers.some((l) => l.flake_id === f.id)) { say(`${f.id} is already in the stack`, true); return; }
      layers.push({flake_id: f.id, material: f.material, layer_class: f.layer_class, thickness_nm: f.thickness_nm,
        rotation_deg: 0});
      redraw();
    });
    row.append(thumb, text, add);
    return row;
  }

  async function search(event, append) {
    if (event) event.preventDefault();
    searchPage = append ? searchPage + 1 : 1;
    const number = ++searchNumber;
    const params = searchParams();
    params.set('page', String(searchPage));
    const response = await fetch(`/api/flakes?${params}`);
    const body = await response.json();
    if (number !== searchNumber) return;
    if (!append) candidatesBox.innerHTML = '';
    if (!response.ok) {
      summary.textContent = window.flakeErrorText(body);
      summary.className = 'error-text';
      moreButton.hidden = true;
      return;
    }
    summary.className = 'hint';
    const shown = (searchPage - 1) * PAGE + body.flakes.length;
    summary.textContent = (body.total ? `${body.total} available flakes match; showing ${shown}` :
      'no available flakes match') + (params.get('sort_by') === 'thickness' ? ' (of measured thickness)' : '');
    for (const f of body.flakes) candidatesBox.appendChild(candidateRow(f));
    moreButton.hidden = shown >= body.total;
  }

  function renderLayers(styles) {
    layersBox.innerHTML = '';
    if (!layers.length) { layersBox.innerHTML = '<p class="empty">add flakes from the list on the left</p>'; }
    layers.forEach((layer, index) => {
      const row = document.createElement('div');
      row.className = 'row';
      row.dataset.flake = layer.flake_id;
      const swatch = document.createElement('span');
      swatch.className = 'swatch layer-swatch';
      if (styles && styles[index]) swatch.style.background = styles[index].colour;
      const label = document.createElement('span');
      label.className = `row-text mat mat-${layer.material}`;
      label.textContent = `${index + 1}. ${layer.material} ${layer.layer_class} ${layer.thickness_nm.toFixed(1)} nm ` +
        layer.flake_id;
      const rotation = document.createElement('input');
      rotation.type = 'number'; rotation.min = -360; rotation.max = 360; rotation.step = 1;
      rotation.value = layer.rotation_deg;
      rotation.title = 'rotation [degrees]';
      rotation.className = 'rotation';
      rotation.addEventListener('change', () => {
        const value = Number(rotation.value);
        if (!Number.isFinite(value) || value < -360 || value > 360) { say('rotation must be -360..360°', true); return; }
        layer.rotation_deg = value;
        redraw();
      });
      const unit = document.createElement('span'); unit.textContent = '°';
      const remove = document.createElement('button');
      remove.textContent = 'remove'; remove.className = 'secondary';
      remove.addEventListener('click', () => { layers.splice(index, 1); redraw(); });
      row.append(swatch, label, rotation, unit, remove);
      layersBox.appendChild(row);
    });
    reserveButton.disabled = layers.length === 0;
  }

  function payloadLayers() {
    return layers.map((l) => ({flake_id: l.flake_id, rotation_deg: l.rotation_deg}));
  }

  let previewNumber = 0;  // only the newest preview is drawn when several are in flight

  function drawScale(spanMetres) {
    const box = svg.getBoundingClientRect();
    const bar = window.flakeScaleBar(spanMetres / Math.min(box.width, box.height), 120);
    document.getElementById('stack-scale-bar').style.width = `${bar.pixels.toFixed(1)}px`;
    document.getElementById('stack-scale-text').textContent = bar.text;
  }

  function drawLegend(previewLayers) {
    const legend = document.getElementById('stack-legend');
    legend.innerHTML = '';
    previewLayers.forEach((layer, index) => {
      const line = document.createElement('div');
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = layer.colour;
      const thickness = layer.thickness_nm ? ` · ${layer.thickness_nm.toFixed(1)} nm` : '';
      line.append(swatch, `${index + 1}. ${layer.material} ${layer.layer_class}${thickness}`);
      legend.appendChild(line);
    });
  }

  async function preview() {
    const number = ++previewNumber;
    if (!layers.length) {
      svg.innerHTML = ''; coverage.innerHTML = ''; document.getElementById('common-area').textContent = '';
      document.getElementById('stack-legend').innerHTML = '';
      renderLayers(null);
      return;
    }
    const response = await fetch('/api/stacks/preview', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({layers: payloadLayers()})});
    const body = await response.json();
    if (number !== previewNumber) return;
    svg.innerHTML = '';
    coverage.innerHTML = '';
    document.getElementById('common-area').textContent = '';
    if (!response.ok) { say(window.flakeErrorText(body), true); return; }
    renderLayers(body.layers);
    const [minX, minY, maxX, maxY] = body.overlap.bounds;
    const span = Math.max(maxX - minX, maxY - minY) * 1.1;
    const cx = (minX + maxX) / 2, cy = (minY + maxY) / 2;
    // Micrometres, +y up.
    svg.setAttribute('viewBox', `${(cx - span / 2) * 1e6} ${(-cy - span / 2) * 1e6} ${span * 1e6} ${span * 1e6}`);
    body.layers.forEach((layer, index) => {
      const polygon = document.createElementNS(NS, 'polygon');
      polygon.setAttribute('points', layer.outline.map(([x, y]) => `${x * 1e6},${-y * 1e6}`).join(' '));
      polygon.setAttribute('fill', layer.colour);
      polygon.setAttribute('fill-opacity', '0.3');
      polygon.setAttribute('stroke', layer.colour);
      polygon.setAttribute('stroke-width', '2');
      if (layer.dash) polygon.setAttribute('stroke-dasharray', layer.dash);
      polygon.setAttribute('vector-effect', 'non-scaling-stroke');
      polygon.setAttribute('class', `stack-outline layer-${index}`);
      svg.appendChild(polygon);
    });
    drawScale(span);
    drawLegend(body.layers);
    const head = document.createElement('tr');
    head.innerHTML = '<th>share of ↓ covered by →</th>';
    body.layers.forEach((l, i) => { const th = document.createElement('th'); th.textContent = `${i + 1}. ${l.material}`; head.appendChild(th); });
    coverage.appendChild(head);
    body.overlap.covered.forEach((row, i) => {
      const tr = document.createElement('tr');
      const th = document.createElement('th');
      th.textContent = `${i + 1}. ${body.layers[i].material} ${body.layers[i].flake_id}`;
      tr.appendChild(th);
      row.forEach((value, j) => {
        const td = document.createElement('td');
        td.textContent = i === j ? '—' : `${(value * 100).toFixed(0)} %`;
        if (i !== j && value < 0.95) td.className = 'low';
        tr.appendChild(td);
      });
      coverage.appendChild(tr);
    });
    document.getElementById('common-area').textContent =
      `Area shared by every layer: ${(body.overlap.common_area * 1e12).toFixed(1)} µm²`;
  }

  function redraw() {
    renderLayers(null);
    preview().catch((error) => say(`preview failed: ${error}`, true));
  }

  async function reserve(event) {
    event.preventDefault();
    const lease = Number(document.getElementById('lease').value || 0);
    if (!Number.isFinite(lease) || lease < 0) { say('lease must be a number of seconds >= 0', true); return; }
    const body = {
      name: document.getElementById('stack-name').value,
      robot_id: document.getElementById('robot-id').value,
      lease_s: lease, layers: payloadLayers(), reserve: true};
    reserveButton.disabled = true;
    const response = await fetch('/api/stacks', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const reply = await response.json();
    reserveButton.disabled = false;
    if (!response.ok) {
      say(`Nothing reserved. ${window.flakeErrorText(reply)}`, true);
      return;
    }
    say(`Reserved ${reply.layers.length} flakes for ${reply.robot_id}: recipe ${reply.id}`, false);
    const link = document.createElement('a');
    link.href = `/api/stacks/${reply.id}?download=true`;
    link.textContent = ' download recipe JSON';
    link.id = 'recipe-link';
    message.appendChild(link);
    const table = document.getElementById('recipes');
    const empty = table.querySelector('td.empty');
    if (empty) empty.parentElement.remove();
    const row = table.insertRow(1);
    row.dataset.recipe = reply.id;
    const names = reply.layers.map((l) => `${l.material} ${l.flake_id}`).join(' / ');
    for (const text of [reply.id, reply.name, 'now', names, reply.robot_id, `${reply.layers.length} held`]) {
      row.insertCell().textContent = text;
    }
    const cell = row.insertCell();
    const json = document.createElement('a');
    json.href = link.href; json.textContent = 'JSON';
    cell.appendChild(json);
    search();
  }

  document.getElementById('search-form').addEventListener('submit', (event) => search(event, false));
  moreButton.addEventListener('click', () => search(null, true));
  document.getElementById('reserve-form').addEventListener('submit', reserve);
  search();
})();
