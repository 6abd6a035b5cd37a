// Shared by every page: the remembered labeller, select boxes that submit, the back link.
'use strict';
(function () {
  const KEY = 'flake-labeller';
  const stored = window.localStorage.getItem(KEY) || '';
  const fields = document.querySelectorAll('.remember-labeller');
  for (const field of fields) {
    if (!field.value && stored) field.value = stored;
    if (field.type !== 'hidden') {
      field.addEventListener('input', () => {
        const name = field.value.trim();
        if (name) window.localStorage.setItem(KEY, name);
        for (const other of fields) if (other !== field) other.value = field.value;
      });
    }
  }
  for (const select of document.querySelectorAll('select.autosubmit')) {
    select.addEventListener('change', () => select.form.submit());
  }
  for (const link of document.querySelectorAll('a.back-link')) {
    link.addEventListener('click', (event) => {
      if (window.history.length > 1) { event.preventDefault(); window.history.back(); }
    });
  }
})();

// Numbers on maps: a scale bar of 1, 2 or 5 x 10^k units not longer than `maxPixels`.
window.flakeScaleBar = function (metresPerPixel, maxPixels) {
  const target = metresPerPixel * maxPixels;
  const exponent = Math.floor(Math.log10(target));
  let length = Math.pow(10, exponent);
  for (const step of [5, 2, 1]) {
    if (step * Math.pow(10, exponent) <= target) { length = step * Math.pow(10, exponent); break; }
  }
  let text;
  if (length < 1e-6) text = `${+(length * 1e9).toPrecision(3)} nm`;
  else if (length < 1e-3) text = `${+(length * 1e6).toPrecision(3)} µm`;
  else text = `${+(length * 1e3).toPrecision(3)} mm`;
  return {pixels: length / metresPerPixel, text};
};

window.flakeErrorText = function (body) {
  return body && body.error ? `${body.error.code}: ${body.error.message}` : 'request failed';
};
