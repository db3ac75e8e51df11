// Browser test of `cellsam serve`: headless Debian Chromium driven by playwright-core.
//
// node serve.test.mjs CELLSAM_BINARY TESTDATA_DIR DATA_DIR ARTIFACT_DIR [SCREENSHOT_COPY]
//
// Starts the server with the tiny model on a temporary root holding a real image,
// opens the page, opens the image, runs "Segment all", draws a box and checks a new
// label appears, undoes it, exports PNG and CSV and checks them (size, label count),
// reloads the page to check the autosaved labels come back, opens a second tab, and
// saves a screenshot into ARTIFACT_DIR (and SCREENSHOT_COPY when given).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { chromium } from 'playwright-core';

const [bin, testdata, data, artifacts, screenshotCopy] = process.argv.slice(2);
if (!bin || !testdata || !data || !artifacts) {
  console.error('usage: node serve.test.mjs CELLSAM_BINARY TESTDATA_DIR DATA_DIR ARTIFACT_DIR [SCREENSHOT_COPY]');
  process.exit(2);
}
// the screenshot image: H&E, with the data set's ground truth put in place as saved labels
// (the tiny test model has random weights, so its own masks are noise)
const SHOT_IMAGE = 'dsb2018_stage1_test/0f1f896d9ae5a04752d3239c690402c022db4d72c0d2c087d73380896f72c466';
const IMAGE = 'usiigaci_phase/set01_img.png';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

let passed = 0, failed = 0;
function check(name, ok, detail = '') {
  if (ok) { passed++; console.log(`ok   ${name}${detail ? ' (' + detail + ')' : ''}`); }
  else { failed++; console.log(`FAIL ${name}${detail ? ': ' + detail : ''}`); }
}

// 16-bit grey PNG -> {width, height, values} (the label export format).
function readPng16(buf) {
  if (buf.readUInt32BE(0) !== 0x89504e47) throw new Error('not a PNG');
  let p = 8, width = 0, height = 0, depth = 0, ctype = 0;
  const idat = [];
  while (p < buf.length) {
    const len = buf.readUInt32BE(p), type = buf.toString('latin1', p + 4, p + 8), body = buf.subarray(p + 8, p + 8 + len);
    if (type === 'IHDR') { width = body.readUInt32BE(0); height = body.readUInt32BE(4); depth = body[8]; ctype = body[9]; }
    if (type === 'IDAT') idat.push(body);
    p += 12 + len;
  }
  if (depth !== 16 || ctype !== 0) throw new Error(`expected 16-bit grey, got depth ${depth} colour type ${ctype}`);
  const raw = zlib.inflateSync(Buffer.concat(idat)), bpp = 2, stride = width * bpp;
  const out = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)], src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = out.subarray(y * stride, (y + 1) * stride), prev = y ? out.subarray((y - 1) * stride, y * stride) : null;
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? row[i - bpp] : 0, b = prev ? prev[i] : 0, c = prev && i >= bpp ? prev[i - bpp] : 0;
      let v = src[i];
      if (f === 1) v += a;
      else if (f === 2) v += b;
      else if (f === 3) v += (a + b) >> 1;
      else if (f === 4) { const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c); v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c; }
      row[i] = v & 255;
    }
  }
  const values = new Uint16Array(width * height);
  for (let i = 0; i < values.length; i++) values[i] = out.readUInt16BE(i * 2);
  return { width, height, values };
}

function startServer(root) {
  return new Promise((resolve, reject) => {
    const args = ['serve', '--root', root, '--port', '0', '--threads', '2',
      '-m', path.join(testdata, 'checkpoint.safetensors'), '--config', path.join(testdata, 'config.json')];
    const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    const timer = setTimeout(() => reject(new Error('server did not start: ' + err)), 60000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/^cellsam serve: (http:\/\/\S+)\n/);
      if (m) { clearTimeout(timer); resolve({ proc, url: m[1], stderr: () => err }); }
    });
    proc.stderr.on('data', (d) => { err += d; });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited (${code}): ${err}`)); });
  });
}


// Hand tools on real-shaped cells (the ground-truth labels of page 3).
async function handTools(page) {
  const stats = () => page.evaluate(() => {
    const W = cellsamApp.image.width, L = cellsamApp.labels, m = new Map();
    for (let i = 0; i < L.length; i++) {
      const l = L[i];
      if (!l) continue;
      let s = m.get(l);
      if (!s) m.set(l, s = { l, n: 0, sx: 0, sy: 0 });
      s.n++; s.sx += i % W; s.sy += Math.floor(i / W);
    }
    const out = [];
    for (const s of m.values()) {
      const cx = Math.floor(s.sx / s.n), cy = Math.floor(s.sy / s.n);
      out.push({ l: s.l, n: s.n, cx, cy, inside: L[cy * W + cx] === s.l });
    }
    return out.sort((a, b) => b.n - a.n);
  });
  const screen = (x, y) => page.evaluate(([x, y]) => {
    const r = document.getElementById('view').getBoundingClientRect(), v = cellsamApp.view;
    return [r.left + v.tx + (x + 0.5) * v.scale, r.top + v.ty + (y + 0.5) * v.scale];
  }, [x, y]);
  const area = (l) => page.evaluate((l) => cellsamApp.labels.reduce((a, v) => a + (v === l), 0), l);
  const clickAt = async (x, y) => { const p = await screen(x, y); await page.mouse.click(p[0], p[1]); };
  const dragFrom = async (a, b) => {
    const p = await screen(a[0], a[1]), q = await screen(b[0], b[1]);
    await page.mouse.move(p[0], p[1]); await page.mouse.down();
    await page.mouse.move(q[0], q[1], { steps: 12 }); await page.mouse.up();
  };
  await page.keyboard.press('Escape');
  let st = (await stats()).filter((c) => c.inside);
  const [big, c2, c3, c4] = st;

  await page.keyboard.press('x');
  await clickAt(c4.cx, c4.cy);
  check('delete tool removes the clicked label', await area(c4.l) === 0, `label ${c4.l}`);
  await page.keyboard.press('Control+z');
  check('undo restores the deleted label', await area(c4.l) === c4.n);

  await page.keyboard.press('v');
  await clickAt(c2.cx, c2.cy);
  await page.keyboard.press('m');
  await clickAt(c3.cx, c3.cy);
  check('merge moves a label into the selected one', await area(c3.l) === 0 && await area(c2.l) === c2.n + c3.n,
    `${c3.l} into ${c2.l}`);

  const all0 = await stats(), nBefore = all0.length;
  const bb = await page.evaluate((l) => {
    const W = cellsamApp.image.width, L = cellsamApp.labels;
    let x0 = 1e9, x1 = -1;
    for (let i = 0; i < L.length; i++) if (L[i] === l) { const x = i % W; if (x < x0) x0 = x; if (x > x1) x1 = x; }
    return [x0, x1];
  }, big.l);
  await page.keyboard.press('s');
  await dragFrom([bb[0] - 3, big.cy], [bb[1] + 3, big.cy]);
  const after = await stats();
  const parts = after.filter((c) => c.l === big.l || !all0.some((o) => o.l === c.l));
  check('split cuts a label in two (pixels kept)', after.length > nBefore && parts.reduce((a, c) => a + c.n, 0) === big.n,
    `${after.length - nBefore} new, ${parts.map((c) => c.n).join('+')} = ${big.n}`);

  await page.keyboard.press('Escape');
  await page.keyboard.press('d');
  const empty = await page.evaluate(() => {   // a background spot for a brush stroke
    const W = cellsamApp.image.width, H = cellsamApp.image.height, L = cellsamApp.labels;
    for (let y = 20; y < H - 20; y += 7) for (let x = 20; x < W - 60; x += 7) {
      let free = true;
      for (let dy = -6; dy <= 6 && free; dy++) for (let dx = -6; dx <= 46 && free; dx++) free = !L[(y + dy) * W + x + dx];
      if (free) return [x, y];
    }
    return null;
  });
  if (empty) {
    await dragFrom(empty, [empty[0] + 40, empty[1]]);
    const painted = await page.evaluate(() => cellsamApp.selected);
    const pa = await area(painted);
    check('brush paints a new label', painted > 0 && pa > 40, `label ${painted}, ${pa} px`);
    await page.keyboard.press('e');
    await dragFrom(empty, [empty[0] + 40, empty[1]]);
    check('eraser removes it', await area(painted) === 0);
  } else check('found a background spot for the brush', false);

  await page.keyboard.press('Escape');
  await page.keyboard.press('p');
  const before = await page.textContent('#prompt-info');
  await clickAt(c4.cx, c4.cy);   // refines nothing selected -> a new point prompt
  await page.waitForFunction((t) => document.getElementById('prompt-info').textContent !== t, before, { timeout: 20000 });
  check('a point prompt is answered', true, await page.textContent('#prompt-info'));

  // multimask: three candidates, keys 1-3 pick one
  await page.keyboard.press('Escape');
  await page.check('#multimask');
  await page.keyboard.press('b');
  await dragFrom([100, 100], [160, 150]);
  await page.waitForFunction(() => document.querySelectorAll('#candidates button').length === 3, null, { timeout: 20000 });
  await page.keyboard.press('2');
  const chosen = await page.evaluate(() => [cellsamApp.prompt.chosen,
    [...document.querySelectorAll('#candidates button')].findIndex((b) => b.classList.contains('active'))]);
  check('multimask shows 3 candidates and key 2 picks the second', chosen[0] === 1 && chosen[1] === 1, chosen.join(','));
  await page.keyboard.press('Enter');

  // display channels and model channels of an RGB image
  const nopt = await page.$$eval('#display-select option', (o) => o.length);
  await page.keyboard.press('c');
  check('display offers composite + 3 channels, C cycles them', nopt === 4 &&
    await page.$eval('#display-select', (e) => e.value) === '0', `${nopt} options`);
  const nLabels = await page.evaluate(() => +document.getElementById('label-count').textContent);
  const oldId = await page.evaluate(() => cellsamApp.image.id);
  await page.selectOption('#nuclear-select', '1');
  await page.waitForFunction((id) => cellsamApp.image.id !== id && cellsamApp.image.nuclear === 1 &&
    document.getElementById('emb-status').dataset.state === 'ready', oldId, { timeout: 60000 });
  check('choosing a nuclear channel computes a new embedding and keeps the labels',
    await page.evaluate(() => +document.getElementById('label-count').textContent) === nLabels);
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cellsam-browser-'));
const root = path.join(tmp, 'root');
fs.mkdirSync(root);
fs.copyFileSync(path.join(data, IMAGE), path.join(root, 'phase.png'));
fs.copyFileSync(path.join(data, SHOT_IMAGE + '_img.png'), path.join(root, 'he_tissue.png'));
fs.mkdirSync(path.join(root, '.cellsam'));
fs.copyFileSync(path.join(data, SHOT_IMAGE + '_masks.png'), path.join(root, '.cellsam', 'he_tissue.png.labels.png'));
const gtCells = new Set(readPng16(fs.readFileSync(path.join(data, SHOT_IMAGE + '_masks.png'))).values).size - 1;
fs.mkdirSync(artifacts, { recursive: true });

let server, context;
try {
  server = await startServer(root);
  check('server prints its URL', /^http:\/\/127\.0\.0\.1:\d+\/$/.test(server.url), server.url);
  context = await chromium.launchPersistentContext(path.join(tmp, 'profile'), {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 860 },
    acceptDownloads: true,
  });
  const page = context.pages()[0] || await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('dialog', (d) => d.accept());
  await page.goto(server.url);
  await page.waitForFunction(() => document.querySelectorAll('#file-select option').length > 0, null, { timeout: 20000 });
  const files = await page.$$eval('#file-select option', (os) => os.map((o) => o.value));
  check('file list shows the image', files.includes('phase.png'), files.join(','));

  await page.selectOption('#file-select', 'phase.png');
  await page.click('#open-btn');
  await page.waitForSelector('#emb-status[data-state="ready"]', { timeout: 120000 });
  const dims = await page.evaluate(() => [cellsamApp.image.width, cellsamApp.image.height, cellsamApp.image.channels]);
  check('image opened with its size and channels', dims.join('x') === '1024x1022x1', dims.join('x'));

  // segment all, with the cell diameter field sent as typed (the test model recommends no sizing)
  const shownDiameter = await page.inputValue('#seg-diameter');
  check('cell diameter field shows the model recommendation (off)', shownDiameter === '0', shownDiameter);
  await page.fill('#seg-diameter', '64'); // zoom 1: the image as a padded 1024 canvas
  const segRequest = page.waitForRequest((r) => r.method() === 'POST' && /\/segment$/.test(r.url()));
  await page.click('#segment-btn');
  const segBody = JSON.parse((await segRequest).postData() || '{}');
  check('segment all sends the cell diameter', segBody.diameter === 64, JSON.stringify(segBody));
  await page.waitForFunction(() => +document.getElementById('label-count').textContent > 0, null, { timeout: 240000 });
  const nSeg = await page.evaluate(() => +document.getElementById('label-count').textContent);
  check('segment all adds labels', nSeg > 0, `${nSeg} cells`);
  await page.waitForSelector('#save-status[data-state="saved"]', { timeout: 20000 });

  // box prompt -> new label (overwrite on: the random tiny model's cells may cover everything)
  await page.check('#overwrite');
  await page.keyboard.press('b');
  const before = await page.evaluate(() => ({ sum: cellsamApp.labels.reduce((a, v) => (a * 31 + v) >>> 0, 7), next: cellsamApp.nextLabel }));
  const box = await page.evaluate(() => {
    const r = document.getElementById('view').getBoundingClientRect(), v = cellsamApp.view;
    const at = (x, y) => [r.left + v.tx + x * v.scale, r.top + v.ty + y * v.scale];
    return [at(300, 200), at(380, 270)];
  });
  await page.mouse.move(box[0][0], box[0][1]);
  await page.mouse.down();
  await page.mouse.move((box[0][0] + box[1][0]) / 2, (box[0][1] + box[1][1]) / 2, { steps: 4 });
  await page.mouse.move(box[1][0], box[1][1], { steps: 4 });
  await page.mouse.up();
  await page.waitForFunction((n) => cellsamApp.undo.length > 0 && cellsamApp.selected === n, before.next, { timeout: 20000 });
  const area = await page.evaluate((n) => cellsamApp.labels.reduce((a, v) => a + (v === n), 0), before.next);
  check('a box prompt adds a new label', area > 0, `label ${before.next}, ${area} px`);
  const rt = await page.textContent('#prompt-info');
  console.log('     ' + rt);

  await page.keyboard.press('Control+z');
  const after = await page.evaluate((n) => ({
    sum: cellsamApp.labels.reduce((a, v) => (a * 31 + v) >>> 0, 7),
    area: cellsamApp.labels.reduce((a, v) => a + (v === n), 0),
  }), before.next);
  check('undo removes the new label', after.area === 0 && after.sum === before.sum);
  await page.keyboard.press('Control+Shift+z');
  const redoArea = await page.evaluate((n) => cellsamApp.labels.reduce((a, v) => a + (v === n), 0), before.next);
  check('redo brings it back', redoArea === area, `${redoArea} px`);
  await page.keyboard.press('Control+z');

  // pan and zoom never wait on the server: no API request during 20 wheel zooms and
  // 10 drag pans, and the time from input to the second animation frame is printed
  // (edits made just before are autosaved first, so that save is not counted)
  await page.waitForSelector('#save-status[data-state="saved"]', { timeout: 20000 });
  let apiRequests = 0;
  const seen = [];
  const onRequest = (r) => { if (r.url().includes('/api/')) { apiRequests++; seen.push(r.method() + ' ' + r.url()); } };
  page.on('request', onRequest);
  await page.keyboard.press('v');
  const centre = await page.evaluate(() => {
    const r = document.getElementById('view').getBoundingClientRect();
    return [r.left + r.width / 2, r.top + r.height / 2];
  });
  const twoFrames = () => page.evaluate(() => new Promise((res) => requestAnimationFrame(() => requestAnimationFrame(res))));
  const panZoomMs = [];
  for (let i = 0; i < 20; i++) {
    const t0 = performance.now();
    await page.mouse.move(centre[0], centre[1]);
    await page.mouse.wheel(0, i % 2 ? 240 : -240);
    await twoFrames();
    panZoomMs.push(performance.now() - t0);
  }
  for (let i = 0; i < 10; i++) {
    const t0 = performance.now();
    await page.keyboard.down('Space');
    await page.mouse.move(centre[0], centre[1]);
    await page.mouse.down();
    await page.mouse.move(centre[0] + (i % 2 ? -60 : 60), centre[1] + 30, { steps: 4 });
    await page.mouse.up();
    await page.keyboard.up('Space');
    await twoFrames();
    panZoomMs.push(performance.now() - t0);
  }
  page.off('request', onRequest);
  panZoomMs.sort((a, b) => a - b);
  console.log(`     pan/zoom: median ${panZoomMs[15].toFixed(1)} ms, max ${panZoomMs[29].toFixed(1)} ms from input to the second frame (30 interactions)`);
  check('pan and zoom send no request to the server', apiRequests === 0, `${apiRequests} requests ${seen.join(', ')}`);

  // export (the page saves first, then downloads from the server)
  const uiCount = await page.evaluate(() => +document.getElementById('label-count').textContent);
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 30000 }), page.click('#export-png')]);
  const pngPath = path.join(artifacts, 'serve_export_labels.png');
  await dl.saveAs(pngPath);
  const png = readPng16(fs.readFileSync(pngPath));
  const distinct = new Set(png.values); distinct.delete(0);
  let maxv = 0;
  for (const v of png.values) if (v > maxv) maxv = v;
  check('exported PNG has the image size', png.width === 1024 && png.height === 1022, `${png.width}x${png.height}, ${fs.statSync(pngPath).size} bytes`);
  check('exported PNG has the page\'s labels, numbered 1..N', distinct.size === uiCount && maxv === uiCount, `${distinct.size} labels, max ${maxv}, page ${uiCount}`);
  const [dl2] = await Promise.all([page.waitForEvent('download', { timeout: 30000 }), page.click('#export-csv')]);
  const csvPath = path.join(artifacts, 'serve_export_cells.csv');
  await dl2.saveAs(csvPath);
  const csv = fs.readFileSync(csvPath, 'utf8').trim().split('\n');
  check('exported CSV has a header and one row per cell', csv[0].startsWith('label,x0,y0,x1,y1,area') && csv.length - 1 === uiCount, `${csv.length - 1} rows`);

  await page.keyboard.press('Control+Shift+z');
  await page.waitForSelector('#save-status[data-state="saved"]', { timeout: 20000 });
  const finalSum = await page.evaluate(() => cellsamApp.labels.reduce((a, v) => (a * 31 + v) >>> 0, 7));

  // autosave + restore: a second tab opens the same image and gets the same labels
  const page2 = await context.newPage();
  page2.on('pageerror', (e) => pageErrors.push(e.message));
  await page2.goto(server.url + '#phase.png');
  await page2.waitForFunction(() => cellsamApp.image && cellsamApp.labels && cellsamApp.labels.some((v) => v), null, { timeout: 30000 });
  const sum2 = await page2.evaluate(() => cellsamApp.labels.reduce((a, v) => (a * 31 + v) >>> 0, 7));
  check('a second tab restores the autosaved labels', sum2 === finalSum);
  await page2.close();

  // labels written by another tool are restored too; screenshot with a box being drawn
  const page3 = await context.newPage();
  page3.on('pageerror', (e) => pageErrors.push(e.message));
  await page3.goto(server.url + '#he_tissue.png');
  await page3.waitForSelector('#emb-status[data-state="ready"]', { timeout: 120000 });
  await page3.waitForFunction(() => +document.getElementById('label-count').textContent > 0, null, { timeout: 20000 });
  const n3 = await page3.evaluate(() => +document.getElementById('label-count').textContent);
  check('ground-truth labels placed in .cellsam/ are restored', n3 === gtCells, `${n3} of ${gtCells}`);
  const pts = await page3.evaluate(() => {
    const r = document.getElementById('view').getBoundingClientRect(), v = cellsamApp.view;
    const at = (x, y) => [r.left + v.tx + x * v.scale, r.top + v.ty + y * v.scale];
    return { sel: at(0, 0), a: at(420, 150), b: at(470, 205) };
  });
  await page3.keyboard.press('v');
  const firstCell = await page3.evaluate(() => {   // click the centre of some label to select it
    const W = cellsamApp.image.width, L = cellsamApp.labels, i = L.findIndex((v) => v === 12);
    return i < 0 ? null : [i % W + 2, Math.floor(i / W) + 2];
  });
  if (firstCell) {
    const r = await page3.evaluate(([x, y]) => {
      const q = document.getElementById('view').getBoundingClientRect(), v = cellsamApp.view;
      return [q.left + v.tx + x * v.scale, q.top + v.ty + y * v.scale];
    }, firstCell);
    await page3.mouse.click(r[0], r[1]);
  }
  await page3.keyboard.press('b');
  await page3.mouse.move(pts.a[0], pts.a[1]);
  await page3.mouse.down();
  await page3.mouse.move(pts.b[0], pts.b[1], { steps: 5 });
  await page3.waitForTimeout(200);
  const shot = path.join(artifacts, 'serve_screenshot.png');
  await page3.screenshot({ path: shot });
  check('screenshot saved', fs.statSync(shot).size > 10000, shot);
  if (screenshotCopy) fs.copyFileSync(shot, screenshotCopy);
  await page3.mouse.up();
  // the tiny model's mask for that box is noise: wait for it, then undo it
  await page3.waitForFunction(() => cellsamApp.undo.length > 0 && !cellsamApp.promptBusy, null, { timeout: 20000 });
  await page3.keyboard.press('Control+z');
  await handTools(page3);

  // corrections are training data: Fine-tune on the labels saved so far, then use the result.
  // First, an image the model found cells in that have no label (the answer is mocked): the
  // page asks before training, and Cancel starts nothing
  const ftData = /\/api\/finetune\/data$/, ftStart = /\/api\/finetune$/;
  let ftPosted = false;
  const dialogs = [];
  await page3.route(ftData, (route) => route.fulfill({ json: {
    images: [{ image: 'phase.png', cells: 1, model_cells: 9, unlabelled: 8, partial: true }], n_images: 1, cells: 1, partial: 1 } }));
  await page3.route(ftStart, (route) => { ftPosted ||= route.request().method() === 'POST'; return route.continue(); });
  page3.once('dialog', (d) => { dialogs.push(d.message()); d.dismiss(); });
  await page3.fill('#ft-epochs', '1');
  await page3.click('#ft-start');
  for (let i = 0; i < 100 && !dialogs.length; i++) await page3.waitForTimeout(50);
  await page3.waitForTimeout(300);
  check('a partly labelled image: the page asks before fine-tuning', /phase\.png: 8 of the model's 9 cells have no label/.test(dialogs[0] || ''), dialogs[0]);
  check('Cancel starts no fine-tune', !ftPosted && !(await page3.isDisabled('#ft-start')), `posted ${ftPosted}`);
  await page3.unroute(ftData);
  await page3.unroute(ftStart);
  page3.on('dialog', (d) => d.accept()); // the real labels: train whatever they are
  await page3.click('#ft-start');
  await page3.waitForFunction(() => /^(done|failed)/.test(document.getElementById('ft-status').textContent), null, { timeout: 180000 });
  const ftText = await page3.textContent('#ft-status');
  check('Fine-tune trains on the saved labels and finishes', /^done: \d+ steps? .*finetuned-1\.safetensors/.test(ftText), ftText);
  await page3.click('#ft-use');
  await page3.waitForFunction(() => /\(in use\)/.test(document.getElementById('ft-status').textContent), null, { timeout: 60000 });
  check('"Use the fine-tuned model" swaps it in', await page3.isHidden('#ft-use'), await page3.textContent('#ft-status'));
  const undoBefore = await page3.evaluate(() => cellsamApp.undo.length);
  await page3.keyboard.press('b');
  await page3.mouse.move(pts.a[0], pts.a[1]);
  await page3.mouse.down();
  await page3.mouse.move(pts.b[0], pts.b[1], { steps: 5 });
  await page3.mouse.up();
  await page3.waitForFunction((n) => cellsamApp.undo.length > n && !cellsamApp.promptBusy, undoBefore, { timeout: 20000 });
  check('the fine-tuned model answers a box prompt', true, await page3.textContent('#prompt-info'));

  // while a segment-all runs, its button reads "Stop segmenting" and stops it. The server's
  // answers are mocked here (a real run of the tiny model may end before the click); the
  // endpoint itself is checked by cli_server.
  const imgId = await page3.evaluate(() => cellsamApp.image.id);
  let segState = 'running', stopPosted = false;
  const withSegment = (j) => ({ ...j, segment: { state: segState, progress: 0.4 } });
  await page3.route(new RegExp(`/api/images/${imgId}$`), async (route) => {
    const r = await route.fetch();
    await route.fulfill({ response: r, json: withSegment(await r.json()) });
  });
  await page3.route(new RegExp(`/api/images/${imgId}/segment$`), async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    await route.fulfill({ status: 202, json: { segment: { state: 'running', progress: 0 } } });
  });
  await page3.route(new RegExp(`/api/images/${imgId}/segment/stop$`), async (route) => {
    stopPosted = route.request().method() === 'POST';
    segState = 'stopped';
    await route.fulfill({ status: 202, json: { segment: { state: 'stopped', progress: 0 } } });
  });
  await page3.click('#segment-btn');
  await page3.waitForFunction(() => document.getElementById('segment-btn').textContent === 'Stop segmenting', null, { timeout: 10000 });
  check('the Segment all button reads "Stop segmenting" while one runs', true);
  await page3.click('#segment-btn');
  await page3.waitForFunction(() => document.getElementById('message').textContent === 'segment all stopped', null, { timeout: 10000 });
  check('it posts .../segment/stop and reports the stop', stopPosted, await page3.textContent('#message'));
  check('the button reads "Segment all" again', (await page3.textContent('#segment-btn')) === 'Segment all');
  await page3.unrouteAll();
  await page3.close();
  check('no JavaScript errors', pageErrors.length === 0, pageErrors.join(' | '));
} catch (e) {
  check('browser test ran to the end', false, e.stack || String(e));
} finally {
  if (context) await context.close().catch(() => {});
  if (server) {
    const code = await new Promise((res) => { server.proc.once('exit', (c) => res(c)); server.proc.kill('SIGTERM'); });
    check('server stops cleanly on SIGTERM', code === 0, `exit ${code}`);
  }
  fs.rmSync(tmp, { recursive: true, force: true });
}
console.log(`cli_browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
