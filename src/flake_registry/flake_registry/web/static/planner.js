// Stack planner: pick flakes layer by layer, rotate them, check coverage, reserve all at once.
'use strict';
(function () {
  const NS = 'http://www.w3.org/2000/svg';
  const colours = JSON.parse(document.getElementById('material-colours').textContent);
  const layers = [];  // {flake_id, material, layer_class, rotation_deg}
  const layersBox = document.getElementById('stack-layers');
  const svg = document.getElementById('stack-svg');
  const coverage = document.getElementById('coverage');
  const message = document.getElementById('planner-message');
  const reserveButton = document.getElementById('reserve-button');

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? 'error-text' : 'notice';
  }

  function errorText(body) {
    return body && body.error ? `${body.error.code}: ${body.error.message}` : 'request failed';
  }

  async function search(event) {
    if (event) event.preventDefault();
    const params = new URLSearchParams({statuses: 'available', sort_by: 'score', limit: '30'});
    const material = document.getElementById('search-material').value;
    const layer = document.getElementById('search-layer').value;
    if (material) params.set('material', material);
    if (layer) params.set('layer_classes', layer);
    const box = document.getElementById('candidates');
    const response = await fetch(`/api/flakes?${params}`);
    const body = await response.json();
    if (!response.ok) { box.textContent = errorText(body); return; }
    box.innerHTML = '';
    if (!body.flakes.length) { box.innerHTML = '<p class="empty">no available flakes match</p>'; return; }
    for (const f of body.flakes) {
      const row = document.createElement('div');
      row.className = 'row';
      row.dataset.flake = f.id;
      const text = document.createElement('span');
      text.style.flex = '1';
      text.innerHTML = `<b></b> <span class="mat"></span> · ${f.layer_class} · ${f.thickness_nm.toFixed(1)} nm · ` +
        `${(f.area * 1e12).toFixed(0)} µm²`;
      text.querySelector('b').textContent = f.id;
      text.querySelector('.mat').textContent = f.material;
      text.querySelector('.mat').style.color = colours[f.material] || '#999';
      const add = document.createElement('button');
      add.textContent = 'add';
      add.className = 'add-layer';
      add.addEventListener('click', () => {
        if (layers.some((l) => l.flake_id === f.id)) { say(`${f.id} is already in the stack`, true); return; }
        layers.push({flake_id: f.id, material: f.material, layer_class: f.layer_class, rotation_deg: 0});
        redraw();
      });
      row.append(text, add);
      box.appendChild(row);
    }
  }

  function renderLayers() {
    layersBox.innerHTML = '';
    if (!layers.length) { layersBox.innerHTML = '<p class="empty">add flakes from the list on the left</p>'; }
    layers.forEach((layer, index) => {
      const row = document.createElement('div');
      row.className = 'row';
      row.dataset.flake = layer.flake_id;
      const label = document.createElement('span');
      label.style.flex = '1';
      label.textContent = `${index + 1}. ${layer.material} ${layer.layer_class} ${layer.flake_id}`;
      label.style.color = colours[layer.material] || '#333';
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
      row.append(label, rotation, unit, remove);
      layersBox.appendChild(row);
    });
    reserveButton.disabled = layers.length === 0;
  }

  function payloadLayers() {
    return layers.map((l) => ({flake_id: l.flake_id, rotation_deg: l.rotation_deg}));
  }

  let previewNumber = 0;  // only the newest preview is drawn when several are in flight

  async function preview() {
    const number = ++previewNumber;
    if (!layers.length) {
      svg.innerHTML = ''; coverage.innerHTML = ''; document.getElementById('common-area').textContent = '';
      return;
    }
    const response = await fetch('/api/stacks/preview', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({layers: payloadLayers()})});
    const body = await response.json();
    if (number !== previewNumber) return;
    svg.innerHTML = '';
    coverage.innerHTML = '';
    document.getElementById('common-area').textContent = '';
    if (!response.ok) { say(errorText(body), true); return; }
    const [minX, minY, maxX, maxY] = body.overlap.bounds;
    const span = Math.max(maxX - minX, maxY - minY) * 1.1;
    const cx = (minX + maxX) / 2, cy = (minY + maxY) / 2;
    // Micrometres, +y up.
    svg.setAttribute('viewBox', `${(cx - span / 2) * 1e6} ${(-cy - span / 2) * 1e6} ${span * 1e6} ${span * 1e6}`);
    body.layers.forEach((layer, index) => {
      const polygon = document.createElementNS(NS, 'polygon');
      polygon.setAttribute('points', layer.outline.map(([x, y]) => `${x * 1e6},${-y * 1e6}`).join(' '));
      const colour = colours[layer.material] || '#999';
      polygon.setAttribute('fill', colour);
      polygon.setAttribute('fill-opacity', '0.3');
      polygon.setAttribute('stroke', colour);
      polygon.setAttribute('stroke-width', '2');
      polygon.setAttribute('vector-effect', 'non-scaling-stroke');
      polygon.setAttribute('class', `stack-outline layer-${index}`);
      svg.appendChild(polygon);
    });
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
    renderLayers();
    preview().catch((error) => say(`preview failed: ${error}`, true));
  }

  async function reserve(event) {
    event.preventDefault();
    const body = {
      name: document.getElementById('stack-name').value,
      robot_id: document.getElementById('robot-id').value,
      lease_s: Number(document.getElementById('lease').value || 0),
      layers: payloadLayers(), reserve: true};
    reserveButton.disabled = true;
    const response = await fetch('/api/stacks', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const reply = await response.json();
    reserveButton.disabled = false;
    if (!response.ok) {
      say(`Nothing reserved. ${errorText(reply)}`, true);
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
    const names = reply.layers.map((l) => `${l.material} ${l.flake_id}`).join(' / ');
    for (const text of [reply.id, reply.name, 'now', names, reply.robot_id]) row.insertCell().textContent = text;
    const cell = row.insertCell();
    const json = document.createElement('a');
    json.href = link.href; json.textContent = 'JSON';
    cell.appendChild(json);
    search();
  }

  document.getElementById('search-form').addEventListener('submit', search);
  document.getElementById('reserve-form').addEventListener('submit', reserve);
  search();
})();
