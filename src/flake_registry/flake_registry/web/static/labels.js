// Labelling grid: label flakes and crops from the keyboard, several at once, and undo.
'use strict';
(function () {
  const grid = document.getElementById('label-grid');
  if (!grid) return;
  const vocabulary = JSON.parse(document.getElementById('label-vocabulary').textContent);
  const LAYER_KEYS = {1: 'mono', 2: 'few', 3: 'thick', 4: 'bulk'};
  const who = document.getElementById('labeller');
  const message = document.getElementById('grid-message');
  const cards = [...grid.querySelectorAll('.grid-card')];
  const undo = [];  // [{ids: [label ids], cards: [card]}], newest last
  let focus = 0;

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? 'error-text' : 'hint';
  }

  function show(index) {
    if (!cards.length) return;
    focus = Math.max(0, Math.min(cards.length - 1, index));
    cards.forEach((card, i) => card.classList.toggle('focused', i === focus));
    cards[focus].focus({preventScroll: false});
  }

  function columns() {
    if (cards.length < 2) return 1;
    const top = cards[0].offsetTop;
    const count = cards.findIndex((card) => card.offsetTop !== top);
    return count > 0 ? count : cards.length;
  }

  function selected() {
    const chosen = cards.filter((card) => card.classList.contains('selected'));
    return chosen.length ? chosen : [cards[focus]];
  }

  function nextUnlabelled(from) {
    for (let i = from + 1; i < cards.length; i++) if (!cards[i].classList.contains('labelled')) return i;
    return from;
  }

  async function label(verdict, layerName) {
    const name = who.value.trim();
    if (!name || !who.checkValidity()) {
      say('type your name as labeller first (it is remembered)', true);
      who.focus();
      return;
    }
    const targets = selected();
    const items = targets.map((card) => {
      const item = {verdict, material: card.dataset.material, layer_class: layerName || card.dataset.layer};
      if (card.dataset.flake) item.flake_id = card.dataset.flake; else item.crop_path = card.dataset.crop;
      return item;
    });
    const response = await fetch('/api/labels/batch', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({who: name, items})});
    const body = await response.json();
    if (!response.ok) { say(window.flakeErrorText(body), true); return; }
    targets.forEach((card, i) => {
      card.classList.remove('selected');
      card.classList.add('labelled');
      card.dataset.verdict = verdict;
      card.dataset.labelId = body.ids[i];
      if (layerName) {
        if (!card.dataset.shownLayer) card.dataset.shownLayer = card.dataset.layer;
        card.dataset.layer = layerName;
        card.querySelector('.card-layer').textContent = layerName;
      }
      card.querySelector('.verdict').textContent = `${verdict} · ${items[i].material} · ${items[i].layer_class}`;
      card.classList.toggle('verdict-reject', verdict === 'reject');
    });
    undo.push({ids: body.ids, cards: targets});
    say(`${targets.length} label${targets.length === 1 ? '' : 's'} saved as ${name} (u undoes)`, false);
    show(nextUnlabelled(cards.indexOf(targets[targets.length - 1])));
  }

  async function undoLast() {
    const last = undo.pop();
    if (!last) { say('nothing to undo', true); return; }
    for (const id of last.ids) {
      const response = await fetch(`/api/labels/${id}/withdraw`, {
        method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({who: who.value.trim()})});
      if (!response.ok) { say(window.flakeErrorText(await response.json()), true); return; }
    }
    for (const card of last.cards) {
      if (card.dataset.shownLayer) {
        card.dataset.layer = card.dataset.shownLayer;
        card.querySelector('.card-layer').textContent = card.dataset.shownLayer;
        delete card.dataset.shownLayer;
      }
      card.classList.remove('labelled', 'verdict-reject');
      card.querySelector('.verdict').textContent = 'label withdrawn';
      delete card.dataset.labelId;
    }
    say(`withdrew ${last.ids.length} label${last.ids.length === 1 ? '' : 's'}`, false);
    show(cards.indexOf(last.cards[0]));
  }

  function nextMaterial() {
    for (const card of selected()) {
      const index = vocabulary.materials.indexOf(card.dataset.material);
      const material = vocabulary.materials[(index + 1) % vocabulary.materials.length];
      const text = card.querySelector('.card-material');
      text.classList.remove(`mat-${card.dataset.material}`);
      card.dataset.material = material;
      text.classList.add(`mat-${material}`);
      text.textContent = material;
    }
  }

  grid.addEventListener('keydown', (event) => {
    if (event.target.tagName === 'INPUT' || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    let handled = true;
    if (key === 'ArrowRight') show(focus + 1);
    else if (key === 'ArrowLeft') show(focus - 1);
    else if (key === 'ArrowDown') show(focus + columns());
    else if (key === 'ArrowUp') show(focus - columns());
    else if (key === 'a') label('accept', null);
    else if (key === 'r') label('reject', null);
    else if (LAYER_KEYS[key]) label('relabel', LAYER_KEYS[key]);
    else if (key === 'm') nextMaterial();
    else if (key === ' ') cards[focus].classList.toggle('selected');
    else if (key === 'u') undoLast();
    else if (key === 'Enter' && cards[focus].dataset.flake) {
      window.location.href = `/flakes/${encodeURIComponent(cards[focus].dataset.flake)}`;
    } else handled = false;
    if (handled) event.preventDefault();
  });
  cards.forEach((card, i) => card.addEventListener('click', () => show(i)));
  grid.addEventListener('focus', () => show(focus));

  const retrainForm = document.getElementById('retrain-form');
  const retrainStatus = document.getElementById('retrain-status');
  async function poll() {
    const response = await fetch('/api/retrain');
    const body = await response.json();
    retrainStatus.dataset.state = body.state;
    retrainStatus.textContent = body.state === 'idle' ? '' : `${body.state}: ${body.message || body.log.slice(-1)[0] || ''}`;
    if (body.state === 'running') setTimeout(poll, 2000);
  }
  retrainForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const response = await fetch('/api/retrain', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({who: who.value.trim(), target: document.getElementById('retrain-target').value})});
    const body = await response.json();
    if (!response.ok) { retrainStatus.textContent = window.flakeErrorText(body); return; }
    poll();
  });
  if (retrainStatus.dataset.state === 'running') poll();
  if (!who.value.trim()) who.focus(); else if (cards.length) show(0);
})();
