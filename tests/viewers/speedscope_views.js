// node speedscope_views.js NPM_DIR URL OUTDIR: opens speedscope's page URL
// (with #profileURL=...) in Debian's chromium, driven by playwright-core,
// in the Time Order, Left Heavy and Sandwich views.  For each view it
// reads what a person would: the tooltips of the frames under the mouse
// at the left edge, the middle and the right edge of the flame chart
// (the stack there, root first), or the rows of the Sandwich table; and
// saves OUTDIR/VIEW.png.  Prints {view: {...}} as JSON.
"use strict";
const path = require("path");
const { chromium } = require(path.join(process.argv[2], "node_modules",
                                       "playwright-core"));

const [, , , url, outdir] = process.argv;
// Tall enough for every row of the seed's Sandwich table.
const WIDTH = 1400, HEIGHT = 1000;
// From the toolbar down past the minimap and the ruler, in steps smaller
// than a flame chart row (about 20 pixels), so that every row is met.
const FIRST_Y = 20, LAST_Y = 400, STEP_Y = 6;

// The text of speedscope's hover tooltip ("79.08ms (89%) foo\nFILE:"),
// found by its first part, the weight and share of the frame (the page's
// class names are hashes); null when there is none.
function tooltip() {
  const count = Array.from(document.querySelectorAll("span")).find(
    (span) => /^\S+ \(\S+%\)$/.test(span.innerText));
  return count ? count.parentElement.innerText : null;
}

// The tooltips met going down at x: the stack there, root first; and
// where the innermost frame was met.
async function stackAt(page, x) {
  const stack = [];
  let innermostY = null;
  for (let y = FIRST_Y; y <= LAST_Y; y += STEP_Y) {
    await page.mouse.move(x, y);
    await page.waitForTimeout(20);
    const text = await page.evaluate(tooltip);
    if (text !== null && text !== stack[stack.length - 1]) {
      stack.push(text);
      innermostY = y;
    }
  }
  return { stack, innermostY };
}

// The stacks at the left edge, the middle and the right edge; the
// screenshot is taken with the mouse on the innermost frame of the
// middle, so that it shows a tooltip.
async function flameChart(page, screenshot) {
  const left = await stackAt(page, 3);
  const right = await stackAt(page, WIDTH - 3);
  const middle = await stackAt(page, WIDTH / 2);
  if (middle.innermostY !== null) {
    await page.mouse.move(WIDTH / 2, middle.innermostY);
    await page.waitForTimeout(200);
  }
  await page.screenshot({ path: screenshot });
  return { left: left.stack, middle: middle.stack, right: right.stack };
}

async function sandwichRows(page) {
  return page.evaluate(() =>
    Array.from(document.querySelectorAll("tr, [class*='tableRow']"),
               (row) => row.innerText.replace(/\s+/g, " ").trim())
      .filter((text) => text));
}

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox"],   // root cannot use chromium's sandbox
  });
  const results = {};
  try {
    for (const view of ["time-ordered", "left-heavy", "sandwich"]) {
      const page = await browser.newPage({
        viewport: { width: WIDTH, height: HEIGHT } });
      await page.goto(`${url}&view=${view}`);
      await page.waitForSelector("canvas");
      await page.waitForTimeout(1000);   // the first frames to draw
      const screenshot = path.join(outdir, `${view}.png`);
      let shown;
      if (view === "sandwich") {
        await page.screenshot({ path: screenshot });
        shown = { rows: await sandwichRows(page) };
      } else {
        shown = await flameChart(page, screenshot);
      }
      results[view] = { title: await page.title(), ...shown };
      await page.close();
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(results));
})();
