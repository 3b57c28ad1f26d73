// zsad report: draws the rows of the embedded data a page at a time, with filters, search,
// order, pages, an enlarged view and keyboard navigation. The state lives in the URL's fragment
// (#filter=failed&page=3), so a reload or a shared link shows the same rows.
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('zsad-data').textContent);
  var rows = data.rows;
  var decided = data.threshold !== null && data.threshold !== undefined;
  rows.forEach(function (r, i) {
    r.rank = i + 1;
    r.kind = r.error != null || r.score == null ? 'failed'
      : r.anomalous === true ? 'anomalous'
      : r.anomalous === false ? 'normal' : 'undecided';
  });
  var FILTERS = ['all', 'anomalous', 'normal', 'failed'];
  var SORTS = ['score-desc', 'score-asc', 'path'];
  var state = { filter: 'all', q: '', sort: 'score-desc', page: 1, size: data.page_size, sel: 0 };
  var view = [];
  var box = -1;
  var lastHash = null;
  var $ = function (s) { return document.querySelector(s); };
  var tbody = $('#rows tbody');
  var lightbox = $('#lightbox');

  function readHash() {
    var h = new URLSearchParams(location.hash.slice(1));
    state.filter = FILTERS.indexOf(h.get('filter')) >= 0 ? h.get('filter') : 'all';
    state.sort = SORTS.indexOf(h.get('sort')) >= 0 ? h.get('sort') : 'score-desc';
    state.q = h.get('q') || '';
    var p = parseInt(h.get('page'), 10);
    state.page = p > 0 ? p : 1;
    $('#search').value = state.q;
    $('#sort').value = state.sort;
  }

  function writeHash() {
    var h = new URLSearchParams();
    if (state.filter !== 'all') h.set('filter', state.filter);
    if (state.sort !== 'score-desc') h.set('sort', state.sort);
    if (state.q) h.set('q', state.q);
    if (state.page > 1) h.set('page', String(state.page));
    var s = h.toString();
    lastHash = s ? '#' + s : '';
    if (location.hash !== lastHash) location.replace(lastHash || '#');
  }

  function failed(r) { return r.kind === 'failed'; }

  function matches(r, filter) {
    if (filter !== 'all' && r.kind !== filter) return false;
    return !state.q || r.path.toLowerCase().indexOf(state.q.toLowerCase()) >= 0;
  }

  function order(a, b) {
    if (state.sort === 'path') return a.path < b.path ? -1 : a.path > b.path ? 1 : 0;
    if (failed(a) !== failed(b)) return failed(a) ? 1 : -1;
    if (state.sort === 'score-asc' && !failed(a)) return b.rank - a.rank;
    return a.rank - b.rank;
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function fmt(x, d) { return x == null ? '–' : Number(x).toFixed(d); }

  function picture(url, what, index) {
    var td = el('td', 'pic');
    if (!url) {
      td.appendChild(el('span', 'none', '—'));
      return td;
    }
    var img = el('img');
    img.loading = 'lazy';
    img.decoding = 'async';
    img.alt = what;
    img.dataset.what = what;
    img.addEventListener('error', function () {
      img.classList.add('broken');
      img.alt = what + ' could not be loaded';
    });
    img.addEventListener('click', function () { openBox(index); });
    img.src = url;
    td.appendChild(img);
    return td;
  }

  function regionsText(n) { return n + (n === 1 ? ' region' : ' regions'); }

  // A row normal by the image threshold with regions over the pixel threshold: the two
  // thresholds are set apart, so both can hold.
  function thresholdNote(r) {
    if (r.anomalous !== false || !(r.regions > 0)) return null;
    return 'normal by the image threshold; ' + regionsText(r.regions) + ' above the pixel threshold';
  }

  function badge(r) {
    var text = r.kind === 'undecided' ? 'no threshold' : r.kind;
    return el('span', 'badge ' + r.kind, text);
  }

  function rowElement(r, index) {
    var tr = el('tr', r.kind);
    tr.dataset.index = String(index);
    tr.dataset.kind = r.kind;
    tr.dataset.path = r.path;
    if (r.score != null) tr.dataset.score = String(r.score);
    tr.appendChild(el('td', 'rank', String(r.rank)));
    var none = failed(r);
    tr.appendChild(picture(none ? null : r.image, 'image', index));
    tr.appendChild(picture(none ? null : r.heatmap, 'heatmap', index));
    tr.appendChild(picture(none ? null : r.mask, 'mask', index));
    var info = el('td', 'info');
    info.appendChild(el('code', null, r.path));
    var line = el('div');
    if (!none) line.appendChild(el('span', 'score', fmt(r.score, 4)));
    line.appendChild(badge(r));
    info.appendChild(line);
    if (!none) {
      var d = ['global ' + fmt(r.global_score, 4), 'map max ' + fmt(r.map_max, 4)];
      if (r.regions != null) d.push(regionsText(r.regions));
      if (r.width != null) d.push(r.width + '×' + r.height);
      info.appendChild(el('div', 'details', d.join(' · ')));
      var note = thresholdNote(r);
      if (note) info.appendChild(el('div', 'threshold-note', note));
    }
    if (r.error) info.appendChild(el('div', 'error', r.error));
    (r.problems || []).forEach(function (p) { info.appendChild(el('div', 'problem', p)); });
    tr.appendChild(info);
    tr.addEventListener('click', function (e) {
      if (e.target.tagName !== 'IMG') select(index - pageStart(), false);
    });
    return tr;
  }

  function pageStart() { return (state.page - 1) * state.size; }
  function pages() { return Math.max(1, Math.ceil(view.length / state.size)); }

  function render() {
    view = rows.filter(function (r) { return matches(r, state.filter); }).sort(order);
    state.page = Math.min(Math.max(1, state.page), pages());
    var start = pageStart();
    var frag = document.createDocumentFragment();
    view.slice(start, start + state.size).forEach(function (r, i) {
      frag.appendChild(rowElement(r, start + i));
    });
    tbody.replaceChildren(frag);
    document.querySelectorAll('[data-filter]').forEach(function (b) {
      var f = b.dataset.filter;
      var off = !decided && (f === 'anomalous' || f === 'normal');
      b.disabled = off;
      b.title = off ? 'no threshold: run zsad detect with --threshold or --thresholds' : '';
      b.setAttribute('aria-pressed', String(f === state.filter));
      var n = rows.filter(function (r) { return matches(r, f); }).length;
      b.querySelector('.count').textContent = off ? '' : '(' + n + ')';
    });
    var end = Math.min(start + state.size, view.length);
    $('.page-info').textContent = view.length
      ? (start + 1) + '–' + end + ' of ' + view.length + ' · page ' + state.page + '/' + pages()
      : '0 of 0';
    $('.pager .prev').disabled = state.page <= 1;
    $('.pager .next').disabled = state.page >= pages();
    $('#empty').hidden = view.length > 0;
    state.sel = Math.min(state.sel, Math.max(0, end - start - 1));
    select(state.sel, false);
    writeHash();
  }

  function select(i, scroll) {
    var trs = tbody.children;
    if (!trs.length) return;
    i = Math.min(Math.max(0, i), trs.length - 1);
    for (var k = 0; k < trs.length; k++) trs[k].classList.toggle('selected', k === i);
    state.sel = i;
    if (scroll !== false) trs[i].scrollIntoView({ block: 'nearest' });
  }

  function turn(delta, sel) {
    var p = state.page + delta;
    if (p < 1 || p > pages()) return false;
    state.page = p;
    state.sel = sel;
    render();
    window.scrollTo(0, 0);
    return true;
  }

  function moveSelection(delta) {
    var i = state.sel + delta;
    if (i >= tbody.children.length) { if (turn(1, 0)) select(0); return; }
    if (i < 0) { if (turn(-1, state.size - 1)) select(state.size - 1); return; }
    select(i);
  }

  var SVG = 'http://www.w3.org/2000/svg';

  // The region boxes over a picture, in the image's pixels: the overlay's viewBox is the
  // picture's natural size in those pixels (a heatmap with a colour bar is wider than the image,
  // a preview smaller), and it scales with the picture as object-fit: contain does.
  function boxes(r, img) {
    var svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('class', 'boxes');
    svg.setAttribute('preserveAspectRatio', 'xMidYMid meet');
    (r.boxes || []).forEach(function (b) {
      var rect = document.createElementNS(SVG, 'rect');
      rect.setAttribute('x', b[0]);
      rect.setAttribute('y', b[1]);
      rect.setAttribute('width', Math.max(b[2], 1));
      rect.setAttribute('height', Math.max(b[3], 1));
      rect.setAttribute('vector-effect', 'non-scaling-stroke');
      svg.appendChild(rect);
    });
    function fit() {
      var k = r.height ? img.naturalHeight / r.height : 1;
      if (!img.naturalWidth || !k) return;
      svg.setAttribute('viewBox', '0 0 ' + img.naturalWidth / k + ' ' + img.naturalHeight / k);
      svg.dataset.ready = 'true';
    }
    img.addEventListener('load', fit);
    if (img.complete) fit();
    return svg;
  }

  function figure(url, what, r) {
    var f = el('figure');
    var frame = el('div', 'frame');
    var img = el('img');
    img.alt = what;
    img.dataset.what = what;
    img.addEventListener('error', function () { img.classList.add('broken'); });
    img.src = url;
    frame.appendChild(img);
    var n = (r.boxes || []).length;
    if (n && what !== 'mask') frame.appendChild(boxes(r, img));
    f.appendChild(frame);
    var cap = what;
    if (n && what !== 'mask') {
      cap += n < r.regions ? ' · the ' + n + ' largest of ' + r.regions + ' regions boxed'
        : ' · ' + regionsText(n) + ' boxed';
    }
    f.appendChild(el('figcaption', null, cap));
    return f;
  }

  function showBox() {
    var r = view[box];
    var page = Math.floor(box / state.size) + 1;
    if (page !== state.page) { state.page = page; render(); }
    select(box - pageStart());
    var cap = '#' + r.rank + '  ' + r.path + (failed(r) ? '' : '  score ' + fmt(r.score, 4)) + '  ' +
      (r.kind === 'undecided' ? '' : r.kind) + '  (' + (box + 1) + ' of ' + view.length + ')';
    $('#lightbox .caption').textContent = cap;
    var pics = $('#lightbox .pictures');
    pics.replaceChildren();
    if (failed(r)) pics.appendChild(el('p', 'error', r.error || 'failed'));
    [[r.image_full || r.image, 'image'], [r.heatmap_full || r.heatmap, 'heatmap'],
     [r.mask_full || r.mask, 'mask']].forEach(function (p) {
      if (p[0] && !failed(r)) pics.appendChild(figure(p[0], p[1], r));
    });
    var note = failed(r) ? null : thresholdNote(r);
    $('#lightbox .note').textContent = note || '';
    $('#lightbox .note').hidden = !note;
    $('#lightbox .prev').disabled = box <= 0;
    $('#lightbox .next').disabled = box >= view.length - 1;
  }

  function openBox(index) {
    if (index < 0 || index >= view.length) return;
    box = index;
    lightbox.hidden = false;
    showBox();
  }

  function moveBox(delta) {
    var i = box + delta;
    if (i < 0 || i >= view.length) return;
    box = i;
    showBox();
  }

  function closeBox() {
    box = -1;
    lightbox.hidden = true;
  }

  document.querySelectorAll('[data-filter]').forEach(function (b) {
    b.addEventListener('click', function () {
      state.filter = b.dataset.filter;
      state.page = 1;
      state.sel = 0;
      render();
    });
  });
  $('#search').addEventListener('input', function (e) {
    state.q = e.target.value;
    state.page = 1;
    render();
  });
  $('#sort').addEventListener('change', function (e) {
    state.sort = e.target.value;
    state.page = 1;
    render();
  });
  $('.pager .prev').addEventListener('click', function () { turn(-1, 0); });
  $('.pager .next').addEventListener('click', function () { turn(1, 0); });
  $('#lightbox .prev').addEventListener('click', function () { moveBox(-1); });
  $('#lightbox .next').addEventListener('click', function () { moveBox(1); });
  $('#lightbox .close').addEventListener('click', closeBox);
  window.addEventListener('hashchange', function () {
    if (location.hash === lastHash || (location.hash === '' && lastHash === '')) return;
    readHash();
    render();
  });
  document.addEventListener('keydown', function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'SELECT' || t.tagName === 'TEXTAREA')) {
      if (e.key === 'Escape') t.blur();
      return;
    }
    if (box >= 0) {
      if (e.key === 'Escape') closeBox();
      else if (e.key === 'ArrowRight' || e.key === 'j' || e.key === 'ArrowDown') moveBox(1);
      else if (e.key === 'ArrowLeft' || e.key === 'k' || e.key === 'ArrowUp') moveBox(-1);
      else return;
    } else if (e.key === 'j' || e.key === 'ArrowDown') moveSelection(1);
    else if (e.key === 'k' || e.key === 'ArrowUp') moveSelection(-1);
    else if (e.key === 'Enter' || e.key === 'o') openBox(pageStart() + state.sel);
    else if (e.key === 'ArrowRight' || e.key === 'n') turn(1, 0);
    else if (e.key === 'ArrowLeft' || e.key === 'p') turn(-1, 0);
    else if (e.key === '/') $('#search').focus();
    else return;
    e.preventDefault();
  });

  // For automation (and the tests): what is shown, read-only.
  window.zsadReport = {
    state: function () { return JSON.parse(JSON.stringify(state)); },
    shown: function () { return view.slice(pageStart(), pageStart() + state.size).map(function (r) { return r.path; }); },
    total: function () { return view.length; },
    enlarged: function () { return box >= 0 ? view[box].path : null; }
  };
  readHash();
  render();
})();
