// Run by edit-worker as `node --input-type=module --eval <this> <cli> <bin> <args...>`, inside
// the tenant's sandbox, while the agent works (prepared_build.rs). It waits for a line on stdin:
// "load" loads Astro's CLI and build ahead, says so on stdout, and waits for the next line;
// "build" (first or next) runs `astro <args>` as the `astro` program would run it, loading first
// if it has not. Anything else, or stdin closed, ends it without building.
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const [cliPath, binPath, ...args] = process.argv.slice(1);
const cliUrl = pathToFileURL(cliPath);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const nextLine = async () => {
  const { value, done } = await lines.next();
  return done ? null : value;
};

let command = await nextLine();
if (command !== 'load' && command !== 'build') process.exit(0);
let cli;
try {
  ({ cli } = await import(cliUrl.href));
  // What `astro build` imports first; the rest is loaded and compiled by the build itself.
  await import(new URL('./build/index.js', cliUrl).href);
  await import(new URL('../core/build/index.js', cliUrl).href);
} catch {
  // Not the Astro this was written for: the worker builds the usual way instead.
  process.exit(86);
}
process.stdout.write('edit-worker: build tool loaded\n');
if (command === 'load') command = await nextLine();
if (command !== 'build') process.exit(0);
process.stdin.destroy();
// From here on the process looks as `node {bin} <args>` would: a child forked with
// process.execArgv must not run this script again.
process.execArgv.splice(0);
process.argv = [process.execPath, binPath, ...args];
try {
  await cli(process.argv);
} catch (error) {
  // As Astro's own `astro.js` does.
  console.error(error);
  process.exit(1);
}
