#!/usr/bin/env node
/*
 * File Smalltalk chunk-format sources into Amber on Node (headless) and run SUnit tests.
 *
 *   node run-sunit.js --source FILE [--source FILE ...] [--test CLASS ...] [--describe CLASS ...]
 *                     [--eval EXPRESSION] [--timeout-ms N]
 *
 * Amber's packages are AMD modules, so they load through RequireJS's Node adapter; the
 * sources go through Amber's own Importer (the chunk-format reader and compiler every
 * Amber file-in uses), and the tests through SUnit's TestSuiteRunner, which also runs
 * asynchronous tests (a test that sends #timeout: and answers a Promise) to completion.
 *
 * Prints one JSON line ({"filed_in", "classes", "runs", "passed", "errors", "failures"})
 * and then "N passed, N failed". Exit status: 0 all passed, 1 a test failed or erred,
 * 2 the file-in failed, 3 the run did not finish in time.
 *
 * --eval evaluates a Smalltalk expression after the file-in (a doit, statements and
 * temporaries allowed), waits for it when it answers a Promise, and adds its answer as
 * JSON ("value") to the summary; a signalled error or a rejected Promise exits with 1
 * and the error's message ("error"). Tests use it to run a user's session as written.
 */
"use strict";

const fs = require("fs");
const path = require("path");

function parseArgs(argv) {
  const args = { sources: [], tests: [], describe: [], evaluate: null, timeoutMs: 120000 };
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--source") args.sources.push(value);
    else if (flag === "--test") args.tests.push(value);
    else if (flag === "--describe") args.describe.push(value);
    else if (flag === "--eval") args.evaluate = value;
    else if (flag === "--timeout-ms") args.timeoutMs = Number(value);
    else throw new Error(`unknown argument ${flag}`);
    i += 1;
  }
  if (args.sources.length === 0) throw new Error("give at least one --source FILE");
  return args;
}

function report(summary, status) {
  let text = JSON.stringify(summary) + "\n";
  if (summary.runs !== undefined) {
    text += `${summary.passed} passed, ${summary.errors.length + summary.failures.length} failed\n`;
  }
  // A pipe takes large writes asynchronously: exit once the whole summary is out.
  process.stdout.write(text, () => process.exit(status));
}

function errorText(error) {
  if (error && typeof error._messageText === "function") {
    return String(error._messageText());
  }
  return String((error && (error.stack || error.message)) || error);
}

function selectorsOf(behavior) {
  return behavior._selectors()._asArray().map(String).sort();
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const here = __dirname;
  const requirejs = require(path.join(here, "node_modules", "requirejs"));
  const lang = path.dirname(require.resolve("@ambers/lang/package.json", { paths: [here] }));
  requirejs.config({
    nodeRequire: require,
    paths: { amber: path.join(lang, "base"), "amber/core": path.join(lang, "src") },
  });

  const summary = { filed_in: false, classes: {} };
  const timer = setTimeout(() => report(Object.assign(summary, { error: "timed out" }), 3), args.timeoutMs);

  requirejs(["amber/devel", "amber/core/Platform-Node"], (amber) => {
    amber.initialize({}).then(() => {
      const globals = amber.globals;
      for (const file of args.sources) {
        const source = fs.readFileSync(file, "utf8");
        const importer = globals.Importer._new();
        try {
          importer._import_(source._readStream());
        } catch (error) {
          clearTimeout(timer);
          const section = importer._lastSection();
          report(Object.assign(summary, {
            error: `${file}: ${errorText(error)}`,
            section: section ? String(section).slice(0, 400) : null,
          }), 2);
          return;
        }
      }
      summary.filed_in = true;
      for (const name of args.describe.concat(args.tests)) {
        const cls = globals[name];
        if (!cls) {
          clearTimeout(timer);
          report(Object.assign(summary, { error: `no class ${name} after the file-in` }), 2);
          return;
        }
        summary.classes[name] = { instance: selectorsOf(cls), class: selectorsOf(cls._class()) };
      }
      if (args.evaluate !== null) {
        let answer;
        try {
          answer = globals.Compiler._new()._evaluateExpression_(args.evaluate);
        } catch (error) {
          answer = Promise.reject(error);
        }
        Promise.resolve(answer).then((value) => {
          clearTimeout(timer);
          const plain = value !== null && value !== undefined && typeof value._asJavaScriptObject === "function"
            ? value._asJavaScriptObject() : value;
          report(Object.assign(summary, { value: plain === undefined ? null : plain }), 0);
        }, (error) => {
          clearTimeout(timer);
          report(Object.assign(summary, { error: errorText(error) }), 1);
        });
        return;
      }
      if (args.tests.length === 0) {
        clearTimeout(timer);
        report(summary, 0);
        return;
      }
      let suite = [];
      for (const name of args.tests) {
        suite = suite.concat(globals[name]._buildSuite()._asArray());
      }
      const runner = globals.TestSuiteRunner._on_(suite);
      runner._announcer()._on_do_(globals.ResultAnnouncement, (announcement) => {
        const result = announcement._result();
        if (result._runs() !== result._total()) return;
        clearTimeout(timer);
        const names = (cases) => cases.map((c) => `${c._class()._name()}>>#${c._selector()}`);
        const errors = names(result._errors());
        const failures = names(result._failures());
        report(Object.assign(summary, {
          runs: result._runs(),
          passed: result._runs() - errors.length - failures.length,
          errors,
          failures,
        }), errors.length + failures.length === 0 ? 0 : 1);
      });
      runner._run();
    }).catch((error) => {
      clearTimeout(timer);
      report(Object.assign(summary, { error: `Amber failed to start: ${errorText(error)}` }), 2);
    });
  }, (error) => {
    clearTimeout(timer);
    report(Object.assign(summary, { error: `Amber failed to load: ${errorText(error)}` }), 2);
  });
}

main();
